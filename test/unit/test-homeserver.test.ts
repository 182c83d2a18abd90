import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import type { AddressInfo } from "node:net";
import {
  TestHomeserver,
  MatrixError,
  type AppserviceRegistration,
  type TestHomeserverOptions,
} from "../helpers/test-homeserver.js";

const AS_TOKEN = "as-secret";
const HS_TOKEN = "hs-secret";

function registration(url: string | null): AppserviceRegistration {
  return {
    id: "tribridge-test",
    url,
    as_token: AS_TOKEN,
    hs_token: HS_TOKEN,
    sender_localpart: "bridgebot",
    namespaces: {
      users: [{ exclusive: true, regex: "@mqtt_.*:test\\.local" }],
      aliases: [{ exclusive: true, regex: "#mqtt_.*:test\\.local" }],
    },
  };
}

interface Call {
  method: string;
  url: string;
  auth: string | undefined;
  body: string;
}

/** A tiny appservice: records every request and answers with `respond(call, index)`'s status. */
async function fakeAppservice(
  respond: (call: Call, index: number) => number = () => 200,
): Promise<{ url: string; calls: Call[]; close: () => Promise<void> }> {
  const calls: Call[] = [];
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const call: Call = {
        method: req.method ?? "",
        url: req.url ?? "",
        auth: req.headers.authorization,
        body: Buffer.concat(chunks).toString("utf8"),
      };
      calls.push(call);
      const status = respond(call, calls.length - 1);
      res.writeHead(status, { "Content-Type": "application/json" });
      res.end(status === 200 ? "{}" : JSON.stringify({ errcode: "M_UNKNOWN", error: "boom" }));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}`,
    calls,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

async function call(
  hs: TestHomeserver,
  method: string,
  path: string,
  opts: { token?: string; body?: unknown; rawBody?: string; query?: Record<string, string> } = {},
): Promise<{ status: number; body: Record<string, unknown>; contentType: string | null }> {
  const url = new URL(hs.url + path);
  for (const [k, v] of Object.entries(opts.query ?? {})) url.searchParams.set(k, v);
  const headers: Record<string, string> = {};
  if (opts.token !== undefined) headers.Authorization = `Bearer ${opts.token}`;
  const payload = opts.rawBody ?? (opts.body === undefined ? undefined : JSON.stringify(opts.body));
  if (payload !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(url, { method, headers, body: payload ?? null });
  const text = await res.text();
  return {
    status: res.status,
    body: text ? (JSON.parse(text) as Record<string, unknown>) : {},
    contentType: res.headers.get("content-type"),
  };
}

const C = "/_matrix/client/v3";
const enc = encodeURIComponent;

async function withHs(
  fn: (hs: TestHomeserver) => Promise<void>,
  opts: Partial<TestHomeserverOptions> = {},
): Promise<void> {
  const hs = new TestHomeserver({ registration: registration(null), ...opts });
  await hs.start();
  try {
    await fn(hs);
  } finally {
    await hs.stop();
  }
}

async function registerGhost(hs: TestHomeserver, localpart: string): Promise<string> {
  const r = await call(hs, "POST", `${C}/register`, {
    token: AS_TOKEN,
    body: { type: "m.login.application_service", username: localpart, inhibit_login: true },
  });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  return r.body.user_id as string;
}

describe("TestHomeserver: authentication", () => {
  let hs: TestHomeserver;
  before(async () => {
    hs = new TestHomeserver({ registration: registration(null) });
    await hs.start();
  });
  after(() => hs.stop());

  it("serves /versions without auth, as JSON", async () => {
    const r = await call(hs, "GET", "/_matrix/client/versions");
    assert.equal(r.status, 200);
    assert.equal(r.contentType, "application/json");
    assert.ok((r.body.versions as string[]).includes("v1.11"));
  });

  it("as_token authenticates as the AS sender (header and query)", async () => {
    const viaHeader = await call(hs, "GET", `${C}/account/whoami`, { token: AS_TOKEN });
    assert.equal(viaHeader.status, 200);
    assert.equal(viaHeader.body.user_id, "@bridgebot:test.local");
    const viaQuery = await call(hs, "GET", `${C}/account/whoami`, { query: { access_token: AS_TOKEN } });
    assert.equal(viaQuery.body.user_id, "@bridgebot:test.local");
    assert.equal(hs.requests.at(-1)?.userId, "@bridgebot:test.local");
    assert.ok(!hs.requests.at(-1)?.path.includes("access_token"), "query string is not logged");
  });

  it("missing token → 401 M_MISSING_TOKEN, unknown token → 401 M_UNKNOWN_TOKEN", async () => {
    const missing = await call(hs, "GET", `${C}/account/whoami`);
    assert.equal(missing.status, 401);
    assert.equal(missing.body.errcode, "M_MISSING_TOKEN");
    const unknown = await call(hs, "GET", `${C}/account/whoami`, { token: "nope" });
    assert.equal(unknown.status, 401);
    assert.equal(unknown.body.errcode, "M_UNKNOWN_TOKEN");
  });

  it("masquerading outside the namespace → 403 M_FORBIDDEN", async () => {
    hs.registerUser("alice");
    const r = await call(hs, "GET", `${C}/account/whoami`, {
      token: AS_TOKEN,
      query: { user_id: "@alice:test.local" },
    });
    assert.equal(r.status, 403);
    assert.equal(r.body.errcode, "M_FORBIDDEN");
  });

  it("masquerading as an unregistered namespace user → 403, then OK once registered", async () => {
    const q = { user_id: "@mqtt_ghost1:test.local", "org.matrix.msc3202.device_id": "DEV" };
    const before = await call(hs, "GET", `${C}/account/whoami`, { token: AS_TOKEN, query: q });
    assert.equal(before.status, 403);
    assert.equal(before.body.errcode, "M_FORBIDDEN");
    await registerGhost(hs, "mqtt_ghost1");
    // MSC4326 device masquerading (Synapse's get_appservice_user): the device must exist.
    const noDevice = await call(hs, "GET", `${C}/account/whoami`, { token: AS_TOKEN, query: q });
    assert.equal(noDevice.status, 400);
    assert.equal(noDevice.body.errcode, "ORG.MATRIX.MSC4326.M_UNKNOWN_DEVICE");
    const ghostOnly = { user_id: q.user_id };
    assert.equal(
      (await call(hs, "PUT", `${C}/devices/DEV`, { token: AS_TOKEN, query: ghostOnly, body: {} })).status,
      201,
    );
    const afterReg = await call(hs, "GET", `${C}/account/whoami`, { token: AS_TOKEN, query: q });
    assert.equal(afterReg.status, 200);
    assert.equal(afterReg.body.user_id, "@mqtt_ghost1:test.local");
  });

  it("unknown endpoint → 404 M_UNRECOGNIZED; wrong method → 405 M_UNRECOGNIZED", async () => {
    const r404 = await call(hs, "GET", `${C}/nope`, { token: AS_TOKEN });
    assert.equal(r404.status, 404);
    assert.equal(r404.body.errcode, "M_UNRECOGNIZED");
    const r405 = await call(hs, "DELETE", `${C}/account/whoami`, { token: AS_TOKEN });
    assert.equal(r405.status, 405);
    assert.equal(r405.body.errcode, "M_UNRECOGNIZED");
  });
});

describe("TestHomeserver: registration", () => {
  it("registers inside the namespace, refuses outside/duplicates/bad localparts", async () => {
    await withHs(async (hs) => {
      // matrix-bot-sdk sends ?user_id= on /register for ghosts: it must not be treated as masquerading.
      const ok = await call(hs, "POST", `${C}/register`, {
        token: AS_TOKEN,
        query: { user_id: "@mqtt_a:test.local" },
        body: { type: "m.login.application_service", username: "mqtt_a" },
      });
      assert.equal(ok.status, 200, JSON.stringify(ok.body));
      assert.equal(ok.body.user_id, "@mqtt_a:test.local");
      assert.equal(typeof ok.body.access_token, "string");
      assert.ok(hs.isRegistered("@mqtt_a:test.local"));
      // The returned access token works for that user.
      const who = await call(hs, "GET", `${C}/account/whoami`, { token: ok.body.access_token as string });
      assert.equal(who.body.user_id, "@mqtt_a:test.local");

      const inhibited = await call(hs, "POST", `${C}/register`, {
        token: AS_TOKEN,
        body: { type: "m.login.application_service", username: "mqtt_b", inhibit_login: true },
      });
      assert.deepEqual(Object.keys(inhibited.body).includes("access_token"), false);

      const outside = await call(hs, "POST", `${C}/register`, {
        token: AS_TOKEN,
        body: { type: "m.login.application_service", username: "bob" },
      });
      assert.equal(outside.status, 400);
      assert.equal(outside.body.errcode, "M_EXCLUSIVE");

      const dup = await call(hs, "POST", `${C}/register`, {
        token: AS_TOKEN,
        body: { type: "m.login.application_service", username: "mqtt_a" },
      });
      assert.equal(dup.status, 400);
      assert.equal(dup.body.errcode, "M_USER_IN_USE");

      // The AS sender acts without registering, but has a profile only once registered (as Synapse).
      assert.equal(hs.isRegistered(hs.appserviceUserId), false);
      const noProfile = await call(hs, "GET", `${C}/profile/${enc(hs.appserviceUserId)}`);
      assert.equal(noProfile.status, 404);
      const noName = await call(hs, "PUT", `${C}/profile/${enc(hs.appserviceUserId)}/displayname`, {
        token: AS_TOKEN,
        body: { displayname: "Bot" },
      });
      assert.equal(noName.status, 500);
      const bot = await call(hs, "POST", `${C}/register`, {
        token: AS_TOKEN,
        body: { type: "m.login.application_service", username: "bridgebot", inhibit_login: true },
      });
      assert.equal(bot.status, 200, JSON.stringify(bot.body));
      assert.equal(bot.body.user_id, hs.appserviceUserId);
      const named = await call(hs, "PUT", `${C}/profile/${enc(hs.appserviceUserId)}/displayname`, {
        token: AS_TOKEN,
        body: { displayname: "Bot" },
      });
      assert.equal(named.status, 200);
      assert.deepEqual(hs.profile(hs.appserviceUserId), { displayname: "Bot" });
      const botAgain = await call(hs, "POST", `${C}/register`, {
        token: AS_TOKEN,
        body: { type: "m.login.application_service", username: "bridgebot" },
      });
      assert.equal(botAgain.body.errcode, "M_USER_IN_USE");

      const bad = await call(hs, "POST", `${C}/register`, {
        token: AS_TOKEN,
        body: { type: "m.login.application_service", username: "mqtt_UPPER" },
      });
      assert.equal(bad.status, 400);
      assert.equal(bad.body.errcode, "M_INVALID_USERNAME");

      const noType = await call(hs, "POST", `${C}/register`, {
        token: AS_TOKEN,
        body: { username: "mqtt_c" },
      });
      assert.equal(noType.status, 400);

      const noToken = await call(hs, "POST", `${C}/register`, {
        body: { type: "m.login.application_service", username: "mqtt_c" },
      });
      assert.equal(noToken.status, 401);
      assert.equal(noToken.body.errcode, "M_MISSING_TOKEN");
    });
  });

  it("registerUser refuses ids in an exclusive namespace", async () => {
    await withHs(async (hs) => {
      assert.throws(
        () => hs.registerUser("mqtt_human"),
        (e: unknown) => e instanceof MatrixError && e.errcode === "M_EXCLUSIVE",
      );
      assert.equal(hs.registerUser("carol", "Carol"), "@carol:test.local");
      assert.deepEqual(hs.profile("@carol:test.local"), { displayname: "Carol" });
    });
  });
});

describe("TestHomeserver: rooms and events", () => {
  it("send: same txnId twice → same event_id and a single event", async () => {
    await withHs(async (hs) => {
      const alice = hs.registerUser("alice");
      const roomId = hs.createRoom({ creator: alice, preset: "public_chat" });
      const bot = "@bridgebot:test.local";
      const join = await call(hs, "POST", `${C}/join/${enc(roomId)}`, { token: AS_TOKEN, body: {} });
      assert.equal(join.status, 200, JSON.stringify(join.body));
      const path = `${C}/rooms/${enc(roomId)}/send/m.room.message/txn1`;
      const a = await call(hs, "PUT", path, { token: AS_TOKEN, body: { msgtype: "m.text", body: "hi" } });
      const b = await call(hs, "PUT", path, { token: AS_TOKEN, body: { msgtype: "m.text", body: "hi" } });
      assert.equal(a.status, 200);
      assert.equal(a.body.event_id, b.body.event_id);
      assert.match(a.body.event_id as string, /^\$[A-Za-z0-9_-]{43}$/);
      assert.equal(hs.messages(roomId).length, 1);
      assert.equal(hs.messages(roomId)[0]?.txn_id, "txn1");
      assert.equal(hs.messages(roomId)[0]?.sender, bot);

      // Another user of the appservice (masquerading) with the same txnId: the same transaction, as
      // Synapse keys an appservice's by path and appservice (measured on 1.163): no second event.
      await registerGhost(hs, "mqtt_x");
      await call(hs, "POST", `${C}/join/${enc(roomId)}`, {
        token: AS_TOKEN,
        query: { user_id: "@mqtt_x:test.local" },
      });
      const c = await call(hs, "PUT", path, {
        token: AS_TOKEN,
        query: { user_id: "@mqtt_x:test.local" },
        body: { msgtype: "m.text", body: "hi" },
      });
      assert.equal(c.body.event_id, a.body.event_id);
      assert.equal(hs.messages(roomId).length, 1);
      // Another txnId is another transaction.
      const d = await call(hs, "PUT", `${C}/rooms/${enc(roomId)}/send/m.room.message/txn2`, {
        token: AS_TOKEN,
        query: { user_id: "@mqtt_x:test.local" },
        body: { msgtype: "m.text", body: "hi" },
      });
      assert.notEqual(d.body.event_id, a.body.event_id);
      assert.equal(hs.messages(roomId).length, 2);

      // unsigned.transaction_id only for the sending session.
      const ev = await call(hs, "GET", `${C}/rooms/${enc(roomId)}/event/${enc(a.body.event_id as string)}`, {
        token: AS_TOKEN,
      });
      assert.equal((ev.body.unsigned as Record<string, unknown>).transaction_id, "txn1");
    });
  });

  it("rejects bad content: not JSON, not an object, too large; not joined → 403", async () => {
    await withHs(async (hs) => {
      const alice = hs.registerUser("alice");
      const roomId = hs.createRoom({ creator: alice, preset: "public_chat" });
      const path = (t: string): string => `${C}/rooms/${enc(roomId)}/send/m.room.message/${t}`;
      const notJoined = await call(hs, "PUT", path("t0"), { token: AS_TOKEN, body: { body: "x" } });
      assert.equal(notJoined.status, 403);
      assert.equal(notJoined.body.errcode, "M_FORBIDDEN");
      await call(hs, "POST", `${C}/rooms/${enc(roomId)}/join`, { token: AS_TOKEN });
      const notJson = await call(hs, "PUT", path("t1"), { token: AS_TOKEN, rawBody: "{nope" });
      assert.equal(notJson.status, 400);
      assert.equal(notJson.body.errcode, "M_NOT_JSON");
      const arr = await call(hs, "PUT", path("t2"), { token: AS_TOKEN, body: [1, 2] });
      assert.equal(arr.status, 400);
      assert.equal(arr.body.errcode, "M_BAD_JSON");
      const big = await call(hs, "PUT", path("t3"), { token: AS_TOKEN, body: { body: "x".repeat(70_000) } });
      assert.equal(big.status, 413);
      assert.equal(big.body.errcode, "M_TOO_LARGE");
      assert.equal(hs.messages(roomId).length, 0);
    });
  });

  it("relations as Synapse validates them: replies to unknown events pass; relations to unknown events, across rooms, and threads off a related event are refused", async () => {
    await withHs(async (hs) => {
      const alice = hs.registerUser("alice");
      const roomId = hs.createRoom({ creator: alice, preset: "public_chat" });
      const other = hs.createRoom({ creator: alice, preset: "public_chat" });
      await call(hs, "POST", `${C}/join/${enc(roomId)}`, { token: AS_TOKEN });
      let n = 0;
      const send = (content: Record<string, unknown>, room = roomId) =>
        call(hs, "PUT", `${C}/rooms/${enc(room)}/send/m.room.message/r${++n}`, {
          token: AS_TOKEN,
          body: { msgtype: "m.text", body: "x", ...content },
        });
      const refused = async (content: Record<string, unknown>, error: string) => {
        const r = await send(content);
        assert.equal(r.status, 400, JSON.stringify(r.body));
        assert.equal(r.body.errcode, "M_UNKNOWN");
        assert.equal(r.body.error, error);
      };
      const root = hs.sendMessage(roomId, alice, { msgtype: "m.text", body: "root" });
      const elsewhere = hs.sendMessage(other, alice, { msgtype: "m.text", body: "elsewhere" });

      // A bare m.in_reply_to is no relation (no rel_type): accepted whatever it names.
      assert.equal((await send({ "m.relates_to": { "m.in_reply_to": { event_id: "$nope" } } })).status, 200);
      await refused(
        { "m.relates_to": { rel_type: "m.thread", event_id: "$nope" } },
        "Can't send relation to unknown event",
      );
      await refused(
        { "m.relates_to": { rel_type: "m.thread", event_id: elsewhere } },
        "Relations must be in the same room",
      );

      // A thread off a plain event, and off a reply (no rel_type), is fine; off a thread child is not.
      const child = await send({ "m.relates_to": { rel_type: "m.thread", event_id: root } });
      assert.equal(child.status, 200, JSON.stringify(child.body));
      const reply = await send({ "m.relates_to": { "m.in_reply_to": { event_id: root } } });
      const offReply = await send({
        "m.relates_to": { rel_type: "m.thread", event_id: reply.body.event_id },
      });
      assert.equal(offReply.status, 200, JSON.stringify(offReply.body));
      const nested = { rel_type: "m.thread", event_id: child.body.event_id };
      await refused({ "m.relates_to": nested }, "Cannot start threads from an event with a relation");
      assert.throws(() =>
        hs.sendMessage(roomId, alice, { msgtype: "m.text", body: "x", "m.relates_to": nested }),
      );

      // Redacted, the child has lost its relation and may be a root.
      const redact = `${C}/rooms/${enc(roomId)}/redact/${enc(child.body.event_id as string)}/red1`;
      assert.equal((await call(hs, "PUT", redact, { token: AS_TOKEN, body: {} })).status, 200);
      assert.equal((await send({ "m.relates_to": nested })).status, 200);
    });
  });

  it("annotations as Synapse checks them: a second one with the same type and key by the same sender is refused (M_DUPLICATE_ANNOTATION) unless the first was redacted; its transaction id repeated returns the first", async () => {
    await withHs(async (hs) => {
      const alice = hs.registerUser("alice");
      const roomId = hs.createRoom({ creator: alice, preset: "public_chat" });
      await call(hs, "POST", `${C}/join/${enc(roomId)}`, { token: AS_TOKEN });
      const target = hs.sendMessage(roomId, alice, { msgtype: "m.text", body: "react to me" });
      const react = (txnId: string, key: string) =>
        call(hs, "PUT", `${C}/rooms/${enc(roomId)}/send/m.reaction/${txnId}`, {
          token: AS_TOKEN,
          body: { "m.relates_to": { rel_type: "m.annotation", event_id: target, key } },
        });
      const first = await react("a1", "✅");
      assert.equal(first.status, 200);
      assert.equal((await react("a1", "✅")).body.event_id, first.body.event_id, "a repeated transaction");
      const again = await react("a2", "✅");
      assert.equal(again.status, 400);
      assert.equal(again.body.errcode, "M_DUPLICATE_ANNOTATION");
      assert.equal((await react("a3", "⏳")).status, 200, "another key");
      const redact = `${C}/rooms/${enc(roomId)}/redact/${enc(first.body.event_id as string)}/red1`;
      assert.equal((await call(hs, "PUT", redact, { token: AS_TOKEN, body: {} })).status, 200);
      assert.equal((await react("a4", "✅")).status, 200, "the first redacted");
    });
  });

  it("join rules: private needs an invite, public does not", async () => {
    await withHs(async (hs) => {
      const alice = hs.registerUser("alice");
      const priv = hs.createRoom({ creator: alice, preset: "private_chat", name: "Private" });
      const pub = hs.createRoom({ creator: alice, preset: "public_chat", alias: "#lobby:test.local" });
      const denied = await call(hs, "POST", `${C}/join/${enc(priv)}`, { token: AS_TOKEN, body: {} });
      assert.equal(denied.status, 403);
      assert.equal(denied.body.errcode, "M_FORBIDDEN");

      hs.inviteUser(priv, alice, "@bridgebot:test.local");
      const allowed = await call(hs, "POST", `${C}/rooms/${enc(priv)}/join`, { token: AS_TOKEN, body: {} });
      assert.equal(allowed.status, 200);
      assert.deepEqual(hs.members(priv), [alice, "@bridgebot:test.local"]);

      const viaAlias = await call(hs, "POST", `${C}/join/${enc("#lobby:test.local")}`, { token: AS_TOKEN });
      assert.equal(viaAlias.status, 200);
      assert.equal(viaAlias.body.room_id, pub);
      const dir = await call(hs, "GET", `${C}/directory/room/${enc("#lobby:test.local")}`);
      assert.deepEqual(dir.body, { room_id: pub, servers: ["test.local"] });
      const missing = await call(hs, "GET", `${C}/directory/room/${enc("#nope:test.local")}`);
      assert.equal(missing.status, 404);
      assert.equal(missing.body.errcode, "M_NOT_FOUND");

      // Membership events are recorded as state.
      const member = hs.events(priv).filter((e) => e.type === "m.room.member");
      assert.deepEqual(
        member.map((e) => [e.state_key, e.content.membership]),
        [
          [alice, "join"],
          ["@bridgebot:test.local", "invite"],
          ["@bridgebot:test.local", "join"],
        ],
      );
    });
  });

  it("state: empty state key via /state/{type} and /state/{type}/, 404 when absent", async () => {
    await withHs(async (hs) => {
      const alice = hs.registerUser("alice");
      const roomId = hs.createRoom({ creator: alice, invite: ["@bridgebot:test.local"] });
      await call(hs, "POST", `${C}/join/${enc(roomId)}`, { token: AS_TOKEN });
      const base = `${C}/rooms/${enc(roomId)}/state`;
      const absent = await call(hs, "GET", `${base}/org.example.thing`, { token: AS_TOKEN });
      assert.equal(absent.status, 404);
      assert.equal(absent.body.errcode, "M_NOT_FOUND");
      // state_default is 50: the bot (level 0) may not set state; alice (100) may.
      const denied = await call(hs, "PUT", `${base}/org.example.thing`, { token: AS_TOKEN, body: { a: 1 } });
      assert.equal(denied.status, 403);
      hs.sendState(roomId, alice, "m.room.power_levels", "", {
        ...hs.stateEvent(roomId, "m.room.power_levels")!.content,
        users: { [alice]: 100, "@bridgebot:test.local": 50 },
      });
      const put = await call(hs, "PUT", `${base}/org.example.thing/`, { token: AS_TOKEN, body: { a: 2 } });
      assert.equal(put.status, 200, JSON.stringify(put.body));
      const got = await call(hs, "GET", `${base}/org.example.thing`, { token: AS_TOKEN });
      assert.deepEqual(got.body, { a: 2 });
      const all = await call(hs, "GET", base, { token: AS_TOKEN });
      assert.ok(Array.isArray(all.body));
    });
  });
});

describe("TestHomeserver: room version 12, Synapse's default (Room versions §12)", () => {
  it("the room id is the create event's hash, without a server; creators rank above every level and are listed in no power levels", async () => {
    await withHs(async (hs) => {
      const alice = hs.registerUser("alice");
      const bob = hs.registerUser("bob");
      const carol = hs.registerUser("carol");
      const roomId = hs.createRoom({
        creator: alice,
        preset: "public_chat",
        roomVersion: "12",
        additionalCreators: [carol],
      });
      assert.match(roomId, /^![A-Za-z0-9_-]{43}$/);
      const create = hs.events(roomId)[0]!;
      assert.equal(create.event_id, `$${roomId.slice(1)}`);
      const levels = hs.stateEvent(roomId, "m.room.power_levels")!.content;
      assert.deepEqual(levels.users, {});
      assert.equal((levels.events as Record<string, number>)["m.room.tombstone"], 150);
      // The bot reads the create event by its id, as power-levels.ts does.
      hs.joinRoom(roomId, bob);
      await call(hs, "POST", `${C}/join/${enc(roomId)}`, { token: AS_TOKEN, body: {} });
      const read = await call(hs, "GET", `${C}/rooms/${enc(roomId)}/event/${enc(create.event_id)}`, {
        token: AS_TOKEN,
      });
      assert.equal(read.status, 200, JSON.stringify(read.body));
      assert.equal(read.body.sender, alice);

      // Synapse: 400 M_UNKNOWN for a creator in `users`, at creation and on a change alike.
      const creatorListed = { ...levels, users: { [alice]: 100 } };
      assert.throws(() => hs.sendState(roomId, alice, "m.room.power_levels", "", creatorListed), {
        status: 400,
        errcode: "M_UNKNOWN",
      });
      assert.throws(
        () => hs.sendState(roomId, alice, "m.room.power_levels", "", { ...levels, users: { [carol]: 50 } }),
        { status: 400 },
      );
      const override = await call(hs, "POST", `${C}/createRoom`, {
        token: hs.accessTokenFor(alice),
        body: { room_version: "12", power_level_content_override: { users: { [alice]: 100 } } },
      });
      assert.equal(override.status, 400, JSON.stringify(override.body));
      assert.match(String(override.body.error), /must not appear in content\.users/);

      // An additional creator outranks the room's own levels: it may change them.
      hs.joinRoom(roomId, carol);
      hs.sendState(roomId, carol, "m.room.power_levels", "", { ...levels, users: { [bob]: 50 } });
      assert.deepEqual(hs.stateEvent(roomId, "m.room.power_levels")!.content.users, { [bob]: 50 });
    });
  });

  it("a trusted_private_chat's invitees are its additional creators", async () => {
    await withHs(async (hs) => {
      const alice = hs.registerUser("alice");
      const bob = hs.registerUser("bob");
      const roomId = hs.createRoom({
        creator: alice,
        preset: "trusted_private_chat",
        roomVersion: "12",
        invite: [bob],
      });
      assert.deepEqual(hs.events(roomId)[0]!.content.additional_creators, [bob]);
      assert.deepEqual(hs.stateEvent(roomId, "m.room.power_levels")!.content.users, {});
    });
  });
});

describe("TestHomeserver: Synapse's default power levels", () => {
  it("inviting takes level 50 in a public_chat room, 0 in a private one", async () => {
    await withHs(async (hs) => {
      const alice = hs.registerUser("alice");
      const bob = hs.registerUser("bob");
      const pub = hs.createRoom({ creator: alice, preset: "public_chat" });
      const priv = hs.createRoom({ creator: alice, preset: "private_chat", invite: [bob] });
      assert.equal(hs.stateEvent(pub, "m.room.power_levels")!.content.invite, 50);
      assert.equal(hs.stateEvent(priv, "m.room.power_levels")!.content.invite, 0);
      hs.joinRoom(pub, bob);
      hs.joinRoom(priv, bob);
      assert.throws(() => hs.inviteUser(pub, bob, "@bridgebot:test.local"), { status: 403 });
      hs.inviteUser(priv, bob, "@bridgebot:test.local");
    });
  });
});

describe("TestHomeserver: pushing to the appservice", () => {
  it("retries the same transaction after 500s, keeps order", async () => {
    const as = await fakeAppservice((_c, i) => (i < 2 ? 500 : 200));
    const hs = new TestHomeserver({
      registration: registration(as.url),
      retry: { initialDelayMs: 10, maxDelayMs: 40 },
    });
    await hs.start();
    try {
      const alice = hs.registerUser("alice");
      hs.pausePush();
      const roomId = hs.createRoom({
        creator: alice,
        preset: "public_chat",
        invite: ["@bridgebot:test.local"],
      });
      hs.joinRoom(roomId, "@bridgebot:test.local");
      hs.sendMessage(roomId, alice, { msgtype: "m.text", body: "one" });
      hs.sendMessage(roomId, alice, { msgtype: "m.text", body: "two" });
      hs.resumePush();
      await hs.waitForPushIdle(3000);
      assert.deepEqual(
        as.calls.map((c) => [c.method, c.url]),
        [
          ["PUT", "/_matrix/app/v1/transactions/1"],
          ["PUT", "/_matrix/app/v1/transactions/1"],
          ["PUT", "/_matrix/app/v1/transactions/1"],
        ],
      );
      assert.equal(as.calls[0]?.body, as.calls[2]?.body, "retries carry an identical body");
      assert.ok(as.calls.every((c) => c.auth === `Bearer ${HS_TOKEN}`));
      const events = (JSON.parse(as.calls[2]!.body) as { events: Record<string, unknown>[] }).events;
      // Spec: interesting once the bot is the target (invite) or a joined member; earlier events are not.
      const all = hs.events(roomId);
      const firstInteresting = all.findIndex((e) => e.state_key === "@bridgebot:test.local");
      assert.deepEqual(
        events.map((e) => e.event_id),
        all.slice(firstInteresting).map((e) => e.event_id),
      );
      assert.equal(events.length, 4); // invite, join, "one", "two"
      const msgs = events.filter((e) => e.type === "m.room.message");
      assert.deepEqual(
        msgs.map((e) => (e.content as { body: string }).body),
        ["one", "two"],
      );
      assert.deepEqual(
        hs.pushedTransactions.map((t) => t.status),
        [500, 500, 200],
      );

      // Replaying a delivered transaction re-sends the same body under the same id.
      assert.equal(await hs.replayTransaction("1"), 200);
      assert.equal(as.calls[3]?.url, "/_matrix/app/v1/transactions/1");
      assert.equal(as.calls[3]?.body, as.calls[2]?.body);
    } finally {
      await hs.stop();
      await as.close();
    }
  });

  it("splits into transactions of maxEventsPerTransaction, ids increment; setNextTxnId restarts", async () => {
    const as = await fakeAppservice();
    const hs = new TestHomeserver({ registration: registration(as.url), maxEventsPerTransaction: 3 });
    await hs.start();
    try {
      const alice = hs.registerUser("alice");
      const roomId = hs.createRoom({ creator: alice, preset: "public_chat" });
      // Not interesting yet: no namespace user in the room.
      await hs.waitForPushIdle();
      assert.equal(as.calls.length, 0);
      hs.joinRoom(roomId, "@bridgebot:test.local");
      for (let i = 0; i < 5; i++) hs.sendMessage(roomId, alice, { msgtype: "m.text", body: `m${i}` });
      await hs.waitForPushIdle();
      assert.deepEqual(
        as.calls.map((c) => c.url),
        ["/_matrix/app/v1/transactions/1", "/_matrix/app/v1/transactions/2"],
      );
      const counts = as.calls.map((c) => (JSON.parse(c.body) as { events: unknown[] }).events.length);
      assert.deepEqual(counts, [3, 3]);

      hs.setNextTxnId(1);
      hs.sendMessage(roomId, alice, { msgtype: "m.text", body: "after restart" });
      await hs.waitForPushIdle();
      assert.equal(as.calls.at(-1)?.url, "/_matrix/app/v1/transactions/1");
    } finally {
      await hs.stop();
      await as.close();
    }
  });

  it("legacy path and query-string token", async () => {
    const as = await fakeAppservice();
    const hs = new TestHomeserver({
      registration: registration(as.url),
      pushPath: "legacy",
      authMode: "query",
    });
    await hs.start();
    try {
      const alice = hs.registerUser("alice");
      hs.createRoom({ creator: alice, invite: ["@bridgebot:test.local"] });
      await hs.waitForPushIdle();
      assert.equal(as.calls.length, 1);
      assert.equal(as.calls[0]?.url, `/transactions/1?access_token=${HS_TOKEN}`);
      assert.equal(as.calls[0]?.auth, undefined);
      // Only the invite targets the bot; earlier events were not interesting.
      const evs = (JSON.parse(as.calls[0]!.body) as { events: { type: string; state_key?: string }[] })
        .events;
      assert.deepEqual(
        evs.map((e) => [e.type, e.state_key]),
        [["m.room.member", "@bridgebot:test.local"]],
      );

      const forged = await hs.pushRaw("/transactions/99", { events: [] }, null);
      assert.equal(forged.status, 200); // the fake AS accepts anything; the request carried no token
      assert.equal(as.calls.at(-1)?.url, "/transactions/99");
      assert.equal(as.calls.at(-1)?.auth, undefined);
    } finally {
      await hs.stop();
      await as.close();
    }
  });

  it("events the appservice sends are pushed back to it; waitForMessages times out helpfully", async () => {
    const as = await fakeAppservice();
    const hs = new TestHomeserver({ registration: registration(as.url) });
    await hs.start();
    try {
      const alice = hs.registerUser("alice");
      const roomId = hs.createRoom({ creator: alice, preset: "public_chat" });
      await call(hs, "POST", `${C}/join/${enc(roomId)}`, { token: AS_TOKEN });
      const sent = await call(hs, "PUT", `${C}/rooms/${enc(roomId)}/send/m.room.message/a1`, {
        token: AS_TOKEN,
        body: { msgtype: "m.text", body: "from bridge" },
      });
      await hs.waitForPushIdle();
      const pushed = as.calls.flatMap(
        (c) => (JSON.parse(c.body) as { events: { event_id: string }[] }).events,
      );
      assert.ok(pushed.some((e) => e.event_id === sent.body.event_id));
      assert.equal((await hs.waitForMessages(roomId, 1, 100)).length, 1);
      await assert.rejects(hs.waitForMessages(roomId, 2, 50), /got 1\/2 m\.room\.message/);
    } finally {
      await hs.stop();
      await as.close();
    }
  });
});

describe("TestHomeserver: appservice ping (AS API §Pinging)", () => {
  it("answers the ping; without it (appservicePing: absent) answers as Synapse before 1.84: 400 M_UNRECOGNIZED", async () => {
    const path = `/_matrix/client/v1/appservice/tribridge-test/ping`;
    await withHs(async (hs) => {
      const r = await call(hs, "POST", path, { token: AS_TOKEN, body: {} });
      assert.equal(r.status, 400);
      assert.equal(r.body.errcode, "M_URL_NOT_SET"); // registration.url is null here
    });
    await withHs(
      async (hs) => {
        for (const token of [AS_TOKEN, undefined]) {
          const r = await call(hs, "POST", path, { token, body: {} });
          assert.equal(r.status, 400);
          assert.equal(r.body.errcode, "M_UNRECOGNIZED");
        }
      },
      { appservicePing: "absent" },
    );
  });
});

describe("TestHomeserver: end-to-end encryption state (CS API §End-to-End Encryption)", () => {
  it("a room can be created encrypted or have encryption enabled; encrypted events are opaque", async () => {
    await withHs(async (hs) => {
      const alice = hs.registerUser("alice");
      const encrypted = hs.createRoom({ creator: alice, encrypted: true });
      assert.equal(hs.stateEvent(encrypted, "m.room.encryption")?.content.algorithm, "m.megolm.v1.aes-sha2");
      const plain = hs.createRoom({ creator: alice });
      assert.equal(hs.stateEvent(plain, "m.room.encryption"), undefined);
      hs.enableEncryption(plain, alice);
      assert.equal(hs.stateEvent(plain, "m.room.encryption")?.content.algorithm, "m.megolm.v1.aes-sha2");
      const id = hs.sendEncrypted(encrypted, alice);
      const ev = hs.events(encrypted).find((e) => e.event_id === id)!;
      assert.equal(ev.type, "m.room.encrypted");
      assert.equal(typeof ev.content.ciphertext, "string");
      assert.equal(ev.content.body, undefined);
    });
  });
});
