import { test } from "node:test";
import assert from "node:assert/strict";
import { parseClusterUrl, redisKeyPrefix } from "../../src/store/redis-url.js";

test("a redis+cluster:// URL gives its nodes and credentials", () => {
  assert.deepEqual(parseClusterUrl("redis+cluster://bridge:p%40ss@a.example:7000,10.0.0.2:7001/"), {
    nodes: [
      { host: "a.example", port: 7000 },
      { host: "10.0.0.2", port: 7001 },
    ],
    username: "bridge",
    password: "p@ss",
    tls: false,
  });
  assert.deepEqual(parseClusterUrl("rediss+cluster://[::1]:7000"), {
    nodes: [{ host: "::1", port: 7000 }],
    tls: true,
  });
  assert.equal(parseClusterUrl("redis+cluster://a:70000"), '"a:70000" is not host:port');
  assert.match(parseClusterUrl("redis+cluster://a:1/0") as string, /^must be redis\+cluster:/);
});

test("on a cluster every key carries one hash tag: the prefix in braces", () => {
  assert.equal(redisKeyPrefix({ redisUrl: "redis+cluster://a:1", prefix: "tb" }), "{tb}");
  assert.equal(redisKeyPrefix({ redisUrl: "redis://a:1", prefix: "tb" }), "tb");
  assert.equal(redisKeyPrefix({ redisUrl: undefined, prefix: "tb" }), "tb");
});
