import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildLLMProcessor, fromItems, GrammarError, init, jsonSchemaToRegex, ModelReplica, shutdown, TokenGuide, TokenMask, Tokenizer } from '../../lib/index.js';
import { ByteAutomaton, DEAD } from '../../lib/llm/guided/automaton.js';
import { GrammarAutomaton } from '../../lib/llm/guided/grammar-automaton.js';
import { checkGuidedDecoding } from '../../lib/llm/guided/guided-decoding.js';
import { integerRange } from '../../lib/llm/guided/json-schema.js';
import { gpt2StyleTokenizerJson, llama2StyleTokenizerJson } from './fixtures/tokenizers.js';
import { randomWeights, referenceLogits, TINY, writeCheckpoint } from './fixtures/decoders.js';

/** A seeded generator of floats in [0, 1), so every run draws the same texts. */
function seeded(seed: number): () => number {
  let state = seed;
  return () => {
    state = (state + 0x6d2b79f5) | 0;
    let t = Math.imul(state ^ (state >>> 15), 1 | state);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

function refusal(run: () => unknown): GrammarError {
  try {
    run();
  } catch (error) {
    expect(error).toBeInstanceOf(GrammarError);
    expect((error as GrammarError).code).toBe('ERR_GRAMMAR');
    return error as GrammarError;
  }
  throw new Error('not refused');
}

describe('guided decoding: regexes as byte automata', () => {
  it("matches whole texts as JavaScript's RegExp does", () => {
    const patterns = ['a*b', '(ab|cd)+e?', '[a-c]{2,3}x', '[^ab]*', 'é+|ü', '\\d{3}-\\d{2}', '(a|b)*abb', '.{0,2}', '[\\s\\S]{2}', 'x(?:yz)*?', '\\u00e9\\u{1F600}?', '[^\\x00-\\x7f]+', 'a{2}b{0,2}', '\\w+@\\w+\\.com', '(?<n>a|)b', '^[]a]+$', 'a{,2}', '[-a]|\\.'];
    const alphabet = ['a', 'b', 'c', 'd', 'e', 'x', 'y', 'z', '1', '-', 'é', 'ü', '😀', ' ', '\n', '.', '@', 'com', '中', ']', '{', '}', ','];
    const random = seeded(7);
    for (const pattern of patterns) {
      const automaton = ByteAutomaton.fromRegex(pattern);
      // Python's ']' first in a class and '{,n}' are JavaScript's '\]' and '{0,n}'.
      const reference = new RegExp(`^(?:${pattern.replace('a{,2}', 'a{0,2}').replace('^[]a]', '^[\\]a]')})$`, 'u');
      for (let text = 0; text < 1500; text++) {
        const length = Math.floor(random() * 6);
        let sample = '';
        for (let index = 0; index < length; index++) sample += alphabet[Math.floor(random() * alphabet.length)];
        if (automaton.matches(sample) !== reference.test(sample)) throw new Error(`${pattern} on ${JSON.stringify(sample)}: ${automaton.matches(sample)}`);
      }
    }
  });

  it('reads every code point through its UTF-8 bytes, at the encoding boundaries too', () => {
    const boundaries = [0, 0x7f, 0x80, 0x7ff, 0x800, 0xd7ff, 0xe000, 0xfffd, 0xffff, 0x10000, 0x10ffff, 0x1f600, 0x3040, 0x22];
    const random = seeded(3);
    const points = [...boundaries, ...Array.from({ length: 400 }, () => Math.floor(random() * 0x110000))].filter((code) => code < 0xd800 || code > 0xdfff);
    for (const [low, high] of [[0x80, 0x7ff], [0x7ff, 0x800], [0x10, 0x10fff0], [0xfff, 0x10001], [0xd000, 0xe100], [0x1f600, 0x1f64f]]) {
      const hex = (code: number) => `\\u{${code.toString(16)}}`;
      for (const negated of [false, true]) {
        const pattern = `[${negated ? '^' : ''}${hex(low)}-${hex(high)}]`;
        const automaton = ByteAutomaton.fromRegex(pattern);
        const reference = new RegExp(`^${pattern}$`, 'u');
        for (const code of points) expect(automaton.matches(String.fromCodePoint(code)), `${pattern} on U+${code.toString(16)}`).toBe(reference.test(String.fromCodePoint(code)));
      }
    }
    // A byte that starts a character but does not finish it leaves the state alive, not accepting.
    const automaton = ByteAutomaton.fromRegex('é');
    const half = automaton.step(automaton.start, 0xc3);
    expect(half).not.toBe(DEAD);
    expect(automaton.accepting(half)).toBe(false);
    expect(automaton.accepting(automaton.step(half, 0xa9))).toBe(true);
    expect(automaton.step(half, 0x41)).toBe(DEAD);
  });

  it('refuses what it cannot guide with a GrammarError naming the position', () => {
    const cases: Array<[string, RegExp, number]> = [
      ['ab(?=c)', /lookaround is not supported/, 2],
      ['(a)\\1', /backreferences are not supported/, 3],
      ['a**', /a quantifier cannot follow another/, 1],
      ['(ab', /the group opened at 0 is not closed/, 3],
      ['ab)', /unmatched '\)'/, 2],
      ['[z-a]', /the range runs backwards/, 2],
      ['\\p{L}+', /Unicode property classes/, 0],
      ['a^b', /'\^' is only supported at the start/, 1],
      ['*a', /nothing to repeat/, 0],
      ['\\bword', /the anchor \\b is not supported/, 0],
      ['a{5,2}', /minimum above its maximum/, 1],
      ['a{2000}', /repetition counts above 1000/, 1],
      ['[abc', /the class opened at 0 is not closed/, 4],
      ['(?i)abc', /not supported \(flags/, 0],
      ['a++', /possessive quantifiers/, 2],
      ['\\q', /unknown escape \\q/, 0],
    ];
    for (const [pattern, message, position] of cases) {
      const error = refusal(() => ByteAutomaton.fromRegex(pattern));
      expect(error.message, pattern).toMatch(message);
      expect(error.position, pattern).toBe(position);
    }
    expect(refusal(() => ByteAutomaton.fromRegex('[^\\s\\S]')).message).toMatch(/matches no text/);
  });
});

describe('guided decoding: JSON schemas as regexes', () => {
  const accepts = (schema: unknown, documents: string[], rejected: string[], options = {}) => {
    const automaton = ByteAutomaton.fromRegex(jsonSchemaToRegex(schema, options));
    for (const document of documents) expect(automaton.matches(document), `accepts ${document}`).toBe(true);
    for (const document of rejected) expect(automaton.matches(document), `rejects ${document}`).toBe(false);
  };

  it('accepts the documents a schema does, properties in order, optional ones left out', () => {
    const person = {
      type: 'object',
      properties: {
        name: { type: 'string', minLength: 1, maxLength: 8 },
        age: { type: 'integer', minimum: 0, maximum: 120 },
        score: { type: 'number', minimum: 0, maximum: 1 },
        tags: { type: 'array', items: { enum: ['a', 'b', 'c'] }, maxItems: 3 },
        kind: { anyOf: [{ type: 'null' }, { type: 'boolean' }] },
        when: { type: 'string', format: 'date' },
      },
      required: ['name', 'age'],
    };
    accepts(
      person,
      ['{"name":"bob","age":30}', '{ "name" : "b\\"o\\u00e9", "age": 120 }', '{"name":"bob","age":7,"score":0.5,"tags":["a","c"],"kind":null,"when":"2024-01-31"}', '{"name":"bob","age":0,"score":1.000,"tags":[]}', '{"name":"日本","age":1,"kind":false}'],
      ['{"name":"bob","age":121}', '{"age":3,"name":"x"}', '{"name":"","age":3}', '{"name":"bob","age":30,"score":1.5}', '{"name":"bob","age":30,"tags":["a","a","a","a"]}', '{"name":"bob"}', '{"name":"bob","age":30,"extra":1}', '{"name":"bob","age":-1}', '{"name":"bob","age":030}', '{"name":"bob","age":3,"when":"2024-13-01"}', '{"name":"bob","age":3}x', '{"name":"a\nb","age":3}', '{"name":"bob",  "age":3}'],
    );
    // Only optional properties: any ordered subset, the empty object too.
    accepts({ properties: { a: { type: 'integer' }, b: { type: 'boolean' }, c: { const: 'x' } } }, ['{}', '{"b":true}', '{"a":1,"c":"x"}', '{"a":-5,"b":false,"c":"x"}', '{"c":"x"}'], ['{"c":"x","a":1}', '{,"b":true}', '{"a":1,}', '{"c":"y"}']);
    // Tuples, lengths, maps, type lists, references and free-form values.
    accepts({ type: 'array', prefixItems: [{ type: 'integer' }, { type: 'string' }], items: { type: 'boolean' }, minItems: 2, maxItems: 4 }, ['[1,"a"]', '[1,"a",true,false]'], ['[1]', '[1,"a",true,false,true]', '["a",1]', '[1,"a",3]']);
    accepts({ type: 'array', items: { type: 'integer' }, minItems: 2, maxItems: 3 }, ['[1,2]', '[1, 2, 3]'], ['[]', '[1]', '[1,2,3,4]']);
    accepts({ type: 'object', additionalProperties: { type: 'number' } }, ['{}', '{"x":1.5,"y":-2e3}'], ['{"x":"1"}']);
    accepts({ type: ['string', 'null'] }, ['"x"', 'null'], ['1']);
    accepts({ $defs: { point: { type: 'object', properties: { x: { type: 'integer' } }, required: ['x'] } }, type: 'array', items: { $ref: '#/$defs/point' } }, ['[{"x":1},{"x":2}]', '[]'], ['[{"y":1}]']);
    accepts({}, ['{"a":[1,{"b":null}]}', '"s"', '-1.5e+3', 'true', '[]'], ['{a:1}', "'s'", '01']);
    accepts({ type: 'string', pattern: '^[A-Z]{2}[0-9]+$' }, ['"AB12"'], ['"ab12"', '"AB"']);
    accepts({ type: 'string', format: 'uuid' }, ['"123e4567-e89b-12d3-a456-426614174000"'], ['"123e4567"']);
    accepts({ type: 'string', format: 'date-time' }, ['"2024-02-29T23:59:60Z"'.replace('60', '59'), '"2024-02-29T00:00:00.5+05:30"'], ['"2024-02-29 00:00:00"']);
    accepts({ enum: ['red', 1, null, { a: 1 }] }, ['"red"', '1', 'null', '{"a":1}'], ['"blue"', '2']);
    accepts({ type: 'object', properties: { a: { type: 'integer' } }, required: ['a'] }, ['{\n  "a": 1\n}'], ['{"a":1}  '], { whitespace: '[ \\n]*' });
  });

  it('writes integer and number bounds as exact ranges', () => {
    const ranges: Array<[number, number]> = [[0, 120], [-15, 7], [3, 3], [-200, -5], [17, 1234], [0, 9], [99, 101], [-1, 0], [5, 100000]];
    for (const [low, high] of ranges) {
      const automaton = ByteAutomaton.fromRegex(`(${integerRange(low, high)})`);
      for (let value = low - 120; value <= Math.min(high, low + 3000) + 120; value++) expect(automaton.matches(String(value)), `${value} in [${low}, ${high}]`).toBe(value >= low && value <= high);
      expect(automaton.matches('-0') || automaton.matches(`0${Math.abs(low) + 1}`)).toBe(false);
    }
    const atLeast = ByteAutomaton.fromRegex(jsonSchemaToRegex({ type: 'integer', exclusiveMinimum: 41 }));
    for (const [text, wanted] of [['42', true], ['41', false], ['100000000000', true], ['-50', false], ['9', false]] as const) expect(atLeast.matches(text), text).toBe(wanted);
    const atMost = ByteAutomaton.fromRegex(jsonSchemaToRegex({ type: 'integer', maximum: -3 }));
    for (const [text, wanted] of [['-3', true], ['-2', false], ['-3000', true], ['0', false]] as const) expect(atMost.matches(text), text).toBe(wanted);
    const cases: Array<[object, string[], string[]]> = [
      [{ type: 'number', minimum: 0, maximum: 1 }, ['0', '0.0', '0.999', '1', '1.00'], ['1.01', '-0.5', '2', '1e0']],
      [{ type: 'number', exclusiveMinimum: 0, maximum: 10 }, ['0.001', '5', '9.99', '10'], ['0', '0.000', '10.5', '-1']],
      [{ type: 'number', minimum: -2, exclusiveMaximum: 3 }, ['-2', '-1.5', '-0.5', '0', '2.999'], ['-2.1', '3', '3.0', '-3']],
      [{ type: 'number', minimum: 5 }, ['5', '5.5', '123456.7'], ['4.99', '-5']],
      [{ type: 'number', maximum: -1 }, ['-1', '-1.0', '-7.25'], ['-0.5', '0', '1']],
    ];
    for (const [schema, inside, outside] of cases) {
      const automaton = ByteAutomaton.fromRegex(jsonSchemaToRegex(schema));
      for (const text of inside) expect(automaton.matches(text), `${text} in ${JSON.stringify(schema)}`).toBe(true);
      for (const text of outside) expect(automaton.matches(text), `${text} outside ${JSON.stringify(schema)}`).toBe(false);
    }
  });

  it('cuts recursion off at maxDepth and refuses keywords it cannot enforce, naming their path', () => {
    const tree = { $defs: { node: { type: 'object', properties: { value: { type: 'integer' }, children: { type: 'array', items: { $ref: '#/$defs/node' } } }, required: ['value'] } }, $ref: '#/$defs/node' };
    const automaton = ByteAutomaton.fromRegex(jsonSchemaToRegex(tree, { maxDepth: 3 }));
    expect(automaton.matches('{"value":1,"children":[{"value":2,"children":[{"value":3}]}]}')).toBe(true);
    expect(automaton.matches('{"value":1,"children":[{"value":2,"children":[{"value":3,"children":[{"value":4}]}]}]}')).toBe(false);
    const cases: Array<[unknown, RegExp, string]> = [
      [{ type: 'object', properties: { x: { not: { type: 'null' } } } }, /the keyword 'not' cannot be enforced/, '#/properties/x/not'],
      [{ type: 'object', properties: { a: {} }, required: ['b'] }, /required names 'b', which is not among its properties \(a\)/, '#/required'],
      [{ $ref: '#/$defs/missing' }, /names nothing in the schema/, '#/$ref'],
      [{ $ref: 'http://example.com/schema' }, /only references inside the schema/, '#/$ref'],
      [{ type: 'number', minimum: 0.5 }, /whole numbers/, '#'],
      [{ type: 'string', format: 'hostname' }, /the format "hostname" is not supported/, '#/format'],
      [{ type: 'integer', minimum: 5, maximum: 4 }, /no integer lies between the bounds/, '#'],
      [{ type: 'color' }, /unknown type "color"/, '#/type'],
      [{ allOf: [{ type: 'string' }, { maxLength: 2 }] }, /only an allOf of one schema/, '#/allOf'],
      [{ type: 'string', minLength: 3, maxLength: 2 }, /maxLength is below minLength/, '#'],
      ['{not json', /must be JSON/, '#'],
    ];
    for (const [schema, message, path] of cases) {
      const error = refusal(() => jsonSchemaToRegex(schema));
      expect(error.message).toMatch(message);
      expect(error.schemaPath).toBe(path);
    }
  });

  it('follows recursive references to any depth in a guide (its references become grammar rules); schemas without recursion stay one regex', () => {
    const tree = { $defs: { node: { type: 'object', properties: { name: { type: 'string', maxLength: 4 }, children: { type: 'array', items: { $ref: '#/$defs/node' } } }, required: ['name', 'children'] } }, $ref: '#/$defs/node' };
    const automaton = checkGuidedDecoding({ json: tree });
    expect(automaton).toBeInstanceOf(GrammarAutomaton);
    const grow = (depth: number): unknown => ({ name: `n${depth % 10}`, children: depth === 0 ? [] : [grow(depth - 1), { name: 'leaf', children: [] }] });
    for (const depth of [0, 3, 25]) expect((automaton as GrammarAutomaton).matches(JSON.stringify(grow(depth)))).toBe(true);
    expect((automaton as GrammarAutomaton).matches('{"name":"a","children":[{"name":"b"}]}')).toBe(false);
    expect((automaton as GrammarAutomaton).matches('{"name":"toolong","children":[]}')).toBe(false);
    // Through two definitions that name each other, beside a choice that ends the recursion.
    const mutual = { $defs: { a: { type: 'object', properties: { b: { anyOf: [{ $ref: '#/$defs/b' }, { type: 'null' }] } }, required: ['b'] }, b: { type: 'array', items: { $ref: '#/$defs/a' } } }, $ref: '#/$defs/a' };
    const nested = checkGuidedDecoding({ json: mutual }) as GrammarAutomaton;
    expect([nested.matches('{"b":[{"b":[{"b":null}]},{"b":[]}]}'), nested.matches('{"b":[{"b":1}]}')]).toEqual([true, false]);
    // A reference used twice without recursion is inlined: one regex.
    expect(checkGuidedDecoding({ json: { type: 'object', properties: { a: { $ref: '#/$defs/n' }, b: { $ref: '#/$defs/n' } }, $defs: { n: { type: 'integer' } } } })).toBeInstanceOf(ByteAutomaton);
    // Recursion with no way out is named.
    const endless = { $defs: { link: { type: 'object', properties: { next: { $ref: '#/$defs/link' } }, required: ['next'] } }, $ref: '#/$defs/link' };
    expect(refusal(() => checkGuidedDecoding({ json: endless }, 'row 2: guidedDecoding')).message).toMatch(/^row 2: guidedDecoding: grammar: rules? .*'#\/\$defs\/link' can never finish/);
  });
});

const ARITHMETIC = `
# Sums of products of numbers, negations and parenthesized expressions.
root   ::= expr
expr   ::= term ( [+-] term )*
term   ::= factor ( [*/] factor )*
factor ::= [0-9]{1,3} | "(" expr ")" | "-" factor
`;

/** Whether `text` is an ARITHMETIC expression, by hand: recursive descent over its characters. */
function isArithmetic(text: string): boolean {
  let at = 0;
  const factor = (): boolean => {
    if (text[at] === '-') return at++, factor();
    if (text[at] === '(') {
      at++;
      if (!expr() || text[at] !== ')') return false;
      return at++, true;
    }
    const digits = /^[0-9]{1,3}/.exec(text.slice(at));
    if (!digits || /^[0-9]/.test(text.slice(at + digits[0].length))) return false;
    return (at += digits[0].length), true;
  };
  const term = (): boolean => {
    if (!factor()) return false;
    while (text[at] === '*' || text[at] === '/') if ((at++, !factor())) return false;
    return true;
  };
  const expr = (): boolean => {
    if (!term()) return false;
    while (text[at] === '+' || text[at] === '-') if ((at++, !term())) return false;
    return true;
  };
  return expr() && at === text.length;
}

describe('guided decoding: context-free grammars (GBNF)', () => {
  it('derives exactly the texts a recursive-descent reading accepts, nesting to any depth', () => {
    const automaton = GrammarAutomaton.fromGrammar(ARITHMETIC);
    const random = seeded(5);
    const alphabet = ['1', '23', '(', ')', '+', '-', '*', '/', '7'];
    let matched = 0;
    for (let index = 0; index < 3000; index++) {
      const text = Array.from({ length: 1 + Math.floor(random() * 12) }, () => alphabet[Math.floor(random() * alphabet.length)]).join('');
      expect({ text, matches: automaton.matches(text) }).toEqual({ text, matches: isArithmetic(text) });
      if (isArithmetic(text)) matched++;
    }
    expect(matched).toBeGreaterThan(100);
    const deep = `${'('.repeat(200)}1${')'.repeat(200)}`;
    expect([automaton.matches(deep), automaton.matches(deep.slice(1))]).toEqual([true, false]);
  });

  it('reads literals, escapes, classes, any character, groups and counted repetition, over UTF-8', () => {
    const automaton = GrammarAutomaton.fromGrammar(String.raw`
root ::= greeting ", " name "!"? tail  # a comment
greeting ::= ("hello" | "héllo" | "\u00e7a va") # escapes
name ::= [A-Z\u00c0-\u00dd] [a-zà-ÿ]{1,8}
tail ::= ( "\n" [^\n]* )? | "\t" . "\x41"
`);
    for (const text of ['hello, World', 'héllo, Émile!', 'ça va, Zoë\n日本語 ok', 'hello, Ann!\t€A']) expect({ text, matches: automaton.matches(text) }).toEqual({ text, matches: true });
    for (const text of ['hello, world', 'hello, W', 'hello, Wabcdefghi', 'hello, Ann\n1\n2', 'hola, Ann']) expect({ text, matches: automaton.matches(text) }).toEqual({ text, matches: false });
    // A leading space, where a SentencePiece decoder drops one.
    expect(GrammarAutomaton.fromGrammar('root ::= "a" root? "b"', { leadingSpace: true }).matches(' aabb')).toBe(true);
  });

  it('refuses what it cannot guide with a GrammarError naming the rule or the position', () => {
    expect(refusal(() => GrammarAutomaton.fromGrammar('root ::= value')).message).toBe("grammar: rule 'value' is used (at 9) but never defined");
    expect(refusal(() => GrammarAutomaton.fromGrammar('start ::= "a"')).message).toMatch(/no rule named 'root'/);
    expect(refusal(() => GrammarAutomaton.fromGrammar('root ::= root "+" "1" | "1"')).message).toMatch(/rule 'root' is left-recursive \(root → root before reading any text\)/);
    // Through another rule, and past one that may read nothing.
    expect(refusal(() => GrammarAutomaton.fromGrammar('root ::= list\nlist ::= space? item list? | item\nitem ::= space? root "x" | "y"\nspace ::= " "?')).message).toMatch(/left-recursive \((root → list → item → root|list → item → root → list|item → root → list → item)/);
    expect(refusal(() => GrammarAutomaton.fromGrammar('root ::= "a" loop\nloop ::= "b" loop')).message).toBe("grammar: rules 'root', 'loop' can never finish: every way through recurses without end");
    expect(refusal(() => GrammarAutomaton.fromGrammar('root ::= "a"\nroot ::= "b"')).message).toMatch(/rule 'root' is defined twice/);
    const unclosed = refusal(() => GrammarAutomaton.fromGrammar('root ::= ("a" | "b"'));
    expect([unclosed.message, unclosed.position]).toEqual(["grammar at 19: expected ')' to close the group", 19]);
    expect(refusal(() => GrammarAutomaton.fromGrammar('root ::= [z-a]')).message).toMatch(/range z-a runs backwards/);
    expect(refusal(() => GrammarAutomaton.fromGrammar('root ::= "a\\q"')).message).toMatch(/unknown escape \\q/);
    expect(refusal(() => GrammarAutomaton.fromGrammar('root ::= "a"{2000}')).message).toMatch(/repetition counts above 1000/);
    expect(refusal(() => GrammarAutomaton.fromGrammar('root ::= "a" | ) "b"')).message).toMatch(/'\)' without its '\('/);
    expect(refusal(() => GrammarAutomaton.fromGrammar('   ')).message).toMatch(/non-empty string of rules/);
    expect(refusal(() => TokenGuide.compile(Tokenizer.fromJSON(gpt2StyleTokenizerJson()), { grammar: 'root ::= x' }, 'row 3: guidedDecoding')).message).toBe("row 3: guidedDecoding: grammar: rule 'x' is used (at 9) but never defined");
    expect(refusal(() => TokenGuide.compile(Tokenizer.fromJSON(gpt2StyleTokenizerJson()), { grammar: 7 as never })).message).toMatch(/grammar must be a string of GBNF rules/);
  });
});

describe('guided decoding: token guides', () => {
  const gpt2 = Tokenizer.fromJSON(gpt2StyleTokenizerJson());
  const llama2 = Tokenizer.fromJSON(llama2StyleTokenizerJson());
  const endOfText = gpt2.tokenToId('<|endoftext|>')!;

  it('reads each token as the bytes it adds in the middle of a text', () => {
    expect(Array.from(gpt2.tokenBytes(gpt2.tokenToId('Ġworld')!)!)).toEqual([...Buffer.from(' world')]);
    // A byte-level token that is half a character: its one byte.
    expect(Array.from(gpt2.tokenBytes(gpt2.tokenToId('Ã')!)!)).toEqual([0xc3]);
    expect(gpt2.tokenBytes(endOfText)).toBeUndefined();
    expect(Array.from(llama2.tokenBytes(llama2.tokenToId('▁Hello')!)!)).toEqual([...Buffer.from(' Hello')]);
    expect(Array.from(llama2.tokenBytes(llama2.tokenToId('<0x0A>')!)!)).toEqual([0x0a]);
    expect(llama2.tokenBytes(llama2.tokenToId('</s>')!)).toBeUndefined();
    expect([gpt2.stripsLeadingSpace, llama2.stripsLeadingSpace]).toEqual([false, true]);
  });

  it("lets a SentencePiece vocabulary's first token carry the space its decoder drops", () => {
    const hello = llama2.tokenToId('▁Hello')!;
    const constraint = TokenGuide.fromRegex(llama2, 'Hello!?').constraint([llama2.tokenToId('</s>')!]);
    expect(constraint([])!.has(hello)).toBe(true);
    expect(llama2.decode([hello])).toBe('Hello');
    // Only at the start: a second space is no part of the pattern.
    expect(constraint([llama2.tokenToId('<0x20>')!])!.has(hello)).toBe(false);
    expect(TokenGuide.fromRegex(gpt2, 'Hello').constraint()([])!.has(gpt2.tokenToId('Ġt')!)).toBe(false);
  });

  it("allows exactly the tokens whose bytes keep the text on the pattern, the stop tokens where it may end", () => {
    const schema = { type: 'object', properties: { word: { type: 'string', maxLength: 5 }, count: { type: 'integer', minimum: 0, maximum: 50 }, flag: { type: 'boolean' } }, required: ['word', 'count'] };
    const valid = (text: string) => {
      const value = JSON.parse(text) as Record<string, unknown>;
      expect(Object.keys(value).slice(0, 2)).toEqual(['word', 'count']);
      expect([...(value.word as string)].length).toBeLessThanOrEqual(5);
      expect(Number.isInteger(value.count) && (value.count as number) >= 0 && (value.count as number) <= 50).toBe(true);
      if ('flag' in value) expect(typeof value.flag).toBe('boolean');
    };
    for (const [tokenizer, stop] of [[gpt2, endOfText], [llama2, llama2.tokenToId('</s>')!]] as const) {
      const guide = TokenGuide.fromJsonSchema(tokenizer, schema);
      const constraint = guide.constraint([stop]);
      const random = seeded(11);
      let stoppedByToken = 0;
      for (let document = 0; document < 12; document++) {
        const generated: number[] = [];
        for (let mask = constraint(generated); mask !== null; mask = constraint(generated)) {
          // The mask is exactly the tokens a walk of their bytes from here keeps alive.
          const state = guide.stateAfter(generated);
          for (let id = 0; id < tokenizer.vocabSize; id++) {
            const bytes = tokenizer.tokenBytes(id);
            const alive = bytes !== undefined && bytes.length > 0 && guide.automaton.walk(state, bytes) !== DEAD;
            expect(mask.has(id), `token ${id} after ${generated.length} tokens`).toBe(alive || (id === stop && guide.automaton.accepting(state)));
          }
          const ids = mask.ids();
          generated.push(ids[Math.floor(random() * ids.length)]);
          expect(generated.length).toBeLessThan(200);
        }
        if (generated.at(-1) === stop) {
          stoppedByToken++;
          generated.pop();
        }
        valid(tokenizer.decode(generated));
      }
      // An accepting state that cannot go on ends the text itself: most walks end at '}', none needs the stop token there.
      expect(stoppedByToken).toBe(0);
    }
  });

  it('guides tokens through a grammar: each mask is exactly the tokens that keep the text derivable, and every walk ends in a text it derives', () => {
    const guide = TokenGuide.fromGrammar(gpt2, ARITHMETIC);
    const constraint = guide.constraint([endOfText]);
    const random = seeded(23);
    let deepest = 0;
    for (let text = 0; text < 12; text++) {
      const generated: number[] = [];
      for (let mask = constraint(generated); mask !== null; mask = constraint(generated)) {
        const state = guide.stateAfter(generated);
        for (let id = 0; id < gpt2.vocabSize; id++) {
          const bytes = gpt2.tokenBytes(id);
          const alive = bytes !== undefined && bytes.length > 0 && guide.automaton.walk(state, bytes) !== DEAD;
          expect(mask.has(id), `token ${id} after ${generated.length} tokens`).toBe(alive || (id === endOfText && guide.automaton.accepting(state)));
        }
        const ids = mask.ids();
        // Lean towards the stop token after a while, so that walks end.
        const pick = generated.length > 20 && mask.has(endOfText) ? endOfText : ids[Math.floor(random() * ids.length)];
        generated.push(pick);
        if (pick === endOfText) break;
        expect(generated.length).toBeLessThan(400);
      }
      if (generated.at(-1) === endOfText) generated.pop();
      const decoded = gpt2.decode(generated);
      expect({ decoded, derived: isArithmetic(decoded) }).toEqual({ decoded, derived: true });
      let depth = 0;
      for (const character of decoded) deepest = Math.max(deepest, (depth += character === '(' ? 1 : character === ')' ? -1 : 0));
    }
    expect(deepest).toBeGreaterThan(1);
  });

  it('guides tokens through a recursive schema: every walk is a tree the schema accepts', () => {
    const tree = { $defs: { node: { type: 'object', properties: { id: { type: 'integer', minimum: 0, maximum: 9 }, kids: { type: 'array', items: { $ref: '#/$defs/node' }, maxItems: 2 } }, required: ['id', 'kids'] } }, $ref: '#/$defs/node' };
    const guide = TokenGuide.compile(gpt2, { json: tree });
    const constraint = guide.constraint([endOfText]);
    const random = seeded(31);
    const valid = (value: any): boolean => Number.isInteger(value.id) && value.id >= 0 && value.id <= 9 && Array.isArray(value.kids) && value.kids.length <= 2 && value.kids.every(valid) && Object.keys(value).join() === 'id,kids';
    let deepest = 0;
    const depthOf = (value: any): number => 1 + Math.max(0, ...value.kids.map(depthOf));
    for (let text = 0; text < 10; text++) {
      const generated: number[] = [];
      for (let mask = constraint(generated); mask !== null; mask = constraint(generated)) {
        const ids = mask.ids();
        // Close what is open after a while (a ']' or '}' where allowed), so that walks end.
        const closing = generated.length > 60 ? ids.filter((id) => /^[\]}]$/.test(gpt2.decode([id]))) : [];
        generated.push(closing.length > 0 ? closing[0] : ids[Math.floor(random() * ids.length)]);
        expect(generated.length).toBeLessThan(500);
      }
      if (generated.at(-1) === endOfText) generated.pop();
      const value = JSON.parse(gpt2.decode(generated));
      expect(valid(value)).toBe(true);
      deepest = Math.max(deepest, depthOf(value));
    }
    expect(deepest).toBeGreaterThan(2);
  });

  it('lets a stop token end a pattern that may go on, and names a token that leaves the pattern', () => {
    const guide = TokenGuide.fromRegex(gpt2, '[0-9]+');
    const constraint = guide.constraint([endOfText]);
    const one = gpt2.tokenToId('1')!;
    const first = constraint([])!;
    expect(first.has(one)).toBe(true);
    expect(first.has(endOfText)).toBe(false);
    expect(first.has(gpt2.tokenToId('12')!)).toBe(true);
    expect(first.has(gpt2.tokenToId('a')!)).toBe(false);
    const later = constraint([one])!;
    expect(later.has(endOfText)).toBe(true);
    expect(later.count()).toBe(first.count() + 1);
    expect(constraint([one, endOfText])).toBeNull();
    expect(refusal(() => constraint([one, gpt2.tokenToId('a')!])).message).toMatch(/token \d+ \(position 1\) leaves the pattern/);
    // Without stop tokens a pattern that may go on keeps going; a finished one answers null.
    expect(TokenGuide.fromRegex(gpt2, 'ab').constraint()([gpt2.tokenToId('a')!, gpt2.tokenToId('b')!])).toBeNull();
    // A character of four bytes is spelled a byte token at a time: first the token of byte F4 alone.
    expect(TokenGuide.fromRegex(gpt2, '\\u{10FFFF}').constraint()([])!.ids()).toEqual([gpt2.tokenToId('ô')]);

    const mask = new TokenMask(70);
    for (const id of [0, 31, 32, 69]) mask.add(id);
    expect(mask.ids()).toEqual([0, 31, 32, 69]);
    expect([mask.count(), mask.has(31), mask.has(33), mask.has(70)]).toEqual([4, true, false, false]);
    expect(() => new TokenMask(70, new Uint32Array(2))).toThrow(/has 3 words/);
  });
});

describe('guided decoding in the processor and the replica', () => {
  let directory: string;
  let checkpoint: string;
  const config = { ...TINY, vocabSize: 300, maxPositions: 160 };
  const weights = randomWeights(config, 11);
  const tokenizerJson = gpt2StyleTokenizerJson();
  const tokenizer = Tokenizer.fromJSON(tokenizerJson);

  beforeAll(async () => {
    directory = mkdtempSync(join(tmpdir(), 'trellis-guided-'));
    checkpoint = await writeCheckpoint(join(directory, 'model'), config, weights);
    writeFileSync(join(checkpoint, 'tokenizer.json'), JSON.stringify(tokenizerJson));
    await init({ numCpus: 4 });
  });
  afterAll(async () => {
    await shutdown();
    rmSync(directory, { recursive: true, force: true });
  });

  /** Greedy decoding by the reference model, each step's token the most likely one the guide allows. */
  function guidedReference(guide: TokenGuide, prompt: number[], stop: number, maxNewTokens: number): number[] {
    const constraint = guide.constraint([stop]);
    const generated: number[] = [];
    for (let mask = constraint(generated); mask !== null && generated.length < maxNewTokens; mask = constraint(generated)) {
      const logits = referenceLogits(config, weights, [...prompt, ...generated]).at(-1)!;
      generated.push(mask.ids().reduce((best, token) => (logits[token] > logits[best] ? token : best)));
      if (generated.at(-1) === stop) break;
    }
    return generated;
  }

  it('generates JSON a schema accepts, token for token as a reference restricted to the same tokens, across two ranks', async () => {
    const schema = { type: 'object', properties: { name: { type: 'string', maxLength: 6 }, age: { type: 'integer', minimum: 0, maximum: 120 }, ok: { type: 'boolean' } }, required: ['name', 'age', 'ok'] };
    const prompts = ['Hello world', 'the cat', 'it is'];
    const processor = buildLLMProcessor({ checkpoint, promptColumn: 'prompt', maxNewTokens: 100, guidedDecoding: { json: schema }, tensorParallel: 2 });
    const rows = await processor(fromItems(prompts.map((prompt, id) => ({ id, prompt })))).takeAll();
    rows.sort((a, b) => (a.id as number) - (b.id as number));
    const guide = TokenGuide.fromJsonSchema(tokenizer, schema);
    const stop = tokenizer.tokenToId('<|endoftext|>')!;
    prompts.forEach((prompt, index) => {
      expect(Array.from(rows[index].generatedTokens as number[])).toEqual(guidedReference(guide, tokenizer.encode(prompt), stop, 100));
      expect(rows[index].finishReason).toBe('stop');
      const value = JSON.parse(rows[index].generatedText as string) as Record<string, unknown>;
      expect(Object.keys(value)).toEqual(['name', 'age', 'ok']);
      expect(typeof value.ok).toBe('boolean');
    });
  });

  it('generates text a grammar derives, token for token as a reference restricted to the same tokens', async () => {
    const grammar = 'root ::= "(" item ( ", " item )* ")"\nitem ::= [a-z]{1,5} | [0-9]{1,3} | root';
    const prompts = ['Hello world', 'the cat'];
    const processor = buildLLMProcessor({ checkpoint, promptColumn: 'prompt', maxNewTokens: 60, guidedDecoding: { grammar } });
    const rows = await processor(fromItems(prompts.map((prompt, id) => ({ id, prompt })))).takeAll();
    rows.sort((a, b) => (a.id as number) - (b.id as number));
    const guide = TokenGuide.fromGrammar(tokenizer, grammar);
    const stop = tokenizer.tokenToId('<|endoftext|>')!;
    prompts.forEach((prompt, index) => {
      expect(Array.from(rows[index].generatedTokens as number[])).toEqual(guidedReference(guide, tokenizer.encode(prompt), stop, 60));
      // Complete or cut by the token limit, the text is on the grammar: a prefix of a text it derives.
      const text = rows[index].generatedText as string;
      expect(guide.automaton.walk(guide.automaton.start, new TextEncoder().encode(text))).not.toBe(DEAD);
      if (rows[index].finishReason === 'stop') expect((guide.automaton as GrammarAutomaton).matches(text)).toBe(true);
    });
  });

  it("takes each row's own guide from its column, as JSON text, and refuses bad ones by name", async () => {
    const processor = buildLLMProcessor({ checkpoint, promptColumn: 'prompt', maxNewTokens: 30 });
    const rows = await processor(
      fromItems([
        { id: 0, prompt: 'a', guidedDecoding: JSON.stringify({ regex: '[0-9]{3}-[a-z]{2}' }) },
        { id: 1, prompt: 'b', guidedDecoding: JSON.stringify({ choice: ['yes', 'no', 'maybe'] }) },
        { id: 2, prompt: 'c', guidedDecoding: JSON.stringify({ json: { enum: [1, 2, 3] } }) },
        { id: 3, prompt: 'd', guidedDecoding: null },
      ]),
    ).takeAll();
    rows.sort((a, b) => (a.id as number) - (b.id as number));
    expect(rows[0].generatedText).toMatch(/^[0-9]{3}-[a-z]{2}$/);
    expect(['yes', 'no', 'maybe']).toContain(rows[1].generatedText);
    expect(['1', '2', '3']).toContain(rows[2].generatedText);
    expect(rows.slice(0, 3).map((row) => row.finishReason)).toEqual(['stop', 'stop', 'stop']);
    expect((rows[3].generatedTokens as number[]).length).toBe(30);
    await expect(processor(fromItems([{ prompt: 'a', guidedDecoding: JSON.stringify({ regex: '(?=x)' }) }])).takeAll()).rejects.toThrow(/row 0: guidedDecoding: regex "\(\?=x\)" at 0: lookaround is not supported/);
    expect(refusal(() => buildLLMProcessor({ checkpoint, promptColumn: 'prompt', guidedDecoding: { json: { type: 'object', properties: { x: { type: 'integer', multipleOf: 3 } } } } })).schemaPath).toBe('#/properties/x/multipleOf');
    expect(refusal(() => buildLLMProcessor({ checkpoint, guidedDecoding: { regex: 'a', json: {} } })).message).toMatch(/exactly one of json, jsonObject, regex, choice or grammar, got json and regex/);
    expect(() => buildLLMProcessor({ checkpoint, promptColumn: 'prompt', choices: ['a'], guidedDecoding: { regex: 'a' } })).toThrow(/choices or guidedDecoding, not both/);
  });

  it('speculates within the guide: proposals are cut where it forbids them, and the text is the plain guided one', async () => {
    await using speculating = await ModelReplica.create({ checkpoint, speculation: { tokens: 4 } });
    const stop = tokenizer.tokenToId('<|endoftext|>')!;
    const cases: Array<[string, string]> = [
      ['[a-d]{24}', 'abcdabcdabcd'],
      ['\\{"name":"(ab|cd)+"\\}', '{"name":"abababababab"}'],
      ['(the cat |a dog ){5}', 'the cat the cat a dog the cat'],
    ];
    for (const [pattern, prompt] of cases) {
      const guide = TokenGuide.fromRegex(tokenizer, pattern);
      const tokens = tokenizer.encode(prompt);
      const [generation] = await speculating.generate([{ tokens, maxNewTokens: 40, constraint: guide.constraint([stop]) }]);
      expect(generation.tokens, pattern).toEqual(guidedReference(guide, tokens, stop, 40));
    }
    expect(speculating.stats().draftTokens).toBeGreaterThan(0);
    expect(speculating.stats().acceptedDraftTokens).toBeGreaterThan(0);
  });

  it('guides a replica request through a mask, also one smaller than the padded vocabulary', async () => {
    await using replica = await ModelReplica.create({ checkpoint });
    const guide = TokenGuide.fromRegex(tokenizer, '(ab|cd){2}!');
    const stop = tokenizer.tokenToId('<|endoftext|>')!;
    const prompt = tokenizer.encode('Hello');
    const [generation] = await replica.generate([{ tokens: prompt, maxNewTokens: 20, constraint: guide.constraint([stop]) }]);
    expect(tokenizer.decode(generation.tokens)).toMatch(/^(ab|cd){2}!$/);
    expect(generation.tokens).toEqual(guidedReference(guide, prompt, stop, 20));
    expect(generation.finishReason).toBe('stop');
    await expect(replica.generate([{ tokens: prompt, constraint: () => new TokenMask(config.vocabSize + 1) }])).rejects.toMatchObject({ code: 'ERR_CONSTRAINT', message: /more than the vocabulary's 300/ });
    await expect(replica.generate([{ tokens: prompt, constraint: () => new TokenMask(config.vocabSize) }])).rejects.toThrow(/allows no token/);
  });
});

describe('guided decoding after a reasoning model thinks', () => {
  let directory: string;
  let checkpoint: string;
  const config = { ...TINY, vocabSize: 300, maxPositions: 160 };
  const weights = randomWeights(config, 8);
  // GPT-2's byte-level fixture with the markers as added tokens, as Qwen3's vocabulary has them.
  const json = gpt2StyleTokenizerJson() as { added_tokens: Array<Record<string, unknown>>; model: { vocab: Record<string, number> } };
  const startId = 300 - 28;
  json.added_tokens.push({ id: startId, content: '<think>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: false }, { id: startId + 1, content: '</think>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: false });
  const tokenizer = Tokenizer.fromJSON(json);
  const end = tokenizer.tokenToId('</think>')!;
  const stop = tokenizer.tokenToId('<|endoftext|>')!;

  beforeAll(async () => {
    directory = mkdtempSync(join(tmpdir(), 'trellis-reasoning-'));
    checkpoint = await writeCheckpoint(join(directory, 'model'), config, weights);
    writeFileSync(join(checkpoint, 'tokenizer.json'), JSON.stringify(json));
    await init({ numCpus: 4 });
  });
  afterAll(async () => {
    await shutdown();
    rmSync(directory, { recursive: true, force: true });
  });

  /** Greedy with a bias toward the end marker; free until it, then among what the guide allows. */
  function reference(prompt: number[], bias: number, guide: TokenGuide, maxNewTokens: number): number[] {
    const constraint = guide.constraint([stop]);
    const generated: number[] = [];
    while (generated.length < maxNewTokens) {
      const logits = referenceLogits(config, weights, [...prompt, ...generated]).at(-1)!;
      logits[end] += bias;
      const at = generated.indexOf(end);
      const mask = at < 0 ? undefined : constraint(generated.slice(at + 1));
      if (at >= 0 && mask === null) break;
      const candidates = mask ? mask.ids() : logits.map((_, token) => token);
      const token = candidates.reduce((best, candidate) => (logits[candidate] > logits[best] ? candidate : best));
      generated.push(token);
      if (token === stop && at >= 0) break;
    }
    return generated;
  }

  it('leaves the thinking free, guides the answer after the end marker, and splits the two', async () => {
    const guide = TokenGuide.fromRegex(tokenizer, '(yes|no), [0-9]{2}');
    const prompts = ['the cat'];
    // A bias that makes the random model end its thinking after a few tokens (its end marker's logit trails the top one by 1.1 to 1.8).
    const bias = Array.from({ length: 21 }, (_, step) => 1 + step * 0.05).find((candidate) => prompts.every((prompt) => {
      const at = reference(tokenizer.encode(prompt), candidate, guide, 40).indexOf(end);
      return at >= 2 && at <= 20;
    }))!;
    expect(bias).toBeDefined();
    const processor = buildLLMProcessor({ checkpoint, promptColumn: 'prompt', maxNewTokens: 40, reasoning: true, guidedDecoding: { regex: '(yes|no), [0-9]{2}' }, sampling: { logitBias: { [end]: bias } } });
    const rows = await processor(fromItems(prompts.map((prompt, id) => ({ id, prompt })))).takeAll();
    rows.sort((a, b) => (a.id as number) - (b.id as number));
    prompts.forEach((prompt, index) => {
      const wanted = reference(tokenizer.encode(prompt), bias, guide, 40);
      expect(Array.from(rows[index].generatedTokens as number[])).toEqual(wanted);
      const at = wanted.indexOf(end);
      expect(rows[index].reasoningText).toBe(tokenizer.decode(wanted.slice(0, at)).trim());
      expect(rows[index].generatedText).toMatch(/^(yes|no), [0-9]{2}$/);
      expect(rows[index].finishReason).toBe('stop');
    });
    expect(() => buildLLMProcessor({ checkpoint, promptColumn: 'prompt', reasoning: 'yes' as unknown as boolean })).toThrow(/reasoning must be true or/);
    await expect(buildLLMProcessor({ checkpoint, promptColumn: 'prompt', reasoning: { end: '</reason>' } })(fromItems([{ prompt: 'a' }])).takeAll()).rejects.toThrow(/"<\/reason>" is not one token/);
  });
});
