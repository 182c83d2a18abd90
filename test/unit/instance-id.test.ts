/**
 * Instance ids: random, kept in the data directory (stable across restarts, different between
 * instances whatever their host names), and claimed in Redis while the process runs, so that two
 * live processes with one id (a shared dataDir) are told apart from a crashed run's leftover claim.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { randomUUID } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir, hostname } from "node:os";
import { join } from "node:path";
import { readlinkSync } from "node:fs";
import { Redis } from "ioredis";
import { pino } from "pino";
import { ConfigError } from "../../src/errors.js";
import { INSTANCE_ID_FILE, InstanceClaim, instanceIdIn } from "../../src/instance-id.js";
import { REDIS_URL, deleteKeys } from "../helpers/fixture.js";

const silent = pino({ level: "silent" });

function tempDir(t: { after(fn: () => void): void }): string {
  const dir = mkdtempSync(join(tmpdir(), "tribridge-id-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test("the id is made once per data directory and kept: the same after a restart, another in another directory", (t) => {
  const a = tempDir(t);
  const b = tempDir(t);
  const first = instanceIdIn(a);
  assert.match(first, /^[0-9a-f]{16}$/);
  assert.equal(readFileSync(join(a, INSTANCE_ID_FILE), "utf8").trim(), first);
  assert.equal(instanceIdIn(a), first, "a restart keeps its id");
  assert.notEqual(instanceIdIn(b), first, "same host, another data directory: another id");
  const nested = join(a, "not", "yet");
  assert.match(instanceIdIn(nested), /^[0-9a-f]{16}$/, "the directory is made when missing");
});

function claims(t: { after(fn: () => Promise<void>): void }) {
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  const redis = new Redis(REDIS_URL);
  const made: InstanceClaim[] = [];
  t.after(async () => {
    for (const c of made) await c.release();
    redis.disconnect();
    await deleteKeys(prefix);
  });
  const key = `${prefix}:instance:abc`;
  return {
    redis,
    key,
    claim(ttlMs: number): InstanceClaim {
      const c = new InstanceClaim({ redis, key, id: "abc", log: silent, ttlMs });
      made.push(c);
      return c;
    },
  };
}

test("a second live process with the same id waits, then refuses to start, naming the cause", async (t) => {
  const c = claims(t);
  await c.claim(300).take();
  const started = performance.now();
  await assert.rejects(
    c.claim(300).take(),
    (err: unknown) =>
      err instanceof ConfigError && /another running tribridge has this instance's id abc/.test(err.message),
  );
  assert.ok(performance.now() - started >= 600, "it waited for the claim to lapse first");
});

test("a claim left by a run that ended without releasing it is taken once it lapses", async (t) => {
  const c = claims(t);
  await c.redis.set(c.key, "someone 1 elsewhere|", "PX", 500);
  const started = performance.now();
  await c.claim(300).take();
  assert.ok(performance.now() - started >= 400, "waited for the lapse");
});

test("a claim of a process that is certainly gone (same host and PID namespace, no such PID) is taken at once", async (t) => {
  const c = claims(t);
  const gone = spawnSync(process.execPath, ["-e", "0"]).pid!; // exited already
  const place = `${hostname()}|${readlinkSync("/proc/self/ns/pid")}`;
  await c.redis.set(c.key, `earlier ${gone} ${place}`, "PX", 10_000);
  const started = performance.now();
  await c.claim(10_000).take();
  assert.ok(performance.now() - started < 1_000, "taken without waiting for the 10 s claim");
  assert.match((await c.redis.get(c.key))!, new RegExp(` ${process.pid} `));
});

test("release gives the claim up: a restart takes it at once", async (t) => {
  const c = claims(t);
  const first = c.claim(10_000);
  await first.take();
  await first.release();
  const started = performance.now();
  await c.claim(10_000).take();
  assert.ok(performance.now() - started < 500);
});
