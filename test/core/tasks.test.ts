/**
 * Tasks: remote(), .options(), arguments (values, refs, refs nested in values), get/put/wait,
 * cancel, worker prestart and reuse, and getRuntimeContext() inside workers (GPU ids included).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  GetTimeoutError,
  InfeasibleTaskError,
  InvalidArgumentError,
  ObjectRef,
  TaskCancelledError,
  TaskError,
  cancel,
  free,
  get,
  getRuntimeContext,
  init,
  put,
  shutdown,
  state,
  wait,
} from '../../lib/index.js';
import { RemoteCounter } from './fixtures/actors.js';
import { add, context, describeValue, fail, gated, gatedContext, identity, inspectArgs, pid, square } from './fixtures/core.js';
import { isAlive, openGate, rejection, scratch, started, until } from './helpers.js';
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, basename } from 'node:path';

const files = scratch();
let prestarted: number[] = [];

beforeAll(async () => {
  // GPUs are plain resources here: two "GPUs" on a CPU-only host.
  await init({ numCpus: 2, numGpus: 2 });
  prestarted = state().workers.map((worker) => worker.pid);
});

afterAll(async () => {
  await shutdown();
  files.cleanup();
});

describe('workers', () => {
  it('are prestarted child processes, reused across sequential tasks', async () => {
    expect(prestarted).toHaveLength(2);
    const seen: number[] = [];
    for (let i = 0; i < 20; i++) seen.push(await get(pid.remote()));
    // Every task ran in a prestarted process: none was spawned per task.
    for (const taskPid of seen) expect(prestarted).toContain(taskPid);
    expect(seen).not.toContain(process.pid);
    expect(state().workers.map((worker) => worker.pid).sort()).toEqual([...prestarted].sort());
  });
});

describe('remote functions and arguments', () => {
  it('.remote() returns an ObjectRef whose value get() reads', async () => {
    const ref = square.remote(9);
    expect(ref).toBeInstanceOf(ObjectRef);
    expect(await get(ref)).toBe(81);
  });

  it('takes values and refs, resolving refs before the task runs', async () => {
    const gate = files.path('dependency');
    const slow = gated.remote(gate, 40) as ObjectRef<number>;
    const sum = add.remote(slow, put(2));
    await until(() => started(gate), 'the dependency to start');
    openGate(gate);
    expect(await get(sum)).toBe(42);
    expect(await get(add.remote(square.remote(3), 1))).toBe(10);
  });

  it('passes refs nested inside values through as refs the task can get', async () => {
    const top = put({ label: 'top' });
    const inner = put('inner value');
    const seen = await get(inspectArgs.remote(top, [inner]));
    expect(seen).toEqual({ topIsRef: false, top: { label: 'top' }, innerIsRef: true, innerValue: 'inner value' });
    // A task's result as the nested ref, too.
    const fromTask = await get(inspectArgs.remote(1, [square.remote(12)]));
    expect(fromTask.innerValue).toBe(144);
    // One object both as an argument (its value) and nested in another (a ref).
    const both = await get(inspectArgs.remote(inner, [inner]));
    expect(both).toEqual({ topIsRef: false, top: 'inner value', innerIsRef: true, innerValue: 'inner value' });
  });

  it('.options() applies to the calls made through it, leaving the function as it was', async () => {
    const greedy = context.options({ numGpus: 3 });
    expect(await rejection(get(greedy.remote()))).toBeInstanceOf(InfeasibleTaskError);
    const oneGpu = await get(context.options({ numGpus: 1 }).remote());
    expect(oneGpu.gpuIds).toHaveLength(1);
    const plain = await get(context.remote());
    expect(plain.gpuIds).toEqual([]);
    // A name given by options shows up in errors.
    const error = await rejection(get(fail.options({ name: 'renamed-task' }).remote('x')));
    expect(error).toBeInstanceOf(TaskError);
    expect(error.taskName).toBe('renamed-task');
  });

  it('carries rich values through tasks', async () => {
    const values: unknown[] = [
      { a: 1, nested: { b: [1, 2, 3] } },
      new Map([['k', { v: 1 }]]),
      new Set([1, 2]),
      new Date(86_400_000),
      12345678901234567890n,
      'text',
      null,
      Float32Array.of(1.5, 2.5),
      [1, 'two', { three: 3 }],
    ];
    for (const value of values) expect(await get(identity.remote(value))).toEqual(value);
    expect(await get(describeValue.remote(Float32Array.of(1, 2)))).toMatchObject({ kind: '[object Float32Array]', length: 2 });
  });
});

describe('get, put and wait', () => {
  it('get takes one ref or an array, in order', async () => {
    expect(await get(put('one'))).toBe('one');
    const refs = [square.remote(2), put(7), square.remote(4)];
    expect(await get(refs)).toEqual([4, 7, 16]);
    expect(await get([])).toEqual([]);
  });

  it('get with a timeout throws GetTimeoutError, and the object stays gettable', async () => {
    const gate = files.path('timeout');
    const ref = gated.remote(gate, 'late');
    expect(await rejection(get(ref, { timeout: 50 }))).toBeInstanceOf(GetTimeoutError);
    expect(await rejection(get([put(1), ref], { timeout: 50 }))).toBeInstanceOf(GetTimeoutError);
    openGate(gate);
    expect(await get(ref, { timeout: 20_000 })).toBe('late');
  });

  it('get rejects what is not a live ref', async () => {
    await expect(get(42 as unknown as ObjectRef<number>)).rejects.toBeInstanceOf(InvalidArgumentError);
  });

  it('put stores values of every kind', async () => {
    const value = { n: 1, list: [1, 2], when: new Date(0), bytes: Uint8Array.of(1, 2, 3) };
    expect(await get(put(value))).toEqual(value);
    expect(await get(put(undefined))).toBeUndefined();
  });

  it('wait returns the first numReturns ready refs and the rest', async () => {
    const gate = files.path('wait');
    const slow = gated.remote(gate, 'slow');
    const fast = [square.remote(1), square.remote(2)];
    const [ready, notReady] = await wait([slow, ...fast], { numReturns: 2 });
    expect(ready).toEqual(fast);
    expect(notReady).toEqual([slow]);
    const [one] = await wait([slow, ...fast], { numReturns: 1 });
    expect(one).toHaveLength(1);
    expect(fast).toContain(one[0]);
    // A timeout returns what is ready by then.
    const [none, pending] = await wait([slow], { timeout: 50 });
    expect(none).toEqual([]);
    expect(pending).toEqual([slow]);
    openGate(gate);
    const [all] = await wait([slow, ...fast], { numReturns: 3, timeout: 20_000 });
    expect(all).toHaveLength(3);
    // A failed task counts as ready.
    const [failed] = await wait([fail.remote('x')]);
    expect(failed).toHaveLength(1);
    expect(() => wait(fast, { numReturns: 3 })).toThrow(InvalidArgumentError);
  });
});

describe('state()', () => {
  it('counts tasks by state, and reports workers, objects and store use', async () => {
    const gates = [files.path('state'), files.path('state')];
    const running = gates.map((gate, i) => gated.remote(gate, i) as ObjectRef<number>);
    await until(() => gates.every(started), 'both CPUs to be held');
    const queued = square.remote(3); // no CPU left
    const waiting = add.remote(running[0], 1); // its argument is not ready
    const stored = put(new Float64Array(50_000));
    const snapshot = state();
    expect(snapshot.tasks).toMatchObject({ running: 2, queued: 1, waiting: 1 });
    expect(snapshot.workers.filter((worker) => worker.state === 'leased')).toHaveLength(2);
    expect(snapshot.objects.count).toBeGreaterThanOrEqual(5);
    expect(snapshot.nodes[0].store.objectCount).toBeGreaterThanOrEqual(1);
    expect(snapshot.nodes[0].store.bytesInUse).toBeGreaterThanOrEqual(50_000 * 8);
    expect(snapshot.nodes[0].resources.available.CPU).toBe(0);
    for (const gate of gates) openGate(gate);
    expect(await get([...running, queued, waiting])).toEqual([0, 1, 9, 1]);
    expect(state().tasks).toEqual({});
    free(stored);
  });
});

describe('cancel', () => {
  it('a queued task fails with TaskCancelledError and the cluster carries on', async () => {
    // Both CPUs held by gated tasks: the next task queues.
    const gates = [files.path('hold'), files.path('hold')];
    const holders = gates.map((gate, i) => gated.remote(gate, i));
    await until(() => gates.every(started), 'both CPUs to be held');
    const queued = square.remote(5);
    expect(state().tasks.queued).toBeGreaterThanOrEqual(1);
    cancel(queued);
    const error = await rejection(get(queued));
    expect(error).toBeInstanceOf(TaskCancelledError);
    expect(error.code).toBe('ERR_TASK_CANCELLED');
    for (const gate of gates) openGate(gate);
    expect(await get(holders)).toEqual([0, 1]);
    expect(await get(square.remote(6))).toBe(36);
  });

  it('force kills a running task: its worker process dies and the task fails with TaskCancelledError', async () => {
    const gate = files.path('force');
    const running = gated.remote(gate, 'never');
    await until(() => started(gate), 'the task to start');
    const workerPid = Number(readFileSync(`${gate}.started`, 'utf8'));
    expect(isAlive(workerPid)).toBe(true);
    cancel(running, { force: true });
    expect(await rejection(get(running))).toBeInstanceOf(TaskCancelledError);
    await until(() => !isAlive(workerPid), 'the cancelled task\'s worker to exit');
    // The pool replaces the process on demand.
    expect(await get(square.remote(7))).toBe(49);
    openGate(gate);
  });
});

describe('getRuntimeContext', () => {
  it('in the driver', () => {
    expect(getRuntimeContext()).toMatchObject({ isDriver: true, nodeId: 'node-0', gpuIds: [] });
  });

  it('in a task: node, worker and task ids', async () => {
    const seen = await get(context.remote());
    expect(seen.isDriver).toBe(false);
    expect(seen.nodeId).toBe('node-0');
    expect(typeof seen.taskId).toBe('string');
    expect(seen.actorId).toBeUndefined();
    expect(seen.gpuIds).toEqual([]);
    const worker = state().workers.find((candidate) => candidate.pid === seen.pid);
    expect(worker?.workerId).toBe(seen.workerId);
    const again = await get(context.remote());
    expect(again.taskId).not.toBe(seen.taskId);
  });

  it('in an actor: the actor id, on the actor\'s own worker', async () => {
    const counter = RemoteCounter.remote(0);
    const seen = await get(counter.context.remote());
    expect(seen.actorId).toBe(counter.actorId);
    expect(seen.isDriver).toBe(false);
    const actor = state().actors.find((candidate) => candidate.actorId === counter.actorId);
    expect(actor?.pid).toBe(seen.pid);
    expect(state().workers.find((worker) => worker.pid === seen.pid)?.workerId).toBe(seen.workerId);
  });

  it('GPU tasks see exactly their GPU ids in CUDA_VISIBLE_DEVICES', async () => {
    const gate = files.path('gpus');
    const refs = [0, 1].map(() => gatedContext.options({ numGpus: 1 }).remote(gate));
    try {
      // Together: each holds its own GPU (run one after the other, they would both see GPU 0).
      await until(() => readdirSync(dirname(gate)).filter((name) => name.startsWith(`${basename(gate)}.`)).length === 2, 'both GPU tasks to start');
      expect(state().nodes[0].resources.available.GPU ?? 0).toBe(0);
    } finally {
      openGate(gate);
    }
    const seen = await get(refs);
    expect(seen.map((s) => s.gpuIds.length)).toEqual([1, 1]);
    expect(new Set(seen.flatMap((s) => s.gpuIds))).toEqual(new Set([0, 1]));
    for (const s of seen) expect(s.cudaVisibleDevices).toBe(s.gpuIds.join(','));
    expect(state().nodes[0].resources.available.GPU).toBe(2);
  });

  it('a fractional GPU task gets one GPU id', async () => {
    const seen = await get(context.options({ numGpus: 0.5 }).remote());
    expect(seen.gpuIds).toHaveLength(1);
    expect(seen.cudaVisibleDevices).toBe(String(seen.gpuIds[0]));
  });

  it('a GPU actor sees all of its GPU ids', async () => {
    const counter = RemoteCounter.options({ numGpus: 2 }).remote(0);
    const seen = await get(counter.context.remote());
    expect([...seen.gpuIds].sort()).toEqual([0, 1]);
    expect(seen.cudaVisibleDevices?.split(',').map(Number).sort()).toEqual([0, 1]);
    expect(state().nodes[0].resources.available.GPU ?? 0).toBe(0);
  });

  it('a CPU task is not shown GPUs it does not hold, even on a worker that ran a GPU task', async () => {
    // The pooled workers ran GPU tasks above; a CPU task sees what a fresh worker would.
    for (let i = 0; i < 4; i++) {
      const seen = await get(context.remote());
      expect(seen.gpuIds).toEqual([]);
      expect(seen.cudaVisibleDevices).toBe(process.env.CUDA_VISIBLE_DEVICES ?? null);
    }
  });
});
