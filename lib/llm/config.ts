/**
 * The decoders a sharded model runs, described by one config:
 * - 'gpt2': pre-norm blocks with layer norm, learned positions, a GELU MLP, a tied head; Conv1D
 *   matrices ([in, out]) in its checkpoints;
 * - 'llama': RMS norm, rotary positions, grouped-query attention, a gated SiLU MLP; Linear
 *   matrices ([out, in]). Qwen2's checkpoints are this layout with biases on query, key and
 *   value, and load as it; Mixtral's are it with a sparse mixture of experts for the MLP.
 * Read from a checkpoint's config.json (Hugging Face names) or given directly.
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { InvalidArgumentError, ModelLoadError } from '../errors.js';

export type Architecture = 'gpt2' | 'llama';

/** Llama 3's stretch of the rotary frequencies for contexts past the one it was trained on. */
export interface RopeScaling {
  type: 'llama3';
  factor: number;
  lowFrequencyFactor: number;
  highFrequencyFactor: number;
  originalMaxPositions: number;
}

export interface DecoderConfig {
  /** Default 'gpt2'. */
  architecture?: Architecture;
  vocabSize: number;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  /** Key/value heads, fewer than numHeads for grouped-query attention (default numHeads). */
  numKeyValueHeads?: number;
  /** Width of a head (default hiddenSize / numHeads). */
  headSize?: number;
  /** The MLP's inner width (GPT-2: 4 × hiddenSize). */
  intermediateSize: number;
  /** Longest sequence, prompt and generated tokens together. */
  maxPositions: number;
  /** The norms' epsilon (layer norm for gpt2, RMS norm for llama). */
  layerNormEpsilon: number;
  /** Rotary positions (llama): the base of the frequencies (default 10000). */
  ropeTheta?: number;
  ropeScaling?: RopeScaling;
  /** The head reads the token embedding's rows (gpt2: always; llama: as its config says, default false). */
  tieWordEmbeddings?: boolean;
  /**
   * Sliding-window attention (llama layout, as Mistral's): each position attends to the last
   * `slidingWindow` positions, itself included. Default 0: every earlier position.
   */
  slidingWindow?: number;
  /**
   * A sparse mixture of experts in every layer's MLP (llama layout, as Mixtral's): this many
   * gated SiLU experts of intermediateSize each (default 0: a dense MLP).
   */
  numExperts?: number;
  /** Experts each token is routed to (default 2). */
  numExpertsPerToken?: number;
  /** Scale each token's chosen experts' probabilities to sum to 1 (default true, as Mixtral does). */
  normalizeTopKProbabilities?: boolean;
  /**
   * RMS-normalize each head's query and key before rotary positions, with a learned weight per
   * head dimension (llama layout, as Qwen3's q_norm and k_norm; default false).
   */
  queryKeyNorm?: boolean;
}

const INTEGER_FIELDS = ['vocabSize', 'hiddenSize', 'numLayers', 'numHeads', 'intermediateSize', 'maxPositions'] as const;

function configError(message: string): InvalidArgumentError {
  return new InvalidArgumentError(`decoder config: ${message}`, 'ERR_MODEL_CONFIG');
}

function positiveNumber(value: unknown, field: string): number {
  if (typeof value !== 'number' || !(value > 0) || !Number.isFinite(value)) throw configError(`${field} must be a positive number, got ${String(value)}`);
  return value;
}

function positiveInteger(value: unknown, field: string): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1) throw configError(`${field} must be a positive integer, got ${String(value)}`);
  return value;
}

/** The config checked field by field (errors name the field), with every default filled in. */
export function checkDecoderConfig(config: unknown): Required<Omit<DecoderConfig, 'ropeScaling'>> & Pick<DecoderConfig, 'ropeScaling'> {
  if (typeof config !== 'object' || config === null) throw new InvalidArgumentError(`a decoder config must be an object, got ${String(config)}`, 'ERR_MODEL_CONFIG');
  const fields = config as Record<string, unknown>;
  const architecture = fields.architecture ?? 'gpt2';
  if (architecture !== 'gpt2' && architecture !== 'llama') throw configError(`architecture must be 'gpt2' or 'llama', got ${String(architecture)}`);
  for (const field of INTEGER_FIELDS) positiveInteger(fields[field], field);
  const numHeads = fields.numHeads as number;
  const hiddenSize = fields.hiddenSize as number;
  const numKeyValueHeads = positiveInteger(fields.numKeyValueHeads ?? numHeads, 'numKeyValueHeads');
  if (numHeads % numKeyValueHeads !== 0) throw configError(`numHeads ${numHeads} is not a multiple of numKeyValueHeads ${numKeyValueHeads}`);
  if (fields.headSize === undefined && hiddenSize % numHeads !== 0) throw configError(`hiddenSize ${hiddenSize} is not a multiple of numHeads ${numHeads}`);
  const headSize = positiveInteger(fields.headSize ?? hiddenSize / numHeads, 'headSize');
  if (architecture === 'gpt2' && (numKeyValueHeads !== numHeads || headSize * numHeads !== hiddenSize)) {
    throw configError('gpt2 has as many key/value heads as heads, of hiddenSize / numHeads each');
  }
  if (architecture === 'llama' && headSize % 2 !== 0) throw configError(`rotary positions need an even headSize, got ${headSize}`);
  const tieWordEmbeddings = fields.tieWordEmbeddings ?? architecture === 'gpt2';
  if (typeof tieWordEmbeddings !== 'boolean') throw configError(`tieWordEmbeddings must be a boolean, got ${String(tieWordEmbeddings)}`);
  if (architecture === 'gpt2' && !tieWordEmbeddings) throw configError('gpt2 ties its head to the token embedding');
  const slidingWindow = fields.slidingWindow ?? 0;
  if (typeof slidingWindow !== 'number' || !Number.isInteger(slidingWindow) || slidingWindow < 0) throw configError(`slidingWindow must be an integer >= 0 (0: none), got ${String(slidingWindow)}`);
  if (architecture === 'gpt2' && slidingWindow !== 0) throw configError('gpt2 has no sliding window');
  const numExperts = fields.numExperts ?? 0;
  if (typeof numExperts !== 'number' || !Number.isInteger(numExperts) || numExperts < 0) throw configError(`numExperts must be an integer >= 0 (0: a dense MLP), got ${String(numExperts)}`);
  if (architecture === 'gpt2' && numExperts !== 0) throw configError('gpt2 has no mixture of experts');
  const numExpertsPerToken = numExperts === 0 ? 0 : positiveInteger(fields.numExpertsPerToken ?? 2, 'numExpertsPerToken');
  if (numExpertsPerToken > numExperts) throw configError(`numExpertsPerToken ${numExpertsPerToken} is more than numExperts ${numExperts}`);
  const queryKeyNorm = fields.queryKeyNorm ?? false;
  if (typeof queryKeyNorm !== 'boolean') throw configError(`queryKeyNorm must be a boolean, got ${String(queryKeyNorm)}`);
  if (architecture === 'gpt2' && queryKeyNorm) throw configError('gpt2 has no query/key norms');
  const normalizeTopKProbabilities = fields.normalizeTopKProbabilities ?? true;
  if (typeof normalizeTopKProbabilities !== 'boolean') throw configError(`normalizeTopKProbabilities must be a boolean, got ${String(normalizeTopKProbabilities)}`);
  let ropeScaling: RopeScaling | undefined;
  if (fields.ropeScaling !== undefined && fields.ropeScaling !== null) {
    const scaling = fields.ropeScaling as Record<string, unknown>;
    if (scaling.type !== 'llama3') throw configError(`ropeScaling.type must be 'llama3', got ${String(scaling.type)}`);
    ropeScaling = {
      type: 'llama3',
      factor: positiveNumber(scaling.factor, 'ropeScaling.factor'),
      lowFrequencyFactor: positiveNumber(scaling.lowFrequencyFactor, 'ropeScaling.lowFrequencyFactor'),
      highFrequencyFactor: positiveNumber(scaling.highFrequencyFactor, 'ropeScaling.highFrequencyFactor'),
      originalMaxPositions: positiveInteger(scaling.originalMaxPositions, 'ropeScaling.originalMaxPositions'),
    };
    if (ropeScaling.highFrequencyFactor <= ropeScaling.lowFrequencyFactor) throw configError('ropeScaling.highFrequencyFactor must be above lowFrequencyFactor');
  }
  return {
    architecture,
    vocabSize: fields.vocabSize as number,
    hiddenSize,
    numLayers: fields.numLayers as number,
    numHeads,
    numKeyValueHeads,
    headSize,
    intermediateSize: fields.intermediateSize as number,
    maxPositions: fields.maxPositions as number,
    layerNormEpsilon: positiveNumber(fields.layerNormEpsilon ?? 1e-5, 'layerNormEpsilon'),
    ropeTheta: positiveNumber(fields.ropeTheta ?? 10000, 'ropeTheta'),
    tieWordEmbeddings,
    // A window as long as the positions is no window.
    slidingWindow: slidingWindow >= (fields.maxPositions as number) ? 0 : slidingWindow,
    numExperts,
    numExpertsPerToken,
    normalizeTopKProbabilities,
    queryKeyNorm,
    ...(ropeScaling ? { ropeScaling } : {}),
  };
}

/** A resolved config: every default filled in. */
export type ResolvedDecoderConfig = ReturnType<typeof checkDecoderConfig>;

function fromGpt2(json: Record<string, unknown>): DecoderConfig {
  const hiddenSize = json.n_embd as number;
  return {
    architecture: 'gpt2',
    vocabSize: json.vocab_size as number,
    hiddenSize,
    numLayers: json.n_layer as number,
    numHeads: json.n_head as number,
    intermediateSize: (json.n_inner as number | null | undefined) ?? (typeof hiddenSize === 'number' ? 4 * hiddenSize : NaN),
    maxPositions: json.n_positions as number,
    layerNormEpsilon: (json.layer_norm_epsilon as number | undefined) ?? 1e-5,
  };
}

function fromLlama(json: Record<string, unknown>, file: string): DecoderConfig {
  const scaling = json.rope_scaling as Record<string, unknown> | null | undefined;
  let ropeScaling: DecoderConfig['ropeScaling'];
  if (scaling) {
    const type = scaling.rope_type ?? scaling.type;
    if (type !== 'llama3') throw new ModelLoadError('ERR_MODEL_CONFIG', `${file}: rope_scaling of type '${String(type)}' is not supported (only 'llama3')`, { file });
    ropeScaling = {
      type: 'llama3',
      factor: scaling.factor as number,
      lowFrequencyFactor: scaling.low_freq_factor as number,
      highFrequencyFactor: scaling.high_freq_factor as number,
      originalMaxPositions: scaling.original_max_position_embeddings as number,
    };
  }
  // Mistral's window covers every layer; Qwen2's covers only the layers from max_window_layers on
  // (and its configs disagree on which), which this decoder does not do.
  const qwen3 = json.model_type === 'qwen3' || json.model_type === 'qwen3_moe';
  if ((json.model_type === 'qwen2' || qwen3) && json.use_sliding_window === true) {
    throw new ModelLoadError('ERR_MODEL_ARCHITECTURE', `${file}: Qwen's per-layer sliding window (use_sliding_window) is not supported`, { file });
  }
  let experts: Partial<DecoderConfig> = {};
  if (json.model_type === 'mixtral') experts = { numExperts: json.num_local_experts as number, numExpertsPerToken: (json.num_experts_per_tok as number | undefined) ?? 2 };
  if (json.model_type === 'qwen3_moe') {
    // Every layer sparse: layers kept dense (mlp_only_layers, decoder_sparse_step) would need two MLP widths.
    const dense = json.mlp_only_layers as number[] | undefined;
    if ((Array.isArray(dense) && dense.length > 0) || ((json.decoder_sparse_step as number | undefined) ?? 1) !== 1) {
      throw new ModelLoadError('ERR_MODEL_ARCHITECTURE', `${file}: dense layers among the sparse ones (mlp_only_layers, decoder_sparse_step) are not supported`, { file });
    }
    experts = {
      numExperts: json.num_experts as number,
      numExpertsPerToken: (json.num_experts_per_tok as number | undefined) ?? 2,
      normalizeTopKProbabilities: (json.norm_topk_prob as boolean | undefined) ?? false,
      intermediateSize: json.moe_intermediate_size as number,
    };
  }
  const sliding = json.model_type === 'mistral' || json.model_type === 'mixtral' ? (json.sliding_window as number | null | undefined) : undefined;
  return {
    architecture: 'llama',
    vocabSize: json.vocab_size as number,
    hiddenSize: json.hidden_size as number,
    numLayers: json.num_hidden_layers as number,
    numHeads: json.num_attention_heads as number,
    numKeyValueHeads: (json.num_key_value_heads as number | undefined) ?? (json.num_attention_heads as number),
    ...(json.head_dim !== undefined && json.head_dim !== null ? { headSize: json.head_dim as number } : {}),
    intermediateSize: json.intermediate_size as number,
    maxPositions: json.max_position_embeddings as number,
    layerNormEpsilon: (json.rms_norm_eps as number | undefined) ?? 1e-6,
    ropeTheta: (json.rope_theta as number | undefined) ?? 10000,
    tieWordEmbeddings: (json.tie_word_embeddings as boolean | undefined) ?? false,
    ...(typeof sliding === 'number' ? { slidingWindow: sliding } : {}),
    ...(ropeScaling ? { ropeScaling } : {}),
    ...(qwen3 ? { queryKeyNorm: true } : {}),
    ...experts,
  };
}

/** Hugging Face model types that load as the Llama layout. */
const LLAMA_LAYOUT_TYPES = ['llama', 'mistral', 'mixtral', 'qwen2', 'qwen3', 'qwen3_moe'];

/**
 * A Hugging Face config.json as a DecoderConfig: GPT-2, or the Llama layout (llama; mistral with
 * its sliding window; mixtral and qwen3_moe with their experts; qwen2; qwen3 with its query/key
 * norms).
 */
export function configFromHuggingFace(json: Record<string, unknown>, file = 'config.json'): ResolvedDecoderConfig {
  const modelType = json.model_type ?? 'gpt2';
  let config: DecoderConfig;
  if (modelType === 'gpt2') config = fromGpt2(json);
  else if (LLAMA_LAYOUT_TYPES.includes(modelType as string)) config = fromLlama(json, file);
  else throw new ModelLoadError('ERR_MODEL_ARCHITECTURE', `${file}: model_type '${String(modelType)}' is not supported (gpt2, ${LLAMA_LAYOUT_TYPES.join(', ')})`, { file });
  try {
    return checkDecoderConfig(config);
  } catch (error) {
    throw new ModelLoadError('ERR_MODEL_CONFIG', `${file}: ${(error as Error).message}`, { file });
  }
}

/** The directory a checkpoint path names: itself, or the one holding a .safetensors file or an index. */
export function checkpointDirectory(checkpoint: string): string {
  // A URL (s3://...) names its directory, or a file in it.
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(checkpoint)) return /\.(safetensors|json)$/i.test(checkpoint) ? checkpoint.slice(0, checkpoint.lastIndexOf('/')) : checkpoint.replace(/\/+$/, '');
  return existsSync(checkpoint) && statSync(checkpoint).isDirectory() ? checkpoint : dirname(checkpoint);
}

/**
 * The config beside a checkpoint: config.json in the checkpoint's directory (or in the directory
 * given). Undefined when there is none.
 */
export function readCheckpointConfig(checkpoint: string): ResolvedDecoderConfig | undefined {
  const directory = checkpointDirectory(checkpoint);
  const file = join(directory, 'config.json');
  if (!existsSync(file)) return undefined;
  let json: unknown;
  try {
    json = JSON.parse(readFileSync(file, 'utf8'));
  } catch (error) {
    throw new ModelLoadError('ERR_MODEL_CONFIG', `${file} is not valid JSON: ${(error as Error).message}`, { file });
  }
  if (typeof json !== 'object' || json === null) throw new ModelLoadError('ERR_MODEL_CONFIG', `${file} does not hold an object`, { file });
  return configFromHuggingFace(json as Record<string, unknown>, file);
}

/**
 * The tokens that end a generation by default: eos_token_id of generation_config.json, else of
 * config.json, beside the checkpoint (a number or a list). Empty when neither names one.
 */
export function readEndOfSequenceTokens(checkpoint: string): number[] {
  const directory = checkpointDirectory(checkpoint);
  for (const name of ['generation_config.json', 'config.json']) {
    const file = join(directory, name);
    if (!existsSync(file)) continue;
    let json: { eos_token_id?: unknown };
    try {
      json = JSON.parse(readFileSync(file, 'utf8')) as { eos_token_id?: unknown };
    } catch (error) {
      throw new ModelLoadError('ERR_MODEL_CONFIG', `${file} is not valid JSON: ${(error as Error).message}`, { file });
    }
    const ids = json?.eos_token_id;
    if (ids === undefined || ids === null) continue;
    const list = Array.isArray(ids) ? ids : [ids];
    if (!list.every((id) => Number.isInteger(id) && id >= 0)) throw new ModelLoadError('ERR_MODEL_CONFIG', `${file}: eos_token_id must be a token id or a list of them, got ${JSON.stringify(ids)}`, { file });
    return list as number[];
  }
  return [];
}

/** The rotary inverse frequencies of a head (headSize / 2 of them), Llama 3's scaling applied. */
export function rotaryInverseFrequencies(config: ResolvedDecoderConfig): Float32Array {
  const half = config.headSize / 2;
  const frequencies = new Float32Array(half);
  const scaling = config.ropeScaling;
  for (let index = 0; index < half; index++) {
    let frequency = 1 / config.ropeTheta ** ((2 * index) / config.headSize);
    if (scaling) {
      // Long wavelengths are slowed by the factor, short ones kept, those between blended.
      const wavelength = (2 * Math.PI) / frequency;
      const lowWavelength = scaling.originalMaxPositions / scaling.lowFrequencyFactor;
      const highWavelength = scaling.originalMaxPositions / scaling.highFrequencyFactor;
      if (wavelength > lowWavelength) frequency /= scaling.factor;
      else if (wavelength >= highWavelength) {
        const smooth = (scaling.originalMaxPositions / wavelength - scaling.lowFrequencyFactor) / (scaling.highFrequencyFactor - scaling.lowFrequencyFactor);
        frequency = (1 - smooth) * (frequency / scaling.factor) + smooth * frequency;
      }
    }
    frequencies[index] = frequency;
  }
  return frequencies;
}
