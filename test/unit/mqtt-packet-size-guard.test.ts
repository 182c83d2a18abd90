/** The packet size guard follows MQTT's fixed headers across any chunking of the byte stream. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { PassThrough } from "node:stream";
import { guardPacketSize, type Refusal } from "../../bridges/mqtt/packet-size-guard.js";

/** A packet: type byte, remaining length as MQTT's variable-length integer, body. */
function packet(type: number, bodyBytes: number): Buffer {
  const length: number[] = [];
  let n = bodyBytes;
  do {
    let byte = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) byte |= 0x80;
    length.push(byte);
  } while (n > 0);
  return Buffer.concat([Buffer.from([type, ...length]), Buffer.alloc(bodyBytes, 7)]);
}

/** Feeds `bytes` in chunks of the given sizes (cycled); returns what the guard refused, if anything. */
function feed(bytes: Buffer, chunkSizes: number[], max: number): Refusal | undefined {
  const stream = new PassThrough();
  let refused: Refusal | undefined;
  guardPacketSize(stream, max, (declared) => (refused = declared));
  for (let i = 0, k = 0; i < bytes.length && !stream.destroyed; k++) {
    const size = chunkSizes[k % chunkSizes.length]!;
    stream.emit("data", bytes.subarray(i, i + size));
    i += size;
  }
  return refused;
}

const traffic = Buffer.concat([
  packet(0x10, 30), // CONNECT
  packet(0xc0, 0), // PINGREQ: no body
  ...[0, 1, 127, 128, 16_383, 16_384, 1000].map((n) => packet(0x30, n)),
  packet(0xe0, 0), // DISCONNECT
]);

test("packets within the limit pass, however the stream is cut", () => {
  for (const sizes of [[1], [2, 3], [7], [128, 1], [5000], [traffic.length]])
    assert.equal(feed(traffic, sizes, 16_384), undefined, `chunks ${sizes.join(",")}`);
});

test("a packet over the limit is refused at its header, wherever the header is cut", () => {
  const big = Buffer.concat([traffic, packet(0x30, 16_385)]);
  for (const sizes of [[1], [3], [4096]]) assert.equal(feed(big, sizes, 16_384), 16_385);
});

test("a remaining length longer than four bytes is malformed [MQTT-2.2.3]", () => {
  const connect = packet(0x10, 30);
  assert.equal(
    feed(Buffer.concat([connect, Buffer.from([0x30, 0xff, 0xff, 0xff, 0xff, 0x01])]), [1], 1e9),
    "malformed",
  );
});

test("[MQTT-3.1.0-1] a first packet that is not a CONNECT is refused at its first byte", () => {
  for (const first of [0x30, 0x82, 0x11, 0x47 /* "G" of an HTTP request */])
    assert.equal(feed(Buffer.concat([Buffer.from([first]), Buffer.alloc(100_000)]), [1], 1e9), "not-connect");
});

test("the first packet has a limit of its own (a CONNECT, before authentication), later ones the packet limit", () => {
  const feedFirst = (bytes: Buffer) => {
    const stream = new PassThrough();
    let refused: number | string | undefined;
    guardPacketSize(stream, 16_384, (declared) => (refused = declared), 1024);
    stream.emit("data", bytes);
    return refused;
  };
  assert.equal(feedFirst(packet(0x10, 1025)), 1025);
  assert.equal(feedFirst(Buffer.concat([packet(0x10, 1024), packet(0x30, 16_384)])), undefined);
  assert.equal(feedFirst(Buffer.concat([packet(0x10, 1024), packet(0x30, 16_385)])), 16_385);
});
