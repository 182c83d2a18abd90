/**
 * Sending: one pooled nodemailer transport per account, and what its errors mean for the queue.
 * An SMTP reply 5xx refuses the mail for good (PermanentError, with the server's words); another
 * 4xx may pass (RetryableError, counted as an attempt of that mail). A server away, closing (421)
 * or refusing the login is not the mail's fault (UnavailableError): every mail of the account
 * waits, however long, and is sent once it answers.
 */
import nodemailer, { type Transporter } from "nodemailer";
import type SMTPPool from "nodemailer/lib/smtp-pool/index.js";
import type Mail from "nodemailer/lib/mailer/index.js";
import { PermanentError, RetryableError, UnavailableError } from "../../src/errors.js";
import { EMAIL_DEFAULTS, type EmailAccount } from "./schema.js";

export type SmtpTransport = Transporter<SMTPPool.SentMessageInfo, SMTPPool.Options>;

export function createSmtpTransport(config: EmailAccount): SmtpTransport {
  const { smtp } = config;
  return nodemailer.createTransport({
    pool: true,
    maxConnections: config.smtpConnections,
    host: smtp.host,
    port: smtp.port,
    secure: smtp.security === "tls",
    requireTLS: smtp.security === "starttls",
    ignoreTLS: smtp.security === "none",
    auth: { user: smtp.user, pass: smtp.pass },
    tls: { rejectUnauthorized: smtp.rejectUnauthorized, ...(smtp.ca !== undefined && { ca: smtp.ca }) },
    connectionTimeout: EMAIL_DEFAULTS.connectTimeoutMs,
    greetingTimeout: EMAIL_DEFAULTS.connectTimeoutMs,
    socketTimeout: 60_000,
    // The bridge names itself in EHLO by its address's domain rather than the machine's host name.
    name: config.address.slice(config.address.lastIndexOf("@") + 1),
    ...(config.dkim && { dkim: { ...config.dkim } }),
  });
}

/** nodemailer's errors carry the SMTP reply (responseCode, response) and a code of their own. */
interface SmtpError extends Error {
  code?: string;
  responseCode?: number;
  response?: string;
}

/** What a failed send means: the mail refused (5xx), or the server away or busy (the rest). */
export function classifySmtpError(err: unknown): PermanentError | RetryableError {
  const e = err as SmtpError;
  const reply = e.response ?? e.message;
  if (e.code === "EAUTH") return new UnavailableError(`SMTP login refused: ${reply}`);
  // RFC 5321 §3.8: 421 is the server closing the transmission channel (shutting down, overloaded).
  if (e.responseCode === 421) return new UnavailableError(`SMTP server not available: ${reply}`);
  if (typeof e.responseCode === "number" && e.responseCode >= 500)
    return new PermanentError(`SMTP server refused the mail: ${reply}`);
  if (typeof e.responseCode === "number" && e.responseCode >= 400)
    return new RetryableError(`SMTP server deferred the mail: ${reply}`);
  return new UnavailableError(`SMTP server unreachable: ${e.message ?? String(err)}`);
}

export type MailOptions = Mail.Options;
