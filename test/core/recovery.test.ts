import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ObjectLostError, ObjectStore, events, get, init, put, shutdown, state } from '../../lib/index.js';
import { bigArray, sumArray } from './fixtures/core.js';

describe('lineage reconstruction and idle workers', () => {
  let store: ObjectStore;
  const reconstructed: string[] = [];
  beforeAll(async () => {
    await init({ numCpus: 2 });
    store = ObjectStore.attach(state().nodes[0].storeName);
    events().on('reconstruct', (event: { objectId: string }) => reconstructed.push(event.objectId));
  });
  afterAll(async () => {
    store.close();
    await shutdown();
  });

  it('recomputes a task output that vanished from the store, for get and as an argument', async () => {
    const ref = bigArray.remote(50_000);
    expect(((await get(ref)) as Float64Array)[49_999]).toBe(49_999);
    store.delete(ref.id); // the object is lost behind the runtime's back
    expect(((await get(ref)) as Float64Array)[49_999]).toBe(49_999);
    expect(reconstructed).toContain(ref.id);
    store.delete(ref.id);
    expect(await get(sumArray.remote(ref))).toMatchObject({ total: (49_999 * 50_000) / 2 });
    expect(reconstructed.filter((id) => id === ref.id)).toHaveLength(2);
  });

  it('raises ObjectLostError for a lost put, which no task can recompute', async () => {
    const ref = put(new Float64Array(50_000).fill(2));
    store.delete(ref.id);
    const error = await get(ref).catch((caught: unknown) => caught);
    expect(error).toBeInstanceOf(ObjectLostError);
    expect((error as ObjectLostError).objectId).toBe(ref.id);
  });

  it('lets idle workers above the CPU count go after a second', async () => {
    // Blocked parents lend their CPUs: more workers than CPUs start, then the extras are reaped.
    const { parent } = await import('./fixtures/core.js');
    await get([parent.remote(3), parent.remote(3), parent.remote(3)]);
    const busiest = state().workers.filter((worker) => worker.state !== 'actor').length;
    expect(busiest).toBeGreaterThan(2);
    const deadline = Date.now() + 15_000;
    while (Date.now() < deadline && state().workers.filter((worker) => worker.state !== 'actor').length > 2) {
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    expect(state().workers.filter((worker) => worker.state !== 'actor').length).toBeLessThanOrEqual(2);
  });
});
