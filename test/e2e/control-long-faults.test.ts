/**
 * Long faults (a minute by default; TRIBRIDGE_TEST_OUTAGE_MS=120000 for two) while a room talks to
 * an external broker, one bridge throughout. Redis away (stopped, AOF on, then started again on its
 * files) while room messages arrive and a `!tribridge link` is given: once it is back, every
 * message is published once and in order, each gets its ✅, and the link was either made and
 * relays, or answered as failed and absent. The broker away: ⏳ while it is, then ✅, nothing lost.
 * Counted with sequence numbers on a listener whose session the broker keeps across its restart.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import mqtt, { type MqttClient } from "mqtt";
import { connectors } from "../../bridges/index.js";
import { start, type RunningBridge } from "../../src/app.js";
import { hasMosquitto } from "../helpers/brokers.js";
import { freePort, harness, waitFor, type Harness } from "../helpers/fixture.js";
import { startRedisServer, type TestRedisServer } from "../helpers/redis-server.js";
import type { RecordedEvent } from "../helpers/test-homeserver.js";

const OUTAGE_MS = Number(process.env.TRIBRIDGE_TEST_OUTAGE_MS ?? 60_000);
/** A room message this often, before, during and after each outage. */
const EVERY_MS = 1000;

/** A Mosquitto whose sessions and queued messages survive its restarts (its files stay). */
class PersistentMosquitto {
  private child: ChildProcess | undefined;
  private readonly dir = mkdtempSync(join(tmpdir(), "tribridge-mosquitto-long-"));
  constructor(readonly port: number) {
    // Started as root, Mosquitto runs as user mosquitto: it must be able to write its files here.
    chmodSync(this.dir, 0o777);
    writeFileSync(
      join(this.dir, "mosquitto.conf"),
      `listener ${port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location ${this.dir}/\n` +
        "autosave_interval 1\nmax_queued_messages 0\n",
    );
  }
  async start(): Promise<void> {
    this.child = spawn("mosquitto", ["-c", join(this.dir, "mosquitto.conf")], { stdio: "ignore" });
    await waitFor("mosquitto", async () => {
      const c = mqtt.connect(`mqtt://127.0.0.1:${this.port}`, { reconnectPeriod: 0, connectTimeout: 500 });
      const up = await new Promise<boolean>(
        (r) => (c.once("connect", () => r(true)), c.once("error", () => r(false))),
      );
      c.end(true);
      return up;
    });
  }
  /** SIGTERM: it saves its sessions, as a broker restarted for maintenance does. */
  async stop(): Promise<void> {
    const child = this.child;
    if (!child || child.exitCode !== null) return;
    const exited = new Promise((r) => child.once("exit", r));
    child.kill("SIGTERM");
    await exited;
  }
  async remove(): Promise<void> {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Order, losses and repeats of `heard` (sequence numbers) against 0..sent-1. */
function tally(heard: number[], sent: number) {
  const unique = new Set(heard);
  return {
    sent,
    delivered: unique.size,
    lost: Array.from({ length: sent }, (_, i) => i).filter((i) => !unique.has(i)).length,
    repeats: heard.length - unique.size,
    inversions: heard.filter((v, i) => i > 0 && v < heard[i - 1]!).length,
  };
}

describe(
  "long faults",
  { skip: !hasMosquitto && "mosquitto is not installed", timeout: 4 * OUTAGE_MS + 240_000 },
  () => {
    let h: Harness;
    let redis: TestRedisServer;
    let broker: PersistentMosquitto;
    let bridge: RunningBridge;
    let listener: MqttClient;
    let room: string;
    let bot: string;
    /** `dup`: the broker sent it again, its first delivery not acknowledged (MQTT-3.3.1-1). */
    const heard: { topic: string; text: string; dup: boolean }[] = [];
    /** Whether the broker kept the listener's session each time it came back (else it missed what came meanwhile). */
    let sessionKept = true;

    before(async () => {
      redis = await startRedisServer(["--appendonly", "yes"]);
      broker = new PersistentMosquitto(await freePort());
      await broker.start();
      h = await harness({
        bridges: { mqtt: { lab: { url: `mqtt://127.0.0.1:${broker.port}`, reconnectPeriodMs: 200 } } },
        queue: { redisUrl: redis.url, maxProbeDelayMs: 500 },
        routes: [
          {
            id: "lab",
            room: "#lab:test.local",
            endpoints: [{ account: "mqtt.lab", direction: "out", topic: "lab/seq", qos: 1 }],
          },
        ],
      });
      bot = h.hs.appserviceUserId;
      room = h.hs.createRoom({ creator: h.alice, alias: "#lab:test.local", preset: "public_chat" });
      const config = { ...h.config, appservice: { ...h.config.appservice, admins: [h.alice] } };
      bridge = await start({ config, registration: h.registration, connectors });
      await waitFor("connected to the broker", () => bridge.connectorStates()["mqtt.lab"]?.state === "up");
      listener = await mqtt.connectAsync(`mqtt://127.0.0.1:${broker.port}`, {
        clientId: "long-listener",
        clean: false,
        reconnectPeriod: 200,
      });
      listener.on("message", (topic, payload, packet) =>
        heard.push({ topic, text: payload.toString(), dup: packet.dup }),
      );
      listener.on("connect", (ack) => void (sessionKept &&= ack.sessionPresent));
      await listener.subscribeAsync("#", { qos: 1 });
    });

    after(async () => {
      await listener?.endAsync(true);
      await bridge?.stop();
      await h?.cleanup();
      await broker?.remove();
      await redis?.stop();
    });

    const relationOf = (e: RecordedEvent) =>
      e.content["m.relates_to"] as
        { event_id?: string; key?: string; "m.in_reply_to"?: { event_id?: string } } | undefined;
    /** The bot's marks on `eventId` that stand (a redacted one has lost its relation). */
    const keysOn = (roomId: string, eventId: string) =>
      h.hs
        .events(roomId)
        .filter((e) => e.type === "m.reaction" && e.sender === bot && relationOf(e)?.event_id === eventId)
        .map((e) => relationOf(e)!.key);
    const answerTo = (roomId: string, eventId: string) =>
      h.hs
        .events(roomId)
        .find((e) => e.sender === bot && relationOf(e)?.["m.in_reply_to"]?.event_id === eventId);

    /** Says `prefix n` in the room every EVERY_MS until `until` resolves; the events said. */
    async function talk(prefix: string, until: Promise<unknown>): Promise<string[]> {
      const said: string[] = [];
      let done = false;
      void until.finally(() => (done = true));
      while (!done) {
        said.push(h.hs.sendMessage(room, h.alice, { msgtype: "m.text", body: `${prefix} ${said.length}` }));
        await sleep(EVERY_MS);
      }
      return said;
    }

    /**
     * The numbers of `prefix`'s messages as heard, without the broker's own second deliveries to the
     * listener (DUP set: its first was in flight when the broker stopped; MQTT-4.4.0-1): those are
     * its at-least-once, not a second publish by the bridge.
     */
    const sequence = (prefix: string) =>
      heard
        .filter((m) => !m.dup && m.topic === "lab/seq" && m.text.startsWith(`${prefix} `))
        .map((m) => Number(m.text.split(" ")[1]));

    test(`Redis away for ${OUTAGE_MS / 1000} s while the room talks and a link is given: all delivered in order, all marked, the link made or answered as failed`, async () => {
      const linkRoom = h.hs.createRoom({ creator: h.alice, preset: "private_chat", invite: [bot] });
      await waitFor("the bot in the link room", () => h.hs.membershipOf(linkRoom, bot) === "join");
      const started = Date.now();
      const outage = (async () => {
        await sleep(3 * EVERY_MS);
        // At the moment Redis goes: one link given just before, one while it is away.
        const asAway = h.hs.sendMessage(linkRoom, h.alice, {
          msgtype: "m.text",
          body: "!tribridge link mqtt.lab linked/a out",
        });
        await new Promise<void>((resolve) => {
          redis.process.once("exit", () => resolve());
          redis.process.kill("SIGTERM"); // AOF flushed; what was acknowledged is kept
        });
        await sleep(OUTAGE_MS / 2);
        const whileAway = h.hs.sendMessage(linkRoom, h.alice, {
          msgtype: "m.text",
          body: "!tribridge link mqtt.lab linked/b out",
        });
        await sleep(OUTAGE_MS / 2);
        await redis.restart();
        await sleep(3 * EVERY_MS);
        return [asAway, whileAway];
      })();
      const said = await talk("redis", outage);
      const links = await outage;
      const back = Date.now();

      await waitFor("every message published", () => new Set(sequence("redis")).size >= said.length, 120_000);
      await waitFor("every ✅", () => said.every((id) => keysOn(room, id).includes("✅")), 60_000);
      const answers = await waitFor(
        "both links answered",
        () => {
          const a = links.map((id) => answerTo(linkRoom, id));
          return a.every(Boolean) && a.map((e) => String(e!.content.body));
        },
        60_000,
      );
      const result = tally(sequence("redis"), said.length);
      console.log(
        `# Redis away ${OUTAGE_MS} ms: ${JSON.stringify(result)}; all delivered ${Date.now() - back} ms after it came back ` +
          `(${Date.now() - started} ms in all); the links: ${JSON.stringify(answers)}`,
      );
      assert.deepEqual(result, {
        sent: said.length,
        delivered: said.length,
        lost: 0,
        repeats: 0,
        inversions: 0,
      });

      // A link answered as made relays; one answered as failed is not there.
      for (const [i, answer] of answers.entries()) {
        const topic = `linked/${"ab"[i]}`;
        assert.match(answer, /^(Linked mqtt\.lab linked\/[ab] \(out\)|link failed: )/, answer);
        const body = `through ${topic}`;
        const routes = await ask(linkRoom, "!tribridge routes");
        if (answer.startsWith("Linked")) {
          assert.match(routes, new RegExp(`topic=${topic}`));
          h.hs.sendMessage(linkRoom, h.alice, { msgtype: "m.text", body });
          await waitFor(`the message on ${topic}`, () =>
            heard.some((m) => m.topic === topic && m.text === body),
          );
        } else assert.doesNotMatch(routes, new RegExp(`topic=${topic}`));
      }
    });

    async function ask(roomId: string, body: string): Promise<string> {
      const asked = h.hs.sendMessage(roomId, h.alice, { msgtype: "m.text", body });
      return String((await waitFor(`the answer to ${body}`, () => answerTo(roomId, asked))).content.body);
    }

    test(`the broker away for ${OUTAGE_MS / 1000} s: ⏳ while it is, then ✅, nothing lost, in order`, async () => {
      const waitingSeen = new Set<string>();
      const started = Date.now();
      const outage = (async () => {
        await sleep(3 * EVERY_MS);
        await broker.stop();
        await sleep(OUTAGE_MS);
        await broker.start();
        await sleep(3 * EVERY_MS);
      })();
      const watching = setInterval(() => {
        for (const e of h.hs.events(room))
          if (e.type === "m.reaction" && e.sender === bot && relationOf(e)?.key === "⏳")
            waitingSeen.add(relationOf(e)!.event_id!);
      }, 100);
      const said = await talk("broker", outage);
      const back = Date.now();
      try {
        await waitFor(
          "every message published",
          () => new Set(sequence("broker")).size >= said.length,
          120_000,
        ).catch(async (err: unknown) => {
          const states = JSON.stringify(bridge.connectorStates());
          const failed = (await bridge.failedJobs()).length;
          const got = new Set(sequence("broker"));
          const lost = said.flatMap((id, n) =>
            got.has(n) ? [] : [`${n}: ${keysOn(room, id).join("") || "no mark"}`],
          );
          console.log(`# lost: ${lost.join(", ")}`);
          console.log(
            `# so far: ${JSON.stringify(tally(sequence("broker"), said.length))} ${states}; ${failed} failed`,
          );
          throw err;
        });
        await waitFor(
          "every ✅, no ⏳ left",
          () => said.every((id) => keysOn(room, id).join() === "✅"),
          60_000,
        );
      } finally {
        clearInterval(watching);
      }
      const result = tally(sequence("broker"), said.length);
      const again = heard.filter((m) => m.dup && m.text.startsWith("broker ")).length;
      console.log(
        `# broker away ${OUTAGE_MS} ms: ${JSON.stringify(result)}; ${again} delivered again by the broker (DUP); ${waitingSeen.size} message(s) showed ⏳; ` +
          `all delivered and ✅ ${Date.now() - back} ms after it came back (${Date.now() - started} ms in all)`,
      );
      assert.ok(sessionKept, "the broker kept the listener's session across its restart");
      assert.ok(waitingSeen.size > 0, "a message waiting for the broker shows ⏳");
      assert.deepEqual(result, {
        sent: said.length,
        delivered: said.length,
        lost: 0,
        repeats: 0,
        inversions: 0,
      });
    });
  },
);
