/**
 * Room upgrades: when a route's room is replaced (m.room.tombstone), the bridge follows it, at
 * once and after a restart, in both directions.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import mqtt, { type MqttClient } from "mqtt";
import { connectors } from "../../bridges/index.js";
import { start, type RunningBridge } from "../../src/app.js";
import { LAB_ROUTE, freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";
import { startBridge } from "../helpers/start-bridge.js";

describe("a route's room is upgraded", () => {
  let h: Harness;
  let bridge: RunningBridge;
  let oldRoom: string;
  let newRoom: string;
  let device: MqttClient;
  const commands: string[] = [];
  const bodies = (roomId: string) => h.hs.messages(roomId).map((m) => String(m.content.body));

  before(async () => {
    h = await harness({
      bridges: { mqtt: { home: { embedded: { port: await freePort() } } } },
      routes: [LAB_ROUTE],
    });
    oldRoom = h.hs.createRoom({ creator: h.alice, alias: "#lab:test.local", preset: "public_chat" });
    const started = await startBridge(h);
    bridge = started.bridge;
    device = await mqtt.connectAsync(`mqtt://127.0.0.1:${started.ports.mqtt}`, {
      clientId: "probe",
      reconnectPeriod: 200,
    });
    await device.subscribeAsync("lab/cmd", { qos: 1 });
    device.on("message", (_t, payload) => commands.push(payload.toString()));
  });

  after(async () => {
    await device?.endAsync();
    await bridge?.stop();
    await h?.cleanup();
  });

  test("relays follow the tombstone to the new room, both ways", async () => {
    await device.publishAsync("lab/probe/t", "before", { qos: 1 });
    await waitFor("before, in the old room", () => bodies(oldRoom).includes("before"));

    newRoom = h.hs.createRoom({ creator: h.alice, preset: "public_chat" });
    // As an upgrade does (it copies the old room's power levels): the bot may send state there.
    h.hs.sendState(newRoom, h.alice, "m.room.power_levels", "", {
      users: { [h.alice]: 100, [h.hs.appserviceUserId]: 100 },
    });
    h.hs.sendState(oldRoom, h.alice, "m.room.tombstone", "", {
      body: "This room has been replaced",
      replacement_room: newRoom,
    });
    await waitFor(
      "the bot in the new room",
      () => h.hs.membershipOf(newRoom, h.hs.appserviceUserId) === "join",
    );

    await waitFor("the new room says what it is bridged to (m.bridge)", () =>
      h.hs.events(newRoom).some((e) => e.type === "m.bridge" && e.sender === h.hs.appserviceUserId),
    );

    await device.publishAsync("lab/probe/t", "after", { qos: 1 });
    await waitFor("after, in the new room", () => bodies(newRoom).includes("after"));
    assert.ok(!bodies(oldRoom).includes("after"));

    h.hs.sendMessage(oldRoom, h.alice, { msgtype: "m.text", body: "to the old room" });
    h.hs.sendMessage(newRoom, h.alice, { msgtype: "m.text", body: "to the new room" });
    await waitFor("the new room's message on MQTT", () => commands.includes("to the new room"));
    await new Promise((r) => setTimeout(r, 200));
    assert.deepEqual(commands, ["to the new room"]);
  });

  test("after a restart, an alias still naming the old room leads to the new one", async () => {
    await bridge.stop();
    bridge = await start({ config: h.config, registration: h.registration, connectors });
    await device.publishAsync("lab/probe/t", "after restart", { qos: 1 });
    await waitFor("after restart, in the new room", () => bodies(newRoom).includes("after restart"));
    assert.ok(!bodies(oldRoom).includes("after restart"));
  });
});
