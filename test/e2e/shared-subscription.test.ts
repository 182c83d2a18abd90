/**
 * Two tribridge instances on one external broker with `shareGroup`: the broker hands each message
 * to one of them, so every message reaches the room once, and neither instance takes the other's
 * publish for a device's. Needs Mosquitto (aedes has no shared subscriptions); .ci/run installs it.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import mqtt, { type MqttClient } from "mqtt";
import { connectors } from "../../bridges/index.js";
import { start, type RunningBridge } from "../../src/app.js";
import { PLANT_ROUTE, hasMosquitto, startMosquitto, type Broker } from "../helpers/brokers.js";
import { freePort, harness, tempDataDir, waitFor, type Harness } from "../helpers/fixture.js";

async function receivedBy(bridge: RunningBridge): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${bridge.metricsPort}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith("tribridge_messages_received_total{"));
  return line ? Number(line.split(" ")[1]) : 0;
}

for (const protocolVersion of [5, 4] as const) {
  describe(
    `two instances in one shared-subscription group, MQTT ${protocolVersion === 5 ? "5" : "3.1.1"}`,
    {
      skip: !hasMosquitto && "mosquitto is not installed",
    },
    () => {
      let broker: Broker;
      let h: Harness;
      const bridges: RunningBridge[] = [];
      let room: string;
      let device: MqttClient;

      before(async () => {
        broker = (await startMosquitto())!;
        h = await harness({
          metrics: { enabled: true, port: await freePort() },
          bridges: {
            mqtt: {
              plant: { url: `mqtt://127.0.0.1:${broker.port}`, protocolVersion, shareGroup: "tribridge" },
            },
          },
          routes: [PLANT_ROUTE],
        });
        room = h.hs.createRoom({ creator: h.alice, alias: "#plant:test.local", preset: "public_chat" });
        // The second instance: same Redis queues and broker, its own ports and data directory.
        const second = {
          ...h.config,
          dataDir: tempDataDir(),
          appservice: { ...h.config.appservice, port: await freePort() },
          metrics: { ...h.config.metrics, port: await freePort() },
        };
        for (const config of [h.config, second])
          bridges.push(await start({ config, registration: h.registration, connectors }));
        await waitFor("both connected", () =>
          bridges.every((b) => b.connectorStates()["mqtt.plant"]?.state === "up"),
        );
        device = await mqtt.connectAsync(`mqtt://127.0.0.1:${broker.port}`, {
          clientId: `device-${protocolVersion}`,
        });
        await new Promise((r) => setTimeout(r, 300)); // subscriptions settle
      });

      after(async () => {
        await device?.endAsync();
        for (const b of bridges) await b.stop();
        await h?.cleanup();
        await broker?.stop();
      });

      test("each message reaches the room once, and both instances take a share", async () => {
        const sent = Array.from({ length: 40 }, (_, i) => `s${i}`);
        for (const body of sent) await device.publishAsync("plant/pump1/state", body, { qos: 1 });
        await h.hs.waitForMessages(room, 40);
        await new Promise((r) => setTimeout(r, 300));
        const bodies = h.hs.messages(room).map((m) => String(m.content.body));
        assert.deepEqual([...bodies].sort(), [...sent].sort(), "every message once");
        const shares = await Promise.all(bridges.map(receivedBy));
        assert.equal(shares[0]! + shares[1]!, 40);
        assert.ok(
          shares.every((n) => n > 0),
          `both instances ingest: ${shares.join(" + ")}`,
        );
      });

      test("a room message published by one instance is not taken back in by the other", async () => {
        const before = h.hs.messages(room).length;
        await device.subscribeAsync("plant/chat", { qos: 1 });
        const heard: string[] = [];
        device.on("message", (topic, payload) => topic === "plant/chat" && heard.push(payload.toString()));
        // Two of them the same: each is published, and neither echo is taken back in.
        for (let i = 0; i < 6; i++)
          h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: `cmd ${Math.min(i, 4)}` });
        await waitFor("the device to hear all six", () => heard.length >= 6);
        await new Promise((r) => setTimeout(r, 500));
        const echoed = h.hs
          .messages(room)
          .slice(before)
          .filter((m) => m.sender !== h.alice);
        assert.deepEqual(
          echoed.map((m) => m.content.body),
          [],
          "no echo into the room",
        );
      });
    },
  );
}
