/**
 * The CPU communicator: NCCL's operations and semantics over a shared-memory segment between the
 * processes of one node. Collectives meet at barriers in the segment; point-to-point messages go
 * through per-pair mailboxes; waits spin briefly, then sleep on futexes, and fail (aborting the
 * group) when a peer dies or the timeout passes.
 */
import { InvalidArgumentError } from '../errors.js';
import { native, type NativeShmCommunicator } from '../native.js';
import { newObjectId } from '../store/object-id.js';
import type { Communicator, ReduceOp } from './communicator.js';
import type { Tensor } from './tensor.js';

/** Bytes each rank stages per step; larger tensors move in several steps. */
export const DEFAULT_SLOT_BYTES = 4 << 20;

export interface CpuCommunicatorOptions {
  /** Milliseconds an operation may wait for its peers before the group is aborted (default 60 s). */
  timeout?: number;
}

/** Creates the shared segment for a group of `size` ranks; the creator unlinks it when done. */
export function createCpuGroupSegment(size: number, slotBytes = DEFAULT_SLOT_BYTES): string {
  const name = `trellis-${process.pid}-comm-${newObjectId().slice(0, 12)}`;
  native.NativeShmCommunicator.createSegment(name, size, slotBytes);
  return name;
}

export function removeCpuGroupSegment(name: string): void {
  native.NativeShmCommunicator.unlinkSegment(name);
}

function cpuOnly(tensor: Tensor, what: string): ArrayBufferView {
  if (tensor.device !== 'cpu') {
    throw new InvalidArgumentError(`the CPU communicator's ${what} takes CPU tensors; this one is on ${tensor.device}`, 'ERR_TENSOR_DEVICE');
  }
  return tensor.data;
}

export class CpuCommunicator implements Communicator {
  readonly rank: number;
  readonly size: number;
  readonly backend = 'cpu' as const;
  readonly tensorDevice = 'cpu' as const;
  readonly #native: NativeShmCommunicator;
  #group: Array<[boolean, number, ArrayBufferView]> | undefined;
  #destroyed = false;

  constructor(segment: string, rank: number, size: number, options: CpuCommunicatorOptions = {}) {
    if (!Number.isInteger(rank) || !Number.isInteger(size) || rank < 0 || rank >= size) {
      throw new InvalidArgumentError(`rank ${rank} is not in a group of ${size}`);
    }
    this.rank = rank;
    this.size = size;
    this.#native = new native.NativeShmCommunicator(segment, rank, size, options.timeout ?? 60_000);
  }

  allreduce(tensor: Tensor, op: ReduceOp = 'sum'): Promise<void> {
    return this.#native.allreduce(cpuOnly(tensor, 'allreduce'), tensor.dtype, op);
  }

  allgather(input: Tensor, output: Tensor): Promise<void> {
    this.#sameDtype(input, output, 'allgather');
    return this.#native.allgather(cpuOnly(input, 'allgather'), cpuOnly(output, 'allgather'));
  }

  reducescatter(input: Tensor, output: Tensor, op: ReduceOp = 'sum'): Promise<void> {
    this.#sameDtype(input, output, 'reducescatter');
    return this.#native.reducescatter(cpuOnly(input, 'reducescatter'), cpuOnly(output, 'reducescatter'), input.dtype, op);
  }

  broadcast(tensor: Tensor, root: number): Promise<void> {
    return this.#native.broadcast(cpuOnly(tensor, 'broadcast'), root);
  }

  send(tensor: Tensor, peer: number): Promise<void> {
    return this.#p2p(true, tensor, peer);
  }

  recv(tensor: Tensor, peer: number): Promise<void> {
    return this.#p2p(false, tensor, peer);
  }

  groupStart(): void {
    if (this.#group) throw new InvalidArgumentError('groupStart() called twice without groupEnd()');
    this.#group = [];
  }

  groupEnd(): Promise<void> {
    const group = this.#group;
    if (!group) return Promise.reject(new InvalidArgumentError('groupEnd() without groupStart()'));
    this.#group = undefined;
    return this.#native.transfer(group);
  }

  barrier(): Promise<void> {
    return this.#native.barrier();
  }

  abort(reason?: string): void {
    this.#native.abort(reason);
  }

  destroy(): void {
    if (this.#destroyed) return;
    this.#destroyed = true;
    this.#native.destroy();
  }

  [Symbol.dispose](): void {
    this.destroy();
  }

  #p2p(send: boolean, tensor: Tensor, peer: number): Promise<void> {
    const entry: [boolean, number, ArrayBufferView] = [send, peer, cpuOnly(tensor, send ? 'send' : 'recv')];
    if (this.#group) {
      this.#group.push(entry);
      return Promise.resolve();
    }
    return this.#native.transfer([entry]);
  }

  #sameDtype(a: Tensor, b: Tensor, what: string): void {
    if (a.dtype !== b.dtype) throw new InvalidArgumentError(`${what} needs input and output of one dtype, got ${a.dtype} and ${b.dtype}`, 'ERR_INVALID_DTYPE');
  }
}
