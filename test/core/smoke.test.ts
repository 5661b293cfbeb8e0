import { describe, it, expect, afterAll, beforeAll } from 'vitest';
import { init, shutdown, get, put, wait, TaskError } from '../../lib/index.js';
import { square, add, fail, bigArray, sumArray, nested, RemoteCounter, context } from './fixtures/tasks.js';

describe('core smoke', () => {
  beforeAll(async () => { await init({ numCpus: 2 }); });
  afterAll(async () => { await shutdown(); });
  it('runs tasks', async () => {
    expect(await get(square.remote(7))).toBe(49);
    expect(await get(add.remote(square.remote(3), 1))).toBe(10);
    const refs = Array.from({ length: 1000 }, (_, i) => square.remote(i));
    const values = await get(refs);
    expect(values[999]).toBe(999 * 999);
  });
  it('errors', async () => {
    const error = await get(fail.remote('bad')).catch((e) => e);
    expect(error).toBeInstanceOf(TaskError);
    expect(error.cause.name).toBe('RangeError');
    expect(error.cause.code).toBe('E_FIXTURE');
  });
  it('big values', async () => {
    const ref = bigArray.remote(100_000);
    const arr = await get(ref) as Float64Array;
    expect(arr.length).toBe(100_000);
    expect(await get(sumArray.remote(ref))).toBe((99_999 * 100_000) / 2);
    expect(await get(sumArray.remote(put(Float64Array.from([1, 2, 3]))))).toBe(6);
  });
  it('nested', async () => {
    expect(await get(nested.remote(10))).toBe(285);
  });
  it('actors', async () => {
    const c = RemoteCounter.remote(10);
    const refs = Array.from({ length: 100 }, () => c.increment.remote(1));
    expect(await get(refs[99])).toBe(110);
    const [ready] = await wait(refs, { numReturns: 100 });
    expect(ready.length).toBe(100);
    expect((await get(context.remote())).isDriver).toBe(false);
  });
});
