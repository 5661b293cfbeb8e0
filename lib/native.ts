/**
 * The typed boundary to the native addon: the only module that touches untyped native objects.
 * node-gyp-build loads build/Release (a local build) or prebuilds/<platform>-<arch> (what ships).
 */
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { errorFromNative } from './errors.js';

export interface NativeStoreOptions {
  mode: 'create' | 'attach';
  name: string;
  capacity?: number;
  maxObjects?: number;
  spillDirectory?: string;
  prefaultWindow?: number;
}

export interface NativeStoreStats {
  segmentSize: number;
  capacity: number;
  bytesInUse: number;
  objectCount: number;
  maxObjects: number;
  pinnedObjects: number;
  spilledObjects: number;
  spilledBytes: number;
  totalSpilledBytes: number;
  totalRestoredBytes: number;
  totalSpilledObjects: number;
  totalRestoredObjects: number;
  recoveries: number;
  prefaultedBytes: number;
  attachedProcesses: number;
}

/**
 * A pinned object: where its data sits in the region buffer, a copy of its metadata, and the pin's
 * name (entry, generation) for release.
 */
export type NativePinned = [offset: number, size: number, metadata: Uint8Array | null, entry: number, generation: number];

export interface NativeObjectStore {
  readonly name: string;
  readonly segmentSize: number;
  create(id: string, size: number, metadata?: Uint8Array): NativePinned;
  write(id: string, bytes: ArrayBufferView | ArrayBuffer, offset?: number): void;
  seal(id: string): void;
  abort(id: string): void;
  put(id: string, data: ArrayBufferView | ArrayBuffer, metadata?: Uint8Array): void;
  /** The pinned object, or 0 when the id is absent, 1 when it is not sealed yet. */
  get(id: string): NativePinned | 0 | 1;
  /** Drops one pin of this process. */
  release(entry: number, generation: number): void;
  /** An ArrayBuffer over [start, start + length) of the data region (length at most 4 GiB - 4 KiB). */
  region(start: number, length: number): ArrayBuffer;
  /** Bytes of the data region. */
  readonly dataSize: number;
  delete(id: string): void;
  state(id: string): 'absent' | 'created' | 'sealed' | 'spilled';
  stats(): NativeStoreStats;
  reapDeadProcesses(): number;
  watchSeals(callback: () => void): void;
  unwatchSeals(): void;
  close(): void;
  setCrashPoint(point: string): void;
  holdLockForever(): never;
}

/** One rank of a shared-memory communicator; operations run in order off the JS thread. */
export interface NativeShmCommunicator {
  allreduce(tensor: ArrayBufferView, dtype: string, op: string): Promise<void>;
  allgather(input: ArrayBufferView, output: ArrayBufferView): Promise<void>;
  reducescatter(input: ArrayBufferView, output: ArrayBufferView, dtype: string, op: string): Promise<void>;
  broadcast(tensor: ArrayBufferView, root: number): Promise<void>;
  /** Sends and receives that complete together: [isSend, peer, bytes]. */
  transfer(transfers: Array<[boolean, number, ArrayBufferView]>): Promise<void>;
  barrier(): Promise<void>;
  abort(reason?: string): void;
  destroy(): void;
}

export interface NativeShmCommunicatorClass {
  new (segment: string, rank: number, size: number, timeoutMs: number): NativeShmCommunicator;
  createSegment(segment: string, size: number, slotBytes: number): void;
  unlinkSegment(segment: string): void;
}

export interface NativeAddon {
  setErrorFactory(factory: (code: string, message: string, details: Record<string, unknown>) => Error): void;
  NativeObjectStore: new (options: NativeStoreOptions) => NativeObjectStore;
  defaultStoreCapacity(): number;
  NativeShmCommunicator: NativeShmCommunicatorClass;
}

/** The package root: lib/ under tests, dist/ once built. Both sit one level below it. */
export const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..');

function load(): NativeAddon {
  const require = createRequire(import.meta.url);
  const nodeGypBuild = require('node-gyp-build') as (root: string) => unknown;
  const addon = nodeGypBuild(packageRoot) as NativeAddon;
  addon.setErrorFactory(errorFromNative);
  return addon;
}

export const native: NativeAddon = load();
