/**
 * MQTT 5 request/response bookkeeping (bridges/mqtt/request-response.ts), without a broker: what a
 * command's correlation data is and finds, and which device requests a room can answer.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import type { EndpointBinding, KeyValueStore, OutboundMessage } from "../../src/connector.js";
import { moduleLogger } from "../../src/log.js";
import {
  MAX_REQUEST_CORRELATION_BYTES,
  answerKey,
  commandAnswered,
  correlationOf,
  prepareCommand,
  rememberRequest,
  requestAnswered,
} from "../../bridges/mqtt/request-response.js";
import { mqttEndpointSchema, type MqttEndpoint } from "../../bridges/mqtt/schema.js";
import type { Publish } from "../../bridges/mqtt/publish.js";

/** get/set/delete in memory: all that request/response uses of the store. */
function memoryStore(): KeyValueStore & { keys(): string[] } {
  const values = new Map<string, string>();
  const unused = () => Promise.reject(new Error("not used here"));
  return {
    get: (key) => Promise.resolve(values.get(key)),
    set: (key, value) => (values.set(key, value), Promise.resolve()),
    delete: (key) => (values.delete(key), Promise.resolve()),
    getMap: unused,
    setInMap: unused,
    countUp: unused,
    countDown: unused,
    keys: () => [...values.keys()],
  };
}

const log = moduleLogger("test");
log.level = "silent";

const binding = (fields: Record<string, unknown>): EndpointBinding<MqttEndpoint> => ({
  id: "lab.1",
  direction: "out",
  spec: mqttEndpointSchema.parse({ topic: "lab/set", ...fields }),
});

const message = (fields: Partial<OutboundMessage> = {}): OutboundMessage => ({
  id: "m1",
  sender: { userId: "@alice:test", displayName: "Alice" },
  body: { text: "open" },
  timestamp: 1_700_000_000_000,
  ...fields,
});

const publish = (fields: Partial<Publish>): Publish => ({
  clientId: undefined,
  topic: "lab/state",
  payload: Buffer.from("may I?"),
  qos: 1,
  retain: false,
  dup: false,
  messageId: 1,
  ...fields,
});

test("a command's correlation data is 16 bytes, the same for the same message, and finds the command", async () => {
  const store = memoryStore();
  assert.equal(correlationOf("m1").byteLength, 16);
  assert.deepEqual(correlationOf("m1"), correlationOf("m1"));
  assert.notDeepEqual(correlationOf("m1"), correlationOf("m2"));
  assert.equal(await prepareCommand(store, binding({}), "m1"), undefined, "no responseTopic: nothing");
  const props = await prepareCommand(store, binding({ responseTopic: "lab/response" }), "m1");
  assert.deepEqual(props, { responseTopic: "lab/response", correlationData: correlationOf("m1") });
  assert.deepEqual(await commandAnswered(store, correlationOf("m1")), {
    endpointId: "lab.1",
    remoteId: "m1",
  });
});

test("correlation data that is not ours finds nothing, and long data is not looked up", async () => {
  const store = memoryStore();
  await prepareCommand(store, binding({ responseTopic: "lab/response" }), "m1");
  assert.equal(await commandAnswered(store, undefined), undefined);
  assert.equal(await commandAnswered(store, correlationOf("m2")), undefined);
  const ours = correlationOf("m1");
  assert.equal(await commandAnswered(store, Buffer.concat([ours, Buffer.alloc(65_519)])), undefined);
});

test("a device's request is answerable from the room only on an endpoint with answerRequests", async () => {
  const store = memoryStore();
  const correlationData = Buffer.from([0, 255]);
  await rememberRequest(store, log, "r1", publish({ responseTopic: "lab/answers", correlationData }));
  const reply = message({ replyTo: "r1" });
  assert.deepEqual(await requestAnswered(store, binding({ answerRequests: true }), reply), {
    responseTopic: "lab/answers",
    correlationData,
  });
  assert.equal(await requestAnswered(store, binding({}), reply), undefined);
  assert.equal(await requestAnswered(store, binding({ answerRequests: true }), message()), undefined);
  // Without correlation data: answered on the topic, without it.
  await rememberRequest(store, log, "r2", publish({ responseTopic: "lab/answers" }));
  assert.deepEqual(
    await requestAnswered(store, binding({ answerRequests: true }), message({ replyTo: "r2" })),
    { responseTopic: "lab/answers" },
  );
});

test("[MQTT-3.3.2-14] a request whose response topic or correlation data a room cannot answer is not kept", async () => {
  const store = memoryStore();
  const refused: Partial<Publish>[] = [
    { responseTopic: "lab/+/answers" },
    { responseTopic: "$SYS/broker/x" },
    { responseTopic: "" },
    { responseTopic: "lab/answers", correlationData: Buffer.alloc(MAX_REQUEST_CORRELATION_BYTES + 1) },
  ];
  for (const [i, fields] of refused.entries()) await rememberRequest(store, log, `r${i}`, publish(fields));
  await rememberRequest(store, log, "plain", publish({}));
  assert.deepEqual(store.keys(), []);
});

test("every copy of one room message (one per out endpoint) has one answer key; other messages another", () => {
  const copy = (id: string) => message({ id, replyTo: "r1" });
  assert.equal(answerKey(copy("m1.a")), answerKey(copy("m1.b")));
  assert.notEqual(answerKey(copy("m1.a")), answerKey(message({ replyTo: "r1", timestamp: 1 })));
  assert.notEqual(answerKey(copy("m1.a")), answerKey(message({ replyTo: "r2" })));
});
