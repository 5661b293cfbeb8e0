/**
 * Blocks exported over CUDA IPC going back to the CUDA driver on their own: after being left free
 * for init's reclaimIpcAfterMs, after cuda.emptyCache(), and after an allocation out of memory;
 * and readers' mappings of a producer that died closing. On the real driver where there is one,
 * else on the fake driver.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { get, init, InvalidArgumentError, kill, shutdown, type ActorHandle } from '../../lib/index.js';
import { buildFakeGpu, scenario } from './gpu-helpers.js';
import { RemoteConsumer, RemoteProducer, type Consumer, type Producer } from './fixtures/cuda-actors.js';

const MiB = 1 << 20;
const real = (await scenario('absent')).cuda.available === true;
const fake = real ? {} : buildFakeGpu();
if (fake.path) process.env.TRELLIS_CUDA_DRIVER = process.env.TRELLIS_NCCL_LIBRARY = fake.path;
const driver = real ? 'the CUDA driver' : fake.path ? 'the fake CUDA driver' : undefined;
async function until<T>(read: () => Promise<T>, done: (value: T) => boolean, limitMs = 5000): Promise<T> {
  const started = performance.now();
  for (;;) {
    const value = await read();
    if (done(value) || performance.now() - started > limitMs) return value;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

describe('reclaimIpcAfterMs', () => {
  it('is checked by init: a number of milliseconds from 0 to a day', async () => {
    for (const bad of [-1, Number.NaN, Infinity, 86_400_001, '100']) {
      await expect(init({ numCpus: 1, reclaimIpcAfterMs: bad as number })).rejects.toThrow(InvalidArgumentError);
    }
    await expect(init({ numCpus: 1, reclaimIpcAfterMs: -5 })).rejects.toThrow(/reclaimIpcAfterMs must be a number of milliseconds from 0 to 86400000, got -5/);
  });
});

describe.skipIf(!driver)(`exported blocks left free go back on their own (${driver ?? `skipped: ${fake.reason}`})`, () => {
  const afterMs = 300;
  let producer: ActorHandle<Producer>;
  let consumer: ActorHandle<Consumer>;
  beforeAll(async () => {
    await init({ numCpus: 2, numGpus: 1, reclaimIpcAfterMs: afterMs });
    producer = RemoteProducer.options({ numGpus: 0.5 }).remote();
    consumer = RemoteConsumer.options({ numGpus: 0.5 }).remote();
  });
  afterAll(() => shutdown());

  it('keeps a block reused within the wait, mapped by its reader, and gives it back once left free', async () => {
    const size = 600 * 1024 + 3;
    const opened = (await get(consumer.ipcStats.remote())).opens;
    // Back to back, each result reuses the block of the one before: one mapping for them all.
    for (let i = 0; i < 10; i++) {
      using made = producer.make.remote(size, i);
      expect(await get(consumer.inspect.remote(made))).toEqual([{ device: 'cuda:0', imported: true, numel: size, sum: i * size }]);
    }
    expect((await get(consumer.ipcStats.remote())).opens - opened).toBe(1);
    expect((await get(producer.idleReclaims.remote())).freedBytes).toBe(0);
    // Left free, it goes back: the reader closes its idle mapping, the producer frees the block.
    const cached = await until(() => get(producer.cachedBytes.remote()), (bytes) => bytes === 0);
    expect(cached).toBe(0);
    const reclaims = await get(producer.idleReclaims.remote());
    expect(reclaims.freedBytes).toBeGreaterThanOrEqual(size);
    expect(reclaims.failures).toBe(0);
    const stats = await get(consumer.ipcStats.remote());
    expect(stats.idle).toBe(0);
    expect(stats.inUse).toBe(0);
    // Transfers go on, with a fresh block and mapping.
    using again = producer.make.remote(size, 9);
    expect(await get(consumer.inspect.remote(again))).toEqual([{ device: 'cuda:0', imported: true, numel: size, sum: 9 * size }]);
  });

  it('keeps a block while a reader still maps it, and gives it back after', async () => {
    const size = 2 * MiB + 3;
    {
      using made = producer.make.remote(size, 5);
      expect(await get(consumer.keep.remote(made))).toBe('cuda:0');
    }
    // The reader's tensor keeps its object (and so the block, in use) past the ref.
    await new Promise((resolve) => setTimeout(resolve, 3 * afterMs));
    expect(await get(consumer.readKept.remote())).toBe(5 * size);
    await get(consumer.dropKept.remote(false));
    expect(await until(() => get(producer.cachedBytes.remote()), (bytes) => bytes === 0)).toBe(0);
    expect((await get(consumer.ipcStats.remote())).idle).toBe(0);
  });
});

describe.skipIf(!driver)(`with reclaimIpcAfterMs 0, exported blocks go back only when asked (${driver ?? `skipped: ${fake.reason}`})`, () => {
  let producer: ActorHandle<Producer>;
  let consumer: ActorHandle<Consumer>;
  beforeAll(async () => {
    await init({ numCpus: 2, numGpus: 1, reclaimIpcAfterMs: 0 });
    producer = RemoteProducer.options({ numGpus: 0.5 }).remote();
    consumer = RemoteConsumer.options({ numGpus: 0.5 }).remote();
  });
  afterAll(() => shutdown());

  async function sendOnce(size: number, value: number): Promise<void> {
    using made = producer.make.remote(size, value);
    expect(await get(consumer.inspect.remote(made))).toEqual([{ device: 'cuda:0', imported: true, numel: size, sum: value * size }]);
  }

  // The fake driver's memory cap stands in for a full GPU.
  it.skipIf(real)('starts a round when an allocation runs out of memory, so that a retry finds the memory (fake driver only)', async () => {
    await sendOnce(16 * MiB, 3);
    expect(await until(() => get(producer.cachedBytes.remote()), (bytes) => bytes >= 16 * MiB)).toBe(16 * MiB);
    // More than the cap leaves; the exported block (16 MiB) is too large to serve it.
    const outcome = await get(producer.allocateUnderCap.remote(6 * MiB, 4 * MiB, 5000));
    expect(outcome.firstError).toMatch(/^ERR_CUDA: cuMemAlloc_v2 failed: .*16777216 bytes stay cached in blocks this process exported over CUDA IPC .*go back to the driver once no process maps them/);
    expect(outcome.allocated).toBe(true);
    // What stays cached is the new block, which was never exported.
    expect(await get(producer.cachedBytes.remote())).toBe(6 * MiB);
    expect((await get(consumer.ipcStats.remote())).idle).toBe(0);
  });

  it('keeps free exported blocks past any wait, and gives them back after cuda.emptyCache()', async () => {
    const before = await get(producer.cachedBytes.remote());
    await sendOnce(7 * MiB + 3, 2);
    await new Promise((resolve) => setTimeout(resolve, 500));
    expect(await get(producer.cachedBytes.remote())).toBe(before + 8 * MiB);
    expect((await get(consumer.ipcStats.remote())).idle).toBe(1);
    await get(producer.emptyCache.remote());
    expect(await until(() => get(producer.cachedBytes.remote()), (bytes) => bytes === 0)).toBe(0);
    expect((await get(consumer.ipcStats.remote())).idle).toBe(0);
    const reclaims = await get(producer.idleReclaims.remote());
    expect(reclaims.freedBytes).toBeGreaterThanOrEqual(8 * MiB);
    expect(reclaims.failures).toBe(0);
  });

  // Last: it kills the producer.
  it("closes a reader's mappings of a producer that died: idle ones at once, one in use with its last view", async () => {
    await sendOnce(MiB + 3, 4);
    {
      using kept = producer.make.remote(3 * MiB + 3, 5);
      expect(await get(consumer.keep.remote(kept))).toBe('cuda:0');
    }
    const before = await get(consumer.ipcStats.remote());
    expect([before.idle, before.inUse]).toEqual([1, 1]);
    kill(producer);
    const after = await until(() => get(consumer.ipcStats.remote()), (stats) => stats.idle === 0);
    expect([after.idle, after.inUse, after.closes - before.closes]).toEqual([0, 1, 1]);
    // The kept tensor's mapping closes with it, instead of staying idle.
    await get(consumer.dropKept.remote(false));
    const dropped = await get(consumer.ipcStats.remote());
    expect([dropped.idle, dropped.inUse, dropped.closes - before.closes]).toEqual([0, 0, 2]);
  });
});
