/**
 * What one SUBSCRIBE may cost the embedded broker, and what a persistent session keeps of it.
 *
 * aedes (1.2.0) stores a SUBSCRIBE's filters once per filter, each time the packet's whole list
 * (lib/handlers/subscribe.js: storeSubscriptions calls persistence.addSubscriptions(client,
 * packet.subscriptions) for every filter). With n filters on a persistent session that is n Redis
 * writes of n entries and n broadcasts of all n: time and memory quadratic in the packet (800
 * filters: 48 s, 1.4 GB, every other client stalled for 12 s). The list it stores also holds the
 * filters that were refused (SUBACK 0x80), and the queue of an offline session then keeps messages
 * for them, in a Redis that never evicts.
 *
 * Here a packet's subscriptions are stored once, and only those granted; a session restored at
 * CONNECT loses the filters its user may no longer subscribe to; and a SUBSCRIBE's filters beyond
 * `maxFilters` are refused, each with SUBACK 0x80. (MQTT 3.1.1 sets no limit: the SUBACK must
 * carry a return code for every filter, granted or failed [MQTT-3.8.4-5], and 0x80 is that
 * failure [MQTT-3.9.3-2]. Closing the connection instead is meant for protocol violations [§4.8],
 * and a device would reconnect and send the same SUBSCRIBE again, forever.)
 * (The aedes internals used, `client._parser` and the calls to addSubscriptions, are checked in
 * test/unit/dependency-internals.test.ts.)
 */
import type { Client, Subscription } from "aedes";
import type { Logger } from "../../src/log.js";

/** The part of aedes' persistence (aedes-persistence-redis) whose session writes go through here. */
export interface SubscriptionPersistence {
  addSubscriptions(client: Client, subs: Subscription[], cb?: unknown): Promise<unknown> | void;
  removeSubscriptions(client: Client, topics: string[], cb?: unknown): Promise<unknown> | void;
}

/** The storing of one SUBSCRIBE's filters, shared by the calls aedes makes for each of them. */
interface PacketStore {
  stored: WeakSet<Subscription>;
  next: Promise<unknown> | undefined;
}

export class SessionSubscriptions {
  /** Filters that arrived in a SUBSCRIBE (any others aedes authorizes are a session's, restored). */
  private readonly fromPacket = new WeakSet<Subscription>();
  /** Filters past the per-packet limit. */
  private readonly overLimit = new WeakSet<Subscription>();
  /** Each granted filter → the subscription granted for it. */
  private readonly granted = new WeakMap<Subscription, Subscription>();
  private readonly packets = new WeakMap<Subscription[], PacketStore>();
  /** Restored filters to take out of each client's session (see authorize). */
  private readonly revoked = new Map<Client, string[]>();
  private readonly addSubscriptions: (client: Client, subs: Subscription[]) => Promise<unknown>;
  private readonly removeSubscriptions: (client: Client, topics: string[]) => Promise<unknown>;

  constructor(
    private readonly persistence: SubscriptionPersistence,
    private readonly maxFilters: number,
    private readonly log: Logger,
  ) {
    const add = persistence.addSubscriptions.bind(persistence);
    this.addSubscriptions = add as typeof this.addSubscriptions;
    this.removeSubscriptions = persistence.removeSubscriptions.bind(
      persistence,
    ) as typeof this.removeSubscriptions;
    // aedes calls it without a callback, for a promise; anyone else is passed through
    persistence.addSubscriptions = (client, subs, cb) =>
      cb === undefined ? this.storeGranted(client, subs) : add(client, subs, cb);
  }

  /** Watches a connection's packets as they are parsed, before aedes handles them. */
  watch(client: Client): void {
    const parser = (client as Client & { _parser?: import("node:events").EventEmitter })._parser;
    parser?.prependListener("packet", (packet: { cmd?: string; subscriptions?: Subscription[] }) => {
      if (packet.cmd !== "subscribe" || !packet.subscriptions) return;
      const subs = packet.subscriptions;
      for (const sub of subs) this.fromPacket.add(sub);
      if (subs.length <= this.maxFilters) return;
      for (let i = this.maxFilters; i < subs.length; i++) this.overLimit.add(subs[i]!);
      this.log.warn(
        { clientId: client.id, filters: subs.length, maxFiltersPerSubscribe: this.maxFilters },
        "mqtt subscribe: filters past maxFiltersPerSubscribe refused (SUBACK 0x80)",
      );
    });
  }

  /**
   * aedes' authorizeSubscribe, around the ACL's `decide`: a filter past the packet's limit is refused
   * without asking it. A restored filter that `decide` now refuses leaves the session.
   */
  authorize(client: Client, sub: Subscription, decide: () => Subscription | null): Subscription | null {
    if (this.overLimit.has(sub)) return null; // SUBACK 0x80 [MQTT-3.9.3-2]
    const granted = decide();
    if (granted) this.granted.set(sub, granted);
    else if (!this.fromPacket.has(sub) && !client.clean) this.revoke(client, sub.topic);
    return granted;
  }

  /**
   * Called by aedes once per granted filter of a SUBSCRIBE, each time with the packet's whole list:
   * the first call stores the granted ones, and the others wait for the same write. (aedes
   * authorizes all of a packet's filters before the next microtask when the ACL answers at once, as
   * ours does; one granted later is stored by a write of its own.)
   */
  private storeGranted(client: Client, subs: Subscription[]): Promise<unknown> {
    let packet = this.packets.get(subs);
    if (!packet) this.packets.set(subs, (packet = { stored: new WeakSet(), next: undefined }));
    const store = packet;
    store.next ??= Promise.resolve().then(() => {
      store.next = undefined;
      const fresh: Subscription[] = [];
      for (const sub of subs) {
        const granted = this.granted.get(sub);
        if (granted && !store.stored.has(sub)) {
          store.stored.add(sub);
          fresh.push(granted);
        }
      }
      return fresh.length > 0 ? this.addSubscriptions(client, fresh) : undefined;
    });
    return store.next;
  }

  /** Takes restored filters the user may no longer have out of the stored session, one write per CONNECT. */
  private revoke(client: Client, topic: string): void {
    const pending = this.revoked.get(client);
    if (pending) return void pending.push(topic);
    this.revoked.set(client, [topic]);
    queueMicrotask(() => {
      const topics = this.revoked.get(client) ?? [];
      this.revoked.delete(client);
      this.log.warn(
        { clientId: client.id, filters: topics.slice(0, 10), count: topics.length },
        "mqtt session: subscriptions its user may no longer have removed",
      );
      this.removeSubscriptions(client, topics).catch((err: unknown) =>
        this.log.warn(
          { clientId: client.id, err: (err as Error).message },
          "mqtt session: removing refused subscriptions failed",
        ),
      );
    });
  }
}
