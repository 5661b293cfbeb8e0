/**
 * Failures and bad input: worker crashes and retries, exceptions and retryExceptions, TaskError
 * contents, serialization and registration errors at the call site, infeasible tasks, and the
 * warning for tasks that wait on resources.
 */
import { readFileSync, existsSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  InfeasibleTaskError,
  RegistrationError,
  SerializationError,
  TaskError,
  WorkerCrashedError,
  events,
  get,
  init,
  put,
  remote,
  shutdown,
  state,
} from '../../lib/index.js';
import { RemoteCounter } from './fixtures/actors.js';
import { add, dieAlways, dieOnce, fail, flaky, gated, identity, registerLate, square, throwLater } from './fixtures/core.js';
import { isAlive, openGate, rejection, scratch, started, until } from './helpers.js';

const files = scratch();

beforeAll(async () => {
  await init({ numCpus: 2, resources: { slot: 1 } });
});

afterAll(async () => {
  await shutdown();
  files.cleanup();
});

const lines = (path: string) => (existsSync(path) ? readFileSync(path, 'utf8').trim().split('\n').filter(Boolean) : []);

describe('worker crashes', () => {
  it('a task whose worker is SIGKILLed mid-task is retried (default maxRetries 3) and succeeds', async () => {
    const marker = files.path('die-once');
    expect(await get(dieOnce.remote(marker))).toBe('survived');
    const crashedPid = Number(readFileSync(marker, 'utf8'));
    await until(() => !isAlive(crashedPid), 'the crashed worker to be gone');
    expect(state().workers.map((worker) => worker.pid)).not.toContain(crashedPid);
  });

  it('with maxRetries 0 a crash fails the task with WorkerCrashedError', async () => {
    const log = files.path('die-no-retry');
    const error = await rejection(get(dieAlways.options({ maxRetries: 0 }).remote(log)));
    expect(error).toBeInstanceOf(WorkerCrashedError);
    expect(error.code).toBe('ERR_WORKER_CRASHED');
    expect(lines(log)).toHaveLength(1);
    expect(error.message).toBe(`dieAlways: its worker died (pid ${lines(log)[0]} killed by SIGKILL) and it has no retries left (0 allowed)`);
  });

  it('names an error nothing caught that ended the worker, in the task that died with it', async () => {
    const log = files.path('throw-later');
    const error = await rejection(get(throwLater.options({ maxRetries: 1 }).remote(log)));
    expect(error).toBeInstanceOf(WorkerCrashedError);
    expect(lines(log)).toHaveLength(2);
    expect(error.message).toContain(`throwLater: its worker died (pid ${lines(log)[1]} exited on an uncaught TypeError: a stray callback failed (at `);
    expect(error.message).toMatch(/fixtures\/core\.[jt]s:\d+:\d+\)+ and it has no retries left \(1 allowed\)$/);
  });

  it('retries stop after maxRetries', async () => {
    const log = files.path('die-twice');
    const error = await rejection(get(dieAlways.options({ maxRetries: 2 }).remote(log)));
    expect(error).toBeInstanceOf(WorkerCrashedError);
    // The first attempt and two retries, each in a different process.
    expect(lines(log)).toHaveLength(3);
    expect(new Set(lines(log)).size).toBe(3);
  });

  it('the pool keeps serving tasks after crashes', async () => {
    const values = await get(Array.from({ length: 50 }, (_, i) => square.remote(i)));
    expect(values[49]).toBe(49 * 49);
  });
});

describe('exceptions', () => {
  it('reach get() as TaskError with the remote stack and the original name, message and code', async () => {
    const error = await rejection(get(fail.remote('bad input')));
    expect(error).toBeInstanceOf(TaskError);
    expect(error.code).toBe('ERR_TASK_FAILED');
    expect(error.taskName).toBe('fail');
    expect(error.message).toContain('bad input');
    expect(error.cause).toBeInstanceOf(Error);
    expect(error.cause).toMatchObject({ name: 'RangeError', message: 'bad input', code: 'E_FIXTURE' });
    expect(error.remoteStack).toContain('RangeError: bad input');
    expect(error.remoteStack).toContain('fixtures/core.ts');
  });

  it('fail tasks that depend on the failed one with the same error', async () => {
    const error = await rejection(get(add.remote(fail.remote('upstream'), 1)));
    expect(error).toBeInstanceOf(TaskError);
    expect(error.cause.message).toBe('upstream');
  });

  it('are not retried by default', async () => {
    const log = files.path('flaky-no-retry');
    const error = await rejection(get(flaky.remote(log, 1)));
    expect(error).toBeInstanceOf(TaskError);
    expect(error.cause.message).toBe('attempt 1 fails');
    expect(readFileSync(log, 'utf8')).toHaveLength(1);
  });

  it('are retried with retryExceptions, up to maxRetries', async () => {
    const log = files.path('flaky-retry');
    expect(await get(flaky.options({ retryExceptions: true }).remote(log, 2))).toBe(3);
    const exhausted = files.path('flaky-exhausted');
    const error = await rejection(get(flaky.options({ retryExceptions: true, maxRetries: 2 }).remote(exhausted, 10)));
    expect(error).toBeInstanceOf(TaskError);
    expect(error.cause.message).toBe('attempt 3 fails');
    expect(readFileSync(exhausted, 'utf8')).toHaveLength(3);
  });
});

describe('bad input', () => {
  class Point {
    constructor(
      readonly x: number,
      readonly y: number,
    ) {}
  }

  it('an argument that cannot be serialized fails at the call site with SerializationError', () => {
    const before = state().tasks;
    const unserializable: unknown[] = [
      () => 1,
      function named() {},
      new Point(1, 2),
      Promise.resolve(1),
      Symbol('s'),
      { nested: { deeper: [() => 2] } },
      [new Point(0, 0)],
      new WeakMap(),
    ];
    for (const value of unserializable) {
      expect(() => identity.remote(value), String(value)).toThrow(SerializationError);
    }
    expect(() => put(() => 1)).toThrow(SerializationError);
    expect(() => put(new Point(1, 1))).toThrow(SerializationError);
    // Nothing was submitted.
    expect(state().tasks).toEqual(before);
  });

  it('actor constructor and method arguments are checked the same way', async () => {
    expect(() => RemoteCounter.remote(Promise.resolve(1) as unknown as number)).toThrow(SerializationError);
    const counter = RemoteCounter.remote(0);
    expect(() => counter.increment.remote((() => 1) as unknown as number)).toThrow(SerializationError);
    expect(await get(counter.increment.remote(1))).toBe(1);
  });

  it('a function registered twice, or anonymous, is a RegistrationError', () => {
    remote(import.meta, function registeredOnce() {
      return 1;
    });
    expect(() =>
      remote(import.meta, function registeredOnce() {
        return 2;
      }),
    ).toThrow(RegistrationError);
    const anonymous = [(() => () => 1)(), (() => function () {})(), (() => class {})()];
    for (const target of anonymous) {
      expect(target.name).toBe('');
      expect(() => remote(import.meta, target as () => number)).toThrow(RegistrationError);
    }
    expect(() => remote(undefined as unknown as ImportMeta, function noMeta() {})).toThrow(RegistrationError);
  });

  it('a function registered anywhere but module top level fails with a clear error', async () => {
    const late = registerLate();
    const error = await rejection(get(late.remote()));
    expect(error).toBeInstanceOf(TaskError);
    expect(error.cause.message).toMatch(/'registeredLate' is not registered in .*core\.ts.*top level/);
  });

  it('a request beyond the cluster total is InfeasibleTaskError from get, not a hang', async () => {
    const gpus = await rejection(get(square.options({ numGpus: 1 }).remote(2)));
    expect(gpus).toBeInstanceOf(InfeasibleTaskError);
    expect(gpus.code).toBe('ERR_INFEASIBLE');
    expect(gpus.missing).toEqual({ GPU: 1 });
    expect(gpus.message).toContain('square');
    const cpus = await rejection(get(square.options({ numCpus: 3 }).remote(2)));
    expect(cpus).toBeInstanceOf(InfeasibleTaskError);
    expect(cpus.missing).toEqual({ CPU: 1 });
    const custom = await rejection(get(square.options({ resources: { tpu: 1 } }).remote(2)));
    expect(custom).toBeInstanceOf(InfeasibleTaskError);
    expect(custom.missing).toEqual({ tpu: 1 });
    // Dependents fail the same way.
    expect(await rejection(get(add.remote(square.options({ numGpus: 2 }).remote(1), 1)))).toBeInstanceOf(InfeasibleTaskError);
  });

  it('a task that waits on resources over 1 s emits a warning event', async () => {
    const gate = files.path('slot');
    const holder = gated.options({ resources: { slot: 1 } }).remote(gate, 'held');
    await until(() => started(gate), 'the slot holder to start');
    const warned = new Promise<{ task: string; message: string }>((resolve) => events().once('warning', resolve));
    const waiting = square.options({ resources: { slot: 1 }, name: 'needs-slot' }).remote(4);
    const warning = await warned;
    expect(warning.task).toBe('needs-slot');
    expect(warning.message).toContain('slot');
    openGate(gate);
    expect(await get([holder, waiting])).toEqual(['held', 16]);
  });
});
