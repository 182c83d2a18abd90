/**
 * Every Redis key family tribridge writes, in one place. All keys live under the config's
 * `queue.prefix` (`<prefix>:…`), so several bridges can share one Redis and a test can delete
 * everything of its own with `<prefix>:*`. On a Redis Cluster `<prefix>` is the hash tag `{<queue.prefix>}`
 * (redisKeyPrefix in redis-url.ts): every key of the bridge is then in one slot, so a MULTI or script
 * may combine any of the families below. Connectors never import this module: the core hands them
 * their two prefixes through the ConnectorContext (`store`, `redis.keyPrefix`).
 *
 * Besides the families below, BullMQ keeps each queue under `<prefix>:<queue>:…`, where `<queue>`
 * is a shard (`to-matrix-3`) or a failed list (`to-matrix-failed`); queue names never contain '.'
 * or ':' and so never collide with a connector's `<connector>.<account>`.
 */
export const redisKeys = {
  /** A homeserver transaction (fingerprint: txnId and body) fully handled; kept while it may be retried. */
  transaction: (prefix: string, fingerprint: string) => `${prefix}:txn:${fingerprint}`,
  /**
   * A Matrix event already relayed or answered ("1"), or being handled ("claim:<uuid>", for a
   * while): the dedupe that does not trust txnIds alone (see seen-events.ts).
   */
  seenEvent: (prefix: string, eventId: string) => `${prefix}:seen-event:${eventId}`,
  /** A room known to be end-to-end encrypted (see encrypted-rooms.ts), for every instance to read. */
  encryptedRoom: (prefix: string, roomId: string) => `${prefix}:encrypted-room:${roomId}`,
  /** The room was told that tribridge cannot use it while encrypted: the notice goes once. */
  encryptionNotice: (prefix: string, roomId: string) => `${prefix}:encryption-notice:${roomId}`,
  /** A sender was told why their message was not relayed (permissions.ts): told again after a while. */
  refusalNotice: (prefix: string, roomId: string, userId: string) =>
    `${prefix}:refusal-notice:${roomId}:${userId}`,
  /**
   * A room message's delivery (delivery-feedback.ts): its outcome per endpoint, and the event ids
   * of the marks the bot put on it.
   */
  deliveryMarks: (prefix: string, eventId: string) => `${prefix}:delivery:${eventId}`,
  /** A live stream (room, endpoint, sender, stream; hashed) → the event its next reading edits. */
  liveStream: (prefix: string, streamHash: string) => `${prefix}:live:${streamHash}`,
  /** A live message's event id → its liveStream key, so that a redaction finds its stream. */
  liveEvent: (prefix: string, eventId: string) => `${prefix}:live-event:${eventId}`,
  /** Ghosts shown online or unavailable (user id → display name, state), whose presence is kept up. */
  presenceKept: (prefix: string) => `${prefix}:presence-kept`,
  /** Held by the instance whose turn it is to set the kept presence again (one per round). */
  presenceRound: (prefix: string) => `${prefix}:presence-round`,
  /** A device's status line (room, endpoint, sender; hashed) → the state it shows (availability.ts). */
  availabilityShown: (prefix: string, lineHash: string) => `${prefix}:availability:${lineHash}`,
  /**
   * A relayed message's event → its remote ids in one connector account (`in`, `out:<endpointId>`),
   * its sender and thread root (src/store/message-map.ts).
   */
  messageEvent: (prefix: string, ref: string, eventId: string) => `${prefix}:msg-event:${ref}:${eventId}`,
  /** A remote id of one connector account (long ones hashed) → its event per room, and thread root. */
  messageRemote: (prefix: string, ref: string, remoteKeyPart: string) =>
    `${prefix}:msg-remote:${ref}:${remoteKeyPart}`,
  /**
   * The routes' endpoints (ids, in config order) at the first start of a version with stable
   * endpoint ids: how positional ids queued by earlier versions are read (legacy-endpoint-ids.ts).
   */
  endpointLayout: (prefix: string) => `${prefix}:endpoint-layout`,
  /**
   * Routes linked from rooms (`!tribridge link`): a hash of room id → that room's links, as given
   * (src/routing/room-links.ts).
   */
  roomLinks: (prefix: string) => `${prefix}:room-links`,
  /** A pub/sub channel, not a key: told the room id whenever an instance changed roomLinks. */
  roomLinksChanged: (prefix: string) => `${prefix}:room-links-changed`,
  /** The claim of the process running as instance `id` (see instance-id.ts). */
  instanceClaim: (prefix: string, id: string) => `${prefix}:instance:${id}`,
  /** Written by GET /ready to check that Redis takes writes. */
  readyProbe: (prefix: string) => `${prefix}:ready-probe`,
  /** Which instance consumes a shard queue (`to-matrix-3`). */
  shardLease: (prefix: string, shardQueue: string) => `${prefix}:lease:${shardQueue}`,
  /** Which instance runs a connector account's exclusive work `name` (ctx.runExclusive: a mailbox's reader). */
  connectorLease: (prefix: string, ref: string, name: string) => `${prefix}:lease:${ref}:${name}`,
  /** The shard count a queue's items were written with (`to-matrix`, not a shard). */
  shardCount: (prefix: string, queue: string) => `${prefix}:${queue}:shard-count`,
  /** BullMQ's own lock of an active job (bullmq 5's key layout): read and broken, never written. */
  jobLock: (prefix: string, shardQueue: string, jobId: string) => `${prefix}:${shardQueue}:${jobId}:lock`,
  /** A connector account's KeyValueStore (`ctx.store`): `<prefix>:kv:<connector>.<account>:<key>`. */
  connectorStore: (prefix: string, ref: string) => `${prefix}:kv:${ref}:`,
  /** Keys a connector account's own libraries keep (`ctx.redis.keyPrefix`: a library's own persistence). */
  connectorOwn: (prefix: string, ref: string) => `${prefix}:${ref}:`,
} as const;
