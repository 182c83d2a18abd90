/**
 * DestinationHealth alone (the gate's rules), then with OrderedQueue against the shared Redis:
 * failures that are not the message's do not use up its attempts, however many; a message the far
 * side fails on while others get through still does; rate limits wait as asked.
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import type { Logger } from "pino";
import { RetryableError, UnavailableError } from "../../src/errors.js";
import { DestinationGate, DestinationHealth } from "../../src/queue/destination-health.js";
import { OrderedQueue, type OrderedQueueOptions } from "../../src/queue/ordered-queue.js";
import { deleteKeys, waitFor } from "../helpers/fixture.js";
import { testQueueOptions } from "../helpers/queues.js";

/** A logger that keeps what is logged at info and above, as [level, message]. */
function recordingLog(): { log: Logger; lines: [string, string][] } {
  const lines: [string, string][] = [];
  const at = (level: string) => (_fields: unknown, msg: string) => void lines.push([level, msg]);
  const log = { debug: () => undefined, info: at("info"), warn: at("warn"), error: at("error") };
  return { log: log as unknown as Logger, lines };
}

const OPTIONS = { downAfterFailures: 3, maxProbeDelayMs: 40, stillDownLogMs: 1_000 };

function gate(log = recordingLog().log): DestinationGate {
  return new DestinationHealth({ ...OPTIONS, log }).gate("far");
}

const down = new UnavailableError("refused");

test("gate: open while up; a failure parks every relay, then lets one through at a time as the probe", async () => {
  const g = gate();
  const signal = new AbortController().signal;
  await g.admit(signal); // up: at once
  assert.equal(g.failed(down, g.mark), true);
  const admitted: number[] = [];
  const waiting = [1, 2, 3].map((n) => g.admit(signal).then(() => admitted.push(n)));
  await sleep(100);
  assert.deepEqual(admitted, [1], "one probe, the longest waiting");
  g.failed(down, g.mark); // the probe failed: the next one in line goes after the back-off
  await sleep(100);
  assert.deepEqual(admitted, [1, 2]);
  g.succeeded(); // the probe got through: open for all
  await Promise.all(waiting);
  assert.deepEqual(admitted, [1, 2, 3]);
  assert.equal(g.status().state, "up");
  g.stop();
});

test("gate: down (logged once) after downAfterFailures; 'still down' periodically; 'answers again' once", async () => {
  const { log, lines } = recordingLog();
  const g = gate(log);
  for (let i = 0; i < 5; i++) g.failed(down, g.mark);
  assert.equal(g.status().state, "down");
  await sleep(2_200);
  g.succeeded();
  const messages = lines.map(([, m]) => m);
  assert.deepEqual(messages, [
    "destination down; its messages wait (not counted as attempts) and it is probed until it answers",
    "destination still down",
    "destination still down",
    "destination answers again; delivery resumes",
  ]);
  g.stop();
});

test("gate: a failure while others got through since the attempt began is the relay's own", () => {
  const g = gate();
  const mark = g.mark;
  g.succeeded(); // another relay got through meanwhile
  assert.equal(g.failed(down, mark), false);
  assert.equal(g.status().state, "up");
  g.stop();
});

test("gate: a sign of life sends a probe at once; an aborted wait leaves the line", async () => {
  const g = new DestinationHealth({ ...OPTIONS, maxProbeDelayMs: 60_000, log: recordingLog().log }).gate(
    "far",
  );
  for (let i = 0; i < 6; i++) g.failed(down, g.mark); // the next probe is ~30–60 s away
  const aborted = new AbortController();
  const gone = g.admit(aborted.signal);
  const admitted = g.admit(new AbortController().signal);
  aborted.abort(new Error("stopping"));
  await assert.rejects(gone, /stopping/);
  assert.equal(g.status().waiting, 1);
  const start = Date.now();
  g.alive();
  await admitted;
  assert.ok(Date.now() - start < 500);
  g.stop();
});

// --- with the queue --------------------------------------------------------------------------------

function queueWithHealth<T>(
  t: TestContext,
  process: OrderedQueueOptions<T>["process"],
  maxAttempts = 3,
  more: Partial<OrderedQueueOptions<T>> = {},
) {
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  const health = new DestinationHealth({ ...OPTIONS, log: recordingLog().log });
  const q = new OrderedQueue<T>(
    testQueueOptions(prefix, process, {
      retry: { maxAttempts, initialDelayMs: 10, maxDelayMs: 20 },
      health,
      ...more,
    }),
  );
  t.after(async () => {
    await q.stop();
    health.stop();
    await deleteKeys(prefix);
  });
  return { q, health };
}

test("queue: 50 failures in a row with the destination down use up no attempt; the order holds", async (t) => {
  let failures = 50;
  const delivered: string[] = [];
  const { q, health } = queueWithHealth<{ n: number }>(t, async (data) => {
    if (failures-- > 0) throw new UnavailableError("far side down");
    delivered.push(`${data.n}`);
  });
  await q.start();
  for (let n = 0; n < 5; n++) await q.add("room", `i${n}`, { n });
  await waitFor("every item", () => delivered.length === 5, 20_000);
  assert.deepEqual(delivered, ["0", "1", "2", "3", "4"]);
  assert.deepEqual(await q.failedJobs(), []);
  assert.equal(health.statuses().q?.state, "up");
});

test("queue: a message the far side fails on while others get through uses up an attempt", async (t) => {
  const delivered: string[] = [];
  const { q } = queueWithHealth<{ n: number }>(
    t,
    async (data) => {
      if (data.n === 0) {
        await sleep(50);
        throw new UnavailableError("500 on this one");
      }
      await sleep(data.n * 10); // others keep getting through while it fails, again and again
      delivered.push(`${data.n}`);
    },
    1,
  );
  await q.start();
  // One batch: the others are delivered beside it, and get through between its failures.
  await Promise.all([
    q.add("poison", "p", { n: 0 }),
    ...Array.from({ length: 40 }, (_, i) => q.add(`room${i + 1}`, `i${i + 1}`, { n: i + 1 })),
  ]);
  await waitFor("the failed list", async () => (await q.failedJobs()).length === 1, 20_000);
  await waitFor("the others", () => delivered.length === 40);
});

test("queue: a relay in flight when the far side goes down is not counted, though another got through meanwhile", async (t) => {
  let outage = true;
  const delivered: number[] = [];
  const { q } = queueWithHealth<{ n: number }>(
    t,
    async (data) => {
      if (data.n === 0) {
        await sleep(50); // began before the outage; the other room's quick one gets through meanwhile
        if (outage) {
          outage = false;
          throw new UnavailableError("connection reset");
        }
      }
      delivered.push(data.n);
    },
    1,
  );
  await q.start();
  await Promise.all([q.add("slow", "s", { n: 0 }), q.add("quick", "q", { n: 1 })]);
  await waitFor("both", () => delivered.length === 2, 10_000);
  assert.deepEqual(await q.failedJobs(), []);
});

test("queue: Redis refusing writes (MISCONF) while a message is delivered waits for Redis, not counted", async (t) => {
  let refusals = 20;
  const delivered: number[] = [];
  const { q, health } = queueWithHealth<{ n: number }>(t, async (data) => {
    if (refusals-- > 0)
      throw Object.assign(new Error("MISCONF Errors writing to the AOF file: No space left on device"), {
        name: "ReplyError",
      });
    delivered.push(data.n);
  });
  await q.start();
  await q.add("room", "m", { n: 1 });
  await waitFor("delivery", () => delivered.length === 1, 20_000);
  assert.deepEqual(await q.failedJobs(), []);
  assert.equal(health.statuses().redis?.state, "up");
});

test("queue: a rate limit waits as long as asked, and is not an attempt", async (t) => {
  let limited = 5;
  const attempts: number[] = [];
  const { q } = queueWithHealth<{ n: number }>(t, async (_data, { attempt }) => {
    attempts.push(attempt);
    if (limited-- > 0) throw new RetryableError("slow down", 20, { cause: "rate-limited" });
  });
  await q.start();
  await q.add("room", "r", { n: 0 });
  await waitFor("delivery", () => attempts.length === 6, 10_000);
  assert.deepEqual(attempts, [1, 1, 1, 1, 1, 1]);
  assert.deepEqual(await q.failedJobs(), []);
});

test("queue: items added while the destination is down are told waiting at once, not when they reach the head", async (t) => {
  let down = true;
  const delivered: number[] = [];
  const told: number[] = [];
  const { q, health } = queueWithHealth<{ n: number }>(
    t,
    async (data) => {
      if (down) throw new UnavailableError("far side down");
      delivered.push(data.n);
    },
    3,
    { waiting: (data) => void told.push(data.n) },
  );
  await q.start();
  await q.add("room", "i0", { n: 0 });
  await waitFor("the destination found down", () => health.statuses().q?.state === "down");
  for (let n = 1; n <= 5; n++) await q.add("room", `i${n}`, { n });
  assert.deepEqual(told, [0, 1, 2, 3, 4, 5], "each told once, while the first is parked at the gate");
  down = false;
  await waitFor("every item", () => delivered.length === 6, 20_000);
  assert.deepEqual(delivered, [0, 1, 2, 3, 4, 5]);
  await q.add("room", "i6", { n: 6 });
  await waitFor("the item after", () => delivered.length === 7);
  assert.equal(told.length, 6, "not told of an item added once the destination is up");
});
