/**
 * The decoder a sharded model runs: GPT-2's architecture (pre-norm blocks, learned positions,
 * GELU MLP, tied embedding and head), the layout most small open checkpoints share. The config is
 * read from a checkpoint's config.json (Hugging Face names) or given directly.
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { InvalidArgumentError, ModelLoadError } from '../errors.js';

export interface DecoderConfig {
  vocabSize: number;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  /** The MLP's inner width (GPT-2: 4 × hiddenSize). */
  intermediateSize: number;
  /** Longest sequence, prompt and generated tokens together (the position table's rows). */
  maxPositions: number;
  layerNormEpsilon: number;
}

const INTEGER_FIELDS = ['vocabSize', 'hiddenSize', 'numLayers', 'numHeads', 'intermediateSize', 'maxPositions'] as const;

/** The config checked field by field; errors name the field. */
export function checkDecoderConfig(config: unknown): DecoderConfig {
  if (typeof config !== 'object' || config === null) throw new InvalidArgumentError(`a decoder config must be an object, got ${String(config)}`, 'ERR_MODEL_CONFIG');
  const fields = config as Record<string, unknown>;
  for (const field of INTEGER_FIELDS) {
    const value = fields[field];
    if (typeof value !== 'number' || !Number.isInteger(value) || value < 1) {
      throw new InvalidArgumentError(`decoder config: ${field} must be a positive integer, got ${String(value)}`, 'ERR_MODEL_CONFIG');
    }
  }
  const epsilon = fields.layerNormEpsilon ?? 1e-5;
  if (typeof epsilon !== 'number' || !(epsilon > 0) || !Number.isFinite(epsilon)) {
    throw new InvalidArgumentError(`decoder config: layerNormEpsilon must be a positive number, got ${String(epsilon)}`, 'ERR_MODEL_CONFIG');
  }
  const checked = { ...(fields as unknown as DecoderConfig), layerNormEpsilon: epsilon };
  if (checked.hiddenSize % checked.numHeads !== 0) {
    throw new InvalidArgumentError(`decoder config: hiddenSize ${checked.hiddenSize} is not a multiple of numHeads ${checked.numHeads}`, 'ERR_MODEL_CONFIG');
  }
  return {
    vocabSize: checked.vocabSize,
    hiddenSize: checked.hiddenSize,
    numLayers: checked.numLayers,
    numHeads: checked.numHeads,
    intermediateSize: checked.intermediateSize,
    maxPositions: checked.maxPositions,
    layerNormEpsilon: checked.layerNormEpsilon,
  };
}

/** A Hugging Face GPT-2 config.json (n_embd, n_layer, ...) as a DecoderConfig. */
export function configFromHuggingFace(json: Record<string, unknown>, file = 'config.json'): DecoderConfig {
  const modelType = json.model_type;
  if (modelType !== undefined && modelType !== 'gpt2') {
    throw new ModelLoadError('ERR_MODEL_ARCHITECTURE', `${file}: model_type '${String(modelType)}' is not supported (the sharded decoder runs GPT-2's architecture)`, { file });
  }
  const hiddenSize = json.n_embd ?? json.hidden_size;
  try {
    return checkDecoderConfig({
      vocabSize: json.vocab_size,
      hiddenSize,
      numLayers: json.n_layer ?? json.num_hidden_layers,
      numHeads: json.n_head ?? json.num_attention_heads,
      intermediateSize: json.n_inner ?? (typeof hiddenSize === 'number' ? 4 * hiddenSize : undefined),
      maxPositions: json.n_positions ?? json.max_position_embeddings,
      layerNormEpsilon: json.layer_norm_epsilon ?? 1e-5,
    });
  } catch (error) {
    throw new ModelLoadError('ERR_MODEL_CONFIG', `${file}: ${(error as Error).message}`, { file });
  }
}

/**
 * The config beside a checkpoint: config.json in the checkpoint's directory (or in the directory
 * given). Undefined when there is none.
 */
export function readCheckpointConfig(checkpoint: string): DecoderConfig | undefined {
  const directory = existsSync(checkpoint) && statSync(checkpoint).isDirectory() ? checkpoint : dirname(checkpoint);
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
