/**
 * Talks to the homeserver as the bot and as ghosts. Ghost setup (registration, profile, joins) goes
 * through matrix-appservice-bridge's intents; the hot path — sending an event — is one PUT with a
 * transaction id we choose, so a retried job can never create a second event (Client-Server API
 * §Transaction identifiers).
 */
import { Bridge, AppServiceRegistration } from "matrix-appservice-bridge";
import { setTimeout as sleep } from "node:timers/promises";
import { Pool } from "undici";
import { backoffDelayMs } from "../backoff.js";
import { PermanentError, RetryableError, UnavailableError, errorMessage, retryAfterMsOf } from "../errors.js";
import type { Logger } from "../log.js";
import { routeLibraryLogs } from "./library-logging.js";
import {
  HOMESERVER,
  MatrixPermanentError,
  MatrixRetryableError,
  classifyMatrixError,
  relabel,
  type MatrixErrorBody,
} from "./matrix-error.js";
import type { Registration } from "./registration.js";

export interface MatrixClientOptions {
  homeserverUrl: string;
  domain: string;
  botUserId: string;
  botDisplayName: string;
  registration: Registration;
  log: Logger;
}

const REQUEST_TIMEOUT_MS = 30_000;
/** Waiting for the homeserver to answer and accept our as_token at start-up: 1 s, 2 s, … 30 s. */
const START_BACKOFF = { initialDelayMs: 1_000, maxDelayMs: 30_000 };
/** How long /ready's answer about the homeserver is kept (see homeserverProblem). */
const TOKEN_CHECK_KEPT_MS = 5_000;

type HttpMethod = "GET" | "PUT" | "POST" | "DELETE";

/** Who a request acts as when it acts as one device of ours (see MatrixClient.deviceRequest). */
export interface DeviceAuth {
  userId: string;
  deviceId: string;
  accessToken?: string;
}

/** Encrypts what is sent into end-to-end encrypted rooms; undefined for a room that is not. */
export interface EventSealer {
  /**
   * Whether what is sent into the room is encrypted: its events are sealed, and so its files must be
   * encrypted too (§Sending encrypted attachments). The one answer both go by.
   */
  encrypts(roomId: string): Promise<boolean>;
  seal(
    userId: string,
    roomId: string,
    type: string,
    content: Record<string, unknown>,
  ): Promise<{ device: DeviceAuth; content: Record<string, unknown> } | undefined>;
}

/** Whether the homeserver could reach our appservice port; `undefined` when it cannot tell us. */
export type PingResult =
  { reachable: true; durationMs: number } | { reachable: false | undefined; detail: string };

/** Why a homeserver refuses the as_token, and what to do about it. */
export const TOKEN_REFUSED_WHY =
  "registration.yaml is not registered with it yet (see `tribridge registration-help`), or it was " +
  "regenerated since (register the new file; Synapse: restart it)";

/** What to check when the homeserver cannot reach tribridge (a failed appservice ping). */
export const PING_FIX =
  "Check `url` in registration.yaml (as the homeserver sees it, e.g. from its container) and " +
  "appservice.bind / appservice.port, then re-register or restart the homeserver";

/** Whether a request failed because the homeserver does not know the as_token (401, M_UNKNOWN_TOKEN). */
export function isTokenRefused(err: unknown): boolean {
  return err instanceof MatrixPermanentError && (err.status === 401 || err.errcode === "M_UNKNOWN_TOKEN");
}

/**
 * `Retry-After` (Matrix 1.10 prefers it to `retry_after_ms`; a proxy may send only the header): delay
 * in seconds, or an HTTP date.
 */
function retryAfterHeaderMs(value: string): number | undefined {
  const seconds = Number(value);
  if (value.trim() !== "" && Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
  const at = Date.parse(value);
  return Number.isNaN(at) ? undefined : Math.max(0, at - Date.now());
}

/** The standard error body of a failed response; empty for a non-JSON page (e.g. from a proxy). */
function errorBodyOf(data: Buffer): MatrixErrorBody {
  try {
    const body = JSON.parse(data.toString("utf8")) as unknown;
    return typeof body === "object" && body !== null ? (body as MatrixErrorBody) : {};
  } catch {
    return {};
  }
}

function matrixErrorOf(err: unknown): { status?: number; body: MatrixErrorBody } {
  const e = err as {
    statusCode?: number;
    body?: unknown;
    errcode?: string;
    error?: string;
    retryAfterMs?: number;
  };
  const body = (
    typeof e.body === "object" && e.body ? e.body : { errcode: e.errcode, error: e.error }
  ) as MatrixErrorBody;
  return { status: e.statusCode, body };
}

export class MatrixClient {
  private readonly bridge: Bridge;
  private readonly roomIds = new Map<string, string>();
  /** Servers that can let us into a room we are not in yet (`via`): from alias lookups and upgrades. */
  private readonly roomServers = new Map<string, string[]>();
  private readonly readyGhosts = new Map<string, Promise<void>>();
  private readonly joined = new Map<string, Promise<void>>();
  private readonly memberNames = new Map<string, Promise<Map<string, string>>>();
  /**
   * Keep-alive connections to the homeserver for our own requests. undici's pool costs less than
   * half the CPU of node:http per request, and this is the hot path of every relay into a room.
   */
  private readonly pool: Pool;
  private readonly basePath: string;
  private sealer: EventSealer | undefined;
  private lastTokenCheck: { at: number; problem: Promise<string | undefined> } | undefined;

  constructor(private readonly opts: MatrixClientOptions) {
    routeLibraryLogs();
    const base = new URL(opts.homeserverUrl);
    this.basePath = base.pathname.replace(/\/$/, "");
    this.pool = new Pool(base.origin, {
      connections: 64,
      headersTimeout: REQUEST_TIMEOUT_MS,
      bodyTimeout: REQUEST_TIMEOUT_MS,
    });
    const registration = AppServiceRegistration.fromObject(opts.registration);
    if (!registration) throw new Error("invalid registration");
    this.bridge = new Bridge({
      homeserverUrl: opts.homeserverUrl,
      domain: opts.domain,
      registration,
      disableStores: true,
      disableContext: true,
      suppressEcho: true,
      // Ghost ids come encoded already (ids.ts); the library's own escaping must not rename them.
      escapeUserIds: false,
      controller: { onEvent: () => undefined },
    });
  }

  /**
   * Waits until the homeserver answers and accepts our as_token (retrying with back-off, and saying
   * which of the two is missing), then registers the bot and sets its profile (see setUpBot).
   */
  async start(signal: AbortSignal): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      try {
        await this.checkToken();
        await this.bridge.initialise();
        break;
      } catch (err) {
        // The library's own requests (initialise) fail with its errors: typed the same way.
        const failure = this.toQueueError(err, "starting");
        const delay = Math.round(backoffDelayMs(START_BACKOFF, attempt, retryAfterMsOf(failure)));
        this.opts.log.warn(
          { err: errorMessage(err), retryInMs: delay },
          isTokenRefused(failure)
            ? `the homeserver does not accept this appservice's as_token: ${TOKEN_REFUSED_WHY}`
            : failure instanceof RetryableError
              ? "homeserver not reachable yet"
              : "the homeserver refused the bridge's first request",
        );
        await sleep(delay, undefined, { signal });
      }
    }
    await this.setUpBot();
  }

  /**
   * Registers the bot user, then sets its display name. The as_token acts as the appservice's own
   * user (`sender_localpart`) without a registration, but a homeserver creates no profile for it
   * until it is registered: Synapse answers GET /profile with 404 and fails PUT …/displayname. So
   * it is registered like a ghost (Client-Server API §POST /_matrix/client/v3/register with
   * `type: m.login.application_service`, Application Service API §Server admin style permissions),
   * without a device (`inhibit_login`); M_USER_IN_USE means an earlier start did it. Never throws:
   * a bot without its display name still relays.
   */
  private async setUpBot(): Promise<void> {
    const { botUserId, botDisplayName, registration, log } = this.opts;
    try {
      const { status, data } = await this.dispatch("POST /register", {
        method: "POST",
        path: `${this.basePath}/_matrix/client/v3/register`,
        body: {
          type: "m.login.application_service",
          username: registration.sender_localpart,
          inhibit_login: true,
        },
      });
      const body = errorBodyOf(data);
      if (status === 200) log.info({ userId: botUserId }, "registered the bot user");
      else if (body.errcode !== "M_USER_IN_USE")
        throw classifyMatrixError(status, body, `registering ${botUserId}`);
      const path = `/_matrix/client/v3/profile/${encodeURIComponent(botUserId)}/displayname`;
      // 404: no display name yet (the spec's answer; Synapse's is 200 without one).
      const current = await this.request("GET", path, botUserId).catch(() => ({}) as Record<string, unknown>);
      if (current.displayname !== botDisplayName)
        await this.request("PUT", path, botUserId, { displayname: botDisplayName });
    } catch (err) {
      log.warn({ err: errorMessage(err) }, "could not register the bot user or set its display name");
    }
  }

  /**
   * Who the homeserver says the as_token is (Client-Server API §GET /account/whoami, as the bot).
   * Throws as every request does: see isTokenRefused for an as_token it does not know.
   */
  async whoami(): Promise<string> {
    const { user_id: userId } = await this.request(
      "GET",
      "/_matrix/client/v3/account/whoami",
      this.opts.botUserId,
    );
    return String(userId);
  }

  /** Who the homeserver thinks we are: the bot, or the registration is not (or differently) loaded. */
  private async checkToken(): Promise<void> {
    const userId = await this.whoami();
    if (userId !== this.opts.botUserId)
      throw new PermanentError(
        `the as_token belongs to ${String(userId)}, not ${this.opts.botUserId}: ` +
          "homeserver.domain or sender_localpart does not match the registration the homeserver loaded",
      );
  }

  /**
   * For GET /ready: what is wrong with the homeserver now (it does not answer, or no longer takes our
   * as_token), or undefined. The answer is kept for a few seconds: /ready is open to anyone who
   * reaches the appservice port, and must not turn their requests into load on the homeserver.
   */
  homeserverProblem(): Promise<string | undefined> {
    const now = Date.now();
    if (!this.lastTokenCheck || now - this.lastTokenCheck.at >= TOKEN_CHECK_KEPT_MS)
      this.lastTokenCheck = {
        at: now,
        problem: this.checkToken().then(
          () => undefined,
          (err: unknown) => errorMessage(err),
        ),
      };
    return this.lastTokenCheck.problem;
  }

  /**
   * Asks the homeserver to reach us (Application Service API §Pinging, Matrix v1.7): the one check
   * that registration.yaml's `url` leads here, the most common setup mistake. Never throws.
   */
  async ping(): Promise<PingResult> {
    const path = `/_matrix/client/v1/appservice/${encodeURIComponent(this.opts.registration.id)}/ping`;
    try {
      const { status, data } = await this.dispatch(`POST ${path}`, {
        method: "POST",
        path: this.basePath + path,
        body: { transaction_id: `tribridge-${Date.now()}` },
      });
      const body = errorBodyOf(data) as MatrixErrorBody & { duration_ms?: number };
      if (status === 200) return { reachable: true, durationMs: Number(body.duration_ms) };
      const detail = `${status} ${body.errcode ?? ""} ${body.error ?? ""}`.trim();
      // A homeserver older than the endpoint answers as for any unknown one: 404 or 405, with
      // M_UNRECOGNIZED or no Matrix error at all (a proxy), or, Synapse before 1.84, 400
      // M_UNRECOGNIZED. It does not say whether it reaches us.
      const unknownEndpoint =
        body.errcode === "M_UNRECOGNIZED" ||
        (body.errcode === undefined && (status === 404 || status === 405));
      if (unknownEndpoint) return { reachable: undefined, detail: `no appservice ping: ${detail}` };
      return { reachable: false, detail };
    } catch (err) {
      return { reachable: undefined, detail: `could not ask: ${errorMessage(err)}` };
    }
  }

  /** Pings (see ping) and logs the outcome, with what to check when the homeserver cannot reach us. */
  async reportReachability(): Promise<void> {
    const result = await this.ping();
    const url = this.opts.registration.url;
    if (result.reachable === true)
      this.opts.log.info({ durationMs: result.durationMs }, "the homeserver reaches tribridge");
    else if (result.reachable === undefined)
      this.opts.log.info(
        { detail: result.detail },
        "could not check that the homeserver reaches tribridge (no appservice ping before Matrix v1.7 " +
          "and Synapse 1.84, or no answer): the first room event to arrive will show it does",
      );
    else
      this.opts.log.error(
        { detail: result.detail, url },
        `the homeserver cannot reach tribridge at ${String(url)}: events from rooms will not arrive. ${PING_FIX}`,
      );
  }

  /** A room id for an alias or id, cached. */
  async resolveRoom(room: string): Promise<string> {
    if (room.startsWith("!")) return room;
    const cached = this.roomIds.get(room);
    if (cached) return cached;
    const path = `/_matrix/client/v3/directory/room/${encodeURIComponent(room)}`;
    const { room_id: id, servers } = await this.request("GET", path, this.opts.botUserId).catch(
      (err: unknown) => {
        throw relabel(err, `resolving ${room}`);
      },
    );
    if (typeof id !== "string") throw new RetryableError(`GET ${path}: no room_id in the answer`);
    if (Array.isArray(servers))
      this.noteServers(
        id,
        servers.filter((s) => typeof s === "string"),
      );
    this.roomIds.set(room, id);
    return id;
  }

  /** Servers to ask when joining `roomId` (e.g. the server of the user who upgraded a room to it). */
  noteServers(roomId: string, servers: readonly string[]): void {
    const known = this.roomServers.get(roomId) ?? [];
    this.roomServers.set(roomId, [...new Set([...known, ...servers])].slice(0, 5));
  }

  /**
   * POST /join with `via` (and `server_name`, its name before Matrix 1.12): a homeserver that is not
   * in the room yet needs to be told which servers to ask, and current Synapse no longer guesses
   * from the room id. The room id's own server part, where it has one, is added as a last resort.
   */
  private joinPath(roomId: string): string {
    const colon = roomId.indexOf(":");
    const servers = new Set(this.roomServers.get(roomId) ?? []);
    if (colon > 0) servers.add(roomId.slice(colon + 1));
    const query = [...servers]
      .map((s) => encodeURIComponent(s))
      .flatMap((s) => [`via=${s}`, `server_name=${s}`])
      .join("&");
    return `/_matrix/client/v3/join/${encodeURIComponent(roomId)}${query ? `?${query}` : ""}`;
  }

  /**
   * The room id of a route's room: resolves an alias, or creates the room when the alias is on our
   * own server and does not exist yet (inviting `invite`).
   */
  async resolveOrCreateRoom(room: string, invite: readonly string[]): Promise<string> {
    try {
      return await this.resolveRoom(room);
    } catch (err) {
      const ownAlias = room.startsWith("#") && room.endsWith(`:${this.opts.domain}`);
      const missing = err instanceof MatrixPermanentError && err.status === 404;
      if (!missing || !ownAlias) throw err;
      if (!this.opts.registration.namespaces.aliases.some((n) => new RegExp(n.regex).test(room)))
        throw new RetryableError(
          `room ${room} does not exist. Create it and invite ${this.opts.botUserId}; or name the route's ` +
            "room with appservice.roomAliasPrefix (#tribridge_… by default), which the registration reserves; or run " +
            "`tribridge generate-registration --force` with this route configured (it reserves the route " +
            "aliases under namespaces.aliases) and register the new file with the homeserver",
        );
      const localAlias = room.slice(1, room.lastIndexOf(":"));
      const created = await this.bridge
        .getIntent(this.opts.botUserId)
        .createRoom({
          createAsClient: true,
          options: {
            room_alias_name: localAlias,
            name: localAlias,
            preset: "private_chat",
            invite: [...invite],
          },
        })
        .catch((error: unknown) => {
          throw this.toQueueError(error, `creating ${room}`);
        });
      this.roomIds.set(room, created.room_id);
      this.opts.log.info({ room, roomId: created.room_id }, "created room for route");
      return created.room_id;
    }
  }

  /** A ghost (registered, with its display name) joins a room, invited by the bot where needed. */
  async joinGhost(userId: string, displayName: string, roomId: string): Promise<void> {
    await this.ensureGhost(userId, displayName);
    await this.ensureJoined(userId, roomId);
  }

  /** Joins the bot to a room (a private room must have invited it first). */
  joinBot(roomId: string): Promise<void> {
    return this.ensureJoined(this.opts.botUserId, roomId);
  }

  /**
   * The room that replaced `roomId` (its `m.room.tombstone`, after an upgrade), if any. Best
   * effort: when the state cannot be read, the room is taken as it is.
   */
  async replacementOf(roomId: string): Promise<string | undefined> {
    const path = `/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/state/m.room.tombstone`;
    try {
      const content = await this.request("GET", path, this.opts.botUserId);
      if (typeof content.replacement_room !== "string") return undefined;
      // The servers that got us into the old room are the best guess for its successor.
      this.noteServers(content.replacement_room, this.roomServers.get(roomId) ?? []);
      return content.replacement_room;
    } catch (err) {
      // 404: never upgraded.
      if (!(err instanceof MatrixPermanentError && err.status === 404))
        this.opts.log.warn(
          { roomId, err: errorMessage(err) },
          "could not check whether the room was upgraded",
        );
      return undefined;
    }
  }

  /**
   * The content of a state event of a room, as the bot reads it (Client-Server API §GET
   * /rooms/{roomId}/state/{eventType}/{stateKey}); undefined when the room has none (404).
   */
  async roomState(roomId: string, type: string, stateKey = ""): Promise<Record<string, unknown> | undefined> {
    const path = `/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/state/${encodeURIComponent(type)}/${encodeURIComponent(stateKey)}`;
    const what = `GET ${path}`;
    const { status, data } = await this.dispatch(what, { method: "GET", path: this.basePath + path });
    if (status === 404) return undefined;
    if (status < 200 || status >= 300) throw classifyMatrixError(status, errorBodyOf(data), what);
    try {
      const content = JSON.parse(data.toString("utf8")) as unknown;
      return typeof content === "object" && content !== null ? (content as Record<string, unknown>) : {};
    } catch (err) {
      throw new RetryableError(`${what}: unreadable response: ${errorMessage(err)}`);
    }
  }

  /**
   * Every current state event of a room, as the bot reads it (Client-Server API §GET
   * /rooms/{roomId}/state): `type`, `state_key`, `sender` and `content` of each.
   */
  async roomStateEvents(roomId: string): Promise<Record<string, unknown>[]> {
    const path = `/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/state`;
    // A list, though request() is typed for the objects most answers are.
    const events: unknown = await this.request("GET", path, this.opts.botUserId);
    if (!Array.isArray(events)) throw new RetryableError(`GET ${path}: the answer is not a list of events`);
    return events.filter((e): e is Record<string, unknown> => typeof e === "object" && e !== null);
  }

  /** Sets a state event as the bot (Client-Server API §PUT /rooms/{roomId}/state/{eventType}/{stateKey}). */
  async setRoomState(
    roomId: string,
    type: string,
    stateKey: string,
    content: Record<string, unknown>,
  ): Promise<void> {
    const path = `/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/state/${encodeURIComponent(type)}/${encodeURIComponent(stateKey)}`;
    await this.request("PUT", path, this.opts.botUserId, content);
  }

  /** Registers the ghost (m.login.application_service) and sets its display name, once. */
  private ensureGhost(userId: string, displayName: string): Promise<void> {
    let ready = this.readyGhosts.get(userId);
    if (!ready) {
      const intent = this.bridge.getIntent(userId);
      ready = intent
        .ensureRegistered()
        .then(() => intent.ensureProfile(displayName))
        .catch((err: unknown) => {
          this.readyGhosts.delete(userId);
          throw this.toQueueError(err, `setting up ghost ${userId}`);
        });
      this.readyGhosts.set(userId, ready);
    }
    return ready;
  }

  private ensureJoined(userId: string, roomId: string): Promise<void> {
    const key = `${userId}|${roomId}`;
    let joined = this.joined.get(key);
    if (!joined) {
      joined = this.join(userId, roomId).catch((err: unknown) => {
        this.joined.delete(key);
        // Not invited (yet): someone may still invite the bot, so keep retrying for a while.
        throw err instanceof MatrixPermanentError && err.errcode === "M_FORBIDDEN"
          ? new MatrixRetryableError(err, `invite ${this.opts.botUserId} to the room`)
          : err;
      });
      this.joined.set(key, joined);
    }
    return joined;
  }

  /**
   * Joins by our own requests rather than the library's Intent.join: the homeserver's reason (e.g.
   * not invited) reaches the failed list, and a ghost that was kicked joins again (the library's
   * membership cache, which we do not feed, would still say it is in). A ghost that may not join
   * (a room that wants an invite) is invited by the bot first.
   */
  private async join(userId: string, roomId: string): Promise<void> {
    const join = () => this.request("POST", this.joinPath(roomId), userId, {});
    try {
      await join();
    } catch (err) {
      const forbidden = err instanceof MatrixPermanentError && err.errcode === "M_FORBIDDEN";
      if (!forbidden || userId === this.opts.botUserId) throw err;
      const invite = `/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/invite`;
      await this.request("POST", invite, this.opts.botUserId, { user_id: userId });
      await join();
    }
  }

  /** The queue's error for a failure of the bridge library (our own requests throw one already). */
  private toQueueError(err: unknown, what: string): Error {
    if (err instanceof PermanentError || err instanceof RetryableError) return err;
    const { status, body } = matrixErrorOf(err);
    if (status === undefined)
      return new UnavailableError(`${what}: ${errorMessage(err)}`, { destination: HOMESERVER });
    return classifyMatrixError(status, body, what);
  }

  /** From now on, events sent into encrypted rooms are encrypted by `sealer` (crypto/end-to-end.ts). */
  encryptWith(sealer: EventSealer): void {
    this.sealer = sealer;
  }

  /**
   * Whether events sent into the room are encrypted (see EventSealer.encrypts): then a file posted
   * with them is uploaded encrypted. Never, without end-to-end encryption.
   */
  async encryptsIn(roomId: string): Promise<boolean> {
    return (await this.sealer?.encrypts(roomId)) ?? false;
  }

  /** Ensures a ghost exists (registered, with its display name) before a device is made for it. */
  ghostReady(userId: string, displayName: string): Promise<void> {
    return userId === this.opts.botUserId ? Promise.resolve() : this.ensureGhost(userId, displayName);
  }

  /**
   * One Client-Server API call as one of ours, or as a device of ours (end-to-end encryption): the
   * device's own access token when it has one (from `m.login.application_service`), else the
   * as_token with device masquerading (`device_id`, Matrix v1.17 / MSC4326).
   */
  requestAs(
    as: string | DeviceAuth,
    method: HttpMethod,
    pathAndQuery: string,
    body?: Record<string, unknown>,
    signal?: AbortSignal,
  ): Promise<Record<string, unknown>> {
    return this.request(method, pathAndQuery, as, body, "application/json", signal);
  }

  /** One Client-Server API call as `userId`, over a keep-alive connection (the hot path of every relay). */
  private async request(
    method: HttpMethod,
    pathAndQuery: string,
    as: string | DeviceAuth,
    body?: Uint8Array | Record<string, unknown>,
    contentType = "application/json",
    signal?: AbortSignal,
  ): Promise<Record<string, unknown>> {
    const device = typeof as === "string" ? undefined : as;
    const userId = device?.userId ?? (as as string);
    let path = this.basePath + pathAndQuery;
    const query: string[] = [];
    // AS API §Identity assertion; a device's own token needs none. Named for a device of the bot
    // too: Synapse (1.163) answers 500 to a device_id without user_id (its lookup of the sender's
    // device binds a UserID object into SQL).
    if ((userId !== this.opts.botUserId || device) && !device?.accessToken)
      query.push(`user_id=${encodeURIComponent(userId)}`);
    // AS API §Identity assertion (Matrix v1.17, MSC4326): `device_id`, which Synapse reads since
    // 1.141 and alone since 1.161; MSC3202's prefixed name too, for homeservers from before it.
    if (device && !device.accessToken) {
      const deviceId = encodeURIComponent(device.deviceId);
      query.push(`device_id=${deviceId}`, `org.matrix.msc3202.device_id=${deviceId}`);
    }
    if (query.length > 0) path += `${path.includes("?") ? "&" : "?"}${query.join("&")}`;
    const what = `${method} ${pathAndQuery.split("?")[0]}`;
    const { status, data, retryAfterMs } = await this.dispatch(what, {
      method,
      path,
      contentType,
      body,
      accessToken: device?.accessToken,
      signal,
    });
    if (status < 200 || status >= 300)
      throw classifyMatrixError(status, { retry_after_ms: retryAfterMs, ...errorBodyOf(data) }, what);
    try {
      // A success must carry its JSON (an event id, a content URI).
      return JSON.parse(data.toString("utf8")) as Record<string, unknown>;
    } catch (err) {
      throw new RetryableError(`${what}: unreadable response: ${errorMessage(err)}`);
    }
  }

  /**
   * The request itself, through undici's handler interface: no stream per response, which is a
   * measurable share of a relay's cost. Network failures become UnavailableError.
   */
  private dispatch(
    what: string,
    req: {
      method: HttpMethod;
      path: string;
      /** Default: the as_token. */
      accessToken?: string;
      contentType?: string;
      body?: Uint8Array | Record<string, unknown>;
      /** A longer response body fails the request permanently. */
      maxBytes?: number;
      /** Ends the request (a long poll, when stopping). */
      signal?: AbortSignal;
    },
  ): Promise<{ status: number; data: Buffer; contentType: string | undefined; retryAfterMs?: number }> {
    const { method, path, contentType = "application/json", body, maxBytes = Infinity } = req;
    const token = req.accessToken ?? this.opts.registration.as_token;
    return new Promise((resolve, reject) => {
      const chunks: Buffer[] = [];
      let received = 0;
      let status = 0;
      let responseType: string | undefined;
      let retryAfterMs: number | undefined;
      let abort: (err: Error) => void = () => undefined;
      let aborted: Error | undefined;
      const onAbort = () => abort((aborted = new UnavailableError(`${what}: aborted`)));
      if (req.signal?.aborted) return reject(new UnavailableError(`${what}: aborted`));
      req.signal?.addEventListener("abort", onAbort, { once: true });
      const settled = () => req.signal?.removeEventListener("abort", onAbort);
      const tooLarge = () => new PermanentError(`${what}: response larger than ${maxBytes} bytes`);
      this.pool.dispatch(
        {
          method,
          path,
          headers: {
            authorization: `Bearer ${token}`,
            "content-type": contentType,
          },
          body: body === undefined || body instanceof Uint8Array ? body : JSON.stringify(body),
        },
        {
          onConnect: (abortRequest) => {
            abort = abortRequest;
            if (aborted) abortRequest(aborted);
          },
          onHeaders: (statusCode, rawHeaders) => {
            status = statusCode;
            for (let i = 0; i + 1 < rawHeaders.length; i += 2) {
              const name = String(rawHeaders[i]).toLowerCase();
              if (name === "content-type") responseType = String(rawHeaders[i + 1]);
              if (name === "retry-after") retryAfterMs = retryAfterHeaderMs(String(rawHeaders[i + 1]));
              if (name === "content-length" && Number(String(rawHeaders[i + 1])) > maxBytes)
                abort(tooLarge());
            }
            return true;
          },
          onData: (chunk) => {
            received += chunk.byteLength;
            if (received > maxBytes) {
              abort(tooLarge());
              return false;
            }
            chunks.push(chunk);
            return true;
          },
          onComplete: () => {
            settled();
            resolve({ status, data: Buffer.concat(chunks), contentType: responseType, retryAfterMs });
          },
          onError: (err) => {
            settled();
            reject(
              err instanceof PermanentError
                ? err
                : new UnavailableError(`${what}: ${err.message}`, { destination: HOMESERVER }),
            );
          },
        },
      );
    });
  }

  /**
   * Downloads a file from the content repository as the bot: the authenticated endpoint (Matrix
   * 1.11), or the older unauthenticated one on a homeserver that does not know it yet.
   */
  async download(mxc: string, maxBytes: number): Promise<{ data: Buffer; mimeType: string | undefined }> {
    const match = /^mxc:\/\/([^/]+)\/([A-Za-z0-9_-]+)$/.exec(mxc);
    if (!match) throw new PermanentError(`not a content URI: ${mxc}`);
    const media = `${encodeURIComponent(match[1]!)}/${encodeURIComponent(match[2]!)}`;
    const what = `downloading ${mxc}`;
    for (const prefix of ["/_matrix/client/v1/media/download/", "/_matrix/media/v3/download/"]) {
      const res = await this.dispatch(what, {
        method: "GET",
        path: this.basePath + prefix + media,
        maxBytes,
      });
      if (res.status >= 200 && res.status < 300) return { data: res.data, mimeType: res.contentType };
      const body = errorBodyOf(res.data);
      // A homeserver older than authenticated media does not recognise the first path.
      const unknownEndpoint = body.errcode === "M_UNRECOGNIZED" || res.status === 405;
      if (!unknownEndpoint) throw classifyMatrixError(res.status, body, what);
    }
    throw new PermanentError(`${what}: the homeserver serves no media download endpoint`);
  }

  /**
   * Sends one event as `userId` (bot or ghost), idempotently: `txnId` is derived from the job, so
   * the homeserver returns the first event again if this is a retry.
   */
  async sendAs(
    sender: { userId: string; displayName: string },
    roomId: string,
    type: string,
    content: Record<string, unknown>,
    txnId: string,
  ): Promise<string> {
    if (sender.userId !== this.opts.botUserId) await this.ensureGhost(sender.userId, sender.displayName);
    const path = (eventType: string) =>
      `/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/send/${encodeURIComponent(eventType)}/${encodeURIComponent(txnId)}`;
    const send = async () => {
      await this.ensureJoined(sender.userId, roomId);
      // In an encrypted room: encrypted by the sender's own device, and sent as that device.
      const sealed = await this.sealer?.seal(sender.userId, roomId, type, content);
      const sent = sealed
        ? await this.request("PUT", path("m.room.encrypted"), sealed.device, sealed.content)
        : await this.request("PUT", path(type), sender.userId, content);
      return String(sent.event_id);
    };
    try {
      return await send();
    } catch (err) {
      if (!(err instanceof MatrixPermanentError && err.errcode === "M_FORBIDDEN")) throw err;
      // Kicked or left since we cached the join: join again and send once more. Refused again,
      // the room does not let this sender post (power levels): a retry would not change that.
      this.joined.delete(`${sender.userId}|${roomId}`);
      return await send();
    }
  }

  /**
   * Redacts an event as the bot, idempotently by `txnId` (Client-Server API §Redactions). Never
   * encrypted: a redaction is not, in an encrypted room either.
   */
  async redactAsBot(roomId: string, eventId: string, txnId: string): Promise<string> {
    const path = `/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/redact/${encodeURIComponent(eventId)}/${encodeURIComponent(txnId)}`;
    const sent = await this.request("PUT", path, this.opts.botUserId, {});
    return String(sent.event_id);
  }

  /**
   * Sets a ghost's presence (Client-Server API §PUT /_matrix/client/v3/presence/{userId}/status), as
   * the ghost, registered first. A homeserver with presence turned off answers as it does
   * (conduwuit: 403 M_FORBIDDEN; Synapse: 200, ignored): the caller decides what that means.
   */
  async setPresence(
    sender: { userId: string; displayName: string },
    presence: "online" | "offline" | "unavailable",
    statusMsg: string | undefined,
  ): Promise<void> {
    await this.ensureGhost(sender.userId, sender.displayName);
    const path = `/_matrix/client/v3/presence/${encodeURIComponent(sender.userId)}/status`;
    await this.request(
      "PUT",
      path,
      sender.userId,
      statusMsg === undefined ? { presence } : { presence, status_msg: statusMsg },
    );
  }

  /**
   * Uploads a file as `sender` (bot or ghost); returns its mxc:// URI. `name` undefined: uploaded
   * without one (an encrypted file, whose name is for the room's members only).
   */
  async upload(
    sender: { userId: string; displayName: string },
    data: Uint8Array,
    name: string | undefined,
    mimeType: string,
  ): Promise<string> {
    // The homeserver accepts a masqueraded upload only from a registered ghost.
    if (sender.userId !== this.opts.botUserId) await this.ensureGhost(sender.userId, sender.displayName);
    const path =
      name === undefined
        ? "/_matrix/media/v3/upload"
        : `/_matrix/media/v3/upload?filename=${encodeURIComponent(name)}`;
    const res = await this.request("POST", path, sender.userId, data, mimeType);
    return String(res.content_uri);
  }

  /**
   * A room member's display name (what the far side shows as the sender), or the localpart. The
   * room's member list is fetched once and then kept current from the m.room.member events the
   * homeserver pushes (`noteMember`).
   */
  async displayName(roomId: string, userId: string): Promise<string> {
    let names = this.memberNames.get(roomId);
    if (!names) {
      const path = `/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/joined_members`;
      names = this.request("GET", path, this.opts.botUserId).then((res) => {
        const joined = (res.joined ?? {}) as Record<string, { display_name?: unknown }>;
        const map = new Map<string, string>();
        for (const [id, profile] of Object.entries(joined)) {
          if (typeof profile.display_name === "string") map.set(id, profile.display_name);
        }
        return map;
      });
      names.catch(() => this.memberNames.delete(roomId)); // try again next time
      this.memberNames.set(roomId, names);
    }
    const localpart = userId.slice(1, userId.indexOf(":"));
    try {
      return (await names).get(userId) || localpart;
    } catch {
      return localpart;
    }
  }

  /** Keeps display names current from an m.room.member event. */
  noteMember(roomId: string, userId: string, content: Record<string, unknown>): void {
    void this.memberNames.get(roomId)?.then(
      (map) => {
        if (content.membership === "join" && typeof content.displayname === "string")
          map.set(userId, content.displayname);
        else map.delete(userId);
      },
      () => undefined,
    );
  }

  /** Closes the kept-alive connections. */
  stop(): void {
    void this.pool.destroy();
  }

  /** Called when the homeserver tells us a membership changed for one of ours. */
  forgetMembership(userId: string, roomId: string): void {
    this.joined.delete(`${userId}|${roomId}`);
  }
}
