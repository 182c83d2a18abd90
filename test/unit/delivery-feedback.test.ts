/**
 * DeliveryFeedback against real Redis and a recording stand-in for the homeserver that, like one,
 * answers a repeated transaction id with the event it made the first time: which marks go on, which
 * are taken back, and that repeats (a queue job run twice) change nothing. And the config's
 * `feedback`: a route's keys over the top-level ones, errors naming their path.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { Redis } from "ioredis";
import { randomUUID } from "node:crypto";
import { connectors } from "../../bridges/index.js";
import { ConfigErrors, validateConfig, type Config } from "../../src/config/load.js";
import { moduleLogger } from "../../src/log.js";
import { DeliveryFeedback } from "../../src/matrix/delivery-feedback.js";
import type { ToRemoteJob } from "../../src/matrix/event-intake.js";
import type { MatrixClient } from "../../src/matrix/matrix-client.js";
import { answerIn } from "../../src/matrix/remote-delivery.js";
import { RouteTable } from "../../src/routing/route-table.js";
import { redisKeys } from "../../src/store/keys.js";
import { REDIS_URL, deleteKeys } from "../helpers/fixture.js";

const ROOM = "!room:test.local";

function configWith(routes: unknown[], feedback?: unknown): Config {
  return validateConfig(
    {
      homeserver: { url: "http://127.0.0.1:8008", domain: "test.local" },
      bridges: { mqtt: { home: { url: "mqtt://127.0.0.1:1883" } } },
      ...(feedback === undefined ? {} : { feedback }),
      routes,
    },
    connectors,
  );
}

const endpoint = (topic: string) => ({ account: "mqtt.home", direction: "out", topic });

/** Records what the bot sends; a transaction id repeated gets the first event back. */
class FakeHomeserver {
  readonly sent: { type: string; key: string; relatesTo: string; eventId: string }[] = [];
  readonly redacted: string[] = [];
  private readonly byTxn = new Map<string, string>();
  private next = 0;

  readonly client = {
    sendAs: async (
      _sender: unknown,
      _room: string,
      type: string,
      content: Record<string, unknown>,
      txnId: string,
    ) => {
      const known = this.byTxn.get(txnId);
      if (known) return known;
      const eventId = `$mark${++this.next}`;
      this.byTxn.set(txnId, eventId);
      const relation = content["m.relates_to"] as { key: string; event_id: string };
      this.sent.push({ type, key: relation.key, relatesTo: relation.event_id, eventId });
      return eventId;
    },
    redactAsBot: async (_room: string, eventId: string, txnId: string) => {
      if (!this.byTxn.has(txnId)) {
        this.byTxn.set(txnId, `$redaction${++this.next}`);
        this.redacted.push(eventId);
      }
      return this.byTxn.get(txnId)!;
    },
  };

  /** The keys on `eventId` now: sent and not redacted. */
  keysOn(eventId: string): string[] {
    return this.sent
      .filter((s) => s.relatesTo === eventId && !this.redacted.includes(s.eventId))
      .map((s) => s.key);
  }
}

describe("delivery feedback", () => {
  let redis: Redis;
  const prefix = `test-${randomUUID().slice(0, 8)}`;

  before(() => {
    redis = new Redis(REDIS_URL);
  });
  after(async () => {
    redis.disconnect();
    await deleteKeys(prefix);
  });

  function setUp(config: Config) {
    const hs = new FakeHomeserver();
    const routes = new RouteTable(config.routes);
    const feedback = new DeliveryFeedback({
      matrix: hs.client as unknown as MatrixClient,
      bot: { userId: "@bot:test.local", displayName: "bot" },
      routes,
      defaults: config.feedback,
      redis,
      prefix,
      log: moduleLogger("test"),
    });
    const ids = config.routes.flatMap((r) => r.endpoints.map((e) => e.id));
    const job = (eventId: string, endpointId: string, endpoints = ids): ToRemoteJob => ({
      endpointId,
      endpoints,
      roomId: ROOM,
      sender: "@alice:test.local",
      content: { msgtype: "m.text", body: "hi" },
      timestamp: 0,
      eventId,
    });
    return { hs, feedback, ids, job };
  }

  test("one endpoint: ✅ once, however often the job runs", async () => {
    const { hs, feedback, ids, job } = setUp(
      configWith([{ id: "r", room: ROOM, endpoints: [endpoint("a")] }]),
    );
    const eventId = `$${randomUUID()}`;
    feedback.note(job(eventId, ids[0]!), "accepted");
    feedback.note(job(eventId, ids[0]!), "accepted");
    await feedback.settled();
    assert.deepEqual(hs.keysOn(eventId), ["✅"]);
    assert.equal(hs.sent.length, 1);
  });

  test("two endpoints: ⏳ while one waits, still ⏳ when one is through, ✅ and ⏳ taken back when both are", async () => {
    const config = configWith([{ id: "r", room: ROOM, endpoints: [endpoint("a"), endpoint("b")] }]);
    const { hs, feedback, ids, job } = setUp(config);
    const [a, b] = ids as [string, string];
    const eventId = `$${randomUUID()}`;
    feedback.note(job(eventId, a), "waiting");
    feedback.note(job(eventId, a), "waiting");
    await feedback.settled();
    assert.deepEqual(hs.keysOn(eventId), ["⏳"]);
    feedback.note(job(eventId, a), "accepted");
    await feedback.settled();
    assert.deepEqual(hs.keysOn(eventId), ["⏳"], "not all accepted yet");
    feedback.note(job(eventId, b), "accepted");
    await feedback.settled();
    assert.deepEqual(hs.keysOn(eventId), ["✅"]);
    const key = redisKeys.deliveryMarks(prefix, eventId);
    assert.deepEqual(await redis.hgetall(key), { done: "1" }, "only that it is done, kept once done");
    assert.ok((await redis.ttl(key)) <= 600);
    // A repeat of the last job: nothing new.
    feedback.note(job(eventId, b), "accepted");
    await feedback.settled();
    assert.equal(hs.sent.length, 2);
    assert.equal(hs.redacted.length, 1);
  });

  test("a waiting told after the message was done (another instance still saw the destination down) puts no mark", async () => {
    const config = configWith([{ id: "r", room: ROOM, endpoints: [endpoint("a")] }]);
    const { hs, feedback, ids, job } = setUp(config);
    const [a] = ids as [string];
    const eventId = `$${randomUUID()}`;
    feedback.note(job(eventId, a), "accepted");
    await feedback.settled();
    feedback.note(job(eventId, a), "waiting");
    await feedback.settled();
    assert.deepEqual(hs.keysOn(eventId), ["✅"]);
    assert.equal(hs.sent.length, 1);
  });

  test("a failure for good at one endpoint: no ✅, and the ⏳ taken back once the other is done", async () => {
    const config = configWith([{ id: "r", room: ROOM, endpoints: [endpoint("a"), endpoint("b")] }]);
    const { hs, feedback, ids, job } = setUp(config);
    const [a, b] = ids as [string, string];
    const eventId = `$${randomUUID()}`;
    feedback.note(job(eventId, a), "waiting");
    feedback.note(job(eventId, a), "failed");
    await feedback.settled();
    assert.deepEqual(hs.keysOn(eventId), ["⏳"], "b has not been tried yet");
    feedback.note(job(eventId, b), "accepted");
    await feedback.settled();
    assert.deepEqual(hs.keysOn(eventId), []);
  });

  test("a route's own keys, marks off, and edits not marked", async () => {
    const config = configWith(
      [
        { id: "own", room: ROOM, feedback: { accepted: "👍" }, endpoints: [endpoint("a")] },
        { id: "off", room: "!other:test.local", feedback: { marks: "off" }, endpoints: [endpoint("b")] },
      ],
      { waiting: "🕐" },
    );
    assert.deepEqual(config.routes[0]!.feedback, { marks: "reaction", accepted: "👍", waiting: "🕐" });
    const { hs, feedback, ids, job } = setUp(config);
    const [own, off] = ids as [string, string];
    const first = `$${randomUUID()}`;
    feedback.note(job(first, own, [own]), "waiting");
    feedback.note(job(first, own, [own]), "accepted");
    const second = `$${randomUUID()}`;
    feedback.note(job(second, off, [off]), "accepted");
    const edit = `$${randomUUID()}`;
    feedback.note({ ...job(edit, own, [own]), kind: "edit" }, "accepted");
    await feedback.settled();
    assert.deepEqual(
      hs.sent.map((s) => s.key),
      ["🕐", "👍"],
    );
    assert.deepEqual(hs.keysOn(first), ["👍"]);
  });

  test("config: a bad feedback key names its path", () => {
    assert.throws(
      () => configWith([{ id: "r", room: ROOM, feedback: { marks: "emoji" }, endpoints: [endpoint("a")] }]),
      (err: unknown) =>
        err instanceof ConfigErrors &&
        err.errors.some((e) => e.message.startsWith("routes[0].feedback.marks:")),
    );
    assert.throws(
      () => configWith([{ id: "r", room: ROOM, endpoints: [endpoint("a")] }], { accepted: "" }),
      (err: unknown) =>
        err instanceof ConfigErrors &&
        err.errors.some((e) => e.message === "feedback.accepted: must not be empty"),
    );
  });
});

describe("answering a message in its thread (Client-Server API §Threading)", () => {
  const reply = (id: string) => ({ "m.in_reply_to": { event_id: id } });

  test("a message in no thread is the root; the reply is the fallback", () => {
    assert.deepEqual(answerIn("$m", { body: "hi" }), {
      rel_type: "m.thread",
      event_id: "$m",
      is_falling_back: true,
      ...reply("$m"),
    });
    // A rich reply is no relation (no rel_type): it may be a root.
    assert.equal(answerIn("$m", { "m.relates_to": reply("$x") }).rel_type, "m.thread");
  });

  test("a message in a thread: answered in that thread, replying to it", () => {
    const content = {
      "m.relates_to": { rel_type: "m.thread", event_id: "$root", is_falling_back: true, ...reply("$root") },
    };
    assert.deepEqual(answerIn("$m", content), {
      rel_type: "m.thread",
      event_id: "$root",
      is_falling_back: false,
      ...reply("$m"),
    });
  });

  test("an event with another relation, or an unknown one: a plain reply", () => {
    assert.deepEqual(
      answerIn("$m", { "m.relates_to": { rel_type: "m.reference", event_id: "$x" } }),
      reply("$m"),
    );
    assert.deepEqual(answerIn("$m", undefined), reply("$m"));
  });
});
