/**
 * The embedded MQTT broker (aedes, MQTT 3.1.1): devices connect to tribridge directly.
 *
 * Ingest happens in aedes' `authorizePublish` hook because it is the last hook before the PUBACK
 * (aedes writes the PUBACK before `published`): a QoS 1 message is durably enqueued before the device
 * hears it was received. If enqueueing fails, the hook errors and aedes drops the connection without
 * PUBACK, so the device sends it again. A publish the broker refuses (ACL, size) is acknowledged and
 * dropped instead, as Mosquitto does: refused with a disconnect, a device would re-send it forever.
 */
import { createServer as createNetServer, type Server as NetServer } from "node:net";
import { createServer as createTlsServer } from "node:tls";
import { createServer as createHttpServer, type IncomingMessage, type Server as HttpServer } from "node:http";
import type { Duplex } from "node:stream";
import { timingSafeEqual, createHash } from "node:crypto";
import type { EventEmitter } from "node:events";
import {
  Aedes,
  type AuthenticateError,
  type Client,
  type ConnectPacket,
  type PublishPacket,
  type Subscription,
} from "aedes";
import redisPersistence, { type RedisPersistence } from "aedes-persistence-redis";
import { Cluster, Redis, type RedisOptions } from "ioredis";
import { WebSocketServer, createWebSocketStream } from "ws";
import type { Logger } from "../../src/log.js";
import type { ConnectorContext, RedisClusterNodes } from "../../src/connector.js";
import { guardMalformedPackets } from "./malformed-packet-guard.js";
import { ConnectionLimits } from "./connection-limits.js";
import { PACKET_OVERHEAD_BYTES } from "./packet-size-guard.js";
import type { Publish } from "./publish.js";
import { Acl } from "./acl.js";
import { aclRulesSchema, anonymousAllowed, type EmbeddedBrokerConfig } from "./schema.js";
import { SessionPresence } from "./session-presence.js";
import { SessionSubscriptions, type SubscriptionPersistence } from "./session-subscriptions.js";
import { deliverWholeQueues, type OutgoingPersistence } from "./offline-queue.js";
import { PersistenceFailures, type GuardedPersistence } from "./persistence-failures.js";
import { topicFilterProblem, topicNameProblem } from "./topic.js";
import { topicLimitProblem } from "./topic-limits.js";

export interface IncomingPublish extends Publish {
  clientId: string;
  username: string | undefined;
}

type User = EmbeddedBrokerConfig["users"][number];

function authError(message: string, returnCode: 2 | 3 | 4 | 5): AuthenticateError {
  return Object.assign(new Error(message), { returnCode }) as AuthenticateError;
}

function sameSecret(a: string, b: Buffer): boolean {
  // Hash both so the comparison takes the same time whatever the lengths.
  const ha = createHash("sha256").update(a).digest();
  const hb = createHash("sha256").update(b).digest();
  return timingSafeEqual(ha, hb);
}

const SYS_PREFIX = "$SYS";
/** How long a client id stays its user's, and a session without subscriptions is kept, after the last CONNECT. */
const CLIENT_OWNER_TTL_SEC = 30 * 24 * 3600;
/** Atomic, so two users connecting with one client id at once cannot both claim it (see claimClientId). */
const CLAIM_CLIENT_ID = `
local owner = redis.call("GET", KEYS[1])
if owner == false or owner == ARGV[1] or owner == "" or ARGV[3] == "1" then
  redis.call("SET", KEYS[1], ARGV[1], "EX", ARGV[2])
  return 1
end
return 0`;

/** A will as aedes stores it: with the client it belongs to and the broker (run) that stored it. */
type StoredWill = PublishPacket & { clientId?: string; brokerId?: string };

/**
 * On a Redis Cluster, a Cluster handed to aedes-persistence-redis as `conn` *without* its `cluster`
 * flag: every key carries the bridge's hash tag (in keyPrefix), so all of them share one slot and the
 * library's single-Redis ways work there (one `retained` hash read by HSCAN, DEL of several keys).
 * Its cluster mode would instead SCAN each primary for `retained:*`, a pattern ioredis does not
 * prefix, and so miss every retained message under our keyPrefix.
 */
function redisConnection({ url, keyPrefix, cluster }: ConnectorContext["redis"]): Redis {
  const options = { keyPrefix, maxRetriesPerRequest: null, connectionName: "tribridge-mqtt-persistence" };
  const redis = cluster
    ? clusterConnection(cluster, options)
    : url.startsWith("unix://")
      ? new Redis({ ...options, path: url.slice("unix://".length) })
      : new Redis(url, options);
  redis.on("error", () => undefined); // reconnects by itself; the broker reports what fails
  // aedes-persistence-redis sends these without awaiting them: one that fails because the
  // connection is closing (a will published as the broker stops) would be an unhandled rejection.
  // (Which commands those are is checked in test/unit/dependency-internals.test.ts.)
  const unawaited = redis as unknown as Record<"lrem" | "rpush", (...args: unknown[]) => Promise<unknown>>;
  for (const name of ["lrem", "rpush"] as const) {
    const command = unawaited[name].bind(redis);
    unawaited[name] = (...args) => {
      const reply = command(...args);
      reply.catch(() => undefined);
      return reply;
    };
  }
  return redis;
}

/** Typed as a Redis, as the library takes it: the commands it and this file send behave alike on both. */
function clusterConnection(
  { nodes, username, password, tls }: RedisClusterNodes,
  { keyPrefix, ...options }: { keyPrefix: string } & RedisOptions,
): Redis {
  const redisOptions = { ...options, username, password, ...(tls && { tls: {} }) };
  return new Cluster(
    nodes.map((n) => ({ ...n })),
    { keyPrefix, redisOptions },
  ) as unknown as Redis;
}

export class EmbeddedBroker {
  private broker: Aedes | undefined;
  private readonly servers: (NetServer | HttpServer)[] = [];
  private wss: WebSocketServer | undefined;
  private readonly usersByClient = new WeakMap<Client, User | undefined>();
  private readonly anonymous: boolean;
  private readonly anonymousAcl: Acl;
  private readonly userAcls = new Map<User, Acl>();
  /** Each admitted client's ACL: its user's, or the anonymous one. */
  private readonly acls = new WeakMap<Client, Acl>();
  private persistenceConnection: Redis | undefined;
  private sessions: SessionPresence | undefined;
  private persistence: RedisPersistence | undefined;
  private subscriptions: SessionSubscriptions | undefined;
  private persistenceFailures: PersistenceFailures | undefined;
  private readonly limits: ConnectionLimits;
  /** Clients that sent an empty client id but asked to resume a session. */
  private readonly unidentified = new WeakSet<Client>();
  /** Publishes authorizePublish acknowledged without passing them on. */
  private readonly dropped = new WeakSet<PublishPacket>();
  /** Client ids with a will that a previous run stored, whose devices have not connected since. */
  private readonly staleWills = new Set<string>();

  constructor(
    private readonly config: EmbeddedBrokerConfig,
    private readonly log: Logger,
    /** `client` is null for a will a previous run stored (see authorizePublish). */
    private readonly onPublish: (msg: IncomingPublish, client: Client | null) => Promise<void>,
    private readonly redis: ConnectorContext["redis"],
    private readonly onClientGone: (client: Client) => void = () => {},
  ) {
    this.anonymous = anonymousAllowed(config);
    this.anonymousAcl = new Acl(config.anonymous ?? aclRulesSchema.parse({}));
    for (const user of config.users) this.userAcls.set(user, new Acl(user));
    this.limits = new ConnectionLimits(config, log);
  }

  /** The TCP port actually bound (useful with port 0). */
  port = 0;
  websocketPort = 0;
  tlsPort = 0;

  async start(): Promise<void> {
    // Retained messages, wills and the sessions/offline queues of devices survive restarts in Redis.
    this.persistenceConnection = redisConnection(this.redis);
    const persistence = redisPersistence({ conn: this.persistenceConnection });
    this.persistence = persistence;
    this.sessions = new SessionPresence(this.persistenceConnection, CLIENT_OWNER_TTL_SEC);
    const subscriptions = new SessionSubscriptions(
      persistence as unknown as SubscriptionPersistence,
      this.config.maxFiltersPerSubscribe,
      this.log,
    );
    this.subscriptions = subscriptions;
    this.persistenceFailures = new PersistenceFailures(
      persistence as unknown as GuardedPersistence,
      this.log,
    );
    deliverWholeQueues(persistence as unknown as OutgoingPersistence, this.persistenceConnection);
    const broker = await Aedes.createBroker({
      persistence,
      preConnect: (client, packet, done) => {
        this.refuseUnsupportedProtocol(packet);
        // [MQTT-3.1.3-8] no client id, no session to resume: refused in authenticate (CONNACK 2)
        if (packet.clientId === "" && !packet.clean) this.unidentified.add(client);
        done(null, true);
      },
      authenticate: (client, username, password, done) => this.authenticate(client, username, password, done),
      authorizePublish: (client, packet, done) =>
        this.unlessHeld(client, packet, done, () => this.authorizePublish(client, packet, done)),
      authorizeSubscribe: (client, sub, done) =>
        done(
          null,
          subscriptions.authorize(client, sub, () => this.authorizeSubscribe(client, sub)),
        ),
      // Also for messages queued in a session while it was offline: a session taken over by another
      // user (see claimClientId) must not hand over what that user may not read.
      authorizeForward: (client, packet) => (this.mayReceive(client, packet.topic) ? packet : null),
      heartbeatInterval: 60_000, // 1 minute; $SYS heartbeat
      connectTimeout: 30_000,
    });
    this.broker = broker;
    this.limits.watch(broker);
    this.sessions.attach(broker);
    broker.on("clientError", (client: Client, err: Error) =>
      this.log.info({ clientId: client.id, err: err.message }, "mqtt client error"),
    );
    broker.on("clientDisconnect", (client: Client) => this.onClientGone(client));
    // aedes emits its background failures (e.g. publishing stored wills while Redis is away); an
    // "error" event without a listener would end the process.
    (broker as unknown as EventEmitter).on("error", (err: Error) =>
      this.log.warn({ err: err.message }, "mqtt broker error"),
    );
    this.skipDropped(broker);
    for await (const will of persistence.streamWill({}))
      if (will.brokerId !== broker.id) this.staleWills.add(will.clientId);

    try {
      await this.listenAll(broker);
    } catch (err) {
      await this.stop();
      throw err;
    }
  }

  /**
   * [MQTT-3.1.2-2] a protocol level this MQTT 3.1.1 broker does not speak (MQTT 5 is level 5) gets
   * CONNACK 0x01 "unacceptable protocol version" and the connection is closed: aedes does both,
   * right after this hook. The log says what to do about it.
   */
  private refuseUnsupportedProtocol(packet: ConnectPacket): void {
    const level = packet.protocolVersion;
    if (level === 3 || level === 4) return;
    this.log.warn(
      { clientId: packet.clientId, protocolLevel: level },
      level === 5
        ? "mqtt connect refused: the embedded broker speaks MQTT 3.1.1, not MQTT 5; connect the device with MQTT 3.1.1 (protocol version 4), or run an external broker that speaks MQTT 5 (e.g. Mosquitto) and give this account its url instead of embedded"
        : "mqtt connect refused: unsupported protocol level; the embedded broker speaks MQTT 3.1.1 (protocol version 4) and 3.1",
    );
  }

  /**
   * Once authorizePublish lets a publish through, aedes acknowledges it and hands it to
   * `broker.publish` (retained store, subscribers): a dropped one stops there. (aedes internals,
   * as are `_will`, `broker.clients` and the will sweep: see test/unit/dependency-internals.test.ts.)
   */
  private skipDropped(broker: Aedes): void {
    type PublishFn = (packet: PublishPacket, client: unknown, done?: (err?: Error) => void) => void;
    const publish = broker.publish.bind(broker) as PublishFn;
    const skipping: PublishFn = (packet, client, done) => {
      if (!this.dropped.has(packet)) return publish(packet, client, done);
      (typeof client === "function" ? (client as () => void) : done)?.();
    };
    broker.publish = skipping as Aedes["publish"];
  }

  /**
   * Hands a connection to aedes within the limits of connection-limits.ts (too many connections
   * authenticating, a packet larger than the size limit), closing it on a malformed packet.
   */
  private handle(broker: Aedes, stream: Duplex, req?: IncomingMessage): void {
    const client = this.limits.accept(stream, () => broker.handle(stream, req));
    if (!client) return;
    this.subscriptions?.watch(client);
    guardMalformedPackets(client, (problem, packet) => this.limits.malformed(client, problem, packet));
  }

  private async listenAll(broker: Aedes): Promise<void> {
    const tcp = createNetServer((socket) => this.handle(broker, socket));
    this.port = await this.listen(tcp, this.config.port, "port");
    if (this.config.tls) {
      const tls = createTlsServer({ cert: this.config.tls.cert, key: this.config.tls.key }, (socket) =>
        this.handle(broker, socket),
      );
      this.tlsPort = await this.listen(tls, this.config.tls.port, "tls.port");
    }
    if (this.config.websocketPort !== undefined) {
      const http = createHttpServer((_req, res) => res.writeHead(426, { Upgrade: "websocket" }).end());
      this.websocketPort = await this.listen(http, this.config.websocketPort, "websocketPort");
      // Made once listening: it re-emits the server's errors, which would end the process unheard.
      this.wss = new WebSocketServer({
        server: http,
        // ws buffers a whole message before the packet-size guard sees it: cap it the same way.
        maxPayload: this.config.maxPayloadBytes + PACKET_OVERHEAD_BYTES,
        // MQTT over WebSocket uses the "mqtt" subprotocol (MQTT 3.1.1 §6.0).
        handleProtocols: (protocols) =>
          protocols.has("mqtt") ? "mqtt" : protocols.has("mqttv3.1") ? "mqttv3.1" : false,
      });
      this.wss.on("error", (err) => this.log.warn({ err: err.message }, "mqtt websocket server error"));
      this.wss.on("connection", (ws, req) => this.handle(broker, createWebSocketStream(ws), req));
    }
  }

  private listen(server: NetServer | HttpServer, port: number, key: string): Promise<number> {
    this.servers.push(server);
    return new Promise((resolve, reject) => {
      server.once("error", (err: NodeJS.ErrnoException) => {
        const why =
          err.code === "EADDRINUSE"
            ? `port ${port} on ${this.config.host} is already in use (set embedded.${key} to a free port, or stop the other broker)`
            : `cannot listen on ${this.config.host}:${port}: ${err.message}`;
        reject(new Error(`embedded MQTT broker: ${why}`));
      });
      server.listen(port, this.config.host, () => {
        const address = server.address();
        resolve(typeof address === "object" && address ? address.port : port);
      });
    });
  }

  private authenticate(
    client: Client,
    username: string | undefined,
    password: Buffer | undefined,
    done: (error: AuthenticateError | null, success: boolean | null) => void,
  ): void {
    if (this.unidentified.has(client)) {
      this.log.warn("mqtt connect refused: empty client id with cleanSession false");
      return done(authError("identifier rejected", 2), false);
    }
    if (username === undefined) {
      if (this.anonymous) {
        this.usersByClient.set(client, undefined);
        this.acls.set(client, this.anonymousAcl);
        return this.claimThenAdmit(client, undefined, done);
      }
      this.log.warn({ clientId: client.id }, "mqtt connect refused: no username");
      return done(authError("not authorized", 5), false);
    }
    const user = this.config.users.find((u) => u.username === username);
    if (!user || !password || !sameSecret(user.password, password)) {
      this.log.warn({ clientId: client.id, username }, "mqtt connect refused: bad username or password");
      return done(authError("bad username or password", 4), false);
    }
    if (user.clientIds && !user.clientIds.includes(client.id)) {
      this.log.warn(
        { clientId: client.id, username },
        "mqtt connect refused: client id not allowed for user",
      );
      return done(authError("client id not allowed", 5), false);
    }
    this.usersByClient.set(client, user);
    this.acls.set(client, this.userAcls.get(user)!);
    this.claimThenAdmit(client, user, done);
  }

  private claimThenAdmit(
    client: Client,
    user: User | undefined,
    done: (error: AuthenticateError | null, success: boolean | null) => void,
  ): void {
    this.claimClientId(client.id, user).then(
      (claimed) => {
        if (claimed) return this.admit(client, done);
        this.log.warn(
          { clientId: client.id, username: user?.username },
          "mqtt connect refused: client id belongs to another user",
        );
        done(authError("client id not allowed", 5), false);
      },
      (err: unknown) => {
        this.log.warn(
          { clientId: client.id, err: (err as Error).message },
          "mqtt connect refused: store unavailable",
        );
        done(authError("server unavailable", 3), false);
      },
    );
  }

  /**
   * A client id belongs to the user who first connected with it (for 30 days after its last
   * connection): another user reusing it would take over its session, and speak in rooms as its
   * device. A user who lists the id in `clientIds` may take it, and users take ids over from
   * anonymous clients, not the other way round.
   */
  private async claimClientId(clientId: string, user: User | undefined): Promise<boolean> {
    const pinned = user?.clientIds?.includes(clientId) ? "1" : "0";
    const claimed = await this.persistenceConnection!.eval(
      CLAIM_CLIENT_ID,
      1,
      `client-owner:${clientId}`,
      user?.username ?? "",
      CLIENT_OWNER_TTL_SEC,
      pinned,
    );
    return claimed === 1;
  }

  /**
   * A will must be publishable by its client, checked at CONNECT: a will that a previous run stored
   * is published with no client (and so no ACL) to check it against. Connecting voids such a will.
   * An admitted client's session is recorded for its CONNACK (see session-presence.ts).
   */
  private admit(
    client: Client,
    done: (error: AuthenticateError | null, success: boolean | null) => void,
  ): void {
    const will = (client as Client & { _will?: { topic?: string } })._will;
    const refused = will?.topic === undefined ? undefined : this.topicRefusal(client, will.topic);
    if (refused) {
      this.log.warn(
        { clientId: client.id, topic: will?.topic, reason: refused },
        "mqtt connect refused: will topic not allowed",
      );
      return done(authError("will topic not allowed", 5), false);
    }
    this.sessions!.open(client).then(
      () => {
        this.staleWills.delete(client.id);
        done(null, true);
      },
      (err: unknown) => {
        this.log.warn(
          { clientId: client.id, err: (err as Error).message },
          "mqtt connect refused: store unavailable",
        );
        done(authError("server unavailable", 3), false);
      },
    );
  }

  /** Whether `client`'s CONNACK said its session was there [MQTT-3.2.2-2]. */
  sessionResumed(client: Client): boolean {
    return this.sessions?.resumed(client) ?? false;
  }

  private mayReceive(client: Client, topic: string): boolean {
    return this.acls.get(client)?.mayReceive(topic) ?? false;
  }

  /** `client` null: a will a previous run stored, checked against its client's ACL at CONNECT. */
  private mayPublish(client: Client | null, topic: string): boolean {
    if (topic.startsWith(SYS_PREFIX)) return false; // [MQTT-4.7.2-1] $SYS belongs to the broker
    return client === null || (this.acls.get(client)?.mayPublish(topic) ?? false);
  }

  /**
   * [MQTT-4.3.3-2] until its PUBREL, a QoS 2 packet id the broker holds stands for the message it
   * was sent with: a re-send (DUP or not, on this connection or a resumed one) was taken in already,
   * and aedes answers it with PUBREC alone. Anything else goes on to `authorize`.
   */
  private unlessHeld(
    client: Client | null,
    packet: PublishPacket,
    done: (err?: Error | null) => void,
    authorize: () => void,
  ): void {
    if (!client || packet.qos !== 2 || packet.messageId === undefined) return authorize();
    this.persistence!.incomingGetPacket(client, packet).then(
      () => done(null),
      // not held; or the store failed, and the publish is taken in: a duplicate at worst, never a loss
      () => authorize(),
    );
  }

  private authorizePublish(
    client: Client | null,
    packet: StoredWill,
    done: (err?: Error | null) => void,
  ): void {
    const problem = topicNameProblem(packet.topic);
    if (problem) {
      // e.g. U+0000: a malformed packet, the connection is closed [MQTT-1.5.3-2]
      this.log.warn(
        { clientId: client?.id, topic: packet.topic, problem },
        "mqtt publish refused: bad topic",
      );
      return done(new Error(`topic ${problem}`));
    }
    // A will a previous run stored, brought by aedes' sweep (~4 minutes after the start): void if
    // its device has connected since, else published now, its connection being gone.
    const staleWill = packet.brokerId !== undefined && packet.brokerId !== this.broker?.id;
    if (staleWill && !this.staleWills.delete(packet.clientId ?? "")) return this.drop(packet, done);
    const publisher = staleWill ? null : client;
    const clientId = staleWill ? packet.clientId : client?.id;
    if (clientId === undefined) return done(null);
    const payload = Buffer.isBuffer(packet.payload) ? packet.payload : Buffer.from(packet.payload);
    const refused = this.refusal(publisher, packet.topic, payload.byteLength);
    if (refused) {
      this.log.warn({ clientId, topic: packet.topic, reason: refused }, "mqtt publish refused; dropped");
      return this.drop(packet, done);
    }
    const msg: IncomingPublish = {
      clientId,
      username: publisher ? this.usersByClient.get(publisher)?.username : undefined,
      topic: packet.topic,
      payload,
      qos: packet.qos,
      retain: packet.retain,
      dup: packet.dup,
      messageId: packet.messageId,
    };
    this.onPublish(msg, publisher).then(
      () => done(null),
      (err: unknown) => {
        this.log.warn(
          { clientId, err: (err as Error).message },
          "mqtt publish not enqueued; not acknowledged",
        );
        if (staleWill) this.staleWills.add(clientId); // it stays stored: the next sweep tries again
        done(err as Error);
      },
    );
  }

  /** Why `client` may not publish to `topic` (null: a stored will, checked at its CONNECT). */
  private topicRefusal(client: Client | null, topic: string): string | undefined {
    const problem = topicNameProblem(topic) ?? topicLimitProblem(topic, this.config);
    if (problem) return problem;
    if (!this.mayPublish(client, topic)) return "not allowed for this client";
    return undefined;
  }

  private refusal(client: Client | null, topic: string, bytes: number): string | undefined {
    const refused = this.topicRefusal(client, topic);
    if (refused) return refused;
    const max = this.config.maxPayloadBytes;
    if (bytes > max) return `payload of ${bytes} bytes exceeds maxPayloadBytes ${max}`;
    return undefined;
  }

  /** Lets aedes acknowledge the publish, and nothing else (see skipDropped). */
  private drop(packet: PublishPacket, done: (err?: Error | null) => void): void {
    this.dropped.add(packet);
    done(null);
  }

  private authorizeSubscribe(client: Client, sub: Subscription): Subscription | null {
    const refused =
      topicFilterProblem(sub.topic) ??
      topicLimitProblem(sub.topic, this.config) ??
      (this.acls.get(client)?.maySubscribe(sub.topic) ? undefined : "not allowed for this client");
    if (refused) {
      this.log.warn({ clientId: client.id, filter: sub.topic, reason: refused }, "mqtt subscribe refused");
      return null; // SUBACK failure 0x80 [MQTT-3.9.3-2]
    }
    return sub;
  }

  /** Publishes as the broker itself; resolves when handed to subscribers and queued for offline ones. */
  publish(topic: string, payload: Buffer, qos: 0 | 1 | 2, retain: boolean): Promise<void> {
    const broker = this.broker;
    if (!broker) return Promise.reject(new Error("embedded broker not started"));
    return new Promise((resolve, reject) =>
      broker.publish({ cmd: "publish", topic, payload, qos, retain, dup: false }, (err) =>
        err ? reject(err) : resolve(),
      ),
    );
  }

  async stop(): Promise<void> {
    // Stop accepting first; the servers' close callbacks fire once aedes has closed its clients.
    const closed = this.servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve())));
    this.wss?.close();
    const broker = this.broker;
    if (broker) {
      // Stopping is not the devices' doing: their wills stay stored, for the next run to void or
      // publish (see authorizePublish), as after a crash.
      const clients = (broker as unknown as { clients: Record<string, { will: unknown }> }).clients;
      for (const client of Object.values(clients)) client.will = null;
      await new Promise<void>((resolve) => broker.close(() => resolve()));
    }
    await Promise.all(closed);
    const redis = this.persistenceConnection;
    if (redis) {
      // A Redis that is away must not hold the stop up.
      const away = new Promise((resolve) => setTimeout(resolve, 2000).unref());
      // Reads aedes would still send after the QUIT would fail (see persistence-failures.ts).
      await Promise.race([this.persistenceFailures?.endRetainedReads(), away]);
      // quit() lets the commands aedes still has queued finish (disconnect() would fail them).
      await Promise.race([redis.quit().catch(() => undefined), away]);
      redis.disconnect();
    }
  }
}
