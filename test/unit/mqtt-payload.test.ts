import { test } from "node:test";
import assert from "node:assert/strict";
import type { OutboundMessage } from "../../src/connector.js";
import { decodePayload, encodePayload, renderJson, renderTemplate } from "../../bridges/mqtt/payload.js";
import { mqttEndpointSchema, type MqttEndpoint } from "../../bridges/mqtt/schema.js";

function ep(fields: Record<string, unknown>): MqttEndpoint {
  return mqttEndpointSchema.parse({ topic: "home/kitchen/temp", ...fields });
}

const bytes = (s: string) => new Uint8Array(Buffer.from(s, "utf8"));
/** 0xff never appears in UTF-8; 0xc3 0x28 is a broken two-byte sequence. */
const notUtf8 = new Uint8Array([0x68, 0x69, 0xff, 0xc3, 0x28]);

const message: OutboundMessage = {
  id: "evt1:route.0",
  sender: { userId: "@alice:example.org", displayName: "Alice" },
  body: { text: "lights on ✓" },
  timestamp: 1_700_000_000_000,
};

// --- decode: text ---------------------------------------------------------------------------------

test("text: UTF-8 payload becomes the body, as m.notice by default", () => {
  const d = decodePayload("home/kitchen/temp", bytes("21.5 °C"), ep({}));
  assert.deepEqual(d, { body: { text: "21.5 °C", notice: true } });
});

test("text: notice: false is passed through", () => {
  const d = decodePayload("t", bytes("hi"), ep({ notice: false }));
  assert.deepEqual(d.body, { text: "hi", notice: false });
});

test("text: an empty payload is an empty text", () => {
  const d = decodePayload("t", new Uint8Array(0), ep({}));
  assert.deepEqual(d, { body: { text: "", notice: true } });
});

test("text: invalid UTF-8 becomes a file attachment with a problem", () => {
  const d = decodePayload("home/kitchen/temp", notUtf8, ep({ format: "text" }));
  assert.equal(d.problem, "payload is not UTF-8 text");
  assert.deepEqual(d.body, { text: "", notice: true }); // the file is all there is
  assert.deepEqual(d.attachment, {
    name: "home_kitchen_temp.bin",
    mimeType: "application/octet-stream",
    dataBase64: Buffer.from(notUtf8).toString("base64"),
  });
});

// --- decode: binary -------------------------------------------------------------------------------

test("binary: always a file attachment, without a problem, even when the bytes are text", () => {
  const d = decodePayload("cam/front/snapshot", bytes("hello"), ep({ format: "binary", notice: false }));
  assert.equal(d.problem, undefined);
  assert.deepEqual(d.body, { text: "", notice: false });
  assert.equal(d.attachment?.name, "cam_front_snapshot.bin");
  assert.equal(d.attachment?.mimeType, "application/octet-stream");
  assert.equal(Buffer.from(d.attachment!.dataBase64, "base64").toString("utf8"), "hello");
});

test("binary: non-UTF-8 bytes round-trip through base64", () => {
  const d = decodePayload("x", notUtf8, ep({ format: "binary" }));
  assert.equal(d.problem, undefined);
  assert.deepEqual(new Uint8Array(Buffer.from(d.attachment!.dataBase64, "base64")), notUtf8);
});

// --- decode: json ---------------------------------------------------------------------------------

test("json: an object is rendered as 'key: value · key: value'", () => {
  const d = decodePayload(
    "t",
    bytes('{"temperature":21.5,"humidity":40,"room":"kitchen"}'),
    ep({ format: "json" }),
  );
  assert.deepEqual(d, { body: { text: "temperature: 21.5 · humidity: 40 · room: kitchen", notice: true } });
});

test("json: invalid JSON becomes '(not valid JSON) <text>' with a problem", () => {
  const d = decodePayload("t", bytes("{temperature: 21"), ep({ format: "json" }));
  assert.equal(d.problem, "payload is not valid JSON");
  assert.deepEqual(d.body, { text: "(not valid JSON) {temperature: 21", notice: true });
  assert.equal(d.attachment, undefined);
});

test("binary: images are told by their first bytes (JPEG, PNG, GIF, WebP), the rest is .bin", () => {
  const kind = (b: number[]) => {
    const a = decodePayload("cam/snap", new Uint8Array(b), ep({ format: "binary" })).attachment!;
    return `${a.name} ${a.mimeType}`;
  };
  assert.equal(kind([0xff, 0xd8, 0xff, 0xdb]), "cam_snap.jpg image/jpeg");
  assert.equal(kind([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0]), "cam_snap.png image/png");
  assert.equal(kind([...Buffer.from("GIF89a")]), "cam_snap.gif image/gif");
  assert.equal(kind([...Buffer.from("RIFF\0\0\0\0WEBPVP8 ")]), "cam_snap.webp image/webp");
  assert.equal(kind([0x89, 0x50, 0x4e, 0x47]), "cam_snap.bin application/octet-stream");
});

test("json: invalid UTF-8 becomes a file attachment with a problem", () => {
  const d = decodePayload("a/b", notUtf8, ep({ format: "json" }));
  assert.equal(d.problem, "payload is not UTF-8 text");
  assert.equal(d.attachment?.name, "a_b.bin");
});

test("json: numbers, arrays and null render as JSON, a string as itself", () => {
  assert.equal(decodePayload("t", bytes("42"), ep({ format: "json" })).body.text, "42");
  assert.equal(decodePayload("t", bytes('"on"'), ep({ format: "json" })).body.text, "on");
  assert.equal(decodePayload("t", bytes("[1, 2]"), ep({ format: "json" })).body.text, "[1,2]");
  assert.equal(decodePayload("t", bytes("null"), ep({ format: "json" })).body.text, "null");
});

test("json: template renders fields by dotted path", () => {
  const d = decodePayload(
    "t",
    bytes('{"sensor":{"temp":{"value":21.5,"unit":"°C"}},"ok":true}'),
    ep({ format: "json", template: "{{sensor.temp.value}} {{ sensor.temp.unit }} ok={{ok}}" }),
  );
  assert.deepEqual(d, { body: { text: "21.5 °C ok=true", notice: true } });
});

test("json: template renders missing fields as empty", () => {
  const d = decodePayload(
    "t",
    bytes('{"a":1,"b":null}'),
    ep({ format: "json", template: "[{{missing}}][{{a.deeper}}][{{x.y.z}}][{{b}}][{{b.c}}]" }),
  );
  assert.equal(d.body.text, "[][][][null][]");
});

test("json: template renders nested objects and arrays as JSON, array items by index", () => {
  const value = { tags: ["a", "b"], pos: { x: 1, y: 2 } };
  assert.equal(renderTemplate("{{tags}} {{pos}} {{tags.1}}", value), '["a","b"] {"x":1,"y":2} b');
});

test("json: a plain state on a JSON topic (Tasmota's ON) is shown as it is, with no complaint", () => {
  const d = decodePayload("t", bytes("ON"), ep({ format: "json", template: "{{a}}" }));
  assert.deepEqual(d, { body: { text: "ON", notice: true } });
});

test("json: template with broken JSON still reports the problem and shows the text", () => {
  const d = decodePayload("t", bytes("{nope"), ep({ format: "json", template: "{{a}}" }));
  assert.equal(d.problem, "payload is not valid JSON");
  assert.equal(d.body.text, "(not valid JSON) {nope");
});

test("renderTemplate leaves text without placeholders alone", () => {
  assert.equal(renderTemplate("no fields here {single}", { single: 1 }), "no fields here {single}");
});

test("renderTemplate: fields come from the payload only, not from Object.prototype", () => {
  assert.equal(renderTemplate("[{{constructor}}]", {}), "[]");
  assert.equal(renderTemplate("[{{toString}}]", { a: 1 }), "[]");
});

test("renderJson", () => {
  assert.equal(
    renderJson({ a: 1, b: "two", c: null, d: { e: [1] } }),
    'a: 1 · b: two · c: null · d: {"e":[1]}',
  );
  assert.equal(renderJson({}), "");
  assert.equal(renderJson([1, "a"]), '[1,"a"]');
  assert.equal(renderJson(3.5), "3.5");
  assert.equal(renderJson(null), "null");
  assert.equal(renderJson("s"), "s");
});

// --- encode ---------------------------------------------------------------------------------------

test("encode text: the body as UTF-8", () => {
  const out = encodePayload(message, ep({ format: "text" }));
  assert.ok(Buffer.isBuffer(out));
  assert.equal(out.toString("utf8"), "lights on ✓");
});

test("encode json: an object with sender, displayName, body and timestamp", () => {
  const out = encodePayload(message, ep({ format: "json" }));
  assert.deepEqual(JSON.parse(out.toString("utf8")), {
    sender: "@alice:example.org",
    displayName: "Alice",
    body: "lights on ✓",
    timestamp: 1_700_000_000_000,
  });
});

test("encode binary: the attachment's bytes when there is one", () => {
  const data = Buffer.from([0, 1, 2, 0xff]);
  const out = encodePayload(
    {
      ...message,
      body: { text: "photo.jpg" },
      attachments: [{ name: "photo.jpg", mimeType: "image/jpeg", dataBase64: data.toString("base64") }],
    },
    ep({ format: "binary" }),
  );
  assert.deepEqual(out, data);
});

test("encode binary: the text as UTF-8 without an attachment", () => {
  const out = encodePayload(message, ep({ format: "binary" }));
  assert.equal(out.toString("utf8"), "lights on ✓");
});

test("decode(encode(text)) round-trips the body", () => {
  const e = ep({ format: "text" });
  assert.equal(decodePayload("t", encodePayload(message, e), e).body.text, message.body.text);
});
