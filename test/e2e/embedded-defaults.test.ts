/**
 * Embedded defaults: no queue.redisUrl → a private redis-server child with AOF in dataDir; the
 * embedded broker on a busy port → one clear error; `start` without a registration prints how to
 * register it.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { copyFileSync, existsSync, mkdtempSync, readFileSync, readdirSync } from "node:fs";
import { createServer, type Server } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import mqtt from "mqtt";
import { connectors } from "../../bridges/index.js";
import { validateConfig } from "../../src/config/load.js";
import type { RunningBridge } from "../../src/app.js";
import { freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";
import { startBridge } from "../helpers/start-bridge.js";

function redisServersUsing(dir: string): number {
  const ps = spawnSync("ps", ["-eo", "args"], { encoding: "utf8" }).stdout;
  return ps.split("\n").filter((line) => line.includes("redis-server") && line.includes(dir)).length;
}

describe("no queue.redisUrl: a private redis-server", () => {
  let h: Harness;
  let bridge: RunningBridge | undefined;
  const dataDir = mkdtempSync(join(tmpdir(), "tribridge-data-"));

  before(async () => {
    h = await harness({
      bridges: { mqtt: { home: { embedded: { port: 0 } } } },
      routes: [
        {
          id: "r",
          room: "#embedded:test.local",
          endpoints: [{ account: "mqtt.home", direction: "in", topic: "e/#" }],
        },
      ],
    });
  });

  after(async () => {
    await bridge?.stop();
    await h?.cleanup();
  });

  test("relays through it, with AOF in dataDir, and stops it on exit", async () => {
    const room = h.hs.createRoom({ creator: h.alice, alias: "#embedded:test.local", preset: "public_chat" });
    const raw = structuredClone(h.rawConfig) as { queue: Record<string, unknown> };
    delete raw.queue.redisUrl;
    const config = validateConfig({ ...raw, dataDir }, connectors);
    const started = await startBridge({ config, registration: h.registration });
    bridge = started.bridge;
    assert.equal(redisServersUsing(dataDir), 1);

    const device = await mqtt.connectAsync(`mqtt://127.0.0.1:${started.ports.mqtt}`, { clientId: "d1" });
    await device.publishAsync("e/1", "through the embedded redis", { qos: 1 });
    await h.hs.waitForMessages(room, 1);
    await device.endAsync();

    const redisDir = join(resolve(dataDir), "redis");
    assert.ok(
      readdirSync(redisDir).some((f) => f.startsWith("appendonly")),
      `AOF files in ${redisDir}: ${readdirSync(redisDir).join(", ")}`,
    );
    await bridge.stop();
    bridge = undefined;
    assert.equal(redisServersUsing(dataDir), 0);
  });
});

describe("tribridge start on a machine where the MQTT port is taken", () => {
  let blocker: Server;
  let busyPort: number;
  const cwd = mkdtempSync(join(tmpdir(), "tribridge-cli-"));

  before(async () => {
    busyPort = await freePort();
    blocker = createServer();
    await new Promise<void>((r) => blocker.listen(busyPort, "127.0.0.1", () => r()));
  });

  after(() => blocker.close());

  test("prints the registration steps, then one clear error naming the port, and exits 1", async () => {
    const asPort = await freePort();
    const r = spawnSync(
      process.execPath,
      [
        "--import",
        import.meta.resolve("tsx"), // cwd is a temp dir: resolve tsx from here
        resolve("src/index.ts"),
        "start",
        "--homeserver",
        "http://127.0.0.1:1",
        "--domain",
        "test.local",
      ],
      {
        cwd,
        encoding: "utf8",
        timeout: 60_000,
        env: {
          ...process.env,
          TRIBRIDGE_LOG_LEVEL: "fatal",
          TRIBRIDGE__appservice__port: String(asPort),
          TRIBRIDGE__bridges__mqtt__default__embedded__port: String(busyPort),
        },
      },
    );
    assert.equal(r.status, 1, r.stderr);
    assert.match(r.stdout, /!admin appservices register/);
    assert.match(r.stdout, /app_service_config_files/);
    assert.ok(existsSync(join(cwd, "data", "registration.yaml")));
    assert.equal(
      r.stderr.trim(),
      `tribridge: bridges.mqtt.default: embedded MQTT broker: port ${busyPort} on 127.0.0.1 is already in use ` +
        "(set embedded.port to a free port, or stop the other broker); this account's settings are " +
        "bridges.mqtt.default.<key> in the config, or TRIBRIDGE__bridges__mqtt__default__<key> in the environment",
    );
    assert.equal(redisServersUsing(cwd), 0, "the private redis-server was stopped");
  });
});

describe("tribridge start, first run from a clone, while the homeserver is not up yet", () => {
  const cwd = mkdtempSync(join(tmpdir(), "tribridge-cli-"));

  test("leaves the sample registration alone, writes one in data/, and SIGTERM while it waits stops it and its redis-server", async () => {
    copyFileSync("registration.yaml", join(cwd, "registration.yaml")); // the committed sample
    const child = spawn(
      process.execPath,
      [
        "--import",
        import.meta.resolve("tsx"),
        resolve("src/index.ts"),
        "start",
        "--homeserver",
        `http://127.0.0.1:${await freePort()}`,
        "--domain",
        "test.local",
      ],
      {
        cwd,
        env: {
          ...process.env,
          TRIBRIDGE_LOG_LEVEL: "warn",
          TRIBRIDGE__appservice__port: String(await freePort()),
          TRIBRIDGE__bridges__mqtt__default__embedded__port: String(await freePort()),
        },
      },
    );
    let stdout = "";
    child.stdout.on("data", (c: Buffer) => (stdout += c.toString()));
    const exited = new Promise<number | null>((r) => child.once("exit", (code) => r(code)));
    await waitFor(
      "waiting for the homeserver",
      () => stdout.includes("homeserver not reachable yet"),
      30_000,
    );
    assert.match(
      stdout,
      /No registration yet: generated \S+\/data\/registration\.yaml with fresh tokens \(registration\.yaml is a sample/,
    );
    assert.match(readFileSync(join(cwd, "data", "registration.yaml"), "utf8"), /as_token: [0-9a-f]{64}/);
    assert.equal(
      readFileSync(join(cwd, "registration.yaml"), "utf8"),
      readFileSync("registration.yaml", "utf8"),
    );
    assert.equal(redisServersUsing(cwd), 1);

    child.kill("SIGTERM");
    assert.equal(await exited, 0);
    assert.equal(redisServersUsing(cwd), 0, "the private redis-server was stopped");
  });
});
