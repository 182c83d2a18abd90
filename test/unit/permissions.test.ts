/**
 * Who may relay room messages out (matrix/permissions.ts, matrix/power-levels.ts): user ids and
 * globs, power levels as Client-Server API §m.room.power_levels defines them, the config keys that
 * say so, and the one answer a refused message gets (against real Redis).
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { Redis } from "ioredis";
import { connectors } from "../../bridges/index.js";
import { ConfigErrors, validateConfig, type ResolvedRoute } from "../../src/config/load.js";
import { moduleLogger } from "../../src/log.js";
import type { MatrixEvent } from "../../src/matrix/appservice-server.js";
import { adminMatcher } from "../../src/matrix/commands.js";
import { RelayPermissions, allows, refusalNotice, userMatcher } from "../../src/matrix/permissions.js";
import { PowerLevels, levelIn, type RoomReader } from "../../src/matrix/power-levels.js";
import { MatrixPermanentError } from "../../src/matrix/matrix-error.js";
import { REDIS_URL, deleteKeys } from "../helpers/fixture.js";

const log = moduleLogger("permissions-test");
log.level = "silent";

const base = {
  homeserver: { url: "http://127.0.0.1:8008", domain: "example.org" },
  bridges: { mqtt: { home: { embedded: { port: 0 } } } },
};
const endpoints = [{ account: "mqtt.home", direction: "out", topic: "lab/cmd" }];

function configErrors(raw: Record<string, unknown>): string[] {
  try {
    validateConfig({ ...base, ...raw }, connectors);
  } catch (err) {
    assert.ok(err instanceof ConfigErrors);
    return err.errors.map((e) => e.message);
  }
  assert.fail("the config was accepted");
}

describe("userMatcher: user ids, * matching any characters", () => {
  test("a user id matches itself only", () => {
    const m = userMatcher(["@alice:example.org"]);
    assert.equal(m("@alice:example.org"), true);
    assert.equal(m("@alice:example.org.evil"), false);
    assert.equal(m("@alicex:example.org"), false);
  });

  test("@*:server: every user of that server, not of a server ending the same", () => {
    const m = userMatcher(["@*:example.org"]);
    assert.equal(m("@bob:example.org"), true);
    assert.equal(m("@bob:notexample.org"), false);
    assert.equal(m("@bob:example.org:8448"), false);
  });

  test("@*:* is everyone; a prefix glob matches its prefix only", () => {
    assert.equal(userMatcher(["@*:*"])("@x:anywhere.test"), true);
    const m = userMatcher(["@lab-*:example.org"]);
    assert.equal(m("@lab-dave:example.org"), true);
    assert.equal(m("@dave:example.org"), false);
  });

  test("characters special in regular expressions are literal", () => {
    const m = userMatcher(["@a.b:ex.org", "@(x)+*:ex.org"]);
    assert.equal(m("@a.b:ex.org"), true);
    assert.equal(m("@aXb:ex.org"), false);
    assert.equal(m("@(x)+1:ex.org"), true);
    assert.equal(m("@xx1:ex.org"), false);
  });

  test("no patterns: nobody", () => {
    assert.equal(userMatcher([])("@alice:example.org"), false);
  });
});

describe("power levels (Client-Server API §m.room.power_levels)", () => {
  test("users[id], else users_default, else 0", () => {
    const content = { users: { "@mod:x": 50, "@admin:x": 100 }, users_default: 10 };
    assert.equal(levelIn(content, "@mod:x"), 50);
    assert.equal(levelIn(content, "@other:x"), 10);
    assert.equal(levelIn({ users: {} }, "@other:x"), 0);
    assert.equal(levelIn({ users: { "@neg:x": -1 } }, "@neg:x"), -1);
  });

  test("levels as strings of digits (room versions before 10) count; other values do not", () => {
    assert.equal(levelIn({ users: { "@a:x": "75" } }, "@a:x"), 75);
    assert.equal(levelIn({ users: { "@a:x": 7.5 }, users_default: "5" }, "@a:x"), 5);
    assert.equal(levelIn({ users: { "@a:x": "lots" } }, "@a:x"), 0);
  });

  test("a room without power levels: everyone counts as 0", () => {
    assert.equal(levelIn(null, "@a:x"), 0);
  });

  test("read once when unknown (concurrent askers share the read), then known at once", async () => {
    let reads = 0;
    const levels = new PowerLevels(
      reader(async () => {
        reads++;
        return { users: { "@mod:x": 50 } };
      }),
    );
    const [a, b] = await Promise.all([levels.levelOf("!r:x", "@mod:x"), levels.levelOf("!r:x", "@u:x")]);
    assert.deepEqual([a, b, reads], [50, 0, 1]);
    assert.equal(levels.levelOf("!r:x", "@mod:x"), 50, "known: answered without waiting");
  });

  test("a pushed change applies at once, and wins over a read that was under way", async () => {
    let answer: (c: Record<string, unknown>) => void = () => undefined;
    const levels = new PowerLevels(reader(() => new Promise((resolve) => (answer = resolve))));
    const level = levels.levelOf("!r:x", "@u:x");
    levels.noteState(powerLevelsEvent("!r:x", { users: { "@u:x": 50 } }));
    answer({ users: {} }); // read before the change
    assert.equal(await level, 50);
    levels.noteState(powerLevelsEvent("!r:x", { users: { "@u:x": 0 } }));
    assert.equal(levels.levelOf("!r:x", "@u:x"), 0);
  });

  test("room version 12: the creators (the create event's sender, additional_creators) rank above every level", async () => {
    const asked: string[] = [];
    const levels = new PowerLevels({
      state: async (_roomId, type) =>
        type === "m.room.power_levels"
          ? { users: { "@mod:x": 50 } }
          : { room_version: "12", additional_creators: ["@co:x"] },
      sender: async (roomId, eventId) => {
        asked.push(`${roomId} ${eventId}`);
        return "@founder:x";
      },
    });
    assert.equal(await levels.levelOf("!abc", "@founder:x"), Infinity);
    assert.equal(levels.levelOf("!abc", "@co:x"), Infinity);
    assert.equal(levels.levelOf("!abc", "@mod:x"), 50);
    assert.deepEqual(asked, ["!abc $abc"], "the create event's id is the room id's");
  });

  test("before room version 12 the creator has the level power levels give it; pushed create events count", () => {
    const levels = new PowerLevels(reader(async () => assert.fail("known from what was pushed")));
    const create = (room_version: string, roomId: string): MatrixEvent => ({
      event_id: `$create-${roomId}`,
      room_id: roomId,
      sender: "@founder:x",
      type: "m.room.create",
      state_key: "",
      content: { room_version },
    });
    levels.noteState(create("11", "!old:x"));
    levels.noteState(powerLevelsEvent("!old:x", { users: {} }));
    assert.equal(levels.levelOf("!old:x", "@founder:x"), 0);
    levels.noteState(create("12", "!new"));
    levels.noteState(powerLevelsEvent("!new", { users: {} }));
    assert.equal(levels.levelOf("!new", "@founder:x"), Infinity);
  });

  test("a failed read is not remembered: the next message reads again", async () => {
    let reads = 0;
    const levels = new PowerLevels(
      reader(async () => {
        if (++reads === 1) throw new Error("homeserver away");
        return { users_default: 50 };
      }),
    );
    await assert.rejects(async () => levels.levelOf("!r:x", "@u:x"), /homeserver away/);
    assert.equal(await levels.levelOf("!r:x", "@u:x"), 50);
  });
});

describe("allows: users, or a power level at least powerLevel", () => {
  const users = userMatcher(["@carol:x"]);
  test("by power level", () => {
    assert.equal(allows({ users: [], powerLevel: 50 }, users, "@u:x", 50), true);
    assert.equal(allows({ users: [], powerLevel: 50 }, users, "@u:x", 49), false);
  });
  test("powerLevel null: only the users listed, whatever their level", () => {
    assert.equal(allows({ users: ["@carol:x"], powerLevel: null }, users, "@u:x", 100), false);
    assert.equal(allows({ users: ["@carol:x"], powerLevel: null }, users, "@carol:x", 0), true);
  });
});

describe("config: permissions at the top and per route", () => {
  test("default: power level 50, no users; a route without its own takes the top level's", () => {
    const config = validateConfig(
      { ...base, routes: [{ id: "lab", room: "#lab:example.org", endpoints }] },
      connectors,
    );
    assert.deepEqual(config.routes[0]!.permissions, { users: [], powerLevel: 50, key: "permissions" });
    const top = validateConfig(
      {
        ...base,
        permissions: { users: ["@*:example.org"], powerLevel: null },
        routes: [{ id: "lab", room: "#lab:example.org", endpoints }],
      },
      connectors,
    );
    assert.deepEqual(top.routes[0]!.permissions, {
      users: ["@*:example.org"],
      powerLevel: null,
      key: "permissions",
    });
  });

  test("a route's own replaces the top level's; keys left out take their defaults", () => {
    const config = validateConfig(
      {
        ...base,
        permissions: { users: ["@*:example.org"], powerLevel: 100 },
        routes: [
          { id: "a", room: "#a:example.org", endpoints },
          { id: "b", room: "#b:example.org", endpoints, permissions: { users: ["@carol:example.org"] } },
        ],
      },
      connectors,
    );
    assert.deepEqual(config.routes[1]!.permissions, {
      users: ["@carol:example.org"],
      powerLevel: 50,
      key: "routes[1].permissions",
    });
  });

  test("errors name the key", () => {
    assert.deepEqual(configErrors({ permissions: { users: ["alice"] } }), [
      "permissions.users[0]: must be a user id such as @alice:example.org; * matches any characters",
    ]);
    assert.deepEqual(configErrors({ permissions: { powerLevel: "mods" } }), [
      "permissions.powerLevel: Invalid input: expected number, received string",
    ]);
    assert.deepEqual(
      configErrors({
        routes: [{ id: "a", room: "#a:example.org", endpoints, permissions: { user: ["@a:example.org"] } }],
      }),
      ["routes[0].permissions.user: unknown key"],
    );
  });
});

describe("RelayPermissions: the judgement and the one answer", () => {
  const prefix = `test-perm-${process.pid}`;
  let redis: Redis;
  const route = (id: string, permissions: ResolvedRoute["permissions"]): ResolvedRoute => ({
    id,
    room: "!r:x",
    invite: [],
    endpoints: [],
    permissions,
  });
  const lab = route("lab", { users: [], powerLevel: 50, key: "permissions" });
  const message = (eventId: string, sender = "@bob:x"): MatrixEvent => ({
    event_id: eventId,
    room_id: "!r:x",
    sender,
    type: "m.room.message",
    content: { msgtype: "m.text", body: "on" },
  });

  before(() => {
    redis = new Redis(REDIS_URL);
  });
  after(async () => {
    redis.disconnect();
    await deleteKeys(prefix);
  });

  function permissions(sent: { type: string; content: Record<string, unknown>; txnId: string }[]) {
    return new RelayPermissions({
      powerLevels: new PowerLevels(reader(async () => ({ users: { "@mod:x": 50 } }))),
      isAdmin: adminMatcher(["@admin:x"]),
      redis,
      prefix,
      sendAsBot: async (_roomId, type, content, txnId) => void sent.push({ type, content, txnId }),
      log,
    });
  }

  test("admins always, moderators by level, others not", async () => {
    const p = permissions([]);
    assert.equal((await p.judge(message("$1", "@admin:x")))(lab), true);
    assert.equal((await p.judge(message("$2", "@mod:x")))(lab), true);
    assert.equal((await p.judge(message("$3", "@bob:x")))(lab), false);
  });

  test("power levels the bot may not read count as 0; a transient failure rejects (the transaction is retried)", async () => {
    const forbidden = new MatrixPermanentError({ what: "GET state", status: 403, errcode: "M_FORBIDDEN" });
    const failing = (err: Error) =>
      new RelayPermissions({
        powerLevels: new PowerLevels(reader(async () => Promise.reject(err))),
        isAdmin: () => false,
        redis,
        prefix,
        sendAsBot: async () => undefined,
        log,
      });
    assert.equal((await failing(forbidden).judge(message("$4")))(lab), false);
    await assert.rejects(failing(new Error("ECONNREFUSED")).judge(message("$5")), /ECONNREFUSED/);
  });

  test("a refusal: a ⛔ reaction and a notice in reply; again for the same event with the same transaction ids; a later refusal in the window: the reaction only", async () => {
    const sent: { type: string; content: Record<string, unknown>; txnId: string }[] = [];
    const p = permissions(sent);
    await p.refused(message("$first"), [lab]);
    assert.equal(sent.length, 2);
    assert.deepEqual(sent[0]!.content, {
      "m.relates_to": { rel_type: "m.annotation", event_id: "$first", key: "⛔" },
    });
    assert.equal(sent[0]!.type, "m.reaction");
    assert.equal(sent[1]!.type, "m.room.message");
    assert.deepEqual(sent[1]!.content["m.relates_to"], { "m.in_reply_to": { event_id: "$first" } });
    assert.match(String(sent[1]!.content.body), /@bob:x may not relay/);

    await p.refused(message("$first"), [lab]); // the same event again: the same answer, which the homeserver dedupes
    assert.deepEqual(
      sent.slice(2).map((s) => s.txnId),
      sent.slice(0, 2).map((s) => s.txnId),
    );

    await p.refused(message("$second"), [lab]);
    assert.deepEqual(
      sent.slice(4).map((s) => s.type),
      ["m.reaction"],
      "no second notice within the window",
    );
    await p.refused(message("$third", "@carol:x"), [lab]);
    assert.deepEqual(
      sent.slice(5).map((s) => s.type),
      ["m.reaction", "m.room.message"],
      "another sender is told",
    );
  });

  test("a ⛔ the homeserver says is on already (M_DUPLICATE_ANNOTATION, §Reactions) still lets the notice go", async () => {
    const sent: { type: string; txnId: string }[] = [];
    const p = new RelayPermissions({
      powerLevels: new PowerLevels(reader(async () => ({}))),
      isAdmin: () => false,
      redis,
      prefix,
      sendAsBot: async (_roomId, type, _content, txnId) => {
        if (type === "m.reaction")
          throw new MatrixPermanentError({
            what: "PUT send",
            status: 400,
            errcode: "M_DUPLICATE_ANNOTATION",
            error: "Can't send same reaction twice",
          });
        sent.push({ type, txnId });
      },
      log,
    });
    await p.refused(message("$dup", "@dave:x"), [lab]);
    assert.deepEqual(
      sent.map((s) => s.type),
      ["m.room.message"],
    );
  });

  test("a refused message in a thread is answered in that thread", async () => {
    const sent: { type: string; content: Record<string, unknown>; txnId: string }[] = [];
    const inThread: MatrixEvent = {
      ...message("$threaded", "@erin:x"),
      content: {
        msgtype: "m.text",
        body: "on",
        "m.relates_to": { rel_type: "m.thread", event_id: "$root", "m.in_reply_to": { event_id: "$root" } },
      },
    };
    await permissions(sent).refused(inThread, [lab]);
    assert.deepEqual(sent[1]!.content["m.relates_to"], {
      rel_type: "m.thread",
      event_id: "$root",
      is_falling_back: false,
      "m.in_reply_to": { event_id: "$threaded" },
    });
  });

  test("an answer that cannot be sent is logged, and the refusal still resolves", async () => {
    const p = new RelayPermissions({
      powerLevels: new PowerLevels(reader(async () => ({}))),
      isAdmin: () => false,
      redis,
      prefix,
      sendAsBot: async () => Promise.reject(new Error("homeserver away")),
      log,
    });
    await p.refused(message("$lost"), [lab]);
  });

  test("the notice says who may relay to each route and which config key says so", () => {
    const own = route("door", {
      users: ["@carol:x", "@*:partner.x"],
      powerLevel: null,
      key: "routes[1].permissions",
    });
    const text = refusalNotice("@bob:x", [lab, own]);
    assert.match(
      text,
      /route lab: only power level 50 or more in this room, tribridge's admins \(appservice\.admins\) may \(config key permissions\)/,
    );
    assert.match(
      text,
      /route door: only @carol:x, @\*:partner\.x, tribridge's admins \(appservice\.admins\) may \(config key routes\[1\]\.permissions\)/,
    );
  });
});

/** Power levels read from `levels`, in a room of version 10 (no creators above every level). */
function reader(levels: () => Promise<Record<string, unknown> | undefined>): RoomReader {
  return {
    state: (_roomId, type) =>
      type === "m.room.power_levels" ? levels() : Promise.resolve({ room_version: "10" }),
    sender: async () => assert.fail("only read in a room of version 12"),
  };
}

function powerLevelsEvent(roomId: string, content: Record<string, unknown>): MatrixEvent {
  return {
    event_id: `$pl${Math.random()}`,
    room_id: roomId,
    sender: "@admin:x",
    type: "m.room.power_levels",
    state_key: "",
    content,
  };
}
