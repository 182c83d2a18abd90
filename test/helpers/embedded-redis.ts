/** Looks at a bridge's embedded redis-server from outside: whether it answers, and its process ids. */
import { spawnSync } from "node:child_process";
import { Redis } from "ioredis";

/** Whether a redis-server answers PING on `socket` (a fresh connection that fails at once). */
export async function answers(socket: string): Promise<boolean> {
  const probe = new Redis({
    path: socket,
    lazyConnect: true,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
  });
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

/** The redis-server processes listening on `socket` (their process title names it). */
export function redisPidsOn(socket: string): number[] {
  const r = spawnSync("pgrep", ["-f", `unixsocket:${socket}`], { encoding: "utf8" });
  return r.stdout.split("\n").filter(Boolean).map(Number);
}
