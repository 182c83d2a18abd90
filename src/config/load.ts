/**
 * Reads config.yaml, applies environment overrides and `*File` secrets, validates it against the
 * schema, then checks each route endpoint with its connector. Produces the resolved `Config`.
 */
import { existsSync, readFileSync } from "node:fs";
import { resolve, dirname } from "node:path";
import { parse as parseYaml, YAMLParseError } from "yaml";
import type { z } from "zod";
import type { ConnectorDefinition, Direction } from "../connector.js";
import { ConfigError, formatPath } from "../errors.js";
import { derivedEndpointId, endpointKeyOf, explicitEndpointId } from "./endpoint-ids.js";
import {
  buildConfigSchema,
  endpointBaseSchema,
  type AppserviceConfig,
  type HomeserverConfig,
  type MetricsConfig,
  type EncryptionConfig,
  type PermissionsConfig,
  type FeedbackConfig,
  type QueueConfig,
} from "./schema.js";

export interface ResolvedEndpoint {
  /**
   * `<routeId>.<id>` with an explicit `id`, else `<routeId>.<hash8>` of its account, direction and
   * connector's endpointKey: the same wherever the endpoint stands in its route (endpoint-ids.ts).
   */
  readonly id: string;
  readonly routeId: string;
  readonly connector: string;
  readonly account: string;
  readonly direction: Direction;
  /** Into the room: one message per sender and stream, edited with each new reading. */
  readonly live: boolean;
  /** Out of the room: m.notice messages (bots') too. */
  readonly notices: boolean;
  /** The connector's own fields, as its endpointSchema produced them. */
  readonly spec: unknown;
}

export interface ResolvedRoute {
  readonly id: string;
  readonly room: string;
  readonly invite: readonly string[];
  readonly endpoints: readonly ResolvedEndpoint[];
  /** Who may relay into its out endpoints: its own, or the top-level default; `key` says which. */
  readonly permissions: PermissionsConfig & { readonly key: string };
  /** How its room's messages show their delivery; absent: the config's `feedback`. */
  readonly feedback?: FeedbackConfig;
}

export interface ResolvedAccount {
  readonly connector: string;
  readonly account: string;
  readonly config: unknown;
}

export interface Config {
  readonly homeserver: HomeserverConfig;
  readonly appservice: AppserviceConfig & { readonly url: string };
  readonly queue: QueueConfig;
  readonly metrics: MetricsConfig;
  readonly encryption: EncryptionConfig;
  /** Delivery feedback of every route that says nothing else (ResolvedRoute.feedback). */
  readonly feedback: FeedbackConfig;
  readonly dataDir: string;
  readonly accounts: readonly ResolvedAccount[];
  readonly routes: readonly ResolvedRoute[];
  /** The top-level `permissions`: those of every route without its own (and of routes linked from rooms). */
  readonly permissions: ResolvedRoute["permissions"];
}

/** Several config problems, each with its path. */
export class ConfigErrors extends Error {
  override readonly name = "ConfigErrors";
  constructor(readonly errors: readonly ConfigError[]) {
    super(errors.map((e) => e.message).join("\n"));
  }
}

const ENV_PREFIX = "TRIBRIDGE__";

/**
 * `TRIBRIDGE__queue__redisUrl=redis://…` sets `queue.redisUrl`. Segments are the config keys as
 * written (case-sensitive); a numeric segment indexes an array. See envValue for the values.
 */
export function applyEnvOverrides(raw: Record<string, unknown>, env: NodeJS.ProcessEnv): void {
  for (const [name, value] of Object.entries(env)) {
    if (!name.startsWith(ENV_PREFIX) || value === undefined) continue;
    const segments = name.slice(ENV_PREFIX.length).split("__");
    let node: Record<string, unknown> = raw;
    segments.slice(0, -1).forEach((seg, i) => {
      const next = node[seg];
      if (typeof next !== "object" || next === null) node[seg] = /^\d+$/.test(segments[i + 1]!) ? [] : {};
      node = node[seg] as Record<string, unknown>;
    });
    node[segments.at(-1)!] = envValue(name, value);
  }
}

/**
 * A value as written, except a plain number, `true`/`false`, or YAML in quotes or brackets
 * (`'"123456"'` for a string of digits, `[a, b]` for a list). Not YAML throughout: a password such
 * as `s3cr3t #42` or `@me:example.org` would be cut at a comment or refused.
 */
function envValue(name: string, value: string): unknown {
  if (/^-?\d+(\.\d+)?$/.test(value)) return Number(value);
  if (value === "true" || value === "false") return value === "true";
  if (!/^\s*["'[{]/.test(value)) return value;
  try {
    return parseYaml(value);
  } catch (err) {
    throw new ConfigError(name, `not valid YAML: ${(err as Error).message.split("\n")[0]}`);
  }
}

/** `passwordFile` → `password`: the key a `*File` key stands for, or undefined. */
export function secretTarget(key: string): string | undefined {
  return key.endsWith("File") && key.length > 4 ? key.slice(0, -4) : undefined;
}

/**
 * `passwordFile: /run/secrets/x` becomes `password: <file contents, trimmed>`, anywhere in the tree.
 * Relative paths are resolved against the config file's folder.
 */
export function resolveSecretFiles(node: unknown, baseDir: string, path: PropertyKey[] = []): void {
  if (Array.isArray(node)) {
    node.forEach((item, i) => resolveSecretFiles(item, baseDir, [...path, i]));
    return;
  }
  if (typeof node !== "object" || node === null) return;
  const obj = node as Record<string, unknown>;
  for (const key of Object.keys(obj)) {
    const value = obj[key];
    const target = secretTarget(key);
    if (target !== undefined && typeof value === "string") {
      if (obj[target] !== undefined) {
        throw new ConfigError(formatPath([...path, key]), `set either ${target} or ${key}, not both`);
      }
      try {
        obj[target] = readFileSync(resolve(baseDir, value), "utf8").trim();
      } catch (err) {
        throw new ConfigError(formatPath([...path, key]), `cannot read ${value}: ${(err as Error).message}`);
      }
      delete obj[key];
    } else {
      resolveSecretFiles(value, baseDir, [...path, key]);
    }
  }
}

export function issuesToErrors(
  issues: readonly z.core.$ZodIssue[],
  prefix: PropertyKey[] = [],
): ConfigError[] {
  return issues.flatMap((issue) =>
    // A typo names the key itself, so the message points at the line to fix.
    issue.code === "unrecognized_keys"
      ? issue.keys.map((key) => new ConfigError(formatPath([...prefix, ...issue.path, key]), "unknown key"))
      : [new ConfigError(formatPath([...prefix, ...issue.path]), issue.message)],
  );
}

/** Two endpoints of one route with one id: the second is refused, saying how to tell them apart. */
function sameIdError(
  at: PropertyKey[],
  explicitId: string | undefined,
  first: { at: string; explicit: boolean },
  identity: { account: string; direction: Direction; key: string },
): ConfigError {
  if (explicitId !== undefined)
    return new ConfigError(formatPath([...at, "id"]), `"${explicitId}" is already the id of ${first.at}`);
  if (first.explicit)
    return new ConfigError(
      formatPath(at),
      `its derived id is the id given to ${first.at}; give this endpoint an explicit id`,
    );
  const key = identity.key.length > 80 ? `${identity.key.slice(0, 80)}…` : identity.key;
  return new ConfigError(
    formatPath(at),
    `the same endpoint as ${first.at} (${identity.account}, ${identity.direction}, ${key}): ` +
      "messages queued for one would be taken for the other; give one of them an explicit id",
  );
}

export type EndpointBase = z.output<typeof endpointBaseSchema>;

/**
 * One endpoint, as the config (or a room's `!tribridge link`) gives it: checked by its connector
 * (`endpointSchema`, `checkEndpoint`), with its id. Or every problem, each with its path under `at`.
 * `accountConfigs`: each account's config, by `<connector>.<account>`.
 */
export function resolveEndpoint(
  ep: EndpointBase,
  at: PropertyKey[],
  routeId: string,
  byName: ReadonlyMap<string, ConnectorDefinition>,
  accountConfigs: ReadonlyMap<string, unknown>,
): { endpoint: ResolvedEndpoint; key: string; explicitId: string | undefined } | { errors: ConfigError[] } {
  const errors: ConfigError[] = [];
  const [connectorName, account] = ep.account.split(".") as [string, string];
  const def = byName.get(connectorName);
  if (!def) {
    const known = [...byName.keys()].join(", ");
    return {
      errors: [
        new ConfigError(
          formatPath([...at, "account"]),
          `unknown bridge "${connectorName}" (known: ${known})`,
        ),
      ],
    };
  }
  const accountConfig = accountConfigs.get(ep.account);
  if (accountConfig === undefined)
    return {
      errors: [
        new ConfigError(
          formatPath([...at, "account"]),
          `no account "${account}" under bridges.${connectorName}`,
        ),
      ],
    };
  const { id: explicitId, account: _a, direction, live, notices, ...fields } = ep;
  if (live && direction === "out")
    errors.push(
      new ConfigError(formatPath([...at, "live"]), 'only for endpoints that relay in ("in" or "inout")'),
    );
  if (notices && direction === "in")
    errors.push(
      new ConfigError(formatPath([...at, "notices"]), 'only for endpoints that relay out ("out" or "inout")'),
    );
  const spec = def.endpointSchema.safeParse(fields);
  if (!spec.success) return { errors: [...errors, ...issuesToErrors(spec.error.issues, at)] };
  for (const [rel, reason] of def.checkEndpoint?.(spec.data, direction, accountConfig) ?? [])
    errors.push(new ConfigError(at.length > 0 ? `${formatPath(at)}.${rel}` : rel, reason));
  if (errors.length > 0) return { errors };
  const key = endpointKeyOf(def, spec.data);
  const id =
    explicitId === undefined
      ? derivedEndpointId(routeId, ep.account, direction, key)
      : explicitEndpointId(routeId, explicitId);
  return {
    endpoint: { id, routeId, connector: def.name, account, direction, live, notices, spec: spec.data },
    key,
    explicitId,
  };
}

/** Validates an already-parsed YAML document. Throws ConfigErrors. */
export function validateConfig(
  raw: unknown,
  connectors: readonly ConnectorDefinition[],
  env: NodeJS.ProcessEnv = {},
  baseDir = process.cwd(),
): Config {
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    throw new ConfigErrors([new ConfigError("", "the config file must be a YAML mapping")]);
  }
  const doc = structuredClone(raw) as Record<string, unknown>;
  try {
    applyEnvOverrides(doc, env);
    resolveSecretFiles(doc, baseDir);
  } catch (err) {
    if (err instanceof ConfigError) throw new ConfigErrors([err]);
    throw err;
  }

  const parsed = buildConfigSchema(connectors).safeParse(doc);
  if (!parsed.success) throw new ConfigErrors(issuesToErrors(parsed.error.issues));
  const cfg = parsed.data;
  const errors: ConfigError[] = [];
  const byName = new Map(connectors.map((c) => [c.name, c]));

  const accounts: ResolvedAccount[] = [];
  const accountConfigs = new Map<string, unknown>();
  for (const def of connectors) {
    const configured = (cfg.bridges as Record<string, Record<string, unknown> | undefined>)[def.name];
    const chosen = configured ?? def.defaultAccounts ?? {};
    for (const [account, config] of Object.entries(chosen)) {
      accounts.push({ connector: def.name, account, config });
      accountConfigs.set(`${def.name}.${account}`, config);
    }
  }

  const routes: ResolvedRoute[] = cfg.routes.map((route, ri) => {
    const endpoints: ResolvedEndpoint[] = [];
    /** The endpoints of this route so far, by id: where each stands, and whether its id was given. */
    const taken = new Map<string, { at: string; explicit: boolean }>();
    route.endpoints.forEach((ep, ei) => {
      const at: PropertyKey[] = ["routes", ri, "endpoints", ei];
      const resolved = resolveEndpoint(ep, at, route.id, byName, accountConfigs);
      if ("errors" in resolved) {
        errors.push(...resolved.errors);
        return;
      }
      const { endpoint, key, explicitId } = resolved;
      const first = taken.get(endpoint.id);
      if (first) {
        errors.push(
          sameIdError(at, explicitId, first, { account: ep.account, direction: endpoint.direction, key }),
        );
        return;
      }
      taken.set(endpoint.id, { at: formatPath(at), explicit: explicitId !== undefined });
      endpoints.push(endpoint);
    });
    // A private room nobody is invited to is one nobody can get into.
    const invite = route.invite ?? cfg.appservice.admins.filter((admin) => !admin.startsWith("@*:"));
    const permissions = route.permissions
      ? { ...route.permissions, key: `routes[${ri}].permissions` }
      : { ...cfg.permissions, key: "permissions" };
    const feedback = { ...cfg.feedback, ...definedOnly(route.feedback ?? {}) };
    return { id: route.id, room: route.room, invite, endpoints, permissions, feedback };
  });
  const { appservice } = cfg;
  if (appservice.url === undefined && ["0.0.0.0", "::", "[::]"].includes(appservice.bind))
    errors.push(
      new ConfigError(
        "appservice.url",
        `is required with bind ${appservice.bind}: the homeserver cannot reach that address; set the URL it ` +
          "reaches tribridge at, e.g. http://tribridge:9993",
      ),
    );
  if (errors.length > 0) throw new ConfigErrors(errors);

  return {
    homeserver: cfg.homeserver,
    appservice: { ...appservice, url: appservice.url ?? `http://${appservice.bind}:${appservice.port}` },
    queue: cfg.queue,
    metrics: cfg.metrics,
    encryption: cfg.encryption,
    feedback: cfg.feedback,
    dataDir: resolve(baseDir, cfg.dataDir),
    accounts,
    routes,
    permissions: { ...cfg.permissions, key: "permissions" },
  };
}

/**
 * Reads and validates a config file. Throws ConfigErrors naming the path of every problem.
 * `optional`: a missing file counts as an empty one (the quick start: flags and environment give
 * the rest). `patch` is applied on top of the file (command-line flags).
 */
export function loadConfig(
  file: string,
  connectors: readonly ConnectorDefinition[],
  env: NodeJS.ProcessEnv = process.env,
  options: { optional?: boolean; patch?: (raw: Record<string, unknown>) => void } = {},
): Config {
  let text = "";
  if (existsSync(file)) {
    try {
      text = readFileSync(file, "utf8");
    } catch (err) {
      throw new ConfigErrors([
        new ConfigError("", `cannot read config file ${file}: ${(err as Error).message}`),
      ]);
    }
  } else if (!options.optional) {
    throw new ConfigErrors([new ConfigError("", `config file ${file} does not exist`)]);
  }
  let raw: unknown;
  try {
    raw = parseYaml(text) ?? {};
  } catch (err) {
    const where = err instanceof YAMLParseError && err.linePos ? ` (line ${err.linePos[0].line})` : "";
    throw new ConfigErrors([
      new ConfigError("", `${file} is not valid YAML${where}: ${(err as Error).message.split("\n")[0]}`),
    ]);
  }
  if (options.patch && typeof raw === "object" && raw !== null && !Array.isArray(raw)) {
    options.patch(raw as Record<string, unknown>);
  }
  return validateConfig(raw, connectors, env, dirname(resolve(file)));
}

/** The keys of `o` that have a value (a spread of it then overrides only those). */
function definedOnly<T extends object>(o: T): { [K in keyof T]?: Exclude<T[K], undefined> } {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as {
    [K in keyof T]?: Exclude<T[K], undefined>;
  };
}
