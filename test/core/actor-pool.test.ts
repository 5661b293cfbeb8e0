/**
 * ActorPool: calls spread over a fixed set of actors, one per actor at a time; results in
 * submission order or as they finish; actors back at work when their call settles; errors,
 * timeouts, actors leaving and dying, and bad input.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ActorDiedError, ActorPool, GetTimeoutError, InvalidArgumentError, TaskError, get, init, kill, shutdown, type ActorHandle } from '../../lib/index.js';
import { RemoteSquarer, type Squarer } from './fixtures/actor-pool.js';
import { rejection, until } from './helpers.js';

beforeAll(async () => {
  await init({ numCpus: 3 });
});

afterAll(async () => {
  await shutdown();
});

const square = (actor: ActorHandle<Squarer>, x: number) => actor.square.remote(x);
const slowly = (actor: ActorHandle<Squarer>, [x, ms]: [number, number]) => actor.square.remote(x, ms);

describe('ActorPool', () => {
  it('maps values over its actors, one call per actor at a time, in order or as they finish', async () => {
    const actors = [RemoteSquarer.remote(), RemoteSquarer.remote()];
    const pool = new ActorPool(actors);
    const ordered: number[] = [];
    for await (const value of pool.map(slowly, [[1, 40], [2, 0], [3, 20], [4, 0], [5, 0], [6, 10]] as [number, number][])) ordered.push(value);
    expect(ordered).toEqual([1, 4, 9, 16, 25, 36]);
    const unordered: number[] = [];
    for await (const value of pool.mapUnordered(slowly, [[7, 1500], [8, 0], [9, 0]] as [number, number][])) unordered.push(value);
    expect([...unordered].sort((a, b) => a - b)).toEqual([49, 64, 81]);
    expect(unordered.at(-1)).toBe(49);
    const stats = await get(actors.map((actor) => actor.stats.remote()));
    expect(stats.map((entry) => entry.mostRunning)).toEqual([1, 1]);
    expect(stats.every((entry) => entry.calls > 0)).toBe(true);
    expect(stats[0]!.calls + stats[1]!.calls).toBe(9);
    for (const actor of actors) kill(actor);
  });

  it('runs callsPerActor calls on each actor at once when asked', async () => {
    const actor = RemoteSquarer.options({ maxConcurrency: 8 }).remote();
    const pool = new ActorPool([actor], { callsPerActor: 3 });
    const values: number[] = [];
    for await (const value of pool.map(slowly, [1, 2, 3, 4, 5, 6, 7].map((x): [number, number] => [x, 100]))) values.push(value);
    expect(values).toEqual([1, 4, 9, 16, 25, 36, 49]);
    expect(await get(actor.stats.remote())).toEqual({ calls: 7, mostRunning: 3 });
    expect(pool.popIdle()).toBe(actor);
    expect(() => new ActorPool([], { callsPerActor: 0 })).toThrow(/callsPerActor is a whole number, 1 or more, got 0/);
    kill(actor);
  });

  it('gives results by submission order with getNext and by finish with getNextUnordered', async () => {
    const pool = new ActorPool([RemoteSquarer.remote(), RemoteSquarer.remote()]);
    pool.submit(slowly, [2, 1500]);
    pool.submit(slowly, [3, 0]);
    expect(pool.hasNext()).toBe(true);
    expect(await pool.getNextUnordered()).toBe(9);
    expect(await pool.getNext()).toBe(4);
    expect(pool.hasNext()).toBe(false);
    pool.submit(slowly, [4, 200]);
    pool.submit(slowly, [5, 0]);
    expect(await pool.getNext()).toBe(16);
    expect(await pool.getNext()).toBe(25);
    for (const actor of pool.actors) kill(actor);
  });

  it('puts an actor back to work once its call settles, before its result is read', async () => {
    const actor = RemoteSquarer.remote();
    const pool = new ActorPool([actor]);
    for (let x = 1; x <= 3; x++) pool.submit(square, x);
    expect(pool.hasFree()).toBe(false);
    await until(() => pool.hasFree(), 'the pool to run every call unread');
    expect((await get(actor.stats.remote())).calls).toBe(3);
    expect([await pool.getNext(), await pool.getNext(), await pool.getNext()]).toEqual([1, 4, 9]);
    kill(actor);
  });

  it("throws a call's error from its result, and goes on", async () => {
    const pool = new ActorPool([RemoteSquarer.remote()]);
    pool.submit(square, -1);
    pool.submit(square, 2);
    const error = await rejection(pool.getNext());
    expect(error).toBeInstanceOf(TaskError);
    expect(error.message).toMatch(/cannot square -1 today/);
    expect(await pool.getNext()).toBe(4);
    for (const actor of pool.actors) kill(actor);
  });

  it('times out a wait for a result, which stays next', async () => {
    const pool = new ActorPool([RemoteSquarer.remote()]);
    pool.submit(slowly, [6, 400]);
    expect(await rejection(pool.getNext({ timeout: 20 }))).toBeInstanceOf(GetTimeoutError);
    expect(await rejection(pool.getNextUnordered({ timeout: 20 }))).toBeInstanceOf(GetTimeoutError);
    expect(await pool.getNext()).toBe(36);
    for (const actor of pool.actors) kill(actor);
  });

  it('lends idle actors out and takes them back; one pushed takes the waiting work at once', async () => {
    const [first, second] = [RemoteSquarer.remote(), RemoteSquarer.remote()];
    const pool = new ActorPool([first]);
    const lent = pool.popIdle();
    expect(lent).toBe(first);
    expect(pool.actors).toEqual([]);
    expect(pool.popIdle()).toBeUndefined();
    expect(await rejection(pool.getNext())).toBeInstanceOf(InvalidArgumentError);
    pool.push(second);
    pool.submit(square, 3);
    pool.submit(square, 4);
    pool.push(first);
    expect(await Promise.all([pool.getNext(), pool.getNext()])).toEqual([9, 16]);
    expect(pool.hasNext()).toBe(false);
    kill(first);
    kill(second);
  });

  it('drops an actor that dies for good; once none is left, waiting work fails naming why', async () => {
    const [doomed, survivor] = [RemoteSquarer.remote(), RemoteSquarer.remote()];
    const pool = new ActorPool([doomed, survivor]);
    await get([doomed.stats.remote(), survivor.stats.remote()]);
    pool.submit(slowly, [1, 5_000]);
    pool.submit(slowly, [2, 0]);
    pool.submit(slowly, [3, 0]);
    kill(doomed);
    expect(await rejection(pool.getNext())).toBeInstanceOf(ActorDiedError);
    expect([await pool.getNext(), await pool.getNext()]).toEqual([4, 9]);
    expect(pool.actors).toEqual([survivor]);
    pool.submit(slowly, [4, 5_000]);
    pool.submit(slowly, [5, 0]);
    kill(survivor);
    expect(await rejection(pool.getNext())).toBeInstanceOf(ActorDiedError);
    const waiting = await rejection(pool.getNext());
    expect(waiting).toBeInstanceOf(ActorDiedError);
    expect(waiting.message).toMatch(/no actor is left in the ActorPool/);
    expect(await rejection(Promise.resolve().then(() => pool.submit(square, 1)).then(() => pool.getNext()))).toBeInstanceOf(ActorDiedError);
  });

  it('drops the calls not started when a map stops early', async () => {
    const actor = RemoteSquarer.remote();
    const pool = new ActorPool([actor]);
    for await (const value of pool.map(slowly, [[1, 50], [2, 50], [3, 50], [4, 50]] as [number, number][])) {
      expect(value).toBe(1);
      break;
    }
    expect(pool.hasNext()).toBe(false);
    await until(() => pool.hasFree(), 'the running call to finish');
    expect((await get(actor.stats.remote())).calls).toBeLessThanOrEqual(2);
    kill(actor);
  });

  it('reads its input as results are taken: an endless input works, and stopping closes it', async () => {
    const actor = RemoteSquarer.remote();
    const pool = new ActorPool([actor]);
    let read = 0;
    let closed = false;
    function* naturals() {
      try {
        for (let x = 1; ; x++) {
          read++;
          yield x;
        }
      } finally {
        closed = true;
      }
    }
    const squares: number[] = [];
    for await (const value of pool.mapUnordered(square, naturals())) {
      squares.push(value);
      if (squares.length === 5) break;
    }
    expect(squares.sort((a, b) => a - b)).toEqual([1, 4, 9, 16, 25]);
    expect(closed).toBe(true);
    // Two ahead of the reader per call slot, and the one read when the fifth was taken.
    expect(read).toBeLessThanOrEqual(8);
    await until(() => pool.hasFree(), 'the running call to finish');
    expect((await get(actor.stats.remote())).calls).toBeLessThanOrEqual(8);
    kill(actor);
  });

  it('refuses bad input by name, and a closed pool fails waiting work', async () => {
    const actor = RemoteSquarer.remote();
    const pool = new ActorPool([actor]);
    expect(() => pool.submit('square' as never, 1)).toThrow(/submit\(\) takes a function \(actor, value\) => ref, got string/);
    expect(() => pool.push({} as never)).toThrow(InvalidArgumentError);
    expect(() => pool.push(actor)).toThrow(/is in this pool already/);
    pool.submit(() => 42 as never, 1);
    expect((await rejection(pool.getNext())).message).toMatch(/a pool call must return the ref of one actor call/);
    expect(await rejection(pool.getNext({ timeout: -1 }))).toBeInstanceOf(InvalidArgumentError);
    pool.submit(slowly, [2, 300]);
    pool.submit(slowly, [3, 0]);
    pool.close();
    expect(await pool.getNext()).toBe(4);
    expect((await rejection(pool.getNext())).code).toBe('ERR_POOL_CLOSED');
    expect(() => pool.submit(square, 1)).toThrow(/closed/);
    kill(actor);
  });
});
