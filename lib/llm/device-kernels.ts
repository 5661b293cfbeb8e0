/**
 * A decoder layer's operations on a device, and the device's memory: the typed face of
 * native/kernels/device_kernels.h. Two backends, one interface:
 *  - 'cuda': kernels (native/kernels/cuda, embedded in the addon) and cuBLAS, queued in order on
 *    one stream of the rank's GPU; memory from the CUDA caching allocator;
 *  - 'cpu': the same operations run at once by the CPU kernels over host ArrayBuffers. It gives
 *    exactly what the CPU decoder gives, which is how the layers' bookkeeping is tested on a host
 *    without a GPU, and what each CUDA kernel is checked against on a host with one.
 * Every operand's extent is checked here against the rows and widths given, so the native side
 * (which indexes raw memory) only ever sees addresses inside live allocations.
 */
import { InvalidArgumentError, TrellisError } from '../errors.js';
import { cuda } from '../gpu/cuda.js';
import type { DeviceMemory } from '../gpu/cuda-types.js';
import type { Tensor } from '../gpu/tensor.js';
import { native, type NativeDeviceKernels, type NativeStepLayout } from '../native.js';

export type KernelBackend = 'cpu' | 'cuda';
/** How a matrix or a key/value cache keeps its elements (activations are always f32). */
/** Element encodings on a device: weights in the first three, key/value caches in any ('fp8': e4m3fn). */
export type ElementType = 'f32' | 'bf16' | 'f16' | 'fp8';

const ELEMENT_CODES: Readonly<Record<ElementType, number>> = { f32: 0, bf16: 1, f16: 2, fp8: 3 };
export const ELEMENT_BYTES: Readonly<Record<ElementType, number>> = { f32: 4, bf16: 2, f16: 2, fp8: 1 };

/** Bytes of the CUDA kernels built into this addon (0: built without them). */
export function cudaKernelImageBytes(): number {
  return native.deviceKernels.imageBytes();
}

/** An allocation of a backend: device memory, or for 'cpu' a host ArrayBuffer. */
export class DeviceBuffer {
  readonly byteLength: number;
  #address: bigint;
  #host: ArrayBuffer | undefined;
  /** Where a 'cpu' buffer starts in its ArrayBuffer (a view of a caller's array may start inside one). */
  #hostOffset: number;
  #memory: DeviceMemory | undefined;

  /** @internal */
  constructor(byteLength: number, address: bigint, host?: ArrayBuffer, memory?: DeviceMemory, hostOffset = 0) {
    this.byteLength = byteLength;
    this.#address = address;
    this.#host = host;
    this.#hostOffset = hostOffset;
    this.#memory = memory;
  }

  get freed(): boolean {
    return this.#host === undefined && this.#memory === undefined;
  }

  /** The address `byteOffset` bytes in; throws once freed. */
  address(byteOffset = 0): bigint {
    if (this.freed) throw new TrellisError('ERR_CLOSED', 'this device buffer has been freed');
    return this.#address + BigInt(byteOffset);
  }

  /** 'cpu' buffers: floats over the buffer itself (no copy). */
  hostFloats(length: number, byteOffset = 0): Float32Array | undefined {
    return this.#host ? new Float32Array(this.#host, this.#hostOffset + byteOffset, length) : undefined;
  }

  /** 'cuda' buffers: the device memory. */
  get memory(): DeviceMemory | undefined {
    return this.#memory;
  }

  /** 'cuda' buffers: hands the device memory over (to a Tensor, say); this buffer no longer owns or frees it. */
  release(): DeviceMemory {
    const memory = this.#memory;
    if (!memory) throw new TrellisError('ERR_CLOSED', 'this buffer holds no device memory to hand over');
    this.#memory = undefined;
    return memory;
  }

  /** Gives the memory back (device memory to the caching allocator). Queued work reading it must be on the same stream. */
  free(): void {
    this.#memory?.free();
    this.#memory = undefined;
    this.#host = undefined;
  }
}

/** A weight matrix or vector on the device, in its element type. */
export interface DeviceTensor {
  buffer: DeviceBuffer;
  dtype: ElementType;
  /** Elements it holds. */
  length: number;
}

/** A matrix of int8 values quantized per output row (lib/llm/kernels.ts quantizeRows) on the device, with its f32 scales. */
export interface DeviceInt8Matrix {
  dtype: 'int8';
  buffer: DeviceBuffer;
  scales: DeviceTensor;
  /** Elements (int8 values) it holds. */
  length: number;
}

/** A weight matrix on the device: f32, 16-bit, or int8 with scales. */
export type DeviceMatrix = DeviceTensor | DeviceInt8Matrix;

/**
 * Where each row of a step stands (uploaded once a step, read by every layer's attention): for
 * each row, its sequence's index in the step and its position; for each sequence, where its list
 * of cache block addresses starts in the step's lists; and how attention takes the rows: runs of
 * a sequence's rows in tiles (first row, rows: at most TILE_ROWS each), the other rows one by one.
 */
export interface StepLayout {
  buffer: DeviceBuffer;
  rows: number;
  sequences: number;
  tileCount: number;
  singleCount: number;
  /** Byte offsets of the arrays in the buffer. */
  cacheBlocks: number;
  /** Block addresses in cacheBlocks (8 bytes each). */
  blockCount: number;
  cacheTable: number;
  rowSequence: number;
  rowPosition: number;
  tiles: number;
  singleRows: number;
}

/**
 * Positions of one block of a sequence's key/value cache (native/kernels/device_kernels.h): a
 * block holds them for all of a rank's layers, [layer][keys | values][positions][kvHeads][headSize].
 */
export const CACHE_BLOCK_POSITIONS: number = native.deviceKernels.cacheBlockPositions;

/** Most rows of one tile of attention (native/kernels/cuda's kTileRows). */
export const TILE_ROWS = 16;

export interface AttentionShape {
  heads: number;
  kvHeads: number;
  headSize: number;
  cache: ElementType;
}

function requireCount(name: string, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0) throw new InvalidArgumentError(`${name} must be a non-negative integer, got ${value}`);
}

function requireBytes(operation: string, name: string, buffer: DeviceBuffer, bytes: number, byteOffset = 0): void {
  if (buffer.freed) throw new InvalidArgumentError(`${operation}: ${name} has been freed`);
  if (byteOffset + bytes > buffer.byteLength) {
    throw new InvalidArgumentError(`${operation}: ${name} needs ${bytes} bytes${byteOffset ? ` from byte ${byteOffset}` : ''}, its buffer holds ${buffer.byteLength}`);
  }
}

function requireElements(operation: string, name: string, tensor: DeviceTensor, elements: number): void {
  if (tensor.length < elements) throw new InvalidArgumentError(`${operation}: ${name} needs ${elements} elements, holds ${tensor.length}`);
  requireBytes(operation, name, tensor.buffer, elements * ELEMENT_BYTES[tensor.dtype]);
}

function requireFloat(operation: string, name: string, tensor: DeviceTensor, elements: number): void {
  if (tensor.dtype !== 'f32') throw new InvalidArgumentError(`${operation}: ${name} must be f32, is ${tensor.dtype}`);
  requireElements(operation, name, tensor, elements);
}

const FLOAT = 4;

export class DeviceKernels {
  readonly backend: KernelBackend;
  /** The CUDA device ('cuda'); 0 for 'cpu'. */
  readonly device: number;
  #native: NativeDeviceKernels | undefined;

  private constructor(backend: KernelBackend, device: number, handle: NativeDeviceKernels) {
    this.backend = backend;
    this.device = device;
    this.#native = handle;
  }

  /**
   * 'cuda' needs the driver, cuBLAS and a build with the kernels: otherwise ERR_CUDA_UNAVAILABLE or
   * ERR_CUBLAS_UNAVAILABLE, saying why.
   */
  static create(backend: KernelBackend, device = 0): DeviceKernels {
    if (backend !== 'cpu' && backend !== 'cuda') throw new InvalidArgumentError(`a kernel backend is 'cpu' or 'cuda', got ${String(backend)}`);
    if (!Number.isInteger(device) || device < 0) throw new InvalidArgumentError(`device must be a non-negative integer, got ${device}`);
    return new DeviceKernels(backend, device, new native.DeviceKernels({ backend, device }));
  }

  get #kernels(): NativeDeviceKernels {
    if (!this.#native) throw new TrellisError('ERR_CLOSED', 'these device kernels are closed');
    return this.#native;
  }

  allocate(byteLength: number): DeviceBuffer {
    requireCount('byteLength', byteLength);
    // A zero-byte allocation still has an address; kernels never read it.
    const bytes = Math.max(byteLength, 16);
    if (this.backend === 'cpu') {
      const host = new ArrayBuffer(bytes);
      return new DeviceBuffer(byteLength, native.deviceKernels.hostAddress(host), host);
    }
    const memory = cuda.allocate(this.device, bytes);
    return new DeviceBuffer(byteLength, memory.address, undefined, memory);
  }

  /** A new buffer holding `values` (f32 or 16-bit bits, as `dtype` says). */
  tensor(values: Float32Array | Uint16Array, dtype: ElementType): DeviceTensor {
    const expected = dtype === 'f32' ? values instanceof Float32Array : values instanceof Uint16Array;
    if (!expected) throw new InvalidArgumentError(`a ${dtype} tensor takes a ${dtype === 'f32' ? 'Float32Array' : 'Uint16Array of its bits'}`);
    return { buffer: this.#hold(values), dtype, length: values.length };
  }

  /**
   * `values` on the device: for 'cuda' a copy in device memory; for 'cpu' the array itself, not
   * copied (weights are read-only, and a model's weights twice over would not fit where they
   * barely fit once).
   */
  #hold(values: Float32Array | Uint16Array | Int8Array): DeviceBuffer {
    if (this.backend === 'cpu') {
      return new DeviceBuffer(values.byteLength, native.deviceKernels.hostAddress(values), values.buffer as ArrayBuffer, undefined, values.byteOffset);
    }
    const buffer = this.allocate(values.byteLength);
    try {
      this.upload(buffer, values);
    } catch (error) {
      buffer.free();
      throw error;
    }
    return buffer;
  }

  /** A new int8 matrix (values and per-row scales) on the device. */
  int8Matrix(values: Int8Array, scales: Float32Array): DeviceInt8Matrix {
    if (!(values instanceof Int8Array) || !(scales instanceof Float32Array)) throw new InvalidArgumentError('an int8 matrix takes an Int8Array of values and a Float32Array of scales');
    const buffer = this.#hold(values);
    try {
      return { dtype: 'int8', buffer, scales: this.tensor(scales, 'f32'), length: values.length };
    } catch (error) {
      buffer.free();
      throw error;
    }
  }

  upload(target: DeviceBuffer, source: ArrayBufferView, byteOffset = 0): void {
    requireBytes('upload', 'target', target, source.byteLength, byteOffset);
    this.#kernels.upload(target.address(byteOffset), source);
  }

  download(target: ArrayBufferView, source: DeviceBuffer, byteOffset = 0): void {
    requireBytes('download', 'source', source, target.byteLength, byteOffset);
    this.#kernels.download(target, source.address(byteOffset));
  }

  /** All of a CUDA tensor's bytes (another process's memory mapped by IPC, say) into `target`. */
  copyFromTensor(target: DeviceBuffer, tensor: Tensor): void {
    if (this.backend !== 'cuda' || !tensor.isCuda) throw new InvalidArgumentError(`copyFromTensor copies a CUDA tensor to CUDA kernels' memory; got a ${tensor.device} tensor for '${this.backend}' kernels`, 'ERR_TENSOR_DEVICE');
    requireBytes('copyFromTensor', 'target', target, tensor.byteLength);
    this.#kernels.copy(target.address(), tensor.memory.address, tensor.byteLength);
  }

  copy(target: DeviceBuffer, source: DeviceBuffer, bytes: number, targetOffset = 0, sourceOffset = 0): void {
    requireBytes('copy', 'target', target, bytes, targetOffset);
    requireBytes('copy', 'source', source, bytes, sourceOffset);
    this.#kernels.copy(target.address(targetOffset), source.address(sourceOffset), bytes);
  }

  /** out[rows, columns] = x[rows, depth] · weight[columns, depth]ᵀ + bias. */
  linear(out: DeviceBuffer, x: DeviceBuffer, weight: DeviceMatrix, bias: DeviceTensor | null, rows: number, depth: number, columns: number): void {
    const operation = 'linear';
    requireBytes(operation, 'out', out, rows * columns * FLOAT);
    requireBytes(operation, 'x', x, rows * depth * FLOAT);
    if (bias) requireFloat(operation, 'bias', bias, columns);
    if (weight.dtype === 'int8') {
      if (weight.length < columns * depth) throw new InvalidArgumentError(`${operation}: weight needs ${columns * depth} elements, holds ${weight.length}`);
      requireBytes(operation, 'weight', weight.buffer, columns * depth);
      requireFloat(operation, 'weight scales', weight.scales, columns);
      if (rows === 0) return;
      this.#kernels.linearInt8(out.address(), x.address(), weight.buffer.address(), weight.scales.buffer.address(), bias ? bias.buffer.address() : null, rows, depth, columns);
      return;
    }
    requireElements(operation, 'weight', weight, columns * depth);
    if (rows === 0) return;
    this.#kernels.linear(out.address(), x.address(), weight.buffer.address(), ELEMENT_CODES[weight.dtype], bias ? bias.buffer.address() : null, rows, depth, columns);
  }

  /** out[row, column] += residual[row, column] + bias[column] (either may be null). */
  addRows(out: DeviceBuffer, residual: DeviceBuffer | null, bias: DeviceTensor | null, rows: number, columns: number): void {
    requireBytes('addRows', 'out', out, rows * columns * FLOAT);
    if (residual) requireBytes('addRows', 'residual', residual, rows * columns * FLOAT);
    if (bias) requireFloat('addRows', 'bias', bias, columns);
    if (rows === 0 || (!residual && !bias)) return;
    this.#kernels.addRows(out.address(), residual ? residual.address() : null, bias ? bias.buffer.address() : null, rows, columns);
  }

  rmsNorm(out: DeviceBuffer, x: DeviceBuffer, gamma: DeviceTensor, rows: number, columns: number, epsilon: number): void {
    requireBytes('rmsNorm', 'out', out, rows * columns * FLOAT);
    requireBytes('rmsNorm', 'x', x, rows * columns * FLOAT);
    requireFloat('rmsNorm', 'gamma', gamma, columns);
    this.#kernels.rmsNorm(out.address(), x.address(), gamma.buffer.address(), rows, columns, epsilon);
  }

  layerNorm(out: DeviceBuffer, x: DeviceBuffer, gamma: DeviceTensor, beta: DeviceTensor, rows: number, columns: number, epsilon: number): void {
    requireBytes('layerNorm', 'out', out, rows * columns * FLOAT);
    requireBytes('layerNorm', 'x', x, rows * columns * FLOAT);
    requireFloat('layerNorm', 'gamma', gamma, columns);
    requireFloat('layerNorm', 'beta', beta, columns);
    this.#kernels.layerNorm(out.address(), x.address(), gamma.buffer.address(), beta.buffer.address(), rows, columns, epsilon);
  }

  siluMultiply(out: DeviceBuffer, gate: DeviceBuffer, up: DeviceBuffer, count: number): void {
    for (const [name, buffer] of [['out', out], ['gate', gate], ['up', up]] as const) requireBytes('siluMultiply', name, buffer, count * FLOAT);
    this.#kernels.siluMultiply(out.address(), gate.address(), up.address(), count);
  }

  gelu(x: DeviceBuffer, count: number): void {
    requireBytes('gelu', 'x', x, count * FLOAT);
    this.#kernels.gelu(x.address(), count);
  }

  /**
   * Queries out of the fused projection, keys and values into the caches (at each row's position),
   * with per-head norms (Qwen3) and rotary positions when given.
   */
  prepareAttention(
    queries: DeviceBuffer,
    qkv: DeviceBuffer,
    layout: StepLayout,
    shape: AttentionShape,
    layer: number,
    norms: { query: DeviceTensor; key: DeviceTensor; epsilon: number } | null,
    inverseFrequencies: DeviceTensor | null,
  ): void {
    const operation = 'prepareAttention';
    const { heads, kvHeads, headSize } = shape;
    requireBytes(operation, 'queries', queries, layout.rows * heads * headSize * FLOAT);
    requireBytes(operation, 'qkv', qkv, layout.rows * (heads + 2 * kvHeads) * headSize * FLOAT);
    if (norms) {
      requireFloat(operation, 'queryNorm', norms.query, headSize);
      requireFloat(operation, 'keyNorm', norms.key, headSize);
    }
    if (inverseFrequencies) requireFloat(operation, 'inverseFrequencies', inverseFrequencies, headSize / 2);
    this.#kernels.prepareAttention(
      queries.address(), qkv.address(), this.#layoutArgument(layout), heads, kvHeads, headSize, ELEMENT_CODES[shape.cache], layer,
      norms ? norms.query.buffer.address() : null, norms ? norms.key.buffer.address() : null, norms ? norms.epsilon : 0,
      inverseFrequencies ? inverseFrequencies.buffer.address() : null,
    );
  }

  /** Causal attention of every row against its sequence's cache; window > 0: the last `window` positions only. */
  attention(out: DeviceBuffer, queries: DeviceBuffer, layout: StepLayout, shape: AttentionShape, layer: number, window: number): void {
    const width = layout.rows * shape.heads * shape.headSize * FLOAT;
    requireBytes('attention', 'out', out, width);
    requireBytes('attention', 'queries', queries, width);
    this.#kernels.attention(out.address(), queries.address(), this.#layoutArgument(layout), shape.heads, shape.kvHeads, shape.headSize, ELEMENT_CODES[shape.cache], layer, window);
  }

  /** out[i, :] = x[rows[i], :] for i < count; `rows` holds int32 row indices from byte `rowsOffset`. */
  gatherRows(out: DeviceBuffer, x: DeviceBuffer, rows: DeviceBuffer, rowsOffset: number, count: number, width: number, xRows: number): void {
    requireBytes('gatherRows', 'out', out, count * width * FLOAT);
    requireBytes('gatherRows', 'x', x, xRows * width * FLOAT);
    requireBytes('gatherRows', 'rows', rows, count * 4, rowsOffset);
    this.#kernels.gatherRows(out.address(), x.address(), rows.address(rowsOffset), count, width);
  }

  /**
   * out[rows[i], :] += delta[i, :] (or + weights[i] · delta[i, :], weights doubles from byte
   * `weightsOffset`, summed in double). The rows must be distinct and below outRows; the caller
   * made the list, and the kernel trusts it.
   */
  scatterAddRows(
    out: DeviceBuffer, outRows: number, delta: DeviceBuffer, rows: DeviceBuffer, rowsOffset: number, weights: { buffer: DeviceBuffer; offset: number } | null, count: number, width: number,
  ): void {
    requireBytes('scatterAddRows', 'out', out, outRows * width * FLOAT);
    requireBytes('scatterAddRows', 'delta', delta, count * width * FLOAT);
    requireBytes('scatterAddRows', 'rows', rows, count * 4, rowsOffset);
    if (weights) requireBytes('scatterAddRows', 'weights', weights.buffer, count * 8, weights.offset);
    this.#kernels.scatterAddRows(out.address(), delta.address(), rows.address(rowsOffset), weights ? weights.buffer.address(weights.offset) : null, count, width);
  }

  /** weights [rows, experts] (doubles): each row's topK experts' weights from the router's logits, 0 elsewhere. */
  routeExperts(weights: DeviceBuffer, logits: DeviceBuffer, rows: number, experts: number, topK: number, normalize: boolean): void {
    if (!(experts >= 1 && experts <= 256) || !(topK >= 1 && topK <= experts)) throw new InvalidArgumentError(`routeExperts: ${topK} of ${experts} experts (1 to 256, and 1 to experts a row)`);
    requireBytes('routeExperts', 'weights', weights, rows * experts * 8);
    requireBytes('routeExperts', 'logits', logits, rows * experts * FLOAT);
    this.#kernels.routeExperts(weights.address(), logits.address(), rows, experts, topK, normalize);
  }

  /** out[row, :] += weights[row, expert] · result[row, :] (in double) where that weight is not 0. */
  addWeightedRows(out: DeviceBuffer, result: DeviceBuffer, weights: DeviceBuffer, expert: number, experts: number, rows: number, width: number): void {
    if (!(expert >= 0 && expert < experts)) throw new InvalidArgumentError(`addWeightedRows: expert ${expert} of ${experts}`);
    requireBytes('addWeightedRows', 'out', out, rows * width * FLOAT);
    requireBytes('addWeightedRows', 'result', result, rows * width * FLOAT);
    requireBytes('addWeightedRows', 'weights', weights, rows * experts * 8);
    this.#kernels.addWeightedRows(out.address(), result.address(), weights.address(), expert, experts, rows, width);
  }

  zero(x: DeviceBuffer, count: number): void {
    requireBytes('zero', 'x', x, count * FLOAT);
    this.#kernels.zero(x.address(), count);
  }

  /** The first `length` positions of every layer's keys and values, from one cache to another. */
  synchronize(): void {
    this.#kernels.synchronize();
  }

  /** Releases the stream, cuBLAS and the kernels' module; buffers are freed by their owners. */
  close(): void {
    this.#native?.close();
    this.#native = undefined;
  }

  [Symbol.dispose](): void {
    this.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.close();
  }

  #layoutArgument(layout: StepLayout): NativeStepLayout {
    const { buffer, rows, sequences, tileCount, singleCount } = layout;
    requireBytes('step layout', 'rowSequence', buffer, rows * 4, layout.rowSequence);
    requireBytes('step layout', 'rowPosition', buffer, rows * 4, layout.rowPosition);
    requireBytes('step layout', 'cacheBlocks', buffer, layout.blockCount * 8, layout.cacheBlocks);
    requireBytes('step layout', 'cacheTable', buffer, sequences * 4, layout.cacheTable);
    requireBytes('step layout', 'tiles', buffer, tileCount * 8, layout.tiles);
    requireBytes('step layout', 'singleRows', buffer, singleCount * 4, layout.singleRows);
    return {
      rowSequence: buffer.address(layout.rowSequence),
      rowPosition: buffer.address(layout.rowPosition),
      cacheBlocks: buffer.address(layout.cacheBlocks),
      cacheTable: buffer.address(layout.cacheTable),
      tiles: tileCount > 0 ? buffer.address(layout.tiles) : null,
      singleRows: singleCount > 0 ? buffer.address(layout.singleRows) : null,
      rows,
      sequences,
      tileCount,
      singleCount,
    };
  }
}
