/**
 * Users' power levels in rooms (Client-Server API §m.room.power_levels): `users[userId]`, else
 * `users_default`, else 0; from room version 12 on, the room's creators (the sender of
 * `m.room.create` and its `additional_creators`) rank above every level (Room versions §12). Kept
 * current from the state events the homeserver pushes; a room not seen yet is read once: its
 * power levels and create event's content, and, in a version 12 room, the create event itself,
 * whose id the room id is made from.
 */
import type { MatrixEvent } from "./appservice-server.js";
import type { MatrixClient } from "./matrix-client.js";

type Content = Record<string, unknown>;

export interface RoomReader {
  /** The content of a room's state event; undefined when the room has none. Throws as the client does. */
  state(roomId: string, type: string): Promise<Content | undefined>;
  /** An event of a room (GET /rooms/{roomId}/event/{eventId}): its sender. */
  sender(roomId: string, eventId: string): Promise<string>;
}

/** Reads rooms as the bot. */
export function roomReader(matrix: MatrixClient, bot: string): RoomReader {
  return {
    state: (roomId, type) => matrix.roomState(roomId, type),
    sender: async (roomId, eventId) => {
      const path = `/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/event/${encodeURIComponent(eventId)}`;
      return String((await matrix.requestAs(bot, "GET", path)).sender);
    },
  };
}

/** Rooms remembered; beyond it they are forgotten and read again when needed. */
const MAX_ROOMS = 10_000;
const NONE: ReadonlySet<string> = new Set();

export class PowerLevels {
  /** Per room: its power levels' content; null when the room has none. */
  private readonly levels = new Map<string, Content | null>();
  /** Per room: the users who rank above every level (version 12 creators); empty in older rooms. */
  private readonly creators = new Map<string, ReadonlySet<string>>();
  private readonly reading = new Map<string, Promise<void>>();

  constructor(private readonly read: RoomReader) {}

  /** Told of every state event pushed: a power levels change applies from the next message on. */
  noteState(ev: MatrixEvent): void {
    if (ev.state_key !== "") return;
    if (ev.type === "m.room.power_levels") this.remember(this.levels, ev.room_id, ev.content);
    if (ev.type === "m.room.create")
      this.remember(this.creators, ev.room_id, creatorsOf(ev.content, ev.sender));
  }

  /**
   * `userId`'s level in `roomId` (Infinity for a version 12 creator): at once when the room is known
   * (as it is at this moment, not after state events that arrive later), else once it is read.
   */
  levelOf(roomId: string, userId: string): number | Promise<number> {
    const known = this.known(roomId, userId);
    if (known !== undefined) return known;
    return this.readRoom(roomId).then(() => this.known(roomId, userId) ?? 0);
  }

  private known(roomId: string, userId: string): number | undefined {
    const levels = this.levels.get(roomId);
    const creators = this.creators.get(roomId);
    if (levels === undefined || creators === undefined) return undefined;
    return creators.has(userId) ? Infinity : levelIn(levels, userId);
  }

  private readRoom(roomId: string): Promise<void> {
    let reading = this.reading.get(roomId);
    if (!reading) {
      // What is pushed while reading is newer than what was read: kept.
      const levels = async () => {
        const content = await this.read.state(roomId, "m.room.power_levels");
        if (!this.levels.has(roomId)) this.remember(this.levels, roomId, content ?? null);
      };
      const creators = async () => {
        const content = await this.read.state(roomId, "m.room.create");
        const sender =
          content && createsCreators(content) ? await this.read.sender(roomId, createEventIdOf(roomId)) : "";
        if (!this.creators.has(roomId))
          this.remember(this.creators, roomId, creatorsOf(content ?? {}, sender));
      };
      reading = Promise.all([
        this.levels.has(roomId) ? undefined : levels(),
        this.creators.has(roomId) ? undefined : creators(),
      ])
        .then(() => undefined)
        .finally(() => this.reading.delete(roomId));
      this.reading.set(roomId, reading);
    }
    return reading;
  }

  private remember<V>(map: Map<string, V>, roomId: string, value: V): void {
    if (map.size >= MAX_ROOMS && !map.has(roomId)) {
      this.levels.clear();
      this.creators.clear();
    }
    map.set(roomId, value);
  }
}

/**
 * A room without power levels gives its creator 100 and everyone else 0; the creator of a room
 * before version 12 is not looked up, so there everyone counts as 0: refused unless listed.
 */
export function levelIn(content: Content | null, userId: string): number {
  if (!content) return 0;
  const users = content.users;
  const own = typeof users === "object" && users !== null ? (users as Content)[userId] : undefined;
  return levelValue(own) ?? levelValue(content.users_default) ?? 0;
}

/** Levels are integers; room versions before 10 also allow them as strings of digits. */
function levelValue(v: unknown): number | undefined {
  if (typeof v === "number" && Number.isInteger(v)) return v;
  if (typeof v === "string" && /^[+-]?\d+$/.test(v.trim())) return Number(v.trim());
  return undefined;
}

/** Room versions §12: creators rank above every power level (room versions 12 and later). */
function createsCreators(createContent: Content): boolean {
  const version = typeof createContent.room_version === "string" ? createContent.room_version : "1";
  return /^\d+$/.test(version) && Number(version) >= 12;
}

/** The users who rank above every level, from a create event's content and sender. */
export function creatorsOf(createContent: Content, sender: string): ReadonlySet<string> {
  if (!createsCreators(createContent)) return NONE;
  const additional = Array.isArray(createContent.additional_creators)
    ? createContent.additional_creators.filter((u): u is string => typeof u === "string")
    : [];
  return new Set([sender, ...additional]);
}

/** Room versions §12: a room's id is its create event's id, with `!` for `$`. */
function createEventIdOf(roomId: string): string {
  return `$${roomId.slice(1)}`;
}
