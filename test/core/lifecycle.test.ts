/** init() options, several logical nodes, and a shutdown that leaves nothing behind. */
import { existsSync, rmSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  InvalidArgumentError,
  NotInitializedError,
  get,
  init,
  isInitialized,
  put,
  shutdown,
  state,
  getRuntimeContext,
} from '../../lib/index.js';
import { RemoteCounter } from './fixtures/actors.js';
import { bigArray, context, gated, pid } from './fixtures/core.js';
import { isAlive, ownSockets, shmSegments, until } from './helpers.js';

const ownSegments = () => shmSegments().filter((name) => name.startsWith(`trellis-${process.pid}-`));

/** Everything a run leaves on the host, to compare after shutdown. */
function footprint() {
  const snapshot = state();
  return {
    pids: [...snapshot.workers.map((worker) => worker.pid), ...snapshot.actors.flatMap((actor) => (actor.pid ? [actor.pid] : []))],
    segments: snapshot.nodes.map((node) => node.storeName),
  };
}

async function expectNothingLeft(left: { pids: number[]; segments: string[] }): Promise<void> {
  expect(isInitialized()).toBe(false);
  for (const workerPid of left.pids) expect(isAlive(workerPid), `worker ${workerPid} still alive`).toBe(false);
  for (const segment of left.segments) {
    expect(existsSync(join('/dev/shm', segment)), `segment ${segment}`).toBe(false);
    expect(existsSync(join(tmpdir(), `${segment}-spill`)), `spill directory of ${segment}`).toBe(false);
  }
  expect(ownSegments()).toEqual([]);
  expect(ownSockets()).toEqual([]);
}

describe('init and shutdown', () => {
  afterEach(async () => {
    await shutdown();
  });

  it('returns a session that shuts the cluster down with an `await using` scope, and only that cluster', async () => {
    let pids: number[];
    {
      await using session = await init({ numCpus: 1 });
      expect(await get(put(3))).toBe(3);
      pids = footprint().pids;
      expect(typeof session.shutdown).toBe('function');
    }
    expect(isInitialized()).toBe(false);
    for (const workerPid of pids) expect(isAlive(workerPid)).toBe(false);
    const earlier = await init({ numCpus: 1 });
    await shutdown();
    await init({ numCpus: 1 });
    await earlier[Symbol.asyncDispose]();
    expect(isInitialized()).toBe(true);
  });

  it('applies numCpus, numGpus, custom resources and objectStoreMemory, and prestarts workers', async () => {
    expect(ownSegments()).toEqual([]);
    await init({ numCpus: 3, numGpus: 2, resources: { accelerator: 4, 'region:eu': 1 }, objectStoreMemory: 64 << 20 });
    expect(isInitialized()).toBe(true);
    const snapshot = state();
    expect(snapshot.nodes).toHaveLength(1);
    const [node] = snapshot.nodes;
    expect(node.nodeId).toBe('node-0');
    expect(node.resources.total).toMatchObject({ CPU: 3, GPU: 2, accelerator: 4, 'region:eu': 1 });
    expect(node.resources.available).toMatchObject({ CPU: 3, GPU: 2, accelerator: 4, 'region:eu': 1 });
    expect(node.store.capacity).toBeGreaterThan(32 << 20);
    expect(node.store.capacity).toBeLessThanOrEqual(64 << 20);
    // Prestarted: one worker per CPU up to the host's cores, each a live child process, before any task ran.
    const prestarted = Math.min(3, availableParallelism());
    expect(snapshot.workers).toHaveLength(prestarted);
    for (const worker of snapshot.workers) {
      expect(worker.pid).not.toBe(process.pid);
      expect(isAlive(worker.pid)).toBe(true);
      expect(worker.nodeId).toBe('node-0');
    }
    expect(getRuntimeContext()).toMatchObject({ isDriver: true, nodeId: 'node-0' });
    expect(ownSockets()).toHaveLength(1);
    expect(ownSegments()).toEqual([node.storeName]);
    // One cluster per driver at a time; the running one is unharmed by a refused init.
    await expect(init({ numCpus: 1 })).rejects.toBeInstanceOf(InvalidArgumentError);
    expect(await get(put(41))).toBe(41);
    expect(state().workers).toHaveLength(prestarted);
  });

  it('shutdown stops every worker and actor process and removes segments and sockets', async () => {
    await init({ numCpus: 2 });
    const counter = RemoteCounter.remote(0);
    expect(await get(counter.increment.remote(1))).toBe(1);
    // Something in the store when shutdown comes.
    const stored = bigArray.remote(50_000);
    expect((await get(stored)).length).toBe(50_000);
    const taskPid = await get(pid.remote());
    // A task still running (its gate never opens) and its pending get, when shutdown comes.
    const gate = join(tmpdir(), `trellis-core-test-never-${process.pid}`);
    const running = gated.remote(gate, 'never');
    await until(() => existsSync(`${gate}.started`), 'the gated task to start');
    const pending = get(running);
    const left = footprint();
    expect(left.pids).toContain(taskPid);
    expect(left.pids.length).toBeGreaterThanOrEqual(3);
    await shutdown();
    await expect(pending).rejects.toMatchObject({ code: 'ERR_SHUTDOWN', message: expect.stringMatching(/shut down/) });
    rmSync(`${gate}.started`, { force: true });
    await expectNothingLeft(left);
  });

  it('runs several logical nodes, each with its resources, workers and store segment', async () => {
    await init({
      nodes: [
        { numCpus: 1 },
        { id: 'gpu-node', numCpus: 1, numGpus: 1, resources: { accelerator: 1 } },
      ],
    });
    const snapshot = state();
    expect(snapshot.nodes.map((node) => node.nodeId)).toEqual(['node-0', 'gpu-node']);
    expect(snapshot.nodes[0].resources.total).toMatchObject({ CPU: 1 });
    expect(snapshot.nodes[0].resources.total.GPU ?? 0).toBe(0);
    expect(snapshot.nodes[1].resources.total).toMatchObject({ CPU: 1, GPU: 1, accelerator: 1 });
    expect(new Set(snapshot.nodes.map((node) => node.storeName)).size).toBe(2);
    expect(snapshot.workers.filter((worker) => worker.nodeId === 'node-0')).toHaveLength(1);
    expect(snapshot.workers.filter((worker) => worker.nodeId === 'gpu-node')).toHaveLength(1);
    const onGpuNode = await get(context.options({ resources: { accelerator: 1 } }).remote());
    expect(onGpuNode.nodeId).toBe('gpu-node');
    const left = footprint();
    await shutdown();
    await expectNothingLeft(left);
  });

  it('is unusable after shutdown and can be started again', async () => {
    await init({ numCpus: 1 });
    await shutdown();
    expect(() => put(1)).toThrow(NotInitializedError);
    expect(() => pid.remote()).toThrow(NotInitializedError);
    expect(() => state()).toThrow(NotInitializedError);
    await shutdown(); // a second shutdown is harmless
    await init({ numCpus: 1 });
    expect(typeof (await get(pid.remote()))).toBe('number');
  });
});
