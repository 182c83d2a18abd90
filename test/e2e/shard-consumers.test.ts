/**
 * A whole bridge's view of its shard consumers: GET /ready (named checks: Redis takes writes, every
 * shard has a consumer), the tribridge_queue_shards_unconsumed gauge, and instance ids: two bridges
 * on one host with one prefix have different ids and never consume a shard both; a restart keeps
 * its id and takes its leases back.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { Redis } from "ioredis";
import { connectors } from "../../bridges/index.js";
import { validateConfig } from "../../src/config/load.js";
import { start, type RunningBridge } from "../../src/app.js";
import { REDIS_URL, freePort, harness, waitFor } from "../helpers/fixture.js";
import { startRedisServer } from "../helpers/redis-server.js";

const LEASE = { leaseMs: 1_000, renewMs: 300 };

const ROUTES = [
  {
    id: "lab",
    room: "#lab:test.local",
    endpoints: [{ account: "mqtt.home", direction: "out", topic: "lab/cmd" }],
  },
];

async function ready(
  port: number,
): Promise<{ status: number; body: { status: string; checks: Record<string, string> } }> {
  const res = await fetch(`http://127.0.0.1:${port}/ready`, { signal: AbortSignal.timeout(10_000) });
  return {
    status: res.status,
    body: (await res.json()) as { status: string; checks: Record<string, string> },
  };
}

function tempDir(t: { after(fn: () => void): void }): string {
  const dir = mkdtempSync(join(tmpdir(), "tribridge-data-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test(
  "Redis away for longer than a lease: /ready says 503 naming Redis and then the shards, the gauge counts them; all well again once it is back",
  { timeout: 90_000 },
  async (t) => {
    const server = await startRedisServer(["--appendonly", "yes"]);
    t.after(() => server.stop());
    const h = await harness({
      bridges: { mqtt: { home: { embedded: { port: 0 } } } },
      routes: ROUTES,
      queue: { redisUrl: server.url },
      metrics: { enabled: true, port: await freePort() },
    });
    t.after(() => h.hs.stop());
    h.hs.createRoom({ creator: h.alice, alias: "#lab:test.local", preset: "public_chat" });
    const config = validateConfig({ ...h.rawConfig, dataDir: tempDir(t) }, connectors);
    const bridge = await start({ config, registration: h.registration, connectors, lease: LEASE });
    t.after(() => bridge.stop());
    const port = bridge.appservicePort;
    const gauge = async () => {
      const text = await (await fetch(`http://127.0.0.1:${bridge.metricsPort}/metrics`)).text();
      const line = text
        .split("\n")
        .find((l) => l.startsWith('tribridge_queue_shards_unconsumed{queue="to-matrix"} '));
      return line === undefined ? undefined : Number(line.split(" ")[1]);
    };

    await waitFor("ready", async () => (await ready(port)).status === 200, 20_000);
    assert.deepEqual((await ready(port)).body, {
      status: "ready",
      checks: { redis: "ok", homeserver: "ok", shards: "ok", destinations: "ok", connectors: "ok" },
    });
    assert.equal(await gauge(), 0);

    await server.kill();
    const down = await ready(port);
    assert.equal(down.status, 503);
    assert.match(down.body.checks.redis!, /not connected|no answer/);
    // The lease runs out, and the shards have had no consumer for longer than a lease.
    const unconsumed = await waitFor(
      "shards unconsumed",
      async () => {
        const r = await ready(port);
        return /to-matrix-0.*to-matrix-3.*to-mqtt-0.*to-mqtt-3/.test(r.body.checks.shards!) && r;
      },
      45_000,
    );
    assert.equal(unconsumed.status, 503);
    assert.match(unconsumed.body.checks.shards!, /without a consumer for longer than a lease: .*to-matrix-0/);
    assert.equal(await gauge(), 4);

    await server.restart();
    await waitFor("ready again", async () => (await ready(port)).status === 200, 20_000);
    assert.equal(await gauge(), 0);
  },
);

test(
  "the homeserver away (refusing connections, then a proxy's 502): /ready says 503 naming it, 200 again once it is back",
  { timeout: 60_000 },
  async (t) => {
    const h = await harness({ bridges: { mqtt: { home: { embedded: { port: 0 } } } }, routes: ROUTES });
    t.after(() => h.cleanup());
    h.hs.createRoom({ creator: h.alice, alias: "#lab:test.local", preset: "public_chat" });
    const bridge = await start({ config: h.config, registration: h.registration, connectors });
    t.after(() => bridge.stop());
    const port = bridge.appservicePort;
    await waitFor("ready", async () => (await ready(port)).status === 200, 20_000);

    for (const kind of ["refuse", "bad-gateway"] as const) {
      await h.hs.outage(kind);
      const down = await waitFor(
        `not ready while the homeserver is away (${kind})`,
        async () => {
          const r = await ready(port);
          return r.status === 503 && r;
        },
        20_000,
      );
      assert.match(
        down.body.checks.homeserver!,
        kind === "refuse" ? /ECONNREFUSED|unreachable|connect/i : /502/,
      );
      assert.equal(down.body.checks.redis, "ok");
      await h.hs.endOutage();
      await waitFor(
        `ready again after the ${kind} outage`,
        async () => (await ready(port)).status === 200,
        20_000,
      );
    }
  },
);

test(
  "two bridges on one host with one prefix: different ids, never both consuming a shard; a restart keeps its id",
  { timeout: 90_000 },
  async (t) => {
    const h = await harness({ bridges: { mqtt: { home: { embedded: { port: 0 } } } }, routes: ROUTES });
    t.after(() => h.cleanup());
    h.hs.createRoom({ creator: h.alice, alias: "#lab:test.local", preset: "public_chat" });
    const dirs = [tempDir(t), tempDir(t)];
    const bridges: (RunningBridge | undefined)[] = [];
    t.after(async () => {
      for (const b of bridges) await b?.stop();
    });
    const configOf = async (i: number) =>
      validateConfig(
        {
          ...h.rawConfig,
          dataDir: dirs[i],
          appservice: { ...(h.rawConfig.appservice as object), port: await freePort() },
        },
        connectors,
      );
    const idOf = (i: number) => readFileSync(join(dirs[i]!, "instance-id"), "utf8").trim();
    const redis = new Redis(REDIS_URL);
    t.after(() => void redis.disconnect());
    const leases = async () => {
      const keys = (await redis.keys(`${h.prefix}:lease:to-*`)).sort();
      return Object.fromEntries(
        await Promise.all(keys.map(async (k) => [k.slice(k.lastIndexOf(":") + 1), await redis.get(k)])),
      );
    };

    bridges[0] = await start({ config: await configOf(0), registration: h.registration, connectors });
    bridges[1] = await start({ config: await configOf(1), registration: h.registration, connectors });
    const [a, b] = [idOf(0), idOf(1)];
    assert.notEqual(a, b);
    await sleep(500);
    const first = await leases();
    assert.ok(Object.keys(first).length >= 4, JSON.stringify(first));
    assert.ok(
      Object.values(first).every((holder) => holder === a),
      `the first holds every shard: ${JSON.stringify(first)}`,
    );

    // The first stops: the second takes every shard over (it competes every renewMs).
    await bridges[0].stop();
    bridges[0] = undefined;
    await waitFor(
      "the second to take every shard",
      async () => Object.values(await leases()).every((v) => v === b),
      20_000,
    );
    // The second stops, the first restarts: same id, and the shards are its again.
    await bridges[1].stop();
    bridges[1] = undefined;
    bridges[0] = await start({ config: await configOf(0), registration: h.registration, connectors });
    assert.equal(idOf(0), a);
    await waitFor(
      "the restarted first to hold every shard",
      async () => Object.values(await leases()).every((v) => v === a),
      10_000,
    );
  },
);
