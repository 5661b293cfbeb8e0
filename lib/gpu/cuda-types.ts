/**
 * What the CUDA and NCCL layers offer the rest of lib/gpu. Implemented by cuda.ts and nccl.ts over
 * the native driver-API and NCCL tables (loaded with dlopen at run time).
 */

export interface DeviceInfo {
  index: number;
  name: string;
  totalMemory: number;
  freeMemory: number;
  computeCapability: [major: number, minor: number];
  uuid: string;
}

/** A CUDA IPC export: enough for another process on the node to map the same device memory. */
export interface IpcHandle {
  /** cuIpcGetMemHandle's 64 bytes, for the base allocation holding the buffer. */
  handle: Uint8Array;
  /** Offset of the buffer within that allocation. */
  offset: number;
  byteLength: number;
  device: number;
  /** Device UUID, so an importer can find the same physical GPU under its own numbering. */
  deviceUuid: string;
  /**
   * The exporting process's pid: once the cluster sees it gone, importers close their mappings
   * of its memory rather than keep them idle. Optional on import.
   */
  processId?: number;
}

/** Device memory owned by this process (from the caching allocator) or mapped from another (IPC). */
export interface DeviceMemory {
  readonly device: number;
  readonly byteLength: number;
  /**
   * The device pointer (CUdeviceptr), for other CUDA code in this process (a model runtime, kernels
   * of your own) to read or write this memory in place.
   */
  readonly address: bigint;
  readonly imported: boolean;
  copyFromHost(source: ArrayBufferView, byteOffset?: number): void;
  copyToHost(target: ArrayBufferView, byteOffset?: number): void;
  copyFromDevice(source: DeviceMemory, byteLength?: number, sourceOffset?: number, targetOffset?: number): void;
  /** Asynchronous copies on `stream` (default: the device's copy stream); resolve when complete. */
  copyFromHostAsync(source: ArrayBufferView, stream?: Stream): Promise<void>;
  copyToHostAsync(target: ArrayBufferView, stream?: Stream): Promise<void>;
  /** copyFromDevice on `stream`, device to device (never through the host). */
  copyFromDeviceAsync(source: DeviceMemory, byteLength?: number, sourceOffset?: number, targetOffset?: number, stream?: Stream): Promise<void>;
  fill(byte: number): void;
  exportIpc(): IpcHandle;
  /**
   * Another holder of the same memory: it goes back to the allocator (or is unmapped) once every
   * share has been freed or collected. An actor that returns a buffer it keeps using returns a
   * tensor over a share of it (Tensor.share()), as the result frees its tensors with its last ref.
   */
  share(): DeviceMemory;
  /** Back to the caching allocator (or unmapped, for imports) once no other share holds it; idempotent. */
  free(): void;
  /** free(), for `using`. */
  [Symbol.dispose](): void;
}

export interface Stream {
  readonly device: number;
  /**
   * The CUstream, for other CUDA code in this process to queue work on, ordered with this stream's
   * copies and events. It lives on the device's primary context, which CUDA's runtime API uses too.
   * ERR_CUDA_FREED after destroy().
   */
  readonly address: bigint;
  /** Resolves when all work queued so far is done; never blocks the event loop. */
  synchronize(): Promise<void>;
  /** An event marking the work queued on this stream so far; `timing` for elapsedMs(). */
  record(options?: { timing?: boolean }): CudaEvent;
  /** Work queued on this stream from now on waits for `event` (on the GPU: the host goes on). */
  wait(event: CudaEvent): void;
  destroy(): void;
  /** destroy(), for `using`. */
  [Symbol.dispose](): void;
}

/** A point in a stream's work (stream.record()): to wait for on the host or from another stream. */
export interface CudaEvent {
  readonly device: number;
  /** Whether the work before it is done, without waiting. */
  done(): boolean;
  /** Resolves when the work before it is done; never blocks the event loop. */
  synchronize(): Promise<void>;
  /**
   * Milliseconds of GPU time from this event to `later`, both recorded with `{ timing: true }`
   * and both done (else ERR_CUDA_NOT_READY: await their synchronize() first).
   */
  elapsedMs(later: CudaEvent): number;
}

export interface CudaApi {
  readonly available: boolean;
  /** Why CUDA is not available (no libcuda.so.1, no device, init failure), when it is not. */
  readonly reason?: string;
  readonly driverVersion?: number;
  readonly libraryPath?: string;
  deviceCount(): number;
  devices(): DeviceInfo[];
  allocate(device: number, byteLength: number): DeviceMemory;
  importIpc(handle: IpcHandle): DeviceMemory;
  createStream(device: number): Stream;
  /** Allocator statistics per device: bytes held by live buffers, bytes cached for reuse. */
  allocatorStats(device: number): { allocatedBytes: number; cachedBytes: number; allocations: number; reuses: number };
  /**
   * Frees cached (unused) device memory and closes idle CUDA IPC mappings. Blocks this process
   * exported over IPC stay cached: another process may still map them.
   */
  emptyCache(device?: number): void;
  /**
   * CUDA IPC mappings of this process: in use (with live views), idle (kept open for the same
   * handle's next import), and the opens, reuses and closes so far with the time spent opening.
   */
  ipcStats(): IpcStats;
  /**
   * How many IPC mappings without views this process keeps open (default 64, or
   * TRELLIS_IPC_IDLE_MAPPINGS, which workers inherit); 0 closes each with its last view. Lowering
   * it closes the surplus now.
   */
  setIdleIpcMappings(count: number): void;
  /**
   * Page-locked host memory (portable: every device DMAs from and to it), for copies at full
   * speed. Returned to a cache when the array is collected.
   */
  allocateHost(byteLength: number): Uint8Array;
  /**
   * The object store's memory as copies to and from devices page-lock it: 64 MiB chunks, each
   * locked on the first copy that touches it and unlocked when the store is closed.
   */
  pageLockStats(): PageLockStats;
}

export interface PageLockStats {
  lockedBytes: number;
  chunksLocked: number;
  chunksRefused: number;
  lockMs: number;
}

export interface IpcStats {
  inUse: number;
  idle: number;
  opens: number;
  reuses: number;
  closes: number;
  openMicros: number;
}
