import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { copyFileSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Ajv2020 } from "ajv/dist/2020.js";
import { parse as parseYaml } from "yaml";
import { connectors } from "../../bridges/index.js";
import { ConfigErrors, loadConfig, validateConfig } from "../../src/config/load.js";
import { sampleConfig } from "../../src/config/generate.js";

const BAD = "test/fixtures/bad-configs";

/** Each broken config gives exactly this message (path: reason). */
const cases: [file: string, message: string][] = [
  ["out-wildcard.yaml", 'routes[2].endpoints[0].topic: wildcards are not allowed for direction "out"'],
  ["bad-port.yaml", "appservice.port: Too big: expected number to be <=65535"],
  ["unknown-account.yaml", 'routes[0].endpoints[0].account: no account "office" under bridges.mqtt'],
  ["missing-homeserver.yaml", "homeserver: is required: set homeserver.url and homeserver.domain"],
  ["bad-room.yaml", "routes[0].room: must be a room alias (#name:server) or a room id (!id:server)"],
  [
    "open-broker.yaml",
    "bridges.mqtt.home.embedded.users: a broker listening on 0.0.0.0 needs users (or allowAnonymous: true)",
  ],
  ["typo-key.yaml", "queue.redisURL: unknown key"],
  ["bad-admin.yaml", "appservice.admins[0]: must be a user id, or @*:<server> for every user of a server"],
  [
    "wildcard-bind.yaml",
    "appservice.url: is required with bind 0.0.0.0: the homeserver cannot reach that address; set the URL it reaches tribridge at, e.g. http://tribridge:9993",
  ],
  ["notices-in.yaml", 'routes[0].endpoints[0].notices: only for endpoints that relay out ("out" or "inout")'],
  ["live-out.yaml", 'routes[0].endpoints[1].live: only for endpoints that relay in ("in" or "inout")'],
];

for (const [file, message] of cases) {
  test(`config ${file}: one message naming the path`, () => {
    assert.throws(
      () => loadConfig(join(BAD, file), connectors, {}),
      (err: unknown) => {
        assert.ok(err instanceof ConfigErrors);
        assert.deepEqual(
          err.errors.map((e) => e.message),
          [message],
        );
        return true;
      },
    );
  });
}

test("validate-config exits non-zero and prints the path for each broken config", () => {
  for (const [file, message] of cases.slice(0, 5)) {
    const r = spawnSync(
      process.execPath,
      ["--import", "tsx", "src/index.ts", "validate-config", "-c", join(BAD, file)],
      {
        encoding: "utf8",
      },
    );
    assert.equal(r.status, 1, `${file}: exit code`);
    assert.equal(r.stderr.trim(), `config error: ${message}`);
  }
});

test("room ids of room version 12 (no server part) are accepted; '=' in the bot's localpart is not", () => {
  const base = { homeserver: { url: "http://hs:8008", domain: "example.org" } };
  const route = (room: string) => ({
    id: "r",
    room,
    endpoints: [{ account: "mqtt.default", direction: "in", topic: "t" }],
  });
  for (const room of ["!31hneApxJ_1o-63DmFrpeqnkFfWppnzWso1JvH3ogLM", "!abc:example.org", "#a:example.org"])
    assert.doesNotThrow(() => validateConfig({ ...base, routes: [route(room)] }, connectors), room);
  // Synapse refuses a registration whose sender_localpart changes when URL-quoted.
  assert.throws(
    () => validateConfig({ ...base, appservice: { botLocalpart: "bot=1" } }, connectors),
    /appservice\.botLocalpart: must be a Matrix localpart/,
  );
});

test("a responseTopic on an MQTT 3.1.1 or embedded account is a config error naming the endpoint's key", () => {
  const base = { homeserver: { url: "http://hs:8008", domain: "example.org" } };
  const config = (account: Record<string, unknown>) => ({
    ...base,
    bridges: { mqtt: { lab: account } },
    routes: [
      {
        id: "r",
        room: "#r:example.org",
        endpoints: [{ account: "mqtt.lab", direction: "out", topic: "a/set", responseTopic: "a/response" }],
      },
    ],
  });
  assert.doesNotThrow(() => validateConfig(config({ url: "mqtt://broker", protocolVersion: 5 }), connectors));
  assert.throws(
    () => validateConfig(config({ url: "mqtt://broker", protocolVersion: 4 }), connectors),
    /routes\[0\]\.endpoints\[0\]\.responseTopic: needs protocolVersion: 5 on the account/,
  );
  assert.throws(
    () => validateConfig(config({ embedded: { port: 0 } }), connectors),
    /routes\[0\]\.endpoints\[0\]\.responseTopic: the embedded broker speaks MQTT 3\.1\.1/,
  );
});

test("a route's room is created inviting the admins (user ids, not server globs) unless it says whom", () => {
  const base = {
    homeserver: { url: "http://hs:8008", domain: "example.org" },
    appservice: { admins: ["@ann:example.org", "@*:example.org"] },
  };
  const route = (invite?: string[]) => ({
    id: "r",
    room: "#r:example.org",
    ...(invite && { invite }),
    endpoints: [{ account: "mqtt.default", direction: "in", topic: "t" }],
  });
  const inviteOf = (invite?: string[]) =>
    validateConfig({ ...base, routes: [route(invite)] }, connectors).routes[0]!.invite;
  assert.deepEqual(inviteOf(), ["@ann:example.org"]);
  assert.deepEqual(inviteOf([]), []);
  assert.deepEqual(inviteOf(["@bo:example.org"]), ["@bo:example.org"]);
});

test("config.schema.json accepts the sample and *File secrets, and rejects a broken config", () => {
  const validate = new Ajv2020({ strict: false, validateFormats: false }).compile(
    JSON.parse(readFileSync("config/config.schema.json", "utf8")) as object,
  );
  const sample = parseYaml(readFileSync("config/config.sample.yaml", "utf8")) as {
    bridges: { mqtt: { home: { embedded: Record<string, unknown> } } };
  };
  assert.equal(validate(sample), true, JSON.stringify(validate.errors));
  sample.bridges.mqtt.home.embedded.users = [{ username: "sensor", passwordFile: "/run/secrets/sensor" }];
  assert.equal(validate(sample), true, JSON.stringify(validate.errors));
  assert.equal(validate(parseYaml(readFileSync(join(BAD, "bad-port.yaml"), "utf8"))), false);
});

test("the sample config is valid and has defaults filled", () => {
  const cfg = validateConfig(sampleConfig(connectors), connectors);
  assert.equal(cfg.appservice.port, 9993);
  assert.equal(cfg.appservice.url, "http://127.0.0.1:9993");
  assert.equal(cfg.routes[0]?.endpoints.length, 3);
  assert.match(cfg.routes[0]!.endpoints[0]!.id, /^greenhouse\.[0-9a-f]{8}$/);
  assert.equal(cfg.routes[0]?.endpoints[1]?.id, "greenhouse.commands");
});

test("config.sample.yaml passes validate-config as a user copies it", () => {
  // Copied elsewhere, with no environment: a *File it names would have to exist there.
  const dir = mkdtempSync(join(tmpdir(), "tribridge-sample-"));
  copyFileSync("config/config.sample.yaml", join(dir, "config.yaml"));
  const cfg = loadConfig(join(dir, "config.yaml"), connectors, {});
  assert.deepEqual(
    cfg.accounts.map((a) => `${a.connector}.${a.account}`),
    connectors
      .filter((c) => c.sample)
      .flatMap((c) => Object.keys(c.sample!.accounts).map((a) => `${c.name}.${a}`)),
  );
  assert.equal(cfg.routes.length, connectors.filter((c) => c.sample).length);
});

test("no bridges.mqtt block: an embedded broker on 1883, loopback", () => {
  const cfg = validateConfig({ homeserver: { url: "http://hs:8008", domain: "example.org" } }, connectors);
  assert.deepEqual(
    cfg.accounts.map((a) => [a.connector, a.account]),
    [["mqtt", "default"]],
  );
  const embedded = (cfg.accounts[0]?.config as { embedded: { port: number; host: string } }).embedded;
  assert.equal(embedded.port, 1883);
  assert.equal(embedded.host, "127.0.0.1");
});

test("environment overrides and *File secrets", () => {
  const dir = mkdtempSync(join(tmpdir(), "tribridge-config-"));
  writeFileSync(join(dir, "pw"), "s3cret\n");
  const cfg = validateConfig(
    {
      homeserver: { url: "http://hs:8008", domain: "example.org" },
      bridges: { mqtt: { home: { embedded: { users: [{ username: "u", passwordFile: "pw" }] } } } },
    },
    connectors,
    { TRIBRIDGE__queue__redisUrl: "redis://127.0.0.1:6380", TRIBRIDGE__appservice__port: "9000" },
    dir,
  );
  assert.equal(cfg.queue.redisUrl, "redis://127.0.0.1:6380");
  assert.equal(cfg.appservice.port, 9000);
  const users = (cfg.accounts[0]?.config as { embedded: { users: { password: string }[] } }).embedded.users;
  assert.equal(users[0]?.password, "s3cret");
});

test("environment values: strings as written, plain numbers and booleans, quoted or bracketed YAML", () => {
  const cfg = validateConfig(
    {
      homeserver: { url: "http://hs:8008", domain: "example.org" },
      bridges: { mqtt: { home: { url: "mqtt://broker:1883" } } },
    },
    connectors,
    {
      TRIBRIDGE__bridges__mqtt__home__password: "s3cr3t #42",
      TRIBRIDGE__bridges__mqtt__home__username: '"123456"',
      TRIBRIDGE__bridges__mqtt__home__cleanSession: "false",
      TRIBRIDGE__appservice__admins__0: "@me:example.org",
      TRIBRIDGE__appservice__admins__1: "@*:example.com",
    },
  );
  const home = cfg.accounts[0]?.config as { password: string; username: string; cleanSession: boolean };
  assert.equal(home.password, "s3cr3t #42");
  assert.equal(home.username, "123456");
  assert.equal(home.cleanSession, false);
  assert.deepEqual(cfg.appservice.admins, ["@me:example.org", "@*:example.com"]);
  assert.throws(
    () => validateConfig({}, connectors, { TRIBRIDGE__appservice__admins: "[oops" }),
    /TRIBRIDGE__appservice__admins: not valid YAML/,
  );
});

test("both a key and its *File is an error naming the key", () => {
  assert.throws(
    () =>
      validateConfig(
        {
          homeserver: { url: "http://hs:8008", domain: "example.org" },
          queue: { redisUrl: "redis://x", redisUrlFile: "/x" },
        },
        connectors,
      ),
    /queue\.redisUrlFile: set either redisUrl or redisUrlFile, not both/,
  );
});

test("queue.redisUrl: a Redis Cluster's nodes are checked, and a bad one named", () => {
  const base = { homeserver: { url: "http://hs:8008", domain: "example.org" } };
  const cfg = validateConfig(
    { ...base, queue: { redisUrl: "redis+cluster://:pw@10.0.0.1:7000,[::1]:7001" } },
    connectors,
    {},
  );
  assert.equal(cfg.queue.redisUrl, "redis+cluster://:pw@10.0.0.1:7000,[::1]:7001");
  assert.throws(
    () =>
      validateConfig(
        { ...base, queue: { redisUrl: "redis+cluster://10.0.0.1:7000,10.0.0.2" } },
        connectors,
        {},
      ),
    /queue\.redisUrl: "10\.0\.0\.2" is not host:port/,
  );
  assert.throws(
    () => validateConfig({ ...base, queue: { redisUrl: "redis+sentinel://a:1" } }, connectors, {}),
    /queue\.redisUrl: must start with redis:\/\/, rediss:\/\/, unix:\/\/ or \(a Redis Cluster\) redis\+cluster:\/\//,
  );
});
