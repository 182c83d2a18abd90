/**
 * A lease in Redis: at most one holder at a time among the processes that share the Redis (a
 * queue shard's consumer, a connector's one reader of a mailbox).
 *
 * The key holds the holder's id and expires (SET NX PX); the holder renews it every `renewMs`, if
 * it still holds its id. The holder counts the lease as lost when a renewal finds the key gone or
 * someone else's, or when no renewal has been answered for `leaseMs` (Redis away, this process
 * stalled): by then another instance may hold it. What the lease guards is then stopped (its signal
 * aborts), and the lease competed for again. An instance that does not hold the lease tries to take
 * it every `renewMs`, forever, until `stop()`: an attempt that fails (a Redis error) or hangs (no
 * answer within `leaseMs`) is logged and tried again, never dropped.
 *
 * Another instance takes over `leaseMs` after the holder's last renewal when the holder dies, and
 * at once when it stops (`stop()` deletes the key). A process restarted with the same holder id
 * finds its own id in the key and takes the lease back at once (`restarted`).
 *
 * Nothing here waits without limit on what it guards either: `acquired` is no longer awaited once
 * its signal aborted, and a wind-down (`acquired` settling, then `released`) that takes longer than
 * `leaseMs` is logged and left behind, so that the lease is competed for again whatever Redis or
 * the guarded work does (a BullMQ worker whose close never ends once Redis restarted, say).
 */
import type { Redis } from "ioredis";
import { errorMessage } from "../errors.js";
import type { Logger } from "../log.js";

export interface LeaseTimings {
  /** How long the lease outlives its last renewal: how long a dead holder keeps others waiting. */
  leaseMs?: number;
  /** How often the holder renews it, and how often an instance without it tries to take it. */
  renewMs?: number;
}

export const LEASE_DEFAULTS = {
  leaseMs: 10_000, // 10 s: a dead holder's work resumes elsewhere within 10 s (+ renewMs) of its last renewal
  renewMs: 3_000, // 3 s: two renewals may go unanswered before the lease runs out
} as const satisfies Required<LeaseTimings>;

/** What `acquired` is given each time the lease is taken. */
export interface LeaseHolding {
  /** Aborted when this holding ends (the lease lost, or stopping): stop what it guards, at once. */
  readonly signal: AbortSignal;
  /**
   * The key already held our id, written by an earlier process with the same holder id (this
   * instance restarted): what that process left behind (e.g. job locks) is ours to clear at once.
   */
  readonly restarted: boolean;
}

export interface LeaseOptions extends LeaseTimings {
  redis: Redis;
  key: string;
  /** Our id in the key (an instance id): stable across restarts, different between instances. */
  holder: string;
  log: Logger;
  /**
   * Called each time the lease is taken: start what it guards, and resolve once that runs (or at
   * once when `signal` has aborted meanwhile). Rejecting gives the lease up; it is competed for
   * again after `renewMs`.
   */
  acquired(holding: LeaseHolding): Promise<void>;
  /**
   * Called when a holding ends (the lease lost, `acquired` rejected, or `stop()`), after its signal
   * aborted and its `acquired` settled: wind down what it guards. Awaited before the lease is
   * competed for again, and before `stop()` gives the key up.
   */
  released(): Promise<void>;
}

const RENEW = `if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("PEXPIRE", KEYS[1], ARGV[2]) else return 0 end`;
const RELEASE = `if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end`;

interface Holding {
  readonly generation: number;
  readonly controller: AbortController;
  /** `acquired`'s outcome, never rejecting. */
  settled: Promise<void>;
  /** performance.now() by which the lease has certainly expired in Redis unless renewed since. */
  validUntil: number;
}

export class Lease {
  readonly leaseMs: number;
  readonly renewMs: number;
  private stopped = false;
  /** Whether this process ever wrote the key: a key with our id is then not an earlier process's. */
  private wrote = false;
  /** Bumped when a holding begins or ends: an answer about an older one is ignored. */
  private generation = 0;
  private current: Holding | undefined;
  /** The acquisition attempt in progress (with its `acquired`): one at a time. */
  private attempting: Promise<void> | undefined;
  /** The wind-down of the holding that just ended. */
  private ending: Promise<void> | undefined;
  private retryTimer: NodeJS.Timeout | undefined;
  private renewTimer: NodeJS.Timeout | undefined;
  private expiryTimer: NodeJS.Timeout | undefined;
  /** Whether the last attempt failed (logged once, not per attempt). */
  private attemptsFailing = false;
  /** Whether a renewal failed in the current holding (logged once per holding). */
  private renewalsFailing = false;
  /** performance.now() when an attempt last found the key held by another instance. */
  private otherSeenAt = -Infinity;

  constructor(private readonly opts: LeaseOptions) {
    this.leaseMs = opts.leaseMs ?? LEASE_DEFAULTS.leaseMs;
    this.renewMs = opts.renewMs ?? LEASE_DEFAULTS.renewMs;
    if (!(this.renewMs > 0 && this.renewMs < this.leaseMs))
      throw new Error(
        `lease ${opts.key}: renewMs (${this.renewMs}) must be above 0 and below leaseMs (${this.leaseMs})`,
      );
  }

  /** Whether this instance holds the lease now (as far as it can tell). */
  get held(): boolean {
    return this.current !== undefined;
  }

  /**
   * Whether another instance holds the lease, as far as this one can tell: an attempt found the
   * key under another id within the last lease time (attempts come every `renewMs`).
   */
  get heldElsewhere(): boolean {
    return !this.held && performance.now() - this.otherSeenAt <= this.leaseMs;
  }

  /**
   * Gives the holding up (what it guards cannot go on: a worker that stopped consuming), deletes
   * the key, and competes for the lease again after `renewMs`. Nothing when not holding.
   */
  abandon(reason: string): Promise<void> {
    const holding = this.current;
    if (!holding || this.stopped) return Promise.resolve();
    this.opts.log.warn({ lease: this.opts.key, holder: this.opts.holder, reason }, "giving the lease up");
    return this.end(holding.generation, { reason, giveUp: true }).then(() => this.retryLater());
  }

  /**
   * Starts competing for the lease. Resolves after the first attempt: the lease taken and
   * `acquired` resolved, or found held by another instance, or failed (logged; tried again).
   */
  start(): Promise<void> {
    return this.attempt();
  }

  /**
   * Stops competing; if held, aborts the holding, waits for `released` and deletes the key (if it
   * still holds our id), so that another instance takes over at once.
   */
  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    if (this.current) await this.end(this.current.generation, { reason: "stopping" });
    await this.attempting;
    await this.ending;
    if (this.wrote) await this.giveUp();
  }

  /**
   * Deletes the key if it still holds our id, so another instance takes over at once. Best effort:
   * unanswered (Redis away), the key lapses within leaseMs anyway.
   */
  private async giveUp(): Promise<void> {
    try {
      await this.withinLease(this.opts.redis.eval(RELEASE, 1, this.opts.key, this.opts.holder));
    } catch (err) {
      this.opts.log.warn(
        { lease: this.opts.key, holder: this.opts.holder, err: errorMessage(err) },
        `could not give the lease up; it lapses within ${this.leaseMs} ms`,
      );
    }
  }

  private attempt(): Promise<void> {
    this.attempting ??= this.acquire()
      .catch((err: unknown) => {
        this.opts.log.error(
          { lease: this.opts.key, holder: this.opts.holder, err: errorMessage(err) },
          "lease attempt failed",
        );
        this.retryLater();
      })
      .finally(() => (this.attempting = undefined));
    return this.attempting;
  }

  private retryLater(): void {
    clearTimeout(this.retryTimer);
    if (!this.stopped) this.retryTimer = setTimeout(() => void this.attempt(), this.renewMs);
  }

  private async acquire(): Promise<void> {
    if (this.stopped || this.current || this.ending) return;
    let taken: { restarted: boolean; sentAt: number } | undefined;
    try {
      taken = await this.withinLease(this.take());
      this.attemptsFailing = false;
    } catch (err) {
      // Once per outage at warn; each attempt after that at debug (Redis away: every renewMs).
      this.opts.log[this.attemptsFailing ? "debug" : "warn"](
        { lease: this.opts.key, holder: this.opts.holder, err: errorMessage(err) },
        "could not compete for the lease; trying again until Redis answers",
      );
      this.attemptsFailing = true;
    }
    if (!taken || this.stopped) return this.retryLater(); // stop() gives the key up, if we took it
    const generation = ++this.generation;
    const controller = new AbortController();
    const holding: Holding = {
      generation,
      controller,
      settled: Promise.resolve(),
      validUntil: taken.sentAt + this.leaseMs,
    };
    this.current = holding;
    this.renewTimer = setInterval(() => this.renew(holding), this.renewMs);
    this.armExpiry(holding);
    this.opts.log.debug(
      { lease: this.opts.key, holder: this.opts.holder, restarted: taken.restarted },
      "lease taken",
    );
    const holdingOf = { signal: controller.signal, restarted: taken.restarted };
    const started = Promise.resolve().then(() => this.opts.acquired(holdingOf)); // a throw is a rejection
    holding.settled = started.then(
      () => undefined,
      () => undefined,
    );
    try {
      // Not past the holding's end: `acquired` should settle at once then, but if it hangs the
      // lease must still be competed for again.
      await Promise.race([started, aborted(controller.signal)]);
    } catch (err) {
      if (!controller.signal.aborted)
        this.opts.log.warn(
          { lease: this.opts.key, holder: this.opts.holder, err: errorMessage(err) },
          "could not start what the lease guards; giving the lease up, and trying again",
        );
      await this.end(generation, { reason: "could not start", giveUp: true });
      this.retryLater();
    }
  }

  /**
   * Takes the key if it is free or already ours; undefined when another holds it. `sentAt`: when
   * the write that (re)started its expiry was sent.
   */
  private async take(): Promise<{ restarted: boolean; sentAt: number } | undefined> {
    const { redis, key, holder } = this.opts;
    const found = await redis.get(key);
    if (found !== null && found !== holder) {
      this.otherSeenAt = performance.now();
      return undefined;
    }
    const restarted = found === holder && !this.wrote;
    this.wrote = true;
    const sentAt = performance.now();
    const mine =
      found === holder
        ? (await redis.eval(RENEW, 1, key, holder, this.leaseMs)) !== 0
        : (await redis.set(key, holder, "PX", this.leaseMs, "NX")) === "OK";
    return mine ? { restarted, sentAt } : undefined;
  }

  /** An attempt (or a wind-down) still unfinished after a lease's time is given up (and tried again). */
  private withinLease<T>(work: Promise<T>, what = "no answer from Redis", ms = this.leaseMs): Promise<T> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} within ${ms} ms`)), ms);
    });
    return Promise.race([work, timeout]).finally(() => clearTimeout(timer));
  }

  private renew(holding: Holding): void {
    const { redis, key, holder } = this.opts;
    const sentAt = performance.now();
    redis.eval(RENEW, 1, key, holder, this.leaseMs).then(
      (ok) => {
        if (holding.generation !== this.generation) return;
        this.renewalsFailing = false;
        if (ok === 0) return this.lose(holding, "the key expired or names another holder");
        holding.validUntil = Math.max(holding.validUntil, sentAt + this.leaseMs);
        this.armExpiry(holding);
      },
      (err: unknown) => {
        if (holding.generation !== this.generation) return;
        this.opts.log[this.renewalsFailing ? "debug" : "warn"](
          { lease: key, holder, err: errorMessage(err) },
          "lease renewal failed",
        );
        this.renewalsFailing = true;
      },
    );
  }

  /** Counts the lease lost once it may have expired in Redis with no renewal answered. */
  private armExpiry(holding: Holding): void {
    clearTimeout(this.expiryTimer);
    this.expiryTimer = setTimeout(
      () => this.lose(holding, `no renewal answered within ${this.leaseMs} ms`),
      Math.max(0, holding.validUntil - performance.now()),
    );
  }

  private lose(holding: Holding, reason: string): void {
    if (holding.generation !== this.generation || this.stopped) return;
    this.opts.log.warn(
      { lease: this.opts.key, holder: this.opts.holder, reason },
      "lease lost; what it guards stops until it is regained",
    );
    void this.end(holding.generation, { reason: `lease lost: ${reason}` })
      .then(() => this.attempting)
      .then(() => this.attempt());
  }

  /** Ends holding `generation` (once): aborts it, waits for `acquired`, calls `released`. */
  private end(generation: number, opts: { reason: string; giveUp?: boolean }): Promise<void> {
    const holding = this.current;
    if (!holding || holding.generation !== generation) return this.ending ?? Promise.resolve();
    this.generation++;
    this.current = undefined;
    clearInterval(this.renewTimer);
    clearTimeout(this.expiryTimer);
    holding.controller.abort(new Error(opts.reason));
    this.ending = (async () => {
      const windDown = holding.settled.then(() => this.opts.released());
      try {
        // Twice a lease's time: what it guards bounds its own wind-down by one (see Shard.stopWorker).
        await this.withinLease(windDown, "what the lease guards did not stop", 2 * this.leaseMs);
      } catch (err) {
        this.opts.log.warn(
          { lease: this.opts.key, holder: this.opts.holder, err: errorMessage(err) },
          "winding down after the lease failed; competing for it again",
        );
      }
      if (opts.giveUp) await this.giveUp();
    })().finally(() => (this.ending = undefined));
    return this.ending;
  }
}

/** Rejects once `signal` aborts (with its reason); never resolves. */
function aborted(signal: AbortSignal): Promise<never> {
  return new Promise((_, reject) => {
    if (signal.aborted) return reject(signal.reason as Error);
    signal.addEventListener("abort", () => reject(signal.reason as Error), { once: true });
  });
}
