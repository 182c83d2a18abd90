/** SeenEvents against real Redis, with short timings: claims, waits, releases, lapses and renewals. */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import { Redis } from "ioredis";
import { RetryableError } from "../../src/errors.js";
import { redisKeys } from "../../src/store/keys.js";
import { SeenEvents } from "../../src/store/seen-events.js";
import { REDIS_URL, deleteKeys } from "../helpers/fixture.js";

describe("SeenEvents", () => {
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  let redis: Redis;
  const seen = (timings = {}) =>
    new SeenEvents(redis, prefix, 60, { claimMs: 300, waitMs: 1_000, pollMs: 10, ...timings });

  /** Waits until someone holds a claim on the event. */
  async function claimed(eventId: string): Promise<void> {
    const deadline = Date.now() + 5_000;
    while (!((await redis.get(redisKeys.seenEvent(prefix, eventId))) ?? "").startsWith("claim:")) {
      if (Date.now() > deadline) throw new Error(`no claim on ${eventId}`);
      await sleep(5);
    }
  }

  before(() => {
    redis = new Redis(REDIS_URL);
  });
  after(async () => {
    redis.disconnect();
    await deleteKeys(prefix);
  });

  test("runs the work once; later calls see it done", async () => {
    const s = seen();
    let runs = 0;
    assert.equal(await s.once("$a", async () => void runs++), true);
    assert.equal(await s.once("$a", async () => void runs++), false);
    assert.equal(runs, 1);
    assert.equal(await redis.get(redisKeys.seenEvent(prefix, "$a")), "1");
  });

  test("an event marked done before claims existed ('1') counts as done", async () => {
    await redis.set(redisKeys.seenEvent(prefix, "$old"), "1");
    assert.equal(await seen().once("$old", async () => assert.fail("ran again")), false);
  });

  test("a caller waits for another's claim: done → skipped; failed → it does the work itself", async () => {
    const [a, b] = [seen(), seen()];
    let release!: () => void;
    const first = a.once("$b", () => new Promise<void>((r) => (release = r)));
    await claimed("$b");
    const second = b.once("$b", async () => assert.fail("ran twice"));
    await sleep(50); // (so that it is waiting, most likely; the outcome is the same if not)
    release();
    assert.deepEqual(await Promise.all([first, second]), [true, false]);

    let fail!: (err: Error) => void;
    const failing = a.once("$c", () => new Promise<void>((_, reject) => (fail = reject)));
    await claimed("$c");
    let ran = false;
    const retry = b.once("$c", async () => void (ran = true));
    await sleep(50);
    fail(new Error("enqueue failed"));
    await assert.rejects(failing, /enqueue failed/);
    assert.equal(await retry, true);
    assert.equal(ran, true);
  });

  test("a claim held longer than waitMs → RetryableError (the homeserver tries again later)", async () => {
    let release!: () => void;
    const holder = seen().once("$d", () => new Promise<void>((r) => (release = r)));
    await claimed("$d");
    await assert.rejects(
      seen({ waitMs: 200 }).once("$d", async () => assert.fail("ran twice")),
      (err: unknown) => err instanceof RetryableError,
    );
    release();
    assert.equal(await holder, true);
  });

  test("a running work renews its claim; a crashed holder's claim lapses after claimMs", async () => {
    let release!: () => void;
    const long = seen().once("$e", () => new Promise<void>((r) => (release = r)));
    await sleep(700); // more than two claimMs
    assert.match((await redis.get(redisKeys.seenEvent(prefix, "$e"))) ?? "", /^claim:/);
    release();
    assert.equal(await long, true);

    // A claim no one renews or releases (its instance died).
    await redis.set(redisKeys.seenEvent(prefix, "$f"), "claim:dead", "PX", 300);
    let ran = false;
    assert.equal(await seen().once("$f", async () => void (ran = true)), true);
    assert.equal(ran, true);
  });
});
