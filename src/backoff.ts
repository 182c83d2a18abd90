/**
 * The one back-off of tribridge: every retry loop (a relay retried in place, the failed list
 * written again, waiting for the homeserver, a connector reconnecting) waits `backoffDelayMs`.
 */

export interface BackoffPolicy {
  /** The first step, ms; each further attempt doubles it. */
  initialDelayMs: number;
  /** No step is longer than this, ms. */
  maxDelayMs: number;
}

/**
 * How long to wait after the `attempt`-th failure in a row (1 for the first):
 * - the step `initialDelayMs × 2^(attempt − 1)`, capped at `maxDelayMs`;
 * - jittered to a random point in the step's upper half, so that instances (or rooms) that failed
 *   together do not all retry together, and no wait is shorter than half its step;
 * - never shorter than `retryAfterMs`, what the far side asked for (HTTP Retry-After,
 *   `retry_after_ms`, `RetryableError.retryAfterMs`), which is itself capped at 10 × `maxDelayMs`:
 *   a far side asking for a day does not park a relay for a day.
 */
export function backoffDelayMs(policy: BackoffPolicy, attempt: number, retryAfterMs?: number): number {
  const step = Math.min(policy.maxDelayMs, policy.initialDelayMs * 2 ** (Math.max(1, attempt) - 1));
  const jittered = step / 2 + Math.random() * (step / 2);
  return Math.max(jittered, Math.min(retryAfterMs ?? 0, policy.maxDelayMs * 10));
}
