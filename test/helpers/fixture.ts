/** Shared set-up for end-to-end tests: free ports, a test homeserver, a bridge config, Redis cleanup. */
import { createServer } from "node:net";
import { randomUUID } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";
import { connectors as installedConnectors } from "../../bridges/index.js";
import type { ConnectorDefinition } from "../../src/connector.js";
import { validateConfig, type Config } from "../../src/config/load.js";
import { buildRegistration, type Registration } from "../../src/matrix/registration.js";
import { TestHomeserver, type TestHomeserverOptions } from "./test-homeserver.js";

export const REDIS_URL = process.env.TRIBRIDGE_TEST_REDIS ?? "redis://127.0.0.1:6379";
export const SERVER_NAME = "test.local";

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const address = s.address();
      const port = typeof address === "object" && address ? address.port : 0;
      s.close(() => resolve(port));
    });
  });
}

export interface Harness {
  config: Config;
  rawConfig: Record<string, unknown>;
  registration: Registration;
  hs: TestHomeserver;
  prefix: string;
  alice: string;
  cleanup(): Promise<void>;
}

/**
 * A test homeserver plus a validated config whose appservice listens on a free port and whose
 * queue keys live under a fresh prefix in the shared Redis.
 */
export async function harness(raw: {
  bridges?: unknown;
  routes?: unknown;
  queue?: Record<string, unknown>;
  metrics?: Record<string, unknown>;
  /** Who may relay room messages out (default: moderators and admins). */
  permissions?: Record<string, unknown>;
  /** The connectors the config is validated against (default: the installed ones). */
  connectors?: readonly ConnectorDefinition[];
  /** Settings of the test homeserver (e.g. its upload limit, the MSCs it implements). */
  homeserver?: Pick<
    TestHomeserverOptions,
    | "maxUploadBytes"
    | "msc2409ToDevice"
    | "msc3202TransactionExtensions"
    | "msc4190"
    | "deviceMasquerading"
    | "appservicePing"
    | "presence"
  >;
  encryption?: Record<string, unknown>;
}): Promise<Harness> {
  const connectors = raw.connectors ?? installedConnectors;
  const asPort = await freePort();
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  // Its own, so that its instance id (kept there) is its own: two bridges on one dataDir are refused.
  const dataDir = tempDataDir();
  const base = {
    dataDir,
    homeserver: { url: "http://127.0.0.1:1", domain: SERVER_NAME },
    appservice: { port: asPort },
    queue: {
      redisUrl: REDIS_URL,
      prefix,
      shards: 4,
      initialRetryDelayMs: 50,
      maxRetryDelayMs: 1000,
      ...raw.queue,
    },
    bridges: raw.bridges,
    routes: raw.routes,
    ...(raw.metrics ? { metrics: raw.metrics } : {}),
    ...(raw.permissions ? { permissions: raw.permissions } : {}),
    ...(raw.encryption ? { encryption: raw.encryption } : {}),
  };
  const registration = buildRegistration(validateConfig(base, connectors), connectors);
  const hs = new TestHomeserver({
    registration,
    serverName: SERVER_NAME,
    retry: { initialDelayMs: 50, maxDelayMs: 1000 },
    ...raw.homeserver,
  });
  const { url } = await hs.start();
  const rawConfig = { ...base, homeserver: { url, domain: SERVER_NAME } };
  const config = validateConfig(rawConfig, connectors);
  const alice = hs.registerUser("alice", "Alice");
  return {
    config,
    rawConfig,
    registration,
    hs,
    prefix,
    alice,
    cleanup: async () => {
      await hs.stop();
      await deleteKeys(prefix);
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/** A fresh data directory (a bridge's `dataDir`) under the system's temporary directory. */
export function tempDataDir(): string {
  return mkdtempSync(join(tmpdir(), "tribridge-test-"));
}

export async function deleteKeys(prefix: string): Promise<void> {
  const redis = new Redis(REDIS_URL);
  try {
    let cursor = "0";
    do {
      const [next, keys] = await redis.scan(cursor, "MATCH", `${prefix}:*`, "COUNT", 1000);
      if (keys.length > 0) await redis.del(...keys);
      cursor = next;
    } while (cursor !== "0");
  } finally {
    redis.disconnect();
  }
}

/** Polls `probe` (which may be async) until it gives a truthy value. */
export async function waitFor<T>(
  what: string,
  probe: () => T | undefined | false | Promise<T | undefined | false>,
  timeoutMs = 10_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A route many e2e tests use: devices publish `lab/<device>/t` into #lab, the room commands `lab/cmd`. */
export const LAB_ROUTE = {
  id: "lab",
  room: "#lab:test.local",
  endpoints: [
    { account: "mqtt.home", direction: "in", topic: "lab/+/t" },
    { account: "mqtt.home", direction: "out", topic: "lab/cmd" },
  ],
};
