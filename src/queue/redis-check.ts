/**
 * Checks the Redis settings tribridge depends on: AOF (or a relay accepted before a crash is
 * lost), `maxmemory-policy noeviction` (or Redis may evict queued messages), and that its AOF is
 * synced as queue.fsync says. An external Redis is only checked, never reconfigured: it is its
 * operator's, and may serve others.
 */
import type { Redis } from "ioredis";
import type { Logger } from "../log.js";
import type { FsyncPolicy } from "./embedded-redis.js";

export interface RedisCheck {
  problems: string[];
  /** CONFIG is disabled on some managed Redis; then nothing could be checked. */
  checked: boolean;
}

async function configValue(redis: Redis, name: string): Promise<string | undefined> {
  return ((await redis.config("GET", name)) as string[])[1];
}

export async function checkRedisSettings(redis: Redis, fsync: FsyncPolicy): Promise<RedisCheck> {
  let aof: string | undefined;
  let policy: string | undefined;
  let appendfsync: string | undefined;
  try {
    aof = await configValue(redis, "appendonly");
    policy = await configValue(redis, "maxmemory-policy");
    appendfsync = await configValue(redis, "appendfsync");
  } catch {
    return { problems: [], checked: false };
  }
  const problems: string[] = [];
  if (aof !== "yes") {
    problems.push("appendonly is not 'yes': queued messages are lost if Redis restarts (set appendonly yes)");
  }
  if (policy !== "noeviction") {
    problems.push(
      `maxmemory-policy is '${policy}': Redis may evict queued messages (set maxmemory-policy noeviction)`,
    );
  }
  if (aof === "yes" && appendfsync !== fsync) {
    problems.push(
      `appendfsync is '${appendfsync}' but queue.fsync is '${fsync}': ` +
        (appendfsync === "no"
          ? "acknowledged messages can be lost on a power loss (up to ~30 s of them); "
          : "") +
        `set appendfsync ${fsync} on that Redis, or queue.fsync to what it runs with`,
    );
  }
  return { problems, checked: true };
}

export async function warnAboutRedisSettings(redis: Redis, fsync: FsyncPolicy, log: Logger): Promise<void> {
  const result = await checkRedisSettings(redis, fsync);
  if (!result.checked)
    log.warn(
      `cannot read Redis CONFIG; make sure it runs with appendonly yes, appendfsync ${fsync} and maxmemory-policy noeviction`,
    );
  for (const p of result.problems) log.warn(`Redis: ${p}`);
}
