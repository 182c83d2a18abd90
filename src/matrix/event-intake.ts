/**
 * Matrix → queue: what the homeserver pushes. Drops what we said ourselves (loop guard), keeps
 * membership knowledge current, and enqueues each new room message once per outbound endpoint.
 */
import type { Redis } from "ioredis";
import type { Capabilities, OutboundMessage } from "../connector.js";
import { PermanentError, errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import { jobIdFor } from "../queue/ordered-queue.js";
import type { ResolvedEndpoint, ResolvedRoute } from "../config/load.js";
import type { RouteTable } from "../routing/route-table.js";
import { SeenEvents } from "../store/seen-events.js";
import type { MatrixEvent } from "./appservice-server.js";
import { downloadAttachments } from "./attachments.js";
import { fromMatrixContent } from "./format.js";
import { relationsOf } from "./relations.js";
import { isCommand, type Commands } from "./commands.js";
import type { EncryptedRooms } from "./encrypted-rooms.js";
import type { LiveMessages } from "./live-messages.js";
import type { MatrixClient } from "./matrix-client.js";
import type { RelayPermissions } from "./permissions.js";

/** A room message on its way out to one endpoint (a to-<connector> queue's item). */
export interface ToRemoteJob {
  endpointId: string;
  roomId: string;
  sender: string;
  /** The event's content; rendered for the far side when delivered, with the sender's current name. */
  content: Record<string, unknown>;
  timestamp: number;
  /** The event's id; absent in items queued by tribridge 0.1 (their remote ids are not remembered). */
  eventId?: string;
  /**
   * Absent: a new message. `edit`: `content` is an edit's (`m.replace`, with `m.new_content`), for
   * `Connector.edit`. `redaction`: takes back the event `redacts` (`content.reason`), for
   * `Connector.redact`.
   */
  kind?: "edit" | "redaction";
  redacts?: string;
}

/** Which routes a room message's sender may relay to (RelayPermissions.judge). */
type Judged = Promise<(route: ResolvedRoute) => boolean>;

/** How long an event id is remembered: longer than any homeserver keeps retrying a transaction. */
export const SEEN_EVENT_TTL_SEC = 7 * 24 * 3600;

export interface EventIntakeOptions {
  matrix: MatrixClient;
  routes: RouteTable;
  /**
   * Resolves once every route's room id is known (aliases resolved at start): until then an event
   * cannot be told to be a route's, so events wait (the homeserver waits for its transaction).
   */
  routesKnown: Promise<void>;
  redis: Redis;
  prefix: string;
  botUserId: string;
  /** The bot and every ghost: their events are never relayed back. */
  isOurs(userId: string): boolean;
  /** Told of redactions, so a redacted live message is not edited further. */
  live: LiveMessages;
  commands: Commands;
  /**
   * Who may relay a room message to each route (config `permissions`); a refused one is answered
   * there. Told of every state event (power levels).
   */
  permissions: Pick<RelayPermissions, "noteState" | "judge" | "refused">;
  /** Admins may invite the bot to any room (to talk to it there). */
  isAdmin(userId: string): boolean;
  /**
   * A route's room was upgraded (`m.room.tombstone`): relay through the new room from now on.
   * `upgradedBy`: who sent the tombstone; their server is in the new room, to join it through.
   */
  upgraded(oldRoomId: string, newRoomId: string, upgradedBy: string): void;
  enqueue(endpoint: ResolvedEndpoint, roomId: string, id: string, job: ToRemoteJob): Promise<void>;
  /** What a connector can do, by name: edits and redactions are queued only where it can act on them. */
  capabilitiesOf(connector: string): Capabilities | undefined;
  /** Told of rooms with end-to-end encryption and of the events in them no one here can read. */
  encryption: Pick<EncryptedRooms, "enabled" | "undecryptable" | "joined">;
  /**
   * With end-to-end encryption on (crypto/end-to-end.ts): decrypts an `m.room.encrypted` event
   * (undefined: not now, or never; it says so itself), and is told of every state event.
   */
  endToEnd?: {
    open(ev: MatrixEvent): Promise<MatrixEvent | undefined>;
    noteState(ev: MatrixEvent): void;
  };
  log: Logger;
}

export class EventIntake {
  private readonly seen: SeenEvents;

  constructor(private readonly o: EventIntakeOptions) {
    this.seen = new SeenEvents(o.redis, o.prefix, SEEN_EVENT_TTL_SEC);
  }

  /**
   * Every event takes the same awaits, so their items are enqueued in the order of the transaction.
   * An event the transaction holds twice is handled once: handled at once, both copies would pass
   * the seen-check before either is recorded.
   */
  async handle(events: readonly MatrixEvent[]): Promise<void> {
    await this.o.routesKnown;
    const ids = new Set<string>();
    const unique = events.filter((ev) => !ids.has(ev.event_id) && ids.add(ev.event_id));
    await Promise.all(unique.map((ev) => this.handleOne(ev)));
  }

  private async handleOne(ev: MatrixEvent): Promise<void> {
    const { routes, log } = this.o;
    if (ev.state_key !== undefined) {
      this.o.endToEnd?.noteState(ev);
      this.o.permissions.noteState(ev);
    }
    if (this.o.isOurs(ev.sender)) return; // loop guard
    if (ev.type === "m.room.member" && ev.state_key !== undefined) {
      this.noteMembership(ev, ev.state_key);
      return;
    }
    if (ev.type === "m.room.tombstone" && ev.state_key === "" && routes.isRouteRoom(ev.room_id)) {
      const replacement = ev.content.replacement_room;
      if (typeof replacement === "string") this.o.upgraded(ev.room_id, replacement, ev.sender);
      return;
    }
    // Client-Server API §End-to-End Encryption: decrypted and handled as what it holds when
    // encryption is on; else not supported, and said so (encrypted-rooms.ts).
    if (ev.type === "m.room.encryption" && ev.state_key === "") return this.o.encryption.enabled(ev);
    if (ev.type === "m.room.encrypted") {
      if (!this.o.endToEnd) return this.o.encryption.undecryptable(ev);
      const clear = await this.o.endToEnd.open(ev);
      if (clear && clear.type !== "m.room.encrypted") await this.handleOne(clear);
      return;
    }
    if (ev.type === "m.room.redaction") {
      // Room v11 moved `redacts` into the content.
      const target = ev.redacts ?? ev.content.redacts;
      if (typeof target !== "string") return;
      await this.o.live.forget(target);
      if (!routes.isRouteRoom(ev.room_id)) return;
      const reason = typeof ev.content.reason === "string" ? { reason: ev.content.reason } : {};
      await this.seen.once(ev.event_id, () =>
        this.relay(ev, reason, "redactions", { kind: "redaction", redacts: target }),
      );
      return;
    }
    if (isCommand(ev)) {
      if (!(await this.seen.once(ev.event_id, async () => undefined))) return;
      // Not a relay: answered on the side, without holding up the transaction.
      this.o.commands
        .handle(ev)
        .catch((err: unknown) =>
          log.warn({ err: errorMessage(err), eventId: ev.event_id }, "command not answered"),
        );
      return;
    }
    if (ev.type !== "m.room.message" || !routes.isRouteRoom(ev.room_id)) return;
    // Judged now, by the power levels before any change later in this transaction.
    const judged = this.o.permissions.judge(ev);
    judged.catch(() => undefined); // awaited if relayed; an event seen before never awaits it
    await this.seen.once(ev.event_id, () => this.relayMessage(ev, judged));
  }

  /** A room message: an edit, or a message tribridge relays, is enqueued (see relay). */
  private async relayMessage(ev: MatrixEvent, judged: Judged): Promise<void> {
    if (relationsOf(ev.content).replaces !== undefined) {
      await this.relay(ev, ev.content, "edits", { kind: "edit" }, judged);
    } else if (!fromMatrixContent(ev.content, ev.sender)) {
      this.o.log.debug(
        { eventId: ev.event_id, msgtype: ev.content.msgtype },
        "room message not relayed (empty, or a msgtype not relayed)",
      );
    } else {
      await this.relay(ev, ev.content, undefined, undefined, judged);
    }
  }

  /**
   * Enqueues an event once per outbound endpoint of its room; an edit or a redaction (`change`)
   * only for connectors whose capabilities say they can act on it; with `judged`, only for the
   * routes its sender may relay to (a redaction is not judged: it only takes back what was relayed,
   * and the homeserver let its sender redact).
   */
  private async relay(
    ev: MatrixEvent,
    content: Record<string, unknown>,
    capability?: "edits" | "redactions",
    change?: Pick<ToRemoteJob, "kind" | "redacts">,
    judged?: Judged,
  ): Promise<void> {
    const job = {
      roomId: ev.room_id,
      sender: ev.sender,
      content,
      timestamp: ev.origin_server_ts ?? Date.now(),
      eventId: ev.event_id,
      ...change,
    };
    // A notice is a bot's (another bridge's alerts, say): relayed only where asked for. An edit
    // says what it is in its new content.
    const shown = isObject(content["m.new_content"]) ? content["m.new_content"] : content;
    const notice = shown.msgtype === "m.notice";
    let endpoints = this.o.routes
      .outboundForRoom(ev.room_id)
      .filter((endpoint) => !notice || endpoint.notices)
      .filter((endpoint) => !capability || this.o.capabilitiesOf(endpoint.connector)?.[capability]);
    if (judged && endpoints.length > 0) endpoints = this.permitted(ev, endpoints, await judged);
    if (capability && endpoints.length === 0) {
      this.o.log.debug(
        { eventId: ev.event_id, kind: change?.kind },
        "no endpoint of the room takes it; not relayed",
      );
    }
    await Promise.all(
      endpoints.map((endpoint) =>
        this.o.enqueue(endpoint, ev.room_id, jobIdFor("out", ev.event_id, endpoint.id), {
          ...job,
          endpointId: endpoint.id,
        }),
      ),
    );
  }

  /** The endpoints whose route the sender may relay to; the others' routes answer the refusal. */
  private permitted(
    ev: MatrixEvent,
    endpoints: readonly ResolvedEndpoint[],
    mayRelayTo: (route: ResolvedRoute) => boolean,
  ): ResolvedEndpoint[] {
    const refused = new Map<string, ResolvedRoute>();
    const permitted = endpoints.filter((endpoint) => {
      const route = this.o.routes.route(endpoint.routeId);
      if (route && mayRelayTo(route)) return true;
      if (route) refused.set(route.id, route);
      return false;
    });
    if (refused.size > 0) void this.o.permissions.refused(ev, [...refused.values()]);
    return permitted;
  }

  private noteMembership(ev: MatrixEvent, userId: string): void {
    const { matrix, routes, log } = this.o;
    matrix.noteMember(ev.room_id, userId, ev.content);
    const membership = ev.content.membership;
    const invitedBy = ev.sender;
    if (
      userId === this.o.botUserId &&
      membership === "invite" &&
      (routes.isRouteRoom(ev.room_id) || this.o.isAdmin(invitedBy))
    ) {
      matrix
        .joinBot(ev.room_id)
        .then(() => log.info({ roomId: ev.room_id, invitedBy }, "joined a room after an invite"))
        .then(() => this.o.encryption.joined(ev.room_id))
        .catch((err: unknown) => log.warn({ err: errorMessage(err) }, "join after invite failed"));
    }
    if (membership === "leave" || membership === "ban") {
      matrix.forgetMembership(userId, ev.room_id); // kicked: join again before the next send
    }
  }
}

/**
 * Renders a queued room message for the far side, with the sender's current display name, and
 * the file itself when it is a media message and the endpoint takes files.
 */
export async function renderOutbound(
  matrix: MatrixClient,
  job: ToRemoteJob,
  id: string,
  limits: Pick<
    Capabilities,
    "html" | "attachments" | "maxAttachmentBytes" | "maxAttachments" | "maxTextBytes"
  >,
): Promise<OutboundMessage> {
  const displayName = await matrix.displayName(job.roomId, job.sender);
  const body = fromMatrixContent(job.content, displayName, { html: limits.html });
  if (!body) throw new PermanentError("not a message tribridge relays");
  const textBytes = Buffer.byteLength(body.text);
  if (limits.maxTextBytes !== undefined && textBytes > limits.maxTextBytes)
    throw new PermanentError(`text of ${textBytes} bytes; the far side takes at most ${limits.maxTextBytes}`);
  const message = { id, sender: { userId: job.sender, displayName }, body, timestamp: job.timestamp };
  if (!limits.attachments) return message;
  const attachments = await downloadAttachments(matrix, job.content, limits);
  return attachments.length > 0 ? { ...message, attachments } : message;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}
