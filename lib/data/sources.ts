/** Built-in sources: range, and the file formats as Datasets. */
import { tableFromArrays } from 'apache-arrow';
import { remote } from '../core/registry.js';
import { InvalidArgumentError } from '../errors.js';
import { Datasource, ReadTask } from './datasource.js';
import { Dataset, readDatasource, type ReadOptions } from './dataset.js';
import {
  arrowSource, binarySource, csvSource, imageSource, jsonlSource, parquetSource, textSource, webDatasetSource,
  type ArrowReadOptions, type BinaryReadOptions, type ImageReadOptions, type CsvReadOptions, type JsonlReadOptions, type ParquetReadOptions, type Paths, type TextReadOptions, type WebDatasetReadOptions,
} from './formats/index.js';

/** Rows { id } from start to end (exclusive), in blocks of at most 64 Ki rows per read task. */
export const readRange = remote(import.meta, function* readRange(start: number, end: number) {
  const int32 = end <= 2 ** 31;
  for (let from = start; from < end; from += 65_536) {
    const to = Math.min(end, from + 65_536);
    const ids = int32 ? new Int32Array(to - from) : new Float64Array(to - from);
    for (let index = 0; index < ids.length; index++) ids[index] = from + index;
    yield tableFromArrays({ id: ids });
  }
});

export class RangeDatasource extends Datasource {
  constructor(readonly count: number) {
    super();
  }
  override get name(): string {
    return 'Range';
  }
  getReadTasks(parallelism: number): ReadTask[] {
    const tasks: ReadTask[] = [];
    const per = Math.max(1, Math.ceil(this.count / Math.max(1, parallelism)));
    const bytesPerRow = this.count <= 2 ** 31 ? 4 : 8;
    for (let start = 0; start < this.count; start += per) {
      const end = Math.min(this.count, start + per);
      tasks.push(new ReadTask(readRange, [start, end], { rows: end - start, bytes: (end - start) * bytesPerRow }));
    }
    return tasks;
  }
  override estimateInMemorySize(): number {
    return this.count * 4;
  }
}

/** A dataset of rows { id: 0 .. n-1 }. */
export function range(n: number, options: ReadOptions = {}): Dataset {
  if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0) throw new InvalidArgumentError(`range(n) takes a non-negative integer, got ${String(n)}`);
  return readDatasource(new RangeDatasource(n), options);
}

/** Reads JSON Lines files (a file, a directory, or a list of them): one row per line. */
export function readJsonl(paths: Paths, options: ReadOptions & JsonlReadOptions = {}): Dataset {
  return readDatasource(jsonlSource(paths, options), withoutRowIds(options));
}

/** Reads CSV files with a header row; column types are inferred unless a schema is given. */
export function readCsv(paths: Paths, options: ReadOptions & CsvReadOptions = {}): Dataset {
  return readDatasource(csvSource(paths, options), withoutRowIds(options));
}

/** Reads Arrow IPC files (file or stream format), split by record batch. */
export function readArrow(paths: Paths, options: ReadOptions & ArrowReadOptions = {}): Dataset {
  return readDatasource(arrowSource(paths, options), withoutRowIds(options));
}

/** Reads Parquet files (through parquet-wasm), split by row group. */
export function readParquet(paths: Paths, options: ReadOptions & ParquetReadOptions = {}): Dataset {
  return readDatasource(parquetSource(paths, options), withoutRowIds(options));
}

/** Reads text files: one row `{ text }` per line (empty lines left out unless `dropEmptyLines: false`). */
export function readText(paths: Paths, options: ReadOptions & TextReadOptions = {}): Dataset {
  return readDatasource(textSource(paths, options), withoutRowIds(options));
}

/** Reads whole files: one row `{ bytes }` (and `path` with `includePaths`) per file, for a model step to decode. */
export function readBinaryFiles(paths: Paths, options: ReadOptions & BinaryReadOptions = {}): Dataset {
  return readDatasource(binarySource(paths, options), withoutRowIds(options));
}

/**
 * Reads JPEG and PNG images (Ray Data's read_images): one row `{ image }` per file (and `path` with
 * `includePaths`), the image decoded in the read task into a u8 tensor [height, width, channels]
 * in a tensor column; with `size: [height, width]` every image is resized to it and a batch
 * reaches the model as one Tensor [N, height, width, channels].
 */
export function readImages(paths: Paths, options: ReadOptions & ImageReadOptions = {}): Dataset {
  return readDatasource(imageSource(paths, options), withoutRowIds(options));
}

/**
 * Reads WebDataset tar shards (Ray Data's read_webdataset): a row per sample, `{ __key__, __url__,
 * <field>... }` with a column per file extension of the sample's files (`jpg`, `json`, `txt`).
 */
export function readWebDataset(paths: Paths, options: ReadOptions & WebDatasetReadOptions = {}): Dataset {
  return readDatasource(webDatasetSource(paths, options), options);
}

/** A file reader makes its row ids itself (from positions in its files), not from task keys. */
function withoutRowIds<T extends ReadOptions>(options: T): T {
  const { rowIds: _rowIds, ...rest } = options;
  return rest as T;
}
