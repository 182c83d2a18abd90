/**
 * Deprecation warnings that libraries trigger and the user can do nothing about, kept off the
 * terminal. Imported first by src/index.ts, before anything loads those libraries.
 *
 * - DEP0060 (`util._extend`, a runtime deprecation since Node.js 22): htmlencode 0.0.4, under
 *   @vector-im/matrix-bot-sdk, calls it as it loads, so every start would print it.
 * Every other warning still goes through. (test/run.mjs gives the test files, which load the
 * Matrix libraries without this module, `--disable-warning=DEP0060` for the same reason.)
 */
export const SILENCED_DEPRECATIONS: ReadonlySet<string> = new Set(["DEP0060"]);

const emitWarning = process.emitWarning;
process.emitWarning = function (this: NodeJS.Process, warning, ...rest: unknown[]) {
  const [typeOrOptions, code] = rest;
  const warningCode =
    typeof typeOrOptions === "object" && typeOrOptions !== null
      ? (typeOrOptions as { code?: unknown }).code
      : code;
  if (typeof warningCode === "string" && SILENCED_DEPRECATIONS.has(warningCode)) return;
  return (emitWarning as (...args: unknown[]) => void).call(process, warning, ...rest);
} as typeof process.emitWarning;
