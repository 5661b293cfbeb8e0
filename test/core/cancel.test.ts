/**
 * cancel() without force reaches the worker: a call still queued there never starts (tasks
 * pipelined to a worker, an actor's calls behind a running one), and a running call sees its
 * RuntimeContext.signal aborted.
 */
import { existsSync, readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TaskCancelledError, cancel, get, init, kill, listTasks, shutdown } from '../../lib/index.js';
import { RemoteTally, step, untilCancelled } from './fixtures/cancel.js';
import { rejection, scratch, until } from './helpers.js';

const files = scratch();

beforeAll(async () => {
  // One CPU: a second task goes to the busy worker's queue (pipelined) rather than a worker of its own.
  await init({ numCpus: 1, prestartWorkers: 1 });
});

afterAll(async () => {
  await shutdown();
  files.cleanup();
});

describe('cancel', () => {
  it('drops a task queued in its worker: it never runs, and the worker goes on', async () => {
    const blockingMarker = files.path('blocking');
    const marker = files.path('queued-marker');
    const blocking = step.remote(blockingMarker, true);
    await until(() => existsSync(`${blockingMarker}.started`), 'the blocking task to start');
    const queued = step.remote(marker, false);
    // Sent to the busy worker already (the driver counts it running there).
    await until(() => listTasks({ name: 'step', state: 'running' }).length === 2, 'the task to reach the worker');
    cancel(queued);
    expect(await rejection(get(queued))).toBeInstanceOf(TaskCancelledError);
    // Then the blocking task: its cancel reaches the worker after the queued one's.
    cancel(blocking);
    expect(await rejection(get(blocking))).toBeInstanceOf(TaskCancelledError);
    // The worker runs its queue in order: had the cancelled task stayed, it would have run first.
    const after = files.path('after-marker');
    expect(await get(step.remote(after, false))).toBe('ran');
    expect(existsSync(after)).toBe(true);
    expect(existsSync(marker)).toBe(false);
  });

  it("aborts a running task's signal, with TaskCancelledError as its reason", async () => {
    const begun = files.path('running-started');
    const noticed = files.path('running-noticed');
    const ref = untilCancelled.remote(begun, noticed);
    await until(() => existsSync(begun), 'the task to start');
    cancel(ref);
    expect(await rejection(get(ref))).toBeInstanceOf(TaskCancelledError);
    await until(() => existsSync(noticed), 'the task to notice');
    expect(readFileSync(noticed, 'utf8')).toBe('TaskCancelledError');
    // Its worker is free again.
    expect(await get(step.remote(files.path('after-running'), false))).toBe('ran');
  });

  it("drops an actor call queued behind a running one; the actor's state never sees it", async () => {
    const tally = RemoteTally.remote();
    const begun = files.path('actor-started');
    const blocked = tally.block.remote(begun);
    await until(() => existsSync(begun), 'the blocking call to start');
    const dropped = tally.add.remote();
    await until(() => listTasks({ name: 'Tally.add', state: 'running' }).length === 1, 'the call to reach the actor');
    cancel(dropped);
    expect(await rejection(get(dropped))).toBeInstanceOf(TaskCancelledError);
    cancel(blocked);
    expect(await rejection(get(blocked))).toBeInstanceOf(TaskCancelledError);
    expect(await get(tally.value.remote())).toBe(0);
    expect(await get(tally.add.remote())).toBe(1);
    kill(tally);
  });
});
