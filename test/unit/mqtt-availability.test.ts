import { test } from "node:test";
import assert from "node:assert/strict";
import { deviceTopicOf, ownAvailabilityOf, readAvailability } from "../../bridges/mqtt/availability.js";
import { checkMqttEndpoint, mqttAccountSchema, mqttEndpointSchema } from "../../bridges/mqtt/schema.js";
import { statusLine } from "../../src/matrix/availability.js";

const read = (convention: Parameters<typeof readAvailability>[0], topic: string, payload: string) =>
  readAvailability(convention, topic, Buffer.from(payload));

test("Tasmota: tele/<device>/LWT with its will's Online / Offline", () => {
  assert.deepEqual(read("tasmota", "tele/plug/LWT", "Online"), { deviceTopic: "tele/plug", state: "online" });
  assert.deepEqual(read("tasmota", "tele/plug/LWT", "Offline"), {
    deviceTopic: "tele/plug",
    state: "offline",
  });
  assert.equal(read("tasmota", "tele/plug/SENSOR", '{"Temperature":22}'), undefined, "not an LWT topic");
  assert.equal(read("tasmota", "LWT", "Online"), undefined, "no device level before it");
  assert.deepEqual(read("tasmota", "tele/plug/LWT", "Restarting"), {
    deviceTopic: "tele/plug",
    problem: 'not an availability payload: "Restarting"',
  });
});

test("Zigbee2MQTT: <base>/<device>/availability, plain or JSON", () => {
  const lamp = { deviceTopic: "zigbee2mqtt/lamp" };
  assert.deepEqual(read("zigbee2mqtt", "zigbee2mqtt/lamp/availability", "online"), {
    ...lamp,
    state: "online",
  });
  assert.deepEqual(read("zigbee2mqtt", "zigbee2mqtt/lamp/availability", '{"state":"offline"}'), {
    ...lamp,
    state: "offline",
  });
  // A friendly name with a slash: the device is everything before the last level.
  assert.deepEqual(read("zigbee2mqtt", "zigbee2mqtt/living/lamp/availability", " online\n"), {
    deviceTopic: "zigbee2mqtt/living/lamp",
    state: "online",
  });
  assert.equal(read("zigbee2mqtt", "zigbee2mqtt/lamp", '{"state":"ON"}'), undefined);
  assert.ok("problem" in read("zigbee2mqtt", "zigbee2mqtt/lamp/availability", '{"state":1}')!);
});

test("Home Assistant: …/availability or …/status with online / offline; your own payloads", () => {
  assert.deepEqual(read("homeassistant", "esphome-node/status", "online"), {
    deviceTopic: "esphome-node",
    state: "online",
  });
  assert.equal(deviceTopicOf("homeassistant", "esphome-node/sensor/t/state"), undefined);
  const own = { lastLevel: "alive", online: "1", offline: "0" };
  assert.deepEqual(read(own, "house/pump/alive", "0"), { deviceTopic: "house/pump", state: "offline" });
  // No lastLevel: every topic of the endpoint is an availability topic, the topic itself the device's.
  assert.deepEqual(read({ online: "up", offline: "down" }, "pumps/p1", "UP"), {
    deviceTopic: "pumps/p1",
    state: "online",
  });
});

test("endpoint schema: availability is a known convention or { lastLevel?, online, offline }, only inbound", () => {
  assert.equal(mqttEndpointSchema.safeParse({ topic: "a/#", availability: "zwave" }).success, false);
  assert.equal(
    mqttEndpointSchema.safeParse({
      topic: "a/#",
      availability: { lastLevel: "a/b", online: "1", offline: "0" },
    }).success,
    false,
  );
  const external = mqttAccountSchema.parse({ url: "mqtt://broker:1883" });
  const ep = mqttEndpointSchema.parse({ topic: "tele/plug/cmd", availability: "tasmota" });
  assert.deepEqual(checkMqttEndpoint(ep, "out", external), [
    ["availability", 'only for direction "in" or "inout"'],
  ]);
  assert.deepEqual(checkMqttEndpoint(ep, "in", external), []);
});

test("tribridge's own availability topic: external brokers only, a topic name, or false", () => {
  const parsed = mqttAccountSchema.safeParse({ embedded: {}, availabilityTopic: "x/availability" });
  assert.equal(parsed.success, false);
  assert.deepEqual(
    parsed.error?.issues.map((i) => i.path),
    [["availabilityTopic"]],
  );
  assert.equal(mqttAccountSchema.safeParse({ url: "mqtt://b", availabilityTopic: "x/+/y" }).success, false);
  assert.equal(mqttAccountSchema.safeParse({ url: "mqtt://b", availabilityTopic: false }).success, true);
  assert.deepEqual(ownAvailabilityOf(undefined, "plant", "0123456789abcdef"), {
    topic: "tribridge/0123456789abcdef/plant/availability",
    online: "online",
    offline: "offline",
  });
  assert.equal(ownAvailabilityOf(false, "plant", "0123456789abcdef"), undefined);
});

test("the status line says the state, since when (UTC) and the far side's words", () => {
  const at = Date.UTC(2026, 11, 2, 11, 40, 30);
  assert.equal(statusLine({ state: "online", at }), "🟢 online since 2026-12-02 11:40 UTC");
  assert.equal(
    statusLine({ state: "offline", at, statusMessage: "battery" }),
    "🔴 offline since 2026-12-02 11:40 UTC — battery",
  );
});
