/**
 * Delivery feedback in the room: the bot reacts to a room message (Client-Server API §Reactions,
 * an `m.annotation`) once every endpoint it went out to accepted it — the `accepted` mark, ✅ by
 * default — and while one of them waits for a destination that is down — the `waiting` mark, ⏳,
 * which it takes back (redacts) once the message is delivered or has failed for good, so that the
 * message shows where it stands now. A failure for good is answered in the message's thread with
 * the reason (RemoteDelivery.tellFailure), not marked: the room then shows no ✅.
 *
 * A message to several endpoints: each endpoint's outcome is kept in Redis, a hash per event (until
 * all accepted it, else for a week), and the mark follows all of them: accepted once all accepted,
 * waiting while any waits. Once all accepted, only a done record stays, for DONE_TTL_SEC: a late
 * "waiting" (from an instance that still thinks the destination down) then puts no mark.
 *
 * Best effort and off the relay path: `note` is called after a send is recorded and returns at
 * once; a mark that cannot be put is logged, never retried, and never fails or repeats a relay.
 * Idempotent: a mark's transaction id derives from the event and the mark, so a relay run twice
 * (a crash between its send and its record) puts each mark once.
 */
import { setTimeout as sleep } from "node:timers/promises";
import type { Redis } from "ioredis";
import type { FeedbackConfig } from "../config/schema.js";
import { errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import { LogLimiter } from "../log-limiter.js";
import { jobIdFor } from "../queue/ordered-queue.js";
import type { RouteTable } from "../routing/route-table.js";
import { redisKeys } from "../store/keys.js";
import { SEEN_EVENT_TTL_SEC, type ToRemoteJob } from "./event-intake.js";
import type { MatrixClient } from "./matrix-client.js";
import { unlessOnAlready } from "./matrix-error.js";
import { reactionTo } from "./relations.js";

/** What became of a message at one endpoint. */
export type DeliveryOutcome = "waiting" | "accepted" | "failed";

export interface DeliveryFeedbackOptions {
  matrix: MatrixClient;
  bot: { userId: string; displayName: string };
  routes: RouteTable;
  /** For routes that say nothing else (and messages whose endpoint is no longer configured). */
  defaults: FeedbackConfig;
  redis: Redis;
  prefix: string;
  log: Logger;
}

const WAITING_MARK_FIELD = "mark:waiting";
/** Set once every endpoint accepted the message: a late "waiting" (OrderedQueueOptions.waiting) then changes nothing. */
const DONE_FIELD = "done";
/** How long a message's done record outlives its marks: longer than a "waiting" can come late. */
const DONE_TTL_SEC = 600;

export class DeliveryFeedback {
  /** Per event, its latest update: one event's marks go on in order (waiting before accepted). */
  private readonly updates = new Map<string, Promise<void>>();
  private readonly failures = new LogLimiter();

  constructor(private readonly o: DeliveryFeedbackOptions) {}

  /** Notes what became of a new room message at its endpoint, and marks it; returns at once. */
  note(job: ToRemoteJob, outcome: DeliveryOutcome): void {
    const eventId = job.eventId;
    if (job.kind !== undefined || eventId === undefined) return; // edits and redactions are not marked
    const settings = this.settingsOf(job.endpointId);
    if (settings.marks === "off") return;
    const update = (this.updates.get(eventId) ?? Promise.resolve())
      .then(() => this.update(job, eventId, outcome, settings))
      .catch((err: unknown) => {
        const pass = this.failures.pass(job.roomId);
        if (pass)
          this.o.log.warn(
            { eventId, outcome, err: errorMessage(err), heldBack: pass.heldBack },
            "could not mark the delivery of a room message",
          );
      })
      .finally(() => {
        if (this.updates.get(eventId) === update) this.updates.delete(eventId);
      });
    this.updates.set(eventId, update);
  }

  /** Resolves once the marks under way are on (or given up), or after `withinMs` (when stopping). */
  async settled(withinMs?: number): Promise<void> {
    const all = (async () => {
      while (this.updates.size > 0) await Promise.all(this.updates.values());
    })();
    await (withinMs === undefined ? all : Promise.race([all, sleep(withinMs, undefined, { ref: false })]));
  }

  private settingsOf(endpointId: string): FeedbackConfig {
    const endpoint = this.o.routes.outbound(endpointId);
    const route = endpoint && this.o.routes.routes.find((r) => r.id === endpoint.routeId);
    return route?.feedback ?? this.o.defaults;
  }

  private async update(
    job: ToRemoteJob,
    eventId: string,
    outcome: DeliveryOutcome,
    settings: FeedbackConfig,
  ): Promise<void> {
    const { redis, prefix } = this.o;
    const key = redisKeys.deliveryMarks(prefix, eventId);
    if (outcome === "waiting" && (await redis.hexists(key, DONE_FIELD))) return;
    const replies = await redis
      .multi()
      .hset(key, `endpoint:${job.endpointId}`, outcome)
      .expire(key, SEEN_EVENT_TTL_SEC)
      .hgetall(key)
      .exec();
    const [err, state] = replies?.[2] ?? [new Error("the transaction was discarded")];
    if (err) throw err;
    const fields = state as Record<string, string>;
    const outcomes = (job.endpoints ?? [job.endpointId]).map((id) => fields[`endpoint:${id}`]);
    const waitingMark = fields[WAITING_MARK_FIELD];
    if (outcomes.every((o) => o === "accepted")) {
      await this.react(job.roomId, eventId, settings.accepted);
      if (waitingMark) await this.takeBack(job.roomId, waitingMark);
      // Done. A repeat after this finds too little to mark again, or marks again by the same
      // transaction id: harmless either way. (Kept after a failure, for a retry from the failed list.)
      await redis.multi().del(key).hset(key, DONE_FIELD, "1").expire(key, DONE_TTL_SEC).exec();
    } else if (outcomes.includes("waiting")) {
      if (waitingMark) return;
      const mark = await this.react(job.roomId, eventId, settings.waiting);
      if (mark) await redis.hset(key, WAITING_MARK_FIELD, mark);
    } else if (waitingMark && outcomes.every((o) => o !== undefined)) {
      // Every endpoint done, some failed for good: no longer waiting; its thread says why.
      await this.takeBack(job.roomId, waitingMark);
    }
  }

  /** The bot's reaction `key` on the event; its event id (undefined: one was there already). */
  private async react(roomId: string, eventId: string, key: string): Promise<string | undefined> {
    return unlessOnAlready(
      this.o.matrix.sendAs(
        this.o.bot,
        roomId,
        "m.reaction",
        reactionTo(eventId, key),
        jobIdFor("mark", eventId, key),
      ),
    );
  }

  private async takeBack(roomId: string, markEventId: string): Promise<void> {
    await this.o.matrix.redactAsBot(roomId, markEventId, jobIdFor("unmark", markEventId));
  }
}
