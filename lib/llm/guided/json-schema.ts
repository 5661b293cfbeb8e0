/**
 * A JSON schema as a regex whose texts are the JSON documents the schema accepts, for guided
 * decoding (vLLM's guided_json). Objects list their properties in the schema's order, optional
 * ones possibly left out; no other properties appear unless `additionalProperties` is a schema
 * and there are no `properties` (a map). Enforced: type (and lists of types), enum, const,
 * properties, required, additionalProperties (maps), items, prefixItems, minItems, maxItems,
 * minLength, maxLength, pattern, format (date, time, date-time, uuid, email), minimum, maximum
 * and their exclusive forms (integers: any; numbers: integer bounds), anyOf, oneOf, allOf of one,
 * $ref into $defs or definitions. Annotations are ignored; a keyword that would change which
 * documents are valid and cannot be enforced is a GrammarError naming it.
 *
 * A regex cannot nest without bound, so jsonSchemaToRegex cuts $ref recursion at `maxDepth`. A
 * guide takes jsonSchemaToGuide instead: a recursive reference becomes a rule of a grammar
 * (lib/llm/guided/grammar.ts), so trees, nested lists and threads of replies nest as deep as the
 * text goes; schemas without recursion stay one regex, as before.
 */
import { GrammarError } from '../../errors.js';
import type { Grammar, GrammarNode } from './grammar.js';
import { type RegexNode, escapeRegex, parseRegex } from './regex.js';

export interface JsonSchemaOptions {
  /**
   * The whitespace allowed between JSON tokens, as a regex (default `[ ]?`: compact JSON with at
   * most one space). Unbounded whitespace such as `[ \n]*` lets a model pad forever.
   */
  whitespace?: string;
  /**
   * How deeply free-form values (`{}`) may nest (default 3; they grow fourfold in size per
   * level), and in jsonSchemaToRegex $ref recursion too (a guide's recursion is unbounded).
   */
  maxDepth?: number;
}

type Schema = Record<string, unknown>;

const ANNOTATIONS = new Set(['title', 'description', 'default', 'examples', '$schema', '$id', '$comment', 'deprecated', 'readOnly', 'writeOnly', '$defs', 'definitions', 'discriminator', 'uniqueItems']);
const HANDLED = new Set(['type', 'enum', 'const', 'properties', 'required', 'additionalProperties', 'items', 'prefixItems', 'minItems', 'maxItems', 'minLength', 'maxLength', 'pattern', 'format', 'minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum', 'anyOf', 'oneOf', 'allOf', '$ref']);

const STRING_CHARACTER = '([^"\\\\\\x00-\\x1f]|\\\\["\\\\/bfnrt]|\\\\u[0-9a-fA-F]{4})';
const INTEGER = '-?(0|[1-9][0-9]*)';
const NUMBER = '-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?';
const DATE = '[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])';
const TIME = '([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?';
const FORMATS: Record<string, string> = {
  date: DATE,
  time: TIME,
  'date-time': `${DATE}T${TIME}`,
  uuid: '[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}',
  email: '[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\\.[A-Za-z0-9-]+)*\\.[A-Za-z]{2,}',
};

/** The regex of JSON documents `schema` accepts; throws GrammarError (with `schemaPath`) for what it cannot enforce. */
export function jsonSchemaToRegex(schema: unknown, options: JsonSchemaOptions = {}): string {
  return compileSchema(schema, options, false).regex;
}

/**
 * What a guide follows for `schema`: its regex, or where a $ref recurses, a grammar whose rules
 * are the recursive references (the regex then is its root rule's, placeholders standing for the
 * rules). Throws GrammarError (with `schemaPath`) for what it cannot enforce.
 */
export function jsonSchemaToGuide(schema: unknown, options: JsonSchemaOptions = {}): { regex: string; grammar?: Grammar } {
  return compileSchema(schema, options, true);
}

/** Placeholders for grammar rules in a rule's regex: code points of the supplementary private-use area, never in a schema's own text. */
const RULE_BASE = 0xf0000;

function compileSchema(schema: unknown, options: JsonSchemaOptions, recursionAsRules: boolean): { regex: string; grammar?: Grammar } {
  if (typeof schema === 'string') {
    try {
      schema = JSON.parse(schema);
    } catch (error) {
      throw new GrammarError(`a JSON schema given as text must be JSON: ${(error as Error).message}`, { schemaPath: '#' });
    }
  }
  const maxDepth = options.maxDepth ?? 3;
  if (!Number.isInteger(maxDepth) || maxDepth < 0) throw new GrammarError(`maxDepth must be a whole number, got ${String(maxDepth)}`);
  const whitespace = options.whitespace ?? '[ ]?';
  if (typeof whitespace !== 'string') throw new GrammarError('whitespace must be a regex in a string');
  const compiler = new SchemaCompiler(schema, `(${whitespace})`, maxDepth, recursionAsRules);
  const regex = compiler.compile(schema, '#', 0);
  if (regex === null) throw new GrammarError(`the schema accepts no document within maxDepth ${maxDepth}`, { schemaPath: '#' });
  const rules = compiler.rules;
  if (rules.length === 0) return { regex };
  if ([...JSON.stringify(schema)].some((character) => character.codePointAt(0)! >= RULE_BASE)) {
    throw new GrammarError('a recursive schema cannot hold characters of the supplementary private-use planes (U+F0000 on), which guided decoding uses internally', { schemaPath: '#' });
  }
  // Rule 0 is the document; rule k + 1 the k-th recursive reference.
  const bodies = [regex, ...rules.map((rule) => rule.regex)];
  const grammar: Grammar = {
    text: `JSON schema ${JSON.stringify(schema).slice(0, 200)}`,
    names: ['root', ...rules.map((rule) => rule.name)],
    rules: bodies.map((body) => withRules(parseRegex(body))),
    root: 0,
  };
  return { regex, grammar };
}

/** A regex tree with each rule placeholder character turned into a call of its rule. */
function withRules(node: RegexNode): GrammarNode {
  switch (node.kind) {
    case 'chars': {
      const [[low, high]] = node.set;
      return node.set.length === 1 && low === high && low >= RULE_BASE ? { kind: 'rule', rule: low - RULE_BASE + 1 } : node;
    }
    case 'concat':
      return { kind: 'concat', parts: node.parts.map(withRules) };
    case 'alternate':
      return { kind: 'alternate', options: node.options.map(withRules) };
    case 'repeat':
      return { kind: 'repeat', node: withRules(node.node), min: node.min, max: node.max };
  }
}

class SchemaCompiler {
  readonly #root: unknown;
  readonly #ws: string;
  readonly #maxDepth: number;
  readonly #recursionAsRules: boolean;
  /** Recursive references made rules: each one's regex (placeholders for rules), by rule number. */
  readonly rules: Array<{ name: string; regex: string }> = [];
  /** References being compiled (active) or made rules. */
  readonly #references = new Map<string, { active: boolean; rule?: number }>();

  constructor(root: unknown, whitespace: string, maxDepth: number, recursionAsRules: boolean) {
    this.#root = root;
    this.#ws = whitespace;
    this.#maxDepth = maxDepth;
    this.#recursionAsRules = recursionAsRules;
  }

  /**
   * A $ref as a grammar: inlined where it does not recur; a reference met again while its own
   * body is being compiled becomes a rule, and every use of it a call of that rule.
   */
  #reference(reference: string, target: unknown, path: string, depth: number): string | null {
    const known = this.#references.get(reference);
    if (known?.rule !== undefined && !known.active) return String.fromCodePoint(RULE_BASE + known.rule);
    if (known?.active) {
      if (known.rule === undefined) {
        known.rule = this.rules.length;
        this.rules.push({ name: reference, regex: '' });
      }
      return String.fromCodePoint(RULE_BASE + known.rule);
    }
    const state: { active: boolean; rule?: number } = { active: true };
    this.#references.set(reference, state);
    let body: string | null;
    try {
      body = this.compile(target, path, depth);
    } finally {
      state.active = false;
    }
    if (state.rule === undefined) {
      this.#references.delete(reference);
      return body;
    }
    if (body === null) throw new GrammarError(`${path}: ${reference} accepts no document`, { schemaPath: path });
    this.rules[state.rule].regex = body;
    return String.fromCodePoint(RULE_BASE + state.rule);
  }

  /** The regex of `schema`'s documents, or null where none fits within the depth (recursion cut off). */
  compile(schema: unknown, path: string, depth: number): string | null {
    if (schema === true) return this.#anyValue(depth);
    if (schema === false) return null;
    if (typeof schema !== 'object' || schema === null || Array.isArray(schema)) throw new GrammarError(`${path}: a schema must be an object or a boolean, got ${JSON.stringify(schema)}`, { schemaPath: path });
    const node = schema as Schema;
    for (const key of Object.keys(node)) {
      if (!HANDLED.has(key) && !ANNOTATIONS.has(key)) throw new GrammarError(`${path}: the keyword '${key}' cannot be enforced by guided decoding`, { schemaPath: `${path}/${key}` });
    }
    if (node.$ref !== undefined) {
      const target = this.#resolve(node.$ref, `${path}/$ref`);
      if (this.#recursionAsRules) return this.#reference(node.$ref as string, target, `${path}/$ref`, depth);
      if (depth >= this.#maxDepth) return null;
      return this.compile(target, `${path}/$ref`, depth + 1);
    }
    if (node.const !== undefined) return escapeRegex(JSON.stringify(node.const));
    if (node.enum !== undefined) {
      if (!Array.isArray(node.enum) || node.enum.length === 0) throw new GrammarError(`${path}/enum must be a non-empty list`, { schemaPath: `${path}/enum` });
      return `(${node.enum.map((value) => escapeRegex(JSON.stringify(value))).join('|')})`;
    }
    for (const keyword of ['anyOf', 'oneOf'] as const) {
      if (node[keyword] === undefined) continue;
      const options = this.#list(node[keyword], `${path}/${keyword}`).map((option, index) => this.compile(this.#merged(node, keyword, option), `${path}/${keyword}/${index}`, depth));
      const kept = options.filter((option): option is string => option !== null);
      return kept.length === 0 ? null : `(${kept.join('|')})`;
    }
    if (node.allOf !== undefined) {
      const parts = this.#list(node.allOf, `${path}/allOf`);
      if (parts.length !== 1) throw new GrammarError(`${path}/allOf: only an allOf of one schema can be enforced`, { schemaPath: `${path}/allOf` });
      return this.compile(this.#merged(node, 'allOf', parts[0]), `${path}/allOf/0`, depth);
    }
    let type = node.type;
    if (Array.isArray(type)) {
      const options = type.map((one) => this.compile({ ...node, type: one }, path, depth)).filter((option): option is string => option !== null);
      return options.length === 0 ? null : `(${options.join('|')})`;
    }
    if (type === undefined) {
      if (node.properties !== undefined || node.additionalProperties !== undefined || node.required !== undefined) type = 'object';
      else if (node.items !== undefined || node.prefixItems !== undefined) type = 'array';
      else if (node.minLength !== undefined || node.maxLength !== undefined || node.pattern !== undefined || node.format !== undefined) type = 'string';
      else if (node.minimum !== undefined || node.maximum !== undefined || node.exclusiveMinimum !== undefined || node.exclusiveMaximum !== undefined) type = 'number';
      else return this.#anyValue(depth);
    }
    switch (type) {
      case 'string':
        return this.#string(node, path);
      case 'integer':
        return this.#integer(node, path);
      case 'number':
        return this.#number(node, path);
      case 'boolean':
        return '(true|false)';
      case 'null':
        return 'null';
      case 'array':
        return this.#array(node, path, depth);
      case 'object':
        return this.#object(node, path, depth);
      default:
        throw new GrammarError(`${path}/type: unknown type ${JSON.stringify(type)}`, { schemaPath: `${path}/type` });
    }
  }

  /** A subschema of anyOf/oneOf/allOf with its parent's other keywords, as JSON schema applies both. */
  #merged(parent: Schema, keyword: string, option: unknown): unknown {
    const rest = Object.fromEntries(Object.entries(parent).filter(([key]) => key !== keyword && !ANNOTATIONS.has(key)));
    if (Object.keys(rest).length === 0 || typeof option !== 'object' || option === null) return option;
    return { ...rest, ...(option as Schema) };
  }

  #list(value: unknown, path: string): unknown[] {
    if (!Array.isArray(value) || value.length === 0) throw new GrammarError(`${path} must be a non-empty list of schemas`, { schemaPath: path });
    return value;
  }

  #resolve(reference: unknown, path: string): unknown {
    if (typeof reference !== 'string' || !reference.startsWith('#')) throw new GrammarError(`${path}: only references inside the schema ('#/$defs/Name') are supported, got ${JSON.stringify(reference)}`, { schemaPath: path });
    let target: unknown = this.#root;
    for (const part of reference.slice(1).split('/').filter((segment) => segment !== '')) {
      const key = decodeURIComponent(part).replaceAll('~1', '/').replaceAll('~0', '~');
      target = typeof target === 'object' && target !== null ? (target as Schema)[key] : undefined;
      if (target === undefined) throw new GrammarError(`${path}: the reference ${reference} names nothing in the schema`, { schemaPath: path });
    }
    return target;
  }

  #string(node: Schema, path: string): string {
    if (node.pattern !== undefined) {
      if (typeof node.pattern !== 'string') throw new GrammarError(`${path}/pattern must be a string`, { schemaPath: `${path}/pattern` });
      if (node.format !== undefined || node.minLength !== undefined || node.maxLength !== undefined) throw new GrammarError(`${path}: pattern cannot be combined with format, minLength or maxLength`, { schemaPath: path });
      // Schema patterns search; a guide needs the whole string, so unanchored patterns match it whole.
      return `"(${node.pattern.replace(/^\^/, '').replace(/(?<!\\)\$$/, '')})"`;
    }
    if (node.format !== undefined) {
      const format = FORMATS[node.format as string];
      if (format === undefined) throw new GrammarError(`${path}/format: the format ${JSON.stringify(node.format)} is not supported (${Object.keys(FORMATS).join(', ')})`, { schemaPath: `${path}/format` });
      return `"${format}"`;
    }
    const min = this.#count(node.minLength, `${path}/minLength`) ?? 0;
    const max = this.#count(node.maxLength, `${path}/maxLength`);
    if (max !== undefined && max < min) throw new GrammarError(`${path}: maxLength is below minLength`, { schemaPath: path });
    if (min === 0 && max === undefined) return `"${STRING_CHARACTER}*"`;
    return `"${STRING_CHARACTER}{${min},${max ?? ''}}"`;
  }

  #count(value: unknown, path: string): number | undefined {
    if (value === undefined) return undefined;
    if (!Number.isInteger(value) || (value as number) < 0) throw new GrammarError(`${path} must be a whole number, got ${JSON.stringify(value)}`, { schemaPath: path });
    return value as number;
  }

  /** The bounds of a number schema, each with whether it is included. */
  #bounds(node: Schema, path: string): { low?: number; lowIncluded: boolean; high?: number; highIncluded: boolean } {
    const read = (key: string): number | undefined => {
      const value = node[key];
      if (value === undefined || typeof value === 'boolean') return undefined;
      if (typeof value !== 'number' || !Number.isFinite(value)) throw new GrammarError(`${path}/${key} must be a number, got ${JSON.stringify(value)}`, { schemaPath: `${path}/${key}` });
      return value;
    };
    const minimum = read('minimum');
    const maximum = read('maximum');
    // Draft 4 wrote exclusiveMinimum: true beside minimum; later drafts give the bound itself.
    let exclusiveMinimum = read('exclusiveMinimum');
    let exclusiveMaximum = read('exclusiveMaximum');
    if (node.exclusiveMinimum === true) exclusiveMinimum = minimum;
    if (node.exclusiveMaximum === true) exclusiveMaximum = maximum;
    let low = minimum;
    let lowIncluded = true;
    if (exclusiveMinimum !== undefined && (low === undefined || exclusiveMinimum >= low)) {
      low = exclusiveMinimum;
      lowIncluded = false;
    }
    let high = maximum;
    let highIncluded = true;
    if (exclusiveMaximum !== undefined && (high === undefined || exclusiveMaximum <= high)) {
      high = exclusiveMaximum;
      highIncluded = false;
    }
    return { low, lowIncluded, high, highIncluded };
  }

  #integer(node: Schema, path: string): string {
    const { low, lowIncluded, high, highIncluded } = this.#bounds(node, path);
    if (low === undefined && high === undefined) return INTEGER;
    const from = low === undefined ? -Infinity : lowIncluded ? Math.ceil(low) : Math.floor(low) + 1;
    const to = high === undefined ? Infinity : highIncluded ? Math.floor(high) : Math.ceil(high) - 1;
    if (from > to) throw new GrammarError(`${path}: no integer lies between the bounds`, { schemaPath: path });
    if (Math.abs(from) > Number.MAX_SAFE_INTEGER && from !== -Infinity) throw new GrammarError(`${path}: bounds beyond 2^53 are not supported`, { schemaPath: path });
    return `(${integerRange(from, to)})`;
  }

  #number(node: Schema, path: string): string {
    const { low, lowIncluded, high, highIncluded } = this.#bounds(node, path);
    if (low === undefined && high === undefined) return NUMBER;
    if ((low !== undefined && !Number.isInteger(low)) || (high !== undefined && !Number.isInteger(high))) {
      throw new GrammarError(`${path}: a number's bounds can be enforced when they are whole numbers (minimum 0, maximum 1), got ${low ?? ''}..${high ?? ''}`, { schemaPath: path });
    }
    if (low !== undefined && high !== undefined && (low > high || (low === high && !(lowIncluded && highIncluded)))) throw new GrammarError(`${path}: no number lies between the bounds`, { schemaPath: path });
    const parts: string[] = [];
    const from = low ?? -Infinity;
    const to = high ?? Infinity;
    // Below zero: a minus sign and the magnitude's range, mirrored.
    if (from < 0) {
      const top = Math.min(-from, Infinity);
      const bottom = to < 0 ? -to : 0;
      parts.push(`-(${magnitudeRange(bottom, to < 0 ? highIncluded : false, top, lowIncluded)})`);
    }
    if (to >= 0) parts.push(magnitudeRange(Math.max(from, 0), from >= 0 ? lowIncluded : true, to, highIncluded));
    return `(${parts.join('|')})`;
  }

  #array(node: Schema, path: string, depth: number): string | null {
    const ws = this.#ws;
    const min = this.#count(node.minItems, `${path}/minItems`) ?? 0;
    const max = this.#count(node.maxItems, `${path}/maxItems`);
    if (max !== undefined && max < min) throw new GrammarError(`${path}: maxItems is below minItems`, { schemaPath: path });
    const prefix = node.prefixItems === undefined ? [] : this.#list(node.prefixItems, `${path}/prefixItems`).map((item, index) => this.compile(item, `${path}/prefixItems/${index}`, depth));
    const rest = node.items === undefined ? this.#anyValue(depth) : this.compile(node.items, `${path}/items`, depth);
    const separator = `${ws},${ws}`;
    // A document holds the first k items for some k within the bounds; the fixed (prefix) items
    // come first, then any number of the repeated ones.
    const alternatives: string[] = [];
    const upTo = Math.min(prefix.length, max ?? Infinity);
    for (let k = min; k <= upTo; k++) {
      const fixed = prefix.slice(0, k);
      if (fixed.some((item) => item === null)) break;
      alternatives.push(fixed.join(separator));
    }
    const limit = max ?? Infinity;
    if (rest !== null && limit > prefix.length && prefix.every((item) => item !== null)) {
      const fewest = Math.max(min, prefix.length + 1) - prefix.length;
      const most = limit - prefix.length;
      const bounds = (low: number, high: number): string => (high === Infinity ? `{${low},}` : `{${low},${high}}`);
      alternatives.push(
        prefix.length === 0
          ? `${rest}(${separator}${rest})${bounds(fewest - 1, most - 1)}`
          : `${prefix.join(separator)}(${separator}${rest})${bounds(fewest, most)}`,
      );
    }
    if (alternatives.length === 0) return null;
    return `\\[${ws}(${alternatives.join('|')})${ws}\\]`;
  }

  #object(node: Schema, path: string, depth: number): string | null {
    const ws = this.#ws;
    const properties = node.properties;
    if (properties !== undefined && (typeof properties !== 'object' || properties === null || Array.isArray(properties))) throw new GrammarError(`${path}/properties must be an object`, { schemaPath: `${path}/properties` });
    const required = node.required === undefined ? [] : node.required;
    if (!Array.isArray(required) || required.some((name) => typeof name !== 'string')) throw new GrammarError(`${path}/required must be a list of property names`, { schemaPath: `${path}/required` });
    const names = Object.keys((properties as Schema | undefined) ?? {});
    for (const name of required as string[]) {
      if (!names.includes(name)) throw new GrammarError(`${path}/required names '${name}', which is not among its properties (${names.join(', ') || 'none'})`, { schemaPath: `${path}/required` });
    }
    const member = (name: string, value: string): string => `${escapeRegex(JSON.stringify(name))}${ws}:${ws}${value}`;
    if (names.length === 0) {
      // No named properties: a map whose values follow additionalProperties (any value when absent or true).
      const additional = node.additionalProperties;
      if (additional === false) return `\\{${ws}\\}`;
      const value = additional === undefined || additional === true ? this.#anyValue(depth) : this.compile(additional, `${path}/additionalProperties`, depth);
      if (value === null) return `\\{${ws}\\}`;
      const entry = `"${STRING_CHARACTER}*"${ws}:${ws}${value}`;
      return `\\{${ws}(${entry}(${ws},${ws}${entry})*)?${ws}\\}`;
    }
    const members = names.map((name) => ({ name, required: (required as string[]).includes(name), value: this.compile((properties as Schema)[name], `${path}/properties/${name}`, depth) }));
    for (const entry of members) {
      if (entry.required && entry.value === null) return null;
    }
    const present = members.filter((entry) => entry.value !== null);
    // Properties appear in order; optional ones may be left out. Each alternative starts at the
    // first property present (every one before it optional), so commas fall only between members.
    const alternatives: string[] = [];
    for (let first = 0; first < present.length; first++) {
      let text = member(present[first].name, present[first].value!);
      for (const later of present.slice(first + 1)) {
        const piece = `${ws},${ws}${member(later.name, later.value!)}`;
        text += later.required ? piece : `(${piece})?`;
      }
      alternatives.push(text);
      if (present[first].required) break;
    }
    const allOptional = present.every((entry) => !entry.required);
    const body = alternatives.length === 0 ? '' : `(${alternatives.join('|')})${allOptional ? '?' : ''}`;
    return `\\{${ws}${body}${ws}\\}`;
  }

  /** Any JSON value, nesting arrays and objects at most to the depth left. */
  #anyValue(depth: number): string {
    const scalar = `"${STRING_CHARACTER}*"|${NUMBER}|true|false|null`;
    if (depth >= this.#maxDepth) return `(${scalar})`;
    const inner = this.#anyValue(depth + 1);
    const ws = this.#ws;
    const array = `\\[${ws}(${inner}(${ws},${ws}${inner})*)?${ws}\\]`;
    const entry = `"${STRING_CHARACTER}*"${ws}:${ws}${inner}`;
    const object = `\\{${ws}(${entry}(${ws},${ws}${entry})*)?${ws}\\}`;
    return `(${scalar}|${array}|${object})`;
  }
}

// ---------------------------------------------------------------------------------------------
// Number ranges as regexes

/** Decimal integers in [from, to] (either end may be infinite), without leading zeros. */
export function integerRange(from: number, to: number): string {
  const parts: string[] = [];
  if (from < 0) {
    // Negative numbers: a minus sign and the magnitude's range (-0 is left out).
    const magnitudeLow = to < 0 ? -to : 1;
    parts.push(`-(${naturalRange(magnitudeLow, -from)})`);
  }
  if (to >= 0) parts.push(naturalRange(Math.max(from, 0), to));
  return parts.join('|');
}

/** Natural numbers in [from, to] (to may be Infinity), written without leading zeros. */
function naturalRange(from: number, to: number): string {
  const parts: string[] = [];
  const fromDigits = String(from).length;
  const toDigits = to === Infinity ? Infinity : String(to).length;
  for (let digits = fromDigits; digits <= Math.min(toDigits, 17); digits++) {
    const low = Math.max(from, digits === 1 ? 0 : 10 ** (digits - 1));
    const high = Math.min(to, 10 ** digits - 1);
    if (to === Infinity && digits === fromDigits + 1 && low === 10 ** (digits - 1)) {
      // Every number with this many digits or more.
      parts.push(`[1-9][0-9]{${digits - 1},}`);
      break;
    }
    if (low <= high) parts.push(sameLengthRange(String(low), String(high)));
  }
  return parts.join('|');
}

/** Numbers written with as many digits as `low` and `high`, between them. */
function sameLengthRange(low: string, high: string): string {
  if (low.length === 1) return low === high ? low : `[${low}-${high}]`;
  if (low[0] === high[0]) return `${low[0]}(${sameLengthRange(low.slice(1), high.slice(1))})`;
  const rest = low.length - 1;
  const parts: string[] = [];
  const lowFull = /^0+$/.test(low.slice(1));
  const highFull = /^9+$/.test(high.slice(1));
  const firstWhole = lowFull ? Number(low[0]) : Number(low[0]) + 1;
  const lastWhole = highFull ? Number(high[0]) : Number(high[0]) - 1;
  if (!lowFull) parts.push(`${low[0]}(${sameLengthRange(low.slice(1), '9'.repeat(rest))})`);
  if (firstWhole <= lastWhole) parts.push(`${firstWhole === lastWhole ? firstWhole : `[${firstWhole}-${lastWhole}]`}[0-9]{${rest}}`);
  if (!highFull) parts.push(`${high[0]}(${sameLengthRange('0'.repeat(rest), high.slice(1))})`);
  return parts.join('|');
}

/**
 * Decimal numbers m without a sign and without an exponent, with `low` <= m <= `high` (whole
 * numbers; `high` may be Infinity), each end included or not.
 */
function magnitudeRange(low: number, lowIncluded: boolean, high: number, highIncluded: boolean): string {
  const fraction = '(\\.[0-9]+)?';
  const parts: string[] = [];
  if (low === high) return `${low}(\\.0+)?`;
  // Whole part strictly between the ends: any fraction.
  if (high === Infinity || low + 1 <= high - 1) parts.push(`(${naturalRange(low + 1, high === Infinity ? Infinity : high - 1)})${fraction}`);
  // Whole part at the low end: that number (if included) and anything just above it.
  parts.push(lowIncluded ? `${low}${fraction}` : `${low}\\.[0-9]*[1-9][0-9]*`);
  // At the high end: only the number itself, with zeros for a fraction.
  if (high !== Infinity && highIncluded) parts.push(`${high}(\\.0+)?`);
  return parts.join('|');
}
