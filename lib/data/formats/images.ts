/**
 * Image files as rows of decoded pixels (Ray's read_images): `{ image }` per file (and `path`),
 * the image a u8 tensor [height, width, channels] in a tensor column. Decoding happens in the read
 * tasks, so it spreads over the cluster's CPUs ahead of the model. With `size` every image is
 * resized to it and the column is fixed-shape: a batch reaches the model as one Tensor [N, H, W, C].
 * Without it images keep their own sizes in a variable-shape column.
 */
import { Field, Schema, Table, type Vector } from 'apache-arrow';
import { ImageError, InvalidArgumentError } from '../../errors.js';
import { remote } from '../../core/registry.js';
import { Tensor } from '../../gpu/tensor.js';
import { IMAGE_CHANNELS, checkImageMode, checkImageSize, checkMaxPixels, decodeImage, type ImageFit, type ImageMode } from '../../image/decode.js';
import { encodeImage, type EncodedImageFormat } from '../../image/encode.js';
import { blockToColumns, type Block } from '../block.js';
import { Datasink, type WriteContext } from '../datasource.js';
import { columnTensorCells, fixedTensorField, tensorCellsToColumn, tensorColumnInfo, variableTensorField } from '../tensor-column.js';
import { checkFileSystem, fileSystemFor, urlScheme, type FileSystem } from '../filesystem/file-system.js';
import { WholeFilesDatasource, wholeFiles } from './binary.js';
import type { UdfTarget } from '../udf.js';
import { FileListing, checkExtensions, checkPositiveInteger, checkRowIds, fileKey, taskFileSystem, utf8Column, type FileEntry, type FileSystemOptions } from './files.js';
import { selectPartitions, type PartitionReadOptions } from './partitioning.js';

export const IMAGE_EXTENSIONS: readonly string[] = ['.jpg', '.jpeg', '.png', '.gif'];
/** Decoded bytes per block: images are many times their files' size once decoded. */
const DEFAULT_IMAGE_BLOCK_BYTES = 16 << 20;

export interface ImageReadOptions extends PartitionReadOptions, FileSystemOptions {
  /** [height, width] every image is resized to (bilinear, antialiased when shrinking); the column is then fixed-shape. */
  size?: readonly [height: number, width: number];
  /** How images meet `size`: 'fill' (default: stretched), 'cover' (scaled, centre cropped) or 'contain' (scaled, padded). */
  fit?: ImageFit;
  /** Channels: 'RGB' (default), 'RGBA' or 'L' (gray, a [height, width] tensor). */
  mode?: ImageMode;
  /** Add a `path` column with each file's path (default false). */
  includePaths?: boolean;
  /** Which files of a directory are read (default .jpg, .jpeg, .png, .gif). */
  extensions?: string[];
  /** Images per block; by default a block holds images until their pixels reach `blockBytes`. */
  rowsPerBlock?: number;
  /** Decoded bytes per block when `rowsPerBlock` is not given (default 16 MiB). */
  blockBytes?: number;
  /** Adds a column of this name holding each file's id: its file key (a hash of its path). */
  rowIds?: string;
  /** Images of more pixels fail to decode with ERR_IMAGE_TOO_LARGE (default 178,956,970, PIL's; 0: no limit). */
  maxPixels?: number;
  /**
   * With `size`: decode JPEGs reduced in the DCT domain (1/2, 1/4, 1/8, staying at least `size`)
   * before resizing, as Pillow's draft mode: several times faster for large photographs, pixels
   * slightly different from a full decode (default false).
   */
  draft?: boolean;
  /** Turn JPEGs upright by their EXIF orientation before `size` applies (default false, as Ray and Pillow). */
  applyExifOrientation?: boolean;
  /**
   * An image that does not decode: 'fail' (default) fails the job with an ImageError naming the
   * file; 'null' keeps its row with a null image and the reason in an `imageError` column (null
   * for the images that decoded), so nothing is dropped unseen.
   */
  onDecodeError?: 'fail' | 'null';
}

interface ImageTaskOptions {
  mode: ImageMode;
  fit?: ImageFit;
  size?: readonly [number, number];
  includePaths: boolean;
  filesystem?: FileSystem;
  rowIds?: string;
  rowsPerBlock?: number;
  blockBytes: number;
  maxPixels?: number;
  draft?: boolean;
  applyExifOrientation?: boolean;
  recordErrors: boolean;
}

/** The image column's field: fixed-shape when every image is resized to one size. */
function imageField(options: ImageTaskOptions): Field {
  const channels = IMAGE_CHANNELS[options.mode];
  if (options.size) return fixedTensorField('image', 'u8', channels === 1 ? [...options.size] : [...options.size, channels]);
  return variableTensorField('image', 'u8', channels === 1 ? 2 : 3);
}

export const readImageFiles = remote(import.meta, async function* readImageFiles(paths: string[], options: ImageTaskOptions): AsyncGenerator<Block> {
  const field = imageField(options);
  let images: Array<Tensor | null> = [];
  let names: string[] = [];
  let errors: Array<string | null> = [];
  let bytes = 0;
  const flush = (): Block => {
    const built = tensorCellsToColumn('image', images, { like: field, variable: !options.size });
    const fields: Field[] = [built.field];
    const columns: Record<string, Vector> = { image: built.vector };
    const add = (name: string, vector: Vector) => {
      columns[name] = vector;
      fields.push(new Field(name, vector.type, true));
    };
    if (options.includePaths) add('path', utf8Column(names));
    if (options.recordErrors) add('imageError', utf8Column(errors));
    if (options.rowIds) add(options.rowIds, utf8Column(names.map(fileKey)));
    images = [];
    names = [];
    errors = [];
    bytes = 0;
    return new Table(new Schema(fields), columns);
  };
  for await (const [path, content] of wholeFiles(paths, options.filesystem)) {
    let image: Tensor | null = null;
    let failure: string | null = null;
    try {
      image = decodeImage(content, {
        mode: options.mode,
        ...(options.size ? { size: options.size } : {}),
        ...(options.fit ? { fit: options.fit } : {}),
        ...(options.maxPixels !== undefined ? { maxPixels: options.maxPixels } : {}),
        ...(options.draft ? { draft: true } : {}),
        ...(options.applyExifOrientation ? { applyExifOrientation: true } : {}),
      });
    } catch (error) {
      if (!(error instanceof ImageError)) throw error;
      if (!options.recordErrors) throw new ImageError(error.code, error.message, { source: path, cause: error });
      failure = `${error.code}: ${error.message}`;
    }
    images.push(image);
    names.push(path);
    errors.push(failure);
    bytes += image ? image.byteLength : 0;
    if (options.rowsPerBlock ? images.length >= options.rowsPerBlock : bytes >= options.blockBytes) yield flush();
  }
  if (images.length > 0) yield flush();
});

export class ImageDatasource extends WholeFilesDatasource<ImageTaskOptions> {
  readonly #taskOptions: ImageTaskOptions;

  constructor(paths: string | readonly string[], options: ImageReadOptions = {}) {
    if (options.includePaths !== undefined && typeof options.includePaths !== 'boolean') {
      throw new InvalidArgumentError(`images option 'includePaths' must be a boolean, got ${JSON.stringify(options.includePaths)}`);
    }
    if (options.onDecodeError !== undefined && options.onDecodeError !== 'fail' && options.onDecodeError !== 'null') {
      throw new InvalidArgumentError(`images option 'onDecodeError' must be 'fail' or 'null', got ${JSON.stringify(options.onDecodeError)}`);
    }
    const mode = checkImageMode(options.mode ?? 'RGB', 'readImages');
    if (options.fit !== undefined && options.fit !== 'fill' && options.fit !== 'cover' && options.fit !== 'contain') {
      throw new InvalidArgumentError(`images option 'fit' must be 'fill', 'cover' or 'contain', got ${JSON.stringify(options.fit)}`);
    }
    const size = options.size === undefined ? undefined : checkImageSize(options.size, 'readImages');
    if (options.maxPixels !== undefined) checkMaxPixels(options.maxPixels, 'readImages');
    const includePaths = options.includePaths === true;
    const recordErrors = options.onDecodeError === 'null';
    if (options.draft !== undefined && typeof options.draft !== 'boolean') throw new InvalidArgumentError(`images option 'draft' must be a boolean, got ${JSON.stringify(options.draft)}`);
    if (options.draft && !size) throw new InvalidArgumentError(`images option 'draft' needs 'size': it decodes reduced toward a target size`);
    if (options.applyExifOrientation !== undefined && typeof options.applyExifOrientation !== 'boolean') {
      throw new InvalidArgumentError(`images option 'applyExifOrientation' must be a boolean, got ${JSON.stringify(options.applyExifOrientation)}`);
    }
    const rowIds = options.rowIds !== undefined ? checkRowIds(options.rowIds, 'images') : undefined;
    const taken = ['image', ...(includePaths ? ['path'] : []), ...(recordErrors ? ['imageError'] : [])];
    if (rowIds && taken.includes(rowIds)) {
      throw new InvalidArgumentError(`images option 'rowIds' names the '${rowIds}' column itself: choose another name`, 'ERR_INVALID_ARGUMENT');
    }
    const rowsPerBlock = checkPositiveInteger(options.rowsPerBlock, 'rowsPerBlock');
    const filesystem = taskFileSystem(paths, checkFileSystem(options.filesystem, 'images'));
    const taskOptions: ImageTaskOptions = {
      mode,
      ...(options.fit && options.fit !== 'fill' ? { fit: options.fit } : {}),
      ...(size ? { size } : {}),
      includePaths,
      recordErrors,
      ...(filesystem ? { filesystem } : {}),
      blockBytes: checkPositiveInteger(options.blockBytes, 'blockBytes') ?? DEFAULT_IMAGE_BLOCK_BYTES,
      ...(rowsPerBlock ? { rowsPerBlock } : {}),
      ...(rowIds ? { rowIds } : {}),
      ...(options.maxPixels !== undefined ? { maxPixels: options.maxPixels } : {}),
      ...(options.draft ? { draft: true } : {}),
      ...(options.applyExifOrientation ? { applyExifOrientation: true } : {}),
    };
    super(new FileListing(paths, checkExtensions(options.extensions, IMAGE_EXTENSIONS), 'images', filesystem, (found) => selectPartitions(found, options, 'images')), 'images');
    this.#taskOptions = taskOptions;
  }

  protected get readFunction(): UdfTarget {
    return readImageFiles;
  }

  protected get taskOptions(): ImageTaskOptions {
    return this.#taskOptions;
  }

  override get name(): string {
    return 'Images';
  }

  /** What images hold decoded, where the size says; else a JPEG's usual tenfold. */
  protected override bytesOf(files: readonly FileEntry[]): number {
    const { size, mode } = this.#taskOptions;
    if (size) return files.length * size[0] * size[1] * IMAGE_CHANNELS[mode];
    return files.reduce((sum, file) => sum + file.bytes * 10, 0);
  }
}

export interface ImageWriteOptions extends FileSystemOptions {
  /** The tensor column holding the images (default 'image'). */
  column?: string;
  /** 'png' (default) or 'jpeg'. */
  format?: EncodedImageFormat;
  /** JPEG quality, 1-100 (default 90). */
  quality?: number;
  /** JPEG chroma: '4:2:0' (default) or '4:4:4'. */
  chroma?: '4:2:0' | '4:4:4';
  /**
   * A column naming each file (its value, made safe for a file name, then the extension); the
   * same row always lands in the same file, so a job run again rewrites instead of adding. By
   * default files are named `<write>-<task>-<row>`.
   */
  filenameColumn?: string;
}

interface ImageSinkOptions {
  column: string;
  format: EncodedImageFormat;
  quality?: number;
  chroma?: '4:2:0' | '4:4:4';
  filenameColumn?: string;
  filesystem?: FileSystem;
}

/** What a write task reports: the files it wrote. */
export interface WrittenImages {
  files: string[];
  rows: number;
}

const unsafeFileCharacters = /[^A-Za-z0-9._=-]+/g;

/**
 * Writes each row's image as a file of its own (Ray's write_images), encoded in the write task:
 * PNG or JPEG. A row whose image is null is skipped (counted in `rows`, not in `files`). Files
 * appear whole: a local one is written under a hidden name and renamed, an object on s3:// is one
 * PUT.
 */
export class ImageDatasink extends Datasink<WrittenImages> {
  readonly directory: string;
  readonly options: ImageSinkOptions;

  constructor(directory: string, options: ImageWriteOptions = {}) {
    super();
    if (typeof directory !== 'string' || directory === '') throw new InvalidArgumentError('writeImages takes a directory or s3:// prefix', 'ERR_INVALID_ARGUMENT');
    const format = options.format ?? 'png';
    if (format !== 'png' && format !== 'jpeg') throw new InvalidArgumentError(`writeImages: format must be 'png' or 'jpeg', got ${JSON.stringify(format)}`, 'ERR_INVALID_ARGUMENT');
    const filesystem = taskFileSystem([directory], checkFileSystem(options.filesystem, 'images'));
    this.directory = directory.replace(/\/+$/, '');
    this.options = {
      column: options.column ?? 'image',
      format,
      ...(options.quality !== undefined ? { quality: options.quality } : {}),
      ...(options.chroma !== undefined ? { chroma: options.chroma } : {}),
      ...(options.filenameColumn !== undefined ? { filenameColumn: options.filenameColumn } : {}),
      ...(filesystem ? { filesystem } : {}),
    };
    // Encoding options are checked here, on the driver, not first in a worker.
    encodeImage(Tensor.wrap(new Uint8Array(3), 'u8', [1, 1, 3]), { format, quality: options.quality, chroma: options.chroma });
  }

  override get name(): string {
    return 'Images';
  }

  override async onWriteStart(): Promise<void> {
    await fileSystemFor(this.directory, this.options.filesystem).makeDirectory(this.directory);
  }

  async write(blocks: Block[], context: WriteContext): Promise<WrittenImages> {
    const { column, format, filenameColumn } = this.options;
    const filesystem = fileSystemFor(this.directory, this.options.filesystem);
    const extension = format === 'png' ? '.png' : '.jpg';
    const files: string[] = [];
    let rows = 0;
    for (const block of blocks) {
      const field = block.schema.fields.find((candidate) => candidate.name === column);
      const info = field && tensorColumnInfo(field);
      if (!info) {
        throw new InvalidArgumentError(
          `writeImages: column '${column}' is ${field ? `not a tensor column (${field.type})` : `missing (columns: ${block.schema.fields.map((candidate) => candidate.name).join(', ')})`}`,
          'ERR_DATA_COLUMN',
        );
      }
      const images = columnTensorCells(block.getChild(column)!, info);
      const names = filenameColumn ? blockToColumns(block.select([filenameColumn]))[filenameColumn] : undefined;
      if (filenameColumn && !names) throw new InvalidArgumentError(`writeImages: filenameColumn '${filenameColumn}' is missing`, 'ERR_DATA_COLUMN');
      for (const [index, image] of images.entries()) {
        const row = rows++;
        if (!image) continue;
        const given = names ? (names as ArrayLike<unknown>)[index] : undefined;
        const stem = given === null || given === undefined ? `${context.writeId}-${context.taskIndex}-${row}` : String(given).replace(unsafeFileCharacters, '_');
        const path = `${this.directory}/${stem}${extension}`;
        const bytes = encodeImage(image, { format, quality: this.options.quality, chroma: this.options.chroma });
        const remote = urlScheme(path) !== undefined;
        const temporary = remote ? path : `${this.directory}/.${stem}${extension}.${context.attempt}.tmp`;
        const file = await filesystem.create(temporary);
        try {
          await file.write(bytes);
          await file.close();
        } catch (error) {
          await file.abort().catch(() => undefined);
          throw error;
        }
        if (temporary !== path) await filesystem.rename(temporary, path);
        files.push(path);
      }
    }
    return { files, rows };
  }
}
remote(import.meta, ImageDatasink);
