/**
 * Batch inference over a dataset with a sharded model, as Ray's build_llm_processor: each replica
 * is an actor of a mapBatches pool that starts its own tensorParallel × pipelineParallel ranks,
 * and the pool's batches interleave in it, so the replica's continuous batching sees several
 * batches' sequences at once and keeps its pipeline full.
 */
import { join } from 'node:path';
import { ActorDiedError, GrammarError, InvalidArgumentError, ModelLoadError } from '../errors.js';
import { remote } from '../core/registry.js';
import type { Dataset } from '../data/dataset.js';
import type { Row } from '../data/block.js';
import type { RowFunction } from '../data/udf.js';
import { ModelReplica, type EmbedRequest, type GenerateRequest, type Generation, type ModelReplicaOptions } from './replica.js';
import { checkpointDirectory } from './config.js';
import { localCheckpoint } from './model-source.js';
import { checkSampling, type SamplingParameters } from './sampling.js';
import { ChatTemplate, type ChatMessage } from './chat-template.js';
import { choiceConstraint } from './choices.js';
import { checkGuidedDecoding, type GuidedDecoding } from './guided/guided-decoding.js';
import { TokenGuide, type TokenConstraint } from './guided/token-guide.js';
import type { TokenMask } from './guided/token-mask.js';
import { Tokenizer } from './tokenizer.js';
import { checkBeamSearch, type BeamSearchOptions, type BeamSearchResult } from './beam-search.js';
import { afterReasoning, reasoningMarkers, splitReasoning, type ReasoningMarkers, type ReasoningOptions } from './reasoning.js';

/** Guides an engine keeps compiled (rows may each bring their own schema); each keeps at most 32 MiB of masks. */
const GUIDES_KEPT = 16;

export interface LLMProcessorOptions extends ModelReplicaOptions {
  /** Replicas: a number, or [min, max] for a pool that grows with the backlog (default 1). */
  concurrency?: number | [number, number];
  /** Rows per batch handed to a replica (default 64). */
  batchSize?: number;
  /** Batches a replica works on at once (default 2 × stepsInFlight, at least 2). */
  batchesPerReplica?: number;
  /**
   * A replica above the pool's minimum that idles this long is stopped (ms, default 60 s: a model
   * takes long to load again, unlike the data layer's usual actors).
   */
  replicaIdleTimeoutMs?: number;
  /** How long a replica may take to start, weights loaded (ms, default 30 min). */
  replicaStartTimeoutMs?: number;
  /** The column holding each row's prompt tokens (default 'tokens'). */
  tokensColumn?: string;
  /**
   * A column of text prompts instead: encoded with the checkpoint's tokenizer.json (or
   * `tokenizer`), and each row also gains `generatedText`.
   */
  promptColumn?: string;
  /**
   * A column of conversations instead: each row's list of { role, content } turns is rendered by
   * the checkpoint's chat template (chat_template.jinja or tokenizer_config.json), opened for the
   * assistant's answer, and encoded with the tokenizer; each row also gains `generatedText`.
   */
  messagesColumn?: string;
  /** A chat template's Jinja source, to use instead of the checkpoint's (with its special tokens). */
  chatTemplate?: string;
  /** More variables for the chat template, the same for every row (tools, a template's switches). */
  chatTemplateVariables?: Record<string, unknown>;
  /** A tokenizer.json, or a directory holding one (default: the checkpoint's directory). */
  tokenizer?: string;
  /** Defaults for every row; a row's own `maxNewTokens`, `minNewTokens`, `sampling` or `stop` column wins. */
  maxNewTokens?: number;
  /** Tokens to generate before a stop token or stop text may end a row (vLLM's min_tokens; default 0). */
  minNewTokens?: number;
  /**
   * The rows' place in each replica's queue (GenerateRequest.priority: lower goes first, default
   * 0); a row's own `priority` column wins. A job that shares replicas with live traffic (a
   * deployment's) runs at a higher value, so that live requests overtake it.
   */
  priority?: number;
  sampling?: SamplingParameters;
  /**
   * Text that ends a generation (text prompts and conversations): generatedText stops before it
   * and finishReason is 'stop'; generatedTokens keep the tokens that spelled it.
   */
  stop?: string[];
  /** Keep only the last this many tokens of each prompt (vLLM's truncate_prompt_tokens), so long documents fit. */
  truncatePromptTokens?: number;
  /** Keep the stop text that ended a generation at the end of generatedText (vLLM's include_stop_str_in_output; default false). */
  includeStopText?: boolean;
  /** Generate past the end-of-sequence tokens, to maxNewTokens (vLLM's ignore_eos: fixed-length runs, benchmarks). */
  ignoreEos?: boolean;
  /**
   * Token ids that end a generation, kept in its tokens (vLLM's stop_token_ids; default: the
   * checkpoint's end-of-sequence tokens); a row's `stopTokens` column wins.
   */
  stopTokens?: number[];
  /** Rows also gain `generatedLogprobs`: each generated token's log-probability under the model. */
  logprobs?: boolean;
  /**
   * Rows also gain `generatedTopLogprobs`: per generated token, the k most likely tokens there
   * ({ token, logprob, text }; most likely first; k from 1 to 20).
   */
  topLogprobs?: number;
  /**
   * Rows also gain `promptLogprobs`: the log-probability of each prompt token after the first,
   * given those before it (scoring, perplexity: use maxNewTokens 1).
   */
  promptLogprobs?: boolean;
  /**
   * Rows also gain `promptTopLogprobs` (and `promptLogprobs`): per prompt token after the first,
   * the k most likely tokens at its place ({ token, logprob, text }; most likely first; k from 1
   * to 20), so that a harness can tell whether each prompt token was the model's greedy pick.
   */
  promptTopLogprobs?: number;
  /**
   * The answer must be one of these texts (vLLM's guided choice; text prompts and conversations):
   * each token is picked among those that continue some choice as the tokenizer spells it, by the
   * sampling (greedy: the most likely choice, token by token). generatedText is the choice.
   */
  choices?: string[];
  /**
   * Guided decoding (vLLM's guided_decoding): the generated text must be a JSON document a schema
   * accepts (`{ json: schema }`), any JSON object (`{ jsonObject: true }`), a whole match of a
   * regex (`{ regex }`) or one of some texts however the model spells them (`{ choice }`). Each
   * step picks among the tokens that keep the text on the pattern; once the pattern is complete
   * the generation stops ('stop'), and where it may end or go on, the stop tokens are allowed.
   * A row's `guidedDecoding` column (the same shape, or its JSON text: a text column holds any
   * mix of kinds) wins for that row, so rows may each have their own schema; guides are compiled
   * once per engine and pattern. Check 'length' rows: a
   * text cut by maxNewTokens is unfinished.
   */
  guidedDecoding?: GuidedDecoding;
  /**
   * A directory of LoRA adapters, one sub-directory each: a row's `adapter` column that names
   * none of `adapters` is looked up here by name (a plain name: letters, digits, '.', '_', '-')
   * and registered on first use, as Ray's dynamic LoRA loading path. Rows run with their
   * column's adapter (null: the base model), any mix of them in one batch.
   */
  adapterDirectory?: string;
  /**
   * A reasoning model's thinking (between '<think>' and '</think>' by default; the end marker must
   * be one token, as reasoning models' vocabularies have it): rows gain `reasoningText`, and
   * `generatedText` is the answer after it (vLLM's reasoning parsers). A guide (guidedDecoding,
   * choices) applies to the answer alone: the reasoning is free. A generation cut before the end
   * marker is all reasoning, with an empty answer.
   */
  reasoning?: boolean | ReasoningOptions;
  /**
   * 'fail' (default): a row that cannot run (a prompt too long for the model or the cache, bad
   * sampling, a schema that cannot be compiled, a constraint that throws) fails its batch and the
   * job, as before. 'record': it fails alone: it comes out with finishReason 'error', no tokens,
   * and `error` ("CODE: message"; null on the other rows), and the job goes on. A rank's death is
   * never a row's error: the replica is rebuilt and the batch runs again.
   */
  rowErrors?: 'fail' | 'record';
  /**
   * 'generate' (default); 'embed': each row's prompt is read and the row gains `embedding`
   * (hiddenSize floats) and `promptTokens`, nothing generated, as decoder embedding models are
   * run; 'classify': the checkpoint's sequence classification head (score.weight) reads each
   * prompt's last position and the row gains `label`, `probabilities` (per label, in the head's
   * order) and `promptTokens`, as vLLM's classify task does.
   */
  task?: 'generate' | 'embed' | 'classify';
  /** For 'embed': the last position's state ('last', default) or the mean of all ('mean'). */
  pooling?: 'last' | 'mean';
  /** For 'embed': scale each embedding to length 1 (default true). */
  normalize?: boolean;
  /**
   * Generations per prompt (default 1; vLLM's n). Each row comes out that many times, with
   * `sample` 0..n-1, each drawn with the seed plus its sample index, so n > 1 needs a temperature
   * above 0; prefix caching reads the prompt's whole blocks once for all of them.
   */
  samplesPerPrompt?: number;
  /**
   * Beam search instead of sampling (vLLM's beam_search; `{ beamWidth: 4, lengthPenalty: 1 }`):
   * each row gains `beams`, its beamWidth best continuations best first ({ tokens, logprob,
   * score, finishReason }, and `text` for text prompts and conversations), and its
   * generatedTokens, generatedText and finishReason are the best beam's. maxNewTokens, stopTokens,
   * ignoreEos and adapters apply; sampling, guides, choices, stop strings, minNewTokens,
   * logprobs and samplesPerPrompt do not (refused). Give prefixCacheTokens room for the batch's
   * beams (see ModelReplica.beamSearch).
   */
  beamSearch?: BeamSearchOptions;
  /**
   * Times a replica is rebuilt after one of its ranks dies (default 2). Its batches in flight
   * then run again from their prompts on the new ranks; seeded sampling gives the same text.
   */
  maxReplicaRestarts?: number;
  /** Functions registered with remote() that run on each row before and after generation. */
  preprocess?: RowFunction;
  postprocess?: RowFunction;
}

/** What the engine gets: the replica's options and the row defaults (functions stay in the driver). */
type EngineOptions = Omit<LLMProcessorOptions, 'preprocess' | 'postprocess' | 'concurrency' | 'batchSize' | 'batchesPerReplica' | 'replicaIdleTimeoutMs' | 'replicaStartTimeoutMs'>;

/** The pool's class: one model replica, fed every row of every batch it is given. */
export class LLMEngine {
  readonly ready: Promise<void>;
  #replica: ModelReplica | undefined;
  /** The rebuild under way, shared by every batch the dead replica failed. */
  #rebuilding: Promise<ModelReplica> | undefined;
  #restarts = 0;
  #tokenizer: Tokenizer | undefined;
  #chatTemplate: ChatTemplate | undefined;
  /** The choices as the tokenizer spells them, and the constraint every request shares. */
  #choices: number[][] | undefined;
  #choiceConstraint: ((generated: readonly number[]) => readonly number[] | TokenMask | null) | undefined;
  #reasoning: ReasoningMarkers | undefined;
  /** Compiled guides by their spec's JSON, least recently used first; each with its constraints by stop tokens. */
  readonly #guides = new Map<string, { guide: TokenGuide; constraints: Map<string, TokenConstraint> }>();
  readonly #options: EngineOptions;
  /** The counters of replicas this engine has replaced (a rank died), so that metrics() keeps counting. */
  readonly #replacedTotals: Record<string, number> = {};

  constructor(options: EngineOptions) {
    this.#options = options;
    this.ready = (async () => {
      // On object storage: this host's copy (the replicas it starts here share it).
      const source = { ...(options.filesystem ? { filesystem: options.filesystem } : {}) };
      const directory = checkpointDirectory(await localCheckpoint(options.checkpoint, source));
      const tokenizer = options.tokenizer === undefined ? undefined : await localCheckpoint(options.tokenizer, source);
      if (options.promptColumn !== undefined || options.messagesColumn !== undefined || options.guidedDecoding !== undefined || options.reasoning) this.#tokenizer = await Tokenizer.load(tokenizer ?? directory);
      // The template and its special tokens live beside the tokenizer.
      if (options.messagesColumn !== undefined) this.#chatTemplate = ChatTemplate.load(tokenizer ? checkpointDirectory(tokenizer) : directory, { source: options.chatTemplate });
      if (options.choices !== undefined) {
        this.#choices = options.choices.map((choice) => this.#tokenizer!.encode(choice, { addSpecialTokens: false }));
        const empty = this.#choices.findIndex((tokens) => tokens.length === 0);
        if (empty >= 0) throw new InvalidArgumentError(`choice ${empty} (${JSON.stringify(options.choices[empty])}) has no tokens`, 'ERR_CONSTRAINT');
      }
      this.#replica = await this.#startReplica();
      if (options.reasoning) this.#reasoning = reasoningMarkers(options.reasoning, this.#tokenizer!);
      // A rebuilt replica has the same stop tokens: the trie is built once.
      if (this.#choices) this.#choiceConstraint = this.#afterReasoning(choiceConstraint(this.#choices, this.#replica.stopTokens));
      if (this.#tokenizer && this.#tokenizer.vocabSize > this.#replica.config.vocabSize) {
        await this.#replica.close();
        throw new ModelLoadError('ERR_TOKENIZER', `the tokenizer's ${this.#tokenizer.vocabSize} tokens do not fit the model's vocabulary of ${this.#replica.config.vocabSize}`);
      }
    })();
  }

  /** A row's prompt tokens, only the last `truncatePromptTokens` of them when that is set. */
  #prompt(row: Row, index: number): ArrayLike<number> {
    const tokens = this.#promptTokens(row, index);
    const keep = this.#options.truncatePromptTokens;
    return keep !== undefined && tokens.length > keep ? Array.prototype.slice.call(tokens, tokens.length - keep) : tokens;
  }

  #promptTokens(row: Row, index: number): ArrayLike<number> {
    const { promptColumn, messagesColumn } = this.#options;
    if (messagesColumn !== undefined) {
      const messages = row[messagesColumn];
      let text: string;
      try {
        text = this.#chatTemplate!.render(messages as ChatMessage[], { variables: this.#options.chatTemplateVariables });
      } catch (error) {
        if (error instanceof InvalidArgumentError) throw new InvalidArgumentError(`row ${index}: column '${messagesColumn}': ${error.message}`, error.code);
        throw error;
      }
      // The template wrote the special tokens (the beginning of text among them): none are added.
      return this.#tokenizer!.encode(text, { addSpecialTokens: false });
    }
    if (promptColumn !== undefined) {
      const text = row[promptColumn];
      if (typeof text !== 'string') throw new InvalidArgumentError(`row ${index}: column '${promptColumn}' must hold the prompt's text, got ${text === undefined ? 'nothing' : typeof text}`, 'ERR_PROMPT');
      return this.#tokenizer!.encode(text);
    }
    const column = this.#options.tokensColumn ?? 'tokens';
    const tokens = row[column];
    if (!Array.isArray(tokens) && !ArrayBuffer.isView(tokens)) {
      throw new InvalidArgumentError(`row ${index}: column '${column}' must hold the prompt's token ids, got ${tokens === undefined ? 'nothing' : typeof tokens}`, 'ERR_PROMPT');
    }
    return tokens as ArrayLike<number>;
  }

  /** Models often have more ids than their tokenizer (a vocabulary padded for speed): those have no text. */
  #text(tokens: readonly number[]): string {
    const tokenizer = this.#tokenizer!;
    return tokenizer.decode(tokens.filter((token) => token < tokenizer.vocabSize));
  }

  /** A position's likeliest tokens as rows carry them: with their text where the engine has a tokenizer. */
  #namedAlternatives(entries: Array<{ token: number; logprob: number }>): Array<{ token: number; logprob: number; text?: string }> {
    return entries.map((entry) => ({ ...entry, ...(this.#tokenizer ? { text: this.#text([entry.token]) } : {}) }));
  }

  /**
   * Whether the generated text holds one of `strings`. Only the tail is decoded: a token spells
   * at least one character or a piece of one (a character takes at most four byte tokens), so
   * 4 × the longest string's length, and a few more, always reach back past any new match.
   */
  #stopWhen(strings: string[]): (generated: readonly number[]) => boolean {
    const window = 4 * Math.max(...strings.map((text) => text.length)) + 4;
    return (generated) => {
      const tail = this.#text(generated.slice(-window));
      return strings.some((text) => tail.includes(text));
    };
  }

  /** A row's stop token ids (its column, else the processor's), as a request takes them. */
  /** The constraint of a row's guided decoding (its column, else the processor's), for the stop tokens it runs with. */
  #guidedConstraint(row: Row, index: number, stopTokens: readonly number[]): TokenConstraint | undefined {
    let spec = (row.guidedDecoding ?? this.#options.guidedDecoding) as GuidedDecoding | string | undefined | null;
    if (spec === undefined || spec === null) return undefined;
    if (!this.#tokenizer) throw new InvalidArgumentError(`row ${index}: guidedDecoding needs a tokenizer: give the processor a guidedDecoding, promptColumn or messagesColumn`, 'ERR_CONSTRAINT');
    const key = typeof spec === 'string' ? spec : JSON.stringify(spec);
    if (typeof spec === 'string') {
      try {
        spec = JSON.parse(spec) as GuidedDecoding;
      } catch (error) {
        throw new GrammarError(`row ${index}: guidedDecoding is text but not JSON: ${(error as Error).message}`);
      }
    }
    let entry = this.#guides.get(key);
    if (entry) this.#guides.delete(key);
    else {
      entry = { guide: TokenGuide.compile(this.#tokenizer, spec, `row ${index}: guidedDecoding`), constraints: new Map() };
      if (this.#guides.size >= GUIDES_KEPT) this.#guides.delete(this.#guides.keys().next().value!);
    }
    this.#guides.set(key, entry);
    const stopsKey = stopTokens.join(',');
    let constraint = entry.constraints.get(stopsKey);
    if (!constraint) entry.constraints.set(stopsKey, (constraint = this.#afterReasoning(entry.guide.constraint(stopTokens))));
    return constraint;
  }

  /** With a reasoning model, a constraint applies after the reasoning's end marker; the reasoning is free. */
  #afterReasoning<T>(constraint: (generated: readonly number[]) => T): (generated: readonly number[]) => T | TokenMask {
    return this.#reasoning ? afterReasoning(this.#reasoning, this.#replica!.config.vocabSize, constraint) : constraint;
  }

  /** The generated text's columns: the answer (cut at stop strings) and, for a reasoning model, the reasoning apart. */
  #textColumns(tokens: readonly number[], stops: string[] | undefined): Row {
    if (!this.#reasoning) return { generatedText: this.#cutAtStop(this.#text(tokens), stops) };
    const { reasoning, answer } = splitReasoning(tokens, this.#reasoning);
    const thought = this.#text(reasoning).trimStart();
    const start = this.#reasoning.start;
    return { reasoningText: (start && thought.startsWith(start) ? thought.slice(start.length) : thought).trim(), generatedText: this.#cutAtStop(this.#text(answer), stops).trimStart() };
  }

  #stopTokensOf(row: Row, index: number): { stopTokens?: number[] } {
    const value = row.stopTokens ?? this.#options.stopTokens;
    if (value === undefined || value === null) return {};
    if (typeof value !== 'object' || typeof (value as ArrayLike<unknown>).length !== 'number') throw new InvalidArgumentError(`row ${index}: stopTokens must be a list of token ids`, 'ERR_PROMPT');
    return { stopTokens: Array.from(value as ArrayLike<number>, Number) };
  }

  /** The text up to the first stop string, without it (or through it, with includeStopText). */
  #cutAtStop(text: string, strings: string[] | undefined): string {
    let end = text.length;
    let through = text.length;
    for (const stop of strings ?? []) {
      const at = text.indexOf(stop);
      if (at >= 0 && at < end) {
        end = at;
        through = at + stop.length;
      }
    }
    return text.slice(0, this.#options.includeStopText ? through : end);
  }

  #stopStrings(row: Row, index: number): string[] | undefined {
    const value = row.stop ?? this.#options.stop;
    if (value === undefined || value === null) return undefined;
    // A row's list column may come as an Arrow vector: any array-like will do.
    if (typeof value !== 'object' || typeof (value as ArrayLike<unknown>).length !== 'number') throw new InvalidArgumentError(`row ${index}: stop must be a list of strings`, 'ERR_PROMPT');
    const strings = Array.from(value as ArrayLike<unknown>);
    if (strings.length === 0) return undefined;
    if (strings.some((text) => typeof text !== 'string' || text.length === 0)) throw new InvalidArgumentError(`row ${index}: stop must be a list of non-empty strings`, 'ERR_PROMPT');
    if (!this.#tokenizer) throw new InvalidArgumentError('stop strings need text: give a promptColumn or messagesColumn (for token ids, use stopTokens)', 'ERR_PROMPT');
    return strings as string[];
  }

  /** Runs `work` on the current replica; a rank's death rebuilds the replica and runs it again. */
  async #onReplica<T>(work: (replica: ModelReplica) => Promise<T>): Promise<T> {
    for (;;) {
      const replica = this.#replica!;
      try {
        return await work(replica);
      } catch (error) {
        if (!LLMEngine.#isRankDeath(error)) throw error;
        await this.#rebuild(replica, error);
      }
    }
  }

  /** An embedding job's batch: each row gains its embedding and its prompt's length. */
  async #embed(rows: Row[]): Promise<Row[]> {
    const { pooling, normalize } = this.#options;
    const requests: EmbedRequest[] = rows.map((row, index) => ({ tokens: this.#prompt(row, index), ...(pooling ? { pooling } : {}), ...(normalize !== undefined ? { normalize } : {}), ...this.#adapterOf(row) }));
    const embeddings = await this.#onReplica(async (replica) => {
      await this.#registerAdapters(replica, rows);
      return replica.embed(requests);
    });
    return rows.map((row, index) => ({ ...row, embedding: embeddings[index].vector, promptTokens: embeddings[index].promptTokens }));
  }

  /** A row's adapter column, for its request. */
  #adapterOf(row: Row): { adapter?: string } {
    const adapter = row.adapter;
    return adapter === undefined || adapter === null ? {} : { adapter: adapter as string };
  }

  /** Registers the rows' adapters the replica does not know from adapterDirectory (a rebuilt replica learns them again). */
  async #registerAdapters(replica: ModelReplica, rows: Row[]): Promise<void> {
    const directory = this.#options.adapterDirectory;
    const known = new Set(replica.adapters);
    for (const [index, row] of rows.entries()) {
      const name = row.adapter;
      if (name === undefined || name === null || known.has(name as string)) continue;
      if (typeof name !== 'string') throw new InvalidArgumentError(`row ${index}: adapter must be a name, got ${typeof name}`, 'ERR_ADAPTER');
      if (directory === undefined) continue; // the replica names what it knows
      if (!/^[A-Za-z0-9_][A-Za-z0-9._-]*$/.test(name) || name.includes('..')) throw new InvalidArgumentError(`row ${index}: adapter ${JSON.stringify(name)} is not a plain name (letters, digits, '.', '_', '-'), so it cannot be looked up in adapterDirectory`, 'ERR_ADAPTER');
      await replica.addAdapter(name, join(directory, name));
      known.add(name);
    }
  }

  /** A classification job's batch: each row gains its label, the labels' probabilities and its prompt's length. */
  async #classify(rows: Row[]): Promise<Row[]> {
    const requests = rows.map((row, index) => ({ tokens: this.#prompt(row, index), ...this.#adapterOf(row) }));
    const results = await this.#onReplica(async (replica) => {
      await this.#registerAdapters(replica, rows);
      return replica.classify(requests);
    });
    return rows.map((row, index) => ({ ...row, label: results[index].label, probabilities: results[index].probabilities, promptTokens: results[index].promptTokens }));
  }

  /** Every row's search at once, so that all their beams share the replica's steps. */
  async #beamSearch(rows: Row[], options: BeamSearchOptions): Promise<Row[]> {
    const record = this.#options.rowErrors === 'record';
    const requests = rows.map((row, index) => {
      try {
        const stopTokens = this.#options.ignoreEos ? { stopTokens: [] } : this.#stopTokensOf(row, index);
        const maxNewTokens = (row.maxNewTokens as number | undefined) ?? this.#options.maxNewTokens;
        return { tokens: this.#prompt(row, index), ...options, ...(maxNewTokens !== undefined ? { maxNewTokens } : {}), ...stopTokens, ...this.#adapterOf(row) };
      } catch (error) {
        if (!record) throw error;
        return error as Error;
      }
    });
    const outcomes = await this.#onReplica(async (replica) => {
      await this.#registerAdapters(replica, rows);
      const settled = await Promise.allSettled(requests.map((request) => (request instanceof Error ? Promise.reject(request) : replica.beamSearch(request))));
      const failure = settled.find((outcome) => outcome.status === 'rejected' && (!record || LLMEngine.#isRankDeath(outcome.reason)));
      if (failure) throw (failure as PromiseRejectedResult).reason;
      return settled.map((outcome) => (outcome.status === 'fulfilled' ? outcome.value : (outcome.reason as Error)));
    });
    return outcomes.map((outcome: BeamSearchResult | Error, index): Row => {
      if (outcome instanceof Error) {
        const error = outcome as Error & { code?: string };
        return { ...rows[index], generatedTokens: [], ...(this.#tokenizer ? { generatedText: '' } : {}), finishReason: 'error', promptTokens: 0, beams: [], error: `${error.code ?? error.name}: ${error.message}` };
      }
      const beams = outcome.beams.map((beam) => ({ ...beam, ...(this.#tokenizer ? { text: this.#textColumns(beam.tokens, undefined).generatedText } : {}) }));
      const best = outcome.beams[0];
      return {
        ...rows[index],
        generatedTokens: best.tokens,
        ...(this.#tokenizer ? this.#textColumns(best.tokens, undefined) : {}),
        finishReason: best.finishReason,
        promptTokens: outcome.promptTokens,
        beams,
        ...(record ? { error: null } : {}),
      };
    });
  }

  /** A rank's death, whether seen by a compiled graph here or by a call's result from the driver. */
  static #isRankDeath(error: unknown): error is Error {
    return error instanceof ActorDiedError || (error as { code?: string } | undefined)?.code === 'ERR_ACTOR_DIED';
  }

  /** Takes one restart of the budget, or throws `cause` when none is left. */
  #takeRestart(cause: Error): void {
    if (this.#restarts >= (this.#options.maxReplicaRestarts ?? 2)) throw cause;
    this.#restarts++;
  }

  /** A new replica; a rank that dies while the replica starts costs a restart, as one dying later does. */
  async #startReplica(): Promise<ModelReplica> {
    for (;;) {
      try {
        return await ModelReplica.create(this.#options);
      } catch (error) {
        if (!LLMEngine.#isRankDeath(error)) throw error;
        this.#takeRestart(error);
      }
    }
  }

  /**
   * Counters since this engine started, for the data layer's progress lines (an actor pool sums
   * them over its engines): prompt tokens read, those copied from cached prefixes instead, tokens
   * generated, sequences preempted.
   */
  metrics(): Record<string, number> {
    const current = this.#replica ? replicaCounters(this.#replica) : {};
    const totals: Record<string, number> = { ...this.#replacedTotals };
    for (const [name, value] of Object.entries(current)) totals[name] = (totals[name] ?? 0) + value;
    return totals;
  }

  async #rebuild(dead: ModelReplica, cause: Error): Promise<void> {
    if (this.#replica !== dead) return; // another batch already rebuilt it
    if (!this.#rebuilding) {
      this.#takeRestart(cause);
      this.#rebuilding = (async () => {
        for (const [name, value] of Object.entries(replicaCounters(dead))) this.#replacedTotals[name] = (this.#replacedTotals[name] ?? 0) + value;
        await dead.close();
        return this.#startReplica();
      })();
    }
    const rebuilding = this.#rebuilding;
    try {
      this.#replica = await rebuilding;
    } finally {
      if (this.#rebuilding === rebuilding) this.#rebuilding = undefined;
    }
  }

  async call(rows: Row[]): Promise<Row[]> {
    await this.ready;
    if (this.#options.task === 'embed') return this.#embed(rows);
    if (this.#options.task === 'classify') return this.#classify(rows);
    if (this.#options.beamSearch) return this.#beamSearch(rows, this.#options.beamSearch);
    const samples = this.#options.samplesPerPrompt ?? 1;
    const record = this.#options.rowErrors === 'record';
    // Each row's requests (one per sample), or with rowErrors 'record' the error that keeps it from having any.
    const built = rows.map((row, index) => {
      try {
        const stops = this.#stopStrings(row, index);
        return { stops, requests: this.#requestsOf(row, index, samples, stops) };
      } catch (error) {
        if (!record) throw error;
        return { stops: undefined, requests: [] as GenerateRequest[], error: error as Error };
      }
    });
    const outcomes = await this.#onReplica(async (replica) => {
      await this.#registerAdapters(replica, rows);
      if (!record) {
        const generations = await replica.generate(built.flatMap((entry) => entry.requests));
        return built.map((_, index) => ({ generations: generations.slice(index * samples, (index + 1) * samples) }) as { generations?: Generation[]; error?: Error });
      }
      // Each row on its own, so that one failing row (a constraint that throws, a prompt over the cache) fails alone; all still batch together in the replica.
      const settled = await Promise.allSettled(built.map((entry) => (entry.error ? Promise.reject(entry.error) : replica.generate(entry.requests))));
      const death = settled.find((outcome) => outcome.status === 'rejected' && LLMEngine.#isRankDeath(outcome.reason));
      if (death) throw (death as PromiseRejectedResult).reason;
      return settled.map((outcome) => (outcome.status === 'fulfilled' ? { generations: outcome.value } : { error: outcome.reason as Error }));
    });
    return outcomes.flatMap((outcome, index): Row[] => {
      const row = rows[index];
      if (outcome.error) {
        const error = outcome.error as Error & { code?: string };
        return Array.from({ length: samples }, (_, sample) => ({
          ...row,
          ...(samples > 1 ? { sample } : {}),
          generatedTokens: [],
          ...(this.#tokenizer ? { generatedText: '' } : {}),
          finishReason: 'error',
          promptTokens: 0,
          error: `${error.code ?? error.name}: ${error.message}`,
        }));
      }
      return outcome.generations!.map((generation, sample) => ({
        ...row,
        ...(samples > 1 ? { sample } : {}),
        generatedTokens: generation.tokens,
        ...(this.#tokenizer ? this.#textColumns(generation.tokens, built[index].stops) : {}),
        finishReason: generation.finishReason,
        promptTokens: generation.promptTokens,
        ...(generation.logprobs ? { generatedLogprobs: generation.logprobs } : {}),
        ...(generation.promptLogprobs ? { promptLogprobs: generation.promptLogprobs } : {}),
        ...(generation.promptTopLogprobs ? { promptTopLogprobs: generation.promptTopLogprobs.map((entries) => this.#namedAlternatives(entries)) } : {}),
        ...(generation.topLogprobs ? { generatedTopLogprobs: generation.topLogprobs.map((entries) => this.#namedAlternatives(entries)) } : {}),
        ...(record ? { error: null } : {}),
      }));
    });
  }

  /** A row's generate requests, one per sample. */
  #requestsOf(row: Row, index: number, samples: number, stops: string[] | undefined): GenerateRequest[] {
    const tokens = this.#prompt(row, index);
    const sampling = (row.sampling as SamplingParameters | undefined) ?? this.#options.sampling;
    if (samples > 1 && !((sampling?.temperature ?? 0) > 0)) {
      throw new InvalidArgumentError(`row ${index}: samplesPerPrompt ${samples} needs sampling with a temperature above 0 (greedy would give ${samples} copies of one text)`, 'ERR_SAMPLING');
    }
    const choices = this.#choices;
    const stopTokens = this.#options.ignoreEos ? { stopTokens: [] } : this.#stopTokensOf(row, index);
    const guided = this.#guidedConstraint(row, index, stopTokens.stopTokens ?? this.#replica!.stopTokens);
    const priority = (row.priority as number | undefined) ?? this.#options.priority;
    return Array.from({ length: samples }, (_, sample) => ({
      tokens,
      // A choice needs its own tokens and, where it could go on, a stop token.
      maxNewTokens: (row.maxNewTokens as number | undefined) ?? this.#options.maxNewTokens ?? (choices ? Math.max(...choices.map((choice) => choice.length)) + 1 : undefined),
      ...(guided ? { constraint: guided } : this.#choiceConstraint ? { constraint: this.#choiceConstraint } : {}),
      ...((row.minNewTokens ?? this.#options.minNewTokens) !== undefined ? { minNewTokens: (row.minNewTokens as number | undefined) ?? this.#options.minNewTokens } : {}),
      sampling: samples > 1 ? { ...sampling, seed: (sampling?.seed ?? 0) + sample } : sampling,
      ...(stops ? { stop: this.#stopWhen(stops) } : {}),
      ...(this.#options.logprobs ? { logprobs: true } : {}),
      ...stopTokens,
      ...this.#adapterOf(row),
      ...(this.#options.promptLogprobs ? { promptLogprobs: true } : {}),
      ...(this.#options.promptTopLogprobs ? { promptTopLogprobs: this.#options.promptTopLogprobs } : {}),
      ...(this.#options.topLogprobs ? { topLogprobs: this.#options.topLogprobs } : {}),
      ...(priority !== undefined ? { priority } : {}),
    }));
  }
}

export const RemoteLLMEngine = remote(import.meta, LLMEngine);

/**
 * A function from a dataset of prompts to a dataset of generations: each row gains
 * `generatedTokens`, `finishReason` and `promptTokens` (and `generatedText` for text prompts and
 * conversations).
 */
export function buildLLMProcessor(options: LLMProcessorOptions): (dataset: Dataset) => Dataset {
  if (typeof options !== 'object' || options === null || typeof options.checkpoint !== 'string') {
    throw new InvalidArgumentError('buildLLMProcessor() needs options with a checkpoint path');
  }
  const { preprocess, postprocess, concurrency = 1, batchSize = 64, batchesPerReplica, replicaIdleTimeoutMs = 60_000, replicaStartTimeoutMs = 30 * 60_000, ...engine } = options;
  if (engine.promptColumn !== undefined && engine.messagesColumn !== undefined) {
    throw new InvalidArgumentError(`give promptColumn ('${engine.promptColumn}') or messagesColumn ('${engine.messagesColumn}'), not both`);
  }
  if ((engine.chatTemplate !== undefined || engine.chatTemplateVariables !== undefined) && engine.messagesColumn === undefined) {
    throw new InvalidArgumentError('chatTemplate and chatTemplateVariables apply to a messagesColumn: name one');
  }
  if (engine.maxReplicaRestarts !== undefined && !(Number.isInteger(engine.maxReplicaRestarts) && engine.maxReplicaRestarts >= 0)) {
    throw new InvalidArgumentError(`maxReplicaRestarts must be an integer >= 0, got ${String(engine.maxReplicaRestarts)}`);
  }
  if (engine.sampling !== undefined) checkSampling(engine.sampling, 'buildLLMProcessor()');
  if (engine.stop !== undefined) {
    if (!Array.isArray(engine.stop) || engine.stop.some((text) => typeof text !== 'string' || text.length === 0)) throw new InvalidArgumentError('stop must be a list of non-empty strings');
    if (engine.promptColumn === undefined && engine.messagesColumn === undefined) throw new InvalidArgumentError('stop strings need text: give a promptColumn or messagesColumn (for token ids, use stopTokens)');
  }
  if (engine.logprobs !== undefined && typeof engine.logprobs !== 'boolean') throw new InvalidArgumentError('logprobs must be a boolean');
  if (engine.promptLogprobs !== undefined && typeof engine.promptLogprobs !== 'boolean') throw new InvalidArgumentError('promptLogprobs must be a boolean');
  for (const name of ['topLogprobs', 'promptTopLogprobs'] as const) {
    const k = engine[name];
    if (k !== undefined && (!Number.isInteger(k) || k < 1 || k > 20)) throw new InvalidArgumentError(`${name} must be an integer from 1 to 20, got ${String(k)}`);
  }
  if (engine.truncatePromptTokens !== undefined && (!Number.isInteger(engine.truncatePromptTokens) || engine.truncatePromptTokens < 1)) {
    throw new InvalidArgumentError(`truncatePromptTokens must be a positive integer, got ${String(engine.truncatePromptTokens)}`);
  }
  for (const flag of ['includeStopText', 'ignoreEos'] as const) {
    if (engine[flag] !== undefined && typeof engine[flag] !== 'boolean') throw new InvalidArgumentError(`${flag} must be a boolean`);
  }
  if (engine.choices !== undefined) {
    if (!Array.isArray(engine.choices) || engine.choices.length === 0 || engine.choices.some((choice) => typeof choice !== 'string' || choice.length === 0)) {
      throw new InvalidArgumentError('choices must be a non-empty list of non-empty strings', 'ERR_CONSTRAINT');
    }
    if (engine.promptColumn === undefined && engine.messagesColumn === undefined) throw new InvalidArgumentError('choices are text: give a promptColumn or messagesColumn', 'ERR_CONSTRAINT');
  }
  if (engine.rowErrors !== undefined && engine.rowErrors !== 'fail' && engine.rowErrors !== 'record') throw new InvalidArgumentError(`rowErrors must be 'fail' or 'record', got ${JSON.stringify(engine.rowErrors)}`);
  if (engine.reasoning !== undefined && typeof engine.reasoning !== 'boolean' && (typeof engine.reasoning !== 'object' || engine.reasoning === null)) {
    throw new InvalidArgumentError("reasoning must be true or { start, end } markers (default '<think>' and '</think>')", 'ERR_REASONING');
  }
  if (engine.guidedDecoding !== undefined) {
    if (engine.choices !== undefined) throw new InvalidArgumentError('give choices or guidedDecoding, not both', 'ERR_CONSTRAINT');
    checkGuidedDecoding(engine.guidedDecoding);
  }
  if (engine.priority !== undefined && !Number.isInteger(engine.priority)) throw new InvalidArgumentError(`priority must be an integer (lower goes first), got ${String(engine.priority)}`);
  if (engine.samplesPerPrompt !== undefined && !(Number.isInteger(engine.samplesPerPrompt) && engine.samplesPerPrompt >= 1)) {
    throw new InvalidArgumentError(`samplesPerPrompt must be a positive integer, got ${String(engine.samplesPerPrompt)}`);
  }
  if (engine.task !== undefined && engine.task !== 'generate' && engine.task !== 'embed' && engine.task !== 'classify') throw new InvalidArgumentError(`task must be 'generate', 'embed' or 'classify', got ${JSON.stringify(engine.task)}`);
  if ((engine.task === 'embed' || engine.task === 'classify') && engine.messagesColumn !== undefined) throw new InvalidArgumentError(`task '${engine.task}' reads a promptColumn or a tokensColumn, not conversations`);
  if (engine.task === 'embed') {
    if (engine.pooling !== undefined && engine.pooling !== 'last' && engine.pooling !== 'mean') throw new InvalidArgumentError(`pooling must be 'last' or 'mean', got ${JSON.stringify(engine.pooling)}`);
  } else if (engine.pooling !== undefined || engine.normalize !== undefined) {
    throw new InvalidArgumentError("pooling and normalize apply to task 'embed'");
  }
  if (engine.beamSearch !== undefined) {
    checkBeamSearch(engine.beamSearch);
    if (engine.task !== undefined && engine.task !== 'generate') throw new InvalidArgumentError(`beamSearch generates: task '${engine.task}' does not`, 'ERR_BEAM_SEARCH');
    if (engine.sampling !== undefined) throw new InvalidArgumentError('beamSearch picks by log-probability alone: drop sampling', 'ERR_BEAM_SEARCH');
    const refused = (['guidedDecoding', 'choices', 'stop', 'minNewTokens', 'logprobs', 'topLogprobs', 'promptLogprobs', 'promptTopLogprobs', 'samplesPerPrompt', 'reasoning'] as const).filter((name) => engine[name] !== undefined);
    if (refused.length > 0) throw new InvalidArgumentError(`beamSearch does not take ${refused.join(', ')}`, 'ERR_BEAM_SEARCH');
  }
  const steps = engine.stepsInFlight ?? engine.pipelineParallel ?? 1;
  const interleaved = batchesPerReplica ?? Math.max(2, 2 * steps);
  return (dataset: Dataset) => {
    let result = preprocess ? dataset.map(preprocess) : dataset;
    result = result.mapBatches(LLMEngine, {
      constructorArgs: [engine],
      batchSize,
      batchFormat: 'rows',
      concurrency,
      // The engine holds its ranks' CPUs (and GPUs), so that a replica is scheduled whole or not at all.
      numCpus: (engine.tensorParallel ?? 1) * (engine.pipelineParallel ?? 1) * (engine.numCpusPerRank ?? 1),
      ...(engine.device === 'cuda' ? { numGpus: (engine.tensorParallel ?? 1) * (engine.pipelineParallel ?? 1) } : {}),
      maxConcurrency: interleaved,
      maxTasksInFlightPerActor: interleaved,
      actorIdleTimeoutMs: replicaIdleTimeoutMs,
      actorStartTimeoutMs: replicaStartTimeoutMs,
    });
    return postprocess ? result.map(postprocess) : result;
  };
}

/** The counters of a replica an engine reports. */
function replicaCounters(replica: ModelReplica): Record<string, number> {
  const stats = replica.stats();
  return {
    promptTokens: stats.promptTokens,
    cachedPromptTokens: stats.reusedPromptTokens,
    generatedTokens: stats.generatedTokens,
    preemptions: stats.preemptions,
    // Speculation's, where it proposes: how many proposed tokens the model kept.
    ...(stats.draftTokens > 0 ? { draftTokens: stats.draftTokens, acceptedDraftTokens: stats.acceptedDraftTokens } : {}),
  };
}
