import { test } from "node:test";
import assert from "node:assert/strict";
import type { KeyValueStore } from "../../src/connector.js";
import { RedeliveryTracker, qos0RemoteId } from "../../bridges/mqtt/redelivery.js";

/** In-memory KeyValueStore; records every setInMap call (ttl included). Expiry is not simulated. */
class MemoryStore implements KeyValueStore {
  readonly values = new Map<string, string>();
  readonly maps = new Map<string, Map<string, string>>();
  readonly mapWrites: { key: string; fields: Record<string, string>; ttlMs: number | undefined }[] = [];

  async get(key: string): Promise<string | undefined> {
    return this.values.get(key);
  }
  async set(key: string, value: string): Promise<void> {
    this.values.set(key, value);
  }
  async delete(key: string): Promise<void> {
    this.values.delete(key);
    this.maps.delete(key);
  }
  async getMap(key: string): Promise<Record<string, string>> {
    return Object.fromEntries(this.maps.get(key) ?? []);
  }
  async setInMap(key: string, fields: Record<string, string>, ttlMs?: number): Promise<void> {
    this.mapWrites.push({ key, fields, ttlMs });
    let map = this.maps.get(key);
    if (!map) this.maps.set(key, (map = new Map()));
    for (const [field, value] of Object.entries(fields)) map.set(field, value);
  }
  async countUp(key: string): Promise<void> {
    this.values.set(key, String(Number(this.values.get(key) ?? 0) + 1));
  }
  async countDown(key: string): Promise<boolean> {
    const n = Number(this.values.get(key) ?? 0);
    if (n > 0) this.values.set(key, String(n - 1));
    return n > 0;
  }
}

const WINDOW = 600_000;
const payload = (s: string) => new Uint8Array(Buffer.from(s, "utf8"));

test("a first publish is not a redelivery and gets a remoteId naming the client", async () => {
  const store = new MemoryStore();
  const t = new RedeliveryTracker(store, "client:dev1", WINDOW);
  const id = await t.identify(5, false, "a/b", payload("on"));
  assert.equal(id.redelivered, false);
  assert.ok(id.remoteId.startsWith("client:dev1/"), id.remoteId);
});

test("[MQTT-3.3.1-1] without DUP, a resumed session's publish with an earlier connection's packet id, topic and payload is a new message", async () => {
  const store = new MemoryStore();
  const first = await new RedeliveryTracker(store, "client:dev1", WINDOW).identify(
    7,
    false,
    "a/b",
    payload("on"),
  );
  // a device that rebooted, or one that re-sends without DUP (mqtt.js): the two look alike
  const again = await new RedeliveryTracker(store, "client:dev1", WINDOW).identify(
    7,
    false,
    "a/b",
    payload("on"),
  );
  assert.equal(again.redelivered, false);
  assert.notEqual(again.remoteId, first.remoteId);
});

test("[MQTT-4.4.0-1] DUP=1 on a new connection that did not resume the session is a new message", async () => {
  const store = new MemoryStore();
  const first = await new RedeliveryTracker(store, "c", WINDOW).identify(3, false, "t", payload("x"));
  const next = await new RedeliveryTracker(store, "c", WINDOW, false).identify(3, true, "t", payload("x"));
  assert.equal(next.redelivered, false);
  assert.notEqual(next.remoteId, first.remoteId);
});

test("[MQTT-4.4.0-1] in a new session (not resumed), the same packet id, topic and payload is a new message", async () => {
  const store = new MemoryStore();
  const first = await new RedeliveryTracker(store, "client:dev1", WINDOW).identify(
    1,
    false,
    "a/b",
    payload("on"),
  );
  // the device rebooted: a clean session, packet ids from 1 again
  const next = await new RedeliveryTracker(store, "client:dev1", WINDOW, false).identify(
    1,
    false,
    "a/b",
    payload("on"),
  );
  assert.equal(next.redelivered, false);
  assert.notEqual(next.remoteId, first.remoteId);
});

test("in a new session, DUP=1 on the same connection is still a redelivery", async () => {
  const store = new MemoryStore();
  const t = new RedeliveryTracker(store, "c", WINDOW, false);
  const first = await t.identify(4, false, "a/b", payload("on"));
  assert.deepEqual(await t.identify(4, true, "a/b", payload("on")), {
    remoteId: first.remoteId,
    redelivered: true,
  });
});

test("a record older than the window makes no redelivery, however busy the client kept its map", async () => {
  const store = new MemoryStore();
  await new RedeliveryTracker(store, "c", 50).identify(7, false, "a/b", payload("on"));
  await new Promise((resolve) => setTimeout(resolve, 60));
  const later = await new RedeliveryTracker(store, "c", 50).identify(7, false, "a/b", payload("on"));
  assert.equal(later.redelivered, false);
});

test("a redelivery seen by a third connection still maps to the original remoteId", async () => {
  const store = new MemoryStore();
  const first = await new RedeliveryTracker(store, "c", WINDOW).identify(7, false, "a/b", payload("on"));
  await new RedeliveryTracker(store, "c", WINDOW).identify(7, true, "a/b", payload("on"));
  const third = await new RedeliveryTracker(store, "c", WINDOW).identify(7, true, "a/b", payload("on"));
  assert.deepEqual(third, { remoteId: first.remoteId, redelivered: true });
});

test("a new connection with the same packet id but a different payload is a new message", async () => {
  const store = new MemoryStore();
  const first = await new RedeliveryTracker(store, "c", WINDOW).identify(7, false, "a/b", payload("on"));
  const next = await new RedeliveryTracker(store, "c", WINDOW).identify(7, false, "a/b", payload("off"));
  assert.equal(next.redelivered, false);
  assert.notEqual(next.remoteId, first.remoteId);
});

test("a new connection with the same packet id and payload but another topic is a new message", async () => {
  const store = new MemoryStore();
  const first = await new RedeliveryTracker(store, "c", WINDOW).identify(7, false, "a/b", payload("on"));
  const next = await new RedeliveryTracker(store, "c", WINDOW).identify(7, false, "a/c", payload("on"));
  assert.equal(next.redelivered, false);
  assert.notEqual(next.remoteId, first.remoteId);
});

test("another client with the same packet id, topic and payload is a new message", async () => {
  const store = new MemoryStore();
  const first = await new RedeliveryTracker(store, "client:a", WINDOW).identify(7, false, "t", payload("on"));
  const other = await new RedeliveryTracker(store, "client:b", WINDOW).identify(7, false, "t", payload("on"));
  assert.equal(other.redelivered, false);
  assert.notEqual(other.remoteId, first.remoteId);
});

test("the same packet id reused on the SAME connection (DUP unset) is not a redelivery", async () => {
  const store = new MemoryStore();
  const t = new RedeliveryTracker(store, "c", WINDOW);
  await t.identify(9, false, "a/b", payload("on"));
  const reused = await t.identify(9, false, "a/b", payload("on"));
  assert.equal(reused.redelivered, false);
});

test("the same packet id reused on the SAME connection is a new message with its own remoteId", async () => {
  const store = new MemoryStore();
  const t = new RedeliveryTracker(store, "c", WINDOW);
  const first = await t.identify(9, false, "a/b", payload("on"));
  const reused = await t.identify(9, false, "a/b", payload("on"));
  assert.equal(reused.redelivered, false);
  assert.notEqual(reused.remoteId, first.remoteId);
});

test("[MQTT-3.3.1-1] DUP=1 on the same connection with the same topic and payload is a redelivery", async () => {
  const store = new MemoryStore();
  const t = new RedeliveryTracker(store, "c", WINDOW);
  const first = await t.identify(11, false, "a/b", payload("on"));
  const dup = await t.identify(11, true, "a/b", payload("on"));
  assert.deepEqual(dup, { remoteId: first.remoteId, redelivered: true });
});

test("DUP=1 on the same connection keeps the same remoteId (so the core drops it)", async () => {
  const store = new MemoryStore();
  const t = new RedeliveryTracker(store, "c", WINDOW);
  const first = await t.identify(11, false, "a/b", payload("on"));
  const dup = await t.identify(11, true, "a/b", payload("on"));
  assert.equal(dup.remoteId, first.remoteId);
});

test("DUP=1 on a new connection with the same digest is a redelivery", async () => {
  const store = new MemoryStore();
  const first = await new RedeliveryTracker(store, "c", WINDOW).identify(3, false, "t", payload("x"));
  const dup = await new RedeliveryTracker(store, "c", WINDOW).identify(3, true, "t", payload("x"));
  assert.deepEqual(dup, { remoteId: first.remoteId, redelivered: true });
});

test("DUP=1 with a different payload is a new message", async () => {
  const store = new MemoryStore();
  const first = await new RedeliveryTracker(store, "c", WINDOW).identify(3, false, "t", payload("x"));
  const dup = await new RedeliveryTracker(store, "c", WINDOW).identify(3, true, "t", payload("y"));
  assert.equal(dup.redelivered, false);
  assert.notEqual(dup.remoteId, first.remoteId);
});

test("the record is written before identify resolves, in one map per client, with the ttl on the first write", async () => {
  const store = new MemoryStore();
  const t = new RedeliveryTracker(store, "client:dev1", WINDOW);
  await t.identify(1, false, "t", payload("a"));
  assert.equal(store.mapWrites.length, 1);
  assert.equal(store.mapWrites[0]!.key, "redelivery:client:dev1");
  // the session's epoch goes with the first records
  assert.deepEqual(Object.keys(store.mapWrites[0]!.fields), ["1", "epoch"]);
  assert.equal(store.mapWrites[0]!.ttlMs, WINDOW);
  // later writes within half a window do not refresh the expiry
  await t.identify(2, false, "t", payload("b"));
  assert.equal(store.mapWrites.length, 2);
  assert.equal(store.mapWrites[1]!.ttlMs, undefined);
});

test("the records of publishes identified in one tick are written in one call", async () => {
  const store = new MemoryStore();
  const t = new RedeliveryTracker(store, "client:dev1", WINDOW);
  const ids = await Promise.all([1, 2, 3].map((n) => t.identify(n, false, "t", payload(String(n)))));
  assert.equal(new Set(ids.map((i) => i.remoteId)).size, 3);
  assert.equal(store.mapWrites.length, 1);
  assert.deepEqual(Object.keys(store.mapWrites[0]!.fields), ["1", "2", "3", "epoch"]);
  assert.equal(store.mapWrites[0]!.ttlMs, WINDOW);
});

/** A store whose map writes can be lost, as in a crash after the enqueue and before the record. */
class LossyStore extends MemoryStore {
  lose = false;
  override async setInMap(key: string, fields: Record<string, string>, ttlMs?: number): Promise<void> {
    if (this.lose) throw new Error("killed before the record was written");
    return super.setInMap(key, fields, ttlMs);
  }
}

test("a crash that kept the enqueue and lost the record: the re-send (DUP) derives the same remoteId", async () => {
  const store = new LossyStore();
  const before = new RedeliveryTracker(store, "session:bridge", WINDOW);
  await before.identify(1, false, "seq/n", payload("0"));
  store.lose = true;
  // the hot path: enqueued with this id while its record is being written, and the record is lost
  const enqueued = await before.lookup(2, false, "seq/n", payload("1"));
  await assert.rejects(enqueued.durable);
  store.lose = false;

  const after = new RedeliveryTracker(store, "session:bridge", WINDOW);
  const resent = await after.identify(2, true, "seq/n", payload("1"));
  assert.equal(resent.remoteId, enqueued.remoteId);
});

test("the same holds for a packet id used before in the session, and for its first use after a new session's epoch", async () => {
  const store = new LossyStore();
  const first = new RedeliveryTracker(store, "session:bridge", WINDOW, false);
  await first.identify(1, false, "t", payload("ON"));
  store.lose = true;
  const lost = await first.lookup(1, false, "t", payload("OFF")); // packet id 1 again, acknowledged before
  const lostFirstUse = await first.lookup(2, false, "t", payload("ON"));
  await assert.rejects(lost.durable);
  store.lose = false;

  const next = new RedeliveryTracker(store, "session:bridge", WINDOW);
  assert.equal((await next.identify(1, true, "t", payload("OFF"))).remoteId, lost.remoteId);
  assert.equal((await next.identify(2, true, "t", payload("ON"))).remoteId, lostFirstUse.remoteId);
});

test("ids are derived, yet no two messages share one: a packet id reused, a new session, another client", async () => {
  const store = new MemoryStore();
  const ids = new Set<string>();
  for (const resumed of [false, true, false]) {
    const t = new RedeliveryTracker(store, "client:dev1", WINDOW, resumed);
    for (let i = 0; i < 3; i++) ids.add((await t.identify(1, false, "t", payload("ON"))).remoteId);
  }
  ids.add(
    (await new RedeliveryTracker(store, "client:dev2", WINDOW).identify(1, false, "t", payload("ON")))
      .remoteId,
  );
  assert.equal(ids.size, 10);
});

test("the first messages of a session wait for its epoch to be durable; later ones are not held", async () => {
  const store = new MemoryStore();
  const t = new RedeliveryTracker(store, "c", WINDOW, false);
  await t.lookup(1, false, "t", payload("a"));
  assert.equal(
    store.mapWrites.length,
    1,
    "the epoch (and the first record) written before the first enqueue",
  );
  await t.lookup(2, false, "t", payload("b"));
  assert.equal(store.mapWrites.length, 1, "the second record is written while the message is enqueued");
});

test("a record an earlier session's connection wrote late does not count in the new session", async () => {
  const store = new MemoryStore();
  const old = new RedeliveryTracker(store, "c", WINDOW);
  await old.identify(9, false, "t", payload("x"));
  const fresh = new RedeliveryTracker(store, "c", WINDOW, false);
  await fresh.identify(1, false, "t", payload("y"));
  // the old connection, taken over, still writes
  await old.identify(5, false, "t", payload("z"));
  const resumed = new RedeliveryTracker(store, "c", WINDOW);
  assert.equal((await resumed.identify(5, true, "t", payload("z"))).redelivered, false);
});

test("a redelivery writes nothing", async () => {
  const store = new MemoryStore();
  await new RedeliveryTracker(store, "c", WINDOW).identify(7, false, "t", payload("on"));
  await new RedeliveryTracker(store, "c", WINDOW).identify(7, true, "t", payload("on"));
  assert.equal(store.mapWrites.length, 1);
});

test("an unreadable record only loses that one detection", async () => {
  const store = new MemoryStore();
  await store.setInMap("redelivery:c", { "7": "{not json" });
  const id = await new RedeliveryTracker(store, "c", WINDOW).identify(7, false, "t", payload("on"));
  assert.equal(id.redelivered, false);
});

test("qos0RemoteId is unique per call and names the client", () => {
  const a = qos0RemoteId("dev1");
  const b = qos0RemoteId("dev1");
  assert.notEqual(a, b);
  assert.ok(a.startsWith("dev1/"));
});
