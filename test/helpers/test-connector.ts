/**
 * A connector for tests of the core: it speaks no protocol. A test emits messages as if they came
 * from the far side (`emit`) and reads what the core sent (`sent`); capabilities are chosen per test.
 * Endpoints are `{ channel: string }`.
 */
import { z } from "zod";
import type {
  Capabilities,
  Connector,
  ConnectorContext,
  ConnectorDefinition,
  EndpointBinding,
  InboundMessage,
  OutboundEdit,
  OutboundMessage,
  OutboundRedaction,
  SendResult,
} from "../../src/connector.js";

export interface TestEndpoint {
  channel: string;
}

export interface SentMessage {
  message: OutboundMessage;
  endpoint: EndpointBinding<TestEndpoint>;
  /** The remote id `send` reported back. */
  remoteId: string;
}

export class TestConnector implements Connector<TestEndpoint> {
  readonly sent: SentMessage[] = [];
  /** What `edit` was called with (when the definition has edits), in order; repeats of an id once. */
  readonly edits: { edit: OutboundEdit; endpoint: EndpointBinding<TestEndpoint> }[] = [];
  /** What `redact` was called with, in order; repeats of an id once. */
  readonly redactions: { redaction: OutboundRedaction; endpoint: EndpointBinding<TestEndpoint> }[] = [];
  /** Every `send` call, repeats included (`sent` has each message once, as a far side would show it). */
  readonly calls: SentMessage[] = [];
  watched: readonly EndpointBinding<TestEndpoint>[] = [];
  /** Thrown by the next `send` calls, one each, before anything is recorded. */
  readonly failures: Error[] = [];
  /** While set, every `send` throws it (after `failures`): the far side down, for as long as a test wants. */
  down: Error | undefined;
  private sequence = 0;

  constructor(
    readonly account: string,
    readonly ctx: ConnectorContext,
  ) {}

  async start(): Promise<void> {
    this.ctx.setState("up");
  }

  async watch(endpoints: readonly EndpointBinding<TestEndpoint>[]): Promise<void> {
    this.watched = endpoints;
  }

  /** The binding of the endpoint on `channel` (for `emit`). */
  endpointId(channel: string): string {
    const found = this.watched.find((e) => e.spec.channel === channel);
    if (!found) throw new Error(`no endpoint watches channel ${channel}`);
    return found.id;
  }

  /** A message from the far side on `channel`; resolves once the core has it durably. */
  emit(channel: string, message: Omit<InboundMessage, "endpointIds">): Promise<void> {
    return this.ctx.emit({ ...message, endpointIds: [this.endpointId(channel)] });
  }

  async send(message: OutboundMessage, endpoint: EndpointBinding<TestEndpoint>): Promise<SendResult> {
    this.calls.push({ message, endpoint, remoteId: "" });
    const failure = this.failures.shift() ?? this.down;
    if (failure) throw failure;
    // Idempotent by message id, as the contract asks: a repeat reports the first send's remote id.
    const earlier = this.sent.find((s) => s.message.id === message.id && s.endpoint.id === endpoint.id);
    if (earlier) return { remoteId: earlier.remoteId };
    const remoteId = `${this.account}-out-${++this.sequence}`;
    this.sent.push({ message, endpoint, remoteId });
    return { remoteId };
  }

  async edit(edit: OutboundEdit, endpoint: EndpointBinding<TestEndpoint>): Promise<SendResult> {
    if (!this.edits.some((e) => e.edit.id === edit.id)) this.edits.push({ edit, endpoint });
    return {};
  }

  async redact(redaction: OutboundRedaction, endpoint: EndpointBinding<TestEndpoint>): Promise<void> {
    if (!this.redactions.some((r) => r.redaction.id === redaction.id))
      this.redactions.push({ redaction, endpoint });
  }

  /** What was sent to `channel`, in order. */
  sentTo(channel: string): OutboundMessage[] {
    return this.sent.filter((s) => s.endpoint.spec.channel === channel).map((s) => s.message);
  }

  async stop(): Promise<void> {}
}

/**
 * A definition named `name` (default "test"), with the given capabilities. `withoutChanges`: its
 * instances have no `edit` and `redact` members (whatever the capabilities say).
 */
export function testConnector(
  capabilities: Partial<Capabilities> = {},
  name = "test",
  withoutChanges = false,
): ConnectorDefinition<Record<string, never>, TestEndpoint> {
  return {
    name,
    ghostTag: name,
    description: "a connector for tests",
    capabilities: { html: false, attachments: false, ...capabilities },
    accountSchema: z.object({}).strict() as unknown as z.ZodType<Record<string, never>>,
    endpointSchema: z.object({ channel: z.string().min(1) }).strict(),
    create: (account, _config, ctx) => {
      const instance = new TestConnector(account, ctx);
      if (!withoutChanges) return instance;
      return Object.assign(instance, { edit: undefined, redact: undefined });
    },
  };
}
