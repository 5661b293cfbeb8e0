/**
 * Speculative decoding: a decoding sequence proposes its next few tokens, one step of the model
 * reads the proposal whole and picks a token at every position, and the proposal is kept up to
 * the first position where the pick differs, plus that pick: as many tokens as the plain steps
 * would have given, for one step. Picks draw from (seed, position) as a plain step does, so the
 * text is the same with speculation or without, greedy or sampled, whoever proposes.
 *
 * Proposals come from n-gram lookup (vLLM's 'ngram' method, prompt lookup decoding: the tokens
 * that followed the sequence's last few tokens earlier in its own text), which pays where outputs
 * copy their input (extraction, summaries quoting, code edits), or from a draft model (vLLM's
 * draft-model method): a smaller checkpoint of the same vocabulary, run as a replica of its own,
 * generates them greedily; it pays where the draft agrees with the model often and costs much
 * less a token.
 */
import { InvalidArgumentError } from '../errors.js';
import type { WeightDType } from './kernels.js';

/** What both methods take. */
interface CommonSpeculationOptions {
  /** Tokens proposed at most per step (default 4; vLLM's num_speculative_tokens). */
  tokens?: number;
  /**
   * No proposals while more sequences than this run (vLLM's speculative_disable_by_batch_size):
   * a full batch already keeps the ranks busy, and checking proposals then costs about what
   * decoding does. Default: speculate at any batch size.
   */
  disableByBatchSize?: number;
}

export interface NgramSpeculationOptions extends CommonSpeculationOptions {
  /** 'ngram' (the default): proposals come from the sequence's own tokens. */
  method?: 'ngram';
  /** The longest and shortest tails looked up (defaults 4 and 1; vLLM's prompt_lookup_max and _min). */
  maxMatch?: number;
  minMatch?: number;
}

export interface DraftSpeculationOptions extends CommonSpeculationOptions {
  /** 'draft': proposals come from a draft model. */
  method: 'draft';
  /** The draft model's checkpoint (a directory or a .safetensors file beside its config.json); its vocabulary must be the model's. */
  checkpoint: string;
  /** Where the draft runs (default: the model's device). It is one rank, with numCpusPerRank CPUs (default: the model's). */
  device?: 'cpu' | 'cuda';
  numCpusPerRank?: number;
  /**
   * How the draft keeps its weights (as the model's weightDtype; default 'auto'): a draft reads
   * its every weight for each token it drafts, so 'int8' (a quarter of f32's bytes) makes it
   * cheaper, at some agreement with the model.
   */
  weightDtype?: WeightDType | 'auto';
  /**
   * Positions of finished drafts the draft replica keeps (default 16,384): each sequence's next
   * draft starts from its last, reading only the tokens kept since, while they fit.
   */
  prefixCacheTokens?: number;
}

export type SpeculationOptions = NgramSpeculationOptions | DraftSpeculationOptions;

export interface NgramSpeculation {
  method: 'ngram';
  tokens: number;
  disableByBatchSize: number;
  maxMatch: number;
  minMatch: number;
}

export interface DraftSpeculation {
  method: 'draft';
  tokens: number;
  disableByBatchSize: number;
  checkpoint: string;
  device: 'cpu' | 'cuda' | undefined;
  numCpusPerRank: number | undefined;
  weightDtype: WeightDType | 'auto' | undefined;
  prefixCacheTokens: number;
}

export type Speculation = NgramSpeculation | DraftSpeculation;

/** The options checked, with their defaults (throws InvalidArgumentError naming the field). */
export function checkSpeculation(options: SpeculationOptions): Speculation {
  if (typeof options !== 'object' || options === null) throw new InvalidArgumentError('speculation must be an object such as { method: "ngram", tokens: 4 }', 'ERR_SPECULATION');
  const given = options as Record<string, unknown>;
  const disableByBatchSize = given.disableByBatchSize === undefined ? Infinity : given.disableByBatchSize;
  if (disableByBatchSize !== Infinity && (typeof disableByBatchSize !== 'number' || !Number.isInteger(disableByBatchSize) || disableByBatchSize < 1)) {
    throw new InvalidArgumentError(`speculation.disableByBatchSize must be an integer from 1, got ${String(given.disableByBatchSize)}`, 'ERR_SPECULATION');
  }
  const field = (name: string, fallback: number, most = 64): number => {
    const value = given[name] ?? fallback;
    if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > most) throw new InvalidArgumentError(`speculation.${name} must be an integer from 1 to ${most}, got ${String(given[name])}`, 'ERR_SPECULATION');
    return value;
  };
  if (options.method === 'draft') {
    if (typeof options.checkpoint !== 'string' || options.checkpoint.length === 0) throw new InvalidArgumentError("speculation by a draft model needs its checkpoint: { method: 'draft', checkpoint: '/path/to/draft' }", 'ERR_SPECULATION');
    if (options.device !== undefined && options.device !== 'cpu' && options.device !== 'cuda') throw new InvalidArgumentError(`speculation.device must be 'cpu' or 'cuda', got ${JSON.stringify(options.device)}`, 'ERR_SPECULATION');
    const numCpus = options.numCpusPerRank;
    if (numCpus !== undefined && (typeof numCpus !== 'number' || !(numCpus >= 0))) throw new InvalidArgumentError(`speculation.numCpusPerRank must be a number >= 0, got ${String(numCpus)}`, 'ERR_SPECULATION');
    const unknown = Object.keys(options).filter((name) => !['method', 'checkpoint', 'tokens', 'disableByBatchSize', 'device', 'numCpusPerRank', 'weightDtype', 'prefixCacheTokens'].includes(name));
    if (unknown.length > 0) throw new InvalidArgumentError(`speculation by a draft model does not take ${unknown.join(', ')}`, 'ERR_SPECULATION');
    return { method: 'draft', tokens: field('tokens', 4), disableByBatchSize, checkpoint: options.checkpoint, device: options.device, numCpusPerRank: numCpus, weightDtype: options.weightDtype, prefixCacheTokens: field('prefixCacheTokens', 16_384, 2 ** 30) };
  }
  if (options.method !== undefined && options.method !== 'ngram') throw new InvalidArgumentError(`speculation.method must be 'ngram' or 'draft', got ${JSON.stringify(options.method)}`, 'ERR_SPECULATION');
  const speculation: NgramSpeculation = { method: 'ngram', tokens: field('tokens', 4), disableByBatchSize, maxMatch: field('maxMatch', 4), minMatch: field('minMatch', 1) };
  if (speculation.minMatch > speculation.maxMatch) throw new InvalidArgumentError(`speculation.minMatch ${speculation.minMatch} is above maxMatch ${speculation.maxMatch}`, 'ERR_SPECULATION');
  return speculation;
}

/**
 * Up to `limit` tokens proposed after `prompt` + `generated`: the longest tail (maxMatch down to
 * minMatch tokens) that occurs earlier, at its latest earlier occurrence, and what followed it.
 */
export function proposeTokens(prompt: Int32Array, generated: readonly number[], speculation: NgramSpeculation, limit: number): number[] {
  if (limit <= 0) return [];
  const length = prompt.length + generated.length;
  const at = (index: number): number => (index < prompt.length ? prompt[index] : generated[index - prompt.length]);
  for (let size = Math.min(speculation.maxMatch, length - 1); size >= speculation.minMatch; size--) {
    const tail = length - size;
    // The latest earlier start whose `size` tokens equal the tail's, with something after them.
    for (let start = tail - 1; start >= 0; start--) {
      let same = true;
      for (let offset = 0; offset < size && same; offset++) same = at(start + offset) === at(tail + offset);
      if (!same) continue;
      const proposal: number[] = [];
      for (let index = start + size; index < length && proposal.length < Math.min(limit, speculation.tokens); index++) proposal.push(at(index));
      return proposal;
    }
  }
  return [];
}
