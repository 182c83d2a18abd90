/**
 * Rooms ⇄ mail threads through a real mailbox (Postfix + Dovecot on loopback, see
 * test/helpers/mail-server.ts): room messages reach alice's mailbox threaded; her answers, sent as
 * a mail client sends them, come back into the room and thread as her ghost, quoted history
 * stripped; mail arriving while the bridge is down is relayed once, in order; room messages
 * waiting for an SMTP server away are mailed once it is back.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import type { FetchMessageObject } from "imapflow";
import { simpleParser, type ParsedMail } from "mailparser";
import { connectors } from "../../bridges/index.js";
import { start, type RunningBridge } from "../../src/app.js";
import { BridgeProcess } from "../helpers/bridge-process.js";
import { harness, waitFor, type Harness } from "../helpers/fixture.js";
import {
  canRunMailServer,
  NO_MAIL_SERVER,
  startMailServer,
  type MailServer,
} from "../helpers/mail-server.js";
import type { RecordedEvent } from "../helpers/test-homeserver.js";

type Relates = { rel_type?: string; event_id?: string; "m.in_reply_to"?: { event_id?: string } };
const relatesTo = (e: RecordedEvent | undefined) => e?.content["m.relates_to"] as Relates | undefined;
const parse = (m: FetchMessageObject): Promise<ParsedMail> => simpleParser(m.source!);
/** What a mail client quotes under an answer. */
const quoted = (text: string) =>
  `\n\nOn Tue, 1 Dec 2026 at 10:00, Alice <bridge@localhost> wrote:\n> ${text}\n`;

describe("email: rooms ⇄ mail threads", { skip: !canRunMailServer && NO_MAIL_SERVER }, () => {
  let mail: MailServer;
  let h: Harness;
  let bridge: RunningBridge | undefined;
  let support: string;
  let threads: string;
  let restored: string;
  let seenByAlice = 0;

  before(async () => {
    mail = await startMailServer();
    h = await harness({
      bridges: {
        // Not on the machine's MQTT port (the bridge runs one by default).
        mqtt: { home: { embedded: { port: 0 } } },
        email: {
          office: mail.bridgeAccount({ plusAddressing: true }),
          // The same mailbox's folder "Restored", which a test deletes and recreates.
          archive: mail.bridgeAccount({ plusAddressing: true, mailbox: "Restored" }),
        },
      },
      routes: [
        {
          id: "support",
          room: "#support:test.local",
          endpoints: [
            {
              account: "email.office",
              direction: "inout",
              to: ["alice@localhost"],
              subject: "Support",
              token: "support",
            },
          ],
        },
        {
          id: "threads",
          room: "#threads:test.local",
          endpoints: [
            {
              account: "email.office",
              direction: "inout",
              to: ["alice@localhost"],
              subject: "Threads",
              token: "threads",
              threading: "thread",
            },
          ],
        },
        {
          id: "restored",
          room: "#restored:test.local",
          endpoints: [{ account: "email.archive", direction: "in", token: "restored" }],
        },
        {
          id: "nowhere",
          room: "#nowhere:test.local",
          endpoints: [{ account: "email.office", direction: "out", to: ["nobody@localhost"] }],
        },
      ],
    });
    support = h.hs.createRoom({ creator: h.alice, alias: "#support:test.local", preset: "public_chat" });
    threads = h.hs.createRoom({ creator: h.alice, alias: "#threads:test.local", preset: "public_chat" });
    h.hs.createRoom({ creator: h.alice, alias: "#nowhere:test.local", preset: "public_chat" });
    restored = h.hs.createRoom({ creator: h.alice, alias: "#restored:test.local", preset: "public_chat" });
    await mail.imap("bridge", (client) => client.mailboxCreate("Restored"));
    bridge = await start({ config: h.config, registration: h.registration, connectors });
    await waitFor("email.office up", () => bridge!.connectorStates()["email.office"]?.state === "up");
  });

  after(async () => {
    await bridge?.stop();
    await h?.cleanup();
    await mail?.stop();
  });

  /** The mails alice has not looked at yet, once there are `count` of them. */
  async function newMailForAlice(count: number): Promise<ParsedMail[]> {
    const all = await mail.waitForMail("alice", seenByAlice + count);
    const fresh = all.slice(seenByAlice);
    seenByAlice = all.length;
    return Promise.all(fresh.map(parse));
  }

  /** What was posted in `room` starting with `prefix`, in the room's order. */
  const posted = (room: string, prefix: string) =>
    h.hs
      .messages(room)
      .map((m) => m.content.body)
      .filter((b): b is string => typeof b === "string" && b.startsWith(prefix));

  /** Once the bridge's mailbox has `count` mails whose subject starts with `prefix`: their subjects by UID. */
  const bridgeMailbox = (prefix: string, count: number) =>
    waitFor(`${count} "${prefix}" mails in the bridge's mailbox`, async () => {
      const subjects = (await mail.mailbox("bridge"))
        .map((m) => m.envelope?.subject ?? "")
        .filter((subject) => subject.startsWith(prefix));
      return subjects.length >= count && subjects;
    });

  const fromGhost = (room: string, text: string) =>
    waitFor(`"${text}" in the room`, () =>
      h.hs.messages(room).find((m) => m.content.body === text && m.sender.startsWith("@_tb_mail_")),
    );

  test("a room message reaches alice's mailbox threaded; her answer comes back as her ghost, as a reply, quoted history stripped", async () => {
    const first = h.hs.sendMessage(support, h.alice, { msgtype: "m.text", body: "Is the printer fixed?" });
    const [m1] = await newMailForAlice(1);
    assert.equal(m1!.from?.value[0]?.address, "bridge@localhost");
    assert.equal(m1!.from?.value[0]?.name, "Alice", "the Matrix sender's name, the bridge's address");
    assert.equal(m1!.replyTo?.value[0]?.address, "bridge+support@localhost");
    assert.equal(m1!.subject, "Support");
    assert.equal(m1!.inReplyTo, undefined, "the first mail of the route starts its thread");
    assert.match(m1!.messageId!, /^<tb\.[\w-]+@localhost>$/);
    assert.equal(m1!.text?.trim(), "Is the printer fixed?");
    // The SMTP server took it (250): the bot's ✅ on the room message.
    await waitFor("the ✅", () =>
      h.hs
        .events(support)
        .some(
          (e) =>
            e.type === "m.reaction" &&
            e.sender === h.hs.appserviceUserId &&
            JSON.stringify(e.content["m.relates_to"]) ===
              JSON.stringify({ rel_type: "m.annotation", event_id: first, key: "✅" }),
        ),
    );

    const second = h.hs.sendMessage(support, h.alice, { msgtype: "m.text", body: "It jams on page 2" });
    const [m2] = await newMailForAlice(1);
    assert.equal(m2!.subject, "Re: Support");
    assert.equal(m2!.inReplyTo, m1!.messageId, "the route is one thread: each mail answers the one before");
    assert.deepEqual([m2!.references].flat(), [m1!.messageId]);

    await mail.sendAs("alice", {
      from: "Alice Liddell <alice@localhost>",
      to: "bridge+support@localhost",
      subject: "Re: Support",
      inReplyTo: m2!.messageId,
      references: [m1!.messageId!, m2!.messageId!],
      text: `Fixed now, try again.${quoted("It jams on page 2")}`,
    });
    const answer = await fromGhost(support, "Fixed now, try again.");
    assert.deepEqual(relatesTo(answer), { "m.in_reply_to": { event_id: second } });
    assert.notEqual(first, second);
    assert.equal(h.hs.profile(answer.sender)?.displayname, "Alice Liddell");
  });

  test("threading: thread — a three-level reply chain stays in one Matrix thread and one mail thread", async () => {
    const root = h.hs.sendMessage(threads, h.alice, { msgtype: "m.text", body: "Plan for Friday" });
    const [a] = await newMailForAlice(1);
    assert.equal(a!.subject, "Threads: Plan for Friday");
    await mail.sendAs("alice", {
      to: "bridge+threads@localhost",
      subject: `Re: ${a!.subject}`,
      inReplyTo: a!.messageId,
      references: [a!.messageId!],
      text: `I bring the cake.${quoted("Plan for Friday")}`,
    });
    const e1 = await fromGhost(threads, "I bring the cake.");
    assert.equal(relatesTo(e1)?.rel_type, "m.thread");
    assert.equal(relatesTo(e1)?.event_id, root);

    h.hs.sendMessage(threads, h.alice, {
      msgtype: "m.text",
      body: "Chocolate, please",
      "m.relates_to": { rel_type: "m.thread", event_id: root, "m.in_reply_to": { event_id: e1.event_id } },
    });
    const [b] = await newMailForAlice(1);
    const bRefs = [b!.references ?? []].flat();
    assert.equal(b!.subject, "Re: Threads: Plan for Friday");
    assert.equal(bRefs[0], a!.messageId, "the thread's first mail leads its References");
    assert.equal(b!.inReplyTo, bRefs.at(-1), "answers alice's mail");

    await mail.sendAs("alice", {
      to: "bridge+threads@localhost",
      subject: `Re: ${a!.subject}`,
      inReplyTo: b!.messageId,
      references: [...bRefs, b!.messageId!],
      text: `Deal.${quoted("Chocolate, please")}`,
    });
    const e2 = await fromGhost(threads, "Deal.");
    assert.equal(relatesTo(e2)?.rel_type, "m.thread");
    assert.equal(relatesTo(e2)?.event_id, root, "still the same thread, three levels down");
  });

  test("mail that answers nothing known and has no token is not posted: it is in the failed list with the reason, and stays in the mailbox", async () => {
    const before = h.hs.messages(support).length + h.hs.messages(threads).length;
    await mail.sendAs("bob", { to: "bridge@localhost", subject: "hello?", text: "Anyone there?" });
    await mail.sendAs("bob", {
      to: "bridge+support@localhost",
      subject: "marker",
      text: "after the stray mail",
    });
    await fromGhost(support, "after the stray mail");
    assert.equal(h.hs.messages(support).length + h.hs.messages(threads).length, before + 1);
    const kept = await Promise.all((await mail.mailbox("bridge")).map(parse));
    assert.ok(kept.some((m) => m.text?.includes("Anyone there?")));
    const failed = (await bridge!.failedJobs()).filter(
      (f) => (f.data as { body?: { text?: string } }).body?.text === "Anyone there?",
    );
    assert.equal(failed.length, 1);
    assert.match(
      failed[0]!.reason,
      /^quarantined: mail to bridge@localhost from bob@localhost answers nothing the bridge knows/,
    );
  });

  test("an auto-reply and a bounce to the route's address are not posted", async () => {
    const before = h.hs.messages(support).length;
    await mail.sendAs("alice", {
      to: "bridge+support@localhost",
      subject: "Out of office",
      text: "I am away until Monday.",
      headers: { "Auto-Submitted": "auto-replied" },
    });
    // A bounce is sent with the null reverse-path: the mailbox's Return-Path is then <>.
    await mail.sendAs("alice", {
      envelope: { from: "", to: "bridge+support@localhost" },
      from: "MAILER-DAEMON@localhost",
      to: "bridge+support@localhost",
      subject: "Undelivered Mail Returned to Sender",
      text: "This is the mail system: your message could not be delivered.",
    });
    await mail.sendAs("bob", {
      to: "bridge+support@localhost",
      subject: "marker",
      text: "after the machines",
    });
    await fromGhost(support, "after the machines");
    assert.equal(h.hs.messages(support).length, before + 1);
  });

  test("a recipient the SMTP server refuses (5xx): the message is in the failed list with the server's reason", async () => {
    const nowhere = h.hs.resolveAlias("#nowhere:test.local")!;
    h.hs.sendMessage(nowhere, h.alice, { msgtype: "m.text", body: "to nobody" });
    const failed = await waitFor("the failed message", async () =>
      (await bridge!.failedJobs()).find((f) => /refused the mail/.test(f.reason)),
    );
    assert.match(failed.reason, /550/);
  });

  test("mail arriving while the bridge is down is posted once each, in order, when it is back", async () => {
    await bridge!.stop();
    bridge = undefined;
    for (let i = 1; i <= 10; i++)
      await mail.sendAs("bob", {
        to: "bridge+support@localhost",
        subject: `offline mail ${i}`,
        text: `offline mail ${i}`,
      });
    // Postfix delivers concurrently: the mailbox's order (its UIDs) is the order the room gets.
    const inMailbox = await bridgeMailbox("offline mail", 10);
    bridge = await start({ config: h.config, registration: h.registration, connectors });
    await waitFor("all 10", () => posted(support, "offline mail").length >= 10);
    await new Promise((r) => setTimeout(r, 1000)); // anything posted twice would be there by now
    assert.deepEqual(posted(support, "offline mail"), inMailbox);
  });

  test("room messages sent while the SMTP server is away are mailed when it is back, once each", async () => {
    await mail.stopSmtp();
    const texts = ["while away 1", "while away 2", "while away 3"];
    for (const text of texts) h.hs.sendMessage(support, h.alice, { msgtype: "m.text", body: text });
    await waitFor("the connector to notice", () => bridge!.connectorStates()["email.office"]?.state !== "up");
    await new Promise((r) => setTimeout(r, 1500)); // a few retries fail meanwhile
    await mail.startSmtp();
    const mails = await newMailForAlice(3);
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal((await mail.mailbox("alice")).length, seenByAlice, "nothing mailed twice");
    // Postfix may deliver them to the mailbox in any order; In-Reply-To says the order they were sent in.
    const byText = new Map(mails.map((m) => [m.text?.trim(), m]));
    assert.deepEqual([...byText.keys()].sort(), texts);
    assert.equal(new Set(mails.map((m) => m.messageId)).size, 3);
    for (let i = 1; i < 3; i++)
      assert.equal(
        byText.get(texts[i])!.inReplyTo,
        byText.get(texts[i - 1])!.messageId,
        "sent in the room's order, the thread kept",
      );
  });

  test("the IMAP server away for 20 s: reading resumes within about 2 s of it answering again", async () => {
    await mail.stopImap();
    await waitFor("the connector to notice", () => bridge!.connectorStates()["email.office"]?.state !== "up");
    await new Promise((r) => setTimeout(r, 20_000)); // long enough for a back-off of many seconds
    await mail.startImap();
    const back = Date.now();
    await waitFor("reading again", () => bridge!.connectorStates()["email.office"]?.state === "up", 30_000);
    const resumedMs = Date.now() - back;
    await mail.sendAs("bob", { to: "bridge+support@localhost", subject: "after imap", text: "after imap" });
    await waitFor("the mail posted", () => posted(support, "after imap").length === 1);
    assert.ok(resumedMs < 3_000, `reading resumed ${resumedMs} ms after the IMAP server was back`);
  });

  test("a mailbox recreated (UIDVALIDITY changed) while the bridge is down: nothing lost, nothing posted again", async () => {
    const bob = async (id: string, text: string) =>
      Buffer.from(
        `From: Bob <bob@localhost>\r\nTo: bridge+restored@localhost\r\nSubject: ${text}\r\n` +
          `Message-ID: <${id}@localhost>\r\nDate: ${new Date().toUTCString()}\r\n\r\n${text}\r\n`,
      );
    await mail.imap("bridge", async (client) => {
      for (const n of [1, 2, 3])
        await client.append("Restored", await bob(`before-${n}`, `before the restore ${n}`));
    });
    await fromGhost(restored, "before the restore 3");
    await bridge!.stop();
    bridge = undefined;
    const uidValidity = await mail.imap("bridge", async (client) => {
      const was = (await client.mailboxOpen("Restored")).uidValidity;
      await client.mailboxClose();
      await client.mailboxDelete("Restored");
      await client.mailboxCreate("Restored");
      // The restored mailbox holds some of the old mail again, with new UIDs (so the new mail has a
      // UID the old cursor had passed), and mail that came meanwhile.
      await client.append("Restored", await bob("before-2", "before the restore 2"));
      await client.append("Restored", await bob("before-3", "before the restore 3"));
      await client.append("Restored", await bob("after-1", "after the restore"));
      return { was, now: (await client.mailboxOpen("Restored")).uidValidity };
    });
    assert.notEqual(uidValidity.now, uidValidity.was);
    bridge = await start({ config: h.config, registration: h.registration, connectors });
    await fromGhost(restored, "after the restore");
    await new Promise((r) => setTimeout(r, 1000)); // anything posted twice would be there by now
    assert.deepEqual(
      h.hs.messages(restored).map((m) => m.content.body),
      ["before the restore 1", "before the restore 2", "before the restore 3", "after the restore"],
    );
  });

  test("the bridge killed (SIGKILL) while it catches up with 50 mails: each is posted once, in order", async () => {
    await bridge!.stop();
    bridge = undefined;
    for (let i = 1; i <= 50; i++)
      await mail.sendAs("bob", {
        to: "bridge+support@localhost",
        subject: `catch-up mail ${i}`,
        text: `catch-up mail ${i}`,
      });
    const inMailbox = await bridgeMailbox("catch-up mail", 50);
    const relayed = () => posted(support, "catch-up mail");
    const proc = new BridgeProcess(h);
    proc.start();
    await waitFor("the catch-up under way", () => relayed().length > 0, 30_000);
    await proc.kill("SIGKILL");
    const atKill = relayed().length;
    bridge = await start({ config: h.config, registration: h.registration, connectors });
    // The killed process's lease on the mailbox, and its job lock on the room's shard, run out first.
    await waitFor("all 50", () => relayed().length >= 50, 45_000);
    await new Promise((r) => setTimeout(r, 1000)); // anything posted twice would be there by now
    assert.deepEqual(relayed(), inMailbox);
    console.log(`# killed with ${atKill} of 50 posted`);
  });
});
