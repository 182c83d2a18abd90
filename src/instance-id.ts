/**
 * This instance's id: what it writes into the leases it holds (queue shards, connectors' exclusive
 * work), so that a restarted instance finds its own id and takes them back at once, while two
 * instances never take each other for one.
 *
 * The id is random, made on the first start and kept in the data directory (`instance-id`): stable
 * across restarts, different between instances whatever their host names. Two live processes can
 * still end up with one id when they share a data directory (or a copied one); each therefore
 * claims its id in Redis while it runs. A claim held by another process is waited for until it
 * lapses (the earlier run of this instance, crashed: it renews no more), and if it does not lapse
 * (a live process renews it) start-up stops with an error that says why. A claim left by a process
 * that is certainly gone (same host name and PID namespace, no such PID any more) is taken at once,
 * so a crashed instance restarted in place takes its leases back without waiting.
 */
import { randomBytes, randomUUID } from "node:crypto";
import { mkdirSync, readFileSync, readlinkSync, renameSync, writeFileSync } from "node:fs";
import { hostname } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import type { Redis } from "ioredis";
import { ConfigError, errorMessage } from "./errors.js";
import type { Logger } from "./log.js";

export const INSTANCE_ID_FILE = "instance-id";
const ID = /^[0-9a-f]{16}$/;

/** The id kept in `dataDir`, made (and kept) on the first call. */
export function instanceIdIn(dataDir: string): string {
  const file = join(dataDir, INSTANCE_ID_FILE);
  try {
    const kept = readFileSync(file, "utf8").trim();
    if (ID.test(kept)) return kept;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT")
      throw new ConfigError("dataDir", `cannot read ${file}: ${errorMessage(err)}`);
  }
  const id = randomBytes(8).toString("hex");
  try {
    mkdirSync(dataDir, { recursive: true });
    const part = `${file}.${process.pid}.tmp`;
    writeFileSync(part, `${id}\n`);
    renameSync(part, file); // whole or absent, never half written
  } catch (err) {
    throw new ConfigError("dataDir", `cannot keep this instance's id in ${file}: ${errorMessage(err)}`);
  }
  return id;
}

export interface InstanceClaimOptions {
  redis: Redis;
  key: string;
  id: string;
  log: Logger;
  /** How long a claim outlives its last renewal; renewed every third of it. */
  ttlMs?: number;
}

const RENEW = `local v = redis.call("GET", KEYS[1])
if v == ARGV[1] then return redis.call("PEXPIRE", KEYS[1], ARGV[2]) end
if not v then redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2]) return 1 end
return 0`;
const RELEASE = `if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end`;

/** Where a process runs: its host name and PID namespace ("" where unknown: not Linux). */
function placeOfThisProcess(): string {
  let ns = "";
  try {
    ns = readlinkSync("/proc/self/ns/pid");
  } catch {
    // not Linux: a claim is never known to be a dead process's, only waited for
  }
  return `${hostname()}|${ns}`;
}

/** Whether a claim's value names a process that is certainly gone (see InstanceClaim). */
function claimantGone(value: string): boolean {
  const [, pid, place] = value.split(" ");
  const here = placeOfThisProcess();
  if (place !== here || here.endsWith("|") || !pid || Number(pid) === process.pid) return false;
  try {
    process.kill(Number(pid), 0);
    return false;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "ESRCH";
  }
}

const TAKE_OVER = `if redis.call("GET", KEYS[1]) == ARGV[1] then redis.call("SET", KEYS[1], ARGV[2], "PX", ARGV[3]) return 1 end
return 0`;

/** This process's claim on its instance id in Redis, held from `take()` to `release()`. */
export class InstanceClaim {
  /** The claim's value: unique to this process, and where it runs (see claimantGone). */
  private readonly nonce = `${randomUUID()} ${process.pid} ${placeOfThisProcess()}`;
  private readonly ttlMs: number;
  private timer: NodeJS.Timeout | undefined;
  /** Whether the last renewal found the id claimed by another process (logged once per change). */
  private contested = false;

  constructor(private readonly o: InstanceClaimOptions) {
    this.ttlMs = o.ttlMs ?? 10_000;
  }

  /**
   * Claims the id; while another process holds it, waits for its claim to lapse. Rejects with a
   * ConfigError when it is still held after twice its lifetime: a live process renews it.
   */
  async take(): Promise<void> {
    const { redis, key, id, log } = this.o;
    const deadline = performance.now() + 2 * this.ttlMs + this.ttlMs / 3;
    let waited = false;
    while ((await redis.set(key, this.nonce, "PX", this.ttlMs, "NX")) !== "OK") {
      const found = await redis.get(key);
      if (found !== null && claimantGone(found)) {
        if ((await redis.eval(TAKE_OVER, 1, key, found, this.nonce, this.ttlMs)) === 1) break;
        continue;
      }
      if (performance.now() > deadline)
        throw new ConfigError(
          "dataDir",
          `another running tribridge has this instance's id ${id} (kept in the data directory): two ` +
            `instances share one dataDir, or one was copied. Give each instance its own dataDir ` +
            `(or delete ${INSTANCE_ID_FILE} in the copy)`,
        );
      if (!waited)
        log.info(
          { instanceId: id },
          "instance id still claimed (an earlier run that ended hard?); waiting for the claim to lapse",
        );
      waited = true;
      await sleep(Math.min(500, this.ttlMs / 4));
    }
    this.timer = setInterval(() => void this.renew(), this.ttlMs / 3).unref();
  }

  private async renew(): Promise<void> {
    const { redis, key, id, log } = this.o;
    let ok: unknown;
    try {
      ok = await redis.eval(RENEW, 1, key, this.nonce, this.ttlMs);
    } catch {
      return; // Redis away: the claim is renewed (or taken again) once it answers
    }
    if (ok === 0 && !this.contested)
      log.error(
        { instanceId: id },
        "another process claims this instance's id: two instances share one dataDir; give each its own",
      );
    if (ok !== 0 && this.contested) log.info({ instanceId: id }, "instance id claimed again by this process");
    this.contested = ok === 0;
  }

  async release(): Promise<void> {
    clearInterval(this.timer);
    const { redis, key } = this.o;
    // Bounded: stopping never waits on an absent Redis; the claim then lapses by itself.
    await Promise.race([redis.eval(RELEASE, 1, key, this.nonce).catch(() => undefined), sleep(1_000)]);
  }
}
