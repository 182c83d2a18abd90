/**
 * Generates config/config.sample.yaml and config/config.schema.json from the schema, so the
 * documentation cannot drift from the code. `npm run gen:config` writes them; the test command checks
 * that the committed files are fresh.
 */
import { z } from "zod";
import { Document, isMap, isSeq, type Node } from "yaml";
import type { ConnectorDefinition } from "../connector.js";
import { secretTarget } from "./load.js";
import { buildConfigSchema } from "./schema.js";

type JsonSchema = {
  description?: string;
  type?: string;
  required?: string[];
  allOf?: JsonSchema[];
  properties?: Record<string, JsonSchema>;
  items?: JsonSchema;
  additionalProperties?: JsonSchema | boolean;
  anyOf?: JsonSchema[];
  default?: unknown;
};

/** A complete, working example; the sample file is this plus every default, with comments. */
export const SAMPLE_CONFIG = {
  homeserver: { url: "http://localhost:8008", domain: "example.org" },
  appservice: {},
  queue: {},
  bridges: {
    mqtt: {
      home: {
        embedded: {
          host: "0.0.0.0",
          users: [
            {
              username: "greenhouse-sensor",
              passwordFile: "/run/secrets/greenhouse-sensor",
              publish: ["greenhouse/#"],
              subscribe: ["greenhouse/commands"],
            },
          ],
        },
      },
    },
  },
  routes: [
    {
      id: "greenhouse",
      room: "#greenhouse:example.org",
      endpoints: [
        {
          account: "mqtt.home",
          direction: "in",
          topic: "greenhouse/+/temperature",
          format: "json",
          template: "{{value}} °C",
          sender: { topicLevel: 2 },
          live: true,
        },
        { account: "mqtt.home", direction: "out", topic: "greenhouse/commands", qos: 1 },
      ],
    },
  ],
};

export function configJsonSchema(connectors: readonly ConnectorDefinition[]): Record<string, unknown> {
  const schema = z.toJSONSchema(buildConfigSchema(connectors), {
    io: "input",
    unrepresentable: "any",
  }) as JsonSchema;
  allowSecretFiles(schema);
  return { ...schema, title: "tribridge config.yaml" };
}

/**
 * Every string key may come from a file instead (`<key>File`, see resolveSecretFiles): the schema
 * says so, or editors would flag the sample's own `passwordFile`. A required key is then satisfied
 * by either.
 */
function allowSecretFiles(schema: JsonSchema | undefined): void {
  if (!schema || typeof schema !== "object") return;
  for (const sub of [
    ...Object.values(schema.properties ?? {}),
    ...(schema.anyOf ?? []),
    ...(schema.allOf ?? []),
    ...(schema.items ? [schema.items] : []),
    ...(typeof schema.additionalProperties === "object" ? [schema.additionalProperties] : []),
  ])
    allowSecretFiles(sub);
  const props = schema.properties;
  if (!props) return;
  const secrets = Object.keys(props).filter((key) => props[key]!.type === "string" && !props[`${key}File`]);
  for (const key of secrets) {
    props[`${key}File`] = { type: "string", description: `Read ${key} from this file (trimmed)` };
  }
  const requiredSecrets = (schema.required ?? []).filter((key) => secrets.includes(key));
  if (requiredSecrets.length === 0) return;
  schema.required = schema.required!.filter((key) => !requiredSecrets.includes(key));
  schema.allOf = [
    ...(schema.allOf ?? []),
    ...requiredSecrets.map((key) => ({ anyOf: [{ required: [key] }, { required: [`${key}File`] }] })),
  ];
}

function childSchema(schema: JsonSchema | undefined, key: string | number): JsonSchema | undefined {
  if (!schema) return undefined;
  const options = schema.anyOf ?? [schema];
  for (const s of options) {
    if (typeof key === "number" && s.items) return s.items;
    if (typeof key === "string") {
      if (s.properties?.[key]) return s.properties[key];
      if (typeof s.additionalProperties === "object") return s.additionalProperties;
    }
  }
  return undefined;
}

function annotate(node: Node | null | undefined, schema: JsonSchema | undefined): void {
  if (isMap(node)) {
    for (const pair of node.items) {
      const key = String((pair.key as { value?: unknown }).value ?? pair.key);
      const sub = childSchema(schema, key);
      const description = sub?.description ?? (sub?.anyOf ?? []).find((s) => s.description)?.description;
      if (description && pair.key && typeof pair.key === "object") {
        (pair.key as Node).commentBefore = ` ${description}`;
      }
      annotate(pair.value as Node, sub);
    }
  } else if (isSeq(node)) {
    node.items.forEach((item, i) => annotate(item as Node, childSchema(schema, i)));
  }
}

/**
 * The sample as the schema sees it: each `<key>File: path` stands in as `<key>: path`, so the
 * sample validates without reading any file.
 */
export function sampleConfigInline(node: unknown = SAMPLE_CONFIG): unknown {
  if (Array.isArray(node)) return node.map((item) => sampleConfigInline(item));
  if (typeof node !== "object" || node === null) return node;
  return Object.fromEntries(
    Object.entries(node).map(([key, value]) => [secretTarget(key) ?? key, sampleConfigInline(value)]),
  );
}

/** Puts the sample's `<key>File` keys back in place of the inline values `sampleConfigInline` made. */
function restoreSecretFiles(parsed: unknown, sample: unknown): unknown {
  if (Array.isArray(parsed))
    return parsed.map((item, i) => restoreSecretFiles(item, (sample as unknown[])?.[i]));
  if (typeof parsed !== "object" || parsed === null) return parsed;
  const written = (sample ?? {}) as Record<string, unknown>;
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(parsed)) {
    const fileKey = `${key}File`;
    if (fileKey in written) out[fileKey] = written[fileKey];
    else out[key] = restoreSecretFiles(value, written[key]);
  }
  return out;
}

export function sampleConfigYaml(connectors: readonly ConnectorDefinition[]): string {
  const withDefaults = buildConfigSchema(connectors).parse(sampleConfigInline());
  const shown = restoreSecretFiles(withDefaults, SAMPLE_CONFIG);
  const doc = new Document(shown);
  annotate(doc.contents, configJsonSchema(connectors) as JsonSchema);
  doc.commentBefore = [
    " tribridge sample configuration — generated by `npm run gen:config`; do not edit by hand.",
    " Every key is listed with its default. Secrets: any `<key>File: /path` reads <key> from a file;",
    " environment variables TRIBRIDGE__<path>__<to>__<key> override keys (e.g. TRIBRIDGE__queue__redisUrl).",
  ].join("\n");
  return doc.toString({ lineWidth: 0 });
}
