/**
 * Reasoning models (Qwen3, DeepSeek-R1) think before they answer, between markers such as
 * <think> and </think>: the processor splits that part off the answer (vLLM's reasoning
 * parsers), and a guide (a JSON schema, a regex) applies to the answer alone, from the token
 * after the end marker on, as vLLM's structured outputs do with reasoning.
 */
import { InvalidArgumentError } from '../errors.js';
import { TokenMask } from './guided/token-mask.js';
import type { Tokenizer } from './tokenizer.js';

export interface ReasoningOptions {
  /** The marker that opens the reasoning, left out of `reasoningText` (default '<think>'). */
  start?: string;
  /** The marker that ends it: one token of the tokenizer, as reasoning models' vocabularies have it (default '</think>'). */
  end?: string;
}

export interface ReasoningMarkers {
  start: string;
  /** The end marker's token id. */
  end: number;
}

/** The markers checked against the tokenizer: the end must be a single token (throws InvalidArgumentError 'ERR_REASONING'). */
export function reasoningMarkers(options: ReasoningOptions | true, tokenizer: Tokenizer): ReasoningMarkers {
  const { start = '<think>', end = '</think>' } = options === true ? {} : options;
  if (typeof start !== 'string' || typeof end !== 'string' || end.length === 0) throw new InvalidArgumentError('reasoning markers must be strings, the end one non-empty', 'ERR_REASONING');
  const id = tokenizer.tokenToId(end);
  if (id === undefined) throw new InvalidArgumentError(`the reasoning end marker ${JSON.stringify(end)} is not one token of the tokenizer (reasoning models have it as an added token)`, 'ERR_REASONING');
  return { start, end: id };
}

/** The generated tokens split at the first end marker: what came before (reasoning) and after (the answer); no marker: all reasoning. */
export function splitReasoning(tokens: readonly number[], markers: ReasoningMarkers): { reasoning: readonly number[]; answer: readonly number[]; ended: boolean } {
  const at = tokens.indexOf(markers.end);
  if (at < 0) return { reasoning: tokens, answer: [], ended: false };
  return { reasoning: tokens.slice(0, at), answer: tokens.slice(at + 1), ended: true };
}

/**
 * A constraint that leaves the reasoning free (every token of the vocabulary) and hands the
 * answer, the tokens after the end marker, to `inner`. Each generation's answer is kept as one
 * growing array, so a guide walks only its new tokens.
 */
export function afterReasoning<T>(markers: ReasoningMarkers, vocabularySize: number, inner: (generated: readonly number[]) => T): (generated: readonly number[]) => T | TokenMask {
  const free = new TokenMask(vocabularySize);
  free.words.fill(0xffffffff);
  // Bits past the vocabulary stay clear.
  if (vocabularySize % 32 !== 0) free.words[free.words.length - 1] = (2 ** (vocabularySize % 32) - 1) >>> 0;
  const answers = new WeakMap<readonly number[], { start: number; answer: number[] }>();
  return (generated) => {
    let entry = answers.get(generated);
    if (!entry) {
      const at = generated.indexOf(markers.end);
      if (at < 0) return free;
      entry = { start: at + 1, answer: [] };
      answers.set(generated, entry);
    }
    for (let index = entry.start + entry.answer.length; index < generated.length; index++) entry.answer.push(generated[index]);
    return inner(entry.answer);
  };
}
