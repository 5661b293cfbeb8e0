/**
 * An OpenAI-compatible chat service over a sharded model, the online side of a platform team's
 * work: `buildOpenAIApp` serves a checkpoint from replicas of two tensor-parallel ranks each,
 * autoscaled by load, and any OpenAI client talks to it over HTTP (here, fetch): a chat answer,
 * one streamed token by token as server-sent events, one held to a JSON schema, and a burst of
 * users at once that makes the deployment scale up, then down again once they are gone.
 *
 *   node --import tsx examples/serve-llm.ts [port]      (default: a free port, printed)
 *
 * The model is a small GPT-2 of random weights with a byte-level tokenizer: its words are noise,
 * but the serving (continuous batching across requests, guided decoding, streaming, scaling) is
 * the real one.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildOpenAIApp, init, serve, shutdown } from '../lib/index.js';
import { byteTokenizerJson } from './model/byte-tokenizer.js';
import { randomWeights, writeCheckpoint } from './model/random-decoder.js';

const scratch = mkdtempSync(join(tmpdir(), 'trellis-serve-'));
const config = { vocabSize: 260, hiddenSize: 64, numLayers: 4, numHeads: 4, intermediateSize: 256, maxPositions: 512, layerNormEpsilon: 1e-5 };
const checkpoint = await writeCheckpoint(join(scratch, 'tiny-chat'), config, randomWeights(config, 7));
writeFileSync(join(checkpoint, 'tokenizer.json'), JSON.stringify(byteTokenizerJson()));
writeFileSync(join(checkpoint, 'tokenizer_config.json'), JSON.stringify({
  eos_token: '<|endoftext|>',
  chat_template: '{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}',
}));

await init({ numCpus: 2 });
try {
  const { proxy } = await serve.start({ http: { port: Number(process.argv[2] ?? 0) } });
  await serve.run(buildOpenAIApp({
    checkpoint,
    tensorParallel: 2,
    numCpusPerRank: 0.5,
    deployment: {
      autoscaling: { minReplicas: 1, maxReplicas: 2, targetOngoingRequests: 4, metricsIntervalMs: 100, lookBackPeriodMs: 500, upscaleDelayMs: 0, downscaleDelayMs: 1_000 },
    },
  }), { name: 'chat' });
  const base = `${proxy!.url}/v1`;
  console.log(`serving tiny-chat at ${base} (OpenAI-compatible)`);
  const replicas = () => serve.status().applications.chat.deployments.OpenAIServer.replicas.running;
  const chat = (body: object) => fetch(`${base}/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'tiny-chat', ...body }) });

  const answer = (await (await chat({ messages: [{ role: 'user', content: 'Hello!' }], max_tokens: 16, temperature: 0 })).json()) as {
    choices: Array<{ message: { content: string }; finish_reason: string }>;
    usage: { prompt_tokens: number; completion_tokens: number };
  };
  console.log(`chat: ${JSON.stringify(answer.choices[0].message.content)} (${answer.usage.prompt_tokens} prompt + ${answer.usage.completion_tokens} generated tokens, ${answer.choices[0].finish_reason})`);

  // Streamed: each event a delta, as the step that made it ends.
  const stream = await chat({ messages: [{ role: 'user', content: 'Tell me a story.' }], max_tokens: 24, temperature: 0.8, seed: 1, stream: true });
  let events = 0;
  let story = '';
  for (const line of (await stream.text()).split('\n\n')) {
    if (!line.startsWith('data: ') || line === 'data: [DONE]') continue;
    events++;
    story += (JSON.parse(line.slice(6)) as { choices: Array<{ delta: { content?: string } }> }).choices[0].delta.content ?? '';
  }
  console.log(`streamed: ${events} events, ${JSON.stringify(story)}`);

  // Held to a JSON schema (guided decoding): noise, but always this shape.
  const schema = { type: 'object', properties: { city: { type: 'string', maxLength: 10 }, sunny: { type: 'boolean' } }, required: ['city', 'sunny'], additionalProperties: false };
  const structured = (await (await chat({ messages: [{ role: 'user', content: 'Weather?' }], max_tokens: 64, seed: 2, response_format: { type: 'json_schema', json_schema: { name: 'weather', schema } } })).json()) as typeof answer;
  console.log(`json: ${JSON.stringify(JSON.parse(structured.choices[0].message.content))}`);

  // A burst of 64 users: the load per replica passes its target, so a second replica starts.
  const started = Date.now();
  const deployment = () => serve.status().applications.chat.deployments.OpenAIServer;
  let wanted = 1;
  let most = 1;
  const watcher = setInterval(() => {
    wanted = Math.max(wanted, deployment().targetReplicas);
    most = Math.max(most, replicas());
  }, 20);
  const burst = await Promise.all(Array.from({ length: 64 }, (_, user) => chat({ messages: [{ role: 'user', content: `I am user ${user}` }], max_tokens: 160, seed: user }).then((response) => response.json() as Promise<typeof answer>)));
  clearInterval(watcher);
  const tokens = burst.reduce((sum: number, reply) => sum + reply.usage.completion_tokens, 0);
  console.log(`burst: 64 chats, ${tokens} tokens in ${((Date.now() - started) / 1000).toFixed(1)} s; scaled to ${wanted} replicas (${most} serving at once)`);
  const deadline = Date.now() + 30_000;
  while (replicas() > 1 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 100));
  console.log(`idle again: ${replicas()} replica(s)`);
} finally {
  await shutdown();
  rmSync(scratch, { recursive: true, force: true });
}
