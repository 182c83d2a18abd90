/**
 * A connection to an external broker (Mosquitto, EMQX, …) through mqtt.js, MQTT 3.1.1 or 5.
 *
 * Acknowledgement is held until the message is enqueued: mqtt.js' `handleMessage` hook delays the
 * PUBACK until its callback. With `cleanSession: false` (default) the broker keeps our session, so
 * QoS>0 messages published while tribridge is down arrive when it comes back.
 *
 * With `shareGroup`, several instances subscribe as one shared-subscription group and the broker
 * gives each message to one of them. Each instance then has its own client id (and session).
 *
 * Our own publishes must not come back in as device messages. MQTT 5 has no-local for that, but
 * not on shared subscriptions (the broker may hand one instance's publish to another), and 3.1.1
 * has none. There each publish is counted in Redis, which all instances share, under its topic and
 * payload, and each echo takes one off: the same command sent twice comes back twice, and a
 * device's message that happens to match is let through once our echoes are accounted for.
 */
import { createHash } from "node:crypto";
import mqtt, { type IClientOptions, type IPublishPacket, type MqttClient } from "mqtt";
import { RetryableError } from "../../src/errors.js";
import type { ConnectorContext } from "../../src/connector.js";
import type { Publish } from "./publish.js";
import { topicMatches } from "./topic.js";
import type { MqttAccount } from "./schema.js";

export interface ExternalPublish extends Omit<Publish, "clientId"> {
  /** Increments on every (re)connect: redelivery detection is per connection. */
  connection: number;
}

const OWN_ECHO_TTL_MS = 60_000;

export class ExternalClient {
  private client: MqttClient | undefined;
  private subscribed = new Map<string, 0 | 1 | 2>();
  private connection = 0;
  readonly clientId: string;

  constructor(
    private readonly account: string,
    private readonly config: MqttAccount & { url: string },
    private readonly ctx: ConnectorContext,
    private readonly onMessage: (msg: ExternalPublish) => Promise<void>,
  ) {
    this.clientId =
      config.clientId ??
      (config.shareGroup ? `tribridge-${account}-${ctx.instanceId.slice(0, 8)}` : `tribridge-${account}`);
  }

  private options(): IClientOptions {
    const c = this.config;
    return {
      clientId: this.clientId,
      protocolVersion: c.protocolVersion,
      username: c.username,
      password: c.password,
      ca: c.ca,
      cert: c.cert,
      key: c.key,
      rejectUnauthorized: c.rejectUnauthorized,
      keepalive: c.keepaliveSec,
      reconnectPeriod: c.reconnectPeriodMs,
      connectTimeout: c.connectTimeoutMs,
      clean: c.cleanSession,
      resubscribe: true,
      // MQTT 5: keep the session for a day after we disconnect (3.1.1 keeps it until clean).
      properties: c.protocolVersion === 5 && !c.cleanSession ? { sessionExpiryInterval: 86_400 } : undefined,
    };
  }

  start(): Promise<void> {
    const { ctx } = this;
    ctx.setState("connecting");
    const client = mqtt.connect(this.config.url, this.options());
    this.client = client;
    client.handleMessage = (packet, done) => {
      if (packet.cmd !== "publish") return done();
      this.ingest(packet as IPublishPacket).then(
        () => done(),
        (err: unknown) => {
          // Not enqueued: reconnect without acknowledging, so the broker delivers it again.
          ctx.log.warn(
            { err: (err as Error).message, topic: (packet as IPublishPacket).topic },
            "mqtt message not enqueued; reconnecting",
          );
          client.stream?.destroy();
          done();
        },
      );
    };
    client.on("connect", (connack) => {
      this.connection++;
      ctx.setState("up");
      ctx.log.info(
        { url: this.config.url, sessionPresent: connack.sessionPresent },
        "connected to mqtt broker",
      );
      if (!connack.sessionPresent) void this.resubscribeAll();
    });
    client.on("reconnect", () => ctx.setState("connecting", "reconnecting"));
    client.on("offline", () => ctx.setState("connecting", "broker unreachable"));
    client.on("error", (err) => {
      ctx.log.warn({ err: err.message }, "mqtt broker error");
      ctx.setState("connecting", err.message);
    });
    ctx.signal.addEventListener("abort", () => client.end(true), { once: true });
    // Do not wait for the broker: an unreachable broker is a state, not a start-up failure.
    return Promise.resolve();
  }

  /** Whether our own publish to `topic` comes back to us (see the class comment). */
  private echoes(topic: string): boolean {
    if (this.config.protocolVersion === 5 && this.config.shareGroup === undefined) return false;
    for (const filter of this.subscribed.keys()) if (topicMatches(filter, topic)) return true;
    return false;
  }

  private echoKey(topic: string, payload: Uint8Array): string {
    const digest = createHash("sha1").update(topic).update("\0").update(payload).digest("base64url");
    return `echo:${digest}`;
  }

  private async ingest(packet: IPublishPacket): Promise<void> {
    const payload = Buffer.isBuffer(packet.payload) ? packet.payload : Buffer.from(packet.payload);
    if (this.echoes(packet.topic) && (await this.ctx.store.countDown(this.echoKey(packet.topic, payload))))
      return;
    await this.onMessage({
      topic: packet.topic,
      payload,
      qos: packet.qos,
      retain: packet.retain,
      dup: packet.dup,
      messageId: packet.messageId,
      connection: this.connection,
    });
  }

  /** What is subscribed for a topic filter: the filter, or its shared subscription. */
  private subscriptionOf(filter: string): string {
    const { shareGroup } = this.config;
    return shareGroup ? `$share/${shareGroup}/${filter}` : filter;
  }

  /** Makes the subscriptions match `filters` (filter → QoS). */
  async subscribe(filters: Map<string, 0 | 1 | 2>): Promise<void> {
    const client = this.client;
    if (!client) return;
    const gone = [...this.subscribed.keys()].filter((f) => !filters.has(f));
    this.subscribed = new Map(filters);
    if (gone.length > 0 && client.connected)
      await client.unsubscribeAsync(gone.map((f) => this.subscriptionOf(f)));
    if (client.connected) await this.resubscribeAll();
  }

  private async resubscribeAll(): Promise<void> {
    const client = this.client;
    if (!client || this.subscribed.size === 0) return;
    const { shareGroup } = this.config;
    // [MQTT-3.8.3-3] no-local: the broker does not send us our own publishes back; not allowed on
    // a shared subscription [MQTT-3.8.3-4].
    const noLocal = this.config.protocolVersion === 5 && !shareGroup;
    const map = Object.fromEntries(
      [...this.subscribed].map(([f, qos]) => [this.subscriptionOf(f), noLocal ? { qos, nl: true } : { qos }]),
    );
    try {
      const granted = await client.subscribeAsync(map);
      for (const g of granted) {
        // 0x80 and up: refused (MQTT 5 says why, e.g. 0x9E shared subscriptions not supported).
        if (g.qos >= 128)
          this.ctx.log.warn({ filter: g.topic, reasonCode: g.qos }, "broker refused subscription");
      }
    } catch (err) {
      this.ctx.log.warn({ err: (err as Error).message }, "subscribe failed; retried on reconnect");
    }
  }

  async publish(
    topic: string,
    payload: Buffer,
    qos: 0 | 1 | 2,
    retain: boolean,
    timeoutMs: number,
  ): Promise<void> {
    const client = this.client;
    if (!client?.connected) throw new RetryableError(`mqtt broker ${this.config.url} not connected`);
    if (this.echoes(topic)) await this.ctx.store.countUp(this.echoKey(topic, payload), OWN_ECHO_TTL_MS);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new RetryableError(`mqtt publish not acknowledged in ${timeoutMs} ms`)),
        timeoutMs,
      );
    });
    try {
      await Promise.race([client.publishAsync(topic, payload, { qos, retain }), timeout]);
    } catch (err) {
      if (err instanceof RetryableError) throw err;
      throw new RetryableError(`mqtt publish failed: ${(err as Error).message}`);
    } finally {
      clearTimeout(timer);
    }
  }

  async stop(): Promise<void> {
    await this.client?.endAsync();
  }
}
