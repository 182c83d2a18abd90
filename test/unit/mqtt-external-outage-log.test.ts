/**
 * An external broker away for long: the connection logs when it goes and when it comes back, not
 * once per reconnect attempt (found against a real Mosquitto stopped for 3 minutes: a warning and
 * two state lines every reconnectPeriodMs, 2 s by default).
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import type { Logger } from "pino";
import { ExternalClient } from "../../bridges/mqtt/external-client.js";
import { mqttAccountSchema } from "../../bridges/mqtt/schema.js";
import type { ConnectorContext } from "../../src/connector.js";
import { startExternalBroker } from "../helpers/brokers.js";
import { freePort, waitFor } from "../helpers/fixture.js";

/** A client of the broker on `port` (100 ms between reconnects), with what it logs. */
function client(t: TestContext, port: number) {
  const warnings: string[] = [];
  /** As the connector host logs them: a line when the state or its reason changes. */
  const states: string[] = [];
  const warn = (_fields: unknown, msg: string) => void warnings.push(msg);
  const log = { debug: () => undefined, info: () => undefined, warn, error: warn } as unknown as Logger;
  const stopping = new AbortController();
  const ctx = {
    log,
    signal: stopping.signal,
    instanceId: "instance-1",
    store: { get: async () => undefined, set: async () => undefined, delete: async () => undefined },
    setState: (state: string, reason?: string) => {
      const line = `${state} ${reason ?? ""}`.trim();
      if (states.at(-1) !== line) states.push(line);
    },
  } as unknown as ConnectorContext;
  const url = `mqtt://127.0.0.1:${port}`;
  const account = mqttAccountSchema.parse({ url, reconnectPeriodMs: 100, cleanSession: true });
  const c = new ExternalClient("acct", { ...account, url }, ctx, async () => undefined);
  t.after(async () => {
    stopping.abort();
    await c.stop();
  });
  return { c, warnings, states };
}

test("a broker refusing connections for 2 s (~20 reconnect attempts): one warning, one state change", async (t) => {
  const port = await freePort();
  const { c, warnings, states } = client(t, port);
  await c.start();
  await sleep(2_000);
  assert.deepEqual(warnings, ["mqtt broker error"]);
  assert.deepEqual(states, ["connecting", `connecting connect ECONNREFUSED 127.0.0.1:${port}`]);
});

test("after the broker answered, the next outage is logged again, once", async (t) => {
  const broker = await startExternalBroker();
  const { c, warnings, states } = client(t, broker.port);
  await c.start();
  await waitFor("connected", () => states.at(-1) === "up");
  await broker.stop();
  await waitFor("a warning", () => warnings.length > 0);
  await sleep(1_000);
  assert.deepEqual(warnings, ["mqtt broker error"]);
  assert.ok(states.length <= 4, states.join(" | "));
});
