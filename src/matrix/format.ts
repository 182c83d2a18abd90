/** Message bodies ⇄ Matrix `m.room.message` content. */
import type { MessageBody } from "../connector.js";

const HTML_ESCAPES: Record<string, string> = {
  "&": "&amp;",
  "<": "&lt;",
  ">": "&gt;",
  '"': "&quot;",
  "'": "&#39;",
};

export function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => HTML_ESCAPES[c]!);
}

/**
 * Content for a remote message. `m.mentions: {}` (Client-Server API §User and room mentions) says
 * the message mentions nobody, so remote text such as "@room" or a user id pings no one.
 * Remote HTML is never passed through as-is: connectors' HTML is reduced to escaped text here.
 */
export function toMatrixContent(body: MessageBody): Record<string, unknown> {
  return {
    msgtype: body.notice ? "m.notice" : "m.text",
    body: body.text,
    "m.mentions": {},
  };
}

/**
 * An edit that replaces `original` with `content` (Client-Server API §Event replacements): the
 * new content, and a `* `-prefixed fallback for clients that do not apply edits.
 */
export function replacementContent(
  original: string,
  content: Record<string, unknown>,
): Record<string, unknown> {
  return {
    ...content,
    body: `* ${String(content.body ?? "")}`,
    "m.new_content": content,
    "m.relates_to": { rel_type: "m.replace", event_id: original },
  };
}

export function fileContent(
  name: string,
  mimeType: string,
  size: number,
  mxc: string,
): Record<string, unknown> {
  const image = mimeType.startsWith("image/");
  return {
    msgtype: image ? "m.image" : "m.file",
    body: name,
    filename: name,
    url: mxc,
    info: { mimetype: mimeType, size },
    "m.mentions": {},
  };
}

/** Plain text of a Matrix message for a far side without HTML, or undefined if it is not a message we relay. */
export function fromMatrixContent(
  content: Record<string, unknown>,
  displayName: string,
): MessageBody | undefined {
  const relates = content["m.relates_to"] as { rel_type?: string } | undefined;
  if (relates?.rel_type === "m.replace") return undefined; // edits: the far side has no way to change a sent message
  const body = plainBody(content);
  if (body === undefined) return undefined;
  // Nothing said: an empty publish would also delete a retained value, or read as a query.
  const textual =
    content.msgtype === "m.text" || content.msgtype === "m.notice" || content.msgtype === "m.emote";
  if (textual && body.trim() === "") return undefined;
  switch (content.msgtype) {
    case "m.text":
      return { text: body };
    case "m.notice":
      return { text: body, notice: true };
    case "m.emote":
      return { text: `* ${displayName} ${body}` };
    case "m.image":
    case "m.file":
    case "m.audio":
    case "m.video":
      return { text: `${body} (${String(content.url ?? "")})` };
    case "m.location":
      return { text: `${body} (${String(content.geo_uri ?? "")})` };
    default:
      return undefined;
  }
}

/**
 * The message's own text: `body` without the quote of a reply fallback, or undefined if there is
 * none. Matrix 1.13 dropped reply fallbacks, so a reply may well start with a quote of its own.
 */
export function plainBody(content: Record<string, unknown>): string | undefined {
  if (typeof content.body !== "string") return undefined;
  const relates = content["m.relates_to"] as
    { "m.in_reply_to"?: unknown; is_falling_back?: boolean } | undefined;
  // In a thread, a client's m.in_reply_to with is_falling_back is for older clients: no quote.
  const reply = relates?.["m.in_reply_to"] !== undefined && relates.is_falling_back !== true;
  return reply ? stripReplyFallback(content.body) : content.body;
}

/**
 * Removes the quote of a reply fallback (Client-Server API §Rich replies): `> <@user:server> …`
 * (or `> * <@user…` for an emote) lines and the blank line after them. Text that does not start
 * that way is the sender's own, quotes included.
 */
export function stripReplyFallback(body: string): string {
  if (!/^> \*? ?<[@!]/.test(body) || !body.includes("\n")) return body;
  const lines = body.split("\n");
  let i = 0;
  while (i < lines.length && lines[i]!.startsWith("> ")) i++;
  if (lines[i] === "") i++;
  return lines.slice(i).join("\n");
}
