/**
 * Replies, threads, edits and redactions, both ways, through the test homeserver with test
 * connectors (Client-Server API §Rich replies, §Threading, §Event replacements, §Redactions):
 * the core maps event ids ⇄ remote ids per account.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { start, type RunningBridge } from "../../src/app.js";
import { harness, waitFor, type Harness } from "../helpers/fixture.js";
import type { RecordedEvent } from "../helpers/test-homeserver.js";
import { testConnector, type TestConnector } from "../helpers/test-connector.js";

type Relates = {
  rel_type?: string;
  event_id?: string;
  is_falling_back?: boolean;
  "m.in_reply_to"?: { event_id?: string };
};
const relatesTo = (e: RecordedEvent | undefined) => e?.content["m.relates_to"] as Relates | undefined;

describe("replies, threads, edits and redactions", () => {
  const connectors = [
    // Mail-like: conversations, edits and redactions.
    testConnector({ threads: true, edits: true, redactions: true }, "test"),
    // Neither edits nor redactions.
    testConnector({}, "plain"),
    // Says it takes both, but has no edit/redact members.
    testConnector({ edits: true, redactions: true }, "bare", true),
  ];
  let h: Harness;
  let bridge: RunningBridge;
  let room: string;
  let remote: TestConnector;
  let plain: TestConnector;
  let bare: TestConnector;
  let n = 0;

  before(async () => {
    h = await harness({
      connectors,
      bridges: { test: { a: {} }, plain: { b: {} }, bare: { c: {} } },
      routes: [
        {
          id: "chat",
          room: "#chat:test.local",
          endpoints: [
            { account: "test.a", direction: "inout", channel: "general" },
            { account: "test.a", direction: "in", channel: "readings", live: true },
            { account: "plain.b", direction: "inout", channel: "general" },
            { account: "bare.c", direction: "out", channel: "general" },
          ],
        },
      ],
    });
    room = h.hs.createRoom({ creator: h.alice, alias: "#chat:test.local", preset: "public_chat" });
    bridge = await start({ config: h.config, registration: h.registration, connectors });
    remote = bridge.connector("test.a") as TestConnector;
    plain = bridge.connector("plain.b") as TestConnector;
    bare = bridge.connector("bare.c") as TestConnector;
  });

  after(async () => {
    await bridge?.stop();
    await h?.cleanup();
  });

  /** A remote message on test.a's `general`; resolves with the event it became. */
  async function fromRemote(
    fields: { remoteId: string; replyTo?: string; thread?: string },
    channel = "general",
  ) {
    const text = `remote ${++n}`;
    await remote.emit(channel, { ...fields, sender: { id: "bob", displayName: "Bob" }, body: { text } });
    return waitFor(`"${text}" in the room`, () => h.hs.messages(room).find((m) => m.content.body === text));
  }

  /** Alice says something; resolves with its event id and what test.a's `send` returned for it. */
  async function fromAlice(content: Record<string, unknown> = {}) {
    const text = `alice ${++n}`;
    const eventId = h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: text, ...content });
    const sent = await waitFor(`"${text}" sent`, () => remote.sent.find((s) => s.message.body.text === text));
    return { eventId, sent };
  }

  /** Resolves once everything queued so far for `c` is handled: a later message reached it. */
  async function drained(c: TestConnector) {
    const text = `marker ${++n}`;
    h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: text });
    await waitFor(`marker at ${c.account}`, () => c.sent.some((s) => s.message.body.text === text));
  }

  test("[spec: rich replies] a Matrix reply to a remote message carries the message's remote id, for its account only", async () => {
    const original = await fromRemote({ remoteId: "r-1" });
    const { sent } = await fromAlice({
      "m.relates_to": { "m.in_reply_to": { event_id: original.event_id } },
    });
    assert.equal(sent.message.replyTo, "r-1");
    assert.equal(sent.message.thread, undefined);
    const text = sent.message.body.text;
    const atPlain = await waitFor("at plain", () => plain.sent.find((s) => s.message.body.text === text));
    assert.equal(atPlain.message.replyTo, undefined, "plain.b never saw r-1");
  });

  test("a remote reply to a Matrix message becomes a Matrix reply to its event", async () => {
    const { eventId, sent } = await fromAlice();
    const reply = await fromRemote({ remoteId: "r-2", replyTo: sent.remoteId });
    assert.deepEqual(relatesTo(reply), { "m.in_reply_to": { event_id: eventId } });
    // Moments later, answering the reply: its remote id resolves too.
    const { sent: back } = await fromAlice({
      "m.relates_to": { "m.in_reply_to": { event_id: reply.event_id } },
    });
    assert.equal(back.message.replyTo, "r-2");
  });

  test("a reply to a message sent just before resolves (the room's order holds)", async () => {
    const first = h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "quick 1" });
    h.hs.sendMessage(room, h.alice, {
      msgtype: "m.text",
      body: "quick 2",
      "m.relates_to": { "m.in_reply_to": { event_id: first } },
    });
    const second = await waitFor("quick 2", () => remote.sent.find((s) => s.message.body.text === "quick 2"));
    const firstSent = remote.sent.find((s) => s.message.body.text === "quick 1")!;
    assert.equal(second.message.replyTo, firstSent.remoteId);
  });

  test("[spec: threading] a thread round-trips both ways: m.thread to the root, replies inside it", async () => {
    const root = await fromRemote({ remoteId: "r-root" });
    // Alice answers in a thread on the remote message (a thread-aware client's fallback reply).
    const { eventId: aliceInThread, sent } = await fromAlice({
      "m.relates_to": {
        rel_type: "m.thread",
        event_id: root.event_id,
        is_falling_back: true,
        "m.in_reply_to": { event_id: root.event_id },
      },
    });
    assert.equal(sent.message.thread, "r-root");
    assert.equal(sent.message.replyTo, "r-root", "the fallback reply names the latest in the thread");

    // The far side answers Alice's thread message: a reply inside the thread.
    const reply = await fromRemote({ remoteId: "r-t1", replyTo: sent.remoteId, thread: "r-root" });
    assert.deepEqual(relatesTo(reply), {
      rel_type: "m.thread",
      event_id: root.event_id,
      is_falling_back: false,
      "m.in_reply_to": { event_id: aliceInThread },
    });
    // Without a thread of its own: the original's thread still holds it.
    const again = await fromRemote({ remoteId: "r-t2", replyTo: "r-t1" });
    assert.equal(relatesTo(again)?.rel_type, "m.thread");
    assert.equal(relatesTo(again)?.event_id, root.event_id);
    assert.equal(relatesTo(again)?.["m.in_reply_to"]?.event_id, reply.event_id);

    // Only the conversation: in the thread, falling back to a reply to the root.
    const inConversation = await fromRemote({ remoteId: "r-t3", thread: "r-root" });
    assert.deepEqual(relatesTo(inConversation), {
      rel_type: "m.thread",
      event_id: root.event_id,
      is_falling_back: true,
      "m.in_reply_to": { event_id: root.event_id },
    });
    // A "root" that is itself in a thread stands for its thread's root (threads do not nest).
    const nested = await fromRemote({ remoteId: "r-t4", thread: "r-t1" });
    assert.equal(relatesTo(nested)?.event_id, root.event_id);

    // Back out: a Matrix reply inside the thread carries both remote ids.
    const { sent: out } = await fromAlice({
      "m.relates_to": {
        rel_type: "m.thread",
        event_id: root.event_id,
        is_falling_back: false,
        "m.in_reply_to": { event_id: reply.event_id },
      },
    });
    assert.equal(out.message.thread, "r-root");
    assert.equal(out.message.replyTo, "r-t1");
  });

  test("a thread started on a Matrix message: the far side's conversation root maps to it", async () => {
    const { eventId, sent } = await fromAlice();
    const answer = await fromRemote({ remoteId: "r-m1", replyTo: sent.remoteId, thread: sent.remoteId });
    assert.deepEqual(relatesTo(answer), {
      rel_type: "m.thread",
      event_id: eventId,
      is_falling_back: false,
      "m.in_reply_to": { event_id: eventId },
    });
  });

  test("unknown references degrade to a plain message; live endpoints ignore them", async () => {
    const unknown = await fromRemote({ remoteId: "r-u1", replyTo: "never-seen", thread: "nor-this" });
    assert.equal(relatesTo(unknown), undefined);
    const live = await fromRemote({ remoteId: "r-u2", replyTo: "r-1", thread: "r-root" }, "readings");
    assert.equal(relatesTo(live), undefined);
    // A Matrix reply to an event no account relayed: no replyTo.
    const { sent } = await fromAlice({ "m.relates_to": { "m.in_reply_to": { event_id: "$not-relayed" } } });
    assert.equal(sent.message.replyTo, undefined);
  });

  test("a thread the homeserver refuses (its root has a relation of its own) degrades to a plain reply", async () => {
    const { eventId: first } = await fromAlice();
    // A message with a relation other than a thread's is relayed, and cannot be a thread root.
    const { sent } = await fromAlice({ "m.relates_to": { rel_type: "m.reference", event_id: first } });
    const { eventId: other, sent: otherSent } = await fromAlice();
    const reply = await fromRemote({ remoteId: "r-x1", replyTo: otherSent.remoteId, thread: sent.remoteId });
    assert.deepEqual(relatesTo(reply), { "m.in_reply_to": { event_id: other } });
    const plainOne = await fromRemote({ remoteId: "r-x2", thread: sent.remoteId });
    assert.equal(relatesTo(plainOne), undefined);
    assert.deepEqual(await bridge.failedJobs(), []);
  });

  test("[spec: event replacements] an edit reaches a connector that takes edits, and no other", async () => {
    const { eventId, sent } = await fromAlice();
    h.hs.sendMessage(room, h.alice, {
      msgtype: "m.text",
      body: "* changed",
      "m.new_content": { msgtype: "m.text", body: "changed" },
      "m.relates_to": { rel_type: "m.replace", event_id: eventId },
    });
    const { edit, endpoint } = await waitFor("the edit", () =>
      remote.edits.find((e) => e.edit.remoteId === sent.remoteId),
    );
    assert.equal(edit.body.text, "changed");
    assert.equal(edit.sender.userId, h.alice);
    assert.equal(endpoint.spec.channel, "general");
    await Promise.all([drained(plain), drained(bare)]);
    assert.equal(
      plain.sent.filter((s) => s.message.body.text.includes("changed")).length,
      0,
      "not sent as a message",
    );
    assert.deepEqual(plain.edits, []);
    assert.deepEqual(bare.edits, []);
  });

  test("an edit of a message by someone else, or of one never sent there, is not relayed", async () => {
    const { eventId } = await fromAlice();
    const mallory = h.hs.registerUser("mallory", "Mallory");
    h.hs.joinRoom(room, mallory);
    h.hs.sendMessage(room, mallory, {
      msgtype: "m.text",
      body: "* forged",
      "m.new_content": { msgtype: "m.text", body: "forged" },
      "m.relates_to": { rel_type: "m.replace", event_id: eventId },
    });
    const remoteMessage = await fromRemote({ remoteId: "r-e1" });
    h.hs.sendMessage(room, h.alice, {
      msgtype: "m.text",
      body: "* not mine",
      "m.new_content": { msgtype: "m.text", body: "not mine" },
      "m.relates_to": { rel_type: "m.replace", event_id: remoteMessage.event_id },
    });
    await drained(remote);
    assert.deepEqual(
      remote.edits.filter((e) => ["forged", "not mine"].includes(e.edit.body.text)),
      [],
    );
  });

  test("[spec: redactions] a redaction reaches a connector that takes them, with the reason, and no other", async () => {
    const { eventId, sent } = await fromAlice();
    const res = await fetch(
      `${h.hs.url}/_matrix/client/v3/rooms/${encodeURIComponent(room)}/redact/${encodeURIComponent(eventId)}/red-${++n}`,
      {
        method: "PUT",
        headers: {
          Authorization: `Bearer ${h.hs.accessTokenFor(h.alice)}`,
          "Content-Type": "application/json",
        },
        body: JSON.stringify({ reason: "oops" }),
      },
    );
    assert.equal(res.status, 200);
    const { redaction } = await waitFor("the redaction", () =>
      remote.redactions.find((r) => r.redaction.remoteId === sent.remoteId),
    );
    assert.equal(redaction.reason, "oops");
    assert.equal(redaction.sender.userId, h.alice);
    await Promise.all([drained(plain), drained(bare)]);
    assert.deepEqual(plain.redactions, []);
    assert.deepEqual(bare.redactions, []);
    assert.deepEqual(await bridge.failedJobs(), []);
  });
});
