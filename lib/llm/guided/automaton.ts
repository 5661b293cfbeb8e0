/**
 * A regex tree compiled into an automaton over UTF-8 bytes: first a nondeterministic one
 * (Thompson's construction), then a deterministic one built lazily, a state at a time, as
 * generation reaches it. Lazily, because a JSON schema's automaton has far more states than one
 * generation visits, and a guide only needs the states its texts pass through.
 */
import { GrammarError } from '../../errors.js';
import type { GrammarNode } from './grammar.js';
import { type RegexNode, parseRegex, utf8Sequences } from './regex.js';

/** More states than this in either automaton is refused: the pattern is too large to guide. */
const MAX_NFA_STATES = 1_000_000;
const MAX_DFA_STATES = 200_000;

/** A transition not computed yet. */
export const UNKNOWN = -2;
/** The state no text leads out of: a byte that leads here is not allowed. */
export const DEAD = -1;

/**
 * What a guide walks (lib/llm/guided/token-guide.ts): states numbered from 0, the start; a byte
 * leads from a state to another or to DEAD. A regex's automaton (ByteAutomaton) and a grammar's
 * (GrammarAutomaton) both are one.
 */
export interface GuideAutomaton {
  /** The pattern or grammar, for messages. */
  readonly pattern: string;
  readonly start: number;
  /** Every state's transitions known so far, by byte: a state, DEAD, or UNKNOWN (ask `step`). */
  readonly rows: readonly Int32Array[];
  step(state: number, byte: number): number;
  walk(state: number, bytes: Uint8Array): number;
  /** Whether the text that led to `state` is whole (matches the pattern, or the grammar's root). */
  accepting(state: number): boolean;
  /** Whether some byte leads on from `state` (else the text is complete). */
  canContinue(state: number): boolean;
}

/**
 * What the lazily built automata share: states numbered from 0 (the start) as they are built, each
 * with its row of transitions by byte, filled on first use by the subclass's `successor`.
 */
export abstract class LazyAutomaton implements GuideAutomaton {
  readonly pattern: string;
  readonly #transitions: Int32Array[] = [];
  readonly #accepting: boolean[] = [];
  readonly #canContinue: boolean[] = [];

  protected constructor(pattern: string) {
    this.pattern = pattern;
  }

  get start(): number {
    return 0;
  }

  /** States built so far. */
  get size(): number {
    return this.#transitions.length;
  }

  /**
   * The transitions of `state` known so far, by byte: a state, DEAD, or UNKNOWN (-2: ask `step`).
   * For loops that read many bytes (a vocabulary's trie) without a call per byte.
   */
  row(state: number): Int32Array {
    return this.#transitions[state];
  }

  /** Every state's row (see `row`); the list grows as states are built, and stays the same list. */
  get rows(): readonly Int32Array[] {
    return this.#transitions;
  }

  /** Where `byte` leads from `state` (DEAD when nowhere). */
  step(state: number, byte: number): number {
    const row = this.#transitions[state];
    const known = row[byte];
    if (known !== UNKNOWN) return known;
    const next = this.successor(state, byte);
    row[byte] = next;
    return next;
  }

  /** The state after `bytes` from `state`, or DEAD. */
  walk(state: number, bytes: Uint8Array): number {
    for (let index = 0; index < bytes.length && state !== DEAD; index++) state = this.step(state, bytes[index]);
    return state;
  }

  /** Whether the text that led to `state` is whole (matches the pattern, or the grammar's root). */
  accepting(state: number): boolean {
    return this.#accepting[state];
  }

  /** Whether some byte leads on from `state` (else the text is complete). */
  canContinue(state: number): boolean {
    return this.#canContinue[state];
  }

  /** Whether `text` is whole for this automaton. */
  matches(text: string): boolean {
    const state = this.walk(this.start, new TextEncoder().encode(text));
    return state !== DEAD && this.accepting(state);
  }

  /** Where `byte` leads from `state`: a state (made with addState) or DEAD. Asked once per transition. */
  protected abstract successor(state: number, byte: number): number;

  /** A new state's number. */
  protected addState(accepting: boolean, canContinue: boolean): number {
    this.#transitions.push(new Int32Array(256).fill(UNKNOWN));
    this.#accepting.push(accepting);
    this.#canContinue.push(canContinue);
    return this.#transitions.length - 1;
  }
}

/**
 * A nondeterministic automaton over bytes (Thompson's construction). A grammar's also has call
 * edges: at a state with one, the text goes on in another rule's automaton and comes back to the
 * call's target when that rule ends (GrammarAutomaton keeps the stack of those returns).
 */
export class Nfa {
  readonly epsilons: number[][] = [];
  /** Byte edges of each state: low, high, target, flattened. */
  readonly edges: number[][] = [];
  /** Per state: the rule it calls and the state the call returns to (-1, -1: none). */
  readonly callRule: number[] = [];
  readonly callReturn: number[] = [];
  accept = -1;

  add(): number {
    if (this.epsilons.length >= MAX_NFA_STATES) throw new GrammarError(`the pattern needs more than ${MAX_NFA_STATES} automaton states (long repetitions of large parts); simplify it`);
    this.epsilons.push([]);
    this.edges.push([]);
    this.callRule.push(-1);
    this.callReturn.push(-1);
    return this.epsilons.length - 1;
  }

  /** A fragment for `node` from a new start state to a new end state. */
  build(node: GrammarNode): [number, number] {
    switch (node.kind) {
      case 'rule': {
        const start = this.add();
        const end = this.add();
        this.callRule[start] = node.rule;
        this.callReturn[start] = end;
        return [start, end];
      }
      case 'chars': {
        const start = this.add();
        const end = this.add();
        for (const [low, high] of node.set) {
          for (const sequence of utf8Sequences(low, high)) {
            let from = start;
            sequence.forEach(([byteLow, byteHigh], index) => {
              const to = index === sequence.length - 1 ? end : this.add();
              this.edges[from].push(byteLow, byteHigh, to);
              from = to;
            });
          }
        }
        return [start, end];
      }
      case 'concat': {
        const start = this.add();
        let end = start;
        for (const part of node.parts) {
          const [partStart, partEnd] = this.build(part);
          this.epsilons[end].push(partStart);
          end = partEnd;
        }
        return [start, end];
      }
      case 'alternate': {
        const start = this.add();
        const end = this.add();
        for (const option of node.options) {
          const [optionStart, optionEnd] = this.build(option);
          this.epsilons[start].push(optionStart);
          this.epsilons[optionEnd].push(end);
        }
        return [start, end];
      }
      case 'repeat': {
        const start = this.add();
        let end = start;
        for (let copy = 0; copy < node.min; copy++) {
          const [partStart, partEnd] = this.build(node.node);
          this.epsilons[end].push(partStart);
          end = partEnd;
        }
        if (node.max === Infinity) {
          const [partStart, partEnd] = this.build(node.node);
          const loop = this.add();
          this.epsilons[end].push(loop);
          this.epsilons[loop].push(partStart);
          this.epsilons[partEnd].push(loop);
          return [start, loop];
        }
        // Each optional copy may be skipped to the end.
        const finish = this.add();
        for (let copy = node.min; copy < node.max; copy++) {
          const [partStart, partEnd] = this.build(node.node);
          this.epsilons[end].push(partStart, finish);
          end = partEnd;
        }
        this.epsilons[end].push(finish);
        return [start, finish];
      }
    }
  }
}

/**
 * A deterministic automaton over bytes, each state a set of the nondeterministic one's, built on
 * first use. States are numbered from 0 (the start); DEAD is the state no text leaves.
 */
export class ByteAutomaton extends LazyAutomaton {
  readonly #nfa: Nfa;
  /** Per NFA state: whether the accept state can be reached from it (others are dropped from sets). */
  readonly #alive: Uint8Array;
  readonly #sets: Int32Array[] = [];
  readonly #byKey = new Map<string, number>();

  /**
   * Throws GrammarError when the pattern cannot be read or matches nothing. `leadingSpace` lets
   * the text begin with one space more (one a SentencePiece decoder drops from a text's start).
   */
  static fromRegex(pattern: string, options: { leadingSpace?: boolean } = {}): ByteAutomaton {
    const tree = parseRegex(pattern);
    const space: RegexNode = { kind: 'repeat', node: { kind: 'chars', set: [[0x20, 0x20]] }, min: 0, max: 1 };
    return new ByteAutomaton(pattern, options.leadingSpace ? { kind: 'concat', parts: [space, tree] } : tree);
  }

  private constructor(pattern: string, tree: RegexNode) {
    super(pattern);
    const nfa = new Nfa();
    const [start, end] = nfa.build(tree);
    nfa.accept = end;
    this.#nfa = nfa;
    this.#alive = finishable(nfa, [nfa.accept]);
    if (!this.#alive[start]) throw new GrammarError(`regex ${JSON.stringify(pattern)} matches no text`);
    this.#intern(this.#closure([start]));
  }

  protected successor(state: number, byte: number): number {
    const targets: number[] = [];
    const edges = this.#nfa.edges;
    for (const member of this.#sets[state]) {
      const list = edges[member];
      for (let index = 0; index < list.length; index += 3) {
        if (byte >= list[index] && byte <= list[index + 1] && this.#alive[list[index + 2]]) targets.push(list[index + 2]);
      }
    }
    return targets.length === 0 ? DEAD : this.#intern(this.#closure(targets));
  }

  /** Alive states reached from `seeds` by empty moves, keeping those that read a byte or accept. */
  #closure(seeds: number[]): Int32Array {
    const { epsilons, edges, accept } = this.#nfa;
    const seen = new Set<number>();
    const kept: number[] = [];
    const stack = [...seeds];
    while (stack.length > 0) {
      const state = stack.pop()!;
      if (seen.has(state) || !this.#alive[state]) continue;
      seen.add(state);
      if (edges[state].length > 0 || state === accept) kept.push(state);
      for (const next of epsilons[state]) if (!seen.has(next)) stack.push(next);
    }
    return Int32Array.from(kept).sort();
  }

  #intern(set: Int32Array): number {
    const key = set.join(',');
    const known = this.#byKey.get(key);
    if (known !== undefined) return known;
    if (this.#sets.length >= MAX_DFA_STATES) throw new GrammarError(`the pattern ${JSON.stringify(this.pattern.slice(0, 80))} needs more than ${MAX_DFA_STATES} automaton states`);
    const id = this.addState(
      set.includes(this.#nfa.accept),
      set.some((member) => this.#nfa.edges[member].some((_, index, list) => index % 3 === 2 && this.#alive[list[index]] === 1)),
    );
    this.#sets.push(set);
    this.#byKey.set(key, id);
    return id;
  }
}

/**
 * Per NFA state: whether one of `ends` can be reached from it, reading bytes, taking empty moves,
 * and passing over calls to rules for which `passable` holds (as if the call had returned). A
 * regex's automaton has no calls: its alive states are those that reach its accept state.
 */
export function finishable(nfa: Nfa, ends: number[], passable: (rule: number) => boolean = () => false): Uint8Array {
  const count = nfa.epsilons.length;
  const backwards: number[][] = Array.from({ length: count }, () => []);
  for (let state = 0; state < count; state++) {
    for (const next of nfa.epsilons[state]) backwards[next].push(state);
    const list = nfa.edges[state];
    for (let index = 2; index < list.length; index += 3) backwards[list[index]].push(state);
    if (nfa.callRule[state] >= 0 && passable(nfa.callRule[state])) backwards[nfa.callReturn[state]].push(state);
  }
  const alive = new Uint8Array(count);
  const stack = [...ends];
  for (const end of ends) alive[end] = 1;
  while (stack.length > 0) {
    for (const previous of backwards[stack.pop()!]) {
      if (!alive[previous]) {
        alive[previous] = 1;
        stack.push(previous);
      }
    }
  }
  return alive;
}
