/** The embedded redis-server's start-up failures say what to do (a real redis-server). */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startEmbeddedRedis } from "../../src/queue/embedded-redis.js";
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
