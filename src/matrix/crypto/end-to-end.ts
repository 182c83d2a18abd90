/**
 * End-to-end encrypted rooms (Client-Server API §End-to-End Encryption), with the wasm build of
 * the Matrix Rust SDK's crypto (`OlmMachine`, one per device):
 *
 * - **Sending**: every user of ours that sends into an encrypted room (a ghost, the bot) gets a
 *   device of its own, made when first needed (MSC4190 `PUT /devices/{id}` where the registration
 *   enables it, else `m.login.application_service`), so clients show the true sender. The event
 *   is encrypted by that device, after the room key went to every member's devices.
 * - **Receiving**: the reader's device is the one that reads the rooms: people's clients share their
 *   room keys with it as with any member. The reader is a user of our namespace, not the bot: a
 *   homeserver refuses `/sync` to the appservice's own user (Application Service API §Client-Server
 *   API extensions; Synapse answers 500), and its device must sync on the `/sync` feed and to catch
 *   up on the transaction feed. It joins each encrypted room tribridge uses (readIn). An event
 *   whose key has not come yet waits (waiting-events.ts) and is decrypted and relayed when it comes.
 * - **Feeding the devices** what the homeserver has for them (to-device messages, device list
 *   changes, one-time key counts): from appservice transactions (MSC2409/MSC3202, `transactions`),
 *   or from each device's own `/sync` (`sync`): the reader's device long-polls; a ghost's device
 *   catches up before it encrypts, and every device hears of device list changes through the reader's.
 * - **State**: each machine persists into its own store (device-store.ts) after every change; a
 *   store that is lost all the same moves the user to a new device, logged and said in the room.
 */
import type { OlmMachine } from "@matrix-org/matrix-sdk-crypto-wasm";
import { DecryptionErrorCode, MegolmDecryptionError } from "@matrix-org/matrix-sdk-crypto-wasm";
import { errorMessage, RetryableError } from "../../errors.js";
import type { Logger } from "../../log.js";
import { LogLimiter } from "../../log-limiter.js";
import type { MatrixEvent } from "../appservice-server.js";
import type { DeviceAuth, EventSealer, MatrixClient } from "../matrix-client.js";
import { newDeviceId, type DeviceRecord, type DeviceRecords } from "./device-records.js";
import { syncLoop, syncOnce } from "./device-sync.js";
import { OlmDevice, type DeviceChanges } from "./olm-device.js";
import { RoomAudience } from "./room-audience.js";
import type { TransactionDeviceData } from "./transaction-device-data.js";
import type { WaitingEvent, WaitingEvents } from "./waiting-events.js";

/** The crypto stores of devices (device-store.ts). */
export interface CryptoStoreAccess {
  /** Whether a device has a stored state (a device of a record without one has lost it). */
  has(userId: string, deviceId: string): Promise<boolean>;
  /** Opens the device's machine; rejects with `isLostStore(err)` when its state cannot be read. */
  open(userId: string, deviceId: string): Promise<OlmMachine>;
  persist(userId: string, deviceId: string): Promise<void>;
  forget(userId: string, deviceId: string): Promise<void>;
  /** Persists and closes every machine. */
  closeAll(): Promise<void>;
  isLostStore(err: unknown): boolean;
}

export interface EndToEndOptions {
  matrix: Pick<MatrixClient, "requestAs" | "roomState" | "ghostReady" | "joinGhost">;
  stores: CryptoStoreAccess;
  records: DeviceRecords;
  bot: { userId: string; displayName: string };
  /** The user whose device reads encrypted rooms (in our namespace; see the header). */
  reader: { userId: string; displayName: string };
  /** Our users (the bot, ghosts): they read nothing, so get no room keys. */
  isOurs(userId: string): boolean;
  isEncrypted(roomId: string): Promise<boolean>;
  /** `msc4190`: devices made with `PUT /devices/{id}` and used by masquerading; `login`: by login, used with their token. */
  deviceCreation: "msc4190" | "login";
  feed: "transactions" | "sync";
  waiting: WaitingEvents;
  /** A room event decrypted later than it arrived: handled as if it had just arrived. */
  decryptedLater(ev: MatrixEvent): Promise<void>;
  /** Posts a notice as the bot (a device moved). */
  notice(roomId: string, text: string): Promise<void>;
  log: Logger;
}

/** A ghost's device catches up with its own sync at most this often before encrypting. */
const CATCH_UP_MS = 10_000;
/** A catch-up stops after this many syncs even if the inbox is not empty yet (the next one goes on). */
const MAX_CATCH_UP_ROUNDS = 50;
/** A waiting event decrypted but not handed on is tried again after this long. */
const WAITING_RETRY_MS = 30_000;
const DEVICE_NAME = "tribridge";

export class EndToEnd implements EventSealer {
  private readonly devices = new Map<string, Promise<OlmDevice>>();
  private readonly audience: RoomAudience;
  private readonly caughtUpAt = new Map<string, number>();
  private readonly catchingUp = new Map<string, Promise<void>>();
  /** The key counts and fallback key types each device was last given (transaction feed). */
  private readonly lastCounts = new Map<string, string>();
  /** Users whose device was replaced since start (their lost store): told in the next room they send to. */
  private readonly moved = new Map<string, { from: string; toldIn: Set<string> }>();
  private readonly stopping = new AbortController();
  private readonly failures = new LogLimiter();
  private readonly counts = { decrypted: 0, waited: 0, undecryptable: 0, givenUp: 0 };
  private loops: Promise<void>[] = [];

  constructor(private readonly o: EndToEndOptions) {
    this.audience = new RoomAudience(o.matrix, o.bot.userId);
  }

  /** The reader's device ready (keys uploaded) and its feed started. */
  async start(): Promise<void> {
    const reader = await this.readerDevice();
    reader.machine.registerRoomKeyUpdatedCallback(async (keys) => {
      const sessions = new Set(keys.map((k) => k.sessionId));
      void this.retryWaiting(() => this.o.waiting.ofSessions(sessions));
    });
    if (this.o.feed === "sync") this.loops.push(this.syncReader(reader));
    else await this.catchUpReader(reader, true); // what came while we were away
    this.o.log.info(
      {
        reader: reader.userId,
        device: reader.deviceId,
        feed: this.o.feed,
        deviceCreation: this.o.deviceCreation,
      },
      "end-to-end encryption ready",
    );
  }

  /**
   * Events still waiting for their keys (from before a restart) tried again, once what they are
   * handed to is ready (the route rooms known).
   */
  retryAllWaiting(): Promise<void> {
    return this.retryWaiting(() => this.o.waiting.all());
  }

  /**
   * The reader joins an encrypted room tribridge uses (a route's, or one the bot is in), so that
   * people's clients share their room keys with its device; invited by the bot where the room
   * wants that. Messages sent before it joined are not readable (their keys went to the members
   * of then). Failures are logged; tried again the next time the room is found encrypted.
   */
  async readIn(roomId: string): Promise<void> {
    const { userId, displayName } = this.o.reader;
    try {
      await this.o.matrix.joinGhost(userId, displayName, roomId);
    } catch (err) {
      this.o.log.warn(
        { roomId, reader: userId, err: errorMessage(err) },
        "the reader could not join an encrypted room: what people write there cannot be read",
      );
    }
  }

  async stop(): Promise<void> {
    this.stopping.abort();
    await Promise.allSettled(this.loops);
    // Whatever a machine is doing finishes first, and nothing starts after: the queues and the
    // appservice listener stop after this, and may still seal, open or hand a transaction over
    // (refused, RetryableError: retried after the restart) while the machines are freed.
    await Promise.allSettled([...this.devices.values()].map((d) => d.then((device) => device.close())));
    await this.o.stores.closeAll();
  }

  /** EventSealer: what is sent into a room is encrypted when the room is. */
  encrypts(roomId: string): Promise<boolean> {
    return this.o.isEncrypted(roomId);
  }

  /** EventSealer: an event for an encrypted room, encrypted by the sender's device. */
  async seal(
    userId: string,
    roomId: string,
    type: string,
    content: Record<string, unknown>,
  ): Promise<{ device: DeviceAuth; content: Record<string, unknown> } | undefined> {
    if (!(await this.encrypts(roomId))) return undefined;
    const device = await this.deviceOf(userId);
    // On the sync feed a ghost's device catches up; the bot's may not sync (see the header) and
    // the reader's long-polls: both hear of device list changes through the reader's.
    if (this.o.feed === "sync" && userId !== this.o.bot.userId && userId !== this.o.reader.userId)
      await this.catchUp(device);
    const { users, settings } = await this.audience.recipients(roomId);
    const people = users.filter((u) => !this.o.isOurs(u));
    const encrypted = await device.encrypt(roomId, type, content, people, settings);
    await this.tellMoved(userId, roomId);
    return { device: device.auth, content: encrypted };
  }

  /**
   * An `m.room.encrypted` event: the clear event, or undefined when it cannot be decrypted now
   * (kept to be tried again when its key comes) or ever (logged and counted).
   */
  async open(ev: MatrixEvent): Promise<MatrixEvent | undefined> {
    const reader = await this.readerDevice();
    try {
      const clear = await reader.decrypt(ev as unknown as Record<string, unknown>, ev.room_id);
      this.counts.decrypted++;
      return { ...ev, type: clear.type, content: clear.content };
    } catch (err) {
      if (err instanceof RetryableError) throw err; // stopping: the transaction is tried again
      const sessionId = String((ev.content as { session_id?: unknown }).session_id ?? "");
      if (err instanceof MegolmDecryptionError && waitsForKey(err) && sessionId !== "") {
        this.counts.waited++;
        const givenUp = await this.o.waiting.add({
          event: ev,
          sessionId,
          since: Date.now(),
          reason: err.description,
        });
        this.counts.givenUp += givenUp.length;
        for (const w of givenUp)
          this.o.log.warn(
            { eventId: w.event.event_id, roomId: w.event.room_id, since: new Date(w.since).toISOString() },
            "gave up an encrypted event whose key never came (too many waiting)",
          );
        this.o.log.info(
          { eventId: ev.event_id, roomId: ev.room_id, sender: ev.sender, sessionId },
          "an encrypted event's key has not arrived yet: it is relayed when it does",
        );
        if (this.o.feed === "transactions") void this.catchUpReader(reader); // its key may have been dropped
        return undefined;
      }
      this.counts.undecryptable++;
      const reason = err instanceof MegolmDecryptionError ? err.description : errorMessage(err);
      const gate = this.failures.pass(ev.room_id);
      if (gate)
        this.o.log.warn(
          {
            eventId: ev.event_id,
            roomId: ev.room_id,
            sender: ev.sender,
            err: reason,
            notLogged: gate.heldBack,
          },
          "an encrypted event could not be decrypted: not relayed",
        );
      return undefined;
    }
  }

  /** State events the homeserver pushes: who gets room keys, and how sessions rotate. */
  noteState(ev: MatrixEvent): void {
    this.audience.noteState(ev);
  }

  /**
   * What a transaction carries for our devices (the transaction feed). To-device messages open
   * the device they are for; key counts and fallback key types only reach a device already open
   * here, and only when they changed (Synapse sends them for every user of ours in the
   * transaction's rooms: opening each ghost's machine for them would cost a snapshot each, every
   * transaction). Device list changes go to every open machine (one opened later asks for the
   * lists afresh: makeDevice).
   *
   * A device that fails does not fail the transaction: the homeserver would not send its device
   * data again anyway (Synapse retries only the events). What the reader missed is still in its
   * inbox: it catches up.
   */
  async receiveTransaction(data: TransactionDeviceData): Promise<void> {
    if (this.o.feed !== "transactions") return;
    const perDevice = new Map<string, DeviceChanges & { userId: string; deviceId: string }>();
    const changesOf = (userId: string, deviceId: string) => {
      const key = `${userId}|${deviceId}`;
      let changes = perDevice.get(key);
      if (!changes) perDevice.set(key, (changes = { userId, deviceId, toDevice: [] }));
      return changes;
    };
    for (const message of data.toDevice) {
      if (typeof message.to_user_id !== "string" || typeof message.to_device_id !== "string") continue;
      (changesOf(message.to_user_id, message.to_device_id).toDevice as unknown[]).push(message);
    }
    // Synapse leaves out an algorithm a device has no unused key of: its count is 0.
    for (const [userId, devices] of Object.entries(data.oneTimeKeyCounts))
      for (const [deviceId, counts] of Object.entries(devices))
        changesOf(userId, deviceId).oneTimeKeyCounts = { signed_curve25519: 0, ...counts };
    for (const [userId, devices] of Object.entries(data.unusedFallbackKeyTypes))
      for (const [deviceId, types] of Object.entries(devices))
        changesOf(userId, deviceId).unusedFallbackKeyTypes = types;
    const lists = { changed: data.changed, left: data.left };
    const listsChanged = lists.changed.length > 0 || lists.left.length > 0;
    const work: { userId: string; done: Promise<void> }[] = [];
    for (const changes of perDevice.values()) {
      const { userId, deviceId } = changes;
      const messages = (changes.toDevice?.length ?? 0) > 0;
      const device = this.ourDevice(userId, deviceId, { open: messages });
      if (!device || (!messages && !listsChanged && !this.countsChanged(changes))) continue;
      work.push({ userId, done: device.then((d) => d.receive({ ...changes, ...lists })) });
    }
    if (listsChanged)
      for (const [userId, device] of this.devices)
        if (!work.some((w) => w.userId === userId))
          work.push({ userId, done: device.then((d) => d.receive(lists)) });
    const failed = await this.settle(work);
    if (failed.includes(this.o.reader.userId))
      void this.readerDevice().then(
        (reader) => this.catchUpReader(reader, true),
        () => undefined, // stopping
      );
  }

  /** Waits for every device's share of some work; failures are logged, and who failed returned. */
  private async settle(work: { userId: string; done: Promise<unknown> }[]): Promise<string[]> {
    const results = await Promise.allSettled(work.map((w) => w.done));
    const failed: string[] = [];
    results.forEach((r, i) => {
      if (r.status === "fulfilled") return;
      failed.push(work[i]!.userId);
      this.o.log.warn(
        { userId: work[i]!.userId, err: errorMessage(r.reason) },
        "a device could not take in what the homeserver had for it",
      );
    });
    return failed;
  }

  /** Whether a device's key counts or fallback key types differ from those it was last given. */
  private countsChanged(changes: DeviceChanges & { userId: string; deviceId: string }): boolean {
    const key = `${changes.userId}|${changes.deviceId}`;
    const now = JSON.stringify([changes.oneTimeKeyCounts, changes.unusedFallbackKeyTypes]);
    if (this.lastCounts.get(key) === now) return false;
    this.lastCounts.set(key, now);
    return true;
  }

  /** Lines for `!tribridge status`. */
  async statusLines(): Promise<string[]> {
    const waiting = await this.o.waiting.all();
    const lines = [
      `End-to-end encryption: ${this.devices.size} device(s) in use; since start ${this.counts.decrypted} event(s) decrypted, ` +
        `${this.counts.undecryptable} could not be, ${this.counts.givenUp} given up waiting for their key`,
    ];
    if (waiting.length > 0) {
      const oldest = Math.min(...waiting.map((w) => w.since));
      lines.push(
        `  ${waiting.length} encrypted event(s) waiting for their room key, the oldest since ${new Date(oldest).toISOString()}`,
      );
    }
    return lines;
  }

  /** Tries the waiting events `which` selects again; those decrypted are handled and forgotten. */
  private async retryWaiting(load: () => Promise<WaitingEvent[]>): Promise<void> {
    if (this.stopping.signal.aborted) return;
    try {
      await this.retryWaitingNow(load);
    } catch (err) {
      // Redis away, or stopping: each waiting event stays, tried again on its key or the next start.
      this.o.log.warn({ err: errorMessage(err) }, "could not try the waiting encrypted events again");
    }
  }

  private async retryWaitingNow(load: () => Promise<WaitingEvent[]>): Promise<void> {
    const reader = await this.readerDevice();
    for (const w of (await load()).sort((a, b) => a.since - b.since)) {
      try {
        const clear = await reader.decrypt(w.event as unknown as Record<string, unknown>, w.event.room_id);
        this.counts.decrypted++;
        await this.o.decryptedLater({ ...w.event, type: clear.type, content: clear.content });
        await this.o.waiting.remove([w.event.event_id]);
        this.o.log.info(
          { eventId: w.event.event_id, roomId: w.event.room_id },
          "decrypted an event whose key came late",
        );
      } catch (err) {
        if (err instanceof MegolmDecryptionError && waitsForKey(err)) continue;
        // Decrypted, but not handed on (Redis away, say): kept, and tried again in a while.
        this.o.log.warn(
          { eventId: w.event.event_id, err: errorMessage(err), retryInMs: WAITING_RETRY_MS },
          "a waiting encrypted event failed again",
        );
        const again = () => this.o.waiting.byIds([w.event.event_id]);
        setTimeout(() => void this.retryWaiting(again), WAITING_RETRY_MS).unref();
      }
    }
  }

  /**
   * A device of ours the homeserver addressed (unknown ones ignored): opened if this process has
   * not yet and `open`, else only if it is open here already.
   */
  private ourDevice(userId: string, deviceId: string, o: { open: boolean }): Promise<OlmDevice> | undefined {
    if (this.o.records.get(userId)?.deviceId !== deviceId) return undefined;
    return o.open ? this.deviceOf(userId) : this.devices.get(userId);
  }

  /** The user's device, made and opened on first use (see makeDevice). */
  private deviceOf(userId: string, displayName?: string): Promise<OlmDevice> {
    if (this.stopping.signal.aborted)
      return Promise.reject(new RetryableError("end-to-end encryption is stopping"));
    let device = this.devices.get(userId);
    if (!device) {
      device = this.makeDevice(userId, displayName);
      device.catch(() => this.devices.delete(userId)); // tried again on the next use
      this.devices.set(userId, device);
    }
    return device;
  }

  private async makeDevice(userId: string, displayName: string | undefined): Promise<OlmDevice> {
    let record = this.o.records.get(userId);
    if (record && !(await this.o.stores.has(userId, record.deviceId)))
      record = await this.replace(userId, record);
    if (!record) {
      record = { deviceId: newDeviceId(), createdAt: Date.now() };
      await this.o.records.set(userId, record);
    }
    if (!record.created) {
      if (displayName !== undefined) await this.o.matrix.ghostReady(userId, displayName);
      record = { ...record, ...(await this.create(userId, record.deviceId)), created: true };
      await this.o.records.set(userId, record);
      this.o.log.info({ userId, device: record.deviceId }, "made a device for end-to-end encryption");
    }
    let machine: OlmMachine;
    try {
      machine = await this.o.stores.open(userId, record.deviceId);
    } catch (err) {
      if (!this.o.stores.isLostStore(err)) throw err;
      await this.replace(userId, record);
      return this.makeDevice(userId, displayName);
    }
    const auth: DeviceAuth = { userId, deviceId: record.deviceId, accessToken: record.accessToken };
    const device = new OlmDevice(auth, machine, this.o.matrix, this.o.stores);
    // Device list changes that came while it was not open here never reached it: asked afresh.
    await device.exclusive(() => machine.markAllTrackedUsersAsDirty());
    await device.flush(); // its keys uploaded (and the lists asked for) before anyone needs them
    if (!record.crossSigned) await this.crossSign(device);
    return device;
  }

  /** Cross-signs a new device (see OlmDevice.crossSign); one that cannot be stays usable, unsigned. */
  private async crossSign(device: OlmDevice): Promise<void> {
    const { userId, deviceId } = device;
    try {
      await device.crossSign();
      await this.o.records.update(userId, { crossSigned: true });
      this.o.log.info({ userId, device: deviceId }, "cross-signed the device");
    } catch (err) {
      this.o.log.warn(
        { userId, device: deviceId, err: errorMessage(err) },
        "could not cross-sign the device: clients show it as not verified by its owner",
      );
    }
  }

  /** Creates the device on the homeserver (both ways are idempotent for one device id). */
  private async create(userId: string, deviceId: string): Promise<Pick<DeviceRecord, "accessToken">> {
    if (this.o.deviceCreation === "msc4190") {
      const path = `/_matrix/client/v3/devices/${encodeURIComponent(deviceId)}`;
      await this.o.matrix.requestAs(userId, "PUT", path, { display_name: DEVICE_NAME });
      return {};
    }
    const login = await this.o.matrix.requestAs(this.o.bot.userId, "POST", "/_matrix/client/v3/login", {
      type: "m.login.application_service",
      identifier: { type: "m.id.user", user: userId },
      device_id: deviceId,
      initial_device_display_name: DEVICE_NAME,
    });
    if (typeof login.access_token !== "string") throw new Error("login answered without an access token");
    return { accessToken: login.access_token };
  }

  /**
   * A device whose crypto store is lost cannot be used again (the homeserver keeps its keys): the
   * user moves to a new device; the old one is removed where the homeserver lets us.
   */
  private async replace(userId: string, lost: DeviceRecord): Promise<undefined> {
    this.o.log.error(
      { userId, device: lost.deviceId },
      "the crypto store of a device is lost: moving to a new device (messages it sent stay readable; " +
        "people see a new, unverified device)",
    );
    await this.o.stores.forget(userId, lost.deviceId);
    await this.remove(userId, lost).catch((err: unknown) =>
      this.o.log.warn(
        { userId, device: lost.deviceId, err: errorMessage(err) },
        "could not remove the lost device",
      ),
    );
    this.moved.set(userId, { from: lost.deviceId, toldIn: new Set() });
    return undefined;
  }

  private async remove(userId: string, device: DeviceRecord): Promise<void> {
    if (!device.created) return;
    if (device.accessToken) {
      await this.o.matrix.requestAs(
        { userId, deviceId: device.deviceId, accessToken: device.accessToken },
        "POST",
        "/_matrix/client/v3/logout",
        {},
      );
    } else {
      await this.o.matrix.requestAs(
        userId,
        "DELETE",
        `/_matrix/client/v3/devices/${encodeURIComponent(device.deviceId)}`,
        {},
      );
    }
  }

  private async tellMoved(userId: string, roomId: string): Promise<void> {
    const moved = this.moved.get(userId);
    if (!moved || moved.toldIn.has(roomId)) return;
    moved.toldIn.add(roomId);
    const now = this.o.records.get(userId)?.deviceId;
    await this.o
      .notice(
        roomId,
        `tribridge lost the encryption keys of ${userId}'s device ${moved.from} and moved it to a new device ${now}: ` +
          "what it sent before stays readable; the new device is not verified.",
      )
      .catch((err: unknown) =>
        this.o.log.warn({ roomId, err: errorMessage(err) }, "could not tell a room of a moved device"),
      );
  }

  /**
   * Catches a device up with its own `/sync` (no waiting: what is there now), at most every
   * CATCH_UP_MS unless `now`; one at a time per device. Used by ghosts' devices on the sync feed
   * before they encrypt, and by the reader's on the transaction feed: Synapse drops the to-device
   * messages of a transaction it could not deliver (only its events are retried), so room keys
   * sent while we were away are fetched from the device's inbox, where they stay until a sync.
   */
  private catchUp(device: OlmDevice, now = false): Promise<void> {
    const running = this.catchingUp.get(device.userId);
    if (running) return running;
    if (!now && Date.now() - (this.caughtUpAt.get(device.userId) ?? 0) < CATCH_UP_MS)
      return Promise.resolve();
    const done = (async () => {
      for (let round = 0; round < MAX_CATCH_UP_ROUNDS; round++) {
        const since = this.o.records.get(device.userId)?.since;
        const { next, changes } = await syncOnce(this.o.matrix, device.auth, since, 0);
        await device.receive(changes);
        if (device.userId === this.o.reader.userId) await this.spreadLists(device, changes);
        await this.o.records.update(device.userId, { since: next });
        // A sync hands out a limited number of to-device messages (Synapse: 100); an empty one is the end.
        if ((changes.toDevice?.length ?? 0) === 0) break;
      }
      this.caughtUpAt.set(device.userId, Date.now());
    })().finally(() => this.catchingUp.delete(device.userId));
    this.catchingUp.set(device.userId, done);
    return done;
  }

  /** The reader's device on the transaction feed: caught up, and a failure logged (the feed goes on). */
  private catchUpReader(reader: OlmDevice, now = false): Promise<void> {
    return this.catchUp(reader, now).catch((err: unknown) =>
      this.o.log.warn({ err: errorMessage(err) }, "the reader's device could not catch up with its sync"),
    );
  }

  /** The sync feed of the reader's device: long-polls; device list changes go to every machine. */
  private syncReader(reader: OlmDevice): Promise<void> {
    return syncLoop({
      matrix: this.o.matrix,
      device: reader.auth,
      since: () => this.o.records.get(reader.userId)?.since,
      handle: async (changes) => {
        await reader.receive(changes);
        await this.spreadLists(reader, changes);
      },
      keep: (next) => this.o.records.update(reader.userId, { since: next }),
      signal: this.stopping.signal,
      log: this.o.log,
    });
  }

  /**
   * Device list changes the reader's sync brought, given to every other open machine. One that
   * fails is logged and left (it asks afresh when next opened); it must not hold the reader's
   * position back, or the reader's inbox would fill up behind it.
   */
  private async spreadLists(reader: OlmDevice, changes: DeviceChanges): Promise<void> {
    const lists = { changed: changes.changed ?? [], left: changes.left ?? [] };
    if (lists.changed.length + lists.left.length === 0) return;
    await this.settle(
      [...this.devices]
        .filter(([userId]) => userId !== reader.userId)
        .map(([userId, device]) => ({ userId, done: device.then((d) => d.receive(lists)) })),
    );
  }

  private readerDevice(): Promise<OlmDevice> {
    return this.deviceOf(this.o.reader.userId, this.o.reader.displayName);
  }
}

/** A decryption that may work once a key arrives (not yet shared, or shared from a later index). */
function waitsForKey(err: MegolmDecryptionError): boolean {
  return (
    err.code === DecryptionErrorCode.MissingRoomKey || err.code === DecryptionErrorCode.UnknownMessageIndex
  );
}
