/**
 * Who may relay room messages out, against the test homeserver pushing real transactions: the
 * default (the room's moderators, power level 50, and appservice.admins), a route's own users and
 * globs, power levels changed live in the room (m.room.power_levels), and the one answer a refused
 * message gets (a ⛔ reaction; a notice in reply the first time).
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { start, type RunningBridge } from "../../src/app.js";
import type { Config } from "../../src/config/load.js";
import { harness, waitFor, type Harness } from "../helpers/fixture.js";
import { testConnector, type TestConnector } from "../helpers/test-connector.js";
import type { RecordedEvent } from "../helpers/test-homeserver.js";

describe("permissions: who may relay room messages out", () => {
  const connectors = [testConnector({ edits: true })];
  let h: Harness;
  let config: Config;
  let bridge: RunningBridge;
  let remote: TestConnector;
  let bot: string;
  let admin: string;
  let bob: string;
  let carol: string;
  let dave: string;
  let ops: string; // default permissions
  let door: string; // its own: carol and @lab-*, no power level
  let feed: string; // relays in only: nothing to refuse
  let v12: string; // a version 12 room (Synapse's default) of carol's, with dave as another creator

  before(async () => {
    h = await harness({
      connectors,
      bridges: { test: { a: {} } },
      routes: [
        {
          id: "ops",
          room: "#ops:test.local",
          endpoints: [{ account: "test.a", direction: "inout", channel: "ops" }],
        },
        {
          id: "door",
          room: "#door:test.local",
          endpoints: [{ account: "test.a", direction: "out", channel: "door" }],
          permissions: { users: ["@carol:test.local", "@lab-*:test.local"], powerLevel: null },
        },
        {
          id: "v12",
          room: "#v12:test.local",
          endpoints: [{ account: "test.a", direction: "out", channel: "v12" }],
        },
        {
          id: "feed",
          room: "#feed:test.local",
          endpoints: [{ account: "test.a", direction: "in", channel: "feed" }],
        },
      ],
    });
    bot = h.hs.appserviceUserId;
    admin = h.hs.registerUser("admin", "Admin");
    config = { ...h.config, appservice: { ...h.config.appservice, admins: [admin] } };
    bob = h.hs.registerUser("bob", "Bob");
    carol = h.hs.registerUser("carol", "Carol");
    dave = h.hs.registerUser("lab-dave", "Dave");
    ops = h.hs.createRoom({ creator: h.alice, alias: "#ops:test.local", preset: "public_chat" });
    door = h.hs.createRoom({ creator: h.alice, alias: "#door:test.local", preset: "public_chat" });
    feed = h.hs.createRoom({ creator: h.alice, alias: "#feed:test.local", preset: "public_chat" });
    v12 = h.hs.createRoom({
      creator: carol,
      alias: "#v12:test.local",
      preset: "public_chat",
      roomVersion: "12",
      additionalCreators: [dave],
    });
    for (const room of [ops, door, feed])
      for (const user of [admin, bob, carol, dave]) h.hs.joinRoom(room, user);
    for (const user of [admin, bob, dave]) h.hs.joinRoom(v12, user);
    bridge = await start({ config, registration: h.registration, connectors });
    remote = bridge.connector("test.a") as TestConnector;
  });

  after(async () => {
    await bridge?.stop();
    await h?.cleanup();
  });

  const relayed = (channel: string, text: string) => remote.sentTo(channel).some((m) => m.body.text === text);

  let markers = 0;
  /**
   * A message from an admin (always relayed) into `room`, waited for at `channel`: every message sent
   * into the room before it has been judged (a room's messages are handled in order).
   */
  async function settled(room: string, channel: string): Promise<void> {
    const text = `marker ${++markers}`;
    h.hs.sendMessage(room, admin, { msgtype: "m.text", body: text });
    await waitFor(`${text} relayed`, () => relayed(channel, text));
  }

  function say(room: string, sender: string, body: string): string {
    return h.hs.sendMessage(room, sender, { msgtype: "m.text", body });
  }

  const reactionsTo = (room: string, eventId: string): RecordedEvent[] =>
    h.hs.events(room).filter((e) => e.type === "m.reaction" && relatesTo(e)?.event_id === eventId);
  /** The bot's notices in `room` in reply to one of `eventIds`. */
  const noticesAbout = (room: string, ...eventIds: string[]): RecordedEvent[] =>
    h.hs.messages(room).filter((m) => {
      const inReplyTo = relatesTo(m)?.["m.in_reply_to"] as { event_id?: string } | undefined;
      return m.sender === bot && eventIds.includes(String(inReplyTo?.event_id));
    });

  /** Waits for the bot's ⛔ on `eventId`; checks that the message was not relayed to `channel`. */
  async function refused(room: string, channel: string, eventId: string, text: string): Promise<void> {
    const [reaction] = await waitFor(`the ⛔ on "${text}"`, () => {
      const found = reactionsTo(room, eventId);
      return found.length > 0 && found;
    });
    assert.equal(reaction!.sender, bot);
    assert.deepEqual(relatesTo(reaction!), { rel_type: "m.annotation", event_id: eventId, key: "⛔" });
    await settled(room, channel);
    assert.equal(relayed(channel, text), false, `"${text}" not relayed`);
  }

  function setLevel(room: string, user: string, level: number | undefined): void {
    const current = h.hs.stateEvent(room, "m.room.power_levels")!.content;
    const users = { ...(current.users as Record<string, number>) };
    if (level === undefined) delete users[user];
    else users[user] = level;
    h.hs.sendState(room, h.alice, "m.room.power_levels", "", { ...current, users });
  }

  test("by default the room's moderators relay; a member is refused: a ⛔ and a notice in reply naming the config key", async () => {
    say(ops, h.alice, "alice: lights on"); // the room's creator: power level 100
    await waitFor("alice's message relayed", () => relayed("ops", "alice: lights on"));

    const asked = say(ops, bob, "bob: lights on");
    await refused(ops, "ops", asked, "bob: lights on");
    const [notice] = await waitFor("the notice", () => {
      const found = noticesAbout(ops, asked);
      return found.length > 0 && found;
    });
    assert.equal(notice!.content.msgtype, "m.notice");
    assert.deepEqual(notice!.content["m.mentions"], { user_ids: [bob] });
    assert.match(String(notice!.content.body), /@bob:test\.local may not relay/);
    assert.match(String(notice!.content.body), /route ops: only power level 50 or more in this room/);
    assert.match(String(notice!.content.body), /config key permissions\)/);
    assert.equal(reactionsTo(ops, asked).length, 1, "one ⛔");
  });

  test("power levels changed in the room apply to the next message, without a restart; refused again: no second notice", async () => {
    setLevel(ops, bob, 50);
    say(ops, bob, "bob: as a moderator");
    await waitFor("bob's message relayed", () => relayed("ops", "bob: as a moderator"));

    setLevel(ops, bob, undefined);
    const demoted = say(ops, bob, "bob: demoted");
    await refused(ops, "ops", demoted, "bob: demoted");
    assert.deepEqual(noticesAbout(ops, demoted), [], "told once within the window: the ⛔ only");

    const current = h.hs.stateEvent(ops, "m.room.power_levels")!.content;
    h.hs.sendState(ops, h.alice, "m.room.power_levels", "", { ...current, users_default: 50 });
    say(ops, carol, "carol: everyone is a moderator");
    await waitFor("carol's message relayed", () => relayed("ops", "carol: everyone is a moderator"));
    h.hs.sendState(ops, h.alice, "m.room.power_levels", "", { ...current, users_default: 0 });
  });

  test("in one transaction, a message is judged by the power levels before a change that follows it", async () => {
    h.hs.pausePush(); // the three events below go in one transaction
    const before = say(ops, bob, "bob: before the promotion");
    setLevel(ops, bob, 50);
    say(ops, bob, "bob: after the promotion");
    h.hs.resumePush();
    await waitFor("the message after the promotion relayed", () =>
      relayed("ops", "bob: after the promotion"),
    );
    await refused(ops, "ops", before, "bob: before the promotion");
    setLevel(ops, bob, undefined);
  });

  test("a route's own permissions: a listed user, a glob and the admins relay; others, the room's creator too, are refused", async () => {
    say(door, carol, "carol: open");
    say(door, dave, "dave: open");
    await settled(door, "door");
    assert.equal(relayed("door", "carol: open"), true, "listed");
    assert.equal(relayed("door", "dave: open"), true, "by @lab-*:test.local");

    const byCreator = say(door, h.alice, "alice: open"); // power level 100, but powerLevel is null here
    await refused(door, "door", byCreator, "alice: open");
    const [notice] = await waitFor("the notice", () => {
      const found = noticesAbout(door, byCreator);
      return found.length > 0 && found;
    });
    assert.match(
      String(notice!.content.body),
      /route door: only @carol:test\.local, @lab-\*:test\.local, tribridge's admins \(appservice\.admins\) may \(config key routes\[1\]\.permissions\)/,
    );
    const byBob = say(door, bob, "bob: open");
    await refused(door, "door", byBob, "bob: open");
  });

  test("in a version 12 room its creators, listed in no power levels, rank above every level (Room versions §12)", async () => {
    say(v12, carol, "carol: as the creator");
    say(v12, dave, "dave: as another creator");
    const byBob = say(v12, bob, "bob: as a member");
    await refused(v12, "v12", byBob, "bob: as a member");
    assert.equal(relayed("v12", "carol: as the creator"), true);
    assert.equal(relayed("v12", "dave: as another creator"), true);
  });

  test("an edit by a refused sender is not relayed either", async () => {
    const original = say(ops, bob, "bob: heat 20");
    await refused(ops, "ops", original, "bob: heat 20");
    const edit = h.hs.sendMessage(ops, bob, {
      msgtype: "m.text",
      body: "* bob: heat 30",
      "m.new_content": { msgtype: "m.text", body: "bob: heat 30" },
      "m.relates_to": { rel_type: "m.replace", event_id: original },
    });
    await refused(ops, "ops", edit, "bob: heat 30");
    assert.equal(
      remote.edits.some((e) => e.edit.body.text === "bob: heat 30"),
      false,
    );
  });

  test("in a room whose routes only relay in, nobody's message is answered", async () => {
    const chat = say(feed, bob, "bob: just chatting");
    // Handled after it: once this refusal is answered, the one before was judged.
    const later = say(ops, bob, "bob: again");
    await refused(ops, "ops", later, "bob: again");
    assert.deepEqual(reactionsTo(feed, chat), []);
    assert.deepEqual(noticesAbout(feed, chat), []);
  });
});

function relatesTo(ev: RecordedEvent): Record<string, unknown> | undefined {
  const relation = ev.content["m.relates_to"];
  return typeof relation === "object" && relation !== null
    ? (relation as Record<string, unknown>)
    : undefined;
}
