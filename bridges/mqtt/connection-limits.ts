/**
 * What a connection may cost the embedded broker before its CONNECT is accepted, alone and all
 * together, and how its misbehaviour is logged.
 *
 * Until its CONNACK, a connection is anyone's: aedes buffers its CONNECT whole before anything looks
 * at it, up to the packet size limit (500 connections each holding a CONNECT just under 320 KB took
 * 156 MB, and the memory stayed with the process after they were gone). Here the first packet must
 * be a CONNECT of at most `maxConnectBytes`, closed at its header otherwise (packet-size-guard.ts);
 * and at most `maxPendingConnections` connections may be between accepted and CONNACK at once: one
 * more is closed as it comes, before anything is read from it. A connection that never sends its
 * CONNECT holds its place for aedes' connectTimeout at most.
 *
 * Malformed connections and refusals are logged through a LogLimiter: a flood costs a line a minute
 * per kind, with the count of those held back, not one per connection.
 */
import type { Socket } from "node:net";
import type { Duplex } from "node:stream";
import type { Aedes, Client } from "aedes";
import { LogLimiter, type Logger } from "../../src/log.js";
import { PACKET_OVERHEAD_BYTES, guardPacketSize, type Refusal } from "./packet-size-guard.js";

export interface ConnectionLimitsConfig {
  maxPayloadBytes: number;
  maxConnectBytes: number;
  maxPendingConnections: number;
}

export class ConnectionLimits {
  /** Connections accepted whose CONNACK has not been sent. */
  private pending = 0;
  private readonly releases = new WeakMap<Client, () => void>();
  private readonly floods = new LogLimiter();

  constructor(
    private readonly config: ConnectionLimitsConfig,
    private readonly log: Logger,
  ) {}

  /** Listens to the broker for the ends of authentication, and for connections that fail before it. */
  watch(broker: Aedes): void {
    broker.on("connackSent", (_packet, client) => this.releases.get(client)?.());
    broker.on("connectionError", (client, err) =>
      this.warn(
        "before-connect",
        { remote: remoteAddress(client.conn), err: err.message },
        "mqtt connection closed before its CONNECT was accepted",
      ),
    );
  }

  /**
   * Hands `stream` to aedes through `handle`, or closes it at once when `maxPendingConnections`
   * connections are still authenticating. Returns the client, if handed over.
   */
  accept(stream: Duplex, handle: () => Client): Client | undefined {
    const { maxPendingConnections, maxConnectBytes, maxPayloadBytes } = this.config;
    if (this.pending >= maxPendingConnections) {
      this.warn(
        "pending",
        { remote: remoteAddress(stream), maxPendingConnections },
        "mqtt connection refused: too many connections still authenticating",
      );
      stream.on("error", () => undefined);
      stream.destroy();
      return undefined;
    }
    this.pending++;
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      this.pending--;
    };
    stream.once("close", release);
    const client = handle();
    this.releases.set(client, release);
    guardPacketSize(
      stream,
      maxPayloadBytes + PACKET_OVERHEAD_BYTES,
      (declared) => this.refused(stream, declared),
      maxConnectBytes,
    );
    return client;
  }

  /** A packet malformed-packet-guard.ts refused: the connection is closed. */
  malformed(client: Client, problem: string, packet: string): void {
    this.warn(
      "malformed",
      { clientId: client.id ?? undefined, remote: remoteAddress(client.conn), packet, problem },
      "mqtt connection closed: malformed packet",
    );
  }

  private refused(stream: Duplex, declared: Refusal): void {
    const remote = remoteAddress(stream);
    if (declared === "not-connect")
      this.warn("malformed", { remote }, "mqtt connection closed: its first packet was not a CONNECT");
    else if (declared === "malformed")
      this.warn("malformed", { remote }, "mqtt connection closed: a malformed packet length");
    else
      this.warn(
        "too-large",
        {
          remote,
          declared,
          maxPayloadBytes: this.config.maxPayloadBytes,
          maxConnectBytes: this.config.maxConnectBytes,
        },
        "mqtt connection closed: a packet larger than the size limit was coming",
      );
  }

  /** One line a minute per kind of trouble, saying how many were not logged since the last. */
  private warn(kind: string, fields: Record<string, unknown>, message: string): void {
    const gate = this.floods.pass(kind);
    if (gate) this.log.warn({ ...fields, kind, notLoggedSinceLastLine: gate.heldBack }, message);
  }
}

function remoteAddress(stream: Duplex): string | undefined {
  return (stream as Partial<Socket>).remoteAddress;
}
