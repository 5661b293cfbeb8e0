/**
 * Row filters pushed into Parquet reads: the footer's statistics decoded, row groups skipped by
 * them (proved by corrupting the skipped groups' bytes), partitions skipped by their values, and
 * every row the filter keeps, no other, checked against a plain filter of the same rows.
 */
import { closeSync, mkdirSync, openSync, readdirSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { DateDay, Int64, Table, TimestampMicrosecond, Utf8, vectorFromArray } from 'apache-arrow';
import { InvalidArgumentError } from '../../lib/errors.js';
import { DataError, fromItems, readParquet, state } from '../../lib/index.js';
import { isAlive, rejection, until, useDataCluster } from './helpers.js';
import { scratch as scratchFiles } from '../core/helpers.js';
import { double } from './fixtures/udfs.js';
import { blockToRows, type Block, type Row } from '../../lib/data/block.js';
import type { Datasource } from '../../lib/data/datasource.js';
import { ParquetDatasink, parquetSource } from '../../lib/data/formats/index.js';
import { readParquetFooter } from '../../lib/data/formats/parquet-footer.js';
import { checkRowFilter, compareFilterValues, filterBlock, mayMatch, specializeFilter, type RowFilter } from '../../lib/data/row-filter.js';

const files = scratchFiles();
afterAll(files.cleanup);
/** A fresh directory for one case's files. */
const scratch = (name: string): string => {
  const path = files.path(name);
  mkdirSync(path);
  return path;
};

const context = { taskIndex: 0, attempt: 0, writeId: 'job' };
const DAY = 86_400_000;
const START = Date.UTC(2026, 0, 1);

/** 40 rows of every filterable kind in groups of 10, nulls among the strings. */
function sample(): Table {
  const n = 40;
  return new Table({
    id: vectorFromArray(Int32Array.from({ length: n }, (_, row) => row)),
    score: vectorFromArray(Float64Array.from({ length: n }, (_, row) => (row * 7) % 40 / 4)),
    lang: vectorFromArray(Array.from({ length: n }, (_, row) => (row % 5 === 0 ? null : ['en', 'de', 'fr', 'ja'][row % 4])), new Utf8()),
    ok: vectorFromArray(Array.from({ length: n }, (_, row) => row >= 20)),
    day: vectorFromArray(Array.from({ length: n }, (_, row) => new Date(START + row * DAY)), new DateDay()),
    at: vectorFromArray(Array.from({ length: n }, (_, row) => new Date(START + row * 1000)), new TimestampMicrosecond()),
    big: vectorFromArray(Array.from({ length: n }, (_, row) => BigInt(row) * 1_000_000_000_000n), new Int64()),
    unsigned: vectorFromArray(Uint32Array.from({ length: n }, (_, row) => 4_000_000_000 + row)),
  });
}

async function readRows(source: Datasource, parallelism = 1): Promise<{ rows: Row[]; tasks: number }> {
  const tasks = await source.getReadTasks(parallelism);
  const blocks: Block[] = [];
  for (const task of tasks) for await (const output of task.read()) blocks.push(output as Block);
  return { rows: blocks.flatMap((block) => blockToRows(block)), tasks: tasks.length };
}

/** The same filter, row by row in plain JavaScript (values as Arrow gives them). */
function plainFilter(rows: Row[], filter: RowFilter): Row[] {
  const clauses = checkRowFilter(filter, 'plain');
  return rows.filter((row) =>
    clauses.some((clause) =>
      clause.every((predicate) => {
        const raw = row[predicate.column];
        const value = (raw instanceof Date ? raw.getTime() : raw) as never;
        if (predicate.operator === 'is null') return value === null;
        if (predicate.operator === 'is not null') return value !== null;
        if (value === null) return false;
        const order = (other: never) => compareFilterValues(value, other);
        switch (predicate.operator) {
          case '=': return order(predicate.value as never) === 0;
          case '!=': return Math.abs(order(predicate.value as never)) === 1;
          case '<': return order(predicate.value as never) === -1;
          case '<=': return order(predicate.value as never) <= 0;
          case '>': return order(predicate.value as never) === 1;
          case '>=': return order(predicate.value as never) >= 0;
          case 'in': return predicate.values!.some((other) => order(other as never) === 0);
          default: return predicate.values!.every((other) => order(other as never) !== 0);
        }
      }),
    ),
  );
}

/** Overwrites a row group's column chunks with garbage: reading that group can only fail. */
async function corruptGroup(path: string, group: number): Promise<void> {
  const footer = await readParquetFooter(path);
  const fd = openSync(path, 'r+');
  try {
    for (const chunk of footer.rowGroups[group].columns.values()) writeSync(fd, Buffer.alloc(chunk.compressedBytes, 0xee), 0, chunk.compressedBytes, chunk.offset);
  } finally {
    closeSync(fd);
  }
}

/** Overwrites one column's chunks in every row group: only a read of that column meets the garbage. */
async function corruptColumn(path: string, column: string): Promise<void> {
  const footer = await readParquetFooter(path);
  const fd = openSync(path, 'r+');
  try {
    for (const group of footer.rowGroups) {
      const chunk = group.columns.get(column)!;
      writeSync(fd, Buffer.alloc(chunk.compressedBytes, 0xee), 0, chunk.compressedBytes, chunk.offset);
    }
  } finally {
    closeSync(fd);
  }
}

describe('Parquet footer statistics', () => {
  it("decodes each row group's min, max and null count as the values Arrow reads", async () => {
    const directory = scratch('footer');
    await new ParquetDatasink(directory, { rowGroupRows: 10 }).write([sample()], context);
    const path = join(directory, 'job_000000.parquet');
    const footer = await readParquetFooter(path);
    expect([...footer.columns.values()].map((column) => [column.name, column.kind])).toEqual([
      ['id', 'integer'], ['score', 'float'], ['lang', 'string'], ['ok', 'boolean'], ['day', 'date'], ['at', 'timestamp'], ['big', 'bigint'], ['unsigned', 'integer'],
    ]);
    expect(footer.rowGroups.map((group) => group.rows)).toEqual([10, 10, 10, 10]);
    const { rows } = await readRows(parquetSource(path));
    footer.rowGroups.forEach((group, index) => {
      const groupRows = rows.slice(index * 10, index * 10 + 10);
      for (const [name, chunk] of group.columns) {
        const values = groupRows.map((row) => (row[name] instanceof Date ? (row[name] as Date).getTime() : row[name])).filter((value) => value !== null) as never[];
        const sorted = [...values].sort((a, b) => compareFilterValues(a, b));
        expect([name, chunk.min, chunk.max, chunk.nullCount]).toEqual([name, sorted[0], sorted[sorted.length - 1], groupRows.length - values.length]);
      }
    });
  });

  it('refuses a file that is not Parquet, naming it', async () => {
    const directory = scratch('not-parquet');
    const path = join(directory, 'x.parquet');
    const fd = openSync(path, 'w');
    writeSync(fd, Buffer.from('definitely not a parquet file'));
    closeSync(fd);
    const error = await readParquetFooter(path).catch((caught) => caught);
    expect(error).toBeInstanceOf(InvalidArgumentError);
    expect(error.code).toBe('ERR_DATA_PARSE');
    expect(error.message).toContain(path);
  });
});

describe('readParquet filter', () => {
  it('keeps exactly the rows a plain filter keeps, for every operator and value kind', async () => {
    const directory = scratch('every');
    await new ParquetDatasink(directory, { rowGroupRows: 10 }).write([sample()], context);
    const { rows: all } = await readRows(parquetSource(directory));
    const filters: RowFilter[] = [
      [['id', '>=', 12], ['id', '<', 27]],
      [['score', '>', 8.5]],
      [['score', '<=', 0.25]],
      [['lang', '=', 'de']],
      [['lang', '==', 'de'], ['ok', '=', true]],
      [['lang', '!=', 'en']],
      [['lang', 'in', ['fr', 'ja']]],
      [['lang', 'not in', ['fr', 'ja']]],
      [['lang', 'is null']],
      [['lang', 'is not null'], ['id', '<', 8]],
      [['day', '>=', new Date(START + 35 * DAY)]],
      [['at', '<', START + 3000]],
      [['big', '>', 30_000_000_000_000n]],
      [['big', '=', 5_000_000_000_000]],
      [['unsigned', '>=', 4_000_000_038]],
      [[['id', '<', 3]], [['id', '>', 36]], [['lang', '=', 'ja'], ['ok', '=', false]]],
      [['id', '>', 1000]],
    ];
    for (const filter of filters) {
      const expected = plainFilter(all, filter);
      const { rows } = await readRows(parquetSource(directory, { filter }));
      expect(rows, JSON.stringify(filter, (_key, value) => (typeof value === 'bigint' ? `${value}n` : value))).toEqual(expected);
    }
    expect(plainFilter(all, [['id', '>', 1000]])).toEqual([]);
  });

  it('never reads a row group its statistics rule out, in the driver nor in the tasks', async () => {
    const directory = scratch('skip');
    await new ParquetDatasink(directory, { rowGroupRows: 10 }).write([sample()], context);
    const path = join(directory, 'job_000000.parquet');
    // Groups 0, 1 and 3 hold ids 0-19 and 30-39: garbage now, which parquet-wasm cannot even
    // fail on cleanly (it panics), so a read that touched them would not get through.
    for (const group of [0, 1, 3]) await corruptGroup(path, group);
    for (const parallelism of [1, 4]) {
      // With 4 tasks wanted the file is split by row groups: the ruled-out ones get no task.
      const { rows, tasks } = await readRows(parquetSource(path, { filter: [['id', '>=', 22], ['id', '<=', 25]] }), parallelism);
      expect(rows.map((row) => row.id)).toEqual([22, 23, 24, 25]);
      expect(tasks).toBe(1);
    }
    const { rows } = await readRows(parquetSource(path, { filter: [[['day', '=', new Date(START + 21 * DAY)]], [['lang', 'in', ['de']], ['id', '>', 20], ['id', '<', 30]]] }));
    expect(rows.map((row) => row.id)).toEqual([21, 29]);
  });

  it('plans no task for a file none of whose row groups can match', async () => {
    const directory = scratch('files');
    const table = sample();
    for (let file = 0; file < 4; file++) await new ParquetDatasink(directory, { rowGroupRows: 5 }).write([table.slice(file * 10, file * 10 + 10)], { ...context, taskIndex: file });
    const paths = readdirSync(directory).sort().map((name) => join(directory, name));
    // Files 0, 1 and 3 (ids 0-19, 30-39) are garbage past their footers now.
    for (const file of [0, 1, 3]) for (const group of [0, 1]) await corruptGroup(paths[file], group);
    const { rows, tasks } = await readRows(parquetSource(directory, { filter: [['id', '>=', 22], ['id', '<=', 25]] }), 4);
    expect(rows.map((row) => row.id)).toEqual([22, 23, 24, 25]);
    // The one file left, split by its two row groups (ids 20-24 and 25-29) over the tasks wanted.
    expect(tasks).toBe(2);
  });

  it('reads the columns the filter needs and gives back only those asked for, row ids numbered by place in the file', async () => {
    const directory = scratch('columns');
    await new ParquetDatasink(directory, { rowGroupRows: 10 }).write([sample()], context);
    const { rows } = await readRows(parquetSource(directory, { columns: ['id'], filter: [['lang', '=', 'fr'], ['ok', '=', true]], rowIds: 'row' }));
    expect(rows.map((row) => Object.keys(row))).toEqual(rows.map(() => ['id', 'row']));
    expect(rows.map((row) => row.id)).toEqual([22, 26, 34, 38]);
    expect(rows.map((row) => (row.row as string).split(':').pop())).toEqual(['22', '26', '34', '38']);
  });

  it("skips partitions whose values refute the filter, and decides the partition's predicates once per file", async () => {
    const directory = scratch('partitioned');
    const table = sample();
    await new ParquetDatasink(directory, { partitionBy: 'ok', rowGroupRows: 10 }).write([table], context);
    // OR across the partition column and data columns: each file keeps the clauses its value allows.
    const either = await readRows(parquetSource(directory, { filter: [[['ok', '=', 'true'], ['id', '>', 37]], [['ok', '=', 'false'], ['id', '<', 2]]] }));
    expect(either.rows.map((row) => row.id).sort((a, b) => (a as number) - (b as number))).toEqual([0, 1, 38, 39]);
    // ok=false holds ids 0-19: corrupt its file, then a filter that rules it out must not open it.
    const falseDirectory = join(directory, 'ok=false');
    const falseFile = join(falseDirectory, readdirSync(falseDirectory)[0]);
    for (const group of [0, 1]) await corruptGroup(falseFile, group);
    const kept = await readRows(parquetSource(directory, { filter: [['ok', '=', 'true'], ['lang', '=', 'ja']] }));
    expect(kept.rows.map((row) => row.id)).toEqual([23, 27, 31, 39]);
    // The partition's predicate alone decides the ok=true file: its rows pass whole.
    expect((await readRows(parquetSource(directory, { filter: [['ok', '!=', 'false']] }))).rows).toHaveLength(20);
    // Nothing left at all: an empty dataset, not an error.
    expect((await readRows(parquetSource(directory, { filter: [['ok', 'in', ['maybe']]] }))).rows).toEqual([]);
  });

  it('names what is wrong with a filter', async () => {
    const directory = scratch('errors');
    await new ParquetDatasink(directory, { rowGroupRows: 10 }).write([sample()], context);
    const errorOf = async (filter: unknown) => {
      try {
        await readRows(parquetSource(directory, { filter: filter as RowFilter }));
      } catch (error) {
        expect(error).toBeInstanceOf(InvalidArgumentError);
        return error as InvalidArgumentError;
      }
      throw new Error(`no error for ${JSON.stringify(filter)}`);
    };
    const cases: [unknown, string][] = [
      [[], 'non-empty list'],
      [['id', '>', 3], 'write [["id",">",3]]'],
      [[['id', '~', 3]], "no operator of '='"],
      [[['id', '=']], "'=' takes one value"],
      [[['id', 'in', 3]], "'in' takes a list"],
      [[['id', 'is null', 3]], "'is null' takes no value"],
      [[['id', '=', null]], "use 'is null'"],
      [[['id', '=', Number.NaN]], 'NaN'],
      [[['nope', '=', 1]], "column 'nope', which is not there"],
      [[['lang', '=', 3]], "column 'lang' holds Utf8 values, compared with the number 3"],
      [[['id', '>', '3']], "column 'id' holds Int32 values, compared with the string"],
    ];
    for (const [filter, message] of cases) {
      const error = await errorOf(filter);
      expect(error.code, message).toBe('ERR_DATA_FILTER');
      expect(error.message).toContain(message);
    }
    const partitioned = scratch('partitioned-errors');
    await new ParquetDatasink(partitioned, { partitionBy: 'id', rowGroupRows: 10 }).write([sample()], context);
    const error = (() => {
      try {
        parquetSource(partitioned, { filter: [['id', '=', '3']] });
      } catch (caught) {
        return caught as InvalidArgumentError;
      }
      throw new Error('a string compared with a numeric partition column was taken');
    })();
    expect(error.code).toBe('ERR_DATA_FILTER');
    expect(error.message).toContain("column 'id' holds numbers");
  });
});

describe('row filters', () => {
  it('order strings by code point, as Parquet orders their bytes', () => {
    // U+FF61 sorts below U+1F600 by code point, above its surrogates by UTF-16 unit.
    expect(compareFilterValues('\uff61', '\u{1f600}')).toBe(-1);
    expect(compareFilterValues('b', 'ab')).toBe(1);
    expect(compareFilterValues(3n, 3)).toBe(0);
    expect(compareFilterValues('3', 3)).toBeNaN();
  });

  it('judge ranges: a group is skipped only when no row in it can match', () => {
    const clauses = checkRowFilter([['x', '>', 5]], 'test');
    expect(mayMatch(clauses, () => ({ rows: 10, min: 0, max: 5 }))).toBe(false);
    expect(mayMatch(clauses, () => ({ rows: 10, min: 0, max: 6 }))).toBe(true);
    expect(mayMatch(clauses, () => ({ rows: 10, nullCount: 10 }))).toBe(false);
    expect(mayMatch(clauses, () => undefined)).toBe(true);
    expect(mayMatch(checkRowFilter([['x', '!=', 4]], 'test'), () => ({ rows: 3, min: 4, max: 4 }))).toBe(false);
    expect(mayMatch(checkRowFilter([['x', 'is null']], 'test'), () => ({ rows: 3, min: 4, max: 4, nullCount: 0 }))).toBe(false);
    expect(mayMatch(checkRowFilter([['x', 'not in', [4, 5]]], 'test'), () => ({ rows: 3, min: 5, max: 5 }))).toBe(false);
  });

  it('specialize on known values: refuted clauses go, satisfied predicates leave', () => {
    const clauses = checkRowFilter([[['p', '=', 1], ['x', '>', 5]], [['p', '=', 2]]], 'test');
    expect(specializeFilter(clauses, { p: 1 }, 'test')).toEqual([[{ column: 'x', operator: '>', value: 5 }]]);
    expect(specializeFilter(clauses, { p: 2 }, 'test')).toEqual([[]]);
    expect(specializeFilter(clauses, { p: 3 }, 'test')).toEqual([]);
    expect(specializeFilter(clauses, { p: null }, 'test')).toEqual([]);
    const block = new Table({ x: vectorFromArray(Int32Array.of(4, 6, 8)) });
    expect(filterBlock(block, [[]], 'test')).toBe(block);
    expect(filterBlock(block, [], 'test').numRows).toBe(0);
    expect(blockToRows(filterBlock(block, checkRowFilter([['x', '>', 5]], 'test'), 'test'))).toEqual([{ x: 6 }, { x: 8 }]);
    const unsigned = new Table({ u: vectorFromArray(Uint32Array.of(1, 4_000_000_000)) });
    expect(blockToRows(filterBlock(unsigned, checkRowFilter([['u', '>', 2_000_000_000]], 'test'), 'test'))).toEqual([{ u: 4_000_000_000 }]);
  });
});

describe('Dataset.filter with a row filter', () => {
  useDataCluster({ numCpus: 2 });

  it('is pushed into a Parquet read, which skips what cannot match; after other stages it runs as a stage; selectColumns narrows the read', async () => {
    const directory = scratch('dataset');
    await new ParquetDatasink(directory, { rowGroupRows: 10 }).write([sample()], context);
    for (const group of [0, 1, 3]) await corruptGroup(join(directory, 'job_000000.parquet'), group);
    const pushed = readParquet(directory, { columns: ['id', 'lang'] }).filter([['id', '>', 20], ['id', '<', 30]]).filter([['lang', 'in', ['de', 'ja']]]);
    expect(await pushed.explain({ print: false })).not.toContain('FilterRows');
    expect((await pushed.takeAll()).map((row) => row.id)).toEqual([21, 23, 27, 29]);
    // Not right after the read: a stage of its own, after the whole read.
    const whole = scratch('dataset-whole');
    await new ParquetDatasink(whole, { rowGroupRows: 10 }).write([sample()], context);
    const staged = readParquet(whole).map(double).filter([['id', '>', 20], ['doubled', '<', 50]]);
    expect(await staged.explain({ print: false })).toContain('FilterRows(id > 20 and doubled < 50)');
    expect((await staged.takeAll()).map((row) => row.id)).toEqual([21, 22, 23, 24]);
    const items = fromItems(Array.from({ length: 30 }, (_, id) => ({ id, even: id % 2 === 0 }))).filter([[['id', '<', 3]], [['even', '=', false], ['id', '>', 25]]]);
    expect((await items.takeAll()).map((row) => row.id)).toEqual([0, 1, 2, 27, 29]);
    expect(() => fromItems([{ id: 1 }]).filter([['id', '>']] as never)).toThrow(/'>' takes one value/);
    // selectColumns right after the read: only those columns are read from disk ('score' is garbage now).
    const narrow = scratch('narrow');
    await new ParquetDatasink(narrow, { partitionBy: 'ok', rowGroupRows: 10 }).write([sample()], context);
    for (const part of ['ok=true', 'ok=false']) await corruptColumn(join(narrow, part, readdirSync(join(narrow, part))[0]), 'score');
    const selected = readParquet(narrow).selectColumns(['lang', 'ok', 'id']);
    expect(await selected.explain({ print: false })).toContain('SelectColumns(lang, ok, id)');
    const narrowRows = await selected.takeAll();
    expect(narrowRows.map((row) => Object.keys(row))).toEqual(narrowRows.map(() => ['lang', 'ok', 'id']));
    expect(narrowRows.filter((row) => row.ok === 'true').map((row) => row.id).sort((a, b) => (a as number) - (b as number))).toEqual(Array.from({ length: 20 }, (_, index) => 20 + index));
    // Every file ruled out: no read task at all, an empty result.
    expect(await readParquet(whole).filter([['id', '<', 0]]).takeAll()).toEqual([]);
  });

  it('is pushed past stages that only select, drop or rename columns, under the names the read gives them', async () => {
    const directory = scratch('past-columns');
    await new ParquetDatasink(directory, { rowGroupRows: 10 }).write([sample()], context);
    // Groups 0, 1 and 3 are garbage: only a read that skips them gets through.
    for (const group of [0, 1, 3]) await corruptGroup(join(directory, 'job_000000.parquet'), group);
    const renamed = readParquet(directory)
      .selectColumns(['id', 'lang', 'score'])
      .renameColumns({ id: 'key', lang: 'language' })
      .dropColumns('score')
      .filter([['key', '>', 20], ['key', '<', 30], ['language', 'in', ['de', 'ja']]]);
    const plan = await renamed.explain({ print: false });
    expect(plan).not.toContain('FilterRows');
    expect(plan).toContain('RenameColumns(id->key, lang->language)');
    expect(await renamed.takeAll()).toEqual([21, 23, 27, 29].map((key) => ({ key, language: key % 4 === 1 ? 'de' : 'ja' })));
    // Swapped names map back to the read's.
    const swapped = readParquet(directory).selectColumns(['id', 'lang']).renameColumns({ id: 'lang', lang: 'id' }).filter([['lang', '>=', 22], ['lang', '<=', 23]]);
    expect(await swapped.explain({ print: false })).not.toContain('FilterRows');
    expect(await swapped.takeAll()).toEqual([{ lang: 22, id: 'fr' }, { lang: 23, id: 'ja' }]);
    // A filter on a column a stage removed is not pushed: it runs after the stage, and names it.
    const whole = scratch('past-columns-whole');
    await new ParquetDatasink(whole, { rowGroupRows: 10 }).write([sample()], context);
    const dropped = readParquet(whole).dropColumns('score').filter([['score', '>', 1]]);
    expect(await dropped.explain({ print: false })).toContain('FilterRows(score > 1)');
    expect((await rejection(dropped.takeAll())).message).toContain("the filter names column 'score', which is not there (the columns are: id, lang, ok,");
    const renamedAway = readParquet(whole).renameColumns({ id: 'key' }).filter([['id', '=', 1]]);
    expect(await renamedAway.explain({ print: false })).toContain('FilterRows');
  });

  it('fails a read of a corrupt row group with ERR_DATA_PARSE naming the file and group, though parquet-wasm panics where nothing can catch it', async () => {
    const directory = scratch('corrupt');
    await new ParquetDatasink(directory, { rowGroupRows: 10 }).write([sample()], context);
    const path = join(directory, 'job_000000.parquet');
    await corruptGroup(path, 2);
    const workers = () => state().workers.map((worker) => worker.pid);
    const before = workers();
    const error = await rejection(readParquet(directory).takeAll({ maxRetries: 0 }));
    expect(error.message).toContain(`Parquet file '${path}', row group 2: parquet-wasm trapped (unreachable)`);
    expect(error).toBeInstanceOf(DataError);
    expect(((error as DataError).cause as { code?: string }).code).toBe('ERR_DATA_PARSE');
    // Not a worker's death: the task replied with the error, and its worker, whose wasm instance
    // trapped, ended after it (a new one takes its place). The other groups read as before.
    expect(error.message).not.toMatch(/worker died/);
    await until(() => workers().some((pid) => !before.includes(pid)) || before.some((pid) => !isAlive(pid)), 'the trapped worker to end');
    expect((await readParquet(directory).filter([['id', '<', 20]]).takeAll()).map((row) => row.id)).toEqual(Array.from({ length: 20 }, (_, id) => id));
  });
});
