// aedes-persistence-redis ships no types; this is the part tribridge uses.
declare module "aedes-persistence-redis" {
  import type { Redis } from "ioredis";
  interface RedisPersistenceOptions {
    conn?: Redis;
    /** Offline messages delivered on CONNECT at most (default 1000). */
    maxSessionDelivery?: number;
  }
  export default function redisPersistence(options?: RedisPersistenceOptions): unknown;
}
