/**
 * LoRA adapters (PEFT's format, as vLLM serves many of them over one base model): a directory
 * with adapter_config.json and adapter_model.safetensors, whose `lora_A` [r, in] and `lora_B`
 * [out, r] matrices add `scale · B (A x)` to a layer's output. The base weights stay as they are,
 * so every sequence of a step may use its own adapter, or none.
 *
 * On a rank, an adapter is cut as its layer is: for column-parallel layers (query/key/value, MLP
 * up and gate) A is whole and B keeps this rank's output rows; for row-parallel ones (attention
 * output, MLP down) A keeps this rank's input columns and B is whole, so each rank's share of
 * B (A x) is summed by the allreduce that already sums the layer's partial outputs. Query, key
 * and value become one low-rank pair for the fused matrix: their A's stacked, and B
 * block-diagonal (each part's rows read only its own A's outputs).
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { InvalidArgumentError, ModelLoadError } from '../errors.js';
import type { ResolvedDecoderConfig } from './config.js';
import type { ShardingPlan } from './plan.js';
import { Checkpoint } from './safetensors.js';

/** One low-rank update of a rank's layer: out += b · (a · x), the scale already in b. */
export interface LowRankUpdate {
  /** [rank, in] */
  a: Float32Array;
  /** [out, rank], times the adapter's scale. */
  b: Float32Array;
  rank: number;
}

/** The updates of one layer on one rank, by the layer's matrices (absent: the adapter leaves it). */
export interface LayerAdapter {
  qkv?: LowRankUpdate;
  projection?: LowRankUpdate;
  gate?: LowRankUpdate;
  up?: LowRankUpdate;
  down?: LowRankUpdate;
}

type Module = 'q' | 'k' | 'v' | 'qkv' | 'projection' | 'gate' | 'up' | 'down';

/** Where each architecture's module names land (GPT-2's c_proj is in attention and in the MLP). */
const MODULES: Record<ResolvedDecoderConfig['architecture'], Record<string, Module>> = {
  llama: { 'self_attn.q_proj': 'q', 'self_attn.k_proj': 'k', 'self_attn.v_proj': 'v', 'self_attn.o_proj': 'projection', 'mlp.gate_proj': 'gate', 'mlp.up_proj': 'up', 'mlp.down_proj': 'down' },
  gpt2: { 'attn.c_attn': 'qkv', 'attn.c_proj': 'projection', 'mlp.c_fc': 'up', 'mlp.c_proj': 'down' },
};

/** An adapter's file, checked against the model: where each layer's tensors are, and its scale. */
export interface AdapterInfo {
  path: string;
  file: string;
  rank: number;
  scale: number;
  /** Per layer: the module's tensor names (A and B). */
  layers: Array<Partial<Record<Module, { a: string; b: string }>>>;
}

function adapterError(path: string, message: string, details: { file?: string; tensor?: string; cause?: unknown } = {}): ModelLoadError {
  return new ModelLoadError('ERR_ADAPTER', `LoRA adapter ${path}: ${message}`, { file: details.file ?? path, ...details });
}

/**
 * Reads an adapter's config and tensor headers and checks them against the model: every tensor
 * names a layer and module the model has, in the shape its config implies. Throws ModelLoadError
 * (code 'ERR_ADAPTER', naming the file and tensor) for what it cannot serve: DoRA, biases,
 * per-module ranks, embeddings or the head adapted, or shapes that do not fit.
 */
export async function readAdapter(path: string, config: ResolvedDecoderConfig): Promise<AdapterInfo> {
  if (typeof path !== 'string' || path.length === 0) throw new InvalidArgumentError(`a LoRA adapter is a directory path, got ${JSON.stringify(path)}`, 'ERR_ADAPTER');
  const configFile = join(path, 'adapter_config.json');
  let settings: Record<string, unknown>;
  try {
    settings = JSON.parse(await readFile(configFile, 'utf8')) as Record<string, unknown>;
  } catch (error) {
    const reason = (error as NodeJS.ErrnoException).code === 'ENOENT' ? 'no adapter_config.json' : (error as Error).message;
    throw adapterError(path, reason, { file: configFile, cause: error });
  }
  const rank = settings.r;
  const alpha = settings.lora_alpha ?? rank;
  if (!Number.isInteger(rank) || (rank as number) < 1) throw adapterError(path, `r must be a positive integer, got ${JSON.stringify(rank)}`, { file: configFile });
  if (typeof alpha !== 'number' || !Number.isFinite(alpha)) throw adapterError(path, `lora_alpha must be a number, got ${JSON.stringify(alpha)}`, { file: configFile });
  if (settings.use_dora === true) throw adapterError(path, 'DoRA adapters (use_dora) are not supported', { file: configFile });
  if (settings.bias !== undefined && settings.bias !== null && settings.bias !== 'none') throw adapterError(path, `adapters with biases (bias: ${JSON.stringify(settings.bias)}) are not supported`, { file: configFile });
  for (const key of ['rank_pattern', 'alpha_pattern'] as const) {
    if (settings[key] && Object.keys(settings[key] as object).length > 0) throw adapterError(path, `per-module ranks and scales (${key}) are not supported`, { file: configFile });
  }
  if (Array.isArray(settings.modules_to_save) && settings.modules_to_save.length > 0) throw adapterError(path, `modules_to_save (${settings.modules_to_save.join(', ')}) are not supported: only LoRA matrices`, { file: configFile });
  const scale = settings.use_rslora === true ? alpha / Math.sqrt(rank as number) : alpha / (rank as number);
  const file = join(path, 'adapter_model.safetensors');
  let checkpoint: Checkpoint;
  try {
    checkpoint = await Checkpoint.open(file);
  } catch (error) {
    throw adapterError(path, `cannot open adapter_model.safetensors: ${(error as Error).message}`, { file, cause: error });
  }
  await using _ = checkpoint;
  const modules = MODULES[config.architecture];
  const layers: AdapterInfo['layers'] = Array.from({ length: config.numLayers }, () => ({}));
  const dims = moduleShapes(config);
  for (const name of checkpoint.names()) {
    const match = /(?:^|\.)(?:layers|h)\.(\d+)\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$/.exec(name);
    if (!match) {
      if (/lora_|embed|lm_head|wte/.test(name)) throw adapterError(path, `${name} adapts something other than a decoder layer's matrices (embeddings and the head are not supported)`, { file, tensor: name });
      continue;
    }
    const layer = Number(match[1]);
    const module = modules[match[2]];
    if (layer >= config.numLayers) throw adapterError(path, `${name} names layer ${layer}, the model has ${config.numLayers}`, { file, tensor: name });
    if (module === undefined) throw adapterError(path, `${name} adapts '${match[2]}', which is not one of the model's matrices (${Object.keys(modules).join(', ')})`, { file, tensor: name });
    if (config.numExperts > 0 && (module === 'gate' || module === 'up' || module === 'down')) throw adapterError(path, `${name} adapts the MLP of a mixture of experts, which adapters are not supported on (attention only)`, { file, tensor: name });
    const [out, input] = dims[module];
    const shape = checkpoint.info(name).shape;
    const wanted = match[3] === 'A' ? [rank as number, input] : [out, rank as number];
    if (shape.length !== 2 || shape[0] !== wanted[0] || shape[1] !== wanted[1]) throw adapterError(path, `${name} has shape [${shape}], the model and r = ${rank} want [${wanted}]`, { file, tensor: name });
    const entry = (layers[layer][module] ??= { a: '', b: '' });
    entry[match[3] === 'A' ? 'a' : 'b'] = name;
  }
  let any = false;
  layers.forEach((layer, index) => {
    for (const [module, names] of Object.entries(layer)) {
      if (!names.a || !names.b) throw adapterError(path, `layer ${index}'s ${module} has lora_${names.a ? 'B' : 'A'} missing`, { file });
      any = true;
    }
  });
  if (!any) throw adapterError(path, 'adapter_model.safetensors holds no LoRA matrices', { file });
  return { path, file, rank: rank as number, scale, layers };
}

/** [out, in] of each module in the whole model. */
function moduleShapes(config: ResolvedDecoderConfig): Record<Module, [number, number]> {
  const hidden = config.hiddenSize;
  const queries = config.numHeads * config.headSize;
  const keys = config.numKeyValueHeads * config.headSize;
  const inner = config.intermediateSize;
  return {
    q: [queries, hidden],
    k: [keys, hidden],
    v: [keys, hidden],
    qkv: [queries + 2 * keys, hidden],
    projection: [hidden, queries],
    gate: [inner, hidden],
    up: [inner, hidden],
    down: [hidden, inner],
  };
}

/** One rank's updates for the layers of one stage (index 0 is the stage's first layer). */
export async function loadShardAdapter(info: AdapterInfo, config: ResolvedDecoderConfig, plan: ShardingPlan, stage: number, rank: number): Promise<LayerAdapter[]> {
  const { firstLayer, endLayer } = plan.stages[stage];
  const queryRows = plan.headsPerRank * plan.headSize;
  const keyRows = plan.keyValueHeadsPerRank * plan.headSize;
  const rowWidth = queryRows + 2 * keyRows;
  const inner = plan.intermediatePerRank;
  const r = info.rank;
  const scaled = (values: Float32Array) => {
    for (let index = 0; index < values.length; index++) values[index] *= info.scale;
    return values;
  };
  await using checkpoint = await Checkpoint.open(info.file);
  const read = (name: string, slice: { rows?: [number, number]; columns?: [number, number] } = {}) => checkpoint.readFloat32(name, slice);
  const result: LayerAdapter[] = [];
  for (let layer = firstLayer; layer < endLayer; layer++) {
    const names = info.layers[layer];
    const updates: LayerAdapter = {};
    // Column-parallel: A whole, B's rows of this rank.
    const column = async (entry: { a: string; b: string } | undefined, rows: number): Promise<LowRankUpdate | undefined> =>
      entry ? { a: await read(entry.a), b: scaled(await read(entry.b, { rows: [rank * rows, (rank + 1) * rows] })), rank: r } : undefined;
    // Row-parallel: A's columns of this rank, B whole.
    const row = async (entry: { a: string; b: string } | undefined, columns: number): Promise<LowRankUpdate | undefined> =>
      entry ? { a: await read(entry.a, { columns: [rank * columns, (rank + 1) * columns] }), b: scaled(await read(entry.b)), rank: r } : undefined;
    if (names.qkv) {
      // GPT-2's fused c_attn: query, key and value sit side by side in B's rows; this rank's heads of each.
      const hidden = config.hiddenSize;
      const b = new Float32Array(rowWidth * r);
      for (let part = 0; part < 3; part++) {
        const first = part * hidden + rank * queryRows;
        b.set(await read(names.qkv.b, { rows: [first, first + queryRows] }), part * queryRows * r);
      }
      updates.qkv = { a: await read(names.qkv.a), b: scaled(b), rank: r };
    } else if (names.q || names.k || names.v) {
      // Separate query, key and value: A's stacked, B block-diagonal over them.
      const parts = ([['q', queryRows, 0], ['k', keyRows, queryRows], ['v', keyRows, queryRows + keyRows]] as const).filter(([module]) => names[module]);
      const total = parts.length * r;
      const a = new Float32Array(total * config.hiddenSize);
      const b = new Float32Array(rowWidth * total);
      for (const [index, [module, rows, offset]] of parts.entries()) {
        const entry = names[module]!;
        a.set(await read(entry.a), index * r * config.hiddenSize);
        const slice = await read(entry.b, { rows: [rank * rows, (rank + 1) * rows] });
        for (let line = 0; line < rows; line++) b.set(slice.subarray(line * r, (line + 1) * r), (offset + line) * total + index * r);
      }
      updates.qkv = { a, b: scaled(b), rank: total };
    }
    updates.projection = await row(names.projection, queryRows);
    updates.gate = await column(names.gate, inner);
    updates.up = await column(names.up, inner);
    updates.down = await row(names.down, inner);
    for (const key of Object.keys(updates) as Array<keyof LayerAdapter>) if (updates[key] === undefined) delete updates[key];
    result.push(updates);
  }
  return result;
}
