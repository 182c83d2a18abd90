import { test } from "node:test";
import assert from "node:assert/strict";
import { createCipheriv, createHash } from "node:crypto";
import { PermanentError } from "../../src/errors.js";
import {
  decryptAttachment,
  encryptAttachment,
  encryptedFileOf,
  type EncryptedFileKeys,
} from "../../src/matrix/crypto/encrypted-attachments.js";
import { downloadAttachments, uploadAttachment } from "../../src/matrix/attachments.js";

const UNPADDED_BASE64 = /^[A-Za-z0-9+/]+$/;
const URLSAFE_UNPADDED_BASE64 = /^[A-Za-z0-9_-]+$/;

function bytes(n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + 7) & 0xff;
  return b;
}

/** A valid EncryptedFile (its keys, without url) with `change` applied at a dotted path. */
function altered(file: EncryptedFileKeys, path: string, value: unknown): Record<string, unknown> {
  const copy = structuredClone(file) as unknown as Record<string, unknown>;
  const keys = path.split(".");
  let at = copy;
  for (const k of keys.slice(0, -1)) at = at[k] as Record<string, unknown>;
  if (value === undefined) delete at[keys.at(-1)!];
  else at[keys.at(-1)!] = value;
  return copy;
}

function rejects(fn: () => unknown, message: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof PermanentError, `a PermanentError, not ${String(err)}`);
    assert.match(err.message, message);
    return true;
  });
}

test("[spec: sending encrypted attachments] encrypt: an EncryptedFile of the spec's shape, v2, without url", () => {
  const plain = bytes(1000);
  const { ciphertext, file } = encryptAttachment(plain);
  assert.deepEqual(Object.keys(file).sort(), ["hashes", "iv", "key", "v"]);
  assert.equal(file.v, "v2");
  // JWK: kty oct, key_ops with encrypt and decrypt, alg A256CTR, ext true, k URL-safe unpadded.
  assert.deepEqual(
    { ...file.key, k: undefined },
    { kty: "oct", key_ops: ["encrypt", "decrypt"], alg: "A256CTR", k: undefined, ext: true },
  );
  assert.match(file.key.k, URLSAFE_UNPADDED_BASE64);
  assert.equal(Buffer.from(file.key.k, "base64url").length, 32);
  // iv: 128 bits, unpadded base64; a random 64-bit IV then a 64-bit counter that starts at zero.
  assert.match(file.iv, UNPADDED_BASE64);
  const iv = Buffer.from(file.iv, "base64");
  assert.equal(iv.length, 16);
  assert.ok(iv.subarray(8).equals(Buffer.alloc(8)));
  assert.ok(!iv.subarray(0, 8).equals(Buffer.alloc(8)));
  // hashes.sha256: of the ciphertext, unpadded base64.
  assert.deepEqual(Object.keys(file.hashes), ["sha256"]);
  assert.match(file.hashes.sha256, UNPADDED_BASE64);
  assert.equal(
    file.hashes.sha256,
    createHash("sha256").update(ciphertext).digest("base64").replace(/=+$/, ""),
  );
  // AES-CTR: as long as the plaintext, and not it.
  assert.equal(ciphertext.length, plain.length);
  assert.ok(!ciphertext.equals(plain));
});

test("encrypt: a fresh key and IV for every file (never reused, the spec's warning)", () => {
  const a = encryptAttachment(bytes(64));
  const b = encryptAttachment(bytes(64));
  assert.notEqual(a.file.key.k, b.file.key.k);
  assert.notEqual(a.file.iv, b.file.iv);
  assert.ok(!a.ciphertext.equals(b.ciphertext));
});

test("round trip: decrypt gives back what was encrypted, empty, partial blocks and 1 MiB alike", () => {
  for (const n of [0, 1, 15, 16, 17, 4097, 1 << 20]) {
    const plain = bytes(n);
    const { ciphertext, file } = encryptAttachment(plain);
    assert.ok(decryptAttachment(ciphertext, file).equals(plain), `${n} bytes`);
    assert.ok(decryptAttachment(ciphertext, { ...file, url: "mxc://hs/x" }).equals(plain));
  }
});

test("encrypt matches AES-256 applied block by block to IV ‖ 64-bit big-endian counter (derived independently)", () => {
  // The keystream built from AES-256-ECB, as the spec describes the counter block, not from
  // node's CTR mode: 40 blocks and a partial one.
  const plain = bytes(40 * 16 + 5);
  const { ciphertext, file } = encryptAttachment(plain);
  const key = Buffer.from(file.key.k, "base64url");
  const iv = Buffer.from(file.iv, "base64");
  const blocks = Math.ceil(plain.length / 16);
  const counters = Buffer.alloc(blocks * 16);
  for (let i = 0; i < blocks; i++) {
    iv.copy(counters, i * 16, 0, 8);
    counters.writeBigUInt64BE(BigInt(i), i * 16 + 8);
  }
  const ecb = createCipheriv("aes-256-ecb", key, null).setAutoPadding(false);
  const keystream = Buffer.concat([ecb.update(counters), ecb.final()]);
  const expected = Buffer.from(plain.map((p, i) => p ^ keystream[i]!));
  assert.ok(ciphertext.equals(expected));
});

test("interop: decrypts a file encrypted by matrix-encrypt-attachment 1.0.3 (Element Web's, WebCrypto path)", () => {
  // Made once with the package's lib/webcrypto.js encryptAttachment, under Node 20's WebCrypto.
  const info = {
    v: "v2",
    key: {
      key_ops: ["encrypt", "decrypt"],
      ext: true,
      kty: "oct",
      k: "9K_itr18EF0U_A5qwGQPjP9wdHjACX_58m1s-Qo3BFY",
      alg: "A256CTR",
    },
    iv: "2miiegF5XWIAAAAAAAAAAA",
    hashes: { sha256: "c5zARPmT7AhMlabC1pSWJqs0ihjnOUro/MIPXnHPGaY" },
  };
  const ciphertext = Buffer.from(
    "JxOzIZBD+Ek8OxkVmwxqCI/xsOotmSO2pFgDnQSS3kpe40qXRdVGA9+L7dcR4cd4DInMyIpm/pLzcKITHBobwr6oTmRCk35E2NXrF24OAdg9k88D0Q==",
    "base64",
  );
  assert.equal(
    decryptAttachment(ciphertext, info).toString(),
    "tribridge: a vector from matrix-encrypt-attachment 1.0.3 (WebCrypto path), 3+ blocks.",
  );
});

test("[spec] decrypt checks the ciphertext's SHA-256 before decrypting: one bit changed, cut or grown, it is refused", () => {
  const { ciphertext, file } = encryptAttachment(bytes(100));
  const flipped = Buffer.from(ciphertext);
  flipped[50]! ^= 1;
  const hashMismatch = /encrypted attachment: the ciphertext's SHA-256 is not hashes\.sha256/;
  rejects(() => decryptAttachment(flipped, file), hashMismatch);
  rejects(() => decryptAttachment(ciphertext.subarray(0, 99), file), hashMismatch);
  rejects(() => decryptAttachment(Buffer.concat([ciphertext, Buffer.alloc(1)]), file), hashMismatch);
  // Another file's hash: refused as well.
  const other = encryptAttachment(bytes(100)).file.hashes;
  rejects(() => decryptAttachment(ciphertext, { ...file, hashes: other }), hashMismatch);
});

test("decrypt: a key or IV of the wrong length, or a hash of the wrong length, is refused by name", () => {
  const { ciphertext, file } = encryptAttachment(bytes(32));
  const cases: [string, unknown, RegExp][] = [
    ["key.k", Buffer.alloc(31, 1).toString("base64url"), /key\.k: 31 bytes, not 32/],
    ["key.k", Buffer.alloc(33, 1).toString("base64url"), /key\.k: 33 bytes, not 32/],
    ["key.k", Buffer.alloc(16, 1).toString("base64url"), /key\.k: 16 bytes, not 32/],
    ["iv", Buffer.alloc(15).toString("base64").replace(/=+$/, ""), /iv: 15 bytes, not 16/],
    ["iv", Buffer.alloc(17).toString("base64").replace(/=+$/, ""), /iv: 17 bytes, not 16/],
    ["iv", "", /iv: 0 bytes, not 16/],
    ["hashes.sha256", Buffer.alloc(20).toString("base64"), /hashes\.sha256: 20 bytes, not 32/],
  ];
  for (const [path, value, message] of cases)
    rejects(() => decryptAttachment(ciphertext, altered(file, path, value)), message);
});

test("[spec] decrypt: v1, another version or none, and any required field missing, are refused by name", () => {
  const { ciphertext, file } = encryptAttachment(bytes(32));
  const cases: [string, unknown, RegExp][] = [
    ["v", "v1", /^encrypted attachment: v: "v1", not "v2"$/],
    ["v", "V2", /v: "V2", not "v2"/],
    ["v", undefined, /v: missing, not "v2"/],
    ["key", undefined, /key: not an object/],
    ["key", "secret", /key: not an object/],
    ["key.kty", undefined, /key\.kty: missing, not "oct"/],
    ["key.kty", "RSA", /key\.kty: "RSA", not "oct"/],
    ["key.alg", "A128CTR", /key\.alg: "A128CTR", not "A256CTR"/],
    ["key.alg", undefined, /key\.alg: missing/],
    ["key.key_ops", ["decrypt"], /key\.key_ops: \["decrypt"\]: "encrypt" and "decrypt" are required/],
    ["key.key_ops", ["encrypt"], /key\.key_ops: .*required/],
    ["key.key_ops", "encrypt decrypt", /key\.key_ops: "encrypt decrypt", not an array/],
    ["key.key_ops", undefined, /key\.key_ops: missing, not an array/],
    ["key.ext", false, /key\.ext: false, not true/],
    ["key.ext", undefined, /key\.ext: missing, not true/],
    ["key.k", undefined, /key\.k: missing, not URL-safe unpadded base64/],
    ["iv", undefined, /iv: missing, not unpadded base64/],
    ["hashes", undefined, /hashes: not an object/],
    ["hashes.sha256", undefined, /hashes\.sha256: missing/],
  ];
  for (const [path, value, message] of cases)
    rejects(() => decryptAttachment(ciphertext, altered(file, path, value)), message);
  rejects(() => decryptAttachment(ciphertext, null), /encrypted attachment: not an object/);
  // Other hashes than sha256 are not required to be understood: ignored, sha256 still checked.
  const more = altered(file, "hashes.sha512", "AAAA");
  assert.ok(decryptAttachment(ciphertext, more).equals(bytes(32)));
});

test("[spec] decrypt: key_ops with more than encrypt and decrypt is accepted (must at least contain them)", () => {
  const { ciphertext, file } = encryptAttachment(bytes(20));
  const wider = altered(file, "key.key_ops", ["decrypt", "wrapKey", "encrypt"]);
  assert.ok(decryptAttachment(ciphertext, wider).equals(bytes(20)));
});

test("[spec] decrypt: a counter block whose latter 64 bits do not start at zero is refused", () => {
  const { ciphertext, file } = encryptAttachment(bytes(20));
  const iv = Buffer.from(file.iv, "base64");
  iv[15] = 1;
  rejects(
    () => decryptAttachment(ciphertext, { ...file, iv: iv.toString("base64").replace(/=+$/, "") }),
    /iv: its counter \(the latter 64 bits\) does not start at zero/,
  );
});

test("[spec: unpadded base64] decoding accepts padding (the appendix asks it), but no other alphabet and no wrong padding", () => {
  const { ciphertext, file } = encryptAttachment(bytes(48));
  const padded = {
    ...file,
    iv: `${file.iv}==`,
    hashes: { sha256: `${file.hashes.sha256}=` },
    key: { ...file.key, k: `${file.key.k}=` },
  };
  assert.ok(decryptAttachment(ciphertext, padded).equals(bytes(48)));
  // Node's decoder would skip these characters; they are refused instead.
  rejects(
    () => decryptAttachment(ciphertext, { ...file, iv: `${file.iv.slice(0, 21)}!` }),
    /iv: ".*", not unpadded base64/,
  );
  rejects(() => decryptAttachment(ciphertext, { ...file, iv: ` ${file.iv}` }), /iv: .*not unpadded base64/);
  rejects(() => decryptAttachment(ciphertext, { ...file, iv: `${file.iv}=` }), /iv: .*not unpadded base64/);
  rejects(() => decryptAttachment(ciphertext, { ...file, iv: 16 }), /iv: 16, not unpadded base64/);
  // k is URL-safe base64: the standard alphabet's + and / are not in it.
  const standard = Buffer.alloc(32, 0xfb).toString("base64").replace(/=+$/, "");
  assert.match(standard, /[+/]/);
  rejects(() => decryptAttachment(ciphertext, altered(file, "key.k", standard)), /key\.k: .*not URL-safe/);
  assert.ok(
    decryptAttachment(ciphertext, altered(file, "key.k", Buffer.alloc(32, 0xfb).toString("base64url"))),
    "the same bytes in the URL-safe alphabet are accepted (decrypting to noise: a wrong key is not detectable)",
  );
});

test("[spec] encryptedFileOf: the spec's example image `file` is accepted; no url, or not an mxc:// URI, is refused", () => {
  const example = {
    url: "mxc://example.org/FHyPlCeYUSFFxlgbQYZmoEoe",
    v: "v2",
    key: {
      alg: "A256CTR",
      ext: true,
      k: "aWF6-32KGYaC3A_FEUCk1Bt0JA37zP0wrStgmdCaW-0",
      key_ops: ["encrypt", "decrypt"],
      kty: "oct",
    },
    iv: "w+sE15fzSc0AAAAAAAAAAA",
    hashes: { sha256: "fdSLu/YkRx3Wyh3KQabP3rd6+SFiKg5lsJZQHtkSAYA" },
  };
  assert.equal(encryptedFileOf(example), example);
  rejects(() => encryptedFileOf({ ...example, url: undefined }), /url: not an mxc:\/\/ URI/);
  rejects(() => encryptedFileOf({ ...example, url: "https://example.org/x" }), /url: not an mxc:\/\/ URI/);
  rejects(() => encryptedFileOf({ ...example, v: "v1" }), /v: "v1", not "v2"/);
  rejects(() => encryptedFileOf([example]), /not an object/);
});

// ---- Where the bridge handles files: attachments.ts ----

const ghost = { userId: "@_mqtt_cam:hs", displayName: "cam" };

/** A media repository in memory: what upload stores, download serves (as MatrixClient does). */
function mediaRepository() {
  const stored = new Map<string, { data: Buffer; mimeType: string; name: string | undefined }>();
  return {
    stored,
    async upload(_sender: unknown, data: Uint8Array, name: string | undefined, mimeType: string) {
      const url = `mxc://hs/m${stored.size}`;
      stored.set(url, { data: Buffer.from(data), mimeType, name });
      return url;
    },
    async download(mxc: string, maxBytes: number) {
      const media = stored.get(mxc);
      if (!media) throw new PermanentError(`downloading ${mxc}: 404`);
      if (media.data.length > maxBytes)
        throw new PermanentError(`downloading ${mxc}: larger than ${maxBytes}`);
      return { data: media.data, mimeType: media.mimeType };
    },
  };
}

test("uploadAttachment: into an encrypted room, ciphertext without name or type, and `file` in place of `url`", async () => {
  const repo = mediaRepository();
  const photo = bytes(3000);
  const media = await uploadAttachment(repo, ghost, true, photo, "snap.jpg", "image/jpeg");
  assert.ok("file" in media && !("url" in media));
  const { url, ...keys } = media.file;
  const stored = repo.stored.get(url)!;
  assert.equal(stored.name, undefined);
  assert.equal(stored.mimeType, "application/octet-stream");
  assert.ok(!stored.data.equals(photo));
  assert.ok(decryptAttachment(stored.data, keys).equals(photo));
  // Not encrypted: as before.
  const plain = await uploadAttachment(repo, ghost, false, photo, "snap.jpg", "image/jpeg");
  assert.ok("url" in plain && !("file" in plain));
  assert.deepEqual(
    { ...repo.stored.get(plain.url)!, data: undefined },
    {
      data: undefined,
      mimeType: "image/jpeg",
      name: "snap.jpg",
    },
  );
});

test("downloadAttachments: an event with `file` is downloaded, verified and decrypted, typed by its info", async () => {
  const repo = mediaRepository();
  const photo = bytes(5000);
  const media = await uploadAttachment(repo, ghost, true, photo, "snap.jpg", "image/jpeg");
  const content = {
    msgtype: "m.image",
    body: "snap.jpg",
    info: { mimetype: "image/jpeg", size: 5000 },
    ...media,
  };
  const [file, ...rest] = await downloadAttachments(repo, content, {});
  assert.equal(rest.length, 0);
  assert.deepEqual(
    { ...file, dataBase64: undefined },
    { name: "snap.jpg", mimeType: "image/jpeg", dataBase64: undefined },
  );
  assert.ok(Buffer.from(file!.dataBase64, "base64").equals(photo));
  // Without a declared type: not the ciphertext's application/octet-stream from the repository.
  const { info: _info, ...untyped } = content;
  const [bare] = await downloadAttachments(repo, untyped, {});
  assert.equal(bare!.mimeType, "application/octet-stream");
  assert.ok(Buffer.from(bare!.dataBase64, "base64").equals(photo));
});

test("downloadAttachments: an encrypted file keeps the same limits; a tampered or malformed one fails the message, named", async () => {
  const repo = mediaRepository();
  const media = await uploadAttachment(repo, ghost, true, bytes(2000), "log.txt", "text/plain");
  assert.ok("file" in media);
  const content = { msgtype: "m.file", body: "log.txt", info: { size: 2000 }, ...media };
  await assert.rejects(
    downloadAttachments(repo, content, { maxAttachmentBytes: 1000 }),
    new PermanentError('attachment "log.txt" of 2000 bytes; the far side takes at most 1000 bytes per file'),
  );
  // Declared smaller than it is: the download stops at the limit all the same.
  await assert.rejects(
    downloadAttachments(repo, { ...content, info: { size: 10 } }, { maxAttachmentBytes: 1000 }),
    /attachment "log.txt": downloading mxc:\/\/hs\/m0: larger than 1000/,
  );
  repo.stored.get(media.file.url)!.data[7]! ^= 0x80;
  await assert.rejects(downloadAttachments(repo, content, {}), (err: unknown) => {
    assert.ok(err instanceof PermanentError);
    assert.match(
      err.message,
      /^attachment "log.txt": encrypted attachment: the ciphertext's SHA-256 is not hashes.sha256/,
    );
    return true;
  });
  // Malformed: refused before any download.
  let downloads = 0;
  const counting = {
    download: (...a: Parameters<typeof repo.download>) => (downloads++, repo.download(...a)),
  };
  const v1 = { ...content, file: { ...media.file, v: "v1" } };
  await assert.rejects(
    downloadAttachments(counting, v1, {}),
    new PermanentError('attachment "log.txt": encrypted attachment: v: "v1", not "v2"'),
  );
  assert.equal(downloads, 0);
});
