/**
 * The one schema of config.yaml. It gives the TypeScript types, the validation (every error names
 * its path), the generated `config/config.sample.yaml` and `config/config.schema.json`.
 * Connector-specific parts (accounts, endpoint fields) come from each ConnectorDefinition.
 */
import { z } from "zod";
import type { ConnectorDefinition } from "../connector.js";
import { EXPLICIT_ID } from "./endpoint-ids.js";
import { isClusterUrl, parseClusterUrl } from "../store/redis-url.js";

/** Every default in one place, with its unit. */
export const DEFAULTS = {
  appserviceBind: "127.0.0.1",
  appservicePort: 9993,
  botLocalpart: "tribridge",
  botDisplayName: "tribridge",
  ghostPrefix: "_tb_",
  roomAliasPrefix: "tribridge_", // #tribridge_greenhouse:example.org: reserved up front for later routes
  queuePrefix: "tribridge",
  queueShards: 16, // rooms are hashed onto shards; a shard relays one batch at a time, each room in order
  maxAttempts: 12, // per message, counting failures that can be its own; with the delays below ≈ 8 minutes
  downAfterFailures: 3, // in a row, with nothing getting through: the destination is down, its messages wait
  maxProbeDelayMs: 1_000, // between two probes of a destination that is down: how soon delivery resumes
  stillDownLogMs: 60_000, // 1 minute: how often a destination that stays down is logged again
  initialRetryDelayMs: 500,
  maxRetryDelayMs: 60_000, // 1 minute
  keepCompletedJobs: 1000, // per shard, for inspection; dedupe of Matrix events does not depend on it
  keepFailedJobs: 10_000, // per shard; the failed list
  maxBacklogMb: 256, // per queue, in Redis; beyond it new messages are held at their source
  // AOF fsync of the embedded Redis. everysec: a power loss or kernel crash can lose ~1 s of
  // acknowledged messages (2 s on a slow disk); always: nothing, at the cost measured in the bench.
  fsync: "everysec",
  dataDir: "./data",
  metricsBind: "127.0.0.1",
  metricsPort: 9464, // the port Prometheus exporters commonly use for application metrics
  relayPowerLevel: 50, // moderators: Matrix clients' default level for "Moderator"
  feedbackMarks: "reaction",
  acceptedMark: "✅",
  waitingMark: "⏳",
} as const;

// Narrower than the localpart grammar: Synapse refuses a registration whose sender_localpart
// changes when URL-quoted ('=' and '/' do), and ghost ids are built from the prefix.
const localpart = z
  .string()
  .regex(/^[a-z0-9._-]+$/, "must be a Matrix localpart: lower-case letters, digits and ._- only");

export const homeserverSchema = z.strictObject(
  {
    url: z
      .url({ protocol: /^https?$/, error: "must be an http(s) URL such as http://localhost:8008" })
      .describe("Client-Server API base URL"),
    domain: z
      .string()
      .regex(/^[A-Za-z0-9.-]+(:\d+)?$/, "must be a server name such as example.org")
      .describe("Server name: the part after ':' in user ids"),
  },
  {
    error: (iss) =>
      iss.input === undefined ? "is required: set homeserver.url and homeserver.domain" : undefined,
  },
);

export const appserviceSchema = z.strictObject({
  bind: z.string().default(DEFAULTS.appserviceBind).describe("Address the appservice HTTP listener binds"),
  port: z.number().int().min(1).max(65535).default(DEFAULTS.appservicePort),
  url: z
    .url({ protocol: /^https?$/, error: "must be an http(s) URL such as http://tribridge:9993" })
    .optional()
    .describe("URL the homeserver uses to reach this bridge (default http://<bind>:<port>)"),
  botLocalpart: localpart.default(DEFAULTS.botLocalpart),
  botDisplayName: z.string().default(DEFAULTS.botDisplayName),
  ghostPrefix: localpart.default(DEFAULTS.ghostPrefix).describe("Prefix of every ghost user's localpart"),
  roomAliasPrefix: localpart
    .default(DEFAULTS.roomAliasPrefix)
    .describe(
      "Rooms of routes added later: generate-registration reserves the aliases #<prefix>…:<domain>, so tribridge " +
        "can create a route's room with such an alias without a new registration (other aliases: regenerate)",
    ),
  admins: z
    .array(
      z
        .string()
        .regex(/^@(\*|[^:*]+):[^*]+$/, "must be a user id, or @*:<server> for every user of a server"),
    )
    .default([])
    .describe("Who may use the bot's commands (!tribridge help) and invite it to rooms"),
});

export const queueSchema = z.strictObject({
  redisUrl: z
    .string()
    .regex(
      /^(rediss?(\+cluster)?|unix):\/\//,
      "must start with redis://, rediss://, unix:// or (a Redis Cluster) redis+cluster://",
    )
    .superRefine((url, ctx) => {
      const cluster = isClusterUrl(url) ? parseClusterUrl(url) : undefined;
      if (typeof cluster === "string") ctx.addIssue({ code: "custom", message: cluster });
    })
    .optional()
    .describe(
      "Absent: tribridge runs a private redis-server child with AOF in dataDir. A Redis Cluster: " +
        "redis+cluster://host:port,host:port (rediss+cluster:// for TLS); every key then carries the hash tag " +
        "{<prefix>}, so one bridge's keys live in one slot (docs/scaling.md)",
    ),
  fsync: z
    .enum(["always", "everysec"])
    .default(DEFAULTS.fsync)
    .describe(
      "When the embedded Redis syncs its AOF to disk (appendfsync). everysec: up to ~1 s of acknowledged " +
        "messages can be lost on a power loss or kernel crash (not when only a process dies); always: none, " +
        "for a cost in throughput (npm run bench). With redisUrl it is not applied: tribridge warns at " +
        "start when that Redis's appendfsync differs",
    ),
  prefix: z
    .string()
    .regex(/^[A-Za-z0-9_-]+$/, "letters, digits, _ and - only")
    .default(DEFAULTS.queuePrefix),
  shards: z.number().int().min(1).max(256).default(DEFAULTS.queueShards),
  maxAttempts: z
    .number()
    .int()
    .min(1)
    .max(1000)
    .default(DEFAULTS.maxAttempts)
    .describe(
      "Attempts per message before it goes to the failed list. Only failures that can be the message's count: " +
        "while its destination is down (unreachable, timing out, 5xx) or rate-limiting, it waits without limit",
    ),
  downAfterFailures: z
    .number()
    .int()
    .min(1)
    .default(DEFAULTS.downAfterFailures)
    .describe(
      "Failures in a row after which a destination is logged and shown as down (it is probed from the first)",
    ),
  maxProbeDelayMs: z
    .number()
    .int()
    .min(10)
    .default(DEFAULTS.maxProbeDelayMs)
    .describe(
      "Longest wait between two probes of a destination that is down: delivery resumes within about this long",
    ),
  stillDownLogMs: z.number().int().min(1000).default(DEFAULTS.stillDownLogMs),
  initialRetryDelayMs: z.number().int().min(1).default(DEFAULTS.initialRetryDelayMs),
  maxRetryDelayMs: z.number().int().min(1).default(DEFAULTS.maxRetryDelayMs),
  keepCompletedJobs: z.number().int().min(0).default(DEFAULTS.keepCompletedJobs),
  keepFailedJobs: z.number().int().min(1).default(DEFAULTS.keepFailedJobs),
  maxBacklogMb: z
    .number()
    .int()
    .min(0)
    .default(DEFAULTS.maxBacklogMb)
    .describe(
      "Messages waiting in Redis, per queue, beyond which new ones are held at their source " +
        "(not acknowledged to the far side, homeserver transactions not answered) until it drains; 0 = no limit",
    ),
});

export const encryptionSchema = z.strictObject({
  enabled: z
    .boolean()
    .default(false)
    .describe(
      "Bridge end-to-end encrypted rooms: read them with the reader's device (@<ghostPrefix>reader), post into them encrypted by " +
        "each ghost's own device (docs/encryption.md). Off: encrypted rooms are told they are not bridged",
    ),
  feed: z
    .enum(["sync", "transactions"])
    .default("sync")
    .describe(
      "How devices hear of to-device messages and key changes: `sync` (each device's /sync; every " +
        "homeserver) or `transactions` (appservice transactions, MSC2409/MSC3202: Synapse with its " +
        "experimental flags)",
    ),
  deviceCreation: z
    .enum(["login", "msc4190"])
    .optional()
    .describe(
      "How devices are made: `msc4190` (PUT /devices, used by masquerading) or `login` " +
        "(m.login.application_service, used with their own token). Default: msc4190 when the " +
        "registration says io.element.msc4190, else login",
    ),
});

export const metricsSchema = z.strictObject({
  enabled: z.boolean().default(false).describe("Serve Prometheus metrics at http://<bind>:<port>/metrics"),
  bind: z.string().default(DEFAULTS.metricsBind),
  port: z.number().int().min(1).max(65535).default(DEFAULTS.metricsPort),
});

/** Who may relay room messages out of a route's room (matrix/permissions.ts). */
export const permissionsSchema = z.strictObject({
  users: z
    .array(
      z
        .string()
        .regex(/^@[^:]+:.+$/, "must be a user id such as @alice:example.org; * matches any characters"),
    )
    .default([])
    .describe(
      "User ids that may relay, * matching any characters: @alice:example.org, @*:example.org (everyone " +
        "on a server), @*:* (everyone)",
    ),
  powerLevel: z
    .number()
    .int()
    .nullable()
    .default(DEFAULTS.relayPowerLevel)
    .describe(
      "Everyone with at least this power level in the room may relay (50: moderators; read live from " +
        "m.room.power_levels); null: nobody by power level, only users. appservice.admins always may",
    ),
});

const feedbackMarks = z
  .enum(["reaction", "off"])
  .describe(
    "How a room message shows its delivery: `reaction`, the bot reacts to it (the accepted mark once every " +
      "endpoint took it, the waiting mark while one waits for its destination), or `off`. A message that " +
      "fails for good is answered in its thread with the reason either way",
  );
const reactionKey = z.string().min(1, "must not be empty").max(64, "at most 64 characters");
const acceptedMark = reactionKey.describe(
  "Reaction key once every endpoint accepted the message (MQTT PUBACK, or handed over at QoS 0; SMTP 250)",
);
const waitingMark = reactionKey.describe(
  "Reaction key while the message waits for a destination that is down; taken back when it is delivered",
);

/** Delivery feedback in the room: the default for every route (delivery-feedback.ts). */
export const feedbackSchema = z.strictObject({
  marks: feedbackMarks.default(DEFAULTS.feedbackMarks),
  accepted: acceptedMark.default(DEFAULTS.acceptedMark),
  waiting: waitingMark.default(DEFAULTS.waitingMark),
});

/** A route's own delivery feedback: each key given overrides the top-level `feedback`. */
const routeFeedbackSchema = z.strictObject({
  marks: feedbackMarks.optional(),
  accepted: acceptedMark.optional(),
  waiting: waitingMark.optional(),
});

export const directionSchema = z.enum(["in", "out", "inout"]);

const accountRef = z
  .string()
  .regex(
    /^[a-z][a-z0-9]*\.[a-z][a-z0-9-]*$/,
    'must be "<bridge>.<account>", an account under bridges.<bridge>',
  );

/** The core's view of an endpoint: connector fields are checked by that connector's endpointSchema. */
export const endpointBaseSchema = z.looseObject({
  account: accountRef,
  direction: directionSchema,
  id: z
    .string()
    .regex(EXPLICIT_ID, "a lower-case letter, then letters, digits, _ and - (at most 64)")
    .optional()
    .describe(
      "Stable name within the route; queued and failed messages refer to it. Default: derived from " +
        "the account, direction and the fields that identify the endpoint (each connector says " +
        "which), so reordering endpoints changes nothing; set one to keep them when you change those",
    ),
  live: z
    .boolean()
    .default(false)
    .describe(
      "Into the room, one message per sender and stream (each connector says what a stream is), edited " +
        "with each new reading instead of a new message each time; for direction in or inout",
    ),
  notices: z
    .boolean()
    .default(false)
    .describe(
      "Out of the room, m.notice messages too (what bots post, e.g. another bridge's alerts); for " +
        "direction out or inout",
    ),
});

export const routeSchema = z.strictObject({
  id: z
    .string()
    .regex(/^[a-z0-9][a-z0-9_-]*$/, "lower-case letters, digits, _ and - only")
    .describe("Stable id: job ids and stored state refer to it"),
  room: z
    .string()
    // Room ids of room version 12 have no server part (!<hash>).
    .regex(/^(#[^:]+:.+|![^:]+(:.+)?)$/, "must be a room alias (#name:server) or a room id (!id:server)")
    .describe("Room alias or id; an alias on our own domain that does not exist yet is created"),
  invite: z
    .array(z.string().regex(/^@[^:]+:.+$/, "must be a user id"))
    .optional()
    .describe(
      "Users invited when tribridge creates the room (default: the user ids among appservice.admins, " +
        "so that someone can get in)",
    ),
  endpoints: z.array(endpointBaseSchema).min(1, "a route needs at least one endpoint"),
  permissions: permissionsSchema
    .optional()
    .describe(
      "Who may relay the room's messages to this route's out and inout endpoints, instead of the " +
        "top-level permissions (keys left out take their defaults, not the top level's)",
    ),
  feedback: routeFeedbackSchema
    .optional()
    .describe("This route's delivery feedback, key by key over the top-level `feedback`"),
});

const accountName = /^[a-z][a-z0-9-]*$/;

/** Builds the whole config schema from the registered connectors. */
export function buildConfigSchema(connectors: readonly ConnectorDefinition[]) {
  const bridgeShape: Record<string, z.ZodType> = {};
  for (const def of connectors) {
    bridgeShape[def.name] = z
      .record(
        z.string().regex(accountName, "account names: lower-case letters, digits and -"),
        def.accountSchema,
      )
      .optional()
      .describe(def.description);
  }
  return z.strictObject({
    homeserver: homeserverSchema,
    appservice: appserviceSchema.prefault({}),
    queue: queueSchema.prefault({}),
    metrics: metricsSchema.prefault({}),
    encryption: encryptionSchema.prefault({}),
    feedback: feedbackSchema.prefault({}),
    dataDir: z
      .string()
      .default(DEFAULTS.dataDir)
      .describe(
        "Where the embedded Redis keeps its AOF, this instance keeps its id (instance-id), and its " +
          "encryption devices their keys (crypto/)",
      ),
    bridges: z.strictObject(bridgeShape).prefault({}),
    permissions: permissionsSchema
      .prefault({})
      .describe(
        "Who may relay room messages to out and inout endpoints, for every route without permissions of " +
          "its own. Others' messages get a ⛔ reaction and, once an hour, a notice saying why",
      ),
    routes: z
      .array(routeSchema)
      .default([])
      .superRefine((routes, ctx) => {
        const seen = new Set<string>();
        routes.forEach((r, i) => {
          if (seen.has(r.id))
            ctx.addIssue({ code: "custom", path: [i, "id"], message: `duplicate route id "${r.id}"` });
          seen.add(r.id);
        });
      }),
  });
}

export type HomeserverConfig = z.output<typeof homeserverSchema>;
export type AppserviceConfig = z.output<typeof appserviceSchema>;
export type QueueConfig = z.output<typeof queueSchema>;
export type MetricsConfig = z.output<typeof metricsSchema>;
export type EncryptionConfig = z.output<typeof encryptionSchema>;
export type FeedbackConfig = z.output<typeof feedbackSchema>;
export type RouteConfig = z.output<typeof routeSchema>;
export type PermissionsConfig = z.output<typeof permissionsSchema>;
export type RawConfig = z.output<ReturnType<typeof buildConfigSchema>>;
