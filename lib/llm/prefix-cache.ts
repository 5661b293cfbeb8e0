/**
 * Prefix caching for a replica: prompts that begin alike (a system prompt, few-shot examples, a
 * shared document) read their common beginning once. The ranks keep a key/value cache per
 * sequence; a new sequence whose prompt starts with blocks another sequence's cache already
 * holds starts from those positions (each rank's cache shares the blocks that hold them,
 * lib/llm/cache-blocks.ts), and the prompt is read from there on.
 *
 * Prompts are found in whole blocks of `blockTokens`, through a hash of each block chained to
 * the blocks before it, and the tokens are compared before a match is used, so a hash collision
 * costs a recomputation, never a wrong answer. Past the deepest whole block, the match goes on
 * token by token through what the sources holding that block have cached (their prompts, then
 * what they generated), the furthest taken: a beam's step starts from all of its parent's
 * positions, a conversation's next turn from the last turn and its answer. Sources are the
 * sequences running, and finished ones kept for later prompts up to a budget of cached tokens
 * (least recently used go first).
 */

/** What the cache needs to know of a sequence. */
export interface PrefixSequence {
  readonly id: number;
  readonly prompt: Int32Array;
  /** Caches are shared only within one namespace (a LoRA adapter's name; none: the base model). */
  readonly namespace?: string;
  /** Positions the ranks' cache holds for it. */
  past: number;
  /** Tokens generated after its prompt: those among its first `past` positions are cached too. */
  readonly generated?: readonly number[];
}

export interface PrefixMatch<S extends PrefixSequence> {
  source: S;
  /**
   * Positions to copy: whole blocks found by their hashes, then as far as the source's cached
   * tokens go on matching (its prompt, then what it generated), and always short of the whole
   * prompt (its last token must be read for logits).
   */
  length: number;
}

/** Hashes of each whole block of `tokens`, each chained to the blocks before it. */
function blockHashes(tokens: Int32Array, blockTokens: number, namespace = ''): string[] {
  const hashes: string[] = [];
  // Two 32-bit FNV-1a lanes with different offsets: a 64-bit key, kept as a string.
  let first = 0x811c9dc5;
  let second = 0x01000193 ^ 0x5bd1e995;
  // The namespace starts the chain: the same tokens under another adapter hash apart.
  for (let index = 0; index < namespace.length; index++) {
    first = Math.imul(first ^ namespace.charCodeAt(index), 0x01000193);
    second = Math.imul(second ^ namespace.charCodeAt(index), 0x01000193) ^ (second >>> 13);
  }
  for (let block = 0; (block + 1) * blockTokens <= tokens.length; block++) {
    for (let index = block * blockTokens; index < (block + 1) * blockTokens; index++) {
      const token = tokens[index];
      for (let shift = 0; shift < 32; shift += 8) {
        const byte = (token >>> shift) & 0xff;
        first = Math.imul(first ^ byte, 0x01000193);
        second = Math.imul(second ^ byte, 0x01000193) ^ (second >>> 13);
      }
    }
    hashes.push(`${(first >>> 0).toString(36)}.${(second >>> 0).toString(36)}`);
  }
  return hashes;
}

function samePrefix(a: Int32Array, b: Int32Array, length: number): boolean {
  for (let index = 0; index < length; index++) if (a[index] !== b[index]) return false;
  return true;
}

/**
 * How far `prompt` matches what `source` has cached, from `from` (already matched) on: its
 * prompt's tokens, then those it generated, up to its `past`, and short of the prompt's last.
 */
function matchedFrom(source: PrefixSequence, prompt: Int32Array, from: number): number {
  const limit = Math.min(source.past, prompt.length - 1);
  let at = from;
  for (; at < limit && at < source.prompt.length; at++) if (source.prompt[at] !== prompt[at]) return at;
  const generated = source.generated ?? [];
  for (; at < limit && at - source.prompt.length < generated.length; at++) if (generated[at - source.prompt.length] !== prompt[at]) return at;
  return at;
}

export class PrefixCache<S extends PrefixSequence> {
  readonly blockTokens: number;
  readonly maxRetainedTokens: number;
  /**
   * The sequences that hold (or are reading) each chained block hash: any of them can be the
   * source, so a prefix stays found while one of them holds it.
   */
  readonly #index = new Map<string, Set<S>>();
  readonly #hashes = new Map<number, string[]>();
  /** Sequences whose caches the ranks still hold. */
  readonly #holding = new Set<number>();
  /** Finished sequences kept as sources, least recently used first, with the positions each is counted for. */
  readonly #retained = new Map<number, { sequence: S; positions: number }>();
  #retainedTokens = 0;
  /** Prompt positions copied rather than read. */
  reusedTokens = 0;
  /** The cache positions a kept sequence is counted for (the ranks hold whole blocks: its past rounded up to them). */
  readonly #positionsOf: (sequence: S) => number;

  constructor(blockTokens: number, maxRetainedTokens: number, positionsOf: (sequence: S) => number = (sequence) => sequence.past) {
    this.blockTokens = blockTokens;
    this.maxRetainedTokens = maxRetainedTokens;
    this.#positionsOf = positionsOf;
  }

  #hashesOf(sequence: S): string[] {
    let hashes = this.#hashes.get(sequence.id);
    if (!hashes) {
      hashes = blockHashes(sequence.prompt, this.blockTokens, sequence.namespace);
      this.#hashes.set(sequence.id, hashes);
    }
    return hashes;
  }

  /** What admit() would find for `sequence` now, changing nothing. */
  peek(sequence: S, mayReuse = true): { kind: 'match'; match: PrefixMatch<S> } | { kind: 'wait' } | undefined {
    const hashes = this.#hashesOf(sequence);
    // The prompt's last token is always read: its logits give the first generated token.
    const usable = mayReuse ? Math.min(hashes.length, Math.floor((sequence.prompt.length - 1) / this.blockTokens)) : 0;
    for (let blocks = usable; blocks >= 1; blocks--) {
      const length = blocks * this.blockTokens;
      let reading = false;
      let best: PrefixMatch<S> | undefined;
      for (const source of this.#index.get(hashes[blocks - 1]) ?? []) {
        if (source === sequence || !this.#holding.has(source.id) || source.namespace !== sequence.namespace || !samePrefix(source.prompt, sequence.prompt, length)) continue;
        if (source.past < length) {
          reading = true;
          continue;
        }
        // Past the whole blocks, the source that goes on matching furthest: a beam's parent, whose
        // prompt is the beam less its last token, or a conversation's earlier turn and its answer.
        const reach = matchedFrom(source, sequence.prompt, length);
        if (!best || reach > best.length) best = { source, length: reach };
      }
      if (best) return { kind: 'match', match: best };
      if (reading) return { kind: 'wait' };
    }
    return undefined;
  }

  /**
   * For a sequence about to read its prompt: the longest prefix a cache holds ('match'), or
   * 'wait' when a longer one is being read by a sequence already running, which will hold it
   * within a step or two (so prompts that arrive together read their common part once), or
   * undefined. The sequence is registered as a source of its own blocks either way, except when
   * it waits.
   */
  admit(sequence: S, mayReuse = true): { kind: 'match'; match: PrefixMatch<S> } | { kind: 'wait' } | undefined {
    const found = this.peek(sequence, mayReuse);
    if (found?.kind === 'wait') return found;
    const match = found?.match;
    const hashes = this.#hashesOf(sequence);
    this.#holding.add(sequence.id);
    // This sequence becomes a source of its blocks (once it has read them).
    for (const hash of hashes) {
      let holders = this.#index.get(hash);
      if (!holders) this.#index.set(hash, (holders = new Set()));
      holders.add(sequence);
    }
    if (!match) return undefined;
    const retained = this.#retained.get(match.source.id);
    if (retained) {
      // Used again: now the most recently used.
      this.#retained.delete(match.source.id);
      this.#retained.set(match.source.id, retained);
    }
    this.reusedTokens += match.length;
    return { kind: 'match', match };
  }

  /**
   * A sequence finished: kept as a source when it has a whole block and the budget allows.
   * Returns the ids whose caches the ranks should now drop (it, or what it pushed out).
   */
  finish(sequence: S): number[] {
    if (this.maxRetainedTokens === 0 || sequence.prompt.length < this.blockTokens) return [this.#drop(sequence)];
    const positions = this.#positionsOf(sequence);
    this.#retained.set(sequence.id, { sequence, positions });
    this.#retainedTokens += positions;
    return this.evict(this.maxRetainedTokens);
  }

  /** A running sequence's cache is dropped (preempted): no source any more, and not kept. */
  abandon(sequence: S): number {
    return this.#drop(sequence);
  }

  /**
   * Drops kept sequences, least recently used first (never `keep`), until they hold at most
   * `tokens` positions; returns their ids.
   */
  evict(tokens: number, keep?: number): number[] {
    const dropped: number[] = [];
    for (const [id, oldest] of this.#retained) {
      if (this.#retainedTokens <= tokens) break;
      if (id === keep) continue;
      this.#retained.delete(id);
      this.#retainedTokens -= oldest.positions;
      dropped.push(this.#drop(oldest.sequence));
    }
    return dropped;
  }

  /** The ranks drop its cache: it is no source any more, and its index entries go. */
  #drop(sequence: S): number {
    this.#holding.delete(sequence.id);
    for (const hash of this.#hashes.get(sequence.id) ?? []) {
      const holders = this.#index.get(hash);
      holders?.delete(sequence);
      if (holders?.size === 0) this.#index.delete(hash);
    }
    this.#hashes.delete(sequence.id);
    return sequence.id;
  }

  get retainedSequences(): number {
    return this.#retained.size;
  }

  get retainedTokens(): number {
    return this.#retainedTokens;
  }
}
