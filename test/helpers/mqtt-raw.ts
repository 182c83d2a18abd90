/**
 * MQTT 3.1.1 packets built byte by byte, for what mqtt.js will not send: ill-formed UTF-8, an
 * UNSUBSCRIBE without topics, an MQTT 5 CONNECT to a 3.1.1 broker. Strings are given as bytes
 * (a Buffer) or as text (encoded as UTF-8).
 */
import { createConnection, type Socket } from "node:net";
import { waitFor } from "./fixture.js";

type Bytes = Buffer | string;
const bytes = (s: Bytes) => (typeof s === "string" ? Buffer.from(s, "utf8") : s);

/** [MQTT-1.5.3] a UTF-8 encoded string: two bytes of length, then the bytes. */
export function mqttString(s: Bytes): Buffer {
  const b = bytes(s);
  return Buffer.concat([Buffer.from([b.length >> 8, b.length & 0xff]), b]);
}

/** [MQTT-2.2.3] fixed header (type and flags, remaining length) and body. */
export function packet(typeAndFlags: number, ...body: Buffer[]): Buffer {
  const rest = Buffer.concat(body);
  const length: number[] = [];
  let n = rest.length;
  do {
    let byte = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) byte |= 0x80;
    length.push(byte);
  } while (n > 0);
  return Buffer.concat([Buffer.from([typeAndFlags, ...length]), rest]);
}

export interface ConnectFields {
  clientId: Bytes;
  clean?: boolean;
  username?: Bytes;
  password?: Bytes;
  will?: { topic: Bytes; payload?: Bytes };
  /** 4 = MQTT 3.1.1 (default), 5 = MQTT 5 (an empty property list is added where 5 has one) */
  protocolLevel?: number;
  keepaliveSec?: number;
}

export function connect(c: ConnectFields): Buffer {
  const level = c.protocolLevel ?? 4;
  const v5 = level === 5 ? [Buffer.from([0])] : [];
  let flags = c.clean === false ? 0 : 0x02;
  const payload = [mqttString(c.clientId)];
  if (c.will) {
    flags |= 0x04;
    payload.push(...v5, mqttString(c.will.topic), mqttString(c.will.payload ?? "gone"));
  }
  if (c.username !== undefined) {
    flags |= 0x80;
    payload.push(mqttString(c.username));
  }
  if (c.password !== undefined) {
    flags |= 0x40;
    payload.push(mqttString(c.password));
  }
  const keepalive = c.keepaliveSec ?? 30;
  return packet(
    0x10,
    mqttString("MQTT"),
    Buffer.from([level, flags, keepalive >> 8, keepalive & 0xff]),
    ...v5,
    ...payload,
  );
}

export function publish(
  topic: Bytes,
  payload: Bytes,
  qos: 0 | 1 | 2 = 1,
  messageId = 1,
  dup = false,
): Buffer {
  const id = qos > 0 ? [Buffer.from([messageId >> 8, messageId & 0xff])] : [];
  return packet(0x30 | (dup ? 0x08 : 0) | (qos << 1), mqttString(topic), ...id, bytes(payload));
}

/** [MQTT-3.6.1-1] PUBREL has flags 0010. */
export const pubrel = (messageId: number) => Buffer.from([0x62, 2, messageId >> 8, messageId & 0xff]);

export function subscribe(messageId: number, ...filters: Bytes[]): Buffer {
  const pairs = filters.map((f) => Buffer.concat([mqttString(f), Buffer.from([1])]));
  return packet(0x82, Buffer.from([messageId >> 8, messageId & 0xff]), ...pairs);
}

export function unsubscribe(messageId: number, ...filters: Bytes[]): Buffer {
  return packet(0xa2, Buffer.from([messageId >> 8, messageId & 0xff]), ...filters.map(mqttString));
}

/** A TCP connection that keeps every byte the broker sends and notes when it is closed. */
export class RawClient {
  readonly received: number[] = [];
  closed = false;
  private constructor(private readonly socket: Socket) {
    socket.on("data", (d: Buffer) => this.received.push(...d));
    socket.on("close", () => (this.closed = true));
    socket.on("error", () => undefined); // a reset by the broker is what some tests want
  }

  static async open(port: number): Promise<RawClient> {
    const socket = createConnection(port, "127.0.0.1");
    await new Promise<void>((resolve, reject) => {
      socket.once("connect", () => resolve());
      socket.once("error", reject);
    });
    return new RawClient(socket);
  }

  send(...packets: Buffer[]): this {
    for (const p of packets) this.socket.write(p);
    return this;
  }

  /** Waits for the first `n` bytes the broker sends. */
  async reply(n: number, timeoutMs = 2000): Promise<number[]> {
    await waitFor(`${n} bytes from the broker`, () => this.received.length >= n || this.closed, timeoutMs);
    return this.received.slice(0, n);
  }

  async waitClosed(timeoutMs = 2000): Promise<void> {
    await waitFor("the broker to close the connection", () => this.closed, timeoutMs);
  }

  close(): void {
    this.socket.destroy();
  }
}

/** CONNACK [MQTT-3.2]: 0x20, remaining length 2, session present flag, return code. */
export const connack = (sessionPresent: 0 | 1, returnCode: number) => [0x20, 2, sessionPresent, returnCode];
