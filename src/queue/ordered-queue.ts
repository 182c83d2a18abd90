/**
 * A durable queue that keeps order per key (per room) across retries, crashes and restarts.
 *
 * Keys are hashed onto `shards` BullMQ queues. A shard's items travel in batches, one BullMQ job
 * each: what arrives while the shard's previous write is in flight goes in its next write, and a
 * write joins the shard's newest job while that job still waits, so batches grow with the backlog
 * (see WRITE_TO_WAITING). Each shard is consumed by exactly one worker with concurrency 1, guarded
 * by a lease in Redis so that several tribridge instances split the shards between them instead of
 * racing. Within a batch, the items of different keys are delivered concurrently and the items of
 * one key one after another. A transient failure is retried *in place* (the key waits) rather than
 * through BullMQ's delayed set, which would let later items overtake it. An item that exhausts its
 * attempts, or fails permanently, goes to the failed list with the reason, and its key moves on.
 *
 * After a crash, the job that was active is put back at the head of its shard before consuming
 * resumes (BullMQ's own stalled-job check would only notice it after later jobs ran).
 */
import { hash } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import { Queue, WaitingError, Worker, type Job } from "bullmq";
import type { Redis } from "ioredis";
import { backoffDelayMs, type BackoffPolicy } from "../backoff.js";
import { BoundedCache } from "../bounded-cache.js";
import { ConfigError, errorMessage, failedDestinationOf, retryAfterMsOf, retryCauseOf } from "../errors.js";
import type { Logger } from "../log.js";
import { redisKeys } from "../store/keys.js";
import { LogLimiter } from "../log-limiter.js";
import { connectRedis } from "../store/redis-store.js";
import type { DestinationGate, DestinationHealth } from "./destination-health.js";
import { Lease, type LeaseHolding, type LeaseTimings } from "./lease.js";

/** In-place retries of one item: back off (see backoffDelayMs) up to `maxAttempts` in all. */
export interface RetryPolicy extends BackoffPolicy {
  maxAttempts: number;
}

export interface OrderedQueueOptions<T> {
  /** Queue name without shard suffix, e.g. "to-matrix". No ':' (BullMQ's key separator). */
  name: string;
  prefix: string;
  redisUrl: string;
  shards: number;
  retry: RetryPolicy;
  keepCompleted: number;
  keepFailed: number;
  /**
   * Back-pressure: when the messages waiting in Redis take about this many bytes, add() holds new
   * ones (so their source is not acknowledged and slows down) until the backlog is down to 90%.
   * 0: no limit.
   */
  maxBacklogBytes?: number;
  /** How often the backlog is measured while add() is used; default 1000 ms. */
  backlogCheckMs?: number;
  /** Identifies this process; a restarted process with the same id takes its leases back at once. */
  instanceId: string;
  /**
   * Timings of the shard leases (see Lease): a dead instance's shards are taken over within
   * `leaseMs` (default 10 s) of its last renewal, renewed every `renewMs` (default 3 s).
   */
  lease?: LeaseTimings;
  log: Logger;
  /**
   * Delivers one item. Throw PermanentError to fail it now, anything else to retry it; a failure
   * that is not the message's (see RetryCause) does not count towards `retry.maxAttempts`.
   */
  process(data: T, info: { id: string; attempt: number }): Promise<void>;
  /**
   * The far sides' health, shared by the queues: an item whose destination is down waits at its
   * gate (see DestinationHealth). Absent: every failure is retried by its item alone.
   */
  health?: DestinationHealth;
  /** The destination an item goes to, as `health` names it; default: the queue's name. */
  destinationOf?(data: T): string;
  /**
   * Told once an item is in the failed list (e.g. to say so where it came from). Best effort: a
   * failure is logged, not retried; the failed list has the item and its reason either way.
   */
  failed?(data: T, info: { id: string; reason: string }): Promise<void>;
  /**
   * Told once per delivery of an item that is held up: its destination is down (it waits at its
   * gate, or it is queued behind one that does), or it failed and is retried. Not awaited; must
   * return at once and not throw. May come after the item was delivered (by another instance,
   * whose gate was open): the receiver ignores it then.
   */
  waiting?(data: T, info: { id: string }): void;
  /** Told of each outcome, for metrics. `ms`: from enqueue to delivery. */
  observe?: QueueObserver;
  /**
   * What a completed job keeps of a delivered item, when less than all of it (undefined: all).
   * Completed jobs are kept for inspection (`keepCompleted` per shard): without this, an item's
   * bulk (an attachment's bytes) would stay in Redis with them.
   */
  keptWhenDelivered?(data: T): T | undefined;
}

export interface QueueObserver {
  delivered(ms: number): void;
  /** An item skipped because a later one of its `supersededBy` key was in the same batch. */
  superseded(): void;
  retried(): void;
  failed(reason: "permanent" | "exhausted"): void;
}

export interface FailedJob {
  queue: string;
  id: string;
  reason: string;
  failedAt: number | undefined;
  data: unknown;
}

/** Job ids: a hash of the source identity. BullMQ forbids ':' and plain integers in custom ids. */
export function jobIdFor(...parts: string[]): string {
  return `j${hash("sha256", parts.join("\u0000"), "hex").slice(0, 40)}`;
}

export function shardOf(key: string, shards: number): number {
  return hash("sha1", key, "buffer").readUInt32BE(0) % shards;
}

const DEL_IF = `if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end`;

/** Who consumes a shard, as this instance sees it. */
export type ShardConsumer = "here" | "elsewhere" | "none";

class Shard<T> {
  readonly queue: Queue;
  private worker: Worker | undefined;
  /** Held while this instance consumes the shard: one consumer per shard over all instances. */
  private readonly lease: Lease;
  private pending: PendingBatch<T> | undefined;
  private writing = false;
  /** Jobs of the shard this process is delivering now. */
  private running = 0;
  /** performance.now() when the worker was made, or last took or finished a job. */
  private workerBusyAt = 0;
  /** performance.now() since when the shard has had no consumer, as far as this instance knows. */
  private unconsumedSince: number | undefined = performance.now();
  /** Whether "no consumer" was logged (so that "consumed again" is, once). */
  private reportedUnconsumed = false;
  /** Whether our own job locks may be cleared at once on the next start (our worker was replaced). */
  private ownLocksStale = false;
  /**
   * The lock tokens of the last jobs our workers took, by job id: a job left active under one of
   * them (its worker stopped, and could not put it back: Redis refusing writes) is ours to requeue
   * at once, not after its lock's 30 s.
   */
  private readonly ourLocks = new Map<string, string>();
  private watchdog: NodeJS.Timeout | undefined;
  private checking = false;

  constructor(
    private readonly owner: OrderedQueue<T>,
    readonly name: string,
    private readonly producer: Redis,
  ) {
    this.queue = new Queue(name, { connection: producer, prefix: owner.opts.prefix });
    this.lease = new Lease({
      ...owner.opts.lease,
      redis: producer,
      key: redisKeys.shardLease(owner.opts.prefix, name),
      holder: owner.opts.instanceId,
      log: owner.opts.log.child({ shard: name }),
      acquired: (holding) => this.consume(holding),
      // Lost (another instance may be delivering this shard by now) or stopping: its batch stops
      // between two items (the lease's signal), and its worker closes.
      released: () => this.stopWorker(),
    });
  }

  /** Takes the lease, or keeps trying in the background while another instance holds it. */
  start(): Promise<void> {
    this.watchdog = setInterval(() => void this.check(), this.lease.renewMs).unref();
    return this.lease.start();
  }

  get leaseMs(): number {
    return this.lease.leaseMs;
  }

  /** Who consumes the shard now: this instance (a worker running under its lease), another, or none. */
  get consumer(): ShardConsumer {
    if (this.lease.held && this.worker) return "here";
    return this.lease.heldElsewhere ? "elsewhere" : "none";
  }

  /** How long the shard has had no consumer (0: it has one), in ms. */
  unconsumedForMs(): number {
    return this.unconsumedSince === undefined ? 0 : performance.now() - this.unconsumedSince;
  }

  /**
   * Every renewMs: notices a worker that stopped consuming while we hold the lease (jobs waiting,
   * none taken for a lease's time: its blocking connection died, say) and replaces it, by giving
   * the lease up and competing again; and logs when the shard has had no consumer for longer than
   * a lease, and when it has one again (one line each, not one per attempt).
   */
  private async check(): Promise<void> {
    if (this.checking) return;
    this.checking = true;
    try {
      const { leaseMs } = this.lease;
      if (this.consumer === "here" && this.running === 0 && performance.now() - this.workerBusyAt > leaseMs) {
        const waiting = await this.bounded(this.queue.getWaitingCount()).catch(() => 0);
        if (waiting > 0 && this.running === 0 && performance.now() - this.workerBusyAt > leaseMs) {
          this.ownLocksStale = true;
          await this.lease.abandon(
            `its worker took no job for ${Math.round(performance.now() - this.workerBusyAt)} ms with ${waiting} waiting`,
          );
        }
      }
      this.noteConsumer();
    } finally {
      this.checking = false;
    }
  }

  private noteConsumer(): void {
    const { log } = this.owner.opts;
    if (this.consumer !== "none") {
      if (this.reportedUnconsumed)
        log.info(
          { shard: this.name, consumer: this.consumer, afterMs: Math.round(this.unconsumedForMs()) },
          "shard consumed again",
        );
      this.unconsumedSince = undefined;
      this.reportedUnconsumed = false;
      return;
    }
    this.unconsumedSince ??= performance.now();
    if (!this.reportedUnconsumed && this.unconsumedForMs() > this.lease.leaseMs) {
      this.reportedUnconsumed = true;
      log.warn(
        { shard: this.name, forMs: Math.round(this.unconsumedForMs()) },
        "shard has no consumer; its messages wait until one takes its lease",
      );
    }
  }

  /**
   * A Redis command while starting or stopping to consume: given up after a lease's time (Redis
   * away, or hanging) or when `signal` aborts, so that the lease is competed for again.
   */
  private bounded<R>(work: Promise<R>, signal?: AbortSignal): Promise<R> {
    const { leaseMs } = this.lease;
    return new Promise<R>((resolve, reject) => {
      const fail = (err: unknown) => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
        reject(err instanceof Error ? err : new Error(String(err)));
      };
      const onAbort = () => fail(signal!.reason);
      const timer = setTimeout(() => fail(new Error(`no answer from Redis within ${leaseMs} ms`)), leaseMs);
      if (signal?.aborted) return onAbort();
      signal?.addEventListener("abort", onAbort, { once: true });
      work.then((value) => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
        resolve(value);
      }, fail);
    });
  }

  private async consume({ signal, restarted }: LeaseHolding): Promise<void> {
    // Still ours from before a restart of this instance, or of a worker of ours replaced: its
    // jobs' locks may be broken at once.
    await this.requeueOrphans(restarted || this.ownLocksStale, signal);
    if (signal.aborted) return;
    const worker = new Worker(
      this.name,
      async (job, token) => {
        this.running++;
        this.workerBusyAt = performance.now();
        if (token !== undefined) {
          this.ourLocks.set(job.id!, token);
          if (this.ourLocks.size > 10) this.ourLocks.delete(this.ourLocks.keys().next().value!);
        }
        try {
          return await this.owner.runJob(job, token, signal);
        } finally {
          this.running--;
          this.workerBusyAt = performance.now();
        }
      },
      {
        connection: this.owner.workerConnection,
        prefix: this.owner.opts.prefix,
        concurrency: 1,
        autorun: true,
        // In-place retries keep a job active for long; the lock is renewed meanwhile.
        lockDuration: 30_000,
        stalledInterval: 30_000,
        maxStalledCount: 1_000_000, // a stalled job is re-run, never failed for stalling
        removeOnComplete: { count: this.owner.opts.keepCompleted },
        removeOnFail: { count: this.owner.opts.keepFailed },
      },
    );
    worker.on("error", (err) => this.owner.workerError(this.name, err));
    this.worker = worker;
    this.workerBusyAt = performance.now();
    // Its connections answer, or the lease is given up and competed for again.
    await this.bounded(worker.waitUntilReady(), signal);
    this.ownLocksStale = false;
    this.noteConsumer();
  }

  /**
   * Items added while the shard's previous write is in flight wait for it and go together in the
   * next one (otherwise in the same tick's): one write per round trip, in order, and the busier the
   * shard, the larger its writes.
   */
  add(item: QueueItem<T>, producer: WritingRedis): Promise<void> {
    let batch = this.pending;
    if (!batch) {
      batch = this.pending = { items: [], waiters: [] };
      if (!this.writing) setImmediate(() => this.flush(producer));
    }
    batch.items.push(item);
    return new Promise<void>((resolve, reject) => batch.waiters.push({ resolve, reject }));
  }

  private flush(producer: WritingRedis): void {
    const batch = this.pending;
    if (!batch || this.writing) return;
    this.pending = undefined;
    this.writing = true;
    this.write(producer, batch.items)
      .then(
        () => batch.waiters.forEach((w) => w.resolve()),
        (err: unknown) => batch.waiters.forEach((w) => w.reject(err)),
      )
      .finally(() => {
        this.writing = false;
        this.flush(producer);
      });
  }

  /** Writes items behind everything already in the shard: into the newest waiting job, or as a new job. */
  private async write(producer: WritingRedis, items: QueueItem<T>[]): Promise<void> {
    const batchId = jobIdFor(...items.map((i) => i.id));
    const { keepCompleted } = this.owner.opts;
    const into = await producer.writeToWaiting(
      this.queue.keys.wait!,
      this.queue.toKey("appended"),
      this.queue.toKey(""),
      JSON.stringify(items).slice(1, -1),
      MAX_JOB_BYTES,
      batchId,
      Math.max(keepCompleted, 1000),
      Date.now(),
    );
    if (into === null) await addBatch(this.queue, items, batchId, this.owner.opts);
  }

  /**
   * Jobs left active by an earlier holder of this lease go back to the head of the line, before
   * anything behind them runs. After a restart of this instance, or left by a worker of ours, at
   * once; after a takeover, once the other instance's job lock has expired (it may only be
   * stalled, and stops when it notices).
   */
  private async requeueOrphans(ownLocksStale: boolean, signal: AbortSignal): Promise<void> {
    const active = await this.bounded(this.queue.getActive(), signal);
    const redis = this.producer;
    for (const job of active) {
      const lock = redisKeys.jobLock(this.owner.opts.prefix, this.name, job.id!);
      if (ownLocksStale) await this.bounded(redis.del(lock), signal);
      // Taken by a worker of ours, none of which is delivering any more: its lock is cleared at
      // once; else it is waited out. Asked again each time: our old worker may finish meanwhile.
      while (!signal.aborted) {
        const ourToken = this.running === 0 ? this.ourLocks.get(job.id!) : undefined;
        if (ourToken !== undefined) await this.bounded(redis.eval(DEL_IF, 1, lock, ourToken), signal);
        if ((await this.bounded(redis.exists(lock), signal)) === 0) break;
        await sleep(500);
      }
      if (signal.aborted) return;
      // Put back meanwhile by the instance that held it (it noticed it lost the lease): nothing to do.
      if ((await this.bounded(job.getState(), signal)) !== "active") continue;
      await this.bounded(job.moveToWait("0"), signal);
      this.owner.opts.log.info({ shard: this.name, jobId: job.id }, "requeued job interrupted by a restart");
    }
  }

  /**
   * Closes the worker, waiting for its batch to stop (the lease's signal stops it between two
   * items). A close that does not end within a lease's time (BullMQ's waits for its blocking
   * connection, which may never reconnect once Redis restarted) is cut short: the worker is closing
   * already, so it takes no new job, and its connections are dropped.
   */
  private async stopWorker(): Promise<void> {
    const w = this.worker;
    this.worker = undefined;
    this.noteConsumer();
    if (!w) return;
    try {
      await this.bounded(w.close());
    } catch (err) {
      this.owner.opts.log.warn(
        { shard: this.name, err: errorMessage(err) },
        "worker did not close in time; dropping its connections",
      );
      // BullMQ's blocking connection (its own; the other one is shared by all shards, kept).
      const blocking = (
        w as unknown as { blockingConnection?: { disconnect(wait?: boolean): Promise<void> } }
      ).blockingConnection;
      await blocking?.disconnect(false).catch(() => undefined);
    }
  }

  /** Stops consuming (a batch in flight goes back to the head of the shard) and gives the lease up. */
  async stop(): Promise<void> {
    clearInterval(this.watchdog);
    await this.lease.stop();
    await this.queue.close();
  }
}

/** One relay: `id` is stable for the message (also the Matrix txnId), `data` what to deliver. */
export interface QueueItem<T> {
  id: string;
  /** When it was enqueued (ms since the epoch); absent in items written by older versions. */
  at?: number;
  /** The order key (room): items with the same key are delivered in order. */
  key: string;
  /**
   * Items with the same `latest` key only matter by their last one (a live message's readings):
   * an item followed by another of its `latest` key in the same batch is skipped, not delivered.
   * Batches grow with the backlog, so this sheds load exactly when delivery falls behind.
   */
  latest?: string;
  data: T;
}

/** A BullMQ job carries a batch of items of one shard, delivered one by one, in order. */
interface BatchData<T> {
  items: QueueItem<T>[];
}

interface PendingBatch<T> {
  items: QueueItem<T>[];
  waiters: { resolve: () => void; reject: (err: unknown) => void }[];
}

/** A job that is still waiting takes in later items up to this size (its JSON data, in bytes). */
const MAX_JOB_BYTES = 128 * 1024;

/**
 * Writes a batch into the newest job waiting in a shard, if there is one and it stays under the
 * size cap; returns that job's id, or nil when the caller must add the batch as a job of its own.
 *
 * A shard that is behind thus gathers its items into one job instead of one job per write, and
 * BullMQ's per-job cost (three scripts, events, a Job object) is paid once for all of them: batch
 * size follows the backlog, and nothing is held back when there is none. The script is atomic with
 * the worker's move to active (a script too), so the items land either in a job still waiting or,
 * if it was just taken, in a new one behind it. Order is kept because new jobs are pushed on the
 * end read here (LPUSH, index 0). This reaches into BullMQ's storage (the wait list and the job
 * hash's `data` field), which is why job data is exactly `{"items":[…]}` (see addBatch).
 *
 * A batch written twice (a transaction replayed after a crash) is stored once, as BullMQ does for a
 * job id it still holds: the ids of appended batches are remembered in a capped sorted set.
 *
 * KEYS: wait list, appended-batches set. ARGV: job key prefix, the items' JSON without brackets,
 * size cap, batch id, how many batch ids to remember, now.
 */
const WRITE_TO_WAITING = `
if redis.call("ZSCORE", KEYS[2], ARGV[4]) or redis.call("EXISTS", ARGV[1] .. ARGV[4]) == 1 then
  return ARGV[4]
end
local id = redis.call("LINDEX", KEYS[1], 0)
if not id or string.sub(id, 1, 2) == "0:" then return false end
local jobKey = ARGV[1] .. id
local data = redis.call("HGET", jobKey, "data")
if not data or string.sub(data, -2) ~= "]}" or #data + #ARGV[2] > tonumber(ARGV[3]) then return false end
redis.call("HSET", jobKey, "data", string.sub(data, 1, -3) .. "," .. ARGV[2] .. "]}")
redis.call("ZADD", KEYS[2], ARGV[6], ARGV[4])
redis.call("ZREMRANGEBYRANK", KEYS[2], 0, -1 - tonumber(ARGV[5]))
return id`;

/** The bytes of data of the jobs waiting in a shard. KEYS: wait list. ARGV: job key prefix. */
const WAITING_BYTES = `
local total = 0
for _, id in ipairs(redis.call("LRANGE", KEYS[1], 0, -1)) do
  total = total + redis.call("HSTRLEN", ARGV[1] .. id, "data")
end
return total`;

type WritingRedis = Redis & {
  waitingBytes(waitKey: string, jobKeyPrefix: string): Promise<number>;
  writeToWaiting(
    waitKey: string,
    appendedKey: string,
    jobKeyPrefix: string,
    items: string,
    maxBytes: number,
    batchId: string,
    remember: number,
    now: number,
  ): Promise<string | null>;
};

/** How often a batch records how far it got: after a crash at most this many items are delivered again. */
const PROGRESS_EVERY = 10;

/** Writes one batch as one job of a shard's queue; its data is `{"items":[…]}` (see WRITE_TO_WAITING). */
function addBatch<T>(
  queue: Queue,
  items: QueueItem<T>[],
  jobId: string,
  keep: { keepCompleted: number; keepFailed: number },
): Promise<unknown> {
  const data: BatchData<T> = { items };
  return queue.add("relay", data, {
    jobId,
    attempts: 1, // retries happen in place, see runJob
    removeOnComplete: { count: keep.keepCompleted },
    removeOnFail: { count: keep.keepFailed },
  });
}

async function failedJobsOf(dead: Queue, queue: string, limit: number): Promise<FailedJob[]> {
  const jobs = await dead.getWaiting(0, limit - 1);
  return jobs
    .map((j) => {
      const d = j.data as { item: QueueItem<unknown>; reason: string; failedAt: number };
      return { queue, id: d.item.id, reason: d.reason, failedAt: d.failedAt, data: d.item.data };
    })
    .sort((a, b) => (a.failedAt ?? 0) - (b.failedAt ?? 0));
}

/**
 * Puts failed items (all, or those with the given ids) back on their shards and off the failed
 * list; the bridge delivers them as soon as it runs. Each goes behind what its room has queued
 * since. Returns how many were requeued.
 */
export async function requeueFailedJobs(
  connection: Redis,
  opts: Pick<OrderedQueueOptions<unknown>, "prefix" | "name" | "shards" | "keepCompleted" | "keepFailed">,
  ids?: ReadonlySet<string>,
  undeliverable?: (item: QueueItem<unknown>, reason: string) => string | undefined,
): Promise<number> {
  const { prefix, name, shards } = opts;
  const dead = new Queue(`${name}-failed`, { connection, prefix });
  const shardQueues = new Map<number, Queue>();
  let requeued = 0;
  try {
    for (const job of await dead.getWaiting(0, -1)) {
      const { item, reason } = job.data as { item: QueueItem<unknown>; reason: string };
      if (ids && !ids.has(item.id)) continue;
      const stillFailing = undeliverable?.(item, reason);
      if (stillFailing !== undefined) {
        // Nowhere to deliver it: it fails again at once, at the end of the list, saying why.
        await writeFailed(dead, item, stillFailing, Date.now());
        await job.remove();
        continue;
      }
      const index = shardOf(item.key, shards);
      let queue = shardQueues.get(index);
      if (!queue) shardQueues.set(index, (queue = new Queue(`${name}-${index}`, { connection, prefix })));
      await addBatch(queue, [item], jobIdFor("retry", item.id, String(Date.now())), opts);
      await job.remove();
      requeued++;
    }
    return requeued;
  } finally {
    await Promise.all([dead, ...shardQueues.values()].map((q) => q.close()));
  }
}

/** One item into a failed list; the same (item, failedAt) written twice is stored once. */
function writeFailed(
  dead: Queue,
  item: QueueItem<unknown>,
  reason: string,
  failedAt: number,
): Promise<unknown> {
  return dead.add(
    "failed",
    { item, reason, failedAt },
    { jobId: jobIdFor("failed", item.id, String(failedAt)) },
  );
}

/** The failed list of queue `name` read from outside a running bridge (the `failed-jobs` command). */
export async function readFailedJobs(
  connection: Redis,
  prefix: string,
  name: string,
  limit = 100,
): Promise<FailedJob[]> {
  const dead = new Queue(`${name}-failed`, { connection, prefix });
  try {
    return await failedJobsOf(dead, name, limit);
  } finally {
    await dead.close();
  }
}

export class OrderedQueue<T> {
  private readonly producer: WritingRedis;
  /** Shared by the shards' workers (BullMQ gives each its own blocking connection besides). */
  readonly workerConnection: Redis;
  private readonly shards: Shard<T>[];
  /** shardOf per order key (room), remembered: there are few, and each item would hash again. */
  private readonly shardIndexes = new BoundedCache<string, number>();
  /** Items that failed for good, with the reason: the failed list. */
  private readonly dead: Queue;
  private backlogMonitor: NodeJS.Timeout | undefined;
  /** Whether add() holds new items (see maxBacklogBytes), and the adds it holds. */
  private holding = false;
  private readonly held: { resolve: () => void; reject: (err: Error) => void }[] = [];
  /** Worker errors come per shard and per attempt while Redis is away: a line a minute per kind. */
  private readonly workerErrors = new LogLimiter(60_000);

  constructor(readonly opts: OrderedQueueOptions<T>) {
    // Not auto-pipelined: ioredis copies every loaded Lua script (BullMQ has dozens) into each
    // pipeline it creates, which costs more than the writes it saves.
    this.producer = connectRedis(opts.redisUrl, `${opts.name}-producer`) as WritingRedis;
    this.producer.defineCommand("writeToWaiting", { numberOfKeys: 2, lua: WRITE_TO_WAITING });
    this.producer.defineCommand("waitingBytes", { numberOfKeys: 1, lua: WAITING_BYTES });
    this.workerConnection = connectRedis(opts.redisUrl, `${opts.name}-worker`);
    this.shards = Array.from(
      { length: opts.shards },
      (_, i) => new Shard(this, `${opts.name}-${i}`, this.producer),
    );
    this.dead = new Queue(`${opts.name}-failed`, { connection: this.producer, prefix: opts.prefix });
  }

  /** An error a shard's BullMQ worker reports (it carries on by itself: reconnects, retries). */
  workerError(shard: string, err: Error): void {
    const pass = this.workerErrors.pass(err.message);
    if (pass) this.opts.log.warn({ shard, err: err.message, heldBack: pass.heldBack }, "worker error");
  }

  /**
   * Durably enqueues `data` behind every earlier item with the same `orderKey`; resolves once it
   * is in Redis. `id` identifies the message: consumers use it for idempotency (a Matrix txnId).
   * Items are written in batches (see Shard.add); a batch written twice (same items, e.g. a
   * replayed homeserver transaction) is stored once. `latest`: see QueueItem.latest.
   */
  async add(orderKey: string, id: string, data: T, opts: { latest?: string } = {}): Promise<void> {
    if (this.opts.maxBacklogBytes) {
      this.backlogMonitor ??= setInterval(
        () => void this.measureBacklog(),
        this.opts.backlogCheckMs ?? 1000,
      ).unref();
      if (this.holding) await new Promise<void>((resolve, reject) => this.held.push({ resolve, reject }));
    }
    const shardIndex = this.shardIndexes.get(orderKey, (key) => shardOf(key, this.shards.length));
    const item: QueueItem<T> = { id, at: Date.now(), key: orderKey, data };
    if (opts.latest !== undefined) item.latest = opts.latest;
    await this.shards[shardIndex]!.add(item, this.producer);
    this.tellIfHeld(item);
  }

  /**
   * An item queued while its destination is known to be down waits behind the item parked at its
   * gate: told so now (`waiting`), not only once it reaches the head of its shard, which may be
   * minutes later. Checked after the write: an item delivered meanwhile found the gate open.
   */
  private tellIfHeld(item: QueueItem<T>): void {
    const { health, waiting, destinationOf, name } = this.opts;
    if (health && waiting && !health.gate(destinationOf?.(item.data) ?? name).open)
      waiting(item.data, { id: item.id });
  }

  async start(): Promise<void> {
    await this.checkShardCount();
    await Promise.all(this.shards.map((s) => s.start()));
  }

  /**
   * A room's items are in the shard its key hashes to for `shards`: with another count, items
   * queued before would sit in shards no one consumes, or run beside the room's newer ones.
   */
  private async checkShardCount(): Promise<void> {
    const { prefix, name, shards } = this.opts;
    const key = redisKeys.shardCount(prefix, name);
    const before = Number((await this.producer.get(key)) ?? shards);
    if (before !== shards) {
      const queues = Array.from(
        { length: Math.max(before, shards) },
        (_, i) => new Queue(`${name}-${i}`, { connection: this.producer, prefix }),
      );
      const counts = await Promise.all(queues.map((q) => q.getJobCounts("waiting", "active")));
      await Promise.all(queues.map((q) => q.close()));
      const batches = counts.reduce((n, c) => n + (c.waiting ?? 0) + (c.active ?? 0), 0);
      if (batches > 0)
        throw new ConfigError(
          "queue.shards",
          `was ${before} when the ${batches} batch(es) still queued in ${name} were written; set it back ` +
            `to ${before} until they are delivered, then change it`,
        );
    }
    await this.producer.set(key, String(shards));
  }

  /**
   * The size of the waiting jobs' data, summed in Redis. Cheap: waiting jobs other than a shard's
   * newest are full (a write joins the newest while it is under MAX_JOB_BYTES), so there are few.
   */
  private async measureBacklog(): Promise<void> {
    const max = this.opts.maxBacklogBytes!;
    let bytes: number;
    try {
      const sizes = await Promise.all(
        this.shards.map((s) => this.producer.waitingBytes(s.queue.keys.wait!, s.queue.toKey(""))),
      );
      bytes = sizes.reduce((a, b) => a + b, 0);
    } catch {
      return; // Redis unreachable: add() fails on its own
    }
    if (!this.holding && bytes >= max) {
      this.holding = true;
      this.opts.log.warn(
        { backlogMb: Math.round(bytes / 2 ** 20), maxBacklogMb: Math.round(max / 2 ** 20) },
        "backlog full: holding new messages at their source (not acknowledged) until it drains",
      );
    } else if (this.holding && bytes < max * 0.9) {
      this.holding = false;
      this.opts.log.info(
        { backlogMb: Math.round(bytes / 2 ** 20) },
        "backlog drained: accepting messages again",
      );
      for (const h of this.held.splice(0)) h.resolve();
    }
  }

  /**
   * The processor of every shard: delivers a batch, each key's items in order, keys concurrently.
   * Progress is recorded as it goes, so a restart resumes after what was delivered (give or take
   * the last few: delivery is at least once, and idempotent where `id` allows).
   */
  /** `signal`: aborted when this shard stops consuming (the lease lost, or the queue stopping). */
  async runJob(job: Job, token: string | undefined, signal: AbortSignal): Promise<void> {
    const { items } = job.data as BatchData<T>;
    const saved = (job.progress as { done?: number[] } | number | undefined) ?? {};
    const done = new Set(typeof saved === "object" && Array.isArray(saved.done) ? saved.done : []);
    const lastOf = new Map<string, number>();
    items.forEach((item, index) => item.latest !== undefined && lastOf.set(item.latest, index));
    const byKey = new Map<string, number[]>();
    items.forEach((item, index) => {
      if (done.has(index)) return;
      if (item.latest !== undefined && lastOf.get(item.latest) !== index) {
        done.add(index);
        this.opts.observe?.superseded();
        return;
      }
      const list = byKey.get(item.key);
      if (list) list.push(index);
      else byKey.set(item.key, [index]);
    });
    let unsaved = 0;
    const results = await Promise.allSettled(
      [...byKey.values()].map(async (indices) => {
        for (const index of indices) {
          await this.deliver(items[index]!, signal);
          done.add(index);
          if (++unsaved >= PROGRESS_EVERY && done.size < items.length) {
            unsaved = 0;
            // Not awaited: a lost update only means re-delivering a few items after a crash.
            job.updateProgress({ done: [...done] }).catch(() => undefined);
          }
        }
      }),
    );
    const failure = results.find((r) => r.status === "rejected");
    if (!failure) return this.slimDelivered(job, items);
    if (signal.aborted) {
      // Stopping, or the lease lost, mid-batch: keep what was delivered, and put the job back at
      // the head of its shard. Already moved by the instance that took the lease over: nothing to do.
      await job.updateProgress({ done: [...done] }).catch(() => undefined);
      await job.moveToWait(token).catch(() => undefined);
      throw new WaitingError();
    }
    throw failure.reason;
  }

  /**
   * Rewrites a delivered batch as `keptWhenDelivered` says, before BullMQ keeps it as completed.
   * Every item is recorded as delivered first: a crash between the two writes re-runs the job
   * without delivering anything again (never a slimmed item). A failure only costs the memory.
   */
  private async slimDelivered(job: Job, items: QueueItem<T>[]): Promise<void> {
    const keep = this.opts.keptWhenDelivered;
    if (!keep) return;
    let slimmed = false;
    const kept = items.map((item) => {
      const data = keep(item.data);
      if (data === undefined) return item;
      slimmed = true;
      return { ...item, data };
    });
    if (!slimmed) return;
    try {
      await job.updateProgress({ done: items.map((_, index) => index) });
      await job.updateData({ items: kept } satisfies BatchData<T>);
    } catch (err) {
      this.opts.log.warn({ jobId: job.id, err: errorMessage(err) }, "delivered batch kept whole");
    }
  }

  /**
   * Delivers one item, retrying in place until it is delivered or fails for good. Failures that
   * can be the message's count towards `maxAttempts`, each logged. A destination found down parks
   * the item at its gate (no attempt counted, nothing logged per attempt: the gate logs); the far
   * side rate-limiting waits as long as it asks.
   */
  private async deliver(item: QueueItem<T>, signal: AbortSignal): Promise<void> {
    const { retry, log, health } = this.opts;
    const own = health?.gate(this.opts.destinationOf?.(item.data) ?? this.opts.name);
    let gate: DestinationGate | undefined = own;
    /** The gate this item last found down, and its mark then (see DestinationGate.failed). */
    let lastDown: { gate: DestinationGate; mark: number } | undefined;
    let counted = 0;
    let toldWaiting = false;
    const held = () => {
      if (toldWaiting) return;
      toldWaiting = true;
      this.opts.waiting?.(item.data, { id: item.id });
    };
    for (let attempt = 1; ; attempt++) {
      signal.throwIfAborted();
      if (gate && !gate.open) held();
      await gate?.admit(signal);
      try {
        await this.opts.process(item.data, { id: item.id, attempt: counted + 1 });
        gate?.succeeded();
        if (gate !== own) own?.succeeded();
        this.opts.observe?.delivered(item.at === undefined ? NaN : Date.now() - item.at);
        return;
      } catch (err) {
        const cause = retryCauseOf(err);
        if (cause === "unavailable" && health) {
          const failedGate = health.gate(failedDestinationOf(err) ?? own!.name);
          // Its own fault only if the far side answered others since this item last found it down;
          // a first failure proves nothing (others' requests may have begun before the outage).
          const since = lastDown?.gate === failedGate ? lastDown.mark : failedGate.mark;
          lastDown = { gate: failedGate, mark: failedGate.mark };
          if (failedGate.failed(err, since)) {
            log.debug(
              { itemId: item.id, destination: failedGate.name, err: errorMessage(err) },
              "destination down",
            );
            gate = failedGate;
            held();
            continue;
          }
        } else gate?.succeeded(); // it answered: whatever went wrong is this message's, not the far side's
        gate = own;
        if (cause === "rate-limited") {
          const delay = backoffDelayMs(retry, attempt, retryAfterMsOf(err));
          log.debug({ itemId: item.id, delayMs: Math.round(delay), err: errorMessage(err) }, "rate-limited");
          held();
          await sleep(delay, undefined, { signal });
          continue;
        }
        counted++;
        if (cause === "permanent" || counted >= retry.maxAttempts) {
          const reason =
            cause === "permanent"
              ? `permanent: ${errorMessage(err)}`
              : `gave up after ${counted} attempts: ${errorMessage(err)}`;
          log.error({ itemId: item.id, reason }, "relay failed; moved to the failed list");
          this.opts.observe?.failed(cause === "permanent" ? "permanent" : "exhausted");
          await this.recordFailureDurably(item, reason, signal);
          await this.opts
            .failed?.(item.data, { id: item.id, reason })
            .catch((tellErr: unknown) =>
              log.warn({ itemId: item.id, err: errorMessage(tellErr) }, "could not tell of the failed relay"),
            );
          return;
        }
        const delay = backoffDelayMs(retry, counted, retryAfterMsOf(err));
        log.warn(
          { itemId: item.id, attempt: counted, delayMs: Math.round(delay), err: errorMessage(err) },
          "relay failed; retrying",
        );
        this.opts.observe?.retried();
        held();
        await sleep(delay, undefined, { signal });
      }
    }
  }

  /** The failed list is where "nothing is lost" ends: a write to it that fails is tried again. */
  private async recordFailureDurably(item: QueueItem<T>, reason: string, signal: AbortSignal): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.recordFailure(item, reason);
      } catch (err) {
        const delay = backoffDelayMs(this.opts.retry, attempt);
        this.opts.log.warn(
          { itemId: item.id, err: errorMessage(err), retryInMs: delay },
          "could not write to the failed list; trying again",
        );
        await sleep(delay, undefined, { signal });
      }
    }
  }

  private async recordFailure(item: QueueItem<T>, reason: string): Promise<void> {
    const failedAt = Date.now();
    await this.dead.add(
      "failed",
      { item, reason, failedAt },
      { jobId: jobIdFor("failed", item.id, String(failedAt)) },
    );
    const excess = (await this.dead.getWaitingCount()) - this.opts.keepFailed;
    if (excess > 0) await this.dead.clean(0, excess, "wait"); // the oldest go first
  }

  /**
   * Puts an item straight into the failed list, never delivered (ConnectorContext.quarantine):
   * resolves once it is there, rejects when Redis cannot take it. An item written twice (same `id`,
   * e.g. a mail read again after a crash) is listed once while it is there.
   */
  async addFailed(orderKey: string, id: string, data: T, reason: string): Promise<void> {
    const item: QueueItem<T> = { id, at: Date.now(), key: orderKey, data };
    await this.dead.add("failed", { item, reason, failedAt: item.at }, { jobId: jobIdFor("failed", id) });
    const excess = (await this.dead.getWaitingCount()) - this.opts.keepFailed;
    if (excess > 0) await this.dead.clean(0, excess, "wait");
  }

  /** The failed list: items that failed permanently or ran out of attempts, oldest first. */
  failedJobs(limit = 100): Promise<FailedJob[]> {
    return failedJobsOf(this.dead, this.opts.name, limit);
  }

  /** Batches waiting and being delivered over all shards, and the failed list's length (for metrics). */
  async backlog(): Promise<{
    waiting: number;
    active: number;
    failedList: number;
    holding: boolean;
    /** Shards without a consumer for longer than a lease (see unconsumedShards). */
    unconsumedShards: number;
  }> {
    const [shards, failedList] = await Promise.all([
      Promise.all(this.shards.map((s) => s.queue.getJobCounts("waiting", "active"))),
      this.dead.getWaitingCount(),
    ]);
    return {
      waiting: shards.reduce((n, c) => n + (c.waiting ?? 0), 0),
      active: shards.reduce((n, c) => n + (c.active ?? 0), 0),
      failedList,
      holding: this.holding,
      unconsumedShards: this.unconsumedShards().length,
    };
  }

  /**
   * The shards that have had no consumer for longer than a lease: no instance holds the lease, or
   * this one does but has no worker running (see Shard.check). For status, metrics and /ready.
   */
  unconsumedShards(): string[] {
    const leaseMs = this.shards[0]?.leaseMs ?? 0;
    return this.shards.filter((s) => s.unconsumedForMs() > leaseMs).map((s) => s.name);
  }

  /** Who consumes each shard now, by shard name (see ShardConsumer). */
  consumers(): Record<string, ShardConsumer> {
    return Object.fromEntries(this.shards.map((s) => [s.name, s.consumer]));
  }

  /** Counts over all shards, for tests. */
  async counts(): Promise<Record<string, number>> {
    const all = await Promise.all(this.shards.map((s) => s.queue.getJobCounts()));
    const sum: Record<string, number> = {};
    for (const c of all) for (const [k, v] of Object.entries(c)) sum[k] = (sum[k] ?? 0) + v;
    return sum;
  }

  async stop(): Promise<void> {
    clearInterval(this.backlogMonitor);
    for (const h of this.held.splice(0)) h.reject(new Error(`queue ${this.opts.name} is stopping`));
    await Promise.all(this.shards.map((s) => s.stop()));
    await this.dead.close();
    this.producer.disconnect();
    this.workerConnection.disconnect();
  }
}
