/**
 * A model replica: tensorParallel × pipelineParallel ShardWorker actors, a collective group per
 * stage, and a compiled graph through the stages. generate() feeds it by continuous batching:
 * each step carries every running sequence's next token and as much of waiting prompts as the
 * step's budget allows, so new requests join between steps instead of waiting for a batch to end;
 * with pipeline parallelism, up to `stepsInFlight` steps (each with its own sequences) fill the
 * stages at once.
 */
import { readFileSync } from 'node:fs';
import { totalmem } from 'node:os';
import { join } from 'node:path';
import { InvalidArgumentError, ModelLoadError, TrellisError } from '../errors.js';
import { get, kill, placementGroup, removePlacementGroup } from '../core/api.js';
import type { PlacementGroup } from '../core/placement-group.js';
import { actorHandleInfo, type ActorHandle } from '../core/registry.js';
import { currentRuntime, hasRuntime } from '../core/runtime-context.js';
import { newObjectId } from '../store/object-id.js';
import { createCollectiveGroup, type CollectiveGroup } from '../gpu/collective.js';
import { InputNode, MultiOutputNode, type DAGNode } from '../dag/nodes.js';
import type { CompiledGraph } from '../dag/compiled-graph.js';
import { localCheckpoint } from './model-source.js';
import type { FileSystem } from '../data/filesystem/file-system.js';
import { checkDecoderConfig, checkpointDirectory, readCheckpointConfig, readEndOfSequenceTokens, type DecoderConfig, type ResolvedDecoderConfig } from './config.js';
import { planSharding, type ParallelismOptions, type ShardingPlan } from './plan.js';
import { Checkpoint } from './safetensors.js';
import { PrefixCache } from './prefix-cache.js';
import { checkSampling, needsHistory, type SamplingParameters } from './sampling.js';
import { resolveCacheDType, type StepMessage, type StepResult, type StepSequence } from './shard.js';
import type { CacheDType, WeightDType } from './kernels.js';
import { checkCheckpoint, languageHead, resolveWeightDType } from './weights.js';
import { RemoteShardWorker, type ShardLoaded, type ShardWorker } from './shard-worker.js';
import { CacheBlocks } from './cache-blocks.js';
import { CACHE_BLOCK_POSITIONS, ELEMENT_BYTES } from './device-kernels.js';
import { TokenMask } from './guided/token-mask.js';
import { readAdapter, type AdapterInfo } from './lora.js';
import { checkSpeculation, proposeTokens, type Speculation, type SpeculationOptions } from './speculation.js';
import { beamSearch, checkBeamSearch, type BeamSearchRequest, type BeamSearchResult } from './beam-search.js';

export interface ModelReplicaOptions extends ParallelismOptions {
  /** A .safetensors file, a directory with model.safetensors or model.safetensors.index.json, or that index. */
  checkpoint: string;
  /**
   * The filesystem of a checkpoint URL (`s3://...`; default: the scheme's, from the environment).
   * Each host copies the checkpoint's directory once into its model cache and loads from there.
   */
  filesystem?: FileSystem;
  /** The decoder's shape; default: the config.json beside the checkpoint. */
  config?: DecoderConfig;
  /**
   * CPUs each rank's actor asks for (default 1). Made inside an actor, a replica's ranks ask for
   * none: that actor is expected to hold tensorParallel × pipelineParallel × numCpusPerRank.
   */
  numCpusPerRank?: number;
  /**
   * Where the ranks run their layers (default 'cpu': the CPU kernels). 'cuda': each rank takes a
   * GPU (a bundle { CPU: numCpusPerRank, GPU: 1 } from the driver; made inside an actor, one of
   * that actor's GPUs each), holds its layers, head and key/value caches in device memory and
   * runs them with CUDA kernels and cuBLAS; a stage's ranks sum over NCCL. Embedding lookups,
   * sampling and constraints stay on the host.
   */
  device?: 'cpu' | 'cuda';
  /**
   * On device 'cuda': the share of each GPU's memory the replica may use (default 0.9, as vLLM's
   * gpu_memory_utilization). What the weights and a full step's activations leave of it sets the
   * default maxCacheTokens, from the rank with the least room.
   */
  gpuMemoryUtilization?: number;
  /**
   * Threads each rank's matmuls and attention use (default: numCpusPerRank, at least 1). Results
   * do not depend on it: every output is computed by one thread in one order.
   */
  threadsPerRank?: number;
  /** Most sequences in one step (default 64). */
  maxSequencesPerStep?: number;
  /** Most tokens read in one step; longer prompts are read over several steps (default 2048). */
  maxTokensPerStep?: number;
  /** Steps in the pipeline at once (default: pipelineParallel). */
  stepsInFlight?: number;
  /**
   * Tokens that end a generation when a request names none (default: the checkpoint's
   * eos_token_id, from generation_config.json or config.json; [] for none).
   */
  stopTokens?: number[];
  /**
   * How the ranks keep their matrices (default 'auto': as the checkpoint stores them when that is
   * bf16 or f16, else f32). 16-bit matrices give exactly the results of their f32 widening, in
   * half the memory and, for decoding, which streams every weight each step, in less time. 'bf16'
   * or 'f16' also narrows an f32 checkpoint's matrices (rounding them), and 'f32' widens a 16-bit
   * one. 'int8' quantizes each matrix per output row (a quarter of f32's memory; an approximation,
   * unlike the others). Norms, biases and positions stay f32.
   */
  weightDtype?: WeightDType | 'auto';
  /**
   * How the ranks keep each sequence's keys and values (default 'auto': as the weights are, so a
   * bf16 checkpoint's cache is bf16, half the memory of f32, as vLLM's 'auto' does); 'fp8' keeps
   * them in 8-bit e4m3fn floats (a quarter of f32, so four times the sequences in one budget, at
   * 3 bits of mantissa). Entries are rounded once, as they enter the cache.
   */
  kvCacheDtype?: CacheDType | 'auto';
  /**
   * Prompts that begin with the same tokens (a system prompt, few-shot examples) read that
   * beginning once: a new sequence starts from (shares the cache blocks of) another's cached
   * positions, found in whole blocks of prefixBlockTokens and followed token by token past them
   * (a prompt that extends an earlier prompt and its answer reads only what is new), and prompts
   * that arrive together wait a step for the first of them to read it (default true). Sequences
   * with repetition, presence or frequency penalties read their whole prompt.
   */
  prefixCaching?: boolean;
  /** Tokens a block of prefix has (default 16). */
  prefixBlockTokens?: number;
  /**
   * Positions the ranks' key/value caches may hold, all sequences together. A sequence starts
   * when what it knows fits and grows a token at a time; when they outgrow the cache, kept
   * prefixes go first, then the latest running sequences are preempted (dropped, to read again
   * later with the same result). Sequences with penalties and embeddings reserve their most up
   * front. Default: what a quarter of this host's memory holds.
   */
  maxCacheTokens?: number;
  /**
   * How a sequence reserves cache positions: 'grow' (default) what it knows, a token at a time,
   * preempting the latest sequences when the cache is full; 'most' its prompt plus maxNewTokens
   * when it starts, so none is ever preempted (fewer run at once; nothing is read twice).
   */
  cacheReservation?: 'grow' | 'most';
  /**
   * Cached positions of finished sequences kept for later prompts to start from, all together
   * (default 4096; 0 keeps none: prefixes are then shared by sequences running at once only).
   * Each costs numLayers × 2 × numKeyValueHeads × headSize × 4 bytes, cut across the ranks.
   */
  prefixCacheTokens?: number;
  /**
   * LoRA adapters (PEFT directories: adapter_config.json and adapter_model.safetensors) by the
   * name requests give (`adapter`); more can be added with `addAdapter`. Each step's sequences
   * may each use a different one, or none, over the same base weights.
   */
  adapters?: Record<string, string>;
  /**
   * Adapters the ranks hold at once (default 8, vLLM's max_loras): a sequence whose adapter is not
   * loaded waits until one that no running sequence uses can make way.
   */
  maxLoadedAdapters?: number;
  /**
   * Speculative decoding (vLLM's speculative_config): a decoding sequence proposes its next few
   * tokens and one step checks them all; the kept ones are exactly what plain steps would have
   * picked (greedy or seeded sampling), so the text is unchanged and takes fewer steps.
   * Proposals come from n-gram lookup (`{ method: 'ngram', tokens: 4 }`: the tokens that
   * followed the sequence's last few earlier in its text) or from a draft model (`{ method:
   * 'draft', checkpoint, tokens: 4 }`: a smaller checkpoint of the same vocabulary, one rank of
   * its own, drafts greedily while the model steps other sequences). Constrained (guided)
   * sequences speculate within their constraint; sequences with penalties, logprobs or
   * minNewTokens still to go decode plainly. Default: off.
   */
  speculation?: SpeculationOptions;
}

export interface GenerateRequest {
  /** The prompt's token ids. */
  tokens: ArrayLike<number>;
  /** Tokens to generate at most (default 16). */
  maxNewTokens?: number;
  /** The LoRA adapter (a name given to `adapters` or `addAdapter`) this generation runs with; none: the base model. */
  adapter?: string;
  /**
   * Tokens to generate at least (default 0; vLLM's min_tokens): until then the stop tokens cannot
   * be picked and `stop` is not asked.
   */
  minNewTokens?: number;
  /** Generation ends after any of these tokens, kept in the output (default: the replica's stopTokens). */
  stopTokens?: number[];
  /**
   * Called after each generated token with all of them so far; true ends the generation with
   * finishReason 'stop' (how the processor stops at text: stop strings). It runs in this process.
   */
  stop?: (generated: readonly number[]) => boolean;
  /**
   * Constrained decoding: given the tokens generated so far, the ids the next one may be (a list,
   * or a TokenMask of the vocabulary's size, as a TokenGuide's constraint gives), or null when the
   * generation is complete (finishReason 'stop'). Called before the first token and after each
   * one, in this process; the choice among the allowed ids is the sampling's.
   */
  constraint?: (generated: readonly number[]) => readonly number[] | TokenMask | null;
  sampling?: SamplingParameters;
  /** Return each generated token's log-probability under the model (log-softmax of its logits). */
  logprobs?: boolean;
  /** Return, for each generated token, the k most likely tokens there and their log-probabilities (vLLM's logprobs=k; 1 to 20). */
  topLogprobs?: number;
  /**
   * Return each prompt token's log-probability given the tokens before it (vLLM's
   * prompt_logprobs; for scoring and perplexity). The prompt is then read whole, never copied
   * from a cached prefix.
   */
  promptLogprobs?: boolean;
  /**
   * With promptLogprobs (which this implies): the k most likely tokens at each prompt position
   * too, 1 to 20 (vLLM's prompt_logprobs=k; an evaluation harness asks whether each prompt token
   * was the model's greedy pick).
   */
  promptTopLogprobs?: number;
  /**
   * Its place in the queue (vLLM's priority scheduling): lower goes first, 0 by default, arrival
   * order within one value. Where the cache is full, a running sequence of a higher value is
   * preempted (read again later, the same tokens following) to admit a waiting one of a lower:
   * live users' requests at 0 overtake a batch job's at 10 sharing the replica.
   */
  priority?: number;
}

export interface Generation {
  /** The generated tokens, without the prompt. */
  tokens: number[];
  finishReason: 'length' | 'stop' | 'max-positions';
  promptTokens: number;
  /** When asked: each generated token's log-probability, before penalties, temperature and filters (as vLLM reports it). */
  logprobs?: number[];
  /** When asked: the log-probability of prompt tokens 1 to n-1, each given those before it. */
  promptLogprobs?: number[];
  /** When asked: for prompt tokens 1 to n-1, as promptLogprobs, the k most likely tokens at that place (most likely first). */
  promptTopLogprobs?: Array<Array<{ token: number; logprob: number }>>;
  /** When asked: per generated token, the k most likely tokens there (most likely first) and their log-probabilities. */
  topLogprobs?: Array<Array<{ token: number; logprob: number }>>;
}

/** One token of a streamed generation (see ModelReplica.stream). */
export interface GeneratedToken {
  token: number;
  /** Its place among the generated tokens (0 for the first). */
  index: number;
  /** With `logprobs: true`: its log-probability, as Generation.logprobs has it. */
  logprob?: number;
  /** With `topLogprobs: k`: the k most likely tokens at its place, as Generation.topLogprobs has them. */
  topLogprobs?: Array<{ token: number; logprob: number }>;
  /** On the last token only: why the generation ended. */
  finishReason?: Generation['finishReason'];
  /** On the first token only, when asked: the prompt's, as Generation has them (the prompt is read by then). */
  promptLogprobs?: number[];
  promptTopLogprobs?: Array<Array<{ token: number; logprob: number }>>;
}

export interface EmbedRequest {
  /** The text's token ids. */
  tokens: ArrayLike<number>;
  /**
   * 'last' (default): the final norm of the last position, as decoder embedding models (e5-mistral,
   * Qwen3-Embedding) read it; 'mean': the mean over all positions.
   */
  pooling?: 'last' | 'mean';
  /** Scale the vector to length 1 (default true), for cosine similarity by dot product. */
  normalize?: boolean;
  /** The LoRA adapter to read the text with (a registered name); none: the base model. */
  adapter?: string;
}

export interface Embedding {
  /** hiddenSize values. */
  vector: Float32Array;
  promptTokens: number;
}

export interface ClassifyRequest {
  /** The text's token ids. */
  tokens: ArrayLike<number>;
  /** The LoRA adapter to read the text with (a registered name); none: the base model. */
  adapter?: string;
}

export interface Classification {
  /** The most probable label's name (config.json's id2label, else LABEL_<index>). */
  label: string;
  /** Per label, in the head's order: softmax over the labels, or each label's sigmoid for a multi-label head. */
  probabilities: Float32Array;
  /** The head's raw scores. */
  logits: Float32Array;
  promptTokens: number;
}

/** A sequence classification head (score.weight of *ForSequenceClassification checkpoints) over the last position's final norm. */
interface ClassificationHead {
  weights: Float32Array;
  labels: string[];
  multiLabel: boolean;
}

export interface ReplicaStats {
  steps: number;
  promptTokens: number;
  generatedTokens: number;
  /** Sequences waiting for their first step, and those between steps or in one. */
  waiting: number;
  running: number;
  /** The most sequences that ran at once since the replica started (how far the cache budget let it batch). */
  peakRunning: number;
  weightBytes: number;
  /** Prompt positions copied from a cached prefix instead of read (of promptTokens). */
  reusedPromptTokens: number;
  /** Finished sequences whose caches are kept as prefix sources. */
  retainedSequences: number;
  /** Positions reserved by running sequences and held by kept prefixes. */
  reservedCacheTokens: number;
  maxCacheTokens: number;
  /** Sequences whose caches were dropped to make room, to be read again later (vLLM's recompute preemption). */
  preemptions: number;
  /** Speculative decoding: tokens proposed, and those kept (each kept one saved a step). */
  draftTokens: number;
  acceptedDraftTokens: number;
}

interface Sequence {
  id: number;
  /** Lower goes first (GenerateRequest.priority); ties by id, the order of arrival. */
  priority: number;
  prompt: Int32Array;
  /** Its LoRA adapter's id; the name keeps prefix caching within one adapter's caches. */
  adapter?: number;
  namespace?: string;
  generated: number[];
  maxNewTokens: number;
  minNewTokens: number;
  stopTokens: Set<number>;
  stop: ((generated: readonly number[]) => boolean) | undefined;
  constraint?: (generated: readonly number[]) => readonly number[] | TokenMask | null;
  /** The ids the constraint allows for the next token: a list, or a mask of the vocabulary. */
  allowed?: Int32Array | TokenMask;
  sampling: SamplingParameters | undefined;
  logprobs: number[] | undefined;
  /** Prompt scoring: the log-probability of prompt token i + 1 at index i, filled as the prompt is read. */
  promptLogprobs?: number[];
  /** How many most likely tokens to report per prompt position, and those (index i: before prompt token i + 1). */
  promptTop?: { k: number; list: Array<Array<{ token: number; logprob: number }>> };
  /** How many most likely tokens to report per generated token, and those reported so far. */
  top?: { k: number; list: Array<Array<{ token: number; logprob: number }>> };
  /** An embedding request: pooled when its prompt is read, no token generated. */
  pooling?: 'last' | 'mean';
  /** Tokens the shards hold for it. */
  past: number;
  /** Cache positions counted for it in the replica's reservation (besides those it shares). */
  reserved: number;
  /**
   * Positions of whole cache blocks it shares with the sequence it started from (prefix caching),
   * counted in that sequence's reservation, not in this one's, while that one holds them.
   */
  sharedPositions?: number;
  /** The sequence whose blocks it shares. */
  sharedFrom?: number;
  /** Its prompt was read once (a preempted sequence reads it again, uncounted). */
  promptCounted?: boolean;
  /** Its first step starts from another sequence's cached positions (sharing their blocks). */
  copyFrom?: { id: number; length: number };
  inFlight: boolean;
  /** Positions the ranks hold past `past`: proposals the last step did not keep, dropped by the next. */
  stale?: number;
  /** What it proposed in the step it is in (speculative decoding). */
  proposal?: Proposal;
  /**
   * Speculation's back-off: proposals missed in a row, and decoding steps to wait before the next
   * (a text that does not repeat itself stops paying for proposals, 2, 4, 8, then 16 steps apart).
   */
  proposalMisses?: number;
  proposalPause?: number;
  /** Speculation by a draft model: its draft is being made (the sequence waits for it), or is made for the sequence at this length. */
  drafting?: boolean;
  drafted?: { at: number; tokens: number[] };
  /** The draft model refused this sequence's text: it decodes plainly. */
  undraftable?: boolean;
  finish: (generation: Generation, embedding?: Float32Array) => void;
  fail: (error: Error) => void;
  /** A streamed generation's token taken in (see stream()): its log-probability, and why it ended if it did. */
  onToken?: (token: number, logprob: number | undefined, finishReason: Generation['finishReason'] | undefined) => void;
  /** Its stream's reader let go: it ends at its next token. */
  abandoned?: boolean;
}

/** How much one step may carry, and how many steps run at once. */
/** Tokens a sequence proposes for one step, and with a constraint what it allows after each proposed position but the last (masks) and after the last. */
interface Proposal {
  tokens: number[];
  masks?: Uint32Array[];
  allowed?: Int32Array | TokenMask;
}

interface StepLimits {
  maxSequences: number;
  maxTokens: number;
  stepsInFlight: number;
  /** Prefix caching's block and budget, or undefined when it is off. */
  prefix: { blockTokens: number; retainedTokens: number } | undefined;
  /** Positions all caches together may hold. */
  maxCacheTokens: number;
  /** Every sequence reserves its most when it starts (cacheReservation 'most'). */
  reserveMost: boolean;
  speculation: Speculation | undefined;
}

/** score.weight and the labels config.json names (id2label; LABEL_<i> where it names none). */
async function readClassificationHead(checkpoint: Checkpoint, path: string): Promise<ClassificationHead> {
  const weights = await checkpoint.readFloat32('score.weight');
  const count = checkpoint.info('score.weight').shape[0];
  let settings: Record<string, unknown> = {};
  try {
    settings = JSON.parse(readFileSync(join(checkpointDirectory(path), 'config.json'), 'utf8')) as Record<string, unknown>;
  } catch {
    // No config.json beside it (a config given directly): generic labels.
  }
  const names = (settings.id2label ?? {}) as Record<string, unknown>;
  const labels = Array.from({ length: count }, (_, index) => (typeof names[String(index)] === 'string' ? (names[String(index)] as string) : `LABEL_${index}`));
  return { weights, labels, multiLabel: settings.problem_type === 'multi_label_classification' };
}

function positiveInteger(value: unknown, what: string, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1) throw new InvalidArgumentError(`${what} must be a positive integer, got ${String(value)}`);
  return value;
}

export class ModelReplica {
  readonly config: ResolvedDecoderConfig;
  readonly plan: ShardingPlan;
  /** How the ranks keep their matrices ('auto' resolved). */
  readonly weightDtype: WeightDType;
  /** How the ranks keep their key/value caches ('auto' resolved). */
  readonly kvCacheDtype: CacheDType;
  readonly #workers: Array<Array<ActorHandle<ShardWorker>>>;
  readonly #groups: CollectiveGroup[];
  readonly #graph: CompiledGraph;
  readonly #placement: PlacementGroup | undefined;
  readonly #maxSequences: number;
  readonly #maxTokens: number;
  readonly #stepsInFlight: number;
  readonly #prefixCache: PrefixCache<Sequence> | undefined;
  readonly #maxCacheTokens: number;
  /**
   * Positions reserved by the sequences running: what each holds and will read next (its prompt
   * and the tokens it generated so far), growing a token at a time; a sequence whose sampling
   * needs its history on the last stage (penalties), or an embedding, reserves its most at once,
   * since dropping its cache would drop that state too.
   */
  #reservedTokens = 0;
  /** The most sequences that ran at once, since the replica started. */
  #peakRunning = 0;
  /** Per sequence id: the running sequences sharing its cache blocks (prefix caching). */
  readonly #sharers = new Map<number, Set<Sequence>>();
  #preemptions = 0;
  #draftTokens = 0;
  #acceptedDraftTokens = 0;
  readonly #speculation: Speculation | undefined;
  /** Speculation by a draft model: its replica, until it fails (then sequences decode plainly). */
  #draft: ModelReplica | undefined;
  readonly #reserveMost: boolean;
  readonly #weightBytes: number;
  readonly #stopTokens: number[];
  readonly #waiting: Sequence[] = [];
  readonly #running: Sequence[] = [];
  #released: number[] = [];
  #inFlight = 0;
  /** A #pumpSoon() is due. */
  #pumpScheduled = false;
  #nextSequence = 0;
  #steps = 0;
  #promptTokens = 0;
  #generatedTokens = 0;
  #broken: Error | undefined;
  #closed: Promise<void> | undefined;
  /** LoRA adapters by name, checked against the model; and the ids the ranks hold, least recently used first. */
  readonly #adapters = new Map<string, { id: number; info: AdapterInfo }>();
  readonly #loadedAdapters = new Set<number>();
  readonly #maxLoadedAdapters: number;
  #nextAdapter = 0;
  readonly #classifier: ClassificationHead | undefined;
  /** Whether the checkpoint can pick tokens (an lm_head, or tied embeddings); without one it embeds and classifies only. */
  readonly hasLanguageHead: boolean;

  private constructor(parts: {
    config: ResolvedDecoderConfig;
    plan: ShardingPlan;
    workers: Array<Array<ActorHandle<ShardWorker>>>;
    groups: CollectiveGroup[];
    graph: CompiledGraph;
    placement: PlacementGroup | undefined;
    weightBytes: number;
    weightDtype: WeightDType;
    kvCacheDtype: CacheDType;
    stopTokens: number[];
    limits: StepLimits;
    maxLoadedAdapters: number;
    hasLanguageHead: boolean;
    classifier: ClassificationHead | undefined;
    draft: ModelReplica | undefined;
  }) {
    this.config = parts.config;
    this.plan = parts.plan;
    this.weightDtype = parts.weightDtype;
    this.kvCacheDtype = parts.kvCacheDtype;
    this.#workers = parts.workers;
    this.#groups = parts.groups;
    this.#graph = parts.graph;
    this.#placement = parts.placement;
    this.#weightBytes = parts.weightBytes;
    this.#maxSequences = parts.limits.maxSequences;
    this.#maxTokens = parts.limits.maxTokens;
    this.#stepsInFlight = parts.limits.stepsInFlight;
    const prefix = parts.limits.prefix;
    // Kept prefixes count the whole blocks the ranks hold for them, as running sequences do.
    this.#prefixCache = prefix ? new PrefixCache<Sequence>(prefix.blockTokens, prefix.retainedTokens, (sequence) => wholeBlocks(sequence.past)) : undefined;
    this.#maxCacheTokens = parts.limits.maxCacheTokens;
    this.#reserveMost = parts.limits.reserveMost;
    this.#speculation = parts.limits.speculation;
    this.#draft = parts.draft;
    this.#stopTokens = parts.stopTokens;
    this.#maxLoadedAdapters = parts.maxLoadedAdapters;
    this.hasLanguageHead = parts.hasLanguageHead;
    this.#classifier = parts.classifier;
  }

  /**
   * Registers a LoRA adapter under `name`, after checking its files against the model (throws
   * ModelLoadError 'ERR_ADAPTER' naming what does not fit). The ranks load it when a request
   * first uses it. A name already given the same path is kept; another path is refused.
   */
  async addAdapter(name: string, path: string): Promise<void> {
    if (typeof name !== 'string' || name.length === 0) throw new InvalidArgumentError(`an adapter's name must be a non-empty string, got ${JSON.stringify(name)}`, 'ERR_ADAPTER');
    const known = this.#adapters.get(name);
    if (known) {
      if (known.info.path === path) return;
      throw new InvalidArgumentError(`adapter '${name}' is already ${known.info.path}, not ${path}`, 'ERR_ADAPTER');
    }
    this.#register(name, await readAdapter(path, this.config));
  }

  #register(name: string, info: AdapterInfo): void {
    if (!this.#adapters.has(name)) this.#adapters.set(name, { id: this.#nextAdapter++, info });
  }

  /** The names of the registered adapters. */
  get adapters(): string[] {
    return [...this.#adapters.keys()];
  }

  /** The tokens that end a generation by default. */
  get stopTokens(): readonly number[] {
    return this.#stopTokens;
  }

  /** Starts the ranks, loads their weights and compiles the graph through them. */
  static async create(options: ModelReplicaOptions): Promise<ModelReplica> {
    if (typeof options !== 'object' || options === null || typeof options.checkpoint !== 'string') {
      throw new InvalidArgumentError('a model replica needs options with a checkpoint path');
    }
    // A checkpoint on object storage is read from this host's copy; the ranks make (or share) theirs.
    const checkpointPath = await localCheckpoint(options.checkpoint, { ...(options.filesystem ? { filesystem: options.filesystem } : {}) });
    const config = options.config ? checkDecoderConfig(options.config) : readCheckpointConfig(checkpointPath);
    if (!config) {
      throw new ModelLoadError('ERR_MODEL_CONFIG', `no config.json beside the checkpoint ${options.checkpoint}: pass the decoder's config`, { file: options.checkpoint });
    }
    const plan = planSharding(config, options);
    const maxLoadedAdapters = positiveInteger(options.maxLoadedAdapters, 'maxLoadedAdapters', 8);
    if (options.adapters !== undefined && (typeof options.adapters !== 'object' || options.adapters === null || Object.entries(options.adapters).some(([name, path]) => name.length === 0 || typeof path !== 'string'))) {
      throw new InvalidArgumentError('adapters must map non-empty names to adapter directories', 'ERR_ADAPTER');
    }
    const stopTokens = options.stopTokens ?? readEndOfSequenceTokens(checkpointPath);
    if (!Array.isArray(stopTokens) || stopTokens.some((token) => !Number.isInteger(token))) throw new InvalidArgumentError('stopTokens must be an array of token ids', 'ERR_PROMPT');
    const limits: StepLimits = {
      maxSequences: positiveInteger(options.maxSequencesPerStep, 'maxSequencesPerStep', 64),
      maxTokens: positiveInteger(options.maxTokensPerStep, 'maxTokensPerStep', 2048),
      stepsInFlight: positiveInteger(options.stepsInFlight, 'stepsInFlight', plan.pipelineParallel),
      prefix: undefined,
      maxCacheTokens: 0,
      reserveMost: false,
      speculation: options.speculation === undefined ? undefined : checkSpeculation(options.speculation),
    };
    if (options.cacheReservation !== undefined && options.cacheReservation !== 'grow' && options.cacheReservation !== 'most') {
      throw new InvalidArgumentError(`cacheReservation must be 'grow' or 'most', got ${JSON.stringify(options.cacheReservation)}`);
    }
    limits.reserveMost = options.cacheReservation === 'most';
    if (options.prefixCaching !== undefined && typeof options.prefixCaching !== 'boolean') throw new InvalidArgumentError(`prefixCaching must be a boolean, got ${String(options.prefixCaching)}`);
    if (options.prefixCaching !== false) {
      const retainedTokens = options.prefixCacheTokens ?? 4096;
      if (typeof retainedTokens !== 'number' || !Number.isInteger(retainedTokens) || retainedTokens < 0) throw new InvalidArgumentError(`prefixCacheTokens must be an integer >= 0, got ${String(retainedTokens)}`);
      limits.prefix = { blockTokens: positiveInteger(options.prefixBlockTokens, 'prefixBlockTokens', 16), retainedTokens };
    }
    const numCpus = options.numCpusPerRank ?? 1;
    if (typeof numCpus !== 'number' || !(numCpus >= 0)) throw new InvalidArgumentError(`numCpusPerRank must be a number >= 0, got ${String(numCpus)}`);
    const device = options.device ?? 'cpu';
    if (device !== 'cpu' && device !== 'cuda') throw new InvalidArgumentError(`device must be 'cpu' or 'cuda', got ${JSON.stringify(options.device)}`);
    const threads = positiveInteger(options.threadsPerRank, 'threadsPerRank', Math.max(1, Math.floor(numCpus)));
    // Fail here, in the caller, on a checkpoint that cannot be used, rather than in every rank.
    let weightDtype: WeightDType;
    let hasLanguageHead: boolean;
    let classifier: ClassificationHead | undefined;
    // Adapters are checked against the model before any rank starts: a bad one costs no start-up.
    const adapters: Array<[string, AdapterInfo]> = [];
    for (const [name, path] of Object.entries(options.adapters ?? {})) adapters.push([name, await readAdapter(path, config)]);
    {
      await using checkpoint = await Checkpoint.open(checkpointPath);
      checkCheckpoint(checkpoint, config);
      weightDtype = resolveWeightDType(checkpoint, config, options.weightDtype);
      hasLanguageHead = languageHead(checkpoint, config) !== 'none';
      if (checkpoint.has('score.weight')) classifier = await readClassificationHead(checkpoint, checkpointPath);
    }
    const kvCacheDtype = resolveCacheDType(options.kvCacheDtype, weightDtype);
    // One position of every layer's keys and values, over all ranks together.
    const bytesPerPosition = config.numLayers * 2 * config.numKeyValueHeads * config.headSize * ELEMENT_BYTES[kvCacheDtype];
    limits.maxCacheTokens = positiveInteger(options.maxCacheTokens, 'maxCacheTokens', Math.max(config.maxPositions, Math.floor((0.25 * totalmem()) / bytesPerPosition)));
    const utilization = options.gpuMemoryUtilization ?? 0.9;
    if (typeof utilization !== 'number' || !(utilization > 0 && utilization <= 1)) throw new InvalidArgumentError(`gpuMemoryUtilization must be a number in (0, 1], got ${String(options.gpuMemoryUtilization)}`);

    const speculation = limits.speculation;
    if (speculation?.method === 'draft') {
      const draftConfig = readCheckpointConfig(await localCheckpoint(speculation.checkpoint, { ...(options.filesystem ? { filesystem: options.filesystem } : {}) }));
      // A draft may lack the padding rows a model's vocabulary has; ids past the model's would mean nothing to it.
      if (draftConfig && draftConfig.vocabSize > config.vocabSize) {
        throw new InvalidArgumentError(`speculation: the draft model's vocabulary has ${draftConfig.vocabSize} tokens, more than the model's ${config.vocabSize}: a draft must share the model's tokenizer`, 'ERR_SPECULATION');
      }
    }
    const ranks = plan.tensorParallel * plan.pipelineParallel;
    const id = newObjectId().slice(0, 12);
    // The ranks' resources are reserved all together, so that two replicas starting at once cannot
    // each take part of the cluster and wait for the rest forever: from the driver by a placement
    // group; inside an actor (a processor's engine) by that actor, which asked for all of them,
    // and whose node the ranks then share.
    const context = currentRuntime().context();
    const gpus = device === 'cuda' ? 1 : 0;
    // A draft model's rank takes a bundle of its model's group (lent), so that the two are
    // reserved at once: a draft holding the GPU its model then waits for would wait forever.
    const lent = lentPlacements.get(options);
    const draftOptions: ModelReplicaOptions | undefined = speculation?.method === 'draft'
      ? {
        checkpoint: speculation.checkpoint,
        ...(options.filesystem ? { filesystem: options.filesystem } : {}),
        device: speculation.device ?? device,
        numCpusPerRank: speculation.numCpusPerRank ?? numCpus,
        prefixCacheTokens: speculation.prefixCacheTokens,
        ...(speculation.weightDtype !== undefined ? { weightDtype: speculation.weightDtype } : {}),
        maxSequencesPerStep: limits.maxSequences,
        stopTokens: [],
      }
      : undefined;
    const draftBundle = draftOptions && (draftOptions.numCpusPerRank! > 0 || draftOptions.device === 'cuda') ? { CPU: draftOptions.numCpusPerRank!, ...(draftOptions.device === 'cuda' ? { GPU: 1 } : {}) } : undefined;
    const bundles = Array.from({ length: ranks }, () => ({ CPU: numCpus, ...(gpus ? { GPU: gpus } : {}) }));
    // From the driver, on its own host: the replica's compiled graph is made there.
    const placement = lent?.group ?? (context.isDriver && (numCpus > 0 || gpus > 0) ? placementGroup(draftBundle ? [...bundles, draftBundle] : bundles, 'PACK', { driverHost: true }) : undefined);
    const firstBundle = lent?.bundleIndex ?? 0;
    // Inside an actor, the ranks run on that actor's GPUs, one each.
    if (device === 'cuda' && !context.isDriver && context.gpuIds.length < ranks) {
      throw new InvalidArgumentError(`a replica made inside an actor runs its ${ranks} ranks on that actor's GPUs: it holds ${context.gpuIds.length}`, 'ERR_RESOURCES');
    }
    const workers: Array<Array<ActorHandle<ShardWorker>>> = [];
    const groups: CollectiveGroup[] = [];
    let draft: ModelReplica | undefined;
    try {
      await placement?.ready();
      // The draft first: a checkpoint that cannot draft costs the model's ranks no start-up.
      if (draftOptions) {
        if (placement && !lent && draftBundle) lentPlacements.set(draftOptions, { group: placement, bundleIndex: ranks });
        draft = await ModelReplica.create(draftOptions);
      }
      for (const stage of plan.stages) {
        workers.push(Array.from({ length: plan.tensorParallel }, (_, rank) => RemoteShardWorker.options(placement
          ? { numCpus, numGpus: gpus, schedulingStrategy: { type: 'placement-group', placementGroup: placement, bundleIndex: firstBundle + stage.index * plan.tensorParallel + rank } }
          : { numCpus: context.isDriver ? numCpus : 0, schedulingStrategy: { type: 'node', nodeId: context.nodeId } }).remote()));
      }
      if (device === 'cuda' && !context.isDriver) {
        // Before anything in a rank touches CUDA, which reads the visible devices once.
        await get(workers.flat().map((worker, index) => worker.useGpu.remote(context.gpuIds[index])));
      }
      const groupNames: Array<string | undefined> = [];
      for (const stage of plan.stages) {
        if (plan.tensorParallel === 1) {
          groupNames.push(undefined);
          continue;
        }
        const name = `llm-${id}-stage-${stage.index}`;
        groups.push(await createCollectiveGroup(workers[stage.index], { backend: device === 'cuda' ? 'nccl' : 'cpu', name }));
        groupNames.push(name);
      }
      const step = { tokens: limits.maxTokens, sequences: limits.maxSequences };
      const loaded = (await get(plan.stages.flatMap((stage) => workers[stage.index].map((worker, rank) =>
        worker.load.remote({ checkpoint: options.checkpoint, ...(options.filesystem ? { filesystem: options.filesystem } : {}), config, plan, stage: stage.index, rank, weightDtype, kvCacheDtype, ...(device === 'cuda' ? { layers: 'cuda' as const, hiddenOnDevice: true } : {}) }, groupNames[stage.index], threads, step))))) as ShardLoaded[];
      if (options.maxCacheTokens === undefined && loaded.some((part) => part.device)) limits.maxCacheTokens = deviceCacheBudget(loaded, utilization);
      if (device === 'cuda') {
        // As vLLM does, a GPU rank takes its cache's memory at start: a budget its GPU cannot hold
        // fails here, not in the middle of generating.
        const positions = wholeBlocks(limits.maxCacheTokens);
        try {
          await get(workers.flat().map((worker) => worker.reserveCache.remote(positions)));
        } catch (error) {
          const cause = error instanceof Error ? error.message : String(error);
          const mebibytes = Math.round((positions * Math.max(...loaded.map((part) => part.device?.bytesPerPosition ?? 0))) / 2 ** 20);
          throw new ModelLoadError('ERR_DEVICE_MEMORY', `the GPUs cannot hold a key/value cache of ${limits.maxCacheTokens} positions (up to ${mebibytes} MiB a rank): lower maxCacheTokens, or leave it to gpuMemoryUtilization (${cause})`, { cause: error });
        }
      }
      const input = new InputNode();
      // Rank r of each stage feeds rank r of the next: after the stage's allreduce every rank
      // holds the same hidden states, and each channel then has exactly one reader.
      let previous: DAGNode[] = workers[0].map((worker) => worker.forward.bind(input));
      for (const stage of plan.stages.slice(1)) {
        // Between GPU stages the hidden states stay on the GPUs: the edge carries CUDA IPC handles.
        if (device === 'cuda') for (const node of previous) node.withTensorTransport('ipc');
        previous = workers[stage.index].map((worker, rank) => worker.forward.bind(previous[rank]));
      }
      const graph = await new MultiOutputNode(previous).compile({ maxInflight: Math.max(2, limits.stepsInFlight + 1) });
      const replica = new ModelReplica({ config, plan, workers, groups, graph, placement: lent ? undefined : placement, weightBytes: loaded.reduce((sum, part) => sum + part.weightBytes, 0), weightDtype, kvCacheDtype, stopTokens, limits, maxLoadedAdapters, hasLanguageHead, classifier, draft });
      for (const [name, info] of adapters) replica.#register(name, info);
      return replica;
    } catch (error) {
      await Promise.allSettled(groups.map((group) => group.destroy()));
      for (const worker of workers.flat()) kill(worker);
      await draft?.close().catch(() => {});
      // A lent group is its lender's to remove.
      if (placement && !lent) removePlacementGroup(placement);
      throw error;
    }
  }

  /** Generates for every request; resolves in the requests' order once all are done. */
  generate(requests: GenerateRequest[]): Promise<Generation[]> {
    try {
      return Promise.all(this.#startGenerating(requests).map((started) => started.done));
    } catch (error) {
      return Promise.reject(error);
    }
  }

  /**
   * Beam search (see beam-search.ts): the request's beamWidth likeliest continuations, best
   * first. Its steps are one-token requests sharing the replica's steps with every other
   * request, each beam started by the prefix cache from all its parent's positions, so give
   * prefixCacheTokens room for the beams of the searches that run at once (about beamWidth x
   * their length each), or their steps read whole beams again (as they all do with
   * prefixCaching off).
   */
  async beamSearch(request: BeamSearchRequest): Promise<BeamSearchResult> {
    const what = 'beamSearch';
    const options = checkBeamSearch(request, what);
    const prompt = this.#checkPrompt(request, what, false);
    const maxNewTokens = positiveInteger(request.maxNewTokens, `${what}: maxNewTokens`, 16);
    const stopTokens = this.#stopTokensOf(request, what);
    this.#adapterOf(request.adapter, what);
    const adapter = request.adapter === undefined ? {} : { adapter: request.adapter };
    // Each step's requests generate one token (whichever: its stop tokens are none) for the top log-probabilities there.
    const read = async (prefixes: Int32Array[], count: number) => {
      const generations = await this.generate(prefixes.map((tokens) => ({ tokens, maxNewTokens: 1, stopTokens: [], topLogprobs: count, ...adapter })));
      return generations.map((generation) => generation.topLogprobs![0]);
    };
    return beamSearch(read, prompt, { ...options, maxNewTokens, stopTokens: new Set(stopTokens), maxPositions: this.config.maxPositions });
  }

  /**
   * Generates for one request, yielding each token as the step that made it ends (a chat reply
   * streamed as it is written); the last says why the generation ended. Continuous batching goes
   * on as for generate(): the request shares steps with every other. A reader that stops early
   * (break, return()) ends the sequence at its next token, or before it starts if it still waits,
   * and frees its cache. Hosted in an actor, an async generator method forwards it to callers in
   * other processes: `async *reply(request) { yield* this.replica.stream(request); }`.
   */
  async *stream(request: GenerateRequest): AsyncGenerator<GeneratedToken, void, undefined> {
    const tokens: GeneratedToken[] = [];
    let wake: (() => void) | undefined;
    let outcome: { error?: Error } | undefined;
    const [started] = this.#startGenerating([request], (token, logprob, finishReason) => {
      const { sequence } = started;
      const top = sequence.top?.list.at(-1);
      const index = sequence.generated.length - 1;
      const prompt = index === 0 ? { ...(sequence.promptLogprobs ? { promptLogprobs: sequence.promptLogprobs } : {}), ...(sequence.promptTop ? { promptTopLogprobs: sequence.promptTop.list } : {}) } : {};
      tokens.push({ token, index, ...(logprob !== undefined ? { logprob } : {}), ...(top ? { topLogprobs: top } : {}), ...(finishReason ? { finishReason } : {}), ...prompt });
      wake?.();
    });
    started.done.then(
      () => {
        outcome = {};
        wake?.();
      },
      (error: Error) => {
        outcome = { error };
        wake?.();
      },
    );
    try {
      for (;;) {
        const next = tokens.shift();
        if (next) {
          yield next;
          continue;
        }
        if (outcome?.error) throw outcome.error;
        if (outcome) return;
        await new Promise<void>((resolve) => {
          wake = resolve;
        });
        wake = undefined;
      }
    } finally {
      if (!outcome) this.#abandon(started.sequence);
    }
  }

  /** Checks and queues requests; each one's sequence and the promise of its generation. */
  #startGenerating(requests: GenerateRequest[], onToken?: Sequence['onToken']): Array<{ sequence: Sequence; done: Promise<Generation> }> {
    if (!Array.isArray(requests)) throw new InvalidArgumentError('generate() takes an array of requests');
    if (!this.hasLanguageHead) {
      throw new InvalidArgumentError('the checkpoint has no language-model head (no lm_head.weight, and its embeddings are not tied): it can embed and classify, not generate', 'ERR_NO_LM_HEAD');
    }
    if (this.#broken) throw this.#broken;
    if (this.#closed) throw new TrellisError('ERR_REPLICA_CLOSED', 'the model replica is closed');
    const checked = requests.map((request, index) => this.#checkRequest(request, index));
    const started = checked.map((fields) => {
      let sequence!: Sequence;
      const done = new Promise<Generation>((finish, fail) => {
        sequence = { ...fields, finish, fail, ...(onToken ? { onToken } : {}) };
        this.#enqueue(sequence);
      });
      return { sequence, done };
    });
    this.#pumpSoon();
    return started;
  }

  /**
   * A streamed generation's reader let go: one still waiting to start leaves the queue; one that
   * started ends at its next token (a step may be making it now).
   */
  #abandon(sequence: Sequence): void {
    const waiting = this.#waiting.indexOf(sequence);
    if (waiting >= 0 && !sequence.promptCounted && sequence.past === 0 && !sequence.inFlight) {
      this.#waiting.splice(waiting, 1);
      sequence.finish({ tokens: sequence.generated, finishReason: 'stop', promptTokens: sequence.prompt.length });
      return;
    }
    sequence.abandoned = true;
  }

  /**
   * Embeds each request's tokens: the final norm of its last position, or the mean over all, once
   * its prompt is read (nothing is generated). Runs alongside generation, sharing its steps.
   */
  /** The labels of the checkpoint's classification head, in order, or undefined when it has none. */
  get labels(): readonly string[] | undefined {
    return this.#classifier?.labels;
  }

  /**
   * Classifies each text with the checkpoint's sequence classification head (score.weight, as
   * Hugging Face's *ForSequenceClassification saves it): the head's scores of the last position's
   * final norm, and their softmax (a multi-label head's sigmoids). Throws InvalidArgumentError
   * ('ERR_NO_CLASSIFIER') for a checkpoint without one.
   */
  async classify(requests: ClassifyRequest[]): Promise<Classification[]> {
    const head = this.#classifier;
    if (!head) throw new InvalidArgumentError('the checkpoint has no classification head (score.weight): it cannot classify', 'ERR_NO_CLASSIFIER');
    if (!Array.isArray(requests)) throw new InvalidArgumentError('classify() takes an array of requests');
    const embeddings = await this.embed(requests.map((request) => ({ ...request, pooling: 'last', normalize: false })));
    const size = this.config.hiddenSize;
    const count = head.labels.length;
    return embeddings.map(({ vector, promptTokens }) => {
      const logits = new Float32Array(count);
      for (let label = 0; label < count; label++) {
        let sum = 0;
        for (let index = 0; index < size; index++) sum += head.weights[label * size + index] * vector[index];
        logits[label] = sum;
      }
      let probabilities: Float32Array;
      if (head.multiLabel) probabilities = logits.map((value) => 1 / (1 + Math.exp(-value)));
      else {
        const maximum = Math.max(...logits);
        const exps = Array.from(logits, (value) => Math.exp(value - maximum));
        const total = exps.reduce((a, b) => a + b, 0);
        probabilities = Float32Array.from(exps, (value) => value / total);
      }
      const best = probabilities.indexOf(Math.max(...probabilities));
      return { label: head.labels[best], probabilities, logits, promptTokens };
    });
  }

  embed(requests: EmbedRequest[]): Promise<Embedding[]> {
    if (!Array.isArray(requests)) return Promise.reject(new InvalidArgumentError('embed() takes an array of requests'));
    if (this.#broken) return Promise.reject(this.#broken);
    if (this.#closed) return Promise.reject(new TrellisError('ERR_REPLICA_CLOSED', 'the model replica is closed'));
    let sequences: Array<{ sequence: Omit<Sequence, 'finish' | 'fail'>; normalize: boolean }>;
    try {
      sequences = requests.map((request, index) => {
        const what = `request ${index}`;
        const prompt = this.#checkPrompt(request, what, true);
        const { pooling = 'last', normalize = true } = request;
        if (pooling !== 'last' && pooling !== 'mean') throw new InvalidArgumentError(`${what}: pooling must be 'last' or 'mean', got ${JSON.stringify(pooling)}`, 'ERR_PROMPT');
        if (typeof normalize !== 'boolean') throw new InvalidArgumentError(`${what}: normalize must be a boolean`, 'ERR_PROMPT');
        const sequence = { id: this.#nextSequence++, priority: 0, prompt, generated: [], maxNewTokens: 0, minNewTokens: 0, stopTokens: new Set<number>(), stop: undefined, sampling: undefined, logprobs: undefined, pooling, past: 0, reserved: 0, inFlight: false, ...this.#adapterOf(request.adapter, what) };
        return { sequence, normalize };
      });
    } catch (error) {
      return Promise.reject(error);
    }
    const done = sequences.map(({ sequence, normalize }) => new Promise<Embedding>((resolve, fail) => {
      const finish = (generation: Generation, vector?: Float32Array) => {
        if (normalize) {
          let squares = 0;
          for (const value of vector!) squares += value * value;
          const scale = squares > 0 ? 1 / Math.sqrt(squares) : 1;
          for (let index = 0; index < vector!.length; index++) vector![index] *= scale;
        }
        resolve({ vector: vector!, promptTokens: generation.promptTokens });
      };
      this.#enqueue({ ...sequence, finish, fail });
    }));
    this.#pumpSoon();
    return Promise.all(done);
  }

  /**
   * Steps once this turn of the event loop is over: requests made in the same turn (callers that
   * each answer a finished step with new requests, as beam searches do) share one step instead of
   * the first of them taking a step alone.
   */
  #pumpSoon(): void {
    if (this.#pumpScheduled) return;
    this.#pumpScheduled = true;
    setImmediate(() => {
      this.#pumpScheduled = false;
      this.#pump(true);
    });
  }

  /** A request's adapter, by its registered name. */
  #adapterOf(name: string | undefined, what: string): { adapter?: number; namespace?: string } {
    if (name === undefined || name === null) return {};
    const entry = typeof name === 'string' ? this.#adapters.get(name) : undefined;
    if (!entry) {
      const known = [...this.#adapters.keys()];
      throw new InvalidArgumentError(`${what}: no adapter named ${JSON.stringify(name)} (${known.length > 0 ? `known: ${known.join(', ')}` : 'none registered: give the replica adapters, or call addAdapter'})`, 'ERR_ADAPTER');
    }
    return { adapter: entry.id, namespace: name };
  }

  /**
   * Whether the ranks hold (or this step will load) the sequence's adapter. A new one takes a free
   * slot, else the least recently used adapter no running sequence uses; with none, it waits.
   */
  #adapterReady(sequence: Sequence, loads: Array<{ id: number; info: AdapterInfo }>, unloads: number[]): boolean {
    const id = sequence.adapter;
    if (id === undefined) return true;
    if (this.#loadedAdapters.has(id)) {
      this.#loadedAdapters.delete(id);
      this.#loadedAdapters.add(id);
      return true;
    }
    if (this.#loadedAdapters.size >= this.#maxLoadedAdapters) {
      const inUse = new Set(this.#running.map((running) => running.adapter));
      const idle = [...this.#loadedAdapters].find((loaded) => !inUse.has(loaded));
      if (idle === undefined) return false;
      this.#loadedAdapters.delete(idle);
      unloads.push(idle);
    }
    this.#loadedAdapters.add(id);
    loads.push({ id, info: [...this.#adapters.values()].find((entry) => entry.id === id)!.info });
    return true;
  }

  /** A constraint's answer checked: undefined when complete (null), else the ids, each in the vocabulary. */
  #allowedTokens(answer: readonly number[] | TokenMask | null, what: string): Int32Array | TokenMask | undefined {
    if (answer === null) return undefined;
    if (answer instanceof TokenMask) {
      // A tokenizer's vocabulary may be smaller than the model's (padded) one: ids past the mask are not allowed.
      if (answer.size > this.config.vocabSize) throw new InvalidArgumentError(`${what}: the constraint's mask covers ${answer.size} tokens, more than the vocabulary's ${this.config.vocabSize}`, 'ERR_CONSTRAINT');
      return answer;
    }
    if (!(Array.isArray(answer) || ArrayBuffer.isView(answer)) || answer.length === 0) throw new InvalidArgumentError(`${what}: a constraint must give a non-empty list of token ids, or null when complete`, 'ERR_CONSTRAINT');
    for (const token of answer) {
      if (!Number.isInteger(token) || token < 0 || token >= this.config.vocabSize) throw new InvalidArgumentError(`${what}: the constraint allows token ${String(token)}, outside the vocabulary of ${this.config.vocabSize}`, 'ERR_CONSTRAINT');
    }
    return Int32Array.from(answer);
  }

  /** The request's prompt, checked: token ids in the vocabulary, and room left for what it needs. */
  #checkPrompt(request: { tokens: ArrayLike<number> } | null | undefined, what: string, embedding: boolean): Int32Array {
    if (typeof request !== 'object' || request === null || request.tokens === undefined) throw new InvalidArgumentError(`${what}: needs tokens`, 'ERR_PROMPT');
    const prompt = Int32Array.from(request.tokens as ArrayLike<number>);
    if (prompt.length === 0) throw new InvalidArgumentError(`${what}: the prompt is empty`, 'ERR_PROMPT');
    // A generation needs room for one token more; an embedding reads the prompt only.
    if (embedding ? prompt.length > this.config.maxPositions : prompt.length >= this.config.maxPositions) {
      throw new InvalidArgumentError(`${what}: the prompt's ${prompt.length} tokens ${embedding ? 'exceed' : 'leave no room in'} the model's ${this.config.maxPositions} positions`, 'ERR_PROMPT_TOO_LONG');
    }
    for (let position = 0; position < prompt.length; position++) {
      const token = (request.tokens as ArrayLike<number>)[position];
      if (!Number.isInteger(token) || token < 0 || token >= this.config.vocabSize) {
        throw new InvalidArgumentError(`${what}: token ${String(token)} at position ${position} is outside the vocabulary of ${this.config.vocabSize}`, 'ERR_TOKEN');
      }
    }
    return prompt;
  }

  /** A request's stop tokens (the replica's where it names none), checked. */
  #stopTokensOf(request: { stopTokens?: number[] }, what: string): number[] {
    const stopTokens = request.stopTokens ?? this.#stopTokens;
    if (!Array.isArray(stopTokens) || stopTokens.some((token) => !Number.isInteger(token))) throw new InvalidArgumentError(`${what}: stopTokens must be an array of token ids`, 'ERR_PROMPT');
    return stopTokens;
  }

  #checkRequest(request: GenerateRequest, index: number): Omit<Sequence, 'finish' | 'fail'> {
    const what = `request ${index}`;
    const prompt = this.#checkPrompt(request, what, false);
    const stopTokens = this.#stopTokensOf(request, what);
    if (request.stop !== undefined && typeof request.stop !== 'function') throw new InvalidArgumentError(`${what}: stop must be a function of the generated tokens`, 'ERR_PROMPT');
    if (request.logprobs !== undefined && typeof request.logprobs !== 'boolean') throw new InvalidArgumentError(`${what}: logprobs must be a boolean`, 'ERR_PROMPT');
    if (request.promptLogprobs !== undefined && typeof request.promptLogprobs !== 'boolean') throw new InvalidArgumentError(`${what}: promptLogprobs must be a boolean`, 'ERR_PROMPT');
    const topK = request.topLogprobs;
    if (topK !== undefined && (typeof topK !== 'number' || !Number.isInteger(topK) || topK < 1 || topK > 20)) {
      throw new InvalidArgumentError(`${what}: topLogprobs must be an integer from 1 to 20, got ${String(topK)}`, 'ERR_PROMPT');
    }
    const promptTopK = request.promptTopLogprobs;
    if (promptTopK !== undefined && (typeof promptTopK !== 'number' || !Number.isInteger(promptTopK) || promptTopK < 1 || promptTopK > 20)) {
      throw new InvalidArgumentError(`${what}: promptTopLogprobs must be an integer from 1 to 20, got ${String(promptTopK)}`, 'ERR_PROMPT');
    }
    if (promptTopK !== undefined && request.promptLogprobs === false) throw new InvalidArgumentError(`${what}: promptTopLogprobs asks for prompt logprobs, but promptLogprobs is false`, 'ERR_PROMPT');
    let allowed: Int32Array | TokenMask | undefined;
    if (request.constraint !== undefined) {
      if (typeof request.constraint !== 'function') throw new InvalidArgumentError(`${what}: constraint must be a function of the generated tokens`, 'ERR_CONSTRAINT');
      allowed = this.#allowedTokens(request.constraint([]), what);
      if (!allowed) throw new InvalidArgumentError(`${what}: the constraint is complete before any token`, 'ERR_CONSTRAINT');
    }
    const maxNewTokens = positiveInteger(request.maxNewTokens, `${what}: maxNewTokens`, 16);
    const priority = request.priority ?? 0;
    if (typeof priority !== 'number' || !Number.isInteger(priority)) throw new InvalidArgumentError(`${what}: priority must be an integer (lower goes first), got ${String(request.priority)}`, 'ERR_PROMPT');
    const minNewTokens = request.minNewTokens ?? 0;
    if (typeof minNewTokens !== 'number' || !Number.isInteger(minNewTokens) || minNewTokens < 0 || minNewTokens > maxNewTokens) {
      throw new InvalidArgumentError(`${what}: minNewTokens must be an integer from 0 to maxNewTokens (${maxNewTokens}), got ${String(request.minNewTokens)}`, 'ERR_PROMPT');
    }
    return {
      ...(request.constraint ? { constraint: request.constraint, allowed } : {}),
      ...this.#adapterOf(request.adapter, what),
      id: this.#nextSequence++,
      priority,
      prompt,
      generated: [],
      maxNewTokens,
      minNewTokens,
      stopTokens: new Set(stopTokens),
      stop: request.stop,
      sampling: checkSampling(request.sampling, what),
      logprobs: request.logprobs ? [] : undefined,
      ...(request.promptLogprobs || promptTopK ? { promptLogprobs: new Array<number>(Math.max(0, prompt.length - 1)).fill(NaN) } : {}),
      ...(promptTopK ? { promptTop: { k: promptTopK, list: Array.from({ length: Math.max(0, prompt.length - 1) }, () => []) } } : {}),
      ...(topK ? { top: { k: topK, list: [] } } : {}),
      past: 0,
      reserved: 0,
      inFlight: false,
    };
  }

  /** Starts steps while the pipeline has room and some sequence can take part. */
  #pump(flushReleases = false): void {
    while (!this.#broken && this.#inFlight < this.#stepsInFlight) {
      const chosen: Sequence[] = [];
      const parts: StepSequence[] = [];
      const tokens: number[] = [];
      let budget = this.#maxTokens;
      // With several steps in flight, each takes its share of the sequences, so that the
      // pipeline's stages work on different steps at once instead of waiting on one big one.
      const share = Math.ceil((this.#running.length + this.#waiting.length) / this.#stepsInFlight);
      const limit = Math.min(this.#maxSequences, Math.max(1, share));
      // Running sequences first (one token each), then prompts, as far as the budget goes.
      const admit = (sequence: Sequence) => {
        const known = sequence.prompt.length + sequence.generated.length;
        const count = Math.min(known - sequence.past, budget);
        if (count <= 0 || chosen.length >= limit) return false;
        for (let position = sequence.past; position < sequence.past + count; position++) {
          tokens.push(position < sequence.prompt.length ? sequence.prompt[position] : sequence.generated[position - sequence.prompt.length]);
        }
        budget -= count;
        // Decoding its next token: proposals ride along, checked in the same step.
        const proposal = count === 1 && sequence.past === known - 1 ? this.#proposal(sequence, budget) : undefined;
        const draft = proposal?.tokens ?? [];
        if (proposal) {
          tokens.push(...draft);
          budget -= draft.length;
          this.#draftTokens += draft.length;
          sequence.proposal = proposal;
        }
        chosen.push(sequence);
        // Reading part of what it knows (its prompt, or after a preemption its generated tokens too) picks no token.
        const prefill = sequence.past + count < known;
        parts.push({
          id: sequence.id,
          past: sequence.past,
          count: count + draft.length,
          ...(draft.length > 0 ? { draft: draft.length } : {}),
          ...(sequence.stale ? { rewind: true } : {}),
          ...(sequence.sampling ? { sampling: sequence.sampling } : {}),
          ...(prefill ? { prefill } : {}),
          ...(sequence.logprobs && !prefill ? { logprobs: true } : {}),
          ...(sequence.top && !prefill ? { topLogprobs: sequence.top.k } : {}),
          ...(sequence.copyFrom ? { copyFrom: sequence.copyFrom } : {}),
          ...(sequence.pooling ? { pooling: sequence.pooling } : {}),
          ...(sequence.adapter !== undefined ? { adapter: sequence.adapter } : {}),
          ...this.#allowedPart(proposal?.masks ? proposal.allowed : sequence.allowed, prefill),
          ...(proposal?.masks ? { draftMasks: proposal.masks } : {}),
          ...(!prefill && sequence.generated.length < sequence.minNewTokens && sequence.stopTokens.size > 0 ? { banned: Int32Array.from(sequence.stopTokens) } : {}),
          ...(sequence.promptLogprobs && sequence.past < sequence.prompt.length - 1 ? { targets: this.#targetsOf(sequence, count), ...(sequence.promptTop ? { targetsTop: sequence.promptTop.k } : {}) } : {}),
        });
        sequence.copyFrom = undefined;
        sequence.stale = 0;
        sequence.inFlight = true;
        return true;
      };
      this.#fitRunning();
      // A waiting sequence that goes before running ones (a lower priority value) and does not fit
      // takes their room now, before they are put in this step (once in a step, none can be preempted).
      const head = this.#waiting[0];
      if (head && this.#running.some((sequence) => sequence.priority > head.priority && !sequence.inFlight)) {
        const room = this.#reservationOf(head);
        if (!this.#makeRoom(room)) this.#makeRoomByPriority(head, room);
      }
      for (const sequence of this.#running) {
        if (sequence.inFlight || sequence.drafting) continue;
        // Speculation by a draft model: a decoding sequence waits for its draft, while others step.
        if (this.#startsDraft(sequence)) continue;
        admit(sequence);
      }
      const deferred: Sequence[] = [];
      const loadAdapters: Array<{ id: number; info: AdapterInfo }> = [];
      const unloadAdapters: number[] = [];
      while (this.#waiting.length > 0 && budget > 0 && chosen.length < limit && deferred.length < 4 * limit) {
        const sequence = this.#waiting[0];
        const need = this.#cacheNeed(sequence);
        if (wholeBlocks(need) > this.#maxCacheTokens) {
          this.#waiting.shift();
          sequence.fail(new InvalidArgumentError(`a sequence of ${sequence.prompt.length} prompt tokens and up to ${sequence.maxNewTokens} new ones needs ${need} cached positions, more than maxCacheTokens (${this.#maxCacheTokens})`, 'ERR_CACHE_BUDGET'));
          continue;
        }
        // Waits, in order, for an adapter slot, then for running sequences to end (a load decided here goes with this step regardless).
        if (!this.#adapterReady(sequence, loadAdapters, unloadAdapters)) break;
        // Penalties need every prompt token on the last stage, and a mean every position's state.
        const mayReuse = !needsHistory(sequence.sampling) && sequence.pooling !== 'mean' && !sequence.promptLogprobs;
        // The whole blocks of a prefix it would start from are its source's to count.
        const found = this.#prefixCache?.peek(sequence, mayReuse);
        const source = found?.kind === 'match' ? found.match.source : undefined;
        const room = this.#reservationOf(sequence, found?.kind === 'match' ? sharedPart(found.match.length) : 0);
        if (!this.#makeRoom(room, source?.id) && !this.#makeRoomByPriority(sequence, room, source?.id)) break;
        this.#waiting.shift();
        const prefix = this.#prefixCache?.admit(sequence, mayReuse);
        if (prefix?.kind === 'wait') {
          // A sequence already running is reading this prompt's beginning: start from its copy once it has.
          deferred.push(sequence);
          continue;
        }
        if (prefix?.kind === 'match') {
          sequence.past = prefix.match.length;
          sequence.copyFrom = { id: prefix.match.source.id, length: prefix.match.length };
          this.#share(sequence, prefix.match.source.id, sharedPart(prefix.match.length));
        }
        const reserve = this.#reservationOf(sequence);
        sequence.reserved = reserve;
        this.#reservedTokens += reserve;
        this.#running.push(sequence);
        this.#peakRunning = Math.max(this.#peakRunning, this.#running.length);
        admit(sequence);
      }
      this.#waiting.unshift(...deferred);
      if (chosen.length === 0 && loadAdapters.length === 0 && unloadAdapters.length === 0) {
        if (this.#released.length === 0) return;
        // Releases alone (finished sequences, dropped prefixes) ride with the next step if requests
        // come this turn, else go alone then. Learned: sent at once, they took the step that the
        // requests answering the finished ones needed, and beam searches took two steps a token.
        if (!flushReleases) return this.#pumpSoon();
      }
      const message: StepMessage = {
        step: this.#steps++,
        sequences: parts,
        released: this.#released,
        tokens: Int32Array.from(tokens),
        ...(loadAdapters.length > 0 ? { loadAdapters } : {}),
        ...(unloadAdapters.length > 0 ? { unloadAdapters } : {}),
      };
      this.#released = [];
      this.#inFlight++;
      let execution: PromiseLike<unknown>;
      try {
        execution = this.#graph.execute(message);
      } catch (error) {
        // The graph broke (an actor died) before this step's rejections reached the replica.
        this.#fail(error as Error);
        return;
      }
      execution.then(
        (outputs) => this.#finishStep(chosen, parts, (outputs as StepResult[])[0]),
        (error: unknown) => this.#fail(error as Error),
      );
    }
  }

  #finishStep(chosen: Sequence[], parts: StepSequence[], result: StepResult): void {
    this.#inFlight--;
    if (this.#broken) return; // its sequences were failed with the replica
    let scored = 0;
    let draftOffset = 0;
    // Prompt alternatives are [scored positions, width], width the largest k the step asked.
    const promptWidth = result.promptTopTokens && result.promptLogprobs ? result.promptTopTokens.length / result.promptLogprobs.length : 0;
    chosen.forEach((sequence, index) => {
      sequence.inFlight = false;
      const part = parts[index];
      if (part.targets) {
        for (let position = 0; position < part.count; position++) {
          const at = part.past + position;
          if (at >= sequence.prompt.length - 1) continue;
          sequence.promptLogprobs![at] = result.promptLogprobs![scored + position];
          if (sequence.promptTop) {
            const entries: Array<{ token: number; logprob: number }> = [];
            for (let rank = 0; rank < sequence.promptTop.k; rank++) {
              const candidate = result.promptTopTokens![(scored + position) * promptWidth + rank];
              if (candidate >= 0) entries.push({ token: candidate, logprob: result.promptTopLogprobs![(scored + position) * promptWidth + rank] });
            }
            sequence.promptTop.list[at] = entries;
          }
        }
        scored += part.count;
      }
      let produced: number[];
      if (part.draft) {
        // The proposal is kept up to the first position where the model picked otherwise; that pick follows it.
        const draft = sequence.proposal!.tokens;
        const picks = result.draftTokens!.subarray(draftOffset, draftOffset + draft.length);
        draftOffset += draft.length;
        let kept = 0;
        while (kept < draft.length && picks[kept] === draft[kept]) kept++;
        produced = [...draft.slice(0, kept), kept < draft.length ? picks[kept] : result.tokens[index]];
        this.#acceptedDraftTokens += kept;
        sequence.proposalMisses = kept === 0 ? (sequence.proposalMisses ?? 0) + 1 : 0;
        sequence.proposalPause = kept === 0 ? Math.min(16, 2 ** sequence.proposalMisses) : 0;
        sequence.past = part.past + 1 + kept;
        sequence.stale = draft.length - kept;
        sequence.proposal = undefined;
      } else {
        sequence.past += part.count;
        produced = [result.tokens[index]];
      }
      if (sequence.past < sequence.prompt.length + sequence.generated.length) return; // more to read first
      if (!sequence.promptCounted) {
        sequence.promptCounted = true;
        this.#promptTokens += sequence.prompt.length;
      }
      if (sequence.pooling) {
        const size = this.config.hiddenSize;
        this.#end(sequence);
        sequence.finish({ tokens: [], finishReason: 'length', promptTokens: sequence.prompt.length }, result.embeddings!.slice(index * size, (index + 1) * size));
        return;
      }
      for (const token of produced) if (this.#take(sequence, token, result, index, chosen.length)) break;
    });
    this.#pump();
  }

  /**
   * One generated token of a finished step taken in: kept, its logprobs noted, the stop rules and
   * the constraint asked; the sequence ends here or fails when they say so. Returns whether it
   * is done (a speculative step's later tokens are then dropped).
   */
  #take(sequence: Sequence, token: number, result: StepResult, index: number, stepSequences: number): boolean {
    sequence.generated.push(token);
    this.#grow(sequence);
    sequence.logprobs?.push(result.logprobs![index]);
    if (sequence.top) {
      const width = result.topTokens!.length / stepSequences;
      const entries: Array<{ token: number; logprob: number }> = [];
      for (let rank = 0; rank < sequence.top.k; rank++) {
        const candidate = result.topTokens![index * width + rank];
        if (candidate >= 0) entries.push({ token: candidate, logprob: result.topLogprobs![index * width + rank] });
      }
      sequence.top.list.push(entries);
    }
    this.#generatedTokens++;
    const total = sequence.prompt.length + sequence.generated.length;
    let reason: Generation['finishReason'] | undefined;
    try {
      let complete = false;
      if (sequence.constraint) {
        const allowed = this.#allowedTokens(sequence.constraint(sequence.generated), `sequence ${sequence.id}`);
        complete = allowed === undefined;
        sequence.allowed = allowed;
      }
      const mayStop = sequence.generated.length >= sequence.minNewTokens;
      reason = sequence.abandoned || complete || (mayStop && (sequence.stopTokens.has(token) || sequence.stop?.(sequence.generated))) ? 'stop' : sequence.generated.length >= sequence.maxNewTokens ? 'length' : total >= this.config.maxPositions ? 'max-positions' : undefined;
    } catch (error) {
      // A stop or constraint function that throws (or allows nothing valid) ends its own request with the error, not the replica.
      this.#end(sequence);
      sequence.fail(error as Error);
      return true;
    }
    sequence.onToken?.(token, sequence.logprobs?.[sequence.logprobs.length - 1], reason);
    if (reason) {
      this.#end(sequence);
      sequence.finish({
        tokens: sequence.generated,
        finishReason: reason,
        promptTokens: sequence.prompt.length,
        ...(sequence.logprobs ? { logprobs: sequence.logprobs } : {}),
        ...(sequence.promptLogprobs ? { promptLogprobs: sequence.promptLogprobs } : {}),
        ...(sequence.promptTop ? { promptTopLogprobs: sequence.promptTop.list } : {}),
        ...(sequence.top ? { topLogprobs: sequence.top.list } : {}),
      });
      return true;
    }
    return false;
  }

  /**
   * Tokens to propose for a sequence about to decode (speculative decoding), within the step's
   * token budget, its maxNewTokens and the model's positions, and the cache (the proposals' extra
   * positions are reserved for the step). None for sequences whose picks need more than logits,
   * a mask and a position: penalties, logprobs, stop tokens held back by minNewTokens.
   */
  #proposal(sequence: Sequence, budget: number): Proposal | undefined {
    const speculation = this.#speculation;
    if (!speculation || !this.#mayPropose(sequence)) return undefined;
    // A draft model's sequence paused (or not) when its draft was asked for (#startsDraft).
    if (speculation.method === 'ngram' && sequence.proposalPause) {
      sequence.proposalPause--;
      return undefined;
    }
    const known = sequence.prompt.length + sequence.generated.length;
    const limit = Math.min(budget, this.#proposalLimit(sequence));
    let tokens: number[];
    if (speculation.method === 'draft') {
      const drafted = sequence.drafted;
      sequence.drafted = undefined;
      // A draft made for another length (the sequence was preempted and read again since) is stale.
      tokens = drafted && drafted.at === known ? drafted.tokens.slice(0, Math.max(0, limit)) : [];
    } else {
      tokens = proposeTokens(sequence.prompt, sequence.generated, speculation, limit);
    }
    const proposal = tokens.length > 0 && sequence.constraint ? this.#constrainProposal(sequence, tokens) : { tokens };
    if (proposal.tokens.length === 0) return undefined;
    // Released by the step's end, where #grow sets the reservation to what the sequence then knows.
    const extra = Math.max(0, wholeBlocks(known + proposal.tokens.length) - (sequence.sharedPositions ?? 0) - sequence.reserved);
    if (!this.#makeRoom(extra)) return undefined;
    sequence.reserved += extra;
    this.#reservedTokens += extra;
    return proposal;
  }

  /** Whether a decoding sequence may take proposals: not where its picks need more than logits, a mask and a position (penalties, logprobs, stop tokens held back by minNewTokens). */
  #mayPropose(sequence: Sequence): boolean {
    if (this.#running.length > (this.#speculation?.disableByBatchSize ?? Infinity)) return false;
    return !sequence.logprobs && !sequence.top && !sequence.pooling && !needsHistory(sequence.sampling) && !this.#reservesMost(sequence) && sequence.generated.length >= sequence.minNewTokens;
  }

  /** The most tokens a sequence may propose: the last pick is generated too, so proposals stop one short of maxNewTokens and of the positions. */
  #proposalLimit(sequence: Sequence): number {
    const known = sequence.prompt.length + sequence.generated.length;
    return Math.min(sequence.maxNewTokens - sequence.generated.length - 1, this.config.maxPositions - known - 1);
  }

  /**
   * Speculation by a draft model: asks the draft replica for a decoding sequence's next tokens
   * (greedy, from its whole text: the draft's prefix cache holds its last draft, so it reads only
   * what was kept since) and returns true, the sequence then waiting for them; false where the
   * sequence steps now (no draft model, or it failed; a sequence that may not propose, is backing
   * off, or already holds its draft).
   */
  #startsDraft(sequence: Sequence): boolean {
    const draft = this.#draft;
    const speculation = this.#speculation;
    if (!draft || speculation?.method !== 'draft' || !this.#mayPropose(sequence)) return false;
    const known = sequence.prompt.length + sequence.generated.length;
    if (sequence.past !== known - 1 || sequence.drafted?.at === known || sequence.undraftable) return false;
    // The draft's positions may end before the model's: past them, the sequence decodes plainly.
    const limit = Math.min(speculation.tokens, this.#proposalLimit(sequence), draft.config.maxPositions - known - 1);
    if (limit < 1) return false;
    if (sequence.proposalPause) {
      sequence.proposalPause--;
      return false;
    }
    sequence.drafting = true;
    const text = [...sequence.prompt, ...sequence.generated];
    draft.generate([{ tokens: text, maxNewTokens: limit, stopTokens: [] }]).then(
      ([drafted]) => {
        sequence.drafting = false;
        // Ended meanwhile (stopped, failed, abandoned): the draft goes unused.
        if (this.#broken || !this.#running.includes(sequence)) return;
        sequence.drafted = { at: known, tokens: drafted.tokens };
        this.#pumpSoon();
      },
      (error: Error) => {
        sequence.drafting = false;
        if (error instanceof InvalidArgumentError) {
          // This text is not the draft's to read (a token past its vocabulary, say): this sequence decodes plainly.
          sequence.undraftable = true;
        } else if (this.#draft === draft) {
          // The draft model failed (a rank died, say): every sequence decodes plainly from here on.
          this.#draft = undefined;
          process.stderr.write(`trellis: speculative decoding's draft model failed, and decoding goes on without it: ${error.message}\n`);
          void draft.close().catch(() => {});
        }
        if (!this.#broken) this.#pumpSoon();
      },
    );
    return true;
  }

  /**
   * A constrained sequence's proposal, cut where its constraint would not allow a token (or calls
   * the text complete), with what the constraint allows after each kept position: the picks
   * there are drawn among those, as plain steps would draw them.
   */
  #constrainProposal(sequence: Sequence, draft: number[]): Proposal {
    const masks: Uint32Array[] = [];
    const text = [...sequence.generated];
    let allowed: Int32Array | TokenMask | undefined = sequence.allowed;
    let kept = 0;
    try {
      for (; kept < draft.length && allowed !== undefined; kept++) {
        const token = draft[kept];
        if (!(allowed instanceof TokenMask ? allowed.has(token) : allowed.includes(token))) break;
        masks.push(this.#asMask(allowed));
        text.push(token);
        allowed = this.#allowedTokens(sequence.constraint!(text), `sequence ${sequence.id}`);
      }
    } catch {
      // A constraint that throws on a proposal: propose no further (the plain step will ask it again).
    }
    // `allowed` is undefined when the kept proposal completes the text: the generation ends there, and the last pick is dropped.
    return { tokens: draft.slice(0, kept), masks, allowed };
  }

  /** A step part's constraint on its last position's pick. */
  #allowedPart(allowed: Int32Array | TokenMask | undefined, prefill: boolean): Pick<StepSequence, 'allowed' | 'allowedMask'> {
    if (!allowed || prefill) return {};
    return allowed instanceof TokenMask ? { allowedMask: allowed.words } : { allowed };
  }

  /** An allowed-token answer as a mask of the vocabulary, as the shards read per proposed position. */
  #asMask(allowed: Int32Array | TokenMask): Uint32Array {
    if (allowed instanceof TokenMask) return allowed.words;
    const mask = new TokenMask(this.config.vocabSize);
    for (const token of allowed) mask.add(token);
    return mask.words;
  }

  /** Positions a sequence's cache may reach: its prompt and its most new tokens, within the model's positions. */
  #cacheNeed(sequence: Sequence): number {
    return Math.min(this.config.maxPositions, sequence.prompt.length + sequence.maxNewTokens);
  }

  /** For the positions a step reads: the prompt token after each (-1 past the prompt's last). */
  #targetsOf(sequence: Sequence, count: number): Int32Array {
    const targets = new Int32Array(count);
    for (let index = 0; index < count; index++) {
      const next = sequence.past + index + 1;
      targets[index] = next < sequence.prompt.length ? sequence.prompt[next] : -1;
    }
    return targets;
  }

  /**
   * Positions a sequence reserves when it starts: its most, or (see #reservedTokens) what it knows;
   * in whole cache blocks, as the ranks hold them, less those it shares (`shared`: by default
   * what it shares now).
   */
  #reservationOf(sequence: Sequence, shared = sequence.sharedPositions ?? 0): number {
    const positions = this.#reservesMost(sequence) ? this.#cacheNeed(sequence) : Math.min(this.config.maxPositions, sequence.prompt.length + sequence.generated.length);
    return wholeBlocks(positions) - shared;
  }

  /** `sequence` holds the first `positions` of `source`'s blocks, which `source` counts. */
  #share(sequence: Sequence, source: number, positions: number): void {
    if (positions === 0) return;
    sequence.sharedPositions = positions;
    sequence.sharedFrom = source;
    let sharers = this.#sharers.get(source);
    if (!sharers) this.#sharers.set(source, (sharers = new Set()));
    sharers.add(sequence);
  }

  /** `sequence` no longer shares blocks: it drops its cache, or they became its own to count. */
  #unshare(sequence: Sequence): void {
    if (sequence.sharedFrom === undefined) return;
    const sharers = this.#sharers.get(sequence.sharedFrom);
    sharers?.delete(sequence);
    if (sharers?.size === 0) this.#sharers.delete(sequence.sharedFrom);
    sequence.sharedFrom = undefined;
    sequence.sharedPositions = 0;
  }

  /**
   * The ranks drop these sequences' caches (sent with the next step). Blocks a dropped sequence
   * shared with running ones stay with them: the one sharing the most counts them from now on
   * (every block another shares is among its), and the others share them from it.
   */
  #release(ids: readonly number[]): void {
    for (const id of ids) {
      this.#released.push(id);
      const sharers = [...(this.#sharers.get(id) ?? [])];
      if (sharers.length === 0) continue;
      const heir = sharers.reduce((most, sharer) => ((sharer.sharedPositions ?? 0) > (most.sharedPositions ?? 0) ? sharer : most));
      const positions = heir.sharedPositions ?? 0;
      heir.reserved += positions;
      this.#reservedTokens += positions;
      for (const sharer of sharers) {
        const kept = sharer.sharedPositions ?? 0;
        this.#unshare(sharer);
        if (sharer !== heir) this.#share(sharer, heir.id, kept);
      }
    }
  }

  /** Whether a sequence reserves its most up front (and is never preempted). */
  #reservesMost(sequence: Sequence): boolean {
    return this.#reserveMost || sequence.pooling !== undefined || needsHistory(sequence.sampling);
  }

  /** A sequence that reserves as it goes knows one more token: it will hold one more position. */
  #grow(sequence: Sequence): void {
    if (this.#reservesMost(sequence)) return;
    const reserve = this.#reservationOf(sequence);
    this.#reservedTokens += reserve - sequence.reserved;
    sequence.reserved = reserve;
  }

  /**
   * Room for the running sequences' next positions: kept prefixes go first, then running
   * sequences not in a step, the latest started first, are preempted: the ranks drop their
   * caches and they wait at the front of the queue to read what they know again (the same
   * positions, so the same tokens follow). With every other sequence in a step, the ones over
   * wait for those steps to end.
   */
  #fitRunning(): void {
    if (this.#makeRoom(0)) return;
    for (const sequence of this.#preemptible(Infinity)) {
      if (this.#reservedTokens <= this.#maxCacheTokens) break;
      this.#preempt(sequence);
    }
  }

  /**
   * Running sequences that may be preempted for one of priority `before` (those of a higher
   * value; Infinity: any), in the order they go: the highest value first, the latest started
   * within one. One in a step, or reserving its most, is never preempted.
   */
  #preemptible(before: number): Sequence[] {
    const order = new Map(this.#running.map((sequence, index) => [sequence, index]));
    return this.#running
      .filter((sequence) => !sequence.inFlight && !this.#reservesMost(sequence) && (before === Infinity || sequence.priority > before))
      .sort((a, b) => b.priority - a.priority || order.get(b)! - order.get(a)!);
  }

  /** Drops a running sequence's cache; it waits at the front of its priority to read what it knows again. */
  #preempt(sequence: Sequence): void {
    this.#running.splice(this.#running.indexOf(sequence), 1);
    this.#reservedTokens -= sequence.reserved;
    sequence.reserved = 0;
    sequence.past = 0;
    sequence.stale = 0;
    sequence.copyFrom = undefined;
    this.#unshare(sequence);
    this.#release([this.#prefixCache ? this.#prefixCache.abandon(sequence) : sequence.id]);
    this.#enqueue(sequence, true);
    this.#preemptions++;
  }

  /**
   * Puts a sequence in the waiting queue by priority: after those of its value (arrival order),
   * or, `front`, before them (a preempted one was there first).
   */
  #enqueue(sequence: Sequence, front = false): void {
    const waiting = this.#waiting;
    // Most requests share one priority and arrive in order: the common case appends.
    if (!front && (waiting.length === 0 || waiting[waiting.length - 1].priority <= sequence.priority)) {
      waiting.push(sequence);
      return;
    }
    const at = waiting.findIndex((other) => (front ? other.priority >= sequence.priority : other.priority > sequence.priority));
    if (at < 0) waiting.push(sequence);
    else waiting.splice(at, 0, sequence);
  }

  /**
   * Room for a waiting sequence by preempting running ones of a higher priority value (the
   * highest first), as long as that makes it fit; none is preempted where it would not.
   */
  #makeRoomByPriority(sequence: Sequence, need: number, keep?: number): boolean {
    const victims = this.#preemptible(sequence.priority).filter((victim) => victim.id !== keep);
    if (victims.length === 0) return false;
    const freed = victims.reduce((sum, victim) => sum + victim.reserved, 0);
    // Kept prefixes can always be dropped: only reservations decide whether preempting is enough.
    if (this.#reservedTokens - freed + need > this.#maxCacheTokens) return false;
    for (const victim of victims) {
      this.#preempt(victim);
      if (this.#makeRoom(need, keep)) return true;
    }
    return this.#makeRoom(need, keep);
  }

  /**
   * Whether `need` more positions fit beside the running sequences and the kept prefixes, dropping
   * kept prefixes (never `keep`) if that makes them fit. A dropped prefix's blocks that running
   * sequences share become theirs to count, so dropping goes on until the need fits.
   */
  #makeRoom(need: number, keep?: number): boolean {
    for (;;) {
      const kept = this.#prefixCache?.retainedTokens ?? 0;
      if (this.#reservedTokens + kept + need <= this.#maxCacheTokens) return true;
      if (!this.#prefixCache || this.#reservedTokens + need > this.#maxCacheTokens) return false;
      const dropped = this.#prefixCache.evict(this.#maxCacheTokens - this.#reservedTokens - need, keep);
      if (dropped.length === 0) return false;
      this.#release(dropped);
    }
  }

  /** A sequence is done: the ranks drop its cache, unless prefix caching keeps it as a source for later prompts. */
  #end(sequence: Sequence): void {
    this.#reservedTokens -= sequence.reserved;
    sequence.reserved = 0;
    this.#unshare(sequence);
    this.#running.splice(this.#running.indexOf(sequence), 1);
    this.#release(this.#prefixCache ? this.#prefixCache.finish(sequence) : [sequence.id]);
  }

  /** A failed step leaves the shards' caches unknown: the replica fails everything and stops. */
  #fail(error: Error): void {
    this.#inFlight--;
    if (!this.#broken) {
      this.#broken = error;
      for (const sequence of [...this.#running, ...this.#waiting.splice(0)]) sequence.fail(error);
      this.#running.length = 0;
    }
  }

  /** Where each rank runs: its stage, its place in the stage's group, and its actor. */
  ranks(): Array<{ stage: number; rank: number; actorId: string }> {
    return this.#workers.flatMap((stage, index) => stage.map((worker, rank) => ({ stage: index, rank, actorId: actorHandleInfo(worker)!.actorId })));
  }

  stats(): ReplicaStats {
    return {
      steps: this.#steps,
      promptTokens: this.#promptTokens,
      generatedTokens: this.#generatedTokens,
      waiting: this.#waiting.length,
      running: this.#running.length,
      peakRunning: this.#peakRunning,
      weightBytes: this.#weightBytes,
      reusedPromptTokens: this.#prefixCache?.reusedTokens ?? 0,
      retainedSequences: this.#prefixCache?.retainedSequences ?? 0,
      reservedCacheTokens: this.#reservedTokens + (this.#prefixCache?.retainedTokens ?? 0),
      maxCacheTokens: this.#maxCacheTokens,
      preemptions: this.#preemptions,
      draftTokens: this.#draftTokens,
      acceptedDraftTokens: this.#acceptedDraftTokens,
    };
  }

  /** Ends the graph, the groups and the ranks' actors; requests still running fail. */
  close(): Promise<void> {
    this.#closed ??= (async () => {
      const error = new TrellisError('ERR_REPLICA_CLOSED', 'the model replica was closed');
      for (const sequence of [...this.#running, ...this.#waiting.splice(0)]) sequence.fail(error);
      this.#running.length = 0;
      this.#broken ??= error;
      const draft = this.#draft;
      this.#draft = undefined;
      // After shutdown() the ranks went with the cluster: nothing is left to stop.
      if (!hasRuntime()) return;
      const draftClosed = draft?.close().catch(() => {});
      // Taken before the kills: a killed actor no longer knows its process. A worker cannot see
      // processes exit, only the driver's word that each rank is dead.
      const runtime = currentRuntime();
      const inDriver = runtime.context().isDriver;
      const gone = this.ranks().map((rank) => (inDriver ? runtime.whenActorProcessGone(rank.actorId) : new Promise<void>((resolve) => runtime.watchActors([rank.actorId], () => resolve()))));
      await this.#graph.teardown({ killActors: true }).catch(() => {});
      // The ranks go before their groups: a rank whose peer died may sit in a collective until its
      // communicator times out (a minute for NCCL), and would hold a group's leave call that long.
      for (const worker of this.#workers.flat()) {
        try {
          kill(worker);
        } catch {
          // Already gone with the graph.
        }
      }
      await Promise.allSettled(this.#groups.map((group) => group.destroy()));
      // Closed means the ranks' processes, and the memory they held, are gone.
      // Bounded, so that close() always ends: a rank's process is killed outright well before.
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([Promise.all(gone), new Promise((resolve) => (timer = setTimeout(resolve, 30_000).unref()))]);
      clearTimeout(timer);
      // The draft's rank may hold a bundle of this replica's group: it goes first.
      await draftClosed;
      if (this.#placement) removePlacementGroup(this.#placement);
    })();
    return this.#closed;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/** The placement a draft model's replica takes from its model's group: the options it was made with, to the group and its bundle. */
const lentPlacements = new WeakMap<ModelReplicaOptions, { group: PlacementGroup; bundleIndex: number }>();

/** Positions rounded up to whole cache blocks. */
function wholeBlocks(positions: number): number {
  return CacheBlocks.blocksFor(positions) * CACHE_BLOCK_POSITIONS;
}

/** Positions of the whole cache blocks in a shared prefix of `length` (a part-filled last block is copied once written, so its sharer counts it). */
function sharedPart(length: number): number {
  return Math.floor(length / CACHE_BLOCK_POSITIONS) * CACHE_BLOCK_POSITIONS;
}

/**
 * Positions the GPU ranks' caches can hold together: on each rank, its share of the device's
 * memory less what is already used (weights, other processes), a full step's activations and a
 * slab of cache blocks, over what a position takes there; the rank with the least room decides.
 * Running sequences and kept prefixes are counted in whole blocks, as the ranks hold them.
 */
function deviceCacheBudget(loaded: ShardLoaded[], utilization: number): number {
  let budget = Infinity;
  for (const part of loaded) {
    if (!part.device) continue;
    const { freeBytes, totalBytes, bytesPerPosition, stepBytes } = part.device;
    const usable = freeBytes - totalBytes * (1 - utilization) - stepBytes - CacheBlocks.slabBytes(CACHE_BLOCK_POSITIONS * bytesPerPosition);
    budget = Math.min(budget, Math.floor(usable / bytesPerPosition));
  }
  if (!(budget > 0)) {
    const tightest = loaded.find((part) => part.device)!.device!;
    throw new ModelLoadError('ERR_DEVICE_MEMORY', `the weights leave no room for a key/value cache on the GPU: ${Math.round(tightest.freeBytes / 2 ** 20)} MiB free of ${Math.round(tightest.totalBytes / 2 ** 20)} MiB, a step needs ${Math.round(tightest.stepBytes / 2 ** 20)} MiB (raise gpuMemoryUtilization, lower maxTokensPerStep or maxSequencesPerStep, or cut the model more ways)`, {});
  }
  return budget;
}
