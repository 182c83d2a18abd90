/**
 * Durable crypto stores for the wasm Olm machines: one `OlmMachine` per Matrix device (a ghost
 * user's or the bot's), each kept on disk as one snapshot file `<dir>/<hash>.olm`.
 *
 * The wasm machine persists only into IndexedDB, which in Node is fake-indexeddb, in memory. So the
 * machine writes every change into memory as it happens, and only `persist()` puts the device's
 * databases on disk: a consistent copy (one readonly transaction per database), written to a
 * temporary file, fsynced, renamed over the snapshot, and the directory fsynced. A crash at any
 * point leaves the old snapshot or the new one, never a mix.
 *
 * The crash window: everything the machine did since the last completed `persist()` is lost if the
 * process dies. The device then restarts from the older state, which is harmless only if nobody
 * outside has seen the newer one. Hence the caller's rule: persist after every call that changes
 * the machine's state (once its promise has resolved: the machine's own IndexedDB write is then
 * done), and before acting on its result:
 *  - `outgoingRequests()` creates one-time keys: persist before sending the KeysUploadRequest.
 *    Otherwise a restarted device makes new keys under the same key ids; the homeserver refuses
 *    them (the old ones are stored) and hands out keys whose private halves are gone, so the
 *    Olm messages other devices send with them cannot be decrypted. Persist again after
 *    `markRequestAsSent` (or the device uploads the same keys again, which is allowed).
 *  - `receiveSyncChanges()` (to-device events: room keys, Olm sessions): persist before
 *    acknowledging the transaction that carried them. A lost room key is not sent again.
 *  - `shareRoomKey()` and `encryptRoomEvent()` advance Olm and Megolm ratchets: persist before
 *    sending their output. Otherwise a restarted device reuses message indexes, which receivers
 *    reject as replays.
 * `persist()` calls that arrive while a write runs share one further write, so calling it after
 * each operation costs at most one write in flight and one queued.
 *
 * A snapshot that exists but cannot be read back as one (bad magic, checksum, format, or another
 * device's) throws `CryptoStoreLostError`: the device's identity is gone and the caller must move
 * to a new device id rather than reuse this one. Errors reading the file (permissions, I/O) are
 * thrown as they are: the snapshot may be fine.
 *
 * Snapshots hold the device's private keys unencrypted: files are created 0600 in a 0700 directory.
 */
import { createHash } from "node:crypto";
import { mkdir, open, readFile, rename, rm, stat } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import v8 from "node:v8";
import { DeviceId, OlmMachine, StoreHandle, UserId } from "@matrix-org/matrix-sdk-crypto-wasm";
import type { Logger } from "../../log.js";
import { deleteDatabases, readDatabases, restoreDatabases, type DatabaseSnapshot } from "./idb-snapshot.js";

/** The device's snapshot exists but is unusable: its keys are lost; use a new device id. */
export class CryptoStoreLostError extends Error {
  constructor(
    readonly userId: string,
    readonly deviceId: string,
    readonly file: string,
    reason: string,
  ) {
    super(`crypto store of ${userId} ${deviceId} is lost (${file}): ${reason}`);
    this.name = "CryptoStoreLostError";
  }
}

/** File layout: MAGIC, then the SHA-256 of the body, then the body (v8-serialized SnapshotBody). */
const MAGIC = Buffer.from("tribridge-olm-snapshot-1\n");
const HASH_BYTES = 32;

interface SnapshotBody {
  userId: string;
  deviceId: string;
  databases: DatabaseSnapshot[];
}

interface OpenDevice {
  userId: string;
  deviceId: string;
  storeName: string;
  file: string;
  machine: OlmMachine;
  closed: boolean;
  /** The write on disk now, and the one that will start after it (shared by every caller meanwhile). */
  writing: Promise<void> | undefined;
  queued: Promise<void> | undefined;
}

export class CryptoStores {
  private readonly devices = new Map<string, Promise<OpenDevice>>();
  /** Devices being closed or forgotten: opening one again waits until its last snapshot is written. */
  private readonly leaving = new Map<string, Promise<void>>();
  private directoryReady: Promise<void> | undefined;

  private readonly dir: string;

  constructor(
    dir: string,
    private readonly log: Logger,
  ) {
    this.dir = resolve(dir);
  }

  /**
   * The device's machine, restored from its snapshot if there is one (else a new account, which is
   * on disk only after the first `persist`). Opening an open device returns the same machine.
   * Throws CryptoStoreLostError when the snapshot exists but is unusable.
   */
  async open(userId: string, deviceId: string): Promise<OlmMachine> {
    const key = deviceKey(userId, deviceId);
    let opening = this.devices.get(key);
    if (!opening) {
      opening = (this.leaving.get(key) ?? Promise.resolve()).then(() => this.load(userId, deviceId));
      this.devices.set(key, opening);
      opening.catch(() => this.devices.delete(key));
    }
    return (await opening).machine;
  }

  /** Whether the device has a snapshot on disk, or is open here. */
  async has(userId: string, deviceId: string): Promise<boolean> {
    if (this.devices.has(deviceKey(userId, deviceId))) return true;
    return stat(this.names(userId, deviceId).file).then(
      () => true,
      (err: NodeJS.ErrnoException) => {
        if (err.code === "ENOENT") return false;
        throw err;
      },
    );
  }

  isLostStore(err: unknown): boolean {
    return err instanceof CryptoStoreLostError;
  }

  /** Puts the device's current state on disk; resolves once a snapshot taken after this call is there. */
  async persist(userId: string, deviceId: string): Promise<void> {
    const opening = this.devices.get(deviceKey(userId, deviceId));
    if (!opening) throw new Error(`crypto store of ${userId} ${deviceId} is not open`);
    const device = await opening;
    if (device.closed) throw new Error(`crypto store of ${userId} ${deviceId} is closed`);
    return this.persistDevice(device);
  }

  private persistDevice(device: OpenDevice): Promise<void> {
    if (device.queued) return device.queued;
    if (!device.writing) return this.startWrite(device);
    const queued = device.writing
      .catch(() => undefined)
      .then(() => {
        device.queued = undefined;
        return this.startWrite(device);
      });
    device.queued = queued;
    return queued;
  }

  /** Persists the device, then frees its machine and its in-memory databases. */
  async close(userId: string, deviceId: string): Promise<void> {
    await this.leave(userId, deviceId, async (device) => {
      if (!device) return;
      try {
        await this.persistDevice(device);
      } finally {
        device.machine.close();
        await deleteDatabases(device.storeName);
      }
    });
  }

  async closeAll(): Promise<void> {
    const open = [...this.devices.values()].map((opening) => opening.catch(() => undefined));
    const devices = (await Promise.all(open)).filter((d) => d !== undefined);
    const results = await Promise.allSettled(devices.map((d) => this.close(d.userId, d.deviceId)));
    const failed = results.filter((r) => r.status === "rejected");
    if (failed.length > 0)
      throw new AggregateError(
        failed.map((r) => r.reason),
        "closing crypto stores failed",
      );
  }

  /** Deletes the device's snapshot and databases, for a device given up. Its machine must not be used again. */
  async forget(userId: string, deviceId: string): Promise<void> {
    await this.leave(userId, deviceId, async (device) => {
      if (device) {
        // A write finishing after the deletion would bring the snapshot back.
        await Promise.allSettled([device.writing, device.queued]);
        device.machine.close();
      }
      await this.ensureDirectory();
      const { storeName, file } = this.names(userId, deviceId);
      await deleteDatabases(storeName);
      await rm(file, { force: true });
      await rm(`${file}.tmp`, { force: true });
      await syncDirectory(this.dir);
      this.log.info({ userId, deviceId }, "crypto store forgotten");
    });
  }

  /**
   * Takes the device out of the open ones (later `persist` calls fail) and runs `work` on it, alone:
   * a concurrent close, forget or open of the same device waits for it.
   */
  private async leave(
    userId: string,
    deviceId: string,
    work: (device: OpenDevice | undefined) => Promise<void>,
  ): Promise<void> {
    const key = deviceKey(userId, deviceId);
    const previous = this.leaving.get(key) ?? Promise.resolve();
    const opening = this.devices.get(key);
    this.devices.delete(key);
    const run = (async () => {
      await previous.catch(() => undefined);
      const device = opening ? await opening.catch(() => undefined) : undefined;
      if (device) device.closed = true;
      return work(device);
    })();
    const tracked = run.finally(() => {
      if (this.leaving.get(key) === tracked) this.leaving.delete(key);
    });
    this.leaving.set(key, tracked);
    return run;
  }

  private startWrite(device: OpenDevice): Promise<void> {
    const writing = this.writeSnapshot(device).finally(() => {
      device.writing = undefined;
    });
    device.writing = writing;
    return writing;
  }

  private async load(userId: string, deviceId: string): Promise<OpenDevice> {
    await this.ensureDirectory();
    const { storeName, file } = this.names(userId, deviceId);
    await rm(`${file}.tmp`, { force: true });
    const body = await this.readSnapshot(userId, deviceId, file);
    // The file is the truth: drop whatever an earlier open left in memory.
    await deleteDatabases(storeName);
    if (body) await restoreDatabases(body.databases);
    const handle = await StoreHandle.open(storeName, undefined);
    try {
      const machine = await OlmMachine.initFromStore(new UserId(userId), new DeviceId(deviceId), handle);
      this.log.debug({ userId, deviceId, restored: body !== undefined }, "crypto store opened");
      return {
        userId,
        deviceId,
        storeName,
        file,
        machine,
        closed: false,
        writing: undefined,
        queued: undefined,
      };
    } finally {
      handle.free();
    }
  }

  private async readSnapshot(
    userId: string,
    deviceId: string,
    file: string,
  ): Promise<SnapshotBody | undefined> {
    let bytes: Buffer;
    try {
      bytes = await readFile(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw err;
    }
    const lost = (reason: string) => new CryptoStoreLostError(userId, deviceId, file, reason);
    if (bytes.length < MAGIC.length + HASH_BYTES || !bytes.subarray(0, MAGIC.length).equals(MAGIC)) {
      throw lost("not a snapshot file");
    }
    const hash = bytes.subarray(MAGIC.length, MAGIC.length + HASH_BYTES);
    const content = bytes.subarray(MAGIC.length + HASH_BYTES);
    if (!createHash("sha256").update(content).digest().equals(hash)) throw lost("checksum mismatch");
    let body: SnapshotBody;
    try {
      body = v8.deserialize(content) as SnapshotBody;
    } catch (err) {
      throw lost(`undecodable: ${(err as Error).message}`);
    }
    if (body?.userId !== userId || body.deviceId !== deviceId || !Array.isArray(body.databases)) {
      throw lost("snapshot of another device");
    }
    return body;
  }

  private async writeSnapshot(device: OpenDevice): Promise<void> {
    const started = performance.now();
    const body: SnapshotBody = {
      userId: device.userId,
      deviceId: device.deviceId,
      databases: await readDatabases(device.storeName),
    };
    const content = v8.serialize(body);
    const hash = createHash("sha256").update(content).digest();
    const temporary = `${device.file}.tmp`;
    const handle = await open(temporary, "w", 0o600);
    try {
      await handle.writev([MAGIC, hash, content]);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await rename(temporary, device.file);
    await syncDirectory(this.dir);
    this.log.debug(
      {
        userId: device.userId,
        deviceId: device.deviceId,
        bytes: MAGIC.length + hash.length + content.length,
        ms: Math.round(performance.now() - started),
      },
      "crypto snapshot written",
    );
  }

  private names(userId: string, deviceId: string): { storeName: string; file: string } {
    const hash = createHash("sha256").update(deviceKey(userId, deviceId)).digest("hex").slice(0, 32);
    return { storeName: `tribridge-${hash}`, file: join(this.dir, `${hash}.olm`) };
  }

  private ensureDirectory(): Promise<void> {
    if (!this.directoryReady) {
      this.directoryReady = (async () => {
        const created = await mkdir(this.dir, { recursive: true, mode: 0o700 });
        if (created === undefined) return;
        // New directories' entries must be durable too, or a crash could lose every snapshot in them.
        for (let dir = this.dir; dir !== dirname(created); dir = dirname(dir))
          await syncDirectory(dirname(dir));
      })();
      this.directoryReady.catch(() => (this.directoryReady = undefined));
    }
    return this.directoryReady;
  }
}

function deviceKey(userId: string, deviceId: string): string {
  return `${userId}\n${deviceId}`;
}

async function syncDirectory(path: string): Promise<void> {
  const handle = await open(path, "r");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
