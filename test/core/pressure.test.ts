import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { get, init, put, shutdown, state } from '../../lib/index.js';
import { sumArray } from './fixtures/tasks.js';

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
});
