/**
 * A streaming split's locality hints on a cluster of two nodes: each block goes to the iterator
 * whose node holds it (its consumer then reads the local store), and objectLocations names where
 * each object is.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DataContext, InvalidArgumentError, get, init, objectLocations, put, range, shutdown } from '../../lib/index.js';
import { consumeSplitByNode, tagWithNode } from './fixtures/udfs.js';

beforeAll(async () => {
  DataContext.progress = false;
  await init({ nodes: [{ id: 'alpha', numCpus: 2, resources: { alpha: 4 } }, { id: 'beta', numCpus: 2, resources: { beta: 4 } }] });
});

afterAll(async () => {
  await shutdown();
  DataContext.progress = 'auto';
});

/** Two blocks of 20,000 rows made on `node` (larger than a value sent inline: each is stored there). */
const madeOn = (node: string) => range(40_000, { parallelism: 2, resources: { [node]: 1 } }).mapBatches(tagWithNode, { resources: { [node]: 1 } });

describe('streamingSplit locality hints', () => {
  it('objectLocations names the node whose store holds an object', () => {
    const stored = put(new Uint8Array(1 << 20));
    const [location] = objectLocations(stored);
    expect(location).toMatchObject({ nodeIds: ['alpha'], ready: true });
    expect(location.bytes).toBeGreaterThanOrEqual(1 << 20);
    expect(objectLocations([put(1)])[0].nodeIds).toEqual([]);
    expect(() => objectLocations(['not a ref'] as never)).toThrow(InvalidArgumentError);
  });

  it('deals each block to the iterator on its node: every row read where it was made', async () => {
    const dataset = madeOn('alpha').union(madeOn('beta'));
    // Hints in the other order than the nodes were made: iterator 0 reads on beta.
    const iterators = dataset.streamingSplit(2, { localityHints: ['beta', 'alpha'] });
    const results = await get([
      consumeSplitByNode.options({ resources: { beta: 1 } }).remote(iterators[0]),
      consumeSplitByNode.options({ resources: { alpha: 1 } }).remote(iterators[1]),
    ]);
    expect(results.map((result) => result.where)).toEqual(['beta', 'alpha']);
    // Each node made two blocks and each queue holds two: a near queue is never full, so no block goes far.
    expect(results[0].rowsByNode).toEqual({ beta: 40_000 });
    expect(results[1].rowsByNode).toEqual({ alpha: 40_000 });
    expect(results.map((result) => result.stats)).toEqual([
      { blocks: 2, rows: 40_000, localBlocks: 2 },
      { blocks: 2, rows: 40_000, localBlocks: 2 },
    ]);
  });

  it('with equal, prefers the near iterator among those tied for fewest rows, and every share is equal', async () => {
    const iterators = madeOn('alpha').union(madeOn('beta')).streamingSplit(2, { equal: true, localityHints: ['alpha', 'beta'] });
    const results = await get([
      consumeSplitByNode.options({ resources: { alpha: 1 } }).remote(iterators[0]),
      consumeSplitByNode.options({ resources: { beta: 1 } }).remote(iterators[1]),
    ]);
    expect(results.map((result) => result.stats.rows)).toEqual([40_000, 40_000]);
    const total = (node: string) => results.reduce((sum, result) => sum + (result.rowsByNode[node] ?? 0), 0);
    expect([total('alpha'), total('beta')]).toEqual([40_000, 40_000]);
    // A block is marked near exactly when its iterator's node made it.
    for (const [index, result] of results.entries()) {
      expect(result.stats.localBlocks).toBeLessThanOrEqual(result.stats.blocks);
      if (result.stats.localBlocks === result.stats.blocks) expect(Object.keys(result.rowsByNode)).toEqual([['alpha', 'beta'][index]]);
    }
  });

  it('refuses hints that are not one node id per iterator', () => {
    const dataset = range(10);
    expect(() => dataset.streamingSplit(2, { localityHints: ['alpha'] })).toThrow(/one node id per iterator \(2\)/);
    expect(() => dataset.streamingSplit(2, { localityHints: ['alpha', 'gamma'] })).toThrow(/name no node of the cluster: gamma \(its nodes: alpha, beta\)/);
  });
});
