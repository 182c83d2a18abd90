/**
 * MQTT 5 request/response (§4.10) for endpoints with a `responseTopic`: a room message published
 * there carries the response topic and correlation data, and a device's answer — a PUBLISH on the
 * response topic with the same correlation data — is posted as a threaded reply to the command.
 *
 * The correlation data is a digest of the outbound message's id: stable, so a re-sent command
 * carries the same, and short. What it stands for (the endpoint and the command's remote id) is
 * kept in the store for `MQTT_DEFAULTS.responseMemoryMs`; several answers to one command are all
 * posted. Correlation data is the device's to echo, so it is hostile input: anything longer than
 * ours is unknown without being hashed or looked up.
 *
 * The other way, on endpoints with `answerRequests`: a device's publish that carries a response
 * topic (and correlation data) is a request; a room reply to it is published to that response
 * topic with that correlation data, once per room message, instead of to the endpoint's topic.
 * The request's response topic and correlation data are kept for `MQTT_DEFAULTS.requestMemoryMs`,
 * under its remote id; correlation data over `MAX_REQUEST_CORRELATION_BYTES` is not kept.
 */
import { createHash } from "node:crypto";
import type { EndpointBinding, KeyValueStore, OutboundMessage } from "../../src/connector.js";
import type { Logger } from "../../src/log.js";
import type { Publish } from "./publish.js";
import { MQTT_DEFAULTS, type MqttEndpoint } from "./schema.js";
import { topicNameProblem } from "./topic.js";

/** Bytes of correlation data tribridge sends: 128 bits of a digest, never confused by chance. */
const CORRELATION_BYTES = 16;

/** What a command's correlation data stands for. */
export interface Command {
  endpointId: string;
  /** The command's `SendResult.remoteId`: the answer replies to it. */
  remoteId: string;
}

/** The MQTT 5 properties of a command sent to an endpoint with a response topic. */
export interface ResponseProperties {
  responseTopic: string;
  correlationData: Buffer;
}

/** Where a device asked for its answer: its response topic and correlation data, if it gave any. */
export interface Request {
  responseTopic: string;
  correlationData?: Buffer;
}

/**
 * Most correlation data of a device's request that is kept (MQTT allows 65,535 bytes): enough for
 * any id, and a request whose answer a room can send cannot make tribridge hold 64 KiB for a day.
 */
export const MAX_REQUEST_CORRELATION_BYTES = 1024;

export function correlationOf(messageId: string): Buffer {
  return createHash("sha256").update(messageId).digest().subarray(0, CORRELATION_BYTES);
}

function commandKey(correlation: Buffer): string {
  return `command:${correlation.toString("hex")}`;
}

/**
 * Remembers the command (before it is published, so that a quick answer finds it) and returns the
 * properties to publish it with; undefined for an endpoint without a response topic.
 */
export async function prepareCommand(
  store: KeyValueStore,
  endpoint: EndpointBinding<MqttEndpoint>,
  messageId: string,
): Promise<ResponseProperties | undefined> {
  const { responseTopic } = endpoint.spec;
  if (responseTopic === undefined) return undefined;
  const correlationData = correlationOf(messageId);
  const command: Command = { endpointId: endpoint.id, remoteId: messageId };
  await store.set(commandKey(correlationData), JSON.stringify(command), MQTT_DEFAULTS.responseMemoryMs);
  return { responseTopic, correlationData };
}

/** The command an answer's correlation data names, if tribridge sent it (and not too long ago). */
export async function commandAnswered(
  store: KeyValueStore,
  correlationData: Buffer | undefined,
): Promise<Command | undefined> {
  if (correlationData?.byteLength !== CORRELATION_BYTES) return undefined;
  const saved = await store.get(commandKey(correlationData));
  return saved === undefined ? undefined : (JSON.parse(saved) as Command);
}

/** Why an answer on a response topic is not a reply to a command: for the log and the failed list. */
export function unknownAnswerReason(topic: string, correlationData: Buffer | undefined): string {
  if (correlationData === undefined) return `answer on response topic ${topic} without correlation data`;
  const shown =
    correlationData.byteLength <= CORRELATION_BYTES * 2
      ? correlationData.toString("hex")
      : `${correlationData.byteLength} bytes`;
  return `answer on response topic ${topic} with unknown correlation data (${shown}): no command of ours, or too long ago`;
}

function requestKey(remoteId: string): string {
  return `request:${remoteId}`;
}

/**
 * Keeps where the device that sent publish `p` (relayed as `remoteId`) wants its answer, when it
 * says so and a room can answer there: a topic name that is no `$` topic, correlation data within
 * bounds. Anything else is logged, and a room reply to it goes to the endpoint's own topic.
 */
export async function rememberRequest(
  store: KeyValueStore,
  log: Logger,
  remoteId: string,
  p: Publish,
): Promise<void> {
  const { responseTopic, correlationData } = p;
  if (responseTopic === undefined) return;
  // [MQTT-3.3.2-14]: a topic name; tribridge answers no $ topic (broker-owned, e.g. $SYS).
  const problem =
    topicNameProblem(responseTopic) ?? (responseTopic.startsWith("$") ? "a $ topic" : undefined);
  const tooLong = (correlationData?.byteLength ?? 0) > MAX_REQUEST_CORRELATION_BYTES;
  if (problem || tooLong) {
    const why = problem
      ? `response topic ${problem}`
      : `correlation data of ${correlationData?.byteLength} bytes (at most ${MAX_REQUEST_CORRELATION_BYTES})`;
    log.warn({ topic: p.topic, remoteId }, `request not answerable from the room: ${why}`);
    return;
  }
  const saved = {
    responseTopic,
    ...(correlationData !== undefined && { correlationData: correlationData.toString("base64") }),
  };
  await store.set(requestKey(remoteId), JSON.stringify(saved), MQTT_DEFAULTS.requestMemoryMs);
}

/** The request `message` answers, when it answers one and `endpoint` answers requests. */
export async function requestAnswered(
  store: KeyValueStore,
  endpoint: EndpointBinding<MqttEndpoint>,
  message: OutboundMessage,
): Promise<Request | undefined> {
  if (!endpoint.spec.answerRequests || message.replyTo === undefined) return undefined;
  const saved = await store.get(requestKey(message.replyTo));
  if (saved === undefined) return undefined;
  const { responseTopic, correlationData } = JSON.parse(saved) as {
    responseTopic: string;
    correlationData?: string;
  };
  return {
    responseTopic,
    ...(correlationData !== undefined && { correlationData: Buffer.from(correlationData, "base64") }),
  };
}

/**
 * The store key that says a room message's answer was published. The core sends one room message
 * to each `out` endpoint of the route, with an id of its own each; the answer must go once. The
 * message is told by what all its copies share: what it answers, who sent it when, and its text.
 */
export function answerKey(message: OutboundMessage): string {
  const digest = createHash("sha256")
    .update(JSON.stringify([message.replyTo, message.sender.userId, message.timestamp, message.body.text]))
    .digest("base64url");
  return `answered:${digest}`;
}
