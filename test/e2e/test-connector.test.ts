/** The core with a connector that speaks no protocol: both directions, as the conformance of the core's side. */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { start, type RunningBridge } from "../../src/app.js";
import { harness, waitFor, type Harness } from "../helpers/fixture.js";
import { testConnector, type TestConnector } from "../helpers/test-connector.js";

describe("the core with a test connector", () => {
  const connectors = [testConnector()];
  let h: Harness;
  let bridge: RunningBridge;
  let room: string;
  let remote: TestConnector;

  before(async () => {
    h = await harness({
      connectors,
      bridges: { test: { a: {} } },
      routes: [
        {
          id: "chat",
          room: "#chat:test.local",
          endpoints: [{ account: "test.a", direction: "inout", channel: "general" }],
        },
      ],
    });
    room = h.hs.createRoom({ creator: h.alice, alias: "#chat:test.local", preset: "public_chat" });
    bridge = await start({ config: h.config, registration: h.registration, connectors });
    remote = bridge.connector("test.a") as TestConnector;
  });

  after(async () => {
    await bridge?.stop();
    await h?.cleanup();
  });

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
});
