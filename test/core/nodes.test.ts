/**
 * Node agents joining a listening driver: two agents (separate processes, each with its own
 * store segment and workers, as on other hosts) run tasks and actors; objects move between their
 * stores and the driver's in chunks over TCP; a wrong token is refused; an agent's death loses
 * its node, whose tasks retry elsewhere and whose objects are recomputed.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdirSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { GraphValidationError, InfeasibleTaskError, InputNode, ModelReplica, NodeAgent, ObjectLostError, ObjectStoreFullError, buildLLMProcessor, createCollectiveGroup, events, fromItems, readDatasource, get, init, kill, memorySummary, placementGroup, put, removePlacementGroup, shutdown, state, waitForNodes, type ClusterSession } from '../../lib/index.js';
import { AccumulatorActor, NodeTagger, checksum, putArray, shout, checksumOfRef, makeArray, waitThenWhere, whereAmI } from './fixtures/nodes.js';
import { openGate, rejection, scratch, trellisCli, until } from './helpers.js';
import { TINY_LLAMA, randomWeights, referenceGenerate, writeCheckpoint } from '../llm/fixtures/decoders.js';
import { GatedSource } from '../data/fixtures/udfs.js';

const TOKEN = 'test-token-4f2a';

function startAgent(port: number, id: string, resources: Record<string, number>, environment: Record<string, string> = {}): ChildProcess {
  return spawn(process.execPath, [
    ...trellisCli, 'node', '--head', `127.0.0.1:${port}`, '--id', id, '--num-cpus', '1', '--num-gpus', '0',
    '--resources', JSON.stringify(resources), '--object-store-memory', String(64 * 1024 * 1024), '--once',
  ], { env: { ...process.env, TRELLIS_CLUSTER_TOKEN: TOKEN, ...environment }, stdio: ['ignore', 'inherit', 'inherit'] });
}

function expectedChecksum(count: number, seed: number): number {
  let sum = 0;
  for (let i = 0; i < count; i++) sum += (seed + i * 0.5) * ((i % 7) + 1);
  return sum;
}

describe('node agents', () => {
  let session: ClusterSession;
  let port: number;
  const agents = new Map<string, ChildProcess>();
  const files = scratch();

  beforeAll(async () => {
    // No CPUs of its own: whatever needs one runs on the agents.
    session = await init({ numCpus: 0, prestartWorkers: 1, listen: { host: '127.0.0.1', port: 0, token: TOKEN } });
    port = state().listening!.port;
    agents.set('agent-a', startAgent(port, 'agent-a', { a: 1, pool: 1, slot: 1 }));
    agents.set('agent-b', startAgent(port, 'agent-b', { b: 1, pool: 1, slot: 1 }));
    await waitForNodes(3, { timeout: 60_000 });
  }, 90_000);

  afterAll(async () => {
    await session?.shutdown();
    for (const agent of agents.values()) if (agent.exitCode === null) agent.kill('SIGKILL');
    files.cleanup();
  });

  it('join with their resources and run tasks in their own stores', async () => {
    const nodes = state().nodes;
    expect(nodes.map((node) => node.nodeId).sort()).toEqual(['agent-a', 'agent-b', 'node-0']);
    const a = nodes.find((node) => node.nodeId === 'agent-a')!;
    expect(a.resources.total).toMatchObject({ CPU: 1, a: 1, pool: 1 });
    expect(a.hostname).toBeTypeOf('string');
    expect(a.agentPid).toBe(agents.get('agent-a')!.pid);
    const [onA, onB] = await get([whereAmI.options({ resources: { a: 1 } }).remote(), whereAmI.options({ resources: { b: 1 } }).remote()]);
    expect(onA.nodeId).toBe('agent-a');
    expect(onB.nodeId).toBe('agent-b');
    expect(onA.store).toBe(a.storeName);
    expect(new Set([onA.store, onB.store, nodes.find((node) => node.nodeId === 'node-0')!.storeName]).size).toBe(3);
  });

  it("prints an agent's worker output in the driver, each line led by its node and pid", async () => {
    const written: string[] = [];
    const out = vi.spyOn(process.stdout, 'write').mockImplementation((chunk) => (written.push(String(chunk)), true));
    const err = vi.spyOn(process.stderr, 'write').mockImplementation((chunk) => (written.push(String(chunk)), true));
    try {
      const pid = await get(shout.options({ resources: { a: 1 } }).remote('hello'));
      await until(() => written.join('').includes('err'), 'the output to arrive');
      const text = written.join('');
      expect(text).toContain(`(agent-a pid=${pid}) hello out\n(agent-a pid=${pid}) second line\n`);
      expect(text).toContain(`(agent-a pid=${pid}) hello err\n`);
    } finally {
      out.mockRestore();
      err.mockRestore();
    }
  });

  it('moves stored objects between agents and to and from the driver', async () => {
    const count = 3 * 1024 * 1024 + 17; // 24 MiB and a bit: several chunks, the last one short
    const transfers: Array<{ from: string; to: string }> = [];
    const onTransfer = (transfer: { from: string; to: string }) => transfers.push(transfer);
    events().on('object-transfer', onTransfer);
    try {
      const made = makeArray.options({ resources: { a: 1 } }).remote(count, 3);
      // As an argument on the other agent, from inside a task there, and in the driver.
      const onB = await get(checksum.options({ resources: { b: 1 } }).remote(made));
      expect(onB).toEqual({ sum: expectedChecksum(count, 3), length: count, nodeId: 'agent-b' });
      const fromTask = await get(checksumOfRef.options({ resources: { b: 1 } }).remote([made]));
      expect(fromTask.sum).toBe(expectedChecksum(count, 3));
      const values = await get(made);
      expect(values.length).toBe(count);
      expect(values[count - 1]).toBe(3 + (count - 1) * 0.5);
      // The driver's put, read on an agent.
      const local = new Float64Array(count).map((_, i) => 3 + i * 0.5);
      const fromDriver = await get(checksum.options({ resources: { a: 1 } }).remote(put(local)));
      expect(fromDriver.sum).toBe(expectedChecksum(count, 3));
      // The memory summary asks each agent for its store's pins: the copies, and the driver's view.
      const summary = await memorySummary();
      expect(summary.nodes.map((node) => [node.nodeId, node.error])).toEqual(expect.arrayContaining([['node-0', undefined], ['agent-a', undefined], ['agent-b', undefined]]));
      const entry = summary.objects.find((object) => object.objectId === made.id)!;
      expect(entry).toMatchObject({ state: 'ready', where: 'store', madeBy: 'makeArray' });
      expect(entry.nodes).toEqual(expect.arrayContaining(['agent-a', 'agent-b', 'node-0']));
      expect(entry.pinnedBy).toContainEqual(expect.objectContaining({ nodeId: 'node-0', holder: 'driver', pid: process.pid }));
      expect(values.length).toBe(count);
    } finally {
      events().off('object-transfer', onTransfer);
    }
    expect(transfers).toEqual(expect.arrayContaining([
      // Agent to agent straight, the target pulling from the source; the rest through the driver.
      expect.objectContaining({ from: 'agent-a', to: 'agent-b', route: 'direct' }),
      expect.objectContaining({ from: expect.stringMatching(/^agent-[ab]$/), to: 'node-0' }),
      expect.objectContaining({ from: 'node-0', to: 'agent-a' }),
    ]));
    // Each copy once: the task's get found the copy the argument had made.
    expect(transfers.filter((transfer) => transfer.to === 'agent-b')).toHaveLength(1);
  });

  it('runs actors on an agent, fed from another', async () => {
    const actor = AccumulatorActor.options({ resources: { b: 1 } }).remote();
    const where = await get(actor.where.remote());
    expect(where.nodeId).toBe('agent-b');
    const made = makeArray.options({ resources: { a: 1 } }).remote(1024 * 1024, 1);
    const total = await get(actor.add.remote(made));
    let expected = 0;
    for (let i = 0; i < 1024 * 1024; i++) expected += 1 + i * 0.5;
    expect(total).toBe(expected);
    const result = await get(actor.make.remote(300_000));
    expect(result.length).toBe(300_000);
    expect(result[299_999]).toBe(expected);
    kill(actor); // gives agent-b's b back
  });

  it("runs a dataset's actor pool on the agents", async () => {
    const rows = await fromItems(Array.from({ length: 2000 }, (_, id) => ({ id })), { parallelism: 8 })
      .mapBatches(NodeTagger, { concurrency: 2, numCpus: 1, resources: { pool: 1 }, batchSize: 100 })
      .takeAll();
    expect(rows.map((row) => row.scaled).sort((a, b) => (a as number) - (b as number))).toEqual(Array.from({ length: 2000 }, (_, id) => id * 3));
    // Only agents have `pool`: every batch ran on one (on both, unless one actor took them all).
    for (const row of rows) expect(['agent-a', 'agent-b']).toContain(row.nodeId);
  });

  it('maps each block on an actor of the node that holds it, where one is free', async () => {
    const gate = files.path('read-gate');
    const ready = files.path('taggers-ready');
    mkdirSync(ready);
    const moves: Array<{ route: string }> = [];
    const onTransfer = (move: { route: string }) => moves.push(move);
    events().on('object-transfer', onTransfer);
    try {
      // 16 blocks of 25,000 rows (stored, not inline), all read on agent-a once both actors are up.
      const source = new GatedSource(400_000, 25_000, Object.fromEntries(Array.from({ length: 16 }, (_, index) => [index, gate])));
      const pending = readDatasource(source, { resources: { a: 1 } })
        .mapBatches(NodeTagger, { concurrency: 2, numCpus: 0, resources: { pool: 1 }, batchSize: null, maxTasksInFlightPerActor: 16, constructorArgs: [ready] })
        .takeAll();
      // Made, not only placed: an actor still importing the class takes no block yet.
      await until(() => readdirSync(ready).length >= 2, 'both pool actors made');
      openGate(gate);
      const rows = await pending;
      expect(rows).toHaveLength(400_000);
      // Least-loaded dispatch alone would send about half of them to agent-b's actor.
      expect(new Set(rows.map((row) => row.nodeId))).toEqual(new Set(['agent-a']));
      expect(moves.filter((move) => move.route === 'direct')).toHaveLength(0);
    } finally {
      events().off('object-transfer', onTransfer);
    }
  }, 60_000);

  it("runs an LLM processor's replicas on the agents, each replica's ranks on its engine's node", async () => {
    const weights = randomWeights(TINY_LLAMA, 5);
    const checkpoint = await writeCheckpoint(files.path('llama'), TINY_LLAMA, weights, { prefix: 'model.' });
    const prompts = [[5, 17, 3], [42, 1], [9, 8, 7, 6], [60]];
    const rows = await buildLLMProcessor({ checkpoint, maxNewTokens: 5, concurrency: 2 })(
      fromItems(Array.from({ length: 16 }, (_, id) => ({ id, tokens: prompts[id % prompts.length] })), { parallelism: 4 }),
    ).takeAll();
    expect(rows).toHaveLength(16);
    for (const row of rows) {
      expect(Array.from(row.generatedTokens as number[])).toEqual(referenceGenerate(TINY_LLAMA, weights, prompts[(row.id as number) % prompts.length], 5));
    }
    // A replica made in the driver runs on the driver's host (its compiled graph is made here),
    // whose node has no CPUs in this cluster: refused, saying where it looked.
    const refused = await rejection(ModelReplica.create({ checkpoint }));
    expect(refused).toBeInstanceOf(InfeasibleTaskError);
    expect(refused.message).toContain("on the driver's host");
  }, 60_000);

  it('refuses a compiled graph or a cpu collective group whose actors are on another host', async () => {
    // An agent that counts as another host: shared memory does not reach it.
    agents.set('agent-far', startAgent(port, 'agent-far', { far: 1 }, { TRELLIS_HOST_ID: 'far-away' }));
    await waitForNodes(4, { timeout: 60_000 });
    const near = AccumulatorActor.options({ resources: { a: 1 } }).remote();
    const far = AccumulatorActor.options({ resources: { far: 1 } }).remote();
    const input = new InputNode();
    const error = await rejection(far.add.bind(near.add.bind(input)).compile());
    expect(error).toBeInstanceOf(GraphValidationError);
    expect(error.message).toContain('far-away');
    // A 'cpu' collective group is shared memory too.
    const group = await rejection(createCollectiveGroup([near, far], { backend: 'cpu' }));
    expect(group).toMatchObject({ code: 'ERR_GROUP_HOSTS' });
    expect(group.message).toContain('rank 1');
    kill(near);
    kill(far);
  }, 60_000);

  it('fails a task whose argument does not fit its node\'s store with the store\'s own error, naming the node', async () => {
    // agent-far's store holds 64 MiB.
    const error = await rejection(get(checksum.options({ resources: { far: 1 } }).remote(put(new Float64Array(10 * 2 ** 20)))));
    expect(error).toBeInstanceOf(ObjectStoreFullError);
    expect(error.message).toContain('node agent-far');
  });

  it('refuses an agent with the wrong token', async () => {
    const agent = new NodeAgent({ head: `127.0.0.1:${port}`, token: 'not-the-token', id: 'intruder', numCpus: 1, objectStoreMemory: 16 * 1024 * 1024 });
    const error = await rejection(agent.done);
    expect(error.code).toBe('ERR_NODE_REFUSED');
    expect(error.message).toContain('wrong token');
    expect(state().nodes.map((node) => node.nodeId)).not.toContain('intruder');
    // An agent of another version, by its hello.
    const { connect } = await import('node:net');
    const { FrameConnection } = await import('../../lib/core/connection.js');
    const reason = await new Promise<string>((resolve) => {
      const connection: any = new FrameConnection(connect({ host: '127.0.0.1', port }), (message: { t: string; reason?: string }) => {
        if (message.t === 'refused') resolve(message.reason!);
      }, () => {});
      connection.send({ t: 'agent-hello', token: TOKEN, protocol: 0, nodeId: 'old', hostname: 'old', resources: { CPU: 1 }, numGpus: 0, storeName: 'none', store: {}, mps: false, pid: 1 });
    });
    expect(reason).toContain('node protocol 0');
    expect(state().nodes.map((node) => node.nodeId)).not.toContain('old');
  });

  it('loses a node whose agent dies: its tasks retry elsewhere and its objects are recomputed', async () => {
    const gate = files.path('gate');
    const removed: string[] = [];
    events().on('node-removed', ({ nodeId }: { nodeId: string }) => removed.push(nodeId));
    // Results only agent-b holds (one any pool node can recompute, one only a b node can), and a
    // task running there when it dies.
    const onB = { resources: { pool: 1 }, schedulingStrategy: { type: 'node', nodeId: 'agent-b', soft: true } } as const;
    const recomputable = makeArray.options(onB).remote(200_000, 7);
    const bound = makeArray.options({ resources: { b: 1 } }).remote(200_000, 1);
    const [putThere] = await get(putArray.options({ resources: { b: 1 } }).remote(200_000));
    const [putAnywhere] = await get(putArray.options(onB).remote(200_000));
    expect((await get(checksum.options({ resources: { b: 1 } }).remote(recomputable))).nodeId).toBe('agent-b');
    // A placement group with a bundle on each agent, and an actor in agent-b's bundle.
    const group = placementGroup([{ slot: 1 }, { slot: 1 }], 'STRICT_SPREAD');
    await group.ready();
    const bundleOnB = state().placementGroups.find((entry) => entry.id === group.id)!.bundles.findIndex((bundle) => bundle.nodeId === 'agent-b');
    const inBundle = AccumulatorActor.options({ numCpus: 0, resources: { slot: 1 }, maxRestarts: 1, schedulingStrategy: { type: 'placement-group', placementGroup: group, bundleIndex: bundleOnB } }).remote();
    expect((await get(inBundle.where.remote())).nodeId).toBe('agent-b');
    const stranded = waitThenWhere.options(onB).remote(gate);
    await until(() => state().tasks.running === 1, 'the gated task to run');
    agents.get('agent-b')!.kill('SIGKILL');
    await until(() => removed.includes('agent-b'), 'agent-b to leave');
    expect(state().nodes.map((node) => node.nodeId).sort()).toEqual(['agent-a', 'agent-far', 'node-0']);
    expect(removed).toEqual(['agent-b']);
    openGate(gate);
    expect(await get(stranded)).toBe('agent-a');
    const recomputed = await get(checksum.options({ resources: { a: 1 } }).remote(recomputable));
    expect(recomputed.sum).toBe(expectedChecksum(200_000, 7));
    // No node left has b: recomputing fails at once, naming what is missing.
    const lost = await rejection(get(bound));
    expect(lost.name).toBe('InfeasibleTaskError');
    expect(lost.message).toContain('b: 1');
    // What a task put there is made again by rerunning the task under the same ids, where it can run.
    expect(((await get(putAnywhere)) as Float64Array)[199_999]).toBe(1);
    const gone = await rejection(get(putThere));
    expect(gone).toBeInstanceOf(ObjectLostError);
    expect(gone.message).toContain('lost with node agent-b');
    expect(gone.message).toContain('putArray, run again to make it, failed');
    // The group waits for its lost bundle (STRICT_SPREAD: not on agent-a, which has the other),
    // gets it on a node that joins, and its actor restarts there.
    expect(state().placementGroups.find((entry) => entry.id === group.id)!.state).toBe('rescheduling');
    agents.set('agent-c', startAgent(port, 'agent-c', { slot: 1 }));
    expect((await get(inBundle.where.remote())).nodeId).toBe('agent-c');
    expect(state().placementGroups.find((entry) => entry.id === group.id)).toMatchObject({ state: 'created', bundles: expect.arrayContaining([expect.objectContaining({ nodeId: 'agent-a' }), expect.objectContaining({ nodeId: 'agent-c' })]) });
    removePlacementGroup(group);
  }, 60_000);

  it('stops --once agents when the driver shuts down', async () => {
    const agent = agents.get('agent-a')!;
    const exited = new Promise<number | null>((resolve) => agent.once('exit', (code) => resolve(code)));
    await shutdown();
    expect(await exited).toBe(0);
  }, 30_000);
});

describe('a node agent as a daemon', () => {
  it('waits for its driver, then serves one driver after another', async () => {
    // A free port, known before any driver listens on it.
    const probe = (await import('node:net')).createServer();
    const port = await new Promise<number>((resolve) => probe.listen(0, '127.0.0.1', () => resolve((probe.address() as { port: number }).port)));
    await new Promise((resolve) => probe.close(resolve));
    const lines: string[] = [];
    await using agent = new NodeAgent({ head: `127.0.0.1:${port}`, token: TOKEN, id: 'daemon', numCpus: 1, resources: { daemon: 1 }, objectStoreMemory: 16 * 1024 * 1024, retryMs: 50, log: (line) => lines.push(line) });
    await until(() => lines.some((line) => line.startsWith('waiting for the head')), 'the agent to wait');
    for (let driver = 0; driver < 2; driver++) {
      await init({ numCpus: 1, prestartWorkers: 1, listen: { host: '127.0.0.1', port, token: TOKEN } });
      try {
        await waitForNodes(2, { timeout: 30_000 });
        expect((await get(whereAmI.options({ resources: { daemon: 1 } }).remote())).nodeId).toBe('daemon');
      } finally {
        await shutdown();
      }
    }
    expect(lines.filter((line) => line.startsWith('joined'))).toHaveLength(2);
  }, 90_000);
});

describe('a node id already taken', () => {
  it('keeps its agent trying until the id is free, then it joins', async () => {
    await init({ numCpus: 0, prestartWorkers: 1, listen: { host: '127.0.0.1', port: 0, token: TOKEN } });
    const head = `127.0.0.1:${state().listening!.port}`;
    const firstLines: string[] = [];
    const secondLines: string[] = [];
    const first = new NodeAgent({ head, token: TOKEN, id: 'twin', numCpus: 1, objectStoreMemory: 16 * 1024 * 1024, retryMs: 50, log: (line) => firstLines.push(line) });
    let second: NodeAgent | undefined;
    try {
      await waitForNodes(2, { timeout: 30_000 });
      second = new NodeAgent({ head, token: TOKEN, id: 'twin', numCpus: 1, objectStoreMemory: 16 * 1024 * 1024, retryMs: 50, log: (line) => secondLines.push(line) });
      await until(() => secondLines.some((line) => line.includes('refused node twin for now (a node with id twin is already in the cluster)')), 'the second agent to be refused for now');
      await first.close();
      await until(() => secondLines.some((line) => line.startsWith('joined')), 'the second agent to join');
      expect(state().nodes.map((node) => node.nodeId)).toEqual(['node-0', 'twin']);
    } finally {
      await shutdown();
      await first.close();
      await second?.close();
    }
  }, 60_000);
});

describe('the trellis command', () => {
  const run = (args: string[]) => spawnSync(process.execPath, [...trellisCli, ...args], { encoding: 'utf8', env: { ...process.env, TRELLIS_CLUSTER_TOKEN: '' } });

  it('names what is wrong with its arguments', () => {
    const noHead = run(['node']);
    expect(noHead.status).toBe(2);
    expect(noHead.stderr).toContain('usage: trellis node --head HOST:PORT');
    const badResources = run(['node', '--head', '127.0.0.1:1', '--token', 't', '--resources', '{"gpu-ish": "lots"}']);
    expect(badResources.status).toBe(1);
    expect(badResources.stderr).toContain('--resources takes a JSON object of numbers');
    const badAddress = run(['node', '--head', 'nowhere', '--token', 't']);
    expect(badAddress.status).toBe(1);
    expect(badAddress.stderr).toContain("a head address is host:port, got 'nowhere'");
    const noToken = run(['node', '--head', '127.0.0.1:1']);
    expect(noToken.status).toBe(1);
    expect(noToken.stderr).toContain('needs the cluster token');
  }, 60_000);
});

describe('the several-hosts example', () => {
  it('spreads a dataset over two agents as the README says', () => {
    const run = spawnSync(process.execPath, ['--import', 'tsx', 'examples/several-hosts.ts'], { encoding: 'utf8', timeout: 120_000 });
    expect(run.status, run.stderr).toBe(0);
    expect(run.stdout).toContain('nodes: node-0 (driver), host-');
    const embedded = /embedded (\d+) texts: (\{.*\})/.exec(run.stdout);
    expect(embedded, run.stdout).not.toBeNull();
    expect(Number(embedded![1])).toBe(20_000);
    expect(embedded![2]).toMatch(/host-[ab]/);
  }, 120_000);
});

describe('silence', () => {
  it('drops an agent that stops answering, and the agent leaves a head that stops answering', async () => {
    await init({ numCpus: 1, prestartWorkers: 1, listen: { host: '127.0.0.1', port: 0, token: TOKEN, nodeTimeoutMs: 2000 } });
    let agent: ChildProcess | undefined;
    try {
      const warnings: string[] = [];
      events().on('warning', (warning: { kind: string }) => warnings.push(warning.kind));
      agent = startAgent(state().listening!.port, 'frozen', { frozen: 1 });
      await waitForNodes(2, { timeout: 60_000 });
      const exited = new Promise<number | null>((resolve) => agent!.once('exit', (code) => resolve(code)));
      process.kill(agent.pid!, 'SIGSTOP');
      await until(() => state().nodes.length === 1, 'the frozen node to be dropped');
      expect(warnings).toContain('node-timeout');
      // Thawed, it finds its session over (the head closed it) and, with --once, exits.
      process.kill(agent.pid!, 'SIGCONT');
      expect(await exited).toBe(0);
    } finally {
      await shutdown();
      if (agent && agent.exitCode === null) agent.kill('SIGKILL');
    }

    // A head that welcomes the agent and then says nothing more.
    const { createServer } = await import('node:net');
    const { FrameConnection } = await import('../../lib/core/connection.js');
    const silent = createServer((socket) => {
      const connection: any = new FrameConnection(socket, (message: { t: string; nodeId?: string }) => {
        if (message.t === 'agent-hello') connection.send({ t: 'welcome', nodeId: message.nodeId });
      }, () => {});
    });
    const port = await new Promise<number>((resolve) => silent.listen(0, '127.0.0.1', () => resolve((silent.address() as { port: number }).port)));
    try {
      const lines: string[] = [];
      const daemon = new NodeAgent({ head: `127.0.0.1:${port}`, token: TOKEN, id: 'patient', numCpus: 1, objectStoreMemory: 16 * 1024 * 1024, once: true, headTimeoutMs: 1500, log: (line) => lines.push(line) });
      await daemon.done;
      expect(lines.some((line) => /the head was not heard from for \d+ ms/.test(line))).toBe(true);
    } finally {
      silent.close();
    }
  }, 60_000);
});
