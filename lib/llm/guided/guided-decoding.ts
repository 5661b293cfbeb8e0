/**
 * What a caller asks guided decoding for (vLLM's GuidedDecodingParams): a JSON schema, any JSON
 * object, a regex or a list of choices, turned into the one regex a guide compiles.
 */
import { GrammarError } from '../../errors.js';
import { ByteAutomaton } from './automaton.js';
import { jsonSchemaToRegex } from './json-schema.js';
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
  /** For JSON: the whitespace allowed between tokens, as a regex (default `[ ]?`). */
  whitespace?: string;
  /** For JSON: how deeply recursive references and free-form values nest (default 3; free-form values grow fourfold in size per level). */
  maxDepth?: number;
}

const KEYS = new Set(['json', 'jsonObject', 'regex', 'choice', 'whitespace', 'maxDepth']);

/** The regex of the texts `spec` allows; throws GrammarError naming what is wrong (`where` leads the message). */
export function guidedRegex(spec: GuidedDecoding, where = 'guidedDecoding'): string {
  if (typeof spec !== 'object' || spec === null || Array.isArray(spec)) throw new GrammarError(`${where} must be an object such as { json: schema } or { regex: '...' }`);
  for (const key of Object.keys(spec)) if (!KEYS.has(key)) throw new GrammarError(`${where}: unknown option '${key}' (${[...KEYS].join(', ')})`);
  const kinds = (['json', 'jsonObject', 'regex', 'choice'] as const).filter((kind) => spec[kind] !== undefined && spec[kind] !== false);
  if (kinds.length !== 1) throw new GrammarError(`${where} needs exactly one of json, jsonObject, regex or choice, got ${kinds.length === 0 ? 'none' : kinds.join(' and ')}`);
  const options = { ...(spec.whitespace !== undefined ? { whitespace: spec.whitespace } : {}), ...(spec.maxDepth !== undefined ? { maxDepth: spec.maxDepth } : {}) };
  try {
    switch (kinds[0]) {
      case 'json':
        return jsonSchemaToRegex(spec.json, options);
      case 'jsonObject':
        if (spec.jsonObject !== true) throw new GrammarError('jsonObject must be true');
        return jsonSchemaToRegex({ type: 'object' }, options);
      case 'regex':
        if (typeof spec.regex !== 'string') throw new GrammarError(`regex must be a string, got ${typeof spec.regex}`);
        return spec.regex;
      case 'choice': {
        const choice = spec.choice;
        if (!Array.isArray(choice) || choice.length === 0 || choice.some((text) => typeof text !== 'string' || text.length === 0)) throw new GrammarError('choice must be a non-empty list of non-empty strings');
        return choice.map(escapeRegex).join('|');
      }
    }
  } catch (error) {
    if (error instanceof GrammarError) throw new GrammarError(`${where}: ${error.message}`, { position: error.position, schemaPath: error.schemaPath });
    throw error;
  }
}

/**
 * The automaton of the texts `spec` allows (its regex parsed and compiled): checks a spec whole
 * before any model is loaded, and builds a guide's. Errors are GrammarErrors led by `where`.
 */
export function checkGuidedDecoding(spec: GuidedDecoding, where = 'guidedDecoding', options: { leadingSpace?: boolean } = {}): ByteAutomaton {
  const regex = guidedRegex(spec, where);
  try {
    return ByteAutomaton.fromRegex(regex, options);
  } catch (error) {
    if (error instanceof GrammarError) throw new GrammarError(`${where}: ${error.message}`, { position: error.position, schemaPath: error.schemaPath });
    throw error;
  }
}
