/**
 * The test homeserver's devices and end-to-end encryption keys, as Synapse keeps them
 * (Client-Server API v1.12 §Device management, §End-to-End Encryption, §Send-to-Device
 * messaging): each user's devices; a device's identity keys, one-time keys and fallback keys;
 * cross-signing keys and the signatures uploaded for them; and each device's to-device inbox.
 *
 * Pure state, no HTTP: test-homeserver.ts maps its endpoints onto these methods. Every change
 * another device may need to hear of (a to-device message, a device list change) takes the next
 * position of one stream, which /sync tokens count in.
 */

type Json = Record<string, unknown>;

/** A to-device message as a device receives it (Synapse's device_inbox row). */
export interface ToDeviceMessage {
  sender: string;
  type: string;
  content: Json;
}

export interface DeviceInfo {
  user_id: string;
  device_id: string;
  display_name: string | null;
  last_seen_ip: string | null;
  last_seen_ts: number | null;
}

interface FallbackKey {
  keyId: string;
  key: unknown;
  /** Canonical JSON of the key, as Synapse compares an upload with the key it has. */
  json: string;
  used: boolean;
}

interface Device {
  userId: string;
  deviceId: string;
  displayName: string | undefined;
  lastSeenTs: number;
  /** The uploaded `device_keys` object, as uploaded (signatures uploaded later kept apart). */
  keys: Json | undefined;
  /** `<algorithm>:<key id>` → key, in upload order (the oldest is claimed first). */
  oneTimeKeys: Map<string, unknown>;
  /** One per algorithm. */
  fallbackKeys: Map<string, FallbackKey>;
  inbox: { pos: number; message: ToDeviceMessage }[];
}

/** Keys are compared as Synapse's _one_time_keys_match does: equal once signatures are set aside. */
function sameKeyIgnoringSignatures(a: unknown, b: unknown): boolean {
  const strip = (v: unknown): unknown => {
    if (v === null || typeof v !== "object" || Array.isArray(v)) return v;
    const { signatures: _s, ...rest } = v as Json;
    void _s;
    return rest;
  };
  return canonicalJson(strip(a)) === canonicalJson(strip(b));
}

/** Canonical JSON (Appendices §Canonical JSON): keys sorted, no insignificant whitespace. */
export function canonicalJson(v: unknown): string {
  if (v === null || typeof v !== "object") return JSON.stringify(v);
  if (Array.isArray(v)) return `[${v.map(canonicalJson).join(",")}]`;
  const entries = Object.keys(v)
    .sort()
    .map((k) => `${JSON.stringify(k)}:${canonicalJson((v as Json)[k])}`);
  return `{${entries.join(",")}}`;
}

export type CrossSigningUsage = "master" | "self_signing" | "user_signing";

export class DeviceDirectory {
  /** Position of the stream of to-device messages and device list changes (and memberships, see noteStream). */
  private pos = 0;
  private readonly byUser = new Map<string, Map<string, Device>>();
  /** Stream position of each user's last device list change (a device added, removed, or its keys changed). */
  private readonly listChangedAt = new Map<string, number>();
  private readonly crossSigning = new Map<string, Partial<Record<CrossSigningUsage, Json>>>();
  /** Signatures uploaded for a key: `${userId}\0${keyId}` → signer → key id → signature. */
  private readonly extraSignatures = new Map<string, Record<string, Record<string, string>>>();
  private readonly listeners = new Set<() => void>();

  /** `onListChange` hears of every device list change (for the appservice's MSC3202 device lists). */
  constructor(private readonly onListChange: (userId: string) => void = () => undefined) {}

  get position(): number {
    return this.pos;
  }

  /** `fn` runs after every move of the stream (for long-polling /sync). */
  onAdvance(fn: () => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  /** Takes the next stream position for something outside this directory (a membership change). */
  noteStream(): number {
    return this.advance();
  }

  private advance(): number {
    this.pos++;
    for (const fn of [...this.listeners]) fn();
    return this.pos;
  }

  private deviceListChanged(userId: string): void {
    this.listChangedAt.set(userId, this.advance());
    this.onListChange(userId);
  }

  /** Whether the user's device list changed after stream position `since`. */
  listChangedSince(userId: string, since: number): boolean {
    return (this.listChangedAt.get(userId) ?? 0) > since;
  }

  /** Users whose device lists changed after `since`. */
  usersChangedSince(since: number): string[] {
    return [...this.listChangedAt].filter(([, at]) => at > since).map(([u]) => u);
  }

  // --- Devices (CS API §Device management) ------------------------------------------------------------------

  has(userId: string, deviceId: string): boolean {
    return this.byUser.get(userId)?.has(deviceId) ?? false;
  }

  /** Creates the device unless it exists; true when created. A new device changes its user's device list. */
  upsert(userId: string, deviceId: string, displayName?: string | null): boolean {
    let devices = this.byUser.get(userId);
    if (!devices) this.byUser.set(userId, (devices = new Map()));
    const existing = devices.get(deviceId);
    if (existing) {
      if (displayName !== undefined && displayName !== null) existing.displayName = displayName;
      return false;
    }
    devices.set(deviceId, {
      userId,
      deviceId,
      displayName: displayName ?? undefined,
      lastSeenTs: Date.now(),
      keys: undefined,
      oneTimeKeys: new Map(),
      fallbackKeys: new Map(),
      inbox: [],
    });
    this.deviceListChanged(userId);
    return true;
  }

  /** PUT /devices/{deviceId} on an existing device (Synapse: 404 for an unknown one). */
  rename(userId: string, deviceId: string, displayName: string | null | undefined): boolean {
    const d = this.byUser.get(userId)?.get(deviceId);
    if (!d) return false;
    if (displayName !== undefined) {
      d.displayName = displayName ?? undefined;
      this.deviceListChanged(userId);
    }
    return true;
  }

  /** Deletes a device with its keys and its inbox; false when it did not exist. */
  delete(userId: string, deviceId: string): boolean {
    const devices = this.byUser.get(userId);
    if (!devices?.delete(deviceId)) return false;
    this.extraSignatures.delete(`${userId}\u0000${deviceId}`);
    this.deviceListChanged(userId);
    return true;
  }

  list(userId: string): DeviceInfo[] {
    return [...(this.byUser.get(userId)?.values() ?? [])].map((d) => this.info(d));
  }

  get(userId: string, deviceId: string): DeviceInfo | undefined {
    const d = this.byUser.get(userId)?.get(deviceId);
    return d && this.info(d);
  }

  deviceIds(userId: string): string[] {
    return [...(this.byUser.get(userId)?.keys() ?? [])];
  }

  touch(userId: string, deviceId: string): void {
    const d = this.byUser.get(userId)?.get(deviceId);
    if (d) d.lastSeenTs = Date.now();
  }

  private info(d: Device): DeviceInfo {
    // Synapse's GET /devices fields; the test homeserver records no client IPs.
    return {
      user_id: d.userId,
      device_id: d.deviceId,
      display_name: d.displayName ?? null,
      last_seen_ip: null,
      last_seen_ts: d.lastSeenTs,
    };
  }

  private require(userId: string, deviceId: string): Device {
    const d = this.byUser.get(userId)?.get(deviceId);
    if (!d) throw new Error(`no device ${deviceId} of ${userId}`);
    return d;
  }

  // --- Keys (CS API §Key management API) --------------------------------------------------------------------

  /**
   * POST /keys/upload, after its shape was checked. Returns the first one-time key that clashes
   * with a different key of the same id (Synapse refuses the upload then), else undefined.
   */
  upload(
    userId: string,
    deviceId: string,
    body: { device_keys?: Json; one_time_keys?: Json; fallback_keys?: Json },
  ): string | undefined {
    const d = this.require(userId, deviceId);
    if (body.one_time_keys) {
      for (const [id, key] of Object.entries(body.one_time_keys)) {
        const had = d.oneTimeKeys.get(id);
        if (had !== undefined && !sameKeyIgnoringSignatures(had, key)) return id;
      }
    }
    if (body.device_keys) {
      const changed = d.keys === undefined || canonicalJson(d.keys) !== canonicalJson(body.device_keys);
      d.keys = body.device_keys;
      // Synapse notifies a device list change only when the keys actually changed.
      if (changed) this.deviceListChanged(userId);
    }
    if (body.one_time_keys)
      for (const [id, key] of Object.entries(body.one_time_keys))
        if (!d.oneTimeKeys.has(id)) d.oneTimeKeys.set(id, key);
    if (body.fallback_keys) {
      for (const [id, key] of Object.entries(body.fallback_keys)) {
        const colon = id.indexOf(":");
        const algorithm = id.slice(0, colon);
        const json = canonicalJson(key);
        // The same key uploaded again stays as it is, used or not (Synapse's _set_e2e_fallback_keys_txn).
        if (d.fallbackKeys.get(algorithm)?.json === json) continue;
        d.fallbackKeys.set(algorithm, { keyId: id.slice(colon + 1), key, json, used: false });
      }
    }
    return undefined;
  }

  /** One-time keys left per algorithm; `signed_curve25519` always present, as Synapse counts them. */
  oneTimeKeyCounts(userId: string, deviceId: string): Record<string, number> {
    const counts: Record<string, number> = { signed_curve25519: 0 };
    const d = this.byUser.get(userId)?.get(deviceId);
    if (d) this.countInto(d, counts);
    return counts;
  }

  /** As in appservice transactions (Synapse's count_bulk_e2e_one_time_keys_for_as): no default entry. */
  oneTimeKeyCountsForAppservice(
    userIds: Iterable<string>,
  ): Record<string, Record<string, Record<string, number>>> {
    const out: Record<string, Record<string, Record<string, number>>> = {};
    for (const userId of userIds)
      for (const d of this.byUser.get(userId)?.values() ?? [])
        this.countInto(d, ((out[userId] ??= {})[d.deviceId] = {}));
    return out;
  }

  private countInto(d: Device, counts: Record<string, number>): void {
    for (const id of d.oneTimeKeys.keys()) {
      const algorithm = id.slice(0, id.indexOf(":"));
      counts[algorithm] = (counts[algorithm] ?? 0) + 1;
    }
  }

  unusedFallbackKeyTypes(userId: string, deviceId: string): string[] {
    const d = this.byUser.get(userId)?.get(deviceId);
    return d ? [...d.fallbackKeys].filter(([, k]) => !k.used).map(([alg]) => alg) : [];
  }

  /** As in appservice transactions (Synapse's get_e2e_bulk_unused_fallback_key_types): every device listed. */
  unusedFallbackKeyTypesForAppservice(userIds: Iterable<string>): Record<string, Record<string, string[]>> {
    const out: Record<string, Record<string, string[]>> = {};
    for (const userId of userIds)
      for (const deviceId of this.deviceIds(userId))
        (out[userId] ??= {})[deviceId] = this.unusedFallbackKeyTypes(userId, deviceId);
    return out;
  }

  /**
   * POST /keys/claim for one device and algorithm: its oldest one-time key of that algorithm,
   * removed; else its fallback key, marked used (and kept). Undefined when it has neither.
   */
  claim(userId: string, deviceId: string, algorithm: string): [string, unknown] | undefined {
    const d = this.byUser.get(userId)?.get(deviceId);
    if (!d) return undefined;
    for (const [id, key] of d.oneTimeKeys) {
      if (id.slice(0, id.indexOf(":")) !== algorithm) continue;
      d.oneTimeKeys.delete(id);
      return [id, key];
    }
    const fallback = d.fallbackKeys.get(algorithm);
    if (!fallback) return undefined;
    fallback.used = true;
    return [`${algorithm}:${fallback.keyId}`, fallback.key];
  }

  /**
   * POST /keys/query for one user: the devices asked for (all when none) that uploaded keys, with
   * the signatures uploaded since and `unsigned.device_display_name` (Synapse's get_e2e_device_keys_for_cs_api).
   */
  deviceKeys(userId: string, deviceIds: readonly string[]): Record<string, Json> {
    const out: Record<string, Json> = {};
    const devices = this.byUser.get(userId);
    if (!devices) return out;
    const wanted = deviceIds.length === 0 ? [...devices.keys()] : deviceIds;
    for (const deviceId of wanted) {
      const d = devices.get(deviceId);
      if (!d?.keys) continue;
      const keys = this.withSignatures(userId, deviceId, d.keys);
      keys.unsigned = d.displayName === undefined ? {} : { device_display_name: d.displayName };
      out[deviceId] = keys;
    }
    return out;
  }

  private withSignatures(userId: string, keyId: string, object: Json): Json {
    const extra = this.extraSignatures.get(`${userId}\u0000${keyId}`);
    const copy: Json = structuredClone(object);
    if (!extra) return copy;
    const signatures = (copy.signatures ??= {}) as Record<string, Record<string, string>>;
    for (const [signer, sigs] of Object.entries(extra))
      signatures[signer] = { ...signatures[signer], ...sigs };
    return copy;
  }

  // --- Cross-signing (CS API §Cross-signing) ----------------------------------------------------------------

  crossSigningKey(userId: string, usage: CrossSigningUsage): Json | undefined {
    const key = this.crossSigning.get(userId)?.[usage];
    if (!key) return undefined;
    const id = Object.keys(isObject(key.keys) ? key.keys : {})[0];
    return id === undefined ? structuredClone(key) : this.withSignatures(userId, id, key);
  }

  /** Whether storing these keys would replace a different master key (which needs UIA from a person). */
  replacesCrossSigning(userId: string, keys: Partial<Record<CrossSigningUsage, Json>>): boolean {
    const have = this.crossSigning.get(userId);
    if (!have?.master) return false;
    return (Object.keys(keys) as CrossSigningUsage[]).some(
      (usage) => have[usage] === undefined || canonicalJson(have[usage]) !== canonicalJson(keys[usage]),
    );
  }

  setCrossSigning(userId: string, keys: Partial<Record<CrossSigningUsage, Json>>): void {
    this.crossSigning.set(userId, { ...this.crossSigning.get(userId), ...keys });
    this.deviceListChanged(userId);
  }

  /** Public key ids (`ed25519:<key>` without the prefix) of a user's cross-signing keys, by usage. */
  private crossSigningKeyIds(userId: string): Map<string, CrossSigningUsage> {
    const ids = new Map<string, CrossSigningUsage>();
    for (const [usage, key] of Object.entries(this.crossSigning.get(userId) ?? {}))
      for (const id of Object.keys(isObject(key?.keys) ? key.keys : {}))
        ids.set(id.slice(id.indexOf(":") + 1), usage as CrossSigningUsage);
    return ids;
  }

  /**
   * POST /keys/signatures/upload for one signed object: `keyId` is a device id of `userId`, or the
   * public part of one of their cross-signing keys. Keeps `signer`'s signatures; false if unknown.
   */
  addSignatures(userId: string, keyId: string, signer: string, signatures: Record<string, string>): boolean {
    const isDevice = this.has(userId, keyId);
    const usage = this.crossSigningKeyIds(userId).get(keyId);
    if (!isDevice && !usage) return false;
    const target = isDevice ? keyId : `ed25519:${keyId}`;
    const k = `${userId}\u0000${target}`;
    const extra = this.extraSignatures.get(k) ?? {};
    extra[signer] = { ...extra[signer], ...signatures };
    this.extraSignatures.set(k, extra);
    this.deviceListChanged(userId);
    return true;
  }

  // --- To-device messages (CS API §Send-to-Device messaging) ------------------------------------------------

  /** Puts a message in a device's inbox; its stream position. */
  deliver(userId: string, deviceId: string, message: ToDeviceMessage): number | undefined {
    const d = this.byUser.get(userId)?.get(deviceId);
    if (!d) return undefined;
    const pos = this.advance();
    d.inbox.push({ pos, message });
    return pos;
  }

  /**
   * A /sync's to-device messages: those after `since` (at most `limit`), once the ones up to
   * `since` are deleted, the client having seen them (Synapse deletes on the next sync). Returns
   * the position of the last message returned, or undefined when the inbox had nothing new.
   */
  inboxAfter(
    userId: string,
    deviceId: string,
    since: number,
    limit: number,
  ): { messages: ToDeviceMessage[]; upTo: number | undefined } {
    const d = this.byUser.get(userId)?.get(deviceId);
    if (!d) return { messages: [], upTo: undefined };
    d.inbox = d.inbox.filter((m) => m.pos > since);
    const batch = d.inbox.slice(0, limit);
    return { messages: batch.map((m) => m.message), upTo: batch.at(-1)?.pos };
  }

  /** Whether the device has messages after `since`. */
  hasMessagesAfter(userId: string, deviceId: string, since: number): boolean {
    return (this.byUser.get(userId)?.get(deviceId)?.inbox.at(-1)?.pos ?? 0) > since;
  }
}

function isObject(v: unknown): v is Json {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

const isString = (v: unknown): v is string => typeof v === "string";
const isStringMap = (v: unknown): boolean => isObject(v) && Object.values(v).every(isString);
const isSignatures = (v: unknown): boolean => isObject(v) && Object.values(v).every(isStringMap);

/**
 * The shape Synapse's KeyUploadRequestBody accepts (POST /keys/upload); throws `bad(reason)`
 * (400 M_BAD_JSON) for anything else. Signatures are not verified, as Synapse does not.
 */
export function validateKeyUpload(body: Json, bad: (msg: string) => Error): void {
  if ("device_keys" in body) {
    const dk = body.device_keys;
    if (!isObject(dk)) throw bad("device_keys must be an object");
    if (!Array.isArray(dk.algorithms) || !dk.algorithms.every(isString))
      throw bad("device_keys.algorithms must be a list of strings");
    if (!isString(dk.device_id) || !isString(dk.user_id))
      throw bad("device_keys.user_id and device_keys.device_id must be strings");
    if (!isStringMap(dk.keys)) throw bad("device_keys.keys must map key ids to strings");
    if (!isSignatures(dk.signatures))
      throw bad("device_keys.signatures must map users to key ids to strings");
  }
  for (const field of ["one_time_keys", "fallback_keys"] as const) {
    const keys = body[field];
    if (keys === undefined || keys === null) continue;
    if (!isObject(keys)) throw bad(`${field} must be a mapping`);
    for (const [id, key] of Object.entries(keys)) {
      if (id.split(":").length !== 2)
        throw bad(`Invalid ${field} key ${JSON.stringify(id)}. Expected "<algorithm>:<device_id>".`);
      if (isString(key)) continue;
      if (!isObject(key) || !isString(key.key) || !isSignatures(key.signatures))
        throw bad(`${field}.${id} must be a key string or a signed key object`);
      if (key.fallback !== undefined && key.fallback !== null && typeof key.fallback !== "boolean")
        throw bad(`${field}.${id}.fallback must be a boolean`);
    }
  }
}
