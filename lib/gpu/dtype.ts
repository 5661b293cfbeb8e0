/** Tensor element types, their sizes and the TypedArrays that hold them on the CPU. */
import { InvalidArgumentError } from '../errors.js';

export type DType = 'f32' | 'f16' | 'bf16' | 'i8' | 'u8' | 'i32' | 'i64';

export const DTYPES: readonly DType[] = ['f32', 'f16', 'bf16', 'i8', 'u8', 'i32', 'i64'];

/** f16 and bf16 have no TypedArray in Node 20: their raw 16-bit patterns live in Uint16Arrays. */
export type HostArray = Float32Array | Uint16Array | Int8Array | Uint8Array | Int32Array | BigInt64Array;

export const BYTES_PER_ELEMENT: Record<DType, number> = { f32: 4, f16: 2, bf16: 2, i8: 1, u8: 1, i32: 4, i64: 8 };

const constructors = {
  f32: Float32Array,
  f16: Uint16Array,
  bf16: Uint16Array,
  i8: Int8Array,
  u8: Uint8Array,
  i32: Int32Array,
  i64: BigInt64Array,
} as const;

export function assertDType(dtype: unknown): asserts dtype is DType {
  if (!DTYPES.includes(dtype as DType)) {
    throw new InvalidArgumentError(`dtype must be one of ${DTYPES.join(', ')}, got ${String(dtype)}`, 'ERR_INVALID_DTYPE');
  }
}

/** A typed view of `bytes` for `dtype` (no copy). */
export function viewAs(dtype: DType, buffer: ArrayBufferLike, byteOffset: number, length: number): HostArray {
  const constructor = constructors[dtype];
  return new constructor(buffer as ArrayBuffer, byteOffset, length) as HostArray;
}

export function allocateHost(dtype: DType, length: number): HostArray {
  return new constructors[dtype](length) as HostArray;
}

/** The dtype a TypedArray maps to without conversion, if any. */
export function dtypeOf(array: ArrayBufferView): DType | undefined {
  if (array instanceof Float32Array) return 'f32';
  if (array instanceof Int8Array) return 'i8';
  if (array instanceof Uint8Array) return 'u8';
  if (array instanceof Int32Array) return 'i32';
  if (array instanceof BigInt64Array) return 'i64';
  return undefined;
}

// Half-precision conversions, for toArray()/fromArray() of f16 and bf16 tensors on the CPU.
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

export function floatToBf16(value: number): number {
  f32[0] = value;
  return floatBitsToBf16(u32[0]);
}

/** f32 bits (as a Uint32Array holds them) to bf16 bits, rounding to nearest even; NaN becomes the quiet NaN. */
export function floatBitsToBf16(bits: number): number {
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x7fffff) !== 0) return 0x7fc0;
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

export function bf16ToFloat(bits: number): number {
  u32[0] = bits << 16;
  return f32[0];
}

/** f32 bits (as a Uint32Array holds them) to f16 bits, rounding to nearest even. */
export function floatBitsToF16(bits: number): number {
  const sign = (bits >>> 16) & 0x8000;
  const magnitude = bits & 0x7fffffff;
  if (magnitude >= 0x7f800000) return sign | 0x7c00 | (magnitude > 0x7f800000 ? 0x200 : 0);
  // 65520, halfway between the largest half (65504) and 2^16, rounds to even: infinity.
  if (magnitude >= 0x477ff000) return sign | 0x7c00;
  if (magnitude < 0x38800000) {
    // Below 2^-14: a subnormal half, counting units of 2^-24. 2^-25 and below round to zero.
    if (magnitude <= 0x33000000) return sign;
    const shift = 126 - (magnitude >>> 23);
    const mantissa = (magnitude & 0x7fffff) | 0x800000;
    let units = mantissa >>> shift;
    const remainder = mantissa & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (remainder > halfway || (remainder === halfway && (units & 1) !== 0)) units++;
    return sign | units;
  }
  // Rebias the exponent (127 to 15) and keep the top ten mantissa bits; a carry out of the mantissa correctly bumps the exponent.
  let result = (magnitude >>> 13) - (112 << 10);
  const remainder = magnitude & 0x1fff;
  if (remainder > 0x1000 || (remainder === 0x1000 && (result & 1) !== 0)) result++;
  return sign | result;
}

export function floatToF16(value: number): number {
  f32[0] = value;
  return floatBitsToF16(u32[0]);
}

export function f16ToFloat(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >>> 10) & 0x1f;
  const mantissa = bits & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  if (exponent === 0x1f) return mantissa ? NaN : sign * Infinity;
  return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
}
