/**
 * Nodes suite: node agents (other processes, as on other hosts) joined over TCP. Objects move
 * between the driver's store and an agent's in chunks over the agent's connection, and from one
 * agent to another straight (the target pulls from the source); the floor is
 * one plain TCP stream of the same bytes to another process on this host, measured in the same
 * run. Tasks on the agent (their worker connected over TCP) against tasks on the driver's node.
 * A dataset job through an actor pool on three agents, clean and with one agent killed a quarter
 * of the way in (its blocks made again from lineage, its batches retried on the other actors).
 * A shared cluster: joining it against a local init, and joining it when the host is all held by
 * a job of lower priority (its slice taken back: told, given back once idle, ended, lent again).
 * A working directory (runtimeEnv) of 48 MiB, shipped to an agent that joins with an empty code
 * cache and with one that has it, against copying its files on this host (the least a host must
 * do to have them).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { cp, rm } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Broker, brokerStatus, events, free, get, init, put, range, shutdown, state, waitForNodes, type InitOptions } from '../lib/index.js';
import { packWorkingDirectory } from '../lib/core/code-package.js';
import { RowScorer, byteLength, makeBytes, noop } from './core-tasks.js';
import { elapsedSeconds, median, nowNs, round, type Results, type Suite } from './harness.js';

const OBJECT_BYTES = 256 * 2 ** 20;
const ROUNDS = 5;
const TOKEN = 'bench-nodes';
const cli = fileURLToPath(new URL('../lib/cli/trellis.ts', import.meta.url));
const self = fileURLToPath(import.meta.url);
const JOB_ROWS = 400_000;
const JOB_ROUNDS = 3;

function startAgent(id: string, resources: Record<string, number>, extra: string[] = []): ChildProcess {
  return spawn(process.execPath, [
    '--import', 'tsx', cli, 'node', '--head', `127.0.0.1:${state().listening!.port}`, '--id', id,
    '--num-cpus', '1', '--num-gpus', '0', '--resources', JSON.stringify(resources), '--once', ...extra,
  ], { env: { ...process.env, TRELLIS_CLUSTER_TOKEN: TOKEN }, stdio: ['ignore', 'ignore', 'inherit'] });
}

/** Seconds to stream JOB_ROWS rows through a pool of three actors; `atQuarter` runs a quarter in. */
async function datasetJob(atQuarter?: () => void): Promise<number> {
  const start = nowNs();
  let rows = 0;
  let called = false;
  const dataset = range(JOB_ROWS, { parallelism: 16 }).mapBatches(RowScorer, { concurrency: 3, numCpus: 0, resources: { pool: 1 }, batchSize: 5000 });
  for await (const batch of dataset.iterBatches({ batchSize: 5000, batchFormat: 'arrow' })) {
    rows += (batch as { numRows: number }).numRows;
    if (!called && rows >= JOB_ROWS / 4) {
      called = true;
      atQuarter?.();
    }
  }
  if (rows !== JOB_ROWS) throw new Error(`the dataset job gave ${rows} rows, not ${JOB_ROWS}`);
  return elapsedSeconds(start);
}

/** The median of ROUNDS runs of `body`, after one warm-up run; each run returns the seconds it timed. */
async function medianSeconds(body: () => Promise<number>): Promise<number> {
  await body();
  const times: number[] = [];
  for (let i = 0; i < ROUNDS; i++) times.push(await body());
  return median(times);
}

/** The median seconds of ROUNDS runs of `body`, after one warm-up run. */
function seconds(body: () => Promise<void>): Promise<number> {
  return medianSeconds(async () => {
    const start = nowNs();
    await body();
    return elapsedSeconds(start);
  });
}

/** A process that reads a TCP stream and answers one byte per `bytes` received. */
function startSink(bytes: number): Promise<{ child: ChildProcess; port: number }> {
  const program = `
    const server = require('node:net').createServer((socket) => {
      let received = 0;
      socket.on('data', (data) => {
        received += data.length;
        if (received >= ${bytes}) { received -= ${bytes}; socket.write('k'); }
      });
    });
    server.listen(0, '127.0.0.1', () => process.send(server.address().port));`;
  const child = spawn(process.execPath, ['-e', program], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  return new Promise((resolve, reject) => {
    child.once('message', (port) => resolve({ child, port: port as number }));
    child.once('error', reject);
  });
}

/** GB/s of one TCP stream of OBJECT_BYTES, written in 4 MiB pieces, to another process here. */
async function loopbackGigabytes(): Promise<number> {
  const { child, port } = await startSink(OBJECT_BYTES);
  const socket = connect({ host: '127.0.0.1', port });
  await new Promise((resolve) => socket.once('connect', resolve));
  const piece = Buffer.alloc(4 * 2 ** 20, 7);
  try {
    const time = await seconds(async () => {
      const answered = new Promise((resolve) => socket.once('data', resolve));
      for (let sent = 0; sent < OBJECT_BYTES; sent += piece.length) {
        if (!socket.write(piece)) await new Promise((resolve) => socket.once('drain', resolve));
      }
      await answered;
    });
    return OBJECT_BYTES / time / 1e9;
  } finally {
    socket.destroy();
    child.kill();
  }
}

/**
 * Milliseconds from init() to a first task's result: joining a shared cluster (the broker lends a
 * slice of one CPU; the host opens a session, which dials back and starts a worker) against a
 * local init of one CPU (which starts its worker the same way, without the round trips).
 */
async function joinTimes(): Promise<Results> {
  const broker = await Broker.start({ host: '127.0.0.1', port: 0, token: TOKEN });
  const address = `127.0.0.1:${broker.port}`;
  const host = spawn(process.execPath, ['--import', 'tsx', cli, 'node', '--broker', address, '--id', 'bench-host', '--num-cpus', '2', '--num-gpus', '0'], {
    env: { ...process.env, TRELLIS_CLUSTER_TOKEN: TOKEN },
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  try {
    while ((await brokerStatus(address, { token: TOKEN })).hosts.length === 0) await new Promise((resolve) => setTimeout(resolve, 20));
    const free = async () => {
      for (;;) {
        const status = await brokerStatus(address, { token: TOKEN });
        if (status.drivers.length === 0 && status.hosts.every((one) => one.sessions === 0)) return;
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    };
    const toFirstTask = async (options: InitOptions) => {
      const start = nowNs();
      await init(options);
      await get(noop.remote());
      const time = elapsedSeconds(start);
      await shutdown();
      return time;
    };
    const timed = async (options: InitOptions) => {
      const time = await toFirstTask(options);
      await free();
      return time;
    };
    const joined = await medianSeconds(() => timed({ cluster: { address, token: TOKEN, bundles: [{ CPU: 1 }] } }));
    const local = await medianSeconds(() => timed({ numCpus: 1, prestartWorkers: 0 }));
    // The host's two CPUs held by an idle job of priority 0 (another driver process); this one
    // asks for one at priority 1: the other's slice is taken back first.
    const preempted = await medianSeconds(async () => {
      const holder = spawn(process.execPath, ['--import', 'tsx', self, 'hold', address], { env: { ...process.env, TRELLIS_CLUSTER_TOKEN: TOKEN }, stdio: ['ignore', 'pipe', 'inherit'] });
      try {
        await new Promise<void>((resolve, reject) => {
          holder.stdout!.once('data', () => resolve());
          holder.once('exit', (code) => reject(new Error(`the holding job exited with ${code}`)));
        });
        return await toFirstTask({ cluster: { address, token: TOKEN, bundles: [{ CPU: 1 }], priority: 1 } });
      } finally {
        holder.kill('SIGTERM');
        await new Promise((resolve) => holder.once('exit', resolve));
        await free();
      }
    });
    return {
      cluster_join_ms: { value: round(joined * 1000), unit: 'ms' },
      local_init_ms: { value: round(local * 1000), unit: 'ms' },
      preempted_join_ms: { value: round(preempted * 1000), unit: 'ms' },
    };
  } finally {
    host.kill('SIGTERM');
    await broker.close();
  }
}

/**
 * A project as a platform team's users ship it: 600 source-like files of 40 KiB (text that
 * compresses as code does) and a 24 MiB file of random bytes (weights, that do not compress).
 */
function makeProject(directory: string): number {
  let seed = 7;
  const random = () => (seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32;
  const words = ['const', 'return', 'await', 'function', 'batch', 'model', 'tokens', 'export', 'import', 'rows', '=>', '{', '}', ';'];
  let bytes = 0;
  for (let i = 0; i < 600; i++) {
    const folder = join(directory, 'src', `module${i % 20}`);
    mkdirSync(folder, { recursive: true });
    const parts: string[] = [];
    let length = 0;
    while (length < 40 * 1024) {
      const word = words[Math.floor(random() * words.length)] + (random() < 0.1 ? `${Math.floor(random() * 1e6)}\n` : ' ');
      parts.push(word);
      length += word.length;
    }
    const text = parts.join('');
    writeFileSync(join(folder, `file${i}.ts`), text);
    bytes += text.length;
  }
  const weights = Buffer.alloc(24 * 2 ** 20);
  for (let i = 0; i < weights.length; i += 4) weights.writeUInt32LE(Math.floor(random() * 2 ** 32), i);
  writeFileSync(join(directory, 'weights.bin'), weights);
  writeFileSync(join(directory, 'package.json'), JSON.stringify({ name: 'project', type: 'module' }));
  return bytes + weights.length;
}

/**
 * Milliseconds to have a working directory on a host: installed by an agent with an empty code
 * cache (packed once by the driver; sent, unpacked, packages linked) and by one whose cache has
 * it (asked, nothing sent), against copying the files on this host, and the driver's packing.
 */
async function workingDirectoryTimes(): Promise<Results> {
  const scratch = mkdtempSync(join(tmpdir(), 'trellis-bench-working-dir-'));
  try {
    const project = join(scratch, 'project');
    const bytes = makeProject(project);
    let copies = 0;
    const copy = await medianSeconds(async () => {
      const target = join(scratch, `copy-${copies++}`);
      const start = nowNs();
      await cp(project, target, { recursive: true });
      const time = elapsedSeconds(start);
      await rm(target, { recursive: true, force: true });
      return time;
    });
    const pack = await seconds(async () => {
      await packWorkingDirectory({ workingDir: project });
    });
    const installs = { cold: [] as number[], warm: [] as number[] };
    await init({ numCpus: 1, prestartWorkers: 0, listen: { host: '127.0.0.1', port: 0, token: TOKEN }, runtimeEnv: { workingDir: project } });
    try {
      for (let round = 0; round < ROUNDS; round++) {
        const cache = join(scratch, `cache-${round}`);
        for (const phase of ['cold', 'warm'] as const) {
          const id = `working-dir-${round}-${phase}`;
          const installed = new Promise<number>((resolve) => {
            const listener = (event: { nodeId: string; ms: number }) => {
              if (event.nodeId !== id) return;
              events().off('working-dir-installed', listener);
              resolve(event.ms);
            };
            events().on('working-dir-installed', listener);
          });
          const agent = startAgent(id, {}, ['--code-cache', cache]);
          installs[phase].push(await installed);
          agent.kill('SIGKILL');
          while (state().nodes.some((node) => node.nodeId === id)) await new Promise((resolve) => setTimeout(resolve, 20));
        }
      }
    } finally {
      await shutdown();
    }
    return {
      working_dir_megabytes: { value: round(bytes / 2 ** 20), unit: 'MiB' },
      working_dir_copy_ms: { value: round(copy * 1000), unit: 'ms' },
      working_dir_pack_ms: { value: round(pack * 1000), unit: 'ms' },
      working_dir_install_ms: { value: round(median(installs.cold)), unit: 'ms' },
      working_dir_cached_install_ms: { value: round(median(installs.warm)), unit: 'ms' },
    };
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
}

export const nodesSuite: Suite = {
  name: 'nodes',
  ratios: [
    ['object to agent / TCP stream', 'node_transfer_to_agent_gigabytes', 'loopback_tcp_gigabytes', '>= 0.5'],
    ['object to driver / TCP stream', 'node_transfer_to_driver_gigabytes', 'loopback_tcp_gigabytes', '>= 0.5'],
    ['object agent to agent / TCP stream', 'node_transfer_agent_to_agent_gigabytes', 'loopback_tcp_gigabytes', '>= 0.5'],
    ['agent tasks sync / local tasks sync', 'agent_tasks_sync', 'local_tasks_sync', ''],
    ['dataset job, an agent killed / clean', 'dataset_job_node_lost_seconds', 'dataset_job_seconds', '(report)'],
    ['joining a shared cluster / a local init, to a first task', 'cluster_join_ms', 'local_init_ms', '(report)'],
    ['joining by preempting a lower job / joining a free host', 'preempted_join_ms', 'cluster_join_ms', '(report)'],
    ['working dir to a fresh host / copying its files here', 'working_dir_install_ms', 'working_dir_copy_ms', '(report)'],
    ['working dir to a host that has it / copying its files here', 'working_dir_cached_install_ms', 'working_dir_copy_ms', '< 0.1'],
  ],
  async run(): Promise<Results> {
    const results: Results = {};
    const gigabytes = (name: string, time: number) => (results[name] = { value: round(OBJECT_BYTES / time / 1e9), unit: 'GB/s' });
    const agents: ChildProcess[] = [];
    await init({ numCpus: 1, prestartWorkers: 1, listen: { host: '127.0.0.1', port: 0, token: TOKEN } });
    try {
      for (const id of ['agent', 'agent2']) agents.push(startAgent(id, { [id]: 1, pool: 1 }));
      await waitForNodes(3, { timeout: 60_000 });
      const onAgent = { resources: { agent: 1 } };
      const bytes = new Uint8Array(OBJECT_BYTES).fill(3);
      gigabytes('node_transfer_to_agent_gigabytes', await medianSeconds(async () => {
        // A fresh object each time (one already copied would not move again); its put untimed.
        const ref = put(bytes);
        const start = nowNs();
        await get(byteLength.options(onAgent).remote(ref));
        const time = elapsedSeconds(start);
        free(ref);
        return time;
      }));
      gigabytes('node_transfer_to_driver_gigabytes', await medianSeconds(async () => {
        const made = makeBytes.options(onAgent).remote(OBJECT_BYTES);
        await get(byteLength.options(onAgent).remote(made)); // made and read there: not moved yet
        const start = nowNs();
        await get(made);
        const time = elapsedSeconds(start);
        free(made);
        return time;
      }));
      gigabytes('node_transfer_agent_to_agent_gigabytes', await medianSeconds(async () => {
        const made = makeBytes.options(onAgent).remote(OBJECT_BYTES);
        await get(byteLength.options(onAgent).remote(made));
        const start = nowNs();
        await get(byteLength.options({ resources: { agent2: 1 } }).remote(made)); // pulled by agent2 from agent
        const time = elapsedSeconds(start);
        free(made);
        return time;
      }));
      const rate = async (name: string, options: object) => {
        const count = 1000;
        const time = await seconds(async () => {
          for (let i = 0; i < count; i++) await get(noop.options(options).remote());
        });
        results[name] = { value: Math.round(count / time), unit: 'per_s' };
      };
      await rate('agent_tasks_sync', onAgent);
      await rate('local_tasks_sync', { schedulingStrategy: { type: 'node', nodeId: 'node-0' } });
      // Each round a third agent joins; the clean job runs on all three, then the same job again
      // while the third is killed a quarter of the way in.
      const clean: number[] = [];
      const lost: number[] = [];
      let recomputed = 0;
      const onReconstruct = () => recomputed++;
      events().on('reconstruct', onReconstruct);
      for (let round = 0; round < JOB_ROUNDS; round++) {
        const spare = startAgent(`spare${round}`, { pool: 1 });
        agents.push(spare);
        await waitForNodes(4, { timeout: 60_000 });
        clean.push(await datasetJob());
        lost.push(await datasetJob(() => spare.kill('SIGKILL')));
        while (state().nodes.length > 3) await new Promise((resolve) => setTimeout(resolve, 20));
      }
      events().off('reconstruct', onReconstruct);
      results.dataset_job_seconds = { value: round(median(clean)), unit: 's' };
      results.dataset_job_node_lost_seconds = { value: round(median(lost)), unit: 's' };
      results.dataset_job_node_lost_recomputed = { value: Math.round(recomputed / JOB_ROUNDS), unit: 'objects' };
    } finally {
      await shutdown();
      for (const agent of agents) agent.kill('SIGKILL');
    }
    Object.assign(results, await joinTimes());
    Object.assign(results, await workingDirectoryTimes());
    results.loopback_tcp_gigabytes = { value: round(await loopbackGigabytes()), unit: 'GB/s' };
    return results;
  },
};

// A job that holds the bench host's two CPUs until told to stop (preempted_join_ms).
if (process.argv[1] === self && process.argv[2] === 'hold') {
  await init({ cluster: { address: process.argv[3], bundles: [{ CPU: 2 }], name: 'holder' } });
  // Settled, as a job running for a while is: its node's worker started and ran a task.
  await get(noop.remote());
  process.stdout.write('holding\n');
  await new Promise<void>((resolve) => process.once('SIGTERM', () => resolve()));
  await shutdown();
  process.exit(0);
}
