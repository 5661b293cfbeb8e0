/**
 * The streaming executor: the memory budget (a dataset ten times the budget through a map, with
 * the store's use sampled all along), block sizing, progress snapshots and statistics, ordering,
 * and the watchdog.
 */
import { describe, expect, it } from 'vitest';
import { DataContext, DataStallError, fromItems, range, readDatasource, state, type Row } from '../../lib/index.js';
import { BytesSource, CountingModel, CountingSink, NumbersSource, SlowModel, StuckModel, double, gatedRow, identity, plusOne, stuck, viewInfo } from './fixtures/udfs.js';
import { RecordingReporter, isAlive, openGate, rejection, startedPids, until, useDataCluster } from './helpers.js';

const MiB = 1 << 20;
const { scratchDir } = useDataCluster({ numCpus: 2, objectStoreMemory: 64 * MiB });

/** Samples the store's bytes in use (above what was there before) while `run` runs. */
async function peakStoreUse<T>(run: () => Promise<T>): Promise<{ value: T; peak: number; samples: number }> {
  const base = state().nodes[0].store.bytesInUse;
  let peak = 0;
  let samples = 0;
  const sample = () => {
    peak = Math.max(peak, state().nodes[0].store.bytesInUse - base);
    samples++;
  };
  const timer = setInterval(sample, 2);
  try {
    const value = await run();
    sample();
    return { value, peak, samples };
  } finally {
    clearInterval(timer);
  }
}

describe('stats', () => {
  it("summarize the job: rows and rate, each operator's tasks and their times, a write job's rows written", async () => {
    const dataset = range(400, { parallelism: 8 }).map(double).mapBatches(CountingModel, { concurrency: 1, batchSize: 50, batchFormat: 'rows' });
    const rows = await dataset.takeAll();
    expect(rows).toHaveLength(400);
    const stats = dataset.stats()!;
    const [read, pool] = stats.operators;
    expect(read.taskTime).toMatchObject({ tasks: 8 });
    expect(read.taskTime!.maxMs).toBeGreaterThanOrEqual(read.taskTime!.meanMs);
    expect(read.taskTime!.totalMs).toBeCloseTo(read.taskTime!.meanMs * 8, 6);
    expect(pool.taskTime!.tasks).toBeGreaterThanOrEqual(1);
    const lines = stats.summary.split('\n');
    expect(lines[0]).toMatch(/^Dataset\.\w+: 400 rows out in [0-9.]+ m?s \([0-9,]+ rows\/s\); store peak [0-9.]+ [KMG]?B of a [0-9.]+ [KMG]?B budget$/);
    expect(lines[1]).toMatch(/^  0 ReadRange->Map\(double\): 8 tasks; 400 rows in [0-9.]+ m?s .*per task mean [0-9.]+ m?s, max [0-9.]+ m?s, [0-9.]+ m?s in all$/);
    expect(lines[2]).toMatch(/^  1 MapBatches\(CountingModel\): \d+ calls on up to 1 actors; 400 rows in .*; rows 400; batches 8/);

    const sink = new CountingSink();
    const written = range(100, { parallelism: 4 }).map(double);
    await written.write(sink, { progress: false });
    expect(written.stats()!.summary.split('\n')[0]).toMatch(/^Dataset\.write\(CountingSink\): 100 rows written in /);
  });
});

describe('memory budget', () => {
  it('a dataset ten times the budget streams through a map with the store under the budget', async () => {
    const budget = 8 * MiB;
    const blockBytes = MiB;
    const blocks = 80; // 80 MiB in all: ten times the budget
    const spilledBefore = state().nodes[0].store.totalSpilledObjects;
    const reporter = new RecordingReporter();
    const ds = readDatasource(new BytesSource(blocks, 1, blockBytes)).mapBatches(plusOne, { batchSize: null, numCpus: 0.5 });
    const options = { memoryBudgetBytes: budget, minBlockBytes: MiB, maxBlockBytes: blockBytes, progress: reporter };
    const { value: rows, peak, samples } = await peakStoreUse(() => ds.count(options));
    expect(rows).toBe((blocks * blockBytes) / 8);
    expect(samples).toBeGreaterThan(10);
    // The store never held more of the job's blocks than the budget allows, and spilled nothing.
    expect(peak).toBeLessThanOrEqual(budget);
    expect(peak).toBeGreaterThan(blockBytes);
    expect(state().nodes[0].store.totalSpilledObjects).toBe(spilledBefore);
    const stats = ds.stats()!;
    expect(stats.peakBudgetBytes).toBeLessThanOrEqual(budget);
    expect(stats.rowsOut).toBe(rows);
    expect(stats.operators.map((operator) => operator.name)).toEqual(['ReadBytesSource', 'MapBatches(plusOne)']);
    // The read was held back by the budget at some point.
    expect(reporter.snapshots.some((snapshot) => snapshot.operators[0].backpressure === 'memory budget')).toBe(true);
    expect(reporter.snapshots.every((snapshot) => snapshot.budgetBytes === budget && snapshot.storeBytes <= budget)).toBe(true);
  });

  it('a shuffle of more than the whole store holds its input outside the budget, spilling to disk', async () => {
    const blocks = 80; // 80 MiB staged in a 64 MiB store
    const spilledBefore = state().nodes[0].store.totalSpilledObjects;
    const ds = readDatasource(new BytesSource(blocks, 1, MiB)).randomShuffle({ seed: 7 });
    const total = await ds.sum('x', { memoryBudgetBytes: 8 * MiB, minBlockBytes: MiB, maxBlockBytes: MiB });
    const rows = (blocks * MiB) / 8;
    expect(total).toBe((rows * (rows - 1)) / 2);
    expect(state().nodes[0].store.totalSpilledObjects).toBeGreaterThan(spilledBefore);
  });

  it('the same through a sink fused into the map (five times the budget)', async () => {
    const budget = 8 * MiB;
    const blockBytes = MiB;
    const sink = new CountingSink();
    const ds = readDatasource(new BytesSource(20, 2, blockBytes)).mapBatches(plusOne, { batchSize: null, numCpus: 0.5 });
    const { value: results, peak } = await peakStoreUse(() => ds.write(sink, { memoryBudgetBytes: budget, minBlockBytes: MiB, maxBlockBytes: blockBytes }));
    expect(results.reduce((sum, result) => sum + result.rows, 0)).toBe((40 * blockBytes) / 8);
    expect(sink.completed).toEqual(results);
    expect(peak).toBeLessThanOrEqual(budget);
    expect(ds.stats()!.peakBudgetBytes).toBeLessThanOrEqual(budget);
  });

  it('the default budget is half the store', async () => {
    const reporter = new RecordingReporter();
    await range(10).map(double).count({ progress: reporter });
    expect(reporter.finished?.progress.budgetBytes).toBe(Math.floor(state().nodes[0].store.capacity / 2));
  });
});

describe('blocks', () => {
  it('defaults: at least 1 MiB, at most 128 MiB', () => {
    expect(DataContext.minBlockBytes).toBe(MiB);
    expect(DataContext.maxBlockBytes).toBe(128 * MiB);
  });

  it('large outputs are split to maxBlockBytes, small ones coalesced toward minBlockBytes', async () => {
    // One read of one 4 MiB block, cut to 1 MiB blocks.
    const split = readDatasource(new BytesSource(1, 1, 4 * MiB));
    const sizes: number[] = [];
    for await (const batch of split.iterBatches({ batchSize: null, batchFormat: 'arrow', maxBlockBytes: MiB })) sizes.push((batch as { numRows: number }).numRows);
    expect(sizes).toEqual([MiB / 8, MiB / 8, MiB / 8, MiB / 8]);
    // A read yielding one row at a time (gathered 4096 rows a block), joined into one block.
    const joined = readDatasource(new NumbersSource(20_000, 20_000));
    const counts: number[] = [];
    for await (const batch of joined.iterBatches({ batchSize: null, batchFormat: 'arrow' })) counts.push((batch as { numRows: number }).numRows);
    expect(counts).toEqual([20_000]);
    // With a small minimum, joined only up to it.
    const small: number[] = [];
    for await (const batch of joined.iterBatches({ batchSize: null, batchFormat: 'arrow', minBlockBytes: 64 * 1024 })) small.push((batch as { numRows: number }).numRows);
    expect(small.length).toBeGreaterThan(1);
    expect(small.reduce((a, b) => a + b, 0)).toBe(20_000);
  });
});

describe('concurrency', () => {
  it('a function transform with concurrency n runs at most n tasks at once', async () => {
    const gate = scratchDir.path('one-at-a-time');
    const rows = fromItems(Array.from({ length: 40 }, (_, id) => ({ id })), { parallelism: 4 }).map(gatedRow, { fnArgs: [gate], concurrency: 1 }).takeAll();
    try {
      await until(() => startedPids(gate).length > 0, 'a task to start');
      // One task submitted: the others wait in the executor, not in the cluster.
      const submitted = Object.values(state().tasks).reduce((sum, count) => sum + count, 0);
      expect(submitted).toBe(1);
    } finally {
      openGate(gate);
    }
    expect((await rows).map((row) => row.id)).toEqual(Array.from({ length: 40 }, (_, id) => id));
  });
});

describe('zero-copy', () => {
  it('a worker reads a block as a view of the store, not a copy', async () => {
    // Not fused into the read (other resources): the map's task reads the block from the store.
    const ds = readDatasource(new BytesSource(1, 1, MiB)).mapBatches(viewInfo, { batchFormat: 'arrow', batchSize: null, numCpus: 0.5 });
    const [info] = await ds.takeAll();
    expect(info.viewBytes).toBe(MiB);
    // The column's buffer is the store's shared memory, not a copy.
    expect(info.storeMemory).toBe(true);
  });
});

describe('progress and statistics', () => {
  it('every operator reports rows, blocks and tasks; stats match the output', async () => {
    const reporter = new RecordingReporter();
    const ds = range(1000, { parallelism: 4 }).map(double).mapBatches(identity, { batchSize: 100, batchFormat: 'arrow', numCpus: 0.5 }).limit(900);
    const rows = await ds.takeAll({ progress: reporter });
    expect(rows.length).toBe(900);
    const final = reporter.finished!.progress;
    expect(reporter.finished!.error).toBeUndefined();
    expect(final.operators.map((operator) => operator.name)).toEqual(['ReadRange->Map(double)', 'MapBatches(identity)', 'Limit(900)']);
    expect(final.operators.every((operator) => operator.done && operator.activeTasks === 0)).toBe(true);
    expect(final.operators[0].rowsTotal).toBe(1000);
    expect(final.operators[0].blocksTotal).toBe(4);
    expect(final.rowsOut).toBe(900);
    const stats = ds.stats()!;
    expect(stats.rowsOut).toBe(900);
    expect(stats.erroredBlocks).toBe(0);
    expect(stats.wallMs).toBeGreaterThan(0);
  });

  it('preserveOrder: false may reorder blocks but keeps every row', async () => {
    const rows = await readDatasource(new NumbersSource(200, 10)).map(double).takeAll({ preserveOrder: false });
    expect(rows.map((row: Row) => row.id as number).sort((a, b) => a - b)).toEqual(Array.from({ length: 200 }, (_, id) => id));
  });
});

describe('watchdog', () => {
  // Input blocks already in the store: the stuck stage is the only work that runs.
  const input = () => fromItems(Array.from({ length: 10 }, (_, id) => ({ id })), { parallelism: 1 });

  it('a task that never finishes fails the job naming its operator, and its worker is stopped', async () => {
    const marker = scratchDir.path('stuck');
    const ds = input().mapBatches(stuck, { batchSize: null, batchFormat: 'arrow', fnArgs: [marker] });
    const error = await rejection(ds.count({ stallTimeoutMs: 500 }));
    expect(error).toBeInstanceOf(DataStallError);
    expect(error.code).toBe('ERR_DATA_STALLED');
    expect(error.operator).toBe('MapBatches(stuck)');
    expect(error.message).toContain('MapBatches(stuck)');
    // The stuck task's worker is killed, not left running it.
    for (const pid of startedPids(marker)) await until(() => !isAlive(pid), 'the stuck worker to be stopped');
    await until(() => Object.values(state().tasks).every((count) => count === 0), 'no task left');
  });

  it('an actor that never finishes fails the job naming the pool; the actor is stopped', async () => {
    const marker = scratchDir.path('stuck-actor');
    const ds = input().mapBatches(StuckModel, { batchSize: null, batchFormat: 'arrow', fnArgs: [marker], concurrency: 1 });
    const error = await rejection(ds.count({ stallTimeoutMs: 500 }));
    expect(error).toBeInstanceOf(DataStallError);
    expect(error.operator).toBe('MapBatches(StuckModel)');
    // The actor started (the watchdog waits for that) and took the batch.
    const [pid] = startedPids(marker);
    expect(pid).toBeGreaterThan(0);
    await until(() => !isAlive(pid), 'the stuck actor to be stopped');
    await until(() => state().actors.every((actor) => actor.state === 'dead'), 'no actor left');
  });

  it('actors still loading their model are not a stall (their start has its own timeout)', async () => {
    // The constructor takes longer than the watchdog's window: the job still completes. (The
    // window still leaves the batch itself a second, on a machine busy with other tests.)
    const ds = input().mapBatches(SlowModel, { constructorArgs: [2500], batchFormat: 'arrow', concurrency: 1 });
    expect(await ds.count({ stallTimeoutMs: 1000 })).toBe(10);
  });
});
