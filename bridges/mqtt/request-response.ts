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
 */
import { createHash } from "node:crypto";
import type { EndpointBinding, KeyValueStore } from "../../src/connector.js";
import { MQTT_DEFAULTS, type MqttEndpoint } from "./schema.js";

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
