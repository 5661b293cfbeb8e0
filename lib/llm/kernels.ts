/**
 * f32 row-major CPU kernels for the decoder's shards (native/kernels/cpu_kernels.cc), with
 * linear's weights in f32, bf16 or f16. They run
 * synchronously on the calling thread: each worker process is one rank.
 *
 * Arguments are checked here, so a mistake is reported with the caller's names before the addon
 * is reached; the addon checks them again, as it must never trust numbers it indexes memory with.
 * `out` may not overlap an input (layerNorm's and rmsNorm's out may be x itself, siluMultiply's may
 * be gate itself); arrays may be longer than the dimensions need, and may be subarrays.
 */
import { types } from 'node:util';
import { InvalidArgumentError } from '../errors.js';
import { native } from '../native.js';

function describe(value: unknown): string {
  if (value === null || value === undefined) return String(value);
  if (ArrayBuffer.isView(value)) return `a ${value.constructor.name}`;
  if (Array.isArray(value)) return 'an Array';
  if (typeof value === 'number') return String(value);
  return typeof value === 'object' ? 'an object' : `a ${typeof value}`;
}

function requireFloats(kernel: string, name: string, value: unknown): asserts value is Float32Array {
  // util.types rather than instanceof: an array made in another realm is still a Float32Array.
  if (!types.isFloat32Array(value)) throw new InvalidArgumentError(`${kernel}: ${name} must be a Float32Array, got ${describe(value)}`);
}

function requireInts(kernel: string, name: string, value: unknown): asserts value is Int32Array {
  if (!types.isInt32Array(value)) throw new InvalidArgumentError(`${kernel}: ${name} must be an Int32Array, got ${describe(value)}`);
}

function requireDimension(kernel: string, name: string, value: unknown, minimum: 0 | 1): asserts value is number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < minimum) {
    const expected = minimum === 1 ? 'a positive integer' : 'a non-negative integer';
    throw new InvalidArgumentError(`${kernel}: ${name} must be ${expected}, got ${describe(value)}`);
  }
}

function product(kernel: string, formula: string, ...factors: number[]): number {
  const result = factors.reduce((total, factor) => total * factor, 1);
  if (!Number.isSafeInteger(result)) throw new InvalidArgumentError(`${kernel}: ${formula} = ${factors.join(' * ')} is too large`);
  return result;
}

function requireLength(kernel: string, name: string, array: Float32Array, needed: number, formula: string): void {
  if (array.length < needed) {
    throw new InvalidArgumentError(`${kernel}: ${name} must hold at least ${formula} = ${needed} floats, got ${array.length}`);
  }
}

function requireEpsilon(kernel: string, eps: unknown): asserts eps is number {
  if (typeof eps !== 'number' || !Number.isFinite(eps) || eps < 0) {
    throw new InvalidArgumentError(`${kernel}: eps must be a finite number >= 0, got ${describe(eps)}`);
  }
}

/** Writing out while an overlapping input is still being read would corrupt the input. Both hold 4-byte elements. */
function requireDisjoint(
  kernel: string,
  out: Float32Array,
  outUsed: number,
  input: Float32Array | Int32Array,
  inputUsed: number,
  inputName: string,
  outName = 'out',
): void {
  if (out.buffer !== input.buffer || outUsed === 0 || inputUsed === 0) return;
  const outEnd = out.byteOffset + outUsed * 4;
  const inputEnd = input.byteOffset + inputUsed * 4;
  if (out.byteOffset < inputEnd && input.byteOffset < outEnd) throw new InvalidArgumentError(`${kernel}: ${outName} must not overlap ${inputName}`);
}

/** The encodings a weight matrix may be kept in ('int8': quantized per row, see QuantizedMatrix). */
export type WeightDType = 'f32' | 'bf16' | 'f16' | 'int8';
/**
 * The encodings a key/value cache may be kept in. 'fp8': 8-bit e4m3fn floats (3 mantissa bits,
 * largest finite 448, values beyond saturated), as vLLM's fp8 cache keeps them with unit scales:
 * a quarter of f32's memory, half of bf16's.
 */
export type CacheDType = 'f32' | 'bf16' | 'f16' | 'fp8';

/**
 * A matrix kept in 16-bit floats, as checkpoints store them: the raw bits of each bf16 or f16
 * value. It takes half the memory of its f32 widening and gives exactly the same results.
 */
export interface HalfMatrix {
  dtype: 'bf16' | 'f16';
  bits: Uint16Array;
}

/**
 * A [rows, columns] matrix quantized to int8 per row (symmetric): element (r, c) stands for
 * values[r × columns + c] × scales[r]. A quarter of f32's memory; each row's largest magnitude is
 * kept to within half a step of 1/127 of it.
 */
export interface QuantizedMatrix {
  dtype: 'int8';
  values: Int8Array;
  scales: Float32Array;
}

/** A weight matrix: f32 values, 16-bit ones, or int8 ones with a scale per row. */
export type WeightMatrix = Float32Array | HalfMatrix | QuantizedMatrix;

export function isHalfMatrix(value: unknown): value is HalfMatrix {
  return typeof value === 'object' && value !== null && !ArrayBuffer.isView(value) && ((value as HalfMatrix).dtype === 'bf16' || (value as HalfMatrix).dtype === 'f16');
}

export function isQuantizedMatrix(value: unknown): value is QuantizedMatrix {
  return typeof value === 'object' && value !== null && !ArrayBuffer.isView(value) && (value as QuantizedMatrix).dtype === 'int8';
}

/** Bytes a weight matrix takes. */
export function weightBytes(weight: WeightMatrix): number {
  if (isQuantizedMatrix(weight)) return weight.values.byteLength + weight.scales.byteLength;
  return isHalfMatrix(weight) ? weight.bits.byteLength : weight.byteLength;
}

/** A [rows, columns] f32 matrix quantized to int8 per row: scale = the row's largest magnitude / 127, values rounded to nearest. */
export function quantizeRows(matrix: Float32Array, rows: number, columns: number): QuantizedMatrix {
  requireFloats('quantizeRows', 'matrix', matrix);
  if (matrix.length !== rows * columns) throw new InvalidArgumentError(`quantizeRows: matrix holds ${matrix.length} values, not rows * columns = ${rows} * ${columns}`);
  const values = new Int8Array(matrix.length);
  const scales = new Float32Array(rows);
  for (let row = 0; row < rows; row++) {
    const begin = row * columns;
    let largest = 0;
    for (let index = begin; index < begin + columns; index++) largest = Math.max(largest, Math.abs(matrix[index]));
    if (!Number.isFinite(largest)) throw new InvalidArgumentError(`quantizeRows: row ${row} holds a value that is not finite`);
    // A row of zeros keeps scale 0: its values are all 0 too.
    const scale = Math.fround(largest / 127);
    scales[row] = scale;
    if (scale === 0) continue;
    for (let index = begin; index < begin + columns; index++) values[index] = Math.max(-127, Math.min(127, Math.round(matrix[index] / scale)));
  }
  return { dtype: 'int8', values, scales };
}

function requireQuantized(kernel: string, name: string, value: QuantizedMatrix): void {
  if (!types.isInt8Array(value.values)) throw new InvalidArgumentError(`${kernel}: ${name}.values must be an Int8Array, got ${describe(value.values)}`);
  if (!types.isFloat32Array(value.scales)) throw new InvalidArgumentError(`${kernel}: ${name}.scales must be a Float32Array, got ${describe(value.scales)}`);
}

function requireHalf(kernel: string, name: string, value: HalfMatrix): void {
  if (!types.isUint16Array(value.bits)) throw new InvalidArgumentError(`${kernel}: ${name}.bits must be a Uint16Array holding ${value.dtype} values, got ${describe(value.bits)}`);
}

/** Element ranges in bytes, for overlap checks between arrays of different element sizes. */
function overlaps(a: ArrayBufferView, aBytes: number, b: ArrayBufferView, bBytes: number): boolean {
  if (a.buffer !== b.buffer || aBytes === 0 || bBytes === 0) return false;
  return a.byteOffset < b.byteOffset + bBytes && b.byteOffset < a.byteOffset + aBytes;
}

/**
 * out[m,n] = x[m,k] · weight[n,k]ᵀ + bias[n] (bias optional: null). weight is stored as PyTorch's
 * Linear stores it: [out features, in features], in f32 or as a HalfMatrix (bf16 or f16, widened
 * as it is read: the same result as its f32 widening, bit for bit).
 */
export function linear(out: Float32Array, x: Float32Array, weight: WeightMatrix, bias: Float32Array | null, m: number, k: number, n: number): void {
  const kernel = 'linear';
  requireFloats(kernel, 'out', out);
  requireFloats(kernel, 'x', x);
  const half = isHalfMatrix(weight);
  const quantized = isQuantizedMatrix(weight);
  if (half) requireHalf(kernel, 'weight', weight);
  else if (quantized) requireQuantized(kernel, 'weight', weight);
  else requireFloats(kernel, 'weight', weight);
  if (bias !== null) requireFloats(kernel, 'bias', bias);
  requireDimension(kernel, 'm', m, 1);
  requireDimension(kernel, 'k', k, 1);
  requireDimension(kernel, 'n', n, 1);
  const outSize = product(kernel, 'm * n', m, n);
  const xSize = product(kernel, 'm * k', m, k);
  const weightSize = product(kernel, 'n * k', n, k);
  requireLength(kernel, 'out', out, outSize, `m * n = ${m} * ${n}`);
  requireLength(kernel, 'x', x, xSize, `m * k = ${m} * ${k}`);
  const weightArray = half ? weight.bits : quantized ? weight.values : weight;
  if (weightArray.length < weightSize) throw new InvalidArgumentError(`${kernel}: weight must hold at least n * k = ${n} * ${k} = ${weightSize} ${half ? '16-bit values' : quantized ? 'int8 values' : 'floats'}, got ${weightArray.length}`);
  if (quantized && weight.scales.length < n) throw new InvalidArgumentError(`${kernel}: weight.scales must hold at least n = ${n} floats, got ${weight.scales.length}`);
  if (bias !== null) requireLength(kernel, 'bias', bias, n, 'n');
  requireDisjoint(kernel, out, outSize, x, xSize, 'x');
  if (overlaps(out, outSize * 4, weightArray, weightSize * weightArray.BYTES_PER_ELEMENT)) throw new InvalidArgumentError(`${kernel}: out must not overlap weight`);
  if (bias !== null) requireDisjoint(kernel, out, outSize, bias, n, 'bias');
  if (half) native.kernels.linear(out, x, weight.bits, bias, m, k, n, weight.dtype);
  else if (quantized) native.kernels.linear(out, x, weight.values, bias, m, k, n, 'int8', weight.scales);
  else native.kernels.linear(out, x, weight, bias, m, k, n);
}

/**
 * Rows [first, first + count) of a [rows, width] weight matrix as f32, into out (an embedding
 * lookup). f32 rows are copied, 16-bit ones widened exactly.
 */
export function readRows(out: Float32Array, matrix: WeightMatrix, width: number, first: number, count = 1): void {
  const kernel = 'readRows';
  requireFloats(kernel, 'out', out);
  requireDimension(kernel, 'width', width, 1);
  requireDimension(kernel, 'first', first, 0);
  requireDimension(kernel, 'count', count, 0);
  const begin = product(kernel, 'first * width', first, width);
  const size = product(kernel, 'count * width', count, width);
  requireLength(kernel, 'out', out, size, `count * width = ${count} * ${width}`);
  if (isQuantizedMatrix(matrix)) {
    requireQuantized(kernel, 'matrix', matrix);
    if (matrix.values.length < begin + size || matrix.scales.length < first + count) throw new InvalidArgumentError(`${kernel}: rows [${first}, ${first + count}) of width ${width} need ${begin + size} values, the matrix has ${matrix.values.length}`);
    for (let row = 0; row < count; row++) {
      const scale = matrix.scales[first + row];
      for (let column = 0; column < width; column++) out[row * width + column] = matrix.values[begin + row * width + column] * scale;
    }
    return;
  }
  const half = isHalfMatrix(matrix);
  if (half) requireHalf(kernel, 'matrix', matrix);
  else requireFloats(kernel, 'matrix', matrix);
  const source = half ? matrix.bits : matrix;
  if (source.length < begin + size) throw new InvalidArgumentError(`${kernel}: rows [${first}, ${first + count}) of width ${width} need ${begin + size} values, the matrix has ${source.length}`);
  if (overlaps(out, size * 4, source, (begin + size) * source.BYTES_PER_ELEMENT)) throw new InvalidArgumentError(`${kernel}: out must not overlap matrix`);
  if (half) native.kernels.widen(out, matrix.bits.subarray(begin, begin + size), matrix.dtype, size);
  else out.set(matrix.subarray(begin, begin + size));
}

/** The checks both norms share; beta is layer norm's shift (undefined for RMS norm). */
function checkNorm(kernel: string, out: Float32Array, x: Float32Array, gamma: Float32Array, beta: Float32Array | null | undefined, rows: number, cols: number, eps: number): void {
  requireFloats(kernel, 'out', out);
  requireFloats(kernel, 'x', x);
  requireFloats(kernel, 'gamma', gamma);
  if (beta !== undefined) requireFloats(kernel, 'beta', beta);
  requireDimension(kernel, 'rows', rows, 1);
  requireDimension(kernel, 'cols', cols, 1);
  requireEpsilon(kernel, eps);
  const size = product(kernel, 'rows * cols', rows, cols);
  const formula = `rows * cols = ${rows} * ${cols}`;
  requireLength(kernel, 'out', out, size, formula);
  requireLength(kernel, 'x', x, size, formula);
  requireLength(kernel, 'gamma', gamma, cols, 'cols');
  if (beta) requireLength(kernel, 'beta', beta, cols, 'cols');
  const inPlace = out.buffer === x.buffer && out.byteOffset === x.byteOffset;
  if (!inPlace) requireDisjoint(kernel, out, size, x, size, 'x (unless it is x itself)');
  requireDisjoint(kernel, out, size, gamma, cols, 'gamma');
  if (beta) requireDisjoint(kernel, out, size, beta, cols, 'beta');
}

/** Per row of `cols`: (x - mean) / sqrt(var + eps) * gamma + beta. out may be x itself. */
export function layerNorm(out: Float32Array, x: Float32Array, gamma: Float32Array, beta: Float32Array, rows: number, cols: number, eps: number): void {
  // null, not undefined, for a missing beta: layer norm needs one, and checkNorm then says so.
  checkNorm('layerNorm', out, x, gamma, beta ?? null, rows, cols, eps);
  native.kernels.layerNorm(out, x, gamma, beta, rows, cols, eps);
}

/** In place, GPT-2's tanh approximation: 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))). */
export function gelu(x: Float32Array): void {
  requireFloats('gelu', 'x', x);
  native.kernels.gelu(x);
}

/** Per row of `cols`: x / sqrt(mean(x^2) + eps) * gamma (Llama's RMSNorm; the mean in f64). out may be x itself. */
export function rmsNorm(out: Float32Array, x: Float32Array, gamma: Float32Array, rows: number, cols: number, eps: number): void {
  checkNorm('rmsNorm', out, x, gamma, undefined, rows, cols, eps);
  native.kernels.rmsNorm(out, x, gamma, rows, cols, eps);
}

/**
 * out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i], the gated MLP of Llama-family decoders, over whole arrays of one
 * length. out may be gate itself.
 */
export function siluMultiply(out: Float32Array, gate: Float32Array, up: Float32Array): void {
  const kernel = 'siluMultiply';
  requireFloats(kernel, 'out', out);
  requireFloats(kernel, 'gate', gate);
  requireFloats(kernel, 'up', up);
  // The arrays carry the size, so a length that differs is a mistake rather than spare room.
  for (const [name, array] of [['gate', gate], ['up', up]] as const) {
    if (array.length !== out.length) throw new InvalidArgumentError(`${kernel}: ${name} must have the length of out (${out.length}), got ${array.length}`);
  }
  const inPlace = out.buffer === gate.buffer && out.byteOffset === gate.byteOffset;
  if (!inPlace) requireDisjoint(kernel, out, out.length, gate, gate.length, 'gate (unless it is gate itself)');
  requireDisjoint(kernel, out, out.length, up, up.length, 'up');
  native.kernels.siluMultiply(out, gate, up);
}

/**
 * In place, rotary position embedding (RoPE) of x: [rows, heads, headDim], in Hugging Face's rotate_half pairing (Llama): for i < headDim / 2,
 * element i of each head turns with element i + headDim / 2 by the angle positions[row] * inverseFrequencies[i]:
 * (a, b) -> (a cos - b sin, b cos + a sin). The angle and its cos/sin are computed in f64, so large positions lose no precision.
 * positions: Int32Array of >= rows positions, each >= 0; inverseFrequencies: >= headDim / 2 floats; headDim even.
 */
export function rotary(x: Float32Array, positions: Int32Array, inverseFrequencies: Float32Array, rows: number, heads: number, headDim: number): void {
  const kernel = 'rotary';
  requireFloats(kernel, 'x', x);
  requireInts(kernel, 'positions', positions);
  requireFloats(kernel, 'inverseFrequencies', inverseFrequencies);
  requireDimension(kernel, 'rows', rows, 1);
  requireDimension(kernel, 'heads', heads, 1);
  requireDimension(kernel, 'headDim', headDim, 1);
  if (headDim % 2 !== 0) throw new InvalidArgumentError(`${kernel}: headDim must be even, got ${headDim}`);
  const half = headDim / 2;
  const size = product(kernel, 'rows * heads * headDim', rows, heads, headDim);
  requireLength(kernel, 'x', x, size, `rows * heads * headDim = ${rows} * ${heads} * ${headDim}`);
  if (positions.length < rows) throw new InvalidArgumentError(`${kernel}: positions must hold at least rows = ${rows} integers, got ${positions.length}`);
  requireLength(kernel, 'inverseFrequencies', inverseFrequencies, half, 'headDim / 2');
  for (let row = 0; row < rows; row++) {
    if (positions[row] < 0) throw new InvalidArgumentError(`${kernel}: positions[${row}] must be >= 0, got ${positions[row]}`);
  }
  requireDisjoint(kernel, x, size, positions, rows, 'positions', 'x');
  requireDisjoint(kernel, x, size, inverseFrequencies, half, 'inverseFrequencies', 'x');
  native.kernels.rotary(x, positions, inverseFrequencies, rows, heads, headDim);
}

/**
 * Causal self-attention of one sequence against its key/value cache, with grouped-query attention when kvHeads < heads.
 * q: [queries, heads, headDim]; keys and values: [rows >= past + queries, kvHeads, headDim] of which the first past + queries rows are valid;
 * out: [queries, heads, headDim]. heads must be a multiple of kvHeads; query head h reads kv head floor(h / (heads / kvHeads)).
 * Query i sits at position past + i and attends to positions 0..past+i, scale 1/sqrt(headDim), softmax in f32 with max subtraction;
 * with a sliding window (window > 0, as Mistral's) only to the last `window` of those, itself included (0: no window).
 */
export function attention(
  out: Float32Array,
  q: Float32Array,
  keys: Float32Array | HalfMatrix,
  values: Float32Array | HalfMatrix,
  queries: number,
  past: number,
  heads: number,
  headDim: number,
  kvHeads = heads,
  window = 0,
): void {
  const kernel = 'attention';
  requireFloats(kernel, 'out', out);
  requireFloats(kernel, 'q', q);
  // A cache kept in 16 bits: keys and values in one dtype, widened as they are read.
  const half = isHalfMatrix(keys);
  if (half !== isHalfMatrix(values) || (half && (keys as HalfMatrix).dtype !== (values as HalfMatrix).dtype)) {
    throw new InvalidArgumentError(`${kernel}: keys and values must be kept in one dtype`);
  }
  if (half) {
    requireHalf(kernel, 'keys', keys as HalfMatrix);
    requireHalf(kernel, 'values', values as HalfMatrix);
  } else {
    requireFloats(kernel, 'keys', keys);
    requireFloats(kernel, 'values', values);
  }
  requireDimension(kernel, 'queries', queries, 1);
  requireDimension(kernel, 'past', past, 0);
  requireDimension(kernel, 'heads', heads, 1);
  requireDimension(kernel, 'headDim', headDim, 1);
  requireDimension(kernel, 'kvHeads', kvHeads, 1);
  requireDimension(kernel, 'window', window, 0);
  if (heads % kvHeads !== 0) throw new InvalidArgumentError(`${kernel}: heads must be a multiple of kvHeads, got heads ${heads} and kvHeads ${kvHeads}`);
  const positions = past + queries;
  const querySize = product(kernel, 'queries * heads * headDim', queries, heads, headDim);
  const cacheSize = product(kernel, '(past + queries) * kvHeads * headDim', positions, kvHeads, headDim);
  product(kernel, 'queries * (past + queries)', queries, positions);
  product(kernel, 'heads / kvHeads * (past + queries)', heads / kvHeads, positions);
  requireLength(kernel, 'out', out, querySize, `queries * heads * headDim = ${queries} * ${heads} * ${headDim}`);
  requireLength(kernel, 'q', q, querySize, `queries * heads * headDim = ${queries} * ${heads} * ${headDim}`);
  const cacheFormula = `(past + queries) * kvHeads * headDim = ${positions} * ${kvHeads} * ${headDim}`;
  requireDisjoint(kernel, out, querySize, q, querySize, 'q');
  for (const [name, cache] of [['keys', keys], ['values', values]] as const) {
    const array = isHalfMatrix(cache) ? cache.bits : cache;
    if (array.length < cacheSize) throw new InvalidArgumentError(`${kernel}: ${name} must hold at least ${cacheFormula} = ${cacheSize} ${half ? '16-bit values' : 'floats'}, got ${array.length}`);
    if (overlaps(out, querySize * 4, array, cacheSize * array.BYTES_PER_ELEMENT)) throw new InvalidArgumentError(`${kernel}: out must not overlap ${name}`);
  }
  if (half) native.kernels.attention(out, q, (keys as HalfMatrix).bits, (values as HalfMatrix).bits, queries, past, heads, headDim, kvHeads, window, (keys as HalfMatrix).dtype);
  else native.kernels.attention(out, q, keys as Float32Array, values as Float32Array, queries, past, heads, headDim, kvHeads, window);
}

/** Each of x's floats rounded to the nearest bf16 or f16 (ties to even; f16 beyond ±65504 is infinity), as bits into out. */
export function narrow(out: HalfMatrix, x: Float32Array): void {
  const kernel = 'narrow';
  requireHalf(kernel, 'out', out);
  requireFloats(kernel, 'x', x);
  if (out.bits.length < x.length) throw new InvalidArgumentError(`${kernel}: out must hold x's ${x.length} values, got ${out.bits.length}`);
  if (overlaps(out.bits, x.length * 2, x, x.byteLength)) throw new InvalidArgumentError(`${kernel}: out must not overlap x`);
  native.kernels.narrow(out.bits, x, out.dtype, x.length);
}

/**
 * The threads this process's matmuls and attention use, the calling thread included (default 1).
 * A rank given several CPUs splits each kernel's independent parts (column blocks, heads) across
 * them; every output is still computed by one thread in one order, so results do not change.
 */
export function setKernelThreads(threads: number): void {
  requireDimension('setKernelThreads', 'threads', threads, 1);
  native.kernels.setThreads(threads);
}

export function kernelThreads(): number {
  return native.kernels.threads();
}
