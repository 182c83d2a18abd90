/**
 * End-to-end encryption against a real Synapse and a real client (matrix-js-sdk with its Rust
 * crypto): a person in an encrypted room routed to MQTT topics (the embedded broker) reads what a
 * device publishes, decrypted and shown as sent by the device's ghost, and what the person writes
 * is published to the device's topic.
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
import mqtt, { type MqttClient } from "mqtt";
import { connectors } from "../../bridges/index.js";

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
    const prefix = `test-${randomUUID().slice(0, 8)}`;
    let dataDir: string | undefined;
    let synapse: Synapse;
    let bridge: RunningBridge;
    let person: CryptoPerson;
    let device: MqttClient;
    const heard: string[] = [];
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
        bridges: { mqtt: { home: { embedded: { port: await freePort() } } } },
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
              endpoints: [
                {
                  account: "mqtt.home",
                  direction: "in",
                  topic: "home/+/temperature",
                  sender: { topicLevel: 2 },
                },
                { account: "mqtt.home", direction: "out", topic: "home/heating/set", qos: 1 },
              ],
            },
          ],
        },
        connectors,
      );
      bridge = await start({ config, registration, connectors });
      const port = (config.accounts[0]!.config as { embedded: { port: number } }).embedded.port;
      device = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
        clientId: "sensor-1",
        reconnectPeriod: 0,
      });
      await device.subscribeAsync("home/heating/set", { qos: 1 });
      device.on("message", (_topic, payload) => heard.push(payload.toString()));
    });

    after(async () => {
      await device?.endAsync(true);
      await person?.stop();
      await bridge?.stop();
      await synapse?.stop();
      await deleteKeys(prefix);
      if (dataDir) rmSync(dataDir, { recursive: true, force: true });
    });

    test("a device's message reaches the person's client encrypted, decrypted as sent by the device's ghost", async () => {
      const began = Date.now();
      await device.publishAsync("home/sensor-1/temperature", "21.5 °C", { qos: 1 });
      const naming = { ghostPrefix: config.appservice.ghostPrefix, domain: SERVER_NAME };
      const ghost = ghostUserId(naming, "mqtt", "home", "sensor-1");
      const message = await person
        .waitForMessage(room, ghost, { body: "21.5 °C", timeoutMs: RELAY_TIMEOUT_MS })
        .catch((err: Error) => {
          throw new Error(
            `${err.message}; undecryptable: ${person.undecryptable(room).join("; ") || "none"}`,
          );
        });
      assert.equal(message.sender, ghost);
      assert.equal(message.content.msgtype, "m.notice"); // readings are notices
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
      const sent = await person.sendText(room, "set heating to 20");
      await waitFor("the message at the device", () => heard.includes("set heating to 20"), RELAY_TIMEOUT_MS);
      console.log(`person → device: ${Date.now() - began} ms`);
      // The broker took it: the bot's ✅ on it, encrypted by the bot's device, which Synapse accepts.
      const bot = `@${config.appservice.botLocalpart}:${SERVER_NAME}`;
      const mark = await person.waitForMessage(room, bot, {
        type: "m.reaction",
        timeoutMs: RELAY_TIMEOUT_MS,
      });
      assert.deepEqual(mark.content["m.relates_to"], { rel_type: "m.annotation", event_id: sent, key: "✅" });
    });
  });
}
