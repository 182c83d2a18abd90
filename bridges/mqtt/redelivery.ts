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
 * the device said. The record (packet id → message) is written durably before the message is
 * enqueued (see identify), and counts for `windowMs`.
 */
import { hash, randomUUID } from "node:crypto";
import type { KeyValueStore } from "../../src/connector.js";

interface Seen {
  connection: string;
  digest: string;
  remoteId: string;
  /** ms since epoch */
  at: number;
}

export interface PublishIdentity {
  /** Stable id of this message for the core's dedupe: the same for a redelivery. */
  remoteId: string;
  redelivered: boolean;
}

function digestOf(topic: string, payload: Uint8Array): string {
  return hash("sha1", Buffer.concat([Buffer.from(`${topic}\0`), payload]), "base64url").slice(0, 16);
}

/** One per client connection (or per external-broker session connection). */
export class RedeliveryTracker {
  private readonly connection = randomUUID();
  private earlier: Promise<Map<number, Seen>> | undefined;
  private expirySetAt = 0;
  private sequence = 0;
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

  private loadEarlier(): Promise<Map<number, Seen>> {
    if (!this.resumed) this.earlier ??= Promise.resolve(new Map());
    this.earlier ??= this.store.getMap(this.key()).then((fields) => {
      const map = new Map<number, Seen>();
      for (const [id, value] of Object.entries(fields)) {
        try {
          map.set(Number(id), JSON.parse(value) as Seen);
        } catch {
          // an unreadable record only means we cannot detect that one redelivery
        }
      }
      return map;
    });
    return this.earlier;
  }

  /**
   * Call before enqueueing a QoS>0 publish; resolves once its record is durable. Enqueue only then
   * (and acknowledge once enqueued): a crash in between leaves a record without an enqueue, and
   * the re-send is enqueued under the recorded id — a redelivery is enqueued again, never dropped,
   * and the core relays an id once. The other order would leave an enqueue without a record, and
   * the re-send would be relayed as a second message.
   */
  async identify(
    messageId: number,
    dup: boolean,
    topic: string,
    payload: Uint8Array,
  ): Promise<PublishIdentity> {
    const digest = digestOf(topic, payload);
    // This connection's records, and earlier connections' when the session was resumed.
    const earlier = await this.loadEarlier();
    const now = Date.now();
    if (dup) {
      const before = earlier.get(messageId);
      const recent = before !== undefined && now - before.at < this.windowMs;
      if (recent && before.digest === digest) return { remoteId: before.remoteId, redelivered: true };
    }
    // A packet id is reused once acknowledged, so the sequence number keeps remote ids unique.
    const remoteId = `${this.clientId}/${this.connection}/${messageId}/${++this.sequence}`;
    const seen: Seen = { connection: this.connection, digest, remoteId, at: now };
    earlier.set(messageId, seen);
    // Refreshing the expiry on every write costs a command per message; every half window is enough.
    const refresh = now - this.expirySetAt > this.windowMs / 2;
    if (refresh) this.expirySetAt = now;
    await this.record(messageId, seen, refresh);
    return { remoteId, redelivered: false };
  }

  /** Writes the records of one tick together: a device sending fast costs one write per tick. */
  private record(messageId: number, seen: Seen, refreshExpiry: boolean): Promise<void> {
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
          this.store.setInMap(this.key(), created.fields, ttl).then(resolve, reject);
        }),
      );
      this.unwritten = batch = created;
    }
    batch.fields[String(messageId)] = JSON.stringify(seen);
    batch.refreshExpiry ||= refreshExpiry;
    return batch.written;
  }
}

/** Identity of a QoS 0 message: it is never redelivered, so any unique id will do. */
export function qos0RemoteId(clientId: string): string {
  return `${clientId}/${randomUUID()}`;
}
