/**
 * Sort and group keys: reading key columns out of a block, ordering key values (nulls last, as
 * Arrow's sort does by default), and naming a key tuple by a string so that equal keys meet in
 * one group and one hash partition, whichever block or worker saw them.
 */
import { DataType, type Vector } from 'apache-arrow';
import { InvalidArgumentError } from '../errors.js';
import { plain, type Block } from './block.js';

/** A sort key: a column and its direction. */
export interface SortKey {
  column: string;
  descending: boolean;
}

/** The key columns' values, one array per key, read once (cells as rows show them). */
export type KeyColumns = ArrayLike<unknown>[];

/** Whether values of this type have an order trellis sorts and groups by. */
function isOrderable(type: DataType): boolean {
  return (
    DataType.isInt(type) || DataType.isFloat(type) || DataType.isUtf8(type) || DataType.isBool(type) || DataType.isTimestamp(type) ||
    DataType.isDate(type) || DataType.isBinary(type) || DataType.isNull(type) || (DataType.isDictionary(type) && isOrderable(type.dictionary))
  );
}

/** The columns a key names, checked: each exists and holds values with an order. */
export function readKeyColumns(block: Block, columns: readonly string[], what: string): KeyColumns {
  return columns.map((name) => {
    const field = block.schema.fields.find((candidate) => candidate.name === name);
    if (!field) {
      throw new InvalidArgumentError(
        `${what}: no column '${name}' (the columns are: ${block.schema.fields.map((candidate) => candidate.name).join(', ') || 'none'})`,
        'ERR_DATA_COLUMN',
      );
    }
    if (!isOrderable(field.type)) {
      throw new InvalidArgumentError(`${what}: column '${name}' holds ${field.type}, which has no order to sort or group by`, 'ERR_DATA_COLUMN');
    }
    return columnValues(block.getChild(name)!, field.type);
  });
}

/** A column's cells: the flat typed array itself for numbers without nulls. */
export function columnValues(vector: Vector, type: DataType): ArrayLike<unknown> {
  if ((DataType.isInt(type) || DataType.isFloat(type)) && vector.nullCount === 0) return vector.toArray() as ArrayLike<unknown>;
  const values = new Array<unknown>(vector.length);
  for (let index = 0; index < vector.length; index++) values[index] = plain(vector.get(index), type);
  return values;
}

/**
 * Orders two non-null key values: numbers and bigints by value (NaN after every number), strings
 * by code unit, false before true, Dates by time, bytes lexicographically.
 */
export function compareValues(a: unknown, b: unknown): number {
  if (typeof a === 'number' && typeof b === 'number') {
    if (a < b) return -1;
    if (a > b) return 1;
    if (a === b) return 0;
    return Number.isNaN(a) ? (Number.isNaN(b) ? 0 : 1) : -1;
  }
  if (a instanceof Date && b instanceof Date) return compareValues(a.getTime(), b.getTime());
  if (a instanceof Uint8Array && b instanceof Uint8Array) {
    const length = Math.min(a.length, b.length);
    for (let index = 0; index < length; index++) if (a[index] !== b[index]) return a[index] - b[index];
    return a.length - b.length;
  }
  if (typeof a === 'boolean' && typeof b === 'boolean') return Number(a) - Number(b);
  // Strings, bigints, and a number against a bigint (a column read as int64 in one place).
  return (a as number) < (b as number) ? -1 : (a as number) > (b as number) ? 1 : 0;
}

/** Orders two key tuples under the keys' directions; nulls come last in either direction. */
export function compareKeys(a: readonly unknown[], b: readonly unknown[], keys: readonly SortKey[]): number {
  for (let index = 0; index < keys.length; index++) {
    const left = a[index];
    const right = b[index];
    const leftNull = left === null || left === undefined;
    const rightNull = right === null || right === undefined;
    if (leftNull || rightNull) {
      if (leftNull && rightNull) continue;
      return leftNull ? 1 : -1;
    }
    const order = compareValues(left, right);
    if (order !== 0) return keys[index].descending ? -order : order;
  }
  return 0;
}

/** The key tuple of one row. */
export function keyOf(columns: KeyColumns, row: number): unknown[] {
  const key = new Array<unknown>(columns.length);
  for (let index = 0; index < columns.length; index++) key[index] = columns[index][row];
  return key;
}

/** A string that two key tuples share exactly when they are the same group. */
export function groupName(columns: KeyColumns, row: number): string {
  if (columns.length === 1) return valueName(columns[0][row]);
  let name = '';
  for (let index = 0; index < columns.length; index++) name += `${valueName(columns[index][row])}\u0000`;
  return name;
}

function valueName(value: unknown): string {
  if (value === null || value === undefined) return '\u0001null';
  switch (typeof value) {
    case 'number':
      // 0 and -0 are one group; every NaN is one group.
      return Object.is(value, -0) ? 'n0' : `n${value}`;
    case 'string':
      return `s${value}`;
    case 'bigint':
      // An int64 key meets the same number in a float64 column (a join of the two).
      return value >= -9007199254740991n && value <= 9007199254740991n ? `n${value}` : `b${value}`;
    case 'boolean':
      return value ? 't' : 'f';
  }
  if (value instanceof Date) return `d${value.getTime()}`;
  if (value instanceof Uint8Array) return `x${Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString('base64')}`;
  return `o${String(value)}`;
}

/** The partition (of `partitions`) a group name hashes to: FNV-1a over its UTF-16 code units. */
export function hashPartition(name: string, partitions: number): number {
  let hash = 0x811c9dc5;
  for (let index = 0; index < name.length; index++) {
    hash ^= name.charCodeAt(index);
    hash = Math.imul(hash, 0x01000193);
  }
  return (hash >>> 0) % partitions;
}

/** The row order that sorts a block's key tuples (stable: equal keys keep their order). */
export function sortedOrder(columns: KeyColumns, keys: readonly SortKey[], rows: number): Int32Array {
  const order = new Int32Array(rows);
  for (let index = 0; index < rows; index++) order[index] = index;
  if (keys.length === 1 && isPlainNumbers(columns[0])) {
    const values = columns[0] as ArrayLike<number>;
    const sign = keys[0].descending ? -1 : 1;
    // Typed-array sorts are not stable: ties are broken by position.
    return order.sort((a, b) => sign * (values[a] - values[b]) || a - b);
  }
  const tuples = Array.from({ length: rows }, (_, row) => keyOf(columns, row));
  return order.sort((a, b) => compareKeys(tuples[a], tuples[b], keys) || a - b);
}

/** A typed array of numbers (no bigints) without NaN: plain subtraction orders it. */
export function isPlainNumbers(values: ArrayLike<unknown>): boolean {
  if (!ArrayBuffer.isView(values) || values instanceof BigInt64Array || values instanceof BigUint64Array) return false;
  if (values instanceof Float64Array || values instanceof Float32Array) {
    for (let index = 0; index < values.length; index++) if (values[index] !== values[index]) return false;
  }
  return true;
}

/** Mulberry32: a small seeded generator, so that a seeded shuffle is the same on every run. */
export function seededRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Checks and normalizes what sort() and groupBy() were given as keys. */
export function checkKeyColumns(columns: unknown, what: string): string[] {
  const list = typeof columns === 'string' ? [columns] : columns;
  if (!Array.isArray(list) || list.length === 0 || !list.every((column) => typeof column === 'string' && column.length > 0)) {
    throw new InvalidArgumentError(`${what} takes a column name or a non-empty array of them, got ${JSON.stringify(columns)}`, 'ERR_DATA_COLUMN');
  }
  const seen = new Set<string>();
  for (const column of list as string[]) {
    if (seen.has(column)) throw new InvalidArgumentError(`${what}: column '${column}' is named twice`, 'ERR_DATA_COLUMN');
    seen.add(column);
  }
  return list as string[];
}
