/**
 * Faults around the queue's shard leases, against real Redis servers: Redis away for longer than
 * a lease, and an instance stalled past its lease while another takes over. Order per room holds,
 * nothing is delivered twice, and no worker outlives its queue. Leases are short here (LEASE), so
 * outlasting one takes about two seconds, not twelve.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { randomUUID } from "node:crypto";
import { fileURLToPath } from "node:url";
import { setTimeout as sleep } from "node:timers/promises";
import { Redis } from "ioredis";
import { pino } from "pino";
import { OrderedQueue } from "../../src/queue/ordered-queue.js";
import { REDIS_URL, deleteKeys, waitFor } from "../helpers/fixture.js";
import { testQueueOptions } from "../helpers/queues.js";
import { startRedisServer } from "../helpers/redis-server.js";

const LEASE = { leaseMs: 2_000, renewMs: 400 };

/** Inversions and repeats in a delivery log of increasing numbers. */
function disorder(delivered: number[]): { inversions: number; repeats: number } {
  return {
    inversions: delivered.filter((v, i) => i > 0 && v < delivered[i - 1]!).length,
    repeats: delivered.length - new Set(delivered).size,
  };
}

test("Redis away for longer than a lease: one worker per shard when it is back, order kept, nothing twice", async (t) => {
  const { url, process: server, stop } = await startRedisServer(["--appendonly", "yes"]);
  const probe = new Redis(url);
  t.after(async () => {
    probe.disconnect();
    await stop();
  });

  const delivered: number[] = [];
  let inFlight = 0;
  let mostInFlight = 0;
  const warnings: string[] = [];
  const log = pino(
    { level: "warn" },
    { write: (line: string) => void warnings.push((JSON.parse(line) as { msg: string }).msg) },
  );
  const q = new OrderedQueue<{ n: number }>(
    testQueueOptions(
      "pause",
      async ({ n }) => {
        mostInFlight = Math.max(mostInFlight, ++inFlight);
        await sleep(50);
        delivered.push(n);
        inFlight--;
      },
      { redisUrl: url, lease: LEASE, log },
    ),
  );
  await q.start();
  const total = 150;
  let added = 0;
  const adding = (async () => {
    for (; added < total; added++) {
      await q.add("room", `i${added}`, { n: added });
      await sleep(20);
    }
  })();
  await waitFor("items flowing", () => delivered.length >= 10);
  server.kill("SIGSTOP"); // away: lease renewals queue up, the lease expires
  // Away until the queue has counted its lease lost (it may have expired in Redis by then).
  await waitFor("the lease lost", () => warnings.some((w) => w.includes("lease lost")), 4 * LEASE.leaseMs);
  await sleep(LEASE.renewMs); // and a little longer: past the expiry in Redis for certain
  server.kill("SIGCONT");
  await adding;
  await waitFor("every item", () => new Set(delivered).size === total, 60_000);
  await q.stop();

  assert.deepEqual(disorder(delivered), { inversions: 0, repeats: 0 });
  assert.equal(mostInFlight, 1, "one item of the room at a time");
  const ours = async () =>
    String(await probe.client("LIST"))
      .split("\n")
      .filter((line) => /name=tribridge-/.test(line) || /name=bull/.test(line));
  // Disconnecting is asynchronous on the server's side; a worker left running would stay.
  await waitFor("no connection of the queue outlives stop()", async () => (await ours()).length === 0, 5000);
});

test("an instance stalled past its lease: the other takes its shard over without delivering twice", async (t) => {
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  const redis = new Redis(REDIS_URL);
  const children: ChildProcess[] = [];
  t.after(async () => {
    for (const c of children) {
      c.kill("SIGCONT");
      c.kill("SIGKILL");
    }
    redis.disconnect();
    await deleteKeys(prefix);
  });
  const instance = (id: string) => {
    const child = spawn(
      process.execPath,
      [
        "--import",
        "tsx",
        fileURLToPath(new URL("../helpers/queue-instance.ts", import.meta.url)),
        prefix,
        id,
        String(LEASE.leaseMs),
        String(LEASE.renewMs),
      ],
      { stdio: "ignore", env: { ...process.env, TRIBRIDGE_LOG_LEVEL: "silent" } },
    );
    children.push(child);
    return child;
  };
  const entries = () => redis.lrange(`${prefix}:log`, 0, -1);
  const leaseHolder = () => redis.get(`${prefix}:lease:q-0`);
  // Two instances, both up (one holding the shard, the other waiting for it) before anything is
  // queued: their start-ups (seconds each on a busy machine) overlap and do not decide the timing.
  const started = { P: instance("P"), Q: instance("Q") };
  await waitFor("both instances", async () => (await redis.llen(`${prefix}:ready`)) === 2, 60_000);
  // A: the one that took the shard; B: the other.
  const aId = (await leaseHolder()) as "P" | "Q";
  const bId = aId === "P" ? "Q" : "P";
  const a = started[aId];
  const producer = new OrderedQueue<{ n: number }>(testQueueOptions(prefix, async () => undefined));
  const total = 80;
  await Promise.all(Array.from({ length: total }, (_, n) => producer.add("room", `i${n}`, { n })));
  await producer.stop();
  await waitFor("A delivering", async () => (await entries()).length >= 15, 20_000);
  a.kill("SIGSTOP"); // stalled: no lease renewal, no lock renewal
  // Past A's lease: B takes the shard, and waits for A's job lock.
  await waitFor("B to take the lease", async () => (await leaseHolder()) === bId, 30_000);
  a.kill("SIGCONT"); // A notices it lost the lease and stops between two items
  await waitFor(
    "every item",
    async () => new Set((await entries()).map((e) => e.slice(1))).size === total,
    60_000,
  );
  await sleep(500);

  const log_ = await entries();
  const delivered = log_.map((e) => Number(e.slice(1)));
  assert.deepEqual(disorder(delivered), { inversions: 0, repeats: 0 }, log_.join(" "));
  assert.ok(
    log_.some((e) => e.startsWith(bId)),
    "B took over",
  );
});
