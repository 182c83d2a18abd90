/**
 * Where the CLI keeps the registration, as a user meets it in a checkout: the tracked sample
 * `registration.yaml` (placeholder tokens) is recognised, named and never written over; the real
 * one goes to the data directory.
 */
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { stringify } from "yaml";
import { REDIS_URL, deleteKeys, freePort } from "../helpers/fixture.js";

const CLI = fileURLToPath(new URL("../../src/index.ts", import.meta.url));
const SAMPLE = fileURLToPath(new URL("../../registration.yaml", import.meta.url));
const TSX = import.meta.resolve("tsx");
const dirs: string[] = [];
const prefix = `test-${randomUUID().slice(0, 8)}`;

after(async () => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  await deleteKeys(prefix);
});

/** A directory like a fresh checkout: only the sample registration. */
function checkout(): string {
  const dir = mkdtempSync(join(tmpdir(), "tribridge-cli-"));
  dirs.push(dir);
  copyFileSync(SAMPLE, join(dir, "registration.yaml"));
  return dir;
}

/** Runs the CLI in `cwd`; resolves when it exits, or when `until` is printed (then stops it). */
function cli(cwd: string, args: string[], until?: RegExp): Promise<{ status: number | null; out: string }> {
  const env: NodeJS.ProcessEnv = { ...process.env, TRIBRIDGE_LOG_LEVEL: "error" };
  delete env.TRIBRIDGE_CONFIG;
  delete env.TRIBRIDGE_REGISTRATION;
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ["--import", TSX, CLI, ...args], { cwd, env });
    let out = "";
    const take = (d: Buffer) => {
      out += d.toString();
      if (until?.test(out)) child.kill("SIGTERM");
    };
    child.stdout.on("data", take);
    child.stderr.on("data", take);
    child.on("exit", (status) => resolve({ status, out }));
  });
}

const HS = ["--homeserver", "http://127.0.0.1:1", "--domain", "example.org"];

test("generate-registration writes data/registration.yaml, leaves the sample alone, and never writes over it", async () => {
  const dir = checkout();
  const first = await cli(dir, ["generate-registration", ...HS]);
  assert.equal(first.status, 0, first.out);
  assert.match(first.out, new RegExp(`Registration: ${join(dir, "data", "registration.yaml")}`));
  assert.equal(readFileSync(join(dir, "registration.yaml"), "utf8"), readFileSync(SAMPLE, "utf8"));
  assert.match(readFileSync(join(dir, "data", "registration.yaml"), "utf8"), /as_token: [0-9a-f]{64}/);

  const again = await cli(dir, ["generate-registration", ...HS]);
  assert.equal(again.status, 1);
  assert.match(again.out, /data\/registration\.yaml exists; use --force/);

  const onSample = await cli(dir, ["generate-registration", ...HS, "-r", "registration.yaml", "--force"]);
  assert.equal(onSample.status, 1);
  assert.match(
    onSample.out,
    /registration\.yaml is a sample registration \(placeholder tokens\).*never writes over it/,
  );
  assert.equal(readFileSync(join(dir, "registration.yaml"), "utf8"), readFileSync(SAMPLE, "utf8"));
});

test("the first start generates the registration in the data directory and says the sample was left alone", async () => {
  const dir = checkout();
  const config = {
    homeserver: { url: "http://127.0.0.1:1", domain: "example.org" },
    appservice: { port: await freePort() },
    queue: { redisUrl: REDIS_URL, prefix },
    bridges: { mqtt: { default: { embedded: { port: 0 } } } },
  };
  writeFileSync(join(dir, "config.yaml"), stringify(config));
  const started = await cli(dir, ["start"], /Register it with your homeserver/);
  const generated = join(dir, "data", "registration.yaml");
  assert.match(
    started.out,
    new RegExp(
      `No registration yet: generated ${generated} with fresh tokens \\(${join(".", "registration.yaml")} is a sample`,
    ),
  );
  assert.ok(existsSync(generated));
  assert.equal(readFileSync(join(dir, "registration.yaml"), "utf8"), readFileSync(SAMPLE, "utf8"));
});
