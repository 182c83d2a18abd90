/**
 * For an encrypted room: who must be able to read what we send (the members whose devices get the
 * room key) and how its Megolm sessions are shared and rotated. Read once per room as the bot,
 * then kept current from the state events the homeserver pushes (`noteState`).
 */
import type { MatrixEvent } from "../appservice-server.js";
import type { MatrixClient } from "../matrix-client.js";
import type { RoomEncryptionSettings } from "./olm-device.js";

type Membership = "join" | "invite" | "leave" | "ban" | "knock";

interface RoomAudienceState {
  members: Map<string, Membership>;
  settings: RoomEncryptionSettings;
}

const VISIBILITIES = new Set(["invited", "joined", "shared", "world_readable"]);

export class RoomAudience {
  private readonly rooms = new Map<string, Promise<RoomAudienceState>>();

  constructor(
    private readonly matrix: Pick<MatrixClient, "requestAs" | "roomState">,
    private readonly botUserId: string,
  ) {}

  /**
   * The users whose devices get the room key: joined members, and invited ones unless history is
   * visible only from joining (as Element shares).
   */
  async recipients(roomId: string): Promise<{ users: string[]; settings: RoomEncryptionSettings }> {
    const room = await this.load(roomId);
    const invitedToo = room.settings.historyVisibility !== "joined";
    const users = [...room.members]
      .filter(([, m]) => m === "join" || (invitedToo && m === "invite"))
      .map(([u]) => u);
    return { users, settings: room.settings };
  }

  /** A state event of the room, as pushed: membership, encryption settings, history visibility. */
  noteState(ev: MatrixEvent): void {
    const room = this.rooms.get(ev.room_id);
    if (!room || ev.state_key === undefined) return;
    void room.then(
      (state) => {
        if (ev.type === "m.room.member" && typeof ev.content.membership === "string")
          state.members.set(ev.state_key!, ev.content.membership as Membership);
        else if (ev.type === "m.room.encryption") Object.assign(state.settings, rotationOf(ev.content));
        else if (
          ev.type === "m.room.history_visibility" &&
          VISIBILITIES.has(String(ev.content.history_visibility))
        )
          state.settings.historyVisibility = ev.content
            .history_visibility as RoomEncryptionSettings["historyVisibility"];
      },
      () => undefined,
    );
  }

  private load(roomId: string): Promise<RoomAudienceState> {
    let room = this.rooms.get(roomId);
    if (!room) {
      room = this.read(roomId);
      room.catch(() => this.rooms.delete(roomId)); // read again next time
      this.rooms.set(roomId, room);
    }
    return room;
  }

  private async read(roomId: string): Promise<RoomAudienceState> {
    const id = encodeURIComponent(roomId);
    const [membersResponse, encryption, visibility] = await Promise.all([
      this.matrix.requestAs(this.botUserId, "GET", `/_matrix/client/v3/rooms/${id}/members`),
      this.matrix.roomState(roomId, "m.room.encryption"),
      this.matrix.roomState(roomId, "m.room.history_visibility"),
    ]);
    const members = new Map<string, Membership>();
    const chunk = Array.isArray(membersResponse.chunk) ? (membersResponse.chunk as MatrixEvent[]) : [];
    for (const ev of chunk) {
      if (typeof ev.state_key === "string" && typeof ev.content?.membership === "string")
        members.set(ev.state_key, ev.content.membership as Membership);
    }
    const shown = String(visibility?.history_visibility ?? "shared");
    return {
      members,
      settings: {
        ...rotationOf(encryption ?? {}),
        historyVisibility: (VISIBILITIES.has(shown)
          ? shown
          : "shared") as RoomEncryptionSettings["historyVisibility"],
      },
    };
  }
}

/** `rotation_period_ms` and `rotation_period_msgs` of an m.room.encryption content, when valid. */
function rotationOf(
  content: Record<string, unknown>,
): Pick<RoomEncryptionSettings, "rotationPeriodMs" | "rotationPeriodMessages"> {
  const positive = (v: unknown) => (Number.isSafeInteger(v) && (v as number) > 0 ? (v as number) : undefined);
  return {
    rotationPeriodMs: positive(content.rotation_period_ms),
    rotationPeriodMessages: positive(content.rotation_period_msgs),
  };
}
