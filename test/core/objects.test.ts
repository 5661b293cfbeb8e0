/**
 * Objects: values up to 100 KiB inline, larger ones and typed arrays through the store, read
 * zero-copy in the driver and in tasks; ownership and reference counting (free, using, handles
 * held by tasks and by containing values).
 */
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { tableFromArrays, type Table } from 'apache-arrow';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InvalidArgumentError, ObjectRef, free, get, init, isStoreMemory, kill, put, shutdown, state, wait } from '../../lib/index.js';
import { RemoteColumnKeeper, RemoteStash } from './fixtures/actors.js';
import { bigArray, gated, identity, sumAfter, sumArray } from './fixtures/core.js';
import { openGate, rejection, scratch, started, scriptArgs, until } from './helpers.js';

const files = scratch();
const run = promisify(execFile);
const KiB = 1024;

beforeAll(async () => {
  // Workers (actors included, spawned later) that can be told to collect garbage, to test
  // release by finalizers deterministically. This file runs in its own process.
  process.env.TRELLIS_WORKER_NODE_ARGS = '--expose-gc';
  await init({ numCpus: 2, objectStoreMemory: 256 << 20 });
});

afterAll(async () => {
  delete process.env.TRELLIS_WORKER_NODE_ARGS;
  await shutdown();
  files.cleanup();
});

const storeCount = () => state().nodes[0].store.objectCount;
const ownedCount = () => state().objects.count;

/** Floats, so that msgpack cannot pack them into single bytes. */
const floats = (n: number) => Float64Array.from({ length: n }, (_, i) => i + 0.5);

describe('where values live', () => {
  it('values up to 100 KiB travel inline; larger ones go to the store', async () => {
    const baseline = storeCount();
    const small: ObjectRef<unknown>[] = [put(new Uint8Array(100 * KiB)), put(Float64Array.of(1, 2, 3)), put({ text: 'x'.repeat(50 * KiB) })];
    expect(storeCount()).toBe(baseline);
    const large: ObjectRef<unknown>[] = [
      put(new Uint8Array(100 * KiB + 1)),
      put(floats(20_000)),
      put(Array.from(floats(20_000))), // a plain array, msgpack over 100 KiB
      put(Buffer.alloc(200 * KiB, 7)),
    ];
    expect(storeCount()).toBe(baseline + large.length);
    expect(((await get(small[0])) as Uint8Array).byteLength).toBe(100 * KiB);
    expect(await get(large[2])).toEqual(Array.from(floats(20_000)));
    const buffer = (await get(large[3])) as Buffer;
    expect(Buffer.isBuffer(buffer)).toBe(true);
    expect(buffer.length).toBe(200 * KiB);
    expect(buffer[200 * KiB - 1]).toBe(7);
    free([...small, ...large]);
    expect(storeCount()).toBe(baseline);
  });

  it('a big Float64Array returned by a task is read zero-copy in the driver', async () => {
    const ref = bigArray.remote(200_000);
    const values = (await get(ref)) as Float64Array;
    expect(values).toBeInstanceOf(Float64Array);
    expect(values.length).toBe(200_000);
    expect(values[123_456]).toBe(123_456);
    // The store's shared memory, not a private copy: a buffer over exactly this object.
    expect(isStoreMemory(values.buffer)).toBe(true);
    expect(values.buffer.byteLength).toBe(values.byteLength);
    // Read again while the first is alive: the same buffer (no second one for V8 to account).
    const again = (await get(ref)) as Float64Array;
    expect(again.buffer).toBe(values.buffer);
    expect(again[123_456]).toBe(123_456);
    free(ref);
  });

  it('a stored array passed to another task is read there zero-copy', async () => {
    // Every handle is freed, so that no collection later changes the store's object count.
    using produced = bigArray.remote(100_000);
    using first = sumArray.remote(produced);
    expect(await get(first)).toEqual({ total: (99_999 * 100_000) / 2, zeroCopy: true });
    // A big typed array given directly as an argument goes through the store too.
    using direct = sumArray.remote(floats(50_000));
    expect(await get(direct)).toEqual({ total: (50_000 * 50_000) / 2, zeroCopy: true });
    using stored = put(floats(50_000));
    using viaPut = sumArray.remote(stored);
    expect(await get(viaPut)).toEqual({ total: (50_000 * 50_000) / 2, zeroCopy: true });
    // Small ones are copied inline and arrive intact.
    using small = sumArray.remote(Float64Array.of(1, 2, 3));
    expect((await get(small)).total).toBe(6);
  });

  it('a column kept by user code keeps its object pinned after the table is collected', async () => {
    const keeper = RemoteColumnKeeper.remote();
    const n = 50_000; // 400 KB: stored, read zero-copy
    const table = tableFromArrays({ x: floats(n) });
    const ref = put(table);
    expect(await get(keeper.keep.remote(ref))).toBe(n);
    free(ref);
    // The table is collected in the actor; only its column is left, and it pins the object.
    await get(keeper.collect.remote());
    // Objects of the same size would take its memory, were it freed: the column would read them.
    const others = Array.from({ length: 4 }, () => put(tableFromArrays({ x: new Float64Array(n).fill(7) })));
    expect(await get(keeper.sum.remote())).toBe((n * n) / 2);
    free(others);
    await get(keeper.drop.remote());
    kill(keeper);
  });

  it('Arrow tables go through the store and come back as tables', async () => {
    const table = tableFromArrays({ x: floats(1000), y: Int32Array.from({ length: 1000 }, (_, i) => i) });
    using ref = identity.remote(table);
    const back = (await get(ref)) as Table;
    expect(back.numRows).toBe(1000);
    expect(back.getChild('x')!.get(999)).toBe(999.5);
    expect(back.getChild('y')!.get(10)).toBe(10);
  });
});

describe('ownership and reference counts', () => {
  it('free() deletes a put object once its last handle goes', async () => {
    const baseline = storeCount();
    const owned = ownedCount();
    const ref = put(floats(50_000));
    expect(storeCount()).toBe(baseline + 1);
    expect(ownedCount()).toBe(owned + 1);
    free(ref);
    expect(ref.live).toBe(false);
    expect(storeCount()).toBe(baseline);
    expect(ownedCount()).toBe(owned);
    // A disposed handle cannot be read; disposing twice is harmless.
    const error = await rejection(get(ref));
    expect(error).toBeInstanceOf(InvalidArgumentError);
    expect(error.code).toBe('ERR_REF_DISPOSED');
    free(ref);
  });

  it('`using` releases a ref at the end of its block', async () => {
    const baseline = storeCount();
    {
      using ref = put(floats(50_000));
      expect((await get(ref)).length).toBe(50_000);
      expect(storeCount()).toBe(baseline + 1);
    }
    expect(storeCount()).toBe(baseline);
  });

  it('a task result in the store is deleted when its ref is freed', async () => {
    const baseline = storeCount();
    const ref = bigArray.remote(50_000);
    await wait([ref]);
    expect(storeCount()).toBe(baseline + 1);
    free(ref);
    expect(storeCount()).toBe(baseline);
  });

  it('a value read in the driver stays readable after its ref is freed', async () => {
    const baseline = storeCount();
    const ref = bigArray.remote(50_000);
    const values = (await get(ref)) as Float64Array;
    free(ref);
    // The array pins the memory it views: still intact, though the object is gone from lookups.
    expect(storeCount()).toBe(baseline);
    expect(values[49_999]).toBe(49_999);
    expect(values.reduce((a, b) => a + b, 0)).toBe((49_999 * 50_000) / 2);
  });

  it('a task argument is held until the task finishes, even after the driver frees it', async () => {
    const baseline = storeCount();
    const gate = files.path('held');
    const ref = put(floats(50_000));
    using signal = gated.remote(gate, 'gate');
    const result = sumAfter.remote(signal, ref);
    free(ref);
    expect(storeCount()).toBe(baseline + 1);
    await until(() => started(gate), 'the gate task to start');
    openGate(gate);
    expect(await get(result)).toEqual({ after: 'gate', total: (50_000 * 50_000) / 2 });
    // The result's lineage keeps its arguments while the result is referenced.
    free(result);
    expect(storeCount()).toBe(baseline);
  });

  it('a ref nested in a value keeps its object alive as long as the value', async () => {
    const baseline = storeCount();
    const inner = put(floats(50_000));
    const outer = put({ inner, label: 'outer' });
    free(inner);
    expect(storeCount()).toBe(baseline + 1);
    const got = (await get(outer)) as { inner: ObjectRef<Float64Array>; label: string };
    expect(got.inner).toBeInstanceOf(ObjectRef);
    expect((await get(got.inner)).length).toBe(50_000);
    free(outer);
    expect(storeCount()).toBe(baseline + 1); // `got.inner` is still a live handle
    free(got.inner);
    expect(storeCount()).toBe(baseline);
  });

  it('an object an actor put and returned inside its result lives while anyone holds it', async () => {
    const baseline = storeCount();
    const stash = RemoteStash.remote();
    const outer = stash.stash.remote(30_000);
    const [inner] = (await get(outer)) as [ObjectRef<Float64Array>];
    expect(inner).toBeInstanceOf(ObjectRef);
    const values = await get(inner);
    expect(values.length).toBe(30_000);
    expect(values[29_999]).toBe(1);
    expect(storeCount()).toBe(baseline + 1);
    free([outer, inner]);
    // The actor still holds its own handle.
    expect(storeCount()).toBe(baseline + 1);
    await get(stash.drop.remote());
    await until(() => storeCount() === baseline, 'the actor-put object to be deleted');
  });

  it('a worker handle dropped without free() is released by garbage collection', async () => {
    const baseline = storeCount();
    const stash = RemoteStash.remote();
    const outer = stash.forget.remote(30_000);
    const [inner] = (await get(outer)) as [ObjectRef<Float64Array>];
    free([outer, inner]);
    expect(await get(stash.collect.remote())).toBe(true);
    // Finalizers run after the collection, in the worker's own time: collect until they have.
    for (let i = 0; i < 200 && storeCount() !== baseline; i++) await get(stash.collect.remote());
    expect(storeCount()).toBe(baseline);
  });

  it('a driver handle dropped without free() is released by garbage collection', async () => {
    const script = fileURLToPath(new URL('./fixtures/gc-driver.ts', import.meta.url));
    const { stdout } = await run(process.execPath, ['--expose-gc', ...scriptArgs(script)], { timeout: 60_000 });
    const counts = JSON.parse(stdout.trim().split('\n').pop()!);
    expect(counts.afterPut).toBe(counts.baseline + 1);
    expect(counts.afterPutCollected).toBe(counts.baseline);
    expect(counts.afterTask).toBe(counts.baseline + 1);
    expect(counts.afterTaskCollected).toBe(counts.baseline);
  });

  it('many large puts freed in a loop leave the store as it was', async () => {
    const baseline = storeCount();
    for (let i = 0; i < 50; i++) {
      using ref = put(new Float64Array(256 * KiB)); // 2 MiB each, 100 MiB in all
      // The result holds its argument (lineage) until the result's handle goes too.
      using sum = sumArray.remote(ref);
      expect((await get(sum)).total).toBe(0);
    }
    // Every object is deleted. (Their bytes are freed only when the worker's arrays viewing them
    // are collected: the worker's pins outlive the objects until its next garbage collection.)
    expect(storeCount()).toBe(baseline);
  });
});
