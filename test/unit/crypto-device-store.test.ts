/**
 * CryptoStores: wasm Olm machines kept in fake-indexeddb, snapshotted to disk and restored, across
 * processes (a child tsx process) and crashes (SIGKILL while writing).
 */
import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { pino, type Logger } from "pino";
import {
  EncryptionSettings,
  RequestType,
  RoomId,
  type OlmMachine,
  type OutgoingRequest,
} from "@matrix-org/matrix-sdk-crypto-wasm";
import { CryptoStoreLostError, CryptoStores } from "../../src/matrix/crypto/device-store.js";

const CHILD = fileURLToPath(new URL("../helpers/crypto-store-child.ts", import.meta.url));
const USER = "@ghost:example.org";
const ROOM = new RoomId("!room:example.org");

interface Encrypted {
  session_id: string;
  ciphertext: string;
}

/**
 * The Megolm message index, read from the ciphertext: version byte 0x03, then field tag 0x08 and
 * the index as a varint (Olm spec, megolm.md "Message format").
 */
function messageIndex(ciphertext: string): number {
  const bytes = Buffer.from(ciphertext, "base64");
  assert.equal(bytes[0], 0x03);
  assert.equal(bytes[1], 0x08);
  let index = 0;
  for (let i = 2, shift = 0; ; i++, shift += 7) {
    const byte = bytes[i]!;
    index |= (byte & 0x7f) << shift;
    if ((byte & 0x80) === 0) return index;
  }
}

async function encrypt(machine: OlmMachine, body: string): Promise<Encrypted> {
  return JSON.parse(
    await machine.encryptRoomEvent(ROOM, "m.room.message", JSON.stringify({ body })),
  ) as Encrypted;
}

function keysUpload(requests: OutgoingRequest[]): OutgoingRequest | undefined {
  return requests.find((r) => r.type === RequestType.KeysUpload);
}

/** Lines the store logs, to count snapshot writes. */
function recordingLogger(): { log: Logger; messages: string[] } {
  const messages: string[] = [];
  const log = pino({ level: "debug" }, { write: (line: string) => void messages.push(JSON.parse(line).msg) });
  return { log, messages };
}

/** Runs the child script; resolves with its first `lines` JSON lines, then kills it (or lets it end). */
async function child(dir: string, deviceId: string, mode: string, lines: number): Promise<unknown[]> {
  const proc = spawn(process.execPath, ["--import", "tsx", CHILD, dir, USER, deviceId, mode], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  const exited = new Promise((resolve) => proc.once("exit", resolve));
  const out: unknown[] = [];
  for await (const line of createInterface({ input: proc.stdout })) {
    out.push(JSON.parse(line));
    if (out.length === lines) break;
  }
  proc.kill("SIGKILL");
  await exited;
  assert.equal(out.length, lines, `child ${mode} ended early`);
  return out;
}

async function fakeDatabases(): Promise<string[]> {
  const all = await (
    globalThis as unknown as { indexedDB: { databases(): Promise<{ name: string }[]> } }
  ).indexedDB.databases();
  return all.map((d) => d.name);
}

describe("CryptoStores", () => {
  const root = mkdtempSync(join(tmpdir(), "tribridge-crypto-"));
  let n = 0;
  /** A fresh directory and device id per test. */
  const fresh = () => ({ dir: join(root, `t${++n}`), deviceId: `DEV${n}` });
  const snapshotFile = (dir: string) =>
    join(
      dir,
      readdirSync(dir).find((f) => f.endsWith(".olm"))!,
    );
  after(() => rmSync(root, { recursive: true, force: true }));

  test("a new process restores identity keys, device id and the pending key upload", async () => {
    const { dir, deviceId } = fresh();
    const [first] = (await child(dir, deviceId, "keys", 1)) as {
      curve25519: string;
      ed25519: string;
      uploadBody: string;
    }[];
    assert.ok(first?.uploadBody);

    const stores = new CryptoStores(dir, pino({ level: "silent" }));
    const machine = await stores.open(USER, deviceId);
    assert.equal(machine.identityKeys.curve25519.toBase64(), first.curve25519);
    assert.equal(machine.identityKeys.ed25519.toBase64(), first.ed25519);
    assert.equal(machine.deviceId.toString(), deviceId);
    assert.equal(machine.userId.toString(), USER);
    // Persisted before sending, the upload comes back with the same one-time keys: sending it
    // again after a crash is accepted by the homeserver.
    const upload = keysUpload(await machine.outgoingRequests());
    assert.ok(upload);
    assert.deepEqual(JSON.parse(upload.body).one_time_keys, JSON.parse(first.uploadBody).one_time_keys);

    await machine.markRequestAsSent(
      upload.id!,
      RequestType.KeysUpload,
      JSON.stringify({ one_time_key_counts: { signed_curve25519: 50 } }),
    );
    await stores.close(USER, deviceId);
    assert.deepEqual(await fakeDatabases(), [], "closing frees the in-memory databases");

    const reopened = await stores.open(USER, deviceId);
    assert.equal(reopened.identityKeys.curve25519.toBase64(), first.curve25519);
    assert.equal(keysUpload(await reopened.outgoingRequests()), undefined, "the upload is not made again");
    await stores.closeAll();
  });

  test("an outbound Megolm session continues after a restart, at the next message index", async () => {
    const { dir, deviceId } = fresh();
    const stores = new CryptoStores(dir, pino({ level: "silent" }));
    const machine = await stores.open(USER, deviceId);
    await machine.shareRoomKey(ROOM, [], new EncryptionSettings());
    let last: Encrypted | undefined;
    for (let i = 0; i < 3; i++) last = await encrypt(machine, `m${i}`);
    assert.equal(messageIndex(last!.ciphertext), 2);
    await stores.close(USER, deviceId);

    const reopened = await stores.open(USER, deviceId);
    const next = await encrypt(reopened, "after restart");
    assert.equal(next.session_id, last!.session_id);
    assert.equal(messageIndex(next.ciphertext), 3);
    await stores.closeAll();
  });

  test("a process killed while persisting leaves a snapshot that continues the session", async () => {
    const { dir, deviceId } = fresh();
    const printed = (await child(dir, deviceId, "encrypt", 5)) as Encrypted[];
    const lastPrinted = printed.at(-1)!;

    const stores = new CryptoStores(dir, pino({ level: "silent" }));
    const machine = await stores.open(USER, deviceId);
    const next = await encrypt(machine, "after crash");
    assert.equal(next.session_id, lastPrinted.session_id);
    // Killed after a printed persist, perhaps during or after the next one: never an index reused.
    assert.ok(messageIndex(next.ciphertext) > messageIndex(lastPrinted.ciphertext));
    assert.equal(existsSync(`${snapshotFile(dir)}.tmp`), false, "the leftover temporary file is removed");
    await stores.closeAll();
  });

  test("a partly written temporary file is ignored", async () => {
    const { dir, deviceId } = fresh();
    const stores = new CryptoStores(dir, pino({ level: "silent" }));
    const curve25519 = (await stores.open(USER, deviceId)).identityKeys.curve25519.toBase64();
    await stores.close(USER, deviceId);
    const file = snapshotFile(dir);
    writeFileSync(`${file}.tmp`, readFileSync(file).subarray(0, 100));

    const reopened = await stores.open(USER, deviceId);
    assert.equal(reopened.identityKeys.curve25519.toBase64(), curve25519);
    await stores.closeAll();
  });

  test("a corrupt, truncated or foreign snapshot is CryptoStoreLostError", async () => {
    const { dir, deviceId } = fresh();
    const stores = new CryptoStores(dir, pino({ level: "silent" }));
    await stores.open(USER, deviceId);
    await stores.close(USER, deviceId);
    await stores.open(USER, "OTHER");
    await stores.close(USER, "OTHER");
    const file = snapshotFile(dir);
    const good = readFileSync(file);
    const flipped = Buffer.from(good);
    flipped.writeUInt8(flipped.readUInt8(flipped.length - 10) ^ 0xff, flipped.length - 10);
    const otherFile = readdirSync(dir)
      .map((f) => join(dir, f))
      .find((f) => f !== file)!;

    for (const bad of [
      Buffer.alloc(0),
      good.subarray(0, good.length - 1),
      flipped,
      readFileSync(otherFile),
    ]) {
      writeFileSync(file, bad);
      await assert.rejects(stores.open(USER, deviceId), CryptoStoreLostError);
    }
    writeFileSync(file, good);
    await stores.open(USER, deviceId);
    await stores.closeAll();
  });

  test("persist calls during a write share one more write, which includes their state", async () => {
    const { dir, deviceId } = fresh();
    const { log, messages } = recordingLogger();
    const stores = new CryptoStores(dir, log);
    const machine = await stores.open(USER, deviceId);
    await machine.shareRoomKey(ROOM, [], new EncryptionSettings());
    await encrypt(machine, "one");

    const writes = () => messages.filter((m) => m === "crypto snapshot written").length;

    const first = stores.persist(USER, deviceId);
    const during = Array.from({ length: 9 }, () => stores.persist(USER, deviceId));
    await Promise.all([first, ...during]);
    assert.equal(writes(), 2);

    // Whether or not the write is still running when the second call comes, that call's state is in
    // the snapshot it waits for: restarting from it continues after "two".
    const running = stores.persist(USER, deviceId);
    const before = await encrypt(machine, "two");
    await Promise.all([running, stores.persist(USER, deviceId)]);
    const snapshot = readFileSync(snapshotFile(dir));
    await stores.close(USER, deviceId);
    writeFileSync(snapshotFile(dir), snapshot);
    const after = await encrypt(await stores.open(USER, deviceId), "three");
    assert.equal(messageIndex(after.ciphertext), messageIndex(before.ciphertext) + 1);
    await stores.closeAll();
  });

  test("forget deletes the snapshot and the databases; the device starts anew", async () => {
    const { dir, deviceId } = fresh();
    const stores = new CryptoStores(dir, pino({ level: "silent" }));
    const curve25519 = (await stores.open(USER, deviceId)).identityKeys.curve25519.toBase64();
    await stores.persist(USER, deviceId);
    await stores.forget(USER, deviceId);
    assert.deepEqual(readdirSync(dir), []);
    assert.deepEqual(await fakeDatabases(), []);
    await assert.rejects(stores.persist(USER, deviceId), /not open/);

    const anew = await stores.open(USER, deviceId);
    assert.notEqual(anew.identityKeys.curve25519.toBase64(), curve25519);
    await stores.forget(USER, deviceId);
  });
});
