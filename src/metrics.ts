/**
 * Prometheus metrics, opt-in (`metrics.enabled`). They are served on their own listener, not the
 * appservice port: whoever can reach that port (the homeserver) need not read the bridge's
 * internals, and a scraper need not reach the homeserver's side.
 */
import { createServer, type Server } from "node:http";
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";
import type { ConnectorState } from "./connector.js";
import { close, listen } from "./http-listen.js";
import type { TransactionOutcome } from "./matrix/appservice-server.js";
import type { DestinationStatus } from "./queue/destination-health.js";
import type { QueueObserver } from "./queue/ordered-queue.js";

const CONNECTOR_STATES: readonly ConnectorState[] = ["connecting", "up", "degraded", "down"];

interface QueueState {
  waiting: number;
  active: number;
  failedList: number;
  holding: boolean;
}

/** How long a scrape waits for the queues' state from Redis (which may be away) before going on without. */
const QUEUE_STATE_TIMEOUT_MS = 2_000;

function withinMs<T>(work: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms`)), ms);
  });
  return Promise.race([work, late]).finally(() => clearTimeout(timer));
}

/** Read when scraped: the queues' Redis state and the connectors' states. */
export interface MetricSources {
  queues(): Promise<Record<string, QueueState>>;
  connectors(): Record<string, { state: ConnectorState }>;
  /** Per queue, its shards without a consumer for longer than a lease (read without Redis). */
  unconsumedShards?(): Record<string, number>;
  destinations(): Record<string, DestinationStatus>;
}

export class Metrics {
  readonly registry = new Registry();
  readonly received: Counter<"connector" | "account">;
  private readonly relayed: Counter<"queue">;
  private readonly retried: Counter<"queue">;
  private readonly superseded: Counter<"queue">;
  private readonly failed: Counter<"queue" | "reason">;
  private readonly relaySeconds: Histogram<"queue">;
  private readonly transactions: Counter<"outcome">;
  private readonly undecryptableEvents: Counter<"room">;
  private readonly refusedMessages: Counter<"route">;
  private server: Server | undefined;

  constructor(sources: MetricSources) {
    const registers = [this.registry];
    collectDefaultMetrics({ register: this.registry, prefix: "tribridge_" });
    this.received = new Counter({
      name: "tribridge_messages_received_total",
      help: "Messages a connector handed over towards Matrix, once enqueued (once per route)",
      labelNames: ["connector", "account"],
      registers,
    });
    this.relayed = new Counter({
      name: "tribridge_messages_relayed_total",
      help: "Messages delivered to the far side, per queue (to-matrix, to-<connector>)",
      labelNames: ["queue"],
      registers,
    });
    this.retried = new Counter({
      name: "tribridge_message_retries_total",
      help: "Delivery attempts that failed transiently and will be retried",
      labelNames: ["queue"],
      registers,
    });
    this.superseded = new Counter({
      name: "tribridge_messages_superseded_total",
      help: "Readings of a live message skipped because a newer one was already queued behind them",
      labelNames: ["queue"],
      registers,
    });
    this.failed = new Counter({
      name: "tribridge_messages_failed_total",
      help: "Messages moved to the failed list: permanent (refused) or exhausted (out of attempts)",
      labelNames: ["queue", "reason"],
      registers,
    });
    this.relaySeconds = new Histogram({
      name: "tribridge_relay_seconds",
      help: "Time from enqueue to delivery, per queue",
      labelNames: ["queue"],
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800],
      registers,
    });
    this.transactions = new Counter({
      name: "tribridge_transactions_total",
      help: "Transactions pushed by the homeserver, by outcome",
      labelNames: ["outcome"],
      registers,
    });
    this.undecryptableEvents = new Counter({
      name: "tribridge_undecryptable_events_total",
      help:
        "Events in end-to-end encrypted rooms (m.room.encrypted) that tribridge cannot read and so " +
        "did not relay, by room: a route's room, or another (a room for commands)",
      labelNames: ["room"],
      registers,
    });
    this.refusedMessages = new Counter({
      name: "tribridge_messages_refused_total",
      help: "Room messages not relayed to a route because their sender may not (permissions), per route",
      labelNames: ["route"],
      registers,
    });
    const queueGauge = (name: string, help: string, pick: (q: QueueState) => number) =>
      new Gauge({
        name,
        help,
        labelNames: ["queue"],
        registers,
        async collect() {
          let states: Record<string, QueueState>;
          try {
            states = await withinMs(sources.queues(), QUEUE_STATE_TIMEOUT_MS);
          } catch {
            return; // Redis away or refusing: the last values stay, and the rest is still served
          }
          for (const [queue, counts] of Object.entries(states)) this.set({ queue }, pick(counts));
        },
      });
    queueGauge(
      "tribridge_queue_waiting_jobs",
      "Batches waiting in the queue (each holds one or more messages)",
      (q) => q.waiting,
    );
    queueGauge("tribridge_queue_active_jobs", "Batches being delivered", (q) => q.active);
    queueGauge(
      "tribridge_queue_holding",
      "1 while the backlog is full and new messages are held at their source (queue.maxBacklogMb)",
      (q) => (q.holding ? 1 : 0),
    );
    queueGauge(
      "tribridge_failed_list_length",
      "Messages in the failed list (`tribridge failed-jobs`)",
      (q) => q.failedList,
    );
    new Gauge({
      name: "tribridge_queue_shards_unconsumed",
      help:
        "Shards of the queue that have had no consumer for longer than a lease (no instance holds " +
        "the lease, or this one holds it with no worker running): their messages wait",
      labelNames: ["queue"],
      registers,
      collect() {
        for (const [queue, n] of Object.entries(sources.unconsumedShards?.() ?? {})) this.set({ queue }, n);
      },
    });
    new Gauge({
      name: "tribridge_connector_state",
      help: "1 for the state each connector account is in, 0 for the others",
      labelNames: ["connector", "account", "state"],
      registers,
      collect() {
        for (const [ref, { state }] of Object.entries(sources.connectors())) {
          const [connector, account] = ref.split(".") as [string, string];
          for (const s of CONNECTOR_STATES) this.set({ connector, account, state: s }, s === state ? 1 : 0);
        }
      },
    });
    new Gauge({
      name: "tribridge_destination_up",
      help:
        "1 while a far side (the homeserver, a connector account) answers, 0 while relays find it " +
        "down or failing and wait for it (see queue.downAfterFailures)",
      labelNames: ["destination"],
      registers,
      collect() {
        for (const [destination, { state }] of Object.entries(sources.destinations()))
          this.set({ destination }, state === "up" ? 1 : 0);
      },
    });
    new Gauge({
      name: "tribridge_destination_waiting_relays",
      help: "Relays waiting for a far side that is down (one per room being delivered)",
      labelNames: ["destination"],
      registers,
      collect() {
        for (const [destination, { waiting }] of Object.entries(sources.destinations()))
          this.set({ destination }, waiting);
      },
    });
  }

  /** The observer of one queue's outcomes (see OrderedQueue). */
  queueObserver(queue: string): QueueObserver {
    const relayed = this.relayed.labels({ queue });
    const retried = this.retried.labels({ queue });
    const superseded = this.superseded.labels({ queue });
    const seconds = this.relaySeconds.labels({ queue });
    return {
      delivered: (ms) => {
        relayed.inc();
        if (!Number.isNaN(ms)) seconds.observe(ms / 1000);
      },
      retried: () => retried.inc(),
      superseded: () => superseded.inc(),
      failed: (reason) => this.failed.inc({ queue, reason }),
    };
  }

  transaction(outcome: TransactionOutcome): void {
    this.transactions.inc({ outcome });
  }

  undecryptable(room: "route" | "other"): void {
    this.undecryptableEvents.inc({ room });
  }

  refused(route: string): void {
    this.refusedMessages.inc({ route });
  }

  /** Serves GET /metrics on bind:port; resolves with the port bound. */
  async listen(port: number, bind: string): Promise<number> {
    const server = createServer((req, res) => {
      if (req.method !== "GET" || (req.url ?? "").split("?")[0] !== "/metrics") {
        res.writeHead(404, { "content-type": "text/plain" }).end("not found: metrics are at /metrics\n");
        return;
      }
      this.registry.metrics().then(
        (text) => res.writeHead(200, { "content-type": this.registry.contentType }).end(text),
        (err: unknown) =>
          res.writeHead(500, { "content-type": "text/plain" }).end(`metrics unavailable: ${String(err)}\n`),
      );
    });
    this.server = server;
    return listen(server, port, bind, "metrics");
  }

  close(): Promise<void> {
    return close(this.server);
  }
}
