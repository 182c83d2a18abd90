/**
 * MSC2346 bridge information: a route's room carries one `m.bridge` (and `uk.half-shot.bridge`)
 * state event per channel it is bridged to; a restart sends none again; a channel gone from the
 * config is emptied; a room where the bot may not send state does not stop the bridge.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { connectors } from "../../bridges/index.js";
import type { RunningBridge } from "../../src/app.js";
import { validateConfig } from "../../src/config/load.js";
import { LAB_ROUTE, freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";
import { startBridge } from "../helpers/start-bridge.js";

const TYPES = ["m.bridge", "uk.half-shot.bridge"];
const IN_KEY = "tribridge://mqtt/home/lab%2F+%2Ft";
const OUT_KEY = "tribridge://mqtt/home/lab%2Fcmd";

describe("bridge information state events (MSC2346)", () => {
  let h: Harness;
  let bridge: RunningBridge | undefined;
  let bot: string;
  let office: string;
  let routes: unknown[];

  before(async () => {
    const officeRoute = {
      id: "office",
      room: "",
      endpoints: [{ account: "mqtt.home", direction: "in", topic: "office/+/t" }],
    };
    h = await harness({
      bridges: { mqtt: { home: { embedded: { port: await freePort() } } } },
      routes: [LAB_ROUTE],
    });
    bot = `@${h.registration.sender_localpart}:test.local`;
    // A room of Alice's where the bot is invited but, at power level 0, may not send state events.
    office = h.hs.createRoom({ creator: h.alice, invite: [bot] });
    routes = [LAB_ROUTE, { ...officeRoute, room: office }];
  });

  after(async () => {
    await bridge?.stop();
    await h?.cleanup();
  });

  const start = async (withRoutes: unknown[]) => {
    const config = validateConfig({ ...h.rawConfig, routes: withRoutes }, connectors);
    bridge = (await startBridge({ config, registration: h.registration })).bridge;
  };
  const bridgeEvents = (roomId: string) => h.hs.events(roomId).filter((e) => TYPES.includes(e.type));

  test("the route's room gets both events per channel, with the channel described", async () => {
    await start(routes);
    const lab = await waitFor("the lab room", () => h.hs.resolveAlias("#lab:test.local"));
    for (const type of TYPES) {
      const incoming = h.hs.stateEvent(lab, type, IN_KEY);
      assert.equal(incoming?.sender, bot);
      assert.deepEqual(incoming.content, {
        bridgebot: bot,
        creator: bot,
        protocol: { id: "mqtt", displayname: "MQTT" },
        network: { id: "home", displayname: "embedded broker home" },
        channel: { id: "lab/+/t", displayname: "lab/+/t" },
      });
      assert.deepEqual(h.hs.stateEvent(lab, type, OUT_KEY)?.content.channel, {
        id: "lab/cmd",
        displayname: "lab/cmd",
      });
    }
    assert.equal(bridgeEvents(lab).length, 4);
    // Refused there (power level 0), and the bridge started all the same.
    assert.equal(h.hs.membershipOf(office, bot), "join");
    assert.equal(bridgeEvents(office).length, 0);
  });

  test("a restart with the same routes sends none again", async () => {
    const lab = h.hs.resolveAlias("#lab:test.local")!;
    const before = h.hs.events(lab).length;
    await bridge!.stop();
    await start(routes);
    assert.equal(h.hs.events(lab).length, before);
  });

  test("a channel no route has any more is emptied, the others are left alone", async () => {
    const lab = h.hs.resolveAlias("#lab:test.local")!;
    await bridge!.stop();
    await start([{ ...LAB_ROUTE, endpoints: LAB_ROUTE.endpoints.slice(0, 1) }]);
    for (const type of TYPES) {
      assert.deepEqual(h.hs.stateEvent(lab, type, OUT_KEY)?.content, {});
      assert.equal(h.hs.stateEvent(lab, type, IN_KEY)?.content.bridgebot, bot);
    }
    assert.equal(bridgeEvents(lab).length, 6);
  });
});
