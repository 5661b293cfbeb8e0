/**
 * Object lifecycle in one process: create -> write -> seal -> get -> release -> delete, every
 * transition's typed errors, waiting gets, deferred deletes, abort, close and metadata.
 */
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import {
  GetTimeoutError,
  ObjectExistsError,
  ObjectNotFoundError,
  ObjectStateError,
  StoreClosedError,
  newObjectId,
  type ObjectStore,
} from '../../lib/index.js';
import { bytesFor, metadataFor } from './fixtures/content.js';
import {
  MiB,
  blockSize,
  cleanup,
  createStore,
  expectBytes,
  expectError,
  finish,
  expectRejection,
  segmentExists,
  sleep,
} from './helpers.js';

afterEach(cleanup);
afterAll(finish);

function usage(store: ObjectStore) {
  const { objectCount, bytesInUse, pinnedObjects } = store.stats();
  return { objectCount, bytesInUse, pinnedObjects };
}

describe('state transitions', () => {
  it('walks create -> write -> seal -> get -> release -> delete', async () => {
    const store = createStore();
    const id = newObjectId();
    const bytes = bytesFor(1, 1000);
    const metadata = metadataFor(1);
    expect(store.state(id)).toBe('absent');

    const builder = store.create(id, bytes.length, { metadata });
    expect(builder.id).toBe(id);
    expect(builder.data.byteLength).toBe(1000);
    expect(store.state(id)).toBe('created');
    expect(store.contains(id)).toBe(false);
    // The creator's pin keeps an unsealed object in place.
    expect(usage(store)).toEqual({ objectCount: 1, bytesInUse: blockSize(1000, metadata.length), pinnedObjects: 1 });
    expect(store.getIfSealed(id)).toBeUndefined();

    // Both write paths: the store's write and the builder's writable view of the mapping.
    builder.write(bytes.subarray(0, 600));
    builder.data.set(bytes.subarray(600), 600);
    builder.seal();
    expect(store.state(id)).toBe('sealed');
    expect(store.contains(id)).toBe(true);
    expect(builder.data.byteLength).toBe(0); // detached once sealed
    expect(usage(store)).toEqual({ objectCount: 1, bytesInUse: blockSize(1000, metadata.length), pinnedObjects: 0 });

    const view = await store.get(id);
    expect(view.id).toBe(id);
    expect(view.size).toBe(1000);
    expectBytes(view.data, bytes);
    expectBytes(view.metadata, metadata);
    expect(view.released).toBe(false);
    expect(store.stats().pinnedObjects).toBe(1);

    view.release();
    expect(view.released).toBe(true);
    expect(view.data.byteLength).toBe(0);
    expect(store.stats().pinnedObjects).toBe(0);
    view.release(); // a second release is a no-op
    expect(store.stats().pinnedObjects).toBe(0);

    store.delete(id);
    expect(store.state(id)).toBe('absent');
    expect(usage(store)).toEqual({ objectCount: 0, bytesInUse: 0, pinnedObjects: 0 });
    expectError(() => store.delete(id), ObjectNotFoundError, 'ERR_OBJECT_NOT_FOUND');
  });

  it('put creates a sealed object and leaves no pin behind', async () => {
    const store = createStore();
    const id = newObjectId();
    store.put(id, bytesFor(2, 5000));
    expect(store.state(id)).toBe('sealed');
    expect(usage(store)).toEqual({ objectCount: 1, bytesInUse: blockSize(5000), pinnedObjects: 0 });
    const view = store.getIfSealed(id)!;
    expectBytes(view.data, bytesFor(2, 5000));
    expect(view.metadata).toBeNull();
    view.release();
  });

  it('accepts every kind of byte source and zero-length objects', async () => {
    const store = createStore();
    const bytes = bytesFor(3, 256);
    const sources = [
      bytes,
      Buffer.from(bytes),
      bytes.buffer,
      new DataView(bytes.buffer),
      new Uint16Array(bytes.buffer),
    ];
    for (const source of sources) {
      const id = newObjectId();
      store.put(id, source);
      const view = await store.get(id);
      expectBytes(view.data, bytes);
      view.release();
    }
    // Only the bytes a view covers are stored, wherever it starts in its buffer.
    for (const source of [bytes.subarray(16, 48), new DataView(bytes.buffer, 16, 32)]) {
      const partial = newObjectId();
      store.put(partial, source);
      const view = await store.get(partial);
      expectBytes(view.data, bytes.subarray(16, 48));
      view.release();
    }

    const empty = newObjectId();
    store.put(empty, new Uint8Array(0));
    const emptyView = await store.get(empty);
    expect(emptyView.size).toBe(0);
    emptyView.release();
    expect(store.state(empty)).toBe('sealed');
  });

  it('rejects a write after seal and a double seal with ObjectStateError', async () => {
    const store = createStore();
    const id = newObjectId();
    const builder = store.create(id, 64);
    builder.seal();
    expect(expectError(() => builder.write(new Uint8Array(8)), ObjectStateError, 'ERR_OBJECT_SEALED').message).toMatch(/sealed/);
    expectError(() => store.write(id, new Uint8Array(8), 8), ObjectStateError, 'ERR_OBJECT_SEALED');
    expectError(() => builder.seal(), ObjectStateError, 'ERR_OBJECT_SEALED');
    expectError(() => store.seal(id), ObjectStateError, 'ERR_OBJECT_SEALED');
    const put = newObjectId();
    store.put(put, new Uint8Array(4));
    expectError(() => store.seal(put), ObjectStateError, 'ERR_OBJECT_SEALED');
    expectError(() => store.write(put, new Uint8Array(1)), ObjectStateError, 'ERR_OBJECT_SEALED');
    // None of that changed the object.
    expect(store.state(id)).toBe('sealed');
    expect(usage(store)).toEqual({ objectCount: 2, bytesInUse: blockSize(64) + blockSize(4), pinnedObjects: 0 });
  });

  it('rejects operations on unknown ids with ObjectNotFoundError', () => {
    const store = createStore();
    const id = newObjectId();
    expectError(() => store.delete(id), ObjectNotFoundError, 'ERR_OBJECT_NOT_FOUND');
    expectError(() => store.seal(id), ObjectNotFoundError, 'ERR_OBJECT_NOT_FOUND');
    expectError(() => store.write(id, new Uint8Array(1)), ObjectNotFoundError, 'ERR_OBJECT_NOT_FOUND');
    expectError(() => store.abort(id), ObjectNotFoundError, 'ERR_OBJECT_NOT_FOUND');
    expect(store.getIfSealed(id)).toBeUndefined();
    expect(store.state(id)).toBe('absent');
  });

  it('rejects a create or put of an existing id with ObjectExistsError and changes nothing', async () => {
    const store = createStore();
    const sealed = newObjectId();
    store.put(sealed, bytesFor(4, 100));
    const unsealed = newObjectId();
    const builder = store.create(unsealed, 100);
    const before = usage(store);
    expectError(() => store.create(sealed, 10), ObjectExistsError, 'ERR_OBJECT_EXISTS');
    expectError(() => store.put(sealed, new Uint8Array(10)), ObjectExistsError, 'ERR_OBJECT_EXISTS');
    expectError(() => store.create(unsealed, 10), ObjectExistsError, 'ERR_OBJECT_EXISTS');
    expectError(() => store.put(unsealed, new Uint8Array(10)), ObjectExistsError, 'ERR_OBJECT_EXISTS');
    expect(usage(store)).toEqual(before);
    const view = await store.get(sealed);
    expectBytes(view.data, bytesFor(4, 100));
    view.release();
    builder.data.set(bytesFor(5, 100));
    builder.seal();
    const second = await store.get(unsealed);
    expectBytes(second.data, bytesFor(5, 100));
    second.release();
  });

  it('aborts an unsealed object: it is gone, its space is free and its id reusable', async () => {
    const store = createStore();
    const id = newObjectId();
    const builder = store.create(id, 4096, { metadata: metadataFor(6) });
    builder.data.fill(7);
    builder.abort();
    expect(builder.data.byteLength).toBe(0);
    expect(store.state(id)).toBe('absent');
    expect(usage(store)).toEqual({ objectCount: 0, bytesInUse: 0, pinnedObjects: 0 });
    expectError(() => builder.seal(), ObjectNotFoundError, 'ERR_OBJECT_NOT_FOUND');
    expectError(() => store.abort(id), ObjectNotFoundError, 'ERR_OBJECT_NOT_FOUND');

    // store.abort works as well as the builder's.
    store.create(id, 10);
    store.abort(id);
    expect(store.state(id)).toBe('absent');

    store.put(id, bytesFor(8, 32));
    expectError(() => store.abort(id), ObjectStateError, 'ERR_OBJECT_SEALED');
    const view = await store.get(id);
    expectBytes(view.data, bytesFor(8, 32));
    view.release();
  });

  it('deletes an unsealed object at once, dropping the creator pin', () => {
    const store = createStore();
    const id = newObjectId();
    const builder = store.create(id, 1024);
    store.delete(id);
    expect(store.state(id)).toBe('absent');
    expect(builder.data.byteLength).toBe(0);
    expect(usage(store)).toEqual({ objectCount: 0, bytesInUse: 0, pinnedObjects: 0 });
    expectError(() => builder.seal(), ObjectNotFoundError, 'ERR_OBJECT_NOT_FOUND');
  });
});

describe('get', () => {
  it('times out on an unsealed object with GetTimeoutError', async () => {
    const store = createStore();
    const id = newObjectId();
    const builder = store.create(id, 8);
    const error = await expectRejection(store.get(id, { timeout: 50 }), GetTimeoutError, 'ERR_GET_TIMEOUT');
    expect(error.message).toContain(id);
    expect(error.message).toContain('created');
    await expectRejection(store.get(id, { timeout: 0 }), GetTimeoutError, 'ERR_GET_TIMEOUT');
    // An id nobody created times out the same way.
    await expectRejection(store.get(newObjectId(), { timeout: 20 }), GetTimeoutError, 'ERR_GET_TIMEOUT');
    // The timed-out gets left no pin and no waiter behind: the object seals and reads normally.
    builder.seal();
    expect(store.stats().pinnedObjects).toBe(0);
    const view = await store.get(id, { timeout: 0 });
    expect(view.size).toBe(8);
    view.release();
  });

  it('resolves a waiting get when the object is sealed later', async () => {
    const store = createStore();
    const id = newObjectId();
    const builder = store.create(id, 2048);
    const first = store.get(id, { timeout: 30_000 });
    const second = store.get(id); // no timeout: waits as long as it takes
    let settled = false;
    void first.finally(() => (settled = true));
    await sleep(30);
    expect(settled).toBe(false);
    builder.data.set(bytesFor(9, 2048));
    builder.seal();
    const [a, b] = await Promise.all([first, second]);
    expectBytes(a.data, bytesFor(9, 2048));
    expectBytes(b.data, bytesFor(9, 2048));
    expect(store.stats().pinnedObjects).toBe(1);
    a.release();
    b.release();
    expect(store.stats().pinnedObjects).toBe(0);
  });

  it('resolves a waiting get when an absent object is put later, each waiter with its own object', async () => {
    const store = createStore();
    const ids = [newObjectId(), newObjectId(), newObjectId()];
    const gets = ids.map((id) => store.get(id, { timeout: 30_000 }));
    await sleep(10);
    ids.forEach((id, i) => store.put(id, bytesFor(10 + i, 300 + i)));
    const views = await Promise.all(gets);
    views.forEach((view, i) => {
      expect(view.id).toBe(ids[i]);
      expectBytes(view.data, bytesFor(10 + i, 300 + i));
      view.release();
    });
  });

  it('rejects pending gets with StoreClosedError when the store closes', async () => {
    const store = createStore();
    const pending = store.get(newObjectId(), { timeout: 30_000 });
    store.close();
    await expectRejection(pending, StoreClosedError, 'ERR_STORE_CLOSED');
  });
});

describe('deferred delete', () => {
  it('hides a pinned object at once and frees it only after the last release', async () => {
    const store = createStore();
    const id = newObjectId();
    const bytes = bytesFor(20, 100_000);
    store.put(id, bytes);
    const first = await store.get(id);
    const second = await store.get(id);
    const size = blockSize(bytes.length);
    expect(usage(store)).toEqual({ objectCount: 1, bytesInUse: size, pinnedObjects: 1 });

    store.delete(id);
    expect(store.state(id)).toBe('absent');
    expect(store.contains(id)).toBe(false);
    expect(store.getIfSealed(id)).toBeUndefined();
    expectError(() => store.delete(id), ObjectNotFoundError, 'ERR_OBJECT_NOT_FOUND');
    // Invisible, but its memory is still held by the pins.
    expect(usage(store)).toEqual({ objectCount: 0, bytesInUse: size, pinnedObjects: 1 });
    expectBytes(first.data, bytes);

    // The id is free for reuse at once; the old views still read the old bytes.
    const replacement = bytesFor(21, 50);
    store.put(id, replacement);
    const fresh = await store.get(id);
    expectBytes(fresh.data, replacement);
    expectBytes(second.data, bytes);
    expect(usage(store)).toEqual({ objectCount: 1, bytesInUse: size + blockSize(50), pinnedObjects: 2 });

    first.release();
    expect(usage(store)).toEqual({ objectCount: 1, bytesInUse: size + blockSize(50), pinnedObjects: 2 });
    second.release();
    expect(usage(store)).toEqual({ objectCount: 1, bytesInUse: blockSize(50), pinnedObjects: 1 });
    fresh.release();
    store.delete(id);
    expect(usage(store)).toEqual({ objectCount: 0, bytesInUse: 0, pinnedObjects: 0 });
  });

  it('frees a deleted object when its view is disposed', async () => {
    const store = createStore();
    const id = newObjectId();
    store.put(id, bytesFor(22, 64));
    const view = await store.get(id);
    store.delete(id);
    expect(store.stats().bytesInUse).toBe(blockSize(64));
    view[Symbol.dispose]();
    expect(view.released).toBe(true);
    expect(usage(store)).toEqual({ objectCount: 0, bytesInUse: 0, pinnedObjects: 0 });
  });
});

describe('metadata', () => {
  it('round-trips metadata through put, create and get', async () => {
    const store = createStore();
    const cases: Array<[number, Uint8Array | undefined]> = [
      [0, metadataFor(1)],
      [1, metadataFor(2)],
      [100_000, bytesFor(3, 70_000)],
      [65, new Uint8Array([0, 255, 0])],
      [10, undefined],
      [10, new Uint8Array(0)],
    ];
    for (const [i, [size, metadata]] of cases.entries()) {
      const put = newObjectId();
      store.put(put, bytesFor(100 + i, size), { metadata });
      const created = newObjectId();
      const builder = store.create(created, size, { metadata });
      builder.data.set(bytesFor(200 + i, size));
      builder.seal();
      for (const [id, seed] of [
        [put, 100 + i],
        [created, 200 + i],
      ] as const) {
        const view = await store.get(id);
        expectBytes(view.data, bytesFor(seed, size));
        if (metadata && metadata.length > 0) expectBytes(view.metadata, metadata);
        else expect(view.metadata).toBeNull();
        view.release();
      }
    }
  });

  it('keeps metadata apart from the data, and copies it out of the store', async () => {
    const store = createStore();
    const id = newObjectId();
    const metadata = metadataFor(7);
    store.put(id, new Uint8Array(3).fill(0xaa), { metadata });
    const view = await store.get(id);
    expectBytes(view.data, new Uint8Array(3).fill(0xaa));
    view.release();
    // The metadata copy outlives the release.
    expectBytes(view.metadata, metadata);
    // Metadata counts against the capacity.
    expect(store.stats().bytesInUse).toBe(blockSize(3, metadata.length));
  });
});

describe('close', () => {
  it('rejects every operation after close with StoreClosedError', async () => {
    const store = createStore();
    const id = newObjectId();
    store.put(id, bytesFor(30, 16));
    const unsealed = newObjectId();
    const builder = store.create(unsealed, 16);
    store.close();
    expect(store.closed).toBe(true);
    const closed = [
      () => store.put(newObjectId(), new Uint8Array(1)),
      () => store.create(newObjectId(), 1),
      () => store.getIfSealed(id),
      () => store.state(id),
      () => store.contains(id),
      () => store.delete(id),
      () => store.seal(unsealed),
      () => store.write(unsealed, new Uint8Array(1)),
      () => store.abort(unsealed),
      () => store.stats(),
      () => store.reapDeadProcesses(),
      () => builder.write(new Uint8Array(1)),
      () => builder.seal(),
    ];
    for (const operation of closed) expectError(operation, StoreClosedError, 'ERR_STORE_CLOSED');
    await expectRejection(store.get(id), StoreClosedError, 'ERR_STORE_CLOSED');
    await expectRejection(store.get(id, { timeout: 10 }), StoreClosedError, 'ERR_STORE_CLOSED');
    store.close(); // closing twice is harmless
  });

  it('unlinks the segment on close, while views handed out stay readable', async () => {
    const store = createStore({ capacity: 8 * MiB });
    const id = newObjectId();
    store.put(id, bytesFor(31, 4096));
    const view = await store.get(id);
    expect(store.isOwner).toBe(true);
    expect(segmentExists(store.name)).toBe(true);
    store.close();
    expect(segmentExists(store.name)).toBe(false);
    expectBytes(view.data, bytesFor(31, 4096));
    view.release(); // after close: no error, and the buffer is detached
    expect(view.data.byteLength).toBe(0);
  });

  it('closes through Symbol.dispose and Symbol.asyncDispose', async () => {
    const first = createStore({ capacity: 4 * MiB });
    first[Symbol.dispose]();
    expect(first.closed).toBe(true);
    expect(segmentExists(first.name)).toBe(false);
    const second = createStore({ capacity: 4 * MiB });
    await second[Symbol.asyncDispose]();
    expect(second.closed).toBe(true);
    expect(segmentExists(second.name)).toBe(false);
  });
});
