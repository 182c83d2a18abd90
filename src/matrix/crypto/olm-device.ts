/**
 * One Matrix device of ours (the bot's, or a ghost's) and its Olm machine
 * (@matrix-org/matrix-sdk-crypto-wasm): what the homeserver tells the device goes in, the
 * machine's own requests (key uploads, key queries, one-time key claims, to-device messages) go
 * out, and the machine's state is persisted (device-store.ts) after every change and before acting
 * on it: before a request the machine made is sent, and before what was received is acknowledged.
 *
 * A machine is not safe to drive from two calls at once (two shares of one room key would each
 * make a session): every use runs in turn (`exclusive`).
 */
import {
  CollectStrategy,
  DecryptionSettings,
  DeviceLists,
  EncryptionSettings,
  KeysClaimRequest,
  KeysQueryRequest,
  KeysUploadRequest,
  RequestType,
  RoomId,
  RoomMessageRequest,
  SignatureUploadRequest,
  ToDeviceRequest,
  TrustRequirement,
  UserId,
  type OlmMachine,
} from "@matrix-org/matrix-sdk-crypto-wasm";
import { PermanentError, RetryableError } from "../../errors.js";
import type { DeviceAuth, MatrixClient } from "../matrix-client.js";

/** What a sync (or an appservice transaction, MSC2409/MSC3202) tells one device. */
export interface DeviceChanges {
  toDevice?: readonly unknown[];
  changed?: readonly string[];
  left?: readonly string[];
  oneTimeKeyCounts?: Record<string, number>;
  unusedFallbackKeyTypes?: readonly string[];
}

export interface MachinePersistence {
  persist(userId: string, deviceId: string): Promise<void>;
}

/** A Megolm session's sharing and rotation, from the room's state (Client-Server API §m.room.encryption). */
export interface RoomEncryptionSettings {
  rotationPeriodMs?: number;
  rotationPeriodMessages?: number;
  historyVisibility: "invited" | "joined" | "shared" | "world_readable";
}

export type Requests = Pick<MatrixClient, "requestAs">;

const HISTORY: Record<RoomEncryptionSettings["historyVisibility"], number> = {
  invited: 0,
  joined: 1,
  shared: 2,
  world_readable: 3,
};

export class OlmDevice {
  private turn: Promise<unknown> = Promise.resolve();
  private closed = false;

  constructor(
    readonly auth: DeviceAuth,
    readonly machine: OlmMachine,
    private readonly http: Requests,
    private readonly store: MachinePersistence,
  ) {}

  get userId(): string {
    return this.auth.userId;
  }
  get deviceId(): string {
    return this.auth.deviceId;
  }

  /**
   * Runs `fn` once every earlier call has finished. After `close`, refuses (RetryableError): the
   * machine is freed then, and a call into a freed machine fails inside the wasm ("null pointer
   * passed to rust") or makes freeing it fail.
   */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.turn.then(() => {
      if (this.closed) throw new RetryableError(`the device ${this.deviceId} of ${this.userId} is closed`);
      return fn();
    });
    this.turn = run.catch(() => undefined);
    return run;
  }

  /** Resolves once the calls made before have finished; every later call is refused. */
  close(): Promise<void> {
    return this.exclusive(async () => {
      this.closed = true;
    });
  }

  /** Uploads keys the machine wants uploaded (its first keys; more one-time keys), and so on. */
  flush(): Promise<void> {
    return this.exclusive(() => this.sendOutgoing());
  }

  /**
   * Feeds the device what the homeserver said, then sends what the machine wants sent (new
   * one-time keys, key queries), persisting before each; resolves once all of it is durable, so
   * the caller may acknowledge it.
   */
  receive(changes: DeviceChanges): Promise<void> {
    return this.exclusive(async () => {
      await this.machine.receiveSyncChanges(
        JSON.stringify(changes.toDevice ?? []),
        new DeviceLists(
          (changes.changed ?? []).map((u) => new UserId(u)),
          (changes.left ?? []).map((u) => new UserId(u)),
        ),
        new Map(Object.entries(changes.oneTimeKeyCounts ?? {})),
        changes.unusedFallbackKeyTypes && new Set(changes.unusedFallbackKeyTypes),
      );
      await this.store.persist(this.userId, this.deviceId);
      await this.sendOutgoing();
    });
  }

  /**
   * Encrypts an event for a room, first sharing the room's current Megolm key with every device
   * of `members` that lacks it (Olm sessions claimed as needed). Nothing is encrypted before the
   * key went out to all of them: a crash in between shares again rather than leaving a message
   * nobody can read.
   */
  encrypt(
    roomId: string,
    type: string,
    content: Record<string, unknown>,
    members: readonly string[],
    settings: RoomEncryptionSettings,
  ): Promise<Record<string, unknown>> {
    return this.exclusive(async () => {
      const room = new RoomId(roomId);
      // A fresh array each call: the wasm bindings take the UserIds of the array they are given.
      const users = () => members.map((m) => new UserId(m));
      await this.machine.updateTrackedUsers(users());
      await this.sendOutgoing(); // key queries for members not known yet
      const claim = await this.machine.getMissingSessions(users());
      if (claim) await this.send(claim);
      const shares = await this.machine.shareRoomKey(room, users(), encryptionSettings(settings));
      if (shares.length > 0) await this.store.persist(this.userId, this.deviceId);
      for (const share of shares) await this.send(share);
      const encrypted = await this.machine.encryptRoomEvent(room, type, JSON.stringify(content));
      await this.store.persist(this.userId, this.deviceId);
      return JSON.parse(encrypted) as Record<string, unknown>;
    });
  }

  /**
   * Decrypts a room event (`m.room.encrypted`): its clear type and content, with the relation
   * that travels unencrypted (Client-Server API §Mixing end-to-end encryption with relations).
   * Throws the machine's MegolmDecryptionError when it cannot.
   */
  decrypt(
    event: Record<string, unknown>,
    roomId: string,
  ): Promise<{ type: string; content: Record<string, unknown> }> {
    return this.exclusive(async () => {
      const decrypted = await this.machine.decryptRoomEvent(
        JSON.stringify(event),
        new RoomId(roomId),
        new DecryptionSettings(TrustRequirement.Untrusted),
      );
      const clear = JSON.parse(decrypted.event) as { type?: unknown; content?: unknown };
      if (typeof clear.type !== "string" || typeof clear.content !== "object" || clear.content === null)
        throw new PermanentError("a decrypted event without type or content");
      const content = { ...(clear.content as Record<string, unknown>) };
      const relation = (event.content as Record<string, unknown> | undefined)?.["m.relates_to"];
      if (relation !== undefined && content["m.relates_to"] === undefined) content["m.relates_to"] = relation;
      return { type: clear.type, content };
    });
  }

  /**
   * Gives the user a cross-signing identity (Client-Server API §Cross-signing) and signs this
   * device with it, so that clients show the device as its owner's rather than as an unverified
   * one. An identity made before and not uploaded (the homeserver refused) is uploaded again as
   * it is, which the homeserver accepts; a user whose identity is already on the homeserver needs
   * user-interactive authentication to replace it, which only appservices are spared (Synapse,
   * MSC4190): then this rejects and the device stays unsigned.
   */
  crossSign(): Promise<void> {
    return this.exclusive(async () => {
      const status = await this.machine.crossSigningStatus();
      if (!status.hasMaster) {
        // An identity on the homeserver that this store does not hold (made before a lost store,
        // or by another instance): replacing it would show every client an identity reset.
        await this.machine.updateTrackedUsers([new UserId(this.userId)]);
        await this.sendOutgoing();
        if (await this.machine.getIdentity(new UserId(this.userId)))
          throw new PermanentError(
            "the user has a cross-signing identity this device cannot sign with; not replaced",
          );
      }
      const requests = await this.machine.bootstrapCrossSigning(!status.hasMaster);
      await this.store.persist(this.userId, this.deviceId); // the private keys, before anything is sent
      if (requests.uploadKeysRequest) await this.send(requests.uploadKeysRequest as KeysUploadRequest);
      const signingKeys = JSON.parse(requests.uploadSigningKeysRequest.body) as Record<string, unknown>;
      await this.http.requestAs(
        this.auth,
        "POST",
        "/_matrix/client/v3/keys/device_signing/upload",
        signingKeys,
      );
      await this.send(requests.uploadSignaturesRequest);
      await this.store.persist(this.userId, this.deviceId);
    });
  }

  /** Sends every request the machine has waiting, persisting the machine before each. */
  private async sendOutgoing(): Promise<void> {
    // A response can make new requests (a key query after an upload, say): until none is left.
    for (let round = 0; round < 5; round++) {
      const requests = await this.machine.outgoingRequests();
      if (requests.length === 0) return;
      await this.store.persist(this.userId, this.deviceId);
      for (const request of requests) await this.send(request);
    }
  }

  private async send(request: OutgoingRequest): Promise<void> {
    const { method, path, body } = httpOf(request);
    const response = await this.http.requestAs(this.auth, method, path, body);
    if (request.id !== undefined)
      await this.machine.markRequestAsSent(request.id, request.type, JSON.stringify(response));
  }
}

type OutgoingRequest =
  | KeysUploadRequest
  | KeysQueryRequest
  | KeysClaimRequest
  | ToDeviceRequest
  | SignatureUploadRequest
  | RoomMessageRequest;

/** The Client-Server API request for each kind of request a machine makes. */
function httpOf(request: OutgoingRequest): {
  method: "POST" | "PUT";
  path: string;
  body: Record<string, unknown>;
} {
  const body = JSON.parse(request.body) as Record<string, unknown>;
  const v3 = "/_matrix/client/v3";
  switch (request.type) {
    case RequestType.KeysUpload:
      return { method: "POST", path: `${v3}/keys/upload`, body };
    case RequestType.KeysQuery:
      return { method: "POST", path: `${v3}/keys/query`, body };
    case RequestType.KeysClaim:
      return { method: "POST", path: `${v3}/keys/claim`, body };
    case RequestType.SignatureUpload:
      return { method: "POST", path: `${v3}/keys/signatures/upload`, body };
    case RequestType.ToDevice: {
      const r = request as ToDeviceRequest;
      return {
        method: "PUT",
        path: `${v3}/sendToDevice/${encodeURIComponent(r.event_type)}/${encodeURIComponent(r.txn_id)}`,
        body,
      };
    }
    case RequestType.RoomMessage: {
      const r = request as RoomMessageRequest;
      return {
        method: "PUT",
        path: `${v3}/rooms/${encodeURIComponent(r.room_id)}/send/${encodeURIComponent(r.event_type)}/${encodeURIComponent(r.txn_id)}`,
        body,
      };
    }
    default:
      throw new PermanentError(
        `an Olm machine asked for a request tribridge does not make (${request.type})`,
      );
  }
}

function encryptionSettings(room: RoomEncryptionSettings): EncryptionSettings {
  const settings = new EncryptionSettings();
  // Every device of every member, verified or not: a bridge cannot verify people's devices, and
  // people's clients share with ours on the same terms.
  settings.sharingStrategy = CollectStrategy.allDevices();
  settings.historyVisibility = HISTORY[room.historyVisibility];
  // The spec's defaults (a week, 100 messages) unless the room says otherwise; µs in the machine.
  if (room.rotationPeriodMs !== undefined) settings.rotationPeriod = BigInt(room.rotationPeriodMs) * 1000n;
  if (room.rotationPeriodMessages !== undefined)
    settings.rotationPeriodMessages = BigInt(room.rotationPeriodMessages);
  return settings;
}
