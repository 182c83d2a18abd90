/**
 * The control surface of a running bridge: the commands admins give the bot (`!tribridge status`,
 * `failed`, `retry`, `reload`, `link`, `unlink`, `routes`; see matrix/commands.ts), answered from the
 * connectors' states, the queues' backlogs and the failed lists, as a notice from the bot that
 * replies to the command.
 */
import type { Redis } from "ioredis";
import { routeIdOf } from "./config/endpoint-ids.js";
import type { Config } from "./config/load.js";
import type { ConnectorDefinition, ConnectorState } from "./connector.js";
import { moduleLogger } from "./log.js";
import { Commands, formatStatus } from "./matrix/commands.js";
import type { MatrixClient } from "./matrix/matrix-client.js";
import { formatFailedJobs, readAllFailedJobs, requeueAllFailedJobs } from "./queue/failed-jobs.js";
import type { OrderedQueue } from "./queue/ordered-queue.js";
import type { RoomLinks } from "./routing/room-links.js";
import type { RouteTable } from "./routing/route-table.js";

type Backlog = Awaited<ReturnType<OrderedQueue<unknown>["backlog"]>>;

export interface BridgeCommandsOptions {
  config: Config;
  connectors: readonly ConnectorDefinition[];
  routes: RouteTable;
  redis: Redis;
  matrix: MatrixClient;
  /** The bot's user id: it answers. */
  bot: string;
  isAdmin(userId: string): boolean;
  connectorStates(): Record<string, { state: ConnectorState; reason?: string }>;
  /** Each queue's backlog, by queue name. */
  queueStates(): Promise<Record<string, Backlog>>;
  /** Lines of other parts, as they are: destinations down, rooms with end-to-end encryption. */
  moreStatus(): string[] | Promise<string[]>;
  /** Reads the config file again; what it did, as the answer. */
  reload(): Promise<string>;
  /** Routes set up from rooms (link, unlink, routes). */
  roomLinks: Pick<RoomLinks, "link" | "unlink" | "describe">;
}

/** The commands to the bot (!tribridge …), for admins, in any room the bot is in. */
export function bridgeCommands(o: BridgeCommandsOptions): Commands {
  const { config, connectors, routes, redis, matrix, bot, isAdmin, queueStates } = o;
  /** Failed relays, oldest first: all of them, or, asked from a route's room, that room's. */
  const failedFor = async (roomId: string) => {
    const all = await readAllFailedJobs(redis, config, connectors, config.queue.keepFailedJobs);
    if (!routes.isRouteRoom(roomId)) return all;
    return all.filter((job) => {
      // By the id's route, so that items of endpoints no longer configured are listed too.
      const routeId = routeIdOf(String((job.data as { endpointId?: unknown }).endpointId));
      return routes.roomIdOf(routeId) === roomId;
    });
  };
  return new Commands({
    isAdmin,
    control: {
      status: async () =>
        formatStatus(routes.routes.length, o.connectorStates(), await queueStates(), await o.moreStatus()),
      failed: async (limit, roomId) => formatFailedJobs((await failedFor(roomId)).slice(0, limit)),
      retry: async (ids, roomId) => {
        const mine = new Set(
          (await failedFor(roomId)).map((job) => job.id).filter((id) => !ids || ids.has(id)),
        );
        return mine.size === 0 ? 0 : requeueAllFailedJobs(redis, config, connectors, mine);
      },
      reload: () => o.reload(),
      link: (roomId, sender, args) => o.roomLinks.link(roomId, sender, args),
      unlink: (roomId, args) => o.roomLinks.unlink(roomId, args),
      routes: (roomId) => o.roomLinks.describe(roomId),
    },
    reply: async ({ roomId, text, relatesTo, mention }, txnId) => {
      const asBot = { userId: bot, displayName: config.appservice.botDisplayName };
      // §Rich replies: a reply mentions the sender of the event it answers.
      const content = {
        msgtype: "m.notice",
        body: text,
        "m.relates_to": relatesTo,
        "m.mentions": { user_ids: [mention] },
      };
      await matrix.sendAs(asBot, roomId, "m.room.message", content, txnId);
    },
    log: moduleLogger("commands"),
  });
}
