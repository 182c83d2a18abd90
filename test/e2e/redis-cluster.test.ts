/**
 * tribridge on a Redis Cluster of its own (three primaries of Debian's redis-server, AOF on, started
 * here on free ports): the ordered queue (order across shards, in-place retries, the failed list and
 * its requeue) and the whole bridge (MQTT → room, room → MQTT, a retained message kept by the embedded
 * broker's persistence). Every key written must carry the prefix's hash tag, so all of them live in
 * the tag's one slot: MULTI, Lua scripts (BullMQ's) and multi-key commands would fail with CROSSSLOT
 * otherwise, and the last test checks every key on every node.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import mqtt, { type MqttClient } from "mqtt";
import { Redis } from "ioredis";
import { PermanentError } from "../../src/errors.js";
import {
  OrderedQueue,
  requeueFailedJobs,
  shardOf,
  type OrderedQueueOptions,
} from "../../src/queue/ordered-queue.js";
import type { RunningBridge } from "../../src/app.js";
import { checkRedisSettings } from "../../src/queue/redis-check.js";
import { connectRedis } from "../../src/store/redis-store.js";
import { redisKeyPrefix } from "../../src/store/redis-url.js";
import { harness, waitFor, type Harness } from "../helpers/fixture.js";
import { testQueueOptions } from "../helpers/queues.js";
import { startBridge } from "../helpers/start-bridge.js";
import { startRedisCluster, type TestRedisCluster } from "../helpers/redis-cluster.js";

let cluster: TestRedisCluster;
/** Every hash-tagged prefix used here: each key in the cluster must carry one of them. */
const prefixes: string[] = [];

before(async () => {
  cluster = await startRedisCluster();
});
after(async () => {
  await cluster?.stop();
});

/** Every key on every primary, with the node it is on. */
async function allKeys(): Promise<{ node: string; key: string }[]> {
  const found: { node: string; key: string }[] = [];
  for (const url of cluster.nodeUrls) {
    const redis = new Redis(url);
    try {
      let cursor = "0";
      do {
        const [next, keys] = await redis.scan(cursor, "COUNT", 1000);
        found.push(...keys.map((key) => ({ node: url, key })));
        cursor = next;
      } while (cursor !== "0");
    } finally {
      redis.disconnect();
    }
  }
  return found;
}

describe("the ordered queue on a Redis Cluster", () => {
  const queues: OrderedQueue<unknown>[] = [];
  after(async () => {
    for (const q of queues) await q.stop();
  });

  function make<T>(process: OrderedQueueOptions<T>["process"], over: Partial<OrderedQueueOptions<T>> = {}) {
    const prefix = redisKeyPrefix({ redisUrl: cluster.url, prefix: `test-${randomUUID().slice(0, 8)}` });
    prefixes.push(prefix);
    const q = new OrderedQueue<T>({ ...testQueueOptions(prefix, process, over), redisUrl: cluster.url });
    queues.push(q as OrderedQueue<unknown>);
    return q;
  }

  test("300 items over 10 keys and 4 shards: each once, each key in add order", async () => {
    const delivered: { key: string; n: number; id: string }[] = [];
    const q = make<{ key: string; n: number }>(
      async (data, { id }) => {
        delivered.push({ key: data.key, n: data.n, id });
        if (data.n % 7 === 0) await sleep(1);
      },
      { shards: 4 },
    );
    const keys = Array.from({ length: 10 }, (_, i) => `!room${i}:example.org`);
    assert.ok(new Set(keys.map((k) => shardOf(k, 4))).size > 1, "keys should span several shards");
    await q.start();
    const adds: Promise<void>[] = [];
    for (let n = 0; n < 300; n++) {
      const key = keys[(n * 7 + (n >> 3)) % 10]!;
      adds.push(q.add(key, `id-${n}`, { key, n }));
      if (n % 25 === 0) await sleep(0);
    }
    await Promise.all(adds);
    await waitFor("300 deliveries", () => delivered.length >= 300);
    assert.equal(new Set(delivered.map((d) => d.id)).size, 300, "each item delivered exactly once");
    for (const key of keys) {
      const ns = delivered.filter((d) => d.key === key).map((d) => d.n);
      assert.deepEqual(
        ns,
        [...ns].sort((a, b) => a - b),
        `${key} out of order`,
      );
    }
    assert.deepEqual(await q.failedJobs(), []);
  });

  test("a transient failure is retried in place, a permanent one goes to the failed list and is requeued from it", async () => {
    const calls: string[] = [];
    let refuse = true;
    const q = make<{ n: number }>(async (data, { id, attempt }) => {
      calls.push(`${id}#${attempt}`);
      if (data.n === 1 && attempt <= 2) throw new Error("flaky");
      if (data.n === 2 && refuse) throw new PermanentError("bad payload");
    });
    await q.start();
    await Promise.all([0, 1, 2, 3].map((n) => q.add("A", `r${n}`, { n })));
    await waitFor("r3", () => calls.includes("r3#1"));
    assert.deepEqual(calls, ["r0#1", "r1#1", "r1#2", "r1#3", "r2#1", "r3#1"]);
    const failed = await q.failedJobs();
    assert.deepEqual(
      failed.map((f) => [f.id, f.reason]),
      [["r2", "permanent: bad payload"]],
    );
    refuse = false;
    const connection = connectRedis(cluster.url, "test-requeue");
    try {
      assert.equal(await requeueFailedJobs(connection, q.opts), 1);
    } finally {
      connection.disconnect();
    }
    await waitFor("r2 delivered after its requeue", () => calls.length === 7);
    assert.equal(calls[6], "r2#1");
    assert.deepEqual(await q.failedJobs(), []);
  });
});

test("the start-up check reads the settings of every primary, and names the one that is not durable", async () => {
  const redis = connectRedis(cluster.url, "test-check");
  const oneNode = new Redis(cluster.nodeUrls[1]!);
  try {
    await redis.ping();
    assert.deepEqual(await checkRedisSettings(redis, "everysec"), {
      findings: [],
      checked: true,
      settings: { appendonly: "yes", maxmemoryPolicy: "noeviction", appendfsync: "everysec" },
    });
    await oneNode.config("SET", "maxmemory-policy", "allkeys-lru");
    const { findings } = await checkRedisSettings(redis, "everysec");
    assert.deepEqual(
      findings.map((f) => f.problem),
      [
        `${cluster.nodeUrls[1]!.slice("redis://".length)}: maxmemory-policy is 'allkeys-lru': Redis may evict queued messages`,
      ],
    );
  } finally {
    await oneNode.config("SET", "maxmemory-policy", "noeviction");
    oneNode.disconnect();
    redis.disconnect();
  }
});

describe("MQTT ⇄ Matrix with the bridge on a Redis Cluster", () => {
  let h: Harness;
  let bridge: RunningBridge;
  let room: string;
  let port: number;
  const clients: MqttClient[] = [];
  const GHOST = (device: string) => `@_tb_mqtt_home_${device}:test.local`;
  const connect = async (clientId: string) => {
    const c = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, { clientId, protocolVersion: 4 });
    clients.push(c);
    return c;
  };

  before(async () => {
    h = await harness({
      queue: { redisUrl: cluster.url },
      bridges: { mqtt: { home: { embedded: { port: 0 } } } },
      routes: [
        {
          id: "lab",
          room: "#lab:test.local",
          endpoints: [
            { account: "mqtt.home", direction: "in", topic: "lab/+/t", sender: "clientId" },
            { account: "mqtt.home", direction: "out", topic: "lab/cmd", retain: true },
          ],
        },
      ],
    });
    prefixes.push(redisKeyPrefix(h.config.queue));
    room = h.hs.createRoom({ creator: h.alice, alias: "#lab:test.local", preset: "public_chat" });
    const started = await startBridge(h);
    bridge = started.bridge;
    port = started.ports.mqtt;
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.endAsync()));
    await bridge?.stop();
    await h?.cleanup();
  });

  test("QoS 1 publishes reach the room as the device's ghost, in order, once", async () => {
    const device = await connect("sensor1");
    for (let i = 0; i < 30; i++) await device.publishAsync("lab/sensor1/t", `t=${i}`, { qos: 1 });
    await h.hs.waitForMessages(room, 30);
    assert.deepEqual(
      h.hs
        .messages(room)
        .filter((m) => m.sender === GHOST("sensor1"))
        .map((m) => m.content.body),
      Array.from({ length: 30 }, (_, i) => `t=${i}`),
    );
  });

  test("a room message is published to MQTT, retained by the broker's persistence in the cluster", async () => {
    const listener = await connect("listener");
    const received: string[] = [];
    listener.on("message", (_topic, payload) => received.push(payload.toString()));
    await listener.subscribeAsync("lab/cmd", { qos: 1 });
    h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "open the window" });
    await waitFor("the command on MQTT", () => received.includes("open the window"));

    // A client subscribing later is handed the retained value, read back from the cluster.
    const late = await connect("late");
    const retained = new Promise<string>((resolve) => late.once("message", (_t, p) => resolve(p.toString())));
    await late.subscribeAsync("lab/cmd", { qos: 1 });
    assert.equal(await retained, "open the window");
  });

  test("every key written lives in the slot of its prefix's hash tag", async () => {
    const keys = await allKeys();
    assert.ok(keys.length > 0);
    const strays = keys.filter(({ key }) => !prefixes.some((p) => key.startsWith(`${p}:`)));
    assert.deepEqual(strays, [], "keys without the hash tag");
    // One node per prefix: each hash tag's slot is served by one primary.
    for (const p of prefixes) {
      const nodes = new Set(keys.filter(({ key }) => key.startsWith(`${p}:`)).map((k) => k.node));
      assert.equal(nodes.size, 1, `${p}'s keys are on ${[...nodes].join(", ")}`);
    }
  });
});
