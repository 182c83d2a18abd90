/** Readable log lines on a terminal, and network errors without their stacks (src/log-format.ts, src/log.ts). */
import { test } from "node:test";
import assert from "node:assert/strict";
import { pino } from "pino";
import { formatLogLine, isNetworkError, serializeError, withoutNetworkStack } from "../../src/log-format.js";
import { logDestination } from "../../src/log.js";

function refused(): Error {
  return Object.assign(new Error("connect ECONNREFUSED 127.0.0.1:8008"), { code: "ECONNREFUSED" });
}

/** A stand-in for process.stdout: a terminal or not, collecting what is written. */
function fakeStdout(isTTY: boolean): NodeJS.WriteStream & { written: string[] } {
  const written: string[] = [];
  return { isTTY, hasColors: () => false, write: (s: string) => written.push(s) > 0, written } as never;
}

test("a line: local time to the ms, level, module, message, then key=value (quoted only when needed)", () => {
  const time = new Date(2026, 11, 2, 9, 5, 7, 42).getTime();
  const line = JSON.stringify({
    level: 40,
    time,
    module: "matrix",
    msg: "homeserver not reachable yet",
    attempt: 3,
    url: "http://hs:8008",
    reason: "no route to host",
    ok: false,
    servers: ["a", "b"],
  });
  assert.equal(
    formatLogLine(line),
    '09:05:07.042 WARN  matrix: homeserver not reachable yet attempt=3 url=http://hs:8008 reason="no route to host" ok=false servers=["a","b"]\n',
  );
  assert.ok(formatLogLine(line, { color: true }).startsWith("09:05:07.042 \u001b[33mWARN \u001b[0m matrix:"));
  assert.equal(formatLogLine("not json"), "not json\n");
});

test("an unexpected error's stack follows its line, indented; the line itself stays one line", () => {
  const err = serializeError(new TypeError("x is undefined"));
  const out = formatLogLine(JSON.stringify({ level: 50, time: 0, msg: "failed", err }));
  const [first, ...rest] = out.trimEnd().split("\n");
  assert.match(first!, /ERROR failed err="x is undefined"$/);
  assert.match(rest[0]!, /^ {4}TypeError: x is undefined$/);
  assert.ok(rest.slice(1).every((l) => /^ {4}\s*at /.test(l)));
});

test("network errors are recognised by their code, through causes and aggregates", () => {
  assert.equal(isNetworkError(refused()), true);
  assert.equal(isNetworkError(new Error("fetch failed", { cause: refused() })), true);
  const timeout = Object.assign(new Error("connect timeout"), { code: "UND_ERR_CONNECT_TIMEOUT" });
  assert.equal(isNetworkError(new AggregateError([timeout], "all failed")), true);
  assert.equal(isNetworkError(new Error("ECONNREFUSED in a message is not a code")), false);
  assert.equal(isNetworkError(new TypeError("bug")), false);
  assert.equal(isNetworkError("ECONNREFUSED"), false);
});

test("serializeError: a network error as its message and code, no stack; others with their stack", () => {
  assert.deepEqual(serializeError(refused()), {
    type: "Error",
    message: "connect ECONNREFUSED 127.0.0.1:8008",
    code: "ECONNREFUSED",
  });
  assert.match(String((serializeError(new TypeError("bug")) as { stack: string }).stack), /\n\s+at /);
  assert.equal(serializeError("text"), "text");
});

test("a library's text about a network error loses its stack; other text is kept whole", () => {
  const text = `Failed to ping: Error: connect ECONNREFUSED 127.0.0.1:8008\n    at TCPConnectWrap.afterConnect [as oncomplete] (node:net:1555:16)\n    at x (y.js:1:1)`;
  assert.equal(withoutNetworkStack(text), "Failed to ping: Error: connect ECONNREFUSED 127.0.0.1:8008");
  const bug = "TypeError: boom\n    at f (a.js:1:1)";
  assert.equal(withoutNetworkStack(bug), bug);
});

test("readable lines on a terminal, JSON elsewhere; TRIBRIDGE_LOG_FORMAT decides over both", () => {
  assert.equal(logDestination({}, fakeStdout(false)), undefined, "not a terminal: pino's JSON");
  assert.equal(logDestination({ TRIBRIDGE_LOG_FORMAT: "json" }, fakeStdout(true)), undefined);
  for (const [env, isTTY] of [
    [{}, true],
    [{ TRIBRIDGE_LOG_FORMAT: "pretty" }, false],
  ] as const) {
    const stdout = fakeStdout(isTTY);
    const log = pino({ base: undefined, serializers: { err: serializeError } }, logDestination(env, stdout));
    log.child({ module: "mqtt" }).warn({ err: refused(), account: "home" }, "broker unreachable");
    assert.equal(stdout.written.length, 1);
    assert.match(
      stdout.written[0]!,
      /^\d\d:\d\d:\d\d\.\d{3} WARN {2}mqtt: broker unreachable err="connect ECONNREFUSED 127\.0\.0\.1:8008" account=home\n$/,
    );
  }
});
