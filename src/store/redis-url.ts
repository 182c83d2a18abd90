/** The Redis a config names: one server, or a Redis Cluster; and the key prefix that fits it. */

/** `redis+cluster://[user:password@]host:port,host:port…` (or `rediss+cluster://`, TLS): a Redis Cluster. */
const CLUSTER_URL = /^(rediss?)\+cluster:\/\/(?:([^@/]*)@)?([^@/?#]+)\/?$/;
const NODE = /^(\[[0-9a-fA-F:.]+\]|[^:,[\]]+):(\d{1,5})$/;

export interface ClusterAddress {
  /** Where to start: ioredis finds the other primaries from any one of them. */
  nodes: { host: string; port: number }[];
  username?: string;
  password?: string;
  tls: boolean;
}

export function isClusterUrl(url: string): boolean {
  return /^rediss?\+cluster:/.test(url);
}

/** The nodes and credentials of a `redis+cluster://` URL, or the reason it is not one. */
export function parseClusterUrl(url: string): ClusterAddress | string {
  const m = CLUSTER_URL.exec(url);
  if (!m) return "must be redis+cluster://[user:password@]host:port,host:port…";
  const [, scheme, auth, hosts] = m;
  const nodes: ClusterAddress["nodes"] = [];
  for (const node of hosts!.split(",")) {
    const n = NODE.exec(node);
    const port = Number(n?.[2]);
    if (!n || port < 1 || port > 65535) return `"${node}" is not host:port`;
    nodes.push({ host: n[1]!.replace(/^\[(.*)\]$/, "$1"), port });
  }
  const [user, password] = auth === undefined ? [] : auth.split(/:(.*)/s);
  return {
    nodes,
    ...(user && { username: decodeURIComponent(user) }),
    ...(password && { password: decodeURIComponent(password) }),
    tls: scheme === "rediss",
  };
}

/**
 * The prefix every key of the bridge starts with. On a Redis Cluster it is a hash tag (`{tribridge}`):
 * every key then lives in one slot, so BullMQ's Lua scripts and the bridge's MULTIs and scripts, which
 * touch several keys at once, run as on a single Redis. The cost: one primary holds all of one bridge's
 * data (docs/scaling.md).
 */
export function redisKeyPrefix(queue: { redisUrl?: string | undefined; prefix: string }): string {
  return queue.redisUrl !== undefined && isClusterUrl(queue.redisUrl) ? `{${queue.prefix}}` : queue.prefix;
}
