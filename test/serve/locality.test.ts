/**
 * Locality-aware routing over two logical nodes, one replica on each: calls through a handle
 * with preferLocalNode go to the caller's node while its replica has room, from the driver and
 * from a task on the other node, and to the other node's replica once it is full.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { get, init, serve, shutdown, state } from '../../lib/index.js';
import { WhereActor, nodesFromTask } from './fixtures/apps.js';

beforeAll(async () => {
  // Each node lends one `slot`: a replica on each.
  await init({ nodes: [{ id: 'near', numCpus: 1, resources: { slot: 1, near: 1 } }, { id: 'far', numCpus: 1, resources: { slot: 1, far: 1 } }], prestartWorkers: 0 });
});

afterAll(async () => {
  await shutdown();
});

describe('locality-aware routing', () => {
  it("sends calls to the caller's node first where asked, and elsewhere once its replicas are full", async () => {
    const where = await serve.run(serve.deployment(WhereActor, { numReplicas: 2, maxOngoingRequests: 1, actorOptions: { numCpus: 0, resources: { slot: 1 } } }).bind(), { name: 'where', routePrefix: null });
    const nodes = new Set(state().actors.filter((actor) => actor.className === 'ServeReplica').map((actor) => actor.nodeId));
    expect(nodes).toEqual(new Set(['near', 'far']));
    const local = where.options({ preferLocalNode: true });
    expect(String(local)).toBe('DeploymentHandle(where/Where, local node first)');
    // The driver runs on the first node.
    for (let call = 0; call < 6; call++) expect(await local.node()).toBe('near');
    // Its replica busy (one request at a time), the next call goes to the other node.
    const busy = local.node(300);
    expect(await local.node()).toBe('far');
    expect(await busy).toBe('near');
    // A task on the other node, its handle carrying the option: its calls stay there.
    expect(await get(nodesFromTask.options({ numCpus: 0, resources: { far: 1 } }).remote(local, 6))).toEqual(Array(6).fill('far'));
    await serve.delete('where');
  });
});
