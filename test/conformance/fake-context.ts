/**
 * The one ConnectorContext the conformance suite gives every connector: a real Redis store (with a
 * fresh prefix), the core's own runExclusive on it, and an `emit` the test controls — it records
 * what it was handed, and can be held (the enqueue is slow) or made to fail (Redis is away), as the
 * core's emit can.
 */
import { randomUUID } from "node:crypto";
import { Redis } from "ioredis";
import type { ConnectorContext, ConnectorState, InboundMessage } from "../../src/connector.js";
import { moduleLogger } from "../../src/log.js";
import { ExclusiveRuns } from "../../src/queue/exclusive-runs.js";
import { RedisKeyValueStore } from "../../src/store/redis-store.js";
import { REDIS_URL, deleteKeys } from "../helpers/fixture.js";

export class FakeContext {
  readonly prefix = `test-${randomUUID().slice(0, 8)}`;
  readonly emitted: InboundMessage[] = [];
  /** What `quarantine` was handed, with its reason: kept out of the rooms, in the failed list. */
  readonly quarantined: { message: InboundMessage; reason: string }[] = [];
  readonly states: { state: ConnectorState; reason?: string }[] = [];
  /** Emits that arrived after stop() — the contract allows none. */
  readonly emittedAfterStop: InboundMessage[] = [];
  private readonly redis = new Redis(REDIS_URL);
  private readonly lifetime = new AbortController();
  private held: { release: () => void; promise: Promise<void> } | undefined;
  private failures: Error[] = [];
  private stopped = false;
  private readonly exclusive: ExclusiveRuns;
  readonly ctx: ConnectorContext;

  constructor(name: string) {
    const log = moduleLogger("conformance", { connector: name });
    log.level = process.env.TRIBRIDGE_LOG_LEVEL ?? "silent";
    const instanceId = `conformance-${this.prefix}`;
    this.exclusive = new ExclusiveRuns({
      redis: this.redis,
      prefix: this.prefix,
      account: `${name}.conformance`,
      holder: instanceId,
      log,
      signal: this.lifetime.signal,
    });
    this.ctx = {
      log,
      signal: this.lifetime.signal,
      store: new RedisKeyValueStore(this.redis, `${this.prefix}:kv:`),
      redis: { url: REDIS_URL, keyPrefix: `${this.prefix}:own:` },
      instanceId,
      emit: (message) => this.emit(message),
      quarantine: (message, reason) => this.quarantine(message, reason),
      runExclusive: (exclusiveName, run) => this.exclusive.run(exclusiveName, run),
      setState: (state, reason) => this.states.push(reason === undefined ? { state } : { state, reason }),
    };
  }

  private async emit(message: InboundMessage): Promise<void> {
    if (this.stopped) this.emittedAfterStop.push(message);
    const failure = this.failures.shift();
    if (failure) throw failure;
    await this.held?.promise;
    this.emitted.push(message);
  }

  /** As the core's: fails when Redis is away (`failNextEmit` makes it fail too), lists a remoteId once. */
  private async quarantine(message: InboundMessage, reason: string): Promise<void> {
    if (this.stopped) this.emittedAfterStop.push(message);
    const failure = this.failures.shift();
    if (failure) throw failure;
    if (!this.quarantined.some((q) => q.message.remoteId === message.remoteId))
      this.quarantined.push({ message, reason });
  }

  /** Emits from now on wait (the enqueue is slow) until `release`. */
  hold(): void {
    let release!: () => void;
    const promise = new Promise<void>((resolve) => (release = resolve));
    this.held = { release, promise };
  }

  release(): void {
    this.held?.release();
    this.held = undefined;
  }

  /** The next emit rejects, as the core's does when Redis is away. */
  failNextEmit(err = new Error("enqueue failed: redis unreachable")): void {
    this.failures.push(err);
  }

  emittedFor(endpointId: string): InboundMessage[] {
    return this.emitted.filter((m) => m.endpointIds.includes(endpointId));
  }

  get state(): ConnectorState | undefined {
    return this.states.at(-1)?.state;
  }

  /** Stops `connector` the way the core does: the signal aborts first, then stop(). */
  async stop(connector: { stop(): Promise<void> }): Promise<void> {
    this.lifetime.abort();
    this.release();
    await connector.stop();
    this.stopped = true;
  }

  async close(): Promise<void> {
    this.lifetime.abort();
    this.release();
    await this.exclusive.stop();
    this.redis.disconnect();
    await deleteKeys(this.prefix);
  }
}
