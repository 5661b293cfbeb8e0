import { describe, expect, it } from 'vitest';
import { PrefixCache, type PrefixSequence } from '../../lib/llm/prefix-cache.js';

let nextId = 0;
const sequence = (tokens: number[], past = 0): PrefixSequence => ({ id: nextId++, prompt: Int32Array.from(tokens), past });
const range = (from: number, count: number) => Array.from({ length: count }, (_, index) => from + index);

describe('prefix cache', () => {
  it('finds whole blocks, longest first, goes on token by token, never takes the whole prompt, and checks the tokens', () => {
    const cache = new PrefixCache<PrefixSequence>(4, 100);
    const first = sequence(range(0, 10));
    expect(cache.admit(first)).toBeUndefined();
    first.past = 10;
    // 9 shared tokens: two whole blocks found, then the 9th matched.
    expect(cache.admit(sequence([...range(0, 9), 99]))).toMatchObject({ kind: 'match', match: { source: first, length: 9 } });
    // The same 8 tokens as a whole prompt: its last token is read.
    expect(cache.admit(sequence(range(0, 8)))).toMatchObject({ kind: 'match', match: { length: 7 } });
    // Other tokens: no match.
    expect(cache.admit(sequence(range(1, 10)))).toBeUndefined();
    expect(cache.reusedTokens).toBe(16);
  });

  it("takes the source that matches furthest, through what it generated (a beam's parent, a conversation's last answer)", () => {
    const cache = new PrefixCache<PrefixSequence>(4, 100);
    const sibling = { ...sequence(range(0, 6), 6) };
    const parent = { ...sequence([...range(0, 5), 42], 6) };
    const answered = { ...sequence(range(0, 4), 7), generated: [50, 51, 52, 53] };
    for (const source of [sibling, parent, answered]) cache.admit(source);
    // The beam [0..4, 42, 7]: all three hold the first block; the parent holds all but its last token.
    expect(cache.admit(sequence([...range(0, 5), 42, 7]))).toMatchObject({ kind: 'match', match: { source: parent, length: 6 } });
    // The next turn of a conversation: the earlier prompt, its answer as read (7 positions), then more.
    expect(cache.admit(sequence([...range(0, 4), 50, 51, 52, 53, 60]))).toMatchObject({ kind: 'match', match: { source: answered, length: 7 } });
  });

  it('says wait while a running sequence is still reading the prefix', () => {
    const cache = new PrefixCache<PrefixSequence>(4, 100);
    const reader = sequence(range(0, 12));
    expect(cache.admit(reader)).toBeUndefined();
    const follower = sequence([...range(0, 12), 50]);
    expect(cache.admit(follower)).toEqual({ kind: 'wait' });
    reader.past = 8;
    // Part of it is read now, more is coming: still wait for the longest.
    expect(cache.admit(follower)).toEqual({ kind: 'wait' });
    reader.past = 12;
    expect(cache.admit(follower)).toMatchObject({ kind: 'match', match: { source: reader, length: 12 } });
  });

  it('keeps finished sequences within its budget, least recently used dropped first', () => {
    const cache = new PrefixCache<PrefixSequence>(4, 20);
    const [a, b, c] = [sequence(range(0, 8), 8), sequence(range(100, 8), 8), sequence(range(200, 8), 8)];
    for (const finished of [a, b]) cache.admit(finished);
    expect(cache.finish(a)).toEqual([]);
    expect(cache.finish(b)).toEqual([]);
    expect(cache.retainedTokens).toBe(16);
    // a is used again, so b is now the least recently used.
    expect(cache.admit(sequence([...range(0, 4), 7, 7]))).toMatchObject({ kind: 'match', match: { source: a } });
    cache.admit(c);
    expect(cache.finish(c)).toEqual([b.id]);
    expect(cache.retainedSequences).toBe(2);
    // A dropped sequence is no source any more.
    expect(cache.admit(sequence([...range(100, 4), 1]))).toBeUndefined();
    // Prompts shorter than a block are never kept, nor anything with no budget.
    expect(cache.finish(sequence([1, 2], 2))).toHaveLength(1);
    const none = new PrefixCache<PrefixSequence>(4, 0);
    const kept = sequence(range(0, 8), 8);
    none.admit(kept);
    expect(none.finish(kept)).toEqual([kept.id]);
  });
});
