/**
 * A Parquet file's footer, read for what parquet-wasm does not give: each row group's column
 * statistics (min, max, null count), decoded into the values Arrow gives for the same column, so
 * a filter can skip groups that cannot hold a matching row. The footer is Thrift's compact
 * protocol; only the fields used here are decoded, every other one is skipped by its type.
 */
import { fileSystemFor, type FileSystem } from '../filesystem/file-system.js';
import { InvalidArgumentError } from '../../errors.js';

const MAGIC = 'PAR1';
const DAY_MS = 86_400_000;

/** Comparable forms of column values: numbers (dates and timestamps in ms), bigints, strings, booleans. */
export type StatisticValue = number | bigint | string | boolean;

/** A top-level column of primitive values, with what its statistics mean. */
export interface FooterColumn {
  name: string;
  /**
   * How its min and max decode: null where they cannot be compared here (decimals, unsigned 64-bit,
   * intervals, binary that is not text, nested columns): its groups are never skipped by it.
   */
  kind: 'boolean' | 'integer' | 'bigint' | 'float' | 'string' | 'date' | 'timestamp' | null;
}

export interface ColumnChunkStatistics {
  min?: StatisticValue;
  max?: StatisticValue;
  nullCount?: number;
  /** Where the chunk's pages start in the file (its dictionary page, else its first data page). */
  offset: number;
  compressedBytes: number;
}

export interface ParquetFooter {
  /** Top-level primitive columns by name. */
  columns: Map<string, FooterColumn>;
  rowGroups: { rows: number; columns: Map<string, ColumnChunkStatistics> }[];
}

// Thrift compact protocol element types.
const enum Compact {
  True = 1,
  False = 2,
  Byte = 3,
  I16 = 4,
  I32 = 5,
  I64 = 6,
  Double = 7,
  Binary = 8,
  List = 9,
  Set = 10,
  Map = 11,
  Struct = 12,
}

class CompactReader {
  #position = 0;
  constructor(private readonly bytes: Uint8Array, private readonly path: string) {}

  #byte(): number {
    if (this.#position >= this.bytes.length) throw this.#corrupt('ends inside a value');
    return this.bytes[this.#position++];
  }

  #corrupt(why: string): InvalidArgumentError {
    return new InvalidArgumentError(`Parquet file '${this.path}': its footer ${why}`, 'ERR_DATA_PARSE');
  }

  /** An unsigned varint as a number (exact to 2^53: sizes and counts). */
  varint(): number {
    let value = 0;
    let scale = 1;
    for (let shift = 0; shift < 70; shift += 7) {
      const byte = this.#byte();
      value += (byte & 0x7f) * scale;
      if ((byte & 0x80) === 0) return value;
      scale *= 128;
    }
    throw this.#corrupt('has a varint longer than 10 bytes');
  }

  /** A zigzag integer (i16, i32, i64) as a number. */
  integer(): number {
    const raw = this.varint();
    return raw % 2 === 0 ? raw / 2 : -(raw + 1) / 2;
  }

  binary(): Uint8Array {
    const length = this.varint();
    if (this.#position + length > this.bytes.length) throw this.#corrupt('ends inside a string');
    const value = this.bytes.subarray(this.#position, this.#position + length);
    this.#position += length;
    return value;
  }

  string(): string {
    return Buffer.from(this.binary()).toString('utf8');
  }

  /** Reads a struct, calling `field` for each field (which must consume it, or return false to skip it). */
  struct(field: (id: number, type: number) => boolean): void {
    let last = 0;
    for (;;) {
      const header = this.#byte();
      if (header === 0) return;
      const type = header & 0x0f;
      const delta = header >> 4;
      const id = delta === 0 ? this.integer() : last + delta;
      last = id;
      if (!field(id, type)) this.skip(type);
    }
  }

  /** A list's elements: `element` is called once per element with the element type. */
  list(element: (type: number) => void): void {
    const header = this.#byte();
    let size = header >> 4;
    if (size === 15) size = this.varint();
    const type = header & 0x0f;
    for (let index = 0; index < size; index++) element(type);
  }

  /** A boolean field's value lives in its type; a boolean list element is a byte. */
  boolean(type: number): boolean {
    return type === Compact.True;
  }

  skip(type: number): void {
    switch (type) {
      case Compact.True:
      case Compact.False:
        return;
      case Compact.Byte:
        this.#byte();
        return;
      case Compact.I16:
      case Compact.I32:
      case Compact.I64:
        this.varint();
        return;
      case Compact.Double:
        this.#position += 8;
        return;
      case Compact.Binary:
        this.binary();
        return;
      case Compact.List:
      case Compact.Set:
        this.list((element) => (element === Compact.True || element === Compact.False ? this.#byte() : this.skip(element)));
        return;
      case Compact.Map: {
        const size = this.varint();
        if (size === 0) return;
        const types = this.#byte();
        for (let index = 0; index < size; index++) {
          this.skip(types >> 4);
          this.skip(types & 0x0f);
        }
        return;
      }
      case Compact.Struct:
        this.struct(() => false);
        return;
      default:
        throw this.#corrupt(`has an element of unknown type ${type}`);
    }
  }
}

// Parquet's enums (parquet.thrift).
const PhysicalType = { BOOLEAN: 0, INT32: 1, INT64: 2, INT96: 3, FLOAT: 4, DOUBLE: 5, BYTE_ARRAY: 6, FIXED_LEN_BYTE_ARRAY: 7 } as const;
const ConvertedType = { UTF8: 0, ENUM: 4, DECIMAL: 5, DATE: 6, TIME_MILLIS: 7, TIME_MICROS: 8, TIMESTAMP_MILLIS: 9, TIMESTAMP_MICROS: 10, UINT_8: 11, UINT_16: 12, UINT_32: 13, UINT_64: 14, JSON: 19, INTERVAL: 21 } as const;

interface SchemaElement {
  type?: number;
  name: string;
  children?: number;
  converted?: number;
  /** The LogicalType union's field id: 1 string, 4 enum, 5 decimal, 6 date, 7 time, 8 timestamp, 10 integer, 12 json, 14 uuid, 15 float16. */
  logical?: number;
  integerSigned?: boolean;
  integerBits?: number;
  /** A timestamp's unit as milliseconds per raw unit. */
  timestampScale?: number;
}

function readLogicalType(reader: CompactReader, element: SchemaElement): void {
  reader.struct((id) => {
    element.logical = id;
    if (id === 10) {
      reader.struct((field, type) => {
        if (field === 1) element.integerBits = reader.integer();
        else if (field === 2) element.integerSigned = reader.boolean(type);
        else return false;
        return true;
      });
      return true;
    }
    if (id === 8) {
      // TimestampType { 1: isAdjustedToUTC, 2: unit (a union: 1 millis, 2 micros, 3 nanos) }.
      reader.struct((field) => {
        if (field !== 2) return false;
        reader.struct((unit) => {
          element.timestampScale = unit === 1 ? 1 : unit === 2 ? 1e-3 : 1e-6;
          return false;
        });
        return true;
      });
      return true;
    }
    return false;
  });
}

function readSchemaElement(reader: CompactReader): SchemaElement {
  const element: SchemaElement = { name: '' };
  reader.struct((id) => {
    if (id === 1) element.type = reader.integer();
    else if (id === 4) element.name = reader.string();
    else if (id === 5) element.children = reader.integer();
    else if (id === 6) element.converted = reader.integer();
    else if (id === 10) readLogicalType(reader, element);
    else return false;
    return true;
  });
  return element;
}

/** An integer column whose values (and statistics' order) are unsigned, by its logical or converted type. */
function isUnsigned(element: SchemaElement): boolean {
  const { converted } = element;
  return element.integerSigned === false || (converted !== undefined && converted >= ConvertedType.UINT_8 && converted <= ConvertedType.UINT_64);
}

/** What a leaf's statistics decode to, or null where comparing them here would not be sound. */
function kindOf(element: SchemaElement): FooterColumn['kind'] {
  const { type, converted, logical } = element;
  const unsigned = isUnsigned(element);
  if (logical === 5 || converted === ConvertedType.DECIMAL || converted === ConvertedType.INTERVAL) return null;
  switch (type) {
    case PhysicalType.BOOLEAN:
      return 'boolean';
    case PhysicalType.INT32:
      if (logical === 6 || converted === ConvertedType.DATE) return 'date';
      if (logical === 7 || converted === ConvertedType.TIME_MILLIS) return null;
      return 'integer';
    case PhysicalType.INT64:
      if (logical === 8 || converted === ConvertedType.TIMESTAMP_MILLIS || converted === ConvertedType.TIMESTAMP_MICROS) return 'timestamp';
      if (logical === 7 || converted === ConvertedType.TIME_MICROS) return null;
      // Unsigned 64-bit statistics are ordered unsigned; Arrow gives them as bigints all the same.
      return unsigned ? null : 'bigint';
    case PhysicalType.FLOAT:
    case PhysicalType.DOUBLE:
      return logical === 15 ? null : 'float';
    case PhysicalType.BYTE_ARRAY:
      return logical === 1 || logical === 4 || logical === 12 || converted === ConvertedType.UTF8 || converted === ConvertedType.ENUM || converted === ConvertedType.JSON ? 'string' : null;
    default:
      return null;
  }
}

function timestampScaleOf(element: SchemaElement): number {
  if (element.timestampScale !== undefined) return element.timestampScale;
  return element.converted === ConvertedType.TIMESTAMP_MICROS ? 1e-3 : 1;
}

/** A statistic's plain-encoded bytes as the value Arrow would give, or undefined where it cannot be read. */
function decodeStatistic(bytes: Uint8Array, element: SchemaElement, kind: FooterColumn['kind'], bound: 'min' | 'max'): StatisticValue | undefined {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  switch (kind) {
    case 'boolean':
      return bytes.length >= 1 ? bytes[0] !== 0 : undefined;
    case 'integer':
      if (bytes.length < 4) return undefined;
      // Unsigned 32-bit values read back as numbers by Arrow, ordered unsigned in the statistics.
      return isUnsigned(element) ? view.getUint32(0, true) : view.getInt32(0, true);
    case 'date':
      return bytes.length >= 4 ? view.getInt32(0, true) * DAY_MS : undefined;
    case 'bigint':
      return bytes.length >= 8 ? view.getBigInt64(0, true) : undefined;
    case 'timestamp': {
      if (bytes.length < 8) return undefined;
      const ms = Number(view.getBigInt64(0, true)) * timestampScaleOf(element);
      // Arrow's milliseconds from finer units are rounded: widen the bound so it still holds.
      return bound === 'min' ? Math.floor(ms) : Math.ceil(ms);
    }
    case 'float': {
      const value = bytes.length === 4 ? view.getFloat32(0, true) : bytes.length === 8 ? view.getFloat64(0, true) : Number.NaN;
      if (Number.isNaN(value)) return undefined;
      // Writers store a zero bound as -0 (the spec asks it of a min); values compare the same.
      return value === 0 ? 0 : value;
    }
    case 'string':
      return Buffer.from(bytes).toString('utf8');
    default:
      return undefined;
  }
}

interface RawStatistics {
  min?: Uint8Array;
  max?: Uint8Array;
  legacyMin?: Uint8Array;
  legacyMax?: Uint8Array;
  nullCount?: number;
}

function readStatistics(reader: CompactReader): RawStatistics {
  const statistics: RawStatistics = {};
  reader.struct((id) => {
    if (id === 1) statistics.legacyMax = reader.binary();
    else if (id === 2) statistics.legacyMin = reader.binary();
    else if (id === 3) statistics.nullCount = reader.integer();
    else if (id === 5) statistics.max = reader.binary();
    else if (id === 6) statistics.min = reader.binary();
    else return false;
    return true;
  });
  return statistics;
}

interface RawChunk {
  path: string[];
  statistics?: RawStatistics;
  dataPageOffset: number;
  dictionaryPageOffset?: number;
  compressedBytes: number;
}

function readColumnChunk(reader: CompactReader): RawChunk {
  const chunk: RawChunk = { path: [], dataPageOffset: 0, compressedBytes: 0 };
  reader.struct((id) => {
    if (id !== 3) return false;
    reader.struct((field) => {
      if (field === 3) reader.list(() => chunk.path.push(reader.string()));
      else if (field === 7) chunk.compressedBytes = reader.integer();
      else if (field === 9) chunk.dataPageOffset = reader.integer();
      else if (field === 11) chunk.dictionaryPageOffset = reader.integer();
      else if (field === 12) chunk.statistics = readStatistics(reader);
      else return false;
      return true;
    });
    return true;
  });
  return chunk;
}

/** Decodes a footer's bytes (the FileMetaData struct). */
export function parseParquetFooter(bytes: Uint8Array, path: string): ParquetFooter {
  const reader = new CompactReader(bytes, path);
  const schema: SchemaElement[] = [];
  const rawGroups: { rows: number; chunks: RawChunk[] }[] = [];
  reader.struct((id) => {
    if (id === 2) reader.list(() => schema.push(readSchemaElement(reader)));
    else if (id === 4) {
      reader.list(() => {
        const group = { rows: 0, chunks: [] as RawChunk[] };
        reader.struct((field) => {
          if (field === 1) reader.list(() => group.chunks.push(readColumnChunk(reader)));
          else if (field === 3) group.rows = reader.integer();
          else return false;
          return true;
        });
        rawGroups.push(group);
      });
    } else return false;
    return true;
  });
  // The schema is a tree in depth-first order; the root's children are the top-level columns.
  const columns = new Map<string, FooterColumn>();
  const elements = new Map<string, SchemaElement>();
  let index = 1;
  const skipSubtree = (): void => {
    const element = schema[index++];
    for (let child = 0; child < (element?.children ?? 0); child++) skipSubtree();
  };
  const topLevel = schema[0]?.children ?? 0;
  for (let column = 0; column < topLevel && index < schema.length; column++) {
    const element = schema[index];
    if (element.children) {
      skipSubtree();
      continue;
    }
    index++;
    columns.set(element.name, { name: element.name, kind: kindOf(element) });
    elements.set(element.name, element);
  }
  const rowGroups = rawGroups.map((group) => {
    const chunks = new Map<string, ColumnChunkStatistics>();
    for (const chunk of group.chunks) {
      if (chunk.path.length !== 1) continue;
      const name = chunk.path[0];
      const column = columns.get(name);
      const element = elements.get(name);
      const offset = chunk.dictionaryPageOffset !== undefined && chunk.dictionaryPageOffset > 0 ? Math.min(chunk.dictionaryPageOffset, chunk.dataPageOffset) : chunk.dataPageOffset;
      const entry: ColumnChunkStatistics = { offset, compressedBytes: chunk.compressedBytes };
      const raw = chunk.statistics;
      if (raw && column && element) {
        if (raw.nullCount !== undefined) entry.nullCount = raw.nullCount;
        // The legacy min and max were compared as signed bytes: sound for numbers and booleans only.
        const legacyUsable = column.kind !== 'string' && column.kind !== null;
        const minBytes = raw.min ?? (legacyUsable ? raw.legacyMin : undefined);
        const maxBytes = raw.max ?? (legacyUsable ? raw.legacyMax : undefined);
        const min = minBytes ? decodeStatistic(minBytes, element, column.kind, 'min') : undefined;
        const max = maxBytes ? decodeStatistic(maxBytes, element, column.kind, 'max') : undefined;
        if (min !== undefined && max !== undefined) {
          entry.min = min;
          entry.max = max;
        }
      }
      chunks.set(name, entry);
    }
    return { rows: group.rows, columns: chunks };
  });
  return { columns, rowGroups };
}

/** Reads and decodes the footer of the Parquet file at `path`. */
export async function readParquetFooter(path: string, filesystem?: FileSystem): Promise<ParquetFooter> {
  const handle = await fileSystemFor(path, filesystem).open(path);
  try {
    const { size } = await handle.stat();
    const tail = Buffer.alloc(8);
    if (size < 12) throw new InvalidArgumentError(`'${path}' is not a Parquet file: ${size} bytes`, 'ERR_DATA_PARSE');
    await handle.read(tail, 0, 8, size - 8);
    if (tail.toString('latin1', 4) !== MAGIC) throw new InvalidArgumentError(`'${path}' is not a Parquet file: it does not end in ${MAGIC}`, 'ERR_DATA_PARSE');
    const length = tail.readUInt32LE(0);
    if (length > size - 12) throw new InvalidArgumentError(`'${path}' is not a Parquet file: its footer length ${length} exceeds the file`, 'ERR_DATA_PARSE');
    const footer = Buffer.alloc(length);
    await handle.read(footer, 0, length, size - 8 - length);
    return parseParquetFooter(footer, path);
  } finally {
    await handle.close();
  }
}
