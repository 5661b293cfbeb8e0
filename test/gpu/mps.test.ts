/**
 * gpuSharing 'mps': the cluster's own CUDA MPS control daemon, joined by its GPU workers, stopped
 * with the cluster, and found and stopped by the next cluster when its driver was killed. On a GPU
 * host with nvidia-cuda-mps-control the real daemon runs; elsewhere the fake daemon
 * (fake/mps-control) and the fake CUDA driver, which joins it the way a client's cuInit does.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { CudaError, get, init, InvalidArgumentError, isInitialized, shutdown, state, waitForNodes } from '../../lib/index.js';
import { findControlProgram } from '../../lib/gpu/mps.js';
import { buildFakeGpu, scenario } from './gpu-helpers.js';
import { RemoteConsumer, RemoteProducer } from './fixtures/cuda-actors.js';
import { trellisCli, scriptArgs } from '../core/helpers.js';

const here = dirname(fileURLToPath(import.meta.url));
const real = (await scenario('absent')).cuda.available === true;
const fake = real ? {} : buildFakeGpu();
if (fake.path) {
  process.env.TRELLIS_CUDA_DRIVER = process.env.TRELLIS_NCCL_LIBRARY = fake.path;
  process.env.TRELLIS_MPS_CONTROL = join(here, 'fake', 'mps-control');
}
const control = findControlProgram();
const reason = real ? (control ? undefined : 'nvidia-cuda-mps-control is not on PATH') : fake.path ? undefined : fake.reason;
const label = real ? 'the CUDA driver and nvidia-cuda-mps-control' : 'the fake CUDA driver and MPS daemon';

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function until(done: () => boolean, ms = 10_000): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (!done() && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
  return done();
}

function ask(pipeDirectory: string, command: string): string {
  const answer = spawnSync(control!, [], { input: `${command}\n`, env: { ...process.env, CUDA_MPS_PIPE_DIRECTORY: pipeDirectory }, encoding: 'utf8', timeout: 10_000 });
  return answer.stdout.trim();
}

describe.skipIf(reason !== undefined)(`gpuSharing 'mps' (${reason ? `skipped: ${reason}` : label})`, () => {
  afterAll(async () => {
    await shutdown();
  });

  it('starts a daemon for the cluster, which GPU workers join, and stops it at shutdown', async () => {
    await init({ numCpus: 2, numGpus: 1, gpuSharing: 'mps' });
    const sharing = state().gpuSharing;
    expect(sharing.mode).toBe('mps');
    const pipeDirectory = sharing.pipeDirectory!;
    const daemon = Number(readFileSync(join(dirname(pipeDirectory), 'daemon.pid'), 'utf8'));
    expect(alive(daemon)).toBe(true);

    const producer = RemoteProducer.options({ numGpus: 0.5 }).remote();
    const consumer = RemoteConsumer.options({ numGpus: 0.5 }).remote();
    expect(await get(consumer.environment.remote('CUDA_MPS_PIPE_DIRECTORY'))).toBe(pipeDirectory);
    // A CUDA tensor between two clients, by IPC, content checked.
    using made = producer.make.remote(1 << 20, 3);
    expect(await get(consumer.inspect.remote(made))).toEqual([{ device: 'cuda:0', imported: true, numel: 1 << 20, sum: 3 << 20 }]);
    // The workers' CUDA joined the daemon: it runs a server for them.
    expect(ask(pipeDirectory, 'get_server_list')).toMatch(/^\d+/);

    await shutdown();
    expect(await until(() => !alive(daemon))).toBe(true);
    expect(existsSync(dirname(pipeDirectory))).toBe(false);
    expect(state).toThrow();
  });

  it('fails init with ERR_MPS_UNAVAILABLE, naming the program, when the daemon cannot run', async () => {
    const saved = process.env.TRELLIS_MPS_CONTROL;
    process.env.TRELLIS_MPS_CONTROL = '/nonexistent/nvidia-cuda-mps-control';
    try {
      const error = await init({ numCpus: 1, numGpus: 1, gpuSharing: 'mps' }).catch((failure: unknown) => failure);
      expect(error).toBeInstanceOf(CudaError);
      expect(error).toMatchObject({ code: 'ERR_MPS_UNAVAILABLE', call: 'nvidia-cuda-mps-control' });
      expect((error as Error).message).toContain('/nonexistent/nvidia-cuda-mps-control');
      expect(isInitialized()).toBe(false);
    } finally {
      if (saved === undefined) delete process.env.TRELLIS_MPS_CONTROL;
      else process.env.TRELLIS_MPS_CONTROL = saved;
    }
    if (fake.path) {
      // A daemon that starts and exits: its own words reach the error.
      process.env.FAKE_MPS_FAIL = '1';
      try {
        const error = await init({ numCpus: 1, numGpus: 1, gpuSharing: 'mps' }).catch((failure: unknown) => failure);
        expect(error).toMatchObject({ code: 'ERR_MPS_UNAVAILABLE' });
        expect((error as Error).message).toContain('refusing to start');
      } finally {
        delete process.env.FAKE_MPS_FAIL;
      }
    }
    // Nothing was left half started: a plain cluster starts.
    await init({ numCpus: 1 });
    expect(state().gpuSharing).toEqual({ mode: 'time-slice' });
    await shutdown();
  });

  it('runs a daemon on each node agent with GPUs, which its workers join, stopped when the driver ends', async () => {
    const token = 'mps-agents';
    await init({ numCpus: 1, gpuSharing: 'mps', listen: { host: '127.0.0.1', port: 0, token } });
    const agent = spawn(process.execPath, [...trellisCli, 'node', '--head', `127.0.0.1:${state().listening!.port}`, '--id', 'gpu-agent', '--num-cpus', '2', '--num-gpus', '1', '--once'], {
      env: { ...process.env, TRELLIS_CLUSTER_TOKEN: token },
      stdio: ['ignore', 'inherit', 'inherit'],
    });
    const exited = new Promise((resolve) => agent.once('exit', resolve));
    try {
      await waitForNodes(2, { timeout: 60_000 });
      // The driver's node has no GPUs: no daemon of its own.
      expect(state().gpuSharing).toEqual({ mode: 'mps' });
      const producer = RemoteProducer.options({ numGpus: 0.5 }).remote();
      const consumer = RemoteConsumer.options({ numGpus: 0.5 }).remote();
      const pipeDirectory = (await get(consumer.environment.remote('CUDA_MPS_PIPE_DIRECTORY'))) as string;
      expect(pipeDirectory).toContain(`trellis-mps-${agent.pid}-`);
      using made = producer.make.remote(1 << 20, 3);
      expect(await get(consumer.inspect.remote(made))).toEqual([{ device: 'cuda:0', imported: true, numel: 1 << 20, sum: 3 << 20 }]);
      expect(ask(pipeDirectory, 'get_server_list')).toMatch(/^\d+/);
      await shutdown();
      await exited;
      expect(existsSync(dirname(pipeDirectory))).toBe(false);
    } finally {
      await shutdown();
      if (agent.exitCode === null) agent.kill('SIGKILL');
    }
  }, 90_000);

  it('refuses mps without GPUs, and an unknown mode, with InvalidArgumentError', async () => {
    await expect(init({ numCpus: 1, gpuSharing: 'mps' })).rejects.toThrow(InvalidArgumentError);
    await expect(init({ numCpus: 1, numGpus: 1, gpuSharing: 'exclusive' as 'mps' })).rejects.toThrow(/gpuSharing must be/);
    expect(isInitialized()).toBe(false);
  });

  it("stops the daemon of a driver that was killed, when the next cluster starts", async () => {
    const child = spawn(process.execPath, [...scriptArgs(join(here, 'fixtures', 'mps-driver.ts'))], { env: process.env, stdio: ['ignore', 'pipe', 'inherit'] });
    const pipeDirectory = await new Promise<string>((resolve, reject) => {
      let output = '';
      child.stdout!.on('data', (chunk: Buffer) => {
        output += chunk.toString();
        if (output.includes('\n')) resolve(output.trim());
      });
      child.once('exit', (code) => reject(new Error(`the driver exited with ${code} before it started`)));
    });
    const daemon = Number(readFileSync(join(dirname(pipeDirectory), 'daemon.pid'), 'utf8'));
    child.kill('SIGKILL');
    await new Promise((resolve) => child.once('exit', resolve));
    expect(alive(daemon)).toBe(true); // orphaned with its driver
    await init({ numCpus: 1, numGpus: 1, gpuSharing: 'mps' });
    expect(await until(() => !alive(daemon))).toBe(true);
    await shutdown();
    // Its directory goes at the start after it quit.
    await init({ numCpus: 1, numGpus: 1, gpuSharing: 'mps' });
    expect(existsSync(dirname(pipeDirectory))).toBe(false);
    await shutdown();
  });
});
