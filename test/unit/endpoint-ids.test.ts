/**
 * Endpoint identity: ids that survive reordering and insertion, explicit ids, identities refused
 * when two endpoints of a route share one, the default key of a connector without endpointKey,
 * and how positional ids written by earlier versions are read.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { Redis } from "ioredis";
import { z } from "zod";
import { connectors } from "../../bridges/index.js";
import { ConfigErrors, validateConfig, type ResolvedRoute } from "../../src/config/load.js";
import { canonicalJson, routeIdOf } from "../../src/config/endpoint-ids.js";
import type { ConnectorDefinition } from "../../src/connector.js";
import { PermanentError } from "../../src/errors.js";
import { layoutOf, legacyPosition, recordedEndpointLayout } from "../../src/routing/legacy-endpoint-ids.js";
import { RouteTable } from "../../src/routing/route-table.js";
import { REDIS_URL, deleteKeys } from "../helpers/fixture.js";

const base = { homeserver: { url: "http://hs:8008", domain: "example.org" } };

/** A test connector without endpointKey: its endpoints are told apart by all of their fields. */
const plainConnector: ConnectorDefinition<{ host: string }, { address: string; label?: string }> = {
  name: "plain",
  ghostTag: "plain",
  description: "a connector for tests",
  capabilities: { html: false, attachments: false },
  accountSchema: z.strictObject({ host: z.string() }),
  endpointSchema: z.strictObject({ address: z.string(), label: z.string().optional() }),
  create: () => {
    throw new Error("not started in these tests");
  },
};
const withPlain = [...connectors, plainConnector as ConnectorDefinition];

function routesOf(endpoints: Record<string, unknown>[], more: readonly ConnectorDefinition[] = connectors) {
  return validateConfig(
    {
      ...base,
      bridges: {
        mqtt: { home: { embedded: {} } },
        ...(more === withPlain && { plain: { a: { host: "h" } } }),
      },
      routes: [{ id: "lab", room: "#lab:example.org", endpoints }],
    },
    more,
  ).routes;
}

function idsOf(endpoints: Record<string, unknown>[], more?: readonly ConnectorDefinition[]): string[] {
  return routesOf(endpoints, more)[0]!.endpoints.map((e) => e.id);
}

function configErrors(endpoints: Record<string, unknown>[], more?: readonly ConnectorDefinition[]): string[] {
  try {
    routesOf(endpoints, more);
  } catch (err) {
    if (err instanceof ConfigErrors) return err.errors.map((e) => e.message);
    throw err;
  }
  assert.fail("the config was accepted");
}

const x = { account: "mqtt.home", direction: "out", topic: "lab/x" };
const y = { account: "mqtt.home", direction: "out", topic: "lab/y" };
const z_ = { account: "mqtt.home", direction: "in", topic: "lab/+/t" };

test("endpoint ids do not depend on the position: the same under reordering and insertion", () => {
  const [idX, idY] = idsOf([x, y]);
  const [idZ, idY2, idX2] = idsOf([z_, y, x]);
  assert.equal(idX2, idX);
  assert.equal(idY2, idY);
  assert.equal(new Set([idX, idY, idZ]).size, 3);
  for (const id of [idX!, idY!, idZ!]) {
    assert.match(id, /^lab\.[0-9a-f]{8}$/, "short, readable, no ':'");
    assert.equal(legacyPosition(id), undefined, "never read as an earlier version's position");
    assert.equal(routeIdOf(id), "lab");
  }
});

test("MQTT: the topic, account and direction identify an endpoint; qos, format and the like do not", () => {
  const [id] = idsOf([x]);
  assert.equal(idsOf([{ ...x, qos: 2, retain: true, format: "json" }])[0], id);
  assert.notEqual(idsOf([{ ...x, topic: "lab/x2" }])[0], id);
  assert.notEqual(idsOf([{ ...x, direction: "inout" }])[0], id);
  const [inX, outX] = idsOf([{ ...x, direction: "in" }, x]);
  assert.notEqual(inX, outX, "one topic in and out: two endpoints");
});

test("an explicit id: <route>.<id>, kept when the topic changes; unique within its route", () => {
  assert.deepEqual(idsOf([{ ...x, id: "commands" }, y]).slice(0, 1), ["lab.commands"]);
  assert.deepEqual(idsOf([y, { ...x, topic: "lab/x2", id: "commands" }]).slice(1), ["lab.commands"]);
  assert.deepEqual(
    configErrors([
      { ...x, id: "commands" },
      { ...y, id: "commands" },
    ]),
    ['routes[0].endpoints[1].id: "commands" is already the id of routes[0].endpoints[0]'],
  );
  // The same id in another route is another endpoint.
  const cfg = validateConfig(
    {
      ...base,
      bridges: { mqtt: { home: { embedded: {} } } },
      routes: ["a", "b"].map((id) => ({ id, room: `#${id}:example.org`, endpoints: [{ ...x, id: "cmd" }] })),
    },
    connectors,
  );
  assert.deepEqual(
    cfg.routes.map((r) => r.endpoints[0]!.id),
    ["a.cmd", "b.cmd"],
  );
});

test("an explicit id: letters, digits, _ and -, starting with a letter (so never a position), no ':'", () => {
  for (const id of ["a:b", "1", "07", "Commands", "", "a.b", "x".repeat(65)])
    assert.deepEqual(
      configErrors([{ ...x, id }]),
      ["routes[0].endpoints[0].id: a lower-case letter, then letters, digits, _ and - (at most 64)"],
      JSON.stringify(id),
    );
  assert.deepEqual(idsOf([{ ...x, id: "a1_b-c" }]), ["lab.a1_b-c"]);
});

test("two endpoints of a route with one identity: refused at the second, asking for an explicit id", () => {
  assert.deepEqual(configErrors([z_, x, { ...x, qos: 0, format: "json" }]), [
    "routes[0].endpoints[2]: the same endpoint as routes[0].endpoints[1] (mqtt.home, out, lab/x): " +
      "messages queued for one would be taken for the other; give one of them an explicit id",
  ]);
  assert.equal(idsOf([x, { ...x, qos: 0, format: "json", id: "json" }]).length, 2);
});

test("a connector without endpointKey: all of its endpoint, as canonical JSON, identifies it", () => {
  const a = { account: "plain.a", direction: "out", address: "a@x" };
  const [id] = idsOf([a], withPlain);
  assert.equal(idsOf([y, { label: "L", ...a }], withPlain)[1] === id, false, "a label makes another one");
  assert.equal(idsOf([{ direction: "out", address: "a@x", account: "plain.a" }], withPlain)[0], id);
  assert.deepEqual(configErrors([a, { ...a, notices: true }], withPlain), [
    "routes[0].endpoints[1]: the same endpoint as routes[0].endpoints[0] (plain.a, out, " +
      '{"address":"a@x"}): messages queued for one would be taken for the other; give one of them ' +
      "an explicit id",
  ]);
});

test("canonicalJson: key order does not matter, at any depth; arrays keep theirs", () => {
  assert.equal(
    canonicalJson({ b: 1, a: { d: [2, { f: 1, e: 0 }], c: null } }),
    '{"a":{"c":null,"d":[2,{"e":0,"f":1}]},"b":1}',
  );
  assert.equal(canonicalJson({ a: 1, b: 2 }), canonicalJson({ b: 2, a: 1 }));
  assert.notEqual(canonicalJson([1, 2]), canonicalJson([2, 1]));
  assert.equal(canonicalJson({ a: undefined, b: 1 }), '{"b":1}');
});

// --- ids written by earlier versions (<route>.<index>) ---------------------------------------------

test("legacyPosition: <route>.<index> as earlier versions wrote it, and nothing else", () => {
  assert.deepEqual(legacyPosition("lab.0"), { routeId: "lab", index: 0 });
  assert.deepEqual(legacyPosition("my-route_2.12"), { routeId: "my-route_2", index: 12 });
  for (const id of ["lab.01", "lab.12345678", "lab.commands", "lab", "lab.1.2", "lab.-1"])
    assert.equal(legacyPosition(id), undefined, id);
});

test("a positional id is read against the endpoints recorded at the first start, not today's", async () => {
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  const redis = new Redis(REDIS_URL);
  try {
    const before = routesOf([x, y]);
    const [idX, idY] = before[0]!.endpoints.map((e) => e.id);
    assert.deepEqual(await recordedEndpointLayout(redis, prefix, before), layoutOf(before));
    // Reordered, with an endpoint inserted, after the first start: positions still mean the old ones.
    const after = routesOf([z_, y, x]);
    const layout = await recordedEndpointLayout(redis, prefix, after);
    assert.deepEqual(layout, layoutOf(before));
    const table = new RouteTable(after, layout);
    assert.equal(table.queuedOutbound("lab.0", "mqtt").id, idX);
    assert.equal(table.queuedOutbound("lab.1", "mqtt").id, idY);
    assert.equal(table.queuedOutbound(idX!, "mqtt").id, idX);
    assert.throws(
      () => table.queuedOutbound("lab.2", "mqtt"),
      new PermanentError(
        "endpoint lab.2 names an endpoint by its position (an id written by an earlier version), and " +
          "route lab had no endpoint at position 2 when this version first started: cannot tell which " +
          "endpoint it was meant for",
      ),
    );
    // Into Matrix: the endpoint recorded there relays out, so it cannot be the one.
    assert.throws(
      () => table.queuedInbound("lab.0", { connector: "mqtt", account: "home" }),
      (err: unknown) =>
        err instanceof PermanentError &&
        err.message.includes(`(${idX}: mqtt.home, out) cannot carry it: cannot tell which endpoint`),
    );
    // Recorded, but not configured any more: waits in the failed list until it is back.
    const withoutX = new RouteTable(routesOf([z_, y]), layout);
    assert.throws(
      () => withoutX.queuedOutbound("lab.0", "mqtt"),
      new PermanentError(`endpoint ${idX} (queued as lab.0 by an earlier version) is no longer configured`),
    );
    assert.throws(
      () => withoutX.queuedOutbound(idX!, "mqtt"),
      new PermanentError(`endpoint ${idX} is no longer configured`),
    );
  } finally {
    redis.disconnect();
    await deleteKeys(prefix);
  }
});

test("queued items into Matrix: a positional id resolves only to an inbound endpoint of its account", () => {
  const routes: readonly ResolvedRoute[] = routesOf([z_, x]);
  const table = new RouteTable(routes, layoutOf(routes));
  const home = { connector: "mqtt", account: "home" };
  assert.equal(table.queuedInbound("lab.0", home).endpoint.id, routes[0]!.endpoints[0]!.id);
  assert.throws(() => table.queuedInbound("lab.0", { ...home, account: "other" }), PermanentError);
  assert.throws(
    () => table.queuedInbound(routes[0]!.endpoints[1]!.id, home),
    new PermanentError(`endpoint ${routes[0]!.endpoints[1]!.id} no longer relays into Matrix`),
  );
});
