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
  for (const window of [0, 12]) {
    it(`equals attention over one contiguous cache (to f32 rounding), through prompt pieces, a shared prefix written after and decoding (window ${window})`, () => {
      using kernels = DeviceKernels.create('cpu');
      const layers = 2;
      const layer = 1;
      const heads = 4;
      const kvHeads = 2;
      const headSize = 8;
      const rowSize = kvHeads * headSize;
      const width = (heads + 2 * kvHeads) * headSize;
      const caches = new CacheBlocks(kernels, B * layers * 2 * rowSize * 4);
      const shape = { heads, kvHeads, headSize, cache: 'f32' as const };
      // Every position's fused projection row, per sequence: sequence 2 starts from sequence 1's first 21.
      const rowsOf = new Map<number, Float32Array[]>([
        [1, Array.from({ length: 60 }, (_, position) => randomArray(width, 1000 + position))],
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
            keys.set(projection.subarray(heads * headSize, (heads + kvHeads) * headSize), position * rowSize);
            values.set(projection.subarray((heads + kvHeads) * headSize), position * rowSize);
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
        result.forEach((value, index) => expect(Math.abs(value - expected[index])).toBeLessThan(1e-6));
      };
      try {
        step([{ id: 1, past: 0, count: 7 }]);
        step([{ id: 1, past: 7, count: 14 }]);
        // Sequence 2 shares 21 positions (blocks 0 and 1, the second in part), then writes its own.
        caches.share(2, 1, 21);
        rowsOf.set(2, [...rowsOf.get(1)!.slice(0, 21), ...Array.from({ length: 30 }, (_, index) => randomArray(width, 5000 + index))]);
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
