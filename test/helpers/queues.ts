/** OrderedQueue options for tests: one shard, quick retries, silent unless a test says otherwise. */
import type { OrderedQueueOptions } from "../../src/queue/ordered-queue.js";
import { moduleLogger } from "../../src/log.js";
import { REDIS_URL } from "./fixture.js";

const silent = moduleLogger("test-queue").child({}, { level: "silent" });

export function testQueueOptions<T>(
  prefix: string,
  process: OrderedQueueOptions<T>["process"],
  over: Partial<OrderedQueueOptions<T>> = {},
): OrderedQueueOptions<T> {
  return {
    name: "q",
    prefix,
    redisUrl: REDIS_URL,
    shards: 1,
    retry: { maxAttempts: 5, initialDelayMs: 10, maxDelayMs: 50 },
    keepCompleted: 100,
    keepFailed: 100,
    instanceId: "inst-1",
    log: silent,
    process,
    ...over,
  };
}
