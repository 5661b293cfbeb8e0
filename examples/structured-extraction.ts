/**
 * Structured extraction for many users at once, the batch job a platform team runs: each user's
 * rows carry their own JSON schema (guided decoding: every output parses and fits the schema)
 * and their own fine-tune (a LoRA adapter found by name in a directory), all in one dataset,
 * through one pool of model replicas over the same base weights, with n-gram speculation on.
 *
 *   node --import tsx examples/structured-extraction.ts                  (CPU ranks)
 *   node --import tsx examples/structured-extraction.ts --device cuda    (a GPU rank: the same job)
 *
 * The model is a small GPT-2 of random weights with a byte-level tokenizer, and the adapters are
 * random too: the values it extracts are noise, but every one is valid JSON of its user's schema,
 * and the work (schemas compiled once per engine, adapters loaded on first use, rows of several
 * adapters in one step) is the real one.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildLLMProcessor, cuda, fromItems, init, shutdown } from '../lib/index.js';
import { byteTokenizerJson } from './model/byte-tokenizer.js';
import { randomWeights, writeCheckpoint, writeRandomAdapter } from './model/random-decoder.js';

const scratch = mkdtempSync(join(tmpdir(), 'trellis-extraction-'));
const config = { vocabSize: 320, hiddenSize: 128, numLayers: 4, numHeads: 4, intermediateSize: 512, maxPositions: 512, layerNormEpsilon: 1e-5 };
const checkpoint = await writeCheckpoint(join(scratch, 'model'), config, randomWeights(config, 2));
writeFileSync(join(checkpoint, 'tokenizer.json'), JSON.stringify(byteTokenizerJson()));

// Two users' fine-tunes, as a platform keeps them: one directory each, under one root.
const adapters = join(scratch, 'adapters');
await writeRandomAdapter(join(adapters, 'invoices'), config, 8, 11);
await writeRandomAdapter(join(adapters, 'reviews'), config, 8, 12);

const invoiceSchema = {
  type: 'object',
  properties: { vendor: { type: 'string', maxLength: 12 }, total: { type: 'number', minimum: 0, maximum: 10000 }, paid: { type: 'boolean' } },
  required: ['vendor', 'total', 'paid'],
};
const reviewSchema = {
  type: 'object',
  properties: { sentiment: { enum: ['positive', 'negative', 'neutral'] }, stars: { type: 'integer', minimum: 1, maximum: 5 } },
  required: ['sentiment', 'stars'],
};

const rows = Array.from({ length: 24 }, (_, id) => {
  const invoice = id % 2 === 0;
  return {
    id,
    user: invoice ? 'invoices' : 'reviews',
    prompt: invoice ? `Invoice ${id}: ACME Corp, total due 1,234.50, paid by card.\nJSON:` : `Review ${id}: arrived late but works fine.\nJSON:`,
    adapter: invoice ? 'invoices' : 'reviews',
    // A text column holds each row's own guide, whatever its schema.
    guidedDecoding: JSON.stringify({ json: invoice ? invoiceSchema : reviewSchema }),
  };
});

const device = process.argv.includes('--device') && process.argv[process.argv.indexOf('--device') + 1] === 'cuda' ? 'cuda' : 'cpu';
if (device === 'cuda' && !cuda.available) throw new Error(`--device cuda: CUDA is not available here (${cuda.reason})`);
await init({ numCpus: 4, ...(device === 'cuda' ? { numGpus: cuda.deviceCount() } : {}) });
try {
  const extract = buildLLMProcessor({
    checkpoint,
    promptColumn: 'prompt',
    adapterDirectory: adapters,
    maxNewTokens: 96,
    batchSize: 8,
    speculation: { method: 'ngram', tokens: 4 },
    device,
  });
  const started = performance.now();
  const results = await extract(fromItems(rows)).takeAll();
  const seconds = (performance.now() - started) / 1000;
  results.sort((a, b) => (a.id as number) - (b.id as number));
  let parsed = 0;
  for (const row of results) {
    if (row.finishReason === 'stop') {
      JSON.parse(row.generatedText as string);
      parsed++;
    }
  }
  for (const row of results.slice(0, 4)) console.log(`${row.user} #${row.id} (${row.finishReason}): ${row.generatedText}`);
  const tokens = results.reduce((sum, row) => sum + (row.generatedTokens as number[]).length, 0);
  console.log(`${results.length} rows on ${device === 'cuda' ? 'GPU' : 'CPU'} ranks, ${parsed} complete JSON documents of their user's schema, ${tokens} tokens in ${seconds.toFixed(2)} s (model and adapters loaded included)`);
} finally {
  await shutdown();
  rmSync(scratch, { recursive: true, force: true });
}
