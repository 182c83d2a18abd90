/**
 * The embedded broker's gatekeeping, driven by real mqtt.js clients on a real socket: passwords,
 * client ids, topic ACLs, $SYS, payload limits, and "enqueue before PUBACK".
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import mqtt, { type IClientOptions, type MqttClient } from "mqtt";
import { EmbeddedBroker, type IncomingPublish } from "../../bridges/mqtt/embedded-broker.js";
import { embeddedBrokerSchema } from "../../bridges/mqtt/schema.js";
import { moduleLogger } from "../../src/log.js";
import { REDIS_URL, deleteKeys, waitFor } from "../helpers/fixture.js";

const log = moduleLogger("embedded-broker-test");
log.level = "silent";

describe("embedded broker security", () => {
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  const ingested: IncomingPublish[] = [];
  let failNext = false;
  let releaseSlow: (() => void) | undefined;
  let broker: EmbeddedBroker;
  const url = () => `mqtt://127.0.0.1:${broker.port}`;
  const clients: MqttClient[] = [];

  before(async () => {
    const config = embeddedBrokerSchema.parse({
      port: 0,
      maxPayloadBytes: 1024,
      users: [
        {
          username: "sensor",
          password: "s3cret",
          publish: ["sensors/sensor/#"],
          subscribe: ["commands/sensor"],
        },
        { username: "pinned", password: "pw", clientIds: ["pinned-1"] },
        { username: "admin", password: "adm", subscribe: ["$SYS/#", "#"] },
      ],
    });
    broker = new EmbeddedBroker(
      config,
      log,
      async (msg) => {
        if (failNext) {
          failNext = false;
          throw new Error("redis down");
        }
        if (msg.topic.endsWith("/slow")) await new Promise<void>((r) => (releaseSlow = r));
        ingested.push(msg);
      },
      { url: REDIS_URL, keyPrefix: `${prefix}:` },
    );
    await broker.start();
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.endAsync(true)));
    await broker.stop();
    await deleteKeys(prefix);
  });

  async function connect(options: IClientOptions): Promise<MqttClient> {
    const client = await mqtt.connectAsync(url(), { reconnectPeriod: 0, connectTimeout: 2000, ...options });
    clients.push(client);
    return client;
  }

  async function refused(options: IClientOptions): Promise<string> {
    try {
      const c = await connect(options);
      await c.endAsync();
      return "connected";
    } catch (err) {
      return (err as Error).message;
    }
  }

  test("[MQTT-3.2.2] wrong password, unknown user or no credentials → CONNACK refusal", async () => {
    assert.match(await refused({ username: "sensor", password: "wrong" }), /Bad username or password/);
    assert.match(await refused({ username: "nobody", password: "x" }), /Bad username or password/);
    assert.match(await refused({}), /Not authorized/);
  });

  test("a user pinned to client ids cannot connect under another id", async () => {
    assert.match(await refused({ username: "pinned", password: "pw", clientId: "other" }), /Not authorized/);
    assert.equal(await refused({ username: "pinned", password: "pw", clientId: "pinned-1" }), "connected");
  });

  test("a will on a topic outside the user's publish ACL, or on $SYS, is refused at CONNECT", async () => {
    const will = (topic: string) => ({
      topic,
      payload: Buffer.from("offline"),
      qos: 1 as const,
      retain: false,
    });
    const sensor = { username: "sensor", password: "s3cret", clientId: "sensor-will" };
    assert.match(await refused({ ...sensor, will: will("commands/sensor") }), /Not authorized/);
    assert.match(await refused({ ...sensor, will: will("$SYS/fake") }), /Not authorized/);
    assert.equal(await refused({ ...sensor, will: will("sensors/sensor/status") }), "connected");
  });

  test("a publish within the ACL is ingested before its PUBACK", async () => {
    const c = await connect({ username: "sensor", password: "s3cret", clientId: "sensor" });
    let acked = false;
    const publish = c.publishAsync("sensors/sensor/slow", "x", { qos: 1 }).then(() => (acked = true));
    await waitFor("ingest started", () => releaseSlow !== undefined);
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(acked, false, "no PUBACK while the enqueue is pending");
    releaseSlow!();
    await publish;
    assert.equal(ingested.at(-1)?.topic, "sensors/sensor/slow");
    assert.equal(ingested.at(-1)?.clientId, "sensor");
  });

  test("a failed enqueue is not acknowledged: the client is disconnected and re-sends", async () => {
    const c = await connect({ username: "sensor", password: "s3cret", clientId: "sensor-retry" });
    failNext = true;
    const closed = new Promise<void>((r) => c.once("close", () => r()));
    void c.publishAsync("sensors/sensor/temp", "21", { qos: 1 }).catch(() => undefined);
    await closed;
    assert.ok(!ingested.some((m) => m.clientId === "sensor-retry"));
  });

  test("a publish outside the ACL, to $SYS, or over the size limit disconnects the client, unrelayed", async () => {
    for (const [topic, payload] of [
      ["sensors/other/temp", "x"],
      ["$SYS/fake", "x"],
      ["sensors/sensor/big", "x".repeat(2000)],
    ] as const) {
      const c = await connect({ username: "sensor", password: "s3cret", clientId: `bad-${randomUUID()}` });
      const closed = new Promise<void>((r) => c.once("close", () => r()));
      void c.publishAsync(topic, payload, { qos: 1 }).catch(() => undefined);
      await closed;
      assert.ok(!ingested.some((m) => m.topic === topic), topic);
    }
  });

  test("[MQTT-3.9.3] subscriptions outside the ACL get SUBACK 0x80; $SYS only for a user who names it", async () => {
    const sensor = await connect({ username: "sensor", password: "s3cret", clientId: "sensor-sub" });
    // mqtt.js rejects when any return code is a failure; the SUBACK is on the error.
    const suback = await sensor
      .subscribeAsync(["commands/sensor", "commands/other", "$SYS/#", "#"], { qos: 1 })
      .then(
        () => assert.fail("some subscriptions should have been refused"),
        (err: { packet?: { granted?: number[] } }) => err.packet?.granted,
      );
    assert.deepEqual(suback, [1, 128, 128, 128]);
    const admin = await connect({ username: "admin", password: "adm", clientId: "admin" });
    const adminGranted = await admin.subscribeAsync(["$SYS/#"], { qos: 0 });
    assert.equal(adminGranted[0]?.qos, 0);
  });
});

test("MQTT over WebSocket reaches the same ingest", async () => {
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  const ingested: IncomingPublish[] = [];
  const broker = new EmbeddedBroker(
    embeddedBrokerSchema.parse({ port: 0, websocketPort: 0 }),
    log,
    async (msg) => void ingested.push(msg),
    { url: REDIS_URL, keyPrefix: `${prefix}:` },
  );
  await broker.start();
  try {
    const client = await mqtt.connectAsync(`ws://127.0.0.1:${broker.websocketPort}`, {
      clientId: "ws-device",
      reconnectPeriod: 0,
    });
    await client.publishAsync("ws/topic", "over websocket", { qos: 1 });
    await client.endAsync();
    assert.deepEqual(
      ingested.map((m) => [m.clientId, m.topic, m.payload.toString()]),
      [["ws-device", "ws/topic", "over websocket"]],
    );
  } finally {
    await broker.stop();
    await deleteKeys(prefix);
  }
});

test("MQTT over TLS with the configured certificate", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "tribridge-tls-"));
  const made = spawnSync("openssl", [
    ...["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"],
    ...[
      "-addext",
      "subjectAltName=IP:127.0.0.1",
      "-keyout",
      join(dir, "key.pem"),
      "-out",
      join(dir, "cert.pem"),
    ],
  ]);
  if (made.status !== 0) return t.skip("openssl is not installed");
  const cert = readFileSync(join(dir, "cert.pem"), "utf8");
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  const ingested: IncomingPublish[] = [];
  const broker = new EmbeddedBroker(
    embeddedBrokerSchema.parse({
      port: 0,
      tls: { port: 0, cert, key: readFileSync(join(dir, "key.pem"), "utf8") },
    }),
    log,
    async (msg) => void ingested.push(msg),
    { url: REDIS_URL, keyPrefix: `${prefix}:` },
  );
  await broker.start();
  try {
    const client = await mqtt.connectAsync(`mqtts://127.0.0.1:${broker.tlsPort}`, {
      clientId: "tls-device",
      ca: cert,
      reconnectPeriod: 0,
    });
    await client.publishAsync("tls/topic", "encrypted", { qos: 1 });
    await client.endAsync();
    assert.deepEqual(
      ingested.map((m) => [m.clientId, m.payload.toString()]),
      [["tls-device", "encrypted"]],
    );
  } finally {
    await broker.stop();
    await deleteKeys(prefix);
  }
});
