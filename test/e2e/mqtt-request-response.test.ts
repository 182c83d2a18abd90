/**
 * MQTT 5 request/response (§4.10) through a real Mosquitto: a room message to an endpoint with a
 * `responseTopic` is published with the response topic and correlation data; a device that answers
 * there with the same correlation data has its answer posted as a threaded reply to the command
 * (Client-Server API §Threading: `rel_type: m.thread` to the command, `m.in_reply_to` it). An answer
 * whose correlation data names no command is not taken for a reply. The other way, a room reply to
 * a device's request (a publish with a response topic) is published to that response topic with the
 * request's correlation data. Needs Mosquitto.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { Redis } from "ioredis";
import mqtt, { type IPublishPacket, type MqttClient } from "mqtt";
import { connectors } from "../../bridges/index.js";
import { start, type RunningBridge } from "../../src/app.js";
import { requeueAllFailedJobs } from "../../src/queue/failed-jobs.js";
import { hasMosquitto, startMosquitto, type Broker } from "../helpers/brokers.js";
import { REDIS_URL, harness, waitFor, type Harness } from "../helpers/fixture.js";
import type { RecordedEvent } from "../helpers/test-homeserver.js";

type Relates = { rel_type?: string; event_id?: string; "m.in_reply_to"?: { event_id?: string } };
const relatesTo = (e: RecordedEvent | undefined) => e?.content["m.relates_to"] as Relates | undefined;

describe("MQTT 5 request/response", { skip: !hasMosquitto && "mosquitto is not installed" }, () => {
  let broker: Broker;
  let h: Harness;
  let bridge: RunningBridge;
  let room: string;
  let device: MqttClient;
  const commands: IPublishPacket[] = [];

  before(async () => {
    broker = (await startMosquitto())!;
    h = await harness({
      bridges: { mqtt: { lab: { url: `mqtt://127.0.0.1:${broker.port}`, protocolVersion: 5 } } },
      routes: [
        {
          id: "lab",
          room: "#lab:test.local",
          endpoints: [
            {
              account: "mqtt.lab",
              direction: "out",
              topic: "lab/pump/set",
              responseTopic: "lab/pump/response",
              sender: { name: "pump" },
            },
            // Answers with no command of ours on this topic are device messages like any other.
            { account: "mqtt.lab", direction: "in", topic: "lab/valve/#", sender: { name: "valve" } },
            {
              account: "mqtt.lab",
              direction: "out",
              topic: "lab/valve/set",
              responseTopic: "lab/valve/response",
            },
            // A room reply to a device's request goes where the device asked, once, not to these.
            { account: "mqtt.lab", direction: "out", topic: "lab/notes", answerRequests: true },
            { account: "mqtt.lab", direction: "out", topic: "lab/log", answerRequests: true },
          ],
        },
      ],
    });
    room = h.hs.createRoom({ creator: h.alice, alias: "#lab:test.local", preset: "public_chat" });
    bridge = await start({ config: h.config, registration: h.registration, connectors });
    await waitFor("connected", () => bridge.connectorStates()["mqtt.lab"]?.state === "up");
    device = await mqtt.connectAsync(`mqtt://127.0.0.1:${broker.port}`, {
      clientId: "lab-device",
      protocolVersion: 5,
    });
    device.on("message", (_topic, _payload, packet) => commands.push(packet));
    await device.subscribeAsync(["lab/pump/set", "lab/valve/set", "lab/notes", "lab/log", "lab/answers/#"], {
      qos: 1,
    });
    // The bridge's own subscriptions (the response topics) are in place once a probe comes back.
    await waitFor("the bridge subscribed", async () => {
      await device.publishAsync("lab/valve/probe", "probe", { qos: 1 });
      return h.hs.messages(room).some((m) => m.content.body === "probe");
    });
  });

  after(async () => {
    await device?.endAsync();
    await bridge?.stop();
    await h?.cleanup();
    await broker?.stop();
  });

  async function command(topic: string, body: string): Promise<{ eventId: string; packet: IPublishPacket }> {
    const eventId = h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body });
    const packet = await waitFor(`${body} published`, () =>
      commands.find((p) => p.topic === topic && p.payload.toString() === body),
    );
    return { eventId, packet };
  }

  test("a command carries the response topic and correlation data; the answer is a threaded reply", async () => {
    const { eventId, packet } = await command("lab/pump/set", "pump on");
    assert.equal(packet.properties?.responseTopic, "lab/pump/response");
    const correlationData = packet.properties?.correlationData;
    assert.ok(correlationData && correlationData.byteLength > 0, "correlation data");

    await device.publishAsync("lab/pump/response", "pump is on", {
      qos: 1,
      properties: { correlationData },
    });
    const answer = await waitFor("the answer in the room", () =>
      h.hs.messages(room).find((m) => m.content.body === "pump is on"),
    );
    assert.deepEqual(relatesTo(answer), {
      rel_type: "m.thread",
      event_id: eventId,
      is_falling_back: false,
      "m.in_reply_to": { event_id: eventId },
    });
    assert.match(answer.sender, /pump/, "the endpoint's sender speaks");

    // A second answer to the same command (progress, then done) is a reply too.
    await device.publishAsync("lab/pump/response", "pump at full speed", {
      qos: 1,
      properties: { correlationData },
    });
    const second = await waitFor("the second answer", () =>
      h.hs.messages(room).find((m) => m.content.body === "pump at full speed"),
    );
    assert.equal(relatesTo(second)?.rel_type, "m.thread");
    assert.equal(relatesTo(second)?.event_id, eventId);
  });

  test("two commands in a row: each answer finds its own command, whatever the order", async () => {
    const first = await command("lab/pump/set", "pump speed 1");
    const second = await command("lab/pump/set", "pump speed 2");
    assert.notDeepEqual(first.packet.properties?.correlationData, second.packet.properties?.correlationData);
    for (const [c, body] of [
      [second, "speed 2 set"],
      [first, "speed 1 set"],
    ] as const) {
      await device.publishAsync("lab/pump/response", body, {
        qos: 1,
        properties: { correlationData: c.packet.properties!.correlationData! },
      });
    }
    for (const [c, body] of [
      [first, "speed 1 set"],
      [second, "speed 2 set"],
    ] as const) {
      const answer = await waitFor(body, () => h.hs.messages(room).find((m) => m.content.body === body));
      assert.equal(relatesTo(answer)?.event_id, c.eventId, `${body} answers its command`);
    }
  });

  test("an answer with unknown correlation data is no reply: a message of its topic, or the failed list", async () => {
    await command("lab/valve/set", "valve open");
    // lab/valve/response is also an `in` topic: posted there as a plain message.
    await device.publishAsync("lab/valve/response", "who asked?", {
      qos: 1,
      properties: { correlationData: Buffer.alloc(65_535, 7) }, // hostile: the longest MQTT allows
    });
    const plain = await waitFor("the plain message", () =>
      h.hs.messages(room).find((m) => m.content.body === "who asked?"),
    );
    assert.equal(relatesTo(plain), undefined);

    // lab/pump/response is no `in` topic: kept out of the room, in the failed list with the reason.
    await device.publishAsync("lab/pump/response", "stray answer", {
      qos: 1,
      properties: { correlationData: Buffer.from("not ours") },
    });
    await device.publishAsync("lab/pump/response", "no correlation at all", { qos: 1 });
    const failed = await waitFor("both in the failed list", async () => {
      const jobs = (await bridge.failedJobs()).filter((j) =>
        /answer on response topic lab\/pump\/response/.test(j.reason ?? ""),
      );
      return jobs.length >= 2 && jobs;
    });
    assert.deepEqual(failed.map((j) => (j.data as { body: { text: string } }).body.text).sort(), [
      "no correlation at all",
      "stray answer",
    ]);
    assert.ok(failed.some((j) => /unknown correlation data \(6e6f74206f757273\)/.test(j.reason ?? "")));
    assert.ok(failed.some((j) => /without correlation data/.test(j.reason ?? "")));
    assert.ok(!h.hs.messages(room).some((m) => m.content.body === "stray answer"), "not posted in the room");

    // The operator's release: retried, it is posted in the endpoint's room, as a plain message.
    const redis = new Redis(h.config.queue.redisUrl ?? REDIS_URL);
    try {
      const stray = failed.filter((j) => /unknown correlation/.test(j.reason ?? ""));
      assert.equal(
        await requeueAllFailedJobs(redis, h.config, connectors, new Set(stray.map((j) => j.id))),
        1,
      );
    } finally {
      redis.disconnect();
    }
    const released = await waitFor("the released answer", () =>
      h.hs.messages(room).find((m) => m.content.body === "stray answer"),
    );
    assert.equal(relatesTo(released), undefined);
  });

  test("a room reply to a device's request goes to its response topic with its correlation data, once", async () => {
    const correlationData = Buffer.from([0, 1, 2, 255]);
    await device.publishAsync("lab/valve/state", "may I open?", {
      qos: 1,
      properties: { responseTopic: "lab/answers/valve", correlationData },
    });
    const request = await waitFor("the request in the room", () =>
      h.hs.messages(room).find((m) => m.content.body === "may I open?"),
    );
    h.hs.sendMessage(room, h.alice, {
      msgtype: "m.text",
      body: "yes, open",
      "m.relates_to": { "m.in_reply_to": { event_id: request.event_id } },
    });
    const answer = await waitFor("the answer on the response topic", () =>
      commands.find((p) => p.topic === "lab/answers/valve"),
    );
    assert.equal(answer.payload.toString(), "yes, open");
    assert.deepEqual(answer.properties?.correlationData, correlationData);
    assert.equal(answer.retain, false);

    // Whatever follows it in the room reaches the answering endpoints' own topics again; by then the
    // reply has been handled by every endpoint (one room, in order).
    h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "after the answer" });
    await waitFor("the next message on lab/log", () =>
      commands.some((p) => p.topic === "lab/log" && p.payload.toString() === "after the answer"),
    );
    assert.equal(commands.filter((p) => p.topic === "lab/answers/valve").length, 1, "answered once");
    assert.ok(
      !commands.some(
        (p) => ["lab/notes", "lab/log"].includes(p.topic) && p.payload.toString() === "yes, open",
      ),
      "not published to the answering endpoints' topics",
    );
  });

  test("a request with over-long correlation data is not answered on its response topic", async () => {
    await device.publishAsync("lab/valve/state", "long request", {
      qos: 1,
      properties: { responseTopic: "lab/answers/long", correlationData: Buffer.alloc(65_535, 1) },
    });
    const request = await waitFor("the request in the room", () =>
      h.hs.messages(room).find((m) => m.content.body === "long request"),
    );
    h.hs.sendMessage(room, h.alice, {
      msgtype: "m.text",
      body: "plain reply",
      "m.relates_to": { "m.in_reply_to": { event_id: request.event_id } },
    });
    await waitFor("the reply on the endpoint's own topic", () =>
      commands.some((p) => p.topic === "lab/notes" && p.payload.toString() === "plain reply"),
    );
    assert.ok(!commands.some((p) => p.topic === "lab/answers/long"));
  });

  test("requests whose response topic has wildcards or is a $ topic (Mosquitto passes them on) are answered on the endpoint's own topic", async () => {
    // [MQTT-3.3.2-14]: a response topic is a topic name; Mosquitto 2 relays these all the same.
    for (const responseTopic of ["lab/answers/+", "lab/answers/#", "$SYS/answers"]) {
      const body = `request to ${responseTopic}`;
      await device.publishAsync("lab/valve/state", body, {
        qos: 1,
        properties: { responseTopic, correlationData: Buffer.from("c1") },
      });
      const request = await waitFor(`the request in the room (${responseTopic})`, () =>
        h.hs.messages(room).find((m) => m.content.body === body),
      );
      const reply = `reply to ${responseTopic}`;
      h.hs.sendMessage(room, h.alice, {
        msgtype: "m.text",
        body: reply,
        "m.relates_to": { "m.in_reply_to": { event_id: request.event_id } },
      });
      await waitFor(`the reply on the endpoint's own topic (${responseTopic})`, () =>
        commands.some((p) => p.topic === "lab/notes" && p.payload.toString() === reply),
      );
      assert.ok(!commands.some((p) => p.topic.startsWith("lab/answers/") && p.payload.toString() === reply));
    }
  });
});
