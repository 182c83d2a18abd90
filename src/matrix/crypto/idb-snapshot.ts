/**
 * Copies IndexedDB databases out of and back into fake-indexeddb, generically: each database with
 * its version, object stores (keyPath, autoIncrement), indexes (keyPath, unique, multiEntry) and
 * every record (key and structured-clone value). Only what the snapshot needs of the IndexedDB API
 * is typed here, so that tribridge does not pull the DOM library into its global types.
 */
import "fake-indexeddb/auto";

type KeyPath = string | string[] | null;

interface IndexSnapshot {
  name: string;
  keyPath: string | string[];
  unique: boolean;
  multiEntry: boolean;
}

interface StoreSnapshot {
  name: string;
  keyPath: KeyPath;
  autoIncrement: boolean;
  indexes: IndexSnapshot[];
  keys: unknown[];
  values: unknown[];
}

export interface DatabaseSnapshot {
  name: string;
  version: number;
  stores: StoreSnapshot[];
}

interface IdbRequest<T> {
  result: T;
  error: unknown;
  onsuccess: (() => void) | null;
  onerror: (() => void) | null;
}

interface IdbOpenRequest extends IdbRequest<IdbDatabase> {
  onupgradeneeded: (() => void) | null;
  onblocked: (() => void) | null;
}

interface IdbIndex {
  keyPath: string | string[];
  unique: boolean;
  multiEntry: boolean;
}

interface IdbObjectStore {
  keyPath: KeyPath;
  autoIncrement: boolean;
  indexNames: Iterable<string>;
  index(name: string): IdbIndex;
  createIndex(
    name: string,
    keyPath: string | string[],
    options: { unique: boolean; multiEntry: boolean },
  ): void;
  getAll(): IdbRequest<unknown[]>;
  getAllKeys(): IdbRequest<unknown[]>;
  put(value: unknown, key?: unknown): void;
}

interface IdbTransaction {
  objectStore(name: string): IdbObjectStore;
  oncomplete: (() => void) | null;
  onerror: (() => void) | null;
  onabort: (() => void) | null;
  error: unknown;
}

interface IdbDatabase {
  version: number;
  objectStoreNames: Iterable<string>;
  transaction(stores: string[], mode: "readonly" | "readwrite"): IdbTransaction;
  createObjectStore(name: string, options: { keyPath: KeyPath; autoIncrement: boolean }): IdbObjectStore;
  close(): void;
}

interface IdbFactory {
  open(name: string, version?: number): IdbOpenRequest;
  deleteDatabase(name: string): IdbOpenRequest;
  databases(): Promise<{ name?: string; version?: number }[]>;
}

const idb = (globalThis as unknown as { indexedDB: IdbFactory }).indexedDB;

function done<T>(request: IdbRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

function committed(tx: IdbTransaction): Promise<void> {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error ?? new Error("IndexedDB transaction aborted"));
  });
}

/** The databases that belong to a store name: the wasm store names them `<name>::<suffix>`. */
async function databaseNames(storeName: string): Promise<string[]> {
  return (await idb.databases())
    .map((info) => info.name ?? "")
    .filter((name) => name === storeName || name.startsWith(`${storeName}::`))
    .sort();
}

async function readDatabase(name: string): Promise<DatabaseSnapshot> {
  const db = await done(idb.open(name));
  try {
    const storeNames = [...db.objectStoreNames];
    if (storeNames.length === 0) return { name, version: db.version, stores: [] };
    // One readonly transaction over every store: each of the machine's writes lands before or after it, whole.
    const tx = db.transaction(storeNames, "readonly");
    const reads = storeNames.map(async (storeName): Promise<StoreSnapshot> => {
      const store = tx.objectStore(storeName);
      const indexes = [...store.indexNames].map((indexName) => {
        const index = store.index(indexName);
        return {
          name: indexName,
          keyPath: index.keyPath,
          unique: index.unique,
          multiEntry: index.multiEntry,
        };
      });
      const [keys, values] = await Promise.all([done(store.getAllKeys()), done(store.getAll())]);
      return {
        name: storeName,
        keyPath: store.keyPath,
        autoIncrement: store.autoIncrement,
        indexes,
        keys,
        values,
      };
    });
    const [stores] = await Promise.all([Promise.all(reads), committed(tx)]);
    return { name, version: db.version, stores };
  } finally {
    db.close();
  }
}

/** A consistent copy of each database of the store name (consistent per database). */
export async function readDatabases(storeName: string): Promise<DatabaseSnapshot[]> {
  const snapshots: DatabaseSnapshot[] = [];
  for (const name of await databaseNames(storeName)) snapshots.push(await readDatabase(name));
  return snapshots;
}

async function restoreDatabase(snapshot: DatabaseSnapshot): Promise<void> {
  const request = idb.open(snapshot.name, snapshot.version);
  request.onupgradeneeded = () => {
    const db = request.result;
    for (const s of snapshot.stores) {
      const store = db.createObjectStore(s.name, { keyPath: s.keyPath, autoIncrement: s.autoIncrement });
      for (const i of s.indexes)
        store.createIndex(i.name, i.keyPath, { unique: i.unique, multiEntry: i.multiEntry });
    }
  };
  const db = await done(request);
  try {
    if (snapshot.stores.length === 0) return;
    const tx = db.transaction(
      snapshot.stores.map((s) => s.name),
      "readwrite",
    );
    for (const s of snapshot.stores) {
      const store = tx.objectStore(s.name);
      s.values.forEach((value, i) => (s.keyPath === null ? store.put(value, s.keys[i]) : store.put(value)));
    }
    await committed(tx);
  } finally {
    db.close();
  }
}

/** Recreates the databases of a snapshot; the caller has deleted any of the same names. */
export async function restoreDatabases(snapshots: DatabaseSnapshot[]): Promise<void> {
  for (const snapshot of snapshots) await restoreDatabase(snapshot);
}

/**
 * Deletes every database of the store name, freeing its memory. Every connection must be closed
 * first (OlmMachine.close() closes the machine's), or the deletion waits for them.
 */
export async function deleteDatabases(storeName: string): Promise<void> {
  for (const name of await databaseNames(storeName)) await done(idb.deleteDatabase(name));
}
