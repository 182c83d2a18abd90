/**
 * Last wills across restarts of the embedded broker, and a clean stop. Wills live in Redis with the
 * id of the broker run that stored them; aedes publishes those of runs that are gone at its will
 * sweep, every 4 heartbeats (4 minutes). The heartbeat is shortened here so the tests need not wait.
 */
import { after, afterEach, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { Aedes, type AedesOptions } from "aedes";
import mqtt, { type IClientOptions, type MqttClient } from "mqtt";
import { EmbeddedBroker, type IncomingPublish } from "../../bridges/mqtt/embedded-broker.js";
import { embeddedBrokerSchema } from "../../bridges/mqtt/schema.js";
import { moduleLogger } from "../../src/log.js";
import { REDIS_URL, deleteKeys, freePort, waitFor } from "../helpers/fixture.js";

const HEARTBEAT_MS = 100;
const SWEEPS = 3 * 4 * HEARTBEAT_MS;
const createBroker = Aedes.createBroker.bind(Aedes);
(Aedes as { createBroker: (o?: AedesOptions) => Promise<Aedes> }).createBroker = (options) =>
  createBroker({ ...options, heartbeatInterval: HEARTBEAT_MS });

const log = moduleLogger("wills-test");
log.level = "silent";
const unhandled: unknown[] = [];
process.on("unhandledRejection", (err) => unhandled.push(err));
const cleanups: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});
after(() => assert.deepEqual(unhandled, []));

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const WILL = { topic: "tele/plug/LWT", payload: Buffer.from("Offline"), qos: 1 as const, retain: true };

async function run(port: number, prefix: string): Promise<{ broker: EmbeddedBroker; ingested: string[] }> {
  const ingested: string[] = [];
  const broker = new EmbeddedBroker(
    embeddedBrokerSchema.parse({ port }),
    log,
    async (msg: IncomingPublish) => void ingested.push(`${msg.clientId}: ${msg.payload.toString()}`),
    { url: REDIS_URL, keyPrefix: `${prefix}:` },
  );
  await broker.start();
  cleanups.push(() => broker.stop());
  return { broker, ingested };
}

/** A run in a process of its own, for SIGKILL to end without any clean-up. */
async function crashingRun(port: number, prefix: string): Promise<() => Promise<void>> {
  const module = (path: string) => JSON.stringify(new URL(path, import.meta.url).href);
  const script = `
    import { EmbeddedBroker } from ${module("../../bridges/mqtt/embedded-broker.ts")};
    import { embeddedBrokerSchema } from ${module("../../bridges/mqtt/schema.ts")};
    import { moduleLogger } from ${module("../../src/log.ts")};
    const log = moduleLogger("crashing-run");
    log.level = "silent";
    const config = embeddedBrokerSchema.parse({ port: ${port} });
    const redis = { url: ${JSON.stringify(REDIS_URL)}, keyPrefix: ${JSON.stringify(`${prefix}:`)} };
    await new EmbeddedBroker(config, log, async () => {}, redis).start();
    console.log("listening");`;
  const child = spawn(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  await new Promise<void>((resolve, reject) => {
    child.stdout.on("data", (d: Buffer) => d.toString().includes("listening") && resolve());
    child.once("exit", (code) => reject(new Error(`the first run exited with ${code}`)));
  });
  const crash = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill("SIGKILL");
    await exited;
  };
  cleanups.push(crash);
  return crash;
}

/** A Tasmota-like plug: a retained "Offline" will, a retained "Online" on every connect. */
async function plug(port: number): Promise<MqttClient> {
  const options: IClientOptions = { clientId: "plug", reconnectPeriod: 50, will: WILL };
  const client = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, options);
  const online = () => client.publishAsync(WILL.topic, "Online", { qos: 1, retain: true });
  client.on("connect", () => void online().catch(() => {}));
  cleanups.push(() => client.endAsync(true));
  await online();
  return client;
}

async function retainedState(port: number): Promise<string[]> {
  const watcher = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, { clientId: "watcher" });
  const seen: string[] = [];
  watcher.on("message", (_topic, payload) => seen.push(payload.toString()));
  await watcher.subscribeAsync(WILL.topic, { qos: 1 });
  await sleep(100);
  await watcher.endAsync();
  return seen;
}

async function setUp(): Promise<{ port: number; prefix: string }> {
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  cleanups.push(() => deleteKeys(prefix));
  return { port: await freePort(), prefix };
}

test("after a crash, the will of a device that is back online is void: not published, not relayed", async () => {
  const { port, prefix } = await setUp();
  const crash = await crashingRun(port, prefix);
  const device = await plug(port);
  await crash();
  const { ingested } = await run(port, prefix);
  await waitFor("the device back", () => device.connected && ingested.includes("plug: Online"));
  await sleep(SWEEPS);
  assert.deepEqual(ingested, ["plug: Online"]);
  assert.deepEqual(await retainedState(port), ["Online"]);
});

test("after a crash, the will of a device that is not back is published and relayed at the will sweep", async () => {
  const { port, prefix } = await setUp();
  const crash = await crashingRun(port, prefix);
  const device = await plug(port);
  await crash();
  await device.endAsync(true); // gone for good
  const { ingested } = await run(port, prefix);
  await waitFor("the will", () => ingested.length > 0);
  await sleep(SWEEPS);
  assert.deepEqual(ingested, ["plug: Offline"]);
  assert.deepEqual(await retainedState(port), ["Offline"]);
});

test("stopping with devices connected leaves no Redis command to fail unhandled", async () => {
  const { port, prefix } = await setUp();
  let release: () => void = () => {};
  const held = new Promise<void>((resolve) => (release = resolve));
  const broker = new EmbeddedBroker(
    embeddedBrokerSchema.parse({ port }),
    log,
    (msg) => (msg.clientId === "dropping" ? held : Promise.resolve()),
    { url: REDIS_URL, keyPrefix: `${prefix}:` },
  );
  await broker.start();
  const device = await plug(port);
  await device.subscribeAsync("tele/plug/cmnd/#", { qos: 1 });
  const dropping = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, { clientId: "dropping", will: WILL });
  cleanups.push(() => dropping.endAsync(true));
  const willArrives = new Promise((resolve) => setTimeout(resolve, 100));
  dropping.stream.destroy(); // its will is on its way through the broker as it stops
  await willArrives;
  const stopped = broker.stop();
  setTimeout(release, 50);
  await stopped;
  await sleep(200);
  assert.deepEqual(unhandled, []);
});

test("a clean stop keeps wills, as a crash does: void once the device is back", async () => {
  const { port, prefix } = await setUp();
  const first = await run(port, prefix);
  const device = await plug(port);
  await waitFor("online", () => first.ingested.includes("plug: Online"));
  await first.broker.stop();
  await sleep(100);
  assert.deepEqual(first.ingested, ["plug: Online"], "no will when the broker stops");

  const second = await run(port, prefix);
  await waitFor("the device back", () => device.connected && second.ingested.includes("plug: Online"));
  await sleep(SWEEPS);
  assert.deepEqual(second.ingested, ["plug: Online"]);
  assert.deepEqual(await retainedState(port), ["Online"]);
});
