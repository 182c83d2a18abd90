/**
 * Lets a repeated log line through at most once per interval per key, and says how many it held
 * back since: a flood of the same event (a homeserver pushing malformed events, a busy encrypted
 * room) costs a line a minute, not a line each.
 */
export class LogLimiter {
  private readonly last = new Map<string, { at: number; held: number }>();

  constructor(
    private readonly intervalMs = 60_000,
    /** Keys remembered at most (a room id, say): beyond that all are forgotten at once. */
    private readonly maxKeys = 1000,
  ) {}

  /**
   * Whether to log `count` more occurrences of `key` now: undefined to hold them back, or how many
   * were held back since the last line (to put in this one).
   */
  pass(key: string, count = 1, now = Date.now()): { heldBack: number } | undefined {
    const entry = this.last.get(key);
    if (entry && now - entry.at < this.intervalMs) {
      entry.held += count;
      return undefined;
    }
    if (!entry && this.last.size >= this.maxKeys) this.last.clear();
    this.last.set(key, { at: now, held: 0 });
    return { heldBack: entry?.held ?? 0 };
  }
}
