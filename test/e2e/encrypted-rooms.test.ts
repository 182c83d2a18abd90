/**
 * Rooms with end-to-end encryption, which tribridge does not support yet: it cannot read their
 * messages nor encrypt its own. Nothing about them is silent: a route or command room that is (or
 * becomes) encrypted gets one notice saying what is going on and what to do, remembered across
 * restarts; every event it cannot read is counted and logged; `!tribridge status` marks the rooms;
 * and nothing is posted into them in plaintext (relays wait in the failed list instead).
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { start, type RunningBridge } from "../../src/app.js";
import type { Config } from "../../src/config/load.js";
import { freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";
import { testConnector, type TestConnector } from "../helpers/test-connector.js";

describe("encrypted rooms", () => {
  const connectors = [testConnector()];
  let h: Harness;
  let config: Config;
  let bridge: RunningBridge;
  let remote: TestConnector;
  let bot: string;
  let secret: string; // a route's room, encrypted from the start
  let later: string; // a route's room that becomes encrypted while the bridge runs
  let admin: string; // an admin's unencrypted room with the bot, for commands

  const notices = (roomId: string) =>
    h.hs.messages(roomId).filter((m) => m.sender === bot && /encrypted/.test(String(m.content.body)));
  const ghostMessages = (roomId: string) =>
    h.hs.messages(roomId).filter((m) => m.sender !== bot && m.sender !== h.alice);

  async function ask(roomId: string, body: string): Promise<string> {
    const asked = h.hs.sendMessage(roomId, h.alice, { msgtype: "m.text", body });
    const answer = await waitFor(`the answer to "${body}"`, () => {
      const events = h.hs.messages(roomId);
      return events.slice(events.findIndex((e) => e.event_id === asked) + 1).find((e) => e.sender === bot);
    });
    return String(answer.content.body);
  }

  async function scrape(): Promise<string> {
    return (await fetch(`http://127.0.0.1:${bridge.metricsPort}/metrics`)).text();
  }

  async function startBridge(): Promise<void> {
    bridge = await start({ config, registration: h.registration, connectors });
    remote = bridge.connector("test.a") as TestConnector;
  }

  before(async () => {
    h = await harness({
      connectors,
      metrics: { enabled: true, port: await freePort() },
      bridges: { test: { a: {} } },
      routes: [
        {
          id: "secret",
          room: "#secret:test.local",
          endpoints: [{ account: "test.a", direction: "inout", channel: "secret" }],
        },
        {
          id: "later",
          room: "#later:test.local",
          endpoints: [{ account: "test.a", direction: "inout", channel: "later" }],
        },
      ],
    });
    config = { ...h.config, appservice: { ...h.config.appservice, admins: [h.alice] } };
    bot = h.hs.appserviceUserId;
    secret = h.hs.createRoom({
      creator: h.alice,
      alias: "#secret:test.local",
      preset: "public_chat",
      encrypted: true,
    });
    later = h.hs.createRoom({ creator: h.alice, alias: "#later:test.local", preset: "public_chat" });
    admin = h.hs.createRoom({ creator: h.alice, preset: "private_chat", invite: [bot] });
    await startBridge();
    await waitFor("the bot in the admin room", () => h.hs.membershipOf(admin, bot) === "join");
  });

  after(async () => {
    await bridge?.stop();
    await h?.cleanup();
  });

  test("a route room encrypted at start gets one notice: what is going on and what to do", async () => {
    const [notice] = await waitFor("the notice", () => notices(secret).length > 0 && notices(secret));
    assert.equal(notice!.content.msgtype, "m.notice");
    const text = String(notice!.content.body);
    assert.match(text, /end-to-end encrypted/);
    assert.match(text, /not relayed|nothing is relayed/i);
    assert.match(text, /cannot be turned off/);
    assert.match(text, /new room without encryption/);
    assert.match(text, /secret/, "names the route");
  });

  test("nothing goes into an encrypted route room in plaintext: the relay waits in the failed list", async () => {
    await remote.emit("secret", { remoteId: "r1", sender: { id: "dev" }, body: { text: "reading 1" } });
    const failed = await waitFor("the failed relay", async () => {
      const jobs = await bridge.failedJobs();
      return jobs.length > 0 && jobs;
    });
    assert.match(failed[0]!.reason, /encrypted/);
    assert.deepEqual(ghostMessages(secret), [], "no plaintext message from a ghost");
  });

  test("events it cannot read are counted and logged, not dropped without a trace", async () => {
    for (let i = 0; i < 3; i++) h.hs.sendEncrypted(secret, h.alice);
    await waitFor("the count", async () =>
      /tribridge_undecryptable_events_total\{room="route"\} 3\b/.test(await scrape()),
    );
    assert.deepEqual(remote.sentTo("secret"), []);
  });

  test("a route room that becomes encrypted gets its notice then; relays stop going in", async () => {
    await remote.emit("later", { remoteId: "r2", sender: { id: "dev" }, body: { text: "before" } });
    await h.hs.waitForMessages(later, 1);
    h.hs.enableEncryption(later, h.alice);
    await waitFor("the notice", () => notices(later).length === 1);
    await remote.emit("later", { remoteId: "r3", sender: { id: "dev" }, body: { text: "after" } });
    await waitFor("the second failed relay", async () => (await bridge.failedJobs()).length === 2);
    assert.deepEqual(
      ghostMessages(later).map((m) => m.content.body),
      ["before"],
    );
  });

  test("!tribridge status marks the encrypted rooms", async () => {
    const status = await ask(admin, "!tribridge status");
    assert.match(status, /encrypted/i);
    assert.match(status, /route secret/);
    assert.match(status, /route later/);
    assert.match(status, /3 unreadable event/);
  });

  test("a command room that becomes encrypted gets a notice too", async () => {
    const commands = h.hs.createRoom({ creator: h.alice, preset: "private_chat", invite: [bot] });
    await waitFor("the bot to join", () => h.hs.membershipOf(commands, bot) === "join");
    h.hs.enableEncryption(commands, h.alice);
    const [notice] = await waitFor("the notice", () => notices(commands).length > 0 && notices(commands));
    assert.match(String(notice!.content.body), /commands/);
    assert.match(String(notice!.content.body), /cannot be turned off/);
    // A room the bot is invited to that is encrypted already: told when it joins.
    const born = h.hs.createRoom({
      creator: h.alice,
      preset: "private_chat",
      invite: [bot],
      encrypted: true,
    });
    await waitFor("the notice in a room encrypted from the start", () => notices(born).length === 1);
  });

  test("after a restart, the rooms are known encrypted again, and the notices are not repeated", async () => {
    await bridge.stop();
    await startBridge();
    assert.match(await ask(admin, "!tribridge status"), /route secret/);
    await remote.emit("secret", { remoteId: "r4", sender: { id: "dev" }, body: { text: "reading 2" } });
    await waitFor("the third failed relay", async () => (await bridge.failedJobs()).length === 3);
    assert.equal(notices(secret).length, 1);
    assert.equal(notices(later).length, 1);
    assert.deepEqual(ghostMessages(secret), []);
  });
});
