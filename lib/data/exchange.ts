/**
 * All-to-all exchanges of rows between blocks (Ray Data's sort, random_shuffle and map_groups):
 * the map side cuts each block into one part per output partition, the reduce side joins a
 * partition's parts and orders them. Pure functions of blocks: workers run them in exchange
 * tasks, and tests run them in-process.
 */
import { Table, type Vector } from 'apache-arrow';
import { InvalidArgumentError } from '../errors.js';
import type { AggregationPlan } from './aggregate.js';
import { type Block, concatBlocks, plain, tableOfVectors, takeRows, vectorOf } from './block.js';
import { compareKeys, groupName, hashPartition, isPlainNumbers, keyOf, readKeyColumns, seededRandom, sortedOrder, type KeyColumns, type SortKey } from './keys.js';
import type { StageSpec } from './stages.js';

export type JoinType = 'inner' | 'left' | 'right' | 'outer';

/**
 * What a streaming reduction keeps of its input: aggregations' partial states, or (a sort
 * followed by a limit) the top rows by the sort's keys.
 */
export type Reduction = { kind: 'aggregate'; plan: AggregationPlan } | { kind: 'topk'; keys: SortKey[]; rows: number };

/** The first `rows` rows of `blocks` by `keys` (stable within what it is given), as one block. */
export function topRows(blocks: readonly Block[], keys: readonly SortKey[], rows: number): Block {
  const cut = blocks.map((block) => (block.numRows > rows ? sortBlock(block, keys).slice(0, rows) : block));
  const joined = concatBlocks(cut);
  return joined.numRows === 0 ? joined : sortBlock(joined, keys).slice(0, rows);
}

/** What an exchange does, as it travels to workers. */
export type ExchangeSpec =
  | { kind: 'sort'; keys: SortKey[] }
  | { kind: 'shuffle'; seed?: number }
  | { kind: 'mapGroups'; keys: string[]; stage: StageSpec }
  | { kind: 'join'; leftKeys: string[]; rightKeys: string[]; how: JoinType; rightSuffix: string }
  /** The map side of a join's input: rows by a hash of these keys. */
  | { kind: 'hash'; keys: string[] };

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
  } else if (spec.kind === 'mapGroups' || spec.kind === 'hash') {
    const columns = readKeyColumns(block, spec.keys, spec.kind === 'hash' ? 'join' : 'groupBy');
    for (let row = 0; row < rows; row++) target[row] = hashPartition(groupName(columns, row), partitions);
  } else {
    throw new Error(`a ${spec.kind} is cut by its inputs' hash specs`);
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

/** Whether a row's key has a null: such a row matches nothing (as in SQL). */
function hasNullKey(columns: KeyColumns, row: number): boolean {
  for (const column of columns) if (column[row] === null || column[row] === undefined) return true;
  return false;
}

/**
 * The reduce side of a join: a partition's left and right rows (either may have none, as an empty
 * block of its side's schema) paired on equal keys. Output columns: the left's, then the right's
 * but its keys, a name the left has taking `rightSuffix`. Unmatched rows of a kept side get nulls
 * on the other; in right and outer joins the key columns take the right's key where there is no
 * left row.
 */
export function joinBlocks(left: Block, right: Block, spec: Extract<ExchangeSpec, { kind: 'join' }>): Block {
  // A side whose input had no blocks at all has no schema either: its rows are none, its columns
  // unknown, so the kept side's rows come out with its own columns only.
  const unknown = (side: Block) => side.numRows === 0 && side.schema.fields.length === 0;
  if (unknown(right)) return spec.how === 'left' || spec.how === 'outer' ? left : left.slice(0, 0);
  if (unknown(left)) {
    if (spec.how !== 'right' && spec.how !== 'outer') return right.slice(0, 0);
    const names = new Map(spec.rightKeys.map((key, index) => [key, spec.leftKeys[index]]));
    const columns: Record<string, Vector> = {};
    for (const field of right.schema.fields) columns[names.get(field.name) ?? field.name] = right.getChild(field.name)!;
    return tableOfVectors(columns, new Map(right.schema.fields.map((field) => [names.get(field.name) ?? field.name, field])));
  }
  const leftKeys = readKeyColumns(left, spec.leftKeys, 'join');
  const rightKeys = readKeyColumns(right, spec.rightKeys, 'join');
  const byName = new Map<string, number[]>();
  for (let row = 0; row < right.numRows; row++) {
    if (hasNullKey(rightKeys, row)) continue;
    const name = groupName(rightKeys, row);
    const rows = byName.get(name);
    if (rows) rows.push(row);
    else byName.set(name, [row]);
  }
  const leftRows: number[] = [];
  const rightRows: number[] = [];
  const matched = new Uint8Array(right.numRows);
  const keepLeft = spec.how === 'left' || spec.how === 'outer';
  for (let row = 0; row < left.numRows; row++) {
    const matches = hasNullKey(leftKeys, row) ? undefined : byName.get(groupName(leftKeys, row));
    if (matches) {
      for (const match of matches) {
        leftRows.push(row);
        rightRows.push(match);
        matched[match] = 1;
      }
    } else if (keepLeft) {
      leftRows.push(row);
      rightRows.push(-1);
    }
  }
  if (spec.how === 'right' || spec.how === 'outer') {
    for (let row = 0; row < right.numRows; row++) {
      if (matched[row]) continue;
      leftRows.push(-1);
      rightRows.push(row);
    }
  }
  const leftTaken = takeRows(left, Int32Array.from(leftRows));
  const rightTaken = takeRows(right, Int32Array.from(rightRows));
  const columns: Record<string, Vector> = {};
  const fields = new Map(left.schema.fields.map((field) => [field.name, field]));
  const coalesce = spec.how === 'right' || spec.how === 'outer';
  for (const field of left.schema.fields) {
    const keyIndex = spec.leftKeys.indexOf(field.name);
    if (keyIndex >= 0 && coalesce) {
      const leftValues = leftTaken.getChild(field.name)!;
      const rightValues = rightTaken.getChild(spec.rightKeys[keyIndex])!;
      const rightType = right.schema.fields.find((candidate) => candidate.name === spec.rightKeys[keyIndex])!.type;
      const values = leftRows.map((row, index) => (row >= 0 ? plain(leftValues.get(index), field.type) : plain(rightValues.get(index), rightType)));
      columns[field.name] = vectorOf(values, field.type);
    } else {
      columns[field.name] = leftTaken.getChild(field.name)!;
    }
  }
  for (const field of right.schema.fields) {
    if (spec.rightKeys.includes(field.name)) continue;
    const name = field.name in columns ? `${field.name}${spec.rightSuffix}` : field.name;
    if (name in columns) throw new InvalidArgumentError(`join: column '${name}' is on both sides even with the suffix '${spec.rightSuffix}'`, 'ERR_DATA_COLUMN');
    columns[name] = rightTaken.getChild(field.name)!;
    fields.set(name, field);
  }
  return tableOfVectors(columns, fields);
}
