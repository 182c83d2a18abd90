/**
 * `!tribridge link` arguments against the schema of each connector, without a homeserver: real
 * Redis under a fresh prefix, a route table, and the answers as an admin reads them.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { Redis } from "ioredis";
import { connectors } from "../../bridges/index.js";
import { validateConfig, type ResolvedRoute } from "../../src/config/load.js";
import { rootLogger } from "../../src/log.js";
import {
  MAX_LINKS,
  MAX_LINKS_PER_ROOM,
  RoomLinks,
  type RoomLinksOptions,
} from "../../src/routing/room-links.js";
import { RouteTable } from "../../src/routing/route-table.js";
import { redisKeys } from "../../src/store/keys.js";
import { REDIS_URL, deleteKeys } from "../helpers/fixture.js";

const ROOM = "!room:example.org";
const prefix = `test-${randomUUID().slice(0, 8)}`;
let redis: Redis;
let options: RoomLinksOptions;
let links: RoomLinks;
let applied: readonly ResolvedRoute[] = [];

before(async () => {
  redis = new Redis(REDIS_URL);
  const config = validateConfig(
    {
      homeserver: { url: "http://localhost:8008", domain: "example.org" },
      bridges: {
        mqtt: { home: { embedded: { port: 1883 } } },
        email: {
          office: {
            address: "bridge@example.org",
            imap: { host: "imap.example.org", user: "bridge", pass: "x" },
            smtp: { host: "smtp.example.org", user: "bridge", pass: "x" },
          },
        },
      },
    },
    connectors,
  );
  let last = Promise.resolve<unknown>(undefined);
  options = {
    redis,
    prefix,
    config,
    connectors,
    table: new RouteTable([]),
    routeDefaults: () => ({ invite: [], permissions: config.permissions }),
    exclusive: <T>(change: () => Promise<T>) => {
      const next = last.then(change);
      last = next.catch(() => undefined);
      return next;
    },
    apply: async (routes) => {
      applied = routes;
      return [];
    },
    log: rootLogger,
  };
  links = new RoomLinks(options);
  await links.load();
});

after(async () => {
  await deleteKeys(prefix);
  redis.disconnect();
});

test("email: the address is `to`; options are the endpoint's keys; errors name the field", async () => {
  assert.match(
    await links.link(ROOM, "@a:example.org", "email.office not-an-address out"),
    /^Not linked: to\[0\]: /,
  );
  assert.equal(
    await links.link(ROOM, "@a:example.org", "email.office ops@example.org out token=ops"),
    "Not linked: token: needs plusAddressing: true on the account (bridge@example.org)",
  );
  assert.match(
    await links.link(ROOM, "@a:example.org", "email.office ops@example.org out to=[b@example.org]"),
    /^Not linked: to is the address/,
  );
  assert.match(
    await links.link(
      ROOM,
      "@a:example.org",
      `email.office ops@example.org out subject="[lab] alerts" cc=[b@example.org]`,
    ),
    /^Linked email\.office ops@example\.org \(out\) to this room, as endpoint room-/,
  );
  const endpoint = applied[0]!.endpoints[0]!;
  assert.deepEqual(
    { direction: endpoint.direction, ...(endpoint.spec as Record<string, unknown>) },
    {
      direction: "out",
      to: ["ops@example.org"],
      cc: ["b@example.org"],
      subject: "[lab] alerts",
      threading: "route",
      default: false,
      allowLists: false,
    },
  );
});

test("mqtt: nested and typed options; nothing reaches a prototype", async () => {
  assert.match(
    await links.link(
      ROOM,
      "@a:example.org",
      "mqtt.home dev/+/t in sender.topicLevel=2 format=json live=true",
    ),
    /^Linked /,
  );
  const endpoint = applied[0]!.endpoints.find((e) => e.connector === "mqtt")!;
  assert.equal(endpoint.live, true);
  assert.deepEqual((endpoint.spec as { sender: unknown }).sender, { topicLevel: 2 });
  assert.equal(
    await links.link(ROOM, "@a:example.org", "mqtt.home dev/+/t in __proto__.polluted=1"),
    "Not linked: __proto__.polluted: not a config key",
  );
  assert.equal(({} as Record<string, unknown>).polluted, undefined);
  assert.match(
    await links.link(ROOM, "@a:example.org", "mqtt.home x/y in direction=out"),
    /^Not linked: direction is given by position/,
  );
  assert.match(
    await links.link(ROOM, "@a:example.org", "mqtt.home x/y in qos"),
    /^Not linked: "qos" is not key=value/,
  );
  assert.match(
    await links.link(ROOM, "@a:example.org", "mqtt.home x/y in live=true sender=clientId"),
    /^Linked /,
  );
  assert.match(
    await links.link(ROOM, "@a:example.org", "mqtt.home x/z out live=true"),
    /^Not linked: live: only for endpoints that relay in/,
  );
});

test("stored as given, and read back: another RoomLinks on the same Redis sees the same routes", async () => {
  const again = new RoomLinks({
    ...(links as unknown as { o: ConstructorParameters<typeof RoomLinks>[0] }).o,
  });
  await again.load();
  assert.deepEqual(again.routes(), applied);
  assert.match(await links.unlink(ROOM, "mqtt.home dev/+/t"), /^Unlinked room-/);
  assert.equal(applied[0]!.endpoints.length, 2);
});

test("links are capped: per room, and over all rooms; the answer says which and what to do", async () => {
  const capPrefix = `${prefix}-cap`;
  const capped = new RoomLinks({ ...options, prefix: capPrefix });
  const stored = (room: number, n: number) =>
    JSON.stringify({
      route: `room-cap${room}`,
      links: Array.from({ length: n }, (_, i) => ({
        endpoint: { account: "mqtt.home", direction: "out", topic: `cap/${room}/${i}` },
        by: "@a:example.org",
        at: 0,
      })),
    });
  const key = redisKeys.roomLinks(capPrefix);
  await redis.hset(key, "!full:example.org", stored(0, MAX_LINKS_PER_ROOM));
  assert.equal(
    await capped.link("!full:example.org", "@a:example.org", "mqtt.home cap/more out"),
    `Not linked: this room has ${MAX_LINKS_PER_ROOM} links, the most a room may have (${MAX_LINKS_PER_ROOM}); !tribridge unlink one first, or add a route to the config file`,
  );
  const rooms = MAX_LINKS / MAX_LINKS_PER_ROOM;
  for (let r = 1; r < rooms; r++) await redis.hset(key, `!r${r}:example.org`, stored(r, MAX_LINKS_PER_ROOM));
  assert.equal(
    await capped.link("!new:example.org", "@a:example.org", "mqtt.home cap/new out"),
    `Not linked: the rooms have ${MAX_LINKS} links together, the most tribridge takes (${MAX_LINKS}); unlink some, or add routes to the config file`,
  );
  await redis.hdel(key, "!r1:example.org");
  assert.match(await capped.link("!new:example.org", "@a:example.org", "mqtt.home cap/new out"), /^Linked /);
  await deleteKeys(capPrefix);
});
