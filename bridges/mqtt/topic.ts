/** MQTT topic names and filters, per MQTT 3.1.1 §4.7 (same rules in MQTT 5 §4.7). */

/** [MQTT-4.7.3-3] topics are UTF-8 strings of at most 65535 bytes; [MQTT-4.7.3-2] no NUL. */
function basicTopicProblem(topic: string): string | undefined {
  if (topic.length === 0) return "must not be empty"; // [MQTT-4.7.3-1]
  if (Buffer.byteLength(topic, "utf8") > 65535) return "must be at most 65535 bytes";
  if (topic.includes("\u0000")) return "must not contain NUL";
  return undefined;
}

/** Why `filter` is not a valid topic filter, or undefined when it is. */
export function topicFilterProblem(filter: string): string | undefined {
  const basic = basicTopicProblem(filter);
  if (basic) return basic;
  const levels = filter.split("/");
  for (let i = 0; i < levels.length; i++) {
    const level = levels[i]!;
    // [MQTT-4.7.1-2] '#' alone in its level and last
    if (level.includes("#") && (level !== "#" || i !== levels.length - 1)) {
      return "'#' must be the whole last level of a filter";
    }
    // [MQTT-4.7.1-3] '+' must occupy an entire level
    if (level.includes("+") && level !== "+") return "'+' must be a whole level of a filter";
  }
  return undefined;
}

/** Why `topic` is not a valid topic name to publish to, or undefined when it is. */
export function topicNameProblem(topic: string): string | undefined {
  const basic = basicTopicProblem(topic);
  if (basic) return basic;
  // [MQTT-3.3.2-2] the Topic Name in a PUBLISH must not contain wildcards
  if (topic.includes("+") || topic.includes("#"))
    return "wildcards (+, #) are not allowed in a topic to publish to";
  return undefined;
}

export function hasWildcard(filter: string): boolean {
  return filter.includes("+") || filter.includes("#");
}

/**
 * Whether `topic` matches `filter`. [MQTT-4.7.2-1]: filters starting with a wildcard do not match
 * topics starting with '$'. [MQTT-4.7.1-2]: "a/#" also matches "a".
 */
export function topicMatches(filter: string, topic: string): boolean {
  if (topic.startsWith("$") && (filter.startsWith("+") || filter.startsWith("#"))) return false;
  const f = filter.split("/");
  const t = topic.split("/");
  for (let i = 0; i < f.length; i++) {
    const level = f[i];
    if (level === "#") return true;
    if (i >= t.length) return false;
    if (level !== "+" && level !== t[i]) return false;
  }
  return f.length === t.length;
}

/** Whether every topic that `inner` matches is matched by `outer` (both valid filters). */
export function filterCovers(outer: string, inner: string): boolean {
  const o = outer.split("/");
  const n = inner.split("/");
  for (let i = 0; i < o.length; i++) {
    const ol = o[i];
    if (ol === "#") return !(inner.startsWith("$") && i === 0);
    const nl = n[i];
    if (nl === undefined) return false;
    if (ol === "+") {
      if (nl === "#") return false;
      if (i === 0 && nl.startsWith("$")) return false;
      continue;
    }
    if (ol !== nl) return false;
  }
  return o.length === n.length;
}

/**
 * The filters that no other one covers, each with the highest QoS among those it covers: a broker
 * may send one copy of a message per matching subscription (MQTT 5 §3.3.4; Mosquitto does).
 */
export function coveringFilters<Q extends number>(filters: ReadonlyMap<string, Q>): Map<string, Q> {
  const kept = new Map<string, Q>();
  for (const [filter, qos] of filters) {
    if ([...filters.keys()].some((other) => other !== filter && filterCovers(other, filter))) continue;
    let max = qos;
    for (const [inner, q] of filters) if (q > max && filterCovers(filter, inner)) max = q;
    kept.set(filter, max);
  }
  return kept;
}

/** The level at 1-based `index` of `topic`, or undefined. */
export function topicLevel(topic: string, index: number): string | undefined {
  return topic.split("/")[index - 1];
}
