/**
 * CUDA tensors on compiled-graph edges by CUDA IPC ('ipc' edges, and 'auto' ones whose actors all
 * have CUDA): the channel carries a 64-byte IPC handle plus dtype, shape and offset per tensor, not
 * the data; the reader maps the writer's device memory. The tensors may sit anywhere in the value:
 * the rest of it travels inline around them.
 *
 * Buffer lifetime. The writer holds each sent message's tensors (IpcLender) until every reader has
 * finished the execution that read it: until then their memory can neither be garbage-collected
 * back to the caching allocator nor handed to another tensor. Readers report that through the
 * channel (ChannelReader.finish: the count of messages they are done with, in order), so the
 * writer's hold is bounded by the ring's slots plus the executions in flight.
 *
 * The reader opens each exported allocation once (IpcImporter keeps one import per allocation, which
 * keeps the mapping open; the least recently used beyond `capacity` are closed) and gives the method
 * views of it, freed when the execution ends. So a method must not keep a received tensor past its
 * call: one that needs it later copies it (after the execution, the view's memory is freed and
 * using it fails). Likewise a method must not change a tensor it returned while readers may still
 * use it (return a fresh tensor each time, or keep a pool deeper than maxInflight).
 *
 * Tensors are complete when returned: CUDA work in this library is complete when its call returns
 * or its promise settles, so no event travels with the handle.
 */
import type { DeviceMemory, IpcHandle } from '../gpu/cuda-types.js';
import { cuda } from '../gpu/cuda.js';
import type { DType } from '../gpu/dtype.js';
import { Tensor } from '../gpu/tensor.js';
import { putTensors, takeTensors } from '../gpu/tensor-tree.js';

/** One tensor as it travels: dtype, shape, and where its memory is. */
export type IpcTensor = [dtype: DType, shape: number[], handle: IpcHandle];

/**
 * A message's value when it holds CUDA tensors: a Tensor, an array of them, or (`skeleton`) any
 * other value with CUDA tensors inside, TensorSlots in their places (see lib/gpu/tensor-tree.ts).
 */
export interface IpcPayload {
  tensors: IpcTensor[];
  array: boolean;
  skeleton?: unknown;
}

/** What of a value goes by IPC: its CUDA tensors, and the rest around them where there is a rest. */
export interface CudaTensorsFound {
  tensors: Tensor[];
  array: boolean;
  skeleton?: unknown;
}

/** The CUDA tensors of `value`, wherever they sit in it; undefined where it has none. */
export function cudaTensorsOf(value: unknown): CudaTensorsFound | undefined {
  if (value instanceof Tensor) return value.isCuda ? { tensors: [value], array: false } : undefined;
  if (Array.isArray(value) && value.length > 0 && value.every((item) => item instanceof Tensor && item.isCuda)) return { tensors: value as Tensor[], array: true };
  const tensors: Tensor[] = [];
  const skeleton = takeTensors(value, tensors, (tensor) => tensor.isCuda);
  return tensors.length > 0 ? { tensors, array: false, skeleton } : undefined;
}

/**
 * The payload for `tensors`, each exported. A tensor that is itself mapped from another process
 * (a method passing on what it received) cannot be exported again: it is copied to memory of this
 * process first, and the copy is what the writer holds.
 */
export function exportTensors(found: CudaTensorsFound): { payload: IpcPayload; held: Tensor[] } {
  const held = found.tensors.map((tensor) => (tensor.memory.imported ? tensor.clone() : tensor));
  const tensors = held.map((tensor): IpcTensor => [tensor.dtype, [...tensor.shape], tensor.memory.exportIpc()]);
  const payload: IpcPayload = { tensors, array: found.array };
  if (found.skeleton !== undefined) payload.skeleton = found.skeleton;
  return { payload, held };
}

/** Writer side: holds the tensors of each sent message until every reader is done with it. */
export class IpcLender {
  readonly #lent: Array<{ sequence: number; held: unknown[] }> = [];

  /** Message `sequence` (the count of messages written before it on this channel) carried `held`. */
  lend(sequence: number, held: unknown[]): void {
    this.#lent.push({ sequence, held });
  }

  /** Lets go of what every reader is done with: messages before `finished`. */
  settle(finished: number): void {
    let done = 0;
    while (done < this.#lent.length && this.#lent[done].sequence < finished) done++;
    if (done > 0) this.#lent.splice(0, done);
  }

  /** Messages whose tensors are still held. */
  get outstanding(): number {
    return this.#lent.length;
  }

  clear(): void {
    this.#lent.length = 0;
  }
}

/** Reader side: maps IPC payloads to tensors, each exported allocation opened once. */
export class IpcImporter {
  readonly #import: (handle: IpcHandle) => DeviceMemory;
  readonly #capacity: number;
  /** One import per allocation (keyed by handle and device), in least-recently-used order. */
  readonly #keepers = new Map<string, DeviceMemory>();

  constructor(importIpc: (handle: IpcHandle) => DeviceMemory = (handle) => cuda.importIpc(handle), capacity = 64) {
    this.#import = importIpc;
    this.#capacity = capacity;
  }

  /** Allocations held open. */
  get openAllocations(): number {
    return this.#keepers.size;
  }

  /** The value of `payload`: views of the writer's memory, also pushed to `views` (free them when done). */
  open(payload: IpcPayload, views: DeviceMemory[]): unknown {
    const tensors = payload.tensors.map(([dtype, shape, handle]) => {
      this.#keep(handle);
      const view = this.#import(handle);
      views.push(view);
      return Tensor.onDevice(view, dtype, shape);
    });
    if (payload.skeleton !== undefined) return putTensors(payload.skeleton, tensors);
    return payload.array ? tensors : tensors[0];
  }

  #keep(handle: IpcHandle): void {
    const key = `${Buffer.from(handle.handle).toString('hex')}:${handle.deviceUuid || handle.device}`;
    const keeper = this.#keepers.get(key);
    if (keeper) {
      // Most recently used last.
      this.#keepers.delete(key);
      this.#keepers.set(key, keeper);
      return;
    }
    this.#keepers.set(key, this.#import(handle));
    if (this.#keepers.size > this.#capacity) {
      const [oldest, memory] = this.#keepers.entries().next().value as [string, DeviceMemory];
      this.#keepers.delete(oldest);
      memory.free();
    }
  }

  close(): void {
    for (const memory of this.#keepers.values()) memory.free();
    this.#keepers.clear();
  }
}
