import { describe, expect, it } from 'vitest';
import { InvalidArgumentError } from '../../lib/errors.js';
import { attention, gelu, kernelThreads, layerNorm, linear, narrow, quantizeRows, readRows, rmsNorm, rotary, setKernelThreads, siluMultiply } from '../../lib/llm/kernels.js';
import { bf16ToFloat, f16ToFloat, floatToBf16, floatToF16 } from '../../lib/gpu/dtype.js';
import { native } from '../../lib/native.js';
import { seededRandom } from '../../lib/data/keys.js';

/** Deterministic data, so a failure reproduces. */
const generator = seededRandom;

function randomFloats(count: number, seed: number, scale = 1): Float32Array {
  const next = generator(seed);
  const values = new Float32Array(count);
  for (let i = 0; i < count; i++) values[i] = (next() * 2 - 1) * scale;
  return values;
}

/** A view `offset` floats into a larger buffer (byteOffset not a multiple of 16), copying `values`. */
function offsetView(values: Float32Array, offset: number): Float32Array {
  const backing = new Float32Array(values.length + offset + 5).fill(12345);
  const view = backing.subarray(offset, offset + values.length);
  view.set(values);
  return view;
}

function expectClose(actual: Float32Array, expected: ArrayLike<number>, relative = 1e-4, absolute = 1e-5): void {
  expect(actual.length).toBe(expected.length);
  for (let i = 0; i < expected.length; i++) {
    const difference = Math.abs(actual[i] - expected[i]);
    if (!(difference <= absolute + relative * Math.abs(expected[i]))) {
      expect.fail(`element ${i}: got ${actual[i]}, expected ${expected[i]} (difference ${difference})`);
    }
  }
}

function referenceLinear(x: Float32Array, weight: Float32Array, bias: Float32Array | null, m: number, k: number, n: number): Float64Array {
  const out = new Float64Array(m * n);
  for (let row = 0; row < m; row++) {
    for (let column = 0; column < n; column++) {
      let sum = bias === null ? 0 : bias[column];
      for (let d = 0; d < k; d++) sum += x[row * k + d] * weight[column * k + d];
      out[row * n + column] = sum;
    }
  }
  return out;
}

function referenceLayerNorm(x: Float32Array, gamma: Float32Array, beta: Float32Array, rows: number, cols: number, eps: number): Float64Array {
  const out = new Float64Array(rows * cols);
  for (let row = 0; row < rows; row++) {
    let mean = 0;
    for (let i = 0; i < cols; i++) mean += x[row * cols + i];
    mean /= cols;
    let variance = 0;
    for (let i = 0; i < cols; i++) variance += (x[row * cols + i] - mean) ** 2;
    variance /= cols;
    for (let i = 0; i < cols; i++) out[row * cols + i] = ((x[row * cols + i] - mean) / Math.sqrt(variance + eps)) * gamma[i] + beta[i];
  }
  return out;
}

function referenceGelu(x: ArrayLike<number>): Float64Array {
  return Float64Array.from(x, (value) => 0.5 * value * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (value + 0.044715 * value ** 3))));
}

function referenceRmsNorm(x: Float32Array, gamma: Float32Array, rows: number, cols: number, eps: number): Float64Array {
  const out = new Float64Array(rows * cols);
  for (let row = 0; row < rows; row++) {
    let meanSquare = 0;
    for (let i = 0; i < cols; i++) meanSquare += x[row * cols + i] ** 2;
    meanSquare /= cols;
    for (let i = 0; i < cols; i++) out[row * cols + i] = (x[row * cols + i] / Math.sqrt(meanSquare + eps)) * gamma[i];
  }
  return out;
}

function referenceSiluMultiply(gate: ArrayLike<number>, up: ArrayLike<number>): Float64Array {
  return Float64Array.from(gate, (value, i) => (value / (1 + Math.exp(-value))) * up[i]);
}

/** Hugging Face's rotate_half rotation, entirely in f64. */
function referenceRotary(x: Float32Array, positions: Int32Array, inverseFrequencies: Float32Array, rows: number, heads: number, headDim: number): Float64Array {
  const out = Float64Array.from(x.subarray(0, rows * heads * headDim));
  const half = headDim / 2;
  for (let row = 0; row < rows; row++) {
    for (let head = 0; head < heads; head++) {
      const base = (row * heads + head) * headDim;
      for (let i = 0; i < half; i++) {
        const angle = positions[row] * inverseFrequencies[i];
        const [a, b] = [x[base + i], x[base + i + half]];
        out[base + i] = a * Math.cos(angle) - b * Math.sin(angle);
        out[base + i + half] = b * Math.cos(angle) + a * Math.sin(angle);
      }
    }
  }
  return out;
}

/** Llama's inverse frequencies 1 / base^(2i / headDim), rounded to f32 as a checkpoint's config would give them. */
function inverseFrequenciesFor(headDim: number, base = 10000): Float32Array {
  return Float32Array.from({ length: headDim / 2 }, (_, i) => 1 / base ** ((2 * i) / headDim));
}

function referenceAttention(
  q: Float32Array,
  keys: Float32Array,
  values: Float32Array,
  queries: number,
  past: number,
  heads: number,
  headDim: number,
  kvHeads = heads,
  window = 0,
): Float64Array {
  const width = heads * headDim;
  const kvWidth = kvHeads * headDim;
  const out = new Float64Array(queries * width);
  for (let query = 0; query < queries; query++) {
    for (let head = 0; head < heads; head++) {
      const kvOffset = Math.floor(head / (heads / kvHeads)) * headDim;
      const count = past + query + 1;
      // Positions before the window score -infinity: they get no weight.
      const first = window > 0 ? Math.max(0, count - window) : 0;
      const scores = new Float64Array(count).fill(-Infinity);
      for (let position = first; position < count; position++) {
        let dot = 0;
        for (let d = 0; d < headDim; d++) dot += q[query * width + head * headDim + d] * keys[position * kvWidth + kvOffset + d];
        scores[position] = dot / Math.sqrt(headDim);
      }
      const maximum = Math.max(...scores);
      let sum = 0;
      for (let position = 0; position < count; position++) sum += scores[position] = position < first ? 0 : Math.exp(scores[position] - maximum);
      for (let d = 0; d < headDim; d++) {
        let value = 0;
        for (let position = 0; position < count; position++) value += (scores[position] / sum) * values[position * kvWidth + kvOffset + d];
        out[query * width + head * headDim + d] = value;
      }
    }
  }
  return out;
}

function expectInvalid(call: () => unknown, ...fragments: string[]): void {
  let thrown: unknown;
  try {
    call();
  } catch (error) {
    thrown = error;
  }
  expect(thrown, 'expected a throw').toBeInstanceOf(InvalidArgumentError);
  const error = thrown as InvalidArgumentError;
  expect(error.code).toBe('ERR_INVALID_ARGUMENT');
  for (const fragment of fragments) expect(error.message).toContain(fragment);
}

/** The addon's own checks, reached without the TypeScript layer's. */
const unchecked = native.kernels as unknown as Record<
  'linear' | 'layerNorm' | 'gelu' | 'rmsNorm' | 'siluMultiply' | 'rotary' | 'attention' | 'widen' | 'narrow' | 'setThreads',
  (...args: unknown[]) => void
>;

describe('linear', () => {
  // Every strip shape (3, 2 + 2, 3 + 2, 1 and 2 rows), partial tiles, several column blocks, and
  // depths cut into blocks (over 1024) with a tail that is not a whole vector, and enough rows that
  // x is cut into row chunks (uneven last chunk; one depth block and two).
  const shapes: Array<[m: number, k: number, n: number]> = [
    [1, 67, 131],
    [2, 9, 7],
    [3, 8, 4],
    [4, 16, 25],
    [5, 1, 3],
    [6, 33, 11],
    [16, 768, 37],
    [37, 67, 131],
    [5, 1031, 53],
    [7, 2051, 50],
    [901, 300, 50],
    [503, 1100, 30],
  ];

  it('matches a plain reference on odd shapes, with and without bias', () => {
    shapes.forEach(([m, k, n], index) => {
      const x = randomFloats(m * k, 1 + index);
      const weight = randomFloats(n * k, 100 + index);
      const bias = index % 2 === 0 ? randomFloats(n, 200 + index) : null;
      const out = new Float32Array(m * n);
      linear(out, x, weight, bias, m, k, n);
      expectClose(out, referenceLinear(x, weight, bias, m, k, n));
    });
  });

  it('reads and writes subarrays at their byteOffset and writes nothing outside out', () => {
    const [m, k, n] = [5, 67, 131];
    const x = randomFloats(m * k, 7);
    const weight = randomFloats(n * k, 8);
    const bias = randomFloats(n, 9);
    const out = offsetView(new Float32Array(m * n), 3);
    linear(out, offsetView(x, 1), offsetView(weight, 2), offsetView(bias, 3), m, k, n);
    expectClose(out, referenceLinear(x, weight, bias, m, k, n));
    const backing = new Float32Array(out.buffer);
    expect([...backing.subarray(0, 3), ...backing.subarray(3 + m * n)]).toEqual(new Array(8).fill(12345));
  });

  it('accepts arrays longer than the dimensions need', () => {
    const x = randomFloats(2 * 3 + 4, 10);
    const weight = randomFloats(5 * 3 + 1, 11);
    const out = new Float32Array(2 * 5 + 2).fill(-1);
    linear(out, x, weight, null, 2, 3, 5);
    expectClose(out.subarray(0, 10), referenceLinear(x, weight, null, 2, 3, 5));
    expect([...out.subarray(10)]).toEqual([-1, -1]);
  });
});

describe('layerNorm', () => {
  it('matches a plain reference', () => {
    for (const [rows, cols, seed] of [
      [1, 768, 1],
      [3, 67, 2],
      [5, 1, 3],
      [2, 1031, 4],
    ]) {
      const x = randomFloats(rows * cols, seed, 3);
      const gamma = randomFloats(cols, seed + 10);
      const beta = randomFloats(cols, seed + 20);
      const out = new Float32Array(rows * cols);
      layerNorm(out, x, gamma, beta, rows, cols, 1e-5);
      expectClose(out, referenceLayerNorm(x, gamma, beta, rows, cols, 1e-5));
    }
  });

  it('normalizes in place when out is x, and reads subarrays', () => {
    const [rows, cols] = [4, 131];
    const x = randomFloats(rows * cols, 5, 2);
    const gamma = randomFloats(cols, 6);
    const beta = randomFloats(cols, 7);
    const expected = referenceLayerNorm(x, gamma, beta, rows, cols, 1e-5);
    const inPlace = offsetView(x, 1);
    layerNorm(inPlace, inPlace, offsetView(gamma, 2), offsetView(beta, 3), rows, cols, 1e-5);
    expectClose(inPlace, expected);
  });
});

describe('gelu', () => {
  it("matches GPT-2's tanh approximation, in place, over a subarray", () => {
    const values = randomFloats(1003, 1, 8);
    values.set([0, -0.5, 0.5, -20, 20, -100, 100], 0);
    const view = offsetView(values, 3);
    gelu(view);
    expectClose(view, referenceGelu(values));
    const backing = new Float32Array(view.buffer);
    expect([backing[2], backing[3 + values.length]]).toEqual([12345, 12345]);
  });

  it('vanishes for huge negative inputs, on the vector path too', () => {
    const values = new Float32Array(16).fill(-1e30);
    values[15] = -1e3;
    gelu(values);
    for (const value of values) expect(Math.abs(value)).toBe(0);
  });
});

describe('rmsNorm', () => {
  it('matches a plain reference on odd sizes', () => {
    for (const [rows, cols, seed, eps] of [
      [1, 768, 1, 1e-5],
      [3, 67, 2, 1e-6],
      [5, 1, 3, 1e-5],
      [2, 1031, 4, 0],
      [4, 4096, 5, 1e-5],
    ]) {
      const x = randomFloats(rows * cols, seed, 3);
      const gamma = randomFloats(cols, seed + 10);
      const out = new Float32Array(rows * cols);
      rmsNorm(out, x, gamma, rows, cols, eps);
      expectClose(out, referenceRmsNorm(x, gamma, rows, cols, eps));
    }
  });

  it('normalizes in place when out is x, reads subarrays and writes nothing outside x', () => {
    const [rows, cols] = [3, 131];
    const x = randomFloats(rows * cols, 6, 100);
    const gamma = randomFloats(cols, 7);
    const expected = referenceRmsNorm(x, gamma, rows, cols, 1e-5);
    const inPlace = offsetView(x, 1);
    rmsNorm(inPlace, inPlace, offsetView(gamma, 2), rows, cols, 1e-5);
    expectClose(inPlace, expected);
    const backing = new Float32Array(inPlace.buffer);
    expect([backing[0], backing[1 + rows * cols]]).toEqual([12345, 12345]);
  });
});

describe('siluMultiply', () => {
  // Far below -88 the vector exp clamps, and far above 88 e^-x underflows: both ends, in the vector
  // body (the start) and in the scalar tail (the last elements of 1003).
  const extremes = [0, -0.5, 0.5, -20, 20, -88, -88.5, -89, -100, -1000, -1e30, 88.5, 100, 1000, 1e30];

  function inputs(): { gate: Float32Array; up: Float32Array } {
    const gate = randomFloats(1003, 1, 8);
    gate.set(extremes, 0);
    gate.set([-1000, 1000, -90], 1000);
    return { gate, up: randomFloats(1003, 2, 2) };
  }

  it('matches gate / (1 + exp(-gate)) * up, extreme gates included', () => {
    const { gate, up } = inputs();
    const out = new Float32Array(gate.length);
    siluMultiply(out, gate, up);
    expectClose(out, referenceSiluMultiply(gate, up));
    expect(out.every(Number.isFinite)).toBe(true);
  });

  it('gates in place when out is gate, reads subarrays and writes nothing outside out', () => {
    const { gate, up } = inputs();
    const expected = referenceSiluMultiply(gate, up);
    const inPlace = offsetView(gate, 3);
    siluMultiply(inPlace, inPlace, offsetView(up, 1));
    expectClose(inPlace, expected);
    const backing = new Float32Array(inPlace.buffer);
    expect([backing[2], backing[3 + gate.length]]).toEqual([12345, 12345]);
  });

  it('keeps NaN and accepts empty arrays', () => {
    const out = new Float32Array(9);
    siluMultiply(out, new Float32Array(9).fill(NaN), new Float32Array(9).fill(1));
    expect(out.every(Number.isNaN)).toBe(true);
    expect(() => siluMultiply(new Float32Array(0), new Float32Array(0), new Float32Array(0))).not.toThrow();
  });
});

describe('rotary', () => {
  const cases: Array<[rows: number, heads: number, headDim: number, positions: number[]]> = [
    [6, 5, 64, [0, 1, 17, 4095, 32767, 100000]],
    [3, 3, 2, [100000, 7, 2 ** 31 - 1]],
    [2, 1, 130, [65536, 3]],
    [4, 7, 18, [5, 500001, 0, 123456]],
  ];

  it('matches an f64 rotate_half reference, large positions included', () => {
    cases.forEach(([rows, heads, headDim, positionList], index) => {
      const x = randomFloats(rows * heads * headDim, 1 + index, 2);
      const positions = Int32Array.from(positionList);
      const inverseFrequencies = inverseFrequenciesFor(headDim, index % 2 === 0 ? 10000 : 500000);
      const expected = referenceRotary(x, positions, inverseFrequencies, rows, heads, headDim);
      rotary(x, positions, inverseFrequencies, rows, heads, headDim);
      expectClose(x, expected, 1e-5, 1e-6);
    });
  });

  it('leaves a row at position 0 unchanged', () => {
    const [rows, heads, headDim] = [3, 4, 16];
    const x = randomFloats(rows * heads * headDim, 9);
    const before = x.slice();
    rotary(x, Int32Array.of(0, 5, 0), inverseFrequenciesFor(headDim), rows, heads, headDim);
    const width = heads * headDim;
    expect(x.subarray(0, width)).toEqual(before.subarray(0, width));
    expect(x.subarray(2 * width)).toEqual(before.subarray(2 * width));
    expect(x.subarray(width, 2 * width)).not.toEqual(before.subarray(width, 2 * width));
  });

  it('reads subarrays, ignores spare positions and frequencies, and writes nothing outside rows * heads * headDim', () => {
    const [rows, heads, headDim] = [2, 3, 10];
    const x = randomFloats(rows * heads * headDim, 10);
    const positionBacking = Int32Array.of(-1, -1, 40000, 9, -5);
    const positions = positionBacking.subarray(2);
    const inverseFrequencies = offsetView(Float32Array.from([...inverseFrequenciesFor(headDim), NaN]), 1);
    const expected = referenceRotary(x, positions, inverseFrequencies, rows, heads, headDim);
    const view = offsetView(x, 3);
    rotary(view, positions, inverseFrequencies, rows, heads, headDim);
    expectClose(view, expected, 1e-5, 1e-6);
    const backing = new Float32Array(view.buffer);
    expect([backing[2], backing[3 + x.length]]).toEqual([12345, 12345]);
  });
});

describe('attention', () => {
  const cases: Array<[queries: number, past: number, heads: number, headDim: number]> = [
    [1, 0, 2, 64],
    [5, 0, 3, 13],
    [4, 7, 2, 67],
    [1, 100, 12, 64],
    [9, 20, 1, 8],
  ];

  it('matches a plain reference for prefill and decode, past 0 and past > 0', () => {
    cases.forEach(([queries, past, heads, headDim], index) => {
      const width = heads * headDim;
      const q = randomFloats(queries * width, 1 + index, 2);
      // Rows past past + queries are not valid cache: NaN there shows they are never read.
      const spare = 3;
      const keys = randomFloats((past + queries + spare) * width, 10 + index, 2).fill(NaN, (past + queries) * width);
      const values = randomFloats((past + queries + spare) * width, 20 + index).fill(NaN, (past + queries) * width);
      const out = new Float32Array(queries * width);
      attention(out, q, keys, values, queries, past, heads, headDim);
      expectClose(out, referenceAttention(q, keys, values, queries, past, heads, headDim));
    });
  });

  it('is causal: a key or value after a query position does not change that query', () => {
    const [queries, past, heads, headDim] = [6, 3, 2, 16];
    const width = heads * headDim;
    const q = randomFloats(queries * width, 1);
    const keys = randomFloats((past + queries) * width, 2);
    const values = randomFloats((past + queries) * width, 3);
    const before = new Float32Array(queries * width);
    attention(before, q, keys, values, queries, past, heads, headDim);
    const changed = past + 2;
    keys.fill(50, changed * width, (changed + 1) * width);
    values.fill(-50, changed * width, (changed + 1) * width);
    const after = new Float32Array(queries * width);
    attention(after, q, keys, values, queries, past, heads, headDim);
    for (let query = 0; query < queries; query++) {
      const rows = [before, after].map((array) => [...array.subarray(query * width, (query + 1) * width)]);
      if (past + query < changed) expect(rows[1]).toEqual(rows[0]);
      else expect(rows[1]).not.toEqual(rows[0]);
    }
  });

  it('groups query heads onto kv heads (kvHeads 2 and 1), decode and prefill, past 0 and past > 0', () => {
    const cases: Array<[queries: number, past: number, heads: number, headDim: number, kvHeads: number]> = [
      [1, 0, 8, 16, 2],
      [1, 37, 8, 64, 2],
      [1, 20, 8, 13, 1],
      [5, 0, 8, 16, 1],
      [4, 9, 8, 24, 2],
      [3, 6, 6, 8, 3],
    ];
    cases.forEach(([queries, past, heads, headDim, kvHeads], index) => {
      const kvWidth = kvHeads * headDim;
      const q = randomFloats(queries * heads * headDim, 30 + index, 2);
      // Spare rows of NaN, as above: they must never be read.
      const keys = randomFloats((past + queries + 2) * kvWidth, 40 + index, 2).fill(NaN, (past + queries) * kvWidth);
      const values = randomFloats((past + queries + 2) * kvWidth, 50 + index).fill(NaN, (past + queries) * kvWidth);
      const out = new Float32Array(queries * heads * headDim);
      attention(out, q, keys, values, queries, past, heads, headDim, kvHeads);
      expectClose(out, referenceAttention(q, keys, values, queries, past, heads, headDim, kvHeads));
    });
  });

  it('with a sliding window attends to the last window positions only, decode and prefill, past 0 and past > 0', () => {
    const cases: Array<[queries: number, past: number, heads: number, headDim: number, kvHeads: number, window: number]> = [
      [1, 37, 8, 16, 2, 5],
      [1, 3, 4, 8, 4, 1],
      [1, 2, 4, 8, 2, 10],
      [7, 0, 4, 8, 2, 3],
      [6, 9, 8, 24, 2, 4],
      [5, 20, 6, 8, 3, 12],
    ];
    cases.forEach(([queries, past, heads, headDim, kvHeads, window], index) => {
      const kvWidth = kvHeads * headDim;
      const q = randomFloats(queries * heads * headDim, 60 + index, 2);
      const keys = randomFloats((past + queries) * kvWidth, 70 + index, 2);
      const values = randomFloats((past + queries) * kvWidth, 80 + index);
      const out = new Float32Array(queries * heads * headDim);
      attention(out, q, keys, values, queries, past, heads, headDim, kvHeads, window);
      expectClose(out, referenceAttention(q, keys, values, queries, past, heads, headDim, kvHeads, window));
      // What lies before every query's window is never read: NaN there changes nothing.
      const firstRead = Math.max(0, past + 1 - window);
      if (firstRead > 0) {
        const poisoned = new Float32Array(out.length);
        attention(poisoned, q, keys.slice().fill(NaN, 0, firstRead * kvWidth), values.slice().fill(NaN, 0, firstRead * kvWidth), queries, past, heads, headDim, kvHeads, window);
        expect(poisoned).toEqual(out);
      }
      // A window as long as the sequence is no window.
      const whole = new Float32Array(out.length);
      const unwindowed = new Float32Array(out.length);
      attention(whole, q, keys, values, queries, past, heads, headDim, kvHeads, past + queries);
      attention(unwindowed, q, keys, values, queries, past, heads, headDim, kvHeads);
      expect(whole).toEqual(unwindowed);
    });
  });

  it.each(['bf16', 'f16'] as const)('over a %s cache gives exactly what the f32 widening of that cache gives', (dtype) => {
    const toBits = dtype === 'bf16' ? floatToBf16 : floatToF16;
    const toFloat = dtype === 'bf16' ? bf16ToFloat : f16ToFloat;
    const cases: Array<[queries: number, past: number, heads: number, headDim: number, kvHeads: number, window: number]> = [
      [1, 37, 8, 16, 2, 0],
      [1, 20, 8, 13, 1, 6],
      [5, 0, 8, 70, 2, 0],
      [4, 9, 6, 24, 3, 5],
    ];
    cases.forEach(([queries, past, heads, headDim, kvHeads, window], index) => {
      const size = (past + queries) * kvHeads * headDim;
      const q = randomFloats(queries * heads * headDim, 90 + index, 2);
      const keyBits = Uint16Array.from(randomFloats(size, 91 + index, 2), toBits);
      const valueBits = Uint16Array.from(randomFloats(size, 92 + index), toBits);
      const half = new Float32Array(q.length);
      const full = new Float32Array(q.length);
      attention(half, q, { dtype, bits: keyBits }, { dtype, bits: valueBits }, queries, past, heads, headDim, kvHeads, window);
      attention(full, q, Float32Array.from(keyBits, toFloat), Float32Array.from(valueBits, toFloat), queries, past, heads, headDim, kvHeads, window);
      expect(half).toEqual(full);
    });
    expectInvalid(() => attention(new Float32Array(8), new Float32Array(8), { dtype, bits: new Uint16Array(8) }, new Float32Array(8), 1, 0, 1, 8), 'keys and values must be kept in one dtype');
  });

  it('with kvHeads equal to heads is the same as without it', () => {
    const [queries, past, heads, headDim] = [3, 4, 4, 8];
    const width = heads * headDim;
    const q = randomFloats(queries * width, 60);
    const keys = randomFloats((past + queries) * width, 61);
    const values = randomFloats((past + queries) * width, 62);
    const [implicit, explicit] = [new Float32Array(queries * width), new Float32Array(queries * width)];
    attention(implicit, q, keys, values, queries, past, heads, headDim);
    attention(explicit, q, keys, values, queries, past, heads, headDim, heads);
    expect(explicit).toEqual(implicit);
  });

  it('with grouped kv heads is causal, and a kv head reaches only its own group of query heads', () => {
    const [queries, past, heads, headDim, kvHeads] = [4, 2, 8, 8, 2];
    const [width, kvWidth] = [heads * headDim, kvHeads * headDim];
    const q = randomFloats(queries * width, 70);
    const keys = randomFloats((past + queries) * kvWidth, 71);
    const values = randomFloats((past + queries) * kvWidth, 72);
    const before = new Float32Array(queries * width);
    attention(before, q, keys, values, queries, past, heads, headDim, kvHeads);
    // Kv head 1 at one position: query heads 4..7 read it, 0..3 do not.
    const changed = past + 1;
    keys.fill(50, changed * kvWidth + headDim, (changed + 1) * kvWidth);
    values.fill(-50, changed * kvWidth + headDim, (changed + 1) * kvWidth);
    const after = new Float32Array(queries * width);
    attention(after, q, keys, values, queries, past, heads, headDim, kvHeads);
    for (let query = 0; query < queries; query++) {
      for (let head = 0; head < heads; head++) {
        const begin = query * width + head * headDim;
        const rows = [before, after].map((array) => [...array.subarray(begin, begin + headDim)]);
        if (past + query < changed || head < 4) expect(rows[1], `query ${query} head ${head}`).toEqual(rows[0]);
        else expect(rows[1], `query ${query} head ${head}`).not.toEqual(rows[0]);
      }
    }
  });

  it('reads and writes subarrays', () => {
    const [queries, past, heads, headDim] = [3, 5, 2, 12];
    const width = heads * headDim;
    const q = randomFloats(queries * width, 4);
    const keys = randomFloats((past + queries) * width, 5);
    const values = randomFloats((past + queries) * width, 6);
    const out = offsetView(new Float32Array(queries * width), 1);
    attention(out, offsetView(q, 2), offsetView(keys, 3), offsetView(values, 1), queries, past, heads, headDim);
    expectClose(out, referenceAttention(q, keys, values, queries, past, heads, headDim));
  });
});

describe('linear with 16-bit weights', () => {
  const shapes: Array<[m: number, k: number, n: number]> = [[1, 67, 131], [3, 8, 4], [4, 16, 25], [5, 1, 3], [16, 768, 37], [5, 1031, 53], [7, 2051, 50], [901, 300, 50]];
  const narrow = { bf16: floatToBf16, f16: floatToF16 };
  const widen = { bf16: bf16ToFloat, f16: f16ToFloat };

  it.each(['bf16', 'f16'] as const)('%s weights give exactly what their f32 widening gives, tails, depth blocks and row chunks included', (dtype) => {
    shapes.forEach(([m, k, n], index) => {
      const x = randomFloats(m * k, 1 + index);
      const bits = Uint16Array.from(randomFloats(n * k, 100 + index), narrow[dtype]);
      const widened = Float32Array.from(bits, widen[dtype]);
      const bias = index % 2 === 0 ? randomFloats(n, 200 + index) : null;
      const half = new Float32Array(m * n);
      const full = new Float32Array(m * n);
      linear(half, x, { dtype, bits }, bias, m, k, n);
      linear(full, x, widened, bias, m, k, n);
      expect(half).toEqual(full);
      expectClose(half, referenceLinear(x, widened, bias, m, k, n));
    });
  });

  it('widens f16 subnormals, infinities and NaN, and reads weight subarrays', () => {
    // Smallest and largest subnormal, -0, ±infinity, NaN, 1, the largest finite half.
    const special = Uint16Array.from([0x0001, 0x03ff, 0x8000, 0x7c00, 0xfc00, 0x7e00, 0x3c00, 0x7bff]);
    const rows = new Float32Array(special.length);
    readRows(rows, { dtype: 'f16', bits: special }, special.length, 0);
    expect(Array.from(rows)).toEqual(Array.from(special, f16ToFloat));
    expect(Object.is(rows[2], -0)).toBe(true);
    // A weight matrix at an odd element offset, so its 16-byte loads are unaligned.
    const [m, k, n] = [3, 21, 5];
    const backing = new Uint16Array(n * k + 3).fill(0x7e00);
    const bits = backing.subarray(1, 1 + n * k);
    bits.set(Uint16Array.from(randomFloats(n * k, 4), floatToBf16));
    const x = randomFloats(m * k, 5);
    const out = new Float32Array(m * n);
    linear(out, x, { dtype: 'bf16', bits }, null, m, k, n);
    expectClose(out, referenceLinear(x, Float32Array.from(bits, bf16ToFloat), null, m, k, n));
  });

  it('readRows copies f32 rows and widens 16-bit ones, and checks its range', () => {
    const table = randomFloats(6 * 4, 9);
    const out = new Float32Array(8);
    readRows(out, table, 4, 3, 2);
    expect(out).toEqual(table.subarray(12, 20));
    const bits = Uint16Array.from(table, floatToBf16);
    readRows(out, { dtype: 'bf16', bits }, 4, 4, 2);
    expect(Array.from(out)).toEqual(Array.from(bits.subarray(16, 24), bf16ToFloat));
    expectInvalid(() => readRows(out, table, 4, 5, 2), 'rows [5, 7) of width 4 need 28 values, the matrix has 24');
    expectInvalid(() => readRows(new Float32Array(3), table, 4, 0), 'out must hold at least');
    expectInvalid(() => readRows(out, { dtype: 'bf16', bits: new Float32Array(24) as unknown as Uint16Array }, 4, 0), 'matrix.bits must be a Uint16Array');
  });
});

describe('linear with int8 weights', () => {
  it('quantizes each row to its largest magnitude / 127 and computes with the dequantized matrix', () => {
    const shapes: Array<[m: number, k: number, n: number]> = [[1, 67, 131], [3, 8, 4], [5, 1031, 53], [901, 300, 50], [7, 2051, 30]];
    shapes.forEach(([m, k, n], index) => {
      const weights = randomFloats(n * k, 700 + index, 3);
      const quantized = quantizeRows(weights, n, k);
      const dequantized = Float32Array.from(quantized.values, (value, position) => value * quantized.scales[Math.floor(position / k)]);
      // Every weight within half a step of its row's scale.
      weights.forEach((weight, position) => expect(Math.abs(weight - dequantized[position])).toBeLessThanOrEqual(quantized.scales[Math.floor(position / k)] / 2 + 1e-7));
      const x = randomFloats(m * k, 800 + index);
      const bias = index % 2 === 0 ? randomFloats(n, 900 + index) : null;
      const out = new Float32Array(m * n);
      linear(out, x, quantized, bias, m, k, n);
      expectClose(out, referenceLinear(x, dequantized, bias, m, k, n), 1e-4, 1e-4);
      // The same with kernel threads, bit for bit.
      const threaded = new Float32Array(m * n);
      try {
        setKernelThreads(2);
        linear(threaded, x, quantized, bias, m, k, n);
      } finally {
        setKernelThreads(1);
      }
      expect(threaded).toEqual(out);
    });
    // A zero row keeps scale 0; the largest magnitude maps to ±127; rows read back dequantized.
    const quantized = quantizeRows(Float32Array.from([0, 0, 0, 2, -4, 1]), 2, 3);
    expect(Array.from(quantized.scales)).toEqual([0, Math.fround(4 / 127)]);
    expect(Array.from(quantized.values)).toEqual([0, 0, 0, 64, -127, 32]);
    const rows = new Float32Array(3);
    readRows(rows, quantized, 3, 1);
    expect(Array.from(rows)).toEqual([64, -127, 32].map((value) => value * Math.fround(4 / 127)).map(Math.fround));
    expectInvalid(() => quantizeRows(Float32Array.from([1, Infinity]), 1, 2), 'row 0 holds a value that is not finite');
    expectInvalid(() => linear(new Float32Array(2), new Float32Array(3), { ...quantized, scales: new Float32Array(1) }, null, 1, 3, 2), 'weight.scales must hold at least n = 2 floats, got 1');
    expectInvalid(() => unchecked.linear(new Float32Array(2), new Float32Array(3), new Int8Array(6), null, 1, 3, 2, 'int8'), 'scales must be a Float32Array');
    expectInvalid(() => unchecked.linear(new Float32Array(2), new Float32Array(3), new Uint8Array(6), null, 1, 3, 2, 'int8', new Float32Array(2)), 'weight in int8 must be an Int8Array');
  });
});

describe('kernel threads', () => {
  it('split matmuls and attention across threads without changing a single result', () => {
    const shapes: Array<[m: number, k: number, n: number]> = [[1, 512, 2048], [7, 2051, 300], [901, 300, 50], [16, 96, 1000], [3, 64, 24]];
    const run = () => {
      const outputs: Float32Array[] = [];
      shapes.forEach(([m, k, n], index) => {
        const x = randomFloats(m * k, 300 + index);
        const weights = randomFloats(n * k, 400 + index);
        for (const weight of [weights, { dtype: 'bf16' as const, bits: Uint16Array.from(weights, floatToBf16) }]) {
          const out = new Float32Array(m * n);
          linear(out, x, weight, randomFloats(n, 500 + index), m, k, n);
          outputs.push(out);
        }
      });
      for (const [queries, past] of [[1, 300], [40, 90]]) {
        const [heads, headDim, kvHeads] = [16, 64, 4];
        const out = new Float32Array(queries * heads * headDim);
        const cache = (seed: number) => randomFloats((past + queries) * kvHeads * headDim, seed);
        attention(out, randomFloats(out.length, 600 + queries), cache(601), cache(602), queries, past, heads, headDim, kvHeads);
        outputs.push(out);
      }
      return outputs;
    };
    try {
      const single = run();
      for (const threads of [2, 3]) {
        setKernelThreads(threads);
        expect(kernelThreads()).toBe(threads);
        run().forEach((out, index) => expect(out, `output ${index} with ${threads} threads`).toEqual(single[index]));
      }
    } finally {
      setKernelThreads(1);
    }
    expect(kernelThreads()).toBe(1);
  });

  it('start and stop cleanly, however often, with a kernel call right after each start', () => {
    // A worker that started after the first job was handed out once missed it, and the call never returned.
    const x = randomFloats(64 * 256, 1);
    const weight = randomFloats(256 * 256, 2);
    const out = new Float32Array(64 * 256);
    try {
      for (let round = 0; round < 200; round++) {
        setKernelThreads(2 + (round % 2));
        linear(out, x, weight, null, 64, 256, 256);
        setKernelThreads(1);
      }
    } finally {
      setKernelThreads(1);
    }
    for (const bad of [0, 1.5, -1]) expectInvalid(() => setKernelThreads(bad), 'setKernelThreads: threads must be a positive integer');
    expectInvalid(() => unchecked.setThreads(5000), 'setThreads: threads must be at most 1024, got 5000');
  });
});

describe('narrow', () => {
  it.each(['bf16', 'f16'] as const)('rounds to %s as the conversions in dtype.ts do: ties to even, subnormals, overflow, NaN', (dtype) => {
    const toBits = dtype === 'bf16' ? floatToBf16 : floatToF16;
    const special = [0, -0, 1, -2.5, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 2 ** -20, 2 ** -25, 3 * 2 ** -26, 65504, 65519, 65520, 1e10, -1e38, Infinity, -Infinity, NaN];
    const x = Float32Array.from([...special, ...randomFloats(3000, 7, 100)]);
    const out = new Uint16Array(x.length + 3).fill(0xabcd);
    narrow({ dtype, bits: out.subarray(1, 1 + x.length) }, x);
    const wanted = Array.from(x, toBits);
    const got = Array.from(out.subarray(1, 1 + x.length));
    // Both NaN patterns are NaN; compare them as such.
    const isNaNBits = (bits: number) => (dtype === 'bf16' ? (bits & 0x7f80) === 0x7f80 && (bits & 0x7f) !== 0 : (bits & 0x7c00) === 0x7c00 && (bits & 0x3ff) !== 0);
    expect(got.map((bits, index) => (isNaNBits(bits) && isNaNBits(wanted[index]) ? -1 : bits))).toEqual(wanted.map((bits) => (isNaNBits(bits) ? -1 : bits)));
    expect([out[0], out[x.length + 1]]).toEqual([0xabcd, 0xabcd]);
    expectInvalid(() => narrow({ dtype, bits: new Uint16Array(2) }, new Float32Array(3)), "out must hold x's 3 values, got 2");
  });
});

describe('argument errors', () => {
  const floats = (count: number) => new Float32Array(count);
  // Each case runs against the TypeScript face and the addon directly: both must refuse it.
  const layers = [
    ['kernels.ts', { linear, layerNorm, gelu, rmsNorm, siluMultiply, rotary, attention } as unknown as typeof unchecked],
    ['addon', unchecked],
  ] as const;

  for (const [layer, kernels] of layers) {
    it(`${layer}: linear checks types, lengths, dimensions and overlap`, () => {
      const valid = () => [floats(6), floats(8), floats(12), floats(3), 2, 4, 3] as unknown[];
      const withArgument = (index: number, value: unknown) => {
        const args = valid();
        args[index] = value;
        return () => kernels.linear(...args);
      };
      expect(() => kernels.linear(...valid())).not.toThrow();
      expect(() => kernels.linear(floats(6), floats(8), floats(12), null, 2, 4, 3)).not.toThrow();
      expectInvalid(withArgument(0, floats(5)), 'out must hold at least', '= 6 floats, got 5');
      expectInvalid(withArgument(1, floats(7)), 'x must hold at least', '= 8 floats, got 7');
      expectInvalid(withArgument(2, floats(11)), 'weight must hold at least', '= 12 floats, got 11');
      expectInvalid(withArgument(3, floats(2)), 'bias must hold at least', '= 3 floats, got 2');
      expectInvalid(withArgument(1, new Float64Array(8)), 'x must be a Float32Array', 'Float64Array');
      expectInvalid(withArgument(2, [1, 2, 3]), 'weight must be a Float32Array');
      expectInvalid(withArgument(0, undefined), 'out must be a Float32Array');
      expectInvalid(withArgument(4, 1.5), 'm must be a', 'integer');
      expectInvalid(withArgument(5, 0), 'k must be a', 'positive integer');
      expectInvalid(withArgument(6, -3), 'n must be a', 'positive integer');
      expectInvalid(withArgument(6, NaN), 'n must be a', 'integer');
      expectInvalid(withArgument(4, '2'), 'm must be a', 'integer');
      expectInvalid(withArgument(5, 2 ** 60), 'k must be a positive integer');
      // Dimensions whose products no array could hold (the second overflows 64 bits).
      expectInvalid(() => kernels.linear(floats(6), floats(8), floats(12), null, 2 ** 30, 4, 2 ** 30), 'm * n');
      expectInvalid(() => kernels.linear(floats(6), floats(8), floats(12), null, 2 ** 40, 4, 2 ** 40), 'm * n', 'too large');
      const shared = floats(20);
      expectInvalid(() => kernels.linear(shared.subarray(0, 6), shared.subarray(4, 12), floats(12), null, 2, 4, 3), 'out must not overlap x');
    });

    it(`${layer}: linear checks 16-bit weights`, () => {
      // kernels.ts takes { dtype, bits }; the addon takes the bits and the dtype as its last argument.
      const call = (bits: unknown, dtype: unknown, out = floats(6)) =>
        layer === 'addon' ? () => kernels.linear(out, floats(8), bits, null, 2, 4, 3, dtype) : () => kernels.linear(out, floats(8), { dtype, bits }, null, 2, 4, 3);
      expect(call(new Uint16Array(12), 'bf16')).not.toThrow();
      expect(call(new Uint16Array(12), 'f16')).not.toThrow();
      expectInvalid(call(new Uint16Array(11), 'bf16'), 'weight must hold at least n * k = 3 * 4 = 12 16-bit values, got 11');
      expectInvalid(call(floats(12), 'f16'), 'must be a Uint16Array', 'Float32Array');
      const shared = new Uint16Array(40);
      const out = new Float32Array(shared.buffer, 0, 6);
      expectInvalid(call(shared.subarray(8, 20), 'bf16', out), 'out must not overlap weight');
      if (layer === 'addon') {
        expectInvalid(call(new Uint16Array(12), 'f8'), "dtype must be 'f32', 'bf16', 'f16' or 'int8'", "'f8'");
        expectInvalid(call(new Uint16Array(12), 7), "dtype must be 'f32', 'bf16', 'f16' or 'int8'");
        expectInvalid(() => kernels.widen(floats(2), new Uint16Array(4), 'bf16', 3), 'out must hold at least count = 3');
        expectInvalid(() => kernels.widen(floats(4), new Uint16Array(2), 'f16', 3), 'bits must hold at least count = 3');
        expectInvalid(() => kernels.widen(floats(4), floats(4), 'f32', 3), "dtype must be 'bf16' or 'f16'");
      } else {
        // An object that is no HalfMatrix is not a Float32Array either.
        expectInvalid(call(new Uint16Array(12), 'f8'), 'weight must be a Float32Array', 'an object');
      }
    });

    it(`${layer}: layerNorm checks types, lengths, dimensions and eps`, () => {
      const valid = () => [floats(6), floats(6), floats(3), floats(3), 2, 3, 1e-5] as unknown[];
      const withArgument = (index: number, value: unknown) => {
        const args = valid();
        args[index] = value;
        return () => kernels.layerNorm(...args);
      };
      expect(() => kernels.layerNorm(...valid())).not.toThrow();
      expectInvalid(withArgument(0, floats(5)), 'out must hold at least', '= 6 floats, got 5');
      expectInvalid(withArgument(1, floats(5)), 'x must hold at least', '= 6 floats, got 5');
      expectInvalid(withArgument(2, floats(2)), 'gamma must hold at least', '= 3 floats, got 2');
      expectInvalid(withArgument(3, floats(2)), 'beta must hold at least', '= 3 floats, got 2');
      expectInvalid(withArgument(2, new Int32Array(3)), 'gamma must be a Float32Array');
      expectInvalid(withArgument(3, null), 'beta must be a Float32Array');
      expectInvalid(withArgument(4, 2.5), 'rows must be a', 'integer');
      expectInvalid(withArgument(5, 0), 'cols must be a', 'positive integer');
      expectInvalid(withArgument(6, -1), 'eps must be a finite number');
      expectInvalid(withArgument(6, Infinity), 'eps must be a finite number');
      const shared = floats(12);
      expectInvalid(() => kernels.layerNorm(shared.subarray(1, 7), shared.subarray(0, 6), floats(3), floats(3), 2, 3, 1e-5), 'out must not overlap x');
    });

    it(`${layer}: gelu takes only a Float32Array`, () => {
      expect(() => kernels.gelu(floats(0))).not.toThrow();
      expectInvalid(() => kernels.gelu(new Float64Array(4)), 'x must be a Float32Array');
      expectInvalid(() => kernels.gelu([1, 2]), 'x must be a Float32Array');
      expectInvalid(() => kernels.gelu(undefined), 'x must be a Float32Array');
    });

    it(`${layer}: attention checks types, lengths, dimensions and overlap`, () => {
      // queries 2, past 1, heads 2, headDim 3: q and out hold 12, keys and values 18.
      const valid = () => [floats(12), floats(12), floats(18), floats(18), 2, 1, 2, 3] as unknown[];
      const withArgument = (index: number, value: unknown) => {
        const args = valid();
        args[index] = value;
        return () => kernels.attention(...args);
      };
      expect(() => kernels.attention(...valid())).not.toThrow();
      expect(withArgument(5, 0)).not.toThrow();
      expectInvalid(withArgument(0, floats(11)), 'out must hold at least', '= 12 floats, got 11');
      expectInvalid(withArgument(1, floats(11)), 'q must hold at least', '= 12 floats, got 11');
      expectInvalid(withArgument(2, floats(17)), 'keys must hold at least', '= 18 floats, got 17');
      expectInvalid(withArgument(3, floats(17)), 'values must hold at least', '= 18 floats, got 17');
      expectInvalid(withArgument(5, 2), 'keys must hold at least (past + queries) * kvHeads * headDim = 4 * 2 * 3 = 24 floats, got 18');
      expectInvalid(withArgument(3, new Uint8Array(72)), 'values must be a Float32Array');
      expectInvalid(withArgument(4, 0), 'queries must be a', 'positive integer');
      expectInvalid(withArgument(5, -1), 'past must be a', 'non-negative integer');
      expectInvalid(withArgument(6, 1.25), 'heads must be a', 'integer');
      expectInvalid(withArgument(7, undefined), 'headDim must be a', 'integer');
      const shared = floats(40);
      expectInvalid(
        () => kernels.attention(shared.subarray(0, 12), floats(12), shared.subarray(10, 28), floats(18), 2, 1, 2, 3),
        'out must not overlap keys',
      );
    });

    it(`${layer}: attention checks kvHeads`, () => {
      // queries 2, past 1, heads 4, headDim 3, kvHeads 2: q and out hold 24, keys and values 18.
      const valid = () => [floats(24), floats(24), floats(18), floats(18), 2, 1, 4, 3, 2] as unknown[];
      const withArgument = (index: number, value: unknown) => {
        const args = valid();
        args[index] = value;
        return () => kernels.attention(...args);
      };
      expect(() => kernels.attention(...valid())).not.toThrow();
      expect(withArgument(8, 1)).not.toThrow();
      expect(withArgument(8, undefined)).toThrow('(past + queries) * kvHeads * headDim = 3 * 4 * 3 = 36 floats, got 18');
      expectInvalid(withArgument(2, floats(17)), 'keys must hold at least (past + queries) * kvHeads * headDim = 3 * 2 * 3 = 18 floats, got 17');
      expectInvalid(withArgument(3, floats(17)), 'values must hold at least', '= 18 floats, got 17');
      expectInvalid(withArgument(8, 3), 'heads must be a multiple of kvHeads, got heads 4 and kvHeads 3');
      expectInvalid(withArgument(8, 8), 'heads must be a multiple of kvHeads, got heads 4 and kvHeads 8');
      expectInvalid(withArgument(8, 0), 'kvHeads must be a', 'positive integer');
      expectInvalid(withArgument(8, 1.5), 'kvHeads must be a', 'integer');
      expectInvalid(withArgument(8, null), 'kvHeads must be a', 'integer');
      const withWindow = (window: unknown) => () => kernels.attention(...valid(), window);
      expect(withWindow(0)).not.toThrow();
      expect(withWindow(1)).not.toThrow();
      expectInvalid(withWindow(-1), 'window must be a non-negative integer');
      expectInvalid(withWindow(2.5), 'window must be a non-negative integer');
      if (layer === 'addon') {
        // A 16-bit cache: Uint16Arrays and the dtype after the window.
        const halves = (keys: unknown, values: unknown, dtype: unknown) => () => kernels.attention(floats(24), floats(24), keys, values, 2, 1, 4, 3, 2, 0, dtype);
        expect(halves(new Uint16Array(18), new Uint16Array(18), 'bf16')).not.toThrow();
        expectInvalid(halves(new Uint16Array(17), new Uint16Array(18), 'f16'), 'keys must hold at least', '= 18 16-bit values, got 17');
        expectInvalid(halves(floats(18), floats(18), 'bf16'), 'keys in bf16 must be a Uint16Array', 'Float32Array');
        expectInvalid(halves(new Uint16Array(18), new Uint16Array(18), 'f8'), "keys's dtype must be 'f32', 'bf16', 'f16' or 'int8'");
        expectInvalid(() => kernels.narrow(new Uint16Array(2), floats(3), 'bf16', 3), 'out must hold at least count = 3');
        expectInvalid(() => kernels.narrow(new Uint16Array(4), floats(3), 'f32', 3), "dtype must be 'bf16' or 'f16'");
      }
    });

    it(`${layer}: rmsNorm checks types, lengths, dimensions, eps and overlap`, () => {
      const valid = () => [floats(6), floats(6), floats(3), 2, 3, 1e-5] as unknown[];
      const withArgument = (index: number, value: unknown) => {
        const args = valid();
        args[index] = value;
        return () => kernels.rmsNorm(...args);
      };
      expect(() => kernels.rmsNorm(...valid())).not.toThrow();
      const same = floats(6);
      expect(() => kernels.rmsNorm(same, same, floats(3), 2, 3, 1e-5)).not.toThrow();
      expectInvalid(withArgument(0, floats(5)), 'out must hold at least rows * cols = 2 * 3 = 6 floats, got 5');
      expectInvalid(withArgument(1, floats(5)), 'x must hold at least', '= 6 floats, got 5');
      expectInvalid(withArgument(2, floats(2)), 'gamma must hold at least cols = 3 floats, got 2');
      expectInvalid(withArgument(2, new Float64Array(3)), 'gamma must be a Float32Array');
      expectInvalid(withArgument(1, undefined), 'x must be a Float32Array');
      expectInvalid(withArgument(3, 0), 'rows must be a', 'positive integer');
      expectInvalid(withArgument(4, 1.5), 'cols must be a', 'integer');
      expectInvalid(withArgument(5, -1), 'eps must be a finite number');
      expectInvalid(withArgument(5, NaN), 'eps must be a finite number');
      expectInvalid(withArgument(5, undefined), 'eps must be a finite number');
      const shared = floats(12);
      expectInvalid(() => kernels.rmsNorm(shared.subarray(1, 7), shared.subarray(0, 6), floats(3), 2, 3, 1e-5), 'out must not overlap x');
      expectInvalid(() => kernels.rmsNorm(shared.subarray(0, 6), floats(6), shared.subarray(5, 8), 2, 3, 1e-5), 'out must not overlap gamma');
    });

    it(`${layer}: siluMultiply checks types, lengths and overlap`, () => {
      const valid = () => [floats(5), floats(5), floats(5)] as unknown[];
      const withArgument = (index: number, value: unknown) => {
        const args = valid();
        args[index] = value;
        return () => kernels.siluMultiply(...args);
      };
      expect(() => kernels.siluMultiply(...valid())).not.toThrow();
      const same = floats(5);
      expect(() => kernels.siluMultiply(same, same, floats(5))).not.toThrow();
      expectInvalid(withArgument(1, floats(4)), 'gate must have the length of out (5), got 4');
      expectInvalid(withArgument(2, floats(6)), 'up must have the length of out (5), got 6');
      expectInvalid(withArgument(0, floats(4)), 'gate must have the length of out (4), got 5');
      expectInvalid(withArgument(0, new Float64Array(5)), 'out must be a Float32Array', 'Float64Array');
      expectInvalid(withArgument(1, [1, 2, 3, 4, 5]), 'gate must be a Float32Array');
      expectInvalid(withArgument(2, null), 'up must be a Float32Array');
      const shared = floats(12);
      expectInvalid(() => kernels.siluMultiply(shared.subarray(0, 5), shared.subarray(1, 6), floats(5)), 'out must not overlap gate');
      expectInvalid(() => kernels.siluMultiply(shared.subarray(0, 5), floats(5), shared.subarray(4, 9)), 'out must not overlap up');
      expectInvalid(() => kernels.siluMultiply(same, floats(5), same), 'out must not overlap up');
    });

    it(`${layer}: rotary checks types, lengths, dimensions, positions and overlap`, () => {
      // rows 2, heads 3, headDim 4: x holds 24, positions 2, inverseFrequencies 2.
      const valid = () => [floats(24), Int32Array.of(0, 5), floats(2), 2, 3, 4] as unknown[];
      const withArgument = (index: number, value: unknown) => {
        const args = valid();
        args[index] = value;
        return () => kernels.rotary(...args);
      };
      expect(() => kernels.rotary(...valid())).not.toThrow();
      expectInvalid(withArgument(0, floats(23)), 'x must hold at least rows * heads * headDim = 2 * 3 * 4 = 24 floats, got 23');
      expectInvalid(withArgument(1, Int32Array.of(0)), 'positions must hold at least rows = 2 integers, got 1');
      expectInvalid(withArgument(2, floats(1)), 'inverseFrequencies must hold at least headDim / 2 = 2 floats, got 1');
      expectInvalid(withArgument(5, 3), 'headDim must be even, got 3');
      expectInvalid(withArgument(5, 0), 'headDim must be a', 'positive integer');
      expectInvalid(withArgument(3, 0), 'rows must be a', 'positive integer');
      expectInvalid(withArgument(4, -1), 'heads must be a', 'positive integer');
      expectInvalid(withArgument(1, Int32Array.of(0, -1)), 'positions[1] must be >= 0, got -1');
      expectInvalid(withArgument(1, Int32Array.of(-2147483648, 0)), 'positions[0] must be >= 0, got -2147483648');
      expectInvalid(withArgument(1, Float32Array.of(0, 1)), 'positions must be an Int32Array', 'Float32Array');
      expectInvalid(withArgument(1, Uint32Array.of(0, 1)), 'positions must be an Int32Array', 'Uint32Array');
      expectInvalid(withArgument(1, [0, 1]), 'positions must be an Int32Array', 'an Array');
      expectInvalid(withArgument(0, new Float64Array(24)), 'x must be a Float32Array');
      expectInvalid(withArgument(2, undefined), 'inverseFrequencies must be a Float32Array');
      const shared = new ArrayBuffer(4 * 30);
      expectInvalid(() => kernels.rotary(new Float32Array(shared, 0, 24), new Int32Array(shared, 4 * 23, 2), floats(2), 2, 3, 4), 'x must not overlap positions');
      expectInvalid(
        () => kernels.rotary(new Float32Array(shared, 4 * 6, 24), Int32Array.of(0, 5), new Float32Array(shared, 4 * 5, 2), 2, 3, 4),
        'x must not overlap inverseFrequencies',
      );
      // Spare positions and frequencies past what the shape needs may share x's buffer.
      expect(() => kernels.rotary(new Float32Array(shared, 0, 24), new Int32Array(shared, 4 * 24, 2), new Float32Array(shared, 4 * 26, 2), 2, 3, 4)).not.toThrow();
    });
  }
});
