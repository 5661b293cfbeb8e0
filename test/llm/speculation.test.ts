import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { init, InvalidArgumentError, ModelReplica, shutdown } from '../../lib/index.js';
import { checkSpeculation, proposeTokens } from '../../lib/llm/speculation.js';
import { randomWeights, referenceGenerate, TINY, TINY_LLAMA, writeCheckpoint } from './fixtures/decoders.js';

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
    const options = checkSpeculation({ tokens: 3 });
    expect(proposeTokens(Int32Array.from([1, 2, 3, 4, 5, 1, 2]), [], options, 8)).toEqual([3, 4, 5]);
    // The latest earlier occurrence wins, and generated tokens count as text.
    expect(proposeTokens(Int32Array.from([7, 8, 1, 7, 8, 2]), [7, 8], options, 8)).toEqual([2, 7, 8]);
    // A longer tail that matches beats a shorter one: [4, 5] matched at 3 (what follows: 9), not [5] at 6.
    expect(proposeTokens(Int32Array.from([1, 2, 3, 4, 5, 9, 5, 6, 4, 5]), [], checkSpeculation({ tokens: 1, maxMatch: 2 }), 8)).toEqual([9]);
    expect(proposeTokens(Int32Array.from([1, 2, 3]), [], options, 8)).toEqual([]);
    expect(proposeTokens(Int32Array.from([1, 2, 1, 2]), [], options, 1)).toHaveLength(1);
    expect(proposeTokens(Int32Array.from([1, 1, 1]), [], checkSpeculation({ minMatch: 3, maxMatch: 3 }), 8)).toEqual([]);
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
