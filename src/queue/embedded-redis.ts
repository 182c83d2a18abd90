/**
 * With no queue.redisUrl, tribridge runs its own redis-server child: AOF on, data in dataDir,
 * listening on a unix socket only (nothing else can reach it), stopped with the bridge.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import { join, resolve } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { Redis } from "ioredis";
import type { Logger } from "../log.js";
import { MAIN_CONNECTION, connectionName } from "../store/redis-store.js";

export interface EmbeddedRedis {
  url: string;
  pid: number | undefined;
  stop(): Promise<void>;
}

const INSTALL_HINT =
  "redis-server was not found. Install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) " +
  "or set queue.redisUrl to an existing Redis (with appendonly yes and maxmemory-policy noeviction).";

/** sun_path is 108 bytes on Linux, with a terminating NUL. */
const MAX_SOCKET_PATH_BYTES = 107;

/** Where the embedded redis-server listens while the bridge runs. */
export function embeddedRedisSocket(dataDir: string): string {
  // Unix socket paths are limited to ~107 bytes; keep it short and inside the data dir.
  return join(resolve(dataDir, "redis"), "redis.sock");
}

/** A connection that fails at once instead of retrying, for probing the socket. */
function probeConnection(socket: string): Redis {
  const probe = new Redis({
    path: socket,
    lazyConnect: true,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
  });
  probe.on("error", () => undefined); // expected while nothing listens on the socket
  return probe;
}

/**
 * A bridge killed hard (SIGKILL, out of memory) cannot take its redis-server child along, and that
 * server still owns the data directory: a second one on the same files would corrupt them. So a
 * server found answering on the socket is adopted — unless another tribridge is connected to it
 * (two bridges given one dataDir), which is an error.
 */
async function adoptLeftover(dir: string, socket: string, log: Logger): Promise<EmbeddedRedis | undefined> {
  if (!existsSync(socket)) return undefined;
  const probe = probeConnection(socket);
  try {
    await probe.connect();
    await probe.ping();
  } catch {
    probe.disconnect();
    return undefined; // a stale socket file: redis-server replaces it
  }
  const clients = String(await probe.client("LIST"));
  if (clients.includes(` name=${connectionName(MAIN_CONNECTION)} `)) {
    probe.disconnect();
    throw new Error(
      `another tribridge is running on the embedded Redis in ${dir}: give each instance its own dataDir, or share an external Redis (queue.redisUrl)`,
    );
  }
  const pid = Number(/process_id:(\d+)/.exec(await probe.info("server"))?.[1]) || undefined;
  log.warn({ dir, pid }, "adopted the embedded redis-server a previous run left running");
  return {
    url: `unix://${socket}`,
    pid,
    stop: async () => {
      // SHUTDOWN writes the AOF out; the reply is the connection closing.
      await probe.shutdown().catch(() => undefined);
      probe.disconnect();
    },
  };
}

export async function startEmbeddedRedis(dataDir: string, log: Logger): Promise<EmbeddedRedis> {
  const dir = resolve(dataDir, "redis");
  const socket = embeddedRedisSocket(dataDir);
  if (Buffer.byteLength(socket) > MAX_SOCKET_PATH_BYTES)
    throw new Error(
      `dataDir is too deep for the embedded Redis: its socket ${socket} is over ` +
        `${MAX_SOCKET_PATH_BYTES} bytes (a unix socket limit). Use a shorter dataDir or set queue.redisUrl`,
    );
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const leftover = await adoptLeftover(dir, socket, log);
  if (leftover) return leftover;
  if (spawnSync("redis-server", ["--version"]).error) throw new Error(INSTALL_HINT);
  const child: ChildProcess = spawn(
    "redis-server",
    [
      "--port",
      "0",
      "--unixsocket",
      socket,
      "--unixsocketperm",
      "700",
      "--dir",
      dir,
      "--appendonly",
      "yes",
      "--appendfsync",
      "everysec",
      "--save",
      "",
      "--maxmemory-policy",
      "noeviction",
      "--daemonize",
      "no",
    ],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  let exited = false;
  // redis-server logs to stdout, its reasons for not starting (a bad AOF file, say) included.
  let output = "";
  const keep = (d: Buffer) => (output = (output + d.toString()).slice(-4000));
  child.stdout?.on("data", keep);
  child.stderr?.on("data", keep);
  const reason = () => lastLine(output) || "no output";
  child.on("exit", (code) => {
    exited = true;
    if (code) log.error({ code, output: reason() }, "embedded redis-server exited");
  });

  const url = `unix://${socket}`;
  for (let i = 0; i < 100 && !exited; i++) {
    const probe = probeConnection(socket);
    try {
      await probe.connect();
      await probe.ping();
      probe.disconnect();
      log.info({ dir }, "embedded redis-server started");
      return {
        url,
        pid: child.pid,
        stop: async () => {
          if (exited) return;
          child.kill("SIGTERM");
          await new Promise((r) => child.once("exit", r));
        },
      };
    } catch {
      probe.disconnect();
      await sleep(100);
    }
  }
  child.kill("SIGKILL");
  throw new Error(`embedded redis-server did not start: ${reason()}`);
}

/** The last line of redis-server's log: where it says why it stopped. */
function lastLine(output: string): string {
  return output.trim().split("\n").at(-1) ?? "";
}
