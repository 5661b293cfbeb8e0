/**
 * listTasks() and timeline(): tasks and actor calls with their states and attempts (where each
 * ran, for how long, how it ended), retries after a worker's death, failures, cancellations, the
 * bound on ended tasks remembered, and the trace written for Perfetto.
 */
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InvalidArgumentError, cancel, get, init, listTasks, shutdown, timeline, type TaskInfo } from '../../lib/index.js';
import { RemoteCounter } from './fixtures/actors.js';
import { dieOnce, fail, gated, sleepFor } from './fixtures/core.js';
import { openGate, rejection, scratch, started, until } from './helpers.js';

const files = scratch();

beforeAll(async () => {
  await init({ numCpus: 2, keepEndedTasks: 50 });
});

afterAll(async () => {
  await shutdown();
  files.cleanup();
});

const byId = (taskId: string) => listTasks().find((task) => task.taskId === taskId);

describe('listTasks and timeline', () => {
  it('lists a finished task with its one attempt, timed on its worker', async () => {
    const before = Date.now();
    await get(sleepFor.remote(120));
    const [task] = listTasks({ name: 'sleepFor', state: 'finished' });
    expect(task).toMatchObject({ name: 'sleepFor', kind: 'task', state: 'finished' });
    expect(task.submittedAt).toBeGreaterThanOrEqual(before);
    expect(task.endedAt).toBeGreaterThanOrEqual(task.submittedAt);
    expect(task.attempts).toHaveLength(1);
    const [attempt] = task.attempts;
    expect(attempt).toMatchObject({ attempt: 1, outcome: 'finished' });
    expect(attempt.pid).toBeGreaterThan(0);
    expect(attempt.nodeId).toBe('node-0');
    // The worker's own measure: at least the sleep, and within the task's life as the driver saw it.
    expect(attempt.endedAt! - attempt.startedAt).toBeGreaterThanOrEqual(119);
    expect(attempt.startedAt).toBeGreaterThanOrEqual(task.submittedAt - 1);
    expect(attempt.endedAt!).toBeLessThanOrEqual(task.endedAt! + 1);
  });

  it('shows a running task as running, then its end', async () => {
    const gate = files.path('running-gate');
    const ref = gated.remote(gate, 'value');
    await until(() => started(gate), 'the gated task to start');
    const running = listTasks({ name: 'gated', state: 'running' });
    expect(running).toHaveLength(1);
    expect(running[0].attempts).toHaveLength(1);
    expect(running[0].attempts[0].endedAt).toBeUndefined();
    // A running attempt is in the timeline too, ending now.
    const span = timeline().find((event) => event.ph === 'X' && event.args?.taskId === running[0].taskId);
    expect(span?.args?.outcome).toBe('running');
    openGate(gate);
    expect(await get(ref)).toBe('value');
    expect(byId(running[0].taskId)?.state).toBe('finished');
  });

  it('keeps every attempt of a task retried after its worker died', async () => {
    const marker = files.path('die-once');
    expect(await get(dieOnce.remote(marker))).toBe('survived');
    const [task] = listTasks({ name: 'dieOnce' });
    expect(task.state).toBe('finished');
    expect(task.attempts.map((attempt) => [attempt.attempt, attempt.outcome])).toEqual([
      [1, 'worker-died'],
      [2, 'finished'],
    ]);
    expect(task.attempts[0].pid).toBe(Number(readFileSync(marker, 'utf8')));
    expect(task.attempts[1].pid).not.toBe(task.attempts[0].pid);
  });

  it('names why a task failed, and lists cancelled ones as cancelled', async () => {
    await rejection(get(fail.remote('bad input')));
    const [failed] = listTasks({ name: 'fail' });
    expect(failed).toMatchObject({ state: 'failed', error: { name: 'TaskError' } });
    expect(failed.error!.message).toContain('bad input');
    expect(failed.attempts.map((attempt) => attempt.outcome)).toEqual(['failed']);
    const gate = files.path('cancel-gate');
    const ref = gated.remote(gate, 1);
    await until(() => started(gate), 'the task to cancel to start');
    cancel(ref, { force: true });
    await rejection(get(ref));
    const cancelled = listTasks({ name: 'gated', state: 'cancelled' });
    expect(cancelled).toHaveLength(1);
    expect(cancelled[0]).toMatchObject({ state: 'cancelled', error: { name: 'TaskCancelledError' } });
  });

  it('lists actor calls by actor, with the actor process as where they ran', async () => {
    const counter = RemoteCounter.remote(0);
    await get([counter.increment.remote(1), counter.increment.remote(2)]);
    const pid = await get(counter.pid.remote());
    const calls = listTasks({ name: 'Counter.increment' });
    expect(calls).toHaveLength(2);
    for (const call of calls) {
      expect(call).toMatchObject({ kind: 'actor-call', state: 'finished' });
      expect(call.attempts[0].pid).toBe(pid);
    }
    const actorId = calls[0].actorId!;
    expect(listTasks({ actorId }).map((call) => call.name)).toEqual(['Counter.increment', 'Counter.increment', 'Counter.pid']);
  });

  it('writes a trace: a process per node, a thread per worker, a span per attempt', () => {
    const path = files.path('trace.json');
    const events = timeline(path);
    expect(JSON.parse(readFileSync(path, 'utf8'))).toEqual(events);
    const spans = events.filter((event) => event.ph === 'X');
    expect(spans.length).toBe(listTasks().reduce((sum, task) => sum + task.attempts.length, 0));
    const node = events.find((event) => event.name === 'process_name');
    expect(node?.args).toEqual({ name: 'node node-0' });
    const threads = events.filter((event) => event.name === 'thread_name');
    for (const span of spans) {
      expect(span.ts).toBeGreaterThan(0);
      expect(span.dur).toBeGreaterThanOrEqual(0);
      expect(threads.some((thread) => thread.pid === span.pid && thread.tid === span.tid)).toBe(true);
    }
    const sleep = spans.find((span) => span.name === 'sleepFor')!;
    expect(sleep.dur).toBeGreaterThanOrEqual(119_000);
    expect(sleep.cat).toBe('task');
  });

  it('remembers only the last keepEndedTasks that ended, and takes the most recent with limit', async () => {
    await get(Array.from({ length: 60 }, (_, index) => sleepFor.remote(index % 2)));
    const ended = listTasks({ state: ['finished', 'failed', 'cancelled'] });
    expect(ended).toHaveLength(50);
    const recent = listTasks({ limit: 3 });
    expect(recent).toHaveLength(3);
    expect(recent).toEqual(ended.slice(-3));
    expect(listTasks({ limit: 0 })).toEqual([]);
  });

  it('refuses bad options by name', async () => {
    expect(() => listTasks({ state: 'done' as TaskInfo['state'] })).toThrow(InvalidArgumentError);
    expect(() => listTasks({ state: 'done' as TaskInfo['state'] })).toThrow(/state "done" is not one of waiting, queued, running, finished, failed, cancelled/);
    expect(() => listTasks({ limit: -1 })).toThrow(/limit must be a whole number/);
    expect(() => timeline('')).toThrow(/path must be a file name/);
    await shutdown();
    await expect(init({ keepEndedTasks: 1.5 })).rejects.toThrow(/keepEndedTasks must be a whole number from 0/);
  });
});
