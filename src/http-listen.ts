/** Starting and stopping the bridge's HTTP listeners (appservice, metrics) with clear errors. */
import type { Server } from "node:http";

/**
 * Listens on host:port; resolves with the port bound (port 0 picks a free one). A port in use is
 * reported with the config key that sets it, e.g. "appservice.port 9993 on 127.0.0.1 is already in use".
 */
export async function listen(server: Server, port: number, host: string, configKey: string): Promise<number> {
  await new Promise<void>((resolve, reject) => {
    server.once("error", (err: NodeJS.ErrnoException) =>
      reject(
        new Error(
          err.code === "EADDRINUSE"
            ? `${configKey}.port ${port} on ${host} is already in use`
            : `${configKey} cannot listen on ${host}:${port}: ${err.message}`,
        ),
      ),
    );
    server.listen(port, host, () => resolve());
  });
  const address = server.address();
  return typeof address === "object" && address ? address.port : port;
}

/** Stops listening and drops keep-alive connections, so stopping never waits for idle clients. */
export function close(server: Server | undefined): Promise<void> {
  if (!server) return Promise.resolve();
  return new Promise<void>((resolve) => {
    server.close(() => resolve());
    server.closeAllConnections();
  });
}

/** Where a listener on `bind`:`port` is reached from this machine (`host:port`, for a URL). */
export function localAddress(bind: string, port: number): string {
  const anyAddress = ["0.0.0.0", "::", "[::]"].includes(bind);
  const host = anyAddress ? "127.0.0.1" : bind.includes(":") && !bind.startsWith("[") ? `[${bind}]` : bind;
  return `${host}:${port}`;
}
