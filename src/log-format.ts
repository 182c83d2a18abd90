/**
 * How log lines look on a terminal, and how errors are shaped for any log: pino writes JSON lines
 * (what services and log collectors read); a person at a terminal reads
 * `11:50:02.114 WARN  matrix: homeserver not reachable yet err="connect ECONNREFUSED 127.0.0.1:8008"`.
 * A network error that is expected (the far side down or unreachable) is logged by its message
 * alone: its stack says nothing about the far side, and buries the line.
 */
import { stdSerializers } from "pino";

/** Error codes of a far side that is down, unreachable or gone: a state, not a bug of ours. */
const NETWORK_CODES = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "ECONNABORTED",
  "ETIMEDOUT",
  "EHOSTUNREACH",
  "EHOSTDOWN",
  "ENETUNREACH",
  "ENETDOWN",
  "ENOTFOUND",
  "EAI_AGAIN",
  "EPIPE",
  "UND_ERR_CONNECT_TIMEOUT",
  "UND_ERR_HEADERS_TIMEOUT",
  "UND_ERR_BODY_TIMEOUT",
  "UND_ERR_SOCKET",
  "UND_ERR_CLOSED",
]);

const CODE_IN_TEXT = new RegExp(`\\b(${[...NETWORK_CODES].join("|")})\\b`);

/** Whether `err` (or what caused it) is a network failure of the far side. */
export function isNetworkError(err: unknown): boolean {
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 5; e = e.cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string" && NETWORK_CODES.has(code)) return true;
    if (e instanceof AggregateError && e.errors.some(isNetworkError)) return true;
  }
  return false;
}

/**
 * pino's `err` serializer: a network error as its message (and code) only, anything else with its
 * stack as pino writes it.
 */
export function serializeError(err: unknown): unknown {
  if (!(err instanceof Error)) return err;
  if (!isNetworkError(err)) return stdSerializers.err(err);
  const code = (err as { code?: unknown }).code;
  return { type: err.name, message: err.message, ...(typeof code === "string" && { code }) };
}

/**
 * A library's log text without the stack it carries (`Error: connect ECONNREFUSED …\n    at …`),
 * when it is about a network error; other text as it is.
 */
export function withoutNetworkStack(text: string): string {
  if (!CODE_IN_TEXT.test(text)) return text;
  return text
    .split("\n")
    .filter((line) => !/^\s+at\s/.test(line))
    .join("\n")
    .trim();
}

const LEVELS: Record<number, [name: string, color: string]> = {
  10: ["TRACE", "\x1b[90m"],
  20: ["DEBUG", "\x1b[36m"],
  30: ["INFO ", "\x1b[32m"],
  40: ["WARN ", "\x1b[33m"],
  50: ["ERROR", "\x1b[31m"],
  60: ["FATAL", "\x1b[35m"],
};

/** A field's value in `key=value`: bare when it can be, else quoted as JSON (one line). */
function fieldValue(value: unknown): string {
  if (typeof value === "string") return /^[^\s"=]+$/.test(value) ? value : JSON.stringify(value);
  if (value instanceof Object) return JSON.stringify(value);
  return String(value);
}

/**
 * One JSON log line as a person reads it: time (local, to the millisecond), level, module,
 * message, then the other fields as key=value. A multi-line `stack` (an unexpected error's) follows
 * on lines of its own, indented. A line that is not a log object is passed through.
 */
export function formatLogLine(json: string, opts: { color?: boolean } = {}): string {
  let entry: Record<string, unknown>;
  try {
    entry = JSON.parse(json) as Record<string, unknown>;
  } catch {
    return json.endsWith("\n") ? json : `${json}\n`;
  }
  const { level, time, module, msg, ...fields } = entry;
  const at = new Date(typeof time === "number" ? time : Date.now());
  const pad = (n: number, w = 2) => String(n).padStart(w, "0");
  const clock = `${pad(at.getHours())}:${pad(at.getMinutes())}:${pad(at.getSeconds())}.${pad(at.getMilliseconds(), 3)}`;
  const [name, color] = LEVELS[Number(level)] ?? [String(level).toUpperCase().padEnd(5), ""];
  const shownLevel = opts.color && color ? `${color}${name}\x1b[0m` : name;
  const stacks: string[] = [];
  const parts = [clock, shownLevel, typeof module === "string" ? `${module}:` : undefined];
  if (msg !== undefined) parts.push(String(msg));
  for (const [key, value] of Object.entries(fields)) {
    // A serialized error ({type, message, stack?}) by its message; its stack, if any, below.
    const err =
      value instanceof Object ? (value as { type?: unknown; message?: unknown; stack?: unknown }) : undefined;
    if (typeof err?.type === "string" && typeof err.message === "string") {
      parts.push(`${key}=${fieldValue(err.message)}`);
      if (typeof err.stack === "string" && err.stack.includes("\n")) stacks.push(err.stack);
    } else parts.push(`${key}=${fieldValue(value)}`);
  }
  const indented = stacks.map((s) => s.replace(/^/gm, "    "));
  return `${[parts.filter((p) => p !== undefined).join(" "), ...indented].join("\n")}\n`;
}
