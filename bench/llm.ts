/**
 * Model sharding suite (CPU kernels). A decoder of random weights in GPT-2's layout, written as a
 * real checkpoint, generates for 16 prompts at once (greedy, continuous batching):
 * - `llm_in_process_tokens_per_s`: one DecoderShard in this process stepping the same schedule,
 *   no actors, no channels: the floor the replicas are measured against;
 * - `llm_tp<T>_pp<P>_tokens_per_s`: a ModelReplica of T × P rank actors on a compiled graph;
 * - `llm_in_process_bf16_tokens_per_s`: the same shard from the same weights saved in bf16 and
 *   kept in 16 bits (the default for such checkpoints), against the f32 one;
 * - `linear_m<M>_gflops`: the matmul kernel alone, the model's hidden × MLP shape, and
 *   `linear_bf16_m<M>_gflops` with the weights in bf16; `linear_m1_4096_gflops` and its bf16 twin
 *   a 4096 × 4096 matrix (64 MiB in f32: a real model's layer, streamed from memory each step),
 *   and `linear_int8_m1_4096_gflops` the same quantized to int8 (16 MiB);
 * - `linear_m512_2threads_gflops` and `llm_tp1_pp1_2threads_tokens_per_s`: the same with the rank's
 *   kernels on two threads (numCpusPerRank 2), against one;
 * - `attention_decode_4096_us`, `attention_decode_bf16_4096_us` and `attention_decode_fp8_4096_us`:
 *   one decoding query (32 heads, 8 key/value heads of 128) against 4,096 cached positions in
 *   blocks, as a rank reads them, the cache in f32, bf16 and fp8 (16, 8 and 4 MiB per layer: the
 *   read is the cost);
 * - `llm_prefix_cached_tokens_per_s` against `llm_prefix_uncached_tokens_per_s`: 16 prompts that
 *   share a 192-token beginning (a system prompt), 8 new tokens each, on one rank with prefix
 *   caching on and off: the shared part read once against 16 times;
 * - `llm_prefix_cached_1024_tokens_per_s` against `llm_prefix_cached_tokens_per_s`: the same with
 *   prefix caching under a cache of 1,024 positions, against no limit: each prompt holds 224
 *   positions (14 blocks), 12 of them the shared prefix's, counted once, so all 16 still run at
 *   once (counted for each, 4 would);
 * - `llm_cache_grow_tokens_per_s` against `llm_cache_most_tokens_per_s`: 16 prompts allowed 192
 *   new tokens each that stop after 16, under a cache of 1,024 positions: reserving what each
 *   knows (all 16 run at once) against reserving each one's most (240 positions: 4 at once).
 * - `llm_priority_live_ms` against `llm_fifo_live_ms`: the median time four live requests (8 new
 *   tokens) take while a batch of 24 (64 new tokens each) fills one rank whose cache holds about
 *   four at once: the batch at priority 10, so that the live ones go first and preempt it, against
 *   every request at 0 (arrival order).
 * - `guided_regex_tokens_per_s` against `llm_unguided_tokens_per_s`: the same 16 requests on one
 *   rank, each token picked among those a regex allows (a TokenGuide over a synthetic byte-level
 *   vocabulary of the model's 8,192 tokens: masks built, sent with every step, applied), against
 *   none;
 * - `guided_grammar_tokens_per_s` against `guided_regex_tokens_per_s`: the same requests guided by
 *   a grammar of the same characters whose braces nest and balance (NESTED_BRACES): each depth
 *   of nesting is a state of the grammar's automaton (a stack of calls), with a mask of its own;
 * - `guided_mask_ms` against `guided_mask_per_token_ms`: the allowed tokens of one automaton state
 *   inside a JSON string (almost every token), over a synthetic 50,000-token vocabulary, found by
 *   walking the vocabulary's trie against walking each token's bytes on its own (the floor a
 *   trie must beat); `guided_masks_document_ms` against `guided_masks_document_per_token_ms` the
 *   same for every state one JSON document passes through (most states allow few tokens).
 * - `llm_lora_tokens_per_s` against `llm_unguided_tokens_per_s`: the same requests, each with one of
 *   four LoRA adapters (rank 16, on every attention and MLP matrix), all four loaded at once:
 *   the cost of the low-rank updates over the base model's step.
 * - `llm_moe_tokens_per_s` against `llm_dense_llama_tokens_per_s`: a Llama-layout decoder whose
 *   MLPs are 8 experts of inner width 1,024, 2 per token (Mixtral's shape), against the same
 *   decoder with one dense MLP of 2,048: the same arithmetic per token, but a decoding step reads
 *   every expert some token was routed to, so the mixture streams up to 4 times the MLP weights.
 * - `llm_ngram_speculation_tokens_per_s` against `llm_unguided_tokens_per_s`: the same requests
 *   with n-gram speculative decoding (4 tokens proposed), and `llm_ngram_accepted_fraction` the
 *   share of proposed tokens kept: the random decoder's text rarely repeats itself, so this is
 *   the cost of proposing in vain; `llm_ngram_copy_tokens_per_s` against
 *   `llm_ngram_copy_plain_tokens_per_s` the other end: the same decoder with its layers' outputs
 *   zeroed, whose greedy text repeats its last token, so every proposal is kept (the most
 *   speculation can give with 4 tokens: 5 per step).
 * - `llm_draft_speculation_tokens_per_s` against `llm_draft_plain_tokens_per_s`: speculation by a
 *   draft model (4 tokens a draft) against plain decoding, on one rank each, one request at a
 *   time (4 of the prompts in turn: the latency case speculation is for; a batch of 16 makes the
 *   CPU's step cost grow with the rows a step checks, and gains nothing here), with a decoder
 *   built so that a draft can agree with it: the model's layers after its first add little (their
 *   output projections scaled by 1/50), and the draft is that layer with the same embeddings and
 *   head (about a quarter of the work a token, the head being most of it);
 *   `llm_draft_accepted_fraction` the share of drafted tokens kept. A real draft is a smaller
 *   model trained alike (vLLM's draft-model method).
 * - `llm_beam_search_tokens_per_s` against `llm_beam_plain_tokens_per_s`: 4 prompts searched with
 *   4 beams, against the same prompts sampled 4 times each to the same length, on one rank.
 * Generated tokens per second of wall time, prompt reading included.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DecoderShard, ModelReplica, TokenGuide, Tokenizer, init, planSharding, shutdown, writeSafetensors, type DecoderConfig, type GenerateRequest, type ModelReplicaOptions, type ReplicaStats, type WritableTensor } from '../lib/index.js';
import { DEAD } from '../lib/llm/guided/automaton.js';
import { linear, setKernelThreads, type WeightMatrix } from '../lib/llm/kernels.js';
import { CacheBlocks } from '../lib/llm/cache-blocks.js';
import { CACHE_BLOCK_POSITIONS, DeviceKernels, ELEMENT_BYTES } from '../lib/llm/device-kernels.js';
import { stepLayout } from '../lib/llm/device-layers.js';
import { floatToBf16 } from '../lib/gpu/dtype.js';
import { randomWeights, writeCheckpoint } from '../examples/model/random-decoder.js';
import { elapsedSeconds, median, nowNs, round, type Results, type Suite } from './harness.js';

const CONFIG: DecoderConfig = { vocabSize: 8192, hiddenSize: 512, numLayers: 8, numHeads: 8, intermediateSize: 2048, maxPositions: 256, layerNormEpsilon: 1e-5 };
const PROMPTS = 16;
const PROMPT_TOKENS = 48;
const NEW_TOKENS = 32;
const prompts = Array.from({ length: PROMPTS }, (_, p) => Array.from({ length: PROMPT_TOKENS }, (_, t) => (p * 131 + t * 17) % CONFIG.vocabSize));

async function inProcess(checkpoint: string): Promise<number> {
  const shard = await DecoderShard.load({ checkpoint, config: CONFIG, plan: planSharding(CONFIG), stage: 0, rank: 0 });
  const run = async (round: number) => {
    const ids = prompts.map((_, index) => round * PROMPTS + index);
    let result = (await shard.forward({ step: 0, released: [], sequences: ids.map((id) => ({ id, past: 0, count: PROMPT_TOKENS })), tokens: Int32Array.from(prompts.flat()) })) as { tokens: Int32Array };
    for (let step = 1; step < NEW_TOKENS; step++) {
      const past = PROMPT_TOKENS + step - 1;
      result = (await shard.forward({ step, released: [], sequences: ids.map((id) => ({ id, past, count: 1 })), tokens: result.tokens })) as { tokens: Int32Array };
    }
    shard.clear();
  };
  await run(0);
  const times: number[] = [];
  for (let round = 1; round <= 3; round++) {
    const start = nowNs();
    await run(round);
    times.push(elapsedSeconds(start));
  }
  return (PROMPTS * NEW_TOKENS) / median(times);
}

/**
 * Generated tokens per second of a replica over `requests` (`tokens` of them each round: by
 * default every request's maxNewTokens): a warm-up round, then the median of three.
 */
async function generationRate(options: ModelReplicaOptions, requests: GenerateRequest[], tokens = requests.reduce((sum, request) => sum + (request.maxNewTokens ?? 16), 0)): Promise<number> {
  return (await measuredRate(options, requests, tokens)).rate;
}

/** generationRate, with the replica's counters after the rounds. */
async function measuredRate(options: ModelReplicaOptions, requests: GenerateRequest[], tokens: number): Promise<{ rate: number; stats: ReplicaStats }> {
  await using model = await ModelReplica.create(options);
  await model.generate(requests);
  const times: number[] = [];
  for (let round = 0; round < 3; round++) {
    const start = nowNs();
    await model.generate(requests);
    times.push(elapsedSeconds(start));
  }
  return { rate: tokens / median(times), stats: model.stats() };
}

function replica(checkpoint: string, tensorParallel: number, pipelineParallel: number, numCpusPerRank = 1): Promise<number> {
  return generationRate({ checkpoint, tensorParallel, pipelineParallel, numCpusPerRank }, prompts.map((tokens) => ({ tokens, maxNewTokens: NEW_TOKENS })));
}

const SHARED_PREFIX = Array.from({ length: 192 }, (_, t) => (t * 29 + 7) % CONFIG.vocabSize);
const PREFIX_PROMPTS = Array.from({ length: PROMPTS }, (_, p) => [...SHARED_PREFIX, ...Array.from({ length: 16 }, (_, t) => (p * 97 + t * 13 + 1) % CONFIG.vocabSize)]);

function sharedPrefix(checkpoint: string, prefixCaching: boolean, maxCacheTokens?: number): Promise<number> {
  // Nothing kept between rounds: each round's prompts share among themselves only.
  return generationRate({ checkpoint, prefixCaching, prefixCacheTokens: 0, ...(maxCacheTokens ? { maxCacheTokens } : {}) }, PREFIX_PROMPTS.map((tokens) => ({ tokens, maxNewTokens: 8 })));
}

/** Tokens per second when every request may run long but stops early (after 16), under a small cache. */
function earlyStops(checkpoint: string, cacheReservation: 'grow' | 'most'): Promise<number> {
  const requests = prompts.map((tokens) => ({ tokens, maxNewTokens: 192, stop: (generated: readonly number[]) => generated.length >= 16 }));
  return generationRate({ checkpoint, maxCacheTokens: 1024, cacheReservation }, requests, PROMPTS * 16);
}

/**
 * A byte-level tokenizer.json of `size` tokens: GPT-2's 256 byte characters, then merges of two
 * tokens drawn at random (seeded; letters and spaces mostly, as real vocabularies are), up to 12
 * characters long.
 */
function syntheticTokenizer(size: number): Tokenizer {
  const printable = (byte: number) => (byte >= 33 && byte <= 126) || (byte >= 161 && byte <= 172) || (byte >= 174 && byte <= 255);
  let extra = 0;
  const alphabet = Array.from({ length: 256 }, (_, byte) => (printable(byte) ? String.fromCharCode(byte) : String.fromCharCode(256 + extra++)));
  const vocab = new Map<string, number>(alphabet.map((character, id) => [character, id]));
  const common = [...'etaoinshrdlucmfwypvbgkjqxz', 'Ġ', 'Ġ', 'Ġ', ',', '.', '"', ':', '{', '}', '0', '1', '2'];
  const pieces = [...common];
  const merges: string[] = [];
  // mulberry32: integer arithmetic throughout (a float LCG loses bits past 2^53 and cycles).
  let state = 12345;
  const random = (n: number) => {
    state = (state + 0x6d2b79f5) | 0;
    let t = Math.imul(state ^ (state >>> 15), 1 | state);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) % n;
  };
  while (vocab.size < size - 1) {
    const left = pieces[random(pieces.length)];
    const right = pieces[random(pieces.length)];
    const token = left + right;
    if (token.length > 12 || vocab.has(token)) continue;
    vocab.set(token, vocab.size);
    merges.push(`${left} ${right}`);
    pieces.push(token);
  }
  const end = vocab.size;
  return Tokenizer.fromJSON({
    added_tokens: [{ id: end, content: '<|endoftext|>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: true }],
    pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: { type: 'BPE', vocab: { ...Object.fromEntries(vocab), '<|endoftext|>': end }, merges },
  });
}

/**
 * Milliseconds to find allowed tokens over a synthetic 50,000-token vocabulary, by the guide's
 * trie walk and by walking each token alone: for one state inside a JSON string (almost every
 * token allowed: nothing to prune), and for every state one document passes through at its token
 * boundaries (what a generation's first document costs). A new guide each round, the automaton
 * warmed by a first one, so the rounds measure the walks.
 */
function maskTimes(): { trie: number; perToken: number; documentTrie: number; documentPerToken: number } {
  const tokenizer = syntheticTokenizer(50_000);
  const times = (run: () => void) => {
    run();
    const samples: number[] = [];
    for (let round = 0; round < 5; round++) {
      const start = nowNs();
      run();
      samples.push(elapsedSeconds(start) * 1e3);
    }
    return median(samples);
  };
  const schema = {
    type: 'object',
    properties: { name: { type: 'string' }, age: { type: 'integer', minimum: 0, maximum: 150 }, email: { type: 'string', format: 'email' }, tags: { type: 'array', items: { type: 'string' }, maxItems: 5 } },
    required: ['name', 'age', 'email'],
  };
  const document = tokenizer.encode('{"name":"ada lovelace","age":36,"email":"ada@example.com","tags":["math","poetry"]}');
  const bytes = Array.from({ length: tokenizer.vocabSize }, (_, id) => tokenizer.tokenBytes(id));
  const perTokenMask = (guide: TokenGuide, state: number) => {
    const allowed = new Uint8Array(bytes.length);
    bytes.forEach((tokenBytes, id) => {
      if (tokenBytes && guide.automaton.walk(state, tokenBytes) !== DEAD) allowed[id] = 1;
    });
  };
  const statesOf = (guide: TokenGuide) => new Set(document.map((_, index) => guide.stateAfter(document.slice(0, index))));
  const inString = (guide: TokenGuide) => guide.automaton.walk(guide.automaton.start, new TextEncoder().encode('{"name":"ab'));
  return {
    trie: times(() => {
      const guide = TokenGuide.fromJsonSchema(tokenizer, schema);
      guide.allowed(inString(guide));
    }),
    perToken: times(() => {
      const guide = TokenGuide.fromJsonSchema(tokenizer, schema);
      perTokenMask(guide, inString(guide));
    }),
    documentTrie: times(() => {
      const guide = TokenGuide.fromJsonSchema(tokenizer, schema);
      for (const state of statesOf(guide)) guide.allowed(state);
    }),
    documentPerToken: times(() => {
      const guide = TokenGuide.fromJsonSchema(tokenizer, schema);
      for (const state of statesOf(guide)) perTokenMask(guide, state);
    }),
  };
}

/** Writes `count` PEFT adapters of rank `r` over every matrix of CONFIG's GPT-2 layout into `directory`; returns their paths by name. */
async function writeAdapters(directory: string, count: number, r: number): Promise<Record<string, string>> {
  const h = CONFIG.hiddenSize;
  const inner = CONFIG.intermediateSize;
  const modules: Record<string, [number, number]> = { 'attn.c_attn': [3 * h, h], 'attn.c_proj': [h, h], 'mlp.c_fc': [inner, h], 'mlp.c_proj': [h, inner] };
  const paths: Record<string, string> = {};
  for (let adapter = 0; adapter < count; adapter++) {
    const path = join(directory, `adapter-${adapter}`);
    mkdirSync(path, { recursive: true });
    const tensors: Record<string, WritableTensor> = {};
    for (let layer = 0; layer < CONFIG.numLayers; layer++) {
      for (const [module, [out, input]] of Object.entries(modules)) {
        const base = `base_model.model.transformer.h.${layer}.${module}`;
        tensors[`${base}.lora_A.weight`] = { dtype: 'F32', shape: [r, input], data: Float32Array.from({ length: r * input }, (_, i) => Math.sin(i + adapter) * 0.05) };
        tensors[`${base}.lora_B.weight`] = { dtype: 'F32', shape: [out, r], data: Float32Array.from({ length: out * r }, (_, i) => Math.cos(i * 3 + adapter) * 0.05) };
      }
    }
    await writeSafetensors(join(path, 'adapter_model.safetensors'), tensors);
    writeFileSync(join(path, 'adapter_config.json'), JSON.stringify({ r, lora_alpha: 2 * r, target_modules: ['c_attn', 'c_proj', 'c_fc'], bias: 'none' }));
    paths[`adapter-${adapter}`] = path;
  }
  return paths;
}

/** Tokens per second of the 16 prompts on one rank of a Llama-layout decoder, dense or with 8 experts (2 per token) of half the width. */
async function llamaRate(directory: string, experts: boolean): Promise<number> {
  const config: DecoderConfig = {
    ...CONFIG,
    architecture: 'llama',
    numKeyValueHeads: 4,
    ...(experts ? { numExperts: 8, numExpertsPerToken: 2, intermediateSize: CONFIG.intermediateSize / 2 } : {}),
  };
  const checkpoint = await writeCheckpoint(join(directory, experts ? 'moe' : 'dense'), config, randomWeights(config, 5));
  return generationRate({ checkpoint }, prompts.map((tokens) => ({ tokens, maxNewTokens: NEW_TOKENS })));
}

/** Tokens per second of the 16 prompts on one rank, with n-gram speculation or plain, and the share of proposals kept. */
async function speculating(checkpoint: string, speculate = true): Promise<{ rate: number; accepted: number }> {
  const options = { checkpoint, ...(speculate ? { speculation: { method: 'ngram' as const, tokens: 4 } } : {}) };
  const { rate, stats } = await measuredRate(options, prompts.map((tokens) => ({ tokens, maxNewTokens: NEW_TOKENS })), PROMPTS * NEW_TOKENS);
  return { rate, accepted: stats.acceptedDraftTokens / Math.max(1, stats.draftTokens) };
}

/**
 * Speculation by a draft model against plain decoding (see the suite's comment): the model is
 * CONFIG with layers 1 to 7 damped, the draft its first layer; both on one rank.
 */
async function draftSpeculation(directory: string, weights: Record<string, { shape: number[]; data: Float32Array }>): Promise<{ rate: number; plain: number; accepted: number }> {
  const DRAFT_LAYERS = 1;
  const damped = Object.fromEntries(Object.entries(weights).map(([name, tensor]) => {
    const layer = /^h\.(\d+)\..*c_proj\.(weight|bias)$/.exec(name);
    return [name, layer && Number(layer[1]) >= DRAFT_LAYERS ? { shape: tensor.shape, data: tensor.data.map((value) => value / 50) } : tensor];
  }));
  const model = await writeCheckpoint(join(directory, 'damped'), CONFIG, damped);
  const draftConfig = { ...CONFIG, numLayers: DRAFT_LAYERS };
  const draftWeights = Object.fromEntries(Object.entries(damped).filter(([name]) => !/^h\.(\d+)\./.test(name) || Number(/^h\.(\d+)\./.exec(name)![1]) < DRAFT_LAYERS));
  const draft = await writeCheckpoint(join(directory, 'draft'), draftConfig, draftWeights);
  const chosen = prompts.slice(0, 4);
  const oneAtATime = async (options: Partial<ModelReplicaOptions>) => {
    await using replica = await ModelReplica.create({ checkpoint: model, stopTokens: [], ...options });
    const run = async () => {
      for (const tokens of chosen) await replica.generate([{ tokens, maxNewTokens: NEW_TOKENS }]);
    };
    await run();
    const times: number[] = [];
    for (let round = 0; round < 3; round++) {
      const start = nowNs();
      await run();
      times.push(elapsedSeconds(start));
    }
    return { rate: (chosen.length * NEW_TOKENS) / median(times), stats: replica.stats() };
  };
  const plain = await oneAtATime({});
  const speculating = await oneAtATime({ speculation: { method: 'draft', checkpoint: draft, tokens: 4 } });
  return { rate: speculating.rate, plain: plain.rate, accepted: speculating.stats.acceptedDraftTokens / Math.max(1, speculating.stats.draftTokens) };
}

/**
 * Beam search on one rank: 4 of the prompts, 4 beams each, NEW_TOKENS tokens a beam (no stop
 * tokens), in tokens a beam per second, against the same 4 prompts generating 4 seeded samples
 * each of the same length (16 plain sequences): what steps as one-token requests cost, with
 * the block tails each step reads again and the search's own work.
 */
async function beamSearchRates(checkpoint: string): Promise<{ beam: number; plain: number }> {
  const width = 4;
  const chosen = prompts.slice(0, 4);
  await using model = await ModelReplica.create({ checkpoint, stopTokens: [] });
  const search = () => Promise.all(chosen.map((tokens) => model.beamSearch({ tokens, beamWidth: width, maxNewTokens: NEW_TOKENS })));
  const samples = chosen.flatMap((tokens) => Array.from({ length: width }, (_, seed) => ({ tokens, maxNewTokens: NEW_TOKENS, sampling: { temperature: 1, seed } })));
  const times = { beam: [] as number[], plain: [] as number[] };
  await search();
  await model.generate(samples);
  for (let round = 0; round < 3; round++) {
    let start = nowNs();
    await search();
    times.beam.push(elapsedSeconds(start));
    start = nowNs();
    await model.generate(samples);
    times.plain.push(elapsedSeconds(start));
  }
  const tokens = chosen.length * width * NEW_TOKENS;
  return { beam: tokens / median(times.beam), plain: tokens / median(times.plain) };
}

/** Tokens per second of the 16 prompts on one rank, request i with adapter i mod 4. */
async function withAdapters(checkpoint: string, directory: string): Promise<number> {
  const adapters = await writeAdapters(directory, 4, 16);
  const names = Object.keys(adapters);
  return generationRate({ checkpoint, adapters }, prompts.map((tokens, index) => ({ tokens, maxNewTokens: NEW_TOKENS, adapter: names[index % names.length] })));
}

/** Tokens per second of the 16 prompts on one rank, each step's token among those `pattern` allows (none: unguided). */
/** The regex's characters, with braces that nest and balance (no regex can say so). */
const NESTED_BRACES = 'root ::= item*\nitem ::= [a-z ,.:"] | "{" item* "}"';

function guided(checkpoint: string, guide?: (tokenizer: Tokenizer) => TokenGuide): Promise<number> {
  const tokenizer = syntheticTokenizer(CONFIG.vocabSize);
  const constraint = guide?.(tokenizer).constraint();
  return generationRate({ checkpoint }, prompts.map((tokens) => ({ tokens, maxNewTokens: NEW_TOKENS, ...(constraint ? { constraint } : {}) })));
}

/**
 * Microseconds per decoding attention call over `past` cached positions, as a rank runs it: the
 * host backend's kernels over a cache in blocks, kept in f32, bf16 or fp8.
 */
function attentionDecodeMicros(dtype: 'f32' | 'bf16' | 'fp8', past = 4096, heads = 32, kvHeads = 8, headDim = 128): number {
  using kernels = DeviceKernels.create('cpu');
  const caches = new CacheBlocks(kernels, CACHE_BLOCK_POSITIONS * 2 * kvHeads * headDim * ELEMENT_BYTES[dtype]);
  caches.reserve(0, past + 1);
  caches.setLength(0, past);
  const layout = stepLayout(kernels, caches, [{ id: 0, past, count: 1 }], 1);
  const queries = kernels.allocate(heads * headDim * 4);
  kernels.upload(queries, new Float32Array(heads * headDim).fill(0.02));
  const out = kernels.allocate(heads * headDim * 4);
  const shape = { heads, kvHeads, headSize: headDim, cache: dtype };
  try {
    kernels.attention(out, queries, layout, shape, 0, 0);
    const runs = 200;
    const start = nowNs();
    for (let i = 0; i < runs; i++) kernels.attention(out, queries, layout, shape, 0, 0);
    return (elapsedSeconds(start) / runs) * 1e6;
  } finally {
    for (const buffer of [layout.buffer, queries, out]) buffer.free();
    caches.close();
  }
}

function linearGflops(m: number, dtype: 'f32' | 'bf16' | 'int8', k = CONFIG.hiddenSize, n = CONFIG.intermediateSize): number {
  const x = new Float32Array(m * k).fill(0.5);
  const weight: WeightMatrix = dtype === 'f32'
    ? new Float32Array(n * k).fill(0.25)
    : dtype === 'int8' ? { dtype, values: new Int8Array(n * k).fill(32), scales: new Float32Array(n).fill(1 / 128) } : { dtype, bits: new Uint16Array(n * k).fill(floatToBf16(0.25)) };
  const out = new Float32Array(m * n);
  const runs = Math.max(3, Math.ceil(2e9 / (2 * m * k * n)));
  linear(out, x, weight, null, m, k, n);
  const start = nowNs();
  for (let i = 0; i < runs; i++) linear(out, x, weight, null, m, k, n);
  return (2 * m * k * n * runs) / elapsedSeconds(start) / 1e9;
}

/**
 * The median time (ms) four live requests of 8 new tokens take while a batch of 24 requests of 64
 * new tokens each keeps one rank busy under a cache that holds about four of them at once: with
 * the batch at priority 10 (the live requests, at 0, go first and preempt it), or with every
 * request at 0 (arrival order: the live ones wait behind the batch).
 */
async function liveLatency(checkpoint: string, prioritized: boolean): Promise<number> {
  await using server = await ModelReplica.create({ checkpoint, maxCacheTokens: 4 * 96, prefixCaching: false });
  const prompt = (seed: number) => Array.from({ length: 32 }, (_, index) => (index * 131 + seed * 17) % CONFIG.vocabSize);
  const batch = Array.from({ length: 24 }, (_, index) => server.generate([{ tokens: prompt(index), maxNewTokens: 64, ...(prioritized ? { priority: 10 } : {}) }]));
  while (server.stats().generatedTokens < 8) await new Promise((resolve) => setTimeout(resolve, 5));
  const latencies = await Promise.all(Array.from({ length: 4 }, async (_, index) => {
    const start = nowNs();
    await server.generate([{ tokens: prompt(100 + index), maxNewTokens: 8 }]);
    return elapsedSeconds(start) * 1000;
  }));
  await Promise.all(batch);
  return median(latencies);
}

export const llmSuite: Suite = {
  name: 'llm',
  ratios: [
    ['replica tp1 pp1 / in process', 'llm_tp1_pp1_tokens_per_s', 'llm_in_process_tokens_per_s', ''],
    ['replica tp2 pp1 / in process', 'llm_tp2_pp1_tokens_per_s', 'llm_in_process_tokens_per_s', ''],
    ['replica tp1 pp2 / in process', 'llm_tp1_pp2_tokens_per_s', 'llm_in_process_tokens_per_s', ''],
    ['bf16 weights / f32 weights, in process', 'llm_in_process_bf16_tokens_per_s', 'llm_in_process_tokens_per_s', ''],
    ['shared 192-token prefix, cached / read by each prompt', 'llm_prefix_cached_tokens_per_s', 'llm_prefix_uncached_tokens_per_s', ''],
    ['shared prefix cached, a cache of 1,024 positions / no limit', 'llm_prefix_cached_1024_tokens_per_s', 'llm_prefix_cached_tokens_per_s', ''],
    ['requests stopping early, cache reserved as they grow / at their most', 'llm_cache_grow_tokens_per_s', 'llm_cache_most_tokens_per_s', ''],
    ['live requests beside a batch job: batch at priority 10 / everything at 0, arrival order (time)', 'llm_priority_live_ms', 'llm_fifo_live_ms', ''],
    ['8 experts of 1024, 2 per token / dense MLP of 2048, one rank', 'llm_moe_tokens_per_s', 'llm_dense_llama_tokens_per_s', ''],
    ['n-gram speculation, 4 tokens / plain decoding, one rank (proposals rarely kept)', 'llm_ngram_speculation_tokens_per_s', 'llm_unguided_tokens_per_s', ''],
    ['n-gram speculation, 4 tokens / plain decoding, one rank (text that repeats: all kept)', 'llm_ngram_copy_tokens_per_s', 'llm_ngram_copy_plain_tokens_per_s', ''],
    ['draft-model speculation, 4 tokens / plain decoding, one request at a time (a draft of 1 of 8 layers that mostly agrees)', 'llm_draft_speculation_tokens_per_s', 'llm_draft_plain_tokens_per_s', ''],
    ['beam search, 4 prompts x 4 beams / 4 samples each, one rank', 'llm_beam_search_tokens_per_s', 'llm_beam_plain_tokens_per_s', ''],
    ['four LoRA adapters, rank 16 / base model, one rank', 'llm_lora_tokens_per_s', 'llm_unguided_tokens_per_s', ''],
    ['guided by a regex / unguided, one rank', 'guided_regex_tokens_per_s', 'llm_unguided_tokens_per_s', ''],
    ['guided by a grammar of nested braces / by a regex, one rank', 'guided_grammar_tokens_per_s', 'guided_regex_tokens_per_s', ''],
    ['mask of a state inside a string, trie walk / each token walked (time)', 'guided_mask_ms', 'guided_mask_per_token_ms', ''],
    ["masks of a document's states, trie walk / each token walked (time)", 'guided_masks_document_ms', 'guided_masks_document_per_token_ms', ''],
    ['linear m 512, two threads / one', 'linear_m512_2threads_gflops', 'linear_m512_gflops', ''],
    ['replica tp1 pp1, two kernel threads / one', 'llm_tp1_pp1_2threads_tokens_per_s', 'llm_tp1_pp1_tokens_per_s', ''],
    ['decode attention over 4096 positions, bf16 cache / f32 cache (time)', 'attention_decode_bf16_4096_us', 'attention_decode_4096_us', ''],
    ['decode attention over 4096 positions, fp8 cache / f32 cache (time)', 'attention_decode_fp8_4096_us', 'attention_decode_4096_us', ''],
    ['linear bf16 / f32, m 1', 'linear_bf16_m1_gflops', 'linear_m1_gflops', ''],
    ['linear bf16 / f32, m 16', 'linear_bf16_m16_gflops', 'linear_m16_gflops', ''],
    ['linear bf16 / f32, m 512', 'linear_bf16_m512_gflops', 'linear_m512_gflops', ''],
    ['linear bf16 / f32, m 1, 4096 × 4096', 'linear_bf16_m1_4096_gflops', 'linear_m1_4096_gflops', ''],
    ['linear int8 / f32, m 1, 4096 × 4096', 'linear_int8_m1_4096_gflops', 'linear_m1_4096_gflops', ''],
  ],
  async run(): Promise<Results> {
    const results: Results = {};
    for (const m of [1, 16, 512]) {
      results[`linear_m${m}_gflops`] = { value: round(linearGflops(m, 'f32'), 2), unit: 'GFLOP/s' };
      results[`linear_bf16_m${m}_gflops`] = { value: round(linearGflops(m, 'bf16'), 2), unit: 'GFLOP/s' };
    }
    results.linear_m1_4096_gflops = { value: round(linearGflops(1, 'f32', 4096, 4096), 2), unit: 'GFLOP/s' };
    results.linear_bf16_m1_4096_gflops = { value: round(linearGflops(1, 'bf16', 4096, 4096), 2), unit: 'GFLOP/s' };
    results.linear_int8_m1_4096_gflops = { value: round(linearGflops(1, 'int8', 4096, 4096), 2), unit: 'GFLOP/s' };
    setKernelThreads(2);
    try {
      results.linear_m512_2threads_gflops = { value: round(linearGflops(512, 'f32'), 2), unit: 'GFLOP/s' };
    } finally {
      setKernelThreads(1);
    }
    const masks = maskTimes();
    results.guided_mask_ms = { value: round(masks.trie, 2), unit: 'ms' };
    results.guided_mask_per_token_ms = { value: round(masks.perToken, 2), unit: 'ms' };
    results.guided_masks_document_ms = { value: round(masks.documentTrie, 2), unit: 'ms' };
    results.guided_masks_document_per_token_ms = { value: round(masks.documentPerToken, 2), unit: 'ms' };
    results.attention_decode_4096_us = { value: round(attentionDecodeMicros('f32'), 1), unit: 'us' };
    results.attention_decode_bf16_4096_us = { value: round(attentionDecodeMicros('bf16'), 1), unit: 'us' };
    results.attention_decode_fp8_4096_us = { value: round(attentionDecodeMicros('fp8'), 1), unit: 'us' };
    const directory = mkdtempSync(join(tmpdir(), 'trellis-bench-llm-'));
    try {
      const weights = randomWeights(CONFIG, 3);
      const checkpoint = await writeCheckpoint(directory, CONFIG, weights);
      const bf16Checkpoint = await writeCheckpoint(join(directory, 'bf16'), CONFIG, weights, { dtype: 'BF16' });
      results.llm_in_process_tokens_per_s = { value: round(await inProcess(checkpoint), 1), unit: 'tokens/s' };
      results.llm_in_process_bf16_tokens_per_s = { value: round(await inProcess(bf16Checkpoint), 1), unit: 'tokens/s' };
      await init({ numCpus: 4 });
      try {
        for (const [tensorParallel, pipelineParallel] of [[1, 1], [2, 1], [1, 2]]) {
          results[`llm_tp${tensorParallel}_pp${pipelineParallel}_tokens_per_s`] = { value: round(await replica(checkpoint, tensorParallel, pipelineParallel), 1), unit: 'tokens/s' };
        }
        results.llm_tp1_pp1_2threads_tokens_per_s = { value: round(await replica(checkpoint, 1, 1, 2), 1), unit: 'tokens/s' };
        results.llm_prefix_uncached_tokens_per_s = { value: round(await sharedPrefix(checkpoint, false), 1), unit: 'tokens/s' };
        results.llm_prefix_cached_tokens_per_s = { value: round(await sharedPrefix(checkpoint, true), 1), unit: 'tokens/s' };
        results.llm_prefix_cached_1024_tokens_per_s = { value: round(await sharedPrefix(checkpoint, true, 1024), 1), unit: 'tokens/s' };
        results.llm_cache_most_tokens_per_s = { value: round(await earlyStops(checkpoint, 'most'), 1), unit: 'tokens/s' };
        results.llm_cache_grow_tokens_per_s = { value: round(await earlyStops(checkpoint, 'grow'), 1), unit: 'tokens/s' };
        results.llm_priority_live_ms = { value: round(await liveLatency(checkpoint, true), 1), unit: 'ms' };
        results.llm_fifo_live_ms = { value: round(await liveLatency(checkpoint, false), 1), unit: 'ms' };
        results.llm_unguided_tokens_per_s = { value: round(await guided(checkpoint, undefined), 1), unit: 'tokens/s' };
        // Words and punctuation: every state allows most of the vocabulary, so each step sends a full mask.
        results.llm_dense_llama_tokens_per_s = { value: round(await llamaRate(directory, false), 1), unit: 'tokens/s' };
        results.llm_moe_tokens_per_s = { value: round(await llamaRate(directory, true), 1), unit: 'tokens/s' };
        const speculation = await speculating(checkpoint);
        results.llm_ngram_speculation_tokens_per_s = { value: round(speculation.rate, 1), unit: 'tokens/s' };
        results.llm_ngram_accepted_fraction = { value: round(speculation.accepted, 3), unit: 'fraction' };
        // The same decoder, its attention and MLP outputs zeroed: each position reads as its token, and the tied head repeats it.
        const repeating = Object.fromEntries(Object.entries(weights).map(([name, tensor]) => [name, /c_proj\.(weight|bias)$/.test(name) ? { shape: tensor.shape, data: new Float32Array(tensor.data.length) } : tensor]));
        const copyCheckpoint = await writeCheckpoint(join(directory, 'repeating'), CONFIG, repeating);
        results.llm_ngram_copy_plain_tokens_per_s = { value: round((await speculating(copyCheckpoint, false)).rate, 1), unit: 'tokens/s' };
        const copying = await speculating(copyCheckpoint);
        results.llm_ngram_copy_tokens_per_s = { value: round(copying.rate, 1), unit: 'tokens/s' };
        results.llm_ngram_copy_accepted_fraction = { value: round(copying.accepted, 3), unit: 'fraction' };
        const drafted = await draftSpeculation(directory, weights);
        results.llm_draft_speculation_tokens_per_s = { value: round(drafted.rate, 1), unit: 'tokens/s' };
        results.llm_draft_plain_tokens_per_s = { value: round(drafted.plain, 1), unit: 'tokens/s' };
        results.llm_draft_accepted_fraction = { value: round(drafted.accepted, 3), unit: 'fraction' };
        const beams = await beamSearchRates(checkpoint);
        results.llm_beam_search_tokens_per_s = { value: round(beams.beam, 1), unit: 'tokens/s' };
        results.llm_beam_plain_tokens_per_s = { value: round(beams.plain, 1), unit: 'tokens/s' };
        results.llm_lora_tokens_per_s = { value: round(await withAdapters(checkpoint, join(directory, 'adapters')), 1), unit: 'tokens/s' };
        results.guided_regex_tokens_per_s = { value: round(await guided(checkpoint, (tokenizer) => TokenGuide.fromRegex(tokenizer, '[a-z ,.:"{}]*')), 1), unit: 'tokens/s' };
        results.guided_grammar_tokens_per_s = { value: round(await guided(checkpoint, (tokenizer) => TokenGuide.fromGrammar(tokenizer, NESTED_BRACES)), 1), unit: 'tokens/s' };
      } finally {
        await shutdown();
      }
    } finally {
      rmSync(directory, { recursive: true, force: true });
    }
    return results;
  },
};
