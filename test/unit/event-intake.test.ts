/**
 * EventIntake's dedupe by event id, against real Redis: two instances (or a homeserver retrying a
 * transaction while the first attempt still runs) handed the same event at once enqueue it once;
 * an enqueue that fails leaves the event to the homeserver's retry.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import { Redis } from "ioredis";
import type { MatrixEvent } from "../../src/matrix/appservice-server.js";
import type { Commands } from "../../src/matrix/commands.js";
import { EventIntake, type EventIntakeOptions } from "../../src/matrix/event-intake.js";
import type { LiveMessages } from "../../src/matrix/live-messages.js";
import type { MatrixClient } from "../../src/matrix/matrix-client.js";
import { moduleLogger } from "../../src/log.js";
import { RouteTable } from "../../src/routing/route-table.js";
import { REDIS_URL, harness, type Harness } from "../helpers/fixture.js";
import { testConnector } from "../helpers/test-connector.js";

const ROOM = "!room:test.local";
const log = moduleLogger("event-intake-test");
log.level = "silent";
/** Permissions are not what these tests are about (see permissions.test.ts). */
const everyoneMayRelay: EventIntakeOptions["permissions"] = {
  noteState: () => undefined,
  judge: async () => () => true,
  refused: async () => assert.fail("nobody is refused here"),
};

describe("EventIntake: each event once", () => {
  let h: Harness;
  let redis: Redis;

  before(async () => {
    h = await harness({
      connectors: [testConnector()],
      bridges: { test: { a: {} } },
      routes: [
        { id: "chat", room: ROOM, endpoints: [{ account: "test.a", direction: "out", channel: "general" }] },
      ],
    });
    redis = new Redis(REDIS_URL);
  });

  after(async () => {
    redis?.disconnect();
    await h?.cleanup();
  });

  /** An intake as one bridge instance has it; `enqueue` records what it was given. */
  function intake(enqueued: string[], enqueue?: EventIntakeOptions["enqueue"]): EventIntake {
    return new EventIntake({
      matrix: {} as MatrixClient,
      routesKnown: Promise.resolve(),
      routes: new RouteTable(h.config.routes),
      redis,
      prefix: h.prefix,
      botUserId: "@tribridge:test.local",
      isOurs: () => false,
      live: {} as LiveMessages,
      commands: {} as Commands,
      permissions: everyoneMayRelay,
      isAdmin: () => false,
      upgraded: () => undefined,
      capabilitiesOf: () => undefined,
      enqueue:
        enqueue ??
        (async (_endpoint, _roomId, id) => {
          await sleep(20); // a Redis write takes a while: long enough for the other to look
          enqueued.push(id);
        }),
      encryption: { enabled: () => undefined, undecryptable: () => undefined, joined: async () => undefined },
      log,
    });
  }

  const message = (id: string): MatrixEvent => ({
    event_id: id,
    room_id: ROOM,
    sender: "@alice:test.local",
    type: "m.room.message",
    content: { msgtype: "m.text", body: id },
    origin_server_ts: 1,
  });

  test("the same event twice in one transaction is enqueued once", async () => {
    const enqueued: string[] = [];
    await intake(enqueued).handle([message("$twice"), message("$twice")]);
    assert.equal(enqueued.length, 1);
  });

  test("two instances handed the same event at once enqueue it once (the seen-check is atomic)", async () => {
    const enqueued: string[] = [];
    const [a, b] = [intake(enqueued), intake(enqueued)];
    await Promise.all([a.handle([message("$both")]), b.handle([message("$both")])]);
    assert.equal(enqueued.length, 1);
  });

  test("an enqueue that fails leaves the event to the homeserver's retry, which enqueues it", async () => {
    const enqueued: string[] = [];
    let fail = true;
    const flaky = intake(enqueued, async (_e, _r, id) => {
      if (fail) throw new Error("redis is down");
      enqueued.push(id);
    });
    await assert.rejects(flaky.handle([message("$retried")]), /redis is down/);
    fail = false;
    await flaky.handle([message("$retried")]);
    await flaky.handle([message("$retried")]);
    assert.equal(enqueued.length, 1);
  });
});
