/**
 * Zero-copy views: Uint8Arrays over the shared mapping, TypedArrays and Arrow tables made on them
 * without copying, and the pin a view holds until it is released or garbage-collected.
 */
import { Table, Utf8, makeVector, tableFromArrays, tableFromIPC, tableToIPC, vectorFromArray } from 'apache-arrow';
import { statfsSync } from 'node:fs';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { InvalidArgumentError, ObjectStore, newObjectId } from '../../lib/index.js';
import { viewPinsHeld } from '../../lib/store/object-store.js';
import { bytesFor, digestFor } from './fixtures/content.js';
import {
  Fixture,
  MiB,
  cleanup,
  createStore,
  blockSize,
  expectBytes,
  expectError,
  finish,
  track,
} from './helpers.js';

afterEach(cleanup);
afterAll(finish);

describe('zero-copy views', () => {
  it('are Uint8Arrays over the shared mapping, not copies', async () => {
    const store = createStore();
    const id = newObjectId();
    const builder = store.create(id, 4096);
    // The builder's bytes are the object's bytes: filling them is the whole write.
    builder.data.set(bytesFor(1, 4096));
    builder.seal();

    const a = await store.get(id);
    const b = await store.get(id);
    expectBytes(a.data, bytesFor(1, 4096));
    expect(a.data.byteOffset % 64).toBe(0); // aligned for any TypedArray
    // Two views of one object share memory: a write through one shows through the other.
    a.data[10] ^= 0xff;
    expect(b.data[10]).toBe(a.data[10]);

    // So does another mapping of the same segment (an attachment in this process).
    const attached = track(ObjectStore.attach(store.name));
    const c = await attached.get(id);
    expect(c.data.buffer).not.toBe(a.data.buffer);
    expect(c.data[10]).toBe(a.data[10]);
    a.data[10] ^= 0xff;
    expectBytes(c.data, bytesFor(1, 4096));
    for (const view of [a, b, c]) view.release();
  });

  it('make TypedArrays on view.data.buffer without copying', async () => {
    const store = createStore();
    const values = Float64Array.from({ length: 10_000 }, (_, i) => i * 0.5 - 17);
    const id = newObjectId();
    store.put(id, values);
    const view = await store.get(id);
    const floats = new Float64Array(view.data.buffer, view.data.byteOffset, view.data.byteLength / 8);
    expect(floats.buffer).toBe(view.data.buffer);
    expect(floats).toEqual(values);
    // The array reads the store's memory: what the view sees, it sees.
    const other = await store.get(id);
    new Float64Array(other.data.buffer, other.data.byteOffset, 1)[0] = 42;
    expect(floats[0]).toBe(42);
    view.release();
    other.release();
  });

  it('make Arrow tables with tableFromIPC without copying', async () => {
    const store = createStore();
    const table = new Table({
      x: makeVector(Float64Array.from({ length: 1000 }, (_, i) => Math.sqrt(i))),
      n: makeVector(Int32Array.from({ length: 1000 }, (_, i) => i - 500)),
      s: vectorFromArray(
        Array.from({ length: 1000 }, (_, i) => `row-${i}`),
        new Utf8(),
      ),
    });
    const id = newObjectId();
    store.put(id, tableToIPC(table));
    const view = await store.get(id);
    const read = tableFromIPC(view.data);
    expect(read.numRows).toBe(1000);
    expect(read.schema.fields.map((field) => field.name)).toEqual(['x', 'n', 's']);
    const x = read.getChild('x')!;
    const n = read.getChild('n')!;
    const s = read.getChild('s')!;
    expect(x.data[0].values.buffer).toBe(view.data.buffer);
    expect(n.data[0].values.buffer).toBe(view.data.buffer);
    expect(s.data[0].values.buffer).toBe(view.data.buffer);
    expect(s.data[0].valueOffsets.buffer).toBe(view.data.buffer);
    expect(Array.from(x.toArray() as Float64Array)).toEqual(Array.from(table.getChild('x')!.toArray() as Float64Array));
    expect(Array.from(n.toArray() as Int32Array)).toEqual(Array.from(table.getChild('n')!.toArray() as Int32Array));
    expect(s.get(0)).toBe('row-0');
    expect(s.get(999)).toBe('row-999');
    view.release();
  });

  it('release unpins at once and leaves the view empty', async () => {
    const store = createStore();
    const id = newObjectId();
    store.put(id, bytesFor(2, 1000));
    const view = await store.get(id);
    const disposed = await store.get(id);
    expect(store.stats().pinnedObjects).toBe(1);
    view.release();
    expect(view.released).toBe(true);
    expect(view.size).toBe(0);
    expect(view.data.byteLength).toBe(0);
    // The other view still pins it.
    expect(store.stats().pinnedObjects).toBe(1);
    expectBytes(disposed.data, bytesFor(2, 1000));
    disposed[Symbol.dispose]();
    expect(disposed.data.byteLength).toBe(0);
    expect(store.stats().pinnedObjects).toBe(0);
  });

  it('are listed with the processes that pin them, deleted ones too, and counted until released', async () => {
    const store = createStore();
    const id = newObjectId();
    store.put(id, bytesFor(3, 1000));
    const held = viewPinsHeld();
    const [count, bytes] = [held.count, held.bytes];
    const first = await store.get(id);
    const second = await store.get(id);
    expect(viewPinsHeld()).toEqual({ count: count + 2, bytes: bytes + 2000 });
    expect(store.pinned()).toEqual([{ objectId: id, state: 'sealed', deleted: false, size: 1000, holders: [{ pid: process.pid, pins: 2 }] }]);
    // Deleted while pinned: invisible to get, listed (and its bytes in use) until the last pin goes.
    store.delete(id);
    expect(store.pinned()).toEqual([{ objectId: id, state: 'sealed', deleted: true, size: 1000, holders: [{ pid: process.pid, pins: 2 }] }]);
    first.release();
    expect(store.pinned()[0].holders).toEqual([{ pid: process.pid, pins: 1 }]);
    second.release();
    expect(store.pinned()).toEqual([]);
    expect(viewPinsHeld()).toEqual({ count, bytes });
    expect(store.stats().bytesInUse).toBe(0);
  });

  it('keeps its object resident while the store fills and spills around it', async () => {
    const store = createStore({ capacity: 8 * MiB });
    const kept = newObjectId();
    store.put(kept, bytesFor(3, MiB));
    const view = await store.get(kept);
    for (let i = 0; i < 24; i++) store.put(newObjectId(), bytesFor(100 + i, MiB));
    const stats = store.stats();
    expect(stats.totalSpilledObjects).toBeGreaterThan(0);
    expect(store.state(kept)).toBe('sealed');
    expectBytes(view.data, bytesFor(3, MiB));
    view.release();
    // Once released it is fair game for spilling, and comes back intact.
    for (let i = 0; i < 8; i++) store.put(newObjectId(), bytesFor(200 + i, MiB));
    expect(store.state(kept)).toBe('spilled');
    const again = await store.get(kept);
    expectBytes(again.data, bytesFor(3, MiB));
    again.release();
  });
});

describe('views and garbage collection (child process with --expose-gc)', () => {
  it('a dropped view unpins its object when collected; a held one never does', async () => {
    const store = createStore();
    const ids = [newObjectId(), newObjectId()];
    const doubles = Float64Array.from({ length: 512 }, (_, i) => i / 4);
    store.put(ids[0], tableToIPC(tableFromArrays({ v: doubles })));
    store.put(ids[1], bytesFor(4, 70_000));
    const child = await Fixture.worker(store.name, { exposeGc: true });

    // The child holds the first view, and only the data array of the second.
    const first = await child.request('hold', { id: ids[0], key: 'view', arrow: true });
    expect(first.zeroCopy).toBe(true);
    expect(first.values).toEqual(Array.from(doubles));
    await child.request('hold', { id: ids[1], key: 'data', as: 'data' });
    expect(store.stats().pinnedObjects).toBe(2);

    // Collections do not touch what is reachable.
    await child.request('gc');
    expect(store.stats().pinnedObjects).toBe(2);

    // Dropping the view (without release) lets the collector unpin it.
    await child.request('drop', { key: 'view' });
    await collectUntil(child, () => store.stats().pinnedObjects === 1);
    expect(store.stats().pinnedObjects).toBe(1);

    // A data array alone keeps its pin, until it goes too.
    await child.request('gc');
    expect(store.stats().pinnedObjects).toBe(1);
    await child.request('drop', { key: 'data' });
    await collectUntil(child, () => store.stats().pinnedObjects === 0);

    // With no pins left, deleting frees at once.
    for (const id of ids) store.delete(id);
    expect(store.stats()).toMatchObject({ objectCount: 0, bytesInUse: 0, pinnedObjects: 0 });
    expect((await child.end()).code).toBe(0);
  });

  it('a view collected after its store closed does no harm', async () => {
    const store = createStore();
    const id = newObjectId();
    store.put(id, bytesFor(5, 1000));
    const child = await Fixture.worker(store.name, { exposeGc: true });
    await child.request('hold', { id, key: 'view' });
    await child.request('close');
    expect(store.stats().pinnedObjects).toBe(0); // closing dropped the child's pins
    await child.request('drop', { key: 'view' });
    await child.request('gc');
    // The child is alive and well, and the store is untouched.
    const stats = await child.send('stats');
    expect(stats.error?.code).toBe('ERR_STORE_CLOSED');
    expect(store.stats()).toMatchObject({ objectCount: 1, pinnedObjects: 0 });
    expect((await child.end()).code).toBe(0);
  });
});

const GiB = 2 ** 30;
const shm = statfsSync('/dev/shm');
// These segments are sparse: only the few pages written are ever backed by memory.
const roomForLargeSegments = shm.bavail * shm.bsize > 12 * GiB;

describe.skipIf(!roomForLargeSegments)('views in segments over 4 GiB (sparse, prefaulting off)', () => {
  it('reads objects anywhere in the data region, across window boundaries, in both processes', async () => {
    const store = createStore({ capacity: 9 * GiB, prefaultWindow: 0, maxObjects: 64, spillDirectory: false });
    // Unsealed fillers, never touched, push the next objects to where the view windows meet.
    const fill = (size: number) => store.create(newObjectId(), size);
    const small: Array<{ id: string; seed: number; size: number }> = [];
    const put = (seed: number, size: number) => {
      const id = newObjectId();
      store.put(id, bytesFor(seed, size));
      small.push({ id, seed, size });
    };
    fill(2.5 * GiB);
    put(1, 100_000); // in the second window only
    // Next, an object whose data starts just below 4 GiB - 4 KiB and runs past 4 GiB.
    const top = blockSize(2.5 * GiB) + blockSize(100_000);
    const crossingBlock = 4 * GiB - 4096 - 1024;
    fill(crossingBlock - top - 64);
    put(2, 8192);
    put(3, 100_000); // above 4 GiB: the third window
    fill(1.5 * GiB);
    // An object over 2 GiB that crosses its window's end gets a buffer of its own.
    const bigId = newObjectId();
    const big = store.create(bigId, 3 * GiB);
    expect(big.data.byteLength).toBe(3 * GiB);
    big.write(bytesFor(4, 4096), 0);
    big.write(bytesFor(5, 4096), 3 * GiB - 4096);
    big.seal();

    for (const object of small) {
      const view = await store.get(object.id);
      expectBytes(view.data, bytesFor(object.seed, object.size), `object ${object.seed}`);
      view.release();
    }
    const view = await store.get(bigId);
    expect(view.size).toBe(3 * GiB);
    expectBytes(view.data.subarray(0, 4096), bytesFor(4, 4096));
    expectBytes(view.data.subarray(3 * GiB - 4096), bytesFor(5, 4096));
    view.release();

    const child = await Fixture.worker(store.name);
    const reply = await child.request('getMany', { ids: small.map((object) => object.id), timeout: 0 });
    for (const object of small) expect(reply.results[object.id].digest).toBe(digestFor(object.seed, object.size));
    expect((await child.end()).code).toBe(0);
  });

  it('refuses an object too large to view without leaking it', () => {
    const store = createStore({ capacity: 9 * GiB, prefaultWindow: 0, maxObjects: 64, spillDirectory: false });
    const id = newObjectId();
    expectError(() => store.create(id, 5 * GiB), InvalidArgumentError, 'ERR_OUT_OF_RANGE');
    expect(store.state(id)).toBe('absent');
    expect(store.stats()).toMatchObject({ objectCount: 0, bytesInUse: 0, pinnedObjects: 0 });
    // The space is all there.
    const whole = store.create(newObjectId(), 4 * GiB - 4096 - 64);
    whole.abort();
    expect(store.stats()).toMatchObject({ objectCount: 0, bytesInUse: 0, pinnedObjects: 0 });
  });
});

/** Asks the child to collect garbage until `done` (a hang guard of 20 rounds, not a timing check). */
async function collectUntil(child: Fixture, done: () => boolean): Promise<void> {
  for (let round = 0; round < 20 && !done(); round++) await child.request('gc');
  expect(done()).toBe(true);
}
