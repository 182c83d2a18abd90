/**
 * The embedded broker against MQTT 3.1.1 where clients get it wrong or push it: malformed strings,
 * empty (un)subscriptions, an MQTT 5 CONNECT, session present for every kind of session, topics
 * longer or deeper than the configured limits. Raw
 * packets on a real socket where mqtt.js would not send them, mqtt.js elsewhere; real Redis.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { Redis } from "ioredis";
import mqtt, { type IClientOptions, type MqttClient } from "mqtt";
import { pino } from "pino";
import { EmbeddedBroker, type IncomingPublish } from "../../bridges/mqtt/embedded-broker.js";
import { MQTT_DEFAULTS, embeddedBrokerSchema } from "../../bridges/mqtt/schema.js";
import { REDIS_URL, deleteKeys, waitFor } from "../helpers/fixture.js";
import { embeddedBrokers } from "../helpers/embedded-brokers.js";
import {
  RawClient,
  connack,
  connect,
  publish,
  pubrel,
  subscribe,
  unsubscribe,
  type ConnectFields,
} from "../helpers/mqtt-raw.js";

/** Log lines the broker wrote, parsed. */
const lines: { level: number; msg: string; [key: string]: unknown }[] = [];
const log = pino({ level: "info" }, { write: (line: string) => void lines.push(JSON.parse(line)) });

const DISCONNECT = Buffer.from([0xe0, 0]);
const redis = new Redis(REDIS_URL);

describe("embedded broker: MQTT 3.1.1 conformance", () => {
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  const ingested: IncomingPublish[] = [];
  let broker: EmbeddedBroker;
  const raws: RawClient[] = [];

  before(async () => {
    broker = new EmbeddedBroker(
      embeddedBrokerSchema.parse({
        port: 0,
        allowAnonymous: true,
        users: [{ username: "sensor", password: "pw" }],
      }),
      log,
      async (msg) => void ingested.push(msg),
      { url: REDIS_URL, keyPrefix: `${prefix}:` },
    );
    await broker.start();
  });

  after(async () => {
    for (const raw of raws) raw.close();
    await broker.stop();
    redis.disconnect();
    await deleteKeys(prefix);
  });

  async function open(): Promise<RawClient> {
    const raw = await RawClient.open(broker.port);
    raws.push(raw);
    return raw;
  }

  /** A connection that CONNECTed and got CONNACK 0; `sessionPresent` as the broker said. */
  async function connected(fields: ConnectFields): Promise<{ raw: RawClient; sessionPresent: number }> {
    const raw = await open();
    const [type, , sessionPresent, returnCode] = await raw.send(connect(fields)).reply(4);
    assert.deepEqual([type, returnCode], [0x20, 0], `CONNACK for ${String(fields.clientId)}`);
    return { raw, sessionPresent: sessionPresent! };
  }

  /** Ill-formed UTF-8 [Unicode §3.9, RFC 3629]: each is refused, in whatever string it stands. */
  const illFormed: [string, Buffer][] = [
    ["a UTF-16 surrogate (U+D800 as ED A0 80)", Buffer.from([0x64, 0xed, 0xa0, 0x80])],
    ["an overlong '/' (C0 AF)", Buffer.from([0x64, 0xc0, 0xaf])],
    ["a truncated sequence (C3 at the end)", Buffer.from([0x64, 0xc3])],
    ["a byte that never occurs (FF)", Buffer.from([0x64, 0xff, 0x65])],
    ["a continuation byte alone (80)", Buffer.from([0x80, 0x64])],
    ["a code point above U+10FFFF (F4 90 80 80)", Buffer.from([0x64, 0xf4, 0x90, 0x80, 0x80])],
  ];

  test("[MQTT-1.5.3-1] ill-formed UTF-8 in a client id closes the connection, with no CONNACK", async () => {
    for (const [what, bad] of illFormed) {
      const raw = await open();
      raw.send(connect({ clientId: bad }));
      await raw.waitClosed();
      assert.deepEqual(raw.received, [], what);
    }
  });

  test("[MQTT-1.5.3-1] ill-formed UTF-8 in a user name or a will topic closes the connection, with no CONNACK", async () => {
    for (const [what, bad] of illFormed) {
      const asUser = await open();
      asUser.send(connect({ clientId: "bad-user", username: bad, password: "pw" }));
      const asWill = await open();
      asWill.send(
        connect({ clientId: "bad-will", will: { topic: Buffer.concat([Buffer.from("d/"), bad]) } }),
      );
      await asUser.waitClosed();
      await asWill.waitClosed();
      assert.deepEqual(asUser.received, [], `user name with ${what}`);
      assert.deepEqual(asWill.received, [], `will topic with ${what}`);
    }
    // The will was never stored, so nothing is published for it when the connection ends.
    assert.ok(!ingested.some((m) => m.clientId === "bad-will"), "no will published");
  });

  test("[MQTT-1.5.3-1] ill-formed UTF-8 in a PUBLISH topic closes the connection: no PUBACK, nothing ingested", async () => {
    for (const [what, bad] of illFormed) {
      const { raw } = await connected({ clientId: "bad-topic" });
      raw.send(publish(Buffer.concat([Buffer.from("d/"), bad]), "x", 1, 7));
      await raw.waitClosed();
      assert.deepEqual(raw.received, connack(0, 0), `only the CONNACK (${what})`);
    }
    assert.ok(!ingested.some((m) => m.clientId === "bad-topic"));
  });

  test("[MQTT-1.5.3-1] ill-formed UTF-8 in a SUBSCRIBE or UNSUBSCRIBE filter closes the connection", async () => {
    const [, bad] = illFormed[0]!;
    const sub = await connected({ clientId: "bad-sub" });
    sub.raw.send(subscribe(3, "ok/#", Buffer.concat([Buffer.from("d/"), bad])));
    const unsub = await connected({ clientId: "bad-unsub" });
    unsub.raw.send(unsubscribe(4, Buffer.concat([Buffer.from("d/"), bad])));
    await sub.raw.waitClosed();
    await unsub.raw.waitClosed();
    assert.deepEqual(sub.raw.received, connack(0, 0), "no SUBACK");
    assert.deepEqual(unsub.raw.received, connack(0, 0), "no UNSUBACK");
  });

  test("[MQTT-1.5.3-2] U+0000 in a client id closes the connection", async () => {
    const raw = await open();
    raw.send(connect({ clientId: "dev\u0000ice" }));
    await raw.waitClosed();
    assert.deepEqual(raw.received, []);
  });

  test("well-formed UTF-8 is accepted everywhere, U+FFFD and 4-byte characters included", async () => {
    const id = "dev-\uFFFD-\u{1F600}";
    const topic = "d/\uFFFD/\u{1F600}/é";
    const { raw } = await connected({ clientId: id, will: { topic } });
    raw.send(publish(topic, "ok", 1, 9), subscribe(10, topic));
    const reply = await raw.reply(4 + 4 + 5);
    assert.deepEqual(reply.slice(4, 8), [0x40, 2, 0, 9], "PUBACK");
    assert.deepEqual(reply.slice(8), [0x90, 3, 0, 10, 1], "SUBACK, QoS 1 granted");
    await waitFor("ingested", () => ingested.some((m) => m.clientId === id && m.topic === topic));
    raw.send(DISCONNECT);
  });

  test("[MQTT-3.10.3-2] an UNSUBSCRIBE without topics closes the connection and sends Redis nothing malformed", async () => {
    const rejectedBefore = await rejectedCalls("hdel");
    for (const clean of [true, false]) {
      const { raw } = await connected({ clientId: `empty-unsub-${clean}`, clean });
      raw.send(unsubscribe(5));
      await raw.waitClosed();
      assert.deepEqual(raw.received, connack(0, 0), `no UNSUBACK (clean ${clean})`);
    }
    assert.equal(await rejectedCalls("hdel"), rejectedBefore, "Redis refused an HDEL");
  });

  test("[MQTT-3.8.3-3] a SUBSCRIBE without topics closes the connection, with no SUBACK", async () => {
    const { raw } = await connected({ clientId: "empty-sub", clean: false });
    raw.send(subscribe(6));
    await raw.waitClosed();
    assert.deepEqual(raw.received, connack(0, 0));
  });

  test("[MQTT-3.1.2-2] an MQTT 5 CONNECT gets CONNACK 0x01 (unacceptable protocol version), is closed, and the log says to use an external broker", async () => {
    const raw = await open();
    raw.send(connect({ clientId: "v5-device", protocolLevel: 5 }));
    await raw.waitClosed();
    assert.deepEqual(raw.received, connack(0, 1));
    const line = lines.find((l) => l.clientId === "v5-device" && l.level >= 40);
    assert.ok(line, "a warning names the client");
    assert.match(line.msg, /MQTT 5/);
    assert.match(line.msg, /external broker/);
  });

  test("[MQTT-3.2.2-2] a device that only publishes, reconnecting with cleanSession 0, gets session present 1", async () => {
    const first = await connected({ clientId: "publish-only", clean: false });
    assert.equal(first.sessionPresent, 0, "a new session");
    first.raw.send(publish("d/publish-only", "ON", 1, 1));
    await first.raw.reply(4 + 4);
    first.raw.send(DISCONNECT);
    await first.raw.waitClosed();
    const again = await connected({ clientId: "publish-only", clean: false });
    assert.equal(again.sessionPresent, 1, "its session is still there");
    again.raw.send(DISCONNECT);
  });

  test("[MQTT-4.3.3-2] a QoS 2 publish re-sent before PUBREL, with or without DUP, on the same or a resumed connection, is taken in once", async () => {
    const topic = "d/qos2-device";
    const count = () => ingested.filter((m) => m.topic === topic).length;
    const first = await connected({ clientId: "qos2-device", clean: false });
    first.raw.send(publish(topic, "ON", 2, 5));
    assert.deepEqual((await first.raw.reply(4 + 4)).slice(4), [0x50, 2, 0, 5], "PUBREC");
    first.raw.send(publish(topic, "ON", 2, 5)); // the PUBREC was taken for lost, say; no DUP (as mqtt.js)
    await first.raw.reply(4 + 4 + 4);
    first.raw.close(); // gone before its PUBREL
    const again = await connected({ clientId: "qos2-device", clean: false });
    assert.equal(again.sessionPresent, 1);
    again.raw.send(publish(topic, "ON", 2, 5), publish(topic, "ON", 2, 5, true));
    assert.deepEqual((await again.raw.reply(4 + 8)).slice(4), [0x50, 2, 0, 5, 0x50, 2, 0, 5], "PUBRECs");
    again.raw.send(pubrel(5));
    assert.deepEqual((await again.raw.reply(4 + 8 + 4)).slice(12), [0x70, 2, 0, 5], "PUBCOMP");
    // Released: the same packet id now starts a new message.
    again.raw.send(publish(topic, "ON", 2, 5));
    await again.raw.reply(4 + 8 + 4 + 4); // its PUBREC: taken in by now
    assert.equal(count(), 2, "taken in once before the PUBREL, once after");
    again.raw.send(pubrel(5), DISCONNECT);
  });

  test("[MQTT-3.2.2-1] cleanSession 1 ends the session: 0 then, and 0 on the next cleanSession 0 connect", async () => {
    const first = await connected({ clientId: "cleaned", clean: false });
    first.raw.send(DISCONNECT);
    await first.raw.waitClosed();
    const clean = await connected({ clientId: "cleaned", clean: true });
    assert.equal(clean.sessionPresent, 0);
    clean.raw.send(DISCONNECT);
    await clean.raw.waitClosed();
    const fresh = await connected({ clientId: "cleaned", clean: false });
    assert.equal(fresh.sessionPresent, 0, "the session was discarded");
    fresh.raw.send(DISCONNECT);
  });

  test("[MQTT-3.2.2-2] a subscriber reconnecting with cleanSession 0 still gets session present 1", async () => {
    const first = await connected({ clientId: "subscriber", clean: false });
    first.raw.send(subscribe(1, "cmd/#"));
    await first.raw.reply(4 + 5);
    first.raw.send(DISCONNECT);
    await first.raw.waitClosed();
    const again = await connected({ clientId: "subscriber", clean: false });
    assert.equal(again.sessionPresent, 1);
    again.raw.send(DISCONNECT);
  });
});

/** How many `command` calls Redis refused (wrong arity and the like), from INFO commandstats. */
async function rejectedCalls(command: string): Promise<number> {
  const info = await redis.info("commandstats");
  const match = new RegExp(`cmdstat_${command}:.*rejected_calls=(\\d+)`).exec(info);
  return Number(match?.[1] ?? 0);
}

describe("embedded broker: limits on topic length and levels", () => {
  const brokers = embeddedBrokers(log);
  const { ingested, clients } = brokers;

  after(() => brokers.stop());

  const start = (config: Record<string, unknown>) => brokers.start(config);

  async function device(broker: EmbeddedBroker, options: IClientOptions): Promise<MqttClient> {
    const client = await mqtt.connectAsync(`mqtt://127.0.0.1:${broker.port}`, {
      reconnectPeriod: 0,
      connectTimeout: 2000,
      ...options,
    });
    clients.push(client);
    return client;
  }

  /** Publishes each topic (acknowledged), then one within the limits, and says which were ingested. */
  async function ingestedOf(client: MqttClient, topics: string[]): Promise<string[]> {
    const id = client.options.clientId!;
    for (const topic of topics) await client.publishAsync(topic, "x", { qos: 1 });
    await client.publishAsync(`${id}/last`, "x", { qos: 1 });
    await waitFor("the last publish", () => ingested.some((m) => m.topic === `${id}/last`));
    return ingested.filter((m) => m.clientId === id && m.topic !== `${id}/last`).map((m) => m.topic);
  }

  const levels = (n: number) => Array.from({ length: n }, (_, i) => `l${i}`).join("/");
  const granted = (client: MqttClient, filters: string[]) =>
    client.subscribeAsync(filters, { qos: 1 }).then(
      (g) => g.map((s) => s.qos),
      (err: { packet?: { granted?: number[] } }) => err.packet?.granted,
    );

  test("by default a topic over 1024 bytes or 32 levels is refused: publish acknowledged and dropped, subscription 0x80", async () => {
    assert.deepEqual([MQTT_DEFAULTS.maxTopicBytes, MQTT_DEFAULTS.maxTopicLevels], [1024, 32]);
    const broker = await start({});
    const c = await device(broker, { clientId: "deep" });
    const atLimit = [`deep/${"x".repeat(1024 - 5)}`, `deep/${levels(31)}`];
    const over = [`deep/${"x".repeat(1024 - 4)}`, `deep/${levels(32)}`];
    assert.deepEqual(await ingestedOf(c, [...over, ...atLimit]), atLimit);
    assert.deepEqual(await granted(c, [...over, ...atLimit]), [128, 128, 1, 1]);
    assert.equal(c.connected, true, "the device stays connected");
  });

  test("maxTopicBytes and maxTopicLevels: publish acknowledged and dropped, subscription 0x80, will refused at CONNECT", async () => {
    const broker = await start({ maxTopicBytes: 16, maxTopicLevels: 3 });
    const c = await device(broker, { clientId: "dev" });
    const over = ["dev/12345678901234", "dev/a/b/c", "dev/é12345678901"]; // 17 bytes, 4 levels, 17 bytes (é is 2)
    const within = ["dev/123456789012", "dev/a/b"];
    assert.deepEqual(await ingestedOf(c, [...over, ...within]), within);
    assert.deepEqual(
      await granted(c, ["dev/+/+/#", "dev/1234567890123", "dev/+/#", "dev/#"]),
      [128, 128, 1, 1],
    );
    await assert.rejects(
      device(broker, {
        clientId: "dev-will",
        will: { topic: "dev/a/b/gone", payload: Buffer.from("x"), qos: 1, retain: false },
      }),
      /Not authorized/,
    );
    await device(broker, {
      clientId: "dev-will",
      will: { topic: "dev/gone", payload: Buffer.from("x"), qos: 1, retain: false },
    });
  });
});
