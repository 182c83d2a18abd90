/**
 * A person on a real Matrix client with end-to-end encryption, for tests against a real homeserver
 * (test/helpers/synapse.ts): matrix-js-sdk with its Rust crypto (the same
 * @matrix-org/matrix-sdk-crypto-wasm the bridge uses), its keys in memory. It syncs as Element
 * would: shares room keys with every device in the room, and decrypts what it receives.
 */
import { inspect } from "node:util";
import {
  ClientEvent,
  createClient,
  MsgType,
  Preset,
  SyncState,
  type MatrixClient,
  type MatrixEvent,
} from "matrix-js-sdk";
import { logger as globalLogger, type Logger } from "matrix-js-sdk/lib/logger.js";
import type { EventEncryptionInfo } from "matrix-js-sdk/lib/crypto-api/index.js";

// matrix-js-sdk (43) calls Promise.withResolvers (ES2024), which Node 20 lacks (Node 22 has it): in
// its sync loop, its scheduler and the Rust crypto's request loop. The spec's own algorithm,
// installed only where it is missing, so that these tests run on Node 20 as on 22 and 24.
if (typeof (Promise as { withResolvers?: unknown }).withResolvers !== "function") {
  Object.defineProperty(Promise, "withResolvers", {
    configurable: true,
    writable: true,
    value: function withResolvers<T>() {
      let resolve!: (value: T | PromiseLike<T>) => void;
      let reject!: (reason?: unknown) => void;
      const promise = new Promise<T>((res, rej) => {
        resolve = res;
        reject = rej;
      });
      return { promise, resolve, reject };
    },
  });
}

// matrix-js-sdk also logs through loggers of its own, made at their first use with level debug
// and writing to console.debug when they log: the client's `logger` option does not reach them
// (its MatrixRTC sessions log a line per sync). Their debug lines go only where asked for.
const quietDebug = process.env.TRIBRIDGE_LOG_LEVEL !== "debug";
(globalLogger as unknown as { setLevel(level: string): void }).setLevel(quietDebug ? "warn" : "debug");
if (quietDebug) console.debug = () => undefined;

export interface CryptoPersonOptions {
  /** The homeserver's client API base URL. */
  baseUrl: string;
  userId: string;
  /** With its device: the session to use. Without: logs in with `password` (a new device). */
  accessToken?: string;
  deviceId?: string;
  password?: string;
}

/** A message the person's client received in an encrypted room and decrypted. */
export interface DecryptedMessage {
  eventId: string;
  sender: string;
  type: string;
  content: Record<string, unknown>;
  /** How the client shows the message's authenticity (the shield next to it). */
  encryptionInfo: EventEncryptionInfo | null;
}

const M_MEGOLM = "m.megolm.v1.aes-sha2";
const DEFAULT_TIMEOUT_MS = 20_000;

/** The client's log: warnings and errors only (all of it with TRIBRIDGE_LOG_LEVEL=debug), named. */
function personLogger(name: string): Logger {
  const verbose = process.env.TRIBRIDGE_LOG_LEVEL === "debug";
  const line =
    (level: string) =>
    (...msg: unknown[]) =>
      console.error(`[${name} ${level}]`, ...msg.map((m) => (typeof m === "string" ? m : inspect(m))));
  const quiet = () => undefined;
  const logger: Logger = {
    trace: verbose ? line("trace") : quiet,
    debug: verbose ? line("debug") : quiet,
    info: verbose ? line("info") : quiet,
    warn: line("warn"),
    error: line("error"),
    getChild: (namespace: string) => personLogger(`${name}${namespace}`),
  };
  return logger;
}

async function until<T>(
  what: string,
  probe: () => Promise<T | undefined> | T | undefined,
  timeoutMs: number,
) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export class CryptoPerson {
  private constructor(
    readonly client: MatrixClient,
    readonly userId: string,
    readonly deviceId: string,
  ) {}

  /** Logged in (or on the given session), crypto ready (device keys uploaded), first sync done. */
  static async start(o: CryptoPersonOptions): Promise<CryptoPerson> {
    let { accessToken, deviceId } = o;
    if (accessToken === undefined || deviceId === undefined) {
      if (o.password === undefined)
        throw new Error("CryptoPerson: an access token and device, or a password");
      const login = await createClient({ baseUrl: o.baseUrl }).loginRequest({
        type: "m.login.password",
        identifier: { type: "m.id.user", user: o.userId },
        password: o.password,
        initial_device_display_name: "crypto-person",
      });
      ({ access_token: accessToken, device_id: deviceId } = login);
    }
    const client = createClient({
      baseUrl: o.baseUrl,
      userId: o.userId,
      deviceId,
      accessToken,
      logger: personLogger(o.userId),
    });
    await client.initRustCrypto({ useIndexedDB: false });
    const prepared = new Promise<void>((resolve, reject) => {
      const onSync = (state: SyncState) => {
        if (state === SyncState.Prepared || state === SyncState.Syncing) {
          client.off(ClientEvent.Sync, onSync);
          resolve();
        } else if (state === SyncState.Error) {
          client.off(ClientEvent.Sync, onSync);
          reject(new Error(`the first sync of ${o.userId} failed`));
        }
      };
      client.on(ClientEvent.Sync, onSync);
    });
    await client.startClient({ initialSyncLimit: 20 });
    await prepared;
    return new CryptoPerson(client, o.userId, deviceId);
  }

  /** Creates a room encrypted from its first event (m.room.encryption in its initial state), public to join. */
  async createEncryptedRoom(o: { name?: string; invite?: string[] } = {}): Promise<string> {
    const { room_id: roomId } = await this.client.createRoom({
      preset: Preset.PublicChat,
      ...(o.name !== undefined ? { name: o.name } : {}),
      ...(o.invite ? { invite: o.invite } : {}),
      initial_state: [{ type: "m.room.encryption", state_key: "", content: { algorithm: M_MEGOLM } }],
    });
    await this.untilEncrypted(roomId);
    return roomId;
  }

  /**
   * Until the client has seen `userId` join the room: a client shares a room key with the members
   * it knows of when it sends, so a test waits for this before sending to someone who just joined.
   */
  async waitForMember(roomId: string, userId: string, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<void> {
    await until(
      `${this.userId}'s client to see ${userId} join ${roomId}`,
      () => (this.client.getRoom(roomId)?.getMember(userId)?.membership === "join" ? true : undefined),
      timeoutMs,
    );
  }

  async joinRoom(roomIdOrAlias: string): Promise<string> {
    const room = await this.client.joinRoom(roomIdOrAlias);
    return room.roomId;
  }

  /**
   * Sends a text message, encrypted (the client shares the room key with every member's devices
   * first). Refuses a room the client does not know to be encrypted, and checks what the
   * homeserver stored: never a plaintext message by mistake.
   */
  async sendText(roomId: string, body: string): Promise<string> {
    await this.untilEncrypted(roomId);
    const { event_id: eventId } = await this.client.sendMessage(roomId, { msgtype: MsgType.Text, body });
    const stored = await this.client.fetchRoomEvent(roomId, eventId);
    if (stored.type !== "m.room.encrypted")
      throw new Error(`the client sent ${eventId} as ${stored.type}, not encrypted`);
    return eventId;
  }

  /**
   * The first message from `sender` in the room (after `after`, an event id, when given) that
   * the client decrypted, and matching `body` when given. Waits for its room key to arrive.
   * `type`: an event of another type (its `body`, if any, matched the same way).
   */
  async waitForMessage(
    roomId: string,
    sender: string,
    o: { body?: string | RegExp; timeoutMs?: number; type?: string } = {},
  ): Promise<DecryptedMessage> {
    const matches = (ev: MatrixEvent) => {
      if (ev.getSender() !== sender || !ev.isEncrypted()) return false;
      if (ev.isBeingDecrypted() || ev.isDecryptionFailure() || ev.getType() !== (o.type ?? "m.room.message"))
        return false;
      const text = String(ev.getContent().body ?? "");
      return o.body === undefined || (typeof o.body === "string" ? text === o.body : o.body.test(text));
    };
    const event = await until(
      `a decrypted message from ${sender} in ${roomId} for ${this.userId}`,
      () => this.client.getRoom(roomId)?.getLiveTimeline().getEvents().find(matches),
      o.timeoutMs ?? DEFAULT_TIMEOUT_MS,
    );
    return {
      eventId: event.getId()!,
      sender: event.getSender()!,
      type: event.getType(),
      content: event.getContent(),
      encryptionInfo: (await this.client.getCrypto()?.getEncryptionInfoForEvent(event)) ?? null,
    };
  }

  /** What the client's timeline shows of the room's undecryptable events (for a failing test's message). */
  undecryptable(roomId: string): string[] {
    const events = this.client.getRoom(roomId)?.getLiveTimeline().getEvents() ?? [];
    return events
      .filter((ev) => ev.isDecryptionFailure())
      .map((ev) => `${ev.getId()} from ${ev.getSender()}: ${ev.decryptionFailureReason}`);
  }

  async stop(): Promise<void> {
    this.client.stopClient();
  }

  /** Until the client's crypto knows the room is encrypted (it learns it from the room's state, by sync). */
  private async untilEncrypted(roomId: string): Promise<void> {
    const crypto = this.client.getCrypto();
    if (!crypto) throw new Error("the client has no crypto");
    await until(
      `${this.userId}'s client to know ${roomId} is encrypted`,
      async () => ((await crypto.isEncryptionEnabledInRoom(roomId)) ? true : undefined),
      DEFAULT_TIMEOUT_MS,
    );
  }
}
