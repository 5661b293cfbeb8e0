import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { get, init, put, shutdown, state } from '../../lib/index.js';
import { sumAndKeepAWhile, sumArray } from './fixtures/tasks.js';
import { until } from './helpers.js';
import { ObjectStore } from '../../lib/store/object-store.js';

describe('store pressure from zero-copy reads in workers', () => {
  beforeAll(async () => {
    await init({ numCpus: 2, objectStoreMemory: 64 << 20 });
  });
  afterAll(async () => {
    await shutdown();
  });

  it('streams many times the store through workers that read zero-copy', async () => {
    // 150 x 2 MiB through a 64 MiB store: workers' views would pin it full without collection.
    for (let i = 0; i < 150; i++) {
      using ref = put(new Float64Array(256 * 1024).fill(1));
      using sum = sumArray.remote(ref);
      expect(await get(sum)).toBe(256 * 1024);
    }
    expect(state().nodes[0].store.bytesInUse).toBeLessThan(64 << 20);
  });

  it('lets go of a value a task kept reachable a while after it ended, with no task after it', async () => {
    // The idle worker's first collection finds the array still held; only a later one can free it.
    const pinned = () => {
      const store = ObjectStore.attach(state().nodes[0].storeName);
      try {
        return store.pinned().map((entry) => entry.objectId);
      } finally {
        store.close();
      }
    };
    let id: string;
    {
      using ref = put(new Float64Array(128 * 1024).fill(2));
      id = ref.id;
      using sum = sumAndKeepAWhile.remote(ref, 400);
      expect(await get(sum)).toBe(256 * 1024);
      expect(pinned()).toContain(id);
    }
    // Within seconds: V8 collects of its own accord only well after that (about 8 s here).
    await until(() => !pinned().includes(id), 'the idle worker to unpin the array', 5000);
  });
});
