/**
 * The config file read again while the bridge runs: on SIGHUP (the bridge as its own process) and
 * with `!tribridge reload`. Routes and admins apply at once; messages queued meanwhile are neither
 * lost nor reordered; other changes are named as needing a restart; a file that does not load
 * changes nothing and says why, naming the key.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import mqtt, { type MqttClient } from "mqtt";
import { stringify } from "yaml";
import { connectors } from "../../bridges/index.js";
import type { MqttConnector } from "../../bridges/mqtt/connector.js";
import { start, type RunningBridge } from "../../src/app.js";
import { loadConfig } from "../../src/config/load.js";
import { BridgeProcess } from "../helpers/bridge-process.js";
import { freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";

const QUEUED = 100;

/** `raw` with its routes replaced, and other keys changed as given. */
function withRoutes(raw: Record<string, unknown>, routes: unknown[], more: Record<string, unknown> = {}) {
  return { ...raw, ...more, routes };
}

const SEQ_ROUTE = {
  id: "seq",
  room: "#seq:test.local",
  endpoints: [{ account: "mqtt.home", direction: "in", topic: "seq/#", sender: "clientId", notice: false }],
};
const MORE_ROUTE = {
  id: "more",
  room: "#more:test.local",
  endpoints: [{ account: "mqtt.home", direction: "in", topic: "more/#", notice: false }],
};

async function connectDevice(port: number, clientId: string): Promise<MqttClient> {
  const client = mqtt.connect(`mqtt://127.0.0.1:${port}`, { clientId, reconnectPeriod: 100 });
  await waitFor(`${clientId} connected`, () => client.connected, 30_000);
  return client;
}

describe("SIGHUP reloads the config file", { timeout: 120_000 }, () => {
  let h: Harness;
  let bridge: BridgeProcess;
  let device: MqttClient | undefined;
  let port: number;

  before(async () => {
    port = await freePort();
    h = await harness({ bridges: { mqtt: { home: { embedded: { port } } } }, routes: [SEQ_ROUTE] });
    bridge = new BridgeProcess(h, { capture: true });
  });

  after(async () => {
    await device?.endAsync(true);
    await bridge?.kill("SIGKILL");
    await h?.cleanup();
  });

  /** Sends SIGHUP and waits for the bridge's answer on stderr, until it says `expected`. */
  async function hangUp(expected: RegExp): Promise<string> {
    const seen = bridge.stderr.length;
    bridge.signal("SIGHUP");
    return waitFor(`the reload's answer ${expected}`, () => {
      const said = bridge.stderr.slice(seen);
      return expected.test(said) && said;
    });
  }

  test(`${QUEUED} messages queued while the homeserver is away, a route added and theirs changed: all arrive, in order`, async () => {
    const seq = h.hs.createRoom({ creator: h.alice, alias: "#seq:test.local", preset: "public_chat" });
    const more = h.hs.createRoom({ creator: h.alice, alias: "#more:test.local", preset: "public_chat" });
    bridge.start();
    device = await connectDevice(port, "counter");
    await device.publishAsync("seq/n", "first", { qos: 1 });
    await h.hs.waitForMessages(seq, 1, 30_000);

    await h.hs.outage("bad-gateway");
    // Each PUBACK comes once the message is queued.
    for (let i = 0; i < QUEUED; i++) await device.publishAsync("seq/n", String(i), { qos: 1 });
    // The queued messages' endpoint changes too, in a field that keeps its id (how, not where).
    const seqChanged = { ...SEQ_ROUTE, endpoints: [{ ...SEQ_ROUTE.endpoints[0], qos: 2 }] };
    bridge.writeConfig(
      withRoutes(h.rawConfig, [MORE_ROUTE, seqChanged], {
        queue: { ...(h.rawConfig.queue as object), shards: 8 },
      }),
    );
    const answer = await hangUp(/SIGHUP: Config reloaded: .*\n/);
    assert.match(
      answer,
      /SIGHUP: Config reloaded: routes: 1 added \(more\), 1 changed \(seq\); needs a restart: queue\.shards\n/,
    );
    await device.publishAsync("more/x", "on the new route", { qos: 1 });
    await h.hs.endOutage();

    const arrived = await h.hs.waitForMessages(seq, QUEUED + 1, 60_000);
    assert.deepEqual(
      arrived.map((m) => m.content.body),
      ["first", ...Array.from({ length: QUEUED }, (_, i) => String(i))],
    );
    const [onNew] = await h.hs.waitForMessages(more, 1, 30_000);
    assert.equal(onNew!.content.body, "on the new route");
  });

  test("a file that does not load: the running config stays, the key is named", async () => {
    const broken = structuredClone(MORE_ROUTE) as { endpoints: Record<string, unknown>[] };
    broken.endpoints[0]!.direction = "out"; // a wildcard cannot be published to
    bridge.writeConfig(withRoutes(h.rawConfig, [SEQ_ROUTE, broken]));
    const answer = await hangUp(/routes\[1\]\.endpoints\[0\]\.topic: wildcards are not allowed/);
    assert.match(answer, /SIGHUP: Config not reloaded, the running config stays:\n/);
    const more = h.hs.resolveAlias("#more:test.local")!;
    await device!.publishAsync("more/x", "still relayed", { qos: 1 });
    await waitFor("the message on the route the broken file would change", () =>
      h.hs.messages(more).some((m) => m.content.body === "still relayed"),
    );
  });
});

describe("!tribridge reload", { timeout: 60_000 }, () => {
  let h: Harness;
  let bridge: RunningBridge;
  let device: MqttClient;
  let file: string;
  let raw: Record<string, unknown>;
  let bob: string;
  let bot: string;
  const published: string[] = [];

  async function ask(roomId: string, sender: string, body: string): Promise<string> {
    const asked = h.hs.sendMessage(roomId, sender, { msgtype: "m.text", body });
    const answer = await waitFor(`the answer to "${body}"`, () => {
      const events = h.hs.messages(roomId);
      const at = events.findIndex((e) => e.event_id === asked);
      return events.slice(at + 1).find((e) => e.sender === bot);
    });
    return String(answer.content.body);
  }

  before(async () => {
    h = await harness({ bridges: { mqtt: { home: { embedded: { port: 0 } } } }, routes: [SEQ_ROUTE] });
    bob = h.hs.registerUser("bob", "Bob");
    bot = h.hs.appserviceUserId;
    raw = { ...h.rawConfig, appservice: { ...(h.rawConfig.appservice as object), admins: [h.alice] } };
    file = join(mkdtempSync(join(tmpdir(), "tribridge-reload-")), "config.yaml");
    writeFileSync(file, stringify(raw));
    const load = () => loadConfig(file, connectors, {});
    const seq = h.hs.createRoom({ creator: h.alice, alias: "#seq:test.local", preset: "public_chat" });
    h.hs.joinRoom(seq, bob);
    bridge = await start({ config: load(), registration: h.registration, connectors, reloadConfig: load });
    const mqttPort = (bridge.connector("mqtt.home") as MqttConnector).ports!.tcp;
    device = await mqtt.connectAsync(`mqtt://127.0.0.1:${mqttPort}`, { clientId: "cmd-device" });
    await device.subscribeAsync("more/cmd", { qos: 1 });
    device.on("message", (_topic, payload) => published.push(payload.toString()));
  });

  after(async () => {
    await device?.endAsync();
    await bridge?.stop();
    await h?.cleanup();
  });

  test("routes and admins from the file apply at once; other changes need a restart", async () => {
    const seq = h.hs.resolveAlias("#seq:test.local")!;
    const more = h.hs.createRoom({ creator: h.alice, alias: "#more:test.local", preset: "public_chat" });
    assert.equal(await ask(seq, h.alice, "!tribridge reload"), "Config reloaded: no changes");

    const moreInout = {
      ...MORE_ROUTE,
      endpoints: [...MORE_ROUTE.endpoints, { account: "mqtt.home", direction: "out", topic: "more/cmd" }],
    };
    writeFileSync(
      file,
      stringify(
        withRoutes(raw, [SEQ_ROUTE, moreInout], {
          appservice: { ...(raw.appservice as object), admins: [h.alice, bob], port: 1 },
        }),
      ),
    );
    const answer = await ask(seq, h.alice, "!tribridge reload");
    assert.match(answer, /^Config reloaded: routes: 1 added \(more\)/);
    assert.match(answer, /appservice\.admins: @alice:test\.local, @bob:test\.local/);
    assert.match(answer, /needs a restart: appservice\.port, appservice\.url$/);

    await device.publishAsync("more/sensor", "new route in", { qos: 1 });
    await waitFor("the device's message in the new route's room", () =>
      h.hs.messages(more).some((m) => m.content.body === "new route in"),
    );
    h.hs.sendMessage(more, h.alice, { msgtype: "m.text", body: "new route out" });
    await waitFor("the room's message on MQTT", () => published.includes("new route out"));
    assert.match(await ask(seq, bob, "!tribridge status"), /running with 2 route\(s\)/);
  });

  test("an invalid file keeps the running config and names the key", async () => {
    const seq = h.hs.resolveAlias("#seq:test.local")!;
    writeFileSync(file, stringify({ ...raw, routes: [{ ...SEQ_ROUTE, rooom: "#x:test.local" }] }));
    const answer = await ask(seq, h.alice, "!tribridge reload");
    assert.match(answer, /^Config not reloaded, the running config stays:\nroutes\[0\]\.rooom: unknown key$/);
    assert.match(await ask(seq, bob, "!tribridge status"), /running with 2 route\(s\)/);
  });
});
