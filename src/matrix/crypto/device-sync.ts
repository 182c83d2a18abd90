/**
 * The `/sync` feed of a device (Client-Server API §Syncing), for homeservers that do not put
 * to-device messages and device list changes into appservice transactions (continuwuity; Synapse
 * without its MSC2409/MSC3202 flags). Rooms are filtered out: their events reach us as
 * transactions. What a sync brings is handed over (and made durable) before its position is kept,
 * so a crash repeats a sync rather than losing a room key.
 */
import { setTimeout as sleep } from "node:timers/promises";
import { backoffDelayMs } from "../../backoff.js";
import { errorMessage } from "../../errors.js";
import type { Logger } from "../../log.js";
import { LogLimiter } from "../../log-limiter.js";
import type { DeviceAuth, MatrixClient } from "../matrix-client.js";
import type { DeviceChanges } from "./olm-device.js";

/** Nothing of rooms, presence or account data: to-device messages, device lists and key counts only. */
const FILTER = JSON.stringify({
  room: { rooms: [] },
  presence: { not_types: ["*"] },
  account_data: { not_types: ["*"] },
});
/** Long-poll time; below the client's 30 s request timeout. */
export const SYNC_TIMEOUT_MS = 20_000;
const RETRY = { initialDelayMs: 500, maxDelayMs: 30_000 };

interface SyncResponse {
  next_batch?: unknown;
  to_device?: { events?: unknown };
  device_lists?: { changed?: unknown; left?: unknown };
  device_one_time_keys_count?: unknown;
  device_unused_fallback_key_types?: unknown;
}

const strings = (v: unknown): string[] =>
  Array.isArray(v) ? v.filter((s): s is string => typeof s === "string") : [];

/** One `/sync` of a device; `timeoutMs` 0 answers at once (a catch-up). */
export async function syncOnce(
  matrix: Pick<MatrixClient, "requestAs">,
  device: DeviceAuth,
  since: string | undefined,
  timeoutMs: number,
  signal?: AbortSignal,
): Promise<{ next: string; changes: DeviceChanges }> {
  const query = new URLSearchParams({ filter: FILTER, timeout: String(timeoutMs) });
  if (since !== undefined) query.set("since", since);
  const res = (await matrix.requestAs(
    device,
    "GET",
    `/_matrix/client/v3/sync?${query}`,
    undefined,
    signal,
  )) as SyncResponse;
  if (typeof res.next_batch !== "string") throw new Error("a sync response without next_batch");
  const counts = res.device_one_time_keys_count;
  return {
    next: res.next_batch,
    changes: {
      toDevice: Array.isArray(res.to_device?.events) ? (res.to_device.events as unknown[]) : [],
      changed: strings(res.device_lists?.changed),
      left: strings(res.device_lists?.left),
      oneTimeKeyCounts:
        typeof counts === "object" && counts !== null ? (counts as Record<string, number>) : {},
      unusedFallbackKeyTypes: Array.isArray(res.device_unused_fallback_key_types)
        ? strings(res.device_unused_fallback_key_types)
        : undefined,
    },
  };
}

/**
 * Syncs a device until stopped: each response goes to `handle`, which resolves once it is durable;
 * then `keep(next)` stores the position. Failures are retried with back-off, one log line per reason.
 */
export async function syncLoop(o: {
  matrix: Pick<MatrixClient, "requestAs">;
  device: DeviceAuth;
  since: () => string | undefined;
  handle(changes: DeviceChanges): Promise<void>;
  keep(next: string): Promise<void>;
  signal: AbortSignal;
  log: Logger;
}): Promise<void> {
  const failures = new LogLimiter();
  let attempt = 0;
  while (!o.signal.aborted) {
    try {
      const { next, changes } = await syncOnce(o.matrix, o.device, o.since(), SYNC_TIMEOUT_MS, o.signal);
      if (o.signal.aborted) return;
      await o.handle(changes);
      await o.keep(next);
      attempt = 0;
    } catch (err) {
      if (o.signal.aborted) return;
      const delay = backoffDelayMs(RETRY, ++attempt);
      const reason = errorMessage(err);
      const gate = failures.pass(reason);
      if (gate)
        o.log.warn(
          { device: o.device.deviceId, userId: o.device.userId, err: reason, retryInMs: Math.round(delay) },
          "a device's sync failed; trying again",
        );
      await sleep(delay, undefined, { signal: o.signal }).catch(() => undefined);
    }
  }
}
