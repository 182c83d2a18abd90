/**
 * Prometheus metrics (metrics.enabled): what was received, relayed, retried and failed, per queue;
 * the homeserver's transactions by outcome; backlog, failed list and connector states read at
 * scrape time; the process's own metrics.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:net";
import mqtt, { type MqttClient } from "mqtt";
import type { RunningBridge } from "../../src/app.js";
import { Metrics } from "../../src/metrics.js";
import { LAB_ROUTE, freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";
import { startBridge } from "../helpers/start-bridge.js";

/** The value of one sample, e.g. sample(text, 'tribridge_messages_relayed_total{queue="to-matrix"}'). */
function sample(text: string, series: string): number | undefined {
  const line = text.split("\n").find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

describe("metrics", () => {
  let h: Harness;
  let bridge: RunningBridge;
  let device: MqttClient;
  let room: string;
  const scrape = async () => {
    const res = await fetch(`http://127.0.0.1:${bridge.metricsPort}/metrics`);
    assert.equal(res.status, 200);
    assert.match(res.headers.get("content-type") ?? "", /^text\/plain/);
    return res.text();
  };

  before(async () => {
    h = await harness({
      metrics: { enabled: true, port: await freePort() },
      bridges: { mqtt: { home: { embedded: { port: 0 } } } },
      routes: [
        LAB_ROUTE,
        // An alias on another server that does not exist: relays into it fail permanently.
        {
          id: "elsewhere",
          room: "#nowhere:other.example",
          endpoints: [{ account: "mqtt.home", direction: "in", topic: "lost/t" }],
        },
      ],
    });
    room = h.hs.createRoom({ creator: h.alice, alias: "#lab:test.local", preset: "public_chat" });
    const started = await startBridge(h);
    bridge = started.bridge;
    device = await mqtt.connectAsync(`mqtt://127.0.0.1:${started.ports.mqtt}`, { clientId: "probe" });
  });

  after(async () => {
    await device?.endAsync();
    await bridge?.stop();
    await h?.cleanup();
  });

  test("counts what was received, relayed and failed, and the homeserver's transactions", async () => {
    await device.subscribeAsync("lab/cmd", { qos: 1 });
    for (const n of [1, 2, 3]) await device.publishAsync("lab/probe/t", `${n}`, { qos: 1 });
    await device.publishAsync("lost/t", "nobody hears this", { qos: 1 });
    await h.hs.waitForMessages(room, 3);
    const command = new Promise((resolve) => device.once("message", resolve));
    h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "hello device" });
    await command;
    const forged = await h.hs.pushRaw("/_matrix/app/v1/transactions/x1", { events: [] }, "wrong-token");
    assert.equal(forged.status, 403);

    // A relay is counted once it is recorded, a moment after the device has the command.
    const text = await waitFor("the failed relay and the command to be counted", async () => {
      const t = await scrape();
      const counted =
        sample(t, 'tribridge_failed_list_length{queue="to-matrix"}') === 1 &&
        sample(t, 'tribridge_messages_relayed_total{queue="to-mqtt"}') === 1;
      return counted ? t : undefined;
    });
    assert.equal(sample(text, 'tribridge_messages_received_total{connector="mqtt",account="home"}'), 4);
    assert.equal(sample(text, 'tribridge_messages_relayed_total{queue="to-matrix"}'), 3);
    assert.equal(sample(text, 'tribridge_messages_relayed_total{queue="to-mqtt"}'), 1);
    assert.equal(sample(text, 'tribridge_messages_failed_total{queue="to-matrix",reason="permanent"}'), 1);
    assert.equal(sample(text, 'tribridge_relay_seconds_count{queue="to-matrix"}'), 3);
    assert.equal(sample(text, 'tribridge_failed_list_length{queue="to-mqtt"}'), 0);
    assert.equal(sample(text, 'tribridge_queue_waiting_jobs{queue="to-matrix"}'), 0);
    assert.equal(sample(text, 'tribridge_transactions_total{outcome="forbidden"}'), 1);
    assert.ok((sample(text, 'tribridge_transactions_total{outcome="relayed"}') ?? 0) >= 1);
    assert.ok((sample(text, 'tribridge_transactions_total{outcome="echo"}') ?? 0) >= 1);
    assert.equal(sample(text, 'tribridge_connector_state{connector="mqtt",account="home",state="up"}'), 1);
    assert.equal(sample(text, 'tribridge_connector_state{connector="mqtt",account="home",state="down"}'), 0);
    assert.ok((sample(text, "tribridge_process_cpu_user_seconds_total") ?? 0) > 0);
  });

  test("only GET /metrics is served", async () => {
    const res = await fetch(`http://127.0.0.1:${bridge.metricsPort}/`);
    assert.equal(res.status, 404);
    await res.body?.cancel();
  });

  test("a metrics port in use is a clear error naming metrics.port", async () => {
    const taken = createServer();
    const port = await freePort();
    await new Promise<void>((r) => taken.listen(port, "127.0.0.1", () => r()));
    try {
      const m = new Metrics({ queues: async () => ({}), connectors: () => ({}), destinations: () => ({}) });
      await assert.rejects(m.listen(port, "127.0.0.1"), {
        message: `metrics.port ${port} on 127.0.0.1 is already in use`,
      });
    } finally {
      taken.close();
    }
  });
});
