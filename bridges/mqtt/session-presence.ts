/**
 * Session Present as MQTT 3.1.1 defines it: 1 whenever the broker holds a session for the client
 * id [MQTT-3.2.2-2], that is from a CONNECT with cleanSession 0 until one with cleanSession 1
 * [MQTT-3.1.2-4, 3.1.2-6]. aedes answers 1 only for a session with subscriptions, so a device that
 * only publishes was told "no session" on every reconnect, and nothing it re-sent could be told
 * apart from a new message (see redelivery.ts).
 *
 * Sessions are recorded in Redis, a key per client id kept for `ttlSec` after its last CONNECT,
 * and the CONNACK aedes writes is corrected as it goes out: aedes writes every packet through
 * mqtt-packet's writeToStream, looked up at each call (an internal, checked in
 * test/unit/dependency-internals.test.ts).
 */
import { createRequire } from "node:module";
import type { Aedes, Client } from "aedes";
import type { Redis } from "ioredis";

interface PacketOut {
  cmd?: string;
  returnCode?: number;
  sessionPresent?: boolean;
}
type WriteToStream = (packet: PacketOut, stream: object, options?: unknown) => boolean;

/** Connections (aedes' client.conn) whose next accepting CONNACK says session present. */
const resuming = new WeakSet<object>();
let correcting = false;

/** Once per process: the mqtt-packet aedes uses writes CONNACKs with the recorded sessions. */
function correctConnacks(): void {
  if (correcting) return;
  correcting = true;
  const mqttPacket = createRequire(import.meta.resolve("aedes"))("mqtt-packet") as {
    writeToStream: WriteToStream;
  };
  // A Proxy, so the function's own properties (mqtt.js sets writeToStream.cacheNumbers) stay its.
  mqttPacket.writeToStream = new Proxy(mqttPacket.writeToStream, {
    apply(write, self, args: Parameters<WriteToStream>) {
      const [packet, stream] = args;
      // [MQTT-3.2.2-4] a refused connection says 0
      if (packet.cmd === "connack" && packet.returnCode === 0 && resuming.delete(stream)) {
        packet.sessionPresent = true;
      }
      return Reflect.apply(write, self, args);
    },
  });
}

export class SessionPresence {
  /** What each client's CONNACK said. */
  private readonly told = new WeakMap<Client, boolean>();

  constructor(
    private readonly redis: Redis,
    private readonly ttlSec: number,
  ) {
    correctConnacks();
  }

  /** Notes the Session Present each CONNACK carried, aedes' or ours. */
  attach(broker: Aedes): void {
    broker.on("connackSent", (packet, client) => this.told.set(client, packet.sessionPresent));
  }

  /**
   * At CONNECT, once the client is admitted and before aedes answers: a session starts or carries
   * on (cleanSession 0), or ends (1: [MQTT-3.2.2-1] session present 0).
   */
  async open(client: Client): Promise<void> {
    const key = `session:${client.id}`;
    if (client.clean) {
      await this.redis.del(key);
      return;
    }
    const replies = await this.redis.multi().exists(key).set(key, "1", "EX", this.ttlSec).exec();
    const [error, existed] = replies?.[0] ?? [new Error("transaction discarded"), 0];
    if (error) throw error;
    if (existed === 1) resuming.add(client.conn);
  }

  /** Whether `client` was told its session was there (it may then re-send what it had in flight). */
  resumed(client: Client): boolean {
    return this.told.get(client) ?? false;
  }
}
