/** How `tribridge doctor` prints a check: one line, and for a warning or failure its fix below. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { formatCheck } from "../../src/doctor.js";

test("✓ / ! / ✗, the fix indented under a warning or failure only", () => {
  assert.equal(
    formatCheck({ name: "redis", status: "ok", detail: "127.0.0.1:6379, AOF on", fix: "unused" }),
    "✓ redis: 127.0.0.1:6379, AOF on",
  );
  assert.equal(
    formatCheck({ name: "appservice ping", status: "warn", detail: "cannot tell", fix: "wait" }),
    "! appservice ping: cannot tell\n    fix: wait",
  );
  assert.equal(
    formatCheck({ name: "redis", status: "fail", detail: "appendonly is 'no'", fix: "set appendonly yes" }),
    "✗ redis: appendonly is 'no'\n    fix: set appendonly yes",
  );
});

test("in colour (a terminal): only the mark is coloured", () => {
  assert.equal(
    formatCheck({ name: "redis", status: "fail", detail: "down", fix: "start it" }, true),
    "\x1b[31m✗\x1b[0m redis: down\n    fix: start it",
  );
});
