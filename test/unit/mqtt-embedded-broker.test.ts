/**
 * The embedded broker's gatekeeping, driven by real mqtt.js clients on a real socket: passwords,
 * client ids, topic ACLs, $SYS, payload limits, and "enqueue before PUBACK"; its listeners.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import { createConnection, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import mqtt, { type IClientOptions, type MqttClient } from "mqtt";
import { WebSocket } from "ws";
import { EmbeddedBroker, type IncomingPublish } from "../../bridges/mqtt/embedded-broker.js";
import { embeddedBrokerSchema } from "../../bridges/mqtt/schema.js";
import { moduleLogger } from "../../src/log.js";
import { REDIS_URL, deleteKeys, waitFor } from "../helpers/fixture.js";
import { embeddedBrokers } from "../helpers/embedded-brokers.js";

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
        { username: "bob", password: "b", subscribe: ["secret/#"] },
        { username: "carol", password: "c", subscribe: ["public/#"] },
        { username: "dave", password: "d", subscribe: ["public/#"], clientIds: ["bob-dev"] },
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

  test(
    "a publish outside the ACL, to $SYS, or over the size limit is acknowledged and dropped; the client stays connected",
    { timeout: 10_000 },
    async () => {
      const watcher = await connect({ username: "admin", password: "adm", clientId: "watcher" });
      const passedOn: string[] = [];
      watcher.on("message", (topic) => passedOn.push(topic));
      await watcher.subscribeAsync(["sensors/#", "$SYS/fake"], { qos: 1 });
      // a persistent session: refused with a disconnect, mqtt.js would re-send it forever
      const c = await connect({ username: "sensor", password: "s3cret", clientId: "refused", clean: false });
      let closed = false;
      c.on("close", () => (closed = true));
      const refused = [
        ["sensors/other/temp", "x", 1],
        ["$SYS/fake", "x", 1],
        ["sensors/sensor/big", "x".repeat(2000), 1],
        ["sensors/sensor/big2", "x".repeat(2000), 2],
        ["sensors/other/qos0", "x", 0],
      ] as const;
      for (const [topic, payload, qos] of refused) await c.publishAsync(topic, payload, { qos }); // acknowledged
      await c.publishAsync("sensors/sensor/after", "fine", { qos: 1 });
      await waitFor("passed on", () => passedOn.includes("sensors/sensor/after"));
      assert.equal(closed, false);
      assert.deepEqual(passedOn, ["sensors/sensor/after"]);
      for (const [topic] of refused) assert.ok(!ingested.some((m) => m.topic === topic), topic);
      assert.ok(ingested.some((m) => m.topic === "sensors/sensor/after"));
    },
  );

  test(
    "[MQTT-1.5.3-2] a topic with U+0000 closes the connection: in a publish, a subscription, a will",
    { timeout: 10_000 },
    async () => {
      const c = await connect({ username: "sensor", password: "s3cret", clientId: "nul-publisher" });
      let closed = false;
      c.on("close", () => (closed = true));
      void c.publishAsync("sensors/sensor/a\u0000b", "x", { qos: 1 }).catch(() => undefined);
      await waitFor("closed", () => closed);
      assert.ok(!ingested.some((m) => m.topic.includes("\u0000")));
      const admin = await connect({ username: "admin", password: "adm", clientId: "nul-subscriber" });
      let adminClosed = false;
      admin.on("close", () => (adminClosed = true));
      void admin.subscribeAsync("a/\u0000/#", { qos: 1 }).catch(() => undefined);
      await waitFor("closed", () => adminClosed);
      const will = {
        topic: "sensors/sensor/\u0000",
        payload: Buffer.from("x"),
        qos: 1 as const,
        retain: false,
      };
      const willClient = mqtt.connect(url(), {
        ...{ username: "sensor", password: "s3cret", clientId: "nul-will", will },
        reconnectPeriod: 0,
      });
      clients.push(willClient);
      let connected = false;
      willClient.on("connect", () => (connected = true));
      await new Promise<void>((resolve) => willClient.once("close", () => resolve()));
      assert.equal(connected, false, "closed with no CONNACK");
    },
  );

  test(
    "[MQTT-3.1.3-8] an empty client id with cleanSession false gets CONNACK 2 (identifier rejected)",
    { timeout: 10_000 },
    async () => {
      const socket = createConnection(broker.port, "127.0.0.1");
      const reply = new Promise<Buffer>((resolve) => socket.once("data", resolve));
      // CONNECT, MQTT 3.1.1, flags 0 (cleanSession false, no credentials), keep-alive 30 s, client id ""
      socket.write(Buffer.from([0x10, 12, 0, 4, ...Buffer.from("MQTT"), 4, 0x00, 0, 30, 0, 0]));
      assert.deepEqual([...(await reply)], [0x20, 2, 0, 2]);
      socket.destroy();
    },
  );

  test(
    "a packet announcing more than the size limit closes the connection before its body arrives, even before CONNECT",
    { timeout: 10_000 },
    async () => {
      const socket = createConnection(broker.port, "127.0.0.1");
      await new Promise<void>((r) => socket.once("connect", () => r()));
      const closed = new Promise<void>((r) => socket.once("close", () => r()));
      socket.on("error", () => undefined); // reset by the broker: what this test wants
      // PUBLISH, remaining length 200 MB (varint 0x80 0x84 0xaf 0x5f), then a first slice of the body
      socket.write(Buffer.from([0x30, 0x80, 0x84, 0xaf, 0x5f]));
      socket.write(Buffer.alloc(64 * 1024));
      await closed;
      assert.ok(socket.destroyed);

      // A client within the limit, speaking after that, is served as before.
      const ok = await connect({ username: "sensor", password: "s3cret", clientId: "after-guard" });
      await ok.publishAsync("sensors/sensor/guard", "x".repeat(1000), { qos: 1 });
      await waitFor("ingested", () => ingested.some((m) => m.topic === "sensors/sensor/guard"));
    },
  );

  test("a client id is its first user's: another user cannot take its session; one pinned to it gets only what its ACL allows", async () => {
    const bob = await connect({ username: "bob", password: "b", clientId: "bob-dev", clean: false });
    await bob.subscribeAsync("secret/#", { qos: 1 });
    await bob.endAsync();
    const admin = await connect({ username: "admin", password: "adm", clientId: "admin-1" });
    await admin.publishAsync("secret/door-code", "4711", { qos: 1 }); // queued in bob-dev's session

    assert.match(
      await refused({ username: "carol", password: "c", clientId: "bob-dev", clean: false }),
      /Not authorized|client id not allowed/i,
    );

    // dave lists bob-dev in clientIds (the operator moved the device to him): he takes the
    // session, but not the message his ACL does not let him read.
    const heard: string[] = [];
    const dave = await mqtt.connectAsync(url(), {
      username: "dave",
      password: "d",
      clientId: "bob-dev",
      clean: false,
      reconnectPeriod: 0,
      manualConnect: false,
    });
    clients.push(dave);
    dave.on("message", (topic) => heard.push(topic));
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(heard, []);
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

describe("embedded broker: deny rules in ACLs, for users and anonymous clients", () => {
  const brokers = embeddedBrokers(log);
  const { ingested, clients } = brokers;

  after(() => brokers.stop());

  async function start(config: Record<string, unknown>): Promise<string> {
    return `mqtt://127.0.0.1:${(await brokers.start(config)).port}`;
  }

  async function connect(url: string, options: IClientOptions): Promise<MqttClient> {
    const client = await mqtt.connectAsync(url, { reconnectPeriod: 0, connectTimeout: 2000, ...options });
    clients.push(client);
    return client;
  }

  const granted = (client: MqttClient, filters: string[]) =>
    client.subscribeAsync(filters, { qos: 1 }).then(
      (g) => g.map((s) => s.qos),
      (err: { packet?: { granted?: number[] } }) => err.packet?.granted,
    );

  /** Publishes `topics` as `from`, then a marker; the topics `to` received by the time the marker came. */
  async function delivered(from: MqttClient, to: MqttClient, topics: string[]): Promise<string[]> {
    const heard: string[] = [];
    to.on("message", (topic) => heard.push(topic));
    for (const topic of topics) await from.publishAsync(topic, "x", { qos: 1 });
    const marker = `public/marker-${randomUUID().slice(0, 8)}`;
    await from.publishAsync(marker, "x", { qos: 1 });
    await waitFor("the marker", () => heard.includes(marker));
    return heard.filter((t) => t !== marker);
  }

  test("a user's deny rules win over its allow lists: publish dropped, subscription 0x80, nothing denied delivered through a wider one, retained included", async () => {
    const url = await start({
      users: [
        {
          username: "ops",
          password: "o",
          deny: { publish: ["commands/#"], subscribe: ["secret/#"] },
        },
        { username: "admin", password: "a" },
      ],
    });
    const admin = await connect(url, { username: "admin", password: "a", clientId: "admin" });
    await admin.publishAsync("secret/door-code", "4711", { qos: 1, retain: true });
    const ops = await connect(url, { username: "ops", password: "o", clientId: "ops" });

    await ops.publishAsync("commands/open", "x", { qos: 1 }); // acknowledged
    await ops.publishAsync("status/ops", "x", { qos: 1 });
    await waitFor("status", () => ingested.some((m) => m.topic === "status/ops"));
    assert.ok(!ingested.some((m) => m.topic === "commands/open"), "the denied publish was dropped");

    const heard: string[] = [];
    ops.on("message", (topic) => heard.push(topic));
    assert.deepEqual(await granted(ops, ["secret/#", "secret/+/code", "#"]), [128, 128, 1]);
    assert.deepEqual(await delivered(admin, ops, ["secret/other", "public/news"]), ["public/news"]);
    assert.ok(!heard.includes("secret/door-code"), "the retained message on a denied topic was held back");
    assert.equal(ops.connected, true);

    await assert.rejects(
      connect(url, {
        ...{ username: "ops", password: "o", clientId: "ops-will" },
        will: { topic: "commands/gone", payload: Buffer.from("x"), qos: 1, retain: false },
      }),
      /Not authorized/,
    );
  });

  test("anonymous clients' deny rules (the Paho interoperability suite's test/nosubscribe)", async () => {
    const url = await start({
      allowAnonymous: true,
      anonymous: { deny: { subscribe: ["test/nosubscribe"] } },
    });
    const a = await connect(url, { clientId: "anon-a" });
    const b = await connect(url, { clientId: "anon-b" });
    assert.deepEqual(await granted(a, ["test/nosubscribe"]), [128]);
    assert.deepEqual(await granted(a, ["#", "test/+"]), [1, 1]);
    assert.deepEqual(await delivered(b, a, ["test/nosubscribe", "test/other"]), ["test/other"]); // one copy: aedes sends one per client
    assert.ok(
      ingested.some((m) => m.topic === "test/nosubscribe"),
      "publishing there is not denied",
    );
  });
});

test("a websocketPort already in use is a readable start error, and the other ports are let go", async () => {
  const taken = createServer();
  const port = await new Promise<number>((resolve) =>
    taken.listen(0, "127.0.0.1", () => resolve((taken.address() as { port: number }).port)),
  );
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  const broker = new EmbeddedBroker(
    embeddedBrokerSchema.parse({ port: 0, websocketPort: port }),
    log,
    async () => {},
    { url: REDIS_URL, keyPrefix: `${prefix}:` },
  );
  try {
    await assert.rejects(broker.start(), {
      message: `embedded MQTT broker: port ${port} on 127.0.0.1 is already in use (set embedded.websocketPort to a free port, or stop the other broker)`,
    });
    const again = createServer();
    await new Promise<void>((resolve) => again.listen(broker.port, "127.0.0.1", () => resolve()));
    await new Promise((resolve) => again.close(resolve));
  } finally {
    await new Promise((resolve) => taken.close(resolve));
    await deleteKeys(prefix);
  }
});

test("MQTT over WebSocket reaches the same ingest", async () => {
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  const ingested: IncomingPublish[] = [];
  const broker = new EmbeddedBroker(
    embeddedBrokerSchema.parse({ port: 0, websocketPort: 0, maxPayloadBytes: 1024 }),
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

    // A WebSocket message far over the size limit is refused by ws itself (1009), before it is
    // buffered whole, even before CONNECT.
    const ws = new WebSocket(`ws://127.0.0.1:${broker.websocketPort}`, "mqtt");
    ws.on("error", () => undefined);
    await new Promise((r) => ws.once("open", r));
    const closed = new Promise<number>((r) => ws.once("close", (code) => r(code)));
    ws.send(Buffer.alloc(2 * 1024 * 1024));
    assert.equal(await closed, 1009);
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
