/**
 * Endpoint ids: what queued and failed items, live messages and logs call an endpoint by. They do
 * not depend on where the endpoint stands in its route, so reordering or inserting endpoints in
 * the config sends nothing to another endpoint: `<route>.<id>` when the config gives an `id`, else
 * `<route>.<8 hex digits>`, a hash of the endpoint's account, direction and identifying fields
 * (its connector's `endpointKey`). Never a ':' (BullMQ's key separator) and never only digits
 * after the route: `<route>.<digits>` is how earlier versions named endpoints, by position (see
 * src/routing/legacy-endpoint-ids.ts).
 */
import { hash } from "node:crypto";
import type { ConnectorDefinition, Direction } from "../connector.js";

/** An explicit endpoint `id`: a letter first, so it can never be read as a position. */
export const EXPLICIT_ID = /^[a-z][a-z0-9_-]{0,63}$/;

/** JSON with the keys of every object sorted: the same text for the same value, however built. */
export function canonicalJson(value: unknown): string {
  return JSON.stringify(value, (_key, v: unknown) =>
    v !== null && typeof v === "object" && !Array.isArray(v)
      ? Object.fromEntries(Object.entries(v).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)))
      : v,
  );
}

/** What identifies `spec` within its account and direction: the connector's say, else all of it. */
export function endpointKeyOf(def: ConnectorDefinition, spec: unknown): string {
  return def.endpointKey ? def.endpointKey(spec) : canonicalJson(spec);
}

/** `<route>.<hash8>`: the same for the same account (`<connector>.<account>`), direction and key. */
export function derivedEndpointId(
  routeId: string,
  account: string,
  direction: Direction,
  key: string,
): string {
  return `${routeId}.${hash("sha256", JSON.stringify([account, direction, key]), "hex").slice(0, 8)}`;
}

export function explicitEndpointId(routeId: string, id: string): string {
  return `${routeId}.${id}`;
}

/** The route an endpoint id belongs to (route ids have no '.'), whether it is still configured or not. */
export function routeIdOf(endpointId: string): string {
  const dot = endpointId.indexOf(".");
  return dot < 0 ? endpointId : endpointId.slice(0, dot);
}
