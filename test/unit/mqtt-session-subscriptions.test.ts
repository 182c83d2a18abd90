/**
 * What a SUBSCRIBE costs the embedded broker, and what a persistent session keeps of it: real
 * mqtt.js clients, real Redis; memory measured in a process of its own (test/helpers/broker-probe.ts).
 */
import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import mqtt, { type IClientOptions, type MqttClient } from "mqtt";
import { Redis } from "ioredis";
import { EmbeddedBroker } from "../../bridges/mqtt/embedded-broker.js";
import { embeddedBrokerSchema } from "../../bridges/mqtt/schema.js";
import { moduleLogger } from "../../src/log.js";
import { brokerProbe } from "../helpers/broker-probe.js";
import { REDIS_URL, deleteKeys, waitFor } from "../helpers/fixture.js";

const log = moduleLogger("session-subscriptions-test");
log.level = "silent";

describe("one SUBSCRIBE costs time and memory linear in its filters", () => {
  test(
    "5,000 filters on a persistent session: SUBACK within 1 s, the first maxFiltersPerSubscribe (1,000) granted and stored once, the rest 0x80 [MQTT-3.8.4-5]; memory bounded, other clients served",
    { timeout: 90_000 },
    async () => {
      const r = await brokerProbe({ scenario: "subscribe", filters: 5000 });
      assert.notEqual(r.subackMs, null, "no SUBACK within 10 s");
      assert.ok(r.subackMs! < 1000, `SUBACK after ${r.subackMs} ms`);
      assert.deepEqual([r.granted, r.refused, r.stored], [1000, 4000, 1000]);
      // Before: quadratic (800 filters took 48 s and 1.4 GB; 5,000 never answered).
      assert.ok(r.peakRssMB - r.before.rssMB < 100, `RSS peaked ${r.peakRssMB - r.before.rssMB} MB higher`);
      assert.ok(r.after.rssMB - r.before.rssMB < 60, `RSS ${r.after.rssMB - r.before.rssMB} MB higher`);
      assert.ok(r.after.heapMB - r.before.heapMB < 30, `heap ${r.after.heapMB - r.before.heapMB} MB higher`);
      assert.ok(r.bystanderMaxMs < 1000, `another client waited ${r.bystanderMaxMs} ms for a PUBACK`);
    },
  );

  test(
    "with maxFiltersPerSubscribe 5,000, all 5,000 are granted and stored once, in bounded memory",
    { timeout: 90_000 },
    async () => {
      const r = await brokerProbe({
        scenario: "subscribe",
        filters: 5000,
        config: { maxFiltersPerSubscribe: 5000 },
      });
      assert.notEqual(r.subackMs, null, "no SUBACK within 10 s");
      assert.deepEqual([r.granted, r.refused, r.stored], [5000, 0, 5000]);
      assert.ok(r.peakRssMB - r.before.rssMB < 150, `RSS peaked ${r.peakRssMB - r.before.rssMB} MB higher`);
      assert.ok(r.after.heapMB - r.before.heapMB < 50, `heap ${r.after.heapMB - r.before.heapMB} MB higher`);
    },
  );
});

describe("a session keeps only the subscriptions that were granted", () => {
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  const redis = new Redis(REDIS_URL, { keyPrefix: `${prefix}:` });
  const brokers: EmbeddedBroker[] = [];
  const clients: MqttClient[] = [];
  after(async () => {
    await Promise.all(clients.map((c) => c.endAsync(true)));
    for (const b of brokers) await b.stop();
    await deleteKeys(prefix);
    redis.disconnect();
  });

  async function start(users: unknown[]): Promise<EmbeddedBroker> {
    const broker = new EmbeddedBroker(embeddedBrokerSchema.parse({ port: 0, users }), log, async () => {}, {
      url: REDIS_URL,
      keyPrefix: `${prefix}:`,
    });
    await broker.start();
    brokers.push(broker);
    return broker;
  }
  async function connect(broker: EmbeddedBroker, options: IClientOptions): Promise<MqttClient> {
    const c = await mqtt.connectAsync(`mqtt://127.0.0.1:${broker.port}`, { reconnectPeriod: 0, ...options });
    clients.push(c);
    return c;
  }
  const storedFilters = async (clientId: string) => (await redis.hkeys(`client:${clientId}`)).sort();
  const queued = (clientId: string) => redis.llen(`outgoing:${clientId}`);
  const admin = { username: "admin", password: "adm" };

  test("[MQTT-3.9.3-2] a filter refused with 0x80 is not stored, and nothing is queued for it", async () => {
    const broker = await start([
      { username: "lamp", password: "l", subscribe: ["lamp/#"] },
      { ...admin, publish: ["#"] },
    ]);
    const lamp = await connect(broker, { username: "lamp", password: "l", clientId: "lamp-1", clean: false });
    const codes = await lamp.subscribeAsync(["lamp/cmd", "other/secret"], { qos: 1 }).then(
      () => assert.fail("other/secret should have been refused"),
      (err: { packet?: { granted?: number[] } }) => err.packet?.granted,
    );
    assert.deepEqual(codes, [1, 128]);
    assert.deepEqual(await storedFilters("lamp-1"), ["lamp/cmd"]);
    await lamp.endAsync();

    const publisher = await connect(broker, { ...admin, clientId: "admin-1" });
    await publisher.publishAsync("other/secret", "not for the lamp", { qos: 1 });
    await publisher.publishAsync("lamp/cmd", "on", { qos: 1 });
    await waitFor("the lamp's message queued", async () => (await queued("lamp-1")) > 0);
    assert.equal(await queued("lamp-1"), 1, "only lamp/cmd is queued for the offline lamp");
  });

  test("a restored session loses the filters its user may no longer subscribe to", async () => {
    const first = await start([{ username: "fan", password: "f", subscribe: ["fan/#", "house/#"] }]);
    const fan = await connect(first, { username: "fan", password: "f", clientId: "fan-1", clean: false });
    await fan.subscribeAsync(["fan/cmd", "house/alarm"], { qos: 1 });
    await fan.endAsync();
    await first.stop();
    brokers.splice(brokers.indexOf(first), 1);
    assert.deepEqual(await storedFilters("fan-1"), ["fan/cmd", "house/alarm"]);

    // The operator narrows the fan's ACL; the broker restarts.
    const second = await start([
      { username: "fan", password: "f", subscribe: ["fan/#"] },
      { ...admin, publish: ["#"] },
    ]);
    const again = await connect(second, { username: "fan", password: "f", clientId: "fan-1", clean: false });
    await waitFor("house/alarm leaves the session", async () =>
      (await storedFilters("fan-1")).join() === "fan/cmd" ? true : undefined,
    );
    await again.endAsync();
    const publisher = await connect(second, { ...admin, clientId: "admin-2" });
    await publisher.publishAsync("house/alarm", "ring", { qos: 1 });
    await publisher.publishAsync("fan/cmd", "on", { qos: 1 });
    await waitFor("the fan's message queued", async () => (await queued("fan-1")) > 0);
    assert.equal(await queued("fan-1"), 1, "only fan/cmd is queued for the offline fan");
  });
});
