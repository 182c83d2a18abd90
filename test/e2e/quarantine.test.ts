/**
 * ConnectorContext.quarantine: a message a connector will not post lands in the failed list with
 * its reason and is not posted; retried, one with an endpoint is posted (the operator's release),
 * one with none fails again, visibly, with its reason.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import { Redis } from "ioredis";
import type { RunningBridge } from "../../src/app.js";
import { requeueAllFailedJobs } from "../../src/queue/failed-jobs.js";
import { REDIS_URL, waitFor, type Harness } from "../helpers/fixture.js";
import { startTestChat, type TestChat } from "../helpers/test-chat.js";
import type { TestConnector } from "../helpers/test-connector.js";

describe("quarantined messages", () => {
  let chat: TestChat;
  let connectors: TestChat["connectors"];
  let h: Harness;
  let bridge: RunningBridge;
  let room: string;
  let remote: TestConnector;
  let redis: Redis;

  before(async () => {
    chat = await startTestChat();
    ({ connectors, h, bridge, room, remote } = chat);
    redis = new Redis(h.config.queue.redisUrl ?? REDIS_URL);
  });

  after(async () => {
    redis?.disconnect();
    await chat?.stop();
  });

  const message = (remoteId: string, endpointIds: string[]) => ({
    endpointIds,
    remoteId,
    sender: { id: "mallory", displayName: "Mallory" },
    body: { text: `the text of ${remoteId}` },
  });
  const failedWith = async (remoteId: string) =>
    (await bridge.failedJobs()).filter((j) => (j.data as { remoteId?: string }).remoteId === remoteId);

  test("is in the failed list with its reason, once, and not posted", async () => {
    await remote.ctx.quarantine(message("q1", []), "matched no endpoint");
    await remote.ctx.quarantine(message("q1", []), "matched no endpoint"); // read again after a crash
    await remote.ctx.quarantine(message("q2", [remote.endpointId("general")]), "dmarc=fail");
    const q1 = await failedWith("q1");
    assert.equal(q1.length, 1);
    assert.equal(q1[0]!.reason, "quarantined: matched no endpoint");
    assert.equal((q1[0]!.data as { body: { text: string } }).body.text, "the text of q1");
    const [q2] = await failedWith("q2");
    assert.equal(q2?.reason, "quarantined: dmarc=fail");
    // A message emitted after them is posted; they are not.
    await remote.emit("general", message("later", []));
    await h.hs.waitForMessages(room, 1);
    await sleep(300);
    assert.deepEqual(
      h.hs.messages(room).map((m) => m.content.body),
      ["the text of later"],
    );
  });

  test("retried: with an endpoint it is posted; with none it fails again with its reason", async () => {
    const ids = new Set([...(await failedWith("q1")), ...(await failedWith("q2"))].map((j) => j.id));
    assert.equal(ids.size, 2);
    const requeued = await requeueAllFailedJobs(redis, h.config, connectors, ids);
    assert.equal(requeued, 1);
    await waitFor("q2 posted", () => h.hs.messages(room).some((m) => m.content.body === "the text of q2"));
    assert.deepEqual(await failedWith("q2"), []);
    const q1 = await failedWith("q1");
    assert.equal(q1.length, 1);
    assert.match(
      q1[0]!.reason,
      /^quarantined: matched no endpoint \(retried .*: it matched no endpoint, so there is no room to post it in\)$/,
    );
  });
});
