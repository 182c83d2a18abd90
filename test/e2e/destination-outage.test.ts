/**
 * A far side down for a long time: the homeserver (refusing connections, or a proxy answering 502)
 * and a connector's account. Nothing goes to the failed list however long it lasts (attempts are
 * few and fast here, so the old behaviour gave up within a second), every room keeps its order,
 * delivery resumes within 2 s of the far side answering, and the log gets a few lines, not one per
 * attempt. TRIBRIDGE_OUTAGE_MS sets the homeserver outage (default 12 s; 1800000 for the 30
 * minutes of docs/reliability.md).
 */
import { after, afterEach, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import { pino } from "pino";
import { start, type RunningBridge } from "../../src/app.js";
import { UnavailableError } from "../../src/errors.js";
import { rootLogger } from "../../src/log.js";
import { freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";
import { testConnector, type TestConnector } from "../helpers/test-connector.js";

const OUTAGE_MS = Number(process.env.TRIBRIDGE_OUTAGE_MS ?? 12_000);
const ROOMS = ["north", "south"] as const;

/** Lines the bridge logs at warn and above from now on (pino's JSON lines, as written). */
function warningsFromNow(): { lines: string[]; stop(): void } {
  const stream = (rootLogger as unknown as Record<symbol, { write(line: string): unknown }>)[
    pino.symbols.streamSym
  ]!;
  const write = stream.write;
  const lines: string[] = [];
  stream.write = function (line: string) {
    if ((JSON.parse(line) as { level: number }).level >= 40) lines.push(line);
    return write.call(this, line);
  };
  return { lines, stop: () => void (stream.write = write) };
}

describe("a far side down for a long time", { timeout: OUTAGE_MS + 120_000 }, () => {
  const connectors = [testConnector()];
  let h: Harness;
  let bridge: RunningBridge;
  let remote: TestConnector;
  const roomIds = new Map<string, string>();
  let sequence = 0;

  before(async () => {
    h = await harness({
      connectors,
      bridges: { test: { a: {} } },
      metrics: { enabled: true, port: await freePort() },
      queue: {
        maxAttempts: 3,
        initialRetryDelayMs: 50,
        maxRetryDelayMs: 200,
        maxProbeDelayMs: 500,
        stillDownLogMs: 5_000,
      },
      routes: ROOMS.map((name) => ({
        id: name,
        room: `#${name}:test.local`,
        endpoints: [{ account: "test.a", direction: "inout", channel: name }],
      })),
    });
    for (const name of ROOMS)
      roomIds.set(
        name,
        h.hs.createRoom({ creator: h.alice, alias: `#${name}:test.local`, preset: "public_chat" }),
      );
    const config = { ...h.config, appservice: { ...h.config.appservice, admins: [h.alice] } };
    bridge = await start({ config, registration: h.registration, connectors });
    remote = bridge.connector("test.a") as TestConnector;
  });

  after(async () => {
    await bridge?.stop();
    await h?.cleanup();
  });

  afterEach(async () => assert.deepEqual(await bridge.failedJobs(), []));

  /** `count` messages into each room, interleaved; their texts, by room. */
  async function emitEach(count: number): Promise<Map<string, string[]>> {
    const texts = new Map<string, string[]>(ROOMS.map((r) => [r, []]));
    for (let i = 0; i < count; i++)
      for (const room of ROOMS) {
        const text = `${room} ${++sequence}`;
        texts.get(room)!.push(text);
        await remote.emit(room, { remoteId: `m${sequence}`, sender: { id: "dev" }, body: { text } });
      }
    return texts;
  }

  const postedIn = (room: string) => h.hs.messages(roomIds.get(room)!).map((e) => String(e.content.body));

  async function outageOfTheHomeserver(kind: "refuse" | "bad-gateway", outageMs: number) {
    const before = new Map(ROOMS.map((r) => [r, postedIn(r).length + 3]));
    await emitEach(3);
    await waitFor("the first messages", () => ROOMS.every((r) => postedIn(r).length === before.get(r)));
    const warnings = warningsFromNow();
    try {
      await h.hs.outage(kind);
      const sent = await emitEach(20);
      await sleep(outageMs);
      assert.ok(ROOMS.every((r) => postedIn(r).length === before.get(r)));
      const back = Date.now();
      await h.hs.endOutage();
      await waitFor("a message after the outage", () =>
        ROOMS.some((r) => postedIn(r).length > before.get(r)!),
      );
      const resumedMs = Date.now() - back;
      await waitFor(
        "every message",
        () => ROOMS.every((r) => postedIn(r).length === before.get(r)! + 20),
        30_000,
      );
      for (const r of ROOMS) assert.deepEqual(postedIn(r).slice(before.get(r)), sent.get(r), `order in ${r}`);
      assert.ok(resumedMs < 2_000, `delivery resumed ${resumedMs} ms after the homeserver answered again`);
      // "down" once, "still down" every 5 s: not a line per attempt (hundreds).
      const bound = 2 + Math.ceil(outageMs / 5_000);
      console.log(
        `# ${kind} for ${outageMs} ms: 0 failed, 0 reordered, resumed ${resumedMs} ms after it answered, ${warnings.lines.length} warnings`,
      );
      assert.ok(
        warnings.lines.length <= bound,
        `${warnings.lines.length} warnings over the outage (at most ${bound}):\n${warnings.lines.slice(0, 10).join("")}`,
      );
      assert.ok(warnings.lines.some((l) => l.includes("destination down")));
    } finally {
      warnings.stop();
    }
  }

  test(`the homeserver refusing connections for ${OUTAGE_MS / 1000} s: nothing failed, order kept, resumed within 2 s`, () =>
    outageOfTheHomeserver("refuse", OUTAGE_MS));

  test("a proxy answering 502 in front of the homeserver, for 6 s: the same", () =>
    outageOfTheHomeserver("bad-gateway", 6_000));

  test("the status command, metrics and /ready name a destination that is down", async () => {
    remote.down = new UnavailableError("test far side unreachable");
    try {
      h.hs.sendMessage(roomIds.get("north")!, h.alice, {
        msgtype: "m.text",
        body: "to a far side that is down",
      });
      await waitFor("the destination to be down", async () => {
        h.hs.sendMessage(roomIds.get("north")!, h.alice, { msgtype: "m.text", body: "!tribridge status" });
        await sleep(300);
        return h.hs
          .messages(roomIds.get("north")!)
          .some((e) => /test\.a: down since/.test(String(e.content.body)));
      });
      const metrics = await (await fetch(`http://127.0.0.1:${bridge.metricsPort}/metrics`)).text();
      assert.match(metrics, /^tribridge_destination_up\{destination="test\.a"\} 0$/m);
      assert.match(metrics, /^tribridge_destination_waiting_relays\{destination="test\.a"\} 1$/m);
      const ready = await fetch(`http://127.0.0.1:${bridge.appservicePort}/ready`);
      assert.equal(ready.status, 503);
      const { checks } = (await ready.json()) as { checks: Record<string, string> };
      assert.match(
        checks.destinations!,
        /^test\.a down \(1 relay\(s\) waiting\): test far side unreachable$/,
      );
    } finally {
      remote.down = undefined;
      remote.ctx.setState("up");
    }
    await waitFor("the message, once up", () =>
      remote.sentTo("north").some((m) => m.body.text === "to a far side that is down"),
    );
  });

  test("a connector's account down for 3 s: room messages wait in order, and go within 2 s of it reporting up", async () => {
    remote.down = new UnavailableError("test far side unreachable");
    const sentBefore = remote.sentTo("south").length;
    const texts = Array.from({ length: 10 }, (_, i) => `command ${i}`);
    for (const body of texts) h.hs.sendMessage(roomIds.get("south")!, h.alice, { msgtype: "m.text", body });
    await sleep(3_000);
    assert.equal(remote.sentTo("south").length, sentBefore);
    const back = Date.now();
    remote.down = undefined;
    remote.ctx.setState("up");
    await waitFor("the commands", () => remote.sentTo("south").length === sentBefore + texts.length);
    assert.ok(Date.now() - back < 2_000, `resumed ${Date.now() - back} ms after the account came up`);
    assert.deepEqual(
      remote
        .sentTo("south")
        .slice(sentBefore)
        .map((m) => m.body.text),
      texts,
    );
  });
});
