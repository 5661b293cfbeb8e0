/**
 * Regular expressions for guided decoding, parsed into a tree and compiled into an automaton over
 * UTF-8 bytes. Bytes, not characters, because a byte-level vocabulary has tokens that end inside
 * a character: the token walks the automaton byte by byte and is allowed when it ends alive.
 *
 * The syntax is the common subset of JavaScript's and Python's: literals, `.`, classes with
 * ranges and negation, `\d \w \s` and their negations, escapes (`\n`, `\xHH`, `\uHHHH`,
 * `\u{H..}`), groups (capturing, `(?:)`, named), alternation and greedy or lazy quantifiers.
 * The whole text must match, so `^` at the start and `$` at the end are accepted and mean nothing
 * more. Lookaround, backreferences, word boundaries, flags and `\p{..}` are refused with a
 * GrammarError naming the position.
 */
import { GrammarError } from '../../errors.js';

/** Code point ranges, inclusive, sorted and disjoint. */
export type CharSet = ReadonlyArray<readonly [number, number]>;

export type RegexNode =
  | { kind: 'chars'; set: CharSet }
  | { kind: 'concat'; parts: RegexNode[] }
  | { kind: 'alternate'; options: RegexNode[] }
  | { kind: 'repeat'; node: RegexNode; min: number; max: number };

const MAX_CODE_POINT = 0x10ffff;
const SURROGATES: readonly [number, number] = [0xd800, 0xdfff];
/** Repetition counts above this are refused: the automaton copies the repeated part that many times. */
const MAX_REPEAT = 1_000;

/** Ranges sorted and merged where they touch or overlap. */
export function normalizeSet(ranges: ReadonlyArray<readonly [number, number]>): CharSet {
  const sorted = ranges.filter(([low, high]) => low <= high).map(([low, high]) => [low, high] as [number, number]).sort((a, b) => a[0] - b[0]);
  const merged: Array<[number, number]> = [];
  for (const range of sorted) {
    const last = merged.at(-1);
    if (last && range[0] <= last[1] + 1) last[1] = Math.max(last[1], range[1]);
    else merged.push(range);
  }
  return merged;
}

/** Every scalar value (code points without the surrogates) outside `set`. */
export function complementSet(set: CharSet): CharSet {
  const result: Array<[number, number]> = [];
  let next = 0;
  for (const [low, high] of normalizeSet([...set, SURROGATES])) {
    if (low > next) result.push([next, low - 1]);
    next = high + 1;
  }
  if (next <= MAX_CODE_POINT) result.push([next, MAX_CODE_POINT]);
  return result;
}

const DIGITS: CharSet = [[0x30, 0x39]];
const WORD: CharSet = normalizeSet([[0x30, 0x39], [0x41, 0x5a], [0x5f, 0x5f], [0x61, 0x7a]]);
// JavaScript's \s: the ASCII spaces and Unicode's space separators, line separators and BOM.
const SPACE: CharSet = normalizeSet([[0x09, 0x0d], [0x20, 0x20], [0xa0, 0xa0], [0x1680, 0x1680], [0x2000, 0x200a], [0x2028, 0x2029], [0x202f, 0x202f], [0x205f, 0x205f], [0x3000, 0x3000], [0xfeff, 0xfeff]]);
const ANY_BUT_NEWLINE: CharSet = complementSet([[0x0a, 0x0a]]);

const CLASS_ESCAPES: Record<string, CharSet> = {
  d: DIGITS,
  D: complementSet(DIGITS),
  w: WORD,
  W: complementSet(WORD),
  s: SPACE,
  S: complementSet(SPACE),
};

const CHARACTER_ESCAPES: Record<string, number> = { n: 0x0a, r: 0x0d, t: 0x09, f: 0x0c, v: 0x0b, '0': 0x00 };

/** Parses `pattern` into a tree; throws GrammarError naming the position of what it cannot read. */
export function parseRegex(pattern: string): RegexNode {
  if (typeof pattern !== 'string') throw new GrammarError(`a regex must be a string, got ${typeof pattern}`);
  return new Parser(pattern).parse();
}

class Parser {
  readonly #pattern: string;
  readonly #characters: string[];
  #position = 0;

  constructor(pattern: string) {
    this.#pattern = pattern;
    this.#characters = [...pattern];
  }

  parse(): RegexNode {
    const node = this.#alternation();
    if (this.#position < this.#characters.length) throw this.#error(`unmatched ')'`);
    return node;
  }

  #error(message: string, position = this.#position): GrammarError {
    return new GrammarError(`regex ${JSON.stringify(this.#pattern)} at ${position}: ${message}`, { position });
  }

  #peek(offset = 0): string | undefined {
    return this.#characters[this.#position + offset];
  }

  #alternation(): RegexNode {
    const options = [this.#concatenation()];
    while (this.#peek() === '|') {
      this.#position++;
      options.push(this.#concatenation());
    }
    return options.length === 1 ? options[0] : { kind: 'alternate', options };
  }

  #concatenation(): RegexNode {
    const parts: RegexNode[] = [];
    for (let next = this.#peek(); next !== undefined && next !== '|' && next !== ')'; next = this.#peek()) {
      const start = this.#position;
      const atom = this.#atom();
      if (atom === undefined) continue;
      parts.push(this.#quantified(atom, start));
    }
    return parts.length === 1 ? parts[0] : { kind: 'concat', parts };
  }

  /** An atom's quantifier, if one follows. */
  #quantified(atom: RegexNode, start: number): RegexNode {
    const quantifierAt = this.#position;
    const bounds = this.#quantifier();
    if (bounds === undefined) return atom;
    const [min, max] = bounds;
    // Lazy and greedy match the same texts; only which match a search reports differs.
    if (this.#peek() === '?') this.#position++;
    else if (this.#peek() === '+') throw this.#error('possessive quantifiers are not supported');
    if (this.#quantifier() !== undefined) throw this.#error('a quantifier cannot follow another', quantifierAt);
    if (atom.kind === 'concat' && atom.parts.length === 0) throw this.#error('nothing to repeat', start);
    return { kind: 'repeat', node: atom, min, max };
  }

  /** `*`, `+`, `?` or a `{m,n}` form at the position (consumed), else undefined. */
  #quantifier(): [number, number] | undefined {
    const next = this.#peek();
    if (next === '*' || next === '+' || next === '?') {
      this.#position++;
      return next === '*' ? [0, Infinity] : next === '+' ? [1, Infinity] : [0, 1];
    }
    if (next !== '{') return undefined;
    const rest = this.#characters.slice(this.#position).join('');
    const match = /^\{(\d*)(,?)(\d*)\}/.exec(rest);
    // A brace that is no quantifier is a literal, as Python reads it.
    if (match === null || (match[1] === '' && match[2] === '')) return undefined;
    const min = match[1] === '' ? 0 : Number(match[1]);
    const max = match[2] === '' ? min : match[3] === '' ? Infinity : Number(match[3]);
    if (min > max) throw this.#error(`the repetition {${match[1]},${match[3]}} has its minimum above its maximum`);
    if (min > MAX_REPEAT || (max !== Infinity && max > MAX_REPEAT)) throw this.#error(`repetition counts above ${MAX_REPEAT} are not supported`);
    this.#position += [...match[0]].length;
    return [min, max];
  }

  /** One atom, or undefined for an anchor that means nothing here. */
  #atom(): RegexNode | undefined {
    const position = this.#position;
    const character = this.#characters[this.#position++];
    switch (character) {
      case '(':
        return this.#group(position);
      case '[':
        return { kind: 'chars', set: this.#class() };
      case '.':
        return { kind: 'chars', set: ANY_BUT_NEWLINE };
      case '^':
        if (position !== 0) throw this.#error(`'^' is only supported at the start (the whole text matches)`, position);
        return undefined;
      case '$':
        if (this.#position !== this.#characters.length) throw this.#error(`'$' is only supported at the end (the whole text matches)`, position);
        return undefined;
      case '\\':
        return { kind: 'chars', set: this.#escape(false) };
      case '*':
      case '+':
      case '?':
        throw this.#error('nothing to repeat', position);
      default:
        if (character === '{' && this.#quantifierAt(position)) throw this.#error('nothing to repeat', position);
        return { kind: 'chars', set: [[character.codePointAt(0)!, character.codePointAt(0)!]] };
    }
  }

  #quantifierAt(position: number): boolean {
    const rest = this.#characters.slice(position).join('');
    return /^\{\d*,?\d*\}/.test(rest) && !rest.startsWith('{}');
  }

  #group(start: number): RegexNode {
    if (this.#peek() === '?') {
      const kind = this.#peek(1);
      if (kind === ':') this.#position += 2;
      else if ((kind === '<' && this.#peek(2) !== '=' && this.#peek(2) !== '!') || (kind === 'P' && this.#peek(2) === '<')) {
        const close = this.#characters.indexOf('>', this.#position);
        if (close < 0) throw this.#error('a group name is not closed with >', start);
        this.#position = close + 1;
      } else if (kind === '=' || kind === '!' || kind === '<') throw this.#error('lookaround is not supported', start);
      else throw this.#error(`the group syntax (?${kind ?? ''} is not supported (flags, conditionals)`, start);
    }
    const node = this.#alternation();
    if (this.#peek() !== ')') throw this.#error(`the group opened at ${start} is not closed`);
    this.#position++;
    return node;
  }

  /** After a backslash: the characters the escape stands for. */
  #escape(inClass: boolean): CharSet {
    const position = this.#position - 1;
    const character = this.#characters[this.#position++];
    if (character === undefined) throw this.#error('the pattern ends in a backslash', position);
    const set = CLASS_ESCAPES[character];
    if (set) return set;
    const code = CHARACTER_ESCAPES[character];
    if (code !== undefined) {
      if (character === '0' && /\d/.test(this.#peek() ?? '')) throw this.#error('octal escapes are not supported', position);
      return [[code, code]];
    }
    if (character === 'x') return this.#single(this.#hex(2, position));
    if (character === 'u') {
      if (this.#peek() === '{') {
        const close = this.#characters.indexOf('}', this.#position);
        const digits = close < 0 ? '' : this.#characters.slice(this.#position + 1, close).join('');
        if (!/^[0-9a-fA-F]{1,6}$/.test(digits) || parseInt(digits, 16) > MAX_CODE_POINT) throw this.#error('\\u{...} needs a code point in hex', position);
        this.#position = close + 1;
        return this.#single(parseInt(digits, 16));
      }
      return this.#single(this.#hex(4, position));
    }
    if (character === 'b' && inClass) return [[0x08, 0x08]];
    if (character === 'b' || character === 'B' || character === 'A' || character === 'Z' || character === 'z') throw this.#error(`the anchor \\${character} is not supported`, position);
    if (/[1-9]/.test(character) || character === 'k') throw this.#error('backreferences are not supported', position);
    if (character === 'p' || character === 'P') throw this.#error('Unicode property classes (\\p{...}) are not supported', position);
    if (/[A-Za-z]/.test(character)) throw this.#error(`unknown escape \\${character}`, position);
    const literal = character.codePointAt(0)!;
    return [[literal, literal]];
  }

  #single(code: number): CharSet {
    return [[code, code]];
  }

  #hex(count: number, position: number): number {
    const digits = this.#characters.slice(this.#position, this.#position + count).join('');
    if (!new RegExp(`^[0-9a-fA-F]{${count}}$`).test(digits)) throw this.#error(`the escape needs ${count} hex digits`, position);
    this.#position += count;
    return parseInt(digits, 16);
  }

  /** After '[': the class's characters, through its ']'. */
  #class(): CharSet {
    const start = this.#position - 1;
    let negated = false;
    if (this.#peek() === '^') {
      negated = true;
      this.#position++;
    }
    const ranges: Array<readonly [number, number]> = [];
    let first = true;
    for (;;) {
      const character = this.#peek();
      if (character === undefined) throw this.#error(`the class opened at ${start} is not closed`);
      // A ']' first in the class is a literal, as Python reads it.
      if (character === ']' && !first) break;
      first = false;
      const low = this.#classMember();
      if (this.#peek() === '-' && this.#peek(1) !== ']' && this.#peek(1) !== undefined && low.length === 1 && low[0][0] === low[0][1]) {
        const dash = this.#position;
        this.#position++;
        const high = this.#classMember();
        if (high.length !== 1 || high[0][0] !== high[0][1]) throw this.#error('a range must end in one character', dash);
        if (high[0][0] < low[0][0]) throw this.#error('the range runs backwards', dash);
        ranges.push([low[0][0], high[0][0]]);
      } else ranges.push(...low);
    }
    this.#position++;
    const set = normalizeSet(ranges.map(([low, high]) => [low, high] as [number, number]));
    return negated ? complementSet(set) : set;
  }

  #classMember(): CharSet {
    const character = this.#characters[this.#position++];
    if (character === '\\') return this.#escape(true);
    if (character === '[' && this.#peek() === ':') throw this.#error('POSIX classes ([:alpha:]) are not supported', this.#position - 1);
    const code = character.codePointAt(0)!;
    return [[code, code]];
  }
}

/** A regex literal that matches `text` exactly. */
export function escapeRegex(text: string): string {
  return text.replace(/[\\^$.|?*+()[\]{}\/-]/g, '\\$&');
}

// ---------------------------------------------------------------------------------------------
// UTF-8: a code point range as sequences of byte ranges

/** The byte ranges of UTF-8 encodings of every code point in [low, high]: each row matches a set of them. */
export function utf8Sequences(low: number, high: number): Array<Array<[number, number]>> {
  const result: Array<Array<[number, number]>> = [];
  const limits = [0x7f, 0x7ff, 0xffff, MAX_CODE_POINT];
  // Surrogates have no UTF-8 encoding.
  const pieces: Array<[number, number]> = [];
  if (low < SURROGATES[0]) pieces.push([low, Math.min(high, SURROGATES[0] - 1)]);
  if (high > SURROGATES[1]) pieces.push([Math.max(low, SURROGATES[1] + 1), high]);
  const split = (from: number, to: number): void => {
    if (from > to) return;
    // Split where the encoded length changes.
    for (const limit of limits) {
      if (from <= limit && to > limit) {
        split(from, limit);
        split(limit + 1, to);
        return;
      }
    }
    const length = encodedLength(from);
    // Split until each continuation byte either is fixed or spans its whole range (80..BF).
    for (let index = 1; index < length; index++) {
      const mask = (1 << (6 * index)) - 1;
      if ((from & ~mask) !== (to & ~mask)) {
        if ((from & mask) !== 0) {
          split(from, from | mask);
          split((from | mask) + 1, to);
          return;
        }
        if ((to & mask) !== mask) {
          split(from, (to & ~mask) - 1);
          split(to & ~mask, to);
          return;
        }
      }
    }
    const a = encode(from);
    const b = encode(to);
    result.push(a.map((byte, index) => [byte, b[index]]));
  };
  for (const [from, to] of pieces) split(from, to);
  return result;
}

function encodedLength(code: number): number {
  return code <= 0x7f ? 1 : code <= 0x7ff ? 2 : code <= 0xffff ? 3 : 4;
}

function encode(code: number): number[] {
  if (code <= 0x7f) return [code];
  if (code <= 0x7ff) return [0xc0 | (code >> 6), 0x80 | (code & 0x3f)];
  if (code <= 0xffff) return [0xe0 | (code >> 12), 0x80 | ((code >> 6) & 0x3f), 0x80 | (code & 0x3f)];
  return [0xf0 | (code >> 18), 0x80 | ((code >> 12) & 0x3f), 0x80 | ((code >> 6) & 0x3f), 0x80 | (code & 0x3f)];
}
