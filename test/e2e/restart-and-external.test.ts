/**
 * Replayed transactions across a bridge restart, Synapse's txnId counter restarting, and the
 * same relay through an external broker (Mosquitto when installed, else a second aedes on TCP).
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import mqtt, { type MqttClient } from "mqtt";
import { connectors } from "../../bridges/index.js";
import { start, type RunningBridge } from "../../src/app.js";
import { PLANT_ROUTE, startExternalBroker, type Broker } from "../helpers/brokers.js";
import { freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";

describe("replayed transactions", () => {
  let h: Harness;
  let bridge: RunningBridge;
  let room: string;
  let port: number;
  let listener: MqttClient;
  const received: string[] = [];

  before(async () => {
    port = await freePort();
    h = await harness({
      bridges: { mqtt: { home: { embedded: { port } } } },
      routes: [
        {
          id: "r",
          room: "#replay:test.local",
          endpoints: [{ account: "mqtt.home", direction: "out", topic: "replay/out" }],
        },
      ],
    });
    room = h.hs.createRoom({ creator: h.alice, alias: "#replay:test.local", preset: "public_chat" });
    bridge = await start({ config: h.config, registration: h.registration, connectors });
    listener = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
      clientId: "replay-listener",
      reconnectPeriod: 100,
    });
    listener.on("message", (_t, p) => received.push(p.toString()));
    await listener.subscribeAsync("replay/out", { qos: 1 });
  });

  after(async () => {
    await listener?.endAsync();
    await bridge?.stop();
    await h?.cleanup();
  });

  test("a transaction replayed after a bridge restart is not relayed twice", async () => {
    h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "once" });
    await waitFor("first relay", () => received.includes("once"));
    await h.hs.waitForPushIdle();
    const delivered = h.hs.pushedTransactions.filter((t) => t.status === 200 && t.events > 0);
    const txnIds = [...new Set(delivered.map((t) => t.txnId))];

    await bridge.stop();
    bridge = await start({ config: h.config, registration: h.registration, connectors });
    await waitFor("listener reconnected", () => listener.connected);
    await listener.subscribeAsync("replay/out", { qos: 1 });
    for (const txnId of txnIds) assert.equal(await h.hs.replayTransaction(txnId), 200);
    await new Promise((r) => setTimeout(r, 500));
    assert.deepEqual(
      received.filter((b) => b === "once"),
      ["once"],
    );
  });

  test("a homeserver that restarts its txnId counter still gets new events relayed", async () => {
    h.hs.setNextTxnId(1); // Synapse after a restart: same txnIds, new events
    h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "after hs restart" });
    await waitFor("relay after txn reset", () => received.includes("after hs restart"));
  });
});

describe("embedded broker state survives a bridge restart", () => {
  let h: Harness;
  let bridge: RunningBridge;
  let room: string;
  let port: number;

  before(async () => {
    port = await freePort();
    h = await harness({
      bridges: { mqtt: { home: { embedded: { port } } } },
      routes: [
        {
          id: "state",
          room: "#state:test.local",
          endpoints: [
            { account: "mqtt.home", direction: "out", topic: "state/setpoint", retain: true },
            { account: "mqtt.home", direction: "out", topic: "state/command", qos: 1 },
          ],
        },
      ],
    });
    room = h.hs.createRoom({ creator: h.alice, alias: "#state:test.local", preset: "public_chat" });
    bridge = await start({ config: h.config, registration: h.registration, connectors });
  });

  after(async () => {
    await bridge?.stop();
    await h?.cleanup();
  });

  test("retained messages and a persistent device's queued commands are kept", async () => {
    // A device with a persistent session subscribes, then goes offline.
    const options = { clientId: "valve", clean: false, protocolVersion: 4 as const, reconnectPeriod: 0 };
    let device = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, options);
    await device.subscribeAsync("state/command", { qos: 1 });
    await device.endAsync();

    // Each room message goes to both topics: the setpoint keeps the last one retained, and the
    // offline valve gets both queued.
    h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "21.5" });
    h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "close" });
    await h.hs.waitForPushIdle();
    await new Promise((r) => setTimeout(r, 500)); // both published by the bridge
    assert.deepEqual(await bridge.failedJobs(), []);

    await bridge.stop();
    bridge = await start({ config: h.config, registration: h.registration, connectors });

    const received: [string, string, boolean][] = [];
    device = mqtt.connect(`mqtt://127.0.0.1:${port}`, options);
    device.on("message", (topic, payload, packet) =>
      received.push([topic, payload.toString(), packet.retain]),
    );
    await waitFor("device reconnected", () => device.connected);
    const watcher = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, { clientId: "watcher" });
    const retained: string[] = [];
    watcher.on("message", (_t, payload) => retained.push(payload.toString()));
    await watcher.subscribeAsync("state/setpoint", { qos: 1 });
    await waitFor(
      "queued commands delivered",
      () => received.filter(([t]) => t === "state/command").length === 2,
    );
    assert.deepEqual(
      received.filter(([t]) => t === "state/command").map(([, p]) => p),
      ["21.5", "close"],
    );
    await waitFor("retained setpoint", () => retained.length > 0);
    assert.deepEqual(retained, ["close"]);
    await device.endAsync();
    await watcher.endAsync();
  });
});

for (const protocolVersion of [5, 4] as const) {
  describe(`external broker, MQTT ${protocolVersion === 5 ? "5" : "3.1.1"}`, () => {
    let h: Harness;
    let broker: Broker;
    let bridge: RunningBridge;
    let room: string;
    let device: MqttClient;

    before(async () => {
      broker = await startExternalBroker();
      h = await harness({
        bridges: { mqtt: { plant: { url: `mqtt://127.0.0.1:${broker.port}`, protocolVersion } } },
        routes: [PLANT_ROUTE],
      });
      room = h.hs.createRoom({ creator: h.alice, alias: "#plant:test.local", preset: "public_chat" });
      bridge = await start({ config: h.config, registration: h.registration, connectors });
      await waitFor("connected to broker", () => bridge.connectorStates()["mqtt.plant"]?.state === "up");
      device = await mqtt.connectAsync(`mqtt://127.0.0.1:${broker.port}`, {
        clientId: `device-${protocolVersion}`,
      });
    });

    after(async () => {
      await device?.endAsync();
      await bridge?.stop();
      await h?.cleanup();
      await broker?.stop();
    });

    test("device messages reach the room in order as the topic-level ghost", async () => {
      await new Promise((r) => setTimeout(r, 200)); // subscription settles
      for (let i = 0; i < 20; i++) await device.publishAsync("plant/pump1/state", `s${i}`, { qos: 1 });
      const messages = await h.hs.waitForMessages(room, 20);
      assert.deepEqual(
        messages.map((m) => m.content.body),
        Array.from({ length: 20 }, (_, i) => `s${i}`),
      );
      assert.ok(messages.every((m) => m.sender === "@_tb_mqtt_plant_pump1:test.local"));
    });

    test("room messages are published once each, and their echoes do not come back", async () => {
      const received: string[] = [];
      device.on("message", (_t, p) => received.push(p.toString()));
      await device.subscribeAsync("plant/chat", { qos: 1 });
      // The same command twice: each is published, and neither echo comes back.
      h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "pump on" });
      h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "pump on" });
      await waitFor("published", () => received.length >= 2);
      await new Promise((r) => setTimeout(r, 400));
      assert.equal(h.hs.messages(room).filter((m) => m.content.body === "pump on").length, 2, broker.kind);
      assert.deepEqual(received, ["pump on", "pump on"]);
      // A device saying the same afterwards is a device message.
      await device.publishAsync("plant/chat", "pump on", { qos: 1 });
      await waitFor("the device's own message", () =>
        h.hs.messages(room).some((m) => m.content.body === "pump on" && m.sender !== h.alice),
      );
    });
  });
}
