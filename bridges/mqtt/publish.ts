/** One PUBLISH as the connector sees it, whichever transport it came from. */
export interface Publish {
  /** The publishing client (embedded broker only: an external broker does not say). */
  clientId: string | undefined;
  topic: string;
  payload: Buffer;
  qos: 0 | 1 | 2;
  retain: boolean;
  dup: boolean;
  messageId: number | undefined;
}
