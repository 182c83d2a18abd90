import { createPrivateKey } from "node:crypto";
import { isIPv4 } from "node:net";
import { z } from "zod";
import type { Direction } from "../../src/connector.js";

/** Defaults of the email connector, with units. */
export const EMAIL_DEFAULTS = {
  mailbox: "INBOX",
  /** imapflow waits 15 s after a command before it IDLEs, and mail arriving then waits as long. */
  idleDelayMs: 50,
  smtpConnections: 2, // pooled SMTP connections
  connectTimeoutMs: 15_000,
  /** A mail larger than this (its whole source) is not fetched: it stays in the mailbox, in the failed list. */
  maxMessageBytes: 25 * 1024 * 1024,
  maxAttachmentBytes: 10 * 1024 * 1024,
  maxAttachments: 10,
  subject: "Messages from Matrix",
} as const;

export const dmarcPolicies = ["reject", "quarantine", "label"] as const;
export type DmarcPolicy = (typeof dmarcPolicies)[number];

/** Implicit TLS from the first byte, STARTTLS (required), or none (loopback and test servers only). */
export const securities = ["tls", "starttls", "none"] as const;
export type Security = (typeof securities)[number];

/** An address the way a config writes it: `name@domain`, no display name, no angle brackets. */
const address = z
  .string()
  .regex(/^[^\s@<>,;"]+@[^\s@<>,;"]+$/, "must be a mail address such as alice@example.org")
  .transform((a) => a.toLowerCase());

const serverFields = (defaultPorts: Record<Security, number>, what: string) =>
  z
    .strictObject({
      host: z.string().min(1).describe(`${what} server host name`),
      port: z
        .number()
        .int()
        .min(1)
        .max(65535)
        .optional()
        .describe(`Default by security: ${securities.map((s) => `${s} ${defaultPorts[s]}`).join(", ")}`),
      security: z
        .enum(securities)
        .default("tls")
        .describe(
          "tls: implicit TLS; starttls: plain, then upgraded (required); none: no encryption (a server on this machine only)",
        ),
      user: z.string().min(1).describe("Login name"),
      pass: z.string().min(1).describe("Password; or passFile: a file holding it"),
      ca: z.string().optional().describe("PEM CA bundle to trust (a private CA); or caFile"),
      rejectUnauthorized: z.boolean().default(true).describe("false accepts any certificate: tests only"),
    })
    .transform((s) => ({ ...s, port: s.port ?? defaultPorts[s.security] }));

export const emailAccountSchema = z
  .strictObject({
    address: address.describe("The mailbox's own address: From of every mail sent, and where answers come"),
    plusAddressing: z
      .boolean()
      .default(false)
      .describe(
        "The server delivers <local>+<token>@<domain> to this mailbox (Postfix, Dovecot, Gmail, Fastmail do): " +
          "an endpoint's token then gives its mails a Reply-To of its own, and mail to it lands in its route",
      ),
    imap: serverFields({ tls: 993, starttls: 143, none: 143 }, "IMAP").describe("Where mail is read"),
    mailbox: z.string().min(1).default(EMAIL_DEFAULTS.mailbox).describe("The folder read for new mail"),
    smtp: serverFields({ tls: 465, starttls: 587, none: 25 }, "SMTP").describe("Where mail is sent"),
    smtpConnections: z
      .number()
      .int()
      .min(1)
      .max(20)
      .default(EMAIL_DEFAULTS.smtpConnections)
      .describe("SMTP connections kept open for sending"),
    maxMessageBytes: z
      .number()
      .int()
      .min(1024)
      .default(EMAIL_DEFAULTS.maxMessageBytes)
      .describe(
        "A larger incoming mail is not fetched: it stays in the mailbox, and is listed in the failed list",
      ),
    dkim: z
      .strictObject({
        domainName: z
          .string()
          .regex(/^[a-z0-9.-]+$/i, "a domain name such as example.org")
          .describe("d= of the signature: your address's domain (or one it belongs to), for DMARC to pass"),
        keySelector: z
          .string()
          .regex(/^[a-z0-9._-]+$/i, "letters, digits and ._- only")
          .describe("s=: the public key is published in DNS as <keySelector>._domainkey.<domainName>"),
        privateKey: z
          .string()
          .min(1)
          .describe("The PEM private key (RSA or Ed25519); or privateKeyFile: a file holding it"),
      })
      .optional()
      .describe(
        "Sign every mail sent with DKIM (RFC 6376). Unset: mail is not signed by the bridge (your SMTP server may sign it)",
      ),
    processed: z
      .union([
        z.strictObject({
          flag: z
            .string()
            .regex(/^\\?[A-Za-z0-9$_-]+$/, 'an IMAP flag such as "\\Seen" or a keyword such as "Bridged"')
            .describe('Flag set on each mail read: "\\Seen" (read), "\\Flagged", or a keyword of your own'),
        }),
        z.strictObject({
          moveTo: z.string().min(1).describe("Folder each mail read is moved to (made when missing)"),
        }),
      ])
      .optional()
      .describe(
        "What is done to each mail once the bridge is done with it (relayed, or kept out and logged). " +
          "Unset: nothing, the mail stays as it is",
      ),
    authservId: z
      .string()
      .min(1)
      .transform((id) => id.toLowerCase())
      .optional()
      .describe(
        "The authserv-id your receiving mail server writes in Authentication-Results (RFC 8601; usually its " +
          "host name): only its topmost such field is believed. Unset: none is, and DMARC is not checked",
      ),
    dmarcPolicy: z
      .enum(dmarcPolicies)
      .default("quarantine")
      .describe(
        "With authservId, a mail whose DMARC fails: reject: not posted (logged); quarantine: into the failed " +
          "list with the reason, not posted; label: posted, with a warning line first",
      ),
  })
  .superRefine((acc, ctx) => {
    if (acc.processed && "moveTo" in acc.processed && acc.processed.moveTo === acc.mailbox)
      ctx.addIssue({
        code: "custom",
        path: ["processed", "moveTo"],
        message: `is the folder read (mailbox: ${acc.mailbox}): name another folder`,
      });
    if (acc.dkim) {
      try {
        createPrivateKey(acc.dkim.privateKey);
      } catch (err) {
        ctx.addIssue({
          code: "custom",
          path: ["dkim", "privateKey"],
          message: `is not a PEM private key (${(err as Error).message})`,
        });
      }
    }
    for (const side of ["imap", "smtp"] as const) {
      if (acc[side].security === "none" && !isLoopback(acc[side].host))
        ctx.addIssue({
          code: "custom",
          path: [side, "security"],
          message: `"none" sends the password in the clear: only for a server on this machine (127.0.0.1, localhost)`,
        });
    }
  });

export type EmailAccount = z.output<typeof emailAccountSchema>;
export type ServerConfig = EmailAccount["imap"];

export function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || (isIPv4(host) && host.startsWith("127."));
}

export const threadings = ["route", "thread"] as const;

export const emailEndpointSchema = z.strictObject({
  to: z.array(address).default([]).describe("out: who gets the room's messages"),
  cc: z.array(address).default([]).describe("out: in copy"),
  subject: z
    .string()
    .min(1)
    .max(200)
    .default(EMAIL_DEFAULTS.subject)
    .describe("out: subject of the first mail of a thread; the others answer it (Re: …)"),
  threading: z
    .enum(threadings)
    .default("route")
    .describe(
      "route: the room is one mail thread; thread: each Matrix thread is a mail thread of its own " +
        "(and each message outside one starts a new one)",
    ),
  token: z
    .string()
    .regex(/^[a-z0-9][a-z0-9._-]{0,63}$/, "lower-case letters, digits and ._- only (at most 64)")
    .optional()
    .describe(
      "With plusAddressing: this endpoint's mails have Reply-To <local>+<token>@<domain>, and mail to that " +
        "address lands here (in: when it answers no mail the bridge knows)",
    ),
  default: z
    .boolean()
    .default(false)
    .describe("in: mail that answers nothing known and has no known token lands here"),
  allowLists: z
    .boolean()
    .default(false)
    .describe(
      "in: mailing-list and bulk mail (List-Id, List-Unsubscribe, Precedence: list, bulk or junk) is posted " +
        "here too; false: it is not posted (logged), it stays in the mailbox",
    ),
  senders: z
    .array(
      z
        .string()
        .regex(
          /^([^\s@<>,;"]+@|@)[^\s@<>,;"]+$/,
          "must be an address (alice@example.org) or a domain (@example.org)",
        )
        .transform((a) => a.toLowerCase()),
    )
    .min(1)
    .optional()
    .describe(
      "in: only mail From these addresses or @domains is posted here; other mail goes to the failed list " +
        "(quarantined, with the reason). Unset: anyone's",
    ),
});

export type EmailEndpoint = z.output<typeof emailEndpointSchema>;

export function checkEmailEndpoint(
  ep: EmailEndpoint,
  direction: Direction,
  account: EmailAccount,
): [string, string][] {
  const problems: [string, string][] = [];
  if (direction !== "in" && ep.to.length === 0)
    problems.push(["to", "needs at least one address to send to"]);
  if (direction === "out" && ep.default) problems.push(["default", 'only for direction "in" or "inout"']);
  if (direction === "out" && ep.allowLists)
    problems.push(["allowLists", 'only for direction "in" or "inout"']);
  if (direction === "out" && ep.senders) problems.push(["senders", 'only for direction "in" or "inout"']);
  if (ep.token !== undefined && !account.plusAddressing)
    problems.push(["token", `needs plusAddressing: true on the account (${account.address})`]);
  return problems;
}
