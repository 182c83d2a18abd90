/**
 * Embedded brokers for one describe block: each on port 0 with keys of its own under one fresh
 * prefix in the shared Redis; what they take in is in `ingested`. `stop()` ends the clients the
 * tests registered, stops the brokers and deletes the keys.
 */
import { randomUUID } from "node:crypto";
import type { MqttClient } from "mqtt";
import type { Logger } from "pino";
import { EmbeddedBroker, type IncomingPublish } from "../../bridges/mqtt/embedded-broker.js";
import { embeddedBrokerSchema } from "../../bridges/mqtt/schema.js";
import { REDIS_URL, deleteKeys } from "./fixture.js";

export function embeddedBrokers(log: Logger) {
  const prefix = `test-${randomUUID().slice(0, 8)}`;
  const ingested: IncomingPublish[] = [];
  const brokers: EmbeddedBroker[] = [];
  const clients: MqttClient[] = [];
  return {
    ingested,
    /** Clients to end at stop(). */
    clients,
    /** A broker with `config` (over port 0), started. */
    async start(config: Record<string, unknown>): Promise<EmbeddedBroker> {
      const broker = new EmbeddedBroker(
        embeddedBrokerSchema.parse({ port: 0, ...config }),
        log,
        async (msg) => void ingested.push(msg),
        { url: REDIS_URL, keyPrefix: `${prefix}:${brokers.length}:` },
      );
      brokers.push(broker);
      await broker.start();
      return broker;
    },
    async stop(): Promise<void> {
      await Promise.all(clients.map((c) => c.endAsync(true)));
      for (const b of brokers) await b.stop();
      await deleteKeys(prefix);
    },
  };
}
