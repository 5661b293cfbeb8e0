/**
 * The typed boundary to the native addon: the only module that touches untyped native objects.
 * node-gyp-build loads build/Release (a local build) or prebuilds/<platform>-<arch> (what ships).
 */
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { errorFromNative } from './errors.js';
import type { DeviceInfo, IpcHandle, IpcStats, PageLockStats } from './gpu/cuda-types.js';

export interface NativeStoreOptions {
  mode: 'create' | 'attach';
  name: string;
  capacity?: number;
  maxObjects?: number;
  spillDirectory?: string;
  prefaultWindow?: number;
}

export interface NativeStoreStats {
  /** Bytes of the whole segment, tables included. */
  segmentSize: number;
  /** Bytes available for objects. */
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
  /** Times a process died inside the store's lock and the store rebuilt its tables. */
  recoveries: number;
  prefaultedBytes: number;
  attachedProcesses: number;
}

/**
 * A pinned object: where its data sits in the region buffer, a copy of its metadata, and the pin's
 * name (entry, generation) for release.
 */
export type NativePinned = [offset: number, size: number, metadata: Uint8Array | null, entry: number, generation: number];

/** An object pinned in a store, and the processes pinning it (see ObjectStore.pinned). */
export interface PinnedObjectInfo {
  objectId: string;
  state: 'created' | 'sealed' | 'spilled';
  /** Deleted, yet pinned: no longer visible, its bytes freed when its last pin goes. */
  deleted: boolean;
  /** Bytes of data and metadata. */
  size: number;
  holders: Array<{ pid: number; pins: number }>;
}

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
  pinned(): PinnedObjectInfo[];
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

export interface NativeCudaStatus {
  available: boolean;
  /** Why not, when not: the dlopen error, the missing symbol, or cuInit's error. */
  reason?: string;
  /** libcuda.so.1, or $TRELLIS_CUDA_DRIVER. */
  libraryPath: string;
  /** cuDriverGetVersion (e.g. 13000), when the library loaded. */
  driverVersion?: number;
  deviceCount: number;
}

/** The addon hands devices and IPC exports over in exactly the public shapes. */
export type NativeDeviceInfo = DeviceInfo;
export type NativeIpcHandle = IpcHandle;

export interface NativeCudaStream {
  readonly device: number;
  readonly address: bigint;
  synchronize(): Promise<void>;
  wait(event: NativeCudaEvent): void;
  destroy(): void;
}

export interface NativeCudaEvent {
  readonly device: number;
  done(): boolean;
  synchronize(): Promise<void>;
  elapsedMs(later: NativeCudaEvent): number;
}

/** Device memory from the caching allocator, or mapped from another process by CUDA IPC. */
export interface NativeDeviceMemory {
  readonly device: number;
  readonly byteLength: number;
  readonly address: bigint;
  readonly imported: boolean;
  readonly freed: boolean;
  /** Synchronous: complete when they return. */
  copyFromHost(source: ArrayBufferView, byteOffset: number): void;
  copyToHost(target: ArrayBufferView, byteOffset: number): void;
  copyFromDevice(source: NativeDeviceMemory, byteLength: number, sourceOffset: number, targetOffset: number): void;
  /** Staged through pinned memory; `stream` null means the device's copy stream. */
  copyFromHostAsync(source: ArrayBufferView, stream: NativeCudaStream | null): Promise<void>;
  copyToHostAsync(target: ArrayBufferView, stream: NativeCudaStream | null): Promise<void>;
  copyFromDeviceAsync(source: NativeDeviceMemory, byteLength: number, sourceOffset: number, targetOffset: number, stream: NativeCudaStream | null): Promise<void>;
  fill(byte: number): void;
  exportIpc(): NativeIpcHandle;
  /** The same as 96 bytes that `new DeviceMemory(packed)` imports (see cuda.ts exportPackedIpc). */
  exportIpcPacked(): Uint8Array;
  free(): void;
}

export interface NativeAllocatorStats {
  allocatedBytes: number;
  cachedBytes: number;
  allocations: number;
  reuses: number;
}

export interface NativeCuda {
  status(): NativeCudaStatus;
  deviceCount(): number;
  deviceInfo(device: number): NativeDeviceInfo;
  allocatorStats(device: number): NativeAllocatorStats;
  /** Frees cached device blocks (of every device when undefined) and cached pinned buffers. */
  emptyCache(device?: number): void;
  ipcStats(): IpcStats;
  setIdleIpcMappings(count: number): void;
  /** Exported blocks now free in this process's cache: their ids (one per free spell) and handles. */
  exportedFreeBlocks(device: number): Array<{ id: number; byteLength: number; handle: Uint8Array; idleMs: number }>;
  /** Closes mappings of memory the process `processId` exported (see cuda.ts); how many. */
  closeMappingsOfExporter(processId: number): number;
  /** Gives the blocks with these ids back to the driver if they are still free; the bytes freed. */
  freeExportedBlocks(device: number, ids: number[]): number;
  /** Closes idle mappings of these handles; returns the handles of mappings still in use. */
  closeIdleIpcMappings(handles: Uint8Array[]): Uint8Array[];
  pageLockStats(): PageLockStats;
  allocateHost(device: number, byteLength: number): Uint8Array;
  DeviceMemory: new (options: { device: number; byteLength: number } | { ipc: NativeIpcHandle } | { share: NativeDeviceMemory } | Uint8Array) => NativeDeviceMemory;
  Stream: new (device: number) => NativeCudaStream;
  /** Recorded on the stream when made. */
  CudaEvent: new (stream: NativeCudaStream, timing: boolean) => NativeCudaEvent;
}

export interface NativeNcclStatus {
  available: boolean;
  reason?: string;
  /** libnccl.so.2, or $TRELLIS_NCCL_LIBRARY. */
  libraryPath: string;
  /** ncclGetVersion, e.g. 22809 for 2.28.9. */
  version?: number;
}

/** NCCL enum values (nccl.h). */
export type NativeNcclDataType = number;
export type NativeNcclRedOp = number;

export interface NativeNcclCommunicator {
  readonly rank: number;
  readonly size: number;
  readonly device: number;
  /** Resolves when every rank has joined (ncclCommInitRank). */
  ready(): Promise<void>;
  allreduce(send: NativeDeviceMemory, recv: NativeDeviceMemory, count: number, dtype: NativeNcclDataType, op: NativeNcclRedOp): Promise<void>;
  allgather(send: NativeDeviceMemory, recv: NativeDeviceMemory, sendCount: number, dtype: NativeNcclDataType): Promise<void>;
  reducescatter(send: NativeDeviceMemory, recv: NativeDeviceMemory, recvCount: number, dtype: NativeNcclDataType, op: NativeNcclRedOp): Promise<void>;
  broadcast(send: NativeDeviceMemory, recv: NativeDeviceMemory, count: number, dtype: NativeNcclDataType, root: number): Promise<void>;
  send(buffer: NativeDeviceMemory, count: number, dtype: NativeNcclDataType, peer: number): Promise<void>;
  recv(buffer: NativeDeviceMemory, count: number, dtype: NativeNcclDataType, peer: number): Promise<void>;
  groupStart(): void;
  groupEnd(): Promise<void>;
  abort(reason?: string): void;
  /** ncclCommDestroy after everything queued. */
  destroy(): Promise<void>;
}

export interface NativeNccl {
  status(): NativeNcclStatus;
  uniqueId(): Uint8Array;
  Communicator: new (options: { rank: number; size: number; uniqueId: Uint8Array; device: number; timeoutMs?: number }) => NativeNcclCommunicator;
}

/** One end of a channel: the writer (reader -1) or reader number N. */
export interface NativeChannel {
  /** Writes if there is room within spinMicros of spinning plus waitMillis asleep (blocking). */
  tryWrite(bytes: Uint8Array, spinMicros?: number, waitMillis?: number): boolean;
  /** Waits for room off the JS thread, then writes the message, or the messages in order. */
  writeAsync(bytes: Uint8Array | Uint8Array[], timeoutMs?: number): Promise<void>;
  /** The next message (a copy) if one arrives within spinMicros + waitMillis (blocking), else null. */
  tryRead(spinMicros?: number, waitMillis?: number): Uint8Array | null;
  /**
   * As tryRead, but a message that fits `inbox` is copied into it and its length returned (no new
   * buffer per message); a larger one comes back as a copy of its own.
   */
  tryReadInto(inbox: Uint8Array, spinMicros: number, waitMillis: number): number | Uint8Array | null;
  /** A reader: it is done with every message up to the `count`th it read (what it holds of them). */
  finish(count: number): void;
  /** The writer: how many messages every reader has finished with. */
  readonly finished: number;
  readAsync(timeoutMs?: number): Promise<Uint8Array>;
  /** Closes the channel for every end: waiters wake with ERR_CHANNEL_CLOSED. */
  close(): void;
  /** Unmaps this end. */
  release(): void;
  readonly written: number;
  readonly read: number;
  readonly closed: boolean;
}

export interface NativeChannelClass {
  new (name: string, reader: number): NativeChannel;
  create(name: string, slots: number, readers: number, slotBytes: number): void;
  destroy(name: string): void;
}

/**
 * One driver-worker connection's shared memory (native/channel/connection_ring.cc): a byte ring
 * each way, the creator writing the first. Units are written whole or not at all.
 */
export interface NativeConnectionRing {
  /** 0: written; 1: written, and the reader sleeps (ring its socket); 2: no room. */
  write(bytes: Uint8Array): 0 | 1 | 2;
  /** Every byte that arrived, or undefined when none did. */
  take(): Buffer | undefined;
  /**
   * The reader's marks, set by the event loop around its poll (native/loop); here for tests.
   * markSleeping() is false when bytes arrived meanwhile (then the reader stays awake).
   */
  markSleeping(): boolean;
  markAwake(): void;
  /** The creator's descriptor for the peer (-1 once closed, and always at the peer). */
  readonly fd: number;
  closeFd(): void;
  /** Unmaps this end (once the event loop no longer watches it). */
  close(): void;
  readonly capacity: number;
}

export interface NativeConnectionRingClass {
  create(capacity: number): NativeConnectionRing;
  open(fd: number): NativeConnectionRing;
}

/**
 * f32 row-major CPU kernels for the transformer in lib/llm (native/kernels/cpu_kernels.cc), with
 * linear's weights in f32, bf16 or f16. They
 * run synchronously on the calling thread and check every argument (types, lengths against the
 * dimensions, overlap of out with the inputs), throwing InvalidArgumentError; lib/llm/kernels.ts
 * is their typed face.
 */
export interface NativeKernels {
  /** out[m, n] = x[m, k] · weight[n, k]ᵀ + bias[n]; weight is [out features, in features]; bias may be null. */
  linear(out: Float32Array, x: Float32Array, weight: Float32Array | Uint16Array | Int8Array, bias: Float32Array | null, m: number, k: number, n: number, weightDtype?: 'f32' | 'bf16' | 'f16' | 'int8', scales?: Float32Array): void;
  /** out[0, count) = the first count 16-bit floats of bits, widened to f32 (exact). */
  widen(out: Float32Array, bits: Uint16Array, dtype: 'bf16' | 'f16', count: number): void;
  /** Per row of `cols`: (x - mean) / sqrt(var + eps) · gamma + beta; out may be x itself. */
  layerNorm(out: Float32Array, x: Float32Array, gamma: Float32Array, beta: Float32Array, rows: number, cols: number, eps: number): void;
  /** In place, GPT-2's tanh approximation of GELU, over the whole array. */
  gelu(x: Float32Array): void;
  /** Per row of `cols`: x / sqrt(mean(x²) + eps) · gamma (Llama's RMSNorm); out may be x itself. */
  rmsNorm(out: Float32Array, x: Float32Array, gamma: Float32Array, rows: number, cols: number, eps: number): void;
  /** out[i] = gate[i] / (1 + e^-gate[i]) · up[i] over arrays of one length; out may be gate itself. */
  siluMultiply(out: Float32Array, gate: Float32Array, up: Float32Array): void;
  /**
   * In place, rotary position embedding of x [rows, heads, headDim] (Hugging Face's rotate_half
   * pairing): element i of each head turns with element i + headDim / 2 by positions[row] · inverseFrequencies[i].
   */
  rotary(x: Float32Array, positions: Int32Array, inverseFrequencies: Float32Array, rows: number, heads: number, headDim: number): void;
  /**
   * Causal self-attention of one sequence: q and out [queries, heads, headDim], keys and values
   * [>= past + queries, kvHeads, headDim] (kvHeads defaults to heads; query head h reads kv head
   * h / (heads / kvHeads)); query i attends to positions 0..past + i.
   */
  attention(
    out: Float32Array,
    q: Float32Array,
    keys: Float32Array | Uint16Array,
    values: Float32Array | Uint16Array,
    queries: number,
    past: number,
    heads: number,
    headDim: number,
    kvHeads?: number,
    /** Attend only to the last `window` positions, itself included (0 or absent: all). */
    window?: number,
    /** A 16-bit cache: keys and values are Uint16Arrays of bf16 or f16 bits. */
    kvDtype?: 'f32' | 'bf16' | 'f16',
  ): void;
  /** The threads this process's kernels use, the caller's included (1: none besides it). */
  setThreads(threads: number): void;
  threads(): number;
  /** out[0, count) = the first count floats of x rounded (to nearest even) to bf16 or f16 bits. */
  narrow(out: Uint16Array, x: Float32Array, dtype: 'bf16' | 'f16', count: number): void;
}

/**
 * A decoder layer's operations on one backend (native/kernels/device_kernels.h): 'cuda' queues
 * them on a stream of the device (kernels of native/kernels/cuda, cuBLAS for the matrices);
 * 'cpu' runs the CPU kernels at once over host memory. Addresses are bigints (null: an operand
 * left out); lib/llm/device-kernels.ts checks every extent before a call. Element types: 0 f32,
 * 1 bf16, 2 f16.
 */
/** Where a step's rows stand (device_kernels.h StepLayout): addresses of its arrays, and their lengths. */
export interface NativeStepLayout {
  rowSequence: bigint;
  rowPosition: bigint;
  cacheBlocks: bigint;
  cacheTable: bigint;
  tiles: bigint | null;
  singleRows: bigint | null;
  rows: number;
  sequences: number;
  tileCount: number;
  singleCount: number;
}

export interface NativeDeviceKernels {
  linear(out: bigint, x: bigint, weight: bigint, weightType: number, bias: bigint | null, rows: number, depth: number, columns: number): void;
  linearInt8(out: bigint, x: bigint, weight: bigint, scales: bigint, bias: bigint | null, rows: number, depth: number, columns: number): void;
  addRows(out: bigint, residual: bigint | null, bias: bigint | null, rows: number, columns: number): void;
  rmsNorm(out: bigint, x: bigint, gamma: bigint, rows: number, columns: number, epsilon: number): void;
  layerNorm(out: bigint, x: bigint, gamma: bigint, beta: bigint, rows: number, columns: number, epsilon: number): void;
  siluMultiply(out: bigint, gate: bigint, up: bigint, count: number): void;
  gelu(x: bigint, count: number): void;
  prepareAttention(
    queries: bigint, qkv: bigint, layout: NativeStepLayout, heads: number, kvHeads: number, headSize: number, cacheType: number, layer: number,
    queryNorm: bigint | null, keyNorm: bigint | null, epsilon: number, inverseFrequencies: bigint | null,
  ): void;
  attention(out: bigint, queries: bigint, layout: NativeStepLayout, heads: number, kvHeads: number, headSize: number, cacheType: number, layer: number, window: number): void;
  gatherRows(out: bigint, x: bigint, rows: bigint, count: number, width: number): void;
  scatterAddRows(out: bigint, delta: bigint, rows: bigint, weights: bigint | null, count: number, width: number): void;
  zero(x: bigint, count: number): void;
  routeExperts(weights: bigint, logits: bigint, rows: number, experts: number, topK: number, normalize: boolean): void;
  addWeightedRows(out: bigint, result: bigint, weights: bigint, expert: number, experts: number, rows: number, width: number): void;
  /** All of source's bytes to target; returns once copied. */
  upload(target: bigint, source: ArrayBufferView | ArrayBuffer): void;
  /** Fills all of target's bytes from source; returns once copied. */
  download(target: ArrayBufferView | ArrayBuffer, source: bigint): void;
  copy(target: bigint, source: bigint, bytes: number): void;
  synchronize(): void;
  close(): void;
}

/** A decoded image: 8-bit channels, interleaved, row-major. */
export interface NativeDecodedImage {
  width: number;
  height: number;
  channels: number;
  pixels: Uint8Array;
}

/** PNG's IHDR fields that shape its image data. */
export interface NativePngHeader {
  width: number;
  height: number;
  bitDepth: number;
  colorType: number;
  interlace: number;
}

/**
 * Image decoding (native/image): JPEG whole, PNG after lib/image has parsed its chunks and
 * inflated its data; bilinear resizing. Synchronous: a read task's worker has nothing else to do.
 * Channels are 1 (gray), 3 (RGB) or 4 (RGBA). Failures are ImageError (ERR_IMAGE_*).
 */
export interface NativeImage {
  probeJpeg(bytes: Uint8Array): { width: number; height: number; channels: number };
  /**
   * maxPixels 0: no limit. With outHeight and outWidth, the pixels come resized to them (bilinear);
   * with draft too, decoded first at 1/2, 1/4 or 1/8 scale where that stays at least that size.
   */
  decodeJpeg(bytes: Uint8Array, channels: number, maxPixels: number, outHeight?: number, outWidth?: number, draft?: boolean): NativeDecodedImage;
  /** The bytes the inflated image data holds for this header, filter bytes included. */
  pngDataSize(header: NativePngHeader): number;
  reconstructPng(inflated: Uint8Array, header: NativePngHeader, palette: Uint8Array | null, transparency: Uint8Array | null, channels: number): NativeDecodedImage;
  resize(pixels: Uint8Array, height: number, width: number, channels: number, outHeight: number, outWidth: number): Uint8Array;
  /** A baseline JFIF file; channels 1, 3 or 4 (alpha dropped); quality 1-100; 4:2:0 chroma when subsample. */
  encodeJpeg(pixels: Uint8Array, height: number, width: number, channels: number, quality: number, subsample: boolean): Uint8Array;
  /** PNG image data before deflating: each row prefixed with its filter type. */
  filterPng(pixels: Uint8Array, height: number, width: number, channels: number): Uint8Array;
}

export interface NativeAddon {
  setErrorFactory(factory: (code: string, message: string, details: Record<string, unknown>) => Error): void;
  NativeObjectStore: new (options: NativeStoreOptions) => NativeObjectStore;
  defaultStoreCapacity(): number;
  NativeShmCommunicator: NativeShmCommunicatorClass;
  NativeChannel: NativeChannelClass;
  ConnectionRing: NativeConnectionRingClass;
  cuda: NativeCuda;
  nccl: NativeNccl;
  busyPoll: NativeBusyPoll;
  kernels: NativeKernels;
  image: NativeImage;
  DeviceKernels: new (options: { backend: 'cpu' | 'cuda'; device?: number }) => NativeDeviceKernels;
  deviceKernels: {
    /** The address of a host buffer's first byte (the 'cpu' backend's memory). */
    hostAddress(buffer: ArrayBuffer | ArrayBufferView): bigint;
    /** Bytes of the CUDA kernels' fat binary in this build. */
    imageBytes(): number;
    /** Positions of one block of a key/value cache (device_kernels.h kCacheBlockPositions). */
    cacheBlockPositions: number;
  };
}

/** Spinning before the event loop sleeps (native/loop/busy_poll.cc). */
export interface NativeBusyPoll {
  /** The longest spin after an arm(), in microseconds; 0 turns it off. */
  configure(capMicros: number): void;
  arm(): void;
  /** A message arrived: the outstanding arm's wait is learned. */
  answered(): void;
  /** Learns one wait of `waitMicros` as answered() would (tests feed the policy exact waits). */
  learn(waitMicros: number): void;
  /** spinMicros: the spin that recent answers call for (0: later than the cap); hits: answers that found the loop awake. */
  stats(): { capMicros: number; spinMicros: number; spins: number; hits: number; spunMicros: number };
  /** The loop watches this ring (read by this process) before it sleeps and while it spins. */
  watchRing(ring: NativeConnectionRing, id: number): void;
  unwatchRing(id: number): void;
  /** Called after the loop's poll with the ids of watched rings that have bytes. */
  onRingsReadable(callback: (ids: number[]) => void): void;
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
