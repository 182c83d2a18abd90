/**
 * The email connector's `check` (tribridge doctor) against a real mail server (Postfix + Dovecot,
 * test/mail-server): IMAP login and folder, SMTP login; each refusal with what to check.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { emailConnector } from "../../bridges/email/index.js";
import { emailAccountSchema } from "../../bridges/email/schema.js";
import { rootLogger } from "../../src/log.js";
import { freePort } from "../helpers/fixture.js";
import {
  NO_MAIL_SERVER,
  canRunMailServer,
  startMailServer,
  type MailServer,
} from "../helpers/mail-server.js";

describe("email: doctor's check of a mailbox", { skip: !canRunMailServer && NO_MAIL_SERVER }, () => {
  let mail: MailServer;
  before(async () => {
    mail = await startMailServer();
  });
  after(async () => {
    await mail?.stop();
  });

  const check = (account: Record<string, unknown>) =>
    emailConnector.check!("ops", emailAccountSchema.parse(account), {
      log: rootLogger,
      signal: AbortSignal.timeout(15_000),
      bridgeRunning: false,
    });

  test("the right logins: imap (with the folder) and smtp ok", async () => {
    const results = await check(mail.bridgeAccount());
    assert.deepEqual(
      results.map((r) => [r.name, r.status]),
      [
        ["imap", "ok"],
        ["smtp", "ok"],
      ],
      JSON.stringify(results),
    );
    assert.match(results[0]!.detail, /took the login as bridge@localhost; INBOX holds \d+ mail\(s\)/);
    assert.match(
      results[1]!.detail,
      new RegExp(`127\\.0\\.0\\.1:${mail.smtpPort} took the login as bridge@localhost`),
    );
  });

  test("a wrong password: both fail, each saying to check its user and pass", async () => {
    const account = mail.bridgeAccount() as { imap: object; smtp: object };
    const [imap, smtp] = await check({
      ...account,
      imap: { ...account.imap, pass: "wrong" },
      smtp: { ...account.smtp, pass: "wrong" },
    });
    assert.equal(imap!.status, "fail");
    assert.match(imap!.detail, /refused the login as bridge@localhost/);
    assert.equal(imap!.fix, "check imap.user and imap.pass (or imap.passFile)");
    assert.equal(smtp!.status, "fail");
    assert.match(smtp!.detail, /refused the login as bridge@localhost/);
    assert.equal(smtp!.fix, "check smtp.user and smtp.pass (or smtp.passFile)");
  });

  test("a folder that is not there: imap fails, naming it", async () => {
    const [imap] = await check(mail.bridgeAccount({ mailbox: "Nowhere" }));
    assert.equal(imap!.status, "fail");
    assert.match(imap!.detail, /took the login as bridge@localhost, but has no folder Nowhere/);
    assert.match(imap!.fix!, /set mailbox/);
  });

  test("no server there: both fail, naming host and port", async () => {
    const port = await freePort();
    const account = mail.bridgeAccount() as { imap: object; smtp: object };
    const [imap, smtp] = await check({
      ...account,
      imap: { ...account.imap, port },
      smtp: { ...account.smtp, port },
    });
    assert.match(imap!.detail, new RegExp(`127\\.0\\.0\\.1:${port} does not answer`));
    assert.match(imap!.fix!, /check imap\.host, imap\.port and imap\.security/);
    assert.match(smtp!.detail, new RegExp(`127\\.0\\.0\\.1:${port} does not answer`));
  });
});
