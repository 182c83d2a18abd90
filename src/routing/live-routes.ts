/**
 * The routes as they run: those of the config file and those linked from rooms
 * (`!tribridge link`), merged into the one RouteTable every part reads. A change to either
 * (a reload, a link) updates the table, has each account whose endpoints changed watch its new
 * list, and joins the rooms of new routes. Changes run one at a time.
 */
import type { ResolvedRoute } from "../config/load.js";
import type { Logger } from "../log.js";
import type { RouteTable } from "./route-table.js";

export interface LiveRoutesOptions {
  table: RouteTable;
  /** The file's routes at start. */
  fileRoutes: readonly ResolvedRoute[];
  /** The routes linked from rooms at start (stored in Redis). */
  linkedRoutes: readonly ResolvedRoute[];
  /** Connectors watch their new endpoints; returns problems (an account that could not). */
  rewatch(): Promise<string[]>;
  /** Joins the rooms of routes new to the table (and learns what it must about them). */
  joinRooms(routes: readonly ResolvedRoute[]): Promise<void>;
  log: Logger;
}

export class LiveRoutes {
  private file: readonly ResolvedRoute[];
  private linked: readonly ResolvedRoute[];
  private last: Promise<unknown> = Promise.resolve();

  /** Puts the routes in the table at once: before the connectors first watch. */
  constructor(private readonly o: LiveRoutesOptions) {
    this.file = o.fileRoutes;
    this.linked = o.linkedRoutes;
    o.table.update(this.merged());
  }

  get fileRoutes(): readonly ResolvedRoute[] {
    return this.file;
  }

  get linkedRoutes(): readonly ResolvedRoute[] {
    return this.linked;
  }

  /**
   * Runs `change` after every change before it has settled: for a read-modify-write of the routes
   * (a link reads what is linked, stores, then applies).
   */
  exclusive<T>(change: () => Promise<T>): Promise<T> {
    const next = this.last.then(change);
    this.last = next.catch(() => undefined);
    return next;
  }

  /**
   * Replaces the file's routes, the linked ones, or both; call inside `exclusive`. Returns problems
   * that did not stop the change.
   */
  async set(routes: {
    file?: readonly ResolvedRoute[];
    linked?: readonly ResolvedRoute[];
  }): Promise<string[]> {
    this.file = routes.file ?? this.file;
    this.linked = routes.linked ?? this.linked;
    return this.apply();
  }

  /** The file's routes win: a linked route whose id the file took is left out (and logged). */
  private merged(): ResolvedRoute[] {
    const fileIds = new Set(this.file.map((r) => r.id));
    for (const r of this.linked.filter((r) => fileIds.has(r.id)))
      this.o.log.warn(
        { route: r.id, room: r.room },
        "a route in the file has this linked route's id; the file's wins",
      );
    return [...this.file, ...this.linked.filter((r) => !fileIds.has(r.id))];
  }

  private async apply(): Promise<string[]> {
    const { table } = this.o;
    const before = new Set(table.routes.map((r) => r.id));
    table.update(this.merged());
    const problems = await this.o.rewatch();
    await this.o.joinRooms(table.routes.filter((r) => !before.has(r.id)));
    return problems;
  }
}
