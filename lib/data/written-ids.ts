/**
 * The ids a checkpointed write recorded, as a resumed job tests its rows against them: read out of
 * any Arrow column of integers or strings, gathered and sorted once in the driver (numbers and
 * 64-bit integers by value, strings by their UTF-8 bytes), stored as one block, and searched in
 * place by binary search in each worker, zero-copy: no per-worker hash table of millions of ids.
 */
import { Data, DataType, Float64, Int64, Table, Utf8, makeData, makeVector, type Vector } from 'apache-arrow';
import { DataError } from '../errors.js';
import type { Block } from './block.js';

function idError(message: string): DataError {
  return new DataError('ERR_DATA_CHECKPOINT_ID', message);
}

/** A column's ids, copied out: numbers, 64-bit integers, or UTF-8 strings end to end. */
export type IdValues = NumberIds | BigintIds | StringIds;
type NumberIds = { kind: 'number'; values: Float64Array };
type BigintIds = { kind: 'bigint'; values: BigInt64Array };
type StringIds = { kind: 'string'; offsets: Int32Array; bytes: Uint8Array };

function kindOf(type: DataType): IdValues['kind'] | undefined {
  if (DataType.isDictionary(type)) return kindOf(type.dictionary);
  if (DataType.isInt(type)) return type.bitWidth === 64 ? 'bigint' : 'number';
  if (DataType.isFloat(type)) return 'number';
  if (DataType.isUtf8(type) || DataType.isLargeUtf8(type)) return 'string';
  return undefined;
}

const encoder = new TextEncoder();

/** The ids of `block`'s rows in `column`: every row must have one. */
export function idValuesOf(block: Block, column: string, what: string): IdValues {
  const vector = block.getChild(column);
  if (!vector) {
    const names = block.schema.fields.map((field) => field.name);
    throw idError(`${what}: the checkpoint's id column '${column}' is not in the rows (the columns are: ${names.join(', ') || 'none'}); keep it from the read through every stage to the sink`);
  }
  const kind = kindOf(vector.type);
  if (!kind) throw idError(`${what}: the id column '${column}' holds ${vector.type}; ids must be integers or strings`);
  if (vector.nullCount > 0) {
    for (let row = 0; row < vector.length; row++) {
      if (!vector.isValid(row)) throw idError(`${what}: row ${row} has no id (column '${column}' is null there); every row needs one to be checkpointed`);
    }
  }
  if (kind === 'number') {
    const values = Float64Array.from(vector.toArray() as ArrayLike<number>);
    for (let row = 0; row < values.length; row++) {
      if (Number.isNaN(values[row])) throw idError(`${what}: row ${row} has NaN as its id in column '${column}'`);
    }
    return { kind, values };
  }
  if (kind === 'bigint') {
    const source = vector.toArray() as ArrayLike<bigint>;
    const values = new BigInt64Array(source.length);
    for (let row = 0; row < source.length; row++) values[row] = BigInt.asIntN(64, source[row]);
    return { kind, values };
  }
  return stringIds(vector);
}

function stringIds(vector: Vector): IdValues {
  const chunks = vector.data as Data[];
  const plainUtf8 = chunks.every((chunk) => DataType.isUtf8(chunk.type));
  const offsets = new Int32Array(vector.length + 1);
  if (!plainUtf8) {
    // Dictionaries and large strings: through their values (rare for an id column).
    const encoded: Uint8Array[] = [];
    let total = 0;
    for (let row = 0; row < vector.length; row++) {
      const bytes = encoder.encode(String(vector.get(row)));
      encoded.push(bytes);
      total += bytes.length;
      offsets[row + 1] = total;
    }
    const bytes = new Uint8Array(total);
    encoded.forEach((piece, row) => bytes.set(piece, offsets[row]));
    return { kind: 'string', offsets, bytes };
  }
  let total = 0;
  for (const chunk of chunks) total += chunk.valueOffsets[chunk.length] - chunk.valueOffsets[0];
  const bytes = new Uint8Array(total);
  let row = 0;
  let at = 0;
  for (const chunk of chunks) {
    // A sliced chunk's valueOffsets start at its first row (Arrow slices them with the chunk).
    const first = chunk.valueOffsets[0];
    const last = chunk.valueOffsets[chunk.length];
    bytes.set((chunk.values as Uint8Array).subarray(first, last), at);
    for (let local = 0; local < chunk.length; local++) offsets[++row] = at + chunk.valueOffsets[local + 1] - first;
    at += last - first;
  }
  return { kind: 'string', offsets, bytes };
}

export function idCount(ids: IdValues): number {
  return ids.kind === 'string' ? ids.offsets.length - 1 : ids.values.length;
}

export function concatIds(parts: readonly IdValues[], what: string): IdValues | undefined {
  if (parts.length === 0) return undefined;
  const kinds = new Set(parts.map((part) => part.kind));
  if (kinds.has('string') && kinds.size > 1) throw idError(`${what}: ids are strings in some rows and numbers in others`);
  if (kinds.has('string')) {
    const strings = parts as Array<StringIds>;
    const count = strings.reduce((sum, part) => sum + part.offsets.length - 1, 0);
    const total = strings.reduce((sum, part) => sum + part.bytes.length, 0);
    if (total > 0x7fffffff) throw idError(`${what}: over 2 GiB of string ids`);
    const offsets = new Int32Array(count + 1);
    const bytes = new Uint8Array(total);
    let row = 0;
    let at = 0;
    for (const part of strings) {
      bytes.set(part.bytes, at);
      for (let local = 1; local < part.offsets.length; local++) offsets[++row] = at + part.offsets[local];
      at += part.bytes.length;
    }
    return { kind: 'string', offsets, bytes };
  }
  if (kinds.has('bigint')) {
    // Integers of any width together: the narrower ones widen exactly.
    const count = parts.reduce((sum, part) => sum + idCount(part), 0);
    const values = new BigInt64Array(count);
    let at = 0;
    for (const part of parts as Array<NumberIds | BigintIds>) {
      if (part.kind === 'bigint') values.set(part.values, at);
      else {
        for (let index = 0; index < part.values.length; index++) {
          const value = part.values[index];
          if (!Number.isInteger(value)) throw idError(`${what}: id ${value} is not an integer, while other ids are 64-bit integers`);
          values[at + index] = BigInt(value);
        }
      }
      at += idCount(part);
    }
    return { kind: 'bigint', values };
  }
  const numbers = parts as Array<NumberIds>;
  const values = new Float64Array(numbers.reduce((sum, part) => sum + part.values.length, 0));
  let at = 0;
  for (const part of numbers) {
    values.set(part.values, at);
    at += part.values.length;
  }
  return { kind: 'number', values };
}

export function idsToVector(ids: IdValues): Vector {
  if (ids.kind === 'number') return makeVector(makeData({ type: new Float64(), length: ids.values.length, data: ids.values }));
  if (ids.kind === 'bigint') return makeVector(makeData({ type: new Int64(), length: ids.values.length, data: ids.values as unknown as Int32Array }));
  return makeVector(makeData({ type: new Utf8(), length: ids.offsets.length - 1, valueOffsets: ids.offsets, data: ids.bytes }));
}

function compareBytes(a: Uint8Array, aStart: number, aEnd: number, b: Uint8Array, bStart: number, bEnd: number): number {
  const length = Math.min(aEnd - aStart, bEnd - bStart);
  for (let index = 0; index < length; index++) {
    const difference = a[aStart + index] - b[bStart + index];
    if (difference !== 0) return difference;
  }
  return aEnd - aStart - (bEnd - bStart);
}

/** Ids sorted for binary search: numbers and 64-bit integers by value, strings by their bytes. */
export function sortIds(ids: IdValues): IdValues {
  if (ids.kind === 'number') return { kind: 'number', values: ids.values.slice().sort() };
  if (ids.kind === 'bigint') return { kind: 'bigint', values: ids.values.slice().sort() };
  const count = ids.offsets.length - 1;
  const order = new Int32Array(count);
  for (let index = 0; index < count; index++) order[index] = index;
  const { offsets, bytes } = ids;
  order.sort((a, b) => compareBytes(bytes, offsets[a], offsets[a + 1], bytes, offsets[b], offsets[b + 1]));
  const sortedOffsets = new Int32Array(count + 1);
  const sortedBytes = new Uint8Array(bytes.length);
  let at = 0;
  for (let index = 0; index < count; index++) {
    const from = order[index];
    sortedBytes.set(bytes.subarray(offsets[from], offsets[from + 1]), at);
    at += offsets[from + 1] - offsets[from];
    sortedOffsets[index + 1] = at;
  }
  return { kind: 'string', offsets: sortedOffsets, bytes: sortedBytes };
}

/** A set of written ids, over sorted arrays (in a worker: over the stored block, zero-copy). */
export class WrittenIds {
  readonly #ids: IdValues;

  constructor(sorted: IdValues) {
    this.#ids = sorted;
  }

  /** Over a block made by {@link storedIdSet}: one chunk, read in place. */
  static fromBlock(block: Block): WrittenIds {
    const vector = block.getChild('id')!;
    const chunk = vector.data[0] as Data;
    if (vector.data.length !== 1) return new WrittenIds(idValuesOf(block, 'id', 'checkpoint'));
    if (DataType.isUtf8(chunk.type)) return new WrittenIds({ kind: 'string', offsets: chunk.valueOffsets as Int32Array, bytes: chunk.values as Uint8Array });
    if (DataType.isInt(chunk.type)) return new WrittenIds({ kind: 'bigint', values: chunk.values as unknown as BigInt64Array });
    return new WrittenIds({ kind: 'number', values: chunk.values as Float64Array });
  }

  get size(): number {
    return idCount(this.#ids);
  }

  get kind(): IdValues['kind'] {
    return this.#ids.kind;
  }

  /** Which of `rows` (ids of a batch) are written: a mask, 1 where written. */
  written(rows: IdValues, what: string): Uint8Array {
    const count = idCount(rows);
    const mask = new Uint8Array(count);
    const set = this.#ids;
    if ((set.kind === 'string') !== (rows.kind === 'string')) {
      throw idError(`${what}: the checkpoint holds ${set.kind === 'string' ? 'string' : 'integer'} ids, but this run's ids are ${rows.kind === 'string' ? 'strings' : 'numbers'}`);
    }
    if (set.kind === 'string') {
      const { offsets, bytes } = rows as StringIds;
      for (let row = 0; row < count; row++) mask[row] = this.#hasBytes(bytes, offsets[row], offsets[row + 1]) ? 1 : 0;
    } else if (set.kind === 'number') {
      if (rows.kind === 'number') {
        for (let row = 0; row < count; row++) mask[row] = search(set.values, rows.values[row]) ? 1 : 0;
      } else {
        const values = (rows as BigintIds).values;
        for (let row = 0; row < count; row++) {
          // A 64-bit id beyond 2^53 cannot be among numbers held exactly.
          const value = Number(values[row]);
          if (BigInt(value) === values[row]) mask[row] = search(set.values, value) ? 1 : 0;
        }
      }
    } else if (rows.kind === 'bigint') {
      for (let row = 0; row < count; row++) mask[row] = search(set.values, rows.values[row]) ? 1 : 0;
    } else {
      const values = (rows as NumberIds).values;
      for (let row = 0; row < count; row++) if (Number.isInteger(values[row])) mask[row] = search(set.values, BigInt(values[row])) ? 1 : 0;
    }
    return mask;
  }

  #hasBytes(bytes: Uint8Array, start: number, end: number): boolean {
    const set = this.#ids as StringIds;
    let low = 0;
    let high = set.offsets.length - 2;
    while (low <= high) {
      const middle = (low + high) >>> 1;
      const order = compareBytes(set.bytes, set.offsets[middle], set.offsets[middle + 1], bytes, start, end);
      if (order === 0) return true;
      if (order < 0) low = middle + 1;
      else high = middle - 1;
    }
    return false;
  }
}

function search<T extends number | bigint>(sorted: ArrayLike<T>, value: T): boolean {
  let low = 0;
  let high = sorted.length - 1;
  while (low <= high) {
    const middle = (low + high) >>> 1;
    const found = sorted[middle];
    if (found === value) return true;
    if (found < value) low = middle + 1;
    else high = middle - 1;
  }
  return false;
}

/** A block of sorted ids, one chunk, as workers read it from the store. */
export function storedIdSet(ids: IdValues): Block {
  return new Table({ id: idsToVector(sortIds(ids)) });
}
