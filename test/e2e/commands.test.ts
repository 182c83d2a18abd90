/**
 * The bot's commands (!tribridge …): admins only, in a route's room or a room an admin invited the
 * bot to; answered once, as a notice; never relayed to MQTT.
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

  /** Sends `body` as `sender` in `roomId` and waits for the bot's answer. */
  async function ask(roomId: string, sender: string, body: string): Promise<string> {
    const asked = h.hs.sendMessage(roomId, sender, { msgtype: "m.text", body });
    const answer = await waitFor(`the answer to "${body}"`, () => {
      const events = h.hs.messages(roomId);
      const at = events.findIndex((e) => e.event_id === asked);
      return events.slice(at + 1).find((e) => e.sender === bot);
    });
    assert.equal(answer.content.msgtype, "m.notice");
    return String(answer.content.body);
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
