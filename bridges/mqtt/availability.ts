/**
 * Device availability over MQTT: the topics on which devices (or their brokers, through a will)
 * say whether they are reachable, read into ConnectorContext.availability reports; and tribridge's
 * own availability on an external broker (a birth message, and a will for when it is gone).
 *
 * Conventions, by the topic's last level and its payload (compared without case and surrounding
 * white space; a JSON object's `state` field is read as the payload, as Zigbee2MQTT sends with
 * `advanced.legacy_availability_payload: false`):
 * - zigbee2mqtt: `<base>/<device>/availability`, `online` / `offline`, or `{"state":"online"}`;
 * - tasmota: `tele/<device>/LWT` (its will), `Online` / `Offline`;
 * - homeassistant: an `availability_topic` ending in `availability` or `status` (ESPHome's
 *   `<node>/status`), with Home Assistant's default payloads `online` / `offline`;
 * - your own: `{ lastLevel?, online, offline }`; without `lastLevel`, every topic of the endpoint.
 *
 * The device a report is about is the topic without that last level (`zigbee2mqtt/lamp`): its
 * ghost is found from it as for the device's messages (the endpoint's `sender`), so that the ghost
 * that posts `zigbee2mqtt/lamp` is the one shown online or offline.
 */
import { z } from "zod";
import type { Availability } from "../../src/connector.js";
import { topicNameProblem } from "./topic.js";

export const availabilityConventionNames = ["zigbee2mqtt", "tasmota", "homeassistant"] as const;

const customConvention = z.strictObject({
  lastLevel: z
    .string()
    .min(1)
    .regex(/^[^/+#]+$/, "one topic level: no /, + or #")
    .optional()
    .describe("The last topic level of availability topics (default: every topic of the endpoint)"),
  online: z.string().min(1).describe("The payload that says the device is online"),
  offline: z.string().min(1).describe("The payload that says it is offline"),
});

export const availabilityEndpointField = z
  .union([z.enum(availabilityConventionNames), customConvention])
  .optional()
  .describe(
    "in: topics on which devices say whether they are reachable become their ghost's presence and " +
      "one status line per device, not messages: zigbee2mqtt (<device>/availability), tasmota " +
      "(tele/<device>/LWT), homeassistant (…/availability or …/status, online/offline), or " +
      "{ lastLevel, online, offline }. The endpoint's other topics are relayed as messages",
  );

export type AvailabilityConvention = NonNullable<z.output<typeof availabilityEndpointField>>;

interface Rule {
  lastLevels: readonly string[] | undefined;
  payloads: ReadonlyMap<string, Availability>;
}

const BUILT_IN: Record<(typeof availabilityConventionNames)[number], Rule> = {
  zigbee2mqtt: { lastLevels: ["availability"], payloads: states("online", "offline") },
  tasmota: { lastLevels: ["LWT"], payloads: states("Online", "Offline") },
  homeassistant: { lastLevels: ["availability", "status"], payloads: states("online", "offline") },
};

function states(online: string, offline: string): Map<string, Availability> {
  return new Map([
    [online.trim().toLowerCase(), "online"],
    [offline.trim().toLowerCase(), "offline"],
  ]);
}

function ruleOf(convention: AvailabilityConvention): Rule {
  if (typeof convention === "string") return BUILT_IN[convention];
  const { lastLevel, online, offline } = convention;
  return { lastLevels: lastLevel === undefined ? undefined : [lastLevel], payloads: states(online, offline) };
}

/** What a publish on an availability topic says: a state, or why it says none. */
export type AvailabilityReading =
  { deviceTopic: string; state: Availability } | { deviceTopic: string; problem: string };

/** Whether `topic` is an availability topic under `convention`; its device's topic if so. */
export function deviceTopicOf(convention: AvailabilityConvention, topic: string): string | undefined {
  const { lastLevels } = ruleOf(convention);
  if (lastLevels === undefined) return topic;
  const slash = topic.lastIndexOf("/");
  if (slash <= 0 || !lastLevels.includes(topic.slice(slash + 1))) return undefined;
  return topic.slice(0, slash);
}

/** Reads a publish on `topic` under `convention`; undefined when it is not an availability topic. */
export function readAvailability(
  convention: AvailabilityConvention,
  topic: string,
  payload: Buffer,
): AvailabilityReading | undefined {
  const deviceTopic = deviceTopicOf(convention, topic);
  if (deviceTopic === undefined) return undefined;
  const said = stateWordOf(payload.toString("utf8"));
  const state = ruleOf(convention).payloads.get(said.trim().toLowerCase());
  if (state) return { deviceTopic, state };
  const shown = said.length > 40 ? `${said.slice(0, 40)}…` : said;
  return { deviceTopic, problem: `not an availability payload: ${JSON.stringify(shown)}` };
}

/** The payload, or the `state` of a JSON object payload (`{"state":"online"}`). */
function stateWordOf(text: string): string {
  if (!text.trimStart().startsWith("{")) return text;
  try {
    const parsed = JSON.parse(text) as unknown;
    const state = (parsed as { state?: unknown }).state;
    return typeof state === "string" ? state : text;
  } catch {
    return text;
  }
}

// ---------------------------------------------------------------------------------------------
// tribridge's own availability on an external broker
// ---------------------------------------------------------------------------------------------

export const ownAvailabilityField = z
  .union([
    z.string().refine((t) => !topicNameProblem(t), { error: "not a valid topic name (no + or #)" }),
    z.literal(false),
  ])
  .optional()
  .describe(
    "External broker: where tribridge says whether it is up, retained: online when it connects, " +
      "offline when it stops, and offline as its will when its connection is lost. " +
      "Default tribridge/<instance id>/<account>/availability; false: none",
  );

/** What tribridge publishes about itself on an external broker: birth, and the will in CONNECT. */
export interface OwnAvailability {
  topic: string;
  online: string;
  offline: string;
}

/** Home Assistant's default payloads, so that an `availability_topic` can follow tribridge as is. */
export function ownAvailabilityOf(
  setting: string | false | undefined,
  account: string,
  instanceId: string,
): OwnAvailability | undefined {
  if (setting === false) return undefined;
  return {
    topic: setting ?? `tribridge/${instanceId}/${account}/availability`,
    online: "online",
    offline: "offline",
  };
}
