/** Runs the bridge as its own process through the CLI, as a user would (crash tests, benchmarks). */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { registrationYaml } from "../../src/matrix/registration.js";
import type { Harness } from "./fixture.js";

export interface BridgeProcessOptions {
  built?: boolean;
  /** TRIBRIDGE_LOG_LEVEL of the bridge; default "error". */
  logLevel?: string;
  /** Keep what the bridge writes (its log lines on stdout, CLI messages on stderr) in `stdout`/`stderr`. */
  capture?: boolean;
}

export class BridgeProcess {
  private child: ChildProcess | undefined;
  private readonly dir: string;
  /** With `capture`: the log lines (JSON) the bridge wrote, over all its starts. */
  readonly stdout: string[] = [];
  /** With `capture`: what it wrote to stderr. */
  stderr = "";
  /** How the last start ended; undefined while it runs. */
  exit: { code: number | null; signal: NodeJS.Signals | null } | undefined;

  /**
   * `built: true` runs the compiled CLI (`dist/`, from `npm run build`) as `npm start` does, for
   * measurements; otherwise the TypeScript sources through tsx, so tests need no build.
   */
  constructor(
    h: Harness,
    private readonly opts: BridgeProcessOptions = {},
  ) {
    this.dir = mkdtempSync(join(tmpdir(), "tribridge-proc-"));
    this.writeConfig(h.rawConfig);
    writeFileSync(join(this.dir, "registration.yaml"), registrationYaml(h.registration));
  }

  /** Replaces the config file the bridge reads (at its next start, or SIGHUP); text as it is, or YAML of `raw`. */
  writeConfig(raw: Record<string, unknown> | string): void {
    writeFileSync(join(this.dir, "config.yaml"), typeof raw === "string" ? raw : stringify(raw));
  }

  /** Sends `signal` to the running bridge and returns at once (SIGHUP: it reloads its config). */
  signal(signal: NodeJS.Signals): void {
    this.child?.kill(signal);
  }

  start(): void {
    this.exit = undefined;
    const child = (this.child = spawn(
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
        stdio: this.opts.capture
          ? ["ignore", "pipe", "pipe"]
          : ["ignore", process.env.BRIDGE_NODE_ARGS ? "inherit" : "ignore", "inherit"],
        env: { ...process.env, TRIBRIDGE_LOG_LEVEL: this.opts.logLevel ?? "error" },
      },
    ));
    child.once("exit", (code, signal) => (this.exit = { code, signal }));
    if (!this.opts.capture) return;
    let partial = "";
    child.stdout?.on("data", (d: Buffer) => {
      const lines = (partial + d.toString()).split("\n");
      partial = lines.pop()!;
      this.stdout.push(...lines);
    });
    child.stderr?.on("data", (d: Buffer) => (this.stderr += d.toString()));
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
