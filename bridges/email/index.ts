import type { ConnectorDefinition } from "../../src/connector.js";
import { checkMailbox } from "./check.js";
import { EmailConnector } from "./connector.js";
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
  create: (_account, config, ctx) => new EmailConnector(config, ctx),
};
