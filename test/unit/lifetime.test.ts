/** Lifetime: what a stop that hangs is still waiting for (the CLI names it when its deadline passes). */
import { test } from "node:test";
import assert from "node:assert/strict";
import { Lifetime } from "../../src/lifetime.js";
import { moduleLogger } from "../../src/log.js";

test("pending() names the part being stopped first, then those not reached yet; unnamed ones are left out", async () => {
  const lifetime = new Lifetime(moduleLogger("test"));
  let release!: () => void;
  lifetime.onStop(async () => undefined, "redis");
  lifetime.onStop(async () => undefined);
  lifetime.onStop(() => new Promise<void>((r) => (release = r)), "queue to-matrix");
  assert.deepEqual(lifetime.pending(), ["queue to-matrix", "redis"]);
  const stopping = lifetime.stop();
  assert.deepEqual(lifetime.pending(), ["queue to-matrix", "redis"], "the queue hangs");
  release();
  await stopping;
  assert.deepEqual(lifetime.pending(), []);
});
