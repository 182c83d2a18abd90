/**
 * Rooms with end-to-end encryption: an `m.room.encryption` state event (Client-Server API
 * §End-to-End Encryption, §Enabling end-to-end encryption) says their messages are sent as
 * `m.room.encrypted` events, which tribridge cannot decrypt, and that members expect what is posted
 * to be encrypted, which tribridge cannot do, until it supports encryption. Until then it says so
 * rather than going silent:
 *
 * - a route's room, or a room the bot answers commands in, gets one notice (once per room, across
 *   restarts and instances: remembered in Redis) saying what happens and what to do;
 * - every event it cannot read is counted (metrics) and logged, at a bounded rate;
 * - `!tribridge status` lists the rooms;
 * - nothing is posted into an encrypted route room in plaintext: a relay into it fails for good,
 *   into the failed list (`!tribridge retry` once the route has an unencrypted room). mautrix-go's
 *   bridgev2 refuses the same way ("room is encrypted, but bridge isn't configured to support
 *   encryption"); a room whose members chose encryption is not one to put bridged data into in
 *   the clear (on every server in the room, for good). The bot's own notices are the exception:
 *   they carry nothing from the far side.
 *
 * A room is known encrypted from its state (when the bot joins it, at start for route rooms, and
 * before the first relay into a room), from an `m.room.encryption` or `m.room.encrypted` event
 * pushed by the homeserver, or from another instance (its mark in Redis, read now and then).
 */
import type { Redis } from "ioredis";
import { PermanentError, errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import { LogLimiter } from "../log-limiter.js";
import { jobIdFor } from "../queue/ordered-queue.js";
import type { RouteTable } from "../routing/route-table.js";
import { redisKeys } from "../store/keys.js";
import type { MatrixEvent } from "./appservice-server.js";
import type { MatrixClient } from "./matrix-client.js";
import { MatrixPermanentError } from "./matrix-error.js";

export interface EncryptedRoomsOptions {
  matrix: Pick<MatrixClient, "roomState" | "sendAs">;
  routes: RouteTable;
  redis: Redis;
  prefix: string;
  bot: { userId: string; displayName: string };
  /**
   * End-to-end encryption is on (crypto/end-to-end.ts): rooms are only known encrypted here, to be
   * posted into encrypted; nothing is refused, no room told.
   */
  supported?: boolean;
  /** With `supported`: a room found encrypted (once per room and process). */
  onFound?(roomId: string): void;
  /** Counts an event that could not be read, by the kind of room it was sent in. */
  observeUndecryptable?(room: "route" | "other"): void;
  log: Logger;
}

/** How often a room not known encrypted here is looked up in Redis (another instance may know). */
const SHARED_MARK_CHECK_MS = 30_000;
/** How often a room without anyone to tell is asked whether the bot is in it now. */
const NO_ONE_TO_TELL_MS = 60_000;

interface EncryptedRoom {
  /** Events sent in it since this process knows it is encrypted, which tribridge could not read. */
  undecryptable: number;
  /** Whether the room was told, and the telling under way. */
  told: boolean;
  telling?: Promise<void>;
  /**
   * A room that is no route's and that the bot is not in has no one to tell: asked again (whether
   * the bot is in it) not before this time, unless the bot joins it or it becomes a route's.
   */
  askAgainAt?: number;
}

export class EncryptedRooms {
  private readonly rooms = new Map<string, EncryptedRoom>();
  /** A room's state, read once (for rooms not known encrypted): whether it has m.room.encryption. */
  private readonly stateChecks = new Map<string, Promise<boolean>>();
  private readonly sharedMarkReadAt = new Map<string, number>();
  private readonly undecryptableLog = new LogLimiter();
  private readonly failureLog = new LogLimiter();

  constructor(private readonly o: EncryptedRoomsOptions) {}

  /**
   * Whether the room is encrypted, from its state (read once per room: later changes arrive as
   * events); the first time it is, says so (see `found`). Rejects when the state cannot be read.
   */
  async check(roomId: string): Promise<boolean> {
    if (!this.rooms.has(roomId)) {
      let check = this.stateChecks.get(roomId);
      if (!check) {
        check = this.o.matrix.roomState(roomId, "m.room.encryption").then((state) => state !== undefined);
        this.stateChecks.set(roomId, check);
        check.catch(() => this.stateChecks.delete(roomId)); // read again next time
      }
      if (!(await check)) return false;
    }
    this.found(roomId, "room state");
    return true;
  }

  /** The bot joined the room (after an invite): if it is encrypted, it is told, even if known before. */
  async joined(roomId: string): Promise<void> {
    const room = this.rooms.get(roomId);
    if (room) room.askAgainAt = undefined;
    await this.check(roomId);
  }

  /**
   * Before a relay posts into the room: a PermanentError if it is encrypted (the relay goes to the
   * failed list, with what to do as its reason). Cheap after the first call for a room.
   */
  async refusePlaintext(roomId: string): Promise<void> {
    if (this.o.supported) return;
    if (!this.rooms.has(roomId)) {
      const readAt = this.sharedMarkReadAt.get(roomId) ?? 0;
      if (Date.now() - readAt >= SHARED_MARK_CHECK_MS) {
        this.sharedMarkReadAt.set(roomId, Date.now());
        const marked = await this.o.redis.exists(redisKeys.encryptedRoom(this.o.prefix, roomId));
        if (marked === 1) this.found(roomId, "marked by another instance");
      }
    }
    if (!(await this.check(roomId))) return;
    throw new PermanentError(
      `room ${roomId} is end-to-end encrypted and tribridge cannot encrypt yet: not posted in ` +
        "plaintext. Give the route a room without encryption, then retry",
    );
  }

  /** An `m.room.encryption` state event: the room is encrypted from now on (it cannot be undone). */
  enabled(ev: MatrixEvent): void {
    this.o.log.info({ roomId: ev.room_id, sender: ev.sender }, "encryption was enabled in a room");
    this.found(ev.room_id, "m.room.encryption event");
  }

  /** An `m.room.encrypted` event: not relayed, since tribridge cannot read it; counted and logged. */
  undecryptable(ev: MatrixEvent): void {
    this.o.observeUndecryptable?.(this.o.routes.isRouteRoom(ev.room_id) ? "route" : "other");
    const gate = this.undecryptableLog.pass(ev.room_id);
    if (gate)
      this.o.log.warn(
        {
          roomId: ev.room_id,
          eventId: ev.event_id,
          sender: ev.sender,
          routes: this.routesOf(ev.room_id),
          notLoggedSinceLastLine: gate.heldBack,
        },
        "an encrypted event tribridge cannot read (end-to-end encryption is not supported yet): not relayed",
      );
    this.found(ev.room_id, "m.room.encrypted event").undecryptable++;
  }

  /** Lines for `!tribridge status`: each encrypted room known here. */
  statusLines(): string[] {
    if (this.rooms.size === 0 || this.o.supported) return [];
    const lines = [
      "End-to-end encrypted rooms (not supported yet: nothing relayed in or out; see the notice in each):",
    ];
    for (const [roomId, { undecryptable }] of this.rooms) {
      const routes = this.routesOf(roomId);
      const what = routes.length > 0 ? routes.map((r) => `route ${r}`).join(", ") : "commands";
      lines.push(`  ${what}: ${roomId}, ${undecryptable} unreadable event(s) since start`);
    }
    return lines;
  }

  /**
   * The room is encrypted: remembered (and logged) the first time; told, in the background, until
   * that worked once (see tell).
   */
  private found(roomId: string, how: string): EncryptedRoom {
    let room = this.rooms.get(roomId);
    if (!room) {
      room = { undecryptable: 0, told: false };
      this.rooms.set(roomId, room);
      if (this.o.supported) {
        this.o.log.info({ roomId, routes: this.routesOf(roomId), how }, "room is end-to-end encrypted");
        room.told = true; // nothing to tell: it is bridged
        this.o.onFound?.(roomId);
        return room;
      }
      this.o.log.warn(
        { roomId, routes: this.routesOf(roomId), how },
        "room is end-to-end encrypted: tribridge cannot read it nor post into it (encryption is not supported yet)",
      );
    }
    const known = room;
    const route = this.routesOf(roomId).length > 0;
    if (!known.told && !known.telling && (route || (known.askAgainAt ?? 0) <= Date.now())) {
      known.telling = this.tell(roomId)
        .then((told) => {
          if (told) known.told = true;
          else known.askAgainAt = Date.now() + NO_ONE_TO_TELL_MS;
        })
        .catch((err: unknown) => {
          const gate = this.failureLog.pass(roomId);
          if (gate)
            this.o.log.warn(
              { roomId, err: errorMessage(err), failuresNotLogged: gate.heldBack },
              "could not tell a room that tribridge cannot use it while encrypted; tried again on its next event",
            );
        })
        .finally(() => void (known.telling = undefined));
    }
    return known;
  }

  /**
   * Marks the room encrypted in Redis (for other instances), and posts one notice in it (its Redis
   * key set NX first, deleted again if the notice could not be sent): in a route's room, or a room
   * the bot is in, and so may be given commands in. Resolves false when there was no one to tell
   * (a room only ghosts are in, or not yet known as a route's).
   */
  private async tell(roomId: string): Promise<boolean> {
    const { matrix, redis, prefix, bot } = this.o;
    await redis.set(redisKeys.encryptedRoom(prefix, roomId), "1");
    const routes = this.routesOf(roomId);
    let text: string;
    if (routes.length > 0) text = routeNotice(routes);
    else if (await this.botIsIn(roomId)) text = commandNotice(bot.userId);
    else return false;
    const key = redisKeys.encryptionNotice(prefix, roomId);
    if ((await redis.set(key, "1", "NX")) !== "OK") return true; // said before
    try {
      const content = { msgtype: "m.notice", body: text, "m.mentions": {} };
      await matrix.sendAs(bot, roomId, "m.room.message", content, jobIdFor("encryption-notice", roomId));
      this.o.log.info({ roomId, routes }, "told the room that tribridge cannot use it while it is encrypted");
      return true;
    } catch (err) {
      await redis.del(key);
      throw err;
    }
  }

  /** Whether the bot's membership in the room is `join`; a room it cannot read is not its. */
  private async botIsIn(roomId: string): Promise<boolean> {
    try {
      const member = await this.o.matrix.roomState(roomId, "m.room.member", this.o.bot.userId);
      return member?.membership === "join";
    } catch (err) {
      // 403: not in the room (nor ever was); 404: no such room.
      if (err instanceof MatrixPermanentError && (err.status === 403 || err.status === 404)) return false;
      throw err;
    }
  }

  private routesOf(roomId: string): string[] {
    return this.o.routes.routes.filter((r) => this.o.routes.roomIdOf(r.id) === roomId).map((r) => r.id);
  }
}

function routeNotice(routes: string[]): string {
  const named = routes.map((r) => `"${r}"`).join(", ");
  return (
    "This room is end-to-end encrypted, and tribridge cannot read or send encrypted messages yet " +
    `(end-to-end encryption is not supported). So nothing is relayed for route ${named} here: ` +
    "messages sent in this room are not relayed, and what arrives for this room is not posted " +
    "(tribridge does not post in plaintext into an encrypted room) but kept in its failed list.\n" +
    "Encryption cannot be turned off in a room. Create a new room without encryption, make it the " +
    "route's room (`routes[].room` in tribridge's config), restart tribridge, and give " +
    "`!tribridge retry all` in the new room to post what waited."
  );
}

function commandNotice(bot: string): string {
  return (
    "This room is end-to-end encrypted, and tribridge cannot read encrypted messages yet " +
    "(end-to-end encryption is not supported): it does not see commands given here, and will not " +
    "answer them.\n" +
    `Encryption cannot be turned off in a room. To give tribridge commands, invite ${bot} to a new ` +
    "room without encryption."
  );
}
