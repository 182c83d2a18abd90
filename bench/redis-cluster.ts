/**
 * `npx tsx bench/redis-cluster.ts`: what running on a Redis Cluster costs, measured against one
 * redis-server in the same run. Both are started here (AOF everysec, noeviction, TCP on loopback):
 * one redis-server, and a cluster of three primaries (test/helpers/redis-cluster.ts).
 *
 *   raw BullMQ     add + process, one worker of concurrency 1 per shard (the bridge's shape)
 *   ordered queue  tribridge's OrderedQueue (batches, leases, per-room order) over the same shards,
 *                  BATCH messages added a tick (one per room)
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
import { startRedisCluster } from "../test/helpers/redis-cluster.js";
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

const durable = ["--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"];
const single = await startRedisServer(durable);
const cluster = await startRedisCluster();
try {
  const rows: [string, (url: string) => Promise<number>][] = [
    ["raw BullMQ add+process", rawBullmq],
    ["ordered queue add+process", orderedQueue],
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
