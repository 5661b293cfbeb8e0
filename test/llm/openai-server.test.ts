/**
 * The OpenAI-compatible server (buildOpenAIApp) over a small random GPT-2 with a byte-level
 * tokenizer and a chat template: models, completions and chat completions (whole and streamed,
 * the stream's text the same as the whole's), stop strings, JSON-schema response formats,
 * embeddings, LoRA adapters served as models of their own (loaded on demand from a directory,
 * routed by model), tool calls (a named function, a required list), requests it refuses, and a
 * dataset answered through the HTTP batch processor.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Tokenizer, buildDeploymentProcessor, buildHttpRequestProcessor, buildOpenAIApp, fromItems, init, serve, shutdown } from '../../lib/index.js';
import { readCompletion, toCompletionRequest } from './fixtures/http-rows.js';
import { IncrementalText } from '../../lib/llm/openai-server.js';
import { llama2StyleTokenizerJson } from './fixtures/tokenizers.js';
import { byteTokenizerJson } from '../../examples/model/byte-tokenizer.js';
import { randomWeights, writeCheckpoint, writeRandomAdapter } from '../../examples/model/random-decoder.js';

const config = { vocabSize: 260, hiddenSize: 32, numLayers: 2, numHeads: 4, intermediateSize: 64, maxPositions: 256, layerNormEpsilon: 1e-5 };
let scratch = '';
let url = '';

async function post(path: string, body: unknown): Promise<Response> {
  return fetch(`${url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
}

/** The data of a server-sent event stream, '[DONE]' last. */
async function events(response: Response): Promise<unknown[]> {
  const text = await response.text();
  return text.split('\n\n').filter(Boolean).map((line) => {
    expect(line.startsWith('data: ')).toBe(true);
    const data = line.slice('data: '.length);
    return data === '[DONE]' ? data : JSON.parse(data);
  });
}

beforeAll(async () => {
  scratch = mkdtempSync(join(tmpdir(), 'trellis-openai-'));
  const checkpoint = await writeCheckpoint(join(scratch, 'tiny-gpt'), config, randomWeights(config, 5));
  writeFileSync(join(checkpoint, 'tokenizer.json'), JSON.stringify(byteTokenizerJson()));
  writeFileSync(join(checkpoint, 'tokenizer_config.json'), JSON.stringify({
    eos_token: '<|endoftext|>',
    chat_template: '{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}',
  }));
  // Replicas are actors with workers of their own: no idle task workers to start.
  await init({ numCpus: 2, prestartWorkers: 0 });
  url = (await serve.start({ http: { port: 0 } })).proxy!.url;
  const adapterDirectory = join(scratch, 'adapters');
  await writeRandomAdapter(join(adapterDirectory, 'tuned'), config, 8, 11);
  await serve.run(buildOpenAIApp({ checkpoint, adapterDirectory, numCpusPerRank: 0, deployment: { actorOptions: { numCpus: 0 } } }), { name: 'llm' });
});

afterAll(async () => {
  await shutdown();
  rmSync(scratch, { recursive: true, force: true });
});

describe('IncrementalText', () => {
  it('decodes token by token into what decoding the whole gives, holding back split characters', () => {
    const cases: Array<[Tokenizer, string]> = [
      [Tokenizer.fromJSON(byteTokenizerJson()), 'héllo wörld: 日本語 and 🎉 done'],
      [Tokenizer.fromJSON(llama2StyleTokenizerJson()), 'Hello world Hello'],
    ];
    for (const [tokenizer, sample] of cases) {
      const ids = tokenizer.encode(sample, { addSpecialTokens: false });
      const decode = (list: readonly number[]) => tokenizer.decode(list);
      const incremental = new IncrementalText(decode);
      for (let count = 1; count <= ids.length; count++) {
        const settled = incremental.update(ids.slice(0, count));
        expect(decode(ids).startsWith(settled)).toBe(true);
        expect(settled).not.toContain('\uFFFD');
      }
      expect(incremental.update(ids, true)).toBe(decode(ids));
    }
  });
});

describe('buildOpenAIApp', () => {
  it('lists its model and the adapters it can serve', async () => {
    const models = (await (await fetch(`${url}/v1/models`)).json()) as { data: Array<{ id: string; parent?: string }> };
    expect(models.data.map((model) => [model.id, model.parent])).toEqual([['tiny-gpt', undefined], ['tuned', 'tiny-gpt']]);
  });

  it('serves a LoRA adapter as a model of its own, loaded when first asked for', async () => {
    const ask = async (model?: string) => {
      const answer = (await (await post('/v1/completions', { prompt: 'The cat', max_tokens: 12, temperature: 0, ...(model ? { model } : {}) })).json()) as { model: string; choices: Array<{ text: string }> };
      return answer;
    };
    const base = await ask();
    const tuned = await ask('tuned');
    expect(base.model).toBe('tiny-gpt');
    expect(tuned.model).toBe('tuned');
    // The adapter changes the model: greedy answers differ, and repeat.
    expect(tuned.choices[0].text).not.toBe(base.choices[0].text);
    expect((await ask('tuned')).choices[0].text).toBe(tuned.choices[0].text);
    expect((await ask('tiny-gpt')).choices[0].text).toBe(base.choices[0].text);
    const embedded = (await (await post('/v1/embeddings', { input: 'cat', model: 'tuned' })).json()) as { model: string };
    expect(embedded.model).toBe('tuned');
    for (const model of ['untuned', '../adapters/tuned']) {
      const response = await post('/v1/completions', { prompt: 'x', model });
      expect(response.status).toBe(404);
      expect(((await response.json()) as { message: string }).message).toMatch(/is not served here \(this server has tiny-gpt, tuned, and the adapters under /);
    }
  });

  it('completes a prompt whole or streamed, the same text either way, and stops at a stop string', async () => {
    const request = { model: 'tiny-gpt', prompt: 'Once upon', max_tokens: 24, temperature: 0 };
    const whole = (await (await post('/v1/completions', request)).json()) as { choices: Array<{ text: string; finish_reason: string }>; usage: Record<string, number> };
    expect(whole.choices[0].finish_reason).toBe('length');
    expect(whole.usage).toEqual({ prompt_tokens: 9, completion_tokens: 24, total_tokens: 33 });
    const streamed = await post('/v1/completions', { ...request, stream: true });
    expect(streamed.headers.get('content-type')).toBe('text/event-stream');
    const chunks = await events(streamed);
    expect(chunks.at(-1)).toBe('[DONE]');
    const text = (chunks.slice(0, -1) as Array<{ choices: Array<{ text: string }> }>).map((chunk) => chunk.choices[0].text).join('');
    expect(text).toBe(whole.choices[0].text);
    // A stop string from the middle of that text: the answer ends before it.
    const stop = whole.choices[0].text.slice(6, 8);
    const stopped = (await (await post('/v1/completions', { ...request, stop: [stop] })).json()) as typeof whole;
    expect(stopped.choices[0].finish_reason).toBe('stop');
    expect(stopped.choices[0].text).toBe(whole.choices[0].text.slice(0, whole.choices[0].text.indexOf(stop)));
  });

  it('answers a dataset of prompts through buildHttpRequestProcessor and by handle through buildDeploymentProcessor, as it answers each request on its own', async () => {
    const prompts = ['Once upon', 'The cat', 'In a hole', 'It was', 'Call me', 'Far out'];
    const processor = buildHttpRequestProcessor({ url: `${url}/v1/completions`, preprocess: toCompletionRequest, postprocess: readCompletion, maxConcurrentRequests: 4, batchSize: 3 });
    const rows = await processor(fromItems(prompts.map((prompt) => ({ prompt })))).takeAll();
    for (const [index, prompt] of prompts.entries()) {
      const alone = (await (await post('/v1/completions', { model: 'tiny-gpt', prompt, max_tokens: 4, temperature: 0 })).json()) as { choices: Array<{ text: string }> };
      expect(rows[index]).toEqual({ prompt, text: alone.choices[0].text, completionTokens: 4 });
    }
    // The same through the deployment by handle (no HTTP): its completions method answers the same JSON.
    const handle = serve.getDeploymentHandle('OpenAIServer', 'llm');
    const byHandle = await buildDeploymentProcessor({ handle, method: 'completions', preprocess: toCompletionRequest, postprocess: readCompletion, responseColumn: 'httpResponse', maxConcurrentRequests: 4, batchSize: 3 })(fromItems(prompts.map((prompt) => ({ prompt })))).takeAll();
    expect(byHandle).toEqual(rows);
    await expect(handle.completions({ prompt: 'x', stream: true })).rejects.toThrow(/answers whole: drop stream/);
  });

  it('gives n choices, each drawn with the seed plus its index, whole or streamed side by side', async () => {
    type Choices = { choices: Array<{ index: number; text: string; finish_reason: string }>; usage: Record<string, number> };
    const request = { prompt: 'Once upon', max_tokens: 10, temperature: 0.9, seed: 5 };
    const three = (await (await post('/v1/completions', { ...request, n: 3 })).json()) as Choices;
    expect(three.choices.map((choice) => choice.index)).toEqual([0, 1, 2]);
    let generated = 0;
    for (const index of [0, 1, 2]) {
      const alone = (await (await post('/v1/completions', { ...request, seed: 5 + index })).json()) as Choices;
      expect(three.choices[index].text).toBe(alone.choices[0].text);
      generated += alone.usage.completion_tokens;
    }
    expect(new Set(three.choices.map((choice) => choice.text)).size).toBeGreaterThan(1);
    // The prompt counted once, every choice's tokens.
    expect(three.usage).toEqual({ prompt_tokens: 9, completion_tokens: generated, total_tokens: 9 + generated });
    // Streamed: chunks of both choices, each choice's text as the whole answer has it; the usage
    // once at the end, in a chunk of no choices, where stream_options ask for it.
    const messages = [{ role: 'user', content: 'Say hi' }];
    const chat = { messages, max_tokens: 8, temperature: 0.9, seed: 3, n: 2 };
    const whole = (await (await post('/v1/chat/completions', chat)).json()) as { choices: Array<{ message: { content: string } }>; usage: Record<string, number> };
    type Chunk = { choices: Array<{ index: number; delta: { content?: string } }>; usage?: Record<string, number> };
    const chunks = (await events(await post('/v1/chat/completions', { ...chat, stream: true, stream_options: { include_usage: true } }))).slice(0, -1) as Chunk[];
    const streamed = ['', ''];
    for (const chunk of chunks.slice(0, -1)) streamed[chunk.choices[0].index] += chunk.choices[0].delta.content ?? '';
    expect(streamed).toEqual(whole.choices.map((choice) => choice.message.content));
    expect(chunks.filter((chunk) => chunk.usage)).toHaveLength(1);
    expect(chunks.at(-1)).toMatchObject({ choices: [], usage: whole.usage });
    const unasked = (await events(await post('/v1/chat/completions', { ...chat, stream: true }))).slice(0, -1) as Chunk[];
    expect(unasked.some((chunk) => chunk.usage !== undefined || chunk.choices.length === 0)).toBe(false);
  });

  it("takes OpenAI's logit_bias and vLLM's min_p and repetition_penalty", async () => {
    type Legacy = { choices: Array<{ text: string; logprobs: { tokens: string[] } }> };
    const ask = async (extra: object) => (await (await post('/v1/completions', { prompt: 'Once upon', max_tokens: 5, temperature: 0, logprobs: 0, ...extra })).json()) as Legacy;
    // A bias of +100 on one token forces it at every position.
    const forced = await ask({ logit_bias: { 100: 100 } });
    expect(new Set(forced.choices[0].logprobs.tokens).size).toBe(1);
    const greedy = await ask({});
    expect(forced.choices[0].text).not.toBe(greedy.choices[0].text);
    // Greedy picks are the most likely token whatever min_p; a repetition penalty of 1 changes nothing.
    expect((await ask({ min_p: 0.5, repetition_penalty: 1 })).choices[0].text).toBe(greedy.choices[0].text);
    const refused = await post('/v1/completions', { prompt: 'x', logit_bias: { x: 1 } });
    expect(refused.status).toBe(400);
    expect(((await refused.json()) as { message: string }).message).toMatch(/logit_bias maps token ids to numbers from -100 to 100/);
  });

  it('completes a batch of prompts, each with its n choices in order, whole or streamed', async () => {
    type Choices = { choices: Array<{ index: number; text: string }>; usage: Record<string, number> };
    const request = { max_tokens: 6, temperature: 0.9, seed: 11, n: 2 };
    const batch = (await (await post('/v1/completions', { ...request, prompt: ['Once upon', [5, 6, 7]] })).json()) as Choices;
    expect(batch.choices.map((choice) => choice.index)).toEqual([0, 1, 2, 3]);
    const first = (await (await post('/v1/completions', { ...request, prompt: 'Once upon' })).json()) as Choices;
    const second = (await (await post('/v1/completions', { ...request, prompt: [5, 6, 7] })).json()) as Choices;
    expect(batch.choices.map((choice) => choice.text)).toEqual([...first.choices, ...second.choices].map((choice) => choice.text));
    expect(batch.usage.prompt_tokens).toBe(9 + 3);
    expect(batch.usage.completion_tokens).toBe(first.usage.completion_tokens + second.usage.completion_tokens);
    const chunks = (await events(await post('/v1/completions', { ...request, prompt: ['Once upon', [5, 6, 7]], stream: true, stream_options: { include_usage: true } }))).slice(0, -1) as Array<{ choices: Array<{ index: number; text: string }>; usage?: Record<string, number> }>;
    const streamed = ['', '', '', ''];
    for (const chunk of chunks.slice(0, -1)) streamed[chunk.choices[0].index] += chunk.choices[0].text;
    expect(streamed).toEqual(batch.choices.map((choice) => choice.text));
    expect(chunks.at(-1)!.usage).toEqual(batch.usage);
    const refused = await post('/v1/completions', { prompt: ['fine', 7] });
    expect(refused.status).toBe(400);
    expect(((await refused.json()) as { message: string }).message).toMatch(/prompt must be a string, a list of token ids, or a list of 1 to 256 of either/);
  });

  it("reports each token's log-probability and the likeliest alternatives, in chat's shape and the completions' legacy one", async () => {
    type Legacy = { tokens: string[]; token_logprobs: number[]; top_logprobs: Array<Record<string, number>>; text_offset: number[] };
    const completion = (await (await post('/v1/completions', { prompt: 'Once upon', max_tokens: 8, temperature: 0, logprobs: 2 })).json()) as { choices: Array<{ text: string; logprobs: Legacy }> };
    const { logprobs } = completion.choices[0];
    expect(logprobs.tokens).toHaveLength(8);
    expect(logprobs.token_logprobs.every((value) => value <= 0)).toBe(true);
    // Greedy: each token is the likeliest of its alternatives.
    logprobs.top_logprobs.forEach((top, index) => {
      expect(Object.keys(top).length).toBeLessThanOrEqual(2);
      expect(logprobs.token_logprobs[index]).toBeCloseTo(Math.max(...Object.values(top)), 5);
    });
    expect(logprobs.text_offset[0]).toBe(0);
    expect(logprobs.text_offset.every((offset, index) => index === 0 || offset >= logprobs.text_offset[index - 1])).toBe(true);
    // Chat: tokens with their bytes (which spell the answer) and top_logprobs.
    type Entry = { token: string; logprob: number; bytes: number[]; top_logprobs: Array<{ token: string; logprob: number; bytes: number[] }> };
    const body = { messages: [{ role: 'user', content: 'Say hi' }], max_tokens: 6, temperature: 0, logprobs: true, top_logprobs: 3 };
    const chat = (await (await post('/v1/chat/completions', body)).json()) as { choices: Array<{ message: { content: string }; logprobs: { content: Entry[] } }> };
    const entries = chat.choices[0].logprobs.content;
    expect(entries.length).toBeGreaterThan(0);
    expect(entries.every((entry) => entry.top_logprobs.length === 3 && entry.top_logprobs[0].logprob >= entry.top_logprobs[2].logprob)).toBe(true);
    expect(Buffer.from(entries.flatMap((entry) => entry.bytes)).toString('utf8')).toBe(chat.choices[0].message.content);
    // Streamed, the same entries come with the pieces they spell.
    const chunks = (await events(await post('/v1/chat/completions', { ...body, stream: true }))).slice(1, -1) as Array<{ choices: Array<{ logprobs?: { content: Entry[] } }> }>;
    expect(chunks.flatMap((chunk) => chunk.choices[0].logprobs?.content ?? [])).toEqual(entries);
    // Without logprobs asked, none.
    const plain = (await (await post('/v1/chat/completions', { ...body, logprobs: false, top_logprobs: undefined })).json()) as { choices: Array<{ logprobs: unknown }> };
    expect(plain.choices[0].logprobs).toBeNull();
  });

  it("echoes prompts with their tokens' logprobs and likeliest alternatives (an evaluation harness's loglikelihood request), and answers with the best of several candidates (best_of)", async () => {
    type Legacy = { tokens: string[]; token_logprobs: Array<number | null>; top_logprobs: Array<Record<string, number> | null>; text_offset: number[] };
    type Choices = { choices: Array<{ index: number; text: string; finish_reason: string; logprobs: Legacy }>; usage: Record<string, number> };
    const ask = async (body: object) => (await (await post('/v1/completions', body)).json()) as Choices;
    // A greedy continuation, its tokens named by id; then the prompt and that continuation scored
    // as one echoed prompt (max_tokens 0): the continuation's positions carry the logprobs it was
    // generated with, and each is the likeliest there (the harness's is_greedy).
    const context = [40, 41, 42, 43, 44];
    const generated = await ask({ prompt: context, max_tokens: 6, temperature: 0, logprobs: 1, return_tokens_as_token_ids: true });
    const continuation = generated.choices[0].logprobs.tokens.map((name) => Number(name.replace('token_id:', '')));
    expect(continuation).toHaveLength(6);
    const scored = await ask({ prompt: [...context, ...continuation], max_tokens: 0, echo: true, temperature: 0, logprobs: 1 });
    const { logprobs } = scored.choices[0];
    expect(logprobs.tokens).toHaveLength(context.length + 6);
    expect(logprobs.token_logprobs[0]).toBeNull();
    expect(logprobs.top_logprobs[0]).toBeNull();
    expect(scored.usage).toEqual({ prompt_tokens: 11, completion_tokens: 0, total_tokens: 11 });
    continuation.forEach((_, index) => {
      const at = context.length + index;
      expect(logprobs.token_logprobs[at]).toBeCloseTo(generated.choices[0].logprobs.token_logprobs[index]!, 4);
      expect(logprobs.token_logprobs[at]).toBeCloseTo(Math.max(...Object.values(logprobs.top_logprobs[at]!)), 5);
    });
    // Every prompt position after the first: its token's logprob, the likeliest alternative, and the token beside it where it is not that one.
    for (let at = 1; at < context.length + 6; at++) {
      const top = logprobs.top_logprobs[at]!;
      expect(Object.keys(top).length).toBeLessThanOrEqual(2);
      expect(top[logprobs.tokens[at]]).toBeCloseTo(logprobs.token_logprobs[at]!, 5);
      expect(logprobs.token_logprobs[at]!).toBeLessThanOrEqual(Math.max(...Object.values(top)) + 1e-6);
    }
    expect(logprobs.text_offset[0]).toBe(0);
    // Echo with an answer: the prompt's text as given, then the answer's, whole or streamed alike.
    const request = { prompt: 'Once upon', max_tokens: 8, temperature: 0, echo: true, logprobs: 2 };
    const plain = await ask({ ...request, echo: false });
    const echoed = await ask(request);
    expect(echoed.choices[0].text).toBe(`Once upon${plain.choices[0].text}`);
    expect(echoed.choices[0].logprobs.tokens.slice(9)).toEqual(plain.choices[0].logprobs.tokens);
    expect(echoed.usage).toEqual(plain.usage);
    const chunks = (await events(await post('/v1/completions', { ...request, stream: true }))).slice(0, -1) as Choices[];
    expect(chunks.map((chunk) => chunk.choices[0].text).join('')).toBe(echoed.choices[0].text);
    expect(chunks.flatMap((chunk) => chunk.choices[0].logprobs?.token_logprobs ?? [])).toEqual(echoed.choices[0].logprobs.token_logprobs);
    // best_of: three candidates drawn with seeds 5, 6, 7; the two of highest summed logprob answer, best first.
    const sampled = { prompt: 'Once upon', max_tokens: 8, temperature: 1, seed: 5 };
    const candidates = await Promise.all([0, 1, 2].map((index) => ask({ ...sampled, seed: 5 + index, logprobs: 0 })));
    expect(candidates.every((candidate) => candidate.choices[0].finish_reason === 'length')).toBe(true);
    const sums = candidates.map((candidate) => candidate.choices[0].logprobs.token_logprobs.reduce((sum: number, value) => sum + value!, 0));
    const order = [0, 1, 2].sort((a, b) => sums[b] - sums[a]);
    const best = await ask({ ...sampled, n: 2, best_of: 3 });
    expect(best.choices.map((choice) => choice.index)).toEqual([0, 1]);
    expect(best.choices.map((choice) => choice.text)).toEqual(order.slice(0, 2).map((index) => candidates[index].choices[0].text));
    expect(best.usage.completion_tokens).toBe(24);
    for (const [body, message] of [
      [{ ...sampled, n: 2, best_of: 1 }, /best_of \(1\) must be at least n \(2\)/],
      [{ ...sampled, best_of: 3, stream: true }, /best_of \(3\) above n \(1\) answers whole: stream must be false/],
      [{ ...sampled, temperature: 0, echo: true, use_beam_search: true }, /use_beam_search does not take echo/],
      [{ ...sampled, echo: 'yes' }, /echo must be a boolean/],
      [{ ...sampled, max_tokens: 0 }, /max_tokens must be a whole number from 1/],
    ] as const) {
      const refused = await post('/v1/completions', body);
      expect(refused.status).toBe(400);
      expect(((await refused.json()) as { message: string }).message).toMatch(message);
    }
  });

  it("tokenizes and detokenizes as vLLM's /tokenize and /detokenize do, prompts and conversations", async () => {
    type Tokenized = { count: number; max_model_len: number; tokens: number[] };
    const prompt = (await (await post('/tokenize', { prompt: 'Once upon' })).json()) as Tokenized;
    expect(prompt.count).toBe(9);
    expect(prompt.max_model_len).toBe(256);
    // The same ids a completion's usage counts, and the same text back.
    expect((await (await post('/detokenize', { tokens: prompt.tokens })).json())).toEqual({ prompt: 'Once upon' });
    const completion = (await (await post('/v1/completions', { prompt: prompt.tokens, max_tokens: 4, temperature: 0 })).json()) as { usage: Record<string, number> };
    expect(completion.usage.prompt_tokens).toBe(prompt.count);
    const chat = (await (await post('/tokenize', { messages: [{ role: 'user', content: 'Say hi' }] })).json()) as Tokenized;
    expect((await (await post('/detokenize', { tokens: chat.tokens })).json())).toEqual({ prompt: 'user: Say hi\nassistant:' });
    const bare = (await (await post('/tokenize', { messages: [{ role: 'user', content: 'Say hi' }], add_generation_prompt: false })).json()) as Tokenized;
    expect(bare.count).toBeLessThan(chat.count);
    const refused = await post('/detokenize', { tokens: [1, 99_999] });
    expect(refused.status).toBe(400);
    expect(((await refused.json()) as { message: string }).message).toMatch(/tokens must be a list of token ids from 0 to 256/);
  });

  it('answers with the beams of a beam search as its choices (use_beam_search, n)', async () => {
    const request = { prompt: 'Once upon', max_tokens: 8, use_beam_search: true, n: 3 };
    const searched = (await (await post('/v1/completions', request)).json()) as { choices: Array<{ index: number; text: string; finish_reason: string }>; usage: Record<string, number> };
    expect(searched.choices.map((choice) => choice.index)).toEqual([0, 1, 2]);
    expect(new Set(searched.choices.map((choice) => choice.text)).size).toBe(3);
    expect(searched.usage.prompt_tokens).toBe(9);
    // One beam is greedy decoding; the same search gives the same beams.
    const greedy = (await (await post('/v1/completions', { prompt: 'Once upon', max_tokens: 8, temperature: 0 })).json()) as typeof searched;
    const single = (await (await post('/v1/completions', { ...request, n: 1 })).json()) as typeof searched;
    expect(single.choices[0].text).toBe(greedy.choices[0].text);
    expect(((await (await post('/v1/completions', request)).json()) as typeof searched).choices).toEqual(searched.choices);
    const chat = (await (await post('/v1/chat/completions', { messages: [{ role: 'user', content: 'Say hi' }], max_tokens: 6, use_beam_search: true, n: 2 })).json()) as { choices: Array<{ message: { content: string } }> };
    expect(chat.choices).toHaveLength(2);
    for (const [body, message] of [
      [{ ...request, stream: true }, /stream must be false/],
      [{ ...request, temperature: 0.7 }, /leave temperature at 0/],
      [{ ...request, n: 11 }, /n must be a whole number from 1 to 10/],
      [{ ...request, stop: ['x'] }, /does not take stop strings/],
      [{ ...request, logprobs: 2 }, /use_beam_search does not report logprobs/],
    ] as const) {
      const refused = await post('/v1/completions', body);
      expect(refused.status).toBe(400);
      expect(((await refused.json()) as { message: string }).message).toMatch(message);
    }
  });

  it('answers chats, streamed as deltas, and keeps to a JSON schema', async () => {
    const messages = [{ role: 'user', content: 'Say hi' }];
    const whole = (await (await post('/v1/chat/completions', { messages, max_tokens: 12, temperature: 0 })).json()) as { object: string; choices: Array<{ message: { role: string; content: string } }> };
    expect(whole.object).toBe('chat.completion');
    expect(whole.choices[0].message.role).toBe('assistant');
    const chunks = await events(await post('/v1/chat/completions', { messages, max_tokens: 12, temperature: 0, stream: true }));
    const deltas = chunks.slice(0, -1) as Array<{ choices: Array<{ delta: { role?: string; content?: string }; finish_reason: string | null }> }>;
    expect(deltas[0].choices[0].delta.role).toBe('assistant');
    expect(deltas.map((chunk) => chunk.choices[0].delta.content ?? '').join('')).toBe(whole.choices[0].message.content);
    expect(deltas.at(-1)!.choices[0].finish_reason).toBe('length');
    const schema = { type: 'object', properties: { mood: { enum: ['happy', 'sad'] }, level: { type: 'integer', minimum: 1, maximum: 9 } }, required: ['mood', 'level'], additionalProperties: false };
    const guided = (await (await post('/v1/chat/completions', { messages, max_tokens: 64, seed: 3, response_format: { type: 'json_schema', json_schema: { name: 'mood', schema } } })).json()) as typeof whole & { choices: Array<{ finish_reason: string }> };
    const parsed = JSON.parse(guided.choices[0].message.content) as { mood: string; level: number };
    expect(['happy', 'sad']).toContain(parsed.mood);
    expect(parsed.level).toBeGreaterThanOrEqual(1);
    expect(guided.choices[0].finish_reason).toBe('stop');
  });

  it('calls tools: a named function with arguments that fit its schema, a required list of calls, streamed as deltas; auto needs a parser', async () => {
    const weather = { type: 'function', function: { name: 'get_weather', parameters: { type: 'object', properties: { city: { enum: ['Paris', 'Oslo'] }, days: { type: 'integer', minimum: 1, maximum: 9 } }, required: ['city', 'days'] } } };
    const time = { type: 'function', function: { name: 'get_time', parameters: { type: 'object', properties: { zone: { enum: ['UTC', 'CET'] } }, required: ['zone'] } } };
    const messages = [{ role: 'user', content: 'Weather in Oslo?' }];
    type ToolAnswer = { choices: Array<{ message: { content: string | null; tool_calls: Array<{ id: string; type: string; function: { name: string; arguments: string } }> }; finish_reason: string }> };
    const request = { model: 'tiny-gpt', messages, tools: [weather, time], tool_choice: { type: 'function', function: { name: 'get_weather' } }, max_tokens: 64, temperature: 0.8, seed: 3 };
    const named = (await (await post('/v1/chat/completions', request)).json()) as ToolAnswer;
    const [call] = named.choices[0].message.tool_calls;
    expect(named.choices[0]).toMatchObject({ finish_reason: 'tool_calls', message: { content: null } });
    expect(call).toMatchObject({ type: 'function', function: { name: 'get_weather' } });
    const args = JSON.parse(call.function.arguments) as { city: string; days: number };
    expect(['Paris', 'Oslo']).toContain(args.city);
    expect(Number.isInteger(args.days) && args.days >= 1 && args.days <= 9).toBe(true);
    // Streamed: the first delta names the call, the rest carry its arguments, the same as whole.
    const chunks = (await events(await post('/v1/chat/completions', { ...request, stream: true }))).slice(0, -1) as Array<{ choices: Array<{ delta: { tool_calls?: Array<{ index: number; id?: string; function: { name?: string; arguments: string } }> }; finish_reason: string | null }> }>;
    const deltas = chunks.flatMap((chunk) => chunk.choices[0].delta.tool_calls ?? []);
    expect(deltas[0]).toMatchObject({ index: 0, id: expect.stringMatching(/^call_/), function: { name: 'get_weather' } });
    expect(deltas.map((delta) => delta.function.arguments).join('')).toBe(call.function.arguments);
    expect(chunks.at(-1)!.choices[0].finish_reason).toBe('tool_calls');

    const required = (await (await post('/v1/chat/completions', { ...request, tool_choice: 'required', max_tokens: 160 })).json()) as ToolAnswer;
    const calls = required.choices[0].message.tool_calls;
    expect(calls.length).toBeGreaterThanOrEqual(1);
    for (const each of calls) {
      expect(['get_weather', 'get_time']).toContain(each.function.name);
      const parameters = JSON.parse(each.function.arguments) as Record<string, unknown>;
      expect(Object.keys(parameters).sort()).toEqual(each.function.name === 'get_time' ? ['zone'] : ['city', 'days']);
    }

    const refused = async (body: unknown) => ((await (await post('/v1/chat/completions', body)).json()) as { message: string }).message;
    expect(await refused({ ...request, tool_choice: 'auto' })).toMatch(/tool_choice 'auto' \(the default with tools\) needs the server's toolCallParser/);
    expect(await refused({ ...request, response_format: { type: 'json_object' } })).toMatch(/guides the answer itself: drop response_format/);
    expect(await refused({ ...request, tool_choice: { type: 'function', function: { name: 'get_news' } } })).toMatch(/tool_choice names 'get_news', which is not among the tools/);
    // tool_choice 'none': an answer in words, the tools shown to the template all the same.
    const none = (await (await post('/v1/chat/completions', { ...request, tool_choice: 'none', max_tokens: 4 })).json()) as { choices: Array<{ message: { content: string; tool_calls?: unknown } }> };
    expect(typeof none.choices[0].message.content).toBe('string');
    expect(none.choices[0].message.tool_calls).toBeUndefined();
  });

  it('embeds texts', async () => {
    const result = (await (await post('/v1/embeddings', { input: ['a', 'bc'] })).json()) as { data: Array<{ index: number; embedding: number[] }>; usage: { prompt_tokens: number } };
    expect(result.data.map((item) => [item.index, item.embedding.length])).toEqual([[0, 32], [1, 32]]);
    expect(result.usage.prompt_tokens).toBe(3);
  });

  it('refuses what it cannot serve, saying why', async () => {
    const cases: Array<[string, unknown, number, RegExp]> = [
      ['/v1/completions', { prompt: 'x', max_tokens: 0 }, 400, /max_tokens must be a whole number from 1/],
      ['/v1/completions', { prompt: 'x', temperature: 7 }, 400, /temperature must be a number from 0 to 2/],
      ['/v1/completions', { prompt: 'x', model: 'gpt-9' }, 404, /model "gpt-9" is not served here \(this server has tiny-gpt/],
      ['/v1/completions', { prompt: 'x', model: 7 }, 400, /model must be a model's name, got 7/],
      ['/v1/completions', { prompt: 'x', n: 0 }, 400, /n must be a whole number from 1 to 16, got 0/],
      ['/v1/completions', { prompt: 'x', priority: 'high' }, 400, /priority must be an integer \(lower goes first\), got "high"/],
      ['/v1/completions', { prompt: 'x', logprobs: 21 }, 400, /logprobs must be a whole number from 0 to 20/],
      ['/v1/completions', { prompt: 'x', stream: true, stream_options: { include_usage: 'yes' } }, 400, /include_usage must be a boolean/],
      ['/v1/chat/completions', { messages: [{ role: 'user', content: 'x' }], top_logprobs: 2 }, 400, /top_logprobs needs logprobs: true/],
      ['/v1/completions', { prompt: 42 }, 400, /prompt must be a string, a list of token ids, or a list/],
      ['/v1/chat/completions', { messages: 'hi' }, 400, /messages must be an array/],
      ['/v1/chat/completions', { messages: [{ role: 'user', content: 'x' }], response_format: { type: 'xml' } }, 400, /response_format.type must be/],
      ['/v1/nothing', {}, 404, /is not served/],
    ];
    for (const [path, body, status, message] of cases) {
      const response = await post(path, body);
      const answer = (await response.json()) as { message: string };
      expect([path, response.status]).toEqual([path, status]);
      expect(answer.message).toMatch(message);
    }
  });
});
