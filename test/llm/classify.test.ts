import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildLLMProcessor, fromItems, init, ModelReplica, shutdown } from '../../lib/index.js';
import { randomWeights, referenceFinalHidden, TINY_LLAMA, writeCheckpoint, type Weights } from './fixtures/decoders.js';

/** Softmax of the score head over the reference's final norm at the last position. */
function referenceProbabilities(weights: Weights, score: Float32Array, labels: number, tokens: number[]): number[] {
  const hidden = referenceFinalHidden(TINY_LLAMA, weights, tokens).at(-1)!;
  const size = hidden.length;
  const logits = Array.from({ length: labels }, (_, label) => hidden.reduce((sum, value, index) => sum + value * score[label * size + index], 0));
  const top = Math.max(...logits);
  const exps = logits.map((value) => Math.exp(value - top));
  const total = exps.reduce((a, b) => a + b, 0);
  return exps.map((value) => value / total);
}

describe('sequence classification and headless checkpoints', () => {
  let directory: string;
  let checkpoint: string;
  // A base model saved without lm_head (untied), with a 3-label score head, as *ForSequenceClassification saves it.
  const weights = randomWeights(TINY_LLAMA, 19);
  delete weights['lm_head.weight'];
  const score = Float32Array.from({ length: 3 * 32 }, (_, index) => Math.sin(index * 1.7) * 0.8);
  const prompts = [[5, 17, 3], [42], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [96, 0, 33, 12]];

  beforeAll(async () => {
    directory = mkdtempSync(join(tmpdir(), 'trellis-classify-'));
    checkpoint = await writeCheckpoint(join(directory, 'classifier'), TINY_LLAMA, { ...weights, 'score.weight': { shape: [3, 32], data: score } }, { prefix: 'model.' });
    const config = JSON.parse(readFileSync(join(checkpoint, 'config.json'), 'utf8')) as Record<string, unknown>;
    writeFileSync(join(checkpoint, 'config.json'), JSON.stringify({ ...config, id2label: { 0: 'negative', 1: 'neutral', 2: 'positive' } }));
    await init({ numCpus: 6 });
  });
  afterAll(async () => {
    await shutdown();
    rmSync(directory, { recursive: true, force: true });
  });

  it("classifies with the checkpoint's score head, cut 2 × 2, as the reference does, and refuses to generate without a language head", async () => {
    await using replica = await ModelReplica.create({ checkpoint, tensorParallel: 2, pipelineParallel: 2 });
    expect(replica.hasLanguageHead).toBe(false);
    expect(replica.labels).toEqual(['negative', 'neutral', 'positive']);
    const results = await replica.classify(prompts.map((tokens) => ({ tokens })));
    results.forEach((result, index) => {
      const wanted = referenceProbabilities(weights, score, 3, prompts[index]);
      wanted.forEach((probability, label) => expect(result.probabilities[label]).toBeCloseTo(probability, 4));
      expect(result.label).toBe(['negative', 'neutral', 'positive'][wanted.indexOf(Math.max(...wanted))]);
      expect(result.promptTokens).toBe(prompts[index].length);
    });
    // The labels differ across prompts: the head reads the text.
    expect(new Set(results.map((result) => result.label)).size).toBeGreaterThan(1);
    await expect(replica.generate([{ tokens: [1, 2] }])).rejects.toMatchObject({ code: 'ERR_NO_LM_HEAD' });
    // Embeddings need no head.
    const [embedding] = await replica.embed([{ tokens: prompts[0] }]);
    expect(embedding.vector).toHaveLength(32);
  });

  it("runs task 'classify' in the processor, and refuses it where the checkpoint has no score head", async () => {
    const processor = buildLLMProcessor({ checkpoint, task: 'classify', tensorParallel: 2 });
    const rows = await processor(fromItems(prompts.map((tokens, id) => ({ id, tokens })))).takeAll();
    rows.sort((a, b) => (a.id as number) - (b.id as number));
    rows.forEach((row, index) => {
      const wanted = referenceProbabilities(weights, score, 3, prompts[index]);
      expect(row.label).toBe(['negative', 'neutral', 'positive'][wanted.indexOf(Math.max(...wanted))]);
      expect(Array.from(row.probabilities as Float32Array).reduce((a, b) => a + b, 0)).toBeCloseTo(1, 5);
    });
    const plain = await writeCheckpoint(join(directory, 'plain'), TINY_LLAMA, randomWeights(TINY_LLAMA, 2), { prefix: 'model.' });
    await using replica = await ModelReplica.create({ checkpoint: plain });
    expect(replica.hasLanguageHead).toBe(true);
    await expect(replica.classify([{ tokens: [1] }])).rejects.toMatchObject({ code: 'ERR_NO_CLASSIFIER' });
    expect(() => buildLLMProcessor({ checkpoint, task: 'classify', messagesColumn: 'messages' })).toThrow(/task 'classify' reads a promptColumn or a tokensColumn/);
  });
});
