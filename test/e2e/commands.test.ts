/**
 * The bot's commands (!tribridge …): admins only, in a route's room or a room an admin invited the
 * bot to; answered once, as a notice that replies to the command (in its thread); never relayed to MQTT.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import mqtt, { type MqttClient } from "mqtt";
import type { RunningBridge } from "../../src/app.js";
import { harness, waitFor, type Harness } from "../helpers/fixture.js";
import { startBridge } from "../helpers/start-bridge.js";

describe("commands to the bot", () => {
  let h: Harness;
  let bridge: RunningBridge;
  let room: string;
  let bob: string;
  let bot: string;
  let device: MqttClient;
  const published: string[] = [];

  /** Sends `body` as `sender` in `roomId` and waits for the bot's answer, a reply to it. */
  async function ask(roomId: string, sender: string, body: string): Promise<string> {
    return String((await answerTo(roomId, sender, { msgtype: "m.text", body })).content.body);
  }

  async function answerTo(roomId: string, sender: string, command: Record<string, unknown>) {
    const asked = h.hs.sendMessage(roomId, sender, command);
    const answer = await waitFor(`the answer to "${String(command.body)}"`, () => {
      const events = h.hs.messages(roomId);
      const at = events.findIndex((e) => e.event_id === asked);
      return events.slice(at + 1).find((e) => e.sender === bot);
    });
    assert.equal(answer.content.msgtype, "m.notice");
    // Client-Server API §Rich replies: it answers the command, and mentions who gave it.
    assert.deepEqual((answer.content["m.relates_to"] as Record<string, unknown>)["m.in_reply_to"], {
      event_id: asked,
    });
    assert.deepEqual(answer.content["m.mentions"], { user_ids: [sender] });
    return answer;
  }

  before(async () => {
    h = await harness({
      bridges: { mqtt: { home: { embedded: { port: 0 } } } },
      routes: [
        {
          id: "lab",
          room: "#lab:test.local",
          endpoints: [{ account: "mqtt.home", direction: "inout", topic: "lab/chat" }],
        },
        // An alias on another server that does not exist: relays into it fail permanently.
        {
          id: "elsewhere",
          room: "#nowhere:other.example",
          endpoints: [{ account: "mqtt.home", direction: "in", topic: "lost/t" }],
        },
      ],
    });
    // The harness builds the config; admins are set on it here.
    const config = { ...h.config, appservice: { ...h.config.appservice, admins: [h.alice] } };
    bob = h.hs.registerUser("bob", "Bob");
    bot = h.hs.appserviceUserId;
    room = h.hs.createRoom({ creator: h.alice, alias: "#lab:test.local", preset: "public_chat" });
    h.hs.joinRoom(room, bob);
    const started = await startBridge({ config, registration: h.registration });
    bridge = started.bridge;
    device = await mqtt.connectAsync(`mqtt://127.0.0.1:${started.ports.mqtt}`, { clientId: "lab-device" });
    await device.subscribeAsync("lab/chat", { qos: 1 });
    device.on("message", (_topic, payload) => published.push(payload.toString()));
  });

  after(async () => {
    await device?.endAsync();
    await bridge?.stop();
    await h?.cleanup();
  });

  test("help and status for an admin, in a route's room; commands are not relayed", async () => {
    assert.match(await ask(room, h.alice, "!tribridge"), /!tribridge status/);
    const status = await ask(room, h.alice, "!tribridge status");
    assert.match(status, /running with 2 route\(s\)/);
    assert.match(status, /mqtt\.home: up/);
    assert.match(status, /to-matrix: 0 batch\(es\) waiting, 0 being delivered, 0 failed/);
    assert.match(await ask(room, h.alice, "!tribridge frobnicate"), /Unknown command "frobnicate"/);
    h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "a normal message" });
    await waitFor("the normal message on MQTT", () => published.includes("a normal message"));
    assert.ok(!published.some((p) => p.startsWith("!tribridge")), published.join(" | "));
  });

  test("a command in a thread is answered in that thread (§Replies within threads)", async () => {
    const root = h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "a thread about status" });
    const answer = await answerTo(room, h.alice, {
      msgtype: "m.text",
      body: "!tribridge status",
      "m.relates_to": {
        rel_type: "m.thread",
        event_id: root,
        is_falling_back: true,
        "m.in_reply_to": { event_id: root },
      },
    });
    const relation = answer.content["m.relates_to"] as Record<string, unknown>;
    assert.equal(relation.rel_type, "m.thread");
    assert.equal(relation.event_id, root);
    assert.equal(relation.is_falling_back, false);
    assert.match(String(answer.content.body), /mqtt\.home: up/);
  });

  test("someone who is not an admin is told so, and nothing runs", async () => {
    assert.match(await ask(room, bob, "!tribridge retry all"), /Only tribridge's admins/);
  });

  test("failed lists failed relays with the reason, retry puts them back; in a route's room, only its own", async () => {
    const mine = h.hs.createRoom({ creator: h.alice, preset: "private_chat", invite: [bot] });
    await waitFor("the bot to join", () => h.hs.membershipOf(mine, bot) === "join");
    await device.publishAsync("lost/t", "into the void", { qos: 1 });
    const failed = await waitFor("the failed relay", async () => {
      const text = await ask(mine, h.alice, "!tribridge failed 5");
      return text.includes("M_NOT_FOUND") && text;
    });
    assert.match(failed, /to-matrix .*\n\s+reason: permanent: .*#nowhere:other\.example.*404 M_NOT_FOUND/);
    // The lab room's members do not see another route's relays, and retry there leaves them be.
    assert.equal(await ask(room, h.alice, "!tribridge failed"), "No failed relays.");
    assert.match(await ask(room, h.alice, "!tribridge retry all"), /^0 failed relay\(s\) put back/);
    assert.match(await ask(mine, h.alice, "!tribridge retry all"), /^1 failed relay\(s\) put back/);
    assert.match(await ask(mine, h.alice, "!tribridge failed x"), /Usage/);
  });

  test("an admin can invite the bot to a room of their own and use it there; others cannot", async () => {
    const mine = h.hs.createRoom({ creator: h.alice, preset: "private_chat", invite: [bot] });
    await waitFor("the bot to join", () => h.hs.membershipOf(mine, bot) === "join");
    assert.match(await ask(mine, h.alice, "!tribridge status"), /mqtt\.home: up/);
    const bobs = h.hs.createRoom({ creator: bob, preset: "private_chat", invite: [bot] });
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(h.hs.membershipOf(bobs, bot), "invite", "not joined on a non-admin's invite");
  });
});
