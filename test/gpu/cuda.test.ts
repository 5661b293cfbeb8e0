/**
 * The native GPU layer on a real GPU (skipped, with the reason, where there is none): devices,
 * allocator reuse, copies of every size from 1 byte to 1 GiB, CUDA IPC between two processes with
 * the content checked both ways, NCCL collectives on one rank, and a peer that never joins. Each
 * scenario runs in its own process (fixtures/gpu-scenarios.ts).
 */
import { describe, expect, it } from 'vitest';
import { cuda } from '../../lib/gpu/cuda.js';
import { nccl } from '../../lib/gpu/nccl.js';
import { scenario } from './gpu-helpers.js';

const GiB = 1 << 30;
const noCuda = cuda.available ? '' : ` (skipped: ${cuda.reason})`;
const noNccl = cuda.available && nccl.available ? '' : ` (skipped: ${cuda.available ? nccl.reason : cuda.reason})`;

describe(`CUDA on this host${noCuda}`, () => {
  it.skipIf(!cuda.available)('describes every device', async () => {
    const { devices, driverVersion } = await scenario('devices');
    expect(devices.length).toBeGreaterThan(0);
    expect(driverVersion).toBeGreaterThanOrEqual(12000);
  });

  it.skipIf(!cuda.available)('reuses freed blocks by size class, and exported blocks for requests down to half their size', async () => {
    const { stats } = await scenario('allocator');
    expect(stats.allocatedBytes).toBe(0);
    expect(stats.reuses).toBe(3);
    expect(stats.cachedBytes).toBe(10 * 2 ** 20);
  });

  it.skipIf(!cuda.available)('copies every size from 1 byte to 1 GiB (sync, async, device to device)', async () => {
    const report = await scenario('copies', [String(GiB)], {}, 280_000);
    expect(report.checked).toBeGreaterThan(80);
  }, 300_000);

  it.skipIf(!cuda.available)('turns misuse into typed errors', async () => {
    const { results } = await scenario('errors');
    expect(results.outOfRange.code).toBe('ERR_OUT_OF_RANGE');
    expect(results.ownHandle.code).toBe('ERR_CUDA'); // a process cannot open its own IPC handle
    expect(results.badPackedHandle.code).toBe('ERR_INVALID_ARGUMENT');
    expect(results.asyncDeviceOutOfRange.code).toBe('ERR_OUT_OF_RANGE');
    expect(results.useAfterFree.code).toBe('ERR_CUDA_FREED');
  });

  it.skipIf(!cuda.available)('keeps the event loop turning during async copies', async () => {
    const { turns } = await scenario('event-loop');
    expect(turns).toBeGreaterThan(1);
  });

  it.skipIf(!cuda.available)('shares device memory with another process over CUDA IPC, content checked both ways', async () => {
    const report = await scenario('ipc-export', [String(64 << 20)]);
    expect(report.child).toMatchObject({ bytes: 64 << 20, reexport: 'ERR_CUDA' });
  });

  it.skipIf(!cuda.available)('closes an IPC mapping with its last view where none are kept idle', async () => {
    expect(await scenario('ipc-strict')).toMatchObject({ inUse: 0, idle: 0, opens: 2, reuses: 0, closes: 2 });
  });

  it.skipIf(!cuda.available)('page-locks object store memory for copies, once, and unlocks it when the store closes', async () => {
    const report = await scenario('page-lock');
    expect(report.stats.chunksRefused).toBe(0);
    expect(report.rounds[1].chunksLocked).toBe(2 * report.rounds[0].chunksLocked);
  });
});

describe(`NCCL on this host${noNccl}`, () => {
  it.skipIf(!cuda.available || !nccl.available)('runs allreduce, broadcast, allgather, reducescatter and send/recv on one rank', async () => {
    const report = await scenario('nccl-one-rank');
    expect(report.version).toMatch(/^2\.\d+\.\d+$/);
    expect(report.errors).toEqual({ shape: 'ERR_INVALID_SHAPE', cpuTensor: 'ERR_TENSOR_DEVICE', afterDestroy: 'ERR_NCCL_DESTROYED' });
  });

  it.skipIf(!cuda.available || !nccl.available)('gives up on a peer that never joins with ERR_NCCL_TIMEOUT', async () => {
    const { error } = await scenario('nccl-init-timeout');
    expect(error).toMatchObject({ name: 'NcclError', code: 'ERR_NCCL_TIMEOUT', call: 'ncclCommInitRank' });
  });
});
