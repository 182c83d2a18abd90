/**
 * A redis-server of a test's own, on a free port in a temporary directory, for tests that pause
 * (SIGSTOP), kill or reconfigure it. Resolves once it answers; `stop()` resumes it if paused, stops
 * it and removes its directory. `kill()` ends it at once (SIGKILL, as a crash) and `restart()`
 * starts it again on the same port and files (AOF or RDB, whatever its arguments chose).
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";
import { freePort, waitFor } from "./fixture.js";

export interface TestRedisServer {
  url: string;
  /** Its data directory. */
  dir: string;
  /** The running process (a new one after `restart()`). */
  process: ChildProcess;
  /** SIGKILL, and waits for it to exit. */
  kill(): Promise<void>;
  /** Starts it again, same port and directory; resolves once it answers. */
  restart(): Promise<void>;
  stop(): Promise<void>;
}

/** `dir`: a data directory of the caller's (kept on stop), instead of a temporary one. */
export async function startRedisServer(
  args: readonly string[] = [],
  opts: { dir?: string } = {},
): Promise<TestRedisServer> {
  const dir = opts.dir ?? mkdtempSync(join(tmpdir(), "tribridge-redis-"));
  const port = await freePort();
  const url = `redis://127.0.0.1:${port}`;
  const launch = () =>
    spawn(
      "redis-server",
      ["--port", String(port), "--bind", "127.0.0.1", "--dir", dir, "--save", "", ...args],
      {
        stdio: "ignore",
      },
    );
  const running = (p: ChildProcess) => p.exitCode === null && p.signalCode === null;
  const end = async (p: ChildProcess, signal: NodeJS.Signals) => {
    if (!running(p)) return;
    const exited = new Promise((r) => p.once("exit", r));
    p.kill("SIGCONT");
    p.kill(signal);
    await exited;
  };
  const server: TestRedisServer = {
    url,
    dir,
    process: launch(),
    kill: () => end(server.process, "SIGKILL"),
    async restart() {
      await end(server.process, "SIGKILL");
      server.process = launch();
      await answering(url);
    },
    async stop() {
      await end(server.process, "SIGTERM");
      if (!opts.dir) rmSync(dir, { recursive: true, force: true });
    },
  };
  try {
    await answering(url);
  } catch (err) {
    await server.stop();
    throw err;
  }
  return server;
}

/** Resolves once a Redis at `url` answers PING (loading done). */
async function answering(url: string): Promise<void> {
  await waitFor("redis-server", () => answers(url));
}

/**
 * Whether a Redis at `url` (or on the unix socket `{ path }`) answers PING now, on a fresh
 * connection that fails at once: one that failed its first connect would not try again.
 */
export async function answers(at: string | { path: string }): Promise<boolean> {
  const options = { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null };
  const probe = typeof at === "string" ? new Redis(at, options) : new Redis({ ...options, path: at.path });
  probe.on("error", () => undefined);
  try {
    await probe.connect();
    return (await probe.ping()) === "PONG";
  } catch {
    return false;
  } finally {
    probe.disconnect();
  }
}
