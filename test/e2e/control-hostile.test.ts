/**
 * The room controls (issue 16) against a hostile room, from outside: odd power levels pushed as
 * the homeserver would (AS API §Pushing events), relations to events nobody knows, commands with
 * huge, unicode, unbalanced or prototype-reaching arguments, and a flood of link attempts. Every
 * transaction gets its 200, every command its answer, and nothing reaches a prototype.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import mqtt, { type MqttClient } from "mqtt";
import { stringify } from "yaml";
import type { RunningBridge } from "../../src/app.js";
import { REFUSED_KEY } from "../../src/matrix/permissions.js";
import { MAX_LINKS_PER_ROOM } from "../../src/routing/room-links.js";
import { BridgeProcess } from "../helpers/bridge-process.js";
import { freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";
import { startBridge } from "../helpers/start-bridge.js";

/** Link attempts in one room: far beyond the cap, each answered (10,000 take about 35 s here). */
const LINK_ATTEMPTS = Number(process.env.TRIBRIDGE_TEST_LINK_ATTEMPTS ?? 2_000);

describe("room controls against a hostile room", { timeout: 300_000 }, () => {
  let h: Harness;
  let bridge: RunningBridge;
  let device: MqttClient;
  let lab: string; // a route's room: bob may relay by power level only
  let linkRoom: string; // a room the bot was invited to, for links
  let bot: string;
  let bob: string;
  let txn = 0;
  const published: { topic: string; body: string }[] = [];

  /** Pushes `events` as one transaction, as the homeserver would; it must be taken (200). */
  async function push(events: Record<string, unknown>[]): Promise<void> {
    const r = await h.hs.pushRaw(`/_matrix/app/v1/transactions/hostile16-${++txn}`, { events });
    assert.equal(r.status, 200, JSON.stringify(r.body));
  }

  const stateEvent = (roomId: string, type: string, content: unknown, stateKey = "") => ({
    event_id: `$forged-${++txn}-${type}`,
    room_id: roomId,
    sender: h.alice,
    type,
    state_key: stateKey,
    origin_server_ts: Date.now(),
    content,
  });

  /** bob says `body` in the lab room: relayed to MQTT, or refused with the bot's ⛔. */
  async function bobSays(body: string): Promise<"relayed" | "refused"> {
    const eventId = h.hs.sendMessage(lab, bob, { msgtype: "m.text", body });
    return waitFor(`what became of "${body}"`, () => {
      if (published.some((p) => p.topic === "lab/chat" && p.body === body)) return "relayed";
      const refused = h.hs.events(lab).some((e) => {
        const rel = e.content["m.relates_to"] as { event_id?: string; key?: string } | undefined;
        return (
          e.sender === bot && e.type === "m.reaction" && rel?.event_id === eventId && rel.key === REFUSED_KEY
        );
      });
      return refused && "refused";
    });
  }

  async function ask(roomId: string, body: string): Promise<string> {
    const asked = h.hs.sendMessage(roomId, h.alice, { msgtype: "m.text", body });
    const answer = await waitFor(`the answer to "${body.slice(0, 60)}"`, () =>
      h.hs.events(roomId).find((e) => {
        const rel = e.content["m.relates_to"] as { "m.in_reply_to"?: { event_id?: string } } | undefined;
        return e.sender === bot && rel?.["m.in_reply_to"]?.event_id === asked;
      }),
    );
    return String(answer.content.body);
  }

  before(async () => {
    h = await harness({
      bridges: { mqtt: { home: { embedded: { port: 0 } } } },
      routes: [
        {
          id: "lab",
          room: "#lab:test.local",
          endpoints: [{ account: "mqtt.home", direction: "inout", topic: "lab/chat", notice: false }],
        },
      ],
    });
    bot = h.hs.appserviceUserId;
    bob = h.hs.registerUser("bob", "Bob");
    lab = h.hs.createRoom({ creator: h.alice, alias: "#lab:test.local", preset: "public_chat" });
    h.hs.joinRoom(lab, bob);
    linkRoom = h.hs.createRoom({ creator: h.alice, preset: "private_chat", invite: [bot] });
    const config = { ...h.config, appservice: { ...h.config.appservice, admins: [h.alice] } };
    const started = await startBridge({ config, registration: h.registration });
    bridge = started.bridge;
    device = await mqtt.connectAsync(`mqtt://127.0.0.1:${started.ports.mqtt}`, { clientId: "listener" });
    await device.subscribeAsync("#", { qos: 1 });
    device.on("message", (topic, payload) => published.push({ topic, body: payload.toString() }));
    await waitFor("the bot in the link room", () => h.hs.membershipOf(linkRoom, bot) === "join");
  });

  after(async () => {
    await device?.endAsync();
    await bridge?.stop();
    await h?.cleanup();
  });

  test("odd power levels: integers and digit strings count, anything else falls back; other rooms' and other state keys' levels do not apply", async () => {
    assert.equal(await bobSays("as the room is: level 0"), "refused");
    const cases: [string, unknown, "relayed" | "refused", string?][] = [
      ["a digit string", { users: { [bob]: "100" } }, "relayed"],
      ["a huge integer", { users: { [bob]: 1e300 } }, "relayed"],
      ["negative, over a high default", { users: { [bob]: -5 }, users_default: 100 }, "refused"],
      ["a float: not a level, the default applies", { users: { [bob]: 50.5 }, users_default: 0 }, "refused"],
      ["no users, a default of 50", { users_default: 50 }, "relayed"],
      ["users a string, a default of letters", { users: bob, users_default: "high" }, "refused"],
      ["users a list", { users: [bob, 100], users_default: 0 }, "refused"],
      ["content a list", [bob, 100], "refused"],
      ["a huge digit string", { users: { [bob]: "9".repeat(400) } }, "relayed"],
      ["a negative digit string", { users: { [bob]: " -100 " }, users_default: 100 }, "refused"],
    ];
    for (const [what, content, expected] of cases) {
      await push([stateEvent(lab, "m.room.power_levels", content)]);
      assert.equal(await bobSays(`power levels: ${what}`), expected, what);
    }
    // Levels under another state key, or of a room that is no route's, leave this room's alone.
    await push([stateEvent(lab, "m.room.power_levels", { users: { [bob]: 100 } }, "not-empty")]);
    await push([stateEvent("!elsewhere:test.local", "m.room.power_levels", { users: { [bob]: 100 } })]);
    await push([
      stateEvent(lab, "m.room.create", null),
      stateEvent(lab, "m.room.create", { room_version: 12 }),
    ]);
    assert.equal(await bobSays("levels of another key and room"), "refused");
  });

  test("relations to events nobody knows: taken, nothing breaks, the next message goes out", async () => {
    const unknown = "$never-seen:test.local";
    const ev = (content: Record<string, unknown>, type = "m.room.message") => ({
      event_id: `$rel-${++txn}`,
      room_id: lab,
      sender: h.alice,
      type,
      origin_server_ts: Date.now(),
      content,
    });
    await push([
      ev({ "m.relates_to": { rel_type: "m.annotation", event_id: unknown, key: "👍" } }, "m.reaction"),
      ev({ "m.relates_to": { rel_type: "m.annotation", event_id: 42, key: { x: 1 } } }, "m.reaction"),
      ev({
        msgtype: "m.text",
        body: "* edited",
        "m.new_content": { msgtype: "m.text", body: "edited" },
        "m.relates_to": { rel_type: "m.replace", event_id: unknown },
      }),
      ev({ msgtype: "m.text", body: "a reply", "m.relates_to": { "m.in_reply_to": { event_id: unknown } } }),
      ev({
        msgtype: "m.text",
        body: "in a thread",
        "m.relates_to": { rel_type: "m.thread", event_id: unknown },
      }),
      ev({ msgtype: "m.text", body: "odd reply", "m.relates_to": { "m.in_reply_to": "x" } }),
      { ...ev({ reason: "gone" }, "m.room.redaction"), redacts: unknown },
    ]);
    h.hs.sendMessage(lab, h.alice, { msgtype: "m.text", body: "after the odd relations" });
    await waitFor("the message after them", () =>
      published.some((p) => p.body === "after the odd relations"),
    );
    const bodies = published.map((p) => p.body);
    for (const body of ["a reply", "in a thread", "odd reply"]) assert.ok(bodies.includes(body), body);
  });

  test("commands with huge, unicode, unbalanced or prototype-reaching arguments are answered, and reach no prototype", async () => {
    const huge = "x".repeat(60_000);
    assert.match(
      await ask(linkRoom, `!tribridge ${huge}`),
      /^Unknown command "x+… \(cut: too long to answer in full\)$/,
    );
    assert.match(
      await ask(linkRoom, `!tribridge link mqtt.home ${"a/".repeat(20_000)}b`),
      /^(Not linked|Linked)/,
    );
    assert.match(
      await ask(linkRoom, `!tribridge link mqtt.home room/q out x=${huge}`),
      /^Not linked: x: unknown key$/,
    );
    assert.match(
      await ask(linkRoom, "!tribridge link mqtt.home läb/🌡️/ünïcode out"),
      /^Linked mqtt\.home läb\/🌡️\/ünïcode \(out\) to this room/,
    );
    assert.match(
      await ask(linkRoom, '!tribridge link mqtt.home room/q out template="{{ unbalanced'),
      /^Not linked: template: /,
    );
    assert.match(await ask(linkRoom, `!tribridge link mqtt.home room/q out "unbalanced`), /^Not linked: /);
    assert.match(
      await ask(linkRoom, "!tribridge link mqtt.home room/q out format=__proto__.x"),
      /^Not linked: format: /,
    );
    for (const key of [
      "__proto__.polluted",
      "sender.constructor.prototype.polluted",
      "sender.__proto__.polluted",
    ])
      assert.equal(
        await ask(linkRoom, `!tribridge link mqtt.home room/q in ${key}=1`),
        `Not linked: ${key}: not a config key`,
      );
    assert.match(
      await ask(linkRoom, "!tribridge link mqtt.home room/q in toString=1"),
      /^Not linked: toString: unknown key$/,
    );
    assert.match(await ask(linkRoom, "!tribridge unlink 'a b' c d e"), /^Usage: !tribridge unlink/);
    assert.match(
      await ask(linkRoom, `!tribridge unlink ${huge}`),
      /^Nothing linked in this room matches "x+…/,
    );
    assert.equal(({} as Record<string, unknown>).polluted, undefined);
  });

  test("100 commands from someone who is not an admin: told once, the rest logged, not answered", async () => {
    const asked = Array.from({ length: 100 }, (_, i) =>
      h.hs.sendMessage(lab, bob, { msgtype: "m.text", body: `!tribridge link mqtt.home spam/${i} out` }),
    );
    const sentinel = await ask(lab, "!tribridge routes"); // alice's: answered after bob's were handled
    assert.match(sentinel, /Route lab/);
    await sleep(200);
    const answered = h.hs.events(lab).filter((e) => {
      const rel = e.content["m.relates_to"] as { "m.in_reply_to"?: { event_id?: string } } | undefined;
      return e.sender === bot && asked.includes(rel?.["m.in_reply_to"]?.event_id ?? "");
    });
    assert.equal(answered.length, 1);
    assert.match(String(answered[0]!.content.body), /^Only tribridge's admins/);
    assert.ok(!published.some((p) => p.topic.startsWith("spam/")));
  });

  test(`${LINK_ATTEMPTS} link attempts in one room: ${MAX_LINKS_PER_ROOM} links, every other attempt answered as refused`, async () => {
    const room = h.hs.createRoom({ creator: h.alice, preset: "private_chat", invite: [bot] });
    await waitFor("the bot in the flooded room", () => h.hs.membershipOf(room, bot) === "join");
    const started = Date.now();
    for (let i = 0; i < LINK_ATTEMPTS; i++)
      h.hs.sendMessage(room, h.alice, {
        msgtype: "m.text",
        body: `!tribridge link mqtt.home flood/${i} out`,
      });
    const answers = await waitFor(
      `${LINK_ATTEMPTS} answers`,
      () => {
        const all = h.hs.events(room).filter((e) => e.sender === bot && e.type === "m.room.message");
        return all.length >= LINK_ATTEMPTS && all.map((e) => String(e.content.body));
      },
      240_000,
    );
    const linked = answers.filter((a) => a.startsWith("Linked "));
    const capped = answers.filter((a) =>
      /^Not linked: this room has \d+ links, the most a room may have/.test(a),
    );
    console.log(
      `${LINK_ATTEMPTS} link attempts answered in ${Date.now() - started} ms: ${linked.length} linked, ${capped.length} refused at the cap`,
    );
    assert.equal(linked.length, MAX_LINKS_PER_ROOM);
    assert.equal(capped.length, LINK_ATTEMPTS - MAX_LINKS_PER_ROOM);
    assert.equal(answers.length, LINK_ATTEMPTS, "one answer each");
    const routes = await ask(room, "!tribridge routes");
    assert.equal(
      routes.split("\n").filter((l) => / flood\/\d+;/.test(l) || /topic=flood\//.test(l)).length,
      MAX_LINKS_PER_ROOM,
    );
  });
});

describe("a SIGHUP storm, and a config file cut short", { timeout: 180_000 }, () => {
  const SEQ = {
    id: "seq",
    room: "#seq:test.local",
    endpoints: [{ account: "mqtt.home", direction: "in", topic: "seq/#", notice: false }],
  };
  const MORE = {
    id: "more",
    room: "#more:test.local",
    endpoints: [{ account: "mqtt.home", direction: "in", topic: "more/#", notice: false }],
  };
  const FLOW = 300;
  let h: Harness;
  let bridge: BridgeProcess;
  let device: MqttClient | undefined;
  let seq: string;
  let sent = 0;

  before(async () => {
    const port = await freePort();
    h = await harness({ bridges: { mqtt: { home: { embedded: { port } } } }, routes: [SEQ] });
    seq = h.hs.createRoom({ creator: h.alice, alias: "#seq:test.local", preset: "public_chat" });
    h.hs.createRoom({ creator: h.alice, alias: "#more:test.local", preset: "public_chat" });
    bridge = new BridgeProcess(h, { capture: true });
    bridge.start();
    device = mqtt.connect(`mqtt://127.0.0.1:${port}`, { clientId: "counter", reconnectPeriod: 100 });
    await waitFor("the device connected", () => device!.connected, 60_000);
  });

  after(async () => {
    await device?.endAsync(true);
    await bridge?.kill("SIGKILL");
    await h?.cleanup();
  });

  const bodies = () => h.hs.messages(seq).map((m) => String(m.content.body));
  /** The device's messages so far arrived in the seq room: once each, in order. */
  async function allArrived(): Promise<void> {
    await waitFor(`${sent} messages in the room`, () => bodies().length >= sent, 60_000);
    assert.deepEqual(
      bodies(),
      Array.from({ length: sent }, (_, i) => String(i)),
    );
  }
  /** The answers to SIGHUPs after stderr offset `from`. */
  const answers = (from: number) => bridge.stderr.slice(from).match(/^SIGHUP: .*$/gm) ?? [];

  test("two storms of 10 SIGHUPs in one second while messages flow: none lost, none reordered, none twice; each answered once", async () => {
    const from = bridge.stderr.length;
    let storming = true;
    const flowing = (async () => {
      while (storming || sent < FLOW) await device!.publishAsync("seq/n", String(sent++), { qos: 1 });
    })();
    await waitFor("the flow started", () => bodies().length > 5, 30_000);
    const started = Date.now();
    // The first storm adds a route, the second takes it away again; the flow's route stays.
    for (const routes of [[SEQ, MORE], [SEQ]]) {
      bridge.writeConfig({ ...h.rawConfig, routes });
      for (let i = 0; i < 10; i++) {
        bridge.signal("SIGHUP");
        await sleep(100);
      }
    }
    storming = false;
    await flowing;
    const said = await waitFor(
      "an answer to each SIGHUP",
      () => answers(from).length >= 20 && answers(from),
      60_000,
    );
    console.log(`# 20 SIGHUPs answered within ${Date.now() - started} ms; ${sent} messages sent meanwhile`);
    await allArrived();
    assert.equal(bridge.exit, undefined, "still running");
    assert.equal(said.length, 20);
    assert.equal(
      said.filter((a) => a === "SIGHUP: Config reloaded: routes: 1 added (more)").length,
      1,
      said.join("\n"),
    );
    assert.equal(
      said.filter((a) => a === "SIGHUP: Config reloaded: routes: 1 removed (more)").length,
      1,
      said.join("\n"),
    );
    assert.equal(said.filter((a) => a === "SIGHUP: Config reloaded: no changes").length, 18, said.join("\n"));
  });
  /** Sends SIGHUP and waits for its answer. */
  async function hangUp(): Promise<string> {
    const from = bridge.stderr.length;
    bridge.signal("SIGHUP");
    const [answer] = await waitFor("the answer to SIGHUP", () => answers(from).length > 0 && answers(from));
    const rest = bridge.stderr.slice(from);
    return answer!.startsWith("SIGHUP: Config not reloaded") ? rest.trim() : answer!;
  }

  test("a file replaced while the SIGHUP comes is read once written; one cut short keeps the running config and names the line or key", async () => {
    const full = stringify({ ...h.rawConfig, routes: [SEQ] });
    const cut = (marker: string) => full.slice(0, full.indexOf(marker));
    bridge.writeConfig(cut("routes:")); // still a valid config: one without routes
    bridge.signal("SIGHUP");
    await sleep(100);
    bridge.writeConfig(full);
    await waitFor("the answer", () => /SIGHUP: Config reloaded: no changes/.test(bridge.stderr));

    bridge.writeConfig(cut("seq:test.local")); // inside a quoted string
    assert.match(
      await hangUp(),
      /Config not reloaded, the running config stays:\n.*is not valid YAML \(line \d+\)/,
    );
    bridge.writeConfig(`${cut("routes:")}rou`);
    assert.match(
      await hangUp(),
      /Config not reloaded, the running config stays:\n.*is not valid YAML \(line \d+\)/,
    );
    bridge.writeConfig(cut("room:").trimEnd());
    assert.match(await hangUp(), /Config not reloaded, the running config stays:\nroutes\[0\]\.room: /);

    await device!.publishAsync("seq/n", String(sent++), { qos: 1 });
    await allArrived();
  });
});
