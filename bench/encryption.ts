/**
 * The end-to-end encryption rows of `npm run bench` (also alone: `npx tsx --expose-gc bench/encryption.ts`):
 * one bridge (in this process, the test homeserver's transaction feed) with a plain and an
 * encrypted route room side by side, each measured in the same run:
 *
 *   far side → room     messages/s into the plain room, then into the encrypted one (each
 *                       encrypted by its ghost's device for one person's device)
 *   room → far side     a person's messages relayed from the plain room, then from the encrypted
 *                       one (each decrypted by the bot's device)
 *   per ghost device    memory of this process per ghost that got a device (its Olm machine,
 *                       crypto store and records), over BENCH_GHOSTS ghosts
 */
import { start } from "../src/app.js";
import { harness, REDIS_URL } from "../test/helpers/fixture.js";
import { OlmPerson } from "../test/helpers/olm-person.js";
import { testConnector, type TestConnector } from "../test/helpers/test-connector.js";

const MESSAGES = Number(process.env.BENCH_ENCRYPTED_MESSAGES ?? 2000);
const GHOSTS = Number(process.env.BENCH_GHOSTS ?? 50);

export interface EncryptionFigures {
  intoPlain: number;
  intoEncrypted: number;
  fromPlain: number;
  fromEncrypted: number;
  perDevice: { rssKiB: number; heapKiB: number };
}

async function until(what: string, done: () => boolean, timeoutMs = 120_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`bench: timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

function perSecond(count: number, ms: number): number {
  return Math.round((count / ms) * 1000);
}

export async function encryptionBench(redisUrl = REDIS_URL): Promise<EncryptionFigures> {
  const connectors = [testConnector()];
  const channel = (name: string) => ({
    id: name,
    room: `#${name}:test.local`,
    endpoints: [{ account: "test.a", direction: "inout", channel: name }],
  });
  const h = await harness({
    connectors,
    bridges: { test: { a: {} } },
    routes: [channel("plain"), channel("secret")],
    queue: { redisUrl },
    encryption: { enabled: true, feed: "transactions", deviceCreation: "msc4190" },
    homeserver: { msc2409ToDevice: true, msc3202TransactionExtensions: true },
  });
  const plain = h.hs.createRoom({ creator: h.alice, alias: "#plain:test.local", preset: "public_chat" });
  const secret = h.hs.createRoom({
    creator: h.alice,
    alias: "#secret:test.local",
    preset: "public_chat",
    encrypted: true,
  });
  const alice = await OlmPerson.create(h.hs, h.alice);
  const bridge = await start({ config: h.config, registration: h.registration, connectors });
  try {
    const remote = bridge.connector("test.a") as TestConnector;
    const bot = h.hs.appserviceUserId;
    await until("the bot in both rooms", () =>
      [plain, secret].every((r) => h.hs.membershipOf(r, bot) === "join"),
    );
    const fromGhosts = (room: string) => h.hs.events(room).filter((e) => e.sender.startsWith("@_tb_")).length;

    /** `count` device messages into `room`'s channel: msg/s until the homeserver has them all. */
    async function into(room: string, name: string, count: number, sender = () => "dev"): Promise<number> {
      const before = fromGhosts(room);
      const started = performance.now();
      for (let i = 0; i < count; i++)
        await remote.emit(name, {
          remoteId: `${name}-${before}-${i}`,
          sender: { id: sender() },
          body: { text: `m${i}` },
        });
      await until(`${count} messages in ${name}`, () => fromGhosts(room) >= before + count);
      return perSecond(count, performance.now() - started);
    }

    /** `count` room messages relayed to the far side: msg/s from the first sent to the last relayed. */
    async function from(name: string, count: number, send: (i: number) => Promise<unknown>): Promise<number> {
      const before = remote.sentTo(name).length;
      const started = performance.now();
      for (let i = 0; i < count; i++) await send(i);
      await until(`${count} relays from ${name}`, () => remote.sentTo(name).length >= before + count);
      return perSecond(count, performance.now() - started);
    }

    // Warm-up: the ghost's device made, the session shared, both directions once.
    await into(plain, "plain", 50);
    await into(secret, "secret", 50);
    const intoPlain = await into(plain, "plain", MESSAGES);
    const intoEncrypted = await into(secret, "secret", MESSAGES);

    const fromPlain = await from("plain", MESSAGES, async (i) =>
      h.hs.sendMessage(plain, h.alice, { msgtype: "m.text", body: `p${i}` }),
    );
    // The person's own encryption is not the bridge's cost: sealed beforehand, then sent.
    const sealed: Record<string, unknown>[] = [];
    for (let i = 0; i < MESSAGES; i++)
      sealed.push(await alice.seal(secret, { msgtype: "m.text", body: `s${i}` }));
    const fromEncrypted = await from("secret", MESSAGES, (i) => alice.post(secret, sealed[i]!));

    const gc = (globalThis as { gc?: () => void }).gc ?? (() => undefined);
    gc();
    const before = {
      rss: process.memoryUsage().rss,
      heap: process.memoryUsage().heapUsed + process.memoryUsage().external,
    };
    let ghost = 0;
    await into(secret, "secret", GHOSTS, () => `ghost-${++ghost}`);
    gc();
    const after = {
      rss: process.memoryUsage().rss,
      heap: process.memoryUsage().heapUsed + process.memoryUsage().external,
    };
    return {
      intoPlain,
      intoEncrypted,
      fromPlain,
      fromEncrypted,
      perDevice: {
        rssKiB: Math.round((after.rss - before.rss) / 1024 / GHOSTS),
        heapKiB: Math.round((after.heap - before.heap) / 1024 / GHOSTS),
      },
    };
  } finally {
    await bridge.stop();
    alice.close();
    await h.cleanup();
  }
}

export function encryptionRows(e: EncryptionFigures): [string, string, string][] {
  const ratio = (value: number, of: number) => `${(value / of).toFixed(2)}× plain room`;
  return [
    ["far side → plain room", `${e.intoPlain} msg/s`, ""],
    [
      "far side → encrypted room (1 person's device)",
      `${e.intoEncrypted} msg/s`,
      ratio(e.intoEncrypted, e.intoPlain),
    ],
    ["plain room → far side", `${e.fromPlain} msg/s`, ""],
    [
      "encrypted room → far side (decrypted)",
      `${e.fromEncrypted} msg/s`,
      ratio(e.fromEncrypted, e.fromPlain),
    ],
    [
      `memory per ghost device (${GHOSTS} ghosts)`,
      `RSS ${e.perDevice.rssKiB} KiB, heap+external ${e.perDevice.heapKiB} KiB`,
      "",
    ],
  ];
}

if (import.meta.url === `file://${process.argv[1]}`) {
  encryptionBench()
    .then((e) => {
      console.log(`tribridge encryption bench: ${MESSAGES} messages each way, node ${process.version}`);
      for (const [name, value, r] of encryptionRows(e))
        console.log(`${name.padEnd(46)} ${value.padEnd(40)} ${r}`);
      process.exit(0);
    })
    .catch((err: unknown) => {
      console.error(err);
      process.exit(1);
    });
}
