/**
 * AppserviceServer over real HTTP on 127.0.0.1 with in-memory handlers: hs_token checks, the
 * transaction path (v1 and legacy), replies only once events are enqueued, dedupe by fingerprint,
 * body validation, user queries, ping, and transactions handled one at a time in arrival order.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { request as httpRequest } from "node:http";
import { setTimeout as sleep } from "node:timers/promises";
import { pino } from "pino";
import { moduleLogger, type Logger } from "../../src/log.js";
import {
  AppserviceServer,
  type AppserviceHandlers,
  type MatrixEvent,
  type TransactionOutcome,
} from "../../src/matrix/appservice-server.js";

const HS_TOKEN = "hs-secret-token";
const log = moduleLogger("appservice-server-test");
log.level = "silent";

class MemoryHandlers implements AppserviceHandlers {
  readonly seen = new Set<string>();
  readonly seenCalls: string[] = [];
  readonly marks: string[] = [];
  readonly batches: MatrixEvent[][] = [];
  readonly userQueries: string[] = [];
  readonly users = new Set<string>();
  /** Runs inside onEvents after the call is recorded; may block or throw. */
  hook: ((events: MatrixEvent[]) => Promise<void>) | undefined;
  /** "start"/"end" per onEvents call, to check calls never overlap. */
  readonly timeline: string[] = [];

  get touched(): boolean {
    return this.seenCalls.length + this.marks.length + this.batches.length + this.userQueries.length > 0;
  }
  async seenTransaction(fingerprint: string): Promise<boolean> {
    this.seenCalls.push(fingerprint);
    return this.seen.has(fingerprint);
  }
  async markTransaction(fingerprint: string): Promise<void> {
    this.marks.push(fingerprint);
    this.seen.add(fingerprint);
  }
  async onEvents(events: MatrixEvent[]): Promise<void> {
    const label = events.map((e) => e.event_id).join(",");
    this.timeline.push(`start ${label}`);
    this.batches.push(events);
    try {
      await this.hook?.(events);
    } finally {
      this.timeline.push(`end ${label}`);
    }
  }
  ignores(ev: MatrixEvent): boolean {
    return ev.sender.startsWith("@_tb_");
  }
  userExists(userId: string): boolean {
    this.userQueries.push(userId);
    return this.users.has(userId);
  }
  readonly outcomes: TransactionOutcome[] = [];
  observe(outcome: TransactionOutcome): void {
    this.outcomes.push(outcome);
  }
}

function deferred(): { promise: Promise<void>; resolve: () => void; reject: (err: Error) => void } {
  let resolve!: () => void;
  let reject!: (err: Error) => void;
  const promise = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

function event(id: string, body = "hi"): MatrixEvent {
  return {
    event_id: id,
    room_id: "!room:test.local",
    sender: "@alice:test.local",
    type: "m.room.message",
    content: { msgtype: "m.text", body },
    origin_server_ts: 1,
  };
}

interface Reply {
  status: number;
  body: unknown;
}

async function withServer(
  fn: (srv: Client, h: MemoryHandlers) => Promise<void>,
  logger: Logger = log,
): Promise<void> {
  const handlers = new MemoryHandlers();
  const server = new AppserviceServer(HS_TOKEN, handlers, logger);
  await server.listen(0, "127.0.0.1");
  try {
    await fn(new Client(`http://127.0.0.1:${server.port}`), handlers);
  } finally {
    await server.close();
  }
}

class Client {
  constructor(readonly base: string) {}

  async request(
    method: string,
    path: string,
    opts: {
      token?: string | null;
      query?: string;
      body?: string | object;
      headers?: Record<string, string>;
    } = {},
  ): Promise<Reply> {
    const headers: Record<string, string> = { ...opts.headers };
    const token = opts.token === undefined ? HS_TOKEN : opts.token;
    if (token !== null) headers.authorization = `Bearer ${token}`;
    let body: string | undefined;
    if (opts.body !== undefined) {
      body = typeof opts.body === "string" ? opts.body : JSON.stringify(opts.body);
      headers["content-type"] = "application/json";
    }
    const res = await fetch(`${this.base}${path}${opts.query ?? ""}`, { method, headers, body });
    const text = await res.text();
    let parsed: unknown = text;
    try {
      parsed = JSON.parse(text);
    } catch {
      // keep the text
    }
    return { status: res.status, body: parsed };
  }

  txn(
    txnId: string,
    events: unknown[],
    opts: { legacy?: boolean; token?: string | null; query?: string } = {},
  ) {
    const path = `${opts.legacy ? "" : "/_matrix/app/v1"}/transactions/${encodeURIComponent(txnId)}`;
    return this.request("PUT", path, { token: opts.token, query: opts.query, body: { events } });
  }
}

const errcode = (r: Reply) => (r.body as { errcode?: string }).errcode;

// --- auth -------------------------------------------------------------------------------------------

test("/live and /health answer 200 without a token", async () => {
  await withServer(async (c, h) => {
    for (const path of ["/live", "/health"]) {
      const r = await c.request("GET", path, { token: null });
      assert.equal(r.status, 200);
      assert.deepEqual(r.body, { status: "ok" });
    }
    assert.equal(h.touched, false);
  });
});

test("no token → 401 M_UNAUTHORIZED on every endpoint, handlers untouched", async () => {
  await withServer(async (c, h) => {
    h.users.add("@bridge_a:test.local");
    for (const [method, path] of [
      ["PUT", "/_matrix/app/v1/transactions/1"],
      ["PUT", "/transactions/1"],
      ["GET", "/_matrix/app/v1/users/%40bridge_a%3Atest.local"],
      ["GET", "/users/%40bridge_a%3Atest.local"],
      ["GET", "/_matrix/app/v1/rooms/%23a%3Atest.local"],
      ["POST", "/_matrix/app/v1/ping"],
    ] as const) {
      const r = await c.request(method, path, {
        token: null,
        body: method === "GET" ? undefined : { events: [event("$e")] },
      });
      assert.equal(r.status, 401, `${method} ${path}`);
      assert.equal(errcode(r), "M_UNAUTHORIZED", `${method} ${path}`);
    }
    // An Authorization header that is not Bearer counts as no token.
    const basic = await c.request("PUT", "/_matrix/app/v1/transactions/1", {
      token: null,
      headers: { authorization: `Basic ${Buffer.from(`as:${HS_TOKEN}`).toString("base64")}` },
      body: { events: [] },
    });
    assert.equal(basic.status, 401);
    assert.equal(h.touched, false);
  });
});

test("wrong token → 403 M_FORBIDDEN, in the header or ?access_token=, handlers untouched", async () => {
  await withServer(async (c, h) => {
    h.users.add("@bridge_a:test.local");
    const viaHeader = await c.txn("1", [event("$e")], { token: "nope" });
    assert.equal(viaHeader.status, 403);
    assert.equal(errcode(viaHeader), "M_FORBIDDEN");
    const viaQuery = await c.txn("1", [event("$e")], { token: null, query: "?access_token=nope" });
    assert.equal(viaQuery.status, 403);
    assert.equal(errcode(viaQuery), "M_FORBIDDEN");
    const user = await c.request("GET", "/_matrix/app/v1/users/%40bridge_a%3Atest.local", { token: "nope" });
    assert.equal(user.status, 403);
    const empty = await c.txn("1", [event("$e")], { token: null, query: "?access_token=" });
    assert.equal(empty.status, 403);
    // A token that merely starts like the right one is still wrong.
    const prefix = await c.txn("1", [event("$e")], { token: HS_TOKEN.slice(0, -1) });
    assert.equal(prefix.status, 403);
    assert.equal(h.touched, false);
  });
});

test("the right token is accepted in the Authorization header and in ?access_token=", async () => {
  await withServer(async (c, h) => {
    const viaHeader = await c.txn("t1", [event("$1")]);
    assert.equal(viaHeader.status, 200);
    assert.deepEqual(viaHeader.body, {});
    const viaQuery = await c.txn("t2", [event("$2")], {
      token: null,
      query: `?access_token=${encodeURIComponent(HS_TOKEN)}`,
    });
    assert.equal(viaQuery.status, 200);
    assert.deepEqual(
      h.batches.map((b) => b.map((e) => e.event_id)),
      [["$1"], ["$2"]],
    );
    assert.equal(h.marks.length, 2);
  });
});

// --- transactions -----------------------------------------------------------------------------------

test("transactions are served on the v1 path and the legacy unprefixed path", async () => {
  await withServer(async (c, h) => {
    const v1 = await c.txn("v1-txn", [event("$v1")]);
    const legacy = await c.txn("legacy-txn", [event("$legacy")], { legacy: true });
    assert.equal(v1.status, 200);
    assert.equal(legacy.status, 200);
    assert.deepEqual(
      h.batches.map((b) => b[0]!.event_id),
      ["$v1", "$legacy"],
    );
    assert.deepEqual(h.batches[0], [event("$v1")]);
  });
});

test("the reply is sent only after onEvents resolves, and the transaction is marked after that", async () => {
  await withServer(async (c, h) => {
    const gate = deferred();
    h.hook = () => gate.promise;
    let settled = false;
    const reply = c.txn("slow", [event("$slow")]).finally(() => (settled = true));
    while (h.batches.length === 0) await sleep(5);
    await sleep(150);
    assert.equal(settled, false, "replied before the events were enqueued");
    assert.deepEqual(h.marks, []);
    gate.resolve();
    const r = await reply;
    assert.equal(r.status, 200);
    assert.equal(h.marks.length, 1);
  });
});

test("onEvents rejecting → 500 and the transaction is not marked, so the homeserver's retry is processed", async () => {
  await withServer(async (c, h) => {
    h.hook = async () => {
      throw new Error("redis is down");
    };
    const failed = await c.txn("7", [event("$7")]);
    assert.equal(failed.status, 500);
    assert.equal(errcode(failed), "M_UNKNOWN");
    assert.deepEqual(h.marks, []);
    h.hook = undefined;
    const retried = await c.txn("7", [event("$7")]);
    assert.equal(retried.status, 200);
    assert.equal(h.batches.length, 2);
    assert.equal(h.marks.length, 1);
    // A failed transaction does not wedge the ones after it.
    const next = await c.txn("8", [event("$8")]);
    assert.equal(next.status, 200);
  });
});

test("the same txnId with the same body again is answered 200 without calling onEvents", async () => {
  await withServer(async (c, h) => {
    const first = await c.txn("42", [event("$a"), event("$b")]);
    const again = await c.txn("42", [event("$a"), event("$b")]);
    // The legacy path carries the same transaction.
    const legacy = await c.txn("42", [event("$a"), event("$b")], { legacy: true });
    assert.deepEqual([first.status, again.status, legacy.status], [200, 200, 200]);
    assert.deepEqual(again.body, {});
    assert.equal(h.batches.length, 1);
    assert.equal(h.seenCalls.length, 3);
    assert.equal(new Set(h.seenCalls).size, 1, "same txnId and body → same fingerprint");
    assert.equal(h.marks.length, 1);
  });
});

test("the same txnId with a different body is processed (Synapse restarts its counter)", async () => {
  await withServer(async (c, h) => {
    await c.txn("1", [event("$before-restart")]);
    const r = await c.txn("1", [event("$after-restart")]);
    assert.equal(r.status, 200);
    assert.deepEqual(
      h.batches.map((b) => b[0]!.event_id),
      ["$before-restart", "$after-restart"],
    );
    assert.equal(new Set(h.marks).size, 2);
  });
});

test("a different txnId with the same body is processed", async () => {
  await withServer(async (c, h) => {
    await c.txn("1", [event("$x")]);
    await c.txn("2", [event("$x")]);
    assert.equal(h.batches.length, 2);
  });
});

test("malformed JSON → 400 M_NOT_JSON; events not an array → 400 M_BAD_JSON; handlers untouched", async () => {
  await withServer(async (c, h) => {
    const path = "/_matrix/app/v1/transactions/bad";
    const notJson = await c.request("PUT", path, { body: "{not json" });
    assert.equal(notJson.status, 400);
    assert.equal(errcode(notJson), "M_NOT_JSON");
    const emptyBody = await c.request("PUT", path, { body: "" });
    assert.equal(emptyBody.status, 400);
    assert.equal(errcode(emptyBody), "M_NOT_JSON");
    for (const body of [{ events: {} }, { events: "x" }, {}, [], "events"]) {
      const r = await c.request("PUT", path, { body: JSON.stringify(body) });
      assert.equal(r.status, 400, JSON.stringify(body));
      assert.equal(errcode(r), "M_BAD_JSON", JSON.stringify(body));
    }
    assert.equal(h.touched, false);
  });
});

test("each transaction's outcome is reported (for metrics); other requests report none", async () => {
  await withServer(async (c, h) => {
    await c.txn("1", [event("$a")]);
    await c.txn("1", [event("$a")]);
    await c.txn("2", [{ ...event("$echo"), sender: "@_tb_mqtt_dev:test.local" }]);
    await c.request("PUT", "/_matrix/app/v1/transactions/3", { body: "{not json" });
    await c.txn("4", [event("$b")], { token: null });
    await c.txn("5", [event("$b")], { token: "wrong" });
    await c.request("POST", "/_matrix/app/v1/ping", { body: {} });
    await c.request("GET", "/_matrix/app/v1/users/%40x%3Atest.local", { token: "wrong" });
    assert.deepEqual(h.outcomes, ["relayed", "duplicate", "echo", "malformed", "unauthorized", "forbidden"]);
  });
});

test("a JSON null body → 400 M_BAD_JSON", async () => {
  await withServer(async (c) => {
    const r = await c.request("PUT", "/_matrix/app/v1/transactions/null", { body: "null" });
    assert.equal(r.status, 400);
    assert.equal(errcode(r), "M_BAD_JSON");
  });
});

test("a malformed percent-encoding in the txnId → 400, not 500", async () => {
  await withServer(async (c) => {
    const r = await c.request("PUT", "/_matrix/app/v1/transactions/%E0%A4%A", { body: { events: [] } });
    assert.equal(r.status, 400);
  });
});

test("a body over the limit gets 413 M_TOO_LARGE before the connection closes (declared or chunked)", async () => {
  await withServer(async (c, h) => {
    const port = Number(new URL(c.base).port);
    const big = Buffer.alloc(40 * 1024 * 1024, 0x20); // the limit is 32 MiB
    for (const declared of [true, false]) {
      const answer = await new Promise<{ status: number; body: string; connection?: string }>(
        (resolve, reject) => {
          const req = httpRequest(
            {
              host: "127.0.0.1",
              port,
              method: "PUT",
              path: "/_matrix/app/v1/transactions/big",
              headers: {
                authorization: `Bearer ${HS_TOKEN}`,
                "content-type": "application/json",
                ...(declared ? { "content-length": big.length } : {}),
              },
            },
            (res) => {
              const chunks: Buffer[] = [];
              res.on("data", (d: Buffer) => chunks.push(d));
              res.on("end", () =>
                resolve({
                  status: res.statusCode!,
                  body: Buffer.concat(chunks).toString(),
                  connection: res.headers.connection,
                }),
              );
            },
          );
          req.on("error", reject); // a reset: what the homeserver saw before
          // Written in pieces, as a homeserver's client does: the answer may come while it writes.
          let at = 0;
          const writeMore = () => {
            while (at < big.length) {
              const ok = req.write(big.subarray(at, at + 65536));
              at += 65536;
              if (!ok) return void req.once("drain", writeMore);
            }
            req.end();
          };
          writeMore();
        },
      );
      assert.equal(answer.status, 413, `declared: ${declared}`);
      assert.equal(JSON.parse(answer.body).errcode, "M_TOO_LARGE");
      assert.equal(answer.connection, "close");
    }
    assert.equal(h.touched, false);
    // The server still answers.
    assert.equal((await c.txn("after", [event("$after")])).status, 200);
  });
});

test("events whose fields have the wrong type or an invalid sender are refused; logged at a bounded rate", async () => {
  const lines: { msg: string }[] = [];
  const logger = pino({ level: "info" }, { write: (l: string) => void lines.push(JSON.parse(l)) });
  await withServer(async (c, h) => {
    const refused = [
      { ...event("$array-content"), content: ["a"] },
      { ...event("$state-key"), type: "m.room.member", state_key: 5, content: { membership: "join" } },
      { ...event("$empty-sender"), sender: "" },
      { ...event("$no-at"), sender: "alice:test.local" },
      { ...event("$no-server"), sender: "@alice" },
      { ...event("$empty-localpart"), sender: "@:test.local" },
      { ...event("$space"), sender: "@al ice:test.local" },
      { ...event("$bad-server"), sender: "@alice:test_local!" },
      { ...event("$too-long"), sender: `@${"a".repeat(250)}:test.local` },
      { ...event("$room"), room_id: "not-a-room" },
      { ...event("$empty-id"), event_id: "" },
      { ...event("$empty-type"), type: "" },
      { ...event("$ts"), origin_server_ts: "yesterday" },
    ];
    const accepted = [
      event("$ok"),
      // Historical user ids (Appendix §Historical User IDs): any printable ASCII but ':'.
      { ...event("$historical"), sender: "@Alice_Old!:test.local" },
      { ...event("$ip"), sender: "@alice:[::1]:8448" },
      { ...event("$port"), sender: "@alice:127.0.0.1:8448" },
      // Room version 12: a room id without a server name.
      { ...event("$v12"), room_id: "!31hneApxJ_1o-63DmFrpeqnkFfWppnzWso1JvH3ogLM" },
    ];
    const warnings = () => lines.filter((l) => /refused/.test(l.msg)).length;
    let first = 0;
    for (let i = 0; i < 50; i++) {
      const r = await c.txn(`t${i}`, [...refused, ...accepted]);
      assert.equal(r.status, 200);
      if (i === 0) first = warnings();
    }
    assert.deepEqual(
      h.batches[0]!.map((e) => e.event_id),
      ["$ok", "$historical", "$ip", "$port", "$v12"],
    );
    assert.ok(first >= 1, "refusals are logged");
    assert.ok(first <= refused.length, "a line per kind of problem at most");
    assert.equal(warnings(), first, "at a bounded rate: not a line per transaction");
  }, logger);
});

test("malformed events are dropped; the well-formed ones are delivered in order", async () => {
  await withServer(async (c, h) => {
    const { content: _content, ...noContent } = event("$no-content");
    const r = await c.txn("mixed", [
      event("$1"),
      null,
      "not an event",
      42,
      noContent,
      { ...event("$null-content"), content: null },
      { ...event("$numeric-id"), event_id: 5 },
      { ...event("$no-room"), room_id: undefined },
      { ...event("$no-sender"), sender: ["@a:b"] },
      { ...event("$no-type"), type: undefined },
      event("$2"),
      { ...event("$state"), type: "m.room.member", state_key: "@bob:test.local", content: {} },
    ]);
    assert.equal(r.status, 200);
    assert.equal(h.batches.length, 1);
    assert.deepEqual(
      h.batches[0]!.map((e) => e.event_id),
      ["$1", "$2", "$state"],
    );
    assert.equal(h.marks.length, 1);
  });
});

test("an empty events array is acknowledged with no bookkeeping", async () => {
  await withServer(async (c, h) => {
    const r = await c.txn("empty", []);
    assert.equal(r.status, 200);
    assert.equal(h.touched, false);
  });
});

test("a transaction of only ignored events (our echoes) is acknowledged untouched; a mixed one is processed whole", async () => {
  await withServer(async (c, h) => {
    const echo = { ...event("$echo"), sender: "@_tb_mqtt_home_dev:test.local" };
    const r = await c.txn("echo-only", [echo, echo]);
    assert.equal(r.status, 200);
    assert.equal(h.touched, false);

    const mixed = await c.txn("mixed", [echo, event("$real")]);
    assert.equal(mixed.status, 200);
    assert.deepEqual(
      h.batches.map((b) => b.map((e) => e.event_id)),
      [["$echo", "$real"]],
    );
    assert.equal(h.marks.length, 1);
  });
});

test("GET (or POST) on a transaction path → 405; the token is still checked first", async () => {
  await withServer(async (c, h) => {
    for (const method of ["GET", "POST", "DELETE"]) {
      const r = await c.request(method, "/_matrix/app/v1/transactions/1");
      assert.equal(r.status, 405, method);
      assert.equal(errcode(r), "M_UNRECOGNIZED");
    }
    const legacy = await c.request("GET", "/transactions/1");
    assert.equal(legacy.status, 405);
    const noToken = await c.request("GET", "/_matrix/app/v1/transactions/1", { token: null });
    assert.equal(noToken.status, 401);
    assert.equal(h.touched, false);
  });
});

test("an unknown path → 404 M_UNRECOGNIZED, with or without a token", async () => {
  await withServer(async (c, h) => {
    for (const path of ["/", "/_matrix/app/v2/transactions/1", "/_matrix/app/v1/transactions/", "/nope"]) {
      for (const token of [HS_TOKEN, null]) {
        const r = await c.request("GET", path, { token });
        assert.equal(r.status, 404, `${path} ${token}`);
        assert.equal(errcode(r), "M_UNRECOGNIZED");
      }
    }
    assert.equal(h.touched, false);
  });
});

// --- other endpoints --------------------------------------------------------------------------------

test("POST /_matrix/app/v1/ping → 200 {}; GET → 405", async () => {
  await withServer(async (c, h) => {
    const r = await c.request("POST", "/_matrix/app/v1/ping", { body: { transaction_id: "abc" } });
    assert.equal(r.status, 200);
    assert.deepEqual(r.body, {});
    const get = await c.request("GET", "/_matrix/app/v1/ping");
    assert.equal(get.status, 405);
    assert.equal(h.touched, false);
  });
});

test("GET /users/{userId} → 200 when userExists, else 404 M_NOT_FOUND (v1 and legacy)", async () => {
  await withServer(async (c, h) => {
    h.users.add("@bridge_dev1:test.local");
    const known = await c.request(
      "GET",
      `/_matrix/app/v1/users/${encodeURIComponent("@bridge_dev1:test.local")}`,
    );
    assert.equal(known.status, 200);
    assert.deepEqual(known.body, {});
    const legacy = await c.request("GET", `/users/${encodeURIComponent("@bridge_dev1:test.local")}`);
    assert.equal(legacy.status, 200);
    const unknown = await c.request(
      "GET",
      `/_matrix/app/v1/users/${encodeURIComponent("@nobody:test.local")}`,
    );
    assert.equal(unknown.status, 404);
    assert.equal(errcode(unknown), "M_NOT_FOUND");
    assert.deepEqual(h.userQueries, [
      "@bridge_dev1:test.local",
      "@bridge_dev1:test.local",
      "@nobody:test.local",
    ]);
    const room = await c.request("GET", `/_matrix/app/v1/rooms/${encodeURIComponent("#x:test.local")}`);
    assert.equal(room.status, 404);
    assert.equal(errcode(room), "M_NOT_FOUND");
  });
});

// --- ordering ---------------------------------------------------------------------------------------

test("concurrent transactions are handled one at a time, in arrival order", async () => {
  await withServer(async (c, h) => {
    const gates = new Map<string, ReturnType<typeof deferred>>();
    h.hook = (events) => gates.get(events[0]!.event_id)?.promise ?? Promise.resolve();
    const first = deferred();
    gates.set("$t0", first);
    const replies: Promise<Reply>[] = [c.txn("t0", [event("$t0")])];
    while (h.batches.length === 0) await sleep(5);
    // Four more arrive, one after another, while the first is still being enqueued.
    for (let i = 1; i <= 4; i++) {
      replies.push(c.txn(`t${i}`, [event(`$t${i}`)]));
      await sleep(20);
    }
    assert.equal(h.batches.length, 1, "a later transaction started before the first finished");
    first.resolve();
    const results = await Promise.all(replies);
    assert.deepEqual(
      results.map((r) => r.status),
      [200, 200, 200, 200, 200],
    );
    const expected: string[] = [];
    for (let i = 0; i <= 4; i++) expected.push(`start $t${i}`, `end $t${i}`);
    assert.deepEqual(h.timeline, expected);
  });
});

test("a transaction waiting behind a failing one is still processed", async () => {
  await withServer(async (c, h) => {
    const gate = deferred();
    h.hook = (events) => (events[0]!.event_id === "$fail" ? gate.promise : Promise.resolve());
    const failing = c.txn("f", [event("$fail")]);
    while (h.batches.length === 0) await sleep(5);
    const next = c.txn("n", [event("$next")]);
    await sleep(50);
    gate.reject(new Error("enqueue failed"));
    assert.equal((await failing).status, 500);
    assert.equal((await next).status, 200);
    assert.deepEqual(
      h.batches.map((b) => b[0]!.event_id),
      ["$fail", "$next"],
    );
    assert.equal(h.marks.length, 1);
  });
});
