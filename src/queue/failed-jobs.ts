/**
 * The `failed-jobs` command: every relay that failed for good (permanently, or out of attempts),
 * with its reason, read from the bridge's Redis — the external one, or the embedded one while the
 * bridge runs.
 */
import { existsSync } from "node:fs";
import type { Config } from "../config/load.js";
import type { QuarantinedJob } from "../connector-host.js";
import type { ConnectorDefinition } from "../connector.js";
import { embeddedRedisSocket } from "./embedded-redis.js";
import type { Redis } from "ioredis";
import { readFailedJobs, requeueFailedJobs, type FailedJob } from "./ordered-queue.js";
import { TO_MATRIX_QUEUE, connectorsInUse, toConnectorQueue } from "./queue-names.js";
import { connectRedis } from "../store/redis-store.js";
import { redisKeyPrefix } from "../store/redis-url.js";

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

function queueNames(config: Config, connectors: readonly ConnectorDefinition[]): string[] {
  return [
    TO_MATRIX_QUEUE,
    ...connectorsInUse(config.accounts, connectors).map((c) => toConnectorQueue(c.name)),
  ];
}

async function withRedis<R>(config: Config, use: (redis: Redis) => Promise<R>): Promise<R> {
  const redis = connectRedis(redisUrlOf(config), "failed-jobs", { failFast: true });
  try {
    await redis.ping();
    return await use(redis);
  } finally {
    redis.disconnect();
  }
}

/** The failed list of every queue, oldest first; at most `limit` per queue. */
export async function readAllFailedJobs(
  redis: Redis,
  config: Config,
  connectors: readonly ConnectorDefinition[],
  limit: number,
): Promise<FailedJob[]> {
  const lists = await Promise.all(
    queueNames(config, connectors).map((q) => readFailedJobs(redis, redisKeyPrefix(config.queue), q, limit)),
  );
  return lists.flat().sort((a, b) => (a.failedAt ?? 0) - (b.failedAt ?? 0));
}

/**
 * Puts failed relays (all, or those with the given ids) back on their queues, e.g. once the
 * homeserver or broker that refused them is back. Returns how many were requeued.
 */
export async function requeueAllFailedJobs(
  redis: Redis,
  config: Config,
  connectors: readonly ConnectorDefinition[],
  ids?: ReadonlySet<string>,
): Promise<number> {
  const { shards, keepCompletedJobs, keepFailedJobs } = config.queue;
  const prefix = redisKeyPrefix(config.queue);
  let requeued = 0;
  for (const name of queueNames(config, connectors)) {
    const opts = { prefix, name, shards, keepCompleted: keepCompletedJobs, keepFailed: keepFailedJobs };
    requeued += await requeueFailedJobs(
      redis,
      opts,
      ids,
      name === TO_MATRIX_QUEUE ? nowhereToPost : undefined,
    );
  }
  return requeued;
}

/**
 * A quarantined message that matched no endpoint (ConnectorContext.quarantine) cannot be posted
 * anywhere: retried, it stays in the failed list, failed again with its reason and why.
 */
function nowhereToPost(item: { data: unknown }): string | undefined {
  const job = item.data as Partial<QuarantinedJob>;
  if (typeof job.quarantined !== "string" || job.endpointId) return undefined;
  return `quarantined: ${job.quarantined} (retried ${new Date().toISOString()}: it matched no endpoint, so there is no room to post it in)`;
}

/** readAllFailedJobs from outside the bridge (the CLI). */
export function listFailedJobs(
  config: Config,
  connectors: readonly ConnectorDefinition[],
  limit: number,
): Promise<FailedJob[]> {
  return withRedis(config, (redis) => readAllFailedJobs(redis, config, connectors, limit));
}

/** requeueAllFailedJobs from outside the bridge (the CLI). */
export function retryFailedJobs(
  config: Config,
  connectors: readonly ConnectorDefinition[],
  ids?: ReadonlySet<string>,
): Promise<number> {
  return withRedis(config, (redis) => requeueAllFailedJobs(redis, config, connectors, ids));
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
