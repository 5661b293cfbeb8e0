/**
 * Guided decoding (vLLM's guided_regex, guided_json and guided_grammar, as outlines does it): the
 * tokens a generation may pick next are those whose bytes keep the text on a path of the
 * pattern's automaton (a regex's, or a grammar's with its stack of rule calls). The vocabulary is laid out as a trie of token bytes once per tokenizer; each
 * automaton state's allowed tokens are found by walking the trie and the automaton together
 * (a byte that leads nowhere cuts off every token below it), and kept as a bit mask, so a state
 * costs one walk however many sequences pass through it.
 */
import { GrammarError } from '../../errors.js';
import type { Tokenizer } from '../tokenizer.js';
import { ByteAutomaton, DEAD, type GuideAutomaton, UNKNOWN } from './automaton.js';
import { GrammarAutomaton } from './grammar-automaton.js';
import { type JsonSchemaOptions, jsonSchemaToRegex } from './json-schema.js';
import { TokenMask } from './token-mask.js';
import { type GuidedDecoding, checkGuidedDecoding } from './guided-decoding.js';

/**
 * The vocabulary's token bytes as a trie, its nodes numbered in preorder so a walk is one pass
 * over flat arrays: node n is reached from its parent by one byte, its subtree is the nodes
 * n .. subtreeEnd[n], and a byte that leads nowhere skips the whole subtree. Shared by every
 * guide of a tokenizer.
 */
class VocabularyTrie {
  readonly size: number;
  /** Per node (0 is the root): its parent, the byte from the parent, where its subtree ends. */
  readonly parent: Int32Array;
  readonly byte: Uint8Array;
  readonly subtreeEnd: Int32Array;
  /** Node n's tokens (those whose bytes end there) are tokens[tokenStart[n] .. tokenStart[n + 1]). */
  readonly tokenStart: Int32Array;
  readonly tokens: Int32Array;
  /** Each token's bytes (undefined: a special token, never text). */
  readonly bytes: ReadonlyArray<Uint8Array | undefined>;
  /** The automaton state at each node during a walk (reused: one walk at a time per process). */
  readonly #states: Int32Array;

  constructor(tokenizer: Tokenizer) {
    this.size = tokenizer.vocabSize;
    const bytes: Array<Uint8Array | undefined> = [];
    const children: Array<Map<number, number>> = [new Map()];
    const ending: number[][] = [[]];
    for (let id = 0; id < this.size; id++) {
      const tokenBytes = tokenizer.tokenBytes(id);
      bytes.push(tokenBytes && tokenBytes.length > 0 ? tokenBytes : undefined);
      if (!tokenBytes || tokenBytes.length === 0) continue;
      let node = 0;
      for (const byte of tokenBytes) {
        let child = children[node].get(byte);
        if (child === undefined) {
          child = children.length;
          children.push(new Map());
          ending.push([]);
          children[node].set(byte, child);
        }
        node = child;
      }
      ending[node].push(id);
    }
    this.bytes = bytes;
    const count = children.length;
    this.parent = new Int32Array(count);
    this.byte = new Uint8Array(count);
    this.subtreeEnd = new Int32Array(count);
    this.tokenStart = new Int32Array(count + 1);
    this.tokens = new Int32Array(ending.reduce((sum, list) => sum + list.length, 0));
    this.#states = new Int32Array(count);
    // Renumber in preorder (an explicit stack: vocabularies have tokens of hundreds of bytes).
    let next = 0;
    let tokenCount = 0;
    const stack: Array<{ node: number; parent: number; byte: number; exit?: boolean; order?: number }> = [{ node: 0, parent: -1, byte: 0 }];
    while (stack.length > 0) {
      const entry = stack.pop()!;
      if (entry.exit) {
        this.subtreeEnd[entry.order!] = next;
        continue;
      }
      const order = next++;
      this.parent[order] = entry.parent;
      this.byte[order] = entry.byte;
      this.tokenStart[order] = tokenCount;
      this.tokens.set(ending[entry.node], tokenCount);
      tokenCount += ending[entry.node].length;
      stack.push({ node: entry.node, parent: entry.parent, byte: entry.byte, exit: true, order });
      for (const [byte, child] of [...children[entry.node]].reverse()) stack.push({ node: child, parent: order, byte });
    }
    this.tokenStart[count] = tokenCount;
  }

  /** The tokens whose whole bytes lead from `state` to a state that is not DEAD. */
  allowedFrom(automaton: GuideAutomaton, state: number): TokenMask {
    const mask = new TokenMask(this.size);
    const words = mask.words;
    const { parent, byte, subtreeEnd, tokenStart, tokens } = this;
    const states = this.#states;
    const count = parent.length;
    const rows = automaton.rows;
    states[0] = state;
    for (let node = 1; node < count; ) {
      const from = states[parent[node]];
      let next = rows[from][byte[node]];
      if (next === UNKNOWN) next = automaton.step(from, byte[node]);
      if (next === DEAD) {
        node = subtreeEnd[node];
        continue;
      }
      states[node] = next;
      for (let index = tokenStart[node], last = tokenStart[node + 1]; index < last; index++) {
        const id = tokens[index];
        words[id >>> 5] |= 1 << (id & 31);
      }
      node++;
    }
    return mask;
  }
}

/**
 * Bytes of masks a guide keeps (each is vocabulary / 8 bytes: 19 KiB at 150,000 tokens, so
 * about 1,700 states), the least recently built dropped first: a dropped state's mask is walked
 * again when a text comes back to it.
 */
const MASK_BYTES_KEPT = 32 * 1024 * 1024;

const tries = new WeakMap<Tokenizer, VocabularyTrie>();

function trieOf(tokenizer: Tokenizer): VocabularyTrie {
  let trie = tries.get(tokenizer);
  if (!trie) tries.set(tokenizer, (trie = new VocabularyTrie(tokenizer)));
  return trie;
}

/** A constraint for ModelReplica requests: the next token's allowed ids, or null once the text is complete. */
export type TokenConstraint = (generated: readonly number[]) => TokenMask | null;

/**
 * A pattern compiled against a tokenizer's vocabulary. One guide serves any number of
 * generations: `constraint()` gives each request (or all of them) the function a ModelReplica
 * asks for the next token's allowed ids; the masks it builds are shared.
 */
export class TokenGuide {
  readonly automaton: GuideAutomaton;
  readonly #trie: VocabularyTrie;
  readonly #masks = new Map<number, TokenMask>();
  /** How many masks fit MASK_BYTES_KEPT (each of the two caches: plain, and with stop tokens). */
  readonly #masksKept: number;

  /** Throws GrammarError when the pattern cannot be compiled. */
  static fromRegex(tokenizer: Tokenizer, pattern: string): TokenGuide {
    // Where the decoder drops a leading space, a first token such as '▁{' spells '{' in the text.
    return new TokenGuide(tokenizer, ByteAutomaton.fromRegex(pattern, { leadingSpace: tokenizer.stripsLeadingSpace }));
  }

  /** The text must be one a GBNF grammar's `root` derives (see lib/llm/guided/grammar.ts). */
  static fromGrammar(tokenizer: Tokenizer, grammar: string): TokenGuide {
    return new TokenGuide(tokenizer, GrammarAutomaton.fromGrammar(grammar, { leadingSpace: tokenizer.stripsLeadingSpace }));
  }

  /** The text must be JSON that the schema accepts (see jsonSchemaToRegex for what is enforced). */
  static fromJsonSchema(tokenizer: Tokenizer, schema: unknown, options: JsonSchemaOptions = {}): TokenGuide {
    return TokenGuide.fromRegex(tokenizer, jsonSchemaToRegex(schema, options));
  }

  /** A guide for what a processor or request asks (a schema, any JSON object, a regex, choices); errors are led by `where`. */
  static compile(tokenizer: Tokenizer, spec: GuidedDecoding, where = 'guidedDecoding'): TokenGuide {
    return new TokenGuide(tokenizer, checkGuidedDecoding(spec, where, { leadingSpace: tokenizer.stripsLeadingSpace }));
  }

  private constructor(tokenizer: Tokenizer, automaton: GuideAutomaton) {
    this.automaton = automaton;
    this.#trie = trieOf(tokenizer);
    this.#masksKept = Math.max(64, Math.floor(MASK_BYTES_KEPT / 2 / (4 * Math.ceil(this.#trie.size / 32))));
  }

  /** The tokens that keep the text on the pattern from `state` (cached per state). */
  allowed(state: number): TokenMask {
    let mask = this.#masks.get(state);
    if (mask) return mask;
    mask = this.#trie.allowedFrom(this.automaton, state);
    // A mask is vocabulary / 8 bytes (19 KiB for 150,000 tokens): keep the states used most recently.
    if (this.#masks.size >= this.#masksKept) this.#masks.delete(this.#masks.keys().next().value!);
    this.#masks.set(state, mask);
    return mask;
  }

  /** The automaton's state after `tokens` from the start, DEAD if they leave the pattern (a special token does). */
  stateAfter(tokens: readonly number[], from = this.automaton.start): number {
    let state = from;
    for (const token of tokens) {
      const bytes = this.#trie.bytes[token];
      if (bytes === undefined) return DEAD;
      state = this.automaton.walk(state, bytes);
      if (state === DEAD) return DEAD;
    }
    return state;
  }

  /**
   * The constraint function for ModelReplica requests. Where the text so far matches the whole
   * pattern, `stopTokens` are allowed too (the generation may end there); once no byte can follow
   * (a closed JSON object), or a stop token was picked, it answers null: the text is complete.
   * Throws GrammarError (ERR_GRAMMAR) when no token of the vocabulary can continue the text.
   */
  constraint(stopTokens: readonly number[] = []): TokenConstraint {
    const stops = new Set(stopTokens);
    const withStops = new Map<number, TokenMask>();
    // States whose masks were found to hold some token (counted once, not every step).
    const open = new Set<number>();
    // Where each generation's walk stands, so a step reads only its new tokens.
    const progress = new WeakMap<readonly number[], { length: number; state: number }>();
    return (generated) => {
      const known = progress.get(generated);
      let state = known && known.length <= generated.length ? known.state : this.automaton.start;
      for (let index = known && known.length <= generated.length ? known.length : 0; index < generated.length; index++) {
        const token = generated[index];
        if (stops.has(token) && this.automaton.accepting(state)) return null;
        const bytes = this.#trie.bytes[token];
        const next = bytes === undefined ? DEAD : this.automaton.walk(state, bytes);
        if (next === DEAD) throw new GrammarError(`token ${token} (position ${index}) leaves the pattern ${JSON.stringify(this.automaton.pattern.slice(0, 80))}`);
        state = next;
      }
      progress.set(generated, { length: generated.length, state });
      if (!this.automaton.canContinue(state)) return null;
      const accepting = this.automaton.accepting(state);
      let mask = accepting && stops.size > 0 ? withStops.get(state) : this.allowed(state);
      if (!mask) {
        mask = new TokenMask(this.#trie.size, Uint32Array.from(this.allowed(state).words));
        for (const stop of stops) if (stop >= 0 && stop < mask.size) mask.add(stop);
        if (withStops.size >= this.#masksKept) withStops.delete(withStops.keys().next().value!);
        withStops.set(state, mask);
      }
      if (!accepting && !open.has(state)) {
        if (mask.count() === 0) throw new GrammarError(`no token of the vocabulary continues the pattern ${JSON.stringify(this.automaton.pattern.slice(0, 80))} after ${generated.length} tokens`);
        open.add(state);
      }
      return mask;
    };
  }
}
