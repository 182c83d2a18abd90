/**
 * The embedded MQTT broker (aedes, MQTT 3.1.1): devices connect to tribridge directly.
 *
 * Ingest happens in aedes' `authorizePublish` hook because it is the last hook before the PUBACK
 * (aedes writes the PUBACK before `published`): a QoS 1 message is durably enqueued before the device
 * hears it was received. If enqueueing fails, the hook errors and aedes drops the connection without
 * PUBACK, so the device sends it again.
 */
import { createServer as createNetServer, type Server as NetServer } from "node:net";
import { createServer as createTlsServer } from "node:tls";
import { createServer as createHttpServer, type Server as HttpServer } from "node:http";
import { timingSafeEqual, createHash } from "node:crypto";
import type { EventEmitter } from "node:events";
import { Aedes, type AuthenticateError, type Client, type PublishPacket, type Subscription } from "aedes";
import redisPersistence from "aedes-persistence-redis";
import { Redis } from "ioredis";
import { WebSocketServer, createWebSocketStream } from "ws";
import type { Logger } from "../../src/log.js";
import type { Publish } from "./publish.js";
import { isLoopback, type EmbeddedBrokerConfig } from "./schema.js";
import { topicMatches } from "./topic.js";

export interface IncomingPublish extends Publish {
  clientId: string;
  username: string | undefined;
}

type User = EmbeddedBrokerConfig["users"][number];

function authError(message: string, returnCode: 4 | 5): AuthenticateError {
  return Object.assign(new Error(message), { returnCode }) as AuthenticateError;
}

function sameSecret(a: string, b: Buffer): boolean {
  // Hash both so the comparison takes the same time whatever the lengths.
  const ha = createHash("sha256").update(a).digest();
  const hb = createHash("sha256").update(b).digest();
  return timingSafeEqual(ha, hb);
}

/** Whether every topic that `inner` matches is matched by `outer` (both valid filters). */
export function filterCovers(outer: string, inner: string): boolean {
  const o = outer.split("/");
  const n = inner.split("/");
  for (let i = 0; i < o.length; i++) {
    const ol = o[i];
    if (ol === "#") return !(inner.startsWith("$") && i === 0);
    const nl = n[i];
    if (nl === undefined) return false;
    if (ol === "+") {
      if (nl === "#") return false;
      if (i === 0 && nl.startsWith("$")) return false;
      continue;
    }
    if (ol !== nl) return false;
  }
  return o.length === n.length;
}

const SYS_PREFIX = "$SYS";

function redisConnection({ url, keyPrefix }: { url: string; keyPrefix: string }): Redis {
  const options = { keyPrefix, maxRetriesPerRequest: null, connectionName: "tribridge-mqtt-persistence" };
  const redis = url.startsWith("unix://")
    ? new Redis({ ...options, path: url.slice("unix://".length) })
    : new Redis(url, options);
  redis.on("error", () => undefined); // reconnects by itself; the broker reports what fails
  return redis;
}

export class EmbeddedBroker {
  private broker: Aedes | undefined;
  private readonly servers: (NetServer | HttpServer)[] = [];
  private wss: WebSocketServer | undefined;
  private readonly usersByClient = new WeakMap<Client, User | undefined>();
  private readonly anonymous: boolean;
  private persistenceConnection: Redis | undefined;

  constructor(
    private readonly config: EmbeddedBrokerConfig,
    private readonly log: Logger,
    private readonly onPublish: (msg: IncomingPublish, client: Client) => Promise<void>,
    private readonly redis: { url: string; keyPrefix: string },
    private readonly onClientGone: (client: Client) => void = () => {},
  ) {
    this.anonymous = config.allowAnonymous ?? (config.users.length === 0 && isLoopback(config.host));
  }

  /** The TCP port actually bound (useful with port 0). */
  port = 0;
  websocketPort = 0;
  tlsPort = 0;

  async start(): Promise<void> {
    // Retained messages and the sessions/offline queues of devices survive restarts in Redis.
    this.persistenceConnection = redisConnection(this.redis);
    const broker = await Aedes.createBroker({
      persistence: redisPersistence({ conn: this.persistenceConnection }),
      authenticate: (client, username, password, done) => this.authenticate(client, username, password, done),
      authorizePublish: (client, packet, done) => this.authorizePublish(client, packet, done),
      authorizeSubscribe: (client, sub, done) => done(null, this.authorizeSubscribe(client, sub)),
      heartbeatInterval: 60_000, // 1 minute; $SYS heartbeat
      connectTimeout: 30_000,
    });
    this.broker = broker;
    broker.on("clientError", (client: Client, err: Error) =>
      this.log.info({ clientId: client.id, err: err.message }, "mqtt client error"),
    );
    broker.on("clientDisconnect", (client: Client) => this.onClientGone(client));
    // aedes emits its background failures (e.g. publishing stored wills while Redis is away); an
    // "error" event without a listener would end the process.
    (broker as unknown as EventEmitter).on("error", (err: Error) =>
      this.log.warn({ err: err.message }, "mqtt broker error"),
    );

    const tcp = createNetServer((socket) => broker.handle(socket));
    this.port = await this.listen(tcp, this.config.port, "port");
    if (this.config.tls) {
      const tls = createTlsServer({ cert: this.config.tls.cert, key: this.config.tls.key }, (socket) =>
        broker.handle(socket),
      );
      this.tlsPort = await this.listen(tls, this.config.tls.port, "tls.port");
    }
    if (this.config.websocketPort !== undefined) {
      const http = createHttpServer((_req, res) => res.writeHead(426, { Upgrade: "websocket" }).end());
      this.wss = new WebSocketServer({
        server: http,
        // MQTT over WebSocket uses the "mqtt" subprotocol (MQTT 3.1.1 §6.0).
        handleProtocols: (protocols) =>
          protocols.has("mqtt") ? "mqtt" : protocols.has("mqttv3.1") ? "mqttv3.1" : false,
      });
      this.wss.on("connection", (ws, req) => broker.handle(createWebSocketStream(ws), req));
      this.websocketPort = await this.listen(http, this.config.websocketPort, "websocketPort");
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
    if (username === undefined) {
      if (this.anonymous) {
        this.usersByClient.set(client, undefined);
        return this.checkWill(client, done);
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
    this.checkWill(client, done);
  }

  /**
   * A will must be publishable by its client, checked at CONNECT: aedes publishes the wills a
   * previous run of the broker left behind with no client (and so no ACL) to check them against.
   */
  private checkWill(
    client: Client,
    done: (error: AuthenticateError | null, success: boolean | null) => void,
  ): void {
    const will = (client as Client & { _will?: { topic?: string } })._will;
    if (will?.topic === undefined || this.mayPublish(client, will.topic)) return done(null, true);
    this.log.warn({ clientId: client.id, topic: will.topic }, "mqtt connect refused: will topic not allowed");
    done(authError("will topic not allowed", 5), false);
  }

  private mayPublish(client: Client, topic: string): boolean {
    if (topic.startsWith(SYS_PREFIX)) return false; // [MQTT-4.7.2-1] $SYS belongs to the broker
    const user = this.usersByClient.get(client);
    return !user || user.publish.some((f) => topicMatches(f, topic));
  }

  private authorizePublish(
    client: Client | null,
    packet: PublishPacket,
    done: (err?: Error | null) => void,
  ): void {
    if (!client) return done(null);
    if (!this.mayPublish(client, packet.topic)) {
      this.log.warn(
        { clientId: client.id, topic: packet.topic },
        "mqtt publish refused by ACL; disconnecting client",
      );
      return done(new Error("publish not authorized"));
    }
    const payload = Buffer.isBuffer(packet.payload) ? packet.payload : Buffer.from(packet.payload);
    if (payload.byteLength > this.config.maxPayloadBytes) {
      this.log.warn(
        {
          clientId: client.id,
          topic: packet.topic,
          bytes: payload.byteLength,
          max: this.config.maxPayloadBytes,
        },
        "mqtt publish refused: payload too large; disconnecting client",
      );
      return done(new Error("payload too large"));
    }
    const msg: IncomingPublish = {
      clientId: client.id,
      username: this.usersByClient.get(client)?.username,
      topic: packet.topic,
      payload,
      qos: packet.qos,
      retain: packet.retain,
      dup: packet.dup,
      messageId: packet.messageId,
    };
    this.onPublish(msg, client).then(
      () => done(null),
      (err: unknown) => {
        this.log.warn(
          { clientId: client.id, err: (err as Error).message },
          "mqtt publish not enqueued; not acknowledged",
        );
        done(err as Error);
      },
    );
  }

  private authorizeSubscribe(client: Client, sub: Subscription): Subscription | null {
    const user = this.usersByClient.get(client);
    const allowed = user
      ? user.subscribe.some((f) => filterCovers(f, sub.topic))
      : !sub.topic.startsWith(SYS_PREFIX);
    if (!allowed) {
      this.log.warn({ clientId: client.id, filter: sub.topic }, "mqtt subscribe refused by ACL");
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
    if (broker) await new Promise<void>((resolve) => broker.close(() => resolve()));
    await Promise.all(closed);
    this.persistenceConnection?.disconnect();
  }
}
