/**
 * The subscriptions tribridge holds on an external broker (Mosquitto when installed): kept in step
 * with the routes across restarts of a persistent session, at most QoS 1, one per overlapping
 * group of filters; and redelivery detection only where the broker resumed the session.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { Redis } from "ioredis";
import mqtt, { type MqttClient } from "mqtt";
import { MqttConnector } from "../../bridges/mqtt/connector.js";
import { ExternalClient } from "../../bridges/mqtt/external-client.js";
import { mqttAccountSchema, mqttEndpointSchema, type MqttEndpoint } from "../../bridges/mqtt/schema.js";
import type { ConnectorContext, EndpointBinding, InboundMessage } from "../../src/connector.js";
import { moduleLogger } from "../../src/log.js";
import { RedisKeyValueStore } from "../../src/store/redis-store.js";
import { startExternalBroker, type Broker } from "../helpers/brokers.js";
import { REDIS_URL, deleteKeys, waitFor } from "../helpers/fixture.js";

const log = moduleLogger("external-session-test");
log.level = "silent";
const prefix = `test-${randomUUID().slice(0, 8)}`;
const redis = new Redis(REDIS_URL);
let broker: Broker;
let device: MqttClient;
const url = () => `mqtt://127.0.0.1:${broker.port}`;
const stops: (() => Promise<void>)[] = [];

before(async () => {
  broker = await startExternalBroker();
  device = await mqtt.connectAsync(url(), { clientId: `device-${randomUUID().slice(0, 8)}` });
});
after(async () => {
  for (const stop of stops.reverse()) await stop();
  await device.endAsync();
  await broker.stop();
  redis.disconnect();
  await deleteKeys(prefix);
});

/** A context whose store outlives one "run", as Redis does across restarts. */
function context(store = "store"): { ctx: ConnectorContext; emitted: InboundMessage[]; state: () => string } {
  const emitted: InboundMessage[] = [];
  let state = "";
  const stopping = new AbortController();
  stops.push(async () => stopping.abort());
  const ctx: ConnectorContext = {
    log,
    signal: stopping.signal,
    store: new RedisKeyValueStore(redis, `${prefix}:${store}:`),
    redis: { url: REDIS_URL, keyPrefix: `${prefix}:unused:` },
    instanceId: "instance-1",
    emit: async (m) => void emitted.push(m),
    quarantine: () => Promise.resolve(),
    setState: (s) => void (state = s),
    runExclusive: () => {
      throw new Error("the MQTT connector runs nothing exclusively");
    },
  };
  return { ctx, emitted, state: () => state };
}

function endpoint(id: string, spec: Record<string, unknown>): EndpointBinding<MqttEndpoint> {
  return { id, direction: "in", spec: mqttEndpointSchema.parse(spec) };
}

const root = () => `t${randomUUID().slice(0, 8)}`;

for (const protocolVersion of [5, 4] as const) {
  const name = protocolVersion === 5 ? "MQTT 5" : "MQTT 3.1.1";

  describe(`${name}: a persistent session across restarts`, () => {
    test("a filter added between runs is subscribed, a removed one unsubscribed, retained messages not replayed again", async () => {
      const r = root();
      const clientId = `session-${randomUUID().slice(0, 8)}`;
      const store = `session-${protocolVersion}`;
      for (const level of ["a", "b", "c"])
        await device.publishAsync(`${r}/${level}`, `retained ${level}`, { qos: 1, retain: true });

      async function run(filters: string[]): Promise<{ client: ExternalClient; heard: string[] }> {
        const { ctx, state } = context(store);
        const heard: string[] = [];
        const account = mqttAccountSchema.parse({ url: url(), protocolVersion, clientId });
        const client = new ExternalClient("acct", { ...account, url: url() }, ctx, async (m) => {
          heard.push(m.payload.toString());
        });
        stops.push(() => client.stop());
        await client.start();
        // as the connector does: routes are handed over before the broker has answered
        await client.subscribe(new Map(filters.map((f) => [`${r}/${f}`, 1])));
        await waitFor("connected", () => state() === "up");
        return { client, heard };
      }

      const first = await run(["a", "c"]);
      await waitFor("retained messages of the first run", () => first.heard.length === 2);
      await first.client.stop();

      const second = await run(["a", "b"]);
      await waitFor("the retained message of the new filter", () => second.heard.includes("retained b"));
      for (const level of ["a", "b", "c"])
        await device.publishAsync(`${r}/${level}`, `live ${level}`, { qos: 1 });
      await waitFor("live b", () => second.heard.includes("live b"));
      await new Promise((resolve) => setTimeout(resolve, 300));
      assert.deepEqual(second.heard.sort(), ["live a", "live b", "retained b"]);
      for (const level of ["a", "b", "c"])
        await device.publishAsync(`${r}/${level}`, "", { qos: 1, retain: true });
    });
  });

  describe(`${name}: subscriptions`, () => {
    test("a QoS 2 route is subscribed at QoS 1, so a message whose enqueue failed comes again", async () => {
      const r = root();
      const { ctx, state } = context();
      const heard: string[] = [];
      let failed = false;
      const account = mqttAccountSchema.parse({
        url: url(),
        protocolVersion,
        clientId: `qos2-${randomUUID().slice(0, 8)}`,
        reconnectPeriodMs: 100,
      });
      const client = new ExternalClient("acct", { ...account, url: url() }, ctx, async (m) => {
        heard.push(m.payload.toString());
        if (!failed) {
          failed = true;
          throw new Error("redis down");
        }
      });
      stops.push(() => client.stop());
      await client.start();
      await waitFor("connected", () => state() === "up");
      await client.subscribe(new Map([[`${r}/q`, 2]]));
      await device.publishAsync(`${r}/q`, "exactly once", { qos: 2 });
      await waitFor("delivered again", () => heard.length === 2);
      assert.deepEqual(heard, ["exactly once", "exactly once"]);
    });

    test("overlapping filters (a/# and a/door): one copy of each message, to each matching endpoint once", async () => {
      const r = root();
      const { ctx, emitted, state } = context();
      const account = mqttAccountSchema.parse({
        url: url(),
        protocolVersion,
        clientId: `overlap-${randomUUID().slice(0, 8)}`,
        cleanSession: true,
      });
      const connector = new MqttConnector("acct", account, ctx);
      stops.push(() => connector.stop());
      await connector.start();
      await waitFor("connected", () => state() === "up");
      await connector.watch([
        endpoint("all", { topic: `${r}/#`, qos: 0 }),
        endpoint("door", { topic: `${r}/door` }),
        endpoint("also-door", { topic: `${r}/+` }),
      ]);
      await device.publishAsync(`${r}/door`, "open", { qos: 1 });
      await device.publishAsync(`${r}/window`, "shut", { qos: 1 });
      await waitFor("relayed", () => emitted.length >= 4);
      await new Promise((resolve) => setTimeout(resolve, 300));
      assert.deepEqual(emitted.map((m) => `${m.endpointIds.join()}:${m.body.text}`).sort(), [
        "all:open",
        "all:shut",
        "also-door:open",
        "also-door:shut",
        "door:open",
      ]);
    });
  });

  describe(`${name}: redelivery detection`, () => {
    test("an enqueue kept and its record lost: the broker's re-send (DUP) comes under the same remoteId", async () => {
      const r = root();
      const base = context();
      const store = base.ctx.store;
      let loseRecord = false;
      const emitted: string[] = [];
      const ctx: ConnectorContext = {
        ...base.ctx,
        // The record of one message is lost, as in a crash after its enqueue: it is not acknowledged.
        store: Object.assign(Object.create(store) as typeof store, {
          setInMap: async (key: string, fields: Record<string, string>, ttlMs?: number) => {
            if (loseRecord) {
              loseRecord = false;
              throw new Error("killed before the record was written");
            }
            return store.setInMap(key, fields, ttlMs);
          },
        }),
        emit: async (m) => void emitted.push(`${m.body.text} ${m.remoteId}`),
      };
      const account = mqttAccountSchema.parse({
        url: url(),
        protocolVersion,
        clientId: `lost-record-${randomUUID().slice(0, 8)}`,
        reconnectPeriodMs: 100,
      });
      const connector = new MqttConnector("acct", account, ctx);
      stops.push(() => connector.stop());
      await connector.start();
      await waitFor("connected", () => base.state() === "up");
      await connector.watch([endpoint("light", { topic: `${r}/+` })]);
      await device.publishAsync(`${r}/1`, "one", { qos: 1 });
      await waitFor("first", () => emitted.length === 1);
      loseRecord = true;
      await device.publishAsync(`${r}/1`, "two", { qos: 1 });
      await waitFor("the re-send", () => emitted.length === 3);
      const [, two, again] = emitted;
      assert.ok(two!.startsWith("two ") && again!.startsWith("two "), emitted.join(", "));
      assert.equal(again, two, "the same remoteId, which the core relays once");
    });

    test("in a new session the broker numbers from 1 again: the same id, topic and payload is a new message", async () => {
      const r = root();
      const { ctx, emitted, state } = context();
      const account = mqttAccountSchema.parse({
        url: url(),
        protocolVersion,
        clientId: `fresh-${randomUUID().slice(0, 8)}`,
        cleanSession: true,
        reconnectPeriodMs: 100,
      });
      const connector = new MqttConnector("acct", account, ctx);
      stops.push(() => connector.stop());
      await connector.start();
      await waitFor("connected", () => state() === "up");
      await connector.watch([endpoint("light", { topic: `${r}/+` })]);
      await device.publishAsync(`${r}/1`, "ON", { qos: 1 });
      await waitFor("first", () => emitted.length === 1);

      // The connection drops; the new session's subscriptions are back once the SUBACK arrives.
      const client = (connector as unknown as { external: { client: MqttClient } }).external.client;
      const resubscribed = new Promise<void>((resolve) =>
        client.on("packetreceive", (p) => p.cmd === "suback" && resolve()),
      );
      client.stream.destroy();
      await resubscribed;
      await device.publishAsync(`${r}/1`, "ON", { qos: 1 });
      await waitFor("second", () => emitted.length === 2);
      assert.notEqual(emitted[0]!.remoteId, emitted[1]!.remoteId);
    });
  });
}
