/**
 * Tensors: a dtype, a shape and a device ('cpu' or 'cuda:N'). CPU tensors sit on TypedArrays —
 * including views of the object store, so a tensor read from the store is zero-copy. CUDA tensors
 * own device memory from the caching allocator (or memory mapped from another process by IPC).
 */
import { InvalidArgumentError, TrellisError } from '../errors.js';
import { cuda } from './cuda.js';
import type { DeviceMemory } from './cuda-types.js';
import {
  BYTES_PER_ELEMENT,
  allocateHost,
  assertDType,
  bf16ToFloat,
  dtypeOf,
  f16ToFloat,
  floatToBf16,
  floatToF16,
  viewAs,
  type DType,
  type HostArray,
} from './dtype.js';

export type Device = 'cpu' | `cuda:${number}`;

export interface TensorOptions {
  dtype?: DType;
  shape?: readonly number[];
  device?: Device;
}

export function parseDevice(device: string): { kind: 'cpu' } | { kind: 'cuda'; index: number } {
  if (device === 'cpu') return { kind: 'cpu' };
  const match = /^cuda:(\d+)$/.exec(device);
  if (!match) throw new InvalidArgumentError(`device must be 'cpu' or 'cuda:N', got '${device}'`, 'ERR_INVALID_DEVICE');
  return { kind: 'cuda', index: Number(match[1]) };
}

function checkShape(shape: readonly number[]): number {
  let numel = 1;
  for (const dimension of shape) {
    if (!Number.isSafeInteger(dimension) || dimension < 0) {
      throw new InvalidArgumentError(`tensor shape [${shape.join(', ')}] must hold non-negative integers`, 'ERR_INVALID_SHAPE');
    }
    numel *= dimension;
  }
  return numel;
}

/** Tensors freed by the result they were returned into (see markFreedByResult). */
const freedByResult = new WeakSet<Tensor>();

export class Tensor {
  readonly dtype: DType;
  readonly shape: readonly number[];
  readonly device: Device;
  readonly numel: number;
  #host: HostArray | undefined;
  #memory: DeviceMemory | undefined;
  #freed = false;
  #onFreed: (() => void) | undefined;
  #whenFreed: Promise<void> | undefined;

  private constructor(dtype: DType, shape: readonly number[], device: Device, host?: HostArray, memory?: DeviceMemory) {
    this.dtype = dtype;
    this.shape = Object.freeze([...shape]);
    this.device = device;
    this.numel = checkShape(shape);
    this.#host = host;
    this.#memory = memory;
  }

  /** A CPU tensor over `array` without copying (e.g. a view of the object store). */
  static wrap(array: HostArray, dtype: DType, shape: readonly number[] = [array.length]): Tensor {
    assertDType(dtype);
    const numel = checkShape(shape);
    if (numel * BYTES_PER_ELEMENT[dtype] !== array.byteLength) {
      throw new InvalidArgumentError(
        `a ${dtype} tensor of shape [${shape.join(', ')}] needs ${numel * BYTES_PER_ELEMENT[dtype]} bytes; the array has ${array.byteLength}`,
        'ERR_INVALID_SHAPE',
      );
    }
    return new Tensor(dtype, shape, 'cpu', array);
  }

  /** A tensor on device memory this tensor takes ownership of. */
  static onDevice(memory: DeviceMemory, dtype: DType, shape: readonly number[]): Tensor {
    assertDType(dtype);
    const numel = checkShape(shape);
    if (numel * BYTES_PER_ELEMENT[dtype] > memory.byteLength) {
      throw new InvalidArgumentError(`device memory of ${memory.byteLength} bytes is too small for this tensor`, 'ERR_INVALID_SHAPE');
    }
    return new Tensor(dtype, shape, `cuda:${memory.device}`, undefined, memory);
  }

  /** Copies `values` (numbers, bigints or a TypedArray) into a new tensor. */
  static fromArray(values: ArrayLike<number> | ArrayLike<bigint> | ArrayBufferView, options: TensorOptions = {}): Tensor {
    const length = ArrayBuffer.isView(values) ? (values as unknown as ArrayLike<number>).length : values.length;
    const dtype = options.dtype ?? (ArrayBuffer.isView(values) ? dtypeOf(values) : undefined) ?? 'f32';
    assertDType(dtype);
    const shape = options.shape ?? [length];
    if (checkShape(shape) !== length) {
      throw new InvalidArgumentError(`shape [${shape.join(', ')}] holds ${checkShape(shape)} elements; ${length} values were given`, 'ERR_INVALID_SHAPE');
    }
    const host = allocateHost(dtype, length);
    const source = values as ArrayLike<number | bigint>;
    if (dtype === 'f16' || dtype === 'bf16') {
      const encode = dtype === 'f16' ? floatToF16 : floatToBf16;
      for (let i = 0; i < length; i++) host[i] = encode(Number(source[i]));
    } else if (dtype === 'i64') {
      for (let i = 0; i < length; i++) (host as BigInt64Array)[i] = BigInt(source[i]);
    } else {
      for (let i = 0; i < length; i++) (host as Float32Array)[i] = Number(source[i]);
    }
    const tensor = new Tensor(dtype, shape, 'cpu', host);
    return options.device && options.device !== 'cpu' ? tensor.#moveTo(options.device) : tensor;
  }

  static empty(shape: readonly number[], options: { dtype?: DType; device?: Device } = {}): Tensor {
    const dtype = options.dtype ?? 'f32';
    assertDType(dtype);
    const numel = checkShape(shape);
    const device = options.device ?? 'cpu';
    const parsed = parseDevice(device);
    if (parsed.kind === 'cpu') return new Tensor(dtype, shape, 'cpu', allocateHost(dtype, numel));
    return new Tensor(dtype, shape, device, undefined, cuda.allocate(parsed.index, numel * BYTES_PER_ELEMENT[dtype]));
  }

  static zeros(shape: readonly number[], options: { dtype?: DType; device?: Device } = {}): Tensor {
    const tensor = Tensor.empty(shape, options);
    tensor.#memory?.fill(0);
    return tensor;
  }

  get byteLength(): number {
    return this.numel * BYTES_PER_ELEMENT[this.dtype];
  }

  get isCuda(): boolean {
    return this.device !== 'cpu';
  }

  /** The elements of a CPU tensor, zero-copy (f16/bf16 as raw 16-bit patterns). */
  get data(): HostArray {
    if (!this.#host) throw new TrellisError('ERR_TENSOR_DEVICE', `tensor is on ${this.device}: call .cpu() to read its data`);
    return this.#host;
  }

  /** The device memory of a CUDA tensor. */
  get memory(): DeviceMemory {
    if (!this.#memory) throw new TrellisError('ERR_TENSOR_DEVICE', `tensor is on ${this.device}, not a CUDA device`);
    if (this.#freed && freedByResult.has(this)) {
      throw new TrellisError(
        'ERR_CUDA_FREED',
        `${this} was returned by a method with a tensorTransport, and its result freed it with its last ref; return tensor.share() to keep using it`,
      );
    }
    return this.#memory;
  }

  /** The raw bytes of a CPU tensor, zero-copy. */
  bytes(): Uint8Array {
    const host = this.data;
    return new Uint8Array(host.buffer, host.byteOffset, host.byteLength);
  }

  /** The values as plain numbers (bigints for i64); f16 and bf16 are widened. */
  toArray(): number[] | bigint[] {
    const host = this.#host ?? this.cpu().data;
    if (this.dtype === 'f16') return Array.from(host as Uint16Array, f16ToFloat);
    if (this.dtype === 'bf16') return Array.from(host as Uint16Array, bf16ToFloat);
    if (this.dtype === 'i64') return Array.from(host as BigInt64Array);
    return Array.from(host as Float32Array);
  }

  /** The same values on `device` (this tensor itself when already there). */
  to(device: Device): Tensor {
    parseDevice(device);
    return device === this.device ? this : this.#moveTo(device);
  }

  cpu(): Tensor {
    return this.to('cpu');
  }

  /** A copy in memory of its own on the same device (for a CUDA tensor, a device-to-device copy). */
  clone(): Tensor {
    if (this.device === 'cpu') return Tensor.wrap(this.data.slice(), this.dtype, this.shape);
    const copy = Tensor.empty(this.shape, { dtype: this.dtype, device: this.device });
    copy.memory.copyFromDevice(this.memory, this.byteLength);
    return copy;
  }

  /** A tensor with the same data and a new shape of the same element count (CPU: no copy). */
  reshape(shape: readonly number[]): Tensor {
    if (checkShape(shape) !== this.numel) {
      throw new InvalidArgumentError(`cannot reshape ${this.numel} elements to [${shape.join(', ')}]`, 'ERR_INVALID_SHAPE');
    }
    return new Tensor(this.dtype, shape, this.device, this.#host, this.#memory);
  }

  /**
   * Another tensor over the same data, holding a share of it: freeing either leaves the data to the
   * other (device memory goes back once every share is freed or collected). A method with a
   * tensorTransport hands the tensors it returns over to its result, which frees them with its
   * last ref: to keep using a buffer (a cache, a CUDA graph's static output), return a share of
   * it, and `await share.whenFreed()` before writing the buffer again, when readers are done.
   */
  share(): Tensor {
    return new Tensor(this.dtype, this.shape, this.device, this.#host, this.#memory?.share());
  }

  /**
   * Resolves once free() has been called on this tensor: by its owner, or by the runtime for a
   * tensor returned with a tensorTransport, when the result's last ref (readers' included) is
   * gone. A tensor collected without free() never resolves it.
   */
  whenFreed(): Promise<void> {
    if (this.#freed) return Promise.resolve();
    this.#whenFreed ??= new Promise((resolve) => (this.#onFreed = resolve));
    return this.#whenFreed;
  }

  /** Returns device memory to the allocator now rather than at garbage collection. */
  free(): void {
    this.#memory?.free();
    if (this.#freed) return;
    this.#freed = true;
    this.#onFreed?.();
  }

  [Symbol.dispose](): void {
    this.free();
  }

  toString(): string {
    return `Tensor(${this.dtype}, [${this.shape.join(', ')}], ${this.device})`;
  }

  #moveTo(device: Device): Tensor {
    const target = parseDevice(device);
    if (target.kind === 'cpu') {
      const host = allocateHost(this.dtype, this.numel);
      this.memory.copyToHost(host);
      return new Tensor(this.dtype, this.shape, 'cpu', host);
    }
    const memory = cuda.allocate(target.index, this.byteLength);
    // From another GPU: a peer copy, GPU to GPU.
    if (this.#host) memory.copyFromHost(this.#host);
    else memory.copyFromDevice(this.memory, this.byteLength);
    return new Tensor(this.dtype, this.shape, device, undefined, memory);
  }
}

/**
 * Frees a tensor returned with a tensor transport, as its result's last ref goes: the owner's
 * later use of it then fails with an error saying so, rather than only that memory was freed.
 */
export function freeAsResult(tensor: Tensor): void {
  freedByResult.add(tensor);
  tensor.free();
}

export { viewAs };
