/**
 * Which Matrix event each relayed message is, per connector account, both ways: event id ⇄ remote
 * id (`InboundMessage.remoteId`, `SendResult.remoteId`). Replies and threads are mapped through it
 * (an inbound `replyTo` → the event to answer; an event's `m.in_reply_to` → the remote id to answer),
 * and edits and redactions find the far side's copy of a message.
 *
 * Two small hashes per relayed message (and account), written together in one MULTI once the
 * message is relayed:
 *   `<prefix>:msg-event:<connector>.<account>:<eventId>`
 *       `in` → the remote id it came from (inbound); `out:<endpointId>` → the remote id `send`
 *       returned there (outbound); `sender` → its Matrix sender (outbound: edits are checked
 *       against it); `thread` → the root of the Matrix thread it is in
 *   `<prefix>:msg-remote:<connector>.<account>:<remoteId>`
 *       `<roomId>` → its event in that room (a remote message may be posted in several rooms);
 *       `<roomId>\0thread` → the root of that event's thread
 *
 * Retention (`retentionFor`): 90 days for a far side with conversations (`Capabilities.threads`:
 * mail threads are answered weeks later), 7 days otherwise (devices' telemetry, whose references
 * nobody follows: the same as a Matrix event's dedupe key). Every key a lookup finds starts its
 * retention again, so a conversation in use stays. Cost, measured (Redis 7, Message-ID-sized remote
 * ids): about 550 bytes of Redis memory per relayed message and account, both keys and their
 * expiry included — 10,000 messages a day kept 90 days take about 500 MB, kept 7 days about 40 MB.
 * Messages of `live: true` endpoints are not mapped (edited in place: nothing answers a reading).
 */
import { hash } from "node:crypto";
import type { Redis } from "ioredis";
import type { Capabilities } from "../connector.js";
import { redisKeys } from "./keys.js";

const DAY_MS = 24 * 3600 * 1000;

/** How long an account's references are kept after their last use (see the module comment). */
export function retentionFor(capabilities: Pick<Capabilities, "threads">): number {
  return (capabilities.threads ? 90 : 7) * DAY_MS;
}

/** Key names of the map (see the module comment; the families are named in keys.ts). */
export const messageMapKeys = {
  event: (prefix: string, ref: string, eventId: string) => redisKeys.messageEvent(prefix, ref, eventId),
  remote: (prefix: string, ref: string, remoteId: string) =>
    redisKeys.messageRemote(prefix, ref, remoteKeyPart(remoteId)),
};

/** Remote ids are the far side's (a Message-ID may be long): a long one is hashed into the key. */
function remoteKeyPart(remoteId: string): string {
  return remoteId.length <= 128 ? remoteId : `#${hash("sha256", remoteId, "hex")}`;
}

/** An event a remote message is, in one room. */
export interface MappedEvent {
  eventId: string;
  /** The root of the Matrix thread the event is in, if it is in one. */
  threadRoot?: string;
}

const THREAD = "\u0000thread";

type Results = [Error | null, unknown][];

/** The map of all accounts; `account` gives one account's view. */
export class MessageMap {
  constructor(
    private readonly redis: Redis,
    private readonly prefix: string,
  ) {}

  /** The map of `<connector>.<account>`, its keys kept `retentionMs` after their last use. */
  account(ref: string, retentionMs: number): AccountMessages {
    return new AccountMessages(this.redis, this.prefix, ref, retentionMs);
  }
}

export class AccountMessages {
  constructor(
    private readonly redis: Redis,
    private readonly prefix: string,
    readonly ref: string,
    readonly retentionMs: number,
  ) {}

  private eventKey(eventId: string): string {
    return messageMapKeys.event(this.prefix, this.ref, eventId);
  }

  private remoteKey(remoteId: string): string {
    return messageMapKeys.remote(this.prefix, this.ref, remoteId);
  }

  /** A remote message was posted in `roomId` as `eventId` (in the thread of `threadRoot`). */
  async received(remoteId: string, roomId: string, eventId: string, threadRoot?: string): Promise<void> {
    const eventFields: Record<string, string> = { in: remoteId };
    if (threadRoot !== undefined) eventFields.thread = threadRoot;
    const e = this.eventKey(eventId);
    const r = this.remoteKey(remoteId);
    await this.redis
      .multi()
      .hset(e, eventFields)
      .pexpire(e, this.retentionMs)
      .hset(r, this.remoteFields(roomId, eventId, threadRoot))
      .pexpire(r, this.retentionMs)
      .exec();
  }

  /**
   * `eventId`, sent by `sender` in `roomId` (in the thread of `threadRoot`), was delivered to
   * `endpointId`, whose `send` returned `remoteId`.
   */
  async sent(
    event: { eventId: string; roomId: string; sender: string; threadRoot?: string | undefined },
    endpointId: string,
    remoteId: string,
  ): Promise<void> {
    const eventFields: Record<string, string> = { [`out:${endpointId}`]: remoteId, sender: event.sender };
    if (event.threadRoot !== undefined) eventFields.thread = event.threadRoot;
    const e = this.eventKey(event.eventId);
    const r = this.remoteKey(remoteId);
    await this.redis
      .multi()
      .hset(e, eventFields)
      .pexpire(e, this.retentionMs)
      .hset(r, this.remoteFields(event.roomId, event.eventId, event.threadRoot))
      .pexpire(r, this.retentionMs)
      .exec();
  }

  /**
   * Another remote message stands for `eventId` (a correction mail the far side made of an edit):
   * what answers it answers the event. The event's own entry is left as it is.
   */
  async alsoKnownAs(remoteId: string, event: MappedEvent & { roomId: string }): Promise<void> {
    const r = this.remoteKey(remoteId);
    await this.redis
      .multi()
      .hset(r, this.remoteFields(event.roomId, event.eventId, event.threadRoot))
      .pexpire(r, this.retentionMs)
      .exec();
  }

  private remoteFields(
    roomId: string,
    eventId: string,
    threadRoot: string | undefined,
  ): Record<string, string> {
    const fields: Record<string, string> = { [roomId]: eventId };
    if (threadRoot !== undefined) fields[roomId + THREAD] = threadRoot;
    return fields;
  }

  /** The events of remote messages in `roomId`, in the order asked (undefined: not known). */
  async eventsIn(
    roomId: string,
    remoteIds: readonly (string | undefined)[],
  ): Promise<(MappedEvent | undefined)[]> {
    const asked = remoteIds.filter((id): id is string => id !== undefined);
    if (asked.length === 0) return remoteIds.map(() => undefined);
    const multi = this.redis.multi();
    for (const id of asked) {
      const key = this.remoteKey(id);
      multi.hmget(key, roomId, roomId + THREAD).pexpire(key, this.retentionMs);
    }
    const results = (await multi.exec()) as Results;
    const found = new Map<string, MappedEvent>();
    asked.forEach((id, i) => {
      const [eventId, threadRoot] = (results[2 * i]?.[1] ?? []) as (string | null)[];
      if (eventId) found.set(id, threadRoot ? { eventId, threadRoot } : { eventId });
    });
    return remoteIds.map((id) => (id === undefined ? undefined : found.get(id)));
  }

  /**
   * The remote ids of events in this account, in the order asked (undefined: not known): what
   * `send` returned on `endpointId`, else the id the event came in with, else what another
   * endpoint of the account was sent.
   */
  async remoteIdsOf(
    endpointId: string,
    eventIds: readonly (string | undefined)[],
  ): Promise<(string | undefined)[]> {
    const asked = eventIds.filter((id): id is string => id !== undefined);
    if (asked.length === 0) return eventIds.map(() => undefined);
    const multi = this.redis.multi();
    for (const id of asked) {
      const key = this.eventKey(id);
      multi.hgetall(key).pexpire(key, this.retentionMs);
    }
    const results = (await multi.exec()) as Results;
    const found = new Map<string, string>();
    asked.forEach((id, i) => {
      const fields = (results[2 * i]?.[1] ?? {}) as Record<string, string>;
      const anyOut = Object.entries(fields).find(([field]) => field.startsWith("out:"))?.[1];
      const remoteId = fields[`out:${endpointId}`] ?? fields.in ?? anyOut;
      if (remoteId !== undefined) found.set(id, remoteId);
    });
    return eventIds.map((id) => (id === undefined ? undefined : found.get(id)));
  }

  /**
   * What `send` returned for `eventId` on `endpointId`, who sent the event, and the root of its
   * thread; undefined if it was not sent there (or long ago).
   */
  async sentTo(
    endpointId: string,
    eventId: string,
  ): Promise<{ remoteId: string; sender: string; threadRoot?: string } | undefined> {
    const key = this.eventKey(eventId);
    const results = (await this.redis
      .multi()
      .hmget(key, `out:${endpointId}`, "sender", "thread")
      .pexpire(key, this.retentionMs)
      .exec()) as Results;
    const [remoteId, sender, threadRoot] = (results[0]?.[1] ?? []) as (string | null)[];
    if (!remoteId) return undefined;
    return threadRoot ? { remoteId, sender: sender ?? "", threadRoot } : { remoteId, sender: sender ?? "" };
  }
}
