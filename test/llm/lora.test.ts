import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildLLMProcessor, fromItems, init, ModelLoadError, ModelReplica, shutdown, writeSafetensors, type DecoderConfig, type WritableTensor } from '../../lib/index.js';
import { randomWeights, referenceGenerate, TINY, TINY_LLAMA, writeCheckpoint, type Weights } from './fixtures/decoders.js';

/** Seeded values in [-scale, scale). */
function values(count: number, seed: number, scale: number): Float32Array {
  let state = seed;
  return Float32Array.from({ length: count }, () => {
    state = (state + 0x6d2b79f5) | 0;
    let t = Math.imul(state ^ (state >>> 15), 1 | state);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return (((t ^ (t >>> 14)) >>> 0) / 2 ** 32 - 0.5) * 2 * scale;
  });
}

interface AdapterSpec {
  r: number;
  alpha: number;
  rslora?: boolean;
  /** Module path after the layer ('self_attn.q_proj') to its [out, in]. */
  modules: Record<string, [number, number]>;
  seed: number;
}

/** Writes a PEFT adapter directory; returns the A and B of each layer's module. */
async function writeAdapter(directory: string, prefix: string, layers: number, spec: AdapterSpec, extra: Record<string, unknown> = {}): Promise<Map<string, { a: Float32Array; b: Float32Array }>> {
  mkdirSync(directory, { recursive: true });
  const tensors: Record<string, WritableTensor> = {};
  const matrices = new Map<string, { a: Float32Array; b: Float32Array }>();
  let seed = spec.seed;
  for (let layer = 0; layer < layers; layer++) {
    for (const [module, [out, input]] of Object.entries(spec.modules)) {
      const a = values(spec.r * input, seed++, 0.5);
      const b = values(out * spec.r, seed++, 0.5);
      const base = `base_model.model.${prefix}${layer}.${module}`;
      tensors[`${base}.lora_A.weight`] = { dtype: 'F32', shape: [spec.r, input], data: a };
      tensors[`${base}.lora_B.weight`] = { dtype: 'F32', shape: [out, spec.r], data: b };
      matrices.set(`${layer}.${module}`, { a, b });
    }
  }
  await writeSafetensors(join(directory, 'adapter_model.safetensors'), tensors);
  writeFileSync(join(directory, 'adapter_config.json'), JSON.stringify({ peft_type: 'LORA', r: spec.r, lora_alpha: spec.alpha, use_rslora: spec.rslora ?? false, target_modules: Object.keys(spec.modules), bias: 'none', ...extra }));
  return matrices;
}

/** The base weights with each adapted matrix W replaced by W + scale · B A (Conv1D matrices, [in, out], get its transpose). */
function merged(weights: Weights, matrices: Map<string, { a: Float32Array; b: Float32Array }>, spec: AdapterSpec, namePrefix: string, conv1d: boolean): Weights {
  const result: Weights = Object.fromEntries(Object.entries(weights).map(([name, tensor]) => [name, { shape: tensor.shape, data: Float32Array.from(tensor.data) }]));
  const scale = spec.rslora ? spec.alpha / Math.sqrt(spec.r) : spec.alpha / spec.r;
  for (const [key, { a, b }] of matrices) {
    const [layer, ...rest] = key.split('.');
    const module = rest.join('.');
    const [out, input] = spec.modules[module];
    const target = result[`${namePrefix}${layer}.${module}.weight`].data;
    for (let o = 0; o < out; o++) {
      for (let i = 0; i < input; i++) {
        let sum = 0;
        for (let k = 0; k < spec.r; k++) sum += b[o * spec.r + k] * a[k * input + i];
        target[conv1d ? i * out + o : o * input + i] += scale * sum;
      }
    }
  }
  return result;
}

describe('LoRA adapters', () => {
  let directory: string;
  const llama: DecoderConfig = TINY_LLAMA;
  const queries = 8 * 6;
  const keys = 2 * 6;
  const hidden = 32;
  const inner = 48;
  const llamaWeights = randomWeights(llama, 23);
  let llamaCheckpoint: string;
  const one: AdapterSpec = { r: 4, alpha: 8, seed: 100, modules: { 'self_attn.q_proj': [queries, hidden], 'self_attn.v_proj': [keys, hidden], 'self_attn.o_proj': [hidden, queries], 'mlp.gate_proj': [inner, hidden], 'mlp.up_proj': [inner, hidden], 'mlp.down_proj': [hidden, inner] } };
  const two: AdapterSpec = { r: 2, alpha: 4, rslora: true, seed: 900, modules: { 'self_attn.k_proj': [keys, hidden], 'mlp.down_proj': [hidden, inner] } };
  let oneWeights: Weights;
  let twoWeights: Weights;

  beforeAll(async () => {
    directory = mkdtempSync(join(tmpdir(), 'trellis-lora-'));
    llamaCheckpoint = await writeCheckpoint(join(directory, 'llama'), llama, llamaWeights, { prefix: 'model.' });
    oneWeights = merged(llamaWeights, await writeAdapter(join(directory, 'adapters', 'one'), 'model.layers.', 3, one), one, 'layers.', false);
    twoWeights = merged(llamaWeights, await writeAdapter(join(directory, 'adapters', 'two'), 'model.layers.', 3, two), two, 'layers.', false);
    await init({ numCpus: 6 });
  });
  afterAll(async () => {
    await shutdown();
    rmSync(directory, { recursive: true, force: true });
  });

  it('generates with each sequence its own adapter or none, cut 2 × 2, as the reference with the adapter merged into its weights', async () => {
    await using replica = await ModelReplica.create({ checkpoint: llamaCheckpoint, tensorParallel: 2, pipelineParallel: 2, adapters: { one: join(directory, 'adapters', 'one'), two: join(directory, 'adapters', 'two') }, maxLoadedAdapters: 1 });
    expect(replica.adapters).toEqual(['one', 'two']);
    const prompts = [[5, 17, 3], [42, 1], [7, 7, 7, 7], [60, 2, 9], [11]];
    const adapters = ['one', undefined, 'two', 'one', 'two'];
    // One adapter at a time on the ranks: the others wait for it to make way.
    const generations = await replica.generate(prompts.map((tokens, index) => ({ tokens, maxNewTokens: 6, ...(adapters[index] ? { adapter: adapters[index] } : {}) })));
    const weightsOf = { one: oneWeights, two: twoWeights };
    generations.forEach((generation, index) => {
      const weights = adapters[index] ? weightsOf[adapters[index] as 'one' | 'two'] : llamaWeights;
      expect(generation.tokens, `request ${index} (${adapters[index] ?? 'base'})`).toEqual(referenceGenerate(llama, weights, prompts[index], 6));
    });
    // The adapters change the text: a test of them, not of the base model.
    expect(referenceGenerate(llama, oneWeights, prompts[0], 6)).not.toEqual(referenceGenerate(llama, llamaWeights, prompts[0], 6));
    expect(referenceGenerate(llama, twoWeights, prompts[2], 6)).not.toEqual(referenceGenerate(llama, llamaWeights, prompts[2], 6));
    await expect(replica.generate([{ tokens: [1], adapter: 'three' }])).rejects.toMatchObject({ code: 'ERR_ADAPTER', message: /no adapter named "three" \(known: one, two\)/ });
  });

  it('runs several adapters in one step through one stacked pair of matmuls per matrix', async () => {
    await using replica = await ModelReplica.create({ checkpoint: llamaCheckpoint, tensorParallel: 2, adapters: { one: join(directory, 'adapters', 'one'), two: join(directory, 'adapters', 'two') } });
    const prompts = [[5, 17, 3], [42, 1], [7, 7, 7, 7], [60, 2, 9], [11], [3, 3]];
    const adapters = ['one', 'two', undefined, 'two', 'one', 'two'];
    const generations = await replica.generate(prompts.map((tokens, index) => ({ tokens, maxNewTokens: 6, ...(adapters[index] ? { adapter: adapters[index] } : {}) })));
    const weightsOf = { one: oneWeights, two: twoWeights };
    generations.forEach((generation, index) => {
      const weights = adapters[index] ? weightsOf[adapters[index] as 'one' | 'two'] : llamaWeights;
      expect(generation.tokens, `request ${index} (${adapters[index] ?? 'base'})`).toEqual(referenceGenerate(llama, weights, prompts[index], 6));
    });
  });

  it('shares cached prefixes only within one adapter', async () => {
    await using replica = await ModelReplica.create({ checkpoint: llamaCheckpoint, adapters: { one: join(directory, 'adapters', 'one') } });
    const prompt = Array.from({ length: 40 }, (_, index) => (index * 7 + 3) % 101);
    const [base] = await replica.generate([{ tokens: prompt, maxNewTokens: 4 }]);
    const [adapted] = await replica.generate([{ tokens: prompt, maxNewTokens: 4, adapter: 'one' }]);
    expect(replica.stats().reusedPromptTokens).toBe(0);
    const [again] = await replica.generate([{ tokens: prompt, maxNewTokens: 4, adapter: 'one' }]);
    // All but the last of the 40 tokens, from the same prompt's run under the same adapter.
    expect(replica.stats().reusedPromptTokens).toBe(39);
    expect(base.tokens).toEqual(referenceGenerate(llama, llamaWeights, prompt.slice(0, 40), 4));
    expect(adapted.tokens).toEqual(referenceGenerate(llama, oneWeights, prompt, 4));
    expect(again.tokens).toEqual(adapted.tokens);
  });

  it("adapts GPT-2's fused query/key/value and both c_proj matrices across two tensor ranks", async () => {
    const weights = randomWeights(TINY, 31);
    const checkpoint = await writeCheckpoint(join(directory, 'gpt2'), TINY, weights, { prefix: 'transformer.' });
    const spec: AdapterSpec = { r: 3, alpha: 6, seed: 400, modules: { 'attn.c_attn': [96, 32], 'attn.c_proj': [32, 32], 'mlp.c_fc': [64, 32], 'mlp.c_proj': [32, 64] } };
    const adapted = merged(weights, await writeAdapter(join(directory, 'gpt2-adapter'), 'transformer.h.', 4, spec), spec, 'h.', true);
    await using replica = await ModelReplica.create({ checkpoint, tensorParallel: 2, adapters: { tuned: join(directory, 'gpt2-adapter') } });
    const [generation, plain] = await replica.generate([{ tokens: [5, 17, 3], maxNewTokens: 6, adapter: 'tuned' }, { tokens: [5, 17, 3], maxNewTokens: 6 }]);
    expect(generation.tokens).toEqual(referenceGenerate(TINY, adapted, [5, 17, 3], 6));
    expect(plain.tokens).toEqual(referenceGenerate(TINY, weights, [5, 17, 3], 6));
    expect(generation.tokens).not.toEqual(plain.tokens);
  });

  it('refuses adapters that do not fit the model, naming the file and tensor', async () => {
    await using replica = await ModelReplica.create({ checkpoint: llamaCheckpoint });
    const refused = async (name: string, spec: AdapterSpec, extra: Record<string, unknown>, message: RegExp, prefix = 'model.layers.', layers = 3) => {
      const path = join(directory, 'bad', name);
      await writeAdapter(path, prefix, layers, spec, extra);
      const error = await replica.addAdapter(name, path).then(() => undefined, (caught: unknown) => caught);
      expect(error).toBeInstanceOf(ModelLoadError);
      expect((error as ModelLoadError).code).toBe('ERR_ADAPTER');
      expect((error as Error).message).toMatch(message);
      return error as ModelLoadError;
    };
    const shape = await refused('shape', { r: 4, alpha: 8, seed: 1, modules: { 'self_attn.q_proj': [queries + 1, hidden] } }, {}, /q_proj\.lora_B\.weight has shape \[49,4\], the model and r = 4 want \[48,4\]/);
    expect(shape.tensor).toMatch(/q_proj\.lora_B\.weight$/);
    await refused('dora', { r: 2, alpha: 2, seed: 1, modules: { 'self_attn.q_proj': [queries, hidden] } }, { use_dora: true }, /DoRA adapters/);
    await refused('layer', { r: 2, alpha: 2, seed: 1, modules: { 'self_attn.q_proj': [queries, hidden] } }, {}, /names layer 3, the model has 3/, 'model.layers.', 4);
    await refused('module', { r: 2, alpha: 2, seed: 1, modules: { 'self_attn.rotary': [queries, hidden] } }, {}, /adapts 'self_attn\.rotary', which is not one of the model's matrices/);
    await refused('saved', { r: 2, alpha: 2, seed: 1, modules: { 'self_attn.q_proj': [queries, hidden] } }, { modules_to_save: ['lm_head'] }, /modules_to_save \(lm_head\)/);
    const missing = await replica.addAdapter('none', join(directory, 'nowhere')).catch((error: unknown) => error);
    expect(missing).toMatchObject({ code: 'ERR_ADAPTER', message: /no adapter_config\.json/ });
    await replica.addAdapter('one', join(directory, 'adapters', 'one'));
    await replica.addAdapter('one', join(directory, 'adapters', 'one'));
    await expect(replica.addAdapter('one', join(directory, 'adapters', 'two'))).rejects.toThrow(/already .*one, not .*two/);
  });

  it("runs each row with its column's adapter in the processor, from the adapters given or a directory of them", async () => {
    const processor = buildLLMProcessor({ checkpoint: llamaCheckpoint, maxNewTokens: 5, adapters: { one: join(directory, 'adapters', 'one') }, adapterDirectory: join(directory, 'adapters'), tensorParallel: 2 });
    const rows = await processor(fromItems([
      { id: 0, tokens: [5, 17, 3], adapter: 'one' },
      { id: 1, tokens: [5, 17, 3], adapter: 'two' },
      { id: 2, tokens: [5, 17, 3], adapter: null },
    ])).takeAll();
    rows.sort((a, b) => (a.id as number) - (b.id as number));
    expect(Array.from(rows[0].generatedTokens as number[])).toEqual(referenceGenerate(llama, oneWeights, [5, 17, 3], 5));
    expect(Array.from(rows[1].generatedTokens as number[])).toEqual(referenceGenerate(llama, twoWeights, [5, 17, 3], 5));
    expect(Array.from(rows[2].generatedTokens as number[])).toEqual(referenceGenerate(llama, llamaWeights, [5, 17, 3], 5));
    await expect(processor(fromItems([{ tokens: [1], adapter: '../one' }])).takeAll()).rejects.toThrow(/row 0: adapter "\.\.\/one" is not a plain name/);
    await expect(buildLLMProcessor({ checkpoint: llamaCheckpoint, maxNewTokens: 2 })(fromItems([{ tokens: [1], adapter: 'one' }])).takeAll()).rejects.toThrow(/no adapter named "one"/);
  });
});
