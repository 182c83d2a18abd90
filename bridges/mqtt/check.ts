/**
 * `tribridge doctor` for an MQTT account (ConnectorDefinition.check): an embedded broker's ports
 * are free (or held by the running bridge); an external broker takes the account's login.
 */
import { randomBytes } from "node:crypto";
import { createServer } from "node:net";
import mqtt, { type MqttClient } from "mqtt";
import type { CheckContext, CheckResult } from "../../src/connector.js";
import { errorMessage } from "../../src/errors.js";
import { brokerOptions, withoutCredentials } from "./external-client.js";
import type { EmbeddedBrokerConfig, MqttAccount } from "./schema.js";

export async function checkMqttAccount(
  _account: string,
  config: MqttAccount,
  ctx: CheckContext,
): Promise<CheckResult[]> {
  if (config.embedded) return checkEmbeddedPorts(config.embedded, ctx);
  if (config.url) return [await checkBrokerLogin(config, config.url, ctx)];
  return [];
}

/** Each port the embedded broker listens on: free, or (presumably) the running bridge's. */
async function checkEmbeddedPorts(config: EmbeddedBrokerConfig, ctx: CheckContext): Promise<CheckResult[]> {
  const ports: [key: string, port: number | undefined][] = [
    ["embedded.port", config.port],
    ["embedded.tls.port", config.tls?.port],
    ["embedded.websocketPort", config.websocketPort],
  ];
  const results: CheckResult[] = [];
  for (const [key, port] of ports) {
    if (port === undefined) continue;
    const where = `${config.host}:${port}`;
    const problem = await listenProblem(port, config.host);
    if (problem === undefined)
      results.push({ name: "broker", status: "ok", detail: `embedded broker can listen on ${where}` });
    else if (problem === "EADDRINUSE" && ctx.bridgeRunning)
      results.push({
        name: "broker",
        status: "ok",
        detail: `embedded broker: ${where} is in use, presumably by the running tribridge`,
      });
    else
      results.push({
        name: "broker",
        status: "fail",
        detail:
          problem === "EADDRINUSE"
            ? `embedded broker: port ${port} on ${config.host} is already in use (no tribridge runs)`
            : `embedded broker cannot listen on ${where}: ${problem}`,
        fix: `set ${key} to a free port, or stop the program on it (another MQTT broker, such as Mosquitto?)`,
      });
  }
  return results;
}

/** undefined when `host:port` can be listened on; else the error code (or message). */
function listenProblem(port: number, host: string): Promise<string | undefined> {
  return new Promise((resolve) => {
    const server = createServer();
    server.once("error", (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message));
    server.listen(port, host, () => server.close(() => resolve(undefined)));
  });
}

/**
 * Connects with the account's settings and disconnects at once. Under a client id of its own, with
 * a clean session: the account's id would take over the running bridge's connection and session.
 */
async function checkBrokerLogin(config: MqttAccount, url: string, ctx: CheckContext): Promise<CheckResult> {
  const shown = withoutCredentials(url);
  const login = config.username !== undefined ? `the login as ${config.username}` : "an anonymous login";
  const clientId = `tribridge-doctor-${randomBytes(4).toString("hex")}`;
  const client = mqtt.connect(url, {
    ...brokerOptions(config, clientId),
    clean: true,
    properties: undefined,
    reconnectPeriod: 0,
  });
  try {
    await connected(client, ctx.signal);
    return {
      name: "broker",
      status: "ok",
      detail: `${shown} took ${login} (MQTT ${config.protocolVersion === 5 ? "5" : "3.1.1"})`,
    };
  } catch (err) {
    // A CONNACK with a return (3.1.1) or reason code (5): the broker answered, and refused.
    const code = (err as { code?: unknown }).code;
    const refused = typeof code === "number";
    // [MQTT-3.2.2-5] return code 1, MQTT 5 reason code 0x84: it does not speak this version.
    if (code === 1 || code === 0x84)
      return {
        name: "broker",
        status: "fail",
        detail: `${shown} does not speak MQTT ${config.protocolVersion === 5 ? "5" : "3.1.1"}: ${errorMessage(err)}`,
        fix: `set protocolVersion to ${config.protocolVersion === 5 ? "4 (MQTT 3.1.1)" : "5"}`,
      };
    return {
      name: "broker",
      status: "fail",
      detail: refused
        ? `${shown} refused ${login}: ${errorMessage(err)} (tried with client id ${clientId})`
        : `${shown} does not answer: ${errorMessage(err)}`,
      fix: refused
        ? "check username and password (or passwordFile), and the broker's ACL for this user"
        : "check url (host, port, mqtt:// or mqtts://), and ca / rejectUnauthorized for TLS",
    };
  } finally {
    await client.endAsync(true).catch(() => undefined);
  }
}

function connected(client: MqttClient, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    client.once("connect", () => resolve());
    client.once("error", reject);
    client.once("close", () => reject(new Error("connection closed before the broker answered")));
    signal.addEventListener("abort", () => reject(new Error("no answer in time")), { once: true });
  });
}
