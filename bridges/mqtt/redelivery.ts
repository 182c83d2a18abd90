/**
 * Drops redelivered QoS>0 PUBLISHes, so a message re-sent after a lost PUBACK is relayed once.
 *
 * A publish is a redelivery only when its sender says so and can mean it: DUP set [MQTT-3.3.1-1],
 * with the packet id, topic and payload of a publish the same client sent before, on this
 * connection or, when this connection resumed the session (CONNACK session present 1), on an
 * earlier one [MQTT-4.4.0-1]. Anything else is a new message, whatever its packet id, topic and
 * payload: a device that rebooted numbers its packets from 1 again and may well say "ON" twice,
 * and a client that re-sends without DUP (mqtt.js does) cannot be told apart from it. Such a
 * re-send is relayed again: a duplicate in the room, where the other way would silently lose what
 * the device said. The record (packet id → message) is written before the PUBACK, durably, and
 * counts for `windowMs`.
 */
import { hash, randomUUID } from "node:crypto";
import type { KeyValueStore } from "../../src/connector.js";

interface Seen {
  digest: string;
  remoteId: string;
  /** ms since epoch */
  at: number;
  /** The session's epoch (absent in records written before there were epochs: those count in any). */
  epoch?: string;
}

export interface PublishIdentity {
  /** Stable id of this message for the core's dedupe: the same for a redelivery. */
  remoteId: string;
  redelivered: boolean;
}

/** What a resumed connection knows of its session. */
interface Session {
  /** Drawn when the session starts: ids derive from it, so no two sessions derive the same ids. */
  epoch: string;
  /** Whether the epoch is in the store yet (ids derived from it wait for that). */
  epochDurable: boolean;
  /** The session's records by packet id: this connection's, and earlier ones' when resumed. */
  earlier: Map<number, Seen>;
}

/** The field of a client's record map that holds its session's epoch (packet ids are numbers). */
const EPOCH_FIELD = "epoch";

function digestOf(topic: string, payload: Uint8Array): string {
  return hash("sha1", Buffer.concat([Buffer.from(`${topic}\0`), payload]), "base64url").slice(0, 16);
}

/**
 * One per client connection (or per external-broker session connection).
 *
 * A message's remote id is derived, not drawn: from its packet id, topic and payload, and the id of
 * the message that used the packet id before it in the session (or the session's epoch). The record
 * is written while the message is enqueued; should a crash keep the enqueue and lose the record,
 * the re-send finds the same record before it (a packet id is reused only once acknowledged, and a
 * message is acknowledged only once its record is durable), derives the same id, and the core
 * relays an id once (the queue keeps a batch it holds once, and the Matrix transaction id derives
 * from it). Ids drawn at random made the re-send a second message.
 */
export class RedeliveryTracker {
  private session: Promise<Session> | undefined;
  private expirySetAt = 0;
  private unwritten:
    { fields: Record<string, string>; refreshExpiry: boolean; written: Promise<void> } | undefined;

  constructor(
    private readonly store: KeyValueStore,
    private readonly clientId: string,
    private readonly windowMs: number,
    /** This connection resumed the client's session (session present), so earlier connections' records count. */
    private readonly resumed = true,
  ) {}

  private key(): string {
    return `redelivery:${this.clientId}`;
  }

  private loadSession(): Promise<Session> {
    this.session ??= this.resumed ? this.resume() : this.startSession();
    return this.session;
  }

  /** [MQTT-4.4.0-1] A new session: nothing of an earlier one can be redelivered, its records go. */
  private async startSession(): Promise<Session> {
    await this.store.delete(this.key());
    return { epoch: randomUUID(), epochDurable: false, earlier: new Map() };
  }

  private async resume(): Promise<Session> {
    const fields = await this.store.getMap(this.key());
    const epoch = fields[EPOCH_FIELD];
    const earlier = new Map<number, Seen>();
    for (const [id, value] of Object.entries(fields)) {
      if (id === EPOCH_FIELD) continue;
      try {
        const seen = JSON.parse(value) as Seen;
        // A record of an earlier session written late (by a connection taken over) is not ours.
        if (seen.epoch === undefined || seen.epoch === epoch) earlier.set(Number(id), seen);
      } catch {
        // an unreadable record only means we cannot detect that one redelivery
      }
    }
    // No epoch: the records expired (or were written before epochs); one is drawn now.
    if (epoch === undefined) return { epoch: randomUUID(), epochDurable: false, earlier };
    return { epoch, epochDurable: true, earlier };
  }

  /** Call before acknowledging a QoS>0 publish; resolves once the record is durable. */
  async identify(
    messageId: number,
    dup: boolean,
    topic: string,
    payload: Uint8Array,
  ): Promise<PublishIdentity> {
    const { durable, ...identity } = await this.lookup(messageId, dup, topic, payload);
    await durable;
    return identity;
  }

  /**
   * `identify` for the hot path: resolves as soon as the identity is known, so the message can be
   * enqueued while its record is written; acknowledge only once both are done. (Should the enqueue
   * succeed and the record be lost, the re-send derives the same id: see the class comment.)
   */
  async lookup(
    messageId: number,
    dup: boolean,
    topic: string,
    payload: Uint8Array,
  ): Promise<PublishIdentity & { durable: Promise<void> }> {
    const digest = digestOf(topic, payload);
    const session = await this.loadSession();
    const before = session.earlier.get(messageId);
    const now = Date.now();
    if (dup && before !== undefined && now - before.at < this.windowMs && before.digest === digest) {
      return { remoteId: before.remoteId, redelivered: true, durable: Promise.resolve() };
    }
    const chain = before?.remoteId ?? `epoch ${session.epoch}`;
    const derived = hash("sha256", `${chain}\0${messageId}\0${digest}`, "base64url").slice(0, 22);
    const remoteId = `${this.clientId}/${messageId}/${derived}`;
    const seen: Seen = { digest, remoteId, at: now, epoch: session.epoch };
    session.earlier.set(messageId, seen);
    // Refreshing the expiry on every write costs a command per message; every half window is enough.
    const refresh = now - this.expirySetAt > this.windowMs / 2;
    if (refresh) this.expirySetAt = now;
    const durable = this.record(messageId, seen, refresh, session);
    // Ids derived from an epoch that a crash could lose could not be derived again: the first
    // messages of a session wait for it (with their records) before they are enqueued.
    if (!session.epochDurable) await durable;
    return { remoteId, redelivered: false, durable };
  }

  /** Writes the records of one tick together: a device sending fast costs one write per tick. */
  private record(messageId: number, seen: Seen, refreshExpiry: boolean, session: Session): Promise<void> {
    let batch = this.unwritten;
    if (!batch) {
      const created = {
        fields: {} as Record<string, string>,
        refreshExpiry: false,
        written: Promise.resolve(),
      };
      created.written = new Promise<void>((resolve, reject) =>
        setImmediate(() => {
          this.unwritten = undefined;
          const ttl = created.refreshExpiry ? this.windowMs : undefined;
          const withEpoch = EPOCH_FIELD in created.fields;
          this.store.setInMap(this.key(), created.fields, ttl).then(() => {
            if (withEpoch) session.epochDurable = true;
            resolve();
          }, reject);
        }),
      );
      this.unwritten = batch = created;
    }
    if (!session.epochDurable) batch.fields[EPOCH_FIELD] = session.epoch;
    batch.fields[String(messageId)] = JSON.stringify(seen);
    batch.refreshExpiry ||= refreshExpiry;
    return batch.written;
  }
}

/** Identity of a QoS 0 message: it is never redelivered, so any unique id will do. */
export function qos0RemoteId(clientId: string): string {
  return `${clientId}/${randomUUID()}`;
}
