/** The email connector's pure parts: config, Message-IDs, threading headers, SMTP errors, incoming mail. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import nodemailer, { type SendMailOptions } from "nodemailer";
import { connectors } from "../../bridges/index.js";
import { parseMail, stripQuotes } from "../../bridges/email/incoming.js";
import { loginRefusedBy } from "../../bridges/email/mailbox-reader.js";
import { messageIdFor, messageIdsIn, plusAddress, tokenOf } from "../../bridges/email/message-ids.js";
import { emailAccountSchema, emailEndpointSchema } from "../../bridges/email/schema.js";
import { classifySmtpError } from "../../bridges/email/smtp.js";
import { referencesAfter, replySubject } from "../../bridges/email/threads.js";
import { ConfigErrors, loadConfig } from "../../src/config/load.js";
import { PermanentError, retryCauseOf } from "../../src/errors.js";

const server = { host: "mail.example.org", user: "bridge", pass: "secret" };
const account = (fields: Record<string, unknown> = {}) => ({
  address: "Bridge@Example.org",
  imap: server,
  smtp: server,
  ...fields,
});

/** The messages loadConfig gives for `doc` (written as YAML-compatible JSON), with secrets in `files`. */
function configErrors(doc: unknown, files: Record<string, string> = {}): string[] {
  const dir = mkdtempSync(join(tmpdir(), "tribridge-email-config-"));
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text);
  writeFileSync(join(dir, "config.yaml"), JSON.stringify(doc));
  try {
    loadConfig(join(dir, "config.yaml"), connectors, {});
    return [];
  } catch (err) {
    if (!(err instanceof ConfigErrors)) throw err;
    return err.errors.map((e) => e.message);
  }
}

const config = (bridges: unknown, endpoints: unknown[]) => ({
  homeserver: { url: "http://localhost:8008", domain: "example.org" },
  bridges,
  routes: [{ id: "desk", room: "#desk:example.org", endpoints }],
});

test("account defaults: implicit TLS on 993 and 465, INBOX, the address in lower case", () => {
  const a = emailAccountSchema.parse(account());
  assert.equal(a.address, "bridge@example.org");
  assert.equal(a.imap.port, 993);
  assert.equal(a.smtp.port, 465);
  assert.equal(a.imap.security, "tls");
  assert.equal(a.mailbox, "INBOX");
  const starttls = emailAccountSchema.parse(
    account({ smtp: { ...server, security: "starttls" }, imap: { ...server, security: "starttls" } }),
  );
  assert.equal(starttls.smtp.port, 587);
  assert.equal(starttls.imap.port, 143);
});

test("config errors name the path: no encryption to another machine, a token without plus-addressing, out without recipients", () => {
  assert.deepEqual(
    configErrors(
      config({ email: { desk: account({ smtp: { ...server, security: "none" } }) } }, [
        { account: "email.desk", direction: "in", default: true },
      ]),
    ),
    [
      'bridges.email.desk.smtp.security: "none" sends the password in the clear: only for a server on this machine (127.0.0.1, localhost)',
    ],
  );
  assert.deepEqual(
    configErrors(
      config({ email: { desk: account() } }, [{ account: "email.desk", direction: "inout", token: "desk" }]),
    ),
    [
      "routes[0].endpoints[0].to: needs at least one address to send to",
      "routes[0].endpoints[0].token: needs plusAddressing: true on the account (bridge@example.org)",
    ],
  );
});

test("passFile: the password is read from a file", () => {
  const dir = mkdtempSync(join(tmpdir(), "tribridge-email-secret-"));
  writeFileSync(join(dir, "imap-pass"), "from-a-file\n");
  writeFileSync(
    join(dir, "config.yaml"),
    JSON.stringify(
      config(
        {
          email: {
            desk: account({ imap: { host: "mail.example.org", user: "bridge", passFile: "imap-pass" } }),
          },
        },
        [{ account: "email.desk", direction: "in", default: true }],
      ),
    ),
  );
  const loaded = loadConfig(join(dir, "config.yaml"), connectors, {});
  const desk = loaded.accounts.find((a) => a.connector === "email")!.config as { imap: { pass: string } };
  assert.equal(desk.imap.pass, "from-a-file");
});

test("endpoint defaults: threading route, no token, not the default", () => {
  assert.deepEqual(emailEndpointSchema.parse({ to: ["Alice@Example.org"] }), {
    to: ["alice@example.org"],
    cc: [],
    subject: "Messages from Matrix",
    threading: "route",
    default: false,
    allowLists: false,
  });
  assert.equal(emailEndpointSchema.safeParse({ to: ["Alice <alice@example.org>"] }).success, false);
  assert.equal(emailEndpointSchema.safeParse({ token: "Has Spaces" }).success, false);
});

test("a Message-ID is derived from the outbound message's id alone: the same on a retry, another for another", () => {
  const id = messageIdFor("event-1/route.abc", "example.org");
  assert.equal(messageIdFor("event-1/route.abc", "example.org"), id);
  assert.notEqual(messageIdFor("event-2/route.abc", "example.org"), id);
  assert.match(id, /^<tb\.[A-Za-z0-9_-]{32}@example\.org>$/);
});

test("Message-IDs in headers, plus-addresses and their tokens", () => {
  assert.deepEqual(messageIdsIn("<a@x> <b@y>\r\n <a@x>"), ["<a@x>", "<b@y>"]);
  assert.deepEqual(messageIdsIn(["<a@x>", "<c@z>"]), ["<a@x>", "<c@z>"]);
  assert.deepEqual(messageIdsIn(undefined), []);
  assert.equal(plusAddress("bridge@example.org", "desk"), "bridge+desk@example.org");
  assert.equal(tokenOf("Bridge+Desk@example.org", "bridge@example.org"), "desk");
  assert.equal(tokenOf("bridge@example.org", "bridge@example.org"), undefined);
  assert.equal(tokenOf("bridge+desk@elsewhere.org", "bridge@example.org"), undefined);
  assert.equal(tokenOf("bridgette+desk@example.org", "bridge@example.org"), undefined);
});

test("References: the parent's, then the parent; at most 10, the thread's first kept", () => {
  assert.deepEqual(referencesAfter([], "<p>"), ["<p>"]);
  assert.deepEqual(referencesAfter(["<r>", "<p>"], "<p>"), ["<r>", "<p>"]);
  const long = Array.from({ length: 15 }, (_, i) => `<m${i}>`);
  const refs = referencesAfter(long, "<p>");
  assert.equal(refs.length, 10);
  assert.equal(refs[0], "<m0>");
  assert.equal(refs.at(-1), "<p>");
  assert.equal(replySubject("Support"), "Re: Support");
  assert.equal(replySubject("RE: Support"), "RE: Support");
});

test("SMTP errors: 5xx refuses the mail for good; 4xx is retried; the server away, closing or refusing the login waits", () => {
  const smtp = (fields: Record<string, unknown>) => Object.assign(new Error("smtp"), fields);
  const refused = classifySmtpError(
    smtp({ code: "EENVELOPE", responseCode: 550, response: "550 5.1.1 unknown" }),
  );
  assert.ok(refused instanceof PermanentError);
  assert.match(refused.message, /550 5\.1\.1 unknown/);
  const deferred = classifySmtpError(smtp({ responseCode: 451, response: "451 try later" }));
  assert.equal(retryCauseOf(deferred), "message");
  for (const away of [
    smtp({ code: "EAUTH", responseCode: 535 }),
    smtp({ responseCode: 421, response: "421 shutting down" }),
    smtp({ code: "ECONNECTION", message: "connect ECONNREFUSED" }),
    smtp({ code: "ETIMEDOUT" }),
  ])
    assert.equal(retryCauseOf(classifySmtpError(away)), "unavailable");
});

/** A mail as nodemailer writes it: the bytes a mailbox holds. */
async function raw(mail: SendMailOptions): Promise<Buffer> {
  const transport = nodemailer.createTransport({ streamTransport: true, buffer: true });
  const info = await transport.sendMail({ from: "Bob <bob@example.org>", to: "bridge@example.org", ...mail });
  return info.message as Buffer;
}

test("an answer: quoted history and signature stripped, its HTML (which has them) left out; its thread read", async () => {
  const mail = await parseMail(
    await raw({
      messageId: "<answer@example.org>",
      inReplyTo: "<parent@example.org>",
      references: ["<root@example.org>", "<parent@example.org>"],
      text: "Sounds good.\n\n-- \nBob, Facilities\n\nOn Tue, 1 Dec 2026 at 10:00, Alice <bridge@example.org> wrote:\n> Shall we meet?\n",
      html: "<p>Sounds good.</p><blockquote>Shall we meet?</blockquote>",
    }),
  );
  assert.equal(mail.messageId, "<answer@example.org>");
  assert.deepEqual(mail.body, { text: "Sounds good." });
  assert.equal(mail.inReplyTo, "<parent@example.org>");
  assert.deepEqual(mail.references, ["<root@example.org>", "<parent@example.org>"]);
  assert.deepEqual(mail.sender, { id: "bob@example.org", displayName: "Bob" });
});

test("a new mail keeps its HTML for the core to sanitize; its files come along; the same mail without Message-ID gets the same id", async () => {
  const source = await raw({
    text: "See the plan.",
    html: "<p>See <b>the plan</b>.</p>",
    attachments: [{ filename: "plan.txt", content: "step 1" }],
  });
  const mail = await parseMail(source);
  assert.deepEqual(mail.body, { text: "See the plan.", html: "<p>See <b>the plan</b>.</p>" });
  assert.deepEqual(
    mail.attachments.map((a) => [a.name, a.mimeType, Buffer.from(a.dataBase64, "base64").toString()]),
    [["plan.txt", "text/plain", "step 1"]],
  );
  assert.ok(mail.messageId.length > 2);
  const bare = Buffer.from("From: x@example.org\r\nSubject: no id\r\n\r\nhello\r\n");
  assert.equal((await parseMail(bare)).messageId, (await parseMail(bare)).messageId);
  assert.match((await parseMail(bare)).messageId, /@tribridge\.invalid>$/);
});

test("a mail that is all quote keeps its text rather than posting nothing", () => {
  assert.equal(stripQuotes("> only a quote"), "> only a quote");
});

test("mail no person wrote is marked: Auto-Submitted, reports, bounces, vacation headers; Auto-Submitted: no is a person's", async () => {
  const automatic = async (headers: Record<string, string>) =>
    (await parseMail(await raw({ text: "x", headers }))).automatic;
  assert.equal(await automatic({ "Auto-Submitted": "auto-replied" }), "Auto-Submitted: auto-replied");
  assert.equal(await automatic({ "Auto-Submitted": "no" }), undefined);
  assert.equal(await automatic({}), undefined);
  assert.match((await automatic({ "Return-Path": "<>" }))!, /bounce/);
  assert.match((await automatic({ "X-Autoreply": "yes" }))!, /auto-reply/);
  assert.match((await automatic({ Precedence: "auto_reply" }))!, /auto-reply/);
  const report = Buffer.from(
    'From: MAILER-DAEMON@example.org\r\nContent-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nundeliverable\r\n--b--\r\n',
  );
  assert.match((await parseMail(report)).automatic!, /multipart\/report/);
});

test("a login refused backs off for a minute; [UNAVAILABLE] (a server whose auth is still starting) and a lost connection do not", () => {
  assert.equal(
    loginRefusedBy({ authenticationFailed: true, serverResponseCode: "AUTHENTICATIONFAILED" }),
    true,
  );
  assert.equal(loginRefusedBy({ authenticationFailed: true }), true);
  assert.equal(loginRefusedBy({ authenticationFailed: true, serverResponseCode: "UNAVAILABLE" }), false);
  assert.equal(loginRefusedBy(new Error("connect ECONNREFUSED")), false);
});
