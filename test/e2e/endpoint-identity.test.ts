/**
 * Endpoints keep their identity when the config is edited: with endpoints inserted and reordered
 * between two runs, messages queued, live and failed reach the endpoint they were meant for, or
 * none; and positional ids queued by earlier versions are read against the first layout.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createServer, type Server } from "node:net";
import { Aedes } from "aedes";
import { Redis } from "ioredis";
import mqtt from "mqtt";
import { connectors } from "../../bridges/index.js";
import type { RunningBridge } from "../../src/app.js";
import { validateConfig, type Config } from "../../src/config/load.js";
import { retryFailedJobs } from "../../src/queue/failed-jobs.js";
import { moduleLogger } from "../../src/log.js";
import type { ToRemoteJob } from "../../src/matrix/event-intake.js";
import { OrderedQueue, jobIdFor, shardOf } from "../../src/queue/ordered-queue.js";
import { REDIS_URL, freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";
import { startBridge } from "../helpers/start-bridge.js";
import type { RecordedEvent } from "../helpers/test-homeserver.js";

const ROOM = "#lab:test.local";

/** An external broker that keeps the bridge's publishes; started only when a test wants it up. */
class Broker {
  readonly published: { topic: string; payload: string }[] = [];
  private server: Server | undefined;
  private broker: Aedes | undefined;

  constructor(readonly port: number) {}

  async start(): Promise<void> {
    const broker = await Aedes.createBroker();
    broker.on("publish", (packet, client) => {
      if (client) this.published.push({ topic: packet.topic, payload: packet.payload.toString() });
    });
    const server = createServer(broker.handle);
    await new Promise<void>((r) => server.listen(this.port, "127.0.0.1", () => r()));
    this.broker = broker;
    this.server = server;
  }

  on(topic: string): string[] {
    return this.published.filter((p) => p.topic === topic).map((p) => p.payload);
  }

  async stop(): Promise<void> {
    const { broker, server } = this;
    if (broker) await new Promise<void>((r) => broker.close(() => r()));
    if (server) await new Promise<void>((r) => server.close(() => r()));
  }
}

/** Endpoints on the external broker (account mqtt.plant), so they can wait while it is down. */
const outX = { account: "mqtt.plant", direction: "out", topic: "x/cmd" };
/** JSON, so that a message of X published here would show. */
const outY = { account: "mqtt.plant", direction: "out", topic: "y/cmd", format: "json" };
const inZ = { account: "mqtt.plant", direction: "in", topic: "z/+" };

/** The test's config with the route's endpoints (and queue settings) of one run. */
function configWith(h: Harness, endpoints: object[], queue: object = {}): Config {
  return validateConfig(
    {
      ...h.rawConfig,
      appservice: { ...(h.rawConfig.appservice as object), admins: [h.alice] },
      queue: { ...(h.rawConfig.queue as object), ...queue },
      routes: [{ id: "lab", room: ROOM, endpoints }],
    },
    connectors,
  );
}

/** The embedded broker's port of the bridge `run` started last. */
let mqttPort = 0;

async function run(h: Harness, config: Config): Promise<RunningBridge> {
  const { bridge, ports } = await startBridge({ config, registration: h.registration });
  mqttPort = ports.mqtt;
  return bridge;
}

async function setUp(): Promise<{ h: Harness; broker: Broker; room: string }> {
  const broker = new Broker(await freePort());
  const h = await harness({
    bridges: {
      mqtt: {
        home: { embedded: { port: 0 } },
        plant: { url: `mqtt://127.0.0.1:${broker.port}`, protocolVersion: 4, reconnectPeriodMs: 100 },
      },
    },
    routes: [{ id: "lab", room: ROOM, endpoints: [outX, outY] }],
  });
  const room = h.hs.createRoom({ creator: h.alice, alias: ROOM, preset: "public_chat" });
  return { h, broker, room };
}

function bodyOfJson(payload: string): unknown {
  return (JSON.parse(payload) as { body: unknown }).body;
}

describe("queued messages after endpoints were inserted and reordered", () => {
  let h: Harness;
  let broker: Broker;
  let room: string;
  let bridge: RunningBridge | undefined;

  before(async () => ({ h, broker, room } = await setUp()));

  after(async () => {
    await bridge?.stop();
    await broker?.stop();
    await h?.cleanup();
  });

  test("each reaches the topic it was queued for, once, in order", async () => {
    // The broker is down: what the room says waits in the queue.
    bridge = await run(h, configWith(h, [outX, outY]));
    for (const body of ["m1", "m2", "m3"]) h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body });
    await h.hs.waitForPushIdle(); // answered only once enqueued
    await bridge.stop();

    // Y first now, with an inbound endpoint inserted before X.
    bridge = await run(h, configWith(h, [outY, inZ, outX]));
    await broker.start();
    await waitFor(
      "the queued messages",
      () => broker.on("x/cmd").length >= 3 && broker.on("y/cmd").length >= 3,
    );
    h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "m4" });
    await waitFor("a new message", () => broker.on("x/cmd").length >= 4 && broker.on("y/cmd").length >= 4);
    assert.deepEqual(broker.on("x/cmd"), ["m1", "m2", "m3", "m4"]);
    assert.deepEqual(broker.on("y/cmd").map(bodyOfJson), ["m1", "m2", "m3", "m4"]);
    assert.deepEqual(
      broker.published.filter(
        // tribridge's own availability (online at each connect) is no relayed message
        (p) =>
          !["x/cmd", "y/cmd"].includes(p.topic) && !/^tribridge\/[^/]+\/plant\/availability$/.test(p.topic),
      ),
      [],
      "nothing published elsewhere",
    );
    assert.deepEqual(await bridge.failedJobs(), []);
  });
});

describe("a failed message whose endpoint was removed", () => {
  let h: Harness;
  let broker: Broker;
  let room: string;
  let bridge: RunningBridge | undefined;

  before(async () => ({ h, broker, room } = await setUp()));

  after(async () => {
    await bridge?.stop();
    await broker?.stop();
    await h?.cleanup();
  });

  test("stays failed, with the reason, and reaches its endpoint, only, once that is back", async () => {
    const first = configWith(h, [outX], { maxAttempts: 2 });
    const idX = first.routes[0]!.endpoints[0]!.id;
    bridge = await run(h, first);
    h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "open the valve" });
    // The broker is down: the message waits for it (not failed, however many attempts).
    await waitFor("the broker found down", async () =>
      (await ask(h, room, "!tribridge status")).includes("mqtt.plant: down"),
    );
    assert.deepEqual(await bridge.failedJobs(), []);
    await bridge.stop();

    // X removed; the broker is back, with Y: the queued message fails, saying why.
    await broker.start();
    const withoutX = configWith(h, [inZ, outY]);
    bridge = await run(h, withoutX);
    const reason = `permanent: endpoint ${idX} is no longer configured`;
    const [failed] = await waitFor("the message failed", async () => {
      const jobs = await bridge!.failedJobs();
      return jobs.length > 0 && jobs;
    });
    assert.equal(failed!.reason, reason);
    assert.equal((failed!.data as ToRemoteJob).endpointId, idX);
    assert.equal(await retryFailedJobs(withoutX, connectors), 1); // failed-jobs --retry
    await waitFor("failed again, saying why", async () => {
      const jobs = await bridge!.failedJobs();
      return jobs.length === 1 && jobs[0]!.reason === reason;
    });
    // Listed in the route's room, though its endpoint is gone.
    assert.ok((await ask(h, room, "!tribridge failed")).includes(`reason: ${reason}\n`));
    await bridge.stop();

    // X back, in another place; retried by an admin in the route's room.
    bridge = await run(h, configWith(h, [outY, inZ, outX]));
    assert.match(await ask(h, room, "!tribridge retry all"), /^1 failed relay\(s\) put back/);
    await waitFor("delivered to X", () => broker.on("x/cmd").length > 0);
    h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "thanks" });
    await waitFor(
      "the next message on both",
      () => broker.on("y/cmd").length > 0 && broker.on("x/cmd").length > 1,
    );
    assert.deepEqual(broker.on("x/cmd"), ["open the valve", "thanks"]);
    assert.deepEqual(broker.on("y/cmd").map(bodyOfJson), ["thanks"], "Y never got X's message");
    assert.deepEqual(await bridge.failedJobs(), []);
  });
});

describe("a live stream whose endpoint moved", () => {
  let h: Harness;
  let bridge: RunningBridge | undefined;
  let room: string;
  const live = { account: "mqtt.home", direction: "in", topic: "sensors/+", sender: "clientId", live: true };
  const outHome = (topic: string) => ({ account: "mqtt.home", direction: "out", topic });

  before(async () => {
    h = await harness({
      bridges: { mqtt: { home: { embedded: { port: 0 } } } },
      routes: [{ id: "lab", room: ROOM, endpoints: [live] }],
    });
    room = h.hs.createRoom({ creator: h.alice, alias: ROOM, preset: "public_chat" });
  });

  after(async () => {
    await bridge?.stop();
    await h?.cleanup();
  });

  async function publish(value: string): Promise<void> {
    const device = await mqtt.connectAsync(`mqtt://127.0.0.1:${mqttPort}`, {
      clientId: "meter",
      protocolVersion: 4,
    });
    await device.publishAsync("sensors/power", value, { qos: 1 });
    await device.endAsync();
    await waitFor(`"${value}" shown`, () => h.hs.messages(room).some((e) => shownBody(e) === value));
  }

  test("keeps editing the same message after endpoints were inserted before it", async () => {
    bridge = await run(h, configWith(h, [live, outHome("lab/a")]));
    await publish("10 W");
    await bridge.stop();
    bridge = await run(h, configWith(h, [outHome("lab/b"), outHome("lab/a"), live]));
    await publish("12 W");
    await publish("15 W");
    const [original, ...edits] = h.hs.messages(room);
    assert.equal(original!.content.body, "10 W");
    assert.deepEqual(
      edits.map((e) => [relatesTo(e), shownBody(e)]),
      [
        [original!.event_id, "12 W"],
        [original!.event_id, "15 W"],
      ],
    );
  });
});

describe("messages queued by an earlier version, under positional endpoint ids", () => {
  let h: Harness;
  let broker: Broker;
  let room: string;
  let bridge: RunningBridge | undefined;

  before(async () => ({ h, broker, room } = await setUp()));

  after(async () => {
    await bridge?.stop();
    await broker?.stop();
    await h?.cleanup();
  });

  test("go where their position pointed at the first start, even after a reorder; or fail saying why", async () => {
    // What an earlier version left queued: `lab.<index>` of the config [X, Y].
    const earlier = new OrderedQueue<ToRemoteJob>({
      name: "to-mqtt",
      prefix: h.prefix,
      redisUrl: h.config.queue.redisUrl!,
      shards: h.config.queue.shards,
      retry: { maxAttempts: 1, initialDelayMs: 1, maxDelayMs: 1 },
      keepCompleted: 10,
      keepFailed: 10,
      instanceId: "earlier-version",
      log: moduleLogger("test").child({}, { level: "silent" }),
      process: () => Promise.reject(new Error("not consumed here")),
    });
    const queued = [
      ["lab.0", "for X"],
      ["lab.1", "for Y"],
      ["lab.5", "for an endpoint that was not there"],
    ];
    for (const [endpointId, body] of queued) {
      const job = { endpointId: endpointId!, roomId: room, sender: h.alice, timestamp: Date.now() };
      const id = jobIdFor("out", `$${body}`, endpointId!);
      await earlier.add(room, id, { ...job, content: { msgtype: "m.text", body } });
    }
    await earlier.stop();

    // The first start of this version, with that config (the broker is down: they wait).
    bridge = await run(h, configWith(h, [outX, outY]));
    await waitForDelivering(h, room);
    await bridge.stop();
    // Reordered since: positions are read as they were at the first start.
    bridge = await run(h, configWith(h, [outY, inZ, outX]));
    await broker.start();
    const [failed] = await waitFor("the one that cannot be placed, failed", async () => {
      const jobs = await bridge!.failedJobs();
      return jobs.length > 0 && jobs;
    });
    assert.equal(
      failed!.reason,
      "permanent: endpoint lab.5 names an endpoint by its position (an id written by an earlier " +
        "version), and route lab had no endpoint at position 5 when this version first started: " +
        "cannot tell which endpoint it was meant for",
    );
    await waitFor("the others", () => broker.on("x/cmd").length > 0 && broker.on("y/cmd").length > 0);
    assert.deepEqual(broker.on("x/cmd"), ["for X"]);
    assert.deepEqual(broker.on("y/cmd").map(bodyOfJson), ["for Y"]);
  });
});

/**
 * Until the room's to-mqtt shard has taken its first batch (BullMQ's active list), i.e. the bridge
 * is trying to deliver what was queued.
 */
async function waitForDelivering(h: Harness, roomId: string): Promise<void> {
  const redis = new Redis(REDIS_URL);
  const active = `${h.prefix}:to-mqtt-${shardOf(roomId, h.config.queue.shards)}:active`;
  try {
    await waitFor("delivery under way", async () => (await redis.llen(active)) > 0);
  } finally {
    redis.disconnect();
  }
}

/** Sends a command in `roomId` as alice and returns the bot's answer. */
async function ask(h: Harness, roomId: string, command: string): Promise<string> {
  const before = h.hs.messages(roomId).length;
  h.hs.sendMessage(roomId, h.alice, { msgtype: "m.text", body: command });
  const answer = await waitFor("the bot's answer", () =>
    h.hs
      .messages(roomId)
      .slice(before)
      .find((e) => e.sender === h.hs.appserviceUserId),
  );
  return String(answer.content.body);
}

function relatesTo(e: RecordedEvent): string | undefined {
  const r = e.content["m.relates_to"] as { rel_type?: string; event_id?: string } | undefined;
  return r?.rel_type === "m.replace" ? r.event_id : undefined;
}

/** What a client shows: an edit's new content, else the body. */
function shownBody(e: RecordedEvent): string {
  const replaced = e.content["m.new_content"] as { body?: string } | undefined;
  return String(replaced?.body ?? e.content.body);
}
