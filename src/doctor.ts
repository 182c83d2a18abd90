/**
 * `tribridge doctor`: the checks `start` makes, made now and reported one by one, each failure with
 * what to do about it. Nothing stays started: the appservice port is held only while the
 * homeserver pings it, and each account only logs in and out.
 */
import { randomUUID } from "node:crypto";
import type { Redis } from "ioredis";
import type { CheckResult, ConnectorDefinition } from "./connector.js";
import { ConfigErrors, type Config } from "./config/load.js";
import { ConfigError, errorMessage } from "./errors.js";
import { localAddress } from "./http-listen.js";
import { moduleLogger } from "./log.js";
import { AppserviceServer } from "./matrix/appservice-server.js";
import { botUserId } from "./matrix/ids.js";
import { MatrixClient, PING_FIX, isTokenRefused } from "./matrix/matrix-client.js";
import {
  loadRegistration,
  locateRegistration,
  sampleRegistrationProblem,
  registrationProblem,
  type RegistrationKind,
  type Registration,
} from "./matrix/registration.js";
import { redisServerMissing } from "./queue/embedded-redis.js";
import { checkRedisSettings, redisSettingsNeeded } from "./queue/redis-check.js";
import { connectRedis } from "./store/redis-store.js";

/** How long one network check (the homeserver, Redis, one account) may take. */
const CHECK_TIMEOUT_MS = 20_000;

export type { CheckResult };

export interface DoctorOptions {
  /** Loads the config as `start` does; throws ConfigError(s). */
  readConfig(): Config;
  /** Given with -r / TRIBRIDGE_REGISTRATION; else found as `start` finds it (locateRegistration). */
  registrationFile: string | undefined;
  connectors: readonly ConnectorDefinition[];
  /** Told each result as its check ends. */
  report(result: CheckResult): void;
}

const MARKS = { ok: "✓", warn: "!", fail: "✗" } as const;
const COLORS = { ok: "\x1b[32m", warn: "\x1b[33m", fail: "\x1b[31m" } as const;

/** `✓ name: detail`, and for a warning or failure `    fix: …` on the next line. */
export function formatCheck(result: CheckResult, color = false): string {
  const mark = color ? `${COLORS[result.status]}${MARKS[result.status]}\x1b[0m` : MARKS[result.status];
  const line = `${mark} ${result.name}: ${result.detail}`;
  return result.fix && result.status !== "ok" ? `${line}\n    fix: ${result.fix}` : line;
}

const ok = (name: string, detail: string): CheckResult => ({ name, status: "ok", detail });
const fail = (name: string, detail: string, fix: string): CheckResult => ({
  name,
  status: "fail",
  detail,
  fix,
});

export async function runDoctor(o: DoctorOptions): Promise<void> {
  const { report } = o;
  let config: Config;
  try {
    config = o.readConfig();
  } catch (err) {
    const errors = err instanceof ConfigErrors ? err.errors : err instanceof ConfigError ? [err] : undefined;
    if (!errors) throw err;
    const then = "; the other checks run once the config loads";
    for (const e of errors)
      report(
        fail(
          "config",
          e.message,
          e.path === ""
            ? `give the config file with -c FILE (or $TRIBRIDGE_CONFIG)${then}`
            : `correct that key (in the config file, or the TRIBRIDGE__… variable that sets it)${then}`,
        ),
      );
    return;
  }
  const endpoints = config.routes.reduce((n, r) => n + r.endpoints.length, 0);
  report(
    ok(
      "config",
      `${config.accounts.length} account(s), ${config.routes.length} route(s), ${endpoints} endpoint(s)`,
    ),
  );

  const { file: registrationFile, kind, sample } = locateRegistration(o.registrationFile, config.dataDir);
  const registration = checkRegistration(config, o, registrationFile, kind, sample);
  const port = await holdAppservicePort(config, registration, report);
  try {
    if (
      (await homeserverAnswers(config, report)) &&
      registration &&
      (await checkLogin(config, registration, registrationFile, report))
    )
      await checkPing(config, registration, port, report);
  } finally {
    await port.server?.close();
  }
  await checkRedis(config, report);
  await checkAccounts(config, o.connectors, port.bridgeRunning, report);
}

function checkRegistration(
  config: Config,
  o: DoctorOptions,
  file: string,
  kind: RegistrationKind,
  sample: string | undefined,
): Registration | undefined {
  const fix =
    "run `tribridge generate-registration` and register the file with the homeserver (`tribridge registration-help`)";
  if (kind === "sample") {
    o.report(fail("registration", sampleRegistrationProblem(file, config.dataDir), fix));
    return undefined;
  }
  if (kind === "missing") {
    const besides = sample ? ` (${sample} is only a sample, with placeholder tokens)` : "";
    o.report(fail("registration", `no registration in ${file}${besides}`, fix));
    return undefined;
  }
  let registration: Registration;
  try {
    registration = loadRegistration(file);
  } catch (err) {
    o.report(fail("registration", errorMessage(err), fix));
    return undefined;
  }
  const mismatch = registrationProblem(registration, config, o.connectors);
  if (mismatch) {
    o.report(fail("registration", `${file} does not fit the config: ${mismatch.problem}`, mismatch.fix));
    return registration;
  }
  if (registration.url !== config.appservice.url)
    o.report({
      name: "registration",
      status: "warn",
      detail: `its url is ${String(registration.url)}, the config's appservice.url ${config.appservice.url}`,
      fix:
        "the homeserver pushes to the registration's url: if that is right, set appservice.url to it; " +
        "else correct url in registration.yaml and register it again (Synapse: restart it)",
    });
  else
    o.report(ok("registration", `${file} fits the config (id ${registration.id}, url ${registration.url})`));
  return registration;
}

interface AppservicePort {
  /** Our own listener on the appservice port, while the homeserver pings it. */
  server?: AppserviceServer;
  bridgeRunning: boolean;
}

/**
 * The appservice port: a running tribridge on it (GET /live answers as ours does), or free, and then
 * held by a listener of ours that answers the homeserver's ping (with the registration's hs_token)
 * and refuses transactions (503: the homeserver keeps them for the bridge).
 */
async function holdAppservicePort(
  config: Config,
  registration: Registration | undefined,
  report: (r: CheckResult) => void,
): Promise<AppservicePort> {
  const address = localAddress(config.appservice.bind, config.appservice.port);
  if (await answersAsTribridge(`http://${address}/live`)) {
    report(ok("appservice port", `${address}: a running tribridge answers there`));
    return { bridgeRunning: true };
  }
  const server = new AppserviceServer(
    registration?.hs_token ?? randomUUID(),
    {
      seenTransaction: async () => false,
      markTransaction: async () => undefined,
      onEvents: async () => {
        throw Object.assign(new Error("tribridge doctor does not relay: the bridge takes it later"), {
          status: 503,
        });
      },
      ignores: () => false,
      userExists: () => false,
    },
    moduleLogger("doctor"),
  );
  try {
    await server.listen(config.appservice.port, config.appservice.bind);
  } catch (err) {
    report(
      fail(
        "appservice port",
        `${errorMessage(err)}, by something that is not tribridge (no answer to GET /live)`,
        "stop what listens there, or set appservice.port (and the url in registration.yaml) to a free port",
      ),
    );
    return { bridgeRunning: false };
  }
  report(ok("appservice port", `${address} free (no tribridge running)`));
  return { server, bridgeRunning: false };
}

async function answersAsTribridge(url: string): Promise<boolean> {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(5_000) });
    return res.ok && ((await res.json()) as { status?: unknown }).status === "ok";
  } catch {
    return false;
  }
}

/** fetch's "fetch failed" says why only in its cause (connect ECONNREFUSED …, a TLS error). */
function withCause(err: unknown): string {
  const cause = (err as { cause?: unknown }).cause;
  return cause instanceof Error ? `${errorMessage(err)}: ${cause.message}` : errorMessage(err);
}

function matrixClient(config: Config, registration: Registration): MatrixClient {
  return new MatrixClient({
    homeserverUrl: config.homeserver.url,
    domain: config.homeserver.domain,
    botUserId: botUserId(registration.sender_localpart, config.homeserver.domain),
    botDisplayName: config.appservice.botDisplayName,
    registration,
    log: moduleLogger("doctor"),
  });
}

/** GET /_matrix/client/versions (Client-Server API §Server discovery): whether it answers. */
async function homeserverAnswers(config: Config, report: (r: CheckResult) => void): Promise<boolean> {
  const { url } = config.homeserver;
  try {
    const res = await fetch(new URL("_matrix/client/versions", url.endsWith("/") ? url : `${url}/`), {
      signal: AbortSignal.timeout(CHECK_TIMEOUT_MS),
    });
    if (!res.ok) throw new Error(`GET /_matrix/client/versions answered ${res.status}`);
    const { versions } = (await res.json()) as { versions?: unknown };
    const latest = Array.isArray(versions) ? versions.at(-1) : undefined;
    report(ok("homeserver", `${url} answers${typeof latest === "string" ? ` (Matrix ${latest})` : ""}`));
  } catch (err) {
    report(
      fail(
        "homeserver",
        `${url} does not answer: ${withCause(err)}`,
        "check homeserver.url: the homeserver's Client-Server API, as this machine (or container) reaches it",
      ),
    );
    return false;
  }
  return true;
}

/** The homeserver knows the as_token, as our bot: whether the ping can follow. */
async function checkLogin(
  config: Config,
  registration: Registration,
  file: string,
  report: (r: CheckResult) => void,
): Promise<boolean> {
  const bot = botUserId(registration.sender_localpart, config.homeserver.domain);
  const matrix = matrixClient(config, registration);
  try {
    const userId = await matrix.whoami();
    if (userId !== bot) {
      report(
        fail(
          "homeserver login",
          `the as_token acts as ${userId}, not ${bot}`,
          "homeserver.domain or sender_localpart does not match the registration the homeserver loaded: " +
            "correct homeserver.domain, or register this registration.yaml",
        ),
      );
      return false;
    }
    report(ok("homeserver login", `the as_token acts as ${bot}`));
    return true;
  } catch (err) {
    report(
      isTokenRefused(err)
        ? fail(
            "homeserver login",
            `the homeserver does not know this as_token (${errorMessage(err)})`,
            `register ${file} with the homeserver / restart it (Synapse reads it at start; ` +
              "`tribridge registration-help` says how); regenerated since? register the new file",
          )
        : fail("homeserver login", errorMessage(err), "see what the homeserver answered, and its log"),
    );
    return false;
  } finally {
    matrix.stop();
  }
}

/** The homeserver reaches the appservice port (Application Service API §Pinging, Matrix v1.7). */
async function checkPing(
  config: Config,
  registration: Registration,
  port: AppservicePort,
  report: (r: CheckResult) => void,
): Promise<void> {
  if (!port.server && !port.bridgeRunning) return; // the port is someone else's: said above
  const matrix = matrixClient(config, registration);
  try {
    const result = await matrix.ping();
    const to = `${String(registration.url)}${port.bridgeRunning ? " (the running tribridge)" : ""}`;
    if (result.reachable === true)
      report(ok("appservice ping", `the homeserver reaches ${to} in ${result.durationMs} ms`));
    // AS API §Pinging: M_BAD_STATUS, the appservice answered with an error. Ours (doctor's, or the
    // bridge's) refuses only a ping without the registration's hs_token.
    else if (result.reachable === false && /\bM_BAD_STATUS\b/.test(result.detail))
      report(
        fail(
          "appservice ping",
          `the homeserver reaches ${to}, but not with this registration's hs_token: ${result.detail}`,
          "the homeserver has another registration.yaml loaded: register this one again (Synapse: restart it)",
        ),
      );
    else if (result.reachable === false)
      report(fail("appservice ping", `the homeserver cannot reach ${to}: ${result.detail}`, PING_FIX));
    else
      report({
        name: "appservice ping",
        status: "warn",
        detail: `the homeserver cannot tell whether it reaches ${to} (${result.detail})`,
        fix: "a homeserver before Matrix v1.7 (Synapse 1.84) has no appservice ping: the first room message to arrive shows it",
      });
  } finally {
    matrix.stop();
  }
}

/** An external Redis without its credentials, as it may be printed. */
function redisName(url: string): string {
  return url.replace(/^(rediss?(\+cluster)?|unix):\/\//, "").replace(/^[^@/]*@/, "");
}

async function checkRedis(config: Config, report: (r: CheckResult) => void): Promise<void> {
  const { redisUrl, fsync } = config.queue;
  if (!redisUrl) {
    const missing = redisServerMissing();
    report(
      missing
        ? fail("redis", "embedded (no queue.redisUrl), but redis-server is not installed", missing)
        : ok("redis", `embedded (a private redis-server in ${config.dataDir}), started with AOF`),
    );
    return;
  }
  const name = redisName(redisUrl);
  let redis: Redis | undefined;
  // Its connection error says more than the "Connection is closed." a command fails with.
  let connectionError: Error | undefined;
  try {
    redis = connectRedis(redisUrl, "doctor", { failFast: true });
    redis.on("error", (err: Error) => (connectionError ??= err));
    await Promise.race([
      redis.ping(),
      new Promise((_, reject) =>
        setTimeout(
          () => reject(new Error(`no answer in ${CHECK_TIMEOUT_MS / 1000} s`)),
          CHECK_TIMEOUT_MS,
        ).unref(),
      ),
    ]);
    const result = await checkRedisSettings(redis, fsync);
    if (!result.checked) {
      report({
        name: "redis",
        status: "warn",
        detail: `${name} answers, but its CONFIG cannot be read (a managed Redis?)`,
        fix: redisSettingsNeeded(fsync),
      });
      return;
    }
    for (const f of result.findings)
      report({ name: "redis", status: f.level, detail: `${name}: ${f.problem}`, fix: f.fix });
    if (result.findings.every((f) => f.level !== "fail")) {
      const { appendfsync, maxmemoryPolicy } = result.settings ?? {};
      report(ok("redis", `${name}, AOF on (appendfsync ${appendfsync}), ${maxmemoryPolicy}`));
    }
  } catch (err) {
    report(
      fail(
        "redis",
        `${name} does not answer: ${errorMessage(connectionError ?? err)}`,
        "start Redis, or correct queue.redisUrl (or leave it out: tribridge then runs its own)",
      ),
    );
  } finally {
    redis?.disconnect();
  }
}

/** Each account, through its connector's `check` (see ConnectorDefinition.check). */
async function checkAccounts(
  config: Config,
  connectors: readonly ConnectorDefinition[],
  bridgeRunning: boolean,
  report: (r: CheckResult) => void,
): Promise<void> {
  for (const { connector, account, config: accountConfig } of config.accounts) {
    const def = connectors.find((c) => c.name === connector);
    if (!def?.check) continue;
    const ref = `${connector}.${account}`;
    const where = `keys under bridges.${ref}, or TRIBRIDGE__bridges__${connector}__${account}__<key>`;
    const signal = AbortSignal.timeout(CHECK_TIMEOUT_MS);
    let results: CheckResult[];
    try {
      const timedOut = new Promise<never>((_, reject) =>
        signal.addEventListener("abort", () =>
          reject(new Error(`no answer within ${CHECK_TIMEOUT_MS / 1000} s`)),
        ),
      );
      results = await Promise.race([
        def.check(account, accountConfig, {
          log: moduleLogger("doctor", { connector, account }),
          signal,
          bridgeRunning,
        }),
        timedOut,
      ]);
    } catch (err) {
      results = [
        signal.aborted
          ? fail("check", errorMessage(err), "check where the account connects to (host, port, url)")
          : fail("check", errorMessage(err), "its check failed unexpectedly (a bug: please report it)"),
      ];
    }
    for (const r of results)
      report({ ...r, name: `${ref} ${r.name}`, ...(r.fix && { fix: `${r.fix} (${where})` }) });
  }
}
