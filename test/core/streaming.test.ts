/**
 * Streaming calls: generator functions and methods whose items reach the caller as they are
 * yielded (ObjectRefGenerator), with errors after the items before them, backpressure, early stops,
 * cancellation, retries after a worker's death, callers inside workers, and bad input.
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { afterAll, beforeAll, describe, expect, expectTypeOf, it } from 'vitest';
import {
  GetTimeoutError,
  InvalidArgumentError,
  ObjectRef,
  ObjectRefGenerator,
  RegistrationError,
  TaskCancelledError,
  TaskError,
  WorkerCrashedError,
  ActorDiedError,
  cancel,
  get,
  init,
  memorySummary,
  shutdown,
  put,
  state,
  wait,
} from '../../lib/index.js';
import { RemoteSpeaker, blocks, count, dieMidway, failAfter, firstOf, gated, returnsGenerator, slowReader, sumOfCount, ticker, waitInside } from './fixtures/streaming.js';
import { rejection, scratch, until } from './helpers.js';

const files = scratch();
setFlagsFromString('--expose-gc');
const collectGarbage = runInNewContext('gc') as () => void;

beforeAll(async () => {
  await init({ numCpus: 2 });
});

afterAll(async () => {
  await shutdown();
  files.cleanup();
});

async function collect<T>(stream: ObjectRefGenerator<T>): Promise<T[]> {
  const values: T[] = [];
  for await (const ref of stream) values.push(await get(ref));
  return values;
}

const read = (path: string) => (existsSync(path) ? readFileSync(path, 'utf8') : '');

describe('generator functions', () => {
  it('stream each yielded item as a ref, in order, typed by what the generator yields', async () => {
    const stream = count.remote(5);
    expectTypeOf(stream).toEqualTypeOf<ObjectRefGenerator<number>>();
    expect(stream).toBeInstanceOf(ObjectRefGenerator);
    const first = await stream.next();
    expect(first.done).toBe(false);
    expect(first.value).toBeInstanceOf(ObjectRef);
    expect(await get(first.value!)).toBe(0);
    expect(await collect(stream)).toEqual([1, 2, 3, 4]);
    expect(stream.finished).toBe(true);
    expect((await stream.next()).done).toBe(true);
    expect(await collect(count.remote(0))).toEqual([]);
  });

  it('hands items out before the generator ends, and stored items zero-copy', async () => {
    const progress = files.path('progress');
    const closed = files.path('closed');
    const stream = ticker.remote(progress, closed, 5);
    // A generator that never ends: its first items arrive all the same.
    const values: number[] = [];
    for await (const ref of stream) {
      values.push(await get(ref));
      if (values.length === 3) break;
    }
    expect(values).toEqual([0, 1, 2]);
    const big = blocks.remote(4, 1 << 20);
    let index = 0;
    for await (const array of big.values()) {
      expect(array).toBeInstanceOf(Float64Array);
      expect(array.length).toBe(1 << 17);
      expect(array[0]).toBe(index);
      expect(array[array.length - 1]).toBe(index);
      index++;
    }
    expect(index).toBe(4);
  });

  it('gives the items yielded before an error, then rejects with the error as a TaskError', async () => {
    const stream = failAfter.remote(3);
    const items: string[] = [];
    const error = await rejection(
      (async () => {
        for await (const ref of stream) items.push(await get(ref));
      })(),
    );
    expect(items).toEqual(['item 0', 'item 1', 'item 2']);
    expect(error).toBeInstanceOf(TaskError);
    expect(error.message).toContain('gave out after 3');
    expect(error.cause?.code).toBe('ERR_GAVE_OUT');
    expect(stream.finished).toBe(true);
    expect((await stream.next()).done).toBe(true);
  });

  it('closes the generator when the caller lets go (break, return()), its finally blocks run', async () => {
    const progress = files.path('progress');
    const closed = files.path('closed');
    const stream = ticker.remote(progress, closed, 2);
    for await (const ref of stream) {
      if ((await get(ref)) === 2) break;
    }
    await until(() => existsSync(closed), 'the generator to be closed');
    // The task is done: nothing keeps running or waiting for the stream.
    await until(() => (state().tasks.running ?? 0) === 0, 'the task to finish');
  });

  it('closes the generator once its caller drops it unread and it is collected', async () => {
    const progress = files.path('progress');
    const closed = files.path('closed');
    // No reference kept: only collection can tell the driver the caller is gone.
    ticker.remote(progress, closed, 5);
    await until(() => read(progress) !== '', 'the generator to start');
    await until(() => {
      collectGarbage();
      return existsSync(closed);
    }, 'the dropped generator to be closed');
  });

  it('pauses a generator that is generatorBackpressure items ahead of its caller', async () => {
    const progress = files.path('progress');
    const closed = files.path('closed');
    const stream = ticker.options({ generatorBackpressure: 2 }).remote(progress, closed, 0);
    // Items 0 and 1 are yielded; the generator waits at its second yield for the caller.
    await until(() => read(progress) === '1', 'two items yielded');
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect(read(progress)).toBe('1');
    const first = await stream.next();
    expect(await get(first.value!)).toBe(0);
    await until(() => read(progress) === '2', 'a third item once one was taken');
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect(read(progress)).toBe('2');
    await stream.return();
    await until(() => existsSync(closed), 'the paused generator to be closed');
  });

  it('cancel() stops a streaming call: the caller reads what it yielded, then TaskCancelledError', async () => {
    const progress = files.path('progress');
    const closed = files.path('closed');
    const stream = ticker.remote(progress, closed, 5);
    expect(await get((await stream.next()).value!)).toBe(0);
    cancel(stream);
    const error = await rejection(collect(stream));
    expect(error).toBeInstanceOf(TaskCancelledError);
    await until(() => existsSync(closed), 'the cancelled generator to be closed');
  });

  it('waits for an item no longer than next({ timeout }) says, and can wait again', async () => {
    const progress = files.path('progress');
    const closed = files.path('closed');
    const stream = ticker.remote(progress, closed, 400);
    expect(await get((await stream.next()).value!)).toBe(0);
    const error = await rejection(stream.next({ timeout: 20 }));
    expect(error).toBeInstanceOf(GetTimeoutError);
    expect(stream.finished).toBe(false);
    expect(await get((await stream.next()).value!)).toBe(1);
    await stream.return();
  });

  it('frees the items a caller let go of, taken or not, and the stream itself', async () => {
    const used = () => state().nodes.reduce((total, node) => total + node.store.bytesInUse, 0);
    const stored = () => state().nodes.reduce((total, node) => total + node.store.objectCount, 0);
    const before = stored();
    const stream = blocks.options({ generatorBackpressure: 4 }).remote(8, 1 << 20);
    const first = (await stream.next()).value!;
    const second = (await stream.next()).value!;
    // The memory summary names the call that yielded them.
    const items = (await memorySummary()).objects.filter((object) => object.objectId === first.id || object.objectId === second.id);
    expect(items.map((item) => [item.madeBy, item.where, item.size])).toEqual([['blocks', 'store', 1 << 20], ['blocks', 'store', 1 << 20]]);
    // Stored items wait in the store for their caller (up to the backpressure's four ahead).
    await until(() => used() >= 4 << 20, 'the items ahead of the caller to be stored');
    expect(await get(first, { timeout: 10_000 })).toHaveLength(1 << 17);
    first[Symbol.dispose]();
    second[Symbol.dispose]();
    await stream.return();
    await until(() => (state().tasks.running ?? 0) === 0, 'the generator to stop');
    // The driver's view of the first item pins it until collected; the rest leave the store.
    await until(() => stored() <= before + 1, 'untaken items to leave the store');
    const summary = await memorySummary();
    expect(summary.objects.filter((object) => object.objectId === stream.id || object.objectId === second.id)).toEqual([]);
  });

  it('retries after its worker dies mid-stream, sending only the items after those the caller has', async () => {
    const marker = files.path('died');
    const values = await collect(dieMidway.remote(8, 5, marker));
    expect(existsSync(marker)).toBe(true);
    expect(values.map((value) => (typeof value === 'number' ? value : (value as Float64Array)[0]))).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
  });

  it('streams to callers inside workers, which may also stop early', async () => {
    expect(await get(sumOfCount.remote(100))).toBe(4950);
    expect(await get(firstOf.remote(1000, 3))).toEqual([0, 1, 2]);
  });

  it('stops the generator when a caller inside a worker dies mid-read', async () => {
    const progress = files.path('progress');
    const closed = files.path('closed');
    const log = files.path('log');
    const reader = slowReader.options({ maxRetries: 0 }).remote(progress, closed, log);
    await until(() => read(log).split('\n').length > 3, 'the reader to take a few items');
    process.kill(Number(read(`${log}.pid`)), 'SIGKILL');
    expect(await rejection(get(reader))).toBeInstanceOf(WorkerCrashedError);
    // Its handle on the stream went with it: the generator is closed, not left running.
    await until(() => existsSync(closed), 'the generator to be closed');
  });
});

describe('generator methods', () => {
  it('stream from an actor, sync and async, in order with its other calls', async () => {
    const log = files.path('log');
    await using speaker = RemoteSpeaker.remote(log);
    const words = speaker.words.remote('the quick brown fox');
    expectTypeOf(words).toEqualTypeOf<ObjectRefGenerator<string>>();
    const said = speaker.said.remote();
    expectTypeOf(said).toEqualTypeOf<ObjectRef<number>>();
    expect(await collect(words)).toEqual(['the', 'quick', 'brown', 'fox']);
    // Calls run one after another: the count comes after the whole stream.
    expect(await get(said)).toBe(4);
    expect(await collect(speaker.letters.remote('abc'))).toEqual(['a', 'b', 'c']);
    expect(() => speaker.words.bind('x')).toThrow(RegistrationError);
  });

  it('gives the words said before an actor died, then ActorDiedError', async () => {
    const speaker = RemoteSpeaker.remote(files.path('log'));
    const words: string[] = [];
    const error = await rejection(
      (async () => {
        for await (const word of speaker.lastWords.remote(3).values()) words.push(word);
      })(),
    );
    expect(words).toEqual(['word 0', 'word 1', 'word 2']);
    expect(error).toBeInstanceOf(ActorDiedError);
  });
});

describe('bad input', () => {
  it('names what is wrong', async () => {
    expect(() => count.options({ generatorBackpressure: 0 }).remote(3)).toThrow(InvalidArgumentError);
    expect(() => count.options({ generatorBackpressure: 1.5 }).remote(3)).toThrow(/generatorBackpressure/);
    const stream = count.remote(2);
    await expect(get(stream as unknown as ObjectRef<number>)).rejects.toThrow(/iterate it/);
    await expect(stream.next({ timeout: -1 })).rejects.toThrow(InvalidArgumentError);
    expect(await collect(stream)).toEqual([0, 1]);
    const error = await rejection(get(returnsGenerator.remote() as unknown as ObjectRef<unknown>));
    expect(error).toBeInstanceOf(TaskError);
    expect(error.message).toContain('declare it function* or async function*');
  });
});

describe('wait', () => {
  it('wait() takes generators: ready once the next item is there to take, or the end', async () => {
    const gate = files.path('gate');
    const gen = gated.remote(gate, 3);
    const slow = count.remote(2);
    const [ready] = await wait([gen], { timeout: 30_000 });
    expect(ready).toEqual([gen]);
    expect(await get((await gen.next()).value!)).toBe(0);
    // The next item waits on the gate: not ready, while a ref beside it is.
    const plain = put(1);
    const [readyNow, waiting] = await wait([gen, plain], { timeout: 200 });
    expect(readyNow).toEqual([plain]);
    expect(waiting).toEqual([gen]);
    expect((await wait([gen], { timeout: 100 }))[0]).toEqual([]);
    writeFileSync(gate, 'open');
    expect((await wait([gen], { timeout: 30_000 }))[0]).toEqual([gen]);
    const rest: number[] = [];
    for await (const value of gen.values()) rest.push(value);
    expect(rest).toEqual([1, 2]);
    // Ended: ready at once, and next() answers at once.
    for await (const ref of slow) await get(ref);
    expect((await wait([slow], { timeout: 0 }))[0]).toEqual([slow]);
    // A generator that fails is ready with its error.
    const failing = failAfter.remote(0);
    expect((await wait([failing], { timeout: 30_000 }))[0]).toEqual([failing]);
    expect(await rejection(failing.next())).toBeInstanceOf(TaskError);
    // Inside a worker, two generators at once.
    expect(await get(waitInside.remote(3))).toEqual({ ready: 2, notReady: 0, firsts: [0, 0] });
  });
});
