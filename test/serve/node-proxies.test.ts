/**
 * HTTP proxies on every node (http.location 'EveryNode', Ray Serve's proxy_location): over two
 * logical nodes, each with a replica, each node's proxy serves every route, sends requests to
 * its own node's replica, streams answers, follows routes as applications come and go, and
 * serves again after its process dies.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { init, metricsText, serve, shutdown, state } from '../../lib/index.js';
import { NodeAnswerActor, NodeStreamActor } from './fixtures/apps.js';

beforeAll(async () => {
  // Each node lends one `slot`: a replica on each.
  await init({ nodes: [{ id: 'near', numCpus: 1, resources: { slot: 2, near: 1 } }, { id: 'far', numCpus: 1, resources: { slot: 2, far: 1 } }], prestartWorkers: 0 });
});

afterAll(async () => {
  await shutdown();
});

/** Polls `read` (every 20 ms, 10 s at most) until `done` holds of what it gives. */
async function until<T>(read: () => Promise<T>, done: (value: T) => boolean): Promise<T> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const value = await read();
    if (done(value) || Date.now() > deadline) return value;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

describe('proxies on every node', () => {
  it("serves every route on each node's proxy, from that node's replicas, and follows routes as applications come and go", async () => {
    const started = await serve.start({ http: { port: 0, location: 'EveryNode' } });
    expect(started.proxies.map((proxy) => proxy.nodeId)).toEqual(['near', 'far']);
    expect(new Set(started.proxies.map((proxy) => proxy.port)).size).toBe(2);
    const [near, far] = started.proxies.map((proxy) => proxy.url);
    const replicas = { numReplicas: 2, actorOptions: { numCpus: 0, resources: { slot: 1 } } };
    await serve.run(serve.deployment(NodeAnswerActor, replicas).bind(), { name: 'answer', routePrefix: '/answer' });
    await serve.run(serve.deployment(NodeStreamActor, replicas).bind(), { name: 'stream', routePrefix: '/stream' });
    expect(new Set(state().actors.filter((actor) => actor.className === 'ServeReplica' && actor.state === 'alive').map((actor) => actor.nodeId))).toEqual(new Set(['near', 'far']));
    // The far node's proxy learns the routes from the directory: it answers once it has them.
    const answered = await until(() => fetch(`${far}/answer/x`), (response) => response.status === 200);
    expect(await answered.json()).toEqual({ node: 'far', path: '/x' });
    for (let call = 0; call < 5; call++) expect(await (await fetch(`${far}/answer/y`)).json()).toEqual({ node: 'far', path: '/y' });
    expect(await (await fetch(`${near}/answer/z`)).json()).toMatchObject({ path: '/z' });
    expect(await (await until(() => fetch(`${far}/stream`), (response) => response.status === 200)).text()).toBe('streamed from far, in two parts');
    expect(await (await fetch(`${far}/-/routes`)).json()).toEqual({ '/answer': 'answer', '/stream': 'stream' });
    // The far proxy's requests reach the driver's metrics, as application metrics do, by node.
    await expect.poll(() => metricsText(), { timeout: 10_000 }).toMatch(/trellis_serve_http_requests_total\{application="answer",code="200",node="far"\} [6-9]\n/);
    // An application deleted: its route goes from every proxy.
    await serve.delete('stream');
    expect((await until(() => fetch(`${far}/stream`), (response) => response.status === 404)).status).toBe(404);
    expect((await fetch(`${far}/answer/y`)).status).toBe(200);

    // The far proxy's process killed: it comes back (the same routes, read again) and status() shows where it listens.
    const proxyActor = state().actors.find((actor) => actor.className === 'NodeProxy' && actor.nodeId === 'far')!;
    process.kill(proxyActor.pid!, 'SIGKILL');
    const back = await until(async () => {
      const url = serve.status().proxies.find((proxy) => proxy.nodeId === 'far')?.url;
      return url ? fetch(`${url}/answer/again`).catch(() => undefined) : undefined;
    }, (response) => response?.status === 200);
    expect(await back!.json()).toEqual({ node: 'far', path: '/again' });
    await serve.shutdown();
    expect(state().actors.filter((actor) => actor.className === 'NodeProxy' && actor.state === 'alive')).toEqual([]);
  });

  it('refuses a location it does not know, naming it', async () => {
    await expect(serve.start({ http: { port: 0, location: 'Everywhere' as 'EveryNode' } })).rejects.toThrow(/http.location must be 'HeadOnly' or 'EveryNode'/);
    await serve.shutdown();
  });
});
