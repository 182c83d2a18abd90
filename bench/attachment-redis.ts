/**
 * What a large attachment costs in Redis on its way into a room:
 * `npx tsx bench/attachment-redis.ts [MB, default 5]`.
 *
 * A private redis-server run as the embedded default runs it (AOF, noeviction) and one to-matrix
 * queue of the bridge's shape, fed the item `emit` writes for a message with one file. Measured:
 * the job's `MEMORY USAGE` and the server's `used_memory` while the item waits, and after it was
 * delivered (its completed job kept the way the bridge keeps it: the file's bytes dropped, see
 * keptWhenDelivered; and, for comparison, whole, as before), or failed (in the failed list).
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PermanentError } from "../src/errors.js";
import { moduleLogger } from "../src/log.js";
import { keptWhenDelivered, type ToMatrixJob } from "../src/matrix/room-delivery.js";
import { startEmbeddedRedis } from "../src/queue/embedded-redis.js";
import { OrderedQueue } from "../src/queue/ordered-queue.js";
import { connectRedis } from "../src/store/redis-store.js";
import { waitFor } from "../test/helpers/fixture.js";

const MB = Number(process.argv[2] ?? 5);
const SHARDS = 16; // the default
const log = moduleLogger("bench").child({}, { level: "silent" });

const dir = mkdtempSync(join(tmpdir(), "tribridge-attachment-"));
const server = await startEmbeddedRedis(dir, log);
const redis = connectRedis(server.url, "bench");

async function usedMemory(): Promise<number> {
  const info = await redis.info("memory");
  return Number(/^used_memory:(\d+)/m.exec(info)![1]);
}

/** Every field counted (by default MEMORY USAGE samples five of a hash's fields). */
async function memoryUsage(key: string): Promise<number> {
  return Number(await redis.call("MEMORY", "USAGE", key, "SAMPLES", "0"));
}

const fmt = (bytes: number) =>
  bytes === 0
    ? "-"
    : Math.abs(bytes) < 2 ** 20
      ? `${(bytes / 1024).toFixed(1)} KiB`
      : `${(bytes / 2 ** 20).toFixed(2)} MiB`;

/** The key of the one job of a shard in `state` ("wait" list or "completed" set). */
async function jobKey(prefix: string, state: "wait" | "completed"): Promise<string | undefined> {
  for (let i = 0; i < SHARDS; i++) {
    const shard = `${prefix}:to-matrix-${i}`;
    const ids =
      state === "wait"
        ? await redis.lrange(`${shard}:wait`, 0, -1)
        : await redis.zrange(`${shard}:completed`, 0, -1);
    if (ids[0]) return `${shard}:${ids[0]}`;
  }
  return undefined;
}

type Outcome = "delivered" | "delivered, kept whole" | "failed";

async function measure(outcome: Outcome, prefix: string, mb = MB): Promise<Record<string, string>> {
  let handled = 0;
  // Each stopped before measuring: what its connections buffered is not the item's cost.
  const queue = () =>
    new OrderedQueue<ToMatrixJob>({
      name: "to-matrix",
      prefix,
      redisUrl: server.url,
      shards: SHARDS,
      retry: { maxAttempts: 3, initialDelayMs: 10, maxDelayMs: 10 },
      keepCompleted: 1000,
      keepFailed: 10_000,
      instanceId: prefix,
      log,
      process: async () => {
        handled++;
        if (outcome === "failed") throw new PermanentError("refused");
      },
      // As the bridge runs it; "kept whole" is how it was before.
      ...(outcome !== "delivered, kept whole" && { keptWhenDelivered }),
    });
  const data = Buffer.alloc(Math.round(mb * 2 ** 20), 7);
  const job: ToMatrixJob = {
    endpointId: "cams.in",
    connector: "mqtt",
    account: "home",
    sender: { id: "cam1" },
    body: { text: "", notice: true },
    attachments: [
      { name: "cams_cam1_snapshot.jpg", mimeType: "image/jpeg", dataBase64: data.toString("base64") },
    ],
    stream: "cams/cam1/snapshot",
  };
  const before = await usedMemory();
  const producer = queue();
  await producer.add("!room:example.org", "item-1", job); // not started: it waits
  await producer.stop();
  const queuedJob = await memoryUsage((await jobKey(prefix, "wait"))!);
  const queuedServer = (await usedMemory()) - before;
  const consumer = queue();
  await consumer.start();
  await waitFor("delivery", () => handled === 1);
  const completed = await waitFor("the completed job", () => jobKey(prefix, "completed"));
  await consumer.stop();
  const completedJob = await memoryUsage(completed);
  const failedId = (await redis.lrange(`${prefix}:to-matrix-failed:wait`, 0, -1))[0];
  const failedJob = failedId ? await memoryUsage(`${prefix}:to-matrix-failed:${failedId}`) : 0;
  const afterServer = (await usedMemory()) - before;
  return {
    outcome,
    "job while queued": fmt(queuedJob),
    "used_memory while queued": fmt(queuedServer),
    "completed job": fmt(completedJob),
    "failed-list entry": fmt(failedJob),
    "used_memory after": fmt(afterServer),
  };
}

try {
  console.log(`one ${MB} MiB attachment (${fmt(Math.ceil((MB * 2 ** 20) / 3) * 4)} as base64)`);
  await measure("delivered", "warm-up", 0.01); // loads BullMQ's scripts into Redis, which stay
  console.table([
    await measure("delivered", "a"),
    await measure("delivered, kept whole", "b"),
    await measure("failed", "c"),
  ]);
} finally {
  redis.disconnect();
  await server.stop();
  rmSync(dir, { recursive: true, force: true });
}
