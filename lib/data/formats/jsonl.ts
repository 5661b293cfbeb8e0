/**
 * JSON Lines: one JSON object per line. Read tasks stream their files (or byte ranges of a large
 * file, cut at line boundaries) and hand on a block every few MiB, so memory stays bounded
 * whatever the file size. A .json file that holds one array of objects (as many exported
 * datasets are) is read too, whole, by one task.
 */
import { DataType, Null, Table, vectorFromArray, type Schema, type Vector } from 'apache-arrow';
import { InvalidArgumentError, TrellisError } from '../../errors.js';
import { remote } from '../../core/registry.js';
import { blockToRows, rowsToBlock, type Block, type Row } from '../block.js';
import { Datasource, ReadTask } from '../datasource.js';
import {
  DEFAULT_BLOCK_BYTES, DEFAULT_MIN_SPLIT_BYTES, FileDatasink, TextWriter, boolColumn, checkExtensions, checkPositiveInteger, checkSchema, coerceRow,
  checkRowIds, estimateTextBytes, fileKey, listedFiles, taskFileSystem, textFileListing, firstTextByte, readWholeText, filesOf, float64Column, jsonReplacer, lineNumberAt, nullColumn, parseError, planLineRanges, readRangeLines, rangeBytes, schemaFromBytes, schemaToBytes, withRowIds,
  utf8Column,
  type FileEntry, type FileListing, type FileRange, type FileSystemOptions, type LineFileReadOptions,
} from './files.js';
import { checkFileSystem, type FileSystem, type WritableFile } from '../filesystem/file-system.js';
import { checkCompressionOption, checkWriteCompression, type Compression } from './compression.js';
import { partitionedReadTasks, selectPartitions, type PartitionValues } from './partitioning.js';
import { tensorColumnInfo } from '../tensor-column.js';

export const JSONL_EXTENSIONS: readonly string[] = ['.jsonl', '.ndjson', '.json'];

/** JSONL's options: the line readers' (default extensions .jsonl, .ndjson, .json), and a schema. */
export interface JsonlReadOptions extends LineFileReadOptions {
  /** Columns and their types; without it types are inferred (numbers float64, strings utf8, ...). */
  schema?: Schema;
}

/** The options as a read task receives them: plain data only. */
interface JsonlTaskOptions {
  filesystem?: FileSystem;
  rowIds?: string;
  schema?: Uint8Array;
  rowsPerBlock?: number;
  blockBytes: number;
}

async function lineError(range: FileRange, offset: number, reason: string, filesystem: FileSystem | undefined): Promise<InvalidArgumentError> {
  return parseError(`JSONL file '${range.path}', line ${await lineNumberAt(range.path, offset, range.compression, filesystem)}: ${reason}`);
}

/** The most text one JSON document may hold: a V8 string's length limit, with room to parse it. */
const MAX_DOCUMENT_BYTES = 256 << 20;

const kindOf = (value: unknown): string => (value === null ? 'null' : Array.isArray(value) ? 'an array' : typeof value);

export const readJsonlFiles = remote(import.meta, async function* readJsonlFiles(ranges: FileRange[], options: JsonlTaskOptions, documents: string[] = []): AsyncGenerator<Block> {
  const schema = options.schema ? schemaFromBytes(options.schema) : undefined;
  const builder = new ConsistentBlockBuilder(schema);
  const arrays = new Set(documents);
  let rows: Row[] = [];
  let ids: string[] = [];
  let bytes = 0;
  let sources = new Set<string>();
  const flush = (): Block => {
    let block = builder.build(rows, sources);
    if (options.rowIds) block = withRowIds(block, options.rowIds, ids, [...sources].join("', '"));
    rows = [];
    ids = [];
    bytes = 0;
    sources = new Set();
    return block;
  };
  /** Takes one parsed record; returns why it cannot be a row, if it cannot. */
  const take = (value: unknown, path: string, id: string, size: number): string | undefined => {
    if (typeof value !== 'object' || value === null || Array.isArray(value)) return `expected a JSON object, got ${kindOf(value)}`;
    let row = value as Row;
    if (schema) {
      try {
        row = coerceRow(row, schema.fields);
      } catch (error) {
        return (error as Error).message;
      }
    }
    rows.push(row);
    if (options.rowIds) ids.push(id);
    sources.add(path);
    bytes += size;
    return undefined;
  };
  const full = (): boolean => (options.rowsPerBlock ? rows.length >= options.rowsPerBlock : bytes >= options.blockBytes);
  for (const range of ranges) {
    const key = options.rowIds ? fileKey(range.path) : '';
    if (arrays.has(range.path)) {
      // A JSON document holding an array of objects: parsed whole; each element's id is its index.
      const text = await readWholeText(range.path, range.compression, MAX_DOCUMENT_BYTES, 'JSON', options.filesystem);
      let elements: unknown;
      try {
        elements = JSON.parse(text);
      } catch (error) {
        throw parseError(`JSON file '${range.path}': malformed JSON (${(error as Error).message})`);
      }
      if (!Array.isArray(elements)) throw parseError(`JSON file '${range.path}': expected an array of objects, got ${kindOf(elements)}`);
      const size = Math.max(1, Math.round(text.length / Math.max(1, elements.length)));
      for (const [index, element] of elements.entries()) {
        const problem = take(element, range.path, `${key}:${index}`, size);
        if (problem) throw parseError(`JSON file '${range.path}', element ${index}: ${problem}`);
        if (full()) yield flush();
      }
      continue;
    }
    for await (const lines of readRangeLines(range, range.start, options.filesystem)) {
      for (const line of lines) {
        if (isBlank(line.text)) continue;
        let value: unknown;
        try {
          value = JSON.parse(line.text);
        } catch (error) {
          throw await lineError(range, line.offset, `malformed JSON (${(error as Error).message})`, options.filesystem);
        }
        const problem = take(value, range.path, `${key}:${line.offset}`, line.next - line.offset);
        if (problem) {
          const hint = problem.startsWith('expected a JSON object') ? ' (JSON Lines hold one object per line)' : '';
          throw await lineError(range, line.offset, `${problem}${hint}`, options.filesystem);
        }
        if (full()) yield flush();
      }
    }
  }
  if (rows.length > 0) yield flush();
});

const isBlank = (text: string): boolean => text.length === 0 || /^\s*$/.test(text);

/**
 * Builds the blocks of one read task so that they agree on types where the data allows: a column
 * that is all null (or absent) in a later block keeps the type earlier blocks inferred for it,
 * instead of becoming a Null column that no longer concatenates with them.
 */
export class ConsistentBlockBuilder {
  private readonly known = new Map<string, DataType>();
  constructor(private readonly schema?: Schema) {}

  build(rows: Row[], sources: Iterable<string>): Block {
    if (this.schema) return rowsToBlock(rows, this.schema);
    let block: Block;
    try {
      block = flatBlock(rows) ?? rowsToBlock(rows);
    } catch (error) {
      // Name the files: the inference error names only the column.
      if (error instanceof TrellisError) throw new InvalidArgumentError(`in rows read from ${[...sources].map((path) => `'${path}'`).join(', ')}: ${error.message}`, error.code);
      throw error;
    }
    if (this.known.size === 0) {
      this.remember(block);
      return block;
    }
    const vectors: Record<string, Vector> = {};
    let changed = false;
    for (const [name, type] of this.known) {
      const child = block.getChild(name);
      if (!child || child.type instanceof Null) {
        vectors[name] = vectorFromArray(new Array(block.numRows).fill(null), type);
        changed = true;
      } else {
        vectors[name] = child;
      }
    }
    for (const field of block.schema.fields) {
      if (!this.known.has(field.name)) {
        vectors[field.name] = block.getChild(field.name)!;
        changed = true;
      }
    }
    this.remember(block);
    return changed ? new Table(vectors) : block;
  }

  private remember(block: Block): void {
    for (const field of block.schema.fields) if (!(field.type instanceof Null)) this.known.set(field.name, field.type);
  }
}

/**
 * Rows whose values are all numbers, strings, booleans or null, built column by column with the
 * types rowsToBlock would infer, several times faster than its generic path. Undefined when a
 * value needs the full inference (objects, lists, mixed types: it also reports the errors).
 */
function flatBlock(rows: Row[]): Block | undefined {
  const kinds = new Map<string, string>();
  for (const row of rows) {
    for (const key in row) {
      const value = row[key];
      const kind = value === null ? 'null' : typeof value;
      if (kind !== 'number' && kind !== 'string' && kind !== 'boolean' && kind !== 'null') return undefined;
      const seen = kinds.get(key);
      if (seen === undefined || seen === 'null') kinds.set(key, kind);
      else if (kind !== 'null' && kind !== seen) return undefined;
    }
  }
  const vectors: Record<string, Vector> = {};
  for (const [name, kind] of kinds) {
    const values = rows.map((row) => row[name]);
    vectors[name] =
      kind === 'number' ? float64Column(values as Array<number | null>)
      : kind === 'string' ? utf8Column(values as Array<string | null>)
      : kind === 'boolean' ? boolColumn(values as Array<boolean | null>)
      : nullColumn(rows.length);
  }
  return new Table(vectors);
}

export class JsonlDatasource extends Datasource {
  /** The files, and the Hive partition values of those under `k=v` directories (none when partitioning is off). */
  readonly #listing: FileListing<{ files: FileEntry[]; partitions: Map<string, PartitionValues> | undefined }>;
  private readonly taskOptions: JsonlTaskOptions;
  private readonly minSplitBytes: number;

  constructor(paths: string | readonly string[], options: JsonlReadOptions = {}) {
    super();
    const schema = checkSchema(options.schema, 'JSONL');
    const rowsPerBlock = checkPositiveInteger(options.rowsPerBlock, 'rowsPerBlock');
    const filesystem = taskFileSystem(paths, checkFileSystem(options.filesystem, 'JSONL'));
    this.taskOptions = {
      blockBytes: checkPositiveInteger(options.blockBytes, 'blockBytes') ?? DEFAULT_BLOCK_BYTES,
      ...(filesystem ? { filesystem } : {}),
      ...(schema ? { schema: schemaToBytes(schema) } : {}),
      ...(rowsPerBlock ? { rowsPerBlock } : {}),
      ...(options.rowIds !== undefined ? { rowIds: checkRowIds(options.rowIds, 'JSONL') } : {}),
    };
    this.minSplitBytes = checkPositiveInteger(options.minSplitBytes, 'minSplitBytes') ?? DEFAULT_MIN_SPLIT_BYTES;
    this.#listing = textFileListing(paths, checkExtensions(options.extensions, JSONL_EXTENSIONS), checkCompressionOption(options.compression, 'JSONL'), 'JSONL', filesystem, (found) =>
      selectPartitions(found, options, 'JSONL'),
    );
  }

  /** The files read (for URLs, known once the dataset runs). */
  get files(): FileEntry[] {
    return listedFiles(this.#listing, 'JSONL');
  }

  override get name(): string {
    return 'JSONL';
  }

  async getReadTasks(parallelism: number): Promise<ReadTask[]> {
    const { files, partitions } = await this.#listing.get();
    const documents = await this.#documents(files);
    return partitionedReadTasks(files, partitions, parallelism, (chosen, share) => this.#plan(chosen, share, documents));
  }

  /**
   * The .json files that hold one JSON array of objects rather than lines (as exported datasets
   * often do): their text begins with '['. Each is read whole, by one task.
   */
  async #documents(files: FileEntry[]): Promise<Set<string>> {
    const candidates = files.filter((file) => /\.json(?:\.[a-z0-9]+)?$/i.test(file.path));
    const starts = await Promise.all(candidates.map((file) => firstTextByte(file.path, file.compression, this.taskOptions.filesystem)));
    return new Set(candidates.filter((_, index) => starts[index] === 0x5b).map((file) => file.path));
  }

  #plan(files: FileEntry[], parallelism: number, documents: Set<string>): ReadTask[] {
    return planLineRanges(files, parallelism, { splittable: true, minSplitBytes: this.minSplitBytes, whole: documents }).map((ranges) => {
      const arrays = ranges.filter((range) => documents.has(range.path)).map((range) => range.path);
      return new ReadTask(readJsonlFiles, [ranges, this.taskOptions, ...(arrays.length > 0 ? [arrays] : [])], {
        bytes: ranges.reduce((sum, range) => sum + rangeBytes(range), 0),
        inputFiles: filesOf(ranges),
      });
    });
  }

  override estimateInMemorySize(): number | undefined {
    const listed = this.#listing.now;
    return listed && estimateTextBytes(listed.files);
  }
}

/**
 * Writes blocks as JSON Lines: timestamps as ISO strings, 64-bit integers as numbers when exact
 * (else strings), binary as base64. Reading back with the schema restores the types.
 */
export interface JsonlWriteOptions extends FileSystemOptions {
  /** Rows go under `column=value/` directories by these columns' values (left out of the files). */
  partitionBy?: string | string[];
  /** Rows in each file (the last fewer), gathered across tasks; default: a file per write task's output. */
  rowsPerFile?: number;
  /** Compress each file: 'gzip' (files end in .jsonl.gz), 'brotli' (.br), 'zstd' (.zst), or 'none' (default). */
  compression?: 'none' | Compression;
}

export class JsonlDatasink extends FileDatasink<{ partitionBy?: string | string[]; rowsPerFile?: number; compression?: Compression; filesystem?: FileSystem }> {
  constructor(path: string, options: JsonlWriteOptions = {}) {
    const compression = checkWriteCompression(options.compression, 'JSONL');
    super(path, { partitionBy: options.partitionBy, rowsPerFile: options.rowsPerFile, filesystem: options.filesystem, ...(compression ? { compression } : {}) }, 'JSONL');
  }

  override get name(): string {
    return 'JSONL';
  }

  protected override get compression(): Compression | undefined {
    return this.options.compression;
  }

  protected get extension(): string {
    return '.jsonl';
  }

  protected async writeBlocks(blocks: Block[], handle: WritableFile): Promise<number> {
    const writer = new TextWriter(handle, this.compression);
    let rows = 0;
    for (const block of blocks) {
      // A replacer slows JSON.stringify severalfold: use it only where a column needs it.
      const replacer = block.schema.fields.some((field) => needsReplacer(field.type) || tensorColumnInfo(field)) ? jsonReplacer : undefined;
      for (const row of blockToRows(block)) await writer.write(`${JSON.stringify(row, replacer)}\n`);
      rows += block.numRows;
    }
    await writer.end();
    return rows;
  }
}
remote(import.meta, JsonlDatasink);

/** Types whose values JSON.stringify cannot write as wanted: 64-bit integers (bigints) and binary. */
function needsReplacer(type: DataType): boolean {
  if (DataType.isInt(type) && type.bitWidth === 64) return true;
  if (DataType.isBinary(type) || DataType.isLargeBinary(type) || DataType.isFixedSizeBinary(type)) return true;
  if (DataType.isDictionary(type)) return needsReplacer(type.dictionary);
  return (type.children ?? []).some((child) => needsReplacer(child.type));
}
