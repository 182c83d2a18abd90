/**
 * A connection to an external broker (Mosquitto, EMQX, …) through mqtt.js, MQTT 3.1.1 or 5.
 *
 * Acknowledgement is held until the message is enqueued: mqtt.js' `handleMessage` hook delays the
 * PUBACK until its callback. So subscriptions are QoS 1 at most: for QoS 2, mqtt.js sends PUBREC
 * before the hook, and a message that then fails to enqueue would be lost (redeliveries of QoS 1
 * are dropped anyway). With `cleanSession: false` (default) the broker keeps our session, so QoS>0
 * messages published while tribridge is down arrive when it comes back.
 *
 * What the session holds is recorded in the store, so that a route added or removed while
 * tribridge was down is subscribed or unsubscribed on the next connect.
 *
 * With `shareGroup`, several instances subscribe as one shared-subscription group and the broker
 * gives each message to one of them. Each instance then has its own client id (and session).
 *
 * Our own publishes must not come back in as device messages. MQTT 5 has no-local for that, but
 * not on shared subscriptions (the broker may hand one instance's publish to another), and 3.1.1
 * has none. There each publish is counted in Redis, which all instances share, under its topic and
 * payload, and each echo takes one off: the same command sent twice comes back twice, and a
 * device's message that happens to match is let through once our echoes are accounted for.
 *
 * tribridge says whether it is up (availability.ts): `online`, retained, after every connect;
 * `offline`, retained, before a clean stop, and as the will in CONNECT, which the broker publishes
 * when the connection is lost without a DISCONNECT [MQTT-3.1.2-8].
 */
import { createHash } from "node:crypto";
import mqtt, {
  type IClientOptions,
  type IClientSubscribeOptions,
  type IPublishPacket,
  type MqttClient,
} from "mqtt";
import { RetryableError, UnavailableError } from "../../src/errors.js";
import type { ConnectorContext } from "../../src/connector.js";
import { ownAvailabilityOf, type OwnAvailability } from "./availability.js";
import type { Publish } from "./publish.js";
import { coveringFilters, topicMatches } from "./topic.js";
import type { MqttAccount } from "./schema.js";

export interface ExternalPublish extends Omit<Publish, "clientId"> {
  /** Increments on every (re)connect: redelivery detection is per connection. */
  connection: number;
  /** The broker resumed our session on this connection: only then can it redeliver [MQTT-4.4.0-1]. */
  resumed: boolean;
}

type SubscribeQos = 0 | 1;

const OWN_ECHO_TTL_MS = 60_000;
/** How long publishing tribridge's own availability may take (it is not waited for at a stop beyond this). */
const ANNOUNCE_TIMEOUT_MS = 5_000;

export class ExternalClient {
  private client: MqttClient | undefined;
  /** The routes' topic filters. */
  private filters = new Map<string, 0 | 1 | 2>();
  /** The subscriptions they need (shared-subscription names), with their QoS. */
  private wanted = new Map<string, SubscribeQos>();
  /** The subscriptions the broker's session holds, as far as we know. */
  private session = new Map<string, SubscribeQos>();
  private resubscribeAll = false;
  private syncing = Promise.resolve();
  private connection = 0;
  private resumed = false;
  readonly clientId: string;
  private readonly own: OwnAvailability | undefined;

  constructor(
    private readonly account: string,
    private readonly config: MqttAccount & { url: string },
    private readonly ctx: ConnectorContext,
    private readonly onMessage: (msg: ExternalPublish) => Promise<void>,
  ) {
    this.clientId =
      config.clientId ??
      (config.shareGroup ? `tribridge-${account}-${ctx.instanceId.slice(0, 8)}` : `tribridge-${account}`);
    this.own = ownAvailabilityOf(config.availabilityTopic, account, ctx.instanceId);
  }

  private options(): IClientOptions {
    return {
      ...brokerOptions(this.config, this.clientId),
      will: this.own && {
        topic: this.own.topic,
        payload: Buffer.from(this.own.offline),
        qos: 1,
        retain: true,
      },
    };
  }

  async start(): Promise<void> {
    const { ctx } = this;
    ctx.setState("connecting");
    this.session = await this.loadSession();
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
    // Taken as the CONNACK arrives: the broker may send messages before mqtt.js emits "connect".
    client.on("packetreceive", (packet) => {
      if (packet.cmd !== "connack" || (packet.returnCode ?? packet.reasonCode ?? 0) !== 0) return;
      this.connection++;
      this.resumed = packet.sessionPresent;
      // A new session holds nothing. MQTT 5: all again once per run (retain handling 1 makes that
      // harmless), in case the record missed one; MQTT 3.1.1 would replay retained messages.
      if (!this.resumed) this.session = new Map();
      else if (this.connection === 1 && this.config.protocolVersion === 5) this.resubscribeAll = true;
    });
    // A broker away costs a line when it goes and one per new error, not one per reconnect attempt
    // (every reconnectPeriodMs, for as long as it is away): the destination gate says "still down".
    let lastError: string | undefined;
    client.on("connect", (connack) => {
      lastError = undefined;
      ctx.setState("up");
      ctx.log.info(
        { url: withoutCredentials(this.config.url), sessionPresent: connack.sessionPresent },
        "connected to mqtt broker",
      );
      void this.sync();
      void this.announce(this.own?.online);
    });
    client.on("offline", () => ctx.setState("connecting", lastError ?? "broker unreachable"));
    client.on("error", (err) => {
      if (err.message !== lastError) ctx.log.warn({ err: err.message }, "mqtt broker error");
      lastError = err.message;
      ctx.setState("connecting", err.message);
    });
    // Stops reconnecting to a broker that is away; a connected client is ended by stop(), which
    // says "offline" first (ending it here would leave that to the will).
    ctx.signal.addEventListener(
      "abort",
      () => {
        if (!client.connected) client.end(true);
      },
      { once: true },
    );
    // Do not wait for the broker: an unreachable broker is a state, not a start-up failure.
  }

  /** Whether our own publish to `topic` comes back to us (see the class comment). */
  private echoes(topic: string): boolean {
    if (this.config.protocolVersion === 5 && this.config.shareGroup === undefined) return false;
    for (const filter of this.filters.keys()) if (topicMatches(filter, topic)) return true;
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
      ...responsePropertiesOf(packet),
      connection: this.connection,
      resumed: this.resumed,
    });
  }

  /** What is subscribed for a topic filter: the filter, or its shared subscription. */
  private subscriptionOf(filter: string): string {
    const { shareGroup } = this.config;
    return shareGroup ? `$share/${shareGroup}/${filter}` : filter;
  }

  /** Makes the subscriptions match the routes' `filters` (filter → QoS). */
  async subscribe(filters: Map<string, 0 | 1 | 2>): Promise<void> {
    this.filters = new Map(filters);
    this.wanted = new Map(
      [...coveringFilters(filters)].map(([f, qos]) => [this.subscriptionOf(f), qos === 0 ? 0 : 1]),
    );
    await this.sync();
  }

  /**
   * Brings the broker's session in line with `wanted`, one run at a time (ours, not mqtt.js': its
   * `resubscribe` knows nothing of a previous run). The record only ever names subscriptions the
   * session has: written after a SUBACK, and before an UNSUBSCRIBE.
   */
  private sync(): Promise<void> {
    this.syncing = this.syncing.then(() => this.syncNow());
    return this.syncing;
  }

  private async syncNow(): Promise<void> {
    const client = this.client;
    if (!client?.connected) return;
    const connection = this.connection;
    const gone = [...this.session.keys()].filter((s) => !this.wanted.has(s));
    const added = [...this.wanted].filter(([s, qos]) => this.resubscribeAll || this.session.get(s) !== qos);
    try {
      if (gone.length > 0) {
        for (const s of gone) this.session.delete(s);
        await this.saveSession();
        await client.unsubscribeAsync(gone);
      }
      if (added.length > 0) {
        const codes = await client
          .subscribeAsync(Object.fromEntries(added.map(([s, qos]) => [s, this.subscribeOptions(qos)])))
          .then(
            (granted) => granted.map((g) => g.qos as number),
            (err: Error & { packet?: { granted?: number[] } }) => {
              if (!err.packet?.granted) throw err;
              return err.packet.granted;
            },
          );
        if (connection !== this.connection) return; // the next connect syncs again
        added.forEach(([s, qos], i) => {
          // 0x80 and up: refused (MQTT 5 says why, e.g. 0x9E shared subscriptions not supported).
          const code = codes[i] ?? 0x80;
          if (code < 0x80) this.session.set(s, qos);
          else this.ctx.log.warn({ filter: s, reasonCode: code }, "broker refused subscription");
        });
        this.resubscribeAll = false;
      }
      await this.saveSession();
    } catch (err) {
      this.ctx.log.warn({ err: (err as Error).message }, "subscribe failed; retried on reconnect");
    }
  }

  private subscribeOptions(qos: SubscribeQos): IClientSubscribeOptions {
    if (this.config.protocolVersion !== 5) return { qos };
    // rh 1: retained messages only for a subscription the session does not have yet. No-local
    // [MQTT-3.8.3-3]: the broker does not send us our own publishes back; not allowed on a shared
    // subscription [MQTT-3.8.3-4].
    return this.config.shareGroup ? { qos, rh: 1 } : { qos, rh: 1, nl: true };
  }

  private sessionKey(): string {
    return `subscriptions:${this.clientId}`;
  }

  private async loadSession(): Promise<Map<string, SubscribeQos>> {
    const saved = await this.ctx.store.get(this.sessionKey());
    return new Map(saved ? Object.entries(JSON.parse(saved) as Record<string, SubscribeQos>) : []);
  }

  private saveSession(): Promise<void> {
    return this.ctx.store.set(this.sessionKey(), JSON.stringify(Object.fromEntries(this.session)));
  }

  async publish(
    topic: string,
    payload: Buffer,
    qos: 0 | 1 | 2,
    retain: boolean,
    timeoutMs: number,
    properties?: PublishProperties,
  ): Promise<void> {
    const client = this.client;
    if (!client?.connected)
      throw new UnavailableError(`mqtt broker ${withoutCredentials(this.config.url)} not connected`);
    if (this.echoes(topic)) await this.ctx.store.countUp(this.echoKey(topic, payload), OWN_ECHO_TTL_MS);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new UnavailableError(`mqtt publish not acknowledged in ${timeoutMs} ms`)),
        timeoutMs,
      );
    });
    try {
      const options = { qos, retain, ...(properties && { properties: definedOnly(properties) }) };
      await Promise.race([client.publishAsync(topic, payload, options), timeout]);
    } catch (err) {
      if (err instanceof RetryableError) throw err;
      // An MQTT 5 PUBACK with a failure reason code is the broker refusing this publish; anything
      // else (the connection closed under it) is the broker gone.
      const refused = typeof (err as { code?: unknown }).code === "number";
      const reason = `mqtt publish failed: ${(err as Error).message}`;
      throw refused ? new RetryableError(reason) : new UnavailableError(reason);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Publishes tribridge's own availability, retained; a failure is logged (the next connect says it again). */
  private async announce(payload: string | undefined): Promise<void> {
    if (!this.own || payload === undefined) return;
    try {
      await this.publish(this.own.topic, Buffer.from(payload), 1, true, ANNOUNCE_TIMEOUT_MS);
    } catch (err) {
      this.ctx.log.warn(
        { err: (err as Error).message, topic: this.own.topic },
        "could not publish tribridge's availability",
      );
    }
  }

  async stop(): Promise<void> {
    const client = this.client;
    if (!client) return;
    if (client.connected) await this.announce(this.own?.offline);
    // A DISCONNECT waits for publishes in flight, which a broker that stopped answering never
    // acknowledges: then the connection is just closed (and the broker publishes the will).
    await client.endAsync(Object.keys(client.outgoing).length > 0);
  }
}

/** MQTT 5 properties tribridge publishes with (request-response.ts). */
export interface PublishProperties {
  responseTopic?: string;
  correlationData?: Buffer;
}

/** mqtt-packet writes every key it is given, and fails on one that is undefined. */
function definedOnly(properties: PublishProperties): PublishProperties {
  return Object.fromEntries(Object.entries(properties).filter(([, v]) => v !== undefined));
}

/** MQTT 5 response topic and correlation data of a PUBLISH, where it has them. */
function responsePropertiesOf(packet: IPublishPacket): Pick<Publish, "responseTopic" | "correlationData"> {
  const { responseTopic, correlationData } = packet.properties ?? {};
  return {
    ...(responseTopic !== undefined && { responseTopic }),
    ...(correlationData !== undefined && { correlationData: Buffer.from(correlationData) }),
  };
}

/** How the account connects to its broker: its credentials, TLS, timers and session. */
export function brokerOptions(c: MqttAccount, clientId: string): IClientOptions {
  return {
    clientId,
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
    resubscribe: false, // see ExternalClient.sync()
    // MQTT 5: keep the session for a day after we disconnect (3.1.1 keeps it until clean).
    properties: c.protocolVersion === 5 && !c.cleanSession ? { sessionExpiryInterval: 86_400 } : undefined,
  };
}

/** The URL as it may be logged: `mqtt://user:pass@host` would put a password in the logs. */
export function withoutCredentials(url: string): string {
  return url.replace(/\/\/[^/@]*@/, "//");
}
