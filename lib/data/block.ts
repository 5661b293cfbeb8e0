/**
 * Blocks: the unit a dataset moves. A block is an Arrow table; rows are plain objects; columns are
 * a record of arrays. Conversions infer Arrow types the way a user would expect from JavaScript
 * values (numbers are float64, bigints int64, strings utf8 — not dictionaries — typed arrays
 * lists of their element type), and keep a schema when one is given.
 */
import {
  Binary, Bool, DataType, Field, Float32, Float64, Int16, Int32, Int64, Int8, List, Null, Schema, Struct, Table, TimestampMillisecond,
  Uint16, Uint32, Uint64, Uint8, Utf8, makeData, makeVector, tableFromArrays, vectorFromArray, type Vector,
} from 'apache-arrow';
import { InvalidArgumentError } from '../errors.js';
import { Tensor } from '../gpu/tensor.js';
import './table-codec.js';
import {
  columnTensor, columnTensorCells, tensorCellsToColumn, tensorColumnInfo, tensorToColumn, tensorToPlainVector, unifyTensorFields,
  type TensorColumnInfo,
} from './tensor-column.js';

export type Block = Table;
export type Row = Record<string, unknown>;
export type Columns = Record<string, ArrayLike<unknown>>;
/** Columns as user functions return them: arrays, typed arrays, or a Tensor [rows, ...] (a tensor column). */
export type BatchColumns = Record<string, ArrayLike<unknown> | Tensor>;
/** Columns as user functions receive them: a tensor column without nulls arrives as one Tensor [rows, ...cell shape]. */
export type FormattedColumns = Record<string, unknown[] | ArrayBufferView | Tensor>;
export type BatchFormat = 'arrow' | 'rows' | 'columns';

/** What the executor knows of a block without reading it. */
export interface BlockMetadata {
  rows: number;
  bytes: number;
  /** Files the block was read from, where known. */
  inputFiles?: string[];
}

const typedArrayElement = (value: ArrayBufferView): DataType | undefined => {
  if (value instanceof Float32Array) return new Float32();
  if (value instanceof Float64Array) return new Float64();
  if (value instanceof Int8Array) return new Int8();
  if (value instanceof Int16Array) return new Int16();
  if (value instanceof Int32Array) return new Int32();
  if (value instanceof BigInt64Array) return new Int64();
  if (value instanceof Uint16Array) return new Uint16();
  if (value instanceof Uint32Array) return new Uint32();
  if (value instanceof BigUint64Array) return new Uint64();
  return undefined;
};

/** The Arrow type of one JavaScript value, or undefined for null/undefined. */
function typeOfValue(value: unknown, path: string): DataType | undefined {
  if (value === null || value === undefined) return undefined;
  switch (typeof value) {
    case 'number':
      return new Float64();
    case 'bigint':
      return new Int64();
    case 'string':
      return new Utf8();
    case 'boolean':
      return new Bool();
    case 'object':
      break;
    default:
      throw new InvalidArgumentError(`column '${path}' holds a ${typeof value}, which has no Arrow type`, 'ERR_DATA_TYPE');
  }
  if (value instanceof Date) return new TimestampMillisecond();
  if (value instanceof Uint8Array || value instanceof ArrayBuffer) return new Binary();
  if (ArrayBuffer.isView(value)) {
    const element = typedArrayElement(value);
    if (element) return new List(new Field('item', element, true));
  }
  if (Array.isArray(value)) {
    let element: DataType | undefined;
    for (const item of value) {
      const type = typeOfValue(item, `${path}[]`);
      if (type) element = element ? widen(element, type, `${path}[]`) : type;
    }
    return new List(new Field('item', element ?? new Null(), true));
  }
  if (Object.getPrototypeOf(value) === Object.prototype || Object.getPrototypeOf(value) === null) {
    const fields = Object.entries(value as Row).map(
      ([key, item]) => new Field(key, typeOfValue(item, `${path}.${key}`) ?? new Null(), true),
    );
    return new Struct(fields);
  }
  throw new InvalidArgumentError(
    `column '${path}' holds a ${(value as object).constructor?.name ?? 'object'}, which has no Arrow type`,
    'ERR_DATA_TYPE',
  );
}

/** Two inferred types for the same column: equal, or one absorbs the other (null into anything). */
function widen(a: DataType, b: DataType, path: string): DataType {
  if (a instanceof Null) return b;
  if (b instanceof Null) return a;
  if (String(a) === String(b)) return a;
  if (a instanceof List && b instanceof List) {
    return new List(new Field('item', widen(a.children[0].type, b.children[0].type, `${path}[]`), true));
  }
  if (a instanceof Struct && b instanceof Struct) {
    const fields = new Map<string, DataType>();
    for (const field of [...a.children, ...b.children]) {
      const seen = fields.get(field.name);
      fields.set(field.name, seen ? widen(seen, field.type, `${path}.${field.name}`) : field.type);
    }
    return new Struct([...fields].map(([name, type]) => new Field(name, type, true)));
  }
  throw new InvalidArgumentError(`column '${path}' mixes ${a} and ${b}`, 'ERR_DATA_TYPE');
}

/**
 * A value as vectorFromArray takes it for `type`. Nested values are walked too: Arrow's builders
 * read a missing struct key or an undefined list item as '' or NaN rather than null.
 */
function normalizeCell(value: unknown, type: DataType): unknown {
  if (value === undefined || value === null) return null;
  if (typeof value !== 'object') return value;
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  if (ArrayBuffer.isView(value) && (DataType.isList(type) || !(value instanceof Uint8Array))) value = Array.from(value as unknown as ArrayLike<unknown>);
  if (DataType.isList(type) && Array.isArray(value)) {
    const child = (type as List).children[0].type;
    return value.map((item) => normalizeCell(item, child));
  }
  if (DataType.isStruct(type) && !Array.isArray(value) && !(value instanceof Date) && !ArrayBuffer.isView(value)) {
    const struct: Row = {};
    for (const field of (type as Struct).children) struct[field.name] = normalizeCell((value as Row)[field.name], field.type);
    return struct;
  }
  return value;
}

/** A column of `type` from plain JavaScript values (nulls allowed), as rows' cells are built. */
export function vectorOf(values: unknown[], type: DataType): Vector {
  if (type instanceof Null) return makeVector(makeData({ type, length: values.length, nullCount: values.length }));
  return vectorFromArray(values.map((value) => normalizeCell(value, type)), type);
}

/** Rows to a block, inferring the schema or following the one given. */
export function rowsToBlock(rows: readonly Row[], schema?: Schema): Block {
  if (schema) {
    const columns: Record<string, Vector> = {};
    const fields: Field[] = [];
    for (const field of schema.fields) {
      const values = rows.map((row) => row[field.name]);
      const info = tensorColumnInfo(field);
      if (info) {
        const built = tensorCellsToColumn(field.name, values as Tensor[], { like: field, variable: info.kind === 'variable' });
        fields.push(built.field);
        columns[field.name] = built.vector;
      } else {
        fields.push(field);
        columns[field.name] = vectorOf(values, field.type);
      }
    }
    return new Table(new Schema(fields, schema.metadata), columns);
  }
  const names: string[] = [];
  const types = new Map<string, DataType | undefined>();
  const tensorNames = new Set<string>();
  for (const row of rows) {
    if (typeof row !== 'object' || row === null || Array.isArray(row)) {
      throw new InvalidArgumentError(`a row must be a plain object, got ${row === null ? 'null' : Array.isArray(row) ? 'an array' : typeof row}`, 'ERR_DATA_TYPE');
    }
    for (const [name, value] of Object.entries(row)) {
      if (!types.has(name)) {
        names.push(name);
        types.set(name, undefined);
      }
      if (value instanceof Tensor) {
        tensorNames.add(name);
        continue;
      }
      const type = typeOfValue(value, name);
      if (type) {
        const seen = types.get(name);
        types.set(name, seen ? widen(seen, type, name) : type);
      }
    }
  }
  const columns: Record<string, Vector> = {};
  if (tensorNames.size === 0) {
    for (const name of names) columns[name] = vectorOf(rows.map((row) => row[name]), types.get(name) ?? new Null());
    return new Table(columns);
  }
  const fields: Field[] = [];
  for (const name of names) {
    if (tensorNames.has(name)) {
      const built = tensorCellsToColumn(name, rows.map((row) => row[name] as Tensor | null));
      fields.push(built.field);
      columns[name] = built.vector;
    } else {
      columns[name] = vectorOf(rows.map((row) => row[name]), types.get(name) ?? new Null());
      fields.push(new Field(name, columns[name].type, true));
    }
  }
  return new Table(new Schema(fields), columns);
}

/**
 * Columns (arrays or typed arrays of one length) to a block. Typed arrays are used zero-copy; a
 * Tensor [rows, ...] becomes a tensor column over the same memory (a 1-D one a plain column), and
 * an array of Tensors a tensor column of those cells.
 */
export function columnsToBlock(columns: BatchColumns): Block {
  const tensors = new Map<string, { field: Field; vector: Vector }>();
  const plainColumns: Columns = {};
  for (const [name, column] of Object.entries(columns)) {
    if (column instanceof Tensor) {
      tensors.set(name, column.shape.length >= 2 ? tensorToColumn(name, column) : tensorToPlainVector(name, column));
    } else if (Array.isArray(column) && column.some((value) => value instanceof Tensor)) {
      tensors.set(name, tensorCellsToColumn(name, column as Tensor[]));
    } else {
      plainColumns[name] = column;
    }
  }
  if (tensors.size === 0) return plainColumnsToBlock(plainColumns);
  const lengths = [...Object.entries(plainColumns).map(([name, column]) => [name, column.length] as const), ...[...tensors].map(([name, built]) => [name, built.vector.length] as const)];
  if (new Set(lengths.map(([, length]) => length)).size > 1) {
    throw new InvalidArgumentError(`columns of a batch must have one length, got ${lengths.map(([name, length]) => `${name}=${length}`).join(', ')}`, 'ERR_DATA_TYPE');
  }
  const rest = Object.keys(plainColumns).length > 0 ? plainColumnsToBlock(plainColumns) : undefined;
  const fields: Field[] = [];
  const vectors: Record<string, Vector> = {};
  for (const name of Object.keys(columns)) {
    const built = tensors.get(name);
    if (built) {
      fields.push(built.field);
      vectors[name] = built.vector;
    } else {
      fields.push(rest!.schema.fields.find((field) => field.name === name)!);
      vectors[name] = rest!.getChild(name)!;
    }
  }
  return new Table(new Schema(fields), vectors);
}

function plainColumnsToBlock(columns: Columns): Block {
  const lengths = new Set(Object.values(columns).map((column) => column.length));
  if (lengths.size > 1) {
    const described = Object.entries(columns).map(([name, column]) => `${name}=${column.length}`).join(', ');
    throw new InvalidArgumentError(`columns of a batch must have one length, got ${described}`, 'ERR_DATA_TYPE');
  }
  const typed: Record<string, ArrayBufferView> = {};
  const scalar: Record<string, Vector> = {};
  const other: Record<string, unknown[]> = {};
  for (const [name, column] of Object.entries(columns)) {
    // Uint8Array is not in typedArrayElement (as a value it means binary), but a whole column of it is uint8 numbers.
    if (ArrayBuffer.isView(column) && (column instanceof Uint8Array || typedArrayElement(column))) typed[name] = column;
    else {
      const vector = scalarColumn(column);
      if (vector) scalar[name] = vector;
      else other[name] = Array.from(column);
    }
  }
  if (Object.keys(other).length === 0 && Object.keys(scalar).length === 0) return tableFromArrays(typed as Parameters<typeof tableFromArrays>[0]);
  const length = lengths.values().next().value ?? 0;
  let inferred: Block | undefined;
  if (Object.keys(other).length > 0) {
    const rows: Row[] = Array.from({ length }, () => ({}));
    for (const [name, column] of Object.entries(other)) column.forEach((value, index) => (rows[index][name] = value));
    inferred = rowsToBlock(rows);
  }
  const vectors: Record<string, Vector> = {};
  for (const name of Object.keys(columns)) {
    if (name in typed) vectors[name] = tableFromArrays({ [name]: typed[name] } as Parameters<typeof tableFromArrays>[0]).getChild(name)!;
    else vectors[name] = scalar[name] ?? inferred!.getChild(name)!;
  }
  return new Table(vectors);
}

/**
 * A column of plain numbers, strings or booleans (nulls allowed, not only nulls) built straight
 * into Arrow buffers: the types rowsToBlock would infer, without a row object per value and a
 * builder per column (which cost a batch-inference actor more than a millisecond a batch).
 * Anything else is undefined, for the general path.
 */
function scalarColumn(column: ArrayLike<unknown>): Vector | undefined {
  const length = column.length;
  let kind: 'number' | 'string' | 'boolean' | undefined;
  let nullCount = 0;
  for (let index = 0; index < length; index++) {
    const value = column[index];
    if (value === null || value === undefined) {
      nullCount++;
      continue;
    }
    const type = typeof value;
    if (type !== 'number' && type !== 'string' && type !== 'boolean') return undefined;
    if (kind === undefined) kind = type;
    else if (kind !== type) return undefined;
  }
  if (kind === undefined) return undefined;
  const nullBitmap = nullCount > 0 ? validityOf(column) : undefined;
  if (kind === 'number') {
    const values = new Float64Array(length);
    for (let index = 0; index < length; index++) values[index] = (column[index] as number | null) ?? 0;
    return makeVector(makeData({ type: new Float64(), length, nullCount, nullBitmap, data: values }));
  }
  if (kind === 'boolean') {
    const bits = new Uint8Array((length + 7) >> 3);
    for (let index = 0; index < length; index++) if (column[index] === true) bits[index >> 3] |= 1 << (index & 7);
    return makeVector(makeData({ type: new Bool(), length, nullCount, nullBitmap, data: bits }));
  }
  const offsets = new Int32Array(length + 1);
  let bytes = 0;
  for (let index = 0; index < length; index++) {
    const value = column[index];
    if (typeof value === 'string') bytes += Buffer.byteLength(value, 'utf8');
    offsets[index + 1] = bytes;
  }
  const data = Buffer.allocUnsafe(bytes);
  for (let index = 0; index < length; index++) {
    const value = column[index];
    if (typeof value === 'string') data.write(value, offsets[index], 'utf8');
  }
  return makeVector(makeData({ type: new Utf8(), length, nullCount, nullBitmap, valueOffsets: offsets, data: new Uint8Array(data.buffer, data.byteOffset, bytes) }));
}

function validityOf(column: ArrayLike<unknown>): Uint8Array {
  const bits = new Uint8Array((column.length + 7) >> 3);
  for (let index = 0; index < column.length; index++) {
    if (column[index] !== null && column[index] !== undefined) bits[index >> 3] |= 1 << (index & 7);
  }
  return bits;
}

/** A value a user function returned, as a block: a table, rows, or columns. */
export function toBlock(value: unknown, what: string): Block {
  if (value instanceof Table) return value;
  if (Array.isArray(value)) return rowsToBlock(value as Row[]);
  if (
    typeof value === 'object' &&
    value !== null &&
    Object.values(value).every((column) => Array.isArray(column) || ArrayBuffer.isView(column) || column instanceof Tensor)
  ) {
    return columnsToBlock(value as BatchColumns);
  }
  throw new InvalidArgumentError(
    `${what} must return an Arrow table, an array of rows or a record of column arrays (or Tensors); got ${value === null ? 'null' : typeof value}`,
    'ERR_DATA_TYPE',
  );
}

/** Plain JavaScript rows of a block: bigints stay bigints, timestamps become Dates, lists arrays. */
export function blockToRows(block: Block): Row[] {
  const names = block.schema.fields.map((field) => field.name);
  const columns = names.map((name) => block.getChild(name)!);
  const types = block.schema.fields.map((field) => field.type);
  const tensorCells = block.schema.fields.map((field, column) => {
    const info = tensorColumnInfo(field);
    return info ? columnTensorCells(columns[column], info) : undefined;
  });
  const rows: Row[] = new Array(block.numRows);
  for (let index = 0; index < block.numRows; index++) {
    const row: Row = {};
    for (let column = 0; column < names.length; column++) {
      const cells = tensorCells[column];
      row[names[column]] = cells ? cells[index] : plain(columns[column].get(index), types[column]);
    }
    rows[index] = row;
  }
  return rows;
}

/** A cell as rows show it: timestamps as Dates, lists as arrays, structs as plain objects. */
export function plain(value: unknown, type: DataType): unknown {
  if (value === null || value === undefined) return null;
  if (DataType.isTimestamp(type) || DataType.isDate(type)) return new Date(Number(value));
  if (DataType.isList(type) || DataType.isFixedSizeList(type)) {
    const child = (type as List).children[0].type;
    return Array.from(value as Iterable<unknown>, (item) => plain(item, child));
  }
  if (DataType.isStruct(type)) {
    const row: Row = {};
    for (const field of (type as Struct).children) row[field.name] = plain((value as Record<string, unknown>)[field.name], field.type);
    return row;
  }
  if (DataType.isDictionary(type)) return value;
  return value;
}

/**
 * Columns of a block: typed arrays where the column is a primitive without nulls, else arrays; a
 * tensor column one Tensor [rows, ...shape] (a view of the block) where its cells share a shape
 * and none is null, else an array of its cells.
 */
export function blockToColumns(block: Block): FormattedColumns {
  const columns: FormattedColumns = {};
  for (const field of block.schema.fields) {
    const vector = block.getChild(field.name)!;
    const info = tensorColumnInfo(field);
    if (info) {
      columns[field.name] = columnTensor(vector, info) ?? columnTensorCells(vector, info);
      continue;
    }
    const primitive = DataType.isInt(field.type) || DataType.isFloat(field.type);
    if (primitive && vector.nullCount === 0) {
      columns[field.name] = vector.toArray() as ArrayBufferView;
    } else {
      const values: unknown[] = new Array(vector.length);
      for (let index = 0; index < vector.length; index++) values[index] = plain(vector.get(index), field.type);
      columns[field.name] = values;
    }
  }
  return columns;
}

/** A block in the format a user function asked for. */
export function formatBatch(block: Block, format: BatchFormat): Block | Row[] | FormattedColumns {
  if (format === 'arrow') return block;
  if (format === 'rows') return blockToRows(block);
  return blockToColumns(block);
}

/** Bytes of a block's buffers (what it occupies in the store, near enough). */
export function blockBytes(block: Block): number {
  let bytes = 0;
  for (const batch of block.batches) {
    const stack: Array<import('apache-arrow').Data> = [batch.data];
    while (stack.length) {
      const data = stack.pop()!;
      for (const buffer of [data.values, data.valueOffsets, data.nullBitmap, data.typeIds] as Array<ArrayBufferView | undefined>) {
        if (buffer) bytes += buffer.byteLength;
      }
      stack.push(...data.children);
      if (data.dictionary) stack.push(...data.dictionary.data);
    }
  }
  return bytes;
}

/** Blocks with one schema as one; a single block is returned as it is. */
export function concatBlocks(blocks: readonly Block[]): Block {
  if (blocks.length === 0) return new Table();
  if (blocks.length === 1) return blocks[0];
  const nonEmpty = blocks.filter((block) => block.numRows > 0);
  if (nonEmpty.length === 0) return blocks[0];
  const [first, ...rest] = nonEmpty;
  // Table.concat does not compare schemas: joining mismatched blocks would silently read one
  // block's buffers as another's types.
  const signature = schemaSignature(first.schema);
  const other = rest.find((block) => schemaSignature(block.schema) !== signature);
  if (other) {
    // Blocks made apart disagree in ways one type covers: a column all null in one block (typed
    // Null there), ints beside floats, narrow ints beside wide ones. Those are cast; the rest is refused.
    const unified = unifySchemas(nonEmpty.map((block) => block.schema));
    if (!unified) {
      throw new InvalidArgumentError(
        `blocks with different schemas cannot be joined: ${first.schema.fields.map(String).join(', ')} vs ${other.schema.fields.map(String).join(', ')}`,
        'ERR_DATA_SCHEMA',
      );
    }
    const [head, ...tail] = nonEmpty.map((block) => castBlock(block, unified));
    return head.concat(...tail);
  }
  return first.concat(...rest);
}

/** The one schema that covers these (same column names, in order), or undefined when there is none. */
function unifySchemas(schemas: readonly Schema[]): Schema | undefined {
  const [first] = schemas;
  const names = first.fields.map((field) => field.name);
  if (schemas.some((schema) => schema.fields.length !== names.length || schema.fields.some((field, index) => field.name !== names[index]))) return undefined;
  const fields: Field[] = [];
  for (let index = 0; index < names.length; index++) {
    const tensorInfos = schemas.map((schema) => tensorColumnInfo(schema.fields[index]));
    if (tensorInfos.some((info) => info !== undefined)) {
      // Tensor columns meet only tensor columns (or columns that are all null).
      const known = tensorInfos.filter((info, position) => info !== undefined || !(schemas[position].fields[index].type instanceof Null));
      if (known.some((info) => info === undefined)) return undefined;
      const field = unifyTensorFields(names[index], known as TensorColumnInfo[]);
      if (!field) return undefined;
      fields.push(field);
      continue;
    }
    const types = schemas.map((schema) => schema.fields[index].type).filter((type) => !(type instanceof Null));
    const type = types.length === 0 ? new Null() : unifyTypes(types);
    if (!type) return undefined;
    fields.push(new Field(names[index], type, true));
  }
  return new Schema(fields);
}

function unifyTypes(types: readonly DataType[]): DataType | undefined {
  const distinct = [...new Map(types.map((type) => [String(type), type])).values()];
  if (distinct.length === 1) return distinct[0];
  if (!distinct.every((type) => DataType.isInt(type) || DataType.isFloat(type))) return undefined;
  if (distinct.some((type) => DataType.isFloat(type))) return new Float64();
  const ints = distinct as Array<DataType & { bitWidth: number; isSigned: boolean }>;
  const widest = Math.max(...ints.map((type) => type.bitWidth + (type.isSigned ? 0 : 1)));
  if (widest <= 8) return new Int8();
  if (widest <= 16) return new Int16();
  if (widest <= 32) return new Int32();
  // Past 32 bits, or a 64-bit unsigned: int64 holds it where the values fit.
  return new Int64();
}

/** A block with its columns cast to `schema`'s types (only those that differ are rebuilt). */
function castBlock(block: Block, schema: Schema): Block {
  if (schemaSignature(block.schema) === schemaSignature(schema)) return block;
  const columns: Record<string, Vector> = {};
  for (const field of schema.fields) {
    const vector = block.getChild(field.name)!;
    const fromField = block.schema.fields.find((candidate) => candidate.name === field.name)!;
    const from = fromField.type;
    const targetInfo = tensorColumnInfo(field);
    if (targetInfo) {
      const fromInfo = tensorColumnInfo(fromField);
      if (fromInfo && fieldSignature(fromField) === fieldSignature(field)) {
        columns[field.name] = vector;
      } else {
        const cells = fromInfo ? columnTensorCells(vector, fromInfo) : new Array<null>(vector.length).fill(null);
        columns[field.name] = tensorCellsToColumn(field.name, cells, { variable: targetInfo.kind === 'variable', like: field }).vector;
      }
      continue;
    }
    if (String(from) === String(field.type)) {
      columns[field.name] = vector;
      continue;
    }
    const wide = DataType.isInt(field.type) && (field.type as Int64).bitWidth === 64;
    const values = new Array<unknown>(vector.length);
    for (let row = 0; row < vector.length; row++) {
      const value = vector.get(row);
      values[row] = value === null || value === undefined ? null : wide ? BigInt(value as number) : Number(value);
    }
    columns[field.name] = vectorOf(values, field.type);
  }
  return new Table(schema, columns);
}

/** A field's name and type, nested ones included (nullability aside), and its tensor shape if any. */
function fieldSignature(field: Field): string {
  const describe = (inner: Field): string =>
    `${JSON.stringify(inner.name)}:${inner.type}${inner.type.children?.length ? `<${inner.type.children.map(describe).join(',')}>` : ''}`;
  const tensor = tensorColumnInfo(field);
  return tensor ? `${describe(field)}#${JSON.stringify(tensor)}` : describe(field);
}

function schemaSignature(schema: Schema): string {
  return schema.fields.map(fieldSignature).join(',');
}

/**
 * A block of these vectors whose fields keep the extension metadata (tensor columns) of the
 * field of the same name and type in `sources` (columns rebuilt from vectors lose it otherwise).
 */
export function tableOfVectors(columns: Record<string, Vector>, sources: ReadonlyMap<string, Field> | readonly Schema[]): Block {
  const lookup = (name: string): Field | undefined =>
    Array.isArray(sources) ? (sources as readonly Schema[]).flatMap((schema) => schema.fields).find((field) => field.name === name) : (sources as ReadonlyMap<string, Field>).get(name);
  const fields = Object.entries(columns).map(([name, vector]) => {
    const source = lookup(name);
    return source && source.metadata.size > 0 && String(source.type) === String(vector.type)
      ? new Field(name, vector.type, true, source.metadata)
      : new Field(name, vector.type, true);
  });
  return new Table(new Schema(fields), columns);
}

/** Splits a block into slices of at most `rows` rows (zero-copy). */
export function sliceRows(block: Block, rows: number): Block[] {
  if (block.numRows <= rows) return [block];
  const slices: Block[] = [];
  for (let start = 0; start < block.numRows; start += rows) slices.push(block.slice(start, Math.min(block.numRows, start + rows)));
  return slices;
}

/** Splits a block so no piece exceeds `maxBytes`, keeping at least one row a piece. */
export function splitBySize(block: Block, maxBytes: number): Block[] {
  const bytes = blockBytes(block);
  if (bytes <= maxBytes || block.numRows <= 1) return [block];
  const pieces = Math.ceil(bytes / maxBytes);
  return sliceRows(block, Math.max(1, Math.ceil(block.numRows / pieces)));
}

export function schemaOf(block: Block): Schema {
  return block.schema;
}

/** Signed and unsigned integers and floats: a column of them is one flat buffer of fixed width. */
function isFixedWidthNumber(type: DataType): boolean {
  return DataType.isInt(type) || DataType.isFloat(type);
}

/**
 * The rows of a block at `indices`, in that order, as a new block of the same schema; an index of
 * -1 gives a row of nulls. Numbers, strings and binary are gathered buffer to buffer (sort and
 * shuffle move whole datasets through here); other types through their plain values.
 */
export function takeRows(block: Block, indices: Int32Array): Block {
  if (indices.length === 0) return block.slice(0, 0);
  const columns: Record<string, Vector> = {};
  for (const field of block.schema.fields) columns[field.name] = takeColumn(block.getChild(field.name)!, field.type, indices);
  return new Table(block.schema, columns);
}

function takeColumn(vector: Vector, type: DataType, indices: Int32Array): Vector {
  const length = indices.length;
  let missing = 0;
  for (let index = 0; index < length; index++) if (indices[index] < 0) missing++;
  const hasNulls = vector.nullCount > 0 || missing > 0;
  const validity = (): Uint8Array => {
    const bits = new Uint8Array((length + 7) >> 3);
    for (let index = 0; index < length; index++) {
      const from = indices[index];
      if (from >= 0 && vector.isValid(from)) bits[index >> 3] |= 1 << (index & 7);
    }
    return bits;
  };
  const nullCount = (bits: Uint8Array | undefined): number => {
    if (!bits) return 0;
    let valid = 0;
    for (let index = 0; index < length; index++) valid += (bits[index >> 3] >> (index & 7)) & 1;
    return length - valid;
  };
  if (isFixedWidthNumber(type)) {
    const source = vector.toArray() as unknown as { length: number; [index: number]: number | bigint; constructor: new (length: number) => ArrayLike<number | bigint> & { [index: number]: number | bigint } };
    const out = new source.constructor(length);
    for (let index = 0; index < length; index++) {
      const from = indices[index];
      if (from >= 0) out[index] = source[from];
    }
    const nullBitmap = hasNulls ? validity() : undefined;
    return makeVector(makeData({ type: type as Int32, length, nullCount: nullCount(nullBitmap), nullBitmap, data: out as unknown as Int32Array }));
  }
  if ((DataType.isUtf8(type) || DataType.isBinary(type)) && !DataType.isDictionary(type)) {
    // Where each row lives: its chunk and its index there.
    const chunks = vector.data;
    const chunkOf = new Int32Array(vector.length);
    const localOf = new Int32Array(vector.length);
    let start = 0;
    chunks.forEach((chunk, chunkIndex) => {
      for (let row = 0; row < chunk.length; row++) {
        chunkOf[start + row] = chunkIndex;
        // A sliced chunk's valueOffsets already start at its first row (Arrow slices them).
        localOf[start + row] = row;
      }
      start += chunk.length;
    });
    const offsets = new Int32Array(length + 1);
    let bytes = 0;
    for (let index = 0; index < length; index++) {
      const from = indices[index];
      if (from >= 0) {
        const chunkOffsets = chunks[chunkOf[from]].valueOffsets;
        const local = localOf[from];
        bytes += chunkOffsets[local + 1] - chunkOffsets[local];
      }
      offsets[index + 1] = bytes;
    }
    const data = new Uint8Array(bytes);
    for (let index = 0; index < length; index++) {
      const from = indices[index];
      if (from < 0) continue;
      const chunk = chunks[chunkOf[from]];
      const local = localOf[from];
      data.set(chunk.values.subarray(chunk.valueOffsets[local], chunk.valueOffsets[local + 1]), offsets[index]);
    }
    const nullBitmap = hasNulls ? validity() : undefined;
    return makeVector(makeData({ type: type as Utf8, length, nullCount: nullCount(nullBitmap), nullBitmap, valueOffsets: offsets, data }));
  }
  const values = new Array<unknown>(length);
  for (let index = 0; index < length; index++) {
    const from = indices[index];
    values[index] = from >= 0 ? plain(vector.get(from), type) : null;
  }
  return vectorOf(values, type);
}
