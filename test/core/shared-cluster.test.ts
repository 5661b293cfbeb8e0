/**
 * A shared cluster end to end: a broker, two hosts (`trellis node --broker`, separate processes)
 * and several drivers (this process and child processes) at once. Lent slices join each driver as
 * nodes with their own workers, stores and GPUs; drivers share hosts side by side; a gang waits
 * for what another driver holds; a driver killed outright frees its slices; a host's loss is made
 * good on another host; bad requests fail with a ClusterError or InvalidArgumentError that says why.
 */
import { execFile, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { promisify } from 'node:util';
import { createInterface } from 'node:readline';
import { join } from 'node:path';
import { existsSync, mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { Broker, ClusterError, InvalidArgumentError, brokerStatus, events, fromItems, get, init, listJobs, requestResources, shutdown, state, wait, type BrokerStatus, type ClusterOptions } from '../../lib/index.js';
import { GatedTagger, NodeTagger, checksum, makeArray, pausedTag, visibleGpus, waitThenWhere, whereAmI } from './fixtures/nodes.js';
import { isAlive, openGate, rejection, scratch, trellisCli, scriptArgs, until } from './helpers.js';

const TOKEN = 'shared-cluster-token';
const driverScript = join(import.meta.dirname, 'fixtures/broker-driver.ts');
const repository = join(import.meta.dirname, '../..');
const run = (args: string[], env: NodeJS.ProcessEnv = process.env) => promisify(execFile)(process.execPath, args, { encoding: 'utf8', env });

interface ChildDriver {
  process: ChildProcess;
  lines: Record<string, any>[];
  send(line: string): void;
  next(event: string, after?: number): Promise<Record<string, any>>;
}


/**
 * `until` with a guard below the test's timeout, whose failure says where the cluster stood (the
 * broker's view, actors, tasks): a pool that never grew fails with what it was waiting for.
 */
async function untilExplained(condition: () => boolean, what: string, extra: () => Record<string, unknown>): Promise<void> {
  try {
    await until(condition, what, 45_000);
  } catch (error) {
    const now = state();
    const actors = now.actors.map((actor) => `${actor.className}:${actor.state}${actor.nodeId ? `@${actor.nodeId}` : ''}`);
    throw new Error(`${(error as Error).message}; ${JSON.stringify({ ...extra(), broker: now.broker, nodes: now.nodes.length, tasks: now.tasks, actors })}`);
  }
}

describe('shared cluster', () => {
  let broker: Broker;
  let address: string;
  const hosts = new Map<string, ChildProcess>();
  const children: ChildDriver[] = [];
  const jobFiles = scratch();
  /** Where hosts unpack drivers' working directories. */
  const hostCodeCache = jobFiles.path('host-code');

  const status = (): Promise<BrokerStatus> => brokerStatus(address, { token: TOKEN });
  const request = (options: Partial<ClusterOptions>): ClusterOptions => ({ address, token: TOKEN, ...options }) as ClusterOptions;

  function startHost(id: string, extra: string[]): ChildProcess {
    const child = spawn(process.execPath, [
      ...trellisCli, 'node', '--broker', address, '--id', id, '--num-cpus', '2',
      '--object-store-memory', String(128 * 1024 * 1024), ...extra,
    ], { env: { ...process.env, TRELLIS_CLUSTER_TOKEN: TOKEN, TRELLIS_CODE_CACHE: hostCodeCache }, stdio: ['ignore', 'inherit', 'pipe'] });
    child.stderr!.resume();
    hosts.set(id, child);
    return child;
  }

  function childDriver(options: Partial<ClusterOptions>): ChildDriver {
    const child = spawn(process.execPath, [...scriptArgs(driverScript), JSON.stringify(request(options))], {
      env: process.env,
      stdio: ['pipe', 'pipe', 'inherit'],
    });
    const driver: ChildDriver = {
      process: child,
      lines: [],
      send: (line) => child.stdin!.write(`${line}\n`),
      next: async (event, after = 0) => {
        await until(() => driver.lines.slice(after).some((line) => line.event === event || line.event === 'failed'), `a child driver's ${event}`, 60_000);
        return driver.lines.slice(after).find((line) => line.event === event || line.event === 'failed')!;
      },
    };
    createInterface({ input: child.stdout! }).on('line', (line) => driver.lines.push(JSON.parse(line)));
    children.push(driver);
    return driver;
  }

  /** Every host's resources free, no session running, no driver known. */
  async function allFree(): Promise<void> {
    let last: BrokerStatus | undefined;
    const free = async () => {
      last = await status();
      return last.drivers.length === 0 && last.hosts.every((host) => host.sessions === 0 && JSON.stringify(host.free) === JSON.stringify(host.total));
    };
    const deadline = Date.now() + 30_000;
    while (!(await free())) {
      if (Date.now() > deadline) throw new Error(`the cluster is not free: ${JSON.stringify(last)}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }

  beforeAll(async () => {
    broker = await Broker.start({ host: '127.0.0.1', port: 0, token: TOKEN, jobsDirectory: jobFiles.path('jobs') });
    address = `127.0.0.1:${broker.port}`;
    startHost('host-a', ['--gpus', '2,3']);
    startHost('host-b', ['--resources', '{"b": 1}', '--join-timeout', '2000']);
    const deadline = Date.now() + 60_000;
    while ((await status()).hosts.length < 2) {
      if (Date.now() > deadline) throw new Error('the hosts did not register');
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }, 90_000);

  afterEach(async () => {
    await shutdown();
    for (const child of children.splice(0)) if (child.process.exitCode === null) child.process.kill('SIGKILL');
    await allFree();
  }, 60_000);

  afterAll(async () => {
    for (const host of hosts.values()) if (host.exitCode === null) host.kill('SIGTERM');
    await Promise.all([...hosts.values()].map((host) => host.exitCode === null && new Promise((resolve) => host.once('exit', resolve))));
    await broker?.close();
    jobFiles.cleanup();
  }, 30_000);

  it('lends bundles as nodes with their own workers, stores and GPUs, and takes them back at shutdown', async () => {
    await init({ cluster: request({ bundles: [{ CPU: 1 }, { CPU: 1, GPU: 1 }] }) });
    const lent = state().nodes.filter((node) => node.nodeId !== 'node-0');
    expect(lent.map((node) => node.nodeId.split('/')[0]).sort()).toEqual(['host-a', 'host-b']);
    expect(state().nodes.find((node) => node.nodeId === 'node-0')!.resources.total.CPU ?? 0).toBe(0);
    // The GPU bundle took host-a's first device; workers there see it alone, and others none.
    const [gpuTask, cpuTask] = await get([visibleGpus.options({ numGpus: 1 }).remote(), visibleGpus.options({ resources: { CPU: 1 }, schedulingStrategy: { type: 'node', nodeId: lent.find((node) => node.nodeId.startsWith('host-b'))!.nodeId } }).remote()]);
    expect(gpuTask).toEqual({ nodeId: expect.stringMatching(/^host-a\//), devices: '2' });
    expect(cpuTask.devices).toBe('');
    const stores = await get(lent.map((node) => whereAmI.options({ schedulingStrategy: { type: 'node', nodeId: node.nodeId } }).remote()));
    expect(new Set(stores.map((where) => where.store)).size).toBe(2);
    const now = await status();
    expect(now.drivers).toEqual([expect.objectContaining({ bundles: 2, granted: 2, nodes: expect.arrayContaining(lent.map((node) => node.nodeId)) })]);
    expect(now.hosts.find((host) => host.hostId === 'host-a')!.free).toEqual({ CPU: 1, GPU: 1 });
    // The command line shows the same, as text and as JSON (run asynchronously: the broker is in this process).
    const text = await run([...trellisCli, 'status', '--broker', address, '--token', TOKEN]);
    expect(text.stdout).toMatch(/^2 host\(s\)\n {2}host-a \(.+\): CPU 1, GPU 1 free of CPU 2, GPU 2; 1 session\(s\)/);
    expect(text.stdout).toMatch(/1 job\(s\)\n {2}job-[\w-]+ .+ at 127\.0\.0\.1:\d+: 2 of 2 bundle\(s\) lent \(all\); nodes host-/);
    const json = await run([...trellisCli, 'status', '--broker', address, '--json'], { ...process.env, TRELLIS_CLUSTER_TOKEN: TOKEN });
    expect(JSON.parse(json.stdout).drivers[0]).toMatchObject({ bundles: 2, granted: 2 });
    await shutdown();
    await allFree();
    expect(stores.every((where) => !isAlive(where.pid))).toBe(true);
  });

  it('runs drivers side by side on the same hosts, and a gang waits for what another holds', async () => {
    await init({ cluster: request({ bundles: [{ CPU: 2 }, { CPU: 1 }] }) });
    const gang = childDriver({ resources: { CPU: 2 }, name: 'gang' });
    let waiting: BrokerStatus;
    do waiting = await status();
    while (!waiting.drivers.some((driver) => driver.name === 'gang'));
    // One CPU is free and the gang asks for two: it is lent nothing yet.
    expect(waiting.drivers.find((driver) => driver.name === 'gang')).toMatchObject({ granted: 0, wait: 'all' });
    // A driver that takes what fits gets the free CPU, on a host this driver uses too.
    const small = childDriver({ resources: { CPU: 1 }, wait: 'any', name: 'small' });
    const ready = await small.next('ready');
    expect(ready.nodes).toHaveLength(1);
    const mine = state().nodes.map((node) => node.nodeId.split('/')[0]);
    expect(mine).toContain(ready.nodes[0].split('/')[0]);
    small.send('where');
    expect((await small.next('where')).nodes).toEqual(ready.nodes);
    expect(gang.lines).toEqual([]);
    await shutdown();
    const lent = await gang.next('ready');
    expect(lent.nodes.length).toBeGreaterThan(0);
    gang.send('where');
    expect((await gang.next('where')).nodes).toEqual(lent.nodes);
    gang.send('exit');
    small.send('exit');
    await gang.next('exited');
    await small.next('exited');
  });

  it("takes what fits with wait 'any' and grows as other jobs end", async () => {
    await init({ cluster: request({ resources: { CPU: 3 } }) });
    const grower = childDriver({ resources: { CPU: 3 }, wait: 'any', name: 'grower' });
    const ready = await grower.next('ready');
    expect(ready.nodes).toHaveLength(1);
    const seen = grower.lines.length;
    await shutdown();
    await until(() => grower.lines.slice(seen).filter((line) => line.event === 'node-added').length >= 1 &&
      grower.lines.at(-1)!.nodes?.length >= 2, 'the rest to join', 30_000);
    // The two bundles freed may be lent one after the other: the first one's node can join before
    // the broker lends the second, so ask until both are lent.
    const deadline = Date.now() + 30_000;
    let grown = (await status()).drivers.find((driver) => driver.name === 'grower');
    while (grown?.granted !== 3 && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 50));
      grown = (await status()).drivers.find((driver) => driver.name === 'grower');
    }
    expect(grown).toMatchObject({ bundles: 3, granted: 3 });
    grower.send('exit');
    await grower.next('exited');
  });

  it("grows a dataset's actor pool onto slices lent while the job runs", async () => {
    const files = scratch();
    try {
      const holder = childDriver({ resources: { CPU: 3 }, name: 'holder' });
      await holder.next('ready');
      await init({ cluster: request({ resources: { CPU: 3 }, wait: 'any' }) });
      expect(state().nodes.filter((node) => node.nodeId !== 'node-0')).toHaveLength(1);
      const gate = files.path('gate');
      const items = Array.from({ length: 600 }, (_, i) => i);
      const busy = files.path('busy');
      mkdirSync(busy);
      const job = fromItems(items, { parallelism: 30 }).mapBatches(GatedTagger, { concurrency: [1, 3], batchSize: 20, constructorArgs: [gate, busy] }).takeAll();
      job.catch(() => undefined);
      const taggers = () => state().actors.filter((actor) => actor.className === 'DataPoolActor' && actor.state === 'alive').length;
      await until(() => taggers() === 1, 'the first actor');
      // The other job ends: its CPUs are lent to this one, and the pool grows onto them.
      holder.send('exit');
      // Each actor holding a batch, not only placed (one still importing its class takes none yet).
      await untilExplained(() => readdirSync(busy).length === 3, 'the pool to grow to three busy actors', () => ({ busy: readdirSync(busy).length }));
      openGate(gate);
      const rows = await job;
      expect(rows.map((row) => row.item).sort((a, b) => (a as number) - (b as number))).toEqual(items);
      expect(new Set(rows.map((row) => row.pid)).size).toBe(3);
      expect(new Set(rows.map((row) => (row.node as string).split('/')[0]))).toEqual(new Set(['host-a', 'host-b']));
    } finally {
      files.cleanup();
    }
  });

  it("asks the broker for room to grow a dataset's actor pool, and gives it back when the pool is done", async () => {
    const files = scratch();
    try {
      await init({ cluster: request({ bundles: [{ CPU: 1 }], name: 'elastic' }) });
      const gate = files.path('gate');
      const items = Array.from({ length: 300 }, (_, i) => i);
      const busy = files.path('busy');
      mkdirSync(busy);
      const job = fromItems(items, { parallelism: 15 }).mapBatches(GatedTagger, { concurrency: [1, 3], batchSize: 20, constructorArgs: [gate, busy] }).takeAll();
      job.catch(() => undefined);
      // One CPU was asked at init; the pool's queued work asks for two more, one per actor it may
      // add. Each actor holds a batch (placed is not enough: one still importing takes none yet).
      await untilExplained(() => readdirSync(busy).length === 3, 'the pool to grow onto the room it asked for', () => ({ busy: readdirSync(busy).length }));
      expect(state().broker).toMatchObject({ bundles: 3, lent: 3 });
      expect((await status()).drivers[0]).toMatchObject({ bundles: 3, granted: 3, borrowed: 2 });
      const text = await run([...trellisCli, 'status', '--broker', address, '--token', TOKEN]);
      expect(text.stdout).toMatch(/3 of 3 bundle\(s\) lent \(all\); nodes .+; 2 borrowed by its pools/);
      openGate(gate);
      const rows = await job;
      expect(rows.map((row) => row.item).sort((a, b) => (a as number) - (b as number))).toEqual(items);
      expect(new Set(rows.map((row) => row.pid)).size).toBe(3);
      // The pool is done: the nodes lent for it go back, and the job holds what init asked.
      await until(() => state().broker!.bundles === 1 && state().nodes.length === 2, 'the room to go back');
      let now: BrokerStatus;
      do now = await status();
      while (now.hosts.reduce((sum, host) => sum + host.sessions, 0) > 1);
      expect(now.drivers[0]).toMatchObject({ bundles: 1, granted: 1, released: 0 });
    } finally {
      files.cleanup();
    }
  });

  it("asks the broker for room for a dataset's tasks that wait for CPUs, and gives it back after", async () => {
    await init({ cluster: request({ bundles: [{ CPU: 1 }], name: 'tasks' }) });
    const items = Array.from({ length: 60 }, (_, i) => i);
    const job = fromItems(items, { parallelism: 30 }).mapBatches(pausedTag, { batchSize: null, fnArgs: [300] }).takeAll();
    // One CPU lent: 30 blocks of 300 ms would take 9 s; their waiting tasks ask for more.
    await until(() => state().broker!.lent > 1, 'the waiting tasks to be lent room', 30_000);
    const rows = await job;
    expect(rows.map((row) => row.item).sort((a, b) => (a as number) - (b as number))).toEqual(items);
    expect(new Set(rows.map((row) => row.node)).size).toBeGreaterThan(1);
    // Done: what was lent for the tasks goes back; the job holds what init asked.
    await until(() => state().broker!.bundles === 1 && state().nodes.length === 2, 'the room to go back', 30_000);
  });

  it("asks for the room an actor pool's minimum lacks, and fails the job where no host could hold its actors", async () => {
    await init({ cluster: request({ bundles: [{ CPU: 1 }], name: 'minimum' }) });
    const files = scratch();
    const gate = files.path('gate');
    const items = Array.from({ length: 40 }, (_, i) => i);
    // Two actors of one CPU each, with one CPU lent: the pool asks for the other and starts on it.
    const job = fromItems(items, { parallelism: 4 }).mapBatches(GatedTagger, { concurrency: 2, batchSize: 10, constructorArgs: [gate] }).takeAll();
    job.catch(() => undefined);
    await until(() => state().actors.filter((actor) => actor.className === 'DataPoolActor' && actor.state === 'alive').length === 2, 'both actors');
    // Both alive on one CPU asked for: the pool was lent the second. The read tasks, waiting for a
    // CPU while the actors hold both, may have been lent a slice of their own besides.
    expect(state().broker!.lent).toBeGreaterThanOrEqual(2);
    openGate(gate);
    const rows = await job;
    files.cleanup();
    expect(rows.map((row) => row.item).sort((a, b) => (a as number) - (b as number))).toEqual(items);
    // An actor no host could hold: the broker refuses the ask, and the job fails saying why.
    const error = await rejection(fromItems(items.map((id) => ({ id })), { parallelism: 4 }).mapBatches(NodeTagger, { concurrency: 1, batchSize: 10, resources: { tpu: 1 } }).takeAll());
    expect(error.code).toBe('ERR_DATA_ACTOR_START');
    expect(error.message).toMatch(/cannot hold another NodeTagger actor: bundle \d+ \{ tpu: 1, CPU: 1 \} fits no host of the cluster \(host-/);
    // A job that does not autoscale keeps to what it asked: the same minimum cannot start.
    await shutdown();
    await allFree();
    await init({ cluster: request({ bundles: [{ CPU: 1 }], name: 'fixed', autoscale: false }) });
    const fixed = await rejection(fromItems(items, { parallelism: 4 }).mapBatches(GatedTagger, { concurrency: 2, batchSize: 10, constructorArgs: [gate] }).takeAll());
    expect(fixed.message).toMatch(/2 GatedTagger actor\(s\) of CPU 1 each cannot start: the cluster holds 1 at most/);
    expect(state().broker).toMatchObject({ bundles: 1 });
  });

  it('gives idle nodes back to the broker and asks for them again when work waits', async () => {
    await init({ cluster: request({ bundles: [{ CPU: 1 }], idleReleaseMs: 200 }) });
    const first = state().nodes.find((node) => node.nodeId !== 'node-0')!.nodeId;
    const released = new Promise<{ nodeId: string }>((resolve) => events().once('cluster-node-released', resolve));
    // Nothing runs: the node goes back, and the broker has it free again.
    expect((await released).nodeId).toBe(first);
    await until(() => state().nodes.length === 1, 'the node to leave');
    expect(state().broker).toMatchObject({ lent: 0, released: 1 });
    let now: BrokerStatus;
    do now = await status();
    while (now.hosts.some((host) => host.sessions > 0));
    expect(now.drivers[0]).toMatchObject({ granted: 0, released: 1 });
    // A task waits (it fits the bundle given back, so it is not infeasible): the bundle is asked for again.
    const where = await get(whereAmI.remote());
    expect(where.nodeId).not.toBe(first);
    expect(state().broker).toMatchObject({ released: 0 });
    // An object only that node holds keeps the node: it is not given back while the object lives.
    const kept = makeArray.remote(100_000, 1);
    await wait([kept], { numReturns: 1 });
    const before = state().broker!.released;
    await new Promise((resolve) => setTimeout(resolve, 600));
    expect(state().broker!.released).toBe(before);
    expect(state().nodes.some((node) => node.nodeId === where.nodeId)).toBe(true);
    // Once read here it has a copy in the driver's store: the node may go, losing nothing.
    const values = await get(kept);
    await until(() => !state().nodes.some((node) => node.nodeId === where.nodeId), 'the node to go back');
    expect((await get(kept))[3]).toBe(values[3]);
  });

  it('grows a job beyond what init asked with requestResources', async () => {
    expect(() => requestResources([{ CPU: 1 }])).toThrow(/after init/);
    await init({ cluster: request({ bundles: [{ CPU: 1 }] }) });
    expect(state().nodes).toHaveLength(2);
    const added = new Promise<{ nodeId: string }>((resolve) => events().once('node-added', resolve));
    requestResources([{ CPU: 1, GPU: 1 }]);
    const node = await added;
    expect(node.nodeId).toMatch(/^host-a\//);
    expect(state().broker).toMatchObject({ bundles: 2, lent: 2, joined: 2 });
    expect((await get(visibleGpus.options({ numGpus: 1 }).remote())).nodeId).toBe(node.nodeId);
    expect(() => requestResources([{ GPU: 0.5 }])).toThrow(/whole devices/);
    await shutdown();
    await init({ numCpus: 1 });
    expect(() => requestResources([{ CPU: 1 }])).toThrow(/init\(\{ cluster \}\)/);
  });

  it('takes a node back for a job of higher priority: work there finishes, objects move to the driver, and the node comes back later', async () => {
    await init({ cluster: request({ bundles: [{ CPU: 2 }, { CPU: 2 }], name: 'background' }) });
    const onB = state().nodes.find((node) => node.nodeId.startsWith('host-b/'))!.nodeId;
    const pinned = { schedulingStrategy: { type: 'node' as const, nodeId: onB } };
    // An object made on host-b and never read here yet, and a task there still running.
    const kept = makeArray.options(pinned).remote(100_000, 7);
    await wait([kept], { numReturns: 1 });
    const files = scratch();
    const gate = files.path('gate');
    const running = waitThenWhere.options(pinned).remote(gate);
    await until(() => state().broker !== undefined, 'the broker info');
    const seen: { preempted: { nodeId: string; graceMs: number }[]; reconstructed: string[]; moved: { objectId: string; from: string; to: string }[] } = { preempted: [], reconstructed: [], moved: [] };
    events().on('cluster-node-preempted', (event) => seen.preempted.push(event));
    events().on('reconstruct', (event: { objectId: string }) => seen.reconstructed.push(event.objectId));
    events().on('object-transfer', (event) => seen.moved.push(event));
    // host-b alone has resource 'b': a job of priority 5 asking for it takes this job's slice there.
    const urgent = childDriver({ bundles: [{ CPU: 2, b: 1 }], priority: 5, name: 'urgent' });
    await until(() => seen.preempted.length === 1, 'the preemption');
    const preemptedAt = Date.now();
    expect(seen.preempted[0]).toMatchObject({ nodeId: onB, graceMs: 30_000 });
    // Nothing new goes there while the running task finishes: the next task runs on host-a.
    expect((await get(whereAmI.remote())).nodeId).toMatch(/^host-a\//);
    const during = await status();
    expect(during.drivers.find((driver) => driver.name === 'background')).toMatchObject({ granted: 1, preempting: 1 });
    expect(during.drivers.find((driver) => driver.name === 'urgent')).toMatchObject({ granted: 0, priority: 5 });
    openGate(gate);
    expect(await get(running)).toBe(onB);
    // Given back once idle, long before the grace runs out; the object moved here first.
    const ready = await urgent.next('ready');
    expect(ready.nodes).toEqual([expect.stringMatching(/^host-b\//)]);
    expect(Date.now() - preemptedAt).toBeLessThan(30_000);
    await until(() => !state().nodes.some((node) => node.nodeId === onB), 'the node to leave');
    expect(seen.moved).toContainEqual(expect.objectContaining({ objectId: kept.id, from: onB, to: 'node-0' }));
    expect((await get(kept))[5]).toBe(7 + 5 * 0.5);
    expect(seen.reconstructed).toEqual([]);
    expect(state().broker).toMatchObject({ bundles: 2, lent: 1, preempted: 1, priority: 0 });
    // Once the urgent job ends, the bundle is lent again (on host-b, the only host with room).
    const back = new Promise<{ nodeId: string }>((resolve) => events().once('node-added', resolve));
    urgent.send('exit');
    expect((await back).nodeId).toMatch(/^host-b\//);
    expect(state().broker).toMatchObject({ lent: 2, joined: 2 });
    files.cleanup();
  });

  it("moves an object off a node taken back to another of the job's nodes when the driver's store cannot hold it", async () => {
    // The driver's store holds 4 MiB: an 8 MB array made on host-b cannot go there.
    await init({ cluster: request({ bundles: [{ CPU: 2 }, { CPU: 2 }], name: 'small-driver' }), objectStoreMemory: 4 * 1024 * 1024 });
    const onA = state().nodes.find((node) => node.nodeId.startsWith('host-a/'))!.nodeId;
    const onB = state().nodes.find((node) => node.nodeId.startsWith('host-b/'))!.nodeId;
    const kept = makeArray.options({ schedulingStrategy: { type: 'node', nodeId: onB } }).remote(1_000_000, 3);
    await wait([kept], { numReturns: 1 });
    const moved: { objectId: string; from: string; to: string }[] = [];
    const reconstructed: string[] = [];
    events().on('object-transfer', (event) => moved.push(event));
    events().on('reconstruct', (event: { objectId: string }) => reconstructed.push(event.objectId));
    const urgent = childDriver({ bundles: [{ CPU: 2, b: 1 }], priority: 5, name: 'urgent-b' });
    await urgent.next('ready');
    await until(() => !state().nodes.some((node) => node.nodeId === onB), 'the node to leave');
    expect(moved).toContainEqual(expect.objectContaining({ objectId: kept.id, from: onB, to: onA }));
    // Read where it now is: every value, nothing made again.
    const read = await get(checksum.remote(kept));
    expect(read).toMatchObject({ length: 1_000_000, nodeId: onA });
    expect(reconstructed).toEqual([]);
    urgent.send('exit');
  });

  it("moves a dataset's actor pool off a node taken back, losing no row", async () => {
    const files = scratch();
    try {
      await init({ cluster: request({ bundles: [{ CPU: 2 }, { CPU: 2 }], name: 'batch' }) });
      const gate = files.path('gate');
      const items = Array.from({ length: 400 }, (_, i) => i);
      const warnings: string[] = [];
      events().on('warning', (event: { message: string }) => warnings.push(event.message));
      const busy = files.path('busy');
      mkdirSync(busy);
      const job = fromItems(items, { parallelism: 20 }).mapBatches(GatedTagger, { concurrency: [4, 4], batchSize: 20, constructorArgs: [gate, busy] }).takeAll();
      job.catch(() => undefined);
      await until(() => readdirSync(busy).length === 4, 'four busy actors on the two hosts');
      const onB = state().nodes.find((node) => node.nodeId.startsWith('host-b/'))!.nodeId;
      const preempted = new Promise((resolve) => events().once('cluster-node-preempted', resolve));
      const urgent = childDriver({ bundles: [{ CPU: 2, b: 1 }], priority: 5, name: 'urgent' });
      await preempted;
      // The calls running on host-b finish there; its actors then retire, and the node goes.
      openGate(gate);
      expect((await urgent.next('ready')).nodes).toEqual([expect.stringMatching(/^host-b\//)]);
      const rows = await job;
      expect(rows.map((row) => row.item).sort((a, b) => (a as number) - (b as number))).toEqual(items);
      expect(warnings.some((message) => message.includes('retires from a node being taken back'))).toBe(true);
      expect(state().nodes.some((node) => node.nodeId === onB)).toBe(false);
      urgent.send('exit');
    } finally {
      files.cleanup();
    }
  });

  it('frees the slices of a driver killed outright', async () => {
    const doomed = childDriver({ resources: { CPU: 4 }, name: 'doomed' });
    await doomed.next('ready');
    doomed.send('where');
    await doomed.next('where');
    expect((await status()).hosts.every((host) => host.free.CPU === 0)).toBe(true);
    doomed.process.kill('SIGKILL');
    await allFree();
    // And the cluster lends them again at once.
    await init({ cluster: request({ resources: { CPU: 4 } }) });
    expect(state().nodes.filter((node) => node.nodeId !== 'node-0').length).toBe(2);
  });

  it('fails with a ClusterError or InvalidArgumentError that says what is wrong', async () => {
    const wrongToken = await rejection(init({ cluster: { address, token: 'nope', resources: { CPU: 1 } } }));
    expect(wrongToken).toBeInstanceOf(ClusterError);
    expect(wrongToken.code).toBe('ERR_WRONG_TOKEN');
    const tooLarge = await rejection(init({ cluster: request({ bundles: [{ CPU: 3 }] }) }));
    expect(tooLarge.code).toBe('ERR_CLUSTER_UNSATISFIABLE');
    expect(tooLarge.message).toMatch(/bundle 0 \{ CPU: 3 \} fits no host/);
    const busy = await rejection(init({ cluster: request({ bundles: [{ CPU: 2 }, { CPU: 2 }, { CPU: 2 }], timeoutMs: 300 }) }));
    expect(busy.code).toBe('ERR_CLUSTER_TIMEOUT');
    expect(busy.message).toMatch(/lent 0 of 3 bundle/);
    const unreachable = await rejection(init({ cluster: { address: '127.0.0.1:1', token: TOKEN, resources: { CPU: 1 } } }));
    expect(unreachable.code).toBe('ERR_BROKER_UNREACHABLE');
    // host-b gives up on a driver it cannot reach after its join timeout (2 s here).
    const cannotReach = await rejection(init({ cluster: request({ bundles: [{ b: 1 }], advertiseHost: 'no-such-host.invalid' }) }));
    expect(cannotReach.code).toBe('ERR_SESSION_FAILED');
    expect(cannotReach.message).toMatch(/host-b\/s[\w-]+ did not join: node host-b\/s[\w-]+ could not join the head at no-such-host.invalid/);
    await expect(init({ cluster: request({ bundles: [{ GPU: 0.5 }] }) })).rejects.toThrow(/whole devices/);
    await expect(init({ cluster: request({ resources: { CPU: 1.5 } }) })).rejects.toThrow(InvalidArgumentError);
    await expect(init({ cluster: request({ resources: { CPU: 1 } }), listen: { port: 0, token: 'x' } })).rejects.toThrow(/cluster .* or listen/);
    await expect(init({ cluster: request({}) })).rejects.toThrow(/either bundles .* or resources/);
  });

  it('loses nothing running or waiting when the broker restarts: drivers and hosts come back with what they hold', async () => {
    await init({ cluster: request({ bundles: [{ CPU: 1 }] }) });
    const mine = state().nodes.find((node) => node.nodeId !== 'node-0')!.nodeId;
    // A gang asking for every CPU waits for this driver's one.
    const gang = childDriver({ resources: { CPU: 4 }, name: 'waiting-gang' });
    let now: BrokerStatus;
    do now = await status();
    while (!now.drivers.some((driver) => driver.name === 'waiting-gang'));
    const port = broker.port;
    await broker.close();
    await until(() => state().broker!.connected === false, 'the driver to see the broker go');
    broker = await Broker.start({ host: '127.0.0.1', port, token: TOKEN });
    await until(() => state().broker!.connected, 'the driver to reconnect');
    do now = await status();
    while (now.hosts.length < 2 || now.hosts.reduce((sum, host) => sum + host.sessions, 0) < 1 || now.drivers.length < 2);
    expect(now.drivers.find((driver) => driver.name !== 'waiting-gang')).toMatchObject({ granted: 1, nodes: [mine] });
    expect((await get(whereAmI.remote())).nodeId).toBe(mine);
    // The slice stays this driver's: the gang, back in the new broker's queue, still waits.
    expect(now.drivers.find((driver) => driver.name === 'waiting-gang')).toMatchObject({ granted: 0 });
    expect(gang.lines).toEqual([]);
    await shutdown();
    expect((await gang.next('ready')).nodes).toHaveLength(2);
    gang.send('exit');
    await gang.next('exited');
  });

  it("lends a lost host's bundles again on another host", async () => {
    await init({ cluster: request({ bundles: [{ CPU: 1 }] }) });
    const first = state().nodes.find((node) => node.nodeId !== 'node-0')!.nodeId;
    const lostHost = first.split('/')[0];
    const removed = new Promise((resolve) => events().once('node-removed', resolve));
    const added = new Promise<{ nodeId: string }>((resolve) => events().once('node-added', resolve));
    hosts.get(lostHost)!.kill('SIGKILL');
    await removed;
    const replacement = await added;
    expect(replacement.nodeId.split('/')[0]).not.toBe(lostHost);
    const where = await get(whereAmI.remote());
    expect(where.nodeId).toBe(replacement.nodeId);
    await shutdown();
    hosts.delete(lostHost);
  });

  it('runs a submitted job from its working directory, sent to the broker and on to the host its task runs on (trellis job submit --working-dir --follow)', async () => {
    // A user's project, on no host of the cluster: the driver names no broker and no token.
    const project = jobFiles.path('project');
    mkdirSync(project, { recursive: true });
    const library = pathToFileURL(join(repository, 'lib/index.ts')).href;
    writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'project', type: 'module' }));
    writeFileSync(join(project, 'where.ts'), [
      `import { readFileSync } from 'node:fs';`,
      `import { remote } from '${library}';`,
      `export const where = remote(import.meta, function where() {`,
      `  return { node: process.env.TRELLIS_NODE_ID!.split('/')[0], cwd: process.cwd(), label: readFileSync('label.txt', 'utf8').trim(), module: import.meta.url };`,
      `});`,
    ].join('\n'));
    writeFileSync(join(project, 'driver.ts'), [
      `import { get, init, shutdown } from '${library}';`,
      `import { where } from './where.ts';`,
      `await init({ cluster: { resources: { CPU: 1 } } });`,
      `const place = await get(where.remote());`,
      `console.log(JSON.stringify({ job: process.env.TRELLIS_JOB_ID, driverCwd: process.cwd(), ...place }));`,
      `await shutdown();`,
    ].join('\n'));
    writeFileSync(join(project, 'label.txt'), 'from the project\n');
    writeFileSync(join(project, 'notes.log'), 'left out');
    const submitted = await run([...trellisCli, 'job', 'submit', '--broker', address, '--token', TOKEN, '--follow', '--working-dir', project, '--exclude', '*.log', '--', process.execPath, '--import', 'tsx', 'driver.ts']);
    const line = submitted.stdout.trim().split('\n').find((text) => text.startsWith('{'));
    const ran = JSON.parse(line!) as { job: string; driverCwd: string; node: string; cwd: string; label: string; module: string };
    // The broker ran the driver in its copy; the lent host ran the task in a copy of its own.
    expect(ran.driverCwd.startsWith(join(broker.jobs.directory, 'code'))).toBe(true);
    expect(existsSync(join(ran.driverCwd, 'notes.log'))).toBe(false);
    expect(ran.node).toMatch(/^host-[ab]$/);
    expect(ran.cwd.startsWith(hostCodeCache)).toBe(true);
    expect(ran).toMatchObject({ label: 'from the project', module: pathToFileURL(join(ran.cwd, 'where.ts')).href });
    const [job] = (await listJobs(address, { token: TOKEN })).slice(-1);
    expect(job).toMatchObject({ jobId: ran.job, state: 'succeeded', exitCode: 0, name: 'driver.ts', cwd: ran.driverCwd, workingDir: { files: 4 } });
    const listed = await run([...trellisCli, 'job', 'list', '--broker', address, '--token', TOKEN]);
    expect(listed.stdout).toContain(`${job.jobId}  succeeded (exit code 0)  driver.ts`);
  }, 60_000);

  it('runs four users\' jobs as the README says', () => {
    const demo = spawnSync(process.execPath, ['--import', 'tsx', 'examples/shared-cluster.ts'], { encoding: 'utf8', timeout: 120_000 });
    expect(demo.status, demo.stderr).toBe(0);
    const waiting = demo.stdout.split('\n').find((line) => line.includes('carol 0/3 lent'));
    expect(waiting, demo.stdout).toMatch(/host-a 0\/2 CPUs free, host-b 0\/2 CPUs free; jobs: alice 2\/2 lent, bob 2\/2 lent, carol 0\/3 lent$/);
    for (const name of ['alice', 'bob']) expect(demo.stdout).toMatch(new RegExp(`${name}: lent 2 CPUs after [\\d.]+ s; embedded 6000 texts on host-`));
    expect(demo.stdout).toMatch(/carol: lent 3 CPUs after [\d.]+ s; embedded 6000 texts on host-/);
    // The urgent job took a slice back from alice or bob, who finished all the same.
    expect(demo.stdout).toMatch(/dave: lent 2 CPUs after [\d.]+ s; embedded 6000 texts on host-.+ \(priority 5\)$/m);
    expect(demo.stdout).toMatch(/(alice|bob): lent 2 CPUs after [\d.]+ s; embedded 6000 texts on .+ \(taken back 1 time\(s\) for a job of higher priority\)$/m);
    expect(demo.stdout.trim().split('\n').at(-1)).toBe('hosts: host-a 2/2 CPUs free, host-b 2/2 CPUs free; jobs: none');
  }, 120_000);
});
