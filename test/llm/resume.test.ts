/**
 * An LLM batch job that stopped resumes from its checkpoint: the rows it wrote are skipped before
 * the engine sees them, and every row is written once, with what an uninterrupted run generates.
 */
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DataContext, buildLLMProcessor, fromItems, init, shutdown, type Row } from '../../lib/index.js';
import { gpt2StyleTokenizerJson } from './fixtures/tokenizers.js';
import { randomWeights, TINY, writeCheckpoint } from './fixtures/decoders.js';

describe('a checkpointed LLM job', () => {
  let directory: string;
  let model: string;
  const config = { ...TINY, vocabSize: 300, maxPositions: 48 };

  beforeAll(async () => {
    directory = mkdtempSync(join(tmpdir(), 'trellis-llm-resume-'));
    model = await writeCheckpoint(join(directory, 'model'), config, randomWeights(config, 5));
    writeFileSync(join(model, 'tokenizer.json'), JSON.stringify(gpt2StyleTokenizerJson()));
    DataContext.progress = false;
    await init({ numCpus: 2 });
  });
  afterAll(async () => {
    await shutdown();
    DataContext.progress = 'auto';
    rmSync(directory, { recursive: true, force: true });
  });

  const prompts = (bad?: number) => Array.from({ length: 40 }, (_, id) => ({ id, prompt: id === bad ? 'x'.repeat(60) : `the cat ${id % 7} is` }));
  const written = (out: string): Row[] =>
    readdirSync(out)
      .filter((name) => name.endsWith('.jsonl'))
      .flatMap((name) => readFileSync(join(out, name), 'utf8').trim().split('\n').map((line) => JSON.parse(line) as Row))
      .sort((a, b) => (a.id as number) - (b.id as number));

  it('resumes after a failing row: the engine runs only the rest, each row written once as a plain run makes it', async () => {
    const generate = buildLLMProcessor({ checkpoint: model, promptColumn: 'prompt', maxNewTokens: 6, batchSize: 4, concurrency: 1 });
    const reference = (await generate(fromItems(prompts(), { parallelism: 10 })).takeAll()).sort((a, b) => (a.id as number) - (b.id as number));
    const out = join(directory, 'out');
    await expect(generate(fromItems(prompts(30), { parallelism: 10 })).writeJsonl(out, { checkpoint: { idColumn: 'id' } })).rejects.toThrow(/ERR_PROMPT_TOO_LONG|too long|positions/);
    const first = written(out).length;
    expect(first).toBeGreaterThan(0);
    expect(first).toBeLessThan(40);
    const resumed = generate(fromItems(prompts(), { parallelism: 10 }));
    await resumed.writeJsonl(out, { checkpoint: { idColumn: 'id' } });
    const rows = written(out);
    expect(rows.map((row) => row.id)).toEqual(reference.map((row) => row.id));
    expect(rows.map((row) => row.generatedText)).toEqual(reference.map((row) => row.generatedText));
    const stats = resumed.stats()!;
    // At least what was visible: an engine killed as the job failed may have recorded a write it
    // had not yet published, which the resume publishes (recover) rather than writes again.
    const resumedRows = stats.checkpoint!.resumedRows;
    expect(resumedRows).toBeGreaterThanOrEqual(first);
    // The engine's counters: prompts of only the rows not written before.
    const engine = stats.operators.find((operator) => operator.name.includes('LLMEngine'))!;
    expect(engine.rowsDone).toBe(40 - resumedRows);
  });
});
