import { describe, expect, it } from 'vitest';
import { InvalidArgumentError } from '../../lib/errors.js';
import { checkSampling, pickToken, type SamplingParameters, type TokenHistory } from '../../lib/llm/sampling.js';

/** Logits whose probabilities at temperature 1 are `probabilities` (normalized). */
function logitsFor(probabilities: number[]): Float32Array {
  return Float32Array.from(probabilities, (probability) => (probability > 0 ? Math.log(probability) : -1e30));
}

/** How often each token is drawn over `draws` positions. */
function frequencies(logits: Float32Array, sampling: SamplingParameters, draws = 20_000): number[] {
  const counts = new Array<number>(logits.length).fill(0);
  for (let position = 0; position < draws; position++) counts[pickToken(logits, sampling, position)]++;
  return counts.map((count) => count / draws);
}

const history = (seen: number[], generated: Array<[number, number]> = []): TokenHistory => ({ seen: new Set(seen), generated: new Map(generated) });

describe('sampling', () => {
  const probabilities = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04];
  const logits = logitsFor(probabilities);

  it('picks the most likely token at temperature 0, and draws in proportion above it', () => {
    expect(pickToken(logits, undefined, 0)).toBe(0);
    expect(pickToken(logits, { temperature: 0, topK: 3 }, 5)).toBe(0);
    const drawn = frequencies(logits, { temperature: 1, seed: 3 });
    drawn.forEach((frequency, token) => expect(Math.abs(frequency - probabilities[token])).toBeLessThan(0.015));
    // The same seed and position give the same token; positions differ.
    expect(pickToken(logits, { temperature: 1, seed: 3 }, 17)).toBe(pickToken(logits, { temperature: 1, seed: 3 }, 17));
  });

  it('top-k, top-p and min-p keep only their tokens, renormalized', () => {
    // top-k 2: tokens 0 and 1, in the ratio 0.4 : 0.25.
    const topK = frequencies(logits, { temperature: 1, topK: 2, seed: 1 });
    expect(topK.slice(2).every((frequency) => frequency === 0)).toBe(true);
    expect(Math.abs(topK[0] - 0.4 / 0.65)).toBeLessThan(0.015);
    // top-p 0.7: the smallest set reaching 0.7 is {0, 1, 2} (0.4 + 0.25 = 0.65 falls short).
    const topP = frequencies(logits, { temperature: 1, topP: 0.7, seed: 2 });
    expect(topP.slice(3).every((frequency) => frequency === 0)).toBe(true);
    expect(Math.abs(topP[2] - 0.15 / 0.8)).toBeLessThan(0.015);
    // top-p small enough keeps the most likely token alone.
    expect(frequencies(logits, { temperature: 1, topP: 0.1, seed: 2 }, 500)[0]).toBe(1);
    // min-p 0.3: tokens at least 0.3 × 0.4 = 0.12 likely: {0, 1, 2}.
    const minP = frequencies(logits, { temperature: 1, minP: 0.3, seed: 4 });
    expect(minP.slice(3).every((frequency) => frequency === 0)).toBe(true);
    expect(minP.slice(0, 3).every((frequency) => frequency > 0)).toBe(true);
    // The filters compose: top-p counts the mass top-k kept (0.9). Tokens 0-2 hold 0.8 of it,
    // 0.889: enough for top-p 0.85, short of 0.9.
    const narrower = frequencies(logits, { temperature: 1, topK: 4, topP: 0.85, seed: 5 });
    expect(narrower.slice(3).every((frequency) => frequency === 0)).toBe(true);
    const wider = frequencies(logits, { temperature: 1, topK: 4, topP: 0.9, seed: 5 });
    expect(wider.slice(4).every((frequency) => frequency === 0)).toBe(true);
    expect(wider[3]).toBeGreaterThan(0);
  });

  it('penalizes tokens seen: repetition on prompt and output, presence and frequency on output', () => {
    // Token 0 (logit 2) divided by 2 falls below token 1 (logit 1.5); a negative logit is multiplied.
    const scores = Float32Array.from([2, 1.5, -1, -1.2]);
    expect(pickToken(scores, { repetitionPenalty: 2 }, 0, history([0]))).toBe(1);
    expect(pickToken(Float32Array.from([-1, -1.5]), { repetitionPenalty: 2 }, 0, history([0]))).toBe(1);
    // Presence takes 0.6 from each generated token; frequency 0.3 per time.
    expect(pickToken(scores, { presencePenalty: 0.6 }, 0, history([0], [[0, 1]]))).toBe(1);
    expect(pickToken(scores, { frequencyPenalty: 0.3 }, 0, history([0], [[0, 1]]))).toBe(0);
    expect(pickToken(scores, { frequencyPenalty: 0.3 }, 0, history([0], [[0, 2]]))).toBe(1);
    // The caller's logits are not changed.
    expect(Array.from(scores)).toEqual([2, 1.5, -1, -1.2].map(Math.fround));
    // Without a history, penalties have nothing to act on.
    expect(pickToken(scores, { repetitionPenalty: 2 }, 0)).toBe(0);
  });

  it('logitBias shifts tokens: forced, banned, reweighted; checked', () => {
    expect(pickToken(logits, { logitBias: { 4: 100 } }, 0)).toBe(4);
    expect(pickToken(logits, { logitBias: { 0: -100 } }, 0)).toBe(1);
    // +log 2 on token 5 doubles its odds against the rest.
    const drawn = frequencies(logits, { temperature: 1, seed: 2, logitBias: { 5: Math.log(2) } });
    expect(Math.abs(drawn[5] - 0.08 / 1.04)).toBeLessThan(0.015);
    expect(Array.from(logits)).toEqual(Array.from(logitsFor(probabilities)));
    expect(checkSampling({ logitBias: { '7': -2 } }, 'request 0')).toEqual({ temperature: 0, seed: 0, logitBias: { 7: -2 } });
    expect(() => checkSampling({ logitBias: { x: 1 } }, 'request 0')).toThrow(/logitBias: 'x' is not a token id/);
    expect(() => checkSampling({ logitBias: { 3: Infinity } }, 'request 0')).toThrow(/logitBias\[3\] must be a finite number/);
  });

  it('names a parameter that is out of range or unknown', () => {
    const cases: Array<[unknown, string]> = [
      [{ temperature: -1 }, 'temperature must be a number >= 0'],
      [{ topK: 0 }, 'topK must be a positive integer'],
      [{ topP: 0 }, 'topP must be a number in (0, 1]'],
      [{ topP: 1.5 }, 'topP must be a number in (0, 1]'],
      [{ minP: 1 }, 'minP must be a number in [0, 1)'],
      [{ repetitionPenalty: 0 }, 'repetitionPenalty must be a number > 0'],
      [{ presencePenalty: Infinity }, 'presencePenalty must be a finite number'],
      [{ frequencyPenalty: '1' }, 'frequencyPenalty must be a finite number'],
      [{ seed: 1.5 }, 'seed must be an integer'],
      [{ top_p: 0.9 }, "sampling has no parameter 'top_p'"],
      ['hot', 'sampling must be an object'],
    ];
    for (const [sampling, fragment] of cases) {
      let thrown: unknown;
      try {
        checkSampling(sampling, 'request 0');
      } catch (error) {
        thrown = error;
      }
      expect(thrown).toBeInstanceOf(InvalidArgumentError);
      expect(thrown).toMatchObject({ code: 'ERR_SAMPLING' });
      expect((thrown as Error).message).toContain(`request 0: ${fragment}`);
    }
    // Defaults are left out, so a request's parameters stay small on the wire.
    expect(checkSampling({ temperature: 0.7, topP: 1, minP: 0, repetitionPenalty: 1 }, 'x')).toEqual({ temperature: 0.7, seed: 0 });
  });
});
