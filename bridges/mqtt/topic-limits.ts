/**
 * Limits on the topics an embedded broker's clients may use, beyond MQTT's own (65,535 bytes, no
 * limit on levels [MQTT-4.7.3-3]): every level is a step of topic matching and of the routing
 * tries, and every topic may become a retained message or a ghost's name.
 */
export interface TopicLimits {
  maxTopicBytes: number;
  maxTopicLevels: number;
}

/** Why `topic` (a topic name or a filter) is beyond `limits`, or undefined when it is within. */
export function topicLimitProblem(topic: string, limits: TopicLimits): string | undefined {
  const bytes = Buffer.byteLength(topic, "utf8");
  if (bytes > limits.maxTopicBytes)
    return `topic of ${bytes} bytes exceeds maxTopicBytes ${limits.maxTopicBytes}`;
  let levels = 1;
  for (let i = topic.indexOf("/"); i !== -1; i = topic.indexOf("/", i + 1)) levels++;
  if (levels > limits.maxTopicLevels)
    return `topic of ${levels} levels exceeds maxTopicLevels ${limits.maxTopicLevels}`;
  return undefined;
}
