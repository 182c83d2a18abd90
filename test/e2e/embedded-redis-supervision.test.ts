/**
 * The embedded default (no queue.redisUrl) when its redis-server child dies or hangs under a running
 * bridge: killed once, it is started again on the same files and every acknowledged message is
 * delivered, in order, with a bounded number of log lines; killed again and again, the bridge exits
 * non-zero saying why; paused (SIGSTOP), a SIGTERM still ends the bridge within 10 s.
 */
import { after, before, test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import mqtt, { type MqttClient } from "mqtt";
import { embeddedRedisSocket } from "../../src/queue/embedded-redis.js";
import { BridgeProcess } from "../helpers/bridge-process.js";
import { answersOn, redisPidsOn } from "../helpers/embedded-redis.js";
import { freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";

const TOTAL = 600;
let h: Harness;
let port: number;
let room: string;
const dataDirs: string[] = [];

before(async () => {
  port = await freePort();
  h = await harness({
    bridges: { mqtt: { home: { embedded: { port } } } },
    routes: [
      {
        id: "seq",
        room: "#seq:test.local",
        endpoints: [{ account: "mqtt.home", direction: "in", topic: "seq/#" }],
      },
    ],
  });
  const queue = { ...(h.rawConfig.queue as Record<string, unknown>) };
  delete queue.redisUrl; // the embedded default
  h.rawConfig.queue = queue;
  room = h.hs.createRoom({ creator: h.alice, alias: "#seq:test.local", preset: "public_chat" });
});

after(async () => {
  for (const dir of dataDirs) {
    for (const pid of redisPidsOn(embeddedRedisSocket(dir))) {
      process.kill(pid, "SIGCONT");
      process.kill(pid, "SIGKILL");
    }
    rmSync(dir, { recursive: true, force: true });
  }
  await h?.cleanup();
});

/** A bridge on a data dir of its own, its warnings and errors kept; killed when the test ends. */
function newBridge(t: TestContext): { bridge: BridgeProcess; socket: string } {
  const dataDir = mkdtempSync(join(tmpdir(), "tribridge-sup-"));
  dataDirs.push(dataDir);
  h.rawConfig.dataDir = dataDir;
  const bridge = new BridgeProcess(h, { capture: true, logLevel: "warn" });
  t.after(() => bridge.kill("SIGKILL"));
  return { bridge, socket: embeddedRedisSocket(dataDir) };
}

async function connectDevice(): Promise<MqttClient> {
  const client = mqtt.connect(`mqtt://127.0.0.1:${port}`, {
    clientId: "counter",
    protocolVersion: 4,
    reconnectPeriod: 100,
    clean: true,
  });
  await waitFor("device connected", () => client.connected, 60_000);
  return client;
}

/** Once a message went through, the bridge has started. */
async function deliverOne(): Promise<void> {
  const device = await connectDevice();
  const earlier = h.hs.messageCount(room);
  await device.publishAsync("seq/counter", "up", { qos: 1 });
  await h.hs.waitForMessages(room, earlier + 1, 30_000);
  await device.endAsync();
}

async function redisPid(socket: string): Promise<number> {
  return waitFor("the embedded redis-server", () => redisPidsOn(socket)[0], 30_000);
}

test(
  `redis-server SIGKILLed during ${TOTAL} QoS 1 messages: restarted, each acknowledged one delivered once, in order`,
  { timeout: 120_000 },
  async (t) => {
    const { bridge, socket } = newBridge(t);
    bridge.start();
    const device = await connectDevice();
    const acked: number[] = [];
    for (let i = 0; i < TOTAL; i++)
      void device.publishAsync("seq/counter", String(i), { qos: 1 }).then(
        () => acked.push(i),
        () => undefined,
      );
    await waitFor("some messages before the kill", () => h.hs.messageCount(room) >= 100, 60_000);
    const linesBefore = bridge.stdout.length;
    process.kill(await redisPid(socket), "SIGKILL");
    const killedAt = Date.now();
    const atKill = h.hs.messageCount(room);
    let resumedMs: number | undefined;
    void waitFor("delivery after the kill", () => h.hs.messageCount(room) > atKill + 1, 60_000).then(
      () => (resumedMs = Date.now() - killedAt),
      () => undefined,
    );

    const arrived = await h.hs.waitForMessages(room, TOTAL, 60_000).then(
      () => true,
      () => false,
    );
    if (arrived) await new Promise((r) => setTimeout(r, 1000)); // a duplicate would show up by now
    await device.endAsync(true);
    const bodies = h.hs.messages(room).map((m) => Number(m.content.body));
    const logLines = bridge.stdout.slice(linesBefore);
    console.log(
      `killed at ${atKill}/${TOTAL}; resumed after ${resumedMs} ms; acknowledged ${acked.length}; delivered ${bodies.length}; ` +
        `${logLines.length} log lines (warn+) after the kill:\n${logLines.map((l) => `  ${l.slice(0, 200)}`).join("\n")}`,
    );
    assert.ok(arrived, `all ${TOTAL} delivered within 60 s (${bodies.length})`);
    assert.ok(atKill < TOTAL, `the kill happened mid-stream (${atKill} of ${TOTAL} were in)`);
    assert.equal(acked.length, TOTAL, "every publish acknowledged in the end");
    assert.deepEqual(
      bodies,
      Array.from({ length: TOTAL }, (_, i) => i),
    );
    assert.ok(logLines.length <= 20, `at most 20 log lines while Redis was away (${logLines.length})`);
    assert.match(logLines.join("\n"), /embedded redis-server died; restarting it/);

    await bridge.kill("SIGTERM");
    assert.deepEqual(bridge.exit, { code: 0, signal: null });
  },
);

test(
  "redis-server killed again and again: past the restart limit the bridge exits non-zero",
  {
    timeout: 90_000,
  },
  async (t) => {
    const { bridge, socket } = newBridge(t);
    bridge.start();
    await deliverOne();
    const killed: number[] = [];
    let firstKill = 0;
    await waitFor(
      "the bridge to exit",
      () => {
        if (bridge.exit) return true;
        const pid = redisPidsOn(socket)[0];
        if (pid !== undefined && !killed.includes(pid)) {
          killed.push(pid);
          firstKill ||= Date.now();
          process.kill(pid, "SIGKILL");
        }
        return false;
      },
      60_000,
    );
    console.log(
      `killed ${killed.length} times; exited ${Date.now() - firstKill} ms after the first kill; exit ${JSON.stringify(bridge.exit)}; stderr:\n${bridge.stderr}`,
    );
    assert.deepEqual(bridge.exit, { code: 1, signal: null });
    assert.match(
      bridge.stderr,
      /the embedded redis-server died 6 times within 60 s .*signal SIGKILL.*not restarting it/,
    );
    assert.equal(redisPidsOn(socket).length, 0, "no redis-server left behind");
  },
);

test(
  "SIGTERM with the redis-server paused (SIGSTOP): the bridge exits within 10 s",
  { timeout: 90_000 },
  async (t) => {
    const { bridge, socket } = newBridge(t);
    bridge.start();
    await deliverOne();
    const pid = await redisPid(socket);
    process.kill(pid, "SIGSTOP");
    const t0 = Date.now();
    await bridge.kill("SIGTERM");
    const ms = Date.now() - t0;
    console.log(`exited after ${ms} ms; exit ${JSON.stringify(bridge.exit)}; stderr:\n${bridge.stderr}`);
    assert.ok(ms < 10_000, `exited within 10 s (${ms} ms)`);
    assert.deepEqual(bridge.exit, { code: 1, signal: null });
    assert.match(bridge.stderr, /not stopped within 8 s \(waiting on .*the embedded redis-server\)/);
    await waitFor(
      "the paused redis-server resumed and stopped",
      () => redisPidsOn(socket).length === 0,
      10_000,
    );
    assert.equal(await answersOn(socket), false);
  },
);
