/** The email connector's screening of incoming mail: Authentication-Results, list mail, senders. */
import { test } from "node:test";
import assert from "node:assert/strict";
import nodemailer, { type SendMailOptions } from "nodemailer";
import { dmarcOf, parseAuthenticationResults } from "../../bridges/email/auth-results.js";
import { senderAllowed } from "../../bridges/email/connector.js";
import { parseMail } from "../../bridges/email/incoming.js";
import { emailAccountSchema, emailEndpointSchema } from "../../bridges/email/schema.js";

async function raw(mail: SendMailOptions): Promise<Buffer> {
  const transport = nodemailer.createTransport({ streamTransport: true, buffer: true });
  const info = await transport.sendMail({ from: "Bob <bob@example.org>", to: "bridge@example.org", ...mail });
  return info.message as Buffer;
}

test("Authentication-Results (RFC 8601): authserv-id, version, methods, reasons, properties, comments", () => {
  assert.deepEqual(
    parseAuthenticationResults(
      "mx.example.org 1; dkim=pass (good signature) header.d=example.com header.i=@example.com;\r\n" +
        ' spf=fail smtp.mailfrom=x@evil.example; dmarc = fail reason="p=reject (forged)" (policy) header.from=Example.COM',
    ),
    {
      authservId: "mx.example.org",
      results: [
        {
          method: "dkim",
          result: "pass",
          properties: { "header.d": "example.com", "header.i": "@example.com" },
        },
        { method: "spf", result: "fail", properties: { "smtp.mailfrom": "x@evil.example" } },
        {
          method: "dmarc",
          result: "fail",
          reason: "p=reject (forged)",
          properties: { "header.from": "Example.COM" },
        },
      ],
    },
  );
  // RFC 8601 appendix B examples: no result; a comment in the authserv-id's place; a method version.
  assert.deepEqual(parseAuthenticationResults("example.org 1; none"), {
    authservId: "example.org",
    results: [],
  });
  assert.deepEqual(
    parseAuthenticationResults("example.com (a comment); spf/1=pass smtp.mailfrom=example.net"),
    {
      authservId: "example.com",
      results: [{ method: "spf", result: "pass", properties: { "smtp.mailfrom": "example.net" } }],
    },
  );
  assert.equal(parseAuthenticationResults('"mx.example.org"; dmarc=pass')?.authservId, "mx.example.org");
  // Not one: unbalanced comment or quote, no authserv-id, junk after it, too long.
  assert.equal(parseAuthenticationResults("mx.example.org; dmarc=fail (open"), undefined);
  assert.equal(parseAuthenticationResults('mx.example.org; dmarc=fail reason="open'), undefined);
  assert.equal(parseAuthenticationResults("; dmarc=fail"), undefined);
  assert.equal(parseAuthenticationResults("mx.example.org junk; dmarc=fail"), undefined);
  assert.equal(parseAuthenticationResults(`mx.example.org; dmarc=fail ${"x".repeat(20_000)}`), undefined);
  // A resinfo that is not one is skipped, the others kept.
  assert.deepEqual(
    parseAuthenticationResults("mx.example.org; ???; dmarc=pass")?.results.map((r) => r.method),
    ["dmarc"],
  );
});

test("DMARC is read only from the topmost field of the trusted authserv-id", () => {
  const trusted = "mx.example.org";
  // What the receiving server added is on top; what came with the mail is below it.
  assert.deepEqual(dmarcOf(["mx.example.org; dmarc=fail header.from=example.com"], trusted), {
    result: "fail",
    domain: "example.com",
  });
  assert.equal(
    dmarcOf(["MX.Example.org; dmarc=pass", "mx.example.org; dmarc=fail"], trusted)?.result,
    "pass",
  );
  // A forger's own field, or one claiming another authserv-id, is ignored.
  assert.equal(dmarcOf(["evil.example; dmarc=pass"], trusted), undefined);
  assert.equal(dmarcOf(["evil.example; dmarc=pass", "mx.example.org; dmarc=fail"], trusted)?.result, "fail");
  assert.equal(dmarcOf(["mx.example.org.evil.example; dmarc=pass"], trusted), undefined);
  assert.equal(dmarcOf(["mx.example.org; spf=pass"], trusted), undefined);
  assert.equal(dmarcOf([], trusted), undefined);
});

test("list and bulk mail is marked: List-Id, List-Unsubscribe, Precedence list/bulk/junk; Authentication-Results kept in order", async () => {
  const list = async (headers: Record<string, string>) =>
    (await parseMail(await raw({ text: "x", headers }))).list;
  assert.match((await list({ "List-Id": "Team <team.lists.example.org>" }))!, /^List-Id: team/);
  assert.equal(await list({ "List-Unsubscribe": "<mailto:leave@example.org>" }), "List-Unsubscribe");
  assert.equal(await list({ Precedence: "bulk" }), "Precedence: bulk");
  assert.equal(await list({ Precedence: "junk" }), "Precedence: junk");
  assert.equal(await list({ Precedence: "list" }), "Precedence: list");
  assert.equal(await list({}), undefined);
  const source = Buffer.from(
    "Authentication-Results: mx.example.org;\r\n dmarc=fail header.from=example.org\r\n" +
      "Authentication-Results: evil.example; dmarc=pass\r\nFrom: bob@example.org\r\nSubject: x\r\n\r\nhi\r\n",
  );
  assert.deepEqual((await parseMail(source)).authResults, [
    "mx.example.org; dmarc=fail header.from=example.org",
    "evil.example; dmarc=pass",
  ]);
});

test("senders: addresses and @domains, in lower case; unset lets anyone in", () => {
  assert.equal(senderAllowed(undefined, "anyone@example.org"), true);
  assert.equal(senderAllowed(["alice@example.org"], "alice@example.org"), true);
  assert.equal(senderAllowed(["alice@example.org"], "bob@example.org"), false);
  assert.equal(senderAllowed(["@example.org"], "bob@example.org"), true);
  assert.equal(senderAllowed(["@example.org"], "bob@sub.example.org"), false);
  assert.equal(senderAllowed(["@example.org"], "bob@evil-example.org"), false);
  assert.equal(senderAllowed(["@example.org"], "unknown-sender"), false);
  const ep = emailEndpointSchema.parse({ senders: ["Alice@Example.org", "@Example.COM"] });
  assert.deepEqual(ep.senders, ["alice@example.org", "@example.com"]);
  assert.equal(ep.allowLists, false);
  assert.throws(() => emailEndpointSchema.parse({ senders: ["example.com"] }), /address .* or a domain/);
  const server = { host: "mail.example.org", user: "bridge", pass: "secret" };
  const account = emailAccountSchema.parse({ address: "b@example.org", imap: server, smtp: server });
  assert.equal(account.dmarcPolicy, "quarantine");
  assert.equal(account.authservId, undefined);
});

test("PGP/MIME and S/MIME mail is posted whole, as a file, with a note: never half-decoded", async () => {
  const mime = (contentType: string, body: string) =>
    Buffer.from(
      `From: Bob <bob@example.org>\r\nTo: bridge@example.org\r\nSubject: Secret plan\r\nMessage-ID: <s@example.org>\r\n` +
        `MIME-Version: 1.0\r\nContent-Type: ${contentType}\r\n\r\n${body}`,
    );
  const signedBody =
    '--b\r\nContent-Type: text/plain\r\n\r\nsigned words\r\n--b\r\nContent-Type: application/pgp-signature; name="signature.asc"\r\n\r\n' +
    "-----BEGIN PGP SIGNATURE-----\r\nabc\r\n-----END PGP SIGNATURE-----\r\n--b--\r\n";
  const cases: [string, string, RegExp][] = [
    [
      'multipart/encrypted; protocol="application/pgp-encrypted"; boundary="b"',
      "--b\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n--b\r\nContent-Type: application/octet-stream\r\n\r\n-----BEGIN PGP MESSAGE-----\r\nxyz\r\n-----END PGP MESSAGE-----\r\n--b--\r\n",
      /encrypted \(PGP\/MIME\)/,
    ],
    [
      'multipart/signed; protocol="application/pgp-signature"; micalg=pgp-sha256; boundary="b"',
      signedBody,
      /signed \(PGP\/MIME\)/,
    ],
    [
      'multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256; boundary="b"',
      signedBody.replace("application/pgp-signature", "application/pkcs7-signature"),
      /signed \(S\/MIME\)/,
    ],
    [
      'application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"',
      "MIAGCSqGSIb3DQEHA6CAMIACAQAx\r\n",
      /S\/MIME/,
    ],
  ];
  for (const [contentType, body, kind] of cases) {
    const source = mime(contentType, body);
    const mail = await parseMail(source);
    assert.match(mail.body.text, kind);
    assert.match(mail.body.text, /attached whole, as it came \(Secret plan\.eml\)/);
    assert.equal(mail.body.html, undefined);
    assert.doesNotMatch(mail.body.text, /signed words/);
    assert.deepEqual(mail.attachments, [
      { name: "Secret plan.eml", mimeType: "message/rfc822", dataBase64: source.toString("base64") },
    ]);
  }
  // Ordinary mail is read as usual.
  const plain = await parseMail(mime("text/plain", "just words\r\n"));
  assert.equal(plain.body.text, "just words");
});

test("dkim: a key that is not a PEM private key is a config error naming dkim.privateKey", () => {
  const server = { host: "mail.example.org", user: "bridge", pass: "secret" };
  const parsed = emailAccountSchema.safeParse({
    address: "b@example.org",
    imap: server,
    smtp: server,
    dkim: { domainName: "example.org", keySelector: "tb", privateKey: "not a key" },
  });
  assert.equal(parsed.success, false);
  assert.deepEqual(parsed.error?.issues[0]?.path, ["dkim", "privateKey"]);
  assert.match(parsed.error!.issues[0]!.message, /^is not a PEM private key/);
});

test("processed: a flag or a folder to move to, not the folder read", () => {
  const server = { host: "mail.example.org", user: "bridge", pass: "secret" };
  const parse = (processed: unknown) =>
    emailAccountSchema.safeParse({ address: "b@example.org", imap: server, smtp: server, processed });
  assert.deepEqual(parse({ flag: "\\Seen" }).data?.processed, { flag: "\\Seen" });
  assert.deepEqual(parse({ moveTo: "Bridged" }).data?.processed, { moveTo: "Bridged" });
  assert.deepEqual(parse({ moveTo: "INBOX" }).error?.issues[0]?.path, ["processed", "moveTo"]);
  assert.equal(parse({ flag: "not a flag" }).success, false);
  assert.equal(parse({ flag: "\\Seen", moveTo: "Bridged" }).success, false);
});
