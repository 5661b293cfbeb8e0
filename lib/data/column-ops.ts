/**
 * Column operations (selectColumns, dropColumns, renameColumns, addColumn) as batch stages of
 * whole blocks: they fuse into the task or actor before them like any user function, and touch
 * only the columns' metadata, never their buffers (addColumn builds its one new column).
 */
import { Field, RecordBatch, Schema, Struct, Table, Vector, makeData } from 'apache-arrow';
import { remote } from '../core/registry.js';
import type { FunctionDescriptor } from '../core/protocol.js';
import { InvalidArgumentError } from '../errors.js';
import { Tensor } from '../gpu/tensor.js';
import { columnsToBlock, formatBatch, tableOfVectors, takeRows, type BatchFormat, type Block } from './block.js';
import { hashPartition, seededRandom } from './keys.js';
import { loadUdf } from './udf.js';
import { filterBlock, type Clauses } from './row-filter.js';

function missing(batch: Block, columns: readonly string[], what: string): void {
  const names = new Set(batch.schema.fields.map((field) => field.name));
  const absent = columns.filter((column) => !names.has(column));
  if (absent.length > 0) {
    throw new InvalidArgumentError(
      `${what}: no column${absent.length > 1 ? 's' : ''} ${absent.map((column) => `'${column}'`).join(', ')} (the columns are: ${[...names].join(', ') || 'none'})`,
      'ERR_DATA_COLUMN',
    );
  }
}

/** The rows a row filter keeps (Dataset.filter with a filter instead of a function). */
export const filterRows = remote(import.meta, function trellisFilterRows(batch: Block, clauses: Clauses): Block {
  return filterBlock(batch, clauses, 'filter()');
});

/** The named columns, in the order given. */
export const selectColumns = remote(import.meta, function trellisSelectColumns(batch: Block, columns: string[]): Block {
  missing(batch, columns, 'selectColumns()');
  return batch.select(columns);
});

/** Every column but the named ones. */
export const dropColumns = remote(import.meta, function trellisDropColumns(batch: Block, columns: string[]): Block {
  missing(batch, columns, 'dropColumns()');
  const dropped = new Set(columns);
  return batch.select(batch.schema.fields.map((field) => field.name).filter((name) => !dropped.has(name)));
});

/** Columns renamed by `names` (old name to new), their data untouched. */
export const renameColumns = remote(import.meta, function trellisRenameColumns(batch: Block, names: Record<string, string>): Block {
  missing(batch, Object.keys(names), 'renameColumns()');
  const fields = batch.schema.fields.map((field) => (field.name in names ? new Field(names[field.name], field.type, field.nullable, field.metadata) : field));
  const seen = new Set<string>();
  for (const field of fields) {
    if (seen.has(field.name)) throw new InvalidArgumentError(`renameColumns(): two columns would be named '${field.name}'`, 'ERR_DATA_COLUMN');
    seen.add(field.name);
  }
  const schema = new Schema(fields, batch.schema.metadata);
  const batches = batch.batches.map(
    (record) => new RecordBatch(schema, makeData({ type: new Struct(fields), length: record.numRows, nullCount: 0, children: record.data.children })),
  );
  return new Table(schema, batches);
});

/**
 * Each row kept with probability `fraction`. Seeded, a block's draws come from the seed and the
 * block's own content (its rows, its first and last row), so the same data gives the same sample
 * however it is scheduled; unseeded, a new sample each run.
 */
export const randomSample = remote(import.meta, function trellisRandomSample(batch: Block, fraction: number, seed: number | null): Block {
  if (batch.numRows === 0) return batch;
  const random = seededRandom(seed === null ? (Math.random() * 2 ** 32) >>> 0 : contentSeed(batch, seed));
  const keep: number[] = [];
  for (let row = 0; row < batch.numRows; row++) if (random() < fraction) keep.push(row);
  return keep.length === batch.numRows ? batch : takeRows(batch, Int32Array.from(keep));
});

function contentSeed(batch: Block, seed: number): number {
  const text = `${seed}\u0000${batch.numRows}\u0000${JSON.stringify(batch.get(0), bigints)}\u0000${JSON.stringify(batch.get(batch.numRows - 1), bigints)}`;
  return hashPartition(text, 2 ** 32);
}

function bigints(_key: string, value: unknown): unknown {
  return typeof value === 'bigint' ? value.toString() : value;
}

/**
 * A column computed from each batch by a registered function (which returns an array, a typed
 * array or an Arrow vector of the batch's length); a column of that name is replaced.
 */
export const addColumn = remote(import.meta, async function trellisAddColumn(
  batch: Block,
  name: string,
  descriptor: FunctionDescriptor,
  fnArgs: unknown[],
  batchFormat: BatchFormat,
): Promise<Block> {
  const fn = (await loadUdf(descriptor)) as (...args: unknown[]) => unknown;
  const values = await fn(formatBatch(batch, batchFormat), ...fnArgs);
  let column: Vector;
  let made: Field | undefined;
  if (values instanceof Vector) column = values;
  else if (Array.isArray(values) || ArrayBuffer.isView(values) || values instanceof Tensor) {
    const block = columnsToBlock({ [name]: values as ArrayLike<unknown> | Tensor });
    column = block.getChild(name)!;
    made = block.schema.fields[0];
  } else throw new InvalidArgumentError(`addColumn('${name}'): ${descriptor.name} must return an array, a typed array, a Tensor or an Arrow vector, got ${values === null ? 'null' : typeof values}`, 'ERR_DATA_TYPE');
  if (column.length !== batch.numRows) {
    throw new InvalidArgumentError(`addColumn('${name}'): ${descriptor.name} returned ${column.length} values for a batch of ${batch.numRows} rows`, 'ERR_DATA_TYPE');
  }
  const columns: Record<string, Vector> = {};
  for (const field of batch.schema.fields) if (field.name !== name) columns[field.name] = batch.getChild(field.name)!;
  columns[name] = column;
  const fields = new Map(batch.schema.fields.map((field) => [field.name, field]));
  if (made) fields.set(name, made);
  return tableOfVectors(columns, fields);
});
