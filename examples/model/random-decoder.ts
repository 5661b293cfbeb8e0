/**
 * A decoder of random weights written as a real checkpoint: the names, matrix layouts and
 * config.json of a downloaded GPT-2 or Llama. Text from it is noise; what it is for is running the
 * sharded decoder, its tests and its benchmark where no weights can be downloaded.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { checkDecoderConfig, writeSafetensors, type DecoderConfig, type WritableTensor } from '../../lib/index.js';

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

/** Weights under the checkpoint's names, without the full model's prefix. */
export function randomWeights(decoder: DecoderConfig, seed = 1): Weights {
  const config = checkDecoderConfig(decoder);
  const random = generator(seed);
  const weights: Weights = {};
  const tensor = (name: string, shape: number[], scale: number, offset = 0) => {
    const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
    for (let i = 0; i < data.length; i++) data[i] = offset + random() * scale;
    weights[name] = { shape, data };
  };
  const h = config.hiddenSize;
  const inner = config.intermediateSize;
  if (config.architecture === 'gpt2') {
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
  const queries = config.numHeads * config.headSize;
  const keys = config.numKeyValueHeads * config.headSize;
  tensor('embed_tokens.weight', [config.vocabSize, h], 0.5);
  for (let layer = 0; layer < config.numLayers; layer++) {
    const base = `layers.${layer}.`;
    tensor(`${base}input_layernorm.weight`, [h], 0.2, 1);
    tensor(`${base}self_attn.q_proj.weight`, [queries, h], 0.6);
    tensor(`${base}self_attn.k_proj.weight`, [keys, h], 0.6);
    tensor(`${base}self_attn.v_proj.weight`, [keys, h], 0.6);
    tensor(`${base}self_attn.o_proj.weight`, [h, queries], 0.4);
    tensor(`${base}post_attention_layernorm.weight`, [h], 0.2, 1);
    if (config.queryKeyNorm) {
      tensor(`${base}self_attn.q_norm.weight`, [config.headSize], 0.2, 1);
      tensor(`${base}self_attn.k_norm.weight`, [config.headSize], 0.2, 1);
    }
    if (config.numExperts > 0) {
      // A sparse block: a router and gated experts, under Mixtral's names (w1 gate, w3 up, w2
      // down) or, for a Qwen3 model, Qwen's (gate_proj, up_proj, down_proj).
      const qwen = config.queryKeyNorm;
      const moe = qwen ? `${base}mlp.` : `${base}block_sparse_moe.`;
      tensor(`${moe}gate.weight`, [config.numExperts, h], 1);
      for (let expert = 0; expert < config.numExperts; expert++) {
        const names = qwen ? ['gate_proj', 'up_proj', 'down_proj'] : ['w1', 'w3', 'w2'];
        tensor(`${moe}experts.${expert}.${names[0]}.weight`, [inner, h], 0.4);
        tensor(`${moe}experts.${expert}.${names[1]}.weight`, [inner, h], 0.4);
        tensor(`${moe}experts.${expert}.${names[2]}.weight`, [h, inner], 0.3);
      }
      continue;
    }
    tensor(`${base}mlp.gate_proj.weight`, [inner, h], 0.4);
    tensor(`${base}mlp.up_proj.weight`, [inner, h], 0.4);
    tensor(`${base}mlp.down_proj.weight`, [h, inner], 0.3);
  }
  tensor('norm.weight', [h], 0.2, 1);
  if (!config.tieWordEmbeddings) tensor('lm_head.weight', [config.vocabSize, h], 0.5);
  return weights;
}

function huggingFaceConfig(decoder: DecoderConfig): Record<string, unknown> {
  const config = checkDecoderConfig(decoder);
  if (config.architecture === 'gpt2') {
    return {
      model_type: 'gpt2', vocab_size: config.vocabSize, n_embd: config.hiddenSize, n_layer: config.numLayers, n_head: config.numHeads,
      n_inner: config.intermediateSize, n_positions: config.maxPositions, layer_norm_epsilon: config.layerNormEpsilon,
    };
  }
  // A window is Mistral's, experts Mixtral's: the same layout, under their own model types.
  return {
    model_type: config.queryKeyNorm ? (config.numExperts > 0 ? 'qwen3_moe' : 'qwen3') : config.numExperts > 0 ? 'mixtral' : config.slidingWindow ? 'mistral' : 'llama', ...(config.slidingWindow ? { sliding_window: config.slidingWindow } : {}), vocab_size: config.vocabSize, hidden_size: config.hiddenSize, num_hidden_layers: config.numLayers,
    ...(config.numExperts > 0 && !config.queryKeyNorm ? { num_local_experts: config.numExperts, num_experts_per_tok: config.numExpertsPerToken } : {}),
    ...(config.numExperts > 0 && config.queryKeyNorm ? { num_experts: config.numExperts, num_experts_per_tok: config.numExpertsPerToken, moe_intermediate_size: config.intermediateSize, norm_topk_prob: config.normalizeTopKProbabilities } : {}),
    num_attention_heads: config.numHeads, num_key_value_heads: config.numKeyValueHeads, head_dim: config.headSize,
    intermediate_size: config.intermediateSize, max_position_embeddings: config.maxPositions, rms_norm_eps: config.layerNormEpsilon,
    rope_theta: config.ropeTheta, tie_word_embeddings: config.tieWordEmbeddings,
    ...(config.ropeScaling ? {
      rope_scaling: {
        rope_type: 'llama3', factor: config.ropeScaling.factor, low_freq_factor: config.ropeScaling.lowFrequencyFactor,
        high_freq_factor: config.ropeScaling.highFrequencyFactor, original_max_position_embeddings: config.ropeScaling.originalMaxPositions,
      },
    } : {}),
  };
}

/**
 * Writes model.safetensors and config.json into `directory`. Names get `prefix` (a full model's
 * 'transformer.' or 'model.'), except lm_head and score, which a full model keeps at the top.
 */
export async function writeCheckpoint(directory: string, config: DecoderConfig, weights: Weights, options: { prefix?: string; dtype?: 'F32' | 'F16' | 'BF16' } = {}): Promise<string> {
  mkdirSync(directory, { recursive: true });
  const tensors: Record<string, WritableTensor> = {};
  for (const [name, tensor] of Object.entries(weights)) {
    // A full model keeps its heads (lm_head, a classifier's score) at the top, unprefixed.
    tensors[name === 'lm_head.weight' || name === 'score.weight' ? name : (options.prefix ?? '') + name] = { dtype: options.dtype ?? 'F32', shape: tensor.shape, data: tensor.data };
  }
  await writeSafetensors(join(directory, 'model.safetensors'), tensors);
  writeFileSync(join(directory, 'config.json'), JSON.stringify(huggingFaceConfig(config)));
  return directory;
}

/**
 * Writes a PEFT LoRA adapter of random matrices for a GPT-2-layout decoder (every attention and
 * MLP matrix, rank `r`) into `directory`: something for a replica to load and apply.
 */
export async function writeRandomAdapter(directory: string, decoder: DecoderConfig, r: number, seed: number): Promise<string> {
  const config = checkDecoderConfig(decoder);
  const random = generator(seed);
  const h = config.hiddenSize;
  const modules: Record<string, [number, number]> = { 'attn.c_attn': [3 * h, h], 'attn.c_proj': [h, h], 'mlp.c_fc': [config.intermediateSize, h], 'mlp.c_proj': [h, config.intermediateSize] };
  const tensors: Record<string, WritableTensor> = {};
  for (let layer = 0; layer < config.numLayers; layer++) {
    for (const [module, [out, input]] of Object.entries(modules)) {
      const base = `base_model.model.transformer.h.${layer}.${module}`;
      tensors[`${base}.lora_A.weight`] = { dtype: 'F32', shape: [r, input], data: Float32Array.from({ length: r * input }, () => random() * 0.2) };
      tensors[`${base}.lora_B.weight`] = { dtype: 'F32', shape: [out, r], data: Float32Array.from({ length: out * r }, () => random() * 0.2) };
    }
  }
  mkdirSync(directory, { recursive: true });
  await writeSafetensors(join(directory, 'adapter_model.safetensors'), tensors);
  writeFileSync(join(directory, 'adapter_config.json'), JSON.stringify({ peft_type: 'LORA', r, lora_alpha: 2 * r, target_modules: ['c_attn', 'c_proj', 'c_fc'], bias: 'none' }));
  return directory;
}
