/** External MQTT brokers for tests, on free ports: Mosquitto when installed, else aedes over TCP. */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { chmodSync, mkdtempSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Aedes } from "aedes";
import mqtt from "mqtt";
import { freePort, waitFor } from "./fixture.js";

export interface Broker {
  port: number;
  kind: "mosquitto" | "aedes";
  stop(): Promise<void>;
}

export const hasMosquitto = !spawnSync("mosquitto", ["-h"]).error;

export interface MosquittoOptions {
  /**
   * Sessions kept in a persistence file of the broker's own (saved every second), and offline
   * queues without a length limit (Mosquitto drops beyond 1,000 queued messages by default).
   */
  persistent?: boolean;
}

/**
 * A Mosquitto of its own (anonymous, loopback, no persistence unless asked) on `port` (default: a
 * free one); undefined when not installed.
 */
export async function startMosquitto(
  port?: number,
  opts: MosquittoOptions = {},
): Promise<Broker | undefined> {
  if (!hasMosquitto) return undefined;
  port ??= await freePort();
  const dir = mkdtempSync(join(tmpdir(), "tribridge-mosquitto-"));
  // Started as root, Mosquitto runs as user mosquitto: without this it cannot save its persistence file.
  if (opts.persistent) chmodSync(dir, 0o777);
  const conf = join(dir, "mosquitto.conf");
  const persistence = opts.persistent
    ? `persistence true\npersistence_location ${dir}/\nautosave_interval 1\nmax_queued_messages 0\n`
    : "persistence false\n";
  writeFileSync(conf, `listener ${port} 127.0.0.1\nallow_anonymous true\n${persistence}`);
  const child: ChildProcess = spawn("mosquitto", ["-c", conf], { stdio: "ignore" });
  await waitFor(
    "mosquitto",
    () =>
      new Promise<boolean>((resolve) => {
        const c = mqtt.connect(`mqtt://127.0.0.1:${port}`, { reconnectPeriod: 0, connectTimeout: 500 });
        c.once("connect", () => (c.end(true), resolve(true)));
        c.once("error", () => (c.end(true), resolve(false)));
      }),
  );
  return {
    port,
    kind: "mosquitto",
    stop: async () => {
      child.kill("SIGTERM");
      await new Promise((r) => child.once("exit", r));
    },
  };
}

export async function startExternalBroker(): Promise<Broker> {
  const mosquitto = await startMosquitto();
  if (mosquitto) return mosquitto;
  const port = await freePort();
  const broker = await Aedes.createBroker();
  const server: Server = createServer(broker.handle);
  await new Promise<void>((r) => server.listen(port, "127.0.0.1", () => r()));
  return {
    port,
    kind: "aedes",
    stop: async () => {
      await new Promise<void>((r) => broker.close(() => r()));
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

/** The route the external-broker tests use: device states in (as the topic level), chat both ways. */
export const PLANT_ROUTE = {
  id: "plant",
  room: "#plant:test.local",
  endpoints: [
    { account: "mqtt.plant", direction: "in", topic: "plant/+/state", sender: { topicLevel: 2 } },
    { account: "mqtt.plant", direction: "inout", topic: "plant/chat" },
  ],
};
