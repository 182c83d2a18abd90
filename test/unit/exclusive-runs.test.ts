/**
 * ConnectorContext.runExclusive (ExclusiveRuns, as src/app.ts builds it for each account) with two
 * instances on one real Redis: one runs, the other waits; a holder that dies is taken over once its
 * lease runs out, one that stops at once; a holder whose renewals fail has its run aborted before
 * anyone can take over. Short leases; every wait polls with a deadline.
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { Redis } from "ioredis";
import { moduleLogger } from "../../src/log.js";
import { ExclusiveRuns } from "../../src/queue/exclusive-runs.js";
import { REDIS_URL, deleteKeys, waitFor } from "../helpers/fixture.js";
import { startRedisServer } from "../helpers/redis-server.js";

const log = moduleLogger("exclusive-test");
log.level = "silent";

const LEASE_MS = 1_500;
const RENEW_MS = 250;

/** What the runs of one name did, over all instances: who runs now, and never two at once. */
class Tracker {
  readonly starts: { holder: string; at: number; signal: AbortSignal }[] = [];
  readonly running = new Set<string>();
  mostAtOnce = 0;

  /** A connector's run: it works until its signal aborts (or does `work`), then stops. */
  run(holder: string, work?: (signal: AbortSignal) => Promise<void>) {
    return async (signal: AbortSignal): Promise<void> => {
      this.starts.push({ holder, at: performance.now(), signal });
      this.running.add(holder);
      this.mostAtOnce = Math.max(this.mostAtOnce, this.running.size);
      try {
        if (work) return await work(signal);
        await new Promise((resolve) => signal.addEventListener("abort", resolve, { once: true }));
      } finally {
        this.running.delete(holder);
      }
    };
  }

  /** Started by `holder`, and not stopped since. */
  runs(holder: string): boolean {
    return this.running.has(holder) && this.running.size === 1;
  }
}

function scope(t: TestContext, redisUrl = REDIS_URL) {
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  const cleanups: (() => Promise<void>)[] = [];
  t.after(async () => {
    for (const c of cleanups.reverse()) await c().catch(() => undefined);
    if (redisUrl === REDIS_URL) await deleteKeys(prefix);
  });
  return {
    prefix,
    key: (name: string, account = "email.ops") => `${prefix}:lease:${account}:${name}`,
    onCleanup: (fn: () => Promise<void>) => void cleanups.push(fn),
    /** One tribridge instance's context for account `account`: its runExclusive and its signal. */
    instance(holder: string, account = "email.ops") {
      const redis = new Redis(redisUrl, { maxRetriesPerRequest: null });
      redis.on("error", () => undefined);
      const lifetime = new AbortController();
      const runs = new ExclusiveRuns({
        redis,
        prefix,
        account,
        holder,
        log,
        signal: lifetime.signal,
        leaseMs: LEASE_MS,
        renewMs: RENEW_MS,
      });
      cleanups.push(async () => {
        lifetime.abort();
        await runs.stop();
        redis.disconnect();
      });
      return { redis, runs, lifetime, runExclusive: runs.run.bind(runs) };
    },
  };
}

/** Counts the GETs a connection sends: each is one attempt to take a lease. */
function countGets(redis: Redis): () => number {
  let n = 0;
  const get = redis.get.bind(redis);
  redis.get = ((...args: Parameters<Redis["get"]>) => (n++, get(...args))) as Redis["get"];
  return () => n;
}

test("one instance runs it, the other waits; stopping the bridge hands it over at once", async (t) => {
  const s = scope(t);
  const inbox = new Tracker();
  const a = s.instance("A");
  const b = s.instance("B");
  const handleA = a.runExclusive("INBOX", inbox.run("A"));
  await waitFor("A running", () => inbox.runs("A"), 5_000);
  assert.equal(handleA.held, true);
  const attempts = countGets(b.redis);
  const handleB = b.runExclusive("INBOX", inbox.run("B"));
  await waitFor("B to try three times", () => attempts() >= 3, 5_000);
  assert.equal(handleB.held, false);
  assert.ok(inbox.runs("A"), "A still runs, alone");
  assert.equal(await a.redis.get(s.key("INBOX")), "A", "under <prefix>:lease:<connector>.<account>:<name>");

  const stopping = performance.now();
  a.lifetime.abort(); // the bridge stops (ctx.signal)
  await a.runs.stop();
  assert.equal(inbox.starts[0]!.signal.aborted, true);
  await waitFor("B running", () => inbox.runs("B"), 5_000);
  const handedOver = inbox.starts[1]!.at - stopping;
  assert.ok(handedOver < LEASE_MS, `B ran ${Math.round(handedOver)} ms after A stopped, not after A's lease`);
  assert.equal(handleB.held, true);
  assert.equal(inbox.mostAtOnce, 1);
});

test("the holder dies (no renewal, its lease not given up): the other runs it once the lease has run out", async (t) => {
  const s = scope(t);
  const inbox = new Tracker();
  const a = s.instance("A");
  const b = s.instance("B");
  a.runExclusive("INBOX", inbox.run("A"));
  await waitFor("A running", () => inbox.runs("A"), 5_000);
  const attempts = countGets(b.redis);
  b.runExclusive("INBOX", inbox.run("B"));
  await waitFor("B to try twice", () => attempts() >= 2, 5_000);
  assert.equal(inbox.starts.length, 1, "B waits while A holds");

  // A dies as far as Redis can tell: not one more command, and its key left in place.
  const died = performance.now();
  a.redis.disconnect();
  await waitFor("B running", () => inbox.starts.length === 2 && inbox.runs("B"), 10_000);
  const after = inbox.starts[1]!.at - died;
  // A renewed at most RENEW_MS before it died; its key lives LEASE_MS after that.
  assert.ok(after >= LEASE_MS - RENEW_MS - 50, `B ran ${Math.round(after)} ms after A died`);
  assert.equal(await b.redis.get(s.key("INBOX")), "B");
  // A, cut off, had stopped its own run by then: never two at once.
  assert.equal(inbox.starts[0]!.signal.aborted, true);
  assert.equal(inbox.mostAtOnce, 1);
});

test("Redis stops answering: the holder's run is aborted before its lease can expire; afterwards one runs", async (t) => {
  const server = await startRedisServer();
  const s = scope(t, server.url);
  s.onCleanup(() => server.stop()); // after the instances: their stop gives the lease back through it
  const inbox = new Tracker();
  const a = s.instance("A");
  const b = s.instance("B");
  a.runExclusive("INBOX", inbox.run("A"));
  await waitFor("A running", () => inbox.runs("A"), 5_000);
  b.runExclusive("INBOX", inbox.run("B"));

  const paused = performance.now();
  server.process.kill("SIGSTOP"); // renewals go unanswered
  await waitFor("A's run aborted", () => inbox.running.size === 0, 4 * LEASE_MS);
  const stoppedAfter = performance.now() - paused;
  assert.ok(stoppedAfter <= LEASE_MS + 200, `A stopped ${Math.round(stoppedAfter)} ms into the outage`);
  assert.match(String(inbox.starts[0]!.signal.reason), /lease lost: no renewal answered/);
  server.process.kill("SIGCONT");
  await waitFor("one instance running again", () => inbox.running.size === 1, 10_000);
  assert.equal(inbox.mostAtOnce, 1, "never two at once");
});

test("the key deleted or changed under the holder aborts its run; it runs again once it has the lease back", async (t) => {
  const s = scope(t);
  const redis = new Redis(REDIS_URL);
  s.onCleanup(async () => redis.disconnect());
  const inbox = new Tracker();
  const a = s.instance("A");
  a.runExclusive("INBOX", inbox.run("A"));
  await waitFor("A running", () => inbox.runs("A"), 5_000);
  await redis.set(s.key("INBOX"), "another-instance", "PX", 500);
  await waitFor("A's run aborted", () => inbox.running.size === 0, 5_000);
  assert.match(String(inbox.starts[0]!.signal.reason), /lease lost: the key expired or names another holder/);
  await waitFor("A running again", () => inbox.starts.length === 2 && inbox.runs("A"), 5_000);
  await redis.del(s.key("INBOX"));
  await waitFor("aborted again", () => inbox.starts[1]!.signal.aborted, 5_000);
  await waitFor("and running a third time", () => inbox.starts.length === 3 && inbox.runs("A"), 5_000);
});

test("a run that ends by itself while its lease is held runs again after a back-off, the lease kept", async (t) => {
  const s = scope(t);
  const inbox = new Tracker();
  const a = s.instance("A");
  let calls = 0;
  const handle = a.runExclusive(
    "INBOX",
    inbox.run("A", async (signal) => {
      if (++calls === 1) throw new Error("IMAP server said BYE");
      await new Promise((resolve) => signal.addEventListener("abort", resolve, { once: true }));
    }),
  );
  await waitFor("a second run", () => inbox.starts.length === 2, 5_000);
  const gap = inbox.starts[1]!.at - inbox.starts[0]!.at;
  assert.ok(gap >= 500, `ran again ${Math.round(gap)} ms later: after a back-off, not at once`);
  assert.equal(handle.held, true);
  assert.equal(await a.redis.get(s.key("INBOX")), "A");
  assert.equal(inbox.starts[0]!.signal.aborted, false, "the same holding");
});

test("a name runs once per account: again only after stop(); other names and accounts are their own", async (t) => {
  const s = scope(t);
  const inbox = new Tracker();
  const archive = new Tracker();
  const otherInbox = new Tracker();
  const a = s.instance("A");
  const handle = a.runExclusive("INBOX", inbox.run("A"));
  assert.throws(
    () => a.runExclusive("INBOX", inbox.run("A")),
    /runExclusive\("INBOX"\) already runs for email\.ops/,
  );
  a.runExclusive("Archive", archive.run("A"));
  s.instance("B", "email.other").runExclusive("INBOX", otherInbox.run("B"));
  await waitFor(
    "all three running",
    () => inbox.runs("A") && archive.runs("A") && otherInbox.runs("B"),
    5_000,
  );

  await handle.stop();
  assert.equal(inbox.running.size, 0);
  assert.equal(await a.redis.get(s.key("INBOX")), null, "handed over at once");
  assert.ok(archive.runs("A"), "the other name still runs");
  a.runExclusive("INBOX", inbox.run("A"));
  await waitFor("INBOX running again", () => inbox.runs("A"), 5_000);
});
