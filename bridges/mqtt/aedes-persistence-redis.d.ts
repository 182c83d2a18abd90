// aedes-persistence-redis ships no types; this is the part tribridge uses.
declare module "aedes-persistence-redis" {
  import type { Redis } from "ioredis";
  interface RedisPersistenceOptions {
    conn?: Redis;
    /** Offline messages delivered on CONNECT at most (default 1000). */
    maxSessionDelivery?: number;
  }
  interface RedisPersistence {
    /** The stored wills, but those of the brokers named in `brokers` (id → last heartbeat). */
    streamWill(brokers: Record<string, number>): AsyncIterable<{ clientId: string; brokerId: string }>;
    /** The QoS 2 publish a client sent with this packet id, held until its PUBREL; rejects if none. */
    incomingGetPacket(client: { id: string }, packet: { messageId?: number }): Promise<unknown>;
  }
  export default function redisPersistence(options?: RedisPersistenceOptions): RedisPersistence;
}
