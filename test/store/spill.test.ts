/**
 * Spilling to disk when full and restoring on get: contents (and metadata) come back intact, the
 * statistics add up, spill files go when their objects do and when the store closes, and a
 * process that dies in the middle of a spill leaves the object resident and whole.
 */
import { existsSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { ObjectStore, newObjectId, type ObjectStore as Store } from '../../lib/index.js';
import { bytesFor, digestFor, metadataFor } from './fixtures/content.js';
import {
  Fixture,
  MiB,
  blockSize,
  cleanup,
  createStore,
  expectBytes,
  finish,
  tempDir,
  track,
} from './helpers.js';

afterEach(cleanup);
afterAll(finish);

interface Put {
  id: string;
  seed: number;
  size: number;
}

/** Puts `count` objects of various sizes (with metadata) totalling several times the capacity. */
function overfill(store: Store, count: number, firstSeed = 0): Put[] {
  const puts: Put[] = [];
  const { capacity } = store.stats();
  for (let i = 0; i < count; i++) {
    const seed = firstSeed + i;
    const size = [1.5 * MiB, 700_000, 3 * MiB + 17, 4096, 0][i % 5];
    const id = newObjectId();
    store.put(id, bytesFor(seed, size), { metadata: metadataFor(seed) });
    puts.push({ id, seed, size });
    expect(store.stats().bytesInUse).toBeLessThanOrEqual(capacity);
  }
  return puts;
}

function spilledBytes(store: Store, puts: Put[]): number {
  return puts
    .filter((put) => store.state(put.id) === 'spilled')
    .reduce((total, put) => total + put.size + metadataFor(put.seed).length, 0);
}

describe('spilling', () => {
  it('spills when full and restores every object with its bytes and metadata', async () => {
    const spillDirectory = tempDir('trellis-spill-');
    const store = createStore({ capacity: 16 * MiB, spillDirectory });
    const puts = overfill(store, 50);
    const total = puts.reduce((sum, put) => sum + put.size, 0);
    expect(total).toBeGreaterThan(3 * store.stats().capacity);

    let stats = store.stats();
    expect(stats.objectCount).toBe(50);
    expect(stats.totalSpilledObjects).toBeGreaterThan(0);
    expect(stats.spilledObjects).toBeGreaterThan(0);
    expect(stats.spilledBytes).toBe(spilledBytes(store, puts));
    expect(stats.totalRestoredObjects).toBe(0);
    // One file per spilled object, named after the store.
    const files = readdirSync(spillDirectory);
    expect(files).toHaveLength(stats.spilledObjects);
    for (const file of files) expect(file.startsWith(store.name)).toBe(true);
    expect(puts.filter((put) => store.state(put.id) === 'spilled')).toHaveLength(stats.spilledObjects);

    // Read everything back, twice, in opposite orders: each get may restore one object and spill
    // others to make room.
    for (const order of [puts, [...puts].reverse()]) {
      for (const put of order) {
        const view = await store.get(put.id, { timeout: 0 });
        expect(store.state(put.id)).toBe('sealed');
        expectBytes(view.data, bytesFor(put.seed, put.size), `object ${put.seed}`);
        expectBytes(view.metadata, metadataFor(put.seed), `metadata ${put.seed}`);
        view.release();
        expect(store.stats().bytesInUse).toBeLessThanOrEqual(store.stats().capacity);
      }
    }
    stats = store.stats();
    expect(stats.totalRestoredObjects).toBeGreaterThan(0);
    expect(stats.totalRestoredBytes).toBeGreaterThan(0);
    // Nothing was deleted: every spill is either restored or still on disk.
    expect(stats.totalSpilledObjects - stats.totalRestoredObjects).toBe(stats.spilledObjects);
    expect(stats.objectCount).toBe(50);
    expect(stats.spilledBytes).toBe(spilledBytes(store, puts));
    expect(readdirSync(spillDirectory)).toHaveLength(stats.spilledObjects);

    store.close();
    // Closing removes every spill file (the directory was ours to give, so it stays).
    expect(readdirSync(spillDirectory)).toEqual([]);
  });

  it('removes the spill file of a deleted object', async () => {
    const spillDirectory = tempDir('trellis-spill-');
    const store = createStore({ capacity: 8 * MiB, spillDirectory });
    const puts = overfill(store, 20);
    const spilled = puts.filter((put) => store.state(put.id) === 'spilled');
    expect(spilled.length).toBeGreaterThan(2);
    const before = store.stats();
    for (const put of spilled) {
      store.delete(put.id);
      expect(store.state(put.id)).toBe('absent');
    }
    const after = store.stats();
    expect(after.spilledObjects).toBe(before.spilledObjects - spilled.length);
    expect(after.spilledBytes).toBe(0);
    expect(after.objectCount).toBe(20 - spilled.length);
    expect(after.bytesInUse).toBe(before.bytesInUse); // nothing resident was touched
    expect(readdirSync(spillDirectory)).toEqual([]);
    // The deleted ids are free again.
    store.put(spilled[0].id, new Uint8Array([1]));
    const view = await store.get(spilled[0].id);
    expect(Array.from(view.data)).toEqual([1]);
    view.release();
  });

  it('makes and removes its default spill directory', () => {
    const store = track(ObjectStore.create({ capacity: 4 * MiB }));
    const directory = join(tmpdir(), `${store.name}-spill`);
    expect(existsSync(directory)).toBe(true);
    overfill(store, 12);
    expect(readdirSync(directory).length).toBe(store.stats().spilledObjects);
    expect(store.stats().spilledObjects).toBeGreaterThan(0);
    store.close();
    expect(existsSync(directory)).toBe(false);
  });

  it('restores in another process what this one spilled', async () => {
    const store = createStore({ capacity: 8 * MiB });
    const puts = overfill(store, 20);
    const spilled = puts.filter((put) => store.state(put.id) === 'spilled');
    expect(spilled.length).toBeGreaterThan(0);
    const child = await Fixture.worker(store.name);
    const reply = await child.request('getMany', { ids: spilled.map((put) => put.id), timeout: 0 });
    for (const put of spilled) {
      expect(reply.results[put.id]).toEqual({ size: put.size, digest: digestFor(put.seed, put.size), metadata: `meta:${put.seed}` });
    }
    expect(store.stats().totalRestoredObjects).toBeGreaterThanOrEqual(spilled.length);
    // And this process reads back what the child restored (or spilled again) intact.
    for (const put of puts) {
      const view = await store.get(put.id, { timeout: 0 });
      expectBytes(view.data, bytesFor(put.seed, put.size));
      view.release();
    }
    expect((await child.end()).code).toBe(0);
  });

  it('keeps an object whole when the process spilling it is killed mid-spill', async () => {
    const spillDirectory = tempDir('trellis-spill-');
    const store = createStore({ capacity: 8 * MiB, spillDirectory });
    const puts: Put[] = [];
    for (let i = 0; i < 5; i++) {
      const put = { id: newObjectId(), seed: i, size: 1.5 * MiB };
      store.put(put.id, bytesFor(put.seed, put.size));
      puts.push(put);
    }
    const before = store.stats();
    expect(before.totalSpilledObjects).toBe(0);

    // The child's put needs room: it starts spilling the least recently used object (the first),
    // writes its file outside the lock, and dies right after.
    const child = await Fixture.worker(store.name);
    const intruder = newObjectId();
    await expect(child.send('crash', { point: 'spill:after-write', id: intruder, seed: 99, size: 1.5 * MiB })).rejects.toThrow(/exited/);
    expect((await child.exited).signal).toBe('SIGKILL');

    // Mid-spill the object still reads as sealed, and its half-made spill file is there.
    expect(store.state(puts[0].id)).toBe('sealed');
    expect(readdirSync(spillDirectory)).toHaveLength(1);
    expect(store.reapDeadProcesses()).toBe(1);
    // Reaping ends the spill: the object stays resident and the file goes.
    expect(readdirSync(spillDirectory)).toEqual([]);
    const stats = store.stats();
    expect(stats).toMatchObject({
      objectCount: 5,
      bytesInUse: 5 * blockSize(1.5 * MiB),
      spilledObjects: 0,
      totalSpilledObjects: 0,
      pinnedObjects: 0,
      recoveries: before.recoveries, // the child died outside the lock
    });
    expect(store.state(intruder)).toBe('absent');
    for (const put of puts) {
      const view = await store.get(put.id, { timeout: 0 });
      expectBytes(view.data, bytesFor(put.seed, put.size));
      view.release();
    }
    // And the object can be spilled and restored normally afterwards.
    overfill(store, 6, 100);
    expect(store.state(puts[0].id)).toBe('spilled');
    const view = await store.get(puts[0].id, { timeout: 0 });
    expectBytes(view.data, bytesFor(puts[0].seed, puts[0].size));
    view.release();
  });
});
