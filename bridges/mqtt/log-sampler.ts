/**
 * Log lines for events a client can repeat at will (malformed connections, refused ones): the
 * first few of each kind per interval, then one line saying how many more there were, so a flood
 * costs a bounded number of lines however fast it comes.
 */
import type { Logger } from "../../src/log.js";

interface Kind {
  logged: number;
  suppressed: number;
  /** The fields of the last suppressed event, as an example. */
  last: Record<string, unknown> | undefined;
  timer: NodeJS.Timeout | undefined;
}

export class LogSampler {
  private readonly kinds = new Map<string, Kind>();

  constructor(
    private readonly log: Logger,
    private readonly intervalMs = 60_000, // 1 minute
    private readonly burst = 3, // lines per kind per interval before they are counted instead
  ) {}

  warn(kind: string, fields: Record<string, unknown>, message: string): void {
    let k = this.kinds.get(kind);
    if (!k) {
      k = { logged: 0, suppressed: 0, last: undefined, timer: undefined };
      this.kinds.set(kind, k);
    }
    if (!k.timer) {
      const state = k;
      state.timer = setTimeout(() => this.flush(kind, state), this.intervalMs);
      state.timer.unref();
    }
    if (k.logged < this.burst) {
      k.logged++;
      this.log.warn({ ...fields, kind }, message);
    } else {
      k.suppressed++;
      k.last = fields;
    }
  }

  /** Ends the interval: says how many were not logged, and starts counting afresh. */
  private flush(kind: string, k: Kind): void {
    if (k.suppressed > 0)
      this.log.warn(
        { kind, suppressed: k.suppressed, intervalMs: this.intervalMs, last: k.last },
        `${k.suppressed} more of the same (${kind}) not logged in the last ${Math.round(this.intervalMs / 1000)} s`,
      );
    this.kinds.delete(kind);
  }

  /** Logs what is still counted, and stops the timers. */
  stop(): void {
    for (const [kind, k] of this.kinds) {
      clearTimeout(k.timer);
      this.flush(kind, k);
    }
  }
}
