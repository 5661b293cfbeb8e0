/**
 * The Dataset API: transforms, consumers, every batch format, plans and explain(), argument
 * checks, limit, repartition, materialize, and that no job leaves objects behind.
 */
import { describe, expect, it, vi } from 'vitest';
import { Table, tableFromArrays } from 'apache-arrow';
import {
  Dataset, Datasink, InvalidArgumentError, NotInitializedError, fromArrow, fromItems, init, range, readDatasource, shutdown, type Row,
} from '../../lib/index.js';
import { planPhysical } from '../../lib/data/plan.js';
import {
  CountingSink, GatedSource, GroupingModel, NoCallModel, NumbersSource, Scaler, addColumn, batchSizes, callOfTask, double, identity, isEven, notRegistered, repeat, waitingRow,
} from './fixtures/udfs.js';
import { collectGarbage, rejection, storeUse, useDataCluster } from './helpers.js';

const cluster = useDataCluster({ numCpus: 2 });
const scratchDir = cluster.scratchDir;

const ids = (rows: Row[]) => rows.map((row) => row.id as number);
const sequence = (n: number, from = 0) => Array.from({ length: n }, (_, index) => from + index);

describe('transforms', () => {
  it('map, filter and flatMap run row by row, with fnArgs', async () => {
    expect(await range(10, { parallelism: 3 }).map(double).takeAll()).toEqual(sequence(10).map((id) => ({ id, doubled: 2 * id })));
    expect(ids(await range(10).filter(isEven).takeAll())).toEqual([0, 2, 4, 6, 8]);
    expect(await range(3).flatMap(repeat, { fnArgs: [2] }).takeAll()).toEqual([
      { id: 0, copy: 0 }, { id: 0, copy: 1 }, { id: 1, copy: 0 }, { id: 1, copy: 1 }, { id: 2, copy: 0 }, { id: 2, copy: 1 },
    ]);
    // flatMap to nothing and filter of nothing: an empty dataset, not an error.
    expect(await range(5).flatMap(repeat, { fnArgs: [0] }).takeAll()).toEqual([]);
    expect(await range(5).filter(isEven).filter(isEven).count()).toBe(3);
  });

  it('mapBatches hands each batch format to the function', async () => {
    // columns (default): typed arrays for primitive columns.
    expect(await fromItems([{ id: 1 }, { id: 2 }, { id: 3 }]).mapBatches(addColumn).takeAll()).toEqual([
      { id: 1, squared: 1 }, { id: 2, squared: 4 }, { id: 3, squared: 9 },
    ]);
    // rows: arrays of plain objects.
    const sizes = await range(20, { parallelism: 1 }).mapBatches(batchSizes, { batchFormat: 'rows', batchSize: 8 }).takeAll();
    expect(sizes.map((row) => row.size)).toEqual([8, 8, 4]);
    // arrow: the Arrow table itself.
    const arrow = await range(6, { parallelism: 2 }).mapBatches(identity, { batchFormat: 'arrow', batchSize: null }).takeAll();
    expect(ids(arrow)).toEqual(sequence(6));
  });

  it('mapBatches batches never exceed batchSize and cover every row once', async () => {
    // Blocks of 10 rows (fromItems), batches of 7: batches are bundled across blocks.
    const items = sequence(100).map((id) => ({ id }));
    const out = await fromItems(items, { parallelism: 10 }).map(double).mapBatches(batchSizes, { batchFormat: 'rows', batchSize: 7 }).takeAll();
    const sizes = out.map((row) => row.size as number);
    expect(sizes.reduce((a, b) => a + b, 0)).toBe(100);
    expect(Math.max(...sizes)).toBeLessThanOrEqual(7);
    // One stream (a single read task): every batch but the last is exactly batchSize.
    const single = await range(100, { parallelism: 1 }).mapBatches(batchSizes, { batchFormat: 'rows', batchSize: 7 }).takeAll();
    expect(single.map((row) => row.size)).toEqual([...Array(14).fill(7), 2]);
  });

  it('an actor pool call carries several whole batches, and the tail is cut to single batches', async () => {
    // 2,048 rows in blocks of 256, batches of 16: 128 batches for 2 actors x 4 calls in flight.
    const tables = Array.from({ length: 8 }, (_, block) => tableFromArrays({ id: Int32Array.from({ length: 256 }, (_, row) => block * 256 + row) }));
    const mapped = fromArrow(tables).mapBatches(Scaler, { constructorArgs: [2], batchSize: 16, concurrency: 2 });
    const rows = await mapped.takeAll();
    expect(ids(rows)).toEqual(sequence(2048));
    // Progress counts each input block once, however many calls its batches went to.
    expect(mapped.stats()?.operators[1].blocksDone).toBe(8);
    // Small outputs are joined per call: each output block is one call's batches, in order.
    const plan = (await mapped.materialize()).logicalPlan[0];
    const calls = plan.op === 'input' ? plan.blocks.map((block) => block.meta.rows) : [];
    expect(calls.reduce((sum, rows) => sum + rows, 0)).toBe(2048);
    expect(calls.every((rows) => rows % 16 === 0)).toBe(true);
    // Far fewer calls than batches: the first calls carry 16 batches each...
    expect(calls.length).toBeLessThan(64);
    expect(calls[0]).toBe(256);
    // ...and the last ones one batch each, so no actor is left with a long last call.
    expect(calls.slice(-3)).toEqual([16, 16, 16]);
    // Each batch still has exactly batchSize rows.
    const sizes = await fromArrow(tables).mapBatches(batchSizes, { batchFormat: 'rows', batchSize: 16, concurrency: 2 }).takeAll();
    expect(sizes.every((row) => row.size === 16)).toBe(true);
  });

  it('small blocks go several to a task, each still reaching the function whole and alone', async () => {
    // 256 blocks of 5 rows; 2 CPUs. batchSize null: one call per block.
    const tables = Array.from({ length: 256 }, (_, block) => tableFromArrays({ id: Int32Array.from({ length: 5 }, (_, row) => block * 5 + row) }));
    const calls = await fromArrow(tables).mapBatches(callOfTask, { batchFormat: 'rows', batchSize: null }).takeAll();
    expect(calls).toHaveLength(256);
    expect(calls.every((call) => call.rows === 5)).toBe(true);
    const perTask = new Map<unknown, number>();
    for (const call of calls) perTask.set(call.task, (perTask.get(call.task) ?? 0) + 1);
    // Far fewer tasks than blocks, the first ones full; the tail cut back to single blocks.
    expect(perTask.size).toBeLessThan(128);
    expect(Math.max(...perTask.values())).toBe(16);
    expect(Math.min(...perTask.values())).toBe(1);
    // With maxErroredBlocks a failing task is skipped whole: one block each keeps that exact.
    const exact = await fromArrow(tables).mapBatches(callOfTask, { batchFormat: 'rows', batchSize: null }).takeAll({ maxErroredBlocks: 1 });
    expect(new Set(exact.map((call) => call.task)).size).toBe(256);
  });

  it('a class runs on an actor pool with its constructor arguments', async () => {
    const rows = await readDatasource(new NumbersSource(40, 10)).mapBatches(Scaler, { constructorArgs: [3], batchSize: 16, concurrency: 1 }).takeAll();
    expect(ids(rows)).toEqual(sequence(40));
    expect(rows.map((row) => row.scaled)).toEqual(sequence(40).map((id) => id * 3));
    // concurrency: 1 is one actor: one pid for every row.
    expect(new Set(rows.map((row) => row.pid)).size).toBe(1);
  });

  it('an actor works on maxConcurrency batches at once', async () => {
    // Each batch is held until three are in the actor together: one at a time would never finish.
    const rows = await readDatasource(new NumbersSource(12, 2)).mapBatches(GroupingModel, { constructorArgs: [3], batchSize: 2, concurrency: 1, maxConcurrency: 3 }).takeAll();
    expect(ids(rows)).toEqual(sequence(12));
    expect(Math.max(...rows.map((row) => row.together as number))).toBe(3);
    expect(() => range(10).mapBatches(addColumn, { maxConcurrency: 2 })).toThrow(/maxConcurrency is for classes/);
    expect(() => range(10).mapBatches(Scaler, { maxConcurrency: 0 })).toThrow(/maxConcurrency must be a positive integer/);
  });

  it('fromArrow takes tables as they are', async () => {
    const tables = [tableFromArrays({ a: Int32Array.from([1, 2]) }), tableFromArrays({ a: Int32Array.from([3]) })];
    const ds = fromArrow(tables);
    expect(await ds.count()).toBe(3);
    expect(await ds.takeAll()).toEqual([{ a: 1 }, { a: 2 }, { a: 3 }]);
  });
});

describe('consumers', () => {
  it('take, takeAll, takeBatch in every format, iterRows', async () => {
    const ds = range(50, { parallelism: 5 }).map(double);
    expect(ids(await ds.take(3))).toEqual([0, 1, 2]);
    expect(await ds.take(0)).toEqual([]);
    expect(ids(await ds.take(1000))).toEqual(sequence(50));
    expect(ids(await ds.takeAll())).toEqual(sequence(50));

    const columns = (await ds.takeBatch(4)) as Record<string, ArrayLike<number>>;
    expect(Array.from(columns.id)).toEqual([0, 1, 2, 3]);
    expect(Array.from(columns.doubled)).toEqual([0, 2, 4, 6]);
    const rows = (await ds.takeBatch(2, { batchFormat: 'rows' })) as Row[];
    expect(rows).toEqual([{ id: 0, doubled: 0 }, { id: 1, doubled: 2 }]);
    const table = (await ds.takeBatch(12, { batchFormat: 'arrow' })) as Table;
    expect(table).toBeInstanceOf(Table);
    expect(table.numRows).toBe(12);
    expect(table.getChild('doubled')!.get(11)).toBe(22);

    const seen: number[] = [];
    for await (const row of ds.iterRows()) seen.push(row.id as number);
    expect(seen).toEqual(sequence(50));
  });

  it('iterBatches yields exact batch sizes across blocks, in every format', async () => {
    const ds = range(100, { parallelism: 7 });
    const sizes: number[] = [];
    const all: number[] = [];
    for await (const batch of ds.iterBatches({ batchSize: 30, batchFormat: 'rows' })) {
      sizes.push((batch as Row[]).length);
      all.push(...ids(batch as Row[]));
    }
    expect(sizes).toEqual([30, 30, 30, 10]);
    expect(all).toEqual(sequence(100));

    for await (const batch of ds.iterBatches({ batchSize: 25, batchFormat: 'arrow' })) {
      expect(batch).toBeInstanceOf(Table);
      expect((batch as Table).numRows).toBe(25);
    }
    const columns: number[] = [];
    for await (const batch of ds.iterBatches({ batchSize: 40 })) columns.push(...Array.from((batch as { id: Int32Array }).id));
    expect(columns).toEqual(sequence(100));

    // batchSize null: each block whole (one per read task here).
    const blocks: number[] = [];
    for await (const batch of ds.iterBatches({ batchSize: null, batchFormat: 'arrow' })) blocks.push((batch as Table).numRows);
    expect(blocks.length).toBe(7);
    expect(blocks.reduce((a, b) => a + b, 0)).toBe(100);
  });

  it('batches the consumer keeps stay readable after the job lets their blocks go', async () => {
    // Batches cut across blocks are views of blocks the job already let go: they must keep them.
    const kept: Array<{ id: Int32Array }> = [];
    const tables: Table[] = [];
    const ds = range(40_000, { parallelism: 8 });
    for await (const batch of ds.iterBatches({ batchSize: 3000 })) kept.push(batch as { id: Int32Array });
    for await (const batch of ds.iterBatches({ batchSize: 700, batchFormat: 'arrow' })) tables.push(batch as Table);
    // Let this process collect what it no longer references (and run its finalizers), then churn
    // the store so that freed blocks are reused.
    for (let round = 0; round < 3; round++) {
      collectGarbage();
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    for (let round = 0; round < 2; round++) {
      expect(await range(200_000, { parallelism: 8 }).mapBatches(addColumn, { batchSize: null }).count()).toBe(200_000);
    }
    expect(kept.flatMap((batch) => Array.from(batch.id))).toEqual(sequence(40_000));
    expect(tables.flatMap((table) => Array.from(table.getChild('id')!.toArray() as Int32Array))).toEqual(sequence(40_000));
    kept.length = 0;
    tables.length = 0;
  });

  it('count uses metadata when it can, and runs the plan when it must', async () => {
    expect(await range(12345).count()).toBe(12345);
    expect(range(12345).stats()).toBeUndefined();
    const filtered = range(1000, { parallelism: 4 }).filter(isEven);
    expect(await filtered.count()).toBe(500);
    expect(filtered.stats()?.rowsOut).toBe(500);
    expect(await fromItems(sequence(33)).count()).toBe(33);
    // A source without row counts runs its reads.
    expect(await readDatasource(new GatedSource(30, 7)).count()).toBe(30);
  });

  it('schema() reads the first block only; undefined for an empty dataset', async () => {
    const schema = await range(10).map(double).schema();
    expect(schema?.fields.map((field) => field.name)).toEqual(['id', 'doubled']);
    expect(String(schema?.fields[1].type)).toBe('Float64');
    expect(await range(10).filter(isEven).flatMap(repeat, { fnArgs: [0] }).schema()).toBeUndefined();
  });

  it('show() prints rows as JSON lines', async () => {
    const log = vi.spyOn(console, 'log').mockImplementation(() => {});
    try {
      await range(5).map(double).show(2);
      expect(log.mock.calls.map((call) => call[0])).toEqual(['{"id":0,"doubled":0}', '{"id":1,"doubled":2}']);
    } finally {
      log.mockRestore();
    }
  });

  it('materialize keeps the blocks: later jobs reuse them without rereading', async () => {
    const marker = scratchDir.path('reads');
    const source = readDatasource(new GatedSource(60, 20, {}, marker));
    const materialized = await source.map(double).materialize();
    const { readdirSync } = await import('node:fs');
    const { dirname, basename } = await import('node:path');
    const readsDone = () => readdirSync(dirname(marker)).filter((name) => name.startsWith(`${basename(marker)}.read.`)).length;
    expect(readsDone()).toBe(3);
    expect(await materialized.count()).toBe(60);
    expect(ids(await materialized.takeAll())).toEqual(sequence(60));
    expect(ids(await materialized.filter(isEven).takeAll())).toEqual(sequence(30).map((n) => 2 * n));
    expect(readsDone()).toBe(3);
    // The materialized dataset holds its blocks until it is collected: the baseline moves with it.
    cluster.baseline = { ...cluster.baseline, objects: cluster.baseline.objects + 3, stored: cluster.baseline.stored + 3, bytes: storeUse().bytes };
  });

  it('write() sends every block through the sink and reports results in task order', async () => {
    const sink = new CountingSink();
    const results = await range(1000, { parallelism: 5 }).write(sink);
    expect(sink.started).toBe(1);
    expect(results.map((result) => result.task)).toEqual([0, 1, 2, 3, 4]);
    expect(results.reduce((sum, result) => sum + result.rows, 0)).toBe(1000);
    expect(sink.completed).toEqual(results);
    expect(sink.failed).toBeUndefined();
  });
});

describe('limit and repartition', () => {
  it('limit stops upstream: most read tasks never run', async () => {
    const marker = scratchDir.path('limit');
    const ds = readDatasource(new GatedSource(10_000, 10, {}, marker)).map(double).limit(15);
    expect(ids(await ds.takeAll())).toEqual(sequence(15));
    const { readdirSync } = await import('node:fs');
    const { dirname, basename } = await import('node:path');
    const reads = readdirSync(dirname(marker)).filter((name) => name.startsWith(`${basename(marker)}.read.`)).length;
    expect(reads).toBeGreaterThanOrEqual(2);
    expect(reads).toBeLessThan(50);
    expect(ds.stats()?.rowsOut).toBe(15);
    // limit(0) and a limit above the rows.
    expect(await range(10).limit(0).takeAll()).toEqual([]);
    expect(ids(await range(10).limit(100).takeAll())).toEqual(sequence(10));
    expect(ids(await range(100).limit(50).limit(7).takeAll())).toEqual(sequence(7));
  });

  it('repartition makes exactly n blocks of equal rows', async () => {
    const ds = range(103, { parallelism: 3 }).repartition(5);
    const blocks: number[] = [];
    const all: number[] = [];
    for await (const batch of ds.iterBatches({ batchSize: null, batchFormat: 'rows' })) {
      blocks.push((batch as Row[]).length);
      all.push(...ids(batch as Row[]));
    }
    expect(blocks).toEqual([21, 21, 21, 20, 20]);
    expect(all).toEqual(sequence(103));
    expect(ds.stats()?.blocksOut).toBe(5);
    const more = await range(3).repartition(5).materialize();
    expect(await more.count()).toBe(3);
  });
});

describe('plans', () => {
  it('explain() shows the logical plan, fused operators, the actor pool and task counts', async () => {
    const ds = range(1000, { parallelism: 4 }).map(double).filter(isEven).mapBatches(Scaler, { constructorArgs: [2], concurrency: [1, 3], batchSize: 100 }).map(double).limit(10);
    const text = await ds.explain({ print: false });
    expect(text).toContain('Logical plan:');
    expect(text).toContain('Physical plan:');
    expect(text).toMatch(/1\. ReadRange->Map\(double\)->Filter\(isEven\): 4 read tasks/);
    expect(text).toMatch(/2\. MapBatches\(Scaler\)->Map\(double\): actor pool of 1\.\.3 actors, ~\d+ batches of 100 rows, several to a call/);
    expect(text).toMatch(/3\. Limit\(10\)/);
    const log = vi.spyOn(console, 'log').mockImplementation(() => {});
    try {
      await range(10).explain();
      expect(log).toHaveBeenCalledTimes(1);
    } finally {
      log.mockRestore();
    }
  });

  it('planPhysical fuses compatible maps and keeps the others apart', () => {
    const plan = (ds: Dataset) => planPhysical(ds.logicalPlan).map((op) => `${op.kind}:${op.name}`);
    // Read into map: one operator.
    expect(plan(range(10).map(double).filter(isEven))).toEqual(['read:ReadRange->Map(double)->Filter(isEven)']);
    // Different resources: not fused.
    expect(plan(range(10).map(double, { numCpus: 0.5 }))).toEqual(['read:ReadRange', 'task-map:Map(double)']);
    // Explicit default resources are the same resources.
    expect(plan(range(10).map(double, { numCpus: 1 }))).toEqual(['read:ReadRange->Map(double)']);
    // Input blocks then maps: one task-map; a batch-sized mapBatches starts its own.
    expect(plan(fromItems([{ id: 1 }]).map(double).map(double).mapBatches(addColumn, { batchSize: 10 }).map(isEven))).toEqual([
      'input:FromItems', 'task-map:Map(double)->Map(double)', 'task-map:MapBatches(addColumn)->Map(isEven)',
    ]);
    // A class: an actor pool, with later function stages fused into its calls.
    const pool = planPhysical(range(10).mapBatches(Scaler, { constructorArgs: [1], concurrency: [2, 4], numGpus: 1 }).map(double).logicalPlan);
    expect(pool.map((op) => op.kind)).toEqual(['read', 'actor-map']);
    const actorMap = pool[1] as Extract<(typeof pool)[number], { kind: 'actor-map' }>;
    expect(actorMap.name).toBe('MapBatches(Scaler)->Map(double)');
    expect(actorMap.pool).toMatchObject({ min: 2, max: 4, maxTasksInFlightPerActor: 4 });
    expect(actorMap.compute.numGpus).toBe(1);
    // Limits merge; repartition and write are their own.
    expect(plan(range(10).limit(5).limit(3).repartition(2))).toEqual(['read:ReadRange', 'limit:Limit(3)', 'repartition:Repartition(2)']);
    // A sink fuses into the operator that makes its blocks; after a limit it is an operator of its own.
    expect(planPhysical(range(10).map(double).logicalPlan, new CountingSink()).map((op) => op.name)).toEqual(['ReadRange->Map(double)->Write(CountingSink)']);
    expect(planPhysical(range(10).limit(3).logicalPlan, new CountingSink()).map((op) => op.name)).toEqual(['ReadRange', 'Limit(3)', 'Write(CountingSink)']);
  });
});

describe('argument checks', () => {
  it('an unregistered function is refused at the call site, saying how to register it', () => {
    const error = (() => {
      try {
        range(10).map(notRegistered);
      } catch (caught) {
        return caught as InvalidArgumentError;
      }
      throw new Error('map() took an unregistered function');
    })();
    expect(error).toBeInstanceOf(InvalidArgumentError);
    expect(error.code).toBe('ERR_DATA_UDF');
    expect(error.message).toContain('notRegistered');
    expect(error.message).toContain('remote(import.meta');
    expect(() => range(10).map((row: Row) => row)).toThrow(/remote\(import\.meta/);
  });

  it('classes, methods, batch options and concurrency are checked', () => {
    expect(() => range(10).map(Scaler)).toThrow(/map\(\) takes a function; classes run through mapBatches\(\)/);
    expect(() => range(10).filter(Scaler)).toThrow(InvalidArgumentError);
    expect(() => range(10).mapBatches(NoCallModel)).toThrow(/no method 'call'.*predict/);
    expect(range(10).mapBatches(NoCallModel, { method: 'predict' })).toBeInstanceOf(Dataset);
    expect(() => range(10).mapBatches(addColumn, { batchSize: 0 })).toThrow(/batchSize must be a positive integer/);
    expect(() => range(10).mapBatches(addColumn, { batchSize: 1.5 })).toThrow(/batchSize/);
    expect(() => range(10).mapBatches(addColumn, { batchFormat: 'pandas' as never })).toThrow(/batchFormat must be 'arrow', 'rows' or 'columns'/);
    expect(() => range(10).mapBatches(Scaler, { concurrency: 0 })).toThrow(/concurrency/);
    expect(() => range(10).mapBatches(Scaler, { concurrency: [3, 2] })).toThrow(/below its min/);
    expect(() => range(10).mapBatches(Scaler, { concurrency: [1] as never })).toThrow(/\[min, max\]/);
    expect(() => range(10).mapBatches(Scaler, { maxTasksInFlightPerActor: 0 })).toThrow(/maxTasksInFlightPerActor/);
    expect(() => range(10).mapBatches(addColumn, { constructorArgs: [1] })).toThrow(/constructorArgs is for classes/);
    expect(() => range(10).map(double, { numCpus: -1 })).toThrow(/numCpus must be a non-negative number/);
    expect(() => range(10).map(double, { fnArgs: 3 as never })).toThrow(/fnArgs must be an array/);
    expect(() => range(10).repartition(0)).toThrow(/repartition/);
    expect(() => range(10).limit(-1)).toThrow(/limit/);
    expect(() => range(-1)).toThrow(/range\(n\)/);
    expect(() => readDatasource({} as never)).toThrow(/Datasource/);
    expect(() => fromItems('abc' as never)).toThrow(/array/);
  });

  it('consumers check their options', async () => {
    const ds = range(10);
    expect(await rejection(ds.take(-1))).toBeInstanceOf(InvalidArgumentError);
    expect(await rejection(ds.takeBatch(0))).toBeInstanceOf(InvalidArgumentError);
    expect(await rejection(ds.takeBatch(2, { batchFormat: 'numpy' as never }))).toBeInstanceOf(InvalidArgumentError);
    expect(await rejection(ds.iterBatches({ batchSize: 0 }).next())).toBeInstanceOf(InvalidArgumentError);
    expect(await rejection(ds.write({} as never))).toBeInstanceOf(InvalidArgumentError);
    // A sink's write() runs in workers: its class must be registered.
    class LocalSink extends Datasink {
      write() {
        return 0;
      }
    }
    const unregistered = await rejection(ds.write(new LocalSink()));
    expect(unregistered.code).toBe('ERR_DATA_UDF');
    expect(unregistered.message).toContain('remote(import.meta, LocalSink)');
    expect(await rejection(ds.count({ memoryBudgetBytes: -5 }))).toBeInstanceOf(InvalidArgumentError);
    expect(await rejection(ds.map(double).count({ maxErroredBlocks: 1.5 }))).toBeInstanceOf(InvalidArgumentError);
  });
});

describe('rows in flight', () => {
  const rows = Array.from({ length: 40 }, (_, id) => ({ id }));

  it('runs an async row function on several rows of a block at once, in order, and fails on the earliest failing row', async () => {
    const out = await fromItems(rows, { parallelism: 1 }).map(waitingRow, { fnArgs: [null], rowsInFlight: 8 }).takeAll();
    expect(out.map((row) => row.id)).toEqual(rows.map((row) => row.id));
    expect(Math.max(...out.map((row) => row.running as number))).toBe(8);
    const one = await fromItems(rows, { parallelism: 1 }).map(waitingRow, { fnArgs: [null] }).takeAll();
    expect(Math.max(...one.map((row) => row.running as number))).toBe(1);
    const error = await rejection(fromItems(rows, { parallelism: 1 }).map(waitingRow, { fnArgs: [13], rowsInFlight: 8 }).takeAll());
    expect(error.message).toContain('row 13 is refused');
    expect(error.message).toMatch(/row 13\b/);
  });

  it('is refused where it cannot apply, or out of range', () => {
    expect(() => fromItems(rows).mapBatches(identity, { rowsInFlight: 4 })).toThrow(/rowsInFlight is for map, flatMap and filter/);
    expect(() => fromItems(rows).map(double, { rowsInFlight: 0 })).toThrow(/rowsInFlight/);
    expect(() => fromItems(rows).filter(isEven, { rowsInFlight: 20_000 })).toThrow(/at most 10000/);
  });
});

// Last: it shuts the cluster down.
describe('without a cluster', () => {
  it('sources and consumers need init()', async () => {
    const planned = range(10).map(double);
    await shutdown();
    expect(() => fromItems([1])).toThrow(NotInitializedError);
    expect(() => fromArrow(tableFromArrays({ a: Int32Array.from([1]) }))).toThrow(NotInitializedError);
    expect(await rejection(planned.count())).toBeInstanceOf(NotInitializedError);
    expect(await rejection(planned.take(1))).toBeInstanceOf(NotInitializedError);
    // Plans need no cluster.
    expect(await planned.explain({ print: false })).toContain('ReadRange->Map(double)');
  });
});
