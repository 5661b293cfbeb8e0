/**
 * Processes that die at the worst moments: SIGKILLed inside the store's lock (while holding it,
 * and at each crash point of a create), or while pinning an object. Whoever locks next recovers;
 * after a reap the statistics are exact and every byte can be allocated again.
 */
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { ObjectStoreFullError, newObjectId, type ObjectStore, type ObjectView } from '../../lib/index.js';
import { bytesFor } from './fixtures/content.js';
import {
  Fixture,
  MiB,
  blockSize,
  cleanup,
  createStore,
  expectBytes,
  expectError,
  finish,
  lockOwner,
  sleep,
  waitFor,
} from './helpers.js';

afterEach(cleanup);
afterAll(finish);

interface Resident {
  id: string;
  seed: number;
  size: number;
}

/** Puts a few objects and deletes the middle one, leaving a hole below the top. */
function populate(store: ObjectStore): { kept: Resident[]; hole: number } {
  const kept: Resident[] = [];
  const sizes = [MiB, 2 * MiB, MiB];
  const ids = sizes.map((size, seed) => {
    const id = newObjectId();
    store.put(id, bytesFor(seed, size));
    return { id, seed, size };
  });
  store.delete(ids[1].id);
  kept.push(ids[0], ids[2]);
  return { kept, hole: blockSize(2 * MiB) };
}

function expectIntact(views: ObjectView[], residents: Resident[]): void {
  views.forEach((view, i) => expectBytes(view.data, bytesFor(residents[i].seed, residents[i].size), `object ${residents[i].seed}`));
}

/**
 * Fills what is free with 1 MiB objects until the store is full (spilling is off), checks that
 * the whole capacity was usable, then frees everything and allocates one object of the whole
 * capacity: any block lost to a crash would make that fail.
 */
async function expectAllSpaceReusable(store: ObjectStore, views: ObjectView[]): Promise<void> {
  const { capacity } = store.stats();
  const fill: string[] = [];
  for (;;) {
    const id = newObjectId();
    try {
      store.put(id, bytesFor(500 + fill.length, MiB));
    } catch (error) {
      expect(error).toBeInstanceOf(ObjectStoreFullError);
      break;
    }
    fill.push(id);
  }
  // At most a hole's leftover and the top's leftover, each smaller than one more object, are free.
  expect(capacity - store.stats().bytesInUse).toBeLessThan(2 * blockSize(MiB));
  for (const view of views) view.release();
  for (const id of fill) store.delete(id);
  for (const id of allIds(store, views)) store.delete(id);
  expect(store.stats()).toMatchObject({ objectCount: 0, bytesInUse: 0, pinnedObjects: 0 });
  const whole = store.create(newObjectId(), capacity - 64);
  expect(store.stats().bytesInUse).toBe(capacity);
  whole.abort();
}

function allIds(store: ObjectStore, views: ObjectView[]): string[] {
  return views.map((view) => view.id).filter((id) => store.contains(id));
}

describe('a process killed inside the lock', () => {
  it('is recovered from by the next locker; pins, objects and space survive', async () => {
    const store = createStore({ spillDirectory: false });
    const { kept } = populate(store);
    const views = await Promise.all(kept.map((resident) => store.get(resident.id)));
    const before = store.stats();

    const holder = await Fixture.worker(store.name);
    void holder.send('holdLock').catch(() => {}); // never answered: the child dies in the lock
    await holder.line('locked');
    // 'locked' is printed just before the lock is taken: wait until the mutex names the child.
    await waitFor(() => lockOwner(store.name) === holder.pid, 'the child to hold the lock');
    expect((await holder.kill('SIGKILL')).signal).toBe('SIGKILL');

    const after = store.stats(); // the first lock after the death recovers
    expect(after.recoveries).toBe(before.recoveries + 1);
    expect(after).toMatchObject({
      objectCount: before.objectCount,
      bytesInUse: before.bytesInUse,
      pinnedObjects: kept.length,
      attachedProcesses: 2, // the dead child's slot until a reap
    });
    expect(store.reapDeadProcesses()).toBe(1);
    expect(store.stats()).toMatchObject({ attachedProcesses: 1, recoveries: before.recoveries + 1 });
    expectIntact(views, kept);

    // Business as usual.
    const id = newObjectId();
    store.put(id, bytesFor(77, 3000));
    const view = await store.get(id);
    expectBytes(view.data, bytesFor(77, 3000));
    await expectAllSpaceReusable(store, [...views, view]);
  });

  it('lets a process blocked on the lock take it over when the holder dies', async () => {
    const store = createStore({ spillDirectory: false });
    const id = newObjectId();
    store.put(id, bytesFor(1, 1000));
    const before = store.stats();
    const [waiter, holder] = await Promise.all([Fixture.worker(store.name), Fixture.worker(store.name)]);
    void holder.send('holdLock').catch(() => {});
    await holder.line('locked');
    await waitFor(() => lockOwner(store.name) === holder.pid, 'the child to hold the lock');

    const blocked = waiter.request('stats');
    let answered = false;
    void blocked.then(() => (answered = true), () => {});
    await sleep(100);
    expect(answered).toBe(false); // it waits for the lock rather than failing
    await holder.kill('SIGKILL');
    const { stats } = await blocked;
    expect(stats.recoveries).toBe(before.recoveries + 1);
    expect(stats.objectCount).toBe(1);
    expect((await waiter.request('get', { id, timeout: 0 })).size).toBe(1000);
    expect((await waiter.end()).code).toBe(0);
    expect(store.stats().recoveries).toBe(before.recoveries + 1);
  });
});

describe('a process killed at a crash point of create', () => {
  const cases = ['create:after-allocate', 'create:before-commit', 'create:after-commit'].flatMap((point) => [
    [point, 'the hole below the top'],
    [point, 'the top'],
  ]);

  it.each(cases)('%s, allocating from %s', async (point, source) => {
    const store = createStore({ spillDirectory: false });
    const { kept, hole } = populate(store);
    // Either leave the hole for the child's object, or plug it so that it comes from the top.
    const plug = newObjectId();
    if (source === 'the top') store.put(plug, bytesFor(9, hole - 64 - 64));
    const residents = source === 'the top' ? [...kept, { id: plug, seed: 9, size: hole - 128 }] : kept;
    const views = await Promise.all(residents.map((resident) => store.get(resident.id)));
    const before = store.stats();

    const id = newObjectId();
    const child = await Fixture.worker(store.name);
    // The child's put dies (SIGKILL, from inside the native store) at the crash point.
    await expect(child.send('crash', { point, id, seed: 42, size: MiB })).rejects.toThrow(/exited/);
    expect((await child.exited).signal).toBe('SIGKILL');

    // The next lock recovers. An object committed before the crash is there, unsealed, until its
    // dead creator is reaped; one that was not is simply absent.
    const recovered = store.stats();
    expect(recovered.recoveries).toBe(before.recoveries + 1);
    if (point === 'create:after-commit') {
      expect(store.state(id)).toBe('created');
      expect(recovered).toMatchObject({ objectCount: before.objectCount + 1, bytesInUse: before.bytesInUse + blockSize(MiB) });
    } else {
      expect(store.state(id)).toBe('absent');
      expect(recovered).toMatchObject({ objectCount: before.objectCount, bytesInUse: before.bytesInUse });
    }

    expect(store.reapDeadProcesses()).toBe(1);
    expect(store.state(id)).toBe('absent');
    expect(store.stats()).toMatchObject({
      objectCount: before.objectCount,
      bytesInUse: before.bytesInUse,
      pinnedObjects: residents.length,
      attachedProcesses: 1,
      recoveries: before.recoveries + 1,
    });
    expectIntact(views, residents);

    // The id is usable, and so is every byte.
    store.put(id, bytesFor(43, MiB));
    const view = await store.get(id);
    expectBytes(view.data, bytesFor(43, MiB));
    await expectAllSpaceReusable(store, [...views, view]);
  });
});

describe('a process killed while pinning', () => {
  it('leaves a deleted object deferred until a reap frees it', async () => {
    const store = createStore({ spillDirectory: false });
    const id = newObjectId();
    store.put(id, bytesFor(1, 4 * MiB));
    const child = await Fixture.worker(store.name);
    const held = await child.request('hold', { id, key: 'view' });
    expect(held.size).toBe(4 * MiB);
    store.delete(id);
    expect(store.state(id)).toBe('absent');
    expect(store.stats()).toMatchObject({ objectCount: 0, bytesInUse: blockSize(4 * MiB), pinnedObjects: 1 });

    expect((await child.kill('SIGKILL')).signal).toBe('SIGKILL');
    const before = store.stats();
    // Death alone changes nothing (the child was not in the lock); the reap frees the object.
    expect(before).toMatchObject({ bytesInUse: blockSize(4 * MiB), pinnedObjects: 1, attachedProcesses: 2 });
    expect(store.reapDeadProcesses()).toBe(1);
    expect(store.stats()).toMatchObject({
      objectCount: 0,
      bytesInUse: 0,
      pinnedObjects: 0,
      attachedProcesses: 1,
      recoveries: before.recoveries,
    });
    expect(store.reapDeadProcesses()).toBe(0);
  });

  it('has its pins reaped by an allocation that needs the space', async () => {
    const store = createStore({ capacity: 8 * MiB, spillDirectory: false });
    const id = newObjectId();
    store.put(id, bytesFor(2, 6 * MiB));
    const child = await Fixture.worker(store.name);
    await child.request('hold', { id, key: 'view' });
    store.delete(id);
    expectError(() => store.put(newObjectId(), new Uint8Array(6 * MiB)), ObjectStoreFullError, 'ERR_OBJECT_STORE_FULL');
    await child.kill('SIGKILL');
    const fresh = newObjectId();
    store.put(fresh, bytesFor(3, 6 * MiB)); // fits only once the dead child's pin is dropped
    expect(store.stats()).toMatchObject({ objectCount: 1, bytesInUse: blockSize(6 * MiB), pinnedObjects: 0, attachedProcesses: 1 });
    const view = await store.get(fresh);
    expectBytes(view.data, bytesFor(3, 6 * MiB));
    view.release();
  });

  it('has its pins reaped on every table entry ever used, before and after a recovery', async () => {
    // Reaps scan the object and pin tables only up to the highest entry ever handed out: fill
    // the tables high, free the low entries, then pin high ones from a child that dies while the
    // objects wait, deleted, for their pins to go.
    const store = createStore({ capacity: 8 * MiB, maxObjects: 256, spillDirectory: false });
    const ids = Array.from({ length: 200 }, () => newObjectId());
    ids.forEach((id, seed) => store.put(id, bytesFor(seed, 100)));
    for (const id of ids.slice(0, 150)) store.delete(id);
    const rounds = { before: ids.slice(180, 190), after: ids.slice(190) };
    let live = 50;
    for (const [round, high] of Object.entries(rounds)) {
      const child = await Fixture.worker(store.name);
      for (const [index, id] of high.entries()) await child.request('hold', { id, key: `view${index}` });
      for (const id of high) store.delete(id);
      live -= high.length;
      if (round === 'after') {
        // A holder that dies inside the lock: the next locker recovers, recounting the tables.
        const holder = await Fixture.worker(store.name);
        void holder.send('holdLock').catch(() => {});
        await holder.line('locked');
        await waitFor(() => lockOwner(store.name) === holder.pid, 'the holder to take the lock');
        await holder.kill('SIGKILL');
        expect(store.stats().recoveries).toBe(1);
        expect(store.reapDeadProcesses()).toBe(1);
      }
      expect(store.stats()).toMatchObject({ pinnedObjects: high.length, bytesInUse: (live + high.length) * blockSize(100) });
      await child.kill('SIGKILL');
      expect(store.reapDeadProcesses()).toBe(1);
      expect(store.stats()).toMatchObject({ pinnedObjects: 0, objectCount: live, bytesInUse: live * blockSize(100), attachedProcesses: 1 });
    }
  });

  it('has its pins and unsealed objects reaped when another process attaches', async () => {
    const store = createStore();
    const pinned = newObjectId();
    store.put(pinned, bytesFor(4, 1000));
    const child = await Fixture.worker(store.name);
    await child.request('hold', { id: pinned, key: 'view' });
    const unsealed = newObjectId();
    await child.request('create', { id: unsealed, seed: 5, size: 2000 });
    expect(store.stats()).toMatchObject({ objectCount: 2, pinnedObjects: 2 });
    await child.kill('SIGKILL');

    const next = await Fixture.worker(store.name); // attaching reaps the dead
    expect(store.state(unsealed)).toBe('absent');
    expect(store.stats()).toMatchObject({ objectCount: 1, bytesInUse: blockSize(1000), pinnedObjects: 0, attachedProcesses: 2 });
    // The object the dead child pinned is an ordinary object again.
    expect((await next.request('get', { id: pinned, timeout: 0 })).size).toBe(1000);
    store.delete(pinned);
    expect(store.stats()).toMatchObject({ objectCount: 0, bytesInUse: 0 });
    expect((await next.end()).code).toBe(0);
  });
});
