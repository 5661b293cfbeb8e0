/**
 * Choosing the next token from a sequence's logits. Every rank of the last stage chooses on its
 * own from the same gathered logits, so sampling must be deterministic: its random draw is a hash
 * of the request's seed and the token's position, never Math.random.
 *
 * The steps run in the order vLLM and transformers apply them: penalties for tokens already seen,
 * then temperature, then the filters (top-k, min-p, top-p), then the draw.
 */
import { InvalidArgumentError } from '../errors.js';

export interface SamplingParameters {
  /** 0 (the default) picks the most likely token; above 0 samples from softmax(logits / temperature). */
  temperature?: number;
  /** Sample among the k most likely tokens only (default: all). */
  topK?: number;
  /** Sample among the most likely tokens whose probabilities add up to topP (nucleus sampling; default 1: all). */
  topP?: number;
  /** Drop tokens less likely than minP × the most likely token's probability (default 0: none). */
  minP?: number;
  /**
   * Tokens of the prompt or generated so far: a positive logit is divided by it, a negative one
   * multiplied (transformers' and vLLM's repetition penalty; default 1: none).
   */
  repetitionPenalty?: number;
  /** Subtracted from the logit of every token generated so far (default 0). */
  presencePenalty?: number;
  /** Subtracted from a token's logit once for each time it was generated so far (default 0). */
  frequencyPenalty?: number;
  /** The draw's seed (default 0): the same seed gives the same text. */
  seed?: number;
  /**
   * Added to tokens' logits after the penalties, before temperature and the filters (OpenAI's and
   * vLLM's logit_bias): token id to bias; -100 all but bans a token, +100 all but forces it.
   */
  logitBias?: Record<number, number>;
}

/** What a sequence has seen, for the penalties: every token of its prompt and output, and its output's counts. */
export interface TokenHistory {
  seen: Set<number>;
  generated: Map<number, number>;
}

function samplingError(what: string, message: string): InvalidArgumentError {
  return new InvalidArgumentError(`${what}: ${message}`, 'ERR_SAMPLING');
}

function finiteNumber(what: string, name: string, value: unknown, check: (value: number) => boolean, expected: string): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || !check(value)) throw samplingError(what, `${name} must be ${expected}, got ${String(value)}`);
  return value;
}

const PARAMETERS = new Set(['temperature', 'topK', 'topP', 'minP', 'repetitionPenalty', 'presencePenalty', 'frequencyPenalty', 'seed', 'logitBias']);

function checkBias(what: string, value: unknown): Record<number, number> | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw samplingError(what, `logitBias must be an object of token id to bias, got ${JSON.stringify(value)}`);
  const bias: Record<number, number> = {};
  for (const [key, amount] of Object.entries(value)) {
    const token = Number(key);
    if (!Number.isInteger(token) || token < 0) throw samplingError(what, `logitBias: '${key}' is not a token id`);
    bias[token] = finiteNumber(what, `logitBias[${key}]`, amount, () => true, 'a finite number');
  }
  return Object.keys(bias).length > 0 ? bias : undefined;
}

export function checkSampling(sampling: unknown, what: string): SamplingParameters | undefined {
  if (sampling === undefined || sampling === null) return undefined;
  if (typeof sampling !== 'object') throw samplingError(what, `sampling must be an object, got ${String(sampling)}`);
  const fields = sampling as SamplingParameters;
  const unknown = Object.keys(fields).find((key) => !PARAMETERS.has(key));
  // A misspelt parameter would otherwise be ignored in silence.
  if (unknown !== undefined) throw samplingError(what, `sampling has no parameter '${unknown}' (it takes ${[...PARAMETERS].join(', ')})`);
  const temperature = finiteNumber(what, 'temperature', fields.temperature ?? 0, (value) => value >= 0, 'a number >= 0');
  const { topK, seed = 0 } = fields;
  if (topK !== undefined && (typeof topK !== 'number' || !Number.isInteger(topK) || topK < 1)) throw samplingError(what, `topK must be a positive integer, got ${String(topK)}`);
  if (typeof seed !== 'number' || !Number.isInteger(seed)) throw samplingError(what, `seed must be an integer, got ${String(seed)}`);
  const topP = finiteNumber(what, 'topP', fields.topP ?? 1, (value) => value > 0 && value <= 1, 'a number in (0, 1]');
  const minP = finiteNumber(what, 'minP', fields.minP ?? 0, (value) => value >= 0 && value < 1, 'a number in [0, 1)');
  const repetitionPenalty = finiteNumber(what, 'repetitionPenalty', fields.repetitionPenalty ?? 1, (value) => value > 0, 'a number > 0');
  const presencePenalty = finiteNumber(what, 'presencePenalty', fields.presencePenalty ?? 0, () => true, 'a finite number');
  const frequencyPenalty = finiteNumber(what, 'frequencyPenalty', fields.frequencyPenalty ?? 0, () => true, 'a finite number');
  const logitBias = checkBias(what, fields.logitBias);
  return {
    temperature,
    seed,
    ...(topK !== undefined ? { topK } : {}),
    ...(topP !== 1 ? { topP } : {}),
    ...(minP !== 0 ? { minP } : {}),
    ...(repetitionPenalty !== 1 ? { repetitionPenalty } : {}),
    ...(presencePenalty !== 0 ? { presencePenalty } : {}),
    ...(frequencyPenalty !== 0 ? { frequencyPenalty } : {}),
    ...(logitBias ? { logitBias } : {}),
  };
}

/** Whether picking needs the sequence's history (which a pipeline's last stage must then be sent). */
export function needsHistory(sampling: SamplingParameters | undefined): boolean {
  return sampling !== undefined && ((sampling.repetitionPenalty ?? 1) !== 1 || (sampling.presencePenalty ?? 0) !== 0 || (sampling.frequencyPenalty ?? 0) !== 0);
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

/** The logits with the penalties applied (a copy; the caller's logits stay as the model gave them). */
function penalized(logits: Float32Array, sampling: SamplingParameters, history: TokenHistory): Float32Array {
  const result = new Float32Array(logits);
  const repetition = sampling.repetitionPenalty ?? 1;
  if (repetition !== 1) {
    for (const token of history.seen) {
      const logit = result[token];
      result[token] = logit > 0 ? logit / repetition : logit * repetition;
    }
  }
  const presence = sampling.presencePenalty ?? 0;
  const frequency = sampling.frequencyPenalty ?? 0;
  if (presence !== 0 || frequency !== 0) {
    for (const [token, count] of history.generated) result[token] -= presence + frequency * count;
  }
  return result;
}

/**
 * Reorders `values` so that its k largest come first (in no order) and returns the k-th largest:
 * quickselect, linear on average, where sorting a 150,000-token vocabulary for a top-k of 40
 * costs ten times more on every token of every sequence.
 */
function selectLargest(values: Float32Array, k: number): number {
  let low = 0;
  let high = values.length - 1;
  const target = k - 1;
  while (low < high) {
    // Median of three as the pivot, then Hoare's partition (descending).
    const middle = (low + high) >>> 1;
    const a = values[low];
    const b = values[middle];
    const c = values[high];
    const pivot = a > b ? (b > c ? b : a > c ? c : a) : a > c ? a : b > c ? c : b;
    let left = low;
    let right = high;
    while (left <= right) {
      while (values[left] > pivot) left++;
      while (values[right] < pivot) right--;
      if (left <= right) {
        const swap = values[left];
        values[left] = values[right];
        values[right] = swap;
        left++;
        right--;
      }
    }
    if (target <= right) high = right;
    else if (target >= left) low = left;
    else break;
  }
  return values[target];
}

/**
 * The weight at which the most likely tokens (those at or above `floor`) first hold topP of the
 * mass of all of them. Tokens lighter than (1 - topP) × mass / vocabulary cannot be in it (all of
 * them together hold less than 1 - topP), so only the heavier ones are collected and sorted: a
 * trained model's nucleus is a few dozen tokens of a vocabulary of 150,000.
 */
function nucleusCut(weights: Float32Array, floor: number, topP: number): number {
  let total = 0;
  for (let index = 0; index < weights.length; index++) if (weights[index] >= floor) total += weights[index];
  const bound = Math.max(floor, ((1 - topP) * total) / weights.length);
  let count = 0;
  for (let index = 0; index < weights.length; index++) if (weights[index] >= bound && weights[index] > 0) count++;
  const heavy = new Float32Array(count);
  count = 0;
  for (let index = 0; index < weights.length; index++) if (weights[index] >= bound && weights[index] > 0) heavy[count++] = weights[index];
  heavy.sort().reverse();
  const wanted = topP * total;
  let mass = 0;
  for (const weight of heavy) {
    mass += weight;
    if (mass >= wanted) return weight;
  }
  // Rounding can leave the sum a hair short of topP × the total: then every heavy token stays.
  return heavy.length > 0 ? heavy[heavy.length - 1] : floor;
}

/**
 * The token at `position` (the one being generated), from `logits` over the whole vocabulary.
 * `history` is what the sequence has seen, for the penalties.
 */
export function pickToken(logits: Float32Array, sampling: SamplingParameters | undefined, position: number, history?: TokenHistory): number {
  let scores = sampling && history && needsHistory(sampling) ? penalized(logits, sampling, history) : logits;
  if (sampling?.logitBias) {
    if (scores === logits) scores = new Float32Array(logits);
    for (const [token, bias] of Object.entries(sampling.logitBias)) {
      const index = Number(token);
      // A bias on a token outside the vocabulary changes nothing; -infinity (banned) stays.
      if (index < scores.length) scores[index] += bias;
    }
  }
  const temperature = sampling?.temperature ?? 0;
  if (temperature === 0) return argmax(scores);
  // Weights proportional to the probabilities: e^((logit - max) / temperature), the largest 1.
  const maximum = scores[argmax(scores)];
  const weights = new Float32Array(scores.length);
  for (let index = 0; index < scores.length; index++) weights[index] = Math.exp((scores[index] - maximum) / temperature);
  // Each filter keeps the tokens whose weight is at least its cut; ties at a cut are all kept.
  let cut = 0;
  const { topK, topP = 1, minP = 0 } = sampling!;
  if (topK !== undefined && topK < weights.length) cut = Math.max(cut, selectLargest(weights.slice(), topK));
  // The most likely token's weight is 1, so min-p's cut is minP itself.
  if (minP > 0) cut = Math.max(cut, minP);
  // The smallest set of most likely tokens (after the cuts above) whose mass reaches topP.
  if (topP < 1) cut = Math.max(cut, nucleusCut(weights, cut, topP));
  let sum = 0;
  for (let index = 0; index < weights.length; index++) {
    if (weights[index] < cut) weights[index] = 0;
    sum += weights[index];
  }
  let target = draw(sampling?.seed ?? 0, position) * sum;
  let last = 0;
  for (let index = 0; index < weights.length; index++) {
    if (weights[index] === 0) continue;
    last = index;
    target -= weights[index];
    if (target < 0) return index;
  }
  return last;
}
