/**
 * Where CUDA or NCCL cannot be loaded — absent, a path that does not exist, a library that is not
 * them — `available` is false with a reason naming what failed, and every call throws a typed error
 * with a code. Each case runs in its own process, so a failed dlopen cannot leak between tests.
 */
import { describe, expect, it } from 'vitest';
import { cuda } from '../../lib/gpu/cuda.js';
import { nccl } from '../../lib/gpu/nccl.js';
import { scenario } from './gpu-helpers.js';

const cudaCalls = ['deviceCount', 'devices', 'allocate', 'importIpc', 'createStream', 'allocatorStats', 'emptyCache', 'openIpcMappings', 'ipcStats', 'setIdleIpcMappings', 'allocateHost', 'pageLockStats', 'tensor'];
const ncclCalls = ['nccl.uniqueId', 'nccl.create'];

function expectTypedFailures(calls: Record<string, { name: string; code: string; message: string }>, names: string[], code: string, reason: string): void {
  for (const name of names) {
    expect(calls[name], name).toBeDefined();
    expect(calls[name].code, name).toBe(code);
    expect(calls[name].name, name).toBe(code.startsWith('ERR_CUDA') ? 'CudaError' : 'NcclError');
    expect(calls[name].message, name).toContain(reason);
  }
}

describe('CUDA and NCCL where they cannot be loaded', () => {
  it.skipIf(cuda.available)('reports libcuda.so.1 missing and every CUDA call fails with ERR_CUDA_UNAVAILABLE', async () => {
    const report = await scenario('absent');
    expect(report.cuda.available).toBe(false);
    expect(report.cuda.libraryPath).toBe('libcuda.so.1');
    // Where the library exists but no GPU does, cuInit's error is the reason instead.
    expect(report.cuda.reason).toMatch(/^libcuda\.so\.1 (not found|could not be loaded): |^cuInit failed: |^no CUDA device/);
    expectTypedFailures(report.calls, cudaCalls, 'ERR_CUDA_UNAVAILABLE', report.cuda.reason);
  });

  it.skipIf(nccl.available)('reports libnccl.so.2 missing and every NCCL call fails with ERR_NCCL_UNAVAILABLE', async () => {
    const report = await scenario('absent');
    expect(report.nccl.available).toBe(false);
    expect(report.nccl.reason).toMatch(/^libnccl\.so\.2 (not found|could not be loaded): /);
    expectTypedFailures(report.calls, ncclCalls, 'ERR_NCCL_UNAVAILABLE', report.nccl.reason);
  });

  it('names a TRELLIS_CUDA_DRIVER / TRELLIS_NCCL_LIBRARY path that does not exist', async () => {
    const path = '/nonexistent/trellis-test/libcuda.so.1';
    const ncclPath = '/nonexistent/trellis-test/libnccl.so.2';
    const report = await scenario('absent', [], { TRELLIS_CUDA_DRIVER: path, TRELLIS_NCCL_LIBRARY: ncclPath });
    expect(report.cuda).toMatchObject({ available: false, libraryPath: path });
    expect(report.cuda.reason).toContain(`${path} not found: `);
    expect(report.cuda.reason).toContain('No such file');
    expect(report.nccl).toMatchObject({ available: false, libraryPath: ncclPath });
    expect(report.nccl.reason).toContain(`${ncclPath} not found: `);
    expectTypedFailures(report.calls, cudaCalls, 'ERR_CUDA_UNAVAILABLE', path);
    expectTypedFailures(report.calls, ncclCalls, 'ERR_NCCL_UNAVAILABLE', ncclPath);
  });

  for (const library of ['libz.so.1', 'libc.so.6']) {
    it(`names the missing symbol when the library is not CUDA or NCCL (${library})`, async () => {
      const report = await scenario('absent', [], { TRELLIS_CUDA_DRIVER: library, TRELLIS_NCCL_LIBRARY: library });
      expect(report.cuda.available).toBe(false);
      const name = library.replace(/\./g, '\\.');
      expect(report.cuda.reason).toMatch(new RegExp(`^${name} is not a usable CUDA driver: symbol cuGetErrorName not found \\(.*undefined symbol: cuGetErrorName\\)$`));
      expect(report.nccl.available).toBe(false);
      expect(report.nccl.reason).toMatch(new RegExp(`^${name} is not a usable NCCL library: symbol ncclGetVersion not found \\(.*undefined symbol: ncclGetVersion\\)$`));
      expectTypedFailures(report.calls, cudaCalls, 'ERR_CUDA_UNAVAILABLE', 'symbol cuGetErrorName not found');
      expectTypedFailures(report.calls, ncclCalls, 'ERR_NCCL_UNAVAILABLE', 'symbol ncclGetVersion not found');
    });
  }

  it('answers cuda.available and nccl.available in this process without throwing', () => {
    expect(typeof cuda.available).toBe('boolean');
    expect(typeof nccl.available).toBe('boolean');
    if (!cuda.available) expect(cuda.reason).toBeTruthy();
    if (!nccl.available) expect(nccl.reason).toBeTruthy();
  });
});
