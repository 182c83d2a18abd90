/**
 * `tribridge doctor` for a mailbox (ConnectorDefinition.check): IMAP takes the login and has the
 * folder read; SMTP answers and takes the login (nodemailer's verify: EHLO, STARTTLS, AUTH, no mail).
 */
import type { CheckContext, CheckResult } from "../../src/connector.js";
import { errorMessage } from "../../src/errors.js";
import { createImapClient } from "./mailbox-reader.js";
import type { EmailAccount } from "./schema.js";
import { createSmtpTransport } from "./smtp.js";

export async function checkMailbox(
  _account: string,
  config: EmailAccount,
  ctx: CheckContext,
): Promise<CheckResult[]> {
  return [await checkImap(config, ctx), await checkSmtp(config, ctx)];
}

const serverFix = (side: string) =>
  `check ${side}.host, ${side}.port and ${side}.security (tls, starttls, none), and ${side}.ca / ${side}.rejectUnauthorized for TLS`;
const loginFix = (side: string) => `check ${side}.user and ${side}.pass (or ${side}.passFile)`;

async function checkImap(config: EmailAccount, ctx: CheckContext): Promise<CheckResult> {
  const { host, port, user } = config.imap;
  const server = `${host}:${port}`;
  const client = createImapClient(config);
  client.on("error", (err: unknown) => ctx.log.debug({ err: errorMessage(err) }, "imap error"));
  const onAbort = () => client.close();
  ctx.signal.addEventListener("abort", onAbort, { once: true });
  try {
    try {
      await client.connect();
    } catch (err) {
      const refused = (err as { authenticationFailed?: unknown }).authenticationFailed === true;
      return refused
        ? fail("imap", `${server} refused the login as ${user}: ${imapReason(err)}`, loginFix("imap"))
        : fail("imap", `${server} does not answer: ${imapReason(err)}`, serverFix("imap"));
    }
    const status = await client
      .status(config.mailbox, { messages: true })
      .catch((err: unknown) => (err instanceof Error ? err : new Error(String(err))));
    if (status === false || status instanceof Error)
      return fail(
        "imap",
        `${server} took the login as ${user}, but has no folder ${config.mailbox}` +
          (status instanceof Error ? `: ${imapReason(status)}` : ""),
        "set mailbox to a folder of this account (INBOX is the usual one)",
      );
    return {
      name: "imap",
      status: "ok",
      detail: `${server} took the login as ${user}; ${config.mailbox} holds ${status.messages ?? "?"} mail(s)`,
    };
  } finally {
    ctx.signal.removeEventListener("abort", onAbort);
    await client.logout().catch(() => client.close());
  }
}

/** imapflow's errors say little in their message; the server's own words are in `responseText`. */
function imapReason(err: unknown): string {
  const { responseText, code } = err as { responseText?: unknown; code?: unknown };
  const said = typeof responseText === "string" && responseText !== "" ? responseText : undefined;
  const message = errorMessage(err);
  const more = [said, typeof code === "string" ? code : undefined].filter((s) => s && !message.includes(s));
  return [message, ...more].join(": ");
}

async function checkSmtp(config: EmailAccount, ctx: CheckContext): Promise<CheckResult> {
  const { host, port, user } = config.smtp;
  const server = `${host}:${port}`;
  const transport = createSmtpTransport(config);
  const onAbort = () => transport.close();
  ctx.signal.addEventListener("abort", onAbort, { once: true });
  try {
    await transport.verify();
    return { name: "smtp", status: "ok", detail: `${server} took the login as ${user}` };
  } catch (err) {
    const e = err as { code?: string; response?: string };
    return e.code === "EAUTH"
      ? fail(
          "smtp",
          `${server} refused the login as ${user}: ${e.response ?? errorMessage(err)}`,
          loginFix("smtp"),
        )
      : fail("smtp", `${server} does not answer as expected: ${errorMessage(err)}`, serverFix("smtp"));
  } finally {
    ctx.signal.removeEventListener("abort", onAbort);
    transport.close();
  }
}

function fail(name: string, detail: string, fix: string): CheckResult {
  return { name, status: "fail", detail, fix };
}
