/**
 * What stats() reports: running counts kept in the segment header (no scan of the tables), which
 * must agree with the objects, pins and processes at every step, through spills and restores, and
 * after a process dies inside the lock between a pin and its count.
 */
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { newObjectId, type ObjectStore, type ObjectView } from '../../lib/index.js';
import { bytesFor, metadataFor } from './fixtures/content.js';
import { Fixture, MiB, blockSize, cleanup, createStore, finish, tempDir } from './helpers.js';

afterEach(cleanup);
afterAll(finish);

/** A deterministic stream of numbers (xorshift32), so that a failing sequence can be replayed. */
function random(seed: number): (below: number) => number {
  let x = seed >>> 0 || 1;
  return (below) => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % below;
  };
}

interface Model {
  /** Objects not deleted, with their block sizes. */
  live: Map<string, number>;
  /** Views this process holds, per object (deleted objects included, until released). */
  views: Map<string, ObjectView[]>;
  /** Block sizes of deleted objects still pinned. */
  deletedPinned: Map<string, number>;
}

function expectAgrees(store: ObjectStore, model: Model, step: string): void {
  let bytes = 0;
  for (const size of model.live.values()) bytes += size;
  for (const size of model.deletedPinned.values()) bytes += size;
  const pinned = [...model.views.values()].filter((views) => views.length > 0).length;
  expect(store.stats(), step).toMatchObject({ objectCount: model.live.size, bytesInUse: bytes, pinnedObjects: pinned, attachedProcesses: 1 });
}

describe('stats', () => {
  it('agree with a model of objects and pins through a random run of puts, gets, releases and deletes', async () => {
    const store = createStore({ capacity: 64 * MiB, spillDirectory: false });
    const model: Model = { live: new Map(), views: new Map(), deletedPinned: new Map() };
    const next = random(20_251_126);
    for (let step = 0; step < 600; step++) {
      const ids = [...model.live.keys()];
      const action = ids.length === 0 ? 0 : next(10);
      if (action < 3) {
        const size = [0, 1, 63, 64, 4096, 100_000][next(6)];
        const id = newObjectId();
        store.put(id, bytesFor(step, size));
        model.live.set(id, blockSize(size));
      } else if (action < 6) {
        const id = ids[next(ids.length)];
        const view = store.getIfSealed(id)!;
        expect(view).toBeDefined();
        model.views.set(id, [...(model.views.get(id) ?? []), view]);
      } else if (action < 8) {
        const held = [...model.views.entries()].filter(([, views]) => views.length > 0);
        if (held.length === 0) continue;
        const [id, views] = held[next(held.length)];
        views.pop()!.release();
        if (views.length === 0) {
          model.views.delete(id);
          model.deletedPinned.delete(id);
        }
      } else {
        const id = ids[next(ids.length)];
        store.delete(id);
        if ((model.views.get(id)?.length ?? 0) > 0) model.deletedPinned.set(id, model.live.get(id)!);
        model.live.delete(id);
      }
      expectAgrees(store, model, `step ${step}`);
    }
    for (const views of model.views.values()) for (const view of views) view.release();
    for (const id of model.live.keys()) store.delete(id);
    expect(store.stats()).toMatchObject({ objectCount: 0, bytesInUse: 0, pinnedObjects: 0 });
  });

  it('count an unsealed object as pinned by its creator until sealed or aborted', () => {
    const store = createStore({ spillDirectory: false });
    const sealed = store.create(newObjectId(), 1000);
    const aborted = store.create(newObjectId(), 2000);
    expect(store.stats()).toMatchObject({ objectCount: 2, pinnedObjects: 2, bytesInUse: blockSize(1000) + blockSize(2000) });
    sealed.seal();
    aborted.abort();
    expect(store.stats()).toMatchObject({ objectCount: 1, pinnedObjects: 0, bytesInUse: blockSize(1000) });
  });

  it('count pins of several processes once per object, and processes as they attach, close and die', async () => {
    const store = createStore({ spillDirectory: false });
    const [a, b] = [newObjectId(), newObjectId()];
    store.put(a, bytesFor(1, 5000));
    store.put(b, bytesFor(2, 6000));
    const first = await Fixture.worker(store.name);
    const second = await Fixture.worker(store.name);
    expect(store.stats().attachedProcesses).toBe(3);
    await first.request('hold', { id: a, key: 'a' });
    await second.request('hold', { id: a, key: 'a' });
    const mine = store.getIfSealed(a)!;
    expect(store.stats().pinnedObjects).toBe(1);
    await second.request('hold', { id: b, key: 'b' });
    expect(store.stats().pinnedObjects).toBe(2);
    store.delete(b);
    expect(store.stats()).toMatchObject({ objectCount: 1, pinnedObjects: 2, bytesInUse: blockSize(5000) + blockSize(6000) });

    expect((await first.end()).code).toBe(0); // closing drops its pins
    expect(store.stats()).toMatchObject({ attachedProcesses: 2, pinnedObjects: 2 });
    await second.kill('SIGKILL');
    expect(store.stats()).toMatchObject({ attachedProcesses: 2, pinnedObjects: 2 }); // until a reap
    expect(store.reapDeadProcesses()).toBe(1);
    expect(store.stats()).toMatchObject({ attachedProcesses: 1, pinnedObjects: 1, objectCount: 1, bytesInUse: blockSize(5000) });
    mine.release();
    expect(store.stats().pinnedObjects).toBe(0);
  });

  it('are rebuilt after a process dies in the lock between a pin and its count', async () => {
    const store = createStore({ spillDirectory: false });
    const kept = newObjectId();
    store.put(kept, bytesFor(3, 3000));
    const view = store.getIfSealed(kept)!;
    const before = store.stats();
    const child = await Fixture.worker(store.name);
    const id = newObjectId();
    await expect(child.send('crash', { point: 'pin:before-count', id, seed: 4, size: MiB })).rejects.toThrow(/exited/);
    expect((await child.exited).signal).toBe('SIGKILL');

    // The child died inside create, with its object committed and pinned but the pin not counted.
    const recovered = store.stats();
    expect(recovered).toMatchObject({
      recoveries: before.recoveries + 1,
      objectCount: 2,
      bytesInUse: blockSize(3000) + blockSize(MiB),
      pinnedObjects: 2,
      attachedProcesses: 2,
    });
    expect(store.reapDeadProcesses()).toBe(1);
    expect(store.stats()).toMatchObject({ objectCount: 1, bytesInUse: blockSize(3000), pinnedObjects: 1, attachedProcesses: 1 });
    view.release();
    store.delete(kept);
    expect(store.stats()).toMatchObject({ objectCount: 0, bytesInUse: 0, pinnedObjects: 0 });
  });

  it('add up through spills and restores', async () => {
    const store = createStore({ capacity: 8 * MiB, spillDirectory: tempDir('trellis-spill-') });
    const puts: Array<{ id: string; seed: number; size: number }> = [];
    for (let seed = 0; seed < 12; seed++) {
      const size = [MiB, 700_000, 2 * MiB + 17][seed % 3];
      const id = newObjectId();
      store.put(id, bytesFor(seed, size), { metadata: metadataFor(seed) });
      puts.push({ id, seed, size });
    }
    const check = (pinned: number) => {
      const spilled = puts.filter((put) => store.state(put.id) === 'spilled');
      const resident = puts.filter((put) => store.state(put.id) === 'sealed');
      expect(spilled.length + resident.length).toBe(puts.length);
      expect(store.stats()).toMatchObject({
        objectCount: puts.length,
        spilledObjects: spilled.length,
        spilledBytes: spilled.reduce((sum, put) => sum + put.size + metadataFor(put.seed).length, 0),
        bytesInUse: resident.reduce((sum, put) => sum + blockSize(put.size, metadataFor(put.seed).length), 0),
        pinnedObjects: pinned,
      });
      return spilled;
    };
    const spilled = check(0);
    expect(spilled.length).toBeGreaterThan(0);
    // Restoring the oldest spilled object spills others to make room; the view pins it.
    const view = store.getIfSealed(spilled[0].id)!;
    expect(view.size).toBe(spilled[0].size);
    check(1);
    expect(store.stats().totalRestoredObjects).toBeGreaterThanOrEqual(1);
    view.release();
    check(0);
    for (const put of puts) store.delete(put.id);
    expect(store.stats()).toMatchObject({ objectCount: 0, bytesInUse: 0, spilledObjects: 0, spilledBytes: 0, pinnedObjects: 0 });
  });
});
