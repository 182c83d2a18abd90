/**
 * A Redis Cluster of a test's own: three primaries (no replicas) of Debian's redis-server, each on a
 * free port (and a free cluster bus port) in a temporary directory, with AOF on. Resolves once every
 * node reports `cluster_state:ok` and agrees on the slots; `stop()` stops them and removes the
 * directories.
 */
import { spawn, execFile, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { Redis } from "ioredis";
import { freePort, waitFor } from "./fixture.js";
import { answers } from "./redis-server.js";

export interface TestRedisCluster {
  /** `redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3`: queue.redisUrl for the bridge. */
  url: string;
  /** Each primary's own `redis://` URL. */
  nodeUrls: string[];
  stop(): Promise<void>;
}

const PRIMARIES = 3;

export async function startRedisCluster(): Promise<TestRedisCluster> {
  const nodes: { port: number; dir: string; process: ChildProcess }[] = [];
  // A test process that ends without stop() (a timeout, --test-force-exit) takes its nodes along.
  const killAll = () => nodes.forEach((n) => n.process.kill("SIGKILL"));
  process.once("exit", killAll);
  const stop = async () => {
    process.off("exit", killAll);
    await Promise.all(
      nodes.map(async ({ process: p, dir }) => {
        if (p.exitCode === null && p.signalCode === null) {
          const exited = new Promise((r) => p.once("exit", r));
          p.kill("SIGTERM");
          await exited;
        }
        rmSync(dir, { recursive: true, force: true });
      }),
    );
  };
  try {
    for (let i = 0; i < PRIMARIES; i++) {
      const port = await freePort();
      // Redis 7 takes the bus port as given; port + 10000, its default, may be anyone's.
      const busPort = await freePort();
      const dir = mkdtempSync(join(tmpdir(), "tribridge-redis-cluster-"));
      const args = [
        ...["--port", String(port), "--bind", "127.0.0.1", "--dir", dir, "--save", ""],
        ...["--cluster-enabled", "yes", "--cluster-port", String(busPort)],
        ...["--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"],
        ...["--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"],
      ];
      nodes.push({ port, dir, process: spawn("redis-server", args, { stdio: "ignore" }) });
    }
    const nodeUrls = nodes.map((n) => `redis://127.0.0.1:${n.port}`);
    for (const url of nodeUrls) await waitFor(`redis-server ${url}`, () => answers(url));
    await promisify(execFile)("redis-cli", [
      "--cluster",
      "create",
      ...nodes.map((n) => `127.0.0.1:${n.port}`),
      "--cluster-replicas",
      "0",
      "--cluster-yes",
    ]);
    for (const url of nodeUrls) await waitFor(`${url} in a cluster that is ok`, () => clusterOk(url), 20_000);
    return {
      url: `redis+cluster://${nodes.map((n) => `127.0.0.1:${n.port}`).join(",")}`,
      nodeUrls,
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** The node sees every slot served and knows all primaries. */
async function clusterOk(url: string): Promise<boolean> {
  const redis = new Redis(url, { maxRetriesPerRequest: 0, retryStrategy: () => null });
  redis.on("error", () => undefined);
  try {
    const info = (await redis.cluster("INFO")) as string;
    return info.includes("cluster_state:ok") && info.includes(`cluster_known_nodes:${PRIMARIES}`);
  } catch {
    return false;
  } finally {
    redis.disconnect();
  }
}
