/**
 * The model's layers through the device path (lib/llm/device-layers.ts): on this host its 'cpu'
 * backend, the host twin, must give the CPU decoder's results bit for bit (same kernels, same
 * order), which checks everything but the CUDA kernels themselves: cache layout and growth,
 * prefix copies, rewinds, releases, the step layout, the tensor-parallel sums. On a GPU host the
 * CUDA backend is checked against the twin, operation by operation and as a whole model.
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
import { QWEN3, runSteps, TINY_MIXTRAL, WIDE_HEADS } from './fixtures/device-steps.js';
import { writeRandomAdapter } from '../../examples/model/random-decoder.js';
import { randomWeights, referenceGenerate, TINY, TINY_LLAMA, writeCheckpoint } from './fixtures/decoders.js';

/** Runs a fixtures/ script in a child process (so it and its workers load the driver its env names), returning its JSON report. */
function deviceScenario(env: Record<string, string>, script = 'device-scenario.ts', args: string[] = []): Promise<any> {
  const childEnv: NodeJS.ProcessEnv = { ...process.env, ...env };
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', new URL(`./fixtures/${script}`, import.meta.url).pathname, ...args], { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
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

  const models: Array<[string, DecoderConfig, string, 'F32' | 'BF16' | 'F16', number?]> = [
    ['gpt2 (layer norms, GELU, learned positions, tied head)', TINY, 'transformer.', 'F32'],
    ['llama (grouped-query attention, rotary positions), bf16 weights and cache', TINY_LLAMA, 'model.', 'BF16'],
    ['qwen3 (query/key norms), f16', QWEN3, 'model.', 'F16'],
    ['mistral (a sliding window of 5)', { ...TINY_LLAMA, slidingWindow: 5 }, 'model.', 'F32'],
    ['mixtral (4 experts, 2 a token)', TINY_MIXTRAL, 'model.', 'F32'],
    ['llama, int8 weights', TINY_LLAMA, 'model.', 'F32'],
    ...WIDE_HEADS.map(([name, config, length]): [string, DecoderConfig, string, 'F32', number] => [name, config, 'model.', 'F32', length]),
  ];
  for (const [index, [name, config, prefix, dtype, promptLength]] of models.entries()) {
    it(`the host twin gives the CPU decoder's logits bit for bit: ${name}`, async () => {
      const path = await writeCheckpoint(join(directory, `model-${index}`), config, randomWeights(config, 11), { prefix, dtype });
      const resolved = readCheckpointConfig(path)!;
      const spec = { checkpoint: path, config: resolved, plan: planSharding(resolved), stage: 0, rank: 0, ...(name.includes('int8') ? { weightDtype: 'int8' as const } : {}) };
      const plain = await DecoderShard.load(spec);
      using twin = await DecoderShard.load({ ...spec, layers: 'cpu' });
      expect(twin.kvCacheDtype).toBe(plain.kvCacheDtype);
      const wanted = await runSteps(plain, config.vocabSize, promptLength);
      const got = await runSteps(twin, config.vocabSize, promptLength);
      expect(got.length).toBe(4);
      for (let step = 0; step < wanted.length; step++) {
        expect(got[step].tokens).toEqual(wanted[step].tokens);
        expect(Buffer.from(got[step].logits.buffer).equals(Buffer.from(wanted[step].logits.buffer))).toBe(true);
      }
      expect(twin.cachedSequences).toBe(plain.cachedSequences);
      expect(twin.cachedSequences).toBe(2);
      // Weights of the layers and head live in the device's memory, the embeddings on the host.
      expect(twin.weightBytes).toBeGreaterThanOrEqual(plain.weightBytes);
      // A step that disagrees with the cache is refused, as by the CPU decoder.
      await expect(twin.forward({ step: 9, sequences: [{ id: 2, past: 3, count: 1 }], released: [], tokens: Int32Array.from([1]) })).rejects.toMatchObject({ code: 'ERR_SEQUENCE_STATE' });
    });
  }

  it("a replica cut 2 × 2 through the host twin generates the reference's tokens", async () => {
    const weights = randomWeights(TINY_LLAMA, 5);
    const path = await writeCheckpoint(join(directory, 'llama-replica'), TINY_LLAMA, weights, { prefix: 'model.' });
    const prompts = [[3, 99, 14, 15, 92, 65, 35, 89, 79], [1, 2], [50, 60, 70, 80, 90, 100, 0, 10, 20, 30, 40, 5, 6, 7, 8, 9, 10, 11]];
    await using replica = await ModelReplica.create({ checkpoint: path, tensorParallel: 2, pipelineParallel: 2, maxTokensPerStep: 8, layerBackend: 'cpu' });
    const generated = await replica.generate(prompts.map((tokens) => ({ tokens, maxNewTokens: 6 })));
    expect(generated.map((generation) => generation.tokens)).toEqual(prompts.map((tokens) => referenceGenerate(TINY_LLAMA, weights, tokens, 6)));
  });

  it("LoRA adapters through the twin, two and the base model in one batch across two ranks: the CPU replica's generations", async () => {
    const weights = randomWeights(TINY, 4);
    const path = await writeCheckpoint(join(directory, 'gpt2-lora'), TINY, weights, { prefix: 'transformer.' });
    const adapters = { first: await writeRandomAdapter(join(directory, 'lora-first'), TINY, 4, 31), second: await writeRandomAdapter(join(directory, 'lora-second'), TINY, 2, 32) };
    const requests = [
      { tokens: [3, 9, 27, 81], maxNewTokens: 6, adapter: 'first' },
      { tokens: [3, 9, 27, 81], maxNewTokens: 6 },
      { tokens: [5, 6, 7], maxNewTokens: 6, adapter: 'second' },
      { tokens: [1, 2, 3, 4, 5, 6, 7, 8], maxNewTokens: 6, adapter: 'first' },
    ];
    const generations = [];
    for (const layerBackend of [undefined, 'cpu'] as const) {
      await using replica = await ModelReplica.create({ checkpoint: path, tensorParallel: 2, adapters, maxLoadedAdapters: 1, ...(layerBackend ? { layerBackend } : {}) });
      generations.push((await replica.generate(requests)).map((generation) => generation.tokens));
    }
    expect(generations[1]).toEqual(generations[0]);
    // The adapters change the text.
    expect(generations[0][0]).not.toEqual(generations[0][1]);
  });

  it('what needs more than tokens works the same through the twin: logprobs, prompt scoring, n-gram speculation, embeddings', async () => {
    const weights = randomWeights(TINY_LLAMA, 8);
    const path = await writeCheckpoint(join(directory, 'llama-features'), TINY_LLAMA, weights, { prefix: 'model.' });
    const repeating = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6];
    const requests = [
      { tokens: [3, 99, 14, 15, 92], maxNewTokens: 5, logprobs: true, topLogprobs: 3, promptLogprobs: true },
      { tokens: repeating, maxNewTokens: 8, sampling: { temperature: 0.8, seed: 3 } },
    ];
    const options = { checkpoint: path, tensorParallel: 2, speculation: { method: 'ngram' as const, tokens: 3 } };
    const results = [];
    for (const layerBackend of [undefined, 'cpu'] as const) {
      await using replica = await ModelReplica.create({ ...options, ...(layerBackend ? { layerBackend } : {}) });
      results.push({
        generations: await replica.generate(requests),
        embeddings: (await replica.embed([{ tokens: repeating }, { tokens: [1, 2, 3], pooling: 'mean' }])).map((embedding) => [...embedding.vector]),
      });
    }
    expect(results[1]).toEqual(results[0]);
    expect(results[0].generations[0].promptLogprobs).toHaveLength(4);
  });

  it('refuses options that do not fit', async () => {
    const path = await writeCheckpoint(join(directory, 'refusals'), TINY_LLAMA, randomWeights(TINY_LLAMA, 2), { prefix: 'model.' });
    await expect(ModelReplica.create({ checkpoint: path, device: 'cuda', layerBackend: 'cpu' })).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(ModelReplica.create({ checkpoint: path, device: 'tpu' as 'cuda' })).rejects.toThrow(/device must be 'cpu' or 'cuda'/);
    await expect(ModelReplica.create({ checkpoint: path, layerBackend: 'cpu', gpuMemoryUtilization: 1.5 })).rejects.toThrow(/gpuMemoryUtilization must be a number in \(0, 1\]/);
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

describe('the CUDA kernels against the host twin', () => {
  const fakeEnv = () => ({ TRELLIS_CUDA_DRIVER: fake.path!, TRELLIS_CUBLAS_LIBRARY: fake.path!, TRELLIS_NCCL_LIBRARY: fake.path!, FAKE_CUDA_DEVICES: '4' });
  // The fake driver runs trellis's CUDA source compiled for the host, each block's threads as
  // fibers: the kernels' indexing, reductions and barriers, the launches' arguments and the
  // matrices' cuBLAS conventions are checked here; the GPU's own arithmetic only on a GPU host.
  it.skipIf(!fake.path)(`operation by operation and as whole shards, emulated on the fake driver${fake.path ? '' : ` (skipped: ${fake.reason})`}`, async () => {
    expectReport(await deviceScenario(fakeEnv()));
  }, 120_000);

  it.skipIf(!fake.path)("a replica on device 'cuda' cut 2 × 2 over four (fake) GPUs and NCCL, from the driver and inside a processor's engine, generates the reference's tokens", async () => {
    const { reference, fromDriver, fromProcessor } = await deviceScenario(fakeEnv(), 'device-replica-scenario.ts');
    expect(fromDriver).toEqual(reference);
    expect(fromProcessor).toEqual(reference);
  }, 180_000);

  it.skipIf(!fake.path)("sizes a GPU replica's cache from the memory its weights and a full step leave, and refuses a GPU too small for any", async () => {
    // TINY_LLAMA: a position of all three layers' keys and values is 3 · 2 · 2 heads · 6 · 4 bytes.
    const roomy = await deviceScenario({ ...fakeEnv(), FAKE_CUDA_MEMORY_LIMIT: String(64 * 2 ** 20) }, 'device-replica-scenario.ts', ['budget']);
    expect(roomy.maxCacheTokens).toBeGreaterThan(150_000);
    expect(roomy.maxCacheTokens).toBeLessThan((0.9 * 64 * 2 ** 20) / 288);
    const tiny = await deviceScenario({ ...fakeEnv(), FAKE_CUDA_MEMORY_LIMIT: String(2 * 2 ** 20) }, 'device-replica-scenario.ts', ['budget']);
    expect(tiny).toMatchObject({ error: 'ERR_DEVICE_MEMORY', message: expect.stringContaining('gpuMemoryUtilization') });
  }, 120_000);

  const fourGpus = cuda.available && cuda.deviceCount() >= 4;
  it.skipIf(!fourGpus)(`the same replica on four GPUs${fourGpus ? '' : ' (skipped: needs four GPUs)'}`, async () => {
    const { reference, fromDriver, fromProcessor } = await deviceScenario({}, 'device-replica-scenario.ts');
    expect(fromDriver).toEqual(reference);
    expect(fromProcessor).toEqual(reference);
  }, 180_000);

  it.skipIf(!cuda.available)(`operation by operation and as whole shards, on the GPU${cuda.available ? '' : ' (skipped: no CUDA driver on this host)'}`, async () => {
    expectReport(await deviceScenario({}));
  }, 120_000);
});
