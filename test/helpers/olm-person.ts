/**
 * A person with an end-to-end encrypting client on the test homeserver: a real Olm machine (the
 * Matrix Rust SDK's crypto, the wasm build Element Web and matrix-js-sdk use) behind the person's
 * own device and access token. It uploads its keys, syncs its to-device messages, shares its room
 * keys with every member's devices, sends `m.room.encrypted` events and decrypts what others send.
 * (Against Synapse, the tests use matrix-js-sdk itself: crypto-person.ts.)
 */
import {
  DecryptionSettings,
  DeviceId,
  OlmMachine,
  RoomId,
  TrustRequirement,
  UserId,
} from "@matrix-org/matrix-sdk-crypto-wasm";
import { OlmDevice, type Requests } from "../../src/matrix/crypto/olm-device.js";
import { syncOnce } from "../../src/matrix/crypto/device-sync.js";
import type { DeviceAuth } from "../../src/matrix/matrix-client.js";
import type { RecordedEvent, TestHomeserver } from "./test-homeserver.js";

type Json = Record<string, unknown>;

export interface Decrypted {
  type: string;
  content: Json;
  sender: string;
  /** The sending device, as the machine verified it from the Olm session that brought the key. */
  senderDevice: string;
}

export class OlmPerson {
  private since: string | undefined;
  private txn = 0;

  private constructor(
    private readonly hs: TestHomeserver,
    readonly device: OlmDevice,
    private readonly held: { path: string; body: unknown }[],
  ) {}

  /** `userId` registered on `hs` (registerUser): its device's keys uploaded. */
  static async create(
    hs: TestHomeserver,
    userId: string,
    token = hs.accessTokenFor(userId),
  ): Promise<OlmPerson> {
    const { url } = hs;
    const whoami = (await request(url, token, "GET", "/_matrix/client/v3/account/whoami")) as {
      device_id: string;
    };
    const auth: DeviceAuth = { userId, deviceId: whoami.device_id, accessToken: token };
    const held: { path: string; body: unknown }[] = [];
    const made: { person?: OlmPerson } = {};
    const http: Requests = {
      requestAs: async (_who, method, path, body) => {
        if (made.person?.holdingToDevice && path.includes("/sendToDevice/")) {
          held.push({ path, body });
          return {} as never; // as if sent: the machine goes on
        }
        return (await request(url, token, method, path, body)) as never;
      },
    };
    const machine = await OlmMachine.initialize(new UserId(userId), new DeviceId(whoami.device_id));
    const device = new OlmDevice(auth, machine, http, { persist: async () => undefined });
    await device.flush();
    made.person = new OlmPerson(hs, device, held);
    return made.person;
  }

  /** While true, to-device messages (room keys) are held back, as if the network were slow. */
  holdingToDevice = false;

  /** Sends the to-device messages held back. */
  async releaseToDevice(): Promise<void> {
    this.holdingToDevice = false;
    for (const { path, body } of this.held.splice(0)) await this.request("PUT", path, body);
  }

  get userId(): string {
    return this.device.userId;
  }

  /** Takes in what the homeserver has for this device (room keys, device list changes). */
  async sync(): Promise<void> {
    const { next, changes } = await syncOnce(
      { requestAs: (_who, method, path, body) => this.request(method, path, body) as never },
      this.device.auth,
      this.since,
      0,
    );
    await this.device.receive(changes);
    this.since = next;
  }

  /** Encrypts `content` for the room's joined members (sharing the room key first) and sends it. */
  async send(roomId: string, content: Json, type = "m.room.message"): Promise<string> {
    const sealed = await this.seal(roomId, content, type);
    return this.post(roomId, sealed);
  }

  /** The room key shared and the event encrypted, not sent: to send it with `post` (or not). */
  async seal(roomId: string, content: Json, type = "m.room.message"): Promise<Json> {
    await this.sync();
    return this.device.encrypt(roomId, type, content, this.hs.members(roomId), {
      historyVisibility: "shared",
    });
  }

  /** Sends an `m.room.encrypted` event as it is. */
  async post(roomId: string, sealed: Json): Promise<string> {
    const path = `/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/send/m.room.encrypted/p${++this.txn}-${Date.now()}`;
    const { event_id } = (await this.request("PUT", path, sealed)) as { event_id: string };
    return event_id;
  }

  /** Decrypts a room event after a sync (its key may just have come); throws when it cannot. */
  async decrypt(ev: RecordedEvent): Promise<Decrypted> {
    await this.sync();
    const d = await this.device.exclusive(() =>
      this.device.machine.decryptRoomEvent(
        JSON.stringify(ev),
        new RoomId(ev.room_id),
        new DecryptionSettings(TrustRequirement.Untrusted),
      ),
    );
    const clear = JSON.parse(d.event) as { type: string; content: Json };
    return { ...clear, sender: d.sender.toString(), senderDevice: d.senderDevice?.toString() ?? "" };
  }

  /** Whether `userId`'s cross-signing identity signed its device `deviceId`, as this client sees it. */
  async seesCrossSigned(userId: string, deviceId: string): Promise<boolean> {
    await this.sync();
    await this.device.exclusive(() => this.device.machine.updateTrackedUsers([new UserId(userId)]));
    await this.device.flush(); // the key query
    const device = await this.device.machine.getDevice(new UserId(userId), new DeviceId(deviceId));
    return device?.isCrossSignedByOwner() ?? false;
  }

  /** The encrypted events of a room not sent by this person, in order. */
  encryptedFromOthers(roomId: string): RecordedEvent[] {
    return this.hs.events(roomId).filter((e) => e.type === "m.room.encrypted" && e.sender !== this.userId);
  }

  close(): void {
    this.device.machine.close();
  }

  private request(method: string, path: string, body?: unknown): Promise<unknown> {
    return request(this.hs.url, this.device.auth.accessToken!, method, path, body);
  }
}

async function request(
  url: string,
  token: string,
  method: string,
  path: string,
  body?: unknown,
): Promise<unknown> {
  const res = await fetch(new URL(path, url), {
    method,
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: method === "GET" || body === undefined ? undefined : JSON.stringify(body),
  });
  const answer = (await res.json()) as unknown;
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${JSON.stringify(answer)}`);
  return answer;
}
