/**
 * A context-free grammar (lib/llm/guided/grammar.ts) as an automaton over UTF-8 bytes, for the
 * same guides as a regex's. Each rule is a nondeterministic automaton whose edges read bytes or
 * call other rules; a configuration is an automaton state and the stack of states calls return
 * to; a state of this automaton is the set of configurations a text can be in, built lazily, a
 * state at a time, as generation reaches it (as ByteAutomaton's states are sets of NFA states).
 *
 * Checked when built, so that every configuration a text reaches can still be finished (a guide
 * never allows a token after which no text completes): every rule used is defined, every rule can
 * finish (no recursion without a way out), and no rule is left-recursive (one that could call
 * itself before reading a byte would push calls forever).
 */
import { GrammarError } from '../../errors.js';
import { DEAD, LazyAutomaton, Nfa, finishable } from './automaton.js';
import { type Grammar, type GrammarNode, parseGrammar } from './grammar.js';

/** More states than this is refused: the grammar is too ambiguous or too large to guide. */
const MAX_STATES = 200_000;
/** More configurations than this in one state is refused (an ambiguous grammar's count can grow with the text). */
const MAX_CONFIGURATIONS = 50_000;
/** The empty stack of returns. */
const EMPTY = -1;

export class GrammarAutomaton extends LazyAutomaton {
  readonly #nfa: Nfa;
  readonly #ruleStart: number[];
  /** Per NFA state: the rule it ends (-1: none). */
  readonly #endOf: Int32Array;
  readonly #rootEnd: number;
  /** Per NFA state: whether its rule's end can be reached from it (others are dropped from states). */
  readonly #alive: Uint8Array;
  /** Stacks of returns, interned: stack k is (return state, the stack below). */
  readonly #stackReturn: number[] = [];
  readonly #stackBelow: number[] = [];
  readonly #stackIds = new Map<string, number>();
  /** Each state's configurations: NFA state and stack, flattened in pairs, sorted. */
  readonly #configurations: Int32Array[] = [];
  readonly #byKey = new Map<string, number>();

  /**
   * Throws GrammarError when the grammar cannot be read or cannot be guided. `leadingSpace` lets
   * the text begin with one space more (one a SentencePiece decoder drops from a text's start).
   */
  static fromGrammar(text: string, options: { leadingSpace?: boolean } = {}): GrammarAutomaton {
    return GrammarAutomaton.fromRules(parseGrammar(text), options);
  }

  /** The same for a grammar already parsed (or built: a recursive JSON schema's). */
  static fromRules(grammar: Grammar, options: { leadingSpace?: boolean } = {}): GrammarAutomaton {
    return new GrammarAutomaton(grammar, options.leadingSpace === true);
  }

  private constructor(grammar: Grammar, leadingSpace: boolean) {
    super(grammar.text);
    const nfa = new Nfa();
    this.#ruleStart = [];
    const ends: number[] = [];
    for (const body of grammar.rules) {
      const [start, end] = nfa.build(body);
      this.#ruleStart.push(start);
      ends.push(end);
    }
    // The text starts in a rule of its own that reads `root` (after an optional space).
    const entry: GrammarNode = leadingSpace
      ? { kind: 'concat', parts: [{ kind: 'repeat', node: { kind: 'chars', set: [[0x20, 0x20]] }, min: 0, max: 1 }, { kind: 'rule', rule: grammar.root }] }
      : { kind: 'rule', rule: grammar.root };
    const [start, end] = nfa.build(entry);
    nfa.accept = end;
    this.#nfa = nfa;
    this.#rootEnd = end;
    this.#endOf = new Int32Array(nfa.epsilons.length).fill(-1);
    ends.forEach((state, rule) => (this.#endOf[state] = rule));
    const productive = productiveRules(nfa, this.#ruleStart, ends);
    const endless = grammar.names.filter((_, rule) => !productive[rule]);
    if (endless.length > 0) throw new GrammarError(`grammar: ${endless.length === 1 ? 'rule' : 'rules'} ${endless.map((name) => `'${name}'`).join(', ')} can never finish: every way through recurses without end`);
    this.#alive = finishable(nfa, [...ends, end], () => true);
    checkLeftRecursion(nfa, grammar, this.#ruleStart, ends);
    this.#intern(this.#closure([start, EMPTY]));
  }

  protected successor(state: number, byte: number): number {
    const seeds: number[] = [];
    const edges = this.#nfa.edges;
    const configurations = this.#configurations[state];
    for (let index = 0; index < configurations.length; index += 2) {
      const list = edges[configurations[index]];
      for (let edge = 0; edge < list.length; edge += 3) {
        if (byte >= list[edge] && byte <= list[edge + 1] && this.#alive[list[edge + 2]]) seeds.push(list[edge + 2], configurations[index + 1]);
      }
    }
    return seeds.length === 0 ? DEAD : this.#intern(this.#closure(seeds));
  }

  #push(returnTo: number, below: number): number {
    const key = `${returnTo},${below}`;
    let id = this.#stackIds.get(key);
    if (id === undefined) {
      id = this.#stackReturn.length;
      this.#stackReturn.push(returnTo);
      this.#stackBelow.push(below);
      this.#stackIds.set(key, id);
    }
    return id;
  }

  /**
   * The configurations reached from `seeds` (pairs) without reading a byte: empty moves, calls
   * (pushing where they return) and rule ends (popping), keeping those that read a byte or accept.
   */
  #closure(seeds: number[]): Int32Array {
    const { epsilons, edges, callRule, callReturn } = this.#nfa;
    const seen = new Set<string>();
    const kept: Array<[number, number]> = [];
    const pending = [...seeds];
    while (pending.length > 0) {
      const stack = pending.pop()!;
      const state = pending.pop()!;
      if (!this.#alive[state]) continue;
      const key = `${state},${stack}`;
      if (seen.has(key)) continue;
      seen.add(key);
      if (edges[state].length > 0 || (state === this.#rootEnd && stack === EMPTY)) {
        kept.push([state, stack]);
        if (kept.length > MAX_CONFIGURATIONS) throw new GrammarError(`grammar: a text reaches more than ${MAX_CONFIGURATIONS} parses at once; make the grammar less ambiguous`);
      }
      for (const next of epsilons[state]) pending.push(next, stack);
      const rule = callRule[state];
      if (rule >= 0) pending.push(this.#ruleStart[rule], this.#push(callReturn[state], stack));
      if (this.#endOf[state] >= 0 && stack !== EMPTY) pending.push(this.#stackReturn[stack], this.#stackBelow[stack]);
    }
    kept.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    return Int32Array.from(kept.flat());
  }

  #intern(configurations: Int32Array): number {
    const key = configurations.join(',');
    const known = this.#byKey.get(key);
    if (known !== undefined) return known;
    if (this.#configurations.length >= MAX_STATES) throw new GrammarError(`the grammar needs more than ${MAX_STATES} automaton states for the texts generated; simplify it`);
    let accepting = false;
    let canContinue = false;
    for (let index = 0; index < configurations.length; index += 2) {
      const state = configurations[index];
      if (state === this.#rootEnd && configurations[index + 1] === EMPTY) accepting = true;
      const list = this.#nfa.edges[state];
      for (let edge = 2; edge < list.length; edge += 3) if (this.#alive[list[edge]]) canContinue = true;
    }
    const id = this.addState(accepting, canContinue);
    this.#configurations.push(configurations);
    this.#byKey.set(key, id);
    return id;
  }
}

/** Which rules derive some finite text: found by growing the set until it stops growing. */
function productiveRules(nfa: Nfa, starts: number[], ends: number[]): boolean[] {
  const productive = starts.map(() => false);
  for (let changed = true; changed; ) {
    changed = false;
    const alive = finishable(nfa, ends, (rule) => productive[rule]);
    starts.forEach((start, rule) => {
      if (!productive[rule] && alive[start]) {
        productive[rule] = true;
        changed = true;
      }
    });
  }
  return productive;
}

/**
 * Refuses left recursion: a rule that can call itself (through others) before reading a byte.
 * A call is passed over without reading when the called rule can finish without reading.
 */
function checkLeftRecursion(nfa: Nfa, grammar: Grammar, starts: number[], ends: number[]): void {
  // Rules that derive the empty text, grown to a fixed point.
  const nullable = starts.map(() => false);
  const reachesWithoutReading = (from: number, onCall: (rule: number) => void): Set<number> => {
    const seen = new Set<number>([from]);
    const pending = [from];
    while (pending.length > 0) {
      const state = pending.pop()!;
      const next = [...nfa.epsilons[state]];
      const rule = nfa.callRule[state];
      if (rule >= 0) {
        onCall(rule);
        if (nullable[rule]) next.push(nfa.callReturn[state]);
      }
      for (const target of next) {
        if (!seen.has(target)) {
          seen.add(target);
          pending.push(target);
        }
      }
    }
    return seen;
  };
  for (let changed = true; changed; ) {
    changed = false;
    starts.forEach((start, rule) => {
      if (!nullable[rule] && reachesWithoutReading(start, () => {}).has(ends[rule])) {
        nullable[rule] = true;
        changed = true;
      }
    });
  }
  const leftCalls = starts.map((start) => {
    const called = new Set<number>();
    reachesWithoutReading(start, (rule) => called.add(rule));
    return called;
  });
  // A cycle in "calls before reading" is left recursion.
  const state = starts.map(() => 0); // 0 unvisited, 1 on the path, 2 done
  const path: number[] = [];
  const visit = (rule: number): void => {
    state[rule] = 1;
    path.push(rule);
    for (const callee of leftCalls[rule]) {
      if (state[callee] === 1) {
        const cycle = [...path.slice(path.indexOf(callee)), callee].map((index) => grammar.names[index]);
        throw new GrammarError(`grammar: rule '${grammar.names[callee]}' is left-recursive (${cycle.join(' → ')} before reading any text); write it with repetition instead`);
      }
      if (state[callee] === 0) visit(callee);
    }
    path.pop();
    state[rule] = 2;
  };
  starts.forEach((_, rule) => {
    if (state[rule] === 0) visit(rule);
  });
}
