/**
 * The key/value cache in blocks (lib/llm/cache-blocks.ts): blocks taken as sequences grow,
 * shared by a common prefix and copied only when written, freed and reused; and attention over a
 * cache in blocks giving what it gives over one contiguous cache.
 */
import { describe, expect, it } from 'vitest';
import { InvalidArgumentError } from '../../lib/index.js';
import { CacheBlocks } from '../../lib/llm/cache-blocks.js';
import { CACHE_BLOCK_POSITIONS, DeviceKernels, type DeviceBuffer } from '../../lib/llm/device-kernels.js';
import { stepLayout, type LayerStepSequence } from '../../lib/llm/device-layers.js';
import { attention } from '../../lib/llm/kernels.js';
import { roundToFp8 } from './fixtures/decoders.js';

const B = CACHE_BLOCK_POSITIONS;

describe('cache blocks', () => {
  it('hold a block per CACHE_BLOCK_POSITIONS positions, share a prefix, copy a shared block on its first write, and reuse freed blocks', () => {
    using kernels = DeviceKernels.create('cpu');
    const caches = new CacheBlocks(kernels, 1024);
    try {
      expect(B).toBe(16);
      caches.reserve(1, 40);
      expect(caches.heldBlocks(1)).toBe(3);
      expect(caches.blocksInUse).toBe(3);
      const slab = caches.bytes;
      expect(slab).toBeGreaterThanOrEqual(3 * 1024);
      caches.prepareWrite(1, 0, 40);
      caches.setLength(1, 40);

      // A prefix of 20 positions: blocks 0 and 1, the second in part; nothing copied yet.
      caches.share(2, 1, 20);
      expect(caches.length(2)).toBe(20);
      expect(caches.blocksOf(2)).toEqual(caches.blocksOf(1).slice(0, 2));
      expect(caches.blocksInUse).toBe(3);
      expect(caches.copies).toBe(0);

      // Sequence 2 writes position 20, in the shared block 1: it gets its own copy; block 0 stays shared.
      caches.reserve(2, 24);
      caches.prepareWrite(2, 20, 24);
      expect(caches.copies).toBe(1);
      expect(caches.blocksOf(2)[0]).toBe(caches.blocksOf(1)[0]);
      expect(caches.blocksOf(2)[1]).not.toBe(caches.blocksOf(1)[1]);
      expect(caches.blocksInUse).toBe(4);
      caches.setLength(2, 24);

      // Writes past the shared blocks copy nothing.
      caches.reserve(2, 40);
      caches.prepareWrite(2, 24, 40);
      expect(caches.copies).toBe(1);

      // The wrong past, or no room, is refused with what is wrong.
      expect(() => caches.prepareWrite(2, 30, 31)).toThrow(/says 30 tokens came before, this rank has read 24/);
      expect(() => caches.prepareWrite(2, 24, 49)).toThrow(InvalidArgumentError);
      expect(() => caches.share(3, 9, 4)).toThrow(/which this rank holds none of/);
      expect(() => caches.share(2, 1, 4)).toThrow(/already holds it/);

      // A rewind keeps the blocks its positions need; a release frees the rest.
      caches.truncate(1, 10);
      expect(caches.heldBlocks(1)).toBe(1);
      expect(caches.length(1)).toBe(10);
      caches.release(2);
      expect(caches.blocksInUse).toBe(1);
      caches.release(1);
      expect(caches.blocksInUse).toBe(0);
      expect(caches.sequences).toBe(0);

      // Freed blocks are reused: many sequences of many lengths, one after another, take no new slab.
      for (let id = 10; id < 60; id++) {
        caches.reserve(id, 1 + ((id * 7) % 48));
        caches.release(id);
      }
      expect(caches.bytes).toBe(slab);
    } finally {
      caches.close();
    }
    expect(caches.bytes).toBe(0);
  });

  it('grows by slabs when the blocks in hand run out', () => {
    using kernels = DeviceKernels.create('cpu');
    const blockBytes = 4 * 2 ** 20;
    const caches = new CacheBlocks(kernels, blockBytes);
    const slab = CacheBlocks.slabBytes(blockBytes);
    expect(slab).toBe(8 * blockBytes);
    caches.reserve(1, 9 * B);
    expect(caches.bytes).toBe(2 * slab);
    expect(caches.blocksInUse).toBe(9);
    caches.close();
  });

  it('takes a whole budget at once when asked, and hands it out before growing again', () => {
    using kernels = DeviceKernels.create('cpu');
    const caches = new CacheBlocks(kernels, 1024);
    caches.ensureBlocks(20);
    expect(caches.bytes).toBe(20 * 1024);
    expect(caches.blocksInUse).toBe(0);
    caches.ensureBlocks(10);
    expect(caches.bytes).toBe(20 * 1024);
    caches.reserve(1, 20 * B);
    expect(caches.bytes).toBe(20 * 1024);
    // Past the budget taken, blocks come from a new slab as before.
    caches.reserve(2, 1);
    expect(caches.bytes).toBe(20 * 1024 + CacheBlocks.slabBytes(1024));
    caches.close();
  });

  it('takes a budget of millions of blocks without bookkeeping for blocks never used, addresses in order across slabs', () => {
    using kernels = DeviceKernels.create('cpu');
    // A small model on a large GPU: four million blocks, as a rank's whole budget at start.
    const caches = new CacheBlocks(kernels, 16);
    caches.ensureBlocks(4_000_000);
    expect(caches.bytes).toBe(64_000_000);
    expect(caches.blocksInUse).toBe(0);
    caches.reserve(1, 3 * B);
    const addresses = new Uint32Array(6);
    expect(caches.writeAddresses(1, addresses, 0, 3)).toBe(3);
    // Fresh blocks go out in address order, one block's bytes apart.
    expect(addresses[2] + addresses[3] * 2 ** 32 - (addresses[0] + addresses[1] * 2 ** 32)).toBe(16);
    expect(addresses[4] + addresses[5] * 2 ** 32 - (addresses[2] + addresses[3] * 2 ** 32)).toBe(16);
    // A freed block is handed out before a fresh one: the last freed first.
    expect(caches.blocksOf(1)).toEqual([0, 1, 2]);
    caches.release(1);
    caches.reserve(2, 1);
    expect(caches.blocksOf(2)).toEqual([2]);
    expect(caches.blocksInUse).toBe(1);
    caches.close();
    // Across slabs: a shared block written copies from one slab into another.
    const small = new CacheBlocks(kernels, 1024);
    small.ensureBlocks(1);
    small.reserve(1, B);
    small.prepareWrite(1, 0, B);
    small.setLength(1, B);
    small.share(2, 1, 10);
    small.reserve(2, B);
    small.prepareWrite(2, 10, B);
    expect(small.copies).toBe(1);
    expect(small.bytes).toBe(1024 + CacheBlocks.slabBytes(1024));
    small.close();
  });
});

/** Random values in [-1, 1), the same for a seed. */
function randomArray(length: number, seed: number): Float32Array {
  let state = seed >>> 0;
  const values = new Float32Array(length);
  for (let index = 0; index < length; index++) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    values[index] = state / 2 ** 31 - 1;
  }
  return values;
}

describe('attention over a cache in blocks', () => {
  for (const [window, cache] of [[0, 'f32'], [12, 'f32'], [0, 'fp8'], [12, 'fp8']] as const) {
    it(`equals attention over one contiguous cache (to f32 rounding), through prompt pieces, a shared prefix written after and decoding (window ${window}, ${cache} cache)`, () => {
      using kernels = DeviceKernels.create('cpu');
      const layers = 2;
      const layer = 1;
      const heads = 4;
      const kvHeads = 2;
      const headSize = 8;
      const rowSize = kvHeads * headSize;
      const width = (heads + 2 * kvHeads) * headSize;
      const caches = new CacheBlocks(kernels, B * layers * 2 * rowSize * (cache === 'fp8' ? 1 : 4));
      const shape = { heads, kvHeads, headSize, cache };
      // An fp8 cache rounds each key and value as it enters: the reference attends to the rounded values.
      const rounded = (values: Float32Array) => (cache === 'fp8' ? Float32Array.from(values, roundToFp8) : values);
      // Every position's fused projection row, per sequence: sequence 2 starts from sequence 1's first 21.
      const rowsOf = new Map<number, Float32Array[]>([
        // Scaled so an fp8 cache sees values from its subnormals to past its largest (saturated).
        [1, Array.from({ length: 60 }, (_, position) => randomArray(width, 1000 + position).map((value, index) => value * 2 ** ((index % 24) - 6)))],
        [2, []],
      ]);
      const buffers: DeviceBuffer[] = [];
      const step = (sequences: LayerStepSequence[]) => {
        const rows = sequences.reduce((sum, sequence) => sum + sequence.count, 0);
        const qkvHost = new Float32Array(rows * width);
        let row = 0;
        for (const sequence of sequences) {
          for (let position = sequence.past; position < sequence.past + sequence.count; position++) qkvHost.set(rowsOf.get(sequence.id)![position], width * row++);
        }
        for (const sequence of sequences) caches.reserve(sequence.id, sequence.past + sequence.count);
        const layout = stepLayout(kernels, caches, sequences, rows);
        const qkv = kernels.allocate(qkvHost.byteLength);
        const queries = kernels.allocate(rows * heads * headSize * 4);
        const out = kernels.allocate(rows * heads * headSize * 4);
        buffers.push(layout.buffer, qkv, queries, out);
        kernels.upload(qkv, qkvHost);
        kernels.prepareAttention(queries, qkv, layout, shape, layer, null, null);
        kernels.attention(out, queries, layout, shape, layer, window);
        const result = new Float32Array(rows * heads * headSize);
        kernels.download(result, out);
        for (const sequence of sequences) caches.setLength(sequence.id, sequence.past + sequence.count);
        // The contiguous reference: each sequence's keys and values side by side.
        const expected = new Float32Array(rows * heads * headSize);
        row = 0;
        for (const sequence of sequences) {
          const known = rowsOf.get(sequence.id)!.slice(0, sequence.past + sequence.count);
          const keys = new Float32Array(known.length * rowSize);
          const values = new Float32Array(known.length * rowSize);
          known.forEach((projection, position) => {
            keys.set(rounded(projection.subarray(heads * headSize, (heads + kvHeads) * headSize)), position * rowSize);
            values.set(rounded(projection.subarray((heads + kvHeads) * headSize)), position * rowSize);
          });
          const q = new Float32Array(sequence.count * heads * headSize);
          for (let index = 0; index < sequence.count; index++) q.set(known[sequence.past + index].subarray(0, heads * headSize), index * heads * headSize);
          const target = new Float32Array(sequence.count * heads * headSize);
          attention(target, q, keys, values, sequence.count, sequence.past, heads, headSize, kvHeads, window);
          expected.set(target, row * heads * headSize);
          row += sequence.count;
        }
        // The same dot products and sums in the same order; a run of keys cut at a block's end may
        // take another of the dot kernel's tile shapes, which rounds its last bit differently.
        const scale = Math.max(1, ...expected.map(Math.abs));
        result.forEach((value, index) => expect(Math.abs(value - expected[index])).toBeLessThan(1e-6 * scale));
      };
      try {
        step([{ id: 1, past: 0, count: 7 }]);
        step([{ id: 1, past: 7, count: 14 }]);
        // Sequence 2 shares 21 positions (blocks 0 and 1, the second in part), then writes its own.
        caches.share(2, 1, 21);
        rowsOf.set(2, [...rowsOf.get(1)!.slice(0, 21), ...Array.from({ length: 30 }, (_, index) => randomArray(width, 5000 + index).map((value, element) => value * 2 ** ((element % 24) - 6)))]);
        step([{ id: 1, past: 21, count: 19 }, { id: 2, past: 21, count: 3 }]);
        // Sequence 1 writes first: it takes a copy of block 1, which is then sequence 2's alone.
        expect(caches.copies).toBe(1);
        for (let past = 40; past < 46; past++) step([{ id: 2, past: past - 16, count: 1 }, { id: 1, past, count: 1 }]);
        step([{ id: 2, past: 30, count: 17 }, { id: 1, past: 46, count: 1 }]);
      } finally {
        for (const buffer of buffers) buffer.free();
        caches.close();
      }
    });
  }
});

/** The value of e4m3fn code `code`, from the format's definition. */
function fp8Value(code: number): number {
  const sign = code & 0x80 ? -1 : 1;
  const exponent = (code >> 3) & 0xf;
  const mantissa = code & 0x7;
  if (exponent === 0xf && mantissa === 0x7) return NaN;
  return exponent === 0 ? sign * mantissa * 2 ** -9 : sign * (1 + mantissa / 8) * 2 ** (exponent - 7);
}

describe('an fp8 cache', () => {
  it('keeps each value as e4m3fn rounds it: every code exactly, ties to even, subnormals, saturation at ±448, NaN', () => {
    const values: number[] = [];
    const finite = Array.from({ length: 256 }, (_, code) => fp8Value(code)).filter((value) => !Number.isNaN(value));
    values.push(...finite);
    const magnitudes = [...new Set(finite.map(Math.abs))].sort((a, b) => a - b);
    for (let index = 0; index + 1 < magnitudes.length; index++) {
      const middle = (magnitudes[index] + magnitudes[index + 1]) / 2;
      const gap = magnitudes[index + 1] - magnitudes[index];
      values.push(middle, -middle, middle - gap / 64, middle + gap / 64);
    }
    values.push(448, 455.9, 456, 463.99, 464, 470, 1e6, Infinity, -Infinity, -1e6, 2 ** -10, 3 * 2 ** -10, 2 ** -11, -(2 ** -12), 0, -0, NaN, 1 / 3, Math.PI, -Math.E);
    using kernels = DeviceKernels.create('cpu');
    const headSize = 64;
    const width = 3 * headSize;
    const caches = new CacheBlocks(kernels, B * 2 * headSize);
    const shape = { heads: 1, kvHeads: 1, headSize, cache: 'fp8' as const };
    // One sequence per row of values, its only position attending to itself: its output is its
    // value row widened from the cache, exactly (a softmax over one key weighs it 1).
    const rows = Math.ceil(values.length / headSize);
    const qkvHost = new Float32Array(rows * width);
    values.forEach((value, index) => (qkvHost[Math.floor(index / headSize) * width + 2 * headSize + (index % headSize)] = value));
    const sequences = Array.from({ length: rows }, (_, id) => ({ id, past: 0, count: 1 }));
    for (const sequence of sequences) caches.reserve(sequence.id, 1);
    const layout = stepLayout(kernels, caches, sequences, rows);
    const qkv = kernels.allocate(qkvHost.byteLength);
    const queries = kernels.allocate(rows * headSize * 4);
    const out = kernels.allocate(rows * headSize * 4);
    try {
      kernels.upload(qkv, qkvHost);
      kernels.prepareAttention(queries, qkv, layout, shape, 0, null, null);
      kernels.attention(out, queries, layout, shape, 0, 0);
      const result = new Float32Array(rows * headSize);
      kernels.download(result, out);
      // (A zero's sign does not survive the weighted sum, 0 + -0 being 0: zeros compare equal.)
      const same = (got: number, wanted: number) => got === wanted || (Number.isNaN(got) && Number.isNaN(wanted));
      const wrong = values.flatMap((value, index) => (same(result[index], roundToFp8(value)) ? [] : [`${value} → ${result[index]} (wanted ${roundToFp8(value)})`]));
      expect(wrong).toEqual([]);
      expect(values.length).toBeGreaterThan(700);
    } finally {
      for (const buffer of [layout.buffer, qkv, queries, out]) buffer.free();
      caches.close();
    }
  });
});
