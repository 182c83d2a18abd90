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
  /** MQTT 5 (external broker only): where the publisher wants an answer [MQTT-3.3.2-14]. */
  responseTopic?: string;
  /** MQTT 5: the publisher's correlation data, binary, as received (up to 64 KiB and more). */
  correlationData?: Buffer;
}
