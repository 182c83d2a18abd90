/**
 * Encrypted room events whose room key has not arrived yet (a client sends the key to our device
 * as a to-device message, which may come after the event, or after a restart). Kept in Redis
 * before the transaction that brought them is acknowledged, so none is lost to a crash; tried
 * again when a key of their session arrives, and at start. Bounded: past `MAX_WAITING` the oldest
 * is given up, with a log line.
 */
import type { Redis } from "ioredis";
import type { MatrixEvent } from "../appservice-server.js";

export interface WaitingEvent {
  event: MatrixEvent;
  sessionId: string;
  since: number;
  /** Why it could not be decrypted, the last time it was tried. */
  reason: string;
}

export const MAX_WAITING = 10_000;

export class WaitingEvents {
  private readonly key: string;

  constructor(
    private readonly redis: Redis,
    prefix: string,
  ) {
    this.key = `${prefix}:e2e-waiting`;
  }

  /** Keeps the event; returns the events given up to stay within the bound. */
  async add(waiting: WaitingEvent): Promise<WaitingEvent[]> {
    await this.redis.hset(this.key, waiting.event.event_id, JSON.stringify(waiting));
    if ((await this.redis.hlen(this.key)) <= MAX_WAITING) return [];
    const all = await this.all();
    const oldest = all.sort((a, b) => a.since - b.since).slice(0, all.length - MAX_WAITING);
    await this.remove(oldest.map((w) => w.event.event_id));
    return oldest;
  }

  async all(): Promise<WaitingEvent[]> {
    const values = await this.redis.hvals(this.key);
    return values.map((v) => JSON.parse(v) as WaitingEvent);
  }

  async remove(eventIds: readonly string[]): Promise<void> {
    if (eventIds.length > 0) await this.redis.hdel(this.key, ...eventIds);
  }
}
