/**
 * Whether each far side (the homeserver, a connector's account) is answering, as the relays to it
 * find out: a health gate per destination, shared by every queue and shard.
 *
 * A relay that fails because its destination is down (UnavailableError, a network error, a 5xx;
 * see RetryCause) tells the gate, and waits at it instead of retrying on its own: so do all the
 * relays to that destination, in every shard, each keeping its room's place in line. The gate
 * lets one of them through at a time as a probe, after a back-off capped at `maxProbeDelayMs`
 * (1 s by default) — the probe is a real delivery, so there is nothing to configure per
 * destination, and the first one that gets through delivers its message. Any answer that is not
 * "down" opens the gate for all. A sign of life from elsewhere (the homeserver pushing a
 * transaction, a connector reporting "up") sends a probe at once. So delivery resumes within a
 * probe step of the far side answering, however long it was away, and nothing counts against a
 * message's attempts meanwhile.
 *
 * Logging is per state change: "down" once, after `downAfterFailures` failures in a row (fewer
 * are a blip, and only parked); "still down" every `stillDownLogMs`, with how many relays wait;
 * "up again" with how long it was down.
 */
import { backoffDelayMs } from "../backoff.js";
import { errorMessage } from "../errors.js";
import type { Logger } from "../log.js";

export interface DestinationHealthOptions {
  /** Failures in a row (with nothing getting through) after which a destination counts as down. */
  downAfterFailures: number;
  /** The longest wait between two probes of a destination that is down. */
  maxProbeDelayMs: number;
  /** How often a destination that stays down is logged again. */
  stillDownLogMs: number;
  /** What is queued, for the "still down" line: batches (of one or more messages) waiting per queue. */
  backlog?(): Promise<unknown>;
  log: Logger;
}

/** The first probe goes this long after the failure that closed the gate; later ones back off. */
const FIRST_PROBE_DELAY_MS = 100;

export type DestinationState = "up" | "failing" | "down";

export interface DestinationStatus {
  state: DestinationState;
  /** Since when it is not up (ms since the epoch). */
  since?: number;
  /** The last failure's reason. */
  reason?: string;
  /** Relays waiting for it now (one per room being delivered). */
  waiting: number;
}

interface Waiter {
  release(): void;
}

/** One destination's gate: open while it answers; closed, with one probe at a time, while not. */
export class DestinationGate {
  private state: DestinationState = "up";
  private failures = 0;
  private since = 0;
  private reason = "";
  /** Answers that got through, ever: a relay that fails while others get through is at fault itself. */
  private answered = 0;
  private probeDue = false;
  private probeInFlight = false;
  private probeTimer: NodeJS.Timeout | undefined;
  private stillDownTimer: NodeJS.Timeout | undefined;
  private readonly waiters: Waiter[] = [];

  constructor(
    readonly name: string,
    private readonly o: DestinationHealthOptions,
  ) {}

  /** Whether relays go straight through (it answers, as far as anyone found). */
  get open(): boolean {
    return this.state === "up";
  }

  /** A mark to give `failed`: whether anything got through since it was taken. */
  get mark(): number {
    return this.answered;
  }

  /**
   * Resolves when a relay may try the destination: at once while it is up, else when it is up
   * again or this relay is let through as the probe. Rejects when `signal` aborts.
   */
  admit(signal: AbortSignal): Promise<void> {
    signal.throwIfAborted();
    if (this.state === "up") return Promise.resolve();
    if (this.probeDue && !this.probeInFlight) {
      this.probeDue = false;
      this.probeInFlight = true;
      return Promise.resolve();
    }
    return new Promise<void>((resolve, reject) => {
      const onAbort = () => {
        const i = this.waiters.indexOf(waiter);
        if (i >= 0) this.waiters.splice(i, 1);
        reject(signal.reason as Error);
      };
      const waiter: Waiter = {
        release: () => {
          signal.removeEventListener("abort", onAbort);
          resolve();
        },
      };
      this.waiters.push(waiter);
      signal.addEventListener("abort", onAbort, { once: true });
    });
  }

  /** The destination answered (a delivery, or a refusal of the message itself): open for all. */
  succeeded(): void {
    this.answered++;
    this.probeInFlight = false;
    if (this.state === "up") return;
    if (this.state === "down")
      this.o.log.info(
        { destination: this.name, downMs: Date.now() - this.since, waiting: this.waiters.length },
        "destination answers again; delivery resumes",
      );
    this.state = "up";
    this.failures = 0;
    clearTimeout(this.probeTimer);
    clearInterval(this.stillDownTimer);
    this.probeDue = false;
    for (const w of this.waiters.splice(0)) w.release();
  }

  /**
   * A relay found the destination down. Returns false when others got through since `mark` was
   * taken (when this relay last found it down): then the failure is the relay's own (its message
   * makes the far side fail), and it is counted as an attempt of that message instead.
   */
  failed(err: unknown, mark: number): boolean {
    this.probeInFlight = false;
    if (this.answered !== mark) return false;
    this.failures++;
    this.reason = errorMessage(err);
    if (this.state === "up") {
      this.state = "failing";
      this.since = Date.now();
    }
    if (this.state === "failing" && this.failures >= this.o.downAfterFailures) {
      this.state = "down";
      this.o.log.warn(
        { destination: this.name, reason: this.reason, failures: this.failures },
        "destination down; its messages wait (not counted as attempts) and it is probed until it answers",
      );
      this.stillDownTimer = setInterval(() => void this.logStillDown(), this.o.stillDownLogMs).unref();
    }
    this.scheduleProbe(backoffDelayMs(this.probeBackoff(), this.failures));
    return true;
  }

  private async logStillDown(): Promise<void> {
    const queuedBatches = await this.o.backlog?.().catch(() => "unknown (Redis unreachable)");
    if (this.state !== "down") return;
    const fields = { destination: this.name, downMs: Date.now() - this.since, waiting: this.waiters.length };
    this.o.log.warn({ ...fields, queuedBatches, reason: this.reason }, "destination still down");
  }

  /** A sign of life from elsewhere: probe now rather than at the next back-off step. */
  alive(): void {
    if (this.state !== "up" && !this.probeInFlight) this.scheduleProbe(0);
  }

  status(): DestinationStatus {
    if (this.state === "up") return { state: "up", waiting: 0 };
    return { state: this.state, since: this.since, reason: this.reason, waiting: this.waiters.length };
  }

  stop(): void {
    clearTimeout(this.probeTimer);
    clearInterval(this.stillDownTimer);
  }

  private probeBackoff() {
    return { initialDelayMs: FIRST_PROBE_DELAY_MS, maxDelayMs: this.o.maxProbeDelayMs };
  }

  private scheduleProbe(delayMs: number): void {
    clearTimeout(this.probeTimer);
    this.probeTimer = setTimeout(() => this.probe(), delayMs);
  }

  /** Lets the longest-waiting relay through; with none waiting, the next one to come goes. */
  private probe(): void {
    if (this.state === "up" || this.probeInFlight) return;
    const next = this.waiters.shift();
    if (!next) {
      this.probeDue = true;
      return;
    }
    this.probeInFlight = true;
    next.release();
  }
}

/** The gates of all destinations, by name (created on first use). */
export class DestinationHealth {
  private readonly gates = new Map<string, DestinationGate>();

  constructor(private readonly o: DestinationHealthOptions) {}

  gate(destination: string): DestinationGate {
    let gate = this.gates.get(destination);
    if (!gate) this.gates.set(destination, (gate = new DestinationGate(destination, this.o)));
    return gate;
  }

  /** See DestinationGate.alive; nothing to do for a destination no relay has found down. */
  alive(destination: string): void {
    this.gates.get(destination)?.alive();
  }

  /** Every destination a relay has used, with its state. */
  statuses(): Record<string, DestinationStatus> {
    return Object.fromEntries([...this.gates].map(([name, gate]) => [name, gate.status()]));
  }

  /** For `!tribridge status`: a line per destination that is not up. */
  statusLines(): string[] {
    return Object.entries(this.statuses()).flatMap(([name, s]) => {
      if (s.state === "up") return [];
      const since = new Date(s.since!).toISOString();
      const what = s.state === "down" ? "down" : "failing";
      return [`${name}: ${what} since ${since}, ${s.waiting} relay(s) waiting for it (${s.reason})`];
    });
  }

  stop(): void {
    for (const gate of this.gates.values()) gate.stop();
  }
}
