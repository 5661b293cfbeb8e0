/** The runtime's public functions: init, shutdown, get, put, wait, cancel, actors, state. */
import { cpus } from 'node:os';
import { InvalidArgumentError, NotInitializedError } from '../errors.js';
import { randomBytes } from 'node:crypto';
import { Cluster, type ClusterState, type InitOptions, type ObjectLocation, type TaskDurations } from './cluster.js';
import type { MemorySummary } from './memory-summary.js';
import { writeTrace, type ListTasksOptions, type TaskInfo, type TraceEvent } from './task-events.js';
import { closeMetricsServers } from './metrics.js';
import { BrokerClient, requestedBundles, type ClusterOptions, type ElasticAsk } from './broker-client.js';
import { ObjectRef } from './object-ref.js';
import { ObjectRefGenerator } from './object-ref-generator.js';
import { actorHandleInfo, makeActorHandle, type ActorHandle } from './registry.js';
import { currentRuntime, hasRuntime, setRuntime, type RuntimeContext } from './runtime-context.js';
import { setHandleCodec } from './serialization.js';
import type { PlacementGroup, PlacementGroupOptions, PlacementStrategy } from './placement-group.js';
import type { Resources } from './resources.js';

let cluster: Cluster | undefined;
/** The shared cluster's broker, where init joined one. */
let brokerClient: BrokerClient | undefined;

setHandleCodec({
  isHandle: (value) => actorHandleInfo(value) !== undefined,
  write: (value) => {
    const { actorId, descriptor, methods } = actorHandleInfo((value as { handle: unknown }).handle)!;
    return [actorId, descriptor.module, descriptor.name, methods];
  },
  read: (data) => {
    const [actorId, module, name, methods] = data as [string, string, string, string[]];
    return makeActorHandle(actorId, { module, name }, methods);
  },
});

/** Starts an embedded local cluster in this process. */
/**
 * The cluster init() started: `await using session = await init()` shuts it down with the scope.
 * Ending a session whose cluster is already shut down does nothing (to a later cluster either).
 */
export interface ClusterSession {
  shutdown(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

export async function init(options: InitOptions = {}): Promise<ClusterSession> {
  if (cluster) throw new InvalidArgumentError('trellis is already initialized: call shutdown() first', 'ERR_ALREADY_INITIALIZED');
  if (hasRuntime()) throw new InvalidArgumentError('init() is for the driver; this process is a worker', 'ERR_ALREADY_INITIALIZED');
  if (options.cluster) return joinCluster(options, options.cluster);
  const defaults = { numCpus: cpus().length, ...options };
  const started = await Cluster.start(defaults);
  return adopt(started);
}

/**
 * init's `cluster`: this driver's own cluster, listening for the hosts a shared cluster's broker
 * lends it. The driver's host adds no CPUs unless `numCpus` says so (it keeps the driver's puts).
 */
async function joinCluster(options: InitOptions, given: ClusterOptions): Promise<ClusterSession> {
  // A job the broker runs is told where the broker is and its name by its environment.
  const request: ClusterOptions = { ...given, address: given?.address ?? process.env.TRELLIS_BROKER, name: given?.name ?? process.env.TRELLIS_JOB_NAME };
  if (options.listen) throw new InvalidArgumentError('init takes cluster (join a shared cluster) or listen (take agents of its own), not both');
  if (options.nodes) throw new InvalidArgumentError('init takes cluster or nodes (logical nodes on this host), not both');
  const bundles = requestedBundles(request);
  const sessionToken = randomBytes(24).toString('base64url');
  const started = await Cluster.start({
    numCpus: 0,
    ...(options.numCpus === undefined ? { prestartWorkers: 0 } : {}),
    ...options,
    listen: { host: request.listenHost ?? '0.0.0.0', port: 0, token: sessionToken },
  });
  let client: BrokerClient;
  try {
    client = await BrokerClient.join(request, bundles, started, { port: started.state().listening!.port, token: sessionToken });
  } catch (error) {
    await started.shutdown();
    throw error;
  }
  started.onShutdown(() => {
    client.close();
    if (brokerClient === client) brokerClient = undefined;
  });
  started.describeBroker(() => client.describe());
  brokerClient = client;
  return adopt(started);
}

function adopt(started: Cluster): ClusterSession {
  cluster = started;
  setRuntime(started);
  const end = () => (cluster === started ? shutdown() : Promise.resolve());
  return { shutdown: end, [Symbol.asyncDispose]: end };
}

let shutdownHooks: Array<() => Promise<void> | void> = [];

/**
 * Runs `hook` at the start of the driver's next shutdown(), while the cluster still runs: for
 * layers that hold servers or timers of their own (serving's HTTP proxy and controller).
 */
export function onShutdown(hook: () => Promise<void> | void): void {
  shutdownHooks.push(hook);
}

/** Stops every worker and removes every segment, socket and spill file. */
export async function shutdown(): Promise<void> {
  const hooks = shutdownHooks;
  shutdownHooks = [];
  await Promise.allSettled(hooks.map(async (hook) => hook()));
  const current = cluster;
  cluster = undefined;
  setRuntime(undefined);
  await closeMetricsServers();
  await current?.shutdown();
}

export function isInitialized(): boolean {
  return cluster !== undefined;
}

function toArray<T>(refs: ObjectRef<T> | ObjectRef<T>[]): ObjectRef<T>[] {
  return Array.isArray(refs) ? refs : [refs];
}

/** The values of refs, waiting up to `timeout` ms (default: forever). A failed task throws its error. */
export function get<T>(ref: ObjectRef<T>, options?: { timeout?: number }): Promise<T>;
export function get<T extends readonly ObjectRef<unknown>[]>(refs: T, options?: { timeout?: number }): Promise<{ [K in keyof T]: T[K] extends ObjectRef<infer V> ? V : never }>;
export function get(refs: ObjectRef<unknown> | ObjectRef<unknown>[], options: { timeout?: number } = {}): Promise<unknown> {
  try {
    const timeout = options.timeout ?? Infinity;
    if (!Array.isArray(refs)) {
      checkLive(refs);
      return currentRuntime().getOne(refs, timeout);
    }
    for (const ref of refs) checkLive(ref);
    return currentRuntime().get(refs, timeout);
  } catch (error) {
    return Promise.reject(error);
  }
}

function checkLive(ref: ObjectRef<unknown>): void {
  if (ref instanceof ObjectRefGenerator) throw new InvalidArgumentError(`get() takes ObjectRefs, got ${ref}: iterate it (for await) for its items' refs, or read them with values()`);
  if (!(ref instanceof ObjectRef)) throw new InvalidArgumentError(`get() takes ObjectRefs, got ${typeof ref}`);
  if (!ref.live) throw new InvalidArgumentError(`${ref} was disposed; get() needs a live handle`, 'ERR_REF_DISPOSED');
}

export function put<T>(value: T): ObjectRef<T> {
  return currentRuntime().put(value) as ObjectRef<T>;
}

/**
 * Splits refs into [ready, notReady] once `numReturns` are ready or `timeout` ms pass. A ref is
 * ready once its value (or error) is there; an ObjectRefGenerator (a streaming call) once its next
 * item is there to take, or its end: `next()` on it then answers at once.
 */
export function wait<R extends ObjectRef<unknown> | ObjectRefGenerator<unknown>>(refs: R[], options: { numReturns?: number; timeout?: number } = {}): Promise<[R[], R[]]> {
  const numReturns = options.numReturns ?? 1;
  if (numReturns > refs.length) throw new InvalidArgumentError(`numReturns (${numReturns}) exceeds the ${refs.length} refs given`);
  return currentRuntime().wait(refs, numReturns, options.timeout ?? Infinity);
}

/** Lets go of handles now (see ObjectRef[Symbol.dispose]). */
export function free(refs: ObjectRef<unknown> | ObjectRef<unknown>[]): void {
  for (const ref of toArray(refs)) ref[Symbol.dispose]();
}

/**
 * Cancels the task behind `ref` (or a streaming call): what waits on it fails with
 * TaskCancelledError; `force` kills a plain task's worker. A generator is closed at its next
 * `yield`, its caller taking the items it had yielded, then the error.
 */
export function cancel(ref: ObjectRef<unknown> | ObjectRefGenerator<unknown>, options: { force?: boolean } = {}): void {
  if (!(ref instanceof ObjectRef) && !(ref instanceof ObjectRefGenerator)) throw new InvalidArgumentError(`cancel() takes an ObjectRef or an ObjectRefGenerator, got ${typeof ref}`);
  currentRuntime().cancel(ref, options.force ?? false);
}

/** Kills an actor's process; it does not restart unless `noRestart` is false. */
export function kill(handle: ActorHandle<unknown>, options: { noRestart?: boolean } = {}): void {
  const info = actorHandleInfo(handle);
  if (!info) throw new InvalidArgumentError('kill() takes an actor handle');
  currentRuntime().kill(info.actorId, options.noRestart ?? true);
}

/** A handle to the live actor registered under `name`. */
export async function getActor<T = unknown>(name: string): Promise<ActorHandle<T>> {
  const found = await currentRuntime().getActor(name);
  return makeActorHandle(found.actorId, found.descriptor, found.methods) as ActorHandle<T>;
}

export function getRuntimeContext(): RuntimeContext {
  return currentRuntime().context();
}

/** Nodes, workers, tasks by state, actors, objects and store use. */
export function state(): ClusterState {
  if (!cluster) throw new NotInitializedError('state() is available in the driver after init()');
  return cluster.state();
}

/**
 * Where objects' stored copies are (Ray's get_object_locations): for each ref, the nodes whose
 * stores hold it and its size. A value small enough to travel inline has no node.
 */
export function objectLocations(refs: ObjectRef<unknown> | readonly ObjectRef<unknown>[]): ObjectLocation[] {
  if (!cluster) throw new NotInitializedError('objectLocations() is available in the driver after init()');
  const list = Array.isArray(refs) ? refs : [refs as ObjectRef<unknown>];
  if (list.some((ref) => !(ref instanceof ObjectRef))) throw new InvalidArgumentError('objectLocations() takes an ObjectRef or an array of them');
  return cluster.objectLocations(list.map((ref) => ref.id));
}

/**
 * Where the object stores' memory goes, as Ray's `ray memory` tells: every object the driver
 * knows, largest first, with its size, where it is, its references and the processes pinning it
 * (the driver, a worker and its actor, a node's agent); each node's store; and objects no ref names
 * any more that pins alone keep in a store (a process still holding a view of a deleted object).
 * Asks each node agent for its store's pins.
 */
export function memorySummary(): Promise<MemorySummary> {
  if (!cluster) return Promise.reject(new NotInitializedError('memorySummary() is available in the driver after init()'));
  return cluster.memorySummary();
}

/**
 * Tasks and actor calls (as Ray's `ray list tasks`): those not yet ended, and the last that ended
 * (init's keepEndedTasks, 10,000 by default), each with its state, attempts (where each ran, when,
 * how it ended) and error; oldest submitted first, filtered by state, name or actor.
 */
export function listTasks(options: ListTasksOptions = {}): TaskInfo[] {
  if (!cluster) throw new NotInitializedError('listTasks() is available in the driver after init()');
  return cluster.listTasks(options);
}

/**
 * The attempts listTasks() knows as a trace (as Ray's `ray.timeline()`): Chrome's trace event
 * format, a process per node, a thread per worker, a span per attempt. With `path`, also written
 * there as JSON, for Perfetto (ui.perfetto.dev) or chrome://tracing.
 */
export function timeline(path?: string): TraceEvent[] {
  if (!cluster) throw new NotInitializedError('timeline() is available in the driver after init()');
  const events = cluster.timeline();
  if (path !== undefined) writeTrace(path, events);
  return events;
}

/**
 * Resolves once the cluster has `count` nodes, its own included: node agents joining a driver
 * that listens (init's `listen`). A task asking for resources no node has yet fails as
 * infeasible, so a driver waits for its nodes before it submits. Fails with GetTimeoutError after
 * `timeout` ms (default: forever).
 */
export function waitForNodes(count: number, options: { timeout?: number } = {}): Promise<void> {
  if (!cluster) return Promise.reject(new NotInitializedError('waitForNodes() is for the driver after init()'));
  if (!Number.isInteger(count) || count < 1) return Promise.reject(new InvalidArgumentError(`waitForNodes takes a whole number of nodes >= 1, got ${String(count)}`));
  return cluster.waitForNodes(count, options.timeout ?? Infinity);
}

/**
 * Asks a shared cluster's broker for more bundles than init did (init's `cluster`): each kept
 * whole on one host, lent as they fit, joining as nodes (`node-added`). A bundle no host can hold
 * comes back as a 'warning' event of kind 'cluster'.
 */
export function requestResources(bundles: Resources[]): void {
  if (!cluster) throw new NotInitializedError('requestResources() is for the driver after init()');
  if (!brokerClient) throw new InvalidArgumentError('requestResources() asks a shared cluster for more: init({ cluster }) joins one', 'ERR_NOT_SHARED');
  brokerClient.requestMore(bundles);
}

/**
 * The data layer's actor pools ask a shared cluster for room to grow (cluster.autoscale): one
 * bundle, lent as it fits. Undefined outside a shared cluster, or where the driver does not
 * autoscale. Not exported from the package: pools call it.
 */
export function askForRoom(bundle: Resources): ElasticAsk | undefined {
  return brokerClient?.ask(bundle);
}

/** Reserves bundles of resources together (see PlacementGroup.ready()). */
export function placementGroup(bundles: Resources[], strategy: PlacementStrategy = 'PACK', options: PlacementGroupOptions = {}): PlacementGroup {
  if (!cluster) throw new NotInitializedError('placement groups are created by the driver after init()');
  return cluster.createPlacementGroup(bundles, strategy, options);
}

/** Gives a group's resources back; actors placed in it are killed, tasks waiting for it fail. */
export function removePlacementGroup(group: PlacementGroup): void {
  if (!cluster) throw new NotInitializedError();
  void cluster.removePlacementGroup(group);
}

/** Finished tasks' and calls' run times by name (for metrics; not exported from the package). */
export function taskDurations(): ReadonlyMap<string, Readonly<TaskDurations>> {
  if (!cluster) throw new NotInitializedError();
  return cluster.taskDurations();
}

/** Cluster events: 'warning' for tasks that wait on resources over 1 s. */
export function events(): import('node:events').EventEmitter {
  if (!cluster) throw new NotInitializedError();
  return cluster.events;
}
