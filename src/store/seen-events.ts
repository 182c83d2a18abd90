/**
 * Matrix events already relayed or answered, by event id: the dedupe that does not trust txnIds
 * (a homeserver restarts its counter, and replays transactions). The check and the record are one
 * step: an event is claimed (SET NX) before its work and marked done after, so two transactions
 * handled at once (two instances, or a homeserver retrying while the first attempt still runs)
 * cannot both relay it. A claim whose work failed is released, so the homeserver's retry does it.
 */
import { randomUUID } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import type { Redis } from "ioredis";
import { RetryableError } from "../errors.js";
import { redisKeys } from "./keys.js";

export interface SeenEventsTimings {
  /** A claim lapses after this long unless renewed (every third of it while its work runs). */
  claimMs: number;
  /** How long a caller waits for another's claim to end before giving up (the transaction is retried). */
  waitMs: number;
  pollMs: number;
}

const DEFAULT_TIMINGS: SeenEventsTimings = {
  claimMs: 30_000, // a crashed instance's claims hold its events back this long at most
  waitMs: 10_000,
  pollMs: 50,
};

/** A claim's value; a done event's is "1" (what tribridge wrote before claims existed). */
const CLAIM_PREFIX = "claim:";
const DONE = "1";

/** Deletes or extends KEYS[1] only while it holds the claim ARGV[1]. */
const RELEASE = `if redis.call("get", KEYS[1]) == ARGV[1] then return redis.call("del", KEYS[1]) end return 0`;
const RENEW = `if redis.call("get", KEYS[1]) == ARGV[1] then return redis.call("pexpire", KEYS[1], ARGV[2]) end return 0`;

export class SeenEvents {
  private readonly timings: SeenEventsTimings;

  constructor(
    private readonly redis: Redis,
    private readonly prefix: string,
    /** How long a done event is remembered: longer than any homeserver retries a transaction. */
    private readonly rememberSec: number,
    timings: Partial<SeenEventsTimings> = {},
  ) {
    this.timings = { ...DEFAULT_TIMINGS, ...timings };
  }

  /**
   * Runs `work` for the event unless it was done before, once across concurrent callers; resolves
   * whether it ran. A claim another caller holds is waited for (its work may yet fail and release
   * it); still held after `waitMs`, this rejects with a RetryableError, so the transaction is
   * answered 500 and the homeserver tries again later. `work` failing releases the claim and
   * rejects with its error.
   */
  async once(eventId: string, work: () => Promise<void>): Promise<boolean> {
    const { claimMs, waitMs, pollMs } = this.timings;
    const key = redisKeys.seenEvent(this.prefix, eventId);
    const claim = `${CLAIM_PREFIX}${randomUUID()}`;
    const deadline = Date.now() + waitMs;
    while ((await this.redis.set(key, claim, "PX", claimMs, "NX")) !== "OK") {
      const value = await this.redis.get(key);
      if (value !== null && !value.startsWith(CLAIM_PREFIX)) return false; // done before
      if (value !== null && Date.now() >= deadline)
        throw new RetryableError(`event ${eventId} is being handled by another transaction; not done yet`);
      if (value !== null) await sleep(pollMs);
    }
    // A renewal that fails (Redis away) is tried again a third of claimMs later; all failing, the
    // claim lapses, which costs at most a duplicate should another transaction take the event then.
    const renew = setInterval(
      () => void this.redis.eval(RENEW, 1, key, claim, claimMs).catch(() => undefined),
      claimMs / 3,
    );
    try {
      await work();
    } catch (err) {
      // Best effort: a claim that cannot be released (Redis away) lapses after claimMs by itself.
      await this.redis.eval(RELEASE, 1, key, claim).catch(() => undefined);
      throw err;
    } finally {
      clearInterval(renew);
    }
    await this.redis.set(key, DONE, "EX", this.rememberSec);
    return true;
  }
}
