/** The start-up check of an external Redis: told, never reconfigured (a redis-server of the test's own). */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { Redis } from "ioredis";
import { checkRedisSettings } from "../../src/queue/redis-check.js";
import { startRedisServer, type TestRedisServer } from "../helpers/redis-server.js";

let server: TestRedisServer;
let redis: Redis;

before(async () => {
  server = await startRedisServer(["--appendonly", "yes", "--appendfsync", "always"]);
  redis = new Redis(server.url);
});

after(async () => {
  redis?.disconnect();
  await server?.stop();
});

test("appendfsync other than queue.fsync is named, with what to set", async () => {
  const { findings, checked } = await checkRedisSettings(redis, "everysec");
  assert.equal(checked, true);
  assert.deepEqual(findings, [
    {
      level: "warn",
      problem: "appendfsync is 'always' but queue.fsync is 'everysec'",
      fix: "set appendfsync everysec on that Redis, or queue.fsync to what it runs with",
    },
  ]);
  assert.equal(((await redis.config("GET", "appendfsync")) as string[])[1], "always", "left as it was");
});

test("appendfsync as queue.fsync says: nothing to report, and the settings read", async () => {
  assert.deepEqual(await checkRedisSettings(redis, "always"), {
    findings: [],
    checked: true,
    settings: { appendonly: "yes", maxmemoryPolicy: "noeviction", appendfsync: "always" },
  });
});
