/**
 * The bridge, subscribed to an external broker (Mosquitto) with a persistent session at QoS 1, is
 * killed with SIGKILL while 1,000 QoS 1 messages stream through it, and started again, several
 * times over the stream: every message must be in the room exactly once, in order. At each kill
 * the broker keeps what the bridge had not acknowledged and re-sends it (DUP set, same packet id)
 * when the bridge is back; the bridge may have enqueued it already.
 *
 * Three kills by default (35–45 s; a restart takes the bridge about 5 s); TRIBRIDGE_LONG_FAULTS=1
 * kills it ten times (55–90 s).
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { Redis } from "ioredis";
import mqtt, { type MqttClient } from "mqtt";
import { BridgeProcess } from "../helpers/bridge-process.js";
import { hasMosquitto, startMosquitto, type Broker } from "../helpers/brokers.js";
import { REDIS_URL, harness, waitFor, type Harness } from "../helpers/fixture.js";

const TOTAL = 1000;
const KILLS = process.env.TRIBRIDGE_LONG_FAULTS === "1" ? 10 : 3;
const CLIENT_ID = "tribridge-plant";

let h: Harness;
let broker: Broker | undefined;
let bridge: BridgeProcess;
let publisher: MqttClient | undefined;
const redis = new Redis(REDIS_URL);

before(async () => {
  broker = await startMosquitto(undefined, { persistent: true });
  if (!broker) return;
  h = await harness({
    bridges: { mqtt: { plant: { url: `mqtt://127.0.0.1:${broker.port}`, clientId: CLIENT_ID } } },
    routes: [
      {
        id: "stream",
        room: "#stream:test.local",
        endpoints: [{ account: "mqtt.plant", direction: "in", topic: "seq/+", qos: 1 }],
      },
    ],
  });
  bridge = new BridgeProcess(h);
});

after(async () => {
  await publisher?.endAsync(true);
  await bridge?.kill("SIGKILL");
  await h?.cleanup();
  await broker?.stop();
  redis.disconnect();
});

test(
  `external broker, persistent session: SIGKILL ${KILLS} times during ${TOTAL} QoS 1 messages, each arrives exactly once, in order`,
  { skip: !hasMosquitto && "mosquitto not installed", timeout: 60_000 + KILLS * 30_000 },
  async () => {
    const room = h.hs.createRoom({ creator: h.alice, alias: "#stream:test.local", preset: "public_chat" });
    const inRoom = () => h.hs.messages(room).map((m) => String(m.content.body));
    bridge.start();
    await waitFor("the bridge subscribed", () => exists(`kv:mqtt.plant:subscriptions:${CLIENT_ID}`), 30_000);
    publisher = await mqtt.connectAsync(`mqtt://127.0.0.1:${broker!.port}`, { clientId: "counter" });
    const publish = async (from: number, to: number) => {
      for (let i = from; i < to; i++) await publisher!.publishAsync("seq/counter", String(i), { qos: 1 });
    };

    // The stream in KILLS + 1 parts; each kill lands while the bridge is taking in its part, at a
    // random point: the broker holds the rest of the part, and the next part arrives meanwhile.
    const part = Math.ceil(TOTAL / (KILLS + 1));
    const killedAt: number[] = [];
    let publishing = publish(0, part);
    for (let k = 0; k < KILLS; k++) {
      const before = await takenIn();
      const at = before + Math.floor((0.2 + 0.6 * Math.random()) * ((k + 1) * part - before));
      await waitFor("the bridge taking in messages", async () => (await takenIn()) >= at, 30_000);
      await bridge.kill("SIGKILL");
      killedAt.push(await takenIn());
      const next = publishing.then(() => publish((k + 1) * part, Math.min(TOTAL, (k + 2) * part)));
      publishing = next;
      await next;
      bridge.start();
    }
    await publishing;
    await publisher.publishAsync("seq/counter", "end", { qos: 1 });
    // A room's messages keep their order, so everything before "end" is in once it is.
    await waitFor("the last message", () => inRoom().includes("end"), 60_000);

    const outcome = faults(
      inRoom()
        .filter((b) => b !== "end")
        .map(Number),
      TOTAL,
    );
    console.log(`killed after ${killedAt.join(", ")} messages taken in:`, outcome);
    assert.ok(
      killedAt.every((n, k) => n < (k + 1) * part),
      `each kill came while messages were still coming in (${killedAt.join(", ")})`,
    );
    assert.deepEqual(outcome, { lost: 0, duplicated: 0, reordered: 0 });
  },
);

/**
 * How many messages the bridge has taken in so far (and not lost, whatever happens next): its
 * records of the QoS 1 packet ids the broker sent it, one per message here (ids do not wrap).
 */
async function takenIn(): Promise<number> {
  return redis.hlen(`${h.prefix}:kv:mqtt.plant:redelivery:session:${CLIENT_ID}`);
}

async function exists(key: string): Promise<boolean> {
  return (await redis.exists(`${h.prefix}:${key}`)) === 1;
}

/** What went wrong in a room that should hold 0 … total-1, once each, in order. */
function faults(bodies: number[], total: number): { lost: number; duplicated: number; reordered: number } {
  const seen = new Set<number>();
  let duplicated = 0;
  let reordered = 0;
  let highest = -1;
  for (const n of bodies) {
    if (seen.has(n)) {
      duplicated++;
      continue;
    }
    seen.add(n);
    if (n < highest) reordered++;
    highest = Math.max(highest, n);
  }
  return { lost: total - seen.size, duplicated, reordered };
}
