/**
 * One rank of a sharded decoder (lib/llm/weights.ts says which weights it holds), the key/value
 * cache of every sequence it has seen, and the forward pass of one step over many sequences at
 * once. Sequences are packed end to end (no
 * padding): a step may mix prompts being read whole with sequences generating one token each.
 */
import { InvalidArgumentError } from '../errors.js';
import type { Communicator } from '../gpu/communicator.js';
import { Tensor } from '../gpu/tensor.js';
import { checkDecoderConfig, rotaryInverseFrequencies, type DecoderConfig, type ResolvedDecoderConfig } from './config.js';
import { attention, gelu, layerNorm, linear, narrow, readRows, rmsNorm, rotary, siluMultiply, type CacheDType, type HalfMatrix, type WeightDType, type WeightMatrix } from './kernels.js';
import type { ShardingPlan } from './plan.js';
import { Checkpoint } from './safetensors.js';
import { needsHistory, pickToken, type SamplingParameters, type TokenHistory } from './sampling.js';
import { loadShardWeights, resolveWeightDType, type ExpertMlp, type LayerWeights, type NormWeights, type ShardWeights } from './weights.js';
import { loadShardAdapter, type AdapterInfo, type LayerAdapter, type LowRankUpdate } from './lora.js';
import { DeviceKernels, type KernelBackend } from './device-kernels.js';
import { DeviceLayers } from './device-layers.js';
import { routeExperts } from './routing.js';
import { cuda } from '../gpu/cuda.js';

/** A sequence's part in one step: `count` new tokens after the `past` it has already read. */
export interface StepSequence {
  id: number;
  past: number;
  count: number;
  sampling?: SamplingParameters;
  /** The step reads part of the prompt only, more to come: no token is wanted (its token is -1). */
  prefill?: boolean;
  /** Return the picked token's log-probability too. */
  logprobs?: boolean;
  /** Return the k most likely tokens' log-probabilities too (vLLM's logprobs=k). */
  topLogprobs?: number;
  /** Before the step: start this (new) sequence's cache from the first `length` positions of sequence `id`'s. */
  copyFrom?: { id: number; length: number };
  /**
   * The sequence wants an embedding, not tokens: once its prompt is read, the final norm of its
   * last position ('last') or the mean over all its positions ('mean') comes back in `embeddings`.
   */
  pooling?: 'last' | 'mean';
  /** Constrained decoding: the token picked this step is one of these (a choice, a grammar's next tokens). */
  allowed?: Int32Array;
  /** The same as a bit mask over the vocabulary (bit id % 32 of word id >> 5): a grammar's thousands of ids in a few KiB. */
  allowedMask?: Uint32Array;
  /** Ids the next token may not be: the stop tokens, before the sequence's minNewTokens. */
  banned?: Int32Array;
  /** The LoRA adapter (an id the step's `loadAdapters` or an earlier one loaded) its layers add; none: the base model. */
  adapter?: number;
  /**
   * Speculative decoding: the last `draft` of the positions read are proposed tokens; the last
   * stage also picks a token after each position before the last (`draftTokens`), drawn as a step
   * reading them one at a time would draw it.
   */
  draft?: number;
  /** The shard holds more positions than `past` (proposals not kept): drop the rest first. */
  rewind?: boolean;
  /** A constrained sequence's draft: the tokens allowed after each proposed position but the last (masks, as allowedMask). */
  draftMasks?: Uint32Array[];
  /**
   * Prompt scoring: for each position read this step, the token that follows it in the prompt
   * (-1 where none does); the log-probability of each comes back in `promptLogprobs`.
   */
  targets?: Int32Array;
}

/** What every stage of a step sees; the first stage reads `tokens`, the others `hidden`. */
export interface StepMessage {
  step: number;
  sequences: StepSequence[];
  /** Sequences finished since the last step: their caches are dropped before this one runs. */
  released: number[];
  /**
   * The new tokens of every sequence, packed in order: for the first stage, and passed on to the
   * last when a sequence's sampling penalizes tokens it has seen.
   */
  tokens?: Int32Array;
  /** The hidden states of the new tokens, [tokens, hiddenSize] (later stages). */
  hidden?: Float32Array;
  /** Return each sequence's logits as well as its token (for scoring and checks). */
  logits?: boolean;
  /** LoRA adapters every rank loads (its own slices, from the file) before the step, by id. */
  loadAdapters?: Array<{ id: number; info: AdapterInfo }>;
  /** Adapter ids every rank drops before the step (no sequence of the step uses them). */
  unloadAdapters?: number[];
}

/** The last stage's answer: the next token of each sequence of the step, in order. */
export interface StepResult {
  step: number;
  tokens: Int32Array;
  /** When asked: [sequences, vocabSize], the logits each token was picked from. */
  logits?: Float32Array;
  /** When a sequence asks: its token's log-probability under the logits (NaN for the others). */
  logprobs?: Float32Array;
  /** When a sequence's pooled embedding is ready: [sequences, hiddenSize] (NaN rows for the others). */
  embeddings?: Float32Array;
  /** For the sequences with targets, in order, `count` values each: each target's log-probability (NaN for -1). */
  promptLogprobs?: Float32Array;
  /**
   * When a sequence asks for its k most likely tokens: [sequences, k] ids (most likely first; -1
   * pads) and their log-probabilities, k the largest any sequence of the step asked.
   */
  topTokens?: Int32Array;
  topLogprobs?: Float32Array;
  /** For the sequences with a draft, in order, `draft` tokens each: the pick after each position before the last. */
  draftTokens?: Int32Array;
}

export interface ShardSpec {
  checkpoint: string;
  config: DecoderConfig;
  plan: ShardingPlan;
  stage: number;
  rank: number;
  /** How matrices are kept (default 'auto': 16-bit checkpoints stay 16-bit; see resolveWeightDType). */
  weightDtype?: WeightDType | 'auto';
  /** How the key/value cache is kept (default 'auto': as the weights are; bf16 for int8 weights). */
  kvCacheDtype?: CacheDType | 'auto';
  /**
   * Run the layers and the head through DeviceLayers on this backend: 'cuda' (the rank's GPU,
   * device 0 of its CUDA_VISIBLE_DEVICES), or 'cpu' (the host twin: the same path over host
   * memory). Absent: the CPU decoder's own loop, which alone has LoRA, experts and int8.
   */
  layers?: KernelBackend;
}

/** One sequence's keys and values for each of this shard's layers, [capacity, kvHeads, headSize], in f32 or as 16-bit bits. */
interface SequenceCache {
  length: number;
  capacity: number;
  keys: Array<Float32Array | Uint16Array>;
  values: Array<Float32Array | Uint16Array>;
}

export class DecoderShard {
  readonly spec: ShardSpec;
  readonly config: ResolvedDecoderConfig;
  readonly #communicator: Communicator | undefined;
  readonly #weights: ShardWeights;
  /** The layers (and head) on a device, when spec.layers says so; #weights then holds only the host-side parts. */
  readonly #device: DeviceLayers | undefined;
  readonly #inverseFrequencies: Float32Array | undefined;
  readonly #caches = new Map<number, SequenceCache>();
  /** LoRA adapters loaded on this rank, by the replica's ids: each layer's low-rank updates (this stage's layers). */
  readonly #adapters = new Map<number, LayerAdapter[]>();
  /** On the last stage, for sequences whose sampling has penalties: the tokens each has seen. */
  readonly #histories = new Map<number, TokenHistory>();
  /** On the last stage, for sequences mean-pooled: the sum of their positions' final norms so far (in double). */
  readonly #poolSums = new Map<number, Float64Array>();
  /** Bytes of weights this rank holds. */
  readonly weightBytes: number;
  /** How the key/value cache is kept ('auto' resolved). */
  readonly kvCacheDtype: CacheDType;

  private constructor(spec: ShardSpec, config: ResolvedDecoderConfig, communicator: Communicator | undefined, weights: ShardWeights, kvCacheDtype: CacheDType, device?: DeviceLayers) {
    this.spec = spec;
    this.config = config;
    this.kvCacheDtype = kvCacheDtype;
    this.#communicator = communicator;
    this.#weights = weights;
    this.#device = device;
    this.#inverseFrequencies = config.architecture === 'llama' ? rotaryInverseFrequencies(config) : undefined;
    // Every array once: a matrix may be shared (a tied head is the embedding itself).
    const arrays = new Set<ArrayBufferView>();
    const collect = (value: unknown): void => {
      if (ArrayBuffer.isView(value)) arrays.add(value);
      else if (Array.isArray(value)) value.forEach(collect);
      else if (typeof value === 'object' && value !== null) Object.values(value).forEach(collect);
    };
    collect(weights);
    this.weightBytes = [...arrays].reduce((sum, array) => sum + array.byteLength, 0) + (device?.weightBytes ?? 0);
  }

  /** Reads this rank's slices of the checkpoint (only the bytes it needs). */
  static async load(spec: ShardSpec, communicator?: Communicator): Promise<DecoderShard> {
    const { plan, rank } = spec;
    const config = checkDecoderConfig(spec.config);
    if (!plan.stages[spec.stage]) throw new InvalidArgumentError(`stage ${spec.stage} is not in the plan's ${plan.stages.length} stages`);
    if (!(rank >= 0 && rank < plan.tensorParallel)) throw new InvalidArgumentError(`rank ${rank} is not in the stage's ${plan.tensorParallel} ranks`);
    if (plan.tensorParallel > 1 && communicator?.size !== plan.tensorParallel) {
      throw new InvalidArgumentError(`tensor parallelism ${plan.tensorParallel} needs a communicator of that size, got ${communicator ? communicator.size : 'none'}`);
    }
    await using checkpoint = await Checkpoint.open(spec.checkpoint);
    const weightDtype = resolveWeightDType(checkpoint, config, spec.weightDtype);
    const weights = await loadShardWeights(checkpoint, config, plan, spec.stage, rank, weightDtype);
    const kvCacheDtype = resolveCacheDType(spec.kvCacheDtype, weightDtype);
    if (!spec.layers) return new DecoderShard(spec, config, communicator, weights, kvCacheDtype);
    const kernels = DeviceKernels.create(spec.layers, 0);
    try {
      const device = DeviceLayers.create(kernels, {
        config,
        plan,
        layers: weights.layers,
        head: weights.head,
        kvCacheDtype,
        inverseFrequencies: config.architecture === 'llama' ? rotaryInverseFrequencies(config) : undefined,
        communicator,
      });
      // The host keeps what it uses itself: the embeddings, the final norm (and a tied head's table, the embedding).
      return new DecoderShard(spec, config, communicator, { ...weights, layers: [], head: undefined }, kvCacheDtype, device);
    } catch (error) {
      kernels.close();
      throw error;
    }
  }

  /**
   * On a GPU: the device's memory after this rank's weights, what a position of cache takes, and
   * what a step of `tokens` rows and `sequences` sequences takes besides the caches (for the
   * replica's cache budget). undefined for ranks whose memory is the host's.
   */
  deviceMemory(tokens: number, sequences: number): { freeBytes: number; totalBytes: number; bytesPerPosition: number; stepBytes: number } | undefined {
    const device = this.#device;
    if (!device || device.kernels.backend !== 'cuda') return undefined;
    const info = cuda.devices()[device.kernels.device];
    return { freeBytes: info.freeMemory, totalBytes: info.totalMemory, bytesPerPosition: device.bytesPerPosition, stepBytes: device.stepBytes(tokens, sequences) };
  }

  /** Gives back a device's memory, stream and kernels (the CPU decoder holds nothing to give back). */
  close(): void {
    if (!this.#device) return;
    this.#device.close();
    this.#device.kernels.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  /** Sequences whose keys and values this rank holds. */
  get cachedSequences(): number {
    return this.#device ? this.#device.cachedSequences : this.#caches.size;
  }

  /** Bytes this rank's key/value caches take (their capacity, grown by doubling). */
  get cacheBytes(): number {
    if (this.#device) return this.#device.cacheBytes;
    let bytes = 0;
    for (const cache of this.#caches.values()) for (const array of [...cache.keys, ...cache.values]) bytes += array.byteLength;
    return bytes;
  }

  /** One step of this stage: the next stage's message, or on the last stage the next tokens. */
  async forward(message: StepMessage): Promise<StepMessage | StepResult> {
    const { config } = this;
    const stage = this.spec.plan.stages[this.spec.stage];
    for (const id of message.unloadAdapters ?? []) {
      this.#adapters.delete(id);
      this.#device?.unloadAdapter(id);
    }
    for (const { id, info } of message.loadAdapters ?? []) {
      if (this.#adapters.has(id) || this.#device?.hasAdapter(id)) continue;
      const layers = await loadShardAdapter(info, config, this.spec.plan, this.spec.stage, this.spec.rank);
      // On a device the adapter's matrices live there; the host keeps none.
      if (this.#device) this.#device.loadAdapter(id, layers);
      else this.#adapters.set(id, layers);
    }
    const adapterOps = { ...(message.loadAdapters ? { loadAdapters: message.loadAdapters } : {}), ...(message.unloadAdapters ? { unloadAdapters: message.unloadAdapters } : {}) };
    // Copies first: a prefix's source may be released by this same message.
    for (const sequence of message.sequences) if (sequence.copyFrom) this.#copyPrefix(sequence.id, sequence.copyFrom, message.step);
    for (const id of message.released) {
      this.#device?.release(id);
      this.#caches.delete(id);
      this.#histories.delete(id);
      this.#poolSums.delete(id);
    }
    if (message.sequences.length === 0) {
      // A step that only releases caches still passes through every stage.
      return stage.hasHead ? { step: message.step, tokens: new Int32Array(0) } : { step: message.step, sequences: [], released: message.released, hidden: new Float32Array(0), ...adapterOps };
    }
    const hiddenSize = config.hiddenSize;
    let total = 0;
    for (const sequence of message.sequences) {
      const cache = this.#caches.get(sequence.id);
      // Proposals the last step did not keep: their keys and values go.
      if (sequence.rewind && cache && sequence.past < cache.length) cache.length = sequence.past;
      if (sequence.rewind) this.#device?.truncate(sequence.id, sequence.past);
      const known = this.#device ? this.#device.length(sequence.id) : (cache?.length ?? 0);
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
    const positions = new Int32Array(total);
    let row = 0;
    for (const sequence of message.sequences) for (let index = 0; index < sequence.count; index++) positions[row++] = sequence.past + index;
    const adapted = this.#adapterRows(message.sequences);
    if (this.#device) {
      await this.#device.run(hidden, message.sequences, adapted.map((group) => ({ adapter: group.id, rows: group.rows })));
    } else {
      for (let layer = 0; layer < this.#weights.layers.length; layer++) await this.#block(layer, hidden, message.sequences, positions, adapted);
      for (const sequence of message.sequences) this.#caches.get(sequence.id)!.length = sequence.past + sequence.count;
    }
    const penalized = message.sequences.some((sequence) => needsHistory(sequence.sampling));
    if (!stage.hasHead) {
      return {
        step: message.step,
        sequences: message.sequences,
        released: message.released,
        hidden,
        ...adapterOps,
        ...(message.logits ? { logits: true } : {}),
        ...(penalized && message.tokens ? { tokens: message.tokens } : {}),
      };
    }
    if (penalized) this.#recordInputs(message, total);
    const all = message.logits ? new Float32Array(message.sequences.length * config.vocabSize) : undefined;
    const logprobs = message.sequences.some((sequence) => sequence.logprobs) ? new Float32Array(message.sequences.length).fill(NaN) : undefined;
    const embeddings = message.sequences.some((sequence) => sequence.pooling) ? this.#pool(hidden, message.sequences) : undefined;
    const promptLogprobs = await this.#promptLogprobs(hidden, message.sequences);
    const topK = Math.max(0, ...message.sequences.map((sequence) => sequence.topLogprobs ?? 0));
    const top = topK > 0 ? { k: topK, tokens: new Int32Array(message.sequences.length * topK).fill(-1), logprobs: new Float32Array(message.sequences.length * topK).fill(NaN) } : undefined;
    const tokens = await this.#nextTokens(hidden, message.sequences, all, logprobs, top);
    const draftTokens = message.sequences.some((sequence) => sequence.draft) ? await this.#draftPicks(hidden, message.sequences) : undefined;
    return {
      step: message.step,
      tokens,
      ...(draftTokens ? { draftTokens } : {}),
      ...(all ? { logits: all } : {}),
      ...(logprobs ? { logprobs } : {}),
      ...(embeddings ? { embeddings } : {}),
      ...(promptLogprobs ? { promptLogprobs } : {}),
      ...(top ? { topTokens: top.tokens, topLogprobs: top.logprobs } : {}),
    };
  }

  /** Adds the step's input tokens (prompt pieces, or the last token generated) to the histories that need them. */
  #recordInputs(message: StepMessage, total: number): void {
    const tokens = message.tokens;
    if (!(tokens instanceof Int32Array) || tokens.length !== total) {
      throw new InvalidArgumentError(`step ${message.step}: sampling with penalties needs the step's ${total} tokens on the last stage, got ${tokens?.length ?? 'none'}`);
    }
    let row = 0;
    for (const sequence of message.sequences) {
      if (needsHistory(sequence.sampling)) {
        const history = this.#historyOf(sequence.id);
        for (let index = 0; index < sequence.count; index++) history.seen.add(tokens[row + index]);
      }
      row += sequence.count;
    }
  }

  #historyOf(id: number): TokenHistory {
    let history = this.#histories.get(id);
    if (!history) {
      history = { seen: new Set(), generated: new Map() };
      this.#histories.set(id, history);
    }
    return history;
  }

  #embed(message: StepMessage, total: number): Float32Array {
    const { config } = this;
    const tokens = message.tokens;
    if (!(tokens instanceof Int32Array) || tokens.length !== total) {
      throw new InvalidArgumentError(`step ${message.step}: the first stage needs ${total} tokens as an Int32Array, got ${tokens?.length ?? 'none'}`);
    }
    const size = config.hiddenSize;
    const hidden = new Float32Array(total * size);
    const table = this.#weights.tokenEmbedding!;
    const positions = this.#weights.positionEmbedding;
    let row = 0;
    for (const sequence of message.sequences) {
      for (let index = 0; index < sequence.count; index++, row++) {
        const token = tokens[row];
        if (!(token >= 0 && token < config.vocabSize)) {
          throw new InvalidArgumentError(`sequence ${sequence.id}: token ${token} is outside the vocabulary of ${config.vocabSize}`, 'ERR_TOKEN');
        }
        const out = hidden.subarray(row * size, (row + 1) * size);
        readRows(out, table, size, token);
        if (positions) {
          const position = sequence.past + index;
          const positionRow = positions.subarray(position * size, (position + 1) * size);
          for (let column = 0; column < size; column++) out[column] += positionRow[column];
        }
      }
    }
    return hidden;
  }

  /** A new sequence's cache, starting as a copy of another's first `length` positions (prefix caching). */
  #copyPrefix(id: number, from: { id: number; length: number }, step: number): void {
    if (this.#device) {
      this.#device.copyPrefix(id, from.id, from.length);
      return;
    }
    const source = this.#caches.get(from.id);
    if (!source || source.length < from.length) {
      throw new InvalidArgumentError(`step ${step}: sequence ${id} starts from ${from.length} positions of sequence ${from.id}, which this shard holds ${source ? source.length : 'none'} of`, 'ERR_SEQUENCE_STATE');
    }
    if (this.#caches.has(id)) throw new InvalidArgumentError(`step ${step}: sequence ${id} starts from a copy, but this shard already holds it`, 'ERR_SEQUENCE_STATE');
    this.#reserve(id, from.length);
    const cache = this.#caches.get(id)!;
    const rowSize = this.spec.plan.keyValueHeadsPerRank * this.spec.plan.headSize;
    for (let layer = 0; layer < this.#weights.layers.length; layer++) {
      cache.keys[layer].set(source.keys[layer].subarray(0, from.length * rowSize));
      cache.values[layer].set(source.values[layer].subarray(0, from.length * rowSize));
    }
    cache.length = from.length;
  }

  /** Room in each layer's cache for `length` tokens, grown by doubling. */
  #reserve(id: number, length: number): void {
    if (this.#device) {
      this.#device.reserve(id, length);
      return;
    }
    const rowSize = this.spec.plan.keyValueHeadsPerRank * this.spec.plan.headSize;
    let cache = this.#caches.get(id);
    if (!cache) {
      cache = { length: 0, capacity: 0, keys: [], values: [] };
      this.#caches.set(id, cache);
    }
    if (cache.capacity >= length) return;
    const capacity = Math.min(this.config.maxPositions, Math.max(16, 2 ** Math.ceil(Math.log2(length))));
    const grow = (old: Float32Array | Uint16Array | undefined) => {
      const next = this.kvCacheDtype === 'f32' ? new Float32Array(capacity * rowSize) : new Uint16Array(capacity * rowSize);
      if (old) next.set(old.subarray(0, cache!.length * rowSize));
      return next;
    };
    for (let layer = 0; layer < this.#weights.layers.length; layer++) {
      cache.keys[layer] = grow(cache.keys[layer]);
      cache.values[layer] = grow(cache.values[layer]);
    }
    cache.capacity = capacity;
  }

  #norm(out: Float32Array, x: Float32Array, weights: NormWeights, rows: number): void {
    if (weights.beta) layerNorm(out, x, weights.gamma, weights.beta, rows, this.config.hiddenSize, this.config.layerNormEpsilon);
    else rmsNorm(out, x, weights.gamma, rows, this.config.hiddenSize, this.config.layerNormEpsilon);
  }

  async #allreduce(values: Float32Array): Promise<void> {
    if (this.spec.plan.tensorParallel > 1) await this.#communicator!.allreduce(Tensor.wrap(values, 'f32'), 'sum');
  }

  /** The rows of each adapter the step's sequences use (a sequence's rows are contiguous), with its layers (on the host; none on a device). */
  #adapterRows(sequences: StepSequence[]): AdaptedRows[] {
    const byAdapter = new Map<number, AdaptedRows>();
    let row = 0;
    for (const sequence of sequences) {
      if (sequence.adapter !== undefined) {
        let group = byAdapter.get(sequence.adapter);
        if (!group) {
          const layers = this.#adapters.get(sequence.adapter);
          if (!layers && !this.#device?.hasAdapter(sequence.adapter)) throw new InvalidArgumentError(`sequence ${sequence.id} uses adapter ${sequence.adapter}, which this rank has not loaded`, 'ERR_ADAPTER');
          byAdapter.set(sequence.adapter, (group = { id: sequence.adapter, layers: layers ?? [], rows: [] }));
        }
        for (let index = 0; index < sequence.count; index++) group.rows.push(row + index);
      }
      row += sequence.count;
    }
    return [...byAdapter.values()];
  }

  async #block(layerIndex: number, hidden: Float32Array, sequences: StepSequence[], positions: Int32Array, adapted: AdaptedRows[]): Promise<void> {
    const lowRank = (out: Float32Array, input: Float32Array, module: keyof LayerAdapter, inWidth: number, outWidth: number) => {
      for (const group of adapted) {
        const update = group.layers[layerIndex][module];
        if (update) addLowRank(out, input, update, group.rows, inWidth, outWidth);
      }
    };
    const { config } = this;
    const { plan } = this.spec;
    const layer: LayerWeights = this.#weights.layers[layerIndex];
    const total = positions.length;
    const size = config.hiddenSize;
    const headSize = plan.headSize;
    const queryWidth = plan.headsPerRank * headSize;
    const keyWidth = plan.keyValueHeadsPerRank * headSize;
    const rowWidth = queryWidth + 2 * keyWidth;
    const normed = new Float32Array(total * size);
    this.#norm(normed, hidden, layer.attentionNorm, total);
    const qkv = new Float32Array(total * rowWidth);
    linear(qkv, normed, layer.qkvWeight, layer.qkvBias ?? null, total, size, rowWidth);
    lowRank(qkv, normed, 'qkv', size, rowWidth);
    const attended = new Float32Array(total * queryWidth);
    let row = 0;
    const kvDtype = this.kvCacheDtype;
    for (const sequence of sequences) {
      const cache = this.#caches.get(sequence.id)!;
      const keys = cache.keys[layerIndex];
      const values = cache.values[layerIndex];
      const queries = new Float32Array(sequence.count * queryWidth);
      const from = sequence.past * keyWidth;
      const to = (sequence.past + sequence.count) * keyWidth;
      // An f32 cache takes the new keys and values in place; a 16-bit one from f32 scratch, rounded once.
      const newKeys = kvDtype === 'f32' ? (keys as Float32Array).subarray(from, to) : new Float32Array(sequence.count * keyWidth);
      const newValues = kvDtype === 'f32' ? (values as Float32Array).subarray(from, to) : new Float32Array(sequence.count * keyWidth);
      for (let index = 0; index < sequence.count; index++) {
        const source = (row + index) * rowWidth;
        queries.set(qkv.subarray(source, source + queryWidth), index * queryWidth);
        newKeys.set(qkv.subarray(source + queryWidth, source + queryWidth + keyWidth), index * keyWidth);
        newValues.set(qkv.subarray(source + queryWidth + keyWidth, source + rowWidth), index * keyWidth);
      }
      if (layer.queryNorm && layer.keyNorm) {
        // Qwen3: each head's query and key RMS-normalized over its own width, before rotary positions.
        headNorm(queries, layer.queryNorm, sequence.count * plan.headsPerRank, headSize, config.layerNormEpsilon);
        headNorm(newKeys, layer.keyNorm, sequence.count * plan.keyValueHeadsPerRank, headSize, config.layerNormEpsilon);
      }
      if (this.#inverseFrequencies) {
        // Rotary positions turn the new queries and keys; the cache keeps keys already turned.
        const at = positions.subarray(row, row + sequence.count);
        rotary(queries, at, this.#inverseFrequencies, sequence.count, plan.headsPerRank, headSize);
        rotary(newKeys, at, this.#inverseFrequencies, sequence.count, plan.keyValueHeadsPerRank, headSize);
      }
      let cachedKeys: Float32Array | HalfMatrix = keys as Float32Array;
      let cachedValues: Float32Array | HalfMatrix = values as Float32Array;
      if (kvDtype !== 'f32') {
        // Attention widens them as it reads.
        narrow({ dtype: kvDtype, bits: (keys as Uint16Array).subarray(from, to) }, newKeys);
        narrow({ dtype: kvDtype, bits: (values as Uint16Array).subarray(from, to) }, newValues);
        cachedKeys = { dtype: kvDtype, bits: keys as Uint16Array };
        cachedValues = { dtype: kvDtype, bits: values as Uint16Array };
      }
      attention(attended.subarray(row * queryWidth, (row + sequence.count) * queryWidth), queries, cachedKeys, cachedValues, sequence.count, sequence.past, plan.headsPerRank, headSize, plan.keyValueHeadsPerRank, config.slidingWindow);
      row += sequence.count;
    }
    const projected = new Float32Array(total * size);
    linear(projected, attended, layer.projectionWeight, null, total, queryWidth, size);
    // Before the allreduce: each rank's share of B (A x) is summed with the partial outputs.
    lowRank(projected, attended, 'projection', queryWidth, size);
    await this.#allreduce(projected);
    addResidual(hidden, projected, layer.projectionBias, size);
    this.#norm(normed, hidden, layer.mlpNorm, total);
    const inner = plan.intermediatePerRank;
    const mlp = layer.mlp;
    const down = projected;
    if (mlp.kind === 'experts') {
      this.#experts(down, normed, mlp, total);
    } else {
      const up = new Float32Array(total * inner);
      linear(up, normed, mlp.up, mlp.upBias ?? null, total, size, inner);
      lowRank(up, normed, 'up', size, inner);
      let activated = up;
      if (mlp.gate) {
        activated = new Float32Array(total * inner);
        linear(activated, normed, mlp.gate, null, total, size, inner);
        lowRank(activated, normed, 'gate', size, inner);
        siluMultiply(activated, activated, up);
      } else {
        gelu(up);
      }
      linear(down, activated, mlp.down, null, total, inner, size);
      lowRank(down, activated, 'down', inner, size);
    }
    await this.#allreduce(down);
    addResidual(hidden, down, mlp.kind === 'dense' ? mlp.downBias : undefined, size);
  }

  /**
   * A sparse MoE block: each row goes to its topK experts by the router's softmax, each expert
   * runs once over the rows routed to it (gathered), and each row sums its experts' outputs,
   * weighted, in expert order: the same sum whatever the batch. This rank's share of each expert
   * only; the caller's allreduce adds the others'.
   */
  #experts(out: Float32Array, x: Float32Array, mlp: ExpertMlp, total: number): void {
    const size = this.config.hiddenSize;
    const inner = this.spec.plan.intermediatePerRank;
    const count = mlp.experts.length;
    const logits = new Float32Array(total * count);
    linear(logits, x, mlp.router, null, total, size, count);
    const { rowsOf, weightsOf } = routeExperts(logits, total, count, mlp.topK, mlp.normalizeTopK);
    out.fill(0);
    for (let expert = 0; expert < count; expert++) {
      const rows = rowsOf[expert];
      const routed = rows.length;
      if (routed === 0) continue;
      const gathered = new Float32Array(routed * size);
      rows.forEach((row, index) => gathered.set(x.subarray(row * size, (row + 1) * size), index * size));
      const weights = mlp.experts[expert];
      const gate = new Float32Array(routed * inner);
      const up = new Float32Array(routed * inner);
      linear(gate, gathered, weights.gate, null, routed, size, inner);
      linear(up, gathered, weights.up, null, routed, size, inner);
      siluMultiply(gate, gate, up);
      const result = new Float32Array(routed * size);
      linear(result, gate, weights.down, null, routed, inner, size);
      rows.forEach((row, index) => {
        const weight = weightsOf[expert][index];
        const target = row * size;
        const source = index * size;
        for (let column = 0; column < size; column++) out[target + column] += weight * result[source + column];
      });
    }
  }

  /**
   * The pooled embeddings of the sequences whose prompt this step finishes reading; mean-pooled
   * sequences also add this step's positions to their sums.
   */
  #pool(hidden: Float32Array, sequences: StepSequence[]): Float32Array {
    const size = this.config.hiddenSize;
    const embeddings = new Float32Array(sequences.length * size).fill(NaN);
    let row = 0;
    sequences.forEach((sequence, index) => {
      const first = row;
      row += sequence.count;
      // The last position's state is wanted only once the prompt is read.
      if (!sequence.pooling || (sequence.pooling === 'last' && sequence.prefill)) return;
      const normed = new Float32Array(sequence.pooling === 'last' ? size : sequence.count * size);
      normed.set(hidden.subarray(sequence.pooling === 'last' ? (row - 1) * size : first * size, row * size));
      this.#norm(normed, normed, this.#weights.finalNorm!, normed.length / size);
      const target = embeddings.subarray(index * size, (index + 1) * size);
      if (sequence.pooling === 'last') {
        target.set(normed);
        return;
      }
      let sums = this.#poolSums.get(sequence.id);
      if (!sums) this.#poolSums.set(sequence.id, (sums = new Float64Array(size)));
      for (let position = 0; position < sequence.count; position++) {
        for (let column = 0; column < size; column++) sums[column] += normed[position * size + column];
      }
      if (sequence.prefill) return;
      const positions = sequence.past + sequence.count;
      for (let column = 0; column < size; column++) target[column] = sums[column] / positions;
      this.#poolSums.delete(sequence.id);
    });
    return embeddings;
  }

  /**
   * Log-probabilities of the prompt's next tokens at the positions that ask. The head runs over
   * those rows; each rank reduces its slice of the vocabulary to three numbers per row (its
   * largest logit, the sum of exponentials below it, the target's logit if the slice holds it),
   * so the ranks exchange those rather than whole rows of logits.
   */
  async #promptLogprobs(hidden: Float32Array, sequences: StepSequence[]): Promise<Float32Array | undefined> {
    if (!sequences.some((sequence) => sequence.targets)) return undefined;
    const { config } = this;
    const { plan } = this.spec;
    const size = config.hiddenSize;
    const rows: number[] = [];
    const targets: number[] = [];
    const places: number[] = [];
    let row = 0;
    let place = 0;
    for (const sequence of sequences) {
      if (sequence.targets) {
        for (let index = 0; index < sequence.count; index++) {
          const target = sequence.targets[index];
          if (target >= 0) {
            rows.push(row + index);
            targets.push(target);
            places.push(place + index);
          }
        }
        place += sequence.count;
      }
      row += sequence.count;
    }
    const out = new Float32Array(place).fill(NaN);
    if (rows.length === 0) return out;
    const normed = new Float32Array(rows.length * size);
    rows.forEach((source, index) => normed.set(hidden.subarray(source * size, (source + 1) * size), index * size));
    this.#norm(normed, normed, this.#weights.finalNorm!, rows.length);
    const slice = plan.vocabularyPerRank;
    const first = this.spec.rank * slice;
    const valid = Math.max(0, Math.min(slice, config.vocabSize - first));
    const local = this.#headMatmul(normed, rows.length);
    const stats = new Float32Array(rows.length * 3);
    for (let index = 0; index < rows.length; index++) {
      const logits = local.subarray(index * slice, index * slice + valid);
      let maximum = -Infinity;
      for (const value of logits) if (value > maximum) maximum = value;
      let sum = 0;
      for (const value of logits) sum += Math.exp(value - maximum);
      const target = targets[index] - first;
      stats.set([maximum, sum, target >= 0 && target < valid ? logits[target] : -Infinity], index * 3);
    }
    let gathered = stats;
    if (plan.tensorParallel > 1) {
      gathered = new Float32Array(plan.tensorParallel * stats.length);
      await this.#allgather(stats, gathered);
    }
    for (let index = 0; index < rows.length; index++) {
      let maximum = -Infinity;
      let target = -Infinity;
      for (let rank = 0; rank < plan.tensorParallel; rank++) {
        const at = (rank * rows.length + index) * 3;
        maximum = Math.max(maximum, gathered[at]);
        target = Math.max(target, gathered[at + 2]);
      }
      let sum = 0;
      for (let rank = 0; rank < plan.tensorParallel; rank++) {
        const at = (rank * rows.length + index) * 3;
        if (gathered[at + 1] > 0) sum += gathered[at + 1] * Math.exp(gathered[at] - maximum);
      }
      out[places[index]] = target - maximum - Math.log(sum);
    }
    return out;
  }

  /**
   * For each sequence with a draft: the token picked after each of its positions but the last,
   * with its own sampling and that position, so a proposal is kept exactly where plain decoding
   * would have picked it.
   */
  async #draftPicks(hidden: Float32Array, sequences: StepSequence[]): Promise<Int32Array> {
    const size = this.config.hiddenSize;
    const rows: number[] = [];
    const positions: Array<{ sequence: StepSequence; position: number; draftIndex: number }> = [];
    let end = 0;
    for (const sequence of sequences) {
      end += sequence.count;
      const draft = sequence.draft ?? 0;
      for (let index = 0; index < draft; index++) {
        // Row end - 1 - draft + index reads position past + count - 1 - draft + index; its pick is the token after it.
        rows.push(end - 1 - draft + index);
        positions.push({ sequence, position: sequence.past + sequence.count - draft + index, draftIndex: index });
      }
    }
    const picks = new Int32Array(rows.length);
    if (rows.length > 0) {
      await this.#headLogits(hidden, rows, size, (index, logits) => {
        const { sequence, position, draftIndex } = positions[index];
        const mask = sequence.draftMasks?.[draftIndex];
        picks[index] = pickToken(mask ? maskedOnly(logits, mask, sequence.id) : logits, sequence.sampling, position);
      });
    }
    return picks;
  }

  /**
   * The full-vocabulary logits of the given rows of `hidden` (final norm, this rank's head,
   * gathered over the ranks), handed to `visit` one row at a time in one reused buffer.
   */
  async #headLogits(hidden: Float32Array, rows: number[], size: number, visit: (index: number, logits: Float32Array) => void): Promise<void> {
    const { config } = this;
    const { plan } = this.spec;
    const count = rows.length;
    const selected = new Float32Array(count * size);
    rows.forEach((row, index) => selected.set(hidden.subarray(row * size, (row + 1) * size), index * size));
    this.#norm(selected, selected, this.#weights.finalNorm!, count);
    const slice = plan.vocabularyPerRank;
    const local = this.#headMatmul(selected, count);
    let gathered = local;
    if (plan.tensorParallel > 1) {
      gathered = new Float32Array(plan.tensorParallel * count * slice);
      await this.#allgather(local, gathered);
    }
    // Gathered as [rank][row][slice]: each row's logits are its slices from every rank.
    const logits = new Float32Array(config.vocabSize);
    for (let index = 0; index < count; index++) {
      for (let rank = 0; rank < plan.tensorParallel; rank++) {
        const first = rank * slice;
        const length = Math.min(slice, config.vocabSize - first);
        if (length <= 0) break;
        const start = (rank * count + index) * slice;
        logits.set(gathered.subarray(start, start + length), first);
      }
      visit(index, logits);
    }
  }

  async #nextTokens(
    hidden: Float32Array,
    sequences: StepSequence[],
    keep: Float32Array | undefined,
    logprobs: Float32Array | undefined,
    top?: { k: number; tokens: Int32Array; logprobs: Float32Array },
  ): Promise<Int32Array> {
    const { config } = this;
    const size = config.hiddenSize;
    // The head runs only for sequences that want a token now: not for a prompt piece, nor for an embedding.
    const wanting: number[] = [];
    sequences.forEach((sequence, index) => {
      if (!sequence.prefill && !sequence.pooling) wanting.push(index);
    });
    const tokens = new Int32Array(sequences.length).fill(-1);
    const count = wanting.length;
    if (count === 0) return tokens;
    const ends: number[] = [];
    let end = 0;
    for (const sequence of sequences) ends.push((end += sequence.count));
    await this.#headLogits(hidden, wanting.map((sequenceIndex) => ends[sequenceIndex] - 1), size, (index, logits) => {
      const sequenceIndex = wanting[index];
      keep?.set(logits, sequenceIndex * config.vocabSize);
      const sequence = sequences[sequenceIndex];
      const history = needsHistory(sequence.sampling) ? this.#historyOf(sequence.id) : undefined;
      const constrained = sequence.allowedMask ? maskedOnly(logits, sequence.allowedMask, sequence.id) : sequence.allowed ? allowedOnly(logits, sequence.allowed, sequence.id) : logits;
      const candidates = sequence.banned ? withoutBanned(constrained, sequence.banned, sequence.id) : constrained;
      const token = pickToken(candidates, sequence.sampling, sequence.past + sequence.count, history);
      if (history) {
        history.seen.add(token);
        history.generated.set(token, (history.generated.get(token) ?? 0) + 1);
      }
      tokens[sequenceIndex] = token;
      if (sequence.logprobs) logprobs![sequenceIndex] = logProbability(logits, token);
      if (sequence.topLogprobs) mostLikely(logits, sequence.topLogprobs, top!.tokens.subarray(sequenceIndex * top!.k), top!.logprobs.subarray(sequenceIndex * top!.k));
    });
    return tokens;
  }

  /**
   * This rank's slice of the logits of `rows` final-normed rows, [rows, vocabularyPerRank]: on
   * the device when the layers are there, in a buffer it reuses (read it before the next call).
   */
  #headMatmul(normed: Float32Array, rows: number): Float32Array {
    if (this.#device?.hasHead) return this.#device.headLogits(normed, rows);
    const out = new Float32Array(rows * this.spec.plan.vocabularyPerRank);
    linear(out, normed, this.#head(), null, rows, this.config.hiddenSize, this.spec.plan.vocabularyPerRank);
    return out;
  }

  /** Host arrays gathered over the stage's ranks, through the device when the group is NCCL's. */
  async #allgather(local: Float32Array, gathered: Float32Array): Promise<void> {
    const communicator = this.#communicator!;
    if (this.#device && communicator.tensorDevice !== 'cpu') await this.#device.allgatherHost(local, gathered);
    else await communicator.allgather(Tensor.wrap(local, 'f32'), Tensor.wrap(gathered, 'f32'));
  }

  /** The language-model head, or a typed error for a checkpoint saved without one. */
  #head(): WeightMatrix {
    const head = this.#weights.head;
    if (!head) throw new InvalidArgumentError('the checkpoint has no language-model head (no lm_head.weight, and its embeddings are not tied): it can embed and classify, not pick tokens', 'ERR_NO_LM_HEAD');
    return head;
  }

  /** Drops every cached sequence. */
  clear(): void {
    this.#device?.clearCaches();
    this.#caches.clear();
    this.#histories.clear();
    this.#poolSums.clear();
  }
}

/** The logits with the `banned` tokens at -infinity (a copy), unless that would leave none. */
function withoutBanned(logits: Float32Array, banned: Int32Array, id: number): Float32Array {
  const masked = Float32Array.from(logits);
  for (const token of banned) if (token >= 0 && token < masked.length) masked[token] = -Infinity;
  if (!masked.some((value) => value > -Infinity)) throw new InvalidArgumentError(`sequence ${id}: every allowed token is a stop token before minNewTokens`, 'ERR_CONSTRAINT');
  return masked;
}

/** The logits with every token whose bit is clear in `mask` at -infinity. */
function maskedOnly(logits: Float32Array, mask: Uint32Array, id: number): Float32Array {
  if (mask.length > Math.ceil(logits.length / 32)) throw new InvalidArgumentError(`sequence ${id}: its constraint's mask has ${mask.length} words for a vocabulary of ${logits.length}`, 'ERR_CONSTRAINT');
  // Ids past the mask's words (a tokenizer smaller than the model's vocabulary) stay at -infinity.
  const masked = new Float32Array(logits.length).fill(-Infinity);
  let any = false;
  const covered = Math.min(logits.length, mask.length * 32);
  for (let token = 0; token < covered; token++) {
    if (mask[token >>> 5] & (1 << (token & 31))) {
      masked[token] = logits[token];
      any = true;
    }
  }
  if (!any) throw new InvalidArgumentError(`sequence ${id}: its constraint allows no token`, 'ERR_CONSTRAINT');
  return masked;
}

/** The logits with every token outside `allowed` at -infinity, so no sampling can pick it. */
function allowedOnly(logits: Float32Array, allowed: Int32Array, id: number): Float32Array {
  if (allowed.length === 0) throw new InvalidArgumentError(`sequence ${id}: its constraint allows no token`, 'ERR_CONSTRAINT');
  const masked = new Float32Array(logits.length).fill(-Infinity);
  for (const token of allowed) {
    if (!(token >= 0 && token < logits.length)) throw new InvalidArgumentError(`sequence ${id}: its constraint allows token ${token}, outside the vocabulary of ${logits.length}`, 'ERR_CONSTRAINT');
    masked[token] = logits[token];
  }
  return masked;
}

/** The cache's dtype asked for, checked; 'auto' follows the weights' (int8 weights keep a bf16 cache). */
export function resolveCacheDType(requested: CacheDType | 'auto' = 'auto', weights: WeightDType): CacheDType {
  if (requested === 'auto') return weights === 'int8' ? 'bf16' : weights;
  if (requested !== 'f32' && requested !== 'bf16' && requested !== 'f16') {
    throw new InvalidArgumentError(`kvCacheDtype must be 'auto', 'f32', 'bf16' or 'f16', got ${JSON.stringify(requested)}`);
  }
  return requested;
}

/** log softmax(logits)[token], the sum in double with the maximum taken out. */
/** The `k` most likely tokens (most likely first) and their log-probabilities, written into `tokens` and `values`. */
function mostLikely(logits: Float32Array, k: number, tokens: Int32Array, values: Float32Array): void {
  let maximum = -Infinity;
  for (const value of logits) if (value > maximum) maximum = value;
  let sum = 0;
  for (const value of logits) sum += Math.exp(value - maximum);
  const normalizer = maximum + Math.log(sum);
  // k passes of a linear scan: k is small (vLLM caps it at 20), the vocabulary is not.
  const taken = new Set<number>();
  for (let rank = 0; rank < Math.min(k, logits.length); rank++) {
    let best = -1;
    for (let index = 0; index < logits.length; index++) {
      if (taken.has(index)) continue;
      if (best < 0 || logits[index] > logits[best]) best = index;
    }
    taken.add(best);
    tokens[rank] = best;
    values[rank] = logits[best] - normalizer;
  }
}

function logProbability(logits: Float32Array, token: number): number {
  let maximum = -Infinity;
  for (let index = 0; index < logits.length; index++) if (logits[index] > maximum) maximum = logits[index];
  let sum = 0;
  for (let index = 0; index < logits.length; index++) sum += Math.exp(logits[index] - maximum);
  return logits[token] - maximum - Math.log(sum);
}

/** hidden += update (+ bias), row by row. */
/** RMS norm over each of `rows` heads of `width` in `values`, in place (through scratch: the kernel reads and writes apart). */
function headNorm(values: Float32Array, gamma: Float32Array, rows: number, width: number, epsilon: number): void {
  const normed = new Float32Array(rows * width);
  rmsNorm(normed, values, gamma, rows, width, epsilon);
  values.set(normed);
}

/** The `rows` of `out` gain update.b · (update.a · x) for the same rows of `input`: gathered, two thin matmuls, added back. */
function addLowRank(out: Float32Array, input: Float32Array, update: LowRankUpdate, rows: readonly number[], inWidth: number, outWidth: number): void {
  const count = rows.length;
  const gathered = new Float32Array(count * inWidth);
  rows.forEach((row, index) => gathered.set(input.subarray(row * inWidth, (row + 1) * inWidth), index * inWidth));
  const reduced = new Float32Array(count * update.rank);
  linear(reduced, gathered, update.a, null, count, inWidth, update.rank);
  const expanded = new Float32Array(count * outWidth);
  linear(expanded, reduced, update.b, null, count, update.rank, outWidth);
  rows.forEach((row, index) => {
    const target = row * outWidth;
    const source = index * outWidth;
    for (let column = 0; column < outWidth; column++) out[target + column] += expanded[source + column];
  });
}

interface AdaptedRows {
  id: number;
  layers: LayerAdapter[];
  /** The step's rows (positions read) of the sequences using this adapter, ascending. */
  rows: number[];
}

function addResidual(hidden: Float32Array, update: Float32Array, bias: Float32Array | undefined, size: number): void {
  if (bias) for (let index = 0; index < hidden.length; index++) hidden[index] += update[index] + bias[index % size];
  else for (let index = 0; index < hidden.length; index++) hidden[index] += update[index];
}
