/** Looks at a bridge's embedded redis-server from outside: whether it answers, and its process ids. */
import { spawnSync } from "node:child_process";
import { answers } from "./redis-server.js";

/** Whether a redis-server answers PING on `socket`. */
export function answersOn(socket: string): Promise<boolean> {
  return answers({ path: socket });
}

/** The redis-server processes listening on `socket` (their process title names it). */
export function redisPidsOn(socket: string): number[] {
  const r = spawnSync("pgrep", ["-f", `unixsocket:${socket}`], { encoding: "utf8" });
  return r.stdout.split("\n").filter(Boolean).map(Number);
}
