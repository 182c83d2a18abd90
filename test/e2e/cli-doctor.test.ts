/**
 * `tribridge doctor`: every start-time check, one line each, and a non-zero exit on any ✗. Against
 * the test homeserver, Redis servers of the test's own (with and without AOF), the local Mosquitto
 * and an embedded broker's port; once with the bridge itself running.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { registrationYaml, type Registration } from "../../src/matrix/registration.js";
import { BridgeProcess } from "../helpers/bridge-process.js";
import { freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";
import { startRedisServer, type TestRedisServer } from "../helpers/redis-server.js";

/** The Mosquitto every test machine runs (see the preamble of the test suite). */
const MOSQUITTO = "mqtt://127.0.0.1:1883";

let aof: TestRedisServer;
let dir: string;

before(async () => {
  // As tribridge needs it: AOF synced as queue.fsync says by default, noeviction (Redis' default).
  aof = await startRedisServer(["--appendonly", "yes", "--appendfsync", "everysec"]);
  dir = mkdtempSync(join(tmpdir(), "tribridge-doctor-"));
});

after(async () => {
  await aof?.stop();
  rmSync(dir, { recursive: true, force: true });
});

/** Writes the harness' config (with `changes`) and `registration` to files of their own. */
function files(h: Harness, name: string, registration: Registration = h.registration) {
  const config = join(dir, `${name}.yaml`);
  const reg = join(dir, `${name}-registration.yaml`);
  writeFileSync(config, stringify(h.rawConfig));
  writeFileSync(reg, registrationYaml(registration));
  return { config, registration: reg };
}

function doctor(f: {
  config: string;
  registration: string;
}): Promise<{ status: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(
      process.execPath,
      ["--import", "tsx", "src/index.ts", "doctor", "-c", f.config, "-r", f.registration],
      { env: { ...process.env, TRIBRIDGE_LOG_LEVEL: "silent" } },
    );
    let out = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr.on("data", (d: Buffer) => (out += d.toString()));
    child.on("exit", (status) => resolve({ status, out }));
  });
}

/** The line of check `name`, and its fix line when it has one. */
function line(out: string, mark: "✓" | "!" | "✗", name: string): string {
  const lines = out.split("\n");
  const i = lines.findIndex((l) => l.startsWith(`${mark} ${name}: `));
  assert.ok(i >= 0, `no "${mark} ${name}:" line in:\n${out}`);
  return lines[i + 1]?.startsWith("    fix: ") ? `${lines[i]}\n${lines[i + 1]}` : lines[i]!;
}

test(
  "a healthy setup: every check ✓, exit 0; the same while the bridge runs",
  { timeout: 90_000 },
  async (t) => {
    const h = await harness({
      queue: { redisUrl: aof.url },
      bridges: {
        mqtt: {
          home: { embedded: { port: await freePort() } },
          mosquitto: { url: MOSQUITTO, connectTimeoutMs: 5_000 },
        },
      },
    });
    t.after(() => h.cleanup());
    const f = files(h, "healthy");

    const { status, out } = await doctor(f);
    assert.equal(status, 0, out);
    assert.doesNotMatch(out, /^[✗!] /m, out);
    line(out, "✓", "config");
    assert.match(line(out, "✓", "registration"), /fits the config/);
    assert.match(line(out, "✓", "appservice port"), /free \(no tribridge running\)/);
    assert.match(
      line(out, "✓", "homeserver"),
      new RegExp(`${h.config.homeserver.url} answers \\(Matrix v1\\.`),
    );
    assert.match(line(out, "✓", "homeserver login"), /the as_token acts as @tribridge:test\.local/);
    // Answered by doctor's own listener on the appservice port, with the registration's hs_token.
    assert.match(
      line(out, "✓", "appservice ping"),
      /the homeserver reaches http:\/\/127\.0\.0\.1:\d+ in \d+ ms/,
    );
    assert.match(
      line(out, "✓", "redis"),
      new RegExp(`127\\.0\\.0\\.1:${new URL(aof.url).port}, AOF on .*noeviction`),
    );
    assert.match(line(out, "✓", "mqtt.home broker"), /embedded broker can listen on 127\.0\.0\.1:\d+/);
    assert.match(
      line(out, "✓", "mqtt.mosquitto broker"),
      /mqtt:\/\/127\.0\.0\.1:1883 took an anonymous login/,
    );
    assert.match(out, /\nall checks passed\n$/);

    const bridge = new BridgeProcess(h);
    t.after(() => bridge.kill("SIGKILL"));
    bridge.start();
    await waitFor(
      "the bridge listening",
      async () =>
        (await fetch(`http://127.0.0.1:${h.config.appservice.port}/live`).catch(() => undefined))?.ok,
      30_000,
    );
    const running = await doctor(f);
    assert.equal(running.status, 0, running.out);
    assert.match(line(running.out, "✓", "appservice port"), /a running tribridge answers there/);
    assert.match(line(running.out, "✓", "appservice ping"), /\(the running tribridge\) in \d+ ms/);
    assert.match(line(running.out, "✓", "mqtt.home broker"), /in use, presumably by the running tribridge/);
  },
);

test(
  "a wrong as_token and a Redis without AOF: ✗ lines with their fixes, exit 1",
  { timeout: 60_000 },
  async (t) => {
    const noAof = await startRedisServer(["--appendonly", "no", "--maxmemory-policy", "allkeys-lru"]);
    t.after(() => noAof.stop());
    const h = await harness({
      queue: { redisUrl: noAof.url },
      bridges: { mqtt: { home: { embedded: { port: await freePort() } } } },
    });
    t.after(() => h.cleanup());
    const f = files(h, "broken", { ...h.registration, as_token: "0".repeat(64) });

    const { status, out } = await doctor(f);
    assert.equal(status, 1, out);
    // The file itself fits the config: only the homeserver can tell that its as_token is not the registered one.
    line(out, "✓", "registration");
    line(out, "✓", "homeserver");
    assert.match(
      line(out, "✗", "homeserver login"),
      /the homeserver does not know this as_token \(.*401.*M_UNKNOWN_TOKEN.*\)\n {4}fix: register .*broken-registration\.yaml with the homeserver \/ restart it/,
    );
    assert.doesNotMatch(out, /appservice ping/, "no ping without a token the homeserver knows");
    const port = new URL(noAof.url).port;
    assert.match(
      line(out, "✗", "redis"),
      new RegExp(
        `127\\.0\\.0\\.1:${port}: appendonly is 'no': queued messages are lost if Redis restarts\\n {4}fix: set appendonly yes`,
      ),
    );
    assert.match(
      out,
      /✗ redis: .*maxmemory-policy is 'allkeys-lru'.*\n {4}fix: set maxmemory-policy noeviction/,
    );
    assert.match(out, /\n3 problem\(s\) to fix\n$/);
  },
);

test("a homeserver without the appservice ping: ! (no ✗), exit 0", { timeout: 60_000 }, async (t) => {
  const h = await harness({
    queue: { redisUrl: aof.url },
    bridges: { mqtt: { home: { embedded: { port: await freePort() } } } },
    homeserver: { appservicePing: "absent" },
  });
  t.after(() => h.cleanup());
  const { status, out } = await doctor(files(h, "old-homeserver"));
  assert.equal(status, 0, out);
  assert.match(
    line(out, "!", "appservice ping"),
    /cannot tell whether it reaches .*M_UNRECOGNIZED.*\n {4}fix: a homeserver before Matrix v1\.7/,
  );
  assert.match(out, /\nall checks passed, 1 warning\(s\)\n$/);
});

test("a config error: one ✗ naming the key, the other checks skipped, exit 1", async () => {
  const config = join(dir, "bad.yaml");
  writeFileSync(
    config,
    stringify({ homeserver: { url: "http://127.0.0.1:1", domain: "test.local" }, appservice: { port: "x" } }),
  );
  const { status, out } = await doctor({ config, registration: join(dir, "none.yaml") });
  assert.equal(status, 1, out);
  assert.match(line(out, "✗", "config"), /appservice\.port: .*\n {4}fix: correct that key/);
  assert.doesNotMatch(out, /registration|redis/);
});

test(
  "an hs_token the homeserver does not send: our listener refuses the ping, ✗ appservice ping",
  { timeout: 60_000 },
  async (t) => {
    const h = await harness({
      queue: { redisUrl: aof.url },
      bridges: { mqtt: { home: { embedded: { port: await freePort() } } } },
    });
    t.after(() => h.cleanup());
    const { status, out } = await doctor(
      files(h, "other-hs-token", { ...h.registration, hs_token: "1".repeat(64) }),
    );
    assert.equal(status, 1, out);
    line(out, "✓", "homeserver login");
    // AS API §Pinging: the appservice's error comes back as 502 M_BAD_STATUS.
    assert.match(
      line(out, "✗", "appservice ping"),
      /reaches http:\/\/127\.0\.0\.1:\d+, but not with this registration's hs_token: 502 M_BAD_STATUS.*\n {4}fix: the homeserver has another registration\.yaml loaded/,
    );
  },
);
