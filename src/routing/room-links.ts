/**
 * Routes set up from a room: `!tribridge link <account> <target> [in|out|inout] [key=value…]`,
 * `unlink`, `routes` (admins only, as every command). Each room's links make one route of that
 * room (by its id: no alias, no new registration), `room-<hash of the room id>`, one endpoint per
 * link. A link is checked exactly as a config file's endpoint is (the core's endpoint schema, the
 * connector's `endpointSchema` and `checkEndpoint`; errors name the field), stored in Redis as it
 * was given (`redisKeys.roomLinks`), and applied at once; at start the stored links are read with
 * the file's routes. The file's routes are shown here, never changed from a room. A room has at most
 * MAX_LINKS_PER_ROOM links, all rooms together MAX_LINKS.
 */
import { hash } from "node:crypto";
import type { Redis } from "ioredis";
import { parse as parseYaml } from "yaml";
import type { ConnectorDefinition } from "../connector.js";
import { endpointKeyOf } from "../config/endpoint-ids.js";
import {
  issuesToErrors,
  resolveEndpoint,
  type Config,
  type ResolvedEndpoint,
  type ResolvedRoute,
} from "../config/load.js";
import { directionSchema, endpointBaseSchema } from "../config/schema.js";
import { errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import { redisKeys } from "../store/keys.js";
import type { RouteTable } from "./route-table.js";

/** One link, as stored: what the command gave, and who gave it when. */
export interface StoredLink {
  /** `account`, `direction` and the endpoint's fields (the connector's, and `id`/`live`/`notices`). */
  readonly endpoint: Readonly<Record<string, unknown>>;
  readonly by: string;
  /** ms since epoch */
  readonly at: number;
}

/** A stored link as it stands against the running config: its endpoint, or why it has none. */
interface Link {
  readonly stored: StoredLink;
  readonly endpoint?: ResolvedEndpoint;
  /** The connector's endpointKey of it, when its fields parse (to find it for unlink). */
  readonly key?: string;
  readonly problem?: string;
}

/**
 * What is stored for one room. `route`: the id of its route, from the room it was first linked in
 * (`linkRouteId`); kept when the room is upgraded, so that the endpoint ids, which queued messages
 * refer to, stay the same.
 */
interface StoredRoom {
  readonly route: string;
  readonly links: readonly StoredLink[];
}

/** The route of a room's first link: a route id (no '.', no ':') that is the same at every start. */
export function linkRouteId(roomId: string): string {
  return `room-${hash("sha256", roomId, "hex").slice(0, 12)}`;
}

export interface RoomLinksOptions {
  redis: Redis;
  prefix: string;
  config: Config;
  connectors: readonly ConnectorDefinition[];
  /** The routes as they run: the file's routes in a room are found here. */
  table: RouteTable;
  /** Runs a change after those before it (LiveRoutes.exclusive). */
  exclusive<T>(change: () => Promise<T>): Promise<T>;
  /** What a linked route has besides its id, room and endpoints (the file's defaults, as they run). */
  routeDefaults(): Omit<ResolvedRoute, "id" | "room" | "endpoints">;
  /** Makes these the linked routes (LiveRoutes.set); returns problems. */
  apply(routes: readonly ResolvedRoute[]): Promise<string[]>;
  log: Logger;
}

const CORE_OWNED = new Set(["account", "direction"]);

/**
 * Most links one room may have, and all rooms together: links come from rooms, and each is a
 * subscription or a watched address that every instance holds; beyond these a link is refused.
 */
export const MAX_LINKS_PER_ROOM = 50;
export const MAX_LINKS = 1000;

export class RoomLinks {
  private links = new Map<string, Link[]>();
  /** Each linked room's route id (see StoredRoom). */
  private routeIds = new Map<string, string>();
  private readonly byName: Map<string, ConnectorDefinition>;
  private readonly accountConfigs: Map<string, unknown>;

  constructor(private readonly o: RoomLinksOptions) {
    this.byName = new Map(o.connectors.map((c) => [c.name, c]));
    this.accountConfigs = new Map(o.config.accounts.map((a) => [`${a.connector}.${a.account}`, a.config]));
  }

  /**
   * Instances sharing this Redis apply a change made through any of them at once: each change is
   * published on `redisKeys.roomLinksChanged`, and each instance reads the links again when told,
   * and when its subscription comes back after a disconnection (it may have missed one).
   * `subscriber`: a connection of its own (one that subscribes can do nothing else).
   */
  async follow(subscriber: Redis): Promise<void> {
    let first = true;
    subscriber.on("message", () => void this.refresh());
    subscriber.on("ready", () => {
      if (!first) void this.refresh();
      first = false;
    });
    await subscriber.subscribe(redisKeys.roomLinksChanged(this.o.prefix));
    await this.refresh(); // a change made since the links were first read
  }

  private async refresh(): Promise<void> {
    await this.o
      .exclusive(async () => {
        await this.load();
        await this.o.apply(this.routes());
      })
      .catch((err: unknown) =>
        this.o.log.warn({ err: errorMessage(err) }, "could not read the links made through another instance"),
      );
  }

  /** Reads the stored links (at start, and before each change: another instance may have made one). */
  async load(): Promise<void> {
    const all = await this.o.redis.hgetall(redisKeys.roomLinks(this.o.prefix));
    const links = new Map<string, Link[]>();
    this.routeIds = new Map();
    for (const [roomId, json] of Object.entries(all)) {
      let stored: StoredRoom;
      try {
        stored = JSON.parse(json) as StoredRoom;
      } catch (err) {
        this.o.log.warn({ roomId, err: errorMessage(err) }, "a room's stored links are not JSON; left out");
        continue;
      }
      this.routeIds.set(roomId, stored.route);
      const resolved = stored.links.map((s) => this.resolve(roomId, s));
      for (const l of resolved.filter((l) => l.problem))
        this.o.log.warn(
          { roomId, endpoint: l.stored.endpoint, problem: l.problem },
          "a link made in a room does not fit the config any more; not relayed until it does",
        );
      links.set(roomId, resolved);
    }
    this.links = links;
  }

  /** The linked routes: one per room with at least one link that fits the config. */
  routes(): ResolvedRoute[] {
    return [...this.links].flatMap(([roomId, links]) => {
      const endpoints = links.flatMap((l) => (l.endpoint ? [l.endpoint] : []));
      return endpoints.length === 0
        ? []
        : [{ ...this.o.routeDefaults(), id: this.routeIdIn(roomId), room: roomId, endpoints }];
    });
  }

  /** `!tribridge link …` in `roomId` by `sender`; `args`: what follows `link`. The answer. */
  async link(roomId: string, sender: string, args: string): Promise<string> {
    const [account, target, ...rest] = splitArgs(args);
    const def = account && this.byName.get(account.value.split(".")[0]!);
    if (!account || !target || !def?.link) return this.usage(def && !def.link ? def : undefined);
    let direction = "inout";
    if (rest[0] && directionSchema.safeParse(rest[0].value).success) direction = rest.shift()!.value;
    const fields = def.link.fields(target.value);
    const options: Record<string, unknown> = {};
    for (const token of rest) {
      const eq = token.value.indexOf("=");
      if (eq < 1) return `Not linked: "${token.value}" is not key=value.\n${this.usage()}`;
      const key = token.value.slice(0, eq);
      const top = key.split(".")[0]!;
      if (CORE_OWNED.has(top)) return `Not linked: ${top} is given by position, not as ${key}=…`;
      if (Object.hasOwn(fields, top))
        return `Not linked: ${top} is the ${def.link.target} (the second argument)`;
      try {
        setPath(options, key, optionValue(token.value.slice(eq + 1), token.quoted));
      } catch (err) {
        return `Not linked: ${key}: ${errorMessage(err)}`;
      }
    }
    const endpoint = { account: account.value, direction, ...fields, ...options };
    return this.o.exclusive(async () => {
      await this.load();
      const link = this.resolve(roomId, { endpoint, by: sender, at: Date.now() });
      if (!link.endpoint) return `Not linked: ${link.problem}`;
      const taken = this.sameEndpoint(roomId, link);
      if (taken) return `Not linked: ${taken}`;
      const full = this.full(roomId);
      if (full) return `Not linked: ${full}`;
      await this.store(roomId, [...(this.links.get(roomId) ?? []), link]);
      const problems = await this.o.apply(this.routes());
      const what = `${account.value} ${target.value} (${direction})`;
      return [`Linked ${what} to this room, as endpoint ${link.endpoint.id}.`, ...problems].join("\n");
    });
  }

  /** `!tribridge unlink <endpoint id> | <account> <target> [in|out|inout]`. The answer. */
  async unlink(roomId: string, args: string): Promise<string> {
    const tokens = splitArgs(args).map((t) => t.value);
    if (tokens.length === 0 || tokens.length > 3)
      return "Usage: !tribridge unlink <endpoint id> | !tribridge unlink <account> <topic or address> [in|out|inout] (!tribridge routes lists them)";
    return this.o.exclusive(async () => {
      await this.load();
      const matches = this.matcher(tokens);
      if (!matches) return `Not unlinked: ${tokens[0]} is not an account with links (e.g. mqtt.default)`;
      const mine = this.links.get(roomId) ?? [];
      const gone = mine.filter((l) => matches(l.endpoint?.id, l.stored.endpoint, l.key));
      if (gone.length === 0) {
        const inFile = this.fileRoutesIn(roomId).find((r) =>
          r.endpoints.some((e) =>
            matches(e.id, { account: `${e.connector}.${e.account}`, direction: e.direction }, this.keyOf(e)),
          ),
        );
        return inFile
          ? `Not unlinked: that is route ${inFile.id} of the config file; change it there, then !tribridge reload.`
          : `Nothing linked in this room matches "${tokens.join(" ")}"; !tribridge routes lists what is.`;
      }
      await this.store(
        roomId,
        mine.filter((l) => !gone.includes(l)),
      );
      const problems = await this.o.apply(this.routes());
      const ids = gone.map((l) => l.endpoint?.id ?? describeFields(l.stored.endpoint));
      return [`Unlinked ${ids.join(", ")}.`, ...problems].join("\n");
    });
  }

  /** `!tribridge routes`: what relays into and out of `roomId`, from the file and from links. */
  async describe(roomId: string): Promise<string> {
    await this.o.exclusive(() => this.load());
    const lines: string[] = [];
    for (const route of this.fileRoutesIn(roomId)) {
      lines.push(`Route ${route.id} (config file; change it there, then !tribridge reload):`);
      for (const e of route.endpoints)
        lines.push(`  ${e.id}: ${e.connector}.${e.account} ${e.direction} ${this.keyOf(e)}`);
    }
    const links = this.links.get(roomId) ?? [];
    if (links.length > 0) lines.push("Linked from this room (!tribridge unlink <id>):");
    for (const l of links) {
      const by = `linked by ${l.stored.by} on ${new Date(l.stored.at).toISOString().slice(0, 10)}`;
      lines.push(
        l.endpoint
          ? `  ${l.endpoint.id}: ${describeFields(l.stored.endpoint)}; ${by}`
          : `  not relayed (${l.problem}): ${describeFields(l.stored.endpoint)}; ${by}`,
      );
    }
    return lines.length > 0 ? lines.join("\n") : `Nothing is bridged to this room.\n${this.usage()}`;
  }

  private usage(unlinkable?: ConnectorDefinition): string {
    const linkable = this.o.config.accounts.filter((a) => this.byName.get(a.connector)?.link);
    const accounts = linkable.map(
      (a) => `${a.connector}.${a.account} <${this.byName.get(a.connector)!.link!.target}>`,
    );
    return [
      ...(unlinkable
        ? [`${unlinkable.name} cannot be linked from a room: add a route to the config file.`]
        : []),
      "Usage: !tribridge link <account> <topic or address> [in|out|inout] [key=value…] (default inout;",
      "keys as in a config file's endpoint, e.g. qos=0, format=json, sender.topicLevel=2, live=true)",
      `Accounts: ${accounts.join(", ") || "none that can be linked"}`,
    ].join("\n");
  }

  /** A stored link against the running config (the same checks as the config file's endpoints). */
  private resolve(roomId: string, stored: StoredLink): Link {
    const base = endpointBaseSchema.safeParse(stored.endpoint);
    if (!base.success) return { stored, problem: messages(issuesToErrors(base.error.issues)) };
    const def = this.byName.get(base.data.account.split(".")[0]!);
    const { account: _a, direction: _d, id: _i, live: _l, notices: _n, ...fields } = base.data;
    const spec = def?.endpointSchema.safeParse(fields);
    const key = def && spec?.success ? endpointKeyOf(def, spec.data) : undefined;
    const resolved = resolveEndpoint(base.data, [], this.routeIdIn(roomId), this.byName, this.accountConfigs);
    if ("errors" in resolved) return { stored, key, problem: messages(resolved.errors) };
    return { stored, endpoint: resolved.endpoint, key };
  }

  /** Why `link` cannot be added to `roomId`: the same endpoint is there already. */
  private sameEndpoint(roomId: string, link: Link): string | undefined {
    const e = link.endpoint!;
    if ((this.links.get(roomId) ?? []).some((l) => l.endpoint?.id === e.id))
      return `this room already has endpoint ${e.id} (!tribridge routes)`;
    for (const route of this.fileRoutesIn(roomId))
      for (const f of route.endpoints)
        if (
          f.connector === e.connector &&
          f.account === e.account &&
          f.direction === e.direction &&
          this.keyOf(f) === link.key
        )
          return `route ${route.id} of the config file already relays this (${f.id})`;
    return undefined;
  }

  /** Why no more links can be made in `roomId`: it, or all rooms together, have the most allowed. */
  private full(roomId: string): string | undefined {
    const here = this.links.get(roomId)?.length ?? 0;
    if (here >= MAX_LINKS_PER_ROOM)
      return `this room has ${here} links, the most a room may have (${MAX_LINKS_PER_ROOM}); !tribridge unlink one first, or add a route to the config file`;
    const all = [...this.links.values()].reduce((n, links) => n + links.length, 0);
    if (all >= MAX_LINKS)
      return `the rooms have ${all} links together, the most tribridge takes (${MAX_LINKS}); unlink some, or add routes to the config file`;
    return undefined;
  }

  /** The file's routes whose room is `roomId` (linked routes are not in the file). */
  private fileRoutesIn(roomId: string): ResolvedRoute[] {
    const linked = new Set([...this.links.keys()].map((r) => this.routeIdIn(r)));
    return this.o.table.routes.filter((r) => !linked.has(r.id) && this.o.table.roomIdOf(r.id) === roomId);
  }

  private keyOf(e: ResolvedEndpoint): string {
    return endpointKeyOf(this.byName.get(e.connector)!, e.spec);
  }

  /**
   * What unlink's arguments select: an endpoint id (whole, or after its route's '.'), or an
   * account, a target and optionally a direction. Undefined when the account's protocol has no links.
   */
  private matcher(
    tokens: string[],
  ):
    | ((
        id: string | undefined,
        endpoint: Readonly<Record<string, unknown>>,
        key: string | undefined,
      ) => boolean)
    | undefined {
    if (tokens.length === 1) {
      const [wanted] = tokens as [string];
      return (id) => id !== undefined && (id === wanted || id.slice(id.indexOf(".") + 1) === wanted);
    }
    const [account, target, direction] = tokens as [string, string, string | undefined];
    const def = this.byName.get(account.split(".")[0]!);
    if (!def?.link) return undefined;
    const spec = def.endpointSchema.safeParse(def.link.fields(target));
    const key = spec.success ? endpointKeyOf(def, spec.data) : undefined;
    return (_id, endpoint, k) =>
      endpoint.account === account &&
      (direction === undefined || endpoint.direction === direction) &&
      k !== undefined &&
      k === key;
  }

  private routeIdIn(roomId: string): string {
    return this.routeIds.get(roomId) ?? linkRouteId(roomId);
  }

  /**
   * The room was upgraded (`m.room.tombstone`): its links move to the new room, with their route
   * and endpoint ids, so that what is queued for them goes on there.
   */
  async moveRoom(oldRoomId: string, newRoomId: string): Promise<void> {
    await this.o.exclusive(async () => {
      await this.load();
      const links = this.links.get(oldRoomId);
      if (!links) return;
      const route = this.routeIdIn(oldRoomId);
      const key = redisKeys.roomLinks(this.o.prefix);
      const stored: StoredRoom = { route, links: links.map((l) => l.stored) };
      await this.o.redis.multi().hset(key, newRoomId, JSON.stringify(stored)).hdel(key, oldRoomId).exec();
      await this.o.redis.publish(redisKeys.roomLinksChanged(this.o.prefix), newRoomId);
      await this.load();
      await this.o.apply(this.routes());
      this.o.log.info({ oldRoomId, newRoomId, route }, "a linked room was upgraded; its links moved along");
    });
  }

  private async store(roomId: string, links: Link[]): Promise<void> {
    const key = redisKeys.roomLinks(this.o.prefix);
    const changed = redisKeys.roomLinksChanged(this.o.prefix);
    if (links.length === 0) {
      await this.o.redis.hdel(key, roomId);
      await this.o.redis.publish(changed, roomId);
      this.links.delete(roomId);
      this.routeIds.delete(roomId);
      return;
    }
    const route = this.routeIdIn(roomId);
    const stored: StoredRoom = { route, links: links.map((l) => l.stored) };
    await this.o.redis.hset(key, roomId, JSON.stringify(stored));
    await this.o.redis.publish(changed, roomId);
    this.links.set(roomId, links);
    this.routeIds.set(roomId, route);
  }
}

function messages(errors: readonly Error[]): string {
  return errors.map((e) => e.message).join("; ");
}

/** `mqtt.home inout topic=lab/t qos=0`: a link as it was given. */
function describeFields(endpoint: Readonly<Record<string, unknown>>): string {
  const { account, direction, ...fields } = endpoint;
  const shown = Object.entries(fields).map(
    ([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`,
  );
  return [String(account), String(direction), ...shown].join(" ");
}

/**
 * A command's arguments, split at white space outside quotes ("…" or '…', which are dropped):
 * `subject="[lab] alerts"` is one argument. `quoted`: it had quotes (its value stays a string).
 */
export function splitArgs(text: string): { value: string; quoted: boolean }[] {
  const args: { value: string; quoted: boolean }[] = [];
  let value = "";
  let quoted = false;
  let quote: string | undefined;
  let inArg = false;
  for (const ch of text) {
    if (quote) {
      if (ch === quote) quote = undefined;
      else value += ch;
    } else if (ch === '"' || ch === "'") {
      quote = ch;
      quoted = inArg = true;
    } else if (/\s/.test(ch)) {
      if (inArg) args.push({ value, quoted });
      value = "";
      quoted = inArg = false;
    } else {
      value += ch;
      inArg = true;
    }
  }
  if (inArg) args.push({ value, quoted });
  return args;
}

/**
 * An option's value: a number, true/false, YAML in brackets (`to=[a@x.org, b@y.org]`), else the
 * text; quoted, always the text. The schema then says whether it fits.
 */
function optionValue(text: string, quoted: boolean): unknown {
  if (quoted) return text;
  if (/^-?\d+(\.\d+)?$/.test(text)) return Number(text);
  if (text === "true" || text === "false") return text === "true";
  if (/^[[{]/.test(text)) {
    try {
      return parseYaml(text) as unknown;
    } catch (err) {
      throw new Error(`not valid YAML: ${errorMessage(err).split("\n")[0]}`);
    }
  }
  return text;
}

/** `sender.topicLevel` = 2 → `{ sender: { topicLevel: 2 } }`. */
function setPath(target: Record<string, unknown>, path: string, value: unknown): void {
  const keys = path.split(".");
  // Keys come from a room: none may reach an object's prototype.
  if (keys.some((k) => k === "" || k === "__proto__" || k === "constructor" || k === "prototype"))
    throw new Error("not a config key");
  let node = target;
  for (const key of keys.slice(0, -1)) {
    const next = node[key];
    if (typeof next !== "object" || next === null || Array.isArray(next)) node[key] = {};
    node = node[key] as Record<string, unknown>;
  }
  node[keys.at(-1)!] = value;
}
