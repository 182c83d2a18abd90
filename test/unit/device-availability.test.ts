import { after, beforeEach, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { Redis } from "ioredis";
import { moduleLogger } from "../../src/log.js";
import { DeviceAvailability, type AvailabilityJob } from "../../src/matrix/availability.js";
import { LiveMessages } from "../../src/matrix/live-messages.js";
import type { MatrixClient } from "../../src/matrix/matrix-client.js";
import { MatrixPermanentError } from "../../src/matrix/matrix-error.js";
import { REDIS_URL, deleteKeys } from "../helpers/fixture.js";

const redis = new Redis(REDIS_URL);
after(() => redis.disconnect());

/** A homeserver that records presence and events; `refuse` answers presence as conduwuit with it off. */
function fakeMatrix(opts: { refuse?: boolean } = {}) {
  const presence: { userId: string; state: string; statusMsg?: string }[] = [];
  const events: { userId: string; content: Record<string, unknown>; txnId: string }[] = [];
  let onPresence: (userId: string) => Promise<void> = async () => undefined;
  const matrix = {
    setPresence: async (sender: { userId: string }, state: string, statusMsg: string | undefined) => {
      if (opts.refuse)
        throw new MatrixPermanentError({
          what: `PUT /_matrix/client/v3/presence/${sender.userId}/status`,
          status: 403,
          errcode: "M_FORBIDDEN",
          error: "Presence is disabled on this server",
        });
      presence.push({ userId: sender.userId, state, ...(statusMsg !== undefined && { statusMsg }) });
      await onPresence(sender.userId);
    },
    sendAs: async (
      sender: { userId: string },
      _room: string,
      _type: string,
      content: Record<string, unknown>,
      txnId: string,
    ) => {
      events.push({ userId: sender.userId, content, txnId });
      return `$${events.length}`;
    },
  };
  return {
    matrix: matrix as unknown as MatrixClient,
    presence,
    events,
    whenPresenceSet: (f: (userId: string) => Promise<void>) => (onPresence = f),
  };
}

let prefix: string;
beforeEach(async () => {
  prefix = `test-${randomUUID().slice(0, 8)}`;
});

const ghost = (name: string) => ({ userId: `@_tb_mqtt_home_${name}:test.local`, displayName: name });
const report = (state: AvailabilityJob["state"]): AvailabilityJob => ({
  state,
  at: Date.UTC(2026, 11, 2, 11, 40),
});

function devicesWith(hs: ReturnType<typeof fakeMatrix>) {
  return new DeviceAvailability(
    hs.matrix,
    new LiveMessages(redis, prefix),
    redis,
    prefix,
    moduleLogger("test"),
  );
}

test("ghosts shown online are set online again each round, offline ones not; one instance per round", async () => {
  const hs = fakeMatrix();
  const devices = devicesWith(hs);
  const line = (senderId: string) => ({ endpointId: "home.e1", senderId });
  await devices.show(report("online"), ghost("lamp"), "!room", line("lamp"), "t1");
  await devices.show(report("online"), ghost("plug"), "!room", line("plug"), "t2");
  await devices.show(report("offline"), ghost("plug"), "!room", line("plug"), "t3");
  hs.presence.length = 0;

  assert.equal(await devices.refreshPresence(5_000), 1);
  assert.deepEqual(hs.presence, [{ userId: ghost("lamp").userId, state: "online" }]);
  // Another instance (or a timer that fired early) in the same round does nothing.
  assert.equal(await devicesWith(hs).refreshPresence(5_000), 0);
  await redis.del(`${prefix}:presence-round`);
  assert.equal(await devicesWith(hs).refreshPresence(5_000), 1);
  await deleteKeys(prefix);
});

test("a device reported offline while a round sets it online again ends offline", async () => {
  const hs = fakeMatrix();
  const devices = devicesWith(hs);
  await devices.show(report("online"), ghost("lamp"), "!room", { endpointId: "e", senderId: "lamp" }, "t1");
  hs.presence.length = 0;
  // The offline report is taken in between the round's read and its own PUT's answer.
  hs.whenPresenceSet(async () => {
    hs.whenPresenceSet(async () => undefined);
    await devices.show(
      report("offline"),
      ghost("lamp"),
      "!room",
      { endpointId: "e", senderId: "lamp" },
      "t2",
    );
  });
  await devices.refreshPresence(5_000);
  assert.deepEqual(
    hs.presence.map((p) => p.state),
    ["online", "offline", "offline"],
  );
  await deleteKeys(prefix);
});

test("a homeserver refusing presence: the status line alone, posted once then edited, no presence rounds", async () => {
  const hs = fakeMatrix({ refuse: true });
  const devices = devicesWith(hs);
  const line = { endpointId: "e", senderId: "door" };
  await devices.show(report("online"), ghost("door"), "!room", line, "t1");
  await devices.show(report("offline"), ghost("door"), "!room", line, "t2");
  await devices.show(report("offline"), ghost("door"), "!room", line, "t3"); // shown already: nothing
  assert.deepEqual(
    hs.events.map((e) => e.txnId),
    ["t1", "t2"],
  );
  assert.equal(hs.events[0]?.content.body, "🟢 online since 2026-12-02 11:40 UTC");
  assert.deepEqual(hs.events[1]?.content["m.relates_to"], { rel_type: "m.replace", event_id: "$1" });
  assert.equal(
    (hs.events[1]?.content["m.new_content"] as { body: string }).body,
    "🔴 offline since 2026-12-02 11:40 UTC",
  );
  assert.equal(await devices.refreshPresence(5_000), 0);
  await deleteKeys(prefix);
});

test("start keeps presence up on its own, until its signal aborts", async () => {
  const hs = fakeMatrix();
  const devices = devicesWith(hs);
  await devices.show(
    report("unavailable"),
    ghost("fan"),
    "!room",
    { endpointId: "e", senderId: "fan" },
    "t1",
  );
  hs.presence.length = 0;
  const stop = new AbortController();
  devices.start(stop.signal, 1_100); // rounds of 100 ms in Redis: one per tick
  await new Promise((r) => setTimeout(r, 2_500));
  stop.abort();
  const rounds = hs.presence.length;
  assert.ok(rounds >= 1 && rounds <= 2, `${rounds} rounds`);
  assert.deepEqual(hs.presence[0], { userId: ghost("fan").userId, state: "unavailable" });
  await new Promise((r) => setTimeout(r, 1_300));
  assert.equal(hs.presence.length, rounds, "none after the abort");
  await deleteKeys(prefix);
});
