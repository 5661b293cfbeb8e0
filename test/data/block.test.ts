/**
 * Blocks: conversions between rows, columns and Arrow tables, type inference for every JavaScript
 * value a user function may return, joining, slicing and sizing, and the Arrow IPC round trip
 * blocks take through the object store.
 */
import { describe, expect, it } from 'vitest';
import { Field, Float64, Int32, Int64, Schema, Table, Utf8, tableFromArrays, tableFromIPC, tableToIPC, vectorFromArray } from 'apache-arrow';
import { InvalidArgumentError } from '../../lib/errors.js';
import {
  blockBytes, blockToColumns, blockToRows, columnsToBlock, concatBlocks, formatBatch, rowsToBlock, sliceRows, splitBySize, toBlock, type Block,
} from '../../lib/data/block.js';

const typesOf = (block: Block): Record<string, string> =>
  Object.fromEntries(block.schema.fields.map((field) => [field.name, String(field.type)]));

function thrown(action: () => unknown): InvalidArgumentError {
  try {
    action();
  } catch (error) {
    expect(error).toBeInstanceOf(InvalidArgumentError);
    return error as InvalidArgumentError;
  }
  throw new Error('expected an error');
}

describe('inference', () => {
  it('gives each JavaScript value its Arrow type', () => {
    const block = rowsToBlock([
      {
        number: 1.5,
        bigint: 2n,
        string: 's',
        boolean: true,
        date: new Date(1000),
        bytes: Uint8Array.of(1, 2),
        buffer: Uint8Array.of(3).buffer,
        float32: Float32Array.of(0.5, 1),
        int32: Int32Array.of(7),
        bigints: BigInt64Array.of(9n),
        numbers: [1, 2],
        strings: ['a'],
        object: { x: 1, y: 'z' },
        nothing: null,
      },
    ]);
    expect(typesOf(block)).toEqual({
      number: 'Float64',
      bigint: 'Int64',
      string: 'Utf8',
      boolean: 'Bool',
      date: 'Timestamp<MILLISECOND>',
      bytes: 'Binary',
      buffer: 'Binary',
      float32: 'List<Float32>',
      int32: 'List<Int32>',
      bigints: 'List<Int64>',
      numbers: 'List<Float64>',
      strings: 'List<Utf8>',
      object: 'Struct<{x:Float64, y:Utf8}>',
      nothing: 'Null',
    });
    expect(blockToRows(block)).toEqual([
      {
        number: 1.5,
        bigint: 2n,
        string: 's',
        boolean: true,
        date: new Date(1000),
        bytes: Uint8Array.of(1, 2),
        buffer: Uint8Array.of(3),
        float32: [0.5, 1],
        int32: [7],
        bigints: [9n],
        numbers: [1, 2],
        strings: ['a'],
        object: { x: 1, y: 'z' },
        nothing: null,
      },
    ]);
  });

  it('nulls, undefined and missing keys are nulls of the column type', () => {
    const block = rowsToBlock([{ a: 1, b: null }, { a: null, b: 'x' }, { b: undefined }, { a: undefined }]);
    expect(typesOf(block)).toEqual({ a: 'Float64', b: 'Utf8' });
    expect(block.getChild('a')!.nullCount).toBe(3);
    expect(blockToRows(block)).toEqual([{ a: 1, b: null }, { a: null, b: 'x' }, { a: null, b: null }, { a: null, b: null }]);
  });

  it('widens lists of nulls and structs with different keys', () => {
    const block = rowsToBlock([{ list: [], nested: { x: 1 } }, { list: [null, 2], nested: { y: 'b' } }]);
    expect(typesOf(block)).toEqual({ list: 'List<Float64>', nested: 'Struct<{x:Float64, y:Utf8}>' });
    expect(blockToRows(block)).toEqual([
      { list: [], nested: { x: 1, y: null } },
      { list: [null, 2], nested: { x: null, y: 'b' } },
    ]);
  });

  it('refuses mixed types, naming the column', () => {
    const mixed = thrown(() => rowsToBlock([{ a: 1 }, { a: 'x' }]));
    expect(mixed.code).toBe('ERR_DATA_TYPE');
    expect(mixed.message).toContain("column 'a' mixes Float64 and Utf8");
    expect(thrown(() => rowsToBlock([{ a: [1, 'x'] }])).message).toContain("column 'a[]'");
    expect(thrown(() => rowsToBlock([{ a: { b: 1 } }, { a: { b: true } }])).message).toContain("column 'a.b'");
    expect(thrown(() => rowsToBlock([{ a: 1n }, { a: 1 }])).code).toBe('ERR_DATA_TYPE');
  });

  it('refuses values with no Arrow type, and rows that are not objects', () => {
    expect(thrown(() => rowsToBlock([{ a: Symbol('s') }])).code).toBe('ERR_DATA_TYPE');
    expect(thrown(() => rowsToBlock([{ a: () => 1 }])).message).toContain('function');
    expect(thrown(() => rowsToBlock([{ a: new Map() }])).message).toContain('Map');
    expect(thrown(() => rowsToBlock([[1, 2] as never])).message).toContain('an array');
    expect(thrown(() => rowsToBlock([null as never])).code).toBe('ERR_DATA_TYPE');
  });

  it('follows a schema when one is given', () => {
    const schema = new Schema([new Field('id', new Int32(), true), new Field('big', new Int64(), true)]);
    const block = rowsToBlock([{ id: 1, big: 2n, extra: 'dropped' }, { id: null }], schema);
    expect(typesOf(block)).toEqual({ id: 'Int32', big: 'Int64' });
    expect(blockToRows(block)).toEqual([{ id: 1, big: 2n }, { id: null, big: null }]);
  });

  it('makes an empty block of no rows', () => {
    const block = rowsToBlock([]);
    expect(block.numRows).toBe(0);
    expect(block.numCols).toBe(0);
  });
});

describe('columns', () => {
  it('uses typed arrays without copying', () => {
    const values = Float64Array.of(1, 2, 3);
    const ids = Int32Array.of(4, 5, 6);
    const bytes = Uint8Array.of(7, 8, 9);
    const block = columnsToBlock({ values, ids, bytes });
    expect(typesOf(block)).toEqual({ values: 'Float64', ids: 'Int32', bytes: 'Uint8' });
    expect(block.getChild('values')!.data[0].values.buffer).toBe(values.buffer);
    expect(block.getChild('ids')!.data[0].values.buffer).toBe(ids.buffer);
    expect(block.getChild('bytes')!.data[0].values.buffer).toBe(bytes.buffer);
  });

  it('infers array columns and mixes them with typed ones', () => {
    const block = columnsToBlock({ x: Float32Array.of(1, 2), name: ['a', null], when: [new Date(1), new Date(2)] });
    expect(typesOf(block)).toEqual({ x: 'Float32', name: 'Utf8', when: 'Timestamp<MILLISECOND>' });
    expect(blockToRows(block)).toEqual([{ x: 1, name: 'a', when: new Date(1) }, { x: 2, name: null, when: new Date(2) }]);
  });

  it('builds plain number, string and boolean columns as rows would infer them, nulls included', () => {
    const columns = {
      n: [1.5, null, -3, undefined, 0],
      s: ['a', 'héllo 🌍', null, '', 'z'],
      b: [true, false, null, true, false],
      nulls: [null, null, null, null, null],
      mixed: [1, 'one', null, 2, 'two'],
    };
    const { mixed: _mixed, ...simple } = columns;
    const rows = Array.from({ length: 5 }, (_, index) => Object.fromEntries(Object.entries(simple).map(([name, column]) => [name, column[index] ?? null])));
    const block = columnsToBlock(simple);
    const reference = rowsToBlock(rows);
    expect(typesOf(block)).toEqual(typesOf(reference));
    expect(typesOf(block)).toEqual({ n: 'Float64', s: 'Utf8', b: 'Bool', nulls: 'Null' });
    expect(blockToRows(block)).toEqual(blockToRows(reference));
    expect(blockToRows(tableFromIPC(tableToIPC(block)))).toEqual(blockToRows(reference));
    // A column mixing types is refused, as rows mixing them are.
    expect(thrown(() => columnsToBlock(columns)).code).toBe('ERR_DATA_TYPE');
  });

  it('refuses columns of different lengths', () => {
    const error = thrown(() => columnsToBlock({ a: [1, 2], b: [1] }));
    expect(error.code).toBe('ERR_DATA_TYPE');
    expect(error.message).toContain('a=2, b=1');
  });

  it('gives typed arrays back for numeric columns without nulls, arrays otherwise', () => {
    const block = rowsToBlock([{ f: 1, n: 1, i: 1n, t: new Date(5), s: 'a' }, { f: 2, n: null, i: 2n, t: null, s: 'b' }]);
    const columns = blockToColumns(block);
    expect(columns.f).toEqual(Float64Array.of(1, 2));
    expect(columns.i).toEqual(BigInt64Array.of(1n, 2n));
    expect(columns.n).toEqual([1, null]);
    expect(columns.t).toEqual([new Date(5), null]);
    expect(columns.s).toEqual(['a', 'b']);
  });
});

describe('toBlock and formatBatch', () => {
  it('takes a table as it is, rows, or columns', () => {
    const table = tableFromArrays({ a: Float64Array.of(1) });
    expect(toBlock(table, 'map')).toBe(table);
    expect(blockToRows(toBlock([{ a: 1 }], 'map'))).toEqual([{ a: 1 }]);
    expect(blockToRows(toBlock({ a: [1, 2], b: Int32Array.of(3, 4) }, 'map'))).toEqual([{ a: 1, b: 3 }, { a: 2, b: 4 }]);
  });

  it('refuses anything else, naming the caller', () => {
    for (const value of [null, 5, 'text', { a: 1 }]) {
      const error = thrown(() => toBlock(value, 'map_batches(fn)'));
      expect(error.code).toBe('ERR_DATA_TYPE');
      expect(error.message).toContain('map_batches(fn) must return');
    }
  });

  it('hands a block over in the format asked for', () => {
    const block = rowsToBlock([{ a: 1 }, { a: 2 }]);
    expect(formatBatch(block, 'arrow')).toBe(block);
    expect(formatBatch(block, 'rows')).toEqual([{ a: 1 }, { a: 2 }]);
    expect(formatBatch(block, 'columns')).toEqual({ a: Float64Array.of(1, 2) });
  });
});

describe('joining, slicing and sizing', () => {
  it('concatenates blocks of one schema, skipping empty ones', () => {
    const a = rowsToBlock([{ x: 1 }]);
    const b = rowsToBlock([{ x: 2 }, { x: 3 }]);
    expect(concatBlocks([a])).toBe(a);
    expect(concatBlocks([]).numRows).toBe(0);
    const joined = concatBlocks([a, a.slice(0, 0), b]);
    expect(blockToRows(joined)).toEqual([{ x: 1 }, { x: 2 }, { x: 3 }]);
    expect(joined.batches).toHaveLength(2);
  });

  it('casts where one type covers both: a column all null in one block, ints beside floats, narrow ints beside wide', () => {
    const sparse = concatBlocks([rowsToBlock([{ x: 1, note: null }]), rowsToBlock([{ x: 2, note: 'late' }])]);
    expect(String(sparse.schema.fields[1].type)).toBe('Utf8');
    expect(blockToRows(sparse)).toEqual([{ x: 1, note: null }, { x: 2, note: 'late' }]);
    const numbers = concatBlocks([columnsToBlock({ v: Int32Array.of(1, 2) }), rowsToBlock([{ v: 2.5 }]), columnsToBlock({ v: Int8Array.of(-3) })]);
    expect(String(numbers.schema.fields[0].type)).toBe('Float64');
    expect(blockToRows(numbers).map((row) => row.v)).toEqual([1, 2, 2.5, -3]);
    const ints = concatBlocks([columnsToBlock({ v: Int16Array.of(7) }), columnsToBlock({ v: BigInt64Array.of(2n ** 40n) }), columnsToBlock({ v: Uint8Array.of(200) })]);
    expect(String(ints.schema.fields[0].type)).toBe('Int64');
    expect(blockToRows(ints).map((row) => row.v)).toEqual([7n, 2n ** 40n, 200n]);
  });

  it('refuses blocks with different schemas instead of mixing their buffers', () => {
    for (const other of [rowsToBlock([{ y: 1 }]), rowsToBlock([{ x: 'one' }]), rowsToBlock([{ x: 1, y: 2 }]), rowsToBlock([{ x: [1] }])]) {
      const error = thrown(() => concatBlocks([rowsToBlock([{ x: 1 }]), other]));
      expect(error.code).toBe('ERR_DATA_SCHEMA');
    }
    const nested = thrown(() => concatBlocks([rowsToBlock([{ s: { a: 1 } }]), rowsToBlock([{ s: { a: 'x' } }])]));
    expect(nested.code).toBe('ERR_DATA_SCHEMA');
  });

  it('slices rows without copying', () => {
    const values = Float64Array.from({ length: 10 }, (_, index) => index);
    const block = columnsToBlock({ values });
    const slices = sliceRows(block, 4);
    expect(slices.map((slice) => slice.numRows)).toEqual([4, 4, 2]);
    expect(Array.from(slices[2].getChild('values')!.toArray())).toEqual([8, 9]);
    expect(slices[1].getChild('values')!.data[0].values.buffer).toBe(values.buffer);
    expect(sliceRows(block, 10)[0]).toBe(block);
  });

  it('counts the bytes of values, offsets and validity', () => {
    expect(blockBytes(columnsToBlock({ values: new Float64Array(1000) }))).toBe(8000);
    const strings = rowsToBlock([{ s: 'abc' }, { s: null }]);
    // 3 value bytes (padded by Arrow), 3 int32 offsets, one validity byte at least.
    expect(blockBytes(strings)).toBeGreaterThanOrEqual(3 + 12 + 1);
    expect(blockBytes(strings)).toBeLessThan(256);
    expect(blockBytes(sliceRows(columnsToBlock({ values: new Float64Array(1000) }), 100)[0])).toBe(800);
  });

  it('splits a block by size, keeping every row and at least one a piece', () => {
    const block = columnsToBlock({ values: Float64Array.from({ length: 1000 }, (_, index) => index) });
    const pieces = splitBySize(block, 1000);
    expect(pieces.length).toBeGreaterThanOrEqual(8);
    for (const piece of pieces) expect(blockBytes(piece)).toBeLessThanOrEqual(1000);
    expect(pieces.flatMap((piece) => Array.from(piece.getChild('values')!.toArray()))).toEqual(Array.from({ length: 1000 }, (_, index) => index));
    expect(splitBySize(block, 1 << 20)).toEqual([block]);
    expect(splitBySize(columnsToBlock({ values: Float64Array.of(1, 2) }), 1)).toHaveLength(2);
  });
});

describe('Arrow IPC', () => {
  it('carries every inferred type through tableToIPC and tableFromIPC', () => {
    const rows = [
      { f: 1.5, i: 2n, s: 'é', b: true, t: new Date(12345), bin: Uint8Array.of(0, 255), v: Float32Array.of(0.25), l: ['x', null], o: { p: 1 } },
      { f: null, i: null, s: null, b: null, t: null, bin: null, v: null, l: null, o: null },
    ];
    const block = rowsToBlock(rows);
    for (const format of ['stream', 'file'] as const) {
      const back = tableFromIPC(tableToIPC(block, format));
      expect(typesOf(back)).toEqual(typesOf(block));
      expect(blockToRows(back)).toEqual(blockToRows(block));
    }
  });

  it('keeps utf8 as utf8 and a schema as given', () => {
    const table = new Table({ s: vectorFromArray(['a', 'b'], new Utf8()), n: vectorFromArray([1, 2], new Float64()) });
    const back = tableFromIPC(tableToIPC(table));
    expect(typesOf(back)).toEqual({ s: 'Utf8', n: 'Float64' });
    expect(blockToColumns(back)).toEqual({ s: ['a', 'b'], n: Float64Array.of(1, 2) });
  });
});
