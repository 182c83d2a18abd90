import type { Client } from "aedes";
import type {
  Connector,
  ConnectorContext,
  EndpointBinding,
  InboundMessage,
  OutboundMessage,
  OutboundRedaction,
  SendResult,
} from "../../src/connector.js";
import { PermanentError } from "../../src/errors.js";
import { deviceTopicOf, readAvailability } from "./availability.js";
import { EmbeddedBroker } from "./embedded-broker.js";
import { ExternalClient, type PublishProperties } from "./external-client.js";
import { decodePayload, encodePayload } from "./payload.js";
import type { Publish } from "./publish.js";
import { RedeliveryTracker, qos0RemoteId } from "./redelivery.js";
import {
  answerKey,
  commandAnswered,
  prepareCommand,
  rememberRequest,
  requestAnswered,
  unknownAnswerReason,
  type Request,
} from "./request-response.js";
import { MQTT_DEFAULTS, type MqttAccount, type MqttEndpoint } from "./schema.js";
import { topicLevel, topicMatches } from "./topic.js";
import { relaysIn, relaysOut } from "../../src/connector.js";

const PUBLISH_TIMEOUT_MS = 30_000;
/**
 * How long a sent message's id is remembered: the queue may hand the same message over again (a
 * crash after the publish, before the queue recorded it), and a device must not run a command twice.
 */
const SENT_TTL_MS = 24 * 3600_000;

export class MqttConnector implements Connector<MqttEndpoint> {
  private embedded: EmbeddedBroker | undefined;
  private external: ExternalClient | undefined;
  private inbound: EndpointBinding<MqttEndpoint>[] = [];
  private outbound: EndpointBinding<MqttEndpoint>[] = [];
  /** The endpoints that publish with each response topic (request-response.ts). */
  private responses = new Map<string, EndpointBinding<MqttEndpoint>[]>();
  private readonly bindingsByTopic = new Map<string, EndpointBinding<MqttEndpoint>[]>();
  private readonly embeddedTrackers = new WeakMap<Client, RedeliveryTracker>();
  private externalTracker: { connection: number; tracker: RedeliveryTracker } | undefined;
  /** Topics an endpoint with clearRetainedOnRedact publishes to: whose retained value is tracked. */
  private retainedTopics = new Set<string>();
  /** Per tracked topic, the publish or clearing under way: one at a time, so the record stays true. */
  private readonly topicTurns = new Map<string, Promise<unknown>>();

  constructor(
    private readonly account: string,
    private readonly config: MqttAccount,
    private readonly ctx: ConnectorContext,
  ) {}

  /** Ports the embedded broker bound (tests use port 0). */
  get ports(): { tcp: number; websocket: number; tls: number } | undefined {
    const b = this.embedded;
    return b && { tcp: b.port, websocket: b.websocketPort, tls: b.tlsPort };
  }

  async start(): Promise<void> {
    const { config, ctx } = this;
    if (config.embedded) {
      ctx.setState("connecting");
      this.embedded = new EmbeddedBroker(
        config.embedded,
        ctx.log,
        (msg, client) => this.ingest({ ...msg }, client && this.trackerFor(client, msg.clientId)),
        ctx.redis,
      );
      await this.embedded.start();
      ctx.log.info(
        { port: this.embedded.port, host: config.embedded.host },
        "embedded mqtt broker listening",
      );
      ctx.setState("up");
    } else if (config.url) {
      const external = new ExternalClient(this.account, { ...config, url: config.url }, ctx, (msg) =>
        this.ingest({ ...msg, clientId: undefined }, this.externalTrackerFor(msg.connection, msg.resumed)),
      );
      this.external = external;
      await external.start();
    }
  }

  private trackerFor(client: Client, clientId: string): RedeliveryTracker {
    let tracker = this.embeddedTrackers.get(client);
    if (!tracker) {
      const id = `client:${clientId}`;
      // What the broker answered, not what the client asked: cleanSession 0 may start a new session.
      const resumed = this.embedded?.sessionResumed(client) ?? false;
      tracker = new RedeliveryTracker(this.ctx.store, id, MQTT_DEFAULTS.dedupeWindowMs, resumed);
      this.embeddedTrackers.set(client, tracker);
    }
    return tracker;
  }

  private externalTrackerFor(connection: number, resumed: boolean): RedeliveryTracker {
    if (this.externalTracker?.connection !== connection) {
      const id = `session:${this.external?.clientId ?? this.account}`;
      this.externalTracker = {
        connection,
        tracker: new RedeliveryTracker(this.ctx.store, id, MQTT_DEFAULTS.dedupeWindowMs, resumed),
      };
    }
    return this.externalTracker.tracker;
  }

  async watch(endpoints: readonly EndpointBinding<MqttEndpoint>[]): Promise<void> {
    this.inbound = endpoints.filter((e) => relaysIn(e.direction));
    this.outbound = endpoints.filter((e) => relaysOut(e.direction));
    this.responses = responseTopicsOf(this.outbound);
    this.bindingsByTopic.clear();
    this.retainedTopics = new Set(
      endpoints
        .filter((e) => relaysOut(e.direction) && e.spec.clearRetainedOnRedact)
        .map((e) => e.spec.topic),
    );
    if (this.external) {
      const filters = new Map<string, 0 | 1 | 2>();
      for (const e of this.inbound) {
        filters.set(e.spec.topic, Math.max(filters.get(e.spec.topic) ?? 0, e.spec.qos) as 0 | 1 | 2);
      }
      for (const [topic, bindings] of this.responses) {
        const qos = Math.max(filters.get(topic) ?? 0, ...bindings.map((b) => b.spec.qos)) as 0 | 1 | 2;
        filters.set(topic, qos);
      }
      await this.external.subscribe(filters);
    }
  }

  private senderOf(p: Publish, ep: MqttEndpoint): string {
    const s = ep.sender;
    if (s === "clientId") return p.clientId ?? p.topic;
    if (s && "topicLevel" in s) return topicLevel(p.topic, s.topicLevel) ?? p.clientId ?? p.topic;
    if (s && "name" in s) return s.name;
    return p.clientId ?? p.topic;
  }

  /** The inbound endpoints whose filter matches `topic`, remembered per topic (devices repeat topics). */
  private bindingsFor(topic: string): EndpointBinding<MqttEndpoint>[] {
    let bindings = this.bindingsByTopic.get(topic);
    if (!bindings) {
      bindings = this.inbound.filter((b) => topicMatches(b.spec.topic, topic));
      if (this.bindingsByTopic.size >= 10_000) this.bindingsByTopic.clear();
      this.bindingsByTopic.set(topic, bindings);
    }
    return bindings;
  }

  /** `tracker` is null for a message that cannot be redelivered (a will). */
  private async ingest(p: Publish, tracker: RedeliveryTracker | null): Promise<void> {
    // Someone else retained a value on a topic whose value we track: a redaction must not clear it.
    // An external broker does not say which messages it holds retained: any message there counts.
    if (this.retainedTopics.has(p.topic) && (p.retain || this.external)) {
      await this.inTurn(p.topic, () => this.ctx.store.delete(retainedKey(p.topic)));
    }
    if (p.retain && p.payload.byteLength === 0) {
      this.ctx.log.debug({ topic: p.topic, clientId: p.clientId }, "retained message deleted; not relayed");
      return;
    }
    // Retained messages replayed on subscribe come from an external broker: on the embedded one,
    // every publish is live.
    const replayed = p.retain && this.external !== undefined;
    const matched = this.bindingsFor(p.topic).filter(
      (b) =>
        !(b.spec.ignoreRetained && replayed) ||
        (b.spec.availability && deviceTopicOf(b.spec.availability, p.topic) !== undefined),
    );
    const answer = this.responses.has(p.topic) ? await this.answerTo(p, matched) : undefined;
    if (matched.length === 0 && !answer) return;
    const identity =
      tracker && p.qos > 0 && p.messageId !== undefined
        ? await tracker.lookup(p.messageId, p.dup, p.topic, p.payload)
        : { remoteId: qos0RemoteId(p.clientId ?? this.account), redelivered: false, durable: undefined };
    if (identity.redelivered) this.ctx.log.debug({ remoteId: identity.remoteId }, "redelivered publish");
    if (answer) {
      await Promise.all([identity.durable, answer(identity.remoteId)]);
      return;
    }
    // Kept before the PUBACK, as the message is: a room reply may follow at once.
    const request =
      p.responseTopic !== undefined && this.outbound.some((b) => b.spec.answerRequests)
        ? rememberRequest(this.ctx.store, this.ctx.log, identity.remoteId, p)
        : undefined;
    await Promise.all([
      identity.durable,
      request,
      ...matched.map(
        (binding) =>
          this.reportAvailability(p, binding, identity.remoteId, replayed) ??
          this.ctx.emit(this.inboundOf(p, binding, identity.remoteId)),
      ),
    ]);
  }

  private inboundOf(
    p: Publish,
    binding: EndpointBinding<MqttEndpoint>,
    remoteId: string,
  ): InboundMessage & { endpointIds: [string] } {
    const decoded = decodePayload(p.topic, p.payload, binding.spec);
    if (decoded.problem) {
      this.ctx.log.warn(
        { topic: p.topic, clientId: p.clientId, problem: decoded.problem },
        "unexpected mqtt payload",
      );
    }
    return {
      endpointIds: [binding.id],
      remoteId,
      sender: { id: this.senderOf(p, binding.spec) },
      body: decoded.body,
      ...(decoded.attachment && { attachments: [decoded.attachment] }),
      stream: p.topic,
    };
  }

  /**
   * A publish on a response topic: a threaded reply to the command its correlation data names,
   * posted in the command's room only. One that names no command of ours goes where its topic
   * does, as any message (undefined here); when no `in` endpoint takes it, to the failed list.
   */
  private async answerTo(
    p: Publish,
    matched: readonly EndpointBinding<MqttEndpoint>[],
  ): Promise<((remoteId: string) => Promise<void>) | undefined> {
    const command = await commandAnswered(this.ctx.store, p.correlationData);
    const binding = command && this.outbound.find((b) => b.id === command.endpointId);
    if (command && binding) {
      return (remoteId) =>
        this.ctx.emit({
          ...this.inboundOf(p, binding, remoteId),
          replyTo: command.remoteId,
          thread: command.remoteId,
          response: true,
        });
    }
    const reason = unknownAnswerReason(p.topic, p.correlationData);
    if (matched.length > 0) {
      this.ctx.log.info({ topic: p.topic }, `${reason}; relayed as a message of the topic`);
      return undefined;
    }
    const answering = this.responses.get(p.topic) ?? [];
    return (remoteId) =>
      this.ctx.quarantine(
        {
          ...this.inboundOf(p, answering[0]!, remoteId),
          endpointIds: answering.map((b) => b.id),
          response: true,
        },
        reason,
      );
  }

  /**
   * A publish on one of the endpoint's availability topics, reported as its device's availability;
   * undefined when it is a message (not such a topic, or no state in it: relayed as it is).
   */
  private reportAvailability(
    p: Publish,
    binding: EndpointBinding<MqttEndpoint>,
    remoteId: string,
    replayed: boolean,
  ): Promise<void> | undefined {
    const convention = binding.spec.availability;
    const report = this.ctx.availability?.bind(this.ctx);
    if (!convention || !report) return undefined;
    const reading = readAvailability(convention, p.topic, p.payload);
    if (!reading) return undefined;
    if ("problem" in reading) {
      const skipped = binding.spec.ignoreRetained && replayed;
      this.ctx.log.warn(
        { topic: p.topic, clientId: p.clientId, problem: reading.problem },
        skipped
          ? "availability topic without a state; retained, skipped"
          : "availability topic without a state; relayed as a message",
      );
      return skipped ? Promise.resolve() : undefined;
    }
    // The device's ghost, found from the device's topic as for its messages.
    const sender = this.senderOf({ ...p, topic: reading.deviceTopic }, binding.spec);
    return report({ endpointIds: [binding.id], remoteId, sender: { id: sender }, state: reading.state });
  }

  /** Only `format: binary` publishes a file's bytes; text and JSON carry its name. */
  usesAttachments(endpoint: EndpointBinding<MqttEndpoint>): boolean {
    return endpoint.spec.format === "binary";
  }

  /**
   * The remote id is the message's own id (stable per event and endpoint): MQTT has no message ids
   * of its own. A redaction finds the publish by it.
   */
  async send(message: OutboundMessage, endpoint: EndpointBinding<MqttEndpoint>): Promise<SendResult> {
    const sentKey = `sent:${message.id}`;
    if ((await this.ctx.store.get(sentKey)) !== undefined) return { remoteId: message.id };
    const { topic, retain } = endpoint.spec;
    const payload = encodePayload(message, endpoint.spec);
    const max = this.embedded ? (this.config.embedded?.maxPayloadBytes ?? Infinity) : Infinity;
    if (payload.byteLength > max)
      throw new PermanentError(`payload of ${payload.byteLength} bytes exceeds ${max}`);
    const request = await requestAnswered(this.ctx.store, endpoint, message);
    if (request) {
      await this.answer(request, message, endpoint.spec, payload);
      await this.ctx.store.set(sentKey, "1", SENT_TTL_MS);
      return { remoteId: message.id };
    }
    const response = await prepareCommand(this.ctx.store, endpoint, message.id);
    if (retain && this.retainedTopics.has(topic)) {
      // Recorded before the publish: the record is never older than the broker's value, so a
      // redaction can clear only the value its own message set (or one that never got there).
      await this.inTurn(topic, async () => {
        await this.ctx.store.set(retainedKey(topic), message.id, MQTT_DEFAULTS.retainedMemoryMs);
        await this.publish(endpoint.spec, payload, response);
      });
    } else {
      await this.publish(endpoint.spec, payload, response);
    }
    await this.ctx.store.set(sentKey, "1", SENT_TTL_MS);
    return { remoteId: message.id };
  }

  /**
   * A room reply to a device's request goes to the response topic it named, with its correlation
   * data, never retained; once, though the core hands it to every out endpoint of the route.
   */
  private async answer(
    request: Request,
    message: OutboundMessage,
    spec: MqttEndpoint,
    payload: Buffer,
  ): Promise<void> {
    const once = answerKey(message);
    if ((await this.ctx.store.get(once)) !== undefined) return;
    const { responseTopic, correlationData } = request;
    await this.publish({ ...spec, topic: responseTopic, retain: false }, payload, { correlationData });
    await this.ctx.store.set(once, "1", SENT_TTL_MS);
    this.ctx.log.debug({ topic: responseTopic, message: message.id }, "answered a device's request");
  }

  /**
   * A redaction clears the retained value its message set, on an endpoint with
   * clearRetainedOnRedact, as long as no newer value was retained on the topic since.
   */
  async redact(redaction: OutboundRedaction, endpoint: EndpointBinding<MqttEndpoint>): Promise<void> {
    const { topic } = endpoint.spec;
    if (!endpoint.spec.clearRetainedOnRedact) return;
    await this.inTurn(topic, async () => {
      const current = await this.ctx.store.get(retainedKey(topic));
      if (current !== redaction.remoteId) {
        this.ctx.log.debug({ topic, redaction: redaction.id }, "a newer value is retained; not cleared");
        return;
      }
      // [MQTT-3.3.1-10]: a retained PUBLISH with an empty payload removes the retained message.
      await this.publish(endpoint.spec, Buffer.alloc(0));
      await this.ctx.store.delete(retainedKey(topic));
      this.ctx.log.info({ topic }, "retained value cleared: the message that set it was redacted");
    });
  }

  /** `properties`: MQTT 5 only, so external only (checkEndpoint refuses them on the embedded broker). */
  private async publish(spec: MqttEndpoint, payload: Buffer, properties?: PublishProperties): Promise<void> {
    const { topic, qos, retain } = spec;
    if (this.embedded) await this.embedded.publish(topic, payload, qos, retain);
    else if (this.external)
      await this.external.publish(topic, payload, qos, retain, PUBLISH_TIMEOUT_MS, properties);
  }

  /** Runs `work` after what is under way for `topic` (sends of several rooms may share a topic). */
  private inTurn<T>(topic: string, work: () => Promise<T>): Promise<T> {
    const previous = this.topicTurns.get(topic) ?? Promise.resolve();
    const next = previous.then(work, work);
    const settled = next.catch(() => undefined);
    this.topicTurns.set(topic, settled);
    void settled.then(() => {
      if (this.topicTurns.get(topic) === settled) this.topicTurns.delete(topic);
    });
    return next;
  }

  async stop(): Promise<void> {
    await this.embedded?.stop();
    await this.external?.stop();
  }
}

function responseTopicsOf(
  outbound: readonly EndpointBinding<MqttEndpoint>[],
): Map<string, EndpointBinding<MqttEndpoint>[]> {
  const byTopic = new Map<string, EndpointBinding<MqttEndpoint>[]>();
  for (const b of outbound) {
    const topic = b.spec.responseTopic;
    if (topic !== undefined) byTopic.set(topic, [...(byTopic.get(topic) ?? []), b]);
  }
  return byTopic;
}

/** The store key of the remote id whose publish set `topic`'s retained value (clearRetainedOnRedact). */
function retainedKey(topic: string): string {
  return `retained:${topic}`;
}
