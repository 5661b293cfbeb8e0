/**
 * Plain text: one row `{ text }` per line (documents, logs, prompts one per line). Read as JSON
 * Lines are: large files cut into byte ranges at line breaks, compressed files read whole.
 */
import { Table } from 'apache-arrow';
import { remote } from '../../core/registry.js';
import type { Block } from '../block.js';
import { Datasource, ReadTask } from '../datasource.js';
import { checkCompressionOption } from './compression.js';
import {
  DEFAULT_BLOCK_BYTES, DEFAULT_MIN_SPLIT_BYTES, checkPositiveInteger, checkRowIds, estimateTextBytes, fileKey, listedFiles, taskFileSystem, textFileListing, type FileListing, filesOf, planLineRanges,
  rangeBytes, readRangeLines, utf8Column, checkExtensions,
  type FileEntry, type FileRange, type LineFileReadOptions,
} from './files.js';
import { partitionedReadTasks, selectPartitions, type PartitionValues } from './partitioning.js';
import { InvalidArgumentError } from '../../errors.js';
import { checkFileSystem, type FileSystem } from '../filesystem/file-system.js';

/** Text's options: the line readers' (by default every file of a directory), and its own. */
export interface TextReadOptions extends LineFileReadOptions {
  /** Leave out lines that are empty or only white space (default true, as Ray's read_text). */
  dropEmptyLines?: boolean;
}

interface TextTaskOptions {
  dropEmptyLines: boolean;
  filesystem?: FileSystem;
  rowIds?: string;
  rowsPerBlock?: number;
  blockBytes: number;
}

export const readTextFiles = remote(import.meta, async function* readTextFiles(ranges: FileRange[], options: TextTaskOptions): AsyncGenerator<Block> {
  let texts: string[] = [];
  let ids: string[] = [];
  let bytes = 0;
  const flush = (): Block => {
    const columns = { text: utf8Column(texts), ...(options.rowIds ? { [options.rowIds]: utf8Column(ids) } : {}) };
    texts = [];
    ids = [];
    bytes = 0;
    return new Table(columns);
  };
  for (const range of ranges) {
    const key = options.rowIds ? fileKey(range.path) : '';
    for await (const lines of readRangeLines(range, range.start, options.filesystem)) {
      for (const line of lines) {
        if (options.dropEmptyLines && (line.text.length === 0 || /^\s*$/.test(line.text))) continue;
        texts.push(line.text);
        if (options.rowIds) ids.push(`${key}:${line.offset}`);
        bytes += line.next - line.offset;
        if (options.rowsPerBlock ? texts.length >= options.rowsPerBlock : bytes >= options.blockBytes) yield flush();
      }
    }
  }
  if (texts.length > 0) yield flush();
});

export class TextDatasource extends Datasource {
  readonly #listing: FileListing<{ files: FileEntry[]; partitions: Map<string, PartitionValues> | undefined }>;
  private readonly taskOptions: TextTaskOptions;
  private readonly minSplitBytes: number;

  constructor(paths: string | readonly string[], options: TextReadOptions = {}) {
    super();
    if (options.dropEmptyLines !== undefined && typeof options.dropEmptyLines !== 'boolean') {
      throw new InvalidArgumentError(`text option 'dropEmptyLines' must be a boolean, got ${JSON.stringify(options.dropEmptyLines)}`);
    }
    const rowsPerBlock = checkPositiveInteger(options.rowsPerBlock, 'rowsPerBlock');
    const rowIds = options.rowIds !== undefined ? checkRowIds(options.rowIds, 'text') : undefined;
    if (rowIds === 'text') throw new InvalidArgumentError("text option 'rowIds' names the 'text' column itself: choose another name", 'ERR_INVALID_ARGUMENT');
    const filesystem = taskFileSystem(paths, checkFileSystem(options.filesystem, 'text'));
    this.taskOptions = {
      dropEmptyLines: options.dropEmptyLines !== false,
      ...(filesystem ? { filesystem } : {}),
      blockBytes: checkPositiveInteger(options.blockBytes, 'blockBytes') ?? DEFAULT_BLOCK_BYTES,
      ...(rowsPerBlock ? { rowsPerBlock } : {}),
      ...(rowIds ? { rowIds } : {}),
    };
    this.minSplitBytes = checkPositiveInteger(options.minSplitBytes, 'minSplitBytes') ?? DEFAULT_MIN_SPLIT_BYTES;
    const extensions = options.extensions === undefined ? [''] : checkExtensions(options.extensions, []);
    this.#listing = textFileListing(paths, extensions, checkCompressionOption(options.compression, 'text'), 'text', filesystem, (found) => selectPartitions(found, options, 'text'));
  }

  /** The files read (for URLs, known once the dataset runs). */
  get files(): FileEntry[] {
    return listedFiles(this.#listing, 'text');
  }

  override get name(): string {
    return 'Text';
  }

  async getReadTasks(parallelism: number): Promise<ReadTask[]> {
    const { files, partitions } = await this.#listing.get();
    return partitionedReadTasks(files, partitions, parallelism, (files, share) =>
      planLineRanges(files, share, { splittable: true, minSplitBytes: this.minSplitBytes }).map(
        (ranges) => new ReadTask(readTextFiles, [ranges, this.taskOptions], { bytes: ranges.reduce((sum, range) => sum + rangeBytes(range), 0), inputFiles: filesOf(ranges) }),
      ),
    );
  }

  override estimateInMemorySize(): number | undefined {
    const listed = this.#listing.now;
    return listed && estimateTextBytes(listed.files);
  }
}
