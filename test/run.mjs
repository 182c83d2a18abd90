#!/usr/bin/env node
// Runs the test files under the given folders (default: test/unit test/conformance test/e2e) with node:test + tsx.
// Node 20's --test cannot glob, so the files are listed here.
import { existsSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { spawnSync } from "node:child_process";

const roots =
  process.argv.slice(2).length > 0 ? process.argv.slice(2) : ["test/unit", "test/conformance", "test/e2e"];
const files = [];
function walk(p) {
  if (statSync(p).isDirectory()) for (const name of readdirSync(p).sort()) walk(join(p, name));
  else if (p.endsWith(".test.ts")) files.push(p);
}
for (const r of roots) if (existsSync(r)) walk(r);
if (files.length === 0) {
  console.error(`no test files under ${roots.join(", ")}`);
  process.exit(1);
}
const result = spawnSync(
  process.execPath,
  [
    "--import",
    "tsx",
    "--test",
    "--test-reporter=spec",
    "--test-concurrency=1",
    "--test-force-exit",
    // util._extend, called by a Matrix library as it loads (see src/library-warnings.ts)
    "--disable-warning=DEP0060",
    ...files,
  ],
  {
    stdio: "inherit",
    env: { ...process.env, TRIBRIDGE_LOG_LEVEL: process.env.TRIBRIDGE_LOG_LEVEL ?? "warn" },
  },
);
process.exit(result.status ?? 1);
