/**
 * `live: true` endpoints: one room message per device and topic, edited (m.replace) with each new
 * reading; a redacted live message makes the next reading post a new one.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import mqtt, { type MqttClient } from "mqtt";
import type { RunningBridge } from "../../src/app.js";
import { harness, waitFor, type Harness } from "../helpers/fixture.js";
import { startBridge } from "../helpers/start-bridge.js";
import { privateRoomBridge, type PrivateRoomBridge } from "../helpers/private-room.js";
import type { RecordedEvent } from "../helpers/test-homeserver.js";

interface Relates {
  rel_type?: string;
  event_id?: string;
}

const relatesTo = (e: RecordedEvent) => e.content["m.relates_to"] as Relates | undefined;
const isEdit = (e: RecordedEvent) => relatesTo(e)?.rel_type === "m.replace";
/** What a client shows for each live message: original id → latest body, by sender. */
function shown(events: RecordedEvent[]): Map<string, { sender: string; body: string }> {
  const out = new Map<string, { sender: string; body: string }>();
  for (const e of events) {
    if (!isEdit(e)) out.set(e.event_id, { sender: e.sender, body: String(e.content.body) });
    else {
      const original = out.get(relatesTo(e)!.event_id!);
      assert.ok(original, "an edit refers to a message posted before it");
      assert.equal(e.sender, original.sender, "edits come from the original sender");
      original.body = String((e.content["m.new_content"] as { body: string }).body);
      assert.equal(e.content.body, `* ${original.body}`, "the fallback for clients without edits");
    }
  }
  return out;
}

describe("live messages", () => {
  let h: Harness;
  let bridge: RunningBridge;
  let room: string;
  let port: number;
  const devices: MqttClient[] = [];
  const device = async (clientId: string) => {
    const d = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, { clientId });
    devices.push(d);
    return d;
  };
  const readings = () => h.hs.messages(room).filter((e) => e.sender !== h.alice);

  before(async () => {
    h = await harness({
      bridges: { mqtt: { home: { embedded: { port: 0 } } } },
      routes: [
        {
          id: "sensors",
          room: "#sensors:test.local",
          endpoints: [
            { account: "mqtt.home", direction: "in", topic: "sensors/+/+", sender: "clientId", live: true },
            { account: "mqtt.home", direction: "in", topic: "alerts/#" },
          ],
        },
      ],
    });
    room = h.hs.createRoom({ creator: h.alice, alias: "#sensors:test.local", preset: "public_chat" });
    const started = await startBridge(h);
    bridge = started.bridge;
    port = started.ports.mqtt;
  });

  after(async () => {
    await Promise.all(devices.map((d) => d.endAsync()));
    await bridge?.stop();
    await h?.cleanup();
  });

  test("each device and topic has one message, edited with every new reading; other endpoints post", async () => {
    const a = await device("dev-a");
    const b = await device("dev-b");
    // One reading at a time, each shown before the next (readings queued together are coalesced:
    // see the next describe).
    const publish = async (d: MqttClient, topic: string, value: string) => {
      await d.publishAsync(topic, value, { qos: 1 });
      await waitFor(`"${value}" shown`, () => [...shown(readings()).values()].some((m) => m.body === value));
    };
    for (const v of ["20.1", "20.4", "20.9"]) await publish(a, "sensors/a/temp", v);
    await publish(a, "sensors/a/humidity", "51%");
    for (const v of ["18.0", "18.2"]) await publish(b, "sensors/b/temp", v);
    await publish(a, "alerts/a", "door open");
    await publish(a, "alerts/a", "door closed");
    const events = readings();
    assert.equal(events.length, 8);
    assert.equal(events.filter(isEdit).length, 3);
    assert.deepEqual(
      [...shown(events).values()].map((m) => `${m.sender.includes("dev-a") ? "a" : "b"} ${m.body}`),
      ["a 20.9", "a 51%", "b 18.2", "a door open", "a door closed"],
    );
  });

  test("a redacted live message is not edited further: the next reading posts a new one", async () => {
    const a = devices[0]!;
    const live = readings().find((e) => e.content.body === "20.1")!;
    const res = await fetch(
      `${h.hs.url}/_matrix/client/v3/rooms/${encodeURIComponent(room)}/redact/${encodeURIComponent(live.event_id)}/r1`,
      {
        method: "PUT",
        headers: {
          authorization: `Bearer ${h.hs.accessTokenFor(h.alice)}`,
          "content-type": "application/json",
        },
        body: JSON.stringify({ reason: "too noisy" }),
      },
    );
    assert.equal(res.status, 200);
    await h.hs.waitForPushIdle();
    const before = readings().length;
    await a.publishAsync("sensors/a/temp", "21.3", { qos: 1 });
    await waitFor("the next reading", () => readings().length >= before + 1);
    await a.publishAsync("sensors/a/temp", "21.5", { qos: 1 });
    await waitFor("the one after", () => readings().length >= before + 2);
    const [fresh, edit] = readings().slice(before);
    assert.equal(isEdit(fresh!), false, "a new message");
    assert.equal(fresh!.content.body, "21.3");
    assert.equal(relatesTo(edit!)?.event_id, fresh!.event_id, "which later readings edit");
  });

  test("after the room is upgraded, a stream starts over in the new room, and is edited there", async () => {
    const a = devices[0]!;
    const newRoom = h.hs.createRoom({ creator: h.alice, preset: "public_chat" });
    h.hs.sendState(room, h.alice, "m.room.tombstone", "", { body: "replaced", replacement_room: newRoom });
    await waitFor(
      "the bot in the new room",
      () => h.hs.membershipOf(newRoom, h.hs.appserviceUserId) === "join",
    );
    await a.publishAsync("sensors/a/temp", "22.0", { qos: 1 });
    await waitFor("the reading in the new room", () => h.hs.messages(newRoom).length >= 1);
    await a.publishAsync("sensors/a/temp", "22.4", { qos: 1 });
    await waitFor("the next one", () => h.hs.messages(newRoom).length >= 2);
    const [fresh, edit] = h.hs.messages(newRoom);
    assert.equal(isEdit(fresh!), false, "a new message, not an edit of one in the old room");
    assert.equal(fresh!.content.body, "22.0");
    assert.equal(relatesTo(edit!)?.event_id, fresh!.event_id);
    assert.deepEqual(await bridge.failedJobs(), []);
  });
});

describe("live messages while delivery is behind", () => {
  let p: PrivateRoomBridge | undefined;

  after(async () => {
    await p?.bridge.stop();
    await p?.h.cleanup();
  });

  test("readings queued behind a newer one are skipped: the room gets the latest, not all", async () => {
    // The bot is not invited yet: the readings wait in the queue.
    p = await privateRoomBridge({ topic: "meter/+", live: true }, { maxAttempts: 1000 });
    const { h, room } = p;
    const meter = await mqtt.connectAsync(`mqtt://127.0.0.1:${p.port}`, { clientId: "meter" });
    for (let i = 0; i < 20; i++) await meter.publishAsync("meter/power", `${i} W`, { qos: 1 });
    p.invite();
    await waitFor("the latest reading", () =>
      [...shown(h.hs.messages(room)).values()].some((m) => m.body === "19 W"),
    );
    await new Promise((r) => setTimeout(r, 300));
    const events = h.hs.messages(room);
    assert.deepEqual(
      [...shown(events).values()].map((m) => m.body),
      ["19 W"],
    );
    assert.ok(events.length <= 3, `${events.length} events for 20 readings`);
    await meter.endAsync();
  });
});
