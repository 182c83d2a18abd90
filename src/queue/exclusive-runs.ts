/**
 * `ConnectorContext.runExclusive` for one connector account: a Lease per name, under
 * `<prefix>:lease:<connector>.<account>:<name>`. While this instance holds it, the connector's `run`
 * runs; when the lease is lost, its signal aborts; when the lease is taken again, it runs again.
 */
import { setTimeout as sleep } from "node:timers/promises";
import type { Redis } from "ioredis";
import { backoffDelayMs } from "../backoff.js";
import type { ExclusiveRun } from "../connector.js";
import { errorMessage, retryAfterMsOf } from "../errors.js";
import type { Logger } from "../log.js";
import { redisKeys } from "../store/keys.js";
import { Lease, type LeaseTimings } from "./lease.js";

/** A `run` that ends by itself while its lease is held is started again after this back-off. */
const RERUN_BACKOFF = { initialDelayMs: 1_000, maxDelayMs: 60_000 };

export interface ExclusiveRunsOptions extends LeaseTimings {
  redis: Redis;
  /** The bridge's key prefix (queue.prefix). */
  prefix: string;
  /** `<connector>.<account>`: names are exclusive within one account. */
  account: string;
  /** This instance (ConnectorContext.instanceId). */
  holder: string;
  log: Logger;
  /** Aborted when the bridge stops: every run stops, and hands its lease over. */
  signal: AbortSignal;
}

interface Entry {
  lease: Lease;
  stopping?: Promise<void>;
}

export class ExclusiveRuns {
  private readonly runs = new Map<string, Entry>();

  constructor(private readonly opts: ExclusiveRunsOptions) {
    opts.signal.addEventListener(
      "abort",
      () => void this.stop().catch((err: unknown) => opts.log.warn({ err: errorMessage(err) }, "stopping")),
      { once: true },
    );
  }

  /** The Redis key of `name`'s lease. */
  keyOf(name: string): string {
    return redisKeys.connectorLease(this.opts.prefix, this.opts.account, name);
  }

  run(name: string, run: (signal: AbortSignal) => Promise<void>): ExclusiveRun {
    if (name === "") throw new Error("runExclusive: the name must not be empty");
    if (this.runs.has(name))
      throw new Error(`runExclusive("${name}") already runs for ${this.opts.account}: stop() it first`);
    const { redis, holder, leaseMs, renewMs } = this.opts;
    const log = this.opts.log.child({ exclusive: name });
    let running: Promise<void> | undefined;
    const lease = new Lease({
      redis,
      key: this.keyOf(name),
      holder,
      leaseMs,
      renewMs,
      log,
      acquired: async ({ signal }) => {
        log.info("holding the lease: running");
        running = this.keepRunning(run, signal, log);
      },
      released: async () => {
        // The lease is given up, or competed for again, only once `run` has stopped.
        const slow = setTimeout(
          () => log.error("run has not stopped since its lease ended; its name waits for it"),
          lease.leaseMs,
        );
        await running;
        clearTimeout(slow);
        running = undefined;
      },
    });
    const entry: Entry = { lease };
    this.runs.set(name, entry);
    if (this.opts.signal.aborted) void this.stopOne(name, entry);
    else void lease.start();
    return {
      get held() {
        return lease.held;
      },
      stop: () => this.stopOne(name, entry),
    };
  }

  /** Stops every run and hands their leases over (also when the bridge's signal aborts). */
  async stop(): Promise<void> {
    await Promise.all([...this.runs].map(([name, entry]) => this.stopOne(name, entry)));
  }

  private stopOne(name: string, entry: Entry): Promise<void> {
    entry.stopping ??= entry.lease.stop().finally(() => this.runs.delete(name));
    return entry.stopping;
  }

  /** Runs `run` until `signal` aborts: again, after a back-off, whenever it ends before that. */
  private async keepRunning(
    run: (signal: AbortSignal) => Promise<void>,
    signal: AbortSignal,
    log: Logger,
  ): Promise<void> {
    for (let failures = 0; ;) {
      const began = performance.now();
      let failure: unknown;
      try {
        await run(signal);
      } catch (err) {
        failure = err;
      }
      if (signal.aborted) return;
      // A run that lasted a while was not failing in a loop: its back-off starts over.
      failures = performance.now() - began > RERUN_BACKOFF.maxDelayMs ? 1 : failures + 1;
      const delay = Math.round(backoffDelayMs(RERUN_BACKOFF, failures, retryAfterMsOf(failure)));
      log.warn(
        { err: failure === undefined ? undefined : errorMessage(failure), retryInMs: delay },
        failure === undefined
          ? "run returned while holding its lease; running it again"
          : "run failed; running it again",
      );
      try {
        await sleep(delay, undefined, { signal });
      } catch {
        return; // the lease ended meanwhile
      }
    }
  }
}
