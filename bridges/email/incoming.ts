/**
 * A mail read from the mailbox, as the core wants it: its Message-ID, its sender, the words it adds
 * (quoted history and signature stripped by email-reply-parser), its files, and the mails it
 * answers. The mail itself stays in the mailbox: search it there by its Message-ID (the posted
 * message's remote id) for what was stripped.
 */
import EmailReplyParser from "email-reply-parser";
import { simpleParser, type AddressObject, type ParsedMail } from "mailparser";
import type { Attachment, MessageBody, RemoteSender } from "../../src/connector.js";
import { messageIdOfContent, messageIdsIn } from "./message-ids.js";

/** Longer texts are posted whole: the reply parser's expressions are not meant for megabytes. */
const MAX_TEXT_TO_STRIP = 256 * 1024;

export interface IncomingMail {
  readonly messageId: string;
  readonly sender: RemoteSender;
  readonly subject: string;
  readonly body: MessageBody;
  readonly attachments: Attachment[];
  readonly timestamp?: number;
  /** The mail it answers (In-Reply-To). */
  readonly inReplyTo?: string;
  /** Its thread, oldest first (References; In-Reply-To when there are none). */
  readonly references: readonly string[];
  /** Every address it was sent to: Delivered-To, To, Cc (where a plus-address token may be). */
  readonly recipients: readonly string[];
  /** Why it was written by a machine rather than a person (an auto-reply, a bounce), if it was. */
  readonly automatic?: string;
  /** Why it is a mailing list's or bulk mail (List-Id, List-Unsubscribe, Precedence), if it is. */
  readonly list?: string;
  /** Its Authentication-Results fields' values, topmost (newest) first. */
  readonly authResults: readonly string[];
}

export async function parseMail(source: Buffer): Promise<IncomingMail> {
  const mail = await simpleParser(source, {
    skipTextToHtml: true,
    skipTextLinks: true,
    skipImageLinks: true,
  });
  const from = mail.from?.value[0];
  const address = from?.address?.toLowerCase();
  const inReplyTo = messageIdsIn(mail.inReplyTo)[0];
  const references = messageIdsIn(mail.references);
  return {
    messageId: messageIdsIn(mail.messageId)[0] ?? messageIdOfContent(source),
    sender: address
      ? { id: address, displayName: from?.name?.trim() || address }
      : { id: "unknown-sender", displayName: "(no sender)" },
    subject: mail.subject ?? "",
    ...contentOf(mail, source),
    ...(mail.date && !Number.isNaN(mail.date.getTime()) && { timestamp: mail.date.getTime() }),
    ...(inReplyTo !== undefined && { inReplyTo }),
    references: references.length > 0 ? references : inReplyTo !== undefined ? [inReplyTo] : [],
    recipients: recipientsOf(mail),
    ...automaticOrNot(mail),
    ...listOrNot(mail),
    authResults: headerValues(mail, "authentication-results", false),
  };
}

/** The values of a header field, in the mail's order (unfolded; lower case unless `asIs`). */
function headerValues(mail: ParsedMail, name: string, lowerCase = true): string[] {
  return mail.headerLines
    .filter((h) => h.key === name)
    .map((h) => {
      const value = h.line
        .slice(h.line.indexOf(":") + 1)
        .replace(/\r?\n[ \t]/g, " ")
        .trim();
      return lowerCase ? value.toLowerCase() : value;
    });
}

/**
 * A mailing list's mail (RFC 2919 List-Id, RFC 2369 List-Unsubscribe) or bulk mail
 * (`Precedence: list | bulk | junk`): posted only where the endpoint allows it (`allowLists`).
 */
function listOrNot(mail: ParsedMail): { list?: string } {
  const listId = headerValues(mail, "list-id")[0];
  if (listId !== undefined) return { list: `List-Id: ${listId.slice(0, 200)}` };
  if (headerValues(mail, "list-unsubscribe").length > 0) return { list: "List-Unsubscribe" };
  const precedence = headerValues(mail, "precedence").find((v) => ["list", "bulk", "junk"].includes(v));
  if (precedence !== undefined) return { list: `Precedence: ${precedence}` };
  return {};
}

/**
 * Mail no person wrote, which must not be posted (an auto-reply answering the bridge's mail would
 * be mailed back by the room, and so on): RFC 3834 `Auto-Submitted` other than `no`; a delivery or
 * read report (RFC 6522 `multipart/report`); a bounce (the null reverse-path, `Return-Path: <>`,
 * RFC 5321 §4.5.5); the vacation headers of Exchange and others.
 */
function automaticOrNot(mail: ParsedMail): { automatic?: string } {
  const header = (name: string) => headerValues(mail, name);
  const autoSubmitted = header("auto-submitted").find((v) => !v.startsWith("no"));
  if (autoSubmitted !== undefined) return { automatic: `Auto-Submitted: ${autoSubmitted}` };
  if (header("content-type").some((v) => v.startsWith("multipart/report")))
    return { automatic: "a delivery or read report (multipart/report)" };
  if (header("return-path").some((v) => v === "<>")) return { automatic: "a bounce (Return-Path: <>)" };
  if (header("x-autoreply").length > 0 || header("x-autorespond").length > 0)
    return { automatic: "an auto-reply (X-Autoreply)" };
  if (header("precedence").some((v) => v === "auto_reply"))
    return { automatic: "an auto-reply (Precedence)" };
  return {};
}

/** What is posted of a mail: its words and files, or, for a sealed one, the note and the mail whole. */
function contentOf(mail: ParsedMail, source: Buffer): { body: MessageBody; attachments: Attachment[] } {
  const sealed = sealedKind(mail);
  if (sealed !== undefined) {
    const name = `${
      (mail.subject ?? "")
        .replace(/[^\p{L}\p{N}._ -]+/gu, "_")
        .trim()
        .slice(0, 60) || "mail"
    }.eml`;
    return {
      body: {
        text:
          `🔒 This mail is ${sealed}: it is attached whole, as it came (${name}), ` +
          "for a mail client that can check or decrypt it. Nothing of it was decoded here.",
      },
      attachments: [{ name, mimeType: "message/rfc822", dataBase64: source.toString("base64") }],
    };
  }
  return {
    body: bodyOf(mail),
    attachments: mail.attachments
      .filter((a) => !a.related) // images the HTML shows inline
      .map((a) => ({
        name: a.filename ?? "attachment",
        mimeType: a.contentType,
        dataBase64: a.content.toString("base64"),
      })),
  };
}

/**
 * A mail encrypted or signed whole (RFC 3156 PGP/MIME, RFC 8551 S/MIME): posting its text while
 * leaving out its signature, or its undecryptable parts, would post it half-read and seemingly
 * vouched for. It goes whole, as a file, with a note.
 */
function sealedKind(mail: ParsedMail): string | undefined {
  const contentType = mail.headers.get("content-type") as
    { value?: string; params?: Record<string, string> } | undefined;
  const type = contentType?.value?.toLowerCase();
  const protocol = contentType?.params?.protocol?.toLowerCase();
  if (type === "multipart/encrypted")
    return protocol === "application/pgp-encrypted" ? "encrypted (PGP/MIME)" : "encrypted";
  if (type === "multipart/signed" && protocol === "application/pgp-signature") return "signed (PGP/MIME)";
  if (
    type === "multipart/signed" &&
    (protocol === "application/pkcs7-signature" || protocol === "application/x-pkcs7-signature")
  )
    return "signed (S/MIME)";
  if (type === "application/pkcs7-mime" || type === "application/x-pkcs7-mime")
    return "encrypted or signed (S/MIME)";
  return undefined;
}

/**
 * The words the mail adds. When the reply parser took quoted history or a signature off the text,
 * the HTML (which still has them) is left out; a mail with nothing to strip keeps its HTML, which
 * the core sanitizes.
 */
function bodyOf(mail: ParsedMail): MessageBody {
  const text = (mail.text ?? "").replace(/\r\n/g, "\n").trim();
  const html = typeof mail.html === "string" && mail.html.trim() ? mail.html : undefined;
  const visible = text.length <= MAX_TEXT_TO_STRIP ? stripQuotes(text) : text;
  if (visible !== text) return { text: visible };
  return html === undefined ? { text } : { text, html };
}

/** The text without quoted history and signature; the whole text when nothing else is left. */
export function stripQuotes(text: string): string {
  const visible = new EmailReplyParser().read(text).getVisibleText().trim();
  return visible || text;
}

function recipientsOf(mail: ParsedMail): string[] {
  const addresses = (o: AddressObject | AddressObject[] | undefined): string[] =>
    (Array.isArray(o) ? o : o ? [o] : []).flatMap((a) =>
      a.value.flatMap((v) => (v.address ? [v.address.toLowerCase()] : [])),
    );
  const delivered = mail.headers.get("delivered-to");
  const deliveredTo = (Array.isArray(delivered) ? delivered : [delivered])
    .filter((d): d is string => typeof d === "string")
    .map((d) => d.trim().toLowerCase());
  return [...new Set([...deliveredTo, ...addresses(mail.to), ...addresses(mail.cc)])];
}
