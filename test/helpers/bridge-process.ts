/** Runs the bridge as its own process through the CLI, as a user would (crash tests, benchmarks). */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { registrationYaml } from "../../src/matrix/registration.js";
import type { Harness } from "./fixture.js";

export class BridgeProcess {
  private child: ChildProcess | undefined;
  private readonly dir: string;

  /**
   * `built: true` runs the compiled CLI (`dist/`, from `npm run build`) as `npm start` does, for
   * measurements; otherwise the TypeScript sources through tsx, so tests need no build.
   */
  constructor(
    h: Harness,
    private readonly opts: { built?: boolean } = {},
  ) {
    this.dir = mkdtempSync(join(tmpdir(), "tribridge-proc-"));
    writeFileSync(join(this.dir, "config.yaml"), stringify(h.rawConfig));
    writeFileSync(join(this.dir, "registration.yaml"), registrationYaml(h.registration));
  }

  start(): void {
    this.child = spawn(
      process.execPath,
      [
        // Extra node flags for the bridge alone, e.g. BRIDGE_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/p"
        // or "--trace-gc" (its stdout is passed through).
        ...(process.env.BRIDGE_NODE_ARGS?.split(" ").filter(Boolean) ?? []),
        ...(this.opts.built ? ["dist/src/index.js"] : ["--import", "tsx", "src/index.ts"]),
        "start",
        "-c",
        join(this.dir, "config.yaml"),
        "-r",
        join(this.dir, "registration.yaml"),
      ],
      {
        stdio: ["ignore", process.env.BRIDGE_NODE_ARGS ? "inherit" : "ignore", "inherit"],
        env: { ...process.env, TRIBRIDGE_LOG_LEVEL: "error" },
      },
    );
  }

  get pid(): number | undefined {
    return this.child?.pid;
  }

  /** Sends `signal` and waits for the process to exit. */
  async kill(signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((r) => child.once("exit", r));
    child.kill(signal);
    await exited;
  }
}
