/** Options of tasks, actors and their scheduling. */
import type { Resources } from './resources.js';

export interface PlacementGroupLike {
  readonly id: string;
}

export type SchedulingStrategy =
  | 'DEFAULT'
  | 'SPREAD'
  | { type: 'node'; nodeId: string; soft?: boolean }
  | { type: 'placement-group'; placementGroup: PlacementGroupLike; bundleIndex?: number };

export interface TaskOptions {
  numCpus?: number;
  numGpus?: number;
  memory?: number;
  resources?: Resources;
  /** Retries after the worker dies mid-task (default 3); with retryExceptions, after throws too. */
  maxRetries?: number;
  retryExceptions?: boolean;
  schedulingStrategy?: SchedulingStrategy;
  /** Name shown in errors and state(); default: the function's name. */
  name?: string;
}

/**
 * How tensors returned by an actor method reach their readers: 'store' copies them through host
 * shared memory; 'ipc' leaves CUDA tensors in the producer's GPU memory for readers on the node to
 * map; 'nccl' sends them over the communicator of a collective group both actors are in (the CPU
 * communicator for CPU tensors); 'auto' picks NCCL within a group, IPC for CUDA tensors on one node,
 * else the store. Tensors may sit anywhere in the result (plain objects, arrays, Maps, Sets): the
 * rest of it travels inline, up to 100 KiB (a larger rest sends the whole result through the store).
 */
export type TensorTransport = 'auto' | 'ipc' | 'nccl' | 'store';

export interface ActorCallOptions {
  tensorTransport?: TensorTransport;
}

export interface ActorOptions {
  /** Per-method options, e.g. { forward: { tensorTransport: 'nccl' } }. */
  methods?: Record<string, ActorCallOptions>;
  numCpus?: number;
  numGpus?: number;
  memory?: number;
  resources?: Resources;
  /** Registered name: getActor(name) finds the actor again. */
  name?: string;
  /** Async methods interleave up to this many at a time (default 1: strictly one after another). */
  maxConcurrency?: number;
  /** Restarts (constructor rerun) after the actor's process dies; -1 for unlimited. Default 0. */
  maxRestarts?: number;
  /** Retries of a call whose actor died mid-call, when the actor restarts. Default 0. */
  maxTaskRetries?: number;
  schedulingStrategy?: SchedulingStrategy;
}

export function requestOf(options: { numCpus?: number; numGpus?: number; memory?: number; resources?: Resources }, defaultCpus: number): Resources {
  return {
    ...(options.resources ?? {}),
    CPU: options.numCpus ?? defaultCpus,
    GPU: options.numGpus ?? 0,
    memory: options.memory ?? 0,
  };
}
