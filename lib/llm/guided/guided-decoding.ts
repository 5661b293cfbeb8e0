/**
 * What a caller asks guided decoding for (vLLM's GuidedDecodingParams): a JSON schema, any JSON
 * object, a regex or a list of choices, turned into the one regex a guide compiles; or a
 * context-free grammar (or a schema whose references recur), compiled into a grammar's automaton.
 */
import { GrammarError } from '../../errors.js';
import { ByteAutomaton, type GuideAutomaton } from './automaton.js';
import { GrammarAutomaton } from './grammar-automaton.js';
import { type JsonSchemaOptions, jsonSchemaToGuide, jsonSchemaToRegex } from './json-schema.js';
import { escapeRegex } from './regex.js';

export interface GuidedDecoding {
  /** The text is a JSON document this schema accepts (an object, or its JSON text). */
  json?: unknown;
  /** The text is a JSON object, any (nested to `maxDepth`). */
  jsonObject?: boolean;
  /** The text matches this regex whole. */
  regex?: string;
  /** The text is one of these, however the model spells it in tokens. */
  choice?: string[];
  /** The text is one this GBNF grammar's `root` rule derives (see lib/llm/guided/grammar.ts). */
  grammar?: string;
  /** For JSON: the whitespace allowed between tokens, as a regex (default `[ ]?`). */
  whitespace?: string;
  /** For JSON: how deeply free-form values nest (default 3; they grow fourfold in size per level). Recursive references nest without bound. */
  maxDepth?: number;
}

const KEYS = new Set(['json', 'jsonObject', 'regex', 'choice', 'grammar', 'whitespace', 'maxDepth']);

/** Which one thing `spec` asks for; throws GrammarError naming what is wrong. */
function kindOf(spec: GuidedDecoding, where: string): 'json' | 'jsonObject' | 'regex' | 'choice' | 'grammar' {
  if (typeof spec !== 'object' || spec === null || Array.isArray(spec)) throw new GrammarError(`${where} must be an object such as { json: schema } or { regex: '...' }`);
  for (const key of Object.keys(spec)) if (!KEYS.has(key)) throw new GrammarError(`${where}: unknown option '${key}' (${[...KEYS].join(', ')})`);
  const kinds = (['json', 'jsonObject', 'regex', 'choice', 'grammar'] as const).filter((kind) => spec[kind] !== undefined && spec[kind] !== false);
  if (kinds.length !== 1) throw new GrammarError(`${where} needs exactly one of json, jsonObject, regex, choice or grammar, got ${kinds.length === 0 ? 'none' : kinds.join(' and ')}`);
  return kinds[0];
}

/** The whitespace and depth options a JSON schema's compilation takes from `spec`. */
function jsonOptions(spec: GuidedDecoding): JsonSchemaOptions {
  return { ...(spec.whitespace !== undefined ? { whitespace: spec.whitespace } : {}), ...(spec.maxDepth !== undefined ? { maxDepth: spec.maxDepth } : {}) };
}

/** The regex of the texts `spec` allows, for the kinds that are one regex. */
function regexOf(spec: GuidedDecoding, kind: 'jsonObject' | 'regex' | 'choice'): string {
  switch (kind) {
    case 'jsonObject':
      if (spec.jsonObject !== true) throw new GrammarError('jsonObject must be true');
      return jsonSchemaToRegex({ type: 'object' }, jsonOptions(spec));
    case 'regex':
      if (typeof spec.regex !== 'string') throw new GrammarError(`regex must be a string, got ${typeof spec.regex}`);
      return spec.regex;
    case 'choice': {
      const choice = spec.choice;
      if (!Array.isArray(choice) || choice.length === 0 || choice.some((text) => typeof text !== 'string' || text.length === 0)) throw new GrammarError('choice must be a non-empty list of non-empty strings');
      return choice.map(escapeRegex).join('|');
    }
  }
}

/**
 * The automaton of the texts `spec` allows (its regex or grammar parsed and compiled): checks a
 * spec whole before any model is loaded, and builds a guide's. Errors are GrammarErrors led by
 * `where`.
 */
export function checkGuidedDecoding(spec: GuidedDecoding, where = 'guidedDecoding', options: { leadingSpace?: boolean } = {}): GuideAutomaton {
  const kind = kindOf(spec, where);
  try {
    switch (kind) {
      case 'grammar':
        if (typeof spec.grammar !== 'string') throw new GrammarError(`grammar must be a string of GBNF rules, got ${typeof spec.grammar}`);
        return GrammarAutomaton.fromGrammar(spec.grammar, options);
      case 'json': {
        // A schema whose references recur is a grammar (its rules nest without bound); any other is a regex.
        const { regex, grammar } = jsonSchemaToGuide(spec.json, jsonOptions(spec));
        return grammar ? GrammarAutomaton.fromRules(grammar, options) : ByteAutomaton.fromRegex(regex, options);
      }
      default:
        return ByteAutomaton.fromRegex(regexOf(spec, kind), options);
    }
  } catch (error) {
    if (error instanceof GrammarError) throw new GrammarError(`${where}: ${error.message}`, { position: error.position, schemaPath: error.schemaPath });
    throw error;
  }
}
