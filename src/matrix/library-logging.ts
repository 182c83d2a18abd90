/**
 * matrix-appservice-bridge and its bot-sdk log through winston to the console by default. Send
 * their lines into our log instead, one level lower (they are chatty), and drop the expected
 * `M_USER_IN_USE` noise of registering a ghost that already exists.
 */
import { Writable } from "node:stream";
import { Logger as BridgeLogger } from "matrix-appservice-bridge";
import { moduleLogger } from "../log.js";
import { withoutNetworkStack } from "../log-format.js";

const log = moduleLogger("matrix-sdk");
const EXPECTED = /M_USER_IN_USE|User ID is in use|already taken/;

let configured = false;

export function routeLibraryLogs(): void {
  if (configured) return;
  configured = true;
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      try {
        const entry = JSON.parse(chunk.toString("utf8")) as {
          level?: string;
          module?: string;
          message?: string;
        };
        // A network error's stack (the homeserver down, say) says nothing: its message alone.
        const message = withoutNetworkStack(`${entry.module ?? ""} ${entry.message ?? ""}`.trim());
        const level = entry.level?.toLowerCase();
        if (EXPECTED.test(message) || level === "debug" || level === "info" || level === "trace")
          log.debug(message);
        else if (level === "warn") log.info(message);
        else log.warn(message);
      } catch {
        log.debug(chunk.toString("utf8").trim());
      }
      done();
    },
  });
  BridgeLogger.root.configureLogging({ console: "off", json: true }, sink);
}
