import { isIPv4 } from "node:net";
import { z } from "zod";
import { availabilityEndpointField, ownAvailabilityField } from "./availability.js";
import { hasWildcard, topicFilterProblem, topicNameProblem } from "./topic.js";
import { topicLimitProblem } from "./topic-limits.js";
import type { Direction } from "../../src/connector.js";

/** Defaults of the MQTT connector, with units. */
export const MQTT_DEFAULTS = {
  embeddedHost: "127.0.0.1", // loopback unless you say otherwise: no open broker by accident
  embeddedPort: 1883,
  maxPayloadBytes: 256 * 1024, // larger publishes are acknowledged and dropped (embedded broker)
  maxTopicBytes: 1024, // longer topics and filters are refused (embedded broker); MQTT allows 65,535
  maxTopicLevels: 32, // deeper topics and filters are refused (embedded broker); at most 100
  keepaliveSec: 30,
  reconnectPeriodMs: 2_000,
  connectTimeoutMs: 10_000,
  dedupeWindowMs: 10 * 60_000, // how long a QoS>0 message id is remembered to drop redeliveries
  retainedMemoryMs: 30 * 24 * 3600_000, // which message set a topic's retained value (clearRetainedOnRedact)
  responseMemoryMs: 7 * 24 * 3600_000, // how long a command sent with a responseTopic can be answered
  requestMemoryMs: 24 * 3600_000, // how long a device's request can be answered from the room (answerRequests)
  // What one client may cost the embedded broker:
  maxFiltersPerSubscribe: 1000, // more in one SUBSCRIBE are refused (SUBACK 0x80)
  maxConnectBytes: 16 * 1024, // a larger CONNECT closes the connection as its header arrives
  maxPendingConnections: 100, // connections between accepted and CONNACK; more are closed at once
} as const;

const filterList = z.array(
  z.string().refine((f) => !topicFilterProblem(f), { error: "not a valid topic filter" }),
);

/** What a user, or an anonymous client, may publish to and subscribe to (see acl.ts). */
const aclFields = {
  publish: filterList
    .default(["#"])
    .describe("Topic filters it may publish to ('#' does not cover $-topics: name them)"),
  subscribe: filterList.default(["#"]).describe("Topic filters it may subscribe to, and receive messages on"),
  deny: z
    .strictObject({
      publish: filterList.default([]).describe("Topics it may not publish to, though `publish` covers them"),
      subscribe: filterList
        .default([])
        .describe(
          "Topics it may not subscribe to or receive, though `subscribe` covers them: a subscription inside them gets SUBACK 0x80, a wider one does not deliver them",
        ),
    })
    .optional()
    .describe("Refused where the allow lists allow: deny wins"),
};

export const aclRulesSchema = z.strictObject(aclFields);

export const embeddedUserSchema = z.strictObject({
  username: z.string().min(1),
  password: z.string().min(1).describe("Or passwordFile: a file holding it"),
  clientIds: z
    .array(z.string().min(1))
    .optional()
    .describe("Client ids this user may connect with (default: any)"),
  ...aclFields,
});

/** What one client may cost the embedded broker. */
const brokerLimits = {
  maxFiltersPerSubscribe: z
    .number()
    .int()
    .min(1)
    .max(65_535)
    .default(MQTT_DEFAULTS.maxFiltersPerSubscribe)
    .describe("Topic filters one SUBSCRIBE may carry; those past it are refused (SUBACK 0x80)"),
  maxConnectBytes: z
    .number()
    .int()
    .min(1024)
    .max(268_435_455)
    .default(MQTT_DEFAULTS.maxConnectBytes)
    .describe("Largest CONNECT (credentials, will); a larger one closes the connection before it is read"),
  maxPendingConnections: z
    .number()
    .int()
    .min(1)
    .default(MQTT_DEFAULTS.maxPendingConnections)
    .describe(
      "Connections that may be authenticating at once (before CONNACK); more are closed as they come",
    ),
};

export const embeddedBrokerSchema = z.strictObject({
  host: z
    .string()
    .default(MQTT_DEFAULTS.embeddedHost)
    .describe(
      "Address to listen on: 127.0.0.1 for this machine only; 0.0.0.0 for devices elsewhere (with users)",
    ),
  port: z.number().int().min(0).max(65535).default(MQTT_DEFAULTS.embeddedPort),
  websocketPort: z
    .number()
    .int()
    .min(0)
    .max(65535)
    .optional()
    .describe("Also serve MQTT over WebSocket here"),
  tls: z
    .strictObject({
      port: z.number().int().min(0).max(65535).default(8883),
      cert: z.string().describe("PEM; or certFile"),
      key: z.string().describe("PEM; or keyFile"),
    })
    .optional(),
  allowAnonymous: z
    .boolean()
    .optional()
    .describe("Default: true only when listening on loopback with no users"),
  users: z
    .array(embeddedUserSchema)
    .default([])
    .describe(
      "Who may connect, e.g. [{ username: sensor-1, passwordFile: /run/secrets/sensor-1, " +
        "publish: [greenhouse/#], subscribe: [greenhouse/commands], deny: { publish: [greenhouse/commands] } }]; " +
        "required unless host is loopback",
    ),
  anonymous: aclRulesSchema
    .optional()
    .describe(
      "What anonymous clients may publish and subscribe to, as for a user (default: every topic but $-topics)",
    ),
  maxPayloadBytes: z.number().int().min(1).max(268_435_455).default(MQTT_DEFAULTS.maxPayloadBytes),
  maxTopicBytes: z
    .number()
    .int()
    .min(1)
    .max(65_535)
    .default(MQTT_DEFAULTS.maxTopicBytes)
    .describe(
      "A longer topic is refused: a publish acknowledged and dropped, a subscription SUBACK 0x80, a will at CONNECT",
    ),
  maxTopicLevels: z
    .number()
    .int()
    .min(1)
    // aedes' topic routing (qlobber) cannot match deeper topics; it closes the connection of a client that uses one
    .max(100)
    .default(MQTT_DEFAULTS.maxTopicLevels)
    .describe("A topic with more levels (a/b/c has 3) is refused like a longer one; at most 100"),
  ...brokerLimits,
});

export const mqttAccountSchema = z
  .strictObject({
    embedded: embeddedBrokerSchema
      .optional()
      .describe("Run a broker inside tribridge (devices connect here)"),
    url: z
      .string()
      .regex(/^(mqtts?|wss?|tcp|tls):\/\/.+/, "must be mqtt://, mqtts://, ws:// or wss://")
      .optional()
      .describe("External broker URL, instead of embedded"),
    protocolVersion: z
      .union([z.literal(4), z.literal(5)])
      .default(5)
      .describe("4 = MQTT 3.1.1, 5 = MQTT 5"),
    clientId: z
      .string()
      .min(1)
      .max(65535)
      .optional()
      .describe("Default tribridge-<account> (with shareGroup: tribridge-<account>-<instance id>)"),
    shareGroup: z
      .string()
      .regex(/^[^/+#]+$/, "no /, + or # (MQTT-4.8.2-2)")
      .optional()
      .describe(
        "Several tribridge instances on one broker: subscribe as this shared-subscription group " +
          "($share/<group>/<filter>), so each message reaches one instance, not every one",
      ),
    username: z.string().optional(),
    password: z.string().optional().describe("Or passwordFile"),
    ca: z.string().optional().describe("PEM CA bundle for mqtts/wss; or caFile"),
    cert: z.string().optional().describe("PEM client certificate; or certFile"),
    key: z.string().optional().describe("PEM client key; or keyFile"),
    rejectUnauthorized: z.boolean().default(true),
    keepaliveSec: z.number().int().min(0).max(65535).default(MQTT_DEFAULTS.keepaliveSec),
    reconnectPeriodMs: z.number().int().min(100).default(MQTT_DEFAULTS.reconnectPeriodMs),
    connectTimeoutMs: z.number().int().min(100).default(MQTT_DEFAULTS.connectTimeoutMs),
    cleanSession: z
      .boolean()
      .default(false)
      .describe("false keeps a broker session, so QoS>0 messages sent while tribridge is down are kept"),
    availabilityTopic: ownAvailabilityField,
  })
  .superRefine((acc, ctx) => {
    if ((acc.embedded === undefined) === (acc.url === undefined)) {
      ctx.addIssue({ code: "custom", path: [], message: "set exactly one of embedded or url" });
    }
    if (acc.embedded && acc.availabilityTopic !== undefined) {
      ctx.addIssue({
        code: "custom",
        path: ["availabilityTopic"],
        message: "only for an external broker (url): the embedded broker is tribridge itself",
      });
    }
    const e = acc.embedded;
    if (e && e.users.length === 0 && e.allowAnonymous === undefined && !isLoopback(e.host)) {
      ctx.addIssue({
        code: "custom",
        path: ["embedded", "users"],
        message: `a broker listening on ${e.host} needs users (or allowAnonymous: true)`,
      });
    }
    if (e?.anonymous && !anonymousAllowed(e)) {
      ctx.addIssue({
        code: "custom",
        path: ["embedded", "anonymous"],
        message: "anonymous clients cannot connect to this broker: set allowAnonymous: true, or remove this",
      });
    }
  });

export type MqttAccount = z.output<typeof mqttAccountSchema>;
export type EmbeddedBrokerConfig = z.output<typeof embeddedBrokerSchema>;

/** Whether clients without a user name may connect: allowAnonymous, or a loopback broker without users. */
export function anonymousAllowed(
  e: Pick<EmbeddedBrokerConfig, "allowAnonymous" | "users" | "host">,
): boolean {
  return e.allowAnonymous ?? (e.users.length === 0 && isLoopback(e.host));
}

export function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || (isIPv4(host) && host.startsWith("127."));
}

export const payloadFormats = ["text", "json", "binary"] as const;

export const mqttEndpointSchema = z.strictObject({
  topic: z.string().describe("Topic filter (+, # allowed) for in; a concrete topic for out"),
  qos: z.union([z.literal(0), z.literal(1), z.literal(2)]).default(1),
  retain: z.boolean().default(false).describe("out: publish retained"),
  clearRetainedOnRedact: z
    .boolean()
    .default(false)
    .describe(
      "out, with retain: redacting the room message that set the retained value clears it " +
        "(an empty retained publish), unless a newer value has been retained since",
    ),
  format: z
    .enum(payloadFormats)
    .default("text")
    .describe("text, json (rendered readably; out: a JSON object), binary (as a file)"),
  template: z
    .string()
    .optional()
    .describe('json in: how to render, e.g. "{{temperature}} °C"; fields by dotted path'),
  sender: z
    .union([
      z.literal("clientId"),
      z.strictObject({ topicLevel: z.number().int().min(1).max(100) }),
      z.strictObject({ name: z.string().min(1) }),
    ])
    .optional()
    .describe("in: whose ghost speaks: clientId (embedded only), a topic level (1-based), or a fixed name"),
  notice: z.boolean().default(true).describe("in: post as m.notice (machine messages) rather than m.text"),
  ignoreRetained: z
    .boolean()
    .default(false)
    .describe("in: skip retained messages replayed on subscribe (availability reports are still read)"),
  availability: availabilityEndpointField,
  responseTopic: z
    .string()
    .optional()
    .describe(
      "out: MQTT 5 request/response (external broker with protocolVersion 5; the embedded broker " +
        "speaks 3.1.1 only): publish with this response topic and correlation data, and post a " +
        "device's answer (a publish there with the same correlation data) as a threaded reply to " +
        "the room message, e.g. greenhouse/commands/response",
    ),
  answerRequests: z
    .boolean()
    .default(false)
    .describe(
      "out: MQTT 5 request/response the other way (external broker with protocolVersion 5): a room " +
        "reply to a device's message that carried a response topic is published to that topic, " +
        "with its correlation data, instead of to this topic. The device picks the topic: limit " +
        "what tribridge's broker user may publish to",
    ),
});

export type MqttEndpoint = z.output<typeof mqttEndpointSchema>;

export function checkMqttEndpoint(
  ep: MqttEndpoint,
  direction: Direction,
  account: MqttAccount,
): [string, string][] {
  const problems: [string, string][] = [];
  const filterProblem =
    topicFilterProblem(ep.topic) ??
    // devices could never publish or subscribe to it: the broker refuses them such topics
    (account.embedded && topicLimitProblem(ep.topic, account.embedded));
  if (filterProblem) problems.push(["topic", filterProblem]);
  else if (direction !== "in") {
    if (hasWildcard(ep.topic))
      problems.push(["topic", `wildcards are not allowed for direction "${direction}"`]);
    else {
      const nameProblem = topicNameProblem(ep.topic);
      if (nameProblem) problems.push(["topic", nameProblem]);
    }
  }
  if (ep.sender === "clientId" && !account.embedded) {
    problems.push(["sender", "clientId is only known with an embedded broker; use { topicLevel: N }"]);
  }
  if (typeof ep.sender === "object" && "topicLevel" in ep.sender) {
    const levels = ep.topic.split("/");
    const at = levels[ep.sender.topicLevel - 1];
    if (!levels.includes("#") && at === undefined) {
      problems.push(["sender.topicLevel", `topic "${ep.topic}" has only ${levels.length} levels`]);
    }
  }
  if (ep.availability !== undefined && direction === "out")
    problems.push(["availability", 'only for direction "in" or "inout"']);
  if (ep.template !== undefined && ep.format !== "json") problems.push(["template", "needs format: json"]);
  if (ep.clearRetainedOnRedact && !ep.retain) problems.push(["clearRetainedOnRedact", "needs retain: true"]);
  if (ep.clearRetainedOnRedact && direction === "in")
    problems.push(["clearRetainedOnRedact", 'only for direction "out" or "inout"']);
  problems.push(...responseTopicProblems(ep, direction, account));
  if (ep.answerRequests) problems.push(...mqtt5Problems("answerRequests", direction, account));
  return problems;
}

/** Why `key`, an MQTT 5 request/response option, cannot work on this endpoint, if it cannot. */
function mqtt5Problems(key: string, direction: Direction, account: MqttAccount): [string, string][] {
  if (direction === "in") return [[key, 'only for direction "out" or "inout"']];
  if (account.embedded)
    return [
      [
        key,
        "the embedded broker speaks MQTT 3.1.1, which has no response topics: use an external broker (url) with protocolVersion: 5",
      ],
    ];
  if (account.protocolVersion !== 5)
    return [[key, "needs protocolVersion: 5 on the account (MQTT 3.1.1 has no response topics)"]];
  return [];
}

/** A response topic is MQTT 5 (§3.3.2.3.5), a topic name, and for what tribridge publishes. */
function responseTopicProblems(
  ep: MqttEndpoint,
  direction: Direction,
  account: MqttAccount,
): [string, string][] {
  const topic = ep.responseTopic;
  if (topic === undefined) return [];
  const unsupported = mqtt5Problems("responseTopic", direction, account);
  if (unsupported.length > 0) return unsupported;
  // [MQTT-3.3.2-14]: a Response Topic is a topic name, without wildcards.
  const problem = topicNameProblem(topic);
  if (problem) return [["responseTopic", problem]];
  if (topic === ep.topic)
    return [["responseTopic", "must differ from topic: answers would be taken for commands"]];
  return [];
}
