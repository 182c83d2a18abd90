/**
 * What the email connector keeps out of rooms, through a real mailbox (Postfix + Dovecot on
 * loopback): list mail where the endpoint does not allow it, mail whose DMARC failed by the trusted
 * server's Authentication-Results (per dmarcPolicy), mail from senders an endpoint does not list,
 * and the bridge's own mail coming back. Mail is put in folders with IMAP APPEND, as the receiving
 * server would deliver it, headers and all; one account reads each folder.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { generateKeyPairSync } from "node:crypto";
import { dkimVerify } from "mailauth/lib/dkim/verify.js";
import nodemailer, { type SendMailOptions } from "nodemailer";
import { connectors } from "../../bridges/index.js";
import { start, type RunningBridge } from "../../src/app.js";
import { harness, waitFor, type Harness } from "../helpers/fixture.js";
import {
  canRunMailServer,
  NO_MAIL_SERVER,
  startMailServer,
  type MailServer,
} from "../helpers/mail-server.js";

const TRUSTED = "mx.test";
const dkimKeys = generateKeyPairSync("rsa", { modulusLength: 2048 });

/** A mail as the receiving server stores it; `authResults` go on top, the first topmost. */
async function rawMail(mail: SendMailOptions, authResults: string[] = []): Promise<Buffer> {
  const transport = nodemailer.createTransport({ streamTransport: true, buffer: true });
  const info = await transport.sendMail({ from: "bob@other.test", to: "bridge@localhost", ...mail });
  const top = authResults.map((v) => `Authentication-Results: ${v}\r\n`).join("");
  return Buffer.concat([Buffer.from(top), info.message as Buffer]);
}

describe("email: what is kept out of rooms", { skip: !canRunMailServer && NO_MAIL_SERVER }, () => {
  let mail: MailServer;
  let h: Harness;
  let bridge: RunningBridge | undefined;
  const rooms: Record<string, string> = {};

  before(async () => {
    mail = await startMailServer();
    const screened = (mailbox: string, dmarcPolicy: string) =>
      mail.bridgeAccount({
        plusAddressing: true,
        mailbox,
        authservId: TRUSTED,
        dmarcPolicy,
        ...(mailbox === "Label" && { processed: { flag: "\\Seen" } }),
        ...(mailbox === "Reject" && { processed: { moveTo: "Rejected" } }),
      });
    h = await harness({
      bridges: {
        mqtt: { home: { embedded: { port: 0 } } },
        email: {
          office: mail.bridgeAccount({
            plusAddressing: true,
            dkim: {
              domainName: "localhost",
              keySelector: "tb",
              privateKey: dkimKeys.privateKey.export({ type: "pkcs8", format: "pem" }),
            },
          }),
          screen: screened("Screen", "quarantine"),
          label: screened("Label", "label"),
          reject: screened("Reject", "reject"),
        },
      },
      routes: [
        {
          id: "screen",
          room: "#screen:test.local",
          endpoints: [
            { account: "email.screen", direction: "in", default: true },
            { account: "email.screen", direction: "in", token: "lists", allowLists: true },
            {
              account: "email.screen",
              direction: "in",
              token: "staff",
              senders: ["@staff.test", "boss@other.test"],
            },
          ],
        },
        {
          id: "label",
          room: "#label:test.local",
          endpoints: [{ account: "email.label", direction: "in", default: true }],
        },
        {
          id: "reject",
          room: "#reject:test.local",
          endpoints: [{ account: "email.reject", direction: "in", default: true }],
        },
        {
          id: "echo",
          room: "#echo:test.local",
          endpoints: [
            { account: "email.office", direction: "inout", to: ["bridge+echo@localhost"], token: "echo" },
          ],
        },
      ],
    });
    for (const id of ["screen", "label", "reject", "echo"])
      rooms[id] = h.hs.createRoom({ creator: h.alice, alias: `#${id}:test.local`, preset: "public_chat" });
    await mail.imap("bridge", async (client) => {
      for (const box of ["Screen", "Label", "Reject"]) await client.mailboxCreate(box);
    });
    bridge = await start({ config: h.config, registration: h.registration, connectors });
    await waitFor("email accounts up", () =>
      ["office", "screen", "label", "reject"].every(
        (a) => bridge!.connectorStates()[`email.${a}`]?.state === "up",
      ),
    );
  });

  after(async () => {
    await bridge?.stop();
    await h?.cleanup();
    await mail?.stop();
  });

  const deliver = async (mailbox: string, ...mails: Buffer[]) =>
    mail.imap("bridge", async (client) => {
      for (const m of mails) await client.append(mailbox, m);
    });
  const texts = (room: string) => h.hs.messages(rooms[room]!).map((m) => String(m.content.body));
  /** Waits for `marker` in `room` (mail appended after the others, so they were read before it). */
  const markerIn = (room: string, marker: string) =>
    waitFor(`"${marker}" in ${room}`, () => texts(room).includes(marker), 15_000);
  const failedFor = async (text: string) =>
    (await bridge!.failedJobs()).filter((f) => (f.data as { body?: { text?: string } }).body?.text === text);

  test("list mail is posted only where the endpoint allows lists", async () => {
    const listHeaders = {
      "List-Id": "Team <team.lists.other.test>",
      "List-Unsubscribe": "<mailto:leave@other.test>",
    };
    await deliver(
      "Screen",
      await rawMail({ subject: "news", text: "list mail to the default", headers: listHeaders }),
      await rawMail({ subject: "news", text: "bulk mail", headers: { Precedence: "bulk" } }),
      await rawMail({
        to: "bridge+lists@localhost",
        subject: "news",
        text: "list mail to lists",
        headers: listHeaders,
      }),
      await rawMail({ subject: "marker", text: "marker 1" }),
    );
    await markerIn("screen", "marker 1");
    assert.deepEqual(texts("screen"), ["list mail to lists", "marker 1"]);
  });

  test("DMARC fail by the trusted authserv-id: quarantined with the reason; a forger's own Authentication-Results is ignored", async () => {
    await deliver(
      "Screen",
      await rawMail({ subject: "x", text: "dmarc fails" }, [`${TRUSTED}; dmarc=fail header.from=other.test`]),
      // The forger's field claims a pass; the trusted server's (on top) says fail.
      await rawMail({ subject: "x", text: "forged pass" }, [
        `${TRUSTED}; dmarc=fail header.from=other.test`,
        "evil.test; dmarc=pass",
      ]),
      // A forger's fail, or a fail under the trusted server's pass (it came with the mail): posted.
      await rawMail({ subject: "x", text: "untrusted fail" }, ["evil.test; dmarc=fail"]),
      await rawMail({ subject: "x", text: "fail below pass" }, [
        `${TRUSTED}; dmarc=pass`,
        `${TRUSTED}; dmarc=fail`,
      ]),
      await rawMail({ subject: "marker", text: "marker 2" }),
    );
    await markerIn("screen", "marker 2");
    assert.deepEqual(texts("screen").slice(-3), ["untrusted fail", "fail below pass", "marker 2"]);
    for (const text of ["dmarc fails", "forged pass"]) {
      const failed = await failedFor(text);
      assert.equal(failed.length, 1, text);
      assert.equal(
        failed[0]!.reason,
        `quarantined: DMARC failed for other.test (Authentication-Results of ${TRUSTED}): the sender may be forged`,
      );
    }
  });

  test("dmarcPolicy label posts with a warning line; reject posts nothing and lists nothing; processed mail flagged or moved", async () => {
    const failing = (text: string) =>
      rawMail({ subject: "x", text }, [`${TRUSTED}; dmarc=fail header.from=other.test`]);
    await deliver("Label", await failing("labelled"), await rawMail({ subject: "m", text: "marker 3" }));
    await deliver("Reject", await failing("rejected"), await rawMail({ subject: "m", text: "marker 4" }));
    await markerIn("label", "marker 3");
    await markerIn("reject", "marker 4");
    assert.deepEqual(texts("label"), [
      `⚠ DMARC failed for other.test (Authentication-Results of ${TRUSTED}): the sender may be forged.\n\nlabelled`,
      "marker 3",
    ]);
    assert.deepEqual(texts("reject"), ["marker 4"]);
    assert.deepEqual(await failedFor("rejected"), []);
    // processed: the Label folder's mails flagged \Seen; the Reject folder's moved to Rejected.
    const folder = (name: string) =>
      mail.imap("bridge", async (client) => {
        const box = await client.mailboxOpen(name);
        if (box.exists === 0) return [];
        const found: string[][] = [];
        for await (const m of client.fetch("1:*", { flags: true })) found.push([...(m.flags ?? [])]);
        return found;
      });
    await waitFor("processed mail marked", async () => {
      const [label, reject, rejected] = [
        await folder("Label"),
        await folder("Reject"),
        await folder("Rejected"),
      ];
      return (
        label.length === 2 &&
        label.every((f) => f.includes("\\Seen")) &&
        reject.length === 0 &&
        rejected.length === 2
      );
    });
  });

  test("senders: mail from others is quarantined with the reason; listed addresses and domains are posted", async () => {
    await deliver(
      "Screen",
      await rawMail({ to: "bridge+staff@localhost", subject: "s", text: "from a stranger" }),
      await rawMail({
        from: "carol@staff.test",
        to: "bridge+staff@localhost",
        subject: "s",
        text: "from staff",
      }),
      await rawMail({
        from: "boss@other.test",
        to: "bridge+staff@localhost",
        subject: "s",
        text: "from the boss",
      }),
      await rawMail({ subject: "marker", text: "marker 5" }),
    );
    await markerIn("screen", "marker 5");
    assert.deepEqual(texts("screen").slice(-3), ["from staff", "from the boss", "marker 5"]);
    const [failed] = await failedFor("from a stranger");
    assert.equal(failed?.reason, "quarantined: the sender bob@other.test is not in the endpoint's senders");
  });

  test("the bridge's own mail coming back into its mailbox is not posted; it carries a DKIM-Signature that verifies", async () => {
    h.hs.sendMessage(rooms.echo!, h.alice, { msgtype: "m.text", body: "to myself" });
    const sent = await waitFor(
      "the mail in the bridge's mailbox",
      async () =>
        (await mail.mailbox("bridge")).find((m) => m.envelope?.subject?.endsWith("Messages from Matrix")),
      15_000,
    );
    await mail.sendAs("bob", { to: "bridge+echo@localhost", subject: "marker", text: "marker 6" });
    await markerIn("echo", "marker 6");
    assert.deepEqual(texts("echo"), ["to myself", "marker 6"]);
    assert.equal(h.hs.messages(rooms.echo!).filter((m) => m.sender.startsWith("@_tb_mail_")).length, 1);
    const publicKey = dkimKeys.publicKey.export({ type: "spki", format: "der" }).toString("base64");
    const verified = await dkimVerify(sent.source!, {
      resolver: async (name: string, type: string) => {
        assert.deepEqual([name, type], ["tb._domainkey.localhost", "TXT"]);
        return [[`v=DKIM1; k=rsa; p=${publicKey}`]];
      },
    });
    assert.deepEqual(
      verified.results.map((r) => [r.signingDomain, r.selector, r.status.result]),
      [["localhost", "tb", "pass"]],
    );
  });
});
