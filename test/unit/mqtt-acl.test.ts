import { test } from "node:test";
import assert from "node:assert/strict";
import { Acl } from "../../bridges/mqtt/acl.js";
import { aclRulesSchema } from "../../bridges/mqtt/schema.js";
import { filterCovers, topicMatches } from "../../bridges/mqtt/topic.js";

test("a filter covers itself", () => {
  for (const f of ["a", "a/b", "a/+", "a/#", "+", "#", "+/+/c", "$SYS/#"]) {
    assert.equal(filterCovers(f, f), true, f);
  }
});

test("'#' covers every non-'$' subscription", () => {
  for (const inner of ["a", "a/b/c", "+", "+/b", "a/#", "#", "/"]) {
    assert.equal(filterCovers("#", inner), true, inner);
  }
});

test("[MQTT-4.7.2-1] '#' does not cover '$SYS' subscriptions", () => {
  assert.equal(filterCovers("#", "$SYS/#"), false);
  assert.equal(filterCovers("#", "$SYS/broker/uptime"), false);
  assert.equal(filterCovers("#", "$SYS"), false);
});

test("[MQTT-4.7.2-1] '+/...' does not cover '$SYS' subscriptions", () => {
  assert.equal(filterCovers("+/#", "$SYS/x"), false);
  assert.equal(filterCovers("+/broker/uptime", "$SYS/broker/uptime"), false);
  assert.equal(filterCovers("+", "$SYS"), false);
});

test("'$' is only special in the first level", () => {
  assert.equal(filterCovers("a/#", "a/$x"), true);
  assert.equal(filterCovers("a/+", "a/$x"), true);
});

test("an explicit '$SYS/...' grant covers '$SYS' subscriptions", () => {
  assert.equal(filterCovers("$SYS/#", "$SYS/broker/uptime"), true);
  assert.equal(filterCovers("$SYS/#", "$SYS/+/uptime"), true);
  assert.equal(filterCovers("$SYS/+/uptime", "$SYS/broker/uptime"), true);
});

test("[MQTT-4.7.1-2] 'a/#' covers 'a' itself and anything below it", () => {
  assert.equal(filterCovers("a/#", "a"), true);
  assert.equal(filterCovers("a/#", "a/b"), true);
  assert.equal(filterCovers("a/#", "a/+"), true);
  assert.equal(filterCovers("a/#", "a/+/c/#"), true);
  assert.equal(filterCovers("a/#", "a/#"), true);
});

test("a narrower grant does not cover a wider subscription", () => {
  assert.equal(filterCovers("a/#", "#"), false);
  assert.equal(filterCovers("a/#", "+/b"), false);
  assert.equal(filterCovers("a/+", "a/#"), false, "a/# also matches a and a/b/c");
  assert.equal(filterCovers("+", "#"), false);
  assert.equal(filterCovers("+/+", "a/#"), false);
  assert.equal(filterCovers("a/b", "a/+"), false);
  assert.equal(filterCovers("a/b", "a/#"), false);
  assert.equal(filterCovers("a/+/c", "a/+/+"), false);
});

test("'+' covers exactly one level of any name, including '+'", () => {
  assert.equal(filterCovers("a/+", "a/b"), true);
  assert.equal(filterCovers("a/+", "a/+"), true);
  assert.equal(filterCovers("a/+", "a/"), true);
  assert.equal(filterCovers("a/+", "a"), false);
  assert.equal(filterCovers("a/+", "a/b/c"), false);
  assert.equal(filterCovers("+/+/c", "a/b/c"), true);
});

test("exact grants cover only the same levels", () => {
  assert.equal(filterCovers("a/b", "a/b"), true);
  assert.equal(filterCovers("a/b", "a/c"), false);
  assert.equal(filterCovers("a/b", "a"), false);
  assert.equal(filterCovers("a", "a/b"), false);
  assert.equal(filterCovers("a/b", "A/b"), false);
});

test("coverage is sound: whenever outer covers inner, every topic inner matches is matched by outer", () => {
  const filters = [
    "#",
    "+",
    "a",
    "a/#",
    "a/+",
    "a/b",
    "+/b",
    "+/#",
    "a/+/c",
    "+/+",
    "$SYS/#",
    "$SYS/+",
    "a/b/#",
  ];
  const topics = [
    "a",
    "b",
    "a/b",
    "a/c",
    "b/b",
    "a/b/c",
    "a/x/c",
    "a/",
    "/",
    "/b",
    "$SYS",
    "$SYS/x",
    "$SYS/x/y",
  ];
  for (const outer of filters) {
    for (const inner of filters) {
      if (!filterCovers(outer, inner)) continue;
      for (const t of topics) {
        if (topicMatches(inner, t)) {
          assert.ok(topicMatches(outer, t), `${outer} covers ${inner} but does not match ${t}`);
        }
      }
    }
  }
});

// --- Acl: allow lists with deny rules ---------------------------------------------------------

const acl = (rules: {
  publish?: string[];
  subscribe?: string[];
  deny?: { publish?: string[]; subscribe?: string[] };
}) => new Acl(aclRulesSchema.parse(rules));

test("an Acl allows what its lists cover: by default every topic but $-topics", () => {
  const all = acl({});
  assert.equal(all.mayPublish("a/b"), true);
  assert.equal(all.maySubscribe("#"), true);
  assert.equal(all.mayReceive("a/b"), true);
  // [MQTT-4.7.2-1] '#' does not match topics starting with '$': they must be named
  assert.equal(all.mayPublish("$SYS/x"), false);
  assert.equal(all.maySubscribe("$SYS/#"), false);
  assert.equal(all.mayReceive("$SYS/broker/uptime"), false);
  assert.equal(acl({ subscribe: ["$SYS/#"] }).maySubscribe("$SYS/broker/+"), true);
});

test("deny.publish refuses topics an allow filter covers: deny wins", () => {
  const sensor = acl({
    publish: ["greenhouse/#"],
    deny: { publish: ["greenhouse/commands", "greenhouse/+/set"] },
  });
  assert.equal(sensor.mayPublish("greenhouse/s1/temperature"), true);
  assert.equal(sensor.mayPublish("greenhouse/commands"), false);
  assert.equal(sensor.mayPublish("greenhouse/lamp/set"), false);
  assert.equal(sensor.mayPublish("greenhouse/lamp/set/x"), true, "a filter matches its levels only");
  assert.equal(sensor.mayPublish("elsewhere"), false, "not allowed at all");
});

test("deny.subscribe refuses a subscription wholly inside it, and what a wider one would bring from it", () => {
  const a = acl({ deny: { subscribe: ["test/nosubscribe", "secret/#"] } });
  assert.equal(a.maySubscribe("test/nosubscribe"), false);
  assert.equal(a.maySubscribe("secret/#"), false);
  assert.equal(a.maySubscribe("secret/+/code"), false, "covered by secret/#");
  // granted: they also match topics that are not denied; the denied ones are not delivered
  for (const f of ["#", "test/+", "+/+", "+/nosubscribe"]) assert.equal(a.maySubscribe(f), true, f);
  assert.equal(a.mayReceive("test/nosubscribe"), false);
  assert.equal(a.mayReceive("secret"), false, "secret/# also matches secret [MQTT-4.7.1-2]");
  assert.equal(a.mayReceive("secret/door/code"), false);
  assert.equal(a.mayReceive("test/other"), true);
});

test("deny.subscribe does not touch publishing, nor deny.publish receiving", () => {
  const a = acl({ deny: { publish: ["x/#"], subscribe: ["y/#"] } });
  assert.equal(a.mayPublish("y/1"), true);
  assert.equal(a.mayReceive("x/1"), true);
  assert.equal(a.maySubscribe("x/#"), true);
});
