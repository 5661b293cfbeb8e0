/**
 * What the driver tells each actor of a compiled graph: its operations, in schedule order. Reads
 * and writes marked `ipc` carry CUDA tensors as IPC handles (see ipc.ts).
 */
import type { ReduceOp } from '../gpu/communicator.js';
import type { CollectiveKind } from './nodes.js';

/** Where a compute takes an argument from: a node's value, the input, or a constant. */
export type ArgSpec = { node: number } | { input: true } | { constant: Uint8Array };

export type Operation =
  | { op: 'read'; channel: string; reader: number; node: number; ipc?: boolean }
  | { op: 'attr'; node: number; input: number; index?: number; key?: string }
  | { op: 'compute'; node: number; method: string; args: ArgSpec[]; label: string }
  | { op: 'write'; channel: string; node: number; ipc?: boolean }
  | { op: 'collective'; node: number; kind: CollectiveKind; source: number; group: string; reduce: ReduceOp }
  | { op: 'exchange'; group: string; sends: Array<{ node: number; peer: number }>; recvs: Array<{ node: number; peer: number }> };

export interface ActorPlan {
  graphId: string;
  actorId: string;
  operations: Operation[];
  /** Id of the graph's InputNode: its value is execute()'s argument array. */
  inputNode: number;
  /** Read the next execution's inputs while this one computes. */
  overlap: boolean;
  /** Milliseconds a write may wait for room before the loop gives up on the graph. */
  writeTimeout: number;
}
