/**
 * Batch jobs that lose a node: three node agents (separate processes with stores of their own, as
 * on other hosts), one killed after its blocks were made. The blocks it held alone are made again
 * from lineage (read and map tasks rerun under the same ids; an actor pool's batches by a task that
 * builds the pool's class, or on a live actor of the pool), so every row arrives exactly once.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { buildLLMProcessor, events, init, range, readDatasource, state, waitForNodes, type ClusterSession, type JobProgress, type ProgressReporter } from '../../lib/index.js';
import { NodeTagger, doubleId, promptOf } from '../core/fixtures/nodes.js';
import { openGate, scratch, trellisCli, until } from '../core/helpers.js';
import { TINY_LLAMA, randomWeights, referenceGenerate, writeCheckpoint } from '../llm/fixtures/decoders.js';
import { GatedSource } from './fixtures/udfs.js';

const TOKEN = 'node-loss-token';

describe('batch jobs that lose a node', () => {
  let session: ClusterSession;
  let port: number;
  const agents = new Map<string, ChildProcess>();
  const files = scratch();
  const reruns: string[] = [];
  const removed: string[] = [];

  function startAgent(id: string): ChildProcess {
    const agent = spawn(process.execPath, [
      ...trellisCli, 'node', '--head', `127.0.0.1:${port}`, '--id', id, '--num-cpus', '1', '--num-gpus', '0',
      '--resources', JSON.stringify({ pool: 1 }), '--object-store-memory', String(64 * 1024 * 1024), '--once',
    ], { env: { ...process.env, TRELLIS_CLUSTER_TOKEN: TOKEN }, stdio: ['ignore', 'inherit', 'inherit'] });
    agents.set(id, agent);
    return agent;
  }

  async function kill(id: string): Promise<void> {
    agents.get(id)!.kill('SIGKILL');
    await until(() => removed.includes(id), `${id} to leave`);
  }

  beforeAll(async () => {
    // No CPUs of the driver's own: whatever needs one runs on the agents.
    session = await init({ numCpus: 0, prestartWorkers: 1, listen: { host: '127.0.0.1', port: 0, token: TOKEN } });
    port = state().listening!.port;
    for (const id of ['a', 'b', 'c']) startAgent(id);
    await waitForNodes(4, { timeout: 60_000 });
    events().on('reconstruct', ({ task }: { task: string }) => reruns.push(task));
    events().on('node-removed', ({ nodeId }: { nodeId: string }) => removed.push(nodeId));
  }, 90_000);

  afterAll(async () => {
    await session?.shutdown();
    for (const agent of agents.values()) if (agent.exitCode === null) agent.kill('SIGKILL');
    files.cleanup();
  });

  // Each test kills agent c: the next one starts with it back.
  beforeEach(async () => {
    if (agents.get('c')?.exitCode === null && state().nodes.some((node) => node.nodeId === 'c')) return;
    await until(() => !state().nodes.some((node) => node.nodeId === 'c'), 'c to leave');
    startAgent('c');
    await waitForNodes(4, { timeout: 60_000 });
  }, 90_000);

  /**
   * A progress reporter that tells how many of the pool's actors are ready (their class built):
   * the pool gives batches to those only, so a test opens its gate once all are.
   */
  function readyActors(): { reporter: ProgressReporter; ready: () => number } {
    let ready = 0;
    const seen = (progress: JobProgress) => {
      for (const operator of progress.operators) if (operator.actors) ready = operator.actors.running;
    };
    return { reporter: { update: seen, finish: seen }, ready: () => ready };
  }

  it("makes a materialized dataset's blocks again when the node holding them dies", async () => {
    // Read once a pool actor is up on each agent, mapped where each block was read, two calls at
    // a time per actor (as an LLM engine's pool runs: each call names the blocks it stores).
    const gate = files.path('materialize-gate');
    const source = new GatedSource(30_000, 2_500, Object.fromEntries(Array.from({ length: 12 }, (_, index) => [index, gate])));
    const { reporter, ready } = readyActors();
    // Each actor's first batches wait until all three have one: a loaded machine can read every
    // block on a and b, and c's actor must still map some for its loss to matter.
    const meeting = { folder: files.path('materialize-meeting'), nodes: 3 };
    mkdirSync(meeting.folder);
    const pending = readDatasource(source)
      .map(doubleId)
      .mapBatches(NodeTagger, { concurrency: 3, numCpus: 0, resources: { pool: 1 }, batchSize: null, maxConcurrency: 2, constructorArgs: [undefined, meeting] })
      .materialize({ progress: reporter });
    await until(() => ready() === 3, 'a pool actor ready on each agent');
    openGate(gate);
    // Not read yet (a read in the driver would copy every block to its store): the blocks
    // mapped on c are there alone.
    const materialized = await pending;
    reruns.length = 0;
    await kill('c');
    const rows = await materialized.takeAll();
    expect(rows.map((row) => row.id as number).sort((x, y) => x - y)).toEqual(Array.from({ length: 30_000 }, (_, id) => id));
    expect(rows.every((row) => row.scaled === (row.id as number) * 3)).toBe(true);
    expect(rows.some((row) => row.nodeId === 'c')).toBe(false);
    // Its lost batches ran again: as tasks that build the pool's class once the pool has gone,
    // or on one of its actors while they are still being stopped.
    expect(reruns.some((task) => task === 'NodeTagger (rerun)' || task === 'DataPoolActor.process')).toBe(true);
  }, 90_000);

  it('streams every row exactly once through a pool while a node dies', async () => {
    const seen = new Uint8Array(60_000);
    let rowsRead = 0;
    removed.length = 0;
    for await (const row of range(60_000, { parallelism: 12 }).mapBatches(NodeTagger, { concurrency: 3, numCpus: 0, resources: { pool: 1 }, batchSize: 2500 }).iterRows()) {
      seen[row.id as number]++;
      if (++rowsRead === 5000) agents.get('c')!.kill('SIGKILL');
    }
    expect(seen.every((count) => count === 1)).toBe(true);
    await until(() => removed.includes('c'), 'c to leave');
  }, 90_000);

  it("makes an LLM processor's outputs again when the node holding them dies, token for token", async () => {
    const weights = randomWeights(TINY_LLAMA, 6);
    const checkpoint = await writeCheckpoint(files.path('llama'), TINY_LLAMA, weights, { prefix: 'model.' });
    const prompts = [[5, 17, 3], [42, 1], [9, 8, 7, 6], [60]];
    const gate = files.path('llm-gate');
    const source = new GatedSource(24, 2, Object.fromEntries(Array.from({ length: 12 }, (_, index) => [index, gate])));
    // One batch at a time per engine, all three up before the first: each engine maps some.
    const { reporter, ready } = readyActors();
    const pending = buildLLMProcessor({ checkpoint, maxNewTokens: 4, concurrency: 3, batchSize: 2, batchesPerReplica: 1 })(
      readDatasource(source, { numCpus: 0 }).map(promptOf, { numCpus: 0 }),
    ).materialize({ progress: reporter });
    await until(() => ready() === 3, 'an engine ready on each agent', 60_000);
    openGate(gate);
    const materialized = await pending;
    reruns.length = 0;
    removed.length = 0;
    await kill('c');
    const rows = await materialized.takeAll();
    expect(rows.map((row) => row.id as number).sort((x, y) => x - y)).toEqual(Array.from({ length: 24 }, (_, id) => id));
    for (const row of rows) {
      expect(Array.from(row.generatedTokens as number[])).toEqual(referenceGenerate(TINY_LLAMA, weights, prompts[(row.id as number) % prompts.length], 4));
    }
    expect(reruns.some((task) => task === 'LLMEngine (rerun)' || task === 'DataPoolActor.process')).toBe(true);
  }, 120_000);
});
