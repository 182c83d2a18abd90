import { checkMailbox } from "./check.js";
import type { BridgedPlace, ConnectorDefinition } from "../../src/connector.js";
import { EmailConnector } from "./connector.js";
import { plusAddress } from "./message-ids.js";
import { emailSampleConfig } from "./sample-config.js";
import {
  EMAIL_DEFAULTS,
  checkEmailEndpoint,
  emailAccountSchema,
  emailEndpointSchema,
  type EmailAccount,
  type EmailEndpoint,
} from "./schema.js";

export const emailConnector: ConnectorDefinition<EmailAccount, EmailEndpoint> = {
  name: "email",
  displayName: "Email",
  ghostTag: "mail",
  description: "Email accounts: an ordinary mailbox, read by IMAP and written to by SMTP",
  // Mail threads live long (threads: true keeps the Message-ID ⇄ event map 90 days). No edits or
  // redactions: a mail once sent cannot be changed or taken back.
  capabilities: {
    html: true,
    attachments: true,
    maxAttachmentBytes: EMAIL_DEFAULTS.maxAttachmentBytes,
    maxAttachments: EMAIL_DEFAULTS.maxAttachments,
    threads: true,
    edits: false,
    redactions: false,
  },
  accountSchema: emailAccountSchema,
  endpointSchema: emailEndpointSchema,
  sample: emailSampleConfig,
  checkEndpoint: checkEmailEndpoint,
  // `!tribridge link email.<account> <address> …`: the room's messages go to that address, and its
  // answers (threaded by Message-ID) come back.
  link: { target: "address", fields: (address) => ({ to: [address] }) },
  // Where mail goes to and comes from: the endpoint's token (its own address) when it has one, else
  // its recipients. Subject, cc, threading and default say how, and changing them keeps the endpoint.
  endpointKey: (endpoint) =>
    endpoint.token !== undefined ? `token:${endpoint.token}` : `to:${[...endpoint.to].sort().join(",")}`,
  check: checkMailbox,
  describeEndpoint: (endpoint, { config }) => ({
    network: { id: config.address.toLowerCase(), displayName: config.address },
    channel: channelOf(endpoint, config),
  }),
  create: (_account, config, ctx) => new EmailConnector(config, ctx),
};

/**
 * The addresses an endpoint's mail goes to or comes from: its own plus address when it has a
 * token, its recipients, or (mail read from the mailbox, to no one in particular) the mailbox.
 */
function channelOf(endpoint: EmailEndpoint, config: EmailAccount): BridgedPlace {
  if (endpoint.token !== undefined) return { id: plusAddress(config.address, endpoint.token).toLowerCase() };
  if (endpoint.to.length === 0) return { id: config.address.toLowerCase(), displayName: config.address };
  const to = [...endpoint.to].sort();
  return {
    id: to.map((a) => a.toLowerCase()).join(","),
    displayName: `${endpoint.subject} (${to.join(", ")})`,
  };
}
