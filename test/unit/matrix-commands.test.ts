import { test } from "node:test";
import assert from "node:assert/strict";
import { adminMatcher, formatStatus, isCommand, clip, MAX_ANSWER_CHARS } from "../../src/matrix/commands.js";
import type { MatrixEvent } from "../../src/matrix/appservice-server.js";

test("admins: listed users, and every user of a server listed as @*:<server>", () => {
  const isAdmin = adminMatcher(["@alice:example.org", "@*:ops.example.org"]);
  assert.equal(isAdmin("@alice:example.org"), true);
  assert.equal(isAdmin("@bob:example.org"), false);
  assert.equal(isAdmin("@carol:ops.example.org"), true);
  assert.equal(isAdmin("@carol:evil.ops.example.org"), false);
  assert.equal(isAdmin("@ops.example.org:evil.example"), false);
  assert.equal(adminMatcher([])("@alice:example.org"), false);
});

test("a command is an m.text message that is !tribridge or starts with '!tribridge '", () => {
  const ev = (body: unknown, msgtype = "m.text"): MatrixEvent => ({
    event_id: "$e",
    room_id: "!r:x",
    sender: "@a:x",
    type: "m.room.message",
    content: { msgtype, body },
  });
  assert.equal(isCommand(ev("!tribridge")), true);
  assert.equal(isCommand(ev("!tribridge status")), true);
  assert.equal(isCommand(ev("!tribridgestatus")), false);
  assert.equal(isCommand(ev("say !tribridge status")), false);
  assert.equal(isCommand(ev("!tribridge status", "m.notice")), false);
  assert.equal(isCommand(ev(42)), false);
});

test("a command sent as a reply to the bot's answer is still a command (its fallback quote aside)", () => {
  const reply: MatrixEvent = {
    event_id: "$e",
    room_id: "!r:x",
    sender: "@a:x",
    type: "m.room.message",
    content: {
      msgtype: "m.text",
      body: "> <@tribridge:x> 2 failed relays\n\n!tribridge retry all",
      "m.relates_to": { "m.in_reply_to": { event_id: "$answer" } },
    },
  };
  assert.equal(isCommand(reply), true);
});

test("status: connectors with their reason, queues with their backlog and failed list", () => {
  const text = formatStatus(
    3,
    { "mqtt.home": { state: "up" }, "mqtt.plant": { state: "connecting", reason: "broker unreachable" } },
    { "to-matrix": { waiting: 2, active: 1, failedList: 4, holding: true } },
  );
  assert.equal(
    text,
    [
      "tribridge is running with 3 route(s).",
      "mqtt.home: up",
      "mqtt.plant: connecting (broker unreachable)",
      "to-matrix: 2 batch(es) waiting, 1 being delivered, 4 failed; backlog full, new messages held at their source",
    ].join("\n"),
  );
});

test("an answer too long for one event is cut at a code point, and says so", () => {
  assert.equal(clip("short"), "short");
  const cut = clip("🌡".repeat(MAX_ANSWER_CHARS));
  assert.ok(cut.length <= MAX_ANSWER_CHARS, String(cut.length));
  assert.match(cut, /^(🌡)+… \(cut: too long to answer in full\)$/u);
  assert.ok(Buffer.byteLength(JSON.stringify("\u0001".repeat(MAX_ANSWER_CHARS))) < 65_536);
});
