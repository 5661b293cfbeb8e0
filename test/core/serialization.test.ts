import { describe, it, expect } from 'vitest';
import { Packr } from 'msgpackr';
import { pack, unpack } from '../../lib/core/serialization.js';

// The rich codec as configured in serialization.ts: the shortcuts must agree with it byte for byte.
const rich = new Packr({ useRecords: false, moreTypes: true, structuredClone: true });

describe('scalar shortcuts', () => {
  const values = [0, 1, 127, 128, -1, -32, -33, 1.5, 2 ** 40, -0, NaN, null, undefined, true, false, '', 'héllo', 'x'.repeat(300)];

  it('packs scalars exactly as the rich codec does', () => {
    for (const value of values) expect(Buffer.from(pack(value)).equals(Buffer.from(rich.pack(value)))).toBe(true);
  });

  it('reads one-byte values as the rich codec does, a fresh empty array each time', () => {
    for (let byte = 0; byte < 256; byte++) {
      let expected: unknown;
      try {
        expected = rich.unpack(Uint8Array.of(byte));
      } catch {
        continue; // not a complete value on its own
      }
      expect(unpack(Uint8Array.of(byte))).toEqual(expected);
    }
    const first = unpack(Uint8Array.of(0x90)) as unknown[];
    first.push(1);
    expect(unpack(Uint8Array.of(0x90))).toEqual([]);
  });
});
