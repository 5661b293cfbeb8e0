/**
 * Killing a producer or a consumer at an arbitrary moment of CUDA IPC transfers, with reclaim
 * rounds running often: every call settles (nothing hangs), each failure is the typed error of
 * what was lost, and a fresh pair works afterwards. On the real driver where there is one, else on
 * the fake driver. The kill moments come from a seeded generator.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { get, init, kill, shutdown } from '../../lib/index.js';
import { buildFakeGpu, scenario } from './gpu-helpers.js';
import { RemoteConsumer, RemoteProducer } from './fixtures/cuda-actors.js';

const MiB = 1 << 20;
const real = (await scenario('absent')).cuda.available === true;
const fake = real ? {} : buildFakeGpu();
if (fake.path) process.env.TRELLIS_CUDA_DRIVER = process.env.TRELLIS_NCCL_LIBRARY = fake.path;
const driver = real ? 'the CUDA driver' : fake.path ? 'the fake CUDA driver' : undefined;

describe.skipIf(!driver)(`actors killed during CUDA IPC transfers (${driver ?? `skipped: ${fake.reason}`})`, () => {
  beforeAll(async () => {
    await init({ numCpus: 2, numGpus: 1, reclaimIpcAfterMs: 30 });
  });
  afterAll(async () => {
    await shutdown();
  });

  it('settles every call with its result or the typed error of what was lost, and goes on', async () => {
    let seed = 7;
    const random = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
    const seen = new Map<string, number>();
    for (let round = 0; round < 6; round++) {
      const producer = RemoteProducer.options({ numGpus: 0.5 }).remote();
      const consumer = RemoteConsumer.options({ numGpus: 0.5 }).remote();
      const outcome = (promise: Promise<unknown>) => promise.then(() => 'ok', (error: Error) => error.name);
      const calls: Array<Promise<string>> = [];
      for (let i = 0; i < 6; i++) {
        const made = producer.make.remote(MiB * (1 + (i % 3)) + 7, i);
        calls.push(outcome(get(consumer.inspect.remote(made))), outcome(get(made)));
        if (i % 2) calls.push(outcome(get(producer.reclaim.remote())));
      }
      await calls[0];
      await new Promise((resolve) => setTimeout(resolve, random() * 30));
      kill(random() < 0.5 ? producer : consumer);
      const settled = await Promise.race([Promise.all(calls), new Promise<'hung'>((resolve) => setTimeout(() => resolve('hung'), 20_000))]);
      expect(settled, `round ${round}`).not.toBe('hung');
      for (const name of settled as string[]) seen.set(name, (seen.get(name) ?? 0) + 1);
      kill(producer);
      kill(consumer);
    }
    expect([...seen.keys()].every((name) => ['ok', 'ActorDiedError', 'ObjectLostError'].includes(name)), JSON.stringify([...seen])).toBe(true);
    expect(seen.get('ok')).toBeGreaterThan(0);
    const producer = RemoteProducer.options({ numGpus: 0.5 }).remote();
    const consumer = RemoteConsumer.options({ numGpus: 0.5 }).remote();
    expect(await get(consumer.inspect.remote(producer.make.remote(3 * MiB, 4)))).toEqual([{ device: 'cuda:0', imported: true, numel: 3 * MiB, sum: 12 * MiB }]);
  }, 180_000);
});
