/**
 * The appservice registration file: generated once (random tokens), given to the homeserver, and
 * read by tribridge at start.
 */
import { chmodSync, existsSync, readFileSync, writeFileSync } from "node:fs";
import { AppServiceRegistration } from "matrix-appservice-bridge";
import { parse as parseYaml, stringify as stringifyYaml } from "yaml";
import type { ConnectorDefinition } from "../connector.js";
import { ConfigError } from "../errors.js";
import type { Config } from "../config/load.js";
import { escapeRegex, ghostUserId, namespaceRegexes, readerUserId } from "./ids.js";

export interface Registration {
  id: string;
  url: string | null;
  as_token: string;
  hs_token: string;
  sender_localpart: string;
  rate_limited: boolean;
  namespaces: {
    users: { exclusive: boolean; regex: string }[];
    aliases: { exclusive: boolean; regex: string }[];
    rooms: { exclusive: boolean; regex: string }[];
  };
  "de.sorunome.msc2409.push_ephemeral"?: boolean;
  /** MSC2409 (stable name): ephemeral events and, with MSC2409's to-device part, to-device messages. */
  receive_ephemeral?: boolean;
  /** MSC3202: device lists and one-time key counts in transactions, device masquerading. */
  "org.matrix.msc3202"?: boolean;
  /** MSC4190: devices made by the appservice with PUT /devices/{deviceId}. */
  "io.element.msc4190"?: boolean;
}

/**
 * The aliases of route rooms on our own server, as alias namespaces: a homeserver lets an
 * appservice create a room with an alias only inside its namespaces (Synapse and continuwuity
 * answer M_EXCLUSIVE otherwise). Not exclusive: people may still create such aliases themselves.
 */
function routeAliasNamespaces(config: Pick<Config, "homeserver" | "routes">): string[] {
  const own = `:${config.homeserver.domain}`;
  const aliases = config.routes
    .map((r) => r.room)
    .filter((room) => room.startsWith("#") && room.endsWith(own));
  return [...new Set(aliases)].map((alias) => `^${escapeRegex(alias)}$`);
}

export function buildRegistration(
  config: Pick<Config, "appservice" | "homeserver" | "routes" | "encryption">,
  connectors: readonly ConnectorDefinition[],
  id = "tribridge",
): Registration {
  const reg = new AppServiceRegistration(config.appservice.url);
  reg.setId(id);
  reg.setHomeserverToken(AppServiceRegistration.generateToken());
  reg.setAppServiceToken(AppServiceRegistration.generateToken());
  reg.setSenderLocalpart(config.appservice.botLocalpart);
  const naming = { ...config.appservice, domain: config.homeserver.domain };
  const regexes = namespaceRegexes(naming, connectors);
  if (config.encryption.enabled) regexes.push(`^${escapeRegex(readerUserId(naming))}$`);
  for (const regex of regexes) reg.addRegexPattern("users", regex, true);
  const out = reg.getOutput();
  return {
    id: out.id,
    url: out.url ?? null,
    as_token: out.as_token,
    hs_token: out.hs_token,
    sender_localpart: out.sender_localpart,
    // Written explicitly: Synapse defaults rate_limited to true; continuwuity rejects a file without namespaces.
    rate_limited: false,
    namespaces: {
      users: regexes.map((regex) => ({ exclusive: true, regex })),
      aliases: routeAliasNamespaces(config).map((regex) => ({ exclusive: false, regex })),
      rooms: [],
    },
    ...encryptionKeys(config.encryption),
  };
}

/** What end-to-end encryption asks of the homeserver (docs/encryption.md). */
function encryptionKeys(e: Config["encryption"]): Partial<Registration> {
  if (!e.enabled) return {};
  const keys: Partial<Registration> = {};
  if (e.feed === "transactions") {
    keys.receive_ephemeral = true;
    keys["de.sorunome.msc2409.push_ephemeral"] = true;
    keys["org.matrix.msc3202"] = true;
  }
  if (e.deviceCreation === "msc4190") keys["io.element.msc4190"] = true;
  return keys;
}

export function registrationYaml(reg: Registration): string {
  return stringifyYaml(reg, { lineWidth: 0 });
}

export function writeRegistration(file: string, reg: Registration): void {
  const header =
    "# Written by tribridge: these tokens are secrets. Register this file with the homeserver.\n";
  // `mode` applies only to a new file, and this may replace the sample: private before the tokens.
  if (existsSync(file)) chmodSync(file, 0o600);
  writeFileSync(file, header + registrationYaml(reg), { mode: 0o600 });
}

const PLACEHOLDER_TOKEN = /^(CHANGE_ME|placeholder)/i;

/**
 * Whether `file` holds a registration of its own: it exists and its tokens are not the committed
 * sample's placeholders (which `start` and `generate-registration` replace without --force).
 */
export function registrationExists(file: string): boolean {
  if (!existsSync(file)) return false;
  try {
    const r = parseYaml(readFileSync(file, "utf8")) as Partial<Registration> | null;
    return !PLACEHOLDER_TOKEN.test(String(r?.as_token)) || !PLACEHOLDER_TOKEN.test(String(r?.hs_token));
  } catch {
    return true; // unreadable: loadRegistration says why
  }
}

export function loadRegistration(file: string): Registration {
  let raw: unknown;
  try {
    raw = parseYaml(readFileSync(file, "utf8"));
  } catch (err) {
    throw new ConfigError("", `cannot read registration ${file}: ${(err as Error).message}`);
  }
  const r = raw as Partial<Registration> | null;
  for (const key of ["id", "as_token", "hs_token", "sender_localpart"] as const) {
    if (typeof r?.[key] !== "string" || r[key] === "") {
      throw new ConfigError(key, `missing in registration ${file} (run: tribridge generate-registration)`);
    }
  }
  if (PLACEHOLDER_TOKEN.test(r!.as_token!) || PLACEHOLDER_TOKEN.test(r!.hs_token!)) {
    throw new ConfigError(
      "as_token",
      `registration ${file} holds placeholder tokens (run: tribridge generate-registration)`,
    );
  }
  return r as Registration;
}

/**
 * Why this registration cannot serve this config, if it cannot: the bot or the ghosts the config
 * names fall outside it (botLocalpart, ghostPrefix or the domain changed since it was generated).
 * The homeserver would refuse every request as them.
 */
export function registrationMismatch(
  reg: Registration,
  config: Pick<Config, "appservice" | "homeserver" | "encryption">,
  connectors: readonly ConnectorDefinition[],
): string | undefined {
  const found = registrationProblem(reg, config, connectors);
  return found && `${found.problem}: ${found.fix}`;
}

/** registrationMismatch, with the problem and what to do about it apart (for `tribridge doctor`). */
export function registrationProblem(
  reg: Registration,
  config: Pick<Config, "appservice" | "homeserver" | "encryption">,
  connectors: readonly ConnectorDefinition[],
): { problem: string; fix: string } | undefined {
  const { domain } = config.homeserver;
  const fix = "run `tribridge generate-registration --force` and register the new file with the homeserver";
  if (reg.sender_localpart !== config.appservice.botLocalpart)
    return {
      problem: `its sender_localpart is ${reg.sender_localpart}, the config's appservice.botLocalpart ${config.appservice.botLocalpart}`,
      fix,
    };
  const users = reg.namespaces.users.map((n) => new RegExp(n.regex));
  const naming = { ghostPrefix: config.appservice.ghostPrefix, domain };
  for (const c of connectors) {
    const ghost = ghostUserId(naming, c.ghostTag, "account", "device");
    if (!users.some((re) => re.test(ghost)))
      return {
        problem: `ghosts such as ${ghost} are outside its user namespaces (appservice.ghostPrefix or homeserver.domain changed?)`,
        fix,
      };
  }
  const reader = readerUserId(naming);
  if (config.encryption.enabled && !users.some((re) => re.test(reader)))
    return { problem: `encryption.enabled needs its reader ${reader} in the user namespaces`, fix };
  return undefined;
}

/** The message to paste in continuwuity's / conduwuit's admin room. */
export function continuwuityInstructions(reg: Registration): string {
  return ["!admin appservices register", "```", registrationYaml(reg).trimEnd(), "```"].join("\n");
}

export function synapseInstructions(file: string): string {
  return ["# homeserver.yaml (then restart Synapse):", "app_service_config_files:", `  - ${file}`].join("\n");
}
