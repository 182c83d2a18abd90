/**
 * A redis-server of a test's own, on a free port in a temporary directory, for tests that pause
 * (SIGSTOP) or kill it. Resolves once it answers; `stop()` resumes it if paused, stops it and
 * removes its directory.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";
import { freePort, waitFor } from "./fixture.js";

export interface TestRedisServer {
  url: string;
  process: ChildProcess;
  stop(): Promise<void>;
}

export async function startRedisServer(args: readonly string[] = []): Promise<TestRedisServer> {
  const dir = mkdtempSync(join(tmpdir(), "tribridge-redis-"));
  const port = await freePort();
  const server = spawn(
    "redis-server",
    ["--port", String(port), "--bind", "127.0.0.1", "--dir", dir, "--save", "", ...args],
    { stdio: "ignore" },
  );
  const url = `redis://127.0.0.1:${port}`;
  const stop = async () => {
    if (server.exitCode === null && server.signalCode === null) {
      const exited = new Promise((r) => server.once("exit", r));
      server.kill("SIGCONT");
      server.kill("SIGTERM");
      await exited;
    }
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    // A fresh connection per try: one that failed its first connect would not try again.
    await waitFor("redis-server", async () => {
      const probe = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
      probe.on("error", () => undefined);
      try {
        await probe.connect();
        return (await probe.ping()) === "PONG";
      } catch {
        return false;
      } finally {
        probe.disconnect();
      }
    });
  } catch (err) {
    await stop();
    throw err;
  }
  return { url, process: server, stop };
}
