import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildLLMProcessor, fromItems, init, InvalidArgumentError, ModelReplica, shutdown, state } from '../../lib/index.js';
import { checkSpeculation, proposeTokens, type NgramSpeculation, type NgramSpeculationOptions } from '../../lib/llm/speculation.js';
import { randomWeights, referenceGenerate, TINY, TINY_LLAMA, writeCheckpoint } from './fixtures/decoders.js';
import { RecordingReporter } from '../data/helpers.js';

const ngram = (options: NgramSpeculationOptions) => checkSpeculation(options) as NgramSpeculation;

describe('speculative decoding by n-gram lookup', () => {
  let directory: string;
  let checkpoint: string;
  const weights = randomWeights(TINY, 7);
  // Prompts whose greedy continuations fall into loops, which lookups then predict.
  const prompts = [[5, 17, 3, 5, 17, 3, 5, 17], [42, 9, 42, 9, 42], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [96, 0, 33, 12]];

  beforeAll(async () => {
    directory = mkdtempSync(join(tmpdir(), 'trellis-speculation-'));
    checkpoint = await writeCheckpoint(join(directory, 'tiny'), TINY, weights);
    await init({ numCpus: 6 });
  });
  afterAll(async () => {
    await shutdown();
    rmSync(directory, { recursive: true, force: true });
  });

  it('proposes what followed the longest earlier match of the tail', () => {
    const options = ngram({ tokens: 3 });
    expect(proposeTokens(Int32Array.from([1, 2, 3, 4, 5, 1, 2]), [], options, 8)).toEqual([3, 4, 5]);
    // The latest earlier occurrence wins, and generated tokens count as text.
    expect(proposeTokens(Int32Array.from([7, 8, 1, 7, 8, 2]), [7, 8], options, 8)).toEqual([2, 7, 8]);
    // A longer tail that matches beats a shorter one: [4, 5] matched at 3 (what follows: 9), not [5] at 6.
    expect(proposeTokens(Int32Array.from([1, 2, 3, 4, 5, 9, 5, 6, 4, 5]), [], ngram({ tokens: 1, maxMatch: 2 }), 8)).toEqual([9]);
    expect(proposeTokens(Int32Array.from([1, 2, 3]), [], options, 8)).toEqual([]);
    expect(proposeTokens(Int32Array.from([1, 2, 1, 2]), [], options, 1)).toHaveLength(1);
    expect(proposeTokens(Int32Array.from([1, 1, 1]), [], ngram({ minMatch: 3, maxMatch: 3 }), 8)).toEqual([]);
    expect(() => checkSpeculation({ method: 'eagle' as 'ngram' })).toThrow(/method must be 'ngram'/);
    expect(() => checkSpeculation({ tokens: 0 })).toThrow(InvalidArgumentError);
    expect(() => checkSpeculation({ minMatch: 3, maxMatch: 2 })).toThrow(/minMatch 3 is above maxMatch 2/);
  });

  it('generates the same tokens in fewer steps, greedy and sampled', async () => {
    await using plain = await ModelReplica.create({ checkpoint });
    await using speculating = await ModelReplica.create({ checkpoint, speculation: { method: 'ngram', tokens: 4 } });
    const greedy = prompts.map((tokens) => ({ tokens, maxNewTokens: 30 }));
    const expected = await plain.generate(greedy);
    const generated = await speculating.generate(greedy);
    generated.forEach((generation, index) => {
      expect(generation.tokens, `prompt ${index}`).toEqual(referenceGenerate(TINY, weights, prompts[index], 30));
      expect(generation.tokens).toEqual(expected[index].tokens);
      expect(generation.finishReason).toBe('length');
    });
    const stats = speculating.stats();
    expect(stats.acceptedDraftTokens).toBeGreaterThan(0);
    expect(stats.acceptedDraftTokens).toBeLessThanOrEqual(stats.draftTokens);
    expect(stats.steps).toBeLessThan(plain.stats().steps);
    expect(stats.generatedTokens).toBe(plain.stats().generatedTokens);
    // Sampled: each pick draws from (seed, position), so kept proposals are the plain draws.
    const sampled = prompts.map((tokens, index) => ({ tokens, maxNewTokens: 30, sampling: { temperature: 0.8, seed: index } }));
    const plainSampled = await plain.generate(sampled);
    (await speculating.generate(sampled)).forEach((generation, index) => expect(generation.tokens).toEqual(plainSampled[index].tokens));
  });

  it('stops at a stop token inside a kept proposal, and where no proposal may go (logprobs, minNewTokens) decodes plainly', async () => {
    await using speculating = await ModelReplica.create({ checkpoint, speculation: { tokens: 6 } });
    const reference = referenceGenerate(TINY, weights, prompts[1], 30);
    // A token the loop repeats: the generation ends at its first appearance, whatever the proposals held after it.
    const stop = reference[6];
    const [stopped] = await speculating.generate([{ tokens: prompts[1], maxNewTokens: 30, stopTokens: [stop] }]);
    expect(stopped.tokens).toEqual(referenceGenerate(TINY, weights, prompts[1], 30, [stop]));
    expect(stopped.finishReason).toBe('stop');
    const before = speculating.stats().draftTokens;
    const [scored] = await speculating.generate([{ tokens: prompts[0], maxNewTokens: 12, logprobs: true }]);
    expect(scored.tokens).toEqual(referenceGenerate(TINY, weights, prompts[0], 12));
    expect(scored.logprobs).toHaveLength(12);
    expect(speculating.stats().draftTokens).toBe(before);
  });

  it('proposes nothing while more sequences than disableByBatchSize run', async () => {
    await using speculating = await ModelReplica.create({ checkpoint, speculation: { tokens: 4, disableByBatchSize: 2 } });
    const generations = await speculating.generate(prompts.map((tokens) => ({ tokens, maxNewTokens: 30 })));
    generations.forEach((generation, index) => expect(generation.tokens).toEqual(referenceGenerate(TINY, weights, prompts[index], 30)));
    expect(speculating.stats().draftTokens).toBe(0);
    await speculating.generate([{ tokens: prompts[0], maxNewTokens: 30 }]);
    expect(speculating.stats().draftTokens).toBeGreaterThan(0);
    expect(() => checkSpeculation({ disableByBatchSize: 0 })).toThrow(/disableByBatchSize must be an integer from 1/);
  });

  it('checks proposals across a 2 × 2 cut of a Llama-layout model', async () => {
    const llamaWeights = randomWeights(TINY_LLAMA, 3);
    const llama = await writeCheckpoint(join(directory, 'llama'), TINY_LLAMA, llamaWeights, { prefix: 'model.' });
    await using speculating = await ModelReplica.create({ checkpoint: llama, tensorParallel: 2, pipelineParallel: 2, speculation: { tokens: 3 } });
    const llamaPrompts = [[5, 17, 3, 5, 17], [1, 2, 1, 2, 1], [60, 2, 9]];
    const generations = await speculating.generate(llamaPrompts.map((tokens) => ({ tokens, maxNewTokens: 20 })));
    generations.forEach((generation, index) => expect(generation.tokens, `prompt ${index}`).toEqual(referenceGenerate(TINY_LLAMA, llamaWeights, llamaPrompts[index], 20)));
    expect(speculating.stats().draftTokens).toBeGreaterThan(0);
  });
});

describe('speculative decoding by a draft model', () => {
  let directory: string;
  let checkpoint: string;
  let stranger: string;
  const weights = randomWeights(TINY, 7);
  const prompts = [[5, 17, 3, 5, 17, 3, 5, 17], [42, 9, 42, 9, 42], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [96, 0, 33, 12]];
  const greedy = prompts.map((tokens) => ({ tokens, maxNewTokens: 30 }));
  const sampled = prompts.map((tokens, index) => ({ tokens, maxNewTokens: 30, sampling: { temperature: 0.8, seed: index } }));

  beforeAll(async () => {
    directory = mkdtempSync(join(tmpdir(), 'trellis-draft-'));
    checkpoint = await writeCheckpoint(join(directory, 'tiny'), TINY, weights);
    // A draft that rarely agrees with the model: other random weights of the same shape.
    stranger = await writeCheckpoint(join(directory, 'stranger'), TINY, randomWeights(TINY, 8));
    await init({ numCpus: 6 });
  });
  afterAll(async () => {
    await shutdown();
    rmSync(directory, { recursive: true, force: true });
  });

  it("generates the plain tokens, greedy and sampled, in fewer steps where the draft agrees, and the same tokens where it does not", async () => {
    await using plain = await ModelReplica.create({ checkpoint });
    const expected = await plain.generate(greedy);
    const expectedSampled = await plain.generate(sampled);
    expected.forEach((generation, index) => expect(generation.tokens).toEqual(referenceGenerate(TINY, weights, prompts[index], 30)));
    // The model's own weights as its draft: every proposal is kept (an upper bound on what speculation saves).
    {
      const groupsBefore = state().placementGroups.filter((group) => group.state !== 'removed').length;
      await using speculating = await ModelReplica.create({ checkpoint, speculation: { method: 'draft', checkpoint, tokens: 4 } });
      // The draft's rank takes a bundle of the model's placement group: the two are reserved at once.
      const groups = state().placementGroups.filter((group) => group.state !== 'removed');
      expect(groups.length).toBe(groupsBefore + 1);
      expect(groups.at(-1)!.bundles).toHaveLength(2);
      expect((await speculating.generate(greedy)).map((generation) => generation.tokens)).toEqual(expected.map((generation) => generation.tokens));
      const stats = speculating.stats();
      expect(stats.draftTokens).toBeGreaterThan(0);
      expect(stats.acceptedDraftTokens).toBe(stats.draftTokens);
      expect(stats.steps).toBeLessThan(plain.stats().steps / 2);
      expect((await speculating.generate(sampled)).map((generation) => generation.tokens)).toEqual(expectedSampled.map((generation) => generation.tokens));
    }
    // A draft that disagrees (its weights quantized to int8 besides): proposals mostly dropped, the tokens still the model's.
    await using doubtful = await ModelReplica.create({ checkpoint, speculation: { method: 'draft', checkpoint: stranger, tokens: 3, weightDtype: 'int8' } });
    expect((await doubtful.generate(greedy)).map((generation) => generation.tokens)).toEqual(expected.map((generation) => generation.tokens));
    expect((await doubtful.generate(sampled)).map((generation) => generation.tokens)).toEqual(expectedSampled.map((generation) => generation.tokens));
    const stats = doubtful.stats();
    expect(stats.draftTokens).toBeGreaterThan(0);
    expect(stats.acceptedDraftTokens).toBeLessThan(stats.draftTokens);
  });

  it('runs inside a processor, and decodes plainly once the draft model dies', async () => {
    const reporter = new RecordingReporter();
    const rows = await buildLLMProcessor({ checkpoint, maxNewTokens: 20, speculation: { method: 'draft', checkpoint, tokens: 4 } })(fromItems(prompts.map((tokens, id) => ({ id, tokens })))).takeAll({ progress: reporter });
    rows.sort((a, b) => (a.id as number) - (b.id as number));
    rows.forEach((row, index) => expect(Array.from(row.generatedTokens as number[])).toEqual(referenceGenerate(TINY, weights, prompts[index], 20)));
    // The engine's progress counts the proposals, and those kept (the model's own weights: all).
    const metrics = reporter.finished!.progress.operators.at(-1)!.metrics!;
    expect(metrics.draftTokens).toBeGreaterThan(0);
    expect(metrics.acceptedDraftTokens).toBe(metrics.draftTokens);
    // The draft's one rank killed while the model generates: what is left decodes plainly, the same tokens.
    await using speculating = await ModelReplica.create({ checkpoint, speculation: { method: 'draft', checkpoint, tokens: 2 } });
    const ranks = new Set(speculating.ranks().map((rank) => rank.actorId));
    const draftRanks = state().actors.filter((actor) => actor.className === 'ShardWorker' && actor.state === 'alive' && !ranks.has(actor.actorId));
    expect(draftRanks).toHaveLength(1);
    const long = prompts.map((tokens) => ({ tokens, maxNewTokens: 48 }));
    const written: string[] = [];
    const write = process.stderr.write.bind(process.stderr);
    process.stderr.write = ((chunk: string) => (written.push(String(chunk)), true)) as typeof process.stderr.write;
    try {
      const running = speculating.generate(long);
      while (speculating.stats().acceptedDraftTokens === 0) await new Promise((resolve) => setTimeout(resolve, 1));
      process.kill(draftRanks[0].pid!, 'SIGKILL');
      const generations = await running;
      generations.forEach((generation, index) => expect(generation.tokens).toEqual(referenceGenerate(TINY, weights, prompts[index], 48)));
      // Later requests decode plainly: no proposals after the failure.
      const before = speculating.stats().draftTokens;
      expect((await speculating.generate(greedy)).map((generation) => generation.tokens)).toEqual(prompts.map((tokens) => referenceGenerate(TINY, weights, tokens, 30)));
      expect(speculating.stats().draftTokens).toBe(before);
    } finally {
      process.stderr.write = write;
    }
    expect(written.join('')).toMatch(/speculative decoding's draft model failed, and decoding goes on without it/);
  });

  it('refuses a draft it cannot use, naming why, and decodes plainly a sequence whose text its draft cannot read', async () => {
    // A draft of fewer tokens (as one without a model's padding rows): a text holding a token past them decodes plainly.
    const narrowConfig = { ...TINY, vocabSize: 60 };
    const narrow = await writeCheckpoint(join(directory, 'narrow'), narrowConfig, randomWeights(narrowConfig, 10));
    {
      await using speculating = await ModelReplica.create({ checkpoint, speculation: { method: 'draft', checkpoint: narrow, tokens: 3 } });
      const mixed = [[5, 17, 3, 5], [96, 0, 33, 12]];
      const generations = await speculating.generate(mixed.map((tokens) => ({ tokens, maxNewTokens: 20 })));
      generations.forEach((generation, index) => expect(generation.tokens).toEqual(referenceGenerate(TINY, weights, mixed[index], 20)));
    }
    const wide = await writeCheckpoint(join(directory, 'wide'), { ...TINY, vocabSize: 120 }, randomWeights({ ...TINY, vocabSize: 120 }, 9));
    await expect(ModelReplica.create({ checkpoint, speculation: { method: 'draft', checkpoint: wide } })).rejects.toMatchObject({ code: 'ERR_SPECULATION', message: expect.stringMatching(/the draft model's vocabulary has 120 tokens, more than the model's 97/) });
    expect(() => checkSpeculation({ method: 'draft' } as never)).toThrow(/needs its checkpoint/);
    expect(() => checkSpeculation({ method: 'draft', checkpoint, maxMatch: 2 } as never)).toThrow(/does not take maxMatch/);
    expect(() => checkSpeculation({ method: 'draft', checkpoint, tokens: 0 })).toThrow(/speculation.tokens must be an integer from 1 to 64/);
  });
});
