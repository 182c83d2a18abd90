/**
 * Whether the bridge can do its work now, as a list of named checks (GET /ready on the appservice
 * port): each says "ok" or what is wrong. Adding a part (the homeserver, a connector) is adding a
 * check. A check that does not answer within `timeoutMs` counts as failed, so /ready answers in
 * bounded time whatever Redis does.
 */
import { errorMessage } from "./errors.js";

export interface ReadinessCheck {
  name: string;
  /** Resolves with what is wrong, or undefined when this part is fine; a rejection is what is wrong too. */
  check(): Promise<string | undefined>;
}

export interface Readiness {
  ready: boolean;
  /** Per check: "ok", or what is wrong. */
  checks: Record<string, string>;
}

const DEFAULT_TIMEOUT_MS = 2_000;

export async function readiness(
  checks: readonly ReadinessCheck[],
  timeoutMs = DEFAULT_TIMEOUT_MS,
): Promise<Readiness> {
  const results = await Promise.all(
    checks.map(async ({ name, check }) => [name, await withinTime(check(), timeoutMs)] as const),
  );
  return {
    ready: results.every(([, wrong]) => wrong === undefined),
    checks: Object.fromEntries(results.map(([name, wrong]) => [name, wrong ?? "ok"])),
  };
}

async function withinTime(work: Promise<string | undefined>, ms: number): Promise<string | undefined> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<string>((resolve) => {
    timer = setTimeout(() => resolve(`no answer within ${ms} ms`), ms);
  });
  try {
    return await Promise.race([work, late]);
  } catch (err) {
    return errorMessage(err);
  } finally {
    clearTimeout(timer);
  }
}
