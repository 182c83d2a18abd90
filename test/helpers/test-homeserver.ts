/**
 * A small, strict, in-memory Matrix homeserver for tests and benchmarks.
 *
 * Implements a subset of the Client-Server API (CS API) and of the Application Service API (AS API)
 * as described by the Matrix specification v1.11, following Synapse where the spec leaves room for choice.
 * It is deliberately *not* lenient: requests a real homeserver would refuse are refused here too, with the
 * same HTTP status and `errcode`.
 *
 * End-to-end encryption (CS API v1.12 §Device management, §End-to-End Encryption, §Send-to-Device
 * messaging): devices (login, logout, MSC4190 `PUT`/`DELETE /devices`), device masquerading (MSC4326,
 * from MSC3202), key upload/query/claim with fallback keys, cross-signing keys and signatures, to-device
 * messages, and a `/sync` carrying a device's to-device messages, device lists and key counts (no rooms:
 * room events reach the appservice in transactions). With Synapse's experimental flags on, transactions
 * carry MSC2409 to-device messages and MSC3202 device data, in Synapse's shapes (homeserver-devices.ts
 * holds the state).
 *
 * Built on plain `node:http`, no dependencies. Designed to sustain thousands of events per second: events are
 * serialised once when created, transactions are built by string concatenation and pushed over a keep-alive
 * agent, and no per-request work is proportional to the history size.
 */
import http from "node:http";
import https from "node:https";
import { randomBytes } from "node:crypto";
import type { AddressInfo } from "node:net";
import type { Socket } from "node:net";
import {
  DeviceDirectory,
  canonicalJson,
  validateKeyUpload,
  type CrossSigningUsage,
  type ToDeviceMessage,
} from "./homeserver-devices.js";

// ---------------------------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------------------------

export interface NamespaceEntry {
  exclusive: boolean;
  regex: string;
}

export interface AppserviceRegistration {
  id: string;
  url: string | null;
  as_token: string;
  hs_token: string;
  sender_localpart: string;
  rate_limited?: boolean;
  namespaces: { users?: NamespaceEntry[]; aliases?: NamespaceEntry[]; rooms?: NamespaceEntry[] };
  /** MSC2409: ephemeral data (and, with `msc2409ToDevice`, to-device messages) in transactions. */
  receive_ephemeral?: boolean;
  /** The same, as MSC2409 first named it; the transaction keys are unstable-prefixed then. */
  "de.sorunome.msc2409.push_ephemeral"?: boolean;
  /** MSC3202 transaction extensions (device lists, one-time key counts), with `msc3202TransactionExtensions`. */
  "org.matrix.msc3202"?: boolean;
  /** MSC4190 opt-in: appservice login and /register with a device are refused (Synapse's APPSERVICE_LOGIN_UNSUPPORTED). */
  "io.element.msc4190"?: boolean;
}

export interface TestHomeserverOptions {
  /** Server name used in user ids, room ids, aliases and mxc URIs. Default "test.local". */
  serverName?: string;
  registration: AppserviceRegistration;
  /** "v1": PUT {url}/_matrix/app/v1/transactions/{txnId} (default); "legacy": PUT {url}/transactions/{txnId}. */
  pushPath?: "v1" | "legacy";
  retry?: { initialDelayMs?: number; maxDelayMs?: number };
  /** How the hs_token is sent to the appservice. Default "header" (`Authorization: Bearer`). */
  authMode?: "header" | "query";
  /** Default 100. */
  maxEventsPerTransaction?: number;
  /** Time after which a push/query request to the appservice is abandoned (counts as a network error). Default 30000. */
  pushTimeoutMs?: number;
  /** Largest upload to the content repository (Synapse `max_upload_size`, default 50M); larger → 413 M_TOO_LARGE. */
  maxUploadBytes?: number;
  /**
   * The appservice ping endpoint (AS API §Pinging, Matrix v1.7). Default "supported". "absent": a homeserver
   * from before it, answering as Synapse before 1.84 does for an unknown endpoint (400 M_UNRECOGNIZED).
   */
  appservicePing?: "supported" | "absent";
  /**
   * Synapse `experimental_features.msc2409_to_device_messages_enabled`: to-device messages for the
   * appservice's users go into its transactions too (`de.sorunome.msc2409.to_device`), for a
   * registration with `receive_ephemeral` (or `de.sorunome.msc2409.push_ephemeral`). Default false.
   */
  msc2409ToDevice?: boolean;
  /**
   * Synapse `experimental_features.msc3202_transaction_extensions`: device list changes, one-time key
   * counts and unused fallback key types in transactions, for a registration with `org.matrix.msc3202`.
   * Default false.
   */
  msc3202TransactionExtensions?: boolean;
  /**
   * MSC4326 (split from MSC3202) device masquerading: an appservice request with `device_id` (or
   * `org.matrix.msc3202.device_id`) acts as that device of the asserted user, which must exist.
   * Default true, as Synapse since 1.141; false: as Synapse before it without
   * `experimental_features.msc3202_device_masquerading`, where the parameter is ignored.
   */
  deviceMasquerading?: boolean;
  /**
   * MSC4190 device management for appservices: `PUT /devices/{id}` creates the device (201) and
   * `DELETE /devices/{id}` needs no user-interactive auth. Default true, as Synapse since 1.141 for
   * every appservice; false: as Synapse before 1.122 (404 for an unknown device, 401 UIA to delete).
   */
  msc4190?: boolean;
  /**
   * Presence (CS API §Presence). "enabled" (default) stores what PUT /presence/{userId}/status sets;
   * "forbidden": as conduwuit/continuwuity with `allow_local_presence = false` (their default), which
   * answer the PUT with 403 M_FORBIDDEN "Presence is disabled on this server"; "ignored": as Synapse
   * with `presence.enabled: false`, which answers 200 and keeps nothing.
   */
  presence?: "enabled" | "forbidden" | "ignored";
}

/** A presence a user set, as the homeserver took it (TestHomeserver.presenceUpdates). */
export interface PresenceUpdate {
  userId: string;
  presence: string;
  status_msg?: string;
  ts: number;
}

/**
 * A failure the next matching client requests meet (`failRequests`): what a homeserver under load,
 * or a proxy in front of it, answers now and then.
 */
export interface RequestFault {
  method?: string;
  /** Tested against the request path (without its query string). */
  path: RegExp;
  /** Matching requests let through before the fault strikes. Default 0. */
  skip?: number;
  /** How many matching requests fail, after `skip`. Default 1. */
  times?: number;
  /** Default 500 M_UNKNOWN. */
  status?: number;
  errcode?: string;
  /**
   * "before" (default): refused, nothing done. "after": done (the event stored, the upload kept), and
   * then answered with the error, as when a proxy gives up on a response, or the connection drops,
   * after the homeserver did the work: the client cannot tell, and must retry idempotently.
   */
  when?: "before" | "after";
}

export interface RecordedEvent {
  event_id: string;
  room_id: string;
  sender: string;
  type: string;
  state_key?: string;
  content: Record<string, unknown>;
  origin_server_ts: number;
  /** Client transaction id the event was sent with (PUT /send/{type}/{txnId}), if any. */
  txn_id?: string;
  /** `prev_content` / `replaces_state` for state events that replaced an earlier one; `redacted_because`. */
  unsigned?: Record<string, unknown>;
  /** For m.room.redaction events (room versions 1-10 carry it at the top level). */
  redacts?: string;
}

export interface RequestLogEntry {
  method: string;
  path: string;
  status: number;
  userId?: string;
}

export interface PushAttempt {
  txnId: string;
  events: number;
  status: number | "error";
}

/** A Matrix standard error response (CS API §Standard error response). */
export class MatrixError extends Error {
  readonly status: number;
  readonly errcode: string;
  readonly error: string;
  readonly extra: Record<string, unknown> | undefined;
  constructor(status: number, errcode: string, error: string, extra?: Record<string, unknown>) {
    super(`${status} ${errcode}: ${error}`);
    this.name = "MatrixError";
    this.status = status;
    this.errcode = errcode;
    this.error = error;
    this.extra = extra;
  }
  toJSON(): Record<string, unknown> {
    return { errcode: this.errcode, error: this.error, ...this.extra };
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Internal types and helpers
// ---------------------------------------------------------------------------------------------------------------

type Json = Record<string, unknown>;
type Membership = "join" | "invite" | "leave" | "ban" | "knock";

interface User {
  userId: string;
  displayname?: string;
  avatar_url?: string;
  rooms: Set<string>; // joined rooms
  accountData: Map<string, Json>;
  presence: { presence: string; status_msg?: string; last_active_ts: number };
}

interface Room {
  roomId: string;
  version: string;
  events: RecordedEvent[];
  messages: RecordedEvent[];
  /** Current state, keyed by stateKeyOf(type, stateKey). */
  state: Map<string, RecordedEvent>;
  membership: Map<string, Membership>;
  /** Currently joined users, in join order. */
  joined: Set<string>;
  /** Number of joined users the appservice is interested in (AS API §Registration). */
  interestedJoined: number;
  /** Room id or one of its aliases matches the appservice namespaces. */
  idOrAliasInterest: boolean;
  aliases: Set<string>;
}

interface StoredEvent {
  room: Room;
  event: RecordedEvent;
  /** Transaction scope (access token + user) that sent it, for unsigned.transaction_id. */
  txnScope?: string | undefined;
}

interface EvMeta {
  /** The event's id, when it is given (a version 12 room's create event: the room id's source). */
  eventId?: string | undefined;
  txnId?: string | undefined;
  txnScope?: string | undefined;
  ts?: number | undefined;
  redacts?: string | undefined;
}

interface Requester {
  userId: string;
  /** Authenticated with the as_token (possibly masquerading). */
  isAs: boolean;
  /** Scope of client transaction ids: the access token plus the asserted user (CS API §Transaction identifiers). */
  txnScope: string;
  /** The device acting: the access token's, or the one an appservice masquerades as. */
  deviceId?: string | undefined;
}

interface Ctx {
  req: http.IncomingMessage;
  path: string;
  params: string[];
  query: URLSearchParams;
  token: string | undefined;
  requester: Requester | undefined;
  body: unknown;
  raw: Buffer | undefined;
}

type Reply =
  | { status: number; body: unknown }
  | { status: number; raw: Buffer; headers: Record<string, string | number> };
type Handler = (ctx: Ctx) => Reply | Promise<Reply>;

interface Route {
  method: string;
  segs: (string | readonly string[] | null)[];
  /** "user": access token required; "none": no auth; "optional": handler authenticates itself. */
  auth: "user" | "none" | "optional";
  /** "json": JSON object body required; "json?": empty body allowed (treated as {}); "raw": bytes; "none". */
  body: "json" | "json?" | "raw" | "none";
  maxBody: number;
  allowEmptyLast: boolean;
  handler: Handler;
}

const JSON_HEADERS = {
  "Content-Type": "application/json",
  // CS API §Web Browser Clients: CORS headers on every response.
  "Access-Control-Allow-Origin": "*",
  "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
  "Access-Control-Allow-Headers": "X-Requested-With, Content-Type, Authorization",
} as const;

const MAX_JSON_BODY = 1024 * 1024;
const MAX_EVENT_BYTES = 65536; // CS API §Size limits
/**
 * The 65536-byte limit applies to the federation PDU (hashes, signatures, auth/prev events, depth) which is
 * larger than the client-format event we serialise; reserve a conservative estimate of that overhead.
 */
const PDU_OVERHEAD_BYTES = 400;
const MAX_UPLOAD_BYTES = 50 * 1024 * 1024;
/** Synapse's errcode when an appservice that opted in to MSC4190 logs in (or registers with a device). */
const APPSERVICE_LOGIN_UNSUPPORTED = "IO.ELEMENT.MSC4190.M_APPSERVICE_LOGIN_UNSUPPORTED";
/** Synapse's MAX_TO_DEVICE_CONTENT_SIZE (its SOFT_MAX_EDU_SIZE), in canonical JSON bytes. */
const MAX_TO_DEVICE_CONTENT_BYTES = 65536;
/** To-device messages in one /sync response (Synapse's limit). */
const SYNC_TO_DEVICE_LIMIT = 100;
const LOG_LIMIT = 10_000;
/** Synapse (1.163) makes version 12 rooms by default; here 10 stays the default, and tests ask for 12. */
const DEFAULT_ROOM_VERSION = "10";
const SUPPORTED_ROOM_VERSIONS = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12"];
/** Room versions §12 (MSC4289): a creator's power level, above every other (Synapse's CREATOR_POWER_LEVEL). */
const CREATOR_POWER_LEVEL = 2 ** 53;
const MEMBERSHIPS: readonly string[] = ["join", "invite", "leave", "ban", "knock"];
/** `m.room.encryption` content as clients send it (CS API §m.room.encryption). */
const MEGOLM = {
  algorithm: "m.megolm.v1.aes-sha2",
  rotation_period_ms: 604800000,
  rotation_period_msgs: 100,
};
const SPEC_VERSIONS = [
  "r0.5.0",
  "r0.6.0",
  "r0.6.1",
  "v1.1",
  "v1.2",
  "v1.3",
  "v1.4",
  "v1.5",
  "v1.6",
  "v1.7",
  "v1.8",
  "v1.9",
  "v1.10",
  "v1.11",
];

// Appendix §Identifier Grammar / §User Identifiers: localpart chars a-z 0-9 . _ = - / + ; whole id <= 255 bytes.
const LOCALPART_RE = /^[a-z0-9._=\-/+]+$/;
// Room aliases: "#" localpart ":" server_name; localpart must not contain ":" (Synapse also forbids whitespace).
const ALIAS_RE = /^#[^:\s]+:.+$/;
/** `!opaque:server`; from room version 12 on, `!` and the create event's hash, without a server (Appendices §Room IDs). */
const ROOM_ID_RE = /^!([^:]+:.+|[A-Za-z0-9_-]{43})$/;

// Random ids: draw from a pooled buffer to avoid a syscall-sized randomBytes() per event.
let randPool = Buffer.alloc(0);
let randOff = 0;
function randomChunk(n: number): Buffer {
  if (randOff + n > randPool.length) {
    randPool = randomBytes(16 * 1024);
    randOff = 0;
  }
  const b = randPool.subarray(randOff, randOff + n);
  randOff += n;
  return b;
}
const LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
function randomLetters(n: number): string {
  const b = randomChunk(n);
  let s = "";
  for (let i = 0; i < n; i++) s += LETTERS[b[i]! % LETTERS.length];
  return s;
}
/**
 * Whose repeated transaction ids get the first request's answer. Synapse keys an appservice's by
 * the path and the appservice alone (rest/client/transactions.py: `(path, "appservice", id)`; the
 * path without the query): the same transaction id sent as two of its users into one room within
 * its 30 minutes is one request, and the second user's event is never made. A session otherwise.
 */
function idempotencyScope(rq: Requester): string {
  return rq.isAs ? "as" : rq.txnScope;
}
/** Room versions §12 (MSC4289): whether the room's creators rank above every power level. */
function createsCreators(version: string): boolean {
  return /^\d+$/.test(version) && Number(version) >= 12;
}
/** Room versions 4+ event id format: "$" + unpadded URL-safe base64 of a 32-byte reference hash. */
function newEventId(): string {
  return "$" + randomChunk(32).toString("base64url");
}
function newToken(prefix: string): string {
  return prefix + randomChunk(24).toString("base64url");
}

/** An event's relation, as Synapse's relation_from_event reads it: string `rel_type` and `event_id`. */
function relationOf(content: Json): { relType: string; eventId: string } | undefined {
  const r = content["m.relates_to"];
  if (!isObject(r) || typeof r.rel_type !== "string" || typeof r.event_id !== "string") return undefined;
  return { relType: r.rel_type, eventId: r.event_id };
}

function isObject(v: unknown): v is Json {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

function stateKeyOf(type: string, stateKey: string): string {
  return `${type.length}:${type}${stateKey}`;
}

function err(status: number, errcode: string, error: string, extra?: Record<string, unknown>): MatrixError {
  return new MatrixError(status, errcode, error, extra);
}
const forbidden = (msg: string): MatrixError => err(403, "M_FORBIDDEN", msg);
const notFound = (msg: string): MatrixError => err(404, "M_NOT_FOUND", msg);
const badJson = (msg: string): MatrixError => err(400, "M_BAD_JSON", msg);

function ok(body: unknown = {}): Reply {
  return { status: 200, body };
}

function isInt(v: unknown): v is number {
  return typeof v === "number" && Number.isInteger(v);
}

// ---------------------------------------------------------------------------------------------------------------
// The homeserver
// ---------------------------------------------------------------------------------------------------------------

export class TestHomeserver {
  readonly serverName: string;
  readonly registration: AppserviceRegistration;

  private readonly opts: Required<Omit<TestHomeserverOptions, "retry" | "registration" | "serverName">> & {
    initialDelayMs: number;
    maxDelayMs: number;
  };
  private readonly senderId: string;
  /**
   * Whether the AS sender user was registered (POST /register). Synapse lets the as_token act as the sender
   * without that (whoami, joins, sends), but has no profile for it until it is: GET /profile answers 404 and
   * PUT /profile/…/displayname 500 (its profile-size check reads a row that does not exist).
   */
  private senderRegistered = false;
  private readonly userNs: { exclusive: boolean; re: RegExp }[];
  private readonly aliasNs: { exclusive: boolean; re: RegExp }[];
  private readonly roomNs: { exclusive: boolean; re: RegExp }[];
  private readonly nsCache = new Map<string, boolean>();

  private server: http.Server | undefined;
  private readonly sockets = new Set<Socket>();
  private port = 0;
  private stopped = false;

  private readonly users = new Map<string, User>();
  private readonly tokens = new Map<string, string>(); // access token -> user id (non-AS tokens)
  private readonly tokenDevices = new Map<string, string>(); // access token -> its device id
  /** Devices, their keys and to-device inboxes (CS API §Device management, §End-to-End Encryption). */
  private readonly devices = new DeviceDirectory((userId) => this.deviceListChanged(userId));
  /** Joins and leaves, at positions of the device stream: /sync's device_lists follow who shares a room. */
  private readonly membershipLog: { pos: number; roomId: string; userId: string; joined: boolean }[] = [];
  private readonly rooms = new Map<string, Room>();
  private readonly aliases = new Map<string, { roomId: string; creator: string }>();
  private readonly eventIndex = new Map<string, StoredEvent>();
  /** Event ids some event has a relation (rel_type) to: Synapse accepts further relations to them. */
  private readonly relationTargets = new Set<string>();
  private readonly txnCache = new Map<string, string>(); // txn scope + path -> event id
  private readonly media = new Map<string, { data: Buffer; contentType: string; filename?: string }>();
  private readonly routes: Route[] = [];
  private readonly waiters = new Set<{ check: () => boolean }>();

  private readonly requestLog: RequestLogEntry[] = [];
  private readonly faults: (RequestFault & { skipped: number; failed: number })[] = [];
  private readonly pushLog: PushAttempt[] = [];

  // AS API §Pushing events state.
  private readonly agent: http.Agent;
  private readonly pushTarget: { mod: typeof http | typeof https; base: URL; prefix: string } | undefined;
  private queue: string[] = [];
  /** Room of each queued event (same index as `queue`): MSC3202 counts keys of the appservice users in it. */
  private queueRooms: string[] = [];
  /** MSC2409: to-device messages for the appservice's users, serialised, waiting for a transaction. */
  private asToDevice: string[] = [];
  /** MSC3202: users whose device lists changed, waiting for a transaction. */
  private readonly asDeviceListChanged = new Set<string>();
  /**
   * Synapse marks an appservice DOWN when a transaction fails and retries only its events (the
   * recoverer's catch-up transactions carry no to-device messages, key counts or device lists);
   * until one succeeds, what would go with them is dropped.
   */
  private appserviceDown = false;
  private queueHead = 0;
  private inFlight: { txnId: string; body: string; events: number; eventsOnly: string } | undefined;
  private sending = false;
  private paused = false;
  /** See outage(). */
  private down: "refuse" | "bad-gateway" | undefined;
  private pumpScheduled = false;
  private retryTimer: NodeJS.Timeout | undefined;
  private retryDelay: number;
  private nextTxnId = 1;
  private readonly delivered = new Map<string, { body: string; events: number }>();
  private readonly activeRequests = new Set<http.ClientRequest>();

  constructor(opts: TestHomeserverOptions) {
    this.serverName = opts.serverName ?? "test.local";
    this.registration = opts.registration;
    this.opts = {
      pushPath: opts.pushPath ?? "v1",
      authMode: opts.authMode ?? "header",
      maxEventsPerTransaction: opts.maxEventsPerTransaction ?? 100,
      pushTimeoutMs: opts.pushTimeoutMs ?? 30_000,
      maxUploadBytes: opts.maxUploadBytes ?? MAX_UPLOAD_BYTES,
      appservicePing: opts.appservicePing ?? "supported",
      msc2409ToDevice: opts.msc2409ToDevice ?? false,
      msc3202TransactionExtensions: opts.msc3202TransactionExtensions ?? false,
      deviceMasquerading: opts.deviceMasquerading ?? true,
      msc4190: opts.msc4190 ?? true,
      presence: opts.presence ?? "enabled",
      initialDelayMs: opts.retry?.initialDelayMs ?? 200,
      maxDelayMs: opts.retry?.maxDelayMs ?? 8000,
    };
    if (this.opts.maxEventsPerTransaction < 1) throw new Error("maxEventsPerTransaction must be >= 1");
    this.retryDelay = this.opts.initialDelayMs;
    const reg = opts.registration;
    if (!LOCALPART_RE.test(reg.sender_localpart)) {
      throw new Error(`invalid sender_localpart ${JSON.stringify(reg.sender_localpart)}`);
    }
    this.senderId = `@${reg.sender_localpart}:${this.serverName}`;
    // Synapse compiles namespace regexes with re.match: anchored at the start only.
    const compile = (list: NamespaceEntry[] | undefined): { exclusive: boolean; re: RegExp }[] =>
      (list ?? []).map((n) => ({ exclusive: n.exclusive, re: new RegExp(`^(?:${n.regex})`) }));
    this.userNs = compile(reg.namespaces.users);
    this.aliasNs = compile(reg.namespaces.aliases);
    this.roomNs = compile(reg.namespaces.rooms);
    this.agent = new http.Agent({ keepAlive: true, maxSockets: 8, keepAliveMsecs: 1000 });
    if (reg.url !== null) {
      const base = new URL(reg.url);
      const mod = base.protocol === "https:" ? https : http;
      this.pushTarget = { mod, base, prefix: base.pathname.replace(/\/+$/, "") };
    }
    // The AS sender user can always act (it is what the as_token authenticates as); see senderRegistered.
    this.createUser(this.senderId);
    this.defineRoutes();
  }

  // -------------------------------------------------------------------------------------------------------------
  // Lifecycle
  // -------------------------------------------------------------------------------------------------------------

  async start(): Promise<{ url: string; port: number }> {
    if (this.server) throw new Error("TestHomeserver already started");
    const server = http.createServer((req, res) => {
      this.handle(req, res).catch((e: unknown) => {
        // Should not happen: handle() converts errors into responses.
        if (!res.headersSent) {
          res.writeHead(500, JSON_HEADERS);
          res.end(JSON.stringify({ errcode: "M_UNKNOWN", error: String(e) }));
        }
      });
    });
    server.keepAliveTimeout = 30_000;
    server.on("connection", (s: Socket) => {
      s.setNoDelay(true);
      this.sockets.add(s);
      s.on("close", () => this.sockets.delete(s));
    });
    this.server = server;
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(0, "127.0.0.1", () => {
        server.off("error", reject);
        resolve();
      });
    });
    this.port = (server.address() as AddressInfo).port;
    return { url: this.url, port: this.port };
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = undefined;
    for (const r of this.activeRequests) r.destroy();
    this.activeRequests.clear();
    this.agent.destroy();
    for (const w of [...this.waiters]) w.check();
    const server = this.server;
    if (!server) return;
    await new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
      for (const s of this.sockets) s.destroy();
    });
  }

  get url(): string {
    if (!this.port) throw new Error("TestHomeserver not started");
    return `http://127.0.0.1:${this.port}`;
  }

  /** The appservice sender user id, `@<sender_localpart>:<serverName>`. */
  get appserviceUserId(): string {
    return this.senderId;
  }

  /** Request log (method, path without query string, status, authenticated user), last 10k entries. */
  get requests(): RequestLogEntry[] {
    if (this.requestLog.length > LOG_LIMIT) this.requestLog.splice(0, this.requestLog.length - LOG_LIMIT);
    return this.requestLog;
  }

  /** Every presence a user set and the homeserver kept, in order (PUT /presence/{userId}/status). */
  readonly presenceUpdates: PresenceUpdate[] = [];

  /** Every push attempt to the appservice (including retries and replays), last 10k entries. */
  get pushedTransactions(): PushAttempt[] {
    if (this.pushLog.length > LOG_LIMIT) this.pushLog.splice(0, this.pushLog.length - LOG_LIMIT);
    return this.pushLog;
  }

  // -------------------------------------------------------------------------------------------------------------
  // Test-side actions (behave as if a real client had made the request; throw MatrixError when refused)
  // -------------------------------------------------------------------------------------------------------------

  /** Register a normal (non-appservice) user. Refused inside an exclusive appservice user namespace. */
  registerUser(localpart: string, displayName?: string): string {
    const userId = this.checkNewUser(localpart);
    // AS API §Server admin style permissions: normal users cannot take ids in an exclusive namespace.
    if (this.userNs.some((n) => n.exclusive && n.re.test(userId))) {
      throw err(400, "M_EXCLUSIVE", `${userId} is reserved by an application service`);
    }
    const user = this.createUser(userId);
    // A registration logs in: a device of its own, with a token (CS API §POST /register).
    this.issueToken(userId, randomLetters(10).toUpperCase());
    if (displayName !== undefined) user.displayname = displayName;
    return userId;
  }

  /** Logs a registered user in again, as a password login would: a new device, and its access token. */
  logIn(userId: string): string {
    if (!this.isRegistered(userId)) throw new Error(`${userId} is not registered`);
    return this.issueToken(userId, randomLetters(10).toUpperCase());
  }

  /** An access token for a user registered with registerUser() (or logged in), to make real client requests. */
  accessTokenFor(userId: string): string {
    for (const [t, u] of this.tokens) if (u === userId) return t;
    throw new Error(`no access token for ${userId}`);
  }

  createRoom(opts: {
    creator: string;
    alias?: string;
    name?: string;
    topic?: string;
    invite?: string[];
    preset?: "public_chat" | "private_chat" | "trusted_private_chat";
    isDirect?: boolean;
    /**
     * With end-to-end encryption on from the start (`m.room.encryption` in initial_state), as Element
     * creates private rooms, and as Synapse does for every room with `encryption_enabled_by_default_for_room_type`.
     */
    encrypted?: boolean;
    /** Default 10; Synapse's default is 12 (a room id without a server, creators above every level). */
    roomVersion?: string;
    /** Room versions §12: `additional_creators` of the create event. */
    additionalCreators?: string[];
  }): string {
    this.requireUser(opts.creator);
    let aliasLocal: string | undefined;
    if (opts.alias !== undefined) {
      if (!ALIAS_RE.test(opts.alias) || !opts.alias.endsWith(`:${this.serverName}`)) {
        throw err(400, "M_INVALID_PARAM", `invalid local alias ${opts.alias}`);
      }
      aliasLocal = opts.alias.slice(1, opts.alias.length - this.serverName.length - 1);
    }
    return this.doCreateRoom(
      { userId: opts.creator, isAs: false, txnScope: "" },
      {
        preset: opts.preset ?? "private_chat",
        room_alias_name: aliasLocal,
        name: opts.name,
        topic: opts.topic,
        invite: opts.invite,
        is_direct: opts.isDirect,
        initial_state: opts.encrypted ? [{ type: "m.room.encryption", content: MEGOLM } as Json] : undefined,
        room_version: opts.roomVersion,
        creation_content:
          opts.additionalCreators === undefined
            ? undefined
            : { additional_creators: opts.additionalCreators },
      },
    );
  }

  /** As a client's send: refused (throws) as the HTTP endpoint would refuse it, relations included. */
  sendMessage(
    roomId: string,
    sender: string,
    content: Record<string, unknown>,
    type = "m.room.message",
  ): string {
    const room = this.requireRoom(this.resolveRoom(roomId));
    this.validateRelation(room, content);
    return this.sendEvent(room, sender, type, content, undefined, {}).event_id;
  }

  sendState(
    roomId: string,
    sender: string,
    type: string,
    stateKey: string,
    content: Record<string, unknown>,
  ): string {
    const room = this.requireRoom(this.resolveRoom(roomId));
    return this.putState(room, { userId: sender, isAs: false, txnScope: "" }, type, stateKey, content, {});
  }

  /** Turns end-to-end encryption on (CS API §Enabling end-to-end encryption); it cannot be turned off. */
  enableEncryption(roomId: string, sender: string): string {
    return this.sendState(roomId, sender, "m.room.encryption", "", MEGOLM);
  }

  /**
   * An encrypted message as a client sends it (`m.room.encrypted`, m.megolm.v1.aes-sha2): opaque to the
   * homeserver and to an appservice without the room's keys. The homeserver does not check the room is encrypted.
   */
  sendEncrypted(roomId: string, sender: string): string {
    return this.sendMessage(
      roomId,
      sender,
      {
        algorithm: MEGOLM.algorithm,
        ciphertext: randomChunk(96).toString("base64").replace(/=+$/, ""),
        device_id: "TESTDEVICE",
        sender_key: randomChunk(32).toString("base64").replace(/=+$/, ""),
        session_id: randomChunk(32).toString("base64").replace(/=+$/, ""),
      },
      "m.room.encrypted",
    );
  }

  joinRoom(roomIdOrAlias: string, userId: string): string {
    this.requireUser(userId);
    const room = this.requireRoom(this.resolveRoom(roomIdOrAlias));
    this.doJoin(room, userId, {}, {});
    return room.roomId;
  }

  inviteUser(roomId: string, sender: string, target: string): void {
    this.doInvite(this.requireRoom(this.resolveRoom(roomId)), sender, target, {}, {});
  }

  leaveRoom(roomId: string, userId: string): void {
    this.doLeave(this.requireRoom(this.resolveRoom(roomId)), userId, userId, {}, {});
  }

  setDisplayName(userId: string, displayname: string | undefined): void {
    this.setProfileField(this.requireUser(userId), "displayname", displayname);
  }

  setAvatarUrl(userId: string, avatarUrl: string | undefined): void {
    this.setProfileField(this.requireUser(userId), "avatar_url", avatarUrl);
  }

  // -------------------------------------------------------------------------------------------------------------
  // Inspection
  // -------------------------------------------------------------------------------------------------------------

  /** All events of a room (room id or alias), in order, including state/membership. */
  events(roomId: string): RecordedEvent[] {
    return this.requireRoomForInspection(roomId).events.slice();
  }

  messages(roomId: string): RecordedEvent[] {
    return this.requireRoomForInspection(roomId).messages.slice();
  }

  /** messages(roomId).length without the copy, for polling loops. */
  messageCount(roomId: string): number {
    return this.requireRoomForInspection(roomId).messages.length;
  }

  /** The ids of a user's devices. */
  devicesOf(userId: string): string[] {
    return this.devices.deviceIds(userId);
  }

  members(roomId: string): string[] {
    return [...this.requireRoomForInspection(roomId).joined];
  }

  /** Current membership of a user in a room ("join", "invite", "leave", "ban", "knock") or undefined. */
  membershipOf(roomId: string, userId: string): Membership | undefined {
    return this.requireRoomForInspection(roomId).membership.get(userId);
  }

  stateEvent(roomId: string, type: string, stateKey = ""): RecordedEvent | undefined {
    return this.requireRoomForInspection(roomId).state.get(stateKeyOf(type, stateKey));
  }

  roomIds(): string[] {
    return [...this.rooms.keys()];
  }

  /** A registered user's profile; undefined for an unknown user, and for the AS sender until it registers. */
  profile(userId: string): { displayname?: string; avatar_url?: string } | undefined {
    const u = this.registeredUser(userId);
    if (!u) return undefined;
    const p: { displayname?: string; avatar_url?: string } = {};
    if (u.displayname !== undefined) p.displayname = u.displayname;
    if (u.avatar_url !== undefined) p.avatar_url = u.avatar_url;
    return p;
  }

  isRegistered(userId: string): boolean {
    return this.registeredUser(userId) !== undefined;
  }

  resolveAlias(alias: string): string | undefined {
    return this.aliases.get(alias)?.roomId;
  }

  /** Uploaded media by mxc URI. */
  mediaContent(mxc: string): { data: Buffer; contentType: string; filename?: string } | undefined {
    const prefix = `mxc://${this.serverName}/`;
    return mxc.startsWith(prefix) ? this.media.get(mxc.slice(prefix.length)) : undefined;
  }

  /**
   * Resolves when the room (id or alias; it may not exist yet) has at least `count` m.room.message events.
   * Rejects after timeoutMs with a diagnostic message.
   */
  waitForMessages(roomId: string, count: number, timeoutMs = 5000): Promise<RecordedEvent[]> {
    return this.waitFor(
      () => {
        const id = roomId.startsWith("#") ? this.aliases.get(roomId)?.roomId : roomId;
        const room = id === undefined ? undefined : this.rooms.get(id);
        return room && room.messages.length >= count ? room.messages.slice() : undefined;
      },
      timeoutMs,
      () => {
        const id = roomId.startsWith("#") ? this.aliases.get(roomId)?.roomId : roomId;
        const room = id === undefined ? undefined : this.rooms.get(id);
        if (!room) return `waitForMessages: room ${roomId} does not exist (wanted ${count} messages)`;
        const last = room.messages
          .slice(-3)
          .map((m) => `${m.sender}: ${JSON.stringify(m.content).slice(0, 120)}`)
          .join(" | ");
        return (
          `waitForMessages(${roomId}): got ${room.messages.length}/${count} m.room.message events` +
          ` (${room.events.length} events total; joined: ${[...room.joined].join(", ") || "nobody"})` +
          (last ? `; last: ${last}` : "")
        );
      },
    );
  }

  /** Resolves when every queued event has been delivered to the appservice. */
  waitForPushIdle(timeoutMs = 5000): Promise<void> {
    return this.waitFor(
      () => (this.pushIdle() ? true : undefined),
      timeoutMs,
      () => "waitForPushIdle",
    ).then(() => undefined);
  }

  // -------------------------------------------------------------------------------------------------------------
  // Appservice push control
  // -------------------------------------------------------------------------------------------------------------

  pausePush(): void {
    this.paused = true;
  }

  resumePush(): void {
    this.paused = false;
    this.schedulePump();
  }

  /**
   * The homeserver goes away until endOutage(), and pushes nothing meanwhile. "refuse": it stops
   * listening (connections refused; open ones closed), as when it is stopped. "bad-gateway": a
   * reverse proxy in front of it answers every request 502 with an HTML page.
   */
  async outage(kind: "refuse" | "bad-gateway"): Promise<void> {
    this.down = kind;
    this.pausePush();
    if (kind === "bad-gateway") return;
    const server = this.server!;
    await new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
      for (const s of this.sockets) s.destroy();
    });
  }

  /** Back after outage(): listening on the same port again, pushing what waited. */
  async endOutage(): Promise<void> {
    if (this.down === "refuse") {
      const server = this.server!;
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen(this.port, "127.0.0.1", () => {
          server.off("error", reject);
          resolve();
        });
      });
    }
    this.down = undefined;
    this.resumePush();
  }

  /** The next client requests matching `fault` fail as it says (see RequestFault). */
  failRequests(fault: RequestFault): void {
    this.faults.push({ ...fault, skipped: 0, failed: 0 });
  }

  /** The fault the request meets now, if any (counted as met). */
  private faultFor(method: string, path: string, when: "before" | "after"): MatrixError | undefined {
    const f = this.faults.find(
      (f) =>
        (f.when ?? "before") === when && (f.method === undefined || f.method === method) && f.path.test(path),
    );
    if (!f) return undefined;
    if (f.skipped < (f.skip ?? 0)) {
      f.skipped++;
      return undefined;
    }
    if (++f.failed >= (f.times ?? 1)) this.faults.splice(this.faults.indexOf(f), 1);
    return err(f.status ?? 500, f.errcode ?? "M_UNKNOWN", "injected fault");
  }

  /** Next *new* transaction gets this id (simulates Synapse restarting its counter at 1). */
  setNextTxnId(n: number): void {
    if (!Number.isSafeInteger(n) || n < 0) throw new Error("txn id must be a non-negative integer");
    this.nextTxnId = n;
  }

  /** Number of events queued (not yet in a transaction) plus those in the in-flight transaction. */
  get pendingPushEvents(): number {
    return this.queue.length - this.queueHead + (this.inFlight?.events ?? 0);
  }

  /** Re-PUT an already-delivered transaction with the same txnId and byte-identical body. */
  async replayTransaction(txnId: string): Promise<number> {
    const t = this.delivered.get(txnId);
    if (!t) throw new Error(`transaction ${txnId} was never delivered (or is no longer retained)`);
    let status: number | "error" = "error";
    try {
      status = (await this.asRequest("PUT", this.txnPath(txnId), t.body)).status;
      return status;
    } finally {
      this.logPush({ txnId, events: t.events, status });
    }
  }

  /**
   * Send an arbitrary request to the appservice. `path` is relative to registration.url. `token`: undefined →
   * hs_token, null → no token. A string body is sent verbatim (to forge malformed JSON).
   */
  async pushRaw(
    path: string,
    body: unknown,
    token?: string | null,
    tokenMode?: "header" | "query",
    method = "PUT",
  ): Promise<{ status: number; body: unknown }> {
    const payload = body === undefined ? undefined : typeof body === "string" ? body : JSON.stringify(body);
    const res = await this.asRequest(
      method,
      path,
      payload,
      token === undefined ? this.registration.hs_token : token,
      tokenMode ?? this.opts.authMode,
    );
    let parsed: unknown = res.text;
    try {
      parsed = res.text ? JSON.parse(res.text) : undefined;
    } catch {
      // not JSON: return text
    }
    return { status: res.status, body: parsed };
  }

  // -------------------------------------------------------------------------------------------------------------
  // Namespaces (AS API §Registration)
  // -------------------------------------------------------------------------------------------------------------

  /** The appservice is interested in this user: sender, or matches a user namespace (Synapse semantics). */
  private userInterests(userId: string): boolean {
    let v = this.nsCache.get(userId);
    if (v === undefined) {
      v = userId === this.senderId || this.userNs.some((n) => n.re.test(userId));
      if (this.nsCache.size > 100_000) this.nsCache.clear();
      this.nsCache.set(userId, v);
    }
    return v;
  }

  private aliasInNs(alias: string): boolean {
    return this.aliasNs.some((n) => n.re.test(alias));
  }

  private computeRoomIdOrAliasInterest(room: Room): void {
    room.idOrAliasInterest =
      this.roomNs.some((n) => n.re.test(room.roomId)) || [...room.aliases].some((a) => this.aliasInNs(a));
  }

  // -------------------------------------------------------------------------------------------------------------
  // Core model
  // -------------------------------------------------------------------------------------------------------------

  private createUser(userId: string): User {
    const u: User = {
      userId,
      rooms: new Set(),
      accountData: new Map(),
      presence: { presence: "offline", last_active_ts: Date.now() },
    };
    this.users.set(userId, u);
    return u;
  }

  /** Validate a desired localpart for registration; returns the full user id. */
  private checkNewUser(localpart: string): string {
    // Appendix §User Identifiers (v1.8+ grammar, includes "+"); ids are limited to 255 bytes.
    if (typeof localpart !== "string" || !LOCALPART_RE.test(localpart)) {
      throw err(
        400,
        "M_INVALID_USERNAME",
        `User ID localpart ${JSON.stringify(localpart)} has invalid characters`,
      );
    }
    const userId = `@${localpart}:${this.serverName}`;
    if (Buffer.byteLength(userId) > 255)
      throw err(400, "M_INVALID_USERNAME", "User ID may not be longer than 255");
    if (this.users.has(userId)) throw err(400, "M_USER_IN_USE", "User ID already taken.");
    return userId;
  }

  /** The user, if it was registered: the AS sender acts without that, but has no profile until it is. */
  private registeredUser(userId: string): User | undefined {
    if (userId === this.senderId && !this.senderRegistered) return undefined;
    return this.users.get(userId);
  }

  private requireUser(userId: string): User {
    const u = this.users.get(userId);
    if (!u) throw notFound(`User ${userId} does not exist`);
    return u;
  }

  private resolveRoom(roomIdOrAlias: string): string {
    if (roomIdOrAlias.startsWith("#")) {
      const a = this.aliases.get(roomIdOrAlias);
      if (!a) throw notFound(`Room alias ${roomIdOrAlias} not found`);
      return a.roomId;
    }
    return roomIdOrAlias;
  }

  private requireRoom(roomId: string): Room {
    const r = this.rooms.get(roomId);
    if (!r) throw notFound(`Unknown room ${roomId}`);
    return r;
  }

  private requireRoomForInspection(roomIdOrAlias: string): Room {
    const id = roomIdOrAlias.startsWith("#") ? this.aliases.get(roomIdOrAlias)?.roomId : roomIdOrAlias;
    const r = id === undefined ? undefined : this.rooms.get(id);
    if (!r) throw new Error(`TestHomeserver: unknown room ${roomIdOrAlias}`);
    return r;
  }

  private powerLevels(room: Room): Json | undefined {
    return room.state.get(stateKeyOf("m.room.power_levels", ""))?.content;
  }

  /**
   * Room versions §Authorization rules: user level (users[u] ?? users_default ?? 0; creator 100 without
   * PL). From version 12 on, the creators (the create event's sender and `additional_creators`) rank
   * above every level (Room versions §12, MSC4289).
   */
  private userLevel(room: Room, userId: string): number {
    if (this.creatorsOf(room).has(userId)) return CREATOR_POWER_LEVEL;
    const pl = this.powerLevels(room);
    if (!pl) {
      const create = room.state.get(stateKeyOf("m.room.create", ""));
      return create?.sender === userId ? 100 : 0;
    }
    const users = isObject(pl.users) ? pl.users : {};
    const v = users[userId];
    if (isInt(v)) return v;
    return isInt(pl.users_default) ? pl.users_default : 0;
  }

  /** Room versions §12: the users who rank above every level; none before version 12. */
  private creatorsOf(room: Room): ReadonlySet<string> {
    if (!createsCreators(room.version)) return new Set();
    const create = room.state.get(stateKeyOf("m.room.create", ""));
    if (!create) return new Set();
    const additional = Array.isArray(create.content.additional_creators)
      ? (create.content.additional_creators as unknown[]).filter((u): u is string => typeof u === "string")
      : [];
    return new Set([create.sender, ...additional]);
  }

  /**
   * Room versions §12, authorization rules for m.room.power_levels: no creator in `users`. Synapse
   * answers 400 M_UNKNOWN (event_auth.py _check_power_levels), at creation and on a change alike.
   */
  private refuseCreatorsInUsers(creators: ReadonlySet<string>, content: Json): void {
    const users = isObject(content.users) ? content.users : {};
    for (const creator of creators)
      if (creator in users)
        throw err(400, "M_UNKNOWN", `Creator user ${creator} must not appear in content.users`);
  }

  private requiredLevel(room: Room, type: string, isState: boolean): number {
    const pl = this.powerLevels(room);
    if (!pl) return 0;
    const events = isObject(pl.events) ? pl.events : {};
    const v = events[type];
    if (isInt(v)) return v;
    if (isState) return isInt(pl.state_default) ? pl.state_default : 50;
    return isInt(pl.events_default) ? pl.events_default : 0;
  }

  private namedLevel(room: Room, key: "invite" | "kick" | "ban" | "redact"): number {
    const pl = this.powerLevels(room);
    const v = pl?.[key];
    if (isInt(v)) return v;
    return key === "invite" ? 0 : 50;
  }

  private joinRule(room: Room): string {
    const c = room.state.get(stateKeyOf("m.room.join_rules", ""))?.content;
    return typeof c?.join_rule === "string" ? c.join_rule : "invite";
  }

  private requireJoined(room: Room, userId: string): void {
    if (room.membership.get(userId) !== "join") {
      throw forbidden(`User ${userId} not in room ${room.roomId}`);
    }
  }

  /**
   * Create, record and (if the appservice is interested) queue an event. All auth checks must have happened.
   * CS API §Size limits: the whole event must fit in 65536 bytes.
   */
  private appendEvent(
    room: Room,
    sender: string,
    type: string,
    content: Json,
    stateKey: string | undefined,
    meta: EvMeta,
  ): RecordedEvent {
    const ev: RecordedEvent = {
      event_id: meta.eventId ?? newEventId(),
      room_id: room.roomId,
      sender,
      type,
      content,
      origin_server_ts: meta.ts ?? Date.now(),
    };
    if (stateKey !== undefined) {
      ev.state_key = stateKey;
      const prev = room.state.get(stateKeyOf(type, stateKey));
      if (prev)
        ev.unsigned = { prev_content: prev.content, replaces_state: prev.event_id, prev_sender: prev.sender };
    }
    if (meta.redacts !== undefined) ev.redacts = meta.redacts;
    // ClientEvent format for pushes (AS API §Pushing events). Serialised once; reused for every transaction.
    const json = JSON.stringify({
      content: ev.content,
      event_id: ev.event_id,
      origin_server_ts: ev.origin_server_ts,
      room_id: ev.room_id,
      sender: ev.sender,
      ...(stateKey !== undefined ? { state_key: stateKey } : {}),
      type: ev.type,
      ...(ev.redacts !== undefined ? { redacts: ev.redacts } : {}),
      ...(ev.unsigned ? { unsigned: ev.unsigned } : {}),
    });
    const budget = MAX_EVENT_BYTES - PDU_OVERHEAD_BYTES;
    if (json.length * 3 > budget && Buffer.byteLength(json) > budget) {
      throw err(413, "M_TOO_LARGE", `event too large (max ${MAX_EVENT_BYTES} bytes)`);
    }
    if (meta.txnId !== undefined) ev.txn_id = meta.txnId;

    // Apply to state.
    if (stateKey !== undefined) {
      room.state.set(stateKeyOf(type, stateKey), ev);
      if (type === "m.room.member") this.applyMembership(room, stateKey, ev.content.membership as Membership);
      else if (type === "m.room.canonical_alias") this.computeRoomIdOrAliasInterest(room);
    }
    room.events.push(ev);
    if (type === "m.room.message") room.messages.push(ev);
    this.eventIndex.set(ev.event_id, { room, event: ev, txnScope: meta.txnScope });
    const relation = relationOf(content);
    if (relation) this.relationTargets.add(relation.eventId);

    // AS API §Registration ("interested" in an event), Synapse's is_interested_in_event.
    const interested =
      this.userInterests(sender) ||
      (type === "m.room.member" && stateKey !== undefined && this.userInterests(stateKey)) ||
      room.idOrAliasInterest ||
      room.interestedJoined > 0;
    if (interested && this.pushTarget) {
      this.queue.push(json);
      this.queueRooms.push(room.roomId);
      this.schedulePump();
    }
    if (this.waiters.size) for (const w of [...this.waiters]) w.check();
    return ev;
  }

  private applyMembership(room: Room, userId: string, m: Membership): void {
    const old = room.membership.get(userId);
    room.membership.set(userId, m);
    const user = this.users.get(userId);
    if ((old === "join") !== (m === "join")) {
      const pos = this.devices.noteStream();
      this.membershipLog.push({ pos, roomId: room.roomId, userId, joined: m === "join" });
    }
    if (old === "join" && m !== "join") {
      room.joined.delete(userId);
      user?.rooms.delete(room.roomId);
      if (this.userInterests(userId)) room.interestedJoined--;
    } else if (old !== "join" && m === "join") {
      room.joined.add(userId);
      user?.rooms.add(room.roomId);
      if (this.userInterests(userId)) room.interestedJoined++;
    }
  }

  /** Profile fields to copy into join/invite member events (Synapse does). */
  private profileContent(userId: string, content: Json): Json {
    const u = this.users.get(userId);
    if (u) {
      if (!("displayname" in content) && u.displayname !== undefined) content.displayname = u.displayname;
      if (!("avatar_url" in content) && u.avatar_url !== undefined) content.avatar_url = u.avatar_url;
    }
    return content;
  }

  /**
   * Emit a membership event unless it would be an exact duplicate of the current one (same sender, same
   * membership, same content), in which case Synapse returns the existing event id without a new event.
   */
  private emitMembership(room: Room, sender: string, target: string, content: Json, meta: EvMeta): string {
    const cur = room.state.get(stateKeyOf("m.room.member", target));
    if (cur && cur.sender === sender && JSON.stringify(cur.content) === JSON.stringify(content)) {
      return cur.event_id;
    }
    return this.appendEvent(room, sender, "m.room.member", content, target, meta).event_id;
  }

  // Room versions §Authorization rules, m.room.member, membership=join.
  private doJoin(room: Room, userId: string, extra: Json, meta: EvMeta): string {
    const cur = room.membership.get(userId);
    if (cur === "ban") throw forbidden(`User ${userId} is banned from the room`);
    const rule = this.joinRule(room);
    if (cur !== "join" && cur !== "invite" && rule !== "public") {
      throw forbidden(`You are not invited to this room.`);
    }
    const content = this.profileContent(userId, { ...extra, membership: "join" });
    return this.emitMembership(room, userId, userId, content, meta);
  }

  // Room versions §Authorization rules, m.room.member, membership=invite.
  private doInvite(room: Room, sender: string, target: string, extra: Json, meta: EvMeta) {
    this.requireJoined(room, sender);
    if (!target.startsWith("@") || !target.includes(":"))
      throw err(400, "M_INVALID_PARAM", `Invalid user id ${target}`);
    const cur = room.membership.get(target);
    if (cur === "join") throw forbidden(`${target} is already in the room.`);
    if (cur === "ban") throw forbidden(`${target} is banned from the room`);
    if (this.userLevel(room, sender) < this.namedLevel(room, "invite")) {
      throw forbidden(`You don't have permission to invite users`);
    }
    const content = this.profileContent(target, { ...extra, membership: "invite" });
    return this.emitMembership(room, sender, target, content, meta);
  }

  // Room versions §Authorization rules, m.room.member, membership=leave (self leave or kick).
  private doLeave(room: Room, sender: string, target: string, extra: Json, meta: EvMeta): string {
    const cur = room.membership.get(target);
    if (sender === target) {
      if (cur === "leave")
        return this.emitMembership(room, sender, target, { ...extra, membership: "leave" }, meta);
      if (cur !== "join" && cur !== "invite" && cur !== "knock") {
        throw forbidden(`User ${target} not in room ${room.roomId}`);
      }
    } else {
      this.requireJoined(room, sender);
      if (cur === "ban") {
        if (this.userLevel(room, sender) < this.namedLevel(room, "ban"))
          throw forbidden("You cannot unban users");
      } else {
        if (cur !== "join" && cur !== "invite" && cur !== "knock") {
          throw forbidden(`${target} is not in the room`);
        }
        const sl = this.userLevel(room, sender);
        if (sl < this.namedLevel(room, "kick") || sl <= this.userLevel(room, target)) {
          throw forbidden(`You cannot kick user ${target}.`);
        }
      }
    }
    return this.emitMembership(room, sender, target, { ...extra, membership: "leave" }, meta);
  }

  private doBan(room: Room, sender: string, target: string, extra: Json, meta: EvMeta) {
    this.requireJoined(room, sender);
    const sl = this.userLevel(room, sender);
    if (sl < this.namedLevel(room, "ban") || sl <= this.userLevel(room, target)) {
      throw forbidden(`You cannot ban user ${target}.`);
    }
    return this.emitMembership(room, sender, target, { ...extra, membership: "ban" }, meta);
  }

  /**
   * Synapse's _validate_event_relation (handlers/message.py), for a relation — an `m.relates_to`
   * with a string `rel_type` and `event_id` (events/utils relation_from_event; a bare
   * `m.in_reply_to` is none, so a reply to an unknown event is accepted):
   * - its parent, when known, is in the same room ("Relations must be in the same room");
   * - an unknown parent is refused unless some event already relates to it ("Can't send relation
   *   to unknown event");
   * - CS API §Threading, server behaviour: an `m.thread` whose parent itself has a relation is
   *   refused, 400 M_UNKNOWN ("Cannot start threads from an event with a relation"). A redacted
   *   parent has lost its relation (Synapse deletes its event_relations row), so it may be a root.
   */
  private validateRelation(room: Room, content: Json): void {
    const relation = relationOf(content);
    if (!relation) return;
    const parent = this.eventIndex.get(relation.eventId);
    if (parent) {
      if (parent.room !== room) throw err(400, "M_UNKNOWN", "Relations must be in the same room");
    } else if (!this.relationTargets.has(relation.eventId)) {
      throw err(400, "M_UNKNOWN", "Can't send relation to unknown event");
    }
    if (relation.relType === "m.thread" && parent && relationOf(parent.event.content)) {
      throw err(400, "M_UNKNOWN", "Cannot start threads from an event with a relation");
    }
  }

  /**
   * CS API §Event annotations and reactions, server behaviour: a second annotation of one event
   * with the same event type and key by the same sender is refused, as Synapse does (400
   * M_DUPLICATE_ANNOTATION). A redacted one no longer counts (it has lost its relation).
   */
  private refuseDuplicateAnnotation(room: Room, sender: string, type: string, content: Json): void {
    const relation = relationOf(content);
    const key = (content["m.relates_to"] as Json | undefined)?.key;
    if (relation?.relType !== "m.annotation" || typeof key !== "string") return;
    const duplicate = room.events.some(
      (e) =>
        e.sender === sender &&
        e.type === type &&
        relationOf(e.content)?.relType === "m.annotation" &&
        relationOf(e.content)?.eventId === relation.eventId &&
        (e.content["m.relates_to"] as Json).key === key,
    );
    if (duplicate) throw err(400, "M_DUPLICATE_ANNOTATION", "Can't send same reaction twice");
  }

  /** Message events: CS API §Sending events + Room versions §Authorization rules. */
  private sendEvent(
    room: Room,
    sender: string,
    type: string,
    content: Json,
    stateKey: string | undefined,
    meta: EvMeta,
  ): RecordedEvent {
    this.requireUser(sender);
    this.requireJoined(room, sender);
    if (this.userLevel(room, sender) < this.requiredLevel(room, type, stateKey !== undefined)) {
      throw forbidden(`You don't have permission to post ${type} events`);
    }
    return this.appendEvent(room, sender, type, content, stateKey, meta);
  }

  /** CS API PUT /rooms/{roomId}/state/{eventType}/{stateKey}. Returns the event id. */
  private putState(
    room: Room,
    requester: Requester,
    type: string,
    stateKey: string,
    content: Json,
    meta: { ts?: number | undefined },
  ): string {
    const sender = requester.userId;
    this.requireUser(sender);
    const m = { txnScope: requester.txnScope, ts: meta.ts };
    if (type === "m.room.create") throw forbidden("Cannot send m.room.create in an existing room");
    if (type === "m.room.member") {
      const membership = content.membership;
      if (typeof membership !== "string" || !MEMBERSHIPS.includes(membership)) {
        throw badJson("membership must be one of join, invite, leave, ban, knock");
      }
      const { membership: _m, ...extra } = content;
      void _m;
      switch (membership) {
        case "join":
          if (stateKey !== sender) throw forbidden("Cannot force another user to join.");
          return this.doJoin(room, sender, extra, m);
        case "invite":
          return this.doInvite(room, sender, stateKey, extra, m);
        case "leave":
          return this.doLeave(room, sender, stateKey, extra, m);
        case "ban":
          return this.doBan(room, sender, stateKey, extra, m);
        default:
          throw forbidden("knock is not supported by this room's join rule");
      }
    }
    // Room versions §Authorization rules: state keys starting with "@" are owned by that user.
    if (stateKey.startsWith("@") && stateKey !== sender) {
      throw forbidden("You are not allowed to set others' state");
    }
    this.requireJoined(room, sender);
    const senderLevel = this.userLevel(room, sender);
    if (senderLevel < this.requiredLevel(room, type, true)) {
      throw forbidden(`You don't have permission to post ${type} events`);
    }
    if (type === "m.room.power_levels" && stateKey === "") this.checkPowerLevelsChange(room, sender, content);
    if (type === "m.room.canonical_alias" && stateKey === "") this.checkCanonicalAlias(room, content);
    if (type === "m.room.join_rules" && stateKey === "" && typeof content.join_rule !== "string") {
      throw badJson("join_rule must be a string");
    }
    return this.appendEvent(room, sender, type, content, stateKey, m).event_id;
  }

  /** Room versions §Authorization rules for m.room.power_levels (rule 10, simplified to levels that change). */
  private checkPowerLevelsChange(room: Room, sender: string, content: Json): void {
    this.refuseCreatorsInUsers(this.creatorsOf(room), content);
    const old = this.powerLevels(room) ?? {};
    const level = this.userLevel(room, sender);
    const top = ["users_default", "events_default", "state_default", "ban", "redact", "kick", "invite"];
    for (const k of top) {
      if (k in content && !isInt(content[k])) throw badJson(`${k} must be an integer`);
    }
    for (const k of ["users", "events", "notifications"]) {
      if (k in content && !isObject(content[k])) throw badJson(`${k} must be an object`);
    }
    const check = (oldV: unknown, newV: unknown, what: string): void => {
      if (oldV === newV) return;
      if (isInt(oldV) && oldV > level) throw forbidden(`You don't have permission to change ${what}`);
      if (isInt(newV) && newV > level)
        throw forbidden(`You don't have permission to raise ${what} above your own`);
    };
    for (const k of top) check(old[k], content[k], k);
    for (const k of ["events", "users", "notifications"]) {
      const o = isObject(old[k]) ? (old[k] as Json) : {};
      const n = isObject(content[k]) ? (content[k] as Json) : {};
      for (const key of new Set([...Object.keys(o), ...Object.keys(n)])) {
        if (k !== "notifications" && key in n && !isInt(n[key]))
          throw badJson(`${k}.${key} must be an integer`);
        if (k === "users" && key !== sender && o[key] !== n[key] && isInt(o[key]) && o[key] >= level) {
          throw forbidden(`You cannot change the level of ${key}`);
        }
        check(o[key], n[key], `${k}.${key}`);
      }
    }
  }

  /** CS API PUT state m.room.canonical_alias: aliases must exist and point to the room, else 400 M_BAD_ALIAS. */
  private checkCanonicalAlias(room: Room, content: Json): void {
    const all: unknown[] = [];
    if (content.alias !== undefined && content.alias !== null) all.push(content.alias);
    if (content.alt_aliases !== undefined) {
      if (!Array.isArray(content.alt_aliases)) throw badJson("alt_aliases must be an array");
      all.push(...(content.alt_aliases as unknown[]));
    }
    for (const a of all) {
      if (typeof a !== "string" || !ALIAS_RE.test(a))
        throw err(400, "M_INVALID_PARAM", `Invalid alias ${String(a)}`);
      if (this.aliases.get(a)?.roomId !== room.roomId) {
        throw err(400, "M_BAD_ALIAS", `Room alias ${a} does not point to the room`);
      }
    }
  }

  /** Validate an alias we are about to create. AS API §Server admin style permissions for namespaces. */
  private checkAliasCreation(alias: string, requester: Requester): void {
    if (!ALIAS_RE.test(alias)) throw err(400, "M_INVALID_PARAM", `Invalid room alias ${alias}`);
    if (!alias.endsWith(`:${this.serverName}`)) throw err(400, "M_INVALID_PARAM", "Room alias must be local");
    if (Buffer.byteLength(alias) > 255) throw err(400, "M_INVALID_PARAM", "Room alias too long");
    if (requester.isAs) {
      if (!this.aliasInNs(alias)) {
        throw err(400, "M_EXCLUSIVE", "This application service has not reserved this kind of alias.");
      }
    } else if (this.aliasNs.some((n) => n.exclusive && n.re.test(alias))) {
      throw err(400, "M_EXCLUSIVE", "This alias is reserved by an application service.");
    }
  }

  private addAlias(alias: string, room: Room, creator: string): void {
    this.aliases.set(alias, { roomId: room.roomId, creator });
    room.aliases.add(alias);
    this.computeRoomIdOrAliasInterest(room);
  }

  /** CS API §Creation (POST /createRoom), event order as specified. */
  private doCreateRoom(requester: Requester, body: Json): string {
    const creator = requester.userId;
    this.requireUser(creator);
    const preset =
      body.preset === undefined
        ? body.visibility === "public"
          ? "public_chat"
          : "private_chat"
        : body.preset;
    if (preset !== "public_chat" && preset !== "private_chat" && preset !== "trusted_private_chat") {
      throw badJson(`Unknown preset ${String(preset)}`);
    }
    const version = body.room_version === undefined ? DEFAULT_ROOM_VERSION : body.room_version;
    if (typeof version !== "string" || !SUPPORTED_ROOM_VERSIONS.includes(version)) {
      throw err(
        400,
        "M_UNSUPPORTED_ROOM_VERSION",
        `Your homeserver does not support room version ${String(version)}`,
      );
    }
    let alias: string | undefined;
    if (body.room_alias_name !== undefined) {
      if (
        typeof body.room_alias_name !== "string" ||
        /[:\s]/.test(body.room_alias_name) ||
        !body.room_alias_name
      ) {
        throw err(400, "M_INVALID_PARAM", "Invalid characters in room alias");
      }
      alias = `#${body.room_alias_name}:${this.serverName}`;
      this.checkAliasCreation(alias, requester);
      if (this.aliases.has(alias)) throw err(400, "M_ROOM_IN_USE", "Room alias already taken");
    }
    const invites: string[] = [];
    if (body.invite !== undefined) {
      if (!Array.isArray(body.invite)) throw badJson("invite must be an array of user ids");
      for (const u of body.invite as unknown[]) {
        if (typeof u !== "string" || !/^@[^:]+:.+$/.test(u))
          throw err(400, "M_INVALID_PARAM", `Invalid user id ${u}`);
        invites.push(u);
      }
    }
    for (const k of ["name", "topic"] as const) {
      if (body[k] !== undefined && typeof body[k] !== "string") throw badJson(`${k} must be a string`);
    }
    const initialState: { type: string; state_key: string; content: Json }[] = [];
    if (body.initial_state !== undefined) {
      if (!Array.isArray(body.initial_state)) throw badJson("initial_state must be an array");
      for (const s of body.initial_state as unknown[]) {
        if (!isObject(s) || typeof s.type !== "string" || !isObject(s.content)) {
          throw badJson("initial_state entries need type and content");
        }
        if (s.state_key !== undefined && typeof s.state_key !== "string")
          throw badJson("state_key must be a string");
        initialState.push({
          type: s.type,
          state_key: (s.state_key as string | undefined) ?? "",
          content: s.content,
        });
      }
    }
    if (body.creation_content !== undefined && !isObject(body.creation_content)) {
      throw badJson("creation_content must be an object");
    }
    if (body.power_level_content_override !== undefined && !isObject(body.power_level_content_override)) {
      throw badJson("power_level_content_override must be an object");
    }
    const createContent: Json = { ...(body.creation_content as Json | undefined), room_version: version };
    if (Number(version) < 11) createContent.creator = creator;
    // Room versions §12: the room id is the create event's (its reference hash), without a server;
    // a trusted_private_chat's invitees are its additional creators (Synapse, MSC4289).
    let createEventId: string | undefined;
    let roomId = `!${randomLetters(18)}:${this.serverName}`;
    if (createsCreators(version)) {
      createEventId = newEventId();
      roomId = `!${createEventId.slice(1)}`;
      const additional = createContent.additional_creators;
      if (
        additional !== undefined &&
        (!Array.isArray(additional) ||
          additional.some((u) => typeof u !== "string" || !/^@[^:]+:.+$/.test(u)))
      )
        throw badJson("additional_creators must be an array of user ids");
      if (preset === "trusted_private_chat" && invites.length > 0)
        createContent.additional_creators = [...new Set([...((additional as string[]) ?? []), ...invites])];
      const creators = new Set([creator, ...((createContent.additional_creators as string[]) ?? [])]);
      this.refuseCreatorsInUsers(creators, (body.power_level_content_override as Json | undefined) ?? {});
    }
    const room: Room = {
      roomId,
      version,
      events: [],
      messages: [],
      state: new Map(),
      membership: new Map(),
      joined: new Set(),
      interestedJoined: 0,
      idOrAliasInterest: false,
      aliases: new Set(),
    };
    this.rooms.set(roomId, room);
    // The alias association exists before the room's events are sent (so alias-namespace interest applies).
    if (alias !== undefined) this.addAlias(alias, room, creator);
    else this.computeRoomIdOrAliasInterest(room);
    const meta = { txnScope: requester.txnScope };
    const state = (type: string, content: Json, key = ""): void => {
      this.appendEvent(room, creator, type, content, key, meta);
    };
    this.appendEvent(room, creator, "m.room.create", createContent, "", { ...meta, eventId: createEventId });
    state("m.room.member", this.profileContent(creator, { membership: "join" }), creator);
    // Synapse's default power levels; from version 12 on, its creators are not listed (they rank
    // above every level).
    const v12 = createsCreators(version);
    const users: Json = v12 ? {} : { [creator]: 100 };
    if (preset === "trusted_private_chat" && !v12) for (const u of invites) users[u] = 100;
    const pl: Json = {
      users,
      users_default: 0,
      events: {
        "m.room.name": 50,
        "m.room.power_levels": 100,
        "m.room.history_visibility": 100,
        "m.room.canonical_alias": 50,
        "m.room.avatar": 50,
        "m.room.tombstone": v12 ? 150 : 100,
        "m.room.server_acl": 100,
        "m.room.encryption": 100,
      },
      events_default: 0,
      state_default: 50,
      ban: 50,
      kick: 50,
      redact: 50,
      // Synapse: 50, and 0 in its private_chat and trusted_private_chat presets.
      invite: preset === "public_chat" ? 50 : 0,
      ...(body.power_level_content_override as Json | undefined),
    };
    state("m.room.power_levels", pl);
    if (alias !== undefined) state("m.room.canonical_alias", { alias });
    state("m.room.join_rules", { join_rule: preset === "public_chat" ? "public" : "invite" });
    state("m.room.history_visibility", { history_visibility: "shared" });
    if (preset !== "public_chat") state("m.room.guest_access", { guest_access: "can_join" });
    for (const s of initialState) state(s.type, s.content, s.state_key);
    if (typeof body.name === "string") state("m.room.name", { name: body.name });
    if (typeof body.topic === "string") state("m.room.topic", { topic: body.topic });
    for (const u of invites) {
      const content: Json = { membership: "invite" };
      if (body.is_direct === true) content.is_direct = true;
      this.appendEvent(room, creator, "m.room.member", this.profileContent(u, content), u, meta);
    }
    return roomId;
  }

  private setProfileField(user: User, field: "displayname" | "avatar_url", value: string | undefined): void {
    if (value === "") value = undefined;
    if (user[field] === value) return;
    if (value === undefined) delete user[field];
    else user[field] = value;
    // CS API §Profiles / Synapse: propagate to m.room.member events of every joined room.
    for (const roomId of user.rooms) {
      const room = this.rooms.get(roomId);
      const cur = room?.state.get(stateKeyOf("m.room.member", user.userId));
      if (!room || !cur) continue;
      const content: Json = { ...cur.content, membership: "join" };
      if (value === undefined) delete content[field];
      else content[field] = value;
      this.appendEvent(room, user.userId, "m.room.member", content, user.userId, {});
    }
  }

  /** Room versions §Redactions: strip content except the keys the algorithm preserves (v10 rules). */
  private redactInPlace(ev: RecordedEvent, redactionId: string): void {
    const keep: Record<string, string[]> = {
      "m.room.member": ["membership", "join_authorised_via_users_server"],
      "m.room.create": ["creator"],
      "m.room.join_rules": ["join_rule", "allow"],
      "m.room.power_levels": [
        "ban",
        "events",
        "events_default",
        "kick",
        "redact",
        "state_default",
        "users",
        "users_default",
        "invite",
      ],
      "m.room.history_visibility": ["history_visibility"],
    };
    const content: Json = {};
    for (const k of keep[ev.type] ?? []) if (k in ev.content) content[k] = ev.content[k];
    ev.content = content;
    ev.unsigned = { ...ev.unsigned, redacted_because: redactionId };
  }

  private toClientEvent(ev: RecordedEvent, requester: Requester | undefined): Json {
    const out: Json = {
      content: ev.content,
      event_id: ev.event_id,
      origin_server_ts: ev.origin_server_ts,
      room_id: ev.room_id,
      sender: ev.sender,
      type: ev.type,
    };
    if (ev.state_key !== undefined) out.state_key = ev.state_key;
    if (ev.redacts !== undefined) out.redacts = ev.redacts;
    const unsigned: Json = { ...ev.unsigned, age: Date.now() - ev.origin_server_ts };
    const stored = this.eventIndex.get(ev.event_id);
    // CS API ClientEvent unsigned.transaction_id: only to the client session that sent it.
    if (ev.txn_id !== undefined && requester && stored?.txnScope === requester.txnScope) {
      unsigned.transaction_id = ev.txn_id;
    }
    out.unsigned = unsigned;
    return out;
  }

  /**
   * Can `userId` read the room's state/events? Joined members, former members (approximation: the spec gives
   * them the state at the time they left; we return the current state) and world_readable rooms.
   */
  private requireCanRead(room: Room, userId: string): void {
    const m = room.membership.get(userId);
    if (m === "join" || m === "leave" || m === "ban") return;
    const hv = room.state.get(stateKeyOf("m.room.history_visibility", ""))?.content.history_visibility;
    if (hv === "world_readable") return;
    throw forbidden(`User ${userId} not in room ${room.roomId}, and room previews are disabled`);
  }

  // -------------------------------------------------------------------------------------------------------------
  // HTTP server
  // -------------------------------------------------------------------------------------------------------------

  private route(
    method: string,
    pattern: string,
    auth: Route["auth"],
    body: Route["body"],
    handler: Handler,
  ): void {
    const segs = pattern.split("/").map((s) => {
      if (s === "{v}") return ["r0", "v3"] as const;
      if (s === "{mv}") return ["r0", "v3"] as const;
      if (s.startsWith(":")) return null;
      return s;
    });
    this.routes.push({
      method,
      segs,
      auth,
      body,
      maxBody: body === "raw" ? this.opts.maxUploadBytes : MAX_JSON_BODY,
      allowEmptyLast: pattern.endsWith(":stateKey"),
      handler,
    });
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const rawUrl = req.url ?? "/";
    const q = rawUrl.indexOf("?");
    const path = q < 0 ? rawUrl : rawUrl.slice(0, q);
    const query = new URLSearchParams(q < 0 ? "" : rawUrl.slice(q + 1));
    const method = req.method ?? "GET";
    const log: RequestLogEntry = { method, path, status: 0 };
    if (this.down === "bad-gateway") {
      req.resume();
      res.writeHead(502, { "content-type": "text/html" }).end("<html><body>502 Bad Gateway</body></html>");
      return;
    }
    try {
      if (method === "OPTIONS") {
        // CS API §Web Browser Clients: pre-flight requests.
        this.send(res, { status: 200, body: {} }, log);
        req.resume();
        return;
      }
      const parts = path.split("/");
      let decoded: string[];
      try {
        decoded = parts.map((p) => (p.includes("%") ? decodeURIComponent(p) : p));
      } catch {
        throw err(400, "M_UNRECOGNIZED", "Invalid percent-encoding in path");
      }
      let route: Route | undefined;
      let params: string[] = [];
      let pathMatched = false;
      for (const r of this.routes) {
        const p = this.match(r, decoded);
        if (!p) continue;
        pathMatched = true;
        if (r.method === method) {
          route = r;
          params = p;
          break;
        }
      }
      if (!route) {
        req.resume();
        if (pathMatched) throw err(405, "M_UNRECOGNIZED", "Unrecognized request");
        throw err(404, "M_UNRECOGNIZED", "Unrecognized request");
      }
      // Read the body (bounded).
      let raw: Buffer | undefined;
      let body: unknown;
      if (route.body !== "none") {
        raw = await this.readBody(req, route.maxBody);
        if (route.body === "json" || route.body === "json?") {
          if (raw.length === 0 && route.body === "json?") body = {};
          else {
            try {
              body = JSON.parse(raw.toString("utf8"));
            } catch {
              throw err(400, "M_NOT_JSON", "Content not JSON.");
            }
            if (!isObject(body)) throw err(400, "M_BAD_JSON", "Content must be a JSON object.");
          }
        }
      } else {
        req.resume();
      }
      // Authentication (CS API §Client Authentication, AS API §Identity assertion).
      const token = route.auth === "none" ? undefined : this.extractToken(req, query);
      let requester: Requester | undefined;
      if (route.auth === "user") {
        requester = this.authenticate(token, query);
        log.userId = requester.userId;
      }
      const ctx: Ctx = { req, path, params, query, token, requester, body, raw };
      const before = this.faultFor(method, path, "before");
      if (before) throw before;
      const reply = await route.handler(ctx);
      if (ctx.requester) log.userId = ctx.requester.userId;
      const after = this.faultFor(method, path, "after");
      if (after) throw after;
      this.send(res, reply, log);
    } catch (e) {
      const me =
        e instanceof MatrixError ? e : err(500, "M_UNKNOWN", e instanceof Error ? e.message : String(e));
      if (me.status === 413) res.setHeader("Connection", "close");
      this.send(res, { status: me.status, body: me.toJSON() }, log);
    }
  }

  private match(r: Route, decoded: string[]): string[] | undefined {
    if (r.segs.length !== decoded.length) return undefined;
    const params: string[] = [];
    for (let i = 0; i < decoded.length; i++) {
      const s = r.segs[i]!;
      const d = decoded[i]!;
      if (s === null) {
        if (d === "" && !(r.allowEmptyLast && i === decoded.length - 1)) return undefined;
        params.push(d);
      } else if (typeof s === "string") {
        if (s !== d) return undefined;
      } else if (!s.includes(d)) return undefined;
    }
    return params;
  }

  private readBody(req: http.IncomingMessage, max: number): Promise<Buffer> {
    const declared = Number(req.headers["content-length"] ?? "0");
    if (declared > max) {
      req.resume();
      return Promise.reject(err(413, "M_TOO_LARGE", `Request body too large (max ${max} bytes)`));
    }
    return new Promise((resolve, reject) => {
      const chunks: Buffer[] = [];
      let size = 0;
      let failed = false;
      req.on("data", (c: Buffer) => {
        if (failed) return;
        size += c.length;
        if (size > max) {
          failed = true;
          reject(err(413, "M_TOO_LARGE", `Request body too large (max ${max} bytes)`));
          return;
        }
        chunks.push(c);
      });
      req.on("end", () => {
        if (!failed) resolve(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks));
      });
      req.on("error", (e) => {
        if (!failed) reject(e);
      });
    });
  }

  private send(res: http.ServerResponse, reply: Reply, log: RequestLogEntry): void {
    log.status = reply.status;
    this.requestLog.push(log);
    if (this.requestLog.length >= LOG_LIMIT + 2000)
      this.requestLog.splice(0, this.requestLog.length - LOG_LIMIT);
    if (res.headersSent || res.destroyed) return;
    if ("raw" in reply) {
      res.writeHead(reply.status, { ...reply.headers, "Content-Length": reply.raw.length });
      res.end(reply.raw);
      return;
    }
    const text = JSON.stringify(reply.body);
    res.writeHead(reply.status, { ...JSON_HEADERS, "Content-Length": Buffer.byteLength(text) });
    res.end(text);
  }

  private extractToken(req: http.IncomingMessage, query: URLSearchParams): string | undefined {
    const h = req.headers.authorization;
    const qt = query.get("access_token");
    if (h !== undefined) {
      const m = /^Bearer\s+(\S+)\s*$/i.exec(h);
      if (!m) throw err(401, "M_MISSING_TOKEN", "Invalid Authorization header.");
      // Synapse refuses to mix both ways of passing the token.
      if (qt !== null)
        throw err(401, "M_MISSING_TOKEN", "Mixing Authorization headers and access_token query parameters.");
      return m[1];
    }
    return qt ?? undefined;
  }

  private authenticate(token: string | undefined, query: URLSearchParams): Requester {
    if (token === undefined) throw err(401, "M_MISSING_TOKEN", "Missing access token.");
    if (token === this.registration.as_token) {
      // AS API §Identity assertion.
      const asserted = query.get("user_id");
      let userId = this.senderId;
      if (asserted !== null && asserted !== this.senderId) {
        if (!this.userInterests(asserted)) {
          throw forbidden(`Application service cannot masquerade as this user (${asserted}).`);
        }
        if (!this.users.has(asserted)) {
          throw forbidden(`Application service has not registered this user (${asserted})`);
        }
        userId = asserted;
      }
      return {
        userId,
        isAs: true,
        txnScope: `as\u0000${userId}`,
        deviceId: this.masqueradedDevice(userId, query),
      };
    }
    const userId = this.tokens.get(token);
    if (userId === undefined) {
      throw err(401, "M_UNKNOWN_TOKEN", "Unknown access token.", { soft_logout: false });
    }
    const deviceId = this.tokenDevices.get(token);
    if (deviceId !== undefined) this.devices.touch(userId, deviceId);
    return { userId, isAs: false, txnScope: `tok\u0000${token}`, deviceId };
  }

  /**
   * AS API §Identity assertion, MSC4326 (from MSC3202): `device_id` (or its unstable name
   * `org.matrix.msc3202.device_id`) makes an appservice request act as that device of the asserted
   * user, which must exist (Synapse's get_appservice_user). Ignored without `deviceMasquerading`.
   */
  private masqueradedDevice(userId: string, query: URLSearchParams): string | undefined {
    if (!this.opts.deviceMasquerading) return undefined;
    const deviceId = query.get("device_id") ?? query.get("org.matrix.msc3202.device_id");
    if (deviceId === null || deviceId === "") return undefined;
    if (!this.devices.has(userId, deviceId)) {
      throw err(
        400,
        "ORG.MATRIX.MSC4326.M_UNKNOWN_DEVICE",
        `Application service trying to use a device that doesn't exist ('${deviceId}' for ${userId})`,
      );
    }
    return deviceId;
  }

  /** A new access token for a device of the user (made unless it exists): login, registration. */
  private issueToken(userId: string, deviceId: string, displayName?: string): string {
    this.devices.upsert(userId, deviceId, displayName);
    const token = newToken("syt_");
    this.tokens.set(token, userId);
    this.tokenDevices.set(token, deviceId);
    return token;
  }

  /** Deletes a device: its access tokens, keys and to-device inbox go with it (Synapse's delete_devices). */
  private deleteDevice(userId: string, deviceId: string): void {
    for (const [token, d] of this.tokenDevices)
      if (d === deviceId && this.tokens.get(token) === userId) {
        this.tokenDevices.delete(token);
        this.tokens.delete(token);
      }
    this.devices.delete(userId, deviceId);
  }

  /**
   * MSC3202: a user's device list changed; the appservice hears of it when the user is its own, or
   * in a room it is interested in (Synapse's _is_appservice_interested_in_device_lists_of_user).
   */
  private deviceListChanged(userId: string): void {
    if (!this.msc3202InTransactions() || !this.pushTarget) return;
    const rooms = [...(this.users.get(userId)?.rooms ?? [])].map((id) => this.rooms.get(id));
    const interested =
      this.userInterests(userId) || rooms.some((r) => r && (r.interestedJoined > 0 || r.idOrAliasInterest));
    if (!interested || this.appserviceDown) return;
    this.asDeviceListChanged.add(userId);
    this.schedulePump();
  }

  private asTimestamp(ctx: Ctx): number | undefined {
    // AS API §Timestamp massaging: `ts` query parameter, application services only.
    const ts = ctx.query.get("ts");
    if (ts === null || !ctx.requester?.isAs) return undefined;
    const n = Number(ts);
    if (!Number.isSafeInteger(n)) throw err(400, "M_INVALID_PARAM", "ts must be an integer");
    return n;
  }

  private roomParam(roomId: string): Room {
    if (!ROOM_ID_RE.test(roomId)) throw err(400, "M_INVALID_PARAM", `Invalid room id ${roomId}`);
    return this.requireRoom(roomId);
  }

  private defineRoutes(): void {
    const C = "/_matrix/client/{v}";
    const r = this.route.bind(this);
    const req = (ctx: Ctx): Requester => ctx.requester!;
    const body = (ctx: Ctx): Json => ctx.body as Json;

    // CS API §GET /_matrix/client/versions
    r("GET", "/_matrix/client/versions", "none", "none", () =>
      ok({ versions: SPEC_VERSIONS, unstable_features: {} }),
    );
    r("GET", `${C}/capabilities`, "user", "none", () =>
      ok({
        capabilities: {
          "m.change_password": { enabled: false },
          "m.room_versions": {
            default: DEFAULT_ROOM_VERSION,
            available: Object.fromEntries(SUPPORTED_ROOM_VERSIONS.map((v) => [v, "stable"])),
          },
          "m.set_displayname": { enabled: true },
          "m.set_avatar_url": { enabled: true },
          "m.3pid_changes": { enabled: false },
        },
      }),
    );

    // CS API §Account registration and management.
    r("POST", `${C}/register`, "optional", "json", (ctx) => this.handleRegister(ctx));
    r("GET", `${C}/register/available`, "none", "none", (ctx) => {
      const username = ctx.query.get("username");
      if (username === null) throw err(400, "M_MISSING_PARAM", "Missing username");
      const userId = this.checkNewUser(username);
      if (this.userNs.some((n) => n.exclusive && n.re.test(userId))) {
        throw err(400, "M_EXCLUSIVE", "This user ID is reserved by an application service.");
      }
      return ok({ available: true });
    });
    r("GET", `${C}/account/whoami`, "user", "none", (ctx) => {
      const rq = req(ctx);
      return ok({ user_id: rq.userId, is_guest: false, ...(rq.deviceId ? { device_id: rq.deviceId } : {}) });
    });

    // CS API §Login; AS API §Server admin style permissions (m.login.application_service).
    r("GET", `${C}/login`, "none", "none", () => ok({ flows: [{ type: "m.login.application_service" }] }));
    r("POST", `${C}/login`, "optional", "json", (ctx) => {
      const b = body(ctx);
      if (b.type !== "m.login.application_service") throw err(400, "M_UNKNOWN", "Unknown login type");
      if (ctx.token === undefined) throw err(401, "M_MISSING_TOKEN", "Missing access token.");
      if (ctx.token !== this.registration.as_token)
        throw err(401, "M_UNKNOWN_TOKEN", "Unknown access token.");
      if (this.msc4190OptedIn()) {
        throw err(
          400,
          APPSERVICE_LOGIN_UNSUPPORTED,
          "This appservice has MSC4190 enabled, so appservice login cannot be used.",
        );
      }
      const ident = b.identifier;
      if (!isObject(ident) || ident.type !== "m.id.user" || typeof ident.user !== "string") {
        throw badJson("identifier must be an m.id.user identifier");
      }
      const userId = ident.user.startsWith("@") ? ident.user : `@${ident.user}:${this.serverName}`;
      if (!this.userInterests(userId))
        throw err(400, "M_EXCLUSIVE", "User is not in the application service's namespace");
      if (!this.users.has(userId)) throw forbidden("Invalid username or password");
      const deviceId = this.requestedDeviceId(b);
      // CS API §POST /login: an existing device_id is reused (a new token for it), else the device is made.
      const name =
        typeof b.initial_device_display_name === "string" ? b.initial_device_display_name : undefined;
      const token = this.issueToken(userId, deviceId, this.devices.has(userId, deviceId) ? undefined : name);
      return ok({ user_id: userId, access_token: token, device_id: deviceId, home_server: this.serverName });
    });

    // CS API §Room aliases.
    r("GET", `${C}/directory/room/:alias`, "none", "none", async (ctx) => {
      const alias = ctx.params[0]!;
      if (!ALIAS_RE.test(alias)) throw err(400, "M_INVALID_PARAM", `Invalid room alias ${alias}`);
      const roomId = await this.lookupAliasWithQuery(alias);
      if (roomId === undefined) throw notFound(`Room alias ${alias} not found`);
      return ok({ room_id: roomId, servers: [this.serverName] });
    });
    r("PUT", `${C}/directory/room/:alias`, "user", "json", (ctx) => {
      const alias = ctx.params[0]!;
      const b = body(ctx);
      if (typeof b.room_id !== "string") throw badJson("room_id must be a string");
      this.checkAliasCreation(alias, req(ctx));
      if (this.aliases.has(alias)) throw err(409, "M_UNKNOWN", `Room alias ${alias} already exists`);
      const room = this.roomParam(b.room_id);
      if (!req(ctx).isAs) this.requireJoined(room, req(ctx).userId);
      this.addAlias(alias, room, req(ctx).userId);
      return ok({});
    });
    r("DELETE", `${C}/directory/room/:alias`, "user", "none", (ctx) => {
      const alias = ctx.params[0]!;
      const a = this.aliases.get(alias);
      if (!a) throw notFound(`Room alias ${alias} not found`);
      const rq = req(ctx);
      const room = this.rooms.get(a.roomId);
      const allowed =
        (rq.isAs && this.aliasInNs(alias)) ||
        a.creator === rq.userId ||
        (room !== undefined &&
          room.membership.get(rq.userId) === "join" &&
          this.userLevel(room, rq.userId) >= this.requiredLevel(room, "m.room.canonical_alias", true));
      if (!allowed) throw forbidden("You don't have permission to delete the alias.");
      this.aliases.delete(alias);
      if (room) {
        room.aliases.delete(alias);
        this.computeRoomIdOrAliasInterest(room);
      }
      return ok({});
    });
    r("GET", `${C}/directory/list/room/:roomId`, "none", "none", (ctx) => {
      this.roomParam(ctx.params[0]!);
      return ok({ visibility: "private" });
    });
    r("PUT", `${C}/directory/list/room/:roomId`, "user", "json", (ctx) => {
      const room = this.roomParam(ctx.params[0]!);
      this.requireJoined(room, req(ctx).userId);
      return ok({});
    });

    // CS API §Creation.
    r("POST", `${C}/createRoom`, "user", "json", (ctx) =>
      ok({ room_id: this.doCreateRoom(req(ctx), body(ctx)) }),
    );

    // CS API §Joining rooms / §Leaving rooms.
    const joinHandler = async (ctx: Ctx, target: string): Promise<Reply> => {
      const rq = req(ctx);
      let roomId: string;
      if (target.startsWith("#")) {
        if (!ALIAS_RE.test(target)) throw err(400, "M_INVALID_PARAM", `Invalid room alias ${target}`);
        const id = await this.lookupAliasWithQuery(target);
        if (id === undefined) throw notFound(`Room alias ${target} not found`);
        roomId = id;
      } else if (target.startsWith("!")) {
        roomId = target;
      } else {
        throw err(400, "M_INVALID_PARAM", `${target} was not legal room ID or room alias`);
      }
      const room = this.roomParam(roomId);
      const extra: Json = {};
      const b = body(ctx);
      if (typeof b.reason === "string") extra.reason = b.reason;
      this.doJoin(room, rq.userId, extra, { txnScope: rq.txnScope, ts: this.asTimestamp(ctx) });
      return ok({ room_id: room.roomId });
    };
    r("POST", `${C}/join/:roomIdOrAlias`, "user", "json?", (ctx) => joinHandler(ctx, ctx.params[0]!));
    r("POST", `${C}/rooms/:roomId/join`, "user", "json?", (ctx) => joinHandler(ctx, ctx.params[0]!));
    const memberAction =
      (fn: "invite" | "kick" | "ban" | "unban") =>
      (ctx: Ctx): Reply => {
        const room = this.roomParam(ctx.params[0]!);
        const b = body(ctx);
        if (typeof b.user_id !== "string") throw err(400, "M_MISSING_PARAM", "Missing user_id");
        const extra: Json = typeof b.reason === "string" ? { reason: b.reason } : {};
        const rq = req(ctx);
        const meta = { txnScope: rq.txnScope, ts: this.asTimestamp(ctx) };
        if (fn === "invite") this.doInvite(room, rq.userId, b.user_id, extra, meta);
        else if (fn === "ban") this.doBan(room, rq.userId, b.user_id, extra, meta);
        else if (fn === "unban") {
          if (room.membership.get(b.user_id) !== "ban") throw forbidden(`${b.user_id} is not banned`);
          this.doLeave(room, rq.userId, b.user_id, extra, meta);
        } else this.doLeave(room, rq.userId, b.user_id, extra, meta);
        return ok({});
      };
    r("POST", `${C}/rooms/:roomId/invite`, "user", "json", memberAction("invite"));
    r("POST", `${C}/rooms/:roomId/kick`, "user", "json", memberAction("kick"));
    r("POST", `${C}/rooms/:roomId/ban`, "user", "json", memberAction("ban"));
    r("POST", `${C}/rooms/:roomId/unban`, "user", "json", memberAction("unban"));
    r("POST", `${C}/rooms/:roomId/leave`, "user", "json?", (ctx) => {
      const room = this.roomParam(ctx.params[0]!);
      const rq = req(ctx);
      const b = body(ctx);
      const extra: Json = typeof b.reason === "string" ? { reason: b.reason } : {};
      this.doLeave(room, rq.userId, rq.userId, extra, { txnScope: rq.txnScope, ts: this.asTimestamp(ctx) });
      return ok({});
    });
    r("POST", `${C}/rooms/:roomId/forget`, "user", "json?", (ctx) => {
      const room = this.roomParam(ctx.params[0]!);
      const m = room.membership.get(req(ctx).userId);
      if (m === "join" || m === "invite") throw err(400, "M_UNKNOWN", "User is in room");
      return ok({});
    });
    r("GET", `${C}/joined_rooms`, "user", "none", (ctx) =>
      ok({ joined_rooms: [...(this.users.get(req(ctx).userId)?.rooms ?? [])] }),
    );

    // CS API §Sending events; §Transaction identifiers (idempotency per client session + endpoint).
    r("PUT", `${C}/rooms/:roomId/send/:eventType/:txnId`, "user", "json", (ctx) => {
      const [roomId, type, txnId] = ctx.params as [string, string, string];
      const rq = req(ctx);
      const key = `${idempotencyScope(rq)}\u0000${ctx.path}`;
      const existing = this.txnCache.get(key);
      if (existing !== undefined) return ok({ event_id: existing });
      const room = this.roomParam(roomId);
      this.validateRelation(room, body(ctx));
      this.refuseDuplicateAnnotation(room, rq.userId, type, body(ctx));
      const ev = this.sendEvent(room, rq.userId, type, body(ctx), undefined, {
        txnId,
        txnScope: rq.txnScope,
        ts: this.asTimestamp(ctx),
      });
      this.txnCache.set(key, ev.event_id);
      return ok({ event_id: ev.event_id });
    });
    // CS API §Redactions.
    r("PUT", `${C}/rooms/:roomId/redact/:eventId/:txnId`, "user", "json", (ctx) => {
      const [roomId, eventId, txnId] = ctx.params as [string, string, string];
      const rq = req(ctx);
      const key = `${idempotencyScope(rq)}\u0000${ctx.path}`;
      const existing = this.txnCache.get(key);
      if (existing !== undefined) return ok({ event_id: existing });
      const room = this.roomParam(roomId);
      this.requireJoined(room, rq.userId);
      const target = this.eventIndex.get(eventId);
      if (target && target.room === room && target.event.sender !== rq.userId) {
        if (this.userLevel(room, rq.userId) < this.namedLevel(room, "redact")) {
          throw forbidden("You don't have permission to redact events");
        }
      }
      const b = body(ctx);
      const content: Json = typeof b.reason === "string" ? { reason: b.reason } : {};
      if (Number(room.version) >= 11) content.redacts = eventId;
      const ev = this.sendEvent(room, rq.userId, "m.room.redaction", content, undefined, {
        txnId,
        txnScope: rq.txnScope,
        ts: this.asTimestamp(ctx),
        redacts: eventId,
      });
      if (target && target.room === room) this.redactInPlace(target.event, ev.event_id);
      this.txnCache.set(key, ev.event_id);
      return ok({ event_id: ev.event_id });
    });

    // CS API §Room state. stateKey may be empty (path ends with /state/{type} or /state/{type}/).
    const putStateHandler = (ctx: Ctx): Reply => {
      const [roomId, type, stateKey = ""] = ctx.params as [string, string, string | undefined];
      const room = this.roomParam(roomId);
      return ok({
        event_id: this.putState(room, req(ctx), type, stateKey, body(ctx), { ts: this.asTimestamp(ctx) }),
      });
    };
    const getStateHandler = (ctx: Ctx): Reply => {
      const [roomId, type, stateKey = ""] = ctx.params as [string, string, string | undefined];
      const room = this.roomParam(roomId);
      this.requireCanRead(room, req(ctx).userId);
      const ev = room.state.get(stateKeyOf(type, stateKey));
      if (!ev) throw notFound("Event not found.");
      if (ctx.query.get("format") === "event") return ok(this.toClientEvent(ev, req(ctx)));
      return ok(ev.content);
    };
    r("PUT", `${C}/rooms/:roomId/state/:eventType`, "user", "json", putStateHandler);
    r("PUT", `${C}/rooms/:roomId/state/:eventType/:stateKey`, "user", "json", putStateHandler);
    r("GET", `${C}/rooms/:roomId/state/:eventType`, "user", "none", getStateHandler);
    r("GET", `${C}/rooms/:roomId/state/:eventType/:stateKey`, "user", "none", getStateHandler);
    r("GET", `${C}/rooms/:roomId/state`, "user", "none", (ctx) => {
      const room = this.roomParam(ctx.params[0]!);
      this.requireCanRead(room, req(ctx).userId);
      return ok([...room.state.values()].map((e) => this.toClientEvent(e, req(ctx))));
    });
    r("GET", `${C}/rooms/:roomId/joined_members`, "user", "none", (ctx) => {
      const room = this.roomParam(ctx.params[0]!);
      this.requireCanRead(room, req(ctx).userId);
      const joined: Json = {};
      for (const u of room.joined) {
        const c = room.state.get(stateKeyOf("m.room.member", u))?.content ?? {};
        const entry: Json = {};
        if (typeof c.displayname === "string") entry.display_name = c.displayname;
        if (typeof c.avatar_url === "string") entry.avatar_url = c.avatar_url;
        joined[u] = entry;
      }
      return ok({ joined });
    });
    r("GET", `${C}/rooms/:roomId/members`, "user", "none", (ctx) => {
      const room = this.roomParam(ctx.params[0]!);
      this.requireCanRead(room, req(ctx).userId);
      const want = ctx.query.get("membership");
      const notWant = ctx.query.get("not_membership");
      const chunk: Json[] = [];
      for (const [u, m] of room.membership) {
        if ((want !== null && m !== want) || (notWant !== null && m === notWant)) continue;
        chunk.push(this.toClientEvent(room.state.get(stateKeyOf("m.room.member", u))!, req(ctx)));
      }
      return ok({ chunk });
    });
    r("GET", `${C}/rooms/:roomId/event/:eventId`, "user", "none", (ctx) => {
      const room = this.roomParam(ctx.params[0]!);
      this.requireCanRead(room, req(ctx).userId);
      const ev = this.eventIndex.get(ctx.params[1]!);
      if (!ev || ev.room !== room) throw notFound("Event not found.");
      return ok(this.toClientEvent(ev.event, req(ctx)));
    });

    // Ephemeral: typing, receipts, read markers, presence (accepted, not delivered).
    r("PUT", `${C}/rooms/:roomId/typing/:userId`, "user", "json", (ctx) => {
      const room = this.roomParam(ctx.params[0]!);
      if (ctx.params[1] !== req(ctx).userId) throw forbidden("Cannot set another user's typing state");
      this.requireJoined(room, req(ctx).userId);
      if (typeof body(ctx).typing !== "boolean") throw badJson("typing must be a boolean");
      return ok({});
    });
    r("POST", `${C}/rooms/:roomId/receipt/:receiptType/:eventId`, "user", "json?", (ctx) => {
      const room = this.roomParam(ctx.params[0]!);
      this.requireJoined(room, req(ctx).userId);
      const rt = ctx.params[1]!;
      if (rt !== "m.read" && rt !== "m.read.private" && rt !== "m.fully_read") {
        throw err(400, "M_INVALID_PARAM", `Receipt type ${rt} not recognized`);
      }
      return ok({});
    });
    r("POST", `${C}/rooms/:roomId/read_markers`, "user", "json", (ctx) => {
      this.requireJoined(this.roomParam(ctx.params[0]!), req(ctx).userId);
      return ok({});
    });
    r("PUT", `${C}/presence/:userId/status`, "user", "json", (ctx) => {
      if (this.opts.presence === "forbidden") throw forbidden("Presence is disabled on this server");
      if (ctx.params[0] !== req(ctx).userId) throw forbidden("Can only set your own presence state");
      const b = body(ctx);
      if (b.presence !== "online" && b.presence !== "offline" && b.presence !== "unavailable") {
        throw err(400, "M_INVALID_PARAM", "Invalid presence state");
      }
      if (b.status_msg !== undefined && typeof b.status_msg !== "string")
        throw err(400, "M_INVALID_PARAM", "status_msg must be a string.");
      if (this.opts.presence === "ignored") return ok({});
      const u = this.requireUser(req(ctx).userId);
      u.presence = { presence: b.presence, last_active_ts: Date.now() };
      if (typeof b.status_msg === "string") u.presence.status_msg = b.status_msg;
      const update: PresenceUpdate = { userId: u.userId, presence: b.presence, ts: Date.now() };
      if (typeof b.status_msg === "string") update.status_msg = b.status_msg;
      this.presenceUpdates.push(update);
      return ok({});
    });
    r("GET", `${C}/presence/:userId/status`, "user", "none", (ctx) => {
      const u = this.users.get(ctx.params[0]!);
      if (!u) throw notFound("Unknown user");
      const p: Json = {
        presence: u.presence.presence,
        last_active_ago: Date.now() - u.presence.last_active_ts,
      };
      if (u.presence.status_msg !== undefined) p.status_msg = u.presence.status_msg;
      return ok(p);
    });

    // CS API §Profiles.
    r("GET", `${C}/profile/:userId`, "none", "none", async (ctx) => {
      const u = await this.lookupUserWithQuery(ctx.params[0]!);
      if (!u || !this.registeredUser(u.userId)) throw notFound("Profile was not found");
      return ok(this.profile(u.userId));
    });
    for (const field of ["displayname", "avatar_url"] as const) {
      r("GET", `${C}/profile/:userId/${field}`, "none", "none", async (ctx) => {
        const u = await this.lookupUserWithQuery(ctx.params[0]!);
        if (!u || !this.registeredUser(u.userId)) throw notFound("Profile was not found");
        // Spec: 404 when the user has no such field (Synapse answers 200 {} instead).
        if (u[field] === undefined) throw notFound(`The user has no ${field}`);
        return ok({ [field]: u[field] });
      });
      r("PUT", `${C}/profile/:userId/${field}`, "user", "json", (ctx) => {
        const target = ctx.params[0]!;
        if (target !== req(ctx).userId) throw forbidden(`Cannot set another user's ${field}`);
        const v = body(ctx)[field];
        if (v !== undefined && v !== null && typeof v !== "string")
          throw badJson(`${field} must be a string`);
        if (typeof v === "string" && v.length > (field === "displayname" ? 256 : 1000)) {
          throw badJson(`${field} is too long`);
        }
        // Synapse: no profile row for an unregistered AS sender; its profile-size check fails on that.
        if (!this.registeredUser(target)) throw err(500, "M_UNKNOWN", "Internal server error");
        this.setProfileField(this.requireUser(target), field, (v ?? undefined) as string | undefined);
        return ok({});
      });
    }

    // CS API §Client config (account data).
    const adKey = (ctx: Ctx, roomId: string | undefined, type: string): string => {
      if (ctx.params[0] !== req(ctx).userId) throw forbidden("Cannot access other users' account data");
      return roomId === undefined ? `g\u0000${type}` : `r\u0000${roomId}\u0000${type}`;
    };
    r("GET", `${C}/user/:userId/account_data/:type`, "user", "none", (ctx) => {
      const v = this.requireUser(req(ctx).userId).accountData.get(adKey(ctx, undefined, ctx.params[1]!));
      if (!v) throw notFound("Account data not found");
      return ok(v);
    });
    r("PUT", `${C}/user/:userId/account_data/:type`, "user", "json", (ctx) => {
      this.requireUser(req(ctx).userId).accountData.set(adKey(ctx, undefined, ctx.params[1]!), body(ctx));
      return ok({});
    });
    r("GET", `${C}/user/:userId/rooms/:roomId/account_data/:type`, "user", "none", (ctx) => {
      const v = this.requireUser(req(ctx).userId).accountData.get(adKey(ctx, ctx.params[1]!, ctx.params[2]!));
      if (!v) throw notFound("Room account data not found");
      return ok(v);
    });
    r("PUT", `${C}/user/:userId/rooms/:roomId/account_data/:type`, "user", "json", (ctx) => {
      this.roomParam(ctx.params[1]!);
      this.requireUser(req(ctx).userId).accountData.set(
        adKey(ctx, ctx.params[1]!, ctx.params[2]!),
        body(ctx),
      );
      return ok({});
    });

    // AS API §Pinging (CS API POST /_matrix/client/v1/appservice/{appserviceId}/ping).
    const pingAuth = this.opts.appservicePing === "absent" ? "none" : "user"; // unknown: refused before auth
    r("POST", "/_matrix/client/v1/appservice/:appserviceId/ping", pingAuth, "json?", (ctx) =>
      this.handlePing(ctx),
    );

    // CS API §Content repository. Upload stays at /_matrix/media/v3/upload in v1.11.
    const upload = (ctx: Ctx): Reply => {
      const id = randomLetters(24);
      const filename = ctx.query.get("filename");
      const ct = ctx.req.headers["content-type"];
      const entry: { data: Buffer; contentType: string; filename?: string } = {
        data: Buffer.from(ctx.raw ?? Buffer.alloc(0)),
        contentType: typeof ct === "string" && ct ? ct : "application/octet-stream",
      };
      if (filename !== null) entry.filename = filename;
      this.media.set(id, entry);
      return ok({ content_uri: `mxc://${this.serverName}/${id}` });
    };
    r("POST", "/_matrix/media/{mv}/upload", "user", "raw", upload);
    this.defineDeviceRoutes();
    const config = (): Reply => ok({ "m.upload.size": this.opts.maxUploadBytes });
    r("GET", "/_matrix/media/{mv}/config", "user", "none", config);
    r("GET", "/_matrix/client/v1/media/config", "user", "none", config);
    const download = (ctx: Ctx): Reply => {
      const [server, id, fname] = ctx.params as [string, string, string | undefined];
      const m = server === this.serverName ? this.media.get(id) : undefined;
      if (!m) throw notFound("Not found");
      const name = fname ?? m.filename;
      const inline = /^(image\/(png|jpeg|gif|webp)|text\/plain|video\/|audio\/)/.test(m.contentType);
      return {
        status: 200,
        raw: m.data,
        headers: {
          "Content-Type": m.contentType,
          "Content-Disposition":
            (inline ? "inline" : "attachment") +
            (name ? `; filename*=utf-8''${encodeURIComponent(name)}` : ""),
          "Content-Security-Policy":
            "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; style-src 'unsafe-inline'; media-src 'self'; object-src 'self';",
          "Cross-Origin-Resource-Policy": "cross-origin",
          "Access-Control-Allow-Origin": "*",
        },
      };
    };
    r("GET", "/_matrix/client/v1/media/download/:serverName/:mediaId", "user", "none", download);
    r("GET", "/_matrix/client/v1/media/download/:serverName/:mediaId/:fileName", "user", "none", download);
    // Unauthenticated media endpoints are deprecated in v1.11 and frozen (Synapse default): new media → 404.
    const frozen = (): Reply => {
      throw notFound("Not found (unauthenticated media is frozen: use /_matrix/client/v1/media/download)");
    };
    r("GET", "/_matrix/media/{mv}/download/:serverName/:mediaId", "none", "none", frozen);
    r("GET", "/_matrix/media/{mv}/download/:serverName/:mediaId/:fileName", "none", "none", frozen);
  }

  // -------------------------------------------------------------------------------------------------------------
  // Devices, keys, to-device messages and /sync (CS API §Device management, §End-to-End Encryption,
  // §Send-to-Device messaging, §Syncing), as Synapse answers them
  // -------------------------------------------------------------------------------------------------------------

  private defineDeviceRoutes(): void {
    const C = "/_matrix/client/{v}";
    const r = this.route.bind(this);
    const req = (ctx: Ctx): Requester => ctx.requester!;
    const body = (ctx: Ctx): Json => ctx.body as Json;

    // CS API §GET /devices, §GET /devices/{deviceId}.
    r("GET", `${C}/devices`, "user", "none", (ctx) => ok({ devices: this.devices.list(req(ctx).userId) }));
    r("GET", `${C}/devices/:deviceId`, "user", "none", (ctx) => {
      const device = this.devices.get(req(ctx).userId, ctx.params[0]!);
      if (!device) throw notFound("No device found");
      return ok(device);
    });
    // CS API §PUT /devices/{deviceId}; MSC4190: an appservice creates the device (201) or updates it (200).
    r("PUT", `${C}/devices/:deviceId`, "user", "json", (ctx) => {
      const rq = req(ctx);
      const deviceId = ctx.params[0]!;
      const name = body(ctx).display_name;
      if (name !== undefined && name !== null && typeof name !== "string")
        throw badJson("display_name must be a string");
      // Synapse's _check_device_name_length.
      if (typeof name === "string" && name.length > 100)
        throw err(400, "M_TOO_LARGE", "Device display name is too long (max 100)");
      if (rq.isAs && this.opts.msc4190) {
        const created = this.devices.upsert(rq.userId, deviceId, name as string | null | undefined);
        return { status: created ? 201 : 200, body: {} };
      }
      if (!this.devices.rename(rq.userId, deviceId, name as string | null | undefined))
        throw notFound("Not found");
      return ok({});
    });
    // CS API §DELETE /devices/{deviceId}, §POST /delete_devices: user-interactive auth, which
    // appservices skip with MSC4190. This homeserver has no passwords: UIA is never completed.
    const deleteDevices = (ctx: Ctx, deviceIds: string[]): Reply => {
      const rq = req(ctx);
      if (!(rq.isAs && this.opts.msc4190)) throw this.uiaRequired();
      for (const deviceId of deviceIds) this.deleteDevice(rq.userId, deviceId);
      return ok({});
    };
    r("DELETE", `${C}/devices/:deviceId`, "user", "json?", (ctx) => deleteDevices(ctx, [ctx.params[0]!]));
    r("POST", `${C}/delete_devices`, "user", "json", (ctx) => {
      const ids = body(ctx).devices;
      if (!Array.isArray(ids) || !ids.every((d) => typeof d === "string"))
        throw badJson("devices must be a list of strings");
      return deleteDevices(ctx, ids as string[]);
    });
    // CS API §POST /logout: the token's device goes, with its keys (a token without a device: only itself).
    r("POST", `${C}/logout`, "user", "json?", (ctx) => {
      const rq = req(ctx);
      if (rq.deviceId !== undefined) this.deleteDevice(rq.userId, rq.deviceId);
      else if (!rq.isAs) this.tokens.delete(ctx.token!);
      return ok({});
    });

    // CS API §POST /keys/upload.
    r("POST", `${C}/keys/upload`, "user", "json", (ctx) => {
      const rq = req(ctx);
      const b = body(ctx);
      validateKeyUpload(b, badJson);
      if (rq.deviceId === undefined)
        throw err(400, "M_UNKNOWN", "To upload keys, you must pass device_id when authenticating");
      const dk = b.device_keys as Json | undefined;
      if (dk && dk.user_id !== rq.userId)
        throw badJson("Provided `user_id` in `device_keys` does not match that of the authenticated user");
      if (dk && dk.device_id !== rq.deviceId)
        throw badJson(
          "Provided `device_id` in `device_keys` does not match that of the authenticated user device",
        );
      const clash = this.devices.upload(rq.userId, rq.deviceId, {
        device_keys: isObject(dk) && Object.keys(dk).length > 0 ? dk : undefined,
        one_time_keys: b.one_time_keys as Json | undefined,
        fallback_keys: b.fallback_keys as Json | undefined,
      });
      if (clash !== undefined) throw err(400, "M_UNKNOWN", `One time key ${clash} already exists.`);
      return ok({ one_time_key_counts: this.devices.oneTimeKeyCounts(rq.userId, rq.deviceId) });
    });

    // CS API §POST /keys/query.
    r("POST", `${C}/keys/query`, "user", "json", (ctx) => {
      const rq = req(ctx);
      const wanted = body(ctx).device_keys;
      if (!isObject(wanted)) throw badJson("'device_keys' must be a JSON object");
      if (!Object.values(wanted).every((v) => Array.isArray(v) && v.every((d) => typeof d === "string")))
        throw badJson("'device_keys' values must be a list of strings");
      const deviceKeys: Json = {};
      const failures: Json = {};
      const master: Json = {};
      const selfSigning: Json = {};
      const userSigning: Json = {};
      for (const [userId, ids] of Object.entries(wanted as Record<string, string[]>)) {
        const server = userId.slice(userId.indexOf(":") + 1);
        if (server !== this.serverName) {
          // No federation here: the remote server is unreachable, as Synapse reports it.
          failures[server] = { status: 503, message: "Not ready for retry" };
          continue;
        }
        deviceKeys[userId] = this.devices.deviceKeys(userId, ids);
        const m = this.devices.crossSigningKey(userId, "master");
        const ss = this.devices.crossSigningKey(userId, "self_signing");
        // CS API: a user-signing key is only returned to its own user.
        const us = userId === rq.userId ? this.devices.crossSigningKey(userId, "user_signing") : undefined;
        if (m) master[userId] = m;
        if (ss) selfSigning[userId] = ss;
        if (us) userSigning[userId] = us;
      }
      return ok({
        device_keys: deviceKeys,
        failures,
        master_keys: master,
        self_signing_keys: selfSigning,
        user_signing_keys: userSigning,
      });
    });

    // CS API §POST /keys/claim: one key per device asked for, the algorithm's one-time key else its fallback key.
    r("POST", `${C}/keys/claim`, "user", "json", (ctx) => {
      const wanted = body(ctx).one_time_keys ?? {};
      if (!isObject(wanted)) throw badJson("one_time_keys must be a JSON object");
      const claimed: Record<string, Record<string, Json>> = {};
      const failures: Json = {};
      for (const [userId, devices] of Object.entries(wanted)) {
        if (!isObject(devices)) throw badJson("one_time_keys values must be JSON objects");
        const server = userId.slice(userId.indexOf(":") + 1);
        if (server !== this.serverName) {
          failures[server] = { status: 503, message: "Not ready for retry" };
          continue;
        }
        for (const [deviceId, algorithm] of Object.entries(devices)) {
          if (typeof algorithm !== "string") throw badJson("algorithms must be strings");
          const key = this.devices.claim(userId, deviceId, algorithm);
          if (key) (claimed[userId] ??= {})[deviceId] = { [key[0]]: key[1] };
        }
      }
      return ok({ one_time_keys: claimed, failures });
    });

    // CS API §POST /keys/device_signing/upload: the first keys need no UIA (MSC3967), nor do an
    // appservice's (MSC4190); replacing a person's keys needs UIA, which this homeserver never completes.
    r("POST", `${C}/keys/device_signing/upload`, "user", "json", (ctx) => {
      const rq = req(ctx);
      const b = body(ctx);
      const keys: Partial<Record<CrossSigningUsage, Json>> = {};
      for (const usage of ["master", "self_signing", "user_signing"] as const) {
        const key = b[`${usage}_key`];
        if (key === undefined) continue;
        if (!isObject(key) || key.user_id !== rq.userId || !isObject(key.keys) || !Array.isArray(key.usage))
          throw err(400, "M_INVALID_PARAM", `Invalid ${usage}_key`);
        if (!key.usage.includes(usage)) throw err(400, "M_INVALID_PARAM", `Invalid usage in ${usage}_key`);
        keys[usage] = key;
      }
      if (Object.keys(keys).length === 0) return ok({});
      if (this.devices.replacesCrossSigning(rq.userId, keys) && !(rq.isAs && this.opts.msc4190))
        throw this.uiaRequired();
      this.devices.setCrossSigning(rq.userId, keys);
      return ok({});
    });
    // CS API §POST /keys/signatures/upload: signatures are kept (not verified) for known keys.
    r("POST", `${C}/keys/signatures/upload`, "user", "json", (ctx) => {
      const rq = req(ctx);
      const failures: Record<string, Record<string, Json>> = {};
      for (const [userId, objects] of Object.entries(body(ctx))) {
        if (!isObject(objects)) throw badJson("signed objects must be JSON objects");
        for (const [keyId, signed] of Object.entries(objects)) {
          const sigs =
            isObject(signed) && isObject(signed.signatures) ? signed.signatures[rq.userId] : undefined;
          const valid = isObject(sigs) && Object.values(sigs).every((v) => typeof v === "string");
          if (!valid || !this.devices.addSignatures(userId, keyId, rq.userId, sigs as Record<string, string>))
            (failures[userId] ??= {})[keyId] = valid
              ? { status: 404, errcode: "M_NOT_FOUND", message: "Unknown key" }
              : { status: 400, errcode: "M_INVALID_SIGNATURE", message: "Missing signature" };
        }
      }
      return ok({ failures });
    });
    // CS API §GET /keys/changes.
    r("GET", `${C}/keys/changes`, "user", "none", (ctx) => {
      const from = this.parseSyncToken(ctx.query.get("from"), "from");
      this.parseSyncToken(ctx.query.get("to"), "to");
      if (from === undefined) throw err(400, "M_MISSING_PARAM", "Missing string query parameter from");
      return ok(this.deviceListChanges(req(ctx).userId, from));
    });

    // CS API §PUT /sendToDevice/{eventType}/{txnId}.
    r("PUT", `${C}/sendToDevice/:eventType/:txnId`, "user", "json", (ctx) => {
      const rq = req(ctx);
      // Synapse's HttpTransactionCache: per device for a device's token, per appservice user otherwise.
      const key = `${rq.deviceId === undefined || rq.isAs ? rq.txnScope : `dev\u0000${rq.userId}\u0000${rq.deviceId}`}\u0000${ctx.path}`;
      if (this.txnCache.has(key)) return ok({});
      const messages = body(ctx).messages;
      if (messages === undefined) throw err(400, "M_MISSING_PARAM", "Missing params: ['messages']");
      if (!isObject(messages) || !Object.values(messages).every(isObject))
        throw badJson("messages must map user ids to objects of device ids");
      this.sendToDevice(rq.userId, ctx.params[0]!, messages as Record<string, Json>);
      this.txnCache.set(key, "");
      return ok({});
    });

    // CS API §GET /sync: to-device messages, device lists and key counts of the requesting device.
    r("GET", `${C}/sync`, "user", "none", (ctx) => this.handleSync(ctx));
  }

  /** 401 with the flows of user-interactive auth (CS API §User-interactive authentication API). */
  private uiaRequired(): MatrixError {
    return new MatrixError(401, "M_FORBIDDEN", "User-interactive authentication is required", {
      flows: [{ stages: ["m.login.password"] }],
      params: {},
      session: randomLetters(24),
    });
  }

  /**
   * Puts each message in its devices' inboxes (`*`: every device of the user; unknown devices,
   * invalid and remote users are skipped, as Synapse's send_device_message does), and, with MSC2409,
   * queues those for the appservice's users for its transactions.
   */
  private sendToDevice(sender: string, type: string, messages: Record<string, Json>): void {
    for (const [, byDevice] of Object.entries(messages))
      for (const [deviceId, content] of Object.entries(byDevice)) {
        if (!isObject(content)) throw badJson(`message for ${deviceId} must be a JSON object`);
        const size = Buffer.byteLength(canonicalJson(content));
        if (size > MAX_TO_DEVICE_CONTENT_BYTES)
          throw err(
            413,
            "M_TOO_LARGE",
            `To-device message is too large to send (${size} > ${MAX_TO_DEVICE_CONTENT_BYTES})`,
          );
      }
    const toAppservice =
      this.msc2409InTransactions() && this.pushTarget !== undefined && !this.appserviceDown;
    for (const [userId, byDevice] of Object.entries(messages)) {
      if (!/^@[^:]+:.+$/.test(userId) || userId.slice(userId.indexOf(":") + 1) !== this.serverName) continue;
      const targets = new Set<string>();
      for (const deviceId of Object.keys(byDevice)) {
        if (deviceId === "*") for (const d of this.devices.deviceIds(userId)) targets.add(d);
        else targets.add(deviceId);
      }
      for (const deviceId of targets) {
        const content = (byDevice[deviceId] ?? byDevice["*"]) as Json;
        const message: ToDeviceMessage = { content, type, sender };
        if (this.devices.deliver(userId, deviceId, message) === undefined) continue;
        if (toAppservice && this.userInterests(userId))
          this.asToDevice.push(JSON.stringify({ to_user_id: userId, to_device_id: deviceId, ...message }));
      }
    }
    if (this.asToDevice.length > 0) this.schedulePump();
  }

  /** `s<position>`; undefined for none; 400 for one this homeserver did not give. */
  private parseSyncToken(token: string | null, name: string): number | undefined {
    if (token === null) return undefined;
    const m = /^s(\d+)$/.exec(token);
    const pos = m ? Number(m[1]) : NaN;
    if (!Number.isSafeInteger(pos) || pos > this.devices.position)
      throw err(400, "M_INVALID_PARAM", `Invalid ${name} token ${JSON.stringify(token)}`);
    return pos;
  }

  /** Users sharing a joined room with `userId`, the user included. */
  private sharedUsers(userId: string): Set<string> {
    const shared = new Set([userId]);
    for (const roomId of this.users.get(userId)?.rooms ?? [])
      for (const u of this.rooms.get(roomId)?.joined ?? []) shared.add(u);
    return shared;
  }

  /**
   * CS API §Tracking the device list for a user: since stream position `since`, the users sharing a
   * room whose devices changed or who newly share one (`changed`), and those who no longer share any
   * (`left`), as Synapse's get_device_list_changes computes them.
   */
  private deviceListChanges(userId: string, since: number): { changed: string[]; left: string[] } {
    const shared = this.sharedUsers(userId);
    const changed = new Set(this.devices.usersChangedSince(since).filter((u) => shared.has(u)));
    const left = new Set<string>();
    for (let i = this.membershipLog.length - 1; i >= 0 && this.membershipLog[i]!.pos > since; i--) {
      const e = this.membershipLog[i]!;
      const room = this.rooms.get(e.roomId);
      if (!room) continue;
      if (e.userId === userId) {
        for (const u of room.joined) if (u !== userId) (shared.has(u) ? changed : left).add(u);
      } else if (room.joined.has(userId)) {
        (shared.has(e.userId) ? changed : left).add(e.userId);
      }
    }
    for (const u of changed) left.delete(u);
    left.delete(userId);
    return { changed: [...changed], left: [...left] };
  }

  /**
   * GET /sync for a device (CS API §Syncing), without rooms, presence or account data: this
   * homeserver gives room events to the appservice in transactions. Tokens are positions of the
   * device stream; a sync after `since` first deletes the to-device messages up to it (Synapse: the
   * client has them), and long-polls `timeout` ms while there is nothing new.
   */
  private async handleSync(ctx: Ctx): Promise<Reply> {
    const rq = ctx.requester!;
    // AS API §Client-Server API extensions: an appservice syncs as a virtual user, never as its
    // own (Synapse's sync handler raises NotImplementedError for it, whatever the token: a 500).
    if (rq.userId === this.appserviceUserId) throw err(500, "M_UNKNOWN", "Internal server error");
    const filter = ctx.query.get("filter");
    if (filter !== null) {
      if (!filter.startsWith("{")) throw notFound("No such filter");
      let parsed: unknown;
      try {
        parsed = JSON.parse(filter);
      } catch {
        throw err(400, "M_NOT_JSON", "Invalid filter JSON");
      }
      if (!isObject(parsed)) throw err(400, "M_NOT_JSON", "Invalid filter JSON");
    }
    const since = this.parseSyncToken(ctx.query.get("since"), "since");
    const timeoutParam = ctx.query.get("timeout") ?? "0";
    if (!/^\d+$/.test(timeoutParam)) throw err(400, "M_INVALID_PARAM", "timeout must be an integer");
    const deadline = Date.now() + Number(timeoutParam);
    for (;;) {
      const reply = this.syncResponse(rq, since);
      const empty = reply.to_device === undefined && reply.device_lists === undefined;
      if (since === undefined || !empty || Date.now() >= deadline || this.stopped) return ok(reply);
      await this.streamMoved(deadline - Date.now());
    }
  }

  private syncResponse(rq: Requester, since: number | undefined): Json {
    const now = this.devices.position;
    const out: Json = { next_batch: `s${now}` };
    const device = rq.deviceId;
    if (device !== undefined) {
      const { messages, upTo } = this.devices.inboxAfter(rq.userId, device, since ?? 0, SYNC_TO_DEVICE_LIMIT);
      if (messages.length > 0) {
        out.to_device = { events: messages };
        // More than the limit waiting: the next sync starts after the last message given.
        if (this.devices.hasMessagesAfter(rq.userId, device, upTo!)) out.next_batch = `s${upTo}`;
      }
    }
    if (since !== undefined) {
      const { changed, left } = this.deviceListChanges(rq.userId, since);
      const lists: Json = {};
      if (changed.length > 0) lists.changed = changed;
      if (left.length > 0) lists.left = left;
      if (Object.keys(lists).length > 0) out.device_lists = lists;
    }
    // Synapse always includes both (element-android#3725; MSC2732).
    out.device_one_time_keys_count =
      device === undefined ? {} : this.devices.oneTimeKeyCounts(rq.userId, device);
    out.device_unused_fallback_key_types =
      device === undefined ? [] : this.devices.unusedFallbackKeyTypes(rq.userId, device);
    return out;
  }

  /** Resolves when the device stream or a room moves, when the homeserver stops, or after `ms`. */
  private streamMoved(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const waiter = { check: (): boolean => (done(), true) };
      const off = this.devices.onAdvance(() => done());
      const timer = setTimeout(() => done(), ms);
      const done = (): void => {
        off();
        clearTimeout(timer);
        this.waiters.delete(waiter);
        resolve();
      };
      this.waiters.add(waiter);
    });
  }

  /**
   * POST /register. Behaviour (Synapse):
   * - type m.login.application_service: needs the as_token (401 M_MISSING_TOKEN / M_UNKNOWN_TOKEN); `user_id`
   *   masquerading is not applied; username must be a valid localpart (400 M_INVALID_USERNAME), in the AS user
   *   namespace (400 M_EXCLUSIVE) and free (400 M_USER_IN_USE). The AS sender can register once (it acts before
   *   that, without a profile), then M_USER_IN_USE.
   * - an access token with another (or missing) type: 400 M_UNKNOWN, as Synapse ("An access token should not be
   *   provided on requests to /register (except if type is m.login.application_service)").
   * - no token: normal registration is disabled here → 403 M_FORBIDDEN (use registerUser()).
   */
  private handleRegister(ctx: Ctx): Reply {
    const b = ctx.body as Json;
    const kind = ctx.query.get("kind") ?? "user";
    if (kind !== "user") throw forbidden("Guest access is disabled");
    if (b.type === "m.login.application_service") {
      if (ctx.token === undefined) throw err(401, "M_MISSING_TOKEN", "Missing access token.");
      if (ctx.token !== this.registration.as_token)
        throw err(401, "M_UNKNOWN_TOKEN", "Invalid application service token.");
      ctx.requester = { userId: this.senderId, isAs: true, txnScope: `as\u0000${this.senderId}` };
      if (b.username === undefined)
        throw err(400, "M_MISSING_PARAM", "Desired Username is missing or not a string");
      if (typeof b.username !== "string") throw badJson("username must be a string");
      if (!LOCALPART_RE.test(b.username)) {
        throw err(
          400,
          "M_INVALID_USERNAME",
          `User ID localpart ${JSON.stringify(b.username)} has invalid characters`,
        );
      }
      const userId = `@${b.username}:${this.serverName}`;
      if (!this.userInterests(userId)) {
        throw err(400, "M_EXCLUSIVE", "Invalid user localpart for this application service.");
      }
      if (this.msc4190OptedIn() && b.inhibit_login !== true) {
        throw err(
          400,
          APPSERVICE_LOGIN_UNSUPPORTED,
          "This appservice has MSC4190 enabled, so the inhibit_login parameter must be set to true.",
        );
      }
      if (userId === this.senderId && !this.senderRegistered) {
        // The sender acted before (see senderRegistered): registering it creates its profile.
        this.senderRegistered = true;
      } else {
        this.checkNewUser(b.username);
        this.createUser(userId);
      }
      const resp: Json = { user_id: userId, home_server: this.serverName };
      if (b.inhibit_login !== true) {
        const deviceId = this.requestedDeviceId(b);
        const name =
          typeof b.initial_device_display_name === "string" ? b.initial_device_display_name : undefined;
        resp.access_token = this.issueToken(userId, deviceId, name);
        resp.device_id = deviceId;
      }
      return ok(resp);
    }
    if (ctx.token !== undefined) {
      throw err(
        400,
        "M_UNKNOWN",
        "An access token should not be provided on requests to /register (except if type is m.login.application_service)",
      );
    }
    throw forbidden("Registration has been disabled");
  }

  /** The registration opted in to MSC4190 (`io.element.msc4190`) on a homeserver that has it. */
  private msc4190OptedIn(): boolean {
    return this.opts.msc4190 && this.registration["io.element.msc4190"] === true;
  }

  /** A login's or registration's `device_id`, or a new one (Synapse: at most 512 characters). */
  private requestedDeviceId(b: Json): string {
    if (b.device_id === undefined || b.device_id === null) return randomLetters(10).toUpperCase();
    if (typeof b.device_id !== "string") throw err(400, "M_INVALID_PARAM", "device_id must be a string");
    if (b.device_id.length > 512)
      throw err(400, "M_INVALID_PARAM", "device_id cannot be longer than 512 characters");
    return b.device_id;
  }

  private async handlePing(ctx: Ctx): Promise<Reply> {
    // Synapse before 1.84 has no such endpoint: 400 M_UNRECOGNIZED, as it answered any unknown one.
    if (this.opts.appservicePing === "absent") throw err(400, "M_UNRECOGNIZED", "Unrecognized request");
    const rq = ctx.requester!;
    if (!rq.isAs || ctx.token !== this.registration.as_token || ctx.params[0] !== this.registration.id) {
      throw forbidden("Provided access token does not belong to the specified appservice");
    }
    if (!this.pushTarget) throw err(400, "M_URL_NOT_SET", "Application service URL is not set");
    const b = ctx.body as Json;
    const payload: Json = {};
    if (b.transaction_id !== undefined) payload.transaction_id = b.transaction_id;
    const started = Date.now();
    try {
      const res = await this.asRequest("POST", "/_matrix/app/v1/ping", JSON.stringify(payload));
      if (res.status < 200 || res.status >= 300) {
        let parsed: unknown = res.text;
        try {
          parsed = JSON.parse(res.text);
        } catch {
          // keep text
        }
        throw err(502, "M_BAD_STATUS", "Application service returned an error", {
          status: res.status,
          body: parsed,
        });
      }
    } catch (e) {
      if (e instanceof MatrixError) throw e;
      if (e instanceof Error && e.message === "timeout") {
        throw err(504, "M_CONNECTION_TIMEOUT", "Connection to application service timed out");
      }
      throw err(502, "M_CONNECTION_FAILED", "Failed to connect to application service");
    }
    return ok({ duration_ms: Date.now() - started });
  }

  /** AS API §Querying room alias: ask the appservice about an unknown alias in its namespace. */
  private async lookupAliasWithQuery(alias: string): Promise<string | undefined> {
    const known = this.aliases.get(alias);
    if (known) return known.roomId;
    if (!this.pushTarget || !this.aliasInNs(alias)) return undefined;
    const path = this.opts.pushPath === "legacy" ? "/rooms/" : "/_matrix/app/v1/rooms/";
    try {
      await this.asRequest("GET", path + encodeURIComponent(alias), undefined);
    } catch {
      // unreachable appservice: alias not found
    }
    return this.aliases.get(alias)?.roomId;
  }

  /** AS API §Querying user: ask the appservice about an unknown user in its namespace. */
  private async lookupUserWithQuery(userId: string): Promise<User | undefined> {
    const u = this.users.get(userId);
    if (u) return u;
    if (!this.pushTarget || !this.userNs.some((n) => n.re.test(userId))) return undefined;
    const path = this.opts.pushPath === "legacy" ? "/users/" : "/_matrix/app/v1/users/";
    try {
      await this.asRequest("GET", path + encodeURIComponent(userId), undefined);
    } catch {
      // unreachable appservice
    }
    return this.users.get(userId);
  }

  // -------------------------------------------------------------------------------------------------------------
  // Pushing to the appservice (AS API §Pushing events), Synapse-like: one transaction in flight, retried
  // identically (same txnId, same body) with exponential back-off until it succeeds; never reordered.
  // -------------------------------------------------------------------------------------------------------------

  private txnPath(txnId: string): string {
    const id = encodeURIComponent(txnId);
    return this.opts.pushPath === "legacy" ? `/transactions/${id}` : `/_matrix/app/v1/transactions/${id}`;
  }

  private pushIdle(): boolean {
    return (
      !this.inFlight &&
      this.queue.length === this.queueHead &&
      this.asToDevice.length === 0 &&
      this.asDeviceListChanged.size === 0
    );
  }

  private schedulePump(): void {
    if (this.pumpScheduled || this.stopped) return;
    this.pumpScheduled = true;
    // Defer so events produced in the same tick (e.g. createRoom) share a transaction.
    setImmediate(() => {
      this.pumpScheduled = false;
      this.pump();
    });
  }

  private pump(): void {
    if (this.stopped || this.paused || this.sending || this.retryTimer || !this.pushTarget) return;
    if (!this.inFlight) {
      const n = Math.min(this.queue.length - this.queueHead, this.opts.maxEventsPerTransaction);
      const evs = this.queue.slice(this.queueHead, this.queueHead + n);
      const rooms = new Set(this.queueRooms.slice(this.queueHead, this.queueHead + n));
      this.queueHead += n;
      if (this.queueHead > 4096 && this.queueHead * 2 > this.queue.length) {
        this.queue = this.queue.slice(this.queueHead);
        this.queueRooms = this.queueRooms.slice(this.queueHead);
        this.queueHead = 0;
      }
      // Synapse's _ServiceQueuer: at most 100 to-device messages a transaction; device list changes merged.
      const toDevice = this.asToDevice.splice(0, 100);
      const changed = [...this.asDeviceListChanged];
      this.asDeviceListChanged.clear();
      if (n === 0 && toDevice.length === 0 && changed.length === 0) return;
      const events = `"events":[${evs.join(",")}]`;
      const eventsOnly = `{${events}${this.ephemeralKeys([])}}`;
      const body = `{${events}${this.ephemeralKeys(toDevice)}${this.deviceDataKeys(rooms, toDevice, changed)}}`;
      this.inFlight = { txnId: String(this.nextTxnId++), body, events: n, eventsOnly };
    }
    this.attempt(this.inFlight, false);
  }

  /**
   * MSC2409 keys of a transaction (Synapse's push_bulk): for a registration with `receive_ephemeral`,
   * `ephemeral` and `de.sorunome.msc2409.to_device` (the MSC4203 messages under MSC2409's prefix);
   * with the older `de.sorunome.msc2409.push_ephemeral`, both keys prefixed. Lists, even empty.
   * This homeserver pushes no ephemeral events (typing, receipts, presence).
   */
  private ephemeralKeys(toDevice: string[]): string {
    const reg = this.registration;
    const messages = `"de.sorunome.msc2409.to_device":[${toDevice.join(",")}]`;
    if (reg.receive_ephemeral === true) return `,"ephemeral":[],${messages}`;
    if (reg["de.sorunome.msc2409.push_ephemeral"] === true)
      return `,"de.sorunome.msc2409.ephemeral":[],${messages}`;
    return "";
  }

  /**
   * MSC3202 keys of a transaction (Synapse's push_bulk and _compute_msc3202_otk_counts_and_fallback_keys):
   * one-time key counts (under both names Synapse uses) and unused fallback key types of every device
   * of the sender, of the appservice's users joined to the rooms of the transaction's events, and of
   * the recipients of its to-device messages; device list changes (`left` is never filled by Synapse).
   * Each key only when it has something.
   */
  private deviceDataKeys(rooms: Set<string>, toDevice: string[], changed: string[]): string {
    if (!this.msc3202InTransactions()) return "";
    const users = new Set([this.senderId]);
    for (const roomId of rooms)
      for (const u of this.rooms.get(roomId)?.joined ?? []) if (this.userInterests(u)) users.add(u);
    for (const m of toDevice) users.add((JSON.parse(m) as { to_user_id: string }).to_user_id);
    const counts = this.devices.oneTimeKeyCountsForAppservice(users);
    const fallback = this.devices.unusedFallbackKeyTypesForAppservice(users);
    let out = "";
    if (Object.keys(counts).length > 0) {
      const json = JSON.stringify(counts);
      out += `,"org.matrix.msc3202.device_one_time_key_counts":${json},"org.matrix.msc3202.device_one_time_keys_count":${json}`;
    }
    if (Object.keys(fallback).length > 0)
      out += `,"org.matrix.msc3202.device_unused_fallback_key_types":${JSON.stringify(fallback)}`;
    if (changed.length > 0)
      out += `,"org.matrix.msc3202.device_lists":${JSON.stringify({ changed, left: [] })}`;
    return out;
  }

  private msc3202InTransactions(): boolean {
    return this.opts.msc3202TransactionExtensions && this.registration["org.matrix.msc3202"] === true;
  }

  private msc2409InTransactions(): boolean {
    const reg = this.registration;
    return (
      this.opts.msc2409ToDevice &&
      (reg.receive_ephemeral === true || reg["de.sorunome.msc2409.push_ephemeral"] === true)
    );
  }

  private attempt(
    t: { txnId: string; body: string; events: number; eventsOnly: string },
    quickRetried: boolean,
  ): void {
    this.sending = true;
    this.asRequest("PUT", this.txnPath(t.txnId), t.body).then(
      (res) => {
        this.sending = false;
        this.logPush({ txnId: t.txnId, events: t.events, status: res.status });
        if (this.stopped) return;
        if (res.status >= 200 && res.status < 300) {
          this.delivered.set(t.txnId, { body: t.body, events: t.events });
          if (this.delivered.size > LOG_LIMIT) this.delivered.delete(this.delivered.keys().next().value!);
          this.inFlight = undefined;
          this.appserviceDown = false;
          this.retryDelay = this.opts.initialDelayMs;
          if (this.pushIdle()) for (const w of [...this.waiters]) w.check();
          this.pump();
        } else {
          this.markDown(t);
          this.scheduleRetry();
        }
      },
      (e: unknown) => {
        this.sending = false;
        this.logPush({ txnId: t.txnId, events: t.events, status: "error" });
        if (this.stopped) return;
        // A keep-alive socket closed by the peer between requests: retry at once, once.
        const reused = (e as { reusedSocket?: boolean }).reusedSocket === true;
        if (reused && !quickRetried && !this.paused) this.attempt(t, true);
        else {
          this.markDown(t);
          this.scheduleRetry();
        }
      },
    );
  }

  /**
   * A transaction failed: Synapse marks the appservice DOWN and its recoverer sends the stored
   * transaction again, same id, with its events only (get_oldest_unsent_txn keeps no to-device
   * messages, key counts or device lists).
   */
  private markDown(t: { body: string; eventsOnly: string }): void {
    this.appserviceDown = true;
    t.body = t.eventsOnly;
    // What waited for the next transaction meets a DOWN appservice: dropped (see appserviceDown).
    this.asToDevice.length = 0;
    this.asDeviceListChanged.clear();
  }

  private scheduleRetry(): void {
    const delay = this.retryDelay;
    this.retryDelay = Math.min(this.retryDelay * 2, this.opts.maxDelayMs);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      this.pump();
    }, delay);
  }

  private logPush(a: PushAttempt): void {
    this.pushLog.push(a);
    if (this.pushLog.length >= LOG_LIMIT + 2000) this.pushLog.splice(0, this.pushLog.length - LOG_LIMIT);
  }

  /** One HTTP request to the appservice, authenticated with hs_token (header or query). */
  private asRequest(
    method: string,
    path: string,
    body: string | undefined,
    token: string | null = this.registration.hs_token,
    mode: "header" | "query" = this.opts.authMode,
  ): Promise<{ status: number; text: string }> {
    const target = this.pushTarget;
    if (!target) return Promise.reject(new Error("registration.url is null"));
    if (this.stopped) return Promise.reject(new Error("homeserver stopped"));
    let fullPath = target.prefix + (path.startsWith("/") ? path : `/${path}`);
    const headers: Record<string, string | number> = {};
    if (token !== null) {
      if (mode === "header") headers.Authorization = `Bearer ${token}`;
      else fullPath += `${fullPath.includes("?") ? "&" : "?"}access_token=${encodeURIComponent(token)}`;
    }
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      headers["Content-Length"] = Buffer.byteLength(body);
    }
    return new Promise((resolve, reject) => {
      const r = target.mod.request(
        {
          protocol: target.base.protocol,
          hostname: target.base.hostname,
          port: target.base.port || undefined,
          method,
          path: fullPath,
          headers,
          agent: target.mod === http ? this.agent : undefined,
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on("data", (c: Buffer) => chunks.push(c));
          res.on("end", () => {
            this.activeRequests.delete(r);
            resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString("utf8") });
          });
          res.on("error", (e) => {
            this.activeRequests.delete(r);
            reject(e);
          });
        },
      );
      this.activeRequests.add(r);
      r.setTimeout(this.opts.pushTimeoutMs, () => r.destroy(new Error("timeout")));
      r.on("error", (e: Error & { reusedSocket?: boolean }) => {
        this.activeRequests.delete(r);
        e.reusedSocket = r.reusedSocket;
        reject(e);
      });
      r.end(body);
    });
  }

  // -------------------------------------------------------------------------------------------------------------
  // Waiting
  // -------------------------------------------------------------------------------------------------------------

  private waitFor<T>(probe: () => T | undefined, timeoutMs: number, describe: () => string): Promise<T> {
    const now = probe();
    if (now !== undefined) return Promise.resolve(now);
    return new Promise<T>((resolve, reject) => {
      const w = {
        check: (): boolean => {
          if (this.stopped) {
            finish();
            reject(new Error(`${describe()} (homeserver stopped)`));
            return true;
          }
          const v = probe();
          if (v === undefined) return false;
          finish();
          resolve(v);
          return true;
        },
      };
      const timer = setTimeout(() => {
        finish();
        const pending = this.pendingPushEvents;
        const lastPush = this.pushLog.slice(-3).map((p) => `${p.txnId}:${p.status}`);
        const failures = this.requestLog
          .slice(-200)
          .filter((l) => l.status >= 400)
          .slice(-5)
          .map((l) => `${l.method} ${l.path} → ${l.status}`);
        reject(
          new Error(
            `${describe()} — timed out after ${timeoutMs} ms. Push: ${pending} event(s) pending` +
              `${this.paused ? " (paused)" : ""}, last attempts [${lastPush.join(", ")}]` +
              (failures.length ? `; recent failed requests: ${failures.join("; ")}` : ""),
          ),
        );
      }, timeoutMs);
      const finish = (): void => {
        clearTimeout(timer);
        this.waiters.delete(w);
      };
      this.waiters.add(w);
    });
  }
}
