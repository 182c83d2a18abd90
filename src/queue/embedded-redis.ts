/**
 * With no queue.redisUrl, tribridge runs its own redis-server child: AOF on, data in dataDir,
 * listening on a unix socket only (nothing else can reach it), stopped with the bridge.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdirSync } from "node:fs";
import { join, resolve } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { Redis } from "ioredis";
import type { Logger } from "../log.js";

export interface EmbeddedRedis {
  url: string;
  pid: number | undefined;
  stop(): Promise<void>;
}

const INSTALL_HINT =
  "redis-server was not found. Install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) " +
  "or set queue.redisUrl to an existing Redis (with appendonly yes and maxmemory-policy noeviction).";

/** Where the embedded redis-server listens while the bridge runs. */
export function embeddedRedisSocket(dataDir: string): string {
  // Unix socket paths are limited to ~107 bytes; keep it short and inside the data dir.
  return join(resolve(dataDir, "redis"), "redis.sock");
}

export async function startEmbeddedRedis(dataDir: string, log: Logger): Promise<EmbeddedRedis> {
  const dir = resolve(dataDir, "redis");
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  if (spawnSync("redis-server", ["--version"]).error) throw new Error(INSTALL_HINT);
  const socket = embeddedRedisSocket(dataDir);
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
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  let exited = false;
  let stderr = "";
  child.stderr?.on("data", (d: Buffer) => (stderr += d.toString()));
  child.on("exit", (code) => {
    exited = true;
    if (code) log.error({ code, stderr }, "embedded redis-server exited");
  });

  const url = `unix://${socket}`;
  for (let i = 0; i < 100 && !exited; i++) {
    const probe = new Redis({
      path: socket,
      lazyConnect: true,
      maxRetriesPerRequest: 0,
      retryStrategy: () => null,
    });
    probe.on("error", () => undefined); // expected until redis-server has created its socket
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
  throw new Error(`embedded redis-server did not start: ${stderr.trim() || "no output"}`);
}
