/**
 * Measures what hostile clients cost the embedded broker, in a process of its own (run with
 * --expose-gc, so memory is measured after a full collection and no other test's garbage counts).
 * Started by brokerProbe() below; prints one JSON line with the measurements.
 *
 *   node --expose-gc --import tsx test/helpers/broker-probe.ts <scenario> '<json options>'
 */
import { spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { createConnection, type Server, type Socket } from "node:net";
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
  /** Connections the broker kept open, holding their partial CONNECTs. */
  open: number;
  before: Memory;
  /** While the connections hold their partial CONNECTs. */
  held: Memory;
  /** After they are gone. */
  after: Memory;
  /** Whether a well-behaved device connects once they are gone. */
  connectsAfter: boolean;
}

export interface ChurnProbe {
  /** In both rounds together. */
  connections: number;
  before: Memory;
  /** After the first round of `connections`, and after the second. */
  firstRound: Memory;
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
      /** Each connection sends one of these and is closed (by the broker, or by the prober); "mixed" cycles through them. */
      kind: Malformed | "mixed";
    }
);
type Malformed = "garbage" | "bad-protocol" | "oversize" | "half-connect";
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

/** Memory once the RSS has settled (the process gives back what its start-up used, in steps). */
async function settledMemory(): Promise<Memory> {
  let last = await memory();
  for (let i = 0; i < 20; i++) {
    await new Promise((r) => setTimeout(r, 250));
    const now = await memory();
    if (Math.abs(now.rssMB - last.rssMB) < 1) return now;
    last = now;
  }
  return last;
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
  const before = await settledMemory();
  const peak = peakRss();
  const subscriber = attacker({ ...o, port: b.broker.port });
  await subscriber.next(60_000); // connected

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
  subscriber.release(); // subscribe now
  const { subackMs, codes } = JSON.parse(await subscriber.next(60_000)) as {
    subackMs: number | null;
    codes: number[];
  };
  subscribing = false;
  const granted = codes.filter((c) => c !== 128).length;
  const refused = codes.length - granted;
  // A broker that has not answered is busy with it for long: report without waiting for it.
  if (subackMs === null)
    return {
      subackMs,
      granted,
      refused,
      stored: 0,
      bystanderMaxMs: Math.round(bystanderMaxMs),
      before,
      after: before,
      peakRssMB: peak(),
    };
  await bystanding;
  await subscriber.exited;
  const peakRssMB = peak();
  const after = await memory();
  const { Redis } = await import("ioredis");
  const redis = new Redis(REDIS_URL);
  const stored = await redis.hlen(`${b.prefix}:client:many-filters`);
  redis.disconnect();
  await bystander.endAsync(true);
  await b.stop();
  return {
    subackMs,
    granted,
    refused,
    stored,
    bystanderMaxMs: Math.round(bystanderMaxMs),
    before,
    after,
    peakRssMB,
  };
}

// The clients of the "connects" and "churn" scenarios run in a process of their own (started by
// the broker's): their sockets' buffers would otherwise count as the broker's memory.

type Attack = { port: number } & Scenario;

/** Starts the attacking process; its stdout lines, one at a time; its stdin for "release". */
function attacker(attack: Attack) {
  const child = spawn(
    process.execPath,
    ["--import", "tsx", fileURLToPath(import.meta.url), "attack", JSON.stringify(attack)],
    { stdio: ["pipe", "pipe", "inherit"] },
  );
  const lines: string[] = [];
  let buffered = "";
  child.stdout.on("data", (d: Buffer) => {
    buffered += d.toString();
    const parts = buffered.split("\n");
    buffered = parts.pop()!;
    lines.push(...parts);
  });
  const exited = new Promise<number | null>((resolve) => child.on("close", resolve));
  return {
    next: (timeoutMs: number) => waitFor("the attacking process", () => lines.shift(), timeoutMs),
    release: () => child.stdin.end("release\n"),
    exited,
  };
}

async function connectsScenario(o: Extract<Child, { scenario: "connects" }>): Promise<ConnectsProbe> {
  const b = await startBroker(o);
  const before = await settledMemory();
  const clients = attacker({ ...o, port: b.broker.port });
  await clients.next(60_000); // all CONNECTs sent
  // The broker has read them, and closed those it refuses (as far as it will within 5 s).
  const server = (b.broker as unknown as { servers: Server[] }).servers[0]!;
  const open = () => new Promise<number>((resolve) => server.getConnections((_err, n) => resolve(n)));
  const limit = embeddedBrokerSchema.parse(o.config ?? {}).maxPendingConnections;
  await waitFor("the refused ones closed", async () => (await open()) <= limit, 5000).catch(() => undefined);
  await new Promise((r) => setTimeout(r, 200)); // what the kernel still holds is read
  const stillOpen = await open();
  const held = await memory();
  clients.release();
  await clients.next(30_000); // all closed
  await clients.exited;
  const connectsAfter = await waitFor("a device connects", () => connects(b.url), 10_000).catch(() => false);
  const after = await memory();
  await b.stop();
  return { open: stillOpen, before, held, after, connectsAfter };
}

const MALFORMED: Record<Malformed, Buffer> = {
  garbage: Buffer.from("GET / HTTP/1.1\r\nHost: broker\r\n\r\n"),
  "bad-protocol": Buffer.from([0x10, 12, 0, 4, ...Buffer.from("MQTX"), 4, 0x02, 0, 30, 0, 0]),
  oversize: Buffer.from([0x30, 0x80, 0x84, 0xaf, 0x5f]), // PUBLISH announcing 200 MB
  // a CONNECT just under the default packet limit, all but its last 10 bytes
  "half-connect": Buffer.concat([connectHead(327_000), Buffer.alloc(327_000 - 14 - 10, 0x61)]),
};

async function churnScenario(o: Extract<Child, { scenario: "churn" }>): Promise<ChurnProbe> {
  const b = await startBroker(o);
  const before = await settledMemory();
  const peak = peakRss();
  const rounds: Memory[] = [];
  let connections = 0;
  for (let round = 0; round < 2; round++) {
    const clients = attacker({ ...o, port: b.broker.port });
    connections += Number(await clients.next(300_000));
    await clients.exited;
    rounds.push(await memory());
  }
  const peakRssMB = peak();
  const connectsAfter = await connects(b.url);
  const lines = [...b.lines];
  await b.stop();
  return {
    connections,
    before,
    firstRound: rounds[0]!,
    after: rounds[1]!,
    peakRssMB,
    logLines: lines.length,
    sample: lines.slice(0, 5),
    connectsAfter,
  };
}

/** The attacking process: prints what it did, line by line. */
async function attack(a: Attack): Promise<void> {
  const say = (line: string | number) => new Promise((r) => process.stdout.write(`${line}\n`, r));
  if (a.scenario === "subscribe") {
    const subscriber = await mqtt.connectAsync(`mqtt://127.0.0.1:${a.port}`, {
      clientId: "many-filters",
      clean: false,
      reconnectPeriod: 0,
    });
    const filters = Array.from({ length: a.filters }, (_, i) => `devices/${i}/+/state`);
    await say("connected");
    await new Promise((r) => process.stdin.once("data", r));
    // From the moment the SUBSCRIBE is written (mqtt.js builds it first: its time, not the broker's)
    let t0 = performance.now();
    subscriber.on("packetsend", (packet) => packet.cmd === "subscribe" && (t0 = performance.now()));
    const codes = await new Promise<number[] | null>((resolve) => {
      const timer = setTimeout(() => resolve(null), a.deadlineMs ?? 10_000);
      // mqtt.js reports refused filters as an error carrying the SUBACK
      subscriber.subscribe(filters, { qos: 1 }, (err, granted) => {
        clearTimeout(timer);
        const refused = (err as { packet?: { granted?: number[] } } | null)?.packet?.granted;
        resolve(refused ?? (granted ?? []).map((g) => g.qos));
      });
    });
    const subackMs = codes ? Math.round(performance.now() - t0) : null;
    await say(JSON.stringify({ subackMs, codes: codes ?? [] }));
    if (codes) await subscriber.endAsync(true);
    return;
  }
  if (a.scenario === "connects") {
    const head = connectHead(a.declaredBytes);
    // all of the CONNECT but its last 10 bytes: the broker has to hold it, waiting for the rest
    const body = Buffer.alloc(
      a.declaredBytes - (head.length - 1 - remainingLength(a.declaredBytes).length) - 10,
      0x61,
    );
    const sockets: Socket[] = [];
    let closed = 0;
    for (let i = 0; i < a.connections; i++) {
      const s = createConnection(a.port, "127.0.0.1");
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
    await say("sent");
    await new Promise((r) => process.stdin.once("data", r));
    for (const s of sockets) s.destroy();
    await waitFor("the connections closed", () => closed === a.connections, 10_000);
    return void (await say("closed"));
  }
  const kinds = a.kind === "mixed" ? (Object.keys(MALFORMED) as Malformed[]) : [a.kind];
  let started = 0;
  const one = (kind: Malformed) =>
    new Promise<void>((resolve) => {
      const s = createConnection(a.port, "127.0.0.1");
      s.on("error", () => undefined);
      // half a CONNECT, then the end of the stream: the broker holds it until then
      s.on("connect", () => s.write(MALFORMED[kind], () => (kind === "half-connect" ? s.end() : undefined)));
      s.on("close", () => resolve());
    });
  await Promise.all(
    Array.from({ length: a.concurrency }, async () => {
      while (started < a.connections) await one(kinds[started++ % kinds.length]!);
    }),
  );
  await say(started);
}

async function main(role: string, options: Child): Promise<unknown> {
  switch (role) {
    case "attack":
      return attack(options as unknown as Attack);
    case "subscribe":
      return subscribeScenario(options as Extract<Child, { scenario: "subscribe" }>);
    case "connects":
      return connectsScenario(options as Extract<Child, { scenario: "connects" }>);
    default:
      return churnScenario(options as Extract<Child, { scenario: "churn" }>);
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const role = process.argv[2] ?? "";
  main(role, JSON.parse(process.argv[3] ?? "{}") as Child).then(
    (result) => {
      if (role !== "attack") process.stdout.write(`${JSON.stringify(result)}\n`);
      process.exit(0);
    },
    (err: unknown) => {
      process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
      process.exit(1);
    },
  );
}
