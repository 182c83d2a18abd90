/**
 * Queue → remote: hands an item of a to-<connector> queue to the connector of its endpoint's
 * account: a message (`send`, with the remote ids of what it answers; its own remote id is
 * remembered afterwards), an edit (`edit`) or a redaction (`redact`) of a message sent there
 * before. One call per queued item; the item id is its id towards the connector, so the connector
 * can make a repeat harmless. Tells DeliveryFeedback what became of each new message.
 */
import type { Connector, ConnectorDefinition, EndpointBinding } from "../connector.js";
import { PermanentError, errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import { bindingOf, type RouteTable } from "../routing/route-table.js";
import { retentionFor, type AccountMessages, type MessageMap } from "../store/message-map.js";
import type { DeliveryFeedback } from "./delivery-feedback.js";
import { renderOutbound, type ToRemoteJob } from "./event-intake.js";
import { fromMatrixContent } from "./format.js";
import type { MatrixClient } from "./matrix-client.js";
import { relationsOf } from "./relations.js";

/** One item's delivery: the connector, the endpoint and the map of its account. */
interface Target {
  def: ConnectorDefinition;
  instance: Connector<unknown>;
  binding: EndpointBinding<unknown>;
  messages: AccountMessages;
}

export class RemoteDelivery {
  constructor(
    private readonly matrix: MatrixClient,
    /** Who answers in the room when a relay fails for good. */
    private readonly bot: { userId: string; displayName: string },
    private readonly routes: RouteTable,
    /** The running connector of `<connector>.<account>`, if it runs. */
    private readonly instanceOf: (ref: string) => Connector<unknown> | undefined,
    private readonly messages: MessageMap,
    private readonly feedback: DeliveryFeedback,
    private readonly log: Logger,
  ) {}

  /**
   * The account an item goes to (`<connector>.<account>`, as DestinationHealth names it), or the
   * queue's when its endpoint is no longer configured (delivering it then fails for good anyway).
   */
  destinationOf(def: ConnectorDefinition, job: ToRemoteJob): string {
    try {
      const endpoint = this.routes.queuedOutbound(job.endpointId, def.name);
      return `${endpoint.connector}.${endpoint.account}`;
    } catch {
      return def.name;
    }
  }

  /** A room message waits for its destination (OrderedQueueOptions.waiting): marked so. */
  waiting(job: ToRemoteJob): void {
    this.feedback.note(job, "waiting");
  }

  /**
   * A room message that will not reach the far side (refused, or out of attempts; it is in the
   * failed list): the bot answers it in its thread with the reason (an edit or a redaction: the
   * original message). The transaction id derives from the item's, so a repeat posts one notice.
   */
  async tellFailure(job: ToRemoteJob, id: string, reason: string): Promise<void> {
    this.feedback.note(job, "failed");
    const what =
      job.kind === "redaction"
        ? "Redaction not relayed"
        : job.kind === "edit"
          ? "Edit not relayed"
          : "Not delivered";
    const content: Record<string, unknown> = {
      msgtype: "m.notice",
      body: `${what} to ${job.endpointId}: ${reason}. It is in the failed list: \`!tribridge failed\` shows it, \`!tribridge retry\` sends it again.`,
      "m.mentions": {},
    };
    const about =
      job.kind === "redaction"
        ? job.redacts
        : job.kind === "edit"
          ? relationsOf(job.content).replaces
          : job.eventId;
    if (about !== undefined) {
      const aboutContent = job.kind === undefined ? job.content : await this.contentOf(job.roomId, about);
      content["m.relates_to"] = answerIn(about, aboutContent);
    }
    await this.matrix.sendAs(this.bot, job.roomId, "m.room.message", content, `${id}-failed`);
  }

  /** An event's content as the bot reads it (its relation is in the clear when it is encrypted). */
  private async contentOf(roomId: string, eventId: string): Promise<Record<string, unknown> | undefined> {
    const path = `/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/event/${encodeURIComponent(eventId)}`;
    try {
      const event = await this.matrix.requestAs(this.bot.userId, "GET", path);
      return typeof event.content === "object" && event.content !== null
        ? (event.content as Record<string, unknown>)
        : {};
    } catch (err) {
      this.log.debug({ eventId, err: errorMessage(err) }, "could not read the event a failure is about");
      return undefined;
    }
  }

  /** Delivers one item of `def`'s queue. */
  async deliver(def: ConnectorDefinition, job: ToRemoteJob, id: string): Promise<void> {
    const endpoint = this.routes.queuedOutbound(job.endpointId, def.name);
    const ref = `${endpoint.connector}.${endpoint.account}`;
    const instance = this.instanceOf(ref);
    if (!instance) throw new PermanentError(`account ${ref} is not running`);
    const messages = this.messages.account(ref, retentionFor(def.capabilities));
    const target = { def, instance, binding: bindingOf(endpoint), messages };
    switch (job.kind) {
      case undefined:
        return this.send(target, job, id);
      case "edit":
        return this.edit(target, job, id);
      case "redaction":
        return this.redact(target, job, id);
    }
  }

  private async send({ def, instance, binding, messages }: Target, job: ToRemoteJob, id: string) {
    const withFiles = def.capabilities.attachments && (instance.usesAttachments?.(binding) ?? true);
    const rendered = await renderOutbound(this.matrix, job, id, {
      ...def.capabilities,
      attachments: withFiles,
    });
    // Resolved now, not when the event came in: what it answers may have been relayed just before
    // (the queue keeps the room's order, so that send is done).
    const relations = relationsOf(job.content);
    const [replyTo, thread] = await messages.remoteIdsOf(binding.id, [relations.replyTo, relations.thread]);
    const message = {
      ...rendered,
      ...(replyTo !== undefined && { replyTo }),
      ...(thread !== undefined && { thread }),
    };
    const result = await instance.send(message, binding);
    if (result.remoteId !== undefined && job.eventId !== undefined) {
      const event = {
        eventId: job.eventId,
        roomId: job.roomId,
        sender: job.sender,
        threadRoot: relations.thread,
      };
      await messages.sent(event, binding.id, result.remoteId);
    }
    this.feedback.note(job, "accepted");
  }

  /**
   * What `send` returned for the original on this endpoint, or undefined (logged at debug) when the
   * change is not relayed: the connector cannot act on it, or the far side never had the original.
   */
  private async original(
    { def, instance, binding, messages }: Target,
    job: ToRemoteJob,
    member: "edit" | "redact",
    original: string | undefined,
  ) {
    const capability = member === "edit" ? "edits" : "redactions";
    const context = { eventId: job.eventId, original, endpointId: binding.id };
    if (!instance[member] || !def.capabilities[capability]) {
      this.log.debug(context, `the connector takes no ${capability}; not relayed`);
      return undefined;
    }
    const sent = original === undefined ? undefined : await messages.sentTo(binding.id, original);
    if (!sent) this.log.debug(context, "not relayed: the original was not sent there (or long ago)");
    return sent;
  }

  private async edit(target: Target, job: ToRemoteJob, id: string) {
    const { def, instance, binding, messages } = target;
    const original = relationsOf(job.content).replaces;
    const sent = await this.original(target, job, "edit", original);
    if (!sent || original === undefined || !instance.edit) return;
    // Client-Server API §Event replacements, validity: the same sender as the original.
    if (sent.sender !== job.sender) {
      this.log.debug(
        { eventId: job.eventId, original },
        "an edit by someone else than the sender; not relayed",
      );
      return;
    }
    const newContent = job.content["m.new_content"];
    const displayName = await this.matrix.displayName(job.roomId, job.sender);
    const body =
      typeof newContent === "object" && newContent !== null
        ? fromMatrixContent(newContent as Record<string, unknown>, displayName, {
            html: def.capabilities.html,
          })
        : undefined;
    if (!body) {
      this.log.debug({ eventId: job.eventId }, "an edit without new content tribridge relays; not relayed");
      return;
    }
    const textBytes = Buffer.byteLength(body.text);
    const max = def.capabilities.maxTextBytes;
    if (max !== undefined && textBytes > max)
      throw new PermanentError(`text of ${textBytes} bytes; the far side takes at most ${max}`);
    const edit = {
      id,
      remoteId: sent.remoteId,
      sender: { userId: job.sender, displayName },
      body,
      timestamp: job.timestamp,
    };
    const result = await instance.edit(edit, binding);
    if (result.remoteId !== undefined && result.remoteId !== sent.remoteId) {
      const event = { eventId: original, roomId: job.roomId, threadRoot: sent.threadRoot };
      await messages.alsoKnownAs(result.remoteId, event);
    }
  }

  private async redact(target: Target, job: ToRemoteJob, id: string) {
    const sent = await this.original(target, job, "redact", job.redacts);
    if (!sent || !target.instance.redact) return;
    const displayName = await this.matrix.displayName(job.roomId, job.sender);
    const reason = typeof job.content.reason === "string" ? { reason: job.content.reason } : {};
    const redaction = {
      id,
      remoteId: sent.remoteId,
      sender: { userId: job.sender, displayName },
      ...reason,
      timestamp: job.timestamp,
    };
    await target.instance.redact(redaction, target.binding);
  }
}

/**
 * `m.relates_to` of the bot's answer to the event `about` (whose content is `aboutContent`; undefined:
 * unknown), in its thread (Client-Server API §Threading): an event in a thread is answered there,
 * as a reply within the thread; any other event is the root of the answer's thread, replied to as
 * the fallback for clients without threads. An event with another relation cannot be a thread's
 * root, nor can an unknown one be trusted to be: a plain reply then.
 */
export function answerIn(
  about: string,
  aboutContent: Record<string, unknown> | undefined,
): Record<string, unknown> {
  const relation = aboutContent?.["m.relates_to"];
  const relType =
    typeof relation === "object" && relation !== null
      ? (relation as { rel_type?: unknown }).rel_type
      : undefined;
  const thread = aboutContent && relationsOf(aboutContent).thread;
  const reply = { "m.in_reply_to": { event_id: about } };
  if (thread !== undefined)
    return { rel_type: "m.thread", event_id: thread, is_falling_back: false, ...reply };
  if (aboutContent === undefined || relType !== undefined) return reply;
  return { rel_type: "m.thread", event_id: about, is_falling_back: true, ...reply };
}
