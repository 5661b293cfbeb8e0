/**
 * Actors: creation, methods, named actors, maxConcurrency, submission order, kill, death,
 * maxRestarts and maxTaskRetries, handles passed to tasks, unknown methods.
 */
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  ActorDiedError,
  RegistrationError,
  TaskError,
  get,
  getActor,
  init,
  kill,
  put,
  shutdown,
  state,
  type ActorHandle,
} from '../../lib/index.js';
import { RemoteBatcher, RemoteCounter, type Counter, type Recorder, RemoteFaulty, RemoteRecorder, RemoteDelegator, callNamedCounter, callThrough } from './fixtures/actors.js';
import { writeFileSync } from 'node:fs';
import { gated } from './fixtures/core.js';
import { isAlive, openGate, rejection, scratch, started, until } from './helpers.js';

const files = scratch();

beforeAll(async () => {
  await init({ numCpus: 2 });
});

afterAll(async () => {
  await shutdown();
  files.cleanup();
});

const actorState = (actorId: string) => state().actors.find((actor) => actor.actorId === actorId)!;

describe('actors', () => {
  // One actor for the tests that leave it alive and usable (each actor is a fresh process).
  let counter: ActorHandle<Counter>;
  let recorder: ActorHandle<Recorder>;
  beforeAll(() => {
    counter = RemoteCounter.remote(10);
    recorder = RemoteRecorder.remote();
  });

  it('keep state across method calls in their own process', async () => {
    expect(await get(counter.increment.remote(5))).toBe(15);
    expect(await get(counter.increment.remote())).toBe(16);
    const actorPid = await get(counter.pid.remote());
    expect(actorPid).not.toBe(process.pid);
    expect(actorState(counter.actorId)).toMatchObject({ className: 'Counter', state: 'alive', pid: actorPid });
    // A dedicated process, not one of the pooled task workers.
    expect(state().workers.find((worker) => worker.pid === actorPid)?.state).toBe('actor');
  });

  it('report each long call as it ends, while later queued calls still run', async () => {
    // The result of call 1 must reach the driver while call 3 runs: before, results of calls that
    // end inside promise continuations were held back until the actor's queue ran dry.
    const batcher = RemoteBatcher.remote();
    await get(batcher.work.remote(0));
    const seen = files.path('first-result');
    const first = batcher.work.remote(50);
    const second = batcher.work.remote(50);
    const third = batcher.untilSeen.remote(seen, 10_000);
    expect(await get(first)).toBe(50);
    writeFileSync(seen, '');
    expect(await get(third)).toBe(true);
    expect(await get(second)).toBe(50);
  });

  it('take refs as constructor and method arguments', async () => {
    const fromRef = RemoteCounter.remote(put(100));
    expect(await get(fromRef.increment.remote(put(1)))).toBe(101);
    expect(await get(counter.increment.remote(put(1)))).toBe(17);
  });

  it('run calls through one handle in submission order, even when an earlier argument resolves later', async () => {
    const gate = files.path('order');
    const late = gated.remote(gate, 'first');
    const calls = [recorder.append.remote(late), recorder.append.remote('second'), recorder.append.remote('third')];
    await until(() => started(gate), 'the argument task to start');
    openGate(gate);
    expect(await get(calls)).toEqual([1, 2, 3]);
    expect(await get(recorder.read.remote())).toEqual(['first', 'second', 'third']);
    // Many calls in a burst keep their order too.
    const burst = Array.from({ length: 200 }, (_, i) => recorder.append.remote(i));
    expect(await get(burst)).toEqual(Array.from({ length: 200 }, (_, i) => i + 4));
  });

  it('are found by name with getActor', async () => {
    const named = RemoteCounter.options({ name: 'the-counter' }).remote(7);
    await get(named.increment.remote(1));
    const found = await getActor<Counter>('the-counter');
    expect(found.actorId).toBe(named.actorId);
    expect(await get(found.increment.remote(1))).toBe(9);
    expect(actorState(named.actorId).name).toBe('the-counter');
    // The name is taken while the actor lives.
    expect(() => RemoteCounter.options({ name: 'the-counter' }).remote(0)).toThrow(RegistrationError);
    // A worker creates actors without waiting: the calls of the one it could not have say why.
    expect(await get(callNamedCounter.remote('the-counter'))).toMatch(/^ActorDiedError: actor actor-\w+ was never created: RegistrationError: an actor named 'the-counter' already exists$/);
    await expect(getActor('no-such-actor')).rejects.toBeInstanceOf(ActorDiedError);
    kill(named);
    await expect(getActor('the-counter')).rejects.toBeInstanceOf(ActorDiedError);
  });

  it('with maxConcurrency 2, two slow async calls overlap', async () => {
    const recorder = RemoteRecorder.options({ maxConcurrency: 2 }).remote();
    const [a, b] = await get([recorder.span.remote('a', 300), recorder.span.remote('b', 300)]);
    // Both started before either ended, by the actor's own clock.
    expect(b.start).toBeLessThan(a.end);
    expect(a.start).toBeLessThan(b.end);
  });

  it('with the default maxConcurrency of 1, async calls run one after another', async () => {
    const [a, b] = await get([recorder.span.remote('a', 50), recorder.span.remote('b', 50)]);
    expect(b.start).toBeGreaterThanOrEqual(a.end);
  });

  it('an unknown method is a RegistrationError at the call site', () => {
    expect(() => (counter as unknown as Record<string, { remote(): unknown }>).decrement.remote()).toThrow(RegistrationError);
    expect(() => (counter as unknown as Record<string, unknown>).nope).toThrow(/has no method 'nope'/);
  });

  it('a method that throws gives a TaskError and the actor lives on', async () => {
    const before = await get(counter.increment.remote(0));
    const error = await rejection(get(counter.boom.remote()));
    expect(error).toBeInstanceOf(TaskError);
    expect(error.cause).toMatchObject({ name: 'TypeError', message: 'actor boom', code: 'E_BOOM' });
    expect(await get(counter.increment.remote())).toBe(before + 1);
  });

  it('a constructor that throws kills the actor: its calls fail with ActorDiedError', async () => {
    const faulty = RemoteFaulty.remote('no model');
    const error = await rejection(get(faulty.never.remote()));
    expect(error).toBeInstanceOf(ActorDiedError);
    expect(error.message).toMatch(/no model/);
  });

  it('a method blocked in get() keeps the calls queued behind it on its actor, in order', async () => {
    const delegator = RemoteDelegator.remote();
    const refs = [delegator.delegate.remote(1), delegator.note.remote('a'), delegator.delegate.remote(5), delegator.note.remote('b')];
    expect(await get(refs)).toEqual([2, 2, 6, 4]);
    expect(await get(delegator.entries.remote())).toEqual(['delegate 1', 'a', 'delegate 5', 'b']);
  });

  it('handles travel to tasks, which call the actor through them', async () => {
    const before = await get(counter.increment.remote(0));
    expect(await get(callThrough.remote(counter, 5))).toBe(before + 5);
    expect(await get(callThrough.remote(counter, 5))).toBe(before + 10);
    expect(await get(counter.increment.remote(0))).toBe(before + 10);
  });
});

describe('actor death', () => {
  it('kill(): pending and later calls fail with ActorDiedError, and the process exits', async () => {
    const counter = RemoteCounter.remote(0);
    const gate = files.path('killed');
    const actorPid = await get(counter.pid.remote());
    const blocked = counter.waitGate.remote(gate);
    const queued = counter.increment.remote();
    await until(() => started(gate), 'the blocking call to start');
    kill(counter);
    expect(await rejection(get(blocked))).toBeInstanceOf(ActorDiedError);
    expect(await rejection(get(queued))).toBeInstanceOf(ActorDiedError);
    expect(await rejection(get(counter.increment.remote()))).toBeInstanceOf(ActorDiedError);
    await until(() => !isAlive(actorPid), 'the killed actor to exit');
    expect(actorState(counter.actorId).state).toBe('dead');
  });

  it('a handle disposed by `using` kills its actor with the scope; `await using` also waits for its process to exit', async () => {
    let actorId: string;
    let actorPid: number;
    {
      await using scoped = RemoteCounter.remote(0);
      actorId = scoped.actorId;
      actorPid = await get(scoped.pid.remote());
      expect(await get(scoped.increment.remote())).toBe(1);
    }
    // Its process, and whatever GPU memory it held, is gone before the next line runs.
    expect(isAlive(actorPid)).toBe(false);
    expect(actorState(actorId).state).toBe('dead');
    {
      using scoped = RemoteCounter.remote(0);
      actorId = scoped.actorId;
      actorPid = await get(scoped.pid.remote());
    }
    expect(actorState(actorId).state).toBe('dead');
    await until(() => !isAlive(actorPid), 'the disposed actor to exit');
  });

  it('a crash without restarts fails pending and later calls with ActorDiedError', async () => {
    const counter = RemoteCounter.remote(0);
    const gate = files.path('crash');
    const actorPid = await get(counter.pid.remote());
    const blocked = counter.waitGate.remote(gate);
    await until(() => started(gate), 'the blocking call to start');
    process.kill(actorPid, 'SIGKILL');
    const error = await rejection(get(blocked));
    expect(error).toBeInstanceOf(ActorDiedError);
    expect(error.actorId).toBe(counter.actorId);
    expect(await rejection(get(counter.increment.remote()))).toBeInstanceOf(ActorDiedError);
    expect(actorState(counter.actorId).state).toBe('dead');
  });

  it('maxRestarts reruns the constructor in a new process after a SIGKILL', async () => {
    const constructions = files.path('constructed');
    const counter = RemoteCounter.options({ maxRestarts: 1 }).remote(100, constructions);
    expect(await get(counter.increment.remote(5))).toBe(105);
    const firstPid = actorState(counter.actorId).pid!;
    process.kill(firstPid, 'SIGKILL');
    await until(() => actorState(counter.actorId).restarts === 1, 'the actor to restart');
    // Fresh state from the constructor, in a new process.
    expect(await get(counter.increment.remote(1))).toBe(101);
    const secondPid = await get(counter.pid.remote());
    expect(secondPid).not.toBe(firstPid);
    expect(readFileSync(constructions, 'utf8').trim().split('\n').map(Number)).toEqual([firstPid, secondPid]);
    expect(actorState(counter.actorId)).toMatchObject({ state: 'alive', restarts: 1, pid: secondPid });
    // Restarts used up: the next crash is final.
    process.kill(secondPid, 'SIGKILL');
    await until(() => actorState(counter.actorId).state === 'dead', 'the actor to die');
    expect(await rejection(get(counter.increment.remote()))).toBeInstanceOf(ActorDiedError);
  });

  it('maxTaskRetries retries a call that was running when the actor died, once it restarts', async () => {
    const marker = files.path('die-once');
    const counter = RemoteCounter.options({ maxRestarts: 1, maxTaskRetries: 1 }).remote(20);
    expect(await get(counter.dieOnce.remote(marker))).toBe(20);
    expect(actorState(counter.actorId).restarts).toBe(1);
    const firstPid = Number(readFileSync(marker, 'utf8'));
    expect(await get(counter.pid.remote())).not.toBe(firstPid);
  });

  it('without maxTaskRetries, the call running at the crash fails even though the actor restarts', async () => {
    const marker = files.path('die-no-retry');
    const counter = RemoteCounter.options({ maxRestarts: 1 }).remote(30);
    expect(await rejection(get(counter.dieOnce.remote(marker)))).toBeInstanceOf(ActorDiedError);
    // The actor itself came back.
    expect(await get(counter.increment.remote())).toBe(31);
  });
});
