/**
 * Rules of MQTT 3.1.1 that aedes' parser (mqtt-packet) does not check, applied as each packet is
 * parsed, before aedes acts on it; a packet that breaks one closes the connection, as the spec asks
 * of malformed packets and protocol violations [MQTT-4.8.0-1]:
 *
 * - [MQTT-1.5.3-1] every string (client id, will topic, user name, topic, filter) is well-formed
 *   UTF-8. mqtt-packet decodes strings leniently, an ill-formed sequence becoming U+FFFD, so a
 *   device could publish to (and be relayed from) a topic other than the one it sent.
 * - [MQTT-1.5.3-2] no string holds U+0000.
 * - [MQTT-3.8.3-3] a SUBSCRIBE, [MQTT-3.10.3-2] an UNSUBSCRIBE, names at least one topic filter
 *   (an UNSUBSCRIBE without one would reach Redis as an HDEL without fields).
 *
 * It wraps two methods of the connection's parser, `client._parser` (aedes and mqtt-packet
 * internals: see test/unit/dependency-internals.test.ts).
 */
import { isUtf8 } from "node:buffer";
import type { Client } from "aedes";

/** What the guard uses of mqtt-packet's Parser. */
interface ParserInternals {
  /** The bytes of the packet being parsed (a BufferList) and the read position in them. */
  _list: { slice(start: number, end: number): Buffer };
  _pos: number;
  packet: { cmd?: string; subscriptions?: unknown[]; unsubscriptions?: unknown[] };
  error: Error | null;
  /** Reads a length-prefixed string at _pos; null when the packet is too short. */
  _parseString(...args: unknown[]): string | null;
  /** Parses a whole packet's body once it has arrived; true when it did. */
  _parsePayload(...args: unknown[]): boolean;
  /** Ends the parse; aedes closes the connection on the parser's "error". */
  _emitError(err: Error): void;
}

/** Why `decoded` (the string as mqtt-packet decoded `raw()`) is not a valid MQTT string. */
export function stringProblem(decoded: string, raw: () => Uint8Array): string | undefined {
  if (decoded.includes("\u0000")) return "U+0000 in a string [MQTT-1.5.3-2]";
  // A lenient decode turns each ill-formed sequence into U+FFFD: only then are the bytes looked at.
  if (decoded.includes("\uFFFD") && !isUtf8(raw())) return "ill-formed UTF-8 in a string [MQTT-1.5.3-1]";
  return undefined;
}

function packetProblem(packet: ParserInternals["packet"]): string | undefined {
  if (packet.cmd === "subscribe" && packet.subscriptions?.length === 0)
    return "SUBSCRIBE without topic filters [MQTT-3.8.3-3]";
  if (packet.cmd === "unsubscribe" && packet.unsubscriptions?.length === 0)
    return "UNSUBSCRIBE without topic filters [MQTT-3.10.3-2]";
  return undefined;
}

/**
 * Checks every packet `client` sends; `onMalformed` hears why one closed the connection, and in
 * which kind of packet (e.g. "CONNECT").
 */
export function guardMalformedPackets(
  client: Client,
  onMalformed: (problem: string, packet: string) => void,
): void {
  const parser = (client as unknown as { _parser: ParserInternals })._parser;
  const { _parseString: parseString, _parsePayload: parsePayload } = parser;
  const refuse = (problem: string) => {
    if (parser.error) return; // already refused: one packet, one error
    onMalformed(problem, parser.packet.cmd?.toUpperCase() ?? "?");
    parser._emitError(new Error(problem));
  };
  parser._parseString = function (this: ParserInternals, ...args) {
    const lengthAt = this._pos;
    const decoded = parseString.apply(this, args);
    if (decoded === null) return decoded;
    const problem = stringProblem(decoded, () => this._list.slice(lengthAt + 2, this._pos));
    if (problem) refuse(problem); // the packet is parsed to its end, and then not handed to aedes
    return decoded;
  };
  parser._parsePayload = function (this: ParserInternals, ...args) {
    const parsed = parsePayload.apply(this, args);
    if (parsed && !this.error) {
      const problem = packetProblem(this.packet);
      if (problem) refuse(problem);
    }
    return parsed;
  };
}
