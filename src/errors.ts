/**
 * The three errors that carry meaning across tribridge.
 *
 * - `ConfigError` names the config path that is wrong; the CLI prints `path: message` and exits 1.
 * - `PermanentError` fails a relay job at once (it lands in the failed list with its reason).
 * - `RetryableError` backs the job off and tries again, honouring `retryAfterMs` when given. Its
 *   `cause` says whether the message can be at fault: only then does the attempt count towards
 *   `queue.maxAttempts`. `UnavailableError` is the common case that cannot: the far side is down.
 * Any other error thrown by a connector's `send` is treated as retryable (and counted), except
 * network failures (`ECONNREFUSED`, `ETIMEDOUT`, …), which mean the far side is unreachable.
 */

export class ConfigError extends Error {
  override readonly name = "ConfigError";
  constructor(
    /** Dotted path with indices, e.g. `routes[2].endpoints[0].topic`; "" for the whole file. */
    readonly path: string,
    readonly reason: string,
  ) {
    super(path ? `${path}: ${reason}` : reason);
  }
}

export class PermanentError extends Error {
  override readonly name = "PermanentError";
}

/**
 * Why a retry is needed, when the thrower knows it is not the message:
 * - "unavailable": the far side as a whole is down, unreachable, timing out or failing (5xx). The
 *   queue parks every message for that destination and probes it (see DestinationHealth).
 * - "rate-limited": the far side asked us to slow down; the message waits as long as it says.
 * Undefined: it may be the message's fault; the attempt counts towards `queue.maxAttempts`.
 */
export type RetryCause = "unavailable" | "rate-limited";

export class RetryableError extends Error {
  override readonly name: string = "RetryableError";
  constructor(
    message: string,
    /** How long the far side asked us to wait (e.g. Retry-After), if it said. */
    readonly retryAfterMs?: number,
    readonly retry: {
      cause?: RetryCause;
      /**
       * Which far side failed, when not the one the message goes to (a send to MQTT that first
       * downloads a file from the homeserver); named as DestinationHealth knows it.
       */
      destination?: string;
    } = {},
  ) {
    super(message);
  }
}

/**
 * The far side is down, unreachable, or failing as a whole: connection refused or reset, a
 * timeout, a 5xx, "not connected". Not the message's fault: it waits, however long, and is not
 * counted as an attempt.
 */
export class UnavailableError extends RetryableError {
  override readonly name = "UnavailableError";
  constructor(message: string, opts: { retryAfterMs?: number; destination?: string } = {}) {
    super(message, opts.retryAfterMs, { cause: "unavailable", destination: opts.destination });
  }
}

/** Node's codes for a peer that cannot be reached or went away (not a refusal of the message). */
const NETWORK_ERROR_CODES = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "ECONNABORTED",
  "ETIMEDOUT",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "ENETDOWN",
  "EHOSTDOWN",
  "EPIPE",
  "ENOTFOUND",
  "EAI_AGAIN",
  "UND_ERR_SOCKET",
  "UND_ERR_CONNECT_TIMEOUT",
  "UND_ERR_HEADERS_TIMEOUT",
  "UND_ERR_BODY_TIMEOUT",
  "UND_ERR_CLOSED",
]);

/** The queue's own Redis as DestinationHealth names it. */
export const REDIS = "redis";

/**
 * Redis refusing every write for now, or gone: out of disk (MISCONF), turned replica (READONLY),
 * loading its data, a cluster or failover in progress, the connection closed under a command.
 * Not the message's fault: a relay that meets it waits for Redis like for a far side that is down.
 */
function isRedisAway(err: unknown): boolean {
  if (!(err instanceof Error)) return false;
  if (err.message === "Connection is closed.") return true;
  return (
    err.name === "ReplyError" &&
    /^(MISCONF|READONLY|LOADING|MASTERDOWN|CLUSTERDOWN|TRYAGAIN)\b/.test(err.message)
  );
}

/** What the queue makes of a failed delivery (see RetryCause); "message" when it may be the message. */
export function retryCauseOf(err: unknown): RetryCause | "permanent" | "message" {
  if (err instanceof PermanentError) return "permanent";
  if (err instanceof RetryableError) return err.retry.cause ?? "message";
  if (isRedisAway(err)) return "unavailable";
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" && NETWORK_ERROR_CODES.has(code) ? "unavailable" : "message";
}

/** The far side `err` names as failed, if it names one (RetryableError's `destination`, or Redis). */
export function failedDestinationOf(err: unknown): string | undefined {
  if (err instanceof RetryableError) return err.retry.destination;
  return isRedisAway(err) ? REDIS : undefined;
}

/** Joins path segments the way error messages show them: `routes[2].endpoints[0].topic`. */
export function formatPath(segments: readonly PropertyKey[]): string {
  let out = "";
  for (const s of segments) {
    if (typeof s === "number") out += `[${s}]`;
    else out += out ? `.${String(s)}` : String(s);
  }
  return out;
}

/** How long the far side asked us to wait before retrying, if `err` says (see `backoffDelayMs`). */
export function retryAfterMsOf(err: unknown): number | undefined {
  return err instanceof RetryableError ? err.retryAfterMs : undefined;
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
