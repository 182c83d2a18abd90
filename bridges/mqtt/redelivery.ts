/**
 * Drops redelivered QoS>0 PUBLISHes, so a message re-sent after a lost PUBACK is relayed once.
 *
 * [MQTT-4.4.0-1] a sender re-sends unacknowledged PUBLISHes with their original Packet Identifier
 * after reconnecting; [MQTT-3.3.1-1] says it sets DUP, but common clients (mqtt.js among them) do
 * not. So a publish counts as a redelivery when it carries DUP, or when its packet id was last used
 * by an *earlier* connection of the same client for the same topic and payload and has not been
 * reused on this one. The record of (packet id → message) is written before the PUBACK, durably,
 * and forgotten after `windowMs`.
 */
import { createHash, randomUUID } from "node:crypto";
import type { KeyValueStore } from "../../src/connector.js";

interface Seen {
  connection: string;
  digest: string;
  remoteId: string;
}

export interface PublishIdentity {
  /** Stable id of this message for the core's dedupe: the same for a redelivery. */
  remoteId: string;
  redelivered: boolean;
}

function digestOf(topic: string, payload: Uint8Array): string {
  return createHash("sha1").update(topic).update("\0").update(payload).digest("base64url").slice(0, 16);
}

/** One per client connection (or per external-broker session connection). */
export class RedeliveryTracker {
  private readonly connection = randomUUID();
  private readonly usedHere = new Set<number>();
  private earlier: Promise<Map<number, Seen>> | undefined;
  private expirySetAt = 0;
  private sequence = 0;

  constructor(
    private readonly store: KeyValueStore,
    private readonly clientId: string,
    private readonly windowMs: number,
  ) {}

  private key(): string {
    return `redelivery:${this.clientId}`;
  }

  private loadEarlier(): Promise<Map<number, Seen>> {
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

  /** Call before acknowledging a QoS>0 publish; resolves once the record is durable. */
  async identify(
    messageId: number,
    dup: boolean,
    topic: string,
    payload: Uint8Array,
  ): Promise<PublishIdentity> {
    const digest = digestOf(topic, payload);
    const fresh = !this.usedHere.has(messageId);
    this.usedHere.add(messageId);
    if (fresh || dup) {
      const before = (await this.loadEarlier()).get(messageId);
      if (before && before.digest === digest && (dup || before.connection !== this.connection)) {
        return { remoteId: before.remoteId, redelivered: true };
      }
    }
    // A packet id is reused once acknowledged, so the sequence number keeps remote ids unique.
    const remoteId = `${this.clientId}/${this.connection}/${messageId}/${++this.sequence}`;
    const seen: Seen = { connection: this.connection, digest, remoteId };
    (await this.loadEarlier()).set(messageId, seen);
    // Refreshing the expiry on every write costs a command per message; every half window is enough.
    const now = Date.now();
    const refresh = now - this.expirySetAt > this.windowMs / 2;
    if (refresh) this.expirySetAt = now;
    await this.store.setInMap(
      this.key(),
      String(messageId),
      JSON.stringify(seen),
      refresh ? this.windowMs : undefined,
    );
    return { remoteId, redelivered: false };
  }
}

/** Identity of a QoS 0 message: it is never redelivered, so any unique id will do. */
export function qos0RemoteId(clientId: string): string {
  return `${clientId}/${randomUUID()}`;
}
