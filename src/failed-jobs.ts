/**
 * The `failed-jobs` command: every relay that failed for good (permanently, or out of attempts),
 * with its reason, read from the bridge's Redis — the external one, or the embedded one while the
 * bridge runs.
 */
import { existsSync } from "node:fs";
import type { Config } from "./config/load.js";
import type { ConnectorDefinition } from "./connector.js";
import { embeddedRedisSocket } from "./queue/embedded-redis.js";
import { readFailedJobs, type FailedJob } from "./queue/ordered-queue.js";
import { TO_MATRIX_QUEUE, connectorsInUse, toConnectorQueue } from "./queue/queue-names.js";
import { connectRedis } from "./store/redis-store.js";

function redisUrlOf(config: Config): string {
  if (config.queue.redisUrl) return config.queue.redisUrl;
  const socket = embeddedRedisSocket(config.dataDir);
  if (!existsSync(socket)) {
    throw new Error(
      `the embedded Redis runs only while the bridge runs (no socket at ${socket}): start the bridge, or set queue.redisUrl`,
    );
  }
  return `unix://${socket}`;
}

/** The failed list of every queue, oldest first; at most `limit` per queue. */
export async function listFailedJobs(
  config: Config,
  connectors: readonly ConnectorDefinition[],
  limit: number,
): Promise<FailedJob[]> {
  const queues = [
    TO_MATRIX_QUEUE,
    ...connectorsInUse(config.accounts, connectors).map((c) => toConnectorQueue(c.name)),
  ];
  const redis = connectRedis(redisUrlOf(config), "failed-jobs", { failFast: true });
  try {
    await redis.ping();
    const lists = await Promise.all(queues.map((q) => readFailedJobs(redis, config.queue.prefix, q, limit)));
    return lists.flat().sort((a, b) => (a.failedAt ?? 0) - (b.failedAt ?? 0));
  } finally {
    redis.disconnect();
  }
}

/** One line per failed relay, then its data (shortened): what an operator needs to act on it. */
export function formatFailedJobs(jobs: readonly FailedJob[]): string {
  if (jobs.length === 0) return "No failed relays.";
  const lines = jobs.map((j) => {
    const at = j.failedAt === undefined ? "?" : new Date(j.failedAt).toISOString();
    const data = JSON.stringify(j.data) ?? "";
    const shown = data.length > 300 ? `${data.slice(0, 300)}…` : data;
    return `${at}  ${j.queue}  ${j.id}\n  reason: ${j.reason}\n  data:   ${shown}`;
  });
  return `${lines.join("\n")}\n\n${jobs.length} failed relay(s), oldest first.`;
}
