/**
 * Lease against the shared Redis, with short timings: one holder at a time, takeover at once after
 * a stop and after the lease time when the holder dies, loss noticed (key changed, no renewal
 * answered), and attempts that fail or hang tried again. Each test uses its own key prefix.
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { Redis } from "ioredis";
import { moduleLogger } from "../../src/log.js";
import { Lease, type LeaseHolding } from "../../src/queue/lease.js";
import { REDIS_URL, deleteKeys, waitFor } from "../helpers/fixture.js";

const log = moduleLogger("lease-test");
log.level = "silent";

const LEASE_MS = 1_500;
const RENEW_MS = 250;

interface Probe {
  lease: Lease;
  redis: Redis;
  holdings: LeaseHolding[];
  acquiredAt: number[];
  releasedAt: number[];
  abortedAt: number[];
}

function scope(t: TestContext) {
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  const key = `${prefix}:lease:thing`;
  const made: Probe[] = [];
  t.after(async () => {
    for (const p of made) {
      await p.lease.stop().catch(() => undefined);
      p.redis.disconnect();
    }
    await deleteKeys(prefix);
  });
  return {
    key,
    make(
      holder: string,
      over: {
        acquired?: (h: LeaseHolding) => Promise<void>;
        released?: () => Promise<void>;
        redis?: Redis;
      } = {},
    ): Probe {
      const redis = over.redis ?? new Redis(REDIS_URL, { maxRetriesPerRequest: null });
      const probe: Probe = {
        redis,
        holdings: [],
        acquiredAt: [],
        releasedAt: [],
        abortedAt: [],
        lease: new Lease({
          redis,
          key,
          holder,
          leaseMs: LEASE_MS,
          renewMs: RENEW_MS,
          log,
          acquired: async (holding) => {
            probe.holdings.push(holding);
            probe.acquiredAt.push(performance.now());
            holding.signal.addEventListener("abort", () => probe.abortedAt.push(performance.now()));
            await over.acquired?.(holding);
          },
          released: async () => {
            probe.releasedAt.push(performance.now());
            await over.released?.();
          },
        }),
      };
      made.push(probe);
      return probe;
    },
  };
}

/** Counts the GETs a connection sends: each is one attempt to take the lease. */
function countGets(redis: Redis): () => number {
  let n = 0;
  const get = redis.get.bind(redis);
  redis.get = ((...args: Parameters<Redis["get"]>) => (n++, get(...args))) as Redis["get"];
  return () => n;
}

test("one holder at a time; the other takes over at once when the holder stops", async (t) => {
  const s = scope(t);
  const a = s.make("A");
  await a.lease.start();
  assert.equal(a.lease.held, true);
  assert.equal(a.holdings[0]!.restarted, false);

  const b = s.make("B");
  const attempts = countGets(b.redis);
  await b.lease.start();
  await waitFor("B to try three times", () => attempts() >= 3, 5_000);
  assert.equal(b.lease.held, false);
  assert.equal(b.acquiredAt.length, 0);
  assert.equal(a.abortedAt.length, 0, "A kept renewing meanwhile");

  const stopping = performance.now();
  await a.lease.stop();
  assert.equal(a.holdings[0]!.signal.aborted, true);
  assert.match(String(a.holdings[0]!.signal.reason), /stopping/);
  assert.equal(a.releasedAt.length, 1);
  await waitFor("B to take over", () => b.lease.held, 5_000);
  assert.ok(
    b.acquiredAt[0]! - stopping < LEASE_MS,
    `taken over ${Math.round(b.acquiredAt[0]! - stopping)} ms after the stop, before A's lease ran out`,
  );
  assert.equal(await b.redis.get(s.key), "B");
});

test("a holder that dies (no renewal, key not given up) is taken over once its lease runs out", async (t) => {
  const s = scope(t);
  const a = s.make("A");
  await a.lease.start();
  const b = s.make("B");
  await b.lease.start();
  assert.equal(b.lease.held, false);

  // A dies to Redis: no renewal, no more commands, and the key is not given up.
  const died = performance.now();
  a.redis.disconnect();
  await waitFor("B to take over", () => b.lease.held, 10_000);
  const after = b.acquiredAt[0]! - died;
  assert.ok(after >= LEASE_MS - RENEW_MS - 50, `taken over ${Math.round(after)} ms after A's last renewal`);
  // A counted its lease lost without any answer from Redis, by the time it may have expired there.
  await waitFor("A's signal", () => a.abortedAt.length === 1, 5_000);
  assert.match(String(a.holdings[0]!.signal.reason), /lease lost: no renewal answered within 1500 ms/);
  assert.ok(a.abortedAt[0]! - died <= LEASE_MS + 100, "A stops no later than its lease runs out");
  assert.equal(a.releasedAt.length, 1);
  assert.equal(a.lease.held, false);
});

test("the key changed under the holder: its signal aborts; it takes the lease again once free", async (t) => {
  const s = scope(t);
  const a = s.make("A");
  await a.lease.start();
  const redis = new Redis(REDIS_URL);
  t.after(() => redis.disconnect());
  await redis.set(s.key, "intruder", "PX", 600);
  await waitFor("A to notice", () => a.abortedAt.length === 1, 5_000);
  assert.match(String(a.holdings[0]!.signal.reason), /lease lost: the key expired or names another holder/);
  await waitFor("A released", () => a.releasedAt.length === 1);
  assert.equal(a.lease.held, false);
  await waitFor("A to take it again", () => a.lease.held, 5_000);
  assert.equal(a.holdings.length, 2);
  assert.equal(a.holdings[1]!.restarted, false, "our own key, not an earlier process's");
  assert.equal(a.holdings[1]!.signal.aborted, false);

  await redis.del(s.key); // lapsed, as after a Redis restart
  await waitFor("A to notice again", () => a.abortedAt.length === 2, 5_000);
  await waitFor("and take it once more", () => a.holdings.length === 3 && a.lease.held, 5_000);
});

test("a key left with our id by an earlier process is taken back at once, as restarted", async (t) => {
  const s = scope(t);
  const redis = new Redis(REDIS_URL);
  t.after(() => redis.disconnect());
  await redis.set(s.key, "A", "PX", 60_000);
  const b = s.make("B");
  await b.lease.start();
  assert.equal(b.lease.held, false);
  const a = s.make("A");
  await a.lease.start();
  assert.equal(a.lease.held, true);
  assert.equal(a.holdings[0]!.restarted, true);
  await a.lease.stop();
  assert.equal(await redis.get(s.key), null, "given up at stop");
});

test("attempts that fail or hang are tried again until the lease is taken", async (t) => {
  const s = scope(t);
  const redis = new Redis(REDIS_URL, { maxRetriesPerRequest: null });
  const get = redis.get.bind(redis);
  let calls = 0;
  redis.get = ((...args: Parameters<Redis["get"]>) => {
    calls++;
    if (calls === 1) return Promise.reject(new Error("LOADING Redis is loading the dataset"));
    if (calls === 2) return new Promise(() => undefined); // no answer, ever
    return get(...args);
  }) as Redis["get"];
  const a = s.make("A", { redis });
  await a.lease.start(); // the first attempt failed: logged, not thrown
  assert.equal(a.lease.held, false);
  await waitFor("the lease", () => a.lease.held, 10_000);
  assert.equal(calls, 3);
});

test("acquired rejecting gives the lease up (another may take it) and it is tried again", async (t) => {
  const s = scope(t);
  let starts = 0;
  const a = s.make("A", {
    acquired: async () => {
      if (++starts === 1) throw new Error("could not open the mailbox");
    },
  });
  await a.lease.start();
  assert.equal(a.lease.held, false);
  assert.equal(a.releasedAt.length, 1);
  assert.equal(a.holdings[0]!.signal.aborted, true);
  assert.equal(await a.redis.get(s.key), null, "given up, not left to lapse");
  await waitFor("the second start", () => a.lease.held, 5_000);
  assert.equal(starts, 2);
});

test("a lease lost while acquired still runs: released only after acquired has settled", async (t) => {
  const s = scope(t);
  const settledAt: number[] = [];
  const a = s.make("A", {
    acquired: async ({ signal }) => {
      await new Promise((r) => signal.addEventListener("abort", r, { once: true }));
      await new Promise((r) => setTimeout(r, 50)); // winding down takes a moment
      settledAt.push(performance.now());
    },
  });
  const starting = a.lease.start();
  await waitFor("acquired", () => a.holdings.length === 1);
  const redis = new Redis(REDIS_URL);
  t.after(() => redis.disconnect());
  await redis.del(s.key);
  await starting;
  await waitFor("released", () => a.releasedAt.length === 1, 5_000);
  assert.ok(a.releasedAt[0]! >= settledAt[0]!, "released after acquired settled");
  await waitFor("taken again", () => a.holdings.length === 2, 5_000);
});

test("renewMs must be below leaseMs", () => {
  const redis = new Redis(REDIS_URL, { lazyConnect: true });
  const opts = { redis, key: "k", holder: "h", log, acquired: async () => {}, released: async () => {} };
  assert.throws(() => new Lease({ ...opts, leaseMs: 1000, renewMs: 1000 }), /renewMs \(1000\) must be/);
  assert.throws(() => new Lease({ ...opts, leaseMs: 1000, renewMs: 0 }), /renewMs \(0\) must be/);
  assert.equal(new Lease(opts).leaseMs, 10_000);
  redis.disconnect();
});

test("a wind-down that never ends (released hangs) or an acquired that hangs past its abort: the lease is competed for again", async (t) => {
  const s = scope(t);
  const redis = new Redis(REDIS_URL);
  t.after(() => redis.disconnect());
  let hang = true;
  const a = s.make("A", {
    // The first holding's start never settles, and neither does its wind-down (a BullMQ worker
    // whose close waits for a connection that never comes back).
    acquired: () => (hang ? new Promise<void>(() => undefined) : Promise.resolve()),
    released: () => (hang ? new Promise<void>(() => undefined) : Promise.resolve()),
  });
  void a.lease.start();
  await waitFor("A to take it", () => a.holdings.length === 1, 5_000);
  hang = false;
  await redis.del(s.key); // lapsed, as after a Redis restart
  await waitFor("A to notice", () => a.abortedAt.length === 1, 5_000);
  await waitFor("A to take it again", () => a.holdings.length === 2 && a.lease.held, 4 * LEASE_MS);
});

test("abandon gives the lease up (another may take it) and competes for it again", async (t) => {
  const s = scope(t);
  const a = s.make("A");
  await a.lease.start();
  assert.equal(a.lease.held, true);
  await a.lease.abandon("its worker stopped consuming");
  assert.equal(a.lease.held, false);
  const b = s.make("B");
  await b.lease.start();
  assert.equal(b.lease.held, true, "the key was given up");
  assert.equal(a.lease.heldElsewhere, false, "A has not looked yet");
  await waitFor("A to see B holding it", () => a.lease.heldElsewhere, 5_000);
  await b.lease.stop();
  await waitFor("A to take it again", () => a.lease.held, 5_000);
});
