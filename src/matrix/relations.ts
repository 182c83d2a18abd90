/**
 * Replies, threads and edits of room events (Client-Server API §Rich replies, §Threading, §Event
 * replacements): read from an event's `m.relates_to` on the way out, written into a remote
 * message's content on the way in. Pure: the event ⇄ remote id map is src/store/message-map.ts.
 */
import type { MappedEvent } from "../store/message-map.js";

/** What a room event refers to. */
export interface EventRelations {
  /**
   * `m.in_reply_to`: the event it answers. In a thread, where the client only fell back to a
   * reply for older clients (`is_falling_back: true`), the spec has it point at the latest event
   * in the thread the client knew: the message then answers that one, as a mail in a thread does.
   */
  replyTo?: string;
  /** `rel_type: m.thread`: the root of the thread it is in. */
  thread?: string;
  /** `rel_type: m.replace`: the event it edits. */
  replaces?: string;
}

export function relationsOf(content: Record<string, unknown>): EventRelations {
  const relates = content["m.relates_to"];
  if (!isObject(relates)) return {};
  const out: EventRelations = {};
  const target = typeof relates.event_id === "string" ? relates.event_id : undefined;
  if (relates.rel_type === "m.thread" && target) out.thread = target;
  if (relates.rel_type === "m.replace" && target) out.replaces = target;
  const inReplyTo = relates["m.in_reply_to"];
  if (isObject(inReplyTo) && typeof inReplyTo.event_id === "string") out.replyTo = inReplyTo.event_id;
  return out;
}

/**
 * `m.relates_to` for a remote message that answers the event `reply` and/or belongs to the
 * conversation whose first message is the event `conversation` (either may be unknown).
 *
 * In a thread when one is known — the reply target's, else the conversation's: `rel_type: m.thread`
 * to the root, with `m.in_reply_to` the event answered (`is_falling_back: false`, §Replies within
 * threads) or, answering none, the root as the fallback for unthreaded clients (`is_falling_back:
 * true`; the spec asks for the latest event the client knows in the thread: the root is one). A
 * thread root cannot itself be in a thread (§Threading: nor be any relation's child), so an event
 * that is in a thread stands for its thread's root. Only a reply otherwise; undefined for neither.
 */
export function inboundRelation(
  reply: MappedEvent | undefined,
  conversation: MappedEvent | undefined,
): { relatesTo: Record<string, unknown>; threadRoot?: string } | undefined {
  const root = reply?.threadRoot ?? (conversation && (conversation.threadRoot ?? conversation.eventId));
  if (root !== undefined) {
    return {
      relatesTo: {
        rel_type: "m.thread",
        event_id: root,
        is_falling_back: reply === undefined,
        "m.in_reply_to": { event_id: reply?.eventId ?? root },
      },
      threadRoot: root,
    };
  }
  if (reply) return { relatesTo: { "m.in_reply_to": { event_id: reply.eventId } } };
  return undefined;
}

/**
 * `m.relates_to` of the bot's answer to the event `eventId` (whose content is `content`): a reply
 * to it (§Rich replies), in its thread when it is in one. There the answer really answers it, so
 * `is_falling_back: false` (§Replies within threads): clients show the quote even in the thread.
 */
export function answerRelation(eventId: string, content: Record<string, unknown>): Record<string, unknown> {
  const reply = { "m.in_reply_to": { event_id: eventId } };
  const { thread } = relationsOf(content);
  return thread === undefined
    ? reply
    : { rel_type: "m.thread", event_id: thread, is_falling_back: false, ...reply };
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** The content of a reaction `key` to `eventId` (Client-Server API §Reactions: an m.annotation). */
export function reactionTo(eventId: string, key: string): Record<string, unknown> {
  return { "m.relates_to": { rel_type: "m.annotation", event_id: eventId, key } };
}
