/**
 * Bridging set up from a room: `!tribridge link`, `unlink`, `routes`. A link is checked as a
 * config file's endpoint is (errors name the field), relays at once both ways, survives a restart
 * of the bridge, and relays nothing once unlinked. The file's routes are shown, not changed.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import mqtt, { type MqttClient } from "mqtt";
import type { RunningBridge } from "../../src/app.js";
import type { Config } from "../../src/config/load.js";
import { freePort, harness, tempDataDir, waitFor, type Harness } from "../helpers/fixture.js";
import { startBridge } from "../helpers/start-bridge.js";

describe("routes linked from a room", { timeout: 90_000 }, () => {
  let h: Harness;
  let config: Config;
  let bridge: RunningBridge;
  let device: MqttClient;
  let room: string;
  let lab: string;
  let bot: string;
  const published: { topic: string; body: string }[] = [];

  async function ask(roomId: string, body: string): Promise<string> {
    const asked = h.hs.sendMessage(roomId, h.alice, { msgtype: "m.text", body });
    const answer = await waitFor(`the answer to "${body}"`, () => {
      const events = h.hs.messages(roomId);
      const at = events.findIndex((e) => e.event_id === asked);
      return events.slice(at + 1).find((e) => e.sender === bot);
    });
    return String(answer.content.body);
  }

  /** Starts the bridge, and a device (again) on its broker, subscribed to the room's topics. */
  async function up(): Promise<void> {
    const started = await startBridge({ config, registration: h.registration });
    bridge = started.bridge;
    device = await mqtt.connectAsync(`mqtt://127.0.0.1:${started.ports.mqtt}`, { clientId: "sensor-1" });
    await device.subscribeAsync(["room/chat", "room/other"], { qos: 1 });
    device.on("message", (topic, payload) => published.push({ topic, body: payload.toString() }));
  }

  async function down(): Promise<void> {
    await device.endAsync();
    await bridge.stop();
  }

  /** The device publishes `body` on `topic`; resolves once the broker has it (PUBACK). */
  const publish = (topic: string, body: string) => device.publishAsync(topic, body, { qos: 1 });
  const inRoom = (body: string) => h.hs.messages(room).some((m) => m.content.body === body);

  before(async () => {
    h = await harness({
      bridges: { mqtt: { home: { embedded: { port: 0 } } } },
      routes: [
        {
          id: "lab",
          room: "#lab:test.local",
          endpoints: [{ account: "mqtt.home", direction: "in", topic: "lab/+/t" }],
        },
      ],
    });
    config = { ...h.config, appservice: { ...h.config.appservice, admins: [h.alice] } };
    bot = h.hs.appserviceUserId;
    lab = h.hs.createRoom({ creator: h.alice, alias: "#lab:test.local", preset: "public_chat" });
    room = h.hs.createRoom({ creator: h.alice, preset: "private_chat", invite: [bot] });
    await up();
    await waitFor(
      "the bot to join the room it was invited to",
      () => h.hs.membershipOf(room, bot) === "join",
    );
  });

  after(async () => {
    await device?.endAsync();
    await bridge?.stop();
    await h?.cleanup();
  });

  test("a link is checked as a config file's endpoint: errors name the field", async () => {
    assert.match(
      await ask(room, "!tribridge routes"),
      /^Nothing is bridged to this room\.\nUsage: !tribridge link/,
    );
    assert.match(
      await ask(room, "!tribridge link mqtt.home room/+ out"),
      /^Not linked: topic: wildcards are not allowed for direction "out"$/,
    );
    assert.match(await ask(room, "!tribridge link mqtt.home room/chat qos=3"), /^Not linked: qos: /);
    assert.match(
      await ask(room, "!tribridge link mqtt.home room/chat colour=red"),
      /^Not linked: colour: unknown key$/,
    );
    assert.match(
      await ask(room, "!tribridge link mqtt.office room/chat"),
      /^Not linked: account: no account "office" under bridges\.mqtt$/,
    );
    assert.match(
      await ask(room, "!tribridge link mqtt.home room/chat topic=x"),
      /^Not linked: topic is the topic/,
    );
    assert.match(await ask(room, "!tribridge link mqtt.home"), /^Usage: !tribridge link <account>/);
  });

  test("link: a device's message lands in the room, the room's message reaches the topic", async () => {
    const answer = await ask(room, '!tribridge link mqtt.home room/chat inout format=text template="x" ');
    assert.match(answer, /^Not linked: template: needs format: json$/);
    const linked = await ask(room, "!tribridge link mqtt.home room/chat inout notice=false");
    assert.match(
      linked,
      /^Linked mqtt\.home room\/chat \(inout\) to this room, as endpoint room-[0-9a-f]{12}\.[0-9a-f]{8}\.$/,
    );
    assert.match(await ask(room, "!tribridge link mqtt.home room/other"), /^Linked /);
    assert.match(
      await ask(room, "!tribridge link mqtt.home room/chat inout"),
      /^Not linked: this room already has endpoint room-/,
    );

    await publish("room/chat", "hello from the device");
    await waitFor("the device's message in the room", () => inRoom("hello from the device"));
    h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "hello from the room" });
    await waitFor("the room's message on the topic", () =>
      published.some((p) => p.topic === "room/chat" && p.body === "hello from the room"),
    );
    const routes = await ask(room, "!tribridge routes");
    assert.match(routes, /^Linked from this room \(!tribridge unlink <id>\):\n/);
    assert.match(
      routes,
      /room-[0-9a-f]{12}\.[0-9a-f]{8}: mqtt\.home inout topic=room\/chat notice=false; linked by @alice:test\.local on /,
    );
    assert.match(routes, /: mqtt\.home inout topic=room\/other; linked by /);
    assert.match(await ask(room, "!tribridge status"), /running with 2 route\(s\)/);
  });

  test("links survive a restart of the bridge", async () => {
    await down();
    await up();
    await publish("room/chat", "after the restart");
    await waitFor("the device's message in the room after the restart", () => inRoom("after the restart"));
    h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "room after the restart" });
    await waitFor("the room's message on the topic after the restart", () =>
      published.some((p) => p.topic === "room/chat" && p.body === "room after the restart"),
    );
  });

  test("unlink: nothing more either way; the file's routes are shown, not changed", async () => {
    assert.match(
      await ask(room, "!tribridge unlink mqtt.home room/chat"),
      /^Unlinked room-[0-9a-f]{12}\.[0-9a-f]{8}\.$/,
    );
    assert.match(
      await ask(room, "!tribridge unlink mqtt.home room/chat"),
      /^Nothing linked in this room matches/,
    );
    // Each way, a message through the link still there comes after one through the removed link would.
    await publish("room/chat", "unlinked in");
    await publish("room/other", "marker in");
    await waitFor("the marker in the room", () => inRoom("marker in"));
    assert.ok(!inRoom("unlinked in"), "nothing from the unlinked topic");
    h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "marker out" });
    await waitFor("the marker on the topic still linked", () =>
      published.some((p) => p.body === "marker out"),
    );
    assert.deepEqual(
      published.filter((p) => p.body === "marker out").map((p) => p.topic),
      ["room/other"],
    );

    const id = /(room-[0-9a-f]{12}\.[0-9a-f]{8}):/.exec(await ask(room, "!tribridge routes"))![1]!;
    assert.match(
      await ask(room, `!tribridge unlink ${id.slice(id.indexOf(".") + 1)}`),
      new RegExp(`^Unlinked ${id}\\.$`),
    );
    assert.match(await ask(room, "!tribridge routes"), /^Nothing is bridged to this room/);

    const labRoutes = await ask(lab, "!tribridge routes");
    assert.match(
      labRoutes,
      /^Route lab \(config file; change it there, then !tribridge reload\):\n {2}lab\.[0-9a-f]{8}: mqtt\.home in lab\/\+\/t$/,
    );
    assert.match(
      await ask(lab, "!tribridge unlink mqtt.home lab/+/t"),
      /^Not unlinked: that is route lab of the config file/,
    );
    assert.match(
      await ask(lab, "!tribridge link mqtt.home lab/+/t in"),
      /^Not linked: route lab of the config file already relays this/,
    );
    assert.match(await ask(lab, "!tribridge status"), /running with 1 route\(s\)/);
  });

  test("a linked room that is upgraded: its links move along, with their ids, also after a restart", async () => {
    const linked = await ask(room, "!tribridge link mqtt.home room/chat");
    const id = /as endpoint (\S+)\.$/.exec(linked)![1]!;
    const newRoom = h.hs.createRoom({ creator: h.alice, preset: "public_chat" });
    h.hs.sendState(room, h.alice, "m.room.tombstone", "", {
      body: "This room has been replaced",
      replacement_room: newRoom,
    });
    await waitFor("the bot in the new room", () => h.hs.membershipOf(newRoom, bot) === "join");
    await waitFor("the links moved", async () => (await ask(newRoom, "!tribridge routes")).includes(id));
    await publish("room/chat", "into the new room");
    await waitFor("the device's message in the new room", () =>
      h.hs.messages(newRoom).some((m) => m.content.body === "into the new room"),
    );
    await down();
    await up();
    await publish("room/chat", "new room after a restart");
    await waitFor("the device's message in the new room after a restart", () =>
      h.hs.messages(newRoom).some((m) => m.content.body === "new room after a restart"),
    );
    assert.ok(!inRoom("into the new room") && !inRoom("new room after a restart"));
  });

  test("a link made through one instance applies at once on another sharing its Redis", async () => {
    const other = await startBridge({
      config: {
        ...config,
        dataDir: tempDataDir(),
        appservice: { ...config.appservice, port: await freePort() },
      },
      registration: h.registration,
    });
    const otherDevice = await mqtt.connectAsync(`mqtt://127.0.0.1:${other.ports.mqtt}`, {
      clientId: "sensor-2",
    });
    try {
      const third = h.hs.createRoom({ creator: h.alice, preset: "private_chat", invite: [bot] });
      await waitFor("the bot in the third room", () => h.hs.membershipOf(third, bot) === "join");
      // Transactions go to the first instance: the command is run there.
      assert.match(await ask(third, "!tribridge link mqtt.home third/t in notice=false"), /^Linked /);
      // The device is on the second instance's broker: it relays only if that instance knows the link.
      await waitFor(
        "the second instance's device relayed through the link",
        async () => {
          await otherDevice.publishAsync("third/t", "through the other instance", { qos: 1 });
          return h.hs.messages(third).some((m) => m.content.body === "through the other instance");
        },
        10_000,
      );
    } finally {
      await otherDevice.endAsync();
      await other.bridge.stop();
    }
  });
});
