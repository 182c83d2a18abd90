/**
 * `tribridge ready` (the container health check): asks the bridge its config describes for
 * GET /ready on the configured appservice port, and exits 0 only when it answers 200.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { BridgeProcess } from "../helpers/bridge-process.js";
import { freePort, harness, waitFor } from "../helpers/fixture.js";

function ready(configFile: string): Promise<{ status: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ["--import", "tsx", "src/index.ts", "ready", "-c", configFile], {
      env: { ...process.env, TRIBRIDGE_LOG_LEVEL: "error" },
    });
    let out = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr.on("data", (d: Buffer) => (out += d.toString()));
    child.on("exit", (status) => resolve({ status, out }));
  });
}

test("tribridge ready: 0 while the bridge is ready, 1 once it is gone", { timeout: 60_000 }, async (t) => {
  const h = await harness({ bridges: { mqtt: { home: { embedded: { port: await freePort() } } } } });
  t.after(() => h.cleanup());
  const dir = mkdtempSync(join(tmpdir(), "tribridge-ready-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const configFile = join(dir, "config.yaml");
  writeFileSync(configFile, stringify(h.rawConfig));

  const bridge = new BridgeProcess(h);
  t.after(() => bridge.kill("SIGKILL"));
  bridge.start();
  const up = await waitFor(
    "the bridge ready",
    async () => {
      const r = await ready(configFile);
      return r.status === 0 && r;
    },
    30_000,
  );
  assert.match(up.out, /^200 .*"status":"ready"/);
  await bridge.kill("SIGTERM");

  const down = await ready(configFile);
  assert.equal(down.status, 1, down.out);
  assert.match(down.out, new RegExp(`127\\.0\\.0\\.1:${h.config.appservice.port}/ready`));
});
