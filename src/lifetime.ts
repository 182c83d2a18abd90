/**
 * What a running bridge has started, undone in reverse order when it stops, and the signal its
 * parts watch to end their loops. Each part registers its own undo as soon as it has started, so
 * a start that fails half-way stops exactly what it started.
 */
import { errorMessage } from "./errors.js";
import type { Logger } from "./log.js";

export class Lifetime {
  private readonly cleanups: { run: () => Promise<void>; what: string | undefined }[] = [];
  /** What is being stopped now (see pending). */
  private current: string | undefined;
  private readonly lifetime = new AbortController();

  /** `signal`: aborting it aborts this lifetime's signal too (stop() is still the caller's). */
  constructor(
    private readonly log: Logger,
    signal?: AbortSignal,
  ) {
    signal?.addEventListener("abort", () => this.lifetime.abort(), { once: true });
  }

  /** Aborted when the bridge stops: end reconnect loops and timers when it fires. */
  get signal(): AbortSignal {
    return this.lifetime.signal;
  }

  /**
   * Runs `cleanup` at stop, before those registered earlier. `what` names it where a stop that
   * takes too long says what it waits for (see pending).
   */
  onStop(cleanup: () => Promise<void>, what?: string): void {
    this.cleanups.push({ run: cleanup, what });
  }

  /** The named parts not stopped yet, the one being stopped first (for a stop that hangs). */
  pending(): string[] {
    const left = this.cleanups.map((c) => c.what).reverse();
    return [this.current, ...left].filter((w): w is string => w !== undefined);
  }

  /**
   * Aborts the signal, then runs every cleanup, newest first; one that fails does not stop the rest.
   * Each runs once: a second stop() (a signal during a failed start, say) finds nothing left to undo.
   */
  async stop(): Promise<void> {
    this.lifetime.abort();
    for (let cleanup = this.cleanups.pop(); cleanup; cleanup = this.cleanups.pop()) {
      this.current = cleanup.what;
      await cleanup
        .run()
        .catch((err: unknown) => this.log.warn({ err: errorMessage(err) }, "error while stopping"));
    }
    this.current = undefined;
  }
}
