import { test } from "node:test";
import assert from "node:assert/strict";
import {
  checkMqttEndpoint,
  isLoopback,
  mqttAccountSchema,
  mqttEndpointSchema,
  MQTT_DEFAULTS,
  type MqttAccount,
} from "../../bridges/mqtt/schema.js";

const embedded: MqttAccount = mqttAccountSchema.parse({ embedded: {} });
const external: MqttAccount = mqttAccountSchema.parse({ url: "mqtt://broker:1883" });

const endpoint = (fields: Record<string, unknown>) => mqttEndpointSchema.parse(fields);

function issues(input: unknown): { path: PropertyKey[]; message: string }[] {
  const r = mqttAccountSchema.safeParse(input);
  return r.success ? [] : r.error.issues.map((i) => ({ path: i.path, message: i.message }));
}

// --- endpoint schema defaults ---------------------------------------------------------------------

test("endpoint defaults: qos 1, not retained, text, notice, keeps retained", () => {
  assert.deepEqual(endpoint({ topic: "a/b" }), {
    topic: "a/b",
    qos: 1,
    retain: false,
    clearRetainedOnRedact: false,
    format: "text",
    notice: true,
    ignoreRetained: false,
    answerRequests: false,
  });
});

test("endpoint schema rejects unknown keys and bad qos", () => {
  assert.equal(mqttEndpointSchema.safeParse({ topic: "a", topik: "b" }).success, false);
  assert.equal(mqttEndpointSchema.safeParse({ topic: "a", qos: 3 }).success, false);
  assert.equal(mqttEndpointSchema.safeParse({ topic: "a", sender: { topicLevel: 0 } }).success, false);
});

// --- checkMqttEndpoint ----------------------------------------------------------------------------

test("a valid in endpoint with wildcards has no problems", () => {
  assert.deepEqual(checkMqttEndpoint(endpoint({ topic: "home/+/temp/#" }), "in", embedded), []);
});

test("[MQTT-3.3.2-2] wildcards are not allowed for direction out", () => {
  assert.deepEqual(checkMqttEndpoint(endpoint({ topic: "home/+/set" }), "out", embedded), [
    ["topic", 'wildcards are not allowed for direction "out"'],
  ]);
});

test("[MQTT-3.3.2-2] wildcards are not allowed for direction inout", () => {
  assert.deepEqual(checkMqttEndpoint(endpoint({ topic: "home/#" }), "inout", external), [
    ["topic", 'wildcards are not allowed for direction "inout"'],
  ]);
});

test("clearRetainedOnRedact needs retain: true and a direction that publishes", () => {
  const clearing = { topic: "home/lamp/set", clearRetainedOnRedact: true };
  assert.deepEqual(checkMqttEndpoint(endpoint({ ...clearing, retain: true }), "out", embedded), []);
  assert.deepEqual(checkMqttEndpoint(endpoint(clearing), "inout", embedded), [
    ["clearRetainedOnRedact", "needs retain: true"],
  ]);
  assert.deepEqual(checkMqttEndpoint(endpoint({ ...clearing, retain: true }), "in", embedded), [
    ["clearRetainedOnRedact", 'only for direction "out" or "inout"'],
  ]);
});

test("[MQTT 5 §3.3.2.3.5] responseTopic: out or inout, external broker with protocolVersion 5, a topic name", () => {
  const v5 = mqttAccountSchema.parse({ url: "mqtt://broker:1883", protocolVersion: 5 });
  const v4 = mqttAccountSchema.parse({ url: "mqtt://broker:1883", protocolVersion: 4 });
  const asking = (responseTopic: string) => endpoint({ topic: "lab/pump/set", responseTopic });
  assert.deepEqual(checkMqttEndpoint(asking("lab/pump/response"), "out", v5), []);
  assert.deepEqual(checkMqttEndpoint(asking("lab/pump/response"), "inout", v5), []);
  assert.deepEqual(checkMqttEndpoint(endpoint({ topic: "lab/#", responseTopic: "lab/r" }), "in", v5), [
    ["responseTopic", 'only for direction "out" or "inout"'],
  ]);
  assert.deepEqual(checkMqttEndpoint(asking("lab/pump/response"), "out", v4), [
    ["responseTopic", "needs protocolVersion: 5 on the account (MQTT 3.1.1 has no response topics)"],
  ]);
  // aedes 1.x refuses protocol level 5 at CONNECT: the embedded broker is MQTT 3.1.1 only.
  assert.deepEqual(checkMqttEndpoint(asking("lab/pump/response"), "out", embedded), [
    [
      "responseTopic",
      "the embedded broker speaks MQTT 3.1.1, which has no response topics: use an external broker (url) with protocolVersion: 5",
    ],
  ]);
  // [MQTT-3.3.2-14]: the Response Topic is a topic name.
  assert.deepEqual(checkMqttEndpoint(asking("lab/+/response"), "out", v5), [
    ["responseTopic", "wildcards (+, #) are not allowed in a topic to publish to"],
  ]);
  assert.deepEqual(checkMqttEndpoint(asking(""), "out", v5), [["responseTopic", "must not be empty"]]);
  assert.deepEqual(checkMqttEndpoint(asking("lab/pump/set"), "inout", v5), [
    ["responseTopic", "must differ from topic: answers would be taken for commands"],
  ]);
});

test("answerRequests: out or inout, external broker with protocolVersion 5", () => {
  const v5 = mqttAccountSchema.parse({ url: "mqtt://broker:1883", protocolVersion: 5 });
  const v4 = mqttAccountSchema.parse({ url: "mqtt://broker:1883", protocolVersion: 4 });
  const answering = endpoint({ topic: "lab/notes", answerRequests: true });
  assert.deepEqual(checkMqttEndpoint(answering, "out", v5), []);
  assert.deepEqual(checkMqttEndpoint(answering, "in", v5), [
    ["answerRequests", 'only for direction "out" or "inout"'],
  ]);
  assert.deepEqual(checkMqttEndpoint(answering, "out", v4), [
    ["answerRequests", "needs protocolVersion: 5 on the account (MQTT 3.1.1 has no response topics)"],
  ]);
  assert.equal(checkMqttEndpoint(answering, "inout", embedded)[0]?.[0], "answerRequests");
});

test("concrete topics are fine for out and inout", () => {
  assert.deepEqual(checkMqttEndpoint(endpoint({ topic: "home/lamp/set" }), "out", external), []);
  assert.deepEqual(checkMqttEndpoint(endpoint({ topic: "home/lamp/set" }), "inout", embedded), []);
});

test("an invalid filter is reported once, whatever the direction", () => {
  for (const dir of ["in", "out", "inout"] as const) {
    assert.deepEqual(checkMqttEndpoint(endpoint({ topic: "a/#/b" }), dir, embedded), [
      ["topic", "'#' must be the whole last level of a filter"],
    ]);
  }
  assert.deepEqual(checkMqttEndpoint(endpoint({ topic: "" }), "in", embedded), [
    ["topic", "must not be empty"],
  ]);
});

test("a topic beyond the embedded broker's maxTopicBytes or maxTopicLevels is a problem (devices could not use it)", () => {
  const small = mqttAccountSchema.parse({ embedded: { maxTopicBytes: 8, maxTopicLevels: 2 } });
  assert.deepEqual(checkMqttEndpoint(endpoint({ topic: "a/b/c" }), "in", small), [
    ["topic", "topic of 3 levels exceeds maxTopicLevels 2"],
  ]);
  assert.deepEqual(checkMqttEndpoint(endpoint({ topic: "abcd/efgh" }), "out", small), [
    ["topic", "topic of 9 bytes exceeds maxTopicBytes 8"],
  ]);
  assert.deepEqual(checkMqttEndpoint(endpoint({ topic: "a/b/c" }), "in", external), []);
});

test("sender clientId needs an embedded broker", () => {
  assert.deepEqual(checkMqttEndpoint(endpoint({ topic: "a/b", sender: "clientId" }), "in", external), [
    ["sender", "clientId is only known with an embedded broker; use { topicLevel: N }"],
  ]);
  assert.deepEqual(checkMqttEndpoint(endpoint({ topic: "a/b", sender: "clientId" }), "in", embedded), []);
});

test("sender topicLevel beyond the topic's levels is a problem", () => {
  assert.deepEqual(
    checkMqttEndpoint(endpoint({ topic: "home/+", sender: { topicLevel: 3 } }), "in", external),
    [["sender.topicLevel", 'topic "home/+" has only 2 levels']],
  );
});

test("sender topicLevel within the levels, or under '#', is fine", () => {
  assert.deepEqual(
    checkMqttEndpoint(endpoint({ topic: "home/+", sender: { topicLevel: 2 } }), "in", external),
    [],
  );
  assert.deepEqual(
    checkMqttEndpoint(endpoint({ topic: "home/+", sender: { topicLevel: 1 } }), "in", external),
    [],
  );
  assert.deepEqual(
    checkMqttEndpoint(endpoint({ topic: "home/#", sender: { topicLevel: 5 } }), "in", external),
    [],
  );
});

test("sender name is fine everywhere", () => {
  assert.deepEqual(
    checkMqttEndpoint(endpoint({ topic: "a", sender: { name: "boiler" } }), "in", external),
    [],
  );
});

test("template needs format json", () => {
  assert.deepEqual(checkMqttEndpoint(endpoint({ topic: "a", template: "{{x}}" }), "in", embedded), [
    ["template", "needs format: json"],
  ]);
  assert.deepEqual(
    checkMqttEndpoint(endpoint({ topic: "a", template: "{{x}}", format: "binary" }), "in", embedded),
    [["template", "needs format: json"]],
  );
  assert.deepEqual(
    checkMqttEndpoint(endpoint({ topic: "a", template: "{{x}}", format: "json" }), "in", embedded),
    [],
  );
});

test("several problems are all reported", () => {
  const problems = checkMqttEndpoint(
    endpoint({ topic: "a/+", sender: "clientId", template: "{{x}}" }),
    "out",
    external,
  );
  assert.deepEqual(
    problems.map(([path]) => path),
    ["topic", "sender", "template"],
  );
});

// --- mqttAccountSchema ----------------------------------------------------------------------------

test("account: exactly one of embedded or url — neither", () => {
  assert.deepEqual(issues({}), [{ path: [], message: "set exactly one of embedded or url" }]);
});

test("account: exactly one of embedded or url — both", () => {
  assert.deepEqual(issues({ embedded: {}, url: "mqtt://x" }), [
    { path: [], message: "set exactly one of embedded or url" },
  ]);
});

test("account: url only is fine, with defaults", () => {
  const acc = mqttAccountSchema.parse({ url: "mqtts://broker.example.org:8883" });
  assert.equal(acc.embedded, undefined);
  assert.equal(acc.protocolVersion, 5);
  assert.equal(acc.cleanSession, false);
  assert.equal(acc.rejectUnauthorized, true);
  assert.equal(acc.keepaliveSec, MQTT_DEFAULTS.keepaliveSec);
});

test("account: url must have an MQTT scheme", () => {
  assert.equal(mqttAccountSchema.safeParse({ url: "http://broker" }).success, false);
  for (const url of ["mqtt://b", "mqtts://b", "ws://b/mqtt", "wss://b/mqtt", "tcp://b", "tls://b"]) {
    assert.equal(mqttAccountSchema.safeParse({ url }).success, true, url);
  }
});

test("account: loopback embedded broker with defaults is ok", () => {
  assert.deepEqual(issues({ embedded: {} }), []);
  assert.equal(embedded.embedded?.host, "127.0.0.1");
  assert.equal(embedded.embedded?.port, 1883);
  assert.deepEqual(embedded.embedded?.users, []);
  for (const host of ["localhost", "::1", "127.0.0.2"])
    assert.deepEqual(issues({ embedded: { host } }), [], host);
});

test("account: non-loopback embedded broker without users is an error", () => {
  assert.deepEqual(issues({ embedded: { host: "0.0.0.0" } }), [
    {
      path: ["embedded", "users"],
      message: "a broker listening on 0.0.0.0 needs users (or allowAnonymous: true)",
    },
  ]);
  assert.equal(issues({ embedded: { host: "::" } }).length, 1);
  assert.equal(issues({ embedded: { host: "192.168.1.10" } }).length, 1);
});

test("account: anonymous rules where anonymous clients cannot connect are an error", () => {
  const anonymous = { deny: { subscribe: ["test/nosubscribe"] } };
  assert.deepEqual(issues({ embedded: { users: [{ username: "u", password: "p" }], anonymous } }), [
    {
      path: ["embedded", "anonymous"],
      message: "anonymous clients cannot connect to this broker: set allowAnonymous: true, or remove this",
    },
  ]);
  assert.deepEqual(issues({ embedded: { anonymous } }), [], "a loopback broker without users");
  assert.deepEqual(issues({ embedded: { host: "0.0.0.0", allowAnonymous: true, anonymous } }), []);
});

test("account: non-loopback embedded broker with users, or explicit allowAnonymous, is ok", () => {
  assert.deepEqual(issues({ embedded: { host: "0.0.0.0", users: [{ username: "u", password: "p" }] } }), []);
  assert.deepEqual(issues({ embedded: { host: "0.0.0.0", allowAnonymous: true } }), []);
  assert.deepEqual(issues({ embedded: { host: "0.0.0.0", allowAnonymous: false } }), []);
});

test("account: embedded users default to publish/subscribe '#'", () => {
  const acc = mqttAccountSchema.parse({ embedded: { users: [{ username: "u", password: "p" }] } });
  assert.deepEqual(acc.embedded?.users[0], {
    username: "u",
    password: "p",
    publish: ["#"],
    subscribe: ["#"],
  });
});

test("account: user ACL filters must be valid topic filters", () => {
  assert.equal(
    mqttAccountSchema.safeParse({
      embedded: { users: [{ username: "u", password: "p", publish: ["a/#/b"] }] },
    }).success,
    false,
  );
});

test("account: unknown keys are refused", () => {
  assert.equal(mqttAccountSchema.safeParse({ url: "mqtt://b", clientID: "x" }).success, false);
  assert.equal(mqttAccountSchema.safeParse({ embedded: { hots: "0.0.0.0" } }).success, false);
});

test("isLoopback", () => {
  for (const h of ["localhost", "::1", "127.0.0.1", "127.1.2.3"]) assert.equal(isLoopback(h), true, h);
  for (const h of ["0.0.0.0", "::", "10.0.0.1", "example.org", "127.attacker.example"])
    assert.equal(isLoopback(h), false, h);
});
