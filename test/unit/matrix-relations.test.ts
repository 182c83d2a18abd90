/** Replies, threads and edits read from and written into m.relates_to (CS API §Rich replies, §Threading). */
import { test } from "node:test";
import assert from "node:assert/strict";
import { answerRelation, inboundRelation, relationsOf } from "../../src/matrix/relations.js";

test("relationsOf: replies, thread roots (with their fallback reply) and edits", () => {
  assert.deepEqual(relationsOf({ body: "x" }), {});
  assert.deepEqual(relationsOf({ "m.relates_to": { "m.in_reply_to": { event_id: "$q" } } }), {
    replyTo: "$q",
  });
  const fallback = {
    rel_type: "m.thread",
    event_id: "$root",
    is_falling_back: true,
    "m.in_reply_to": { event_id: "$latest" },
  };
  assert.deepEqual(relationsOf({ "m.relates_to": fallback }), { thread: "$root", replyTo: "$latest" });
  assert.deepEqual(relationsOf({ "m.relates_to": { rel_type: "m.thread", event_id: "$root" } }), {
    thread: "$root",
  });
  assert.deepEqual(relationsOf({ "m.relates_to": { rel_type: "m.replace", event_id: "$o" } }), {
    replaces: "$o",
  });
  assert.deepEqual(
    relationsOf({ "m.relates_to": { rel_type: "m.thread", event_id: 7, "m.in_reply_to": "$x" } }),
    {},
  );
});

test("inboundRelation: a reply; in the reply target's thread; in the conversation's; roots never nest", () => {
  assert.equal(inboundRelation(undefined, undefined), undefined);
  assert.deepEqual(inboundRelation({ eventId: "$p" }, undefined), {
    relatesTo: { "m.in_reply_to": { event_id: "$p" } },
  });
  const inThread = (root: string, replyTo: string, fallingBack: boolean) => ({
    relatesTo: {
      rel_type: "m.thread",
      event_id: root,
      is_falling_back: fallingBack,
      "m.in_reply_to": { event_id: replyTo },
    },
    threadRoot: root,
  });
  // The reply target's thread wins over the conversation's.
  assert.deepEqual(
    inboundRelation({ eventId: "$p", threadRoot: "$t" }, { eventId: "$c" }),
    inThread("$t", "$p", false),
  );
  assert.deepEqual(inboundRelation({ eventId: "$p" }, { eventId: "$c" }), inThread("$c", "$p", false));
  // Only the conversation: the fallback reply names the root.
  assert.deepEqual(inboundRelation(undefined, { eventId: "$c" }), inThread("$c", "$c", true));
  // A conversation event that is itself in a thread stands for that thread's root.
  assert.deepEqual(
    inboundRelation(undefined, { eventId: "$c", threadRoot: "$t" }),
    inThread("$t", "$t", true),
  );
});

test("answerRelation: a reply to the command; in its thread, a real reply there (is_falling_back false)", () => {
  assert.deepEqual(answerRelation("$cmd", { body: "!tribridge status" }), {
    "m.in_reply_to": { event_id: "$cmd" },
  });
  const inThread = {
    body: "!tribridge status",
    "m.relates_to": {
      rel_type: "m.thread",
      event_id: "$root",
      is_falling_back: true,
      "m.in_reply_to": { event_id: "$last" },
    },
  };
  assert.deepEqual(answerRelation("$cmd", inThread), {
    rel_type: "m.thread",
    event_id: "$root",
    is_falling_back: false,
    "m.in_reply_to": { event_id: "$cmd" },
  });
});
