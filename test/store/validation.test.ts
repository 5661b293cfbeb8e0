/**
 * Bad input gets a typed error with a stable `code`, and leaves the store as it was.
 */
import { existsSync, rmSync, statfsSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import {
  InvalidArgumentError,
  ObjectExistsError,
  ObjectNotFoundError,
  ObjectStore,
  ObjectStoreError,
  ObjectStoreFullError,
  ObjectTooLargeError,
  StoreClosedError,
  TrellisError,
  isObjectId,
  newObjectId,
} from '../../lib/index.js';
import { sequentialObjectId } from '../../lib/store/object-id.js';
import {
  MiB,
  cleanup,
  createStore,
  expectError,
  finish,
  expectRejection,
  segmentExists,
  segmentName,
} from './helpers.js';

afterEach(cleanup);
afterAll(finish);

const malformedIds: Array<[string, string]> = [
  ['empty', ''],
  ['too short', 'a'.repeat(39)],
  ['too long', 'a'.repeat(41)],
  ['not hex', 'g'.repeat(40)],
  ['hex with a space', `${'a'.repeat(39)} `],
  ['hex with a prefix', `0x${'a'.repeat(38)}`],
  ['upper-case hex', 'A'.repeat(40)],
  ['multi-byte characters', 'é'.repeat(20)],
];

describe('object ids', () => {
  it('newObjectId makes distinct well-formed ids', () => {
    const ids = new Set(Array.from({ length: 2000 }, () => newObjectId()));
    expect(ids.size).toBe(2000);
    for (const id of ids) expect(isObjectId(id)).toBe(true);
  });

  it('sequentialObjectId: well-formed, distinct, reproducible ids that differ in the hashed bytes', () => {
    const base = Buffer.from(newObjectId(), 'hex');
    const numbers = [0, 1, 2, 255, 256, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 7, Number.MAX_SAFE_INTEGER];
    const ids = numbers.map((n) => sequentialObjectId(base, n));
    expect(new Set(ids).size).toBe(numbers.length);
    for (const id of ids) expect(isObjectId(id)).toBe(true);
    expect(sequentialObjectId(base, 0)).toBe(base.toString('hex'));
    expect(numbers.map((n) => sequentialObjectId(base, n))).toEqual(ids);
    // Only the first eight bytes (the ones the store's index hashes) vary along a sequence.
    for (const id of ids) expect(id.slice(16)).toBe(base.toString('hex').slice(16));
    // Consecutive ids scatter over the index rather than fill a run of adjacent slots.
    const slots = new Set(Array.from({ length: 1024 }, (_, n) => Buffer.from(sequentialObjectId(base, n), 'hex').readUInt32LE(0) & 0xffff));
    const runs = [...slots].filter((slot) => slots.has((slot + 1) & 0xffff)).length;
    expect(runs).toBeLessThan(100);
    expect(() => sequentialObjectId(base.subarray(1), 0)).toThrow(InvalidArgumentError);
    for (const bad of [-1, 1.5, Number.NaN, 2 ** 53]) expect(() => sequentialObjectId(base, bad)).toThrow(InvalidArgumentError);
  });

  it.each(malformedIds)('rejects a malformed id (%s) everywhere with ERR_INVALID_OBJECT_ID', async (_, id) => {
    expect(isObjectId(id)).toBe(false);
    const store = createStore({ capacity: 4 * MiB });
    const operations = [
      () => store.put(id, new Uint8Array(1)),
      () => store.create(id, 1),
      () => store.getIfSealed(id),
      () => store.state(id),
      () => store.contains(id),
      () => store.delete(id),
      () => store.seal(id),
      () => store.write(id, new Uint8Array(1)),
      () => store.abort(id),
    ];
    for (const operation of operations) expectError(operation, InvalidArgumentError, 'ERR_INVALID_OBJECT_ID');
    // get reports it through its promise rather than throwing.
    await expectRejection(store.get(id), InvalidArgumentError, 'ERR_INVALID_OBJECT_ID');
    expect(store.stats()).toMatchObject({ objectCount: 0, bytesInUse: 0 });
  });

  it('rejects an id that is not a string with InvalidArgumentError', async () => {
    const store = createStore({ capacity: 4 * MiB });
    for (const id of [undefined, null, 42, {}, Buffer.alloc(20)] as unknown as string[]) {
      const error = expectError(() => store.put(id, new Uint8Array(1)), InvalidArgumentError, 'ERR_INVALID_ARGUMENT');
      expect(error.message).toMatch(/id/);
      expectError(() => store.state(id), InvalidArgumentError, 'ERR_INVALID_ARGUMENT');
      await expectRejection(store.get(id), InvalidArgumentError, 'ERR_INVALID_ARGUMENT');
    }
  });
});

describe('sizes and bytes', () => {
  it.each([
    ['negative', -1],
    ['non-integer', 1.5],
    ['NaN', Number.NaN],
    ['infinite', Number.POSITIVE_INFINITY],
    ['beyond 2^53', 2 ** 54],
    ['a string', '10' as unknown as number],
  ])('rejects a %s size with ERR_INVALID_ARGUMENT', (_, size) => {
    const store = createStore({ capacity: 4 * MiB });
    const id = newObjectId();
    expectError(() => store.create(id, size), InvalidArgumentError, 'ERR_INVALID_ARGUMENT');
    expect(store.state(id)).toBe('absent');
    expect(store.stats()).toMatchObject({ objectCount: 0, bytesInUse: 0 });
  });

  it('rejects an object larger than the store with ObjectTooLargeError', () => {
    const store = createStore({ capacity: 8 * MiB });
    const { capacity } = store.stats();
    for (const size of [capacity, capacity + 1, 100 * capacity, 2 ** 52]) {
      const error = expectError(() => store.create(newObjectId(), size), ObjectTooLargeError, 'ERR_OBJECT_TOO_LARGE');
      expect(error).toBeInstanceOf(ObjectStoreFullError);
      expect(error.requested).toBe(size);
      expect(error.capacity).toBe(capacity);
      expect(error.used).toBe(0);
      expect(error.message).toContain(String(size));
    }
    // Metadata counts too.
    const error = expectError(
      () => store.create(newObjectId(), capacity - 64, { metadata: new Uint8Array(64) }),
      ObjectTooLargeError,
      'ERR_OBJECT_TOO_LARGE',
    );
    expect(error.requested).toBe(capacity);
    expectError(() => store.put(newObjectId(), new Uint8Array(capacity + 1)), ObjectTooLargeError, 'ERR_OBJECT_TOO_LARGE');
    expect(store.stats()).toMatchObject({ objectCount: 0, bytesInUse: 0, totalSpilledObjects: 0 });
  });

  it('rejects data and metadata that are not bytes', () => {
    const store = createStore({ capacity: 4 * MiB });
    for (const data of ['text', 42, [1, 2, 3], null, undefined] as unknown as Uint8Array[]) {
      expectError(() => store.put(newObjectId(), data), InvalidArgumentError, 'ERR_INVALID_ARGUMENT');
    }
    expectError(
      () => store.put(newObjectId(), new Uint8Array(1), { metadata: 'meta' as unknown as Uint8Array }),
      InvalidArgumentError,
      'ERR_INVALID_ARGUMENT',
    );
    expectError(
      () => store.create(newObjectId(), 1, { metadata: [1] as unknown as Uint8Array }),
      InvalidArgumentError,
      'ERR_INVALID_ARGUMENT',
    );
    expect(store.stats()).toMatchObject({ objectCount: 0, bytesInUse: 0 });
  });

  it('rejects writes outside the object or at a bad offset', () => {
    const store = createStore({ capacity: 4 * MiB });
    const id = newObjectId();
    const builder = store.create(id, 100);
    expectError(() => builder.write(new Uint8Array(101)), InvalidArgumentError, 'ERR_OUT_OF_RANGE');
    expectError(() => builder.write(new Uint8Array(1), 100), InvalidArgumentError, 'ERR_OUT_OF_RANGE');
    expectError(() => builder.write(new Uint8Array(50), 51), InvalidArgumentError, 'ERR_OUT_OF_RANGE');
    expectError(() => builder.write(new Uint8Array(1), 2 ** 53 - 1), InvalidArgumentError, 'ERR_OUT_OF_RANGE');
    expectError(() => builder.write(new Uint8Array(1), -1), InvalidArgumentError, 'ERR_INVALID_ARGUMENT');
    expectError(() => builder.write(new Uint8Array(1), 0.5), InvalidArgumentError, 'ERR_INVALID_ARGUMENT');
    builder.write(new Uint8Array(50).fill(1), 50); // the last byte is in range
    builder.seal();
    expect(store.state(id)).toBe('sealed');
  });
});

describe('stores', () => {
  it.each([
    ['zero', 0],
    ['negative', -MiB],
    ['non-integer', 4.5 * MiB + 0.5],
    ['NaN', Number.NaN],
  ])('rejects a %s capacity with InvalidArgumentError', (_, capacity) => {
    const name = segmentName('badcap');
    expectError(() => ObjectStore.create({ name, capacity, spillDirectory: false }), InvalidArgumentError, 'ERR_INVALID_ARGUMENT');
    expect(segmentExists(name)).toBe(false);
  });

  it('rejects a capacity below the minimum with InvalidArgumentError', () => {
    const name = segmentName('tiny');
    const error = expectError(() => ObjectStore.create({ name, capacity: MiB, spillDirectory: false }), InvalidArgumentError, 'ERR_INVALID_ARGUMENT');
    expect(error.message).toMatch(/at least/);
    expect(segmentExists(name)).toBe(false);
  });

  it('rejects a capacity larger than /dev/shm has free, before making anything', () => {
    const shm = statfsSync('/dev/shm');
    const free = shm.bavail * shm.bsize;
    const name = segmentName('huge');
    const error = expectError(
      () => ObjectStore.create({ name, capacity: free + 64 * MiB }),
      InvalidArgumentError,
      'ERR_INVALID_ARGUMENT',
    );
    expect(error.message).toContain('/dev/shm');
    expect(segmentExists(name)).toBe(false);
    expect(existsSync(join(tmpdir(), `${name}-spill`))).toBe(false);
  });

  it('leaves no default spill directory behind when the native create fails', () => {
    const name = segmentName('nospill');
    expectError(() => ObjectStore.create({ name, capacity: MiB }), InvalidArgumentError, 'ERR_INVALID_ARGUMENT');
    expect(existsSync(join(tmpdir(), `${name}-spill`))).toBe(false);
  });

  it('rejects a second segment of the same name with ObjectExistsError', async () => {
    const store = createStore({ name: segmentName('twice'), capacity: 4 * MiB });
    const id = newObjectId();
    store.put(id, new Uint8Array([1, 2, 3]));
    expectError(() => ObjectStore.create({ name: store.name, capacity: 4 * MiB, spillDirectory: false }), ObjectExistsError, 'ERR_SEGMENT_EXISTS');
    // The first store is untouched.
    const view = await store.get(id);
    expect(Array.from(view.data)).toEqual([1, 2, 3]);
    view.release();
  });

  it('rejects attaching to a missing segment with ObjectNotFoundError', () => {
    const name = segmentName('missing');
    const error = expectError(() => ObjectStore.attach(name), ObjectNotFoundError, 'ERR_SEGMENT_NOT_FOUND');
    expect(error.message).toContain(name);
    expectError(() => ObjectStore.attach(''), InvalidArgumentError, 'ERR_INVALID_ARGUMENT');
    expectError(() => ObjectStore.attach('a/b'), InvalidArgumentError, 'ERR_INVALID_ARGUMENT');
    expectError(() => ObjectStore.attach(42 as unknown as string), InvalidArgumentError, 'ERR_INVALID_ARGUMENT');
    expect(segmentExists(name)).toBe(false);
  });

  it('rejects attaching to a segment that is not an object store', () => {
    const name = segmentName('bogus');
    writeFileSync(join('/dev/shm', name), Buffer.alloc(64 * 1024, 7));
    try {
      const error = expectError(() => ObjectStore.attach(name), ObjectStoreError, 'ERR_SEGMENT_INVALID');
      expect(error.message).toContain(name);
    } finally {
      rmSync(join('/dev/shm', name), { force: true });
    }
  });

  it('rejects use after close with StoreClosedError, in an attached store too', async () => {
    const store = createStore({ capacity: 4 * MiB });
    const attached = ObjectStore.attach(store.name);
    attached.close();
    expect(attached.closed).toBe(true);
    expect(attached.isOwner).toBe(false);
    expectError(() => attached.put(newObjectId(), new Uint8Array(1)), StoreClosedError, 'ERR_STORE_CLOSED');
    await expectRejection(attached.get(newObjectId()), StoreClosedError, 'ERR_STORE_CLOSED');
    // An attachment closing neither unlinks the segment nor disturbs its owner.
    expect(segmentExists(store.name)).toBe(true);
    store.put(newObjectId(), new Uint8Array(1));
    expect(store.stats().attachedProcesses).toBe(1);
  });

  it('gives every error a class, a name and a code', () => {
    const store = createStore({ capacity: 4 * MiB });
    const errors = [
      expectError(() => store.delete(newObjectId()), ObjectNotFoundError, 'ERR_OBJECT_NOT_FOUND'),
      expectError(() => store.put('x', new Uint8Array(1)), InvalidArgumentError, 'ERR_INVALID_OBJECT_ID'),
      expectError(() => store.create(newObjectId(), 1e12), ObjectTooLargeError, 'ERR_OBJECT_TOO_LARGE'),
    ];
    for (const error of errors) {
      expect(error).toBeInstanceOf(TrellisError);
      expect(error.name).toBe(error.constructor.name);
      expect(typeof (error as TrellisError).code).toBe('string');
    }
  });
});
