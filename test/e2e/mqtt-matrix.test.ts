/**
 * Whole bridge in-process against real Redis, a real embedded broker driven by mqtt.js, and the
 * test homeserver pushing real transactions.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import mqtt, { type MqttClient } from "mqtt";
import type { RunningBridge } from "../../src/app.js";
import { harness, waitFor, type Harness } from "../helpers/fixture.js";
import { startBridge } from "../helpers/start-bridge.js";
import { privateRoomBridge, type PrivateRoomBridge } from "../helpers/private-room.js";

const GHOST = (device: string) => `@_tb_mqtt_home_${device}:test.local`;

async function connect(port: number, clientId: string): Promise<MqttClient> {
  return mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
    clientId,
    protocolVersion: 4,
    reconnectPeriod: 100,
  });
}

describe("MQTT ⇄ Matrix through the embedded broker", () => {
  let h: Harness;
  let bridge: RunningBridge;
  let room: string;
  let port: number;
  const clients: MqttClient[] = [];

  before(async () => {
    h = await harness({
      bridges: { mqtt: { home: { embedded: { port: 0 } } } },
      routes: [
        {
          id: "greenhouse",
          room: "#greenhouse:test.local",
          endpoints: [
            { account: "mqtt.home", direction: "in", topic: "greenhouse/+/temperature", sender: "clientId" },
            {
              account: "mqtt.home",
              direction: "in",
              topic: "greenhouse/+/json",
              format: "json",
              template: "{{value}} °C",
            },
            { account: "mqtt.home", direction: "in", topic: "greenhouse/+/raw", format: "json" },
            { account: "mqtt.home", direction: "in", topic: "greenhouse/+/snapshot", format: "binary" },
            { account: "mqtt.home", direction: "out", topic: "greenhouse/commands" },
            { account: "mqtt.home", direction: "out", topic: "greenhouse/json-out", format: "json" },
            { account: "mqtt.home", direction: "out", topic: "greenhouse/files", format: "binary" },
            {
              account: "mqtt.home",
              direction: "inout",
              topic: "greenhouse/chat",
              sender: { name: "chat" },
              notices: true,
            },
          ],
        },
      ],
    });
    room = h.hs.createRoom({ creator: h.alice, alias: "#greenhouse:test.local", preset: "public_chat" });
    const started = await startBridge(h);
    bridge = started.bridge;
    port = started.ports.mqtt;
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.endAsync()));
    await bridge?.stop();
    await h?.cleanup();
  });

  test("on start the as_token is checked (whoami), and the homeserver pings the appservice and reaches it", async () => {
    const whoami = h.hs.requests.find((r) => r.path === "/_matrix/client/v3/account/whoami");
    assert.equal(whoami?.status, 200);
    const ping = await waitFor("the ping", () =>
      h.hs.requests.find((r) => r.path === `/_matrix/client/v1/appservice/${h.registration.id}/ping`),
    );
    assert.equal(ping.status, 200, "the homeserver reached the appservice's /_matrix/app/v1/ping");
  });

  test("QoS 1 publishes appear in the room as the device's ghost, in order, once", async () => {
    const device = await connect(port, "sensor1");
    clients.push(device);
    for (let i = 0; i < 50; i++)
      await device.publishAsync("greenhouse/sensor1/temperature", `t=${i}`, { qos: 1 });
    const messages = await h.hs.waitForMessages(room, 50);
    await new Promise((r) => setTimeout(r, 200)); // anything extra would have arrived by now
    const mine = h.hs.messages(room).filter((m) => m.sender === GHOST("sensor1"));
    assert.deepEqual(
      mine.map((m) => m.content.body),
      Array.from({ length: 50 }, (_, i) => `t=${i}`),
    );
    assert.equal(messages[0]?.content.msgtype, "m.notice");
    assert.deepEqual(messages[0]?.content["m.mentions"], {});
    assert.equal(h.hs.profile(GHOST("sensor1"))?.displayname, "sensor1");
  });

  test("wildcard routing: only topics the filter matches reach the room", async () => {
    const device = await connect(port, "sensor2");
    clients.push(device);
    const before = h.hs.messages(room).length;
    await device.publishAsync("greenhouse/sensor2/humidity", "not routed", { qos: 1 });
    await device.publishAsync("greenhouse/sensor2/temperature", "routed", { qos: 1 });
    await waitFor("routed message", () => h.hs.messages(room).some((m) => m.content.body === "routed"));
    await new Promise((r) => setTimeout(r, 200));
    const added = h.hs
      .messages(room)
      .slice(before)
      .map((m) => m.content.body);
    assert.deepEqual(added, ["routed"]);
  });

  test("a ghost kicked from the room joins again with its next message", async () => {
    const device = await connect(port, "sensor3");
    clients.push(device);
    await device.publishAsync("greenhouse/sensor3/temperature", "before the kick", { qos: 1 });
    await waitFor("joined", () => h.hs.membershipOf(room, GHOST("sensor3")) === "join");
    h.hs.sendState(room, h.alice, "m.room.member", GHOST("sensor3"), { membership: "leave" });
    await new Promise((r) => setTimeout(r, 200)); // the kick reaches the bridge
    await device.publishAsync("greenhouse/sensor3/temperature", "after the kick", { qos: 1 });
    await waitFor("after the kick", () =>
      h.hs.messages(room).some((m) => m.content.body === "after the kick" && m.sender === GHOST("sensor3")),
    );
    assert.equal(h.hs.membershipOf(room, GHOST("sensor3")), "join");
  });

  test("a text too long for one Matrix event arrives whole, as a text file", async () => {
    const device = await connect(port, "sensor4");
    clients.push(device);
    const text = "0123456789".repeat(7_000); // 70 KB: over the 65,536-byte event limit
    await device.publishAsync("greenhouse/sensor4/temperature", text, { qos: 1 });
    const file = await waitFor("the file", () =>
      h.hs.messages(room).find((m) => m.sender === GHOST("sensor4") && m.content.msgtype === "m.file"),
    );
    assert.equal(file.content.body, "greenhouse_sensor4_temperature.txt");
    assert.equal(h.hs.mediaContent(String(file.content.url))?.data.toString(), text);
    assert.deepEqual(await bridge.failedJobs(), []);
  });

  test("a device's last will, published when its connection drops, reaches the room as that device", async () => {
    const device = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
      clientId: "sensor9",
      reconnectPeriod: 0,
      will: {
        topic: "greenhouse/sensor9/temperature",
        payload: Buffer.from("offline"),
        qos: 1,
        retain: false,
      },
    });
    await device.publishAsync("greenhouse/sensor9/temperature", "online", { qos: 1 });
    await waitFor("online", () => h.hs.messages(room).some((m) => m.content.body === "online"));
    device.stream.destroy(); // no DISCONNECT: the broker must publish the will [MQTT-3.1.2-8]
    await waitFor("the will", () =>
      h.hs.messages(room).find((m) => m.content.body === "offline" && m.sender === GHOST("sensor9")),
    );
    device.end(true);
  });

  test("JSON payloads are rendered readably, with a template or as key: value", async () => {
    const device = await connect(port, "sensor3");
    clients.push(device);
    await device.publishAsync("greenhouse/sensor3/json", JSON.stringify({ value: 21.5 }), { qos: 1 });
    await device.publishAsync("greenhouse/sensor3/raw", JSON.stringify({ temperature: 20, humidity: 41 }), {
      qos: 1,
    });
    await device.publishAsync("greenhouse/sensor3/raw", "{broken", { qos: 1 });
    await waitFor("json messages", () =>
      h.hs.messages(room).some((m) => String(m.content.body).includes("broken")),
    );
    const bodies = h.hs.messages(room).map((m) => m.content.body);
    assert.ok(bodies.includes("21.5 °C"));
    assert.ok(bodies.includes("temperature: 20 · humidity: 41"));
    assert.ok(bodies.includes("(not valid JSON) {broken"));
  });

  test("binary payloads become files in the room, uploaded as the device", async () => {
    const device = await connect(port, "camera1");
    clients.push(device);
    const bytes = Buffer.from([0x00, 0xff, 0x10, 0x89, 0x50]);
    const jpeg = Buffer.from([0xff, 0xd8, 0xff, 0xe0, 0x00, 0x10, 0x4a, 0x46]);
    await device.publishAsync("greenhouse/camera1/snapshot", bytes, { qos: 1 });
    await device.publishAsync("greenhouse/camera1/snapshot", jpeg, { qos: 1 });
    const [file, image] = await waitFor("two file messages", () => {
      const files = h.hs.messages(room).filter((m) => m.sender === GHOST("camera1"));
      return files.length === 2 && files;
    });
    assert.equal(file!.content.msgtype, "m.file");
    assert.equal(file!.content.body, "greenhouse_camera1_snapshot.bin");
    assert.deepEqual(file!.content.info, { mimetype: "application/octet-stream", size: bytes.byteLength });
    const stored = h.hs.mediaContent(String(file!.content.url));
    assert.ok(stored, "uploaded to the media repository");
    assert.deepEqual(stored.data, bytes);
    // A JPEG (told by its first bytes) shows as an image.
    assert.equal(image!.content.msgtype, "m.image");
    assert.equal(image!.content.body, "greenhouse_camera1_snapshot.jpg");
    assert.deepEqual(image!.content.info, { mimetype: "image/jpeg", size: jpeg.byteLength });
  });

  test("a room message is published to the mapped topic; the bridge's own publish is not re-ingested", async () => {
    const listener = await connect(port, "listener");
    clients.push(listener);
    const received: [string, string][] = [];
    listener.on("message", (topic, payload) => received.push([topic, payload.toString()]));
    await listener.subscribeAsync(["greenhouse/commands", "greenhouse/chat", "greenhouse/json-out"], {
      qos: 1,
    });

    h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "open the window" });
    await waitFor("command on mqtt", () => received.find(([t]) => t === "greenhouse/commands"));
    assert.deepEqual(
      received.filter(([t]) => t === "greenhouse/commands"),
      [["greenhouse/commands", "open the window"]],
    );
    // format json: the sender with their display name in the room.
    const json = await waitFor("json on mqtt", () => received.find(([t]) => t === "greenhouse/json-out"));
    const parsed = JSON.parse(json[1]) as Record<string, unknown>;
    assert.equal(parsed.sender, h.alice);
    assert.equal(parsed.displayName, "Alice");
    assert.equal(parsed.body, "open the window");
    assert.equal(typeof parsed.timestamp, "number");
    // inout topic: published once, and not relayed back into the room by our own broker.
    await waitFor("chat on mqtt", () => received.find(([t]) => t === "greenhouse/chat"));
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(h.hs.messages(room).filter((m) => m.content.body === "open the window").length, 1);
    assert.equal(received.filter(([t]) => t === "greenhouse/chat").length, 1);
  });

  test("a notice (a bot's message) is published only where the endpoint asks for notices", async () => {
    const listener = await connect(port, "notice-listener");
    clients.push(listener);
    const received: [string, string][] = [];
    listener.on("message", (topic, payload) => received.push([topic, payload.toString()]));
    await listener.subscribeAsync(["greenhouse/commands", "greenhouse/chat"], { qos: 1 });
    h.hs.sendMessage(room, h.alice, { msgtype: "m.notice", body: "front door opened" });
    await waitFor("the notice on the chat topic", () => received.length > 0);
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(received, [["greenhouse/chat", "front door opened"]]);
  });

  test("a file posted in the room: its bytes to a binary topic, its name to a text topic; too large → failed list", async () => {
    const listener = await connect(port, "file-listener");
    clients.push(listener);
    const received: [string, Buffer][] = [];
    listener.on("message", (topic, payload) => received.push([topic, payload]));
    await listener.subscribeAsync(["greenhouse/files", "greenhouse/commands"], { qos: 1 });
    const upload = async (data: Buffer): Promise<string> => {
      const res = await fetch(`${h.hs.url}/_matrix/media/v3/upload?filename=leaf.png`, {
        method: "POST",
        headers: { authorization: `Bearer ${h.hs.accessTokenFor(h.alice)}`, "content-type": "image/png" },
        body: data,
      });
      return ((await res.json()) as { content_uri: string }).content_uri;
    };

    const image = Buffer.from(Array.from({ length: 5000 }, (_, i) => (i * 7) % 256));
    const mxc = await upload(image);
    h.hs.sendMessage(room, h.alice, {
      msgtype: "m.image",
      body: "leaf.png",
      url: mxc,
      info: { mimetype: "image/png", size: image.length },
    });
    const file = await waitFor("file on mqtt", () => received.find(([t]) => t === "greenhouse/files"));
    assert.ok(file[1].equals(image), "the binary topic gets the file's bytes");
    const named = await waitFor("name on mqtt", () => received.find(([t]) => t === "greenhouse/commands"));
    assert.equal(named[1].toString(), `leaf.png (${mxc})`);

    // Larger than the embedded broker's payload limit (256 KiB by default): failed, with the reason.
    const big = await upload(Buffer.alloc(300 * 1024, 1));
    h.hs.sendMessage(room, h.alice, { msgtype: "m.file", body: "big.bin", url: big });
    let reasons: string[] = [];
    for (let i = 0; i < 100 && reasons.length === 0; i++) {
      await new Promise((r) => setTimeout(r, 50));
      reasons = (await bridge.failedJobs()).map((j) => j.reason);
    }
    assert.deepEqual(reasons, [`permanent: payload of ${300 * 1024} bytes exceeds ${256 * 1024}`]);
  });

  test("loop guard: messages of our ghosts pushed back by the homeserver are not published", async () => {
    const listener = await connect(port, "listener2");
    clients.push(listener);
    const received: string[] = [];
    listener.on("message", (_t, payload) => received.push(payload.toString()));
    await listener.subscribeAsync("greenhouse/commands", { qos: 1 });
    const device = await connect(port, "sensor4");
    clients.push(device);
    await device.publishAsync("greenhouse/sensor4/temperature", "from a device", { qos: 1 });
    await waitFor("device message", () =>
      h.hs.messages(room).some((m) => m.content.body === "from a device"),
    );
    await h.hs.waitForPushIdle();
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(received, []);
  });

  test("forged transactions: no token → 401, wrong token → 403, nothing relayed", async () => {
    const listener = await connect(port, "listener3");
    clients.push(listener);
    const received: string[] = [];
    listener.on("message", (_t, payload) => received.push(payload.toString()));
    await listener.subscribeAsync("greenhouse/commands", { qos: 1 });
    const forged = {
      events: [
        {
          event_id: "$forged",
          room_id: room,
          sender: h.alice,
          type: "m.room.message",
          content: { msgtype: "m.text", body: "forged" },
          origin_server_ts: Date.now(),
        },
      ],
    };
    for (const path of ["/_matrix/app/v1/transactions/f1", "/transactions/f1"]) {
      const none = await h.hs.pushRaw(path, forged, null);
      assert.equal(none.status, 401);
      assert.equal((none.body as { errcode: string }).errcode, "M_UNAUTHORIZED");
      const wrong = await h.hs.pushRaw(path, forged, "not-the-token");
      assert.equal(wrong.status, 403);
      assert.equal((wrong.body as { errcode: string }).errcode, "M_FORBIDDEN");
      const wrongQuery = await h.hs.pushRaw(path, forged, "not-the-token", "query");
      assert.equal(wrongQuery.status, 403);
    }
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(received, []);
  });
});

describe("a private room that invites the bot after start", () => {
  let p: PrivateRoomBridge | undefined;

  after(async () => {
    await p?.bridge.stop();
    await p?.h.cleanup();
  });

  test("messages wait for the invite, then arrive in order", async () => {
    p = await privateRoomBridge({ topic: "private/#" });
    const { h, room } = p;
    assert.ok(!h.hs.members(room).includes("@tribridge:test.local"), "not joined without an invite");

    const device = await connect(p.port, "door");
    for (let i = 0; i < 5; i++) await device.publishAsync("private/door", `d${i}`, { qos: 1 });
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(h.hs.messages(room).length, 0);

    p.invite();
    const messages = await h.hs.waitForMessages(room, 5, 15_000);
    assert.deepEqual(
      messages.map((m) => m.content.body),
      ["d0", "d1", "d2", "d3", "d4"],
    );
    await device.endAsync();
  });
});
