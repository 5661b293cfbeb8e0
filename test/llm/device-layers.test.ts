/**
 * The model's layers (lib/llm/device-layers.ts) on both backends. On the host ('cpu'): the caches'
 * bookkeeping (layout, growth, prefix copies, rewinds, releases) against a plain reference. On
 * 'cuda': the kernels, launches and cuBLAS conventions against the host backend, on the fake
 * driver (which runs trellis's CUDA source emulated) and, where there is one, on a real GPU; and
 * replicas on GPU ranks end to end.
 */
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DecoderShard, init, InvalidArgumentError, ModelReplica, planSharding, readCheckpointConfig, shutdown, type DecoderConfig } from '../../lib/index.js';
import { spawn } from 'node:child_process';
import { cuda } from '../../lib/gpu/cuda.js';
import { cudaKernelImageBytes, DeviceKernels, type KernelBackend } from '../../lib/llm/device-kernels.js';
import { buildFakeGpu } from '../gpu/gpu-helpers.js';
import { QWEN3, runSteps, stepContexts, TINY_MIXTRAL, WIDE_HEADS } from './fixtures/device-steps.js';
import { randomWeights, referenceLogits, TINY, TINY_LLAMA, writeCheckpoint } from './fixtures/decoders.js';
import { scriptArgs } from '../core/helpers.js';

/** Runs a fixtures/ script in a child process (so it and its workers load the driver its env names), returning its JSON report. */
function deviceScenario(env: Record<string, string>, script = 'device-scenario.ts', args: string[] = []): Promise<any> {
  const childEnv: NodeJS.ProcessEnv = { ...process.env, ...env };
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...scriptArgs(new URL(`./fixtures/${script}`, import.meta.url).pathname), ...args], { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk) => (stdout += chunk));
    child.stderr.on('data', (chunk) => (stderr += chunk));
    child.on('error', reject);
    child.on('exit', (code) => {
      if (code !== 0) reject(new Error(`the device scenario exited with ${code}:\n${stderr}`));
      else resolve(JSON.parse(stdout.trim().split('\n').pop()!));
    });
  });
}

/** GPU ranks against CPU ranks on what needs more than tokens: the same tokens and proposals, numbers within f32 rounding. */
function expectSameFeatures(gpu: any, cpu: any): void {
  expect(gpu.tokens).toEqual(cpu.tokens);
  expect(gpu.draftTokens).toBe(cpu.draftTokens);
  expect(cpu.draftTokens).toBeGreaterThan(0);
  const close = (a: number[], b: number[]) => a.forEach((value, index) => expect(Math.abs(value - b[index])).toBeLessThan(1e-4 * Math.max(1, Math.abs(b[index]))));
  close(gpu.logprobs, cpu.logprobs);
  close(gpu.promptLogprobs, cpu.promptLogprobs);
  gpu.embeddings.forEach((vector: number[], index: number) => close(vector, cpu.embeddings[index]));
  expect(gpu.topLogprobs.map((entries: Array<{ token: number }>) => entries.map((entry) => entry.token))).toEqual(cpu.topLogprobs.map((entries: Array<{ token: number }>) => entries.map((entry) => entry.token)));
}

/** What the scenario measured, against the tolerances of each comparison. */
function expectReport(report: any): void {
  for (const [name, error] of Object.entries(report.operations as Record<string, number>)) {
    expect({ name, error: error < (name.includes('16') ? 2e-2 : 1e-5) }).toEqual({ name, error: true });
  }
  for (const [name, model] of Object.entries(report.models as Record<string, { errors: number[]; tokensEqual: boolean; cachedSequences: number }>)) {
    const sixteen = name.includes('bf16');
    for (const error of model.errors) expect({ name, error: error < (sixteen ? 3e-2 : 1e-4) }).toEqual({ name, error: true });
    if (!sixteen) expect({ name, tokensEqual: model.tokensEqual }).toEqual({ name, tokensEqual: true });
    expect(model.cachedSequences).toBe(2);
  }
}

describe('the device path of the model layers', () => {
  let directory: string;

  beforeAll(async () => {
    directory = mkdtempSync(join(tmpdir(), 'trellis-device-layers-'));
    await init({ numCpus: 4 });
  });
  afterAll(async () => {
    await shutdown();
    rmSync(directory, { recursive: true, force: true });
  });

  const models: Array<[string, DecoderConfig, string, number?]> = [
    ['gpt2 (layer norms, GELU, learned positions, tied head)', TINY, 'transformer.'],
    ['llama (grouped-query attention, rotary positions)', TINY_LLAMA, 'model.'],
    ['qwen3 (query/key norms)', QWEN3, 'model.'],
    ['mistral (a sliding window of 5)', { ...TINY_LLAMA, slidingWindow: 5 }, 'model.'],
    ['mixtral (4 experts, 2 a token)', TINY_MIXTRAL, 'model.'],
    ...WIDE_HEADS.map(([name, config, length]): [string, DecoderConfig, string, number] => [name, config, 'model.', length]),
  ];
  for (const [index, [name, config, prefix, promptLength]] of models.entries()) {
    it(`the layers' caches hold what a plain reference reads, through prompt pieces, growth, a prefix copy, a rewind and releases: ${name}`, async () => {
      const weights = randomWeights(config, 11);
      const path = await writeCheckpoint(join(directory, `model-${index}`), config, weights, { prefix });
      const resolved = readCheckpointConfig(path)!;
      using shard = await DecoderShard.load({ checkpoint: path, config: resolved, plan: planSharding(resolved), stage: 0, rank: 0 });
      const results = await runSteps(shard, config.vocabSize, promptLength);
      stepContexts(config.vocabSize, promptLength).forEach((contexts, step) => {
        for (const [place, tokens] of contexts) {
          const wanted = referenceLogits(config, weights, tokens)[tokens.length - 1];
          const got = results[step].logits.subarray(place * config.vocabSize, (place + 1) * config.vocabSize);
          const scale = Math.max(...wanted.map(Math.abs));
          let worst = 0;
          for (let token = 0; token < wanted.length; token++) worst = Math.max(worst, Math.abs(got[token] - wanted[token]));
          expect({ step, place, close: worst < 1e-4 * scale + 1e-5 }).toEqual({ step, place, close: true });
        }
      });
      expect(shard.cachedSequences).toBe(2);
      // A step that disagrees with the cache is refused.
      await expect(shard.forward({ step: 9, sequences: [{ id: 2, past: 3, count: 1 }], released: [], tokens: Int32Array.from([1]) })).rejects.toMatchObject({ code: 'ERR_SEQUENCE_STATE' });
    });
  }

  it("routes experts on the device (every expert over every row) as on the host: the same tokens, logits to rounding", async () => {
    const weights = randomWeights(TINY_MIXTRAL, 12);
    const path = await writeCheckpoint(join(directory, 'mixtral-routing'), TINY_MIXTRAL, weights, { prefix: 'model.' });
    const resolved = readCheckpointConfig(path)!;
    const spec = { checkpoint: path, config: resolved, plan: planSharding(resolved), stage: 0, rank: 0 };
    using host = await DecoderShard.load({ ...spec, expertRouting: 'host' });
    using device = await DecoderShard.load({ ...spec, expertRouting: 'device' });
    const wanted = await runSteps(host, TINY_MIXTRAL.vocabSize);
    const got = await runSteps(device, TINY_MIXTRAL.vocabSize);
    got.forEach((step, index) => {
      expect(step.tokens).toEqual(wanted[index].tokens);
      const scale = Math.max(...wanted[index].logits.map(Math.abs));
      step.logits.forEach((value, token) => expect(Math.abs(value - wanted[index].logits[token])).toBeLessThan(1e-5 * scale));
    });
  });

  it('refuses options that do not fit', async () => {
    const path = await writeCheckpoint(join(directory, 'refusals'), TINY_LLAMA, randomWeights(TINY_LLAMA, 2), { prefix: 'model.' });
    await expect(ModelReplica.create({ checkpoint: path, device: 'tpu' as 'cuda' })).rejects.toThrow(/device must be 'cpu' or 'cuda'/);
    await expect(ModelReplica.create({ checkpoint: path, gpuMemoryUtilization: 1.5 })).rejects.toThrow(/gpuMemoryUtilization must be a number in \(0, 1\]/);
  });

  it('checks every operand against the rows and widths given, and refuses freed buffers and closed kernels', () => {
    const kernels = DeviceKernels.create('cpu');
    const out = kernels.allocate(4 * 6);
    const x = kernels.allocate(4 * 8);
    const weight = kernels.tensor(new Float32Array(12), 'f32');
    expect(() => kernels.linear(out, x, weight, null, 2, 4, 3)).not.toThrow();
    expect(() => kernels.linear(out, x, weight, null, 2, 4, 4)).toThrow(/out needs 32 bytes, its buffer holds 24/);
    expect(() => kernels.linear(out, x, weight, null, 3, 4, 2)).toThrow(/x needs 48 bytes/);
    expect(() => kernels.tensor(new Float32Array(2), 'bf16')).toThrow(/Uint16Array/);
    x.free();
    expect(() => kernels.linear(out, x, weight, null, 2, 4, 3)).toThrow(/x has been freed/);
    kernels.close();
    expect(() => kernels.synchronize()).toThrow(expect.objectContaining({ code: 'ERR_CLOSED' }));
    expect(() => DeviceKernels.create('tpu' as KernelBackend)).toThrow(InvalidArgumentError);
  });

  it('embeds the CUDA kernels built from the committed source', () => {
    const source = readFileSync(new URL('../../native/kernels/cuda/decoder_kernels.cu', import.meta.url));
    const recorded = readFileSync(new URL('../../native/kernels/cuda/decoder_kernels.fatbin.sha256', import.meta.url), 'utf8').trim();
    // Changed the .cu without running scripts/build-cuda-kernels.sh? This fails until you do.
    expect(createHash('sha256').update(source).digest('hex')).toBe(recorded);
    const image = readFileSync(new URL('../../native/kernels/cuda/decoder_kernels.fatbin', import.meta.url));
    expect(cudaKernelImageBytes()).toBe(image.byteLength);
  });

  it.skipIf(cuda.available)('says why CUDA kernels cannot start on a host without the driver', () => {
    expect(() => DeviceKernels.create('cuda')).toThrow(expect.objectContaining({ code: 'ERR_CUDA_UNAVAILABLE' }));
  });
});


const fake = buildFakeGpu();

describe('the CUDA kernels against the host', () => {
  const fakeEnv = () => ({ TRELLIS_CUDA_DRIVER: fake.path!, TRELLIS_CUBLAS_LIBRARY: fake.path!, TRELLIS_NCCL_LIBRARY: fake.path!, FAKE_CUDA_DEVICES: '4' });
  // The fake driver runs trellis's CUDA source compiled for the host, each block's threads as
  // fibers: the kernels' indexing, reductions and barriers, the launches' arguments and the
  // matrices' cuBLAS conventions are checked here; the GPU's own arithmetic only on a GPU host.
  it.skipIf(!fake.path)(`operation by operation and as whole shards, emulated on the fake driver${fake.path ? '' : ` (skipped: ${fake.reason})`}`, async () => {
    expectReport(await deviceScenario(fakeEnv()));
  }, 120_000);

  it.skipIf(!fake.path)("a replica on device 'cuda' cut 2 × 2 over four (fake) GPUs and NCCL, from the driver and inside a processor's engine, generates the reference's tokens; logprobs, prompt scores, speculation (n-gram, and a draft model on a GPU of its own), embeddings and LoRA adapters on GPU ranks match CPU ranks; a GPU rank's death fails the requests and leaves nothing behind", async () => {
    const { reference, fromDriver, fromDraft, fromProcessor, features, rankDeath } = await deviceScenario(fakeEnv(), 'device-replica-scenario.ts');
    expect(fromDriver).toEqual(reference);
    expect(fromDraft.tokens).toEqual(reference);
    expect(fromDraft.accepted).toBeGreaterThan(0);
    expect(fromProcessor).toEqual(reference);
    expectSameFeatures(features.cuda, features.cpu);
    // A GPU rank killed mid-generation: the requests fail, and closing neither waits out the
    // survivors' NCCL timeout (a minute) nor leaves a rank behind.
    expect(rankDeath).toMatchObject({ outcome: 'ActorDiedError', alive: 0 });
    expect(rankDeath.closedAfterMs).toBeLessThan(30_000);
  }, 180_000);

  it.skipIf(!fake.path)("sizes a GPU replica's cache from the memory its weights and a full step leave, takes it at start (generating needs no more), and refuses a GPU too small for any or a budget too large for its GPU", async () => {
    // TINY_LLAMA: a position of all three layers' keys and values is 3 · 2 · 2 heads · 6 · 4 bytes.
    const roomy = await deviceScenario({ ...fakeEnv(), FAKE_CUDA_MEMORY_LIMIT: String(64 * 2 ** 20) }, 'device-replica-scenario.ts', ['budget']);
    expect(roomy.maxCacheTokens).toBeGreaterThan(150_000);
    expect(roomy.maxCacheTokens).toBeLessThan((0.9 * 64 * 2 ** 20) / 288);
    expect(roomy.generatedEqual).toBe(true);
    expect(roomy.oversized).toMatchObject({ error: 'ERR_DEVICE_MEMORY', message: expect.stringContaining(`a key/value cache of ${100 * roomy.maxCacheTokens} positions`) });
    const tiny = await deviceScenario({ ...fakeEnv(), FAKE_CUDA_MEMORY_LIMIT: String(2 * 2 ** 20) }, 'device-replica-scenario.ts', ['budget']);
    expect(tiny).toMatchObject({ error: 'ERR_DEVICE_MEMORY', message: expect.stringContaining('gpuMemoryUtilization') });
  }, 120_000);

  it.skipIf(!fake.path)('says why CUDA kernels cannot start where cuBLAS is missing, naming where it looked', async () => {
    const report = await deviceScenario({ ...fakeEnv(), TRELLIS_CUBLAS_LIBRARY: '/nonexistent/libcublas.so.13' }, 'cublas-absent.ts');
    expect(report).toMatchObject({ code: 'ERR_CUBLAS_UNAVAILABLE', message: expect.stringContaining('/nonexistent/libcublas.so.13') });
  });

  it.skipIf(!fake.path)("the llm-gpu benchmark's code runs (its smoke size, on the fake driver), so a GPU session does not find it broken", async () => {
    const report = await new Promise<any>((resolve, reject) => {
      const child = spawn(process.execPath, [...scriptArgs(new URL('../../bench/run.ts', import.meta.url).pathname), 'llm-gpu', '--json'], {
        env: { ...process.env, ...fakeEnv(), FAKE_CUDA_DEVICES: '1', TRELLIS_BENCH_SMOKE: '1' },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (chunk) => (stdout += chunk));
      child.stderr.on('data', (chunk) => (stderr += chunk));
      child.on('exit', (code) => (code === 0 ? resolve(JSON.parse(stdout.trim().split('\n').pop()!)) : reject(new Error(`the bench exited with ${code}:\n${stderr}`))));
    });
    expect(report.suite).toBe('llm-gpu');
    expect(Object.keys(report.results).sort()).toEqual(
      ['device_read_GBps', 'gpu_decode_long_fp8_step_ms', 'gpu_decode_long_step_ms', 'gpu_decode_step_ms', 'gpu_decode_tokens_per_s', 'gpu_prefill_tokens_per_s', 'gpu_replica_layers_tokens_per_s', 'gpu_replica_tokens_per_s', 'long_read_floor_ms', 'matmul_TFLOPs', 'matmul_floor_tokens_per_s', 'weight_read_floor_ms'].sort(),
    );
  }, 120_000);

  const fourGpus = cuda.available && cuda.deviceCount() >= 4;
  it.skipIf(!fourGpus)(`the same replica on four GPUs${fourGpus ? '' : ' (skipped: needs four GPUs)'}`, async () => {
    const { reference, fromDriver, fromProcessor, features } = await deviceScenario({}, 'device-replica-scenario.ts');
    expect(fromDriver).toEqual(reference);
    expect(fromProcessor).toEqual(reference);
    expectSameFeatures(features.cuda, features.cpu);
  }, 180_000);

  it.skipIf(!cuda.available)(`operation by operation and as whole shards, on the GPU${cuda.available ? '' : ' (skipped: no CUDA driver on this host)'}`, async () => {
    expectReport(await deviceScenario({}));
  }, 120_000);
});
