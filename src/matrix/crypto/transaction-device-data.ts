/**
 * What an appservice transaction carries for the appservice's devices, where the homeserver
 * implements MSC2409 (to-device messages) and MSC3202 (device lists, one-time key counts, unused
 * fallback key types): Synapse with its experimental flags. Read leniently as to names (the
 * unstable prefixes changed over time) and strictly as to shapes: anything malformed is left out.
 */

/** What an appservice transaction carries for our devices. */
export interface TransactionDeviceData {
  toDevice: (Record<string, unknown> & { to_user_id?: unknown; to_device_id?: unknown })[];
  changed: string[];
  left: string[];
  oneTimeKeyCounts: Record<string, Record<string, Record<string, number>>>;
  unusedFallbackKeyTypes: Record<string, Record<string, string[]>>;
}

const isObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === "object" && v !== null && !Array.isArray(v);
const strings = (v: unknown): string[] =>
  Array.isArray(v) ? v.filter((s): s is string => typeof s === "string") : [];

function first(body: Record<string, unknown>, names: readonly string[]): unknown {
  for (const name of names) if (body[name] !== undefined) return body[name];
  return undefined;
}

/** `{user: {device: value}}`, keeping the entries whose value `valid` accepts. */
function perDevice<T>(v: unknown, valid: (x: unknown) => x is T): Record<string, Record<string, T>> {
  const out: Record<string, Record<string, T>> = {};
  if (!isObject(v)) return out;
  for (const [user, devices] of Object.entries(v)) {
    if (!isObject(devices)) continue;
    for (const [device, value] of Object.entries(devices))
      if (valid(value)) (out[user] ??= {})[device] = value;
  }
  return out;
}

const isCounts = (x: unknown): x is Record<string, number> =>
  isObject(x) && Object.values(x).every((n) => Number.isSafeInteger(n));
const isStringList = (x: unknown): x is string[] => Array.isArray(x) && x.every((s) => typeof s === "string");

/** The transaction's device data; undefined when it has none. */
export function transactionDeviceData(body: Record<string, unknown>): TransactionDeviceData | undefined {
  const toDevice = first(body, [
    "de.sorunome.msc2409.to_device",
    "org.matrix.msc2409.to_device",
    "to_device",
  ]);
  const lists = first(body, ["org.matrix.msc3202.device_lists", "device_lists"]);
  const counts = first(body, [
    "org.matrix.msc3202.device_one_time_keys_count",
    "org.matrix.msc3202.device_one_time_key_counts",
    "device_one_time_keys_count",
  ]);
  const fallback = first(body, [
    "org.matrix.msc3202.device_unused_fallback_key_types",
    "device_unused_fallback_key_types",
  ]);
  if (toDevice === undefined && lists === undefined && counts === undefined && fallback === undefined)
    return undefined;
  return {
    toDevice: Array.isArray(toDevice) ? toDevice.filter(isObject) : [],
    changed: isObject(lists) ? strings(lists.changed) : [],
    left: isObject(lists) ? strings(lists.left) : [],
    oneTimeKeyCounts: perDevice(counts, isCounts),
    unusedFallbackKeyTypes: perDevice(fallback, isStringList),
  };
}
