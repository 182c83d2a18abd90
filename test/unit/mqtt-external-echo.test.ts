/**
 * Our own publishes to an external broker must not come back in as device messages, also when the
 * same payload is published several times before any echo arrives (3.1.1 has no no-local; MQTT 5
 * forbids it on shared subscriptions). Real broker (Mosquitto when installed) and real Redis.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { Redis } from "ioredis";
import mqtt from "mqtt";
import { ExternalClient, type ExternalPublish } from "../../bridges/mqtt/external-client.js";
import { mqttAccountSchema } from "../../bridges/mqtt/schema.js";
import type { ConnectorContext } from "../../src/connector.js";
import { moduleLogger } from "../../src/log.js";
import { RedisKeyValueStore } from "../../src/store/redis-store.js";
import { startExternalBroker, type Broker } from "../helpers/brokers.js";
import { REDIS_URL, waitFor } from "../helpers/fixture.js";

const cases = [
  { name: "MQTT 3.1.1", account: { protocolVersion: 4 } },
  { name: "MQTT 5, shared subscription", account: { protocolVersion: 5, shareGroup: "echo" } },
] as const;

let broker: Broker;
const redis = new Redis(REDIS_URL);
before(async () => (broker = await startExternalBroker()));
after(async () => {
  await broker.stop();
  redis.disconnect();
});

for (const { name, account } of cases) {
  describe(name, () => {
    const heard: ExternalPublish[] = [];
    const stopping = new AbortController();
    let client: ExternalClient;

    before(async () => {
      let state = "";
      const ctx: ConnectorContext = {
        log: moduleLogger("test"),
        signal: stopping.signal,
        store: new RedisKeyValueStore(redis, `test-echo-${randomUUID()}:`),
        redis: { url: REDIS_URL, keyPrefix: "unused" },
        instanceId: randomUUID(),
        emit: () => Promise.resolve(),
        quarantine: () => Promise.resolve(),
        setState: (s) => void (state = s),
        runExclusive: () => {
          throw new Error("the MQTT connector runs nothing exclusively");
        },
      };
      const config = mqttAccountSchema.parse({ url: `mqtt://127.0.0.1:${broker.port}`, ...account });
      client = new ExternalClient("plant", { ...config, url: config.url! }, ctx, async (m) => {
        heard.push(m);
      });
      await client.start();
      await waitFor("connected", () => state === "up");
      await client.subscribe(new Map([["plant/chat", 1]])); // resolves on the SUBACK
    });

    after(async () => {
      stopping.abort();
      await client.stop();
    });

    test("the same payload published three times at once: no echo is taken in", async () => {
      await Promise.all(
        [1, 2, 3].map(() => client.publish("plant/chat", Buffer.from("pump on"), 1, false, 2000)),
      );
      await new Promise((r) => setTimeout(r, 300));
      assert.deepEqual(
        heard.map((m) => m.payload.toString()),
        [],
      );
    });

    test("a device publishing the same payload afterwards is heard", async () => {
      const device = await mqtt.connectAsync(`mqtt://127.0.0.1:${broker.port}`);
      await device.publishAsync("plant/chat", "pump on", { qos: 1 });
      await waitFor("the device's message", () => heard.length === 1);
      assert.equal(heard[0]!.payload.toString(), "pump on");
      await device.endAsync();
    });
  });
}
