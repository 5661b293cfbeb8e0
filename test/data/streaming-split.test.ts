/**
 * Dataset.streamingSplit: one run of the plan dealt out to iterators that tasks consume at once,
 * every row to exactly one of them; with `equal`, the same number to each; a failed run fails
 * every iterator, naming the cause.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fromItems, get, init, InvalidArgumentError, shutdown, state } from '../../lib/index.js';
import { consumeSplit, consumeSplitPartly, consumeSplitRows, double, failOn } from './fixtures/udfs.js';

beforeAll(async () => {
  await init({ numCpus: 4 });
});

afterAll(async () => {
  await shutdown();
});

const items = (count: number) => Array.from({ length: count }, (_, id) => ({ id }));

describe('streamingSplit', () => {
  it('deals one run to consumers at once, every row to exactly one of them, the faster taking more', async () => {
    const dataset = fromItems(items(1000), { parallelism: 40 }).map(double);
    const iterators = dataset.streamingSplit(3);
    expect(iterators.map((iterator) => iterator.index)).toEqual([0, 1, 2]);
    // The first consumer is slow: the others take more of the blocks.
    const results = await get(iterators.map((iterator, index) => consumeSplit.remote(iterator, 64, index === 0 ? 40 : 0)));
    const all = results.flatMap((result) => result.ids).sort((a, b) => a - b);
    expect(all).toEqual(items(1000).map((item) => item.id));
    for (const result of results) expect(result.sizes.slice(0, -1).every((size) => size === 64)).toBe(true);
    expect(results[0].ids.length).toBeLessThan(Math.max(results[1].ids.length, results[2].ids.length));
    // The run is over and its queues are gone.
    await expect.poll(() => state().actors.filter((actor) => actor.className === 'QueueActor' && actor.state === 'alive').length, { timeout: 10_000 }).toBe(0);
  });

  it('gives each consumer the same number of rows with equal, dropping fewer than n, and rows one at a time', async () => {
    // Blocks of uneven sizes: 1,003 rows in 7 read tasks.
    const iterators = fromItems(items(1003), { parallelism: 7 }).streamingSplit(3, { equal: true });
    const results = await get(iterators.map((iterator) => consumeSplit.remote(iterator, 100)));
    expect(results.map((result) => result.ids.length)).toEqual([334, 334, 334]);
    const all = results.flatMap((result) => result.ids);
    expect(new Set(all).size).toBe(1002);
    expect(all.every((id) => id >= 0 && id < 1003)).toBe(true);
    // The driver's iterBatches with a local shuffle buffer: every row once, mixed.
    const shuffled: number[] = [];
    for await (const batch of fromItems(items(300), { parallelism: 6 }).iterBatches({ batchSize: 50, localShuffleBufferSize: 100, localShuffleSeed: 1 })) shuffled.push(...Array.from((batch as unknown as { id: ArrayLike<number> }).id));
    expect([...shuffled].sort((a, b) => a - b)).toEqual(items(300).map((item) => item.id));
    expect(shuffled).not.toEqual(items(300).map((item) => item.id));
    const rows = await get(fromItems(items(10), { parallelism: 3 }).streamingSplit(2, { equal: true }).map((iterator) => consumeSplitRows.remote(iterator)));
    expect(rows.map((ids) => ids.length)).toEqual([5, 5]);
    expect(rows.flat().sort((a, b) => a - b)).toEqual(items(10).map((item) => item.id));
  });

  it("drops the share of a consumer that stops reading, and fails the others rather than hang when one's process dies", async () => {
    // Shared queue: one consumer leaves after 2 batches; the other reads every row it did not.
    const shared = fromItems(items(400), { parallelism: 20 }).streamingSplit(2);
    const [partial, rest] = await Promise.all([get(consumeSplitPartly.remote(shared[0], 2)), get(consumeSplit.remote(shared[1], 10))]);
    expect(partial).toHaveLength(20);
    expect(new Set([...partial, ...rest.ids]).size).toBe(partial.length + rest.ids.length);
    // The leaver took its blocks whole: rows past its break are the only ones missing.
    expect(rest.ids.length).toBeGreaterThanOrEqual(400 - 20 - 20 * 2);
    // Equal: one consumer's process dies mid-read; the others fail, naming it, instead of waiting on its full queue.
    const equal = fromItems(items(1200), { parallelism: 40 }).streamingSplit(3, { equal: true });
    const outcomes = await Promise.allSettled([get(consumeSplitPartly.remote(equal[0], 1, true)), get(consumeSplit.remote(equal[1], 10)), get(consumeSplit.remote(equal[2], 10))]);
    expect(outcomes[0].status).toBe('rejected');
    for (const outcome of outcomes.slice(1)) {
      expect(outcome.status).toBe('rejected');
      expect(String((outcome as PromiseRejectedResult).reason)).toMatch(/iterator 0's consumer \(worker .*\) died while reading its share/);
    }
    await expect.poll(() => state().actors.filter((actor) => actor.className === 'QueueActor' && actor.state === 'alive').length, { timeout: 15_000 }).toBe(0);
  });

  it('fails every iterator when the run fails, and refuses what it cannot split', async () => {
    const iterators = fromItems(items(200), { parallelism: 10 }).map(failOn, { fnArgs: [150] }).streamingSplit(2);
    const outcomes = await Promise.allSettled(iterators.map((iterator) => get(consumeSplit.remote(iterator, 10))));
    for (const outcome of outcomes) {
      expect(outcome.status).toBe('rejected');
      expect(String((outcome as PromiseRejectedResult).reason)).toMatch(/streamingSplit: the dataset's run failed: .*150/);
    }
    expect(() => fromItems(items(3)).streamingSplit(0)).toThrow(InvalidArgumentError);
    expect(() => fromItems(items(3)).streamingSplit(2, { equal: 'yes' as never })).toThrow(/equal must be a boolean/);
  });
});
