/**
 * How each architecture's checkpoint maps onto one rank's weights: which tensors a decoder needs
 * (checked before any rank reads), and the slices a rank reads for its heads, its MLP columns and
 * its vocabulary rows. Matrices come out in Linear's [out, in] layout, whatever the checkpoint
 * stores, with a block's query, key and value heads stacked into one matrix.
 */
import { ModelLoadError } from '../errors.js';
import type { ResolvedDecoderConfig } from './config.js';
import type { ShardingPlan } from './plan.js';
import type { Checkpoint, SliceOptions } from './safetensors.js';

/** A norm's scale, and for layer norm its shift. */
export interface NormWeights {
  gamma: Float32Array;
  beta?: Float32Array;
}

export interface LayerWeights {
  attentionNorm: NormWeights;
  /** This rank's query heads, then key heads, then value heads: [(heads + 2 × kvHeads) × headSize, hidden]. */
  qkvWeight: Float32Array;
  qkvBias?: Float32Array;
  /** Row-parallel, [hidden, heads × headSize]; its bias is added once, after the allreduce. */
  projectionWeight: Float32Array;
  projectionBias?: Float32Array;
  mlpNorm: NormWeights;
  /** Column-parallel, [inner, hidden]; a gated MLP multiplies silu(gate) into it. */
  upWeight: Float32Array;
  upBias?: Float32Array;
  gateWeight?: Float32Array;
  /** Row-parallel, [hidden, inner]. */
  downWeight: Float32Array;
  downBias?: Float32Array;
}

export interface ShardWeights {
  layers: LayerWeights[];
  tokenEmbedding?: Float32Array;
  /** Learned positions (gpt2). */
  positionEmbedding?: Float32Array;
  finalNorm?: NormWeights;
  /** This rank's rows of the head, [vocabularyPerRank, hidden], zero past the vocabulary's end. */
  head?: Float32Array;
}

type Shape = number[];

/** Conv1D ([in, out]) to Linear ([out, in]). */
function transpose(matrix: Float32Array, rows: number, columns: number): Float32Array {
  const result = new Float32Array(matrix.length);
  for (let row = 0; row < rows; row++) {
    for (let column = 0; column < columns; column++) result[column * rows + row] = matrix[row * columns + column];
  }
  return result;
}

function concatenate(parts: Float32Array[]): Float32Array {
  const result = new Float32Array(parts.reduce((sum, part) => sum + part.length, 0));
  let offset = 0;
  for (const part of parts) {
    result.set(part, offset);
    offset += part.length;
  }
  return result;
}

interface Layout {
  /** Names in full-model checkpoints carry a prefix (GPT2LMHeadModel's 'transformer.', LlamaForCausalLM's 'model.'). */
  prefixes: string[];
  embedding: string;
  /** Every tensor the decoder reads, without prefix, with its shape in the checkpoint; optional ones may be absent. */
  tensors(config: ResolvedDecoderConfig): Array<{ name: string; shape: Shape; optional?: boolean }>;
  layer(read: Reader, config: ResolvedDecoderConfig, plan: ShardingPlan, layer: number, rank: number): Promise<LayerWeights>;
  positionEmbedding?: string;
  finalNorm: { gamma: string; beta?: string };
}

type Reader = {
  (name: string, slice?: SliceOptions): Promise<Float32Array>;
  has(name: string): boolean;
};

const gpt2: Layout = {
  prefixes: ['transformer.', ''],
  embedding: 'wte.weight',
  positionEmbedding: 'wpe.weight',
  finalNorm: { gamma: 'ln_f.weight', beta: 'ln_f.bias' },
  tensors(config) {
    const hidden = config.hiddenSize;
    const inner = config.intermediateSize;
    const tensors = [{ name: 'wte.weight', shape: [config.vocabSize, hidden] }, { name: 'wpe.weight', shape: [config.maxPositions, hidden] }];
    for (let layer = 0; layer < config.numLayers; layer++) {
      const base = `h.${layer}.`;
      tensors.push(
        { name: `${base}ln_1.weight`, shape: [hidden] }, { name: `${base}ln_1.bias`, shape: [hidden] },
        { name: `${base}attn.c_attn.weight`, shape: [hidden, 3 * hidden] }, { name: `${base}attn.c_attn.bias`, shape: [3 * hidden] },
        { name: `${base}attn.c_proj.weight`, shape: [hidden, hidden] }, { name: `${base}attn.c_proj.bias`, shape: [hidden] },
        { name: `${base}ln_2.weight`, shape: [hidden] }, { name: `${base}ln_2.bias`, shape: [hidden] },
        { name: `${base}mlp.c_fc.weight`, shape: [hidden, inner] }, { name: `${base}mlp.c_fc.bias`, shape: [inner] },
        { name: `${base}mlp.c_proj.weight`, shape: [inner, hidden] }, { name: `${base}mlp.c_proj.bias`, shape: [hidden] },
      );
    }
    tensors.push({ name: 'ln_f.weight', shape: [hidden] }, { name: 'ln_f.bias', shape: [hidden] });
    return tensors;
  },
  async layer(read, config, plan, layer, rank) {
    const hidden = config.hiddenSize;
    const width = plan.headsPerRank * plan.headSize;
    const inner = plan.intermediatePerRank;
    const base = `h.${layer}.`;
    const fullBias = await read(`${base}attn.c_attn.bias`);
    const weights: Float32Array[] = [];
    const biases: Float32Array[] = [];
    for (let part = 0; part < 3; part++) {
      // Query, key and value sit side by side in c_attn's columns: this rank's heads of each.
      const first = part * hidden + rank * width;
      weights.push(transpose(await read(`${base}attn.c_attn.weight`, { columns: [first, first + width] }), hidden, width));
      biases.push(fullBias.slice(first, first + width));
    }
    return {
      attentionNorm: { gamma: await read(`${base}ln_1.weight`), beta: await read(`${base}ln_1.bias`) },
      qkvWeight: concatenate(weights),
      qkvBias: concatenate(biases),
      projectionWeight: transpose(await read(`${base}attn.c_proj.weight`, { rows: [rank * width, (rank + 1) * width] }), width, hidden),
      projectionBias: await read(`${base}attn.c_proj.bias`),
      mlpNorm: { gamma: await read(`${base}ln_2.weight`), beta: await read(`${base}ln_2.bias`) },
      upWeight: transpose(await read(`${base}mlp.c_fc.weight`, { columns: [rank * inner, (rank + 1) * inner] }), hidden, inner),
      upBias: (await read(`${base}mlp.c_fc.bias`)).slice(rank * inner, (rank + 1) * inner),
      downWeight: transpose(await read(`${base}mlp.c_proj.weight`, { rows: [rank * inner, (rank + 1) * inner] }), inner, hidden),
      downBias: await read(`${base}mlp.c_proj.bias`),
    };
  },
};

const llama: Layout = {
  prefixes: ['model.', ''],
  embedding: 'embed_tokens.weight',
  finalNorm: { gamma: 'norm.weight' },
  tensors(config) {
    const hidden = config.hiddenSize;
    const inner = config.intermediateSize;
    const queries = config.numHeads * config.headSize;
    const keys = config.numKeyValueHeads * config.headSize;
    const tensors: Array<{ name: string; shape: Shape; optional?: boolean }> = [{ name: 'embed_tokens.weight', shape: [config.vocabSize, hidden] }];
    for (let layer = 0; layer < config.numLayers; layer++) {
      const base = `layers.${layer}.`;
      tensors.push(
        { name: `${base}input_layernorm.weight`, shape: [hidden] },
        { name: `${base}self_attn.q_proj.weight`, shape: [queries, hidden] }, { name: `${base}self_attn.q_proj.bias`, shape: [queries], optional: true },
        { name: `${base}self_attn.k_proj.weight`, shape: [keys, hidden] }, { name: `${base}self_attn.k_proj.bias`, shape: [keys], optional: true },
        { name: `${base}self_attn.v_proj.weight`, shape: [keys, hidden] }, { name: `${base}self_attn.v_proj.bias`, shape: [keys], optional: true },
        { name: `${base}self_attn.o_proj.weight`, shape: [hidden, queries] },
        { name: `${base}post_attention_layernorm.weight`, shape: [hidden] },
        { name: `${base}mlp.gate_proj.weight`, shape: [inner, hidden] },
        { name: `${base}mlp.up_proj.weight`, shape: [inner, hidden] },
        { name: `${base}mlp.down_proj.weight`, shape: [hidden, inner] },
      );
    }
    tensors.push({ name: 'norm.weight', shape: [hidden] });
    return tensors;
  },
  async layer(read, config, plan, layer, rank) {
    const base = `layers.${layer}.self_attn.`;
    const queryRows = plan.headsPerRank * plan.headSize;
    const keyRows = plan.keyValueHeadsPerRank * plan.headSize;
    const inner = plan.intermediatePerRank;
    const rows = (size: number): SliceOptions => ({ rows: [rank * size, (rank + 1) * size] });
    const parts = [['q_proj', queryRows], ['k_proj', keyRows], ['v_proj', keyRows]] as const;
    const weights: Float32Array[] = [];
    for (const [name, size] of parts) weights.push(await read(`${base}${name}.weight`, rows(size)));
    // Qwen2 puts biases on query, key and value; Llama has none.
    let qkvBias: Float32Array | undefined;
    if (read.has(`${base}q_proj.bias`)) {
      const biases: Float32Array[] = [];
      for (const [name, size] of parts) biases.push((await read(`${base}${name}.bias`)).slice(rank * size, (rank + 1) * size));
      qkvBias = concatenate(biases);
    }
    const mlp = `layers.${layer}.mlp.`;
    return {
      attentionNorm: { gamma: await read(`layers.${layer}.input_layernorm.weight`) },
      qkvWeight: concatenate(weights),
      ...(qkvBias ? { qkvBias } : {}),
      projectionWeight: await read(`${base}o_proj.weight`, { columns: [rank * queryRows, (rank + 1) * queryRows] }),
      mlpNorm: { gamma: await read(`layers.${layer}.post_attention_layernorm.weight`) },
      gateWeight: await read(`${mlp}gate_proj.weight`, rows(inner)),
      upWeight: await read(`${mlp}up_proj.weight`, rows(inner)),
      downWeight: await read(`${mlp}down_proj.weight`, { columns: [rank * inner, (rank + 1) * inner] }),
    };
  },
};

const LAYOUTS: Record<ResolvedDecoderConfig['architecture'], Layout> = { gpt2, llama };

/** The prefix the checkpoint's names carry for this architecture. */
function namePrefix(checkpoint: Checkpoint, layout: Layout): string {
  const prefix = layout.prefixes.find((candidate) => checkpoint.has(candidate + layout.embedding));
  if (prefix === undefined) {
    throw new ModelLoadError('ERR_TENSOR_NOT_FOUND', `the checkpoint has no token embedding (${layout.prefixes.map((candidate) => candidate + layout.embedding).join(' or ')}): is it a checkpoint of this architecture?`, { tensor: layout.embedding });
  }
  return prefix;
}

/**
 * Checks that the checkpoint holds every tensor of the config's decoder, in the shape the config
 * implies, before any rank reads it; returns the prefix its names carry.
 */
export function checkCheckpoint(checkpoint: Checkpoint, config: ResolvedDecoderConfig): string {
  const layout = LAYOUTS[config.architecture];
  const prefix = namePrefix(checkpoint, layout);
  const tensors = layout.tensors(config).map((tensor) => ({ ...tensor, name: prefix + tensor.name }));
  const untied = !config.tieWordEmbeddings || checkpoint.has('lm_head.weight');
  if (untied) tensors.push({ name: 'lm_head.weight', shape: [config.vocabSize, config.hiddenSize] });
  for (const { name, shape, optional } of tensors) {
    if (optional && !checkpoint.has(name)) continue;
    const info = checkpoint.info(name);
    if (info.shape.length !== shape.length || info.shape.some((size: number, axis: number) => size !== shape[axis])) {
      throw new ModelLoadError('ERR_MODEL_SHAPE', `${name} has shape [${info.shape}], the config says [${shape}]`, { file: info.file, tensor: name });
    }
  }
  return prefix;
}

/** One rank's weights: its stage's layers cut for its place in the stage, and the ends the stage has. */
export async function loadShardWeights(checkpoint: Checkpoint, config: ResolvedDecoderConfig, plan: ShardingPlan, stageIndex: number, rank: number): Promise<ShardWeights> {
  const layout = LAYOUTS[config.architecture];
  const prefix = checkCheckpoint(checkpoint, config);
  const read = Object.assign((name: string, slice?: SliceOptions) => checkpoint.readFloat32(prefix + name, slice), { has: (name: string) => checkpoint.has(prefix + name) });
  const stage = plan.stages[stageIndex];
  const weights: ShardWeights = { layers: [] };
  for (let layer = stage.firstLayer; layer < stage.endLayer; layer++) weights.layers.push(await layout.layer(read, config, plan, layer, rank));
  if (stage.embeds) {
    weights.tokenEmbedding = await read(layout.embedding);
    if (layout.positionEmbedding) weights.positionEmbedding = await read(layout.positionEmbedding);
  }
  if (stage.hasHead) {
    const { gamma, beta } = layout.finalNorm;
    weights.finalNorm = { gamma: await read(gamma), ...(beta ? { beta: await read(beta) } : {}) };
    const first = rank * plan.vocabularyPerRank;
    const end = Math.min(config.vocabSize, first + plan.vocabularyPerRank);
    const head = new Float32Array(plan.vocabularyPerRank * config.hiddenSize);
    // An untied head (lm_head.weight, [vocab, hidden], never prefixed) wins over the embedding.
    const headName = checkpoint.has('lm_head.weight') ? 'lm_head.weight' : prefix + layout.embedding;
    if (end > first) head.set(await checkpoint.readFloat32(headName, { rows: [first, end] }));
    weights.head = head;
  }
  return weights;
}
