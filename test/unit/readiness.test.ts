/** GET /ready's checks: each named, "ok" or what is wrong; a check that hangs counts as failed, in bounded time. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { formatStatus } from "../../src/matrix/commands.js";
import { readiness } from "../../src/readiness.js";

test("ready only when every check is; each failing one says what is wrong, a hanging one too", async () => {
  const started = performance.now();
  const result = await readiness(
    [
      { name: "redis", check: () => new Promise<never>(() => undefined) },
      { name: "shards", check: async () => "without a consumer for longer than a lease: q-0" },
      { name: "thrower", check: () => Promise.reject(new Error("boom")) },
      { name: "fine", check: async () => undefined },
    ],
    200,
  );
  assert.ok(performance.now() - started < 1_000);
  assert.deepEqual(result, {
    ready: false,
    checks: {
      redis: "no answer within 200 ms",
      shards: "without a consumer for longer than a lease: q-0",
      thrower: "boom",
      fine: "ok",
    },
  });
  assert.deepEqual(await readiness([{ name: "fine", check: async () => undefined }]), {
    ready: true,
    checks: { fine: "ok" },
  });
});

test("status names the shards without a consumer", () => {
  const text = formatStatus(
    1,
    {},
    { "to-matrix": { waiting: 3, active: 0, failedList: 0, holding: false, unconsumedShards: 2 } },
  );
  assert.match(
    text,
    /to-matrix: 3 batch\(es\) waiting, 0 being delivered, 0 failed; 2 shard\(s\) without a consumer/,
  );
});
