import type { SampleConfig } from "../../src/connector.js";

/**
 * The MQTT part of config/config.sample.yaml: a loopback broker, so the sample runs as copied;
 * the schema's descriptions (shown as comments) say how to open it to devices on other machines.
 */
export const mqttSampleConfig: SampleConfig = {
  accounts: { home: { embedded: {} } },
  route: {
    id: "greenhouse",
    endpoints: [
      {
        account: "mqtt.home",
        direction: "in",
        topic: "greenhouse/+/temperature",
        format: "json",
        template: "{{value}} °C",
        sender: { topicLevel: 2 },
        live: true,
      },
      { account: "mqtt.home", direction: "out", id: "commands", topic: "greenhouse/commands", qos: 1 },
      // Each sensor's `online` / `offline`: its ghost's presence and one status line, not messages.
      {
        account: "mqtt.home",
        direction: "in",
        topic: "greenhouse/+/availability",
        sender: { topicLevel: 2 },
        availability: "homeassistant",
      },
    ],
  },
};
