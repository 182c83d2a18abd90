/**
 * Control from the room against a real Synapse and a real person (plain Client-Server API calls
 * with the person's own access token): who may relay (⛔ and one notice; a live power levels change
 * lets the next message through), delivery marks (✅, and Synapse's M_DUPLICATE_ANNOTATION for a
 * second identical one), the bridge information (MSC2346) as the person reads it, unchanged by a
 * restart, commands answered as replies, a room linked by command, and /ready following Synapse.
 *
 * One Synapse for the file; the tests run in order and build on each other's state.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { rmSync } from "node:fs";
import mqtt, { type MqttClient } from "mqtt";
import { pino } from "pino";
import { connectors } from "../../bridges/index.js";
import type { MqttConnector } from "../../bridges/mqtt/connector.js";
import { start, type RunningBridge } from "../../src/app.js";
import { validateConfig, type Config } from "../../src/config/load.js";
import { DeliveryFeedback } from "../../src/matrix/delivery-feedback.js";
import { ghostUserId } from "../../src/matrix/ids.js";
import { MatrixClient } from "../../src/matrix/matrix-client.js";
import { buildRegistration, type Registration } from "../../src/matrix/registration.js";
import { RouteTable } from "../../src/routing/route-table.js";
import { connectRedis } from "../../src/store/redis-store.js";
import { hasMosquitto, startMosquitto, type Broker } from "../helpers/brokers.js";
import { deleteKeys, freePort, REDIS_URL, tempDataDir, waitFor } from "../helpers/fixture.js";
import { startSynapse, synapseSkipReason, type Synapse, type SynapseUser } from "../helpers/synapse.js";

const SERVER_NAME = "synapse.test";
/** Through Synapse, the bridge and the broker: a second or so; more on a loaded machine. */
const RELAY_TIMEOUT_MS = 20_000;
const MAX_PAYLOAD_BYTES = 1024;
const TOO_LONG = "x".repeat(MAX_PAYLOAD_BYTES + 1);

type Event = {
  event_id: string;
  type: string;
  sender: string;
  state_key?: string;
  content: Record<string, unknown>;
};

/** A person on the Client-Server API, with their own access token. */
class Person {
  private txn = 0;
  constructor(
    private readonly baseUrl: string,
    readonly user: SynapseUser,
  ) {}

  get userId(): string {
    return this.user.userId;
  }

  async call(method: string, path: string, body?: unknown): Promise<Record<string, unknown>> {
    const res = await fetch(`${this.baseUrl}/_matrix/client/v3${path}`, {
      method,
      headers: { authorization: `Bearer ${this.user.accessToken}`, "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const json = (await res.json()) as Record<string, unknown>;
    if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${JSON.stringify(json)}`);
    return json;
  }

  async createRoom(body: Record<string, unknown>): Promise<string> {
    return String((await this.call("POST", "/createRoom", body)).room_id);
  }

  async join(roomId: string): Promise<void> {
    await this.call("POST", `/join/${encodeURIComponent(roomId)}`, {});
  }

  async send(roomId: string, content: Record<string, unknown>, type = "m.room.message"): Promise<string> {
    const path = `/rooms/${encodeURIComponent(roomId)}/send/${type}/${Date.now()}-${++this.txn}`;
    return String((await this.call("PUT", path, content)).event_id);
  }

  say(roomId: string, body: string): Promise<string> {
    return this.send(roomId, { msgtype: "m.text", body });
  }

  async state(roomId: string): Promise<Event[]> {
    const res = await fetch(`${this.baseUrl}/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/state`, {
      headers: { authorization: `Bearer ${this.user.accessToken}` },
    });
    if (!res.ok) throw new Error(`GET state: ${res.status} ${await res.text()}`);
    return (await res.json()) as Event[];
  }

  async setState(roomId: string, type: string, content: Record<string, unknown>): Promise<void> {
    await this.call("PUT", `/rooms/${encodeURIComponent(roomId)}/state/${type}/`, content);
  }

  /** The room's latest events, oldest first (§GET /rooms/{roomId}/messages, backwards from now). */
  async timeline(roomId: string): Promise<Event[]> {
    const { chunk } = await this.call("GET", `/rooms/${encodeURIComponent(roomId)}/messages?dir=b&limit=100`);
    return (chunk as Event[]).reverse();
  }
}

const relatesTo = (e: Event) => e.content["m.relates_to"] as Record<string, unknown> | undefined;
const inReplyTo = (e: Event) =>
  (relatesTo(e)?.["m.in_reply_to"] as { event_id?: unknown } | undefined)?.event_id;

const skip = synapseSkipReason();

describe("control from the room, with Synapse", { skip, timeout: 120_000 }, () => {
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  let dataDir: string;
  let synapse: Synapse;
  let config: Config;
  let registration: Registration;
  let bridge: RunningBridge;
  let device: MqttClient;
  let alice: Person; // a tribridge admin
  let bob: Person; // a member, at power level 0 at first
  let carol: Person; // the room's creator, not an admin
  let dave: Person; // another member at level 0, who writes in a thread
  let bot: string;
  let ops: string;
  let plant: string; // routed to a broker of the test's own, which it stops and starts again
  let broker: Broker | undefined;
  const published: { topic: string; body: string }[] = [];

  async function up(): Promise<void> {
    bridge = await start({ config, registration, connectors });
    const port = (bridge.connector("mqtt.home") as MqttConnector).ports!.tcp;
    device = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
      clientId: "sensor-1",
      reconnectPeriod: 0,
    });
    await device.subscribeAsync(["ops/out", "some/topic"], { qos: 1 });
    device.on("message", (topic, payload) => published.push({ topic, body: payload.toString() }));
  }

  async function down(): Promise<void> {
    await device.endAsync(true);
    await bridge.stop();
  }

  /** The events of `room` (as `who` reads them) that `pick` selects, once there are some. */
  const waitForEvents = (what: string, who: Person, room: string, pick: (e: Event) => boolean) =>
    waitFor(
      what,
      async () => {
        const found = (await who.timeline(room)).filter(pick);
        return found.length > 0 && found;
      },
      RELAY_TIMEOUT_MS,
    );

  const reactionsBy = (sender: string, eventId: string, key: string) => (e: Event) =>
    e.type === "m.reaction" &&
    e.sender === sender &&
    relatesTo(e)?.rel_type === "m.annotation" &&
    relatesTo(e)?.event_id === eventId &&
    relatesTo(e)?.key === key;

  before(async () => {
    dataDir = tempDataDir();
    broker = await startMosquitto();
    const base = {
      dataDir,
      homeserver: { url: "http://127.0.0.1:1", domain: SERVER_NAME },
      appservice: { port: await freePort(), admins: [`@alice:${SERVER_NAME}`] },
      queue: {
        redisUrl: REDIS_URL,
        prefix,
        shards: 2,
        initialRetryDelayMs: 50,
        maxRetryDelayMs: 1000,
        maxProbeDelayMs: 200,
      },
      bridges: {
        mqtt: {
          // Longer messages fail for good: the failure answers.
          home: { embedded: { port: await freePort(), maxPayloadBytes: MAX_PAYLOAD_BYTES } },
          ...(broker && { plant: { url: `mqtt://127.0.0.1:${broker.port}`, reconnectPeriodMs: 100 } }),
        },
      },
    };
    registration = buildRegistration(validateConfig(base, connectors), connectors);
    synapse = await startSynapse({ serverName: SERVER_NAME, registrations: [registration] });
    console.log(`Synapse started in ${synapse.startMs} ms`);
    alice = new Person(synapse.url, await synapse.registerUser("alice", { displayName: "Alice" }));
    bob = new Person(synapse.url, await synapse.registerUser("bob", { displayName: "Bob" }));
    carol = new Person(synapse.url, await synapse.registerUser("carol", { displayName: "Carol" }));
    dave = new Person(synapse.url, await synapse.registerUser("dave", { displayName: "Dave" }));
    bot = `@${validateConfig(base, connectors).appservice.botLocalpart}:${SERVER_NAME}`;
    // The bot may send state (the bridge information); bob is a member at level 0. Synapse makes
    // room version 12 rooms, where carol, their creator, ranks above every level (and may not be
    // listed in `users`).
    ops = await carol.createRoom({
      name: "ops",
      preset: "public_chat",
      power_level_content_override: { users: { [bot]: 100 } },
    });
    await bob.join(ops);
    await alice.join(ops);
    await dave.join(ops);
    plant = await carol.createRoom({
      name: "plant",
      preset: "public_chat",
      power_level_content_override: { users: { [bot]: 100 } },
    });
    config = validateConfig(
      {
        ...base,
        homeserver: { url: synapse.url, domain: SERVER_NAME },
        routes: [
          {
            id: "ops",
            room: ops,
            endpoints: [
              { account: "mqtt.home", direction: "out", topic: "ops/out", qos: 1 },
              { account: "mqtt.home", direction: "in", topic: "ops/in" },
            ],
          },
          ...(broker
            ? [
                {
                  id: "plant",
                  room: plant,
                  endpoints: [{ account: "mqtt.plant", direction: "out", topic: "plant/cmd", qos: 1 }],
                },
              ]
            : []),
        ],
      },
      connectors,
    );
    await up();
  });

  after(async () => {
    await device?.endAsync(true);
    await bridge?.stop();
    await synapse?.stop();
    await broker?.stop();
    await deleteKeys(prefix);
    if (dataDir) rmSync(dataDir, { recursive: true, force: true });
  });

  test("the bridge information (m.bridge, uk.half-shot.bridge) is readable by a member, and a restart sends it not again", async () => {
    const bridgeState = async () =>
      (await bob.state(ops)).filter((e) => e.type === "m.bridge" || e.type === "uk.half-shot.bridge");
    const before = await waitFor("the bridge information", async () => {
      const found = await bridgeState();
      return found.length >= 2 && found;
    });
    for (const type of ["m.bridge", "uk.half-shot.bridge"]) {
      const event = before.find((e) => e.type === type);
      assert.ok(event, `${type} in the room`);
      assert.equal(event.sender, bot);
      assert.match(event.state_key!, /^tribridge:\/\/mqtt\//);
      assert.equal(event.content.bridgebot, bot);
      assert.deepEqual(event.content.protocol, { id: "mqtt", displayname: "MQTT" });
    }
    await down();
    await up();
    const afterRestart = await bridgeState();
    assert.deepEqual(
      afterRestart.map((e) => e.event_id).sort(),
      before.map((e) => e.event_id).sort(),
      "the same state events: nothing sent again",
    );
  });

  test("a member at power level 0 is refused (⛔, one notice); raised live to 50, their next message goes out", async () => {
    const first = await bob.say(ops, "bob at level 0");
    await waitForEvents("the ⛔ on the first message", bob, ops, reactionsBy(bot, first, "⛔"));
    const notice = await waitForEvents("the notice in reply", bob, ops, (e) => inReplyTo(e) === first);
    assert.equal(notice.length, 1);
    assert.equal(notice[0]!.sender, bot);
    assert.equal(notice[0]!.content.msgtype, "m.notice");
    const second = await bob.say(ops, "bob at level 0, again");
    await waitForEvents("the ⛔ on the second message", bob, ops, reactionsBy(bot, second, "⛔"));

    // Refused in a thread: the notice goes into that thread.
    const root = await carol.say(ops, "a thread dave writes in");
    const daves = await dave.send(ops, {
      msgtype: "m.text",
      body: "dave in a thread",
      "m.relates_to": {
        rel_type: "m.thread",
        event_id: root,
        is_falling_back: true,
        "m.in_reply_to": { event_id: root },
      },
    });
    await waitForEvents("the ⛔ on dave's message", dave, ops, reactionsBy(bot, daves, "⛔"));
    const [toDave] = await waitForEvents("dave's notice", dave, ops, (e) => inReplyTo(e) === daves);
    assert.deepEqual(relatesTo(toDave!), {
      rel_type: "m.thread",
      event_id: root,
      is_falling_back: false,
      "m.in_reply_to": { event_id: daves },
    });

    // A real m.room.power_levels change, sent by the room's admin.
    const levels = (await carol.state(ops)).find((e) => e.type === "m.room.power_levels")!.content;
    const users = { ...(levels.users as Record<string, number>), [bob.userId]: 50 };
    await carol.setState(ops, "m.room.power_levels", { ...levels, users });
    const third = await bob.say(ops, "bob at level 50");
    await waitFor(
      "bob's message at the device",
      () => published.some((p) => p.topic === "ops/out" && p.body.includes("bob at level 50")),
      RELAY_TIMEOUT_MS,
    );
    await waitForEvents("the ✅ on the message let through", bob, ops, reactionsBy(bot, third, "✅"));
    const bodies = published.filter((p) => p.topic === "ops/out").map((p) => p.body);
    assert.ok(
      !bodies.some((b) => b.includes("level 0")),
      `refused messages not published: ${bodies.join(" | ")}`,
    );
    const notices = (await bob.timeline(ops)).filter(
      (e) =>
        e.sender === bot && e.type === "m.room.message" && [first, second].includes(String(inReplyTo(e))),
    );
    assert.equal(notices.length, 1, "one notice for the two refused messages");
  });

  test("✅ once the broker took a message; a second identical mark is Synapse's M_DUPLICATE_ANNOTATION, taken as on already", async () => {
    // By the room's creator, who is not an admin: in a version 12 room, above every level.
    const sent = await carol.say(ops, "marked once");
    await waitFor(
      "carol's message at the device",
      () => published.some((p) => p.topic === "ops/out" && p.body.includes("marked once")),
      RELAY_TIMEOUT_MS,
    );
    await waitForEvents("the ✅", alice, ops, reactionsBy(bot, sent, "✅"));

    // A mark the bridge puts on an event that has the bot's ✅ already, under another transaction id
    // (as after Synapse forgot the first one's): Synapse refuses it, 400 M_DUPLICATE_ANNOTATION,
    // which the bridge's feedback takes as the mark being on: no warning, no second mark. The event:
    // a notice, which the route does not relay, so that only this test marks it.
    const notice = await carol.send(ops, { msgtype: "m.notice", body: "premarked" });
    const lines: string[] = [];
    const log = pino({ level: "debug" }, { write: (line: string) => void lines.push(line) });
    const matrix = new MatrixClient({
      homeserverUrl: synapse.url,
      domain: SERVER_NAME,
      botUserId: bot,
      botDisplayName: config.appservice.botDisplayName,
      registration,
      log,
    });
    const redis = connectRedis(REDIS_URL, "test");
    try {
      const asBot = { userId: bot, displayName: config.appservice.botDisplayName };
      const reaction = { "m.relates_to": { rel_type: "m.annotation", event_id: notice, key: "✅" } };
      await matrix.sendAs(asBot, ops, "m.reaction", reaction, `first-${randomUUID()}`);
      await assert.rejects(matrix.sendAs(asBot, ops, "m.reaction", reaction, `again-${randomUUID()}`), {
        errcode: "M_DUPLICATE_ANNOTATION",
      });
      const feedback = new DeliveryFeedback({
        matrix,
        bot: asBot,
        routes: new RouteTable(config.routes),
        defaults: config.feedback,
        redis,
        prefix: `${prefix}-feedback`,
        log,
      });
      const endpointId = config.routes[0]!.endpoints.find((e) => e.direction === "out")!.id;
      feedback.note(
        {
          endpointId,
          roomId: ops,
          sender: carol.userId,
          content: { msgtype: "m.notice", body: "premarked" },
          timestamp: Date.now(),
          eventId: notice,
          endpoints: [endpointId],
        },
        "accepted",
      );
      await feedback.settled();
      const warnings = lines.filter((l) => (JSON.parse(l) as { level: number }).level >= 40);
      assert.deepEqual(warnings, [], "no warning");
      const marks = (await alice.timeline(ops)).filter(reactionsBy(bot, notice, "✅"));
      assert.equal(marks.length, 1, "one ✅");
    } finally {
      matrix.stop();
      redis.disconnect();
      await deleteKeys(`${prefix}-feedback`);
    }
  });

  test("a message the broker refuses for good is answered in its thread, and not marked ✅", async () => {
    const answerTo = (eventId: string) =>
      waitForEvents(
        `the failure answer to ${eventId}`,
        alice,
        ops,
        (e) => e.sender === bot && e.type === "m.room.message" && inReplyTo(e) === eventId,
      );
    // A message of its own: the root of the answer's thread.
    const plain = await carol.say(ops, `plain ${TOO_LONG}`);
    const [first] = await answerTo(plain);
    assert.deepEqual(relatesTo(first!), {
      rel_type: "m.thread",
      event_id: plain,
      is_falling_back: true,
      "m.in_reply_to": { event_id: plain },
    });
    assert.match(String(first!.content.body), /^Not delivered to ops\..*exceeds 1024/);

    // In a thread: answered in that thread.
    const root = await carol.say(ops, "a thread's root");
    const inThread = await carol.send(ops, {
      msgtype: "m.text",
      body: `in the thread ${TOO_LONG}`,
      "m.relates_to": {
        rel_type: "m.thread",
        event_id: root,
        is_falling_back: true,
        "m.in_reply_to": { event_id: root },
      },
    });
    const [second] = await answerTo(inThread);
    assert.deepEqual(relatesTo(second!), {
      rel_type: "m.thread",
      event_id: root,
      is_falling_back: false,
      "m.in_reply_to": { event_id: inThread },
    });

    // A reply (no rel_type): Synapse lets it be a thread's root.
    const reply = await carol.send(ops, {
      msgtype: "m.text",
      body: `a reply ${TOO_LONG}`,
      "m.relates_to": { "m.in_reply_to": { event_id: root } },
    });
    const [third] = await answerTo(reply);
    assert.equal(relatesTo(third!)?.rel_type, "m.thread");
    assert.equal(relatesTo(third!)?.event_id, reply);

    const timeline = await alice.timeline(ops);
    for (const failed of [plain, inThread, reply])
      assert.equal(timeline.filter(reactionsBy(bot, failed, "✅")).length, 0, "no ✅ on a failed message");
  });

  test(
    "the broker down: ⏳ while it is; then ✅, and the ⏳ redacted",
    { skip: !hasMosquitto && "mosquitto is not installed" },
    async () => {
      await waitFor("the plant broker up", () => bridge.connectorStates()["mqtt.plant"]?.state === "up");
      const { port } = broker!;
      const stopped = broker!;
      broker = undefined; // what follows starts it again, also when it fails
      await stopped.stop();
      try {
        const sent = await carol.say(plant, "while the broker is down");
        const [waiting] = await waitForEvents("the ⏳", carol, plant, reactionsBy(bot, sent, "⏳"));
        broker = await startMosquitto(port);
        await waitForEvents("the ✅", carol, plant, reactionsBy(bot, sent, "✅"));
        await waitFor(
          "the ⏳ redacted",
          async () => {
            const mark = (await carol.timeline(plant)).find((e) => e.event_id === waiting!.event_id);
            return mark !== undefined && relatesTo(mark) === undefined;
          },
          RELAY_TIMEOUT_MS,
        );
      } finally {
        broker ??= await startMosquitto(port);
      }
    },
  );

  test("a command is answered as a reply; a room linked by command gets what a device publishes", async () => {
    const command = await alice.say(ops, "!tribridge status");
    const [answer] = await waitForEvents(
      "the answer",
      alice,
      ops,
      (e) => e.sender === bot && inReplyTo(e) === command,
    );
    assert.equal(answer!.content.msgtype, "m.notice");
    assert.match(String(answer!.content.body), /tribridge is running with \d route/);
    assert.deepEqual(answer!.content["m.mentions"], { user_ids: [alice.userId] });

    // Given in a thread: answered in that thread (§Replies within threads), which Synapse takes.
    const root = await alice.say(ops, "a thread for commands");
    const inThread = await alice.send(ops, {
      msgtype: "m.text",
      body: "!tribridge help",
      "m.relates_to": {
        rel_type: "m.thread",
        event_id: root,
        is_falling_back: true,
        "m.in_reply_to": { event_id: root },
      },
    });
    const [threaded] = await waitForEvents(
      "the answer in the thread",
      alice,
      ops,
      (e) => e.sender === bot && inReplyTo(e) === inThread,
    );
    assert.deepEqual(relatesTo(threaded!), {
      rel_type: "m.thread",
      event_id: root,
      is_falling_back: false,
      "m.in_reply_to": { event_id: inThread },
    });

    const room = await alice.createRoom({ name: "linked", preset: "private_chat", invite: [bot] });
    await waitFor(
      "the bot to join the room it was invited to",
      async () =>
        (await alice.state(room)).some(
          (e) => e.type === "m.room.member" && e.state_key === bot && e.content.membership === "join",
        ),
      RELAY_TIMEOUT_MS,
    );
    const link = await alice.say(room, "!tribridge link mqtt.home some/topic inout");
    const [linked] = await waitForEvents(
      "the link's answer",
      alice,
      room,
      (e) => e.sender === bot && inReplyTo(e) === link,
    );
    assert.match(String(linked!.content.body), /^Linked mqtt\.home some\/topic \(inout\)/);

    await device.publishAsync("some/topic", "hello, linked room", { qos: 1 });
    const ghost = ghostUserId(
      { ghostPrefix: config.appservice.ghostPrefix, domain: SERVER_NAME },
      "mqtt",
      "home",
      "sensor-1",
    );
    const [message] = await waitForEvents(
      "the device's message in the linked room",
      alice,
      room,
      (e) => e.type === "m.room.message" && e.content.body === "hello, linked room",
    );
    assert.equal(message!.sender, ghost);
    const said = await alice.say(room, "hello, device");
    await waitFor(
      "the room's message at the device",
      () => published.some((p) => p.topic === "some/topic" && p.body.includes("hello, device")),
      RELAY_TIMEOUT_MS,
    );
    await waitForEvents("the ✅ in the linked room", alice, room, reactionsBy(bot, said, "✅"));
  });

  test("/ready names the homeserver: ok, 503 while Synapse is stopped, ok again once it is back", async () => {
    const ready = async () => {
      const res = await fetch(`http://127.0.0.1:${bridge.appservicePort}/ready`);
      return { status: res.status, body: (await res.json()) as { checks: Record<string, string> } };
    };
    const up1 = await ready();
    assert.equal(up1.status, 200, JSON.stringify(up1.body));
    assert.equal(up1.body.checks.homeserver, "ok");
    await synapse.pause();
    const stopped = await waitFor("/ready to say 503", async () => {
      const r = await ready();
      return r.status === 503 && r;
    });
    assert.notEqual(stopped.body.checks.homeserver, "ok");
    console.log(`/ready with Synapse stopped: ${JSON.stringify(stopped.body.checks)}`);
    await synapse.resume();
    const back = await waitFor(
      "/ready to say 200 again",
      async () => {
        const r = await ready();
        return r.status === 200 && r;
      },
      RELAY_TIMEOUT_MS,
    );
    assert.equal(back.body.checks.homeserver, "ok");
  });
});
