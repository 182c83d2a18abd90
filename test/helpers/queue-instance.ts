/**
 * One queue consumer as its own process, for the fault tests: consumes shard 0 of queue "q" under
 * the prefix and instance id given as arguments, logging each delivery to `<prefix>:log` in Redis.
 */
import { setTimeout as sleep } from "node:timers/promises";
import { Redis } from "ioredis";
import { moduleLogger } from "../../src/log.js";
import { OrderedQueue } from "../../src/queue/ordered-queue.js";
import { REDIS_URL } from "./fixture.js";

const [prefix, instanceId] = process.argv.slice(2) as [string, string];
const redis = new Redis(REDIS_URL);
const queue = new OrderedQueue<{ n: number }>({
  name: "q",
  prefix,
  redisUrl: REDIS_URL,
  shards: 1,
  retry: { maxAttempts: 5, initialDelayMs: 10, maxDelayMs: 50 },
  keepCompleted: 100,
  keepFailed: 100,
  instanceId,
  log: moduleLogger("queue-instance"),
  process: async ({ n }) => {
    await sleep(100);
    await redis.rpush(`${prefix}:log`, `${instanceId}${n}`);
  },
});
await queue.start();
process.on("SIGTERM", () => void queue.stop().then(() => process.exit(0)));
