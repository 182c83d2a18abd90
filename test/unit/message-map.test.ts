/** The event id ⇄ remote id map, against real Redis: both directions, per account, retention. */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { Redis } from "ioredis";
import { MessageMap, messageMapKeys, retentionFor } from "../../src/store/message-map.js";
import { REDIS_URL, deleteKeys } from "../helpers/fixture.js";

const DAY_MS = 24 * 3600 * 1000;
const ROOM = "!room:test.local";
const OTHER_ROOM = "!other:test.local";

describe("MessageMap", () => {
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  let redis: Redis;
  let map: MessageMap;

  before(() => {
    redis = new Redis(REDIS_URL);
    map = new MessageMap(redis, prefix);
  });

  after(async () => {
    redis.disconnect();
    await deleteKeys(prefix);
  });

  test("retention: 90 days where the far side has conversations, 7 days otherwise", () => {
    assert.equal(retentionFor({ threads: true }), 90 * DAY_MS);
    assert.equal(retentionFor({ threads: false }), 7 * DAY_MS);
    assert.equal(retentionFor({}), 7 * DAY_MS);
  });

  test("inbound: remote id → event in its room (with its thread), event → remote id", async () => {
    const account = map.account("mail.ops", DAY_MS);
    await account.received("<m1@x>", ROOM, "$e1");
    await account.received("<m2@x>", ROOM, "$e2", "$e1");
    await account.received("<m1@x>", OTHER_ROOM, "$e1-elsewhere");
    assert.deepEqual(await account.eventsIn(ROOM, ["<m1@x>", undefined, "<m2@x>", "<unknown@x>"]), [
      { eventId: "$e1" },
      undefined,
      { eventId: "$e2", threadRoot: "$e1" },
      undefined,
    ]);
    assert.deepEqual(await account.eventsIn(OTHER_ROOM, ["<m1@x>"]), [{ eventId: "$e1-elsewhere" }]);
    assert.deepEqual(await account.remoteIdsOf("any.endpoint", ["$e2", "$nope"]), ["<m2@x>", undefined]);
    // Only what was sent there counts for edits and redactions.
    assert.equal(await account.sentTo("any.endpoint", "$e1"), undefined);
  });

  test("outbound: the remote id send returned, preferred for its own endpoint; sender and thread kept", async () => {
    const account = map.account("mail.ops", DAY_MS);
    const event = { eventId: "$o1", roomId: ROOM, sender: "@alice:test.local", threadRoot: "$root" };
    await account.sent(event, "chat.a", "<a@x>");
    await account.sent(event, "chat.b", "<b@x>");
    assert.deepEqual(await account.remoteIdsOf("chat.a", ["$o1"]), ["<a@x>"]);
    assert.deepEqual(await account.remoteIdsOf("chat.b", ["$o1"]), ["<b@x>"]);
    const elsewhere = (await account.remoteIdsOf("chat.c", ["$o1"]))[0];
    assert.ok(
      elsewhere === "<a@x>" || elsewhere === "<b@x>",
      "another endpoint of the account: any of its ids",
    );
    assert.deepEqual(await account.sentTo("chat.a", "$o1"), {
      remoteId: "<a@x>",
      sender: "@alice:test.local",
      threadRoot: "$root",
    });
    assert.equal(await account.sentTo("chat.c", "$o1"), undefined);
    // And back: an answer to either remote id answers the event, in its thread.
    assert.deepEqual(await account.eventsIn(ROOM, ["<a@x>", "<b@x>"]), [
      { eventId: "$o1", threadRoot: "$root" },
      { eventId: "$o1", threadRoot: "$root" },
    ]);
    // A correction the far side made of an edit stands for the same event.
    await account.alsoKnownAs("<a2@x>", { eventId: "$o1", roomId: ROOM, threadRoot: "$root" });
    assert.deepEqual(await account.eventsIn(ROOM, ["<a2@x>"]), [{ eventId: "$o1", threadRoot: "$root" }]);
  });

  test("accounts do not see each other's ids", async () => {
    await map.account("mail.ops", DAY_MS).received("shared-id", ROOM, "$s1");
    const other = map.account("mail.sales", DAY_MS);
    assert.deepEqual(await other.eventsIn(ROOM, ["shared-id"]), [undefined]);
    assert.deepEqual(await other.remoteIdsOf("x", ["$s1"]), [undefined]);
  });

  test("retention: written with it, and restarted by every lookup that finds the key", async () => {
    const account = map.account("mail.ops", 90 * DAY_MS);
    await account.received("<r1@x>", ROOM, "$r1");
    const remoteKey = messageMapKeys.remote(prefix, "mail.ops", "<r1@x>");
    const eventKey = messageMapKeys.event(prefix, "mail.ops", "$r1");
    for (const key of [remoteKey, eventKey]) {
      const ttl = await redis.pttl(key);
      assert.ok(ttl > 90 * DAY_MS - 60_000 && ttl <= 90 * DAY_MS, `${key}: ${ttl}`);
      await redis.pexpire(key, 1000); // as if 90 days had nearly passed
    }
    await account.eventsIn(ROOM, ["<r1@x>"]);
    await account.remoteIdsOf("e", ["$r1"]);
    for (const key of [remoteKey, eventKey]) assert.ok((await redis.pttl(key)) > 89 * DAY_MS, key);
    // Expired: forgotten.
    await redis.del(remoteKey, eventKey);
    assert.deepEqual(await account.eventsIn(ROOM, ["<r1@x>"]), [undefined]);
  });

  test("a long remote id is hashed into its key, and still found", async () => {
    const account = map.account("mail.ops", DAY_MS);
    const long = `<${"x".repeat(900)}@example.org>`;
    await account.received(long, ROOM, "$long");
    const key = messageMapKeys.remote(prefix, "mail.ops", long);
    assert.ok(key.length < 200, key);
    assert.equal(await redis.exists(key), 1);
    assert.deepEqual(await account.eventsIn(ROOM, [long]), [{ eventId: "$long" }]);
  });
});
