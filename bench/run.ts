/**
 * `npm run bench`: tribridge's throughput and latency, next to the raw components measured in the
 * same run on the same machine. Everything runs on 127.0.0.1 and stops by itself.
 *
 *   raw aedes          mqtt.js QoS 1 publishes into a bare aedes broker (no hooks)
 *   raw BullMQ         add + process with one worker of concurrency 1 per shard (the bridge's shape)
 *   MQTT → Matrix      device QoS 1 → embedded broker → queue → test homeserver, N rooms, as fast
 *                      as one device with 200 publishes in flight can push (peak)
 *   paced              MQTT → Matrix at a fixed offered rate: p50/p99 latency at 1,000 msg/s, and
 *                      whether the bridge keeps up with 3,000 msg/s for 10 s (sustained)
 *   Matrix → MQTT      homeserver transactions → queue → embedded broker → subscriber
 *   encryption         plain and end-to-end encrypted rooms side by side (bench/encryption.ts;
 *                      BENCH_ENCRYPTION=0 skips them)
 *
 * BENCH_FSYNC=compare runs the bridge rows a second time on a Redis with `appendfsync always`
 * (queue.fsync: always) and prints them as ratios of the first (everysec): the price of losing
 * nothing acknowledged on a power loss.
 */
import { execFileSync } from "node:child_process";
import { randomUUID } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createServer } from "node:net";
import { Aedes } from "aedes";
import { Queue, Worker } from "bullmq";
import mqtt from "mqtt";
import { BridgeProcess } from "../test/helpers/bridge-process.js";
import { DeviceProcess, publishAll } from "./devices.js";
import { emailBench, emailBenchAvailable } from "./email.js";
import { encryptionBench, encryptionRows } from "./encryption.js";
import { freePort, harness, REDIS_URL, type Harness } from "../test/helpers/fixture.js";
import { moduleLogger } from "../src/log.js";
import { startEmbeddedRedis, type FsyncPolicy } from "../src/queue/embedded-redis.js";
import { connectRedis } from "../src/store/redis-store.js";

const N = Number(process.env.BENCH_MESSAGES ?? 10000);
const ROOMS = Number(process.env.BENCH_ROOMS ?? 8);
const WARM_UP = Number(process.env.BENCH_WARM_UP ?? 5000);
/** The rate offered for 10 s in the sustained row (the target on a 2-core machine: 3,000 msg/s). */
const SUSTAINED_RATE = Number(process.env.BENCH_SUSTAINED_RATE ?? 3000);
/** BENCH_RAW=0 skips the raw components (quicker, for comparing two versions of the bridge). */
const RAW = process.env.BENCH_RAW !== "0";
/**
 * By default the bench runs its own redis-server exactly as the bridge's embedded default does
 * (unix socket, AOF every second, noeviction), for the raw components and the bridge alike, and
 * leaves the machine's Redis alone. BENCH_REDIS=shared uses the machine's Redis over TCP instead.
 */
const SHARED_REDIS = process.env.BENCH_REDIS === "shared";
const COMPARE_FSYNC = process.env.BENCH_FSYNC === "compare";

interface BenchRedis {
  url: string;
  pid: number | undefined;
  describe: string;
  stop(): Promise<void>;
}

async function benchRedis(fsync: FsyncPolicy = "everysec"): Promise<BenchRedis> {
  if (SHARED_REDIS) {
    return {
      url: REDIS_URL,
      pid: redisPid(),
      describe: `shared Redis at ${REDIS_URL}`,
      stop: async () => {},
    };
  }
  const dir = mkdtempSync(join(tmpdir(), "tribridge-bench-"));
  const redis = await startEmbeddedRedis(dir, moduleLogger("bench"), { fsync });
  return {
    url: redis.url,
    pid: redis.pid,
    describe:
      fsync === "everysec"
        ? "own redis-server, unix socket, AOF every second (the embedded default)"
        : "own redis-server, unix socket, AOF fsync always",
    stop: async () => {
      await redis.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

function rate(count: number, ms: number): number {
  return Math.round((count / ms) * 1000);
}

/** CPU time (user + system) a process has used so far, in ms; undefined where /proc is not readable. */
function cpuMsOf(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]!.split(" ");
    return (Number(fields[11]) + Number(fields[12])) * 10; // utime + stime, in 10 ms ticks
  } catch {
    return undefined;
  }
}

function redisPid(): number | undefined {
  try {
    return Number(execFileSync("pidof", ["redis-server"]).toString().trim().split(" ")[0]) || undefined;
  } catch {
    return undefined;
  }
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? NaN;
}

async function rawAedes(): Promise<number> {
  const broker = await Aedes.createBroker();
  const server = createServer(broker.handle);
  const port = await freePort();
  await new Promise<void>((r) => server.listen(port, "127.0.0.1", () => r()));
  const client = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`);
  const msgs: [string, string][] = Array.from({ length: N }, (_, i) => [`bench/${i % ROOMS}/t`, String(i)]);
  const t0 = performance.now();
  await publishAll(client, msgs);
  const ms = performance.now() - t0;
  await client.endAsync();
  await new Promise<void>((r) => broker.close(() => r()));
  server.close();
  return rate(N, ms);
}

async function rawBullmq(redisUrl: string, shards: number): Promise<number> {
  const prefix = `bench-${randomUUID().slice(0, 8)}`;
  const conn = connectRedis(redisUrl, "raw-bullmq-queues");
  const queues = Array.from(
    { length: shards },
    (_, i) => new Queue(`raw-${i}`, { connection: conn, prefix }),
  );
  let done = 0;
  let resolveAll!: () => void;
  const all = new Promise<void>((r) => (resolveAll = r));
  const workers = queues.map(
    (_, i) =>
      new Worker(
        `raw-${i}`,
        async () => {
          if (++done === N) resolveAll();
        },
        { connection: connectRedis(redisUrl, `raw-bullmq-worker-${i}`), prefix, concurrency: 1 },
      ),
  );
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: N }, (_, i) =>
      queues[i % shards]!.add("j", { i }, { jobId: `j${i}`, removeOnComplete: { count: 1000 } }),
    ),
  );
  await all;
  const ms = performance.now() - t0;
  await Promise.all(workers.map((w) => w.close()));
  await Promise.all(queues.map((q) => q.obliterate({ force: true }).then(() => q.close())));
  conn.disconnect();
  return rate(N, ms);
}

interface PacedFigures {
  offered: number;
  delivered: number;
  p50: number;
  p99: number;
}

/**
 * Devices publish at a fixed rate; reports the rate delivered into the rooms over the whole run,
 * from the first publish to the last message in a room, and the latency of each message.
 */
async function pacedLoad(
  devices: DeviceProcess,
  h: Harness,
  roomIds: string[],
  total: () => number,
  { perSecond, seconds, tag }: { perSecond: number; seconds: number; tag: string },
): Promise<PacedFigures> {
  const count = perSecond * seconds;
  const seenBefore = total();
  const sentAt = await devices.paced({ count, rooms: roomIds.length, label: `${tag}-` }, perSecond);
  while (total() < seenBefore + count) await new Promise((r) => setTimeout(r, 5));
  const latencies: number[] = [];
  let last = 0;
  for (const id of roomIds) {
    for (const m of h.hs.messages(id)) {
      const s = sentAt[String(m.content.body)];
      if (s === undefined) continue;
      latencies.push(m.origin_server_ts - s);
      last = Math.max(last, m.origin_server_ts);
    }
  }
  latencies.sort((a, b) => a - b);
  return {
    offered: perSecond,
    delivered: rate(count, last - Math.min(...Object.values(sentAt))),
    p50: percentile(latencies, 50),
    p99: percentile(latencies, 99),
  };
}

interface BridgeFigures {
  mqttToMatrix: number;
  mqttAccepted: number;
  latency: PacedFigures;
  sustained: PacedFigures;
  matrixToMqtt: number;
  cpuPerThousand: string;
}

async function bridgeBench(redis: BenchRedis, fsync: FsyncPolicy = "everysec"): Promise<BridgeFigures> {
  const port = await freePort();
  const rooms = Array.from({ length: ROOMS }, (_, i) => `bench${i}`);
  const h = await harness({
    queue: { shards: 16, redisUrl: redis.url, fsync },
    bridges: { mqtt: { home: { embedded: { port } } } },
    routes: rooms.map((r, i) => ({
      id: r,
      room: `#${r}:test.local`,
      endpoints: [
        { account: "mqtt.home", direction: "in", topic: `bench/${i}/t` },
        { account: "mqtt.home", direction: "out", topic: `bench/${i}/cmd` },
      ],
    })),
  });
  const roomIds = rooms.map((r) =>
    h.hs.createRoom({ creator: h.alice, alias: `#${r}:test.local`, preset: "public_chat" }),
  );
  // The bridge runs as its own process from the build, as `npm start` runs it; homeserver and load
  // generator stay in this one.
  const bridge = new BridgeProcess(h, { built: true });
  bridge.start();
  process.once("exit", () => void bridge.kill("SIGKILL"));
  const tcp = port;
  const devices = new DeviceProcess();
  await devices.connect(tcp, "bench-device");
  const total = () => roomIds.reduce((n, id) => n + h.hs.messageCount(id), 0);

  // Warm-up: ghosts registered and joined in every room, then enough traffic for V8 to have
  // optimised the hot paths of both processes ("sustained" is what is measured, not a cold start).
  await devices.flood({ count: ROOMS, rooms: ROOMS, label: "first " });
  while (total() < ROOMS) await new Promise((r) => setTimeout(r, 10));
  await devices.flood({ count: WARM_UP, rooms: ROOMS, label: "warm-up " });
  while (total() < ROOMS + WARM_UP) await new Promise((r) => setTimeout(r, 10));

  // Throughput MQTT → Matrix, and where the CPU goes meanwhile (the machine's cores are shared).
  const pids = { bridge: bridge.pid, homeserver: process.pid, devices: devices.pid, redis: redis.pid };
  const cpuBefore = Object.entries(pids).map(([name, pid]) => [name, pid, cpuMsOf(pid)] as const);
  const base = total();
  const t0 = performance.now();
  await devices.flood({ count: N, rooms: ROOMS, label: "" });
  const accepted = performance.now() - t0;
  while (total() < base + N) await new Promise((r) => setTimeout(r, 5));
  const toMatrixMs = performance.now() - t0;
  const cpuPerThousand = cpuBefore
    .map(([name, pid, before]) => {
      const after = cpuMsOf(pid);
      return after === undefined || before === undefined
        ? undefined
        : `${name} ${Math.round(((after - before) / N) * 1000)}`;
    })
    .filter(Boolean)
    .join(", ");
  // Per-room order check.
  for (const id of roomIds) {
    const seq = h.hs
      .messages(id)
      .map((m) => Number(m.content.body))
      .filter((v) => !Number.isNaN(v));
    if (seq.some((v, i) => i > 0 && v < seq[i - 1]!)) throw new Error("per-room order violated");
  }

  // Paced load, as devices publishing on their own schedule: 1,000 msg/s for the latency figures,
  // then the target rate for 10 s to see whether the bridge keeps up with it (sustained).
  const paced = (rate: number, seconds: number, tag: string) =>
    pacedLoad(devices, h, roomIds, total, { perSecond: rate, seconds, tag });
  const latency = await paced(1000, 3, "lat");
  const sustained = await paced(SUSTAINED_RATE, 10, "sus");

  // Matrix → MQTT.
  const received = { n: 0 };
  const listener = await mqtt.connectAsync(`mqtt://127.0.0.1:${tcp}`, { clientId: "bench-listener" });
  listener.on("message", () => received.n++);
  await listener.subscribeAsync("bench/+/cmd", { qos: 1 });
  const M = Math.min(N, 2000);
  const t1 = performance.now();
  for (let i = 0; i < M; i++)
    h.hs.sendMessage(roomIds[i % ROOMS]!, h.alice, { msgtype: "m.text", body: `c${i}` });
  while (received.n < M) await new Promise((r) => setTimeout(r, 5));
  const toMqttMs = performance.now() - t1;

  await listener.endAsync();
  await devices.end();
  await bridge.kill("SIGTERM");
  await h.cleanup();
  return {
    mqttToMatrix: rate(N, toMatrixMs),
    mqttAccepted: rate(N, accepted),
    latency,
    sustained,
    matrixToMqtt: rate(M, toMqttMs),
    cpuPerThousand,
  };
}

async function main(): Promise<void> {
  const redis = await benchRedis();
  // What the bench started goes when it does, also when it fails or is interrupted.
  process.once("exit", () => void redis.stop());
  process.once("SIGINT", () => process.exit(130));
  console.log(`tribridge bench: ${N} messages over ${ROOMS} rooms, node ${process.version}`);
  console.log(`Redis: ${redis.describe}\n`);
  // Each raw component runs twice and the second, warmed-up run counts, as the bridge is warmed up.
  const raw = RAW
    ? {
        aedes: await rawAedes().then(rawAedes),
        bull1: await rawBullmq(redis.url, 1).then(() => rawBullmq(redis.url, 1)),
        bull8: await rawBullmq(redis.url, 8).then(() => rawBullmq(redis.url, 8)),
      }
    : undefined;
  const b = await bridgeBench(redis);
  const email =
    process.env.BENCH_EMAIL !== "0" && emailBenchAvailable ? await emailBench(redis.url) : undefined;
  const encryption = process.env.BENCH_ENCRYPTION !== "0" ? await encryptionBench(redis.url) : undefined;
  await redis.stop();
  const ratio = (value: number, of: number | undefined, name: string) =>
    of === undefined ? "" : `${(value / of).toFixed(2)}× ${name}`;
  const paced = (name: string, f: PacedFigures): [string, string, string] => [
    `${name} ${f.offered.toLocaleString("en")} msg/s offered`,
    `${f.delivered} msg/s, p50 ${f.p50.toFixed(1)} ms, p99 ${f.p99.toFixed(1)} ms`,
    ratio(f.delivered, f.offered, "offered"),
  ];
  const rows: [string, string, string][] = [
    ...(raw
      ? ([
          ["raw aedes (QoS 1 publish, no hooks)", `${raw.aedes} msg/s`, ""],
          ["raw BullMQ add+process, 1 shard", `${raw.bull1} msg/s`, ""],
          ["raw BullMQ add+process, 8 shards", `${raw.bull8} msg/s`, ""],
        ] as [string, string, string][])
      : []),
    [
      "MQTT → Matrix, end to end",
      `${b.mqttToMatrix} msg/s`,
      [ratio(b.mqttToMatrix, raw?.aedes, "aedes"), ratio(b.mqttToMatrix, raw?.bull8, "BullMQ(8)")]
        .filter(Boolean)
        .join(", "),
    ],
    [
      "MQTT → Matrix, accepted (PUBACKed)",
      `${b.mqttAccepted} msg/s`,
      ratio(b.mqttAccepted, raw?.aedes, "aedes"),
    ],
    paced("MQTT → Matrix at", b.latency),
    paced("MQTT → Matrix sustained at", b.sustained),
    ["Matrix → MQTT, end to end", `${b.matrixToMqtt} msg/s`, ratio(b.matrixToMqtt, raw?.bull8, "BullMQ(8)")],
    ...(email
      ? ([
          [
            "mail server: SMTP send → IMAP IDLE notice",
            `p50 ${email.rawIdle.p50.toFixed(0)} ms, p99 ${email.rawIdle.p99.toFixed(0)} ms`,
            "",
          ],
          ["mail server: Postfix → mailbox, 1 connection", `${email.rawDelivery} mails/s`, ""],
          [
            "mail → room, end to end (one at a time)",
            `p50 ${email.mailToRoom.p50.toFixed(0)} ms, p99 ${email.mailToRoom.p99.toFixed(0)} ms`,
            `${(email.mailToRoom.p50 / email.rawIdle.p50).toFixed(2)}× the IDLE notice (p50)`,
          ],
          [
            "room → mailbox, end to end (one room)",
            `${email.roomToMailbox} mails/s`,
            ratio(email.roomToMailbox, email.rawDelivery, "Postfix"),
          ],
        ] as [string, string, string][])
      : []),
    ...(encryption ? encryptionRows(encryption) : []),
  ];
  if (COMPARE_FSYNC && !SHARED_REDIS) rows.push(...(await fsyncAlwaysRows(b)));
  for (const [name, value, r] of rows) console.log(`${name.padEnd(46)} ${value.padEnd(40)} ${r}`);
  console.log(`\nCPU ms per 1,000 messages MQTT → Matrix: ${b.cpuPerThousand}`);
  process.exit(0);
}

/** The bridge rows again on a Redis that syncs its AOF on every write, as ratios of `everysec`. */
async function fsyncAlwaysRows(everysec: BridgeFigures): Promise<[string, string, string][]> {
  const redis = await benchRedis("always");
  process.once("exit", () => void redis.stop());
  const a = await bridgeBench(redis, "always");
  await redis.stop();
  const vs = (value: number, of: number) => `${(value / of).toFixed(2)}× everysec`;
  const paced = (name: string, f: PacedFigures, e: PacedFigures): [string, string, string] => [
    `${name} ${f.offered.toLocaleString("en")} msg/s, fsync always`,
    `${f.delivered} msg/s, p50 ${f.p50.toFixed(1)} ms, p99 ${f.p99.toFixed(1)} ms`,
    `${vs(f.delivered, e.delivered)}, p50 ${vs(f.p50, e.p50)}, p99 ${vs(f.p99, e.p99)}`,
  ];
  return [
    [
      "MQTT → Matrix, end to end, fsync always",
      `${a.mqttToMatrix} msg/s`,
      vs(a.mqttToMatrix, everysec.mqttToMatrix),
    ],
    [
      "MQTT → Matrix, accepted, fsync always",
      `${a.mqttAccepted} msg/s`,
      vs(a.mqttAccepted, everysec.mqttAccepted),
    ],
    paced("MQTT → Matrix at", a.latency, everysec.latency),
    paced("MQTT → Matrix sustained at", a.sustained, everysec.sustained),
    [
      "Matrix → MQTT, end to end, fsync always",
      `${a.matrixToMqtt} msg/s`,
      vs(a.matrixToMqtt, everysec.matrixToMqtt),
    ],
  ];
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
