/**
 * The HTTP side of the Application Service API: the homeserver pushes transactions here.
 *
 * A transaction is answered 200 only after all its events are durably enqueued, so a crash before
 * that makes the homeserver send it again (AS API §Pushing events). Both the v1 path and the legacy
 * unprefixed path that older Synapse uses are served. hs_token comes from `Authorization: Bearer`
 * or `?access_token=`: missing → 401 M_UNAUTHORIZED, wrong → 403 M_FORBIDDEN, before anything else.
 * Besides: GET /live or /health (the process answers) and GET /ready (it can do its work: 200, or 503 naming
 * what is wrong), both without a token.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { hash, timingSafeEqual } from "node:crypto";
import type { Logger } from "../log.js";
import { errorMessage } from "../errors.js";
import { close, listen } from "../http-listen.js";
import { LogLimiter } from "../log-limiter.js";
import type { Readiness } from "../readiness.js";
import { transactionDeviceData, type TransactionDeviceData } from "./crypto/transaction-device-data.js";
import { isUserId } from "./ids.js";

export interface MatrixEvent {
  event_id: string;
  room_id: string;
  sender: string;
  type: string;
  state_key?: string;
  /** The event a redaction removes (before room version 11; see content.redacts). */
  redacts?: string;
  content: Record<string, unknown>;
  origin_server_ts?: number;
}

export interface AppserviceHandlers {
  /** Whether a transaction with this fingerprint was fully handled before. */
  seenTransaction(fingerprint: string): Promise<boolean>;
  markTransaction(fingerprint: string): Promise<void>;
  /** Enqueues the events; resolves once durable. */
  onEvents(events: MatrixEvent[]): Promise<void>;
  /**
   * What the transaction carries for our devices (end-to-end encryption, MSC2409/MSC3202), before
   * its events (a room key may come with the event it opens); resolves once durable.
   */
  onDeviceData?(data: TransactionDeviceData): Promise<void>;
  /** Events that never have an effect (our own, echoed back): a transaction of only these is not recorded. */
  ignores(event: MatrixEvent): boolean;
  /** AS API §Querying: does this user exist on the far side. */
  userExists(userId: string): boolean;
  /** Told what each pushed transaction came to (for metrics). */
  observe?(outcome: TransactionOutcome): void;
  /** GET /ready: whether the bridge can do its work, check by check (see readiness.ts). */
  readiness?(): Promise<Readiness>;
}

/** What a transaction pushed to us came to. */
export type TransactionOutcome =
  "relayed" | "echo" | "duplicate" | "unauthorized" | "forbidden" | "malformed";

/** The largest transaction body read; a larger one is answered 413 M_TOO_LARGE. */
export const MAX_BODY_BYTES = 32 * 1024 * 1024;
/** After a 413, what more of the body is read (and dropped) so the answer arrives, not a reset. */
const DRAIN_MAX_BYTES = 2 * MAX_BODY_BYTES;
const DRAIN_TIMEOUT_MS = 10_000;
const TRANSACTION_PATH = /^(?:\/_matrix\/app\/v1)?\/transactions\/([^/]+)$/;
const USER_PATH = /^(?:\/_matrix\/app\/v1)?\/users\/([^/]+)$/;
const ROOM_PATH = /^(?:\/_matrix\/app\/v1)?\/rooms\/([^/]+)$/;
const THIRDPARTY_PATH = /^\/_matrix\/app\/v1\/thirdparty\//;

function send(res: ServerResponse, status: number, body: unknown): void {
  const json = JSON.stringify(body);
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(json) });
  res.end(json);
}

/** Compares digests of equal length in constant time, so the comparison leaks nothing of the token. */
function matchesDigest(token: string, expectedDigest: Buffer): boolean {
  return timingSafeEqual(hash("sha256", token, "buffer"), expectedDigest);
}

function tokenOf(req: IncomingMessage, url: URL): string | undefined {
  const auth = req.headers.authorization;
  if (auth?.startsWith("Bearer ")) return auth.slice("Bearer ".length).trim();
  return url.searchParams.get("access_token") ?? undefined;
}

const tooLarge = () => Object.assign(new Error(`body larger than ${MAX_BODY_BYTES} bytes`), { status: 413 });

/**
 * The request body, up to MAX_BODY_BYTES; over that (declared or read), rejects with status 413
 * and leaves the rest of the body to drainAfterTooLarge.
 */
function readBody(req: IncomingMessage): Promise<Buffer> {
  if (Number(req.headers["content-length"]) > MAX_BODY_BYTES) return Promise.reject(tooLarge());
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const onData = (c: Buffer) => {
      size += c.length;
      if (size <= MAX_BODY_BYTES) return void chunks.push(c);
      req.off("data", onData);
      chunks.length = 0;
      reject(tooLarge());
    };
    req.on("data", onData);
    req.on("end", () => resolve(Buffer.concat(chunks)));
    req.on("error", reject);
  });
}

/**
 * After a 413 answer (sent with `Connection: close`): the client may still be writing its body.
 * Closing the socket now would turn our answer into a reset on its side (unread data makes the
 * kernel send RST), so the rest is read and dropped, within bounds, and the socket closes after.
 */
function drainAfterTooLarge(req: IncomingMessage): void {
  let drained = 0;
  const timer = setTimeout(() => req.socket.destroy(), DRAIN_TIMEOUT_MS).unref();
  req.on("data", (c: Buffer) => {
    drained += c.length;
    if (drained > DRAIN_MAX_BYTES) req.socket.destroy();
  });
  req.on("close", () => clearTimeout(timer));
  req.resume();
}

export class AppserviceServer {
  private server: Server | undefined;
  /** Transactions are handled one at a time so their events are enqueued in the order sent. */
  private chain: Promise<unknown> = Promise.resolve();
  port = 0;

  private readonly hsTokenDigest: Buffer;
  /** Refused events are logged at most once a minute per kind of problem. */
  private readonly refusals = new LogLimiter();

  constructor(
    hsToken: string,
    private readonly handlers: AppserviceHandlers,
    private readonly log: Logger,
  ) {
    this.hsTokenDigest = hash("sha256", hsToken, "buffer");
  }

  async listen(port: number, host: string): Promise<void> {
    const server = createServer((req, res) => {
      this.handle(req, res).catch((err: unknown) => {
        const status = (err as { status?: number }).status ?? 500;
        this.log.warn({ err: errorMessage(err), status }, "appservice request failed");
        if (res.headersSent) return;
        if (status === 413) {
          // Client-Server API §Standard error response: M_TOO_LARGE. The answer first, then close.
          res.setHeader("Connection", "close");
          drainAfterTooLarge(req);
        }
        send(res, status, {
          errcode: status === 413 ? "M_TOO_LARGE" : "M_UNKNOWN",
          error: errorMessage(err),
        });
      });
    });
    server.keepAliveTimeout = 65_000;
    this.server = server;
    this.port = await listen(server, port, host, "appservice");
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    // Never log req.url: it may carry ?access_token=.
    const url = new URL(req.url ?? "/", "http://localhost");
    const path = url.pathname;
    if (path === "/live" || path === "/health") return send(res, 200, { status: "ok" });
    if (path === "/ready" && this.handlers.readiness) {
      // For orchestrators and load balancers, like /health: no token. It names parts, not data.
      const { ready, checks } = await this.handlers.readiness();
      return send(res, ready ? 200 : 503, { status: ready ? "ready" : "not ready", checks });
    }

    const known =
      TRANSACTION_PATH.test(path) ||
      USER_PATH.test(path) ||
      ROOM_PATH.test(path) ||
      THIRDPARTY_PATH.test(path) ||
      path === "/_matrix/app/v1/ping";
    if (!known) return send(res, 404, { errcode: "M_UNRECOGNIZED", error: "Unrecognized request" });

    const token = tokenOf(req, url);
    const isTransaction = TRANSACTION_PATH.test(path);
    if (token === undefined) {
      if (isTransaction) this.handlers.observe?.("unauthorized");
      return send(res, 401, { errcode: "M_UNAUTHORIZED", error: "Missing token" });
    }
    if (!matchesDigest(token, this.hsTokenDigest)) {
      if (isTransaction) this.handlers.observe?.("forbidden");
      return send(res, 403, { errcode: "M_FORBIDDEN", error: "Bad token" });
    }

    const txn = TRANSACTION_PATH.exec(path);
    if (txn) {
      if (req.method !== "PUT") return send(res, 405, { errcode: "M_UNRECOGNIZED", error: "Use PUT" });
      const body = await readBody(req);
      const txnId = decodePathSegment(txn[1]!);
      if (txnId === undefined) return send(res, 400, { errcode: "M_INVALID_PARAM", error: "Bad txnId" });
      return this.handleTransaction(txnId, body, res);
    }
    if (path === "/_matrix/app/v1/ping") {
      if (req.method !== "POST") return send(res, 405, { errcode: "M_UNRECOGNIZED", error: "Use POST" });
      await readBody(req);
      return send(res, 200, {});
    }
    const user = USER_PATH.exec(path);
    const userId = user ? decodePathSegment(user[1]!) : undefined;
    if (userId !== undefined && this.handlers.userExists(userId)) return send(res, 200, {});
    return send(res, 404, { errcode: "M_NOT_FOUND", error: "Not found" });
  }

  private async handleTransaction(txnId: string, body: Buffer, res: ServerResponse): Promise<void> {
    const observe = (outcome: TransactionOutcome) => this.handlers.observe?.(outcome);
    let parsed: { events?: unknown } | null;
    try {
      parsed = JSON.parse(body.toString("utf8")) as { events?: unknown } | null;
    } catch {
      observe("malformed");
      return send(res, 400, { errcode: "M_NOT_JSON", error: "Body is not JSON" });
    }
    if (typeof parsed !== "object" || parsed === null || !Array.isArray(parsed.events)) {
      observe("malformed");
      return send(res, 400, { errcode: "M_BAD_JSON", error: "events must be an array" });
    }
    const events = this.wellFormed(txnId, parsed.events);
    const deviceData = this.handlers.onDeviceData && transactionDeviceData(parsed as Record<string, unknown>);
    // Under load most transactions only echo what our ghosts sent: nothing to do, nothing to remember.
    if (!deviceData && events.every((ev) => this.handlers.ignores(ev))) {
      observe("echo");
      return send(res, 200, {});
    }
    // The txnId alone is not unique: Synapse restarts its counter after a restart. Pair it with the body.
    const fingerprint = hash("sha256", Buffer.concat([Buffer.from(`${txnId}\0`), body]), "hex");
    const run = this.chain.then(async () => {
      if (await this.handlers.seenTransaction(fingerprint)) return observe("duplicate");
      if (deviceData) await this.handlers.onDeviceData!(deviceData);
      await this.handlers.onEvents(events);
      await this.handlers.markTransaction(fingerprint);
      observe("relayed");
    });
    this.chain = run.catch(() => undefined);
    await run;
    send(res, 200, {});
  }

  /**
   * The events that are what AS API §Pushing events says a transaction holds (client-format
   * events, Client-Server API §Room event format). The others are refused here, so nothing after
   * this reads a field of the wrong type (a `content` that is a list, a `sender` that is no user
   * id) or relays an event from no one; each kind of problem logged at a bounded rate.
   */
  private wellFormed(txnId: string, raw: unknown[]): MatrixEvent[] {
    const events: MatrixEvent[] = [];
    const problems = new Map<string, number>();
    for (const e of raw) {
      const problem = problemOf(e);
      if (problem === undefined) events.push(e as MatrixEvent);
      else problems.set(problem, (problems.get(problem) ?? 0) + 1);
    }
    for (const [problem, count] of problems) {
      const gate = this.refusals.pass(problem, count);
      if (gate)
        this.log.warn(
          { txnId, problem, count, refusedSinceLastLine: gate.heldBack },
          "refused events from the homeserver that are not well-formed",
        );
    }
    return events;
  }

  close(): Promise<void> {
    return close(this.server);
  }
}

function decodePathSegment(segment: string): string | undefined {
  try {
    return decodeURIComponent(segment);
  } catch {
    return undefined;
  }
}

const isObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === "object" && v !== null && !Array.isArray(v);
const nonEmpty = (v: unknown): v is string => typeof v === "string" && v !== "";

/** What is wrong with an event of a transaction, if anything (Client-Server API §Room event format). */
function problemOf(e: unknown): string | undefined {
  if (!isObject(e)) return "not an object";
  if (!nonEmpty(e.event_id)) return "event_id is not a string";
  if (!nonEmpty(e.type)) return "type is not a string";
  // `!opaque:server`, or, from room version 12, `!` and a hash without a server name.
  if (typeof e.room_id !== "string" || !/^!.+/.test(e.room_id)) return "room_id is not a room id";
  if (!isUserId(e.sender)) return "sender is not a user id (Appendix §User Identifiers)";
  if (!isObject(e.content)) return "content is not an object";
  if (e.state_key !== undefined && typeof e.state_key !== "string") return "state_key is not a string";
  if (e.redacts !== undefined && typeof e.redacts !== "string") return "redacts is not a string";
  if (e.origin_server_ts !== undefined && !Number.isInteger(e.origin_server_ts))
    return "origin_server_ts is not an integer";
  return undefined;
}
