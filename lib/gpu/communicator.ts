/**
 * The collective-communication interface shared by the NCCL communicator (GPU tensors) and the CPU
 * communicator (shared memory between worker processes). Same operations, same semantics: every
 * rank calls the same collectives in the same order; point-to-point calls inside
 * groupStart()/groupEnd() are issued together, so that matching sends and receives cannot deadlock.
 */
import type { Device, Tensor } from './tensor.js';

export type ReduceOp = 'sum' | 'prod' | 'min' | 'max' | 'avg';

export interface Communicator {
  readonly rank: number;
  readonly size: number;
  readonly backend: 'nccl' | 'cpu';
  /** Where the tensors it moves must live: host memory for the CPU communicator, the rank's GPU for NCCL. */
  readonly tensorDevice: Device;
  /** In place: every rank's `tensor` becomes the reduction of all ranks' tensors. */
  allreduce(tensor: Tensor, op?: ReduceOp): Promise<void>;
  /** `output` (size × input elements) receives every rank's `input`, in rank order. */
  allgather(input: Tensor, output: Tensor): Promise<void>;
  /** `output` (input elements / size) receives this rank's slice of the reduction. */
  reducescatter(input: Tensor, output: Tensor, op?: ReduceOp): Promise<void>;
  /** In place: every rank's `tensor` becomes `root`'s. */
  broadcast(tensor: Tensor, root: number): Promise<void>;
  send(tensor: Tensor, peer: number): Promise<void>;
  recv(tensor: Tensor, peer: number): Promise<void>;
  /** Point-to-point calls between groupStart() and groupEnd() complete together at groupEnd(). */
  groupStart(): void;
  groupEnd(): Promise<void>;
  barrier(): Promise<void>;
  /** Fails every pending and later operation on every rank; for dead or stuck peers. */
  abort(reason?: string): void;
  destroy(): void;
  [Symbol.dispose](): void;
}
