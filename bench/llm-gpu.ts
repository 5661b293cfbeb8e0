/**
 * LLM-on-GPU suite (needs a CUDA device and cuBLAS): one rank's layers on the device path
 * (DeviceLayers), a Llama-shaped model of 8 layers (hidden 4096, 32 query and 8 key/value heads of
 * 128, MLP 11008, bf16 weights and cache: 2.8 GB), weights made in memory (no checkpoint to write).
 * - `gpu_decode_step_ms`: a decode step of 64 sequences 128 positions in (one token each), hidden
 *   states up and back included; `gpu_decode_tokens_per_s` the same as tokens a second.
 * - `weight_read_floor_ms`: the physical floor of that step: every weight read once at the
 *   device's read bandwidth (twice the device-to-device copy rate measured in this run, a copy
 *   reading and writing each byte). The ratio floor / step is the share of the bandwidth a decode
 *   step turns into tokens.
 * - `gpu_prefill_tokens_per_s`: 8 prompts of 512 tokens read in one step;
 *   `matmul_floor_tokens_per_s`: the same tokens at the rate cuBLAS multiplies this model's
 *   matrices (one [4096 × 4096] · [11008 × 4096]ᵀ bf16 product, timed here), attention and the
 *   other kernels left out: the ratio is what they and the launches cost.
 * - `gpu_decode_long_step_ms` and `gpu_decode_long_fp8_step_ms`: a decode step of the same 64
 *   sequences 2,048 positions in, the paged cache in bf16 and in fp8 (attention then reads more
 *   cache than weights: 2.1 GB of bf16 keys and values a step); against `long_read_floor_ms`,
 *   every weight and the bf16 cache read once at the device's read bandwidth.
 * - `gpu_replica_tokens_per_s`: a ModelReplica on device 'cuda' (one GPU rank) generating 64
 *   tokens for each of 64 prompts of 32, a smaller Llama-shaped checkpoint (4 layers, hidden 1024,
 *   vocabulary 32,000, bf16) written for the run; against `gpu_replica_layers_tokens_per_s`, the
 *   same model's layers alone decoding 64 sequences: the ratio is what the head, sampling,
 *   scheduling and the step's trip through the compiled graph cost.
 */
import { cuda } from '../lib/gpu/cuda.js';
import { checkDecoderConfig, rotaryInverseFrequencies } from '../lib/llm/config.js';
import { DeviceKernels } from '../lib/llm/device-kernels.js';
import { DeviceLayers } from '../lib/llm/device-layers.js';
import { planSharding } from '../lib/llm/plan.js';
import type { HalfMatrix } from '../lib/llm/kernels.js';
import type { LayerWeights } from '../lib/llm/weights.js';
import { floatToBf16 } from '../lib/gpu/dtype.js';
import { elapsedSeconds, median, nowNs, round, type Results, type Suite } from './harness.js';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { init, ModelReplica, readCheckpointConfig, shutdown } from '../lib/index.js';
import { Checkpoint } from '../lib/llm/safetensors.js';
import { loadShardWeights } from '../lib/llm/weights.js';
import { randomWeights, writeCheckpoint } from '../examples/model/random-decoder.js';

// TRELLIS_BENCH_SMOKE=1: a model and sizes small enough to run the suite's code on the fake driver.
const SMOKE = process.env.TRELLIS_BENCH_SMOKE === '1';
const CONFIG = checkDecoderConfig(SMOKE
  ? { architecture: 'llama', vocabSize: 256, hiddenSize: 64, numLayers: 2, numHeads: 4, numKeyValueHeads: 2, headSize: 16, intermediateSize: 96, maxPositions: 256, layerNormEpsilon: 1e-5 }
  : {
      architecture: 'llama', vocabSize: 32000, hiddenSize: 4096, numLayers: 8, numHeads: 32, numKeyValueHeads: 8, headSize: 128,
      intermediateSize: 11008, maxPositions: 4096, layerNormEpsilon: 1e-5, ropeTheta: 500000, tieWordEmbeddings: false,
    });
const SIZES = SMOKE
  ? { copyBytes: 1 << 20, batch: 4, prompt: 8, decodeSteps: 4, prompts: 2, length: 16, gemmRows: 32, longContext: 40, longChunk: 16 }
  : { copyBytes: 1 << 30, batch: 64, prompt: 128, decodeSteps: 24, prompts: 8, length: 512, gemmRows: 4096, longContext: 2048, longChunk: 256 };

/** A [rows, columns] bf16 matrix of small values, a random block repeated (making 2.8 GB of distinct randoms takes longer than the run). */
function matrix(rows: number, columns: number, seed: number): HalfMatrix {
  const block = new Uint16Array(1 << 16);
  let state = seed >>> 0;
  for (let index = 0; index < block.length; index++) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    block[index] = floatToBf16((state / 2 ** 32 - 0.5) * 0.04);
  }
  const bits = new Uint16Array(rows * columns);
  for (let offset = 0; offset < bits.length; offset += block.length) bits.set(block.subarray(0, Math.min(block.length, bits.length - offset)), offset);
  return { dtype: 'bf16', bits };
}

function randomHidden(length: number): Float32Array {
  return Float32Array.from({ length }, (_, index) => Math.sin(index * 0.37) * 0.5);
}

export const llmGpuSuite: Suite = {
  name: 'llm-gpu',
  ratios: [
    ['replica / its layers alone, decoding', 'gpu_replica_tokens_per_s', 'gpu_replica_layers_tokens_per_s', 'higher is better; 1 is no cost outside the layers'],
    ['decode step: weight-read floor / measured', 'weight_read_floor_ms', 'gpu_decode_step_ms', 'higher is better; 1 is the bandwidth bound'],
    ['prefill: measured / matmul-only rate', 'gpu_prefill_tokens_per_s', 'matmul_floor_tokens_per_s', 'higher is better; 1 is cuBLAS alone'],
    ['decode at 2,048 positions, bf16 cache: read floor / measured', 'long_read_floor_ms', 'gpu_decode_long_step_ms', 'higher is better; 1 is the bandwidth bound'],
    ['decode at 2,048 positions: fp8 cache / bf16 cache (time)', 'gpu_decode_long_fp8_step_ms', 'gpu_decode_long_step_ms', 'below 1: the fp8 cache reads faster'],
  ],
  async run(): Promise<Results> {
    if (!cuda.available) {
      console.error(`llm-gpu: skipped: ${cuda.reason}`);
      return {};
    }
    const results: Results = {};
    const config = CONFIG;
    const plan = planSharding(config);
    const size = config.hiddenSize;
    const inner = config.intermediateSize;
    const rowWidth = (config.numHeads + 2 * config.numKeyValueHeads) * config.headSize;
    // One host copy per shape: every layer uploads the same values.
    const qkv = matrix(rowWidth, size, 1);
    const projection = matrix(size, config.numHeads * config.headSize, 2);
    const up = matrix(inner, size, 3);
    const gate = matrix(inner, size, 4);
    const down = matrix(size, inner, 5);
    const norm = { gamma: new Float32Array(size).fill(1) };
    const layerWeights: LayerWeights[] = Array.from({ length: config.numLayers }, () => ({
      attentionNorm: norm, qkvWeight: qkv, projectionWeight: projection, mlpNorm: norm, mlp: { kind: 'dense', up, gate, down },
    }));
    using kernels = DeviceKernels.create('cuda');
    using layers = DeviceLayers.create(kernels, { config, plan, layers: layerWeights, kvCacheDtype: 'bf16', inverseFrequencies: rotaryInverseFrequencies(config) });

    // The device's read bandwidth: a 1 GiB device-to-device copy reads and writes every byte.
    const bytes = SIZES.copyBytes;
    const source = cuda.allocate(0, bytes);
    const target = cuda.allocate(0, bytes);
    const copies: number[] = [];
    for (let run = 0; run < 6; run++) {
      const start = nowNs();
      target.copyFromDevice(source, bytes);
      copies.push(elapsedSeconds(start));
    }
    source.free();
    target.free();
    const readBandwidth = (2 * bytes) / median(copies.slice(1));
    results.device_read_GBps = { value: round(readBandwidth / 1e9, 1), unit: 'GB/s' };
    results.weight_read_floor_ms = { value: round((layers.weightBytes / readBandwidth) * 1e3, 3), unit: 'ms' };

    // Decode: 64 sequences, 128 positions read, then one token each a step.
    const { batch, prompt, decodeSteps } = SIZES;
    for (let id = 0; id < batch; id++) layers.reserve(id, prompt + decodeSteps + 1);
    await layers.run(randomHidden(batch * prompt * size), Array.from({ length: batch }, (_, id) => ({ id, past: 0, count: prompt })));
    const stepTimes: number[] = [];
    for (let step = 0; step < decodeSteps; step++) {
      const hidden = randomHidden(batch * size);
      const start = nowNs();
      await layers.run(hidden, Array.from({ length: batch }, (_, id) => ({ id, past: prompt + step, count: 1 })));
      stepTimes.push(elapsedSeconds(start));
    }
    const stepSeconds = median(stepTimes.slice(2));
    results.gpu_decode_step_ms = { value: round(stepSeconds * 1e3, 3), unit: 'ms' };
    results.gpu_decode_tokens_per_s = { value: round(batch / stepSeconds, 1), unit: 'tokens/s' };
    for (let id = 0; id < batch; id++) layers.release(id);

    // Decode at a long context: the cache read rivals the weights'. Its prompts are read in
    // pieces first (their values matter not), for a cache in bf16, then in fp8.
    const { longContext, longChunk } = SIZES;
    const longStep = async (target: DeviceLayers): Promise<number> => {
      for (let id = 0; id < batch; id++) target.reserve(2000 + id, longContext + decodeSteps + 1);
      for (let past = 0; past < longContext; past += longChunk) {
        const count = Math.min(longChunk, longContext - past);
        await target.run(randomHidden(batch * count * size), Array.from({ length: batch }, (_, id) => ({ id: 2000 + id, past, count })));
      }
      const times: number[] = [];
      for (let step = 0; step < Math.min(decodeSteps, 8); step++) {
        const hidden = randomHidden(batch * size);
        const start = nowNs();
        await target.run(hidden, Array.from({ length: batch }, (_, id) => ({ id: 2000 + id, past: longContext + step, count: 1 })));
        times.push(elapsedSeconds(start));
      }
      for (let id = 0; id < batch; id++) target.release(2000 + id);
      return median(times.slice(2));
    };
    results.gpu_decode_long_step_ms = { value: round((await longStep(layers)) * 1e3, 3), unit: 'ms' };
    results.long_read_floor_ms = { value: round(((layers.weightBytes + batch * longContext * layers.bytesPerPosition) / readBandwidth) * 1e3, 3), unit: 'ms' };
    {
      using eight = DeviceLayers.create(kernels, { config, plan, layers: layerWeights, kvCacheDtype: 'fp8', inverseFrequencies: rotaryInverseFrequencies(config) });
      results.gpu_decode_long_fp8_step_ms = { value: round((await longStep(eight)) * 1e3, 3), unit: 'ms' };
    }

    // Prefill: 8 prompts of 512 tokens in one step.
    const { prompts, length } = SIZES;
    const prefillTimes: number[] = [];
    for (let run = 0; run < 3; run++) {
      for (let id = 0; id < prompts; id++) layers.reserve(1000 + id, length);
      const hidden = randomHidden(prompts * length * size);
      const start = nowNs();
      await layers.run(hidden, Array.from({ length: prompts }, (_, id) => ({ id: 1000 + id, past: 0, count: length })));
      prefillTimes.push(elapsedSeconds(start));
      for (let id = 0; id < prompts; id++) layers.release(1000 + id);
    }
    results.gpu_prefill_tokens_per_s = { value: round((prompts * length) / median(prefillTimes), 1), unit: 'tokens/s' };

    // cuBLAS alone: the MLP's up projection over 4096 rows, as FLOPs a second, turned into the
    // rate a step of only this model's matrix products would read tokens at.
    const rows = SIZES.gemmRows;
    const x = kernels.allocate(rows * size * 4);
    const out = kernels.allocate(rows * inner * 4);
    const weight = kernels.tensor(up.bits, 'bf16');
    kernels.upload(x, randomHidden(rows * size));
    const gemmTimes: number[] = [];
    for (let run = 0; run < 6; run++) {
      const start = nowNs();
      kernels.linear(out, x, weight, null, rows, size, inner);
      kernels.synchronize();
      gemmTimes.push(elapsedSeconds(start));
    }
    const flopsPerSecond = (2 * rows * size * inner) / median(gemmTimes.slice(1));
    x.free();
    out.free();
    weight.buffer.free();
    const flopsPerToken = 2 * config.numLayers * (rowWidth * size + size * config.numHeads * config.headSize + 3 * inner * size);
    results.matmul_TFLOPs = { value: round(flopsPerSecond / 1e12, 1), unit: 'TFLOP/s' };
    results.matmul_floor_tokens_per_s = { value: round(flopsPerSecond / flopsPerToken, 1), unit: 'tokens/s' };
    layers.close();
    Object.assign(results, await replicaFigures(kernels));
    return results;
  },
};

/** The replica end to end against the same model's layers alone (see the header). */
async function replicaFigures(kernels: DeviceKernels): Promise<Results> {
  const decoder = SMOKE
    ? { architecture: 'llama' as const, vocabSize: 256, hiddenSize: 64, numLayers: 2, numHeads: 4, numKeyValueHeads: 2, headSize: 16, intermediateSize: 96, maxPositions: 256, layerNormEpsilon: 1e-5, tieWordEmbeddings: false }
    : { architecture: 'llama' as const, vocabSize: 32000, hiddenSize: 1024, numLayers: 4, numHeads: 16, numKeyValueHeads: 4, headSize: 64, intermediateSize: 2816, maxPositions: 1024, layerNormEpsilon: 1e-5, ropeTheta: 500000, tieWordEmbeddings: false };
  const sequences = SMOKE ? 4 : 64;
  const promptLength = SMOKE ? 8 : 32;
  const newTokens = SMOKE ? 4 : 64;
  const directory = mkdtempSync(join(tmpdir(), 'trellis-bench-llm-gpu-'));
  try {
    const checkpoint = await writeCheckpoint(join(directory, 'model'), decoder, randomWeights(decoder, 7), { prefix: 'model.', dtype: 'BF16' });
    const config = readCheckpointConfig(checkpoint)!;
    const plan = planSharding(config);
    const prompts = Array.from({ length: sequences }, (_, index) => Array.from({ length: promptLength }, (_, position) => (index * 131 + position * 17) % config.vocabSize));

    // The layers alone: prompts read, then decode steps of every sequence.
    let layersRate: number;
    {
      await using file = await Checkpoint.open(checkpoint);
      const weights = await loadShardWeights(file, config, plan, 0, 0, 'bf16');
      using layers = DeviceLayers.create(kernels, { config, plan, layers: weights.layers, head: weights.head, kvCacheDtype: 'bf16', inverseFrequencies: rotaryInverseFrequencies(config) });
      for (let id = 0; id < sequences; id++) layers.reserve(id, promptLength + newTokens);
      await layers.run(randomHidden(sequences * promptLength * config.hiddenSize), Array.from({ length: sequences }, (_, id) => ({ id, past: 0, count: promptLength })));
      const start = nowNs();
      for (let step = 0; step < newTokens; step++) {
        await layers.run(randomHidden(sequences * config.hiddenSize), Array.from({ length: sequences }, (_, id) => ({ id, past: promptLength + step, count: 1 })));
      }
      layersRate = (sequences * newTokens) / elapsedSeconds(start);
    }

    await init({ numCpus: 4, numGpus: cuda.deviceCount() });
    try {
      await using replica = await ModelReplica.create({ checkpoint, device: 'cuda', maxSequencesPerStep: sequences });
      const requests = prompts.map((tokens) => ({ tokens, maxNewTokens: newTokens, stopTokens: [] }));
      await replica.generate(requests);
      const times: number[] = [];
      for (let round = 0; round < 2; round++) {
        const start = nowNs();
        await replica.generate(requests);
        times.push(elapsedSeconds(start));
      }
      return {
        gpu_replica_tokens_per_s: { value: round((sequences * newTokens) / Math.min(...times), 1), unit: 'tokens/s' },
        gpu_replica_layers_tokens_per_s: { value: round(layersRate, 1), unit: 'tokens/s' },
      };
    } finally {
      await shutdown();
    }
  } finally {
    rmSync(directory, { recursive: true, force: true });
  }
}
