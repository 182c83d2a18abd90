/**
 * Room upgrades: when a route's room is replaced (`m.room.tombstone`), relay through the new room
 * from now on and join it. A restart finds the new room again through RoomDelivery.roomIdFor.
 */
import { errorMessage } from "../errors.js";
import type { Logger } from "../log.js";
import type { RouteTable } from "../routing/route-table.js";
import type { MatrixClient } from "./matrix-client.js";

/**
 * The handler for EventIntakeOptions.upgraded. `upgradedBy`: who sent the tombstone; their server
 * is in the new room, so the bot can join through it.
 */
export function followRoomUpgrades(
  routes: RouteTable,
  matrix: MatrixClient,
  bot: string,
  log: Logger,
  /** Once the bot is in the new room (e.g. to say there what the room is bridged to). */
  joined: (newRoomId: string) => Promise<void>,
): (oldRoomId: string, newRoomId: string, upgradedBy: string) => void {
  return (oldRoomId, newRoomId, upgradedBy) => {
    const moved = routes.replaceRoom(oldRoomId, newRoomId);
    matrix.noteServers(newRoomId, [upgradedBy.slice(upgradedBy.indexOf(":") + 1)]);
    log.info(
      { oldRoomId, newRoomId, routes: moved },
      "a route's room was upgraded; relaying through the new room",
    );
    matrix
      .joinBot(newRoomId)
      .then(() => joined(newRoomId))
      .catch((err: unknown) =>
        log.warn(
          { roomId: newRoomId, err: errorMessage(err) },
          `cannot join the upgraded room yet; invite ${bot}`,
        ),
      );
  };
}
