/**
 * A homeserver's refusal, typed: the HTTP status, the Matrix `errcode` and how long it asked us to
 * wait, as fields, so that code reacting to one (a 404 alias, an M_FORBIDDEN join) reads fields and
 * never the message text.
 *
 * Two classes, one per meaning the queue knows (src/errors.ts): `MatrixPermanentError` is a
 * `PermanentError`, `MatrixRetryableError` a `RetryableError`, so the queue classifies them as it
 * does any other error; `permanent` tells them apart where code handles both.
 */
import { PermanentError, RetryableError, type RetryCause } from "../errors.js";

/** The homeserver as the queue's destination health knows it (see DestinationHealth). */
export const HOMESERVER = "homeserver";

/** The body of a failed response (Client-Server API §Standard error response). */
export interface MatrixErrorBody {
  errcode?: string;
  error?: string;
  retry_after_ms?: number;
}

export interface MatrixHttpFailure {
  /** What we were doing, e.g. `PUT /_matrix/client/v3/rooms/…/send/…` or `resolving #a:b: GET …`. */
  readonly what: string;
  readonly status: number;
  /** `M_FORBIDDEN`, `M_LIMIT_EXCEEDED`, …; undefined when the answer was no Matrix error (a proxy's page). */
  readonly errcode?: string | undefined;
  /** The homeserver's own words. */
  readonly error?: string | undefined;
  /** `retry_after_ms`, or the Retry-After header: how long the homeserver asked us to wait. */
  readonly retryAfterMs?: number | undefined;
}

/** `<what>: <status> <errcode> <error>`, and why we see it as we do, if we say. */
function describe(f: MatrixHttpFailure, note: string | undefined): string {
  const detail = `${f.what}: ${f.status} ${f.errcode ?? ""} ${f.error ?? ""}`.trim();
  return note ? `${detail} (${note})` : detail;
}

/** A refusal retrying cannot change (4xx other than 408 and 429): the job fails now. */
export class MatrixPermanentError extends PermanentError implements MatrixHttpFailure {
  readonly permanent = true;
  readonly what: string;
  readonly status: number;
  readonly errcode: string | undefined;
  readonly error: string | undefined;
  readonly retryAfterMs: number | undefined;

  constructor(failure: MatrixHttpFailure, note?: string) {
    super(describe(failure, note));
    this.what = failure.what;
    this.status = failure.status;
    this.errcode = failure.errcode;
    this.error = failure.error;
    this.retryAfterMs = failure.retryAfterMs;
  }
}

/**
 * A refusal worth retrying (rate-limited, 5xx, 408), after `retryAfterMs` when the homeserver said.
 * Neither is the message's fault: a 429 waits as asked; a 5xx or 408 says the homeserver (or the
 * proxy in front of it) is failing, which parks every relay to it until a probe gets through.
 */
export class MatrixRetryableError extends RetryableError implements MatrixHttpFailure {
  readonly permanent = false;
  readonly what: string;
  readonly status: number;
  readonly errcode: string | undefined;
  readonly error: string | undefined;

  constructor(failure: MatrixHttpFailure, note?: string) {
    super(describe(failure, note), failure.retryAfterMs, {
      cause: retryCauseOf(failure),
      destination: HOMESERVER,
    });
    this.what = failure.what;
    this.status = failure.status;
    this.errcode = failure.errcode;
    this.error = failure.error;
  }
}

function retryCauseOf({ status, errcode }: MatrixHttpFailure): RetryCause | undefined {
  if (status === 429 || errcode === "M_LIMIT_EXCEEDED") return "rate-limited";
  return status >= 500 || status === 408 ? "unavailable" : undefined;
}

export type MatrixHttpError = MatrixPermanentError | MatrixRetryableError;

/** The queue's view of a refusal: rate limits, server errors and timeouts pass; the rest is for good. */
export function matrixHttpError(failure: MatrixHttpFailure): MatrixHttpError {
  const { status, errcode } = failure;
  if (status === 429 || errcode === "M_LIMIT_EXCEEDED" || status >= 500 || status === 408)
    return new MatrixRetryableError(failure);
  return new MatrixPermanentError(failure);
}

/** From a status and the response's error body. */
export function classifyMatrixError(status: number, body: MatrixErrorBody, what: string): MatrixHttpError {
  return matrixHttpError({
    what,
    status,
    errcode: body.errcode,
    error: body.error,
    retryAfterMs: body.retry_after_ms,
  });
}

/**
 * Client-Server API §Event annotations and reactions, server behaviour: a second annotation of one
 * event with the same type and key by the same sender is refused, 400 M_DUPLICATE_ANNOTATION (as
 * Synapse does once the first one's transaction id is forgotten). For a mark of the bot's: it is on.
 */
export function isDuplicateAnnotation(err: unknown): boolean {
  return err instanceof MatrixPermanentError && err.errcode === "M_DUPLICATE_ANNOTATION";
}

/** A reaction of the bot's being sent: undefined when it is on already (see isDuplicateAnnotation). */
export async function unlessOnAlready<T>(reacting: Promise<T>): Promise<T | undefined> {
  try {
    return await reacting;
  } catch (err) {
    if (isDuplicateAnnotation(err)) return undefined;
    throw err;
  }
}

export function isMatrixHttpError(err: unknown): err is MatrixHttpError {
  return err instanceof MatrixPermanentError || err instanceof MatrixRetryableError;
}

/** The same error, its message led by what we were doing (the request's path alone may not say). */
export function relabel(err: unknown, what: string): unknown {
  if (isMatrixHttpError(err)) {
    const failure = { ...fieldsOf(err), what: `${what}: ${err.what}` };
    return err.permanent ? new MatrixPermanentError(failure) : new MatrixRetryableError(failure);
  }
  if (err instanceof PermanentError) return new PermanentError(`${what}: ${err.message}`);
  if (err instanceof RetryableError)
    return new RetryableError(`${what}: ${err.message}`, err.retryAfterMs, err.retry);
  return err;
}

function fieldsOf(err: MatrixHttpError): MatrixHttpFailure {
  const { what, status, errcode, error, retryAfterMs } = err;
  return { what, status, errcode, error, retryAfterMs };
}
