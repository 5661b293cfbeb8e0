/**
 * Context-free grammars for guided decoding (vLLM's guided_grammar), written in GBNF, the BNF
 * dialect llama.cpp reads:
 *
 *   root   ::= object
 *   object ::= "{" ws ( pair ( "," ws pair )* )? "}"
 *   pair   ::= string ":" ws value
 *   ws     ::= [ \t\n]*          # comments run to the end of the line
 *
 * A rule is a name, `::=`, and alternatives (`|`) of sequences of: string literals ("..." with
 * \n \r \t \\ \" \xHH \uHHHH \UHHHHHHHH escapes), character classes ([a-z0-9_], [^"\\]), `.`
 * (any character), rule names, and groups in parentheses; each may be followed by `*`, `+`, `?`,
 * `{m}`, `{m,}` or `{m,n}`. A rule runs on over lines until the next `name ::=`. The text must
 * match the rule `root` whole. Rules may recurse, but not on the left (a rule that can reach
 * itself before reading any character): write those with repetition instead.
 */
import { GrammarError } from '../../errors.js';
import { type CharSet, complementSet, normalizeSet } from './regex.js';

/** A rule's body: the regex nodes, and references to rules (by index). */
export type GrammarNode =
  | { kind: 'chars'; set: CharSet }
  | { kind: 'concat'; parts: GrammarNode[] }
  | { kind: 'alternate'; options: GrammarNode[] }
  | { kind: 'repeat'; node: GrammarNode; min: number; max: number }
  | { kind: 'rule'; rule: number };

export interface Grammar {
  /** The grammar's text, as given. */
  text: string;
  names: string[];
  /** Each rule's body, by index (the order names are first seen). */
  rules: GrammarNode[];
  /** The index of `root`. */
  root: number;
}

/** Repetition counts above this are refused: the automaton copies the repeated part that many times. */
const MAX_REPEAT = 1_000;
const ANY: CharSet = complementSet([]);
const ESCAPES: Record<string, number> = { n: 0x0a, r: 0x0d, t: 0x09, '\\': 0x5c, '"': 0x22, '[': 0x5b, ']': 0x5d, '-': 0x2d, '^': 0x5e, '/': 0x2f };

/** Reads a GBNF grammar; throws GrammarError naming the position of what it cannot read. */
export function parseGrammar(text: string): Grammar {
  if (typeof text !== 'string' || text.trim().length === 0) throw new GrammarError('grammar: a grammar must be a non-empty string of rules (root ::= ...)');
  return new GrammarParser(text).parse();
}

class GrammarParser {
  readonly #text: string;
  #at = 0;
  readonly #names: string[] = [];
  readonly #indexOf = new Map<string, number>();
  readonly #bodies: Array<GrammarNode | undefined> = [];
  /** Where each rule was first named (for an undefined rule's error). */
  readonly #firstUse: number[] = [];

  constructor(text: string) {
    this.#text = text;
  }

  parse(): Grammar {
    this.#skip();
    while (this.#at < this.#text.length) {
      const start = this.#at;
      const name = this.#name();
      if (name === undefined) throw this.#error(`expected a rule name (letters, digits, '-' and '_')`);
      this.#skip();
      if (!this.#text.startsWith('::=', this.#at)) throw this.#error(`expected '::=' after rule name '${name}'`);
      this.#at += 3;
      const index = this.#rule(name, start);
      if (this.#bodies[index] !== undefined) throw new GrammarError(`grammar: rule '${name}' is defined twice (at ${start})`, { position: start });
      this.#bodies[index] = this.#alternatives(false);
      this.#skip();
    }
    const root = this.#indexOf.get('root');
    if (root === undefined || this.#bodies[root] === undefined) throw new GrammarError("grammar: there is no rule named 'root', which the whole text must match");
    this.#bodies.forEach((body, index) => {
      if (body === undefined) throw new GrammarError(`grammar: rule '${this.#names[index]}' is used (at ${this.#firstUse[index]}) but never defined`, { position: this.#firstUse[index] });
    });
    return { text: this.#text, names: this.#names, rules: this.#bodies as GrammarNode[], root };
  }

  #rule(name: string, position: number): number {
    let index = this.#indexOf.get(name);
    if (index === undefined) {
      index = this.#names.length;
      this.#names.push(name);
      this.#indexOf.set(name, index);
      this.#bodies.push(undefined);
      this.#firstUse.push(position);
    }
    return index;
  }

  /** Alternatives up to the end of the rule (the next `name ::=`, or the text's end), or to ')' in a group. */
  #alternatives(inGroup: boolean): GrammarNode {
    const options: GrammarNode[] = [this.#sequence(inGroup)];
    while (this.#text[this.#at] === '|') {
      this.#at++;
      options.push(this.#sequence(inGroup));
    }
    return options.length === 1 ? options[0] : { kind: 'alternate', options };
  }

  #sequence(inGroup: boolean): GrammarNode {
    const parts: GrammarNode[] = [];
    for (;;) {
      this.#skip();
      const character = this.#text[this.#at];
      if (character === undefined || character === '|' || character === ')' || (!inGroup && this.#atRuleStart())) break;
      parts.push(this.#postfix(this.#atom()));
    }
    if (!inGroup && this.#text[this.#at] === ')') throw this.#error("')' without its '('");
    return parts.length === 1 ? parts[0] : { kind: 'concat', parts };
  }

  /** Whether a new rule (`name ::=`) starts here. */
  #atRuleStart(): boolean {
    const match = /^[A-Za-z][A-Za-z0-9_-]*[ \t]*::=/.exec(this.#text.slice(this.#at, this.#at + 200));
    return match !== null;
  }

  #atom(): GrammarNode {
    const position = this.#at;
    const character = this.#text[this.#at];
    if (character === '"') return this.#literal();
    if (character === '[') return { kind: 'chars', set: this.#class() };
    if (character === '.') {
      this.#at++;
      return { kind: 'chars', set: ANY };
    }
    if (character === '(') {
      this.#at++;
      const inner = this.#alternatives(true);
      this.#skip();
      if (this.#text[this.#at] !== ')') throw this.#error("expected ')' to close the group");
      this.#at++;
      return inner;
    }
    const name = this.#name();
    if (name !== undefined) return { kind: 'rule', rule: this.#rule(name, position) };
    throw this.#error(`unexpected ${JSON.stringify(character)}: expected a literal, a class, '.', a group or a rule name`);
  }

  #postfix(atom: GrammarNode): GrammarNode {
    let node = atom;
    for (;;) {
      const character = this.#text[this.#at];
      if (character === '*' || character === '+' || character === '?') {
        this.#at++;
        node = { kind: 'repeat', node, min: character === '+' ? 1 : 0, max: character === '?' ? 1 : Infinity };
        continue;
      }
      if (character === '{') {
        const match = /^\{\s*(\d+)\s*(,\s*(\d*)\s*)?\}/.exec(this.#text.slice(this.#at));
        if (!match) throw this.#error("expected {m}, {m,} or {m,n}");
        const min = Number(match[1]);
        const max = match[2] === undefined ? min : match[3] === '' ? Infinity : Number(match[3]);
        if (max < min) throw this.#error(`{${min},${max}}: the most is below the least`);
        if (min > MAX_REPEAT || (max !== Infinity && max > MAX_REPEAT)) throw this.#error(`repetition counts above ${MAX_REPEAT} are not supported`);
        this.#at += match[0].length;
        node = { kind: 'repeat', node, min, max };
        continue;
      }
      return node;
    }
  }

  #literal(): GrammarNode {
    this.#at++;
    const parts: GrammarNode[] = [];
    for (;;) {
      const character = this.#text[this.#at];
      if (character === undefined || character === '\n') throw this.#error('unterminated string literal');
      if (character === '"') {
        this.#at++;
        break;
      }
      const code = this.#character();
      parts.push({ kind: 'chars', set: [[code, code]] });
    }
    if (parts.length === 0) return { kind: 'concat', parts: [] };
    return parts.length === 1 ? parts[0] : { kind: 'concat', parts };
  }

  #class(): CharSet {
    this.#at++;
    const negated = this.#text[this.#at] === '^';
    if (negated) this.#at++;
    const ranges: Array<[number, number]> = [];
    for (;;) {
      const character = this.#text[this.#at];
      if (character === undefined) throw this.#error('unterminated character class');
      if (character === ']') {
        this.#at++;
        break;
      }
      const low = this.#character();
      let high = low;
      if (this.#text[this.#at] === '-' && this.#text[this.#at + 1] !== ']' && this.#text[this.#at + 1] !== undefined) {
        this.#at++;
        high = this.#character();
        if (high < low) throw this.#error(`range ${String.fromCodePoint(low)}-${String.fromCodePoint(high)} runs backwards`);
      }
      ranges.push([low, high]);
    }
    const set = normalizeSet(ranges);
    if (!negated && set.length === 0) throw this.#error('an empty character class matches nothing');
    return negated ? complementSet(set) : set;
  }

  /** One character of a literal or class, escapes read. */
  #character(): number {
    const character = this.#text[this.#at];
    if (character !== '\\') {
      const code = this.#text.codePointAt(this.#at)!;
      this.#at += code > 0xffff ? 2 : 1;
      return code;
    }
    const kind = this.#text[this.#at + 1];
    if (kind === undefined) throw this.#error('a backslash ends the grammar');
    const digits = kind === 'x' ? 2 : kind === 'u' ? 4 : kind === 'U' ? 8 : 0;
    if (digits > 0) {
      const hex = this.#text.slice(this.#at + 2, this.#at + 2 + digits);
      if (!new RegExp(`^[0-9a-fA-F]{${digits}}$`).test(hex)) throw this.#error(`\\${kind} needs ${digits} hexadecimal digits`);
      const code = parseInt(hex, 16);
      if (code > 0x10ffff || (code >= 0xd800 && code <= 0xdfff)) throw this.#error(`\\${kind}${hex} is not a Unicode scalar value`);
      this.#at += 2 + digits;
      return code;
    }
    const code = ESCAPES[kind];
    if (code === undefined) throw this.#error(`unknown escape \\${kind}`);
    this.#at += 2;
    return code;
  }

  #name(): string | undefined {
    const match = /^[A-Za-z][A-Za-z0-9_-]*/.exec(this.#text.slice(this.#at, this.#at + 200));
    if (!match) return undefined;
    this.#at += match[0].length;
    return match[0];
  }

  /** Skips whitespace (newlines included) and comments. */
  #skip(): void {
    for (;;) {
      const character = this.#text[this.#at];
      if (character === ' ' || character === '\t' || character === '\n' || character === '\r') this.#at++;
      else if (character === '#') while (this.#at < this.#text.length && this.#text[this.#at] !== '\n') this.#at++;
      else return;
    }
  }

  #error(message: string): GrammarError {
    return new GrammarError(`grammar at ${this.#at}: ${message}`, { position: this.#at });
  }
}
