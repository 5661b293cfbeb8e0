/**
 * The native GPU layer end to end against a fake CUDA driver and NCCL (fake/fake_gpu.cc, host
 * memory behind the same C ABI): the loader, the caching allocator, copies, promises settled by the
 * completion thread, CUDA IPC between two processes, NCCL collectives on one rank, and the failure
 * paths a real GPU rarely shows (a peer that never joins, an operation that never completes, an
 * asynchronous NCCL error, abort). What the fake cannot tell — the real driver's and NCCL's
 * behaviour — is checked by cuda.test.ts on a GPU host.
 */
import { readdirSync, rmSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { buildFakeGpu, scenario } from './gpu-helpers.js';

const fake = buildFakeGpu();
const MiB = 1 << 20;

afterAll(() => {
  // The fake NCCL's meeting segment of a rank whose peer never came (the init timeout test).
  for (const name of readdirSync('/dev/shm')) if (name.startsWith('fake-nccl-')) rmSync(`/dev/shm/${name}`, { force: true });
});

function env(extra: Record<string, string> = {}): Record<string, string> {
  return { TRELLIS_CUDA_DRIVER: fake.path!, TRELLIS_NCCL_LIBRARY: fake.path!, ...extra };
}

describe.skipIf(!fake.path)(`the native GPU layer on a fake driver${fake.reason ? ` (skipped: ${fake.reason})` : ''}`, () => {
  it('loads the driver and NCCL and describes the device', async () => {
    const absent = await scenario('absent', [], env());
    expect(absent.cuda).toEqual({ available: true, libraryPath: fake.path, driverVersion: 13000 });
    expect(absent.nccl).toEqual({ available: true, libraryPath: fake.path, version: 22809 });
    const { devices } = await scenario('devices', [], env());
    expect(devices).toEqual([
      { index: 0, name: 'Fake GPU 0', totalMemory: 80 * 1024 * MiB, freeMemory: 80 * 1024 * MiB, computeCapability: [9, 0], uuid: 'GPU-00010203-0405-0607-0809-0a0b0c0d0e0f' },
    ]);
  });

  it("reports cuInit's error by name and every call fails typed", async () => {
    const report = await scenario('absent', [], env({ FAKE_CUDA_NO_DEVICE: '1' }));
    expect(report.cuda.reason).toBe('cuInit failed: CUDA_ERROR_NO_DEVICE (no CUDA-capable device is detected)');
    expect(report.cuda.driverVersion).toBe(13000);
    for (const call of Object.values(report.calls) as Array<{ code: string }>) expect(call.code).toBe('ERR_CUDA_UNAVAILABLE');
  });

  it('reuses freed blocks by size class (exported ones down to half their size), keeps shared memory until its last share goes, and releases blocks on emptyCache and garbage collection', async () => {
    const { stats } = await scenario('allocator', [], env());
    expect(stats).toEqual({ allocatedBytes: 0, cachedBytes: 10 * MiB, allocations: 11, reuses: 3 });
  });

  it('copies every size from 1 byte to 64 MiB, sync and async, with offsets and fill', async () => {
    const report = await scenario('copies', [String(64 * MiB)], env());
    expect(report.checked).toBeGreaterThan(70);
  });

  it('copies between two devices GPU to GPU (peer copies), sync, on a stream and by Tensor.to()', async () => {
    expect(await scenario('peer-copies', [], env({ FAKE_CUDA_DEVICES: '2' }))).toMatchObject({ size: 3 * MiB + 5 });
  });

  it('turns misuse into typed errors', async () => {
    const { results } = await scenario('errors', [], env());
    expect(Object.fromEntries(Object.entries(results as Record<string, { code: string }>).map(([key, value]) => [key, value.code]))).toEqual({
      outOfRange: 'ERR_OUT_OF_RANGE',
      offsetOutOfRange: 'ERR_OUT_OF_RANGE',
      asyncOutOfRange: 'ERR_OUT_OF_RANGE',
      badDevice: 'ERR_INVALID_ARGUMENT',
      badSize: 'ERR_INVALID_ARGUMENT',
      badFill: 'ERR_INVALID_ARGUMENT',
      badSource: 'ERR_INVALID_ARGUMENT',
      badHandle: 'ERR_INVALID_ARGUMENT',
      badPackedHandle: 'ERR_INVALID_ARGUMENT',
      asyncDeviceOutOfRange: 'ERR_OUT_OF_RANGE',
      ownHandle: 'ERR_CUDA',
      destroyedStream: 'ERR_CUDA_FREED',
      useAfterFree: 'ERR_CUDA_FREED',
    });
    expect(results.ownHandle).toMatchObject({ name: 'CudaError', call: 'cuIpcOpenMemHandle_v2' });
    expect(results.ownHandle.message).toBe('cuIpcOpenMemHandle_v2 failed: CUDA_ERROR_INVALID_CONTEXT (fake driver error)');
  });

  it('keeps the event loop turning while async copies are in flight', async () => {
    const { turns, pending, doneAfter } = await scenario('event-loop', [], env({ FAKE_CUDA_EVENT_DELAY_US: '30000' }));
    expect(turns).toBeGreaterThan(10);
    // An event whose work is still running is not done, and has no elapsed time yet.
    expect([pending, doneAfter]).toEqual(['ERR_CUDA_NOT_READY', true]);
  });

  it('hands device memory to another process over CUDA IPC, opened once, kept idle after its last view, closed by emptyCache', async () => {
    const report = await scenario('ipc-export', [String(3 * MiB + 5)], env());
    expect(report.child).toMatchObject({ bytes: 3 * MiB + 5, reexport: 'ERR_CUDA' });
  });

  it('closes an IPC mapping with its last view in a process that keeps none idle (TRELLIS_IPC_IDLE_MAPPINGS=0)', async () => {
    expect(await scenario('ipc-strict', [], env())).toMatchObject({ inUse: 0, idle: 0, opens: 2, reuses: 0, closes: 2 });
  });

  it('page-locks the object store chunks that copies touch, once, and unlocks them when the store closes', async () => {
    const report = await scenario('page-lock', [], env());
    expect(report.rounds).toEqual([
      { chunksLocked: 1, lockedBytes: 64 * MiB },
      { chunksLocked: 2, lockedBytes: 64 * MiB },
    ]);
  });

  it('runs every collective on one rank, for every dtype', async () => {
    const report = await scenario('nccl-one-rank', [], env());
    expect(report).toMatchObject({ version: '2.28.9', errors: { shape: 'ERR_INVALID_SHAPE', cpuTensor: 'ERR_TENSOR_DEVICE', afterDestroy: 'ERR_NCCL_DESTROYED' } });
  });

  it('fails out of device memory with a typed error that names what stays cached (blocks exported over IPC)', async () => {
    const { plain, withExported } = await scenario('out-of-memory', [], env({ FAKE_CUDA_MEMORY_LIMIT: String(8 * MiB) }));
    expect(plain).toMatchObject({ name: 'CudaError', code: 'ERR_CUDA', call: 'cuMemAlloc_v2' });
    expect(plain.message).toBe('cuMemAlloc_v2 failed: CUDA_ERROR_OUT_OF_MEMORY (out of memory) allocating 10485760 bytes on device 0');
    expect(withExported.message).toContain('allocating 6291456 bytes on device 0; 4194304 bytes stay cached in blocks this process exported over CUDA IPC');
    expect(withExported.message).toContain('reclaimIpcMemory()');
  });

  it('runs every collective and a send/recv ring across 3 ranks in 3 processes', async () => {
    expect(await scenario('nccl-ranks', ['3'], env())).toMatchObject({ size: 3, ranks: 3 });
  });

  it('gives up on a peer that never joins with ERR_NCCL_TIMEOUT', async () => {
    const { error, elapsedMs } = await scenario('nccl-init-timeout', [], env());
    expect(error).toMatchObject({ name: 'NcclError', code: 'ERR_NCCL_TIMEOUT', call: 'ncclCommInitRank' });
    expect(elapsedMs).toBeGreaterThanOrEqual(490);
    expect(elapsedMs).toBeLessThan(5000);
  });

  it('aborts a communicator stuck inside an NCCL call, failing that and later operations', async () => {
    const report = await scenario('nccl-timeout', [], env({ FAKE_NCCL_HANG: '1' }));
    expect(report.first).toMatchObject({ code: 'ERR_NCCL_TIMEOUT', call: 'ncclAllReduce' });
    expect(report.later.code).toBe('ERR_NCCL_TIMEOUT');
    expect(report.elapsedMs).toBeLessThan(5000);
  });

  it('aborts a communicator whose operation never completes on the device', async () => {
    const report = await scenario('nccl-timeout', [], env({ FAKE_CUDA_EVENT_DELAY_US: '600000000' }));
    expect(report.first).toMatchObject({ code: 'ERR_NCCL_TIMEOUT', call: 'ncclAllReduce' });
    expect(report.later.code).toBe('ERR_NCCL_TIMEOUT');
  });

  it('fails on an asynchronous NCCL error (a dead peer) without waiting for the timeout', async () => {
    const { error } = await scenario('nccl-async-error', [], env({ FAKE_NCCL_ASYNC_ERROR: '1', FAKE_CUDA_EVENT_DELAY_US: '600000000' }));
    expect(error).toMatchObject({ name: 'NcclError', code: 'ERR_NCCL', call: 'ncclCommGetAsyncError' });
    expect(error.message).toContain('remote process exited');
  });

  it('abort() fails pending, grouped and later operations with ERR_NCCL_ABORTED', async () => {
    const report = await scenario('nccl-abort', [], env({ FAKE_CUDA_EVENT_DELAY_US: '600000000' }));
    for (const key of ['pending', 'group', 'later']) {
      expect(report[key], key).toMatchObject({ name: 'NcclError', code: 'ERR_NCCL_ABORTED' });
      expect(report[key].message, key).toContain('test abort');
    }
  });
});
