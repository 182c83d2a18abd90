/**
 * What connections cost the embedded broker before their CONNECT is accepted, alone and together,
 * and how many log lines a flood of malformed ones writes. The broker runs in a process of its own
 * and the clients in another (test/helpers/broker-probe.ts), so only the broker's memory counts.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { brokerProbe, type Memory } from "../helpers/broker-probe.js";

const grew = (from: Memory, to: Memory) => ({
  rssMB: Math.round(to.rssMB - from.rssMB),
  externalMB: Math.round(to.externalMB - from.externalMB),
});

test(
  "500 connections each holding a CONNECT just under the packet limit are closed as their header arrives: RSS bounded, and given back",
  { timeout: 120_000 },
  async () => {
    // 262,144 + 65,552 bytes is the packet limit with the default maxPayloadBytes
    const r = await brokerProbe({ scenario: "connects", connections: 500, declaredBytes: 327_000 });
    // Before: all 500 held, +156 MB RSS (+156 MB of buffers), still +159 MB once they were gone.
    const held = grew(r.before, r.held);
    assert.ok(held.externalMB < 10 && held.rssMB < 40, `held: ${JSON.stringify(held)}`);
    const after = grew(r.before, r.after);
    assert.ok(after.rssMB < 40, `after: ${JSON.stringify(after)}`);
    assert.ok(r.open <= 5, `${r.open} connections kept`);
    assert.ok(r.connectsAfter, "a device connects afterwards");
  },
);

test(
  "500 connections each holding a CONNECT within maxConnectBytes: at most maxPendingConnections (100) are kept, the rest closed as they come",
  { timeout: 120_000 },
  async () => {
    const r = await brokerProbe({ scenario: "connects", connections: 500, declaredBytes: 16_000 });
    assert.ok(r.open <= 100, `${r.open} connections kept`);
    const held = grew(r.before, r.held);
    assert.ok(held.externalMB < 10 && held.rssMB < 40, `held: ${JSON.stringify(held)}`);
    assert.ok(r.connectsAfter, "a device connects once they are gone");
  },
);

test(
  "malformed connections, 2 × 1,500 at 200 at a time: RSS bounded and not growing with their number, a bounded number of log lines",
  { timeout: 300_000 },
  async () => {
    const r = await brokerProbe(
      { scenario: "churn", connections: 1500, concurrency: 200, kind: "mixed" },
      240_000,
    );
    assert.equal(r.connections, 3000);
    // Before: one line per connection announcing too large a packet (750 here), none for the others.
    assert.ok(r.logLines <= 20, `${r.logLines} log lines, e.g. ${r.sample.join("\n")}`);
    // What stays is the allocator keeping freed socket buffers (see docs/reliability.md): bounded
    // by how many connections come at once, not by how many came.
    const total = grew(r.before, r.after);
    const second = grew(r.firstRound, r.after);
    assert.ok(total.rssMB < 150, `RSS +${total.rssMB} MB`);
    assert.ok(second.rssMB < 40, `the second 1,500 added ${second.rssMB} MB`);
    assert.ok(r.connectsAfter, "a device connects afterwards");
  },
);
