/** Several attachments per message, both ways, each within the connector's and the homeserver's limits. */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { Redis } from "ioredis";
import { start, type RunningBridge } from "../../src/app.js";
import type { Attachment } from "../../src/connector.js";
import { REDIS_URL, harness, waitFor, type Harness } from "../helpers/fixture.js";
import { testConnector, type TestConnector } from "../helpers/test-connector.js";

const file = (name: string, mimeType: string, bytes: number, seed = 1): [Attachment, Buffer] => {
  const data = Buffer.from(Array.from({ length: bytes }, (_, i) => (i * seed + seed) % 256));
  return [{ name, mimeType, dataBase64: data.toString("base64") }, data];
};

describe("attachments", () => {
  // "capped" takes at most 3 files of 100 kB each; "open" says nothing, so only the homeserver's
  // upload limit (200 kB here) applies.
  const connectors = [
    testConnector({ attachments: true, maxAttachmentBytes: 100_000, maxAttachments: 3 }, "capped"),
    testConnector({ attachments: true }, "open"),
  ];
  let h: Harness;
  let bridge: RunningBridge;
  let cappedRoom: string;
  let openRoom: string;
  let capped: TestConnector;
  let open: TestConnector;
  const GHOST = (tag: string, sender: string) => `@_tb_${tag}_a_${sender}:test.local`;

  before(async () => {
    h = await harness({
      connectors,
      homeserver: { maxUploadBytes: 200_000 },
      bridges: { capped: { a: {} }, open: { a: {} } },
      routes: [
        {
          id: "capped",
          room: "#capped:test.local",
          endpoints: [{ account: "capped.a", direction: "inout", channel: "files" }],
        },
        {
          id: "open",
          room: "#open:test.local",
          endpoints: [{ account: "open.a", direction: "in", channel: "files" }],
        },
      ],
    });
    cappedRoom = h.hs.createRoom({ creator: h.alice, alias: "#capped:test.local", preset: "public_chat" });
    openRoom = h.hs.createRoom({ creator: h.alice, alias: "#open:test.local", preset: "public_chat" });
    bridge = await start({ config: h.config, registration: h.registration, connectors });
    capped = bridge.connector("capped.a") as TestConnector;
    open = bridge.connector("open.a") as TestConnector;
  });

  after(async () => {
    await bridge?.stop();
    await h?.cleanup();
  });

  const messagesOf = (room: string, sender: string) => h.hs.messages(room).filter((m) => m.sender === sender);
  const uploads = () => h.hs.requests.filter((r) => r.method === "POST" && r.path.endsWith("/upload")).length;
  const failedReason = (remoteText: string) =>
    waitFor(`the failed item "${remoteText}"`, async () => {
      const failed = (await bridge.failedJobs()).find(
        (j) => (j.data as { body?: { text?: string } }).body?.text === remoteText,
      );
      return failed?.reason;
    });

  test("text and three files: the text (with its HTML), then one event per file, in order, as the ghost; the media are the bytes", async () => {
    const [photo, photoBytes] = file("photo.png", "image/png", 5000, 3);
    const [voice, voiceBytes] = file("voice.ogg", "audio/ogg", 3000, 5);
    const [report, reportBytes] = file("report.pdf", "application/pdf", 7000, 7);
    await capped.emit("files", {
      remoteId: "m1",
      sender: { id: "bob", displayName: "Bob" },
      body: { text: "three files for you", html: "<b>three</b> files for you" },
      attachments: [photo, voice, report],
    });
    const posted = await waitFor("four events", () => {
      const m = messagesOf(cappedRoom, GHOST("capped", "bob"));
      return m.length >= 4 && m;
    });
    assert.equal(posted.length, 4);
    assert.deepEqual(
      posted.map((m) => [m.content.msgtype, m.content.body]),
      [
        ["m.text", "three files for you"],
        ["m.image", "photo.png"],
        ["m.audio", "voice.ogg"],
        ["m.file", "report.pdf"],
      ],
    );
    // The text with its HTML (sanitized; the test connector's HTML is harmless).
    assert.equal(posted[0]!.content.formatted_body, "<b>three</b> files for you");
    const expected = [
      [photoBytes, "image/png"],
      [voiceBytes, "audio/ogg"],
      [reportBytes, "application/pdf"],
    ] as const;
    for (const [i, [bytes, mimetype]] of expected.entries()) {
      const content = posted[i + 1]!.content;
      assert.deepEqual(content.info, { mimetype, size: bytes.byteLength });
      const stored = h.hs.mediaContent(String(content.url));
      assert.ok(stored?.data.equals(bytes), `${String(content.body)}: the media repository holds its bytes`);
      assert.equal(stored!.contentType, mimetype);
    }
    // Each under a transaction id of its own, derived from the item's.
    const txnIds = posted.map((m) => m.txn_id!);
    assert.deepEqual(
      txnIds.slice(1),
      [1, 2, 3].map((n) => `${txnIds[0]}-${n}`),
    );
  });

  test("a delivered item's files do not stay in Redis with its completed job", async () => {
    const redis = new Redis(REDIS_URL);
    try {
      const [photo] = file("photo.png", "image/png", 5000, 3);
      const jobData = async () => {
        const data: string[] = [];
        let cursor = "0";
        do {
          const [next, keys] = await redis.scan(cursor, "MATCH", `${h.prefix}:to-matrix-*`, "TYPE", "hash");
          for (const key of keys) {
            const value = await redis.hget(key, "data");
            if (value) data.push(value);
          }
          cursor = next;
        } while (cursor !== "0");
        return data;
      };
      const kept = await waitFor("the completed job's record without the bytes", async () => {
        const all = await jobData();
        return (
          all.some((d) => d.includes('"delivered"')) && !all.some((d) => d.includes(photo.dataBase64)) && all
        );
      });
      const record = kept.find((d) => d.includes('"delivered"'))!;
      assert.ok(record.includes('{"name":"photo.png","mimeType":"image/png","bytes":5000}'), record);
    } finally {
      redis.disconnect();
    }
  });

  test("[spec: threading] a message with files in a thread: every part in it; its remote id maps to its text", async () => {
    const ghost = GHOST("capped", "frank");
    await capped.emit("files", { remoteId: "t-root", sender: { id: "frank" }, body: { text: "root" } });
    const [root] = await waitFor(
      "the root",
      () => messagesOf(cappedRoom, ghost).length >= 1 && messagesOf(cappedRoom, ghost),
    );
    const [a] = file("a.png", "image/png", 100, 3);
    const [b] = file("b.pdf", "application/pdf", 100, 5);
    await capped.emit("files", {
      remoteId: "t-files",
      sender: { id: "frank" },
      body: { text: "two files in the thread" },
      attachments: [a, b],
      thread: "t-root",
    });
    await capped.emit("files", {
      remoteId: "t-answer",
      sender: { id: "frank" },
      body: { text: "re" },
      replyTo: "t-files",
    });
    const posted = await waitFor("five events", () => {
      const m = messagesOf(cappedRoom, ghost);
      return m.length >= 5 && m;
    });
    const [, text, first, second, answer] = posted;
    const inThread = (replyTo: string, fallingBack: boolean) => ({
      rel_type: "m.thread",
      event_id: root!.event_id,
      is_falling_back: fallingBack,
      "m.in_reply_to": { event_id: replyTo },
    });
    assert.deepEqual(text!.content["m.relates_to"], inThread(root!.event_id, true));
    // Each file a fallback reply to the latest event in the thread: the part before it.
    assert.deepEqual(first!.content["m.relates_to"], inThread(text!.event_id, true));
    assert.deepEqual(second!.content["m.relates_to"], inThread(first!.event_id, true));
    // An answer to the message answers its first event, the text.
    assert.deepEqual(answer!.content["m.relates_to"], inThread(text!.event_id, false));
  });

  test("a send answered with an error after the homeserver stored it, and a failed upload: retried, nothing posted twice", async () => {
    const sends = /\/rooms\/[^/]+\/send\/m\.room\.message\//;
    // The 2nd upload fails; later, the 2nd event (the first file) is stored but its answer lost.
    h.hs.failRequests({ method: "POST", path: /\/upload$/, skip: 1, status: 500 });
    h.hs.failRequests({ method: "PUT", path: sends, skip: 1, status: 502, when: "after" });
    const [clip, clipBytes] = file("clip.mp4", "video/mp4", 4000, 11);
    const [log] = file("log.txt", "text/plain", 2000, 13);
    await capped.emit("files", {
      remoteId: "m2",
      sender: { id: "carol" },
      body: { text: "a clip and a log" },
      attachments: [clip, log],
    });
    const posted = await waitFor("three events", () => {
      const m = messagesOf(cappedRoom, GHOST("capped", "carol"));
      return m.length >= 3 && m;
    });
    // A later message of the same room arrives after everything of this one.
    await capped.emit("files", { remoteId: "m3", sender: { id: "carol" }, body: { text: "done" } });
    await waitFor("the next message", () => messagesOf(cappedRoom, GHOST("capped", "carol")).length >= 4);
    assert.deepEqual(
      messagesOf(cappedRoom, GHOST("capped", "carol")).map((m) => [m.content.msgtype, m.content.body]),
      [
        ["m.text", "a clip and a log"],
        ["m.video", "clip.mp4"],
        ["m.file", "log.txt"],
        ["m.text", "done"],
      ],
    );
    assert.ok(h.hs.mediaContent(String(posted[1]!.content.url))?.data.equals(clipBytes));
    // Both faults were met, so both retries happened.
    assert.ok(h.hs.requests.some((r) => r.path.endsWith("/upload") && r.status === 500));
    assert.ok(h.hs.requests.some((r) => sends.test(r.path) && r.status === 502));
  });

  test("a file over the connector's cap, or too many files, fail the message whole, named; nothing of it is posted", async () => {
    const uploadsBefore = uploads();
    const [small] = file("small.bin", "application/octet-stream", 1000);
    const [big] = file("big.bin", "application/octet-stream", 150_000);
    await capped.emit("files", {
      remoteId: "m4",
      sender: { id: "dave" },
      body: { text: "one too big" },
      attachments: [small, big, small],
    });
    await capped.emit("files", {
      remoteId: "m5",
      sender: { id: "dave" },
      body: { text: "too many" },
      attachments: [small, small, small, small],
    });
    await capped.emit("files", { remoteId: "m6", sender: { id: "dave" }, body: { text: "after them" } });
    await waitFor("the message after them", () => messagesOf(cappedRoom, GHOST("capped", "dave")).length > 0);
    assert.equal(
      await failedReason("one too big"),
      'permanent: attachment "big.bin" of 150000 bytes; the capped connector takes at most 100000 bytes per file',
    );
    assert.equal(
      await failedReason("too many"),
      "permanent: 4 attachments; the capped connector takes at most 3 per message",
    );
    assert.deepEqual(
      messagesOf(cappedRoom, GHOST("capped", "dave")).map((m) => m.content.body),
      ["after them"],
    );
    assert.equal(uploads(), uploadsBefore, "checked before anything was uploaded");
  });

  test("a file over the homeserver's upload limit (413 M_TOO_LARGE) fails the message whole, named", async () => {
    const [small] = file("small.bin", "application/octet-stream", 1000);
    const [huge] = file("huge.bin", "application/octet-stream", 300_000);
    await open.emit("files", {
      remoteId: "m7",
      sender: { id: "erin" },
      body: { text: "one too big for the homeserver" },
      attachments: [small, huge],
    });
    await open.emit("files", { remoteId: "m8", sender: { id: "erin" }, body: { text: "after it" } });
    await waitFor("the message after it", () => messagesOf(openRoom, GHOST("open", "erin")).length > 0);
    const reason = await failedReason("one too big for the homeserver");
    assert.match(reason, /^permanent: attachment "huge\.bin" of 300000 bytes: .*413 M_TOO_LARGE/);
    assert.deepEqual(
      messagesOf(openRoom, GHOST("open", "erin")).map((m) => m.content.body),
      ["after it"],
    );
  });

  test("a file posted in the room reaches a connector that takes files as one attachment; over its cap → failed list", async () => {
    const upload = async (name: string, data: Buffer, contentType: string): Promise<string> => {
      const res = await fetch(`${h.hs.url}/_matrix/media/v3/upload?filename=${name}`, {
        method: "POST",
        headers: { authorization: `Bearer ${h.hs.accessTokenFor(h.alice)}`, "content-type": contentType },
        body: data,
      });
      return ((await res.json()) as { content_uri: string }).content_uri;
    };
    const [, docBytes] = file("doc.pdf", "application/pdf", 6000, 17);
    const doc = await upload("doc.pdf", docBytes, "application/pdf");
    h.hs.sendMessage(cappedRoom, h.alice, {
      msgtype: "m.file",
      body: "doc.pdf",
      url: doc,
      info: { mimetype: "application/pdf", size: docBytes.byteLength },
    });
    const [sent] = await waitFor(
      "the file sent",
      () => capped.sentTo("files").length > 0 && capped.sentTo("files"),
    );
    assert.equal(sent!.attachments?.length, 1);
    const [attachment] = sent!.attachments!;
    assert.equal(attachment!.name, "doc.pdf");
    assert.equal(attachment!.mimeType, "application/pdf");
    assert.ok(Buffer.from(attachment!.dataBase64, "base64").equals(docBytes));
    assert.equal(sent!.body.text, `doc.pdf (${doc})`);

    // Over the cap: by its declared size, or, declared smaller (or not at all), by its download.
    const big = await upload("big.bin", Buffer.alloc(150_000, 1), "application/octet-stream");
    h.hs.sendMessage(cappedRoom, h.alice, {
      msgtype: "m.file",
      body: "big.bin",
      url: big,
      info: { mimetype: "application/octet-stream", size: 150_000 },
    });
    h.hs.sendMessage(cappedRoom, h.alice, { msgtype: "m.file", body: "undeclared.bin", url: big });
    const reasons = await waitFor("two failed files", async () => {
      const failed = (await bridge.failedJobs()).filter((j) => j.queue === "to-capped");
      return failed.length >= 2 && failed.map((j) => j.reason);
    });
    assert.deepEqual(reasons, [
      'permanent: attachment "big.bin" of 150000 bytes; the far side takes at most 100000 bytes per file',
      `permanent: attachment "undeclared.bin": downloading ${big}: response larger than 100000 bytes`,
    ]);
    assert.equal(capped.sentTo("files").length, 1);
  });
});
