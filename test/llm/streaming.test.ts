/**
 * Streamed generation: ModelReplica.stream yields each token as its step ends, token for token what
 * generate() gives; a reader that stops early ends its sequence; an actor hosting a replica streams
 * a reply to callers in other processes through a generator method.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { ModelReplica, get, init, shutdown, type GeneratedToken } from '../../lib/index.js';
import { RemoteChatServer } from './fixtures/chat-server.js';
import { randomWeights, referenceGenerate, TINY, writeCheckpoint, type Weights } from './fixtures/decoders.js';
import { until } from '../core/helpers.js';

const PROMPTS = [[5, 17, 3], [42], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]];
let directory: string;
let checkpoint: string;
let weights: Weights;

beforeAll(async () => {
  directory = mkdtempSync(join(tmpdir(), 'trellis-llm-stream-'));
  weights = randomWeights(TINY, 11);
  checkpoint = await writeCheckpoint(join(directory, 'tiny'), TINY, weights, { prefix: 'transformer.' });
  await init({ numCpus: 4 });
});

afterAll(async () => {
  await shutdown();
  rmSync(directory, { recursive: true, force: true });
});

it('streams each token of a generation as its step ends, the tokens generate() gives', async () => {
  await using replica = await ModelReplica.create({ checkpoint, tensorParallel: 2, maxTokensPerStep: 8 });
  const expected = PROMPTS.map((prompt) => referenceGenerate(TINY, weights, prompt, 6));
  // Streams side by side share steps, as generate()'s requests do.
  const streamed = await Promise.all(
    PROMPTS.map(async (tokens) => {
      const parts: GeneratedToken[] = [];
      for await (const part of replica.stream({ tokens, maxNewTokens: 6, logprobs: true })) parts.push(part);
      return parts;
    }),
  );
  expect(streamed.map((parts) => parts.map((part) => part.token))).toEqual(expected);
  for (const parts of streamed) {
    expect(parts.map((part) => part.index)).toEqual([0, 1, 2, 3, 4, 5]);
    expect(parts.every((part) => typeof part.logprob === 'number' && part.logprob <= 0)).toBe(true);
    expect(parts.map((part) => part.finishReason)).toEqual([undefined, undefined, undefined, undefined, undefined, 'length']);
  }
  // A stop token ends it early, the last part saying why.
  const stop = expected[0][2];
  const stopped: GeneratedToken[] = [];
  for await (const part of replica.stream({ tokens: PROMPTS[0], maxNewTokens: 6, stopTokens: [stop] })) stopped.push(part);
  expect(stopped.map((part) => part.token)).toEqual(expected[0].slice(0, 3));
  expect(stopped.at(-1)?.finishReason).toBe('stop');
});

it('ends a sequence whose reader stops early, and names bad requests', async () => {
  await using replica = await ModelReplica.create({ checkpoint, maxTokensPerStep: 8 });
  const taken: number[] = [];
  for await (const part of replica.stream({ tokens: PROMPTS[0], maxNewTokens: 200 })) {
    taken.push(part.token);
    if (taken.length === 2) break;
  }
  expect(taken).toEqual(referenceGenerate(TINY, weights, PROMPTS[0], 2));
  await until(() => replica.stats().running === 0, 'the abandoned sequence to end');
  expect(replica.stats().generatedTokens).toBeLessThan(10);
  // The replica goes on serving.
  const [generation] = await replica.generate([{ tokens: PROMPTS[1], maxNewTokens: 3 }]);
  expect(generation.tokens).toEqual(referenceGenerate(TINY, weights, PROMPTS[1], 3));
  const bad = replica.stream({ tokens: PROMPTS[0], maxNewTokens: 0 });
  await expect(bad.next()).rejects.toThrow(/maxNewTokens/);
});

it('streams a reply from an actor hosting the replica to a caller in another process', async () => {
  await using server = RemoteChatServer.remote();
  await get(server.load.remote(checkpoint, 2));
  const expected = referenceGenerate(TINY, weights, PROMPTS[2], 8);
  const tokens: number[] = [];
  let last: GeneratedToken | undefined;
  for await (const part of server.reply.remote({ tokens: PROMPTS[2], maxNewTokens: 8 }).values()) {
    tokens.push(part.token);
    last = part;
  }
  expect(tokens).toEqual(expected);
  expect(last?.finishReason).toBe('length');
  // A caller that lets go ends the sequence in the actor too.
  for await (const part of server.reply.remote({ tokens: PROMPTS[0], maxNewTokens: 500 }).values()) {
    if (part.index === 1) break;
  }
  // (maxConcurrency lets this call run beside the reply, which ends at its next token.)
  const deadline = Date.now() + 20_000;
  while ((await get(server.running.remote())) !== 0) {
    if (Date.now() > deadline) throw new Error('the abandoned sequence did not end');
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  await get(server.close.remote());
});
