/** The embedded redis-server's start-up failures say what to do (a real redis-server). */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";
import { embeddedRedisSocket, startEmbeddedRedis } from "../../src/queue/embedded-redis.js";
import { moduleLogger } from "../../src/log.js";

const log = moduleLogger("test").child({}, { level: "fatal" }); // the failures are expected

test("a dataDir too deep for a unix socket path is refused before anything is created", async () => {
  const deep = join(tmpdir(), "x".repeat(120));
  await assert.rejects(startEmbeddedRedis(deep, log), /dataDir is too deep .* set queue\.redisUrl/);
  assert.equal(existsSync(deep), false);
});

test("a corrupt AOF file: the error carries redis-server's own reason", async (t) => {
  const dataDir = mkdtempSync(join(tmpdir(), "tribridge-aof-"));
  t.after(() => rmSync(dataDir, { recursive: true, force: true }));
  mkdirSync(join(dataDir, "redis"));
  writeFileSync(join(dataDir, "redis", "appendonly.aof"), "not an AOF file\n");
  await assert.rejects(
    startEmbeddedRedis(dataDir, log),
    /did not start: .*Bad file format reading the append only file/,
  );
});

test("queue.fsync is what the embedded redis-server runs with", async (t) => {
  const dataDir = mkdtempSync(join(tmpdir(), "tribridge-fsync-"));
  t.after(() => rmSync(dataDir, { recursive: true, force: true }));
  const server = await startEmbeddedRedis(dataDir, log, { fsync: "always" });
  t.after(() => server.stop());
  const redis = new Redis({ path: embeddedRedisSocket(dataDir) });
  t.after(() => redis.disconnect());
  assert.deepEqual(await redis.config("GET", "appendfsync"), ["appendfsync", "always"]);
});
