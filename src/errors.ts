/**
 * The three errors that carry meaning across tribridge.
 *
 * - `ConfigError` names the config path that is wrong; the CLI prints `path: message` and exits 1.
 * - `PermanentError` fails a relay job at once (it lands in the failed list with its reason).
 * - `RetryableError` backs the job off and tries again, honouring `retryAfterMs` when given.
 * Any other error thrown by a connector's `send` is treated as retryable.
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

export class RetryableError extends Error {
  override readonly name = "RetryableError";
  constructor(
    message: string,
    /** How long the far side asked us to wait (e.g. Retry-After), if it said. */
    readonly retryAfterMs?: number,
  ) {
    super(message);
  }
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
