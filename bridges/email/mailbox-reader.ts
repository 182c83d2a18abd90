/**
 * The one reader of a mailbox (the account's instance that holds its lease, see
 * `ConnectorContext.runExclusive`): IMAP IDLE for new mail, each mail handed over in UID order, and
 * a cursor in the store (UIDVALIDITY and the last UID handed over) that moves only once the handler
 * has resolved, i.e. once the core has the mail. So a crash, a lost lease or a lost connection
 * hands the same mail over again, never skips one; the handler drops what it already relayed (by
 * Message-ID). Reconnects with the core's jittered back-off.
 */
import { setTimeout as sleep } from "node:timers/promises";
import { ImapFlow } from "imapflow";
import { backoffDelayMs, type ConnectorState, type KeyValueStore } from "../../src/connector.js";
import { errorMessage } from "../../src/errors.js";
import type { Logger } from "../../src/log.js";
import { EMAIL_DEFAULTS, type EmailAccount } from "./schema.js";

const RECONNECT = { initialDelayMs: 500, maxDelayMs: 60_000 };
/**
 * After a failure to reach the server at all (refused, timed out, dropped): a quick try again,
 * so that reading resumes within about 2 s of the server answering, however long it was away. A
 * refused login backs off to RECONNECT's minute, not to trip a provider's lockout.
 */
const RECONNECT_UNREACHABLE = { initialDelayMs: 250, maxDelayMs: 2_000 };
/** Looked at again this often even without an IDLE notice (a server that drops them). */
const POLL_MS = 60_000;
/** A mail whose date is this close to the cursor's may come after it in the mailbox (SEARCH SINCE is by day). */
const DAY_MS = 24 * 3600_000;
/**
 * A mailbox read for the first time: mail from this long before the connector started is relayed
 * (what came while it was starting, on a server whose clock is a little behind), older mail not.
 */
const FIRST_READ_SLACK_MS = 60_000;

interface Cursor {
  uidValidity: string;
  lastUid: number;
  /** The INTERNALDATE of the last mail handed over (ms): where to look again after a UIDVALIDITY change. */
  at: number;
}

export interface MailboxReaderOptions {
  config: EmailAccount;
  store: KeyValueStore;
  log: Logger;
  /** Whether anything reads mail now (inbound endpoints): when not, the cursor stays where it is. */
  reading(): boolean;
  /**
   * Takes one mail (its whole source): resolves once it is relayed, or known not to be relayed
   * (also one relayed before: a mail is handed over again after a crash or a UIDVALIDITY change).
   */
  handle(source: Buffer, uid: number): Promise<void>;
  /** A mail too large to fetch (it stays in the mailbox), with what its envelope says. */
  tooLarge(
    uid: number,
    size: number,
    about: { messageId?: string; from?: string; subject?: string },
  ): Promise<void>;
  setState(state: ConnectorState, reason?: string): void;
}

export class MailboxReader {
  private readonly startedAt = Date.now();
  /** Whether to look at the mailbox again (new mail, or an endpoint that now reads it). */
  private pending = true;
  private wake: (() => void) | undefined;

  constructor(private readonly o: MailboxReaderOptions) {}

  /** Something changed (an endpoint now reads mail): look at the mailbox again. */
  poke(): void {
    this.pending = true;
    this.wake?.();
  }

  /** Reads until `signal` aborts (the lease lost, or the bridge stopping). */
  async run(signal: AbortSignal): Promise<void> {
    const { log } = this.o;
    this.o.setState("connecting");
    let lastLost: string | undefined;
    for (let failures = 0; !signal.aborted;) {
      const client = this.client();
      const onAbort = () => client.close();
      signal.addEventListener("abort", onAbort);
      let lost = "imap connection closed";
      let loginRefused = false;
      try {
        await client.connect();
        const { processed } = this.o.config;
        const moveTo = processed && "moveTo" in processed ? processed.moveTo : undefined;
        // Made once; an existing folder is fine (the server says so, in its own words).
        if (moveTo !== undefined) await client.mailboxCreate(moveTo).catch(() => undefined);
        const mailbox = await client.mailboxOpen(this.o.config.mailbox);
        log.info({ mailbox: mailbox.path, exists: mailbox.exists }, "reading mailbox");
        this.o.setState("up");
        failures = 0;
        lastLost = undefined;
        await this.readWhileConnected(client, signal);
      } catch (err) {
        lost = `imap: ${errorMessage(err)}`;
        loginRefused = loginRefusedBy(err);
      } finally {
        signal.removeEventListener("abort", onAbort);
        client.close();
      }
      if (signal.aborted) break;
      failures++;
      // One line per reason, not per attempt (tries are a second or two apart while it is away).
      if (lost !== lastLost) log.warn({ failures }, lost);
      lastLost = lost;
      this.o.setState("connecting", lost);
      const backoff = loginRefused ? RECONNECT : RECONNECT_UNREACHABLE;
      await sleep(backoffDelayMs(backoff, failures), undefined, { signal }).catch(() => undefined);
    }
  }

  private client(): ImapFlow {
    const client = createImapClient(this.o.config);
    // Errors also reject the command under way, or close the connection: both are handled there.
    client.on("error", (err: unknown) => this.o.log.debug({ err: errorMessage(err) }, "imap error"));
    return client;
  }

  private async readWhileConnected(client: ImapFlow, signal: AbortSignal): Promise<void> {
    this.pending = true;
    this.wake = undefined;
    client.on("exists", () => this.poke());
    client.on("close", () => this.poke());
    for (let failures = 0; !signal.aborted && client.usable;) {
      if (this.pending) {
        this.pending = false;
        try {
          await this.catchUp(client, signal);
          failures = 0;
        } catch (err) {
          if (!client.usable || signal.aborted) throw err;
          // The mail is still there and the cursor unmoved: the same mail is tried again.
          failures++;
          this.pending = true;
          this.o.log.warn({ err: errorMessage(err), failures }, "relaying mail failed; trying again");
          await sleep(backoffDelayMs(RECONNECT, failures), undefined, { signal }).catch(() => undefined);
          continue;
        }
      }
      await new Promise<void>((resolve) => {
        const done = () => {
          this.wake = undefined;
          clearTimeout(timer);
          signal.removeEventListener("abort", done);
          resolve();
        };
        const timer = setTimeout(() => this.poke(), POLL_MS);
        signal.addEventListener("abort", done);
        this.wake = done;
        if (this.pending || !client.usable || signal.aborted) done();
      });
    }
  }

  /** Hands over every mail after the cursor, in UID order, moving the cursor after each. */
  private async catchUp(client: ImapFlow, signal: AbortSignal): Promise<void> {
    const mailbox = client.mailbox;
    if (!mailbox) throw new Error("no mailbox selected");
    const uidValidity = String(mailbox.uidValidity);
    const key = `cursor:${this.o.config.mailbox}`;
    const stored = await this.o.store.get(key);
    let cursor: Cursor | undefined = stored === undefined ? undefined : (JSON.parse(stored) as Cursor);
    if (cursor === undefined) {
      cursor = {
        uidValidity,
        lastUid: await this.lastUidBefore(client, this.startedAt - FIRST_READ_SLACK_MS),
        at: Date.now(),
      };
      await this.o.store.set(key, JSON.stringify(cursor));
      this.o.log.info(
        { lastUid: cursor.lastUid },
        "mailbox read for the first time: relaying mail from its start on",
      );
    }
    if (!this.o.reading()) return;
    if (cursor.uidValidity !== uidValidity) return this.rescan(client, signal, cursor, uidValidity);
    // `n:*` also names the last mail when there is none from n on: filtered out.
    const after = cursor.lastUid;
    const uids = ((await client.search({ uid: `${after + 1}:*` }, { uid: true })) || []).filter(
      (u) => u > after,
    );
    for (const uid of uids.sort((a, b) => a - b)) {
      if (signal.aborted || !this.o.reading()) return;
      const at = await this.fetchAndHandle(client, uid);
      cursor = { uidValidity, lastUid: uid, at: Math.max(cursor.at, at) };
      await this.o.store.set(key, JSON.stringify(cursor));
      await this.markProcessed(client, uid);
    }
  }

  /**
   * `processed`: once the cursor is past a mail (relayed, or kept out and logged), it is flagged
   * or moved to another folder. Only after the cursor moved: a crash in between leaves it unmarked,
   * never unread. A failure is logged, not retried: the mail was dealt with all the same.
   */
  private async markProcessed(client: ImapFlow, uid: number): Promise<void> {
    const processed = this.o.config.processed;
    if (!processed) return;
    try {
      if ("flag" in processed) await client.messageFlagsAdd(String(uid), [processed.flag], { uid: true });
      else await client.messageMove(String(uid), processed.moveTo, { uid: true });
    } catch (err) {
      this.o.log.warn({ uid, processed, err: errorMessage(err) }, "could not mark the mail processed");
    }
  }

  /**
   * The last UID of the mail that arrived before `at` (ms): what a mailbox read for the first time
   * already held, which was never meant for the rooms. UIDs grow with arrival.
   */
  private async lastUidBefore(client: ImapFlow, at: number): Promise<number> {
    const uidNext = client.mailbox ? client.mailbox.uidNext : 1;
    const today = (await client.search({ since: new Date(at) }, { uid: true })) || [];
    if (today.length === 0) return uidNext - 1;
    let firstAfter = Infinity;
    for await (const m of client.fetch(today.join(","), { uid: true, internalDate: true }, { uid: true }))
      if (m.internalDate && new Date(m.internalDate).getTime() >= at)
        firstAfter = Math.min(firstAfter, m.uid);
    return firstAfter === Infinity ? uidNext - 1 : firstAfter - 1;
  }

  /**
   * The UIDs mean nothing any more (the mailbox was recreated or rebuilt): the mail since the last
   * one handed over is read again, and the handler drops what it relayed (by Message-ID). The
   * cursor moves to the new UIDVALIDITY only at the end: cut short, the rescan starts over.
   */
  private async rescan(
    client: ImapFlow,
    signal: AbortSignal,
    cursor: Cursor,
    uidValidity: string,
  ): Promise<void> {
    this.o.log.warn(
      { was: cursor.uidValidity, now: uidValidity },
      "mailbox UIDVALIDITY changed: reading again the mail since the last relayed",
    );
    // Mail arriving from now on has a UID from here: the catch-up after this one takes it.
    const uidNext = client.mailbox ? client.mailbox.uidNext : 1;
    const found = ((await client.search({ since: new Date(cursor.at - DAY_MS) }, { uid: true })) || []).sort(
      (a, b) => a - b,
    );
    let at = cursor.at;
    for (const uid of found) {
      if (signal.aborted || !this.o.reading()) return;
      at = Math.max(at, await this.fetchAndHandle(client, uid));
      await this.markProcessed(client, uid);
    }
    const next: Cursor = { uidValidity, lastUid: Math.max(uidNext - 1, found.at(-1) ?? 0), at };
    await this.o.store.set(`cursor:${this.o.config.mailbox}`, JSON.stringify(next));
  }

  /** Hands one mail over (unless too large); resolves to its INTERNALDATE (ms). */
  private async fetchAndHandle(client: ImapFlow, uid: number): Promise<number> {
    const meta = await client.fetchOne(
      String(uid),
      { uid: true, size: true, internalDate: true, envelope: true },
      { uid: true },
    );
    if (!meta) return 0; // expunged meanwhile
    const size = meta.size ?? 0;
    if (size > this.o.config.maxMessageBytes) {
      const { envelope } = meta;
      await this.o.tooLarge(uid, size, {
        ...(envelope?.messageId && { messageId: envelope.messageId }),
        ...(envelope?.from?.[0]?.address && { from: envelope.from[0].address.toLowerCase() }),
        ...(envelope?.subject && { subject: envelope.subject }),
      });
    } else {
      const full = await client.fetchOne(String(uid), { uid: true, source: true }, { uid: true });
      if (full && full.source) await this.o.handle(full.source, uid);
    }
    return meta.internalDate ? new Date(meta.internalDate).getTime() : 0;
  }
}

/** A connection (not yet made) to the account's IMAP server, with its login. */
export function createImapClient(config: EmailAccount): ImapFlow {
  const { imap } = config;
  return new ImapFlow({
    host: imap.host,
    port: imap.port,
    secure: imap.security === "tls",
    ...(imap.security === "starttls" && { doSTARTTLS: true }),
    ...(imap.security === "none" && { doSTARTTLS: false }),
    auth: { user: imap.user, pass: imap.pass },
    tls: { rejectUnauthorized: imap.rejectUnauthorized, ...(imap.ca !== undefined && { ca: imap.ca }) },
    logger: false,
    // imapflow's default waits 15 s after each command before it IDLEs; mail arriving meanwhile waits too
    autoIdleDelay: EMAIL_DEFAULTS.idleDelayMs,
    connectionTimeout: EMAIL_DEFAULTS.connectTimeoutMs,
    greetingTimeout: EMAIL_DEFAULTS.connectTimeoutMs,
    clientInfo: { name: "tribridge" },
  });
}

/**
 * Whether the server refused the credentials (a tagged NO to LOGIN), which backs off for a minute.
 * Not when it says a part of it is down for now (RFC 5530 [UNAVAILABLE]: Dovecot's "Temporary
 * authentication failure" while its auth process starts): that is a server still coming up.
 */
export function loginRefusedBy(err: unknown): boolean {
  const e = err as { authenticationFailed?: unknown; serverResponseCode?: unknown };
  return e.authenticationFailed === true && e.serverResponseCode !== "UNAVAILABLE";
}
