/**
 * End-to-end encrypted rooms bridged (encryption.enabled), on the test homeserver with its device,
 * key and to-device endpoints, fed both ways the bridge supports: appservice transactions
 * (MSC2409/MSC3202, devices made with MSC4190) and per-device `/sync` (devices made by login).
 * People use real Olm machines (olm-person.ts). The same cases against Synapse: encryption-synapse.test.ts.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { readdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { start, type RunningBridge } from "../../src/app.js";
import type { Config } from "../../src/config/load.js";
import { harness, waitFor, type Harness } from "../helpers/fixture.js";
import { OlmPerson } from "../helpers/olm-person.js";
import type { RecordedEvent } from "../helpers/test-homeserver.js";
import { testConnector, type TestConnector } from "../helpers/test-connector.js";

const VARIANTS = [
  {
    name: "the transaction feed (MSC2409/MSC3202; devices by MSC4190)",
    encryption: { enabled: true, feed: "transactions", deviceCreation: "msc4190" },
    homeserver: { msc2409ToDevice: true, msc3202TransactionExtensions: true },
  },
  {
    name: "the /sync feed (devices by m.login.application_service)",
    encryption: { enabled: true, feed: "sync", deviceCreation: "login" },
    homeserver: { msc4190: false },
  },
] as const;

for (const variant of VARIANTS) {
  describe(`encrypted rooms bridged, ${variant.name}`, () => {
    const connectors = [testConnector()];
    let h: Harness;
    let config: Config;
    let bridge: RunningBridge;
    let remote: TestConnector;
    let bot: string;
    let room: string;
    let later: string; // a route's room that turns encryption on while bridged
    let rotating: string; // a route's room whose Megolm sessions last 2 messages
    let alice: OlmPerson;
    const people: OlmPerson[] = [];

    async function startBridge(): Promise<void> {
      bridge = await start({ config, registration: h.registration, connectors });
      remote = bridge.connector("test.a") as TestConnector;
    }

    async function person(localpart: string, joins: string): Promise<OlmPerson> {
      const userId = h.hs.registerUser(localpart);
      h.hs.joinRoom(joins, userId);
      const p = await OlmPerson.create(h.hs, userId);
      people.push(p);
      return p;
    }

    /** The next encrypted event in `roomId` from someone other than `reader`, after `seen` of them. */
    function nextEncrypted(reader: OlmPerson, roomId: string, seen: number): Promise<RecordedEvent> {
      return waitFor("an encrypted event", () => reader.encryptedFromOthers(roomId)[seen], 15_000);
    }

    before(async () => {
      h = await harness({
        connectors,
        bridges: { test: { a: {} } },
        routes: [
          {
            id: "secret",
            room: "#secret:test.local",
            endpoints: [{ account: "test.a", direction: "inout", channel: "secret" }],
          },
          {
            id: "rotating",
            room: "#rotating:test.local",
            endpoints: [{ account: "test.a", direction: "inout", channel: "rotating" }],
          },
          {
            id: "later",
            room: "#later:test.local",
            endpoints: [{ account: "test.a", direction: "inout", channel: "later" }],
          },
        ],
        encryption: variant.encryption,
        homeserver: variant.homeserver,
        permissions: { users: ["@*:test.local"] }, // bob and carol are members, not moderators
      });
      config = { ...h.config, appservice: { ...h.config.appservice, admins: [h.alice] } };
      bot = h.hs.appserviceUserId;
      room = h.hs.createRoom({
        creator: h.alice,
        alias: "#secret:test.local",
        preset: "public_chat",
        encrypted: true,
      });
      rotating = h.hs.createRoom({ creator: h.alice, alias: "#rotating:test.local", preset: "public_chat" });
      h.hs.sendState(rotating, h.alice, "m.room.encryption", "", {
        algorithm: "m.megolm.v1.aes-sha2",
        rotation_period_msgs: 2,
      });
      later = h.hs.createRoom({ creator: h.alice, alias: "#later:test.local", preset: "public_chat" });
      alice = await OlmPerson.create(h.hs, h.alice);
      people.push(alice);
      await startBridge();
      await waitFor("the bot in the room", () => h.hs.membershipOf(room, bot) === "join");
    });

    after(async () => {
      await bridge?.stop();
      for (const p of people) p.close();
      await h.cleanup();
    });

    let ghostDevice = "";

    const wasRelayed = (channel: string, text: string) =>
      remote.sentTo(channel).some((m) => m.body.text === text);
    /** Waits until a room message `text` reached the far side's `channel`. */
    const relayed = (channel: string, text: string) =>
      waitFor(`"${text}" relayed`, () => wasRelayed(channel, text), 15_000);

    /** A device message into the room, as Alice's client reads the event `ghost` sends for it. */
    async function deviceMessage(text: string, remoteId: string, ghost: string) {
      const seen = alice.encryptedFromOthers(room).length;
      await remote.emit("secret", { remoteId, sender: { id: "dev" }, body: { text } });
      const ev = await waitFor(
        `"${text}" in the room`,
        () =>
          alice
            .encryptedFromOthers(room)
            .slice(seen)
            .find((e) => e.sender === ghost),
        15_000,
      );
      const clear = await alice.decrypt(ev);
      assert.equal(clear.content.body, text);
      return clear;
    }

    test("a device's message is encrypted by its ghost's own device; a person's client decrypts it", async () => {
      await remote.emit("secret", { remoteId: "r1", sender: { id: "dev" }, body: { text: "reading 1" } });
      const ev = await nextEncrypted(alice, room, 0);
      const clear = await alice.decrypt(ev);
      assert.equal(clear.content.body, "reading 1");
      assert.notEqual(clear.sender, bot, "sent as the device's ghost");
      assert.equal(ev.sender, clear.sender);
      assert.deepEqual(h.hs.devicesOf(clear.sender), [clear.senderDevice], "the ghost's one device sent it");
      ghostDevice = clear.senderDevice;
      assert.ok(await alice.seesCrossSigned(clear.sender, ghostDevice), "cross-signed by its ghost");
      assert.equal(
        h.hs.messages(room).filter((m) => m.sender !== h.alice).length,
        0,
        "nothing posted in plaintext",
      );
    });

    test("a person's encrypted message is decrypted by the bot's device and relayed", async () => {
      await alice.send(room, { msgtype: "m.text", body: "hello devices" });
      await relayed("secret", "hello devices");
    });

    test("an event whose room key comes later waits for it, then is relayed", async () => {
      const bob = await person("bob", room);
      bob.holdingToDevice = true;
      await bob.send(room, { msgtype: "m.text", body: "key comes later" });
      await new Promise((r) => setTimeout(r, 500));
      assert.ok(!wasRelayed("secret", "key comes later"), "not readable yet");
      await bob.releaseToDevice();
      await relayed("secret", "key comes later");
    });

    test("a member who joins later reads the next device message", async () => {
      const carol = await person("carol", room);
      await h.hs.waitForPushIdle(); // the bridge has seen her join (a message sent with it may miss her)
      const seen = carol.encryptedFromOthers(room).length;
      await remote.emit("secret", { remoteId: "r2", sender: { id: "dev" }, body: { text: "reading 2" } });
      const ev = await waitFor(
        "the next device message",
        async () => {
          for (const e of carol.encryptedFromOthers(room).slice(seen))
            if (e.sender !== h.alice && e.sender !== people[1]!.userId) return e;
          return undefined;
        },
        15_000,
      );
      assert.equal((await carol.decrypt(ev)).content.body, "reading 2");
    });

    test("a room that turns encryption on switches at once, both ways", async () => {
      await remote.emit("later", { remoteId: "l1", sender: { id: "dev" }, body: { text: "in the clear" } });
      await h.hs.waitForMessages(later, 1);
      h.hs.enableEncryption(later, h.alice);
      await h.hs.waitForPushIdle();
      await remote.emit("later", { remoteId: "l2", sender: { id: "dev" }, body: { text: "now encrypted" } });
      const ev = await nextEncrypted(alice, later, 0);
      assert.equal((await alice.decrypt(ev)).content.body, "now encrypted");
      assert.deepEqual(
        h.hs.messages(later).map((m) => m.content.body),
        ["in the clear"],
        "nothing in plaintext after the switch",
      );
      await alice.send(later, { msgtype: "m.text", body: "encrypted answer" });
      await relayed("later", "encrypted answer");
    });

    test("Megolm sessions rotate as the room's settings say (rotation_period_msgs)", async () => {
      for (let i = 0; i < 5; i++)
        await remote.emit("rotating", {
          remoteId: `rot${i}`,
          sender: { id: "dev" },
          body: { text: `r${i}` },
        });
      const events = await waitFor(
        "5 encrypted messages",
        () => alice.encryptedFromOthers(rotating).length >= 5 && alice.encryptedFromOthers(rotating),
        15_000,
      );
      const sessions = events.map((e) => String(e.content.session_id));
      assert.equal(sessions[0], sessions[1]);
      assert.notEqual(sessions[1], sessions[2]);
      assert.equal(sessions[2], sessions[3]);
      assert.notEqual(sessions[3], sessions[4]);
      for (const [i, ev] of events.entries()) assert.equal((await alice.decrypt(ev)).content.body, `r${i}`);
    });

    test("commands work in an encrypted room, answered encrypted", async () => {
      const dm = h.hs.createRoom({
        creator: h.alice,
        preset: "private_chat",
        invite: [bot],
        encrypted: true,
      });
      await waitFor("the bot in the command room", () => h.hs.membershipOf(dm, bot) === "join");
      await alice.send(dm, { msgtype: "m.text", body: "!tribridge status" });
      const answer = await nextEncrypted(alice, dm, 0);
      assert.equal(answer.sender, bot);
      const clear = await alice.decrypt(answer);
      assert.match(String(clear.content.body), /End-to-end encryption: \d+ device/);
      assert.equal(h.hs.messages(dm).filter((m) => m.sender === bot).length, 0, "no plaintext answer");
    });

    test("a restart keeps the devices: the same ghost device encrypts, the bot's still decrypts", async () => {
      const ghost = alice
        .encryptedFromOthers(room)
        .find((e) => e.sender !== bot && h.hs.devicesOf(e.sender).length > 0)!.sender;
      const botDevices = h.hs.devicesOf(bot);
      await bridge.stop();
      await startBridge();
      const clear = await deviceMessage("after a restart", "r3", ghost);
      assert.equal(clear.senderDevice, ghostDevice);
      assert.deepEqual(h.hs.devicesOf(ghost), [ghostDevice]);
      assert.deepEqual(h.hs.devicesOf(bot), botDevices);
      await alice.send(room, { msgtype: "m.text", body: "still read" });
      await relayed("secret", "still read");
    });

    test("a lost crypto store: the ghost moves to a new device, says so in the room, the old one is removed", async () => {
      const ghost = alice.encryptedFromOthers(room).find((e) => e.sender.includes("_dev:"))!.sender;
      const oldDevice = h.hs.devicesOf(ghost)[0];
      await bridge.stop();
      const dir = join(config.dataDir, "crypto");
      for (const file of readdirSync(dir)) if (file.endsWith(".olm")) rmSync(join(dir, file));
      await startBridge();
      const seen = alice.encryptedFromOthers(room).length;
      const clear = await deviceMessage("from a new device", "r5", ghost);
      assert.notEqual(clear.senderDevice, oldDevice);
      assert.deepEqual(h.hs.devicesOf(ghost), [clear.senderDevice], "the lost device removed");
      const told = await waitFor(
        "the notice",
        async () => {
          for (const e of alice
            .encryptedFromOthers(room)
            .slice(seen)
            .filter((x) => x.sender === bot)) {
            const body = String((await alice.decrypt(e)).content.body);
            if (body.includes(ghost)) return body;
          }
          return undefined;
        },
        15_000,
      );
      assert.match(told, /lost the encryption keys/);
      await alice.send(room, { msgtype: "m.text", body: "read after a lost store" });
      await relayed("secret", "read after a lost store");
    });

    test("a device a person adds while the bridge is down gets the next device message", async () => {
      await bridge.stop();
      // Its keys' upload changes Alice's device list; the transaction saying so fails, and is dropped.
      const tablet = await OlmPerson.create(h.hs, h.alice, h.hs.logIn(h.alice));
      people.push(tablet);
      await startBridge();
      const seen = tablet.encryptedFromOthers(room).length;
      await remote.emit("secret", {
        remoteId: "r4",
        sender: { id: "dev" },
        body: { text: "for every device" },
      });
      const ev = await waitFor(
        "the next device message",
        () =>
          tablet
            .encryptedFromOthers(room)
            .slice(seen)
            .find((e) => e.sender !== h.hs.appserviceUserId),
        15_000,
      );
      assert.equal((await tablet.decrypt(ev)).content.body, "for every device");
    });
  });
}
