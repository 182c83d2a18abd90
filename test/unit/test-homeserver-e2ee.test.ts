/**
 * The test homeserver's end-to-end encryption surface, as Synapse answers it: devices (login,
 * logout, MSC4190), device masquerading (MSC4326/MSC3202), keys (upload, query, claim, fallback,
 * cross-signing), to-device messages through /sync and through appservice transactions
 * (MSC2409/MSC3202), and two real Olm machines exchanging a Megolm message through it only.
 */
import { describe, it, after } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { DeviceId, OlmMachine, UserId } from "@matrix-org/matrix-sdk-crypto-wasm";
import {
  TestHomeserver,
  type AppserviceRegistration,
  type TestHomeserverOptions,
} from "../helpers/test-homeserver.js";
import { transactionDeviceData } from "../../src/matrix/crypto/transaction-device-data.js";
import { OlmDevice } from "../../src/matrix/crypto/olm-device.js";
import { syncOnce } from "../../src/matrix/crypto/device-sync.js";
import type { DeviceAuth } from "../../src/matrix/matrix-client.js";

type Json = Record<string, unknown>;
const AS_TOKEN = "as-secret";
const C = "/_matrix/client/v3";
const BOT = "@bridgebot:test.local";

function registration(
  url: string | null,
  extra: Partial<AppserviceRegistration> = {},
): AppserviceRegistration {
  return {
    id: "tribridge-e2ee",
    url,
    as_token: AS_TOKEN,
    hs_token: "hs-secret",
    sender_localpart: "bridgebot",
    namespaces: { users: [{ exclusive: true, regex: "@mqtt_.*:test\\.local" }] },
    ...extra,
  };
}

/** An appservice that records each transaction body and answers `status(index)`. */
async function fakeAppservice(status: (body: Json) => number = () => 200) {
  const transactions: Json[] = [];
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const isTransaction = req.url?.includes("/transactions/") === true;
      const body = isTransaction ? (JSON.parse(Buffer.concat(chunks).toString()) as Json) : {};
      const code = isTransaction ? status(body) : 200;
      if (isTransaction) transactions.push({ ...body, _status: code });
      res.writeHead(code, { "Content-Type": "application/json" }).end("{}");
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    transactions,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

const stops: (() => Promise<void>)[] = [];
after(async () => {
  for (const stop of stops.reverse()) await stop();
});

async function homeserver(
  opts: Partial<TestHomeserverOptions> = {},
  url: string | null = null,
): Promise<TestHomeserver> {
  const hs = new TestHomeserver({ registration: registration(url), ...opts });
  await hs.start();
  stops.push(() => hs.stop());
  return hs;
}

async function call(
  hs: TestHomeserver,
  method: string,
  path: string,
  opts: { token?: string; body?: unknown; query?: Record<string, string> } = {},
): Promise<{ status: number; body: Json }> {
  const url = new URL(hs.url + path);
  for (const [k, v] of Object.entries(opts.query ?? {})) url.searchParams.set(k, v);
  const res = await fetch(url, {
    method,
    headers: {
      ...(opts.token ? { Authorization: `Bearer ${opts.token}` } : {}),
      ...(opts.body !== undefined ? { "Content-Type": "application/json" } : {}),
    },
    body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
  });
  return { status: res.status, body: (await res.json()) as Json };
}

async function ghost(hs: TestHomeserver, localpart: string): Promise<string> {
  const r = await call(hs, "POST", `${C}/register`, {
    token: AS_TOKEN,
    body: { type: "m.login.application_service", username: localpart, inhibit_login: true },
  });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  return r.body.user_id as string;
}

/** A device key object as clients upload it (signatures not checked by the homeserver). */
function deviceKeys(userId: string, deviceId: string): Json {
  return {
    user_id: userId,
    device_id: deviceId,
    algorithms: ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
    keys: { [`curve25519:${deviceId}`]: "curvekey", [`ed25519:${deviceId}`]: "edkey" },
    signatures: { [userId]: { [`ed25519:${deviceId}`]: "sig" } },
  };
}
const signedKey = (key: string, userId: string, fallback = false): Json => ({
  key,
  ...(fallback ? { fallback: true } : {}),
  signatures: { [userId]: { "ed25519:DEV": "sig" } },
});

describe("TestHomeserver E2EE: devices (CS API §Device management, MSC4190)", () => {
  it("appservice login makes or reuses a device, one token each; /devices lists it; logout deletes it with its keys", async () => {
    const hs = await homeserver();
    const user = await ghost(hs, "mqtt_a");
    const login = (deviceId?: string) =>
      call(hs, "POST", `${C}/login`, {
        token: AS_TOKEN,
        body: {
          type: "m.login.application_service",
          identifier: { type: "m.id.user", user },
          initial_device_display_name: "tribridge",
          ...(deviceId ? { device_id: deviceId } : {}),
        },
      });
    const first = await login("DEVA");
    assert.equal(first.status, 200);
    assert.equal(first.body.device_id, "DEVA");
    const again = await login("DEVA");
    assert.notEqual(again.body.access_token, first.body.access_token);
    const other = await login();
    assert.match(other.body.device_id as string, /^[A-Z]{10}$/);
    const token = first.body.access_token as string;
    const who = await call(hs, "GET", `${C}/account/whoami`, { token });
    assert.deepEqual(who.body, { user_id: user, is_guest: false, device_id: "DEVA" });
    const list = await call(hs, "GET", `${C}/devices`, { token });
    const devices = list.body.devices as Json[];
    assert.deepEqual(devices.map((d) => d.device_id).sort(), ["DEVA", other.body.device_id].sort());
    assert.equal(devices.find((d) => d.device_id === "DEVA")!.display_name, "tribridge");

    assert.equal(
      (await call(hs, "POST", `${C}/keys/upload`, { token, body: { device_keys: deviceKeys(user, "DEVA") } }))
        .status,
      200,
    );
    assert.equal((await call(hs, "POST", `${C}/logout`, { token })).status, 200);
    // Both tokens of the device are gone with it, and so are its keys.
    assert.equal((await call(hs, "GET", `${C}/account/whoami`, { token })).body.errcode, "M_UNKNOWN_TOKEN");
    assert.equal(
      (await call(hs, "GET", `${C}/account/whoami`, { token: again.body.access_token as string })).status,
      401,
    );
    const q = await call(hs, "POST", `${C}/keys/query`, {
      token: AS_TOKEN,
      body: { device_keys: { [user]: [] } },
    });
    assert.deepEqual(q.body.device_keys, { [user]: {} });
  });

  it("MSC4190: PUT /devices/{id} as a user creates (201) then updates (200); DELETE needs no UIA; the opt-in refuses login", async () => {
    const hs = new TestHomeserver({ registration: registration(null, { "io.element.msc4190": true }) });
    await hs.start();
    stops.push(() => hs.stop());
    const user = await ghost(hs, "mqtt_b");
    const as = { token: AS_TOKEN, query: { user_id: user } };
    assert.equal(
      (await call(hs, "PUT", `${C}/devices/DEVB`, { ...as, body: { display_name: "tribridge" } })).status,
      201,
    );
    assert.equal((await call(hs, "PUT", `${C}/devices/DEVB`, { ...as, body: {} })).status, 200);
    const got = await call(hs, "GET", `${C}/devices/DEVB`, as);
    assert.equal(got.body.display_name, "tribridge");
    assert.equal(
      (await call(hs, "PUT", `${C}/devices/DEVB`, { ...as, body: { display_name: 5 } })).body.errcode,
      "M_BAD_JSON",
    );
    assert.equal((await call(hs, "DELETE", `${C}/devices/DEVB`, as)).status, 200);
    assert.equal((await call(hs, "GET", `${C}/devices/DEVB`, as)).status, 404);
    // The registration's io.element.msc4190: no appservice login, and /register only with inhibit_login.
    const login = await call(hs, "POST", `${C}/login`, {
      token: AS_TOKEN,
      body: { type: "m.login.application_service", identifier: { type: "m.id.user", user } },
    });
    assert.equal(login.status, 400);
    assert.equal(login.body.errcode, "IO.ELEMENT.MSC4190.M_APPSERVICE_LOGIN_UNSUPPORTED");
    const reg = await call(hs, "POST", `${C}/register`, {
      token: AS_TOKEN,
      body: { type: "m.login.application_service", username: "mqtt_c" },
    });
    assert.equal(reg.body.errcode, "IO.ELEMENT.MSC4190.M_APPSERVICE_LOGIN_UNSUPPORTED");
  });

  it("without MSC4190 (Synapse before 1.122): PUT of an unknown device → 404, DELETE → 401 user-interactive auth", async () => {
    const hs = await homeserver({ msc4190: false });
    const user = await ghost(hs, "mqtt_d");
    const as = { token: AS_TOKEN, query: { user_id: user } };
    const put = await call(hs, "PUT", `${C}/devices/NEW`, { ...as, body: {} });
    assert.equal(put.status, 404);
    assert.equal(put.body.errcode, "M_NOT_FOUND");
    await call(hs, "POST", `${C}/login`, {
      token: AS_TOKEN,
      body: {
        type: "m.login.application_service",
        identifier: { type: "m.id.user", user },
        device_id: "OLD",
      },
    });
    const del = await call(hs, "DELETE", `${C}/devices/OLD`, as);
    assert.equal(del.status, 401);
    assert.deepEqual(del.body.flows, [{ stages: ["m.login.password"] }]);
  });

  it("device masquerading: only an existing device of the asserted user; off, the parameter is ignored", async () => {
    const hs = await homeserver();
    const a = await ghost(hs, "mqtt_e");
    const b = await ghost(hs, "mqtt_f");
    await call(hs, "PUT", `${C}/devices/EDEV`, { token: AS_TOKEN, query: { user_id: a }, body: {} });
    const mine = await call(hs, "GET", `${C}/account/whoami`, {
      token: AS_TOKEN,
      query: { user_id: a, "org.matrix.msc3202.device_id": "EDEV" },
    });
    assert.equal(mine.body.device_id, "EDEV");
    const stable = await call(hs, "GET", `${C}/account/whoami`, {
      token: AS_TOKEN,
      query: { user_id: a, device_id: "EDEV" },
    });
    assert.equal(stable.body.device_id, "EDEV");
    const theirs = await call(hs, "GET", `${C}/account/whoami`, {
      token: AS_TOKEN,
      query: { user_id: b, "org.matrix.msc3202.device_id": "EDEV" },
    });
    assert.equal(theirs.status, 400);
    assert.equal(theirs.body.errcode, "ORG.MATRIX.MSC4326.M_UNKNOWN_DEVICE");

    const old = await homeserver({ deviceMasquerading: false });
    const c = await ghost(old, "mqtt_g");
    const ignored = await call(old, "GET", `${C}/account/whoami`, {
      token: AS_TOKEN,
      query: { user_id: c, "org.matrix.msc3202.device_id": "NOPE" },
    });
    assert.deepEqual(ignored.body, { user_id: c, is_guest: false });
  });
});

describe("TestHomeserver E2EE: keys (CS API §Key management API)", () => {
  it("upload checks the shape and the owner; counts one-time keys; query returns them with the display name", async () => {
    const hs = await homeserver();
    const user = await ghost(hs, "mqtt_k");
    await call(hs, "PUT", `${C}/devices/KDEV`, {
      token: AS_TOKEN,
      query: { user_id: user },
      body: { display_name: "bridge" },
    });
    const as = { token: AS_TOKEN, query: { user_id: user, "org.matrix.msc3202.device_id": "KDEV" } };
    const upload = (body: Json) => call(hs, "POST", `${C}/keys/upload`, { ...as, body });

    const noDevice = await call(hs, "POST", `${C}/keys/upload`, {
      token: AS_TOKEN,
      query: { user_id: user },
      body: {},
    });
    assert.equal(noDevice.status, 400);
    assert.equal((await upload({ device_keys: deviceKeys(user, "OTHER") })).body.errcode, "M_BAD_JSON");
    assert.equal(
      (await upload({ device_keys: deviceKeys("@mqtt_x:test.local", "KDEV") })).body.errcode,
      "M_BAD_JSON",
    );
    assert.equal(
      (await upload({ device_keys: { ...deviceKeys(user, "KDEV"), keys: [] } })).body.errcode,
      "M_BAD_JSON",
    );
    assert.equal((await upload({ device_keys: null })).body.errcode, "M_BAD_JSON");
    assert.equal(
      (await upload({ one_time_keys: { "signed_curve25519:a:b": "k" } })).body.errcode,
      "M_BAD_JSON",
    );

    const ok = await upload({
      device_keys: deviceKeys(user, "KDEV"),
      one_time_keys: {
        "signed_curve25519:AAAAAQ": signedKey("k1", user),
        "signed_curve25519:AAAAAg": signedKey("k2", user),
      },
      fallback_keys: { "signed_curve25519:AAAAAw": signedKey("fb", user, true) },
    });
    assert.deepEqual(ok.body, { one_time_key_counts: { signed_curve25519: 2 } });
    // The same key again is fine; a different key under the same id is refused.
    assert.equal(
      (await upload({ one_time_keys: { "signed_curve25519:AAAAAQ": signedKey("k1", user) } })).status,
      200,
    );
    assert.equal(
      (await upload({ one_time_keys: { "signed_curve25519:AAAAAQ": signedKey("zz", user) } })).status,
      400,
    );

    const q = await call(hs, "POST", `${C}/keys/query`, {
      token: AS_TOKEN,
      body: { device_keys: { [user]: [], "@nobody:test.local": [], "@far:elsewhere.org": [] } },
    });
    const keys = (q.body.device_keys as Record<string, Record<string, Json>>)[user]!.KDEV!;
    assert.deepEqual(keys.unsigned, { device_display_name: "bridge" });
    assert.equal(keys.user_id, user);
    assert.deepEqual((q.body.device_keys as Json)["@nobody:test.local"], {});
    assert.deepEqual(Object.keys(q.body.failures as Json), ["elsewhere.org"]);
    assert.equal(
      (
        await call(hs, "POST", `${C}/keys/query`, {
          token: AS_TOKEN,
          body: { device_keys: { [user]: "KDEV" } },
        })
      ).body.errcode,
      "M_BAD_JSON",
    );
  });

  it("claim takes one-time keys one by one, then the fallback key (marked used, kept); counts show it", async () => {
    const hs = await homeserver();
    const user = await ghost(hs, "mqtt_c1");
    await call(hs, "PUT", `${C}/devices/CDEV`, { token: AS_TOKEN, query: { user_id: user }, body: {} });
    const as = { token: AS_TOKEN, query: { user_id: user, "org.matrix.msc3202.device_id": "CDEV" } };
    await call(hs, "POST", `${C}/keys/upload`, {
      ...as,
      body: {
        one_time_keys: { "signed_curve25519:AAAAAQ": signedKey("k1", user) },
        fallback_keys: { "signed_curve25519:AAAAFB": signedKey("fb", user, true) },
      },
    });
    const claim = () =>
      call(hs, "POST", `${C}/keys/claim`, {
        token: AS_TOKEN,
        body: { one_time_keys: { [user]: { CDEV: "signed_curve25519", NODEV: "signed_curve25519" } } },
      });
    const first = await claim();
    assert.deepEqual(first.body, {
      one_time_keys: { [user]: { CDEV: { "signed_curve25519:AAAAAQ": signedKey("k1", user) } } },
      failures: {},
    });
    const sync1 = await call(hs, "GET", `${C}/sync`, as);
    assert.deepEqual(sync1.body.device_one_time_keys_count, { signed_curve25519: 0 });
    assert.deepEqual(sync1.body.device_unused_fallback_key_types, ["signed_curve25519"]);
    const second = await claim();
    assert.deepEqual((second.body.one_time_keys as Json)[user], {
      CDEV: { "signed_curve25519:AAAAFB": signedKey("fb", user, true) },
    });
    assert.deepEqual((await call(hs, "GET", `${C}/sync`, as)).body.device_unused_fallback_key_types, []);
    // Still given once used (MSC2732), until a new one replaces it.
    assert.deepEqual((await claim()).body, second.body);
  });

  it("cross-signing keys and signatures are stored and returned by /keys/query", async () => {
    const hs = await homeserver();
    const user = await ghost(hs, "mqtt_x1");
    await call(hs, "PUT", `${C}/devices/XDEV`, { token: AS_TOKEN, query: { user_id: user }, body: {} });
    const as = { token: AS_TOKEN, query: { user_id: user, "org.matrix.msc3202.device_id": "XDEV" } };
    await call(hs, "POST", `${C}/keys/upload`, { ...as, body: { device_keys: deviceKeys(user, "XDEV") } });
    const master = { user_id: user, usage: ["master"], keys: { "ed25519:MASTERPUB": "MASTERPUB" } };
    const selfSigning = {
      user_id: user,
      usage: ["self_signing"],
      keys: { "ed25519:SSPUB": "SSPUB" },
      signatures: { [user]: { "ed25519:MASTERPUB": "s" } },
    };
    assert.equal(
      (
        await call(hs, "POST", `${C}/keys/device_signing/upload`, {
          ...as,
          body: { master_key: master, self_signing_key: selfSigning },
        })
      ).status,
      200,
    );
    const sigs = await call(hs, "POST", `${C}/keys/signatures/upload`, {
      ...as,
      body: {
        [user]: {
          XDEV: { ...deviceKeys(user, "XDEV"), signatures: { [user]: { "ed25519:SSPUB": "devsig" } } },
          UNKNOWN: { signatures: { [user]: { "ed25519:SSPUB": "x" } } },
        },
      },
    });
    assert.deepEqual(Object.keys((sigs.body.failures as Json)[user] as Json), ["UNKNOWN"]);
    const q = await call(hs, "POST", `${C}/keys/query`, {
      token: AS_TOKEN,
      body: { device_keys: { [user]: ["XDEV"] } },
    });
    assert.deepEqual((q.body.master_keys as Json)[user], master);
    const dev = ((q.body.device_keys as Json)[user] as Record<string, Json>).XDEV!;
    assert.deepEqual((dev.signatures as Json)[user], { "ed25519:XDEV": "sig", "ed25519:SSPUB": "devsig" });
  });
});

describe("TestHomeserver E2EE: to-device messages and /sync (CS API §Send-to-Device messaging, §Syncing)", () => {
  it("sendToDevice is idempotent per transaction id; '*' reaches every device; /sync gives them until acknowledged", async () => {
    const hs = await homeserver();
    const alice = hs.registerUser("alice");
    const aliceToken = hs.accessTokenFor(alice);
    const bob = await ghost(hs, "mqtt_bob");
    for (const d of ["B1", "B2"])
      await call(hs, "PUT", `${C}/devices/${d}`, { token: AS_TOKEN, query: { user_id: bob }, body: {} });
    const send = (txn: string, messages: Json) =>
      call(hs, "PUT", `${C}/sendToDevice/m.test/${txn}`, { token: aliceToken, body: { messages } });
    assert.equal((await send("t1", { [bob]: { B1: { n: 1 } } })).status, 200);
    assert.equal((await send("t1", { [bob]: { B1: { n: 1 } } })).status, 200);
    await send("t2", {
      [bob]: { "*": { n: 2 } },
      "@far:elsewhere.org": { X: { n: 0 } },
      "not a user": { X: {} },
    });
    assert.equal(
      (await call(hs, "PUT", `${C}/sendToDevice/m.test/t3`, { token: aliceToken, body: {} })).body.errcode,
      "M_MISSING_PARAM",
    );
    assert.equal((await send("t4", { [bob]: { B1: { big: "x".repeat(70_000) } } })).status, 413);

    const b1 = { token: AS_TOKEN, query: { user_id: bob, device_id: "B1" } };
    const first = await call(hs, "GET", `${C}/sync`, b1);
    assert.deepEqual((first.body.to_device as { events: Json[] }).events, [
      { content: { n: 1 }, type: "m.test", sender: alice },
      { content: { n: 2 }, type: "m.test", sender: alice },
    ]);
    // Not acknowledged yet: given again; acknowledged by syncing from next_batch: gone.
    const again = await call(hs, "GET", `${C}/sync`, b1);
    assert.equal((again.body.to_device as { events: Json[] }).events.length, 2);
    const since = first.body.next_batch as string;
    const acked = await call(hs, "GET", `${C}/sync`, { ...b1, query: { ...b1.query, since } });
    assert.equal(acked.body.to_device, undefined);
    const b2 = await call(hs, "GET", `${C}/sync`, {
      token: AS_TOKEN,
      query: { user_id: bob, device_id: "B2" },
    });
    assert.deepEqual((b2.body.to_device as { events: Json[] }).events, [
      { content: { n: 2 }, type: "m.test", sender: alice },
    ]);
    assert.equal(
      (await call(hs, "GET", `${C}/sync`, { ...b1, query: { ...b1.query, since: "s999999" } })).status,
      400,
    );
  });

  it("a long-polling /sync wakes for a message; device_lists show new devices, joins and leaves of room sharers", async () => {
    const hs = await homeserver();
    const alice = hs.registerUser("alice");
    const aliceToken = hs.accessTokenFor(alice);
    const carol = hs.registerUser("carol");
    const room = hs.createRoom({ creator: alice, encrypted: true, preset: "public_chat" });
    const start = (await call(hs, "GET", `${C}/sync`, { token: aliceToken })).body.next_batch as string;
    const began = Date.now();
    const polling = call(hs, "GET", `${C}/sync`, {
      token: aliceToken,
      query: { since: start, timeout: "5000" },
    });
    setTimeout(() => hs.joinRoom(room, carol), 100);
    const woke = await polling;
    assert.ok(Date.now() - began < 4000);
    assert.deepEqual(woke.body.device_lists, { changed: [carol] });
    const afterJoin = woke.body.next_batch as string;
    // Carol gets a new device (her keys upload): a change for Alice, who shares a room with her.
    const carolToken = hs.accessTokenFor(carol);
    const carolDevice = (await call(hs, "GET", `${C}/account/whoami`, { token: carolToken })).body
      .device_id as string;
    await call(hs, "POST", `${C}/keys/upload`, {
      token: carolToken,
      body: { device_keys: deviceKeys(carol, carolDevice) },
    });
    const changed = await call(hs, "GET", `${C}/sync`, { token: aliceToken, query: { since: afterJoin } });
    assert.deepEqual(changed.body.device_lists, { changed: [carol] });
    hs.leaveRoom(room, carol);
    const left = await call(hs, "GET", `${C}/sync`, {
      token: aliceToken,
      query: { since: changed.body.next_batch as string },
    });
    assert.deepEqual(left.body.device_lists, { left: [carol] });
    const keysChanges = await call(hs, "GET", `${C}/keys/changes`, {
      token: aliceToken,
      query: { from: afterJoin, to: left.body.next_batch as string },
    });
    assert.deepEqual(keysChanges.body, { changed: [], left: [carol] });
    // Nothing new: the long-poll times out with an empty answer.
    const quiet = await call(hs, "GET", `${C}/sync`, {
      token: aliceToken,
      query: { since: left.body.next_batch as string, timeout: "50" },
    });
    assert.equal(quiet.body.device_lists, undefined);
  });
});

describe("TestHomeserver E2EE: appservice transactions (MSC2409, MSC3202)", () => {
  it("carry to-device messages, key counts, fallback key types and device list changes in Synapse's shapes, which the bridge reads", async () => {
    const as = await fakeAppservice();
    stops.push(as.close);
    const hs = new TestHomeserver({
      registration: registration(as.url, { receive_ephemeral: true, "org.matrix.msc3202": true }),
      msc2409ToDevice: true,
      msc3202TransactionExtensions: true,
    });
    await hs.start();
    stops.push(() => hs.stop());
    const alice = hs.registerUser("alice");
    const bob = await ghost(hs, "mqtt_bob");
    await call(hs, "PUT", `${C}/devices/BDEV`, { token: AS_TOKEN, query: { user_id: bob }, body: {} });
    await call(hs, "POST", `${C}/keys/upload`, {
      token: AS_TOKEN,
      query: { user_id: bob, device_id: "BDEV" },
      body: {
        one_time_keys: { "signed_curve25519:A": signedKey("k", bob) },
        fallback_keys: { "signed_curve25519:F": signedKey("f", bob, true) },
      },
    });
    await call(hs, "PUT", `${C}/sendToDevice/m.room_key_request/t1`, {
      token: hs.accessTokenFor(alice),
      body: { messages: { [bob]: { BDEV: { hello: 1 } } } },
    });
    await hs.waitForPushIdle();
    const withMessage = as.transactions.find(
      (t) => (t["de.sorunome.msc2409.to_device"] as unknown[] | undefined)?.length,
    )!;
    assert.deepEqual(withMessage["de.sorunome.msc2409.to_device"], [
      {
        to_user_id: bob,
        to_device_id: "BDEV",
        content: { hello: 1 },
        type: "m.room_key_request",
        sender: alice,
      },
    ]);
    assert.deepEqual(withMessage.ephemeral, []);
    assert.deepEqual(withMessage["org.matrix.msc3202.device_one_time_keys_count"], {
      [bob]: { BDEV: { signed_curve25519: 1 } },
    });
    assert.deepEqual(
      withMessage["org.matrix.msc3202.device_one_time_key_counts"],
      withMessage["org.matrix.msc3202.device_one_time_keys_count"],
    );
    assert.deepEqual(withMessage["org.matrix.msc3202.device_unused_fallback_key_types"], {
      [bob]: { BDEV: ["signed_curve25519"] },
    });
    const lists = as.transactions.find((t) => t["org.matrix.msc3202.device_lists"])!;
    assert.deepEqual(lists["org.matrix.msc3202.device_lists"], { changed: [bob], left: [] });
    // What the bridge makes of it (src/matrix/crypto/transaction-device-data.ts).
    const parsed = transactionDeviceData(withMessage)!;
    assert.equal(parsed.toDevice.length, 1);
    assert.deepEqual(parsed.oneTimeKeyCounts, { [bob]: { BDEV: { signed_curve25519: 1 } } });
    assert.deepEqual(parsed.unusedFallbackKeyTypes, { [bob]: { BDEV: ["signed_curve25519"] } });
  });

  it("off (Synapse's experimental flags unset): transactions carry none of it; a failed transaction is retried with its events only", async () => {
    const plain = await fakeAppservice();
    stops.push(plain.close);
    const off = new TestHomeserver({
      registration: registration(plain.url, { receive_ephemeral: true, "org.matrix.msc3202": true }),
    });
    await off.start();
    stops.push(() => off.stop());
    const alice = off.registerUser("alice");
    const bob = await ghost(off, "mqtt_bob");
    await call(off, "PUT", `${C}/devices/BDEV`, { token: AS_TOKEN, query: { user_id: bob }, body: {} });
    await call(off, "PUT", `${C}/sendToDevice/m.test/t1`, {
      token: off.accessTokenFor(alice),
      body: { messages: { [bob]: { BDEV: {} } } },
    });
    await off.waitForPushIdle();
    for (const t of plain.transactions) {
      assert.deepEqual(t["de.sorunome.msc2409.to_device"], []);
      assert.equal(t["org.matrix.msc3202.device_lists"], undefined);
    }

    // The transaction with the to-device message fails once.
    let failedOnce = false;
    const flaky = await fakeAppservice((t) => {
      const messages = (t["de.sorunome.msc2409.to_device"] as unknown[] | undefined) ?? [];
      if (messages.length === 0 || failedOnce) return 200;
      failedOnce = true;
      return 500;
    });
    stops.push(flaky.close);
    const on = new TestHomeserver({
      registration: registration(flaky.url, { receive_ephemeral: true, "org.matrix.msc3202": true }),
      msc2409ToDevice: true,
      msc3202TransactionExtensions: true,
      retry: { initialDelayMs: 20 },
    });
    await on.start();
    stops.push(() => on.stop());
    const carol = on.registerUser("carol");
    const dave = await ghost(on, "mqtt_dave");
    await call(on, "PUT", `${C}/devices/DDEV`, { token: AS_TOKEN, query: { user_id: dave }, body: {} });
    await on.waitForPushIdle();
    await call(on, "PUT", `${C}/sendToDevice/m.test/t1`, {
      token: on.accessTokenFor(carol),
      body: { messages: { [dave]: { DDEV: { n: 1 } } } },
    });
    await on.waitForPushIdle();
    // Synapse's recoverer resends the stored transaction without its to-device messages: lost.
    const [first, retried] = flaky.transactions.slice(-2);
    assert.equal(first!._status, 500);
    assert.equal((first!["de.sorunome.msc2409.to_device"] as unknown[]).length, 1);
    assert.equal(retried!._status, 200);
    assert.deepEqual(retried!["de.sorunome.msc2409.to_device"], []);
    assert.equal(retried!["org.matrix.msc3202.device_one_time_keys_count"], undefined);
    // The message stays in the device's inbox for its /sync.
    const sync = await call(on, "GET", `${C}/sync`, {
      token: AS_TOKEN,
      query: { user_id: dave, device_id: "DDEV" },
    });
    assert.equal((sync.body.to_device as { events: unknown[] }).events.length, 1);
  });
});

describe("TestHomeserver E2EE: two Olm machines exchange Megolm messages through it", () => {
  it("Alice (a person, /sync) and an appservice ghost (MSC2409 transactions) share room keys and read each other", async () => {
    const as = await fakeAppservice();
    stops.push(as.close);
    const hs = new TestHomeserver({
      registration: registration(as.url, {
        receive_ephemeral: true,
        "org.matrix.msc3202": true,
        "io.element.msc4190": true,
      }),
      msc2409ToDevice: true,
      msc3202TransactionExtensions: true,
    });
    await hs.start();
    stops.push(() => hs.stop());

    // Requests as a device: its own token (Alice), or the as_token masquerading (the ghost), as MatrixClient does.
    const http = {
      async requestAs(who: string | DeviceAuth, method: string, path: string, body?: Json): Promise<Json> {
        const auth = typeof who === "string" ? { userId: who, deviceId: "" } : who;
        const query: Record<string, string> = {};
        if (!auth.accessToken && auth.userId !== BOT) query.user_id = auth.userId;
        if (!auth.accessToken && auth.deviceId) query["org.matrix.msc3202.device_id"] = auth.deviceId;
        const [p, q] = path.split("?");
        for (const [k, v] of new URLSearchParams(q ?? "")) query[k] = v;
        const res = await call(hs, method, p!, {
          token: auth.accessToken ?? AS_TOKEN,
          query,
          body: method === "GET" ? undefined : body,
        });
        if (res.status >= 300) throw new Error(`${method} ${p} → ${res.status} ${JSON.stringify(res.body)}`);
        return res.body;
      },
    };
    const noStore = { persist: async () => undefined };

    const alice = hs.registerUser("alice");
    const aliceToken = hs.accessTokenFor(alice);
    const aliceDeviceId = (await call(hs, "GET", `${C}/account/whoami`, { token: aliceToken })).body
      .device_id as string;
    const aliceAuth: DeviceAuth = { userId: alice, deviceId: aliceDeviceId, accessToken: aliceToken };
    const ghostId = await ghost(hs, "mqtt_ghost");
    await http.requestAs(ghostId, "PUT", `${C}/devices/GHOSTDEV`, { display_name: "tribridge" });
    const ghostAuth: DeviceAuth = { userId: ghostId, deviceId: "GHOSTDEV" };

    const aliceDevice = new OlmDevice(
      aliceAuth,
      await OlmMachine.initialize(new UserId(alice), new DeviceId(aliceDeviceId)),
      http,
      noStore,
    );
    const ghostDevice = new OlmDevice(
      ghostAuth,
      await OlmMachine.initialize(new UserId(ghostId), new DeviceId("GHOSTDEV")),
      http,
      noStore,
    );
    stops.push(async () => {
      aliceDevice.machine.close();
      ghostDevice.machine.close();
    });
    await aliceDevice.flush();
    await ghostDevice.flush();

    const room = hs.createRoom({ creator: alice, encrypted: true, invite: [ghostId] });
    hs.joinRoom(room, ghostId);
    const members = [alice, ghostId];

    const seal = (device: OlmDevice, roomId: string, content: Json, users: string[]): Promise<Json> =>
      device.encrypt(roomId, "m.room.message", content, users, { historyVisibility: "shared" });

    // Alice → ghost: the room key goes to-device, and reaches the ghost in a transaction.
    const sealed = await seal(aliceDevice, room, { msgtype: "m.text", body: "hello ghost" }, members);
    const sent = await call(hs, "PUT", `${C}/rooms/${encodeURIComponent(room)}/send/m.room.encrypted/a1`, {
      token: aliceToken,
      body: sealed,
    });
    await hs.waitForPushIdle();
    const data = as.transactions.map((t) => transactionDeviceData(t)).filter((d) => d !== undefined);
    const toGhost = data
      .flatMap((d) => d.toDevice)
      .filter((m) => m.to_user_id === ghostId && m.to_device_id === "GHOSTDEV");
    assert.ok(
      toGhost.some((m) => m.type === "m.room.encrypted"),
      "the room key reached the ghost's device in a transaction",
    );
    await ghostDevice.receive({ toDevice: toGhost, changed: data.flatMap((d) => d.changed) });
    const pushed = as.transactions
      .flatMap((t) => t.events as Json[])
      .find((e) => e.event_id === sent.body.event_id)!;
    const clear = await ghostDevice.decrypt(pushed, room);
    assert.deepEqual(clear, { type: "m.room.message", content: { msgtype: "m.text", body: "hello ghost" } });

    // Ghost → Alice: the ghost's room key reaches Alice's device through her /sync.
    const before = await syncOnce(http, aliceAuth, undefined, 0);
    const reply = await seal(ghostDevice, room, { msgtype: "m.text", body: "hello Alice" }, members);
    const replied = await http.requestAs(
      ghostAuth,
      "PUT",
      `${C}/rooms/${encodeURIComponent(room)}/send/m.room.encrypted/g1`,
      reply,
    );
    const { changes } = await syncOnce(http, aliceAuth, before.next, 1000);
    assert.ok(changes.toDevice!.length > 0);
    await aliceDevice.receive(changes);
    const event = await call(
      hs,
      "GET",
      `${C}/rooms/${encodeURIComponent(room)}/event/${encodeURIComponent(replied.event_id as string)}`,
      { token: aliceToken },
    );
    assert.deepEqual(await aliceDevice.decrypt(event.body, room), {
      type: "m.room.message",
      content: { msgtype: "m.text", body: "hello Alice" },
    });
  });
});
