/** Matrix user ids for the bot and the ghosts, and the namespace regexes that cover them. */
import { hash } from "node:crypto";
import type { ConnectorDefinition } from "../connector.js";

/** Escapes a string for use inside a regular expression. */
export function escapeRegex(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\/-]/g, "\\$&");
}

/**
 * Encodes any string into the characters a Matrix localpart allows, reversibly, following the
 * spec's appendix "Mapping from other character sets": `_` escapes upper case (`A` → `_a`) and
 * itself (`__`); other disallowed characters become `=xx` (UTF-8 bytes in lower-case hex).
 * `/` is encoded too (`a/b` → `a=2fb`): the grammar still allows it, but only for historical ids,
 * and a `%2F` in a request path is decoded by some reverse proxies, which breaks the request.
 */
export function encodeLocalpart(s: string): string {
  let out = "";
  for (const byte of Buffer.from(s, "utf8")) {
    const c = String.fromCharCode(byte);
    if (c >= "A" && c <= "Z") out += `_${c.toLowerCase()}`;
    else if (c === "_") out += "__";
    else if (/[a-z0-9.-]/.test(c)) out += c;
    else out += `=${byte.toString(16).padStart(2, "0")}`;
  }
  return out;
}

export interface GhostNaming {
  readonly ghostPrefix: string;
  readonly domain: string;
}

/** The spec's limit on a whole user id; homeservers refuse to register a longer one. */
const MAX_USER_ID_BYTES = 255;

/**
 * `@<prefix><tag>_<account>_<encoded sender>:<domain>`. Account names have no `_`, so this parses.
 * A sender too long for that (a deep MQTT topic, say) keeps the start of its encoding and gets a
 * hash of the whole, so it stays unique.
 */
export function ghostUserId(
  naming: GhostNaming,
  ghostTag: string,
  account: string,
  senderId: string,
): string {
  const head = `@${naming.ghostPrefix}${ghostTag}_${account}_`;
  const tail = `:${naming.domain}`;
  let local = encodeLocalpart(senderId);
  const room = MAX_USER_ID_BYTES - head.length - tail.length;
  if (local.length > room) {
    const digest = hash("sha256", senderId, "hex").slice(0, 16);
    local = `${local.slice(0, Math.max(0, room - digest.length - 1))}-${digest}`;
  }
  return head + local + tail;
}

/** Anchored regex for every ghost of one connector (what registration.yaml lists). */
export function ghostNamespaceRegex(naming: GhostNaming, ghostTag: string): string {
  return `^@${escapeRegex(naming.ghostPrefix + ghostTag)}_[^:]+:${escapeRegex(naming.domain)}$`;
}

/**
 * A server name (Appendix §Server Name): an IPv4 address, a bracketed IPv6 address or a DNS name,
 * with an optional port.
 */
const SERVER_NAME = String.raw`(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,255})(?::[0-9]{1,5})?`;
/**
 * A user id (Appendix §User Identifiers): `@localpart:server_name`, at most 255 bytes. The
 * localpart as ids may still have it (§Historical User IDs): any printable ASCII but `:`, at
 * least one character.
 */
const USER_ID = new RegExp(String.raw`^@[\x21-\x39\x3B-\x7E]+:${SERVER_NAME}$`);

export function isUserId(s: unknown): s is string {
  return typeof s === "string" && s.length <= MAX_USER_ID_BYTES && USER_ID.test(s); // ASCII: length = bytes
}

/** The user whose device reads end-to-end encrypted rooms (crypto/end-to-end.ts): `@<prefix>reader:<domain>`. */
export function readerUserId(naming: GhostNaming): string {
  return `@${naming.ghostPrefix}reader:${naming.domain}`;
}

export function botUserId(botLocalpart: string, domain: string): string {
  return `@${botLocalpart}:${domain}`;
}

/** Ghost tags of the registered connectors; the regexes of all of them plus the bot make our namespace. */
export function namespaceRegexes(
  naming: GhostNaming & { readonly botLocalpart: string },
  connectors: readonly ConnectorDefinition[],
): string[] {
  return [
    `^${escapeRegex(botUserId(naming.botLocalpart, naming.domain))}$`,
    ...connectors.map((c) => ghostNamespaceRegex(naming, c.ghostTag)),
  ];
}
