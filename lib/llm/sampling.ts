/**
 * Choosing the next token from a sequence's logits. Every rank of the last stage chooses on its
 * own from the same gathered logits, so sampling must be deterministic: its random draw is a hash
 * of the request's seed and the token's position, never Math.random.
 */
import { InvalidArgumentError } from '../errors.js';

export interface SamplingParameters {
  /** 0 (the default) picks the most likely token; above 0 samples from softmax(logits / temperature). */
  temperature?: number;
  /** Sample among the k most likely tokens only (default: all). */
  topK?: number;
  /** The draw's seed (default 0): the same seed gives the same text. */
  seed?: number;
}

export function checkSampling(sampling: unknown, what: string): SamplingParameters | undefined {
  if (sampling === undefined || sampling === null) return undefined;
  if (typeof sampling !== 'object') throw new InvalidArgumentError(`${what}: sampling must be an object, got ${String(sampling)}`, 'ERR_SAMPLING');
  const { temperature = 0, topK, seed = 0 } = sampling as SamplingParameters;
  if (typeof temperature !== 'number' || !(temperature >= 0) || !Number.isFinite(temperature)) {
    throw new InvalidArgumentError(`${what}: temperature must be a number >= 0, got ${String(temperature)}`, 'ERR_SAMPLING');
  }
  if (topK !== undefined && (typeof topK !== 'number' || !Number.isInteger(topK) || topK < 1)) {
    throw new InvalidArgumentError(`${what}: topK must be a positive integer, got ${String(topK)}`, 'ERR_SAMPLING');
  }
  if (typeof seed !== 'number' || !Number.isInteger(seed)) throw new InvalidArgumentError(`${what}: seed must be an integer, got ${String(seed)}`, 'ERR_SAMPLING');
  return { temperature, topK, seed };
}

/** A uniform draw in [0, 1) from (seed, position): splitmix32's finalizer over the pair. */
function draw(seed: number, position: number): number {
  let value = (Math.imul(seed | 0, 0x9e3779b1) ^ Math.imul(position | 0, 0x85ebca6b)) >>> 0;
  value = Math.imul(value ^ (value >>> 16), 0x21f0aaad);
  value = Math.imul(value ^ (value >>> 15), 0x735a2d97);
  return ((value ^ (value >>> 15)) >>> 0) / 2 ** 32;
}

function argmax(logits: Float32Array): number {
  let best = 0;
  for (let index = 1; index < logits.length; index++) if (logits[index] > logits[best]) best = index;
  return best;
}

/** The token at `position` (the one being generated), from `logits` over the whole vocabulary. */
export function pickToken(logits: Float32Array, sampling: SamplingParameters | undefined, position: number): number {
  const temperature = sampling?.temperature ?? 0;
  if (temperature === 0) return argmax(logits);
  let candidates = Array.from(logits.keys());
  if (sampling?.topK !== undefined && sampling.topK < logits.length) {
    candidates.sort((a, b) => logits[b] - logits[a] || a - b);
    candidates = candidates.slice(0, sampling.topK);
  }
  let maximum = -Infinity;
  for (const index of candidates) maximum = Math.max(maximum, logits[index]);
  const weights = candidates.map((index) => Math.exp((logits[index] - maximum) / temperature));
  const sum = weights.reduce((total, weight) => total + weight, 0);
  let target = draw(sampling?.seed ?? 0, position) * sum;
  for (let index = 0; index < candidates.length; index++) {
    target -= weights[index];
    if (target < 0) return candidates[index];
  }
  return candidates[candidates.length - 1];
}
