/**
 * Mail threads on the bridge's side: what it remembers of each mail it sent or relayed (its
 * endpoint, subject and References, in the connector's store), and the threading headers of a new
 * mail from that: In-Reply-To, References and Subject as mail clients expect them (RFC 5322 §3.6.4).
 */
import type { EndpointBinding, KeyValueStore, OutboundMessage } from "../../src/connector.js";
import type { EmailEndpoint } from "./schema.js";

/** As long as the core remembers which Matrix event a remote id is (`Capabilities.threads`). */
export const THREAD_MEMORY_MS = 90 * 24 * 3600_000;
/** References kept per mail: the thread's first, and the latest ones (RFC 5322 allows trimming). */
const MAX_REFERENCES = 10;

export interface MailRecord {
  /** The endpoint the mail went out through or came in through. */
  readonly endpoint: string;
  /** That endpoint's token, so that an answer finds an inbound endpoint with the same one. */
  readonly token?: string;
  readonly subject: string;
  /** The mail's own References (its thread up to its parent). */
  readonly refs: readonly string[];
  /** Sent by the bridge: if it comes back into the mailbox, it is not relayed. */
  readonly own?: boolean;
}

export class MailRecords {
  constructor(private readonly store: KeyValueStore) {}

  async get(messageId: string): Promise<MailRecord | undefined> {
    const raw = await this.store.get(`mail:${messageId}`);
    return raw === undefined ? undefined : (JSON.parse(raw) as MailRecord);
  }

  put(messageId: string, record: MailRecord): Promise<void> {
    return this.store.set(`mail:${messageId}`, JSON.stringify(record), THREAD_MEMORY_MS);
  }

  /** The route's mail thread (threading: route): its first mail and its latest. */
  async routeThread(endpointId: string): Promise<{ root: string; last: string } | undefined> {
    const raw = await this.store.get(`route-thread:${endpointId}`);
    return raw === undefined ? undefined : (JSON.parse(raw) as { root: string; last: string });
  }

  setRouteThread(endpointId: string, thread: { root: string; last: string }): Promise<void> {
    return this.store.set(`route-thread:${endpointId}`, JSON.stringify(thread), THREAD_MEMORY_MS);
  }
}

export interface Threading {
  readonly inReplyTo?: string;
  readonly references: readonly string[];
  readonly subject: string;
}

/** `refs` then `parent`, bounded: the first (the thread's root) and the latest. */
export function referencesAfter(refs: readonly string[], parent: string): string[] {
  const all = [...refs.filter((r) => r !== parent), parent];
  return all.length <= MAX_REFERENCES ? all : [all[0]!, ...all.slice(all.length - MAX_REFERENCES + 1)];
}

/** "Re: <subject>", once. */
export function replySubject(subject: string): string {
  return /^re:/i.test(subject.trim()) ? subject.trim() : `Re: ${subject.trim()}`;
}

/**
 * The threading headers of the mail for `message`: an answer to what it answers (the Matrix reply
 * or thread it is in), else, with `threading: route`, to the route's latest mail; otherwise the
 * first mail of a new thread.
 */
export async function threadingFor(
  message: OutboundMessage,
  endpoint: EndpointBinding<EmailEndpoint>,
  records: MailRecords,
): Promise<Threading> {
  const { spec } = endpoint;
  const routeThread = spec.threading === "route" ? await records.routeThread(endpoint.id) : undefined;
  const parent = message.replyTo ?? message.thread ?? routeThread?.last;
  if (parent === undefined) {
    const subject =
      spec.threading === "thread" ? `${spec.subject}: ${firstLine(message.body.text)}` : spec.subject;
    return { references: [], subject };
  }
  const parentRecord = await records.get(parent);
  const rootSubject =
    parentRecord?.subject ?? (routeThread && (await records.get(routeThread.root))?.subject) ?? spec.subject;
  return {
    inReplyTo: parent,
    references: referencesAfter(parentRecord?.refs ?? (routeThread ? [routeThread.root] : []), parent),
    subject: replySubject(rootSubject),
  };
}

function firstLine(text: string): string {
  const line = text.trim().split("\n", 1)[0]!.trim();
  return line.length <= 60 ? line || "…" : `${line.slice(0, 59)}…`;
}
