/**
 * NCCL through the native table: libnccl.so.2 (or $TRELLIS_NCCL_LIBRARY) is opened with dlopen on
 * first use. `nccl.available` / `nccl.reason` say whether it can be used here.
 *
 * NcclCommunicator implements the Communicator interface on CUDA tensors. Each operation is issued
 * in order on the communicator's own thread and stream, and its promise resolves when the device
 * has finished it. An operation that does not finish within the timeout (default 60 s), or an
 * asynchronous NCCL error (a dead peer), aborts the communicator: that operation and every pending
 * and later one rejects with an NcclError ('ERR_NCCL_TIMEOUT', 'ERR_NCCL', 'ERR_NCCL_ABORTED').
 */
import { InvalidArgumentError, NcclError } from '../errors.js';
import { native, type NativeNcclCommunicator, type NativeNcclStatus, type NativeDeviceMemory } from '../native.js';
import { registerNcclBackend } from './collective.js';
import type { Communicator, ReduceOp } from './communicator.js';
import { cuda, nativeMemory } from './cuda.js';
import type { DeviceMemory } from './cuda-types.js';
import type { DType } from './dtype.js';
import type { Device, Tensor } from './tensor.js';

/** ncclDataType_t of each tensor dtype (nccl.h). */
export const NCCL_DATA_TYPES: Readonly<Record<DType, number>> = { i8: 0, u8: 1, i32: 2, i64: 4, f16: 6, f32: 7, bf16: 9 };
/** ncclRedOp_t of each reduction (nccl.h). */
export const NCCL_REDUCE_OPS: Readonly<Record<ReduceOp, number>> = { sum: 0, prod: 1, max: 2, min: 3, avg: 4 };

let loaded: NativeNcclStatus | undefined;

function status(): NativeNcclStatus {
  loaded ??= native.nccl.status();
  return loaded;
}

function requireNccl(call: string): void {
  const { available, reason } = status();
  if (!available) throw new NcclError('ERR_NCCL_UNAVAILABLE', `${call}: NCCL is not available: ${reason}`, { call });
}

/** "2.28.9" from ncclGetVersion's 22809 (NCCL >= 2.9 codes; older ones are major*1000 + minor*100 + patch). */
function versionString(code: number): string {
  const [major, rest] = code >= 10000 ? [Math.floor(code / 10000), code % 10000] : [Math.floor(code / 1000), code % 1000];
  return `${major}.${Math.floor(rest / 100)}.${rest % 100}`;
}

export interface NcclApi {
  readonly available: boolean;
  readonly reason?: string;
  readonly libraryPath: string;
  /** ncclGetVersion's code, e.g. 22809. */
  readonly version?: number;
  /** e.g. "2.28.9". */
  readonly versionString?: string;
  /** A fresh ncclUniqueId (128 bytes) for rank 0 to share with the other ranks. */
  uniqueId(): Uint8Array;
}

export const nccl: NcclApi = {
  get available() {
    return status().available;
  },
  get reason() {
    return status().reason;
  },
  get libraryPath() {
    return status().libraryPath;
  },
  get version() {
    return status().version;
  },
  get versionString() {
    const { version } = status();
    return version === undefined ? undefined : versionString(version);
  },
  uniqueId(): Uint8Array {
    requireNccl('uniqueId');
    return native.nccl.uniqueId();
  },
};

export interface NcclCommunicatorOptions {
  rank: number;
  size: number;
  /** nccl.uniqueId() from one rank, the same bytes on every rank. */
  uniqueId: Uint8Array;
  /** CUDA device of this rank (default 0). */
  device?: number;
  /** Milliseconds any operation (init included) may take before the communicator aborts (default 60 s). */
  timeout?: number;
}

function memoryOf(tensor: Tensor, what: string): NativeDeviceMemory {
  if (!tensor.isCuda) {
    throw new InvalidArgumentError(`the NCCL communicator's ${what} takes CUDA tensors; this one is on ${tensor.device}`, 'ERR_TENSOR_DEVICE');
  }
  return nativeMemory(tensor.memory);
}

function sameDType(a: Tensor, b: Tensor, what: string): void {
  if (a.dtype !== b.dtype) throw new InvalidArgumentError(`${what}: input is ${a.dtype}, output is ${b.dtype}`, 'ERR_INVALID_DTYPE');
}

export class NcclCommunicator implements Communicator {
  readonly rank: number;
  readonly size: number;
  readonly device: number;
  readonly backend = 'nccl' as const;
  readonly tensorDevice: Device;
  readonly #native: NativeNcclCommunicator;
  #groupDepth = 0;
  #barrier: DeviceMemory | undefined;
  #destroyed: Promise<void> | undefined;

  private constructor(handle: NativeNcclCommunicator) {
    this.#native = handle;
    this.rank = handle.rank;
    this.size = handle.size;
    this.device = handle.device;
    this.tensorDevice = `cuda:${handle.device}`;
  }

  /** Joins the group; resolves once every rank has called create() with the same unique id. */
  static async create(options: NcclCommunicatorOptions): Promise<NcclCommunicator> {
    requireNccl('NcclCommunicator.create');
    const { rank, size, uniqueId, device = 0, timeout = 60_000 } = options;
    if (!Number.isInteger(size) || size < 1 || !Number.isInteger(rank) || rank < 0 || rank >= size) {
      throw new InvalidArgumentError(`rank ${rank} is not in a group of ${size}`);
    }
    if (!(uniqueId instanceof Uint8Array) || uniqueId.byteLength !== 128) throw new InvalidArgumentError('uniqueId must be the 128 bytes of nccl.uniqueId()');
    if (!Number.isFinite(timeout) || timeout < 0) throw new InvalidArgumentError(`timeout must be a non-negative number of milliseconds, got ${timeout}`);
    const handle = new native.nccl.Communicator({ rank, size, uniqueId, device, timeoutMs: Math.round(timeout) });
    try {
      await handle.ready();
    } catch (error) {
      handle.abort('ncclCommInitRank failed');
      throw error;
    }
    return new NcclCommunicator(handle);
  }

  allreduce(tensor: Tensor, op: ReduceOp = 'sum'): Promise<void> {
    const memory = memoryOf(tensor, 'allreduce');
    return this.#issued(this.#native.allreduce(memory, memory, tensor.numel, NCCL_DATA_TYPES[tensor.dtype], NCCL_REDUCE_OPS[op]));
  }

  allgather(input: Tensor, output: Tensor): Promise<void> {
    sameDType(input, output, 'allgather');
    if (output.numel !== input.numel * this.size) {
      throw new InvalidArgumentError(`allgather: output holds ${output.numel} elements; ${this.size} ranks × ${input.numel} are needed`, 'ERR_INVALID_SHAPE');
    }
    return this.#issued(this.#native.allgather(memoryOf(input, 'allgather'), memoryOf(output, 'allgather'), input.numel, NCCL_DATA_TYPES[input.dtype]));
  }

  reducescatter(input: Tensor, output: Tensor, op: ReduceOp = 'sum'): Promise<void> {
    sameDType(input, output, 'reducescatter');
    if (input.numel !== output.numel * this.size) {
      throw new InvalidArgumentError(`reducescatter: input holds ${input.numel} elements; ${this.size} ranks × ${output.numel} are needed`, 'ERR_INVALID_SHAPE');
    }
    return this.#issued(
      this.#native.reducescatter(memoryOf(input, 'reducescatter'), memoryOf(output, 'reducescatter'), output.numel, NCCL_DATA_TYPES[input.dtype], NCCL_REDUCE_OPS[op]),
    );
  }

  broadcast(tensor: Tensor, root: number): Promise<void> {
    const memory = memoryOf(tensor, 'broadcast');
    return this.#issued(this.#native.broadcast(memory, memory, tensor.numel, NCCL_DATA_TYPES[tensor.dtype], root));
  }

  send(tensor: Tensor, peer: number): Promise<void> {
    return this.#issued(this.#native.send(memoryOf(tensor, 'send'), tensor.numel, NCCL_DATA_TYPES[tensor.dtype], peer));
  }

  recv(tensor: Tensor, peer: number): Promise<void> {
    return this.#issued(this.#native.recv(memoryOf(tensor, 'recv'), tensor.numel, NCCL_DATA_TYPES[tensor.dtype], peer));
  }

  groupStart(): void {
    this.#native.groupStart();
    this.#groupDepth += 1;
  }

  groupEnd(): Promise<void> {
    const done = this.#native.groupEnd();
    this.#groupDepth -= 1;
    return done;
  }

  /** Every rank waits until all have reached it (an allreduce of one element). */
  barrier(): Promise<void> {
    this.#barrier ??= cuda.allocate(this.device, 4);
    const memory = nativeMemory(this.#barrier);
    return this.#issued(this.#native.allreduce(memory, memory, 1, NCCL_DATA_TYPES.i32, NCCL_REDUCE_OPS.sum));
  }

  abort(reason?: string): void {
    this.#native.abort(reason);
  }

  /** Destroys the communicator once what is queued has been issued; close() awaits it. */
  destroy(): void {
    if (this.#destroyed) return;
    this.#destroyed = this.#native.destroy();
    this.#destroyed.catch(() => {}); // close() reports it; destroy() has no one to tell
    this.#barrier?.free();
  }

  close(): Promise<void> {
    this.destroy();
    return this.#destroyed!;
  }

  [Symbol.dispose](): void {
    this.destroy();
  }

  /**
   * Inside a group, a failure also rejects groupEnd(), which is where callers look: the
   * operation's own promise is marked handled so that `void comm.send(...)` cannot crash the
   * process with an unhandled rejection. It still rejects for whoever awaits it.
   */
  #issued(done: Promise<void>): Promise<void> {
    if (this.#groupDepth > 0) done.catch(() => {});
    return done;
  }
}

registerNcclBackend(
  ({ rank, size, uniqueId, timeout }) => NcclCommunicator.create({ rank, size, uniqueId, timeout }),
  () => nccl.uniqueId(),
);
