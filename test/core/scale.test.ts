/**
 * Scale: many small tasks, nested tasks that block inside workers (with every CPU taken by
 * parents), and a batch-inference task graph over a pool of actors.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { get, init, shutdown, state, wait } from '../../lib/index.js';
import { grandparent, parent, square } from './fixtures/core.js';
import { RemoteModel, readBlock, writeBlock } from './fixtures/pipeline.js';

beforeAll(async () => {
  await init({ numCpus: 2 });
});

afterAll(async () => {
  await shutdown();
});

const sumOfSquares = (n: number) => ((n - 1) * n * (2 * n - 1)) / 6;

describe('scale', () => {
  it('runs 10,000 small tasks', async () => {
    const refs = Array.from({ length: 10_000 }, (_, i) => square.remote(i));
    const values = await get(refs);
    expect(values).toHaveLength(10_000);
    for (let i = 0; i < values.length; i++) if (values[i] !== i * i) expect.fail(`task ${i} returned ${values[i]}`);
    const [ready] = await wait(refs.slice(0, 100), { numReturns: 100 });
    expect(ready).toHaveLength(100);
  });

  it('nested tasks finish when parents hold every CPU (4 parents on 2 CPUs)', async () => {
    const parents = Array.from({ length: 4 }, () => parent.remote(20));
    expect(await get(parents)).toEqual(Array(4).fill(sumOfSquares(20)));
  });

  it('two levels of nesting finish too', async () => {
    const roots = Array.from({ length: 2 }, () => grandparent.remote(3));
    expect(await get(roots)).toEqual(Array(2).fill(3 * sumOfSquares(3)));
  });

  it('runs a batch-inference graph: 200 reads, 200 map calls on 3 actors, 200 writes', async () => {
    const weight = 0.5;
    const pool = Array.from({ length: 3 }, () => RemoteModel.remote(weight));
    const blocks = 200;
    const writes = Array.from({ length: blocks }, (_, index) => {
      const block = readBlock.remote(index);
      const predictions = pool[index % pool.length].infer.remote(block);
      return writeBlock.remote(index, predictions);
    });
    const results = await get(writes);
    for (const result of results) {
      const size = result.index % 10 === 0 ? 20_000 : 500;
      const expected = weight * (result.index * 1e6 * size + ((size - 1) * size) / 2);
      expect(result.rows).toBe(size);
      expect(result.sum).toBeCloseTo(expected, 0);
    }
    expect(results.map((result) => result.index)).toEqual(Array.from({ length: blocks }, (_, i) => i));
    // Round-robin: each actor took its share, and loaded its model once (no restarts).
    const processed = await get(pool.map((actor) => actor.stats.remote()));
    expect(processed.map((stats) => stats.processed)).toEqual([67, 67, 66]);
    for (const actor of pool) {
      expect(state().actors.find((candidate) => candidate.actorId === actor.actorId)).toMatchObject({ state: 'alive', restarts: 0 });
    }
  });
});
