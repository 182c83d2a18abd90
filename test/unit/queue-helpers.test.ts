import { test } from "node:test";
import assert from "node:assert/strict";
import { jobIdFor, retryDelayMs, shardOf, type RetryPolicy } from "../../src/queue/ordered-queue.js";

const policy: RetryPolicy = { maxAttempts: 12, initialDelayMs: 500, maxDelayMs: 60_000 };

// --- jobIdFor -------------------------------------------------------------------------------------

test("jobIdFor: BullMQ-safe (no ':', starts with a letter, not an integer)", () => {
  for (const parts of [["in", "mqtt.home", "client:dev1/abc/7", "route.0"], ["1"], ["a:b:c"], []]) {
    const id = jobIdFor(...parts);
    assert.equal(id.includes(":"), false, id);
    assert.match(id, /^[A-Za-z]/);
    assert.ok(!/^\d+$/.test(id));
    assert.match(id, /^[a-z0-9]+$/);
  }
});

test("jobIdFor: deterministic", () => {
  assert.equal(jobIdFor("in", "x", "y"), jobIdFor("in", "x", "y"));
});

test("jobIdFor: differs for different parts, including how they are split", () => {
  const ids = [
    jobIdFor("in", "a", "b"),
    jobIdFor("in", "a", "c"),
    jobIdFor("out", "a", "b"),
    jobIdFor("in", "ab"),
    jobIdFor("in", "a", "b", ""),
    jobIdFor("ina", "b"),
    jobIdFor("in", "b", "a"),
  ];
  assert.equal(new Set(ids).size, ids.length);
});

// --- shardOf --------------------------------------------------------------------------------------

test("shardOf: in range and deterministic", () => {
  for (const shards of [1, 2, 16, 256]) {
    for (let i = 0; i < 200; i++) {
      const key = `!room${i}:example.org`;
      const s = shardOf(key, shards);
      assert.ok(Number.isInteger(s) && s >= 0 && s < shards, `${key} → ${s} of ${shards}`);
      assert.equal(shardOf(key, shards), s);
    }
  }
});

test("shardOf: spreads keys over the shards", () => {
  const used = new Set<number>();
  for (let i = 0; i < 500; i++) used.add(shardOf(`!room${i}:example.org`, 16));
  assert.equal(used.size, 16);
});

// --- retryDelayMs ---------------------------------------------------------------------------------

test("retryDelayMs: exponential with jitter in [half, full] of the step", () => {
  for (let n = 0; n < 50; n++) {
    for (const [attempt, full] of [
      [1, 500],
      [2, 1000],
      [3, 2000],
      [5, 8000],
    ] as const) {
      const d = retryDelayMs(policy, attempt);
      assert.ok(d >= full / 2 && d <= full, `attempt ${attempt}: ${d}`);
    }
  }
});

test("retryDelayMs: bounded by maxDelayMs", () => {
  for (const attempt of [8, 12, 50, 1000, 5000]) {
    for (let n = 0; n < 20; n++) {
      const d = retryDelayMs(policy, attempt);
      assert.ok(Number.isFinite(d), `attempt ${attempt}: ${d}`);
      assert.ok(d <= policy.maxDelayMs && d >= policy.maxDelayMs / 2, `attempt ${attempt}: ${d}`);
    }
  }
});

test("retryDelayMs: honours retryAfterMs when longer than the back-off", () => {
  assert.equal(retryDelayMs(policy, 1, 30_000), 30_000);
  assert.equal(retryDelayMs(policy, 1, 120_000), 120_000, "even beyond maxDelayMs");
});

test("retryDelayMs: retryAfterMs shorter than the back-off does not shorten it", () => {
  for (let n = 0; n < 20; n++) assert.ok(retryDelayMs(policy, 5, 10) >= 4000);
});

test("retryDelayMs: retryAfterMs is capped at 10 × maxDelayMs", () => {
  assert.equal(retryDelayMs(policy, 1, 86_400_000), policy.maxDelayMs * 10);
});
