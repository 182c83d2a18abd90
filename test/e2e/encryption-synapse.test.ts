/**
 * End-to-end encryption against a real Synapse and a real client (matrix-js-sdk with its Rust
 * crypto): a person in an encrypted room routed to the test connector reads what a device sends,
 * decrypted and shown as sent by the device's ghost, and what the person writes reaches the device.
 *
 * Twice: with Synapse's appservice flags on (to-device messages and device data in transactions,
 * MSC2409/MSC3202; devices made with PUT /devices, MSC4190), and off (each device's own /sync;
 * devices made by m.login.application_service). One Synapse for each, as the flags are its own.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { rmSync } from "node:fs";
import { EventShieldReason } from "matrix-js-sdk/lib/crypto-api/index.js";
import { start, type RunningBridge } from "../../src/app.js";
import { validateConfig, type Config } from "../../src/config/load.js";
import type { EncryptionConfig } from "../../src/config/schema.js";
import { ghostUserId, readerUserId } from "../../src/matrix/ids.js";
import { buildRegistration } from "../../src/matrix/registration.js";
import { CryptoPerson } from "../helpers/crypto-person.js";
import { deleteKeys, freePort, REDIS_URL, tempDataDir, waitFor } from "../helpers/fixture.js";
import {
  startSynapse,
  synapseSkipReason,
  type Synapse,
  type SynapseExperimentalFeatures,
} from "../helpers/synapse.js";
import { testConnector, type TestConnector } from "../helpers/test-connector.js";

const SERVER_NAME = "synapse.test";
/** A message through Synapse, both clients and the bridge: seconds at most; more on a loaded machine. */
const RELAY_TIMEOUT_MS = 30_000;

interface Mode {
  name: string;
  encryption: Pick<EncryptionConfig, "feed" | "deviceCreation">;
  experimentalFeatures: SynapseExperimentalFeatures;
}

const MODES: Mode[] = [
  {
    name: "Synapse's appservice flags on: transactions feed, devices by MSC4190",
    encryption: { feed: "transactions", deviceCreation: "msc4190" },
    experimentalFeatures: { msc2409_to_device_messages_enabled: true, msc3202_transaction_extensions: true },
  },
  {
    name: "Synapse's appservice flags off: /sync feed, devices by login",
    encryption: { feed: "sync", deviceCreation: "login" },
    experimentalFeatures: {},
  },
];

const skip = synapseSkipReason();

for (const mode of MODES) {
  describe(`end-to-end encryption with Synapse (${mode.name})`, { skip }, () => {
    const connectors = [testConnector()];
    const prefix = `test-${randomUUID().slice(0, 8)}`;
    let dataDir: string | undefined;
    let synapse: Synapse;
    let bridge: RunningBridge;
    let person: CryptoPerson;
    let remote: TestConnector;
    let room: string;
    let config: Config;

    before(async () => {
      dataDir = tempDataDir();
      const base = {
        dataDir,
        homeserver: { url: "http://127.0.0.1:1", domain: SERVER_NAME },
        appservice: { port: await freePort() },
        queue: { redisUrl: REDIS_URL, prefix, shards: 2, initialRetryDelayMs: 50, maxRetryDelayMs: 1000 },
        encryption: { enabled: true, ...mode.encryption },
        bridges: { test: { a: {} } },
      };
      // The registration depends on the appservice and the ghosts, not on the routes (rooms by id).
      const registration = buildRegistration(validateConfig(base, connectors), connectors);
      synapse = await startSynapse({
        serverName: SERVER_NAME,
        registrations: [registration],
        experimentalFeatures: mode.experimentalFeatures,
      });
      console.log(`Synapse started in ${synapse.startMs} ms`);
      const alice = await synapse.registerUser("alice", { displayName: "Alice" });
      person = await CryptoPerson.start({
        baseUrl: synapse.url,
        userId: alice.userId,
        password: alice.password,
      });
      room = await person.createEncryptedRoom({ name: "readings" });
      config = validateConfig(
        {
          ...base,
          homeserver: { url: synapse.url, domain: SERVER_NAME },
          routes: [
            {
              id: "readings",
              room,
              endpoints: [{ account: "test.a", direction: "inout", channel: "general" }],
            },
          ],
        },
        connectors,
      );
      bridge = await start({ config, registration, connectors });
      remote = bridge.connector("test.a") as TestConnector;
    });

    after(async () => {
      await person?.stop();
      await bridge?.stop();
      await synapse?.stop();
      await deleteKeys(prefix);
      if (dataDir) rmSync(dataDir, { recursive: true, force: true });
    });

    test("a device's message reaches the person's client encrypted, decrypted as sent by the device's ghost", async () => {
      const began = Date.now();
      await remote.emit("general", {
        remoteId: "r1",
        sender: { id: "sensor-1", displayName: "Sensor 1" },
        body: { text: "21.5 °C" },
      });
      const naming = { ghostPrefix: config.appservice.ghostPrefix, domain: SERVER_NAME };
      const ghost = ghostUserId(naming, "test", "a", "sensor-1");
      const message = await person
        .waitForMessage(room, ghost, { body: "21.5 °C", timeoutMs: RELAY_TIMEOUT_MS })
        .catch((err: Error) => {
          throw new Error(
            `${err.message}; undecryptable: ${person.undecryptable(room).join("; ") || "none"}`,
          );
        });
      assert.equal(message.sender, ghost);
      assert.equal(message.content.msgtype, "m.text");
      // Sent by a device of the ghost's own that the client knows (unverified, as a bridge's are):
      // not an unknown device, nor one whose keys do not match the sender.
      assert.ok(message.encryptionInfo, "the client has encryption info for it");
      assert.notEqual(message.encryptionInfo.shieldReason, EventShieldReason.UNKNOWN_DEVICE);
      assert.notEqual(message.encryptionInfo.shieldReason, EventShieldReason.AUTHENTICITY_NOT_GUARANTEED);
      assert.notEqual(message.encryptionInfo.shieldReason, EventShieldReason.MISMATCHED_SENDER_KEY);
      assert.notEqual(message.encryptionInfo.shieldReason, EventShieldReason.MISMATCHED_SENDER);
      // Cross-signed by its ghost (Synapse lets an appservice upload the keys without UIA).
      assert.notEqual(message.encryptionInfo.shieldReason, EventShieldReason.UNSIGNED_DEVICE);
      console.log(`device → person: ${Date.now() - began} ms`);
    });

    test("the person's encrypted message reaches the device, decrypted by the bridge", async () => {
      // The reader's device is the one the room key must reach (not the bot's: Synapse refuses
      // its /sync); the client shares with the members it knows of.
      const reader = readerUserId({ ghostPrefix: config.appservice.ghostPrefix, domain: SERVER_NAME });
      await person.waitForMember(room, reader);
      const began = Date.now();
      await person.sendText(room, "set heating to 20");
      const [sent] = await waitFor(
        "the message at the device",
        () => remote.sentTo("general").length > 0 && remote.sentTo("general"),
        RELAY_TIMEOUT_MS,
      );
      assert.equal(sent?.body.text, "set heating to 20");
      assert.equal(sent?.sender.userId, person.userId);
      console.log(`person → device: ${Date.now() - began} ms`);
    });
  });
}
