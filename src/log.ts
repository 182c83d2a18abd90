import { pino, type Logger } from "pino";

export type { Logger };
/** Re-exported for bridges/, which import only src/{connector,errors,log}. */
export { LogLimiter } from "./log-limiter.js";

/**
 * The root logger. Level from TRIBRIDGE_LOG_LEVEL (default "info"); JSON lines on stdout.
 * Modules take a child: `const log = rootLogger.child({ module: "mqtt" })`.
 */
export const rootLogger: Logger = pino({
  level: process.env.TRIBRIDGE_LOG_LEVEL ?? "info",
  base: undefined,
  redact: { paths: ["*.password", "*.token", "*.hs_token", "*.as_token"], censor: "[secret]" },
});

export function moduleLogger(module: string, context: Record<string, unknown> = {}): Logger {
  return rootLogger.child({ module, ...context });
}
