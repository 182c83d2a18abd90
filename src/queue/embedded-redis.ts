/**
 * With no queue.redisUrl, tribridge runs its own redis-server child: AOF on (synced as queue.fsync
 * says), data in dataDir, listening on a unix socket only (nothing else can reach it), started again
 * on the same files when it dies (within RESTART_LIMITS), stopped with the bridge.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import { join, resolve } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { Redis } from "ioredis";
import { backoffDelayMs, type BackoffPolicy } from "../backoff.js";
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

/** Why the embedded Redis cannot start here, if redis-server is not installed: how to install it. */
export function redisServerMissing(): string | undefined {
  return spawnSync("redis-server", ["--version"]).error ? INSTALL_HINT : undefined;
}

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
async function adoptLeftover(
  dir: string,
  socket: string,
  fsync: FsyncPolicy,
  log: Logger,
): Promise<EmbeddedRedis | undefined> {
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
  await probe.config("SET", "appendfsync", fsync); // queue.fsync may have changed since
  log.warn(
    { dir, pid },
    "adopted the embedded redis-server a previous run left running (it is not restarted if it dies)",
  );
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

/** How the embedded redis-server writes its AOF to disk (queue.fsync). */
export type FsyncPolicy = "always" | "everysec";

/**
 * When the child dies unexpectedly it is started again on the same files after a back-off; past
 * `max` restarts within `windowMs` something is wrong that restarting will not fix (a full disk, a
 * corrupt AOF, the OOM killer), and the bridge gives up so that its own supervisor can act.
 */
export interface RestartLimits extends BackoffPolicy {
  max: number;
  windowMs: number;
}

export const RESTART_LIMITS: RestartLimits = {
  max: 5,
  windowMs: 60_000, // 1 minute
  initialDelayMs: 250, // then 0.5, 1, 2, 4 s (with jitter)
  maxDelayMs: 4_000,
};

export interface EmbeddedRedisOptions {
  /** Default everysec: see queue.fsync in src/config/schema.ts. */
  fsync?: FsyncPolicy;
  restarts?: RestartLimits;
  /**
   * Called once when the child died more often than `restarts` allows and is not started again:
   * nothing can be delivered or acknowledged any more, so the bridge should stop and exit non-zero.
   */
  onGiveUp?(err: Error): void;
}

/** How long a (re)started redis-server has to answer on its socket (100 tries, 100 ms apart). */
const READY_TRIES = 100;

export async function startEmbeddedRedis(
  dataDir: string,
  log: Logger,
  opts: EmbeddedRedisOptions = {},
): Promise<EmbeddedRedis> {
  const dir = resolve(dataDir, "redis");
  const socket = embeddedRedisSocket(dataDir);
  if (Buffer.byteLength(socket) > MAX_SOCKET_PATH_BYTES)
    throw new Error(
      `dataDir is too deep for the embedded Redis: its socket ${socket} is over ` +
        `${MAX_SOCKET_PATH_BYTES} bytes (a unix socket limit). Use a shorter dataDir or set queue.redisUrl`,
    );
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const leftover = await adoptLeftover(dir, socket, opts.fsync ?? "everysec", log);
  if (leftover) return leftover;
  const missing = redisServerMissing();
  if (missing) throw new Error(missing);
  const server = new SupervisedRedis(dir, socket, opts, log);
  await server.start();
  return server;
}

/** One redis-server process, with what it last said (where it says why it stopped). */
interface Child {
  process: ChildProcess;
  exited: boolean;
  output: string;
}

/** The embedded redis-server child, started again when it dies (within RestartLimits). */
class SupervisedRedis implements EmbeddedRedis {
  readonly url: string;
  private child: Child | undefined;
  private stopping = false;
  /** When the child died unexpectedly, within the last window. */
  private deaths: number[] = [];
  private restartTimer: NodeJS.Timeout | undefined;
  /** A bridge that exits without stop() (the stop deadline passed) does not leave its child paused or running. */
  private readonly onProcessExit = () => {
    this.child?.process.kill("SIGCONT");
    this.child?.process.kill("SIGTERM");
  };

  constructor(
    private readonly dir: string,
    private readonly socket: string,
    private readonly opts: EmbeddedRedisOptions,
    private readonly log: Logger,
  ) {
    this.url = `unix://${socket}`;
  }

  get pid(): number | undefined {
    return this.child?.process.pid;
  }

  async start(): Promise<void> {
    process.on("exit", this.onProcessExit);
    try {
      await this.spawn();
    } catch (err) {
      process.off("exit", this.onProcessExit);
      this.stopping = true;
      throw err;
    }
    this.log.info({ dir: this.dir }, "embedded redis-server started");
  }

  /** Starts a redis-server on the data dir and resolves once it answers; rejects if it does not. */
  private async spawn(): Promise<void> {
    const child: Child = {
      process: spawn("redis-server", this.args(), { stdio: ["ignore", "pipe", "pipe"] }),
      exited: false,
      output: "",
    };
    this.child = child;
    // redis-server logs to stdout, its reasons for not starting (a bad AOF file, say) included.
    const keep = (d: Buffer) => (child.output = (child.output + d.toString()).slice(-4000));
    child.process.stdout?.on("data", keep);
    child.process.stderr?.on("data", keep);
    let ready = false;
    child.process.on("exit", (code, signal) => {
      child.exited = true;
      if (ready && !this.stopping) this.died(code, signal, lastLine(child.output));
    });
    for (let i = 0; i < READY_TRIES && !child.exited; i++) {
      const probe = probeConnection(this.socket);
      try {
        await probe.connect();
        await probe.ping();
        ready = true;
        return;
      } catch {
        await sleep(100);
      } finally {
        probe.disconnect();
      }
    }
    child.process.kill("SIGKILL");
    throw new Error(`embedded redis-server did not start: ${lastLine(child.output) || "no output"}`);
  }

  private args(): string[] {
    return [
      ...["--port", "0", "--unixsocket", this.socket, "--unixsocketperm", "700", "--dir", this.dir],
      ...["--appendonly", "yes", "--appendfsync", this.opts.fsync ?? "everysec", "--save", ""],
      ...["--maxmemory-policy", "noeviction", "--daemonize", "no"],
    ];
  }

  /** The child died while the bridge runs: start it again after a back-off, or give up. */
  private died(code: number | null, signal: NodeJS.Signals | null, lastOutput: string): void {
    const limits = this.opts.restarts ?? RESTART_LIMITS;
    const now = Date.now();
    this.deaths = [...this.deaths.filter((t) => now - t < limits.windowMs), now];
    const why = { code, signal, lastOutput: lastOutput || "no output" };
    if (this.deaths.length > limits.max) {
      const message =
        `the embedded redis-server died ${this.deaths.length} times within ${limits.windowMs / 1000} s ` +
        `(last: ${signal ? `signal ${signal}` : `exit code ${code}`}, "${why.lastOutput}"); not restarting it`;
      this.log.error(why, message);
      this.opts.onGiveUp?.(new Error(message));
      return;
    }
    const delayMs = Math.round(backoffDelayMs(limits, this.deaths.length));
    this.log.error(
      { ...why, restartInMs: delayMs, restart: this.deaths.length, maxRestarts: limits.max },
      "embedded redis-server died; restarting it on the same files",
    );
    this.restartTimer = setTimeout(() => void this.restart(), delayMs);
  }

  private async restart(): Promise<void> {
    if (this.stopping) return;
    try {
      await this.spawn();
      this.log.info({ dir: this.dir }, "embedded redis-server restarted");
    } catch {
      // Died (or hung, and was killed) before answering: counted like any other death, with the
      // reason it printed; the next attempt, or giving up, follows from there.
      const child = this.child?.process;
      if (!this.stopping)
        this.died(child?.exitCode ?? null, child?.signalCode ?? null, lastLine(this.child?.output ?? ""));
    }
  }

  async stop(): Promise<void> {
    this.stopping = true;
    clearTimeout(this.restartTimer);
    process.off("exit", this.onProcessExit);
    const child = this.child;
    if (!child || child.exited) return;
    const exited = new Promise((r) => child.process.once("exit", r));
    child.process.kill("SIGCONT"); // a paused server would not act on SIGTERM
    child.process.kill("SIGTERM"); // it writes the AOF out and exits
    await exited;
  }
}

/**
 * The last line of redis-server's log, where it says why it stopped, without its "pid:role date
 * time level" prefix and cut short.
 */
function lastLine(output: string): string {
  const line = output.trim().split("\n").at(-1) ?? "";
  return line.replace(/^\d+:[A-Z] \d+ \w+ \d+ [\d:.]+ [.\-*#] /, "").slice(0, 200);
}
