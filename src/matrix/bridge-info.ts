/**
 * What a route's room is bridged to, as clients show it (MSC2346, "Bridge information state
 * event"): one `m.bridge` state event per distinct channel of the route's endpoints, and the same
 * as `uk.half-shot.bridge`, the unstable name Element and the other bridges still read. Set at
 * start; only what differs from the room's state is sent, so a restart sends nothing, and an event
 * of ours that no endpoint describes any more is emptied (a state event cannot be deleted).
 */
import { isDeepStrictEqual } from "node:util";
import type { BridgedPlace, ConnectorDefinition } from "../connector.js";
import type { ResolvedAccount, ResolvedRoute } from "../config/load.js";
import { errorMessage } from "../errors.js";
import { MatrixPermanentError } from "./matrix-error.js";
import type { MatrixClient } from "./matrix-client.js";

export const BRIDGE_STATE_TYPES = ["m.bridge", "uk.half-shot.bridge"] as const;

/** MSC2346: a state key starts with a prefix that names the bridge software. */
const BRIDGE_PREFIX = "tribridge";

export interface BridgeState {
  stateKey: string;
  content: Record<string, unknown>;
}

/** MSC2346: `{id, displayname}`; the display name defaults to the id. */
function place(p: BridgedPlace): Record<string, string> {
  return { id: p.id, displayname: p.displayName ?? p.id };
}

/** MSC2346: "Any `/`s must be escaped into `%2F`" (and `%` itself, so that two ids cannot meet). */
function keyPart(id: string): string {
  return id.replaceAll("%", "%25").replaceAll("/", "%2F");
}

/** The bridge information of one route's room: one entry per distinct (protocol, network, channel). */
export function bridgeStates(
  route: ResolvedRoute,
  bot: string,
  connectors: readonly ConnectorDefinition[],
  accounts: readonly ResolvedAccount[],
): BridgeState[] {
  const states = new Map<string, BridgeState>();
  for (const endpoint of route.endpoints) {
    const definition = connectors.find((c) => c.name === endpoint.connector);
    if (!definition) continue;
    const config = accounts.find(
      (a) => a.connector === endpoint.connector && a.account === endpoint.account,
    )?.config;
    const { network, channel } = definition.describeEndpoint?.(endpoint.spec, {
      name: endpoint.account,
      config,
    }) ?? { network: { id: endpoint.account }, channel: { id: endpoint.id } };
    const stateKey = `${BRIDGE_PREFIX}://${[definition.name, network.id, channel.id].map(keyPart).join("/")}`;
    states.set(stateKey, {
      stateKey,
      content: {
        bridgebot: bot,
        // Routes are set up by whoever runs the bridge, not by a room member: the bot stands for them.
        creator: bot,
        protocol: { id: definition.name, displayname: definition.displayName ?? definition.name },
        network: place(network),
        channel: place(channel),
      },
    });
  }
  return [...states.values()];
}

/** What sending the bridge information into one room came to. */
export type BridgeInfoOutcome = "sent" | "unchanged" | "forbidden";

/**
 * Brings the room's bridge information in line with `wanted`: sends each state event whose content
 * differs from the room's, empties ours that are not wanted any more. "forbidden": the bot may not
 * send state events in the room (its power level), which stops it trying the rest; other failures
 * (the homeserver unreachable) throw.
 */
export async function updateBridgeInfo(
  matrix: Pick<MatrixClient, "roomStateEvents" | "setRoomState">,
  roomId: string,
  bot: string,
  wanted: readonly BridgeState[],
): Promise<BridgeInfoOutcome> {
  const current = new Map<string, unknown>();
  const gone = new Set<string>();
  for (const event of await matrix.roomStateEvents(roomId)) {
    const { type, state_key: stateKey, content } = event;
    if (typeof type !== "string" || typeof stateKey !== "string") continue;
    current.set(`${type}\u0000${stateKey}`, content);
    // Ours and gone from the config: emptied, as a client would then show no bridge there.
    const ours =
      BRIDGE_STATE_TYPES.some((t) => t === type) &&
      event.sender === bot &&
      stateKey.startsWith(`${BRIDGE_PREFIX}://`);
    if (ours && !wanted.some((w) => w.stateKey === stateKey)) gone.add(stateKey);
  }
  let sent = false;
  for (const { stateKey, content } of [...wanted, ...[...gone].map((k) => ({ stateKey: k, content: {} }))]) {
    for (const type of BRIDGE_STATE_TYPES) {
      const known = current.get(`${type}\u0000${stateKey}`);
      if (isDeepStrictEqual(known ?? {}, content)) continue;
      try {
        await matrix.setRoomState(roomId, type, stateKey, content);
      } catch (err) {
        if (err instanceof MatrixPermanentError && err.errcode === "M_FORBIDDEN") return "forbidden";
        throw new Error(`setting ${type} ${stateKey}: ${errorMessage(err)}`, { cause: err });
      }
      sent = true;
    }
  }
  return sent ? "sent" : "unchanged";
}
