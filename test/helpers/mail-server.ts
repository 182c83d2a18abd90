/**
 * A real mail server of a test file's own: Postfix (SMTP) + Dovecot (IMAP) on free loopback ports,
 * in a temporary directory, started by test/mail-server/mail-server.sh (which installs them from
 * Debian when absent). Starting costs ~3 s (more the first time: the install), stopping ~3 s: once
 * per test file. Users: bridge@, alice@, bob@localhost, each with the password <name>pass.
 */
import { execFile } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { ImapFlow, type FetchMessageObject } from "imapflow";
import nodemailer, { type Transporter } from "nodemailer";
import type Mail from "nodemailer/lib/mailer/index.js";
import { freePort, waitFor } from "./fixture.js";

const SCRIPT = join(import.meta.dirname, "..", "mail-server", "mail-server.sh");
const run = promisify(execFile);

/** Postfix and Dovecot need root (the script installs them, and they drop privileges themselves). */
export const canRunMailServer = process.getuid?.() === 0;
export const NO_MAIL_SERVER = "needs root to run Postfix + Dovecot (test/mail-server/mail-server.sh)";

export interface MailServer {
  readonly smtpPort: number;
  readonly imapPort: number;
  /** The account config of bridge@localhost on this server. */
  bridgeAccount(extra?: Record<string, unknown>): Record<string, unknown>;
  /** Sends a mail as `user` (alice, bob) through the server's SMTP. */
  sendAs(user: string, mail: Mail.Options): Promise<void>;
  /** The mails in `user`'s INBOX, in UID order, each with its source. */
  mailbox(user: string): Promise<FetchMessageObject[]>;
  /** Waits until `user`'s INBOX holds at least `count` mails; resolves to them. */
  waitForMail(user: string, count: number, timeoutMs?: number): Promise<FetchMessageObject[]>;
  /** Runs `work` on an IMAP connection logged in as `user`. */
  imap<T>(user: string, work: (client: ImapFlow) => Promise<T>): Promise<T>;
  /** Empties every mailbox. */
  clear(): Promise<void>;
  stopSmtp(): Promise<void>;
  startSmtp(): Promise<void>;
  stopImap(): Promise<void>;
  startImap(): Promise<void>;
  stop(): Promise<void>;
}

export async function startMailServer(): Promise<MailServer> {
  const dir = mkdtempSync(join(tmpdir(), "tribridge-mail-"));
  const smtpPort = await freePort();
  const imapPort = await freePort();
  const script = (...args: string[]) => run("bash", [SCRIPT, ...args], { timeout: 600_000 });
  await script("start", dir, String(smtpPort), String(imapPort));
  const transports = new Map<string, Transporter>();
  const imap = async <T>(user: string, work: (client: ImapFlow) => Promise<T>): Promise<T> => {
    const client = new ImapFlow({
      host: "127.0.0.1",
      port: imapPort,
      secure: false,
      doSTARTTLS: false,
      auth: { user: `${user}@localhost`, pass: `${user}pass` },
      logger: false,
    });
    client.on("error", () => undefined);
    await client.connect();
    try {
      return await work(client);
    } finally {
      await client.logout().catch(() => client.close());
    }
  };
  const mailbox = (user: string) =>
    imap(user, async (client) => {
      const box = await client.mailboxOpen("INBOX");
      if (box.exists === 0) return [];
      const mails: FetchMessageObject[] = [];
      for await (const m of client.fetch("1:*", { uid: true, source: true, envelope: true })) mails.push(m);
      return mails.sort((a, b) => a.uid - b.uid);
    });
  return {
    smtpPort,
    imapPort,
    imap,
    bridgeAccount: (extra = {}) => ({
      address: "bridge@localhost",
      imap: {
        host: "127.0.0.1",
        port: imapPort,
        security: "none",
        user: "bridge@localhost",
        pass: "bridgepass",
      },
      smtp: {
        host: "127.0.0.1",
        port: smtpPort,
        security: "none",
        user: "bridge@localhost",
        pass: "bridgepass",
      },
      ...extra,
    }),
    sendAs: async (user, mail) => {
      let transport = transports.get(user);
      if (!transport) {
        transport = nodemailer.createTransport({
          host: "127.0.0.1",
          port: smtpPort,
          secure: false,
          ignoreTLS: true,
          auth: { user: `${user}@localhost`, pass: `${user}pass` },
        });
        transports.set(user, transport);
      }
      await transport.sendMail({ from: `${user}@localhost`, ...mail });
    },
    mailbox,
    waitForMail: (user, count, timeoutMs = 15_000) =>
      waitFor(
        `${count} mails for ${user}`,
        async () => {
          const mails = await mailbox(user);
          return mails.length >= count && mails;
        },
        timeoutMs,
      ),
    clear: async () => {
      for (const user of ["bridge", "alice", "bob"])
        await imap(user, async (client) => {
          const box = await client.mailboxOpen("INBOX");
          if (box.exists > 0) await client.messageDelete("1:*");
        });
    },
    stopSmtp: async () => void (await script("stop-smtp", dir)),
    startSmtp: async () => void (await script("start-smtp", dir)),
    stopImap: async () => void (await script("stop-imap", dir)),
    startImap: async () => void (await script("start-imap", dir)),
    stop: async () => {
      for (const t of transports.values()) t.close();
      await script("stop", dir);
    },
  };
}
