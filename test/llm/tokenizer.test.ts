import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InvalidArgumentError, ModelLoadError } from '../../lib/errors.js';
import { Tokenizer, translatePattern } from '../../lib/llm/tokenizer.js';
import {
  BYTE_LEVEL_ALPHABET,
  LLAMA3_BEGIN_OF_TEXT,
  LLAMA3_EOT,
  byteId,
  gpt2StyleTokenizerJson,
  llama2StyleTokenizerJson,
  llama3StyleTokenizerJson,
} from './fixtures/tokenizers.js';

const ROUND_TRIP_TEXTS = [
  '',
  'Hello world',
  '  leading, trailing  ',
  'tabs\tand\nnew\nlines\r\n\n',
  "it's the cat's; they'll've 'LL",
  'numbers 0 12 12345 3.14 1,000',
  'café naïve Übermäßig',
  'Ελληνικά Русский 中文 日本語 한국어',
  'emoji 😀👍🏽👨‍👩‍👧 🇯🇵',
  'combining e\u0301 and \u{10348} and \uFEFF and \u0085',
  '!!!???...',
];

/** The error `run` throws, checked to be `type` with `code` and a message naming each fragment. */
function expectError<T extends Error>(run: () => unknown, type: new (...args: never[]) => T, code: string, ...fragments: string[]): T {
  let caught: unknown;
  try {
    run();
  } catch (error) {
    caught = error;
  }
  expect(caught).toBeInstanceOf(type);
  expect((caught as { code?: string }).code).toBe(code);
  for (const fragment of fragments) expect((caught as Error).message).toContain(fragment);
  return caught as T;
}

async function expectLoadError(promise: Promise<unknown>, ...fragments: string[]): Promise<ModelLoadError> {
  const caught = await promise.then(
    () => undefined,
    (error: unknown) => error,
  );
  expect(caught).toBeInstanceOf(ModelLoadError);
  expect((caught as ModelLoadError).code).toBe('ERR_TOKENIZER');
  for (const fragment of fragments) expect((caught as Error).message).toContain(fragment);
  return caught as ModelLoadError;
}

/** A tokenizer.json whose vocab holds each of `tokens`, so that with ignore_merges a piece in it comes back whole. */
function pieceTokenizer(tokens: string[], pre_tokenizer: unknown, extra: Record<string, unknown> = {}): Tokenizer {
  const vocab = Object.fromEntries(tokens.map((token, id) => [token, id]));
  return Tokenizer.fromJSON({ pre_tokenizer, model: { type: 'BPE', vocab, merges: [], ignore_merges: true }, ...extra });
}

/** The vocab strings `text` encodes to: where the pre-tokenizer cut it when each piece is in the vocab. */
function pieces(tokenizer: Tokenizer, text: string): Array<string | undefined> {
  return tokenizer.encode(text).map((id) => tokenizer.idToToken(id));
}

describe('GPT-2-style byte-level BPE', () => {
  const tokenizer = Tokenizer.fromJSON(gpt2StyleTokenizerJson());
  const byte = (character: string): number => byteId(character.charCodeAt(0));

  it('maps bytes onto GPT-2 ids and applies merges by rank', () => {
    expect(tokenizer.vocabSize).toBe(272);
    expect(byte('H')).toBe(39);
    expect(tokenizer.tokenToId('Ġ')).toBe(220);
    expect(tokenizer.idToToken(198)).toBe('Ċ');
    expect(tokenizer.encode('Hello world')).toEqual([262, 268]);
    expect(tokenizer.encode(' the')).toEqual([258]);
    expect(tokenizer.encode('the')).toEqual([byte('t'), 257]);
  });

  it('splits on spaces, punctuation, digits and contractions with GPT-2 pattern', () => {
    // "the" " cat" "'s" " 12" " apples" "!"
    expect(tokenizer.encode("the cat's 12 apples!")).toEqual([
      ...[byte('t'), 257],
      ...[220, byte('c'), byte('a'), byte('t')],
      263,
      ...[220, 269],
      ...[220, byte('a'), byte('p'), byte('p'), byte('l'), byte('e'), byte('s')],
      byte('!'),
    ]);
    expect(tokenizer.encode(' 12345')).toEqual([220, 269, byte('3'), byte('4'), byte('5')]);
    expect(tokenizer.encode("I'll")).toEqual([byte('I'), byte("'"), 259]);
    // "a" " " " b" "\n" "\n" "c": a run of white space leaves its last character to the next word.
    expect(tokenizer.encode('a  b\n\nc')).toEqual([byte('a'), 220, 220, byte('b'), 198, 198, byte('c')]);
  });

  it('encodes an emoji and accented letters as UTF-8 bytes in the byte alphabet', () => {
    // 😀 is F0 9F 98 80: ð (printable) then three of the remapped bytes, Ł ĺ Ģ.
    expect(tokenizer.encode('hi 😀')).toEqual([byte('h'), byte('i'), 220, 172, 253, 246, 222]);
    expect([172, 253, 246, 222].map((id) => tokenizer.idToToken(id)).join('')).toBe('ðŁĺĢ');
    // é is C3 A9: "Ã" "©", joined by the merge "Ã ©".
    expect(tokenizer.encode('café')).toEqual([byte('c'), byte('a'), byte('f'), 270]);
    expect(BYTE_LEVEL_ALPHABET[byteId(0xc3)]).toBe('Ã');
  });

  it('decodes what it encodes, bytes of one character spread over several tokens included', () => {
    for (const text of ROUND_TRIP_TEXTS) expect(tokenizer.decode(tokenizer.encode(text))).toBe(text);
    // An incomplete UTF-8 sequence decodes to U+FFFD rather than throwing.
    expect(tokenizer.decode([172, 253])).toBe('\uFFFD');
    expect(tokenizer.decode(new Int32Array([262, 268]))).toBe('Hello world');
  });

  it('finds the special token in text and drops it on decode unless asked', () => {
    const ids = tokenizer.encode('Hello<|endoftext|> world');
    expect(ids).toEqual([262, 271, 268]);
    expect(tokenizer.decode(ids)).toBe('Hello world');
    expect(tokenizer.decode(ids, { skipSpecialTokens: false })).toBe('Hello<|endoftext|> world');
  });
});

describe('Llama-3-style tokenizer', () => {
  const json = llama3StyleTokenizerJson();
  const tokenizer = Tokenizer.fromJSON(json);
  const byte = (character: string): number => byteId(character.charCodeAt(0));

  it('adds <|begin_of_text|> by the template unless told not to', () => {
    expect(tokenizer.vocabSize).toBe(1003);
    expect(tokenizer.encode('Hello world')).toEqual([LLAMA3_BEGIN_OF_TEXT, 262, 268]);
    expect(tokenizer.encode('Hello world', { addSpecialTokens: false })).toEqual([262, 268]);
    expect(tokenizer.encode('')).toEqual([LLAMA3_BEGIN_OF_TEXT]);
  });

  it('splits with the (?i:…) and possessive pattern', () => {
    const plain = (text: string) => tokenizer.encode(text, { addSpecialTokens: false });
    // (?i:'ll) takes "'LL" alone, so "L A" (271) cannot merge across into "AMA".
    expect(plain("'LLAMA")).toEqual([byte("'"), 272, byte('A'), byte('M'), byte('A')]);
    expect(plain("IT'S")).toEqual([byte('I'), byte('T'), byte("'"), byte('S')]);
    // \p{N}{1,3}: "123" then "45", so "3 4" (273) never applies.
    expect(plain('12345')).toEqual([269, byte('3'), 274]);
    // " ?[^\s\p{L}\p{N}]++[\r\n]*" keeps "!!\n\n" in one piece, where "! Ċ" (275) merges.
    expect(plain('!!\n\nx')).toEqual([byte('!'), 275, 198, byte('x')]);
    expect(plain('Hello\n\n  world')).toEqual([262, 198, 198, 220, 268]);
  });

  it('takes a piece that is in the vocab whole with ignore_merges', () => {
    const hello = tokenizer.tokenToId('Ġhello') as number;
    expect(hello).toBe(276);
    expect(tokenizer.encode(' hello', { addSpecialTokens: false })).toEqual([hello]);
    const merging = Tokenizer.fromJSON({ ...json, model: { ...(json.model as object), ignore_merges: false } });
    // Merged instead: "h e" (rank 1) before "l l" (rank 3), and nothing joins "he" and "ll".
    expect(merging.encode(' hello', { addSpecialTokens: false })).toEqual([220, 257, 259, byte('o')]);
  });

  it('recognizes added special tokens in text and skips them on decode', () => {
    const ids = tokenizer.encode('Hi<|eot_id|>');
    expect(ids).toEqual([LLAMA3_BEGIN_OF_TEXT, byte('H'), byte('i'), LLAMA3_EOT]);
    expect(tokenizer.tokenToId('<|eot_id|>')).toBe(LLAMA3_EOT);
    expect(tokenizer.idToToken(LLAMA3_EOT)).toBe('<|eot_id|>');
    expect(tokenizer.decode(ids)).toBe('Hi');
    expect(tokenizer.decode(ids, { skipSpecialTokens: false })).toBe('<|begin_of_text|>Hi<|eot_id|>');
    // A special token typed at the start does not double the template's.
    expect(tokenizer.encode('<|begin_of_text|>x', { addSpecialTokens: false })).toEqual([LLAMA3_BEGIN_OF_TEXT, byte('x')]);
  });

  it('decodes what it encodes', () => {
    for (const text of ROUND_TRIP_TEXTS) expect(tokenizer.decode(tokenizer.encode(text))).toBe(text);
  });
});

describe('Llama-2-style SentencePiece BPE', () => {
  const tokenizer = Tokenizer.fromJSON(llama2StyleTokenizerJson());

  it('prepends ▁, replaces spaces, merges, and adds <s>', () => {
    expect(tokenizer.vocabSize).toBe(277);
    expect(tokenizer.encode('Hello world')).toEqual([1, 271, 276]);
    expect(tokenizer.encode('Hello world', { addSpecialTokens: false })).toEqual([271, 276]);
    expect(tokenizer.decode([1, 271, 276])).toBe('Hello world');
    expect(tokenizer.decode([1, 271, 276], { skipSpecialTokens: false })).toBe('<s> Hello world');
  });

  it('falls back to <0x..> byte tokens for characters outside the vocab', () => {
    // é is C3 A9 → <0xC3> <0xA9> at 3 + byte.
    expect(tokenizer.encode('Hé', { addSpecialTokens: false })).toEqual([268, 3 + 0xc3, 3 + 0xa9]);
    expect(tokenizer.encode('😀', { addSpecialTokens: false })).toEqual([259, 3 + 0xf0, 3 + 0x9f, 3 + 0x98, 3 + 0x80]);
    expect(tokenizer.decode([259, 3 + 0xf0, 3 + 0x9f, 3 + 0x98, 3 + 0x80])).toBe('😀');
    // Bytes that are not UTF-8 become one U+FFFD each.
    expect(tokenizer.decode([271, 3 + 0xf0, 3 + 0x9f])).toBe('Hello\uFFFD\uFFFD');
  });

  it('decodes what it encodes', () => {
    for (const text of [...ROUND_TRIP_TEXTS, ' x', '  two leading spaces']) {
      expect(tokenizer.decode(tokenizer.encode(text))).toBe(text);
    }
  });

  it('takes the unknown token, fused, where there is no byte fallback', () => {
    const json = llama2StyleTokenizerJson();
    const noFallback = Tokenizer.fromJSON({ ...json, model: { ...(json.model as object), byte_fallback: false } });
    expect(noFallback.encode('Hézz', { addSpecialTokens: false })).toEqual([268, 0]);
  });

  it('follows Metaspace with prepend_scheme first: no ▁ after a leading special token', () => {
    const json = llama2StyleTokenizerJson();
    const metaspace = Tokenizer.fromJSON({
      ...json,
      normalizer: null,
      pre_tokenizer: { type: 'Metaspace', replacement: '▁', prepend_scheme: 'first', split: false },
      decoder: { type: 'Metaspace', replacement: '▁', prepend_scheme: 'first', split: false },
    });
    expect(metaspace.encode('Hello world')).toEqual([1, 271, 276]);
    expect(metaspace.encode('<s>Hello', { addSpecialTokens: false })).toEqual([1, 263, 270]);
    expect(metaspace.decode([271, 276])).toBe('Hello world');
  });
});

describe('pre-tokenizers, normalizers and added tokens', () => {
  it('groups Split matches by each behavior', () => {
    const tokens = ['a', 'b', 'c', '-', '--', 'a-', 'b-', '-b', '-c'];
    const split = (behavior: string, invert = false) => pieceTokenizer(tokens, { type: 'Split', pattern: { String: '-' }, behavior, invert });
    expect(pieces(split('Removed'), 'a-b--c')).toEqual(['a', 'b', 'c']);
    expect(pieces(split('Isolated'), 'a-b--c')).toEqual(['a', '-', 'b', '-', '-', 'c']);
    expect(pieces(split('MergedWithPrevious'), 'a-b--c')).toEqual(['a-', 'b-', '-', 'c']);
    expect(pieces(split('MergedWithNext'), 'a-b--c')).toEqual(['a', '-b', '-', '-c']);
    expect(pieces(split('Contiguous'), 'a-b--c')).toEqual(['a', '-', 'b', '--', 'c']);
    expect(pieces(split('Removed', true), 'a-b--c')).toEqual(['-', '-', '-']);
  });

  it('splits digits singly or in runs', () => {
    const tokens = ['a', '1', '2', '3', '123'];
    expect(pieces(pieceTokenizer(tokens, { type: 'Digits', individual_digits: true }), 'a123')).toEqual(['a', '1', '2', '3']);
    expect(pieces(pieceTokenizer(tokens, { type: 'Digits', individual_digits: false }), 'a123')).toEqual(['a', '123']);
  });

  it('normalizes with Unicode forms and regex replacements', () => {
    const tokens = ['é', 'e', '\u0301', 'x'];
    const nfc = pieceTokenizer(tokens, null, { normalizer: { type: 'NFC' } });
    expect(pieces(nfc, 'e\u0301')).toEqual(['é']);
    const nfd = pieceTokenizer(tokens, null, { normalizer: { type: 'NFD' } });
    expect(nfd.encode('é')).toEqual([1, 2]);
    const replace = pieceTokenizer(tokens, null, { normalizer: { type: 'Sequence', normalizers: [{ type: 'Replace', pattern: { Regex: '\\d+' }, content: 'x' }] } });
    expect(pieces(replace, '42e7')).toEqual(['x', 'e', 'x']);
  });

  it('prefers the longest added token and strips white space beside it as asked', () => {
    const tokenizer = pieceTokenizer(['a', ' '], null, {
      added_tokens: [
        { id: 10, content: '<m>', special: true, lstrip: true, rstrip: false, normalized: false, single_word: false },
        { id: 11, content: '<m>x', special: false, lstrip: false, rstrip: true, normalized: false, single_word: false },
      ],
    });
    expect(tokenizer.encode('a <m>a')).toEqual([0, 10, 0]);
    expect(tokenizer.encode('a<m>x  a')).toEqual([0, 11, 0]);
    expect(tokenizer.decode([0, 10, 11, 0])).toBe('a <m>x a');
  });

  it('translates Oniguruma patterns into JavaScript ones', () => {
    expect(translatePattern("(?i:'s|'ll)")).toBe("(?:'[sS]|'[lL][lL])");
    expect(translatePattern('(?i:[sdmt]|ll)')).toBe('(?:[sSdDmMtT]|[lL][lL])');
    expect(new RegExp(translatePattern('a?+b++c*+'), 'u').exec('aabbbc')?.[0]).toBe('abbbc');
    // Possessive: after "a++" takes every a, nothing is given back for the final "a".
    expect(new RegExp(translatePattern('a++a'), 'u').test('aaa')).toBe(false);
    expect(new RegExp(translatePattern('(?>a+)b'), 'u').test('aaab')).toBe(true);
    // Oniguruma's \s is Unicode White_Space: U+0085 in, U+FEFF out.
    const space = new RegExp(translatePattern('^\\s$'), 'u');
    expect(space.test('\u0085')).toBe(true);
    expect(space.test('\uFEFF')).toBe(false);
    expect(new RegExp(translatePattern('[^\\S]'), 'u').test('\u0085')).toBe(true);
    expect(translatePattern('\\pL\\p{^N}\\x{1F600}')).toBe('\\p{L}\\P{N}\\u{1F600}');
    // ^ and $ anchor lines ended by \n only.
    expect('a\nb\r\nc'.match(new RegExp(translatePattern('^\\w$'), 'gu'))).toEqual(['a', 'c']);
    expect('a\nb\nc'.match(new RegExp(translatePattern('^\\w$'), 'gu'))).toEqual(['a', 'b', 'c']);
  });
});

describe('errors', () => {
  let directory: string;
  beforeAll(async () => {
    directory = await mkdtemp(join(tmpdir(), 'trellis-tokenizer-'));
  });
  afterAll(async () => {
    await rm(directory, { recursive: true, force: true });
  });

  it('loads a file or the tokenizer.json in a directory', async () => {
    const folder = join(directory, 'model');
    await mkdir(folder);
    await writeFile(join(folder, 'tokenizer.json'), JSON.stringify(llama2StyleTokenizerJson()));
    const fromFolder = await Tokenizer.load(folder);
    expect(fromFolder.encode('Hello world')).toEqual([1, 271, 276]);
    const fromFile = await Tokenizer.load(join(folder, 'tokenizer.json'));
    expect(fromFile.decode([271])).toBe('Hello');
  });

  it('names a missing file, and the tokenizer.json a directory lacks', async () => {
    const missing = join(directory, 'absent.json');
    const error = await expectLoadError(Tokenizer.load(missing), missing, 'no such file');
    expect(error.file).toBe(missing);
    await expectLoadError(Tokenizer.load(directory), join(directory, 'tokenizer.json'));
  });

  it('names a file that is not JSON', async () => {
    const file = join(directory, 'broken.json');
    await writeFile(file, '{"model": ');
    const error = await expectLoadError(Tokenizer.load(file), file, 'not valid JSON');
    expect(error.file).toBe(file);
  });

  it('refuses unsupported models and components, naming the type and the source', async () => {
    const file = join(directory, 'wordpiece.json');
    await writeFile(file, JSON.stringify({ model: { type: 'WordPiece', vocab: {} } }));
    const error = await expectLoadError(Tokenizer.load(file), file, "'WordPiece'", 'only BPE');
    expect(error.file).toBe(file);
    const json = llama2StyleTokenizerJson();
    expectError(() => Tokenizer.fromJSON({ ...json, normalizer: { type: 'BertNormalizer' } }, 'bert.json'), ModelLoadError, 'ERR_TOKENIZER', 'bert.json', "'BertNormalizer'");
    expectError(() => Tokenizer.fromJSON({ ...json, pre_tokenizer: { type: 'Whitespace' } }), ModelLoadError, 'ERR_TOKENIZER', "'Whitespace'");
    expectError(() => Tokenizer.fromJSON({ ...json, decoder: { type: 'WordPiece' } }), ModelLoadError, 'ERR_TOKENIZER', "'WordPiece'");
    expectError(() => Tokenizer.fromJSON({ ...json, model: { ...(json.model as object), continuing_subword_prefix: '##' } }), ModelLoadError, 'ERR_TOKENIZER', 'continuing_subword_prefix');
    expectError(() => Tokenizer.fromJSON({ ...json, model: { ...(json.model as object), merges: ['x y'] } }), ModelLoadError, 'ERR_TOKENIZER', 'merges[0]', '"x"');
    expectError(() => Tokenizer.fromJSON({ ...json, pre_tokenizer: { type: 'Split', pattern: { Regex: '[[:alpha:]]' }, behavior: 'Isolated' } }), ModelLoadError, 'ERR_TOKENIZER', 'pre_tokenizer.pattern');
    expectError(() => Tokenizer.fromJSON('nope', 'x.json'), ModelLoadError, 'ERR_TOKENIZER', 'x.json');
  });

  it('refuses bad arguments to encode and decode, naming the value and its index', () => {
    const tokenizer = Tokenizer.fromJSON(llama2StyleTokenizerJson());
    expectError(() => tokenizer.encode(42 as unknown as string), InvalidArgumentError, 'ERR_TOKEN', 'number 42');
    expectError(() => tokenizer.decode([271, 1.5]), InvalidArgumentError, 'ERR_TOKEN', 'ids[1]', '1.5');
    expectError(() => tokenizer.decode([-1]), InvalidArgumentError, 'ERR_TOKEN', 'ids[0]', '-1');
    expectError(() => tokenizer.decode([271, 276, 277]), InvalidArgumentError, 'ERR_TOKEN', 'ids[2]', '277', '277)');
    expectError(() => tokenizer.decode([Number.NaN]), InvalidArgumentError, 'ERR_TOKEN', 'NaN');
    expectError(() => tokenizer.decode(7 as unknown as number[]), InvalidArgumentError, 'ERR_TOKEN', 'number 7');
  });
});
