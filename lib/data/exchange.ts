/**
 * All-to-all exchanges of rows between blocks (Ray Data's sort, random_shuffle and map_groups):
 * the map side cuts each block into one part per output partition, the reduce side joins a
 * partition's parts and orders them. Pure functions of blocks: workers run them in exchange
 * tasks, and tests run them in-process.
 */
import { type Block, takeRows } from './block.js';
import { compareKeys, groupName, hashPartition, isPlainNumbers, keyOf, readKeyColumns, seededRandom, sortedOrder, type KeyColumns, type SortKey } from './keys.js';
import type { StageSpec } from './stages.js';

/** What an exchange does, as it travels to workers. */
export type ExchangeSpec =
  | { kind: 'sort'; keys: SortKey[] }
  | { kind: 'shuffle'; seed?: number }
  | { kind: 'mapGroups'; keys: string[]; stage: StageSpec };

/** A seed for one task of a shuffle: the job's seed mixed with the task's place, so tasks differ and reruns agree. */
export function taskSeed(seed: number, place: number, salt: number): number {
  let hash = Math.imul(seed ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(place + 1, 0xc2b2ae35) ^ Math.imul(salt + 1, 0x27d4eb2f);
  hash ^= hash >>> 16;
  return hash >>> 0;
}

/** Up to `count` key tuples of a block, evenly spaced through it: the sort's sample. */
export function sampleKeys(block: Block, keys: readonly SortKey[], count: number): unknown[][] {
  const columns = readKeyColumns(block, keys.map((key) => key.column), 'sort');
  const rows = block.numRows;
  const take = Math.min(rows, count);
  const samples: unknown[][] = [];
  for (let index = 0; index < take; index++) samples.push(keyOf(columns, Math.floor(((index + 0.5) * rows) / take)));
  return samples;
}

/**
 * Boundaries of `partitions` ranges from the samples of every block: boundary i is the first key
 * of range i + 1. Equal samples make fewer distinct boundaries, and then empty ranges.
 */
export function rangeBoundaries(samples: unknown[][], keys: readonly SortKey[], partitions: number): unknown[][] {
  const sorted = [...samples].sort((a, b) => compareKeys(a, b, keys));
  const boundaries: unknown[][] = [];
  for (let index = 1; index < partitions && sorted.length > 0; index++) boundaries.push(sorted[Math.min(sorted.length - 1, Math.floor((index * sorted.length) / partitions))]);
  return boundaries;
}

/** The range a key falls in: the number of boundaries at or before it. */
function rangeOf(key: unknown[], boundaries: readonly unknown[][], keys: readonly SortKey[]): number {
  let low = 0;
  let high = boundaries.length;
  while (low < high) {
    const middle = (low + high) >>> 1;
    if (compareKeys(boundaries[middle], key, keys) <= 0) low = middle + 1;
    else high = middle;
  }
  return low;
}

/** The boundaries as plain numbers, where one key of numbers (typed, no NaN) is sorted by numbers. */
function numericBounds(columns: KeyColumns, boundaries: readonly unknown[][], keys: readonly SortKey[]): Float64Array | undefined {
  if (keys.length !== 1 || !isPlainNumbers(columns[0])) return undefined;
  const bounds = new Float64Array(boundaries.length);
  for (let index = 0; index < boundaries.length; index++) {
    const value = boundaries[index][0];
    if (typeof value !== 'number' || Number.isNaN(value)) return undefined;
    bounds[index] = value;
  }
  return bounds;
}

/**
 * The map side: the block's rows cut into `partitions` parts, each keeping the rows' order (null
 * where a part has no rows). A sort cuts by key range, a shuffle at random, mapGroups by a hash
 * of the group's key, so that each group meets in one partition.
 */
export function partitionBlock(block: Block, spec: ExchangeSpec, partitions: number, boundaries: unknown[][], seed: number): Array<Block | null> {
  const rows = block.numRows;
  const target = new Int32Array(rows);
  if (spec.kind === 'sort') {
    const columns = readKeyColumns(block, spec.keys.map((key) => key.column), 'sort');
    const numeric = numericBounds(columns, boundaries, spec.keys);
    if (numeric) {
      // One number key: a search over plain numbers, with no tuple per row.
      const values = columns[0] as ArrayLike<number>;
      const descending = spec.keys[0].descending;
      for (let row = 0; row < rows; row++) {
        const value = values[row];
        let low = 0;
        let high = numeric.length;
        while (low < high) {
          const middle = (low + high) >>> 1;
          if (descending ? numeric[middle] >= value : numeric[middle] <= value) low = middle + 1;
          else high = middle;
        }
        target[row] = low;
      }
    } else {
      for (let row = 0; row < rows; row++) target[row] = rangeOf(keyOf(columns, row), boundaries, spec.keys);
    }
  } else if (spec.kind === 'shuffle') {
    const random = seededRandom(seed);
    for (let row = 0; row < rows; row++) target[row] = Math.floor(random() * partitions);
  } else {
    const columns = readKeyColumns(block, spec.keys, 'groupBy');
    for (let row = 0; row < rows; row++) target[row] = hashPartition(groupName(columns, row), partitions);
  }
  const counts = new Int32Array(partitions);
  for (let row = 0; row < rows; row++) counts[target[row]]++;
  const indices = Array.from(counts, (count) => new Int32Array(count));
  const filled = new Int32Array(partitions);
  for (let row = 0; row < rows; row++) {
    const part = target[row];
    indices[part][filled[part]++] = row;
  }
  return indices.map((part) => (part.length === 0 ? null : part.length === rows ? block : takeRows(block, part)));
}

/** The reduce side of a sort: the partition's rows in key order (stable). */
export function sortBlock(block: Block, keys: readonly SortKey[]): Block {
  if (block.numRows <= 1) return block;
  const columns = readKeyColumns(block, keys.map((key) => key.column), 'sort');
  return takeRows(block, sortedOrder(columns, keys, block.numRows));
}

/** The reduce side of a shuffle: the partition's rows in a random order drawn from `seed`. */
export function shuffleBlock(block: Block, seed: number): Block {
  const rows = block.numRows;
  if (rows <= 1) return block;
  const order = new Int32Array(rows);
  for (let index = 0; index < rows; index++) order[index] = index;
  const random = seededRandom(seed);
  for (let index = rows - 1; index > 0; index--) {
    const other = Math.floor(random() * (index + 1));
    const swap = order[index];
    order[index] = order[other];
    order[other] = swap;
  }
  return takeRows(block, order);
}

/** The groups of a partition: its rows sorted by key, and each group's [start, end) in them. */
export function groupsOf(block: Block, keys: readonly string[]): { sorted: Block; ranges: Array<[number, number]> } {
  const sortKeys = keys.map((column) => ({ column, descending: false }));
  const sorted = sortBlock(block, sortKeys);
  const columns = readKeyColumns(sorted, keys, 'groupBy');
  const ranges: Array<[number, number]> = [];
  let start = 0;
  let name = sorted.numRows > 0 ? groupName(columns, 0) : '';
  for (let row = 1; row <= sorted.numRows; row++) {
    const next = row < sorted.numRows ? groupName(columns, row) : undefined;
    if (next !== name) {
      ranges.push([start, row]);
      start = row;
      name = next ?? '';
    }
  }
  return { sorted, ranges };
}
