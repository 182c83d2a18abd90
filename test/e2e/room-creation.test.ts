/**
 * A route whose room alias (on our own server) does not exist yet: tribridge creates the room with
 * that alias and invites the route's `invite` users. The homeserver allows that only for aliases in
 * the registration's alias namespaces, which generate-registration writes for the routes, and
 * for every #<roomAliasPrefix>… alias, so that a route added after registering needs no new one.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import mqtt, { type MqttClient } from "mqtt";
import type { RunningBridge } from "../../src/app.js";
import { connectors } from "../../bridges/index.js";
import { validateConfig } from "../../src/config/load.js";
import { buildRegistration } from "../../src/matrix/registration.js";
import { LAB_ROUTE, freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";
import { startBridge } from "../helpers/start-bridge.js";

for (const reserved of [true, false]) {
  describe(`a route's room does not exist, alias ${reserved ? "" : "not "}reserved by the registration`, () => {
    let h: Harness;
    let bridge: RunningBridge;
    let device: MqttClient;

    before(async () => {
      h = await harness({
        bridges: { mqtt: { home: { embedded: { port: await freePort() } } } },
        queue: { maxAttempts: 2 },
        routes: [{ ...LAB_ROUTE, invite: ["@alice:test.local"] }],
      });
      const registration = reserved
        ? h.registration
        : { ...h.registration, namespaces: { ...h.registration.namespaces, aliases: [] } };
      assert.equal(h.registration.namespaces.aliases.length, 2); // #tribridge_…, and #lab
      const started = await startBridge({ config: h.config, registration });
      bridge = started.bridge;
      device = await mqtt.connectAsync(`mqtt://127.0.0.1:${started.ports.mqtt}`, { clientId: "probe" });
    });

    after(async () => {
      await device?.endAsync();
      await bridge?.stop();
      await h?.cleanup();
    });

    if (reserved) {
      test("the room is created with the alias, the invitees invited, and messages arrive", async () => {
        await device.publishAsync("lab/probe/t", "first", { qos: 1 });
        const roomId = await waitFor("the room", () => h.hs.resolveAlias("#lab:test.local"));
        await waitFor("first, in the room", () =>
          h.hs.messages(roomId).some((m) => m.content.body === "first"),
        );
        assert.equal(h.hs.membershipOf(roomId, h.alice), "invite");
      });
    } else {
      test("no room is created, and the failed relay says what to do", async () => {
        await device.publishAsync("lab/probe/t", "first", { qos: 1 });
        const [failed] = await waitFor("a failed relay", async () => {
          const jobs = await bridge.failedJobs();
          return jobs.length > 0 && jobs;
        });
        assert.match(failed!.reason, /room #lab:test\.local does not exist/);
        assert.match(failed!.reason, /generate-registration/);
        assert.equal(h.hs.resolveAlias("#lab:test.local"), undefined);
      });
    }
  });
}

describe("a route added after registering, on a #tribridge_… alias", () => {
  let h: Harness;
  let bridge: RunningBridge;
  let device: MqttClient;

  before(async () => {
    h = await harness({
      bridges: { mqtt: { home: { embedded: { port: await freePort() } } } },
      routes: [{ ...LAB_ROUTE, room: "#tribridge_lab:test.local" }],
    });
    // As the quick start registers: before the config has any route.
    const registered = buildRegistration(
      validateConfig({ ...h.rawConfig, routes: [] }, connectors),
      connectors,
    );
    const registration = { ...h.registration, namespaces: registered.namespaces };
    assert.equal(registration.namespaces.aliases.length, 1);
    const started = await startBridge({ config: h.config, registration });
    bridge = started.bridge;
    device = await mqtt.connectAsync(`mqtt://127.0.0.1:${started.ports.mqtt}`, { clientId: "probe" });
  });

  after(async () => {
    await device?.endAsync();
    await bridge?.stop();
    await h?.cleanup();
  });

  test("its room is created without a new registration, and messages arrive", async () => {
    await device.publishAsync("lab/probe/t", "first", { qos: 1 });
    const roomId = await waitFor("the room", () => h.hs.resolveAlias("#tribridge_lab:test.local"));
    await waitFor("first, in the room", () => h.hs.messages(roomId).some((m) => m.content.body === "first"));
  });
});
