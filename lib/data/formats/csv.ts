/**
 * CSV with a header row and RFC 4180 quoting. Read tasks stream their files (or byte ranges of a
 * large file: every range task reads the header from the file's start) and infer each column's
 * type: all numbers → float64, all true/false → bool, otherwise utf8; an empty unquoted field is
 * null, a quoted empty field ("") the empty string.
 */
import { Bool, DataType, Float64, Null, Table, Utf8, vectorFromArray, type Schema, type Vector } from 'apache-arrow';
import { InvalidArgumentError } from '../../errors.js';
import { remote } from '../../core/registry.js';
import { blockToColumns, type Block } from '../block.js';
import { Datasource, ReadTask } from '../datasource.js';
import {
  DEFAULT_BLOCK_BYTES, DEFAULT_MIN_SPLIT_BYTES, FileDatasink, TextWriter, boolColumn, checkExtensions, checkPositiveInteger, checkSchema, coerceValue,
  checkRowIds, estimateTextBytes, fileKey, listedFiles, taskFileSystem, textFileListing, filesOf, float64Column, isNumberText, jsonReplacer, lineNumberAt, nullColumn, parseError, planLineRanges, rangeBytes, readLines, readRangeLines, schemaFromBytes, schemaToBytes, utf8Column, withRowIds,
  type FileEntry, type FileRange, type LineFileReadOptions,
  type FileListing, type FileSystemOptions,
} from './files.js';
import { checkCompressionOption, checkWriteCompression, type Compression } from './compression.js';
import { partitionedReadTasks, selectPartitions, type PartitionValues } from './partitioning.js';
import { checkFileSystem, type FileSystem, type WritableFile } from '../filesystem/file-system.js';
import { columnTensorCells, tensorColumnInfo } from '../tensor-column.js';

export const CSV_EXTENSIONS: readonly string[] = ['.csv'];

/** CSV's options: the line readers' (default extension .csv), and its own. */
export interface CsvReadOptions extends LineFileReadOptions {
  /** One character between fields (default ','). */
  delimiter?: string;
  /**
   * Quoted fields may hold line breaks. Such a file cannot be cut at line boundaries, so it is read
   * whole by one task. Default false: large files may be split across tasks, and a quoted line
   * break in a split file is reported as an error. A file read whole always honours them.
   */
  quotedNewlines?: boolean;
  /** Columns and their types; without it types are inferred per column. */
  schema?: Schema;
}

interface CsvTaskOptions {
  filesystem?: FileSystem;
  delimiter: string;
  rowIds?: string;
  schema?: Uint8Array;
  rowsPerBlock?: number;
  blockBytes: number;
}

/** A field as read: text, or null for an empty unquoted field. */
type Cell = string | null;

/**
 * Parses records a line at a time. A quoted field that reaches the end of a line continues on the
 * next (feed returns undefined until the record is complete). Malformed quoting throws a message;
 * the caller adds the file and line.
 */
export class CsvRecordParser {
  private fields: Cell[] = [];
  private field = '';
  private quoted = false;
  private inQuotes = false;
  private afterQuote = false;

  constructor(private readonly delimiter: string) {}

  /** A quoted field is open: the record continues on the next line. */
  get pending(): boolean {
    return this.inQuotes;
  }

  feed(line: string): Cell[] | undefined {
    // Most lines hold no quote at all: a plain split is many times faster than the scan below.
    if (!this.inQuotes && this.fields.length === 0 && line.indexOf('"') < 0) {
      const fields: Cell[] = line.split(this.delimiter);
      for (let index = 0; index < fields.length; index++) if (fields[index] === '') fields[index] = null;
      return fields;
    }
    const delimiter = this.delimiter;
    let index = 0;
    while (index < line.length) {
      if (this.inQuotes) {
        const quote = line.indexOf('"', index);
        if (quote < 0) {
          this.field += line.slice(index);
          index = line.length;
          break;
        }
        this.field += line.slice(index, quote);
        if (line[quote + 1] === '"') {
          this.field += '"';
          index = quote + 2;
        } else {
          this.inQuotes = false;
          this.afterQuote = true;
          index = quote + 1;
        }
        continue;
      }
      const char = line[index];
      if (char === delimiter) {
        this.endField();
        index++;
        continue;
      }
      if (this.afterQuote) throw new Error(`unexpected ${JSON.stringify(char)} after the closing quote of field ${this.fields.length + 1}`);
      if (char === '"' && this.field === '') {
        this.inQuotes = true;
        this.quoted = true;
        index++;
        continue;
      }
      // A quote inside an unquoted field is taken literally (as in `5" screen`), as most readers do.
      const next = line.indexOf(delimiter, index);
      const stop = next < 0 ? line.length : next;
      this.field += line.slice(index, stop);
      index = stop;
    }
    if (this.inQuotes) {
      this.field += '\n';
      return undefined;
    }
    this.endField();
    const record = this.fields;
    this.fields = [];
    return record;
  }

  private endField(): void {
    this.fields.push(this.quoted || this.field !== '' ? this.field : null);
    this.field = '';
    this.quoted = false;
    this.afterQuote = false;
  }
}

interface Header {
  names: string[];
  /** Byte offset where the first data line begins. */
  end: number;
}

async function readHeader(range: FileRange, delimiter: string, filesystem: FileSystem | undefined): Promise<Header | undefined> {
  const { path, compression } = range;
  const parser = new CsvRecordParser(delimiter);
  let recordStart = 0;
  for await (const line of readLines(path, 0, Number.POSITIVE_INFINITY, compression, filesystem)) {
    if (!parser.pending && line.text === '') continue;
    if (!parser.pending) recordStart = line.offset;
    let record: Cell[] | undefined;
    try {
      record = parser.feed(line.text);
    } catch (error) {
      throw await lineError(range, recordStart, (error as Error).message, filesystem);
    }
    if (!record) continue;
    const names = record.map((name) => name ?? '');
    const seen = new Set<string>();
    for (const name of names) {
      if (seen.has(name)) throw await lineError(range, recordStart, `the header names column '${name}' twice`, filesystem);
      seen.add(name);
    }
    return { names, end: line.next };
  }
  if (parser.pending) throw await lineError(range, recordStart, 'unbalanced quote: the quoted field is never closed', filesystem);
  return undefined;
}

async function lineError(range: FileRange, offset: number, reason: string, filesystem: FileSystem | undefined): Promise<InvalidArgumentError> {
  return parseError(`CSV file '${range.path}', line ${await lineNumberAt(range.path, offset, range.compression, filesystem)}: ${reason}`);
}

export const readCsvFiles = remote(import.meta, async function* readCsvFiles(ranges: FileRange[], options: CsvTaskOptions): AsyncGenerator<Block> {
  const schema = options.schema ? schemaFromBytes(options.schema) : undefined;
  const known = new Map<string, DataType>();
  let names: string[] = [];
  let columns: unknown[][] = [];
  let rows = 0;
  let bytes = 0;
  let ids: string[] = [];
  let path = '';
  const flush = (): Block => {
    let block = schema ? typedBlock(schema, columns, rows) : inferredBlock(names, columns as Cell[][], known);
    if (options.rowIds) block = withRowIds(block, options.rowIds, ids, path);
    columns = columns.map(() => []);
    ids = [];
    rows = 0;
    bytes = 0;
    return block;
  };
  for (const range of ranges) {
    const header = await readHeader(range, options.delimiter, options.filesystem);
    if (!header) continue;
    const key = options.rowIds ? fileKey(range.path) : '';
    // With a schema, its fields are the columns (in its order); the header says where each is.
    const positions = schema ? schemaPositions(schema, header, range.path) : header.names.map((_, index) => index);
    const wanted = schema ? schema.fields.map((field) => field.name) : header.names;
    if (wanted.join('\u0000') !== names.join('\u0000') || columns.length === 0) {
      if (rows > 0) yield flush();
      names = wanted;
      columns = names.map(() => []);
    }
    const parser = new CsvRecordParser(options.delimiter);
    let recordStart = 0;
    for await (const lines of readRangeLines(range, Math.max(range.start, header.end), options.filesystem)) {
      for (const line of lines) {
        if (!parser.pending) {
          if (line.text === '') continue;
          recordStart = line.offset;
        }
        let record: Cell[] | undefined;
        try {
          record = parser.feed(line.text);
        } catch (error) {
          throw await lineError(range, recordStart, (error as Error).message, options.filesystem);
        }
        if (!record) {
          if (range.split) {
            throw await lineError(
              range,
              recordStart,
              'unbalanced quote: a quoted field runs past the end of the line. Quoted line breaks cannot be read from a file split ' +
                'across read tasks: pass { quotedNewlines: true } to read such files whole',
              options.filesystem,
            );
          }
          continue;
        }
        if (record.length !== header.names.length) {
          throw await lineError(range, recordStart, `expected ${header.names.length} fields as in the header, found ${record.length}`, options.filesystem);
        }
        if (schema) {
          for (let column = 0; column < positions.length; column++) {
            const field = schema.fields[column];
            try {
              columns[column].push(cellAs(record[positions[column]], field.type));
            } catch (error) {
              throw await lineError(range, recordStart, `column '${field.name}': ${(error as Error).message}`, options.filesystem);
            }
          }
        } else {
          for (let column = 0; column < record.length; column++) columns[column].push(record[column]);
        }
        rows++;
        if (options.rowIds) ids.push(`${key}:${recordStart}`);
        path = range.path;
        bytes += line.next - recordStart;
        if (options.rowsPerBlock ? rows >= options.rowsPerBlock : bytes >= options.blockBytes) yield flush();
      }
    }
    if (parser.pending) throw await lineError(range, recordStart, 'unbalanced quote: the quoted field is never closed', options.filesystem);
  }
  if (rows > 0) yield flush();
});

function schemaPositions(schema: Schema, header: Header, path: string): number[] {
  return schema.fields.map((field) => {
    const position = header.names.indexOf(field.name);
    if (position < 0) throw parseError(`CSV file '${path}': column '${field.name}' of the schema is not in the header (${header.names.join(', ')})`);
    return position;
  });
}

/**
 * A cell as a schema's type wants it. A quoted empty field is the empty string, or empty bytes (the
 * base64 of nothing); for other types it can only mean null.
 */
function cellAs(cell: Cell, type: DataType): unknown {
  if (cell === null) return null;
  if (DataType.isUtf8(type) || DataType.isLargeUtf8(type)) return cell;
  if (cell === '' && !(DataType.isBinary(type) || DataType.isLargeBinary(type))) return null;
  return coerceValue(cell, type);
}

function typedBlock(schema: Schema, columns: unknown[][], rows: number): Block {
  const vectors: Record<string, Vector> = {};
  schema.fields.forEach((field, index) => {
    vectors[field.name] = vectorFromArray(columns[index] ?? new Array(rows).fill(null), field.type);
  });
  return new Table(schema, vectors);
}

const BOOLEAN_TEXT = /^(?:true|false)$/i;

/**
 * A column's type from its cells. A type earlier blocks of the task inferred is kept when it can
 * hold these cells (utf8 holds anything), so that the blocks of a task agree where possible.
 */
function inferCellType(cells: Cell[], known: DataType | undefined): DataType {
  let empty = true;
  let numeric = true;
  let boolean = true;
  for (const cell of cells) {
    if (cell === null) continue;
    empty = false;
    if (numeric && !isNumberText(cell)) numeric = false;
    if (boolean && !BOOLEAN_TEXT.test(cell)) boolean = false;
    if (!numeric && !boolean) break;
  }
  if (empty) return known ?? new Null();
  if (known) {
    if (DataType.isUtf8(known)) return known;
    if (DataType.isFloat(known) && numeric) return known;
    if (DataType.isBool(known) && boolean) return known;
  }
  return numeric ? new Float64() : boolean ? new Bool() : new Utf8();
}

function inferredBlock(names: string[], columns: Cell[][], known: Map<string, DataType>): Block {
  const vectors: Record<string, Vector> = {};
  names.forEach((name, index) => {
    const cells = columns[index];
    const type = inferCellType(cells, known.get(name));
    if (type instanceof Null) {
      vectors[name] = nullColumn(cells.length);
      return;
    }
    known.set(name, type);
    if (DataType.isFloat(type)) vectors[name] = float64Column(cells.map((cell) => (cell === null ? null : Number(cell))));
    else if (DataType.isBool(type)) vectors[name] = boolColumn(cells.map((cell) => (cell === null ? null : cell.toLowerCase() === 'true')));
    else vectors[name] = utf8Column(cells);
  });
  return new Table(vectors);
}

function checkDelimiter(value: unknown, format: string): string {
  if (value === undefined) return ',';
  if (typeof value !== 'string' || value.length !== 1 || value === '"' || value === '\n' || value === '\r') {
    throw new InvalidArgumentError(`${format} option 'delimiter' must be one character other than a quote or a line break, got ${JSON.stringify(value)}`, 'ERR_INVALID_ARGUMENT');
  }
  return value;
}

export class CsvDatasource extends Datasource {
  /** The files, and the Hive partition values of those under `k=v` directories (none when partitioning is off). */
  readonly #listing: FileListing<{ files: FileEntry[]; partitions: Map<string, PartitionValues> | undefined }>;
  private readonly taskOptions: CsvTaskOptions;
  private readonly minSplitBytes: number;
  private readonly splittable: boolean;

  constructor(paths: string | readonly string[], options: CsvReadOptions = {}) {
    super();
    const schema = checkSchema(options.schema, 'CSV');
    const rowsPerBlock = checkPositiveInteger(options.rowsPerBlock, 'rowsPerBlock');
    const filesystem = taskFileSystem(paths, checkFileSystem(options.filesystem, 'CSV'));
    this.taskOptions = {
      delimiter: checkDelimiter(options.delimiter, 'CSV'),
      ...(filesystem ? { filesystem } : {}),
      blockBytes: checkPositiveInteger(options.blockBytes, 'blockBytes') ?? DEFAULT_BLOCK_BYTES,
      ...(schema ? { schema: schemaToBytes(schema) } : {}),
      ...(rowsPerBlock ? { rowsPerBlock } : {}),
      ...(options.rowIds !== undefined ? { rowIds: checkRowIds(options.rowIds, 'CSV') } : {}),
    };
    this.minSplitBytes = checkPositiveInteger(options.minSplitBytes, 'minSplitBytes') ?? DEFAULT_MIN_SPLIT_BYTES;
    this.splittable = options.quotedNewlines !== true;
    this.#listing = textFileListing(paths, checkExtensions(options.extensions, CSV_EXTENSIONS), checkCompressionOption(options.compression, 'CSV'), 'CSV', filesystem, (found) =>
      selectPartitions(found, options, 'CSV'),
    );
  }

  /** The files read (for URLs, known once the dataset runs). */
  get files(): FileEntry[] {
    return listedFiles(this.#listing, 'CSV');
  }

  override get name(): string {
    return 'CSV';
  }

  async getReadTasks(parallelism: number): Promise<ReadTask[]> {
    const { files, partitions } = await this.#listing.get();
    return partitionedReadTasks(files, partitions, parallelism, (chosen, share) => this.#plan(chosen, share));
  }

  #plan(files: FileEntry[], parallelism: number): ReadTask[] {
    return planLineRanges(files, parallelism, { splittable: this.splittable, minSplitBytes: this.minSplitBytes }).map(
      (ranges) =>
        new ReadTask(readCsvFiles, [ranges, this.taskOptions], {
          bytes: ranges.reduce((sum, range) => sum + rangeBytes(range), 0),
          inputFiles: filesOf(ranges),
        }),
    );
  }

  override estimateInMemorySize(): number | undefined {
    const listed = this.#listing.now;
    return listed && estimateTextBytes(listed.files);
  }
}

export interface CsvWriteOptions extends FileSystemOptions {
  /** Rows go under `column=value/` directories by these columns' values (left out of the files). */
  partitionBy?: string | string[];
  /** One character between fields (default ','). */
  delimiter?: string;
  /** Write the header row (default true; the CSV reader needs it). */
  header?: boolean;
  /** Rows in each file (the last fewer), gathered across tasks; default: a file per write task's output. */
  rowsPerFile?: number;
  /** Compress each file: 'gzip' (files end in .csv.gz), 'brotli' (.br), 'zstd' (.zst), or 'none' (default). */
  compression?: 'none' | Compression;
}

/**
 * Writes blocks as CSV. Fields are quoted when they hold the delimiter, a quote or a line break,
 * and the empty string is written "" so that it reads back apart from null (an empty field).
 * Timestamps are ISO strings, binary base64, lists and structs JSON.
 */
export class CsvDatasink extends FileDatasink<{ delimiter: string; header: boolean; partitionBy?: string | string[]; rowsPerFile?: number; compression?: Compression; filesystem?: FileSystem }> {
  constructor(path: string, options: CsvWriteOptions = {}) {
    const compression = checkWriteCompression(options.compression, 'CSV');
    super(
      path,
      { delimiter: checkDelimiter(options.delimiter, 'CSV'), header: options.header !== false, partitionBy: options.partitionBy, rowsPerFile: options.rowsPerFile, filesystem: options.filesystem, ...(compression ? { compression } : {}) },
      'CSV',
    );
  }

  override get name(): string {
    return 'CSV';
  }

  protected override get compression(): Compression | undefined {
    return this.options.compression;
  }

  protected get extension(): string {
    return '.csv';
  }

  protected async writeBlocks(blocks: Block[], handle: WritableFile): Promise<number> {
    const { delimiter, header } = this.options;
    const names = blocks[0].schema.fields.map((field) => field.name);
    const writer = new TextWriter(handle, this.compression);
    if (header) await writer.write(`${names.map((name) => csvField(name, delimiter)).join(delimiter)}\n`);
    let rows = 0;
    for (const block of blocks) {
      const blockNames = block.schema.fields.map((field) => field.name);
      if (blockNames.join('\u0000') !== names.join('\u0000')) {
        throw new InvalidArgumentError(`CSV sink: a write task's blocks have different columns: (${names.join(', ')}) vs (${blockNames.join(', ')})`, 'ERR_DATA_SCHEMA');
      }
      const columns = blockToColumns(block);
      // A tensor column's cells, each written as its nested arrays in JSON.
      const values = block.schema.fields.map((field) => {
        const info = tensorColumnInfo(field);
        return info ? columnTensorCells(block.getChild(field.name)!, info) : (columns[field.name] as ArrayLike<unknown>);
      });
      for (let row = 0; row < block.numRows; row++) {
        let line = '';
        for (let column = 0; column < values.length; column++) {
          if (column > 0) line += delimiter;
          line += csvCell(values[column][row], delimiter);
        }
        await writer.write(`${line}\n`);
      }
      rows += block.numRows;
    }
    await writer.end();
    return rows;
  }
}
remote(import.meta, CsvDatasink);

function csvCell(value: unknown, delimiter: string): string {
  if (value === null || value === undefined) return '';
  switch (typeof value) {
    case 'string':
      return csvField(value, delimiter, true);
    case 'number':
    case 'bigint':
    case 'boolean':
      return String(value);
    default:
      break;
  }
  if (value instanceof Date) return value.toISOString();
  // Empty bytes are "" (an empty field would read back as null).
  if (value instanceof Uint8Array) return csvField(Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString('base64'), delimiter, true);
  return csvField(JSON.stringify(value, jsonReplacer), delimiter, true);
}

function csvField(text: string, delimiter: string, quoteEmpty = false): string {
  if ((quoteEmpty && text === '') || text.includes(delimiter) || text.includes('"') || text.includes('\n') || text.includes('\r')) {
    return `"${text.replaceAll('"', '""')}"`;
  }
  return text;
}

