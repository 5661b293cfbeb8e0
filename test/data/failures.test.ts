/**
 * Failures: a user function's exception names the operator, the block and the rows (or is
 * counted and skipped within maxErroredBlocks), a worker killed mid-map or mid-write is retried,
 * reads and sources that fail, and sinks that fail (onWriteFailed).
 */
import { describe, expect, it } from 'vitest';
import { DataError, WorkerCrashedError, fromItems, range, readDatasource, state, type JobProgress, type Row } from '../../lib/index.js';
import { BadSource, BytesSource, CountingSink, FailingSource, GatedSink, failOn, gatedGroup, gatedRow, isEven, withParity } from './fixtures/udfs.js';
import { isAlive, openGate, rejection, startedPids, until, useDataCluster } from './helpers.js';

const { scratchDir } = useDataCluster({ numCpus: 2 }, () => until(() => Object.values(state().tasks).every((count) => count === 0), 'no task left running'));

const items = (n: number) => Array.from({ length: n }, (_, id) => ({ id }));
const sequence = (n: number) => Array.from({ length: n }, (_, index) => index);
const ids = (rows: Row[]) => rows.map((row) => row.id as number).sort((a, b) => a - b);

/** SIGKILLs the first worker that reached `gate`, and waits for it to be gone. */
async function killFirstStarted(gate: string): Promise<void> {
  await until(() => startedPids(gate).length >= 1, 'a task to reach its gate');
  const [victim] = startedPids(gate);
  process.kill(victim, 'SIGKILL');
  await until(() => !isAlive(victim), 'the worker to die');
}

describe('exceptions in user functions', () => {
  it('fail the job naming the operator, the block and the row, with the original error as cause', async () => {
    const error = await rejection(fromItems(items(100), { parallelism: 10 }).map(failOn, { fnArgs: [57] }).takeAll());
    expect(error).toBeInstanceOf(DataError);
    expect(error.code).toBe('ERR_DATA_UDF_FAILED');
    expect(error.operator).toBe('Map(failOn)');
    expect(error.block).toBe(5);
    expect(error.rows).toEqual([57, 58]);
    expect(error.message).toContain('Map(failOn)');
    expect(error.message).toContain('block 5');
    expect(error.message).toContain('row 57');
    expect(error.cause.message).toBe('bad row 57');
    expect(error.cause.code).toBe('E_BAD_ROW');
  });

  it('in a map fused into a read: the read task, and the row of the dataset', async () => {
    const error = await rejection(range(100, { parallelism: 4 }).map(failOn, { fnArgs: [57] }).count());
    expect(error.operator).toBe('ReadRange->Map(failOn)');
    expect(error.block).toBe(2);
    expect(error.message).toContain('read task 2');
    expect(error.rows).toEqual([57, 58]);
    // After a filter, rows count in the failing stage's own input.
    const filtered = await rejection(range(100, { parallelism: 4 }).filter(isEven).map(failOn, { fnArgs: [58] }).count());
    expect(filtered.operator).toBe('ReadRange->Filter(isEven)->Map(failOn)');
    expect(filtered.rows).toEqual([4, 5]);
    expect(filtered.message).toContain("row 4 of Map(failOn)'s input in that read task");
  });

  it('with maxErroredBlocks, failing blocks are counted and skipped', async () => {
    const ds = fromItems(items(100), { parallelism: 10 }).map(failOn, { fnArgs: [57] });
    const rows = await ds.takeAll({ maxErroredBlocks: 1 });
    expect(ids(rows)).toEqual(sequence(100).filter((id) => id < 50 || id >= 60));
    expect(ds.stats()?.erroredBlocks).toBe(1);
    // A second failing block is one too many.
    const twice = fromItems(items(100), { parallelism: 10 }).map(failOn, { fnArgs: [57] }).map(failOn, { fnArgs: [23] });
    const error = await rejection(twice.takeAll({ maxErroredBlocks: 1 }));
    expect(error.code).toBe('ERR_DATA_UDF_FAILED');
  });

  it('a read that throws names the read operator and keeps the cause', async () => {
    const error = await rejection(readDatasource(new FailingSource()).takeAll());
    expect(error).toBeInstanceOf(DataError);
    expect(error.operator).toBe('ReadFailingSource');
    expect(error.block).toBe(1);
    expect(error.cause.message).toBe('connection reset by peer');
    expect(error.cause.code).toBe('ECONNRESET');
    const bad = await rejection(readDatasource(new BadSource()).count());
    expect(bad.code).toBe('ERR_DATA_SOURCE');
  });
});

describe('workers that die', () => {
  it('a map task whose worker is killed is retried: every row exactly once', async () => {
    const gate = scratchDir.path('kill-task');
    const rows = fromItems(items(40), { parallelism: 4 }).map(gatedRow, { fnArgs: [gate] }).takeAll();
    try {
      await killFirstStarted(gate);
    } finally {
      openGate(gate);
    }
    expect(ids(await rows)).toEqual(sequence(40));
  });

  it('a mapGroups reduce task whose worker is killed is retried: every row exactly once', async () => {
    const gate = scratchDir.path('kill-groups');
    const rows = fromItems(items(40), { parallelism: 4 }).map(withParity).groupBy('parity').mapGroups(gatedGroup, { batchFormat: 'rows', fnArgs: [gate] }).takeAll();
    try {
      await killFirstStarted(gate);
    } finally {
      openGate(gate);
    }
    expect(ids(await rows).sort((a, b) => a - b)).toEqual(sequence(40));
  });

  /**
   * A progress reporter that SIGKILLs a worker running the shuffle's map tasks, once. It asks for
   * an update every 5 ms, so that a cutting phase of any length is seen (under load the phase
   * only grows), and the job's stall timeout stays far above any pause a busy machine makes.
   */
  function killDuringShuffleMap(): { reporter: { updateIntervalMs: number; update(progress: JobProgress): void; finish(): void }; killed: () => number } {
    let killed = 0;
    const reporter = {
      updateIntervalMs: 5,
      update(progress: JobProgress) {
        const shuffle = progress.operators.find((operator) => operator.name === 'RandomShuffle');
        if (killed || !shuffle?.phase?.startsWith('cutting') || shuffle.activeTasks === 0) return;
        const worker = state().workers.find((candidate) => candidate.state === 'leased');
        if (!worker) return;
        killed = worker.pid;
        process.kill(worker.pid, 'SIGKILL');
      },
      finish() {},
    };
    return { reporter, killed: () => killed };
  }

  it("a shuffle whose map task's worker is killed mid-job retries the task: every row once", async () => {
    const MiB = 1 << 20;
    const { reporter, killed } = killDuringShuffleMap();
    const blocks = 48;
    const total = await readDatasource(new BytesSource(blocks, 1, MiB))
      .randomShuffle({ seed: 5, numBlocks: 16 })
      .sum('x', { progress: reporter, stallTimeoutMs: 30_000, minBlockBytes: MiB, maxBlockBytes: MiB });
    const rows = (blocks * MiB) / 8;
    expect(killed()).toBeGreaterThan(0);
    expect(total).toBe((rows * (rows - 1)) / 2);
  });

  it('with maxRetries: 0, a killed map task fails the shuffle naming the operator and its phase', async () => {
    const MiB = 1 << 20;
    const { reporter, killed } = killDuringShuffleMap();
    const error = await rejection(
      readDatasource(new BytesSource(48, 1, MiB))
        .randomShuffle({ seed: 5, numBlocks: 16 })
        .sum('x', { progress: reporter, stallTimeoutMs: 30_000, minBlockBytes: MiB, maxBlockBytes: MiB, maxRetries: 0 }),
    );
    expect(killed()).toBeGreaterThan(0);
    expect(error).toBeInstanceOf(DataError);
    expect(error.code).toBe('ERR_DATA_TASK_FAILED');
    expect(error.operator).toBe('RandomShuffle');
    expect(error.message).toMatch(/RandomShuffle failed while cutting blocks into 16 partitions/);
    expect(error.cause).toBeInstanceOf(WorkerCrashedError);
  });

  it('with maxRetries: 0, a killed worker fails the job naming the operator', async () => {
    const gate = scratchDir.path('kill-no-retry');
    const failing = rejection(fromItems(items(40), { parallelism: 4 }).map(gatedRow, { fnArgs: [gate] }).takeAll({ maxRetries: 0 }));
    try {
      await killFirstStarted(gate);
    } finally {
      openGate(gate);
    }
    const error = await failing;
    expect(error).toBeInstanceOf(DataError);
    expect(error.code).toBe('ERR_DATA_TASK_FAILED');
    expect(error.operator).toBe('Map(gatedRow)');
    expect(error.cause).toBeInstanceOf(WorkerCrashedError);
  });

  /** Writes 40 rows through a GatedSink, SIGKILLing the first writer: every row once, one write as attempt 1. */
  async function expectWriteRetried(gateName: string, write: (sink: GatedSink) => Promise<Array<{ rows: number; attempt: number }>>) {
    const gate = scratchDir.path(gateName);
    const sink = new GatedSink(gate);
    const writing = write(sink);
    try {
      await killFirstStarted(gate);
    } finally {
      openGate(gate);
    }
    const results = await writing;
    expect(results.reduce((sum, result) => sum + result.rows, 0)).toBe(40);
    expect(results.some((result) => result.attempt === 1)).toBe(true);
    expect(sink.completed).toEqual(results);
  }

  it('a write task whose worker is killed is retried as attempt 1', async () => {
    // After a limit, the write is an operator of its own (its tasks retried by the executor).
    await expectWriteRetried('kill-write', (sink) => range(40, { parallelism: 2 }).limit(40).write(sink));
  });

  it('a sink fused into its read task sees attempt 1 after the worker is killed', async () => {
    // No operator between the read and the sink: the write runs inside the read task.
    await expectWriteRetried('kill-fused-write', (sink) => range(40, { parallelism: 2 }).write(sink));
  });
});

describe('sinks that fail', () => {
  it('a failing write() calls onWriteFailed in the driver and rejects', async () => {
    const sink = new CountingSink(2);
    const error = await rejection(range(100, { parallelism: 4 }).write(sink));
    expect(error).toBeInstanceOf(DataError);
    expect(error.code).toBe('ERR_DATA_UDF_FAILED');
    expect(error.operator).toBe('ReadRange->Write(CountingSink)');
    expect(error.cause.message).toBe('sink refused task 2');
    expect(error.cause.code).toBe('E_SINK');
    expect(sink.started).toBe(1);
    expect(sink.failed).toBe(error);
    expect(sink.completed).toBeUndefined();
  });

  it('a separate write operator fails the same way', async () => {
    const sink = new CountingSink(1);
    const error = await rejection(range(100, { parallelism: 4 }).limit(100).write(sink));
    expect(error.operator).toBe('Write(CountingSink)');
    expect(sink.failed).toBe(error);
    expect(sink.completed).toBeUndefined();
  });

  it('a failing upstream stage also reaches onWriteFailed', async () => {
    const sink = new CountingSink();
    const error = await rejection(range(100, { parallelism: 4 }).map(failOn, { fnArgs: [3] }).write(sink));
    expect(error.operator).toBe('ReadRange->Map(failOn)->Write(CountingSink)');
    expect(sink.failed).toBe(error);
  });
});
