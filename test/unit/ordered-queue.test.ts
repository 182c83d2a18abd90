/**
 * OrderedQueue against the shared Redis: per-key order, concurrency across keys, in-place retries,
 * the failed list, durability of add(), batch dedupe, restart and crash recovery.
 * Every test uses its own key prefix and deletes its keys afterwards.
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { setTimeout as sleep } from "node:timers/promises";
import { Queue, Worker } from "bullmq";
import { Redis } from "ioredis";
import { pino } from "pino";
import { PermanentError, RetryableError } from "../../src/errors.js";
import { moduleLogger } from "../../src/log.js";
import { OrderedQueue, shardOf, type OrderedQueueOptions } from "../../src/queue/ordered-queue.js";
import { REDIS_URL, deleteKeys, waitFor } from "../helpers/fixture.js";
import { testQueueOptions } from "../helpers/queues.js";

const log = moduleLogger("ordered-queue-test");
// Failures are the point of several tests; keep their error logs out of the test output.
log.level = "silent";

interface Item {
  n: number;
}

/** Short shard leases, for the tests about them: taken over, lost and regained in well under a second. */
const SHORT_LEASE = { leaseMs: 1_000, renewMs: 200 };

type Process<T> = OrderedQueueOptions<T>["process"];

/** A fresh prefix; queues made through it are stopped and its keys deleted by cleanup(). */
/** A key prefix and queues for one test, all removed when the test ends. */
function scope(t: TestContext) {
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  const queues: OrderedQueue<unknown>[] = [];
  const extra: (() => Promise<void>)[] = [];
  const s = {
    prefix,
    make<T>(process: Process<T>, over: Partial<OrderedQueueOptions<T>> = {}): OrderedQueue<T> {
      const q = new OrderedQueue<T>(testQueueOptions(prefix, process, { log, ...over }));
      queues.push(q as OrderedQueue<unknown>);
      return q;
    },
    /** Stops `q` now; cleanup() will not stop it again. */
    async stop(q: OrderedQueue<unknown>): Promise<void> {
      queues.splice(queues.indexOf(q), 1);
      await q.stop();
    },
    onCleanup(fn: () => Promise<void>): void {
      extra.push(fn);
    },
    async cleanup(): Promise<void> {
      for (const q of queues.splice(0)) await q.stop().catch(() => undefined);
      for (const fn of extra.splice(0)) await fn().catch(() => undefined);
      await deleteKeys(prefix);
    },
  };
  t.after(() => s.cleanup());
  return s;
}

/** Delivery log entries per key. */
function byKey<E extends { key: string }>(entries: E[]): Map<string, E[]> {
  const m = new Map<string, E[]>();
  for (const e of entries) {
    const list = m.get(e.key) ?? [];
    list.push(e);
    m.set(e.key, list);
  }
  return m;
}

// --- order ------------------------------------------------------------------------------------------

test("per-key order: 500 items over 10 keys and 4 shards, each key in add order, each item once", async (t) => {
  const s = scope(t);
  const delivered: { key: string; n: number; id: string }[] = [];
  const q = s.make<Item & { key: string }>(
    async (data, { id }) => {
      delivered.push({ key: data.key, n: data.n, id });
      // A little jitter so keys interleave and a key's later item could overtake if order broke.
      if (data.n % 7 === 0) await sleep(1);
    },
    { shards: 4 },
  );
  const keys = Array.from({ length: 10 }, (_, i) => `!room${i}:example.org`);
  assert.ok(new Set(keys.map((k) => shardOf(k, 4))).size > 1, "keys should span several shards");
  await q.start();
  // Mixed batch sizes: some ticks add one item, some many; some adds happen while consuming.
  const adds: Promise<void>[] = [];
  let n = 0;
  while (n < 500) {
    const size = [1, 3, 17, 60, 250][n % 5]!;
    for (let i = 0; i < size && n < 500; i++, n++) {
      const key = keys[(n * 7 + (n >> 3)) % 10]!;
      adds.push(q.add(key, `id-${n}`, { key, n }));
    }
    await sleep(0);
  }
  await Promise.all(adds);
  await waitFor("500 deliveries", () => delivered.length >= 500);
  await sleep(100); // anything extra would show up now
  assert.equal(delivered.length, 500);
  assert.equal(new Set(delivered.map((d) => d.id)).size, 500, "each item delivered exactly once");
  const perKey = byKey(delivered);
  assert.equal(perKey.size, 10);
  for (const [key, list] of perKey) {
    const ns = list.map((d) => d.n);
    assert.deepEqual(
      ns,
      [...ns].sort((a, b) => a - b),
      `${key} out of order`,
    );
  }
  assert.deepEqual(await q.failedJobs(), []);
});

test("different keys in one shard are delivered concurrently: a slow key does not hold up another", async (t) => {
  const s = scope(t);
  const events: string[] = [];
  let inFlight = 0;
  let maxInFlight = 0;
  const q = s.make<{ key: string; n: number }>(async (data) => {
    inFlight++;
    maxInFlight = Math.max(maxInFlight, inFlight);
    events.push(`start ${data.key}${data.n}`);
    if (data.key === "A") await sleep(500);
    events.push(`end ${data.key}${data.n}`);
    inFlight--;
  });
  await q.start();
  // Same tick, same (only) shard: one batch.
  await Promise.all([
    q.add("A", "a1", { key: "A", n: 1 }),
    q.add("A", "a2", { key: "A", n: 2 }),
    q.add("B", "b1", { key: "B", n: 1 }),
    q.add("B", "b2", { key: "B", n: 2 }),
  ]);
  await waitFor("all four", () => events.filter((e) => e.startsWith("end")).length === 4);
  const at = (e: string) => events.indexOf(e);
  assert.ok(at("end B2") < at("end A1"), `B waited for A: ${events.join(", ")}`);
  assert.ok(at("end A1") < at("start A2"), `A's own order broken: ${events.join(", ")}`);
  assert.ok(maxInFlight >= 2);
});

test("a key stuck in retries in one shard does not hold up a later batch in another shard", async (t) => {
  const s = scope(t);
  // Two keys on different shards of 2.
  const keyA = "!a:x";
  let keyB = "!b0:x";
  for (let i = 0; shardOf(keyB, 2) === shardOf(keyA, 2); i++) keyB = `!b${i}:x`;
  const events: string[] = [];
  let failA = true;
  const q = s.make<{ key: string }>(
    async (data, { attempt }) => {
      events.push(`${data.key === keyA ? "A" : "B"}#${attempt}`);
      if (data.key === keyA && failA) throw new Error("down");
    },
    { shards: 2, retry: { maxAttempts: 1000, initialDelayMs: 10, maxDelayMs: 20 } },
  );
  await q.start();
  await q.add(keyA, "a1", { key: keyA });
  await waitFor("A retrying", () => events.includes("A#3"));
  await q.add(keyB, "b1", { key: keyB });
  await waitFor("B delivered", () => events.includes("B#1"), 2_000);
  failA = false;
  await waitFor("A delivered", () => events.filter((e) => e.startsWith("A")).length > 3);
});

// --- retries ----------------------------------------------------------------------------------------

test("a transient failure is retried in place: the key's next item waits, attempts count 1, 2, 3", async (t) => {
  const s = scope(t);
  const calls: { key: string; n: number; attempt: number; ok: boolean }[] = [];
  const q = s.make<{ key: string; n: number }>(async (data, { attempt }) => {
    const fail = data.key === "A" && data.n === 2 && attempt <= 2;
    calls.push({ key: data.key, n: data.n, attempt, ok: !fail });
    if (fail) throw new Error(`flaky ${attempt}`);
  });
  await q.start();
  const adds: Promise<void>[] = [];
  for (let n = 0; n < 5; n++) adds.push(q.add("A", `a${n}`, { key: "A", n }));
  for (let n = 0; n < 3; n++) adds.push(q.add("B", `b${n}`, { key: "B", n }));
  await Promise.all(adds);
  // A later batch for A must also wait for item 2.
  await q.add("A", "a5", { key: "A", n: 5 });
  await waitFor("A's last item", () => calls.some((c) => c.key === "A" && c.n === 5));
  await sleep(50);
  const a = calls.filter((c) => c.key === "A");
  assert.deepEqual(
    a.map((c) => `${c.n}#${c.attempt}${c.ok ? "" : "!"}`),
    ["0#1", "1#1", "2#1!", "2#2!", "2#3", "3#1", "4#1", "5#1"],
  );
  assert.deepEqual(
    calls.filter((c) => c.key === "B").map((c) => c.n),
    [0, 1, 2],
  );
  assert.deepEqual(await q.failedJobs(), []);
});

test("waiting: told once of an item that is retried, at its first failure; not of one delivered at once", async (t) => {
  const s = scope(t);
  const told: string[] = [];
  const attempts: string[] = [];
  const q = s.make<{ n: number }>(
    async (data, { id, attempt }) => {
      attempts.push(`${id}#${attempt}`);
      if (data.n === 1 && attempt <= 2) throw new Error(`flaky ${attempt}`);
    },
    { waiting: (_data, { id }) => void told.push(`${id} after ${attempts.length} attempt(s)`) },
  );
  await q.start();
  await Promise.all([q.add("A", "a0", { n: 0 }), q.add("A", "a1", { n: 1 }), q.add("A", "a2", { n: 2 })]);
  await waitFor("the last item", () => attempts.includes("a2#1"));
  assert.deepEqual(told, ["a1 after 2 attempt(s)"]);
});

test("RetryableError.retryAfterMs is honoured, capped at 10 × maxDelayMs", async (t) => {
  const s = scope(t);
  // retry: initialDelayMs 10, maxDelayMs 50 → the exponential step is ≤ 10 ms on attempt 1 and the
  // retryAfterMs cap is 500 ms (backoffDelayMs: max(jittered, min(retryAfterMs, 10 × maxDelayMs))).
  const seen = new Map<string, number[]>();
  const q = s.make<{ retryAfterMs: number }>(async (data, { id, attempt }) => {
    const times = seen.get(id) ?? [];
    times.push(performance.now());
    seen.set(id, times);
    if (attempt === 1) throw new RetryableError("slow down", data.retryAfterMs);
  });
  await q.start();
  // Two keys in one batch: both waits run at once.
  await Promise.all([
    q.add("A", "short", { retryAfterMs: 300 }),
    q.add("B", "capped", { retryAfterMs: 60_000 }),
  ]);
  await waitFor("both retried", () => seen.get("short")?.length === 2 && seen.get("capped")?.length === 2);
  const gap = (id: string) => {
    const [t1, t2] = seen.get(id)!;
    return t2! - t1!;
  };
  const short = gap("short");
  const capped = gap("capped");
  assert.ok(short >= 295 && short < 300 + 250, `retryAfterMs 300 waited ${short} ms`);
  assert.ok(capped >= 495 && capped < 500 + 250, `retryAfterMs 60000 waited ${capped} ms (cap 500)`);
});

// --- the failed list ----------------------------------------------------------------------------------

test("PermanentError sends the item to the failed list at once; the key moves on", async (t) => {
  const s = scope(t);
  const calls: string[] = [];
  const q = s.make<{ n: number }>(async (data, { id, attempt }) => {
    calls.push(`${id}#${attempt}`);
    if (data.n === 1) throw new PermanentError("bad payload");
  });
  await q.start();
  const before = Date.now();
  await Promise.all([0, 1, 2, 3].map((n) => q.add("A", `p${n}`, { n })));
  await waitFor("p3", () => calls.includes("p3#1"));
  assert.deepEqual(calls, ["p0#1", "p1#1", "p2#1", "p3#1"]);
  const failed = await q.failedJobs();
  assert.equal(failed.length, 1);
  const [f] = failed;
  assert.equal(f!.id, "p1");
  assert.equal(f!.queue, "q");
  assert.equal(f!.reason, "permanent: bad payload");
  assert.deepEqual(f!.data, { n: 1 });
  assert.ok(typeof f!.failedAt === "number" && f!.failedAt >= before && f!.failedAt <= Date.now());
});

test("an item that exhausts maxAttempts goes to the failed list with 'gave up after N attempts'", async (t) => {
  const s = scope(t);
  const calls: string[] = [];
  const q = s.make<{ n: number }>(
    async (data, { id, attempt }) => {
      calls.push(`${id}#${attempt}`);
      if (data.n === 1) throw new Error("boom");
      if (data.n === 2) throw new RetryableError("still busy", 1);
    },
    { retry: { maxAttempts: 3, initialDelayMs: 10, maxDelayMs: 50 } },
  );
  await q.start();
  await Promise.all([0, 1, 2, 3].map((n) => q.add("A", `g${n}`, { n })));
  await waitFor("g3", () => calls.includes("g3#1"));
  assert.deepEqual(calls, ["g0#1", "g1#1", "g1#2", "g1#3", "g2#1", "g2#2", "g2#3", "g3#1"]);
  const failed = await q.failedJobs();
  assert.deepEqual(
    failed.map((f) => [f.id, f.reason]),
    [
      ["g1", "gave up after 3 attempts: boom"],
      ["g2", "gave up after 3 attempts: still busy"],
    ],
  );
  // Failed items are kept in the failed list only; the batch itself completed.
  assert.equal((await q.counts()).completed, 1);
});

// --- add() --------------------------------------------------------------------------------------------

test("add() resolves once the item is in Redis; a shard's items gather in its newest waiting job", async (t) => {
  const s = scope(t);
  const redis = new Redis(REDIS_URL, { maxRetriesPerRequest: null });
  try {
    const q = s.make<{ n: number }>(async () => undefined, { name: "durable", shards: 4 });
    // Not started: nothing consumes, so what add() wrote stays in the wait list.
    let resolved = false;
    const p = Promise.all([
      q.add("!k:x", "d1", { n: 1 }),
      q.add("!k:x", "d2", { n: 2 }),
      q.add("!k:x", "d3", { n: 3 }),
    ]).then(() => (resolved = true));
    assert.equal(resolved, false);
    await p;
    const shardName = `durable-${shardOf("!k:x", 4)}`;
    const fresh = new Queue(shardName, { connection: redis, prefix: s.prefix });
    try {
      const jobs = await fresh.getWaiting();
      assert.equal(jobs.length, 1);
      const items = (jobs[0]!.data as { items: { at: number }[] }).items;
      assert.ok(
        items.every(({ at }) => Math.abs(Date.now() - at) < 5_000),
        "each item carries its enqueue time",
      );
      for (const item of items) delete (item as { at?: number }).at;
      assert.deepEqual(jobs[0]!.data, {
        items: [
          { id: "d1", key: "!k:x", data: { n: 1 } },
          { id: "d2", key: "!k:x", data: { n: 2 } },
          { id: "d3", key: "!k:x", data: { n: 3 } },
        ],
      });
      const ids = async () =>
        (await fresh.getWaiting()).map((j) => (j.data as { items: { id: string }[] }).items.map((i) => i.id));
      // Later writes join the job while it waits…
      await q.add("!k:x", "d4", { n: 4 });
      assert.deepEqual(await ids(), [["d1", "d2", "d3", "d4"]]);
      // …the same batch written again (a replayed transaction) is not stored twice…
      await q.add("!k:x", "d4", { n: 4 });
      assert.deepEqual(await ids(), [["d1", "d2", "d3", "d4"]]);
      // …a batch that would take the job over the size cap starts the next job…
      const big = "x".repeat(200 * 1024);
      await q.add("!k:x", "d5", { n: 5, big } as { n: number });
      assert.deepEqual(await ids(), [["d1", "d2", "d3", "d4"], ["d5"]]);
      // …and once the worker has taken the newest job, the next write is a new job behind it.
      const worker = new Worker(shardName, null, { connection: redis, prefix: s.prefix, autorun: false });
      try {
        assert.ok(await worker.getNextJob("t1")); // d1..d4
        assert.ok(await worker.getNextJob("t2")); // d5
        await q.add("!k:x", "d6", { n: 6 });
        assert.deepEqual(await ids(), [["d6"]]);
      } finally {
        await worker.close(true);
      }
    } finally {
      await fresh.close();
    }
  } finally {
    redis.disconnect();
  }
});

test("an identical batch added again (e.g. a replayed transaction) is stored and delivered once", async (t) => {
  const s = scope(t);
  const delivered: string[] = [];
  const q = s.make<{ n: number }>(
    async (_data, { id }) => {
      delivered.push(id);
    },
    { keepCompleted: 100 },
  );
  const batch = () => Promise.all([q.add("A", "x1", { n: 1 }), q.add("B", "x2", { n: 2 })]);
  // Replayed while the first copy still waits…
  await batch();
  await batch();
  assert.equal((await q.counts()).waiting, 1);
  await q.start();
  await waitFor("delivery", () => delivered.length >= 2);
  // …and after it completed (the completed job is kept, keepCompleted > 0).
  await batch();
  await sleep(200);
  assert.deepEqual([...delivered].sort(), ["x1", "x2"]);
  // The job id is the hash of the batch's ids: a batch that differs is a new job and is delivered,
  // repeated ids included (the consumer's idempotency on `id` covers that case).
  await Promise.all([q.add("A", "x1", { n: 1 }), q.add("A", "x3", { n: 3 })]);
  await waitFor("x3", () => delivered.includes("x3"));
  assert.deepEqual(delivered.slice(2), ["x1", "x3"]);
});

test("keptWhenDelivered: a completed job keeps what it says of its items, recorded as all delivered", async (t) => {
  const s = scope(t);
  const delivered: string[] = [];
  const q = s.make<{ text: string; bulk?: string }>(
    async (data) => {
      delivered.push(data.text);
    },
    { keptWhenDelivered: (data) => (data.bulk === undefined ? undefined : { text: data.text }) },
  );
  await Promise.all([
    q.add("A", "x1", { text: "one", bulk: "x".repeat(1000) }),
    q.add("A", "x2", { text: "two" }),
  ]);
  await q.start();
  await waitFor("delivery", () => delivered.length >= 2);
  const redis = new Redis(REDIS_URL, { maxRetriesPerRequest: null });
  const shard = new Queue("q-0", { connection: redis, prefix: s.prefix });
  s.onCleanup(async () => {
    await shard.close();
    redis.disconnect();
  });
  const [job] = await waitFor("the completed job", async () => {
    const jobs = await shard.getCompleted();
    return jobs.length > 0 && jobs;
  });
  assert.deepEqual(
    job!.data.items.map((i: { data: unknown }) => i.data),
    [{ text: "one" }, { text: "two" }],
  );
  assert.deepEqual(job!.progress, { done: [0, 1] });
  assert.deepEqual(delivered, ["one", "two"]);
});

test("dedupe of an identical batch lasts only as long as its completed job is kept", async (t) => {
  const s = scope(t);
  const delivered: string[] = [];
  const q = s.make<{ n: number }>(
    async (_data, { id }) => {
      delivered.push(id);
    },
    { keepCompleted: 0 },
  );
  await q.start();
  await q.add("A", "y1", { n: 1 });
  await waitFor("first", () => delivered.length === 1);
  await sleep(50);
  await q.add("A", "y1", { n: 1 });
  await waitFor("second", () => delivered.length === 2, 2_000);
  assert.deepEqual(delivered, ["y1", "y1"]);
});

// --- restarts and crashes -----------------------------------------------------------------------------

test("latest: of the items of one latest-key in a batch only the last is delivered; the rest in order", async (t) => {
  const s = scope(t);
  const delivered: string[] = [];
  let superseded = 0;
  const q = s.make<{ n: number }>(async (_d, { id }) => void delivered.push(id), {
    observe: {
      delivered: () => undefined,
      retried: () => undefined,
      failed: () => undefined,
      superseded: () => superseded++,
    },
  });
  // Queued while nothing consumes (as when delivery falls behind): one batch.
  await Promise.all([
    q.add("room", "t1", { n: 1 }, { latest: "temp" }),
    q.add("room", "plain1", { n: 2 }),
    q.add("room", "t2", { n: 3 }, { latest: "temp" }),
    q.add("room", "h1", { n: 4 }, { latest: "humidity" }),
    q.add("room", "t3", { n: 5 }, { latest: "temp" }),
    q.add("room", "plain2", { n: 6 }),
  ]);
  await q.start();
  await waitFor("the batch", () => delivered.length === 4);
  assert.deepEqual(delivered, ["plain1", "h1", "t3", "plain2"]);
  assert.equal(superseded, 2);
  // Once delivered, a new reading is delivered: only what waits together is skipped.
  await q.add("room", "t4", { n: 7 }, { latest: "temp" });
  await waitFor("t4", () => delivered.includes("t4"));
});

test("back-pressure: beyond maxBacklogBytes add() holds new items, and lets them in once the backlog drains", async (t) => {
  const s = scope(t);
  const delivered: string[] = [];
  const q = s.make<{ pad: string }>(async (_d, { id }) => void delivered.push(id), {
    maxBacklogBytes: 256 * 1024,
    backlogCheckMs: 300, // the first measure comes after the six adds below
  });
  // Nothing consumes yet. Items of 60 KiB: two fill a job, so six are three jobs, 384 KiB.
  const pad = "x".repeat(60 * 1024);
  for (let i = 0; i < 6; i++) await q.add("K", `b${i}`, { pad });
  await waitFor("the queue to hold new items", async () => (await q.backlog()).holding);
  let accepted = false;
  const late = q.add("K", "late", { pad }).then(() => (accepted = true));
  await sleep(200);
  assert.equal(accepted, false, "held while the backlog is full");
  await q.start();
  await late;
  await waitFor("everything delivered", () => delivered.includes("late"));
  assert.deepEqual(delivered, ["b0", "b1", "b2", "b3", "b4", "b5", "late"]);
  assert.equal((await q.backlog()).holding, false);
});

test("back-pressure counts real bytes: one item larger than a job's cap is enough to hold", async (t) => {
  const s = scope(t);
  const q = s.make<{ pad: string }>(async () => undefined, {
    maxBacklogBytes: 256 * 1024,
    backlogCheckMs: 20,
  });
  await q.add("K", "camera frame", { pad: "x".repeat(300 * 1024) }); // one job, over 256 KiB
  await waitFor("the queue to hold new items", async () => (await q.backlog()).holding);
});

test("back-pressure: adds still held when the queue stops are rejected, not left hanging", async (t) => {
  const s = scope(t);
  const q = s.make<{ pad: string }>(async () => undefined, { maxBacklogBytes: 1, backlogCheckMs: 20 });
  await q.add("K", "first", { pad: "" });
  await waitFor("the queue to hold new items", async () => (await q.backlog()).holding);
  const rejected = assert.rejects(q.add("K", "held", { pad: "" }), /queue q is stopping/);
  await s.stop(q as OrderedQueue<unknown>);
  await rejected;
});

test("stop() mid-retry puts the job back; a new queue resumes after what was delivered, in order", async (t) => {
  const s = scope(t);
  const first: string[] = [];
  const q1 = s.make<{ key: string; n: number }>(async (data, { attempt }) => {
    first.push(`${data.key}${data.n}#${attempt}`);
    if (data.key === "A" && data.n === 2) throw new Error("down");
  });
  await q1.start();
  const adds: Promise<void>[] = [];
  for (let n = 1; n <= 5; n++) adds.push(q1.add("A", `a${n}`, { key: "A", n }));
  for (let n = 1; n <= 3; n++) adds.push(q1.add("B", `b${n}`, { key: "B", n }));
  await Promise.all(adds);
  await waitFor("the first batch taken", () => first.length > 0); // a6, a7 are then a second job
  await Promise.all([q1.add("A", "a6", { key: "A", n: 6 }), q1.add("A", "a7", { key: "A", n: 7 })]);
  await waitFor("a2 retrying", () => first.includes("A2#3"));
  await s.stop(q1 as OrderedQueue<unknown>);
  assert.ok(!first.some((e) => /^A[3-7]/.test(e)), `A overtook its failing item: ${first.join(", ")}`);
  assert.deepEqual(
    first.filter((e) => e.startsWith("B")),
    ["B1#1", "B2#1", "B3#1"],
  );

  const second: string[] = [];
  const q2 = s.make<{ key: string; n: number }>(async (data, { attempt }) => {
    second.push(`${data.key}${data.n}#${attempt}`);
  });
  await q2.start();
  await waitFor("a7", () => second.includes("A7#1"));
  await sleep(100);
  // a1 and b1..b3 were recorded as delivered when the job was put back: not delivered again.
  // The attempt count starts over in the new process.
  assert.deepEqual(second, ["A2#1", "A3#1", "A4#1", "A5#1", "A6#1", "A7#1"]);
  assert.deepEqual(await q2.failedJobs(), []);
  const counts = await q2.counts();
  assert.equal(counts.completed, 2);
  assert.equal(counts.active, 0);
  assert.equal(counts.waiting, 0);
});

test("orphan recovery: a job left active with a live lock by a crashed holder runs first on restart", async (t) => {
  const s = scope(t);
  const conn = new Redis(REDIS_URL, { maxRetriesPerRequest: null });
  try {
    const shardName = "orphan-0";
    // Two batches of key A, nothing consuming but the "crashed" holder below, which took the first
    // job (lock for 30 s) before the second batch was written, recorded o1 as delivered, then died
    // holding the shard's lease.
    const producer = s.make<{ n: number }>(async () => undefined, { name: "orphan" });
    await Promise.all([1, 2, 3].map((n) => producer.add("A", `o${n}`, { n })));
    const crashed = new Worker(shardName, null, {
      connection: conn,
      prefix: s.prefix,
      autorun: false,
      lockDuration: 30_000,
    });
    const job = await crashed.getNextJob("dead-token");
    await Promise.all([4, 5].map((n) => producer.add("A", `o${n}`, { n })));
    await s.stop(producer as OrderedQueue<unknown>);
    assert.ok(job);
    assert.deepEqual(
      (job.data as { items: { id: string }[] }).items.map((i) => i.id),
      ["o1", "o2", "o3"],
    );
    await job.updateProgress({ done: [0] });
    await crashed.close(true);
    assert.equal(await conn.get(`${s.prefix}:${shardName}:${job.id}:lock`), "dead-token");
    await conn.set(`${s.prefix}:lease:${shardName}`, "inst-1", "PX", 10_000);

    const delivered: string[] = [];
    const q = s.make<{ n: number }>(
      async (_data, { id }) => {
        delivered.push(id);
      },
      { name: "orphan", instanceId: "inst-1" },
    );
    await q.start();
    await waitFor("o5", () => delivered.includes("o5"), 5_000);
    await sleep(100);
    // BullMQ alone would run the waiting job (o4, o5) first and the stalled one 30 s later.
    assert.deepEqual(delivered, ["o2", "o3", "o4", "o5"]);
    const counts = await q.counts();
    assert.equal(counts.completed, 2);
    assert.equal(counts.active, 0);
  } finally {
    conn.disconnect();
  }
});

test("crash: a process killed mid-item leaves its job to a restart with the same instanceId", async (t) => {
  const s = scope(t);
  const moduleUrl = new URL("../../src/queue/ordered-queue.ts", import.meta.url).href;
  const logUrl = new URL("../../src/log.ts", import.meta.url).href;
  // The child adds two batches of key A, consumes, and hangs on item 3 until it is killed.
  const code = `
    const { OrderedQueue } = await import(${JSON.stringify(moduleUrl)});
    const { moduleLogger } = await import(${JSON.stringify(logUrl)});
    const log = moduleLogger("child"); log.level = "silent";
    const q = new OrderedQueue({
      name: "crash", prefix: ${JSON.stringify(s.prefix)}, redisUrl: ${JSON.stringify(REDIS_URL)}, shards: 1,
      retry: { maxAttempts: 5, initialDelayMs: 10, maxDelayMs: 50 }, keepCompleted: 100, keepFailed: 100,
      instanceId: "inst-crash", log,
      process: async (data) => {
        process.stdout.write("delivered " + data.n + "\\n");
        if (data.n === 3) await new Promise(() => {});
      },
    });
    await Promise.all([1, 2, 3, 4, 5].map((n) => q.add("A", "c" + n, { n })));
    await Promise.all([6, 7].map((n) => q.add("A", "c" + n, { n })));
    await q.start();
  `;
  const child = spawn(process.execPath, ["--import", "tsx", "--input-type=module", "-e", code], {
    cwd: fileURLToPath(new URL("../../", import.meta.url)),
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, TRIBRIDGE_LOG_LEVEL: "silent" },
  });
  s.onCleanup(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  });
  let out = "";
  let err = "";
  child.stdout.on("data", (c: Buffer) => (out += c.toString()));
  child.stderr.on("data", (c: Buffer) => (err += c.toString()));
  await waitFor(
    "child to hang on item 3",
    () => out.includes("delivered 3\n") || child.exitCode !== null,
    15_000,
  );
  assert.equal(child.exitCode, null, `child exited: ${err}`);
  const exited = new Promise((r) => child.once("exit", r));
  child.kill("SIGKILL");
  await exited;
  assert.match(out, /^delivered 1\ndelivered 2\ndelivered 3\n$/);

  const delivered: number[] = [];
  const q = s.make<{ n: number }>(
    async (data) => {
      delivered.push(data.n);
    },
    { name: "crash", instanceId: "inst-crash" },
  );
  await q.start();
  await waitFor("item 7", () => delivered.includes(7), 5_000);
  await sleep(100);
  // At least once: the items since the last recorded progress come again, in order, then the rest.
  const start = delivered[0]!;
  assert.ok(start >= 1 && start <= 3, `resumed at ${start}`);
  assert.deepEqual(
    delivered,
    Array.from({ length: 8 - start }, (_, i) => start + i),
  );
});

test("lease: a second instance waits while another holds a shard, and takes over once it stops", async (t) => {
  const s = scope(t);
  const byA: string[] = [];
  const byB: string[] = [];
  const a = s.make<{ n: number }>(async (_d, { id }) => void byA.push(id), {
    instanceId: "inst-a",
    lease: SHORT_LEASE,
  });
  const b = s.make<{ n: number }>(async (_d, { id }) => void byB.push(id), {
    instanceId: "inst-b",
    lease: SHORT_LEASE,
  });
  await a.start();
  await b.start();
  await b.add("K", "l1", { n: 1 });
  await waitFor("l1", () => byA.includes("l1"));
  await sleep(100);
  assert.equal(byB.length, 0);
  await s.stop(a as OrderedQueue<unknown>);
  await b.add("K", "l2", { n: 2 });
  // b retries the lease every renewMs.
  await waitFor("l2 by b", () => byB.includes("l2"), 5_000);
  assert.deepEqual(byA, ["l1"]);
  assert.deepEqual(byB, ["l2"]);
});

test("lease: a shard whose lease lapsed (e.g. during a Redis outage) is taken back when nobody else holds it", async (t) => {
  const s = scope(t);
  const messages: string[] = [];
  const capture = pino(
    { level: "warn" },
    { write: (line: string) => void messages.push((JSON.parse(line) as { msg: string }).msg) },
  );
  const delivered: string[] = [];
  const q = s.make<{ n: number }>(async (_d, { id }) => void delivered.push(id), {
    log: capture,
    lease: SHORT_LEASE,
  });
  await q.start();
  await q.add("K", "before", { n: 1 });
  await waitFor("before", () => delivered.includes("before"));
  // The lease key lapses, as after a Redis restart or an outage longer than the lease.
  const redis = new Redis(REDIS_URL);
  await redis.del(`${s.prefix}:lease:q-0`);
  redis.disconnect();
  await waitFor("the lease renewal to notice", () => messages.some((m) => m.includes("lease lost")), 5_000);
  await q.add("K", "after", { n: 2 });
  // Another instance would retry the lease every renewMs; this one should too.
  await waitFor("an item added after the lease lapsed", () => delivered.includes("after"), 6_000);
});

test("the failed list is capped at keepFailed", async (t) => {
  const s = scope(t);
  const q = s.make<{ n: number }>(
    async () => {
      throw new PermanentError("no");
    },
    { keepFailed: 2 },
  );
  await q.start();
  await Promise.all([1, 2, 3, 4].map((n) => q.add("K", `f${n}`, { n })));
  const deadline = Date.now() + 5_000;
  while ((await q.counts()).completed !== 1 && Date.now() < deadline) await sleep(20);
  const failed = await q.failedJobs();
  assert.ok(failed.length <= 2, `failed list holds ${failed.length} items with keepFailed 2`);
});

test("queue.shards changed while items are queued: start refuses, naming the key; once drained it may change", async (t) => {
  const s = scope(t);
  const queued = s.make<Item>(async () => undefined, { shards: 4 });
  await queued.start();
  await s.stop(queued as OrderedQueue<unknown>);
  const producer = s.make<Item>(async () => undefined, { shards: 4 });
  await producer.add("!room", "i1", { n: 1 }); // queued, not consumed: producer not started
  await s.stop(producer as OrderedQueue<unknown>);

  const other = s.make<Item>(async () => undefined, { shards: 2 });
  await assert.rejects(
    other.start(),
    /queue\.shards: was 4 when the 1 batch\(es\) still queued in q were written/,
  );

  const delivered: number[] = [];
  const same = s.make<Item>(async (d) => void delivered.push(d.n), { shards: 4 });
  await same.start();
  await waitFor("delivered", () => delivered.length === 1);
  await s.stop(same as OrderedQueue<unknown>);
  const fewer: number[] = [];
  const changed = s.make<Item>(async (d) => void fewer.push(d.n), { shards: 2 });
  await changed.start(); // nothing queued any more: the count may change
  await changed.add("!room", "i2", { n: 2 });
  await waitFor("delivered with 2 shards", () => fewer.length === 1);
});

test("the failed list unwritable for a while: the item lands there once it can be written", async (t) => {
  const s = scope(t);
  const q = s.make<Item>(async () => {
    throw new PermanentError("refused");
  });
  const dead = (q as unknown as { dead: Queue }).dead;
  const add = dead.add.bind(dead);
  let refusals = 2;
  dead.add = ((...args: Parameters<Queue["add"]>) =>
    refusals-- > 0 ? Promise.reject(new Error("OOM command not allowed")) : add(...args)) as Queue["add"];
  await q.add("A", "lost?", { n: 1 });
  await q.start();
  const [failed] = await waitFor("the failed list", async () => {
    const jobs = await q.failedJobs();
    return jobs.length > 0 && jobs;
  });
  assert.equal(failed!.id, "lost?");
  assert.match(failed!.reason, /permanent: refused/);
});

test("a lease lost while the shard is still starting (waiting for an orphan's lock): the shard starts again", async (t) => {
  const s = scope(t);
  const redis = new Redis(REDIS_URL);
  s.onCleanup(async () => redis.disconnect());
  // An orphan: an active job whose lock another instance still holds for a few seconds.
  const shard = new Queue("q-0", { connection: redis, prefix: s.prefix });
  s.onCleanup(() => shard.close());
  await shard.add("relay", { items: [{ id: "orphan", key: "k", data: { n: 1 } }] }, { jobId: "jorphan" });
  await redis.lmove(`${s.prefix}:q-0:wait`, `${s.prefix}:q-0:active`, "RIGHT", "LEFT");
  await redis.set(`${s.prefix}:q-0:jorphan:lock`, "other-token", "PX", 2000);

  const delivered: string[] = [];
  const q = s.make<Item>(async (_d, { id }) => void delivered.push(id), {
    instanceId: "me",
    lease: SHORT_LEASE,
  });
  const starting = q.start();
  await waitFor("the lease", async () => (await redis.get(`${s.prefix}:lease:q-0`)) === "me");
  await redis.del(`${s.prefix}:lease:q-0`); // the lease lapses meanwhile (Redis lost it)
  await starting;
  await waitFor("the orphan", () => delivered.includes("orphan"), 20_000);
  await q.add("k", "fresh", { n: 2 });
  await waitFor("a new item, so the shard consumes again", () => delivered.includes("fresh"), 20_000);
  assert.deepEqual(delivered, ["orphan", "fresh"]);
});
