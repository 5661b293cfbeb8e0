/**
 * The serving layer's in-process parts, with no cluster: the router's replica choice, limits,
 * queue, back-pressure and cancellation, routing by multiplexed model, the model loader's cache,
 * and request batching.
 */
import { describe, expect, it } from 'vitest';
import { BackPressureError, DeploymentError, InvalidArgumentError, TaskCancelledError, serve } from '../../lib/index.js';
import { Router } from '../../lib/serve/router.js';
import { modelIdReader, resolveDeploymentOptions } from '../../lib/serve/options.js';
import { HttpRequest } from '../../lib/serve/http-messages.js';
import { closeRequest, inRequest, openRequest } from '../../lib/serve/multiplex.js';

/** Stand-ins for replica handles: the router reads only their actor ids. */
const replica = (actorId: string) => ({ actorId }) as never;
/** A router's limits: requests per replica, requests waiting, and the wait for a model's holders. */
const limits = (maxOngoingRequests: number, maxQueuedRequests: number, multiplexedModelWaitMs = 0) => ({ maxOngoingRequests, maxQueuedRequests, multiplexedModelWaitMs });

describe('Router', () => {
  it('never puts more than maxOngoingRequests on a replica, and spreads by load', async () => {
    const router = new Router('Model', limits(2, Infinity));
    router.setReplicas([replica('a'), replica('b')]);
    const taken = await Promise.all([router.acquire(), router.acquire(), router.acquire(), router.acquire()]);
    const counts = new Map<string, number>();
    for (const chosen of taken) counts.set(chosen.actorId, (counts.get(chosen.actorId) ?? 0) + 1);
    expect(Object.fromEntries(counts)).toEqual({ a: 2, b: 2 });
    // Full: the fifth waits, in order, and goes where a slot frees.
    let fifth: string | undefined;
    const waiting = router.acquire().then((chosen) => (fifth = chosen.actorId));
    await new Promise((resolve) => setTimeout(resolve, 5));
    expect(fifth).toBeUndefined();
    expect(router.queued).toBe(1);
    router.release(taken.find((chosen) => chosen.actorId === 'b')!);
    await waiting;
    expect(fifth).toBe('b');
    expect(router.queued).toBe(0);
  });

  it('refuses past maxQueuedRequests, and a cancelled wait leaves the queue', async () => {
    const router = new Router('Model', limits(1, 1));
    router.setReplicas([replica('a')]);
    const first = await router.acquire();
    const abort = new AbortController();
    const second = router.acquire(abort.signal);
    const refused = await router.acquire().catch((error: unknown) => error);
    expect(refused).toBeInstanceOf(BackPressureError);
    expect((refused as BackPressureError).code).toBe('ERR_BACKPRESSURE');
    expect((refused as Error).message).toMatch(/deployment Model is at capacity: 1 replica\(s\) each running 1 request\(s\), and 1 waiting/);
    abort.abort();
    await expect(second).rejects.toThrow(TaskCancelledError);
    expect(router.queued).toBe(0);
    const third = router.acquire();
    router.release(first);
    expect((await third).actorId).toBe('a');
  });

  it('waits for replicas to come, asks for them, and drops a dead one', async () => {
    let demanded = 0;
    const died: string[] = [];
    const router = new Router('Model', limits(1, Infinity), { demand: () => demanded++, replicaDied: (id: string) => died.push(id) });
    const waiting = router.acquire();
    expect(demanded).toBe(1);
    router.setReplicas([replica('a'), replica('b')]);
    const chosen = await waiting;
    router.replicaDied(chosen.actorId);
    expect(died).toEqual([chosen.actorId]);
    expect(router.replicaCount).toBe(1);
    // Counts survive a new replica set that keeps a replica.
    const other = await router.acquire();
    router.setReplicas([replica(other.actorId), replica('c')]);
    expect((await router.acquire()).actorId).toBe('c');
  });

  it('fails waiting and later requests once closed', async () => {
    const router = new Router('Model', limits(1, Infinity));
    const waiting = router.acquire();
    router.close(new DeploymentError('Model', 'application app was deleted'));
    await expect(waiting).rejects.toThrow(/application app was deleted/);
    await expect(router.acquire()).rejects.toThrow(DeploymentError);
  });
});

describe('Router, multiplexed models', () => {
  it('sends a model to a replica holding it, spills to the one holding fewest when those are full, and waits in order', async () => {
    const router = new Router('Model', limits(2, Infinity));
    router.setReplicas([replica('a'), replica('b'), replica('c')]);
    router.setModels('a', ['x', 'y']);
    router.setModels('b', ['x']);
    // x: held by a and b; both have room, so one of them.
    const first = router.tryAcquire('x')!;
    expect(['a', 'b']).toContain(first.actorId);
    const second = router.tryAcquire('x')!;
    const third = router.tryAcquire('x')!;
    const fourth = router.tryAcquire('x')!;
    expect([first, second, third, fourth].map((chosen) => chosen.actorId).sort()).toEqual(['a', 'a', 'b', 'b']);
    // a and b full: x spills to c, which now counts as holding it.
    const fifth = router.tryAcquire('x')!;
    expect(fifth.actorId).toBe('c');
    expect(router.modelsByReplica().get('c')).toEqual(['x']);
    // z is held nowhere: the replica with room that holds fewest takes it (c, the only one with room).
    const sixth = router.tryAcquire('z')!;
    expect(sixth.actorId).toBe('c');
    // All full: the next waits, and goes where a slot frees.
    let seventh: string | undefined;
    const waiting = router.acquire(undefined, 'y').then((chosen) => (seventh = chosen.actorId));
    await new Promise((resolve) => setTimeout(resolve, 5));
    expect(seventh).toBeUndefined();
    router.release(first);
    await waiting;
    expect(seventh).toBe(first.actorId);
  });

  it("waits for a model's holders while they are full, without holding up others, and spills once its wait runs out", async () => {
    const router = new Router('Model', limits(1, Infinity, 60_000));
    router.setReplicas([replica('a'), replica('b')]);
    router.setModels('a', ['x']);
    const first = router.tryAcquire('x')!;
    expect(first.actorId).toBe('a');
    // a is full; b has room but would have to load x: the next x waits for a.
    let second: string | undefined;
    const waiting = router.acquire(undefined, 'x').then((chosen) => (second = chosen.actorId));
    // A request for y, held nowhere, goes to b at once behind it; so does one naming no model, once b is free.
    const third = await router.acquire(undefined, 'y');
    expect(third.actorId).toBe('b');
    router.release(third);
    const plain = await router.acquire();
    expect(plain.actorId).toBe('b');
    router.release(plain);
    await new Promise((resolve) => setTimeout(resolve, 5));
    expect(second).toBeUndefined();
    expect(router.queued).toBe(1);
    router.release(first);
    await waiting;
    expect(second).toBe('a');
    // a is busy with the second; with a shorter wait, the next x goes to b once it runs out.
    const fourth = router.acquire(undefined, 'x');
    router.configure(limits(1, Infinity, 20));
    expect((await fourth).actorId).toBe('b');
    expect(router.modelsByReplica().get('b')).toEqual(['y', 'x']);
    expect(router.queued).toBe(0);
  });

  it("prefers replicas on the caller's node for requests that ask, holders of a model first", () => {
    const router = new Router('Model', limits(1, Infinity), { localNode: () => 'here' });
    router.setReplicas([replica('far'), replica('near'), replica('also-far')], {}, { far: 'there', near: 'here', 'also-far': 'there' });
    const first = router.tryAcquire('', true)!;
    expect(first.actorId).toBe('near');
    // The local one is full: the others take the next.
    expect(router.tryAcquire('', true)!.actorId).not.toBe('near');
    router.release(first);
    // A model held on both nodes goes to the local holder.
    router.setModels('near', ['x']);
    router.setModels('far', ['x']);
    expect(router.tryAcquire('x', true)!.actorId).toBe('near');
  });

  it('keeps what a replica reports, and what it was sent lately; a model held nowhere goes to the emptiest replica', () => {
    const router = new Router('Model', limits(10, Infinity));
    router.setReplicas([replica('a'), replica('b')]);
    router.setModels('a', ['x', 'y', 'z']);
    const chosen = router.tryAcquire('w')!;
    expect(chosen.actorId).toBe('b');
    router.release(chosen);
    // b's report, taken before w arrived, lacks it: w was sent lately, so it still counts.
    router.setModels('b', []);
    expect(router.modelsByReplica().get('b')).toEqual(['w']);
    // a evicted y and z.
    router.setModels('a', ['x']);
    expect(router.modelsByReplica().get('a')).toEqual(['x']);
    // Requests without a model spread as before, whatever the replicas hold.
    const plain = [router.tryAcquire()!, router.tryAcquire()!, router.tryAcquire()!, router.tryAcquire()!];
    expect(new Set(plain.map((taken) => taken.actorId)).size).toBeGreaterThan(0);
    expect(router.modelsByReplica().get('a')).toEqual(['x']);
  });
});

describe('serve.multiplexed', () => {
  it('loads a model once, shares it, evicts the least recently used (closing it), and forgets a failed load', async () => {
    const loads: string[] = [];
    const closed: string[] = [];
    let fail = true;
    const model = serve.multiplexed(async (id: string) => {
      loads.push(id);
      await new Promise((resolve) => setTimeout(resolve, 5));
      if (id === 'broken' && fail) throw new Error('no weights');
      return { id, close: () => void closed.push(id) };
    }, { maxModelsPerReplica: 2 });
    const [one, again] = await Promise.all([model('a'), model('a')]);
    expect(one).toBe(again);
    await model('b');
    await model('a'); // a is now the most recent
    await model('c'); // evicts b
    expect(loads).toEqual(['a', 'b', 'c']);
    expect(closed).toEqual(['b']);
    expect(model.modelIds).toEqual(['a', 'c']);
    await expect(model('broken')).rejects.toThrow('no weights');
    expect(model.modelIds).not.toContain('broken');
    fail = false;
    expect((await model('broken')).id).toBe('broken');
    // Without an id, the request's: none here.
    await expect(model()).rejects.toThrow(InvalidArgumentError);
    expect(serve.getMultiplexedModelId()).toBe('');
    await model.clear();
    expect(model.modelIds).toEqual([]);
    expect(() => serve.multiplexed(async () => 1, { maxModelsPerReplica: 0 })).toThrow(/maxModelsPerReplica/);
    expect(() => serve.multiplexed(async () => 1, { maxModels: 2 } as never)).toThrow(/no option 'maxModels'/);
  });
});

describe('serve.multiplexed in requests', () => {
  it("reads the request's model, and closes an evicted model only once the requests that took it end", async () => {
    const closed: string[] = [];
    const model = serve.multiplexed((id: string) => ({ id, close: () => void closed.push(id) }), { maxModelsPerReplica: 1 });
    const first = openRequest('a');
    const a = await inRequest(first, () => {
      expect(serve.getMultiplexedModelId()).toBe('a');
      return model();
    });
    expect(a.id).toBe('a');
    // b evicts a while the first request still holds it: a stays open until that request ends.
    const second = openRequest('b');
    expect((await inRequest(second, () => model())).id).toBe('b');
    expect(model.modelIds).toEqual(['b']);
    expect(closed).toEqual([]);
    closeRequest(first);
    await new Promise((resolve) => setTimeout(resolve, 1));
    expect(closed).toEqual(['a']);
    // c evicts b, which nobody uses once its request ended: closed before c loads.
    closeRequest(second);
    const third = openRequest('c');
    await inRequest(third, () => model());
    expect(closed).toEqual(['a', 'b']);
    closeRequest(third);
    await model.clear();
    expect(closed).toEqual(['a', 'b', 'c']);
  });
});

describe('serve.batch', () => {
  it('gathers calls into batches of at most maxBatchSize, each call given its own result', async () => {
    const sizes: number[] = [];
    const double = serve.batch(async (values: number[]) => {
      sizes.push(values.length);
      return values.map((value) => value * 2);
    }, { maxBatchSize: 3, batchWaitTimeoutMs: 1_000 });
    // Six at once: two full batches go at once, neither waiting for its timeout.
    const started = Date.now();
    const results = await Promise.all([1, 2, 3, 4, 5, 6].map((value) => double(value)));
    expect(results).toEqual([2, 4, 6, 8, 10, 12]);
    expect(sizes).toEqual([3, 3]);
    expect(Date.now() - started).toBeLessThan(1_000);
    const lonely = serve.batch(async (values: number[]) => {
      sizes.push(values.length);
      return values;
    }, { maxBatchSize: 3, batchWaitTimeoutMs: 20 });
    expect(await lonely(7)).toBe(7);
    expect(sizes).toEqual([3, 3, 1]);
  });

  it('runs one batch at a time by default, gathering the next meanwhile', async () => {
    const sizes: number[] = [];
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    const slow = serve.batch(async (values: number[]) => {
      sizes.push(values.length);
      if (sizes.length === 1) await gate;
      return values;
    }, { maxBatchSize: 10, batchWaitTimeoutMs: 0 });
    const first = slow(1);
    await new Promise((resolve) => setTimeout(resolve, 5));
    const rest = [slow(2), slow(3), slow(4)];
    expect(slow.pending).toBe(3);
    release();
    expect(await Promise.all([first, ...rest])).toEqual([1, 2, 3, 4]);
    expect(sizes).toEqual([1, 3]);
  });

  it('fails every call of a batch that throws or answers with the wrong count', async () => {
    const throwing = serve.batch(async (): Promise<number[]> => {
      throw new Error('out of memory');
    }, { batchWaitTimeoutMs: 0 });
    await expect(Promise.all([throwing(1), throwing(2)])).rejects.toThrow('out of memory');
    const short = serve.batch(async (values: number[]) => values.slice(1), { maxBatchSize: 2, batchWaitTimeoutMs: 50 });
    const outcomes = await Promise.allSettled([short(1), short(2)]);
    expect(outcomes.map((outcome) => outcome.status)).toEqual(['rejected', 'rejected']);
    expect(String((outcomes[0] as PromiseRejectedResult).reason)).toMatch(/given 2 item\(s\), it returned 1 result\(s\)/);
    expect(() => serve.batch(async (values: number[]) => values, { maxBatchSize: 0 })).toThrow(InvalidArgumentError);
  });
});

describe('deployment options', () => {
  it('fills in the defaults', () => {
    const config = resolveDeploymentOptions('Model', {});
    expect(config).toMatchObject({ name: 'Model', numReplicas: 1, maxOngoingRequests: 5, maxQueuedRequests: Infinity, multiplexedModelWaitMs: 1_000, actorOptions: { numCpus: 1 } });
    const scaled = resolveDeploymentOptions('Model', { autoscaling: { minReplicas: 0, maxReplicas: 4 } });
    expect(scaled.autoscaling).toMatchObject({ minReplicas: 0, maxReplicas: 4, initialReplicas: 1, targetOngoingRequests: 2 });
    expect(scaled.numReplicas).toBe(1);
  });

  it('names what is wrong', () => {
    const cases: Array<[object, RegExp]> = [
      [{ replicas: 2 }, /unknown option 'replicas'/],
      [{ numReplicas: 1, autoscaling: {} }, /numReplicas or autoscaling, not both/],
      [{ numReplicas: -1 }, /numReplicas must be a whole number from 0/],
      [{ maxOngoingRequests: 0 }, /maxOngoingRequests must be a whole number from 1/],
      [{ autoscaling: { minReplicas: 3, maxReplicas: 2 } }, /maxReplicas \(2\) is below minReplicas \(3\)/],
      [{ autoscaling: { targetOngoingRequests: 0 } }, /targetOngoingRequests must be a number above 0/],
      [{ autoscaling: { upscaleDelay: 1 } }, /autoscaling: unknown option 'upscaleDelay'/],
      [{ actorOptions: { maxConcurrency: 4 } }, /actorOptions.maxConcurrency is the deployment's to set/],
      [{ name: 'a b' }, /name must be 1 to 128 letters/],
      [{ requestModelId: 'model' }, /requestModelId must be a function of the HTTP request or \{ jsonField, except \}, got "model"/],
      [{ requestModelId: { field: 'model' } }, /requestModelId must be a function of the HTTP request or \{ jsonField, except \}/],
      [{ healthCheckPeriodMs: -5 }, /healthCheckPeriodMs must be a number of milliseconds from 0/],
      [{ multiplexedModelWaitMs: '1s' }, /multiplexedModelWaitMs must be a number of milliseconds from 0, got "1s"/],
    ];
    for (const [options, message] of cases) expect(() => resolveDeploymentOptions('Model', options as never)).toThrow(message);
  });
});

describe('requestModelId as data', () => {
  it("reads a JSON body's field, unless it names one of except, as every node's proxy does", () => {
    const read = modelIdReader({ jsonField: 'model', except: ['base'] })!;
    const request = (method: string, body: string) => new HttpRequest({ method, url: '/v1/completions', path: '/v1/completions', routePath: '/v1/completions', query: {}, headers: {}, body: new TextEncoder().encode(body) });
    expect(read(request('POST', JSON.stringify({ model: 'tuned', prompt: 'x' })))).toBe('tuned');
    expect(read(request('POST', JSON.stringify({ model: 'base' })))).toBe('');
    expect(read(request('POST', JSON.stringify({ model: 7 })))).toBe('');
    expect(read(request('POST', '{not json'))).toBe('');
    expect(read(request('GET', ''))).toBe('');
    const given = () => 'from a function';
    expect(modelIdReader(given)).toBe(given);
    expect(modelIdReader(undefined)).toBeUndefined();
  });
});
