/**
 * Offline generation with a model cut across processes: a dataset of prompts runs through a
 * GPT-2 split two ways by tensor parallelism and two ways by pipeline (four rank actors on a
 * compiled graph), fed by continuous batching. The prompts share a 64-token beginning, as prompts
 * with one system prompt do, and prefix caching reads it once per replica rather than once per
 * prompt; the weights stay in bf16, as the checkpoint stores them.
 *
 *   node --import tsx examples/sharded-generation.ts [checkpoint directory]
 *
 * Give it a GPT-2 checkpoint (a directory with model.safetensors and config.json, as Hugging Face
 * publishes gpt2) and token ids are generated from it; without one, it makes a small GPT-2 of
 * random weights first (saved in bf16), whose tokens are noise but whose work is the same.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildLLMProcessor, fromItems, init, shutdown } from '../lib/index.js';
import { randomWeights, writeCheckpoint } from './model/random-decoder.js';

const given = process.argv[2];
const scratch = given ? undefined : mkdtempSync(join(tmpdir(), 'trellis-gpt2-'));
const config = { vocabSize: 4096, hiddenSize: 256, numLayers: 8, numHeads: 8, intermediateSize: 1024, maxPositions: 256, layerNormEpsilon: 1e-5 };
const checkpoint = given ?? (await writeCheckpoint(scratch!, config, randomWeights(config, 1), { dtype: 'BF16' }));

await init({ numCpus: 4 });
try {
  const shared = Array.from({ length: 64 }, (_, t) => (t * 53 + 11) % 4096);
  const prompts = Array.from({ length: 48 }, (_, id) => ({ id, tokens: [...shared, ...Array.from({ length: 8 + (id % 24) }, (_, t) => (id * 97 + t * 31) % 4096)] }));
  const generate = buildLLMProcessor({ checkpoint, tensorParallel: 2, pipelineParallel: 2, batchSize: 8, maxNewTokens: 24 });
  const started = performance.now();
  const rows = await generate(fromItems(prompts)).takeAll();
  const seconds = (performance.now() - started) / 1000;
  rows.sort((a, b) => (a.id as number) - (b.id as number));
  for (const row of rows.slice(0, 3)) console.log(`prompt ${row.id} (${row.promptTokens} tokens) -> ${Array.from(row.generatedTokens as number[]).join(' ')}`);
  const tokens = rows.reduce((sum, row) => sum + (row.generatedTokens as number[]).length, 0);
  console.log(`${rows.length} prompts, ${tokens} tokens generated in ${seconds.toFixed(2)} s (${(tokens / seconds).toFixed(0)} tokens/s, model load included)`);
} finally {
  await shutdown();
  if (scratch) rmSync(scratch, { recursive: true, force: true });
}
