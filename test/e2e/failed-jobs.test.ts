/**
 * "Nothing is lost": a relay that cannot be delivered ends in the failed list with its reason, and
 * `tribridge failed-jobs` shows it to the operator.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import mqtt from "mqtt";
import { stringify } from "yaml";
import type { RunningBridge } from "../../src/app.js";
import { freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";
import { startBridge, type StartedBridge } from "../helpers/start-bridge.js";

function failedJobsCli(config: Record<string, unknown>, ...args: string[]) {
  const file = join(mkdtempSync(join(tmpdir(), "tribridge-failed-")), "config.yaml");
  writeFileSync(file, stringify(config));
  return spawnSync(
    process.execPath,
    ["--import", "tsx", "src/index.ts", "failed-jobs", "-c", file, ...args],
    { encoding: "utf8", timeout: 30_000 },
  );
}

/** A bridge with one inbound route, from `topic` into `room` (created first with `preset`, if given). */
async function bridgeWithRoute(
  route: { id: string; room: string; topic: string; preset?: "public_chat" | "private_chat" },
  queue?: Record<string, unknown>,
): Promise<StartedBridge & { h: Harness; roomId: string }> {
  const h = await harness({
    bridges: { mqtt: { home: { embedded: { port: 0 } } } },
    queue,
    routes: [
      {
        id: route.id,
        room: route.room,
        endpoints: [{ account: "mqtt.home", direction: "in", topic: route.topic }],
      },
    ],
  });
  const roomId = route.preset
    ? h.hs.createRoom({ creator: h.alice, alias: route.room, preset: route.preset })
    : "";
  return { h, roomId, ...(await startBridge(h)) };
}

async function publishOnce(port: number, clientId: string, topic: string, body: string) {
  const device = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, { clientId });
  await device.publishAsync(topic, body, { qos: 1 });
  await device.endAsync();
}

function failedJobsOf(bridge: RunningBridge) {
  return waitFor("a failed relay", async () => {
    const jobs = await bridge.failedJobs();
    return jobs.length > 0 && jobs;
  });
}

describe("failed relays are listed with their reason", () => {
  let h: Harness;
  let bridge: RunningBridge;
  let ports: StartedBridge["ports"];

  before(async () => {
    // An alias on another server that does not exist: the bridge may not create it.
    ({ h, bridge, ports } = await bridgeWithRoute({
      id: "elsewhere",
      room: "#nowhere:other.example",
      topic: "lost/#",
    }));
  });

  after(async () => {
    await bridge?.stop();
    await h?.cleanup();
  });

  test("an undeliverable message is in failedJobs() and in `tribridge failed-jobs`, with the reason", async () => {
    const empty = failedJobsCli(h.rawConfig);
    assert.equal(empty.status, 0, empty.stderr);
    assert.equal(empty.stdout.trim(), "No failed relays.");

    await publishOnce(ports.mqtt, "lonely", "lost/thing", "hello?");
    const jobs = await failedJobsOf(bridge);
    assert.equal(jobs.length, 1);
    assert.equal(jobs[0]!.queue, "to-matrix");
    assert.match(jobs[0]!.reason, /^permanent: .*M_NOT_FOUND/);

    const r = failedJobsCli(h.rawConfig);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`to-matrix  ${jobs[0]!.id}`));
    assert.match(r.stdout, /reason: permanent: .*M_NOT_FOUND/);
    assert.match(r.stdout, /"body":\{"text":"hello\?"/);
    assert.match(r.stdout, /1 failed relay\(s\), oldest first\./);
  });
});

test("failed-jobs without a reachable Redis fails at once with a clear message", async () => {
  const base = {
    homeserver: { url: "http://127.0.0.1:1", domain: "test.local" },
  };
  const embedded = failedJobsCli({ ...base, dataDir: mkdtempSync(join(tmpdir(), "tribridge-data-")) });
  assert.equal(embedded.status, 1);
  assert.match(embedded.stderr, /the embedded Redis runs only while the bridge runs/);

  const port = await freePort();
  const unreachable = failedJobsCli({ ...base, queue: { redisUrl: `redis://127.0.0.1:${port}` } });
  assert.equal(unreachable.status, 1);
  assert.match(unreachable.stderr, /^tribridge: .*(ECONNREFUSED|Connection is closed)/m);

  const badLimit = failedJobsCli(base, "--limit", "zero");
  assert.equal(badLimit.status, 1);
  assert.match(badLimit.stderr, /--limit must be a positive integer/);
});

describe("failed relays can be put back on their queues", () => {
  let h: Harness;
  let bridge: RunningBridge;
  let ports: StartedBridge["ports"];
  let room: string;

  before(async () => {
    ({
      h,
      bridge,
      ports,
      roomId: room,
    } = await bridgeWithRoute(
      { id: "closed", room: "#closed:test.local", topic: "closed/#", preset: "private_chat" },
      { maxAttempts: 2 },
    ));
  });

  after(async () => {
    await bridge?.stop();
    await h?.cleanup();
  });

  test("a message that gave up (bot not invited) is delivered after `failed-jobs --retry`", async () => {
    await publishOnce(ports.mqtt, "knocker", "closed/door", "let me in");
    const jobs = await failedJobsOf(bridge);
    assert.equal(jobs.length, 1);
    assert.match(jobs[0]!.reason, /^gave up after 2 attempts: .*M_FORBIDDEN/);

    h.hs.inviteUser(room, h.alice, "@tribridge:test.local");
    const other = failedJobsCli(h.rawConfig, "--retry", "--id", "not-a-failed-relay");
    assert.equal(other.stdout.trim(), "requeued 0 failed relay(s)");
    assert.equal(other.status, 1);
    assert.match(other.stderr, /1 of the given --id are not in the failed list/);
    const r = failedJobsCli(h.rawConfig, "--retry", "--id", jobs[0]!.id);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout.trim(), "requeued 1 failed relay(s)");

    const [message] = await h.hs.waitForMessages(room, 1, 20_000);
    assert.equal(message!.content.body, "let me in");
    assert.deepEqual(await bridge.failedJobs(), []);
  });
});

test("a room where the ghost may not post: fails at once, as joining again does not change power levels", async (t) => {
  const {
    h,
    bridge,
    ports,
    roomId: room,
  } = await bridgeWithRoute(
    { id: "announce", room: "#announce:test.local", topic: "announce/#", preset: "public_chat" },
    { maxAttempts: 5 },
  );
  t.after(async () => {
    await bridge.stop();
    await h.cleanup();
  });
  h.hs.sendState(room, h.alice, "m.room.power_levels", "", {
    users: { [h.alice]: 100 },
    events_default: 50,
  });
  await publishOnce(ports.mqtt, "speaker", "announce/now", "hello");
  const [failed] = await failedJobsOf(bridge);
  assert.match(failed!.reason, /^permanent: .*M_FORBIDDEN/);
});
