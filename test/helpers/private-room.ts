/** A bridge whose one route leads into a private room that has not invited the bot yet. */
import type { RunningBridge } from "../../src/app.js";
import { harness, type Harness } from "./fixture.js";
import { startBridge } from "./start-bridge.js";

export interface PrivateRoomBridge {
  h: Harness;
  bridge: RunningBridge;
  room: string;
  /** The embedded broker's TCP port. */
  port: number;
  /** Lets the bot in: what waited for it is delivered. */
  invite(): void;
}

/** `endpoint`: the route's one inbound MQTT endpoint (account mqtt.home, direction in, plus these). */
export async function privateRoomBridge(
  endpoint: Record<string, unknown>,
  queue?: Record<string, unknown>,
): Promise<PrivateRoomBridge> {
  const h = await harness({
    queue,
    bridges: { mqtt: { home: { embedded: { port: 0 } } } },
    routes: [
      {
        id: "private",
        room: "#private:test.local",
        endpoints: [{ account: "mqtt.home", direction: "in", ...endpoint }],
      },
    ],
  });
  const room = h.hs.createRoom({ creator: h.alice, alias: "#private:test.local", preset: "private_chat" });
  const { bridge, ports } = await startBridge(h);
  return {
    h,
    bridge,
    room,
    port: ports.mqtt,
    invite: () => h.hs.inviteUser(room, h.alice, h.hs.appserviceUserId),
  };
}
