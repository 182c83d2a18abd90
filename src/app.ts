/**
 * Wires one running bridge: Redis, the Matrix side, the queues, the connectors, the routes.
 * No side effects at import; `start` returns a handle whose `stop` undoes everything. Each part
 * lives in its own module; `start` only says in which order they are made and started.
 */
import path from "node:path";
import type { Redis } from "ioredis";
import type { Connector, ConnectorDefinition, ConnectorState } from "./connector.js";
import type { Config, ResolvedRoute } from "./config/load.js";
import { ConfigReload, type ReloadOutcome } from "./config/reload.js";
import { ConnectorHost } from "./connector-host.js";
import { bridgeCommands } from "./control.js";
import { ConfigError, errorMessage } from "./errors.js";
import { InstanceClaim, instanceIdIn } from "./instance-id.js";
import { Lifetime } from "./lifetime.js";
import { moduleLogger } from "./log.js";
import { Metrics } from "./metrics.js";
import { AppserviceServer } from "./matrix/appservice-server.js";
import { DeviceAvailability } from "./matrix/availability.js";
import { adminMatcher } from "./matrix/commands.js";
import { DeviceRecords } from "./matrix/crypto/device-records.js";
import { CryptoStores } from "./matrix/crypto/device-store.js";
import { EndToEnd } from "./matrix/crypto/end-to-end.js";
import { WaitingEvents } from "./matrix/crypto/waiting-events.js";
import { DeliveryFeedback } from "./matrix/delivery-feedback.js";
import { EncryptedRooms } from "./matrix/encrypted-rooms.js";
import { EventIntake, SEEN_EVENT_TTL_SEC, type ToRemoteJob } from "./matrix/event-intake.js";
import {
  bridgeStates,
  updateBridgeInfo,
  type BridgeInfoOutcome,
  type BridgeState,
} from "./matrix/bridge-info.js";
import { botUserId, readerUserId } from "./matrix/ids.js";
import { LiveMessages } from "./matrix/live-messages.js";
import { MatrixClient } from "./matrix/matrix-client.js";
import { RelayPermissions } from "./matrix/permissions.js";
import { PowerLevels, roomReader } from "./matrix/power-levels.js";
import { registrationMismatch, type Registration } from "./matrix/registration.js";
import { RemoteDelivery } from "./matrix/remote-delivery.js";
import { RoomDelivery, keptWhenDelivered, type ToMatrixJob } from "./matrix/room-delivery.js";
import { followRoomUpgrades } from "./matrix/room-upgrade.js";
import { HOMESERVER } from "./matrix/matrix-error.js";
import { DestinationHealth } from "./queue/destination-health.js";
import { startEmbeddedRedis, type EmbeddedRedis } from "./queue/embedded-redis.js";
import { TO_MATRIX_QUEUE, connectorsInUse, toConnectorQueue } from "./queue/queue-names.js";
import { OrderedQueue, jobIdFor, type FailedJob, type OrderedQueueOptions } from "./queue/ordered-queue.js";
import type { LeaseTimings } from "./queue/lease.js";
import { warnAboutRedisSettings } from "./queue/redis-check.js";
import { readiness, type ReadinessCheck } from "./readiness.js";
import { recordedEndpointLayout } from "./routing/legacy-endpoint-ids.js";
import { LiveRoutes } from "./routing/live-routes.js";
import { RoomLinks } from "./routing/room-links.js";
import { RouteTable } from "./routing/route-table.js";
import { redisKeys } from "./store/keys.js";
import { MessageMap } from "./store/message-map.js";
import { MAIN_CONNECTION, connectRedis } from "./store/redis-store.js";
import { redisKeyPrefix } from "./store/redis-url.js";

export interface StartOptions {
  config: Config;
  registration: Registration;
  connectors: readonly ConnectorDefinition[];
  /** Aborting it while start() still waits (for the homeserver, say) stops what started and rejects. */
  signal?: AbortSignal;
  /**
   * Told when the bridge cannot go on (its private redis-server keeps dying): the caller should stop
   * it and exit non-zero, so that a supervisor restarts it. Default: logged only.
   */
  onFatal?(err: Error): void;
  /** Timings of the queue shards' leases (default: LEASE_DEFAULTS); tests shorten them. */
  lease?: LeaseTimings;
  /**
   * Reads the config file again (throws ConfigErrors), for `RunningBridge.reload` and
   * `!tribridge reload`. Absent: the config cannot be reloaded (it was not read from a file).
   */
  reloadConfig?(): Config | Promise<Config>;
}

export interface RunningBridge {
  readonly appservicePort: number;
  /** Where /metrics is served, when metrics.enabled. */
  readonly metricsPort: number | undefined;
  /** The live connector of `<name>.<account>` (tests read what it bound, e.g. ports). */
  connector(ref: string): Connector<unknown> | undefined;
  connectorStates(): Record<string, { state: ConnectorState; reason?: string }>;
  failedJobs(): Promise<FailedJob[]>;
  /** Reads the config file again and applies what can change without a restart (config/reload.ts). */
  reload(): Promise<ReloadOutcome>;
  stop(): Promise<void>;
  /** While stop() runs: the parts not stopped yet (for a stop that takes too long). */
  notStopped(): string[];
}

const log = moduleLogger("app");

export async function start({
  config,
  registration,
  connectors,
  signal,
  onFatal = (err) => log.error({ err: err.message }, "the bridge cannot go on; stop it"),
  lease,
  reloadConfig,
}: StartOptions): Promise<RunningBridge> {
  checkNamesUnique(connectors);
  const mismatch = registrationMismatch(registration, config, connectors);
  if (mismatch) throw new ConfigError("", `the registration does not fit the config: ${mismatch}`);
  const lifetime = new Lifetime(log, signal);

  try {
    const { redis, redisUrl } = await openRedis(config, lifetime, onFatal);
    const prefix = redisKeyPrefix(config.queue);
    const routes = new RouteTable(config.routes, await recordedEndpointLayout(redis, prefix, config.routes));
    const domain = config.homeserver.domain;
    const bot = botUserId(registration.sender_localpart, domain);
    const botSender = { userId: bot, displayName: config.appservice.botDisplayName };
    const naming = { ghostPrefix: config.appservice.ghostPrefix, domain };
    const ours = registration.namespaces.users.map((n) => new RegExp(n.regex));
    const isOurs = (userId: string) => userId === bot || ours.some((r) => r.test(userId));
    const instanceId = instanceIdIn(config.dataDir);
    const claim = new InstanceClaim({
      redis,
      key: redisKeys.instanceClaim(prefix, instanceId),
      id: instanceId,
      log,
    });
    await claim.take();
    lifetime.onStop(() => claim.release(), "the instance id claim");
    log.info({ instanceId }, "instance id");

    const matrix = new MatrixClient({
      homeserverUrl: config.homeserver.url,
      domain,
      botUserId: bot,
      botDisplayName: config.appservice.botDisplayName,
      registration,
      log: moduleLogger("matrix"),
    });
    lifetime.onStop(async () => matrix.stop());

    // Whether the homeserver and each account answer, as the relays find out (shared by the queues).
    const health: DestinationHealth = new DestinationHealth({
      ...config.queue,
      backlog: async (): Promise<Record<string, number>> =>
        Object.fromEntries(Object.entries(await queueStates()).map(([q, b]) => [q, b.waiting])),
      log: moduleLogger("destinations"),
    });
    lifetime.onStop(async () => health.stop());
    // Read only when scraped, which starts once everything below exists.
    const metrics: Metrics | undefined = config.metrics.enabled
      ? new Metrics({
          queues: () => queueStates(),
          connectors: () => host.states,
          unconsumedShards: () =>
            Object.fromEntries(queues.map((q) => [q.opts.name, q.unconsumedShards().length])),
          destinations: () => health.statuses(),
        })
      : undefined;
    const relayQueue = <T>(
      name: string,
      process: OrderedQueueOptions<T>["process"],
      more: Pick<OrderedQueueOptions<T>, "keptWhenDelivered" | "destinationOf" | "waiting" | "failed">,
    ) => {
      const queue = new OrderedQueue<T>({
        ...queueOptions(config, redisUrl, instanceId),
        lease,
        health,
        name,
        log: moduleLogger("queue", { queue: name }),
        observe: metrics?.queueObserver(name),
        process,
        ...more,
      });
      lifetime.onStop(() => queue.stop(), `queue ${name}`);
      return queue;
    };

    // Rooms with end-to-end encryption: bridged with encryption.enabled; else told they are not,
    // and never posted into in plaintext.
    const encryption = new EncryptedRooms({
      supported: config.encryption.enabled,
      onFound: (roomId) => void endToEnd?.readIn(roomId),
      matrix,
      routes,
      redis,
      prefix,
      bot: botSender,
      observeUndecryptable: metrics && ((room) => metrics.undecryptable(room)),
      log: moduleLogger("encryption"),
    });

    // Remote → Matrix: connectors emit into the to-matrix queue, whose worker posts as ghosts.
    const live = new LiveMessages(redis, prefix);
    const messages = new MessageMap(redis, prefix);
    const devices = new DeviceAvailability(matrix, live, redis, prefix, moduleLogger("availability"));
    devices.start(lifetime.signal);
    const delivery = new RoomDelivery(
      matrix,
      routes,
      naming,
      connectors,
      live,
      messages,
      encryption,
      devices,
    );
    const toMatrix = relayQueue<ToMatrixJob>(TO_MATRIX_QUEUE, (job, { id }) => delivery.deliver(job, id), {
      keptWhenDelivered,
      destinationOf: () => HOMESERVER,
    });
    // Typed by hand: the metrics above read it, which TypeScript cannot infer in a cycle.
    const host: ConnectorHost = new ConnectorHost({
      config,
      connectors,
      routes,
      redis,
      redisUrl,
      instanceId,
      toMatrix,
      metrics,
      health,
      lifetime,
    });

    // Matrix → remote: a to-<connector> queue per connector in use, whose worker calls its send;
    // the bot marks each room message with how its delivery stands.
    const feedback = new DeliveryFeedback({
      matrix,
      bot: botSender,
      routes,
      defaults: config.feedback,
      redis,
      prefix,
      log: moduleLogger("feedback"),
    });
    // Marks under way go on before the Matrix client closes (for a while: they are best effort).
    lifetime.onStop(() => feedback.settled(2_000), "delivery marks");
    const remote = new RemoteDelivery(
      matrix,
      botSender,
      routes,
      (ref) => host.instance(ref),
      messages,
      feedback,
      log,
    );
    const toRemote = new Map(
      connectorsInUse(config.accounts, connectors).map((def) => [
        def.name,
        relayQueue<ToRemoteJob>(toConnectorQueue(def.name), (job, { id }) => remote.deliver(def, job, id), {
          destinationOf: (job) => remote.destinationOf(def, job),
          waiting: (job) => remote.waiting(job),
          failed: (job, { id, reason }) => remote.tellFailure(job, id, reason),
        }),
      ]),
    );
    const queues: OrderedQueue<unknown>[] = [toMatrix, ...toRemote.values()];
    const queueStates = async () =>
      Object.fromEntries(
        await Promise.all(queues.map(async (q) => [q.opts.name, await q.backlog()] as const)),
      );

    // The routes as they run: the file's, changed by reloads, and those linked from rooms.
    let defaultPermissions = config.permissions;
    const roomLinks = new RoomLinks({
      redis,
      prefix,
      config,
      connectors,
      table: routes,
      exclusive: (change) => liveRoutes.exclusive(change),
      // Nobody to invite: the room exists, and its people are in it.
      routeDefaults: () => ({ invite: [], permissions: defaultPermissions }),
      apply: (linked) => liveRoutes.set({ linked }),
      log: moduleLogger("room-links"),
    });
    await roomLinks.load();
    // A room's bridge information (MSC2346) covers every route in it: also those it had before a
    // reload or link added one. Also set in the room that replaces an upgraded one.
    const describeRooms = async (joined: readonly { roomId: string }[]) => {
      const rooms = new Set(joined.map((j) => j.roomId));
      const inThem: { route: ResolvedRoute; roomId: string }[] = [];
      for (const route of routes.routes) {
        const roomId = routes.roomIdOf(route.id);
        if (roomId !== undefined && rooms.has(roomId)) inThem.push({ route, roomId });
      }
      await describeBridgedRooms(
        inThem,
        (route) => bridgeStates(route, bot, connectors, config.accounts),
        (roomId, states) => updateBridgeInfo(matrix, roomId, bot, states),
      );
    };
    const liveRoutes: LiveRoutes = new LiveRoutes({
      table: routes,
      fileRoutes: config.routes,
      linkedRoutes: roomLinks.routes(),
      rewatch: () => host.rewatch(),
      joinRooms: async (added) => describeRooms(await joinRouteRooms(added, delivery, encryption, bot)),
      log,
    });

    await host.start();

    // The control surface: commands to the bot (!tribridge …), for admins, in any room it is in.
    let admins = adminMatcher(config.appservice.admins);
    const isAdmin = (userId: string) => admins(userId);
    const configReload = new ConfigReload({
      running: config,
      load: () => {
        if (!reloadConfig) throw new Error("this bridge was not started from a config file");
        return reloadConfig();
      },
      // The links are read again too: one made through another instance may have been missed.
      applyRoutes: (next) =>
        liveRoutes.exclusive(async () => {
          defaultPermissions = next.permissions;
          await roomLinks.load();
          return liveRoutes.set({ file: next.routes, linked: roomLinks.routes() });
        }),
      applyAdmins: (next) => (admins = adminMatcher(next)),
      log: moduleLogger("reload"),
    });
    const commands = bridgeCommands({
      config,
      connectors,
      routes,
      redis,
      matrix,
      bot,
      isAdmin,
      connectorStates: () => host.states,
      queueStates,
      reload: async () => (await configReload.reload()).text,
      roomLinks,
      moreStatus: async () => [
        ...health.statusLines(),
        ...encryption.statusLines(),
        ...((await endToEnd?.statusLines()) ?? []),
      ],
    });
    const endToEnd = config.encryption.enabled
      ? new EndToEnd({
          matrix,
          stores: new CryptoStores(cryptoDir(config), moduleLogger("crypto-store")),
          records: new DeviceRecords(cryptoDir(config)),
          bot: botSender,
          reader: {
            userId: readerUserId(naming),
            displayName: `${config.appservice.botDisplayName} (encryption)`,
          },
          isOurs,
          isEncrypted: (roomId) => encryption.check(roomId),
          deviceCreation:
            config.encryption.deviceCreation ?? (registration["io.element.msc4190"] ? "msc4190" : "login"),
          feed: config.encryption.feed,
          waiting: new WaitingEvents(redis, prefix),
          decryptedLater: (ev) => intake.handle([ev]),
          notice: async (roomId, text) =>
            void (await matrix.sendAs(
              botSender,
              roomId,
              "m.room.message",
              { msgtype: "m.notice", body: text, "m.mentions": {} },
              jobIdFor("device-moved", roomId, text),
            )),
          log: moduleLogger("encryption"),
        })
      : undefined;
    if (endToEnd) matrix.encryptWith(endToEnd);
    // Transactions from the homeserver: room messages into the to-<connector> queues.
    const followRoom = followRoomUpgrades(routes, matrix, bot, log, (roomId) => describeRooms([{ roomId }]));
    let routesNowKnown = () => {};
    const routesKnown = new Promise<void>((resolve) => (routesNowKnown = resolve));
    const intake: EventIntake = new EventIntake({
      matrix,
      routes,
      routesKnown,
      redis,
      prefix,
      botUserId: bot,
      isOurs,
      live,
      commands,
      permissions: new RelayPermissions({
        powerLevels: new PowerLevels(roomReader(matrix, bot)),
        isAdmin,
        redis,
        prefix,
        sendAsBot: (roomId, type, content, txnId) => matrix.sendAs(botSender, roomId, type, content, txnId),
        observe: metrics && ((route) => metrics.refused(route)),
        log: moduleLogger("permissions"),
      }),
      isAdmin,
      upgraded: (oldRoomId, newRoomId, upgradedBy) => {
        followRoom(oldRoomId, newRoomId, upgradedBy);
        roomLinks
          .moveRoom(oldRoomId, newRoomId)
          .catch((err: unknown) =>
            log.warn({ oldRoomId, newRoomId, err: errorMessage(err) }, "could not move a room's links along"),
          );
      },
      enqueue: (endpoint, roomId, id, job) => toRemote.get(endpoint.connector)!.add(roomId, id, job),
      capabilitiesOf: (name) => connectors.find((c) => c.name === name)?.capabilities,
      encryption,
      endToEnd,
      log,
    });
    const server = new AppserviceServer(
      registration.hs_token,
      {
        seenTransaction: async (fp) => (await redis.exists(redisKeys.transaction(prefix, fp))) === 1,
        markTransaction: async (fp) =>
          void (await redis.set(redisKeys.transaction(prefix, fp), "1", "EX", SEEN_EVENT_TTL_SEC)),
        onEvents: (events) => {
          health.alive(HOMESERVER); // it pushes: relays waiting for it need not wait for the next probe
          return intake.handle(events);
        },
        onDeviceData: endToEnd && ((data) => endToEnd.receiveTransaction(data)),
        ignores: (event) => isOurs(event.sender),
        userExists: (userId) => userId === bot,
        observe: metrics && ((outcome) => metrics.transaction(outcome)),
        readiness: () => readiness(readinessChecks(redis, prefix, matrix, queues, health, () => host.states)),
      },
      moduleLogger("appservice"),
    );
    await server.listen(config.appservice.port, config.appservice.bind);
    lifetime.onStop(() => server.close());
    log.info({ port: server.port, bind: config.appservice.bind }, "appservice listening");

    await matrix.start(lifetime.signal);
    void matrix.reportReachability();
    if (endToEnd) {
      await endToEnd.start();
      lifetime.onStop(() => endToEnd.stop(), "end-to-end encryption");
    }
    await describeRooms(await joinRouteRooms(routes.routes, delivery, encryption, bot));
    routesNowKnown();
    // Links made through the other instances sharing this Redis, as they are made.
    const linkChanges = connectRedis(redisUrl, "room-links");
    lifetime.onStop(async () => void linkChanges.disconnect());
    await roomLinks.follow(linkChanges);

    for (const q of queues) await q.start();
    await endToEnd?.retryAllWaiting();
    let metricsPort: number | undefined;
    if (metrics) {
      metricsPort = await metrics.listen(config.metrics.port, config.metrics.bind);
      lifetime.onStop(() => metrics.close());
      log.info({ port: metricsPort, bind: config.metrics.bind }, "metrics at /metrics");
    }
    log.info({ routes: routes.routes.length, accounts: config.accounts.length }, "tribridge started");

    return {
      appservicePort: server.port,
      metricsPort,
      connector: (ref) => host.instance(ref),
      connectorStates: () => structuredClone(host.states),
      failedJobs: async () => (await Promise.all(queues.map((q) => q.failedJobs()))).flat(),
      reload: () => configReload.reload(),
      stop: () => lifetime.stop(),
      notStopped: () => lifetime.pending(),
    };
  } catch (err) {
    await lifetime.stop();
    throw err;
  }
}

/** Where the devices of end-to-end encryption keep their keys. */
function cryptoDir(config: Config): string {
  return path.join(config.dataDir, "crypto");
}

function checkNamesUnique(connectors: readonly ConnectorDefinition[]): void {
  const names = new Set<string>();
  for (const c of connectors) {
    if (names.has(c.name)) throw new Error(`two connectors are named "${c.name}"`);
    names.add(c.name);
  }
}

/** Redis: the configured one, or a private redis-server child when queue.redisUrl is absent. */
async function openRedis(
  config: Config,
  lifetime: Lifetime,
  onFatal: (err: Error) => void,
): Promise<{ redis: Redis; redisUrl: string }> {
  const { fsync } = config.queue;
  let redisUrl = config.queue.redisUrl;
  if (!redisUrl) {
    const embedded: EmbeddedRedis = await startEmbeddedRedis(config.dataDir, log, {
      fsync,
      onGiveUp: onFatal,
    });
    lifetime.onStop(() => embedded.stop(), "the embedded redis-server");
    redisUrl = embedded.url;
  }
  const redis: Redis = connectRedis(redisUrl, MAIN_CONNECTION, { autoPipelining: true });
  lifetime.onStop(async () => void redis.disconnect());
  await redis.ping();
  if (config.queue.redisUrl) await warnAboutRedisSettings(redis, fsync, log);
  return { redis, redisUrl };
}

/**
 * What GET /ready checks: Redis takes writes (a write, not a PING: a Redis out of disk (MISCONF) or
 * turned replica (READONLY) still answers PINGs), the homeserver answers and takes our as_token,
 * every queue shard has a consumer, no destination is down and every connector is up.
 */
function readinessChecks(
  redis: Redis,
  prefix: string,
  matrix: MatrixClient,
  queues: readonly OrderedQueue<unknown>[],
  health: DestinationHealth,
  connectorStates: () => Record<string, { state: ConnectorState; reason?: string }>,
): ReadinessCheck[] {
  return [
    {
      name: "redis",
      check: async () => {
        if (redis.status !== "ready") return `not connected (${redis.status})`;
        await redis.set(redisKeys.readyProbe(prefix), String(Date.now()), "PX", 60_000);
        return undefined;
      },
    },
    { name: "homeserver", check: () => matrix.homeserverProblem() },
    {
      name: "shards",
      check: async () => {
        const unconsumed = queues.flatMap((q) => q.unconsumedShards());
        return unconsumed.length === 0
          ? undefined
          : `without a consumer for longer than a lease: ${unconsumed.join(", ")}`;
      },
    },
    {
      // Found down by the relays (a blip, "failing", is not enough): their messages wait.
      name: "destinations",
      check: async () => {
        const down = Object.entries(health.statuses()).filter(([, s]) => s.state === "down");
        return down.length === 0
          ? undefined
          : down.map(([name, s]) => `${name} down (${s.waiting} relay(s) waiting): ${s.reason}`).join("; ");
      },
    },
    {
      name: "connectors",
      check: async () => {
        const notUp = Object.entries(connectorStates()).filter(([, s]) => s.state !== "up");
        return notUp.length === 0
          ? undefined
          : notUp.map(([ref, s]) => `${ref} ${s.state}${s.reason ? ` (${s.reason})` : ""}`).join("; ");
      },
    },
  ];
}

/** What every relay queue shares, from the config. */
function queueOptions(config: Config, redisUrl: string, instanceId: string) {
  return {
    prefix: redisKeyPrefix(config.queue),
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
}

/**
 * Joins each route's room at start, and learns whether it is encrypted (which tells the room, the
 * first time); one that cannot be joined yet is tried again when a relay needs it. Returns the
 * routes it joined, with their rooms.
 */
async function joinRouteRooms(
  routes: readonly ResolvedRoute[],
  delivery: RoomDelivery,
  encryption: EncryptedRooms,
  bot: string,
): Promise<{ route: ResolvedRoute; roomId: string }[]> {
  const joined: { route: ResolvedRoute; roomId: string }[] = [];
  for (const route of routes) {
    let roomId: string;
    try {
      roomId = await delivery.roomIdFor(route.id);
    } catch (err) {
      log.warn(
        { route: route.id, room: route.room, err: errorMessage(err) },
        `cannot join the route's room yet; invite ${bot}`,
      );
      continue;
    }
    joined.push({ route, roomId });
    // Read again before the first relay into the room, if it cannot be read now.
    await encryption
      .check(roomId)
      .catch((err: unknown) =>
        log.warn(
          { route: route.id, roomId, err: errorMessage(err) },
          "could not read whether the room is encrypted",
        ),
      );
  }
  return joined;
}

/**
 * Sets each joined room's bridge information (MSC2346, bridge-info.ts): the states of every route
 * in it at once, since a room may carry several routes. Best effort: a room where the bot may not
 * send state is named in one warning, a failure is logged, and the bridge starts either way.
 */
async function describeBridgedRooms(
  joined: readonly { route: ResolvedRoute; roomId: string }[],
  statesOf: (route: ResolvedRoute) => BridgeState[],
  update: (roomId: string, states: BridgeState[]) => Promise<BridgeInfoOutcome>,
): Promise<void> {
  const byRoom = new Map<string, BridgeState[]>();
  for (const { route, roomId } of joined)
    byRoom.set(roomId, [...(byRoom.get(roomId) ?? []), ...statesOf(route)]);
  const forbidden: string[] = [];
  for (const [roomId, states] of byRoom) {
    try {
      if ((await update(roomId, states)) === "forbidden") forbidden.push(roomId);
    } catch (err) {
      log.warn({ roomId, err: errorMessage(err) }, "could not set the room's bridge information (m.bridge)");
    }
  }
  if (forbidden.length > 0)
    log.warn(
      { rooms: forbidden },
      "the bot may not send state events in these rooms, so clients do not show what they are bridged to " +
        "(m.bridge): raise its power level to the rooms' state_default",
    );
}
