/**
 * MatrixClient's own HTTP path (sends, uploads, downloads) against a scripted homeserver: how
 * each kind of answer maps to the queue's errors, identity assertion, a path prefix, and media
 * download with its fallback and size limit.
 */
import { after, before, beforeEach, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { PermanentError, RetryableError } from "../../src/errors.js";
import { pino } from "pino";
import { MatrixClient } from "../../src/matrix/matrix-client.js";
import {
  MatrixPermanentError,
  MatrixRetryableError,
  classifyMatrixError,
  relabel,
} from "../../src/matrix/matrix-error.js";
import type { Registration } from "../../src/matrix/registration.js";
import { freePort } from "../helpers/fixture.js";
import { TestHomeserver } from "../helpers/test-homeserver.js";

const BOT = "@tribridge:test.local";
const registration: Registration = {
  id: "tribridge",
  url: null,
  as_token: "as-token",
  hs_token: "hs-token",
  sender_localpart: "tribridge",
  rate_limited: false,
  namespaces: { users: [{ exclusive: true, regex: "^@_tb_.*:test\\.local$" }], aliases: [], rooms: [] },
};

type Handler = (req: IncomingMessage, res: ServerResponse, body: Buffer) => void;

function json(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { "content-type": "application/json" }).end(JSON.stringify(body));
}

/** What the clients log at warn and above. */
const logged: { level: number; msg: string }[] = [];
const log = pino({ level: "info" }, { write: (line: string) => void logged.push(JSON.parse(line)) });

describe("MatrixClient against a scripted homeserver", () => {
  let server: Server;
  let base: string;
  let handler: Handler;
  /** Scripted answers to /whoami, in order; then the bot. */
  const whoami: [number, unknown][] = [];
  const seen: { method: string; url: string; auth: string | undefined }[] = [];
  const joins: string[] = [];
  const clients: MatrixClient[] = [];

  /** A client of the scripted homeserver (started), or of `url` (not started). */
  async function client(prefix = "", url?: string): Promise<MatrixClient> {
    const c = new MatrixClient({
      homeserverUrl: url ?? `${base}${prefix}`,
      domain: "test.local",
      botUserId: BOT,
      botDisplayName: "Bridge",
      registration,
      log,
    });
    clients.push(c);
    if (url) return c;
    await c.start(new AbortController().signal);
    seen.length = 0;
    return c;
  }

  before(async () => {
    server = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on("data", (c: Buffer) => chunks.push(c));
      req.on("end", () => {
        const url = req.url!;
        // What the bridge library asks on start-up and for joins: always fine here.
        if (url.includes("/join/")) {
          joins.push(url);
          return json(res, 200, { room_id: "!room:test.local" });
        }
        if (url.includes("/versions")) return json(res, 200, { versions: ["v1.11"] });
        if (url.includes("/whoami")) {
          const [status, body] = whoami.shift() ?? [200, { user_id: BOT }];
          return json(res, status, body);
        }
        if (url.includes("/profile/")) return json(res, 200, { displayname: "Bridge" });
        if (url.includes("/register"))
          return json(res, 400, { errcode: "M_USER_IN_USE", error: "User ID already taken." });
        seen.push({ method: req.method!, url, auth: req.headers.authorization });
        handler(req, res, Buffer.concat(chunks));
      });
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
    base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });

  beforeEach(() => {
    seen.length = 0;
  });

  after(async () => {
    for (const c of clients) c.stop();
    await new Promise((r) => server.close(r));
  });

  const send = (c: MatrixClient) =>
    c.sendAs(
      { userId: BOT, displayName: "Bridge" },
      "!room:test.local",
      "m.room.message",
      { body: "hi" },
      "txn1",
    );

  test("a send is one PUT with our transaction id and the as_token; the event id comes back", async () => {
    handler = (_req, res) => json(res, 200, { event_id: "$e1" });
    assert.equal(await send(await client()), "$e1");
    const put = seen.find((s) => s.method === "PUT")!;
    assert.equal(put.url, "/_matrix/client/v3/rooms/!room%3Atest.local/send/m.room.message/txn1");
    assert.equal(put.auth, "Bearer as-token");
  });

  test("a homeserver under a path prefix is addressed under it", async () => {
    handler = (_req, res) => json(res, 200, { event_id: "$e2" });
    assert.equal(await send(await client("/matrix")), "$e2");
    assert.ok(seen.some((s) => s.method === "PUT" && s.url.startsWith("/matrix/_matrix/client/v3/rooms/")));
  });

  test("429 with retry_after_ms → RetryableError carrying it; 5xx → retryable; 4xx → permanent", async () => {
    const c = await client();
    handler = (_req, res) => json(res, 429, { errcode: "M_LIMIT_EXCEEDED", retry_after_ms: 1234 });
    const limited = await send(c).catch((e: unknown) => e);
    assert.ok(limited instanceof RetryableError);
    assert.equal(limited.retryAfterMs, 1234);

    handler = (_req, res) => res.writeHead(502, { "content-type": "text/html" }).end("<h1>Bad gateway</h1>");
    assert.ok((await send(c).catch((e: unknown) => e)) instanceof RetryableError);

    handler = (_req, res) => json(res, 400, { errcode: "M_BAD_JSON", error: "nope" });
    const bad = await send(c).catch((e: unknown) => e);
    assert.ok(bad instanceof PermanentError);
    assert.match(bad.message, /400 M_BAD_JSON nope/);
  });

  test("a refusal carries its status, errcode, words and what we were doing as fields", async () => {
    const c = await client();
    handler = (_req, res) => json(res, 429, { errcode: "M_LIMIT_EXCEEDED", retry_after_ms: 1234 });
    const limited = await send(c).catch((e: unknown) => e);
    assert.ok(limited instanceof MatrixRetryableError);
    assert.equal(limited.permanent, false);
    assert.equal(limited.status, 429);
    assert.equal(limited.errcode, "M_LIMIT_EXCEEDED");
    assert.equal(limited.retryAfterMs, 1234);
    assert.equal(limited.what, "PUT /_matrix/client/v3/rooms/!room%3Atest.local/send/m.room.message/txn1");

    handler = (_req, res) => json(res, 403, { errcode: "M_FORBIDDEN", error: "power levels" });
    const refused = await send(c).catch((e: unknown) => e);
    assert.ok(refused instanceof MatrixPermanentError);
    assert.deepEqual([refused.permanent, refused.status, refused.errcode], [true, 403, "M_FORBIDDEN"]);
    assert.equal(refused.error, "power levels");

    handler = (_req, res) => res.writeHead(503, { "content-type": "text/html" }).end("<h1>down</h1>");
    const down = await send(c).catch((e: unknown) => e);
    assert.ok(down instanceof MatrixRetryableError);
    assert.deepEqual([down.status, down.errcode, down.retryAfterMs], [503, undefined, undefined]);
  });

  test("decisions read the fields, not the text: a refusal whose words name another errcode is not it", async () => {
    const c = await client();
    // Sending is retried once after a rejoin only for M_FORBIDDEN (kicked since the join was cached).
    handler = (_req, res) => json(res, 400, { errcode: "M_BAD_JSON", error: "this is not M_FORBIDDEN" });
    assert.ok((await send(c).catch((e: unknown) => e)) instanceof MatrixPermanentError);
    assert.equal(seen.filter((s) => s.method === "PUT").length, 1, "not retried");
    // Answered for real, the same send rejoins and tries once more.
    handler = (_req, res) => json(res, 403, { errcode: "M_FORBIDDEN", error: "not in room" });
    seen.length = 0;
    assert.ok((await send(c).catch((e: unknown) => e)) instanceof MatrixPermanentError);
    assert.equal(seen.filter((s) => s.method === "PUT").length, 2, "rejoined and sent once more");

    // An alias lookup that fails other than with 404 is not taken for a missing room.
    handler = (_req, res) => json(res, 403, { errcode: "M_FORBIDDEN", error: "GET x: 404 " });
    const lookup = await c.resolveOrCreateRoom("#mine:test.local", []).catch((e: unknown) => e);
    assert.ok(lookup instanceof MatrixPermanentError);
    assert.equal(lookup.status, 403);
    assert.match(lookup.what, /^resolving #mine:test.local: GET \/_matrix\/client\/v3\/directory\/room\//);
  });

  test("429 with only a Retry-After header (Matrix 1.10, or a proxy) → RetryableError carrying it", async () => {
    handler = (_req, res) => res.writeHead(429, { "retry-after": "3" }).end("slow down");
    const limited = await send(await client()).catch((e: unknown) => e);
    assert.ok(limited instanceof RetryableError);
    assert.equal(limited.retryAfterMs, 3000);
  });

  test("a room on another server is joined with the servers its alias lookup named (via)", async () => {
    handler = (_req, res) =>
      json(res, 200, { room_id: "!far:other.org", servers: ["other.org", "third.org"] });
    const c = await client();
    assert.equal(await c.resolveRoom("#far:other.org"), "!far:other.org");
    joins.length = 0;
    await c.joinBot("!far:other.org");
    assert.deepEqual(joins, [
      "/_matrix/client/v3/join/!far%3Aother.org?via=other.org&server_name=other.org&via=third.org&server_name=third.org",
    ]);
  });

  test("a 200 without JSON is retried, not taken for success", async () => {
    handler = (_req, res) => res.writeHead(200, { "content-type": "text/plain" }).end("ok");
    const err = await send(await client()).catch((e: unknown) => e);
    assert.ok(err instanceof RetryableError);
    assert.match(err.message, /unreadable response/);
  });

  test("an unreachable homeserver is a RetryableError", async () => {
    const c = await client("", `http://127.0.0.1:${await freePort()}`);
    const err = await c.download("mxc://test.local/abc", 100).catch((e: unknown) => e);
    assert.ok(err instanceof RetryableError, String(err));
  });

  test("download uses authenticated media (Matrix 1.11) with the as_token", async () => {
    handler = (req, res) => {
      if (req.url === "/_matrix/client/v1/media/download/test.local/abc")
        return res.writeHead(200, { "content-type": "image/png" }).end(Buffer.from([1, 2, 3]));
      json(res, 404, { errcode: "M_NOT_FOUND" });
    };
    const { data, mimeType } = await (await client()).download("mxc://test.local/abc", 100);
    assert.deepEqual([...data], [1, 2, 3]);
    assert.equal(mimeType, "image/png");
    assert.equal(seen[0]!.auth, "Bearer as-token");
  });

  test("download falls back to /_matrix/media/v3 on a homeserver without authenticated media", async () => {
    handler = (req, res) => {
      if (req.url!.startsWith("/_matrix/client/v1/"))
        return json(res, 404, { errcode: "M_UNRECOGNIZED", error: "Unrecognized request" });
      res.writeHead(200, { "content-type": "text/plain" }).end("old server");
    };
    const { data } = await (await client()).download("mxc://test.local/abc", 100);
    assert.equal(data.toString(), "old server");
    assert.deepEqual(
      seen.map((s) => s.url),
      ["/_matrix/client/v1/media/download/test.local/abc", "/_matrix/media/v3/download/test.local/abc"],
    );
  });

  test("download: missing media is permanent; a body over the limit fails permanently, declared or not", async () => {
    const c = await client();
    handler = (_req, res) => json(res, 404, { errcode: "M_NOT_FOUND", error: "Not found" });
    assert.ok(
      (await c.download("mxc://test.local/gone", 100).catch((e: unknown) => e)) instanceof PermanentError,
    );

    handler = (_req, res) => res.writeHead(200, { "content-length": "101" }).end(Buffer.alloc(101));
    const declared = await c.download("mxc://test.local/big", 100).catch((e: unknown) => e);
    assert.ok(declared instanceof PermanentError);
    assert.match(declared.message, /larger than 100 bytes/);

    handler = (_req, res) => {
      res.writeHead(200, { "transfer-encoding": "chunked" });
      res.write(Buffer.alloc(60));
      res.end(Buffer.alloc(60));
    };
    const streamed = await c.download("mxc://test.local/big2", 100).catch((e: unknown) => e);
    assert.ok(streamed instanceof PermanentError);

    assert.ok(
      (await c.download("https://evil.example/x", 100).catch((e: unknown) => e)) instanceof PermanentError,
    );
  });

  test("start waits until the homeserver accepts the as_token, and says that is what it waits for", async () => {
    logged.length = 0;
    whoami.push([401, { errcode: "M_UNKNOWN_TOKEN", error: "Unknown token" }]);
    whoami.push([200, { user_id: "@someone-else:test.local" }]);
    const started = Date.now();
    await client();
    // Steps of 1 s, then 2 s, each jittered within its upper half.
    assert.ok(Date.now() - started >= 1_500, "two back-offs (1 s, then 2 s)");
    const warnings = logged.filter((l) => l.level === 40).map((l) => l.msg);
    assert.match(warnings[0]!, /does not accept this appservice's as_token.*registration-help/);
    assert.match(warnings[1]!, /refused the bridge's first request/);
    assert.equal(whoami.length, 0);
  });

  test("ping: reachable, not reachable (with the homeserver's reason), or not supported", async () => {
    const c = await client();
    const pinged: string[] = [];
    const answer = (status: number, body: unknown) => {
      handler = (req, res, raw) => {
        pinged.push(`${req.method} ${req.url} ${raw.toString()}`);
        json(res, status, body);
      };
    };
    answer(200, { duration_ms: 7 });
    assert.deepEqual(await c.ping(), { reachable: true, durationMs: 7 });
    assert.match(
      pinged[0]!,
      /^POST \/_matrix\/client\/v1\/appservice\/tribridge\/ping \{"transaction_id":"tribridge-\d+"\}$/,
    );

    answer(502, { errcode: "M_CONNECTION_FAILED", error: "Failed to connect to application service" });
    assert.deepEqual(await c.ping(), {
      reachable: false,
      detail: "502 M_CONNECTION_FAILED Failed to connect to application service",
    });
    answer(400, { errcode: "M_URL_NOT_SET", error: "Application service URL is not set" });
    assert.equal((await c.ping()).reachable, false);

    answer(404, { errcode: "M_UNRECOGNIZED", error: "Unrecognized request" });
    assert.equal((await c.ping()).reachable, undefined);
    // Synapse before 1.84 answers an unknown endpoint 400 M_UNRECOGNIZED.
    answer(400, { errcode: "M_UNRECOGNIZED", error: "Unrecognized request" });
    assert.equal((await c.ping()).reachable, undefined);
    answer(405, { errcode: "M_UNRECOGNIZED", error: "Unrecognized request" });
    assert.equal((await c.ping()).reachable, undefined);
    handler = (_req, res) => res.writeHead(404).end();
    assert.equal((await c.ping()).reachable, undefined);

    logged.length = 0;
    answer(504, { errcode: "M_CONNECTION_TIMEOUT", error: "timed out" });
    await c.reportReachability();
    assert.equal(logged[0]!.level, 50);
    assert.match(logged[0]!.msg, /cannot reach tribridge at null.*Check `url` in registration.yaml/);
  });
});

describe("Matrix errors, typed", () => {
  test("classified as the queue needs: PermanentError or RetryableError, with the fields kept", () => {
    const cases: [number, string | undefined, boolean][] = [
      [400, "M_BAD_JSON", true],
      [403, "M_FORBIDDEN", true],
      [404, "M_NOT_FOUND", true],
      [408, undefined, false],
      [429, "M_LIMIT_EXCEEDED", false],
      [400, "M_LIMIT_EXCEEDED", false],
      [500, "M_UNKNOWN", false],
      [502, undefined, false],
    ];
    for (const [status, errcode, permanent] of cases) {
      const err = classifyMatrixError(status, { errcode, error: "words", retry_after_ms: 5 }, "GET /x");
      assert.equal(err instanceof PermanentError, permanent, `${status} ${errcode}`);
      assert.equal(err instanceof RetryableError, !permanent, `${status} ${errcode}`);
      assert.equal(err.permanent, permanent);
      assert.deepEqual([err.status, err.errcode, err.error, err.what], [status, errcode, "words", "GET /x"]);
      assert.equal(err.message, `GET /x: ${status} ${errcode ?? ""} words`);
    }
    const limited = classifyMatrixError(429, { retry_after_ms: 700 }, "PUT /y");
    assert.ok(limited instanceof RetryableError);
    assert.equal(limited.retryAfterMs, 700, "the queue reads retryAfterMs from RetryableError");
  });

  test("relabel leads the message with what we did and keeps class and fields", () => {
    const err = classifyMatrixError(404, { errcode: "M_NOT_FOUND", error: "no" }, "GET /d");
    const relabelled = relabel(err, "resolving #a:b");
    assert.ok(relabelled instanceof MatrixPermanentError);
    assert.equal(relabelled.message, "resolving #a:b: GET /d: 404 M_NOT_FOUND no");
    assert.deepEqual([relabelled.status, relabelled.errcode], [404, "M_NOT_FOUND"]);
    const retry = relabel(classifyMatrixError(429, { retry_after_ms: 9 }, "GET /d"), "x");
    assert.ok(retry instanceof MatrixRetryableError);
    assert.equal(retry.retryAfterMs, 9);
    const plain = relabel(new RetryableError("socket closed", 3), "x");
    assert.ok(plain instanceof RetryableError);
    assert.deepEqual([plain.message, plain.retryAfterMs], ["x: socket closed", 3]);
  });
});

/** MatrixClient against the test homeserver, which behaves as Synapse does where these tests look. */
describe("MatrixClient against the test homeserver", () => {
  const asRegistration: Registration = { ...registration, url: "http://127.0.0.1:9" };

  async function withClient(
    opts: { appservicePing?: "supported" | "absent" },
    fn: (c: MatrixClient, hs: TestHomeserver) => Promise<void>,
  ): Promise<void> {
    const hs = new TestHomeserver({ registration: asRegistration, ...opts });
    const { url } = await hs.start();
    const c = new MatrixClient({
      homeserverUrl: url,
      domain: "test.local",
      botUserId: BOT,
      botDisplayName: "Bridge",
      registration: asRegistration,
      log,
    });
    try {
      await fn(c, hs);
    } finally {
      c.stop();
      await hs.stop();
    }
  }

  test("start registers the bot (m.login.application_service, inhibit_login) and sets its display name", async () => {
    await withClient({}, async (c, hs) => {
      // Synapse: the appservice's own user acts without being registered, but has no profile.
      assert.equal(hs.profile(BOT), undefined);
      await c.start(new AbortController().signal);
      assert.equal(hs.isRegistered(BOT), true, "the bot is registered");
      assert.equal(hs.profile(BOT)?.displayname, "Bridge");
      const register = hs.requests.filter((r) => r.path === "/_matrix/client/v3/register");
      assert.deepEqual(
        register.map((r) => r.status),
        [200],
      );
    });
  });

  test("a bot registered before (M_USER_IN_USE) is fine: its display name is set all the same", async () => {
    await withClient({}, async (c, hs) => {
      const earlier = new MatrixClient({
        homeserverUrl: hs.url,
        domain: "test.local",
        botUserId: BOT,
        botDisplayName: "Old name",
        registration: asRegistration,
        log,
      });
      await earlier.start(new AbortController().signal);
      earlier.stop();
      assert.equal(hs.profile(BOT)?.displayname, "Old name");
      logged.length = 0;
      await c.start(new AbortController().signal);
      assert.equal(hs.profile(BOT)?.displayname, "Bridge");
      assert.deepEqual(
        hs.requests.filter((r) => r.path === "/_matrix/client/v3/register").map((r) => r.status),
        [200, 400],
      );
      assert.deepEqual(
        logged.filter((l) => l.level >= 40),
        [],
      );
    });
  });

  test("a homeserver without the ping endpoint (Synapse before 1.84: 400 M_UNRECOGNIZED) is not reported unreachable", async () => {
    await withClient({ appservicePing: "absent" }, async (c) => {
      const result = await c.ping();
      assert.equal(result.reachable, undefined, JSON.stringify(result));
      logged.length = 0;
      await c.reportReachability();
      assert.deepEqual(
        logged.filter((l) => l.level >= 40).map((l) => l.msg),
        [],
        "no error: events may well arrive",
      );
      assert.match(logged[0]!.msg, /no appservice ping/);
    });
  });

  test("a homeserver with the ping endpoint that cannot reach the bridge is reported, as an error", async () => {
    await withClient({}, async (c) => {
      logged.length = 0;
      await c.reportReachability();
      assert.equal(logged[0]!.level, 50);
      assert.match(logged[0]!.msg, /cannot reach tribridge at http:\/\/127\.0\.0\.1:9/);
    });
  });
});
