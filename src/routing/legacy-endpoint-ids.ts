/**
 * Endpoint ids written by earlier versions of tribridge: `<route>.<index>`, the endpoint's position
 * in its route. Queues and failed lists written then still hold them. A position means something
 * only in the config it was taken from, so such an id is read against the endpoints as they stood
 * when this version first started with this Redis — recorded once, at that start, and never
 * changed — not against today's config: endpoints reordered or inserted since do not move those
 * items. (So upgrade with the config the earlier version ran with; edit endpoints afterwards.)
 *
 * An item goes to the endpoint recorded at its position only if that endpoint can carry it (same
 * connector, and account for an item into Matrix, relaying the item's way); otherwise, and when
 * nothing was recorded at that position, it fails into the failed list, saying why, rather than
 * guessing. Current ids never look like positions (see src/config/endpoint-ids.ts).
 */
import type { Redis } from "ioredis";
import type { ResolvedRoute } from "../config/load.js";
import type { Direction } from "../connector.js";
import { PermanentError } from "../errors.js";
import { redisKeys } from "../store/keys.js";

export interface RecordedEndpoint {
  readonly id: string;
  readonly connector: string;
  readonly account: string;
  readonly direction: Direction;
}

/** Route id → its endpoints in config order, as of this version's first start. */
export type EndpointLayout = Readonly<Record<string, readonly RecordedEndpoint[]>>;

/** `<route>.<index>` as earlier versions wrote it (`${route.id}.${index}`: no leading zeros). */
const POSITIONAL_ID = /^([a-z0-9][a-z0-9_-]*)\.(0|[1-9][0-9]{0,5})$/;

export function legacyPosition(endpointId: string): { routeId: string; index: number } | undefined {
  const m = POSITIONAL_ID.exec(endpointId);
  return m ? { routeId: m[1]!, index: Number(m[2]) } : undefined;
}

export function layoutOf(routes: readonly ResolvedRoute[]): EndpointLayout {
  return Object.fromEntries(
    routes.map((r) => [
      r.id,
      r.endpoints.map(({ id, connector, account, direction }) => ({ id, connector, account, direction })),
    ]),
  );
}

/**
 * The layout recorded at the first start of this version on this Redis (and queue prefix); at that
 * start, records `routes`. Several instances starting at once record one of theirs (the same
 * config, presumably).
 */
export async function recordedEndpointLayout(
  redis: Redis,
  prefix: string,
  routes: readonly ResolvedRoute[],
): Promise<EndpointLayout> {
  const key = redisKeys.endpointLayout(prefix);
  const now = JSON.stringify(layoutOf(routes));
  await redis.set(key, now, "NX");
  return JSON.parse((await redis.get(key)) ?? now) as EndpointLayout;
}

/**
 * The current id of the endpoint an item queued under the positional id `endpointId` was meant
 * for, or undefined when `endpointId` is not positional. Throws PermanentError when that cannot
 * be told: nothing recorded at that position, or what was there cannot carry the item (`fits`).
 */
export function resolveLegacyId(
  layout: EndpointLayout,
  endpointId: string,
  fits: (recorded: RecordedEndpoint) => boolean,
): string | undefined {
  const position = legacyPosition(endpointId);
  if (!position) return undefined;
  const { routeId, index } = position;
  const named = `endpoint ${endpointId} names an endpoint by its position (an id written by an earlier version)`;
  const recorded = layout[routeId]?.[index];
  if (!recorded)
    throw new PermanentError(
      `${named}, and route ${routeId} had no endpoint at position ${index} when this version first ` +
        "started: cannot tell which endpoint it was meant for",
    );
  if (!fits(recorded))
    throw new PermanentError(
      `${named}, but the endpoint at that position when this version first started (${recorded.id}: ` +
        `${recorded.connector}.${recorded.account}, ${recorded.direction}) cannot carry it: cannot ` +
        "tell which endpoint it was meant for",
    );
  return recorded.id;
}
