/**
 * CUDA through the native driver-API table: libcuda.so.1 (or $TRELLIS_CUDA_DRIVER) is opened with
 * dlopen on first use, never linked. Where it is absent or unusable, `cuda.available` is false,
 * `cuda.reason` says why, and every other member throws a CudaError with code
 * 'ERR_CUDA_UNAVAILABLE'.
 *
 * Synchronous copies and fill() are complete when they return; from or to the object store's
 * memory they page-lock the chunks they touch first (once per process), and so run by DMA.
 * Asynchronous copies are staged through pinned host memory and resolve when the device is done;
 * their promises are settled by a native completion thread, so they never block the event loop or
 * libuv's thread pool.
 */
import { CudaError, InvalidArgumentError } from '../errors.js';
import { native, type NativeCudaEvent, type NativeCudaStatus, type NativeCudaStream, type NativeDeviceMemory } from '../native.js';
import type { CudaApi, CudaEvent, DeviceInfo, DeviceMemory, IpcHandle, IpcStats, PageLockStats, Stream } from './cuda-types.js';

let loaded: NativeCudaStatus | undefined;
const CUDA_ERROR_OUT_OF_MEMORY = 2;

/** Loads the driver once (dlopen, cuInit) and says whether it is usable. */
function status(): NativeCudaStatus {
  loaded ??= native.cuda.status();
  return loaded;
}

/**
 * Closes this process's idle IPC mappings of `handles` and returns those it still uses. A process
 * that never loaded CUDA maps nothing, and asking does not load it (nor join it to an MPS server).
 */
export function closeIdleMappingsOf(handles: Uint8Array[]): Uint8Array[] {
  return loaded?.available === true && handles.length > 0 ? native.cuda.closeIdleIpcMappings(handles) : [];
}

/**
 * Closes this process's mappings of memory exported by the process `processId`, which is gone
 * (idle ones now, those in use with their last view). Does not load CUDA where it was not.
 */
export function closeMappingsOfExporter(processId: number): number {
  return loaded?.available === true ? native.cuda.closeMappingsOfExporter(processId) : 0;
}

/** Blocks this process exported over IPC and has since freed (none where CUDA is unavailable). */
export function exportedFreeBlocks(device: number): Array<{ id: number; byteLength: number; handle: Uint8Array; idleMs: number }> {
  return status().available ? native.cuda.exportedFreeBlocks(device) : [];
}

/** Gives back to the driver those of `ids` still free; the bytes freed (see reclaimIpcMemory). */
export function freeExportedBlocks(device: number, ids: number[]): number {
  requireCuda('freeExportedBlocks');
  return native.cuda.freeExportedBlocks(device, ids);
}

/**
 * What the allocator tells the reclaiming of exported blocks (ipc-reclaim.ts registers it; this
 * module cannot import it without a cycle): a device's first export, after which that device's
 * idle exported blocks are watched, and a wish to give them all back soon (an emptied cache, an
 * allocation out of memory).
 */
export interface ExportedBlockWatcher {
  exporting(device: number): void;
  releaseSoon(device?: number): void;
}

let watcher: ExportedBlockWatcher | undefined;
const exportingDevices = new Set<number>();

export function watchExportedBlocks(registered: ExportedBlockWatcher): void {
  watcher = registered;
  for (const device of exportingDevices) registered.exporting(device);
}

function exported(device: number): void {
  if (exportingDevices.has(device)) return;
  exportingDevices.add(device);
  watcher?.exporting(device);
}

function requireCuda(call: string): void {
  const { available, reason } = status();
  if (!available) throw new CudaError('ERR_CUDA_UNAVAILABLE', `${call}: CUDA is not available: ${reason}`, { call });
}

class CudaStream implements Stream {
  /** @internal */
  readonly native: NativeCudaStream;

  constructor(handle: NativeCudaStream) {
    this.native = handle;
  }

  get device(): number {
    return this.native.device;
  }

  get address(): bigint {
    return this.native.address;
  }

  synchronize(): Promise<void> {
    return this.native.synchronize();
  }

  record(options: { timing?: boolean } = {}): CudaEvent {
    return new RecordedEvent(new native.cuda.CudaEvent(this.native, options.timing === true));
  }

  wait(event: CudaEvent): void {
    this.native.wait(nativeEvent(event, 'wait'));
  }

  destroy(): void {
    this.native.destroy();
  }

  [Symbol.dispose](): void {
    this.destroy();
  }
}

class RecordedEvent implements CudaEvent {
  /** @internal */
  readonly native: NativeCudaEvent;

  constructor(handle: NativeCudaEvent) {
    this.native = handle;
  }

  get device(): number {
    return this.native.device;
  }

  done(): boolean {
    return this.native.done();
  }

  synchronize(): Promise<void> {
    return this.native.synchronize();
  }

  elapsedMs(later: CudaEvent): number {
    return this.native.elapsedMs(nativeEvent(later, 'elapsedMs'));
  }
}

function nativeEvent(event: CudaEvent, call: string): NativeCudaEvent {
  if (!(event instanceof RecordedEvent)) throw new InvalidArgumentError(`${call}() takes an event from stream.record()`);
  return event.native;
}

function nativeStream(stream: Stream | undefined): NativeCudaStream | null {
  if (stream === undefined) return null;
  if (!(stream instanceof CudaStream)) throw new InvalidArgumentError('stream must come from cuda.createStream()');
  return stream.native;
}

/**
 * What runs once memory is let go of (see whenReleased): freed or collected, by each of its
 * holders (the memory and its shares, see share()), the last one running it.
 */
interface Releases {
  run: (() => void) | undefined;
  holders: number;
}

/**
 * One holder's part in Releases, shared by the wrapper and the finalizer: whichever comes first
 * counts. Registered without an unregister token, which would make each registration several
 * times dearer (see HandleReleaser): every IPC-mapped argument registers one.
 */
interface ReleaseHold {
  releases: Releases;
  done: boolean;
}

const releasedByCollection = new FinalizationRegistry<ReleaseHold>(letGo);

function letGo(hold: ReleaseHold): void {
  if (hold.done) return;
  hold.done = true;
  const releases = hold.releases;
  if (--releases.holders > 0) return;
  const run = releases.run;
  releases.run = undefined;
  run?.();
}

class CudaDeviceMemory implements DeviceMemory {
  readonly #native: NativeDeviceMemory;
  #hold: ReleaseHold | undefined;

  constructor(handle: NativeDeviceMemory) {
    this.#native = handle;
  }

  /** @internal See whenReleased. */
  static whenReleased(memory: DeviceMemory, release: () => void): void {
    if (!(memory instanceof CudaDeviceMemory)) throw new InvalidArgumentError('device memory must come from cuda.allocate() or cuda.importIpc()');
    const hold = memory.#hold;
    if (hold) {
      const previous = hold.releases.run;
      hold.releases.run = previous ? () => (previous(), release()) : release;
      return;
    }
    memory.#holdFor({ run: release, holders: 1 });
  }

  /** Takes part in `releases` until freed or collected. */
  #holdFor(releases: Releases): void {
    this.#hold = { releases, done: false };
    // Tied to the native handle, which an operation in flight keeps alive, not to this wrapper.
    releasedByCollection.register(this.#native, this.#hold);
  }

  static unwrap(memory: DeviceMemory): NativeDeviceMemory {
    if (!(memory instanceof CudaDeviceMemory)) throw new InvalidArgumentError('device memory must come from cuda.allocate() or cuda.importIpc()');
    return memory.#native;
  }

  get device(): number {
    return this.#native.device;
  }

  get byteLength(): number {
    return this.#native.byteLength;
  }

  get address(): bigint {
    return this.#native.address;
  }

  get imported(): boolean {
    return this.#native.imported;
  }

  /** Writes all of `source` at `byteOffset` of this memory. */
  copyFromHost(source: ArrayBufferView, byteOffset = 0): void {
    this.#native.copyFromHost(source, byteOffset);
  }

  /** Fills all of `target` from `byteOffset` of this memory. */
  copyToHost(target: ArrayBufferView, byteOffset = 0): void {
    this.#native.copyToHost(target, byteOffset);
  }

  /** Copies `byteLength` bytes (default: the rest of `source` after `sourceOffset`). */
  copyFromDevice(source: DeviceMemory, byteLength?: number, sourceOffset = 0, targetOffset = 0): void {
    this.#native.copyFromDevice(CudaDeviceMemory.unwrap(source), byteLength ?? source.byteLength - sourceOffset, sourceOffset, targetOffset);
  }

  copyFromHostAsync(source: ArrayBufferView, stream?: Stream): Promise<void> {
    return this.#native.copyFromHostAsync(source, nativeStream(stream));
  }

  copyFromDeviceAsync(source: DeviceMemory, byteLength?: number, sourceOffset = 0, targetOffset = 0, stream?: Stream): Promise<void> {
    return this.#native.copyFromDeviceAsync(CudaDeviceMemory.unwrap(source), byteLength ?? source.byteLength - sourceOffset, sourceOffset, targetOffset, nativeStream(stream));
  }

  copyToHostAsync(target: ArrayBufferView, stream?: Stream): Promise<void> {
    return this.#native.copyToHostAsync(target, nativeStream(stream));
  }

  fill(byte: number): void {
    this.#native.fill(byte);
  }

  exportIpc(): IpcHandle {
    const handle = this.#native.exportIpc();
    exported(this.#native.device);
    return handle;
  }

  /**
   * Another holder of this memory, with a share of its own: the memory goes back once every share
   * has been freed or collected, and what is due then (a mapped tensor's borrow) waits for the last.
   */
  share(): DeviceMemory {
    const share = new CudaDeviceMemory(new native.cuda.DeviceMemory({ share: this.#native }));
    const hold = this.#hold;
    if (hold && !hold.done) {
      hold.releases.holders++;
      share.#holdFor(hold.releases);
    }
    return share;
  }

  free(): void {
    this.#native.free();
    if (this.#hold) letGo(this.#hold);
  }

  [Symbol.dispose](): void {
    this.free();
  }
}

/**
 * Runs `release` once, when `memory` is freed or its native handle is collected: what a mapping
 * of another process's tensor keeps alive there (a borrow of the object) goes with the mapping.
 */
export function whenReleased(memory: DeviceMemory, release: () => void): void {
  CudaDeviceMemory.whenReleased(memory, release);
}

/**
 * An export in its compact form, for tensor transport: 104 bytes (handle, offset, size, device
 * UUID, the exporter's pid) that importPackedIpc reads in one go. The IpcHandle object costs each import five
 * property reads and a string across the addon boundary, several microseconds of a reader's every
 * IPC argument.
 */
export function exportPackedIpc(memory: DeviceMemory): Uint8Array {
  const source = CudaDeviceMemory.unwrap(memory);
  const packed = source.exportIpcPacked();
  exported(source.device);
  return packed;
}

export function importPackedIpc(packed: Uint8Array): DeviceMemory {
  requireCuda('importIpc');
  return new CudaDeviceMemory(new native.cuda.DeviceMemory(packed));
}

/** The native handle behind DeviceMemory from this module (for the NCCL communicator). */
export function nativeMemory(memory: DeviceMemory): NativeDeviceMemory {
  return CudaDeviceMemory.unwrap(memory);
}

export const cuda: CudaApi = {
  get available() {
    return status().available;
  },
  get reason() {
    return status().reason;
  },
  get driverVersion() {
    return status().driverVersion;
  },
  get libraryPath() {
    return status().libraryPath;
  },

  deviceCount(): number {
    requireCuda('deviceCount');
    return native.cuda.deviceCount();
  },

  /**
   * Every visible device. Free memory is read in each device's primary context, so this retains
   * one on every visible device (as torch.cuda.mem_get_info does).
   */
  devices(): DeviceInfo[] {
    requireCuda('devices');
    return Array.from({ length: native.cuda.deviceCount() }, (_, index) => native.cuda.deviceInfo(index));
  },

  allocate(device: number, byteLength: number): DeviceMemory {
    requireCuda('allocate');
    try {
      return new CudaDeviceMemory(new native.cuda.DeviceMemory({ device, byteLength }));
    } catch (error) {
      // Blocks exported over IPC outlive emptying the cache (see reclaimIpcMemory): start giving
      // back those no process maps, so that a retry can find the memory.
      if (error instanceof CudaError && error.result === CUDA_ERROR_OUT_OF_MEMORY && exportingDevices.has(device)) watcher?.releaseSoon(device);
      throw error;
    }
  },

  importIpc(handle: IpcHandle): DeviceMemory {
    requireCuda('importIpc');
    return new CudaDeviceMemory(new native.cuda.DeviceMemory({ ipc: handle }));
  },

  createStream(device: number): Stream {
    requireCuda('createStream');
    return new CudaStream(new native.cuda.Stream(device));
  },

  allocatorStats(device: number) {
    requireCuda('allocatorStats');
    return native.cuda.allocatorStats(device);
  },

  emptyCache(device?: number): void {
    requireCuda('emptyCache');
    native.cuda.emptyCache(device);
    watcher?.releaseSoon(device);
  },

  ipcStats(): IpcStats {
    requireCuda('ipcStats');
    return native.cuda.ipcStats();
  },

  setIdleIpcMappings(count: number): void {
    requireCuda('setIdleIpcMappings');
    if (!Number.isSafeInteger(count) || count < 0) throw new InvalidArgumentError(`setIdleIpcMappings expects a count of 0 or more, got ${count}`);
    native.cuda.setIdleIpcMappings(count);
  },

  allocateHost(byteLength: number): Uint8Array {
    requireCuda('allocateHost');
    return native.cuda.allocateHost(0, byteLength);
  },

  pageLockStats(): PageLockStats {
    requireCuda('pageLockStats');
    return native.cuda.pageLockStats();
  },
};

/** CUDA IPC mappings in use in this process (each exported allocation is opened once). */
export function openIpcMappings(): number {
  requireCuda('openIpcMappings');
  return native.cuda.ipcStats().inUse;
}
