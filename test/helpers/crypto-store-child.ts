/**
 * A separate process for the crypto store tests: a restart starts from the snapshot file alone,
 * and a SIGKILL lands wherever the writing is. Prints one JSON line per step on stdout.
 *
 *   tsx crypto-store-child.ts <dir> <userId> <deviceId> keys      open, make the key upload, persist
 *   tsx crypto-store-child.ts <dir> <userId> <deviceId> encrypt   open, then encrypt + persist forever
 */
import { pino } from "pino";
import { EncryptionSettings, RequestType, RoomId } from "@matrix-org/matrix-sdk-crypto-wasm";
import { CryptoStores } from "../../src/matrix/crypto/device-store.js";

const [dir, userId, deviceId, mode] = process.argv.slice(2);
if (!dir || !userId || !deviceId) throw new Error("usage: <dir> <userId> <deviceId> keys|encrypt");
const stores = new CryptoStores(dir, pino({ level: "silent" }));
const machine = await stores.open(userId, deviceId);
const print = (line: object) => process.stdout.write(`${JSON.stringify(line)}\n`);

if (mode === "keys") {
  const upload = (await machine.outgoingRequests()).find((r) => r.type === RequestType.KeysUpload);
  await stores.persist(userId, deviceId);
  print({
    curve25519: machine.identityKeys.curve25519.toBase64(),
    ed25519: machine.identityKeys.ed25519.toBase64(),
    uploadBody: upload?.body,
  });
} else if (mode === "encrypt") {
  const room = new RoomId("!room:example.org");
  await machine.shareRoomKey(room, [], new EncryptionSettings());
  for (let i = 0; ; i++) {
    const content = await machine.encryptRoomEvent(room, "m.room.message", JSON.stringify({ body: `n${i}` }));
    await stores.persist(userId, deviceId);
    print(JSON.parse(content) as object);
  }
} else {
  throw new Error(`unknown mode ${mode}`);
}
