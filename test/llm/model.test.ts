import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ActorDiedError, DataError, InvalidArgumentError, ModelLoadError, fromItems, init, shutdown, state } from '../../lib/index.js';
import { buildLLMProcessor, checkDecoderConfig, configFromHuggingFace, DecoderShard, ModelReplica, planSharding, readCheckpointConfig, Tokenizer, type GenerateRequest } from '../../lib/index.js';
import { gpt2StyleTokenizerJson } from './fixtures/tokenizers.js';
import { isAlive, until } from '../core/helpers.js';
import { RecordingReporter } from '../data/helpers.js';
import { formatOperatorLine } from '../../lib/data/progress.js';
import { bf16ToFloat, f16ToFloat, floatToBf16, floatToF16 } from '../../lib/gpu/dtype.js';
import { quantizeRows } from '../../lib/llm/kernels.js';
import { choiceConstraint } from '../../lib/llm/choices.js';
import { randomWeights, referenceFinalHidden, referenceGenerate, referenceLogits, roundToFp8, TINY, TINY_LLAMA, writeCheckpoint, type Weights } from './fixtures/decoders.js';

/** Generates, watching the replica's stats meanwhile: the most sequences running at once, and the most cache positions counted. */
/** Tokens, and the most cache positions reserved at a watcher's samples (never above the budget, whenever sampled). */
async function generateWatched(replica: ModelReplica, requests: GenerateRequest[]): Promise<{ tokens: number[][]; mostReserved: number }> {
  let mostReserved = 0;
  const watch = setInterval(() => {
    mostReserved = Math.max(mostReserved, replica.stats().reservedCacheTokens);
  }, 1);
  try {
    const tokens = (await replica.generate(requests)).map((generation) => generation.tokens);
    return { tokens, mostReserved };
  } finally {
    clearInterval(watch);
  }
}

const PROMPTS = [[5, 17, 3], [42], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [96, 0, 33, 12], [7, 7, 7, 7, 7, 7]];

describe('model sharding', () => {
  let directory: string;
  let checkpoint: string;
  let weights: Weights;
  let expected: number[][];

  beforeAll(async () => {
    directory = mkdtempSync(join(tmpdir(), 'trellis-llm-'));
    weights = randomWeights(TINY, 7);
    checkpoint = await writeCheckpoint(join(directory, 'tiny'), TINY, weights, { prefix: 'transformer.' });
    expected = PROMPTS.map((prompt) => referenceGenerate(TINY, weights, prompt, 6));
    await init({ numCpus: 6 });
  });
  afterAll(async () => {
    await shutdown();
    rmSync(directory, { recursive: true, force: true });
  });

  /** A GPT-2-layout model with a tokenizer.json beside it, and more ids than the tokenizer has (as real ones often do). */
  async function textModel(name: string, seed: number) {
    const config = { ...TINY, vocabSize: 300 };
    const modelWeights = randomWeights(config, seed);
    const path = await writeCheckpoint(join(directory, name), config, modelWeights);
    const json = gpt2StyleTokenizerJson();
    writeFileSync(join(path, 'tokenizer.json'), JSON.stringify(json));
    return { path, config, weights: modelWeights, tokenizer: Tokenizer.fromJSON(json) };
  }

  it('plans layers, heads and vocabulary across ranks, and refuses cuts that do not divide', () => {
    const plan = planSharding({ ...TINY, numLayers: 7 }, { tensorParallel: 2, pipelineParallel: 3 });
    expect(plan.stages.map((stage) => [stage.firstLayer, stage.endLayer])).toEqual([[0, 2], [2, 5], [5, 7]]);
    expect(plan.stages.map((stage) => [stage.embeds, stage.hasHead])).toEqual([[true, false], [false, false], [false, true]]);
    expect(plan).toMatchObject({ headsPerRank: 2, headSize: 8, intermediatePerRank: 32, vocabularyPerRank: 49 });
    const refused = (options: object, pattern: RegExp) => {
      try {
        planSharding(TINY, options);
        throw new Error('not refused');
      } catch (error) {
        expect(error).toBeInstanceOf(InvalidArgumentError);
        expect((error as InvalidArgumentError).code).toBe('ERR_PARALLELISM');
        expect((error as Error).message).toMatch(pattern);
      }
    };
    refused({ tensorParallel: 3 }, /does not divide the model's 4 attention heads/);
    refused({ pipelineParallel: 5 }, /more than the model's 4 layers/);
    refused({ tensorParallel: 0 }, /tensorParallel must be a positive integer/);
  });

  it('reads config.json beside the checkpoint', () => {
    expect(readCheckpointConfig(checkpoint)).toEqual(checkDecoderConfig(TINY));
    expect(readCheckpointConfig(join(checkpoint, 'model.safetensors'))).toEqual(checkDecoderConfig(TINY));
  });

  it('reads Llama-layout configs, and refuses what it cannot run with the reason', () => {
    const llama = {
      model_type: 'llama', vocab_size: 128256, hidden_size: 4096, num_hidden_layers: 32, num_attention_heads: 32, num_key_value_heads: 8,
      intermediate_size: 14336, max_position_embeddings: 131072, rms_norm_eps: 1e-5, rope_theta: 500000, tie_word_embeddings: false,
      rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
    };
    expect(configFromHuggingFace(llama)).toMatchObject({ architecture: 'llama', numKeyValueHeads: 8, headSize: 128, ropeTheta: 500000, tieWordEmbeddings: false, ropeScaling: { factor: 8, originalMaxPositions: 8192 } });
    expect(planSharding(configFromHuggingFace(llama), { tensorParallel: 8, pipelineParallel: 4 })).toMatchObject({ headsPerRank: 4, keyValueHeadsPerRank: 1, intermediatePerRank: 1792 });
    expect(() => planSharding(configFromHuggingFace(llama), { tensorParallel: 16 })).toThrow(/does not divide the model's 8 key\/value heads/);
    const refused = (json: Record<string, unknown>, code: string, pattern: RegExp) => {
      try {
        configFromHuggingFace(json, '/models/x/config.json');
        throw new Error('not refused');
      } catch (error) {
        expect(error).toBeInstanceOf(ModelLoadError);
        expect(error).toMatchObject({ code, file: '/models/x/config.json' });
        expect((error as Error).message).toMatch(pattern);
      }
    };
    // Mistral's window is read; one as long as the positions is none; Qwen2's per-layer window is refused.
    expect(configFromHuggingFace({ ...llama, model_type: 'mistral', sliding_window: 4096 })).toMatchObject({ slidingWindow: 4096 });
    expect(configFromHuggingFace({ ...llama, model_type: 'mistral', sliding_window: null })).toMatchObject({ slidingWindow: 0 });
    expect(configFromHuggingFace({ ...llama, model_type: 'mistral', sliding_window: 131072 })).toMatchObject({ slidingWindow: 0 });
    expect(configFromHuggingFace({ ...llama, model_type: 'qwen2', use_sliding_window: false, sliding_window: 4096 })).toMatchObject({ slidingWindow: 0 });
    refused({ ...llama, model_type: 'qwen2', use_sliding_window: true, sliding_window: 4096 }, 'ERR_MODEL_ARCHITECTURE', /Qwen's per-layer sliding window/);
    expect(() => checkDecoderConfig({ ...TINY, slidingWindow: 8 })).toThrow(/gpt2 has no sliding window/);
    expect(() => checkDecoderConfig({ ...TINY_LLAMA, slidingWindow: -1 })).toThrow(/slidingWindow must be an integer >= 0/);
    refused({ ...llama, rope_scaling: { rope_type: 'yarn', factor: 4 } }, 'ERR_MODEL_CONFIG', /rope_scaling of type 'yarn'/);
    refused({ model_type: 'bert' }, 'ERR_MODEL_ARCHITECTURE', /model_type 'bert' is not supported/);
    refused({ ...llama, num_key_value_heads: 5 }, 'ERR_MODEL_CONFIG', /numHeads 32 is not a multiple of numKeyValueHeads 5/);
  });

  it('a Llama-layout decoder (grouped-query attention, rotary positions, query/key/value biases) matches the reference, cut or whole', async () => {
    const llamaWeights = randomWeights(TINY_LLAMA, 5);
    // Qwen2's biases on query, key and value.
    const h = TINY_LLAMA.hiddenSize;
    for (let layer = 0; layer < TINY_LLAMA.numLayers; layer++) {
      for (const [name, size] of [['q_proj', 48], ['k_proj', 12], ['v_proj', 12]] as const) {
        llamaWeights[`layers.${layer}.self_attn.${name}.bias`] = { shape: [size], data: Float32Array.from({ length: size }, (_, i) => Math.sin(i + layer + h) * 0.2) };
      }
    }
    const llama = await writeCheckpoint(join(directory, 'llama'), TINY_LLAMA, llamaWeights, { prefix: 'model.' });
    const config = readCheckpointConfig(llama)!;
    // One shard, prompt read in two pieces: rotary positions continue across the cache.
    const shard = await DecoderShard.load({ checkpoint: llama, config, plan: planSharding(config), stage: 0, rank: 0 });
    const prompt = [3, 99, 14, 15, 92, 65, 35, 89, 79];
    const reference = referenceLogits(TINY_LLAMA, llamaWeights, prompt);
    await shard.forward({ step: 0, sequences: [{ id: 0, past: 0, count: 5 }], released: [], tokens: Int32Array.from(prompt.slice(0, 5)) });
    const rest = (await shard.forward({ step: 1, sequences: [{ id: 0, past: 5, count: 4 }], released: [], tokens: Int32Array.from(prompt.slice(5)), logits: true })) as { logits: Float32Array };
    const wanted = reference[prompt.length - 1];
    const scale = Math.max(...wanted.map(Math.abs));
    for (let v = 0; v < wanted.length; v++) expect(Math.abs(rest.logits[v] - wanted[v])).toBeLessThan(1e-4 * scale + 1e-5);
    // Cut two ways in each layer (one key/value head per rank) and across two stages.
    const prompts = [prompt, [1, 2], [50, 60, 70, 80, 90, 100, 0, 10, 20, 30, 40, 5]];
    await using replica = await ModelReplica.create({ checkpoint: llama, tensorParallel: 2, pipelineParallel: 2, maxTokensPerStep: 8 });
    const generated = await replica.generate(prompts.map((tokens) => ({ tokens, maxNewTokens: 5 })));
    expect(generated.map((generation) => generation.tokens)).toEqual(prompts.map((tokens) => referenceGenerate(TINY_LLAMA, llamaWeights, tokens, 5)));
  });

  it("a Mistral-style sliding window: the reference's tokens, cut 2 × 2, prompts and generations past the window", async () => {
    const config = { ...TINY_LLAMA, slidingWindow: 5 };
    const mistralWeights = randomWeights(config, 17);
    const path = await writeCheckpoint(join(directory, 'mistral'), config, mistralWeights, { prefix: 'model.' });
    expect(readCheckpointConfig(path)).toMatchObject({ slidingWindow: 5 });
    // Prompts longer than the window, read in pieces (maxTokensPerStep 4), then 6 tokens each.
    const prompts = [[3, 99, 14, 15, 92, 65, 35, 89, 79], [1, 2], [50, 60, 70, 80, 90, 100, 0]];
    await using replica = await ModelReplica.create({ checkpoint: path, tensorParallel: 2, pipelineParallel: 2, maxTokensPerStep: 4 });
    const generated = await replica.generate(prompts.map((tokens) => ({ tokens, maxNewTokens: 6 })));
    const wanted = prompts.map((tokens) => referenceGenerate(config, mistralWeights, tokens, 6));
    expect(generated.map((generation) => generation.tokens)).toEqual(wanted);
    // The window matters: without it the same weights generate otherwise.
    expect(prompts.map((tokens) => referenceGenerate({ ...config, slidingWindow: 0 }, mistralWeights, tokens, 6))).not.toEqual(wanted);
  });

  it('one shard with a key/value cache gives the reference logits, prompt read whole or in pieces', async () => {
    const config = TINY;
    const shard = await DecoderShard.load({ checkpoint, config, plan: planSharding(config), stage: 0, rank: 0 });
    const prompt = PROMPTS[2];
    const reference = referenceLogits(config, weights, prompt);
    // Two sequences in one step: the prompt whole (id 0), and its first 4 tokens (id 1).
    const first = (await shard.forward({ step: 0, sequences: [{ id: 0, past: 0, count: prompt.length }, { id: 1, past: 0, count: 4 }], released: [], tokens: Int32Array.from([...prompt, ...prompt.slice(0, 4)]), logits: true })) as { logits: Float32Array };
    const close = (actual: Float32Array, wanted: number[]) => {
      const scale = Math.max(...wanted.map(Math.abs));
      for (let v = 0; v < wanted.length; v++) expect(Math.abs(actual[v] - wanted[v])).toBeLessThan(1e-4 * scale + 1e-5);
    };
    close(first.logits.subarray(0, config.vocabSize), reference[prompt.length - 1]);
    close(first.logits.subarray(config.vocabSize), reference[3]);
    // Sequence 1 reads the rest of the prompt from its cache, one token then six.
    const second = (await shard.forward({ step: 1, sequences: [{ id: 1, past: 4, count: 1 }], released: [0], tokens: Int32Array.from([prompt[4]]), logits: true })) as { logits: Float32Array };
    close(second.logits, reference[4]);
    const third = (await shard.forward({ step: 2, sequences: [{ id: 1, past: 5, count: 6 }], released: [], tokens: Int32Array.from(prompt.slice(5)), logits: true })) as { logits: Float32Array };
    close(third.logits, reference[prompt.length - 1]);
    expect(shard.cachedSequences).toBe(1);
    await expect(shard.forward({ step: 3, sequences: [{ id: 1, past: 3, count: 1 }], released: [], tokens: Int32Array.from([1]) })).rejects.toMatchObject({ code: 'ERR_SEQUENCE_STATE' });
  });

  it('tensor 2 × pipeline 2 generates what the plain reference generates, with continuous batching', async () => {
    await using replica = await ModelReplica.create({ checkpoint, tensorParallel: 2, pipelineParallel: 2, maxTokensPerStep: 9, maxSequencesPerStep: 3 });
    // Two calls at once: their sequences share steps; prompts longer than 9 tokens are read in pieces.
    const [first, second] = await Promise.all([
      replica.generate(PROMPTS.slice(0, 3).map((tokens) => ({ tokens, maxNewTokens: 6 }))),
      replica.generate(PROMPTS.slice(3).map((tokens) => ({ tokens, maxNewTokens: 6 }))),
    ]);
    expect([...first, ...second].map((generation) => generation.tokens)).toEqual(expected);
    expect(first.every((generation) => generation.finishReason === 'length')).toBe(true);
    const stats = replica.stats();
    expect(stats).toMatchObject({ generatedTokens: 30, promptTokens: PROMPTS.flat().length, waiting: 0, running: 0 });
    // Fewer steps than one per sequence per token: sequences shared them.
    expect(stats.steps).toBeLessThan(30);
    // A stop token ends a sequence early and is kept.
    const stop = expected[0][2];
    const [stopped] = await replica.generate([{ tokens: PROMPTS[0], maxNewTokens: 6, stopTokens: [stop] }]);
    expect(stopped.tokens).toEqual(expected[0].slice(0, expected[0].indexOf(stop) + 1));
    expect(stopped.finishReason).toBe('stop');
    // minNewTokens: before it, a stop token cannot be picked (the next best is) and nothing ends the generation.
    const [held] = await replica.generate([{ tokens: PROMPTS[0], maxNewTokens: 6, minNewTokens: 4, stopTokens: [stop], stop: () => true }]);
    const firstStop = expected[0].indexOf(stop);
    expect(held.tokens.slice(0, firstStop)).toEqual(expected[0].slice(0, firstStop));
    expect(held.tokens.slice(0, 4)).not.toContain(stop);
    expect(held.tokens.length).toBe(4);
    expect(held.finishReason).toBe('stop');
    await expect(replica.generate([{ tokens: PROMPTS[0], maxNewTokens: 3, minNewTokens: 4 }])).rejects.toThrow(/minNewTokens must be an integer from 0 to maxNewTokens \(3\)/);
  });

  it("scores prompts: each token's log-probability given those before, read in pieces, cut across tensor ranks", async () => {
    // Four tokens a step: prompts are read in pieces, so a piece's last target is the next piece's first token.
    await using replica = await ModelReplica.create({ checkpoint, tensorParallel: 2, maxTokensPerStep: 4, prefixBlockTokens: 4 });
    const generations = await replica.generate(PROMPTS.map((tokens) => ({ tokens, maxNewTokens: 1, promptLogprobs: true })));
    generations.forEach((generation, index) => {
      const prompt = PROMPTS[index];
      const logits = referenceLogits(TINY, weights, prompt);
      const wanted = prompt.slice(1).map((token, position) => {
        const row = logits[position];
        const maximum = Math.max(...row);
        return row[token] - maximum - Math.log(row.reduce((sum, value) => sum + Math.exp(value - maximum), 0));
      });
      expect(generation.promptLogprobs).toHaveLength(prompt.length - 1);
      generation.promptLogprobs!.forEach((logprob, position) => expect(Math.abs(logprob - wanted[position])).toBeLessThan(1e-4));
      expect(generation.tokens).toEqual(expected[index].slice(0, 1));
    });
    // A prompt read from a cached prefix would skip positions: scored prompts are read whole.
    const [again] = await replica.generate([{ tokens: PROMPTS[2], maxNewTokens: 1, promptLogprobs: true }]);
    expect(replica.stats().reusedPromptTokens).toBe(0);
    again.promptLogprobs!.forEach((logprob, position) => expect(Math.abs(logprob - generations[2].promptLogprobs![position])).toBeLessThan(1e-4));
    await expect(replica.generate([{ tokens: PROMPTS[0], promptLogprobs: 'yes' as never }])).rejects.toThrow(/promptLogprobs must be a boolean/);
    // The k most likely tokens at each prompt position, from the two ranks' halves of the
    // vocabulary, sequences asking different k (or none) in the same steps.
    const asks = [5, undefined, 2, 1];
    const scored = await replica.generate(PROMPTS.map((tokens, index) => ({ tokens, maxNewTokens: 1, promptLogprobs: true, ...(asks[index] ? { promptTopLogprobs: asks[index] } : {}) })));
    scored.forEach((generation, index) => {
      const k = asks[index];
      if (!k) return expect(generation.promptTopLogprobs).toBeUndefined();
      const prompt = PROMPTS[index];
      const logits = referenceLogits(TINY, weights, prompt);
      expect(generation.promptTopLogprobs).toHaveLength(prompt.length - 1);
      generation.promptTopLogprobs!.forEach((entries, position) => {
        const row = logits[position];
        const maximum = Math.max(...row);
        const normalizer = maximum + Math.log(row.reduce((sum, value) => sum + Math.exp(value - maximum), 0));
        const best = row.map((value, token) => [value, token] as const).sort((a, b) => b[0] - a[0] || a[1] - b[1]).slice(0, k);
        expect(entries.map((entry) => entry.token)).toEqual(best.map(([, token]) => token));
        entries.forEach((entry, rank) => expect(Math.abs(entry.logprob - (best[rank][0] - normalizer))).toBeLessThan(1e-4));
        expect(Math.abs(generation.promptLogprobs![position] - (row[prompt[position + 1]] - normalizer))).toBeLessThan(1e-4);
      });
    });
    await expect(replica.generate([{ tokens: PROMPTS[0], promptTopLogprobs: 0 }])).rejects.toThrow(/promptTopLogprobs must be an integer from 1 to 20/);
    // The k most likely tokens at each generated position, most likely first (the greedy pick leads).
    const [topped] = await replica.generate([{ tokens: PROMPTS[3], maxNewTokens: 2, topLogprobs: 3 }]);
    const toppedLogits = referenceLogits(TINY, weights, [...PROMPTS[3], topped.tokens[0]]);
    expect(topped.topLogprobs).toHaveLength(2);
    topped.topLogprobs!.forEach((entries, index) => {
      const row = toppedLogits[PROMPTS[3].length - 1 + index];
      const maximum = Math.max(...row);
      const normalizer = maximum + Math.log(row.reduce((sum, value) => sum + Math.exp(value - maximum), 0));
      const best = row.map((value, token) => [value, token] as const).sort((a, b) => b[0] - a[0]).slice(0, 3);
      expect(entries.map((entry) => entry.token)).toEqual(best.map(([, token]) => token));
      entries.forEach((entry, rank) => expect(Math.abs(entry.logprob - (best[rank][0] - normalizer))).toBeLessThan(1e-4));
      expect(entries[0].token).toBe(topped.tokens[index]);
    });
    await expect(replica.generate([{ tokens: PROMPTS[0], topLogprobs: 21 }])).rejects.toThrow(/topLogprobs must be an integer from 1 to 20/);
    // Through the processor: rows gain promptLogprobs.
    const [row] = await buildLLMProcessor({ checkpoint, promptLogprobs: true, maxNewTokens: 1 })(fromItems([{ tokens: PROMPTS[0] }])).takeAll();
    Array.from(row.promptLogprobs as number[]).forEach((logprob, position) => expect(Math.abs(logprob - generations[0].promptLogprobs![position])).toBeLessThan(1e-4));
    // ... and promptTopLogprobs, as the replica reports them.
    const [toppedRow] = await buildLLMProcessor({ checkpoint, promptTopLogprobs: 5, maxNewTokens: 1 })(fromItems([{ tokens: PROMPTS[0] }])).takeAll();
    expect((toppedRow.promptTopLogprobs as Array<Array<{ token: number }>>).map((entries) => Array.from(entries, (entry) => entry.token))).toEqual(scored[0].promptTopLogprobs!.map((entries) => entries.map((entry) => entry.token)));
    expect(() => buildLLMProcessor({ checkpoint, promptTopLogprobs: 21 })).toThrow(/promptTopLogprobs must be an integer from 1 to 20/);
    // truncatePromptTokens keeps the last tokens of each prompt: the generation is the short prompt's.
    const [truncated] = await buildLLMProcessor({ checkpoint, truncatePromptTokens: 3, maxNewTokens: 4 })(fromItems([{ tokens: PROMPTS[2] }])).takeAll();
    expect(Array.from(truncated.generatedTokens as number[])).toEqual(referenceGenerate(TINY, weights, PROMPTS[2].slice(-3), 4));
    expect(truncated.promptTokens).toBe(3);
    expect(() => buildLLMProcessor({ checkpoint, truncatePromptTokens: 0 })).toThrow(/truncatePromptTokens must be a positive integer/);
  });

  it('stops at the checkpoint\'s end-of-sequence tokens unless a request names its own', async () => {
    const withEnd = await writeCheckpoint(join(directory, 'with-end'), TINY, weights);
    const end = expected[0][2];
    writeFileSync(join(withEnd, 'generation_config.json'), JSON.stringify({ eos_token_id: [end, 96] }));
    await using replica = await ModelReplica.create({ checkpoint: withEnd });
    expect(replica.stopTokens).toEqual([end, 96]);
    const [ended, unstopped] = await replica.generate([{ tokens: PROMPTS[0], maxNewTokens: 6 }, { tokens: PROMPTS[0], maxNewTokens: 6, stopTokens: [] }]);
    expect(ended).toMatchObject({ tokens: expected[0].slice(0, expected[0].indexOf(end) + 1), finishReason: 'stop' });
    expect(unstopped).toMatchObject({ tokens: expected[0], finishReason: 'length' });
    // The processor's ignoreEos: past the end-of-sequence tokens, to maxNewTokens.
    const rows = await buildLLMProcessor({ checkpoint: withEnd, maxNewTokens: 6 })(fromItems([{ tokens: PROMPTS[0] }])).takeAll();
    expect(rows[0].finishReason).toBe('stop');
    const [ignoring] = await buildLLMProcessor({ checkpoint: withEnd, maxNewTokens: 6, ignoreEos: true })(fromItems([{ tokens: PROMPTS[0] }])).takeAll();
    expect(Array.from(ignoring.generatedTokens as number[])).toEqual(expected[0]);
    expect(ignoring.finishReason).toBe('length');
    expect(() => buildLLMProcessor({ checkpoint: withEnd, ignoreEos: 1 as never })).toThrow(/ignoreEos must be a boolean/);
    // Stop token ids of the processor's own, or a row's (vLLM's stop_token_ids).
    const other = expected[0][1];
    const byOption = buildLLMProcessor({ checkpoint: withEnd, maxNewTokens: 6, stopTokens: [other] });
    const [optionRow, rowRow] = await byOption(fromItems([{ id: 0, tokens: PROMPTS[0] }, { id: 1, tokens: PROMPTS[0], stopTokens: [] }], { parallelism: 1 })).takeAll();
    expect(Array.from(optionRow.generatedTokens as number[])).toEqual(expected[0].slice(0, expected[0].indexOf(other) + 1));
    expect(Array.from(rowRow.generatedTokens as number[])).toEqual(expected[0]);
  });

  it('samples the same tokens for the same seed, however the model is cut', async () => {
    const sampling = { temperature: 0.8, topK: 20, seed: 11 };
    const requests = PROMPTS.map((tokens) => ({ tokens, maxNewTokens: 5, sampling }));
    let whole: number[][];
    {
      await using replica = await ModelReplica.create({ checkpoint });
      whole = (await replica.generate(requests)).map((generation) => generation.tokens);
      const other = (await replica.generate(requests.map((request) => ({ ...request, sampling: { ...sampling, seed: 12 } })))).map((generation) => generation.tokens);
      expect(other).not.toEqual(whole);
    }
    await using sharded = await ModelReplica.create({ checkpoint, tensorParallel: 2 });
    expect((await sharded.generate(requests)).map((generation) => generation.tokens)).toEqual(whole);
  });

  it('gives ranks kernel threads (numCpusPerRank or threadsPerRank) without changing a token', async () => {
    await using replica = await ModelReplica.create({ checkpoint, pipelineParallel: 2, numCpusPerRank: 2 });
    expect((await replica.generate(PROMPTS.map((tokens) => ({ tokens, maxNewTokens: 6 })))).map((generation) => generation.tokens)).toEqual(expected);
    await using threaded = await ModelReplica.create({ checkpoint, tensorParallel: 2, threadsPerRank: 3 });
    expect((await threaded.generate(PROMPTS.map((tokens) => ({ tokens, maxNewTokens: 6 })))).map((generation) => generation.tokens)).toEqual(expected);
    await expect(ModelReplica.create({ checkpoint, threadsPerRank: 0 })).rejects.toThrow(/threadsPerRank must be a positive integer/);
  });

  it('penalizes tokens already seen, across a pipeline, as a plain reference does', async () => {
    const sampling = { repetitionPenalty: 1.8, presencePenalty: 0.4, frequencyPenalty: 0.3 };
    // The reference: full logits each step, penalties applied by hand, then the most likely token.
    const penalizedReference = (prompt: number[], count: number) => {
      const tokens = [...prompt];
      const generated = new Map<number, number>();
      for (let step = 0; step < count; step++) {
        const logits = referenceLogits(TINY, weights, tokens).at(-1)!;
        for (const token of new Set(tokens)) logits[token] = logits[token] > 0 ? logits[token] / sampling.repetitionPenalty : logits[token] * sampling.repetitionPenalty;
        for (const [token, times] of generated) logits[token] -= sampling.presencePenalty + sampling.frequencyPenalty * times;
        const next = logits.indexOf(Math.max(...logits));
        tokens.push(next);
        generated.set(next, (generated.get(next) ?? 0) + 1);
      }
      return tokens.slice(prompt.length);
    };
    // Two stages, prompts read in pieces: the last stage learns each sequence's tokens from the steps.
    await using replica = await ModelReplica.create({ checkpoint, pipelineParallel: 2, maxTokensPerStep: 5 });
    const generated = await replica.generate(PROMPTS.map((tokens, index) => ({ tokens, maxNewTokens: 8, ...(index === 1 ? {} : { sampling }) })));
    const wanted = PROMPTS.map((tokens, index) => (index === 1 ? referenceGenerate(TINY, weights, tokens, 8) : penalizedReference(tokens, 8)));
    expect(generated.map((generation) => generation.tokens)).toEqual(wanted);
    // The penalties changed what was generated.
    expect(wanted).not.toEqual(PROMPTS.map((tokens) => referenceGenerate(TINY, weights, tokens, 8)));
    await expect(replica.generate([{ tokens: [1], sampling: { topp: 0.9 } as never }])).rejects.toThrow(/sampling has no parameter 'topp'/);
  });

  it('stops at the model\'s positions, and names what is wrong with a request', async () => {
    await using replica = await ModelReplica.create({ checkpoint, tensorParallel: 2 });
    const [long] = await replica.generate([{ tokens: Array.from({ length: 60 }, (_, i) => i % 90), maxNewTokens: 10 }]);
    expect(long).toMatchObject({ finishReason: 'max-positions', promptTokens: 60 });
    expect(long.tokens).toHaveLength(4);
    await expect(replica.generate([{ tokens: [1, 2, 97] }])).rejects.toMatchObject({ code: 'ERR_TOKEN', message: expect.stringMatching(/token 97 at position 2 is outside the vocabulary of 97/) });
    await expect(replica.generate([{ tokens: [] }])).rejects.toMatchObject({ code: 'ERR_PROMPT' });
    await expect(replica.generate([{ tokens: Array.from({ length: 64 }, () => 1) }])).rejects.toMatchObject({ code: 'ERR_PROMPT_TOO_LONG' });
    await expect(replica.generate([{ tokens: [1], sampling: { temperature: -1 } }])).rejects.toMatchObject({ code: 'ERR_SAMPLING' });
    // The replica still works after refusing them.
    expect((await replica.generate([{ tokens: PROMPTS[1], maxNewTokens: 6 }]))[0].tokens).toEqual(expected[1]);
  });

  it('keeps a 16-bit checkpoint in 16 bits: exactly the logits of its f32 widening, in about half the memory', async () => {
    const prompt = PROMPTS[2];
    const tokens = Int32Array.from([...prompt, ...prompt.slice(0, 4)]);
    const sequences = [{ id: 0, past: 0, count: prompt.length }, { id: 1, past: 0, count: 4 }];
    const logitsOf = async (shard: DecoderShard) => ((await shard.forward({ step: 0, sequences, released: [], tokens, logits: true })) as { logits: Float32Array }).logits;
    for (const dtype of ['BF16', 'F16'] as const) {
      const path = await writeCheckpoint(join(directory, `tiny-${dtype}`), TINY, weights, { prefix: 'transformer.', dtype });
      const config = readCheckpointConfig(path)!;
      // The cache in f32 for both: this compares the weights alone.
      const spec = { checkpoint: path, config, plan: planSharding(config), stage: 0, rank: 0, kvCacheDtype: 'f32' as const };
      const kept = await DecoderShard.load(spec);
      const widened = await DecoderShard.load({ ...spec, weightDtype: 'f32' });
      expect(await logitsOf(kept)).toEqual(await logitsOf(widened));
      // The tied head is the embedding itself, counted once; every matrix takes half, the vectors the same.
      expect(kept.weightBytes / widened.weightBytes).toBeGreaterThan(0.5);
      expect(kept.weightBytes / widened.weightBytes).toBeLessThan(0.55);
    }
    // Narrowing an f32 checkpoint rounds its matrices (only) to nearest even: the logits of an f32
    // checkpoint holding those rounded matrices.
    const config = readCheckpointConfig(checkpoint)!;
    const narrowed = await DecoderShard.load({ checkpoint, config, plan: planSharding(config), stage: 0, rank: 0, weightDtype: 'bf16', kvCacheDtype: 'f32' });
    const rounded: Weights = Object.fromEntries(Object.entries(weights).map(([name, tensor]) => [name, tensor.shape.length < 2 || name.endsWith('wpe.weight') ? tensor : { shape: tensor.shape, data: Float32Array.from(tensor.data, (value) => bf16ToFloat(floatToBf16(value))) }]));
    const roundedPath = await writeCheckpoint(join(directory, 'tiny-rounded'), TINY, rounded, { prefix: 'transformer.' });
    const reference = await DecoderShard.load({ checkpoint: roundedPath, config, plan: planSharding(config), stage: 0, rank: 0 });
    expect(await logitsOf(narrowed)).toEqual(await logitsOf(reference));
    // A value f16 cannot hold is refused, naming the tensor, not read as infinity.
    const large = structuredClone(weights);
    large['h.1.mlp.c_fc.weight'].data[5] = 1e5;
    const largePath = await writeCheckpoint(join(directory, 'tiny-large'), TINY, large);
    await expect(DecoderShard.load({ checkpoint: largePath, config, plan: planSharding(config), stage: 0, rank: 0, weightDtype: 'f16' }))
      .rejects.toMatchObject({ code: 'ERR_WEIGHT_RANGE', tensor: 'h.1.mlp.c_fc.weight' });
    await expect(ModelReplica.create({ checkpoint, weightDtype: 'int4' as never })).rejects.toThrow(/weightDtype must be 'auto', 'f32', 'bf16', 'f16' or 'int8', got "int4"/);
  });

  it('runs a bf16 Llama-layout checkpoint cut 2 × 2 in 16 bits, cache included, token for token the reference on its values', async () => {
    const llamaWeights = randomWeights(TINY_LLAMA, 11);
    const path = await writeCheckpoint(join(directory, 'llama-bf16'), TINY_LLAMA, llamaWeights, { prefix: 'model.', dtype: 'BF16' });
    // The reference runs on the values the file holds, and rounds keys and values as a bf16 cache does.
    const bf16 = (value: number) => bf16ToFloat(floatToBf16(value));
    const stored: Weights = Object.fromEntries(Object.entries(llamaWeights).map(([name, tensor]) => [name, { shape: tensor.shape, data: Float32Array.from(tensor.data, bf16) }]));
    await using replica = await ModelReplica.create({ checkpoint: path, tensorParallel: 2, pipelineParallel: 2, maxTokensPerStep: 6 });
    expect([replica.weightDtype, replica.kvCacheDtype]).toEqual(['bf16', 'bf16']);
    const prompts = [[3, 99, 14, 15, 92], [1, 2], [50, 60, 70, 80, 90, 100, 0, 10]];
    const generated = await replica.generate(prompts.map((tokens) => ({ tokens, maxNewTokens: 6 })));
    expect(generated.map((generation) => generation.tokens)).toEqual(prompts.map((tokens) => referenceGenerate(TINY_LLAMA, stored, tokens, 6, [], { cacheRounding: bf16 })));
  });

  it('quantizes matrices to int8 per row when asked: a quarter of the bytes, the dequantized reference\'s tokens', async () => {
    const llamaWeights = randomWeights(TINY_LLAMA, 31);
    const path = await writeCheckpoint(join(directory, 'llama-int8'), TINY_LLAMA, llamaWeights, { prefix: 'model.' });
    // The reference runs on each matrix as int8 stands for it, the cache rounded to bf16 (int8's default).
    const config = checkDecoderConfig(TINY_LLAMA);
    const vectors = new Set(['norm.weight']);
    const dequantized: Weights = Object.fromEntries(Object.entries(llamaWeights).map(([name, tensor]) => {
      if (tensor.shape.length < 2 || vectors.has(name)) return [name, tensor];
      const [rows, columns] = tensor.shape;
      const quantized = quantizeRows(tensor.data, rows, columns);
      return [name, { shape: tensor.shape, data: Float32Array.from(quantized.values, (value, index) => value * quantized.scales[Math.floor(index / columns)]) }];
    }));
    const bf16 = (value: number) => bf16ToFloat(floatToBf16(value));
    await using replica = await ModelReplica.create({ checkpoint: path, tensorParallel: 2, pipelineParallel: 2, weightDtype: 'int8' });
    expect([replica.weightDtype, replica.kvCacheDtype]).toEqual(['int8', 'bf16']);
    const prompts = [[3, 99, 14, 15, 92], [1, 2], [50, 60, 70, 80, 90, 100, 0, 10]];
    const generated = await replica.generate(prompts.map((tokens) => ({ tokens, maxNewTokens: 6 })));
    expect(generated.map((generation) => generation.tokens)).toEqual(prompts.map((tokens) => referenceGenerate(TINY_LLAMA, dequantized, tokens, 6, [], { cacheRounding: bf16 })));
    // A quarter of f32's bytes for the matrices, plus a scale per row.
    const plan = planSharding(config);
    const int8 = await DecoderShard.load({ checkpoint: path, config, plan, stage: 0, rank: 0, weightDtype: 'int8' });
    const f32 = await DecoderShard.load({ checkpoint: path, config, plan, stage: 0, rank: 0 });
    expect(int8.weightBytes / f32.weightBytes).toBeLessThan(0.3);
    // GPT-2's Conv1D matrices ([in, out]) are quantized per output once in Linear's layout.
    const dequantize = (data: Float32Array, rows: number, columns: number) => {
      const quantized = quantizeRows(data, rows, columns);
      return Float32Array.from(quantized.values, (value, index) => value * quantized.scales[Math.floor(index / columns)]);
    };
    const transposed = (data: Float32Array, rows: number, columns: number) => Float32Array.from({ length: data.length }, (_, index) => data[(index % rows) * columns + Math.floor(index / rows)]);
    const gpt2: Weights = Object.fromEntries(Object.entries(weights).map(([name, tensor]) => {
      if (tensor.shape.length < 2 || name === 'wpe.weight') return [name, tensor];
      const [rows, columns] = tensor.shape;
      if (name === 'wte.weight') return [name, { shape: tensor.shape, data: dequantize(tensor.data, rows, columns) }];
      // [in, out] -> [out, in], quantized per row, and back.
      return [name, { shape: tensor.shape, data: transposed(dequantize(transposed(tensor.data, rows, columns), columns, rows), columns, rows) }];
    }));
    const tinyConfig = readCheckpointConfig(checkpoint)!;
    const shard = await DecoderShard.load({ checkpoint, config: tinyConfig, plan: planSharding(tinyConfig), stage: 0, rank: 0, weightDtype: 'int8', kvCacheDtype: 'f32' });
    const prompt = PROMPTS[2];
    const result = (await shard.forward({ step: 0, sequences: [{ id: 0, past: 0, count: prompt.length }], released: [], tokens: Int32Array.from(prompt), logits: true })) as { logits: Float32Array };
    const wanted = referenceLogits(TINY, gpt2, prompt).at(-1)!;
    const scale = Math.max(...wanted.map(Math.abs));
    wanted.forEach((value, index) => expect(Math.abs(result.logits[index] - value)).toBeLessThan(1e-4 * scale + 1e-5));
  });

  it('keeps the key/value cache in f16, bf16 or fp8 when asked: half or a quarter of the bytes, the rounded reference\'s tokens', async () => {
    const f16 = (value: number) => f16ToFloat(floatToF16(value));
    await using replica = await ModelReplica.create({ checkpoint, kvCacheDtype: 'f16', pipelineParallel: 2, maxTokensPerStep: 5 });
    expect([replica.weightDtype, replica.kvCacheDtype]).toEqual(['f32', 'f16']);
    expect((await replica.generate(PROMPTS.map((tokens) => ({ tokens, maxNewTokens: 6 })))).map((generation) => generation.tokens))
      .toEqual(PROMPTS.map((tokens) => referenceGenerate(TINY, weights, tokens, 6, [], { cacheRounding: f16 })));
    {
      // 8-bit e4m3fn entries (3 mantissa bits), cut two ways with prompts in pieces.
      await using eight = await ModelReplica.create({ checkpoint, kvCacheDtype: 'fp8', tensorParallel: 2, maxTokensPerStep: 5 });
      expect(eight.kvCacheDtype).toBe('fp8');
      expect((await eight.generate(PROMPTS.map((tokens) => ({ tokens, maxNewTokens: 6 })))).map((generation) => generation.tokens))
        .toEqual(PROMPTS.map((tokens) => referenceGenerate(TINY, weights, tokens, 6, [], { cacheRounding: roundToFp8 })));
    }
    // The same sequences take half the bytes in a 16-bit cache.
    const config = readCheckpointConfig(checkpoint)!;
    const message = { step: 0, sequences: [{ id: 0, past: 0, count: 11 }], released: [], tokens: Int32Array.from(PROMPTS[2]) };
    const bytes = async (kvCacheDtype: 'f32' | 'bf16' | 'fp8') => {
      const shard = await DecoderShard.load({ checkpoint, config, plan: planSharding(config), stage: 0, rank: 0, kvCacheDtype });
      await shard.forward(message);
      return shard.cacheBytes;
    };
    expect(await bytes('bf16')).toBe((await bytes('f32')) / 2);
    expect(await bytes('fp8')).toBe((await bytes('f32')) / 4);
    await expect(ModelReplica.create({ checkpoint, kvCacheDtype: 'f8' as never })).rejects.toThrow(/kvCacheDtype must be 'auto', 'f32', 'bf16', 'f16' or 'fp8', got "f8"/);
  });

  it('refuses checkpoints that do not match, with the file or tensor named', async () => {
    await expect(ModelReplica.create({ checkpoint: join(directory, 'missing') })).rejects.toBeInstanceOf(ModelLoadError);
    const wrong = join(directory, 'wrong');
    await writeCheckpoint(wrong, TINY, weights);
    writeFileSync(join(wrong, 'config.json'), JSON.stringify({ model_type: 'gpt2', vocab_size: 97, n_embd: 32, n_layer: 4, n_head: 4, n_inner: 48, n_positions: 64 }));
    const error = await ModelReplica.create({ checkpoint: wrong }).catch((caught: unknown) => caught);
    expect(error).toBeInstanceOf(ModelLoadError);
    expect(error).toMatchObject({ code: 'ERR_MODEL_SHAPE', tensor: 'h.0.mlp.c_fc.weight' });
    writeFileSync(join(wrong, 'config.json'), JSON.stringify({ model_type: 'falcon' }));
    await expect(ModelReplica.create({ checkpoint: wrong })).rejects.toMatchObject({ code: 'ERR_MODEL_ARCHITECTURE' });
    // No rank is left behind by a replica that failed to start.
    await until(() => state().actors.every((actor) => actor.className !== 'ShardWorker' || actor.state === 'dead'), 'the failed replicas\' ranks to end');
  });

  it('fails its requests, and does not hang, when a rank dies mid-generation', async () => {
    const replica = await ModelReplica.create({ checkpoint, tensorParallel: 2, pipelineParallel: 2 });
    const running = replica.generate(PROMPTS.map((tokens) => ({ tokens, maxNewTokens: 40 })));
    await until(() => replica.stats().steps > 3, 'a few steps');
    const ranks = replica.ranks();
    expect(ranks.map((rank) => [rank.stage, rank.rank])).toEqual([[0, 0], [0, 1], [1, 0], [1, 1]]);
    const pids = ranks.map((rank) => state().actors.find((actor) => actor.actorId === rank.actorId)!.pid!);
    // Ranks started for the replica load only their shard's modules, not the public API (no data
    // layer, no arrow): a prestarted worker that a rank took had loaded it already.
    const light = pids.filter((pid) => readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0').includes('TRELLIS_WORKER_PRELOAD=0'));
    expect(light.length).toBeGreaterThanOrEqual(2);
    process.kill(pids[3], 'SIGKILL');
    await expect(running).rejects.toBeInstanceOf(ActorDiedError);
    await expect(replica.generate([{ tokens: [1] }])).rejects.toBeInstanceOf(ActorDiedError);
    await replica.close();
    // Closed means gone: no rank's process is left.
    expect(pids.filter(isAlive)).toEqual([]);
  });

  it("counts the tokens a processor's engines read and generate in its progress", async () => {
    const processor = buildLLMProcessor({ checkpoint, tensorParallel: 2, batchSize: 2, maxNewTokens: 6 });
    const reporter = new RecordingReporter();
    const rows = await processor(fromItems(PROMPTS.map((tokens, id) => ({ id, tokens })))).takeAll({ progress: reporter });
    const metrics = reporter.finished!.progress.operators.at(-1)!.metrics!;
    expect(metrics.generatedTokens).toBe(rows.reduce((sum, row) => sum + (row.generatedTokens as number[]).length, 0));
    expect(metrics.promptTokens).toBe(PROMPTS.reduce((sum, prompt) => sum + prompt.length, 0));
    // Shown with a rate over the job's time (here as if it took 2 s).
    expect(formatOperatorLine(reporter.finished!.progress.operators.at(-1)!, 2000)).toContain(`generatedTokens ${metrics.generatedTokens} (${(metrics.generatedTokens / 2).toFixed(1)}/s)`);
  });

  it('rebuilds a processor\'s replica when a rank dies, and the job\'s output is unchanged', async () => {
    const processor = buildLLMProcessor({ checkpoint, tensorParallel: 2, pipelineParallel: 2, batchSize: 1, maxNewTokens: 6 });
    const reporter = new RecordingReporter();
    const job = processor(fromItems(PROMPTS.map((tokens, id) => ({ id, tokens })))).takeAll({ progress: reporter });
    const before = new Set(state().actors.map((actor) => actor.actorId));
    const ranks = () => state().actors.filter((actor) => actor.className === 'ShardWorker' && !before.has(actor.actorId));
    await until(() => ranks().length === 4 && ranks().every((actor) => actor.state === 'alive'), 'the engine\'s ranks');
    process.kill(ranks()[1].pid!, 'SIGKILL');
    const rows = await job;
    rows.sort((a, b) => (a.id as number) - (b.id as number));
    expect(rows.map((row) => Array.from(row.generatedTokens as number[]))).toEqual(expected);
    // A second set of four ranks replaced the first.
    expect(ranks().length).toBe(8);
    // The engine's counters went on across the rebuild: at least every token the rows hold.
    const generated = rows.reduce((sum, row) => sum + (row.generatedTokens as number[]).length, 0);
    expect(reporter.finished!.progress.operators.at(-1)!.metrics!.generatedTokens).toBeGreaterThanOrEqual(generated);
  });

  it('fails a processor\'s job, naming the cause, when a rank dies with no restarts left, and leaves no rank behind', async () => {
    const processor = buildLLMProcessor({ checkpoint, tensorParallel: 2, pipelineParallel: 2, batchSize: 2, maxNewTokens: 50, maxReplicaRestarts: 0 });
    const job = processor(fromItems(Array.from({ length: 40 }, (_, id) => ({ id, tokens: [id % 90, 3, 4] })))).takeAll();
    const outcome = job.then(() => undefined, (error: unknown) => error);
    const before = new Set(state().actors.map((actor) => actor.actorId));
    const ranks = () => state().actors.filter((actor) => actor.className === 'ShardWorker' && !before.has(actor.actorId));
    await until(() => ranks().length === 4 && ranks().every((actor) => actor.state === 'alive'), 'the engine\'s ranks');
    process.kill(ranks()[2].pid!, 'SIGKILL');
    const error = await outcome;
    expect(error).toBeInstanceOf(DataError);
    // Killed while loading or while generating: either way the job says which actor died.
    expect((error as Error).message).toMatch(/ActorDiedError: .*actor ShardWorker died/);
    // The engine's process went with the job; its ranks end with it (no handle to them is left).
    await until(() => ranks().every((actor) => actor.state === 'dead'), 'the ranks to end');
  });

  it('takes text prompts and gives text back, through the checkpoint\'s tokenizer', async () => {
    // Ids beyond the tokenizer's have no text.
    const { path: textModelPath, config, weights: textWeights, tokenizer } = await textModel('text', 9);
    const prompts = ['Hello world', 'the cat sat', "it's 42!"];
    const processor = buildLLMProcessor({ checkpoint: textModelPath, promptColumn: 'prompt', tensorParallel: 2, maxNewTokens: 5 });
    const rows = await processor(fromItems(prompts.map((prompt, id) => ({ id, prompt })))).takeAll();
    rows.sort((a, b) => (a.id as number) - (b.id as number));
    prompts.forEach((prompt, index) => {
      const wanted = referenceGenerate(config, textWeights, tokenizer.encode(prompt), 5);
      expect(Array.from(rows[index].generatedTokens as number[])).toEqual(wanted);
      expect(rows[index].generatedText).toBe(tokenizer.decode(wanted.filter((token) => token < tokenizer.vocabSize)));
      expect(rows[index].promptTokens).toBe(tokenizer.encode(prompt).length);
    });
    // A prompt column without text is named.
    await expect(processor(fromItems([{ id: 0, prompt: 7 }])).takeAll()).rejects.toThrow(/column 'prompt' must hold the prompt's text, got number/);
  });

  it('reads a shared prompt prefix once: later prompts start from a copy, and generate what the reference does', async () => {
    const llamaWeights = randomWeights(TINY_LLAMA, 23);
    const path = await writeCheckpoint(join(directory, 'llama-prefix'), TINY_LLAMA, llamaWeights, { prefix: 'model.' });
    const shared = [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11, 12];
    // Suffixes of 1 to 5 tokens, and the shared part alone (its last block is read: the last token needs logits).
    const prompts = [[40], [41, 42], [43, 44, 45], [46, 47, 48, 49], [50, 51, 52, 53, 54], []].map((suffix) => [...shared, ...suffix]);
    const wanted = prompts.map((tokens) => referenceGenerate(TINY_LLAMA, llamaWeights, tokens, 5));
    const requests = prompts.map((tokens) => ({ tokens, maxNewTokens: 5 }));
    {
      await using replica = await ModelReplica.create({ checkpoint: path, tensorParallel: 2, pipelineParallel: 2, prefixBlockTokens: 4 });
      expect((await replica.generate(requests)).map((generation) => generation.tokens)).toEqual(wanted);
      // The first prompt reads the 12 shared tokens; the others wait a step, then copy 12 (the last,
      // the shared part alone, 11: all but the token it must read).
      expect(replica.stats()).toMatchObject({ reusedPromptTokens: 4 * 12 + 11, promptTokens: prompts.flat().length });
      // Later prompts start from finished sequences' kept caches, each from its own earlier run: all but its last token.
      expect((await replica.generate(requests.slice(0, 2))).map((generation) => generation.tokens)).toEqual(wanted.slice(0, 2));
      expect(replica.stats().reusedPromptTokens).toBe(4 * 12 + 11 + 12 + 13);
      expect(replica.stats().retainedSequences).toBeGreaterThan(0);
      // Penalized sampling needs the whole prompt's tokens on the last stage: it reads them all.
      const [penalized] = await replica.generate([{ tokens: prompts[0], maxNewTokens: 3, sampling: { repetitionPenalty: 1.01 } }]);
      expect(penalized.tokens).toHaveLength(3);
      expect(replica.stats().reusedPromptTokens).toBe(4 * 12 + 11 + 12 + 13);
    }
    {
      // Keeping no finished caches: sharing among prompts running together only.
      await using replica = await ModelReplica.create({ checkpoint: path, prefixBlockTokens: 4, prefixCacheTokens: 0 });
      expect((await replica.generate(requests)).map((generation) => generation.tokens)).toEqual(wanted);
      const reused = replica.stats().reusedPromptTokens;
      expect(reused).toBe(4 * 12 + 11);
      await replica.generate(requests.slice(0, 1));
      expect(replica.stats()).toMatchObject({ reusedPromptTokens: reused, retainedSequences: 0 });
    }
    {
      await using replica = await ModelReplica.create({ checkpoint: path, prefixCaching: false });
      expect((await replica.generate(requests)).map((generation) => generation.tokens)).toEqual(wanted);
      expect(replica.stats().reusedPromptTokens).toBe(0);
    }
    await expect(ModelReplica.create({ checkpoint: path, prefixCacheTokens: -1 })).rejects.toThrow(/prefixCacheTokens must be an integer >= 0/);
  });

  it('embeds prompts (last-position or mean pooling, normalized or not), alongside generation, cut 2 × 2', async () => {
    const llamaWeights = randomWeights(TINY_LLAMA, 29);
    const path = await writeCheckpoint(join(directory, 'llama-embed'), TINY_LLAMA, llamaWeights, { prefix: 'model.' });
    const texts = [[3, 99, 14, 15, 92, 65, 35, 89, 79, 4, 8], [1, 2], [50, 60, 70, 80, 90, 100, 0]];
    const closeTo = (actual: Float32Array, wanted: number[]) => {
      expect(actual).toHaveLength(wanted.length);
      const scale = Math.max(...wanted.map(Math.abs));
      actual.forEach((value, index) => expect(Math.abs(value - wanted[index])).toBeLessThan(1e-4 * scale + 1e-5));
    };
    const unit = (vector: number[]) => {
      const length = Math.sqrt(vector.reduce((sum, value) => sum + value * value, 0));
      return vector.map((value) => value / length);
    };
    // Prompts read in pieces (maxTokensPerStep 4), with a generation running in the same steps.
    await using replica = await ModelReplica.create({ checkpoint: path, tensorParallel: 2, pipelineParallel: 2, maxTokensPerStep: 4 });
    const [last, mean, raw, generated] = await Promise.all([
      replica.embed(texts.map((tokens) => ({ tokens }))),
      replica.embed(texts.map((tokens) => ({ tokens, pooling: 'mean' as const }))),
      replica.embed([{ tokens: texts[0], normalize: false }]),
      replica.generate([{ tokens: texts[1], maxNewTokens: 4 }]),
    ]);
    texts.forEach((tokens, index) => {
      const hidden = referenceFinalHidden(TINY_LLAMA, llamaWeights, tokens);
      closeTo(last[index].vector, unit(hidden.at(-1)!));
      closeTo(mean[index].vector, unit(hidden[0].map((_, column) => hidden.reduce((sum, row) => sum + row[column], 0) / hidden.length)));
      expect(last[index].promptTokens).toBe(tokens.length);
    });
    closeTo(raw[0].vector, referenceFinalHidden(TINY_LLAMA, llamaWeights, texts[0]).at(-1)!);
    expect(generated[0].tokens).toEqual(referenceGenerate(TINY_LLAMA, llamaWeights, texts[1], 4));
    // An embedding may fill every position; a bad pooling is named.
    const full = Array.from({ length: TINY_LLAMA.maxPositions }, (_, index) => index % 90);
    expect((await replica.embed([{ tokens: full }]))[0].vector).toHaveLength(TINY_LLAMA.hiddenSize);
    await expect(replica.embed([{ tokens: [1], pooling: 'max' as never }])).rejects.toThrow(/pooling must be 'last' or 'mean'/);
    // Through the processor: rows gain their embedding.
    const processor = buildLLMProcessor({ checkpoint: path, task: 'embed', pooling: 'mean', tensorParallel: 2 });
    const rows = await processor(fromItems(texts.map((tokens, id) => ({ id, tokens })))).takeAll();
    rows.sort((a, b) => (a.id as number) - (b.id as number));
    rows.forEach((row, index) => closeTo(Float32Array.from(row.embedding as number[]), Array.from(mean[index].vector)));
    expect(() => buildLLMProcessor({ checkpoint: path, pooling: 'mean' })).toThrow(/pooling and normalize apply to task 'embed'/);
  });

  it('bounds the cache: sequences reserve what they know and grow a token at a time; when full, the latest is preempted and reads again (the same tokens); kept prefixes make room; one too large is refused', async () => {
    // Prompts of 1 to 11 tokens and 12 new ones need 13 to 23 positions each, reserved in cache
    // blocks of 16: a block, or two once past 16. 48 (three blocks) never holds all five.
    const twelve = PROMPTS.map((prompt) => referenceGenerate(TINY, weights, prompt, 12));
    await using replica = await ModelReplica.create({ checkpoint, maxCacheTokens: 48, prefixBlockTokens: 4, prefixCacheTokens: 100 });
    const { tokens, mostReserved } = await generateWatched(replica, PROMPTS.map((tokens) => ({ tokens, maxNewTokens: 12 })));
    expect(tokens).toEqual(twelve);
    // More start at once than their most would allow (their prompts fit), and as they grow the latest are preempted.
    expect(replica.stats().peakRunning).toBeGreaterThan(2);
    expect(replica.stats().preemptions).toBeGreaterThan(0);
    expect(mostReserved).toBeLessThanOrEqual(48);
    // Sampled, the same seeds give the same tokens however often sequences were preempted.
    const sampled = PROMPTS.map((tokens, index) => ({ tokens, maxNewTokens: 12, sampling: { temperature: 0.8, topK: 20, seed: 3 + index } }));
    const preemptedBefore = replica.stats().preemptions;
    const tight = (await replica.generate(sampled)).map((generation) => generation.tokens);
    expect(replica.stats().preemptions).toBeGreaterThan(preemptedBefore);
    {
      await using roomy = await ModelReplica.create({ checkpoint });
      expect((await roomy.generate(sampled)).map((generation) => generation.tokens)).toEqual(tight);
      expect(roomy.stats().preemptions).toBe(0);
    }
    {
      // Reserving each sequence's most instead: none is preempted, and fewer run at once.
      await using reserving = await ModelReplica.create({ checkpoint, maxCacheTokens: 48, cacheReservation: 'most' });
      expect((await reserving.generate(PROMPTS.map((tokens) => ({ tokens, maxNewTokens: 12 })))).map((generation) => generation.tokens)).toEqual(twelve);
      expect(reserving.stats().preemptions).toBe(0);
      await expect(ModelReplica.create({ checkpoint, cacheReservation: 'some' as never })).rejects.toThrow(/cacheReservation must be 'grow' or 'most'/);
    }
    {
      // Cut into a pipeline, with steps in flight: preempted sequences are dropped on every rank.
      await using piped = await ModelReplica.create({ checkpoint, pipelineParallel: 2, maxCacheTokens: 48 });
      expect((await piped.generate(PROMPTS.map((tokens) => ({ tokens, maxNewTokens: 12 })))).map((generation) => generation.tokens)).toEqual(twelve);
      expect(piped.stats().preemptions).toBeGreaterThan(0);
    }
    // Finished sequences kept as prefixes hold positions; new sequences push them out to start.
    const kept = replica.stats().retainedSequences;
    expect(kept).toBeGreaterThan(0);
    expect(replica.stats().reservedCacheTokens).toBeLessThanOrEqual(48);
    expect((await replica.generate([{ tokens: PROMPTS[2], maxNewTokens: 6 }, { tokens: PROMPTS[4], maxNewTokens: 6 }])).map((generation) => generation.tokens)).toEqual([expected[2], expected[4]]);
    expect(replica.stats().retainedSequences).toBeLessThan(kept + 2);
    await expect(replica.generate([{ tokens: PROMPTS[2], maxNewTokens: 40 }])).rejects.toMatchObject({ code: 'ERR_CACHE_BUDGET' });
    await expect(ModelReplica.create({ checkpoint, maxCacheTokens: 0 })).rejects.toThrow(/maxCacheTokens must be a positive integer/);
  });

  it('serves requests by priority: lower first, and preempts a running sequence of a higher value for a waiting one when the cache is full', async () => {
    const long = Array.from({ length: 30 }, (_, index) => (index * 7) % 97);
    const short = Array.from({ length: 20 }, (_, index) => (index * 5 + 1) % 97);
    const alone = referenceGenerate(TINY, weights, long, 34);
    {
      // Each sequence reserves its most (a block of 16), and the cache holds one: they run one at a time, by priority.
      await using replica = await ModelReplica.create({ checkpoint, maxCacheTokens: 16, cacheReservation: 'most', prefixCaching: false });
      const order: string[] = [];
      const run = (name: string, tokens: number[], priority?: number) => replica.generate([{ tokens, maxNewTokens: 4, ...(priority === undefined ? {} : { priority }) }]).then(() => order.push(name));
      await Promise.all([run('batch-a', PROMPTS[0], 10), run('batch-b', PROMPTS[1], 10), run('default', PROMPTS[3]), run('live', PROMPTS[2], -1), run('mid', PROMPTS[4], 5)]);
      expect(order).toEqual(['live', 'default', 'mid', 'batch-a', 'batch-b']);
      await expect(replica.generate([{ tokens: [1], priority: 0.5 }])).rejects.toThrow(/request 0: priority must be an integer \(lower goes first\), got 0\.5/);
      expect(() => buildLLMProcessor({ checkpoint, priority: 1.5 })).toThrow(/priority must be an integer \(lower goes first\), got 1\.5/);
    }
    // A batch request of 30 + 34 tokens (up to four blocks) holds three once past 32 positions; a
    // live request of 20 + 4 (two blocks) no longer fits beside it, preempts it, goes first, and
    // the batch one reads again: the same tokens as alone.
    await using replica = await ModelReplica.create({ checkpoint, maxCacheTokens: 64, prefixCaching: false });
    const finished: string[] = [];
    const stream = replica.stream({ tokens: long, maxNewTokens: 34, priority: 10 });
    const batchTokens: number[] = [];
    for await (const step of stream) {
      batchTokens.push(step.token);
      if (batchTokens.length === 3) {
        void replica.generate([{ tokens: short, maxNewTokens: 4 }]).then(([generation]) => {
          finished.push('live');
          expect(generation.tokens).toEqual(referenceGenerate(TINY, weights, short, 4));
        });
      }
    }
    finished.push('batch');
    expect(batchTokens).toEqual(alone);
    expect(finished).toEqual(['live', 'batch']);
    expect(replica.stats().preemptions).toBeGreaterThanOrEqual(1);
  });

  it('counts a shared prefix\'s cache blocks once: more sequences run within the same budget, and a dropped source\'s blocks pass to those sharing them', async () => {
    // Six prompts of 34 tokens, the first 32 alike; with 4 new tokens each holds 38 positions, three
    // blocks of 16. Two of them are the shared prefix: counted once, a budget of 96 runs four at
    // once where it would otherwise run two.
    const shared = Array.from({ length: 32 }, (_, index) => (index * 5 + 1) % 90);
    const prompts = Array.from({ length: 6 }, (_, index) => [...shared, 40 + index, 60 + index]);
    const wanted = prompts.map((prompt) => referenceGenerate(TINY, weights, prompt, 4));
    for (const prefixCacheTokens of [4096, 0]) {
      await using replica = await ModelReplica.create({ checkpoint, maxCacheTokens: 96, prefixCacheTokens });
      const { tokens, mostReserved } = await generateWatched(replica, prompts.map((tokens) => ({ tokens, maxNewTokens: 4 })));
      expect(tokens).toEqual(wanted);
      // The replica's own count: a watcher's samples can miss a short moment on a loaded host.
      expect(replica.stats().peakRunning).toBeGreaterThan(2);
      expect(mostReserved).toBeLessThanOrEqual(96);
      const stats = replica.stats();
      expect(stats.reusedPromptTokens).toBe(5 * 32);
      expect(stats.preemptions).toBe(0);
      // Nothing is left counted but the kept prefixes, whole blocks each (3 for 37 positions: the
      // last token is never read); none without a prefix budget, each source's blocks having
      // passed to the sequences still sharing them as it ended.
      expect(stats.retainedSequences).toBe(prefixCacheTokens === 0 ? 0 : 2);
      expect(stats.reservedCacheTokens).toBe(48 * stats.retainedSequences);
    }
  });

  it('stops at text, and reports log-probabilities, from the processor and the replica', async () => {
    const { path: stopModel, config, weights: stopWeights, tokenizer } = await textModel('stop', 21);
    const prompt = 'the cat sat';
    const encoded = tokenizer.encode(prompt);
    const free = referenceGenerate(config, stopWeights, encoded, 10);
    // Stop at the text of the fourth generated token that has any: the reference's text, cut there.
    const spelled = free.filter((token) => token < tokenizer.vocabSize && tokenizer.decode([token]).trim().length > 0);
    const stop = tokenizer.decode([spelled[Math.min(3, spelled.length - 1)]]).trim();
    let count = 1;
    while (!tokenizer.decode(free.slice(0, count).filter((token) => token < tokenizer.vocabSize)).includes(stop)) count++;
    const fullText = tokenizer.decode(free.slice(0, count).filter((token) => token < tokenizer.vocabSize));
    expect(count).toBeLessThan(free.length);
    const processor = buildLLMProcessor({ checkpoint: stopModel, promptColumn: 'prompt', maxNewTokens: 10, stop: [stop], logprobs: true });
    const [row] = await processor(fromItems([{ prompt }])).takeAll();
    expect(Array.from(row.generatedTokens as number[])).toEqual(free.slice(0, count));
    expect(row.finishReason).toBe('stop');
    expect(row.generatedText).toBe(fullText.slice(0, fullText.indexOf(stop)));
    // Log-probabilities: log-softmax of the reference's logits at each generated token.
    const logits = referenceLogits(config, stopWeights, [...encoded, ...free]);
    const logprobs = Array.from(row.generatedLogprobs as number[]);
    expect(logprobs).toHaveLength(count);
    logprobs.forEach((logprob, index) => {
      const row = logits[encoded.length - 1 + index];
      const maximum = Math.max(...row);
      const wanted = row[free[index]] - maximum - Math.log(row.reduce((sum, value) => sum + Math.exp(value - maximum), 0));
      expect(Math.abs(logprob - wanted)).toBeLessThan(1e-4);
    });
    // A row's own stop list wins; stop strings need text.
    // The k most likely tokens per generated token, spelled by the tokenizer.
    const [alternatives] = await buildLLMProcessor({ checkpoint: stopModel, promptColumn: 'prompt', maxNewTokens: 2, topLogprobs: 2 })(fromItems([{ prompt }])).takeAll();
    const topRows = alternatives.generatedTopLogprobs as Array<Array<{ token: number; logprob: number; text: string }>>;
    expect(topRows).toHaveLength(2);
    expect(topRows.map((entries) => entries[0].token)).toEqual(free.slice(0, 2));
    expect(topRows.every((entries) => entries.length === 2 && entries[0].logprob >= entries[1].logprob && typeof entries[1].text === 'string')).toBe(true);
    // Kept at the end of the text when asked (vLLM's include_stop_str_in_output).
    const [included] = await buildLLMProcessor({ checkpoint: stopModel, promptColumn: 'prompt', maxNewTokens: 10, stop: [stop], includeStopText: true })(fromItems([{ prompt }])).takeAll();
    expect(included.generatedText).toBe(fullText.slice(0, fullText.indexOf(stop) + stop.length));
    const [unstopped] = await processor(fromItems([{ prompt, stop: ['never in this text'] }])).takeAll();
    expect(Array.from(unstopped.generatedTokens as number[])).toEqual(free);
    expect(() => buildLLMProcessor({ checkpoint: stopModel, stop: ['x'] })).toThrow(/stop strings need text/);
    // The replica's own stop function; one that throws fails its request alone.
    await using replica = await ModelReplica.create({ checkpoint: stopModel });
    const [stopped, failed] = await Promise.allSettled([
      replica.generate([{ tokens: encoded, maxNewTokens: 10, stop: (generated) => generated.length === 3 }]).then(([generation]) => generation),
      replica.generate([{ tokens: encoded, maxNewTokens: 10, stop: () => { throw new Error('bad stop'); } }]),
    ]);
    expect(stopped).toMatchObject({ status: 'fulfilled', value: { tokens: free.slice(0, 3), finishReason: 'stop' } });
    expect(failed).toMatchObject({ status: 'rejected', reason: { message: 'bad stop' } });
    expect((await replica.generate([{ tokens: encoded, maxNewTokens: 2 }]))[0].tokens).toEqual(free.slice(0, 2));
  });

  it("renders conversations with the checkpoint's chat template, then generates", async () => {
    const { path: chatModel, config, weights: chatWeights, tokenizer } = await textModel('chat', 13);
    const template = "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";
    writeFileSync(join(chatModel, 'tokenizer_config.json'), JSON.stringify({ bos_token: '<|endoftext|>', chat_template: template }));
    const conversations = [
      [{ role: 'system', content: 'be brief' }, { role: 'user', content: 'hi there' }],
      [{ role: 'user', content: 'the cat sat' }],
    ];
    const processor = buildLLMProcessor({ checkpoint: chatModel, messagesColumn: 'messages', maxNewTokens: 4 });
    const rows = await processor(fromItems(conversations.map((messages, id) => ({ id, messages })))).takeAll();
    rows.sort((a, b) => (a.id as number) - (b.id as number));
    conversations.forEach((messages, index) => {
      const text = `<|endoftext|>${messages.map((m) => `${m.role}: ${m.content}\n`).join('')}assistant:`;
      // The template's special token is read as that token, and none is added again.
      const prompt = tokenizer.encode(text, { addSpecialTokens: false });
      expect(prompt[0]).toBe(tokenizer.tokenToId('<|endoftext|>'));
      const wanted = referenceGenerate(config, chatWeights, prompt, 4);
      expect(Array.from(rows[index].generatedTokens as number[])).toEqual(wanted);
      expect(rows[index].promptTokens).toBe(prompt.length);
      expect(typeof rows[index].generatedText).toBe('string');
    });
    // A row whose column is not a conversation is named, with the turn at fault.
    await expect(processor(fromItems([{ id: 0, messages: [{ role: 'user', content: 5 }] }])).takeAll()).rejects.toThrow(/row 0: column 'messages': message 0 \(user\): content must be a string/);
    expect(() => buildLLMProcessor({ checkpoint: chatModel, messagesColumn: 'messages', promptColumn: 'prompt' })).toThrow(/promptColumn \('prompt'\) or messagesColumn \('messages'\), not both/);
    expect(() => buildLLMProcessor({ checkpoint: chatModel, chatTemplate: 'x' })).toThrow(/apply to a messagesColumn/);
  });

  it('constrains answers to a set of choices, as a reference restricted to the same tokens picks them', async () => {
    const { path: choiceModel, config, weights: choiceWeights, tokenizer } = await textModel('choice', 41);
    const choices = ['the cat', 'a dog', 'hello world', 'the car'];
    const spelled = choices.map((choice) => tokenizer.encode(choice, { addSpecialTokens: false }));
    const prompts = ['Hello world', 'it is', 'the'];
    const processor = buildLLMProcessor({ checkpoint: choiceModel, promptColumn: 'prompt', choices });
    const rows = await processor(fromItems(prompts.map((prompt, id) => ({ id, prompt })))).takeAll();
    rows.sort((a, b) => (a.id as number) - (b.id as number));
    prompts.forEach((prompt, index) => {
      // The reference: the most likely allowed token, step by step, until a choice is spelled.
      const constraint = choiceConstraint(spelled, []);
      const sequence = tokenizer.encode(prompt);
      const generated: number[] = [];
      for (let allowed = constraint(generated); allowed; allowed = constraint(generated)) {
        const logits = referenceLogits(config, choiceWeights, [...sequence, ...generated]).at(-1)!;
        generated.push(allowed.reduce((best, token) => (logits[token] > logits[best] ? token : best)));
      }
      expect(Array.from(rows[index].generatedTokens as number[])).toEqual(generated);
      expect(choices).toContain(rows[index].generatedText);
      expect(rows[index].finishReason).toBe('stop');
    });
    // At the replica: a constraint that throws fails its request alone; one that allows nothing valid is refused.
    await using replica = await ModelReplica.create({ checkpoint: choiceModel });
    const [thrown, fine] = await Promise.allSettled([
      replica.generate([{ tokens: [1, 2], constraint: (generated) => { if (generated.length > 0) throw new Error('bad constraint'); return [5, 6]; } }]),
      replica.generate([{ tokens: [1, 2], maxNewTokens: 3, constraint: () => [7] }]),
    ]);
    expect(thrown).toMatchObject({ status: 'rejected', reason: { message: 'bad constraint' } });
    expect(fine).toMatchObject({ status: 'fulfilled', value: [{ tokens: [7, 7, 7], finishReason: 'length' }] });
    await expect(replica.generate([{ tokens: [1], constraint: () => [config.vocabSize] }])).rejects.toMatchObject({ code: 'ERR_CONSTRAINT' });
    await expect(replica.generate([{ tokens: [1], constraint: () => [] }])).rejects.toMatchObject({ code: 'ERR_CONSTRAINT' });
    expect(() => buildLLMProcessor({ checkpoint: choiceModel, choices: ['a'] })).toThrow(/choices are text/);
  });

  it('draws several samples per prompt, each row once per sample, with its own seed', async () => {
    const sampling = { temperature: 0.9, seed: 5 };
    const processor = buildLLMProcessor({ checkpoint, samplesPerPrompt: 3, sampling, maxNewTokens: 5 });
    const rows = await processor(fromItems(PROMPTS.slice(0, 2).map((tokens, id) => ({ id, tokens })))).takeAll();
    expect(rows).toHaveLength(6);
    await using replica = await ModelReplica.create({ checkpoint });
    for (const [id, tokens] of PROMPTS.slice(0, 2).entries()) {
      const samples = rows.filter((row) => row.id === id).sort((a, b) => (a.sample as number) - (b.sample as number));
      expect(samples.map((row) => row.sample)).toEqual([0, 1, 2]);
      const wanted = await replica.generate([0, 1, 2].map((sample) => ({ tokens, maxNewTokens: 5, sampling: { ...sampling, seed: 5 + sample } })));
      expect(samples.map((row) => Array.from(row.generatedTokens as number[]))).toEqual(wanted.map((generation) => generation.tokens));
    }
    await expect(buildLLMProcessor({ checkpoint, samplesPerPrompt: 2 })(fromItems([{ tokens: [1, 2] }])).takeAll()).rejects.toThrow(/samplesPerPrompt 2 needs sampling with a temperature above 0/);
    expect(() => buildLLMProcessor({ checkpoint, samplesPerPrompt: 0 })).toThrow(/samplesPerPrompt must be a positive integer/);
  });

  it('runs a dataset through replicas as a batch processor', async () => {
    const processor = buildLLMProcessor({ checkpoint, tensorParallel: 2, pipelineParallel: 2, concurrency: 1, batchSize: 2, maxNewTokens: 6 });
    const rows = await processor(fromItems(PROMPTS.map((tokens, id) => ({ id, tokens })))).takeAll();
    rows.sort((a, b) => (a.id as number) - (b.id as number));
    expect(rows.map((row) => Array.from(row.generatedTokens as number[]))).toEqual(expected);
    expect(rows.map((row) => row.finishReason)).toEqual(PROMPTS.map(() => 'length'));
    expect(rows.map((row) => row.promptTokens)).toEqual(PROMPTS.map((prompt) => prompt.length));
  });
});
