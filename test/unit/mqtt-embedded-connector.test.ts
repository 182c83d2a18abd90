/**
 * What the MQTT connector relays from devices on its embedded broker: redeliveries (DUP) only within
 * a resumed session, live retained publishes, and no empty message for a deleted retained one. Real
 * broker, real mqtt.js devices, real Redis.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { Redis } from "ioredis";
import mqtt, { Store, type IClientOptions, type MqttClient, type Packet } from "mqtt";
import { MqttConnector } from "../../bridges/mqtt/connector.js";
import { mqttAccountSchema, mqttEndpointSchema, type MqttEndpoint } from "../../bridges/mqtt/schema.js";
import type { ConnectorContext, EndpointBinding, InboundMessage } from "../../src/connector.js";
import { moduleLogger } from "../../src/log.js";
import { RedisKeyValueStore } from "../../src/store/redis-store.js";
import { REDIS_URL, deleteKeys, waitFor } from "../helpers/fixture.js";

const log = moduleLogger("embedded-connector-test");
log.level = "silent";
const prefix = `test-${randomUUID().slice(0, 8)}`;
const redis = new Redis(REDIS_URL);
const emitted: InboundMessage[] = [];
let onEmit: (m: InboundMessage) => void = () => {};
const stopping = new AbortController();
let connector: MqttConnector;
const devices: MqttClient[] = [];

function endpoint(id: string, spec: Record<string, unknown>): EndpointBinding<MqttEndpoint> {
  return { id, direction: "in", spec: mqttEndpointSchema.parse(spec) };
}

before(async () => {
  const ctx: ConnectorContext = {
    log,
    signal: stopping.signal,
    store: new RedisKeyValueStore(redis, `${prefix}:store:`),
    redis: { url: REDIS_URL, keyPrefix: `${prefix}:aedes:` },
    instanceId: "instance-1",
    quarantine: () => Promise.resolve(),
    emit: async (m) => {
      emitted.push(m);
      onEmit(m);
    },
    setState: () => {},
    runExclusive: () => {
      throw new Error("the MQTT connector runs nothing exclusively");
    },
  };
  connector = new MqttConnector("home", mqttAccountSchema.parse({ embedded: { port: 0 } }), ctx);
  await connector.start();
  await connector.watch([
    endpoint("door", { topic: "door/#" }),
    endpoint("state", { topic: "tele/+/STATE", ignoreRetained: true }),
  ]);
});

after(async () => {
  await Promise.all(devices.map((d) => d.endAsync(true)));
  stopping.abort();
  await connector.stop();
  redis.disconnect();
  await deleteKeys(prefix);
});

async function device(options: IClientOptions): Promise<MqttClient> {
  const client = await mqtt.connectAsync(`mqtt://127.0.0.1:${connector.ports!.tcp}`, options);
  devices.push(client);
  return client;
}

const bodies = (topic: string) => emitted.filter((m) => m.stream === topic);

/** Packet ids from 1 on every connection, as a device that rebooted uses them. */
class FromOne {
  private n = 0;
  allocate(): number {
    return ++this.n;
  }
  getLastAllocated(): number {
    return this.n;
  }
  register(): boolean {
    return true;
  }
  deallocate(): void {}
  clear(): void {
    this.n = 0;
  }
}

test("a rebooted device (new session, packet ids from 1) saying the same thing again is relayed again", async () => {
  for (let boot = 1; boot <= 2; boot++) {
    const d = await device({ clientId: "door-sensor", clean: true, messageIdProvider: new FromOne() });
    await d.publishAsync("door/front", "open", { qos: 1 });
    await d.endAsync();
  }
  const relayed = bodies("door/front");
  assert.deepEqual(
    relayed.map((m) => m.body.text),
    ["open", "open"],
  );
  assert.notEqual(relayed[0]!.remoteId, relayed[1]!.remoteId);
});

/** An outgoing store that marks what it keeps as DUP, so a re-send carries it [MQTT-3.3.1-1] (mqtt.js does not). */
class DupOnResend extends Store {
  override put(packet: Packet, cb: Parameters<Store["put"]>[1]): this {
    return super.put(packet.cmd === "publish" ? { ...packet, dup: true } : packet, cb);
  }
}

/** The device's connection drops after the first copy of `topic` is enqueued, before its PUBACK. */
async function resendAfterLostPuback(topic: string, options: IClientOptions): Promise<InboundMessage[]> {
  const d = await device({ clean: false, reconnectPeriod: 100, ...options });
  onEmit = (m) => {
    if (m.stream === topic && bodies(topic).length === 1) d.stream.destroy();
  };
  void d.publishAsync(topic, "ajar", { qos: 1 });
  await waitFor("re-sent", () => bodies(topic).length === 2);
  onEmit = () => {};
  return bodies(topic);
}

test("[MQTT-4.4.0-1] a device resuming its session re-sends, with DUP, a message whose PUBACK it never got: same remoteId", async () => {
  const [first, again] = await resendAfterLostPuback("door/back", {
    clientId: "door-persistent",
    outgoingStore: new DupOnResend(),
  });
  assert.equal(again!.remoteId, first!.remoteId, "the core drops it as the same message");
});

test("a re-send without DUP (mqtt.js) is relayed again: it cannot be told from a rebooted device's new message", async () => {
  const [first, again] = await resendAfterLostPuback("door/side", { clientId: "door-mqttjs" });
  assert.notEqual(again!.remoteId, first!.remoteId, "a duplicate in the room, rather than a loss");
});

test("a rebooted device with cleanSession 0 (new connection, packet ids from 1) saying ON, ON again: all four relayed", async () => {
  for (let boot = 1; boot <= 2; boot++) {
    const d = await device({ clientId: "plug-persistent", clean: false, messageIdProvider: new FromOne() });
    await d.publishAsync("door/plug", "ON", { qos: 1 });
    await d.publishAsync("door/plug", "ON", { qos: 1 });
    await d.endAsync();
  }
  const relayed = bodies("door/plug");
  assert.deepEqual(
    relayed.map((m) => m.body.text),
    ["ON", "ON", "ON", "ON"],
  );
  assert.equal(new Set(relayed.map((m) => m.remoteId)).size, 4, "none taken for a redelivery of another");
});

test("ignoreRetained does not skip live retained publishes (Tasmota PowerRetain, Zigbee2MQTT retain)", async () => {
  const d = await device({ clientId: "tasmota-1" });
  await d.publishAsync("tele/tasmota-1/STATE", '{"POWER":"ON"}', { qos: 1, retain: true });
  await d.publishAsync("tele/tasmota-1/STATE", '{"POWER":"OFF"}', { qos: 1 });
  await waitFor("both", () => bodies("tele/tasmota-1/STATE").length === 2);
  await d.publishAsync("tele/tasmota-1/STATE", "", { qos: 1, retain: true });
});

test("an empty retained publish deletes the retained message and is not relayed as an empty message", async () => {
  const d = await device({ clientId: "door-retained" });
  await d.publishAsync("door/garage", "closed", { qos: 1, retain: true });
  await d.publishAsync("door/garage", "", { qos: 1, retain: true });
  await d.publishAsync("door/garage", "after", { qos: 1 });
  await waitFor("after", () => bodies("door/garage").some((m) => m.body.text === "after"));
  assert.deepEqual(
    bodies("door/garage").map((m) => m.body.text),
    ["closed", "after"],
  );
  const watcher = await device({ clientId: "watcher" });
  const retained: string[] = [];
  watcher.on("message", (_t, payload) => retained.push(payload.toString()));
  await watcher.subscribeAsync("door/garage", { qos: 1 });
  await new Promise((resolve) => setTimeout(resolve, 200));
  assert.deepEqual(retained, [], "the retained message is gone");
});
