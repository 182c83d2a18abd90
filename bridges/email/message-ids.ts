/** Message-IDs: the ones the bridge gives its mails, and those read from a mail's headers. */
import { createHash } from "node:crypto";

/**
 * The Message-ID of the mail for one outbound message: derived from `OutboundMessage.id` alone, so
 * a retry, or a resend after a crash, carries the same Message-ID (and a recipient's client can
 * drop the copy). `domain` is the bridge's own, as RFC 5322 §3.6.4 advises.
 */
export function messageIdFor(outboundId: string, domain: string): string {
  const digest = createHash("sha256").update(outboundId).digest("base64url").slice(0, 32);
  return `<tb.${digest}@${domain}>`;
}

/** A Message-ID for a mail that has none: from its bytes, so the same mail always gets the same. */
export function messageIdOfContent(source: Buffer): string {
  return `<tb.noid.${createHash("sha256").update(source).digest("base64url").slice(0, 32)}@tribridge.invalid>`;
}

const MSG_ID = /<[^<>\s]{1,996}>/g;

/** The Message-IDs in a header value (In-Reply-To, References), in order, without repeats. */
export function messageIdsIn(value: string | readonly string[] | undefined): string[] {
  if (value === undefined) return [];
  const text = typeof value === "string" ? value : value.join(" ");
  return [...new Set(text.match(MSG_ID) ?? [])];
}

/** The local part and domain of `address`: bridge@example.org → ["bridge", "example.org"]. */
export function splitAddress(address: string): [local: string, domain: string] {
  const at = address.lastIndexOf("@");
  return [address.slice(0, at), address.slice(at + 1)];
}

/** `<local>+<token>@<domain>` of the bridge's address. */
export function plusAddress(address: string, token: string): string {
  const [local, domain] = splitAddress(address);
  return `${local}+${token}@${domain}`;
}

/** The token of a plus-address of the bridge's address (`bridge+greenhouse@…` → greenhouse), if it is one. */
export function tokenOf(recipient: string, address: string): string | undefined {
  const [local, domain] = splitAddress(address.toLowerCase());
  const [rLocal, rDomain] = splitAddress(recipient.toLowerCase());
  if (rDomain !== domain || !rLocal.startsWith(`${local}+`)) return undefined;
  return rLocal.slice(local.length + 1) || undefined;
}
