/**
 * `npx tsx bench/redis-cluster.ts`: what running on a Redis Cluster costs, measured against one
 * redis-server in the same run. Both are started here (AOF everysec, noeviction, TCP on loopback):
 * one redis-server, and a cluster of three primaries (test/helpers/redis-cluster.ts).
 *
 *   raw BullMQ     add + process, one worker of concurrency 1 per shard (the bridge's shape)
 *   ordered queue  tribridge's OrderedQueue (batches, leases, per-room order) over the same shards,
 *                  BATCH messages added a tick (one per room)
 *   MQTT → Matrix  the whole bridge in this process (embedded broker, 16 shards, 8 rooms, the test
 *                  homeserver): one device with 200 QoS 1 publishes in flight, until all are in rooms
 *
 * Each row is run ROUNDS times, alternating single and cluster; the best of each is compared. On the
 * cluster every key carries one hash tag ({<prefix>}), so all of it runs on one primary: the ratio is
 * the price of the cluster client (slot routing, MOVED handling), not a gain from spreading.
 */
import { randomUUID } from "node:crypto";
import { Queue, Worker } from "bullmq";
import { moduleLogger } from "../src/log.js";
import { OrderedQueue } from "../src/queue/ordered-queue.js";
import { connectRedis } from "../src/store/redis-store.js";
import { redisKeyPrefix } from "../src/store/redis-url.js";
import mqtt from "mqtt";
import { harness } from "../test/helpers/fixture.js";
import { startRedisCluster } from "../test/helpers/redis-cluster.js";
import { startBridge } from "../test/helpers/start-bridge.js";
import { publishAll } from "./devices.js";
import { startRedisServer } from "../test/helpers/redis-server.js";

const N = Number(process.env.BENCH_MESSAGES ?? 5000);
const SHARDS = Number(process.env.BENCH_SHARDS ?? 4);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const ROOMS = 8;
/** Messages added in one tick in the ordered-queue row. */
const BATCH = Number(process.env.BENCH_BATCH ?? 8);

const silent = moduleLogger("bench").child({}, { level: "silent" });

function prefixFor(redisUrl: string): string {
  return redisKeyPrefix({ redisUrl, prefix: `bench-${randomUUID().slice(0, 8)}` });
}

async function rawBullmq(redisUrl: string): Promise<number> {
  const prefix = prefixFor(redisUrl);
  const conn = connectRedis(redisUrl, "raw-bullmq-queues");
  const queues = Array.from(
    { length: SHARDS },
    (_, i) => new Queue(`raw-${i}`, { connection: conn, prefix }),
  );
  let done = 0;
  let resolveAll!: () => void;
  const all = new Promise<void>((r) => (resolveAll = r));
  const connections = queues.map((_, i) => connectRedis(redisUrl, `raw-bullmq-worker-${i}`));
  const workers = connections.map(
    (connection, i) =>
      new Worker(`raw-${i}`, async () => void (++done === N && resolveAll()), {
        connection,
        prefix,
        concurrency: 1,
      }),
  );
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: N }, (_, i) =>
      queues[i % SHARDS]!.add("j", { i }, { jobId: `j${i}`, removeOnComplete: { count: 1000 } }),
    ),
  );
  await all;
  const ms = performance.now() - t0;
  await Promise.all(workers.map((w) => w.close()));
  await Promise.all(queues.map((q) => q.obliterate({ force: true }).then(() => q.close())));
  for (const c of [conn, ...connections]) c.disconnect();
  return (N * 1000) / ms;
}

async function orderedQueue(redisUrl: string): Promise<number> {
  let done = 0;
  let resolveAll!: () => void;
  const all = new Promise<void>((r) => (resolveAll = r));
  const q = new OrderedQueue<{ i: number }>({
    name: "bench",
    prefix: prefixFor(redisUrl),
    redisUrl,
    shards: SHARDS,
    retry: { maxAttempts: 5, initialDelayMs: 10, maxDelayMs: 50 },
    keepCompleted: 1000,
    keepFailed: 100,
    instanceId: "bench",
    log: silent,
    process: async () => void (++done === N && resolveAll()),
  });
  await q.start();
  const t0 = performance.now();
  // BATCH adds a tick, as ingest brings them: the queue writes what one tick adds as one job per shard.
  for (let i = 0; i < N; i += BATCH)
    await Promise.all(
      Array.from({ length: Math.min(BATCH, N - i) }, (_, j) =>
        q.add(`!room${(i + j) % ROOMS}:bench`, `m${i + j}`, { i: i + j }),
      ),
    );
  await all;
  const ms = performance.now() - t0;
  await q.stop();
  return (N * 1000) / ms;
}

async function mqttToMatrix(redisUrl: string): Promise<number> {
  const rooms = Array.from({ length: ROOMS }, (_, i) => `bench${i}`);
  const h = await harness({
    queue: { redisUrl, shards: 16 },
    bridges: { mqtt: { home: { embedded: { port: 0 } } } },
    routes: rooms.map((r, i) => ({
      id: r,
      room: `#${r}:test.local`,
      endpoints: [{ account: "mqtt.home", direction: "in", topic: `bench/${i}/t` }],
    })),
  });
  const roomIds = rooms.map((r) =>
    h.hs.createRoom({ creator: h.alice, alias: `#${r}:test.local`, preset: "public_chat" }),
  );
  const { bridge, ports } = await startBridge(h);
  const device = await mqtt.connectAsync(`mqtt://127.0.0.1:${ports.mqtt}`, { clientId: "bench-device" });
  const total = () => roomIds.reduce((n, id) => n + h.hs.messageCount(id), 0);
  const flood = async (count: number) => {
    const base = total();
    const t0 = performance.now();
    await publishAll(
      device,
      Array.from({ length: count }, (_, i) => [`bench/${i % ROOMS}/t`, String(i)]),
    );
    const deadline = Date.now() + 120_000;
    while (total() < base + count) {
      if (Date.now() > deadline)
        throw new Error(`only ${total() - base} of ${count} in the rooms after 120 s`);
      await new Promise((r) => setTimeout(r, 5));
    }
    return (count * 1000) / (performance.now() - t0);
  };
  try {
    await flood(Math.min(N, 1000)); // warm-up: ghosts registered and joined, hot paths optimised
    return await flood(N);
  } finally {
    await device.endAsync();
    await bridge.stop();
    await h.cleanup();
  }
}

const durable = ["--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"];
const single = await startRedisServer(durable);
const cluster = await startRedisCluster();
try {
  const rows: [string, (url: string) => Promise<number>][] = [
    ["raw BullMQ add+process", rawBullmq],
    ["ordered queue add+process", orderedQueue],
    ["MQTT → Matrix (whole bridge)", mqttToMatrix],
  ];
  console.log(`${N} messages, ${SHARDS} shards, best of ${ROUNDS}; msg/s`);
  console.log("row                          single   cluster  cluster/single");
  for (const [name, run] of rows) {
    await run(single.url); // warm-up: JIT, connections, scripts loaded
    await run(cluster.url);
    let best = { single: 0, cluster: 0 };
    for (let r = 0; r < ROUNDS; r++) {
      best = {
        single: Math.max(best.single, await run(single.url)),
        cluster: Math.max(best.cluster, await run(cluster.url)),
      };
    }
    console.log(
      `${name.padEnd(28)} ${best.single.toFixed(0).padStart(6)}   ${best.cluster.toFixed(0).padStart(7)}  ` +
        `${(best.cluster / best.single).toFixed(2)}`,
    );
  }
} finally {
  await cluster.stop();
  await single.stop();
}
// Everything above is stopped, yet after the whole-bridge row the process does not end by itself.
process.exit(0);
