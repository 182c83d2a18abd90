/**
 * The Redis failures aedes (1.2.0) leaves unhandled, handled: each would otherwise end the process.
 *
 * - The retained messages of a SUBSCRIBE are read after its SUBACK is written, from a stream aedes
 *   pipes on without an "error" listener (lib/handlers/subscribe.js completeSubscribe): a read that
 *   fails (Redis refusing it, or the connection closed by a stop that came right after the SUBACK)
 *   is an uncaught exception. Here the failure is logged, and the subscriber keeps its connection,
 *   without those retained messages. At stop the reads still going on are ended first (see
 *   `endRetainedReads`): the devices they were for are gone, and no read comes after the QUIT.
 * - At CONNECT aedes clears the client's old will with `delWill(...).finally(...)`
 *   (lib/handlers/connect.js storeWill): a failed delWill is an unhandled rejection. Here a will
 *   that cannot be cleared is logged and taken as cleared: the new will is stored over it as
 *   before, and aedes' other callers ignore delWill's failures already (or, at its will sweep,
 *   publish the will again at the next sweep).
 *
 * (The unawaited commands of aedes-persistence-redis itself are dealt with in embedded-broker.ts
 * redisConnection.)
 */
import type { Readable } from "node:stream";
import type { Logger } from "../../src/log.js";

/** The part of the persistence (aedes-persistence-redis' callback layer) aedes calls unguarded. */
export interface GuardedPersistence {
  createRetainedStreamCombi(patterns: string[]): Readable;
  createRetainedStream(pattern: string): Readable;
  delWill(client: { id: string; brokerId?: string }, cb?: unknown): Promise<unknown> | void;
}

export class PersistenceFailures {
  /** Retained reads under way, until their stream closes. */
  private readonly retainedReads = new Set<Readable>();

  constructor(
    persistence: GuardedPersistence,
    private readonly log: Logger,
  ) {
    const combi = persistence.createRetainedStreamCombi.bind(persistence);
    persistence.createRetainedStreamCombi = (patterns) => this.guardRetained(combi(patterns), patterns);
    persistence.createRetainedStream = (pattern) => persistence.createRetainedStreamCombi([pattern]);

    const delWill = persistence.delWill.bind(persistence);
    // aedes calls it without a callback, for a promise; anyone else is passed through
    persistence.delWill = (client, cb) =>
      cb === undefined
        ? (delWill(client) as Promise<unknown>).catch((err: unknown) => {
            this.log.warn({ clientId: client.id, err: (err as Error).message }, "mqtt will not cleared");
            return null;
          })
        : delWill(client, cb);
  }

  private guardRetained(stream: Readable, patterns: string[]): Readable {
    this.retainedReads.add(stream);
    stream.once("close", () => this.retainedReads.delete(stream));
    stream.on("error", (err: Error) =>
      this.log.warn(
        { filters: patterns.slice(0, 10), count: patterns.length, err: err.message },
        "mqtt retained messages not sent",
      ),
    );
    return stream;
  }

  /**
   * At stop, once aedes has closed its clients: ends the retained reads still going on, and
   * resolves once none will send Redis another command (a read already sent is answered first).
   */
  async endRetainedReads(): Promise<void> {
    const reads = [...this.retainedReads];
    await Promise.all(
      reads.map(
        (stream) =>
          new Promise<void>((resolve) => {
            if (stream.closed) return resolve();
            stream.once("close", () => resolve());
            stream.destroy();
          }),
      ),
    );
  }
}
