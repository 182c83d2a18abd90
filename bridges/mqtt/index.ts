import { checkMqttAccount } from "./check.js";
import type { BridgedPlace, ConnectorDefinition } from "../../src/connector.js";
import { MqttConnector } from "./connector.js";
import { mqttSampleConfig } from "./sample-config.js";
import {
  MQTT_DEFAULTS,
  checkMqttEndpoint,
  mqttAccountSchema,
  mqttEndpointSchema,
  type MqttAccount,
  type MqttEndpoint,
} from "./schema.js";

export const mqttConnector: ConnectorDefinition<MqttAccount, MqttEndpoint> = {
  name: "mqtt",
  displayName: "MQTT",
  ghostTag: "mqtt",
  description: "MQTT accounts: an embedded broker, or a connection to an external one",
  // No conversations (an MQTT 5 answer replies to its command through replyTo, whatever this says); no edits (a device would run an edited command again); redactions clear a retained
  // value where an endpoint says so (clearRetainedOnRedact).
  capabilities: {
    html: false,
    attachments: true,
    maxAttachments: 1, // a payload is one file
    maxTextBytes: MQTT_DEFAULTS.maxPayloadBytes,
    threads: false,
    edits: false,
    redactions: true,
  },
  accountSchema: mqttAccountSchema,
  endpointSchema: mqttEndpointSchema,
  // No bridges.mqtt block at all: an embedded broker on the standard port, loopback only.
  defaultAccounts: { default: mqttAccountSchema.parse({ embedded: {} }) },
  sample: mqttSampleConfig,
  checkEndpoint: checkMqttEndpoint,
  // `!tribridge link mqtt.<account> <topic> …`: a topic filter (in) or topic (out).
  link: { target: "topic", fields: (topic) => ({ topic }) },
  // An MQTT endpoint *is* its topic (filter): where messages go to or come from. The other fields
  // say how, and changing how must not strand what is queued for it: qos and retain are how hard
  // the broker tries and what it keeps (commands raised to QoS 2 still mean the same topic);
  // format, template and notice how a payload looks; sender which ghost speaks; ignoreRetained
  // which replays to skip; availability which of its topics are states rather than messages. Two endpoints of one route and direction on one topic that differ only
  // in those are refused: give one an explicit `id`.
  endpointKey: (endpoint) => endpoint.topic,
  check: checkMqttAccount,
  describeEndpoint: (endpoint, account) => ({
    network: brokerOf(account.name, account.config),
    channel: { id: endpoint.topic },
  }),
  create: (account, config, ctx) => new MqttConnector(account, config, ctx),
};

/**
 * The broker, as a room's members may read it: an external one by its host and port (never the
 * URL's user or password), an embedded one by its account's name.
 */
function brokerOf(account: string, config: MqttAccount): BridgedPlace {
  if (config.url === undefined) return { id: account, displayName: `embedded broker ${account}` };
  const url = new URL(config.url);
  return { id: url.host.toLowerCase(), displayName: url.host };
}
