/** MQTT payload ⇄ message body. Payloads are bytes; rooms want text. */
import type { Attachment, MessageBody, OutboundMessage } from "../../src/connector.js";
import type { MqttEndpoint } from "./schema.js";

export interface DecodedPayload {
  /** A file's text is "": the file is all there is (see InboundMessage.body). */
  body: MessageBody;
  attachment?: Attachment;
  /** Set when the payload was not what the endpoint's format expects (logged by the caller). */
  problem?: string;
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

function decodeUtf8(payload: Uint8Array): string | undefined {
  try {
    return utf8.decode(payload);
  } catch {
    return undefined;
  }
}

/** Image formats told by their first bytes, so a camera's snapshot shows as an image in the room. */
const IMAGE_SIGNATURES: { bytes: number[]; offset?: number; mimeType: string; ext: string }[] = [
  { bytes: [0xff, 0xd8, 0xff], mimeType: "image/jpeg", ext: "jpg" },
  { bytes: [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a], mimeType: "image/png", ext: "png" },
  { bytes: [0x47, 0x49, 0x46, 0x38], mimeType: "image/gif", ext: "gif" },
  { bytes: [0x57, 0x45, 0x42, 0x50], offset: 8, mimeType: "image/webp", ext: "webp" }, // RIFF....WEBP
];

function fileTypeOf(payload: Uint8Array): { mimeType: string; ext: string } {
  const image = IMAGE_SIGNATURES.find(({ bytes, offset = 0 }) =>
    bytes.every((b, i) => payload[offset + i] === b),
  );
  return image ?? { mimeType: "application/octet-stream", ext: "bin" };
}

function asFile(topic: string, payload: Uint8Array, notice: boolean): DecodedPayload {
  const { mimeType, ext } = fileTypeOf(payload);
  const name = `${topic.replaceAll("/", "_")}.${ext}`;
  return {
    body: { text: "", notice },
    attachment: { name, mimeType, dataBase64: Buffer.from(payload).toString("base64") },
  };
}

function lookup(value: unknown, path: string): unknown {
  let node = value;
  for (const key of path.split(".")) {
    if (typeof node !== "object" || node === null || !Object.hasOwn(node, key)) return undefined;
    node = (node as Record<string, unknown>)[key];
  }
  return node;
}

function scalarText(value: unknown): string {
  if (value === undefined) return "";
  if (typeof value === "string") return value;
  return JSON.stringify(value);
}

/** `{{a.b}}` → the value at that path; unknown paths render as empty. */
export function renderTemplate(template: string, value: unknown): string {
  return template.replace(/\{\{\s*([\w.-]+)\s*\}\}/g, (_m, path: string) => scalarText(lookup(value, path)));
}

/** A JSON value as one readable line: `temperature: 21.5 · humidity: 40`. */
export function renderJson(value: unknown): string {
  if (typeof value === "string") return value;
  if (typeof value !== "object" || value === null || Array.isArray(value)) return JSON.stringify(value);
  return Object.entries(value)
    .map(([k, v]) => `${k}: ${scalarText(v)}`)
    .join(" · ");
}

export function decodePayload(topic: string, payload: Uint8Array, ep: MqttEndpoint): DecodedPayload {
  const notice = ep.notice;
  if (ep.format === "binary") return asFile(topic, payload, notice);
  const text = decodeUtf8(payload);
  if (text === undefined) return { ...asFile(topic, payload, notice), problem: "payload is not UTF-8 text" };
  if (ep.format === "text") return { body: { text, notice } };
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    // Devices mix plain states ("ON", "online") with JSON on one topic: shown as they are.
    if (!/^\s*[[{]/.test(text)) return { body: { text, notice } };
    return { body: { text: `(not valid JSON) ${text}`, notice }, problem: "payload is not valid JSON" };
  }
  const rendered = ep.template ? renderTemplate(ep.template, value) : renderJson(value);
  return { body: { text: rendered, notice } };
}

export function encodePayload(message: OutboundMessage, ep: MqttEndpoint): Buffer {
  switch (ep.format) {
    case "text":
      return Buffer.from(message.body.text, "utf8");
    case "json":
      return Buffer.from(
        JSON.stringify({
          sender: message.sender.userId,
          displayName: message.sender.displayName,
          body: message.body.text,
          timestamp: message.timestamp,
        }),
        "utf8",
      );
    case "binary":
      // One file at most (`maxAttachments: 1`): a payload is one file.
      return message.attachments?.[0]
        ? Buffer.from(message.attachments[0].dataBase64, "base64")
        : Buffer.from(message.body.text, "utf8");
  }
}
