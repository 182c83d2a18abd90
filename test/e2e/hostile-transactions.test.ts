/**
 * Transactions a homeserver should not send, pushed to a running bridge as the homeserver would
 * (AS API §Pushing events), and followed to the far side through the whole path (appservice server
 * → event intake → queue → format → connector): fields of the wrong type are refused or rendered
 * correctly, never as "[object Object]"; an event from no valid user is not relayed; the same event
 * twice in one transaction is relayed once.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { waitFor, type Harness } from "../helpers/fixture.js";
import { startTestChat, type TestChat } from "../helpers/test-chat.js";
import type { TestConnector } from "../helpers/test-connector.js";

describe("hostile transactions, through the whole path", () => {
  let chat: TestChat;
  let h: Harness;
  let room: string;
  let remote: TestConnector;
  let txn = 0;

  /** An event as a homeserver pushes it (client format), in the route's room. */
  const event = (id: string, content: unknown, more: Record<string, unknown> = {}) => ({
    event_id: id,
    room_id: room,
    sender: h.alice,
    type: "m.room.message",
    origin_server_ts: Date.now(),
    content,
    ...more,
  });

  /** Pushes one transaction; then a sentinel message, and waits until it reached the far side. */
  async function push(events: unknown[]): Promise<string[]> {
    const sentinel = `sentinel ${++txn}`;
    const r = await h.hs.pushRaw(`/_matrix/app/v1/transactions/hostile-${txn}`, { events });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    const s = await h.hs.pushRaw(`/_matrix/app/v1/transactions/sentinel-${txn}`, {
      events: [event(`$sentinel-${txn}`, { msgtype: "m.text", body: sentinel })],
    });
    assert.equal(s.status, 200);
    const texts = await waitFor(`the sentinel ${txn}`, () => {
      const all = remote.sentTo("general").map((m) => m.body.text);
      return all.includes(sentinel) && all;
    });
    const at = texts.lastIndexOf(`sentinel ${txn - 1}`);
    return texts.slice(at + 1, -1); // what this transaction relayed, in order
  }

  before(async () => {
    chat = await startTestChat();
    ({ h, room, remote } = chat);
  });

  after(() => chat?.stop());

  test("the same event_id twice in one transaction is relayed once", async () => {
    const twice = event("$twice", { msgtype: "m.text", body: "once only" });
    const delivered = () => remote.calls.filter((c) => c.message.body.text === "once only").length;
    assert.deepEqual(await push([twice, twice]), ["once only"]);
    // The far side was handed it once: a connector that cannot dedupe (MQTT) publishes each send.
    assert.equal(delivered(), 1);
    // And again in a later transaction (a homeserver's replay under another txnId): not again.
    assert.deepEqual(await push([twice]), []);
    assert.equal(delivered(), 1);
  });

  test("fields of the wrong type are refused or rendered correctly, never as [object Object]", async () => {
    const relayed = await push([
      event("$body-object", { msgtype: "m.text", body: { text: "hi" } }),
      event("$body-number", { msgtype: "m.text", body: 42 }),
      event("$msgtype-number", { msgtype: 7, body: "x" }),
      event("$content-list", ["m.text", "hi"]),
      event("$content-string", "hi"),
      event("$image-url-object", { msgtype: "m.image", body: "cat.png", url: { mxc: "x" } }),
      event("$file-url-number", { msgtype: "m.file", body: "report.pdf", url: 5 }),
      event("$location-geo-object", { msgtype: "m.location", body: "here", geo_uri: { lat: 1 } }),
      event("$relates-string", { msgtype: "m.text", body: "relates oddly", "m.relates_to": "x" }),
      event("$html-object", {
        msgtype: "m.text",
        body: "plain",
        format: "org.matrix.custom.html",
        formatted_body: { b: "bold" },
      }),
      event("$room-missing", { msgtype: "m.text", body: "no room" }, { room_id: undefined }),
      event("$sender-object", { msgtype: "m.text", body: "no sender" }, { sender: { id: h.alice } }),
      event("$ts-string", { msgtype: "m.text", body: "odd time" }, { origin_server_ts: "now" }),
    ]);
    for (const text of relayed) assert.doesNotMatch(text, /\[object Object\]|undefined|NaN/, text);
    assert.deepEqual(relayed, ["cat.png", "report.pdf", "here", "relates oddly", "plain"]);
  });

  test("an event with an empty or invalid sender is not relayed", async () => {
    const relayed = await push([
      event("$sender-empty", { msgtype: "m.text", body: "from nobody" }, { sender: "" }),
      event("$sender-no-server", { msgtype: "m.text", body: "from @eve" }, { sender: "@eve" }),
      event("$sender-localpart", { msgtype: "m.text", body: "from @:x" }, { sender: "@:test.local" }),
      event("$sender-space", { msgtype: "m.text", body: "from a space" }, { sender: "@e ve:test.local" }),
      event("$sender-ok", { msgtype: "m.text", body: "from alice" }),
    ]);
    assert.deepEqual(relayed, ["from alice"]);
  });
});
