import { test } from "node:test";
import assert from "node:assert/strict";
import type { ConnectorDefinition } from "../../src/connector.js";
import {
  botUserId,
  encodeLocalpart,
  escapeRegex,
  ghostNamespaceRegex,
  ghostUserId,
  isUserId,
  namespaceRegexes,
} from "../../src/matrix/ids.js";
import { LogLimiter } from "../../src/log-limiter.js";

const naming = { ghostPrefix: "_tb_", domain: "example.org", botLocalpart: "tribridge" };
const LOCALPART = /^[a-z0-9._=-]*$/;

/** Inverse of the spec's mapping, to check the encoding is reversible. */
function decodeLocalpart(s: string): string {
  const bytes: number[] = [];
  for (let i = 0; i < s.length; i++) {
    const c = s[i]!;
    if (c === "_") {
      const next = s[++i]!;
      bytes.push(next === "_" ? 0x5f : next.toUpperCase().charCodeAt(0));
    } else if (c === "=") {
      bytes.push(parseInt(s.slice(i + 1, i + 3), 16));
      i += 2;
    } else bytes.push(c.charCodeAt(0));
  }
  return Buffer.from(bytes).toString("utf8");
}

// --- encodeLocalpart: appendix "Mapping from other character sets" -------------------------------

test("[spec: mapping from other character sets] allowed characters pass through", () => {
  assert.equal(encodeLocalpart("abc-123.x.y"), "abc-123.x.y");
  assert.equal(encodeLocalpart("plant/chat"), "plant=2fchat", "/ is historical only (see ids.ts)");
});

test("[spec: mapping from other character sets] upper case becomes '_' + lower case", () => {
  assert.equal(encodeLocalpart("Alice"), "_alice");
  assert.equal(encodeLocalpart("ABZ"), "_a_b_z");
});

test("[spec: mapping from other character sets] '_' becomes '__'", () => {
  assert.equal(encodeLocalpart("a_b"), "a__b");
  assert.equal(encodeLocalpart("_"), "__");
});

test("[spec: mapping from other character sets] other bytes become '=xx' in lower-case hex, '=' included", () => {
  assert.equal(encodeLocalpart("a b"), "a=20b");
  assert.equal(encodeLocalpart("#"), "=23");
  assert.equal(encodeLocalpart("="), "=3d");
  assert.equal(encodeLocalpart(":@"), "=3a=40");
  assert.equal(encodeLocalpart("\u0000\n"), "=00=0a");
  assert.equal(encodeLocalpart("á"), "=c3=a1");
  assert.equal(encodeLocalpart("😀"), "=f0=9f=98=80");
});

test("encoded output only contains [a-z0-9._=/-]", () => {
  const inputs = [
    "Dev_1:kitchen",
    "sensor/+/#",
    "ünïcödé ✓",
    "@room",
    "A=B",
    "x".repeat(3) + "\u00ff\u0100",
    "",
  ];
  for (const s of inputs) assert.match(encodeLocalpart(s), LOCALPART, s);
  let all = "";
  for (let c = 0; c < 256; c++) all += String.fromCharCode(c);
  assert.match(encodeLocalpart(all), LOCALPART);
});

test("the encoding is reversible (distinct inputs give distinct outputs)", () => {
  const inputs = ["A", "_a", "a", "__", "_", "=41", "=", "a b", "a=20b", "Dev_1:kitchen", "ünï ✓"];
  for (const s of inputs) assert.equal(decodeLocalpart(encodeLocalpart(s)), s, s);
  assert.equal(new Set(inputs.map(encodeLocalpart)).size, inputs.length);
});

// --- ghostUserId / botUserId ----------------------------------------------------------------------

test("a sender too long for a user id (255 bytes) keeps its start and a hash of the whole", () => {
  const deep = `site/${"building/floor/".repeat(20)}sensor`;
  const a = ghostUserId(naming, "mqtt", "home", `${deep}/1`);
  const b = ghostUserId(naming, "mqtt", "home", `${deep}/2`);
  assert.equal(a.length, 255);
  assert.notEqual(a, b);
  assert.ok(a.startsWith("@_tb_mqtt_home_site=2fbuilding"), a);
  assert.match(a.slice(1, a.indexOf(":")), LOCALPART);
});

test("ghostUserId is @<prefix><tag>_<account>_<encoded sender>:<domain>", () => {
  assert.equal(ghostUserId(naming, "mqtt", "home", "Dev_1"), "@_tb_mqtt_home__dev__1:example.org");
  assert.equal(ghostUserId(naming, "mqtt", "home", "a:b@c"), "@_tb_mqtt_home_a=3ab=40c:example.org");
});

test("botUserId", () => {
  assert.equal(botUserId("tribridge", "example.org"), "@tribridge:example.org");
});

// --- namespace regexes ----------------------------------------------------------------------------

test("escapeRegex escapes metacharacters", () => {
  const s = "a.b*c+d?e^f$g{h}i(j)k|l[m]n\\o/p-q";
  assert.equal(new RegExp(`^${escapeRegex(s)}$`).test(s), true);
  assert.equal(new RegExp(`^${escapeRegex("a.b")}$`).test("axb"), false);
});

test("ghost namespace regex is anchored and escapes dots in the domain", () => {
  const regex = ghostNamespaceRegex(naming, "mqtt");
  assert.equal(regex, "^@_tb_mqtt_[^:]+:example\\.org$");
  const re = new RegExp(regex);
  assert.equal(re.test("@_tb_mqtt_home_dev1:example.org"), true);
  assert.equal(re.test("@_tb_mqtt_home_dev1:exampleXorg"), false);
  assert.equal(re.test("@_tb_mqtt_home_dev1:example.org.evil.com"), false);
  assert.equal(re.test("@_tb_mqtt_home_dev1:evil.example.org"), false);
  assert.equal(re.test("x@_tb_mqtt_home_dev1:example.org"), false);
  assert.equal(re.test("@_tb_mqtt_:example.org"), false);
});

test("ghost namespace regex does not match another tag with the same start", () => {
  const re = new RegExp(ghostNamespaceRegex(naming, "mqtt"));
  assert.equal(re.test("@_tb_mqttx_home_dev1:example.org"), false);
  assert.equal(re.test("@_tb_mqtt2_home_dev1:example.org"), false);
  assert.equal(re.test("@_tb_mail_home_dev1:example.org"), false);
  assert.equal(re.test("@other_mqtt_home_dev1:example.org"), false);
});

test("namespace regexes match every generated ghost, and the bot", () => {
  const mqtt = { ghostTag: "mqtt" } as ConnectorDefinition;
  const regexes = namespaceRegexes(naming, [mqtt]).map((r) => new RegExp(r));
  const matches = (id: string) => regexes.some((r) => r.test(id));
  for (const sender of ["dev1", "Dev_1", "a:b", "ünï ✓", "x/y/z", "=="]) {
    const id = ghostUserId(naming, "mqtt", "home", sender);
    assert.ok(matches(id), id);
  }
  assert.ok(matches("@tribridge:example.org"));
  assert.equal(matches("@tribridge2:example.org"), false);
  assert.equal(matches("@tribridge:example.org.evil.com"), false);
  assert.equal(matches("@tribridge:exampleXorg"), false);
  assert.equal(matches("@alice:example.org"), false);
  assert.equal(matches("@_tb_mqttx_home_dev1:example.org"), false);
  assert.equal(matches(ghostUserId({ ...naming, domain: "other.org" }, "mqtt", "home", "d")), false);
});

test("namespace regexes: bot first, then one per connector, all anchored", () => {
  const defs = [{ ghostTag: "mqtt" }, { ghostTag: "mail" }] as ConnectorDefinition[];
  const regexes = namespaceRegexes(naming, defs);
  assert.deepEqual(regexes, [
    "^@tribridge:example\\.org$",
    "^@_tb_mqtt_[^:]+:example\\.org$",
    "^@_tb_mail_[^:]+:example\\.org$",
  ]);
  for (const r of regexes) {
    assert.ok(r.startsWith("^") && r.endsWith("$"), r);
  }
});

test("namespace regexes handle a domain with a port", () => {
  const n = { ...naming, domain: "localhost:8448" };
  const re = new RegExp(ghostNamespaceRegex(n, "mqtt"));
  assert.equal(re.test(ghostUserId(n, "mqtt", "home", "d")), true);
  assert.equal(re.test("@_tb_mqtt_home_d:localhost"), false);
});

test("[spec: Appendix, User Identifiers] isUserId: @localpart:server_name, historical localparts, ≤ 255 bytes", () => {
  for (const ok of [
    "@alice:example.org",
    "@_tb_mqtt_home_dev:example.org",
    "@Alice!Old#1:example.org", // historical: any printable ASCII but ':'
    "@a:127.0.0.1:8448",
    "@a:[::1]",
    "@a:[2001:db8::1]:8448",
    `@${"a".repeat(240)}:example.org`,
  ])
    assert.equal(isUserId(ok), true, ok);
  for (const bad of [
    "",
    "@",
    "@:example.org",
    "alice:example.org",
    "@alice",
    "@alice:",
    "@al ice:example.org",
    "@alicé:example.org",
    "@alice:exa_mple.org",
    "@alice:example.org:port",
    "@alice:example.org:123456",
    `@${"a".repeat(250)}:example.org`,
    5,
    null,
    { user: "@a:b" },
  ])
    assert.equal(isUserId(bad), false, JSON.stringify(bad));
});

test("LogLimiter: one line per key per interval, with how many it held back", () => {
  const limiter = new LogLimiter(1000);
  assert.deepEqual(limiter.pass("a", 1, 0), { heldBack: 0 });
  assert.equal(limiter.pass("a", 3, 10), undefined);
  assert.deepEqual(limiter.pass("b", 1, 20), { heldBack: 0 });
  assert.equal(limiter.pass("a", 1, 999), undefined);
  assert.deepEqual(limiter.pass("a", 1, 1000), { heldBack: 4 });
  assert.equal(limiter.pass("a", 1, 1500), undefined);
});
