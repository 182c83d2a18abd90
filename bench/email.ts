/**
 * The email rows of `npm run bench`, beside the mail server's own figures measured in the same run
 * (a Postfix + Dovecot of its own on loopback, see test/helpers/mail-server.ts; needs root):
 *
 *   mail server alone   SMTP send → IMAP IDLE notice (latency), and Postfix delivery into a mailbox
 *                       from one sequential SMTP connection (mails/s)
 *   mail → room         bob mails the route's address → the room event (latency, one at a time)
 *   room → mailbox      room messages → alice's mailbox through Postfix (mails/s, one room, in order)
 */
import { ImapFlow } from "imapflow";
import { simpleParser } from "mailparser";
import nodemailer from "nodemailer";
import { BridgeProcess } from "../test/helpers/bridge-process.js";
import { freePort, harness } from "../test/helpers/fixture.js";
import { canRunMailServer, startMailServer, type MailServer } from "../test/helpers/mail-server.js";

const LATENCY_SAMPLES = Number(process.env.BENCH_MAIL_SAMPLES ?? 30);
const MAILS = Number(process.env.BENCH_MAILS ?? 300);

export interface EmailFigures {
  rawIdle: { p50: number; p99: number };
  rawDelivery: number;
  mailToRoom: { p50: number; p99: number };
  roomToMailbox: number;
}

export const emailBenchAvailable = canRunMailServer;

function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

/** An IMAP connection on `user`'s INBOX that IDLEs as the bridge does (50 ms after each command). */
async function inbox(mail: MailServer, user: string): Promise<ImapFlow> {
  const client = new ImapFlow({
    host: "127.0.0.1",
    port: mail.imapPort,
    secure: false,
    doSTARTTLS: false,
    auth: { user: `${user}@localhost`, pass: `${user}pass` },
    logger: false,
    autoIdleDelay: 50,
  });
  client.on("error", () => undefined);
  await client.connect();
  await client.mailboxOpen("INBOX");
  return client;
}

/** Resolves once `client`'s mailbox holds `count` mails (NOOP: SELECT counts are exact, STATUS lags). */
async function until(client: ImapFlow, count: number, timeoutMs = 120_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while ((client.mailbox ? client.mailbox.exists : 0) < count) {
    if (Date.now() > deadline) throw new Error(`mailbox stuck at ${client.mailbox && client.mailbox.exists}`);
    await client.noop();
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function rawFigures(mail: MailServer): Promise<Pick<EmailFigures, "rawIdle" | "rawDelivery">> {
  const bob = await inbox(mail, "bob");
  // One SMTP connection kept open, mails sent one after another: as the bridge sends one room's.
  const smtp = nodemailer.createTransport({
    pool: true,
    maxConnections: 1,
    host: "127.0.0.1",
    port: mail.smtpPort,
    ignoreTLS: true,
    auth: { user: "alice@localhost", pass: "alicepass" },
  });
  const latencies: number[] = [];
  for (let i = 0; i < LATENCY_SAMPLES; i++) {
    const arrived = new Promise((r) => bob.once("exists", r));
    await new Promise((r) => setTimeout(r, 100)); // IDLE is on again
    const t0 = performance.now();
    await smtp.sendMail({ from: "alice@localhost", to: "bob@localhost", subject: `idle ${i}`, text: "x" });
    await arrived;
    latencies.push(performance.now() - t0);
  }
  const base = bob.mailbox ? bob.mailbox.exists : 0;
  const t0 = performance.now();
  for (let i = 0; i < MAILS; i++)
    await smtp.sendMail({
      from: "alice@localhost",
      to: "bob@localhost",
      subject: `load ${i}`,
      text: "x".repeat(1000),
    });
  await until(bob, base + MAILS);
  const rawDelivery = Math.round((MAILS / (performance.now() - t0)) * 1000);
  smtp.close();
  await bob.logout();
  return { rawIdle: { p50: percentile(latencies, 50), p99: percentile(latencies, 99) }, rawDelivery };
}

async function bridgeFigures(
  mail: MailServer,
  redisUrl: string,
): Promise<Pick<EmailFigures, "mailToRoom" | "roomToMailbox">> {
  const h = await harness({
    queue: { shards: 16, redisUrl },
    bridges: {
      mqtt: { home: { embedded: { port: await freePort() } } },
      email: { bench: mail.bridgeAccount({ plusAddressing: true }) },
    },
    routes: [
      {
        id: "mailbench",
        room: "#mailbench:test.local",
        endpoints: [{ account: "email.bench", direction: "inout", to: ["alice@localhost"], token: "bench" }],
      },
    ],
  });
  const room = h.hs.createRoom({ creator: h.alice, alias: "#mailbench:test.local", preset: "public_chat" });
  const bridge = new BridgeProcess(h, { built: true });
  bridge.start();
  process.once("exit", () => void bridge.kill("SIGKILL"));
  const bob = nodemailer.createTransport({
    host: "127.0.0.1",
    port: mail.smtpPort,
    ignoreTLS: true,
    auth: { user: "bob@localhost", pass: "bobpass" },
  });
  const posted = (text: string) => h.hs.messages(room).find((m) => m.content.body === text);
  const waitPosted = async (text: string, timeoutMs: number) => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const event = posted(text);
      if (event) return event;
      if (Date.now() > deadline) throw new Error(`"${text}" never reached the room`);
      await new Promise((r) => setTimeout(r, 5));
    }
  };
  // Warm-up: the bridge up, bob's ghost registered and in the room.
  await bob.sendMail({
    from: "bob@localhost",
    to: "bridge+bench@localhost",
    subject: "warm-up",
    text: "warm-up",
  });
  await waitPosted("warm-up", 60_000);

  const latencies: number[] = [];
  for (let i = 0; i < LATENCY_SAMPLES; i++) {
    const text = `latency ${i}`;
    const t0 = Date.now();
    await bob.sendMail({ from: "bob@localhost", to: "bridge+bench@localhost", subject: text, text });
    // Seen by polling every 5 ms: the event's origin_server_ts is the mail's Date (whole seconds).
    await waitPosted(text, 30_000);
    latencies.push(Date.now() - t0);
  }

  const alice = await inbox(mail, "alice");
  const base = alice.mailbox ? alice.mailbox.exists : 0;
  const t0 = performance.now();
  for (let i = 0; i < MAILS; i++) h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: `out ${i}` });
  await until(alice, base + MAILS);
  const roomToMailbox = Math.round((MAILS / (performance.now() - t0)) * 1000);
  // In order: each mail answers the one sent before it (the route is one thread).
  const byId = new Map<string, { text: string; inReplyTo?: string }>();
  for await (const m of alice.fetch(`${base + 1}:*`, { source: true })) {
    const parsed = await simpleParser(m.source!);
    byId.set(parsed.messageId!, {
      text: (parsed.text ?? "").trim(),
      ...(parsed.inReplyTo && { inReplyTo: parsed.inReplyTo }),
    });
  }
  for (const { text, inReplyTo } of byId.values()) {
    const n = Number(text.slice(4));
    if (n > 0 && byId.get(inReplyTo ?? "")?.text !== `out ${n - 1}`)
      throw new Error(`"${text}" out of order`);
  }
  await alice.logout();
  bob.close();
  await bridge.kill("SIGTERM");
  await h.cleanup();
  return {
    mailToRoom: { p50: percentile(latencies, 50), p99: percentile(latencies, 99) },
    roomToMailbox,
  };
}

export async function emailBench(redisUrl: string): Promise<EmailFigures> {
  const mail = await startMailServer();
  try {
    return { ...(await rawFigures(mail)), ...(await bridgeFigures(mail, redisUrl)) };
  } finally {
    await mail.stop();
  }
}
