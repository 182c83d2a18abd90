import { test } from "node:test";
import assert from "node:assert/strict";
import { jobIdFor, shardOf } from "../../src/queue/ordered-queue.js";

// --- jobIdFor -------------------------------------------------------------------------------------

test("jobIdFor: BullMQ-safe (no ':', starts with a letter, not an integer)", () => {
  for (const parts of [["in", "mqtt.home", "client:dev1/abc/7", "route.0"], ["1"], ["a:b:c"], []]) {
    const id = jobIdFor(...parts);
    assert.equal(id.includes(":"), false, id);
    assert.match(id, /^[A-Za-z]/);
    assert.ok(!/^\d+$/.test(id));
    assert.match(id, /^[a-z0-9]+$/);
  }
});

test("jobIdFor: deterministic", () => {
  assert.equal(jobIdFor("in", "x", "y"), jobIdFor("in", "x", "y"));
});

test("jobIdFor: differs for different parts, including how they are split", () => {
  const ids = [
    jobIdFor("in", "a", "b"),
    jobIdFor("in", "a", "c"),
    jobIdFor("out", "a", "b"),
    jobIdFor("in", "ab"),
    jobIdFor("in", "a", "b", ""),
    jobIdFor("ina", "b"),
    jobIdFor("in", "b", "a"),
  ];
  assert.equal(new Set(ids).size, ids.length);
});

// --- shardOf --------------------------------------------------------------------------------------

test("shardOf: in range and deterministic", () => {
  for (const shards of [1, 2, 16, 256]) {
    for (let i = 0; i < 200; i++) {
      const key = `!room${i}:example.org`;
      const s = shardOf(key, shards);
      assert.ok(Number.isInteger(s) && s >= 0 && s < shards, `${key} → ${s} of ${shards}`);
      assert.equal(shardOf(key, shards), s);
    }
  }
});

test("shardOf: spreads keys over the shards", () => {
  const used = new Set<number>();
  for (let i = 0; i < 500; i++) used.add(shardOf(`!room${i}:example.org`, 16));
  assert.equal(used.size, 16);
});
