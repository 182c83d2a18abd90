/**
 * The embedded broker's Redis commands failing, at stop or while it runs: never an uncaught
 * exception or unhandled rejection that would end the process, and logged when it happens while
 * running. Real mqtt.js clients, real Redis (random key prefixes); failures made deterministic by
 * stopping the broker while aedes is still reading, or by keys of the wrong type (WRONGTYPE).
 */
import { after, afterEach, before, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import mqtt, { type MqttClient } from "mqtt";
import { pino } from "pino";
import { Redis } from "ioredis";
import { EmbeddedBroker } from "../../bridges/mqtt/embedded-broker.js";
import { embeddedBrokerSchema } from "../../bridges/mqtt/schema.js";
import { REDIS_URL, deleteKeys, waitFor } from "../helpers/fixture.js";

/** What ended up uncaught: node:test would otherwise report it against whichever test runs then. */
const uncaught: unknown[] = [];
const noteUncaught = (err: unknown) => void uncaught.push(err);
before(() => {
  process.on("uncaughtException", noteUncaught);
  process.on("unhandledRejection", noteUncaught);
});
after(() => {
  process.off("uncaughtException", noteUncaught);
  process.off("unhandledRejection", noteUncaught);
});

const prefix = `test-${randomUUID().slice(0, 8)}`;
const redis = new Redis(REDIS_URL, { keyPrefix: `${prefix}:` });
const logged: { level: number; msg: string; err?: string }[] = [];
const log = pino({ level: "warn" }, { write: (line: string) => void logged.push(JSON.parse(line)) });
const cleanups: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  logged.length = 0;
});
after(async () => {
  await deleteKeys(prefix);
  redis.disconnect();
});

async function startBroker(): Promise<EmbeddedBroker> {
  const broker = new EmbeddedBroker(embeddedBrokerSchema.parse({ port: 0 }), log, async () => {}, {
    url: REDIS_URL,
    keyPrefix: `${prefix}:`,
  });
  await broker.start();
  return broker;
}

async function connect(broker: EmbeddedBroker, options: mqtt.IClientOptions = {}): Promise<MqttClient> {
  const client = await mqtt.connectAsync(`mqtt://127.0.0.1:${broker.port}`, {
    reconnectPeriod: 0,
    ...options,
  });
  cleanups.push(() => client.endAsync(true));
  return client;
}

/** Lets whatever aedes still had under way after a stop run out (and fail, if it does). */
const settle = () => new Promise((resolve) => setTimeout(resolve, 50));

test(
  "stopping the broker right after a SUBACK, while aedes still looks up retained messages, leaves no Redis command to fail",
  { timeout: 60_000 },
  async () => {
    // aedes writes the SUBACK, then reads the retained message of each filter in turn (one HGET
    // each): a stop at the SUBACK quits Redis while those reads go on. Before the fix, the next read
    // failed ("Connection is closed.") in a stream nothing listened to: an uncaught exception, every time.
    const filters = Array.from({ length: 50 }, (_, i) => `lamp/${i}/cmd`);
    for (let round = 0; round < 10; round++) {
      const broker = await startBroker();
      const lamp = await connect(broker, { clientId: `lamp-${round}`, clean: round % 2 === 0 });
      await lamp.subscribeAsync(filters, { qos: 1 });
      await broker.stop();
      await settle();
      assert.deepEqual(uncaught, [], `round ${round}`);
    }
    assert.deepEqual(
      logged.map((l) => l.msg),
      [],
      "a stop is no failure: nothing is logged",
    );
  },
);

test(
  "stopping the broker while persistent sessions disconnect and connect, many times, leaves nothing uncaught",
  { timeout: 60_000 },
  async () => {
    for (let round = 0; round < 10; round++) {
      const broker = await startBroker();
      const will = { topic: "fan/LWT", payload: Buffer.from("Offline"), qos: 1 as const, retain: true };
      const fan = await connect(broker, { clientId: `fan-${round}`, clean: false, will });
      await fan.subscribeAsync(["fan/cmd", "house/#"], { qos: 1 });
      const ending = fan.endAsync();
      // Another device connecting with a will as the broker stops: CONNECT's will writes race the quit.
      const late = mqtt.connect(`mqtt://127.0.0.1:${broker.port}`, {
        clientId: `late-${round}`,
        clean: false,
        will,
        reconnectPeriod: 0,
      });
      late.on("error", () => undefined);
      cleanups.push(() => late.endAsync(true));
      await broker.stop();
      await ending;
      await settle();
      assert.deepEqual(uncaught, [], `round ${round}`);
    }
  },
);

test("a retained lookup Redis refuses while the broker runs is logged; the subscriber stays connected", async () => {
  const broker = await startBroker();
  cleanups.push(() => broker.stop());
  // The retained messages' hash is a string now: HGET answers WRONGTYPE.
  await redis.set("retained", "not a hash");
  cleanups.push(() => redis.del("retained"));
  const lamp = await connect(broker, { clientId: "lamp-wrongtype" });
  await lamp.subscribeAsync("lamp/cmd", { qos: 1 });
  const entry = await waitFor("the failure logged", async () =>
    logged.find((l) => l.msg === "mqtt retained messages not sent"),
  );
  assert.match(entry.err ?? "", /WRONGTYPE/);
  await lamp.publishAsync("lamp/state", "on", { qos: 1 }); // acknowledged: still connected
  assert.ok(lamp.connected);
  await settle();
  assert.deepEqual(uncaught, []);
});

test("a will Redis refuses to clear at CONNECT is logged; the device is admitted", async () => {
  const broker = await startBroker();
  cleanups.push(() => broker.stop());
  // aedes clears the client's old will at CONNECT (GET, then DEL): a hash there answers WRONGTYPE.
  // (aedes 1.2.0 looks it up under the broker id "undefined".)
  const key = "will:undefined:plug-wrongtype";
  await redis.hset(key, "field", "value");
  cleanups.push(() => redis.del(key));
  const will = { topic: "plug/LWT", payload: Buffer.from("Offline"), qos: 1 as const, retain: true };
  const plug = await connect(broker, { clientId: "plug-wrongtype", will });
  assert.ok(plug.connected);
  const entry = await waitFor("the failure logged", async () =>
    logged.find((l) => l.msg === "mqtt will not cleared"),
  );
  assert.match(entry.err ?? "", /WRONGTYPE/);
  await settle();
  assert.deepEqual(uncaught, []);
});
