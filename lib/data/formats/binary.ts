/**
 * Whole files as rows: `{ bytes }` (and `path`) per file, for inputs that a model step decodes
 * itself: images, audio, PDFs. Read tasks take runs of files of about equal total size; a block
 * holds files until it reaches `blockBytes`.
 */
import { Binary, Table, makeData, makeVector, type Vector } from 'apache-arrow';
import { InvalidArgumentError } from '../../errors.js';
import { remote } from '../../core/registry.js';
import type { Block } from '../block.js';
import { Datasource, ReadTask } from '../datasource.js';
import type { UdfTarget } from '../udf.js';
import { DEFAULT_BLOCK_BYTES, FileListing, checkExtensions, checkPositiveInteger, checkRowIds, fileKey, groupByWeight, listedFiles, taskFileSystem, utf8Column, type FileEntry, type FileSystemOptions } from './files.js';
import { checkFileSystem, fileSystemFor, urlScheme, type FileSystem } from '../filesystem/file-system.js';
import { partitionedReadTasks, selectPartitions, type PartitionReadOptions, type PartitionValues } from './partitioning.js';

/** The most one row's value can hold: an Arrow binary column's offsets are 32-bit. */
const MAX_FILE_BYTES = 2 ** 31 - 1;
/** Objects a read task fetches at once from object storage (many small files: requests, not bandwidth, bound it). */
const REMOTE_READS_AHEAD = 8;

export interface BinaryReadOptions extends PartitionReadOptions, FileSystemOptions {
  /** Add a `path` column with each file's absolute path (default false). */
  includePaths?: boolean;
  /** Which files of a directory are read, e.g. ['.jpg', '.png'] (default: every file, hidden ones and those starting with '_' aside). */
  extensions?: string[];
  /** Files per block; by default a block holds files until it reaches `blockBytes`. */
  rowsPerBlock?: number;
  /** Bytes per block when `rowsPerBlock` is not given (default 4 MiB; a larger file is a block of its own). */
  blockBytes?: number;
  /** Adds a column of this name holding each file's id: its file key (a hash of its absolute path). */
  rowIds?: string;
}

interface BinaryTaskOptions {
  includePaths: boolean;
  filesystem?: FileSystem;
  rowIds?: string;
  rowsPerBlock?: number;
  blockBytes: number;
}

function binaryColumn(values: readonly Uint8Array[]): Vector {
  const valueOffsets = new Int32Array(values.length + 1);
  let total = 0;
  values.forEach((value, index) => {
    total += value.byteLength;
    valueOffsets[index + 1] = total;
  });
  const data = new Uint8Array(total);
  values.forEach((value, index) => data.set(value, valueOffsets[index]));
  return makeVector(makeData({ type: new Binary(), length: values.length, data, valueOffsets }));
}

async function readWhole(path: string, filesystem: FileSystem | undefined): Promise<Uint8Array> {
  if (urlScheme(path)) {
    // One request, with no round trip first to ask its size (the listing refused files past 2 GiB).
    const bytes = await fileSystemFor(path, filesystem).readFile(path);
    if (bytes.byteLength > MAX_FILE_BYTES) throw tooLarge(path, bytes.byteLength);
    return bytes;
  }
  const handle = await fileSystemFor(path, filesystem).open(path);
  try {
    const { size } = await handle.stat();
    if (size > MAX_FILE_BYTES) throw tooLarge(path, size);
    const buffer = new Uint8Array(size);
    let filled = 0;
    while (filled < size) {
      const { bytesRead } = await handle.read(buffer, filled, size - filled, filled);
      if (bytesRead === 0) break; // it shrank since its size was read
      filled += bytesRead;
    }
    return filled === size ? buffer : buffer.subarray(0, filled);
  } finally {
    await handle.close();
  }
}

const tooLarge = (path: string, size: number) => new InvalidArgumentError(`binary file '${path}' is ${size} bytes: a row holds at most 2 GiB`, 'ERR_DATA_PATH');

/**
 * Whole files in order, each as `[path, bytes]`: remote files are fetched a few ahead, a local
 * disk is read one at a time.
 */
export async function* wholeFiles(paths: readonly string[], filesystem: FileSystem | undefined): AsyncGenerator<[string, Uint8Array]> {
  const ahead = paths.some((path) => urlScheme(path)) ? REMOTE_READS_AHEAD : 1;
  const reads: Array<Promise<Uint8Array>> = [];
  const startRead = (index: number) => {
    if (index >= paths.length) return;
    const reading = readWhole(paths[index], filesystem);
    // Read ahead of its turn: its failure is taken when its turn comes.
    reading.catch(() => undefined);
    reads[index] = reading;
  };
  for (let index = 0; index < Math.min(ahead, paths.length); index++) startRead(index);
  for (const [index, path] of paths.entries()) {
    const content = await reads[index];
    delete reads[index];
    startRead(index + ahead);
    yield [path, content];
  }
}

export const readBinaryFiles = remote(import.meta, async function* readBinaryFiles(paths: string[], options: BinaryTaskOptions): AsyncGenerator<Block> {
  let contents: Uint8Array[] = [];
  let names: string[] = [];
  let bytes = 0;
  const flush = (): Block => {
    const columns: Record<string, Vector> = { bytes: binaryColumn(contents) };
    if (options.includePaths) columns.path = utf8Column(names);
    if (options.rowIds) columns[options.rowIds] = utf8Column(names.map(fileKey));
    contents = [];
    names = [];
    bytes = 0;
    return new Table(columns);
  };
  for await (const [path, content] of wholeFiles(paths, options.filesystem)) {
    // A block's values share one buffer with 32-bit offsets.
    if (contents.length > 0 && bytes + content.byteLength > MAX_FILE_BYTES) yield flush();
    contents.push(content);
    names.push(path);
    bytes += content.byteLength;
    if (options.rowsPerBlock ? contents.length >= options.rowsPerBlock : bytes >= options.blockBytes) yield flush();
  }
  if (contents.length > 0) yield flush();
});

/**
 * A source of whole files, each read by one task, tasks taking runs of files of about equal
 * bytes: binary files and images. Subclasses name the read function and what it is given.
 */
export abstract class WholeFilesDatasource<TaskOptions> extends Datasource {
  readonly #listing: FileListing<{ files: FileEntry[]; partitions: Map<string, PartitionValues> | undefined }>;
  readonly #format: string;

  protected constructor(listing: FileListing<{ files: FileEntry[]; partitions: Map<string, PartitionValues> | undefined }>, format: string) {
    super();
    this.#listing = listing;
    this.#format = format;
  }

  /** The registered read function a task runs, with (paths, taskOptions). */
  protected abstract get readFunction(): UdfTarget;
  protected abstract get taskOptions(): TaskOptions;

  /** What a group of files holds once read (the executor budgets memory with it). */
  protected bytesOf(files: readonly FileEntry[]): number {
    return files.reduce((sum, file) => sum + file.bytes, 0);
  }

  /** The files read (for URLs, known once the dataset runs). */
  get files(): FileEntry[] {
    return listedFiles(this.#listing, this.#format);
  }

  async getReadTasks(parallelism: number): Promise<ReadTask[]> {
    const { files: listed, partitions } = await this.#listing.get();
    return partitionedReadTasks(listed, partitions, parallelism, (files, share) =>
      groupByWeight(files, (file) => file.bytes, share).map(
        (group) =>
          new ReadTask(this.readFunction, [group.map((file) => file.path), this.taskOptions], {
            rows: group.length,
            bytes: this.bytesOf(group),
            inputFiles: group.map((file) => file.path),
          }),
      ),
    );
  }

  override estimateInMemorySize(): number | undefined {
    const files = this.#listing.now?.files;
    return files ? this.bytesOf(files) : undefined;
  }
}

export class BinaryDatasource extends WholeFilesDatasource<BinaryTaskOptions> {
  readonly #taskOptions: BinaryTaskOptions;

  constructor(paths: string | readonly string[], options: BinaryReadOptions = {}) {
    if (options.includePaths !== undefined && typeof options.includePaths !== 'boolean') {
      throw new InvalidArgumentError(`binary option 'includePaths' must be a boolean, got ${JSON.stringify(options.includePaths)}`);
    }
    const rowIds = options.rowIds !== undefined ? checkRowIds(options.rowIds, 'binary') : undefined;
    const includePaths = options.includePaths === true;
    if (rowIds === 'bytes' || (includePaths && rowIds === 'path')) {
      throw new InvalidArgumentError(`binary option 'rowIds' names the '${rowIds}' column itself: choose another name`, 'ERR_INVALID_ARGUMENT');
    }
    const rowsPerBlock = checkPositiveInteger(options.rowsPerBlock, 'rowsPerBlock');
    const filesystem = taskFileSystem(paths, checkFileSystem(options.filesystem, 'binary'));
    super(
      new FileListing(paths, options.extensions === undefined ? [''] : checkExtensions(options.extensions, []), 'binary', filesystem, (found) => {
        const selected = selectPartitions(found, options, 'binary');
        const large = selected.files.find((file) => file.bytes > MAX_FILE_BYTES);
        if (large) throw tooLarge(large.path, large.bytes);
        return selected;
      }),
      'binary',
    );
    this.#taskOptions = {
      includePaths,
      ...(filesystem ? { filesystem } : {}),
      blockBytes: checkPositiveInteger(options.blockBytes, 'blockBytes') ?? DEFAULT_BLOCK_BYTES,
      ...(rowsPerBlock ? { rowsPerBlock } : {}),
      ...(rowIds ? { rowIds } : {}),
    };
  }

  protected get readFunction(): UdfTarget {
    return readBinaryFiles;
  }

  protected get taskOptions(): BinaryTaskOptions {
    return this.#taskOptions;
  }

  override get name(): string {
    return 'BinaryFiles';
  }
}
