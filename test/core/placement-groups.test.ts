/**
 * Placement groups: PACK, SPREAD, STRICT_PACK and STRICT_SPREAD over three logical nodes, ready(),
 * groups that wait for resources, tasks and actors scheduled into bundles, and removal.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  ActorDiedError,
  InfeasibleTaskError,
  InvalidArgumentError,
  get,
  init,
  placementGroup,
  removePlacementGroup,
  shutdown,
  state,
  type PlacementGroup,
} from '../../lib/index.js';
import { RemoteCounter } from './fixtures/actors.js';
import { context, gated } from './fixtures/core.js';
import { isAlive, openGate, rejection, scratch, started, until } from './helpers.js';

const files = scratch();
const created: PlacementGroup[] = [];

beforeAll(async () => {
  await init({ nodes: [{ numCpus: 2 }, { numCpus: 2 }, { numCpus: 2, resources: { accelerator: 1 } }], prestartWorkers: 1 });
});

afterEach(() => {
  // Each test starts with every CPU free.
  for (const group of created.splice(0)) removePlacementGroup(group);
});

afterAll(async () => {
  await shutdown();
  files.cleanup();
});

function group(...args: Parameters<typeof placementGroup>): PlacementGroup {
  const made = placementGroup(...args);
  created.push(made);
  return made;
}

const groupState = (pg: PlacementGroup) => state().placementGroups.find((candidate) => candidate.id === pg.id)!;
const bundleNodes = (pg: PlacementGroup) => groupState(pg).bundles.map((bundle) => bundle.nodeId!);
const freeCpus = () => Object.fromEntries(state().nodes.map((node) => [node.nodeId, node.resources.available.CPU ?? 0]));
const allFree = { 'node-0': 2, 'node-1': 2, 'node-2': 2 };
const pgStrategy = (pg: PlacementGroup, bundleIndex?: number) => ({ type: 'placement-group' as const, placementGroup: pg, bundleIndex });

describe('placement strategies', () => {
  it('PACK puts bundles on one node when it can', async () => {
    const pg = group([{ CPU: 1 }, { CPU: 1 }], 'PACK');
    await pg.ready();
    const nodes = bundleNodes(pg);
    expect(new Set(nodes).size).toBe(1);
    expect(freeCpus()[nodes[0]]).toBe(0);
  });

  it('PACK falls back to several nodes when no node holds them all', async () => {
    const pg = group([{ CPU: 2 }, { CPU: 2 }], 'PACK');
    await pg.ready();
    expect(new Set(bundleNodes(pg)).size).toBe(2);
  });

  it('STRICT_PACK puts every bundle on one node, or can never be placed', async () => {
    const pg = group([{ CPU: 1 }, { CPU: 1 }], 'STRICT_PACK');
    await pg.ready();
    expect(new Set(bundleNodes(pg)).size).toBe(1);
    const tooBig = group([{ CPU: 2 }, { CPU: 1 }], 'STRICT_PACK');
    expect(await rejection(tooBig.ready())).toBeInstanceOf(InfeasibleTaskError);
    expect(groupState(tooBig).state).toBe('infeasible');
  });

  it('SPREAD puts bundles on distinct nodes when it can', async () => {
    const pg = group([{ CPU: 1 }, { CPU: 1 }, { CPU: 1 }], 'SPREAD');
    await pg.ready();
    expect(new Set(bundleNodes(pg)).size).toBe(3);
  });

  it('STRICT_SPREAD needs a distinct node per bundle', async () => {
    const pg = group([{ CPU: 1 }, { CPU: 1 }, { CPU: 1 }], 'STRICT_SPREAD');
    await pg.ready();
    expect(new Set(bundleNodes(pg)).size).toBe(3);
    const four = group([{ CPU: 1 }, { CPU: 1 }, { CPU: 1 }, { CPU: 1 }], 'STRICT_SPREAD');
    expect(await rejection(four.ready())).toBeInstanceOf(InfeasibleTaskError);
  });

  it('bundles with custom resources go where those are', async () => {
    const pg = group([{ CPU: 1, accelerator: 1 }], 'STRICT_PACK');
    await pg.ready();
    expect(bundleNodes(pg)).toEqual(['node-2']);
    expect(await rejection(group([{ accelerator: 2 }], 'PACK').ready())).toBeInstanceOf(InfeasibleTaskError);
  });

  it('rejects malformed groups at once', () => {
    expect(() => placementGroup([], 'PACK')).toThrow(InvalidArgumentError);
    expect(() => placementGroup([{ CPU: 1 }], 'TIGHT' as 'PACK')).toThrow(InvalidArgumentError);
    expect(() => placementGroup([{ CPU: -1 }], 'PACK')).toThrow(InvalidArgumentError);
  });
});

describe('reservation and removal', () => {
  it('a group waits for resources, and is placed once they are free', async () => {
    // Three groups take every CPU of the cluster.
    const full = [0, 1, 2].map(() => group([{ CPU: 2 }], 'STRICT_PACK'));
    await Promise.all(full.map((pg) => pg.ready()));
    expect(freeCpus()).toEqual({ 'node-0': 0, 'node-1': 0, 'node-2': 0 });
    const waiting = group([{ CPU: 1 }], 'PACK');
    let ready = false;
    void waiting.ready().then(() => (ready = true));
    await new Promise((resolve) => setImmediate(resolve));
    expect(ready).toBe(false);
    expect(groupState(waiting).state).toBe('pending');
    const freed = bundleNodes(full[1]);
    removePlacementGroup(full[1]);
    await waiting.ready();
    expect(groupState(waiting).state).toBe('created');
    expect(bundleNodes(waiting)).toEqual(freed);
  });

  it('removal gives the resources back; a removed group rejects ready() if it was pending', async () => {
    const pg = group([{ CPU: 1 }, { CPU: 1 }], 'SPREAD');
    await pg.ready();
    removePlacementGroup(pg);
    expect(freeCpus()).toEqual(allFree);
    removePlacementGroup(pg); // harmless twice
    const full = [0, 1, 2].map(() => group([{ CPU: 2 }], 'STRICT_PACK'));
    await Promise.all(full.map((made) => made.ready()));
    const pending = group([{ CPU: 1 }], 'PACK');
    removePlacementGroup(pending);
    expect(await rejection(pending.ready())).toBeInstanceOf(Error);
  });
});

describe('tasks and actors in groups', () => {
  it('a group in an `await using` scope goes with it: resources back, its actors killed and their processes gone', async () => {
    let actorPid: number;
    {
      await using pg = placementGroup([{ CPU: 1 }], 'PACK');
      await pg.ready();
      const counter = RemoteCounter.options({ schedulingStrategy: pgStrategy(pg, 0) }).remote(0);
      actorPid = await get(counter.pid.remote());
      expect(Object.values(freeCpus()).reduce((a, b) => a + b, 0)).toBe(5);
    }
    expect(isAlive(actorPid)).toBe(false);
    expect(freeCpus()).toEqual(allFree);
    {
      using pg = placementGroup([{ CPU: 2 }], 'STRICT_PACK');
      await pg.ready();
    }
    expect(freeCpus()).toEqual(allFree);
  });

  it('removing a group while its task runs gives the task\'s share back when the task ends', async () => {
    const pg = group([{ CPU: 2 }], 'STRICT_PACK');
    await pg.ready();
    const [nodeId] = bundleNodes(pg);
    const gate = files.path('removed-under');
    const held = gated.options({ schedulingStrategy: pgStrategy(pg, 0) }).remote(gate, 'finished');
    try {
      await until(() => started(gate), 'the task in the group to start');
      removePlacementGroup(pg);
      // The unused CPU comes back at once; the running task's CPU stays taken until it ends.
      expect(freeCpus()[nodeId]).toBe(1);
    } finally {
      openGate(gate);
    }
    expect(await get(held)).toBe('finished');
    await until(() => freeCpus()[nodeId] === 2, 'the task\'s CPU to come back');
    expect(freeCpus()).toEqual(allFree);
  });


  it('a task in a bundle runs on that bundle\'s node, using the bundle\'s resources', async () => {
    const pg = group([{ CPU: 1 }, { CPU: 1 }], 'STRICT_SPREAD');
    await pg.ready();
    const nodes = bundleNodes(pg);
    for (const index of [0, 1]) {
      const seen = await get(context.options({ schedulingStrategy: pgStrategy(pg, index) }).remote());
      expect(seen.nodeId).toBe(nodes[index]);
    }
    // While a task holds bundle 0's CPU, the node's own free CPU is unchanged.
    const gate = files.path('bundle');
    const before = freeCpus();
    const held = gated.options({ schedulingStrategy: pgStrategy(pg, 0) }).remote(gate, 'done');
    try {
      await until(() => started(gate), 'the task in bundle 0 to start');
      expect(freeCpus()).toEqual(before);
      expect(groupState(pg).bundles[0].available?.CPU ?? 0).toBe(0);
    } finally {
      openGate(gate);
    }
    expect(await get(held)).toBe('done');
    await until(() => groupState(pg).bundles[0].available?.CPU === 1, 'bundle 0 to be free again');
    // Any bundle when none is named.
    expect(nodes).toContain((await get(context.options({ schedulingStrategy: pgStrategy(pg) }).remote())).nodeId);
  });

  it('a task that no bundle can hold is InfeasibleTaskError', async () => {
    const pg = group([{ CPU: 1 }], 'PACK');
    await pg.ready();
    expect(await rejection(get(context.options({ numCpus: 2, schedulingStrategy: pgStrategy(pg) }).remote()))).toBeInstanceOf(InfeasibleTaskError);
    expect(await rejection(get(context.options({ schedulingStrategy: pgStrategy(pg, 3) }).remote()))).toBeInstanceOf(InfeasibleTaskError);
  });

  it('a task waiting for a pending group fails when the group is removed', async () => {
    const full = [0, 1, 2].map(() => group([{ CPU: 2 }], 'STRICT_PACK'));
    await Promise.all(full.map((made) => made.ready()));
    const pending = group([{ CPU: 1 }], 'PACK');
    const waiting = context.options({ schedulingStrategy: pgStrategy(pending, 0) }).remote();
    removePlacementGroup(pending);
    expect(await rejection(get(waiting))).toBeInstanceOf(InfeasibleTaskError);
    // And a task for a group already removed fails at once.
    expect(await rejection(get(context.options({ schedulingStrategy: pgStrategy(pending) }).remote()))).toBeInstanceOf(InfeasibleTaskError);
  });

  it('an actor in a bundle runs on its node and dies with the group', async () => {
    const pg = group([{ CPU: 1 }, { CPU: 1 }], 'STRICT_SPREAD');
    await pg.ready();
    const counter = RemoteCounter.options({ numCpus: 1, schedulingStrategy: pgStrategy(pg, 1) }).remote(0);
    expect((await get(counter.context.remote())).nodeId).toBe(bundleNodes(pg)[1]);
    expect(groupState(pg).bundles[1].available?.CPU ?? 0).toBe(0);
    removePlacementGroup(pg);
    expect(await rejection(get(counter.increment.remote()))).toBeInstanceOf(ActorDiedError);
    await until(() => JSON.stringify(freeCpus()) === JSON.stringify(allFree), 'every CPU to be free');
  });
});
