/**
 * The bridge process killed with SIGKILL while its ghosts' devices are being made and are sharing
 * room keys, and people write in the encrypted room while it is down (their room keys for the bot's
 * device then miss the transactions the homeserver could not deliver, as Synapse drops them).
 * Started again: every device message is in the room once, and every person's client decrypts
 * every one of them; every person's message reaches MQTT.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import mqtt, { type MqttClient } from "mqtt";
import { BridgeProcess } from "../helpers/bridge-process.js";
import { freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";
import { OlmPerson } from "../helpers/olm-person.js";

const TOTAL = 60;
const DEVICES = 6;
let h: Harness;
let bridge: BridgeProcess;
const clients: MqttClient[] = [];
const people: OlmPerson[] = [];

before(async () => {
  const port = await freePort();
  h = await harness({
    bridges: { mqtt: { home: { embedded: { port } } } },
    routes: [
      {
        id: "vault",
        room: "#vault:test.local",
        endpoints: [
          { account: "mqtt.home", direction: "in", topic: "vault/+/t" },
          { account: "mqtt.home", direction: "out", topic: "vault/cmd" },
        ],
      },
    ],
    encryption: { enabled: true, feed: "transactions", deviceCreation: "msc4190" },
    homeserver: { msc2409ToDevice: true, msc3202TransactionExtensions: true },
    permissions: { users: ["@*:test.local"] }, // carol is a member, not a moderator
  });
  bridge = new BridgeProcess(h);
});

after(async () => {
  await Promise.all(clients.map((c) => c.endAsync(true)));
  await bridge?.kill("SIGKILL");
  for (const p of people) p.close();
  await h?.cleanup();
});

async function connect(clientId: string): Promise<MqttClient> {
  const port = (h.config.accounts[0]!.config as { embedded: { port: number } }).embedded.port;
  const client = mqtt.connect(`mqtt://127.0.0.1:${port}`, { clientId, reconnectPeriod: 100, clean: true });
  clients.push(client);
  await waitFor(`${clientId} connected`, () => client.connected, 30_000);
  return client;
}

async function person(localpart: string, room: string): Promise<OlmPerson> {
  const userId = localpart === "alice" ? h.alice : h.hs.registerUser(localpart);
  if (userId !== h.alice) h.hs.joinRoom(room, userId);
  const p = await OlmPerson.create(h.hs, userId);
  people.push(p);
  return p;
}

test(
  "SIGKILL while ghost devices share room keys, people writing meanwhile: nothing lost, nothing left undecryptable",
  { timeout: 180_000 },
  async () => {
    const room = h.hs.createRoom({
      creator: h.alice,
      alias: "#vault:test.local",
      preset: "public_chat",
      encrypted: true,
    });
    const alice = await person("alice", room);
    const bob = await person("bob", room);
    bridge.start();
    await waitFor(
      "the bot in the room",
      () => h.hs.membershipOf(room, h.hs.appserviceUserId) === "join",
      30_000,
    );
    const fromGhosts = () =>
      h.hs.events(room).filter((e) => e.type === "m.room.encrypted" && e.sender.startsWith("@_tb_"));

    const heard: string[] = [];
    const subscriber = await connect("listener");
    await subscriber.subscribeAsync("vault/cmd", { qos: 1 });
    subscriber.on("message", (_topic, payload) => heard.push(payload.toString()));

    const device = await connect("sensors");
    for (let i = 0; i < TOTAL; i++)
      void device.publishAsync(`vault/d${i % DEVICES}/t`, String(i), { qos: 1 }).catch(() => undefined);
    await alice.send(room, { msgtype: "m.text", body: "alice before" });
    // Killed once some ghosts have devices and have shared keys, while the others are making theirs.
    await waitFor("a few encrypted device messages", () => fromGhosts().length >= 3, 60_000);
    await bridge.kill("SIGKILL");
    const atKill = fromGhosts().length;

    // Meanwhile: Carol joins and writes (her room key for the bot's device misses its transaction).
    const carol = await person("carol", room);
    await carol.send(room, { msgtype: "m.text", body: "carol while down" });
    await alice.send(room, { msgtype: "m.text", body: "alice while down" });

    bridge.start();
    await waitFor(`all ${TOTAL} device messages`, () => fromGhosts().length >= TOTAL, 120_000);
    await alice.send(room, { msgtype: "m.text", body: "alice after" });
    await waitFor(
      "every person's message on MQTT",
      () =>
        ["alice before", "carol while down", "alice while down", "alice after"].every((b) =>
          heard.includes(b),
        ),
      60_000,
    );
    await new Promise((r) => setTimeout(r, 1000)); // a duplicate would show up by now

    assert.ok(atKill < TOTAL, `the kill happened mid-stream (${atKill} of ${TOTAL} were in)`);
    const events = fromGhosts();
    assert.equal(events.length, TOTAL, "each device message once");
    for (const reader of [alice, bob, carol]) {
      const bodies: number[] = [];
      for (const ev of events) {
        // Carol joined after the first ones were sent: she reads from her join on (history "shared"
        // gives her no keys to what came before, as in Element).
        const clear = await reader.decrypt(ev).catch((err: { description?: string }) => {
          if (reader === carol) return undefined;
          throw new Error(
            `${reader.userId} could not decrypt ${ev.event_id}: ${err.description ?? String(err)}`,
          );
        });
        if (clear) bodies.push(Number(clear.content.body));
      }
      if (reader !== carol)
        assert.deepEqual(
          [...bodies].sort((a, b) => a - b),
          Array.from({ length: TOTAL }, (_, i) => i),
          `${reader.userId} reads every device message`,
        );
    }
  },
);
