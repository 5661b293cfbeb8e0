/**
 * The built-in file sources and sinks of datasets. A source expands its paths when it is made
 * (a missing path or an empty directory is an error at the call site, not in a worker); a sink
 * writes one file per write task into a directory.
 */
import { ArrowDatasink, ArrowDatasource, type ArrowReadOptions, type ArrowWriteOptions } from './arrow-ipc.js';
import { CsvDatasink, CsvDatasource, type CsvReadOptions, type CsvWriteOptions } from './csv.js';
import { JsonlDatasink, JsonlDatasource, type JsonlReadOptions, type JsonlWriteOptions } from './jsonl.js';
import { ParquetDatasink, ParquetDatasource, type ParquetReadOptions, type ParquetWriteOptions } from './parquet.js';
import { TextDatasource, type TextReadOptions } from './text.js';
import { BinaryDatasource, type BinaryReadOptions } from './binary.js';
import { ImageDatasource, type ImageReadOptions } from './images.js';
import { WebDatasetDatasink, WebDatasetDatasource, type WebDatasetReadOptions, type WebDatasetWriteOptions } from './webdataset.js';

export { ArrowDatasink, ArrowDatasource, ARROW_EXTENSIONS, readArrowFiles, type ArrowReadOptions, type ArrowWriteOptions } from './arrow-ipc.js';
export { CsvDatasink, CsvDatasource, CSV_EXTENSIONS, readCsvFiles, type CsvReadOptions, type CsvWriteOptions } from './csv.js';
export { JsonlDatasink, JsonlDatasource, JSONL_EXTENSIONS, readJsonlFiles, type JsonlReadOptions, type JsonlWriteOptions } from './jsonl.js';
export {
  ParquetDatasink, ParquetDatasource, PARQUET_EXTENSIONS, readParquetFiles, type ParquetCompression, type ParquetReadOptions, type ParquetWriteOptions,
} from './parquet.js';
export { TextDatasource, readTextFiles, type TextReadOptions } from './text.js';
export { BinaryDatasource, readBinaryFiles, type BinaryReadOptions } from './binary.js';
export { ImageDatasink, ImageDatasource, IMAGE_EXTENSIONS, readImageFiles, type ImageReadOptions, type ImageWriteOptions, type WrittenImages } from './images.js';
export { WebDatasetDatasink, WebDatasetDatasource, WEBDATASET_EXTENSIONS, readWebDatasetShards, type WebDatasetReadOptions, type WebDatasetWriteOptions } from './webdataset.js';
export { type Compression, type CompressionOption } from './compression.js';
export { type PartitionReadOptions, type PartitionValues } from './partitioning.js';
export { FileDatasink, checkWriteMode, expandPaths, type FileEntry, type WriteMode, type WrittenFile } from './files.js';

/** Paths: a file, a directory (its files with the format's extensions, recursively), or a list of them. */
export type Paths = string | readonly string[];

export function jsonlSource(paths: Paths, options: JsonlReadOptions = {}): JsonlDatasource {
  return new JsonlDatasource(paths, options);
}

export function csvSource(paths: Paths, options: CsvReadOptions = {}): CsvDatasource {
  return new CsvDatasource(paths, options);
}

export function arrowSource(paths: Paths, options: ArrowReadOptions = {}): ArrowDatasource {
  return new ArrowDatasource(paths, options);
}

export function parquetSource(paths: Paths, options: ParquetReadOptions = {}): ParquetDatasource {
  return new ParquetDatasource(paths, options);
}

export function textSource(paths: Paths, options: TextReadOptions = {}): TextDatasource {
  return new TextDatasource(paths, options);
}

export function binarySource(paths: Paths, options: BinaryReadOptions = {}): BinaryDatasource {
  return new BinaryDatasource(paths, options);
}

export function imageSource(paths: Paths, options: ImageReadOptions = {}): ImageDatasource {
  return new ImageDatasource(paths, options);
}

export function webDatasetSource(paths: Paths, options: WebDatasetReadOptions = {}): WebDatasetDatasource {
  return new WebDatasetDatasource(paths, options);
}

export function webDatasetSink(directory: string, options: WebDatasetWriteOptions = {}): WebDatasetDatasink {
  return new WebDatasetDatasink(directory, options);
}

export function jsonlSink(directory: string, options: JsonlWriteOptions = {}): JsonlDatasink {
  return new JsonlDatasink(directory, options);
}

export function csvSink(directory: string, options: CsvWriteOptions = {}): CsvDatasink {
  return new CsvDatasink(directory, options);
}

export function arrowSink(directory: string, options: ArrowWriteOptions = {}): ArrowDatasink {
  return new ArrowDatasink(directory, options);
}

export function parquetSink(directory: string, options: ParquetWriteOptions = {}): ParquetDatasink {
  return new ParquetDatasink(directory, options);
}
