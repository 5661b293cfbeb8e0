/**
 * Several processes on one store: each reads what the others put (contents checked both ways),
 * races to create the same ids settle with exactly one creator, gets wait for seals made by other
 * processes, and only an object's creator may write or seal it.
 */
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { GetTimeoutError, ObjectNotFoundError, ObjectStateError, newObjectId } from '../../lib/index.js';
import { bytesFor, digestFor, metadataFor } from './fixtures/content.js';
import {
  Fixture,
  blockSize,
  cleanup,
  createStore,
  expectBytes,
  expectError,
  finish,
  expectRejection,
  sleep,
} from './helpers.js';

afterEach(cleanup);
afterAll(finish);

describe('several processes', () => {
  it('read each other’s objects, contents and metadata checked both ways', async () => {
    const store = createStore();
    const [a, b] = await Promise.all([Fixture.worker(store.name), Fixture.worker(store.name)]);
    expect(store.stats().attachedProcesses).toBe(3);

    // The parent puts; both children read.
    const mine = Array.from({ length: 8 }, (_, i) => ({ id: newObjectId(), seed: i, size: 1000 * i * i + 3 }));
    for (const object of mine) store.put(object.id, bytesFor(object.seed, object.size), { metadata: metadataFor(object.seed) });
    const reads = await Promise.all([a, b].map((child) => child.request('getMany', { ids: mine.map((o) => o.id), timeout: 10_000 })));
    for (const reply of reads) {
      for (const object of mine) {
        expect(reply.results[object.id]).toEqual({
          size: object.size,
          digest: digestFor(object.seed, object.size),
          metadata: `meta:${object.seed}`,
        });
      }
    }

    // Each child puts its own; the parent and the other child read them.
    const theirs = [a, b].map((_, c) => Array.from({ length: 6 }, (__, i) => ({ id: newObjectId(), seed: 100 * (c + 1) + i, size: 50_000 + i })));
    await Promise.all(
      [a, b].map(async (child, c) => {
        for (const object of theirs[c]) await child.request('put', { id: object.id, seed: object.seed, size: object.size, withMetadata: true });
      }),
    );
    for (const object of theirs.flat()) {
      const view = await store.get(object.id, { timeout: 10_000 });
      expectBytes(view.data, bytesFor(object.seed, object.size));
      expectBytes(view.metadata, metadataFor(object.seed));
      view.release();
    }
    const crossed = await Promise.all([
      a.request('getMany', { ids: theirs[1].map((o) => o.id), timeout: 10_000 }),
      b.request('getMany', { ids: theirs[0].map((o) => o.id), timeout: 10_000 }),
    ]);
    crossed.forEach((reply, c) => {
      for (const object of theirs[1 - c]) expect(reply.results[object.id].digest).toBe(digestFor(object.seed, object.size));
    });

    const stats = store.stats();
    expect(stats.objectCount).toBe(8 + 12);
    expect(stats.pinnedObjects).toBe(0);
    expect((await a.end()).code).toBe(0);
    expect((await b.end()).code).toBe(0);
    expect(store.stats().attachedProcesses).toBe(1);
  });

  it('settle races to create the same ids with exactly one creator each', async () => {
    const store = createStore();
    const children = await Promise.all([0, 1, 2].map(() => Fixture.worker(store.name)));
    const ids = Array.from({ length: 40 }, () => newObjectId());
    const seeds = ids.map((_, i) => 1000 + i);
    const size = 20_000;
    // Everyone puts the same ids (same contents) at once.
    const outcomes = await Promise.all(children.map((child) => child.request('putMany', { ids, seeds, size })));
    for (const id of ids) {
      const results = outcomes.map((reply) => reply.outcome[id]);
      expect(results.filter((r) => r === 'created')).toHaveLength(1);
      expect(results.filter((r) => r === 'ERR_OBJECT_EXISTS')).toHaveLength(2);
    }
    expect(store.stats()).toMatchObject({ objectCount: 40, bytesInUse: 40 * blockSize(size, metadataFor(1000).length), pinnedObjects: 0 });
    // Every process reads the same bytes.
    const reads = await Promise.all(children.map((child) => child.request('getMany', { ids, timeout: 10_000 })));
    for (const [i, id] of ids.entries()) {
      for (const reply of reads) expect(reply.results[id].digest).toBe(digestFor(seeds[i], size));
      const view = await store.get(id);
      expectBytes(view.data, bytesFor(seeds[i], size));
      view.release();
    }
    for (const child of children) expect((await child.end()).code).toBe(0);
  });
});

describe('waiting across processes', () => {
  it('a child’s get waits for the parent’s seal', async () => {
    const store = createStore();
    const child = await Fixture.worker(store.name);
    const id = newObjectId();
    const builder = store.create(id, 100_000, { metadata: metadataFor(5) });
    const pending = child.request('get', { id, timeout: 30_000 });
    let answered = false;
    void pending.then(() => (answered = true), () => {});
    await sleep(100);
    expect(answered).toBe(false);
    builder.data.set(bytesFor(5, 100_000));
    builder.seal();
    expect(await pending).toMatchObject({ size: 100_000, digest: digestFor(5, 100_000), metadata: 'meta:5' });
    // A child's get of something never sealed times out with GetTimeoutError.
    const timedOut = await child.send('get', { id: newObjectId(), timeout: 50 });
    expect(timedOut.ok).toBe(false);
    expect(timedOut.error).toMatchObject({ name: 'GetTimeoutError', code: 'ERR_GET_TIMEOUT' });
    expect((await child.end()).code).toBe(0);
  });

  it('the parent’s get waits for a child’s seal, and for a child’s put', async () => {
    const store = createStore();
    const child = await Fixture.worker(store.name);
    const id = newObjectId();
    await child.request('create', { id, seed: 6, size: 300_000, withMetadata: true });
    expect(store.state(id)).toBe('created');
    await expectRejection(store.get(id, { timeout: 50 }), GetTimeoutError, 'ERR_GET_TIMEOUT');
    const sealed = store.get(id, { timeout: 30_000 });
    const later = newObjectId();
    const put = store.get(later, { timeout: 30_000 });
    await sleep(50);
    await child.request('seal', { id });
    await child.request('put', { id: later, seed: 7, size: 12_345 });
    const [first, second] = await Promise.all([sealed, put]);
    expectBytes(first.data, bytesFor(6, 300_000));
    expectBytes(first.metadata, metadataFor(6));
    expectBytes(second.data, bytesFor(7, 12_345));
    first.release();
    second.release();
    expect((await child.end()).code).toBe(0);
  });
});

describe('ownership of unsealed objects', () => {
  it('only the creator may write, seal or abort', async () => {
    const store = createStore();
    const child = await Fixture.worker(store.name);
    const id = newObjectId();
    store.create(id, 64);
    for (const op of ['write', 'seal']) {
      const reply = await child.send(op, { id, seed: 1, size: 8 });
      expect(reply.ok).toBe(false);
      expect(reply.error).toMatchObject({ name: 'ObjectStateError', code: 'ERR_OBJECT_STATE' });
    }
    const abort = await child.send('abort', { id });
    expect(abort.ok).toBe(false);
    expect(abort.error.name).toBe('ObjectStateError');
    expect(store.state(id)).toBe('created');

    const theirs = newObjectId();
    await child.request('create', { id: theirs, seed: 2, size: 64 });
    expectError(() => store.seal(theirs), ObjectStateError, 'ERR_OBJECT_STATE');
    expectError(() => store.write(theirs, new Uint8Array(1)), ObjectStateError, 'ERR_OBJECT_STATE');
    expectError(() => store.abort(theirs), ObjectStateError, 'ERR_OBJECT_SEALED');
    await child.request('seal', { id: theirs });
    const view = await store.get(theirs);
    expectBytes(view.data, bytesFor(2, 64));
    view.release();
    expect((await child.end()).code).toBe(0);
  });

  it('frees an unsealed object deleted by another process once its creator learns of it', async () => {
    const store = createStore();
    const child = await Fixture.worker(store.name);
    const id = newObjectId();
    await child.request('create', { id, seed: 3, size: 100_000 });
    // The creator may be writing into it right now: the delete hides it but cannot free it yet.
    store.delete(id);
    expect(store.state(id)).toBe('absent');
    expect(store.stats()).toMatchObject({ objectCount: 0, bytesInUse: blockSize(100_000), pinnedObjects: 1 });
    // The creator's seal finds nothing, and drops its pin: the block is free.
    const seal = await child.send('seal', { id });
    expect(seal.error).toMatchObject({ name: 'ObjectNotFoundError', code: 'ERR_OBJECT_NOT_FOUND' });
    expect(store.stats()).toMatchObject({ objectCount: 0, bytesInUse: 0, pinnedObjects: 0 });

    // The same through abort.
    const other = newObjectId();
    await child.request('create', { id: other, seed: 4, size: 5000 });
    store.delete(other);
    const abort = await child.send('abort', { id: other });
    expect(abort.error).toMatchObject({ code: 'ERR_OBJECT_NOT_FOUND' });
    expect(store.stats()).toMatchObject({ objectCount: 0, bytesInUse: 0, pinnedObjects: 0 });
    expectError(() => store.delete(other), ObjectNotFoundError, 'ERR_OBJECT_NOT_FOUND');
    expect((await child.end()).code).toBe(0);
  });

  it('drops a closing process’s pins and unsealed objects', async () => {
    const store = createStore();
    const child = await Fixture.worker(store.name);
    const pinned = newObjectId();
    store.put(pinned, bytesFor(8, 1000));
    await child.request('hold', { id: pinned, key: 'view' });
    const unsealed = newObjectId();
    await child.request('create', { id: unsealed, seed: 9, size: 1000 });
    store.delete(pinned);
    expect(store.stats()).toMatchObject({ objectCount: 1, pinnedObjects: 2, bytesInUse: 2 * blockSize(1000) });
    await child.request('close');
    expect(store.state(unsealed)).toBe('absent');
    expect(store.stats()).toMatchObject({ objectCount: 0, pinnedObjects: 0, bytesInUse: 0, attachedProcesses: 1 });
    expect((await child.end()).code).toBe(0);
  });
});
