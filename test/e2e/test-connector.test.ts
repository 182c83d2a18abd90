/** The core with a connector that speaks no protocol: both directions, as the conformance of the core's side. */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import type { RunningBridge } from "../../src/app.js";
import { PermanentError } from "../../src/errors.js";
import { waitFor, type Harness } from "../helpers/fixture.js";
import { startTestChat, type TestChat } from "../helpers/test-chat.js";
import type { TestConnector } from "../helpers/test-connector.js";

describe("the core with a test connector", () => {
  let chat: TestChat;
  let h: Harness;
  let bridge: RunningBridge;
  let room: string;
  let remote: TestConnector;

  before(async () => {
    chat = await startTestChat();
    ({ h, bridge, room, remote } = chat);
  });

  after(() => chat?.stop());

  test("a remote message appears in the room as its sender's ghost; a room message reaches the far side", async () => {
    await remote.emit("general", {
      remoteId: "r1",
      sender: { id: "bob", displayName: "Bob" },
      body: { text: "hi" },
    });
    const [posted] = await h.hs.waitForMessages(room, 1);
    assert.equal(posted?.content.body, "hi");
    assert.equal(h.hs.profile(posted!.sender)?.displayname, "Bob");

    h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "hello bob" });
    const [sent] = await waitFor(
      "the send",
      () => remote.sentTo("general").length > 0 && remote.sentTo("general"),
    );
    assert.equal(sent?.body.text, "hello bob");
    assert.equal(sent?.sender.userId, h.alice);
  });

  test("a room message the far side refuses: the bot answers it, in its thread, with the reason; once", async () => {
    const root = h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "a thread" });
    await waitFor("the root relayed", () => remote.sentTo("general").some((m) => m.body.text === "a thread"));
    remote.failures.push(new PermanentError("the far side refuses this"));
    const refused = h.hs.sendMessage(room, h.alice, {
      msgtype: "m.text",
      body: "refused one",
      "m.relates_to": {
        rel_type: "m.thread",
        event_id: root,
        is_falling_back: true,
        "m.in_reply_to": { event_id: root },
      },
    });
    const notice = await waitFor("the bot's notice", () =>
      h.hs.messages(room).find((e) => e.sender === h.hs.appserviceUserId && e.content.msgtype === "m.notice"),
    );
    assert.match(
      String(notice.content.body),
      /^Not delivered to chat\.\w+: permanent: the far side refuses this\./,
    );
    assert.deepEqual(notice.content["m.relates_to"], {
      rel_type: "m.thread",
      event_id: root,
      is_falling_back: false,
      "m.in_reply_to": { event_id: refused },
    });
    assert.equal((await bridge.failedJobs()).length, 1);
    // The next message goes through; no second notice.
    h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "after" });
    await waitFor("the next one", () => remote.sentTo("general").some((m) => m.body.text === "after"));
    assert.equal(h.hs.messages(room).filter((e) => e.sender === h.hs.appserviceUserId).length, 1);
  });
});
