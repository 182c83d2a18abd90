import { test } from "node:test";
import assert from "node:assert/strict";
import { PermanentError, RetryableError } from "../../src/errors.js";
import { aboutFile, attachmentBytes, checkAttachments, fileMsgtype } from "../../src/matrix/attachments.js";
import { keptWhenDelivered, type ToMatrixJob } from "../../src/matrix/room-delivery.js";

test("fileMsgtype: m.image, m.audio, m.video by the MIME type's top level, else m.file", () => {
  assert.equal(fileMsgtype("image/png"), "m.image");
  assert.equal(fileMsgtype("Image/JPEG"), "m.image");
  assert.equal(fileMsgtype("audio/ogg; codecs=opus"), "m.audio");
  assert.equal(fileMsgtype("video/mp4"), "m.video");
  assert.equal(fileMsgtype("application/pdf"), "m.file");
  assert.equal(fileMsgtype("text/plain"), "m.file");
  assert.equal(fileMsgtype("nonsense"), "m.file");
});

test("attachmentBytes: the decoded size, without decoding", () => {
  for (const n of [0, 1, 2, 3, 4, 1000]) {
    const dataBase64 = Buffer.alloc(n, 7).toString("base64");
    assert.equal(attachmentBytes({ name: "f", mimeType: "x/y", dataBase64 }), n);
  }
});

test("checkAttachments: too many, or one too large, fail permanently, naming the file and its size", () => {
  const files = [
    { name: "a.bin", bytes: 10 },
    { name: "b.bin", bytes: 11 },
  ];
  checkAttachments(files, {}, "the far side");
  checkAttachments(files, { maxAttachments: 2, maxAttachmentBytes: 11 }, "the far side");
  assert.throws(
    () => checkAttachments(files, { maxAttachments: 1 }, "the far side"),
    new PermanentError("2 attachments; the far side takes at most 1 per message"),
  );
  assert.throws(
    () => checkAttachments(files, { maxAttachmentBytes: 10 }, "the x connector"),
    new PermanentError('attachment "b.bin" of 11 bytes; the x connector takes at most 10 bytes per file'),
  );
});

test("aboutFile: the same kind of error, led by the file; retryAfterMs kept", () => {
  const permanent = aboutFile("a.png", 5, new PermanentError("413 M_TOO_LARGE"));
  assert.ok(permanent instanceof PermanentError);
  assert.equal((permanent as Error).message, 'attachment "a.png" of 5 bytes: 413 M_TOO_LARGE');
  const retryable = aboutFile("a.png", undefined, new RetryableError("429", 1500));
  assert.ok(retryable instanceof RetryableError);
  assert.equal((retryable as RetryableError).retryAfterMs, 1500);
  assert.equal((retryable as Error).message, 'attachment "a.png": 429');
  const other = new Error("x");
  assert.equal(aboutFile("a", 1, other), other);
});

test("keptWhenDelivered: a delivered item keeps its files' names, types and sizes, not their bytes", () => {
  const job: ToMatrixJob = {
    endpointId: "r.e",
    connector: "mqtt",
    account: "home",
    sender: { id: "cam" },
    body: { text: "" },
    attachments: [
      { name: "a.jpg", mimeType: "image/jpeg", dataBase64: Buffer.alloc(300).toString("base64") },
    ],
    stream: "cam/snap",
  };
  assert.deepEqual(keptWhenDelivered(job), {
    endpointId: "r.e",
    connector: "mqtt",
    account: "home",
    sender: { id: "cam" },
    body: { text: "" },
    delivered: [{ name: "a.jpg", mimeType: "image/jpeg", bytes: 300 }],
    stream: "cam/snap",
  });
  // An item queued by an earlier version, with its one `attachment`.
  const { attachments: _a, ...legacy } = job;
  assert.deepEqual(keptWhenDelivered({ ...legacy, attachment: job.attachments![0]! })?.delivered, [
    { name: "a.jpg", mimeType: "image/jpeg", bytes: 300 },
  ]);
  // Nothing to drop: kept as it is.
  assert.equal(keptWhenDelivered({ ...legacy }), undefined);
});
