/**
 * Commands to the bot, sent as a message in any room it is in (a route's room, or a room an admin
 * invited it to): `!tribridge help | status | failed [N] | retry all | retry ID… | routes | link … |
 * unlink … | reload`. Only the users of
 * `appservice.admins` may use them; the bot answers each with a notice in the same room, once
 * (the answer's transaction id comes from the command's event id), as a reply to the command, in
 * its thread if it was given in one.
 */
import { errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import { LogLimiter } from "../log-limiter.js";
import { jobIdFor } from "../queue/ordered-queue.js";
import type { MatrixEvent } from "./appservice-server.js";
import { plainBody } from "./format.js";
import { answerRelation } from "./relations.js";

export const COMMAND_PREFIX = "!tribridge";

/**
 * Longest answer, in characters: answers repeat what they were given, and an event must fit in
 * 65,536 bytes (Client-Server API §Size limits), escapes (6 bytes a control character) included.
 */
export const MAX_ANSWER_CHARS = 8000;

/**
 * Someone who is not an admin is told so once per room in this long; their other commands are
 * logged, not answered: anyone in a room with the bot could otherwise have it post a notice for
 * each message they send.
 */
export const NOT_ADMIN_ANSWER_INTERVAL_MS = 3600_000;

/**
 * What the commands read and do, provided by the running bridge. `roomId` is where the command was
 * given: in a route's room, failed relays are that room's only (its members see the answer).
 */
export interface BridgeControl {
  /** A few lines: connector states, queue backlogs, failed lists. */
  status(): Promise<string>;
  /** The oldest `limit` failed relays, with their reasons. */
  failed(limit: number, roomId: string): Promise<string>;
  /** Puts failed relays (all, or those with these ids) back on their queues; how many. */
  retry(ids: ReadonlySet<string> | undefined, roomId: string): Promise<number>;
  /** Reads the config file again (config/reload.ts); what changed, what needs a restart. */
  reload(): Promise<string>;
  /** Links the room to an endpoint (routing/room-links.ts); `args`: the words after `link`. */
  link(roomId: string, sender: string, args: string): Promise<string>;
  /** Removes links of the room; `args`: the words after `unlink`. */
  unlink(roomId: string, args: string): Promise<string>;
  /** What is bridged to the room: the file's routes and the room's links. */
  routes(roomId: string): Promise<string>;
}

const HELP = `tribridge commands:
${COMMAND_PREFIX} status: connectors, queues, failed relays
${COMMAND_PREFIX} failed [N]: the N oldest failed relays (default 10), with the reason
${COMMAND_PREFIX} retry all: put every failed relay back on its queue
${COMMAND_PREFIX} retry ID…: put these failed relays back
${COMMAND_PREFIX} routes: what this room is bridged to (from the config file, and linked here)
${COMMAND_PREFIX} link <account> <topic or address> [in|out|inout] [key=value…]: bridge this room to it
${COMMAND_PREFIX} unlink <endpoint id> | unlink <account> <topic or address> [in|out|inout]
${COMMAND_PREFIX} reload: read the config file again (routes and admins apply at once)
In a route's room, failed and retry are about that room's relays; elsewhere, about all.`;

/** The status command's answer; `more`: lines of other parts (e.g. encrypted rooms), as they are. */
export function formatStatus(
  routes: number,
  connectors: Record<string, { state: string; reason?: string }>,
  queues: Record<
    string,
    { waiting: number; active: number; failedList: number; holding: boolean; unconsumedShards?: number }
  >,
  more: readonly string[] = [],
): string {
  const lines = [`tribridge is running with ${routes} route(s).`];
  for (const [ref, { state, reason }] of Object.entries(connectors))
    lines.push(`${ref}: ${state}${reason ? ` (${reason})` : ""}`);
  for (const [name, q] of Object.entries(queues)) {
    const holding = q.holding ? "; backlog full, new messages held at their source" : "";
    const unconsumed = q.unconsumedShards
      ? `; ${q.unconsumedShards} shard(s) without a consumer for longer than a lease, their messages wait`
      : "";
    lines.push(
      `${name}: ${q.waiting} batch(es) waiting, ${q.active} being delivered, ${q.failedList} failed${holding}${unconsumed}`,
    );
  }
  lines.push(...more);
  return lines.join("\n");
}

export function isCommand(ev: MatrixEvent): boolean {
  const body = commandText(ev);
  return body !== undefined && (body === COMMAND_PREFIX || body.startsWith(`${COMMAND_PREFIX} `));
}

/** A text message's own words (a reply to the bot's answer carries the answer's quote first). */
function commandText(ev: MatrixEvent): string | undefined {
  if (ev.type !== "m.room.message" || ev.content.msgtype !== "m.text") return undefined;
  return plainBody(ev.content)?.trim();
}

/** Whether `userId` is an admin: listed, or on a server listed as `@*:<server>`. */
export function adminMatcher(admins: readonly string[]): (userId: string) => boolean {
  const users = new Set(admins.filter((a) => !a.startsWith("@*:")));
  const servers = new Set(admins.filter((a) => a.startsWith("@*:")).map((a) => a.slice(3)));
  return (userId) => users.has(userId) || servers.has(userId.slice(userId.indexOf(":") + 1));
}

export class Commands {
  private readonly notAdminAnswers = new LogLimiter(NOT_ADMIN_ANSWER_INTERVAL_MS, 10_000);

  constructor(
    private readonly o: {
      isAdmin(userId: string): boolean;
      control: BridgeControl;
      /**
       * Posts `text` as a notice from the bot, with `m.relates_to` `relatesTo` and mentioning
       * `mention` (the command's sender); `txnId` makes a repeat post nothing new.
       */
      reply(
        answer: { roomId: string; text: string; relatesTo: Record<string, unknown>; mention: string },
        txnId: string,
      ): Promise<void>;
      log: Logger;
    },
  ) {}

  /** Runs a command event (see isCommand) and answers it. */
  async handle(ev: MatrixEvent): Promise<void> {
    if (!this.o.isAdmin(ev.sender)) {
      const pass = this.notAdminAnswers.pass(`${ev.room_id} ${ev.sender}`);
      if (!pass) {
        this.o.log.info(
          { sender: ev.sender, roomId: ev.room_id, eventId: ev.event_id },
          "command from someone who is not an admin; told so within the hour, not answered again",
        );
        return;
      }
    }
    const answer = clip(await this.run(ev));
    await this.o.reply(
      {
        roomId: ev.room_id,
        text: answer,
        relatesTo: answerRelation(ev.event_id, ev.content),
        mention: ev.sender,
      },
      jobIdFor("command-reply", ev.event_id),
    );
  }

  private async run(ev: MatrixEvent): Promise<string> {
    if (!this.o.isAdmin(ev.sender))
      return `Only tribridge's admins (appservice.admins in its config) can use its commands.`;
    const text = commandText(ev)!.slice(COMMAND_PREFIX.length).trim();
    const [verb = "help", ...args] = text.split(/\s+/);
    const rest = text.slice(verb.length).trim(); // link and unlink read quotes: `subject="a b"`
    this.o.log.info({ sender: ev.sender, roomId: ev.room_id, command: verb.slice(0, 100) }, "command");
    try {
      switch (verb) {
        case "":
        case "help":
          return HELP;
        case "status":
          return await this.o.control.status();
        case "failed": {
          const limit = args[0] === undefined ? 10 : Number(args[0]);
          if (!Number.isInteger(limit) || limit < 1) return `Usage: ${COMMAND_PREFIX} failed [N], N ≥ 1`;
          return await this.o.control.failed(limit, ev.room_id);
        }
        case "retry": {
          if (args.length === 0) return `Usage: ${COMMAND_PREFIX} retry all | ${COMMAND_PREFIX} retry ID…`;
          const ids = args.length === 1 && args[0] === "all" ? undefined : new Set(args);
          const n = await this.o.control.retry(ids, ev.room_id);
          return `${n} failed relay(s) put back on their queues.`;
        }
        case "reload":
          return await this.o.control.reload();
        case "routes":
          return await this.o.control.routes(ev.room_id);
        case "link":
          return await this.o.control.link(ev.room_id, ev.sender, rest);
        case "unlink":
          return await this.o.control.unlink(ev.room_id, rest);
        default:
          return `Unknown command "${verb}".\n\n${HELP}`;
      }
    } catch (err) {
      return `${verb} failed: ${errorMessage(err)}`;
    }
  }
}

/** `text`, cut to MAX_ANSWER_CHARS (at a code point) with a note saying so. */
export function clip(text: string): string {
  if (text.length <= MAX_ANSWER_CHARS) return text;
  const note = "… (cut: too long to answer in full)";
  const kept = [...text.slice(0, MAX_ANSWER_CHARS - note.length)];
  if (kept.length > 0 && /[\uD800-\uDBFF]/.test(kept.at(-1)!)) kept.pop(); // half a pair
  return kept.join("") + note;
}
