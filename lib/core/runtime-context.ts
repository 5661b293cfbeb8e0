/**
 * The runtime of this process: the driver's cluster after init(), or a worker's link to its
 * driver. The public API delegates to it.
 */
import { NotInitializedError } from '../errors.js';
import type { ObjectRef } from './object-ref.js';
import type { Waitable } from './object-ref-generator.js';
import type { ActorCallOptions, ActorOptions, TaskOptions } from './options.js';
import type { FunctionDescriptor } from './protocol.js';

export interface RuntimeContext {
  nodeId: string;
  workerId: string;
  taskId?: string;
  actorId?: string;
  gpuIds: number[];
  isDriver: boolean;
  /**
   * In a task or actor call: milliseconds spent getting its arguments before it ran (store reads,
   * CUDA IPC mappings, communicator receives, copies back onto the GPU).
   */
  argumentsMs?: number;
  /**
   * In a task or actor call: aborted when the call is cancelled (cancel() without force; its
   * caller already has TaskCancelledError). Check it, or hand it on (fetch, timers, streams), and
   * return early. Read it before the call's first await: where calls interleave (async actors),
   * getRuntimeContext() names the call running at that moment.
   */
  readonly signal?: AbortSignal;
}

export interface ActorLookup {
  actorId: string;
  descriptor: FunctionDescriptor;
  methods: string[];
}

/** A running call, as currentCall() gives it: opaque outside the worker runtime. */
export interface CallScope {
  readonly taskId?: string;
}

export interface Runtime {
  /** `streaming`: `fn` is a generator function; the ref is its result's, wrapped by ObjectRefGenerator. */
  submitTask(fn: FunctionDescriptor, args: unknown[], options: TaskOptions, streaming?: boolean): ObjectRef<unknown>;
  /** The new actor's id, and the creator's count on it (its first handle holds it). */
  createActor(cls: FunctionDescriptor, args: unknown[], options: ActorOptions, methods: string[]): { actorId: string; lifetime: ObjectRef<unknown> };
  submitActorTask(actorId: string, method: string, args: unknown[], options?: ActorCallOptions, streaming?: boolean): ObjectRef<unknown>;
  /**
   * A ref to return `id` (returnIdAt) of a call this process just submitted with numReturns: the
   * submission returns the first, and made the others' records, which this ref counts on.
   */
  returnRef(id: string): ObjectRef<unknown>;
  /**
   * The next item of streaming call `id` (see ObjectRefGenerator), a ref this process now holds;
   * undefined once the generator has returned and every item was taken. Rejects with the call's
   * error once the items before it were taken, or with GetTimeoutError after `timeout` ms.
   */
  nextStreamItem(id: string, timeout: number): Promise<ObjectRef<unknown> | undefined>;
  /** The caller wants no more of streaming call `id`: its generator stops, its untaken items go. */
  closeStream(id: string): void;
  /** Driver only: collective groups, so that tensors can move between their members by NCCL. */
  registerCollectiveGroup?(name: string, actorIds: readonly string[], backend: 'cpu' | 'nccl'): void;
  unregisterCollectiveGroup?(name: string): void;
  /**
   * Asks every other process of the cluster to close its idle CUDA IPC mappings of `handles`;
   * resolves to the handles some process still maps with live views.
   */
  closeIpcMappings(handles: Uint8Array[]): Promise<Uint8Array[]>;
  get(refs: ObjectRef<unknown>[], timeout: number): Promise<unknown[]>;
  /** The value of one ref: what a synchronous call loop waits on, so it has a path of its own. */
  getOne(ref: ObjectRef<unknown>, timeout: number): Promise<unknown>;
  /** `call`: the call the put belongs to (see currentCall); the running one if it runs alone. */
  put(value: unknown, call?: CallScope): ObjectRef<unknown>;
  /** Refs are ready once settled; generators once their next item is there to take, or none will come. */
  wait<R extends Waitable>(refs: readonly R[], numReturns: number, timeout: number): Promise<[R[], R[]]>;
  cancel(ref: { readonly id: string }, force: boolean): void;
  kill(actorId: string, noRestart: boolean): void;
  /**
   * Resolves once the actor's current process (if any) has exited, its GPU memory with it; at
   * once in a worker, which cannot see other processes exit.
   */
  whenActorProcessGone(actorId: string): Promise<void>;
  /**
   * Calls `onDeath` once, when the first of these actors dies for good (soon after the call if
   * one already has); the returned function stops watching. What compiled graphs use to fail
   * rather than wait on a dead actor, in the driver and in workers alike.
   */
  watchActors(actorIds: readonly string[], onDeath: (actorId: string, cause: string) => void): () => void;
  getActor(name: string): Promise<ActorLookup>;
  context(): RuntimeContext;
  /**
   * The driver's view of where things are, for schedulers of its own (the data layer's actor
   * pools): the nodes whose stores hold each object (none for inline values or unknown ids),
   * and the node an actor runs on.
   */
  objectNodes?(ids: readonly string[]): string[][];
  actorNode?(actorId: string): string | undefined;
  /** Whether a node is being taken out of scheduling (given back, or taken back for another job). */
  nodeDraining?(nodeId: string): boolean;
  /** Tasks of this name queued for resources (not yet on a worker), and how long the oldest has waited (ms). */
  pendingTasks?(name: string): { count: number; oldestMs: number };
  /**
   * Worker only: the running call, taken at its start (before it awaits: an actor running calls
   * concurrently starts others meanwhile). `put(value, call)` names the put from that call's
   * return id, as a lone call's puts are named anyway, so that a rerun of the call makes it again
   * under the same id. Undefined where the driver keeps no lineage for the call.
   */
  currentCall?(): CallScope | undefined;
  /**
   * Worker only: once the running task has replied, collect garbage if this many bytes or more
   * were read zero-copy since the last collection (their views pin them in the store till then).
   */
  collectGarbageAfter?(bytes: number): void;
}

let runtime: Runtime | undefined;

export function setRuntime(next: Runtime | undefined): void {
  runtime = next;
}

export function currentRuntime(): Runtime {
  if (!runtime) throw new NotInitializedError();
  return runtime;
}

export function hasRuntime(): boolean {
  return runtime !== undefined;
}
