/** Options of tasks, actors and their scheduling. */
import { InvalidArgumentError } from '../errors.js';
import type { FunctionDescriptor } from './protocol.js';
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
  /** Environment variables of the worker it runs in (workers of its own; see WorkerRuntimeEnvironment). */
  runtimeEnv?: WorkerRuntimeEnvironment;
  /** For a generator function: see StreamingOptions. */
  generatorBackpressure?: number;
  /** See ReturnsOptions. */
  numReturns?: number;
}

/**
 * `numReturns: n` (n of 2 or more): the call returns an array of n values, and its caller gets an
 * array of n refs, one to each, at once: each its own object, stored, passed on, freed and lost
 * apart from the others (a task can then hand one part to one consumer and the rest to another,
 * without either reading the whole). A result that is not an array of n fails every ref with a
 * TaskError saying what came back. 1, the default, is a single ref to the whole result.
 */
export interface ReturnsOptions {
  numReturns?: number;
}

/** The most returns a call may have: each is an object the driver keeps a record of. */
const MOST_RETURNS = 10_000;

/** Checks numReturns, naming what is wrong; 1 where unset. */
export function numReturnsOf(value: unknown, where: string): number {
  if (value === undefined) return 1;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > MOST_RETURNS) {
    throw new InvalidArgumentError(`${where}: numReturns is a whole number from 1 to ${MOST_RETURNS}, got ${typeof value === 'number' ? value : typeof value}`);
  }
  return value;
}

/**
 * Options of a call to a generator function or method (a streaming call). `generatorBackpressure`:
 * the most items the generator may have yielded that its caller has not yet taken (by `next()`); it
 * pauses at its `yield` until the caller catches up. Unbounded by default.
 */
export interface StreamingOptions {
  generatorBackpressure?: number;
}

/** Checks a streaming call's backpressure, naming what is wrong; Infinity where unbounded. */
export function generatorBackpressureOf(value: unknown, where: string): number {
  if (value === undefined) return Infinity;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1) {
    throw new InvalidArgumentError(`${where}: generatorBackpressure is a whole number of items, 1 or more, got ${typeof value === 'number' ? value : typeof value}`);
  }
  return value;
}

/**
 * A call's number of returns, checked with what it cannot go with: a generator's items are its
 * returns already; tensors kept by the actor (tensorTransport) and recompute describe one result.
 */
export function returnsOf(options: TaskOptions | ActorCallOptions, streaming: boolean, where: string): number {
  const count = numReturnsOf(options.numReturns, where);
  if (count === 1) return count;
  if (streaming) throw new InvalidArgumentError(`${where} is a generator: each item it yields is a ref already, so it takes no numReturns (got ${count})`);
  const transport = (options as ActorCallOptions).tensorTransport;
  if (transport !== undefined && transport !== 'store') throw new InvalidArgumentError(`${where}: numReturns ${count} with tensorTransport '${transport}' is not supported (the actor keeps one result's tensors); use 'store'`);
  if ((options as ActorCallOptions).recompute) throw new InvalidArgumentError(`${where}: numReturns ${count} with recompute is not supported (recompute makes one result again)`);
  return count;
}

/**
 * A task's or an actor's runtime environment: variables set in the worker process it runs in, on
 * top of the driver's (init's runtimeEnv.env). Tasks with the same variables share workers; others
 * get workers of their own, started for them, as Ray starts workers per runtime environment. Tasks
 * and actors that a task or actor submits inherit its environment unless they name their own.
 * A working directory stays the driver's: init({ runtimeEnv: { workingDir } }).
 */
export interface WorkerRuntimeEnvironment {
  env?: Record<string, string>;
}

/** A runtime environment checked, with the key that workers of that environment share ('' for none). */
export interface WorkerEnvironment {
  key: string;
  env?: Readonly<Record<string, string>>;
}

export const DEFAULT_WORKER_ENVIRONMENT: WorkerEnvironment = { key: '' };

/** Checks environment variables for workers, naming what is wrong (ERR_RUNTIME_ENV). */
export function checkEnvironmentVariables(env: unknown, where: string): Record<string, string> {
  if (typeof env !== 'object' || env === null || Array.isArray(env)) throw new InvalidArgumentError(`${where} maps variable names to strings`, 'ERR_RUNTIME_ENV');
  for (const [name, text] of Object.entries(env)) {
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) throw new InvalidArgumentError(`${where}: '${name}' is not an environment variable's name`, 'ERR_RUNTIME_ENV');
    if (typeof text !== 'string') throw new InvalidArgumentError(`${where}.${name} is a string, got ${typeof text}`, 'ERR_RUNTIME_ENV');
    if (text.includes('\0')) throw new InvalidArgumentError(`${where}.${name} holds a NUL character`, 'ERR_RUNTIME_ENV');
    if (name.startsWith('TRELLIS_')) throw new InvalidArgumentError(`${where}.${name}: variables named TRELLIS_* are trellis's own`, 'ERR_RUNTIME_ENV');
  }
  return { ...(env as Record<string, string>) };
}

/** A task's or actor's `runtimeEnv` option checked, and the key its workers share. */
export function workerEnvironmentOf(value: unknown, where: string): WorkerEnvironment {
  if (value === undefined) return DEFAULT_WORKER_ENVIRONMENT;
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new InvalidArgumentError(`${where} is { env }`, 'ERR_RUNTIME_ENV');
  const { env, ...rest } = value as WorkerRuntimeEnvironment;
  const others = Object.keys(rest);
  if (others.length > 0) {
    const driverOnly = others.filter((key) => ['workingDir', 'excludes', 'includeDependencies', 'maxBytes'].includes(key));
    throw new InvalidArgumentError(
      driverOnly.length > 0
        ? `${where} takes env only: ${driverOnly.map((key) => `'${key}'`).join(', ')} describe the driver's working directory, given to init({ runtimeEnv })`
        : `${where} has no option ${others.map((key) => `'${key}'`).join(', ')} (it takes env)`,
      'ERR_RUNTIME_ENV',
    );
  }
  if (env === undefined) return DEFAULT_WORKER_ENVIRONMENT;
  const checked = checkEnvironmentVariables(env, `${where}.env`);
  const names = Object.keys(checked).sort();
  if (names.length === 0) return DEFAULT_WORKER_ENVIRONMENT;
  return { key: JSON.stringify(names.map((name) => [name, checked[name]])), env: checked };
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
  /** For a generator method: see StreamingOptions. */
  generatorBackpressure?: number;
  /** See ReturnsOptions. */
  numReturns?: number;
  /** The actor's concurrency group this call runs in (ActorOptions.concurrencyGroups), over its method's. */
  concurrencyGroup?: string;
  /**
   * How to make this call's output again if it is lost (its node left the cluster holding the only
   * copy): a task run with these arguments, which returns what the call returned and puts what
   * it put, in the same order. An actor call cannot simply be rerun (the actor's state has moved
   * on, or the actor is gone); a pool of equal actors can say how any of them would have done it.
   * Without it, only the call's result is kept (in the actor's node) and its loss is final.
   */
  recompute?: Recompute;
}

export interface Recompute {
  /** A remote function (made by remote()). */
  task: { readonly descriptor: FunctionDescriptor };
  args: unknown[];
  /** The task's resources and retries, as a task's options. */
  options?: TaskOptions;
  /**
   * Actors that would return and put the same for the same call (the caller's peers, as a pool's
   * actors are): while one is alive the call itself is rerun on it, with no resources of its own
   * to wait for (those a task would need may all be held by such actors). Driver only.
   */
  peers?: () => ReadonlyArray<{ readonly actorId: string }>;
}

/** Checks a call's `recompute` option, naming what is wrong. */
export function checkRecompute(recompute: Recompute): void {
  const descriptor = recompute?.task?.descriptor;
  if (!descriptor || typeof descriptor.module !== 'string' || typeof descriptor.name !== 'string') {
    throw new InvalidArgumentError('an actor call\'s recompute.task must be a remote function (made by remote() at a module\'s top level)');
  }
  if (!Array.isArray(recompute.args)) throw new InvalidArgumentError(`an actor call's recompute.args must be an array, got ${typeof recompute.args}`);
}

export interface ActorOptions {
  /** Per-method options, e.g. { forward: { tensorTransport: 'nccl' } }. */
  methods?: Record<string, Omit<ActorCallOptions, 'recompute'>>;
  numCpus?: number;
  numGpus?: number;
  memory?: number;
  resources?: Resources;
  /** Registered name: getActor(name) finds the actor again. */
  name?: string;
  /**
   * Async methods interleave up to this many at a time (default 1: strictly one after another),
   * for calls in no concurrency group.
   */
  maxConcurrency?: number;
  /**
   * Named groups of calls, each with its own limit of calls running at once (as Ray's concurrency
   * groups): a method put in a group (`methods: { health: { concurrencyGroup: 'control' } }`, or a
   * call's own `concurrencyGroup`) waits only for calls of its group, so a health check or a
   * stats call never queues behind long calls. Calls in no group share the default group, of
   * `maxConcurrency`. Order holds within a group, not across groups.
   */
  concurrencyGroups?: Record<string, number>;
  /** Restarts (constructor rerun) after the actor's process dies; -1 for unlimited. Default 0. */
  maxRestarts?: number;
  /** Retries of a call whose actor died mid-call, when the actor restarts. Default 0. */
  maxTaskRetries?: number;
  schedulingStrategy?: SchedulingStrategy;
  /** Environment variables of the actor's process (see WorkerRuntimeEnvironment). */
  runtimeEnv?: WorkerRuntimeEnvironment;
}

export function requestOf(options: { numCpus?: number; numGpus?: number; memory?: number; resources?: Resources }, defaultCpus: number): Resources {
  return {
    ...(options.resources ?? {}),
    CPU: options.numCpus ?? defaultCpus,
    GPU: options.numGpus ?? 0,
    memory: options.memory ?? 0,
  };
}

/** The most calls an actor may run at once, in one group or in its default one. */
export const MAX_ACTOR_CONCURRENCY = 100_000;

function checkConcurrencyLimit(value: unknown, what: string): void {
  if (!(typeof value === 'number' && Number.isInteger(value) && value >= 1 && value <= MAX_ACTOR_CONCURRENCY)) {
    throw new InvalidArgumentError(`${what} must be a whole number from 1 to ${MAX_ACTOR_CONCURRENCY}, got ${String(value)}`);
  }
}

/** Checks an actor's maxConcurrency, concurrency groups and its methods' groups, naming what is wrong. */
export function checkActorConcurrency(options: ActorOptions, className: string): void {
  if (options.maxConcurrency !== undefined) checkConcurrencyLimit(options.maxConcurrency, `actor ${className} maxConcurrency`);
  const groups = options.concurrencyGroups;
  if (groups !== undefined) {
    if (groups === null || typeof groups !== 'object' || Array.isArray(groups)) throw new InvalidArgumentError(`actor ${className} concurrencyGroups must be an object of group names to limits`);
    for (const [name, limit] of Object.entries(groups)) {
      if (name.length === 0) throw new InvalidArgumentError(`actor ${className} concurrencyGroups: a group name is empty`);
      checkConcurrencyLimit(limit, `actor ${className} concurrency group '${name}'`);
    }
  }
  for (const [method, methodOptions] of Object.entries(options.methods ?? {})) {
    const group = methodOptions?.concurrencyGroup;
    if (group !== undefined) checkConcurrencyGroup(group, groups, `actor ${className} method ${method}`);
  }
}

/** Checks that `group` is one of the actor's concurrency groups. */
export function checkConcurrencyGroup(group: unknown, groups: Record<string, number> | undefined, where: string): void {
  if (typeof group !== 'string' || !groups || !Object.hasOwn(groups, group)) {
    const known = Object.keys(groups ?? {});
    throw new InvalidArgumentError(`${where}: concurrency group ${JSON.stringify(group)} is not one of the actor's (${known.length ? known.join(', ') : 'it has none: see concurrencyGroups'})`);
  }
}
