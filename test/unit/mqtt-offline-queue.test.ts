/**
 * A device's offline queue (a persistent session's QoS 1 messages) reaches it whole on one
 * connection, in order: real mqtt.js clients, real Redis.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import mqtt, { type IClientOptions, type MqttClient } from "mqtt";
import { Redis } from "ioredis";
import { EmbeddedBroker } from "../../bridges/mqtt/embedded-broker.js";
import { embeddedBrokerSchema } from "../../bridges/mqtt/schema.js";
import { moduleLogger } from "../../src/log.js";
import { REDIS_URL, deleteKeys, waitFor } from "../helpers/fixture.js";

const log = moduleLogger("offline-queue-test");
log.level = "silent";

const prefix = `test-${randomUUID().slice(0, 8)}`;
const redis = new Redis(REDIS_URL, { keyPrefix: `${prefix}:` });
let broker: EmbeddedBroker;
const clients: MqttClient[] = [];

before(async () => {
  broker = new EmbeddedBroker(embeddedBrokerSchema.parse({ port: 0 }), log, async () => {}, {
    url: REDIS_URL,
    keyPrefix: `${prefix}:`,
  });
  await broker.start();
});

after(async () => {
  await Promise.all(clients.map((c) => c.endAsync(true)));
  await broker.stop();
  await deleteKeys(prefix);
  redis.disconnect();
});

function connect(options: IClientOptions): MqttClient {
  const c = mqtt.connect(`mqtt://127.0.0.1:${broker.port}`, { reconnectPeriod: 0, ...options });
  clients.push(c);
  return c;
}

/** A device with a persistent session subscribed to `filter`, now offline. */
async function offlineDevice(clientId: string, filter: string): Promise<void> {
  const device = connect({ clientId, clean: false });
  await new Promise((resolve) => device.once("connect", resolve));
  await device.subscribeAsync(filter, { qos: 1 });
  await device.endAsync();
}

/** Connects the device again; every message it receives on this connection, in arrival order. */
function reconnect(clientId: string): { device: MqttClient; received: string[] } {
  const received: string[] = [];
  const device = connect({ clientId, clean: false });
  device.on("message", (_topic, payload) => received.push(payload.toString()));
  return { device, received };
}

test(
  "1,500 messages queued for an offline device are all delivered on one connection, in order",
  { timeout: 60_000 },
  async () => {
    await offlineDevice("queue-1", "queue-1/#");
    for (let i = 0; i < 1500; i++) await broker.publish("queue-1/n", Buffer.from(String(i)), 1, false);
    assert.equal(await redis.llen("outgoing:queue-1"), 1500);

    const { device, received } = reconnect("queue-1");
    let reconnected = 0;
    device.on("connect", () => reconnected++);
    // Before: 1,001 arrived (aedes-persistence-redis' maxSessionDelivery); the rest waited for the next connection.
    await waitFor("1,500 messages", () => received.length >= 1500, 30_000).catch(() => undefined);
    assert.equal(received.length, 1500, `${received.length} of 1,500 delivered on this connection`);
    assert.deepEqual(
      received,
      Array.from({ length: 1500 }, (_, i) => String(i)),
      "in the order they were published",
    );
    assert.equal(reconnected, 1, "on one connection");
    await waitFor("all acknowledged", async () => (await redis.llen("outgoing:queue-1")) === 0);
  },
);

test("messages published while a queue is being delivered arrive too", { timeout: 60_000 }, async () => {
  await offlineDevice("queue-2", "queue-2/#");
  for (let i = 0; i < 1200; i++) await broker.publish("queue-2/n", Buffer.from(String(i)), 1, false);
  const { received } = reconnect("queue-2");
  await waitFor("delivery started", () => received.length > 0, 10_000);
  for (let i = 1200; i < 1300; i++) await broker.publish("queue-2/n", Buffer.from(String(i)), 1, false);
  await waitFor("1,300 messages", () => new Set(received).size >= 1300, 30_000).catch(() => undefined);
  const missing = Array.from({ length: 1300 }, (_, i) => String(i)).filter((m) => !received.includes(m));
  assert.deepEqual(missing, [], "none missing");
  assert.deepEqual(
    received.filter((m) => Number(m) < 1200),
    Array.from({ length: 1200 }, (_, i) => String(i)),
    "the queue in order",
  );
  await waitFor("all acknowledged", async () => (await redis.llen("outgoing:queue-2")) === 0);
});

test(
  "a QoS 2 queue of 1,100 is delivered whole, each message once [MQTT-4.3.3]",
  { timeout: 60_000 },
  async () => {
    const device = connect({ clientId: "queue-3", clean: false });
    await new Promise((resolve) => device.once("connect", resolve));
    await device.subscribeAsync("queue-3/#", { qos: 2 });
    await device.endAsync();
    for (let i = 0; i < 1100; i++) await broker.publish("queue-3/n", Buffer.from(String(i)), 2, false);
    const { device: again, received } = reconnect("queue-3");
    let completed = 0;
    again.on("packetsend", (packet) => packet.cmd === "pubcomp" && completed++);
    await waitFor("1,100 messages", () => received.length >= 1100 && completed >= 1100, 30_000).catch(
      () => undefined,
    );
    assert.deepEqual(
      received,
      Array.from({ length: 1100 }, (_, i) => String(i)),
    );
    assert.equal(completed, 1100, "every exchange completed (PUBCOMP)");
  },
);
