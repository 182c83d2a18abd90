/**
 * Redactions and edits out to MQTT, through the embedded broker and real mqtt.js clients: a
 * redaction clears the retained value its message set (clearRetainedOnRedact), only while that
 * value is still the latest; edits are never published.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import mqtt, { type MqttClient } from "mqtt";
import type { RunningBridge } from "../../src/app.js";
import { harness, waitFor, type Harness } from "../helpers/fixture.js";
import { startBridge } from "../helpers/start-bridge.js";

interface Seen {
  topic: string;
  payload: string;
  retain: boolean;
}

describe("MQTT: redactions clear retained values; edits are not published", () => {
  let h: Harness;
  let bridge: RunningBridge;
  let room: string;
  let port: number;
  let watcher: MqttClient;
  const seen: Seen[] = [];
  const clients: MqttClient[] = [];
  let txn = 0;

  before(async () => {
    h = await harness({
      bridges: { mqtt: { home: { embedded: { port: 0 } } } },
      routes: [
        {
          id: "lab",
          room: "#lab:test.local",
          endpoints: [
            {
              account: "mqtt.home",
              direction: "out",
              topic: "lab/setpoint",
              retain: true,
              clearRetainedOnRedact: true,
            },
            { account: "mqtt.home", direction: "out", topic: "lab/log", retain: true },
            // Takes notices too (the others do not): the tests' marker, behind what is queued before it.
            { account: "mqtt.home", direction: "out", topic: "lab/notices", notices: true },
          ],
        },
      ],
    });
    room = h.hs.createRoom({ creator: h.alice, alias: "#lab:test.local", preset: "public_chat" });
    ({
      bridge,
      ports: { mqtt: port },
    } = await startBridge(h));
    watcher = await connect("watcher");
    watcher.on("message", (topic, payload, packet) =>
      seen.push({ topic, payload: payload.toString(), retain: packet.retain }),
    );
    await watcher.subscribeAsync("lab/#", { qos: 1 });
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.endAsync()));
    await bridge?.stop();
    await h?.cleanup();
  });

  async function connect(clientId: string): Promise<MqttClient> {
    const client = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
      clientId,
      protocolVersion: 4,
      reconnectPeriod: 100,
    });
    clients.push(client);
    return client;
  }

  /** Alice says `body`; resolves with its event id once the watcher saw it on both topics. */
  async function say(body: string): Promise<string> {
    const eventId = h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body });
    await waitFor(`"${body}" published`, () =>
      ["lab/setpoint", "lab/log"].every((t) => seen.some((s) => s.topic === t && s.payload === body)),
    );
    return eventId;
  }

  /** Resolves once what was queued for the room before is handled: a later notice was published. */
  async function handled(): Promise<void> {
    const body = `marker ${++txn}`;
    h.hs.sendMessage(room, h.alice, { msgtype: "m.notice", body });
    await waitFor(body, () => seen.some((s) => s.topic === "lab/notices" && s.payload === body));
  }

  async function redact(eventId: string): Promise<void> {
    const path = `/_matrix/client/v3/rooms/${encodeURIComponent(room)}/redact/${encodeURIComponent(eventId)}/r${++txn}`;
    const res = await fetch(h.hs.url + path, {
      method: "PUT",
      headers: {
        Authorization: `Bearer ${h.hs.accessTokenFor(h.alice)}`,
        "Content-Type": "application/json",
      },
      body: "{}",
    });
    assert.equal(res.status, 200);
  }

  /** What a client subscribing now is handed as `topic`'s retained value. */
  async function retainedValue(topic: string): Promise<string> {
    const reader = await connect(`reader-${++txn}`);
    const got: string[] = [];
    reader.on("message", (_t, payload) => got.push(payload.toString()));
    await reader.subscribeAsync(topic, { qos: 1 });
    return waitFor(`the retained value of ${topic}`, () => got[0]);
  }

  const cleared = (topic: string) => seen.filter((s) => s.topic === topic && s.payload === "");

  test("redacting a message that is no longer the latest retained value clears nothing", async () => {
    const first = await say("21");
    await say("22");
    await redact(first);
    await handled();
    assert.deepEqual(cleared("lab/setpoint"), []);
    assert.equal(await retainedValue("lab/setpoint"), "22");
  });

  test("redacting the message whose value is retained clears it (an empty retained publish), only where configured", async () => {
    const latest = await say("24");
    await redact(latest);
    await waitFor("the empty retained publish", () => cleared("lab/setpoint").length === 1);
    await handled();
    assert.deepEqual(cleared("lab/log"), [], "lab/log has no clearRetainedOnRedact");
    assert.equal(await retainedValue("lab/log"), "24");
    assert.deepEqual(await bridge.failedJobs(), []);
  });

  test("a value a device retained since is not cleared by redacting ours", async () => {
    const ours = await say("25");
    const device = await connect("thermostat");
    await device.publishAsync("lab/setpoint", "19 (set by hand)", { qos: 1, retain: true });
    await redact(ours);
    await handled();
    assert.equal(cleared("lab/setpoint").length, 1, "only the earlier clearing");
    assert.equal(await retainedValue("lab/setpoint"), "19 (set by hand)");
  });

  test("edits are not published: a device would run an edited command again", async () => {
    const eventId = await say("open valve");
    h.hs.sendMessage(room, h.alice, {
      msgtype: "m.text",
      body: "* close valve",
      "m.new_content": { msgtype: "m.text", body: "close valve" },
      "m.relates_to": { rel_type: "m.replace", event_id: eventId },
    });
    await handled();
    assert.deepEqual(
      seen.filter((s) => s.payload.includes("close valve")),
      [],
    );
  });
});
