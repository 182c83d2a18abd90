import { pino, type DestinationStream, type Logger } from "pino";
import { formatLogLine, serializeError } from "./log-format.js";

export type { Logger };
/** Re-exported for bridges/, which import only src/{connector,errors,log}. */
export { LogLimiter } from "./log-limiter.js";
export { isNetworkError } from "./log-format.js";

/**
 * Where log lines go: JSON lines on stdout (services, log collectors), or, when stdout is a
 * terminal, lines a person reads (log-format.ts). TRIBRIDGE_LOG_FORMAT=json|pretty decides instead.
 * The pretty lines are written synchronously, by no worker thread (as pino-pretty would need).
 */
export function logDestination(
  env: NodeJS.ProcessEnv = process.env,
  stdout: NodeJS.WriteStream = process.stdout,
): DestinationStream | undefined {
  const format = env.TRIBRIDGE_LOG_FORMAT ?? (stdout.isTTY ? "pretty" : "json");
  if (format !== "pretty") return undefined; // pino's own stdout stream
  const color = env.NO_COLOR === undefined && stdout.isTTY && stdout.hasColors();
  return { write: (line: string) => void stdout.write(formatLogLine(line, { color })) };
}

/**
 * The root logger. Level from TRIBRIDGE_LOG_LEVEL (default "info"); JSON or readable lines on
 * stdout (logDestination). Modules take a child: `const log = rootLogger.child({ module: "mqtt" })`.
 * An `err` that is a network error is logged by its message alone (log-format.ts).
 */
export const rootLogger: Logger = pino(
  {
    level: process.env.TRIBRIDGE_LOG_LEVEL ?? "info",
    base: undefined,
    redact: { paths: ["*.password", "*.token", "*.hs_token", "*.as_token"], censor: "[secret]" },
    serializers: { err: serializeError },
  },
  logDestination(),
);

export function moduleLogger(module: string, context: Record<string, unknown> = {}): Logger {
  return rootLogger.child({ module, ...context });
}
