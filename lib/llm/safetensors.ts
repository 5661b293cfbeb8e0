/**
 * Safetensors checkpoints (Hugging Face's format): a little-endian u64 header length, a JSON
 * header naming each tensor's dtype, shape and byte range, then the raw data. Checkpoints run to
 * tens of gigabytes and a shard needs only its slice of each tensor, so reads go through file
 * handles at positions and never load a whole file.
 */
import { randomUUID } from 'node:crypto';
import { mkdir, open, readFile, rename, rm, stat } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, relative, resolve } from 'node:path';
import { InvalidArgumentError, ModelLoadError } from '../errors.js';
import { f16ToFloat, floatBitsToBf16, floatBitsToF16, floatToBf16 } from '../gpu/dtype.js';

/** The dtypes a safetensors file commonly holds. */
export type SafetensorsDType = 'F64' | 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'I16' | 'I8' | 'U8' | 'BOOL';

/** Where one tensor lives. */
export interface TensorInfo {
  name: string;
  /** As the header spells it; dtypes outside SafetensorsDType are kept so other tensors stay readable. */
  dtype: SafetensorsDType | string;
  shape: number[];
  /** Absolute position in `file` of the tensor's first byte. */
  byteOffset: number;
  byteLength: number;
  /** The resolved path of the .safetensors file holding it. */
  file: string;
}

/**
 * Part of a tensor. `rows` runs along dimension 0 (of any tensor with at least one dimension),
 * `columns` along dimension 1 of a 2-D tensor; both are [start, end) in elements.
 */
export interface SliceOptions {
  rows?: [start: number, end: number];
  columns?: [start: number, end: number];
}

/** A tensor to write: `data` holds the values row-major, converted on write to `dtype`. */
export interface WritableTensor {
  dtype: 'F32' | 'F16' | 'BF16';
  shape: number[];
  data: Float32Array;
}

/** The name a single-file checkpoint's file has in its directory. */
const SINGLE_FILE = 'model.safetensors';
/** The name a sharded checkpoint's index has in its directory. */
const INDEX_FILE = 'model.safetensors.index.json';
/** The reference implementation's limit: a larger header is a corrupt or hostile file. */
const MAX_HEADER_BYTES = 100_000_000;
/** Reads and writes go through a scratch buffer of at most this size, so converting a huge tensor never holds its raw bytes whole. */
const CHUNK_BYTES = 4 << 20;
/** Below libuv's ~2 GiB cap on a single read or write call. */
const MAX_IO_BYTES = 1 << 30;

/** Element sizes of every dtype the format defines, so that ranges can be checked even for dtypes readFloat32 does not convert. */
const ELEMENT_BYTES: Record<string, number> = {
  F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U64: 8, U32: 4, U16: 2, U8: 1, BOOL: 1, F8_E4M3: 1, F8_E5M2: 1,
};

/** Only floating-point tensors convert to f32 without loss of meaning; integers (ids, masks) would silently lose I64 precision. */
const FLOAT_DTYPES = new Set(['F64', 'F32', 'F16', 'BF16']);

const LITTLE_ENDIAN_HOST = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** The entry of one tensor in one file's header, after validation. */
interface HeaderEntry {
  dtype: string;
  shape: number[];
  begin: number;
  end: number;
}

interface ParsedHeader {
  metadata: Record<string, string>;
  entries: Map<string, HeaderEntry>;
  /** Absolute position of the data area's first byte. */
  dataStart: number;
}

/** One checkpoint: a single .safetensors file, a directory holding model.safetensors or model.safetensors.index.json, or the index file itself. */
export class Checkpoint {
  /** The path the checkpoint was opened from, for messages. */
  readonly path: string;
  /** The single file's `__metadata__`, or a sharded checkpoint's index `metadata` (values that are not strings as JSON text). */
  readonly metadata: Record<string, string>;
  readonly #tensors: Map<string, TensorInfo>;
  readonly #handles: Map<string, FileHandle>;
  readonly #sortedNames: string[];
  #closed = false;

  private constructor(path: string, metadata: Record<string, string>, tensors: Map<string, TensorInfo>, handles: Map<string, FileHandle>) {
    this.path = path;
    this.metadata = metadata;
    this.#tensors = tensors;
    this.#handles = handles;
    this.#sortedNames = [...tensors.keys()].sort();
  }

  /**
   * Opens and validates a checkpoint, reading only headers (and the index). A directory is looked
   * up as Hugging Face does: model.safetensors first, then model.safetensors.index.json. A path
   * ending in .json is read as an index; anything else as one safetensors file.
   */
  static async open(path: string): Promise<Checkpoint> {
    const resolved = resolve(path);
    let isDirectory: boolean;
    try {
      isDirectory = (await stat(resolved)).isDirectory();
    } catch (error) {
      if (isNotFound(error)) throw new ModelLoadError('ERR_CHECKPOINT_NOT_FOUND', `checkpoint ${resolved} does not exist`, { file: resolved, cause: error });
      throw error;
    }
    if (isDirectory) {
      const single = join(resolved, SINGLE_FILE);
      if (await isFile(single)) return Checkpoint.#openSingle(path, single);
      const index = join(resolved, INDEX_FILE);
      if (await isFile(index)) return Checkpoint.#openIndex(path, index);
      throw new ModelLoadError('ERR_CHECKPOINT_NOT_FOUND', `directory ${resolved} holds no checkpoint: neither ${SINGLE_FILE} nor ${INDEX_FILE}`, { file: resolved });
    }
    if (resolved.endsWith('.json')) return Checkpoint.#openIndex(path, resolved);
    return Checkpoint.#openSingle(path, resolved);
  }

  static async #openSingle(path: string, file: string): Promise<Checkpoint> {
    const handle = await openForReading(file);
    try {
      const header = await readHeader(handle, file);
      const tensors = new Map<string, TensorInfo>();
      for (const [name, entry] of header.entries) tensors.set(name, toInfo(name, entry, header, file));
      return new Checkpoint(path, header.metadata, tensors, new Map([[file, handle]]));
    } catch (error) {
      await handle.close();
      throw error;
    }
  }

  static async #openIndex(path: string, indexFile: string): Promise<Checkpoint> {
    const { metadata, weightMap } = await readIndex(indexFile);
    const directory = dirname(indexFile);
    const handles = new Map<string, FileHandle>();
    try {
      const headers = new Map<string, ParsedHeader>();
      const tensors = new Map<string, TensorInfo>();
      // The weight map decides which file holds each tensor; tensors a shard holds but the map does not name are not part of the model.
      for (const [name, fileName] of weightMap) {
        const file = join(directory, fileName);
        let header = headers.get(file);
        if (!header) {
          const handle = await openForReading(file, indexFile);
          handles.set(file, handle);
          header = await readHeader(handle, file);
          headers.set(file, header);
        }
        const entry = header.entries.get(name);
        if (!entry) {
          throw new ModelLoadError('ERR_CHECKPOINT_INDEX', `${indexFile}: the weight map puts tensor '${name}' in ${file}, whose header does not hold it`, { file, tensor: name });
        }
        tensors.set(name, toInfo(name, entry, header, file));
      }
      return new Checkpoint(path, metadata, tensors, handles);
    } catch (error) {
      await Promise.all([...handles.values()].map((handle) => handle.close()));
      throw error;
    }
  }

  /** Every tensor's name, sorted. */
  names(): string[] {
    return [...this.#sortedNames];
  }

  has(name: string): boolean {
    return this.#tensors.has(name);
  }

  /** Where the tensor lives; ModelLoadError 'ERR_TENSOR_NOT_FOUND' if the checkpoint lacks it. */
  info(name: string): TensorInfo {
    const info = this.#tensors.get(name);
    if (!info) throw new ModelLoadError('ERR_TENSOR_NOT_FOUND', `tensor '${name}' is not in checkpoint ${this.path}`, { file: resolve(this.path), tensor: name });
    return { ...info, shape: [...info.shape] };
  }

  /**
   * The tensor, or the slice asked for, as f32 (F32 as is; F16, BF16, F64 converted), row-major.
   * Reads only the bytes the slice needs: a row slice its rows, a column slice the span from its
   * first row's first column to its last row's last column, then gathers. Integer, boolean and
   * 8-bit float tensors are refused with 'ERR_SAFETENSORS_DTYPE'; slices out of range are
   * InvalidArgumentErrors.
   */
  async readFloat32(name: string, slice: SliceOptions = {}): Promise<Float32Array> {
    return (await this.#read(name, slice, 'f32')) as Float32Array;
  }

  /**
   * As readFloat32, but as the raw bits of 16-bit floats in a Uint16Array: a tensor stored in
   * `dtype` is read as it is, with no conversion; others are rounded to nearest even. A finite
   * value beyond f16's range (65504) is refused with 'ERR_WEIGHT_RANGE' rather than turned into
   * infinity.
   */
  async readHalf(name: string, dtype: 'bf16' | 'f16', slice: SliceOptions = {}): Promise<Uint16Array> {
    return (await this.#read(name, slice, dtype)) as Uint16Array;
  }

  async #read(name: string, slice: SliceOptions, target: TargetEncoding): Promise<Float32Array | Uint16Array> {
    this.#assertOpen();
    const info = this.info(name);
    if (!FLOAT_DTYPES.has(info.dtype)) {
      throw new ModelLoadError('ERR_SAFETENSORS_DTYPE', `tensor '${name}' in ${info.file} has dtype ${info.dtype}, which cannot be read as ${target} (only F32, F16, BF16 and F64 can)`, { file: info.file, tensor: name });
    }
    const { shape } = info;
    // A scalar is read as one row of one element.
    const rowCount = shape.length === 0 ? 1 : shape[0];
    const rowElements = product(shape.slice(1));
    if (slice.rows !== undefined && shape.length === 0) throw new InvalidArgumentError(`tensor '${name}' is a scalar: it has no rows to slice`);
    const [rowStart, rowEnd] = slice.rows === undefined ? [0, rowCount] : checkRange(name, 'rows', slice.rows, rowCount, shape);
    let columnStart = 0;
    let columnEnd = rowElements;
    if (slice.columns !== undefined) {
      if (shape.length !== 2) throw new InvalidArgumentError(`tensor '${name}' has shape [${shape}]: a column slice needs a 2-D tensor`);
      [columnStart, columnEnd] = checkRange(name, 'columns', slice.columns, shape[1], shape);
    }
    const width = columnEnd - columnStart;
    const rows = rowEnd - rowStart;
    const output = target === 'f32' ? new Float32Array(rows * width) : new Uint16Array(rows * width);
    if (output.length === 0) return output;
    const handle = this.#handles.get(info.file)!;
    const reader = new TensorReader(handle, info, target);
    if (width === rowElements || rows === 1) {
      await reader.readContiguous(rowStart * rowElements + columnStart, output);
    } else {
      await reader.readGathered(rowStart * rowElements + columnStart, rows, rowElements, width, output);
    }
    return output;
  }

  /** Closes the file handles; later reads fail with 'ERR_CHECKPOINT_CLOSED'. Idempotent. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await Promise.all([...this.#handles.values()].map((handle) => handle.close()));
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  #assertOpen(): void {
    if (this.#closed) throw new ModelLoadError('ERR_CHECKPOINT_CLOSED', `checkpoint ${this.path} is closed`, { file: resolve(this.path) });
  }
}

/** What a read produces: f32 values, or the bits of bf16 or f16 ones. */
type TargetEncoding = 'f32' | 'bf16' | 'f16';
type TargetArray = Float32Array | Uint16Array;

/** The file dtype whose bytes already are the target's encoding. */
const SAME_ENCODING: Record<TargetEncoding, string> = { f32: 'F32', bf16: 'BF16', f16: 'F16' };

/** Reads elements of one tensor from its file into the target encoding, a scratch chunk at a time. */
class TensorReader {
  readonly #handle: FileHandle;
  readonly #info: TensorInfo;
  readonly #elementBytes: number;
  readonly #target: TargetEncoding;
  /** f32 values on their way to 16 bits, when the file holds another encoding. */
  #widened: Float32Array | undefined;

  constructor(handle: FileHandle, info: TensorInfo, target: TargetEncoding) {
    this.#handle = handle;
    this.#info = info;
    this.#elementBytes = ELEMENT_BYTES[info.dtype];
    this.#target = target;
  }

  /** `output.length` consecutive elements from element `first`. */
  async readContiguous(first: number, output: TargetArray): Promise<void> {
    const elementBytes = this.#elementBytes;
    const position = this.#info.byteOffset + first * elementBytes;
    if (this.#info.dtype === SAME_ENCODING[this.#target]) {
      // Already the output's encoding: read straight into it, no scratch and no copy.
      const bytes = new Uint8Array(output.buffer, output.byteOffset, output.byteLength);
      await this.#readExactly(bytes, position);
      if (!LITTLE_ENDIAN_HOST) swapBytes(bytes, elementBytes);
      return;
    }
    const chunkElements = Math.max(1, Math.floor(CHUNK_BYTES / elementBytes));
    const scratch = new ArrayBuffer(Math.min(output.length, chunkElements) * elementBytes);
    for (let done = 0; done < output.length; done += chunkElements) {
      const count = Math.min(chunkElements, output.length - done);
      const bytes = new Uint8Array(scratch, 0, count * elementBytes);
      await this.#readExactly(bytes, position + done * elementBytes);
      if (!LITTLE_ENDIAN_HOST) swapBytes(bytes, elementBytes);
      this.#convert(scratch, 0, output, done, count);
    }
  }

  /** `rows` runs of `width` elements, `stride` elements apart, the first at element `first`. */
  async readGathered(first: number, rows: number, stride: number, width: number, output: TargetArray): Promise<void> {
    const elementBytes = this.#elementBytes;
    const chunkElements = Math.floor(CHUNK_BYTES / elementBytes);
    // As many rows per read as fit the chunk (the span of k rows is (k - 1) strides plus one width), at least one.
    const rowsPerRead = Math.max(1, Math.min(rows, Math.floor((chunkElements - width) / stride) + 1));
    const scratch = new ArrayBuffer(((rowsPerRead - 1) * stride + width) * elementBytes);
    for (let row = 0; row < rows; row += rowsPerRead) {
      const count = Math.min(rowsPerRead, rows - row);
      const bytes = new Uint8Array(scratch, 0, ((count - 1) * stride + width) * elementBytes);
      await this.#readExactly(bytes, this.#info.byteOffset + (first + row * stride) * elementBytes);
      if (!LITTLE_ENDIAN_HOST) swapBytes(bytes, elementBytes);
      for (let index = 0; index < count; index++) this.#convert(scratch, index * stride, output, (row + index) * width, width);
    }
  }

  #convert(source: ArrayBuffer, sourceIndex: number, output: TargetArray, targetIndex: number, count: number): void {
    if (this.#target === 'f32') return convertToFloat32(this.#info.dtype, source, sourceIndex, output as Float32Array, targetIndex, count);
    const halves = output as Uint16Array;
    if (this.#info.dtype === SAME_ENCODING[this.#target]) {
      halves.set(new Uint16Array(source, sourceIndex * 2, count), targetIndex);
      return;
    }
    // Through f32: exact from F16 and BF16, and the one rounding F32 needs anyway.
    if (!this.#widened || this.#widened.length < count) this.#widened = new Float32Array(count);
    convertToFloat32(this.#info.dtype, source, sourceIndex, this.#widened, 0, count);
    const bits = new Uint32Array(this.#widened.buffer, 0, count);
    if (this.#target === 'bf16') {
      for (let index = 0; index < count; index++) halves[targetIndex + index] = floatBitsToBf16(bits[index]);
      return;
    }
    for (let index = 0; index < count; index++) {
      const half = floatBitsToF16(bits[index]);
      if ((half & 0x7fff) === 0x7c00 && (bits[index] & 0x7f800000) !== 0x7f800000) {
        const { file, name } = this.#info;
        throw new ModelLoadError('ERR_WEIGHT_RANGE', `tensor '${name}' in ${file} holds ${this.#widened[index]}, beyond f16's range (±65504): load it as bf16 or f32`, { file, tensor: name });
      }
      halves[targetIndex + index] = half;
    }
  }

  async #readExactly(bytes: Uint8Array, position: number): Promise<void> {
    let done = 0;
    while (done < bytes.length) {
      const length = Math.min(MAX_IO_BYTES, bytes.length - done);
      const { bytesRead } = await this.#handle.read(bytes, done, length, position + done);
      if (bytesRead === 0) {
        const { file, name } = this.#info;
        throw new ModelLoadError('ERR_SAFETENSORS_RANGE', `${file} ended at byte ${position + done} while reading tensor '${name}' (was it truncated after it was opened?)`, { file, tensor: name });
      }
      done += bytesRead;
    }
  }
}

let f16Table: Float32Array | undefined;

/** All 65536 halves as f32: a lookup beats decoding each element's bits. */
function f16ToFloatTable(): Float32Array {
  if (!f16Table) {
    f16Table = new Float32Array(65536);
    for (let bits = 0; bits < 65536; bits++) f16Table[bits] = f16ToFloat(bits);
  }
  return f16Table;
}

/** Converts `count` elements of `dtype` from `source` (starting at element `sourceIndex`) into `target` at `targetIndex`. */
function convertToFloat32(dtype: string, source: ArrayBuffer, sourceIndex: number, target: Float32Array, targetIndex: number, count: number): void {
  switch (dtype) {
    case 'F32':
      target.set(new Float32Array(source, sourceIndex * 4, count), targetIndex);
      return;
    case 'F16': {
      const table = f16ToFloatTable();
      const halves = new Uint16Array(source, sourceIndex * 2, count);
      for (let index = 0; index < count; index++) target[targetIndex + index] = table[halves[index]];
      return;
    }
    case 'BF16': {
      // A bf16 is the top half of an f32: write the bits, no arithmetic.
      const halves = new Uint16Array(source, sourceIndex * 2, count);
      const bits = new Uint32Array(target.buffer, target.byteOffset + targetIndex * 4, count);
      for (let index = 0; index < count; index++) bits[index] = halves[index] << 16;
      return;
    }
    case 'F64': {
      const doubles = new Float64Array(source, sourceIndex * 8, count);
      for (let index = 0; index < count; index++) target[targetIndex + index] = doubles[index];
      return;
    }
    default:
      throw new Error(`unreachable: dtype ${dtype} has no conversion`);
  }
}

/**
 * Writes one file, converting from f32 (round to nearest even for F16 and BF16); header padded
 * with spaces to a multiple of 8 bytes. Tensors are laid out widest dtype first, then by name, as
 * the reference writer does, so every tensor starts aligned to its element size. The file is
 * written beside `path` and renamed into place, so a failed write leaves no partial checkpoint.
 */
export async function writeSafetensors(path: string, tensors: Record<string, WritableTensor>, metadata?: Record<string, string>): Promise<void> {
  checkTensors(tensors);
  if (metadata !== undefined) checkMetadata(metadata);
  await writeChecked(path, tensors, metadata);
}

/**
 * Writes a sharded checkpoint into `directory` (created if missing): tensors, in the order given,
 * split over files model-00001-of-0000N.safetensors whose tensor data is at most `maxFileBytes`
 * (a tensor larger than that gets a file of its own, as Hugging Face does), plus
 * model.safetensors.index.json whose metadata holds `metadata` and `total_size`. Each file's
 * `__metadata__` holds `metadata` too. Returns the paths of the .safetensors files, in order.
 */
export async function writeShardedCheckpoint(directory: string, tensors: Record<string, WritableTensor>, maxFileBytes: number, metadata?: Record<string, string>): Promise<string[]> {
  if (!Number.isSafeInteger(maxFileBytes) || maxFileBytes < 1) throw new InvalidArgumentError(`maxFileBytes must be a positive integer, got ${String(maxFileBytes)}`);
  checkTensors(tensors);
  if (metadata !== undefined) checkMetadata(metadata);
  const groups: Array<Record<string, WritableTensor>> = [];
  let current: Record<string, WritableTensor> = Object.create(null);
  let currentBytes = 0;
  let totalBytes = 0;
  for (const [name, tensor] of Object.entries(tensors)) {
    const bytes = tensor.data.length * ELEMENT_BYTES[tensor.dtype];
    if (currentBytes > 0 && currentBytes + bytes > maxFileBytes) {
      groups.push(current);
      current = Object.create(null);
      currentBytes = 0;
    }
    current[name] = tensor;
    currentBytes += bytes;
    totalBytes += bytes;
  }
  groups.push(current);
  await mkdir(directory, { recursive: true });
  const digits = (count: number) => String(count).padStart(5, '0');
  const weightMap: Record<string, string> = {};
  const paths: string[] = [];
  for (let index = 0; index < groups.length; index++) {
    const fileName = `model-${digits(index + 1)}-of-${digits(groups.length)}.safetensors`;
    const path = join(directory, fileName);
    await writeChecked(path, groups[index], metadata);
    for (const name of Object.keys(groups[index])) weightMap[name] = fileName;
    paths.push(path);
  }
  const sortedMap = Object.fromEntries(Object.keys(weightMap).sort().map((name) => [name, weightMap[name]]));
  const index = { metadata: { ...metadata, total_size: totalBytes }, weight_map: sortedMap };
  await writeAtomically(join(directory, INDEX_FILE), async (handle) => {
    await writeAll(handle, new TextEncoder().encode(`${JSON.stringify(index, null, 2)}\n`), 0);
  });
  return paths;
}

async function writeChecked(path: string, tensors: Record<string, WritableTensor>, metadata: Record<string, string> | undefined): Promise<void> {
  const names = Object.keys(tensors).sort((a, b) => ELEMENT_BYTES[tensors[b].dtype] - ELEMENT_BYTES[tensors[a].dtype] || (a < b ? -1 : a > b ? 1 : 0));
  // No prototype: a tensor named __proto__ must become a key, not a prototype.
  const header: Record<string, unknown> = Object.create(null);
  if (metadata !== undefined && Object.keys(metadata).length > 0) header.__metadata__ = metadata;
  let offset = 0;
  for (const name of names) {
    const { dtype, shape, data } = tensors[name];
    const end = offset + data.length * ELEMENT_BYTES[dtype];
    header[name] = { dtype, shape, data_offsets: [offset, end] };
    offset = end;
  }
  const json = new TextEncoder().encode(JSON.stringify(header));
  const headerLength = Math.ceil(json.length / 8) * 8;
  const prefix = new Uint8Array(8 + headerLength).fill(0x20);
  new DataView(prefix.buffer).setBigUint64(0, BigInt(headerLength), true);
  prefix.set(json, 8);
  await writeAtomically(path, async (handle) => {
    let position = await writeAll(handle, prefix, 0);
    for (const name of names) position = await writeTensorData(handle, tensors[name], position);
  });
}

/** Writes the tensor's data converted to its dtype, a chunk at a time; returns the position after it. */
async function writeTensorData(handle: FileHandle, tensor: WritableTensor, position: number): Promise<number> {
  const { dtype, data } = tensor;
  if (dtype === 'F32' && LITTLE_ENDIAN_HOST) return writeAll(handle, new Uint8Array(data.buffer, data.byteOffset, data.byteLength), position);
  const elementBytes = ELEMENT_BYTES[dtype];
  const chunkElements = CHUNK_BYTES / 4;
  const scratch = new ArrayBuffer(Math.min(data.length, chunkElements) * 4);
  const bits = new Uint32Array(data.buffer, data.byteOffset, data.length);
  for (let done = 0; done < data.length; done += chunkElements) {
    const count = Math.min(chunkElements, data.length - done);
    if (dtype === 'F32') {
      new Uint32Array(scratch, 0, count).set(bits.subarray(done, done + count));
    } else if (dtype === 'F16') {
      const halves = new Uint16Array(scratch, 0, count);
      for (let index = 0; index < count; index++) halves[index] = floatBitsToF16(bits[done + index]);
    } else {
      const halves = new Uint16Array(scratch, 0, count);
      for (let index = 0; index < count; index++) halves[index] = floatToBf16(data[done + index]);
    }
    const bytes = new Uint8Array(scratch, 0, count * elementBytes);
    if (!LITTLE_ENDIAN_HOST) swapBytes(bytes, elementBytes);
    position = await writeAll(handle, bytes, position);
  }
  return position;
}

async function writeAll(handle: FileHandle, bytes: Uint8Array, position: number): Promise<number> {
  let done = 0;
  while (done < bytes.length) {
    const { bytesWritten } = await handle.write(bytes, done, Math.min(MAX_IO_BYTES, bytes.length - done), position + done);
    done += bytesWritten;
  }
  return position + done;
}

async function writeAtomically(path: string, write: (handle: FileHandle) => Promise<void>): Promise<void> {
  const temporary = join(dirname(path), `.${basename(path)}.${randomUUID()}.tmp`);
  const handle = await open(temporary, 'w');
  try {
    await write(handle);
    await handle.close();
    await rename(temporary, path);
  } catch (error) {
    await handle.close().catch(() => undefined);
    await rm(temporary, { force: true });
    throw error;
  }
}

function checkTensors(tensors: Record<string, WritableTensor>): void {
  if (typeof tensors !== 'object' || tensors === null) throw new InvalidArgumentError(`tensors must be an object of name to tensor, got ${String(tensors)}`);
  for (const [name, tensor] of Object.entries(tensors)) {
    if (name === '__metadata__' || name === '') throw new InvalidArgumentError(`'${name}' cannot name a tensor in a safetensors file`);
    if (tensor.dtype !== 'F32' && tensor.dtype !== 'F16' && tensor.dtype !== 'BF16') {
      throw new InvalidArgumentError(`tensor '${name}': dtype must be F32, F16 or BF16, got ${String(tensor.dtype)}`);
    }
    if (!Array.isArray(tensor.shape) || !tensor.shape.every((size) => Number.isSafeInteger(size) && size >= 0)) {
      throw new InvalidArgumentError(`tensor '${name}': shape must be an array of non-negative integers, got ${JSON.stringify(tensor.shape)}`);
    }
    if (!(tensor.data instanceof Float32Array)) throw new InvalidArgumentError(`tensor '${name}': data must be a Float32Array`);
    if (tensor.data.length !== product(tensor.shape)) {
      throw new InvalidArgumentError(`tensor '${name}': shape [${tensor.shape}] holds ${product(tensor.shape)} elements, data has ${tensor.data.length}`);
    }
  }
}

function checkMetadata(metadata: Record<string, string>): void {
  for (const [key, value] of Object.entries(metadata)) {
    if (typeof value !== 'string') throw new InvalidArgumentError(`metadata '${key}' must be a string (the format allows only strings), got ${typeof value}`);
  }
}

async function readHeader(handle: FileHandle, file: string): Promise<ParsedHeader> {
  const fail = (code: string, message: string, tensor?: string): never => {
    throw new ModelLoadError(code, `${file}: ${message}`, { file, tensor });
  };
  const { size } = await handle.stat();
  if (size < 8) fail('ERR_SAFETENSORS_HEADER', `the file is ${size} bytes, too short for the 8-byte header length`);
  const lengthBytes = Buffer.alloc(8);
  await readFully(handle, lengthBytes, 0, file);
  const declared = lengthBytes.readBigUInt64LE(0);
  if (declared > BigInt(MAX_HEADER_BYTES)) fail('ERR_SAFETENSORS_HEADER', `the header length ${declared} is over the ${MAX_HEADER_BYTES}-byte limit`);
  const headerLength = Number(declared);
  if (8 + headerLength > size) fail('ERR_SAFETENSORS_HEADER', `the header length ${headerLength} runs past the end of the ${size}-byte file`);
  const headerBytes = Buffer.alloc(headerLength);
  await readFully(handle, headerBytes, 8, file);
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(headerBytes));
  } catch (error) {
    throw new ModelLoadError('ERR_SAFETENSORS_HEADER', `${file}: the header is not valid UTF-8 JSON: ${(error as Error).message}`, { file, cause: error });
  }
  if (!isPlainObject(json)) fail('ERR_SAFETENSORS_HEADER', 'the header is not a JSON object');
  const dataStart = 8 + headerLength;
  const dataLength = size - dataStart;
  const metadata: Record<string, string> = {};
  const entries = new Map<string, HeaderEntry>();
  for (const [name, value] of Object.entries(json as Record<string, unknown>)) {
    if (name === '__metadata__') {
      if (!isPlainObject(value)) fail('ERR_SAFETENSORS_HEADER', '__metadata__ is not an object');
      for (const [key, text] of Object.entries(value as Record<string, unknown>)) {
        if (typeof text !== 'string') fail('ERR_SAFETENSORS_HEADER', `__metadata__ '${key}' is not a string`);
        metadata[key] = text as string;
      }
      continue;
    }
    if (!isPlainObject(value)) fail('ERR_SAFETENSORS_HEADER', `the entry of tensor '${name}' is not an object`, name);
    const { dtype, shape, data_offsets: offsets } = value as Record<string, unknown>;
    if (typeof dtype !== 'string' || dtype === '') fail('ERR_SAFETENSORS_HEADER', `tensor '${name}' has no dtype string`, name);
    if (!Array.isArray(shape) || !shape.every((size) => Number.isSafeInteger(size) && size >= 0)) {
      fail('ERR_SAFETENSORS_HEADER', `tensor '${name}' has shape ${JSON.stringify(shape)}, not an array of non-negative integers`, name);
    }
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every((offset) => Number.isSafeInteger(offset) && offset >= 0)) {
      fail('ERR_SAFETENSORS_HEADER', `tensor '${name}' has data_offsets ${JSON.stringify(offsets)}, not two non-negative integers`, name);
    }
    const [begin, end] = offsets as [number, number];
    if (begin > end || end > dataLength) {
      fail('ERR_SAFETENSORS_RANGE', `tensor '${name}' has data_offsets [${begin}, ${end}], outside the data area of ${dataLength} bytes`, name);
    }
    const elementBytes = ELEMENT_BYTES[dtype as string];
    if (elementBytes !== undefined) {
      const elements = product(shape as number[]);
      if (!Number.isSafeInteger(elements) || elements * elementBytes !== end - begin) {
        fail('ERR_SAFETENSORS_RANGE', `tensor '${name}' is ${dtype} [${(shape as number[]).join(', ')}], ${elements * elementBytes} bytes, but its data_offsets [${begin}, ${end}] span ${end - begin}`, name);
      }
    }
    entries.set(name, { dtype: dtype as string, shape: shape as number[], begin, end });
  }
  // Empty tensors take no bytes, so they cannot overlap anything.
  const ordered = [...entries].filter(([, entry]) => entry.end > entry.begin).sort(([, a], [, b]) => a.begin - b.begin);
  for (let index = 1; index < ordered.length; index++) {
    const [previousName, previous] = ordered[index - 1];
    const [name, entry] = ordered[index];
    if (entry.begin < previous.end) {
      fail('ERR_SAFETENSORS_RANGE', `tensors '${previousName}' [${previous.begin}, ${previous.end}] and '${name}' [${entry.begin}, ${entry.end}] overlap`, name);
    }
  }
  return { metadata, entries, dataStart };
}

async function readFully(handle: FileHandle, buffer: Uint8Array, position: number, file: string): Promise<void> {
  let done = 0;
  while (done < buffer.length) {
    const { bytesRead } = await handle.read(buffer, done, Math.min(MAX_IO_BYTES, buffer.length - done), position + done);
    if (bytesRead === 0) throw new ModelLoadError('ERR_SAFETENSORS_HEADER', `${file} ended at byte ${position + done} inside its header`, { file });
    done += bytesRead;
  }
}

async function readIndex(indexFile: string): Promise<{ metadata: Record<string, string>; weightMap: Map<string, string> }> {
  const fail = (message: string): never => {
    throw new ModelLoadError('ERR_CHECKPOINT_INDEX', `${indexFile}: ${message}`, { file: indexFile });
  };
  let text: string;
  try {
    // An index is a name-to-file map of kilobytes, unlike the tensor files.
    text = await readFile(indexFile, 'utf8');
  } catch (error) {
    if (isNotFound(error)) throw new ModelLoadError('ERR_CHECKPOINT_NOT_FOUND', `checkpoint index ${indexFile} does not exist`, { file: indexFile, cause: error });
    throw error;
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw new ModelLoadError('ERR_CHECKPOINT_INDEX', `${indexFile} is not valid JSON: ${(error as Error).message}`, { file: indexFile, cause: error });
  }
  if (!isPlainObject(json)) fail('the index is not a JSON object');
  const { metadata: rawMetadata, weight_map: rawMap } = json as Record<string, unknown>;
  const metadata: Record<string, string> = {};
  if (rawMetadata !== undefined && rawMetadata !== null) {
    if (!isPlainObject(rawMetadata)) fail('"metadata" is not an object');
    // Hugging Face writes total_size as a number.
    for (const [key, value] of Object.entries(rawMetadata as Record<string, unknown>)) metadata[key] = typeof value === 'string' ? value : JSON.stringify(value);
  }
  if (!isPlainObject(rawMap)) fail('"weight_map" is not an object');
  const weightMap = new Map<string, string>();
  const directory = dirname(indexFile);
  for (const [name, fileName] of Object.entries(rawMap as Record<string, unknown>)) {
    if (typeof fileName !== 'string' || fileName === '') fail(`the weight map gives tensor '${name}' the file ${JSON.stringify(fileName)}, not a file name`);
    // An index names files beside it; one pointing elsewhere is corrupt or hostile.
    const inside = relative(directory, join(directory, fileName as string));
    if (isAbsolute(fileName as string) || inside === '' || inside.startsWith('..') || isAbsolute(inside)) {
      fail(`the weight map gives tensor '${name}' the file ${JSON.stringify(fileName)}, outside the index's directory`);
    }
    weightMap.set(name, fileName as string);
  }
  return { metadata, weightMap };
}

async function openForReading(file: string, indexFile?: string): Promise<FileHandle> {
  try {
    return await open(file, 'r');
  } catch (error) {
    if (isNotFound(error)) {
      const message = indexFile ? `checkpoint file ${file}, named by ${indexFile}, does not exist` : `checkpoint file ${file} does not exist`;
      throw new ModelLoadError('ERR_CHECKPOINT_NOT_FOUND', message, { file, cause: error });
    }
    throw error;
  }
}

function toInfo(name: string, entry: HeaderEntry, header: ParsedHeader, file: string): TensorInfo {
  return { name, dtype: entry.dtype, shape: entry.shape, byteOffset: header.dataStart + entry.begin, byteLength: entry.end - entry.begin, file };
}

function checkRange(name: string, axis: 'rows' | 'columns', range: unknown, size: number, shape: number[]): [number, number] {
  if (!Array.isArray(range) || range.length !== 2 || !range.every((value) => Number.isSafeInteger(value))) {
    throw new InvalidArgumentError(`tensor '${name}': ${axis} must be [start, end] integers, got ${JSON.stringify(range)}`);
  }
  const [start, end] = range as [number, number];
  if (start < 0 || start > end || end > size) {
    throw new InvalidArgumentError(`tensor '${name}' has shape [${shape}]: ${axis} [${start}, ${end}) is not within [0, ${size})`);
  }
  return [start, end];
}

function product(shape: readonly number[]): number {
  let result = 1;
  for (const size of shape) result *= size;
  return result;
}

function isPlainObject(value: unknown): boolean {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function isNotFound(error: unknown): boolean {
  return (error as NodeJS.ErrnoException)?.code === 'ENOENT';
}

async function isFile(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isFile();
  } catch (error) {
    if (isNotFound(error)) return false;
    throw error;
  }
}

/** Reverses each element's bytes in place: the format is little-endian whatever the host. */
function swapBytes(bytes: Uint8Array, elementBytes: number): void {
  if (elementBytes === 1) return;
  for (let start = 0; start < bytes.length; start += elementBytes) bytes.subarray(start, start + elementBytes).reverse();
}
