/** What a reload tells apart: keys that apply at once, keys that need a restart; the route table updated in place. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { connectors } from "../../bridges/index.js";
import { appendFileSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { changedKeys, fileAtRest } from "../../src/config/reload.js";
import { ConfigErrors, validateConfig } from "../../src/config/load.js";
import { RouteTable } from "../../src/routing/route-table.js";
import { splitArgs } from "../../src/routing/room-links.js";

const base = {
  homeserver: { url: "http://localhost:8008", domain: "example.org" },
  bridges: { mqtt: { home: { embedded: { port: 1883 } } } },
  routes: [
    {
      id: "lab",
      room: "#lab:example.org",
      endpoints: [{ account: "mqtt.home", direction: "in", topic: "lab/+/t" }],
    },
  ],
};
const config = (more: Record<string, unknown> = {}) => validateConfig({ ...base, ...more }, connectors);

test("changedKeys: routes and admins by name, every other change by its key", () => {
  assert.deepEqual(changedKeys(config(), config()), []);
  const routes = [{ ...base.routes[0], room: "#lab2:example.org" }];
  assert.deepEqual(changedKeys(config(), config({ routes })), ["routes"]);
  assert.deepEqual(
    changedKeys(
      config(),
      config({
        appservice: { admins: ["@alice:example.org"], port: 9000 },
        queue: { shards: 8 },
        bridges: { mqtt: { home: { embedded: { port: 1884 } }, office: { url: "mqtt://broker" } } },
      }),
    ),
    // The admins are also the default invite list of a route's room: the route changes with them.
    [
      "appservice.port",
      "appservice.admins",
      "appservice.url",
      "queue.shards",
      "bridges.mqtt.home",
      "bridges.mqtt.office",
      "routes",
    ],
  );
});

test("RouteTable.update: endpoints of the new routes, room ids learnt kept where the room is the same", () => {
  const before = config();
  const table = new RouteTable(before.routes);
  table.setRoomId("lab", "!lab:example.org");
  const endpointId = before.routes[0]!.endpoints[0]!.id;
  const added = {
    id: "more",
    room: "!more:example.org",
    endpoints: [{ account: "mqtt.home", direction: "out", topic: "more/cmd" }],
  };
  const after = config({ routes: [added, base.routes[0]] });
  table.update(after.routes);
  assert.equal(table.roomIdOf("lab"), "!lab:example.org", "learnt, kept");
  assert.equal(table.inbound(endpointId)?.route.id, "lab", "the same endpoint id");
  assert.deepEqual(
    table.outboundForRoom("!more:example.org").map((e) => e.routeId),
    ["more"],
  );
  const moved = config({ routes: [{ ...base.routes[0], room: "#elsewhere:example.org" }] });
  table.update(moved.routes);
  assert.equal(table.roomIdOf("lab"), undefined, "another room: learnt again");
  assert.equal(table.isRouteRoom("!more:example.org"), false);
});

test("splitArgs: white space outside quotes separates; quotes make a value text", () => {
  assert.deepEqual(splitArgs(` mqtt.home  a/b   subject="[lab] alerts" qos=1 name='x y'`), [
    { value: "mqtt.home", quoted: false },
    { value: "a/b", quoted: false },
    { value: "subject=[lab] alerts", quoted: true },
    { value: "qos=1", quoted: false },
    { value: "name=x y", quoted: true },
  ]);
  assert.deepEqual(splitArgs(""), []);
  assert.deepEqual(splitArgs(`token=""`), [{ value: "token=", quoted: true }]);
});

test("fileAtRest: waits while the file is being written; gives up, saying so, on one that never settles", async () => {
  const file = join(mkdtempSync(join(tmpdir(), "tribridge-at-rest-")), "config.yaml");
  writeFileSync(file, "homeserver:\n");
  let writing = true;
  const writer = (async () => {
    for (let i = 0; writing; i++) {
      appendFileSync(file, `  # line ${i}\n`);
      await sleep(20);
    }
  })();
  const started = performance.now();
  setTimeout(() => (writing = false), 300);
  await fileAtRest(file, 100, 5000);
  assert.ok(performance.now() - started >= 300, "not before the writer stopped");
  await writer;

  writing = true;
  const endless = (async () => {
    for (let i = 0; writing; i++) {
      appendFileSync(file, `  # more ${i}\n`);
      await sleep(20);
    }
  })();
  await assert.rejects(fileAtRest(file, 100, 300), (err: unknown) => {
    assert.ok(err instanceof ConfigErrors);
    assert.match(err.errors[0]!.message, /kept changing for 300 ms \(still being written\?\); not read/);
    return true;
  });
  writing = false;
  await endless;
  await fileAtRest(join(file, "..", "absent.yaml"), 10, 100); // the loader says it is missing
});
