/** The MQTT connector passes the conformance suite: with its embedded broker, and on an external one. */
import mqtt, { type MqttClient } from "mqtt";
import { randomUUID } from "node:crypto";
import type { MqttConnector } from "../../bridges/mqtt/connector.js";
import { mqttConnector } from "../../bridges/mqtt/index.js";
import { hasMosquitto, startMosquitto, type Broker } from "../helpers/brokers.js";
import { connectorConformance, type FarSide } from "./connector-conformance.js";

const topicOf = (channel: string) => `conf/${channel}`;

/** Devices on a broker: a persistent session (clean: false), so a publish not acknowledged is sent again. */
async function devicesOn(port: number): Promise<FarSide> {
  const heard = new Map<string, string[]>();
  const client: MqttClient = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
    clientId: `conformance-${randomUUID().slice(0, 8)}`,
    clean: false,
    reconnectPeriod: 100,
  });
  client.on("message", (topic, payload) => heard.get(topic)?.push(payload.toString("utf8")));
  return {
    say: async (channel, text) => void (await client.publishAsync(topicOf(channel), text, { qos: 1 })),
    listen: async (channel) => {
      heard.set(topicOf(channel), []);
      await client.subscribeAsync(topicOf(channel), { qos: 1 });
    },
    heard: (channel) => heard.get(topicOf(channel)) ?? [],
    close: () => client.endAsync(true),
  };
}

const endpoint = (channel: string) => ({ topic: topicOf(channel), qos: 1 });

connectorConformance({
  title: "mqtt, embedded broker",
  definition: mqttConnector,
  sourceDir: "bridges/mqtt",
  setUp: async () => ({
    account: { embedded: { port: 0, maxPayloadBytes: 4096 } },
    tearDown: async () => {},
  }),
  farSide: (connector) => devicesOn((connector as MqttConnector).ports!.tcp),
  endpoint,
  refusedForGood: { body: { text: "x".repeat(5000) } },
});

// Needs a broker it can take away and bring back on the same port: Mosquitto (.ci/run installs it).
let broker: Broker;
if (hasMosquitto)
  connectorConformance({
    title: "mqtt, external broker",
    definition: mqttConnector,
    sourceDir: "bridges/mqtt",
    setUp: async () => {
      broker = (await startMosquitto())!;
      return {
        account: { url: `mqtt://127.0.0.1:${broker.port}`, reconnectPeriodMs: 100 },
        tearDown: () => broker.stop(),
      };
    },
    farSide: () => devicesOn(broker.port),
    acknowledgesItself: false,
    endpoint,
    outage: {
      begin: () => broker.stop(),
      end: async () => void (broker = (await startMosquitto(broker.port))!),
    },
  });
