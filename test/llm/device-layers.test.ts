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
import { cuda } from '../../lib/gpu/cuda.js';
import { cudaKernelImageBytes, DeviceKernels, type DeviceBuffer, type ElementType, type KernelBackend } from '../../lib/llm/device-kernels.js';
import type { StepMessage, StepResult } from '../../lib/llm/shard.js';
import { floatToBf16, floatToF16 } from '../../lib/gpu/dtype.js';
import { randomWeights, referenceGenerate, TINY, TINY_LLAMA, writeCheckpoint } from './fixtures/decoders.js';

const QWEN3: DecoderConfig = {
  architecture: 'llama', vocabSize: 101, hiddenSize: 32, numLayers: 2, numHeads: 4, numKeyValueHeads: 2, headSize: 16, intermediateSize: 48,
  maxPositions: 64, layerNormEpsilon: 1e-6, ropeTheta: 1000000, tieWordEmbeddings: true, queryKeyNorm: true,
};

/** Steps that exercise the caches: two prompts read in pieces, growth past 16 positions, a prefix copy, a rewind, releases. */
function steps(vocabSize: number): StepMessage[] {
  const prompt = Array.from({ length: 21 }, (_, index) => (index * 7 + 3) % vocabSize);
  return [
    { step: 0, sequences: [{ id: 0, past: 0, count: 12, prefill: true }, { id: 1, past: 0, count: 5 }], released: [], tokens: Int32Array.from([...prompt.slice(0, 12), ...prompt.slice(0, 5)]), logits: true },
    { step: 1, sequences: [{ id: 0, past: 12, count: 9 }, { id: 1, past: 5, count: 3 }], released: [], tokens: Int32Array.from([...prompt.slice(12), 9, 4, 1]), logits: true },
    // Sequence 2 starts from 16 of sequence 0's positions; sequence 1 drops its last two (a rejected proposal).
    { step: 2, sequences: [{ id: 2, past: 16, count: 5, copyFrom: { id: 0, length: 16 } }, { id: 1, past: 6, count: 1, rewind: true }], released: [], tokens: Int32Array.from([...prompt.slice(16), 7]), logits: true },
    { step: 3, sequences: [{ id: 2, past: 21, count: 1 }, { id: 1, past: 7, count: 1 }], released: [0], tokens: Int32Array.from([11, 13]), logits: true },
  ];
}

async function runSteps(shard: DecoderShard, vocabSize: number): Promise<Array<{ tokens: number[]; logits: Float32Array }>> {
  const results = [];
  for (const message of steps(vocabSize)) {
    const result = (await shard.forward(message)) as StepResult;
    results.push({ tokens: [...result.tokens], logits: result.logits! });
  }
  return results;
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
  ];
  for (const [name, config, prefix, dtype] of models) {
    it(`the host twin gives the CPU decoder's logits bit for bit: ${name}`, async () => {
      const path = await writeCheckpoint(join(directory, name.split(' ')[0]), config, randomWeights(config, 11), { prefix, dtype });
      const resolved = readCheckpointConfig(path)!;
      const spec = { checkpoint: path, config: resolved, plan: planSharding(resolved), stage: 0, rank: 0 };
      const plain = await DecoderShard.load(spec);
      using twin = await DecoderShard.load({ ...spec, layers: 'cpu' });
      expect(twin.kvCacheDtype).toBe(plain.kvCacheDtype);
      const wanted = await runSteps(plain, config.vocabSize);
      const got = await runSteps(twin, config.vocabSize);
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
    await expect(replica.addAdapter('any', directory)).rejects.toMatchObject({ code: 'ERR_UNSUPPORTED_ON_DEVICE' });
  });

  it('refuses up front what the device path does not run, and options that do not fit', async () => {
    const path = await writeCheckpoint(join(directory, 'refusals'), TINY_LLAMA, randomWeights(TINY_LLAMA, 2), { prefix: 'model.' });
    await expect(ModelReplica.create({ checkpoint: path, layerBackend: 'cpu', weightDtype: 'int8' })).rejects.toMatchObject({ code: 'ERR_UNSUPPORTED_ON_DEVICE' });
    await expect(ModelReplica.create({ checkpoint: path, layerBackend: 'cpu', adapters: { one: directory } })).rejects.toMatchObject({ code: 'ERR_UNSUPPORTED_ON_DEVICE' });
    await expect(ModelReplica.create({ checkpoint: path, device: 'cuda', layerBackend: 'cpu' })).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(ModelReplica.create({ checkpoint: path, device: 'tpu' as 'cuda' })).rejects.toThrow(/device must be 'cpu' or 'cuda'/);
    const config = readCheckpointConfig(path)!;
    await expect(DecoderShard.load({ checkpoint: path, config, plan: planSharding(config), stage: 0, rank: 0, layers: 'cpu', weightDtype: 'int8' })).rejects.toMatchObject({ code: 'ERR_UNSUPPORTED_ON_DEVICE' });
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

/** Random values in [-1, 1) from a seed (integer arithmetic: the same on every host). */
function randomFloats(length: number, seed: number): Float32Array {
  let state = seed >>> 0;
  return Float32Array.from({ length }, () => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state / 2 ** 31 - 1;
  });
}

function upload(kernels: DeviceKernels, values: Float32Array): DeviceBuffer {
  const buffer = kernels.allocate(values.byteLength);
  kernels.upload(buffer, values);
  return buffer;
}

function read(kernels: DeviceKernels, buffer: DeviceBuffer, length: number): Float32Array {
  const out = new Float32Array(length);
  kernels.download(out, buffer);
  return out;
}

function expectClose(actual: Float32Array, wanted: Float32Array, relative: number): void {
  const scale = Math.max(1e-6, ...wanted.map(Math.abs));
  let worst = 0;
  for (let index = 0; index < wanted.length; index++) worst = Math.max(worst, Math.abs(actual[index] - wanted[index]));
  expect(worst / scale).toBeLessThan(relative);
}

describe.skipIf(!cuda.available)(`the CUDA kernels against the host twin${cuda.available ? '' : ' (skipped: no CUDA driver on this host)'}`, () => {
  it('linear (f32, bf16 and f16 weights, with a bias), norms, SiLU gating and GELU', () => {
    using gpu = DeviceKernels.create('cuda');
    using host = DeviceKernels.create('cpu');
    const rows = 37;
    const depth = 96;
    const columns = 80;
    const x = randomFloats(rows * depth, 1);
    const weights = randomFloats(columns * depth, 2);
    const bias = randomFloats(columns, 3);
    for (const dtype of ['f32', 'bf16', 'f16'] as ElementType[]) {
      const bits = dtype === 'f32' ? weights : Uint16Array.from(weights, dtype === 'bf16' ? floatToBf16 : floatToF16);
      const results = [gpu, host].map((kernels) => {
        const out = kernels.allocate(rows * columns * 4);
        // The GPU also rounds the input to the weights' 16 bits: hence the wider tolerance for them.
        kernels.linear(out, upload(kernels, x), kernels.tensor(bits, dtype), kernels.tensor(bias, 'f32'), rows, depth, columns);
        return read(kernels, out, rows * columns);
      });
      expectClose(results[0], results[1], dtype === 'f32' ? 1e-5 : 2e-2);
    }
    const gamma = randomFloats(depth, 4);
    const beta = randomFloats(depth, 5);
    for (const norm of ['rms', 'layer'] as const) {
      const [got, wanted] = [gpu, host].map((kernels) => {
        const out = kernels.allocate(rows * depth * 4);
        const g = kernels.tensor(gamma, 'f32');
        if (norm === 'rms') kernels.rmsNorm(out, upload(kernels, x), g, rows, depth, 1e-5);
        else kernels.layerNorm(out, upload(kernels, x), g, kernels.tensor(beta, 'f32'), rows, depth, 1e-5);
        return read(kernels, out, rows * depth);
      });
      expectClose(got, wanted, 1e-5);
    }
    const [silu, siluWanted] = [gpu, host].map((kernels) => {
      const gate = upload(kernels, x);
      kernels.siluMultiply(gate, gate, upload(kernels, randomFloats(x.length, 6)), x.length);
      return read(kernels, gate, x.length);
    });
    expectClose(silu, siluWanted, 1e-5);
    const [gelu, geluWanted] = [gpu, host].map((kernels) => {
      const values = upload(kernels, x);
      kernels.gelu(values, x.length);
      return read(kernels, values, x.length);
    });
    expectClose(gelu, geluWanted, 1e-5);
  });

  for (const [name, config, dtype] of [
    ['llama, f32', TINY_LLAMA, 'F32'],
    ['llama, bf16 weights and cache', TINY_LLAMA, 'BF16'],
    ['qwen3 (query/key norms)', QWEN3, 'F32'],
    ['mistral (a sliding window of 5)', { ...TINY_LLAMA, slidingWindow: 5 }, 'F32'],
    ['gpt2', TINY, 'F32'],
  ] as Array<[string, DecoderConfig, 'F32' | 'BF16']>) {
    it(`a whole shard on the GPU gives the twin's logits to rounding: ${name}`, async () => {
      const directory = mkdtempSync(join(tmpdir(), 'trellis-device-gpu-'));
      try {
        const path = await writeCheckpoint(join(directory, 'model'), config, randomWeights(config, 13), { prefix: config.architecture === 'gpt2' ? 'transformer.' : 'model.', dtype });
        const resolved = readCheckpointConfig(path)!;
        const spec = { checkpoint: path, config: resolved, plan: planSharding(resolved), stage: 0, rank: 0 };
        using gpu = await DecoderShard.load({ ...spec, layers: 'cuda' });
        using twin = await DecoderShard.load({ ...spec, layers: 'cpu' });
        const got = await runSteps(gpu, config.vocabSize);
        const wanted = await runSteps(twin, config.vocabSize);
        for (let step = 0; step < wanted.length; step++) expectClose(got[step].logits, wanted[step].logits, dtype === 'F32' ? 1e-4 : 3e-2);
        expect(gpu.cachedSequences).toBe(2);
      } finally {
        rmSync(directory, { recursive: true, force: true });
      }
    });
  }
});
