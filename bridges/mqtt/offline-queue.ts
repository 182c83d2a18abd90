/**
 * A persistent session's queue of messages, delivered whole when its device connects.
 *
 * aedes-persistence-redis (11.2.2) hands aedes at most `maxSessionDelivery` (default 1,000) of the
 * queued messages at CONNECT (`LRANGE outgoing:<id> 0 1000`): the rest wait for the next
 * connection while newer messages overtake them. A larger limit would read all the keys of a queue
 * of any length at once, for one small CONNECT. Here the queue is read in pages, up to the message
 * that was last when the device connected (later ones reach it live).
 *
 * The list changes while it is read: a message the device acknowledges leaves it (aedes sends
 * and the device acknowledges while later pages are read), and new ones are appended. Messages
 * keep their order, and only those already handed over leave it, so the next page starts after the
 * last key handed over (LPOS), or, once that one is gone too, after the ones still waiting for an
 * acknowledgement at the head of the list. Each page is read in one step (an acknowledgement
 * cannot come between finding the last key and reading after it).
 * (Its layout — the list `outgoing:<client id>` of packet keys, each packet msgpack-encoded — is
 * checked in test/unit/dependency-internals.test.ts.)
 */
import { createRequire } from "node:module";
import { Readable } from "node:stream";
import type { Client } from "aedes";
import type { Redis } from "ioredis";

/** Keys read at a time. */
const PAGE = 100;
/** Keys handed over and remembered, to skip those still unacknowledged at the head of the list. */
const RECENT = 10 * PAGE;

/** The decoder of the persistence's own copy of msgpack-lite (the one it encodes with). */
const persistenceRequire = createRequire(createRequire(import.meta.url).resolve("aedes-persistence-redis"));
const msgpack = persistenceRequire("msgpack-lite") as { decode(buffer: Buffer): unknown };

/** Same as aedes-persistence-redis' outgoingKey(). */
export const outgoingKey = (clientId: string): string => `outgoing:${encodeURIComponent(clientId)}`;

export interface OutgoingPersistence {
  outgoingStream(client: Client): Readable;
}

/** Makes aedes read each session's queue through queuedMessages(). */
export function deliverWholeQueues(persistence: OutgoingPersistence, db: Redis): void {
  persistence.outgoingStream = (client) => Readable.from(queuedMessages(db, client.id));
}

/** The messages queued for `clientId` when called, oldest first, read PAGE keys at a time. */
export async function* queuedMessages(db: Redis, clientId: string): AsyncGenerator<unknown> {
  const list = outgoingKey(clientId);
  const [length, last] = await Promise.all([db.llen(list), db.lindex(list, -1)]);
  if (last === null) return;
  const recent = new Set<string>();
  let after: string | undefined; // the last key handed over
  let taken = 0;
  while (taken < length) {
    const keys = await nextPage(db, list, after, recent);
    if (keys.length === 0) return;
    const values = await db.mgetBuffer(...keys);
    for (let i = 0; i < keys.length; i++) {
      const key = keys[i]!;
      taken++;
      after = key;
      recent.add(key);
      if (recent.size > RECENT) recent.delete(recent.values().next().value!);
      const value = values[i];
      // A packet gone (expired) leaves the list, as aedes-persistence-redis does.
      if (value) yield msgpack.decode(value);
      else await db.lrem(list, 0, key);
      if (key === last || taken >= length) return;
    }
  }
}

/**
 * The PAGE keys after ARGV[1], or nil when it is no longer in the list. One step: an acknowledgement
 * between finding the key and reading after it would shift the list under the index.
 */
const PAGE_AFTER = `
local at = redis.call("LPOS", KEYS[1], ARGV[1])
if not at then return false end
return redis.call("LRANGE", KEYS[1], at + 1, at + tonumber(ARGV[2]))`;

async function nextPage(
  db: Redis,
  list: string,
  after: string | undefined,
  recent: Set<string>,
): Promise<string[]> {
  if (after === undefined) return db.lrange(list, 0, PAGE - 1);
  const page = (await db.eval(PAGE_AFTER, 1, list, after, PAGE)) as string[] | null;
  if (page !== null) return page;
  // The last one handed over is acknowledged: those before it still in the list come first.
  const head = await db.lrange(list, 0, RECENT + PAGE - 1);
  let skip = 0;
  while (skip < head.length && recent.has(head[skip]!)) skip++;
  return head.slice(skip, skip + PAGE);
}
