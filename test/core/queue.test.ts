/**
 * Queue (as Ray's ray.util.queue.Queue): FIFO order, bounds with waiting and timeouts, the no-wait
 * and batch forms, producers and consumers in tasks, refs through a queue, and bad input.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ActorDiedError, InvalidArgumentError, Queue, QueueEmptyError, QueueFullError, get, init, put, shutdown } from '../../lib/index.js';
import { consume, produce, queueFromWorker, readRefFrom } from './fixtures/queue.js';

beforeAll(async () => {
  await init({ numCpus: 2 });
});

afterAll(async () => {
  await shutdown();
});

describe('Queue', () => {
  it('gives items back in order, and says its size', async () => {
    await using queue = new Queue<string>();
    expect(await queue.empty()).toBe(true);
    for (const item of ['a', 'b', 'c']) await queue.put(item);
    expect(await queue.size()).toBe(3);
    expect(await queue.full()).toBe(false);
    expect([await queue.get(), await queue.get(), await queue.get()]).toEqual(['a', 'b', 'c']);
    await expect(queue.getNowait()).rejects.toThrow(QueueEmptyError);
  });

  it('bounds its size: a put waits for room, and one that times out leaves nothing behind', async () => {
    await using queue = new Queue<number>({ maxSize: 2 });
    await queue.put(1);
    await queue.put(2);
    expect(await queue.full()).toBe(true);
    const failed = await queue.putNowait(3).catch((error: unknown) => error);
    expect(failed).toBeInstanceOf(QueueFullError);
    expect((failed as QueueFullError).code).toBe('ERR_QUEUE_FULL');
    await expect(queue.put(3, { timeout: 50 })).rejects.toThrow(/stayed full \(2 items\) for 50 ms/);
    // A waiting put goes in once a get makes room, in its turn.
    const waiting = queue.put(4);
    expect(await queue.get()).toBe(1);
    await waiting;
    expect(await queue.getNowaitBatch(2)).toEqual([2, 4]);
  });

  it('a get waits for an item; one that times out takes nothing', async () => {
    await using queue = new Queue<number>();
    await expect(queue.get({ timeout: 50 })).rejects.toThrow(/stayed empty for 50 ms/);
    const waiting = queue.get();
    await queue.put(7);
    expect(await waiting).toBe(7);
    await queue.put(8);
    expect(await queue.get({ block: false })).toBe(8);
  });

  it('puts and takes batches all or nothing', async () => {
    await using queue = new Queue<number>({ maxSize: 3 });
    await queue.putNowaitBatch([1, 2]);
    await expect(queue.putNowaitBatch([3, 4])).rejects.toThrow(/2 items do not fit: the queue holds 2 of at most 3/);
    expect(await queue.size()).toBe(2);
    await expect(queue.getNowaitBatch(3)).rejects.toThrow(/3 items were asked for, and the queue holds 2/);
    expect(await queue.getNowaitBatch(2)).toEqual([1, 2]);
  });

  it('travels to tasks: producers and consumers in workers share it, each item taken once', async () => {
    await using queue = new Queue<number>({ maxSize: 4 });
    const producers = [produce.remote(queue, 0, 30), produce.remote(queue, 100, 30)];
    const consumers = [consume.remote(queue, 20), consume.remote(queue, 20), consume.remote(queue, 20)];
    expect(await get(producers)).toEqual([30, 30]);
    const taken = (await get(consumers)).flat();
    expect(taken.sort((a, b) => a - b)).toEqual([...Array.from({ length: 30 }, (_, i) => i), ...Array.from({ length: 30 }, (_, i) => 100 + i)]);
    // Each producer's items came out in the order it put them.
    for (const consumer of await get(consumers)) {
      const fromFirst = consumer.filter((item) => item < 100);
      expect(fromFirst).toEqual([...fromFirst].sort((a, b) => a - b));
    }
    expect(await queue.empty()).toBe(true);
  });

  it('keeps refs as refs, and comes back from a worker that made it', async () => {
    await using queue = new Queue<ReturnType<typeof put<string>>>();
    await queue.put(put('behind a ref'));
    expect(await get(readRefFrom.remote({ queue }))).toBe('behind a ref');
    const made = await get(queueFromWorker.remote());
    expect(made).toBeInstanceOf(Queue);
    expect(made.maxSize).toBe(2);
    expect(await made.get()).toBe('made in a worker');
    made.shutdown();
  });

  it('fails waiting calls once shut down, and refuses bad input by name', async () => {
    const queue = new Queue<number>();
    const waiting = queue.get();
    queue.shutdown();
    await expect(waiting).rejects.toThrow(ActorDiedError);
    expect(() => new Queue({ maxSize: -1 })).toThrow(InvalidArgumentError);
    expect(() => new Queue({ maxSize: 1.5 })).toThrow(/maxSize must be a whole number from 0/);
    await using other = new Queue<number>();
    await expect(other.put(1, { timeout: -5 })).rejects.toThrow(/Queue.put: timeout must be a number of milliseconds from 0, got -5/);
    await expect(other.get({ block: 'yes' as unknown as boolean })).rejects.toThrow(/Queue.get: block must be true or false/);
    await expect(other.getNowaitBatch(-1)).rejects.toThrow(/count must be a whole number/);
  });
});
