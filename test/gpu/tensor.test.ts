import { describe, expect, it } from 'vitest';
import { InvalidArgumentError, ObjectStore, Tensor, TrellisError, cuda, newObjectId } from '../../lib/index.js';
import { bf16ToFloat, f16ToFloat, floatToBf16, floatToF16 } from '../../lib/gpu/dtype.js';
import { decodeStored, encodeValue, pack, putStored, unpack } from '../../lib/core/serialization.js';

describe('Tensor', () => {
  it('holds every dtype with its shape, and round-trips values', () => {
    const values = [-3, -1, 0, 1, 2, 100];
    for (const dtype of ['f32', 'f16', 'bf16', 'i8', 'i32', 'i64'] as const) {
      const tensor = Tensor.fromArray(values, { dtype, shape: [2, 3] });
      expect(tensor.dtype).toBe(dtype);
      expect(tensor.shape).toEqual([2, 3]);
      expect(tensor.numel).toBe(6);
      expect(tensor.device).toBe('cpu');
      expect((tensor.toArray() as Array<number | bigint>).map(Number)).toEqual(values);
    }
    const bytes = Tensor.fromArray([0, 1, 255], { dtype: 'u8' });
    expect(bytes.byteLength).toBe(3);
    expect(Array.from(bytes.toArray() as number[])).toEqual([0, 1, 255]);
  });

  it('converts half precision with rounding to nearest', () => {
    for (const value of [0, 1, -2, 0.5, 65504, 1e-5, 3.140625]) {
      expect(f16ToFloat(floatToF16(value))).toBeCloseTo(value, 3);
      expect(bf16ToFloat(floatToBf16(value))).toBeCloseTo(value, value > 100 ? -2 : 1);
    }
    expect(f16ToFloat(floatToF16(1e6))).toBe(Infinity);
    expect(Number.isNaN(bf16ToFloat(floatToBf16(NaN)))).toBe(true);
    // Ties go to the even neighbour: 1 + 2^-11 is halfway between 1 and 1 + 2^-10.
    expect(f16ToFloat(floatToF16(1 + 2 ** -11))).toBe(1);
    expect(f16ToFloat(floatToF16(1 + 3 * 2 ** -11))).toBe(1 + 2 * 2 ** -10);
    expect(f16ToFloat(floatToF16(2 ** -25))).toBe(0);
    expect(f16ToFloat(floatToF16(3 * 2 ** -25))).toBe(2 ** -23);
  });

  it('wraps TypedArrays without copying and reshapes in place', () => {
    const array = new Float32Array([1, 2, 3, 4]);
    const tensor = Tensor.wrap(array, 'f32', [2, 2]);
    expect(tensor.data).toBe(array);
    const flat = tensor.reshape([4]);
    array[0] = 9;
    expect(flat.data[0]).toBe(9);
    expect(() => tensor.reshape([3])).toThrow(InvalidArgumentError);
  });

  it('clones into memory of its own', () => {
    const original = Tensor.fromArray([1, 2, 3, 4], { dtype: 'i32', shape: [2, 2] });
    const copy = original.clone();
    expect([copy.dtype, copy.shape, copy.device, copy.toArray()]).toEqual(['i32', [2, 2], 'cpu', [1, 2, 3, 4]]);
    (copy.data as Int32Array)[0] = 9;
    expect(original.toArray()).toEqual([1, 2, 3, 4]);
  });

  it('rejects bad dtypes, shapes and devices with typed errors', () => {
    expect(() => Tensor.fromArray([1], { dtype: 'f64' as 'f32' })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_DTYPE' }));
    expect(() => Tensor.fromArray([1, 2, 3], { shape: [2, 2] })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_SHAPE' }));
    expect(() => Tensor.empty([-1])).toThrow(expect.objectContaining({ code: 'ERR_INVALID_SHAPE' }));
    expect(() => Tensor.fromArray([1]).to('gpu0' as 'cpu')).toThrow(expect.objectContaining({ code: 'ERR_INVALID_DEVICE' }));
    expect(() => Tensor.wrap(new Float32Array(3), 'f32', [4])).toThrow(InvalidArgumentError);
  });

  it.skipIf(cuda.available)('reports CUDA tensors as unavailable on a host without CUDA', () => {
    const error = (() => {
      try {
        Tensor.fromArray([1, 2], { device: 'cuda:0' });
      } catch (caught) {
        return caught as TrellisError;
      }
    })();
    expect(error).toBeInstanceOf(TrellisError);
    expect(error?.code).toMatch(/^ERR_CUDA/);
    expect(() => Tensor.fromArray([1]).memory).toThrow(expect.objectContaining({ code: 'ERR_TENSOR_DEVICE' }));
  });

  it('crosses processes: small tensors inline, large ones zero-copy from the store', () => {
    const small = Tensor.fromArray([1, 2, 3], { dtype: 'bf16', shape: [3, 1] });
    const back = unpack(pack({ t: small })) as { t: Tensor };
    expect(back.t).toBeInstanceOf(Tensor);
    expect(back.t.shape).toEqual([3, 1]);
    expect(back.t.toArray()).toEqual([1, 2, 3]);

    const store = ObjectStore.create({ capacity: 64 << 20 });
    try {
      const large = Tensor.fromArray(Float32Array.from({ length: 100_000 }, (_, i) => i), { shape: [1000, 100] });
      const encoded = encodeValue(large);
      expect('stored' in encoded).toBe(true);
      if (!('stored' in encoded)) return;
      const id = newObjectId();
      putStored(store, id, encoded.stored);
      const view = store.getIfSealed(id)!;
      const read = decodeStored(view) as Tensor;
      expect(read.shape).toEqual([1000, 100]);
      expect(read.data[99_999]).toBe(99_999);
      // Zero-copy: the tensor's elements live in the store's shared memory.
      expect(read.data.buffer).toBe(view.data.buffer);
    } finally {
      store.close();
    }
  });
});
