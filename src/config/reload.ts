/**
 * Reading the config file again while the bridge runs (`SIGHUP`, `!tribridge reload`). What can
 * change in place does: the routes (queued messages for endpoints still configured go on to them,
 * in order: their ids do not depend on the rest of the file) and `appservice.admins`. What the
 * running parts were built from (Redis, ports, the homeserver, accounts, queue settings…) stays as
 * it runs and is named as "needs a restart". A file that does not load changes nothing.
 */
import { statSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import { ConfigError, errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import { canonicalJson } from "./endpoint-ids.js";
import { ConfigErrors, type Config } from "./load.js";

/** What a reload did, for the log and as the answer to `!tribridge reload`. */
export interface ReloadOutcome {
  /** False when the file did not load: nothing changed. */
  readonly applied: boolean;
  /** Config keys that changed but apply only after a restart. */
  readonly needsRestart: readonly string[];
  readonly text: string;
}

export interface ConfigReloadOptions {
  /** The config the bridge started with. */
  running: Config;
  /** Reads and validates the file again (see fileAtRest); throws ConfigErrors. */
  load(): Config | Promise<Config>;
  /** Makes the routes of the file `next`'s (returns problems that did not stop the rest). */
  applyRoutes(next: Config): Promise<string[]>;
  /** Makes these the users who may give commands. */
  applyAdmins(admins: readonly string[]): void;
  log: Logger;
}

/** Keys whose change takes effect without a restart. */
const HOT = new Set(["routes", "permissions", "appservice.admins"]);

export class ConfigReload {
  private running: Config;
  private last: Promise<unknown> = Promise.resolve();

  constructor(private readonly o: ConfigReloadOptions) {
    this.running = o.running;
  }

  /** Reloads the file; one reload at a time (a second waits for the first). */
  reload(): Promise<ReloadOutcome> {
    const next = this.last.then(() => this.reloadNow());
    this.last = next.catch(() => undefined);
    return next;
  }

  private async reloadNow(): Promise<ReloadOutcome> {
    const { log } = this.o;
    let next: Config;
    try {
      next = await this.o.load();
    } catch (err) {
      const problems = err instanceof ConfigErrors ? err.errors.map((e) => e.message) : [errorMessage(err)];
      log.warn({ problems }, "config not reloaded: the running config stays");
      return {
        applied: false,
        needsRestart: [],
        text: `Config not reloaded, the running config stays:\n${problems.join("\n")}`,
      };
    }
    const changed = changedKeys(this.running, next);
    const needsRestart = changed.filter((key) => !HOT.has(key));
    const lines: string[] = [];
    // The top-level permissions are also those of the routes linked from rooms.
    const routesChanged = changed.includes("routes") || changed.includes("permissions");
    const problems = routesChanged ? await this.o.applyRoutes(next) : [];
    if (changed.includes("routes")) lines.push(routeChanges(this.running.routes, next.routes));
    if (changed.includes("permissions")) lines.push("permissions (of routes without their own)");
    if (changed.includes("appservice.admins")) {
      this.o.applyAdmins(next.appservice.admins);
      lines.push(`appservice.admins: ${next.appservice.admins.join(", ") || "nobody"}`);
    }
    // What was applied is what runs now; the rest stays as it runs until a restart.
    this.running = {
      ...this.running,
      routes: next.routes,
      permissions: next.permissions,
      appservice: { ...this.running.appservice, admins: next.appservice.admins },
    };
    if (lines.length === 0 && needsRestart.length === 0) lines.push("no changes");
    if (needsRestart.length > 0) lines.push(`needs a restart: ${needsRestart.join(", ")}`);
    lines.push(...problems);
    log.info({ changed, problems }, "config reloaded");
    if (needsRestart.length > 0)
      log.warn({ needsRestart }, "changed in the config file, applied only after a restart");
    return { applied: true, needsRestart, text: `Config reloaded: ${lines.join("; ")}` };
  }
}

/** How long the file must stay unchanged before a reload reads it, and how long that may take. */
export const FILE_QUIET_MS = 250;
export const FILE_SETTLE_TIMEOUT_MS = 5000;

/**
 * Resolves once `file` has not changed (size, modification time) for `quietMs`: a reload signalled
 * while an editor or a deploy is still writing it would read the file cut short, which often is
 * still valid YAML and a valid config (the routes after the cut gone). Throws ConfigErrors if it
 * keeps changing for `timeoutMs`. A file that does not exist is left to the loader to report.
 */
export async function fileAtRest(
  file: string,
  quietMs = FILE_QUIET_MS,
  timeoutMs = FILE_SETTLE_TIMEOUT_MS,
): Promise<void> {
  const look = () => {
    try {
      const { size, mtimeMs, ino } = statSync(file);
      return `${ino}:${size}:${mtimeMs}`;
    } catch {
      return "absent";
    }
  };
  const deadline = performance.now() + timeoutMs;
  let seen = look();
  for (;;) {
    await sleep(quietMs);
    const now = look();
    if (now === seen) return;
    seen = now;
    if (performance.now() > deadline)
      throw new ConfigErrors([
        new ConfigError("", `${file} kept changing for ${timeoutMs} ms (still being written?); not read`),
      ]);
  }
}

/**
 * The keys that differ, as config paths: `routes` as a whole, a section's own keys
 * (`queue.shards`), `bridges.<connector>.<account>` for an account added, removed or changed.
 */
export function changedKeys(a: Config, b: Config): string[] {
  const keys: string[] = [];
  const same = (x: unknown, y: unknown) => canonicalJson(x) === canonicalJson(y);
  for (const section of ["homeserver", "appservice", "queue", "metrics", "encryption"] as const) {
    const x = a[section] as Record<string, unknown>;
    const y = b[section] as Record<string, unknown>;
    for (const key of new Set([...Object.keys(x), ...Object.keys(y)]))
      if (!same(x[key], y[key])) keys.push(`${section}.${key}`);
  }
  if (a.dataDir !== b.dataDir) keys.push("dataDir");
  const accounts = (c: Config) =>
    new Map(c.accounts.map((x) => [`bridges.${x.connector}.${x.account}`, x.config]));
  const [x, y] = [accounts(a), accounts(b)];
  for (const ref of new Set([...x.keys(), ...y.keys()])) if (!same(x.get(ref), y.get(ref))) keys.push(ref);
  if (!same(a.permissions, b.permissions)) keys.push("permissions");
  if (!same(a.routes, b.routes)) keys.push("routes");
  return keys;
}

/** "routes: 1 added (lab2), 1 removed (old), 1 changed (lab)". */
function routeChanges(before: Config["routes"], after: Config["routes"]): string {
  const was = new Map(before.map((r) => [r.id, canonicalJson(r)]));
  const is = new Map(after.map((r) => [r.id, canonicalJson(r)]));
  const added = [...is.keys()].filter((id) => !was.has(id));
  const removed = [...was.keys()].filter((id) => !is.has(id));
  const changed = [...is.keys()].filter((id) => was.has(id) && was.get(id) !== is.get(id));
  const part = (n: string[], what: string) => (n.length > 0 ? [`${n.length} ${what} (${n.join(", ")})`] : []);
  return `routes: ${[...part(added, "added"), ...part(removed, "removed"), ...part(changed, "changed")].join(", ")}`;
}
