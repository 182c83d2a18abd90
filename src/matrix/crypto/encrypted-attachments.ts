/**
 * Files in end-to-end encrypted rooms (Client-Server API §Sending encrypted attachments, v1.12):
 * the media repository holds AES-256-CTR ciphertext; the event carries, in `file` (or
 * `thumbnail_file`) in place of `url`, an `EncryptedFile` with the key, the counter block and the
 * ciphertext's SHA-256. The event itself is Megolm-encrypted, so the homeserver never sees the key.
 *
 * Everything here is synchronous and in memory: a file is bounded by the attachment size limits
 * (attachments.ts), and AES-CTR keeps the ciphertext as long as the plaintext.
 */
import { createCipheriv, createHash, randomBytes, timingSafeEqual } from "node:crypto";
import { PermanentError } from "../../errors.js";

/** `JWK` of an EncryptedFile: the AES key, as WebCrypto exports it (RFC 7517 with W3C's `ext`). */
export interface AttachmentKey {
  kty: "oct";
  key_ops: string[];
  alg: "A256CTR";
  /** 32 bytes, URL-safe unpadded base64. */
  k: string;
  ext: true;
}

/** `EncryptedFile` (definitions/encrypted_file.yaml). */
export interface EncryptedFile {
  /** The ciphertext's `mxc://` URI. */
  url: string;
  key: AttachmentKey;
  /** The 128-bit counter block, unpadded base64: a random 64-bit IV, then a 64-bit counter from 0. */
  iv: string;
  /** The ciphertext's hashes, unpadded base64; `sha256` is required (other algorithms ignored). */
  hashes: { sha256: string } & Record<string, string>;
  v: "v2";
}

/** What `encryptAttachment` gives, before the ciphertext is uploaded and has a URL. */
export type EncryptedFileKeys = Omit<EncryptedFile, "url">;

const CIPHER = "aes-256-ctr";
const KEY_BYTES = 32;
const IV_BYTES = 16;
const SHA256_BYTES = 32;

/**
 * Encrypts a file for an encrypted room: a fresh key and IV for every file, never reused (an image
 * and its thumbnail each get their own). Returns the ciphertext to upload, and what goes into the
 * event's `file` once its URL is known.
 */
export function encryptAttachment(plaintext: Uint8Array): {
  ciphertext: Buffer;
  file: EncryptedFileKeys;
} {
  const key = randomBytes(KEY_BYTES);
  // [spec] A random 64-bit IV, then the 64-bit counter, which MUST start at zero.
  const iv = Buffer.alloc(IV_BYTES);
  randomBytes(8).copy(iv, 0);
  const ciphertext = ctr(key, iv, plaintext);
  return {
    ciphertext,
    file: {
      v: "v2",
      key: {
        kty: "oct",
        key_ops: ["encrypt", "decrypt"],
        alg: "A256CTR",
        k: key.toString("base64url"),
        ext: true,
      },
      iv: unpadded(iv.toString("base64")),
      hashes: { sha256: unpadded(createHash("sha256").update(ciphertext).digest("base64")) },
    },
  };
}

/**
 * An event's `file` (or `thumbnail_file`) read and checked in full, URL included: a PermanentError
 * naming the field for anything that is not an EncryptedFile as the spec defines it. Done before
 * downloading, so a malformed event costs no download.
 */
export function encryptedFileOf(value: unknown): EncryptedFile {
  if (!isObject(value)) throw malformed("", "not an object");
  if (typeof value.url !== "string" || !value.url.startsWith("mxc://"))
    throw malformed("url", "not an mxc:// URI");
  readKeys(value);
  return value as unknown as EncryptedFile;
}

/**
 * The plaintext of a downloaded encrypted file. Everything is checked first (a PermanentError says
 * what is wrong), then the ciphertext's SHA-256 against `hashes.sha256` (§Sending encrypted
 * attachments: clients MUST verify the hash before using the file), and only then is it decrypted.
 */
export function decryptAttachment(ciphertext: Uint8Array, file: unknown): Buffer {
  if (!isObject(file)) throw malformed("", "not an object");
  const { key, iv, sha256 } = readKeys(file);
  const actual = createHash("sha256").update(ciphertext).digest();
  if (!timingSafeEqual(actual, sha256))
    throw new PermanentError(
      "encrypted attachment: the ciphertext's SHA-256 is not hashes.sha256 (altered, or not this file): not decrypted",
    );
  return ctr(key, iv, ciphertext);
}

/** The key, counter block and SHA-256 of an EncryptedFile, decoded, each checked as the spec says. */
function readKeys(file: Record<string, unknown>): { key: Buffer; iv: Buffer; sha256: Buffer } {
  // [spec] v: Must be `v2`. v1 (and v0, unversioned) counted differently and are not in the spec.
  if (file.v !== "v2") throw malformed("v", `${describe(file.v)}, not "v2"`);
  const jwk = file.key;
  if (!isObject(jwk)) throw malformed("key", "not an object (a JSON Web Key)");
  if (jwk.kty !== "oct") throw malformed("key.kty", `${describe(jwk.kty)}, not "oct"`);
  if (jwk.alg !== "A256CTR") throw malformed("key.alg", `${describe(jwk.alg)}, not "A256CTR"`);
  // [spec] key_ops: Must at least contain `encrypt` and `decrypt`.
  const ops = jwk.key_ops;
  if (!Array.isArray(ops)) throw malformed("key.key_ops", `${describe(ops)}, not an array`);
  if (!ops.includes("encrypt") || !ops.includes("decrypt"))
    throw malformed("key.key_ops", `${describe(ops)}: "encrypt" and "decrypt" are required`);
  // [spec] ext: Must be `true` (W3C WebCrypto's JWK extension).
  if (jwk.ext !== true) throw malformed("key.ext", `${describe(jwk.ext)}, not true`);
  const key = decodeBase64(jwk.k, "base64url", KEY_BYTES, "key.k");
  const iv = decodeBase64(file.iv, "base64", IV_BYTES, "iv");
  // [spec] The latter 64 bits of the counter block MUST start at zero: with a 64-bit counter,
  // nothing of the size of a Matrix file can then wrap it (where 64- and 128-bit counters differ).
  if (iv.readBigUInt64BE(8) !== 0n)
    throw malformed("iv", "its counter (the latter 64 bits) does not start at zero");
  if (!isObject(file.hashes)) throw malformed("hashes", "not an object");
  const sha256 = decodeBase64(file.hashes.sha256, "base64", SHA256_BYTES, "hashes.sha256");
  return { key, iv, sha256 };
}

/** AES-256-CTR both ways (CTR is its own inverse), without copying the output again. */
function ctr(key: Buffer, iv: Buffer, data: Uint8Array): Buffer {
  const cipher = createCipheriv(CIPHER, key, iv);
  const out = cipher.update(data);
  const rest = cipher.final(); // empty: CTR is a stream mode
  return rest.length === 0 ? out : Buffer.concat([out, rest]);
}

/**
 * Strict base64 of an exact length. Node's decoder skips characters outside the alphabet, so the
 * alphabet is checked first. Padding is accepted, as the spec's appendix asks of decoders
 * (§Unpadded Base64: accept input with or without padding), when it is the right amount.
 */
function decodeBase64(value: unknown, alphabet: "base64" | "base64url", bytes: number, path: string): Buffer {
  const what = alphabet === "base64" ? "unpadded base64" : "URL-safe unpadded base64";
  const chars = alphabet === "base64" ? /^[A-Za-z0-9+/]*(={0,2})$/ : /^[A-Za-z0-9_-]*(={0,2})$/;
  const match = typeof value === "string" ? chars.exec(value) : null;
  if (!match || (match[1] !== "" && match.input.length % 4 !== 0))
    throw malformed(path, `${describe(value)}, not ${what}`);
  const decoded = Buffer.from(unpadded(match.input), alphabet);
  if (decoded.length !== bytes) throw malformed(path, `${decoded.length} bytes, not ${bytes}`);
  return decoded;
}

function unpadded(base64: string): string {
  return base64.replace(/=+$/, "");
}

function malformed(path: string, reason: string): PermanentError {
  return new PermanentError(`encrypted attachment: ${path ? `${path}: ` : ""}${reason}`);
}

/** A field's value in an error: short, whatever it is. */
function describe(value: unknown): string {
  if (value === undefined) return "missing";
  const json = JSON.stringify(value);
  return json.length > 60 ? `${json.slice(0, 57)}...` : json;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}
