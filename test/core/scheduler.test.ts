/**
 * The scheduler's policy on its own, over nodes with no processes behind them: hybrid packing,
 * SPREAD, node affinity, data locality, infeasibility, and leases kept busy per scheduling class.
 * (scheduling.test.ts checks the same choices end to end, with workers.)
 */
import { describe, expect, it } from 'vitest';
import { Node, type WorkerProcess } from '../../lib/core/node.js';
import { Scheduler, PIPELINE_DEPTH, type Lease, type SchedulingView } from '../../lib/core/scheduler.js';
import type { TaskRecord } from '../../lib/core/cluster-records.js';
import { DEFAULT_WORKER_ENVIRONMENT, type SchedulingStrategy, type TaskOptions, type WorkerEnvironment } from '../../lib/core/options.js';
import { toFixed, type Resources } from '../../lib/core/resources.js';

/** A node with resources and idle workers, and nothing else: the scheduler reads no more. */
class PolicyNode extends Node {
  readonly localStore = undefined;
  readonly storeName = 'none';
  readonly closed = false;
  constructor(id: string, resources: Resources, numGpus = 0) {
    super(id, resources, numGpus, {});
  }
  addIdleWorker(environment: WorkerEnvironment = DEFAULT_WORKER_ENVIRONMENT): void {
    const id = `${this.id}-worker-${this.workers.size}`;
    this.workers.set(id, { id, state: 'idle', environment, node: this } as unknown as WorkerProcess);
  }
  spawnWorker(): WorkerProcess {
    throw new Error('not in this test');
  }
  holdsObject(): boolean {
    return false;
  }
  deleteObject(): void {}
  deleteUnreportedPuts(): void {}
  reapDeadProcesses(): void {}
  storeStats(): never {
    throw new Error('not in this test');
  }
  pinnedObjects(): never {
    throw new Error('not in this test');
  }
  close(): void {}
}

function setUp(nodes: PolicyNode[], where: Record<string, { size: number; nodes: string[] }> = {}) {
  const spawned: string[] = [];
  const view: SchedulingView = {
    nodes,
    placementGroup: () => undefined,
    promised: () => [],
    bytesOn: (id, nodeId) => (where[id]?.nodes.includes(nodeId) ? where[id].size : 0),
    spawn: (node) => spawned.push(node.id),
  };
  return { scheduler: new Scheduler(view), spawned };
}

let nextTask = 0;
function task(scheduler: Scheduler, options: TaskOptions = {}, argRefs: string[] = []): TaskRecord {
  const info = scheduler.requestFor(options, 'f');
  const fn = { module: 'file:///m.js', name: 'f' };
  return {
    taskId: `task-${nextTask++}`,
    name: 'f',
    fn,
    args: new Uint8Array(),
    argRefs,
    nested: [],
    held: [],
    keptBy: 0,
    options,
    returnId: '',
    request: info.request,
    classKey: scheduler.classKey(fn, info),
    environment: info.environment,
    strategy: (options.schedulingStrategy ?? 'DEFAULT') as SchedulingStrategy,
    maxRetries: 0,
    retryExceptions: false,
    attempts: 0,
    state: 'queued',
    pendingSince: 0,
  };
}

/** Queues `tasks` and dispatches what can run now, as the cluster does: which node each went to. */
function dispatch(scheduler: Scheduler, tasks: TaskRecord[]): Map<TaskRecord, Lease> {
  for (const each of tasks) scheduler.enqueue(each, false);
  const placed = new Map<TaskRecord, Lease>();
  scheduler.dispatchQueued((each, lease) => {
    each.state = 'running';
    lease.inflight++;
    placed.set(each, lease);
  });
  return placed;
}

describe('Scheduler', () => {
  it('packs a node up to half its use, then spreads to the least used', () => {
    const a = new PolicyNode('a', { CPU: 4 });
    const b = new PolicyNode('b', { CPU: 4 });
    const { scheduler } = setUp([a, b]);
    const request = toFixed({ CPU: 1 });
    const picks: string[] = [];
    for (let i = 0; i < 6; i++) {
      const placement = scheduler.place(request, 'DEFAULT')!;
      placement.pool.acquire(request);
      picks.push(placement.node.id);
    }
    // a takes two (50%), then b two, then the least used of the two each time.
    expect(picks).toEqual(['a', 'a', 'b', 'b', 'a', 'b']);
    expect(scheduler.place(request, 'DEFAULT')?.node.id).toBe('a');
  });

  it('SPREAD goes round the nodes that fit; node affinity is hard unless soft', () => {
    const nodes = ['a', 'b', 'c'].map((id) => new PolicyNode(id, { CPU: 8 }));
    const { scheduler } = setUp(nodes);
    const request = toFixed({ CPU: 1 });
    expect(Array.from({ length: 4 }, () => scheduler.place(request, 'SPREAD')!.node.id)).toEqual(['a', 'b', 'c', 'a']);
    nodes[2].pool.acquire(toFixed({ CPU: 8 }));
    expect(scheduler.place(request, { type: 'node', nodeId: 'c' })).toBeUndefined();
    expect(scheduler.place(request, { type: 'node', nodeId: 'c', soft: true })?.node.id).toBe('a');
    nodes[1].draining = true;
    expect(scheduler.place(request, { type: 'node', nodeId: 'b' })).toBeUndefined();
  });

  it('prefers the node holding the most argument bytes', () => {
    const nodes = ['a', 'b', 'c'].map((id) => new PolicyNode(id, { CPU: 2 }));
    const { scheduler } = setUp(nodes, { x: { size: 100, nodes: ['b'] }, y: { size: 300, nodes: ['c'] }, z: { size: 250, nodes: ['b'] } });
    const request = toFixed({ CPU: 1 });
    expect(scheduler.place(request, 'DEFAULT', ['x'])?.node.id).toBe('b');
    expect(scheduler.place(request, 'DEFAULT', ['x', 'y'])?.node.id).toBe('c');
    expect(scheduler.place(request, 'DEFAULT', ['x', 'y', 'z'])?.node.id).toBe('b');
    // Where the data is, but full: the policy falls back to the rest.
    nodes[1].pool.acquire(toFixed({ CPU: 2 }));
    expect(scheduler.place(request, 'DEFAULT', ['x', 'z'])?.node.id).toBe('a');
  });

  it('names what an infeasible request lacks', () => {
    const { scheduler } = setUp([new PolicyNode('a', { CPU: 2 }, 1)]);
    expect(scheduler.infeasibility(toFixed({ CPU: 2, GPU: 1 }), 'DEFAULT')).toBeUndefined();
    const tooBig = scheduler.infeasibility(toFixed({ CPU: 3 }), 'DEFAULT')!;
    expect(tooBig.reason).toMatch(/no node has that much in total/);
    expect(tooBig.missing).toEqual({ CPU: 1 });
    expect(scheduler.infeasibility(toFixed({ CPU: 1 }), { type: 'node', nodeId: 'nowhere' })?.reason).toBe('node nowhere does not exist');
    expect(scheduler.infeasibility(toFixed({ GPU: 2 }), { type: 'node', nodeId: 'a' })?.missing).toEqual({ GPU: 1 });
    // A soft affinity to a node that cannot fit is still feasible elsewhere: it asks the others.
    expect(scheduler.infeasibility(toFixed({ CPU: 1 }), { type: 'node', nodeId: 'nowhere', soft: true })).toBeUndefined();
    expect(scheduler.infeasibility(toFixed({ CPU: 1 }), { type: 'placement-group', placementGroup: { id: 'pg-1' } } as SchedulingStrategy)?.reason).toBe('placement group pg-1 is unknown');
  });

  it('leases an idle worker per class and pipelines up to PIPELINE_DEPTH while no other can be had', () => {
    const a = new PolicyNode('a', { CPU: 1 });
    a.addIdleWorker();
    const { scheduler, spawned } = setUp([a]);
    const options = {};
    const tasks = Array.from({ length: PIPELINE_DEPTH + 3 }, () => task(scheduler, options));
    const placed = dispatch(scheduler, tasks);
    expect(placed.size).toBe(PIPELINE_DEPTH);
    const lease = [...placed.values()][0];
    expect(new Set(placed.values())).toEqual(new Set([lease]));
    expect(lease.inflight).toBe(PIPELINE_DEPTH);
    expect(spawned).toEqual([]);
    expect(scheduler.leaseOf(lease.worker)).toBe(lease);
    expect(a.pool.available.get('CPU')).toBe(0);
    // Finishing tasks: the lease is topped up only once half drained, then filled in one go.
    lease.inflight -= PIPELINE_DEPTH / 2 - 1;
    expect(dispatch(scheduler, []).size).toBe(0);
    lease.inflight -= 1;
    expect(dispatch(scheduler, []).size).toBe(3);
    expect(scheduler.hasQueued()).toBe(false);
    // Done, and nothing queued in its class: the lease ends and its CPU comes back.
    lease.inflight = 0;
    scheduler.endLeaseIfDone(lease);
    expect(scheduler.leaseOf(lease.worker)).toBeUndefined();
    expect(lease.worker.state).toBe('idle');
    expect(a.pool.available.get('CPU')).toBe(toFixed({ CPU: 1 }).get('CPU'));
  });

  it('with resources free and no idle worker, asks for one rather than queue behind a busy lease', () => {
    const a = new PolicyNode('a', { CPU: 2 });
    a.addIdleWorker();
    const { scheduler, spawned } = setUp([a]);
    const options = {};
    const placed = dispatch(scheduler, [task(scheduler, options), task(scheduler, options)]);
    expect(placed.size).toBe(1);
    expect(spawned).toEqual(['a']);
    expect(scheduler.hasQueued()).toBe(true);
    // The new worker comes: the waiting task gets a lease of its own.
    a.addIdleWorker();
    const next = dispatch(scheduler, []);
    expect(next.size).toBe(1);
    expect([...next.values()][0].worker).not.toBe([...placed.values()][0].worker);
    expect(a.pool.available.get('CPU')).toBe(0);
  });

  it('keeps classes apart: another function or other options never share a lease', () => {
    const a = new PolicyNode('a', { CPU: 4 });
    a.addIdleWorker();
    a.addIdleWorker();
    const { scheduler } = setUp([a]);
    const first = task(scheduler, { numCpus: 1 });
    const second = task(scheduler, { numCpus: 2 });
    expect(first.classKey).not.toBe(second.classKey);
    const placed = dispatch(scheduler, [first, second]);
    expect(placed.get(first)!.worker).not.toBe(placed.get(second)!.worker);
    expect(a.pool.available.get('CPU')).toBe(toFixed({ CPU: 1 }).get('CPU'));
    // The options object is read once: its request is remembered.
    expect(scheduler.knownRequest(first.options)?.request).toBe(first.request);
  });
});
