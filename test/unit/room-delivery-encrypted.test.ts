/**
 * A far side's file posted into a room, through RoomDelivery and a real MatrixClient against the
 * test homeserver: encrypted (content with `file`, no `url`; ciphertext in the media repository)
 * where the room's events are sealed, in the clear where they are not. The sealer here answers
 * `encrypts` as EndToEnd does (EncryptedRooms.check) but leaves the event as it is, so that the
 * homeserver's copy can be read: Megolm itself is not what is tested.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { Redis } from "ioredis";
import { moduleLogger } from "../../src/log.js";
import { decryptAttachment, type EncryptedFile } from "../../src/matrix/crypto/encrypted-attachments.js";
import { EncryptedRooms } from "../../src/matrix/encrypted-rooms.js";
import { LiveMessages } from "../../src/matrix/live-messages.js";
import { MatrixClient } from "../../src/matrix/matrix-client.js";
import { RoomDelivery, type ToMatrixJob } from "../../src/matrix/room-delivery.js";
import { RouteTable } from "../../src/routing/route-table.js";
import { MessageMap } from "../../src/store/message-map.js";
import { REDIS_URL, harness, type Harness } from "../helpers/fixture.js";
import { testConnector } from "../helpers/test-connector.js";

const log = moduleLogger("room-delivery-encrypted-test");
log.level = "silent";
const BOT = "@tribridge:test.local";

describe("RoomDelivery: files into encrypted and plain rooms", () => {
  const connector = testConnector({ attachments: true });
  let h: Harness;
  let redis: Redis;
  let matrix: MatrixClient;
  let delivery: RoomDelivery;
  let encryptedRoom: string;
  let plainRoom: string;
  const stopping = new AbortController();

  before(async () => {
    h = await harness({
      connectors: [connector],
      bridges: { test: { a: {} } },
      routes: [
        {
          id: "secret",
          room: "#secret:test.local",
          endpoints: [{ account: "test.a", direction: "in", channel: "secret" }],
        },
        {
          id: "open",
          room: "#open:test.local",
          endpoints: [{ account: "test.a", direction: "in", channel: "open" }],
        },
      ],
    });
    encryptedRoom = h.hs.createRoom({
      creator: h.alice,
      alias: "#secret:test.local",
      preset: "public_chat",
      encrypted: true,
    });
    plainRoom = h.hs.createRoom({ creator: h.alice, alias: "#open:test.local", preset: "public_chat" });
    redis = new Redis(REDIS_URL);
    matrix = new MatrixClient({
      homeserverUrl: h.config.homeserver.url,
      domain: "test.local",
      botUserId: BOT,
      botDisplayName: "Bridge",
      registration: h.registration,
      log,
    });
    await matrix.start(stopping.signal);
    const routes = new RouteTable(h.config.routes);
    const bot = { userId: BOT, displayName: "Bridge" };
    const rooms = new EncryptedRooms({ supported: true, matrix, routes, redis, prefix: h.prefix, bot, log });
    matrix.encryptWith({ encrypts: (roomId) => rooms.check(roomId), seal: async () => undefined });
    delivery = new RoomDelivery(
      matrix,
      routes,
      { ghostPrefix: h.config.appservice.ghostPrefix, domain: "test.local" },
      [connector],
      new LiveMessages(redis, h.prefix),
      new MessageMap(redis, h.prefix),
      rooms,
    );
  });

  after(async () => {
    stopping.abort();
    matrix?.stop();
    redis?.disconnect();
    await h?.cleanup();
  });

  const photo = Buffer.from(Array.from({ length: 6000 }, (_, i) => (i * 7 + 3) & 0xff));
  const job = (channel: string, text: string): ToMatrixJob => ({
    endpointId: h.config.routes.find((r) => r.id === channel)!.endpoints[0]!.id,
    connector: "test",
    account: "a",
    sender: { id: "cam", displayName: "Camera" },
    body: { text },
    attachments: [{ name: "snap.png", mimeType: "image/png", dataBase64: photo.toString("base64") }],
  });
  const posted = (roomId: string) =>
    h.hs.messages(roomId).filter((m) => m.sender !== h.alice && m.sender !== BOT);

  test("[spec: sending encrypted attachments] into an encrypted room: `file` and no `url`; the repository holds ciphertext, unnamed", async () => {
    await delivery.deliver(job("secret", "a snapshot"), "item-secret");
    const [text, image] = posted(encryptedRoom);
    assert.equal(text?.content.body, "a snapshot");
    assert.equal(image?.content.msgtype, "m.image");
    assert.equal("url" in image!.content, false);
    const file = image!.content.file as EncryptedFile;
    assert.equal(file.v, "v2");
    assert.deepEqual(image!.content.info, { mimetype: "image/png", size: photo.length });
    const media = h.hs.mediaContent(file.url)!;
    assert.equal(media.contentType, "application/octet-stream");
    assert.equal(media.filename, undefined);
    assert.ok(!media.data.equals(photo));
    assert.ok(decryptAttachment(media.data, file).equals(photo));
  });

  test("into a plain room: `url`, the file itself, named and typed, as before", async () => {
    await delivery.deliver(job("open", "another"), "item-open");
    const [, image] = posted(plainRoom);
    assert.equal("file" in image!.content, false);
    const media = h.hs.mediaContent(String(image!.content.url))!;
    assert.equal(media.contentType, "image/png");
    assert.equal(media.filename, "snap.png");
    assert.ok(media.data.equals(photo));
  });
});
