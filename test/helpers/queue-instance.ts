/**
 * One queue consumer as its own process, for the fault tests: consumes shard 0 of queue "q" under
 * the prefix and instance id given as arguments (then, optionally, the lease's leaseMs and
 * renewMs), logging each delivery to `<prefix>:log` in Redis, and its id to `<prefix>:ready` once it
 * has started (holding the shard's lease, or competing for it).
 */
import { setTimeout as sleep } from "node:timers/promises";
import { Redis } from "ioredis";
import { OrderedQueue } from "../../src/queue/ordered-queue.js";
import { REDIS_URL } from "./fixture.js";
import { testQueueOptions } from "./queues.js";

const [prefix, instanceId, leaseMs, renewMs] = process.argv.slice(2) as [string, string, string?, string?];
const lease = leaseMs && renewMs ? { leaseMs: Number(leaseMs), renewMs: Number(renewMs) } : undefined;
const redis = new Redis(REDIS_URL);
const queue = new OrderedQueue<{ n: number }>(
  testQueueOptions(
    prefix,
    async ({ n }) => {
      await sleep(100);
      await redis.rpush(`${prefix}:log`, `${instanceId}${n}`);
    },
    { instanceId, lease },
  ),
);
await queue.start();
await redis.rpush(`${prefix}:ready`, instanceId);
process.on("SIGTERM", () => void queue.stop().then(() => process.exit(0)));
