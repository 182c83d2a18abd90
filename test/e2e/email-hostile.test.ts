/**
 * Hostile mail (issue 14): each case is put in the bridge's INBOX as the receiving server would
 * store it (IMAP APPEND, so that nothing in between cleans it up), read by the bridge running as its
 * own process; each gets its documented outcome (docs/reliability.md, "Email: hostile mail") and a
 * log line, the bridge does not crash, and its peak RSS is measured (/proc/<pid>/status VmHWM).
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import nodemailer, { type SendMailOptions } from "nodemailer";
import { Redis } from "ioredis";
import { connectors } from "../../bridges/index.js";
import { readAllFailedJobs } from "../../src/queue/failed-jobs.js";
import { BridgeProcess } from "../helpers/bridge-process.js";
import { REDIS_URL, harness, waitFor, type Harness } from "../helpers/fixture.js";
import {
  canRunMailServer,
  NO_MAIL_SERVER,
  startMailServer,
  type MailServer,
} from "../helpers/mail-server.js";
import type { RecordedEvent } from "../helpers/test-homeserver.js";

async function rawMail(mail: SendMailOptions, top = ""): Promise<Buffer> {
  const transport = nodemailer.createTransport({ streamTransport: true, buffer: true });
  const info = await transport.sendMail({
    from: "Mallory <mallory@evil.test>",
    to: "bridge@localhost",
    ...mail,
  });
  return Buffer.concat([Buffer.from(top), info.message as Buffer]);
}

const kib = (pid: number, field: string) =>
  Number(new RegExp(`${field}:\\s+(\\d+) kB`).exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1]);

describe("email: hostile mail", { skip: !canRunMailServer && NO_MAIL_SERVER }, () => {
  let mail: MailServer;
  let h: Harness;
  let proc: BridgeProcess;
  let room: string;
  let redis: Redis;

  before(async () => {
    mail = await startMailServer();
    h = await harness({
      bridges: {
        mqtt: { home: { embedded: { port: 0 } } },
        email: { office: mail.bridgeAccount({ authservId: "mx.test" }) },
      },
      routes: [
        {
          id: "hostile",
          room: "#hostile:test.local",
          endpoints: [{ account: "email.office", direction: "in", default: true }],
        },
      ],
    });
    room = h.hs.createRoom({ creator: h.alice, alias: "#hostile:test.local", preset: "public_chat" });
    redis = new Redis(h.config.queue.redisUrl ?? REDIS_URL);
    proc = new BridgeProcess(h, { capture: true, logLevel: "info" });
    proc.start();
    await waitFor(
      "the mailbox read",
      () => proc.stdout.some((l) => l.includes('"connector state"') && l.includes('"state":"up"')),
      30_000,
    );
  });

  after(async () => {
    redis?.disconnect();
    await proc?.kill();
    await h?.cleanup();
    await mail?.stop();
  });

  test("each case gets its outcome and a log line; no crash; memory bounded", async () => {
    const big = Buffer.alloc(30 * 1024 * 1024, "a");
    const cases: [string, Buffer][] = [
      [
        "script",
        await rawMail({
          subject: "script",
          text: "case script",
          html: "<p>case script</p><script>alert('x')</script>",
        }),
      ],
      [
        "iframe",
        await rawMail({
          subject: "iframe",
          text: "case iframe",
          html: '<p>case iframe</p><iframe src="https://evil.test/"></iframe>',
        }),
      ],
      [
        "remote image",
        await rawMail({
          subject: "img",
          text: "case image",
          html: '<p>case image</p><img src="https://evil.test/pixel.png" alt="pixel">',
        }),
      ],
      [
        "deep nesting",
        await rawMail({
          subject: "deep",
          text: "case deep",
          html: `${"<div>".repeat(5000)}case deep${"</div>".repeat(5000)}`,
        }),
      ],
      ["@room", await rawMail({ subject: "room", text: "@room case room" })],
      [
        "auto-reply",
        await rawMail({
          subject: "away",
          text: "case auto-reply",
          headers: { "Auto-Submitted": "auto-replied" },
        }),
      ],
      ["bounce", await rawMail({ subject: "Undelivered", text: "case bounce" }, "Return-Path: <>\r\n")],
      [
        "forged Authentication-Results",
        await rawMail(
          { subject: "forged", text: "case forged" },
          "Authentication-Results: evil.test; dmarc=pass\r\n",
        ),
      ],
      [
        "malformed MIME",
        Buffer.from(
          "From: mallory@evil.test\r\nTo: bridge@localhost\r\nSubject: malformed\r\nMessage-ID: <malformed@evil.test>\r\n" +
            'no colon in this header line\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="never-closed"\r\n\r\n' +
            "--never-closed\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\nY2FzZSBtYWxmb3JtZWQ=!!!not base64***\r\n" +
            '--never-closed\r\nContent-Type: multipart/alternative; boundary=""\r\n\r\ncase malformed\r\n',
        ),
      ],
      [
        "30 MB attachment",
        await rawMail({
          subject: "big",
          text: "case big",
          attachments: [{ filename: "big.bin", content: big }],
        }),
      ],
      [
        "1,000 MIME parts",
        await rawMail({
          subject: "parts",
          text: "case parts",
          attachments: Array.from({ length: 1000 }, (_, i) => ({
            filename: `p${i}.txt`,
            content: `part ${i}`,
          })),
        }),
      ],
      [
        "1 MB header line",
        await rawMail({
          subject: "long",
          text: "case long header",
          headers: { "X-Junk": "j".repeat(1024 * 1024) },
        }),
      ],
      ["1 MB subject", await rawMail({ subject: "s".repeat(1024 * 1024), text: "case long subject" })],
      ["marker", await rawMail({ subject: "marker", text: "case marker" })],
    ];
    const pid = proc.pid!;
    const rssBefore = kib(pid, "VmRSS");
    const started = Date.now();
    await mail.imap("bridge", async (client) => {
      for (const [, source] of cases) await client.append("INBOX", source);
    });
    const posted = (text: string): RecordedEvent | undefined =>
      h.hs.messages(room).find((m) => String(m.content.body).includes(text));
    await waitFor("the marker", () => posted("case marker"), 45_000);
    const tookMs = Date.now() - started;
    const logs = () =>
      proc.stdout.filter((l) => l.startsWith("{")).map((l) => JSON.parse(l) as Record<string, unknown>);
    const logged = (pattern: RegExp) => logs().some((l) => pattern.test(JSON.stringify(l)));
    const html = (text: string) => String(posted(text)?.content.formatted_body ?? "");

    for (const l of logs().filter((l) => Number(l.level) >= 30 && /mail|relay|quarantin/.test(String(l.msg))))
      console.log(
        `# log: ${String(l.msg).slice(0, 120)} ${JSON.stringify({ why: l.why, reason: l.reason, err: l.err }).slice(0, 160)}`,
      );
    assert.ok(
      posted("case script") && !/<script|alert/.test(html("case script")),
      "script: posted, script gone",
    );
    assert.ok(
      posted("case iframe") && !/<iframe|evil\.test/.test(html("case iframe")),
      "iframe: posted, iframe gone",
    );
    assert.ok(posted("case image") && !/<img/.test(html("case image")), "remote image: not shown inline");
    assert.ok(posted("case deep"), "deep nesting: posted");
    assert.deepEqual(posted("case room")?.content["m.mentions"], {}, "@room: mentions nobody");
    assert.equal(posted("case auto-reply"), undefined);
    assert.ok(logged(/written by a machine.*Auto-Submitted|Auto-Submitted.*written by a machine/));
    assert.equal(posted("case bounce"), undefined);
    assert.ok(logged(/Return-Path: <>/));
    assert.ok(posted("case forged"), "forged Authentication-Results: ignored, posted");
    assert.ok(posted("case malformed"), "malformed MIME: what could be read is posted");
    assert.ok(logged(/"msg":"mail relayed"/));
    const failed = async (pattern: RegExp) =>
      waitFor(`${pattern} in the failed list`, async () => {
        const list = await readAllFailedJobs(redis, h.config, connectors, 100);
        return list.find((f) => pattern.test(f.reason));
      });
    for (const [text, reason] of [
      ["case big", /^quarantined: mail of \d+ bytes larger than maxMessageBytes: not fetched/],
      ["case parts", /^quarantined: mail of \d+ bytes not readable: Max allowed child nodes exceeded/],
      [
        "case long header",
        /^quarantined: mail of \d+ bytes not readable: Max header size for a MIME node exceeded/,
      ],
    ] as const) {
      assert.equal(posted(text), undefined, text);
      await failed(reason);
    }
    assert.equal(posted("case long subject"), undefined);
    assert.ok(logged(/"msg":"mail not relayed, left in the mailbox"/));
    assert.equal(proc.exit, undefined, "the bridge still runs");
    const peak = kib(pid, "VmHWM");
    console.log(
      `# ${cases.length} hostile mails read in ${tookMs} ms; bridge RSS ${Math.round(rssBefore / 1024)} MiB before, ` +
        `${Math.round(kib(pid, "VmRSS") / 1024)} MiB after, peak ${Math.round(peak / 1024)} MiB`,
    );

    assert.ok(peak < 600 * 1024, `peak RSS ${peak} kB`);
  });
});
