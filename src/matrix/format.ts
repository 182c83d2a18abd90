/** Message bodies ⇄ Matrix `m.room.message` content. */
import type { MessageBody } from "../connector.js";
import { fileMsgtype, type MediaSource } from "./attachments.js";
import { sanitizeMatrixHtml } from "./html.js";

/** `format` of a `formatted_body` in HTML (Client-Server API §m.room.message msgtypes). */
export const HTML_FORMAT = "org.matrix.custom.html";

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
 * the message mentions nobody, so remote text such as "@room" or a user id pings no one (and push
 * rules never read `formatted_body`). The connector's HTML is sanitized (see html.ts; links to Matrix users become plain text, so no
 * pill reads as a mention) and posted as `formatted_body`, unless nothing shows after sanitizing or
 * text and HTML together exceed `maxBytes` (then the text alone goes). Text that is empty while the
 * HTML shows something is derived from the HTML.
 */
export function toMatrixContent(body: MessageBody, maxBytes = Infinity): Record<string, unknown> {
  const html = body.html === undefined ? undefined : sanitizeMatrixHtml(body.html);
  const text = html !== undefined && body.text.trim() === "" ? htmlToText(html) : body.text;
  const content: Record<string, unknown> = {
    msgtype: body.notice ? "m.notice" : "m.text",
    body: text,
    "m.mentions": {},
  };
  // As JSON, the way the event carries it (quotes and backslashes escaped).
  if (html !== undefined && Buffer.byteLength(text) + Buffer.byteLength(JSON.stringify(html)) <= maxBytes) {
    content.format = HTML_FORMAT;
    content.formatted_body = html;
  }
  return content;
}

/**
 * Plain text of sanitized HTML (whose text is escaped and whose tags are the allowlist's): a line
 * per block, tags removed, the four escapes sanitize-html writes undone.
 */
export function htmlToText(clean: string): string {
  return clean
    .replace(
      /<br\s*\/?>|<\/(?:p|div|li|tr|h[1-6]|blockquote|pre|table|ul|ol|caption|details|summary)>/g,
      "\n",
    )
    .replace(/<[^>]*>/g, "")
    .replace(/&(lt|gt|quot|amp);/g, (_, e: string) => ({ lt: "<", gt: ">", quot: '"', amp: "&" })[e]!)
    .replace(/\n{3,}/g, "\n\n")
    .trim();
}

/**
 * An edit that replaces `original` with `content` (Client-Server API §Event replacements): the
 * new content, formatted body included, in `m.new_content`, and a `* `-prefixed fallback (text and,
 * when there is one, HTML) for clients that do not apply edits.
 */
export function replacementContent(
  original: string,
  content: Record<string, unknown>,
): Record<string, unknown> {
  const formatted = typeof content.formatted_body === "string" ? `* ${content.formatted_body}` : undefined;
  return {
    ...content,
    body: `* ${String(content.body ?? "")}`,
    ...(formatted === undefined ? {} : { formatted_body: formatted }),
    "m.new_content": content,
    "m.relates_to": { rel_type: "m.replace", event_id: original },
  };
}

/**
 * A file event (Client-Server API §m.file, §m.image, §m.audio, §m.video), its msgtype by MIME type;
 * the media at `url`, or, encrypted, described by `file` (§Sending encrypted attachments).
 */
export function fileContent(
  name: string,
  mimeType: string,
  size: number,
  media: MediaSource,
): Record<string, unknown> {
  return {
    msgtype: fileMsgtype(mimeType),
    body: name,
    filename: name,
    ...media,
    info: { mimetype: mimeType, size },
    "m.mentions": {},
  };
}

/**
 * A Matrix message for the far side, or undefined if it is not a message we relay. With `html`
 * (the far side's `capabilities.html`), a text, notice or emote in HTML also gives `html`: its
 * `formatted_body` sanitized to the same allowlist as inbound HTML, the reply fallback (`mx-reply`)
 * removed; otherwise `html` is never set.
 */
export function fromMatrixContent(
  content: Record<string, unknown>,
  displayName: string,
  options: { html?: boolean } = {},
): MessageBody | undefined {
  const relates = content["m.relates_to"] as { rel_type?: string } | undefined;
  if (relates?.rel_type === "m.replace") return undefined; // an edit is no new message (Connector.edit)
  const body = plainBody(content);
  if (body === undefined) return undefined;
  // Nothing said: an empty publish would also delete a retained value, or read as a query.
  const textual =
    content.msgtype === "m.text" || content.msgtype === "m.notice" || content.msgtype === "m.emote";
  if (textual && body.trim() === "") return undefined;
  const html = textual && options.html ? formattedBody(content) : undefined;
  switch (content.msgtype) {
    case "m.text":
      return html === undefined ? { text: body } : { text: body, html };
    case "m.notice":
      return html === undefined ? { text: body, notice: true } : { text: body, html, notice: true };
    case "m.emote": {
      const text = `* ${displayName} ${body}`;
      return html === undefined ? { text } : { text, html: `* ${escapeHtml(displayName)} ${html}` };
    }
    case "m.image":
    case "m.file":
    case "m.audio":
    case "m.video":
      return { text: withLink(body, content.url) };
    case "m.location":
      return { text: withLink(body, content.geo_uri) };
    default:
      return undefined;
  }
}

/**
 * `body (link)`, or the body alone when the link (a media `url`, a location's `geo_uri`) is
 * missing or not a string: an event of the wrong shape never shows "[object Object]".
 */
function withLink(body: string, link: unknown): string {
  return typeof link === "string" && link !== "" ? `${body} (${link})` : body;
}

/**
 * A room message's HTML, sanitized, or undefined when it has none or nothing shows. `mx-reply` (a
 * reply fallback, Client-Server API §Rich replies) goes with its content, as the sanitizer drops it.
 * Links to users stay links: on the far side they are just links.
 */
function formattedBody(content: Record<string, unknown>): string | undefined {
  if (content.format !== HTML_FORMAT || typeof content.formatted_body !== "string") return undefined;
  return sanitizeMatrixHtml(content.formatted_body, { unlinkUsers: false });
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
