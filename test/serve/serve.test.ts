/**
 * Serving (as Ray Serve): deployments of replicas behind the HTTP proxy and handles, streaming,
 * composition and batching, load spread and back-pressure, replicas replaced when they die or
 * fail health checks, failed deploys, in-place updates, autoscaling (to zero too), deletion and
 * bad input. One cluster for the file; each test runs its own applications.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BackPressureError, DeploymentError, InvalidArgumentError, NotInitializedError, get, init, metricsText, serve, shutdown } from '../../lib/index.js';
import { AdderActor, BrokenActor, ConfiguredActor, DoublerActor, EchoActor, EventsActor, ModelZooActor, SleeperActor, greetFromTask, predictFromTask } from './fixtures/apps.js';
import { DeploymentHandleBase } from '../../lib/serve/handle.js';

const light = { actorOptions: { numCpus: 0 } };
let url = '';

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

async function until(check: () => boolean | Promise<boolean>, what: string, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(serve.status().applications)}`);
    await sleep(20);
  }
}

beforeAll(async () => {
  // Replicas are actors with workers of their own: no idle task workers to start.
  await init({ numCpus: 2, prestartWorkers: 0 });
  const status = await serve.start({ http: { port: 0, maxBodyBytes: 1024 } });
  url = status.proxy!.url;
});

afterAll(async () => {
  await shutdown();
});

describe('serve over HTTP', () => {
  it('routes requests to fetch() and answers with what it returns', async () => {
    await serve.run(serve.deployment(EchoActor, light).bind('hello'), { name: 'echo', routePrefix: '/echo' });
    const text = await fetch(`${url}/echo/text?name=ada`);
    expect([text.status, text.headers.get('content-type'), await text.text()]).toEqual([200, 'text/plain; charset=utf-8', 'hello, ada']);
    const bytes = await fetch(`${url}/echo/bytes`);
    expect([bytes.headers.get('content-type'), [...new Uint8Array(await bytes.arrayBuffer())]]).toEqual(['application/octet-stream', [1, 2, 3]]);
    const teapot = await fetch(`${url}/echo/teapot`);
    expect([teapot.status, teapot.headers.get('x-kind'), await teapot.json()]).toEqual([418, 'teapot', { short: true }]);
    const posted = await fetch(`${url}/echo/items/7?sort=asc`, { method: 'POST', body: JSON.stringify({ a: 1 }) });
    expect(await posted.json()).toEqual({ method: 'POST', path: '/echo/items/7', routePath: '/items/7', query: { sort: 'asc' }, body: { a: 1 } });
    expect((await fetch(`${url}/echo/empty`)).status).toBe(204);
    // Errors: the user's status, a throw as 500, a body that is not JSON as 400, one too large as 413.
    const bad = await fetch(`${url}/echo/bad`);
    expect([bad.status, await bad.json()]).toEqual([422, { error: 'HttpError', message: 'not like that' }]);
    const boom = await fetch(`${url}/echo/boom`);
    expect([boom.status, await boom.json()]).toEqual([500, { error: 'TypeError', message: 'it broke' }]);
    expect((await fetch(`${url}/echo/x`, { method: 'POST', body: '{oops' })).status).toBe(400);
    expect((await fetch(`${url}/echo/x`, { method: 'POST', body: 'x'.repeat(2048) })).status).toBe(413);
    const missing = await fetch(`${url}/elsewhere`);
    expect([missing.status, ((await missing.json()) as { message: string }).message]).toEqual([404, 'no application serves /elsewhere (routes: /echo)']);
    expect(await (await fetch(`${url}/-/healthz`)).text()).toBe('success');
    expect(await (await fetch(`${url}/-/routes`)).json()).toEqual({ '/echo': 'echo' });
    // The proxy's metrics count them by application and code; the deployment's gauges say its replicas.
    const metrics = metricsText();
    expect(metrics).toMatch(/trellis_serve_http_requests_total\{application="echo",code="200",node="[^"]+"\} 3\n/);
    expect(metrics).toMatch(/trellis_serve_http_requests_total\{application="echo",code="413",node="[^"]+"\} 1\n/);
    expect(metrics).toMatch(/trellis_serve_http_request_duration_seconds_count\{application="echo",node="[^"]+"\} 9\n/);
    expect(metrics).toMatch(/trellis_serve_deployment_replicas\{application="echo",deployment="Echo",state="running"\} 1\n/);
    expect(metrics).toMatch(/trellis_serve_deployment_healthy\{application="echo",deployment="Echo"\} 1\n/);
    await serve.delete('echo');
    expect((await fetch(`${url}/echo/text`)).status).toBe(404);
  });

  it('streams a generator fetch() as it yields, and stops it when the client goes', async () => {
    const events = await serve.run(serve.deployment(EventsActor, light).bind(), { name: 'events', routePrefix: '/events' });
    const response = await fetch(`${url}/events?count=3`);
    expect(response.headers.get('content-type')).toBe('text/event-stream');
    expect(await response.text()).toBe('data: {"i":0}\n\ndata: {"i":1}\n\ndata: {"i":2}\n\n');
    expect(await events.stops()).toBe(1);
    // A client that reads one event and leaves: the generator is closed at its next yield.
    const abort = new AbortController();
    const endless = await fetch(`${url}/events?count=100000&pause=5`, { signal: abort.signal });
    const reader = endless.body!.getReader();
    expect(new TextDecoder().decode((await reader.read()).value)).toMatch(/^data: \{"i":0\}/);
    abort.abort();
    await until(async () => (await events.stops()) === 2, 'the stream to stop');
    await serve.delete('events');
  });
});

describe('serve by handle', () => {
  it('calls methods, streams generator methods, and reaches deployments by name', async () => {
    const echo = await serve.run(serve.deployment(EchoActor, light).bind('hi'), { name: 'handles', routePrefix: null });
    expect(await echo.greet('bo')).toBe('hi, bo');
    const counted: number[] = [];
    for await (const item of echo.count(4)) counted.push(item);
    expect(counted).toEqual([1, 2, 3, 4]);
    expect(await serve.getDeploymentHandle('Echo', 'handles').greet('cy')).toBe('hi, cy');
    expect(await serve.getAppHandle('handles').greet('di')).toBe('hi, di');
    expect(() => (echo as unknown as { nope: unknown }).nope).toThrow(/deployment Echo has no method 'nope' \(it has: fetch, greet, pid, count\)/);
    expect(() => serve.getDeploymentHandle('Echo', 'nowhere')).toThrow(DeploymentError);
    // A handle passed to a task: the task's worker routes by the directory.
    expect(await get(greetFromTask.remote(echo, ['ed', 'flo']))).toEqual(['hi, ed', 'hi, flo']);
    await serve.delete('handles');
    await expect(echo.greet('gone')).rejects.toThrow(/application handles was deleted/);
  });

  it('composes deployments: handles in replicas, responses passed on unread, batches', async () => {
    const doubler = serve.deployment(DoublerActor, { ...light, maxOngoingRequests: 8 });
    const adder = await serve.run(serve.deployment(AdderActor, light).bind(doubler.bind()), { name: 'math', routePrefix: '/math' });
    expect(await (await fetch(`${url}/math?x=4`)).json()).toEqual({ result: 9 });
    expect(await adder.quadruple(3)).toBe(12);
    const direct = serve.getDeploymentHandle<InstanceType<typeof import('./fixtures/apps.js').Doubler>>('Doubler', 'math');
    const before = (await direct.batchSizes()).length;
    expect(await Promise.all([1, 2, 3, 4, 5, 6].map((value) => direct.twice(value)))).toEqual([2, 4, 6, 8, 10, 12]);
    const sizes = (await direct.batchSizes()).slice(before);
    // Six calls at once make a full batch of 4 and the rest: never one call a batch.
    expect(sizes.reduce((sum, size) => sum + size, 0)).toBe(6);
    expect(Math.max(...sizes)).toBe(4);
    await serve.delete('math');
  });
});

describe('load, failures and updates', () => {
  it('spreads requests over replicas and refuses past the queue bound', async () => {
    const sleeper = await serve.run(serve.deployment(SleeperActor, { ...light, numReplicas: 2, maxOngoingRequests: 1, maxQueuedRequests: 2 }).bind(), { name: 'sleepy', routePrefix: null });
    const pids = await Promise.all([sleeper.work(300), sleeper.work(300)]);
    expect(new Set(pids).size).toBe(2);
    // Two run, two wait in the driver's router, the fifth is refused at once.
    const running = [1, 2, 3, 4].map(() => sleeper.work(200));
    await expect(sleeper.work(1)).rejects.toThrow(BackPressureError);
    await Promise.all(running);
    await serve.delete('sleepy');
  });

  it('multiplexes models: each goes to the replica holding it, named by handle options or the HTTP header', async () => {
    const zoo = await serve.run(serve.deployment(ModelZooActor, { ...light, numReplicas: 2 }).bind(), { name: 'zoo', routePrefix: '/zoo' });
    const of = (model: string) => zoo.options({ multiplexedModelId: model });
    const first = await of('m1').predict(1);
    expect(first).toMatchObject({ model: 'm1', requested: 'm1', x: 1 });
    // m2 is held nowhere: the replica holding fewest models (the other one) loads it.
    const second = await of('m2').predict(2);
    expect(second.pid).not.toBe(first.pid);
    // Later requests for each, one after another or many at once, stay with their replica.
    for (let round = 0; round < 3; round++) {
      expect((await of('m1').predict(round)).pid).toBe(first.pid);
      expect((await of('m2').predict(round)).pid).toBe(second.pid);
    }
    const burst = await Promise.all([1, 2, 3, 4].map((x) => of('m1').predict(x)));
    expect(new Set(burst.map((answer) => answer.pid))).toEqual(new Set([first.pid]));
    expect(burst.at(-1)!.loads.filter((id) => id === 'm1')).toHaveLength(1);
    // The header routes HTTP requests the same way.
    const byHeader = await (await fetch(`${url}/zoo/x`, { headers: { serve_multiplexed_model_id: 'm2' } })).json();
    expect(byHeader).toEqual({ model: 'm2', pid: second.pid, path: '/x' });
    // A router in another process (a task's) learns what each replica holds from the directory,
    // once the controller has read the replicas' reports: it sends each model where it is held.
    const { directory } = DeploymentHandleBase.targetOf(zoo as never);
    await until(async () => Object.keys((await get(directory.watch.remote('zoo/ModelZoo', -1, 0))).models).length === 2, "the replicas' models in the directory");
    expect(await get(predictFromTask.remote(zoo, ['m2', 'm1', 'm2', 'm1']))).toEqual([second.pid, first.pid, second.pid, first.pid]);
    // A generator method reads its model at every step.
    const items: string[] = [];
    for await (const item of of('m3').tokens(3)) items.push(item);
    expect(items).toEqual(['m3:0', 'm3:1', 'm3:2']);
    // A call without a model has none; bad options are refused by name.
    await expect(zoo.predict(0)).rejects.toThrow(/names no model/);
    expect(() => zoo.options({ model: 'x' } as never)).toThrow(InvalidArgumentError);
    expect(String(of('m1'))).toBe('DeploymentHandle(zoo/ModelZoo, model m1)');
    await serve.delete('zoo');
  });

  it('replaces a replica that dies or fails its health check', async () => {
    const sleeper = await serve.run(serve.deployment(SleeperActor, light).bind(), { name: 'phoenix', routePrefix: null });
    const first = await sleeper.pid();
    await sleeper.crash();
    await until(async () => serve.status().applications.phoenix.deployments.Sleeper.status === 'HEALTHY' && (await sleeper.pid().then((pid) => pid !== first, () => false)), 'a new replica');
    const configured = await serve.run(serve.deployment(ConfiguredActor, { ...light, healthCheckPeriodMs: 50, healthCheckTimeoutMs: 2_000 }).bind(), { name: 'wellness', routePrefix: null });
    const healthy = await configured.pid();
    await configured.sicken();
    await until(async () => (await configured.pid().catch(() => healthy)) !== healthy, 'the unhealthy replica replaced');
    expect(serve.status().applications.wellness.deployments.Configured.message).toMatch(/failed its health check: .*unwell/);
    await Promise.all([serve.delete('phoenix'), serve.delete('wellness')]);
  });

  it('fails a deploy whose replicas cannot start, naming why', async () => {
    const failed = await serve.run(serve.deployment(BrokenActor, light).bind(), { name: 'broken', routePrefix: '/broken' }).catch((error: unknown) => error);
    expect(failed).toBeInstanceOf(DeploymentError);
    expect((failed as Error).message).toMatch(/deployment Broken failed to start 3 replicas in a row; the last: .*cannot load the model/);
    expect(serve.status().applications.broken).toBeUndefined();
    expect((await fetch(`${url}/broken`)).status).toBe(404);
  });

  it('updates in place: a new userConfig keeps the replicas; new arguments replace them', async () => {
    const configured = serve.deployment(ConfiguredActor, { ...light, userConfig: { threshold: 1 } });
    const handle = await serve.run(configured.bind(), { name: 'tuned', routePrefix: null });
    const pid = await handle.pid();
    expect(await handle.config()).toEqual({ threshold: 1 });
    await serve.run(configured.options({ userConfig: { threshold: 2 } }).bind(), { name: 'tuned', routePrefix: null });
    expect([await handle.pid(), await handle.config()]).toEqual([pid, { threshold: 2 }]);
    const echo = serve.deployment(EchoActor, light);
    const greeter = await serve.run(echo.bind('hello'), { name: 'greeter', routePrefix: null });
    const oldPid = await greeter.pid();
    await serve.run(echo.bind('howdy'), { name: 'greeter', routePrefix: null });
    // The handle from before reaches the new version.
    expect(await greeter.greet('x')).toBe('howdy, x');
    expect(await greeter.pid()).not.toBe(oldPid);
    await Promise.all([serve.delete('tuned'), serve.delete('greeter')]);
  });

  it('autoscales with load, and from zero when a request comes', async () => {
    const autoscaling = { minReplicas: 1, maxReplicas: 2, targetOngoingRequests: 1, metricsIntervalMs: 20, lookBackPeriodMs: 100, upscaleDelayMs: 0, downscaleDelayMs: 200 };
    const sleeper = await serve.run(serve.deployment(SleeperActor, { ...light, maxOngoingRequests: 2, autoscaling }).bind(), { name: 'elastic', routePrefix: null });
    const deployment = () => serve.status().applications.elastic.deployments.Sleeper;
    const load = [1, 2, 3, 4].map(() => sleeper.work(1_500));
    await until(() => deployment().targetReplicas === 2 && deployment().replicas.running === 2, 'two replicas under load');
    await Promise.all(load);
    await until(() => deployment().targetReplicas === 1 && deployment().replicas.running === 1, 'one replica once idle');
    const zero = await serve.run(serve.deployment(SleeperActor, { ...light, name: 'Dormant', autoscaling: { minReplicas: 0, maxReplicas: 1, initialReplicas: 0, metricsIntervalMs: 20, downscaleDelayMs: 60_000 } }).bind(), { name: 'dormant', routePrefix: null });
    expect(serve.status().applications.dormant.deployments.Dormant.replicas.running).toBe(0);
    expect(typeof (await zero.work(1))).toBe('number');
    expect(serve.status().applications.dormant.deployments.Dormant.replicas.running).toBe(1);
    await Promise.all([serve.delete('elastic'), serve.delete('dormant')]);
  });
});

describe('serve: bad input', () => {
  it('names what is wrong', async () => {
    class Plain {}
    expect(() => serve.deployment(Plain as never)).toThrow(/deployment\(\) takes an actor class made by remote/);
    expect(() => serve.deployment(EchoActor, { numReplicas: 2, autoscaling: {} })).toThrow(InvalidArgumentError);
    await expect(serve.run(serve.deployment(SleeperActor, light).bind(), { name: 'web' })).rejects.toThrow(/Sleeper is the ingress of an HTTP route \(\/\), so it needs a fetch\(request\) method/);
    await expect(serve.run(serve.deployment(EchoActor, light).bind('x'), { routePrefix: 'no-slash' })).rejects.toThrow(/routePrefix must be a path starting with '\/'/);
    await expect(serve.run(serve.deployment(EchoActor, light).bind('x'), { name: 'a/b' })).rejects.toThrow(/name must be 1 to 128 letters/);
    const twice = serve.deployment(EchoActor, light);
    const adder = serve.deployment(AdderActor, light);
    await expect(serve.run(adder.bind([twice.bind('a'), twice.bind('b')] as never), { name: 'dup', routePrefix: null })).rejects.toThrow(/two deployments in one application are named Echo/);
  });

  it('serve.shutdown() removes every application and the proxy; serving starts again after', async () => {
    const echo = await serve.run(serve.deployment(EchoActor, light).bind('one'), { name: 'first', routePrefix: '/first' });
    await serve.shutdown();
    expect(serve.status()).toEqual({ proxy: null, proxies: [], applications: {} });
    await expect(fetch(`${url}/first`)).rejects.toThrow();
    await expect(echo.greet('x')).rejects.toThrow(DeploymentError);
    const again = await serve.start({ http: { port: 0 } });
    await serve.run(serve.deployment(EchoActor, light).bind('two'), { name: 'second', routePrefix: '/second' });
    expect(await (await fetch(`${again.proxy!.url}/second/text?name=z`)).text()).toBe('two, z');
    expect(await serve.getAppHandle('second').greet('y')).toBe('two, y');
  });

  it('is for the driver after init()', async () => {
    await shutdown();
    await expect(serve.run(serve.deployment(EchoActor).bind('x'))).rejects.toThrow(NotInitializedError);
    await init({ numCpus: 2, prestartWorkers: 0 });
  });
});
