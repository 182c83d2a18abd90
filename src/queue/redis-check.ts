/**
 * Checks the Redis settings tribridge depends on: AOF (or a relay accepted before a crash is
 * lost) and `maxmemory-policy noeviction` (or Redis may evict queued messages).
 */
import type { Redis } from "ioredis";
import type { Logger } from "../log.js";

export interface RedisCheck {
  problems: string[];
  /** CONFIG is disabled on some managed Redis; then nothing could be checked. */
  checked: boolean;
}

export async function checkRedisSettings(redis: Redis): Promise<RedisCheck> {
  let aof: string | undefined;
  let policy: string | undefined;
  try {
    aof = ((await redis.config("GET", "appendonly")) as string[])[1];
    policy = ((await redis.config("GET", "maxmemory-policy")) as string[])[1];
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
  return { problems, checked: true };
}

export async function warnAboutRedisSettings(redis: Redis, log: Logger): Promise<void> {
  const result = await checkRedisSettings(redis);
  if (!result.checked)
    log.warn(
      "cannot read Redis CONFIG; make sure it runs with appendonly yes and maxmemory-policy noeviction",
    );
  for (const p of result.problems) log.warn(`Redis: ${p}`);
}
