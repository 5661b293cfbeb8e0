/**
 * One rank of a sharded decoder: the weights of its stage's layers cut for its place in the
 * stage's tensor-parallel group, the key/value cache of every sequence it has seen, and the
 * forward pass of one step over many sequences at once. Sequences are packed end to end (no
 * padding): a step may mix prompts being read whole with sequences generating one token each.
 */
import { InvalidArgumentError, ModelLoadError } from '../errors.js';
import type { Communicator } from '../gpu/communicator.js';
import { Tensor } from '../gpu/tensor.js';
import type { DecoderConfig } from './config.js';
import { attention, gelu, layerNorm, linear } from './kernels.js';
import type { ShardingPlan } from './plan.js';
import { Checkpoint } from './safetensors.js';
import { pickToken, type SamplingParameters } from './sampling.js';

/** A sequence's part in one step: `count` new tokens after the `past` it has already read. */
export interface StepSequence {
  id: number;
  past: number;
  count: number;
  sampling?: SamplingParameters;
}

/** What every stage of a step sees; the first stage reads `tokens`, the others `hidden`. */
export interface StepMessage {
  step: number;
  sequences: StepSequence[];
  /** Sequences finished since the last step: their caches are dropped before this one runs. */
  released: number[];
  /** The new tokens of every sequence, packed in order (first stage). */
  tokens?: Int32Array;
  /** The hidden states of the new tokens, [tokens, hiddenSize] (later stages). */
  hidden?: Float32Array;
  /** Return each sequence's logits as well as its token (for scoring and checks). */
  logits?: boolean;
}

/** The last stage's answer: the next token of each sequence of the step, in order. */
export interface StepResult {
  step: number;
  tokens: Int32Array;
  /** When asked: [sequences, vocabSize], the logits each token was picked from. */
  logits?: Float32Array;
}

export interface ShardSpec {
  checkpoint: string;
  config: DecoderConfig;
  plan: ShardingPlan;
  stage: number;
  rank: number;
}

interface LayerWeights {
  attentionNorm: [gamma: Float32Array, beta: Float32Array];
  /** This rank's query, key and value heads, [3 × heads × headSize, hidden]. */
  qkvWeight: Float32Array;
  qkvBias: Float32Array;
  /** Row-parallel: [hidden, heads × headSize]; its bias is added once, after the allreduce. */
  projectionWeight: Float32Array;
  projectionBias: Float32Array;
  mlpNorm: [gamma: Float32Array, beta: Float32Array];
  upWeight: Float32Array;
  upBias: Float32Array;
  downWeight: Float32Array;
  downBias: Float32Array;
}

interface ShardWeights {
  layers: LayerWeights[];
  tokenEmbedding?: Float32Array;
  positionEmbedding?: Float32Array;
  finalNorm?: [Float32Array, Float32Array];
  head?: Float32Array;
}

/** One sequence's keys and values for each of this shard's layers, [capacity, heads, headSize]. */
interface SequenceCache {
  length: number;
  capacity: number;
  keys: Float32Array[];
  values: Float32Array[];
}

/** GPT-2 stores its matrices as Conv1D, [in, out]; the kernels take Linear's [out, in]. */
function transpose(matrix: Float32Array, rows: number, columns: number): Float32Array {
  const result = new Float32Array(matrix.length);
  for (let row = 0; row < rows; row++) {
    for (let column = 0; column < columns; column++) result[column * rows + row] = matrix[row * columns + column];
  }
  return result;
}

/** Names in GPT2LMHeadModel checkpoints carry 'transformer.'; GPT2Model's do not. */
function namePrefix(checkpoint: Checkpoint): string {
  if (checkpoint.has('transformer.wte.weight')) return 'transformer.';
  if (checkpoint.has('wte.weight')) return '';
  throw new ModelLoadError('ERR_TENSOR_NOT_FOUND', 'the checkpoint has no token embedding (wte.weight or transformer.wte.weight): is it a GPT-2 checkpoint?', { tensor: 'wte.weight' });
}

/** Every tensor a GPT-2 decoder of `config` reads, with its shape in the checkpoint (Conv1D: [in, out]). */
function expectedTensors(config: DecoderConfig): Array<[name: string, shape: number[]]> {
  const hidden = config.hiddenSize;
  const inner = config.intermediateSize;
  const tensors: Array<[string, number[]]> = [['wte.weight', [config.vocabSize, hidden]], ['wpe.weight', [config.maxPositions, hidden]]];
  for (let layer = 0; layer < config.numLayers; layer++) {
    const base = `h.${layer}.`;
    tensors.push(
      [`${base}ln_1.weight`, [hidden]], [`${base}ln_1.bias`, [hidden]],
      [`${base}attn.c_attn.weight`, [hidden, 3 * hidden]], [`${base}attn.c_attn.bias`, [3 * hidden]],
      [`${base}attn.c_proj.weight`, [hidden, hidden]], [`${base}attn.c_proj.bias`, [hidden]],
      [`${base}ln_2.weight`, [hidden]], [`${base}ln_2.bias`, [hidden]],
      [`${base}mlp.c_fc.weight`, [hidden, inner]], [`${base}mlp.c_fc.bias`, [inner]],
      [`${base}mlp.c_proj.weight`, [inner, hidden]], [`${base}mlp.c_proj.bias`, [hidden]],
    );
  }
  tensors.push(['ln_f.weight', [hidden]], ['ln_f.bias', [hidden]]);
  return tensors;
}

/**
 * Checks that the checkpoint holds every tensor of `config`'s decoder in the shape the config
 * implies, before any rank reads it; returns the prefix its names carry.
 */
export function checkCheckpoint(checkpoint: Checkpoint, config: DecoderConfig): string {
  const prefix = namePrefix(checkpoint);
  const tensors = expectedTensors(config);
  if (checkpoint.has('lm_head.weight')) tensors.push(['lm_head.weight', [config.vocabSize, config.hiddenSize]]);
  for (const [name, shape] of tensors) {
    const full = name === 'lm_head.weight' ? name : prefix + name;
    const info = checkpoint.info(full);
    if (info.shape.length !== shape.length || info.shape.some((size: number, axis: number) => size !== shape[axis])) {
      throw new ModelLoadError('ERR_MODEL_SHAPE', `${full} has shape [${info.shape}], the config says [${shape}]`, { file: info.file, tensor: full });
    }
  }
  return prefix;
}

export class DecoderShard {
  readonly spec: ShardSpec;
  readonly #communicator: Communicator | undefined;
  readonly #layers: LayerWeights[];
  readonly #tokenEmbedding: Float32Array | undefined;
  readonly #positionEmbedding: Float32Array | undefined;
  readonly #finalNorm: [Float32Array, Float32Array] | undefined;
  /** This rank's rows of the head, [vocabularyPerRank, hidden], zero past the vocabulary's end. */
  readonly #head: Float32Array | undefined;
  readonly #caches = new Map<number, SequenceCache>();
  /** Bytes of weights this rank holds. */
  readonly weightBytes: number;

  private constructor(spec: ShardSpec, communicator: Communicator | undefined, weights: ShardWeights) {
    this.spec = spec;
    this.#communicator = communicator;
    this.#layers = weights.layers;
    this.#tokenEmbedding = weights.tokenEmbedding;
    this.#positionEmbedding = weights.positionEmbedding;
    this.#finalNorm = weights.finalNorm;
    this.#head = weights.head;
    let bytes = 0;
    for (const layer of weights.layers) {
      for (const value of Object.values(layer)) bytes += Array.isArray(value) ? value[0].byteLength + value[1].byteLength : (value as Float32Array).byteLength;
    }
    for (const array of [weights.tokenEmbedding, weights.positionEmbedding, weights.head, ...(weights.finalNorm ?? [])]) bytes += array?.byteLength ?? 0;
    this.weightBytes = bytes;
  }

  /** Reads this rank's slices of the checkpoint (only the bytes it needs). */
  static async load(spec: ShardSpec, communicator?: Communicator): Promise<DecoderShard> {
    const { config, plan, rank } = spec;
    const stage = plan.stages[spec.stage];
    if (!stage) throw new InvalidArgumentError(`stage ${spec.stage} is not in the plan's ${plan.stages.length} stages`);
    if (!(rank >= 0 && rank < plan.tensorParallel)) throw new InvalidArgumentError(`rank ${rank} is not in the stage's ${plan.tensorParallel} ranks`);
    if (plan.tensorParallel > 1 && communicator?.size !== plan.tensorParallel) {
      throw new InvalidArgumentError(`tensor parallelism ${plan.tensorParallel} needs a communicator of that size, got ${communicator ? communicator.size : 'none'}`);
    }
    await using checkpoint = await Checkpoint.open(spec.checkpoint);
    const prefix = checkCheckpoint(checkpoint, config);
    const hidden = config.hiddenSize;
    const width = plan.headsPerRank * plan.headSize;
    const inner = plan.intermediatePerRank;
    const read = (name: string, slice?: { rows?: [number, number]; columns?: [number, number] }) => checkpoint.readFloat32(prefix + name, slice);
    const norm = async (name: string): Promise<[Float32Array, Float32Array]> => [await read(`${name}.weight`), await read(`${name}.bias`)];
    const layers: LayerWeights[] = [];
    for (let layer = stage.firstLayer; layer < stage.endLayer; layer++) {
      const base = `h.${layer}.`;
      const qkvWeight = new Float32Array(3 * width * hidden);
      const qkvBias = new Float32Array(3 * width);
      const fullBias = await read(`${base}attn.c_attn.bias`);
      for (let part = 0; part < 3; part++) {
        // Query, key and value sit side by side in c_attn's columns: this rank's heads of each.
        const first = part * hidden + rank * width;
        const columns = await read(`${base}attn.c_attn.weight`, { columns: [first, first + width] });
        qkvWeight.set(transpose(columns, hidden, width), part * width * hidden);
        qkvBias.set(fullBias.subarray(first, first + width), part * width);
      }
      const projectionRows = await read(`${base}attn.c_proj.weight`, { rows: [rank * width, (rank + 1) * width] });
      const upColumns = await read(`${base}mlp.c_fc.weight`, { columns: [rank * inner, (rank + 1) * inner] });
      const upBias = (await read(`${base}mlp.c_fc.bias`)).slice(rank * inner, (rank + 1) * inner);
      const downRows = await read(`${base}mlp.c_proj.weight`, { rows: [rank * inner, (rank + 1) * inner] });
      layers.push({
        attentionNorm: await norm(`${base}ln_1`),
        qkvWeight,
        qkvBias,
        projectionWeight: transpose(projectionRows, width, hidden),
        projectionBias: await read(`${base}attn.c_proj.bias`),
        mlpNorm: await norm(`${base}ln_2`),
        upWeight: transpose(upColumns, hidden, inner),
        upBias,
        downWeight: transpose(downRows, inner, hidden),
        downBias: await read(`${base}mlp.c_proj.bias`),
      });
    }
    const weights: ShardWeights = { layers };
    if (stage.embeds) {
      weights.tokenEmbedding = await read('wte.weight');
      weights.positionEmbedding = await read('wpe.weight');
    }
    if (stage.hasHead) {
      weights.finalNorm = await norm('ln_f');
      const first = rank * plan.vocabularyPerRank;
      const end = Math.min(config.vocabSize, first + plan.vocabularyPerRank);
      const head = new Float32Array(plan.vocabularyPerRank * hidden);
      // An untied head (lm_head.weight, [vocab, hidden]) wins over the tied embedding.
      const headName = checkpoint.has('lm_head.weight') ? 'lm_head.weight' : `${prefix}wte.weight`;
      if (end > first) head.set(await checkpoint.readFloat32(headName, { rows: [first, end] }));
      weights.head = head;
    }
    return new DecoderShard(spec, communicator, weights);
  }

  /** Sequences whose keys and values this rank holds. */
  get cachedSequences(): number {
    return this.#caches.size;
  }

  /** One step of this stage: the next stage's message, or on the last stage the next tokens. */
  async forward(message: StepMessage): Promise<StepMessage | StepResult> {
    const { config, plan } = this.spec;
    const stage = plan.stages[this.spec.stage];
    for (const id of message.released) this.#caches.delete(id);
    if (message.sequences.length === 0) {
      // A step that only releases caches still passes through every stage.
      return stage.hasHead ? { step: message.step, tokens: new Int32Array(0) } : { step: message.step, sequences: [], released: message.released, hidden: new Float32Array(0) };
    }
    const hiddenSize = config.hiddenSize;
    let total = 0;
    for (const sequence of message.sequences) {
      const cache = this.#caches.get(sequence.id);
      const known = cache?.length ?? 0;
      if (sequence.past !== known) {
        throw new InvalidArgumentError(`step ${message.step}: sequence ${sequence.id} says ${sequence.past} tokens came before, this shard has read ${known}`, 'ERR_SEQUENCE_STATE');
      }
      if (sequence.past + sequence.count > config.maxPositions) {
        throw new InvalidArgumentError(`sequence ${sequence.id} would reach ${sequence.past + sequence.count} tokens, past the model's ${config.maxPositions} positions`, 'ERR_SEQUENCE_TOO_LONG');
      }
      total += sequence.count;
    }
    const hidden = stage.embeds ? this.#embed(message, total) : message.hidden;
    if (!(hidden instanceof Float32Array) || hidden.length !== total * hiddenSize) {
      throw new InvalidArgumentError(`step ${message.step}: stage ${stage.index} needs hidden states of ${total} × ${hiddenSize}, got ${hidden?.length ?? 'none'}`);
    }
    for (const sequence of message.sequences) this.#reserve(sequence.id, sequence.past + sequence.count);
    for (let layer = 0; layer < this.#layers.length; layer++) await this.#block(layer, hidden, message.sequences, total);
    for (const sequence of message.sequences) this.#caches.get(sequence.id)!.length = sequence.past + sequence.count;
    if (!stage.hasHead) return { step: message.step, sequences: message.sequences, released: message.released, hidden, ...(message.logits ? { logits: true } : {}) };
    const all = message.logits ? new Float32Array(message.sequences.length * config.vocabSize) : undefined;
    return { step: message.step, tokens: await this.#nextTokens(hidden, message.sequences, all), ...(all ? { logits: all } : {}) };
  }

  #embed(message: StepMessage, total: number): Float32Array {
    const { config } = this.spec;
    const tokens = message.tokens;
    if (!(tokens instanceof Int32Array) || tokens.length !== total) {
      throw new InvalidArgumentError(`step ${message.step}: the first stage needs ${total} tokens as an Int32Array, got ${tokens?.length ?? 'none'}`);
    }
    const size = config.hiddenSize;
    const hidden = new Float32Array(total * size);
    let row = 0;
    for (const sequence of message.sequences) {
      for (let index = 0; index < sequence.count; index++, row++) {
        const token = tokens[row];
        if (!(token >= 0 && token < config.vocabSize)) {
          throw new InvalidArgumentError(`sequence ${sequence.id}: token ${token} is outside the vocabulary of ${config.vocabSize}`, 'ERR_TOKEN');
        }
        const position = sequence.past + index;
        const out = hidden.subarray(row * size, (row + 1) * size);
        out.set(this.#tokenEmbedding!.subarray(token * size, (token + 1) * size));
        const positionRow = this.#positionEmbedding!.subarray(position * size, (position + 1) * size);
        for (let column = 0; column < size; column++) out[column] += positionRow[column];
      }
    }
    return hidden;
  }

  /** Room in each layer's cache for `length` tokens, grown by doubling. */
  #reserve(id: number, length: number): void {
    const rowSize = this.spec.plan.headsPerRank * this.spec.plan.headSize;
    let cache = this.#caches.get(id);
    if (!cache) {
      cache = { length: 0, capacity: 0, keys: [], values: [] };
      this.#caches.set(id, cache);
    }
    if (cache.capacity >= length) return;
    const capacity = Math.min(this.spec.config.maxPositions, Math.max(16, 2 ** Math.ceil(Math.log2(length))));
    const grow = (old: Float32Array | undefined) => {
      const next = new Float32Array(capacity * rowSize);
      if (old) next.set(old.subarray(0, cache!.length * rowSize));
      return next;
    };
    for (let layer = 0; layer < this.#layers.length; layer++) {
      cache.keys[layer] = grow(cache.keys[layer]);
      cache.values[layer] = grow(cache.values[layer]);
    }
    cache.capacity = capacity;
  }

  async #allreduce(values: Float32Array): Promise<void> {
    if (this.spec.plan.tensorParallel > 1) await this.#communicator!.allreduce(Tensor.wrap(values, 'f32'), 'sum');
  }

  async #block(layerIndex: number, hidden: Float32Array, sequences: StepSequence[], total: number): Promise<void> {
    const { config, plan } = this.spec;
    const layer = this.#layers[layerIndex];
    const size = config.hiddenSize;
    const heads = plan.headsPerRank;
    const headSize = plan.headSize;
    const width = heads * headSize;
    const normed = new Float32Array(total * size);
    layerNorm(normed, hidden, layer.attentionNorm[0], layer.attentionNorm[1], total, size, config.layerNormEpsilon);
    const qkv = new Float32Array(total * 3 * width);
    linear(qkv, normed, layer.qkvWeight, layer.qkvBias, total, size, 3 * width);
    const attended = new Float32Array(total * width);
    let row = 0;
    for (const sequence of sequences) {
      const cache = this.#caches.get(sequence.id)!;
      const keys = cache.keys[layerIndex];
      const values = cache.values[layerIndex];
      const queries = new Float32Array(sequence.count * width);
      for (let index = 0; index < sequence.count; index++) {
        const source = (row + index) * 3 * width;
        const position = (sequence.past + index) * width;
        queries.set(qkv.subarray(source, source + width), index * width);
        keys.set(qkv.subarray(source + width, source + 2 * width), position);
        values.set(qkv.subarray(source + 2 * width, source + 3 * width), position);
      }
      attention(attended.subarray(row * width, (row + sequence.count) * width), queries, keys, values, sequence.count, sequence.past, heads, headSize);
      row += sequence.count;
    }
    const projected = new Float32Array(total * size);
    linear(projected, attended, layer.projectionWeight, null, total, width, size);
    await this.#allreduce(projected);
    addResidual(hidden, projected, layer.projectionBias, size);
    layerNorm(normed, hidden, layer.mlpNorm[0], layer.mlpNorm[1], total, size, config.layerNormEpsilon);
    const inner = plan.intermediatePerRank;
    const up = new Float32Array(total * inner);
    linear(up, normed, layer.upWeight, layer.upBias, total, size, inner);
    gelu(up);
    const down = projected;
    linear(down, up, layer.downWeight, null, total, inner, size);
    await this.#allreduce(down);
    addResidual(hidden, down, layer.downBias, size);
  }

  async #nextTokens(hidden: Float32Array, sequences: StepSequence[], keep: Float32Array | undefined): Promise<Int32Array> {
    const { config, plan } = this.spec;
    const size = config.hiddenSize;
    const count = sequences.length;
    const last = new Float32Array(count * size);
    let row = 0;
    sequences.forEach((sequence, index) => {
      row += sequence.count;
      last.set(hidden.subarray((row - 1) * size, row * size), index * size);
    });
    layerNorm(last, last, this.#finalNorm![0], this.#finalNorm![1], count, size, config.layerNormEpsilon);
    const slice = plan.vocabularyPerRank;
    const local = new Float32Array(count * slice);
    linear(local, last, this.#head!, null, count, size, slice);
    let gathered = local;
    if (plan.tensorParallel > 1) {
      gathered = new Float32Array(plan.tensorParallel * count * slice);
      await this.#communicator!.allgather(Tensor.wrap(local, 'f32'), Tensor.wrap(gathered, 'f32'));
    }
    // Gathered as [rank][sequence][slice]: each sequence's logits are its rows from every rank.
    const tokens = new Int32Array(count);
    const logits = new Float32Array(config.vocabSize);
    for (let index = 0; index < count; index++) {
      for (let rank = 0; rank < plan.tensorParallel; rank++) {
        const first = rank * slice;
        const length = Math.min(slice, config.vocabSize - first);
        if (length <= 0) break;
        const start = (rank * count + index) * slice;
        logits.set(gathered.subarray(start, start + length), first);
      }
      keep?.set(logits, index * config.vocabSize);
      const sequence = sequences[index];
      tokens[index] = pickToken(logits, sequence.sampling, sequence.past + sequence.count);
    }
    return tokens;
  }

  /** Drops every cached sequence. */
  clear(): void {
    this.#caches.clear();
  }
}

/** hidden += update + bias, row by row. */
function addResidual(hidden: Float32Array, update: Float32Array, bias: Float32Array, size: number): void {
  for (let index = 0; index < hidden.length; index++) hidden[index] += update[index] + bias[index % size];
}
