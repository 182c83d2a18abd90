import { setTimeout as sleep } from "node:timers/promises";
import type {
  Connector,
  ConnectorContext,
  ConnectorState,
  EndpointBinding,
  ExclusiveRun,
  InboundMessage,
  MessageBody,
  OutboundMessage,
  SendResult,
} from "../../src/connector.js";
import { backoffDelayMs, relaysIn } from "../../src/connector.js";
import { PermanentError, errorMessage } from "../../src/errors.js";
import { LogLimiter, type Logger } from "../../src/log.js";
import { dmarcOf } from "./auth-results.js";
import { parseMail, type IncomingMail } from "./incoming.js";
import { MailboxReader } from "./mailbox-reader.js";
import {
  messageIdFor,
  messageIdOfContent,
  messageIdsIn,
  plusAddress,
  splitAddress,
  tokenOf,
} from "./message-ids.js";
import type { EmailAccount, EmailEndpoint } from "./schema.js";
import { classifySmtpError, createSmtpTransport, type MailOptions, type SmtpTransport } from "./smtp.js";
import { MailRecords, THREAD_MEMORY_MS, threadingFor } from "./threads.js";

/** How long a sent message's id is remembered, so that the queue handing it over again sends nothing. */
const SENT_TTL_MS = 7 * 24 * 3600_000;
/** How long a relayed mail's Message-ID is remembered: a redelivery, or a rescan, relays it once. */
const SEEN_TTL_MS = THREAD_MEMORY_MS;
const SMTP_PROBE = { initialDelayMs: 1_000, maxDelayMs: 60_000 };

type Binding = EndpointBinding<EmailEndpoint>;

/**
 * One mailbox: room messages go out by SMTP (`send`), mail comes in by IMAP (one reader across
 * instances). Threads are kept with Message-IDs: the core maps them to Matrix events (remote ids),
 * and the store says which endpoint each mail belongs to, so that an answer lands where its thread is.
 */
export class EmailConnector implements Connector<EmailEndpoint> {
  private transport: SmtpTransport | undefined;
  private inbound: Binding[] = [];
  private reader: MailboxReader | undefined;
  private readerRun: ExclusiveRun | undefined;
  private readonly records: MailRecords;
  private readonly domain: string;
  private readonly health: { imap?: ConnectorState; smtp: ConnectorState } = { smtp: "connecting" };
  private stopped = false;
  private probing = false;
  /** Auto-replies and bounces come in floods: one line a minute per kind. */
  private readonly automaticLog = new LogLimiter();

  constructor(
    private readonly config: EmailAccount,
    private readonly ctx: ConnectorContext,
  ) {
    this.records = new MailRecords(ctx.store);
    this.domain = splitAddress(config.address)[1];
  }

  async start(): Promise<void> {
    const { ctx, config } = this;
    ctx.setState("connecting");
    for (const side of ["imap", "smtp"] as const)
      if (config[side].security === "none")
        ctx.log.info({ host: config[side].host }, `${side} without encryption (security: none)`);
    this.transport = createSmtpTransport(config);
    void this.probeSmtp();
    this.reader = new MailboxReader({
      config,
      store: ctx.store,
      log: ctx.log,
      reading: () => this.inbound.length > 0 && !this.stopped,
      handle: (source, uid) => this.ingest(source, uid),
      tooLarge: (uid, size, about) =>
        this.unreadable(uid, size, about, "larger than maxMessageBytes: not fetched"),
      setState: (state, reason) => this.report("imap", state, reason),
    });
    const reader = this.reader;
    this.readerRun = ctx.runExclusive(config.mailbox, async (signal) => {
      try {
        await reader.run(signal);
      } finally {
        // Another instance reads the mailbox now: only sending is this one's to report.
        this.report("imap", undefined);
      }
    });
  }

  async watch(endpoints: readonly Binding[]): Promise<void> {
    this.inbound = endpoints.filter((e) => relaysIn(e.direction));
    this.reader?.poke();
  }

  /** Until the SMTP server answers: checked at start, and again (backing off) after a send found it away. */
  private async probeSmtp(): Promise<void> {
    if (this.probing) return;
    this.probing = true;
    try {
      for (let failures = 0; !this.ctx.signal.aborted && this.transport;) {
        try {
          await this.transport.verify();
          this.report("smtp", "up");
          return;
        } catch (err) {
          failures++;
          this.report("smtp", "connecting", `smtp: ${errorMessage(err)}`);
          await sleep(backoffDelayMs(SMTP_PROBE, failures), undefined, { signal: this.ctx.signal }).catch(
            () => undefined,
          );
        }
      }
    } finally {
      this.probing = false;
    }
  }

  private report(side: "imap" | "smtp", state: ConnectorState | undefined, reason?: string): void {
    if (side === "imap") this.health.imap = state;
    else if (state) this.health.smtp = state;
    if (this.stopped) return;
    const order: ConnectorState[] = ["down", "connecting", "degraded", "up"];
    const states = [this.health.smtp, ...(this.health.imap ? [this.health.imap] : [])];
    const worst = order.find((s) => states.includes(s)) ?? "up";
    this.ctx.setState(worst, worst === "up" ? undefined : reason);
  }

  async send(message: OutboundMessage, endpoint: Binding): Promise<SendResult> {
    const sentKey = `sent:${message.id}`;
    const sent = await this.ctx.store.get(sentKey);
    if (sent !== undefined) return { remoteId: sent };
    const transport = this.transport;
    if (!transport) throw new Error("email connector not started");
    const messageId = messageIdFor(message.id, this.domain);
    const threading = await threadingFor(message, endpoint, this.records);
    const { spec } = endpoint;
    const mail: MailOptions = {
      messageId,
      from: { name: message.sender.displayName, address: this.config.address },
      to: [...spec.to],
      ...(spec.cc.length > 0 && { cc: [...spec.cc] }),
      ...(spec.token !== undefined && { replyTo: plusAddress(this.config.address, spec.token) }),
      subject: threading.subject,
      ...(threading.inReplyTo !== undefined && {
        inReplyTo: threading.inReplyTo,
        references: [...threading.references],
      }),
      date: new Date(message.timestamp),
      text: message.body.text,
      ...(message.body.html !== undefined && { html: message.body.html }),
      headers: { "X-Matrix-Sender": message.sender.userId },
      attachments: (message.attachments ?? []).map((a) => ({
        filename: a.name,
        contentType: a.mimeType,
        content: Buffer.from(a.dataBase64, "base64"),
      })),
    };
    // Recorded first: an answer may come back before the send has returned.
    await this.records.put(messageId, {
      endpoint: endpoint.id,
      ...(spec.token !== undefined && { token: spec.token }),
      subject: threading.subject,
      refs: threading.references,
      own: true,
    });
    try {
      const info = await transport.sendMail(mail);
      if (info.rejected.length > 0)
        this.ctx.log.warn({ rejected: info.rejected, messageId }, "some recipients were refused");
    } catch (err) {
      const classified = classifySmtpError(err);
      if (!(classified instanceof PermanentError) && !this.ctx.signal.aborted) {
        this.report("smtp", "connecting", classified.message);
        void this.probeSmtp();
      }
      throw classified;
    }
    this.report("smtp", "up");
    if (spec.threading === "route") {
      const thread = await this.records.routeThread(endpoint.id);
      await this.records.setRouteThread(endpoint.id, { root: thread?.root ?? messageId, last: messageId });
    }
    await this.ctx.store.set(sentKey, messageId, SENT_TTL_MS);
    return { remoteId: messageId };
  }

  /**
   * A mail that is not read (too large, or beyond the parser's limits): logged, and listed in the
   * failed list with what its envelope says, so that it is seen; it stays in the mailbox.
   */
  private async unreadable(
    uid: number,
    size: number,
    about: { messageId?: string; from?: string; subject?: string },
    why: string,
  ): Promise<void> {
    const messageId = messageIdsIn(about.messageId)[0] ?? `<tb.uid${uid}.${size}@tribridge.invalid>`;
    this.ctx.log.warn(
      { uid, size, messageId, from: about.from, why },
      "mail not relayed, left in the mailbox",
    );
    if ((await this.ctx.store.get(`seen:${messageId}`)) !== undefined) return;
    const subject = (about.subject ?? "").slice(0, 200);
    await this.ctx.quarantine(
      {
        endpointIds: [],
        remoteId: messageId,
        sender: about.from ? { id: about.from } : { id: "unknown-sender", displayName: "(unknown sender)" },
        body: {
          text: `(a mail of ${size} bytes, subject "${subject}", UID ${uid} in ${this.config.mailbox})`,
        },
      },
      `mail of ${size} bytes ${why}; it is in the mailbox (search its Message-ID ${messageId})`,
    );
    await this.ctx.store.set(`seen:${messageId}`, "1", SEEN_TTL_MS);
  }

  /** One mail from the mailbox: relayed to the endpoints it belongs to, once. */
  private async ingest(source: Buffer, uid: number): Promise<void> {
    let mail: IncomingMail;
    try {
      mail = await parseMail(source);
    } catch (err) {
      await this.unreadable(
        uid,
        source.length,
        { messageId: messageIdOfContent(source) },
        `not readable: ${errorMessage(err)}`,
      );
      return;
    }
    const log = this.ctx.log.child({ uid, messageId: mail.messageId });
    if ((await this.ctx.store.get(`seen:${mail.messageId}`)) !== undefined) {
      log.debug("mail already relayed");
      return;
    }
    const known = await this.records.get(mail.messageId);
    if (known?.own) {
      log.debug("the bridge's own mail came back: not relayed");
      return;
    }
    if (mail.automatic !== undefined) {
      const pass = this.automaticLog.pass(mail.automatic);
      if (pass)
        log.info(
          { from: mail.sender.id, why: mail.automatic, heldBack: pass.heldBack },
          "mail written by a machine: not relayed, left in the mailbox",
        );
      return;
    }
    const matched = await this.endpointsFor(mail);
    if (this.stopped) throw new Error("stopped");
    if (matched.length === 0) {
      await this.quarantine(
        mail,
        [],
        `mail to ${mail.recipients.join(", ") || "(no recipient)"} from ${mail.sender.id} answers nothing the bridge knows, ` +
          "has no endpoint's token, and no endpoint takes the rest (default)",
      );
      await this.ctx.store.set(`seen:${mail.messageId}`, "1", SEEN_TTL_MS);
      return;
    }
    const { targets, labelled } = await this.screen(mail, matched, log);
    if (targets.length === 0) return;
    for (const binding of targets) await this.ctx.emit(this.messageFor(labelled ?? mail, binding));
    const [first] = targets;
    await this.records.put(mail.messageId, {
      endpoint: first!.id,
      ...(first!.spec.token !== undefined && { token: first!.spec.token }),
      subject: mail.subject,
      refs: mail.references,
    });
    await this.ctx.store.set(`seen:${mail.messageId}`, "1", SEEN_TTL_MS);
    log.info({ from: mail.sender.id, endpoints: targets.map((b) => b.id) }, "mail relayed");
  }

  /**
   * The endpoints a matched mail is posted to, once list mail, DMARC and the senders allowlists
   * had their say; what they keep out is logged, or quarantined with the reason. `labelled`: the
   * mail with a warning line first (`dmarcPolicy: label`).
   */
  private async screen(
    mail: IncomingMail,
    matched: readonly Binding[],
    log: Logger,
  ): Promise<{ targets: Binding[]; labelled?: IncomingMail }> {
    let targets = [...matched];
    let labelled: IncomingMail | undefined;
    if (mail.list !== undefined) {
      targets = targets.filter((b) => b.spec.allowLists);
      if (targets.length < matched.length) {
        const pass = this.automaticLog.pass(`list:${mail.list}`);
        if (pass)
          log.info(
            { from: mail.sender.id, why: mail.list, heldBack: pass.heldBack },
            "list or bulk mail, and its endpoint has no allowLists: not relayed, left in the mailbox",
          );
      }
      if (targets.length === 0) return { targets };
    }
    const { authservId, dmarcPolicy } = this.config;
    const dmarc = authservId === undefined ? undefined : dmarcOf(mail.authResults, authservId);
    if (dmarc?.result === "fail") {
      const reason = `DMARC failed for ${dmarc.domain ?? mail.sender.id} (Authentication-Results of ${authservId}): the sender may be forged`;
      switch (dmarcPolicy) {
        case "reject":
          log.warn({ from: mail.sender.id, dmarcPolicy }, `${reason}: not relayed, left in the mailbox`);
          return { targets: [] };
        case "quarantine":
          await this.quarantine(mail, targets, reason);
          await this.ctx.store.set(`seen:${mail.messageId}`, "1", SEEN_TTL_MS);
          return { targets: [] };
        case "label":
          log.info({ from: mail.sender.id, dmarcPolicy }, `${reason}: relayed with a warning`);
          labelled = { ...mail, body: withWarning(mail.body, `⚠ ${reason}.`) };
      }
    }
    const refused = targets.filter((b) => !senderAllowed(b.spec.senders, mail.sender.id));
    if (refused.length > 0) {
      await this.quarantine(mail, refused, `the sender ${mail.sender.id} is not in the endpoint's senders`);
      targets = targets.filter((b) => !refused.includes(b));
      if (targets.length === 0) await this.ctx.store.set(`seen:${mail.messageId}`, "1", SEEN_TTL_MS);
    }
    return { targets, ...(labelled && { labelled }) };
  }

  /** The message of a mail for one endpoint (none: for the failed list only). */
  private messageFor(mail: IncomingMail, binding: Binding | undefined): InboundMessage {
    return {
      endpointIds: binding ? [binding.id] : [],
      remoteId: mail.messageId,
      sender: mail.sender,
      body: mail.body,
      ...(mail.attachments.length > 0 && { attachments: mail.attachments }),
      ...(mail.timestamp !== undefined && { timestamp: mail.timestamp }),
      ...(mail.inReplyTo !== undefined && { replyTo: mail.inReplyTo }),
      // With threading: route the room is the thread: only replies say where a mail belongs.
      ...(binding?.spec.threading === "thread" &&
        mail.references[0] !== undefined && { thread: mail.references[0] }),
    };
  }

  /**
   * A mail kept out of the rooms, into the failed list with the reason (the core logs it). With
   * endpoints, whole, so that a retry posts it there; with none, a retry cannot post it, so its
   * files are left out of Redis (the mail itself stays in the mailbox).
   */
  private async quarantine(mail: IncomingMail, bindings: readonly Binding[], reason: string): Promise<void> {
    if (bindings.length > 0) {
      for (const binding of bindings) await this.ctx.quarantine(this.messageFor(mail, binding), reason);
      return;
    }
    const files = mail.attachments.map((a) => a.name);
    const { attachments: _files, ...withoutFiles } = this.messageFor(mail, undefined);
    await this.ctx.quarantine(
      withoutFiles,
      files.length > 0
        ? `${reason}; its files (${files.join(", ")}) are in the mail, in the mailbox`
        : reason,
    );
  }

  /**
   * Where a mail belongs: the endpoint of the mail it answers (In-Reply-To, then References, latest
   * first), else the endpoint whose token it was sent to (a plus-address), else the default ones.
   */
  private async endpointsFor(mail: IncomingMail): Promise<Binding[]> {
    const answered = [
      ...(mail.inReplyTo !== undefined ? [mail.inReplyTo] : []),
      ...[...mail.references].reverse(),
    ];
    for (const id of new Set(answered)) {
      const record = await this.records.get(id);
      if (!record) continue;
      const found = this.inbound.filter(
        (b) => b.id === record.endpoint || (record.token !== undefined && b.spec.token === record.token),
      );
      if (found.length > 0) return found;
    }
    const tokens = new Set(mail.recipients.flatMap((r) => tokenOf(r, this.config.address) ?? []));
    const byToken = this.inbound.filter((b) => b.spec.token !== undefined && tokens.has(b.spec.token));
    if (byToken.length > 0) return byToken;
    return this.inbound.filter((b) => b.spec.default);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.readerRun?.stop();
    this.transport?.close();
    this.transport = undefined;
  }
}

/** Whether `senders` (addresses and @domains; unset: anyone) lets `address` in. */
export function senderAllowed(senders: readonly string[] | undefined, address: string): boolean {
  if (senders === undefined) return true;
  const at = address.lastIndexOf("@");
  const domain = at < 0 ? undefined : address.slice(at);
  return senders.some((s) => s === address || (s.startsWith("@") && s === domain));
}

/** The body with a warning line first, in the text and (escaped) in the HTML. */
function withWarning(body: MessageBody, warning: string): MessageBody {
  const escaped = warning.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  return {
    ...body,
    text: `${warning}\n\n${body.text}`,
    ...(body.html !== undefined && { html: `<p><strong>${escaped}</strong></p>${body.html}` }),
  };
}
