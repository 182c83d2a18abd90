import { Cluster, Redis, type RedisOptions } from "ioredis";
import type { KeyValueStore } from "../connector.js";
import { moduleLogger } from "../log.js";
import { isClusterUrl, parseClusterUrl } from "./redis-url.js";

const log = moduleLogger("redis");

/** The bridge's own connection (key-value store, dedupe): one per running bridge. */
export const MAIN_CONNECTION = "main";

/** How Redis lists a connection of ours (CLIENT LIST). */
export function connectionName(name: string): string {
  return `tribridge-${name}`;
}

/**
 * Opens an ioredis connection for a redis://, rediss:// or unix:// URL, or a Cluster for a
 * redis+cluster:// one. A Cluster is typed as a Redis: the bridge uses only what both answer alike
 * (commands, MULTI, EVAL, defineCommand, pub/sub, status, events), and runs on a cluster in
 * test/e2e/redis-cluster.test.ts.
 */
export function connectRedis(
  url: string,
  name: string,
  opts: { autoPipelining?: boolean; failFast?: boolean } = {},
): Redis {
  const options = {
    connectionName: connectionName(name),
    // Commands issued in the same tick go out in one write (not for BullMQ's blocking worker connections).
    enableAutoPipelining: opts.autoPipelining ?? false,
    // BullMQ workers require null: commands wait for a reconnect instead of failing. A one-off
    // command-line read fails at once instead (failFast).
    maxRetriesPerRequest: opts.failFast ? 0 : null,
    ...(opts.failFast && { retryStrategy: () => null }),
    enableReadyCheck: true,
  };
  const redis = isClusterUrl(url)
    ? openCluster(url, options)
    : url.startsWith("unix://")
      ? new Redis({ ...options, path: url.slice("unix://".length) })
      : new Redis(url, options);
  // ioredis reconnects by itself; an unhandled "error" event would crash the process instead.
  const reachability = reachabilityOf(url);
  redis.on("error", (err: Error) => reachability.failed(redis, err));
  redis.on("ready", () => reachability.recovered(redis));
  redis.on("end", () => reachability.closed(redis));
  return redis;
}

function openCluster(url: string, options: RedisOptions): Redis {
  const address = parseClusterUrl(url);
  if (typeof address === "string") throw new Error(`${url}: ${address}`);
  const { nodes, username, password, tls } = address;
  const { retryStrategy, ...redisOptions } = options;
  const cluster = new Cluster(nodes, {
    redisOptions: { ...redisOptions, username, password, ...(tls && { tls: {} }) },
    enableAutoPipelining: options.enableAutoPipelining ?? false,
    enableReadyCheck: true,
    maxRedirections: 16,
    // Reconnects like a single Redis (ioredis' default), or not at all (failFast).
    clusterRetryStrategy: retryStrategy === undefined ? (times) => Math.min(times * 100, 2_000) : () => null,
  });
  return cluster as unknown as Redis;
}

/** While Redis stays unreachable, a line this often says so (with the errors held back). */
const STILL_DOWN_LOG_MS = 30_000;

/**
 * Whether one Redis answers, over all of this process's connections to it. Each connection errs on
 * every reconnect attempt (dozens of lines a second over a bridge's connections): instead, one line
 * when the first connection loses Redis, one when the last is back, and "still unreachable" every
 * STILL_DOWN_LOG_MS in between.
 */
class Reachability {
  private readonly down = new Set<Redis>();
  private downSince = 0;
  private lastLogAt = 0;
  private heldBack = 0;

  failed(connection: Redis, err: Error): void {
    const now = Date.now();
    this.down.add(connection);
    if (this.downSince === 0) {
      this.downSince = this.lastLogAt = now;
      this.heldBack = 0;
      log.warn({ err: err.message }, "Redis unreachable; commands wait until it is back");
    } else if (now - this.lastLogAt >= STILL_DOWN_LOG_MS) {
      this.lastLogAt = now;
      log.warn(
        {
          err: err.message,
          downForS: Math.round((now - this.downSince) / 1000),
          errorsHeldBack: this.heldBack,
        },
        "Redis still unreachable",
      );
      this.heldBack = 0;
    } else this.heldBack++;
  }

  recovered(connection: Redis): void {
    if (!this.down.delete(connection) || this.down.size > 0 || this.downSince === 0) return;
    log.info({ downForMs: Date.now() - this.downSince }, "Redis reachable again");
    this.downSince = 0;
  }

  /** A connection closed for good (the bridge stopping) waits for nothing any more. */
  closed(connection: Redis): void {
    if (this.down.delete(connection) && this.down.size === 0) this.downSince = 0;
  }
}

const reachabilities = new Map<string, Reachability>();

function reachabilityOf(url: string): Reachability {
  let r = reachabilities.get(url);
  if (!r) reachabilities.set(url, (r = new Reachability()));
  return r;
}

const COUNT_DOWN = `
local n = tonumber(redis.call("GET", KEYS[1]) or "0")
if n <= 0 then return 0 end
if n == 1 then redis.call("DEL", KEYS[1]) else redis.call("DECR", KEYS[1]) end
return 1`;

/** A KeyValueStore under one key prefix. */
export class RedisKeyValueStore implements KeyValueStore {
  constructor(
    private readonly redis: Redis,
    private readonly prefix: string,
  ) {}

  async get(key: string): Promise<string | undefined> {
    return (await this.redis.get(this.prefix + key)) ?? undefined;
  }

  async set(key: string, value: string, ttlMs?: number): Promise<void> {
    if (ttlMs === undefined) await this.redis.set(this.prefix + key, value);
    else await this.redis.set(this.prefix + key, value, "PX", ttlMs);
  }

  async delete(key: string): Promise<void> {
    await this.redis.del(this.prefix + key);
  }

  async getMap(key: string): Promise<Record<string, string>> {
    return this.redis.hgetall(this.prefix + key);
  }

  async setInMap(key: string, fields: Record<string, string>, ttlMs?: number): Promise<void> {
    const k = this.prefix + key;
    if (ttlMs === undefined) await this.redis.hset(k, fields);
    else await this.redis.multi().hset(k, fields).pexpire(k, ttlMs).exec();
  }

  async countUp(key: string, ttlMs: number): Promise<void> {
    const k = this.prefix + key;
    await this.redis.multi().incr(k).pexpire(k, ttlMs).exec();
  }

  async countDown(key: string): Promise<boolean> {
    return (await this.redis.eval(COUNT_DOWN, 1, this.prefix + key)) === 1;
  }
}
