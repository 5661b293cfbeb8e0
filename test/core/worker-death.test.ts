/**
 * A worker killed at any moment leaves nothing behind in the store: its own puts that nobody else
 * references (registered with the driver or not), results it stored but never reported, the refs
 * it borrowed, and its pins.
 */
import { existsSync, readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { WorkerCrashedError, ActorDiedError, free, get, init, put, shutdown, state } from '../../lib/index.js';
import { RemoteKeeper } from './fixtures/actors.js';
import { putThenDie, putWaitThenDie, returnThenDie } from './fixtures/core.js';
import { isAlive, rejection, scratch, until } from './helpers.js';

const files = scratch();
const N = 1 << 20; // 8 MiB of floats: well above the inline limit

beforeAll(async () => {
  await init({ numCpus: 2, objectStoreMemory: 256 << 20 });
});

afterAll(async () => {
  await shutdown();
  files.cleanup();
});

const store = () => state().nodes[0].store;

/** Waits until the store holds no more objects and bytes than `baseline` did. */
async function backTo(baseline: ReturnType<typeof store>, what: string): Promise<void> {
  await until(() => store().objectCount === baseline.objectCount && store().bytesInUse <= baseline.bytesInUse, what);
}

describe('a dead worker', () => {
  // First: later tests leave pins in the driver and in pooled workers, released whenever they collect.
  it('a killed worker that pinned an object by reading it leaves the bytes free', async () => {
    const baseline = store();
    const keeper = RemoteKeeper.remote();
    const pid = (await get(keeper.pid.remote())) as number;
    const read = put(new Float64Array(N).fill(7));
    // A top-level argument arrives as a zero-copy view: the actor pins the object while it keeps it.
    expect(await get(keeper.keepValue.remote(read))).toBe(1);
    free(read);
    expect(store().objectCount).toBe(baseline.objectCount);
    expect(store().bytesInUse).toBeGreaterThan(baseline.bytesInUse);
    process.kill(pid, 'SIGKILL');
    await backTo(baseline, "the killed actor's pin to be dropped");
  });

  it("leaves no object it put and never registered (maxRetries 0)", async () => {
    const baseline = store();
    const error = await rejection(get(putThenDie.options({ maxRetries: 0 }).remote(N)));
    expect(error).toBeInstanceOf(WorkerCrashedError);
    await backTo(baseline, 'the unregistered put of a killed worker to be deleted');
  });

  it('leaves no object it put and never registered when the task is retried', async () => {
    const baseline = store();
    const marker = files.path('put-then-die');
    const retriedPid = await get(putThenDie.remote(N, marker));
    const deadPid = Number(readFileSync(marker, 'utf8'));
    expect(retriedPid).not.toBe(deadPid);
    await backTo(baseline, 'the unregistered put of a killed first attempt to be deleted');
  });

  it('releases the hold on an object it put and registered', async () => {
    const baseline = store();
    const error = await rejection(get(putWaitThenDie.options({ maxRetries: 0 }).remote(N)));
    expect(error).toBeInstanceOf(WorkerCrashedError);
    await backTo(baseline, 'the registered put of a killed worker to be deleted');
  });

  it('leaves no result it stored but never reported, and a retry can store it again', async () => {
    const baseline = store();
    const failed = await rejection(get(returnThenDie.options({ maxRetries: 0 }).remote(N)));
    expect(failed).toBeInstanceOf(WorkerCrashedError);
    await backTo(baseline, 'the unreported result of a killed worker to be deleted');

    const marker = files.path('return-then-die');
    const ref = returnThenDie.remote(N, marker);
    const values = (await get(ref)) as Float64Array;
    expect(existsSync(marker)).toBe(true);
    expect(values.length).toBe(N);
    expect(values[N - 1]).toBe(5);
    free(ref);
    // `values` pins the bytes until the driver collects it: count objects only.
    await until(() => store().objectCount === baseline.objectCount, 'the retried result to be deleted once freed');
  });

  it('releases the refs a killed actor borrowed, and its pins', async () => {
    const baseline = store();
    const keeper = RemoteKeeper.remote();
    const pid = (await get(keeper.pid.remote())) as number;
    const borrowed = put(new Float64Array(N).fill(6));
    // Nested in an array: the actor gets the handle itself, not the value.
    expect(await get(keeper.keep.remote([borrowed]))).toBe(1);
    free(borrowed);
    // The actor's borrow keeps the object alive.
    expect(store().objectCount).toBe(baseline.objectCount + 1);
    process.kill(pid, 'SIGKILL');
    await until(() => !isAlive(pid), 'the actor process to die');
    await backTo(baseline, "the killed actor's borrowed object to be deleted");
    const error = await rejection(get(keeper.pid.remote()));
    expect(error).toBeInstanceOf(ActorDiedError);
  });
});
