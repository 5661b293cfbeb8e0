import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildLLMProcessor, fromItems, init, shutdown, Tokenizer } from '../../lib/index.js';
import { gpt2StyleTokenizerJson } from './fixtures/tokenizers.js';
import { randomWeights, referenceGenerate, TINY, writeCheckpoint } from './fixtures/decoders.js';

describe("rows that cannot run, with rowErrors 'record'", () => {
  let directory: string;
  let checkpoint: string;
  const config = { ...TINY, vocabSize: 300, maxPositions: 48 };
  const weights = randomWeights(config, 3);

  beforeAll(async () => {
    directory = mkdtempSync(join(tmpdir(), 'trellis-row-errors-'));
    checkpoint = await writeCheckpoint(join(directory, 'model'), config, weights);
    writeFileSync(join(checkpoint, 'tokenizer.json'), JSON.stringify(gpt2StyleTokenizerJson()));
    await init({ numCpus: 4 });
  });
  afterAll(async () => {
    await shutdown();
    rmSync(directory, { recursive: true, force: true });
  });

  it('fail alone, named in an error column, while the others generate; by default they fail the job', async () => {
    const rows = [
      { id: 0, prompt: 'Hello world', guidedDecoding: null, sampling: null },
      { id: 1, prompt: 'x'.repeat(60), guidedDecoding: null, sampling: null },
      { id: 2, prompt: 'the cat', guidedDecoding: JSON.stringify({ regex: '(?=a)' }), sampling: null },
      { id: 3, prompt: 'it is', guidedDecoding: null, sampling: { temperature: -1 } },
      { id: 4, prompt: 'the cat', guidedDecoding: JSON.stringify({ regex: '[0-9]{3}' }), sampling: null },
    ];
    const processor = buildLLMProcessor({ checkpoint, promptColumn: 'prompt', maxNewTokens: 8, rowErrors: 'record' });
    const out = await processor(fromItems(rows)).takeAll();
    out.sort((a, b) => (a.id as number) - (b.id as number));
    expect(out.map((row) => row.finishReason)).toEqual(['length', 'error', 'error', 'error', 'stop']);
    expect(out[0].error).toBeNull();
    expect(out[1].error).toMatch(/^ERR_PROMPT_TOO_LONG: /);
    expect(out[2].error).toMatch(/^ERR_GRAMMAR: .*lookaround is not supported/);
    expect(out[3].error).toMatch(/temperature/);
    expect(out[4].generatedText).toMatch(/^[0-9]{3}$/);
    expect(Array.from(out[1].generatedTokens as number[])).toEqual([]);
    const tokenizer = Tokenizer.fromJSON(gpt2StyleTokenizerJson());
    expect(Array.from(out[0].generatedTokens as number[])).toEqual(referenceGenerate(config, weights, tokenizer.encode('Hello world'), 8));
    await expect(buildLLMProcessor({ checkpoint, promptColumn: 'prompt', maxNewTokens: 8 })(fromItems(rows.slice(0, 2))).takeAll()).rejects.toThrow(/ERR_PROMPT_TOO_LONG|too long|positions/);
    expect(() => buildLLMProcessor({ checkpoint, rowErrors: 'skip' as 'record' })).toThrow(/rowErrors must be 'fail' or 'record'/);
  });

  it('fail alone in a beam search too, with no beams', async () => {
    const processor = buildLLMProcessor({ checkpoint, promptColumn: 'prompt', maxNewTokens: 4, beamSearch: { beamWidth: 2 }, rowErrors: 'record' });
    const out = await processor(fromItems([{ id: 0, prompt: 'Hello world' }, { id: 1, prompt: 'x'.repeat(60) }])).takeAll();
    out.sort((a, b) => (a.id as number) - (b.id as number));
    expect(out.map((row) => [row.finishReason, (row.beams as unknown[]).length])).toEqual([['length', 2], ['error', 0]]);
    expect(out[0].error).toBeNull();
    expect(out[1].error).toMatch(/^ERR_PROMPT_TOO_LONG: /);
    expect(typeof out[0].generatedText).toBe('string');
  });
});
