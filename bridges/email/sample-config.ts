import type { SampleConfig } from "../../src/connector.js";

/**
 * The email part of config/config.sample.yaml: one mailbox of a mail provider, and a route whose
 * room is one mail thread with two people; their answers come back into the room.
 */
export const emailSampleConfig: SampleConfig = {
  accounts: {
    office: {
      address: "bridge@example.org",
      plusAddressing: true,
      imap: { host: "imap.example.org", user: "bridge@example.org", pass: "change-me" },
      smtp: { host: "smtp.example.org", user: "bridge@example.org", pass: "change-me" },
    },
  },
  route: {
    id: "support",
    endpoints: [
      {
        account: "email.office",
        direction: "inout",
        to: ["alice@example.org", "bob@example.org"],
        subject: "Support room",
        token: "support",
      },
    ],
  },
};
