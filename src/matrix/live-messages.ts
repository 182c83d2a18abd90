/**
 * Live messages: an endpoint with `live: true` keeps one room message per room, sender and stream
 * (an MQTT topic, say) and edits it with each new reading, instead of posting a message each time.
 * Remembered in Redis both ways: which event the next reading edits, and, for each such event,
 * which stream it shows, so that a redacted live message makes the next reading post a new one.
 */
import { hash } from "node:crypto";
import type { Redis } from "ioredis";
import { PermanentError } from "../errors.js";
import { redisKeys } from "../store/keys.js";
import { replacementContent } from "./format.js";
import type { MatrixClient } from "./matrix-client.js";

/** A stream silent this long starts a new message: edits of a month-old message would go unseen. */
const REMEMBER_SEC = 30 * 24 * 3600;

export interface LiveStream {
  roomId: string;
  endpointId: string;
  senderId: string;
  stream: string;
}

export class LiveMessages {
  constructor(
    private readonly redis: Redis,
    private readonly prefix: string,
  ) {}

  private keyOf(s: LiveStream): string {
    const identity = [s.roomId, s.endpointId, s.senderId, s.stream].join("\u0000");
    return redisKeys.liveStream(this.prefix, hash("sha256", identity, "hex"));
  }

  /** The event the stream's next reading edits, if there is one; remembered for longer. */
  async current(s: LiveStream): Promise<string | undefined> {
    const key = this.keyOf(s);
    const [[, eventId]] = (await this.redis.multi().get(key).expire(key, REMEMBER_SEC).exec()) as [
      [Error | null, string | null],
      unknown,
    ];
    return eventId ?? undefined;
  }

  async remember(s: LiveStream, eventId: string): Promise<void> {
    const key = this.keyOf(s);
    await this.redis
      .multi()
      .set(key, eventId, "EX", REMEMBER_SEC)
      .set(redisKeys.liveEvent(this.prefix, eventId), key, "EX", REMEMBER_SEC)
      .exec();
  }

  /** A live message was redacted: its stream's next reading posts a new message. */
  async forget(eventId: string): Promise<void> {
    const eventKey = redisKeys.liveEvent(this.prefix, eventId);
    const key = await this.redis.get(eventKey);
    if (key === null) return;
    // Only if the stream still shows this event (not one posted since).
    await this.redis.eval(
      `if redis.call("GET", KEYS[1]) == ARGV[1] then redis.call("DEL", KEYS[1]) end
       return redis.call("DEL", KEYS[2])`,
      2,
      key,
      eventKey,
      eventId,
    );
  }
}

/**
 * Edits a stream's message `original` to show `content`, as `sender`. Returns undefined once
 * edited; when the homeserver refuses the edit for good (its original is gone, say), forgets
 * `original` and returns the transaction id to post the content anew under: one of its own, so
 * that a repeat of this item posts it once.
 */
export async function editLiveMessage(
  matrix: Pick<MatrixClient, "sendAs">,
  live: LiveMessages,
  sender: { userId: string; displayName: string },
  roomId: string,
  original: string,
  content: Record<string, unknown>,
  txnId: string,
): Promise<string | undefined> {
  try {
    await matrix.sendAs(sender, roomId, "m.room.message", replacementContent(original, content), txnId);
    return undefined;
  } catch (err) {
    if (!(err instanceof PermanentError)) throw err;
    await live.forget(original);
    return `${txnId}-new`;
  }
}
