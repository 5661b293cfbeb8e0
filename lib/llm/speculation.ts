/**
 * Speculative decoding by n-gram lookup (vLLM's 'ngram' method, prompt lookup decoding): a
 * sequence's last few tokens are looked up earlier in its own text, and the tokens that followed
 * them there are proposed as the next ones. One step then reads the proposal whole, the model
 * picks a token at every position, and the proposal is kept up to the first position where the
 * pick differs, plus that pick: as many tokens as the plain steps would have given, for one
 * step. Picks draw from (seed, position) as a plain step does, so the text is the same with
 * speculation or without, greedy or sampled. It pays where outputs copy their input (extraction,
 * summaries quoting, code edits) and costs a little where they do not.
 */
import { InvalidArgumentError } from '../errors.js';

export interface SpeculationOptions {
  /** Only 'ngram' (prompt lookup): proposals come from the sequence's own tokens. */
  method?: 'ngram';
  /** Tokens proposed at most per step (default 4; vLLM's num_speculative_tokens). */
  tokens?: number;
  /** The longest and shortest tails looked up (defaults 4 and 1; vLLM's prompt_lookup_max and _min). */
  maxMatch?: number;
  minMatch?: number;
}

export interface Speculation {
  tokens: number;
  maxMatch: number;
  minMatch: number;
}

/** The options checked, with their defaults (throws InvalidArgumentError naming the field). */
export function checkSpeculation(options: SpeculationOptions): Speculation {
  if (typeof options !== 'object' || options === null) throw new InvalidArgumentError('speculation must be an object such as { method: "ngram", tokens: 4 }', 'ERR_SPECULATION');
  if (options.method !== undefined && options.method !== 'ngram') throw new InvalidArgumentError(`speculation.method must be 'ngram', got ${JSON.stringify(options.method)}`, 'ERR_SPECULATION');
  const field = (name: keyof SpeculationOptions, fallback: number): number => {
    const value = options[name] ?? fallback;
    if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > 64) throw new InvalidArgumentError(`speculation.${name} must be an integer from 1 to 64, got ${String(options[name])}`, 'ERR_SPECULATION');
    return value;
  };
  const speculation = { tokens: field('tokens', 4), maxMatch: field('maxMatch', 4), minMatch: field('minMatch', 1) };
  if (speculation.minMatch > speculation.maxMatch) throw new InvalidArgumentError(`speculation.minMatch ${speculation.minMatch} is above maxMatch ${speculation.maxMatch}`, 'ERR_SPECULATION');
  return speculation;
}

/**
 * Up to `limit` tokens proposed after `prompt` + `generated`: the longest tail (maxMatch down to
 * minMatch tokens) that occurs earlier, at its latest earlier occurrence, and what followed it.
 */
export function proposeTokens(prompt: Int32Array, generated: readonly number[], speculation: Speculation, limit: number): number[] {
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
