/**
 * Closes a connection whose next MQTT packet declares more bytes than it may carry, as soon as its
 * fixed header arrives. aedes' parser buffers a whole packet before anything checks it (the size
 * limit, even authentication): without this, one connection could make the broker hold up to
 * 256 MB per packet (MQTT 3.1.1 §2.2.3: the remaining length goes up to 268,435,455).
 *
 * It watches the bytes aedes reads ('data' is emitted by read() while aedes drives the stream with
 * 'readable'), so it neither copies nor changes the flow.
 */
import type { Duplex } from "node:stream";

/** Room around a payload for the rest of a PUBLISH: topic (≤ 65,535 bytes), packet id, length fields. */
export const PACKET_OVERHEAD_BYTES = 65_536 + 16;

export function guardPacketSize(
  stream: Duplex,
  maxPacketBytes: number,
  onRefused: (declaredBytes: number | "malformed") => void,
): void {
  let bodyLeft = 0; // bytes of the current packet's body still to come
  let inHeader = false; // reading a remaining-length field
  let length = 0;
  let lengthBytes = 0;
  const refuse = (reason: number | "malformed") => {
    stream.removeListener("data", watch);
    onRefused(reason);
    stream.destroy();
  };
  const watch = (chunk: Buffer) => {
    let i = 0;
    while (i < chunk.length) {
      if (bodyLeft > 0) {
        const n = Math.min(bodyLeft, chunk.length - i);
        bodyLeft -= n;
        i += n;
      } else if (!inHeader) {
        i++; // packet type and flags
        inHeader = true;
        length = 0;
        lengthBytes = 0;
      } else {
        const byte = chunk[i++]!;
        length += (byte & 0x7f) * 128 ** lengthBytes++;
        if (byte & 0x80) {
          if (lengthBytes === 4) return refuse("malformed"); // [MQTT-2.2.3]: at most 4 bytes
          continue;
        }
        if (length > maxPacketBytes) return refuse(length);
        inHeader = false;
        bodyLeft = length;
      }
    }
  };
  stream.on("data", watch);
}
