/**
 * Beam search: the search itself over a model given as a table (where it beats greedy, stop
 * tokens, length penalty, stopping, the model's positions), then a replica's search against the
 * same search over the reference model's logits, and through buildLLMProcessor.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fromItems, init, InvalidArgumentError, ModelReplica, buildLLMProcessor, shutdown } from '../../lib/index.js';
import { beamSearch, checkBeamSearch, type NextTokenReader } from '../../lib/llm/beam-search.js';
import { randomWeights, referenceGenerate, referenceLogits, TINY, TINY_LLAMA, writeCheckpoint } from './fixtures/decoders.js';

/** A model as a table: each prefix (generated tokens joined by ',') to its next tokens' log-probabilities. */
function tableModel(table: Record<string, Record<number, number>>, promptLength: number): { read: NextTokenReader; calls: number[][] } {
  const calls: number[][] = [];
  const read: NextTokenReader = async (prefixes, count) => {
    calls.push(prefixes.map((prefix) => prefix.length));
    return prefixes.map((prefix) => {
      const key = Array.from(prefix.subarray(promptLength)).join(',');
      const next = Object.entries(table[key] ?? {}).map(([token, logprob]) => ({ token: Number(token), logprob }));
      return next.sort((a, b) => b.logprob - a.logprob).slice(0, count);
    });
  };
  return { read, calls };
}

const STOP = 9;
const settings = (beamWidth: number, rest: { lengthPenalty?: number; maxNewTokens?: number; maxPositions?: number } = {}) => ({
  beamWidth, lengthPenalty: rest.lengthPenalty ?? 1, maxNewTokens: rest.maxNewTokens ?? 3, stopTokens: new Set([STOP]), maxPositions: rest.maxPositions ?? 100,
});

describe('beam search over a table', () => {
  const prompt = Int32Array.from([7, 7]);
  // Greedy takes 1 (-0.5), whose continuations are poor; 2 (-0.9) leads to a likely one.
  const table = {
    '': { 1: -0.5, 2: -0.9, 3: -3 },
    '1': { 4: -2.5, 5: -2.6, [STOP]: -3 },
    '2': { 6: -0.1, 4: -3, [STOP]: -4 },
    '3': { 4: -0.2 },
    '1,4': { 4: -1 }, '1,5': { 4: -1 }, '2,6': { 4: -0.05, [STOP]: -0.2 }, '2,4': { 4: -1 }, '3,4': { 4: -1 },
  };

  it('keeps the likeliest beams, finds what greedy misses, and ranks by score', async () => {
    const greedy = await beamSearch(tableModel(table, 2).read, prompt, settings(1));
    expect(greedy.beams).toEqual([{ tokens: [1, 4, 4], logprob: -4, score: -4 / 3, finishReason: 'length' }]);
    const { read, calls } = tableModel(table, 2);
    const searched = await beamSearch(read, prompt, settings(2));
    expect(searched.promptTokens).toBe(2);
    expect(searched.beams.map((beam) => beam.tokens)).toEqual([[2, 6, 4], [2, 6, STOP]]);
    expect(searched.beams[0].logprob).toBeCloseTo(-1.05, 10);
    expect(searched.beams[1]).toMatchObject({ finishReason: 'stop', score: expect.closeTo(-1.2 / 3, 10) });
    // One read a step, of every live beam, asking for 2 x beamWidth tokens each.
    expect(calls).toEqual([[2], [3, 3], [4, 4]]);
  });

  it('weighs length by lengthPenalty, and stops once no live beam can pass the finished ones', async () => {
    // A stop token right away against a longer answer, likelier per token.
    const short = { '': { [STOP]: -1, 1: -0.7 }, '1': { 2: -0.4, [STOP]: -2 }, '1,2': { 3: -0.3, [STOP]: -3 }, '1,2,3': { 4: -0.3 } };
    const mean = await beamSearch(tableModel(short, 2).read, prompt, settings(2, { maxNewTokens: 4 }));
    expect(mean.beams.map((beam) => beam.tokens)).toEqual([[1, 2, 3, 4], [STOP]]);
    const sum = await beamSearch(tableModel(short, 2).read, prompt, settings(2, { lengthPenalty: 0, maxNewTokens: 4 }));
    expect(sum.beams[0]).toEqual({ tokens: [STOP], logprob: -1, score: -1, finishReason: 'stop' });
    // Width 1 is greedy: a stop token below the top candidate finishes nothing.
    expect((await beamSearch(tableModel(short, 2).read, prompt, settings(1, { lengthPenalty: 0, maxNewTokens: 4 }))).beams[0].tokens).toEqual([1, 2, 3, 4]);
    // Once finished, [1, STOP] (-0.3) is above the only live beam (-0.7), which can only fall: the search ends.
    const { read, calls } = tableModel({ '': { 1: -0.2, 2: -0.3 }, '1': { [STOP]: -0.1, 3: -0.5 }, '1,3': { 4: -0.1 } }, 2);
    const early = await beamSearch(read, prompt, settings(1, { lengthPenalty: 0, maxNewTokens: 4 }));
    expect(early.beams).toEqual([{ tokens: [1, STOP], logprob: expect.closeTo(-0.3, 10), score: expect.closeTo(-0.3, 10), finishReason: 'stop' }]);
    expect(calls).toHaveLength(2);
  });

  it("ends beams at the model's positions, and checks its options", async () => {
    const cut = await beamSearch(tableModel(table, 2).read, prompt, settings(2, { maxPositions: 4 }));
    expect(cut.beams.map((beam) => [beam.tokens, beam.finishReason])).toEqual([[[2, 6], 'max-positions'], [[1, 4], 'max-positions']]);
    expect(checkBeamSearch({ beamWidth: 3 })).toEqual({ beamWidth: 3, lengthPenalty: 1 });
    expect(() => checkBeamSearch({ beamWidth: 11 })).toThrow(/beamSearch.beamWidth must be an integer from 1 to 10, got 11/);
    expect(() => checkBeamSearch({ beamWidth: 2, lengthPenalty: Number.NaN })).toThrow(/lengthPenalty must be a finite number/);
    expect(() => checkBeamSearch(null as never)).toThrow(InvalidArgumentError);
  });
});

describe('beam search on a replica', () => {
  let directory: string;
  let checkpoint: string;
  let llama: string;
  const weights = randomWeights(TINY, 11);
  const llamaWeights = randomWeights(TINY_LLAMA, 12);

  beforeAll(async () => {
    directory = mkdtempSync(join(tmpdir(), 'trellis-beam-'));
    checkpoint = await writeCheckpoint(join(directory, 'tiny'), TINY, weights);
    llama = await writeCheckpoint(join(directory, 'llama'), TINY_LLAMA, llamaWeights, { prefix: 'model.' });
    await init({ numCpus: 4 });
  });
  afterAll(async () => {
    await shutdown();
    rmSync(directory, { recursive: true, force: true });
  });

  /** The same search over the reference model: each prefix's logits recomputed whole, log-softmaxed. */
  const referenceReader = (config: typeof TINY, model: typeof weights): NextTokenReader => async (prefixes, count) =>
    prefixes.map((prefix) => {
      const logits = referenceLogits(config, model, Array.from(prefix)).at(-1)!;
      const most = Math.max(...logits);
      const total = Math.log(logits.reduce((sum, value) => sum + Math.exp(value - most), 0)) + most;
      return logits.map((value, token) => ({ token, logprob: value - total })).sort((a, b) => b.logprob - a.logprob || a.token - b.token).slice(0, count);
    });

  it("finds the reference model's beams, sharing steps and cached prefixes", async () => {
    await using replica = await ModelReplica.create({ checkpoint, prefixBlockTokens: 4 });
    const prompts = [[5, 17, 3], [42, 1, 8, 60, 2], [9]];
    const searches = await Promise.all(prompts.map((tokens) => replica.beamSearch({ tokens, beamWidth: 3, maxNewTokens: 6, stopTokens: [STOP] })));
    for (const [index, tokens] of prompts.entries()) {
      const expected = await beamSearch(referenceReader(TINY, weights), Int32Array.from(tokens), settings(3, { maxNewTokens: 6, maxPositions: TINY.maxPositions }));
      expect(searches[index].beams.map((beam) => beam.tokens), `prompt ${index}`).toEqual(expected.beams.map((beam) => beam.tokens));
      searches[index].beams.forEach((beam, rank) => expect(beam.logprob).toBeCloseTo(expected.beams[rank].logprob, 4));
      expect(searches[index].promptTokens).toBe(tokens.length);
    }
    // Width 1 is greedy decoding.
    const [greedy] = (await replica.beamSearch({ tokens: prompts[0], beamWidth: 1, maxNewTokens: 6, stopTokens: [] })).beams;
    expect(greedy.tokens).toEqual(referenceGenerate(TINY, weights, prompts[0], 6));
    // Steps read the tokens past their parent's last whole block, copying the rest.
    expect(replica.stats().reusedPromptTokens).toBeGreaterThan(0);
    await expect(replica.beamSearch({ tokens: prompts[0], beamWidth: 0 })).rejects.toThrow(/beamWidth must be an integer from 1 to 10/);
    await expect(replica.beamSearch({ tokens: [], beamWidth: 2 })).rejects.toThrow(/the prompt is empty/);
    await expect(replica.beamSearch({ tokens: [1], beamWidth: 2, adapter: 'nope' })).rejects.toThrow(/adapter/);
  });

  it('runs through buildLLMProcessor: each row gains its beams, the best as its generation', async () => {
    const rows = await buildLLMProcessor({ checkpoint: llama, beamSearch: { beamWidth: 2 }, maxNewTokens: 4, stopTokens: [], batchSize: 2 })(
      fromItems([{ tokens: [5, 17, 3] }, { tokens: [60] }, { tokens: [9, 8, 7] }]),
    ).takeAll();
    for (const row of rows) {
      const tokens = Array.from(row.tokens as number[]);
      const expected = await beamSearch(referenceReader(TINY_LLAMA, llamaWeights), Int32Array.from(tokens), { ...settings(2, { maxNewTokens: 4, maxPositions: TINY_LLAMA.maxPositions }), stopTokens: new Set() });
      const beams = row.beams as Array<{ tokens: number[]; logprob: number; score: number; finishReason: string }>;
      expect(beams.map((beam) => Array.from(beam.tokens))).toEqual(expected.beams.map((beam) => beam.tokens));
      expect(Array.from(row.generatedTokens as number[])).toEqual(expected.beams[0].tokens);
      expect(row.finishReason).toBe('length');
      expect(row.promptTokens).toBe(tokens.length);
    }
    expect(() => buildLLMProcessor({ checkpoint: llama, beamSearch: { beamWidth: 2 }, sampling: { temperature: 0.7 } })).toThrow(/beamSearch picks by log-probability alone: drop sampling/);
  });

  it('closes after shutdown() without complaint (the ranks went with the cluster), failing what was left', async () => {
    const replica = await ModelReplica.create({ checkpoint });
    await shutdown();
    await expect(replica.close()).resolves.toBeUndefined();
    await expect(replica.generate([{ tokens: [1, 2] }])).rejects.toThrow(/closed/);
  });
});
