/**
 * Topic ACLs of the embedded broker: what a user, or an anonymous client, may publish to,
 * subscribe to and receive. The allow lists name topic filters; `deny` names filters refused even
 * where an allow filter covers them (deny wins):
 *
 * - publish to topic T: an allow filter matches T, and no `deny.publish` filter does;
 * - subscribe to filter F: an allow filter covers F (matches every topic F matches), and no
 *   `deny.subscribe` filter covers F. A filter that only overlaps a denied one (`#` beside a denied
 *   `secret/#`) is granted, and the denied part is held back on delivery:
 * - receive a message on topic T (live, retained or queued for an offline session): a `subscribe`
 *   filter matches T, and no `deny.subscribe` filter does.
 *
 * Filters starting with a wildcard do not match topics starting with `$` [MQTT-4.7.2-1], so `#`
 * allows no `$SYS/…`: a `$` topic must be named to be allowed. (Publishing to `$SYS` is refused
 * to every client by the broker itself.)
 */
import { filterCovers, topicMatches } from "./topic.js";

export interface AclRules {
  publish: readonly string[];
  subscribe: readonly string[];
  deny?: { publish: readonly string[]; subscribe: readonly string[] };
}

export class Acl {
  private readonly publish: readonly string[];
  private readonly subscribe: readonly string[];
  private readonly denyPublish: readonly string[];
  private readonly denySubscribe: readonly string[];

  constructor(rules: AclRules) {
    this.publish = rules.publish;
    this.subscribe = rules.subscribe;
    this.denyPublish = rules.deny?.publish ?? [];
    this.denySubscribe = rules.deny?.subscribe ?? [];
  }

  mayPublish(topic: string): boolean {
    const matches = (f: string) => topicMatches(f, topic);
    return this.publish.some(matches) && !this.denyPublish.some(matches);
  }

  maySubscribe(filter: string): boolean {
    return (
      this.subscribe.some((f) => filterCovers(f, filter)) &&
      !this.denySubscribe.some((f) => filterCovers(f, filter))
    );
  }

  mayReceive(topic: string): boolean {
    const matches = (f: string) => topicMatches(f, topic);
    return this.subscribe.some(matches) && !this.denySubscribe.some(matches);
  }
}
