/**
 * A GPT-2 of random weights written as a real checkpoint: the Conv1D layout and Hugging Face
 * names of a downloaded GPT-2, and its config.json. Text from it is noise; what it is for is
 * running the sharded decoder, its tests and its benchmark where no weights can be downloaded.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { writeSafetensors, type DecoderConfig, type WritableTensor } from '../../lib/index.js';

export type Weights = Record<string, { shape: number[]; data: Float32Array }>;

function generator(seed: number): () => number {
  let state = seed >>> 0 || 1;
  return () => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return (state >>> 0) / 2 ** 32 - 0.5;
  };
}

export function randomWeights(config: DecoderConfig, seed = 1): Weights {
  const random = generator(seed);
  const weights: Weights = {};
  const tensor = (name: string, shape: number[], scale: number, offset = 0) => {
    const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
    for (let i = 0; i < data.length; i++) data[i] = offset + random() * scale;
    weights[name] = { shape, data };
  };
  const h = config.hiddenSize;
  const inner = config.intermediateSize;
  tensor('wte.weight', [config.vocabSize, h], 0.5);
  tensor('wpe.weight', [config.maxPositions, h], 0.2);
  for (let layer = 0; layer < config.numLayers; layer++) {
    const base = `h.${layer}.`;
    tensor(`${base}ln_1.weight`, [h], 0.2, 1);
    tensor(`${base}ln_1.bias`, [h], 0.1);
    tensor(`${base}attn.c_attn.weight`, [h, 3 * h], 0.6);
    tensor(`${base}attn.c_attn.bias`, [3 * h], 0.1);
    tensor(`${base}attn.c_proj.weight`, [h, h], 0.4);
    tensor(`${base}attn.c_proj.bias`, [h], 0.1);
    tensor(`${base}ln_2.weight`, [h], 0.2, 1);
    tensor(`${base}ln_2.bias`, [h], 0.1);
    tensor(`${base}mlp.c_fc.weight`, [h, inner], 0.4);
    tensor(`${base}mlp.c_fc.bias`, [inner], 0.1);
    tensor(`${base}mlp.c_proj.weight`, [inner, h], 0.3);
    tensor(`${base}mlp.c_proj.bias`, [h], 0.1);
  }
  tensor('ln_f.weight', [h], 0.2, 1);
  tensor('ln_f.bias', [h], 0.1);
  return weights;
}

/** Writes model.safetensors and config.json into `directory`; names get `prefix` (GPT2LMHeadModel's 'transformer.'). */
export async function writeCheckpoint(directory: string, config: DecoderConfig, weights: Weights, options: { prefix?: string; dtype?: 'F32' | 'F16' | 'BF16' } = {}): Promise<string> {
  mkdirSync(directory, { recursive: true });
  const tensors: Record<string, WritableTensor> = {};
  for (const [name, tensor] of Object.entries(weights)) tensors[(options.prefix ?? '') + name] = { dtype: options.dtype ?? 'F32', shape: tensor.shape, data: tensor.data };
  await writeSafetensors(join(directory, 'model.safetensors'), tensors);
  writeFileSync(join(directory, 'config.json'), JSON.stringify({
    model_type: 'gpt2',
    vocab_size: config.vocabSize,
    n_embd: config.hiddenSize,
    n_layer: config.numLayers,
    n_head: config.numHeads,
    n_inner: config.intermediateSize,
    n_positions: config.maxPositions,
    layer_norm_epsilon: config.layerNormEpsilon,
  }));
  return directory;
}
