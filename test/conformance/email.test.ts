/**
 * The email connector passes the conformance suite, against a real mail server (Postfix + Dovecot,
 * see test/helpers/mail-server.ts): a channel is an endpoint's token, alice says something by
 * mailing bridge+<channel>@localhost, and hears what reaches her mailbox with Reply-To
 * bridge+<channel>@localhost.
 */
import { after } from "node:test";
import { ImapFlow } from "imapflow";
import { simpleParser } from "mailparser";
import { emailConnector } from "../../bridges/email/index.js";
import {
  canRunMailServer,
  NO_MAIL_SERVER,
  startMailServer,
  type MailServer,
} from "../helpers/mail-server.js";
import { connectorConformance, type FarSide } from "./connector-conformance.js";

let server: MailServer | undefined;
after(() => server?.stop());

interface Heard {
  text: string;
  messageId: string | undefined;
  inReplyTo: string | undefined;
}

/**
 * The mails of one channel as a mail client shows the thread: each after the one it answers.
 * (Postfix delivers concurrently, so the mailbox's own order may differ from the order sent.)
 */
function threadOrder(mails: readonly Heard[]): string[] {
  const ids = new Set(mails.map((m) => m.messageId));
  const ordered: Heard[] = mails.filter((m) => m.inReplyTo === undefined || !ids.has(m.inReplyTo));
  for (let i = 0; i < ordered.length; i++)
    ordered.push(...mails.filter((m) => m.inReplyTo !== undefined && m.inReplyTo === ordered[i]!.messageId));
  return ordered.map((m) => m.text);
}

/** Alice, reading her INBOX every 100 ms for mail from the bridge. */
async function alice(mail: MailServer): Promise<FarSide> {
  const heard = new Map<string, Heard[]>();
  const client = new ImapFlow({
    host: "127.0.0.1",
    port: mail.imapPort,
    secure: false,
    doSTARTTLS: false,
    auth: { user: "alice@localhost", pass: "alicepass" },
    logger: false,
  });
  client.on("error", () => undefined);
  await client.connect();
  let lastUid = (await client.mailboxOpen("INBOX")).uidNext - 1;
  let closed = false;
  const poll = async () => {
    while (!closed) {
      const found: number[] | false | undefined = await client
        .search({ uid: `${lastUid + 1}:*` }, { uid: true })
        .catch(() => false);
      const uids = (found || []).filter((u) => u > lastUid).sort((a, b) => a - b);
      for (const uid of uids) {
        const m = await client.fetchOne(String(uid), { source: true }, { uid: true });
        lastUid = uid;
        if (!m || !m.source) continue;
        const parsed = await simpleParser(m.source);
        const channel = /bridge\+([^@]+)@/.exec(parsed.replyTo?.text ?? "")?.[1];
        if (channel !== undefined)
          heard.get(channel)?.push({
            text: (parsed.text ?? "").trim(),
            messageId: parsed.messageId,
            inReplyTo: parsed.inReplyTo,
          });
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  };
  const polling = poll();
  return {
    say: (channel, text) =>
      mail.sendAs("alice", { to: `bridge+${channel}@localhost`, subject: channel, text }),
    listen: async (channel) => void heard.set(channel, []),
    heard: (channel) => threadOrder(heard.get(channel) ?? []),
    close: async () => {
      closed = true;
      await polling.catch(() => undefined);
      await client.logout().catch(() => client.close());
    },
  };
}

if (canRunMailServer)
  connectorConformance({
    title: "email, Postfix + Dovecot",
    definition: emailConnector,
    sourceDir: "bridges/email",
    setUp: async () => {
      server ??= await startMailServer();
      const mail = server;
      return { account: mail.bridgeAccount({ plusAddressing: true }), tearDown: () => mail.clear() };
    },
    farSide: () => alice(server!),
    endpoint: (channel) => ({ token: channel, to: ["alice@localhost"] }),
    // Postfix acknowledges alice's mail itself, long before the bridge reads it.
    acknowledgesItself: false,
    outage: {
      begin: async () => {
        await server!.stopSmtp();
        await server!.stopImap();
      },
      end: async () => {
        await server!.startImap();
        await server!.startSmtp();
      },
    },
  });
else console.log(`# skipped: ${NO_MAIL_SERVER}`);
