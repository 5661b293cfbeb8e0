/**
 * Beam search (vLLM's LLM.beam_search, Hugging Face's num_beams): the `beamWidth` likeliest
 * continuations are kept at each step, each ranked by its summed log-probability; at the end
 * the finished and unfinished beams are ranked by that sum over their length to the power
 * `lengthPenalty`, and the best `beamWidth` are returned.
 *
 * Each step asks the model for the 2 x beamWidth likeliest next tokens of every live beam (a
 * one-token generation with top log-probabilities: the model's log-softmax, before any sampling
 * settings) and keeps the best beamWidth candidates overall. A candidate that is a stop token
 * among those best finishes its beam (ranked with the others at the end); the rest stay live.
 * The search ends at maxNewTokens, when no beam is live, or once beamWidth beams have finished
 * and the best live beam's score is below the worst of them (Hugging Face's default stopping:
 * a live beam could still climb only where lengthPenalty rewards length a great deal).
 *
 * As in vLLM, the steps are ordinary requests whose prompt is the beam so far: the replica's
 * prefix cache starts each beam from all the positions of its parent's request of the step
 * before, so a step reads one token a beam, not the beam. Every beam of every search in the
 * replica shares its steps.
 */
import { InvalidArgumentError } from '../errors.js';

export interface BeamSearchOptions {
  /** Beams kept at each step and returned (1 to 10: each step reads 2 x beamWidth top tokens, at most 20). */
  beamWidth: number;
  /**
   * Beams are ranked by their summed log-probability over (tokens generated)^lengthPenalty
   * (default 1: the mean per token; 0 the plain sum, which favours short answers).
   */
  lengthPenalty?: number;
}

export interface BeamSearchRequest extends BeamSearchOptions {
  /** The prompt's token ids. */
  tokens: ArrayLike<number>;
  /** Tokens a beam generates at most (default 16). */
  maxNewTokens?: number;
  /** Tokens that finish a beam, kept in it (default: the replica's stopTokens). */
  stopTokens?: number[];
  /** The LoRA adapter to search with (a registered name); none: the base model. */
  adapter?: string;
}

export interface Beam {
  /** The generated tokens, without the prompt (a finished beam's stop token last). */
  tokens: number[];
  /** The sum of its tokens' log-probabilities. */
  logprob: number;
  /** What it was ranked by: logprob / tokens.length ^ lengthPenalty. */
  score: number;
  finishReason: 'stop' | 'length' | 'max-positions';
}

export interface BeamSearchResult {
  /** The best beamWidth beams, best first (fewer where fewer tokens could follow the prompt). */
  beams: Beam[];
  promptTokens: number;
}

/** The next-token candidates of one live beam: its top tokens and their log-probabilities. */
export type NextTokens = ReadonlyArray<{ token: number; logprob: number }>;

/** What a search needs of the model: each prefix's `count` likeliest next tokens, one list per prefix. */
export type NextTokenReader = (prefixes: Int32Array[], count: number) => Promise<NextTokens[]>;

/** The search's parameters, checked (InvalidArgumentError, code ERR_BEAM_SEARCH, naming the field). */
export function checkBeamSearch(options: BeamSearchOptions, what = 'beamSearch'): Required<BeamSearchOptions> {
  if (typeof options !== 'object' || options === null) throw new InvalidArgumentError(`${what} must be an object such as { beamWidth: 4 }`, 'ERR_BEAM_SEARCH');
  const { beamWidth, lengthPenalty = 1 } = options;
  if (typeof beamWidth !== 'number' || !Number.isInteger(beamWidth) || beamWidth < 1 || beamWidth > 10) {
    throw new InvalidArgumentError(`${what}.beamWidth must be an integer from 1 to 10, got ${String(beamWidth)}`, 'ERR_BEAM_SEARCH');
  }
  if (typeof lengthPenalty !== 'number' || !Number.isFinite(lengthPenalty)) {
    throw new InvalidArgumentError(`${what}.lengthPenalty must be a finite number, got ${String(lengthPenalty)}`, 'ERR_BEAM_SEARCH');
  }
  return { beamWidth, lengthPenalty };
}

interface LiveBeam {
  tokens: number[];
  logprob: number;
}

/**
 * Runs one search over `prompt`: at most `limit` new tokens a beam (its maxNewTokens, or fewer
 * where the model's positions end first: those beams end as 'max-positions').
 */
export async function beamSearch(
  read: NextTokenReader,
  prompt: Int32Array,
  options: Required<BeamSearchOptions> & { maxNewTokens: number; stopTokens: ReadonlySet<number>; maxPositions: number },
): Promise<BeamSearchResult> {
  const { beamWidth, lengthPenalty, maxNewTokens, stopTokens } = options;
  const limit = Math.min(maxNewTokens, options.maxPositions - prompt.length);
  const score = (beam: LiveBeam) => beam.logprob / Math.max(1, beam.tokens.length) ** lengthPenalty;
  const finished: Beam[] = [];
  let live: LiveBeam[] = [{ tokens: [], logprob: 0 }];
  for (let step = 0; step < limit && live.length > 0; step++) {
    const prefixes = live.map((beam) => {
      const prefix = new Int32Array(prompt.length + beam.tokens.length);
      prefix.set(prompt);
      prefix.set(beam.tokens, prompt.length);
      return prefix;
    });
    const next = await read(prefixes, Math.min(20, 2 * beamWidth));
    const candidates: Array<{ parent: number; token: number; logprob: number }> = [];
    live.forEach((beam, parent) => {
      for (const { token, logprob } of next[parent]) candidates.push({ parent, token, logprob: beam.logprob + logprob });
    });
    // Ties go to the earlier beam, then the lower token: the same search gives the same beams.
    candidates.sort((a, b) => b.logprob - a.logprob || a.parent - b.parent || a.token - b.token);
    const kept: LiveBeam[] = [];
    for (const [rank, candidate] of candidates.entries()) {
      if (kept.length === beamWidth) break;
      const beam = { tokens: [...live[candidate.parent].tokens, candidate.token], logprob: candidate.logprob };
      if (stopTokens.has(candidate.token)) {
        // A stop token among the best beamWidth finishes a beam; further down, it only takes a place.
        if (rank < beamWidth) finished.push({ ...beam, score: score(beam), finishReason: 'stop' });
      } else {
        kept.push(beam);
      }
    }
    live = kept;
    if (finished.length >= beamWidth && live.length > 0) {
      finished.sort((a, b) => b.score - a.score);
      finished.length = beamWidth;
      if (Math.max(...live.map(score)) < finished[beamWidth - 1].score) live = [];
    }
  }
  const ended: Beam['finishReason'] = limit < maxNewTokens ? 'max-positions' : 'length';
  const beams = [...finished, ...live.map((beam) => ({ ...beam, score: score(beam), finishReason: ended }))];
  beams.sort((a, b) => b.score - a.score);
  return { beams: beams.slice(0, beamWidth), promptTokens: prompt.length };
}
