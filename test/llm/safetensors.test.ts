import { mkdir, mkdtemp, open, readFile, readdir, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { InvalidArgumentError, ModelLoadError } from '../../lib/errors.js';
import { f16ToFloat } from '../../lib/gpu/dtype.js';
import { Checkpoint, writeSafetensors, writeShardedCheckpoint } from '../../lib/llm/safetensors.js';
import type { WritableTensor } from '../../lib/llm/safetensors.js';

let directory: string;
let fileCount = 0;

beforeAll(async () => {
  directory = await mkdtemp(join(tmpdir(), 'trellis-safetensors-'));
});

afterAll(async () => {
  await rm(directory, { recursive: true, force: true });
});

function freshPath(name = 'model.safetensors'): string {
  fileCount += 1;
  return join(directory, `${fileCount}-${name}`);
}

/** A file with the header and data given as is, to hand-craft broken files. */
async function writeRaw(header: unknown, data: Uint8Array = new Uint8Array(0), declaredLength?: bigint): Promise<string> {
  const json = header instanceof Uint8Array ? Buffer.from(header) : Buffer.from(typeof header === 'string' ? header : JSON.stringify(header));
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(declaredLength ?? BigInt(json.length));
  const path = freshPath();
  await writeFile(path, Buffer.concat([length, json, data]));
  return path;
}

/** The error `promise` rejects with, checked to be a ModelLoadError with `code` whose message names `fragment`. */
async function expectModelLoadError(promise: Promise<unknown>, code: string, fragment: string): Promise<ModelLoadError> {
  const error = await promise.then(
    () => undefined,
    (caught: unknown) => caught,
  );
  expect(error).toBeInstanceOf(ModelLoadError);
  expect((error as ModelLoadError).code).toBe(code);
  expect((error as ModelLoadError).message).toContain(fragment);
  return error as ModelLoadError;
}

async function expectInvalidArgument(promise: Promise<unknown>, fragments: string[]): Promise<void> {
  const error = await promise.then(
    () => undefined,
    (caught: unknown) => caught,
  );
  expect(error).toBeInstanceOf(InvalidArgumentError);
  for (const fragment of fragments) expect((error as Error).message).toContain(fragment);
}

function sequence(length: number, scale = 1): Float32Array {
  const data = new Float32Array(length);
  for (let index = 0; index < length; index++) data[index] = index * scale;
  return data;
}

/** Deterministic values spread over several binades, both signs. */
function pseudoRandom(length: number, seed = 12345): Float32Array {
  const data = new Float32Array(length);
  let state = seed;
  for (let index = 0; index < length; index++) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    data[index] = ((state / 2 ** 32) * 2 - 1) * 2 ** ((index % 9) - 4);
  }
  return data;
}

/** Rows [rowStart, rowEnd) and columns [columnStart, columnEnd) of a row-major matrix. */
function expectedSlice(data: Float32Array, columnCount: number, rows: [number, number], columns: [number, number]): Float32Array {
  const width = columns[1] - columns[0];
  const result = new Float32Array((rows[1] - rows[0]) * width);
  for (let row = rows[0]; row < rows[1]; row++) {
    result.set(data.subarray(row * columnCount + columns[0], row * columnCount + columns[1]), (row - rows[0]) * width);
  }
  return result;
}

/** Element-for-element equality; vitest's deep equality is far too slow for arrays of millions. */
function expectSameFloats(actual: Float32Array, expected: Float32Array): void {
  expect(actual.length).toBe(expected.length);
  const same = Buffer.from(actual.buffer, actual.byteOffset, actual.byteLength).equals(Buffer.from(expected.buffer, expected.byteOffset, expected.byteLength));
  if (!same) {
    const index = actual.findIndex((value, position) => !Object.is(value, expected[position]));
    expect(actual[index], `element ${index}`).toBe(expected[index]);
  }
}

describe('round trip', () => {
  const exact = new Float32Array([0, 1, -2, 0.5, 1024, -0.25, 3.5, -65280, 2 ** -14, -0, 96, 0.375]);

  it.each(['F32', 'F16', 'BF16'] as const)('writes and reads exactly representable %s values', async (dtype) => {
    const path = freshPath();
    await writeSafetensors(path, { weight: { dtype, shape: [3, 4], data: exact } });
    await using checkpoint = await Checkpoint.open(path);
    const info = checkpoint.info('weight');
    expect(info).toMatchObject({ name: 'weight', dtype, shape: [3, 4], byteLength: 12 * (dtype === 'F32' ? 4 : 2), file: path });
    // The header and its length prefix are padded to a multiple of 8 bytes.
    expect(info.byteOffset % 8).toBe(0);
    expect(Array.from(await checkpoint.readFloat32('weight'))).toEqual(Array.from(exact));
  });

  it('keeps random values within each half type\'s rounding error', async () => {
    const data = pseudoRandom(5000);
    const path = freshPath();
    await writeSafetensors(path, {
      full: { dtype: 'F32', shape: [50, 100], data },
      half: { dtype: 'F16', shape: [50, 100], data },
      brain: { dtype: 'BF16', shape: [5000], data },
    });
    await using checkpoint = await Checkpoint.open(path);
    expectSameFloats(await checkpoint.readFloat32('full'), data);
    const half = await checkpoint.readFloat32('half');
    const brain = await checkpoint.readFloat32('brain');
    const far: string[] = [];
    for (let index = 0; index < data.length; index++) {
      // Half rounding: 2^-11 relative for normal values, 2^-25 absolute below 2^-14.
      if (!(Math.abs(half[index] - data[index]) <= Math.max(Math.abs(data[index]) * 2 ** -11, 2 ** -25))) far.push(`F16 ${index}: ${data[index]} read ${half[index]}`);
      if (!(Math.abs(brain[index] - data[index]) <= Math.abs(data[index]) * 2 ** -8)) far.push(`BF16 ${index}: ${data[index]} read ${brain[index]}`);
    }
    expect(far).toEqual([]);
  });

  it('rounds F16 and BF16 halfway values to even', async () => {
    // Every midpoint between two consecutive finite positive halves, and the f32 just each side of it.
    const midpoints: number[] = [];
    const below: number[] = [];
    const above: number[] = [];
    const lowerBits: number[] = [];
    for (let bits = 0; bits < 0x7bff; bits++) {
      const midpoint = Math.fround((f16ToFloat(bits) + f16ToFloat(bits + 1)) / 2);
      midpoints.push(midpoint);
      below.push(nextFloat32(midpoint, -1));
      above.push(nextFloat32(midpoint, 1));
      lowerBits.push(bits);
    }
    const count = midpoints.length;
    const path = freshPath();
    await writeSafetensors(path, {
      midpoints: { dtype: 'F16', shape: [count], data: new Float32Array(midpoints) },
      below: { dtype: 'F16', shape: [count], data: new Float32Array(below) },
      above: { dtype: 'F16', shape: [count], data: new Float32Array(above) },
      overflow: { dtype: 'F16', shape: [4], data: new Float32Array([65519, 65520, -65520, 1e9]) },
      brain: { dtype: 'BF16', shape: [3], data: new Float32Array([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20]) },
    });
    await using checkpoint = await Checkpoint.open(path);
    const halves = async (name: string) => {
      const info = checkpoint.info(name);
      const bytes = Buffer.alloc(info.byteLength);
      const handle = await open(path, 'r');
      await handle.read(bytes, 0, info.byteLength, info.byteOffset);
      await handle.close();
      return new Uint16Array(bytes.buffer, bytes.byteOffset, info.byteLength / 2);
    };
    const [midpointHalves, belowHalves, aboveHalves] = [await halves('midpoints'), await halves('below'), await halves('above')];
    const wrong: string[] = [];
    for (let index = 0; index < count; index++) {
      const lower = lowerBits[index];
      if (midpointHalves[index] !== (lower & 1 ? lower + 1 : lower)) wrong.push(`midpoint above half ${lower} gave ${midpointHalves[index]}`);
      if (belowHalves[index] !== lower) wrong.push(`just below the midpoint above half ${lower} gave ${belowHalves[index]}`);
      if (aboveHalves[index] !== lower + 1) wrong.push(`just above the midpoint above half ${lower} gave ${aboveHalves[index]}`);
    }
    expect(wrong).toEqual([]);
    expect(Array.from(await halves('overflow'))).toEqual([0x7bff, 0x7c00, 0xfc00, 0x7c00]);
    expect(Array.from(await checkpoint.readFloat32('brain'))).toEqual([1, 1 + 4 * 2 ** -8, 1 + 2 * 2 ** -8]);
  });

  it('reads 16-bit tensors as their raw bits, and narrows others to bf16 or f16 with rounding to even', async () => {
    const data = pseudoRandom(40 * 30);
    const path = freshPath();
    await writeSafetensors(path, {
      brain: { dtype: 'BF16', shape: [40, 30], data },
      half: { dtype: 'F16', shape: [40, 30], data },
      full: { dtype: 'F32', shape: [40, 30], data },
      ties: { dtype: 'F32', shape: [4], data: new Float32Array([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -11, 1 + 3 * 2 ** -11]) },
      large: { dtype: 'F32', shape: [2, 2], data: new Float32Array([1, 2, 3, 70000]) },
    });
    await using checkpoint = await Checkpoint.open(path);
    const raw = async (name: string) => {
      const info = checkpoint.info(name);
      const bytes = await readFile(path);
      return new Uint16Array(bytes.buffer.slice(bytes.byteOffset + info.byteOffset, bytes.byteOffset + info.byteOffset + info.byteLength));
    };
    // Stored in the encoding asked for: the file's bits, unchanged, whole and sliced.
    expect(await checkpoint.readHalf('brain', 'bf16')).toEqual(await raw('brain'));
    expect(await checkpoint.readHalf('half', 'f16')).toEqual(await raw('half'));
    const brainRaw = await raw('brain');
    const sliced = await checkpoint.readHalf('brain', 'bf16', { rows: [3, 9], columns: [4, 11] });
    const wanted = new Uint16Array(6 * 7);
    for (let row = 0; row < 6; row++) wanted.set(brainRaw.subarray((3 + row) * 30 + 4, (3 + row) * 30 + 11), row * 7);
    expect(sliced).toEqual(wanted);
    // From F32, rounded once, as the writer rounds: the same bits as the 16-bit tensors written from the same data.
    expect(await checkpoint.readHalf('full', 'bf16')).toEqual(brainRaw);
    expect(await checkpoint.readHalf('full', 'f16', { columns: [2, 29] })).toEqual(await checkpoint.readHalf('half', 'f16', { columns: [2, 29] }));
    // Halfway values go to the even neighbour.
    expect(Array.from(await checkpoint.readHalf('ties', 'bf16'))).toEqual([0x3f80, 0x3f82, 0x3f80, 0x3f80]);
    expect(Array.from(await checkpoint.readHalf('ties', 'f16'))).toEqual([0x3c04, 0x3c0c, 0x3c00, 0x3c02]);
    // Between encodings: f16 to bf16 rounds; bf16 to f16 is exact for these values.
    const brainWidened = await checkpoint.readFloat32('brain');
    expect(Array.from(await checkpoint.readHalf('brain', 'f16'), f16ToFloat)).toEqual(Array.from(brainWidened));
    // 70000 has no f16: refused, naming the tensor, rather than read as infinity; rows without it read.
    const error = await expectModelLoadError(checkpoint.readHalf('large', 'f16'), 'ERR_WEIGHT_RANGE', "'large'");
    expect(error.message).toContain('70000');
    expect(error.tensor).toBe('large');
    expect(Array.from(await checkpoint.readHalf('large', 'f16', { rows: [0, 1] }), f16ToFloat)).toEqual([1, 2]);
  });

  it('reads F64 and scalars', async () => {
    const doubles = new Float64Array([1.5, -2.25, 1 / 3]);
    const path = await writeRaw(
      { values: { dtype: 'F64', shape: [3], data_offsets: [0, 24] }, scalar: { dtype: 'F64', shape: [], data_offsets: [24, 32] } },
      new Uint8Array(new Float64Array([...doubles, 7]).buffer),
    );
    await using checkpoint = await Checkpoint.open(path);
    expect(Array.from(await checkpoint.readFloat32('values'))).toEqual([1.5, -2.25, Math.fround(1 / 3)]);
    expect(Array.from(await checkpoint.readFloat32('scalar'))).toEqual([7]);
    await expectInvalidArgument(checkpoint.readFloat32('scalar', { rows: [0, 1] }), ["'scalar'", 'scalar']);
  });

  it('keeps metadata and lists names sorted', async () => {
    const path = freshPath();
    const tensor: WritableTensor = { dtype: 'F32', shape: [1], data: new Float32Array([1]) };
    await writeSafetensors(path, { zeta: tensor, alpha: tensor, 'h.0.mlp': tensor }, { format: 'pt', note: 'trellis' });
    await using checkpoint = await Checkpoint.open(path);
    expect(checkpoint.metadata).toEqual({ format: 'pt', note: 'trellis' });
    expect(checkpoint.names()).toEqual(['alpha', 'h.0.mlp', 'zeta']);
    expect(checkpoint.has('alpha')).toBe(true);
    expect(checkpoint.has('beta')).toBe(false);
    const bare = freshPath();
    await writeSafetensors(bare, { alpha: tensor });
    await using plain = await Checkpoint.open(bare);
    expect(plain.metadata).toEqual({});
  });

  it('refuses to write tensors whose data does not match their shape', async () => {
    await expectInvalidArgument(writeSafetensors(freshPath(), { bad: { dtype: 'F32', shape: [2, 3], data: new Float32Array(5) } }), ["'bad'", '[2,3]', '6', '5']);
    await expectInvalidArgument(writeSafetensors(freshPath(), { bad: { dtype: 'I8' as 'F32', shape: [1], data: new Float32Array(1) } }), ["'bad'", 'I8']);
  });
});

describe('slices', () => {
  const rows = 7;
  const columns = 5;
  const data = sequence(rows * columns, 0.5);

  it.each(['F32', 'F16', 'BF16'] as const)('reads rows, columns and both of a %s matrix', async (dtype) => {
    const path = freshPath();
    await writeSafetensors(path, { matrix: { dtype, shape: [rows, columns], data }, vector: { dtype, shape: [10], data: sequence(10) } });
    await using checkpoint = await Checkpoint.open(path);
    expect(await checkpoint.readFloat32('matrix', { rows: [2, 5] })).toEqual(expectedSlice(data, columns, [2, 5], [0, columns]));
    expect(await checkpoint.readFloat32('matrix', { columns: [1, 3] })).toEqual(expectedSlice(data, columns, [0, rows], [1, 3]));
    expect(await checkpoint.readFloat32('matrix', { rows: [3, 7], columns: [4, 5] })).toEqual(expectedSlice(data, columns, [3, 7], [4, 5]));
    expect(await checkpoint.readFloat32('matrix', { rows: [6, 7], columns: [0, 2] })).toEqual(expectedSlice(data, columns, [6, 7], [0, 2]));
    expect((await checkpoint.readFloat32('matrix', { rows: [4, 4] })).length).toBe(0);
    expect(Array.from(await checkpoint.readFloat32('vector', { rows: [3, 8] }))).toEqual([3, 4, 5, 6, 7]);
  });

  it('gathers column slices across several reads of a large matrix', async () => {
    // 4.5 MB of f32 and 4.3 MB of f16: more than one scratch chunk each.
    const wide = { rows: 1100, columns: 1024 };
    const large = sequence(wide.rows * wide.columns);
    const halfRows = 2100;
    const halfData = pseudoRandom(halfRows * 1024);
    const path = freshPath();
    await writeSafetensors(path, {
      large: { dtype: 'F32', shape: [wide.rows, wide.columns], data: large },
      half: { dtype: 'F16', shape: [halfRows, 1024], data: halfData },
    });
    await using checkpoint = await Checkpoint.open(path);
    expectSameFloats(await checkpoint.readFloat32('large', { columns: [1000, 1003] }), expectedSlice(large, wide.columns, [0, wide.rows], [1000, 1003]));
    expectSameFloats(await checkpoint.readFloat32('large', { rows: [5, 1099], columns: [7, 900] }), expectedSlice(large, wide.columns, [5, 1099], [7, 900]));
    expectSameFloats(await checkpoint.readFloat32('large'), large);
    const half = await checkpoint.readFloat32('half');
    expect(half.length).toBe(halfData.length);
    let mismatches = 0;
    for (let index = 0; index < half.length; index++) if (Math.abs(half[index] - halfData[index]) > Math.max(Math.abs(halfData[index]) * 2 ** -11, 2 ** -25)) mismatches++;
    expect(mismatches).toBe(0);
    expectSameFloats(await checkpoint.readFloat32('half', { columns: [512, 520] }), expectedSlice(half, 1024, [0, halfRows], [512, 520]));
  });

  it('reads only the bytes of the rows asked for', async () => {
    const data = sequence(1000 * 64);
    const path = freshPath();
    await writeSafetensors(path, { table: { dtype: 'F32', shape: [1000, 64], data } });
    await using checkpoint = await Checkpoint.open(path);
    const probe = await open(path, 'r');
    const prototype = Object.getPrototypeOf(probe) as { read: (...args: unknown[]) => Promise<{ bytesRead: number }> };
    await probe.close();
    let bytesRead = 0;
    const original = prototype.read;
    const spy = vi.spyOn(prototype, 'read').mockImplementation(async function (this: unknown, ...args: unknown[]) {
      const result = await original.apply(this, args);
      bytesRead += result.bytesRead;
      return result;
    });
    try {
      expect(await checkpoint.readFloat32('table', { rows: [10, 20] })).toEqual(data.subarray(640, 1280));
    } finally {
      spy.mockRestore();
    }
    expect(bytesRead).toBe(10 * 64 * 4);
  });

  it('rejects slices out of range, naming the tensor and the range', async () => {
    const path = freshPath();
    await writeSafetensors(path, { matrix: { dtype: 'F32', shape: [rows, columns], data }, vector: { dtype: 'F32', shape: [3], data: sequence(3) } });
    await using checkpoint = await Checkpoint.open(path);
    await expectInvalidArgument(checkpoint.readFloat32('matrix', { rows: [5, 8] }), ["'matrix'", 'rows [5, 8)']);
    await expectInvalidArgument(checkpoint.readFloat32('matrix', { rows: [3, 2] }), ["'matrix'", 'rows [3, 2)']);
    await expectInvalidArgument(checkpoint.readFloat32('matrix', { columns: [-1, 2] }), ["'matrix'", 'columns [-1, 2)']);
    await expectInvalidArgument(checkpoint.readFloat32('matrix', { columns: [0, 6] }), ["'matrix'", 'columns [0, 6)']);
    await expectInvalidArgument(checkpoint.readFloat32('matrix', { rows: [0.5, 2] }), ["'matrix'", 'rows']);
    await expectInvalidArgument(checkpoint.readFloat32('vector', { columns: [0, 1] }), ["'vector'", '2-D']);
  });
});

describe('sharded checkpoints', () => {
  it('writes three files and an index, and opens them by directory and by index path', async () => {
    const checkpointDirectory = join(directory, 'sharded');
    const tensors: Record<string, WritableTensor> = {
      // 150-byte files: [wte 128], [h.0.weight 32, h.0.bias 8], [h.1.weight 128, ln_f 16].
      'wte.weight': { dtype: 'F32', shape: [8, 4], data: sequence(32) }, // 128 bytes
      'h.0.weight': { dtype: 'F16', shape: [4, 4], data: sequence(16, 0.25) }, // 32 bytes
      'h.0.bias': { dtype: 'BF16', shape: [4], data: sequence(4, 2) }, // 8 bytes
      'h.1.weight': { dtype: 'F32', shape: [4, 8], data: sequence(32, -1) }, // 128 bytes
      'ln_f.weight': { dtype: 'F32', shape: [4], data: sequence(4) }, // 16 bytes
    };
    const paths = await writeShardedCheckpoint(checkpointDirectory, tensors, 150, { format: 'pt' });
    expect(paths.map((path) => path.slice(checkpointDirectory.length + 1))).toEqual([
      'model-00001-of-00003.safetensors',
      'model-00002-of-00003.safetensors',
      'model-00003-of-00003.safetensors',
    ]);
    expect((await readdir(checkpointDirectory)).sort()).toEqual([
      'model-00001-of-00003.safetensors',
      'model-00002-of-00003.safetensors',
      'model-00003-of-00003.safetensors',
      'model.safetensors.index.json',
    ]);
    const index = JSON.parse(await readFile(join(checkpointDirectory, 'model.safetensors.index.json'), 'utf8'));
    expect(index.metadata).toEqual({ format: 'pt', total_size: 312 });
    expect(index.weight_map['h.0.bias']).toBe('model-00002-of-00003.safetensors');

    for (const opened of [checkpointDirectory, join(checkpointDirectory, 'model.safetensors.index.json')]) {
      await using checkpoint = await Checkpoint.open(opened);
      expect(checkpoint.names()).toEqual(['h.0.bias', 'h.0.weight', 'h.1.weight', 'ln_f.weight', 'wte.weight']);
      expect(checkpoint.metadata).toEqual({ format: 'pt', total_size: '312' });
      expect(checkpoint.info('wte.weight').file).toBe(paths[0]);
      expect(checkpoint.info('h.0.bias').file).toBe(paths[1]);
      expect(checkpoint.info('h.1.weight').file).toBe(paths[2]);
      expect(checkpoint.info('ln_f.weight').file).toBe(paths[2]);
      for (const [name, tensor] of Object.entries(tensors)) expect(await checkpoint.readFloat32(name), name).toEqual(tensor.data);
      expect(await checkpoint.readFloat32('h.1.weight', { rows: [1, 3], columns: [2, 5] })).toEqual(expectedSlice(tensors['h.1.weight'].data, 8, [1, 3], [2, 5]));
    }
  });

  it('opens a single-file checkpoint by its directory', async () => {
    const checkpointDirectory = join(directory, 'single');
    await mkdir(checkpointDirectory);
    await writeSafetensors(join(checkpointDirectory, 'model.safetensors'), { bias: { dtype: 'F32', shape: [2], data: new Float32Array([1, 2]) } });
    await using checkpoint = await Checkpoint.open(checkpointDirectory);
    expect(Array.from(await checkpoint.readFloat32('bias'))).toEqual([1, 2]);
  });

  it('reports a shard file the index names but that is missing', async () => {
    const checkpointDirectory = join(directory, 'missing-shard');
    const paths = await writeShardedCheckpoint(checkpointDirectory, { a: { dtype: 'F32', shape: [4], data: sequence(4) }, b: { dtype: 'F32', shape: [4], data: sequence(4) } }, 16);
    await rm(paths[1]);
    const error = await expectModelLoadError(Checkpoint.open(checkpointDirectory), 'ERR_CHECKPOINT_NOT_FOUND', 'model-00002-of-00002.safetensors');
    expect(error.file).toBe(paths[1]);
  });
});

describe('errors', () => {
  const valid = { weight: { dtype: 'F32', shape: [2, 2], data_offsets: [0, 16] } };

  it('a truncated file', async () => {
    const tooShort = freshPath();
    await writeFile(tooShort, Buffer.from([1, 2, 3]));
    const error = await expectModelLoadError(Checkpoint.open(tooShort), 'ERR_SAFETENSORS_HEADER', tooShort);
    expect(error.file).toBe(tooShort);
    const path = await writeRaw(valid, new Uint8Array(16));
    await truncate(path, (await readFile(path)).length - 4);
    const truncated = await expectModelLoadError(Checkpoint.open(path), 'ERR_SAFETENSORS_RANGE', "'weight'");
    expect(truncated.message).toContain(path);
    expect(truncated.tensor).toBe('weight');
  });

  it('a file truncated after it was opened', async () => {
    const path = await writeRaw(valid, new Uint8Array(16));
    await using checkpoint = await Checkpoint.open(path);
    await truncate(path, (await readFile(path)).length - 8);
    await expectModelLoadError(checkpoint.readFloat32('weight'), 'ERR_SAFETENSORS_RANGE', "'weight'");
  });

  it('a header length beyond the file or over the limit', async () => {
    const beyond = await writeRaw(valid, new Uint8Array(16), 5000n);
    await expectModelLoadError(Checkpoint.open(beyond), 'ERR_SAFETENSORS_HEADER', beyond);
    const huge = await writeRaw(valid, new Uint8Array(16), 2n ** 63n);
    await expectModelLoadError(Checkpoint.open(huge), 'ERR_SAFETENSORS_HEADER', huge);
  });

  it('invalid JSON, or JSON that is not an object', async () => {
    const broken = await writeRaw('{"weight": {"dtype": "F32",');
    await expectModelLoadError(Checkpoint.open(broken), 'ERR_SAFETENSORS_HEADER', broken);
    const array = await writeRaw('[1, 2]');
    await expectModelLoadError(Checkpoint.open(array), 'ERR_SAFETENSORS_HEADER', array);
    const notUtf8 = await writeRaw(new Uint8Array([0x7b, 0xff, 0x7d]));
    await expectModelLoadError(Checkpoint.open(notUtf8), 'ERR_SAFETENSORS_HEADER', notUtf8);
  });

  it('malformed entries', async () => {
    for (const entry of [
      { dtype: 5, shape: [1], data_offsets: [0, 4] },
      { dtype: 'F32', shape: [-1], data_offsets: [0, 4] },
      { dtype: 'F32', shape: '1', data_offsets: [0, 4] },
      { dtype: 'F32', shape: [1], data_offsets: [0] },
      { dtype: 'F32', shape: [1], data_offsets: [0, 4.5] },
      'F32',
    ]) {
      const path = await writeRaw({ bad: entry }, new Uint8Array(8));
      const error = await expectModelLoadError(Checkpoint.open(path), 'ERR_SAFETENSORS_HEADER', "'bad'");
      expect(error.message).toContain(path);
    }
    const metadata = await writeRaw({ __metadata__: { epoch: 3 } });
    await expectModelLoadError(Checkpoint.open(metadata), 'ERR_SAFETENSORS_HEADER', 'epoch');
  });

  it('offsets out of range', async () => {
    const path = await writeRaw({ weight: { dtype: 'F32', shape: [2, 2], data_offsets: [8, 24] } }, new Uint8Array(16));
    const error = await expectModelLoadError(Checkpoint.open(path), 'ERR_SAFETENSORS_RANGE', "'weight'");
    expect(error.message).toContain(path);
    const reversed = await writeRaw({ weight: { dtype: 'F32', shape: [0], data_offsets: [8, 4] } }, new Uint8Array(16));
    await expectModelLoadError(Checkpoint.open(reversed), 'ERR_SAFETENSORS_RANGE', "'weight'");
  });

  it('overlapping entries', async () => {
    const path = await writeRaw(
      { first: { dtype: 'F32', shape: [3], data_offsets: [0, 12] }, second: { dtype: 'F32', shape: [2], data_offsets: [8, 16] } },
      new Uint8Array(16),
    );
    const error = await expectModelLoadError(Checkpoint.open(path), 'ERR_SAFETENSORS_RANGE', "'first'");
    expect(error.message).toContain("'second'");
    expect(error.message).toContain(path);
  });

  it('a size that does not match dtype and shape', async () => {
    const path = await writeRaw({ weight: { dtype: 'F16', shape: [2, 2], data_offsets: [0, 16] } }, new Uint8Array(16));
    const error = await expectModelLoadError(Checkpoint.open(path), 'ERR_SAFETENSORS_RANGE', "'weight'");
    expect(error.message).toContain('F16');
  });

  it('dtypes that cannot be read as f32', async () => {
    const path = await writeRaw(
      {
        bytes: { dtype: 'I8', shape: [4], data_offsets: [0, 4] },
        eight: { dtype: 'F8_E4M3', shape: [4], data_offsets: [4, 8] },
        ids: { dtype: 'I64', shape: [1], data_offsets: [8, 16] },
        strange: { dtype: 'X7', shape: [3], data_offsets: [16, 19] },
        weight: { dtype: 'F32', shape: [1], data_offsets: [20, 24] },
      },
      new Uint8Array([...new Uint8Array(20), ...new Uint8Array(new Float32Array([2.5]).buffer)]),
    );
    // Tensors of other dtypes stay listed, and the float tensors beside them stay readable.
    await using checkpoint = await Checkpoint.open(path);
    expect(checkpoint.info('strange').dtype).toBe('X7');
    expect(Array.from(await checkpoint.readFloat32('weight'))).toEqual([2.5]);
    for (const [name, dtype] of [['bytes', 'I8'], ['eight', 'F8_E4M3'], ['ids', 'I64'], ['strange', 'X7']]) {
      const error = await expectModelLoadError(checkpoint.readFloat32(name), 'ERR_SAFETENSORS_DTYPE', `'${name}'`);
      expect(error.message).toContain(dtype);
      expect(error.message).toContain(path);
      expect(error.tensor).toBe(name);
    }
  });

  it('an unknown tensor name', async () => {
    const path = await writeRaw(valid, new Uint8Array(16));
    await using checkpoint = await Checkpoint.open(path);
    const error = await expectModelLoadError(Promise.resolve().then(() => checkpoint.info('missing.weight')), 'ERR_TENSOR_NOT_FOUND', "'missing.weight'");
    expect(error.message).toContain(path);
    expect(error.tensor).toBe('missing.weight');
    await expectModelLoadError(checkpoint.readFloat32('missing.weight'), 'ERR_TENSOR_NOT_FOUND', "'missing.weight'");
  });

  it('a directory without a checkpoint, and a path that does not exist', async () => {
    const empty = join(directory, 'empty');
    await mkdir(empty);
    await expectModelLoadError(Checkpoint.open(empty), 'ERR_CHECKPOINT_NOT_FOUND', empty);
    const nowhere = join(directory, 'nowhere.safetensors');
    await expectModelLoadError(Checkpoint.open(nowhere), 'ERR_CHECKPOINT_NOT_FOUND', nowhere);
  });

  it('a malformed index', async () => {
    const bad = join(directory, 'bad-index');
    await mkdir(bad);
    const indexPath = join(bad, 'model.safetensors.index.json');
    await writeFile(indexPath, '{"weight_map": ');
    await expectModelLoadError(Checkpoint.open(bad), 'ERR_CHECKPOINT_INDEX', indexPath);
    await writeFile(indexPath, JSON.stringify({ weight_map: { weight: '../elsewhere.safetensors' } }));
    await expectModelLoadError(Checkpoint.open(indexPath), 'ERR_CHECKPOINT_INDEX', "'weight'");
    await writeSafetensors(join(bad, 'model-00001-of-00001.safetensors'), { other: { dtype: 'F32', shape: [1], data: new Float32Array(1) } });
    await writeFile(indexPath, JSON.stringify({ weight_map: { weight: 'model-00001-of-00001.safetensors' } }));
    await expectModelLoadError(Checkpoint.open(indexPath), 'ERR_CHECKPOINT_INDEX', "'weight'");
  });

  it('reads after close; close is idempotent', async () => {
    const path = await writeRaw(valid, new Uint8Array(16));
    const checkpoint = await Checkpoint.open(path);
    await checkpoint.close();
    await checkpoint.close();
    await expectModelLoadError(checkpoint.readFloat32('weight'), 'ERR_CHECKPOINT_CLOSED', path);
  });
});

/** The f32 next to `value` in `direction` (positive values only). */
function nextFloat32(value: number, direction: 1 | -1): number {
  const bits = new Uint32Array(new Float32Array([value]).buffer);
  bits[0] += direction;
  return new Float32Array(bits.buffer)[0];
}
