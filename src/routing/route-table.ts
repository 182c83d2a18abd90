/**
 * The compiled routes: which endpoints a room relays out to, and which room an endpoint relays in
 * to. Rooms are configured as aliases or ids; ids are learnt at start-up.
 */
import { relaysIn, relaysOut, type EndpointBinding } from "../connector.js";
import type { ResolvedEndpoint, ResolvedRoute } from "../config/load.js";

export class RouteTable {
  private readonly endpoints = new Map<string, { route: ResolvedRoute; endpoint: ResolvedEndpoint }>();
  private readonly routesByRoomId = new Map<string, ResolvedRoute[]>();
  private readonly roomIdByRoute = new Map<string, string>();

  constructor(readonly routes: readonly ResolvedRoute[]) {
    for (const route of routes) {
      for (const endpoint of route.endpoints) this.endpoints.set(endpoint.id, { route, endpoint });
      if (route.room.startsWith("!")) this.setRoomId(route.id, route.room);
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

  roomIdOf(routeId: string): string | undefined {
    return this.roomIdByRoute.get(routeId);
  }

  /** The endpoint and its route, if `id` still exists and relays into Matrix. */
  inbound(endpointId: string): { route: ResolvedRoute; endpoint: ResolvedEndpoint } | undefined {
    const found = this.endpoints.get(endpointId);
    return found && relaysIn(found.endpoint.direction) ? found : undefined;
  }

  /** The endpoint, if it still exists and relays out of Matrix. */
  outbound(endpointId: string): ResolvedEndpoint | undefined {
    const found = this.endpoints.get(endpointId);
    return found && relaysOut(found.endpoint.direction) ? found.endpoint : undefined;
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
