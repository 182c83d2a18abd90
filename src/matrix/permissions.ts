/**
 * Who may relay room messages out of a route's room (config `permissions`, or a route's own): the
 * users listed (with `*` globs), everyone at or above a power level in the room, and
 * appservice.admins. A message refused for some route gets one visible answer from the bot: a ⛔
 * reaction, and, the first time that sender is refused in that room within an hour, a notice in
 * reply (in its thread, if it is in one) saying why and which config key allows it. Both are sent
 * with transaction ids derived from the event id, so a transaction delivered again answers nothing
 * new.
 */
import type { Redis } from "ioredis";
import type { ResolvedRoute } from "../config/load.js";
import type { PermissionsConfig } from "../config/schema.js";
import { PermanentError, errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import { jobIdFor } from "../queue/ordered-queue.js";
import { redisKeys } from "../store/keys.js";
import type { MatrixEvent } from "./appservice-server.js";
import { unlessOnAlready } from "./matrix-error.js";
import { answerRelation, reactionTo } from "./relations.js";
import type { PowerLevels } from "./power-levels.js";

/** The reaction on a refused message (Client-Server API §Reactions: an m.annotation). */
export const REFUSED_KEY = "⛔";
/** A sender refused again in the same room within this long gets the reaction only. */
export const REFUSAL_NOTICE_WINDOW_SEC = 3600;

/**
 * Whether a user id matches one of `patterns`: user ids in which `*` matches any run of characters
 * (`@*:example.org`: every user of that server; `@*:*`: everyone).
 */
export function userMatcher(patterns: readonly string[]): (userId: string) => boolean {
  const exact = new Set(patterns.filter((p) => !p.includes("*")));
  const globs = patterns
    .filter((p) => p.includes("*"))
    .map((p) => new RegExp(`^${p.split("*").map(escapeRegExp).join(".*")}$`, "s"));
  return (userId) => exact.has(userId) || globs.some((g) => g.test(userId));
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/** Whether `permissions` let a user relay; `level`: the user's power level in the room. */
export function allows(
  permissions: PermissionsConfig,
  matchesUsers: (userId: string) => boolean,
  userId: string,
  level: number,
): boolean {
  return matchesUsers(userId) || (permissions.powerLevel !== null && level >= permissions.powerLevel);
}

export interface RelayPermissionsOptions {
  powerLevels: PowerLevels;
  /** appservice.admins (commands.ts adminMatcher): they may always relay. */
  isAdmin(userId: string): boolean;
  redis: Redis;
  prefix: string;
  /** Sends an event as the bot; `txnId` makes a repeat send nothing new. */
  sendAsBot(roomId: string, type: string, content: Record<string, unknown>, txnId: string): Promise<unknown>;
  /** Counts a refused message, per route (metrics). */
  observe?(routeId: string): void;
  log: Logger;
}

export class RelayPermissions {
  private readonly matchers = new WeakMap<PermissionsConfig, (userId: string) => boolean>();

  constructor(private readonly o: RelayPermissionsOptions) {}

  /** Told of every state event pushed (m.room.power_levels). */
  noteState(ev: MatrixEvent): void {
    this.o.powerLevels.noteState(ev);
  }

  /**
   * Which routes the event's sender may relay to, judged by the room's power levels as known when
   * called (a change later in the same transaction applies to the messages after it). Rejects when
   * the power levels cannot be read for now (the transaction is then retried); power levels the bot
   * may not read count as level 0.
   */
  async judge(ev: MatrixEvent): Promise<(route: ResolvedRoute) => boolean> {
    if (this.o.isAdmin(ev.sender)) return () => true;
    const known = this.o.powerLevels.levelOf(ev.room_id, ev.sender);
    let level: number;
    try {
      level = typeof known === "number" ? known : await known;
    } catch (err) {
      if (!(err instanceof PermanentError)) throw err;
      this.o.log.warn(
        { roomId: ev.room_id, err: errorMessage(err) },
        "cannot read the room's power levels: its members count as level 0",
      );
      level = 0;
    }
    return (route) => allows(route.permissions, this.matcherOf(route.permissions), ev.sender, level);
  }

  /**
   * Answers a message refused for `routes`. Resolves once answered, or once the failure to answer
   * is logged; never rejects. The transaction does not wait for it.
   */
  refused(ev: MatrixEvent, routes: readonly ResolvedRoute[]): Promise<void> {
    const { log } = this.o;
    log.info(
      { eventId: ev.event_id, roomId: ev.room_id, sender: ev.sender, routes: routes.map((r) => r.id) },
      "room message not relayed: its sender may not relay to these routes (permissions)",
    );
    for (const route of routes) this.o.observe?.(route.id);
    return this.answer(ev, routes).catch((err: unknown) =>
      log.warn({ err: errorMessage(err), eventId: ev.event_id }, "refused message not answered"),
    );
  }

  private async answer(ev: MatrixEvent, routes: readonly ResolvedRoute[]): Promise<void> {
    const { redis, prefix, sendAsBot } = this.o;
    // On already (an event handled again after the homeserver forgot the transaction id): the
    // notice may still be due.
    await unlessOnAlready(
      sendAsBot(
        ev.room_id,
        "m.reaction",
        reactionTo(ev.event_id, REFUSED_KEY),
        jobIdFor("refused-reaction", ev.event_id),
      ),
    );
    const first = await redis.set(
      redisKeys.refusalNotice(prefix, ev.room_id, ev.sender),
      ev.event_id,
      "EX",
      REFUSAL_NOTICE_WINDOW_SEC,
      "NX",
    );
    // Another event's notice in the window; this event's own (a transaction delivered again) goes again.
    if (
      first === null &&
      (await redis.get(redisKeys.refusalNotice(prefix, ev.room_id, ev.sender))) !== ev.event_id
    )
      return;
    const notice = {
      msgtype: "m.notice",
      body: refusalNotice(ev.sender, routes),
      "m.mentions": { user_ids: [ev.sender] },
      // In the message's thread when it is in one, as a command's answer (§Replies within threads).
      "m.relates_to": answerRelation(ev.event_id, ev.content),
    };
    await sendAsBot(ev.room_id, "m.room.message", notice, jobIdFor("refused-notice", ev.event_id));
  }

  private matcherOf(permissions: PermissionsConfig): (userId: string) => boolean {
    let matcher = this.matchers.get(permissions);
    if (!matcher) {
      matcher = userMatcher(permissions.users);
      this.matchers.set(permissions, matcher);
    }
    return matcher;
  }
}

/** Why a message was not relayed, who may relay, and the config key that says so. */
export function refusalNotice(sender: string, routes: readonly ResolvedRoute[]): string {
  const lines = [`${REFUSED_KEY} Not relayed: ${sender} may not relay this room's messages to:`];
  for (const route of routes) {
    const { users, powerLevel, key } = route.permissions;
    const who = [
      ...(powerLevel === null ? [] : [`power level ${powerLevel} or more in this room`]),
      ...users,
      "tribridge's admins (appservice.admins)",
    ];
    lines.push(`route ${route.id}: only ${who.join(", ")} may (config key ${key})`);
  }
  const byLevel = routes.some((route) => route.permissions.powerLevel !== null);
  lines.push(
    `tribridge's admins can allow more senders under that key${byLevel ? "; the room's admins can raise your power level" : ""}.`,
  );
  return lines.join("\n");
}
