/** Encrypted events waiting for their keys (crypto/waiting-events.ts), on a real Redis. */
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { Redis } from "ioredis";
import { WaitingEvents, type WaitingEvent } from "../../src/matrix/crypto/waiting-events.js";
import { REDIS_URL, deleteKeys } from "../helpers/fixture.js";

const redis = new Redis(REDIS_URL);
const prefixes: string[] = [];
after(async () => {
  for (const p of prefixes) await deleteKeys(p);
  redis.disconnect();
});

function store(limits?: { total: number; perSender: number }): { waiting: WaitingEvents; prefix: string } {
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  prefixes.push(prefix);
  return { waiting: new WaitingEvents(redis, prefix, limits), prefix };
}

let clock = 0;
function waiting(sender: string, sessionId: string): WaitingEvent {
  const n = ++clock;
  return {
    event: {
      event_id: `$e${n}`,
      room_id: "!room:test.local",
      sender,
      type: "m.room.encrypted",
      content: { session_id: sessionId },
      origin_server_ts: n,
    },
    sessionId,
    since: n,
    reason: "missing room key",
  };
}

const ids = (ws: WaitingEvent[]) => ws.map((w) => w.event.event_id).sort();

test("kept, found by session, and removed with every index", async () => {
  const { waiting: w, prefix } = store();
  const a = waiting("@alice:test.local", "s1");
  const b = waiting("@bob:test.local", "s2");
  const c = waiting("@alice:test.local", "s1");
  for (const x of [a, b, c]) assert.deepEqual(await w.add(x), []);
  assert.deepEqual(ids(await w.ofSessions(["s1"])), ids([a, c]));
  assert.deepEqual(ids(await w.all()), ids([a, b, c]));
  await w.remove([a.event.event_id, b.event.event_id, c.event.event_id]);
  assert.deepEqual(await w.all(), []);
  assert.deepEqual(await redis.keys(`${prefix}:*`), [], "no index left behind");
});

test("one sender flooding gives up its own oldest, not others' events", async () => {
  const { waiting: w } = store({ total: 100, perSender: 3 });
  const alice = [waiting("@alice:test.local", "a1"), waiting("@alice:test.local", "a2")];
  for (const x of alice) await w.add(x);
  const flood = Array.from({ length: 10 }, (_, i) => waiting("@mallory:test.local", `m${i}`));
  const givenUp: WaitingEvent[] = [];
  for (const x of flood) givenUp.push(...(await w.add(x)));
  assert.deepEqual(ids(givenUp), ids(flood.slice(0, 7)));
  assert.deepEqual(ids(await w.all()), ids([...alice, ...flood.slice(7)]));
});

test("past the total bound, the oldest of all are given up", async () => {
  const { waiting: w } = store({ total: 4, perSender: 100 });
  const all = ["@a:t", "@b:t", "@c:t", "@a:t", "@b:t", "@c:t"].map((s, i) => waiting(s, `s${i}`));
  const givenUp: WaitingEvent[] = [];
  for (const x of all) givenUp.push(...(await w.add(x)));
  assert.deepEqual(ids(givenUp), ids(all.slice(0, 2)));
  assert.deepEqual(ids(await w.all()), ids(all.slice(2)));
  assert.deepEqual(ids(await w.ofSessions(["s0", "s1"])), [], "given up events leave their session's index");
});
