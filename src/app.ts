/**
 * Wires one running bridge: Redis, the Matrix side, the queues, the connectors, the routes.
 * No side effects at import; `start` returns a handle whose `stop` undoes everything.
 */
import { createHash } from "node:crypto";
import { hostname } from "node:os";
import type { Redis } from "ioredis";
import type { Connector, ConnectorDefinition, ConnectorState, InboundMessage } from "./connector.js";
import type { Config } from "./config/load.js";
import { bridgeCommands } from "./control.js";
import { ConfigError, errorMessage } from "./errors.js";
import { moduleLogger } from "./log.js";
import { Metrics } from "./metrics.js";
import { AppserviceServer } from "./matrix/appservice-server.js";
import { EventIntake, SEEN_EVENT_TTL_SEC, type ToRemoteJob } from "./matrix/event-intake.js";
import { botUserId } from "./matrix/ids.js";
import { adminMatcher } from "./matrix/commands.js";
import { LiveMessages } from "./matrix/live-messages.js";
import { MatrixClient } from "./matrix/matrix-client.js";
import { registrationMismatch, type Registration } from "./matrix/registration.js";
import { RemoteDelivery } from "./matrix/remote-delivery.js";
import { RoomDelivery, type ToMatrixJob } from "./matrix/room-delivery.js";
import { followRoomUpgrades } from "./matrix/room-upgrade.js";
import { startEmbeddedRedis, type EmbeddedRedis } from "./queue/embedded-redis.js";
import { TO_MATRIX_QUEUE, connectorsInUse, toConnectorQueue } from "./queue/queue-names.js";
import { OrderedQueue, jobIdFor, type FailedJob } from "./queue/ordered-queue.js";
import { warnAboutRedisSettings } from "./queue/redis-check.js";
import { RouteTable, bindingOf } from "./routing/route-table.js";
import { redisKeys } from "./store/keys.js";
import { MAIN_CONNECTION, RedisKeyValueStore, connectRedis } from "./store/redis-store.js";

export interface StartOptions {
  config: Config;
  registration: Registration;
  connectors: readonly ConnectorDefinition[];
  /** Aborting it while start() still waits (for the homeserver, say) stops what started and rejects. */
  signal?: AbortSignal;
}

export interface RunningBridge {
  readonly appservicePort: number;
  /** Where /metrics is served, when metrics.enabled. */
  readonly metricsPort: number | undefined;
  /** The live connector of `<name>.<account>` (tests read the ports an embedded broker bound). */
  connector(ref: string): Connector<unknown> | undefined;
  connectorStates(): Record<string, { state: ConnectorState; reason?: string }>;
  failedJobs(): Promise<FailedJob[]>;
  stop(): Promise<void>;
}

const log = moduleLogger("app");

export async function start({
  config,
  registration,
  connectors,
  signal,
}: StartOptions): Promise<RunningBridge> {
  const names = new Set<string>();
  for (const c of connectors) {
    if (names.has(c.name)) throw new Error(`two connectors are named "${c.name}"`);
    names.add(c.name);
  }
  const mismatch = registrationMismatch(registration, config, connectors);
  if (mismatch) throw new ConfigError("", `the registration does not fit the config: ${mismatch}`);
  const cleanups: (() => Promise<void>)[] = [];
  const lifetime = new AbortController();
  signal?.addEventListener("abort", () => lifetime.abort(), { once: true });
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
    const redis: Redis = connectRedis(redisUrl, MAIN_CONNECTION, { autoPipelining: true });
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
      maxBacklogBytes: config.queue.maxBacklogMb * 2 ** 20,
      instanceId,
    };
    const defs = new Map(connectors.map((c) => [c.name, c]));
    // Read only when scraped, which starts once everything below exists.
    const metrics: Metrics | undefined = config.metrics.enabled
      ? new Metrics({ queues: () => queueStates(), connectors: () => states })
      : undefined;

    const live = new LiveMessages(redis, prefix);
    const delivery = new RoomDelivery(matrix, routes, naming, connectors, live);
    const toMatrix = new OrderedQueue<ToMatrixJob>({
      ...queueDefaults,
      name: TO_MATRIX_QUEUE,
      log: moduleLogger("queue", { queue: TO_MATRIX_QUEUE }),
      observe: metrics?.queueObserver(TO_MATRIX_QUEUE),
      process: (job, { id }) => delivery.deliver(job, id),
    });
    cleanups.push(() => toMatrix.stop());

    // Connector instances, one per account.
    const instances = new Map<string, Connector<unknown>>();
    const states: Record<string, { state: ConnectorState; reason?: string }> = {};
    // Matrix → remote: the to-<connector> queues' worker.
    const remote = new RemoteDelivery(matrix, routes, (ref) => instances.get(ref));
    const toRemote = new Map<string, OrderedQueue<ToRemoteJob>>();
    for (const def of connectorsInUse(config.accounts, connectors)) {
      const queue = new OrderedQueue<ToRemoteJob>({
        ...queueDefaults,
        name: toConnectorQueue(def.name),
        log: moduleLogger("queue", { queue: toConnectorQueue(def.name) }),
        observe: metrics?.queueObserver(toConnectorQueue(def.name)),
        process: (job, { id }) => remote.deliver(def, job, id),
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
          if (msg.stream !== undefined) job.stream = msg.stream;
          // A live message shows only the latest reading: older ones still queued can be skipped.
          const latest = found.endpoint.live
            ? `${endpointId}\u0000${msg.sender.id}\u0000${msg.stream ?? ""}`
            : undefined;
          await toMatrix.add(found.route.room, jobId, job, { latest });
          metrics?.received.inc({ connector: name, account });
        }
      };
      const instance = def.create(account, accountConfig, {
        log: clog,
        signal: lifetime.signal,
        store: new RedisKeyValueStore(redis, redisKeys.connectorStore(prefix, ref)),
        redis: { url: redisUrl, keyPrefix: redisKeys.connectorOwn(prefix, ref) },
        instanceId,
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

    const queueStates = async () =>
      Object.fromEntries(
        await Promise.all(
          [toMatrix, ...toRemote.values()].map(async (q) => [q.opts.name, await q.backlog()] as const),
        ),
      );
    // The control surface: commands to the bot (!tribridge …), for admins, in any room it is in.
    const isAdmin = adminMatcher(config.appservice.admins);
    const commands = bridgeCommands({
      config,
      connectors,
      routes,
      redis,
      matrix,
      bot,
      isAdmin,
      connectorStates: () => states,
      queueStates,
    });

    // Matrix → remote: transactions from the homeserver.
    const intake = new EventIntake({
      matrix,
      routes,
      redis,
      prefix,
      botUserId: bot,
      isOurs,
      live,
      commands,
      isAdmin,
      upgraded: followRoomUpgrades(routes, matrix, bot, log),
      enqueue: (endpoint, roomId, id, job) => toRemote.get(endpoint.connector)!.add(roomId, id, job),
      log,
    });

    const server = new AppserviceServer(
      registration.hs_token,
      {
        seenTransaction: async (fp) => (await redis.exists(redisKeys.transaction(prefix, fp))) === 1,
        markTransaction: async (fp) =>
          void (await redis.set(redisKeys.transaction(prefix, fp), "1", "EX", SEEN_EVENT_TTL_SEC)),
        onEvents: (events) => intake.handle(events),
        ignores: (event) => isOurs(event.sender),
        userExists: (userId) => userId === bot,
        observe: metrics && ((outcome) => metrics.transaction(outcome)),
      },
      moduleLogger("appservice"),
    );
    await server.listen(config.appservice.port, config.appservice.bind);
    cleanups.push(() => server.close());
    log.info({ port: server.port, bind: config.appservice.bind }, "appservice listening");

    await matrix.start(lifetime.signal);
    void matrix.reportReachability();
    for (const route of routes.routes) {
      try {
        await delivery.roomIdFor(route.id);
      } catch (err) {
        log.warn(
          { route: route.id, room: route.room, err: errorMessage(err) },
          `cannot join the route's room yet; invite ${bot}`,
        );
      }
    }

    await toMatrix.start();
    for (const q of toRemote.values()) await q.start();
    let metricsPort: number | undefined;
    if (metrics) {
      metricsPort = await metrics.listen(config.metrics.port, config.metrics.bind);
      cleanups.push(() => metrics.close());
      log.info({ port: metricsPort, bind: config.metrics.bind }, "metrics at /metrics");
    }
    log.info({ routes: routes.routes.length, accounts: config.accounts.length }, "tribridge started");

    return {
      appservicePort: server.port,
      metricsPort,
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
