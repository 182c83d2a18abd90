/**
 * Measures what hostile clients cost the embedded broker, in a process of its own (run with
 * --expose-gc, so memory is measured after a full collection and no other test's garbage counts).
 * Started by brokerProbe() below; prints one JSON line with the measurements.
 *
 *   node --expose-gc --import tsx test/helpers/broker-probe.ts <scenario> '<json options>'
 */
import { spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { createConnection, type Socket } from "node:net";
import { Writable } from "node:stream";
import { fileURLToPath } from "node:url";
import mqtt from "mqtt";
import { pino } from "pino";
import { EmbeddedBroker } from "../../bridges/mqtt/embedded-broker.js";
import { embeddedBrokerSchema } from "../../bridges/mqtt/schema.js";
import { REDIS_URL, deleteKeys, waitFor } from "./fixture.js";

export interface Memory {
  rssMB: number;
  heapMB: number;
  externalMB: number;
}

export interface SubscribeProbe {
  /** Time from sending the SUBSCRIBE to its SUBACK, or null when none came within the deadline. */
  subackMs: number | null;
  granted: number;
  refused: number;
  /** Filters stored in the session (the persistence's hash for the client). */
  stored: number;
  /** The longest a bystander's QoS 1 publish waited for its PUBACK meanwhile. */
  bystanderMaxMs: number;
  before: Memory;
  after: Memory;
  peakRssMB: number;
}

export interface ConnectsProbe {
  /** Connections the broker closed while they were sending their CONNECT. */
  closed: number;
  before: Memory;
  /** While the connections hold their partial CONNECTs. */
  held: Memory;
  /** After they are gone. */
  after: Memory;
  /** Whether a well-behaved device connects once they are gone. */
  connectsAfter: boolean;
}

export interface ChurnProbe {
  connections: number;
  before: Memory;
  after: Memory;
  peakRssMB: number;
  /** Log lines the broker wrote at warn level or above, and the first few of them. */
  logLines: number;
  sample: string[];
  connectsAfter: boolean;
}

type Scenario = { config?: Record<string, unknown> } & (
  | { scenario: "subscribe"; filters: number; deadlineMs?: number }
  | { scenario: "connects"; connections: number; declaredBytes: number }
  | {
      scenario: "churn";
      connections: number;
      concurrency: number;
      kind: "garbage" | "bad-protocol" | "oversize" | "half-connect";
    }
);
/** The Redis key prefix of the broker's persistence, chosen by the parent so it can clean up. */
type Child = Scenario & { prefix: string };

/** Runs a scenario in a child process with --expose-gc; rejects if it fails or exceeds `timeoutMs`. */
export function brokerProbe(
  options: Extract<Scenario, { scenario: "subscribe" }>,
  timeoutMs?: number,
): Promise<SubscribeProbe>;
export function brokerProbe(
  options: Extract<Scenario, { scenario: "connects" }>,
  timeoutMs?: number,
): Promise<ConnectsProbe>;
export function brokerProbe(
  options: Extract<Scenario, { scenario: "churn" }>,
  timeoutMs?: number,
): Promise<ChurnProbe>;
export async function brokerProbe(options: Scenario, timeoutMs = 60_000): Promise<unknown> {
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  try {
    return await runChild({ ...options, prefix }, timeoutMs);
  } finally {
    await deleteKeys(prefix);
  }
}

function runChild(options: Child, timeoutMs: number): Promise<unknown> {
  const script = fileURLToPath(import.meta.url);
  const child = spawn(
    process.execPath,
    ["--expose-gc", "--import", "tsx", script, options.scenario, JSON.stringify(options)],
    { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, TRIBRIDGE_LOG_LEVEL: "silent" } },
  );
  let out = "";
  let err = "";
  child.stdout.on("data", (d: Buffer) => (out += d.toString()));
  child.stderr.on("data", (d: Buffer) => (err += d.toString()));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`broker probe ${options.scenario} did not finish within ${timeoutMs} ms`));
    }, timeoutMs);
    child.on("close", (code) => {
      clearTimeout(timer);
      const line = out.trim().split("\n").at(-1) ?? "";
      if (code === 0 && line.startsWith("{")) return resolve(JSON.parse(line));
      reject(new Error(`broker probe ${options.scenario} exited with ${code}: ${err.slice(-2000)}`));
    });
  });
}

// ---- the child ----

const MB = 1024 * 1024;
const round = (bytes: number) => Math.round((bytes / MB) * 10) / 10;

async function memory(): Promise<Memory> {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (!gc) throw new Error("run with --expose-gc");
  for (let i = 0; i < 3; i++) {
    gc();
    await new Promise((r) => setImmediate(r));
  }
  const m = process.memoryUsage();
  return { rssMB: round(m.rss), heapMB: round(m.heapUsed), externalMB: round(m.external) };
}

/** Samples the RSS until stopped; returns the peak in MB. */
function peakRss(): () => number {
  let peak = process.memoryUsage().rss;
  const timer = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 5);
  return () => {
    clearInterval(timer);
    return round(Math.max(peak, process.memoryUsage().rss));
  };
}

/** A logger that counts what it writes at warn and above (a flood would be many lines). */
function countingLogger() {
  const lines: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const line of chunk.toString().split("\n")) if (line) lines.push(line);
      done();
    },
  });
  return { log: pino({ level: "warn" }, sink), lines };
}

async function startBroker({ config = {}, prefix }: Child) {
  const { log, lines } = countingLogger();
  const broker = new EmbeddedBroker(embeddedBrokerSchema.parse({ port: 0, ...config }), log, async () => {}, {
    url: REDIS_URL,
    keyPrefix: `${prefix}:`,
  });
  await broker.start();
  return {
    broker,
    prefix,
    lines,
    url: `mqtt://127.0.0.1:${broker.port}`,
    stop: () => broker.stop(),
  };
}

/** A device that connects and disconnects cleanly: the broker still serves newcomers. */
async function connects(url: string): Promise<boolean> {
  try {
    const c = await mqtt.connectAsync(url, {
      clientId: `probe-${randomUUID()}`,
      reconnectPeriod: 0,
      connectTimeout: 5000,
    });
    await c.endAsync();
    return true;
  } catch {
    return false;
  }
}

/** MQTT's variable-length integer (§2.2.3). */
function remainingLength(n: number): number[] {
  const out: number[] = [];
  do {
    let byte = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) byte |= 0x80;
    out.push(byte);
  } while (n > 0);
  return out;
}

/** The start of a CONNECT (MQTT 3.1.1, clean session, no credentials) announcing `declared` bytes. */
function connectHead(declared: number): Buffer {
  // protocol name, level 4, flags 0x02, keep-alive 30 s, then a client id of 65,535 bytes announced
  return Buffer.from([
    0x10,
    ...remainingLength(declared),
    0,
    4,
    ...Buffer.from("MQTT"),
    4,
    0x02,
    0,
    30,
    0xff,
    0xff,
  ]);
}

async function subscribeScenario(o: Extract<Child, { scenario: "subscribe" }>): Promise<SubscribeProbe> {
  const b = await startBroker(o);
  const bystander = await mqtt.connectAsync(b.url, { clientId: "bystander", reconnectPeriod: 0 });
  const subscriber = await mqtt.connectAsync(b.url, {
    clientId: "many-filters",
    clean: false,
    reconnectPeriod: 0,
  });
  const before = await memory();
  const peak = peakRss();

  let bystanderMaxMs = 0;
  let subscribing = true;
  const bystanding = (async () => {
    while (subscribing) {
      const t0 = performance.now();
      await bystander.publishAsync("bystander/ping", "x", { qos: 1 });
      bystanderMaxMs = Math.max(bystanderMaxMs, performance.now() - t0);
      await new Promise((r) => setTimeout(r, 10));
    }
  })();

  const filters = Array.from({ length: o.filters }, (_, i) => `devices/${i}/+/state`);
  const t0 = performance.now();
  const suback = await new Promise<number[] | null>((resolve) => {
    const timer = setTimeout(() => resolve(null), o.deadlineMs ?? 10_000);
    // mqtt.js reports refused filters as an error carrying the SUBACK
    subscriber.subscribe(filters, { qos: 1 }, (err, granted) => {
      clearTimeout(timer);
      const codes = (err as { packet?: { granted?: number[] } } | null)?.packet?.granted;
      resolve(codes ?? (granted ?? []).map((g) => g.qos));
    });
  });
  const subackMs = suback ? Math.round(performance.now() - t0) : null;
  subscribing = false;
  // A broker that has not answered is busy with it for long: report without waiting for it.
  if (!suback)
    return {
      subackMs,
      granted: 0,
      refused: 0,
      stored: 0,
      bystanderMaxMs: Math.round(bystanderMaxMs),
      before,
      after: before,
      peakRssMB: peak(),
    };
  await bystanding;
  const peakRssMB = peak();
  const after = await memory();

  const { Redis } = await import("ioredis");
  const redis = new Redis(REDIS_URL);
  const stored = await redis.hlen(`${b.prefix}:client:many-filters`);
  redis.disconnect();
  await Promise.all([bystander.endAsync(true), subscriber.endAsync(true)]);
  await b.stop();
  return {
    subackMs,
    granted: suback?.filter((c) => c !== 128).length ?? 0,
    refused: suback?.filter((c) => c === 128).length ?? 0,
    stored,
    bystanderMaxMs: Math.round(bystanderMaxMs),
    before,
    after,
    peakRssMB,
  };
}

async function connectsScenario(o: Extract<Child, { scenario: "connects" }>): Promise<ConnectsProbe> {
  const b = await startBroker(o);
  const port = b.broker.port;
  const before = await memory();
  const head = connectHead(o.declaredBytes);
  // all of the CONNECT but its last 10 bytes: the broker has to hold it, waiting for the rest
  const body = Buffer.alloc(
    o.declaredBytes - (head.length - 1 - remainingLength(o.declaredBytes).length) - 10,
    0x61,
  );
  const sockets: Socket[] = [];
  let closed = 0;
  for (let i = 0; i < o.connections; i++) {
    const s = createConnection(port, "127.0.0.1");
    s.on("error", () => undefined);
    s.on("close", () => closed++);
    await new Promise<void>((r) => s.once("connect", () => r()));
    s.write(head);
    s.write(body);
    sockets.push(s);
  }
  // Everything written is with the broker (or the connection was closed).
  await waitFor(
    "the CONNECTs sent",
    () => sockets.every((s) => s.destroyed || s.writableLength === 0),
    30_000,
  );
  await new Promise((r) => setTimeout(r, 200)); // the broker reads what the kernel holds
  const held = await memory();
  const closedWhileHeld = closed;
  for (const s of sockets) s.destroy();
  await waitFor("the connections closed", () => closed === o.connections, 10_000);
  const connectsAfter = await waitFor("a device connects", () => connects(b.url), 10_000).catch(() => false);
  const after = await memory();
  await b.stop();
  return { closed: closedWhileHeld, before, held, after, connectsAfter };
}

const MALFORMED: Record<Extract<Scenario, { scenario: "churn" }>["kind"], Buffer> = {
  garbage: Buffer.from("GET / HTTP/1.1\r\nHost: broker\r\n\r\n"),
  "bad-protocol": Buffer.from([0x10, 12, 0, 4, ...Buffer.from("MQTX"), 4, 0x02, 0, 30, 0, 0]),
  oversize: Buffer.from([0x30, 0x80, 0x84, 0xaf, 0x5f]), // PUBLISH announcing 200 MB
  "half-connect": Buffer.concat([connectHead(300_000), Buffer.alloc(64 * 1024, 0x61)]),
};

async function churnScenario(o: Extract<Child, { scenario: "churn" }>): Promise<ChurnProbe> {
  const b = await startBroker(o);
  const port = b.broker.port;
  const payload = MALFORMED[o.kind];
  const before = await memory();
  const peak = peakRss();
  let started = 0;
  const one = () =>
    new Promise<void>((resolve) => {
      const s = createConnection(port, "127.0.0.1");
      s.on("error", () => undefined);
      s.on("connect", () => s.write(payload, () => (o.kind === "half-connect" ? s.end() : undefined)));
      s.on("close", () => resolve());
    });
  await Promise.all(
    Array.from({ length: o.concurrency }, async () => {
      while (started < o.connections) {
        started++;
        await one();
      }
    }),
  );
  const peakRssMB = peak();
  const connectsAfter = await connects(b.url);
  const after = await memory();
  const lines = [...b.lines];
  await b.stop();
  return {
    connections: started,
    before,
    after,
    peakRssMB,
    logLines: lines.length,
    sample: lines.slice(0, 5),
    connectsAfter,
  };
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const options = JSON.parse(process.argv[3] ?? "{}") as Child;
  const run =
    options.scenario === "subscribe"
      ? subscribeScenario(options)
      : options.scenario === "connects"
        ? connectsScenario(options)
        : churnScenario(options);
  run.then(
    (result) => {
      process.stdout.write(`${JSON.stringify(result)}\n`);
      process.exit(0);
    },
    (err: unknown) => {
      process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
      process.exit(1);
    },
  );
}
