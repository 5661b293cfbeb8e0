/**
 * WebDataset: samples stored as tar shards (Ray Data's read_webdataset / write_webdataset), the
 * form large image, audio and caption sets for batch inference come in. Consecutive files of a
 * shard that share a key (the name up to the first dot of its base name) are one sample; each
 * file is a column named by the rest of its name: `000017.jpg`, `000017.json` and `000017.txt`
 * make `{ __key__: '000017', __url__, jpg, json, txt }`. A shard is streamed by one read task (one
 * GET on object storage), `.tar.gz` decompressed on the way.
 */
import { remote } from '../../core/registry.js';
import { ImageError, InvalidArgumentError } from '../../errors.js';
import { Tensor } from '../../gpu/tensor.js';
import { checkImageMode, checkImageSize, checkMaxPixels, decodeImage, type DecodeImageOptions, type ImageMode } from '../../image/decode.js';
import { encodeImage } from '../../image/encode.js';
import { blockToRows, rowsToBlock, type Block, type Row } from '../block.js';
import { Datasource, ReadTask } from '../datasource.js';
import { checkFileSystem, type FileSystem, type WritableFile } from '../filesystem/file-system.js';
import { compressionFor, type Compression } from './compression.js';
import {
  DEFAULT_BLOCK_BYTES, FileDatasink, FileListing, checkExtensions, checkPositiveInteger, fileBytes, groupByWeight, listedFiles, parseError, taskFileSystem,
  type FileEntry, type FileSystemOptions,
} from './files.js';
import { partitionedReadTasks, selectPartitions, type PartitionReadOptions, type PartitionValues } from './partitioning.js';
import { TAR_END, tarEntries, tarEntry } from './tar.js';

export const WEBDATASET_EXTENSIONS: readonly string[] = ['.tar', '.tar.gz', '.tgz'];

/** Fields read as text, and as integers (WebDataset's conventions); `json` fields are parsed. */
const TEXT_FIELDS = new Set(['txt', 'text', 'caption', 'transcript', 'md', 'html', 'htm', 'xml', 'csv', 'tsv']);
const INTEGER_FIELDS = new Set(['cls', 'cls2', 'index', 'inx', 'id']);

export interface WebDatasetReadOptions extends PartitionReadOptions, FileSystemOptions {
  /**
   * Decode fields by their extension (default true): `json` parsed, text extensions (txt, caption,
   * ...) as strings, `cls`/`id`/`index` as numbers; the rest (images, audio) stay bytes for a model
   * step to decode. false: every field as bytes.
   */
  decode?: boolean;
  /**
   * Decode image fields (jpg, jpeg, png, gif) too, into u8 tensors [height, width, channels] in tensor
   * columns (Ray's default decoder decodes them as well): true for RGB at their own sizes, or
   * `{ mode, size }` as readImages takes them (with `size` a batch of a field is one Tensor
   * [N, H, W, C]). Default false: images stay bytes.
   */
  images?: boolean | { mode?: ImageMode; size?: readonly [height: number, width: number]; maxPixels?: number };
  /** Which files of a directory are shards (default .tar, .tar.gz, .tgz). */
  extensions?: string[];
  /** Samples per block; by default a block holds about `blockBytes`. */
  rowsPerBlock?: number;
  /** Bytes per block when `rowsPerBlock` is not given (default 4 MiB). */
  blockBytes?: number;
}

interface WebDatasetTaskOptions {
  decode: boolean;
  images?: DecodeImageOptions;
  blockBytes: number;
  rowsPerBlock?: number;
  filesystem?: FileSystem;
}

interface Shard {
  path: string;
  compression?: Compression;
}

/** The sample key and field of an entry's name: `dir/000017.seg.png` is key `dir/000017`, field `seg.png`. */
function splitName(name: string): { key: string; field: string } | undefined {
  const slash = name.lastIndexOf('/');
  const dot = name.indexOf('.', slash + 1);
  if (dot <= slash + 1 || dot === name.length - 1) return undefined;
  return { key: name.slice(0, dot), field: name.slice(dot + 1).toLowerCase() };
}

const IMAGE_FIELDS = new Set(['jpg', 'jpeg', 'png', 'gif']);

function decodeField(field: string, bytes: Uint8Array, where: string, images: DecodeImageOptions | undefined): unknown {
  const last = field.slice(field.lastIndexOf('.') + 1);
  if (images && IMAGE_FIELDS.has(last)) {
    try {
      return decodeImage(bytes, images);
    } catch (error) {
      if (error instanceof ImageError) throw new ImageError(error.code, error.message, { source: where, cause: error });
      throw error;
    }
  }
  if (last === 'json') {
    try {
      return JSON.parse(Buffer.from(bytes).toString('utf8'));
    } catch (error) {
      throw parseError(`${where}: malformed JSON (${(error as Error).message})`);
    }
  }
  if (TEXT_FIELDS.has(last)) return Buffer.from(bytes).toString('utf8');
  if (INTEGER_FIELDS.has(last)) {
    const value = Number(Buffer.from(bytes).toString('utf8').trim());
    return Number.isFinite(value) ? value : Buffer.from(bytes).toString('utf8');
  }
  return bytes;
}

export const readWebDatasetShards = remote(import.meta, async function* readWebDatasetShards(shards: Shard[], options: WebDatasetTaskOptions): AsyncGenerator<Block> {
  let rows: Row[] = [];
  let bytes = 0;
  const full = () => (options.rowsPerBlock ? rows.length >= options.rowsPerBlock : bytes >= options.blockBytes);
  for (const shard of shards) {
    let sample: Row | undefined;
    const finish = () => {
      if (sample) rows.push(sample);
      sample = undefined;
    };
    for await (const entry of tarEntries(fileBytes(shard.path, shard.compression, options.filesystem), `WebDataset shard '${shard.path}'`)) {
      const parts = splitName(entry.name);
      // Files without an extension (a shard's own metadata) belong to no sample.
      if (!parts) continue;
      if (sample?.__key__ !== parts.key) {
        finish();
        if (full()) {
          yield rowsToBlock(rows);
          rows = [];
          bytes = 0;
        }
        sample = { __key__: parts.key, __url__: shard.path };
      }
      if (parts.field in sample) throw parseError(`WebDataset shard '${shard.path}': sample '${parts.key}' has two '${parts.field}' files`);
      sample[parts.field] = options.decode ? decodeField(parts.field, entry.bytes, `WebDataset shard '${shard.path}', ${entry.name}`, options.images) : entry.bytes;
      bytes += entry.bytes.byteLength;
    }
    finish();
  }
  if (rows.length > 0) yield rowsToBlock(rows);
});

export class WebDatasetDatasource extends Datasource {
  readonly #listing: FileListing<{ files: FileEntry[]; partitions: Map<string, PartitionValues> | undefined }>;
  private readonly taskOptions: WebDatasetTaskOptions;

  constructor(paths: string | readonly string[], options: WebDatasetReadOptions = {}) {
    super();
    if (options.decode !== undefined && typeof options.decode !== 'boolean') throw new InvalidArgumentError(`WebDataset option 'decode' must be a boolean, got ${JSON.stringify(options.decode)}`);
    const filesystem = taskFileSystem(paths, checkFileSystem(options.filesystem, 'WebDataset'));
    const rowsPerBlock = checkPositiveInteger(options.rowsPerBlock, 'rowsPerBlock');
    const images = imageDecoding(options.images);
    if (images && options.decode === false) throw new InvalidArgumentError(`WebDataset options 'images' and 'decode: false' contradict each other`);
    this.taskOptions = {
      decode: options.decode !== false,
      ...(images ? { images } : {}),
      blockBytes: checkPositiveInteger(options.blockBytes, 'blockBytes') ?? DEFAULT_BLOCK_BYTES,
      ...(rowsPerBlock ? { rowsPerBlock } : {}),
      ...(filesystem ? { filesystem } : {}),
    };
    this.#listing = new FileListing(paths, checkExtensions(options.extensions, WEBDATASET_EXTENSIONS), 'WebDataset', filesystem, (found) =>
      selectPartitions(found.map((file) => {
        const compression = /\.tgz$/i.test(file.path) ? 'gzip' : compressionFor(file.path, 'auto');
        return compression ? { ...file, compression } : file;
      }), options, 'WebDataset'),
    );
  }

  override get name(): string {
    return 'WebDataset';
  }

  /** The shards read (for URLs, known once the dataset runs). */
  get files(): FileEntry[] {
    return listedFiles(this.#listing, 'WebDataset');
  }

  async getReadTasks(parallelism: number): Promise<ReadTask[]> {
    const { files, partitions } = await this.#listing.get();
    // A shard is read whole by one task (a tar cannot be entered in the middle).
    return partitionedReadTasks(files, partitions, parallelism, (chosen, share) =>
      groupByWeight(chosen, (file) => file.bytes, share).map(
        (group) =>
          new ReadTask(
            readWebDatasetShards,
            [group.map((file) => ({ path: file.path, ...(file.compression ? { compression: file.compression } : {}) })), this.taskOptions],
            { bytes: group.reduce((sum, file) => sum + file.bytes, 0), inputFiles: group.map((file) => file.path) },
          ),
      ),
    );
  }

  override estimateInMemorySize(): number | undefined {
    return this.#listing.now?.files.reduce((sum, file) => sum + file.bytes * (file.compression ? 2 : 1), 0);
  }
}

export interface WebDatasetWriteOptions extends FileSystemOptions {
  /** Rows in each shard (the last fewer), gathered across tasks; default: a shard per write task's output. */
  rowsPerFile?: number;
}

/**
 * A value as a file's bytes: bytes as they are, text as UTF-8, numbers and booleans as text, an
 * image tensor encoded by its extension (png, jpg, jpeg), the rest as JSON.
 */
function fieldBytes(value: unknown, field: string): Uint8Array {
  if (value instanceof Uint8Array) return value;
  if (value instanceof Tensor) {
    const last = field.slice(field.lastIndexOf('.') + 1);
    if (last === 'png') return encodeImage(value, { format: 'png' });
    if (last === 'jpg' || last === 'jpeg') return encodeImage(value, { format: 'jpeg' });
    throw new InvalidArgumentError(`WebDataset sink: column '${field}' holds tensors; name it .png, .jpg or .jpeg to write them as images`, 'ERR_DATA_TYPE');
  }
  if (typeof value === 'string') return Buffer.from(value, 'utf8');
  if (typeof value === 'number' || typeof value === 'bigint' || typeof value === 'boolean') return Buffer.from(String(value));
  return Buffer.from(JSON.stringify(value, (_key, inner: unknown) => (typeof inner === 'bigint' ? inner.toString() : inner)));
}

/**
 * Writes each write task's rows as one tar shard: a row is a sample, each column a file named
 * `<__key__>.<column>` (nulls left out); a row without `__key__` is keyed by its shard and place.
 */
export class WebDatasetDatasink extends FileDatasink<{ rowsPerFile?: number; filesystem?: FileSystem }> {
  constructor(path: string, options: WebDatasetWriteOptions = {}) {
    super(path, { rowsPerFile: options.rowsPerFile, filesystem: options.filesystem }, 'WebDataset');
  }

  override get name(): string {
    return 'WebDataset';
  }

  protected get extension(): string {
    return '.tar';
  }

  protected async writeBlocks(blocks: Block[], file: WritableFile): Promise<number> {
    let rows = 0;
    let pending: Buffer[] = [];
    let pendingBytes = 0;
    const flush = async () => {
      if (pending.length === 0) return;
      await file.write(Buffer.concat(pending, pendingBytes));
      pending = [];
      pendingBytes = 0;
    };
    for (const block of blocks) {
      for (const row of blockToRows(block)) {
        const key = row.__key__ === undefined || row.__key__ === null ? `sample${String(rows).padStart(9, '0')}` : String(row.__key__);
        if (key.includes('.')) throw new InvalidArgumentError(`WebDataset sink: __key__ '${key}' has a dot; a sample's key ends at its name's first dot`, 'ERR_DATA_TYPE');
        for (const [column, value] of Object.entries(row)) {
          if (column === '__key__' || column === '__url__' || value === null || value === undefined) continue;
          for (const piece of tarEntry(`${key}.${column}`, fieldBytes(value, column))) {
            pending.push(piece);
            pendingBytes += piece.length;
          }
        }
        rows++;
        if (pendingBytes >= 4 << 20) await flush();
      }
    }
    pending.push(TAR_END);
    pendingBytes += TAR_END.length;
    await flush();
    return rows;
  }
}
remote(import.meta, WebDatasetDatasink);

function imageDecoding(value: WebDatasetReadOptions['images']): DecodeImageOptions | undefined {
  if (value === undefined || value === false) return undefined;
  if (value === true) return { mode: 'RGB' };
  if (typeof value !== 'object' || value === null) {
    throw new InvalidArgumentError(`WebDataset option 'images' must be a boolean or { mode, size }, got ${JSON.stringify(value)}`);
  }
  const mode = checkImageMode(value.mode ?? 'RGB', 'readWebDataset');
  const size = value.size === undefined ? undefined : checkImageSize(value.size, 'readWebDataset');
  if (value.maxPixels !== undefined) checkMaxPixels(value.maxPixels, 'readWebDataset');
  return { mode, ...(size ? { size } : {}), ...(value.maxPixels !== undefined ? { maxPixels: value.maxPixels } : {}) };
}
