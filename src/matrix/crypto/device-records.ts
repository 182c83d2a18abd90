/**
 * Which device each of our users (the bot, ghosts) encrypts with, kept in `<dataDir>/crypto/
 * devices.json` beside the devices' crypto stores: the device id (chosen before the homeserver
 * creates it, so a crash in between creates the same one again), its access token when it was
 * made by login, and the position of its own sync. The file holds tokens: readable by its owner
 * only. Written whole, to a temporary file renamed over it, one write at a time.
 */
import { randomBytes } from "node:crypto";
import { mkdirSync, readFileSync } from "node:fs";
import { open, rename } from "node:fs/promises";
import path from "node:path";

export interface DeviceRecord {
  deviceId: string;
  /** Whether the homeserver made it (the id is recorded first, so that a crash makes the same one). */
  created?: boolean;
  /** Only for devices made by `m.login.application_service` (not by MSC4190). */
  accessToken?: string;
  /** The device's `/sync` position (the sync feed). */
  since?: string;
  /** Whether its user's cross-signing identity signed it (uploaded): clients show it as its owner's. */
  crossSigned?: boolean;
  createdAt: number;
}

/** A device id of ours: recognisable in a device list, and new each time. */
export function newDeviceId(): string {
  return `TRB${randomBytes(6)
    .toString("base64url")
    .toUpperCase()
    .replace(/[^A-Z0-9]/g, "X")}`;
}

export class DeviceRecords {
  private readonly file: string;
  private readonly records: Map<string, DeviceRecord>;
  private writing: Promise<void> = Promise.resolve();

  constructor(dir: string) {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    this.file = path.join(dir, "devices.json");
    this.records = new Map(Object.entries(readRecords(this.file)));
  }

  get(userId: string): DeviceRecord | undefined {
    return this.records.get(userId);
  }

  /** Changes fields of a user's existing record; resolves once it is on disk. */
  update(userId: string, fields: Partial<DeviceRecord>): Promise<void> {
    return this.set(userId, { ...this.records.get(userId)!, ...fields });
  }

  /** Sets a user's record; resolves once it is on disk. */
  set(userId: string, record: DeviceRecord): Promise<void> {
    this.records.set(userId, record);
    const write = this.writing.then(() => this.write());
    this.writing = write.catch(() => undefined);
    return write;
  }

  private async write(): Promise<void> {
    const tmp = `${this.file}.tmp`;
    const handle = await open(tmp, "w", 0o600);
    try {
      await handle.writeFile(JSON.stringify({ version: 1, devices: Object.fromEntries(this.records) }));
      await handle.sync();
    } finally {
      await handle.close();
    }
    await rename(tmp, this.file);
  }
}

function readRecords(file: string): Record<string, DeviceRecord> {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return {};
    throw err;
  }
  const parsed = JSON.parse(text) as { version?: unknown; devices?: unknown };
  if (parsed.version !== 1 || typeof parsed.devices !== "object" || parsed.devices === null)
    throw new Error(`${file}: not a device list tribridge wrote`);
  return parsed.devices as Record<string, DeviceRecord>;
}
