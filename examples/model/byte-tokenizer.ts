/**
 * A tokenizer.json of GPT-2's byte alphabet alone (256 tokens, one per byte, and
 * <|endoftext|>), for examples that need text in and out of a random model: every text encodes,
 * a byte at a time, and every id decodes.
 */

/** Bytes GPT-2 shows as themselves; the others are mapped to U+0100 onwards, in byte order. */
function printable(byte: number): boolean {
  return (byte >= 33 && byte <= 126) || (byte >= 161 && byte <= 172) || (byte >= 174 && byte <= 255);
}

export function byteTokenizerJson(): Record<string, unknown> {
  let shifted = 0;
  const vocab: Record<string, number> = {};
  for (let byte = 0; byte < 256; byte++) vocab[printable(byte) ? String.fromCharCode(byte) : String.fromCharCode(256 + shifted++)] = byte;
  return {
    added_tokens: [{ id: 256, content: '<|endoftext|>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: true }],
    pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: { type: 'BPE', vocab: { ...vocab, '<|endoftext|>': 256 }, merges: [] },
  };
}
