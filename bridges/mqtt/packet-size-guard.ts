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

/** Why a connection was closed: the size its packet announced, or what was wrong with it. */
export type Refusal = number | "malformed" | "not-connect";

/**
 * The first packet, sent before the client is authenticated, must be a CONNECT [MQTT-3.1.0-1] of
 * at most `maxFirstPacketBytes`: a connection is closed at its first byte otherwise, or as the
 * CONNECT's header arrives.
 */
export function guardPacketSize(
  stream: Duplex,
  maxPacketBytes: number,
  onRefused: (declaredBytes: Refusal) => void,
  maxFirstPacketBytes = maxPacketBytes,
): void {
  let bodyLeft = 0; // bytes of the current packet's body still to come
  let inHeader = false; // reading a remaining-length field
  let first = true; // the first packet (CONNECT)
  let length = 0;
  let lengthBytes = 0;
  const refuse = (reason: Refusal) => {
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
        // packet type and flags: CONNECT is 0x10 [MQTT-2.2.2-2]
        if (first && chunk[i] !== 0x10) return refuse("not-connect");
        i++;
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
        if (length > (first ? maxFirstPacketBytes : maxPacketBytes)) return refuse(length);
        first = false;
        inHeader = false;
        bodyLeft = length;
      }
    }
  };
  stream.on("data", watch);
}
