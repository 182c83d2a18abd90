/**
 * The conformance suite every connector passes: what src/connector.ts promises, checked against a
 * real far side through one shared FakeContext. A connector's test file describes its far side
 * (a `ConformanceTarget`) and calls `connectorConformance(target)`.
 */
import { afterEach, beforeEach, describe, test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import type {
  Connector,
  ConnectorDefinition,
  Direction,
  EndpointBinding,
  OutboundMessage,
} from "../../src/connector.js";
import { PermanentError } from "../../src/errors.js";
import { waitFor } from "../helpers/fixture.js";
import { FakeContext } from "./fake-context.js";

/** The far side as a person or device there sees it: says things on channels, hears what is sent. */
export interface FarSide {
  /** Says `text` on `channel`; resolves once the far side counts it acknowledged (e.g. its PUBACK). */
  say(channel: string, text: string): Promise<void>;
  /** Starts hearing what is sent to `channel`. */
  listen(channel: string): Promise<void>;
  /** What was sent to `channel` since `listen`, as text, in order. */
  heard(channel: string): string[];
  close(): Promise<void>;
}

export interface ConformanceTarget<Account, E> {
  /** For test names, e.g. "mqtt, embedded broker". */
  title: string;
  definition: ConnectorDefinition<Account, E>;
  /** Where its sources are, for the import check (e.g. "bridges/mqtt"). */
  sourceDir: string;
  /** A fresh far side and the raw config of an account on it. */
  setUp(): Promise<{ account: unknown; tearDown(): Promise<void> }>;
  /** The far side's people or devices, once the connector has started (it may be the server). */
  farSide(connector: Connector<E>): Promise<FarSide>;
  /** The connector's own endpoint fields (without `account` and `direction`) for `channel`. */
  endpoint(channel: string): Record<string, unknown>;
  /** A message the far side refuses for good on any channel (too large, say), if there is one. */
  refusedForGood?: Pick<OutboundMessage, "body">;
  /**
   * False where the acknowledgement the far side's people get does not come from the connector (an
   * external broker acknowledges its devices itself): then only redelivery after a failed emit is
   * checked. Default true.
   */
  acknowledgesItself?: boolean;
  /** Takes the far side away, and brings it back (a broker restart); omit where the connector is the server. */
  outage?: { begin(): Promise<void>; end(): Promise<void> };
}

/** Imports a connector may have: the contract's three modules and npm packages (never Matrix). */
const ALLOWED_CORE = /^(\.\.\/)+src\/(connector|errors|log)\.js$/;

function sourceFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) return sourceFiles(path);
    return path.endsWith(".ts") ? [path] : [];
  });
}

function outbound(id: string, text: string): OutboundMessage {
  return {
    id,
    sender: { userId: "@alice:example.org", displayName: "Alice" },
    body: { text },
    timestamp: Date.now(),
  };
}

/** Resolves to whether `promise` settled within `ms` (for "not acknowledged while …" checks). */
async function settlesWithin(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let settled = false;
  void promise.then(
    () => (settled = true),
    () => (settled = true),
  );
  await waitFor("a moment", () => settled, ms).catch(() => undefined);
  return settled;
}

export function connectorConformance<Account, E>(target: ConformanceTarget<Account, E>): void {
  const def = target.definition;

  describe(`connector conformance: ${target.title}`, () => {
    let fake: FakeContext;
    let connector: Connector<E>;
    let far: FarSide;
    let tearDown: () => Promise<void>;
    let account: Account;
    let stopped = false;

    const binding = (channel: string, direction: Direction): EndpointBinding<E> => ({
      id: `conf.${channel}.${direction}`,
      direction,
      spec: def.endpointSchema.parse(target.endpoint(channel)),
    });

    beforeEach(async () => {
      const setUp = await target.setUp();
      tearDown = setUp.tearDown;
      fake = new FakeContext(def.name);
      account = def.accountSchema.parse(setUp.account);
      connector = def.create("conf", account, fake.ctx);
      stopped = false;
      await connector.start();
      far = await target.farSide(connector);
    });

    afterEach(async () => {
      await far?.close();
      if (!stopped) await fake.stop(connector);
      await fake.close();
      await tearDown();
    });

    test("the definition is a pure declaration: a lower-case name, schemas that parse, create() opens nothing", async () => {
      assert.match(def.name, /^[a-z][a-z0-9]*$/);
      assert.match(def.ghostTag, /^[a-z0-9]+$/);
      assert.ok(def.description.length > 0);
      const resources = () =>
        process.getActiveResourcesInfo().filter((r) => r !== "Timeout" && r !== "Immediate").length;
      const before = resources();
      const other = new FakeContext(def.name);
      try {
        def.create("pure", account, other.ctx);
        assert.equal(resources(), before, "create() opened a socket, server or file");
        assert.deepEqual(other.states, [], "create() reported a state: that belongs in start()");
      } finally {
        await other.close();
      }
    });

    test("endpointKey, if given: pure, the same for the same endpoint, another for another channel", () => {
      if (!def.endpointKey) return; // the core's default applies: the whole endpoint
      const spec = (channel: string) => def.endpointSchema.parse(target.endpoint(channel));
      const key = def.endpointKey(spec("alpha"));
      assert.equal(typeof key, "string");
      assert.equal(def.endpointKey(spec("alpha")), key);
      assert.notEqual(def.endpointKey(spec("beta")), key);
    });

    test("check, if given: the working account passes (its own ports held by the running connector)", async () => {
      if (!def.check) return; // doctor does not check this connector's accounts
      const results = await def.check("conf", account, {
        log: fake.ctx.log,
        signal: AbortSignal.timeout(20_000),
        bridgeRunning: true, // the connector under test runs: what it listens on is taken, by it
      });
      assert.ok(results.length > 0, "check() found nothing to check");
      for (const r of results) {
        assert.ok(r.name.length > 0 && r.detail.length > 0, JSON.stringify(r));
        assert.notEqual(r.status, "fail", `${r.name}: ${r.detail}`);
        if (r.status === "warn") assert.ok(r.fix, `a warning says what to do: ${r.name}`);
      }
    });

    test("imports only src/{connector,errors,log} and npm packages, nothing of Matrix", () => {
      for (const file of sourceFiles(target.sourceDir)) {
        const text = readFileSync(file, "utf8");
        for (const [, spec] of text.matchAll(/from\s+"([^"]+)"/g)) {
          const relative = spec!.startsWith(".");
          if (relative && spec!.includes("src/"))
            assert.match(spec!, ALLOWED_CORE, `${file} imports ${spec} (the core beyond the contract)`);
          assert.doesNotMatch(spec!, /matrix/i, `${file} imports ${spec}`);
        }
      }
    });

    test("start() reports up; after stop() nothing more is emitted", async () => {
      await waitFor("state up", () => fake.state === "up");
      const ep = binding("after-stop", "in");
      await connector.watch([ep]);
      await far.say("after-stop", "before");
      await waitFor("the message", () => fake.emittedFor(ep.id).length === 1);
      await fake.stop(connector);
      stopped = true;
      // Where the connector is the server, this is refused: either way nothing may be emitted.
      await settlesWithin(
        far.say("after-stop", "after").catch(() => undefined),
        500,
      );
      assert.deepEqual(fake.emittedAfterStop, []);
    });

    test("a far-side message is emitted once, for the endpoint it matches, with an id, a sender and its text", async () => {
      const a = binding("alpha", "in");
      const b = binding("beta", "in");
      await connector.watch([a, b]);
      await far.say("alpha", "hello from alpha");
      await far.say("beta", "hello from beta");
      await waitFor("both", () => fake.emittedFor(b.id).length === 1 && fake.emittedFor(a.id).length === 1);
      const [m] = fake.emittedFor(a.id);
      assert.deepEqual(m!.endpointIds, [a.id]);
      assert.equal(m!.body.text, "hello from alpha");
      assert.ok(m!.remoteId.length > 0);
      assert.ok(m!.sender.id.length > 0);
      assert.notEqual(m!.remoteId, fake.emittedFor(b.id)[0]!.remoteId, "two messages, two remote ids");
    });

    test("watch() replaces the whole list: an endpoint left out relays nothing more", async () => {
      const a = binding("first", "in");
      const b = binding("second", "in");
      await connector.watch([a]);
      await far.say("first", "one");
      await waitFor("first", () => fake.emittedFor(a.id).length === 1);
      await connector.watch([b]);
      await far.say("first", "two");
      await far.say("second", "three");
      await waitFor("second", () => fake.emittedFor(b.id).length === 1);
      assert.equal(fake.emittedFor(a.id).length, 1, "the endpoint no longer watched still relays");
    });

    test(
      "the far side is acknowledged only once emit() has resolved",
      { skip: target.acknowledgesItself === false && "acknowledged by an intermediary" },
      async () => {
        const ep = binding("slow", "in");
        await connector.watch([ep]);
        fake.hold();
        const said = far.say("slow", "wait for it");
        assert.equal(await settlesWithin(said, 500), false, "acknowledged before the core had it");
        fake.release();
        await said;
        await waitFor("the message", () => fake.emittedFor(ep.id).length === 1);
      },
    );

    test("an emit() that fails is not acknowledged; the far side's redelivery is relayed", async () => {
      const ep = binding("flaky", "in");
      await connector.watch([ep]);
      fake.failNextEmit();
      await far.say("flaky", "try again");
      const [m] = await waitFor(
        "the redelivery",
        () => fake.emittedFor(ep.id).length > 0 && fake.emittedFor(ep.id),
      );
      assert.equal(m!.body.text, "try again");
    });

    test("send() delivers; the same OutboundMessage.id again does not deliver twice, and reports the same remote id", async () => {
      const ep = binding("commands", "out");
      await connector.watch([ep]);
      await far.listen("commands");
      const first = await connector.send(outbound("event-1", "turn on"), ep);
      const again = await connector.send(outbound("event-1", "turn on"), ep);
      await connector.send(outbound("event-2", "turn off"), ep);
      await waitFor("both commands", () => far.heard("commands").length >= 2);
      assert.deepEqual(far.heard("commands"), ["turn on", "turn off"]);
      assert.equal(again.remoteId, first.remoteId, "SendResult.remoteId is stable for one message id");
    });

    test("capabilities edits/redactions come with edit()/redact(); a redaction of what was never sent changes nothing", async () => {
      if (def.capabilities.edits) assert.equal(typeof connector.edit, "function");
      if (def.capabilities.redactions) assert.equal(typeof connector.redact, "function");
      if (!connector.redact) return;
      const ep = binding("commands", "out");
      await connector.watch([ep]);
      await far.listen("commands");
      const sender = { userId: "@alice:example.org", displayName: "Alice" };
      await connector.redact(
        { id: "redaction-1", remoteId: "never-sent", sender, timestamp: Date.now() },
        ep,
      );
      await connector.send(outbound("event-after", "after"), ep);
      await waitFor("the message after", () => far.heard("commands").length >= 1);
      assert.deepEqual(far.heard("commands"), ["after"]);
    });

    if (target.refusedForGood) {
      const refused = target.refusedForGood;
      test("a send the far side refuses for good throws PermanentError", async () => {
        const ep = binding("refused", "out");
        await connector.watch([ep]);
        await assert.rejects(
          connector.send({ ...outbound("event-big", ""), ...refused }, ep),
          PermanentError,
        );
      });
    }

    if (target.outage) {
      const outage = target.outage;
      test("a far side away: state leaves up, send() fails as retryable; back: up, and sends work", async () => {
        const ep = binding("outage", "out");
        await connector.watch([ep]);
        await waitFor("up", () => fake.state === "up");
        await outage.begin();
        await waitFor("state no longer up", () => fake.state !== "up");
        const err = await connector.send(outbound("event-away", "queued"), ep).then(
          () => undefined,
          (e: unknown) => e,
        );
        assert.ok(err instanceof Error, "send() to a far side that is away must fail");
        assert.ok(!(err instanceof PermanentError), "a far side away is not the message's fault");
        await outage.end();
        await waitFor("up again", () => fake.state === "up", 20_000);
        await far.listen("outage");
        await connector.send(outbound("event-back", "delivered"), ep);
        await waitFor("delivered", () => far.heard("outage").includes("delivered"));
      });
    }
  });
}
