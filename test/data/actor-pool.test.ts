/**
 * Actor pools: actors start before the first batch and load their model once (GPU pools
 * included), pools grow on queued work and shrink when idle, constructors that throw or take too
 * long fail the job naming the class, and a batch whose actor dies is retried on another.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { DataError, fromItems, get, range, readDatasource, state, type Row } from '../../lib/index.js';
import { BrokenModel, CountingModel, GatedSource, RecordingModel, Scaler, SlowModel, double, gatedRow } from './fixtures/udfs.js';
import { RecordingReporter, isAlive, openGate, rejection, startedPids, until, useDataCluster } from './helpers.js';

// Two logical GPUs: pools of GPU actors are scheduled on them like on real ones.
const { scratchDir } = useDataCluster({ numCpus: 2, numGpus: 2 }, () => until(() => state().actors.every((actor) => actor.state === 'dead'), 'every pool actor to stop'));

/** A fresh directory for one test's model-load records. */
function loadsDir(): string {
  const dir = scratchDir.path('loads');
  mkdirSync(dir);
  return dir;
}
/** Model loads recorded in `dir`: pid and the GPU ids that load saw, per load. */
function loads(dir: string): Array<{ pid: number; load: number; gpus: string }> {
  return readdirSync(dir).map((name) => {
    const [, pid, load] = name.split('.');
    return { pid: Number(pid), load: Number(load), gpus: readFileSync(`${dir}/${name}`, 'utf8') };
  });
}
const ids = (rows: Row[]) => rows.map((row) => row.id as number).sort((a, b) => a - b);
const sequence = (n: number) => Array.from({ length: n }, (_, index) => index);

describe('actor pools', () => {
  it('a GPU pool starts its actors before the first batch; each loads its model once, on its own GPU', async () => {
    const dir = loadsDir();
    const gate = scratchDir.path('first-read');
    const marker = scratchDir.path('reads');
    // The only read waits at a gate: no batch exists until it opens.
    const ds = readDatasource(new GatedSource(100, 100, { 0: gate }, marker), { numCpus: 0.5 }).mapBatches(RecordingModel, {
      constructorArgs: [dir],
      concurrency: 2,
      numGpus: 1,
      numCpus: 0.5,
      batchSize: 10,
    });
    const reporter = new RecordingReporter();
    const rows = ds.takeAll({ progress: reporter });
    let loaded: ReturnType<typeof loads>;
    try {
      await until(() => loads(dir).length === 2, 'both actors to load their model');
      await until(() => existsSync(`${marker}.read.0`), 'the read to start');
      expect(reporter.last?.rowsOut ?? 0).toBe(0); // the read waits at its gate: no batch exists yet
      loaded = loads(dir);
      expect(new Set(loaded.map((load) => load.gpus))).toEqual(new Set(['0', '1']));
    } finally {
      openGate(gate);
    }
    const out = await rows;
    expect(ids(out)).toEqual(sequence(100));
    // Every row went through one of the two actors, and each loaded its model exactly once.
    const pids = new Set(out.map((row) => row.pid as number));
    expect([...pids].every((pid) => loaded.some((load) => load.pid === pid))).toBe(true);
    expect(loads(dir)).toHaveLength(2);
    expect(loads(dir).every((load) => load.load === 0)).toBe(true);
    expect(reporter.snapshots.some((snapshot) => snapshot.operators[1].actors?.running === 2)).toBe(true);
    expect(reporter.finished!.progress.operators[1].actors).toMatchObject({ min: 2, max: 2 });
  });

  it("sums the counters its class reports (metrics()) over the pool's actors into the operator's progress", async () => {
    const reporter = new RecordingReporter();
    const rows = await fromItems(sequence(100).map((id) => ({ id }))).mapBatches(CountingModel, { concurrency: 2, batchSize: 10, batchFormat: 'rows' }).takeAll({ progress: reporter });
    expect(rows).toHaveLength(100);
    const metrics = reporter.finished!.progress.operators.at(-1)!.metrics!;
    expect(metrics).toMatchObject({ rows: 100, batches: 10 });
    // Numbers only: the string the class also reported is left out.
    expect(Object.keys(metrics).sort()).toEqual(['batches', 'meanBatch', 'rows']);
  });

  it('a pool whose minimum would hold every CPU leaves one to the read feeding it, and fills once the read is done', async () => {
    // Two actors of one CPU on two CPUs would starve the read tasks (one CPU each) for good.
    const reporter = new RecordingReporter();
    const rows = await range(200, { parallelism: 10 }).map(double).mapBatches(CountingModel, { concurrency: 2, batchSize: 10, batchFormat: 'rows' }).takeAll({ progress: reporter });
    expect(rows.map((row) => row.id).sort((a, b) => (a as number) - (b as number))).toEqual(sequence(200));
    expect(reporter.finished!.progress.warnings.some((warning) => warning.includes('2 actors would hold every CPU and starve the tasks that feed them; it runs 1'))).toBe(true);
    // Each read task ran while one actor worked: the pool never held both CPUs before the read was done.
    const pool = reporter.snapshots.map((snapshot) => ({ read: snapshot.operators[0], actors: snapshot.operators[1].actors! }));
    expect(pool.every(({ read, actors }) => read.blocksDone === read.blocksTotal || actors.running + actors.pending <= 1)).toBe(true);
  });

  it('a pool grows on queued work and shrinks back when idle', async () => {
    const dir = loadsDir();
    const work = scratchDir.path('work');
    const tail = scratchDir.path('tail');
    // Reads 0-4 come at once; read 5 waits for `tail`. Every batch waits for `work`.
    const source = readDatasource(new GatedSource(60, 10, { 5: tail }), { numCpus: 0.5 });
    const ds = source.mapBatches(RecordingModel, {
      constructorArgs: [dir],
      fnArgs: [work],
      concurrency: [1, 2],
      numCpus: 0.5,
      batchSize: 10,
      maxTasksInFlightPerActor: 1,
      actorIdleTimeoutMs: 300,
    });
    const reporter = new RecordingReporter();
    const pool = () => reporter.last?.operators[1].actors;
    const rows = ds.takeAll({ progress: reporter });
    try {
      await scaleUpAndDown();
    } finally {
      openGate(work);
      openGate(tail);
    }
    const out = await rows;
    expect(ids(out)).toEqual(sequence(60));
    // Each actor loaded its model once.
    expect(loads(dir)).toHaveLength(2);
    expect(loads(dir).every((load) => load.load === 0)).toBe(true);

    async function scaleUpAndDown(): Promise<void> {
      // Work queues behind the first actor: the pool grows to its maximum, both actors busy.
      await until(() => startedPids(work).length === 2, 'a second actor to take a batch');
      await until(() => pool()?.running === 2, 'the progress to show two actors');
      expect(reporter.snapshots.every((snapshot) => (snapshot.operators[1].actors?.running ?? 0) + (snapshot.operators[1].actors?.pending ?? 0) <= 2)).toBe(true);
      // At most maxTasksInFlightPerActor batches per actor.
      expect(reporter.snapshots.every((snapshot) => snapshot.operators[1].activeTasks <= 2)).toBe(true);

      // The queued work drains; the tail is still to come, so the job goes on with an idle pool.
      openGate(work);
      await until(() => pool()?.running === 1 && pool()?.pending === 0, 'the pool to shrink to its minimum');
      await until(() => state().actors.filter((actor) => actor.className === 'DataPoolActor' && actor.state !== 'dead').length === 1, 'one actor alive');
    }
  });

  /**
   * Runs `rows` of RecordingModel batches of 10 on one actor behind `gate`, SIGKILLs the actor that
   * takes the first batch, then opens the gate: the job's rows and the killed actor's pid.
   */
  async function killFirstBatchActor(rows: number, parallelism: number, gate: string, dir: string, inflight?: number): Promise<{ out: Row[]; victim: number }> {
    const ds = fromItems(sequence(rows).map((id) => ({ id })), { parallelism }).mapBatches(RecordingModel, {
      constructorArgs: [dir],
      fnArgs: [gate],
      concurrency: 1,
      batchSize: 10,
      maxTasksInFlightPerActor: inflight,
    });
    const running = ds.takeAll();
    let victim: number;
    try {
      await until(() => startedPids(gate).length === 1, 'the actor to take its first batch');
      [victim] = startedPids(gate);
      process.kill(victim, 'SIGKILL');
      await until(() => !isAlive(victim), 'the actor to die');
    } finally {
      openGate(gate);
    }
    return { out: await running, victim: victim! };
  }

  it('a batch whose actor dies is retried on another actor: every row exactly once', async () => {
    const dir = loadsDir();
    const { out, victim } = await killFirstBatchActor(40, 4, scratchDir.path('kill-actor'), dir, 1);
    expect(ids(out)).toEqual(sequence(40));
    // The killed actor finished nothing; a new actor (a second model load) did it all.
    expect(out.some((row) => row.pid === victim)).toBe(false);
    expect(loads(dir)).toHaveLength(2);
  });

  it('the job waits for a retried batch even when it was the last work left', async () => {
    // One block, one batch: when its actor dies, nothing else is queued.
    const { out, victim } = await killFirstBatchActor(10, 1, scratchDir.path('kill-last'), loadsDir());
    expect(ids(out)).toEqual(sequence(10));
    expect(out.some((row) => row.pid === victim)).toBe(false);
  });

  it('a pool the cluster cannot hold fails at once, naming the class and what it needs', async () => {
    const error = await rejection(fromItems(sequence(10)).mapBatches(BrokenModel, { numGpus: 1, concurrency: 3 }).takeAll());
    expect(error).toBeInstanceOf(DataError);
    expect(error.code).toBe('ERR_DATA_ACTOR_START');
    expect(error.message).toContain('BrokenModel');
    expect(error.message).toContain('GPU 1');
    expect(error.message).toContain('holds 2 at most');
  });

  it('a constructor that throws fails the job naming the class', async () => {
    const error = await rejection(fromItems(sequence(10)).mapBatches(BrokenModel, { concurrency: 2 }).takeAll());
    expect(error).toBeInstanceOf(DataError);
    expect(error.code).toBe('ERR_DATA_ACTOR_START');
    expect(error.operator).toBe('MapBatches(BrokenModel)');
    expect(error.message).toContain('BrokenModel');
    expect(error.message).toContain('weights file is missing');
  });

  it('counts actorStartTimeoutMs from when the actor is placed, not while it waits for resources', async () => {
    // Both GPUs held by a task at a gate: the pool's actor, asking for both, waits unplaced.
    const gate = scratchDir.path('gpus-held');
    const holder = gatedRow.options({ numCpus: 0, numGpus: 2 }).remote({ id: -1 }, gate);
    await until(() => state().nodes[0].resources.available.GPU === 0, 'the GPUs to be held');
    const job = fromItems(sequence(10).map((id) => ({ id }))).mapBatches(Scaler, { constructorArgs: [2], numGpus: 2, numCpus: 0, concurrency: 1, actorStartTimeoutMs: 4000 }).takeAll();
    job.catch(() => undefined);
    // Longer than the timeout unplaced, then the GPUs free: the actor starts and the job ends.
    // (The timeout leaves a process start seconds, on a machine busy with other tests.)
    await new Promise((resolve) => setTimeout(resolve, 4500));
    openGate(gate);
    expect(ids(await job)).toEqual(sequence(10));
    expect(await get(holder)).toEqual({ id: -1 });
  });

  it('a constructor slower than actorStartTimeoutMs fails the job naming the class', async () => {
    const ds = fromItems(sequence(10)).mapBatches(SlowModel, { constructorArgs: [120_000], actorStartTimeoutMs: 300 });
    const error = await rejection(ds.takeAll());
    expect(error).toBeInstanceOf(DataError);
    expect(error.code).toBe('ERR_DATA_ACTOR_START');
    expect(error.message).toContain('SlowModel');
    expect(error.message).toContain('300 ms');
  });
});
