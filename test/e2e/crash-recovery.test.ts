/**
 * The bridge process is killed with SIGKILL in the middle of 1,000 QoS 1 messages and started
 * again: every message must be in the room exactly once, in order.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import mqtt, { type MqttClient } from "mqtt";
import { BridgeProcess } from "../helpers/bridge-process.js";
import { freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";

const TOTAL = 1000;
let h: Harness;
let bridge: BridgeProcess;
let device: MqttClient | undefined;

before(async () => {
  const port = await freePort();
  h = await harness({
    bridges: { mqtt: { home: { embedded: { port } } } },
    routes: [
      {
        id: "crash",
        room: "#crash:test.local",
        endpoints: [{ account: "mqtt.home", direction: "in", topic: "seq/#", sender: "clientId" }],
      },
    ],
  });
  bridge = new BridgeProcess(h);
});

after(async () => {
  await device?.endAsync(true);
  await bridge?.kill("SIGKILL");
  await h?.cleanup();
});

test(
  `SIGKILL during ${TOTAL} QoS 1 messages: each arrives exactly once, in order`,
  { timeout: 120_000 },
  async () => {
    const room = h.hs.createRoom({ creator: h.alice, alias: "#crash:test.local", preset: "public_chat" });
    bridge.start();
    const port = (h.config.accounts[0]!.config as { embedded: { port: number } }).embedded.port;
    device = await waitForConnect(port);

    for (let i = 0; i < TOTAL; i++)
      void device.publishAsync("seq/counter", String(i), { qos: 1 }).catch(() => undefined);
    await waitFor("some messages before the kill", () => h.hs.messages(room).length >= 150, 60_000);
    await bridge.kill("SIGKILL");
    const atKill = h.hs.messages(room).length;

    bridge.start();
    await h.hs.waitForMessages(room, TOTAL, 90_000);
    await new Promise((r) => setTimeout(r, 1000)); // a duplicate would show up by now
    const bodies = h.hs.messages(room).map((m) => Number(m.content.body));
    assert.ok(atKill < TOTAL, `the kill happened mid-stream (${atKill} of ${TOTAL} were in)`);
    assert.equal(bodies.length, TOTAL, "no duplicates");
    assert.deepEqual(
      bodies,
      Array.from({ length: TOTAL }, (_, i) => i),
    );
  },
);

async function waitForConnect(port: number): Promise<MqttClient> {
  const client = mqtt.connect(`mqtt://127.0.0.1:${port}`, {
    clientId: "counter",
    protocolVersion: 4,
    reconnectPeriod: 100,
    clean: true,
  });
  await waitFor("device connected", () => client.connected, 30_000);
  return client;
}
