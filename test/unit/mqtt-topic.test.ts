import { test } from "node:test";
import assert from "node:assert/strict";
import {
  coveringFilters,
  hasWildcard,
  topicFilterProblem,
  topicLevel,
  topicMatches,
  topicNameProblem,
} from "../../bridges/mqtt/topic.js";

// --- topicFilterProblem ---------------------------------------------------------------------------

test("valid topic filters have no problem", () => {
  for (const f of ["a", "a/b/c", "#", "+", "a/#", "a/+/c", "+/+", "/", "a//b", "$SYS/#", "sport/+/player1"]) {
    assert.equal(topicFilterProblem(f), undefined, f);
  }
});

test("[MQTT-4.7.3-1] an empty filter is refused", () => {
  assert.equal(topicFilterProblem(""), "must not be empty");
});

test("[MQTT-4.7.3-2] a filter containing NUL is refused", () => {
  assert.equal(topicFilterProblem("a/\u0000/b"), "must not contain NUL");
});

test("[MQTT-4.7.3-3] a filter longer than 65535 UTF-8 bytes is refused (bytes, not chars)", () => {
  assert.equal(topicFilterProblem("a".repeat(65535)), undefined);
  assert.equal(topicFilterProblem("a".repeat(65536)), "must be at most 65535 bytes");
  // 'é' is 2 bytes in UTF-8: 32768 chars = 65536 bytes
  assert.equal(topicFilterProblem("é".repeat(32768)), "must be at most 65535 bytes");
});

test("[MQTT-4.7.1-2] '#' must be alone in the last level", () => {
  for (const f of ["a/#/b", "#/a", "a#", "a/b#", "a/#b", "##"]) {
    assert.equal(topicFilterProblem(f), "'#' must be the whole last level of a filter", f);
  }
});

test("[MQTT-4.7.1-3] '+' must occupy an entire level", () => {
  for (const f of ["a+", "a/+b", "+a/b", "a/b/c+", "++"]) {
    assert.equal(topicFilterProblem(f), "'+' must be a whole level of a filter", f);
  }
});

// --- topicNameProblem -----------------------------------------------------------------------------

test("valid topic names have no problem", () => {
  for (const t of ["a", "a/b", "/", "a//b", "$SYS/broker", "home/kitchen/temp", "é/ü"]) {
    assert.equal(topicNameProblem(t), undefined, t);
  }
});

test("[MQTT-3.3.2-2] a topic name to publish to must not contain wildcards", () => {
  for (const t of ["a/+", "+", "#", "a/#", "a+b", "a#b"]) {
    assert.equal(topicNameProblem(t), "wildcards (+, #) are not allowed in a topic to publish to", t);
  }
});

test("[MQTT-4.7.3-1] [MQTT-4.7.3-2] a topic name must not be empty nor contain NUL", () => {
  assert.equal(topicNameProblem(""), "must not be empty");
  assert.equal(topicNameProblem("a\u0000"), "must not contain NUL");
  assert.equal(topicNameProblem("x".repeat(65536)), "must be at most 65535 bytes");
});

test("hasWildcard", () => {
  assert.equal(hasWildcard("a/b"), false);
  assert.equal(hasWildcard("a/+"), true);
  assert.equal(hasWildcard("#"), true);
});

// --- topicMatches ---------------------------------------------------------------------------------

test("exact levels match only the same topic", () => {
  assert.equal(topicMatches("a/b/c", "a/b/c"), true);
  assert.equal(topicMatches("a/b/c", "a/b"), false);
  assert.equal(topicMatches("a/b", "a/b/c"), false);
  assert.equal(topicMatches("a/b/c", "a/b/d"), false);
  assert.equal(topicMatches("a/b", "A/b"), false, "topics are case sensitive");
  assert.equal(topicMatches("a/b", "a/b/"), false, "a trailing '/' adds an empty level");
  assert.equal(topicMatches("/a", "a"), false, "a leading '/' adds an empty level");
});

test("[MQTT-4.7.1-2] '#' matches the parent level: 'a/#' matches 'a'", () => {
  assert.equal(topicMatches("a/#", "a"), true);
  assert.equal(topicMatches("sport/tennis/player1/#", "sport/tennis/player1"), true);
});

test("[MQTT-4.7.1-2] '#' matches any number of child levels", () => {
  assert.equal(topicMatches("a/#", "a/b"), true);
  assert.equal(topicMatches("a/#", "a/b/c/d"), true);
  assert.equal(topicMatches("a/#", "a/"), true);
  assert.equal(topicMatches("#", "a"), true);
  assert.equal(topicMatches("#", "a/b/c"), true);
  assert.equal(topicMatches("#", "/"), true);
  assert.equal(topicMatches("a/#", "b/a"), false);
  assert.equal(topicMatches("a/#", "ab"), false);
});

test("[MQTT-4.7.1-3] '+' matches exactly one level", () => {
  assert.equal(topicMatches("sport/tennis/+", "sport/tennis/player1"), true);
  assert.equal(topicMatches("sport/tennis/+", "sport/tennis/player1/ranking"), false);
  assert.equal(topicMatches("sport/+", "sport"), false);
  assert.equal(topicMatches("+/+", "a/b"), true);
  assert.equal(topicMatches("+", "a/b"), false);
  assert.equal(topicMatches("a/+/c", "a/b/c"), true);
  assert.equal(topicMatches("a/+/c", "a/b/d"), false);
  assert.equal(topicMatches("+/#", "a/b/c"), true);
});

test("[MQTT-4.7.1-3] '+' matches an empty level", () => {
  assert.equal(topicMatches("sport/+", "sport/"), true);
  assert.equal(topicMatches("+/finance", "/finance"), true);
  assert.equal(topicMatches("+/+", "/finance"), true);
  assert.equal(topicMatches("a/+/c", "a//c"), true);
  assert.equal(topicMatches("+", "/finance"), false);
});

test("[MQTT-4.7.2-1] topics starting with '$' are not matched by filters starting with a wildcard", () => {
  assert.equal(topicMatches("#", "$SYS/broker/uptime"), false);
  assert.equal(topicMatches("+/broker/uptime", "$SYS/broker/uptime"), false);
  assert.equal(topicMatches("+/#", "$SYS/x"), false);
  assert.equal(topicMatches("+", "$SYS"), false);
  assert.equal(topicMatches("#", "$share"), false);
});

test("[MQTT-4.7.2-1] '$' topics are matched by filters naming the '$' level", () => {
  assert.equal(topicMatches("$SYS/#", "$SYS/broker/uptime"), true);
  assert.equal(topicMatches("$SYS/+/uptime", "$SYS/broker/uptime"), true);
  assert.equal(topicMatches("$SYS/broker/uptime", "$SYS/broker/uptime"), true);
  // only the first level is special
  assert.equal(topicMatches("#", "a/$SYS"), true);
  assert.equal(topicMatches("a/+", "a/$x"), true);
});

// --- topicLevel -----------------------------------------------------------------------------------

test("topicLevel is 1-based and undefined past the end", () => {
  assert.equal(topicLevel("home/kitchen/temp", 1), "home");
  assert.equal(topicLevel("home/kitchen/temp", 2), "kitchen");
  assert.equal(topicLevel("home/kitchen/temp", 3), "temp");
  assert.equal(topicLevel("home/kitchen/temp", 4), undefined);
  assert.equal(topicLevel("home/kitchen/temp", 0), undefined);
});

test("topicLevel returns empty levels as ''", () => {
  assert.equal(topicLevel("/a", 1), "");
  assert.equal(topicLevel("a//b", 2), "");
  assert.equal(topicLevel("a/", 2), "");
});

test("coveringFilters keeps the filters no other covers, each with the highest QoS it covers", () => {
  const filters = new Map<string, 0 | 1 | 2>([
    ["home/#", 0],
    ["home/door", 1],
    ["home/+", 0],
    ["garden/+/t", 0],
    ["garden/bed/t", 2],
    ["$SYS/broker/uptime", 1],
    ["#", 0],
  ]);
  assert.deepEqual(
    coveringFilters(filters),
    new Map([
      ["#", 2], // covers all but $SYS
      ["$SYS/broker/uptime", 1],
    ]),
  );
  filters.delete("#");
  assert.deepEqual(
    coveringFilters(filters),
    new Map([
      ["home/#", 1],
      ["garden/+/t", 2],
      ["$SYS/broker/uptime", 1],
    ]),
  );
});
