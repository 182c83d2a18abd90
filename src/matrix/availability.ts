/**
 * A device's availability in its route's room (ConnectorContext.availability): the presence of its
 * ghost, and one status line per device and room — a notice of the ghost's, posted once and edited
 * with each change, like a live message (its stream is one no connector can name). A report that
 * repeats what the line shows (retained values replayed at each subscribe) changes nothing there.
 *
 * Presence is best effort: a homeserver that refuses it (conduwuit with presence off: 403
 * M_FORBIDDEN; one without the endpoint: 404) is not asked again for an hour, and the status line
 * alone shows the state. Synapse with presence off answers 200 and ignores it.
 */
import { hash } from "node:crypto";
import type { Redis } from "ioredis";
import type { Availability } from "../connector.js";
import { PermanentError, errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import { redisKeys } from "../store/keys.js";
import { replacementContent, toMatrixContent } from "./format.js";
import type { LiveMessages, LiveStream } from "./live-messages.js";
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

  constructor(
    private readonly matrix: MatrixClient,
    private readonly live: LiveMessages,
    private readonly redis: Redis,
    private readonly prefix: string,
    private readonly log: Logger,
  ) {}

  /** Shows `report` as `sender` in `roomId`: presence, then the status line. Idempotent per `txnId`. */
  async show(
    report: AvailabilityJob,
    sender: { userId: string; displayName: string },
    roomId: string,
    line: { endpointId: string; senderId: string },
    txnId: string,
  ): Promise<void> {
    await this.setPresence(sender, report);
    const stream: LiveStream = { roomId, ...line, stream: STATUS_STREAM };
    const shownKey = redisKeys.availabilityShown(
      this.prefix,
      hash("sha256", [roomId, line.endpointId, line.senderId].join("\u0000"), "hex"),
    );
    const state = `${report.state}\u0000${report.statusMessage ?? ""}`;
    const [original, shown] = await Promise.all([this.live.current(stream), this.redis.get(shownKey)]);
    if (original && shown === state) return;
    const content = toMatrixContent({ text: statusLine(report), notice: true });
    let posted = false;
    if (original) {
      try {
        await this.matrix.sendAs(
          sender,
          roomId,
          "m.room.message",
          replacementContent(original, content),
          txnId,
        );
        posted = true;
      } catch (err) {
        // Refused for good (the line was redacted, say): a new line, under a transaction id of its own.
        if (!(err instanceof PermanentError)) throw err;
        await this.live.forget(original);
        txnId = `${txnId}-new`;
      }
    }
    if (!posted) {
      const eventId = await this.matrix.sendAs(sender, roomId, "m.room.message", content, txnId);
      await this.live.remember(stream, eventId);
    }
    await this.redis.set(shownKey, state, "EX", REMEMBER_SEC);
  }

  private async setPresence(
    sender: { userId: string; displayName: string },
    report: AvailabilityJob,
  ): Promise<void> {
    const refusedAt = this.presenceRefusedAt;
    if (refusedAt !== undefined && Date.now() - refusedAt < PRESENCE_RECHECK_MS) return;
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
