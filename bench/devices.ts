/**
 * The bench's MQTT devices, in a process of their own: devices are not part of the homeserver, and
 * sharing its event loop would slow the homeserver's answers and so the bridge (each room waits
 * for its last send before the next). `DeviceProcess` drives the child; run directly, this file is
 * the child.
 */
import { fork, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";
import mqtt, { type MqttClient } from "mqtt";

/** Messages go to `bench/<i mod rooms>/t`, in order of i. */
export interface Load {
  count: number;
  rooms: number;
  /** Payloads are `<label><i>`. */
  label: string;
}

type Command =
  | { cmd: "connect"; port: number; clientId: string }
  | ({ cmd: "flood" } & Load)
  | ({ cmd: "paced"; perSecond: number } & Load)
  | { cmd: "end" };

/** When each paced payload was published, in ms since the epoch (comparable with origin_server_ts). */
export type SentAt = Record<string, number>;

export async function publishAll(client: MqttClient, messages: [string, string][]): Promise<void> {
  // Keep a window in flight, as a device library with a send queue does.
  const WINDOW = 200;
  let next = 0;
  await Promise.all(
    Array.from({ length: WINDOW }, async () => {
      while (next < messages.length) {
        const [topic, payload] = messages[next++]!;
        await client.publishAsync(topic, payload, { qos: 1 });
      }
    }),
  );
}

export async function connectWhenUp(port: number, clientId: string): Promise<MqttClient> {
  for (let i = 0; ; i++) {
    try {
      return await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
        clientId,
        reconnectPeriod: 0,
        connectTimeout: 1000,
      });
    } catch (err) {
      if (i > 300) throw err;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

const messagesOf = ({ count, rooms, label }: Load): [string, string][] =>
  Array.from({ length: count }, (_, i) => [`bench/${i % rooms}/t`, `${label}${i}`]);

/** Publishes at a fixed rate, catching up on the clock (not on timer ticks: a late timer does not lower it). */
function paced(client: MqttClient, load: Load, perSecond: number): Promise<SentAt> {
  const messages = messagesOf(load);
  const sentAt: SentAt = {};
  let sent = 0;
  const t0 = performance.now();
  return new Promise((resolve) => {
    const timer = setInterval(() => {
      const due = Math.min(messages.length, Math.floor(((performance.now() - t0) / 1000) * perSecond));
      for (; sent < due; sent++) {
        const [topic, payload] = messages[sent]!;
        sentAt[payload] = performance.timeOrigin + performance.now();
        void client.publishAsync(topic, payload, { qos: 1 });
      }
      if (sent >= messages.length) {
        clearInterval(timer);
        resolve(sentAt);
      }
    }, 5);
  });
}

/** The parent's handle on the device process. */
export class DeviceProcess {
  private readonly child: ChildProcess;

  constructor() {
    this.child = fork(fileURLToPath(import.meta.url), [], { execArgv: ["--import", "tsx"] });
    process.once("exit", () => this.child.kill("SIGKILL"));
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  private ask<T>(command: Command): Promise<T> {
    return new Promise((resolve, reject) => {
      const onExit = (code: number | null) => reject(new Error(`device process exited (${code})`));
      this.child.once("exit", onExit);
      this.child.once("message", (reply) => {
        this.child.off("exit", onExit);
        resolve(reply as T);
      });
      this.child.send(command);
    });
  }

  connect(port: number, clientId: string): Promise<void> {
    return this.ask({ cmd: "connect", port, clientId });
  }

  /** Publishes as fast as a 200-message window allows; resolves once all are PUBACKed. */
  flood(load: Load): Promise<void> {
    return this.ask({ cmd: "flood", ...load });
  }

  paced(load: Load, perSecond: number): Promise<SentAt> {
    return this.ask({ cmd: "paced", perSecond, ...load });
  }

  async end(): Promise<void> {
    await this.ask({ cmd: "end" });
  }
}

// The child: one device connection, driven over IPC.
if (process.send && process.argv[1] === fileURLToPath(import.meta.url)) {
  let client: MqttClient | undefined;
  process.on("message", (command: Command) => {
    const reply = (value: unknown) => process.send!(value ?? null);
    const run = async () => {
      switch (command.cmd) {
        case "connect":
          client = await connectWhenUp(command.port, command.clientId);
          return reply(null);
        case "flood":
          await publishAll(client!, messagesOf(command));
          return reply(null);
        case "paced":
          return reply(await paced(client!, command, command.perSecond));
        case "end":
          await client?.endAsync();
          reply(null);
          process.disconnect();
      }
    };
    run().catch((err: unknown) => {
      console.error(err);
      process.exit(1);
    });
  });
}
