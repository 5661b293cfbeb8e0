/**
 * Parquet through parquet-wasm. A read task reads one row group at a time from a Blob backed by
 * the file (only the bytes of that group are read), so memory is bounded by the largest row group;
 * with fewer files than tasks wanted, a file's row groups are spread over tasks. parquet-wasm is
 * loaded on first use: a program that never touches Parquet does not pay for compiling its wasm.
 */
import { DataType, Table, tableFromIPC, tableToIPC, vectorFromArray, type Dictionary, type Vector } from 'apache-arrow';
import { InvalidArgumentError } from '../../errors.js';
import { remote } from '../../core/registry.js';
import { concatBlocks, tableOfVectors, type Block } from '../block.js';
import { Datasource, ReadTask } from '../datasource.js';
import {
  FileDatasink, FileListing, checkColumns, checkExtensions, checkPositiveInteger, checkRowIds, fileKey, listedFiles, planFileReads, taskFileSystem, withRowIds,
  type FileEntry, type FilePiece, type FileSystemOptions, type FileUnit,
} from './files.js';
import { checkFileSystem, fileSystemFor, type FileSystem, type WritableFile } from '../filesystem/file-system.js';
import { partitionedReadTasks, selectPartitions, type PartitionReadOptions, type PartitionValues } from './partitioning.js';
import { readParquetFooter, type ParquetFooter } from './parquet-footer.js';
import { guardTraps } from '../../core/trap-guard.js';
import { andFilters, checkRowFilter, filterBlock, filterColumns, mayMatch, specializeFilter, toRowFilter, type Clauses, type RowFilter } from '../row-filter.js';

type ParquetWasm = typeof import('parquet-wasm/node');
type ParquetFileHandle = Awaited<ReturnType<ParquetWasm['ParquetFile']['fromFile']>>;

let loaded: Promise<ParquetWasm> | undefined;
const loadParquet = (): Promise<ParquetWasm> => (loaded ??= import('parquet-wasm/node'));

export const PARQUET_EXTENSIONS: readonly string[] = ['.parquet', '.pq'];
/** Footers a filtered read's planning reads at once. */
const FOOTER_READS_AT_ONCE = 16;

export interface ParquetReadOptions extends PartitionReadOptions, FileSystemOptions {
  /** Only these columns (all by default): the others are not even read from disk. */
  columns?: string[];
  /**
   * Keep dictionary-encoded columns as Arrow dictionaries. By default they are decoded to their
   * value type (utf8 stays utf8), so a table read back has the schema it was written with.
   */
  keepDictionaries?: boolean;
  /** Which files of a directory are read (default .parquet, .pq). */
  extensions?: string[];
  /**
   * Adds a column of this name holding each row's id, `<file key>:<row number in the file>`: for
   * a dataset without ids of its own, stable while the files are unchanged (a checkpoint's idColumn).
   */
  rowIds?: string;
  /**
   * Only the rows this filter keeps (`[['lang', '=', 'en'], ['score', '>=', 0.5]]`; see
   * RowFilter). Pushed down: files whose partition values refute it are never opened, row groups
   * whose statistics (min, max, null count) refute it are never read, and the rest is filtered
   * row by row in the read task. Its columns are read even where `columns` leaves them out.
   */
  filter?: RowFilter;
}

interface ParquetTaskOptions {
  filesystem?: FileSystem;
  columns?: string[];
  keepDictionaries: boolean;
  rowIds?: string;
  /** Already decided on the partition's values (specializeFilter). */
  filter?: Clauses;
}

/** Whether a row group might hold a row the filter keeps, by its columns' statistics. */
export function rowGroupMayMatch(footer: ParquetFooter, group: number, clauses: Clauses): boolean {
  const rowGroup = footer.rowGroups[group];
  if (!rowGroup) return true;
  return mayMatch(clauses, (column) => {
    const chunk = rowGroup.columns.get(column);
    if (!chunk) return undefined;
    return { rows: rowGroup.rows, ...(chunk.min !== undefined ? { min: chunk.min, max: chunk.max } : {}), ...(chunk.nullCount !== undefined ? { nullCount: chunk.nullCount } : {}) };
  });
}

/** The names of the partition columns the files' directories give. */
const partitionColumns = (partitions: Map<string, PartitionValues> | undefined): Set<string> => new Set([...(partitions?.values() ?? [])].flatMap((values) => Object.keys(values)));

async function openParquet(path: string, filesystem: FileSystem | undefined): Promise<ParquetFileHandle> {
  const parquet = await loadParquet();
  const blob = await fileSystemFor(path, filesystem).openBlob(path);
  try {
    // parquet-wasm reads a Blob by its size and slices: a remote object's slices are ranged GETs.
    return await guardTraps(() => parquet.ParquetFile.fromFile(blob as Blob));
  } catch (error) {
    throw new InvalidArgumentError(`'${path}' is not a Parquet file: ${errorText(error)}`, 'ERR_DATA_PARSE');
  }
}

/** wasm-bindgen throws strings or plain values as often as Errors. */
const errorText = (error: unknown): string => (error instanceof Error ? (error.name === 'RuntimeError' ? `parquet-wasm trapped (${error.message}): the data is corrupt or of a kind it cannot read` : error.message) : String(error));

/** Dictionary columns decoded to their value type: blocks hold plain strings, not dictionaries. */
function decodeDictionaries(table: Table): Table {
  if (!table.schema.fields.some((field) => DataType.isDictionary(field.type))) return table;
  const vectors: Record<string, Vector> = {};
  for (const field of table.schema.fields) {
    const column = table.getChild(field.name)!;
    vectors[field.name] = DataType.isDictionary(field.type) ? vectorFromArray(Array.from(column), (field.type as Dictionary).dictionary) : column;
  }
  return tableOfVectors(vectors, [table.schema]);
}

export const readParquetFiles = remote(import.meta, async function* readParquetFiles(units: FileUnit[], options: ParquetTaskOptions): AsyncGenerator<Block> {
  for (const unit of units) {
    const file = await openParquet(unit.path, options.filesystem);
    try {
      const where = `Parquet file '${unit.path}'`;
      let columns = options.columns;
      if (columns) {
        const names = checkColumnsExist(file, columns, unit.path);
        // The filter's columns are read too (those the file has: a missing one is named below).
        if (options.filter) columns = [...new Set([...columns, ...filterColumns(options.filter).filter((name) => names.includes(name))])];
      }
      const metadata = file.metadata();
      let groups = unit.pieces ?? Array.from({ length: metadata.numRowGroups() }, (_, index) => index);
      // Groups the driver named were chosen by the same filter; a whole file is pruned here.
      if (options.filter && !unit.pieces) {
        const footer = await readParquetFooter(unit.path);
        groups = groups.filter((group) => rowGroupMayMatch(footer, group, options.filter!));
      }
      // Every group's rows: where each starts in the file numbers its rows for rowIds.
      const allRows = Array.from({ length: metadata.numRowGroups() }, (_, group) => {
        const rowGroup = metadata.rowGroup(group);
        const rows = rowGroup.numRows();
        rowGroup.free();
        return rows;
      });
      const groupRows = groups.map((group) => allRows[group]);
      metadata.free();
      const key = options.rowIds ? fileKey(unit.path) : '';
      for (let position = 0; position < groups.length; position++) {
        let read;
        try {
          // One batch per row group: the default (1024 rows) would cut a block into many small
          // batches. Corrupt data can make parquet-wasm panic where no caller catches it: guarded.
          read = await guardTraps(() => file.read({ rowGroups: [groups[position]], batchSize: Math.max(1, groupRows[position]), ...(columns ? { columns } : {}) }));
        } catch (error) {
          throw new InvalidArgumentError(`Parquet file '${unit.path}', row group ${groups[position]}: ${errorText(error)}`, 'ERR_DATA_PARSE');
        }
        const table = tableFromIPC(read.intoIPCStream());
        let block = options.keepDictionaries ? table : decodeDictionaries(table);
        if (options.rowIds) {
          // Numbered before filtering: a row's id is its place in the file, whatever is kept.
          let first = 0;
          for (let group = 0; group < groups[position]; group++) first += allRows[group];
          block = withRowIds(block, options.rowIds, Array.from({ length: block.numRows }, (_, row) => `${key}:${first + row}`), unit.path);
        }
        if (options.filter) {
          block = filterBlock(block, options.filter, where);
          if (columns !== options.columns) block = block.select([...options.columns!, ...(options.rowIds ? [options.rowIds] : [])]);
          if (block.numRows === 0) continue;
        }
        yield block;
      }
    } finally {
      try {
        file.free();
      } catch {
        // A read that trapped still borrows the file: freeing fails, and would hide the trap's
        // error. The worker ends after this task anyway (see guardTraps).
      }
    }
  }
});

/** parquet-wasm's own message for a missing column does not say which file or what it has. Returns the file's columns. */
function checkColumnsExist(file: ParquetFileHandle, columns: string[], path: string): string[] {
  const names = tableFromIPC(file.schema().intoIPCStream()).schema.fields.map((field) => field.name);
  // A dotted name may be a path into a nested column: parquet-wasm resolves those itself.
  const missing = columns.filter((name) => !names.includes(name) && !name.includes('.'));
  if (missing.length) {
    throw new InvalidArgumentError(`Parquet file '${path}' has no column ${missing.map((name) => `'${name}'`).join(', ')} (it has: ${names.join(', ')})`, 'ERR_DATA_SCHEMA');
  }
  return names;
}

export class ParquetDatasource extends Datasource {
  /** The files, and the Hive partition values of those under `k=v` directories (none when partitioning is off). */
  readonly #listing: FileListing<{ files: FileEntry[]; partitions: Map<string, PartitionValues> | undefined }>;
  private readonly taskOptions: ParquetTaskOptions;

  readonly #paths: string | readonly string[];
  readonly #options: ParquetReadOptions;

  constructor(paths: string | readonly string[], options: ParquetReadOptions = {}) {
    super();
    this.#paths = paths;
    this.#options = options;
    const columns = checkColumns(options.columns, 'Parquet');
    const rowIds = checkRowIds(options.rowIds, 'Parquet');
    const filter = options.filter === undefined ? undefined : checkRowFilter(options.filter, 'readParquet()');
    const filesystem = taskFileSystem(paths, checkFileSystem(options.filesystem, 'Parquet'));
    this.taskOptions = {
      keepDictionaries: options.keepDictionaries === true,
      ...(filesystem ? { filesystem } : {}),
      ...(columns ? { columns } : {}),
      ...(rowIds ? { rowIds } : {}),
      ...(filter ? { filter } : {}),
    };
    this.#listing = new FileListing(paths, checkExtensions(options.extensions, PARQUET_EXTENSIONS), 'Parquet', filesystem, (found) => {
      const selected = selectPartitions(found, options, 'Parquet');
      // Files whose partition values refute the filter are never opened.
      return filter ? { files: selected.files.filter((file) => this.#filterFor(file, selected.partitions).length > 0), partitions: selected.partitions } : selected;
    });
  }

  /** The files read (for URLs, known once the dataset runs). */
  get files(): FileEntry[] {
    return listedFiles(this.#listing, 'Parquet');
  }

  override get name(): string {
    return 'Parquet';
  }

  /**
   * The same files read for these columns only (within the source's own `columns`); partition
   * and row-id columns are not in the files and are left to be added as before. None of the
   * files' columns among them: no narrowing (a read of no column would lose the row count).
   */
  override withColumns(columns: string[]): ParquetDatasource | undefined {
    // Partition columns of files at URLs are known once listed: getReadTasks leaves them out then.
    const added = new Set<string>([...(this.taskOptions.rowIds ? [this.taskOptions.rowIds] : []), ...partitionColumns(this.#listing.now?.partitions)]);
    const own = this.taskOptions.columns;
    const fileColumns = columns.filter((column) => !added.has(column) && (!own || own.includes(column)));
    if (fileColumns.length === 0) return undefined;
    return new ParquetDatasource(this.#paths, { ...this.#options, columns: fileColumns });
  }

  /** The same files, with this filter ANDed to the source's own. */
  override withFilter(filter: Clauses): ParquetDatasource {
    const combined = this.taskOptions.filter ? andFilters(this.taskOptions.filter, filter) : filter;
    return new ParquetDatasource(this.#paths, { ...this.#options, filter: toRowFilter(combined) });
  }

  /**
   * With fewer files than tasks wanted, reads each file's footer so that its row groups can be
   * spread over tasks (and rows and uncompressed sizes are known); otherwise tasks take whole files.
   */
  async getReadTasks(parallelism: number): Promise<ReadTask[]> {
    const { files, partitions } = await this.#listing.get();
    return partitionedReadTasks(files, partitions, parallelism, (chosen, share) => this.#plan(chosen, share, partitions));
  }

  /** The task options with partition columns left out of `columns` (they are not in the files). */
  #taskOptionsFor(partitions: Map<string, PartitionValues> | undefined): ParquetTaskOptions {
    const columns = this.taskOptions.columns;
    const added = partitionColumns(partitions);
    if (!columns || !columns.some((column) => added.has(column))) return this.taskOptions;
    const { columns: _all, ...rest } = this.taskOptions;
    const kept = columns.filter((column) => !added.has(column));
    // No file column left: read them all rather than none (a read of no column would lose the row count).
    return kept.length > 0 ? { ...rest, columns: kept } : rest;
  }

  /** The filter with a file's partition values decided (the whole filter for a file without). */
  #filterFor(file: FileEntry, partitions: Map<string, PartitionValues> | undefined): Clauses {
    const filter = this.taskOptions.filter!;
    const values = partitions?.get(file.path);
    return values ? specializeFilter(filter, values, 'readParquet()') : filter;
  }

  async #plan(files: FileEntry[], parallelism: number, partitions: Map<string, PartitionValues> | undefined): Promise<ReadTask[]> {
    // The files planned together share their partition values, so their filter is one.
    let taskOptions = this.#taskOptionsFor(partitions);
    if (taskOptions.filter && files.length > 0) {
      const { filter: _whole, ...rest } = taskOptions;
      const filter = this.#filterFor(files[0], partitions);
      // An empty clause keeps every row: nothing left to decide in the tasks.
      taskOptions = filter.some((clause) => clause.length === 0) ? rest : { ...rest, filter };
    }
    const footers = new Map<string, ParquetFooter>();
    if (taskOptions.filter) {
      // A file none of whose row groups can match gets no task (Ray reads every file's footer on
      // the driver too); the footers read here serve the split below.
      const filter = taskOptions.filter;
      const keep = new Set<string>();
      let next = 0;
      const readFooters = async (): Promise<void> => {
        while (next < files.length) {
          const file = files[next++];
          const footer = await readParquetFooter(file.path, this.taskOptions.filesystem);
          footers.set(file.path, footer);
          if (footer.rowGroups.some((_, group) => rowGroupMayMatch(footer, group, filter))) keep.add(file.path);
        }
      };
      await Promise.all(Array.from({ length: Math.min(FOOTER_READS_AT_ONCE, files.length) }, readFooters));
      files = files.filter((file) => keep.has(file.path));
    }
    const plan = await planFileReads(files, parallelism, async (file) => {
      const handle = await openParquet(file.path, this.taskOptions.filesystem);
      try {
        const metadata = handle.metadata();
        const count = metadata.numRowGroups();
        if (count === 0) return [{ path: file.path, bytes: file.bytes, rows: 0 }];
        const footer = footers.get(file.path);
        const pieces = [];
        for (let index = 0; index < count; index++) {
          // A group the statistics rule out gets no task at all.
          if (footer && !rowGroupMayMatch(footer, index, taskOptions.filter!)) continue;
          const group = metadata.rowGroup(index);
          pieces.push({ path: file.path, bytes: Number(group.totalByteSize()), rows: Number(group.numRows()), index });
          group.free();
        }
        metadata.free();
        return pieces;
      } finally {
        handle.free();
      }
    });
    // A whole file's task is told which of its groups are left, so it need not read the footer again.
    for (const task of plan) {
      for (const unit of task.units) {
        const footer = footers.get(unit.path);
        if (!footer || unit.pieces) continue;
        unit.pieces = footer.rowGroups.map((_, group) => group).filter((group) => rowGroupMayMatch(footer, group, taskOptions.filter!));
      }
    }
    return plan.map(
      (task) =>
        new ReadTask(readParquetFiles, [task.units, taskOptions], {
          bytes: task.bytes,
          inputFiles: task.inputFiles,
          ...(task.rows !== undefined ? { rows: task.rows } : {}),
        }),
    );
  }

  override estimateInMemorySize(): number | undefined {
    return this.#listing.now?.files.reduce((sum, file) => sum + file.bytes, 0);
  }
}

export type ParquetCompression = 'uncompressed' | 'snappy' | 'gzip' | 'brotli' | 'lz4' | 'zstd' | 'lz4_raw';
const COMPRESSIONS: Record<ParquetCompression, keyof ParquetWasm['Compression']> = {
  uncompressed: 'UNCOMPRESSED',
  snappy: 'SNAPPY',
  gzip: 'GZIP',
  brotli: 'BROTLI',
  lz4: 'LZ4',
  zstd: 'ZSTD',
  lz4_raw: 'LZ4_RAW',
};

export interface ParquetWriteOptions extends FileSystemOptions {
  /** Rows go under `column=value/` directories by these columns' values (left out of the files). */
  partitionBy?: string | string[];
  /** Codec of the column chunks (default 'snappy'). */
  compression?: ParquetCompression;
  /** Most rows in a row group: smaller groups let readers spread a file over more tasks. */
  rowGroupRows?: number;
  /** Rows in each file (the last fewer), gathered across tasks; default: a file per write task's output. */
  rowsPerFile?: number;
}

/** Writes each write task's blocks as one Parquet file; the blocks must share a schema. */
export class ParquetDatasink extends FileDatasink<{ compression: ParquetCompression; rowGroupRows?: number; partitionBy?: string | string[]; rowsPerFile?: number; filesystem?: FileSystem }> {
  constructor(path: string, options: ParquetWriteOptions = {}) {
    const compression = options.compression ?? 'snappy';
    if (!(compression in COMPRESSIONS)) {
      throw new InvalidArgumentError(`Parquet sink option 'compression' must be one of ${Object.keys(COMPRESSIONS).join(', ')}, got ${JSON.stringify(compression)}`, 'ERR_INVALID_ARGUMENT');
    }
    const rowGroupRows = checkPositiveInteger(options.rowGroupRows, 'rowGroupRows');
    super(path, { compression, ...(rowGroupRows ? { rowGroupRows } : {}), partitionBy: options.partitionBy, rowsPerFile: options.rowsPerFile, filesystem: options.filesystem }, 'Parquet');
  }

  override get name(): string {
    return 'Parquet';
  }

  protected get extension(): string {
    return '.parquet';
  }

  protected async writeBlocks(blocks: Block[], handle: WritableFile): Promise<number> {
    const parquet = await loadParquet();
    const table = concatBlocks(blocks);
    let properties = new parquet.WriterPropertiesBuilder().setCompression(parquet.Compression[COMPRESSIONS[this.options.compression]]);
    if (this.options.rowGroupRows) properties = properties.setMaxRowGroupSize(this.options.rowGroupRows);
    let bytes: Uint8Array;
    try {
      bytes = parquet.writeParquet(parquet.Table.fromIPCStream(tableToIPC(table, 'stream')), properties.build());
    } catch (error) {
      throw new InvalidArgumentError(`Parquet sink could not encode a block with schema (${table.schema.fields.map(String).join(', ')}): ${errorText(error)}`, 'ERR_DATA_TYPE');
    }
    await handle.write(bytes);
    return table.numRows;
  }
}
remote(import.meta, ParquetDatasink);
