/**
 * examples/gpu-transport.ts runs as the README says: CPU tensors over a CPU communicator on a host
 * without CUDA, CUDA tensors mapped by IPC on a GPU host.
 */
import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { cuda } from '../../lib/index.js';

describe('the tensor transport example', () => {
  it(`moves its tensors ${cuda.available ? 'by CUDA IPC' : 'over the CPU communicator'} and prints each step`, () => {
    const run = spawnSync(process.execPath, ['--import', 'tsx', 'examples/gpu-transport.ts'], { encoding: 'utf8', timeout: 60_000 });
    expect(run.status, run.stderr).toBe(0);
    const route = cuda.available ? 'ipc' : 'communicator';
    const device = cuda.available ? 'cuda:0' : 'cpu';
    for (let step = 0; step < 3; step++) {
      expect(run.stdout).toContain(`step ${step}: ${route} -> {"step":${step},"arrived":{"device":"${device}","mapped":${cuda.available}},"rowSum":511.5,"tokens":8}`);
    }
    expect(run.stdout).toContain('driver get(): cpu [ 2, 4 ] 9');
  });
});
