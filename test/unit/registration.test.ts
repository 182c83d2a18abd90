import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parse as parseYaml } from "yaml";
import { connectors } from "../../bridges/index.js";
import { validateConfig } from "../../src/config/load.js";
import { ConfigError } from "../../src/errors.js";
import {
  buildRegistration,
  loadRegistration,
  locateRegistration,
  registrationKind,
  registrationMismatch,
  registrationYaml,
  sampleRegistrationProblem,
  writeRegistration,
} from "../../src/matrix/registration.js";

const SAMPLE = fileURLToPath(new URL("../../registration.yaml", import.meta.url));
const config = validateConfig({ homeserver: { url: "http://hs:8008", domain: "example.org" } }, connectors);

function withTempDir(fn: (dir: string) => void): void {
  const dir = mkdtempSync(join(tmpdir(), "tribridge-reg-"));
  try {
    fn(dir);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

test("tokens are 64 hex chars and differ from each other and between runs", () => {
  const a = buildRegistration(config, connectors);
  const b = buildRegistration(config, connectors);
  for (const t of [a.as_token, a.hs_token, b.as_token, b.hs_token]) assert.match(t, /^[0-9a-f]{64}$/);
  assert.notEqual(a.as_token, a.hs_token);
  assert.notEqual(a.as_token, b.as_token);
  assert.notEqual(a.hs_token, b.hs_token);
});

test("id, url and sender_localpart come from the config", () => {
  const reg = buildRegistration(config, connectors);
  assert.equal(reg.id, "tribridge");
  assert.equal(reg.url, "http://127.0.0.1:9993");
  assert.equal(reg.sender_localpart, "tribridge");
  assert.equal(buildRegistration(config, connectors, "other-id").id, "other-id");
});

test("route aliases on our own server are reserved (not exclusively), so tribridge may create those rooms", () => {
  const withRoutes = validateConfig(
    {
      homeserver: { url: "http://hs:8008", domain: "example.org" },
      routes: [
        "#plant:example.org",
        "#plant:example.org",
        "#far:other.org",
        "!abc:example.org",
        "#tribridge_lab:example.org",
      ].map((room, i) => ({
        id: `r${i}`,
        room,
        endpoints: [{ account: "mqtt.default", direction: "in", topic: `t/${i}` }],
      })),
    },
    connectors,
  );
  assert.deepEqual(buildRegistration(withRoutes, connectors).namespaces.aliases, [
    { exclusive: false, regex: "^#tribridge_[^:]+:example\\.org$" },
    { exclusive: false, regex: "^#plant:example\\.org$" },
  ]);
});

test("routes added later: #<roomAliasPrefix>… aliases on our own server are reserved up front, and only those", () => {
  // The quick start registers before any route exists.
  const reg = buildRegistration(config, connectors);
  const reserved = (alias: string) => reg.namespaces.aliases.some((n) => new RegExp(n.regex).test(alias));
  assert.equal(reserved("#tribridge_greenhouse:example.org"), true);
  assert.equal(reserved("#tribridge_a.b-c:example.org"), true);
  assert.equal(reserved("#tribridge_:example.org"), false);
  assert.equal(
    reserved("#greenhouse:example.org"),
    false,
    "not every alias: the homeserver would push all their rooms' events",
  );
  assert.equal(reserved("#tribridge_x:example.org.evil"), false);
  assert.equal(reserved("#tribridge_x:other.org"), false);
  assert.ok(reg.namespaces.aliases.every((n) => !n.exclusive));
  // A config with routes on such aliases, and a prefix of its own, still fits the registration.
  const later = validateConfig(
    {
      homeserver: { url: "http://hs:8008", domain: "example.org" },
      appservice: { roomAliasPrefix: "iot." },
      routes: [
        {
          id: "lab",
          room: "#tribridge_lab:example.org",
          endpoints: [{ account: "mqtt.default", direction: "in", topic: "lab/t" }],
        },
      ],
    },
    connectors,
  );
  assert.equal(registrationMismatch(reg, later, connectors), undefined);
  assert.deepEqual(buildRegistration(later, connectors).namespaces.aliases, [
    { exclusive: false, regex: "^#iot\\.[^:]+:example\\.org$" },
    { exclusive: false, regex: "^#tribridge_lab:example\\.org$" },
  ]);
});

test("a registration generated for another ghostPrefix, domain or bot does not fit the config", () => {
  const reg = buildRegistration(config, connectors);
  assert.equal(registrationMismatch(reg, config, connectors), undefined);
  const renamed = (appservice: object, domain = "example.org") =>
    validateConfig({ homeserver: { url: "http://hs:8008", domain }, appservice }, connectors);
  assert.match(
    registrationMismatch(reg, renamed({ ghostPrefix: "_x_" }), connectors)!,
    /ghosts such as @_x_mqtt_account_device:example\.org are outside its user namespaces/,
  );
  assert.match(
    registrationMismatch(reg, renamed({}, "other.org"), connectors)!,
    /outside its user namespaces/,
  );
  assert.match(
    registrationMismatch(reg, renamed({ botLocalpart: "bridge" }), connectors)!,
    /sender_localpart is tribridge, the config's appservice\.botLocalpart bridge: run `tribridge generate-registration --force`/,
  );
});

test("rate_limited is false", () => {
  assert.equal(buildRegistration(config, connectors).rate_limited, false);
});

test("namespaces has users, aliases and rooms keys; users are exclusive", () => {
  const reg = buildRegistration(config, connectors);
  assert.deepEqual(Object.keys(reg.namespaces).sort(), ["aliases", "rooms", "users"]);
  assert.deepEqual(reg.namespaces.aliases, [{ exclusive: false, regex: "^#tribridge_[^:]+:example\\.org$" }]);
  assert.deepEqual(reg.namespaces.rooms, []);
  assert.equal(reg.namespaces.users.length, 1 + connectors.length);
  for (const u of reg.namespaces.users) assert.equal(u.exclusive, true);
  assert.deepEqual(
    reg.namespaces.users.map((u) => u.regex),
    ["^@tribridge:example\\.org$", "^@_tb_mqtt_[^:]+:example\\.org$", "^@_tb_mail_[^:]+:example\\.org$"],
  );
});

test("registrationYaml round-trips through a YAML parser", () => {
  const reg = buildRegistration(config, connectors);
  const text = registrationYaml(reg);
  assert.deepEqual(parseYaml(text), reg);
  // the regexes' backslashes survive
  assert.match(text, /example\\\.org/);
});

test("loadRegistration rejects the placeholder tokens of the repo's sample registration.yaml", () => {
  assert.throws(
    () => loadRegistration(SAMPLE),
    (err: unknown) => {
      assert.ok(err instanceof ConfigError);
      assert.equal(err.path, "as_token");
      assert.match(err.message, /placeholder tokens/);
      return true;
    },
  );
});

test("loadRegistration accepts a generated registration", () => {
  withTempDir((dir) => {
    const reg = buildRegistration(config, connectors);
    const file = join(dir, "registration.yaml");
    writeRegistration(file, reg);
    assert.deepEqual(loadRegistration(file), reg);
    assert.equal(statSync(file).mode & 0o777, 0o600, "tokens are not world-readable");
  });
});

test("the committed sample is a sample, not a registration; a generated one is private", () => {
  withTempDir((dir) => {
    const file = join(dir, "registration.yaml");
    assert.equal(registrationKind(file), "missing");
    writeFileSync(file, readFileSync(SAMPLE, "utf8"), { mode: 0o644 });
    assert.equal(registrationKind(file), "sample");
    const mine = join(dir, "data", "registration.yaml");
    writeRegistration(mine, buildRegistration(config, connectors));
    assert.equal(registrationKind(mine), "registration");
    assert.equal(statSync(mine).mode & 0o777, 0o600);
  });
});

test("locateRegistration: the given file; else the data directory's; an earlier version's in the working directory; never the sample", () => {
  withTempDir((dir) => {
    const data = join(dir, "data");
    const inData = join(data, "registration.yaml");
    const inCwd = join(dir, "registration.yaml");
    assert.deepEqual(locateRegistration(undefined, data, dir), { file: inData, kind: "missing" });
    // A checkout: the tracked sample is found, reported, and not used.
    writeFileSync(inCwd, readFileSync(SAMPLE, "utf8"));
    assert.deepEqual(locateRegistration(undefined, data, dir), {
      file: inData,
      kind: "missing",
      sample: inCwd,
    });
    assert.deepEqual(locateRegistration(inCwd, data, dir), { file: inCwd, kind: "sample" });
    assert.match(
      sampleRegistrationProblem(inCwd, data),
      /sample registration \(placeholder tokens\).*never writes over it/,
    );
    // A registration written by an earlier version into the working directory is still used.
    writeRegistration(inCwd, buildRegistration(config, connectors));
    assert.deepEqual(locateRegistration(undefined, data, dir), { file: inCwd, kind: "registration" });
    // The data directory's comes first.
    writeRegistration(inData, buildRegistration(config, connectors));
    assert.deepEqual(locateRegistration(undefined, data, dir), { file: inData, kind: "registration" });
  });
});

test("loadRegistration rejects a placeholder hs_token alone", () => {
  withTempDir((dir) => {
    const reg = { ...buildRegistration(config, connectors), hs_token: "placeholder" };
    const file = join(dir, "r.yaml");
    writeFileSync(file, registrationYaml(reg));
    assert.throws(() => loadRegistration(file), ConfigError);
  });
});

test("loadRegistration names a missing key, and reports unreadable files", () => {
  withTempDir((dir) => {
    const { as_token: _drop, ...rest } = buildRegistration(config, connectors);
    const file = join(dir, "r.yaml");
    writeFileSync(file, registrationYaml(rest as never));
    assert.throws(
      () => loadRegistration(file),
      (err: unknown) => err instanceof ConfigError && err.path === "as_token",
    );
    writeFileSync(file, "");
    assert.throws(
      () => loadRegistration(file),
      (err: unknown) => err instanceof ConfigError && err.path === "id",
    );
    assert.throws(
      () => loadRegistration(join(dir, "absent.yaml")),
      (err: unknown) => err instanceof ConfigError && /cannot read registration/.test(err.message),
    );
  });
});
