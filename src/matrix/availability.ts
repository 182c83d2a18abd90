/**
 * A device's availability in its route's room (ConnectorContext.availability): the presence of its
 * ghost, and one status line per device and room — a notice of the ghost's, posted once and edited
 * with each change, like a live message (its stream is one no connector can name). A report that
 * repeats what the line shows (retained values replayed at each subscribe) changes nothing there.
 *
 * Presence is best effort: a homeserver that refuses it (conduwuit with presence off: 403
 * M_FORBIDDEN; one without the endpoint: 404) is not asked again for an hour, and the status line
 * alone shows the state. Synapse with presence off answers 200 and ignores it.
 *
 * A homeserver times out the presence of a user that neither syncs nor acts: Synapse sets it
 * offline 30 s after its last activity (`SYNC_ONLINE_TIMEOUT`; measured with 1.163: online after
 * 20 s, offline after 35 s), conduwuit after `presence_offline_timeout_s`. So ghosts shown online or
 * unavailable are kept in Redis and set again every 20 s, by one instance per round.
 */
import { hash } from "node:crypto";
import type { Redis } from "ioredis";
import type { Availability } from "../connector.js";
import { errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import { redisKeys } from "../store/keys.js";
import { toMatrixContent } from "./format.js";
import { editLiveMessage, type LiveMessages, type LiveStream } from "./live-messages.js";
import type { MatrixClient } from "./matrix-client.js";
import { MatrixPermanentError } from "./matrix-error.js";

/** What a to-matrix job of an availability report carries besides its sender. */
export interface AvailabilityJob {
  state: Availability;
  statusMessage?: string;
  /** When it changed (ms since epoch): the far side's time, else when it was enqueued. */
  at: number;
}

/** The status line's stream: a NUL, which no MQTT topic may hold [MQTT-4.7.3-2], nor a header. */
const STATUS_STREAM = "\u0000availability";
/** As LiveMessages: a device silent for a month gets a new line rather than an edit far up. */
const REMEMBER_SEC = 30 * 24 * 3600;
/** A homeserver that refused presence is asked again after this long (its config may change). */
const PRESENCE_RECHECK_MS = 3600_000;
/** Within Synapse's SYNC_ONLINE_TIMEOUT (30 s), with room for a slow round. */
export const PRESENCE_REFRESH_MS = 20_000;

/** A ghost whose presence is kept up (see refreshPresence). */
interface KeptPresence {
  displayName: string;
  state: Availability;
  statusMessage?: string;
}

const MARKS: Record<Availability, string> = { online: "🟢", unavailable: "🟡", offline: "🔴" };

/** The status line's text, e.g. "🔴 offline since 2026-12-02 11:40 UTC — lost connection". */
export function statusLine(report: AvailabilityJob): string {
  const since = new Date(report.at).toISOString().slice(0, 16).replace("T", " ");
  const words = report.statusMessage ? ` — ${report.statusMessage}` : "";
  return `${MARKS[report.state]} ${report.state} since ${since} UTC${words}`;
}

export class DeviceAvailability {
  /** When the homeserver last refused presence; undefined while it takes it. */
  private presenceRefusedAt: number | undefined;
  /** Whether the last refresh round failed (logged once, until one succeeds). */
  private refreshFailing = false;

  constructor(
    private readonly matrix: MatrixClient,
    private readonly live: LiveMessages,
    private readonly redis: Redis,
    private readonly prefix: string,
    private readonly log: Logger,
  ) {}

  /** Keeps presence up (refreshPresence) every `refreshMs` until `signal` aborts. */
  start(signal: AbortSignal, refreshMs = PRESENCE_REFRESH_MS): void {
    let round: Promise<void> | undefined;
    const timer = setInterval(() => {
      // One round at a time: a round waiting for Redis or the homeserver is not joined by more.
      round ??= this.refreshPresence(refreshMs)
        .then(
          () => void (this.refreshFailing = false),
          (err: unknown) => {
            if (!this.refreshFailing)
              this.log.warn({ err: errorMessage(err) }, "could not keep device presence up; tried again");
            this.refreshFailing = true;
          },
        )
        .finally(() => (round = undefined));
    }, refreshMs);
    timer.unref();
    signal.addEventListener("abort", () => clearInterval(timer), { once: true });
  }

  /**
   * Sets the presence of every ghost shown online or unavailable again, before the homeserver
   * times it out; one instance per round (a turn in Redis for `roundMs`). Returns how many.
   */
  async refreshPresence(roundMs = PRESENCE_REFRESH_MS): Promise<number> {
    if (this.presenceRefused()) return 0;
    const turn = await this.redis.set(
      redisKeys.presenceRound(this.prefix),
      "1",
      "PX",
      Math.max(1, roundMs - 1000),
      "NX",
    );
    if (turn !== "OK") return 0;
    const key = redisKeys.presenceKept(this.prefix);
    let refreshed = 0;
    for (const [userId, raw] of Object.entries(await this.redis.hgetall(key))) {
      const kept = JSON.parse(raw) as KeptPresence;
      const sender = { userId, displayName: kept.displayName };
      await this.setPresence(sender, kept);
      // Set offline while this round set it again (the report removes it first): offline it is.
      if ((await this.redis.hexists(key, userId)) === 0) await this.setPresence(sender, { state: "offline" });
      if (this.presenceRefused()) break;
      refreshed++;
    }
    return refreshed;
  }

  /** Shows `report` as `sender` in `roomId`: presence, then the status line. Idempotent per `txnId`. */
  async show(
    report: AvailabilityJob,
    sender: { userId: string; displayName: string },
    roomId: string,
    line: { endpointId: string; senderId: string },
    txnId: string,
  ): Promise<void> {
    if (!this.presenceRefused()) {
      // Recorded before it is set: a refresh round that set it again meanwhile then sees it changed.
      const key = redisKeys.presenceKept(this.prefix);
      if (report.state === "offline") await this.redis.hdel(key, sender.userId);
      else {
        const kept: KeptPresence = { displayName: sender.displayName, state: report.state };
        if (report.statusMessage !== undefined) kept.statusMessage = report.statusMessage;
        await this.redis.hset(key, sender.userId, JSON.stringify(kept));
      }
      await this.setPresence(sender, report);
    }
    const stream: LiveStream = { roomId, ...line, stream: STATUS_STREAM };
    const shownKey = redisKeys.availabilityShown(
      this.prefix,
      hash("sha256", [roomId, line.endpointId, line.senderId].join("\u0000"), "hex"),
    );
    const state = `${report.state}\u0000${report.statusMessage ?? ""}`;
    const [original, shown] = await Promise.all([this.live.current(stream), this.redis.get(shownKey)]);
    if (original && shown === state) return;
    const content = toMatrixContent({ text: statusLine(report), notice: true });
    const postUnder = original
      ? await editLiveMessage(this.matrix, this.live, sender, roomId, original, content, txnId)
      : txnId;
    if (postUnder !== undefined) {
      const eventId = await this.matrix.sendAs(sender, roomId, "m.room.message", content, postUnder);
      await this.live.remember(stream, eventId);
    }
    await this.redis.set(shownKey, state, "EX", REMEMBER_SEC);
  }

  private presenceRefused(): boolean {
    const refusedAt = this.presenceRefusedAt;
    return refusedAt !== undefined && Date.now() - refusedAt < PRESENCE_RECHECK_MS;
  }

  private async setPresence(
    sender: { userId: string; displayName: string },
    report: { state: Availability; statusMessage?: string },
  ): Promise<void> {
    const refusedAt = this.presenceRefusedAt;
    try {
      await this.matrix.setPresence(sender, report.state, report.statusMessage);
      if (refusedAt !== undefined) this.log.info("the homeserver takes presence again");
      this.presenceRefusedAt = undefined;
    } catch (err) {
      // Only the presence request's own refusal: the ghost's registration failing is the job's.
      if (!(err instanceof MatrixPermanentError && err.what.includes("/presence/"))) throw err;
      if (refusedAt === undefined)
        this.log.info(
          { err: errorMessage(err) },
          "the homeserver does not take presence (turned off?): device availability shows in status lines only",
        );
      this.presenceRefusedAt = Date.now();
    }
  }
}
