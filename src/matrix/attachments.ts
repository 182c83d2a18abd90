/**
 * Files between rooms and far sides: the caps every attachment is checked against before any part
 * of its message is relayed, the msgtype of a file event, the file of a room message, and the
 * upload of a far side's file into a room — encrypted when the room's events are (Client-Server
 * API §Sending encrypted attachments).
 */
import type { Attachment, Capabilities } from "../connector.js";
import { PermanentError, RetryableError } from "../errors.js";
import {
  decryptAttachment,
  encryptAttachment,
  encryptedFileOf,
  type EncryptedFile,
} from "./crypto/encrypted-attachments.js";
import type { MatrixClient } from "./matrix-client.js";

export type AttachmentLimits = Pick<Capabilities, "maxAttachmentBytes" | "maxAttachments">;

/** The largest file downloaded for a far side that does not say (`Capabilities.maxAttachmentBytes`). */
export const DEFAULT_MAX_ATTACHMENT_BYTES = 16 * 1024 * 1024;

/** The size of a file carried as base64, without decoding it. */
export function attachmentBytes(attachment: Attachment): number {
  return Buffer.byteLength(attachment.dataBase64, "base64");
}

/**
 * Fails a message, whole, that has more files than `limits` allow or one larger: before any part
 * of it is relayed, so nothing is half-posted. `who` names whose limit it is, for the reason.
 */
export function checkAttachments(
  files: readonly { name: string; bytes: number }[],
  limits: AttachmentLimits,
  who: string,
): void {
  const { maxAttachments, maxAttachmentBytes } = limits;
  if (maxAttachments !== undefined && files.length > maxAttachments)
    throw new PermanentError(
      `${files.length} attachments; ${who} takes at most ${maxAttachments} per message`,
    );
  for (const { name, bytes } of files) {
    if (maxAttachmentBytes !== undefined && bytes > maxAttachmentBytes)
      throw new PermanentError(
        `attachment "${name}" of ${bytes} bytes; ${who} takes at most ${maxAttachmentBytes} bytes per file`,
      );
  }
}

/** The same kind of error, its reason led by the file it is about. */
export function aboutFile(name: string, bytes: number | undefined, err: unknown): unknown {
  const what = bytes === undefined ? `attachment "${name}"` : `attachment "${name}" of ${bytes} bytes`;
  if (err instanceof PermanentError) return new PermanentError(`${what}: ${err.message}`);
  if (err instanceof RetryableError)
    return new RetryableError(`${what}: ${err.message}`, err.retryAfterMs, err.retry);
  return err;
}

/** Client-Server API §m.room.message msgtypes: m.image, m.audio and m.video by MIME type, else m.file. */
export function fileMsgtype(mimeType: string): "m.image" | "m.audio" | "m.video" | "m.file" {
  switch (mimeType.slice(0, mimeType.indexOf("/")).trim().toLowerCase()) {
    case "image":
      return "m.image";
    case "audio":
      return "m.audio";
    case "video":
      return "m.video";
    default:
      return "m.file";
  }
}

const MEDIA_MSGTYPES = new Set(["m.file", "m.image", "m.audio", "m.video"]);

/**
 * Where a file event's media is: in the clear at `url`, or encrypted, described by `file` (an
 * EncryptedFile, in place of `url`: Client-Server API §Sending encrypted attachments).
 */
export type MediaSource = { url: string } | { file: EncryptedFile };

/**
 * The files of a room message, downloaded for a far side (a Matrix event carries at most one):
 * empty for any other message. One over the far side's limits fails the message permanently, as
 * does an encrypted one whose `file` is malformed or whose ciphertext does not match its hash.
 */
export async function downloadAttachments(
  matrix: Pick<MatrixClient, "download">,
  content: Record<string, unknown>,
  limits: AttachmentLimits,
): Promise<Attachment[]> {
  const { msgtype, url, file, info, filename } = content;
  if (!MEDIA_MSGTYPES.has(String(msgtype))) return [];
  if (file === undefined && typeof url !== "string") return [];
  const declared = (info ?? {}) as { mimetype?: unknown; size?: unknown };
  // `filename` is set when `body` is a caption (Client-Server API §m.file, v1.10).
  const name = String(typeof filename === "string" ? filename : (content.body ?? "file"));
  let encrypted: EncryptedFile | undefined;
  try {
    // Checked whole before anything is downloaded.
    encrypted = file === undefined ? undefined : encryptedFileOf(file);
  } catch (err) {
    throw aboutFile(name, undefined, err);
  }
  const files = [
    {
      name,
      url: encrypted?.url ?? (url as string),
      mimeType: typeof declared.mimetype === "string" ? declared.mimetype : undefined,
      // What the sender says: checked at once; the download stops at the limit whatever it said.
      // AES-CTR ciphertext is as long as the file, so the same limit holds for an encrypted one.
      bytes: typeof declared.size === "number" ? declared.size : 0,
    },
  ];
  const max = limits.maxAttachmentBytes ?? DEFAULT_MAX_ATTACHMENT_BYTES;
  checkAttachments(files, { ...limits, maxAttachmentBytes: max }, "the far side");
  const attachments: Attachment[] = [];
  for (const f of files) {
    try {
      const { data, mimeType } = await matrix.download(f.url, max);
      attachments.push({
        name: f.name,
        // The media repository's type of an encrypted file is that of its ciphertext: not used.
        mimeType: f.mimeType ?? (encrypted ? undefined : mimeType) ?? "application/octet-stream",
        dataBase64: (encrypted ? decryptAttachment(data, encrypted) : data).toString("base64"),
      });
    } catch (err) {
      throw aboutFile(f.name, undefined, err);
    }
  }
  return attachments;
}

/**
 * Uploads a far side's file as `sender`, for an event in a room: encrypted when `encrypted` (the
 * room's events are: MatrixClient.encryptsIn), as the spec asks of files in encrypted rooms.
 * Encrypted, the media repository gets the ciphertext alone: no name, no type.
 */
export async function uploadAttachment(
  matrix: Pick<MatrixClient, "upload">,
  sender: { userId: string; displayName: string },
  encrypted: boolean,
  data: Uint8Array,
  name: string,
  mimeType: string,
): Promise<MediaSource> {
  if (!encrypted) return { url: await matrix.upload(sender, data, name, mimeType) };
  const { ciphertext, file } = encryptAttachment(data);
  const url = await matrix.upload(sender, ciphertext, undefined, "application/octet-stream");
  return { file: { url, ...file } };
}
