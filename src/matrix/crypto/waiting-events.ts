/**
 * Encrypted room events whose room key has not arrived yet (a client sends the key to our device
 * as a to-device message, which may come after the event, or after a restart). Kept in Redis
 * before the transaction that brought them is acknowledged, so none is lost to a crash; tried
 * again when a key of their session arrives, and at start.
 *
 * Bounded twice, the oldest given up first (and returned, to be logged): `MAX_WAITING_PER_SENDER`
 * per sender, so that one member sending events nobody can decrypt (a broken client, or on
 * purpose) cannot push out everyone else's; and `MAX_WAITING` in all. Indexes by age, sender and
 * session keep each step small whatever is waiting.
 *
 * Keys under `<prefix>:e2e-waiting`: the hash of events by id, a sorted set by age over all, one
 * per sender, and a set of event ids per Megolm session.
 */
import type { ChainableCommander, Redis } from "ioredis";
import type { MatrixEvent } from "../appservice-server.js";

export interface WaitingEvent {
  event: MatrixEvent;
  sessionId: string;
  since: number;
  /** Why it could not be decrypted, the last time it was tried. */
  reason: string;
}

export const MAX_WAITING = 10_000;
export const MAX_WAITING_PER_SENDER = 1_000;

export class WaitingEvents {
  private readonly key: string;

  constructor(
    private readonly redis: Redis,
    prefix: string,
    private readonly limits = { total: MAX_WAITING, perSender: MAX_WAITING_PER_SENDER },
  ) {
    this.key = `${prefix}:e2e-waiting`;
  }

  /** Keeps the event; returns the events given up to stay within the bounds. */
  async add(waiting: WaitingEvent): Promise<WaitingEvent[]> {
    const id = waiting.event.event_id;
    const bySender = this.bySender(waiting.event.sender);
    await execAll(
      this.redis
        .multi()
        .hset(this.key, id, JSON.stringify(waiting))
        .zadd(this.byAge(), waiting.since, id)
        .zadd(bySender, waiting.since, id)
        .sadd(this.bySession(waiting.sessionId), id),
    );
    const givenUp = [
      ...(await this.oldestPast(bySender, this.limits.perSender)),
      ...(await this.oldestPast(this.byAge(), this.limits.total)),
    ];
    await this.remove(givenUp.map((w) => w.event.event_id));
    return givenUp;
  }

  async all(): Promise<WaitingEvent[]> {
    const values = await this.redis.hvals(this.key);
    return values.map((v) => JSON.parse(v) as WaitingEvent);
  }

  /** The events waiting for a key of one of `sessionIds`. */
  async ofSessions(sessionIds: Iterable<string>): Promise<WaitingEvent[]> {
    const ids = new Set<string>();
    for (const session of sessionIds)
      for (const id of await this.redis.smembers(this.bySession(session))) ids.add(id);
    return this.byIds([...ids]);
  }

  async remove(eventIds: readonly string[]): Promise<void> {
    if (eventIds.length === 0) return;
    const found = await this.byIds(eventIds);
    const tx = this.redis
      .multi()
      .hdel(this.key, ...eventIds)
      .zrem(this.byAge(), ...eventIds);
    for (const w of found)
      tx.zrem(this.bySender(w.event.sender), w.event.event_id).srem(
        this.bySession(w.sessionId),
        w.event.event_id,
      );
    await execAll(tx);
  }

  /** The oldest events of an index past its first `limit`. */
  private async oldestPast(index: string, limit: number): Promise<WaitingEvent[]> {
    const excess = (await this.redis.zcard(index)) - limit;
    if (excess <= 0) return [];
    return this.byIds(await this.redis.zrange(index, 0, excess - 1));
  }

  /** The events of these ids still waiting. */
  async byIds(eventIds: readonly string[]): Promise<WaitingEvent[]> {
    if (eventIds.length === 0) return [];
    const values = await this.redis.hmget(this.key, ...eventIds);
    return values.filter((v): v is string => v !== null).map((v) => JSON.parse(v) as WaitingEvent);
  }

  private byAge(): string {
    return `${this.key}:by-age`;
  }

  private bySender(userId: string): string {
    return `${this.key}:by-sender:${userId}`;
  }

  private bySession(sessionId: string): string {
    return `${this.key}:by-session:${sessionId}`;
  }
}

/** Runs a MULTI; a command that failed inside it fails the whole (ioredis only reports it). */
async function execAll(tx: ChainableCommander): Promise<void> {
  const results = await tx.exec();
  if (!results) throw new Error("Redis discarded the transaction");
  for (const [err] of results) if (err) throw err;
}
