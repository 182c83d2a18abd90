/**
 * Queue → Matrix: posts a remote message in its route's room as the sender's ghost: its text, then
 * one event per attachment. One call per queued item; each event's transaction id is derived from
 * the item id, so a repeat cannot post any of them twice.
 */
import { BoundedCache } from "../bounded-cache.js";
import type { Attachment, ConnectorDefinition, MessageBody } from "../connector.js";
import { PermanentError } from "../errors.js";
import type { RouteTable } from "../routing/route-table.js";
import { retentionFor, type AccountMessages, type MessageMap } from "../store/message-map.js";
import { aboutFile, attachmentBytes, checkAttachments, uploadAttachment } from "./attachments.js";
import type { AvailabilityJob, DeviceAvailability } from "./availability.js";
import { fileContent, toMatrixContent } from "./format.js";
import { ghostUserId, type GhostNaming } from "./ids.js";
import type { EncryptedRooms } from "./encrypted-rooms.js";
import { editLiveMessage, type LiveMessages } from "./live-messages.js";
import type { MatrixClient } from "./matrix-client.js";
import { inboundRelation } from "./relations.js";

/** A remote message on its way into a room (the to-matrix queue's item). */
export interface ToMatrixJob {
  endpointId: string;
  connector: string;
  account: string;
  sender: { id: string; displayName?: string };
  body: MessageBody;
  /** See InboundMessage.attachments: each travels base64 in the job (what that costs: README). */
  attachments?: readonly Attachment[];
  /** One file that was the whole message, as versions before `attachments` queued it (still read). */
  attachment?: Attachment;
  /** In a completed job, in place of its files: what they were, without their bytes. */
  delivered?: { name: string; mimeType: string; bytes: number }[];
  /** See InboundMessage.stream. */
  stream?: string;
  /** See InboundMessage.remoteId; absent in items queued by tribridge 0.1 (then not remembered). */
  remoteId?: string;
  /** See InboundMessage.replyTo. */
  replyTo?: string;
  /** See InboundMessage.thread. */
  thread?: string;
  /** See InboundMessage.response. */
  response?: boolean;
  /** A device's availability (ConnectorContext.availability), not a message: `body` only names it. */
  availability?: AvailabilityJob;
}

/**
 * The transaction id of a message's `n`-th event (its text, then one per file): the item's id for
 * the first (as before messages had several), `<item>-<n>` after it, so that a repeat after a
 * crash between two of them posts none twice.
 */
function partTxnId(itemId: string, n: number): string {
  return n === 0 ? itemId : `${itemId}-${n}`;
}

function filesOf(job: ToMatrixJob): readonly Attachment[] {
  return job.attachments ?? (job.attachment ? [job.attachment] : []);
}

/**
 * What a completed job keeps of a delivered item (OrderedQueue's `keptWhenDelivered`): its files'
 * names, types and sizes, not their bytes, which `queue.keepCompletedJobs` per shard would
 * otherwise hold in Redis long after they are in the homeserver's media repository.
 */
export function keptWhenDelivered(job: ToMatrixJob): ToMatrixJob | undefined {
  const files = filesOf(job);
  if (files.length === 0) return undefined;
  const { attachments: _files, attachment: _file, ...rest } = job;
  const delivered = files.map((f) => ({ name: f.name, mimeType: f.mimeType, bytes: attachmentBytes(f) }));
  return { ...rest, delivered };
}

/**
 * A far side's name as a ghost's display name: without control and bidirectional-override
 * characters (a device named "Admin\u202e…" must not read as something else in a client), and
 * within Synapse's 256 characters.
 */
export function displayNameOf(name: string): string {
  const shown = name.replace(/[\p{Cc}\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/gu, "").trim();
  return (shown || "device").slice(0, 256);
}

/** The longest text posted as a message; room for the event's other fields and signatures. */
const MAX_TEXT_BYTES = 60_000;

/** A chain of upgrades longer than this is not followed further (a loop of tombstones, say). */
const MAX_UPGRADE_HOPS = 10;

export class RoomDelivery {
  private readonly ghostTags: Map<string, string>;
  private readonly definitions: Map<string, ConnectorDefinition>;
  /** Ghost user ids by connector tag, account and sender: a handful of devices send most messages. */
  private readonly ghostIds = new BoundedCache<string, string>();

  constructor(
    private readonly matrix: MatrixClient,
    private readonly routes: RouteTable,
    private readonly naming: GhostNaming,
    connectors: readonly ConnectorDefinition[],
    private readonly live: LiveMessages,
    private readonly messages: MessageMap,
    /** Refuses a room with end-to-end encryption: nothing is posted into it in plaintext. */
    private readonly encryption?: Pick<EncryptedRooms, "refusePlaintext">,
    /** Shows availability reports; without it they fail (a core that takes none never queues one). */
    private readonly devices?: DeviceAvailability,
  ) {
    this.ghostTags = new Map(connectors.map((c) => [c.name, c.ghostTag]));
    this.definitions = new Map(connectors.map((c) => [c.name, c]));
  }

  private messagesOf(job: ToMatrixJob): AccountMessages {
    const capabilities = this.definitions.get(job.connector)?.capabilities ?? {};
    return this.messages.account(`${job.connector}.${job.account}`, retentionFor(capabilities));
  }

  /**
   * The route's room id, with the bot joined. Learnt once (following room upgrades: a configured
   * room id, or an alias not moved along, may name a room that was replaced); the join is retried
   * until it works.
   */
  async roomIdFor(routeId: string): Promise<string> {
    let roomId = this.routes.roomIdOf(routeId);
    if (!roomId) {
      const route = this.routes.routes.find((r) => r.id === routeId)!;
      roomId = await this.matrix.resolveOrCreateRoom(route.room, route.invite);
      this.routes.setRoomId(routeId, roomId); // known before joining, so an invite to it is recognised
      await this.matrix.joinBot(roomId);
      for (let hops = 0; hops < MAX_UPGRADE_HOPS; hops++) {
        const replacement = await this.matrix.replacementOf(roomId);
        if (!replacement) break;
        this.routes.replaceRoom(roomId, replacement);
        roomId = replacement;
        await this.matrix.joinBot(roomId);
      }
    }
    await this.matrix.joinBot(roomId);
    return roomId;
  }

  /**
   * A text too long for one event (65,536 bytes in all, Client-Server API §Size limits; an edit
   * carries it twice) goes whole, as a text file, rather than being refused or cut.
   */
  private textAsFile(job: ToMatrixJob, live: boolean): Attachment | undefined {
    const bytes = Buffer.byteLength(job.body.text);
    if (bytes <= (live ? MAX_TEXT_BYTES / 2 : MAX_TEXT_BYTES)) return undefined;
    const name = `${(job.stream ?? job.sender.id).replace(/[^A-Za-z0-9._-]+/g, "_")}.txt`;
    return { name, mimeType: "text/plain", dataBase64: Buffer.from(job.body.text).toString("base64") };
  }

  async deliver(job: ToMatrixJob, txnId: string): Promise<void> {
    if (job.delivered)
      throw new PermanentError("a completed job's record, without its files: delivered before");
    const found = this.routes.queuedInbound(job.endpointId, job);
    const tag = this.ghostTags.get(job.connector);
    if (!tag) throw new PermanentError(`connector ${job.connector} is not installed`);
    const files = filesOf(job);
    // Before anything is posted: a message is relayed whole or not at all.
    checkAttachments(
      files.map((f) => ({ name: f.name, bytes: attachmentBytes(f) })),
      this.definitions.get(job.connector)?.capabilities ?? {},
      `the ${job.connector} connector`,
    );
    const roomId = await this.roomIdFor(found.route.id);
    await this.encryption?.refusePlaintext(roomId);
    const sender = {
      userId: this.ghostIds.get(`${tag}\u0000${job.account}\u0000${job.sender.id}`, () =>
        ghostUserId(this.naming, tag, job.account, job.sender.id),
      ),
      displayName: displayNameOf(job.sender.displayName ?? job.sender.id),
    };
    if (job.availability) {
      if (!this.devices) throw new PermanentError("availability reports are not shown here");
      const line = { endpointId: found.endpoint.id, senderId: job.sender.id };
      return this.devices.show(job.availability, sender, roomId, line, txnId);
    }
    // Text and HTML within what textAsFile allows the text alone: an edit carries both twice.
    const text = toMatrixContent(job.body, found.endpoint.live ? MAX_TEXT_BYTES / 2 : MAX_TEXT_BYTES);
    // The text first, unless the files are all there is: nothing said (an MQTT binary payload), or
    // an item of an earlier version with `attachment`, which was its file alone.
    const withText = files.length === 0 || (!job.attachment && String(text.body).trim() !== "");
    const textFile = withText ? this.textAsFile(job, found.endpoint.live) : undefined;
    // All files are uploaded before any event is sent: one the homeserver refuses (413 M_TOO_LARGE
    // over its upload limit) fails the message with nothing of it in the room.
    const contents: Record<string, unknown>[] = [];
    if (withText && !textFile) contents.push(text);
    const uploads = textFile ? [textFile, ...files] : files;
    // Files go encrypted where the events are (decided once, for the whole message).
    const encrypted = uploads.length > 0 && (await this.matrix.encryptsIn(roomId));
    for (const file of uploads) {
      const data = Buffer.from(file.dataBase64, "base64");
      try {
        const media = await uploadAttachment(this.matrix, sender, encrypted, data, file.name, file.mimeType);
        contents.push(fileContent(file.name, file.mimeType, data.byteLength, media));
      } catch (err) {
        throw aboutFile(file.name, data.byteLength, err);
      }
    }
    // A live endpoint's stream keeps one message per room, edited with each reading (see
    // LiveMessages); after a room upgrade the stream starts over in the new room.
    const stream = found.endpoint.live
      ? { roomId, endpointId: found.endpoint.id, senderId: job.sender.id, stream: job.stream ?? "" }
      : undefined;
    if (!stream) return this.post(job, sender, roomId, contents, txnId);
    // A reading with several parts (a text and files, say) cannot be one edit: it is posted anew.
    const original = contents.length === 1 && (await this.live.current(stream));
    if (original) {
      const postUnder = await editLiveMessage(
        this.matrix,
        this.live,
        sender,
        roomId,
        original,
        contents[0]!,
        txnId,
      );
      if (postUnder === undefined) return;
      txnId = postUnder;
    }
    let first: string | undefined;
    for (const [n, content] of contents.entries()) {
      const eventId = await this.matrix.sendAs(
        sender,
        roomId,
        "m.room.message",
        content,
        partTxnId(txnId, n),
      );
      first ??= eventId;
    }
    await this.live.remember(stream, first!);
  }

  /**
   * Posts a message of an endpoint that is not live: as a reply, in a thread, when it refers to
   * messages the map knows; then remembers which event it is: the first (its text, else its first
   * file), the one a remote id maps to. The parts after it follow, in the same thread if any.
   */
  private async post(
    job: ToMatrixJob,
    sender: { userId: string; displayName: string },
    roomId: string,
    contents: readonly Record<string, unknown>[],
    txnId: string,
  ): Promise<void> {
    const messages = this.messagesOf(job);
    const [reply, conversation] =
      job.replyTo === undefined && job.thread === undefined
        ? []
        : await messages.eventsIn(roomId, [job.replyTo, job.thread]);
    const relation = inboundRelation(reply, conversation);
    const [content, ...parts] = contents as [Record<string, unknown>, ...Record<string, unknown>[]];
    let eventId: string;
    let threadRoot = relation?.threadRoot;
    if (!relation) eventId = await this.matrix.sendAs(sender, roomId, "m.room.message", content, txnId);
    else {
      const related = { ...content, "m.relates_to": relation.relatesTo };
      try {
        eventId = await this.matrix.sendAs(sender, roomId, "m.room.message", related, txnId);
      } catch (err) {
        // Refused for good with the relation (a "root" that has a relation of its own, say): a
        // plain reply, or a plain message, rather than none — under a transaction id of its own,
        // so a repeat of this item posts it once. A bare m.in_reply_to is never refused.
        if (!(err instanceof PermanentError)) throw err;
        const plain = reply
          ? { ...content, "m.relates_to": { "m.in_reply_to": { event_id: reply.eventId } } }
          : content;
        eventId = await this.matrix.sendAs(sender, roomId, "m.room.message", plain, `${txnId}-plain`);
        threadRoot = undefined;
      }
    }
    // The parts after it, in the same thread, each a fallback reply to the one before (§Threading:
    // to the latest event in the thread), as a client posts several files into a thread.
    let previous = eventId;
    for (const [i, part] of parts.entries()) {
      const inThread = threadRoot !== undefined && {
        "m.relates_to": {
          rel_type: "m.thread",
          event_id: threadRoot,
          is_falling_back: true,
          "m.in_reply_to": { event_id: previous },
        },
      };
      const posted = inThread ? { ...part, ...inThread } : part;
      previous = await this.matrix.sendAs(sender, roomId, "m.room.message", posted, partTxnId(txnId, i + 1));
    }
    if (job.remoteId !== undefined) await messages.received(job.remoteId, roomId, eventId, threadRoot);
  }
}
