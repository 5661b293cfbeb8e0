/**
 * The allocator under churn: reuse and coalescing of freed blocks, exact accounting, and a clear
 * ObjectStoreFullError (never a crash) when nothing can be freed or spilled.
 */
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { ObjectStoreFullError, newObjectId, type ObjectStore, type ObjectView } from '../../lib/index.js';
import { bytesFor, metadataFor } from './fixtures/content.js';
import {
  MiB,
  blockSize,
  cleanup,
  createStore,
  expectBytes,
  expectError,
  finish,
} from './helpers.js';

afterEach(cleanup);
afterAll(finish);

/** A small deterministic PRNG (mulberry32), so a failing sequence can be replayed. */
function random(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

interface Live {
  seed: number;
  size: number;
  metadata: boolean;
}

function expectedBytesInUse(live: Map<string, Live>): number {
  let total = 0;
  for (const object of live.values()) total += blockSize(object.size, object.metadata ? metadataFor(object.seed).length : 0);
  return total;
}

/** Checks that the whole store is free: one object of the full capacity fits, and nothing more. */
function expectWholeCapacityFree(store: ObjectStore): void {
  const { capacity, bytesInUse, objectCount, pinnedObjects } = store.stats();
  expect({ bytesInUse, objectCount, pinnedObjects }).toEqual({ bytesInUse: 0, objectCount: 0, pinnedObjects: 0 });
  const whole = newObjectId();
  const builder = store.create(whole, capacity - 64); // the largest object: a block of the capacity
  expect(store.stats().bytesInUse).toBe(capacity);
  const error = expectError(() => store.put(newObjectId(), new Uint8Array(1)), ObjectStoreFullError, 'ERR_OBJECT_STORE_FULL');
  expect(error.requested).toBe(1);
  builder.abort();
  expect(store.stats().bytesInUse).toBe(0);
}

describe('allocator', () => {
  it('survives many alloc/free cycles of mixed sizes and gives every byte back', async () => {
    const store = createStore({ capacity: 16 * MiB, spillDirectory: false });
    const { capacity } = store.stats();
    const next = random(12345);
    const live = new Map<string, Live>();
    const ids: string[] = [];
    let seed = 0;
    let fulls = 0;
    const pickSize = (): number => {
      const r = next();
      if (r < 0.15) return Math.floor(next() * 64);
      if (r < 0.5) return 64 + Math.floor(next() * 4096);
      if (r < 0.85) return 4096 + Math.floor(next() * 256 * 1024);
      if (r < 0.97) return 256 * 1024 + Math.floor(next() * 1.5 * MiB);
      return 2 * MiB + Math.floor(next() * 3 * MiB);
    };
    const removeRandom = (): void => {
      const index = Math.floor(next() * ids.length);
      const id = ids[index];
      ids[index] = ids[ids.length - 1];
      ids.pop();
      live.delete(id);
      store.delete(id);
    };

    for (let step = 0; step < 3000; step++) {
      if (ids.length > 0 && (next() < 0.45 || ids.length > 400)) {
        removeRandom();
        continue;
      }
      const id = newObjectId();
      const size = pickSize();
      const metadata = next() < 0.3;
      seed++;
      try {
        const kind = next();
        if (kind < 0.5) {
          store.put(id, bytesFor(seed, size), { metadata: metadata ? metadataFor(seed) : undefined });
        } else {
          const builder = store.create(id, size, { metadata: metadata ? metadataFor(seed) : undefined });
          if (kind < 0.6) {
            builder.abort(); // some objects never make it
            continue;
          }
          builder.data.set(bytesFor(seed, size));
          builder.seal();
        }
      } catch (error) {
        expect(error).toBeInstanceOf(ObjectStoreFullError);
        fulls++;
        removeRandom();
        continue;
      }
      live.set(id, { seed, size, metadata });
      ids.push(id);
      if (step % 100 === 0) {
        const stats = store.stats();
        expect(stats.objectCount).toBe(live.size);
        expect(stats.bytesInUse).toBe(expectedBytesInUse(live));
        expect(stats.bytesInUse).toBeLessThanOrEqual(capacity);
        expect(stats.pinnedObjects).toBe(0);
      }
    }
    expect(fulls).toBeGreaterThan(0); // the store really was driven to full

    // Every surviving object still holds exactly its own bytes.
    for (const [id, object] of live) {
      const view = (await store.get(id, { timeout: 0 })) as ObjectView;
      expectBytes(view.data, bytesFor(object.seed, object.size), `object ${object.seed}`);
      if (object.metadata) expectBytes(view.metadata, metadataFor(object.seed), `metadata ${object.seed}`);
      else expect(view.metadata).toBeNull();
      view.release();
    }
    while (ids.length > 0) removeRandom();
    expectWholeCapacityFree(store);
  });

  it('coalesces freed neighbours in any order, and with the untouched top', async () => {
    const store = createStore({ capacity: 16 * MiB, spillDirectory: false });
    const { capacity } = store.stats();
    const quarter = capacity / 4;
    const fill = (): string[] => {
      const ids = [newObjectId(), newObjectId(), newObjectId(), newObjectId()];
      ids.forEach((id, i) => store.put(id, bytesFor(i, quarter - 64)));
      expect(store.stats().bytesInUse).toBe(capacity);
      const full = expectError(() => store.put(newObjectId(), new Uint8Array(1)), ObjectStoreFullError, 'ERR_OBJECT_STORE_FULL');
      // The message says how many objects readers pin (none here: nothing was read).
      expect(full.message).toContain('(0 objects are pinned by readers');
      return ids;
    };
    // Frees `order` (indexes into the four quarters), then expects one object of `quarters` to fit.
    const check = (order: number[], quarters: number): void => {
      const ids = fill();
      for (const i of order) store.delete(ids[i]);
      const merged = newObjectId();
      store.put(merged, bytesFor(9, quarters * quarter - 64));
      expect(store.stats().bytesInUse).toBe(capacity - (order.length - quarters) * quarter);
      store.delete(merged);
      for (const [i, id] of ids.entries()) if (!order.includes(i)) store.delete(id);
      expect(store.stats().bytesInUse).toBe(0);
    };
    check([1, 2], 2); // with the next block
    check([2, 1], 2); // with the previous block
    check([0, 2, 1], 3); // with both
    check([3, 2], 2); // the top block goes back to the wilderness, then its neighbour follows
    check([2, 3], 2);
    check([1, 3, 0, 2], 4);

    // A hole is split for a small object, and the remainder is exactly usable.
    const ids = fill();
    store.delete(ids[1]);
    store.delete(ids[2]);
    const small = newObjectId();
    store.put(small, bytesFor(10, 1000));
    const rest = newObjectId();
    store.put(rest, bytesFor(11, 2 * quarter - blockSize(1000) - 64));
    expect(store.stats().bytesInUse).toBe(capacity);
    for (const [id, seed, size] of [
      [ids[0], 0, quarter - 64],
      [small, 10, 1000],
      [rest, 11, 2 * quarter - blockSize(1000) - 64],
      [ids[3], 3, quarter - 64],
    ] as const) {
      const view = await store.get(id);
      expectBytes(view.data, bytesFor(seed, size));
      view.release();
      store.delete(id);
    }
    expectWholeCapacityFree(store);
  });
});

describe('a full store', () => {
  it('with everything pinned: ObjectStoreFullError naming request, capacity and use, and no crash', async () => {
    const store = createStore({ capacity: 8 * MiB });
    const views: ObjectView[] = [];
    const ids: string[] = [];
    let error: ObjectStoreFullError | undefined;
    for (let i = 0; i < 100 && !error; i++) {
      const id = newObjectId();
      try {
        store.put(id, bytesFor(i, MiB));
      } catch (caught) {
        error = caught as ObjectStoreFullError;
        break;
      }
      ids.push(id);
      views.push(await store.get(id));
    }
    const stats = store.stats();
    expect(error).toBeInstanceOf(ObjectStoreFullError);
    expect(error!.code).toBe('ERR_OBJECT_STORE_FULL');
    expect(error!.requested).toBe(MiB);
    expect(error!.capacity).toBe(stats.capacity);
    expect(error!.used).toBe(stats.bytesInUse);
    expect(error!.used).toBe(ids.length * blockSize(MiB));
    expect(error!.message).toMatch(/full/);
    expect(ids.length).toBe(Math.floor(stats.capacity / blockSize(MiB)));
    expect(stats.totalSpilledObjects).toBe(0); // pinned objects are never spilled
    expect(stats.pinnedObjects).toBe(ids.length);
    // A bigger request fails the same way, and the failed puts left nothing behind.
    const bigger = expectError(() => store.create(newObjectId(), 3 * MiB), ObjectStoreFullError, 'ERR_OBJECT_STORE_FULL');
    expect(bigger.requested).toBe(3 * MiB);
    expect(store.stats()).toMatchObject({ objectCount: ids.length, bytesInUse: ids.length * blockSize(MiB) });

    // Everything is intact and the store goes on working.
    views.forEach((view, i) => expectBytes(view.data, bytesFor(i, MiB)));
    views[0].release();
    const after = newObjectId();
    store.put(after, bytesFor(1000, MiB)); // room made by spilling the one unpinned object
    expect(store.stats().totalSpilledObjects).toBe(1);
    expect(store.state(ids[0])).toBe('spilled');
    const restoredFromFull = await store.get(after);
    expectBytes(restoredFromFull.data, bytesFor(1000, MiB));
    restoredFromFull.release();
    for (const view of views) view.release();
  });

  it('with spilling disabled and nothing pinned: ObjectStoreFullError, and deleting makes room', async () => {
    const store = createStore({ capacity: 8 * MiB, spillDirectory: false });
    const ids: string[] = [];
    let error: ObjectStoreFullError | undefined;
    for (let i = 0; i < 100; i++) {
      const id = newObjectId();
      try {
        store.put(id, bytesFor(i, MiB));
      } catch (caught) {
        error = caught as ObjectStoreFullError;
        break;
      }
      ids.push(id);
    }
    const stats = store.stats();
    expect(error).toBeInstanceOf(ObjectStoreFullError);
    expect(error!.code).toBe('ERR_OBJECT_STORE_FULL');
    expect(error!).toMatchObject({ requested: MiB, capacity: stats.capacity, used: stats.bytesInUse });
    expect(stats.pinnedObjects).toBe(0);
    expect(stats.totalSpilledObjects).toBe(0);
    expect(stats.objectCount).toBe(ids.length);
    // Every object is still whole; freeing one makes room for another.
    for (const [i, id] of ids.entries()) {
      const view = await store.get(id);
      expectBytes(view.data, bytesFor(i, MiB));
      view.release();
    }
    store.delete(ids[3]);
    store.put(newObjectId(), bytesFor(500, MiB));
    expect(store.stats().objectCount).toBe(ids.length);
  });

  it('runs out of object entries with ObjectStoreFullError, and reuses them once freed', () => {
    const store = createStore({ capacity: 8 * MiB, maxObjects: 64 });
    expect(store.stats().maxObjects).toBe(64);
    const ids = Array.from({ length: 64 }, () => newObjectId());
    for (const id of ids) store.put(id, new Uint8Array(100));
    const before = store.stats();
    const error = expectError(() => store.put(newObjectId(), new Uint8Array(100)), ObjectStoreFullError, 'ERR_OBJECT_STORE_FULL');
    expect(error.message).toMatch(/64 objects/);
    expect(store.stats()).toMatchObject({ objectCount: 64, bytesInUse: before.bytesInUse });
    store.delete(ids[10]);
    store.put(newObjectId(), new Uint8Array(100));
    for (const id of ids) if (id !== ids[10]) store.delete(id);
    expect(store.stats()).toMatchObject({ objectCount: 1, bytesInUse: blockSize(100) });
  });
});
