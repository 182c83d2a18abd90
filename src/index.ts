#!/usr/bin/env node
/**
 * The `tribridge` command. The only module that prints to the terminal for the user and exits.
 */
import "./library-warnings.js"; // first: before anything loads the libraries it quiets
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { resolve } from "node:path";
import { parseArgs } from "node:util";
import { connectors } from "../bridges/index.js";
import { ConfigErrors, loadConfig, type Config } from "./config/load.js";
import { configJsonSchema, sampleConfigYaml } from "./config/generate.js";
import { fileAtRest } from "./config/reload.js";
import type { RunningBridge } from "./app.js";
import { ConfigError, errorMessage } from "./errors.js";
import { localAddress } from "./http-listen.js";
import { rootLogger } from "./log.js";
import {
  buildRegistration,
  locateRegistration,
  continuwuityInstructions,
  loadRegistration,
  synapseInstructions,
  sampleRegistrationProblem,
  writeRegistration,
  type Registration,
} from "./matrix/registration.js";

const USAGE = `Usage: tribridge <command> [options]

Commands:
  start                    Run the bridge (SIGHUP: read the config file again; routes and admins
                           apply at once, other changes are named as needing a restart)
  generate-registration    Write the registration with fresh random tokens (never over a sample)
  registration-help        Print how to register with continuwuity/conduwuit and Synapse
  validate-config          Check config.yaml and print every problem with its path
  ready                    Ask the running bridge whether it can do its work (GET /ready on the
                           configured appservice port); exit 0 if so (a container health check)
  doctor                   Run every start-time check (config, registration, homeserver login,
                           appservice ping, Redis settings, each account's login) and print each
                           with ✓/✗ and how to fix it; exit 1 on any ✗
  generate-config-files    Write config/config.sample.yaml and config/config.schema.json (--check: verify)
  failed-jobs              List the relays that failed for good, with their reasons
                           (--retry: put them back on their queues; --id ID: only those)

Options:
  -c, --config FILE        Config file (default: config.yaml, or $TRIBRIDGE_CONFIG)
  -r, --registration FILE  Registration file (or $TRIBRIDGE_REGISTRATION; default: registration.yaml
                           in dataDir, ./data; one in the working directory from earlier versions)
      --homeserver URL     Sets homeserver.url (quick start without a config file)
      --domain NAME        Sets homeserver.domain
      --force              generate-registration: overwrite an existing file
      --check              generate-config-files: fail if the files are stale
      --limit N            failed-jobs: at most N per queue (default 100)
      --retry              failed-jobs: requeue instead of listing
      --id ID              failed-jobs --retry: only this relay (repeatable)
  -h, --help
`;

/** `tribridge ready` gives up after this long (a health check's own timeout is longer). */
const READY_TIMEOUT_MS = 5_000;

/** How long a stop may take before the process exits anyway (under Docker's 10 s before SIGKILL). */
const STOP_DEADLINE_MS = 8_000;

const SAMPLE_PATH = "config/config.sample.yaml";
const SCHEMA_PATH = "config/config.schema.json";

interface Options {
  config: string;
  configGiven: boolean;
  /** Given with -r or TRIBRIDGE_REGISTRATION; else found by locateRegistration. */
  registration: string | undefined;
  homeserver?: string;
  domain?: string;
  force: boolean;
  check: boolean;
  limit: string | undefined;
  retry: boolean;
  ids: string[] | undefined;
}

function parseOptions(argv: string[]): { command: string | undefined; options: Options } {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      config: { type: "string", short: "c" },
      registration: { type: "string", short: "r" },
      homeserver: { type: "string" },
      domain: { type: "string" },
      force: { type: "boolean", default: false },
      check: { type: "boolean", default: false },
      limit: { type: "string" },
      retry: { type: "boolean", default: false },
      id: { type: "string", multiple: true },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  const configGiven = values.config !== undefined || process.env.TRIBRIDGE_CONFIG !== undefined;
  return {
    command: values.help ? "help" : positionals[0],
    options: {
      config: values.config ?? process.env.TRIBRIDGE_CONFIG ?? "config.yaml",
      configGiven,
      registration: values.registration ?? process.env.TRIBRIDGE_REGISTRATION,
      homeserver: values.homeserver,
      domain: values.domain,
      force: values.force ?? false,
      check: values.check ?? false,
      limit: values.limit,
      retry: values.retry ?? false,
      ids: values.id,
    },
  };
}

/** Loads config.yaml; a missing default file is fine when flags/env give the homeserver. */
function readConfig(options: Options): Config {
  return loadConfig(options.config, connectors, process.env, {
    optional: !options.configGiven,
    patch: (raw) => {
      if (!options.homeserver && !options.domain) return;
      raw.homeserver = {
        ...(raw.homeserver as Record<string, unknown> | undefined),
        ...(options.homeserver && { url: options.homeserver }),
        ...(options.domain && { domain: options.domain }),
      };
    },
  });
}

/** GET /ready of the bridge this config describes, on this machine: 0 when it answers 200. */
async function askReady(config: Config): Promise<number> {
  const url = `http://${localAddress(config.appservice.bind, config.appservice.port)}/ready`;
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(READY_TIMEOUT_MS) });
    console.log(`${res.status} ${await res.text()}`);
    return res.ok ? 0 : 1;
  } catch (err) {
    console.error(`${url}: ${errorMessage(err)}`);
    return 1;
  }
}

/** `tribridge doctor`: each check's line as it ends; 1 when any failed. */
async function doctor(options: Options): Promise<number> {
  // The findings say what matters; log lines (JSON) would only come between them.
  rootLogger.level = process.env.TRIBRIDGE_LOG_LEVEL ?? "silent";
  const { formatCheck, runDoctor } = await import("./doctor.js");
  const color = process.stdout.isTTY === true && process.env.NO_COLOR === undefined;
  let failed = 0;
  let warned = 0;
  await runDoctor({
    readConfig: () => readConfig(options),
    registrationFile: options.registration,
    connectors,
    report: (result) => {
      if (result.status === "fail") failed++;
      if (result.status === "warn") warned++;
      console.log(formatCheck(result, color));
    },
  });
  const warnings = warned > 0 ? `, ${warned} warning(s)` : "";
  console.log(failed > 0 ? `\n${failed} problem(s) to fix${warnings}` : `\nall checks passed${warnings}`);
  return failed > 0 ? 1 : 0;
}

/** Where this config's registration is (see locateRegistration). */
function registrationOf(config: Config, options: Options): ReturnType<typeof locateRegistration> {
  return locateRegistration(options.registration, config.dataDir);
}

/** Writes a registration with fresh tokens: never over a sample, over one of its own only with --force. */
function generateRegistration(config: Config, options: Options): { reg: Registration; file: string } {
  const { file, kind } = registrationOf(config, options);
  if (kind === "sample") throw new Error(sampleRegistrationProblem(file, config.dataDir));
  if (kind === "registration" && !options.force)
    throw new Error(`${file} exists; use --force to replace it (the homeserver must then be updated too)`);
  const reg = buildRegistration(config, connectors);
  writeRegistration(file, reg);
  return { reg, file };
}

function printRegistrationHelp(reg: Registration, file: string): void {
  console.log(`Registration: ${file}\n`);
  console.log("continuwuity / conduwuit — send this in the admin room:\n");
  console.log(continuwuityInstructions(reg));
  console.log("\nSynapse:\n");
  console.log(synapseInstructions(resolve(file)));
}

function generateConfigFiles(check: boolean): number {
  const files: [string, string][] = [
    [SAMPLE_PATH, sampleConfigYaml(connectors)],
    [SCHEMA_PATH, `${JSON.stringify(configJsonSchema(connectors), null, 2)}\n`],
  ];
  let stale = 0;
  for (const [path, content] of files) {
    const current = existsSync(path) ? readFileSync(path, "utf8") : "";
    if (current === content) continue;
    if (check) {
      console.error(`${path} is stale: run npm run gen:config and commit it`);
      stale++;
    } else {
      writeFileSync(path, content);
      console.log(`wrote ${path}`);
    }
  }
  return stale > 0 ? 1 : 0;
}

async function startBridge(options: Options): Promise<void> {
  const config = readConfig(options);
  let registration: Registration;
  const found = registrationOf(config, options);
  if (found.kind === "registration") registration = loadRegistration(found.file);
  else if (found.kind === "sample") throw new Error(sampleRegistrationProblem(found.file, config.dataDir));
  else {
    const { reg, file } = generateRegistration(config, options);
    registration = reg;
    const sample = found.sample
      ? ` (${found.sample} is a sample with placeholder tokens: left as it is, and not used)`
      : "";
    console.log(
      `No registration yet: generated ${file} with fresh tokens${sample}. Register it with your homeserver:\n`,
    );
    printRegistrationHelp(registration, file);
    console.log("");
  }
  const { start } = await import("./app.js");
  // Signals are handled from the start: start() may wait long for the homeserver, and what it
  // started by then (a private redis-server) must stop with it. As PID 1 in a container, a signal
  // without a handler would even be ignored.
  const stopping = new AbortController();
  let app: RunningBridge | undefined;
  let exitCode = 0;
  const stopApp = (running: RunningBridge) =>
    running.stop().then(
      () => process.exit(exitCode),
      (err: unknown) => {
        console.error(`error while stopping: ${errorMessage(err)}`);
        process.exit(1);
      },
    );
  const shutdown = (signal: string) => {
    if (stopping.signal.aborted) return;
    console.error(`${signal}: stopping`);
    stopping.abort();
    // A stop that waits on Redis (paused, or gone for good) would wait forever; a supervisor would
    // kill the process anyway (Docker after 10 s), so end first and say what did not stop.
    setTimeout(() => {
      const waiting = app ? app.notStopped().join(", ") || "unnamed parts" : "the start-up";
      console.error(
        `tribridge: not stopped within ${STOP_DEADLINE_MS / 1000} s (waiting on ${waiting}); exiting`,
      );
      process.exit(1);
    }, STOP_DEADLINE_MS);
    if (app) void stopApp(app); // else start() stops what it started, and rejects
  };
  const fatal = (err: Error) => {
    console.error(`tribridge: ${err.message}`);
    exitCode = 1;
    shutdown("fatal error");
  };
  process.on("SIGINT", () => shutdown("SIGINT"));
  process.on("SIGTERM", () => shutdown("SIGTERM"));
  // Reads the config file again (config/reload.ts); without a handler SIGHUP would end the process.
  process.on("SIGHUP", () => {
    if (!app || stopping.signal.aborted) return void console.error("SIGHUP: not running yet; not reloaded");
    app.reload().then(
      (outcome) => console.error(`SIGHUP: ${outcome.text}`),
      (err: unknown) => console.error(`SIGHUP: reload failed: ${errorMessage(err)}`),
    );
  });
  // A library's stray rejection (a command on a connection that is closing, say) must not take
  // every relay down: nothing is acknowledged before it is durable, so logging it loses nothing.
  process.on("unhandledRejection", (err) =>
    rootLogger.error({ err: errorMessage(err) }, "unhandled rejection (a bug: please report it)"),
  );
  try {
    app = await start({
      config,
      registration,
      connectors,
      signal: stopping.signal,
      onFatal: fatal,
      // Read once it is at rest: a SIGHUP may come while the file is still being written.
      reloadConfig: async () => {
        await fileAtRest(options.config);
        return readConfig(options);
      },
    });
  } catch (err) {
    if (stopping.signal.aborted) process.exit(exitCode);
    throw err;
  }
  if (stopping.signal.aborted) await stopApp(app);
}

async function main(argv: string[]): Promise<number> {
  const { command, options } = parseOptions(argv);
  switch (command) {
    case "start":
      await startBridge(options);
      return -1; // keep running
    case "generate-registration": {
      const { reg, file } = generateRegistration(readConfig(options), options);
      printRegistrationHelp(reg, file);
      return 0;
    }
    case "registration-help": {
      const config = readConfig(options);
      const { file, kind } = registrationOf(config, options);
      if (kind === "sample") throw new Error(sampleRegistrationProblem(file, config.dataDir));
      printRegistrationHelp(loadRegistration(file), file);
      return 0;
    }
    case "validate-config": {
      // What is checked is a file: the quick start's "no config.yaml" does not apply here.
      const config = readConfig({ ...options, configGiven: true });
      const endpoints = config.routes.reduce((n, r) => n + r.endpoints.length, 0);
      console.log(
        `config OK: ${config.accounts.length} account(s), ${config.routes.length} route(s), ${endpoints} endpoint(s)`,
      );
      return 0;
    }
    case "ready":
      return askReady(readConfig(options));
    case "doctor":
      return doctor(options);
    case "generate-config-files":
      return generateConfigFiles(options.check);
    case "failed-jobs": {
      const failed = await import("./queue/failed-jobs.js");
      if (options.retry) {
        const ids = options.ids && new Set(options.ids);
        const requeued = await failed.retryFailedJobs(readConfig(options), connectors, ids);
        console.log(`requeued ${requeued} failed relay(s)`);
        if (ids && requeued < ids.size) {
          console.error(`${ids.size - requeued} of the given --id are not in the failed list`);
          return 1;
        }
        return 0;
      }
      if (options.ids) throw new Error("--id goes with --retry (failed-jobs --retry --id ID)");
      const limit = Number(options.limit ?? 100);
      if (!Number.isInteger(limit) || limit < 1) throw new Error("--limit must be a positive integer");
      console.log(
        failed.formatFailedJobs(await failed.listFailedJobs(readConfig(options), connectors, limit)),
      );
      return 0;
    }
    case "help":
      console.log(USAGE);
      return 0;
    default:
      console.error(command ? `unknown command: ${command}\n` : "");
      console.error(USAGE);
      return 2;
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    if (code >= 0) process.exit(code);
  },
  (err: unknown) => {
    if (err instanceof ConfigErrors) {
      for (const e of err.errors) console.error(`config error: ${e.message}`);
    } else if (err instanceof ConfigError) {
      console.error(`config error: ${err.message}`);
    } else {
      console.error(`tribridge: ${errorMessage(err)}`);
      if (process.env.TRIBRIDGE_LOG_LEVEL === "debug" && err instanceof Error) console.error(err.stack);
    }
    process.exit(1);
  },
);
