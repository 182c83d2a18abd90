/**
 * Checks the Redis settings tribridge depends on: AOF (or a relay accepted before a crash is
 * lost), `maxmemory-policy noeviction` (or Redis may evict queued messages), and that its AOF is
 * synced as queue.fsync says. An external Redis is only checked, never reconfigured: it is its
 * operator's, and may serve others. `start` logs the findings; `tribridge doctor` prints them.
 */
import type { Cluster, Redis } from "ioredis";
import type { Logger } from "../log.js";
import type { FsyncPolicy } from "./embedded-redis.js";

/** One setting that is not as tribridge needs it. */
export interface RedisFinding {
  /** fail: queued messages can be lost; warn: less safe (or slower) than queue.fsync says. */
  level: "fail" | "warn";
  problem: string;
  fix: string;
}

export interface RedisCheck {
  findings: RedisFinding[];
  /** CONFIG is disabled on some managed Redis; then nothing could be checked. */
  checked: boolean;
  /** The settings read, when `checked`. */
  settings?: { appendonly?: string; maxmemoryPolicy?: string; appendfsync?: string };
}

/** What to make sure of by hand when CONFIG cannot be read. */
export function redisSettingsNeeded(fsync: FsyncPolicy): string {
  return `make sure it runs with appendonly yes, appendfsync ${fsync} and maxmemory-policy noeviction`;
}

async function configValue(redis: Redis, name: string): Promise<string | undefined> {
  return ((await redis.config("GET", name)) as string[])[1];
}

/**
 * On a Redis Cluster, every primary is checked (CONFIG answers for one node, and which primary holds
 * the bridge's slot changes with resharding and failover); each finding names its node.
 */
export async function checkRedisSettings(redis: Redis, fsync: FsyncPolicy): Promise<RedisCheck> {
  const cluster = redis as unknown as Partial<Cluster>;
  if (!cluster.isCluster) return checkServer(redis, fsync);
  const results = await Promise.all(
    cluster.nodes!("master").map(async (node) => {
      const result = await checkServer(node, fsync);
      const name = `${node.options.host}:${node.options.port}`;
      return {
        ...result,
        findings: result.findings.map((f) => ({ ...f, problem: `${name}: ${f.problem}` })),
      };
    }),
  );
  return {
    findings: results.flatMap((r) => r.findings),
    checked: results.length > 0 && results.every((r) => r.checked),
    ...(results[0]?.settings && { settings: results[0].settings }),
  };
}

async function checkServer(redis: Redis, fsync: FsyncPolicy): Promise<RedisCheck> {
  let aof: string | undefined;
  let policy: string | undefined;
  let appendfsync: string | undefined;
  try {
    aof = await configValue(redis, "appendonly");
    policy = await configValue(redis, "maxmemory-policy");
    appendfsync = await configValue(redis, "appendfsync");
  } catch {
    return { findings: [], checked: false };
  }
  const findings: RedisFinding[] = [];
  if (aof !== "yes") {
    findings.push({
      level: "fail",
      problem: `appendonly is '${aof}': queued messages are lost if Redis restarts`,
      fix: "set appendonly yes",
    });
  }
  if (policy !== "noeviction") {
    findings.push({
      level: "fail",
      problem: `maxmemory-policy is '${policy}': Redis may evict queued messages`,
      fix: "set maxmemory-policy noeviction",
    });
  }
  if (aof === "yes" && appendfsync !== fsync) {
    findings.push({
      level: "warn",
      problem:
        `appendfsync is '${appendfsync}' but queue.fsync is '${fsync}'` +
        (appendfsync === "no"
          ? ": acknowledged messages can be lost on a power loss (up to ~30 s of them)"
          : ""),
      fix: `set appendfsync ${fsync} on that Redis, or queue.fsync to what it runs with`,
    });
  }
  return { findings, checked: true, settings: { appendonly: aof, maxmemoryPolicy: policy, appendfsync } };
}

export async function warnAboutRedisSettings(redis: Redis, fsync: FsyncPolicy, log: Logger): Promise<void> {
  const result = await checkRedisSettings(redis, fsync);
  if (!result.checked) log.warn(`cannot read Redis CONFIG; ${redisSettingsNeeded(fsync)}`);
  for (const f of result.findings) log.warn(`Redis: ${f.problem} (${f.fix})`);
}
