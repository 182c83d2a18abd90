/** MSC2346 bridge information as the connectors describe their endpoints (src/matrix/bridge-info.ts). */
import { test } from "node:test";
import assert from "node:assert/strict";
import { connectors } from "../../bridges/index.js";
import { validateConfig } from "../../src/config/load.js";
import { bridgeStates } from "../../src/matrix/bridge-info.js";

const BOT = "@tribridge:example.org";

const config = validateConfig(
  {
    homeserver: { url: "http://127.0.0.1:8008", domain: "example.org" },
    bridges: {
      mqtt: { site: { url: "mqtts://bridge:s3cret@Broker.Example.org:8883" } },
      email: {
        ops: {
          address: "Bridge@Example.org",
          plusAddressing: true,
          imap: { host: "imap.example.org", user: "u", pass: "p" },
          smtp: { host: "smtp.example.org", user: "u", pass: "p" },
        },
      },
    },
    routes: [
      {
        id: "alerts",
        room: "#alerts:example.org",
        endpoints: [
          { account: "mqtt.site", direction: "in", topic: "Plant/+/alarm" },
          { account: "mqtt.site", direction: "in", topic: "Plant/+/alarm", id: "again", format: "json" },
          {
            account: "email.ops",
            direction: "out",
            to: ["Oncall@example.org", "boss@example.org"],
            subject: "Alerts",
          },
          { account: "email.ops", direction: "in", token: "alerts" },
        ],
      },
    ],
  },
  connectors,
);

test("one state per distinct channel, keyed tribridge://<protocol>/<network>/<channel> with / escaped", () => {
  const states = bridgeStates(config.routes[0]!, BOT, connectors, config.accounts);
  assert.deepEqual(
    states.map((s) => s.stateKey),
    [
      "tribridge://mqtt/broker.example.org:8883/Plant%2F+%2Falarm",
      "tribridge://email/bridge@example.org/boss@example.org,oncall@example.org",
      "tribridge://email/bridge@example.org/bridge+alerts@example.org",
    ],
  );
  const [mqtt, mail] = states;
  assert.deepEqual(mqtt!.content, {
    bridgebot: BOT,
    creator: BOT,
    protocol: { id: "mqtt", displayname: "MQTT" },
    network: { id: "broker.example.org:8883", displayname: "Broker.Example.org:8883" },
    channel: { id: "Plant/+/alarm", displayname: "Plant/+/alarm" },
  });
  assert.doesNotMatch(JSON.stringify(states), /s3cret/);
  assert.deepEqual(mail!.content.channel, {
    id: "boss@example.org,oncall@example.org",
    displayname: "Alerts (boss@example.org, oncall@example.org)",
  });
});

test("a connector without describeEndpoint: its account as the network, the endpoint id as the channel", () => {
  const bare = connectors.map((c) => ({ ...c, describeEndpoint: undefined, displayName: undefined }));
  const [first] = bridgeStates(config.routes[0]!, BOT, bare, config.accounts);
  const endpoint = config.routes[0]!.endpoints[0]!;
  assert.equal(first!.stateKey, `tribridge://mqtt/site/${endpoint.id}`);
  assert.deepEqual(first!.content.protocol, { id: "mqtt", displayname: "mqtt" });
});
