/**
 * All-to-all operations and aggregations: sort (by several keys, descending, nulls last, ranges
 * from a sample), randomShuffle (a permutation; seeded runs agree), groupBy with streaming
 * aggregations and mapGroups, Dataset aggregations, and column operations. Each result is
 * checked against a plain computation over the same rows, and no job leaves objects behind.
 */
import { describe, expect, it } from 'vitest';
import {
  AbsMax, ApproximateQuantile, Count, DataError, InvalidArgumentError, Max, Mean, Min, Quantile, Std, Sum, Unique, fromItems, range, type Row,
} from '../../lib/index.js';
import { failOnGroup, never, scaledId, shortColumn, summarizeGroup, withParity } from './fixtures/udfs.js';
import { rejection, useDataCluster } from './helpers.js';
import { formatOperatorDetails } from '../../lib/data/progress.js';

useDataCluster({ numCpus: 2 });

/** A deterministic pseudo-random sequence for test data. */
function numbers(count: number, seed: number, modulo: number): number[] {
  let state = seed;
  return Array.from({ length: count }, () => {
    state = (Math.imul(state, 1103515245) + 12345) >>> 0;
    return state % modulo;
  });
}

describe('sort', () => {
  it('sorts across blocks and ranges, ascending and descending, stable for equal keys', async () => {
    const values = numbers(3000, 7, 500);
    const rows = values.map((value, id) => ({ id, value }));
    const ds = fromItems(rows, { parallelism: 30 });
    const sortedDataset = ds.sort('value', { numBlocks: 4 });
    const sorted = await sortedDataset.takeAll();
    const progress = sortedDataset.stats()!.operators.find((operator) => operator.name === 'Sort(value)')!;
    expect(progress).toMatchObject({ blocksDone: 4, blocksTotal: 4, rowsDone: 3000, rowsTotal: 3000, done: true, phase: 'reducing 4 partitions' });
    expect(formatOperatorDetails({ ...progress, done: false })).toMatch(/3000\/3000 rows, 4\/4 blocks, reducing 4 partitions, 0 active/);
    const expected = [...rows].sort((a, b) => a.value - b.value || a.id - b.id);
    expect(sorted).toEqual(expected);
    const descending = await ds.sort('value', { descending: true, numBlocks: 3 }).takeAll();
    expect(descending).toEqual([...rows].sort((a, b) => b.value - a.value || a.id - b.id));
    // Several keys, each with its direction.
    const byTwo = await ds.map(withParity).sort(['parity', 'value'], { descending: [true, false], numBlocks: 5 }).takeAll();
    expect(byTwo.map((row) => [row.parity, row.value, row.id])).toEqual(
      rows.map((row) => ({ ...row, parity: row.value % 2 })).sort((a, b) => b.parity - a.parity || a.value - b.value || a.id - b.id).map((row) => [row.parity, row.value, row.id]),
    );
  });

  it('repartition, like an exchange, holds its input outside the budget', async () => {
    const out = await range(100_000, { parallelism: 50 }).map(withParity).repartition(3).count({ memoryBudgetBytes: 200_000 });
    expect(out).toBe(100_000);
  });

  it('followed by a limit, keeps only the top rows of each block as they arrive (no exchange)', async () => {
    const values = numbers(20_000, 13, 1_000_000).map((value, id) => ({ id, value: value + id / 1e6 }));
    const ds = fromItems(values, { parallelism: 40 });
    const expected = [...values].sort((a, b) => b.value - a.value).slice(0, 25);
    const top = ds.sort('value', { descending: true }).limit(25);
    expect(await top.takeAll({ memoryBudgetBytes: 100_000 })).toEqual(expected);
    expect(top.stats()!.operators.map((operator) => operator.name)).toEqual(['FromItems', 'TopK(25, Sort(value desc))', 'Limit(25)']);
    expect(await ds.sort('value').take(3)).toEqual([...values].sort((a, b) => a.value - b.value).slice(0, 3));
    expect(await top.explain({ print: false })).toMatch(/TopK\(25, Sort\(value desc\)\): the top rows of each block as it arrives/);
    // More rows asked than there are: all of them, sorted.
    expect((await range(10, { parallelism: 3 }).sort('id', { descending: true }).limit(50).takeAll()).map((row) => row.id)).toEqual([9, 8, 7, 6, 5, 4, 3, 2, 1, 0]);
  });

  it('holds its whole input outside the budget: a sort many times larger than the budget runs', async () => {
    const ds = range(100_000, { parallelism: 100 }).map(withParity);
    const sorted = await ds.sort(['parity', 'id'], { descending: [false, true] }).takeAll({ memoryBudgetBytes: 200_000 });
    const expected = [...Array.from({ length: 50_000 }, (_, index) => 99_998 - 2 * index), ...Array.from({ length: 50_000 }, (_, index) => 99_999 - 2 * index)];
    expect(sorted.map((row) => row.id)).toEqual(expected);
  });

  it('sorts strings, puts nulls last, and keeps its order with preserveOrder off', async () => {
    const names = ['pear', null, 'apple', 'fig', null, 'banana', 'cherry', 'apple'];
    const rows = names.map((name, id) => ({ id, name }));
    const sorted = await fromItems(rows, { parallelism: 4 }).sort('name', { numBlocks: 3 }).takeAll({ preserveOrder: false });
    expect(sorted.map((row) => row.name)).toEqual(['apple', 'apple', 'banana', 'cherry', 'fig', 'pear', null, null]);
    const descending = await fromItems(rows, { parallelism: 4 }).sort('name', { descending: true }).takeAll();
    expect(descending.map((row) => row.name)).toEqual(['pear', 'fig', 'cherry', 'banana', 'apple', 'apple', null, null]);
  });

  it('an empty dataset sorts to nothing; a missing key column is a typed error naming it', async () => {
    expect(await range(10).filter(never).sort('id').takeAll()).toEqual([]);
    const error = await rejection(range(10).sort('nope').takeAll());
    expect(error).toBeInstanceOf(DataError);
    expect((error as DataError).code).toBe('ERR_DATA_COLUMN');
    expect((error as Error).message).toMatch(/no column 'nope'.*id/);
    const plan = await range(10).sort('id', { descending: true }).groupBy('id').count().explain({ print: false });
    expect(plan).toMatch(/Sort\(id desc\): all-to-all after all input arrives, sample, map and reduce tasks/);
    expect(plan).toMatch(/Aggregate\(count\(\)\) by id: a partial task per block/);
    expect(() => range(10).sort([])).toThrow(InvalidArgumentError);
    expect(() => range(10).sort('id', { descending: [true, false] })).toThrow(/one boolean per key/);
  });
});

describe('randomShuffle', () => {
  it('is a permutation of the rows; a seed gives the same order every run', async () => {
    const ds = range(2000, { parallelism: 8 });
    const first = (await ds.randomShuffle({ seed: 42, numBlocks: 4 }).takeAll()).map((row) => row.id as number);
    const again = (await ds.randomShuffle({ seed: 42, numBlocks: 4 }).takeAll()).map((row) => row.id as number);
    const other = (await ds.randomShuffle({ seed: 43, numBlocks: 4 }).takeAll()).map((row) => row.id as number);
    expect([...first].sort((a, b) => a - b)).toEqual(Array.from({ length: 2000 }, (_, id) => id));
    expect(again).toEqual(first);
    expect(other).not.toEqual(first);
    // Rows move across blocks: the first block's rows are not the first 500 ids.
    expect(first.slice(0, 500).filter((id) => id >= 500).length).toBeGreaterThan(200);
    expect(() => ds.randomShuffle({ seed: -1 })).toThrow(/seed/);
  });
});

describe('aggregations', () => {
  const values = numbers(5000, 3, 1000).map((value, id) => ({ id, group: `g${value % 7}`, value, maybe: id % 10 === 0 ? null : value / 10 }));

  it('groupBy().aggregate() gives one sorted row per group, equal to a plain computation', async () => {
    const ds = fromItems(values, { parallelism: 40 });
    const grouped = ds.groupBy('group').aggregate(Count(), Sum('value'), Min('value'), Max('value'), Mean('maybe'), Std('value'), AbsMax('value'), Count('maybe'), Quantile('value', { q: 0.9 }));
    const out = await grouped.takeAll();
    expect(grouped.stats()!.operators[1]).toMatchObject({ blocksDone: 40, rowsDone: 7, done: true });
    const groups = [...new Set(values.map((row) => row.group))].sort();
    expect(out.map((row) => row.group)).toEqual(groups);
    for (const row of out) {
      const members = values.filter((value) => value.group === row.group);
      const numbersOf = members.map((member) => member.value);
      const present = members.map((member) => member.maybe).filter((maybe): maybe is number => maybe !== null);
      const mean = numbersOf.reduce((a, b) => a + b, 0) / numbersOf.length;
      const std = Math.sqrt(numbersOf.reduce((sum, x) => sum + (x - mean) ** 2, 0) / (numbersOf.length - 1));
      expect(row['count()']).toBe(members.length);
      expect(row['sum(value)']).toBe(numbersOf.reduce((a, b) => a + b, 0));
      expect(row['min(value)']).toBe(Math.min(...numbersOf));
      expect(row['max(value)']).toBe(Math.max(...numbersOf));
      expect(row['abs_max(value)']).toBe(Math.max(...numbersOf));
      expect(row['mean(maybe)']).toBeCloseTo(present.reduce((a, b) => a + b, 0) / present.length, 9);
      expect(row['std(value)']).toBeCloseTo(std, 9);
      expect(row['count(maybe)']).toBe(present.length);
      const sorted = [...numbersOf].sort((a, b) => a - b);
      const at = 0.9 * (sorted.length - 1);
      expect(row['quantile(value, 0.9)']).toBeCloseTo(sorted[Math.floor(at)] + (sorted[Math.ceil(at)] - sorted[Math.floor(at)]) * (at - Math.floor(at)), 9);
    }
  });

  it('shortcuts, several keys, aliases, ignoreNulls false, and Unique', async () => {
    const ds = fromItems(values, { parallelism: 16 }).map(withParity);
    const counts = await ds.groupBy(['parity', 'group']).count().takeAll();
    expect(counts.length).toBe(14);
    expect(counts.reduce((sum, row) => sum + (row['count()'] as number), 0)).toBe(values.length);
    expect(counts.map((row) => `${row.parity}${row.group}`)).toEqual([...counts.map((row) => `${row.parity}${row.group}`)].sort());
    const medians = await ds.groupBy('parity').quantile('value', { q: 0.5 }).takeAll();
    expect(medians.map((row) => Object.keys(row))).toEqual([['parity', 'quantile(value, 0.5)'], ['parity', 'quantile(value, 0.5)']]);
    const sums = await ds.groupBy('parity').sum(['value', 'id']).takeAll();
    expect(sums.map((row) => Object.keys(row))).toEqual([['parity', 'sum(value)', 'sum(id)'], ['parity', 'sum(value)', 'sum(id)']]);
    const strict = await ds.groupBy('parity').aggregate(Sum('maybe', { ignoreNulls: false, alias: 'strict' }), Sum('maybe', { alias: 'lenient' })).takeAll();
    const parityHasNull = [0, 1].map((parity) => values.some((row) => row.value % 2 === parity && row.maybe === null));
    expect(parityHasNull).toContain(true);
    expect(strict.map((row) => row.strict === null)).toEqual(parityHasNull);
    expect(strict.every((row) => typeof row.lenient === 'number')).toBe(true);
    const unique = await fromItems([{ k: 1, v: 'b' }, { k: 1, v: 'a' }, { k: 2, v: null }, { k: 1, v: 'b' }]).groupBy('k').aggregate(Unique('v')).takeAll();
    expect(unique).toEqual([{ k: 1, 'unique(v)': ['a', 'b'] }, { k: 2, 'unique(v)': [null] }]);
    expect(() => ds.groupBy('group').aggregate(Sum('value'), Sum('value'))).toThrow(/named 'sum\(value\)'/);
    expect(() => ds.groupBy('group').aggregate()).toThrow(/at least one aggregation/);
  });

  it('streams through a job many times larger than its budget, merging partial states', async () => {
    // 200 read tasks; the budget holds a few blocks at once.
    const ds = range(200_000, { parallelism: 200 }).map(withParity);
    const out = await ds.groupBy('parity').aggregate(Count(), Sum('id')).takeAll({ memoryBudgetBytes: 400_000 });
    expect(out).toEqual([
      { parity: 0, 'count()': 100_000, 'sum(id)': sumOfParity(200_000, 0) },
      { parity: 1, 'count()': 100_000, 'sum(id)': sumOfParity(200_000, 1) },
    ]);
  });

  it('Dataset aggregations: sum, min, max, mean, std, unique, aggregate(); empty datasets', async () => {
    const ds = range(100, { parallelism: 4 });
    expect(await ds.sum('id')).toBe(4950);
    expect(await ds.min('id')).toBe(0);
    expect(await ds.max('id')).toBe(99);
    expect(await ds.mean('id')).toBe(49.5);
    expect(await ds.std('id', { ddof: 0 })).toBeCloseTo(Math.sqrt((100 * 100 - 1) / 12), 9);
    expect(await fromItems([{ x: 'b' }, { x: 'a' }, { x: 'b' }]).unique('x')).toEqual(['a', 'b']);
    expect(await ds.aggregate(Count(), Max('id', { alias: 'top' }))).toEqual({ 'count()': 100, top: 99 });
    expect(await ds.aggregate(Quantile('id'), Quantile('id', { q: 0.25, alias: 'p25' }))).toEqual({ 'quantile(id, 0.5)': 49.5, p25: 24.75 });
    expect(() => Quantile('id', { q: 2 })).toThrow(/q must be a number in \[0, 1\]/);
    // Few values fit the sketch whole: the approximate median is one of the two middle values.
    expect([49, 50]).toContain((await ds.aggregate(ApproximateQuantile('id')))['approx_quantile(id, 0.5)']);
    // Per group, across blocks and workers: within 2% of the exact medians (1497, 1498, 1499).
    const medians = await fromItems(Array.from({ length: 3000 }, (_, id) => ({ g: id % 3, id })), { parallelism: 6 }).groupBy('g').aggregate(ApproximateQuantile('id', { accuracy: 32, alias: 'median' })).takeAll();
    expect(medians.map((row) => row.g)).toEqual([0, 1, 2]);
    for (const row of medians) expect(Math.abs((row.median as number) - 1498)).toBeLessThan(60);
    const empty = ds.filter(never);
    expect(await empty.aggregate(Count(), Sum('id'))).toEqual({ 'count()': 0, 'sum(id)': null });
    expect(await empty.sum('id')).toBeNull();
    expect(await empty.groupBy('id').count().takeAll()).toEqual([]);
    const missing = await rejection(ds.sum('nope'));
    expect((missing as DataError).code).toBe('ERR_DATA_COLUMN');
    // int64 columns sum to a bigint.
    expect(await fromItems([{ big: 2n ** 60n }, { big: 1n }]).sum('big')).toBe(2n ** 60n + 1n);
  });
});

describe('mapGroups', () => {
  it('calls the function once per group with all of its rows', async () => {
    const rows = numbers(3000, 11, 50).map((key, id) => ({ id, key, value: id % 13 }));
    const out = await fromItems(rows, { parallelism: 20 }).groupBy('key').mapGroups(summarizeGroup, { numBlocks: 4 }).takeAll();
    const expected = new Map<number, { size: number; total: number }>();
    for (const row of rows) {
      const entry = expected.get(row.key) ?? { size: 0, total: 0 };
      entry.size++;
      entry.total += row.value;
      expected.set(row.key, entry);
    }
    expect(out.length).toBe(expected.size);
    for (const row of out) expect({ size: row.size, total: row.total }).toEqual(expected.get(row.key as number));
  });

  it('a throwing group fails the job naming the operator and the original error', async () => {
    const rows = Array.from({ length: 40 }, (_, id) => ({ id, key: id % 4 }));
    const error = await rejection(fromItems(rows, { parallelism: 4 }).groupBy('key').mapGroups(failOnGroup, { batchFormat: 'rows', fnArgs: [2] }).takeAll());
    expect(error).toBeInstanceOf(DataError);
    expect((error as DataError).code).toBe('ERR_DATA_UDF_FAILED');
    expect((error as Error).message).toMatch(/MapGroups\(failOnGroup\).*bad group 2/);
  });
});

describe('column operations', () => {
  it('select, drop, rename and add columns, fused into the tasks before them', async () => {
    const ds = fromItems([{ a: 1, b: 'x', c: true }, { a: 2, b: 'y', c: false }]);
    expect(await ds.selectColumns(['c', 'a']).takeAll()).toEqual([{ c: true, a: 1 }, { c: false, a: 2 }]);
    expect(await ds.dropColumns('b').takeAll()).toEqual([{ a: 1, c: true }, { a: 2, c: false }]);
    expect(await ds.renameColumns({ a: 'alpha' }).takeAll()).toEqual([{ alpha: 1, b: 'x', c: true }, { alpha: 2, b: 'y', c: false }]);
    const added = await range(6, { parallelism: 2 }).addColumn('scaled', scaledId, { fnArgs: [3] }).takeAll();
    expect(added).toEqual(Array.from({ length: 6 }, (_, id) => ({ id, scaled: id * 3 })));
    const plan = await range(6).map(withParity).selectColumns('id').explain({ print: false });
    expect(plan).toMatch(/ReadRange->Map\(withParity\)->SelectColumns\(id\)/);
  });

  it('randomSample keeps about its fraction; a seed gives the same sample every run', async () => {
    const ds = range(5000, { parallelism: 10 });
    const first = (await ds.randomSample(0.2, { seed: 9 }).takeAll({ preserveOrder: false })).map((row) => row.id as number).sort((a, b) => a - b);
    expect(first.length).toBeGreaterThan(850);
    expect(first.length).toBeLessThan(1150);
    const again = (await ds.randomSample(0.2, { seed: 9 }).takeAll()).map((row) => row.id as number);
    expect(again).toEqual(first);
    expect(await ds.randomSample(0).count()).toBe(0);
    expect(await ds.randomSample(1).count()).toBe(5000);
    expect(() => ds.randomSample(1.5)).toThrow(/fraction in \[0, 1\]/);
  });

  it('bad columns are typed errors naming them', async () => {
    const ds = fromItems([{ a: 1, b: 2 }]);
    const error = await rejection(ds.selectColumns(['a', 'nope']).takeAll());
    expect((error as Error).message).toMatch(/no column 'nope' \(the columns are: a, b\)/);
    expect(await rejection(ds.renameColumns({ a: 'b' }).takeAll())).toHaveProperty('message', expect.stringMatching(/two columns would be named 'b'/));
    const short = await rejection(range(5).addColumn('x', shortColumn).takeAll());
    expect((short as Error).message).toMatch(/AddColumn\(x\).*shortColumn returned 1 values for a batch of 2 rows/);
    expect(() => ds.renameColumns({})).toThrow(InvalidArgumentError);
    expect(() => ds.selectColumns([])).toThrow(InvalidArgumentError);
  });
});

function sumOfParity(count: number, parity: number): number {
  let sum = 0;
  for (let id = parity; id < count; id += 2) sum += id;
  return sum;
}

describe('union', () => {
  it("gives each input's rows in order, input by input, each input fused on its own", async () => {
    const a = fromItems(Array.from({ length: 50 }, (_, id) => ({ id })), { parallelism: 3 });
    const b = fromItems(Array.from({ length: 30 }, (_, index) => ({ id: 1000 + index })), { parallelism: 4 }).map(withParity).selectColumns('id');
    const c = range(5).filter(never);
    const both = a.union(b, c);
    expect((await both.takeAll()).map((row) => row.id)).toEqual([...Array.from({ length: 50 }, (_, id) => id), ...Array.from({ length: 30 }, (_, index) => 1000 + index)]);
    expect(await both.count()).toBe(80);
    // What follows the union runs on all of it: a map, an aggregation, a sort, a union again.
    expect(await both.map(withParity).groupBy('parity').count().takeAll()).toEqual([{ parity: 0, 'count()': 40 }, { parity: 1, 'count()': 40 }]);
    expect((await both.sort('id', { descending: true }).take(2)).map((row) => row.id)).toEqual([1029, 1028]);
    expect(await both.union(a).count()).toBe(130);
    // int32 ids (range) and float64 ones (rows) meet as float64; text against numbers is refused.
    expect((await range(3).union(fromItems([{ id: 0.5 }])).sort('id').takeAll()).map((row) => row.id)).toEqual([0, 0.5, 1, 2]);
    const mixed = await rejection(range(5).union(fromItems([{ id: 'x' }])).sort('id').takeAll());
    expect((mixed as DataError).code).toBe('ERR_DATA_SCHEMA');
    const plan = await both.explain({ print: false });
    expect(plan).toMatch(/Union\(3\): its inputs' blocks in the driver/);
    expect(plan).toMatch(/2\.1\. FromItems: 4 blocks/);
    expect(plan).toMatch(/2\.2\. Map\(withParity\)->SelectColumns\(id\)/);
  });

  it('without preserveOrder the inputs run at once; a limit stops them all', async () => {
    const rows = await range(40, { parallelism: 4 }).union(range(40, { parallelism: 4 }).map(withParity)).takeAll({ preserveOrder: false });
    expect(rows.length).toBe(80);
    expect(await range(1000, { parallelism: 10 }).union(range(1000, { parallelism: 10 })).limit(5).count()).toBe(5);
    expect(() => range(3).union()).toThrow(/one or more datasets/);
  });
});

describe('splits', () => {
  it('split, splitAt and trainTestSplit cut the rows without copies, in order', async () => {
    const ds = range(10, { parallelism: 3 });
    const parts = await ds.split(3);
    expect(await Promise.all(parts.map(async (part) => (await part.takeAll()).map((row) => row.id)))).toEqual([[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]);
    expect(await Promise.all((await ds.split(3, { equal: true })).map((part) => part.count()))).toEqual([3, 3, 3]);
    const at = await ds.splitAt([2, 5, 5]);
    expect(await Promise.all(at.map(async (part) => (await part.takeAll()).map((row) => row.id)))).toEqual([[0, 1], [2, 3, 4], [], [5, 6, 7, 8, 9]]);
    const [train, test] = await ds.trainTestSplit(0.2);
    expect((await test.takeAll()).map((row) => row.id)).toEqual([8, 9]);
    expect(await train.count()).toBe(8);
    // Shuffled first, with a seed: the same split every run, every row once.
    const [shuffledTrain, shuffledTest] = await ds.trainTestSplit(3, { shuffle: true, seed: 5 });
    const again = (await (await ds.trainTestSplit(3, { shuffle: true, seed: 5 }))[1].takeAll()).map((row) => row.id);
    const testIds = (await shuffledTest.takeAll()).map((row) => row.id as number);
    expect(testIds).toEqual(again);
    expect([...testIds, ...(await shuffledTrain.takeAll()).map((row) => row.id as number)].sort((a, b) => a - b)).toEqual(Array.from({ length: 10 }, (_, id) => id));
    await expect(ds.splitAt([3, 1])).rejects.toThrow(/ascending/);
    await expect(ds.trainTestSplit(1.5)).rejects.toThrow(/fraction/);
  });
});

describe('join', () => {
  /** A plain nested-loop join of rows, for comparison (keys as JSON strings, nulls matching nothing). */
  function expectedJoin(left: Row[], right: Row[], on: string, rightOn: string, how: string, rightColumns: string[], suffix = '_right'): Row[] {
    const out: Row[] = [];
    const matchedRight = new Set<number>();
    const leftColumns = Object.keys(left[0]);
    const rename = (column: string) => (leftColumns.includes(column) ? `${column}${suffix}` : column);
    const nullRight = Object.fromEntries(rightColumns.map((column) => [rename(column), null]));
    for (const row of left) {
      const matches = right.map((other, index) => [other, index] as const).filter(([other]) => row[on] !== null && other[rightOn] === row[on]);
      for (const [other, index] of matches) {
        matchedRight.add(index);
        out.push({ ...row, ...Object.fromEntries(rightColumns.map((column) => [rename(column), other[column]])) });
      }
      if (matches.length === 0 && (how === 'left' || how === 'outer')) out.push({ ...row, ...nullRight });
    }
    if (how === 'right' || how === 'outer') {
      right.forEach((other, index) => {
        if (matchedRight.has(index)) return;
        const nullLeft = Object.fromEntries(leftColumns.map((column) => [column, null]));
        out.push({ ...nullLeft, [on]: other[rightOn], ...Object.fromEntries(rightColumns.map((column) => [rename(column), other[column]])) });
      });
    }
    return out;
  }
  const canonical = (rows: Row[]) => rows.map((row) => JSON.stringify(row)).sort();
  const byKey = (rows: Row[]) => [...rows].sort((a, b) => (a.key as number) - (b.key as number));

  const left = Array.from({ length: 300 }, (_, id) => ({ id, key: id % 37 === 0 ? null : id % 50, score: id / 10 }));
  const right = Array.from({ length: 120 }, (_, index) => ({ key: index % 60, name: `n${index}`, score: index }));

  for (const how of ['inner', 'left', 'right', 'outer'] as const) {
    it(`${how} join: every pair of equal keys (many to many), unmatched rows as asked, null keys matching nothing`, async () => {
      const joined = await fromItems(left, { parallelism: 7 }).join(fromItems(right, { parallelism: 3 }), { on: 'key', how, numBlocks: 6 }).takeAll();
      expect(canonical(joined)).toEqual(canonical(expectedJoin(left, right, 'key', 'key', how, ['name', 'score'])));
    });
  }

  it('a side with no rows at all: inner joins make nothing, kept sides come out with their own columns', async () => {
    const some = fromItems([{ key: 1, a: 'x' }, { key: 2, a: 'y' }]);
    const none = fromItems([{ key: 0, b: 'z' }]).filter(never);
    expect(await some.join(none, { on: 'key' }).takeAll()).toEqual([]);
    expect(byKey(await some.join(none, { on: 'key', how: 'left' }).takeAll())).toEqual([{ key: 1, a: 'x' }, { key: 2, a: 'y' }]);
    expect(byKey(await none.join(some, { on: 'key', how: 'right' }).takeAll())).toEqual([{ key: 1, a: 'x' }, { key: 2, a: 'y' }]);
    expect(await none.join(some, { on: 'key', how: 'left' }).takeAll()).toEqual([]);
  });

  it('rightOn pairs differently named keys; explain shows both inputs', async () => {
    const other = right.map((row) => ({ ref: row.key, label: row.name }));
    const joined = await fromItems(left, { parallelism: 3 }).join(fromItems(other).map(withParity), { on: 'key', rightOn: 'ref', rightSuffix: '_r' }).takeAll();
    expect(joined.length).toBe(expectedJoin(left, other, 'key', 'ref', 'inner', ['label']).length);
    expect(joined[0]).toHaveProperty('label');
    expect(joined[0]).not.toHaveProperty('ref');
    const plan = await fromItems(left).join(fromItems(other), { on: 'key', rightOn: 'ref', how: 'left' }).explain({ print: false });
    expect(plan).toMatch(/Join\(left on key = ref\): all-to-all/);
    expect(plan).toMatch(/2\.1\. FromItems/);
    expect(() => fromItems(left).join(fromItems(other), { on: ['key', 'id'], rightOn: 'ref' })).toThrow(/pair up/);
    expect(() => fromItems(left).join(fromItems(other), { on: 'key', how: 'cross' as never })).toThrow(/how must be/);
    const missing = await rejection(fromItems(left).join(fromItems(other), { on: 'key' }).takeAll());
    expect((missing as DataError).code).toBe('ERR_DATA_COLUMN');
  });
});

describe('zip', () => {
  it('puts two datasets of the same rows side by side, row by row, whatever their blocks', async () => {
    const left = range(100, { parallelism: 3 });
    const right = fromItems(Array.from({ length: 100 }, (_, index) => ({ id: index * 2, word: `w${index}` })), { parallelism: 7 });
    const zipped = await left.zip(right).takeAll();
    expect(zipped).toEqual(Array.from({ length: 100 }, (_, index) => ({ id: index, id_1: index * 2, word: `w${index}` })));
    expect(await left.zip(right.selectColumns('word'), { suffix: '_r' }).map(withParity).count()).toBe(100);
    const plan = await left.zip(right).explain({ print: false });
    expect(plan).toMatch(/Zip: after both inputs arrive/);
    const error = await rejection(left.zip(range(99)).takeAll());
    expect((error as DataError).code).toBe('ERR_DATA_ZIP');
    expect((error as Error).message).toMatch(/100, the other 99/);
  });
});
