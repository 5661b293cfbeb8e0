/**
 * Scheduling across logical nodes: custom resources, fractional CPUs and GPUs, SPREAD, node
 * affinity (hard and soft), data locality, actor placement, and objects copied between the
 * nodes' store segments.
 */
import { readdirSync } from 'node:fs';
import { basename, dirname } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InfeasibleTaskError, free, get, init, shutdown, state, type ObjectRef } from '../../lib/index.js';
import { RemoteCounter } from './fixtures/actors.js';
import { bigArray, context, gated, gatedContext, sumArray, whereIs } from './fixtures/core.js';
import { openGate, rejection, scratch, started, until } from './helpers.js';

const files = scratch();

beforeAll(async () => {
  await init({
    nodes: [
      { numCpus: 2 },
      { numCpus: 2, numGpus: 1, resources: { accelerator: 2 } },
    ],
  });
});

afterAll(async () => {
  await shutdown();
  files.cleanup();
});

const node = (nodeId: string) => state().nodes.find((candidate) => candidate.nodeId === nodeId)!;
const storeCount = (nodeId: string) => node(nodeId).store.objectCount;
/** How many `gatedContext` tasks on `gate` have started (each leaves `${gate}.<pid>.started`). */
const startedOn = (gate: string) => readdirSync(dirname(gate)).filter((name) => name.startsWith(`${basename(gate)}.`)).length;

describe('resources', () => {
  it('a custom resource sends the task to the node that has it', async () => {
    for (let i = 0; i < 3; i++) {
      expect((await get(context.options({ resources: { accelerator: 1 } }).remote())).nodeId).toBe('node-1');
    }
    expect((await get(context.options({ numGpus: 1 }).remote())).nodeId).toBe('node-1');
  });

  it('fractional CPUs: four half-CPU tasks run together on a two-CPU node', async () => {
    const gate = files.path('half-cpu');
    const refs = Array.from({ length: 4 }, () =>
      gatedContext.options({ numCpus: 0.5, schedulingStrategy: { type: 'node', nodeId: 'node-0' } }).remote(gate),
    );
    try {
      // All four hold their half CPU at once: the gate opens only after each has started.
      await until(() => startedOn(gate) === 4, 'four half-CPU tasks to run at once');
      expect(node('node-0').resources.available.CPU).toBe(0);
    } finally {
      openGate(gate);
    }
    const seen = await get(refs);
    expect(new Set(seen.map((s) => s.pid)).size).toBe(4);
    expect(seen.every((s) => s.nodeId === 'node-0')).toBe(true);
    await until(() => node('node-0').resources.available.CPU === 2, 'the CPUs to come back');
  });

  it('fractional GPUs: two half-GPU tasks share GPU 0', async () => {
    const gate = files.path('half-gpu');
    const refs = [0, 1].map(() => gatedContext.options({ numGpus: 0.5 }).remote(gate));
    try {
      await until(() => startedOn(gate) === 2, 'two half-GPU tasks to run at once');
      expect(node('node-1').resources.available.GPU ?? 0).toBe(0);
    } finally {
      openGate(gate);
    }
    const seen = await get(refs);
    for (const s of seen) {
      expect(s.nodeId).toBe('node-1');
      expect(s.gpuIds).toEqual([0]);
      expect(s.cudaVisibleDevices).toBe('0');
    }
  });
});

describe('strategies', () => {
  it('SPREAD uses every node', async () => {
    const seen = await get(Array.from({ length: 6 }, () => context.options({ schedulingStrategy: 'SPREAD' }).remote()));
    expect(new Set(seen.map((s) => s.nodeId))).toEqual(new Set(['node-0', 'node-1']));
  });

  it('by default, tasks one at a time pack onto the first node', async () => {
    for (let i = 0; i < 5; i++) expect((await get(context.remote())).nodeId).toBe('node-0');
  });

  it('hard node affinity runs every task on that node', async () => {
    const seen = await get(Array.from({ length: 6 }, () => context.options({ schedulingStrategy: { type: 'node', nodeId: 'node-1' } }).remote()));
    expect(seen.every((s) => s.nodeId === 'node-1')).toBe(true);
  });

  it('hard affinity to a node that cannot run the task is InfeasibleTaskError', async () => {
    const missing = await rejection(get(context.options({ schedulingStrategy: { type: 'node', nodeId: 'node-7' } }).remote()));
    expect(missing).toBeInstanceOf(InfeasibleTaskError);
    const lacking = await rejection(
      get(context.options({ resources: { accelerator: 1 }, schedulingStrategy: { type: 'node', nodeId: 'node-0' } }).remote()),
    );
    expect(lacking).toBeInstanceOf(InfeasibleTaskError);
    expect(lacking.missing).toEqual({ accelerator: 1 });
  });

  it('soft affinity falls back to another node when its node cannot run the task', async () => {
    const lacking = await get(context.options({ resources: { accelerator: 1 }, schedulingStrategy: { type: 'node', nodeId: 'node-0', soft: true } }).remote());
    expect(lacking.nodeId).toBe('node-1');
    const unknown = await get(context.options({ schedulingStrategy: { type: 'node', nodeId: 'node-7', soft: true } }).remote());
    expect(['node-0', 'node-1']).toContain(unknown.nodeId);
    // Its node busy: both of node-1's CPUs are held.
    const gates = [files.path('busy'), files.path('busy')];
    const holders = gates.map((gate) => gated.options({ schedulingStrategy: { type: 'node', nodeId: 'node-1' } }).remote(gate, 'held'));
    try {
      await until(() => gates.every(started), 'node-1 to be busy');
      const busy = await get(context.options({ schedulingStrategy: { type: 'node', nodeId: 'node-1', soft: true } }).remote());
      expect(busy.nodeId).toBe('node-0');
      const preferred = await get(context.options({ schedulingStrategy: { type: 'node', nodeId: 'node-0', soft: true } }).remote());
      expect(preferred.nodeId).toBe('node-0');
    } finally {
      for (const gate of gates) openGate(gate);
    }
    expect(await get(holders)).toEqual(['held', 'held']);
  });

  it('actors are placed by their resources and affinity', async () => {
    const accelerated = RemoteCounter.options({ resources: { accelerator: 1 } }).remote(0);
    expect((await get(accelerated.context.remote())).nodeId).toBe('node-1');
    const pinned = RemoteCounter.options({ schedulingStrategy: { type: 'node', nodeId: 'node-0' } }).remote(0);
    expect((await get(pinned.context.remote())).nodeId).toBe('node-0');
    expect(state().actors.find((actor) => actor.actorId === accelerated.actorId)?.nodeId).toBe('node-1');
    expect(node('node-1').resources.available.accelerator).toBe(1);
  });
});

describe('objects across nodes', () => {
  it('a big value produced on node-0 is copied into node-1\'s segment for a task there', async () => {
    const before = { 'node-0': storeCount('node-0'), 'node-1': storeCount('node-1') };
    const produced = bigArray.options({ schedulingStrategy: { type: 'node', nodeId: 'node-0' } }).remote(100_000);
    const consumed = sumArray.options({ schedulingStrategy: { type: 'node', nodeId: 'node-1' } }).remote(produced);
    expect(await get(consumed)).toEqual({ total: (99_999 * 100_000) / 2, zeroCopy: true });
    expect(storeCount('node-0')).toBe(before['node-0'] + 1);
    expect(storeCount('node-1')).toBe(before['node-1'] + 1);
    // The driver reads it too; freeing the last handles deletes both copies.
    expect(((await get(produced)) as Float64Array)[99_999]).toBe(99_999);
    free([consumed, produced]);
    expect(storeCount('node-0')).toBe(before['node-0']);
    expect(storeCount('node-1')).toBe(before['node-1']);
  });

  it('a value produced on node-1 is read by the driver and by tasks on node-0', async () => {
    using produced = bigArray.options({ schedulingStrategy: { type: 'node', nodeId: 'node-1' } }).remote(50_000);
    const values = (await get(produced)) as Float64Array;
    expect(values.length).toBe(50_000);
    using read = whereIs.options({ schedulingStrategy: { type: 'node', nodeId: 'node-0' } }).remote(produced);
    expect(await get(read)).toEqual({ nodeId: 'node-0', length: 50_000, last: 49_999 });
  });

  it('by default a task runs where its big argument already is (data locality)', async () => {
    using produced = bigArray.options({ schedulingStrategy: { type: 'node', nodeId: 'node-1' } }).remote(100_000);
    await get(produced as ObjectRef<unknown>);
    const before = storeCount('node-0');
    using read = whereIs.remote(produced);
    expect((await get(read)).nodeId).toBe('node-1');
    expect(storeCount('node-0')).toBe(before);
  });
});
