/** backoffDelayMs: capped exponential steps, jittered within their upper half, Retry-After honoured. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { backoffDelayMs, type BackoffPolicy } from "../../src/backoff.js";
import { RetryableError, retryAfterMsOf } from "../../src/errors.js";

const policy: BackoffPolicy = { initialDelayMs: 500, maxDelayMs: 60_000 };

test("backoffDelayMs: exponential with jitter in [half, full] of the step", () => {
  for (let n = 0; n < 50; n++) {
    for (const [attempt, full] of [
      [1, 500],
      [2, 1000],
      [3, 2000],
      [5, 8000],
    ] as const) {
      const d = backoffDelayMs(policy, attempt);
      assert.ok(d >= full / 2 && d <= full, `attempt ${attempt}: ${d}`);
    }
  }
});

test("backoffDelayMs: jittered, not the same every time", () => {
  const delays = new Set(Array.from({ length: 20 }, () => backoffDelayMs(policy, 4)));
  assert.ok(delays.size > 1);
});

test("backoffDelayMs: bounded by maxDelayMs, also for huge attempt counts", () => {
  for (const attempt of [8, 12, 50, 1000, 5000]) {
    for (let n = 0; n < 20; n++) {
      const d = backoffDelayMs(policy, attempt);
      assert.ok(Number.isFinite(d), `attempt ${attempt}: ${d}`);
      assert.ok(d <= policy.maxDelayMs && d >= policy.maxDelayMs / 2, `attempt ${attempt}: ${d}`);
    }
  }
});

test("backoffDelayMs: an attempt below 1 counts as the first", () => {
  for (const attempt of [0, -3]) {
    const d = backoffDelayMs(policy, attempt);
    assert.ok(d >= 250 && d <= 500, `attempt ${attempt}: ${d}`);
  }
});

test("backoffDelayMs: honours retryAfterMs when longer than the back-off", () => {
  assert.equal(backoffDelayMs(policy, 1, 30_000), 30_000);
  assert.equal(backoffDelayMs(policy, 1, 120_000), 120_000, "even beyond maxDelayMs");
});

test("backoffDelayMs: retryAfterMs shorter than the back-off does not shorten it", () => {
  for (let n = 0; n < 20; n++) assert.ok(backoffDelayMs(policy, 5, 10) >= 4000);
});

test("backoffDelayMs: retryAfterMs is capped at 10 × maxDelayMs", () => {
  assert.equal(backoffDelayMs(policy, 1, 86_400_000), policy.maxDelayMs * 10);
});

test("retryAfterMsOf: what a RetryableError asked for, nothing from other errors", () => {
  assert.equal(retryAfterMsOf(new RetryableError("429", 1500)), 1500);
  assert.equal(retryAfterMsOf(new RetryableError("503")), undefined);
  assert.equal(retryAfterMsOf(new Error("x")), undefined);
  assert.equal(retryAfterMsOf("x"), undefined);
});
