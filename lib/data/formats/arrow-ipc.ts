/**
 * Arrow IPC files, in the file format (random access: a footer lists the record batches) and the
 * stream format. Batches are read as Arrow lays them out, without conversion: each batch's arrays
 * view the bytes read for it. A file in the file format can be split across read tasks by record
 * batches.
 */
import type { FileHandle } from 'node:fs/promises';
import { RecordBatchReader, Table, tableToIPC, type RecordBatch } from 'apache-arrow';
import { InvalidArgumentError } from '../../errors.js';
import { remote } from '../../core/registry.js';
import { blockBytes, concatBlocks, type Block } from '../block.js';
import { Datasource, ReadTask } from '../datasource.js';
import {
  DEFAULT_BLOCK_BYTES, FileDatasink, checkColumns, checkExtensions, checkPositiveInteger, checkRowIds, fileKey, FileListing, listedFiles, planFileReads, taskFileSystem, withRowIds,
  type FileEntry, type FilePiece, type FileSystemOptions, type FileUnit,
} from './files.js';
import { checkFileSystem, fileSystemFor, type FileSystem, type RandomAccessFile, type WritableFile } from '../filesystem/file-system.js';
import { partitionedReadTasks, selectPartitions, type PartitionReadOptions, type PartitionValues } from './partitioning.js';

export const ARROW_EXTENSIONS: readonly string[] = ['.arrow', '.arrows', '.feather', '.ipc'];

export interface ArrowReadOptions extends PartitionReadOptions, FileSystemOptions {
  /** Only these columns (all by default). */
  columns?: string[];
  /** Consecutive record batches are handed on together up to about this many bytes (default 4 MiB). */
  blockBytes?: number;
  /** Which files of a directory are read (default .arrow, .arrows, .feather, .ipc). */
  extensions?: string[];
  /**
   * Adds a column of this name holding each row's id, `<file key>:<record batch>.<row in it>`: for
   * a dataset without ids of its own, stable while the files are unchanged (a checkpoint's idColumn).
   */
  rowIds?: string;
}

interface ArrowTaskOptions {
  filesystem?: FileSystem;
  columns?: string[];
  blockBytes: number;
  rowIds?: string;
}

type IpcReader = Awaited<ReturnType<typeof openReader>>['reader'];

async function openReader(path: string, filesystem: FileSystem | undefined): Promise<{ handle: RandomAccessFile; reader: Awaited<ReturnType<typeof RecordBatchReader.from<any>>> }> {
  const handle = await fileSystemFor(path, filesystem).open(path);
  try {
    // A RandomAccessFile has a FileHandle's shape: arrow reads it by offsets either way.
    const reader = await RecordBatchReader.from(handle as unknown as FileHandle);
    await reader.open();
    return { handle, reader };
  } catch (error) {
    await handle.close().catch(() => undefined);
    throw new InvalidArgumentError(`'${path}' is not an Arrow IPC file or stream: ${(error as Error).message}`, 'ERR_DATA_PARSE');
  }
}

/** A file's record batches (the chosen ones, or all), each with its index in the file. */
async function* batchesOf(reader: IpcReader, pieces: number[] | undefined, path: string): AsyncGenerator<[number, RecordBatch]> {
  if (!pieces) {
    let index = 0;
    for await (const batch of reader as AsyncIterable<RecordBatch>) yield [index++, batch];
    return;
  }
  if (!reader.isFile()) throw new InvalidArgumentError(`'${path}' is an Arrow IPC stream: its record batches cannot be read by index`, 'ERR_DATA_PARSE');
  for (const index of pieces) {
    const batch = await reader.readRecordBatch(index);
    if (!batch) throw new InvalidArgumentError(`'${path}' has no record batch ${index}`, 'ERR_DATA_PARSE');
    yield [index, batch];
  }
}

function project(table: Table, columns: string[] | undefined, path: string): Table {
  if (!columns) return table;
  const names = new Set(table.schema.fields.map((field) => field.name));
  const missing = columns.filter((name) => !names.has(name));
  if (missing.length) {
    throw new InvalidArgumentError(`Arrow file '${path}' has no column ${missing.map((name) => `'${name}'`).join(', ')} (it has: ${[...names].join(', ')})`, 'ERR_DATA_SCHEMA');
  }
  return table.select(columns);
}

export const readArrowFiles = remote(import.meta, async function* readArrowFiles(units: FileUnit[], options: ArrowTaskOptions): AsyncGenerator<Block> {
  for (const unit of units) {
    const { handle, reader } = await openReader(unit.path, options.filesystem);
    try {
      // Batches of a file share its schema; gather small ones so a block is not a few rows.
      let batches: RecordBatch[] = [];
      let ids: string[] = [];
      let bytes = 0;
      const key = options.rowIds ? fileKey(unit.path) : '';
      const block = (): Table => {
        const table = project(new Table(batches), options.columns, unit.path);
        return options.rowIds ? withRowIds(table, options.rowIds, ids, unit.path) : table;
      };
      for await (const [index, batch] of batchesOf(reader, unit.pieces, unit.path)) {
        batches.push(batch);
        if (options.rowIds) for (let row = 0; row < batch.numRows; row++) ids.push(`${key}:${index}.${row}`);
        bytes += blockBytes(new Table(batch));
        if (bytes >= options.blockBytes) {
          yield block();
          batches = [];
          ids = [];
          bytes = 0;
        }
      }
      if (batches.length) yield block();
    } finally {
      await reader.cancel().catch(() => undefined);
      await handle.close().catch(() => undefined);
    }
  }
});

export class ArrowDatasource extends Datasource {
  /** The files, and the Hive partition values of those under `k=v` directories (none when partitioning is off). */
  readonly #listing: FileListing<{ files: FileEntry[]; partitions: Map<string, PartitionValues> | undefined }>;
  private readonly taskOptions: ArrowTaskOptions;

  constructor(paths: string | readonly string[], options: ArrowReadOptions = {}) {
    super();
    const columns = checkColumns(options.columns, 'Arrow');
    const filesystem = taskFileSystem(paths, checkFileSystem(options.filesystem, 'Arrow'));
    this.taskOptions = {
      blockBytes: checkPositiveInteger(options.blockBytes, 'blockBytes') ?? DEFAULT_BLOCK_BYTES,
      ...(filesystem ? { filesystem } : {}),
      ...(columns ? { columns } : {}),
      ...(options.rowIds !== undefined ? { rowIds: checkRowIds(options.rowIds, 'Arrow') } : {}),
    };
    this.#listing = new FileListing(paths, checkExtensions(options.extensions, ARROW_EXTENSIONS), 'Arrow', filesystem, (found) => selectPartitions(found, options, 'Arrow'));
  }

  /** The files read (for URLs, known once the dataset runs). */
  get files(): FileEntry[] {
    return listedFiles(this.#listing, 'Arrow');
  }

  override get name(): string {
    return 'Arrow';
  }

  /**
   * With fewer files than tasks wanted, reads the footers of files in the file format so that
   * their record batches can be spread over tasks; stream-format files are read whole.
   */
  async getReadTasks(parallelism: number): Promise<ReadTask[]> {
    const { files, partitions } = await this.#listing.get();
    return partitionedReadTasks(files, partitions, parallelism, (chosen, share) => this.#plan(chosen, share));
  }

  async #plan(files: FileEntry[], parallelism: number): Promise<ReadTask[]> {
    const plan = await planFileReads(files, parallelism, async (file) => {
      const { handle, reader } = await openReader(file.path, this.taskOptions.filesystem);
      try {
        const footer = reader.isFile() ? reader.footer : null;
        if (!footer || reader.numRecordBatches < 2) return [];
        return Array.from({ length: reader.numRecordBatches }, (_, index) => ({
          path: file.path, bytes: Number(footer.getRecordBatch(index)?.bodyLength ?? 0), index,
        }));
      } finally {
        await reader.cancel().catch(() => undefined);
        await handle.close().catch(() => undefined);
      }
    });
    return plan.map(
      (task) => new ReadTask(readArrowFiles, [task.units, this.taskOptions], { bytes: task.bytes, inputFiles: task.inputFiles }),
    );
  }

  override estimateInMemorySize(): number | undefined {
    return this.#listing.now?.files.reduce((sum, file) => sum + file.bytes, 0);
  }
}

export interface ArrowWriteOptions extends FileSystemOptions {
  /** Rows go under `column=value/` directories by these columns' values (left out of the files). */
  partitionBy?: string | string[];
  /** 'file' (random access, .arrow; the default) or 'stream' (.arrows). */
  format?: 'file' | 'stream';
  /** Rows in each file (the last fewer), gathered across tasks; default: a file per write task's output. */
  rowsPerFile?: number;
}

/** Writes each write task's blocks as one Arrow IPC file; the blocks must share a schema. */
export class ArrowDatasink extends FileDatasink<{ format: 'file' | 'stream'; partitionBy?: string | string[]; rowsPerFile?: number; filesystem?: FileSystem }> {
  constructor(path: string, options: ArrowWriteOptions = {}) {
    const format = options.format ?? 'file';
    if (format !== 'file' && format !== 'stream') {
      throw new InvalidArgumentError(`Arrow sink option 'format' must be 'file' or 'stream', got ${JSON.stringify(format)}`, 'ERR_INVALID_ARGUMENT');
    }
    super(path, { format, partitionBy: options.partitionBy, rowsPerFile: options.rowsPerFile, filesystem: options.filesystem }, 'Arrow');
  }

  override get name(): string {
    return 'Arrow';
  }

  protected get extension(): string {
    return this.options.format === 'stream' ? '.arrows' : '.arrow';
  }

  protected async writeBlocks(blocks: Block[], handle: WritableFile): Promise<number> {
    const table = concatBlocks(blocks);
    await handle.write(tableToIPC(table, this.options.format));
    return table.numRows;
  }
}
remote(import.meta, ArrowDatasink);
