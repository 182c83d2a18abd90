/**
 * The core with a test connector and one route, "chat": the room #chat:test.local, created by alice,
 * and channel "general" of account test.a, both ways; the bridge started in-process.
 */
import { start, type RunningBridge } from "../../src/app.js";
import type { ConnectorDefinition } from "../../src/connector.js";
import { harness, type Harness } from "./fixture.js";
import { testConnector, type TestConnector } from "./test-connector.js";

export interface TestChat {
  connectors: readonly ConnectorDefinition[];
  h: Harness;
  bridge: RunningBridge;
  room: string;
  remote: TestConnector;
  /** Stops the bridge and cleans the harness up. */
  stop(): Promise<void>;
}

export async function startTestChat(): Promise<TestChat> {
  const connectors = [testConnector()];
  const h = await harness({
    connectors,
    bridges: { test: { a: {} } },
    routes: [
      {
        id: "chat",
        room: "#chat:test.local",
        endpoints: [{ account: "test.a", direction: "inout", channel: "general" }],
      },
    ],
  });
  const room = h.hs.createRoom({ creator: h.alice, alias: "#chat:test.local", preset: "public_chat" });
  const bridge = await start({ config: h.config, registration: h.registration, connectors });
  const remote = bridge.connector("test.a") as TestConnector;
  return {
    connectors,
    h,
    bridge,
    room,
    remote,
    stop: async () => {
      await bridge.stop();
      await h.cleanup();
    },
  };
}
