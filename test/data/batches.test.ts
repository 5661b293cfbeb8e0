/**
 * Cutting a stream of blocks into a consumer's batches (lib/data/batches.ts): exact batch sizes
 * across block edges, and a local shuffle's draws (every row once, mixed across blocks, the same
 * for the same seed).
 */
import { describe, expect, it } from 'vitest';
import { rowsToBlock, type Block } from '../../lib/index.js';
import { checkLocalShuffle, rebatch } from '../../lib/data/batches.js';

/** 1,000 rows (ids 0 to 999) in 10 blocks of 100. */
async function* tenBlocks(): AsyncGenerator<Block> {
  for (let block = 0; block < 10; block++) yield rowsToBlock(Array.from({ length: 100 }, (_, row) => ({ id: block * 100 + row })));
}

async function batchesOf(shuffle?: { bufferSize: number; seed?: number }, batchSize: number | null = 32): Promise<number[][]> {
  const batches: number[][] = [];
  for await (const batch of rebatch(tenBlocks(), batchSize, 'columns', shuffle)) batches.push(Array.from((batch as { id: Int32Array }).id));
  return batches;
}

describe('rebatch', () => {
  it('cuts batches of exactly batchSize rows across block edges, in order, the last one shorter', async () => {
    const batches = await batchesOf();
    expect(batches.slice(0, -1).every((batch) => batch.length === 32)).toBe(true);
    expect(batches.at(-1)).toHaveLength(1000 % 32);
    expect(batches.flat()).toEqual(Array.from({ length: 1000 }, (_, id) => id));
    expect((await batchesOf(undefined, null)).map((batch) => batch.length)).toEqual(Array(10).fill(100));
  });

  it('draws batches at random from a local shuffle buffer: every row once, mixed across blocks, the same for the same seed', async () => {
    const batches = await batchesOf({ bufferSize: 250, seed: 7 });
    expect(batches.slice(0, -1).every((batch) => batch.length === 32)).toBe(true);
    const ids = batches.flat();
    expect(ids).toHaveLength(1000);
    expect([...ids].sort((a, b) => a - b)).toEqual(Array.from({ length: 1000 }, (_, id) => id));
    expect(ids).not.toEqual(Array.from({ length: 1000 }, (_, id) => id));
    // The first batch is drawn once the buffer holds 250 rows past a batch: rows of three blocks at least.
    expect(new Set(batches[0].map((id) => Math.floor(id / 100))).size).toBeGreaterThanOrEqual(2);
    expect(await batchesOf({ bufferSize: 250, seed: 7 })).toEqual(batches);
    expect(await batchesOf({ bufferSize: 250, seed: 8 })).not.toEqual(batches);
    expect(() => checkLocalShuffle(100, undefined, null, 'iterBatches()')).toThrow(/a local shuffle draws batches of batchSize rows/);
    expect(() => checkLocalShuffle(0, undefined, 32, 'iterBatches()')).toThrow(/localShuffleBufferSize must be a positive integer/);
    expect(() => checkLocalShuffle(undefined, 3, 32, 'iterBatches()')).toThrow(/localShuffleSeed needs localShuffleBufferSize/);
  });
});
