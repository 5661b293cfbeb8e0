/**
 * Calls with several returns (numReturns): the caller gets one ref per element of the array the
 * call returns, at once; each is an object of its own (stored or inline, passed on, freed and made
 * again apart from the others), from tasks and actor methods, in the driver and inside workers.
 */
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, expectTypeOf, it } from 'vitest';
import {
  InvalidArgumentError,
  ObjectRef,
  ObjectStore,
  TaskCancelledError,
  TaskError,
  cancel,
  free,
  get,
  init,
  memorySummary,
  put,
  shutdown,
  state,
} from '../../lib/index.js';
import {
  RemoteSplitter,
  bigAndSmall,
  counting,
  countedParts,
  describeArray,
  diesOnce,
  failing,
  forwardParts,
  identity,
  returnCount,
  slowParts,
  splitInside,
  splitThree,
  sum,
  withNested,
} from './fixtures/returns.js';
import { rejection, scratch, until } from './helpers.js';

const files = scratch();
let store: ObjectStore;

beforeAll(async () => {
  await init({ numCpus: 2 });
  store = ObjectStore.attach(state().nodes[0].storeName);
});

afterAll(async () => {
  store.close();
  await shutdown();
  files.cleanup();
});

describe('numReturns', () => {
  it('gives one ref per returned element, each typed by its element, and each its own object', async () => {
    const refs = splitThree.remote(4);
    expectTypeOf(refs).toEqualTypeOf<[ObjectRef<number>, ObjectRef<string>, ObjectRef<number[]>]>();
    expect(refs).toHaveLength(3);
    expect(new Set(refs.map((ref) => ref.id)).size).toBe(3);
    expect(await get(refs)).toEqual([8, 'x is 4', [4, 5]]);
    expect(await get(refs[1])).toBe('x is 4');
    // Set per call too; 1 is the plain single ref.
    const [big, small] = bigAndSmall.options({ numReturns: 2 }).remote(50_000, 3);
    expectTypeOf(big).toEqualTypeOf<ObjectRef<Float64Array>>();
    expect(await get(small)).toBe(50_000);
    const single = bigAndSmall.options({ numReturns: 1 }).remote(10, 1);
    expect(single).toBeInstanceOf(ObjectRef);
    expect(await get(single)).toEqual([new Float64Array(10).fill(1), 10]);
  });

  it('stores a large return and keeps a small one inline; a part passes to a task without the driver reading it, and frees alone', async () => {
    const [big, small] = bigAndSmall.options({ numReturns: 2 }).remote(100_000, 2);
    expect(await get(sum.remote(big))).toBe(200_000);
    expect(store.state(big.id)).toBe('sealed');
    expect(store.state(small.id)).toBe('absent');
    const entries = (await memorySummary()).objects.filter((entry) => entry.objectId === big.id || entry.objectId === small.id);
    expect(entries.map((entry) => [entry.where, entry.madeBy])).toEqual(expect.arrayContaining([['store', 'bigAndSmall'], ['inline', 'bigAndSmall']]));
    expect(entries).toHaveLength(2);
    free(big);
    await until(() => store.state(big.id) === 'absent', 'the freed part to leave the store');
    expect(await get(small)).toBe(100_000);
  });

  it("lets an argument go once every return is freed (the returns' lineage held it till then)", async () => {
    const argument = put(new Float64Array(50_000).fill(9));
    const [length, first] = describeArray.options({ numReturns: 2 }).remote(argument);
    free(argument);
    expect(await get([length, first])).toEqual([50_000, 9]);
    free(length);
    await new Promise((resolve) => setTimeout(resolve, 100));
    expect(store.state(argument.id)).toBe('sealed');
    free(first);
    await until(() => store.state(argument.id) === 'absent', 'the argument to leave the store');
    const listed = (await memorySummary()).objects.map((entry) => entry.objectId);
    expect(listed).not.toContain(length.id);
    expect(listed).not.toContain(first.id);
  });

  it('fails every ref, saying what came back, when the result is not an array of numReturns', async () => {
    const short = returnCount.options({ numReturns: 3 }).remote(2);
    for (const ref of short) {
      const error = await rejection(get(ref));
      expect(error).toBeInstanceOf(TaskError);
      expect(error.message).toMatch(/returnCount has numReturns 3, so it must return an array of 3 values; it returned an array of 2/);
    }
    const [first] = identity.options({ numReturns: 2 }).remote(5);
    expect((await rejection(get(first))).message).toMatch(/it returned number/);
    const [fromObject] = identity.options({ numReturns: 2 }).remote({ a: 1 });
    expect((await rejection(get(fromObject))).message).toMatch(/it returned a Object/);
  });

  it("fails every ref with the call's error", async () => {
    const refs = failing.options({ numReturns: 2 }).remote();
    for (const ref of refs) {
      const error = await rejection(get(ref));
      expect(error).toBeInstanceOf(TaskError);
      expect(error.cause?.name ?? error.message).toMatch(/RangeError/);
      expect(error.message).toMatch(/no parts today/);
    }
  });

  it('retries a call whose worker died, and every return arrives once', async () => {
    const [seven, array] = diesOnce.options({ numReturns: 2 }).remote(files.path('died'));
    expect(await get(seven)).toBe(7);
    expect((await get(array))[49_999]).toBe(3);
  });

  it('makes a lost return again by running the call once more; the others stay as they were', async () => {
    const counter = files.path('runs');
    const [ones, twos, three] = countedParts.options({ numReturns: 3 }).remote(counter);
    expect((await get(ones))[0]).toBe(1);
    expect(await get(three)).toBe(3);
    store.delete(twos.id);
    expect((await get(twos))[49_999]).toBe(2);
    expect(readFileSync(counter, 'utf8')).toBe('xx');
    expect((await get(ones))[49_999]).toBe(1);
    expect(store.state(twos.id)).toBe('sealed');
  });

  it('cancels the whole call through any of its refs', async () => {
    const refs = slowParts.options({ numReturns: 2 }).remote(30_000);
    await until(() => (state().tasks.running ?? 0) > 0, 'the call to start');
    cancel(refs[1]);
    for (const ref of refs) expect(await rejection(get(ref))).toBeInstanceOf(TaskCancelledError);
  });

  it('keeps a ref nested in a return alive with that return', async () => {
    const [holder, one] = withNested.options({ numReturns: 2 }).remote();
    expect(await get(one)).toBe(1);
    const { inner } = (await get(holder)) as { inner: ObjectRef<Float64Array> };
    expect((await get(inner))[0]).toBe(5);
  });

  it('works inside workers: refs to the parts, one handed to another task, one returned', async () => {
    expect(await get(splitInside.remote(3))).toBe(6 + 3 + 4);
    const { total, small } = (await get(forwardParts.remote(20_000))) as { total: number; small: ObjectRef<number> };
    expect(total).toBe(40_000);
    expect(await get(small)).toBe(20_000);
  });

  it('splits the results of actor methods, sync and async', async () => {
    await using splitter = RemoteSplitter.remote();
    const [n, next] = splitter.parts.options({ numReturns: 2 }).remote(5);
    expectTypeOf(n).toEqualTypeOf<ObjectRef<number>>();
    expect(await get([n, next])).toEqual([5, 6]);
    const [label, values] = splitter.later.options({ numReturns: 2 }).remote(30_000);
    expect(await get(label)).toBe('n=30000');
    expect((await get(values))[29_999]).toBe(30_000);
    expect(store.state(values.id)).toBe('sealed');
    const wrong = splitter.parts.options({ numReturns: 3 }).remote(1) as unknown as ObjectRef<number>[];
    expect((await rejection(get(wrong[2]))).message).toMatch(/must return an array of 3 values; it returned an array of 2/);
    expect(await get(splitter.count.remote())).toBe(2);
  });

  it('refuses bad counts and what numReturns cannot go with, by name', async () => {
    expect(() => returnCount.options({ numReturns: 0 }).remote(0)).toThrow(InvalidArgumentError);
    expect(() => returnCount.options({ numReturns: 1.5 }).remote(0)).toThrow(/task returnCount: numReturns is a whole number from 1 to 10000, got 1.5/);
    expect(() => returnCount.options({ numReturns: 'two' as never }).remote(0)).toThrow(/got string/);
    expect(() => counting.options({ numReturns: 2 }).remote(3)).toThrow(/counting is a generator: each item it yields is a ref already, so it takes no numReturns/);
    await using splitter = RemoteSplitter.remote();
    expect(() => splitter.parts.options({ numReturns: 2, tensorTransport: 'ipc' }).remote(1)).toThrow(/numReturns 2 with tensorTransport 'ipc' is not supported/);
    expect(() => splitter.parts.options({ numReturns: 2, recompute: { task: identity, args: [[1, 2]] } }).remote(1)).toThrow(/numReturns 2 with recompute is not supported/);
    // Nothing was submitted by the refused calls.
    expect(await get(splitter.count.remote())).toBe(0);
  });
});
