/**
 * The compiled routes: which endpoints a room relays out to, and which room an endpoint relays in
 * to. Rooms are configured as aliases or ids; ids are learnt at start-up. The routes change while
 * the bridge runs (a config reload, a link made in a room: `update`); every part holds this one
 * table, so each relay reads the routes as they are when it runs.
 */
import { relaysIn, relaysOut, type Direction, type EndpointBinding } from "../connector.js";
import type { ResolvedEndpoint, ResolvedRoute } from "../config/load.js";
import { PermanentError } from "../errors.js";
import { resolveLegacyId, type EndpointLayout } from "./legacy-endpoint-ids.js";

export class RouteTable {
  private readonly endpoints = new Map<string, { route: ResolvedRoute; endpoint: ResolvedEndpoint }>();
  private readonly routesByRoomId = new Map<string, ResolvedRoute[]>();
  private readonly roomIdByRoute = new Map<string, string>();
  private current: readonly ResolvedRoute[] = [];

  /** `legacyLayout`: how to read the positional ids of earlier versions (legacy-endpoint-ids.ts). */
  constructor(
    routes: readonly ResolvedRoute[],
    private readonly legacyLayout: EndpointLayout = {},
  ) {
    this.update(routes);
  }

  get routes(): readonly ResolvedRoute[] {
    return this.current;
  }

  /**
   * Replaces every route. Endpoint ids do not depend on the rest of the config, so items queued for
   * an endpoint that is still there go on to it; room ids learnt (and followed through upgrades)
   * stay for the routes whose `room` did not change.
   */
  update(routes: readonly ResolvedRoute[]): void {
    const before = new Map(this.current.map((r) => [r.id, r.room]));
    const learnt = new Map(this.roomIdByRoute);
    this.current = routes;
    this.endpoints.clear();
    this.routesByRoomId.clear();
    this.roomIdByRoute.clear();
    for (const route of routes) {
      for (const endpoint of route.endpoints) this.endpoints.set(endpoint.id, { route, endpoint });
      const known = before.get(route.id) === route.room ? learnt.get(route.id) : undefined;
      if (known) this.setRoomId(route.id, known);
      else if (route.room.startsWith("!")) this.setRoomId(route.id, route.room);
    }
  }

  setRoomId(routeId: string, roomId: string): void {
    const route = this.routes.find((r) => r.id === routeId);
    if (!route) return;
    this.roomIdByRoute.set(routeId, roomId);
    const list = this.routesByRoomId.get(roomId) ?? [];
    if (!list.includes(route)) list.push(route);
    this.routesByRoomId.set(roomId, list);
  }

  /** After a room upgrade: the routes of `oldRoomId` now lead to `newRoomId`. Returns their ids. */
  replaceRoom(oldRoomId: string, newRoomId: string): string[] {
    const moved = this.routesByRoomId.get(oldRoomId) ?? [];
    this.routesByRoomId.delete(oldRoomId);
    for (const route of moved) this.setRoomId(route.id, newRoomId);
    return moved.map((r) => r.id);
  }

  route(routeId: string): ResolvedRoute | undefined {
    return this.routes.find((r) => r.id === routeId);
  }

  roomIdOf(routeId: string): string | undefined {
    return this.roomIdByRoute.get(routeId);
  }

  /**
   * The endpoint and its route, if `id` still exists and relays into Matrix (any endpoint, for a
   * `response`: see InboundMessage.response).
   */
  inbound(
    endpointId: string,
    response = false,
  ): { route: ResolvedRoute; endpoint: ResolvedEndpoint } | undefined {
    const found = this.endpoints.get(endpointId);
    return found && (response || relaysIn(found.endpoint.direction)) ? found : undefined;
  }

  /** The endpoint, if it still exists and relays out of Matrix. */
  outbound(endpointId: string): ResolvedEndpoint | undefined {
    const found = this.endpoints.get(endpointId);
    return found && relaysOut(found.endpoint.direction) ? found.endpoint : undefined;
  }

  /**
   * The endpoint a queued item relays into Matrix through, and its route: for the items of the
   * to-matrix queue, which may have waited through config changes. Throws PermanentError (the item
   * goes to the failed list with the reason) when no endpoint of that id relays in any more; a
   * retry works once it is configured again. Never another endpoint than the one it was queued for.
   */
  queuedInbound(
    endpointId: string,
    from: { connector: string; account: string; response?: boolean },
  ): { route: ResolvedRoute; endpoint: ResolvedEndpoint } {
    const relays = (direction: Direction) => from.response === true || relaysIn(direction);
    const id =
      resolveLegacyId(
        this.legacyLayout,
        endpointId,
        (e) => e.connector === from.connector && e.account === from.account && relays(e.direction),
      ) ?? endpointId;
    const found = this.endpoints.get(id);
    if (!found) throw new PermanentError(`endpoint ${described(id, endpointId)} is no longer configured`);
    if (!relays(found.endpoint.direction))
      throw new PermanentError(`endpoint ${described(id, endpointId)} no longer relays into Matrix`);
    return found;
  }

  /** As queuedInbound, for the items of the to-`<connector>` queue, out of Matrix. */
  queuedOutbound(endpointId: string, connector: string): ResolvedEndpoint {
    const id =
      resolveLegacyId(
        this.legacyLayout,
        endpointId,
        (e) => e.connector === connector && relaysOut(e.direction),
      ) ?? endpointId;
    const found = this.endpoints.get(id);
    if (!found) throw new PermanentError(`endpoint ${described(id, endpointId)} is no longer configured`);
    if (!relaysOut(found.endpoint.direction))
      throw new PermanentError(`endpoint ${described(id, endpointId)} no longer relays out of Matrix`);
    // An explicit id moved to another connector's account: this queue's messages are not for it.
    if (found.endpoint.connector !== connector)
      throw new PermanentError(`endpoint ${described(id, endpointId)} is no longer a ${connector} endpoint`);
    return found.endpoint;
  }

  /** Endpoints that a message in `roomId` goes out to. */
  outboundForRoom(roomId: string): ResolvedEndpoint[] {
    return (this.routesByRoomId.get(roomId) ?? []).flatMap((r) =>
      r.endpoints.filter((e) => relaysOut(e.direction)),
    );
  }

  isRouteRoom(roomId: string): boolean {
    return this.routesByRoomId.has(roomId);
  }

  /** Endpoints bound to one account, for Connector.watch. */
  endpointsOf(connector: string, account: string): ResolvedEndpoint[] {
    return this.routes.flatMap((r) =>
      r.endpoints.filter((e) => e.connector === connector && e.account === account),
    );
  }
}

/** An endpoint as its connector sees it (Connector.watch, Connector.send). */
export function bindingOf(e: ResolvedEndpoint): EndpointBinding<unknown> {
  return { id: e.id, direction: e.direction, spec: e.spec };
}

/** An endpoint id as a failed item's reason shows it, with the id it was queued under if other. */
function described(id: string, queuedAs: string): string {
  return id === queuedAs ? id : `${id} (queued as ${queuedAs} by an earlier version)`;
}
