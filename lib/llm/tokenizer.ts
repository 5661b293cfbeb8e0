/**
 * Text ↔ token ids from a Hugging Face tokenizer.json, so a decoder takes prompts as text and
 * returns text. Covers the byte-pair tokenizers of GPT-2, Llama 2 / Mistral (SentencePiece-style,
 * with byte fallback), Llama 3.x and Qwen2, with the semantics of Hugging Face's `tokenizers`:
 *
 *   text → split on added tokens → normalizer → split on normalized added tokens
 *        → pre-tokenizer (pieces) → BPE per piece → post-processor (template's special tokens)
 *   ids  → tokens (special ones skipped) → decoder chain → text
 *
 * What is left out: pairs of sequences, truncation and padding (ignored), BPE dropout (ignored:
 * inference wants deterministic ids), offsets, and the models other than BPE. Anything else the
 * file names that this module does not implement is refused on load (ERR_TOKENIZER naming the
 * type) rather than silently mis-tokenized.
 *
 * Regular expressions in tokenizer.json are Oniguruma's (Rust's) dialect; they are translated
 * into JavaScript's before compiling: see {@link translatePattern}.
 */
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { InvalidArgumentError, ModelLoadError } from '../errors.js';

/** How {@link Tokenizer.encode} runs. */
export interface EncodeOptions {
  /** Add the template's special tokens (e.g. Llama 3's <|begin_of_text|>, Llama 2's <s>) per post_processor (default true). */
  addSpecialTokens?: boolean;
}

/** How {@link Tokenizer.decode} runs. */
export interface DecodeOptions {
  /** Leave out added tokens marked special (default true). */
  skipSpecialTokens?: boolean;
}

// ---------------------------------------------------------------------------------------------
// Errors while reading a tokenizer.json

/** Where a tokenizer comes from, for the errors that name it. */
interface Origin {
  file: string | undefined;
  name: string;
}

function loadError(origin: Origin, message: string, cause?: unknown): ModelLoadError {
  return new ModelLoadError('ERR_TOKENIZER', `${origin.name}: ${message}`, { file: origin.file, cause });
}

type JsonObject = Record<string, unknown>;

function isObject(value: unknown): value is JsonObject {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** A short rendering of a bad value for an error message. */
function show(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value.length > 60 ? `${value.slice(0, 60)}…` : value);
  if (typeof value === 'number' || typeof value === 'boolean' || typeof value === 'bigint' || value === null || value === undefined) return String(value);
  let text: string;
  try {
    text = JSON.stringify(value) ?? String(value);
  } catch {
    text = Object.prototype.toString.call(value);
  }
  return text.length > 60 ? `${text.slice(0, 60)}…` : text;
}

function requireObject(origin: Origin, value: unknown, where: string): JsonObject {
  if (!isObject(value)) throw loadError(origin, `${where} must be an object, got ${show(value)}`);
  return value;
}

function requireString(origin: Origin, value: unknown, where: string): string {
  if (typeof value !== 'string') throw loadError(origin, `${where} must be a string, got ${show(value)}`);
  return value;
}

function requireArray(origin: Origin, value: unknown, where: string): unknown[] {
  if (!Array.isArray(value)) throw loadError(origin, `${where} must be an array, got ${show(value)}`);
  return value;
}

function requireTokenId(origin: Origin, value: unknown, where: string): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > 0x7fffffff) {
    throw loadError(origin, `${where} must be a non-negative integer id, got ${show(value)}`);
  }
  return value;
}

function optionalBoolean(origin: Origin, value: unknown, where: string, fallback: boolean): boolean {
  if (value === undefined || value === null) return fallback;
  if (typeof value !== 'boolean') throw loadError(origin, `${where} must be a boolean, got ${show(value)}`);
  return value;
}

function componentType(origin: Origin, component: JsonObject, where: string): string {
  return requireString(origin, component.type, `${where}.type`);
}

// ---------------------------------------------------------------------------------------------
// Regular expressions: Oniguruma / Rust syntax → JavaScript

/**
 * Unicode White_Space, which Oniguruma's `\s` matches. JavaScript's `\s` differs: it adds U+FEFF
 * and lacks U+0085 (NEL), so `\s` is spelled out to split text as the reference does.
 */
const WHITE_SPACE_RANGES = '\\t-\\r \\x85\\xA0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000';
/** The complement of WHITE_SPACE_RANGES, for `\S` inside a class where `[^…]` cannot nest. */
const NOT_WHITE_SPACE_RANGES = '\\x00-\\x08\\x0E-\\x1F!-\\x84\\x86-\\x9F\\xA1-\\u167F\\u1681-\\u1FFF\\u200B-\\u2027\\u202A-\\u202E\\u2030-\\u205E\\u2060-\\u2FFF\\u3001-\\u{10FFFF}';
/** Oniguruma's Unicode `\w`; JavaScript's is ASCII only. */
const WORD_RANGES = '\\p{L}\\p{M}\\p{Nd}\\p{Pc}';
/** Characters that must stay escaped in a JavaScript pattern compiled with the 'u' flag. */
const SYNTAX_CHARACTERS = new Set('^$\\.*+?()[]{}|/-');

/** A letter matched either way round under `(?i)`, or undefined when it has no single-character other case. */
function caseVariants(character: string): string | undefined {
  const lower = character.toLowerCase();
  const upper = character.toUpperCase();
  if (lower === upper || [...lower].length !== 1 || [...upper].length !== 1) return undefined;
  return lower === character ? upper : upper === character ? lower : `${lower}${upper}`;
}

class PatternError extends Error {}

/**
 * Translates a tokenizer.json regular expression (Oniguruma syntax, as Hugging Face's tokenizers
 * compile it) into a JavaScript pattern for the 'u' flag:
 * - `(?i:…)` and `(?i)` (which Node 20's RegExp lacks) become explicit case classes: `s` → `[sS]`,
 *   `[sdmt]` → `[sSdDmMtT]`, `a-z` → `a-zA-Z`. Letters whose other case is several characters
 *   (ß) and non-ASCII ranges keep one case.
 * - Possessive quantifiers (`X?+`, `X*+`, `X++`, `X{n,m}+`) and atomic groups `(?>…)` become the
 *   exact JavaScript idiom for an atomic group, `(?=(?<g>X*))\k<g>`: the lookahead matches as much
 *   as it can and is never re-entered on backtracking, so the backreference consumes exactly that.
 *   (In Llama 3's pattern dropping the `+` would happen to give the same matches: no match there
 *   depends on backtracking into a possessive item, since what follows each cannot start with
 *   what it gave back. The idiom is exact for any pattern.)
 * - `\s`, `\S`, `\d`, `\D`, `\w`, `\W` take their Unicode meanings, `.` excludes only `\n`, `^` and
 *   `$` anchor lines (ended by `\n` only) while `\A` and `\z` anchor the whole text, `\x{…}` and
 *   `\pL`/`\p{^L}` take JavaScript's spelling, and `(?P<name>…)` becomes `(?<name>…)`.
 * Nested classes, class intersections, `\W` inside a class and flags other than `i` are refused.
 */
export function translatePattern(source: string): string {
  const characters = [...source];
  let output = '';
  let caseInsensitive = false;
  /** Where in `output` the last quantifiable item starts, or -1 when there is none. */
  let atomStart = -1;
  let atomicCount = 0;
  let numericBackreference = false;
  const groups: Array<{ outputStart: number; outerCaseInsensitive: boolean; closing: string }> = [];
  let index = 0;

  const peek = (offset = 0): string | undefined => characters[index + offset];

  /** The escape at `index` (just past its backslash), translated; `inClass` for class members. */
  const translateEscape = (inClass: boolean): string => {
    const letter = characters[index];
    if (letter === undefined) throw new PatternError('the pattern ends in a lone backslash');
    index += 1;
    switch (letter) {
      case 's':
        return inClass ? WHITE_SPACE_RANGES : `[${WHITE_SPACE_RANGES}]`;
      case 'S':
        return inClass ? NOT_WHITE_SPACE_RANGES : `[^${WHITE_SPACE_RANGES}]`;
      case 'd':
        return '\\p{Nd}';
      case 'D':
        return '\\P{Nd}';
      case 'w':
        return inClass ? WORD_RANGES : `[${WORD_RANGES}]`;
      case 'W':
        if (inClass) throw new PatternError('\\W inside a character class is not supported');
        return `[^${WORD_RANGES}]`;
      case 'A':
        if (inClass) throw new PatternError('\\A inside a character class');
        return '^';
      case 'z':
        if (inClass) throw new PatternError('\\z inside a character class');
        return '$';
      case 'Z':
        if (inClass) throw new PatternError('\\Z inside a character class');
        return '(?=\\n?$)';
      case 'p':
      case 'P': {
        let name: string;
        if (characters[index] === '{') {
          const close = characters.indexOf('}', index);
          if (close < 0) throw new PatternError(`unterminated \\${letter}{`);
          name = characters.slice(index + 1, close).join('');
          index = close + 1;
        } else {
          const single = characters[index];
          if (single === undefined) throw new PatternError(`\\${letter} without a property name`);
          name = single;
          index += 1;
        }
        let negated = letter === 'P';
        if (name.startsWith('^')) {
          negated = !negated;
          name = name.slice(1);
        }
        return `\\${negated ? 'P' : 'p'}{${name}}`;
      }
      case 'x': {
        if (characters[index] === '{') {
          const close = characters.indexOf('}', index);
          if (close < 0) throw new PatternError('unterminated \\x{');
          const hex = characters.slice(index + 1, close).join('');
          index = close + 1;
          return `\\u{${hex}}`;
        }
        const hex = characters.slice(index, index + 2).join('');
        index += 2;
        return `\\x${hex}`;
      }
      default:
        if (/[1-9]/.test(letter)) {
          numericBackreference = true;
          return `\\${letter}`;
        }
        if (/[A-Za-z0-9]/.test(letter)) return `\\${letter}`;
        // Rust and Oniguruma let any punctuation be escaped; the 'u' flag allows only syntax characters.
        return SYNTAX_CHARACTERS.has(letter) ? `\\${letter}` : letter;
    }
  };

  const translateClass = (): string => {
    // index is just past '['.
    let text = '[';
    if (peek() === '^') {
      text += '^';
      index += 1;
    }
    if (peek() === ']') {
      text += '\\]';
      index += 1;
    }
    for (;;) {
      const character = characters[index];
      if (character === undefined) throw new PatternError('unterminated character class');
      if (character === ']') {
        index += 1;
        return `${text}]`;
      }
      if (character === '[') throw new PatternError('nested character classes are not supported');
      if (character === '&' && peek(1) === '&') throw new PatternError('character class intersection (&&) is not supported');
      if (character === '\\') {
        index += 1;
        text += translateEscape(true);
        continue;
      }
      index += 1;
      if (caseInsensitive && peek() === '-' && peek(1) !== undefined && peek(1) !== ']' && peek(1) !== '\\') {
        const end = characters[index + 1] as string;
        index += 2;
        text += `${character}-${end}`;
        if (/[a-z]/.test(character) && /[a-z]/.test(end)) text += `${character.toUpperCase()}-${end.toUpperCase()}`;
        else if (/[A-Z]/.test(character) && /[A-Z]/.test(end)) text += `${character.toLowerCase()}-${end.toLowerCase()}`;
        continue;
      }
      text += character === '/' ? '\\/' : character;
      if (caseInsensitive) text += caseVariants(character) ?? '';
    }
  };

  while (index < characters.length) {
    const character = characters[index] as string;
    switch (character) {
      case '\\': {
        index += 1;
        const start = output.length;
        const escape = translateEscape(false);
        output += escape;
        atomStart = escape === '^' || escape === '$' || escape.startsWith('(?') ? -1 : start;
        break;
      }
      case '[': {
        index += 1;
        const start = output.length;
        output += translateClass();
        atomStart = start;
        break;
      }
      case '(': {
        index += 1;
        const start = output.length;
        const outerCaseInsensitive = caseInsensitive;
        if (peek() !== '?') {
          groups.push({ outputStart: start, outerCaseInsensitive, closing: ')' });
          output += '(';
          atomStart = -1;
          break;
        }
        index += 1;
        const kind = peek();
        if (kind === ':' || kind === '=' || kind === '!') {
          index += 1;
          groups.push({ outputStart: start, outerCaseInsensitive, closing: ')' });
          output += `(?${kind}`;
        } else if (kind === '<' && (peek(1) === '=' || peek(1) === '!')) {
          output += `(?<${peek(1)}`;
          index += 2;
          groups.push({ outputStart: start, outerCaseInsensitive, closing: ')' });
        } else if (kind === '<' || (kind === 'P' && peek(1) === '<')) {
          if (kind === 'P') index += 1;
          const close = characters.indexOf('>', index);
          if (close < 0) throw new PatternError('unterminated group name');
          const name = characters.slice(index + 1, close).join('');
          index = close + 1;
          groups.push({ outputStart: start, outerCaseInsensitive, closing: ')' });
          output += `(?<${name}>`;
        } else if (kind === '>') {
          index += 1;
          const name = `trellisAtomic${atomicCount++}`;
          groups.push({ outputStart: start, outerCaseInsensitive, closing: `))\\k<${name}>)` });
          output += `(?:(?=(?<${name}>`;
        } else {
          // Flags: (?i) for the rest of the enclosing group, or (?i:…) / (?-i:…) for a group.
          let flags = '';
          while (peek() !== undefined && peek() !== ':' && peek() !== ')') {
            flags += peek();
            index += 1;
          }
          const terminator = peek();
          if (terminator === undefined) throw new PatternError('unterminated group');
          index += 1;
          let value: boolean = true;
          let setting: boolean = caseInsensitive;
          for (const flag of flags) {
            if (flag === '-') value = false;
            else if (flag === 'i') setting = value;
            else if (flag !== 'u') throw new PatternError(`the inline flag '${flag}' is not supported`);
          }
          if (terminator === ')') {
            caseInsensitive = setting;
            atomStart = -1;
            break;
          }
          groups.push({ outputStart: start, outerCaseInsensitive, closing: ')' });
          caseInsensitive = setting;
          output += '(?:';
        }
        atomStart = -1;
        break;
      }
      case ')': {
        index += 1;
        const group = groups.pop();
        if (group === undefined) throw new PatternError('unbalanced parenthesis');
        output += group.closing;
        caseInsensitive = group.outerCaseInsensitive;
        atomStart = group.outputStart;
        break;
      }
      case '*':
      case '+':
      case '?':
      case '{': {
        let quantifier: string;
        if (character === '{') {
          const rest = characters.slice(index).join('');
          const bounds = /^\{(\d*)(?:(,)(\d*))?\}/.exec(rest);
          if (bounds === null || (bounds[1] === '' && (bounds[3] ?? '') === '')) {
            // Not a repetition: a literal brace, which the 'u' flag wants escaped.
            index += 1;
            const start = output.length;
            output += '\\{';
            atomStart = start;
            break;
          }
          quantifier = `{${bounds[1] === '' ? '0' : bounds[1]}${bounds[2] ?? ''}${bounds[3] ?? ''}}`;
          index += bounds[0].length;
        } else {
          quantifier = character;
          index += 1;
        }
        if (atomStart < 0) throw new PatternError(`the quantifier '${quantifier}' follows nothing it can repeat`);
        output += quantifier;
        if (peek() === '+') {
          index += 1;
          const name = `trellisAtomic${atomicCount++}`;
          output = `${output.slice(0, atomStart)}(?:(?=(?<${name}>${output.slice(atomStart)}))\\k<${name}>)`;
        } else if (peek() === '?') {
          index += 1;
          output += '?';
        }
        atomStart = -1;
        break;
      }
      case '|':
        index += 1;
        output += character;
        atomStart = -1;
        break;
      case '^':
      case '$':
        // Oniguruma's (Ruby's) ^ and $ always anchor lines, and only \n ends one; JavaScript's 'm' flag would add \r, U+2028 and U+2029.
        index += 1;
        output += character === '^' ? '(?<![^\\n])' : '(?![^\\n])';
        atomStart = -1;
        break;
      case '.':
        index += 1;
        atomStart = output.length;
        output += '[^\\n]';
        break;
      default: {
        index += 1;
        atomStart = output.length;
        const variants = caseInsensitive ? caseVariants(character) : undefined;
        if (variants !== undefined) output += `[${character}${variants}]`;
        else if (character === ']' || character === '}' || character === '/') output += `\\${character}`;
        else output += character;
      }
    }
  }
  if (groups.length > 0) throw new PatternError('unbalanced parenthesis');
  if (numericBackreference && atomicCount > 0) {
    throw new PatternError('numbered backreferences together with possessive quantifiers or atomic groups are not supported');
  }
  return output;
}

function compilePattern(origin: Origin, source: string, where: string): RegExp {
  try {
    return new RegExp(translatePattern(source), 'gu');
  } catch (error) {
    throw loadError(origin, `${where}: cannot compile the regular expression ${show(source)}: ${(error as Error).message}`, error);
  }
}

/** A `{String: s}` (taken literally) or `{Regex: r}` pattern. */
type Pattern = string | RegExp;

function parsePattern(origin: Origin, value: unknown, where: string): Pattern {
  const pattern = requireObject(origin, value, where);
  if (typeof pattern.String === 'string') return pattern.String;
  if (typeof pattern.Regex === 'string') return compilePattern(origin, pattern.Regex, where);
  throw loadError(origin, `${where} must be {"String": …} or {"Regex": …}, got ${show(value)}`);
}

function replaceAll(text: string, pattern: Pattern, content: string): string {
  // A replacer function keeps '$' in `content` literal.
  if (typeof pattern === 'string') return pattern === '' ? text : text.replaceAll(pattern, () => content);
  return text.replace(pattern, () => content);
}

// ---------------------------------------------------------------------------------------------
// GPT-2's byte alphabet

/**
 * GPT-2's map from bytes to printable characters: the printable bytes keep their code point, the
 * others take 256, 257, … in byte order, so every byte string is a string of visible characters.
 */
const BYTE_TO_CHARACTER: string[] = (() => {
  const table: string[] = new Array(256);
  let next = 256;
  for (let byte = 0; byte < 256; byte++) {
    const printable = (byte >= 33 && byte <= 126) || (byte >= 161 && byte <= 172) || (byte >= 174 && byte <= 255);
    table[byte] = String.fromCharCode(printable ? byte : next++);
  }
  return table;
})();

const CHARACTER_TO_BYTE = new Map<string, number>(BYTE_TO_CHARACTER.map((character, byte) => [character, byte]));

const utf8Encoder = new TextEncoder();
// ignoreBOM: a leading U+FEFF is text the model produced, not a byte-order mark to drop.
const lenientUtf8Decoder = new TextDecoder('utf-8', { ignoreBOM: true });
const strictUtf8Decoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

function toByteAlphabet(text: string): string {
  let mapped = '';
  for (const byte of utf8Encoder.encode(text)) mapped += BYTE_TO_CHARACTER[byte];
  return mapped;
}

/** GPT-2's pre-tokenizing pattern, which ByteLevel applies when use_regex is on. */
const GPT2_PATTERN = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

// ---------------------------------------------------------------------------------------------
// Normalizers

type Normalizer = (text: string) => string;

function parseNormalizer(origin: Origin, value: unknown, where: string): Normalizer | undefined {
  if (value === null || value === undefined) return undefined;
  const config = requireObject(origin, value, where);
  const type = componentType(origin, config, where);
  switch (type) {
    case 'NFC':
    case 'NFD':
    case 'NFKC':
    case 'NFKD':
      return (text) => text.normalize(type);
    case 'Prepend': {
      const prepend = requireString(origin, config.prepend, `${where}.prepend`);
      // Hugging Face prepends only to non-empty text.
      return (text) => (text.length > 0 ? prepend + text : text);
    }
    case 'Replace': {
      const pattern = parsePattern(origin, config.pattern, `${where}.pattern`);
      const content = requireString(origin, config.content, `${where}.content`);
      return (text) => replaceAll(text, pattern, content);
    }
    case 'Sequence': {
      const steps = requireArray(origin, config.normalizers, `${where}.normalizers`)
        .map((step, position) => parseNormalizer(origin, step, `${where}.normalizers[${position}]`))
        .filter((step): step is Normalizer => step !== undefined);
      return (text) => steps.reduce((current, step) => step(current), text);
    }
    default:
      throw loadError(origin, `${where}: normalizer type '${type}' is not supported (NFC, NFD, NFKC, NFKD, Prepend, Replace, Sequence)`);
  }
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers

/** A stretch of text on its way to the model; `atStart` when it begins the original text. */
interface Piece {
  text: string;
  atStart: boolean;
}

type PreTokenizer = (piece: Piece) => Piece[];

type SplitBehavior = 'Removed' | 'Isolated' | 'MergedWithPrevious' | 'MergedWithNext' | 'Contiguous';
const SPLIT_BEHAVIORS: readonly string[] = ['Removed', 'Isolated', 'MergedWithPrevious', 'MergedWithNext', 'Contiguous'];

interface Span {
  start: number;
  end: number;
  /** Whether the span is a match of the splitting pattern (after inversion). */
  delimiter: boolean;
}

/** The text cut into consecutive spans, matches of `pattern` and the gaps between them. */
function findSpans(text: string, pattern: Pattern, invert: boolean): Span[] {
  const spans: Span[] = [];
  let previous = 0;
  const addMatch = (start: number, end: number): void => {
    if (start > previous) spans.push({ start: previous, end: start, delimiter: invert });
    spans.push({ start, end, delimiter: !invert });
    previous = end;
  };
  if (typeof pattern === 'string') {
    if (pattern.length > 0) {
      for (let found = text.indexOf(pattern); found >= 0; found = text.indexOf(pattern, found + pattern.length)) {
        addMatch(found, found + pattern.length);
      }
    }
  } else {
    for (const match of text.matchAll(pattern)) addMatch(match.index, match.index + match[0].length);
  }
  if (previous < text.length) spans.push({ start: previous, end: text.length, delimiter: invert });
  return spans;
}

/** Groups the spans into pieces as Hugging Face's SplitDelimiterBehavior does. */
function groupSpans(spans: Span[], behavior: SplitBehavior): Array<[start: number, end: number]> {
  const pieces: Array<[number, number]> = [];
  switch (behavior) {
    case 'Removed':
      for (const span of spans) if (!span.delimiter) pieces.push([span.start, span.end]);
      break;
    case 'Isolated':
      for (const span of spans) pieces.push([span.start, span.end]);
      break;
    case 'MergedWithPrevious': {
      let previousDelimiter = false;
      for (const span of spans) {
        const last = pieces[pieces.length - 1];
        if (span.delimiter && !previousDelimiter && last !== undefined) last[1] = span.end;
        else pieces.push([span.start, span.end]);
        previousDelimiter = span.delimiter;
      }
      break;
    }
    case 'MergedWithNext': {
      let nextDelimiter = false;
      for (let position = spans.length - 1; position >= 0; position--) {
        const span = spans[position] as Span;
        const last = pieces[pieces.length - 1];
        if (span.delimiter && !nextDelimiter && last !== undefined) last[0] = span.start;
        else pieces.push([span.start, span.end]);
        nextDelimiter = span.delimiter;
      }
      pieces.reverse();
      break;
    }
    case 'Contiguous': {
      let previousDelimiter = false;
      for (const span of spans) {
        const last = pieces[pieces.length - 1];
        if (span.delimiter === previousDelimiter && last !== undefined) last[1] = span.end;
        else pieces.push([span.start, span.end]);
        previousDelimiter = span.delimiter;
      }
      break;
    }
  }
  return pieces;
}

function splitPiece(piece: Piece, pattern: Pattern, behavior: SplitBehavior, invert = false): Piece[] {
  const result: Piece[] = [];
  for (const [start, end] of groupSpans(findSpans(piece.text, pattern, invert), behavior)) {
    if (end > start) result.push({ text: piece.text.slice(start, end), atStart: piece.atStart && start === 0 });
  }
  return result;
}

type PrependScheme = 'always' | 'first' | 'never';

function parsePrependScheme(origin: Origin, config: JsonObject, where: string): PrependScheme {
  const scheme = config.prepend_scheme;
  if (scheme === undefined || scheme === null) {
    // Files older than prepend_scheme say add_prefix_space instead.
    return optionalBoolean(origin, config.add_prefix_space, `${where}.add_prefix_space`, true) ? 'always' : 'never';
  }
  if (scheme !== 'always' && scheme !== 'first' && scheme !== 'never') {
    throw loadError(origin, `${where}.prepend_scheme must be 'always', 'first' or 'never', got ${show(scheme)}`);
  }
  return scheme;
}

function parseReplacement(origin: Origin, config: JsonObject, where: string): string {
  const replacement = requireString(origin, config.replacement ?? '▁', `${where}.replacement`);
  if ([...replacement].length !== 1) throw loadError(origin, `${where}.replacement must be one character, got ${show(replacement)}`);
  return replacement;
}

function parsePreTokenizer(origin: Origin, value: unknown, where: string): PreTokenizer | undefined {
  if (value === null || value === undefined) return undefined;
  const config = requireObject(origin, value, where);
  const type = componentType(origin, config, where);
  switch (type) {
    case 'ByteLevel': {
      const addPrefixSpace = optionalBoolean(origin, config.add_prefix_space, `${where}.add_prefix_space`, true);
      const useRegex = optionalBoolean(origin, config.use_regex, `${where}.use_regex`, true);
      const pattern = useRegex ? compilePattern(origin, GPT2_PATTERN, where) : undefined;
      return (piece) => {
        const text = addPrefixSpace && !piece.text.startsWith(' ') ? ` ${piece.text}` : piece.text;
        const pieces = pattern === undefined ? [{ text, atStart: piece.atStart }] : splitPiece({ text, atStart: piece.atStart }, pattern, 'Isolated');
        return pieces.map((part) => ({ text: toByteAlphabet(part.text), atStart: part.atStart }));
      };
    }
    case 'Split': {
      const pattern = parsePattern(origin, config.pattern, `${where}.pattern`);
      const behavior = config.behavior;
      if (typeof behavior !== 'string' || !SPLIT_BEHAVIORS.includes(behavior)) {
        throw loadError(origin, `${where}.behavior must be one of ${SPLIT_BEHAVIORS.join(', ')}, got ${show(behavior)}`);
      }
      const invert = optionalBoolean(origin, config.invert, `${where}.invert`, false);
      return (piece) => splitPiece(piece, pattern, behavior as SplitBehavior, invert);
    }
    case 'Metaspace': {
      const replacement = parseReplacement(origin, config, where);
      const prependScheme = parsePrependScheme(origin, config, where);
      const split = optionalBoolean(origin, config.split, `${where}.split`, true);
      return (piece) => {
        let text = piece.text.replaceAll(' ', replacement);
        const prepend = prependScheme === 'always' || (prependScheme === 'first' && piece.atStart);
        if (prepend && !text.startsWith(replacement)) text = replacement + text;
        const spaced = { text, atStart: piece.atStart };
        return split ? splitPiece(spaced, replacement, 'MergedWithNext') : [spaced];
      };
    }
    case 'Digits': {
      const individual = optionalBoolean(origin, config.individual_digits, `${where}.individual_digits`, false);
      const pattern = individual ? /\p{N}/gu : /\p{N}+/gu;
      return (piece) => splitPiece(piece, pattern, 'Isolated');
    }
    case 'Sequence': {
      const steps = requireArray(origin, config.pretokenizers, `${where}.pretokenizers`)
        .map((step, position) => parsePreTokenizer(origin, step, `${where}.pretokenizers[${position}]`))
        .filter((step): step is PreTokenizer => step !== undefined);
      return (piece) => steps.reduce<Piece[]>((pieces, step) => pieces.flatMap(step), [piece]);
    }
    default:
      throw loadError(origin, `${where}: pre-tokenizer type '${type}' is not supported (ByteLevel, Split, Metaspace, Digits, Sequence)`);
  }
}

// ---------------------------------------------------------------------------------------------
// The BPE model

/** Pieces longer than this are tokenized afresh each time: a cache of whole prompts would only churn. */
const LONGEST_CACHED_PIECE = 256;
const CACHED_PIECES = 20_000;
/** A merge queue key is rank · 2^32 + position, so the smallest key is the lowest rank, leftmost. */
const POSITION_SPAN = 2 ** 32;

function heapPush(heap: number[], key: number): void {
  let position = heap.length;
  heap.push(key);
  while (position > 0) {
    const parent = (position - 1) >> 1;
    const parentKey = heap[parent] as number;
    if (parentKey <= key) break;
    heap[position] = parentKey;
    position = parent;
  }
  heap[position] = key;
}

function heapPop(heap: number[]): number {
  const top = heap[0] as number;
  const last = heap.pop() as number;
  const size = heap.length;
  if (size === 0) return top;
  let position = 0;
  for (;;) {
    let child = 2 * position + 1;
    if (child >= size) break;
    if (child + 1 < size && (heap[child + 1] as number) < (heap[child] as number)) child += 1;
    if ((heap[child] as number) >= last) break;
    heap[position] = heap[child] as number;
    position = child;
  }
  heap[position] = last;
  return top;
}

/**
 * Byte-pair encoding: a piece starts as one symbol per character (or per byte through byte
 * fallback) and the adjacent pair of lowest merge rank is merged, leftmost first, until no pair
 * has a merge. A heap keeps this O(n log n) for long pieces (a whole prompt is one piece for
 * Llama 2, which has no pre-tokenizer).
 */
class BytePairModel {
  readonly vocab: Map<string, number>;
  /** Token of each id of the vocab (holes where the vocab skips ids). */
  readonly tokens: string[];
  readonly largestId: number;
  private readonly pairBase: number;
  /** (left id · pairBase + right id) → merge rank. */
  private readonly ranks = new Map<number, number>();
  /** The id each rank's merge produces. */
  private readonly mergedIds: Int32Array;
  private readonly byteFallbackIds: Int32Array | undefined;
  private readonly unknownId: number | undefined;
  private readonly fuseUnknown: boolean;
  private readonly ignoreMerges: boolean;
  private readonly cache = new Map<string, number[]>();

  constructor(origin: Origin, config: JsonObject) {
    const where = 'model';
    const vocab = requireObject(origin, config.vocab, `${where}.vocab`);
    this.vocab = new Map();
    this.tokens = [];
    let largestId = -1;
    for (const [token, value] of Object.entries(vocab)) {
      const id = requireTokenId(origin, value, `${where}.vocab[${show(token)}]`);
      this.vocab.set(token, id);
      this.tokens[id] = token;
      if (id > largestId) largestId = id;
    }
    this.largestId = largestId;
    this.pairBase = largestId + 1;

    for (const field of ['continuing_subword_prefix', 'end_of_word_suffix'] as const) {
      if (config[field] !== null && config[field] !== undefined && config[field] !== '') {
        throw loadError(origin, `${where}.${field} ${show(config[field])} is not supported (only null: the tokenizers of GPT-2, Llama and Qwen2 have none)`);
      }
    }

    const merges = requireArray(origin, config.merges ?? [], `${where}.merges`);
    this.mergedIds = new Int32Array(merges.length);
    merges.forEach((merge, rank) => {
      let left: unknown;
      let right: unknown;
      if (typeof merge === 'string') {
        const parts = merge.split(' ');
        if (parts.length !== 2) throw loadError(origin, `${where}.merges[${rank}] must be two tokens separated by one space, got ${show(merge)}`);
        [left, right] = parts;
      } else if (Array.isArray(merge) && merge.length === 2) {
        [left, right] = merge;
      }
      if (typeof left !== 'string' || typeof right !== 'string') {
        throw loadError(origin, `${where}.merges[${rank}] must be "a b" or ["a", "b"], got ${show(merge)}`);
      }
      const leftId = this.vocab.get(left);
      const rightId = this.vocab.get(right);
      const mergedId = this.vocab.get(left + right);
      if (leftId === undefined || rightId === undefined || mergedId === undefined) {
        const missing = leftId === undefined ? left : rightId === undefined ? right : left + right;
        throw loadError(origin, `${where}.merges[${rank}] (${show(merge)}) needs the token ${show(missing)}, which is not in the vocab`);
      }
      // As in Hugging Face's map, a pair listed twice keeps its last rank.
      this.ranks.set(leftId * this.pairBase + rightId, rank);
      this.mergedIds[rank] = mergedId;
    });

    if (optionalBoolean(origin, config.byte_fallback, `${where}.byte_fallback`, false)) {
      this.byteFallbackIds = new Int32Array(256).fill(-1);
      for (let byte = 0; byte < 256; byte++) {
        const id = this.vocab.get(`<0x${byte.toString(16).toUpperCase().padStart(2, '0')}>`);
        if (id !== undefined) this.byteFallbackIds[byte] = id;
      }
    }
    const unknownToken = config.unk_token;
    if (unknownToken !== null && unknownToken !== undefined) {
      const token = requireString(origin, unknownToken, `${where}.unk_token`);
      this.unknownId = this.vocab.get(token);
      if (this.unknownId === undefined) throw loadError(origin, `${where}.unk_token ${show(token)} is not in the vocab`);
    }
    this.fuseUnknown = optionalBoolean(origin, config.fuse_unk, `${where}.fuse_unk`, false);
    this.ignoreMerges = optionalBoolean(origin, config.ignore_merges, `${where}.ignore_merges`, false);
  }

  /** Appends the ids of one pre-tokenized piece to `ids`. */
  tokenize(piece: string, ids: number[]): void {
    if (piece.length === 0) return;
    if (this.ignoreMerges) {
      const whole = this.vocab.get(piece);
      if (whole !== undefined) {
        ids.push(whole);
        return;
      }
    }
    const cached = this.cache.get(piece);
    if (cached !== undefined) {
      for (const id of cached) ids.push(id);
      return;
    }
    const result = this.merge(piece);
    if (piece.length <= LONGEST_CACHED_PIECE) {
      if (this.cache.size >= CACHED_PIECES) this.cache.delete(this.cache.keys().next().value as string);
      this.cache.set(piece, result);
    }
    for (const id of result) ids.push(id);
  }

  private initialSymbols(piece: string): number[] {
    const symbols: number[] = [];
    let unknownPending = false;
    for (const character of piece) {
      const id = this.vocab.get(character);
      if (id !== undefined) {
        symbols.push(id);
        unknownPending = false;
        continue;
      }
      const byteFallbackIds = this.byteFallbackIds;
      if (byteFallbackIds !== undefined) {
        const byteIds = [...utf8Encoder.encode(character)].map((byte) => byteFallbackIds[byte] as number);
        if (byteIds.every((byteId) => byteId >= 0)) {
          symbols.push(...byteIds);
          unknownPending = false;
          continue;
        }
      }
      // With no unknown token the character is dropped, as Hugging Face's BPE does.
      if (this.unknownId !== undefined) {
        if (!(this.fuseUnknown && unknownPending)) symbols.push(this.unknownId);
        unknownPending = true;
      }
    }
    return symbols;
  }

  private rankOf(left: number, right: number): number | undefined {
    return this.ranks.get(left * this.pairBase + right);
  }

  private merge(piece: string): number[] {
    const symbols = this.initialSymbols(piece);
    const count = symbols.length;
    if (count < 2 || this.ranks.size === 0) return symbols;
    const next = new Int32Array(count);
    const previous = new Int32Array(count);
    const heap: number[] = [];
    for (let position = 0; position < count; position++) {
      previous[position] = position - 1;
      next[position] = position + 1 < count ? position + 1 : -1;
      if (position + 1 < count) {
        const rank = this.rankOf(symbols[position] as number, symbols[position + 1] as number);
        if (rank !== undefined) heapPush(heap, rank * POSITION_SPAN + position);
      }
    }
    while (heap.length > 0) {
      const key = heapPop(heap);
      const rank = Math.floor(key / POSITION_SPAN);
      const position = key - rank * POSITION_SPAN;
      const left = symbols[position] as number;
      if (left < 0) continue;
      const rightPosition = next[position] as number;
      if (rightPosition < 0) continue;
      // A queued pair may have changed since; a rank names exactly one pair, so an equal rank means it is still there.
      if (this.rankOf(left, symbols[rightPosition] as number) !== rank) continue;
      const merged = this.mergedIds[rank] as number;
      symbols[position] = merged;
      symbols[rightPosition] = -1;
      const after = next[rightPosition] as number;
      next[position] = after;
      if (after >= 0) previous[after] = position;
      const before = previous[position] as number;
      if (before >= 0) {
        const beforeRank = this.rankOf(symbols[before] as number, merged);
        if (beforeRank !== undefined) heapPush(heap, beforeRank * POSITION_SPAN + before);
      }
      if (after >= 0) {
        const afterRank = this.rankOf(merged, symbols[after] as number);
        if (afterRank !== undefined) heapPush(heap, afterRank * POSITION_SPAN + position);
      }
    }
    const result: number[] = [];
    for (let position = 0; position >= 0; position = next[position] as number) result.push(symbols[position] as number);
    return result;
  }
}

// ---------------------------------------------------------------------------------------------
// Added tokens

interface AddedToken {
  id: number;
  content: string;
  special: boolean;
  lstrip: boolean;
  rstrip: boolean;
  normalized: boolean;
  singleWord: boolean;
}

/** A stretch of the input: text still to tokenize (with its offset), or a matched added token. */
type Segment = { text: string; start: number; id?: undefined } | { id: number; text?: undefined; start?: undefined };

const WHITE_SPACE = new RegExp(`[${WHITE_SPACE_RANGES}]`, 'u');
const WORD_CHARACTER = /[\p{L}\p{N}_]/u;

/**
 * Finds added tokens in text, leftmost first and the longest where several start at one place
 * (as Hugging Face's leftmost-longest automaton does). `lstrip`/`rstrip` take in the white space
 * beside a match; `single_word` refuses a match that touches a letter, digit or underscore.
 */
class AddedTokenMatcher {
  private readonly byFirstUnit = new Map<number, Array<{ token: AddedToken; content: string }>>();

  constructor(entries: Array<{ token: AddedToken; content: string }>) {
    for (const entry of entries) {
      if (entry.content.length === 0) continue;
      const unit = entry.content.charCodeAt(0);
      let list = this.byFirstUnit.get(unit);
      if (list === undefined) this.byFirstUnit.set(unit, (list = []));
      list.push(entry);
    }
    for (const list of this.byFirstUnit.values()) list.sort((first, second) => second.content.length - first.content.length);
  }

  get empty(): boolean {
    return this.byFirstUnit.size === 0;
  }

  split(text: string, offset: number): Segment[] {
    if (this.empty) return [{ text, start: offset }];
    const segments: Segment[] = [];
    let segmentStart = 0;
    let position = 0;
    while (position < text.length) {
      const candidates = this.byFirstUnit.get(text.charCodeAt(position));
      const found = candidates?.find(({ token, content }) => {
        if (!text.startsWith(content, position)) return false;
        if (!token.singleWord) return true;
        const before = position > 0 ? text[position - 1] : undefined;
        const after = text[position + content.length];
        return !(before !== undefined && WORD_CHARACTER.test(before)) && !(after !== undefined && WORD_CHARACTER.test(after));
      });
      if (found === undefined) {
        position += 1;
        continue;
      }
      let start = position;
      let end = position + found.content.length;
      if (found.token.lstrip) while (start > segmentStart && WHITE_SPACE.test(text[start - 1] as string)) start -= 1;
      if (found.token.rstrip) while (end < text.length && WHITE_SPACE.test(text[end] as string)) end += 1;
      if (start > segmentStart) segments.push({ text: text.slice(segmentStart, start), start: offset + segmentStart });
      segments.push({ id: found.token.id });
      segmentStart = end;
      position = end;
    }
    if (segmentStart < text.length) segments.push({ text: text.slice(segmentStart), start: offset + segmentStart });
    return segments;
  }
}

function parseAddedTokens(origin: Origin, value: unknown): AddedToken[] {
  if (value === null || value === undefined) return [];
  return requireArray(origin, value, 'added_tokens').map((item, position) => {
    const where = `added_tokens[${position}]`;
    const token = requireObject(origin, item, where);
    const special = optionalBoolean(origin, token.special, `${where}.special`, false);
    return {
      id: requireTokenId(origin, token.id, `${where}.id`),
      content: requireString(origin, token.content, `${where}.content`),
      special,
      lstrip: optionalBoolean(origin, token.lstrip, `${where}.lstrip`, false),
      rstrip: optionalBoolean(origin, token.rstrip, `${where}.rstrip`, false),
      normalized: optionalBoolean(origin, token.normalized, `${where}.normalized`, !special),
      singleWord: optionalBoolean(origin, token.single_word, `${where}.single_word`, false),
    };
  });
}

// ---------------------------------------------------------------------------------------------
// Post-processors (single sequences only)

type PostProcessor = (ids: number[]) => number[];

function parseIdTokenPair(origin: Origin, value: unknown, where: string): number {
  if (!Array.isArray(value) || value.length !== 2) throw loadError(origin, `${where} must be [token, id], got ${show(value)}`);
  return requireTokenId(origin, value[1], `${where}[1]`);
}

function parsePostProcessor(origin: Origin, value: unknown, where: string): PostProcessor | undefined {
  if (value === null || value === undefined) return undefined;
  const config = requireObject(origin, value, where);
  const type = componentType(origin, config, where);
  switch (type) {
    case 'TemplateProcessing': {
      const specialTokens = config.special_tokens === undefined ? {} : requireObject(origin, config.special_tokens, `${where}.special_tokens`);
      const template = requireArray(origin, config.single, `${where}.single`).map((item, position): number[] | 'sequence' => {
        const itemWhere = `${where}.single[${position}]`;
        const entry = requireObject(origin, item, itemWhere);
        if (isObject(entry.Sequence)) {
          if (entry.Sequence.id !== 'A') throw loadError(origin, `${itemWhere}: only sequence 'A' is supported in a single template, got ${show(entry.Sequence.id)}`);
          return 'sequence';
        }
        if (isObject(entry.SpecialToken)) {
          const name = requireString(origin, entry.SpecialToken.id, `${itemWhere}.SpecialToken.id`);
          const special = specialTokens[name];
          if (!isObject(special)) throw loadError(origin, `${itemWhere}: the special token ${show(name)} is not in ${where}.special_tokens`);
          return requireArray(origin, special.ids, `${where}.special_tokens[${show(name)}].ids`).map((id, idPosition) =>
            requireTokenId(origin, id, `${where}.special_tokens[${show(name)}].ids[${idPosition}]`),
          );
        }
        throw loadError(origin, `${itemWhere} must be {"SpecialToken": …} or {"Sequence": …}, got ${show(item)}`);
      });
      return (ids) => template.flatMap((part) => (part === 'sequence' ? ids : part));
    }
    case 'BertProcessing':
    case 'RobertaProcessing': {
      const classifier = parseIdTokenPair(origin, config.cls, `${where}.cls`);
      const separator = parseIdTokenPair(origin, config.sep, `${where}.sep`);
      return (ids) => [classifier, ...ids, separator];
    }
    case 'ByteLevel':
      // Hugging Face's ByteLevel post-processor only trims offsets; the ids stay as they are.
      return undefined;
    case 'Sequence': {
      const steps = requireArray(origin, config.processors, `${where}.processors`)
        .map((step, position) => parsePostProcessor(origin, step, `${where}.processors[${position}]`))
        .filter((step): step is PostProcessor => step !== undefined);
      return (ids) => steps.reduce((current, step) => step(current), ids);
    }
    default:
      throw loadError(origin, `${where}: post-processor type '${type}' is not supported (TemplateProcessing, BertProcessing, RobertaProcessing, ByteLevel, Sequence)`);
  }
}

// ---------------------------------------------------------------------------------------------
// Decoders: each turns the list of token strings into another list; the last one's are joined.

type Decoder = (tokens: string[]) => string[];

function decodeBytesOrReplace(bytes: number[]): string[] {
  try {
    return [strictUtf8Decoder.decode(Uint8Array.from(bytes))];
  } catch {
    // As Hugging Face's ByteFallback: a run of bytes that is not UTF-8 becomes one U+FFFD per byte.
    return bytes.map(() => '\uFFFD');
  }
}

const BYTE_TOKEN = /^<0x([0-9A-Fa-f]{2})>$/;

/** Hugging Face's Strip decoder on one token: up to `start` leading and `stop` trailing copies of `content` removed. */
function stripCharacter(token: string, content: string, start: number, stop: number): string {
  const characters = [...token];
  let from = 0;
  while (from < start && from < characters.length && characters[from] === content) from += 1;
  let to = characters.length;
  while (characters.length - to < stop && to > from && characters[to - 1] === content) to -= 1;
  return characters.slice(from, to).join('');
}

function parseDecoder(origin: Origin, value: unknown, where: string): Decoder | undefined {
  if (value === null || value === undefined) return undefined;
  const config = requireObject(origin, value, where);
  const type = componentType(origin, config, where);
  switch (type) {
    case 'ByteLevel':
      return (tokens) => {
        const bytes: number[] = [];
        for (const token of tokens) {
          const mapped: number[] = [];
          for (const character of token) {
            const byte = CHARACTER_TO_BYTE.get(character);
            if (byte === undefined) break;
            mapped.push(byte);
          }
          // A token outside the byte alphabet (an added token such as "<|eot_id|>" with a space) stands for its own UTF-8.
          if (mapped.length === [...token].length) bytes.push(...mapped);
          else bytes.push(...utf8Encoder.encode(token));
        }
        return [lenientUtf8Decoder.decode(Uint8Array.from(bytes))];
      };
    case 'Metaspace': {
      const replacement = parseReplacement(origin, config, where);
      const prependScheme = parsePrependScheme(origin, config, where);
      return (tokens) =>
        tokens.map((token, position) =>
          // As Hugging Face does, the first token loses every replacement character, not just a leading one.
          position === 0 && prependScheme !== 'never' ? token.replaceAll(replacement, '') : token.replaceAll(replacement, ' '),
        );
    }
    case 'Replace': {
      const pattern = parsePattern(origin, config.pattern, `${where}.pattern`);
      const content = requireString(origin, config.content, `${where}.content`);
      return (tokens) => tokens.map((token) => replaceAll(token, pattern, content));
    }
    case 'ByteFallback':
      return (tokens) => {
        const result: string[] = [];
        let pending: number[] = [];
        for (const token of tokens) {
          const byte = BYTE_TOKEN.exec(token);
          if (byte !== null) {
            pending.push(parseInt(byte[1] as string, 16));
            continue;
          }
          if (pending.length > 0) {
            result.push(...decodeBytesOrReplace(pending));
            pending = [];
          }
          result.push(token);
        }
        if (pending.length > 0) result.push(...decodeBytesOrReplace(pending));
        return result;
      };
    case 'Fuse':
      return (tokens) => [tokens.join('')];
    case 'Strip': {
      const content = requireString(origin, config.content, `${where}.content`);
      if ([...content].length !== 1) throw loadError(origin, `${where}.content must be one character, got ${show(content)}`);
      const start = requireTokenId(origin, config.start ?? 0, `${where}.start`);
      const stop = requireTokenId(origin, config.stop ?? 0, `${where}.stop`);
      return (tokens) => tokens.map((token) => stripCharacter(token, content, start, stop));
    }
    case 'Sequence': {
      const steps = requireArray(origin, config.decoders, `${where}.decoders`)
        .map((step, position) => parseDecoder(origin, step, `${where}.decoders[${position}]`))
        .filter((step): step is Decoder => step !== undefined);
      return (tokens) => steps.reduce((current, step) => step(current), tokens);
    }
    default:
      throw loadError(origin, `${where}: decoder type '${type}' is not supported (ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence)`);
  }
}

/**
 * How one token reads as bytes in the middle of a text, through the decoder chain: what guided
 * decoding walks its automaton with. Steps that only act at the start of a whole text (a Strip
 * after a Fuse, Metaspace's first-token rule) do not apply in the middle and are skipped.
 */
interface TokenByteReader {
  read: (token: string) => Uint8Array;
  /** The decoder drops a space that begins the whole text (SentencePiece's prefix space). */
  stripsLeadingSpace: boolean;
}

function tokenByteReader(value: unknown): TokenByteReader {
  let stripsLeadingSpace = false;
  type Piece = string | number[];
  const steps: Array<(piece: Piece) => Piece> = [];
  let fused = false;
  const add = (config: JsonObject): void => {
    switch (config.type) {
      case 'ByteLevel':
        steps.push((piece) => {
          if (typeof piece !== 'string') return piece;
          const mapped: number[] = [];
          for (const character of piece) {
            const byte = CHARACTER_TO_BYTE.get(character);
            if (byte === undefined) return [...utf8Encoder.encode(piece)];
            mapped.push(byte);
          }
          return mapped;
        });
        break;
      case 'Metaspace': {
        const replacement = typeof config.replacement === 'string' ? config.replacement : '\u2581';
        if (parsePrependScheme({ file: undefined, name: 'decoder' }, config, 'decoder') !== 'never') stripsLeadingSpace = true;
        steps.push((piece) => (typeof piece === 'string' ? piece.replaceAll(replacement, ' ') : piece));
        break;
      }
      case 'Replace': {
        const pattern = parsePattern({ file: undefined, name: 'decoder' }, config.pattern, 'decoder.pattern');
        const content = config.content as string;
        steps.push((piece) => (typeof piece === 'string' ? replaceAll(piece, pattern, content) : piece));
        break;
      }
      case 'ByteFallback':
        steps.push((piece) => {
          const byte = typeof piece === 'string' ? BYTE_TOKEN.exec(piece) : null;
          return byte === null ? piece : [parseInt(byte[1] as string, 16)];
        });
        break;
      case 'Fuse':
        fused = true;
        break;
      case 'Strip': {
        if (fused) {
          if (config.content === ' ' && ((config.start as number | undefined) ?? 0) >= 1) stripsLeadingSpace = true;
          break;
        }
        const content = config.content as string;
        const start = (config.start as number | undefined) ?? 0;
        const stop = (config.stop as number | undefined) ?? 0;
        steps.push((piece) => (typeof piece === 'string' ? stripCharacter(piece, content, start, stop) : piece));
        break;
      }
      case 'Sequence':
        for (const step of config.decoders as JsonObject[]) add(step);
        break;
    }
  };
  if (isObject(value)) add(value);
  return {
    read: (token) => {
      const piece = steps.reduce<Piece>((current, step) => step(current), token);
      return typeof piece === 'string' ? utf8Encoder.encode(piece) : Uint8Array.from(piece);
    },
    stripsLeadingSpace,
  };
}

// ---------------------------------------------------------------------------------------------
// The tokenizer

/** The one-line description of a bad argument's value. */
function describeArgument(value: unknown): string {
  return `${typeof value} ${show(value)}`;
}

/**
 * A Hugging Face tokenizer.json, loaded: encodes text into token ids and decodes ids into text.
 * Encoding always succeeds for a string (characters the vocab lacks go through byte fallback or
 * the unknown token, or are dropped when the file has neither, as Hugging Face does).
 */
export class Tokenizer {
  /** Largest id + 1 over the model vocab and the added tokens. */
  readonly vocabSize: number;
  private readonly model: BytePairModel;
  private readonly normalizer: Normalizer | undefined;
  private readonly preTokenizer: PreTokenizer | undefined;
  private readonly postProcessor: PostProcessor | undefined;
  private readonly decoder: Decoder | undefined;
  private readonly tokenByteReader: TokenByteReader;
  private readonly addedById = new Map<number, AddedToken>();
  private readonly addedByContent = new Map<string, AddedToken>();
  /** Added tokens matched in the raw text, before normalizing. */
  private readonly rawMatcher: AddedTokenMatcher;
  /** Added tokens with normalized: true, matched (in normalized form) in the normalized text. */
  private readonly normalizedMatcher: AddedTokenMatcher;

  private constructor(json: JsonObject, origin: Origin) {
    const model = requireObject(origin, json.model, 'model');
    // Files written before models were tagged hold an untagged BPE model.
    const modelType = model.type ?? (model.merges !== undefined ? 'BPE' : undefined);
    if (modelType !== 'BPE') throw loadError(origin, `model type '${String(modelType)}' is not supported (only BPE)`);
    this.model = new BytePairModel(origin, model);
    this.normalizer = parseNormalizer(origin, json.normalizer, 'normalizer');
    this.preTokenizer = parsePreTokenizer(origin, json.pre_tokenizer, 'pre_tokenizer');
    this.postProcessor = parsePostProcessor(origin, json.post_processor, 'post_processor');
    this.decoder = parseDecoder(origin, json.decoder, 'decoder');
    this.tokenByteReader = tokenByteReader(json.decoder);

    let largestId = this.model.largestId;
    const raw: Array<{ token: AddedToken; content: string }> = [];
    const normalized: Array<{ token: AddedToken; content: string }> = [];
    for (const token of parseAddedTokens(origin, json.added_tokens)) {
      this.addedById.set(token.id, token);
      this.addedByContent.set(token.content, token);
      if (token.id > largestId) largestId = token.id;
      if (token.normalized && this.normalizer !== undefined) normalized.push({ token, content: this.normalizer(token.content) });
      else raw.push({ token, content: token.content });
    }
    this.rawMatcher = new AddedTokenMatcher(raw);
    this.normalizedMatcher = new AddedTokenMatcher(normalized);
    this.vocabSize = largestId + 1;
  }

  /**
   * Loads a tokenizer.json file, or the tokenizer.json in a directory. Throws ModelLoadError
   * (code 'ERR_TOKENIZER', `file` set) when it is missing, not JSON, or uses something unsupported.
   */
  static async load(path: string): Promise<Tokenizer> {
    let file = path;
    try {
      if ((await stat(path)).isDirectory()) file = join(path, 'tokenizer.json');
    } catch {
      // Missing: reported by the read below, which names the file.
    }
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (error) {
      const reason = (error as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (error as Error).message;
      throw new ModelLoadError('ERR_TOKENIZER', `cannot read the tokenizer ${file}: ${reason}`, { file, cause: error });
    }
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch (error) {
      throw new ModelLoadError('ERR_TOKENIZER', `${file} is not valid JSON: ${(error as Error).message}`, { file, cause: error });
    }
    return Tokenizer.fromJSON(json, file);
  }

  /**
   * A tokenizer from the parsed contents of a tokenizer.json; `source` (a file name) is named in
   * errors. Throws ModelLoadError with code 'ERR_TOKENIZER' for anything malformed or unsupported.
   */
  static fromJSON(json: unknown, source?: string): Tokenizer {
    const origin: Origin = { file: source, name: source ?? 'tokenizer.json' };
    if (!isObject(json)) throw loadError(origin, `a tokenizer.json must hold an object, got ${show(json)}`);
    return new Tokenizer(json, origin);
  }

  /**
   * The ids of `text`: added tokens found in it (longest first) become their ids, the text
   * between them is normalized, pre-tokenized and byte-pair encoded, and the post-processor's
   * template adds its special tokens unless `addSpecialTokens` is false.
   * Throws InvalidArgumentError (code 'ERR_TOKEN') when `text` is not a string.
   */
  encode(text: string, options: EncodeOptions = {}): number[] {
    if (typeof text !== 'string') throw new InvalidArgumentError(`encode takes a string, got ${describeArgument(text)}`, 'ERR_TOKEN');
    const ids: number[] = [];
    for (const segment of this.rawMatcher.split(text, 0)) {
      if (segment.id !== undefined) {
        ids.push(segment.id);
        continue;
      }
      const normalized = this.normalizer === undefined ? segment.text : this.normalizer(segment.text);
      for (const part of this.normalizedMatcher.split(normalized, segment.start)) {
        if (part.id !== undefined) ids.push(part.id);
        else this.encodePiece({ text: part.text, atStart: part.start === 0 }, ids);
      }
    }
    const addSpecialTokens = options.addSpecialTokens ?? true;
    return addSpecialTokens && this.postProcessor !== undefined ? this.postProcessor(ids) : ids;
  }

  private encodePiece(piece: Piece, ids: number[]): void {
    if (this.preTokenizer === undefined) {
      this.model.tokenize(piece.text, ids);
      return;
    }
    for (const part of this.preTokenizer(piece)) this.model.tokenize(part.text, ids);
  }

  /**
   * The text of `ids`, through the file's decoder (bytes split across tokens are joined before
   * UTF-8 decoding; invalid sequences become U+FFFD). Special added tokens are left out unless
   * `skipSpecialTokens` is false; ids inside the vocab's range that name no token are skipped.
   * Throws InvalidArgumentError (code 'ERR_TOKEN') naming the index of an id that is not an
   * integer in [0, vocabSize).
   */
  decode(ids: ArrayLike<number>, options: DecodeOptions = {}): string {
    if (typeof ids !== 'object' || ids === null || typeof ids.length !== 'number') {
      throw new InvalidArgumentError(`decode takes an array of token ids, got ${describeArgument(ids)}`, 'ERR_TOKEN');
    }
    const skipSpecialTokens = options.skipSpecialTokens ?? true;
    const tokens: string[] = [];
    for (let index = 0; index < ids.length; index++) {
      const id = ids[index];
      if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || id >= this.vocabSize) {
        throw new InvalidArgumentError(`decode: ids[${index}] is ${describeArgument(id)}, not a token id (an integer in [0, ${this.vocabSize}))`, 'ERR_TOKEN');
      }
      const added = this.addedById.get(id);
      if (added !== undefined) {
        if (!(skipSpecialTokens && added.special)) tokens.push(added.content);
        continue;
      }
      const token = this.model.tokens[id];
      if (token !== undefined) tokens.push(token);
    }
    // Hugging Face joins with spaces when a file has no decoder.
    return this.decoder === undefined ? tokens.join(' ') : this.decoder(tokens).join('');
  }

  /** The id of a token string (an added token, else one of the model vocab), or undefined. */
  tokenToId(token: string): number | undefined {
    return this.addedByContent.get(token)?.id ?? this.model.vocab.get(token);
  }

  /** The token string of an id (an added token, else one of the model vocab), or undefined. */
  idToToken(id: number): string | undefined {
    return this.addedById.get(id)?.content ?? this.model.tokens[id];
  }

  /**
   * The bytes token `id` adds to a text in its middle (partial UTF-8 included: byte-level
   * tokens may end inside a character), or undefined for special tokens and ids naming none.
   */
  tokenBytes(id: number): Uint8Array | undefined {
    const added = this.addedById.get(id);
    if (added !== undefined) return added.special ? undefined : this.tokenByteReader.read(added.content);
    const token = this.model.tokens[id];
    return token === undefined ? undefined : this.tokenByteReader.read(token);
  }

  /**
   * Whether decoding drops one space that begins the text (SentencePiece-style vocabularies,
   * whose words carry their space in front): a generation's first token may then begin with a
   * space the text will not have.
   */
  get stripsLeadingSpace(): boolean {
    return this.tokenByteReader.stripsLeadingSpace;
  }
}
