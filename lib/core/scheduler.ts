/**
 * The driver's scheduler: tasks queued per scheduling class (function, resources, strategy and
 * worker environment), workers leased to a class and kept busy while its tasks queue, and the
 * placement policy that picks where a request runs: a placement group's bundle, a node named by
 * affinity (hard or soft), round-robin for SPREAD, the node holding the most argument bytes (data
 * locality), else hybrid (pack nodes up to half use, then the least used). What a task needs
 * before it can run (its arguments, their copies) and what runs it are the cluster's; this module
 * only decides where and when.
 */
import { Deque } from './deque.js';
import type { Node, WorkerProcess } from './node.js';
import type { FunctionDescriptor } from './protocol.js';
import { requestOf, workerEnvironmentOf, type SchedulingStrategy, type TaskOptions, type WorkerEnvironment } from './options.js';
import type { PlacementGroup } from './placement-group.js';
import { describeResources, toFixed, type ResourcePool } from './resources.js';
import type { TaskRecord } from './cluster-records.js';

/** Tasks sent ahead to a leased worker, hiding the round trip between tasks. */
export const PIPELINE_DEPTH = 8;

/** A task's options resolved once: they are usually one object shared by many calls. */
export interface RequestInfo {
  request: Map<string, number>;
  requestKey: string;
  environment: WorkerEnvironment;
  lastFn?: FunctionDescriptor;
  lastClassKey?: string;
  /**
   * Some node could run this (plain strategies only) while the cluster was at this generation of
   * nodes: joining nodes only add to what is feasible, a node that leaves makes it ask again.
   */
  feasibleAt?: number;
}

/** Where resources were taken from: a node, or a placement group's bundle on a node. */
export interface Placement {
  node: Node;
  pool: ResourcePool;
  group?: PlacementGroup;
}

/** A worker lent to one scheduling class, with the resources it took. */
export interface Lease extends Placement {
  worker: WorkerProcess;
  /** Being topped up to PIPELINE_DEPTH. */
  filling?: boolean;
  classKey: string;
  request: Map<string, number>;
  gpuIds: number[];
  inflight: number;
}

/** Why a request can never be met, and what it lacks. */
export interface Infeasibility {
  reason: string;
  missing: Record<string, number>;
}

/** What the scheduler reads of the cluster it places work in. */
export interface SchedulingView {
  readonly nodes: readonly Node[];
  placementGroup(id: string): PlacementGroup | undefined;
  /** Bundles that may still join (a shared cluster's): work that fits one waits for it. */
  promised(): readonly Map<string, number>[];
  /** The bytes of object `id` that node `nodeId`'s store holds (0 if none). */
  bytesOn(id: string, nodeId: string): number;
  /** Starts a worker on `node` with `environment`. */
  spawn(node: Node, environment: WorkerEnvironment): void;
}

export class Scheduler {
  readonly #view: SchedulingView;
  readonly #queues = new Map<string, Deque<TaskRecord>>();
  readonly #leases = new Map<string, Lease[]>();
  readonly #leaseByWorker = new Map<WorkerProcess, Lease>();
  readonly #requests = new WeakMap<TaskOptions, RequestInfo>();
  #spreadCursor = 0;

  constructor(view: SchedulingView) {
    this.#view = view;
  }

  /** The request, class key and environment of `options`, worked out once per options object. */
  requestFor(options: TaskOptions, name?: string): RequestInfo {
    let cached = this.#requests.get(options);
    if (!cached) {
      const request = toFixed(requestOf(options, 1));
      const strategy = options.schedulingStrategy ?? 'DEFAULT';
      const environment = workerEnvironmentOf(options.runtimeEnv, `task ${options.name ?? name ?? ''} runtimeEnv`);
      const requestKey = `${[...request].join(';')}#${JSON.stringify(strategy, (key, value) => (key === 'placementGroup' ? value.id : value))}#${environment.key}`;
      this.#requests.set(options, (cached = { request, requestKey, environment }));
    }
    return cached;
  }

  /** What requestFor worked out for `options`, if it has. */
  knownRequest(options: TaskOptions): RequestInfo | undefined {
    return this.#requests.get(options);
  }

  /** The class key of `fn` under `info`, remembered for the function seen last with these options. */
  classKey(fn: FunctionDescriptor | undefined, info: RequestInfo): string {
    if (info.lastFn !== fn || info.lastClassKey === undefined) {
      info.lastFn = fn;
      info.lastClassKey = `${fn?.module}#${fn?.name}#${info.requestKey}`;
    }
    return info.lastClassKey;
  }

  /** Queues `task` in its class: at the front for a task that ran before (a retry, a requeue). */
  enqueue(task: TaskRecord, front: boolean): void {
    let queue = this.#queues.get(task.classKey);
    if (!queue) this.#queues.set(task.classKey, (queue = new Deque()));
    if (front) queue.unshift(task);
    else queue.push(task);
  }

  /** Every queued task, class by class (some may have ended since: their state says). */
  *queuedTasks(): IterableIterator<TaskRecord> {
    for (const queue of this.#queues.values()) yield* queue;
  }

  /** Whether any task waits in a queue. */
  hasQueued(): boolean {
    for (const queue of this.#queues.values()) if (queue.length > 0) return true;
    return false;
  }

  /** Sends queued tasks to leases while any can take them, each class in turn. */
  dispatchQueued(dispatch: (task: TaskRecord, lease: Lease) => void): void {
    for (const [classKey, queue] of this.#queues) {
      while (queue.length > 0) {
        const task = queue.peek()!;
        if (task.state !== 'queued') {
          queue.shift();
          continue;
        }
        const lease = this.#leaseFor(classKey, task);
        if (!lease) break;
        queue.shift();
        dispatch(task, lease);
      }
      if (queue.length === 0) this.#queues.delete(classKey);
    }
  }

  /** Why `request` can never be met under `strategy`, or undefined when some node could. */
  infeasibility(request: Map<string, number>, strategy: SchedulingStrategy): Infeasibility | undefined {
    const nodes = this.#view.nodes;
    if (typeof strategy === 'object' && strategy.type === 'placement-group') {
      const group = this.#view.placementGroup(strategy.placementGroup.id);
      if (!group || group.state === 'removed' || group.state === 'infeasible') {
        return { reason: `placement group ${strategy.placementGroup.id} is ${group?.state ?? 'unknown'}`, missing: {} };
      }
      const index = strategy.bundleIndex;
      if (index !== undefined && index >= 0 && !group.bundles[index]) {
        return { reason: `placement group ${group.id} has no bundle ${index} (it has ${group.bundles.length})`, missing: {} };
      }
      const bundles = index === undefined || index < 0 ? group.bundles : [group.bundles[index]];
      const fits = bundles.some((bundle) => [...request].every(([name, amount]) => (bundle.request.get(name) ?? 0) >= amount));
      if (!fits) {
        return { reason: `it asks for ${describeResources(request)}, more than any bundle of placement group ${group.id} holds`, missing: {} };
      }
      return undefined;
    }
    if (typeof strategy === 'object' && strategy.type === 'node' && !strategy.soft) {
      const node = nodes.find((candidate) => candidate.id === strategy.nodeId);
      if (!node) return { reason: `node ${strategy.nodeId} does not exist`, missing: {} };
      if (!node.pool.fitsTotal(request)) {
        const missing = node.pool.missing(request);
        return { reason: `node ${node.id} lacks ${describeResources(toFixed(missing))}`, missing };
      }
      return undefined;
    }
    if (nodes.some((node) => node.pool.fitsTotal(request))) return undefined;
    if (this.#view.promised().some((bundle) => [...request].every(([name, amount]) => (bundle.get(name) ?? 0) >= amount))) return undefined;
    const missing = nodes[0].pool.missing(request);
    return { reason: `it asks for ${describeResources(request)} and no node has that much in total (missing on ${nodes[0].id}: ${describeResources(toFixed(missing))})`, missing };
  }

  /** Where `request` can run now under `strategy`, or undefined when nothing has it free. */
  place(request: Map<string, number>, strategy: SchedulingStrategy, localityIds: string[] = []): Placement | undefined {
    if (typeof strategy === 'object' && strategy.type === 'placement-group') {
      const group = this.#view.placementGroup(strategy.placementGroup.id);
      if (!group || group.state !== 'created') return undefined;
      const bundles = strategy.bundleIndex === undefined || strategy.bundleIndex < 0 ? group.bundles : [group.bundles[strategy.bundleIndex]];
      for (const bundle of bundles) {
        if (bundle?.pool?.fits(request) && bundle.node!.canAssignGpus(request.get('GPU') ?? 0)) {
          return { node: bundle.node!, pool: bundle.pool, group };
        }
      }
      return undefined;
    }
    const node = this.#pickNode(request, strategy, localityIds);
    return node ? { node, pool: node.pool } : undefined;
  }

  /** Gives back what a placement took (to the node itself once its group is removed). */
  release(placement: Placement, request: Map<string, number>, gpuIds: number[]): void {
    if (placement.group?.state === 'removed') placement.node.pool.release(request);
    else placement.pool.release(request);
    placement.node.releaseGpus(gpuIds, request.get('GPU') ?? 0);
  }

  /** The lease `worker` works under, if any. */
  leaseOf(worker: WorkerProcess): Lease | undefined {
    return this.#leaseByWorker.get(worker);
  }

  /** Every lease held now. */
  leases(): IterableIterator<Lease> {
    return this.#leaseByWorker.values();
  }

  /** Ends a lease: its resources go back and its worker goes idle (unless it died or was taken). */
  endLease(lease: Lease): void {
    const leases = this.#leases.get(lease.classKey);
    if (leases) {
      const index = leases.indexOf(lease);
      if (index >= 0) leases.splice(index, 1);
      if (leases.length === 0) this.#leases.delete(lease.classKey);
    }
    this.#leaseByWorker.delete(lease.worker);
    this.release(lease, lease.request, lease.gpuIds);
    if (lease.worker.state === 'leased') {
      lease.worker.state = 'idle';
      lease.worker.idleSince = Date.now();
    }
  }

  /**
   * Ends `lease` if nothing more will go to it: nothing runs on it, and its class has no task
   * queued (or its node is being taken back).
   */
  endLeaseIfDone(lease: Lease): void {
    const queue = this.#queues.get(lease.classKey);
    if (lease.inflight === 0 && (!queue || queue.length === 0 || lease.node.draining)) this.endLease(lease);
  }

  #pickNode(request: Map<string, number>, strategy: SchedulingStrategy, localityIds: string[]): Node | undefined {
    const nodes = this.#view.nodes;
    const fits = nodes.filter((node) => !node.draining && node.pool.fits(request) && node.canAssignGpus(request.get('GPU') ?? 0));
    if (typeof strategy === 'object' && strategy.type === 'node') {
      const node = fits.find((candidate) => candidate.id === strategy.nodeId);
      if (node || !strategy.soft) return node;
    }
    if (fits.length === 0) return undefined;
    if (strategy === 'SPREAD') {
      const node = fits[this.#spreadCursor % fits.length];
      this.#spreadCursor++;
      return node;
    }
    if (localityIds.length > 0 && nodes.length > 1) {
      // Data locality: the node already holding the most argument bytes.
      let best: Node | undefined;
      let bestBytes = 0;
      for (const node of fits) {
        let bytes = 0;
        for (const id of localityIds) bytes += this.#view.bytesOn(id, node.id);
        if (bytes > bestBytes) {
          best = node;
          bestBytes = bytes;
        }
      }
      if (best) return best;
    }
    // Hybrid: pack nodes in order while they stay at or under half use, then spread to the least used.
    const names = [...request.keys()];
    for (const node of fits) {
      node.pool.acquire(request);
      const used = node.pool.utilization(names);
      node.pool.release(request);
      if (used <= 0.5) return node;
    }
    return fits.reduce((best, node) => (node.pool.utilization(names) < best.pool.utilization(names) ? node : best));
  }

  #leaseFor(classKey: string, task: TaskRecord): Lease | undefined {
    const leases = this.#leases.get(classKey) ?? [];
    let best: Lease | undefined;
    // A lease is topped up once it has drained to half, then filled in one go: one write per batch
    // of tasks rather than one per finished task.
    for (const lease of leases) {
      if (lease.node.draining) continue;
      const open = lease.inflight < PIPELINE_DEPTH && (lease.filling || lease.inflight <= PIPELINE_DEPTH / 2);
      if (open && (!best || lease.inflight < best.inflight)) best = lease;
    }
    if (best) best.filling = best.inflight + 1 < PIPELINE_DEPTH;
    // A fresh lease when the best existing one already has work queued, if resources allow.
    if (best && best.inflight === 0) return best;
    const placement = this.place(task.request, task.strategy, task.argRefs);
    if (placement) {
      const node = placement.node;
      const worker = node.idleWorker(task.environment.key);
      if (worker) {
        const gpuIds = node.assignGpus(task.request.get('GPU') ?? 0) ?? [];
        placement.pool.acquire(task.request);
        worker.state = 'leased';
        worker.leasedOnce = true;
        // Fields listed, not spread from the placement: spreading made this the costliest line of a
        // synchronous task's dispatch.
        const lease: Lease = { node, pool: placement.pool, group: placement.group, worker, classKey, request: task.request, gpuIds, inflight: 0 };
        leases.push(lease);
        this.#leases.set(classKey, leases);
        this.#leaseByWorker.set(worker, lease);
        return lease;
      }
      const key = task.environment.key;
      if (![...node.workers.values()].some((candidate) => candidate.state === 'starting' && candidate.environment.key === key)) this.#view.spawn(node, task.environment);
      // Resources are free and a worker is coming: wait for it rather than queue behind a busy
      // worker, where the task would hold nothing and could wait on the very task ahead of it.
      return undefined;
    }
    return best;
  }
}
