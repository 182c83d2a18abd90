/**
 * Runs the connectors: one instance per configured account, each with its own context (its
 * `emit` enqueues into the to-matrix queue; its store and Redis prefix are its own), started one
 * after another and given the endpoints the routes bind to it. Keeps the state each reports.
 */
import type { Redis } from "ioredis";
import type { Config } from "./config/load.js";
import type {
  AvailabilityUpdate,
  Connector,
  ConnectorContext,
  ConnectorDefinition,
  ConnectorState,
  InboundMessage,
} from "./connector.js";
import { ConfigError, errorMessage } from "./errors.js";
import type { Lifetime } from "./lifetime.js";
import { moduleLogger, type Logger } from "./log.js";
import { statusLine, type AvailabilityJob } from "./matrix/availability.js";
import type { ToMatrixJob } from "./matrix/room-delivery.js";
import type { Metrics } from "./metrics.js";
import type { DestinationHealth } from "./queue/destination-health.js";
import { ExclusiveRuns } from "./queue/exclusive-runs.js";
import { jobIdFor, type OrderedQueue } from "./queue/ordered-queue.js";
import { bindingOf, type RouteTable } from "./routing/route-table.js";
import { redisKeys } from "./store/keys.js";
import { RedisKeyValueStore } from "./store/redis-store.js";
import { isClusterUrl, parseClusterUrl, redisKeyPrefix } from "./store/redis-url.js";

export interface ConnectorHostOptions {
  config: Config;
  connectors: readonly ConnectorDefinition[];
  routes: RouteTable;
  redis: Redis;
  redisUrl: string;
  instanceId: string;
  /** Where what the connectors receive is enqueued. */
  toMatrix: OrderedQueue<ToMatrixJob>;
  metrics: Metrics | undefined;
  /** Told when an account reports "up": relays waiting for it are let through at once. */
  health: Pick<DestinationHealth, "alive">;
  lifetime: Lifetime;
}

export class ConnectorHost {
  private readonly instances = new Map<string, Connector<unknown>>();
  /** What each account was last given to watch (as JSON): watched again only when it changed. */
  private readonly watching = new Map<string, string>();
  /** By `<connector>.<account>`; the record itself stays, entries are replaced (metrics read it live). */
  readonly states: Record<string, { state: ConnectorState; reason?: string }> = {};

  constructor(private readonly o: ConnectorHostOptions) {}

  /** The running instance of `<connector>.<account>`. */
  instance(ref: string): Connector<unknown> | undefined {
    return this.instances.get(ref);
  }

  /** Creates, starts and watches every account's connector; each stops with the lifetime. */
  async start(): Promise<void> {
    const { config, connectors, redis, redisUrl, instanceId, lifetime } = this.o;
    const prefix = redisKeyPrefix(config.queue);
    const cluster = isClusterUrl(redisUrl) ? parseClusterUrl(redisUrl) : undefined;
    if (typeof cluster === "string") throw new ConfigError("queue.redisUrl", cluster);
    const defs = new Map(connectors.map((c) => [c.name, c]));
    const states = this.states;
    for (const { connector: name, account, config: accountConfig } of config.accounts) {
      const def = defs.get(name)!;
      const ref = `${name}.${account}`;
      const clog = moduleLogger("connector", { connector: name, account });
      states[ref] = { state: "connecting" };
      const exclusive = new ExclusiveRuns({
        redis,
        prefix,
        account: ref,
        holder: instanceId,
        log: clog,
        signal: lifetime.signal,
      });
      lifetime.onStop(() => exclusive.stop()); // after the connector's stop: its leases handed over at once
      const instance = def.create(account, accountConfig, {
        log: clog,
        signal: lifetime.signal,
        store: new RedisKeyValueStore(redis, redisKeys.connectorStore(prefix, ref)),
        redis: {
          url: redisUrl,
          keyPrefix: redisKeys.connectorOwn(prefix, ref),
          ...(cluster && { cluster }),
        },
        instanceId,
        emit: this.emitter(name, account, clog),
        quarantine: this.quarantiner(name, account, clog),
        availability: this.availabilityReporter(name, account, clog),
        runExclusive: (exclusiveName, run) => exclusive.run(exclusiveName, run),
        setState: (state, reason) => {
          const prev = states[ref];
          if (prev?.state !== state || prev.reason !== reason)
            clog.info({ state, reason }, "connector state");
          states[ref] = reason === undefined ? { state } : { state, reason };
          if (state === "up") this.o.health.alive(ref);
        },
      });
      await instance.start().catch((err: unknown) => {
        // Which account, and how to change its settings: the connector knows its keys, not where they live.
        throw new Error(
          `bridges.${ref}: ${errorMessage(err)}; this account's settings are bridges.${ref}.<key> in the ` +
            `config, or TRIBRIDGE__bridges__${name}__${account}__<key> in the environment`,
          { cause: err },
        );
      });
      lifetime.onStop(() => instance.stop());
      this.instances.set(ref, instance);
      await this.watch(ref, name, account);
    }
  }

  /**
   * After the routes changed: each account whose endpoints changed watches its new list (the
   * contract's "again whenever routes change"); the others are left alone. Returns the problems of
   * accounts whose watch failed (they keep what they had), as `<connector>.<account>: <reason>`.
   */
  async rewatch(): Promise<string[]> {
    const problems: string[] = [];
    for (const { connector: name, account } of this.o.config.accounts) {
      const ref = `${name}.${account}`;
      if (!this.instances.has(ref)) continue;
      await this.watch(ref, name, account).catch((err: unknown) => {
        moduleLogger("connector", { connector: name, account }).warn(
          { err: errorMessage(err) },
          "watching the changed endpoints failed",
        );
        problems.push(`${ref}: ${errorMessage(err)}`);
      });
    }
    return problems;
  }

  private async watch(ref: string, name: string, account: string): Promise<void> {
    const bindings = this.o.routes.endpointsOf(name, account).map(bindingOf);
    const json = JSON.stringify(bindings);
    if (this.watching.get(ref) === json) return;
    await this.instances.get(ref)!.watch(bindings);
    this.watching.set(ref, json);
  }

  /** ConnectorContext.emit of one account: one to-matrix item per endpoint the message matched. */
  private emitter(name: string, account: string, clog: Logger): ConnectorContext["emit"] {
    const { routes, toMatrix, metrics } = this.o;
    const ref = `${name}.${account}`;
    return async (msg: InboundMessage): Promise<void> => {
      for (const endpointId of msg.endpointIds) {
        const found = routes.inbound(endpointId, msg.response);
        if (!found) {
          clog.warn({ endpointId }, "connector emitted for an endpoint that relays nothing in; not relayed");
          continue;
        }
        const jobId = jobIdFor("in", ref, msg.remoteId, endpointId);
        const job = jobOf(msg, name, account, endpointId);
        // A live message shows only the latest reading: older ones still queued can be skipped.
        const latest = found.endpoint.live
          ? `${endpointId}\u0000${msg.sender.id}\u0000${msg.stream ?? ""}`
          : undefined;
        await toMatrix.add(found.route.room, jobId, job, { latest });
        metrics?.received.inc({ connector: name, account });
      }
    };
  }

  /**
   * ConnectorContext.availability of one account: one to-matrix item per endpoint, in the room's
   * order with its messages; one still queued behind a newer report of its device is skipped.
   */
  private availabilityReporter(
    name: string,
    account: string,
    clog: Logger,
  ): NonNullable<ConnectorContext["availability"]> {
    const { routes, toMatrix } = this.o;
    const ref = `${name}.${account}`;
    return async (update: AvailabilityUpdate): Promise<void> => {
      const availability: AvailabilityJob = { state: update.state, at: update.timestamp ?? Date.now() };
      if (update.statusMessage !== undefined) availability.statusMessage = update.statusMessage;
      for (const endpointId of update.endpointIds) {
        const found = routes.inbound(endpointId);
        if (!found) {
          clog.warn({ endpointId }, "availability for an endpoint that relays nothing in; not shown");
          continue;
        }
        const job: ToMatrixJob = {
          endpointId,
          connector: name,
          account,
          sender: update.sender,
          body: { text: statusLine(availability), notice: true },
          availability,
        };
        // A NUL first: no live message's key (which starts with its endpoint id) can be the same.
        const latest = `\u0000availability\u0000${endpointId}\u0000${update.sender.id}`;
        await toMatrix.add(
          found.route.room,
          jobIdFor("availability", ref, update.remoteId, endpointId),
          job,
          {
            latest,
          },
        );
      }
    };
  }

  /**
   * ConnectorContext.quarantine of one account: the message straight into the to-matrix queue's
   * failed list, once per endpoint it names (or once, with no endpoint, when it names none).
   */
  private quarantiner(name: string, account: string, clog: Logger): ConnectorContext["quarantine"] {
    const { routes, toMatrix } = this.o;
    const ref = `${name}.${account}`;
    return async (msg: InboundMessage, reason: string): Promise<void> => {
      const known = msg.endpointIds.flatMap((id) => {
        const found = routes.inbound(id, msg.response);
        return found ? [{ id, room: found.route.room }] : [];
      });
      const targets = known.length > 0 ? known : [{ id: "", room: `quarantine:${ref}` }];
      for (const { id, room } of targets) {
        const job: QuarantinedJob = { ...jobOf(msg, name, account, id), quarantined: reason };
        await toMatrix.addFailed(room, jobIdFor("in", ref, msg.remoteId, id), job, `quarantined: ${reason}`);
      }
      clog.warn(
        { remoteId: msg.remoteId, from: msg.sender.id, endpoints: known.map((k) => k.id), reason },
        "quarantined: not posted, in the failed list",
      );
    };
  }
}

/** A to-matrix job put in the failed list by ConnectorContext.quarantine, with the connector's reason. */
export type QuarantinedJob = ToMatrixJob & { quarantined: string };

/** The to-matrix job of an inbound message, for one of its endpoints. */
function jobOf(msg: InboundMessage, connector: string, account: string, endpointId: string): ToMatrixJob {
  const job: ToMatrixJob = {
    endpointId,
    connector,
    account,
    sender: msg.sender,
    body: msg.body,
    remoteId: msg.remoteId,
  };
  if (msg.attachments?.length) job.attachments = msg.attachments;
  if (msg.stream !== undefined) job.stream = msg.stream;
  if (msg.replyTo !== undefined) job.replyTo = msg.replyTo;
  if (msg.thread !== undefined) job.thread = msg.thread;
  if (msg.response) job.response = true;
  return job;
}
