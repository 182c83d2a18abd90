/**
 * Device availability against a real Synapse: with presence on, a person reads the device ghost's
 * presence as a Zigbee2MQTT availability topic sets it; with presence off (`presence.enabled:
 * false`, which takes the request and ignores it), the status line alone shows the state. Both
 * show one status line, edited with the change.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { rmSync } from "node:fs";
import mqtt, { type MqttClient } from "mqtt";
import { connectors } from "../../bridges/index.js";
import { start, type RunningBridge } from "../../src/app.js";
import { validateConfig } from "../../src/config/load.js";
import { ghostUserId } from "../../src/matrix/ids.js";
import { buildRegistration } from "../../src/matrix/registration.js";
import { deleteKeys, freePort, REDIS_URL, tempDataDir, waitFor } from "../helpers/fixture.js";
import { startSynapse, synapseSkipReason, type Synapse, type SynapseUser } from "../helpers/synapse.js";

const SERVER_NAME = "synapse.test";
const TIMEOUT_MS = 30_000;
const skip = synapseSkipReason();

for (const presence of [true, false]) {
  describe(`device availability with Synapse, presence ${presence ? "on" : "off"}`, { skip }, () => {
    const prefix = `test-${randomUUID().slice(0, 8)}`;
    const dataDir = tempDataDir();
    let synapse: Synapse;
    let alice: SynapseUser;
    let bridge: RunningBridge;
    let device: MqttClient;
    let room: string;
    let ghost: string;

    const asAlice = async (method: string, path: string, body?: unknown) => {
      const res = await fetch(`${synapse.url}${path}`, {
        method,
        headers: { authorization: `Bearer ${alice.accessToken}`, "content-type": "application/json" },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      return { status: res.status, body: (await res.json()) as Record<string, unknown> };
    };
    /** The room's messages as alice sees them, oldest first. */
    const messages = async () => {
      const { body } = await asAlice(
        "GET",
        `/_matrix/client/v3/rooms/${encodeURIComponent(room)}/messages?dir=b&limit=50`,
      );
      return (body.chunk as { type: string; sender: string; content: Record<string, unknown> }[])
        .filter((e) => e.type === "m.room.message")
        .reverse();
    };

    before(async () => {
      const base = {
        dataDir,
        homeserver: { url: "http://127.0.0.1:1", domain: SERVER_NAME },
        appservice: { port: await freePort() },
        queue: { redisUrl: REDIS_URL, prefix, shards: 2, initialRetryDelayMs: 50, maxRetryDelayMs: 1000 },
        bridges: { mqtt: { home: { embedded: { port: await freePort() } } } },
      };
      const registration = buildRegistration(validateConfig(base, connectors), connectors);
      synapse = await startSynapse({ serverName: SERVER_NAME, registrations: [registration], presence });
      alice = await synapse.registerUser("alice", { displayName: "Alice" });
      room = String(
        (await asAlice("POST", "/_matrix/client/v3/createRoom", { preset: "public_chat" })).body.room_id,
      );
      const config = validateConfig(
        {
          ...base,
          homeserver: { url: synapse.url, domain: SERVER_NAME },
          routes: [
            {
              id: "home",
              room,
              endpoints: [
                {
                  account: "mqtt.home",
                  direction: "in",
                  topic: "zigbee2mqtt/#",
                  sender: { topicLevel: 2 },
                  availability: "zigbee2mqtt",
                },
              ],
            },
          ],
        },
        connectors,
      );
      ghost = ghostUserId(
        { ghostPrefix: config.appservice.ghostPrefix, domain: SERVER_NAME },
        "mqtt",
        "home",
        "lamp",
      );
      bridge = await start({ config, registration, connectors });
      const port = (config.accounts[0]!.config as { embedded: { port: number } }).embedded.port;
      device = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, { clientId: "z2m", reconnectPeriod: 0 });
    });

    after(async () => {
      await device?.endAsync(true);
      await bridge?.stop();
      await synapse?.stop();
      await deleteKeys(prefix);
      rmSync(dataDir, { recursive: true, force: true });
    });

    test(
      "online, then offline: presence where Synapse keeps it (kept up), one status line edited, no failed job",
      { timeout: 120_000 },
      async () => {
        const presenceOf = async () =>
          asAlice("GET", `/_matrix/client/v3/presence/${encodeURIComponent(ghost)}/status`);
        await device.publishAsync("zigbee2mqtt/lamp/availability", "online", { qos: 1, retain: true });
        const line = await waitFor(
          "the status line",
          async () =>
            (await messages()).find((m) => m.sender === ghost && String(m.content.body).includes("online")),
          TIMEOUT_MS,
        );
        assert.equal(line.content.msgtype, "m.notice");
        if (presence) {
          const seen = await presenceOf();
          assert.equal(seen.status, 200);
          assert.equal(seen.body.presence, "online");
          // Synapse sets a user that neither syncs nor acts offline 30 s after its last activity
          // (measured: offline 35 s after a single PUT); tribridge sets it again every 20 s.
          await new Promise((r) => setTimeout(r, 40_000));
          assert.equal((await presenceOf()).body.presence, "online", "still online after 40 s");
        }

        await device.publishAsync("zigbee2mqtt/lamp/availability", '{"state":"offline"}', {
          qos: 1,
          retain: true,
        });
        const edit = await waitFor(
          "the line edited",
          async () =>
            (await messages()).find(
              (m) =>
                (m.content["m.relates_to"] as { rel_type?: string } | undefined)?.rel_type === "m.replace" &&
                String((m.content["m.new_content"] as { body?: string }).body).includes("offline"),
            ),
          TIMEOUT_MS,
        );
        assert.equal(edit.sender, ghost);
        if (presence) {
          const seen = await presenceOf();
          assert.equal(seen.body.presence, "offline");
        }
        const posted = (await messages()).filter((m) => m.sender === ghost && !m.content["m.relates_to"]);
        assert.equal(posted.length, 1, "one status line, not a message per change");
        assert.deepEqual(await bridge.failedJobs(), []);
      },
    );
  });
}
