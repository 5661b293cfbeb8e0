/**
 * Parquet through parquet-wasm. A read task reads one row group at a time from a Blob backed by
 * the file (only the bytes of that group are read), so memory is bounded by the largest row group;
 * with fewer files than tasks wanted, a file's row groups are spread over tasks. parquet-wasm is
 * loaded on first use: a program that never touches Parquet does not pay for compiling its wasm.
 */
import { openAsBlob } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { DataType, Table, tableFromIPC, tableToIPC, vectorFromArray, type Dictionary, type Vector } from 'apache-arrow';
import { InvalidArgumentError } from '../../errors.js';
import { remote } from '../../core/registry.js';
import { concatBlocks, type Block } from '../block.js';
import { Datasource, ReadTask } from '../datasource.js';
import {
  FileDatasink, checkColumns, checkExtensions, checkPositiveInteger, checkRowIds, expandPaths, fileKey, planFileReads, withRowIds,
  type FileEntry, type FilePiece, type FileUnit,
} from './files.js';
import { partitionedReadTasks, selectPartitions, type PartitionReadOptions, type PartitionValues } from './partitioning.js';

type ParquetWasm = typeof import('parquet-wasm/node');
type ParquetFileHandle = Awaited<ReturnType<ParquetWasm['ParquetFile']['fromFile']>>;

let loaded: Promise<ParquetWasm> | undefined;
const loadParquet = (): Promise<ParquetWasm> => (loaded ??= import('parquet-wasm/node'));

export const PARQUET_EXTENSIONS: readonly string[] = ['.parquet', '.pq'];

export interface ParquetReadOptions extends PartitionReadOptions {
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
}

interface ParquetTaskOptions {
  columns?: string[];
  keepDictionaries: boolean;
  rowIds?: string;
}

async function openParquet(path: string): Promise<ParquetFileHandle> {
  const parquet = await loadParquet();
  try {
    return await parquet.ParquetFile.fromFile(await openAsBlob(path));
  } catch (error) {
    throw new InvalidArgumentError(`'${path}' is not a Parquet file: ${errorText(error)}`, 'ERR_DATA_PARSE');
  }
}

/** wasm-bindgen throws strings or plain values as often as Errors. */
const errorText = (error: unknown): string => (error instanceof Error ? error.message : String(error));

/** Dictionary columns decoded to their value type: blocks hold plain strings, not dictionaries. */
function decodeDictionaries(table: Table): Table {
  if (!table.schema.fields.some((field) => DataType.isDictionary(field.type))) return table;
  const vectors: Record<string, Vector> = {};
  for (const field of table.schema.fields) {
    const column = table.getChild(field.name)!;
    vectors[field.name] = DataType.isDictionary(field.type) ? vectorFromArray(Array.from(column), (field.type as Dictionary).dictionary) : column;
  }
  return new Table(vectors);
}

export const readParquetFiles = remote(import.meta, async function* readParquetFiles(units: FileUnit[], options: ParquetTaskOptions): AsyncGenerator<Block> {
  for (const unit of units) {
    const file = await openParquet(unit.path);
    try {
      if (options.columns) checkColumnsExist(file, options.columns, unit.path);
      const metadata = file.metadata();
      const groups = unit.pieces ?? Array.from({ length: metadata.numRowGroups() }, (_, index) => index);
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
          // One batch per row group: the default (1024 rows) would cut a block into many small batches.
          read = await file.read({ rowGroups: [groups[position]], batchSize: Math.max(1, groupRows[position]), ...(options.columns ? { columns: options.columns } : {}) });
        } catch (error) {
          throw new InvalidArgumentError(`Parquet file '${unit.path}', row group ${groups[position]}: ${errorText(error)}`, 'ERR_DATA_PARSE');
        }
        const table = tableFromIPC(read.intoIPCStream());
        const block = options.keepDictionaries ? table : decodeDictionaries(table);
        if (!options.rowIds) {
          yield block;
          continue;
        }
        let first = 0;
        for (let group = 0; group < groups[position]; group++) first += allRows[group];
        yield withRowIds(block, options.rowIds, Array.from({ length: block.numRows }, (_, row) => `${key}:${first + row}`), unit.path);
      }
    } finally {
      file.free();
    }
  }
});

/** parquet-wasm's own message for a missing column does not say which file or what it has. */
function checkColumnsExist(file: ParquetFileHandle, columns: string[], path: string): void {
  const names = tableFromIPC(file.schema().intoIPCStream()).schema.fields.map((field) => field.name);
  // A dotted name may be a path into a nested column: parquet-wasm resolves those itself.
  const missing = columns.filter((name) => !names.includes(name) && !name.includes('.'));
  if (missing.length) {
    throw new InvalidArgumentError(`Parquet file '${path}' has no column ${missing.map((name) => `'${name}'`).join(', ')} (it has: ${names.join(', ')})`, 'ERR_DATA_SCHEMA');
  }
}

export class ParquetDatasource extends Datasource {
  readonly files: FileEntry[];
  /** Hive partition values of the files under `k=v` directories (none when partitioning is off). */
  private readonly partitions: Map<string, PartitionValues> | undefined;
  private readonly taskOptions: ParquetTaskOptions;

  constructor(paths: string | readonly string[], options: ParquetReadOptions = {}) {
    super();
    const columns = checkColumns(options.columns, 'Parquet');
    const rowIds = checkRowIds(options.rowIds, 'Parquet');
    this.taskOptions = { keepDictionaries: options.keepDictionaries === true, ...(columns ? { columns } : {}), ...(rowIds ? { rowIds } : {}) };
    const found = expandPaths(paths, checkExtensions(options.extensions, PARQUET_EXTENSIONS), 'Parquet');
    ({ files: this.files, partitions: this.partitions } = selectPartitions(found, options, 'Parquet'));

  }

  override get name(): string {
    return 'Parquet';
  }

  /**
   * With fewer files than tasks wanted, reads each file's footer so that its row groups can be
   * spread over tasks (and rows and uncompressed sizes are known); otherwise tasks take whole files.
   */
  getReadTasks(parallelism: number): Promise<ReadTask[]> {
    return partitionedReadTasks(this.files, this.partitions, parallelism, (files, share) => this.#plan(files, share));
  }

  async #plan(files: FileEntry[], parallelism: number): Promise<ReadTask[]> {
    const plan = await planFileReads(files, parallelism, async (file) => {
      const handle = await openParquet(file.path);
      try {
        const metadata = handle.metadata();
        const count = metadata.numRowGroups();
        if (count === 0) return [{ path: file.path, bytes: file.bytes, rows: 0 }];
        const pieces = Array.from({ length: count }, (_, index) => {
          const group = metadata.rowGroup(index);
          const piece = { path: file.path, bytes: Number(group.totalByteSize()), rows: Number(group.numRows()), index };
          group.free();
          return piece;
        });
        metadata.free();
        return pieces;
      } finally {
        handle.free();
      }
    });
    return plan.map(
      (task) =>
        new ReadTask(readParquetFiles, [task.units, this.taskOptions], {
          bytes: task.bytes,
          inputFiles: task.inputFiles,
          ...(task.rows !== undefined ? { rows: task.rows } : {}),
        }),
    );
  }

  override estimateInMemorySize(): number {
    return this.files.reduce((sum, file) => sum + file.bytes, 0);
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

export interface ParquetWriteOptions {
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
export class ParquetDatasink extends FileDatasink<{ compression: ParquetCompression; rowGroupRows?: number; partitionBy?: string | string[]; rowsPerFile?: number }> {
  constructor(path: string, options: ParquetWriteOptions = {}) {
    const compression = options.compression ?? 'snappy';
    if (!(compression in COMPRESSIONS)) {
      throw new InvalidArgumentError(`Parquet sink option 'compression' must be one of ${Object.keys(COMPRESSIONS).join(', ')}, got ${JSON.stringify(compression)}`, 'ERR_INVALID_ARGUMENT');
    }
    const rowGroupRows = checkPositiveInteger(options.rowGroupRows, 'rowGroupRows');
    super(path, { compression, ...(rowGroupRows ? { rowGroupRows } : {}), partitionBy: options.partitionBy, rowsPerFile: options.rowsPerFile }, 'Parquet');
  }

  override get name(): string {
    return 'Parquet';
  }

  protected get extension(): string {
    return '.parquet';
  }

  protected async writeBlocks(blocks: Block[], handle: FileHandle): Promise<number> {
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
