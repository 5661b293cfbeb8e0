/**
 * Streaming split suite, on two logical nodes of this host (each its own store and workers).
 * Each node makes 64 blocks of 4 MiB (read tasks pinned to it) while a consumer on each node
 * reads a split of the union, each block stored where it was made. split_hinted_MBps:
 * with localityHints naming each consumer's node, a block is read from its own node's store;
 * split_unhinted_MBps, the baseline: the same split without hints, whichever consumer asks first
 * taking the next block, so about half are first copied from the other node's store. Start to
 * finish, consumers included; medians of three alternating rounds. split_hinted_far_share and
 * split_unhinted_far_share: the share of blocks a consumer read that another node made (each
 * block's values tell its node): on several hosts, the bytes that cross the network.
 */
import { DataContext, get, init, range, remote, shutdown, getRuntimeContext, type DataIterator, type Dataset } from '../lib/index.js';
import { elapsedSeconds, median, nowNs, round, type Results, type Suite } from './harness.js';

const BLOCKS_PER_NODE = 64;
const ROWS_PER_BLOCK = 512 * 1024; // float64: 4 MiB a block
const MiB = 1 << 20;

/** Values offset by the node that made them (1e12 on beta), so a consumer tells a far block by its first value. */
const BETA_OFFSET = 1e12;

export const fillBlock = remote(import.meta, function fillBlock(batch: { id: ArrayLike<number> }) {
  const offset = getRuntimeContext().nodeId === 'beta' ? BETA_OFFSET : 0;
  return { value: Float64Array.from(batch.id as ArrayLike<number>, (id) => id + offset) };
});

export const readShare = remote(import.meta, async function readShare(iterator: DataIterator) {
  let rows = 0;
  let farBlocks = 0;
  const node = getRuntimeContext().nodeId;
  for await (const batch of iterator.iterBatches({ batchSize: null, batchFormat: 'arrow' })) {
    const table = batch as { numRows: number; getChild(name: string): { get(index: number): number } | null };
    rows += table.numRows;
    const madeOn = table.getChild('value')!.get(0) >= BETA_OFFSET ? 'beta' : 'alpha';
    if (madeOn !== node) farBlocks++;
  }
  return { rows, node, farBlocks, stats: iterator.stats() };
});

const madeOn = (node: string) =>
  range(BLOCKS_PER_NODE * ROWS_PER_BLOCK, { parallelism: BLOCKS_PER_NODE, resources: { [node]: 1 } }).mapBatches(fillBlock, { resources: { [node]: 1 }, batchSize: null });

async function splitRate(made: Dataset, hinted: boolean): Promise<{ rate: number; far: number }> {
  const start = nowNs();
  const iterators = made.streamingSplit(2, hinted ? { localityHints: ['alpha', 'beta'] } : {});
  const results = await get([
    readShare.options({ resources: { alpha: 1 } }).remote(iterators[0]),
    readShare.options({ resources: { beta: 1 } }).remote(iterators[1]),
  ]);
  const seconds = elapsedSeconds(start);
  const rows = results.reduce((sum, result) => sum + result.rows, 0);
  if (rows !== 2 * BLOCKS_PER_NODE * ROWS_PER_BLOCK) throw new Error(`the split read ${rows} rows`);
  const blocks = results.reduce((sum, result) => sum + result.stats.blocks, 0);
  return { rate: (rows * 8) / MiB / seconds, far: results.reduce((sum, result) => sum + result.farBlocks, 0) / blocks };
}

export const splitSuite: Suite = {
  name: 'split',
  ratios: [
    ['a split with locality hints / without (each consumer takes the next block), making included', 'split_hinted_MBps', 'split_unhinted_MBps', ''],
    ['share of blocks read from another node: with hints / without', 'split_hinted_far_share', 'split_unhinted_far_share', ''],
  ],
  async run(): Promise<Results> {
    DataContext.progress = false;
    await init({ nodes: [{ id: 'alpha', numCpus: 2, resources: { alpha: 8 }, objectStoreMemory: 2 ** 30 }, { id: 'beta', numCpus: 2, resources: { beta: 8 }, objectStoreMemory: 2 ** 30 }] });
    try {
      // Streamed: both nodes make their blocks while the consumers read (a far read leaves a copy
      // on the reader's node, so a dataset materialized once would not stay where it was made).
      const fresh = () => madeOn('alpha').union(madeOn('beta'));
      await splitRate(fresh(), true); // warm-up: workers started on both nodes
      const hinted: number[] = [];
      const unhinted: number[] = [];
      const hintedFar: number[] = [];
      const unhintedFar: number[] = [];
      for (let round = 0; round < 3; round++) {
        const near = await splitRate(fresh(), true);
        const far = await splitRate(fresh(), false);
        hinted.push(near.rate);
        unhinted.push(far.rate);
        hintedFar.push(near.far);
        unhintedFar.push(far.far);
        console.error(`round ${round}: hinted ${near.rate.toFixed(0)} MB/s (${(near.far * 100).toFixed(0)}% of blocks read far), unhinted ${far.rate.toFixed(0)} MB/s (${(far.far * 100).toFixed(0)}% far)`);
      }
      return {
        split_hinted_MBps: { value: round(median(hinted), 0), unit: 'MB/s' },
        split_unhinted_MBps: { value: round(median(unhinted), 0), unit: 'MB/s' },
        split_hinted_far_share: { value: round(median(hintedFar), 3), unit: 'ratio' },
        split_unhinted_far_share: { value: round(median(unhintedFar), 3), unit: 'ratio' },
      };
    } finally {
      await shutdown();
    }
  },
};
