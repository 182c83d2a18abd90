/**
 * The README's "Try it" walk-through, as written: its config.yaml (with the test homeserver's
 * domain, the user as admin and a free port), a registration made before the route existed (as
 * the quick start makes it), and its mosquitto_pub / mosquitto_sub command lines, run as they are.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";
import { parse } from "yaml";
import { connectors } from "../../bridges/index.js";
import type { RunningBridge } from "../../src/app.js";
import { validateConfig } from "../../src/config/load.js";
import { freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";
import { startBridge } from "../helpers/start-bridge.js";

const README = readFileSync(new URL("../../README.md", import.meta.url), "utf8");
const tryIt = README.slice(
  README.indexOf("## Try it"),
  README.indexOf("\n## ", README.indexOf("## Try it") + 1),
);
const configYaml = /```yaml\n(# config\.yaml\n[\s\S]*?)```/.exec(tryIt)![1]!;
const commandLine = (tool: string) => new RegExp(`^\\s*(${tool} .*)$`, "m").exec(tryIt)![1]!;

describe("README: Try it", () => {
  let h: Harness;
  let bridge: RunningBridge;
  let port: number;
  let room: string;
  const onPort = (line: string) => line.replace("-p 1883", `-p ${port}`);

  before(async () => {
    h = await harness({ bridges: { mqtt: { home: { embedded: { port: 0 } } } }, routes: [] });
    port = await freePort();
    const text = configYaml
      .replaceAll("example.org", "test.local")
      .replace("@you:test.local", h.alice)
      .replace("port: 1883", `port: ${port}`);
    const readme = parse(text) as Record<string, unknown>;
    const config = validateConfig(
      {
        ...h.rawConfig,
        ...readme,
        homeserver: h.rawConfig.homeserver,
        appservice: { ...(h.rawConfig.appservice as object), ...(readme.appservice as object) },
      },
      connectors,
    );
    // h.registration was made for a config without routes, as the quick start's is.
    bridge = (await startBridge({ config, registration: h.registration })).bridge;
    room = await waitFor("the route's room", () => h.hs.resolveAlias("#tribridge_greenhouse:test.local"));
  });

  after(async () => {
    await bridge?.stop();
    await h?.cleanup();
  });

  test("the room is created and the user invited", () => {
    assert.equal(h.hs.membershipOf(room, h.alice), "invite");
    h.hs.joinRoom(room, h.alice);
  });

  test("mosquitto_pub's reading shows in the room as sensor1, and the next one edits it", async () => {
    const pub = onPort(commandLine("mosquitto_pub"));
    assert.equal(await run(pub), 0);
    const reading = await waitFor("21.5 °C in the room", () =>
      h.hs.messages(room).find((m) => m.content.body === "21.5 °C"),
    );
    assert.equal(reading.sender, "@_tb_mqtt_home_sensor1:test.local");
    assert.equal(await run(pub.replace(`'{"value": 21.5}'`, `'{"value": 22}'`)), 0);
    await waitFor("the edit to 22 °C", () =>
      h.hs
        .messages(room)
        .some((m) => (m.content["m.new_content"] as { body?: string } | undefined)?.body === "22 °C"),
    );
  });

  test("what is said in the room, mosquitto_sub prints", async () => {
    const sub = spawnShell(onPort(commandLine("mosquitto_sub")));
    try {
      let out = "";
      sub.stdout!.on("data", (d: Buffer) => (out += d.toString()));
      // Subscribed once a publish of our own comes back; the room's message then reaches it too.
      await waitFor("mosquitto_sub subscribed", async () => {
        await run(`mosquitto_pub -h 127.0.0.1 -p ${port} -t greenhouse/commands -m ping`);
        return out.includes("greenhouse/commands ping");
      });
      h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: "open the vents" });
      await waitFor("the command on MQTT", () => out.includes("greenhouse/commands open the vents\n"));
    } finally {
      sub.kill();
    }
  });
});

function spawnShell(line: string): ChildProcess {
  return spawn("sh", ["-c", `exec ${line}`], { stdio: ["ignore", "pipe", "inherit"] });
}

function run(line: string): Promise<number | null> {
  return new Promise((resolve) => spawnShell(line).on("exit", resolve));
}
