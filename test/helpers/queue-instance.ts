/**
 * One queue consumer as its own process, for the fault tests: consumes shard 0 of queue "q" under
 * the prefix and instance id given as arguments, logging each delivery to `<prefix>:log` in Redis.
 */
import { setTimeout as sleep } from "node:timers/promises";
import { Redis } from "ioredis";
import { OrderedQueue } from "../../src/queue/ordered-queue.js";
import { REDIS_URL } from "./fixture.js";
import { testQueueOptions } from "./queues.js";

const [prefix, instanceId] = process.argv.slice(2) as [string, string];
const redis = new Redis(REDIS_URL);
const queue = new OrderedQueue<{ n: number }>(
  testQueueOptions(
    prefix,
    async ({ n }) => {
      await sleep(100);
      await redis.rpush(`${prefix}:log`, `${instanceId}${n}`);
    },
    { instanceId },
  ),
);
await queue.start();
process.on("SIGTERM", () => void queue.stop().then(() => process.exit(0)));
