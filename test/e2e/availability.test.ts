/**
 * Device availability (ConnectorContext.availability): Zigbee2MQTT availability topics and Tasmota
 * wills become the device ghost's presence and one status line per device, edited with each change;
 * a homeserver that refuses presence gets the line alone; on an external broker tribridge says
 * online (retained) when it connects and its will says offline when its connection is lost.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createServer, connect as tcpConnect, type Server, type Socket } from "node:net";
import { randomUUID } from "node:crypto";
import mqtt, { type MqttClient } from "mqtt";
import { connectors } from "../../bridges/index.js";
import { start, type RunningBridge } from "../../src/app.js";
import { startExternalBroker, type Broker } from "../helpers/brokers.js";
import { freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";
import { startBridge } from "../helpers/start-bridge.js";
import type { RecordedEvent } from "../helpers/test-homeserver.js";

const GHOST = (device: string) => `@_tb_mqtt_home_${device}:test.local`;

const ROUTE = {
  id: "home",
  room: "#home:test.local",
  endpoints: [
    {
      account: "mqtt.home",
      direction: "in",
      topic: "zigbee2mqtt/#",
      format: "json",
      sender: { topicLevel: 2 },
      availability: "zigbee2mqtt",
    },
    {
      account: "mqtt.home",
      direction: "in",
      topic: "tele/+/+",
      sender: { topicLevel: 2 },
      availability: "tasmota",
    },
  ],
};

const isEdit = (m: RecordedEvent) =>
  (m.content["m.relates_to"] as { rel_type?: string } | undefined)?.rel_type === "m.replace";
const shownText = (m: RecordedEvent) =>
  String(isEdit(m) ? (m.content["m.new_content"] as { body: string }).body : m.content.body);
const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function device(port: number, clientId: string, opts: mqtt.IClientOptions = {}): Promise<MqttClient> {
  return mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
    clientId,
    protocolVersion: 4,
    reconnectPeriod: 0,
    ...opts,
  });
}

describe("device availability into Matrix (embedded broker)", () => {
  let h: Harness;
  let bridge: RunningBridge;
  let room: string;
  let port: number;
  const clients: MqttClient[] = [];

  before(async () => {
    h = await harness({
      bridges: { mqtt: { home: { embedded: { port: 0 } } } },
      routes: [ROUTE],
    });
    room = h.hs.createRoom({ creator: h.alice, alias: "#home:test.local", preset: "public_chat" });
    const started = await startBridge(h);
    bridge = started.bridge;
    port = started.ports.mqtt;
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.endAsync(true)));
    await bridge?.stop();
    await h?.cleanup();
  });

  test("a Zigbee2MQTT availability topic sets the ghost's presence and one status line, edited per change", async () => {
    const z2m = await device(port, "zigbee2mqtt-bridge");
    clients.push(z2m);
    await z2m.publishAsync("zigbee2mqtt/lamp", JSON.stringify({ state: "ON" }), { qos: 1 });
    await z2m.publishAsync("zigbee2mqtt/lamp/availability", "online", { qos: 1, retain: true });
    const presence = (state: string) => () =>
      h.hs.presenceUpdates.find((p) => p.userId === GHOST("lamp") && p.presence === state);
    await waitFor("lamp online", presence("online"));
    const line = await waitFor("the status line", () =>
      h.hs.messages(room).find((m) => m.sender === GHOST("lamp") && shownText(m).includes("online")),
    );
    assert.match(shownText(line), /^🟢 online since \d{4}-\d\d-\d\d \d\d:\d\d UTC$/);
    assert.equal(line.content.msgtype, "m.notice");

    // Zigbee2MQTT's JSON payload (advanced.legacy_availability_payload: false).
    await z2m.publishAsync("zigbee2mqtt/lamp/availability", JSON.stringify({ state: "offline" }), {
      qos: 1,
      retain: true,
    });
    await waitFor("lamp offline", presence("offline"));
    const edit = await waitFor("the line edited", () =>
      h.hs.messages(room).find((m) => isEdit(m) && shownText(m).includes("offline")),
    );
    assert.equal(edit.sender, GHOST("lamp"));
    assert.deepEqual(edit.content["m.relates_to"], { rel_type: "m.replace", event_id: line.event_id });
    assert.deepEqual(h.hs.profile(GHOST("lamp"))?.displayname, "lamp");

    // The same state again (a retained value replayed): the presence is set again, the line stays.
    const events = h.hs.messages(room).length;
    const puts = h.hs.presenceUpdates.length;
    await z2m.publishAsync("zigbee2mqtt/lamp/availability", "offline", { qos: 1, retain: true });
    await waitFor("presence set again", () => h.hs.presenceUpdates.length > puts);
    await pause(200);
    assert.equal(h.hs.messages(room).length, events, "no new message or edit for a state already shown");

    // Of the lamp, the room got its reading and one status line: no message per change.
    const posted = h.hs.messages(room).filter((m) => m.sender === GHOST("lamp") && !isEdit(m));
    assert.equal(posted.length, 2);
    assert.deepEqual(
      h.hs.presenceUpdates.filter((p) => p.userId === GHOST("lamp")).map((p) => p.presence),
      ["online", "offline", "offline"],
    );
    assert.equal(await bridge.failedJobs().then((f) => f.length), 0);
  });

  test("a Tasmota LWT will, published by the broker when the device's connection is lost, sets it offline", async () => {
    const plug = await device(port, "DVES_plug", {
      will: { topic: "tele/plug/LWT", payload: Buffer.from("Offline"), qos: 1, retain: true },
    });
    await plug.publishAsync("tele/plug/LWT", "Online", { qos: 1, retain: true });
    await plug.publishAsync("tele/plug/SENSOR", "22.5", { qos: 1 });
    await waitFor("plug online", () =>
      h.hs.presenceUpdates.find((p) => p.userId === GHOST("plug") && p.presence === "online"),
    );
    await waitFor("the reading", () =>
      h.hs.messages(room).find((m) => m.sender === GHOST("plug") && m.content.body === "22.5"),
    );
    plug.stream.destroy(); // no DISCONNECT: the broker publishes the will
    await waitFor("plug offline", () =>
      h.hs.presenceUpdates.find((p) => p.userId === GHOST("plug") && p.presence === "offline"),
    );
    await waitFor("the plug's line says offline", () =>
      h.hs.messages(room).find((m) => m.sender === GHOST("plug") && shownText(m).includes("🔴 offline")),
    );
    plug.end(true);
  });

  test("an availability topic with no state in it is relayed as a message, not dropped", async () => {
    const z2m = await device(port, "zigbee2mqtt-odd");
    clients.push(z2m);
    await z2m.publishAsync("zigbee2mqtt/fan/availability", "maybe", { qos: 1 });
    await waitFor("relayed as a message", () =>
      h.hs.messages(room).find((m) => m.sender === GHOST("fan") && m.content.body === "maybe"),
    );
    assert.equal(
      h.hs.presenceUpdates.some((p) => p.userId === GHOST("fan")),
      false,
    );
  });
});

describe("device availability on a homeserver with presence turned off", () => {
  let h: Harness;
  let bridge: RunningBridge;
  let room: string;
  let port: number;

  before(async () => {
    h = await harness({
      bridges: { mqtt: { home: { embedded: { port: 0 } } } },
      routes: [ROUTE],
      homeserver: { presence: "forbidden" },
    });
    room = h.hs.createRoom({ creator: h.alice, alias: "#home:test.local", preset: "public_chat" });
    const started = await startBridge(h);
    bridge = started.bridge;
    port = started.ports.mqtt;
  });

  after(async () => {
    await bridge?.stop();
    await h?.cleanup();
  });

  test("403 M_FORBIDDEN for presence (continuwuity's default): the status line alone, no failed job", async () => {
    const z2m = await device(port, "zigbee2mqtt-bridge");
    try {
      await z2m.publishAsync("zigbee2mqtt/door/availability", "online", { qos: 1 });
      const line = await waitFor("the status line", () =>
        h.hs.messages(room).find((m) => m.sender === GHOST("door") && shownText(m).includes("online")),
      );
      await z2m.publishAsync("zigbee2mqtt/door/availability", "offline", { qos: 1 });
      const edit = await waitFor("the line edited", () =>
        h.hs.messages(room).find((m) => isEdit(m) && shownText(m).includes("offline")),
      );
      assert.deepEqual(edit.content["m.relates_to"], { rel_type: "m.replace", event_id: line.event_id });
      const presencePuts = h.hs.requests.filter((r) => r.path.includes("/presence/"));
      assert.equal(presencePuts.length, 1, "asked once, then not again for a while");
      assert.equal(presencePuts[0]?.status, 403);
      assert.equal(h.hs.presenceUpdates.length, 0);
      assert.equal(await bridge.failedJobs().then((f) => f.length), 0);
    } finally {
      await z2m.endAsync(true);
    }
  });
});

/** A TCP relay to `port` whose connections the test can cut, as a network failure would. */
async function cuttableRelay(port: number): Promise<{ port: number; cut(): void; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  const server: Server = createServer((inbound) => {
    const outbound = tcpConnect(port, "127.0.0.1");
    for (const s of [inbound, outbound]) {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => undefined);
    }
    inbound.pipe(outbound).pipe(inbound);
  });
  const listenPort = await freePort();
  await new Promise<void>((r) => server.listen(listenPort, "127.0.0.1", () => r()));
  return {
    port: listenPort,
    cut: () => {
      for (const s of sockets) s.destroy();
    },
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}

for (const protocolVersion of [5, 4] as const)
  describe(`tribridge's own availability on an external broker, MQTT ${protocolVersion === 5 ? "5" : "3.1.1"}`, () => {
    let h: Harness;
    let broker: Broker;
    let relay: Awaited<ReturnType<typeof cuttableRelay>>;
    let bridge: RunningBridge | undefined;
    let watcher: MqttClient;
    let room: string;
    const topic = `tribridge-test/${randomUUID()}/availability`;
    const seen: { payload: string; retain: boolean }[] = [];

    before(async () => {
      broker = await startExternalBroker();
      relay = await cuttableRelay(broker.port);
      h = await harness({
        bridges: {
          mqtt: {
            ext: {
              url: `mqtt://127.0.0.1:${relay.port}`,
              protocolVersion,
              reconnectPeriodMs: 200,
              availabilityTopic: topic,
              // 3.1.1: a new session at every connect, so retained messages are replayed each time;
              // MQTT 5: a kept session (the default), which the will must not depend on.
              cleanSession: protocolVersion === 4,
            },
          },
        },
        routes: [
          {
            id: "ext",
            room: "#ext:test.local",
            endpoints: [
              {
                account: "mqtt.ext",
                direction: "in",
                topic: "z2m/+/availability",
                sender: { topicLevel: 2 },
                availability: "zigbee2mqtt",
              },
            ],
          },
        ],
      });
      room = h.hs.createRoom({ creator: h.alice, alias: "#ext:test.local", preset: "public_chat" });
      watcher = await mqtt.connectAsync(`mqtt://127.0.0.1:${broker.port}`, { reconnectPeriod: 0 });
      watcher.on("message", (_t, payload, packet) =>
        seen.push({ payload: payload.toString(), retain: packet.retain }),
      );
      await watcher.subscribeAsync(topic, { qos: 1 });
      // A device's availability, retained before tribridge subscribes.
      await watcher.publishAsync("z2m/lamp/availability", "online", { qos: 1, retain: true });
    });

    after(async () => {
      await watcher?.endAsync(true);
      await bridge?.stop();
      await relay?.close();
      await broker?.stop();
      await h?.cleanup();
    });

    test("birth online at connect, the will offline when the connection is lost, online again (a device's retained availability replayed: nothing new in the room), offline at a clean stop", async () => {
      bridge = await start({ config: h.config, registration: h.registration, connectors });
      await waitFor("birth", () => seen.some((s) => s.payload === "online"));

      const lamp = "@_tb_mqtt_ext_lamp:test.local";
      await waitFor("the lamp's status line", () => h.hs.messages(room).find((m) => m.sender === lamp));

      relay.cut(); // the bridge's connection to the broker is gone, without a DISCONNECT
      await waitFor("the will", () => seen.some((s) => s.payload === "offline"));
      await waitFor(
        "birth after the reconnect",
        () => seen.filter((s) => s.payload === "online").length === 2,
      );

      // A new session's subscription replays the lamp's retained state: taken (its presence set
      // again), but the room gets nothing new.
      if (protocolVersion === 4)
        await waitFor(
          "the replayed state taken",
          () => h.hs.presenceUpdates.filter((p) => p.userId === lamp && p.presence === "online").length >= 2,
        );
      await pause(200);
      assert.equal(h.hs.messages(room).filter((m) => m.sender === lamp).length, 1);

      await bridge.stop();
      bridge = undefined;
      await waitFor("offline at the stop", () => seen.filter((s) => s.payload === "offline").length === 2);
      assert.deepEqual(
        seen.map((s) => s.payload),
        ["online", "offline", "online", "offline"],
      );

      // Retained: whoever subscribes later learns that tribridge is offline.
      const late = await mqtt.connectAsync(`mqtt://127.0.0.1:${broker.port}`, { reconnectPeriod: 0 });
      try {
        const retained = new Promise<string>((resolve) =>
          late.on("message", (_t, payload, packet) => packet.retain && resolve(payload.toString())),
        );
        await late.subscribeAsync(topic, { qos: 1 });
        assert.equal(await retained, "offline");
      } finally {
        await late.endAsync(true);
      }
    });
  });
