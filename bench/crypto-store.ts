/**
 * `npx tsx --expose-gc bench/crypto-store.ts`: what a device's crypto snapshot costs. Snapshot size,
 * persist and open (restore) times for a new device, after encrypting a few hundred events, and
 * with many rooms' Megolm sessions; and memory per open machine (heap, external, RSS).
 */
import { mkdtempSync, readdirSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { EncryptionSettings, RoomId } from "@matrix-org/matrix-sdk-crypto-wasm";
import { pino } from "pino";
import { CryptoStores } from "../src/matrix/crypto/device-store.js";

const dir = mkdtempSync(join(tmpdir(), "tribridge-crypto-bench-"));
const stores = new CryptoStores(dir, pino({ level: "silent" }));
const user = "@bench:example.org";
const gc = (globalThis as { gc?: () => void }).gc ?? (() => undefined);

async function timed(work: () => Promise<unknown>, runs: number): Promise<number> {
  const times: number[] = [];
  for (let i = 0; i < runs; i++) {
    const start = performance.now();
    await work();
    times.push(performance.now() - start);
  }
  return times.sort((a, b) => a - b)[Math.floor(runs / 2)]!;
}

function snapshotBytes(): number {
  return Math.max(...readdirSync(dir).map((f) => statSync(join(dir, f)).size));
}

async function measure(label: string, deviceId: string): Promise<void> {
  const persistMs = await timed(() => stores.persist(user, deviceId), 20);
  const bytes = snapshotBytes();
  await stores.close(user, deviceId);
  const openMs = await timed(async () => {
    await stores.open(user, deviceId);
    await stores.close(user, deviceId);
  }, 5);
  console.log(
    `${label.padEnd(34)} snapshot ${(bytes / 1024).toFixed(1).padStart(7)} KiB  persist p50 ${persistMs.toFixed(1).padStart(6)} ms  open+close p50 ${openMs.toFixed(1).padStart(6)} ms`,
  );
  rmSync(join(dir, readdirSync(dir)[0]!));
}

await stores.open(user, "NEW");
await measure("new device", "NEW");

const encrypting = await stores.open(user, "ENC");
const room = new RoomId("!room:example.org");
for (let i = 0; i < 300; i++) {
  // Before every encryption, as a client does: the session rotates after 100 messages, and
  // encrypting with an expired session panics inside the wasm.
  await encrypting.shareRoomKey(room, [], new EncryptionSettings());
  await encrypting.encryptRoomEvent(room, "m.room.message", JSON.stringify({ body: `${i}` }));
}
await measure("300 events encrypted in one room", "ENC");

const rooms = await stores.open(user, "ROOMS");
for (let i = 0; i < 200; i++) {
  const r = new RoomId(`!r${i}:example.org`);
  await rooms.shareRoomKey(r, [], new EncryptionSettings());
  await rooms.encryptRoomEvent(r, "m.room.message", JSON.stringify({ body: "x" }));
}
await measure("200 rooms with a Megolm session", "ROOMS");

const count = 200;
await stores.open(user, "WARM");
await stores.forget(user, "WARM");
gc();
const base = process.memoryUsage();
for (let i = 0; i < count; i++) {
  const machine = await stores.open(user, `MEM${i}`);
  await machine.outgoingRequests();
}
gc();
const loaded = process.memoryUsage();
const per = (key: "heapUsed" | "external" | "arrayBuffers" | "rss") =>
  ((loaded[key] - base[key]) / count / 1024).toFixed(0);
console.log(
  `memory per open machine (${count} open): heap ${per("heapUsed")} KiB, external ${per("external")} KiB (array buffers ${per("arrayBuffers")} KiB), rss ${per("rss")} KiB`,
);
await stores.closeAll();
gc();
const closed = process.memoryUsage();
console.log(
  `after closing all: heap ${((closed.heapUsed - base.heapUsed) / 1024).toFixed(0)} KiB, rss ${((closed.rss - base.rss) / 1024).toFixed(0)} KiB above the start`,
);
rmSync(dir, { recursive: true, force: true });
