/**
 * An OpenAI-compatible server over a sharded model (as vLLM's and Ray Serve LLM's): a serving
 * application whose replicas each hold a ModelReplica (its ranks, tensor × pipeline parallel)
 * and answer /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models, streamed as
 * server-sent events where asked. Requests from every client share each replica's steps
 * (continuous batching); `response_format` JSON schemas become guided decoding.
 */
import { existsSync, readdirSync } from 'node:fs';
import { basename, join } from 'node:path';
import { InvalidArgumentError } from '../errors.js';
import { remote } from '../core/registry.js';
import { deployment, type Application } from '../serve/deployment.js';
import { HttpError, HttpResponse, type HttpRequest } from '../serve/http-messages.js';
import type { DeploymentOptions } from '../serve/options.js';
import { multiplexed, type MultiplexedLoader } from '../serve/multiplex.js';
import { ChatTemplate, type ChatMessage } from './chat-template.js';
import { checkpointDirectory } from './config.js';
import { TokenGuide } from './guided/token-guide.js';
import type { GuidedDecoding } from './guided/guided-decoding.js';
import { ModelReplica, type GenerateRequest, type ModelReplicaOptions } from './replica.js';
import type { SamplingParameters } from './sampling.js';
import { Tokenizer } from './tokenizer.js';
import type { BeamSearchResult } from './beam-search.js';
import { TOOL_CALL_PARSERS, guidedToolCalls, heldBackFrom, parseToolCalls, toolCall, toolGuidedDecoding, toolRequestOf, type ToolCall, type ToolCallParser, type ToolRequest } from './tool-calls.js';

export interface OpenAIAppOptions extends ModelReplicaOptions {
  /** The model's name in requests and answers (default: the checkpoint directory's name). */
  modelId?: string;
  /** tokenizer.json's path or directory (default: the checkpoint's directory). */
  tokenizer?: string;
  /** A chat template's Jinja source, in place of the checkpoint's. */
  chatTemplate?: string;
  /** Tokens a request generates when it names no max_tokens (default 256). */
  defaultMaxTokens?: number;
  /**
   * LoRA adapters served on demand (vLLM's dynamic LoRA): a request whose `model` names a
   * subdirectory here with an adapter (adapter_config.json, adapter_model.safetensors) runs with it.
   * Adapters given in `adapters` are served by their names too. Requests are routed by `model`, so
   * those for one adapter go to replicas that have it loaded (see serve's model multiplexing).
   */
  adapterDirectory?: string;
  /** The deployment's options: replicas, autoscaling, maxOngoingRequests (default 64), actorOptions. */
  deployment?: DeploymentOptions;
  /**
   * How the model writes a tool call (vLLM's --tool-call-parser), for requests with `tools` and
   * tool_choice 'auto': 'hermes' (<tool_call>{"name", "arguments"}</tool_call>, Qwen's and
   * Hermes' templates) or 'json' (the answer is a JSON call or list of calls, Llama 3's). Without
   * it, tools are served with tool_choice 'required' or a named function (guided decoding).
   */
  toolCallParser?: ToolCallParser;
}

/** An adapter's name as a request's `model` may give it: a plain directory name. */
const PLAIN_NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]*$/;

interface Completion {
  text: string;
  tokens: number;
  promptTokens: number;
  finishReason: 'stop' | 'length' | 'tool_calls';
  /** A chat answer's tool calls, with the text beside them (null: none). */
  toolCalls?: ToolCall[];
  content?: string | null;
  /** The generated tokens' summed log-probability, where best_of ranks candidates by it. */
  cumulativeLogprob?: number;
}

/**
 * A token as an answer's logprobs report it: its log-probability, and the likeliest alternatives
 * there (null for an echoed prompt's first token, which nothing came before).
 */
interface TokenLogprob {
  token: number;
  logprob: number | null;
  top: Array<{ token: number; logprob: number }> | null;
}

/** A piece of an answer's text as it is streamed, with the tokens that completed it (when logprobs are asked). */
interface Piece {
  text: string;
  logprobs: TokenLogprob[];
  /** Tool calls as a chat stream's deltas carry them: the first of a call with its id and name. */
  toolCalls?: Array<{ index: number; id?: string; name?: string; arguments: string }>;
}

/** What a request asks of its choices: how many, and the alternatives reported per token (undefined: no logprobs). */
interface ChoiceOptions {
  n: number;
  topLogprobs: number | undefined;
  /** Completions: the prompt goes before each answer, with its logprobs when they are asked (echo). */
  echo?: boolean;
  /** Completions: candidates drawn per prompt, the n likeliest of them answered (best_of, where above n). */
  bestOf?: number;
  /** Logprobs name tokens `token_id:<id>` (vLLM's return_tokens_as_token_ids). */
  tokenIds?: boolean;
}

/** A completion's prompt: its token ids, and its text where it came as one. */
interface Prompt {
  tokens: number[];
  text?: string;
}

/** What the server answers, for the errors that name it. */
const SERVED = 'POST /v1/chat/completions, /v1/completions, /v1/embeddings, /tokenize, /detokenize; GET /v1/models';

/** The most choices one request may ask for (n). */
const MOST_CHOICES = 16;
/** The most prompts one completions request may batch. */
const MOST_PROMPTS = 256;

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const now = () => Math.floor(Date.now() / 1000);
let counter = 0;
const requestId = (kind: string) => `${kind}-${process.pid.toString(36)}${(counter++).toString(36)}${Date.now().toString(36)}`;

function field<T>(body: Record<string, unknown>, name: string, check: (value: unknown) => boolean, expected: string): T | undefined {
  const value = body[name];
  if (value === undefined || value === null) return undefined;
  if (!check(value)) throw new HttpError(400, `${name} must be ${expected}, got ${JSON.stringify(value)}`);
  return value as T;
}

const isNumber = (value: unknown) => typeof value === 'number' && Number.isFinite(value);
const isWhole = (value: unknown) => Number.isInteger(value) && (value as number) >= 1;

/** An OpenAI request's sampling fields as a replica's. */
function samplingOf(body: Record<string, unknown>): SamplingParameters {
  const sampling: SamplingParameters = {};
  const temperature = field<number>(body, 'temperature', (value) => isNumber(value) && (value as number) >= 0 && (value as number) <= 2, 'a number from 0 to 2');
  if (temperature !== undefined) sampling.temperature = temperature;
  const topP = field<number>(body, 'top_p', (value) => isNumber(value) && (value as number) > 0 && (value as number) <= 1, 'a number above 0, at most 1');
  if (topP !== undefined) sampling.topP = topP;
  const topK = field<number>(body, 'top_k', (value) => Number.isInteger(value) && (value as number) >= -1, 'a whole number (-1: all)');
  if (topK !== undefined && topK > 0) sampling.topK = topK;
  const seed = field<number>(body, 'seed', Number.isInteger, 'a whole number');
  if (seed !== undefined) sampling.seed = seed;
  const presence = field<number>(body, 'presence_penalty', (value) => isNumber(value) && Math.abs(value as number) <= 2, 'a number from -2 to 2');
  if (presence !== undefined) sampling.presencePenalty = presence;
  const frequency = field<number>(body, 'frequency_penalty', (value) => isNumber(value) && Math.abs(value as number) <= 2, 'a number from -2 to 2');
  if (frequency !== undefined) sampling.frequencyPenalty = frequency;
  // vLLM's extra sampling fields.
  const minP = field<number>(body, 'min_p', (value) => isNumber(value) && (value as number) >= 0 && (value as number) <= 1, 'a number from 0 to 1');
  if (minP !== undefined) sampling.minP = minP;
  const repetition = field<number>(body, 'repetition_penalty', (value) => isNumber(value) && (value as number) > 0, 'a number above 0');
  if (repetition !== undefined) sampling.repetitionPenalty = repetition;
  const bias = field<Record<string, unknown>>(body, 'logit_bias', (value) => typeof value === 'object' && !Array.isArray(value), 'an object of token ids to biases');
  if (bias !== undefined) {
    sampling.logitBias = {};
    for (const [token, value] of Object.entries(bias)) {
      if (!/^[0-9]+$/.test(token) || !isNumber(value) || Math.abs(value as number) > 100) throw new HttpError(400, `logit_bias maps token ids to numbers from -100 to 100, got ${JSON.stringify(token)}: ${JSON.stringify(value)}`);
      sampling.logitBias[Number(token)] = value as number;
    }
  }
  return sampling;
}

function stopStringsOf(body: Record<string, unknown>): string[] {
  const stop = body.stop;
  if (stop === undefined || stop === null) return [];
  const list = typeof stop === 'string' ? [stop] : stop;
  if (!Array.isArray(list) || list.length > 4 || list.some((item) => typeof item !== 'string' || item.length === 0)) {
    throw new HttpError(400, 'stop must be a string or a list of at most 4 non-empty strings');
  }
  return list as string[];
}

/** The guided decoding a chat request's response_format asks for, if any. */
function guidedOf(body: Record<string, unknown>): GuidedDecoding | undefined {
  const format = body.response_format as { type?: unknown; json_schema?: { schema?: unknown } } | undefined;
  if (format === undefined || format === null) return undefined;
  if (typeof format !== 'object') throw new HttpError(400, 'response_format must be an object');
  if (format.type === 'text') return undefined;
  if (format.type === 'json_object') return { jsonObject: true };
  if (format.type === 'json_schema') {
    const schema = format.json_schema?.schema;
    if (typeof schema !== 'object' || schema === null) throw new HttpError(400, 'response_format.json_schema.schema must be a JSON schema object');
    return { json: schema };
  }
  throw new HttpError(400, `response_format.type must be 'text', 'json_object' or 'json_schema', got ${JSON.stringify(format.type)}`);
}

/** Server-sent events of one answer, as OpenAI's streaming sends them. */
function event(data: unknown): string {
  return `data: ${typeof data === 'string' ? data : JSON.stringify(data)}\n\n`;
}

export class OpenAIServer {
  readonly #options: OpenAIAppOptions;
  readonly #modelId: string;
  #replica: ModelReplica | undefined;
  #tokenizer: Tokenizer | undefined;
  #template: ChatTemplate | undefined;
  readonly #guides = new Map<string, TokenGuide>();
  /** The adapters this replica served lately, as its routers learn them (the ranks keep their own). */
  readonly #adapterUse: MultiplexedLoader<string>;

  constructor(options: OpenAIAppOptions) {
    this.#options = options;
    this.#modelId = options.modelId ?? basename(checkpointDirectory(options.checkpoint));
    this.#adapterUse = multiplexed((name) => this.#registerAdapter(name), { maxModelsPerReplica: options.maxLoadedAdapters ?? 8 });
  }

  /** Makes adapter `name` known to the ranks (from adapterDirectory), or throws 404 where none is. */
  async #registerAdapter(name: string): Promise<string> {
    const replica = this.#replica!;
    if (replica.adapters.includes(name)) return name;
    const directory = this.#options.adapterDirectory;
    if (directory === undefined || !PLAIN_NAME.test(name) || name.includes('..') || !existsSync(join(directory, name, 'adapter_config.json'))) {
      throw new HttpError(404, `model ${JSON.stringify(name)} is not served here (this server has ${this.#modelNames().join(', ')}${directory === undefined ? '' : `, and the adapters under ${directory}`})`);
    }
    try {
      await replica.addAdapter(name, join(directory, name));
    } catch (error) {
      throw new HttpError(400, `adapter ${name} cannot be served: ${(error as Error).message}`);
    }
    return name;
  }

  #modelNames(): string[] {
    return [this.#modelId, ...(this.#replica?.adapters ?? [])];
  }

  /** The adapter a request's `model` names (undefined: the base model). */
  async #adapterOf(model: unknown): Promise<string | undefined> {
    if (model === undefined || model === null || model === this.#modelId) return undefined;
    if (typeof model !== 'string' || model.length === 0) throw new HttpError(400, `model must be a model's name, got ${JSON.stringify(model)}`);
    return this.#adapterUse(model);
  }

  /** Loads the model's ranks, its tokenizer and its chat template (if it has one). */
  async initialize(): Promise<void> {
    const { modelId: _id, tokenizer, chatTemplate, defaultMaxTokens: _max, deployment: _deployment, toolCallParser: _parser, ...replicaOptions } = this.#options;
    const directory = checkpointDirectory(this.#options.checkpoint);
    this.#tokenizer = await Tokenizer.load(tokenizer ?? directory);
    try {
      this.#template = ChatTemplate.load(tokenizer ? checkpointDirectory(tokenizer) : directory, { source: chatTemplate });
    } catch (error) {
      // A base model has no chat template: its completions still work, chat requests are refused.
      if (chatTemplate !== undefined) throw error;
    }
    this.#replica = await ModelReplica.create(replicaOptions);
  }

  async checkHealth(): Promise<void> {
    if (!this.#replica) throw new Error('the model is not loaded');
  }

  /**
   * /v1/chat/completions by handle, not HTTP (buildDeploymentProcessor, a composing deployment):
   * a request body in, the answer's JSON out. Not streamed; a request it refuses throws the
   * HttpError whose message the HTTP answer would carry.
   */
  chatCompletions(body: Record<string, unknown>): Promise<unknown> {
    return this.#byHandle('/v1/chat/completions', body);
  }

  /** /v1/completions by handle (see chatCompletions). */
  completions(body: Record<string, unknown>): Promise<unknown> {
    return this.#byHandle('/v1/completions', body);
  }

  /** /v1/embeddings by handle (see chatCompletions). */
  embeddings(body: Record<string, unknown>): Promise<unknown> {
    return this.#byHandle('/v1/embeddings', body);
  }

  async #byHandle(route: string, body: Record<string, unknown>): Promise<unknown> {
    if (typeof body !== 'object' || body === null || Array.isArray(body)) throw new HttpError(400, 'the request body must be a JSON object');
    if (body.stream === true) throw new HttpError(400, `${route} by handle answers whole: drop stream (or call the HTTP route)`);
    const adapter = await this.#adapterOf(body.model);
    const model = adapter ?? this.#modelId;
    if (route === '/v1/embeddings') return this.#embed(body, model, adapter);
    for await (const answer of route === '/v1/chat/completions' ? this.#chat(body, model, adapter) : this.#complete(body, model, adapter)) {
      if (answer instanceof HttpResponse) return answer.body;
    }
    throw new HttpError(500, `${route} gave no answer`);
  }

  async *fetch(request: HttpRequest): AsyncGenerator<unknown, void, undefined> {
    const route = request.routePath.replace(/\/+$/, '');
    if (request.method === 'GET' && route === '/v1/models') {
      const created = now();
      const adapters = [...new Set([...(this.#replica?.adapters ?? []), ...this.#servableAdapters()])].sort();
      yield new HttpResponse({
        object: 'list',
        data: [
          { id: this.#modelId, object: 'model', created, owned_by: 'trellis' },
          ...adapters.map((name) => ({ id: name, object: 'model', created, owned_by: 'trellis', parent: this.#modelId, root: this.#modelId })),
        ],
      });
      return;
    }
    if (request.method !== 'POST') throw new HttpError(request.method === 'GET' ? 404 : 405, `${request.method} ${request.path} is not served (${SERVED})`);
    const body = request.json<Record<string, unknown>>();
    if (typeof body !== 'object' || body === null || Array.isArray(body)) throw new HttpError(400, 'the request body must be a JSON object');
    if (body.use_beam_search !== undefined && typeof body.use_beam_search !== 'boolean') throw new HttpError(400, `use_beam_search must be a boolean, got ${JSON.stringify(body.use_beam_search)}`);
    if (route === '/tokenize' || route === '/v1/tokenize') {
      yield new HttpResponse(this.#tokenize(body));
      return;
    }
    if (route === '/detokenize' || route === '/v1/detokenize') {
      yield new HttpResponse(this.#detokenize(body));
      return;
    }
    if (!['/v1/chat/completions', '/v1/completions', '/v1/embeddings'].includes(route)) {
      throw new HttpError(404, `${request.path} is not served (${SERVED})`);
    }
    const adapter = await this.#adapterOf(body.model);
    const model = adapter ?? this.#modelId;
    switch (route) {
      case '/v1/chat/completions':
        yield* this.#chat(body, model, adapter);
        return;
      case '/v1/completions':
        yield* this.#complete(body, model, adapter);
        return;
      case '/v1/embeddings':
        yield new HttpResponse(await this.#embed(body, model, adapter));
        return;
      default:
        throw new HttpError(404, `${request.path} is not served (${SERVED})`);
    }
  }

  /**
   * vLLM's /tokenize: a prompt's token ids (`add_special_tokens`, default true), or a
   * conversation's as the chat template renders it (`messages`, `add_generation_prompt`, default
   * true, and `tools` as a chat request shows them), with their count and the model's positions.
   */
  #tokenize(body: Record<string, unknown>): unknown {
    const tokenizer = this.#tokenizer!;
    let tokens: number[];
    if (body.messages !== undefined) {
      if (!this.#template) throw new HttpError(400, `model ${this.#modelId} has no chat template: tokenize a prompt`);
      const generationPrompt = field<boolean>(body, 'add_generation_prompt', (value) => typeof value === 'boolean', 'a boolean') ?? true;
      let rendered: string;
      try {
        if (body.tools !== undefined && body.tools !== null && !Array.isArray(body.tools)) throw new InvalidArgumentError('tools must be a list of { type: "function", function: { ... } }');
        rendered = this.#template.render(body.messages as ChatMessage[], { addGenerationPrompt: generationPrompt, ...(Array.isArray(body.tools) ? { variables: { tools: body.tools } } : {}) });
      } catch (error) {
        throw new HttpError(400, (error as Error).message);
      }
      tokens = tokenizer.encode(rendered, { addSpecialTokens: false });
    } else {
      if (typeof body.prompt !== 'string') throw new HttpError(400, 'tokenize takes a prompt (a string) or messages (a conversation)');
      const special = field<boolean>(body, 'add_special_tokens', (value) => typeof value === 'boolean', 'a boolean') ?? true;
      tokens = tokenizer.encode(body.prompt, { addSpecialTokens: special });
    }
    return { count: tokens.length, max_model_len: this.#replica!.config.maxPositions, tokens };
  }

  /** vLLM's /detokenize: the text of a list of token ids. */
  #detokenize(body: Record<string, unknown>): unknown {
    const tokenizer = this.#tokenizer!;
    const tokens = body.tokens;
    if (!Array.isArray(tokens) || tokens.some((token) => !Number.isInteger(token) || token < 0 || token >= tokenizer.vocabSize)) {
      throw new HttpError(400, `tokens must be a list of token ids from 0 to ${tokenizer.vocabSize - 1}`);
    }
    return { prompt: tokenizer.decode(tokens as number[]) };
  }

  #maxTokens(body: Record<string, unknown>): number {
    return field<number>(body, 'max_completion_tokens', isWhole, 'a whole number from 1') ?? field<number>(body, 'max_tokens', isWhole, 'a whole number from 1') ?? this.#options.defaultMaxTokens ?? 256;
  }

  /** The adapters under adapterDirectory (each a folder with adapter_config.json). */
  #servableAdapters(): string[] {
    const directory = this.#options.adapterDirectory;
    if (directory === undefined) return [];
    try {
      return readdirSync(directory, { withFileTypes: true })
        .filter((entry) => entry.isDirectory() && PLAIN_NAME.test(entry.name) && existsSync(join(directory, entry.name, 'adapter_config.json')))
        .map((entry) => entry.name);
    } catch {
      return [];
    }
  }

  async *#chat(body: Record<string, unknown>, model: string, adapter: string | undefined): AsyncGenerator<unknown, void, undefined> {
    if (!this.#template) throw new HttpError(400, `model ${this.#modelId} has no chat template: use /v1/completions`);
    let tools: ToolRequest | undefined;
    let prompt: string;
    try {
      tools = toolRequestOf(body, this.#options.toolCallParser);
      // The template shows the model its tools (with tool_choice 'none' too: it may not call them, but knows them).
      prompt = this.#template.render(body.messages as ChatMessage[], Array.isArray(body.tools) ? { variables: { tools: body.tools } } : {});
    } catch (error) {
      throw new HttpError(400, (error as Error).message);
    }
    if (tools && tools.choice !== 'auto' && body.response_format !== undefined && body.response_format !== null && (body.response_format as { type?: unknown }).type !== 'text') {
      throw new HttpError(400, 'a tool_choice of required or a named function guides the answer itself: drop response_format');
    }
    const tokens = this.#tokenizer!.encode(prompt, { addSpecialTokens: false });
    const id = requestId('chatcmpl');
    const created = now();
    const options = chatChoices(body);
    const logprobs = (entries: TokenLogprob[] | undefined) => (options.topLogprobs === undefined ? null : { content: (entries ?? []).map((entry) => this.#chatLogprob(entry, options)) });
    let answered: { results: Array<Completion & { logprobs?: TokenLogprob[] }>; usage: Usage };
    if (body.use_beam_search === true) {
      if (body.response_format !== undefined && body.response_format !== null) throw new HttpError(400, 'use_beam_search does not take a response_format');
      if (tools) throw new HttpError(400, 'use_beam_search does not take tools');
      answered = await this.#beamSearch(tokens, body, adapter);
    } else {
      const head = { id, object: 'chat.completion.chunk', created, model };
      const guided = tools ? toolGuidedDecoding(tools) : guidedOf(body);
      const answers = Array.from({ length: options.n }, (_, index) => {
        const answer = this.#generate({ tokens }, body, guided, adapter, options, index);
        return tools ? withToolCalls(answer, tools, this.#options.toolCallParser) : answer;
      });
      if (body.stream === true) {
        yield* eventStream(answers, {
          choicesPerPrompt: options.n,
          first: (index) => ({ ...head, choices: [{ index, delta: { role: 'assistant', content: '' }, finish_reason: null }] }),
          piece: (index, piece) => ({ ...head, choices: [{ index, delta: piece.toolCalls ? { tool_calls: piece.toolCalls.map(toolCallDelta) } : { content: piece.text }, finish_reason: null, ...(options.topLogprobs === undefined ? {} : { logprobs: logprobs(piece.logprobs) }) }] }),
          last: (index, result) => ({ ...head, choices: [{ index, delta: {}, finish_reason: result.finishReason }] }),
          ...(streamUsage(body) ? { usage: (usage: Usage) => ({ ...head, choices: [], usage }) } : {}),
        });
        return;
      }
      const results = await drainAll(answers);
      answered = { results, usage: usageOfAll([results]) };
    }
    yield new HttpResponse({
      id,
      object: 'chat.completion',
      created,
      model,
      choices: answered.results.map((result, index) => ({ index, message: chatMessage(result), finish_reason: result.finishReason, logprobs: logprobs(result.logprobs) })),
      usage: answered.usage,
    });
  }

  async *#complete(body: Record<string, unknown>, model: string, adapter: string | undefined): AsyncGenerator<unknown, void, undefined> {
    const prompts = this.#promptsOf(body.prompt);
    const id = requestId('cmpl');
    const created = now();
    const options = completionChoices(body);
    // Choices in prompt order: prompt p's choice c has index p × n + c (as OpenAI numbers a batch's).
    let answered: { results: Array<Completion & { logprobs?: TokenLogprob[] }>; usage: Usage };
    if (body.use_beam_search === true) {
      if (options.echo) throw new HttpError(400, 'use_beam_search does not take echo');
      if (options.bestOf !== undefined) throw new HttpError(400, 'use_beam_search takes its beams from n, not best_of');
      const searched = await Promise.all(prompts.map((prompt) => this.#beamSearch(prompt.tokens, body, adapter)));
      answered = { results: searched.flatMap((one) => one.results), usage: usageOfAll(searched.map((one) => one.results)) };
    } else if (options.bestOf !== undefined) {
      if (body.stream === true) throw new HttpError(400, `best_of (${options.bestOf}) above n (${options.n}) answers whole: stream must be false`);
      // Every candidate is drawn (seed + index, as n's choices), and each prompt answers with the n
      // of highest summed log-probability, best first; the usage counts every candidate's tokens.
      const candidates = await drainAll(prompts.flatMap((prompt) => Array.from({ length: options.bestOf! }, (_, index) => this.#generate(prompt, body, undefined, adapter, options, index))));
      const groups = byPrompt(candidates, options.bestOf);
      const results = groups.flatMap((group) => group.map((candidate, index) => ({ candidate, index })).sort((a, b) => b.candidate.cumulativeLogprob! - a.candidate.cumulativeLogprob! || a.index - b.index).slice(0, options.n).map(({ candidate }) => candidate));
      answered = { results, usage: usageOfAll(groups) };
    } else {
      const answers = prompts.flatMap((prompt) => Array.from({ length: options.n }, (_, index) => this.#generate(prompt, body, undefined, adapter, options, index)));
      if (body.stream === true) {
        const head = { id, object: 'text_completion', created, model };
        // Text offsets of a streamed choice run on from its earlier pieces.
        const offsets = new Array<number>(answers.length).fill(0);
        yield* eventStream(answers, {
          choicesPerPrompt: options.n,
          piece: (index, piece) => {
            const logprobs = this.#completionLogprobs(piece.logprobs, options, offsets[index]);
            offsets[index] += piece.text.length;
            return { ...head, choices: [{ index, text: piece.text, finish_reason: null, logprobs }] };
          },
          last: (index, result) => ({ ...head, choices: [{ index, text: '', finish_reason: result.finishReason, logprobs: null }] }),
          ...(streamUsage(body) ? { usage: (usage: Usage) => ({ ...head, choices: [], usage }) } : {}),
        });
        return;
      }
      const results = await drainAll(answers);
      answered = { results, usage: usageOfAll(byPrompt(results, options.n)) };
    }
    yield new HttpResponse({
      id,
      object: 'text_completion',
      created,
      model,
      choices: answered.results.map((result, index) => ({ index, text: result.text, finish_reason: result.finishReason, logprobs: this.#completionLogprobs(result.logprobs, options, 0) })),
      usage: answered.usage,
    });
  }

  /** A completion request's prompts: a string, a list of token ids, or a list of either (a batch); a string keeps its text (echo answers with it). */
  #promptsOf(prompt: unknown): Prompt[] {
    const one = (item: unknown): Prompt | undefined => {
      if (typeof item === 'string') return { tokens: this.#tokenizer!.encode(item), text: item };
      if (Array.isArray(item) && item.length > 0 && item.every((token) => Number.isInteger(token) && token >= 0)) return { tokens: item as number[] };
      return undefined;
    };
    const single = one(prompt);
    if (single) return [single];
    const many = Array.isArray(prompt) && prompt.length > 0 && prompt.length <= MOST_PROMPTS ? prompt.map(one) : undefined;
    if (!many || many.some((tokens) => tokens === undefined)) {
      throw new HttpError(400, `prompt must be a string, a list of token ids, or a list of 1 to ${MOST_PROMPTS} of either (a batch)`);
    }
    return many as Prompt[];
  }

  /** A token's text as logprobs name it: its bytes read as UTF-8 (a piece of a character shows as U+FFFD), or a special token's content. */
  #tokenText(token: number): { text: string; bytes: number[] } {
    const tokenizer = this.#tokenizer!;
    const bytes = token < tokenizer.vocabSize ? tokenizer.tokenBytes(token) : undefined;
    if (bytes) return { text: decoder.decode(bytes), bytes: [...bytes] };
    const text = token < tokenizer.vocabSize ? tokenizer.decode([token]) : '';
    return { text, bytes: [...encoder.encode(text)] };
  }

  /** A chat answer's logprobs entry for one token (OpenAI's chat shape). */
  #chatLogprob(entry: TokenLogprob, options: ChoiceOptions): unknown {
    const { text, bytes } = this.#tokenText(entry.token);
    return {
      token: tokenName(entry.token, text, options),
      logprob: entry.logprob,
      bytes,
      top_logprobs: (entry.top ?? []).map((alternative) => {
        const named = this.#tokenText(alternative.token);
        return { token: tokenName(alternative.token, named.text, options), logprob: alternative.logprob, bytes: named.bytes };
      }),
    };
  }

  /** A completion's logprobs (OpenAI's legacy shape), its text offsets counted from `offset`; null where none were asked. */
  #completionLogprobs(entries: TokenLogprob[] | undefined, options: ChoiceOptions, offset: number): unknown {
    const { topLogprobs } = options;
    if (topLogprobs === undefined || !entries) return null;
    const texts = entries.map((entry) => this.#tokenText(entry.token).text);
    const name = (token: number, text: string) => tokenName(token, text, options);
    const textOffset: number[] = [];
    for (const text of texts) {
      textOffset.push(offset);
      offset += text.length;
    }
    // As OpenAI's: the alternatives, and the chosen token beside them where it is not one (up to logprobs + 1).
    const alternatives = (entry: TokenLogprob, text: string) => {
      if (topLogprobs === 0 || entry.top === null || entry.logprob === null) return null;
      const named = Object.fromEntries(entry.top.map((alternative) => [name(alternative.token, this.#tokenText(alternative.token).text), alternative.logprob]));
      if (!(text in named)) named[text] = entry.logprob;
      return named;
    };
    return {
      tokens: entries.map((entry, index) => name(entry.token, texts[index])),
      token_logprobs: entries.map((entry) => entry.logprob),
      top_logprobs: entries.map((entry, index) => alternatives(entry, name(entry.token, texts[index]))),
      text_offset: textOffset,
    };
  }

  async #embed(body: Record<string, unknown>, model: string, adapter: string | undefined): Promise<unknown> {
    const input = body.input;
    const texts = typeof input === 'string' ? [input] : input;
    if (!Array.isArray(texts) || texts.length === 0 || texts.some((text) => typeof text !== 'string')) throw new HttpError(400, 'input must be a string or a list of strings');
    const encoded = (texts as string[]).map((text) => this.#tokenizer!.encode(text));
    const embeddings = await this.#replica!.embed(encoded.map((tokens) => ({ tokens, ...(adapter ? { adapter } : {}) })));
    const promptTokens = embeddings.reduce((sum, embedding) => sum + embedding.promptTokens, 0);
    return {
      object: 'list',
      model,
      data: embeddings.map((embedding, index) => ({ object: 'embedding', index, embedding: [...embedding.vector] })),
      usage: { prompt_tokens: promptTokens, total_tokens: promptTokens },
    };
  }

  /**
   * A beam search (vLLM's use_beam_search, with `n` beams and `length_penalty`): each beam is a
   * choice, best first. Answers come whole: no streaming, stop strings or sampling settings.
   */
  async #beamSearch(tokens: number[], body: Record<string, unknown>, adapter: string | undefined): Promise<{ results: Completion[]; usage: Usage }> {
    if (body.stream === true) throw new HttpError(400, 'use_beam_search answers whole: stream must be false');
    if (stopStringsOf(body).length > 0) throw new HttpError(400, 'use_beam_search does not take stop strings');
    if (body.logprobs !== undefined && body.logprobs !== null && body.logprobs !== false) throw new HttpError(400, 'use_beam_search does not report logprobs (each beam has its summed logprob inside the search)');
    if (Object.keys(samplingOf(body)).some((name) => name !== 'temperature') || (body.temperature ?? 0) !== 0) {
      throw new HttpError(400, 'use_beam_search picks by log-probability alone: leave temperature at 0 and the other sampling fields out');
    }
    const beamWidth = field<number>(body, 'n', (value) => Number.isInteger(value) && (value as number) >= 1 && (value as number) <= 10, 'a whole number from 1 to 10 with use_beam_search') ?? 1;
    const lengthPenalty = field<number>(body, 'length_penalty', isNumber, 'a number') ?? 1;
    const replica = this.#replica!;
    const tokenizer = this.#tokenizer!;
    let searched: BeamSearchResult;
    try {
      searched = await replica.beamSearch({ tokens, beamWidth, lengthPenalty, maxNewTokens: this.#maxTokens(body), ...(adapter ? { adapter } : {}) });
    } catch (error) {
      if (error instanceof InvalidArgumentError) throw new HttpError(400, error.message);
      throw error;
    }
    const results = searched.beams.map((beam): Completion => {
      // The end-of-sequence token ends the answer; it is not part of its text.
      const ids = beam.finishReason === 'stop' && replica.stopTokens.includes(beam.tokens.at(-1)!) ? beam.tokens.slice(0, -1) : beam.tokens;
      return { text: tokenizer.decode(ids.filter((id) => id < tokenizer.vocabSize)), tokens: beam.tokens.length, promptTokens: searched.promptTokens, finishReason: beam.finishReason === 'stop' ? 'stop' : 'length' };
    });
    return { results, usage: usageOfAll([results]) };
  }

  #guide(spec: GuidedDecoding): TokenGuide {
    const key = JSON.stringify(spec);
    let guide = this.#guides.get(key);
    if (!guide) {
      try {
        guide = TokenGuide.compile(this.#tokenizer!, spec, 'response_format');
      } catch (error) {
        throw new HttpError(400, (error as Error).message);
      }
      if (this.#guides.size >= 32) this.#guides.delete(this.#guides.keys().next().value!);
      this.#guides.set(key, guide);
    }
    return guide;
  }

  /**
   * Generates from `tokens`, yielding the text as it grows (a piece is held back while it ends
   * inside a character, or could be the start of a stop string), and returns the whole.
   */
  async *#generate(prompt: Prompt, body: Record<string, unknown>, guided: GuidedDecoding | undefined, adapter: string | undefined, options: ChoiceOptions, choice: number): AsyncGenerator<Piece, Completion & { logprobs?: TokenLogprob[] }, undefined> {
    const { tokens } = prompt;
    const tokenizer = this.#tokenizer!;
    const replica = this.#replica!;
    const stops = stopStringsOf(body);
    // Echo with max_tokens 0 scores the prompt alone: a token is generated (the replica's least) and dropped.
    const promptOnly = options.echo === true && (body.max_tokens === 0 || body.max_completion_tokens === 0);
    const maxNewTokens = promptOnly ? 1 : this.#maxTokens(body);
    const text = (ids: readonly number[]) => tokenizer.decode(ids.filter((id) => id < tokenizer.vocabSize));
    const sampling = samplingOf(body);
    const reportLogprobs = options.topLogprobs !== undefined;
    const echoLogprobs = options.echo === true && reportLogprobs;
    const priority = body.priority;
    if (priority !== undefined && priority !== null && !Number.isInteger(priority)) throw new HttpError(400, `priority must be an integer (lower goes first), got ${JSON.stringify(priority)}`);
    const request: GenerateRequest = {
      tokens,
      maxNewTokens,
      ...(typeof priority === 'number' ? { priority } : {}),
      // Choice i draws with the request's seed plus i: the first is the answer n = 1 would give.
      sampling: choice > 0 ? { ...sampling, seed: (sampling.seed ?? 0) + choice } : sampling,
      ...(reportLogprobs || options.bestOf !== undefined ? { logprobs: true } : {}),
      ...(options.topLogprobs ? { topLogprobs: options.topLogprobs } : {}),
      ...(echoLogprobs ? { promptLogprobs: true, ...(options.topLogprobs ? { promptTopLogprobs: options.topLogprobs } : {}) } : {}),
      ...(adapter ? { adapter } : {}),
      ...(stops.length > 0 ? { stop: (generated) => stops.some((stop) => text(generated.slice(-4 * stop.length - 4)).includes(stop)) } : {}),
      ...(guided ? { constraint: this.#guide(guided).constraint(replica.stopTokens) } : {}),
    };
    const generated: number[] = [];
    const decoded = new IncrementalText(text);
    let count = 0;
    let sent = 0;
    let finish: 'stop' | 'length' = 'length';
    let whole = '';
    let cumulativeLogprob = 0;
    // Tokens whose text has not gone out yet: they go with the piece that carries it.
    let pending: TokenLogprob[] = [];
    const reported: TokenLogprob[] = [];
    const emit = (piece: string): Piece => {
      const logprobs = pending;
      pending = [];
      reported.push(...logprobs);
      return { text: piece, logprobs };
    };
    // Echo: the prompt's text goes first (a string prompt as given, token ids decoded), then the answer's.
    const echoed = options.echo ? (prompt.text ?? text(tokens)) : '';
    for await (const step of replica.stream(request)) {
      if (options.echo && step.index === 0) {
        pending = echoLogprobs ? tokens.map((token, at) => (at === 0 ? { token, logprob: null, top: null } : { token, logprob: step.promptLogprobs![at - 1], top: step.promptTopLogprobs?.[at - 1] ?? [] })) : [];
        yield emit(echoed);
        if (promptOnly) break;
      }
      count++;
      if (step.logprob !== undefined) cumulativeLogprob += step.logprob;
      if (step.finishReason) finish = step.finishReason === 'stop' ? 'stop' : 'length';
      // The end-of-sequence token ends the answer; it is not part of its text.
      if (step.finishReason === 'stop' && replica.stopTokens.includes(step.token)) continue;
      generated.push(step.token);
      if (step.logprob !== undefined) pending.push({ token: step.token, logprob: step.logprob, top: step.topLogprobs ?? [] });
      whole = decoded.update(generated);
      let end = whole.length;
      // A stop string's start may be at the end: hold it back until it is known not to be one.
      for (const stop of stops) {
        for (let length = Math.min(stop.length - 1, end - sent); length > 0; length--) {
          if (whole.slice(end - length, end) === stop.slice(0, length)) {
            end -= length;
            break;
          }
        }
      }
      if (end > sent) {
        yield emit(whole.slice(sent, end));
        sent = end;
      }
    }
    // The stop string itself and what follows it are not part of the answer (as OpenAI's).
    let answer = decoded.update(generated, true);
    let cut = false;
    for (const stop of stops) {
      const at = answer.indexOf(stop);
      if (at >= 0) {
        answer = answer.slice(0, at);
        finish = 'stop';
        cut = true;
      }
    }
    // Tokens held back that spelled only a stop string are not reported; the rest go with the last piece.
    if (answer.length > sent || (!cut && pending.length > 0)) yield emit(answer.slice(sent));
    return {
      text: echoed + answer,
      tokens: count,
      promptTokens: tokens.length,
      finishReason: finish,
      ...(options.bestOf !== undefined ? { cumulativeLogprob } : {}),
      ...(reportLogprobs ? { logprobs: reported } : {}),
    };
  }
}

/** A chat answer's message: its text, or its tool calls and the text beside them. */
function chatMessage(result: Completion): Record<string, unknown> {
  if (!result.toolCalls || result.toolCalls.length === 0) return { role: 'assistant', content: result.text };
  return {
    role: 'assistant',
    content: result.content ?? null,
    tool_calls: result.toolCalls.map((call) => ({ id: call.id, type: 'function', function: { name: call.name, arguments: call.arguments } })),
  };
}

/** A tool call's piece as OpenAI's stream sends it. */
function toolCallDelta(call: NonNullable<Piece['toolCalls']>[number]): Record<string, unknown> {
  return { index: call.index, ...(call.id ? { id: call.id, type: 'function' } : {}), function: { ...(call.name ? { name: call.name } : {}), arguments: call.arguments } };
}

/**
 * A chat answer with tools: a named function's arguments stream as its one call's deltas; a
 * required choice's list goes out whole once it is (each call a delta); an 'auto' answer streams
 * its text until it could be starting a call, then holds the rest back until the parser has read
 * the whole. Its result carries the calls (finish_reason 'tool_calls' where there are any).
 */
export async function* withToolCalls(answer: AsyncGenerator<Piece, Completion & { logprobs?: TokenLogprob[] }, undefined>, tools: ToolRequest, parser: ToolCallParser | undefined): AsyncGenerator<Piece, Completion & { logprobs?: TokenLogprob[] }, undefined> {
  const { choice } = tools;
  if (choice !== 'auto') {
    const named = choice !== 'required';
    const first = named ? toolCall(choice.name, '') : undefined;
    let started = false;
    let step = await answer.next();
    for (; !step.done; step = await answer.next()) {
      if (!named || step.value.text === '') continue;
      yield { text: '', logprobs: step.value.logprobs, toolCalls: [{ index: 0, ...(started ? {} : { id: first!.id, name: first!.name }), arguments: step.value.text }] };
      started = true;
    }
    const result = step.value;
    const calls = named ? [{ ...first!, arguments: result.text.trim() }] : guidedToolCalls(result.text, tools);
    if (!named && calls.length > 0) yield { text: '', logprobs: [], toolCalls: calls.map((call, index) => ({ index, id: call.id, name: call.name, arguments: call.arguments })) };
    if (named && !started) yield { text: '', logprobs: [], toolCalls: [{ index: 0, id: first!.id, name: first!.name, arguments: '' }] };
    return { ...result, content: null, toolCalls: calls, finishReason: calls.length > 0 && result.finishReason === 'stop' ? 'tool_calls' : result.finishReason };
  }
  let whole = '';
  let sent = 0;
  let held: TokenLogprob[] = [];
  let step = await answer.next();
  for (; !step.done; step = await answer.next()) {
    whole += step.value.text;
    held.push(...step.value.logprobs);
    const until = heldBackFrom(whole, parser!);
    if (until > sent) {
      yield { text: whole.slice(sent, until), logprobs: held };
      held = [];
      sent = until;
    }
  }
  const result = step.value;
  const parsed = parseToolCalls(result.text, parser!, tools);
  if (parsed.calls.length === 0) {
    if (result.text.length > sent || held.length > 0) yield { text: result.text.slice(sent), logprobs: held };
    return result;
  }
  yield { text: '', logprobs: held, toolCalls: parsed.calls.map((call, index) => ({ index, id: call.id, name: call.name, arguments: call.arguments })) };
  return { ...result, content: parsed.content, toolCalls: parsed.calls, finishReason: 'tool_calls' };
}

/**
 * The text of a growing list of tokens, decoding only its last stretch at each step (as vLLM's
 * incremental detokenizer), not the whole list again: the stretch since the last settled point,
 * with the stretch before it as context, so that a decoder's rules at a text's start (a leading
 * space stripped) apply alike to both. A character still incomplete (bytes of it to come) is
 * held back until it is whole, or until `final`.
 */
export class IncrementalText {
  readonly #decode: (ids: readonly number[]) => string;
  #prefix = 0;
  #read = 0;
  #text = '';

  constructor(decode: (ids: readonly number[]) => string) {
    this.#decode = decode;
  }

  /** The text settled so far, after `ids` grew (the same list, longer). */
  update(ids: readonly number[], final = false): string {
    const before = this.#decode(ids.slice(this.#prefix, this.#read));
    const after = this.#decode(ids.slice(this.#prefix));
    if (after.length > before.length && (final || !after.endsWith('\uFFFD'))) {
      this.#text += after.slice(before.length);
      this.#prefix = this.#read;
      this.#read = ids.length;
    }
    return this.#text;
  }
}

type Usage = { prompt_tokens: number; completion_tokens: number; total_tokens: number };

/** The usage of a request's choices, grouped by prompt: each prompt once, every choice's tokens. */
function usageOfAll(groups: Completion[][]): Usage {
  const prompt = groups.reduce((sum, group) => sum + (group[0]?.promptTokens ?? 0), 0);
  const completion = groups.reduce((sum, group) => sum + group.reduce((total, result) => total + result.tokens, 0), 0);
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
}

/** Choices in prompt order, n to a prompt, as groups of each prompt's. */
function byPrompt<T>(results: T[], n: number): T[][] {
  return Array.from({ length: Math.ceil(results.length / n) }, (_, prompt) => results.slice(prompt * n, (prompt + 1) * n));
}

/** How a stream's events are made from its choices' pieces. */
interface StreamShape {
  /** Choices to a prompt (n): the usage counts each prompt once. */
  choicesPerPrompt: number;
  /** A choice's first event, before any text (chat's role). */
  first?(index: number): unknown;
  piece(index: number, piece: Piece): unknown;
  /** A choice's last event: why it ended. */
  last(index: number, result: Completion): unknown;
  /** With stream_options.include_usage: the event that carries the usage, after every choice ended. */
  usage?(usage: Usage): unknown;
}

/**
 * A request's choices streamed as OpenAI streams them: the event-stream head, each choice's
 * first event if any, an event per piece of text as any choice makes one, an event as each
 * ends, the usage if asked, then [DONE]. Where one fails, the others are stopped.
 */
async function* eventStream(answers: Array<AsyncGenerator<Piece, Completion, undefined>>, shape: StreamShape): AsyncGenerator<unknown, void, undefined> {
  yield new HttpResponse(undefined, { headers: { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' } });
  if (shape.first) for (let index = 0; index < answers.length; index++) yield event(shape.first(index));
  const advance = (index: number) => answers[index].next().then((step) => ({ index, step }));
  const running = new Map(answers.map((_, index) => [index, advance(index)]));
  const results: Completion[] = [];
  try {
    while (running.size > 0) {
      const { index, step } = await Promise.race(running.values());
      if (step.done) {
        running.delete(index);
        results[index] = step.value;
        yield event(shape.last(index, step.value));
      } else {
        running.set(index, advance(index));
        yield event(shape.piece(index, step.value));
      }
    }
  } finally {
    // A failed choice, or a client gone: the others' sequences end at their next token.
    await Promise.allSettled([...running.keys()].map((index) => answers[index].return(undefined as never)));
  }
  if (shape.usage) yield event(shape.usage(usageOfAll(byPrompt(results, shape.choicesPerPrompt))));
  yield event('[DONE]');
}

/** Whether a streamed request asks for its usage at the end (OpenAI's stream_options.include_usage). */
function streamUsage(body: Record<string, unknown>): boolean {
  const options = body.stream_options;
  if (options === undefined || options === null) return false;
  if (typeof options !== 'object' || Array.isArray(options)) throw new HttpError(400, `stream_options must be an object, got ${JSON.stringify(options)}`);
  return field<boolean>(options as Record<string, unknown>, 'include_usage', (value) => typeof value === 'boolean', 'a boolean') ?? false;
}

async function drain<T>(pieces: AsyncGenerator<Piece, T, undefined>): Promise<T> {
  for (;;) {
    const step = await pieces.next();
    if (step.done) return step.value;
  }
}

/** Every choice whole, generated at once (they share the replica's steps). */
async function drainAll<T>(answers: Array<AsyncGenerator<Piece, T, undefined>>): Promise<T[]> {
  try {
    return await Promise.all(answers.map((answer) => drain(answer)));
  } catch (error) {
    await Promise.allSettled(answers.map((answer) => answer.return(undefined as never)));
    throw error;
  }
}

/** A chat request's n, logprobs and top_logprobs (OpenAI's chat fields). */
function chatChoices(body: Record<string, unknown>): ChoiceOptions {
  const logprobs = field<boolean>(body, 'logprobs', (value) => typeof value === 'boolean', 'a boolean') ?? false;
  const top = field<number>(body, 'top_logprobs', (value) => Number.isInteger(value) && (value as number) >= 0 && (value as number) <= 20, 'a whole number from 0 to 20');
  if (top !== undefined && !logprobs) throw new HttpError(400, 'top_logprobs needs logprobs: true');
  return { n: choiceCount(body), topLogprobs: logprobs ? (top ?? 0) : undefined, ...tokenIdsOf(body) };
}

/** A completion request's n, logprobs (the legacy field: how many alternatives per token, 0 to 20), echo and best_of. */
function completionChoices(body: Record<string, unknown>): ChoiceOptions {
  const top = field<number>(body, 'logprobs', (value) => Number.isInteger(value) && (value as number) >= 0 && (value as number) <= 20, 'a whole number from 0 to 20');
  const echo = field<boolean>(body, 'echo', (value) => typeof value === 'boolean', 'a boolean') ?? false;
  const n = choiceCount(body);
  const bestOf = field<number>(body, 'best_of', (value) => Number.isInteger(value) && (value as number) >= 1 && (value as number) <= MOST_CHOICES, `a whole number from 1 to ${MOST_CHOICES}`);
  if (bestOf !== undefined && bestOf < n) throw new HttpError(400, `best_of (${bestOf}) must be at least n (${n}): it is how many candidates the n answers are chosen from`);
  // best_of equal to n draws the n choices as n does: no ranking, so no logprobs to sum.
  return { n, topLogprobs: top, ...(echo ? { echo } : {}), ...(bestOf !== undefined && bestOf > n ? { bestOf } : {}), ...tokenIdsOf(body) };
}

/** A token as logprobs name it: its text, or with vLLM's return_tokens_as_token_ids its id (for a client that must tell apart tokens of the same text). */
function tokenName(token: number, text: string, options: ChoiceOptions): string {
  return options.tokenIds ? `token_id:${token}` : text;
}

function tokenIdsOf(body: Record<string, unknown>): { tokenIds?: true } {
  return field<boolean>(body, 'return_tokens_as_token_ids', (value) => typeof value === 'boolean', 'a boolean') ? { tokenIds: true } : {};
}

function choiceCount(body: Record<string, unknown>): number {
  return field<number>(body, 'n', (value) => Number.isInteger(value) && (value as number) >= 1 && (value as number) <= MOST_CHOICES, `a whole number from 1 to ${MOST_CHOICES}`) ?? 1;
}

export const OpenAIServerActor = remote(import.meta, OpenAIServer);

/**
 * An OpenAI-compatible application over `options.checkpoint` (as Ray Serve LLM's
 * build_openai_app): run it with serve.run(), and point any OpenAI client at the proxy.
 * Each replica holds tensorParallel × pipelineParallel ranks, and asks for that many CPUs
 * (numCpusPerRank each) unless `deployment.actorOptions` says otherwise.
 */
export function buildOpenAIApp(options: OpenAIAppOptions): Application<OpenAIServer> {
  if (typeof options !== 'object' || options === null || typeof options.checkpoint !== 'string') {
    throw new InvalidArgumentError('buildOpenAIApp takes options with a checkpoint path');
  }
  if (options.toolCallParser !== undefined && !TOOL_CALL_PARSERS.includes(options.toolCallParser)) {
    throw new InvalidArgumentError(`toolCallParser must be ${TOOL_CALL_PARSERS.map((name) => `'${name}'`).join(' or ')}, got ${JSON.stringify(options.toolCallParser)}`);
  }
  const ranks = (options.tensorParallel ?? 1) * (options.pipelineParallel ?? 1);
  const given = options.deployment ?? {};
  const actorOptions = { numCpus: ranks * (options.numCpusPerRank ?? 1), ...(options.device === 'cuda' ? { numGpus: ranks } : {}), ...given.actorOptions };
  const { deployment: _deployment, ...serverOptions } = options;
  const base = options.modelId ?? basename(checkpointDirectory(options.checkpoint));
  const multiplexing = options.adapterDirectory !== undefined || Object.keys(options.adapters ?? {}).length > 0;
  // Requests for one adapter go to the replicas that served it lately; the base model's anywhere.
  // As data, so that the proxy on every node reads it too.
  const requestModelId = multiplexing ? { jsonField: 'model', except: [base] } : undefined;
  return deployment(OpenAIServerActor, { name: 'OpenAIServer', maxOngoingRequests: 64, ...(requestModelId ? { requestModelId } : {}), ...given, actorOptions }).bind(serverOptions);
}
