/**
 * The MQTT connector's `check` (tribridge doctor): an external broker's login, taken or refused,
 * against a real broker (aedes over TCP, with a password); an embedded broker's port, free, taken
 * by another program, or by the running bridge.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createServer, type Server } from "node:net";
import { Aedes } from "aedes";
import { mqttConnector } from "../../bridges/mqtt/index.js";
import { mqttAccountSchema } from "../../bridges/mqtt/schema.js";
import type { CheckContext } from "../../src/connector.js";
import { rootLogger } from "../../src/log.js";
import { freePort } from "../helpers/fixture.js";

let broker: Aedes;
let server: Server;
let port: number;
const clientIds: string[] = [];

before(async () => {
  broker = await Aedes.createBroker({
    authenticate: (client, username, password, done) => {
      clientIds.push(client.id);
      const ok = username === "bridge" && password?.toString() === "secret";
      done(ok ? null : Object.assign(new Error("bad login"), { returnCode: 4 as const }), ok);
    },
  });
  server = createServer((socket) => broker.handle(socket));
  port = await new Promise<number>((resolve) =>
    server.listen(0, "127.0.0.1", () => resolve((server.address() as { port: number }).port)),
  );
});

after(async () => {
  await new Promise((r) => server.close(r));
  await new Promise<void>((r) => broker.close(() => r()));
});

const ctx = (bridgeRunning = false): CheckContext => ({
  log: rootLogger,
  signal: AbortSignal.timeout(10_000),
  bridgeRunning,
});
const check = (account: unknown, running = false) =>
  mqttConnector.check!("home", mqttAccountSchema.parse(account), ctx(running));

test("an external broker that takes the login: ok, under a client id of doctor's own", async () => {
  const results = await check({
    url: `mqtt://127.0.0.1:${port}`,
    username: "bridge",
    password: "secret",
    clientId: "bridge-session",
    protocolVersion: 4,
  });
  assert.deepEqual(results, [
    {
      name: "broker",
      status: "ok",
      detail: `mqtt://127.0.0.1:${port} took the login as bridge (MQTT 3.1.1)`,
    },
  ]);
  assert.match(clientIds.at(-1)!, /^tribridge-doctor-[0-9a-f]{8}$/, "not the bridge's own session");
});

test("a wrong password: fail, with what to check", async () => {
  const [result] = await check({
    url: `mqtt://127.0.0.1:${port}`,
    username: "bridge",
    password: "wrong",
    protocolVersion: 4,
  });
  assert.equal(result!.status, "fail");
  assert.match(
    result!.detail,
    new RegExp(`mqtt://127\\.0\\.0\\.1:${port} refused the login as bridge: .*Bad username or password`),
  );
  assert.match(result!.fix!, /username and password \(or passwordFile\)/);
});

test("MQTT 5 to a broker that speaks 3.1.1 only: fail, saying which protocolVersion to set", async () => {
  const [result] = await check({ url: `mqtt://127.0.0.1:${port}`, username: "bridge", password: "secret" });
  assert.equal(result!.status, "fail");
  assert.match(result!.detail, /does not speak MQTT 5/);
  assert.equal(result!.fix, "set protocolVersion to 4 (MQTT 3.1.1)");
});

test("no broker there: fail, naming the url", async () => {
  const free = await freePort();
  const [result] = await check({ url: `mqtt://127.0.0.1:${free}` });
  assert.equal(result!.status, "fail");
  assert.match(result!.detail, new RegExp(`does not answer: connect ECONNREFUSED 127\\.0\\.0\\.1:${free}`));
  assert.match(result!.fix!, /check url/);
});

test("an embedded broker's port: free; taken by another program; taken while the bridge runs", async () => {
  const free = await freePort();
  assert.deepEqual(await check({ embedded: { port: free } }), [
    { name: "broker", status: "ok", detail: `embedded broker can listen on 127.0.0.1:${free}` },
  ]);
  const [taken] = await check({ embedded: { port } });
  assert.equal(taken!.status, "fail");
  assert.match(taken!.detail, new RegExp(`port ${port} on 127\\.0\\.0\\.1 is already in use`));
  assert.match(taken!.fix!, /set embedded\.port to a free port/);
  const [running] = await check({ embedded: { port } }, true);
  assert.equal(running!.status, "ok");
  assert.match(running!.detail, /presumably by the running tribridge/);
});
