/**
 * How each architecture's checkpoint maps onto one rank's weights: which tensors a decoder needs
 * (checked before any rank reads), and the slices a rank reads for its heads, its MLP columns and
 * its vocabulary rows. Matrices come out in Linear's [out, in] layout, whatever the checkpoint
 * stores, with a block's query, key and value heads stacked into one matrix, and in the weight
 * dtype asked for: f32, or bf16 and f16 kept in 16 bits. Norms, biases and learned positions are
 * small and always f32.
 */
import { InvalidArgumentError, ModelLoadError } from '../errors.js';
import type { ResolvedDecoderConfig } from './config.js';
import { isHalfMatrix, quantizeRows, type HalfMatrix, type WeightDType, type WeightMatrix } from './kernels.js';
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
  qkvWeight: WeightMatrix;
  qkvBias?: Float32Array;
  /** Qwen3: RMS norm weights over each head's query and key, [headSize] each, before rotary positions. */
  queryNorm?: Float32Array;
  keyNorm?: Float32Array;
  /** Row-parallel, [hidden, heads × headSize]; its bias is added once, after the allreduce. */
  projectionWeight: WeightMatrix;
  projectionBias?: Float32Array;
  mlpNorm: NormWeights;
  mlp: DenseMlp | ExpertMlp;
}

/** One MLP for every token. */
export interface DenseMlp {
  kind: 'dense';
  /** Column-parallel, [inner, hidden]; a gated MLP multiplies silu(gate) into it. */
  up: WeightMatrix;
  upBias?: Float32Array;
  gate?: WeightMatrix;
  /** Row-parallel, [hidden, inner]; its bias is added once, after the allreduce. */
  down: WeightMatrix;
  downBias?: Float32Array;
}

/**
 * A mixture of experts (Mixtral's sparse MoE block): a router picks each token's topK experts,
 * gated SiLU MLPs each cut across the stage's ranks as a dense MLP is (so the one allreduce
 * after the block sums every rank's share of every expert).
 */
export interface ExpertMlp {
  kind: 'experts';
  /** [experts, hidden], f32 on every rank: each rank routes every token the same way. */
  router: Float32Array;
  topK: number;
  /** Scale the topK probabilities to sum to 1 (Mixtral), or keep them as the softmax over all gave them. */
  normalizeTopK: boolean;
  experts: Array<{ gate: WeightMatrix; up: WeightMatrix; down: WeightMatrix }>;
}

export interface ShardWeights {
  layers: LayerWeights[];
  tokenEmbedding?: WeightMatrix;
  /** Learned positions (gpt2). */
  positionEmbedding?: Float32Array;
  finalNorm?: NormWeights;
  /** This rank's rows of the head, [vocabularyPerRank, hidden], zero past the vocabulary's end. */
  head?: WeightMatrix;
}

type Shape = number[];

/** A matrix as read from the checkpoint: f32 or 16-bit (int8 is made from f32 once a layer is assembled). */
type ReadMatrix = Float32Array | HalfMatrix;

/** The elements of a matrix, whatever their encoding: moving them needs no arithmetic. */
function elementsOf(matrix: ReadMatrix): Float32Array | Uint16Array {
  return isHalfMatrix(matrix) ? matrix.bits : matrix;
}

/** A matrix of the same encoding as `like`, over `elements`. */
function sameEncoding(like: ReadMatrix, elements: Float32Array | Uint16Array): ReadMatrix {
  return isHalfMatrix(like) ? { dtype: like.dtype, bits: elements as Uint16Array } : (elements as Float32Array);
}

/** Conv1D ([in, out]) to Linear ([out, in]). */
function transpose(matrix: ReadMatrix, rows: number, columns: number): ReadMatrix {
  const source = elementsOf(matrix);
  const result = new (source.constructor as Float32ArrayConstructor | Uint16ArrayConstructor)(source.length);
  for (let row = 0; row < rows; row++) {
    for (let column = 0; column < columns; column++) result[column * rows + row] = source[row * columns + column];
  }
  return sameEncoding(matrix, result);
}

function concatenate<T extends ReadMatrix>(parts: T[]): T {
  const sources = parts.map(elementsOf);
  const result = new (sources[0].constructor as Float32ArrayConstructor | Uint16ArrayConstructor)(sources.reduce((sum, part) => sum + part.length, 0));
  let offset = 0;
  for (const part of sources) {
    result.set(part, offset);
    offset += part.length;
  }
  return sameEncoding(parts[0], result) as T;
}

interface Layout {
  /** Names in full-model checkpoints carry a prefix (GPT2LMHeadModel's 'transformer.', LlamaForCausalLM's 'model.'). */
  prefixes: string[];
  embedding: string;
  /**
   * Every tensor the decoder reads, without prefix, with its shape in the checkpoint; optional
   * ones may be absent. `has` (names without prefix) tells which naming a checkpoint uses.
   */
  tensors(config: ResolvedDecoderConfig, has: (name: string) => boolean): Array<{ name: string; shape: Shape; optional?: boolean }>;
  layer(read: Reader, config: ResolvedDecoderConfig, plan: ShardingPlan, layer: number, rank: number): Promise<LayerWeights>;
  positionEmbedding?: string;
  finalNorm: { gamma: string; beta?: string };
}

type Reader = {
  /** A vector (norm, bias, positions) or slice of one, always f32. */
  (name: string, slice?: SliceOptions): Promise<Float32Array>;
  /** A matrix or slice of one, as f32 or in the shard's 16-bit dtype. */
  matrix(name: string, slice?: SliceOptions): Promise<ReadMatrix>;
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
    const weights: ReadMatrix[] = [];
    const biases: Float32Array[] = [];
    for (let part = 0; part < 3; part++) {
      // Query, key and value sit side by side in c_attn's columns: this rank's heads of each.
      const first = part * hidden + rank * width;
      weights.push(transpose(await read.matrix(`${base}attn.c_attn.weight`, { columns: [first, first + width] }), hidden, width));
      biases.push(fullBias.slice(first, first + width));
    }
    return {
      attentionNorm: { gamma: await read(`${base}ln_1.weight`), beta: await read(`${base}ln_1.bias`) },
      qkvWeight: concatenate(weights),
      qkvBias: concatenate(biases),
      projectionWeight: transpose(await read.matrix(`${base}attn.c_proj.weight`, { rows: [rank * width, (rank + 1) * width] }), width, hidden),
      projectionBias: await read(`${base}attn.c_proj.bias`),
      mlpNorm: { gamma: await read(`${base}ln_2.weight`), beta: await read(`${base}ln_2.bias`) },
      mlp: {
        kind: 'dense',
        up: transpose(await read.matrix(`${base}mlp.c_fc.weight`, { columns: [rank * inner, (rank + 1) * inner] }), hidden, inner),
        upBias: (await read(`${base}mlp.c_fc.bias`)).slice(rank * inner, (rank + 1) * inner),
        down: transpose(await read.matrix(`${base}mlp.c_proj.weight`, { rows: [rank * inner, (rank + 1) * inner] }), inner, hidden),
        downBias: await read(`${base}mlp.c_proj.bias`),
      },
    };
  },
};

const llama: Layout = {
  prefixes: ['model.', ''],
  embedding: 'embed_tokens.weight',
  finalNorm: { gamma: 'norm.weight' },
  tensors(config, has) {
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
      );
      if (config.queryKeyNorm) tensors.push({ name: `${base}self_attn.q_norm.weight`, shape: [config.headSize] }, { name: `${base}self_attn.k_norm.weight`, shape: [config.headSize] });
      if (config.numExperts > 0) {
        const names = expertNames(layer, has);
        tensors.push({ name: names.router, shape: [config.numExperts, hidden] });
        for (let expert = 0; expert < config.numExperts; expert++) {
          const { gate, up, down } = names.expert(expert);
          tensors.push({ name: gate, shape: [inner, hidden] }, { name: up, shape: [inner, hidden] }, { name: down, shape: [hidden, inner] });
        }
      } else {
        tensors.push(
          { name: `${base}mlp.gate_proj.weight`, shape: [inner, hidden] },
          { name: `${base}mlp.up_proj.weight`, shape: [inner, hidden] },
          { name: `${base}mlp.down_proj.weight`, shape: [hidden, inner] },
        );
      }
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
    const weights: ReadMatrix[] = [];
    for (const [name, size] of parts) weights.push(await read.matrix(`${base}${name}.weight`, rows(size)));
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
      ...(config.queryKeyNorm ? { queryNorm: await read(`${base}q_norm.weight`), keyNorm: await read(`${base}k_norm.weight`) } : {}),
      projectionWeight: await read.matrix(`${base}o_proj.weight`, { columns: [rank * queryRows, (rank + 1) * queryRows] }),
      mlpNorm: { gamma: await read(`layers.${layer}.post_attention_layernorm.weight`) },
      mlp: config.numExperts > 0 ? await expertMlp(read, config, layer, rows(inner), { columns: [rank * inner, (rank + 1) * inner] }) : {
        kind: 'dense',
        gate: await read.matrix(`${mlp}gate_proj.weight`, rows(inner)),
        up: await read.matrix(`${mlp}up_proj.weight`, rows(inner)),
        down: await read.matrix(`${mlp}down_proj.weight`, { columns: [rank * inner, (rank + 1) * inner] }),
      },
    };
  },
};

/**
 * The names of a sparse MoE block's tensors: Mixtral's (block_sparse_moe, experts' w1 gate, w3
 * up, w2 down) or Qwen's (mlp.gate the router, experts' gate_proj, up_proj, down_proj).
 */
function expertNames(layer: number, has: (name: string) => boolean): { router: string; expert: (index: number) => { gate: string; up: string; down: string } } {
  const mixtral = `layers.${layer}.block_sparse_moe.`;
  if (has(`${mixtral}gate.weight`)) {
    return { router: `${mixtral}gate.weight`, expert: (index) => ({ gate: `${mixtral}experts.${index}.w1.weight`, up: `${mixtral}experts.${index}.w3.weight`, down: `${mixtral}experts.${index}.w2.weight` }) };
  }
  const qwen = `layers.${layer}.mlp.`;
  return { router: `${qwen}gate.weight`, expert: (index) => ({ gate: `${qwen}experts.${index}.gate_proj.weight`, up: `${qwen}experts.${index}.up_proj.weight`, down: `${qwen}experts.${index}.down_proj.weight` }) };
}

/** A sparse MoE block's router and this rank's share of each expert. */
async function expertMlp(read: Reader, config: ResolvedDecoderConfig, layer: number, outputRows: SliceOptions, inputColumns: SliceOptions): Promise<ExpertMlp> {
  const names = expertNames(layer, read.has);
  const experts: ExpertMlp['experts'] = [];
  for (let expert = 0; expert < config.numExperts; expert++) {
    const { gate, up, down } = names.expert(expert);
    experts.push({ gate: await read.matrix(gate, outputRows), up: await read.matrix(up, outputRows), down: await read.matrix(down, inputColumns) });
  }
  return { kind: 'experts', router: await read(names.router), topK: config.numExpertsPerToken, normalizeTopK: config.normalizeTopKProbabilities, experts };
}

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
  const tensors = layout.tensors(config, (name) => checkpoint.has(prefix + name)).map((tensor) => ({ ...tensor, name: prefix + tensor.name }));
  // No lm_head and untied embeddings: a base model saved without its head (an embedding or classification model).
  if (checkpoint.has('lm_head.weight')) tensors.push({ name: 'lm_head.weight', shape: [config.vocabSize, config.hiddenSize] });
  if (checkpoint.has('score.weight')) {
    const info = checkpoint.info('score.weight');
    if (info.shape.length !== 2 || info.shape[1] !== config.hiddenSize) throw new ModelLoadError('ERR_MODEL_SHAPE', `score.weight has shape [${info.shape}], a classification head needs [labels, ${config.hiddenSize}]`, { file: info.file, tensor: 'score.weight' });
  }
  for (const { name, shape, optional } of tensors) {
    if (optional && !checkpoint.has(name)) continue;
    const info = checkpoint.info(name);
    if (info.shape.length !== shape.length || info.shape.some((size: number, axis: number) => size !== shape[axis])) {
      throw new ModelLoadError('ERR_MODEL_SHAPE', `${name} has shape [${info.shape}], the config says [${shape}]`, { file: info.file, tensor: name });
    }
  }
  return prefix;
}

/**
 * Where the checkpoint's language-model head is: its own lm_head.weight, the token embedding
 * (tied), or nowhere (untied embeddings and no lm_head: a model saved for embeddings or
 * classification, which can read text but not pick tokens).
 */
export function languageHead(checkpoint: Checkpoint, config: ResolvedDecoderConfig): 'lm_head' | 'embedding' | 'none' {
  if (checkpoint.has('lm_head.weight')) return 'lm_head';
  return config.tieWordEmbeddings ? 'embedding' : 'none';
}

/**
 * The dtype 'auto' means for this checkpoint: the encoding its token embedding is stored in when
 * that is bf16 or f16 (checkpoints are saved in one dtype), else f32. Kept as stored, 16-bit
 * weights compute exactly as their f32 widening would, in half the memory.
 */
export function resolveWeightDType(checkpoint: Checkpoint, config: ResolvedDecoderConfig, requested: WeightDType | 'auto' = 'auto'): WeightDType {
  if (requested !== 'auto') {
    if (requested !== 'f32' && requested !== 'bf16' && requested !== 'f16' && requested !== 'int8') {
      throw new InvalidArgumentError(`weightDtype must be 'auto', 'f32', 'bf16', 'f16' or 'int8', got ${JSON.stringify(requested)}`);
    }
    return requested;
  }
  const layout = LAYOUTS[config.architecture];
  const stored = checkpoint.info(namePrefix(checkpoint, layout) + layout.embedding).dtype;
  return stored === 'BF16' ? 'bf16' : stored === 'F16' ? 'f16' : 'f32';
}

/** Rows [first, end) of a matrix read whole, as the rank's head (zero rows past the end of the vocabulary). */
async function readHead(checkpoint: Checkpoint, name: string, dtype: 'f32' | 'bf16' | 'f16', rows: number, hidden: number, first: number, end: number): Promise<ReadMatrix> {
  if (dtype === 'f32') {
    const head = new Float32Array(rows * hidden);
    if (end > first) head.set(await checkpoint.readFloat32(name, { rows: [first, end] }));
    return head;
  }
  // Zero bits are +0 in both 16-bit encodings.
  const bits = new Uint16Array(rows * hidden);
  if (end > first) bits.set(await checkpoint.readHalf(name, dtype, { rows: [first, end] }));
  return { dtype, bits };
}

/**
 * One rank's weights: its stage's layers cut for its place in the stage, and the ends the stage
 * has, with matrices in `weightDtype` ('auto': see resolveWeightDType).
 */
export async function loadShardWeights(checkpoint: Checkpoint, config: ResolvedDecoderConfig, plan: ShardingPlan, stageIndex: number, rank: number, weightDtype: WeightDType | 'auto' = 'auto'): Promise<ShardWeights> {
  const layout = LAYOUTS[config.architecture];
  const prefix = checkCheckpoint(checkpoint, config);
  const dtype = resolveWeightDType(checkpoint, config, weightDtype);
  // int8 is made from f32, per output row, once a matrix is in Linear's layout.
  const readDtype = dtype === 'int8' ? 'f32' : dtype;
  const quantize = (matrix: ReadMatrix, columns: number): WeightMatrix =>
    dtype === 'int8' ? quantizeRows(matrix as Float32Array, (matrix as Float32Array).length / columns, columns) : matrix;
  const matrix = async (name: string, slice?: SliceOptions): Promise<ReadMatrix> =>
    readDtype === 'f32' ? checkpoint.readFloat32(name, slice) : { dtype: readDtype, bits: await checkpoint.readHalf(name, readDtype, slice) };
  const read = Object.assign((name: string, slice?: SliceOptions) => checkpoint.readFloat32(prefix + name, slice), {
    matrix: (name: string, slice?: SliceOptions) => matrix(prefix + name, slice),
    has: (name: string) => checkpoint.has(prefix + name),
  });
  const stage = plan.stages[stageIndex];
  const weights: ShardWeights = { layers: [] };
  const hidden = config.hiddenSize;
  for (let layer = stage.firstLayer; layer < stage.endLayer; layer++) {
    const weightsOfLayer = await layout.layer(read, config, plan, layer, rank);
    if (dtype === 'int8') {
      // Each matrix's rows are its outputs; its columns its inputs.
      weightsOfLayer.qkvWeight = quantize(weightsOfLayer.qkvWeight as ReadMatrix, hidden);
      weightsOfLayer.projectionWeight = quantize(weightsOfLayer.projectionWeight as ReadMatrix, plan.headsPerRank * plan.headSize);
      const mlp = weightsOfLayer.mlp;
      const matrices = mlp.kind === 'dense' ? [mlp] : mlp.experts;
      for (const part of matrices) {
        part.up = quantize(part.up as ReadMatrix, hidden);
        if (part.gate) part.gate = quantize(part.gate as ReadMatrix, hidden);
        part.down = quantize(part.down as ReadMatrix, plan.intermediatePerRank);
      }
    }
    weights.layers.push(weightsOfLayer);
  }
  if (stage.embeds) {
    weights.tokenEmbedding = quantize(await read.matrix(layout.embedding), hidden);
    if (layout.positionEmbedding) weights.positionEmbedding = await read(layout.positionEmbedding);
  }
  if (stage.hasHead) {
    const { gamma, beta } = layout.finalNorm;
    weights.finalNorm = { gamma: await read(gamma), ...(beta ? { beta: await read(beta) } : {}) };
    const first = rank * plan.vocabularyPerRank;
    const end = Math.min(config.vocabSize, first + plan.vocabularyPerRank);
    // An untied head (lm_head.weight, [vocab, hidden], never prefixed) wins over the embedding.
    const head = languageHead(checkpoint, config);
    const untied = head === 'lm_head';
    if (head === 'none') {
      // Nothing to pick tokens with: the stage's final norm serves embeddings and classification.
    } else if (!untied && weights.tokenEmbedding && first === 0 && plan.vocabularyPerRank === config.vocabSize) {
      // A tied head that is the whole embedding (one stage, one rank) is the embedding: one copy.
      weights.head = weights.tokenEmbedding;
    } else {
      const headName = untied ? 'lm_head.weight' : prefix + layout.embedding;
      weights.head = quantize(await readHead(checkpoint, headName, readDtype, plan.vocabularyPerRank, config.hiddenSize, first, end), hidden);
    }
  }
  return weights;
}
