/**
 * The embedded default (no queue.redisUrl): a bridge killed with SIGKILL leaves its redis-server
 * running. The next start adopts it instead of starting a second server on the same files, nothing
 * is lost, and a clean stop shuts it down. Two bridges on one dataDir are refused.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import mqtt from "mqtt";
import { stringify } from "yaml";
import { embeddedRedisSocket } from "../../src/queue/embedded-redis.js";
import { BridgeProcess } from "../helpers/bridge-process.js";
import { answersOn, redisPidsOn } from "../helpers/embedded-redis.js";
import { freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";

let h: Harness;
let dataDir: string;
let bridge: BridgeProcess | undefined;

/** Publishes once the bridge's broker listens (a start through tsx takes a while on a busy machine). */
async function publish(port: number, from: number, count: number): Promise<void> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    try {
      const device = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
        clientId: "counter",
        reconnectPeriod: 0,
        connectTimeout: 1000,
      });
      for (let i = from; i < from + count; i++) await device.publishAsync("count/n", String(i), { qos: 1 });
      await device.endAsync();
      return;
    } catch (err) {
      if (Date.now() > deadline) throw err;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

before(async () => {
  const port = await freePort();
  h = await harness({
    bridges: { mqtt: { home: { embedded: { port } } } },
    routes: [
      {
        id: "count",
        room: "#count:test.local",
        endpoints: [{ account: "mqtt.home", direction: "in", topic: "count/#" }],
      },
    ],
  });
  dataDir = mkdtempSync(join(tmpdir(), "tribridge-data-"));
  // The embedded default: no redisUrl, a data dir of its own.
  const queue = { ...(h.rawConfig.queue as Record<string, unknown>) };
  delete queue.redisUrl;
  h.rawConfig.queue = queue;
  h.rawConfig.dataDir = dataDir;
});

after(async () => {
  await bridge?.kill("SIGTERM");
  const socket = embeddedRedisSocket(dataDir);
  if (await answersOn(socket)) spawnSync("redis-cli", ["-s", socket, "shutdown", "nosave"]);
  await h?.cleanup();
  rmSync(dataDir, { recursive: true, force: true });
});

test(
  "SIGKILL leaves redis-server running; the next start adopts it, loses nothing, and stops it",
  { timeout: 120_000 },
  async () => {
    const room = h.hs.createRoom({ creator: h.alice, alias: "#count:test.local", preset: "public_chat" });
    const port = (h.rawConfig.bridges as { mqtt: { home: { embedded: { port: number } } } }).mqtt.home
      .embedded.port;
    const socket = embeddedRedisSocket(dataDir);

    bridge = new BridgeProcess(h);
    bridge.start();
    await publish(port, 0, 20);
    await h.hs.waitForMessages(room, 20, 30_000);
    await bridge.kill("SIGKILL");
    assert.equal(await answersOn(socket), true, "the killed bridge's redis-server is still running");

    // Two bridges on one data dir: the second is refused while the first is connected.
    bridge.start();
    await publish(port, 20, 20);
    const dir = mkdtempSync(join(tmpdir(), "tribridge-second-"));
    writeFileSync(join(dir, "config.yaml"), stringify(h.rawConfig));
    const second = spawnSync(
      process.execPath,
      ["--import", "tsx", "src/index.ts", "start", "-c", join(dir, "config.yaml"), "-r", join(dir, "r.yaml")],
      { encoding: "utf8", timeout: 60_000, env: { ...process.env, TRIBRIDGE_LOG_LEVEL: "error" } },
    );
    rmSync(dir, { recursive: true, force: true });
    assert.equal(second.status, 1, second.stderr);
    assert.match(second.stderr, /another tribridge is running on the embedded Redis/);

    await h.hs.waitForMessages(room, 40, 30_000);
    assert.equal(redisPidsOn(socket).length, 1, "one redis-server on the data dir, not two");
    await new Promise((r) => setTimeout(r, 500)); // a duplicate would show up by now
    assert.deepEqual(
      h.hs.messages(room).map((m) => Number(m.content.body)),
      Array.from({ length: 40 }, (_, i) => i),
    );

    await bridge.kill("SIGTERM");
    bridge = undefined;
    await waitFor("redis-server stopped with the bridge", () => redisPidsOn(socket).length === 0, 10_000);
    assert.equal(await answersOn(socket), false);
  },
);
