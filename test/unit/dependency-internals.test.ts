/**
 * What tribridge relies on beyond the documented API of bullmq, aedes and aedes-persistence-redis,
 * checked against the real libraries (the shared Redis under a fresh prefix, aedes on port 0).
 * These packages (and ioredis: bullmq pins it exactly, and both are handed our connections) are
 * pinned to exact versions in package.json; an upgrade that changes one of these fails here with
 * the code to review. Upgrade them on purpose: change the pin, `npm install`, run this file.
 */
import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { createServer, type AddressInfo, type Server } from "node:net";
import { Aedes, type AedesOptions, type AuthenticateError, type Client, type PublishPacket } from "aedes";
import redisPersistence from "aedes-persistence-redis";
import { Queue, Worker } from "bullmq";
import { Redis } from "ioredis";
import mqtt, { type IClientOptions, type MqttClient } from "mqtt";
import { outgoingKey } from "../../bridges/mqtt/offline-queue.js";
import { REDIS_URL, deleteKeys, waitFor } from "../helpers/fixture.js";
import { RawClient, connect as connectPacket, publish, subscribe, unsubscribe } from "../helpers/mqtt-raw.js";

const root = new URL("../../", import.meta.url);
const manifest = JSON.parse(readFileSync(new URL("package.json", root), "utf8")) as {
  dependencies: Record<string, string>;
};
const installed = (name: string): string =>
  (
    JSON.parse(readFileSync(new URL(`node_modules/${name}/package.json`, root), "utf8")) as {
      version: string;
    }
  ).version;

/** The failure message: what changed, and where to look before taking the new version. */
const changed = (library: string, what: string, review: string): string =>
  `${library} ${installed(library)} changed ${what}; review ${review} before upgrading`;

const PINNED = ["bullmq", "aedes", "aedes-persistence-redis", "ioredis"];

test("bullmq, aedes, aedes-persistence-redis and ioredis are pinned exactly, at the installed versions", () => {
  for (const name of PINNED) {
    const pin = manifest.dependencies[name];
    assert.match(
      pin ?? "",
      /^\d+\.\d+\.\d+$/,
      `package.json must pin ${name} to an exact version (it has "${pin}"): tribridge relies on its internals, checked in this file (test/unit/dependency-internals.test.ts)`,
    );
    assert.equal(
      installed(name),
      pin,
      `${name} ${installed(name)} is installed but package.json pins ${pin}: run npm ci`,
    );
  }
});

const prefix = `test-${randomUUID().slice(0, 8)}`;
const cleanups: (() => Promise<unknown>)[] = [];
after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
  await deleteKeys(prefix);
});

function redis(options: { keyPrefix?: string } = {}): Redis {
  const r = new Redis(REDIS_URL, { maxRetriesPerRequest: null, ...options });
  cleanups.push(async () => r.disconnect());
  return r;
}

describe("bullmq: the Redis layout src/queue/ordered-queue.ts reads and writes", () => {
  const connection = redis();
  let queues = 0;
  /** A queue of its own and a worker that takes jobs only when asked (getNextJob). */
  function shard() {
    const name = `q-${queues++}`;
    const queue = new Queue(name, { connection, prefix });
    const worker = new Worker(name, null, { connection: redis(), prefix, autorun: false });
    cleanups.push(
      () => worker.close(),
      () => queue.close(),
    );
    return { name, queue, worker };
  }
  const batch = (...ids: string[]) => ({ items: ids.map((id) => ({ id, key: "room", data: { id } })) });
  const WRITE = "src/queue/ordered-queue.ts Shard.write (WRITE_TO_WAITING)";

  test("a job's data is the JSON of what was added, in the `data` field of its hash at <prefix>:<queue>:<id>", async () => {
    const { name, queue } = shard();
    await queue.add("relay", batch("a"), { jobId: "j1" });
    assert.equal(queue.toKey(""), `${prefix}:${name}:`, changed("bullmq", "the prefix of its keys", WRITE));
    assert.equal(
      await connection.hget(`${prefix}:${name}:j1`, "data"),
      JSON.stringify(batch("a")),
      changed(
        "bullmq",
        "how it stores job data (the job hash's `data` field)",
        `${WRITE}, WAITING_BYTES and addBatch`,
      ),
    );
    assert.ok(
      !Object.values(queue.keys).includes(queue.toKey("appended")),
      changed("bullmq", "its key names: it now uses <queue>:appended, which tribridge uses", WRITE),
    );
  });

  test("new jobs enter the wait list at index 0 (LPUSH), workers take from the other end, and it holds only job ids", async () => {
    const { queue, worker } = shard();
    for (const id of ["j1", "j2", "j3"]) await queue.add("relay", batch(id), { jobId: id });
    await queue.add("relay", batch("later"), { jobId: "later", delay: 60_000 });
    await queue.add("relay", batch("urgent"), { jobId: "urgent", priority: 1 });
    const wait = await connection.lrange(queue.keys.wait!, 0, -1);
    assert.deepEqual(
      wait.filter((entry) => !entry.startsWith("0:")),
      ["j3", "j2", "j1"],
      changed("bullmq", "the wait list (new jobs no longer at index 0, or other entries in it)", WRITE),
    );
    // Markers were "0:<delay>" entries in the wait list before bullmq 5 moved them to a key of their own.
    for (const entry of wait)
      assert.ok(
        /^j\d$/.test(entry) || entry.startsWith("0:"),
        changed("bullmq", `what its wait list holds (${entry})`, `${WRITE}'s check for "0:" markers`),
      );
    assert.equal(
      (await worker.getNextJob(randomUUID(), { block: false }))?.id,
      "j1",
      changed("bullmq", "the end of the wait list workers take jobs from", WRITE),
    );
  });

  test("a worker reads a job's data from its hash as it takes the job (so items appended while it waits are delivered)", async () => {
    const { name, queue, worker } = shard();
    await queue.add("relay", batch("a"), { jobId: "j1" });
    const key = `${prefix}:${name}:j1`;
    const data = (await connection.hget(key, "data"))!;
    await connection.hset(key, "data", `${data.slice(0, -2)},${JSON.stringify(batch("b").items[0])}]}`);
    const job = await worker.getNextJob(randomUUID(), { block: false });
    assert.deepEqual(
      job?.data,
      batch("a", "b"),
      changed(
        "bullmq",
        "where a worker reads job data from (the hash's `data` field as it moves to active)",
        WRITE,
      ),
    );
  });

  test("an active job's lock is <prefix>:<queue>:<id>:lock, holding the worker's token", async () => {
    const { name, queue, worker } = shard();
    await queue.add("relay", batch("a"), { jobId: "j1" });
    const token = randomUUID();
    await worker.getNextJob(token, { block: false });
    assert.equal(
      await connection.get(`${prefix}:${name}:j1:lock`),
      token,
      changed("bullmq", "the lock key of active jobs", "src/queue/ordered-queue.ts Shard.requeueOrphans"),
    );
  });

  test("moveToWait('0') once the lock is gone puts an active job where the worker takes next, its progress object kept", async () => {
    const { name, queue, worker } = shard();
    for (const id of ["j1", "j2"]) await queue.add("relay", batch(id), { jobId: id });
    const job = (await worker.getNextJob(randomUUID(), { block: false }))!;
    await job.updateProgress({ done: [0, 2] });
    await connection.del(`${prefix}:${name}:j1:lock`); // as after a crash, or by a restarted instance
    const REQUEUE = "src/queue/ordered-queue.ts Shard.requeueOrphans";
    await assert.doesNotReject(job.moveToWait("0"), changed("bullmq", "moveToWait with token '0'", REQUEUE));
    assert.equal(
      await connection.lindex(queue.keys.wait!, -1),
      "j1",
      changed("bullmq", "where moveToWait puts a job (no longer the head of the line)", REQUEUE),
    );
    const again = await worker.getNextJob(randomUUID(), { block: false });
    assert.equal(again?.id, "j1", changed("bullmq", "which job runs after moveToWait", REQUEUE));
    assert.deepEqual(
      again?.progress,
      { done: [0, 2] },
      changed(
        "bullmq",
        "job.progress (an object given to updateProgress)",
        "src/queue/ordered-queue.ts runJob",
      ),
    );
  });
});

describe("aedes and aedes-persistence-redis: what bridges/mqtt/embedded-broker.ts reaches into", () => {
  const BROKER = "bridges/mqtt/embedded-broker.ts";

  let runs = 0;
  /** A broker on port 0; its persistence under a key prefix of its own unless given a connection. */
  async function run(options: AedesOptions, conn = redis({ keyPrefix: `${prefix}:mqtt-${runs++}:` })) {
    const persistence = redisPersistence({ conn });
    const broker = await Aedes.createBroker({ persistence, ...options });
    const server: Server = createServer((socket) => broker.handle(socket));
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const port = (server.address() as AddressInfo).port;
    let closed = false;
    const close = async () => {
      if (closed) return;
      closed = true;
      await new Promise<void>((resolve) => broker.close(() => resolve()));
      await new Promise<void>((resolve) => server.close(() => resolve()));
    };
    cleanups.push(close);
    return { broker, persistence, port, close };
  }

  async function connect(port: number, options: IClientOptions): Promise<MqttClient> {
    const client = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, { reconnectPeriod: 0, ...options });
    cleanups.push(() => client.endAsync(true));
    return client;
  }

  const clientsOf = (broker: Aedes) =>
    (broker as unknown as { clients: Record<string, Client & { will: unknown }> }).clients;
  const will = (topic: string) => ({ topic, payload: Buffer.from("gone"), qos: 1 as const, retain: false });

  test("a connecting client's will is in client._will when authenticate runs", async () => {
    let seen: { topic?: string } | null | undefined;
    const { port } = await run({
      authenticate: (client, _username, _password, done) => {
        seen = (client as Client & { _will?: { topic?: string } })._will;
        done(null, true);
      },
    });
    await connect(port, { clientId: "dev-a", will: will("dev/a/LWT") });
    assert.equal(seen?.topic, "dev/a/LWT", changed("aedes", "client._will", `${BROKER} admit()`));
  });

  test("connections are read with 'readable' (the packet-size guard listens to 'data' beside it)", async () => {
    const { broker, port } = await run({});
    await connect(port, { clientId: "dev-r" });
    const conn = clientsOf(broker)["dev-r"]?.conn;
    assert.ok(
      conn && conn.listenerCount("readable") > 0,
      changed("aedes", "how it reads a connection", "bridges/mqtt/packet-size-guard.ts"),
    );
  });

  test("authorizePublish gets the packet broker.publish then gets; a QoS 1 PUBACK waits for authorizePublish", async () => {
    const events: string[] = [];
    const authorized = new Set<PublishPacket>();
    const { broker, port } = await run({
      authorizePublish: (_client, packet, done) => {
        if (packet.topic !== "p/1") return done(null);
        authorized.add(packet);
        events.push("authorizing");
        setTimeout(() => (events.push("authorized"), done(null)), 30);
      },
    });
    type PublishFn = (packet: PublishPacket, client: unknown, done?: (err?: Error) => void) => void;
    const publish = broker.publish.bind(broker) as PublishFn;
    const received: { same: boolean; client: unknown }[] = [];
    const replacement: PublishFn = (packet, client, done) => {
      if (packet.topic === "p/1") received.push({ same: authorized.has(packet), client });
      return publish(packet, client, done);
    };
    broker.publish = replacement as Aedes["publish"];
    const device = await connect(port, { clientId: "dev-p" });
    await device.publishAsync("p/1", "x", { qos: 1 });
    events.push("puback");
    assert.deepEqual(
      events,
      ["authorizing", "authorized", "puback"],
      changed(
        "aedes",
        "when it sends the PUBACK (before authorizePublish is done)",
        `${BROKER} authorizePublish`,
      ),
    );
    await waitFor("broker.publish", () => received.length > 0, 2000).catch(() => undefined);
    assert.equal(
      received.length,
      1,
      changed(
        "aedes",
        "how a client's publish reaches subscribers (not through broker.publish)",
        `${BROKER} skipDropped`,
      ),
    );
    assert.ok(
      received[0]!.same && received[0]!.client === clientsOf(broker)["dev-p"],
      changed(
        "aedes",
        "what broker.publish is given (not the packet authorizePublish saw)",
        `${BROKER} skipDropped`,
      ),
    );
  });

  test("with broker.clients[id].will nulled, a stop keeps the will stored; the next run streams it and sweeps it with no client", async () => {
    const wills = () => redis({ keyPrefix: `${prefix}:wills:` }); // one store for both runs
    const first = await run({}, wills());
    await connect(first.port, { clientId: "dev-w", will: will("dev/w/LWT") });
    const client = clientsOf(first.broker)["dev-w"];
    assert.equal(
      (client?.will as { topic?: string } | undefined)?.topic,
      "dev/w/LWT",
      changed("aedes", "broker.clients or client.will", `${BROKER} stop()`),
    );
    client!.will = null;
    await first.close();

    const swept: { client: Client | null; clientId?: string; brokerId?: string }[] = [];
    const second = await run(
      {
        heartbeatInterval: 25, // the will sweep runs every 4 heartbeats
        authorizePublish: (c, packet, done) => {
          const stored = packet as PublishPacket & { clientId?: string; brokerId?: string };
          if (packet.topic === "dev/w/LWT")
            swept.push({ client: c, clientId: stored.clientId, brokerId: stored.brokerId });
          done(null);
        },
      },
      wills(),
    );
    const streamed: { clientId: string; brokerId: string }[] = [];
    for await (const w of second.persistence.streamWill({}))
      streamed.push({ clientId: w.clientId, brokerId: w.brokerId });
    assert.deepEqual(
      streamed,
      [{ clientId: "dev-w", brokerId: first.broker.id }],
      changed(
        "aedes-persistence-redis",
        "streamWill, or aedes publishing or deleting wills of clients whose will was nulled at close",
        `${BROKER} start() and stop()`,
      ),
    );
    await waitFor("the will sweep", () => swept.length > 0, 2000).catch(() => undefined);
    assert.deepEqual(
      swept[0],
      { client: null, clientId: "dev-w", brokerId: first.broker.id },
      changed(
        "aedes",
        "the will sweep (authorizePublish with no client, the will with clientId and brokerId)",
        `${BROKER} authorizePublish`,
      ),
    );
  });

  test("each connection is parsed by client._parser (mqtt-packet): _parseString reads every string at _list[_pos], _parsePayload a whole packet, and _emitError there keeps it from aedes", async () => {
    const GUARD = "bridges/mqtt/malformed-packet-guard.ts";
    const { broker, port } = await run({});
    type Parser = {
      _list: { slice(start: number, end: number): Buffer };
      _pos: number;
      packet: { cmd: string };
      error: Error | null;
      _parseString(...args: unknown[]): string | null;
      _parsePayload(...args: unknown[]): boolean;
      _emitError(err: Error): void;
    };
    const strings: string[] = [];
    const handle = broker.handle;
    broker.handle = (conn, req) => {
      const client = handle(conn, req);
      const parser = (client as unknown as { _parser?: Parser })._parser;
      assert.ok(
        parser && typeof parser._parseString === "function" && typeof parser._parsePayload === "function",
        changed("aedes", "client._parser (or mqtt-packet its Parser methods)", GUARD),
      );
      const { _parseString: parseString, _parsePayload: parsePayload } = parser;
      parser._parseString = function (this: Parser, ...args) {
        const at = this._pos;
        const decoded = parseString.apply(this, args);
        const raw = this._list.slice(at + 2, this._pos).toString("utf8");
        strings.push(`${this.packet.cmd} ${raw}${decoded === raw ? "" : ` (decoded ${decoded})`}`);
        return decoded;
      };
      parser._parsePayload = function (this: Parser, ...args) {
        const parsed = parsePayload.apply(this, args);
        if (parsed && this.packet.cmd === "unsubscribe") this._emitError(new Error("refused"));
        return parsed;
      };
      return client;
    };
    const raw = await RawClient.open(port);
    const fields = { clientId: "dev-s", will: { topic: "w/t" }, username: "user", password: "secret" };
    raw.send(connectPacket(fields));
    await raw.reply(4);
    raw.send(subscribe(1, "s/+"), publish("p/t", "payload", 1, 2));
    await raw.reply(4 + 5 + 4);
    raw.send(unsubscribe(3, "s/+"));
    await raw.waitClosed().catch(() => undefined);
    assert.deepEqual(
      strings,
      [
        "connect MQTT",
        "connect dev-s",
        "connect w/t",
        "connect user",
        "subscribe s/+",
        "publish p/t",
        "unsubscribe s/+",
      ],
      changed("mqtt-packet", "which strings _parseString reads, or where (_list, _pos)", GUARD),
    );
    assert.ok(
      raw.closed && raw.received.length === 4 + 5 + 4,
      changed(
        "aedes",
        "(or its mqtt-packet) what an _emitError in _parsePayload does (the packet still reached aedes, or the connection stayed open)",
        GUARD,
      ),
    );
  });

  test("aedes writes its CONNACK through mqtt-packet's writeToStream, looked up at each call, to client.conn, and emits that packet as connackSent", async () => {
    const PRESENCE = "bridges/mqtt/session-presence.ts";
    type Write = (packet: { cmd?: string }, stream: unknown, options?: unknown) => boolean;
    const mqttPacket = createRequire(import.meta.resolve("aedes"))("mqtt-packet") as { writeToStream: Write };
    const original = mqttPacket.writeToStream;
    const written: { packet: { cmd?: string }; stream: unknown }[] = [];
    mqttPacket.writeToStream = (packet, stream, options) => {
      if (packet.cmd === "connack") written.push({ packet, stream });
      return original(packet, stream, options);
    };
    cleanups.push(async () => void (mqttPacket.writeToStream = original));
    const { broker, port } = await run({});
    const sent: { packet: unknown; client: Client }[] = [];
    broker.on("connackSent", (packet, client) => sent.push({ packet, client }));
    await connect(port, { clientId: "dev-c", clean: false }); // a new session: session present false
    mqttPacket.writeToStream = original;
    assert.equal(
      written.length,
      1,
      changed(
        "aedes",
        "how it writes a CONNACK (not through mqtt-packet's writeToStream, as resolved from aedes)",
        PRESENCE,
      ),
    );
    assert.equal(
      written[0]!.stream,
      clientsOf(broker)["dev-c"]?.conn,
      changed("aedes", "the stream it writes a CONNACK to (not client.conn)", PRESENCE),
    );
    assert.ok(
      sent[0]?.packet === written[0]!.packet && sent[0].client === clientsOf(broker)["dev-c"],
      changed("aedes", "the connackSent event (not the packet it wrote)", PRESENCE),
    );
    assert.deepEqual(
      { ...written[0]!.packet },
      { cmd: "connack", returnCode: 0, sessionPresent: false },
      changed("aedes", "the CONNACK packet's fields (cmd, returnCode, sessionPresent)", PRESENCE),
    );
  });

  test("aedes-persistence-redis sends lrem and rpush without awaiting them, and nothing else", async () => {
    const watched = watchCommands(redis({ keyPrefix: `${prefix}:watched:` }));
    const { port, close } = await run({}, watched.conn);
    // A session with an offline message, a will stored and cleared: the persistence's main paths.
    const subscriber = await connect(port, { clientId: "sub", clean: false });
    await subscriber.subscribeAsync("s/t", { qos: 1 });
    await subscriber.endAsync();
    const device = await connect(port, { clientId: "dev-u", will: will("dev/u/LWT") });
    await device.publishAsync("s/t", "queued", { qos: 1 });
    const back = mqtt.connect(`mqtt://127.0.0.1:${port}`, {
      clientId: "sub",
      clean: false,
      reconnectPeriod: 0,
    });
    cleanups.push(() => back.endAsync(true));
    await new Promise((resolve) => back.once("message", resolve));
    await device.endAsync();
    await back.endAsync();
    await close();
    assert.deepEqual(
      watched.unawaited(),
      ["lrem", "rpush"],
      changed(
        "aedes-persistence-redis",
        "the Redis commands it sends without awaiting them",
        `${BROKER} redisConnection (an unawaited command that fails as the connection closes is an unhandled rejection)`,
      ),
    );
  });
});

describe("aedes and aedes-persistence-redis: what the embedded broker's session-subscriptions.ts, offline-queue.ts and connection-limits.ts rely on", () => {
  const SUBSCRIPTIONS = "bridges/mqtt/session-subscriptions.ts";
  const QUEUE = "bridges/mqtt/offline-queue.ts";
  let runs = 0;

  async function run(options: AedesOptions) {
    const keyPrefix = `${prefix}:sessions-${runs++}:`;
    const conn = redis({ keyPrefix });
    const persistence = redisPersistence({ conn });
    const broker = await Aedes.createBroker({ persistence, ...options });
    const clients: Client[] = [];
    const server: Server = createServer((socket) => clients.push(broker.handle(socket)));
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    cleanups.push(
      () => new Promise<void>((resolve) => broker.close(() => resolve())),
      () => new Promise<void>((resolve) => server.close(() => resolve())),
    );
    const port = (server.address() as AddressInfo).port;
    const connect = async (o: IClientOptions) => {
      const c = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, { reconnectPeriod: 0, ...o });
      cleanups.push(() => c.endAsync(true));
      return c;
    };
    return {
      broker,
      persistence: persistence as unknown as Record<string, (...a: unknown[]) => unknown>,
      conn,
      clients,
      connect,
    };
  }

  test("a SUBSCRIBE: the parser emits it before aedes handles it; authorizeSubscribe gets its objects; addSubscriptions is called per granted filter with the packet's list", async () => {
    const order: string[] = [];
    const parsed: unknown[] = [];
    const { broker, persistence, clients, connect } = await run({
      authorizeSubscribe: (_client, sub, done) => {
        order.push(`authorize ${sub.topic}`);
        done(null, sub.topic.startsWith("no/") ? null : sub);
      },
    });
    const calls: { subs: unknown; cb: boolean }[] = [];
    const add = persistence.addSubscriptions!.bind(persistence);
    persistence.addSubscriptions = (client, subs, cb) => {
      calls.push({ subs, cb: cb !== undefined });
      return add(client, subs, cb);
    };
    const device = await connect({ clientId: "dev-s", clean: false });
    const parser = (clients.at(-1) as Client & { _parser?: { prependListener: Client["prependListener"] } })
      ._parser;
    assert.ok(parser, changed("aedes", "client._parser", `${SUBSCRIPTIONS} watch()`));
    parser.prependListener("packet", (packet: { cmd: string; subscriptions?: unknown[] }) => {
      if (packet.cmd !== "subscribe") return;
      order.push("parsed");
      parsed.push(...packet.subscriptions!);
    });
    const authorized: unknown[] = [];
    const auth = broker.authorizeSubscribe;
    broker.authorizeSubscribe = (client, sub, done) => (authorized.push(sub), auth(client, sub, done));
    await device.subscribeAsync(["a/1", "no/2", "a/3"], { qos: 1 }).catch(() => undefined);
    assert.deepEqual(
      order,
      ["parsed", "authorize a/1", "authorize no/2", "authorize a/3"],
      changed(
        "aedes",
        "when a SUBSCRIBE is authorized (no longer after the parser's 'packet' event)",
        `${SUBSCRIPTIONS} watch()`,
      ),
    );
    assert.ok(
      authorized.length === 3 && authorized.every((sub, i) => sub === parsed[i]),
      changed(
        "aedes",
        "the subscription objects authorizeSubscribe gets (not the parsed packet's)",
        `${SUBSCRIPTIONS} authorize()`,
      ),
    );
    assert.ok(
      calls.length === 2 && !calls[0]!.cb && calls[0]!.subs === calls[1]!.subs,
      changed(
        "aedes",
        "how it stores a SUBSCRIBE (addSubscriptions once per granted filter, with one list, as a promise)",
        `${SUBSCRIPTIONS} storeGranted()`,
      ),
    );
    assert.deepEqual(
      (calls[0]!.subs as { topic: string }[]).map((s) => s.topic),
      ["a/1", "no/2", "a/3"],
      changed(
        "aedes",
        "the list it gives addSubscriptions (no longer the packet's)",
        `${SUBSCRIPTIONS} storeGranted()`,
      ),
    );
  });

  test("'connackSent' is emitted with the client for every CONNACK, accepted or refused", async () => {
    const acks: { client: unknown; returnCode: number | undefined }[] = [];
    const { broker, clients, connect } = await run({
      authenticate: (client, _username, _password, done) =>
        client.id === "refused"
          ? done(Object.assign(new Error("no"), { returnCode: 5 }) as AuthenticateError, false)
          : done(null, true),
    });
    broker.on("connackSent", (packet, client) => acks.push({ client, returnCode: packet.returnCode }));
    await connect({ clientId: "accepted" });
    await connect({ clientId: "refused" }).catch(() => undefined);
    await waitFor("two CONNACKs", () => acks.length >= 2, 2000).catch(() => undefined);
    assert.deepEqual(
      acks.map((a) => [clients.indexOf(a.client as Client), a.returnCode]),
      [
        [0, 0],
        [1, 5],
      ],
      changed(
        "aedes",
        "the 'connackSent' event",
        "bridges/mqtt/connection-limits.ts (a connection's place among those authenticating is given back at its CONNACK)",
      ),
    );
  });

  test("a session's queue is the list outgoing:<encoded id> of keys of msgpack-encoded packets, read at CONNECT through persistence.outgoingStream(client)", async () => {
    const { persistence, conn, connect } = await run({});
    const id = "dev/q 1";
    const device = await connect({ clientId: id, clean: false });
    await device.subscribeAsync("q/#", { qos: 1 });
    await device.endAsync();
    const publisher = await connect({ clientId: "pub-q" });
    for (const n of ["1", "2"]) await publisher.publishAsync("q/t", n, { qos: 1 });
    await waitFor("queued", async () => (await conn.llen(outgoingKey(id))) >= 2, 2000).catch(() => undefined);
    const keys = await conn.lrange(outgoingKey(id), 0, -1);
    const msgpack = createRequire(createRequire(import.meta.url).resolve("aedes-persistence-redis"))(
      "msgpack-lite",
    ) as { decode(b: Buffer): { topic?: string; payload?: Buffer } };
    const values = keys.length > 0 ? await conn.mgetBuffer(...keys) : [];
    assert.deepEqual(
      values.map((v) => v && [msgpack.decode(v).topic, msgpack.decode(v).payload?.toString()]),
      [
        ["q/t", "1"],
        ["q/t", "2"],
      ],
      changed("aedes-persistence-redis", "the layout of a session's queue", `${QUEUE} queuedMessages()`),
    );
    const streamed: unknown[] = [];
    const stream = persistence.outgoingStream!.bind(persistence);
    persistence.outgoingStream = (client) => (streamed.push((client as Client).id), stream(client));
    const received: string[] = [];
    const back = mqtt.connect(`mqtt://127.0.0.1:${(device.options as { port: number }).port}`, {
      clientId: id,
      clean: false,
      reconnectPeriod: 0,
    });
    cleanups.push(() => back.endAsync(true));
    back.on("message", (_t, payload) => received.push(payload.toString()));
    await waitFor("the queue", () => received.length === 2, 5000).catch(() => undefined);
    assert.deepEqual(
      streamed,
      [id],
      changed("aedes", "how it reads a session's queue at CONNECT", `${QUEUE} deliverWholeQueues()`),
    );
    assert.deepEqual(received, ["1", "2"], changed("aedes", "how it delivers a session's queue", QUEUE));
    await waitFor("acknowledged", async () => (await conn.llen(outgoingKey(id))) === 0, 5000).catch(
      () => undefined,
    );
    assert.equal(
      await conn.llen(outgoingKey(id)),
      0,
      changed(
        "aedes-persistence-redis",
        "how an acknowledged message leaves the queue",
        `${QUEUE} nextPage()`,
      ),
    );
  });
});

/**
 * A promise that notes whether anyone awaited it (or called then/catch/finally). `await` calls
 * `then` on it because its constructor is not Promise.
 */
class Watched<T> extends Promise<T> {
  static override get [Symbol.species](): PromiseConstructor {
    return Promise;
  }
  awaited = false;
  override then<A = T, B = never>(
    onFulfilled?: ((value: T) => A | PromiseLike<A>) | null,
    onRejected?: ((reason: unknown) => B | PromiseLike<B>) | null,
  ): Promise<A | B> {
    this.awaited = true;
    return super.then(onFulfilled, onRejected);
  }
}

/** The connection, as seen by the library: each command (no callback) returns a Watched promise. */
function watchCommands(target: Redis): { conn: Redis; unawaited(): string[] } {
  const calls: { name: string; promise: Watched<unknown> }[] = [];
  const conn = new Proxy(target, {
    get(t, name) {
      const value: unknown = Reflect.get(t, name, t);
      if (typeof value !== "function" || typeof name !== "string") return value;
      return (...args: unknown[]) => {
        const result: unknown = (value as (...a: unknown[]) => unknown).apply(t, args);
        if (!(result instanceof Promise) || typeof args.at(-1) === "function") return result;
        const promise = new Watched<unknown>((resolve, reject) => void result.then(resolve, reject));
        Promise.prototype.then.call(promise, undefined, () => undefined); // not "awaited": no unhandled rejection
        calls.push({ name, promise });
        return promise;
      };
    },
  });
  return {
    conn,
    unawaited: () => [...new Set(calls.filter((c) => !c.promise.awaited).map((c) => c.name))].sort(),
  };
}
