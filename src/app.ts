/**
 * Wires one running bridge: Redis, the Matrix side, the queues, the connectors, the routes.
 * No side effects at import; `start` returns a handle whose `stop` undoes everything.
 */
import { createHash } from "node:crypto";
import { hostname } from "node:os";
import type { Redis } from "ioredis";
import type {
  Attachment,
  Connector,
  ConnectorDefinition,
  ConnectorState,
  EndpointBinding,
  InboundMessage,
  MessageBody,
  OutboundMessage,
} from "./connector.js";
import type { Config, ResolvedEndpoint } from "./config/load.js";
import { PermanentError, errorMessage } from "./errors.js";
import { moduleLogger } from "./log.js";
import { AppserviceServer, type MatrixEvent } from "./matrix/appservice-server.js";
import { fileContent, fromMatrixContent, toMatrixContent } from "./matrix/format.js";
import { botUserId, ghostUserId } from "./matrix/ids.js";
import { MatrixClient } from "./matrix/matrix-client.js";
import type { Registration } from "./matrix/registration.js";
import { startEmbeddedRedis, type EmbeddedRedis } from "./queue/embedded-redis.js";
import { OrderedQueue, jobIdFor, type FailedJob } from "./queue/ordered-queue.js";
import { warnAboutRedisSettings } from "./queue/redis-check.js";
import { RouteTable } from "./routing/route-table.js";
import { RedisKeyValueStore, connectRedis } from "./store/redis-store.js";

export interface StartOptions {
  config: Config;
  registration: Registration;
  connectors: readonly ConnectorDefinition[];
}

export interface RunningBridge {
  readonly appservicePort: number;
  /** The live connector of `<name>.<account>` (tests read the ports an embedded broker bound). */
  connector(ref: string): Connector<unknown> | undefined;
  connectorStates(): Record<string, { state: ConnectorState; reason?: string }>;
  failedJobs(): Promise<FailedJob[]>;
  stop(): Promise<void>;
}

/** A remote message on its way into a room. */
interface ToMatrixJob {
  endpointId: string;
  connector: string;
  account: string;
  sender: { id: string; displayName?: string };
  body: MessageBody;
  attachment?: Attachment;
}

/** A room message on its way out to one endpoint. */
interface ToRemoteJob {
  endpointId: string;
  roomId: string;
  sender: string;
  /** The event's content; rendered for the far side when delivered, with the sender's current name. */
  content: Record<string, unknown>;
  timestamp: number;
}

const SEEN_EVENT_TTL_SEC = 7 * 24 * 3600; // longer than any homeserver keeps retrying a transaction
const log = moduleLogger("app");

export async function start({ config, registration, connectors }: StartOptions): Promise<RunningBridge> {
  const names = new Set<string>();
  for (const c of connectors) {
    if (names.has(c.name)) throw new Error(`two connectors are named "${c.name}"`);
    names.add(c.name);
  }
  const cleanups: (() => Promise<void>)[] = [];
  const lifetime = new AbortController();
  const stop = async () => {
    lifetime.abort();
    for (const cleanup of cleanups.reverse()) {
      await cleanup().catch((err: unknown) => log.warn({ err: errorMessage(err) }, "error while stopping"));
    }
  };

  try {
    // Redis: an external one, or a private child process.
    let redisUrl = config.queue.redisUrl;
    if (!redisUrl) {
      const embedded: EmbeddedRedis = await startEmbeddedRedis(config.dataDir, log);
      cleanups.push(() => embedded.stop());
      redisUrl = embedded.url;
    }
    const redis: Redis = connectRedis(redisUrl, "main", { autoPipelining: true });
    cleanups.push(async () => void redis.disconnect());
    await redis.ping();
    await warnAboutRedisSettings(redis, log);

    const prefix = config.queue.prefix;
    const routes = new RouteTable(config.routes);
    const domain = config.homeserver.domain;
    const bot = botUserId(registration.sender_localpart, domain);
    const naming = { ghostPrefix: config.appservice.ghostPrefix, domain };
    const ours = registration.namespaces.users.map((n) => new RegExp(n.regex));
    const isOurs = (userId: string) => userId === bot || ours.some((r) => r.test(userId));
    const instanceId = createHash("sha1")
      .update(`${hostname()}|${config.dataDir}|${prefix}|${config.appservice.port}`)
      .digest("hex")
      .slice(0, 16);

    const matrix = new MatrixClient({
      homeserverUrl: config.homeserver.url,
      domain,
      botUserId: bot,
      botDisplayName: config.appservice.botDisplayName,
      registration,
      log: moduleLogger("matrix"),
    });
    cleanups.push(async () => matrix.stop());

    const queueDefaults = {
      prefix,
      redisUrl,
      shards: config.queue.shards,
      retry: {
        maxAttempts: config.queue.maxAttempts,
        initialDelayMs: config.queue.initialRetryDelayMs,
        maxDelayMs: config.queue.maxRetryDelayMs,
      },
      keepCompleted: config.queue.keepCompletedJobs,
      keepFailed: config.queue.keepFailedJobs,
      instanceId,
    };
    const defs = new Map(connectors.map((c) => [c.name, c]));

    /** The route's room id, with the bot joined. Learnt once; the join is retried until it works. */
    const roomIdFor = async (routeId: string): Promise<string> => {
      let roomId = routes.roomIdOf(routeId);
      if (!roomId) {
        const route = routes.routes.find((r) => r.id === routeId)!;
        roomId = await matrix.resolveOrCreateRoom(route.room, route.invite);
        routes.setRoomId(routeId, roomId); // known before joining, so an invite to it is recognised
      }
      await matrix.joinBot(roomId);
      return roomId;
    };

    const toMatrix = new OrderedQueue<ToMatrixJob>({
      ...queueDefaults,
      name: "to-matrix",
      log: moduleLogger("queue", { queue: "to-matrix" }),
      process: async (job, { id }) => {
        const found = routes.inbound(job.endpointId);
        if (!found) throw new PermanentError(`endpoint ${job.endpointId} is no longer configured`);
        const roomId = await roomIdFor(found.route.id);
        const def = defs.get(job.connector);
        if (!def) throw new PermanentError(`connector ${job.connector} is not installed`);
        const sender = {
          userId: ghostUserId(naming, def.ghostTag, job.account, job.sender.id),
          displayName: job.sender.displayName ?? job.sender.id,
        };
        let content = toMatrixContent(job.body);
        if (job.attachment) {
          const data = Buffer.from(job.attachment.dataBase64, "base64");
          const mxc = await matrix.upload(sender, data, job.attachment.name, job.attachment.mimeType);
          content = fileContent(job.attachment.name, job.attachment.mimeType, data.byteLength, mxc);
        }
        await matrix.sendAs(sender, roomId, "m.room.message", content, id);
      },
    });
    cleanups.push(() => toMatrix.stop());

    // Connector instances, one per account.
    const instances = new Map<string, Connector<unknown>>();
    const states: Record<string, { state: ConnectorState; reason?: string }> = {};
    const bindingOf = (e: ResolvedEndpoint): EndpointBinding<unknown> => ({
      id: e.id,
      direction: e.direction,
      spec: e.spec,
    });

    const toRemote = new Map<string, OrderedQueue<ToRemoteJob>>();
    for (const def of connectors) {
      if (!config.accounts.some((a) => a.connector === def.name)) continue;
      const queue = new OrderedQueue<ToRemoteJob>({
        ...queueDefaults,
        name: `to-${def.name}`,
        log: moduleLogger("queue", { queue: `to-${def.name}` }),
        process: async (job, { id }) => {
          const endpoint = routes.outbound(job.endpointId);
          if (!endpoint) throw new PermanentError(`endpoint ${job.endpointId} is no longer configured`);
          const instance = instances.get(`${endpoint.connector}.${endpoint.account}`);
          if (!instance)
            throw new PermanentError(`account ${endpoint.connector}.${endpoint.account} is not running`);
          const displayName = await matrix.displayName(job.roomId, job.sender);
          const body = fromMatrixContent(job.content, displayName);
          if (!body) throw new PermanentError("not a message tribridge relays");
          const message: OutboundMessage = {
            id,
            sender: { userId: job.sender, displayName },
            body,
            timestamp: job.timestamp,
          };
          await instance.send(message, bindingOf(endpoint));
        },
      });
      toRemote.set(def.name, queue);
      cleanups.push(() => queue.stop());
    }

    for (const { connector: name, account, config: accountConfig } of config.accounts) {
      const def = defs.get(name)!;
      const ref = `${name}.${account}`;
      const clog = moduleLogger("connector", { connector: name, account });
      states[ref] = { state: "connecting" };
      const emit = async (msg: InboundMessage): Promise<void> => {
        for (const endpointId of msg.endpointIds) {
          const found = routes.inbound(endpointId);
          if (!found) {
            clog.warn(
              { endpointId },
              "connector emitted for an endpoint that relays nothing in; not relayed",
            );
            continue;
          }
          const jobId = jobIdFor("in", ref, msg.remoteId, endpointId);
          const job: ToMatrixJob = {
            endpointId,
            connector: name,
            account,
            sender: msg.sender,
            body: msg.body,
          };
          if (msg.attachment) job.attachment = msg.attachment;
          await toMatrix.add(found.route.room, jobId, job);
        }
      };
      const instance = def.create(account, accountConfig, {
        log: clog,
        signal: lifetime.signal,
        store: new RedisKeyValueStore(redis, `${prefix}:kv:${ref}:`),
        redis: { url: redisUrl, keyPrefix: `${prefix}:${ref}:` },
        emit,
        setState: (state, reason) => {
          const prev = states[ref];
          if (prev?.state !== state || prev.reason !== reason)
            clog.info({ state, reason }, "connector state");
          states[ref] = reason === undefined ? { state } : { state, reason };
        },
      });
      await instance.start();
      cleanups.push(() => instance.stop());
      instances.set(ref, instance);
      await instance.watch(routes.endpointsOf(name, account).map(bindingOf));
    }

    // Matrix → remote: transactions from the homeserver.
    // Every event takes the same awaits, so their items are enqueued in the order of the transaction.
    const relayEvent = async (ev: MatrixEvent): Promise<void> => {
      if (isOurs(ev.sender)) return; // loop guard: never relay what our bot or ghosts said
      if (ev.type === "m.room.member" && ev.state_key !== undefined) {
        matrix.noteMember(ev.room_id, ev.state_key, ev.content);
        if (ev.state_key === bot && ev.content.membership === "invite" && routes.isRouteRoom(ev.room_id)) {
          matrix
            .joinBot(ev.room_id)
            .then(() => log.info({ roomId: ev.room_id }, "joined a route's room after an invite"))
            .catch((err: unknown) => log.warn({ err: errorMessage(err) }, "join after invite failed"));
        }
        if (ev.content.membership === "leave" || ev.content.membership === "ban") {
          matrix.forgetMembership(ev.state_key, ev.room_id); // kicked: join again before the next send
        }
        return;
      }
      if (ev.type !== "m.room.message" || !routes.isRouteRoom(ev.room_id)) return;
      const seenKey = `${prefix}:seen-event:${ev.event_id}`;
      if ((await redis.exists(seenKey)) === 1) return;
      if (!fromMatrixContent(ev.content, ev.sender)) {
        log.debug(
          { eventId: ev.event_id, msgtype: ev.content.msgtype },
          "room message not relayed (edit or unsupported msgtype)",
        );
      } else {
        const job = {
          roomId: ev.room_id,
          sender: ev.sender,
          content: ev.content,
          timestamp: ev.origin_server_ts ?? Date.now(),
        };
        await Promise.all(
          routes.outboundForRoom(ev.room_id).map((endpoint) =>
            toRemote.get(endpoint.connector)!.add(ev.room_id, jobIdFor("out", ev.event_id, endpoint.id), {
              ...job,
              endpointId: endpoint.id,
            }),
          ),
        );
      }
      await redis.set(seenKey, "1", "EX", SEEN_EVENT_TTL_SEC);
    };

    const onEvents = async (events: MatrixEvent[]): Promise<void> => {
      await Promise.all(events.map(relayEvent));
    };

    const server = new AppserviceServer(
      registration.hs_token,
      {
        seenTransaction: async (fp) => (await redis.exists(`${prefix}:txn:${fp}`)) === 1,
        markTransaction: async (fp) =>
          void (await redis.set(`${prefix}:txn:${fp}`, "1", "EX", SEEN_EVENT_TTL_SEC)),
        onEvents,
        userExists: (userId) => userId === bot,
      },
      moduleLogger("appservice"),
    );
    await server.listen(config.appservice.port, config.appservice.bind);
    cleanups.push(() => server.close());
    log.info({ port: server.port, bind: config.appservice.bind }, "appservice listening");

    await matrix.start(lifetime.signal);
    for (const route of routes.routes) {
      try {
        await roomIdFor(route.id);
      } catch (err) {
        log.warn(
          { route: route.id, room: route.room, err: errorMessage(err) },
          `cannot join the route's room yet; invite ${bot}`,
        );
      }
    }

    await toMatrix.start();
    for (const q of toRemote.values()) await q.start();
    log.info({ routes: routes.routes.length, accounts: config.accounts.length }, "tribridge started");

    return {
      appservicePort: server.port,
      connector: (ref) => instances.get(ref),
      connectorStates: () => structuredClone(states),
      failedJobs: async () => [
        ...(await toMatrix.failedJobs()),
        ...(await Promise.all([...toRemote.values()].map((q) => q.failedJobs()))).flat(),
      ],
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}
