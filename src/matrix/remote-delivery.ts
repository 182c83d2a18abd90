/**
 * Queue → remote: hands a room message to the connector of its endpoint's account (the worker of
 * each to-<connector> queue). One call per queued item; the item id is the message's id, so the
 * connector can make a repeat harmless.
 */
import type { Connector, ConnectorDefinition } from "../connector.js";
import { PermanentError } from "../errors.js";
import { bindingOf, type RouteTable } from "../routing/route-table.js";
import { renderOutbound, type ToRemoteJob } from "./event-intake.js";
import type { MatrixClient } from "./matrix-client.js";

export class RemoteDelivery {
  constructor(
    private readonly matrix: MatrixClient,
    private readonly routes: RouteTable,
    /** The running connector of `<connector>.<account>`, if it runs. */
    private readonly instanceOf: (ref: string) => Connector<unknown> | undefined,
  ) {}

  /** Delivers one item of `def`'s queue. */
  async deliver(def: ConnectorDefinition, job: ToRemoteJob, id: string): Promise<void> {
    const { matrix, routes } = this;
    const endpoint = routes.outbound(job.endpointId);
    if (!endpoint) throw new PermanentError(`endpoint ${job.endpointId} is no longer configured`);
    const instance = this.instanceOf(`${endpoint.connector}.${endpoint.account}`);
    if (!instance)
      throw new PermanentError(`account ${endpoint.connector}.${endpoint.account} is not running`);
    const binding = bindingOf(endpoint);
    const withFiles = def.capabilities.attachments && (instance.usesAttachments?.(binding) ?? true);
    const message = await renderOutbound(matrix, job, id, {
      html: def.capabilities.html,
      attachments: withFiles,
      maxAttachmentBytes: def.capabilities.maxAttachmentBytes,
      maxTextBytes: def.capabilities.maxTextBytes,
    });
    await instance.send(message, binding);
  }
}
