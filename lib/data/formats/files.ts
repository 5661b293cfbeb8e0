/**
 * What the file formats share: expanding the paths a user names into files, planning read tasks
 * over them (whole files, byte ranges of line-based files, or pieces such as row groups), reading
 * lines of a byte range, coercing values to a schema, shipping a schema to workers, and writing a
 * file so that readers never see it half written.
 */
import { createHash } from 'node:crypto';
import { createReadStream, readdirSync, statSync, type Stats } from 'node:fs';
import { open, readdir, stat, unlink } from 'node:fs/promises';
import { once } from 'node:events';
import { join, resolve } from 'node:path';
import { Readable, type Transform } from 'node:stream';
import { finished } from 'node:stream/promises';
import {
  Bool, DataType, Float64, Null, Schema, Table, Utf8, makeData, makeVector, tableFromIPC, tableToIPC, type Field, type List, type Struct, type Vector,
} from 'apache-arrow';
import { InvalidArgumentError } from '../../errors.js';
import type { Block, Row } from '../block.js';
import { Datasink, type WriteContext } from '../datasource.js';
import { checkPartitionBy, splitByPartition, type PartitionReadOptions } from './partitioning.js';
// Loaded with the formats, so that every worker that reads or writes files knows s3:// URLs.
import '../filesystem/s3.js';
import { checkFileSystem, fileSystemFor, paths as filePaths, urlScheme, type FileSystem, type WritableFile } from '../filesystem/file-system.js';
import { COMPRESSED_TEXT_RATIO, compressionFor, compressionSuffix, compressor, decompressor, withCompressionSuffixes, type Compression, type CompressionOption } from './compression.js';
import { Tensor } from '../../gpu/tensor.js';
import { tensorToNested } from '../tensor-column.js';

/** A file found on disk, with its size when it was listed. */
export interface FileEntry {
  path: string;
  bytes: number;
  /** The directory it was found under (hive partition segments are read below it). */
  root?: string;
  /** The codec its text is compressed with (set by the text readers). */
  compression?: Compression;
}

/**
 * Part of a file one read task reads. `start`/`end` are byte offsets for line-based formats: the
 * task reads the lines that begin in [start, end). `split` says the file was cut into several
 * ranges, so a record may not continue past a line end.
 */
export interface FileRange {
  path: string;
  start: number;
  end: number;
  split: boolean;
  /** The file's codec: such a file is read whole (start 0, end its compressed size). */
  compression?: Compression;
}

/** Where a reader's or writer's files are, for URLs of object storage. */
export interface FileSystemOptions {
  /**
   * The filesystem of the paths (such as `new S3FileSystem({ endpoint, region })`). By default
   * local paths are read from disk and `s3://` URLs with credentials from the environment; either
   * way the driver resolves it once and its tasks carry it, on every host.
   */
  filesystem?: FileSystem;
}

/** What every line-based reader (JSONL, CSV, text) takes. */
export interface LineFileReadOptions extends PartitionReadOptions, FileSystemOptions {
  /** Rows per block; by default a block holds about `blockBytes` of text. */
  rowsPerBlock?: number;
  /** Text bytes per block when `rowsPerBlock` is not given (default 4 MiB). */
  blockBytes?: number;
  /** A file is split across read tasks only into ranges at least this large (default 4 MiB). */
  minSplitBytes?: number;
  /** Which files of a directory are read (default: the format's extensions). */
  extensions?: string[];
  /**
   * Adds a column of this name holding each row's id, `<file key>:<byte offset of its line or
   * record>`: for a dataset without ids of its own, stable while the files are unchanged (a
   * checkpoint's idColumn).
   */
  rowIds?: string;
  /**
   * How files are compressed: 'auto' (default) by their names' suffix (.gz, .gzip, .br, .zst,
   * .zstd), 'none', or one codec for every file. A compressed file is read whole by one task
   * (its offsets, as in row ids and errors, are positions in its decompressed text).
   */
  compression?: CompressionOption;
}

/** How large a piece of a file must be before splitting a file across tasks is worth a task. */
export const DEFAULT_MIN_SPLIT_BYTES = 4 << 20;
/** Text read into one block before it is converted and handed on: blocks of a few MiB. */
export const DEFAULT_BLOCK_BYTES = 4 << 20;

const describeInput = (paths: unknown): string => (typeof paths === 'string' ? `'${paths}'` : typeof paths);

const checkPathList = (paths: string | readonly string[], format: string): readonly string[] => {
  const list = typeof paths === 'string' ? [paths] : paths;
  if (!Array.isArray(list) || list.length === 0 || list.some((path) => typeof path !== 'string' || path === '')) {
    throw new InvalidArgumentError(`${format} source takes a path or a non-empty array of paths, got ${describeInput(paths)}`, 'ERR_DATA_PATH');
  }
  return list;
};

const emptyDirectory = (format: string, given: string, wanted: readonly string[]): InvalidArgumentError =>
  new InvalidArgumentError(
    `${format} source: directory '${given}' holds no ${wanted.includes('') ? 'files (hidden ones and those starting with _ are left out)' : `files ending in ${wanted.join(', ')}`}`,
    'ERR_DATA_PATH',
  );

/**
 * The files `paths` names, in a stable order: a file is taken as it is (whatever its extension);
 * a directory contributes its files with one of `extensions`, found recursively and sorted, without
 * hidden files and files starting with '_' (temp files of sinks, markers such as _SUCCESS).
 */
export function expandPaths(paths: string | readonly string[], extensions: readonly string[], format: string): FileEntry[] {
  const list = checkPathList(paths, format);
  const wanted = extensions.map((extension) => extension.toLowerCase());
  const files: FileEntry[] = [];
  for (const given of list) {
    if (urlScheme(given)) throw new InvalidArgumentError(`${format} source: '${given}' is a URL; its files are listed when the dataset runs (see FileListing)`, 'ERR_DATA_PATH');
    const path = resolve(given);
    let info: Stats;
    try {
      info = statSync(path);
    } catch {
      throw new InvalidArgumentError(`${format} source: path '${given}' does not exist`, 'ERR_DATA_PATH');
    }
    if (info.isDirectory()) {
      const found = listDirectory(path, wanted);
      if (found.length === 0) {
        throw emptyDirectory(format, given, wanted);
      }
      files.push(...found);
    } else if (info.isFile()) {
      files.push({ path, bytes: info.size });
    } else {
      throw new InvalidArgumentError(`${format} source: path '${given}' is neither a file nor a directory`, 'ERR_DATA_PATH');
    }
  }
  return files;
}

/**
 * `expandPaths` for paths that may be URLs of object storage (listing those takes requests, so
 * it waits); local paths among them are expanded as expandPaths does. A prefix is a directory:
 * its objects below it, with the same rules for hidden names and extensions, sorted by key.
 */
export async function expandPathsAsync(paths: string | readonly string[], extensions: readonly string[], format: string, filesystem?: FileSystem): Promise<FileEntry[]> {
  const list = checkPathList(paths, format);
  const wanted = extensions.map((extension) => extension.toLowerCase());
  const files: FileEntry[] = [];
  for (const given of list) {
    if (!urlScheme(given)) {
      files.push(...expandPaths(given, extensions, format));
      continue;
    }
    const storage = fileSystemFor(given, filesystem);
    const found = await storage.stat(given);
    if (found.kind === 'file') {
      files.push({ path: given, bytes: found.bytes });
    } else if (found.kind === 'directory') {
      const root = given.replace(/\/+$/, '');
      const listed = (await storage.listFiles(root))
        .filter((file) => filePaths.relative(root, file.path).split('/').every((segment) => !segment.startsWith('.') && !segment.startsWith('_')))
        .filter((file) => wanted.some((extension) => filePaths.basename(file.path).toLowerCase().endsWith(extension)))
        .sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
      if (listed.length === 0) throw emptyDirectory(format, given, wanted);
      files.push(...listed.map((file) => ({ path: file.path, bytes: file.bytes, root })));
    } else {
      throw new InvalidArgumentError(`${format} source: path '${given}' does not exist`, 'ERR_DATA_PATH');
    }
  }
  return files;
}

/**
 * The files a datasource reads and what it makes of them (partitions, filters): worked out at
 * once for local paths, so a missing path is refused where the dataset is made, and on first
 * use for URLs, whose listing takes requests.
 */
export class FileListing<Selected> {
  #selected: Selected | undefined;
  #pending: Promise<Selected> | undefined;
  readonly #list: () => Promise<Selected>;

  constructor(paths: string | readonly string[], extensions: readonly string[], format: string, filesystem: FileSystem | undefined, select: (found: FileEntry[]) => Selected) {
    const list = checkPathList(paths, format);
    if (!list.some((path) => urlScheme(path))) {
      this.#selected = select(expandPaths(list, extensions, format));
      this.#list = async () => this.#selected!;
      return;
    }
    this.#list = async () => select(await expandPathsAsync(list, extensions, format, filesystem));
  }

  /** What the listing made, if it is done (always for local paths). */
  get now(): Selected | undefined {
    return this.#selected;
  }

  async get(): Promise<Selected> {
    if (this.#selected !== undefined) return this.#selected;
    this.#pending ??= this.#list().then(
      (selected) => (this.#selected = selected),
      (error: unknown) => {
        // A failed listing (a request that timed out) is tried again on the next use.
        this.#pending = undefined;
        throw error;
      },
    );
    return this.#pending;
  }
}

/** A source's files once listed: at once for local paths; a remote listing waits for the dataset to run. */
export function listedFiles(listing: FileListing<{ files: FileEntry[] }>, format: string): FileEntry[] {
  const now = listing.now;
  if (!now) throw new InvalidArgumentError(`${format} source: files at URLs are listed when the dataset runs; they are not known yet`, 'ERR_DATA_PATH');
  return now.files;
}

/**
 * The filesystem read tasks of `paths` carry: none for local paths (workers read their own disk),
 * else the one given or the scheme's default resolved here in the driver, so that workers on
 * other hosts use the driver's endpoint and credentials.
 */
export function taskFileSystem(paths: string | readonly string[], filesystem: FileSystem | undefined): FileSystem | undefined {
  const list = typeof paths === 'string' ? [paths] : Array.isArray(paths) ? paths : [];
  const remote = list.find((path) => typeof path === 'string' && urlScheme(path));
  return remote ? fileSystemFor(remote, filesystem) : undefined;
}

/**
 * The files of a line-based format, each with the codec its text is read with: by its name's
 * suffix ('auto'), none, or the one named. A directory's files may carry a compression suffix
 * after the format's extension (`part-0.jsonl.gz`).
 */
export function textFileListing<Selected>(
  paths: string | readonly string[],
  extensions: readonly string[],
  compression: CompressionOption,
  format: string,
  filesystem: FileSystem | undefined,
  select: (found: FileEntry[]) => Selected,
): FileListing<Selected> {
  return new FileListing(paths, withCompressionSuffixes(extensions), format, filesystem, (found) =>
    select(
      found.map((file) => {
        const codec = compressionFor(file.path, compression);
        return codec ? { ...file, compression: codec } : file;
      }),
    ),
  );
}

function listDirectory(directory: string, extensions: readonly string[]): FileEntry[] {
  const found: FileEntry[] = [];
  const walk = (current: string) => {
    const names = readdirSync(current).sort();
    for (const name of names) {
      if (name.startsWith('.') || name.startsWith('_')) continue;
      const path = join(current, name);
      const info = statSync(path);
      if (info.isDirectory()) walk(path);
      else if (info.isFile() && extensions.some((extension) => name.toLowerCase().endsWith(extension))) found.push({ path, bytes: info.size, root: directory });
    }
  };
  walk(directory);
  return found;
}

export function checkParallelism(parallelism: number): number {
  if (!Number.isInteger(parallelism) || parallelism < 1) {
    throw new InvalidArgumentError(`parallelism must be a positive integer, got ${parallelism}`, 'ERR_INVALID_ARGUMENT');
  }
  return parallelism;
}

/**
 * Cuts `units` (in order) into at most `parallelism` contiguous groups of about equal weight.
 * Contiguous groups keep the order of the files across tasks, so reading is deterministic. A unit
 * goes to the group its weight's midpoint falls in, which balances without ever splitting a unit.
 */
export function groupByWeight<T>(units: readonly T[], weight: (unit: T) => number, parallelism: number): T[][] {
  checkParallelism(parallelism);
  // Every unit weighs at least one, so empty files still spread over tasks instead of piling up.
  const weights = units.map((unit) => Math.max(1, weight(unit)));
  const total = weights.reduce((sum, value) => sum + value, 0);
  const groups: T[][] = [];
  let before = 0;
  let current = -1;
  units.forEach((unit, index) => {
    const slot = Math.min(parallelism - 1, Math.floor(((before + weights[index] / 2) / total) * parallelism));
    if (slot !== current) {
      groups.push([]);
      current = slot;
    }
    groups[groups.length - 1].push(unit);
    before += weights[index];
  });
  return groups;
}

/**
 * Read tasks over line-based files: at most `parallelism` groups of byte ranges. When there are
 * fewer files than tasks wanted, files larger than a task's share are cut into ranges of about
 * that share (never smaller than `minSplitBytes`).
 */
export function planLineRanges(
  files: readonly FileEntry[],
  parallelism: number,
  options: { splittable: boolean; minSplitBytes: number; whole?: ReadonlySet<string> },
): FileRange[][] {
  checkParallelism(parallelism);
  const total = files.reduce((sum, file) => sum + (file.compression ? 0 : file.bytes), 0);
  const share = Math.max(1, Math.ceil(total / parallelism));
  const ranges: FileRange[] = [];
  for (const file of files) {
    if (file.compression) {
      ranges.push({ path: file.path, start: 0, end: file.bytes, split: false, compression: file.compression });
      continue;
    }
    const pieces = options.splittable && files.length < parallelism && !options.whole?.has(file.path)
      ? Math.min(Math.ceil(file.bytes / share), Math.floor(file.bytes / Math.max(1, options.minSplitBytes)), parallelism)
      : 1;
    if (pieces <= 1) {
      ranges.push({ path: file.path, start: 0, end: file.bytes, split: false });
      continue;
    }
    for (let piece = 0; piece < pieces; piece++) {
      const start = Math.floor((file.bytes * piece) / pieces);
      const end = piece === pieces - 1 ? file.bytes : Math.floor((file.bytes * (piece + 1)) / pieces);
      ranges.push({ path: file.path, start, end, split: true });
    }
  }
  return groupByWeight(ranges, rangeBytes, parallelism);
}

/** The files a group of ranges reads, each once, in order. */
export function filesOf(ranges: readonly { path: string }[]): string[] {
  return [...new Set(ranges.map((range) => range.path))];
}

/** One line of a file: its text (without the line break) and where it begins. */
export interface Line {
  text: string;
  /** Byte offset of the line's first byte. */
  offset: number;
  /** Byte offset just past the line break (where the next line begins). */
  next: number;
}

const NEWLINE = 0x0a;
const READ_CHUNK_BYTES = 1 << 20;

/**
 * A file's bytes from `from` on, a chunk at a time, each with the offset of its first byte: read
 * in place for a plain file (the buffer is reused, so a chunk is valid until the next is asked
 * for), or decompressed as a stream (offsets are then positions in the decompressed text, and
 * the bytes before `from` are decompressed and dropped).
 */
async function* fileChunks(path: string, from: number, compression: Compression | undefined, filesystem?: FileSystem, until?: number): AsyncGenerator<{ chunk: Buffer; offset: number }> {
  if (compression) yield* decompressedChunks(path, from, compression, filesystem);
  else if (urlScheme(path)) yield* streamedChunks(path, from, filesystem, until);
  else yield* plainChunks(path, from);
}

/**
 * A file's bytes in order, decompressed when it is compressed, from disk or object storage. A
 * chunk may be a buffer the next one reuses: keep a copy of what must outlive the next step.
 */
export async function* fileBytes(path: string, compression: Compression | undefined, filesystem?: FileSystem): AsyncGenerator<Uint8Array> {
  for await (const { chunk } of fileChunks(path, 0, compression, filesystem)) yield chunk;
}

/** How far past a range's end its first request reaches: its last line most often ends within. */
const RANGE_TAIL_BYTES = 256 << 10;

/**
 * A remote file's bytes from `from` on, streamed. With `until` (a range's end), the first request
 * stops a little past it and a second, open-ended one follows only for a last line that runs on:
 * an open-ended request cancelled at the range's end would have fetched the socket's window past it.
 */
async function* streamedChunks(path: string, from: number, filesystem?: FileSystem, until?: number): AsyncGenerator<{ chunk: Buffer; offset: number }> {
  const storage = fileSystemFor(path, filesystem);
  const stop = until === undefined || !Number.isFinite(until) ? undefined : until + RANGE_TAIL_BYTES;
  let position = from;
  for (const [start, end] of stop === undefined ? [[from, undefined]] : [[from, stop], [stop, undefined]]) {
    if (start !== position) return; // the file ended before the first request's end
    for await (const piece of storage.readStream(path, start, end)) {
      const chunk = Buffer.from(piece.buffer, piece.byteOffset, piece.byteLength);
      yield { chunk, offset: position };
      position += chunk.length;
    }
  }
}

async function* plainChunks(path: string, from: number): AsyncGenerator<{ chunk: Buffer; offset: number }> {
  const handle = await open(path, 'r');
  try {
    const buffer = Buffer.allocUnsafe(READ_CHUNK_BYTES);
    for (let position = from; ; ) {
      const { bytesRead } = await handle.read(buffer, 0, READ_CHUNK_BYTES, position);
      if (bytesRead === 0) return;
      yield { chunk: buffer.subarray(0, bytesRead), offset: position };
      position += bytesRead;
    }
  } finally {
    await handle.close();
  }
}

async function* decompressedChunks(path: string, from: number, compression: Compression, filesystem?: FileSystem): AsyncGenerator<{ chunk: Buffer; offset: number }> {
  const source: Readable = urlScheme(path) ? Readable.from(fileSystemFor(path, filesystem).readStream(path), { objectMode: false }) : createReadStream(path, { highWaterMark: READ_CHUNK_BYTES });
  const stream = decompressor(compression);
  source.on('error', (error: Error) => stream.destroy(error));
  source.pipe(stream);
  let offset = 0;
  try {
    for await (const piece of stream as AsyncIterable<Buffer>) {
      const start = offset;
      offset += piece.length;
      if (offset <= from) continue;
      yield start >= from ? { chunk: piece, offset: start } : { chunk: piece.subarray(from - start), offset: from };
    }
  } catch (error) {
    const cause = error as NodeJS.ErrnoException;
    // A file that cannot be opened is the caller's to report as it is; data the codec rejects names the file.
    if (cause.syscall) throw error;
    throw parseError(`file '${path}' is not valid ${compression} data at ${offset} bytes into its text: ${cause.message}`);
  } finally {
    source.destroy();
    stream.destroy();
  }
}

/**
 * The lines that begin in [start, end) of a file, streamed in chunks so memory stays bounded, and
 * handed on a chunk's worth at a time (an await per line would cost more than reading it). A
 * range that starts inside a line leaves that line to the range before it, and the last line is
 * read past `end` to its break: together the ranges of a file read each line exactly once. A
 * newline byte never occurs inside a UTF-8 multi-byte sequence, so cutting on it is safe. A
 * compressed file's offsets are positions in its decompressed text.
 */
export async function* readLineBatches(path: string, start = 0, end = Number.POSITIVE_INFINITY, compression?: Compression, filesystem?: FileSystem): AsyncGenerator<Line[]> {
  if (start >= end) return;
  // Read from one byte before `start`: if that byte is a newline, a line begins exactly at start.
  let skipping = start > 0;
  let lineStart = start;
  let carried: Buffer[] = [];
  let finished = false;
  for await (const { chunk, offset: chunkOffset } of fileChunks(path, start > 0 ? start - 1 : 0, compression, filesystem, end)) {
    let cursor = 0;
    if (skipping) {
      const newline = chunk.indexOf(NEWLINE);
      if (newline < 0) continue;
      skipping = false;
      cursor = newline + 1;
      lineStart = chunkOffset + cursor;
      if (lineStart >= end) return;
    }
    const lines: Line[] = [];
    while (cursor < chunk.length) {
      const newline = chunk.indexOf(NEWLINE, cursor);
      if (newline < 0) {
        // A plain file's buffer is reused by the next read: keep a copy of the unfinished line.
        carried.push(Buffer.from(chunk.subarray(cursor)));
        break;
      }
      const bytes = carried.length ? Buffer.concat([...carried, chunk.subarray(cursor, newline)]) : chunk.subarray(cursor, newline);
      carried = [];
      const next = chunkOffset + newline + 1;
      lines.push({ text: decodeLine(bytes, lineStart), offset: lineStart, next });
      lineStart = next;
      cursor = newline + 1;
      if (lineStart >= end) {
        finished = true;
        break;
      }
    }
    if (lines.length) yield lines;
    if (finished) return;
  }
  if (!skipping && carried.length && lineStart < end) {
    const bytes = Buffer.concat(carried);
    yield [{ text: decodeLine(bytes, lineStart), offset: lineStart, next: lineStart + bytes.length }];
  }
}

/** Lines one at a time, for callers that read only a few (a header). */
export async function* readLines(path: string, start = 0, end = Number.POSITIVE_INFINITY, compression?: Compression, filesystem?: FileSystem): AsyncGenerator<Line> {
  for await (const lines of readLineBatches(path, start, end, compression, filesystem)) yield* lines;
}

/** The lines a read task's range holds, from `from` (a header's end) when given. */
export function readRangeLines(range: FileRange, from = range.start, filesystem?: FileSystem): AsyncGenerator<Line[]> {
  // A compressed file is never split: its range is the whole text, however long it decompresses to.
  return readLineBatches(range.path, from, range.compression ? Number.POSITIVE_INFINITY : range.end, range.compression, filesystem);
}

/** About how many bytes of text files hold (a compressed file's decompressed size is a guess). */
export function estimateTextBytes(files: readonly FileEntry[]): number {
  return files.reduce((sum, file) => sum + file.bytes * (file.compression ? COMPRESSED_TEXT_RATIO : 1), 0);
}

/** About how many bytes of text a range holds (a compressed file's decompressed size is a guess). */
export function rangeBytes(range: FileRange): number {
  return (range.end - range.start) * (range.compression ? COMPRESSED_TEXT_RATIO : 1);
}

function decodeLine(bytes: Buffer, offset: number): string {
  let text = bytes.toString('utf8');
  if (text.endsWith('\r')) text = text.slice(0, -1);
  // A byte-order mark is not part of the first record.
  if (offset === 0 && text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  return text;
}

/**
 * The 1-based number of the line that begins at `offset`. Range tasks do not know how many lines
 * precede their range; counting them is only worth it when an error must name the line.
 */
export async function lineNumberAt(path: string, offset: number, compression?: Compression, filesystem?: FileSystem): Promise<number> {
  if (offset === 0) return 1;
  let lines = 1;
  for await (const { chunk, offset: chunkOffset } of fileChunks(path, 0, compression, filesystem)) {
    const piece = chunk.subarray(0, Math.max(0, Math.min(chunk.length, offset - chunkOffset)));
    for (let index = piece.indexOf(NEWLINE); index >= 0; index = piece.indexOf(NEWLINE, index + 1)) lines++;
    if (chunkOffset + chunk.length >= offset) break;
  }
  return lines;
}

/** The first byte of a file's text that is not white space (a byte-order mark skipped), or undefined for a blank file. */
export async function firstTextByte(path: string, compression?: Compression, filesystem?: FileSystem): Promise<number | undefined> {
  for await (const { chunk, offset } of fileChunks(path, 0, compression, filesystem)) {
    for (let index = offset === 0 && chunk[0] === 0xef && chunk[1] === 0xbb && chunk[2] === 0xbf ? 3 : 0; index < chunk.length; index++) {
      const byte = chunk[index];
      if (byte !== 0x20 && byte !== 0x09 && byte !== 0x0a && byte !== 0x0d) return byte;
    }
  }
  return undefined;
}

/** A file's whole text, for formats that are one document; refused past `limit` bytes. */
export async function readWholeText(path: string, compression: Compression | undefined, limit: number, format: string, filesystem?: FileSystem): Promise<string> {
  const pieces: Buffer[] = [];
  let total = 0;
  for await (const { chunk } of fileChunks(path, 0, compression, filesystem)) {
    total += chunk.length;
    if (total > limit) {
      throw parseError(`${format} file '${path}' holds more than ${limit} bytes of text in one document, more than one string can hold: write it as JSON Lines (one object per line), which streams`);
    }
    // A plain file's chunks share one buffer: keep a copy.
    pieces.push(Buffer.from(chunk));
  }
  let text = Buffer.concat(pieces, total).toString('utf8');
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  return text;
}

export function parseError(message: string): InvalidArgumentError {
  return new InvalidArgumentError(message, 'ERR_DATA_PARSE');
}

/**
 * A schema travels to workers as the Arrow IPC bytes of an empty table: task arguments are plain
 * data (class instances are refused by the codec), and IPC is Arrow's own lossless encoding.
 */
export function schemaToBytes(schema: Schema): Uint8Array {
  return tableToIPC(new Table(schema), 'stream');
}

export function schemaFromBytes(bytes: Uint8Array): Schema {
  return tableFromIPC(bytes).schema;
}

export function checkSchema(schema: unknown, format: string): Schema | undefined {
  if (schema === undefined) return undefined;
  if (!(schema instanceof Schema)) throw new InvalidArgumentError(`${format} option 'schema' must be an apache-arrow Schema`, 'ERR_INVALID_ARGUMENT');
  return schema;
}

export function checkPositiveInteger(value: unknown, name: string): number | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1) {
    throw new InvalidArgumentError(`option '${name}' must be a positive integer, got ${String(value)}`, 'ERR_INVALID_ARGUMENT');
  }
  return value;
}

export function checkExtensions(value: unknown, fallback: readonly string[]): readonly string[] {
  if (value === undefined) return fallback;
  if (!Array.isArray(value) || value.length === 0 || value.some((extension) => typeof extension !== 'string' || extension === '')) {
    throw new InvalidArgumentError(`option 'extensions' must be a non-empty array of strings such as ['.jsonl']`, 'ERR_INVALID_ARGUMENT');
  }
  return value.map((extension: string) => (extension.startsWith('.') ? extension : `.${extension}`));
}

/**
 * `value` as `type` expects it, for data whose text form lost its type (JSON, CSV): ISO strings
 * become timestamps, base64 strings binary, numbers 64-bit integers. Throws a message (without
 * location: the caller adds file and line) when the value cannot be that type.
 */
export function coerceValue(value: unknown, type: DataType): unknown {
  if (value === null || value === undefined) return null;
  if (DataType.isTimestamp(type) || DataType.isDate(type)) {
    const milliseconds = value instanceof Date ? value.getTime() : typeof value === 'number' ? value : typeof value === 'string' ? Date.parse(value) : Number.NaN;
    if (!Number.isFinite(milliseconds)) throw new TypeError(`${describeValue(value)} is not a date or time`);
    // Arrow stores second-resolution timestamps as whole seconds and rejects a fraction.
    return DataType.isTimestamp(type) && type.unit === 0 ? Math.floor(milliseconds / 1000) * 1000 : milliseconds;
  }
  if (DataType.isInt(type)) {
    // Integer text straight to BigInt: through a number it would lose digits past 2^53.
    if (type.bitWidth === 64 && typeof value === 'string' && /^\s*[-+]?\d+\s*$/.test(value)) return BigInt(value.trim());
    const number = typeof value === 'string' && value.trim() !== '' ? Number(value) : value;
    if (typeof number === 'bigint') return type.bitWidth === 64 ? number : Number(number);
    if (typeof number !== 'number' || !Number.isInteger(number)) throw new TypeError(`${describeValue(value)} is not an integer`);
    return type.bitWidth === 64 ? BigInt(number) : number;
  }
  if (DataType.isFloat(type)) {
    if (typeof value === 'number') return value;
    if (typeof value === 'bigint') return Number(value);
    if (typeof value === 'string' && isNumberText(value)) return Number(value);
    throw new TypeError(`${describeValue(value)} is not a number`);
  }
  if (DataType.isBool(type)) {
    if (typeof value === 'boolean') return value;
    if (typeof value === 'string' && /^(true|false)$/i.test(value.trim())) return value.trim().toLowerCase() === 'true';
    throw new TypeError(`${describeValue(value)} is not a boolean`);
  }
  if (DataType.isUtf8(type) || DataType.isLargeUtf8(type)) {
    if (typeof value === 'string') return value;
    if (typeof value === 'object') return JSON.stringify(value, jsonReplacer);
    return String(value);
  }
  if (DataType.isBinary(type) || DataType.isLargeBinary(type) || DataType.isFixedSizeBinary(type)) {
    if (value instanceof Uint8Array) return value;
    if (typeof value === 'string') return new Uint8Array(Buffer.from(value, 'base64'));
    if (Array.isArray(value) && value.every((byte) => Number.isInteger(byte) && byte >= 0 && byte < 256)) return Uint8Array.from(value);
    throw new TypeError(`${describeValue(value)} is not binary (expected a base64 string)`);
  }
  if (DataType.isList(type) || DataType.isFixedSizeList(type)) {
    const items = typeof value === 'string' ? JSON.parse(value) : value;
    if (!Array.isArray(items) && !ArrayBuffer.isView(items)) throw new TypeError(`${describeValue(value)} is not a list`);
    const child = (type as List).children[0].type;
    return Array.from(items as ArrayLike<unknown>, (item) => coerceValue(item, child));
  }
  if (DataType.isStruct(type)) {
    const object = typeof value === 'string' ? JSON.parse(value) : value;
    if (typeof object !== 'object' || object === null || Array.isArray(object)) throw new TypeError(`${describeValue(value)} is not an object`);
    return coerceRow(object as Row, (type as Struct).children);
  }
  return value;
}

/** A row with exactly the schema's fields, each coerced to its type. */
export function coerceRow(row: Row, fields: readonly Field[]): Row {
  const result: Row = {};
  for (const field of fields) {
    try {
      result[field.name] = coerceValue(row[field.name], field.type);
    } catch (error) {
      throw new TypeError(`column '${field.name}': ${(error as Error).message}`);
    }
  }
  return result;
}

const describeValue = (value: unknown): string => {
  const text = typeof value === 'string' ? JSON.stringify(value) : typeof value === 'object' ? JSON.stringify(value, jsonReplacer) ?? String(value) : String(value);
  return text.length > 60 ? `${text.slice(0, 57)}...` : text;
};

/** Decimal, exponent, and the spellings JavaScript writes for non-finite numbers. */
const NUMBER_TEXT = /^\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*$|^\s*(?:NaN|[-+]?Infinity)\s*$/;

export function isNumberText(text: string): boolean {
  return NUMBER_TEXT.test(text);
}

/**
 * JSON for values JSON has no form of: bigints as numbers when exact and strings otherwise, bytes
 * as base64, tensors (a tensor column's cells) as nested arrays. Dates arrive here already as ISO strings (their toJSON runs first).
 */
export function jsonReplacer(this: unknown, _key: string, value: unknown): unknown {
  if (value instanceof Tensor) return tensorToNested(value);
  if (typeof value === 'bigint') return value >= BigInt(Number.MIN_SAFE_INTEGER) && value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : value.toString();
  if (value instanceof Uint8Array) return Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString('base64');
  if (ArrayBuffer.isView(value)) return Array.from(value as unknown as ArrayLike<unknown>);
  return value;
}

/** What a write task reports for its file (path null: it had no block, so no file). */
export interface WrittenFile {
  path: string | null;
  rows: number;
  bytes: number;
  /** With partitionBy: every file the task wrote, one per partition its rows fell in. */
  files?: string[];
  /**
   * A checkpointed write before its commit: the temp file holding each file (in the order of
   * `files`, or `path`'s alone), renamed into place by commit() or, resuming, recover().
   */
  staged?: string[];
}

export function outputFileName(writeId: string, taskIndex: number, extension: string): string {
  return `${writeId}_${String(taskIndex).padStart(6, '0')}${extension}`;
}

/** A write task's temp file: hidden (so readers skip it) and unique to the attempt and process. */
export function tempPathFor(finalPath: string, attempt: number): string {
  return filePaths.join(filePaths.dirname(finalPath), `.${filePaths.basename(finalPath)}.${attempt}.${process.pid}.tmp`);
}

/** Writes `path` through `produce`; the file is removed (an upload cancelled) if it fails. Returns the bytes written. */
async function writeThrough(path: string, filesystem: FileSystem | undefined, produce: (file: WritableFile) => Promise<void>, durable: boolean): Promise<number> {
  const storage = fileSystemFor(path, filesystem);
  await storage.makeDirectory(filePaths.dirname(path));
  const file = await storage.create(path);
  let bytes = 0;
  // Counted as written: no request (or stat) afterwards to learn the size.
  const counting: WritableFile = {
    write: (data) => {
      bytes += typeof data === 'string' ? Buffer.byteLength(data) : data.byteLength;
      return file.write(data);
    },
    sync: () => file.sync(),
    close: () => file.close(),
  };
  try {
    await produce(counting);
    if (durable) await file.sync();
    await file.close();
  } catch (error) {
    await file.abort().catch(() => undefined);
    throw error;
  }
  return bytes;
}

/**
 * Writes through `produce` to a temp file next to `finalPath` and leaves it there (synced to disk
 * when `durable`); returns its path and size. A failure removes it.
 */
export async function writeTempFile(finalPath: string, attempt: number, produce: (file: WritableFile) => Promise<void>, durable = false, filesystem?: FileSystem): Promise<{ temp: string; bytes: number }> {
  const temp = tempPathFor(finalPath, attempt);
  return { temp, bytes: await writeThrough(temp, filesystem, produce, durable) };
}

/**
 * Writes through `produce` so that the file appears whole or not at all: locally a temp file
 * renamed into place (rename is atomic within a directory, so a task that dies midway, or is
 * retried, never leaves a partial file under the final name); on object storage straight to its
 * key, as an object only appears once its upload completes. Returns the bytes written.
 */
export async function writeFileAtomically(finalPath: string, attempt: number, produce: (file: WritableFile) => Promise<void>, filesystem?: FileSystem): Promise<number> {
  const storage = fileSystemFor(finalPath, filesystem);
  if (!storage.writesInPlace) return writeThrough(finalPath, storage, produce, false);
  const { temp, bytes } = await writeTempFile(finalPath, attempt, produce, false, storage);
  await storage.rename(temp, finalPath);
  return bytes;
}

/**
 * Collects text and writes it in large pieces (one write per line would cost a syscall each),
 * through a compressor when the file is compressed. Call end() once the text is all given.
 */
export class TextWriter {
  private parts: string[] = [];
  private pending = 0;
  private readonly stream: Transform | undefined;
  /** The compressed bytes' writes, in order; a failure is kept for the next flush or end to throw. */
  private writes: Promise<void> = Promise.resolve();
  private failure: Error | undefined;

  constructor(private readonly handle: WritableFile, compression?: Compression, private readonly flushAt = 1 << 20) {
    if (!compression) return;
    this.stream = compressor(compression);
    this.stream.on('data', (chunk: Buffer) => {
      this.writes = this.writes.then(() => handle.write(chunk)).then(
        () => undefined,
        (error: Error) => {
          this.failure ??= error;
        },
      );
    });
  }

  async write(text: string): Promise<void> {
    this.parts.push(text);
    this.pending += text.length;
    if (this.pending >= this.flushAt) await this.flush();
  }

  async flush(): Promise<void> {
    if (this.parts.length === 0) return;
    const text = this.parts.join('');
    this.parts = [];
    this.pending = 0;
    if (!this.stream) {
      await this.handle.write(text);
      return;
    }
    if (!this.stream.write(text)) await once(this.stream, 'drain');
    // What the compressor made so far goes to disk before more text is taken: memory stays bounded.
    await this.writes;
    if (this.failure) throw this.failure;
  }

  /** Writes what is left (and a compressed file's trailer). */
  async end(): Promise<void> {
    await this.flush();
    if (!this.stream) return;
    this.stream.end();
    await finished(this.stream);
    await this.writes;
    if (this.failure) throw this.failure;
  }
}

/**
 * Removes temp files that attempts of one write job left behind (a worker that died mid-write
 * cannot remove its own). Only files of this job: other jobs may be writing the same directory.
 */
export async function removeTempFiles(directory: string, writeId: string, filesystem?: FileSystem): Promise<void> {
  const isTemp = (name: string) => name.startsWith(`.${writeId}_`) && name.endsWith('.tmp');
  if (urlScheme(directory)) {
    const storage = fileSystemFor(directory, filesystem);
    const listed = await storage.listFiles(directory).catch(() => []);
    const doomed = listed.filter((file) => !filePaths.relative(directory, file.path).includes('/') && isTemp(filePaths.basename(file.path)));
    await Promise.all(doomed.map((file) => storage.remove(file.path).catch(() => undefined)));
    return;
  }
  let names: string[];
  try {
    names = await readdir(directory);
  } catch {
    return;
  }
  await Promise.all(names.filter(isTemp).map((name) => unlink(join(directory, name)).catch(() => undefined)));
}

/** Every file a write made: its partitions' files, or its one file (none for a task without blocks). */
function writtenPaths(written: WrittenFile): string[] {
  return written.files ?? (written.path ? [written.path] : []);
}

async function exists(path: string, filesystem: FileSystem | undefined): Promise<boolean> {
  return (await fileSystemFor(path, filesystem).stat(path)).kind !== 'missing';
}

/** What a file writer does with a directory that holds a dataset already (see FileDatasink.prepareDirectory). */
export type WriteMode = 'append' | 'overwrite' | 'error' | 'ignore';

export function checkWriteMode(mode: unknown): WriteMode {
  if (mode === undefined) return 'append';
  if (mode === 'append' || mode === 'overwrite' || mode === 'error' || mode === 'ignore') return mode;
  throw new InvalidArgumentError(`mode must be 'append', 'overwrite', 'error' or 'ignore', got ${JSON.stringify(mode)}`);
}

/** A dataset's entries in `directory`: files of the extension (compressed or not), and `column=value` directories. */
async function datasetEntries(directory: string, extension: string, filesystem: FileSystem | undefined): Promise<string[]> {
  const extensions = withCompressionSuffixes([extension]);
  const isDataset = (name: string, isDirectory: boolean) =>
    !name.startsWith('.') && !name.startsWith('_') && (isDirectory ? /^[^=]+=[^=]*$/.test(name) : extensions.some((suffix) => name.endsWith(suffix)));
  if (urlScheme(directory)) {
    // Object storage lists keys: an entry is a key's first segment below the directory.
    const entries = new Map<string, boolean>();
    for (const file of await fileSystemFor(directory, filesystem).listFiles(directory)) {
      const relative = filePaths.relative(directory, file.path);
      const cut = relative.indexOf('/');
      const name = cut < 0 ? relative : relative.slice(0, cut);
      entries.set(name, (entries.get(name) ?? false) || cut >= 0);
    }
    return [...entries].filter(([name, isDirectory]) => isDataset(name, isDirectory)).map(([name]) => filePaths.join(directory, name)).sort();
  }
  let names: string[];
  try {
    names = readdirSync(directory);
  } catch {
    return [];
  }
  return names
    .filter((name) => isDataset(name, statSync(join(directory, name)).isDirectory()))
    .map((name) => join(directory, name));
}

/** The write id of a job, from the name of a file one of its tasks wrote. */
export function writeIdOf(path: string): string | undefined {
  // The task number is followed by the extension, and by a compression suffix after it.
  const match = /^(.*)_\d{6,}(?:\.[A-Za-z0-9]+){0,2}$/.exec(filePaths.basename(path));
  return match?.[1];
}

/**
 * A sink writing one file per write task into a directory. Workers receive it by its own fields
 * (see shipInstance in udf.ts), so its state is plain data: the directory and the options.
 */
export abstract class FileDatasink<Options extends object = object> extends Datasink<WrittenFile> {
  /** The directory files are written into. */
  readonly path: string;
  readonly options: Options;

  constructor(path: string, options: Options, format: string) {
    super();
    if (typeof path !== 'string' || path === '') {
      throw new InvalidArgumentError(`${format} sink takes a directory path, got ${describeInput(path)}`, 'ERR_DATA_PATH');
    }
    this.path = filePaths.resolve(path);
    // Object storage is checked when the write starts (that takes a request); a local path now.
    let info: Stats | undefined;
    try {
      info = urlScheme(this.path) ? undefined : statSync(this.path);
    } catch {
      info = undefined;
    }
    if (info && !info.isDirectory()) throw new InvalidArgumentError(`${format} sink: '${path}' exists and is not a directory`, 'ERR_DATA_PATH');
    const filesystem = taskFileSystem(this.path, checkFileSystem((options as { filesystem?: unknown }).filesystem, `${format} sink`));
    const partitionBy = checkPartitionBy((options as { partitionBy?: unknown }).partitionBy, format);
    this.options = { ...options, ...(partitionBy ? { partitionBy } : {}), ...(filesystem ? { filesystem } : {}) };
    this.rowsPerFile = checkPositiveInteger((options as { rowsPerFile?: unknown }).rowsPerFile, 'rowsPerFile');
  }

  /** Rows in each file (the last fewer), gathered across tasks; undefined: a file per task's output. */
  readonly rowsPerFile: number | undefined;

  override get minRowsPerWrite(): number | undefined {
    return this.rowsPerFile;
  }

  /** The extension of the format's files, with its dot. */
  protected abstract get extension(): string;

  /** The codec a text format's files are compressed with, if any (a format's own compression, as Parquet's, is inside its files). */
  protected get compression(): Compression | undefined {
    return undefined;
  }

  /** The written files' extension: the format's, and the codec's suffix after it. */
  get fileExtension(): string {
    return `${this.extension}${compressionSuffix(this.compression)}`;
  }

  /** Writes the blocks to an open file; returns the rows written. */
  protected abstract writeBlocks(blocks: Block[], file: WritableFile): Promise<number>;

  /**
   * Where the files go: the `filesystem` option, else the path's own, resolved in the driver so
   * that write tasks carry it (undefined for a path on disk). A checkpoint beside them uses it too.
   */
  get filesystem(): FileSystem | undefined {
    return (this.options as { filesystem?: FileSystem }).filesystem;
  }

  override async onWriteStart(): Promise<void> {
    const storage = fileSystemFor(this.path, this.filesystem);
    if (urlScheme(this.path)) {
      const found = await storage.stat(this.path);
      if (found.kind === 'file') throw new InvalidArgumentError(`sink: '${this.path}' is an object, not a prefix to write files below`, 'ERR_DATA_PATH');
    }
    await storage.makeDirectory(this.path);
  }

  /**
   * The directory as `mode` wants it before a write that is not a resume: 'append' leaves it,
   * 'error' refuses one that holds this format's files, 'ignore' says to skip the write (false),
   * 'overwrite' removes this format's files and `column=value` partition directories (nothing
   * else: a directory given by mistake keeps what is not a dataset).
   */
  async prepareDirectory(mode: WriteMode): Promise<boolean> {
    if (mode === 'append') return true;
    const existing = await datasetEntries(this.path, this.extension, this.filesystem);
    if (existing.length === 0) return true;
    if (mode === 'ignore') return false;
    if (mode === 'error') {
      throw new InvalidArgumentError(
        `'${this.path}' already holds ${existing.length} ${this.extension} file(s) or partition(s) (${existing.slice(0, 3).map((entry) => filePaths.basename(entry)).join(', ')}${existing.length > 3 ? ', ...' : ''}): write with mode 'append' or 'overwrite'`,
        'ERR_DATA_PATH',
      );
    }
    const storage = fileSystemFor(this.path, this.filesystem);
    await Promise.all(existing.map((entry) => storage.remove(entry)));
    return true;
  }

  async write(blocks: Block[], context: WriteContext): Promise<WrittenFile> {
    if (typeof context?.writeId !== 'string' || context.writeId === '' || /[\\/]/.test(context.writeId)) {
      throw new InvalidArgumentError(`write context needs a writeId usable in a file name, got ${String(context?.writeId)}`, 'ERR_INVALID_ARGUMENT');
    }
    // A task without blocks has no schema to write (a Parquet or Arrow file needs one): no file.
    if (blocks.length === 0) return { path: null, rows: 0, bytes: 0 };
    const name = outputFileName(context.writeId, context.taskIndex, this.fileExtension);
    const partitionBy = (this.options as { partitionBy?: string[] }).partitionBy;
    if (!partitionBy) return this.writeFile(filePaths.join(this.path, name), blocks, context);
    // One file per partition this task's rows fall in, under its column=value directories.
    const written: WrittenFile[] = [];
    for (const [directory, parts] of splitByPartition(blocks, partitionBy)) written.push(await this.writeFile(filePaths.join(this.path, directory, name), parts, context));
    return {
      path: written[0]?.path ?? null,
      rows: written.reduce((sum, file) => sum + file.rows, 0),
      bytes: written.reduce((sum, file) => sum + file.bytes, 0),
      files: written.map((file) => file.path!),
      ...(context.staged ? { staged: written.flatMap((file) => file.staged ?? []) } : {}),
    };
  }

  // Not a #private method: a sink reaches its write tasks rebuilt from its fields, without the brand.
  protected async writeFile(finalPath: string, blocks: Block[], context: WriteContext): Promise<WrittenFile> {
    let rows = 0;
    const produce = async (file: WritableFile): Promise<void> => {
      rows = await this.writeBlocks(blocks, file);
    };
    if (context.staged) {
      // Checkpointed: the file stays a temp file until its rows are recorded (commit()).
      const { temp, bytes } = await writeTempFile(finalPath, context.attempt ?? 0, produce, true, this.filesystem);
      return { path: finalPath, rows, bytes, staged: [temp] };
    }
    const bytes = await writeFileAtomically(finalPath, context.attempt ?? 0, produce, this.filesystem);
    return { path: finalPath, rows, bytes };
  }

  /** Renames a checkpointed write's temp files into place, now that its rows are recorded. */
  override async commit(staged: WrittenFile): Promise<WrittenFile> {
    const { staged: temps, ...result } = staged;
    const finals = writtenPaths(result);
    for (const [index, temp] of (temps ?? []).entries()) await fileSystemFor(temp, this.filesystem).rename(temp, finals[index]);
    return result;
  }

  /**
   * Resuming: a recorded write whose temp files are still there (the run stopped before commit())
   * is committed now; one whose files are gone (removed by hand) is written again.
   */
  override async recover(staged: WrittenFile): Promise<WrittenFile | null> {
    if (!staged || typeof staged !== 'object') return null;
    const { staged: temps, ...result } = staged;
    const finals = writtenPaths(result);
    for (const [index, final] of finals.entries()) {
      const temp = temps?.[index];
      // The recorded temp file wins over a file in place: a retried task's record names its own.
      if (temp && (await exists(temp, this.filesystem))) await fileSystemFor(temp, this.filesystem).rename(temp, final);
      else if (!(await exists(final, this.filesystem))) return null;
    }
    return result;
  }

  override async onWriteComplete(results: WrittenFile[]): Promise<void> {
    // Temp files of attempts that died are next to the files they would have been; a resumed
    // job's results include earlier runs', each with its own write id.
    const byWriteId = new Map<string, Set<string>>();
    for (const result of results) {
      for (const file of result ? writtenPaths(result) : []) {
        const writeId = writeIdOf(file);
        if (!writeId) continue;
        const directories = byWriteId.get(writeId) ?? new Set([this.path]);
        directories.add(filePaths.dirname(file));
        byWriteId.set(writeId, directories);
      }
    }
    await Promise.all([...byWriteId].flatMap(([writeId, directories]) => [...directories].map((directory) => removeTempFiles(directory, writeId, this.filesystem))));
  }
}

/**
 * A numbered piece of a file that can be read alone: a record batch of an Arrow IPC file, a row
 * group of a Parquet file. `index` undefined means the whole file.
 */
export interface FilePiece {
  path: string;
  bytes: number;
  rows?: number;
  index?: number;
}

/** What a read task of a piece-wise format reads: files, or chosen pieces of them, in order. */
export interface FileUnit {
  path: string;
  /** The pieces to read; absent: all of them. */
  pieces?: number[];
}

export interface PlannedRead {
  units: FileUnit[];
  bytes: number;
  rows?: number;
  inputFiles: string[];
}

/**
 * Read tasks for a piece-wise format. With at least as many files as tasks wanted, each file is
 * read whole; with fewer, `splitFile` reads a file's footer and names its pieces (record batches,
 * row groups; none when it cannot be split), which are then spread over the tasks.
 */
export async function planFileReads(
  files: readonly FileEntry[],
  parallelism: number,
  splitFile: (file: FileEntry) => Promise<FilePiece[]>,
): Promise<PlannedRead[]> {
  checkParallelism(parallelism);
  const pieces: FilePiece[] = [];
  for (const file of files) {
    const split = files.length >= parallelism ? [] : await splitFile(file);
    pieces.push(...(split.length ? split : [{ path: file.path, bytes: file.bytes }]));
  }
  return planPieces(pieces, parallelism);
}

/** Pieces grouped into at most `parallelism` tasks, consecutive pieces of a file merged into one unit. */
export function planPieces(pieces: readonly FilePiece[], parallelism: number): PlannedRead[] {
  return groupByWeight(pieces, (piece) => piece.bytes, parallelism).map((group) => {
    const units: FileUnit[] = [];
    for (const piece of group) {
      const last = units[units.length - 1];
      if (piece.index === undefined) units.push({ path: piece.path });
      else if (last && last.path === piece.path && last.pieces) last.pieces.push(piece.index);
      else units.push({ path: piece.path, pieces: [piece.index] });
    }
    const rowsKnown = group.every((piece) => piece.rows !== undefined);
    return {
      units,
      bytes: group.reduce((sum, piece) => sum + piece.bytes, 0),
      ...(rowsKnown ? { rows: group.reduce((sum, piece) => sum + (piece.rows ?? 0), 0) } : {}),
      inputFiles: filesOf(group),
    };
  });
}

export function checkColumns(value: unknown, format: string): string[] | undefined {
  if (value === undefined) return undefined;
  if (!Array.isArray(value) || value.length === 0 || value.some((name) => typeof name !== 'string')) {
    throw new InvalidArgumentError(`${format} option 'columns' must be a non-empty array of column names`, 'ERR_INVALID_ARGUMENT');
  }
  return [...value];
}

/**
 * Fast column builders for the flat types text formats produce. Arrow's generic vectorFromArray
 * costs about a microsecond a value; writing the buffers directly is several times cheaper, and
 * the reader's time goes mostly into building columns.
 */
function validity(values: readonly unknown[]): { nullBitmap: Uint8Array | undefined; nullCount: number } {
  let nullCount = 0;
  for (let index = 0; index < values.length; index++) if (values[index] === null || values[index] === undefined) nullCount++;
  if (nullCount === 0) return { nullBitmap: undefined, nullCount };
  const nullBitmap = new Uint8Array(((values.length + 63) >> 6) << 3);
  for (let index = 0; index < values.length; index++) {
    if (values[index] !== null && values[index] !== undefined) nullBitmap[index >> 3] |= 1 << (index & 7);
  }
  return { nullBitmap, nullCount };
}

export function float64Column(values: readonly (number | null | undefined)[]): Vector {
  const data = new Float64Array(values.length);
  for (let index = 0; index < values.length; index++) data[index] = values[index] ?? 0;
  return makeVector(makeData({ type: new Float64(), length: values.length, data, ...validity(values) }));
}

export function boolColumn(values: readonly (boolean | null | undefined)[]): Vector {
  const data = new Uint8Array(((values.length + 63) >> 6) << 3);
  for (let index = 0; index < values.length; index++) if (values[index] === true) data[index >> 3] |= 1 << (index & 7);
  return makeVector(makeData({ type: new Bool(), length: values.length, data, ...validity(values) }));
}

export function utf8Column(values: readonly (string | null | undefined)[]): Vector {
  const valueOffsets = new Int32Array(values.length + 1);
  let total = 0;
  for (let index = 0; index < values.length; index++) {
    const value = values[index];
    if (typeof value === 'string') total += Buffer.byteLength(value, 'utf8');
    valueOffsets[index + 1] = total;
  }
  // Its own buffer, not Buffer's shared pool: the block may outlive many small allocations.
  const data = new Uint8Array(total);
  const writer = Buffer.from(data.buffer, 0, total);
  for (let index = 0; index < values.length; index++) {
    const value = values[index];
    if (typeof value === 'string' && value.length > 0) writer.write(value, valueOffsets[index], 'utf8');
  }
  return makeVector(makeData({ type: new Utf8(), length: values.length, data, valueOffsets, ...validity(values) }));
}

export function nullColumn(length: number): Vector {
  return makeVector(makeData({ type: new Null(), length, nullCount: length }));
}

// ---------------------------------------------------------------------------------------------
// Row ids made at the read, for a dataset without ids of its own (a checkpoint's idColumn)

/**
 * The file part of a row id: 48 bits of a hash of the file's absolute path, so that ids stay
 * short (a checkpoint holds every one); two files share a key about once in 10^14 pairs.
 */
export function fileKey(path: string): string {
  return createHash('sha256').update(filePaths.resolve(path)).digest('hex').slice(0, 12);
}

export function checkRowIds(value: unknown, format: string): string | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'string' || value === '') throw new InvalidArgumentError(`${format}: rowIds must name the column to add, got ${String(value)}`, 'ERR_DATA_COLUMN');
  return value;
}

/**
 * A block with a column of row ids (`<file key>:<position in the file>`: stable while the file is
 * unchanged, unique across the dataset). A file that has a column of that name is refused.
 */
export function withRowIds(block: Block, column: string, ids: readonly string[], path: string): Block {
  if (block.getChild(column)) {
    throw new InvalidArgumentError(`'${path}' has a column '${column}' already: name another with rowIds`, 'ERR_DATA_COLUMN');
  }
  const columns: Record<string, Vector> = {};
  for (const field of block.schema.fields) columns[field.name] = block.getChild(field.name)!;
  columns[column] = utf8Column(ids);
  return new Table(columns);
}
