/**
 * HTML both ways through the whole core (queue, room delivery, intake, to-remote worker), with two
 * test connectors: one that shows HTML, one that does not.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { start, type RunningBridge } from "../../src/app.js";
import { harness, waitFor, type Harness } from "../helpers/fixture.js";
import { testConnector, type TestConnector } from "../helpers/test-connector.js";

describe("HTML both ways", () => {
  const connectors = [testConnector({ html: true }, "rich"), testConnector({ html: false }, "plain")];
  let rich: TestConnector;
  let plain: TestConnector;
  let h: Harness;
  let bridge: RunningBridge;
  let room: string;

  before(async () => {
    h = await harness({
      connectors,
      bridges: { rich: { a: {} }, plain: { a: {} } },
      routes: [
        {
          id: "html",
          room: "#html:test.local",
          endpoints: [
            { account: "rich.a", direction: "inout", channel: "c" },
            { account: "plain.a", direction: "out", channel: "c" },
          ],
        },
      ],
    });
    room = h.hs.createRoom({ creator: h.alice, alias: "#html:test.local", preset: "public_chat" });
    bridge = await start({ config: h.config, registration: h.registration, connectors });
    rich = bridge.connector("rich.a") as TestConnector;
    plain = bridge.connector("plain.a") as TestConnector;
  });

  after(async () => {
    await bridge?.stop();
    await h?.cleanup();
  });

  test("hostile HTML from a connector arrives sanitized, mentioning nobody", async () => {
    const html =
      "<p onclick=\"alert(1)\">Alarm <b>pump 2</b><script>alert('x')</script>" +
      '<iframe src="https://evil.example/"></iframe><img src="https://evil.example/pixel.gif">' +
      '<img src="mxc://test.local/plot" alt="plot"><span data-mx-evil="x" data-mx-color="#ff0000">red</span> ' +
      '<a href="javascript:alert(1)">js</a> <a href="https://matrix.to/#/@alice:test.local">Alice</a> @room</p>' +
      "<blockquote>".repeat(500) +
      "deep" +
      "</blockquote>".repeat(500);
    await rich.emit("c", {
      remoteId: "m1",
      sender: { id: "pump" },
      body: { text: "Alarm pump 2 red js Alice @room deep", html },
    });
    const [message] = await h.hs.waitForMessages(room, 1);
    const c = message!.content;
    assert.equal(c.body, "Alarm pump 2 red js Alice @room deep");
    assert.equal(c.format, "org.matrix.custom.html");
    assert.deepEqual(c["m.mentions"], {});
    const out = String(c.formatted_body);
    assert.ok(
      out.startsWith(
        '<p>Alarm <b>pump 2</b><img src="mxc://test.local/plot" alt="plot" />' +
          '<span data-mx-color="#ff0000">red</span> <span>js</span> <span>Alice</span> @room</p>',
      ),
      out,
    );
    assert.doesNotMatch(out, /script|iframe|evil|onclick|javascript|data-mx-evil|matrix\.to/);
    assert.equal(out.match(/<blockquote>/g)?.length, 100, "nested at most 100 deep");
    assert.ok(out.includes("deep"));
  });

  test("a room message in HTML reaches the connector that shows HTML, and only the text the other", async () => {
    h.hs.sendMessage(room, h.alice, {
      msgtype: "m.text",
      body: "> <@bob:test.local> status?\n\n**all** good",
      format: "org.matrix.custom.html",
      formatted_body:
        '<mx-reply><blockquote><a href="https://matrix.to/#/!r:test.local/$q">In reply to</a></blockquote></mx-reply>' +
        '<b>all</b> good<img src="x" onerror="alert(1)">',
      "m.relates_to": { "m.in_reply_to": { event_id: "$q" } },
    });
    const [toRich] = await waitFor("sent to rich", () => rich.sentTo("c").length > 0 && rich.sentTo("c"));
    const [toPlain] = await waitFor("sent to plain", () => plain.sentTo("c").length > 0 && plain.sentTo("c"));
    assert.deepEqual(toRich!.body, { text: "**all** good", html: "<b>all</b> good" });
    assert.deepEqual(toPlain!.body, { text: "**all** good" });
    assert.equal(toPlain!.body.html, undefined);
  });
});
