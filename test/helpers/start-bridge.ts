/** Starts a whole bridge in-process, as the e2e tests do, and says where its listeners are. */
import { connectors } from "../../bridges/index.js";
import type { MqttConnector } from "../../bridges/mqtt/connector.js";
import { start, type RunningBridge, type StartOptions } from "../../src/app.js";

export interface StartedBridge {
  bridge: RunningBridge;
  /** What the bridge's listeners bound (configs in tests ask for port 0, any free port). */
  ports: {
    /** The TCP port of the embedded broker of account mqtt.home. */
    mqtt: number;
  };
}

/**
 * `start` with the registered connectors; `options` is a Harness, or its config and registration
 * changed. The config must have an embedded broker as mqtt.home.
 */
export async function startBridge(
  options: Pick<StartOptions, "config" | "registration">,
): Promise<StartedBridge> {
  const bridge = await start({ config: options.config, registration: options.registration, connectors });
  const broker = (bridge.connector("mqtt.home") as MqttConnector | undefined)?.ports;
  if (!broker) {
    await bridge.stop();
    throw new Error("startBridge: the config has no embedded broker as mqtt.home");
  }
  return { bridge, ports: { mqtt: broker.tcp } };
}
