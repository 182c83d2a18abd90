/**
 * A real Synapse for end-to-end tests, from the virtualenv test/synapse/install.sh makes: started on
 * a free loopback port with SQLite in a temporary folder, no federation, rate limits off, and the
 * appservice registration the test gives. People are made with the shared-secret registration API
 * (Synapse Admin API §Shared-Secret Registration), which answers with their access token.
 *
 * Tests call `synapseSkipReason()` first: without the virtualenv they are skipped, saying why,
 * unless TRIBRIDGE_REQUIRE_SYNAPSE is set (CI), where a missing Synapse fails them loudly.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { stringify } from "yaml";
import { freePort } from "./fixture.js";

/** The virtualenv of test/synapse/install.sh (TRIBRIDGE_SYNAPSE_VENV names another). */
const VENV =
  process.env.TRIBRIDGE_SYNAPSE_VENV ??
  resolve(fileURLToPath(new URL("../../.cache/synapse-venv", import.meta.url)));
const PYTHON = join(VENV, "bin", "python");
const START_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 10_000;

/**
 * Synapse's experimental flags for appservices (synapse/config/experimental.py of 1.163). Each
 * applies only to appservices whose registration opts in. Two flags one may look for do not exist
 * there: device masquerading (`?device_id=`, MSC3202) is always on, and MSC4190 is opted into by
 * the registration alone (`io.element.msc4190: true`).
 */
export interface SynapseExperimentalFeatures {
  /** MSC2409/MSC4203: to-device messages in transactions (to appservices with receive_ephemeral). */
  msc2409_to_device_messages_enabled?: boolean;
  /** MSC3202: device lists, one-time key counts and unused fallback keys in transactions. */
  msc3202_transaction_extensions?: boolean;
}

export interface SynapseOptions {
  /** Default "synapse.test": the domain of the users (and the bridge's `homeserver.domain`). */
  serverName?: string;
  /** Appservice registrations (the YAML's fields), one file each. */
  registrations?: readonly object[];
  experimentalFeatures?: SynapseExperimentalFeatures;
  /** `presence.enabled` (default false: presence costs Synapse work that most tests do not need). */
  presence?: boolean;
}

export interface SynapseUser {
  userId: string;
  accessToken: string;
  deviceId: string;
  password: string;
}

export interface Synapse {
  /** The client API's base URL, http://127.0.0.1:<port>. */
  url: string;
  serverName: string;
  /** How long the start took, from spawning to answering /versions. */
  startMs: number;
  /** A new user, logged in on one device. */
  registerUser(localpart: string, opts?: { admin?: boolean; displayName?: string }): Promise<SynapseUser>;
  /** Where Synapse logs (INFO), kept after `stop` when TRIBRIDGE_KEEP_SYNAPSE is set. */
  logFile: string;
  /** Stops the process, keeping its folder (database, keys): `resume` starts it again on the same port. */
  pause(): Promise<void>;
  /** Starts a paused Synapse again, with the same data; resolves once it answers. */
  resume(): Promise<void>;
  stop(): Promise<void>;
}

/**
 * Why the Synapse tests cannot run here, or undefined when they can. Throws when
 * TRIBRIDGE_REQUIRE_SYNAPSE is set and Synapse is missing: CI must not pass by skipping them.
 */
export function synapseSkipReason(): string | undefined {
  if (existsSync(PYTHON)) return undefined;
  const reason = `no Synapse in ${VENV} (run test/synapse/install.sh)`;
  if (process.env.TRIBRIDGE_REQUIRE_SYNAPSE)
    throw new Error(`TRIBRIDGE_REQUIRE_SYNAPSE is set but ${reason}`);
  return reason;
}

/** Per second and burst high enough that no test meets them. */
const UNLIMITED = { per_second: 10_000, burst_count: 10_000 };

function homeserverConfig(o: {
  dir: string;
  serverName: string;
  port: number;
  sharedSecret: string;
  registrationFiles: string[];
  experimental: SynapseExperimentalFeatures;
  presence: boolean;
}): Record<string, unknown> {
  return {
    server_name: o.serverName,
    pid_file: join(o.dir, "homeserver.pid"),
    public_baseurl: `http://127.0.0.1:${o.port}/`,
    // The client API only: no federation listener, and no outbound federation either.
    listeners: [
      {
        port: o.port,
        bind_addresses: ["127.0.0.1"],
        type: "http",
        tls: false,
        x_forwarded: false,
        resources: [{ names: ["client"], compress: false }],
      },
    ],
    federation_domain_whitelist: [],
    trusted_key_servers: [],
    suppress_key_server_warning: true,
    database: { name: "sqlite3", args: { database: join(o.dir, "homeserver.db") } },
    log_config: join(o.dir, "log.yaml"),
    media_store_path: join(o.dir, "media"),
    signing_key_path: join(o.dir, "signing.key"),
    registration_shared_secret: o.sharedSecret,
    macaroon_secret_key: randomBytes(24).toString("hex"),
    form_secret: randomBytes(24).toString("hex"),
    report_stats: false,
    enable_registration: false,
    presence: { enabled: o.presence },
    url_preview_enabled: false,
    enable_metrics: false,
    app_service_config_files: o.registrationFiles,
    experimental_features: o.experimental,
    rc_message: UNLIMITED,
    rc_registration: UNLIMITED,
    rc_login: { address: UNLIMITED, account: UNLIMITED, failed_attempts: UNLIMITED },
    rc_joins: { local: UNLIMITED, remote: UNLIMITED },
    rc_joins_per_room: UNLIMITED,
    rc_invites: { per_room: UNLIMITED, per_user: UNLIMITED, per_issuer: UNLIMITED },
    rc_key_requests: UNLIMITED,
    rc_room_creation: UNLIMITED,
    rc_profile: UNLIMITED,
    rc_media_create: UNLIMITED,
    rc_delayed_event_mgmt: UNLIMITED,
    rc_admin_redaction: UNLIMITED,
  };
}

/** Python logging config: INFO into a file (for a failing test's post-mortem), errors on stderr. */
function logConfig(file: string): Record<string, unknown> {
  return {
    version: 1,
    formatters: { precise: { format: "%(asctime)s %(name)s %(levelname)s %(request)s %(message)s" } },
    filters: { context: { "()": "synapse.logging.context.LoggingContextFilter", request: "" } },
    handlers: {
      file: { class: "logging.FileHandler", filename: file, formatter: "precise", filters: ["context"] },
      stderr: { class: "logging.StreamHandler", level: "ERROR", formatter: "precise", filters: ["context"] },
    },
    loggers: { "synapse.storage.SQL": { level: "WARNING" } },
    root: { level: "INFO", handlers: ["file", "stderr"] },
    disable_existing_loggers: false,
  };
}

/** An ed25519 signing key in Synapse's file format (`ed25519 <key id> <unpadded base64 seed>`). */
function signingKey(): string {
  return `ed25519 a_${randomBytes(3).toString("hex")} ${randomBytes(32).toString("base64").replace(/=+$/, "")}\n`;
}

export async function startSynapse(opts: SynapseOptions = {}): Promise<Synapse> {
  const skip = synapseSkipReason();
  if (skip) throw new Error(skip);
  const serverName = opts.serverName ?? "synapse.test";
  const dir = mkdtempSync(join(tmpdir(), "tribridge-synapse-"));
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const sharedSecret = randomBytes(24).toString("hex");
  const registrationFiles = (opts.registrations ?? []).map((reg, i) => {
    const file = join(dir, `appservice-${i}.yaml`);
    writeFileSync(file, stringify(reg));
    return file;
  });
  const logFile = join(dir, "homeserver.log");
  writeFileSync(join(dir, "log.yaml"), stringify(logConfig(logFile)));
  writeFileSync(join(dir, "signing.key"), signingKey());
  writeFileSync(
    join(dir, "homeserver.yaml"),
    stringify(
      homeserverConfig({
        dir,
        serverName,
        port,
        sharedSecret,
        registrationFiles,
        experimental: opts.experimentalFeatures ?? {},
        presence: opts.presence ?? false,
      }),
    ),
  );

  const cleanUp = () => {
    if (process.env.TRIBRIDGE_KEEP_SYNAPSE) console.log(`Synapse's folder kept: ${dir}`);
    else rmSync(dir, { recursive: true, force: true });
  };
  const began = Date.now();
  let running: Running;
  try {
    running = await run(dir, url);
  } catch (err) {
    cleanUp();
    throw err;
  }
  const startMs = Date.now() - began;

  return {
    url,
    serverName,
    startMs,
    logFile,
    registerUser: (localpart, o = {}) => registerUser(url, sharedSecret, localpart, o),
    pause: () => running.stop(),
    resume: async () => {
      running = await run(dir, url);
    },
    stop: async () => {
      await running.stop();
      cleanUp();
    },
  };
}

interface Running {
  stop(): Promise<void>;
}

/** Runs Synapse on the config in `dir` until it answers on `url`. */
async function run(dir: string, url: string): Promise<Running> {
  const child = spawn(PYTHON, ["-m", "synapse.app.homeserver", "-c", join(dir, "homeserver.yaml")], {
    cwd: dir,
    stdio: ["ignore", "ignore", "pipe"],
    // SYNAPSE_* variables of the caller's shell must not change this config.
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: dir, LANG: "C.UTF-8" },
  });
  let stderr = "";
  child.stderr?.on("data", (d: Buffer) => (stderr = (stderr + d.toString()).slice(-8_000)));
  const exited = new Promise<void>((r) => child.once("exit", () => r()));
  try {
    await waitUntilServing(url, child);
  } catch (err) {
    await stopChild(child, exited);
    throw new Error(`Synapse did not start: ${(err as Error).message}\n${stderr}`);
  }
  return { stop: () => stopChild(child, exited) };
}

async function waitUntilServing(url: string, child: ChildProcess): Promise<void> {
  const deadline = Date.now() + START_TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null)
      throw new Error(`it exited (${child.exitCode ?? child.signalCode})`);
    try {
      const res = await fetch(`${url}/_matrix/client/versions`);
      if (res.ok) return;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`no answer on ${url} within ${START_TIMEOUT_MS} ms`);
}

async function stopChild(child: ChildProcess, exited: Promise<void>): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), STOP_TIMEOUT_MS);
  await exited;
  clearTimeout(timer);
}

/** Synapse Admin API §Shared-Secret Registration: a nonce, then the user with an HMAC of it. */
async function registerUser(
  url: string,
  sharedSecret: string,
  localpart: string,
  o: { admin?: boolean; displayName?: string },
): Promise<SynapseUser> {
  const endpoint = `${url}/_synapse/admin/v1/register`;
  const { nonce } = (await (await fetch(endpoint)).json()) as { nonce: string };
  const password = randomBytes(12).toString("hex");
  const mac = createHmac("sha1", sharedSecret)
    .update([nonce, localpart, password, o.admin ? "admin" : "notadmin"].join("\0"))
    .digest("hex");
  const res = await fetch(endpoint, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      nonce,
      username: localpart,
      password,
      admin: o.admin ?? false,
      mac,
      ...(o.displayName !== undefined ? { displayname: o.displayName } : {}),
    }),
  });
  const body = (await res.json()) as Record<string, unknown>;
  if (!res.ok) throw new Error(`registering ${localpart}: ${res.status} ${JSON.stringify(body)}`);
  return {
    userId: String(body.user_id),
    accessToken: String(body.access_token),
    deviceId: String(body.device_id),
    password,
  };
}
