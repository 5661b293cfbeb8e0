/**
 * The pure parts of sort, shuffle and aggregation, in-process: key order (NaN, nulls, bigints,
 * dates, bytes), row gathers of every column kind with nulls, partitioning that keeps each
 * part's order, and partial aggregation merged in any grouping equal to one pass.
 */
import { describe, expect, it } from 'vitest';
import { tableFromArrays } from 'apache-arrow';
import { ApproximateQuantile, Count, Max, Mean, Min, Quantile, Std, Sum, Unique } from '../../lib/index.js';
import { finalizeAggregate, mergePartials, partialAggregate } from '../../lib/data/aggregate.js';
import { blockToRows, concatBlocks, rowsToBlock, takeRows } from '../../lib/data/block.js';
import { partitionBlock, rangeBoundaries, shuffleBlock, sortBlock } from '../../lib/data/exchange.js';
import { compareKeys, compareValues } from '../../lib/data/keys.js';

describe('key order', () => {
  it('orders numbers with NaN after them, bigints, strings, booleans, dates and bytes', () => {
    expect([3, Number.NaN, -1, 2].sort(compareValues)).toEqual([-1, 2, 3, Number.NaN]);
    expect([3n, -5n, 2n ** 62n].sort(compareValues)).toEqual([-5n, 3n, 2n ** 62n]);
    expect(['b', 'a', 'ab'].sort(compareValues)).toEqual(['a', 'ab', 'b']);
    expect([true, false].sort(compareValues)).toEqual([false, true]);
    expect([new Date(5), new Date(1)].sort(compareValues)).toEqual([new Date(1), new Date(5)]);
    expect([Uint8Array.of(1, 2), Uint8Array.of(1)].sort(compareValues)).toEqual([Uint8Array.of(1), Uint8Array.of(1, 2)]);
    const keys = [{ column: 'a', descending: true }, { column: 'b', descending: false }];
    expect([[1, 2], [null, 0], [2, 9], [1, 1]].sort((x, y) => compareKeys(x, y, keys))).toEqual([[2, 9], [1, 1], [1, 2], [null, 0]]);
  });
});

describe('row gathers', () => {
  it('take rows of numbers, strings, binary, booleans, lists and structs, with nulls and -1 as a null row', () => {
    const rows = [
      { n: 1, s: 'one', b: Uint8Array.of(1), t: true, l: [1, 2], r: { x: 1 } },
      { n: null, s: null, b: null, t: null, l: null, r: null },
      { n: 3, s: 'three', b: Uint8Array.of(3, 3), t: false, l: [], r: { x: 3 } },
    ];
    const block = concatBlocks([rowsToBlock(rows.slice(0, 2)), rowsToBlock(rows.slice(2), rowsToBlock(rows.slice(0, 2)).schema)]);
    const taken = takeRows(block, Int32Array.of(2, 0, -1, 1, 2));
    const expected = [rows[2], rows[0], rows[1], rows[1], rows[2]];
    expect(blockToRows(taken)).toEqual(expected.map((row) => ({ ...row, b: row.b === null ? null : row.b })));
    expect(taken.schema.fields.map(String)).toEqual(block.schema.fields.map(String));
  });

  it('take rows of a block sliced without a copy (a batch cut from a larger block)', () => {
    const rows = ['aa', 'bbb', 'c', 'dddd', 'ee'].map((s, n) => ({ s, n, b: Uint8Array.of(n) }));
    const sliced = rowsToBlock(rows).slice(1, 4);
    expect(blockToRows(takeRows(sliced, Int32Array.of(2, 0, 1)))).toEqual([rows[3], rows[1], rows[2]]);
  });
});

describe('partitions', () => {
  const block = tableFromArrays({ key: Float64Array.from([5, 1, 4, 1, 3, 9, 2, 6]), id: Int32Array.from([0, 1, 2, 3, 4, 5, 6, 7]) });

  it('a sort cuts by key range, each part in its rows order; parts sorted and joined are the sort', () => {
    const keys = [{ column: 'key', descending: false }];
    const boundaries = rangeBoundaries([[5], [1], [4], [3], [9], [2]], keys, 3);
    const parts = partitionBlock(block, { kind: 'sort', keys }, 3, boundaries, 0);
    const ids = parts.map((part) => (part ? blockToRows(part).map((row) => row.id) : []));
    expect(ids.flat().sort()).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
    for (const part of ids) expect(part).toEqual([...part].sort());
    const sorted = parts.filter((part) => part !== null).map((part) => blockToRows(sortBlock(part!, keys)).map((row) => row.key));
    expect(sorted.flat()).toEqual([1, 1, 2, 3, 4, 5, 6, 9]);
    // The tuple path (a generic key) cuts the same way.
    const generic = partitionBlock(rowsToBlock(blockToRows(block).map((row) => ({ ...row, key: String(row.key) }))), { kind: 'sort', keys }, 3, boundaries.map((b) => [String(b[0])]), 0);
    expect(generic.map((part) => (part ? blockToRows(part).map((row) => row.id) : []))).toEqual(ids);
  });

  it('a shuffle is a permutation, the same for the same seed', () => {
    const once = blockToRows(shuffleBlock(block, 9)).map((row) => row.id);
    expect(blockToRows(shuffleBlock(block, 9)).map((row) => row.id)).toEqual(once);
    expect([...once].sort()).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
    const parts = partitionBlock(block, { kind: 'shuffle' }, 3, [], 4);
    expect(parts.flatMap((part) => (part ? blockToRows(part).map((row) => row.id) : [])).sort()).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
  });
});

describe('partial aggregation', () => {
  it('approximates quantiles in bounded memory, merged in any grouping', () => {
    // 60,000 values shuffled by a seeded permutation, 12 blocks, merged 4 at a time.
    const count = 60_000;
    const order = Array.from({ length: count }, (_, index) => index);
    let state = 7;
    for (let index = count - 1; index > 0; index--) {
      state = (state * 48271) % 2147483647;
      const other = state % (index + 1);
      [order[index], order[other]] = [order[other], order[index]];
    }
    const quantiles = [0.01, 0.25, 0.5, 0.9, 0.99];
    const plan = { keys: [], aggregations: quantiles.map((q) => ApproximateQuantile('x', { q, accuracy: 128 })) };
    let partials = Array.from({ length: 12 }, (_, block) => partialAggregate(rowsToBlock(order.slice(block * 5000, (block + 1) * 5000).map((x) => ({ x }))), plan));
    // Each partial holds a sketch, not its 5,000 values.
    expect((blockToRows(partials[0])[0] as Record<string, number[]>)[Object.keys(blockToRows(partials[0])[0]).find((name) => name.endsWith('w'))!].length).toBeLessThan(2 * 128 * 8);
    while (partials.length > 1) partials = Array.from({ length: Math.ceil(partials.length / 4) }, (_, group) => mergePartials(partials.slice(group * 4, group * 4 + 4), plan)!);
    const [result] = blockToRows(finalizeAggregate(partials[0], plan));
    quantiles.forEach((q) => {
      const value = result[`approx_quantile(x, ${q})`] as number;
      // Values are 0..count-1, so a value is its rank: within 2% of the count.
      expect(Math.abs(value - q * (count - 1)) / count, `q ${q}`).toBeLessThan(0.02);
    });
    expect(() => ApproximateQuantile('x', { accuracy: 4 })).toThrow(/accuracy must be an integer from 8/);
    const empty = finalizeAggregate(undefined, plan);
    expect(blockToRows(empty)[0]['approx_quantile(x, 0.5)']).toBeNull();
  });

  it('merged in any grouping, equals one pass (std merged exactly)', () => {
    const rows = Array.from({ length: 300 }, (_, id) => ({ g: id % 3, x: Math.sin(id) * 100, s: `v${id % 5}` }));
    const plan = { keys: ['g'], aggregations: [Count(), Sum('x'), Min('s'), Max('x'), Mean('x'), Std('x'), Unique('s'), Quantile('x', { q: 0.3 })] };
    const whole = blockToRows(finalizeAggregate(partialAggregate(rowsToBlock(rows), plan), plan));
    const pieces = [rows.slice(0, 7), rows.slice(7, 150), rows.slice(150, 151), rows.slice(151)].map((piece) => partialAggregate(rowsToBlock(piece), plan));
    const merged = blockToRows(finalizeAggregate(mergePartials([mergePartials(pieces.slice(0, 2), plan)!, ...pieces.slice(2)], plan), plan));
    expect(merged.length).toBe(3);
    merged.forEach((row, index) => {
      for (const [name, value] of Object.entries(row)) {
        if (typeof value === 'number') expect(value).toBeCloseTo(whole[index][name] as number, 9);
        else expect(value).toEqual(whole[index][name]);
      }
    });
    expect(merged[0]['unique(s)']).toEqual(['v0', 'v1', 'v2', 'v3', 'v4']);
    expect(merged[0]['min(s)']).toBe('v0');
  });
});
