/**
 * THE contract between tribridge's core and a protocol connector (MQTT, email, …).
 *
 * Read this file and nothing else to write a new connector. A connector is two things:
 *
 *  1. A `ConnectorDefinition` — pure declaration: its name, the schema of one account's config,
 *     the schema of one route endpoint, and a factory. No I/O, testable without a network.
 *  2. A `Connector` — one instance per configured account (`bridges.<name>.<account>`), which owns
 *     the sockets: it starts, watches the endpoints the routes give it, sends, and stops.
 *
 * The core never reads protocol fields (a topic, an address): it hands the connector the endpoint
 * objects its own schema produced and gets back opaque ids. The connector never sees Matrix: no
 * room ids in its logic, no Matrix imports. Everything that crosses between the two goes through a
 * durable queue, so a connector's `send` may be called again for a message it already sent (after a
 * crash) and its `emit` may be called again for a message it already emitted (after a redelivery):
 * use `OutboundMessage.id` and `InboundMessage.remoteId` to make that harmless.
 *
 * A connector module may import only `src/connector.ts`, `src/errors.ts`, `src/log.ts` and npm
 * packages (lint enforces this). Register it in `bridges/index.ts`; nothing else changes.
 *
 * Every connector passes the conformance suite in `test/conformance/`: describe your far side in a
 * `ConformanceTarget` (see `mqtt.test.ts` there) and call `connectorConformance` with it.
 */
import type { z } from "zod";
import type { Logger } from "./log.js";

/**
 * Which way an endpoint relays, seen from Matrix:
 * `in` — remote → room, `out` — room → remote, `inout` — both.
 */
export type Direction = "in" | "out" | "inout";

export function relaysIn(direction: Direction): boolean {
  switch (direction) {
    case "in":
    case "inout":
      return true;
    case "out":
      return false;
  }
}

export function relaysOut(direction: Direction): boolean {
  switch (direction) {
    case "out":
    case "inout":
      return true;
    case "in":
      return false;
  }
}

/**
 * The core's back-off, for a connector's own retry loops (e.g. reconnecting where its library does
 * not): `await setTimeout(backoffDelayMs(policy, attempt, err.retryAfterMs), undefined, { signal: ctx.signal })`
 * with `attempt` counting failures in a row (back to 1 after a success). Capped, exponential,
 * jittered, and never shorter than what the far side asked for. Never a tight loop without it.
 */
export { backoffDelayMs, type BackoffPolicy } from "./backoff.js";

/** What the far side can carry. The core adapts messages to it (e.g. drops HTML it cannot show). */
export interface Capabilities {
  /**
   * The far side can show HTML. When true, a room text, notice or emote posted with HTML
   * (`format: org.matrix.custom.html`) reaches `send` with `body.html` besides `body.text`: its
   * `formatted_body` sanitized to the same allowlist as inbound HTML (see `MessageBody.html`), the
   * reply fallback (`<mx-reply>`) removed, an emote prefixed like its text (`* Alice waves`). Links
   * and `mxc://` images are left as they are. Media captions go as text only. When false,
   * `OutboundMessage.body.html` is never set. Does not affect inbound HTML.
   */
  readonly html: boolean;
  /**
   * The far side can carry files. Out: a file, image, audio or video posted in a room is downloaded
   * and handed over in `OutboundMessage.attachments` (the body still names it). When false, only
   * the body is sent, naming the file and its mxc:// URI. In: `InboundMessage.attachments` are
   * posted in the room whatever this says.
   */
  readonly attachments: boolean;
  /**
   * Largest single file, in bytes, relayed either way; a message with a larger one fails
   * permanently, whole (the failed list names the file and its size), never relayed without it.
   * Out: a larger file is not downloaded (default 16 MiB). In: every attachment is checked against
   * it before any part of the message is posted; unset, only the homeserver's upload limit applies
   * (Synapse: `max_upload_size`, 50M by default), which fails the message the same way.
   */
  readonly maxAttachmentBytes?: number;
  /**
   * Most files in one message (at least 1; unset: no limit), either way. A message with more fails
   * permanently, whole, before any part of it is relayed. Out of rooms a message has at most one
   * file (a Matrix event carries one); into rooms, each file becomes an event of its own.
   */
  readonly maxAttachments?: number;
  /** Longest text the far side accepts, in UTF-8 bytes. Longer bodies fail the job permanently. */
  readonly maxTextBytes?: number;
  /**
   * The far side groups messages into conversations that live long (mail threads). Replies and
   * threads are mapped whatever this says (`replyTo`, `thread`); it decides how long the core
   * remembers which Matrix event each message is: 90 days when true, 7 days otherwise (a device's
   * telemetry would fill Redis with references nobody follows). Default false.
   */
  readonly threads?: boolean;
  /**
   * The far side can change a message it was sent: the core calls `Connector.edit` for Matrix
   * edits (`m.replace`, by the original's sender) of messages `send` delivered to that endpoint.
   * Default false: edits are not relayed.
   */
  readonly edits?: boolean;
  /**
   * The far side can take back (or clear) a message it was sent: the core calls
   * `Connector.redact` for Matrix redactions of messages `send` delivered to that endpoint.
   * Default false: redactions are not relayed.
   */
  readonly redactions?: boolean;
}

/**
 * One endpoint of one route, as handed to `Connector.watch`. `spec` is the object the
 * definition's `endpointSchema` produced from the route's config; `id` is opaque (no ':') and
 * stays the same across restarts and when the config reorders or inserts endpoints — it changes
 * only with the endpoint's identity (see `ConnectorDefinition.endpointKey`). Report it back in
 * `InboundMessage.endpointIds`.
 */
export interface EndpointBinding<E> {
  readonly id: string;
  readonly direction: Direction;
  readonly spec: E;
}

/** Who said something on the far side. Each distinct `id` becomes one Matrix ghost user. */
export interface RemoteSender {
  /** Stable within the account: an MQTT client id, a mail address. Any characters; the core escapes it. */
  readonly id: string;
  /** Shown as the ghost's display name. Defaults to `id`. */
  readonly displayName?: string;
}

export interface MessageBody {
  /**
   * Plain text; always present. Inbound, when it is empty (or only white space) and `html` shows
   * something, the core derives the room message's text from the sanitized HTML.
   */
  readonly text: string;
  /**
   * Optional HTML. Inbound, any HTML may be given: the core sanitizes it to the subset the Matrix
   * spec allows in `formatted_body` (Client-Server API §m.room.message msgtypes: its tags and
   * per-tag attributes, links to http(s)/ftp/mailto/magnet only, nesting at most 100 deep, where
   * deeper tags are dropped and their text kept) and posts it beside `text`. Scripts, styles, event
   * handlers and other elements outside the list go (their text stays, except for script, style,
   * iframe and the like); an image not on the media repository is never shown inline: a named
   * http(s) one becomes a link, others leave their alt text. Links to Matrix users become plain text
   * and the message mentions nobody. The room gets `text` alone when nothing shows after
   * sanitizing, when the HTML is over 1 MiB or nested over 1,000 deep, or when text and HTML
   * together do not fit one event. Outbound: set only for connectors with `capabilities.html`.
   */
  readonly html?: string;
  /** A machine message (telemetry, status) rather than something a person said: shown as m.notice. */
  readonly notice?: boolean;
}

/**
 * One file of a message. Into rooms it travels inside the queued job, in Redis (measured with
 * `bench/attachment-redis.ts`; README §Attachments): base64 makes it 4/3 of its size, so a 5 MiB
 * file takes 7.0 MiB of Redis memory while it waits (and as much on disk in the AOF until its next
 * rewrite), in a job of its own (over the queue's 128 KiB job size, nothing joins it); it counts in
 * full towards `queue.maxBacklogMb`, which holds new messages at their source when reached
 * (256 MiB: about 36 such files). Once posted its bytes are dropped (the completed job keeps name,
 * type and size: about 1 KiB); a message that failed keeps them in the failed list, for a retry,
 * until it is retried or pushed out by newer failures (`queue.keepFailedJobs`). Out of rooms
 * nothing is queued: the file is downloaded when the message is delivered.
 */
export interface Attachment {
  /** The name its sender gave the file (out of rooms, a Matrix client): never use it as a path. */
  readonly name: string;
  /** e.g. "image/jpeg": into rooms it chooses m.image, m.audio, m.video or m.file. */
  readonly mimeType: string;
  /** The bytes, base64, so the job stays JSON in Redis. */
  readonly dataBase64: string;
}

/** A message from the far side, handed to the core with `ConnectorContext.emit`. */
export interface InboundMessage {
  /** The `EndpointBinding.id`s this message matched (one message may match several routes). */
  readonly endpointIds: readonly string[];
  /**
   * Identity of this message within the account. Emitting the same `remoteId` twice (a redelivery
   * after a crash) relays it once. Different messages must never share one.
   */
  readonly remoteId: string;
  readonly sender: RemoteSender;
  /**
   * With `attachments`: the message's own words, posted before the files, or "" when the files are
   * all there is (a binary payload; a mail without text): with a blank text and no HTML that
   * shows, only the files are posted.
   */
  readonly body: MessageBody;
  /**
   * Files that came with the message (a mail's attachments, a binary payload), in order. A Matrix
   * event carries one file, so the core posts the text first (its event is the message's), then
   * one event per file (m.image, m.audio, m.video by `mimeType`, else m.file), all as the same
   * ghost, each idempotent on its own, so a retry posts none twice. Checked against
   * `maxAttachmentBytes`, `maxAttachments` and the homeserver's upload limit before anything is
   * posted: see `Capabilities`.
   */
  readonly attachments?: readonly Attachment[];
  /** When the far side says it happened (ms since epoch), if it says. */
  readonly timestamp?: number;
  /**
   * What the message is the latest reading of, within its sender (MQTT: the topic). An endpoint
   * with `live: true` keeps one room message per sender and stream, edited with each new reading.
   */
  readonly stream?: string;
  /**
   * The `remoteId` of the message this one answers, within the account (a mail's In-Reply-To),
   * when the far side says. Either one this connector emitted, or one `send` returned. When the
   * core knows it, the message is posted as a Matrix reply to that message's event, inside its
   * thread if it is in one. Unknown (never relayed, or forgotten: see `Capabilities.threads`):
   * posted as a plain message. Ignored on `live: true` endpoints.
   */
  readonly replyTo?: string;
  /**
   * The `remoteId` of the first message of the conversation this one belongs to (a mail's first
   * References entry), when the far side has conversations. When the core knows it and `replyTo`
   * does not already place the message in a thread, the message is posted in the Matrix thread of
   * that message's event (which becomes the thread's root; if that event is itself in a thread,
   * in that thread, as threads do not nest). Unknown: no thread. May equal `replyTo`. Ignored on
   * `live: true` endpoints.
   */
  readonly thread?: string;
  /**
   * The far side's answer to a message `send` delivered to the endpoints named (`replyTo` names
   * that message), come back by a way the endpoint's own config set up for answers (an MQTT 5
   * response topic): posted in the route's room like any message, also when the endpoint relays
   * only out of Matrix (`out`). Without it, a message emitted for an `out` endpoint is not relayed.
   */
  readonly response?: boolean;
}

/**
 * Whether a device on the far side is reachable, as Matrix presence says it: `online`; `unavailable`
 * (there, but idle or away); `offline` (gone: its will was published, it said goodbye).
 */
export type Availability = "online" | "offline" | "unavailable";

/**
 * A device's availability (an MQTT will, a `…/availability` topic), handed to the core with
 * `ConnectorContext.availability`: a state, not something said. It is never posted as a message of
 * its own.
 */
export interface AvailabilityUpdate {
  /** The `EndpointBinding.id`s the report came through, as for `InboundMessage.endpointIds`. */
  readonly endpointIds: readonly string[];
  /**
   * Whose availability: the device itself, with the same `id` its messages have (`InboundMessage
   * .sender`), so that it is the same ghost that speaks for it and shows as online or offline.
   */
  readonly sender: RemoteSender;
  readonly state: Availability;
  /**
   * Identity of this report within the account, as `InboundMessage.remoteId`: the same one twice
   * (a redelivery) is shown once. Distinct reports must not share one.
   */
  readonly remoteId: string;
  /** A word from the far side beside the state (a reason), if it gives one: shown with it. */
  readonly statusMessage?: string;
  /** When the far side says it changed (ms since epoch), if it says. */
  readonly timestamp?: number;
}

/** A message from a Matrix room, handed to `Connector.send` for one endpoint. */
export interface OutboundMessage {
  /**
   * Stable for this (Matrix event, endpoint) pair, also across retries and restarts. Use it to make
   * the far side idempotent where it can be (e.g. a Message-ID), and in logs.
   */
  readonly id: string;
  readonly sender: { readonly userId: string; readonly displayName: string };
  readonly body: MessageBody;
  /**
   * The room message's file, downloaded, when `capabilities.attachments` and `usesAttachments` say
   * the endpoint uses it (the body still names it). A Matrix event carries one file, so this holds
   * one today; read it as a list. Never more than `maxAttachments` nor larger than
   * `maxAttachmentBytes`: the core fails such a message before `send` is called.
   */
  readonly attachments?: readonly Attachment[];
  /** ms since epoch, from the Matrix event. */
  readonly timestamp: number;
  /**
   * The remote id of the message this one answers, in this endpoint's account: resolved by the
   * core from the event's `m.relates_to.m.in_reply_to` (in a thread: the reply target, or, when
   * the client only fell back to a reply, the latest message in the thread it knew). Either a
   * `remoteId` this account emitted or one its `send` returned (preferring this endpoint's).
   * Absent when the event answers nothing, or nothing this account relayed (or long ago).
   */
  readonly replyTo?: string;
  /**
   * The remote id of the root of the Matrix thread (`rel_type: m.thread`) the event is in, in this
   * endpoint's account, resolved as `replyTo` is. Absent when it is in no thread, or its root was
   * never relayed by this account.
   */
  readonly thread?: string;
}

/**
 * What `send` reports back. `remoteId`: the message's identity on the far side, within the account
 * (a Message-ID), stable for one `OutboundMessage.id` (a repeated send reports the same). The
 * core remembers it, so that a message that later answers it (`InboundMessage.replyTo`, `thread`)
 * is posted as a reply to this event, and so that edits and redactions of this event reach it
 * (`Connector.edit`, `redact`). Omit it when the far side has no way to refer to a message.
 */
export interface SendResult {
  readonly remoteId?: string;
}

/**
 * A Matrix edit (`m.replace`) of a message `send` delivered to this endpoint, for `Connector.edit`.
 */
export interface OutboundEdit {
  /** Stable for this (edit event, endpoint) pair, also across retries: as `OutboundMessage.id`. */
  readonly id: string;
  /** The `SendResult.remoteId` of the original message on this endpoint. */
  readonly remoteId: string;
  /** Who edited: the original's sender (the core relays no one else's edit: Matrix clients show none). */
  readonly sender: { readonly userId: string; readonly displayName: string };
  /** The whole new message (`m.new_content`), not a difference, rendered as `send`'s body. */
  readonly body: MessageBody;
  /** ms since epoch, from the edit event. */
  readonly timestamp: number;
}

/** A Matrix redaction of a message `send` delivered to this endpoint, for `Connector.redact`. */
export interface OutboundRedaction {
  /** Stable for this (redaction event, endpoint) pair, also across retries: as `OutboundMessage.id`. */
  readonly id: string;
  /** The `SendResult.remoteId` of the redacted message on this endpoint. */
  readonly remoteId: string;
  /** Who redacted: the original's sender, or a moderator. */
  readonly sender: { readonly userId: string; readonly displayName: string };
  /** The reason the redacting user gave, if any. */
  readonly reason?: string;
  /** ms since epoch, from the redaction event. */
  readonly timestamp: number;
}

/** A small durable key-value store, private to one connector account (IMAP cursors, dedupe maps). */
export interface KeyValueStore {
  get(key: string): Promise<string | undefined>;
  /** `ttlMs` omitted: kept until deleted. */
  set(key: string, value: string, ttlMs?: number): Promise<void>;
  delete(key: string): Promise<void>;
  /** All fields of a map (empty when absent). */
  getMap(key: string): Promise<Record<string, string>>;
  /** Sets fields of a map, in one write; `ttlMs` (re)starts the expiry of the whole map. */
  setInMap(key: string, fields: Record<string, string>, ttlMs?: number): Promise<void>;
  /** Adds one to a counter and (re)starts its expiry: e.g. one per message we expect back. */
  countUp(key: string, ttlMs: number): Promise<void>;
  /** Takes one off a counter, atomically: false when it was already zero (or expired). */
  countDown(key: string): Promise<boolean>;
}

export type ConnectorState = "connecting" | "up" | "degraded" | "down";

/** A Redis Cluster to connect to (ConnectorContext.redis.cluster). */
export interface RedisClusterNodes {
  /** Any of its primaries; ioredis finds the others. */
  readonly nodes: readonly { readonly host: string; readonly port: number }[];
  readonly username?: string;
  readonly password?: string;
  readonly tls: boolean;
}

/** What the core gives a connector instance. */
export interface ConnectorContext {
  /** Logger with `{ connector, account }` already bound. */
  readonly log: Logger;
  /** Aborted when the bridge stops: end reconnect loops and timers when it fires. */
  readonly signal: AbortSignal;
  readonly store: KeyValueStore;
  /**
   * The Redis the bridge runs on, for a connector whose own library needs durable state of its own
   * (e.g. a broker's retained messages). Keep every key under `keyPrefix`. Prefer `store` for small
   * things.
   *
   * `cluster`: present when the bridge runs on a Redis Cluster (`url` is then `redis+cluster://…`,
   * which ioredis' `Redis` does not read): connect with ioredis' `Cluster` to these nodes instead.
   * `keyPrefix` then carries the bridge's hash tag (`{tribridge}:…`), so every key under it lives in
   * one slot and MULTI, Lua scripts and multi-key commands over them work as on a single Redis. Do
   * not rely on SCAN or KEYS there: they see one node only.
   */
  readonly redis: {
    readonly url: string;
    readonly keyPrefix: string;
    readonly cluster?: RedisClusterNodes;
  };
  /**
   * Stable for one tribridge instance across restarts (from its host, data directory, queue prefix
   * and appservice port), different between instances sharing one Redis: tells instances apart on
   * a far side they share, e.g. in client ids.
   */
  readonly instanceId: string;
  /**
   * Hands a message to the core. Resolves only once the message is durably enqueued: acknowledge it
   * to the far side (PUBACK, IMAP cursor) only after that. Rejects when it could not be enqueued (Redis
   * down): then do not acknowledge, so the far side delivers it again. Never throws synchronously.
   * Slow resolution is back-pressure: stop reading while it is pending.
   */
  emit(message: InboundMessage): Promise<void>;
  /**
   * Keeps a message out of the rooms, visibly: for one the connector received but will not post
   * (a mail that matches no endpoint, a mail failing DMARC). Resolves once the message is durably
   * in the failed list of the to-matrix queue, with `reason`: `tribridge failed-jobs` and
   * `!tribridge failed` show it (`quarantined: <reason>`, with its data), nothing is posted, and
   * the far side may then be acknowledged (move the cursor on), as after `emit`. Rejects when it
   * could not be written (Redis down): do not acknowledge then. `message.endpointIds` may be empty
   * (it matched none); with endpoints, it is listed once per endpoint (and in that route's room's
   * `!tribridge failed`), else once, with no endpoint (listed in rooms that are no route's).
   * Calling it again for the same `remoteId` (read again after a crash) lists it once while it is
   * there. Log why yourself only if there is more to say: the core logs each one (a warning).
   *
   * Retrying it (`tribridge failed-jobs --retry`, `!tribridge retry`) is the operator's release:
   * one with an endpoint is posted there, as `emit` would have posted it. One with no endpoint
   * has nowhere to go: it fails again at once, at the end of the failed list, with its reason and
   * why it was not posted, and is never dropped silently.
   */
  quarantine(message: InboundMessage, reason: string): Promise<void>;
  /**
   * Reports a device's availability (optional: absent in a context that takes none, such as a test's
   * own; then post nothing, or the report as a plain message). Resolves, rejects and applies back-
   * pressure as `emit` does: acknowledge the far side only once it resolved. It goes through the same
   * queue, in order with the room's messages, and the core shows it as the sender's ghost in two
   * ways: its Matrix presence (`online`, `offline`, `unavailable`; kept up by the core while not
   * offline, as homeservers time out the presence of users that do not sync; a homeserver with
   * presence turned off gets none, without failing anything) and one status line per device and
   * room — a message of the ghost's, posted once and then edited with each change (not a message
   * per change). A report that repeats the state shown (retained values replayed at each
   * subscribe) changes nothing there. Reports still queued behind a newer one of the same device
   * and endpoint are skipped. Report each change once the far side says it; there is no need to
   * repeat a state to keep it.
   */
  availability?(update: AvailabilityUpdate): Promise<void>;
  /**
   * Reports connection health instead of throwing: "connecting" while (re)connecting, "up" when
   * relaying, "degraded" when partly working, "down" when it gave up until config changes.
   */
  setState(state: ConnectorState, reason?: string): void;
  /**
   * Runs `run` in one tribridge instance at a time, of all those sharing this Redis: for work that
   * must not happen twice, such as the one IMAP IDLE reader of a mailbox. `name` says what is
   * exclusive within this account (e.g. the mailbox, "INBOX"); instances compete for the same name.
   *
   * When: from `start` or `watch` (never from `create`), once per name; it returns at once. In the
   * background, the instances compete for a lease in Redis (`<prefix>:lease:<connector>.<account>:<name>`).
   * The holder calls `run(signal)`; the others wait, and try again every few seconds.
   *
   * Loss: when this instance can no longer be sure it holds the lease — Redis away or this process
   * stalled for longer than the lease (10 s), or the key gone — `signal` aborts. Stop at once (close
   * the connection, stop reading; returning or throwing is fine): another instance may start its
   * own `run` a moment later. When this instance takes the lease again, `run` is called again with
   * a new signal. A `run` that returns or throws while the lease is still held is logged and called
   * again after a back-off, the lease kept meanwhile.
   *
   * Handing over: an instance that dies hands `name` to another once its lease runs out (10 s after
   * its last renewal); one that stops (`ctx.signal`, or the handle's `stop()`) hands it over at once.
   *
   * Must not: do the guarded work outside `run`, or go on with it after `signal` aborts; keep `run`
   * from settling after the abort (the lease is given up, and competed for again, only once `run`
   * has settled: a `run` that hangs is logged, and blocks its name); call it again for a name that
   * runs, before that run's `stop()` has resolved (it throws). Progress that must survive a
   * handover (an IMAP cursor) belongs in `store`, written before it is acknowledged, as `emit` says.
   */
  runExclusive(name: string, run: (signal: AbortSignal) => Promise<void>): ExclusiveRun;
}

/** A name competed for with `ConnectorContext.runExclusive`. */
export interface ExclusiveRun {
  /** Whether this instance holds the name's lease now (and so runs `run`). */
  readonly held: boolean;
  /**
   * Stops competing for the name (e.g. a mailbox no longer watched): aborts `run` if it runs, waits
   * for it to settle and hands the lease over at once. Not needed at shutdown: `ctx.signal` does it.
   */
  stop(): Promise<void>;
}

/** One account's live connection. Created by `ConnectorDefinition.create`. */
export interface Connector<E> {
  /**
   * Opens connections / listeners. Called once, before `watch`. Resolve when ready to relay, or
   * reject with an Error whose message a user can act on (e.g. "port 1883 is already in use").
   * A far side that is merely unreachable should not reject: report `setState("connecting")` and
   * keep retrying with back-off until `ctx.signal` aborts.
   */
  start(): Promise<void>;
  /**
   * The endpoints routes bind to this account (all directions). Called after `start`, and again
   * whenever routes change, with the full new list (not a delta). Subscribe to what `in` endpoints
   * need; remember `out` endpoints for `send`.
   */
  watch(endpoints: readonly EndpointBinding<E>[]): Promise<void>;
  /**
   * Delivers one message to one endpoint. Called from a queue worker, one message at a time per
   * room, in order. Throw `PermanentError` when retrying cannot help (invalid address, rejected by
   * policy), `RetryableError` when it may (far side down, rate-limited). Must not resolve before the
   * far side has accepted the message as far as the protocol can tell (e.g. PUBACK for QoS 1).
   * Idempotent by `message.id`: the queue may hand over a message already sent (a crash between
   * the send and its record), and the far side must get it once (remember sent ids in `ctx.store`,
   * or give the far side an id it deduplicates by, such as a Message-ID).
   */
  send(message: OutboundMessage, endpoint: EndpointBinding<E>): Promise<SendResult>;
  /**
   * Changes a message `send` delivered to `endpoint` (a Matrix edit). Called only when the
   * definition's `capabilities.edits` is true and the original's `SendResult.remoteId` is known;
   * otherwise the edit is not relayed (nothing is lost: the far side never had the original, or
   * cannot change it). Called from the same queue as `send`, in the room's order, so after the
   * original's send; may be called again for the same `edit.id` (make that harmless). Errors as
   * for `send`. `remoteId` in the result: when the edit made a new message on the far side (a
   * correction mail), its id, so that an answer to it is posted as a reply to the original event.
   */
  edit?(edit: OutboundEdit, endpoint: EndpointBinding<E>): Promise<SendResult>;
  /**
   * Takes back a message `send` delivered to `endpoint` (a Matrix redaction): delete it, or clear
   * what it set, where the far side can. Called only when `capabilities.redactions` is true and
   * the original's `SendResult.remoteId` is known; otherwise not relayed. Same queue, order,
   * repeats and errors as `edit`. A redaction the endpoint has no use for resolves doing nothing.
   */
  redact?(redaction: OutboundRedaction, endpoint: EndpointBinding<E>): Promise<void>;
  /**
   * Whether messages to `endpoint` use `attachments` (when `capabilities.attachments`; default: all
   * endpoints). Lets the core skip downloading files that only their names reach.
   */
  usesAttachments?(endpoint: EndpointBinding<E>): boolean;
  /** Closes everything. Called once; after it resolves no `emit` may follow. */
  stop(): Promise<void>;
}

/** See ConnectorDefinition.sample. */
export interface SampleConfig {
  /** Under `bridges.<name>`, by account name. */
  readonly accounts: Readonly<Record<string, unknown>>;
  /** A route of its own: `id` (its room in the sample is `#<id>:example.org`) and its endpoints. */
  readonly route: {
    readonly id: string;
    /** Each with `account` (`<name>.<account>`), `direction` and the connector's own fields. */
    readonly endpoints: readonly Readonly<Record<string, unknown>>[];
  };
}

/**
 * One finding of `ConnectorDefinition.check`: `tribridge doctor` prints it as one line,
 * `✓ mqtt.home broker: …`, and for a warning or failure the fix on the next.
 */
export interface CheckResult {
  /** What was checked, in a word or two ("broker", "imap", "smtp"); printed after the account. */
  readonly name: string;
  /**
   * ok: works. warn: works, but should change (printed "!"; doctor still succeeds). fail: the
   * account will not work as configured (doctor exits non-zero).
   */
  readonly status: "ok" | "warn" | "fail";
  /** What was found, in the user's terms (host, port, user name; never a password). */
  readonly detail: string;
  /**
   * For warn and fail: what to do. Name keys as under the account (`embedded.port`, `imap.pass`):
   * doctor adds where the account's keys live (`bridges.<name>.<account>`, or the environment).
   */
  readonly fix?: string;
}

/** What `ConnectorDefinition.check` is given. */
export interface CheckContext {
  /** Logger with `{ connector, account }` bound; doctor shows it only when asked (TRIBRIDGE_LOG_LEVEL). */
  readonly log: Logger;
  /** Aborted when the check has taken too long (doctor waits 20 s per account): give up, report a fail. */
  readonly signal: AbortSignal;
  /**
   * Whether a tribridge with this config runs now, on this machine (its appservice port answers).
   * Then what it listens on is taken, by it: a port in use is no fault.
   */
  readonly bridgeRunning: boolean;
}

/** A named place on the far side (MSC2346 `network`, `channel`). */
export interface BridgedPlace {
  /** Stable and unique within its parent (the channel within the network); any characters. */
  readonly id: string;
  /** What a person reads; default: `id`. */
  readonly displayName?: string;
}

/** What ConnectorDefinition.describeEndpoint returns. */
export interface EndpointPlace {
  readonly network: BridgedPlace;
  readonly channel: BridgedPlace;
}

/** The declaration of a protocol. Pure: no I/O in any member, but `check`. */
export interface ConnectorDefinition<Account = unknown, E = unknown> {
  /** Lower-case name: config key `bridges.<name>`, account refs `<name>.<account>`, queue `to-<name>`. */
  readonly name: string;
  /** Short tag in ghost user ids: `@<ghostPrefix><ghostTag>_<account>_<sender>`. */
  readonly ghostTag: string;
  /** One-line description for the sample config and docs. */
  readonly description: string;
  readonly capabilities: Capabilities;
  /** Schema of `bridges.<name>.<account>`. Supplies defaults; the sample config is generated from it. */
  readonly accountSchema: z.ZodType<Account>;
  /**
   * Schema of the connector's own fields in a route endpoint (besides `account`, `direction`, `id`,
   * `live` and `notices`, which the core owns). Must not use those keys.
   */
  readonly endpointSchema: z.ZodType<E>;
  /**
   * What makes an endpoint the *same* endpoint from one config to the next: the fields that say
   * where messages go to or come from (MQTT: the topic), not how they look or how hard the far side
   * is tried (a payload format, a QoS). The core hashes it, with the account and direction, into
   * the endpoint's id (`<route>.<hash>`, see `EndpointBinding.id`), unless the config gives the
   * endpoint an explicit `id`. Messages queued or failed for an endpoint follow that id: change the
   * key and they no longer reach it (they wait in the failed list as "no longer configured").
   *
   * Called while the config is loaded, once per endpoint, after `endpointSchema` (defaults are
   * filled) and `checkEndpoint`. Pure and deterministic: the same string for the same endpoint on
   * every machine, at every start, and in later versions of the connector (a new key for an old
   * config re-identifies its endpoints). Leave out only fields that cannot tell two endpoints
   * apart: two endpoints of one route with the same account, direction and key are a config error
   * (the user is told to give one an explicit `id`). Any characters; the core hashes it.
   *
   * Omitted: the whole endpoint, as canonical JSON (keys sorted). Safe, but any change of any
   * field, even a cosmetic one, then makes it a new endpoint.
   */
  endpointKey?(endpoint: E): string;
  /**
   * Where an endpoint leads, as a Matrix client shows a bridged room (MSC2346 `m.bridge` state
   * events): the network (a broker, a mailbox) and the channel within it (a topic, the addresses).
   * The core sets one state event per route room and distinct channel, keyed by the connector's
   * `name`, the network id and the channel id; it never reads the endpoint's fields itself.
   *
   * Called at start, once per endpoint of a route whose room the bot is in. Pure: no I/O, no
   * secrets (a password, a token in a URL) in what it returns — every member of the room reads it.
   * Ids are compared as given: keep them stable (they key the state event; a new id leaves a new
   * event, and the core clears the one no endpoint describes any more). MSC2346 asks for lower-case
   * ids; lower-case what is case-insensitive on the far side (a host, a mail domain), not what is
   * not (an MQTT topic).
   *
   * Omitted: network = the account's name, channel = the endpoint's id.
   */
  describeEndpoint?(endpoint: E, account: { readonly name: string; readonly config: Account }): EndpointPlace;
  /** The protocol's name as people know it ("MQTT", "Email"), in `m.bridge`. Default: `name`. */
  readonly displayName?: string;
  /**
   * How a room links itself to this protocol: `!tribridge link <name>.<account> <target>
   * [in|out|inout] [key=value…]` (an admin's command in the room). `target` is what the user calls
   * the one argument every endpoint needs ("topic", "address"), for help and answers; `fields` turns
   * it into the endpoint's raw fields (MQTT `{ topic }`, email `{ to: [address] }`), before
   * `endpointSchema`. The core adds the `key=value` options (a key may not be one `fields` set)
   * and validates the whole as a config file's endpoint: `endpointSchema`, then `checkEndpoint`.
   * Pure, no I/O. Omit it and this protocol cannot be linked from a room (config file routes only).
   */
  readonly link?: {
    readonly target: string;
    fields(target: string): Record<string, unknown>;
  };
  /**
   * Accounts to run when the config has no `bridges.<name>` block at all, e.g. an embedded broker.
   * Omit for a connector that needs explicit configuration.
   */
  readonly defaultAccounts?: Readonly<Record<string, Account>>;
  /**
   * This protocol's part of the generated sample config (`config/config.sample.yaml`, `npm run
   * gen:config`): example accounts and one example route's endpoints, written as a user writes
   * them; the generator adds every default and the schema's descriptions as comments. Omit it and
   * the sample has no `bridges.<name>` block and no route for this protocol.
   *
   * The sample must pass `validate-config` as a user copies it (a test checks): no `<key>File`
   * here, since its file would not exist there; explain secrets in the schema's `describe` instead.
   */
  readonly sample?: SampleConfig;
  /**
   * Checks that need more than the schema: a field that depends on the direction, or on the account
   * (e.g. `sender: clientId` only for an embedded broker). Return problems as `[relativePath, reason]`;
   * the core prefixes the endpoint's path.
   */
  checkEndpoint?(endpoint: E, direction: Direction, account: Account): [path: string, reason: string][];
  /**
   * `tribridge doctor`: whether this account can work as configured, found out without starting
   * it: the far side answers and takes the account's credentials (log in, then out), a port it is
   * to listen on is free. Called once per configured account, in a process that runs nothing else
   * of the bridge, possibly while the bridge itself runs (see `ctx.bridgeRunning`): do not take
   * over anything of the running bridge's (connect with a client id of your own, not the one its
   * session lives under). No effect on the far side beyond a login: nothing sent, published,
   * subscribed or marked read. Never throws: each problem is a `fail` result with a `fix`. Close
   * everything it opened before it resolves, also when `ctx.signal` aborts. Omitted: the account
   * is not checked.
   */
  check?(account: string, config: Account, ctx: CheckContext): Promise<CheckResult[]>;
  /** Builds the live instance. No I/O here: `start` does that. */
  create(account: string, config: Account, ctx: ConnectorContext): Connector<E>;
}
