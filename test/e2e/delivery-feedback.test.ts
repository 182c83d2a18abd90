/**
 * Delivery feedback in the room: the bot's ✅ on a room message once the broker acknowledged it
 * (PUBACK), ⏳ while the broker is down (taken back when it is delivered), one mark for a message
 * to several endpoints, the reason of a failure for good in the message's thread, and no marks on
 * a route with `feedback.marks: off`. Through a Mosquitto of the test's own, which it stops and
 * starts again on the same port, and an embedded broker that refuses large payloads.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import mqtt, { type MqttClient } from "mqtt";
import { connectors } from "../../bridges/index.js";
import { start, type RunningBridge } from "../../src/app.js";
import { hasMosquitto, startMosquitto, type Broker } from "../helpers/brokers.js";
import { harness, waitFor, type Harness } from "../helpers/fixture.js";
import type { RecordedEvent } from "../helpers/test-homeserver.js";

const ROOMS = ["plant", "quiet", "pair", "tiny"] as const;

describe("delivery feedback in the room", { skip: !hasMosquitto && "mosquitto is not installed" }, () => {
  let h: Harness;
  let broker: Broker;
  let bridge: RunningBridge;
  let listener: MqttClient;
  const rooms = new Map<string, string>();
  const heard: { topic: string; text: string }[] = [];

  before(async () => {
    broker = (await startMosquitto())!;
    h = await harness({
      bridges: {
        mqtt: {
          plant: { url: `mqtt://127.0.0.1:${broker.port}`, reconnectPeriodMs: 100 },
          tiny: { embedded: { port: 0, maxPayloadBytes: 16 } },
        },
      },
      queue: { maxProbeDelayMs: 200 },
      routes: [
        { id: "plant", room: "#plant:test.local", endpoints: [out("plant", "plant/cmd")] },
        {
          id: "quiet",
          room: "#quiet:test.local",
          feedback: { marks: "off" },
          endpoints: [out("plant", "quiet/cmd")],
        },
        {
          id: "pair",
          room: "#pair:test.local",
          feedback: { accepted: "👍" },
          endpoints: [out("plant", "pair/a"), out("plant", "pair/b")],
        },
        {
          id: "tiny",
          room: "#tiny:test.local",
          endpoints: [out("plant", "tiny/ok"), out("tiny", "tiny/cmd")],
        },
      ],
    });
    for (const name of ROOMS)
      rooms.set(
        name,
        h.hs.createRoom({ creator: h.alice, alias: `#${name}:test.local`, preset: "public_chat" }),
      );
    bridge = await start({ config: h.config, registration: h.registration, connectors });
    await waitFor("connected to the broker", () => bridge.connectorStates()["mqtt.plant"]?.state === "up");
    listener = await mqtt.connectAsync(`mqtt://127.0.0.1:${broker.port}`, { reconnectPeriod: 100 });
    listener.on("message", (topic, payload) => heard.push({ topic, text: payload.toString() }));
    await listener.subscribeAsync("#", { qos: 1 });
  });

  after(async () => {
    await listener?.endAsync(true);
    await bridge?.stop();
    await h?.cleanup();
    await broker?.stop();
  });

  function out(account: string, topic: string) {
    return { account: `mqtt.${account}`, direction: "out", topic, qos: 1 };
  }

  const say = (room: string, body: string, extra: Record<string, unknown> = {}) =>
    h.hs.sendMessage(rooms.get(room)!, h.alice, { msgtype: "m.text", body, ...extra });

  const relationOf = (e: RecordedEvent) =>
    e.content["m.relates_to"] as { event_id?: string; key?: string } | undefined;
  /** The bot's reactions to `eventId` (a redacted one has lost its relation). */
  const marksOn = (room: string, eventId: string): RecordedEvent[] =>
    h.hs
      .events(rooms.get(room)!)
      .filter(
        (e) =>
          e.type === "m.reaction" &&
          e.sender === h.hs.appserviceUserId &&
          relationOf(e)?.event_id === eventId,
      );
  const keysOn = (room: string, eventId: string) => marksOn(room, eventId).map((e) => relationOf(e)!.key);
  const redacted = (room: string, eventId: string) =>
    h.hs.events(rooms.get(room)!).some((r) => r.type === "m.room.redaction" && r.redacts === eventId);

  test("a message the broker acknowledged (PUBACK) gets the bot's ✅, once", async () => {
    const at = Date.now();
    const sent = say("plant", "pump on");
    await waitFor("the ✅", () => keysOn("plant", sent).length > 0);
    console.log(`# the ✅ ${Date.now() - at} ms after the message was sent`);
    await waitFor("the publish", () => heard.some((m) => m.topic === "plant/cmd" && m.text === "pump on"));
    await sleep(300);
    assert.deepEqual(keysOn("plant", sent), ["✅"]);
    // The listener back on the new broker, for the tests after this one.
    await waitFor("the listener reconnected", () => listener.connected);
    await listener.subscribeAsync("#", { qos: 1 });
  });

  test("a message to two endpoints: one mark (the route's own key), once both accepted it", async () => {
    const sent = say("pair", "both");
    await waitFor("the mark", () => keysOn("pair", sent).length > 0);
    await waitFor("both publishes", () => heard.filter((m) => m.text === "both").length === 2);
    assert.deepEqual(
      heard.filter((m) => m.text === "both").map((m) => m.topic),
      ["pair/a", "pair/b"],
    );
    await sleep(300);
    assert.deepEqual(keysOn("pair", sent), ["👍"]);
  });

  test("feedback.marks off: delivered, and no mark", async () => {
    const sent = say("quiet", "hush");
    await waitFor("the publish", () => heard.some((m) => m.topic === "quiet/cmd" && m.text === "hush"));
    await sleep(500);
    assert.deepEqual(keysOn("quiet", sent), []);
  });

  test("the broker down: ⏳ while it is, then ✅ and the ⏳ taken back once it is up again", async () => {
    await broker.stop();
    await waitFor(
      "the bridge sees the broker gone",
      () => bridge.connectorStates()["mqtt.plant"]?.state !== "up",
    );
    const sent = say("plant", "while down");
    await waitFor("the ⏳", () => keysOn("plant", sent).length > 0);
    await sleep(500);
    assert.deepEqual(keysOn("plant", sent), ["⏳"], "waiting, and only that, while the broker is down");
    const [waitingMark] = marksOn("plant", sent);
    assert.equal(heard.filter((m) => m.text === "while down").length, 0);

    broker = (await startMosquitto(broker.port))!;
    await waitFor("the ✅", () => keysOn("plant", sent).includes("✅"), 20_000);
    await waitFor("the ⏳ taken back", () => redacted("plant", waitingMark!.event_id));
    assert.deepEqual(keysOn("plant", sent), ["✅"]);
    // The listener back on the new broker, for the tests after this one.
    await waitFor("the listener reconnected", () => listener.connected);
    await listener.subscribeAsync("#", { qos: 1 });
  });

  test("a failure for good: its reason in the message's thread, no ✅; a message in a thread answered there", async () => {
    const tooLarge = say("tiny", "a command far longer than sixteen bytes");
    const notice = await waitFor("the bot's answer", () =>
      h.hs
        .messages(rooms.get("tiny")!)
        .find((e) => e.sender === h.hs.appserviceUserId && e.content.msgtype === "m.notice"),
    );
    assert.match(
      String(notice.content.body),
      /^Not delivered to tiny\.\w+: permanent: payload of \d+ bytes exceeds 16\./,
    );
    // CS API §Threading: the message is the thread's root; the reply is the fallback.
    assert.deepEqual(notice.content["m.relates_to"], {
      rel_type: "m.thread",
      event_id: tooLarge,
      is_falling_back: true,
      "m.in_reply_to": { event_id: tooLarge },
    });
    // The other endpoint took it; not all did: no ✅.
    await waitFor("the other publish", () => heard.some((m) => m.topic === "tiny/ok"));
    await sleep(300);
    assert.deepEqual(keysOn("tiny", tooLarge), []);

    // In a thread: answered in that thread, as a reply to the message.
    const inThread = say("tiny", "another long command in the thread", {
      "m.relates_to": {
        rel_type: "m.thread",
        event_id: tooLarge,
        is_falling_back: true,
        "m.in_reply_to": { event_id: tooLarge },
      },
    });
    const second = await waitFor(
      "the second answer",
      () =>
        h.hs
          .messages(rooms.get("tiny")!)
          .filter((e) => e.sender === h.hs.appserviceUserId && e.content.msgtype === "m.notice")[1],
    );
    assert.deepEqual(second.content["m.relates_to"], {
      rel_type: "m.thread",
      event_id: tooLarge,
      is_falling_back: false,
      "m.in_reply_to": { event_id: inThread },
    });
  });
});
