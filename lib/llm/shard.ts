/**
 * One rank of a sharded decoder (lib/llm/weights.ts says which weights it holds) and one step of
 * its forward pass over many sequences at once. Sequences are packed end to end (no padding): a
 * step may mix prompts being read whole with sequences generating one token each. The layers, the
 * head and every sequence's key/value cache live in DeviceLayers (host memory and the CPU kernels,
 * or a GPU); this module does what is small and stays on the host: embedding lookups, the final
 * norm, sampling and constraints, pooling, prompt scoring, speculative picks.
 */
import { InvalidArgumentError } from '../errors.js';
import type { Communicator } from '../gpu/communicator.js';
import { Tensor } from '../gpu/tensor.js';
import { checkDecoderConfig, rotaryInverseFrequencies, type DecoderConfig, type ResolvedDecoderConfig } from './config.js';
import { layerNorm, linear, readRows, rmsNorm, type CacheDType, type WeightDType, type WeightMatrix } from './kernels.js';
import type { ShardingPlan } from './plan.js';
import { Checkpoint } from './safetensors.js';
import { localCheckpoint } from './model-source.js';
import type { FileSystem } from '../data/filesystem/file-system.js';
import { needsHistory, pickToken, type SamplingParameters, type TokenHistory } from './sampling.js';
import { loadShardWeights, resolveWeightDType, type NormWeights, type ShardWeights } from './weights.js';
import { loadShardAdapter, type AdapterInfo } from './lora.js';
import { DeviceKernels, type KernelBackend } from './device-kernels.js';
import { DeviceLayers, type AdapterRows } from './device-layers.js';
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
  /** With targets: the k most likely tokens at each scored position too (vLLM's prompt_logprobs=k), in `promptTopTokens`. */
  targetsTop?: number;
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
  /**
   * The hidden states of the new tokens, [tokens, hiddenSize] (later stages): on the host, or
   * between GPU stages a CUDA tensor that travels by CUDA IPC (the replica marks those edges).
   */
  hidden?: Float32Array | Tensor;
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
   * When a sequence with targets asks for its k most likely tokens there (targetsTop): [scored
   * positions, k] ids (most likely first; -1 pads) and their log-probabilities, laid out as
   * promptLogprobs, k the largest any sequence of the step asked.
   */
  promptTopTokens?: Int32Array;
  promptTopLogprobs?: Float32Array;
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
  /** A local path or a URL (the host's copy is loaded, made first if there is none). */
  checkpoint: string;
  filesystem?: FileSystem;
  config: DecoderConfig;
  plan: ShardingPlan;
  stage: number;
  rank: number;
  /** How matrices are kept (default 'auto': 16-bit checkpoints stay 16-bit; see resolveWeightDType). */
  weightDtype?: WeightDType | 'auto';
  /** How the key/value cache is kept (default 'auto': as the weights are; bf16 for int8 weights). */
  kvCacheDtype?: CacheDType | 'auto';
  /**
   * Where the layers, the head and the key/value caches live and run (lib/llm/device-layers.ts):
   * 'cpu' (default: the CPU kernels over host memory) or 'cuda' (the rank's GPU, device 0 of its
   * CUDA_VISIBLE_DEVICES).
   */
  layers?: KernelBackend;
  /**
   * On 'cuda', with a later pipeline stage: hand it the hidden states as a CUDA tensor (over the
   * compiled graph's CUDA IPC edge) instead of through host memory.
   */
  hiddenOnDevice?: boolean;
  /** Where mixtures of experts route (DeviceLayersOptions.expertRouting; default 'auto'). */
  expertRouting?: 'auto' | 'host' | 'device';
}

export class DecoderShard {
  readonly spec: ShardSpec;
  readonly config: ResolvedDecoderConfig;
  readonly #communicator: Communicator | undefined;
  /** What the host keeps: the embeddings and the final norm (the layers and head are in #layers). */
  readonly #weights: ShardWeights;
  readonly #layers: DeviceLayers;
  /** On the last stage, for sequences whose sampling has penalties: the tokens each has seen. */
  readonly #histories = new Map<number, TokenHistory>();
  /** On the last stage, for sequences mean-pooled: the sum of their positions' final norms so far (in double). */
  readonly #poolSums = new Map<number, Float64Array>();
  /** Bytes of weights this rank holds. */
  readonly weightBytes: number;
  /** How the key/value cache is kept ('auto' resolved). */
  readonly kvCacheDtype: CacheDType;

  private constructor(spec: ShardSpec, config: ResolvedDecoderConfig, communicator: Communicator | undefined, weights: ShardWeights, kvCacheDtype: CacheDType, layers: DeviceLayers, weightBytes: number) {
    this.spec = spec;
    this.config = config;
    this.kvCacheDtype = kvCacheDtype;
    this.#communicator = communicator;
    this.#weights = weights;
    this.#layers = layers;
    this.weightBytes = weightBytes;
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
    await using checkpoint = await Checkpoint.open(await localCheckpoint(spec.checkpoint, { ...(spec.filesystem ? { filesystem: spec.filesystem } : {}) }));
    const weightDtype = resolveWeightDType(checkpoint, config, spec.weightDtype);
    const weights = await loadShardWeights(checkpoint, config, plan, spec.stage, rank, weightDtype);
    const kvCacheDtype = resolveCacheDType(spec.kvCacheDtype, weightDtype);
    const kernels = DeviceKernels.create(spec.layers ?? 'cpu', 0);
    try {
      const layers = DeviceLayers.create(kernels, {
        config,
        plan,
        layers: weights.layers,
        head: weights.head,
        kvCacheDtype,
        inverseFrequencies: config.architecture === 'llama' ? rotaryInverseFrequencies(config) : undefined,
        communicator,
        ...(spec.expertRouting ? { expertRouting: spec.expertRouting } : {}),
      });
      // The host keeps what it uses itself: the embeddings and the final norm (a tied head's table
      // is the embedding). On the host backend the layers hold the very arrays read, not copies:
      // count each array once (a tied head is the embedding itself).
      const hostWeights = { ...weights, layers: [], head: undefined };
      const weightBytes = kernels.backend === 'cpu' ? bytesOf(weights) : bytesOf(hostWeights) + layers.weightBytes;
      return new DecoderShard(spec, config, communicator, hostWeights, kvCacheDtype, layers, weightBytes);
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
  /** Takes the memory of `positions` cache positions now, in this rank's device (see DeviceLayers.reserveCache). */
  reserveCache(positions: number): void {
    this.#layers.reserveCache(positions);
  }

  deviceMemory(tokens: number, sequences: number): { freeBytes: number; totalBytes: number; bytesPerPosition: number; stepBytes: number } | undefined {
    const device = this.#layers;
    if (device.kernels.backend !== 'cuda') return undefined;
    const info = cuda.devices()[device.kernels.device];
    return { freeBytes: info.freeMemory, totalBytes: info.totalMemory, bytesPerPosition: device.bytesPerPosition, stepBytes: device.stepBytes(tokens, sequences) };
  }

  /** Gives back the layers' memory (a GPU's, with its stream and kernels). */
  close(): void {
    this.#layers.close();
    this.#layers.kernels.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.close();
  }

  /** Sequences whose keys and values this rank holds. */
  get cachedSequences(): number {
    return this.#layers.cachedSequences;
  }

  /** Bytes this rank's key/value cache blocks take (slabs of blocks: those held and free ones kept for reuse). */
  get cacheBytes(): number {
    return this.#layers.cacheBytes;
  }

  /** One step of this stage: the next stage's message, or on the last stage the next tokens. */
  async forward(message: StepMessage): Promise<StepMessage | StepResult> {
    const { config } = this;
    const stage = this.spec.plan.stages[this.spec.stage];
    for (const id of message.unloadAdapters ?? []) this.#layers.unloadAdapter(id);
    for (const { id, info } of message.loadAdapters ?? []) {
      if (!this.#layers.hasAdapter(id)) this.#layers.loadAdapter(id, await loadShardAdapter(info, config, this.spec.plan, this.spec.stage, this.spec.rank));
    }
    const adapterOps = { ...(message.loadAdapters ? { loadAdapters: message.loadAdapters } : {}), ...(message.unloadAdapters ? { unloadAdapters: message.unloadAdapters } : {}) };
    // Copies first: a prefix's source may be released by this same message.
    for (const sequence of message.sequences) {
      if (sequence.copyFrom) this.#layers.copyPrefix(sequence.id, sequence.copyFrom.id, sequence.copyFrom.length);
    }
    for (const id of message.released) {
      this.#layers.release(id);
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
      // Proposals the last step did not keep: their keys and values go.
      if (sequence.rewind) this.#layers.truncate(sequence.id, sequence.past);
      const known = this.#layers.length(sequence.id);
      if (sequence.past !== known) {
        throw new InvalidArgumentError(`step ${message.step}: sequence ${sequence.id} says ${sequence.past} tokens came before, this shard has read ${known}`, 'ERR_SEQUENCE_STATE');
      }
      if (sequence.past + sequence.count > config.maxPositions) {
        throw new InvalidArgumentError(`sequence ${sequence.id} would reach ${sequence.past + sequence.count} tokens, past the model's ${config.maxPositions} positions`, 'ERR_SEQUENCE_TOO_LONG');
      }
      total += sequence.count;
    }
    const input = stage.embeds ? this.#embed(message, total) : message.hidden;
    const inputElements = input instanceof Float32Array ? input.length : input instanceof Tensor ? input.numel : undefined;
    if (inputElements !== total * hiddenSize) {
      throw new InvalidArgumentError(`step ${message.step}: stage ${stage.index} needs hidden states of ${total} × ${hiddenSize}, got ${inputElements ?? 'none'}`);
    }
    for (const sequence of message.sequences) this.#layers.reserve(sequence.id, sequence.past + sequence.count);
    const keepOnDevice = !stage.hasHead && this.spec.hiddenOnDevice === true;
    const output = await this.#layers.run(input!, message.sequences, this.#adapterRows(message.sequences), keepOnDevice);
    const penalized = message.sequences.some((sequence) => needsHistory(sequence.sampling));
    if (!stage.hasHead) {
      return {
        step: message.step,
        sequences: message.sequences,
        released: message.released,
        hidden: output,
        ...adapterOps,
        ...(message.logits ? { logits: true } : {}),
        ...(penalized && message.tokens ? { tokens: message.tokens } : {}),
      };
    }
    if (penalized) this.#recordInputs(message, total);
    // The last stage always brings its hidden states back: the head's rows, pooling and scoring start from them.
    const hidden = output as Float32Array;
    const all = message.logits ? new Float32Array(message.sequences.length * config.vocabSize) : undefined;
    const logprobs = message.sequences.some((sequence) => sequence.logprobs) ? new Float32Array(message.sequences.length).fill(NaN) : undefined;
    const embeddings = message.sequences.some((sequence) => sequence.pooling) ? this.#pool(hidden, message.sequences) : undefined;
    const scored = await this.#promptLogprobs(hidden, message.sequences);
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
      ...(scored ? { promptLogprobs: scored.logprobs, ...(scored.top ? { promptTopTokens: scored.top.tokens, promptTopLogprobs: scored.top.logprobs } : {}) } : {}),
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

  #norm(out: Float32Array, x: Float32Array, weights: NormWeights, rows: number): void {
    if (weights.beta) layerNorm(out, x, weights.gamma, weights.beta, rows, this.config.hiddenSize, this.config.layerNormEpsilon);
    else rmsNorm(out, x, weights.gamma, rows, this.config.hiddenSize, this.config.layerNormEpsilon);
  }

  /** The rows of each adapter the step's sequences use (a sequence's rows are contiguous, so each list ascends). */
  #adapterRows(sequences: StepSequence[]): AdapterRows[] {
    const byAdapter = new Map<number, AdapterRows>();
    let row = 0;
    for (const sequence of sequences) {
      if (sequence.adapter !== undefined) {
        let group = byAdapter.get(sequence.adapter);
        if (!group) {
          if (!this.#layers.hasAdapter(sequence.adapter)) throw new InvalidArgumentError(`sequence ${sequence.id} uses adapter ${sequence.adapter}, which this rank has not loaded`, 'ERR_ADAPTER');
          byAdapter.set(sequence.adapter, (group = { adapter: sequence.adapter, rows: [] }));
        }
        for (let index = 0; index < sequence.count; index++) group.rows.push(row + index);
      }
      row += sequence.count;
    }
    return [...byAdapter.values()];
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
   * Log-probabilities of the prompt's next tokens at the positions that ask, and where asked the
   * k most likely tokens there. The head runs over those rows; each rank reduces its slice of the
   * vocabulary to a few numbers per row (its largest logit, the sum of exponentials below it, the
   * target's logit if the slice holds it, and its own k largest logits with their ids), so the
   * ranks exchange those rather than whole rows of logits: the true k most likely are among the
   * ranks' k each.
   */
  async #promptLogprobs(hidden: Float32Array, sequences: StepSequence[]): Promise<{ logprobs: Float32Array; top?: { k: number; tokens: Int32Array; logprobs: Float32Array } } | undefined> {
    if (!sequences.some((sequence) => sequence.targets)) return undefined;
    const { config } = this;
    const { plan } = this.spec;
    const size = config.hiddenSize;
    const rows: number[] = [];
    const targets: number[] = [];
    const places: number[] = [];
    const wanted: number[] = [];
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
            wanted.push(sequence.targetsTop ?? 0);
          }
        }
        place += sequence.count;
      }
      row += sequence.count;
    }
    const k = Math.max(0, ...sequences.map((sequence) => (sequence.targets ? (sequence.targetsTop ?? 0) : 0)));
    const out = new Float32Array(place).fill(NaN);
    const top = k > 0 ? { k, tokens: new Int32Array(place * k).fill(-1), logprobs: new Float32Array(place * k).fill(NaN) } : undefined;
    if (rows.length === 0) return { logprobs: out, ...(top ? { top } : {}) };
    const normed = new Float32Array(rows.length * size);
    rows.forEach((source, index) => normed.set(hidden.subarray(source * size, (source + 1) * size), index * size));
    this.#norm(normed, normed, this.#weights.finalNorm!, rows.length);
    const slice = plan.vocabularyPerRank;
    const first = this.spec.rank * slice;
    const valid = Math.max(0, Math.min(slice, config.vocabSize - first));
    const local = this.#headMatmul(normed, rows.length);
    // Per row: maximum, sum of exponentials, target's logit, then k (id, logit) pairs (ids below 2^24 are exact in f32).
    const stride = 3 + 2 * k;
    const stats = new Float32Array(rows.length * stride);
    const largest = new Int32Array(k);
    for (let index = 0; index < rows.length; index++) {
      const logits = local.subarray(index * slice, index * slice + valid);
      let maximum = -Infinity;
      for (const value of logits) if (value > maximum) maximum = value;
      let sum = 0;
      for (const value of logits) sum += Math.exp(value - maximum);
      const target = targets[index] - first;
      const at = index * stride;
      stats.set([maximum, sum, target >= 0 && target < valid ? logits[target] : -Infinity], at);
      const kept = wanted[index] > 0 ? keepLargest(logits, wanted[index], largest) : 0;
      for (let rank = 0; rank < k; rank++) {
        stats[at + 3 + 2 * rank] = rank < kept ? first + largest[rank] : -1;
        stats[at + 4 + 2 * rank] = rank < kept ? logits[largest[rank]] : -Infinity;
      }
    }
    let gathered = stats;
    if (plan.tensorParallel > 1) {
      gathered = new Float32Array(plan.tensorParallel * stats.length);
      await this.#allgather(stats, gathered);
    }
    const candidates = k > 0 ? new Float32Array(plan.tensorParallel * k) : undefined;
    const candidateIds = k > 0 ? new Int32Array(plan.tensorParallel * k) : undefined;
    const best = new Int32Array(k);
    for (let index = 0; index < rows.length; index++) {
      let maximum = -Infinity;
      let target = -Infinity;
      for (let rank = 0; rank < plan.tensorParallel; rank++) {
        const at = (rank * rows.length + index) * stride;
        maximum = Math.max(maximum, gathered[at]);
        target = Math.max(target, gathered[at + 2]);
      }
      let sum = 0;
      for (let rank = 0; rank < plan.tensorParallel; rank++) {
        const at = (rank * rows.length + index) * stride;
        if (gathered[at + 1] > 0) sum += gathered[at + 1] * Math.exp(gathered[at] - maximum);
      }
      const normalizer = maximum + Math.log(sum);
      out[places[index]] = target - normalizer;
      if (!top || wanted[index] === 0) continue;
      // Rank by rank (each rank's slice a higher range of ids): a tie keeps the lower id first, as one rank would.
      for (let rank = 0; rank < plan.tensorParallel; rank++) {
        const at = (rank * rows.length + index) * stride;
        for (let slot = 0; slot < k; slot++) {
          candidateIds![rank * k + slot] = gathered[at + 3 + 2 * slot];
          candidates![rank * k + slot] = gathered[at + 4 + 2 * slot];
        }
      }
      const kept = keepLargest(candidates!, wanted[index], best, candidateIds);
      for (let rank = 0; rank < kept; rank++) {
        top.tokens[places[index] * k + rank] = candidateIds![best[rank]];
        top.logprobs[places[index] * k + rank] = candidates![best[rank]] - normalizer;
      }
    }
    return { logprobs: out, ...(top ? { top } : {}) };
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
    if (this.#layers.hasHead) return this.#layers.headLogits(normed, rows);
    const out = new Float32Array(rows * this.spec.plan.vocabularyPerRank);
    linear(out, normed, this.#head(), null, rows, this.config.hiddenSize, this.spec.plan.vocabularyPerRank);
    return out;
  }

  /** Host arrays gathered over the stage's ranks, through the device when the group is NCCL's. */
  async #allgather(local: Float32Array, gathered: Float32Array): Promise<void> {
    const communicator = this.#communicator!;
    if (communicator.tensorDevice !== 'cpu') await this.#layers.allgatherHost(local, gathered);
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
    this.#layers.clearCaches();
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
  if (requested !== 'f32' && requested !== 'bf16' && requested !== 'f16' && requested !== 'fp8') {
    throw new InvalidArgumentError(`kvCacheDtype must be 'auto', 'f32', 'bf16', 'f16' or 'fp8', got ${JSON.stringify(requested)}`);
  }
  return requested;
}

/**
 * The indices of the `k` largest of `values` (largest first) written into `into`; returns how many
 * (fewer where `values` is shorter, or where `ids` marks entries as padding). One pass keeping
 * the best k in order (learned: k passes over the vocabulary, skipping those taken through a
 * Set, cost a step of 16 sequences asking for 8 each about 30 ms). A value goes in below those at
 * least as large, so ties keep the earlier index first; with `ids`, an entry whose id is -1 is
 * padding and never taken.
 */
function keepLargest(values: Float32Array, k: number, into: Int32Array, ids?: Int32Array): number {
  const count = Math.min(k, values.length);
  let kept = 0;
  for (let index = 0; index < values.length; index++) {
    const value = values[index];
    if (ids && ids[index] < 0) continue;
    if (kept === count && !(value > values[into[count - 1]])) continue;
    let at = kept < count ? kept++ : count - 1;
    while (at > 0 && values[into[at - 1]] < value) {
      into[at] = into[at - 1];
      at--;
    }
    into[at] = index;
  }
  return kept;
}

/** The `k` most likely tokens (most likely first) and their log-probabilities, written into `tokens` and `values`. */
function mostLikely(logits: Float32Array, k: number, tokens: Int32Array, values: Float32Array): void {
  let maximum = -Infinity;
  for (const value of logits) if (value > maximum) maximum = value;
  let sum = 0;
  for (const value of logits) sum += Math.exp(value - maximum);
  const normalizer = maximum + Math.log(sum);
  const kept = keepLargest(logits, k, tokens);
  for (let rank = 0; rank < kept; rank++) values[rank] = logits[tokens[rank]] - normalizer;
}

/** log softmax(logits)[token], the sum in double with the maximum taken out. */
function logProbability(logits: Float32Array, token: number): number {
  let maximum = -Infinity;
  for (let index = 0; index < logits.length; index++) if (logits[index] > maximum) maximum = logits[index];
  let sum = 0;
  for (let index = 0; index < logits.length; index++) sum += Math.exp(logits[index] - maximum);
  return logits[token] - maximum - Math.log(sum);
}

/** Bytes of every array in `weights`, each counted once (a tied head is the embedding itself). */
function bytesOf(weights: unknown): number {
  const arrays = new Set<ArrayBufferView>();
  const collect = (value: unknown): void => {
    if (ArrayBuffer.isView(value)) arrays.add(value);
    else if (Array.isArray(value)) value.forEach(collect);
    else if (typeof value === 'object' && value !== null) Object.values(value).forEach(collect);
  };
  collect(weights);
  return [...arrays].reduce((sum, array) => sum + array.byteLength, 0);
}
