/**
 * Users' power levels in rooms (Client-Server API §m.room.power_levels): `users[userId]`, else
 * `users_default`, else 0. Kept current from the `m.room.power_levels` state events the homeserver
 * pushes; a room not seen yet is read once with GET /rooms/{roomId}/state/m.room.power_levels/.
 */
import type { MatrixEvent } from "./appservice-server.js";

type Content = Record<string, unknown>;

/** Rooms whose power levels are remembered; beyond it they are forgotten and read again when needed. */
const MAX_ROOMS = 10_000;

export class PowerLevels {
  /** Per room: its power levels' content; null when the room has none. */
  private readonly known = new Map<string, Content | null>();
  private readonly reading = new Map<string, Promise<Content | null>>();

  constructor(
    /** The content of a room's state event (undefined: the room has none); throws as the client does. */
    private readonly readState: (roomId: string, type: string) => Promise<Content | undefined>,
  ) {}

  /** Told of every state event pushed: a power levels change applies from the next message on. */
  noteState(ev: MatrixEvent): void {
    if (ev.type !== "m.room.power_levels" || ev.state_key !== "") return;
    this.remember(ev.room_id, ev.content);
  }

  /**
   * `userId`'s level in `roomId`: at once when the room's power levels are known (as they are at this
   * moment, not after state events that arrive later), else once they are read.
   */
  levelOf(roomId: string, userId: string): number | Promise<number> {
    const content = this.known.get(roomId);
    if (content !== undefined) return levelIn(content, userId);
    return this.read(roomId).then((read) => levelIn(read, userId));
  }

  private read(roomId: string): Promise<Content | null> {
    let reading = this.reading.get(roomId);
    if (!reading) {
      reading = this.readState(roomId, "m.room.power_levels")
        .then((content) => {
          // A change pushed while reading is newer than what was read.
          if (!this.known.has(roomId)) this.remember(roomId, content ?? null);
          return this.known.get(roomId) ?? null;
        })
        .finally(() => this.reading.delete(roomId));
      this.reading.set(roomId, reading);
    }
    return reading;
  }

  private remember(roomId: string, content: Content | null): void {
    if (this.known.size >= MAX_ROOMS && !this.known.has(roomId)) this.known.clear();
    this.known.set(roomId, content);
  }
}

/**
 * A room without power levels gives its creator 100 and everyone else 0; the creator is not looked
 * up (its m.room.create event is not read), so there everyone counts as 0: refused unless listed.
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
