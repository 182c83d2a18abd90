/**
 * What the MQTT connector relays from devices on its embedded broker: redeliveries only within a
 * resumed session, live retained publishes, and no empty message for a deleted retained one. Real
 * broker, real mqtt.js devices, real Redis.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { Redis } from "ioredis";
import mqtt, { type IClientOptions, type MqttClient } from "mqtt";
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

test("a device resuming its session re-sends a message whose PUBACK it never got: same remoteId", async () => {
  const d = await device({ clientId: "door-persistent", clean: false, reconnectPeriod: 100 });
  // The connection drops after the message is enqueued, before the PUBACK reaches the device.
  onEmit = (m) => {
    if (m.stream === "door/back" && bodies("door/back").length === 1) d.stream.destroy();
  };
  void d.publishAsync("door/back", "ajar", { qos: 1 });
  await waitFor("re-sent", () => bodies("door/back").length === 2);
  onEmit = () => {};
  const [first, again] = bodies("door/back");
  assert.equal(again!.remoteId, first!.remoteId, "the core drops it as the same message");
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
