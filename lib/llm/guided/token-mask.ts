/** Token sets as bit masks: what a constraint allows next, compact enough to send every step. */
import { InvalidArgumentError } from '../../errors.js';

/** A set of token ids as bits: what a constraint allows for the next token. */
export class TokenMask {
  /** Bit `id % 32` of word `id >> 5` is set when `id` is in the set. */
  readonly words: Uint32Array;
  readonly size: number;

  constructor(size: number, words?: Uint32Array) {
    if (!Number.isInteger(size) || size < 0) throw new InvalidArgumentError(`a token mask's size must be a whole number, got ${String(size)}`, 'ERR_CONSTRAINT');
    this.size = size;
    const length = Math.ceil(size / 32);
    if (words !== undefined && words.length !== length) throw new InvalidArgumentError(`a mask of ${size} tokens has ${length} words, got ${words.length}`, 'ERR_CONSTRAINT');
    this.words = words ?? new Uint32Array(length);
  }

  add(id: number): void {
    this.words[id >>> 5] |= 1 << (id & 31);
  }

  has(id: number): boolean {
    return id >= 0 && id < this.size && (this.words[id >>> 5] & (1 << (id & 31))) !== 0;
  }

  /** How many ids are in the set. */
  count(): number {
    let total = 0;
    for (let word of this.words) {
      for (; word !== 0; total++) word &= word - 1;
    }
    return total;
  }

  /** The ids in the set, ascending. */
  ids(): number[] {
    const result: number[] = [];
    this.words.forEach((word, index) => {
      for (let bit = 0; word !== 0; bit++, word >>>= 1) if (word & 1) result.push(index * 32 + bit);
    });
    return result;
  }
}
