import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { configFromHuggingFace, init, ModelReplica, readCheckpointConfig, shutdown, type DecoderConfig } from '../../lib/index.js';
import { randomWeights, referenceGenerate, writeCheckpoint } from './fixtures/decoders.js';

/** Mixtral's layout in miniature: 4 experts, 2 per token, grouped-query attention. */
const TINY_MIXTRAL: DecoderConfig = {
  architecture: 'llama', vocabSize: 101, hiddenSize: 32, numLayers: 2, numHeads: 4, numKeyValueHeads: 2, headSize: 8, intermediateSize: 24,
  maxPositions: 64, layerNormEpsilon: 1e-5, ropeTheta: 1000, numExperts: 4, numExpertsPerToken: 2,
};

describe('mixture of experts (Mixtral layout)', () => {
  let directory: string;
  let checkpoint: string;
  const weights = randomWeights(TINY_MIXTRAL, 41);
  const prompts = [[5, 17, 3], [42], [1, 2, 3, 4, 5, 6, 7, 8, 9], [96, 0, 33, 12]];

  beforeAll(async () => {
    directory = mkdtempSync(join(tmpdir(), 'trellis-moe-'));
    checkpoint = await writeCheckpoint(join(directory, 'mixtral'), TINY_MIXTRAL, weights, { prefix: 'model.' });
    await init({ numCpus: 6 });
  });
  afterAll(async () => {
    await shutdown();
    rmSync(directory, { recursive: true, force: true });
  });

  it("reads Mixtral's config.json", () => {
    const config = readCheckpointConfig(checkpoint)!;
    expect(config).toMatchObject({ architecture: 'llama', numExperts: 4, numExpertsPerToken: 2, normalizeTopKProbabilities: true });
    expect(configFromHuggingFace({ model_type: 'mistral', vocab_size: 10, hidden_size: 8, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 16, max_position_embeddings: 32 })).toMatchObject({ numExperts: 0 });
    expect(() => configFromHuggingFace({ model_type: 'mixtral', vocab_size: 10, hidden_size: 8, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 16, max_position_embeddings: 32, num_local_experts: 2, num_experts_per_tok: 3 })).toThrow(/numExpertsPerToken 3 is more than numExperts 2/);
  });

  it('routes each token to its top experts, cut 2 × 2, token for token as the reference', async () => {
    await using replica = await ModelReplica.create({ checkpoint, tensorParallel: 2, pipelineParallel: 2 });
    const generations = await replica.generate(prompts.map((tokens) => ({ tokens, maxNewTokens: 8 })));
    generations.forEach((generation, index) => expect(generation.tokens, `prompt ${index}`).toEqual(referenceGenerate(TINY_MIXTRAL, weights, prompts[index], 8)));
  });

  it('keeps the softmax weights as they are when told not to renormalize the top experts', async () => {
    const config = { ...TINY_MIXTRAL, normalizeTopKProbabilities: false };
    await using replica = await ModelReplica.create({ checkpoint, config, tensorParallel: 2 });
    const generations = await replica.generate(prompts.map((tokens) => ({ tokens, maxNewTokens: 8 })));
    generations.forEach((generation, index) => expect(generation.tokens, `prompt ${index}`).toEqual(referenceGenerate(config, weights, prompts[index], 8)));
    // The two readings differ: the weights matter.
    expect(prompts.some((prompt) => referenceGenerate(config, weights, prompt, 8).join() !== referenceGenerate(TINY_MIXTRAL, weights, prompt, 8).join())).toBe(true);
  });

  it('quantizes every expert to int8 and still generates', async () => {
    await using replica = await ModelReplica.create({ checkpoint, weightDtype: 'int8' });
    const [generation] = await replica.generate([{ tokens: prompts[0], maxNewTokens: 8 }]);
    expect(generation.tokens).toHaveLength(8);
    expect(replica.weightDtype).toBe('int8');
  });
});

describe('Qwen3 (query/key norms) and Qwen3-MoE', () => {
  let directory: string;
  const qwen3: DecoderConfig = {
    architecture: 'llama', vocabSize: 101, hiddenSize: 32, numLayers: 2, numHeads: 4, numKeyValueHeads: 2, headSize: 16, intermediateSize: 48,
    maxPositions: 64, layerNormEpsilon: 1e-6, ropeTheta: 1000000, tieWordEmbeddings: true, queryKeyNorm: true,
  };
  const qwen3Moe: DecoderConfig = { ...qwen3, tieWordEmbeddings: false, intermediateSize: 16, numExperts: 6, numExpertsPerToken: 2, normalizeTopKProbabilities: true };
  const prompts = [[5, 17, 3], [42, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9]];

  beforeAll(async () => {
    directory = mkdtempSync(join(tmpdir(), 'trellis-qwen3-'));
    await init({ numCpus: 6 });
  });
  afterAll(async () => {
    await shutdown();
    rmSync(directory, { recursive: true, force: true });
  });

  for (const [name, config] of [['qwen3', qwen3], ['qwen3_moe', qwen3Moe]] as const) {
    it(`runs a ${name} checkpoint cut 2 × 2, token for token as the reference`, async () => {
      const weights = randomWeights(config, 7);
      const checkpoint = await writeCheckpoint(join(directory, name), config, weights, { prefix: 'model.' });
      expect(readCheckpointConfig(checkpoint)).toMatchObject({ queryKeyNorm: true, numExperts: config.numExperts ?? 0, intermediateSize: config.intermediateSize });
      await using replica = await ModelReplica.create({ checkpoint, tensorParallel: 2, pipelineParallel: 2 });
      const generations = await replica.generate(prompts.map((tokens) => ({ tokens, maxNewTokens: 8 })));
      generations.forEach((generation, index) => expect(generation.tokens, `prompt ${index}`).toEqual(referenceGenerate(config, weights, prompts[index], 8)));
      // The norms matter: without them the reference reads otherwise.
      expect(prompts.some((prompt) => referenceGenerate({ ...config, queryKeyNorm: false }, weights, prompt, 8).join() !== referenceGenerate(config, weights, prompt, 8).join())).toBe(true);
    });
  }

  it("refuses Qwen3-MoE configs that keep some layers dense", () => {
    const json = { model_type: 'qwen3_moe', vocab_size: 10, hidden_size: 8, num_hidden_layers: 2, num_attention_heads: 2, head_dim: 4, intermediate_size: 16, moe_intermediate_size: 8, max_position_embeddings: 32, num_experts: 4, num_experts_per_tok: 2 };
    expect(configFromHuggingFace(json)).toMatchObject({ numExperts: 4, intermediateSize: 8, normalizeTopKProbabilities: false, queryKeyNorm: true });
    expect(() => configFromHuggingFace({ ...json, mlp_only_layers: [0] })).toThrow(/dense layers among the sparse ones/);
  });
});
