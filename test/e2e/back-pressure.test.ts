/**
 * Back-pressure end to end: while the homeserver will not take a room's messages, they wait in
 * Redis; once that backlog reaches queue.maxBacklogMb, a device's next QoS 1 publish is not
 * acknowledged until the backlog drains, and then everything arrives, in order.
 */
import { after, test } from "node:test";
import assert from "node:assert/strict";
import mqtt from "mqtt";
import { waitFor } from "../helpers/fixture.js";
import { privateRoomBridge, type PrivateRoomBridge } from "../helpers/private-room.js";

let p: PrivateRoomBridge | undefined;

after(async () => {
  await p?.bridge.stop();
  await p?.h.cleanup();
});

test("a full backlog holds a device's PUBACK until it drains; nothing is lost or reordered", async () => {
  // Retried in place for as long as the test needs: the bot is not invited yet.
  p = await privateRoomBridge({ topic: "cam/#" }, { maxBacklogMb: 1, maxAttempts: 1000 });
  const { h, room } = p;
  const device = await mqtt.connectAsync(`mqtt://127.0.0.1:${p.port}`, { clientId: "cam" });

  // 30 × 40 KB: over 1 MB waiting in Redis (a waiting batch holds up to 128 KB).
  const frame = (i: number) => `${i} ${"x".repeat(40 * 1024)}`;
  for (let i = 0; i < 30; i++) await device.publishAsync("cam/frames", frame(i), { qos: 1 });
  const log = () => h.hs.messages(room).map((m) => String(m.content.body).split(" ")[0]);
  await new Promise((r) => setTimeout(r, 1500)); // the backlog is measured every second

  let acknowledged = false;
  const held = device.publishAsync("cam/frames", frame(30), { qos: 1 }).then(() => (acknowledged = true));
  await new Promise((r) => setTimeout(r, 1500));
  assert.equal(acknowledged, false, "no PUBACK while the backlog is full");
  assert.deepEqual(log(), []);

  p.invite();
  await held;
  await waitFor("all 31 frames", () => log().length >= 31, 30_000);
  assert.deepEqual(
    log(),
    Array.from({ length: 31 }, (_, i) => String(i)),
  );
  await device.endAsync();
});
