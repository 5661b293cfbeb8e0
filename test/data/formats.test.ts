/**
 * Built-in file sources and sinks, in-process (no cluster): sinks' write() with a hand-made write
 * context, sources' read tasks run here. Round trips of every column type through each format,
 * splitting across read tasks, malformed input and missing paths; compressed text files (read and
 * written), plain text, and whole binary files.
 */
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { brotliCompressSync, gunzipSync, gzipSync } from 'node:zlib';
import { basename, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  Binary, Bool, Field, Float32, Float64, Int32, Int64, List, Schema, Table, TimestampMillisecond, Utf8, tableFromIPC, vectorFromArray,
} from 'apache-arrow';
import { InvalidArgumentError } from '../../lib/errors.js';
import { blockToRows, concatBlocks, rowsToBlock, type Block, type Row } from '../../lib/data/block.js';
import type { Datasource, ReadTask, WriteContext } from '../../lib/data/datasource.js';
import { reviveInstance, shipInstance } from '../../lib/data/udf.js';
import { pack, unpack } from '../../lib/core/serialization.js';
import {
  ArrowDatasink, BinaryDatasource, CsvDatasink, JsonlDatasink, ParquetDatasink, TextDatasource, arrowSource, binarySource, csvSource, jsonlSource, parquetSource, textSource,
  type WrittenFile,
} from '../../lib/data/formats/index.js';
import { zstdAvailable } from '../../lib/data/formats/compression.js';

let root: string;
let next = 0;
/** A fresh directory under the test's temp root. */
const scratch = (name: string): string => {
  const path = join(root, `${name}-${next++}`);
  mkdirSync(path, { recursive: true });
  return path;
};

beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'trellis-formats-test-'));
});

afterAll(() => {
  rmSync(root, { recursive: true, force: true });
});

const context = (taskIndex = 0, attempt = 0, writeId = 'job1'): WriteContext => ({ taskIndex, attempt, writeId });

async function readTask(task: ReadTask): Promise<Block[]> {
  const blocks: Block[] = [];
  for await (const output of task.read()) blocks.push(output as Block);
  return blocks;
}

async function readAll(source: Datasource, parallelism = 1): Promise<{ tasks: ReadTask[]; blocks: Block[] }> {
  const tasks = await source.getReadTasks(parallelism);
  const blocks: Block[] = [];
  for (const task of tasks) blocks.push(...(await readTask(task)));
  return { tasks, blocks };
}

const typesOf = (block: Block): Record<string, string> =>
  Object.fromEntries(block.schema.fields.map((field) => [field.name, String(field.type)]));

async function rejection(promise: Promise<unknown> | (() => unknown)): Promise<InvalidArgumentError> {
  try {
    await (typeof promise === 'function' ? promise() : promise);
  } catch (error) {
    expect(error).toBeInstanceOf(InvalidArgumentError);
    return error as InvalidArgumentError;
  }
  throw new Error('expected an error');
}

const float32List = () => new List(new Field('item', new Float32(), true));

/** Every column type the formats must carry; the second block continues the first. */
function fixture(): Table {
  const at = (ms: number) => new Date(Date.UTC(2024, 0, 2, 3, 4, 5) + ms);
  const first = new Table({
    f64: vectorFromArray([1.5, -2, null, 1e300], new Float64()),
    i32: vectorFromArray([1, -2, 3, null], new Int32()),
    i64: vectorFromArray([1n, -2n, null, 9007199254740993n], new Int64()),
    text: vectorFromArray(['a', '', 'comma, and "quotes"', null], new Utf8()),
    flag: vectorFromArray([true, false, null, true], new Bool()),
    at: vectorFromArray([at(0), at(1), null, at(999)], new TimestampMillisecond()),
    bytes: vectorFromArray([Uint8Array.of(1, 2, 3), Uint8Array.of(), null, Uint8Array.of(255)], new Binary()),
    vec: vectorFromArray([[1, 2.5], [], null, [0.25, -1]], float32List()),
  });
  const second = new Table({
    f64: vectorFromArray([0.1], new Float64()),
    i32: vectorFromArray([2147483647], new Int32()),
    i64: vectorFromArray([0n], new Int64()),
    text: vectorFromArray(['line\nbreak'], new Utf8()),
    flag: vectorFromArray([false], new Bool()),
    at: vectorFromArray([at(-1000)], new TimestampMillisecond()),
    bytes: vectorFromArray([Uint8Array.of(0)], new Binary()),
    vec: vectorFromArray([[3]], float32List()),
  });
  return concatBlocks([first, second]);
}

const fixtureTypes = {
  f64: 'Float64', i32: 'Int32', i64: 'Int64', text: 'Utf8', flag: 'Bool', at: 'Timestamp<MILLISECOND>', bytes: 'Binary', vec: 'List<Float32>',
};

/** The fixture split into its two blocks, as a write task receives them. */
const fixtureBlocks = (): Block[] => {
  const table = fixture();
  return [table.slice(0, 4), table.slice(4)];
};

describe('round trips', () => {
  it('Parquet keeps every type', async () => {
    const directory = scratch('parquet');
    const sink = new ParquetDatasink(directory);
    await sink.onWriteStart();
    const result = await sink.write(fixtureBlocks(), context(3));
    expect(result).toEqual({ path: join(directory, 'job1_000003.parquet'), rows: 5, bytes: statSync(join(directory, 'job1_000003.parquet')).size });
    const { blocks } = await readAll(parquetSource(directory));
    const table = concatBlocks(blocks);
    expect(typesOf(table)).toEqual(fixtureTypes);
    expect(blockToRows(table)).toEqual(blockToRows(fixture()));
  });

  it('Parquet reads only the columns asked for, and decodes dictionaries to utf8', async () => {
    const directory = scratch('parquet-columns');
    const { Dictionary } = await import('apache-arrow');
    const block = new Table({
      keep: vectorFromArray(['x', 'y', 'x'], new Dictionary(new Utf8(), new Int32())),
      drop: vectorFromArray([1, 2, 3], new Float64()),
    });
    await new ParquetDatasink(directory).write([block], context());
    const { blocks } = await readAll(parquetSource(directory, { columns: ['keep'] }));
    expect(typesOf(blocks[0])).toEqual({ keep: 'Utf8' });
    expect(blockToRows(blocks[0])).toEqual([{ keep: 'x' }, { keep: 'y' }, { keep: 'x' }]);
    const kept = await readAll(parquetSource(directory, { keepDictionaries: true }));
    expect(typesOf(kept.blocks[0]).keep).toBe('Dictionary<Int32, Utf8>');
    const missing = await rejection(readAll(parquetSource(directory, { columns: ['keep', 'nope'] })));
    expect(missing.code).toBe('ERR_DATA_SCHEMA');
    expect(missing.message).toContain("no column 'nope'");
  });

  for (const format of ['file', 'stream'] as const) {
    it(`Arrow IPC (${format} format) keeps every type`, async () => {
      const directory = scratch(`arrow-${format}`);
      const result = await new ArrowDatasink(directory, { format }).write(fixtureBlocks(), context(0));
      expect(basename(result.path!)).toBe(format === 'file' ? 'job1_000000.arrow' : 'job1_000000.arrows');
      // Other readers see a plain IPC file or stream.
      expect(tableFromIPC(readFileSync(result.path!)).numRows).toBe(5);
      const { blocks } = await readAll(arrowSource(directory));
      const table = concatBlocks(blocks);
      expect(typesOf(table)).toEqual(fixtureTypes);
      expect(blockToRows(table)).toEqual(blockToRows(fixture()));
    });
  }

  it('Arrow IPC reads only the columns asked for', async () => {
    const directory = scratch('arrow-columns');
    await new ArrowDatasink(directory).write(fixtureBlocks(), context());
    const { blocks } = await readAll(arrowSource(directory, { columns: ['text', 'f64'] }));
    expect(Object.keys(typesOf(blocks[0]))).toEqual(['text', 'f64']);
    const error = await rejection(readAll(arrowSource(directory, { columns: ['nope'] })));
    expect(error.code).toBe('ERR_DATA_SCHEMA');
  });

  it('JSONL with the schema keeps every type', async () => {
    const directory = scratch('jsonl');
    const result = await new JsonlDatasink(directory).write(fixtureBlocks(), context(1));
    expect(basename(result.path!)).toBe('job1_000001.jsonl');
    const lines = readFileSync(result.path!, 'utf8').trimEnd().split('\n');
    expect(lines).toHaveLength(5);
    // Timestamps as ISO strings, binary as base64, unsafe 64-bit integers as strings.
    expect(JSON.parse(lines[0])).toMatchObject({ at: '2024-01-02T03:04:05.000Z', bytes: 'AQID', i64: 1 });
    expect(JSON.parse(lines[3]).i64).toBe('9007199254740993');
    const { blocks } = await readAll(jsonlSource(directory, { schema: fixture().schema }));
    const table = concatBlocks(blocks);
    expect(typesOf(table)).toEqual(fixtureTypes);
    expect(blockToRows(table)).toEqual(blockToRows(fixture()));
  });

  it('JSONL without a schema infers JSON types', async () => {
    const directory = scratch('jsonl-inferred');
    await new JsonlDatasink(directory).write([fixture().select(['f64', 'i32', 'text', 'flag', 'at', 'bytes', 'vec'])], context());
    const { blocks } = await readAll(jsonlSource(directory));
    expect(typesOf(blocks[0])).toEqual({
      f64: 'Float64', i32: 'Float64', text: 'Utf8', flag: 'Bool', at: 'Utf8', bytes: 'Utf8', vec: 'List<Float64>',
    });
    expect(blockToRows(blocks[0])[0]).toEqual({ f64: 1.5, i32: 1, text: 'a', flag: true, at: '2024-01-02T03:04:05.000Z', bytes: 'AQID', vec: [1, 2.5] });
  });

  it('CSV with the schema keeps every type, quoting commas, quotes, line breaks and the empty string', async () => {
    const directory = scratch('csv');
    const result = await new CsvDatasink(directory).write(fixtureBlocks(), context(2));
    expect(basename(result.path!)).toBe('job1_000002.csv');
    const text = readFileSync(result.path!, 'utf8');
    expect(text.split('\n')[0]).toBe('f64,i32,i64,text,flag,at,bytes,vec');
    expect(text).toContain('"comma, and ""quotes"""');
    expect(text).toContain('"line\nbreak"');
    const { blocks } = await readAll(csvSource(directory, { schema: fixture().schema }));
    const table = concatBlocks(blocks);
    expect(typesOf(table)).toEqual(fixtureTypes);
    expect(blockToRows(table)).toEqual(blockToRows(fixture()));
  });

  it('CSV without a schema infers float64, bool, utf8 and null', async () => {
    const directory = scratch('csv-inferred');
    await new CsvDatasink(directory).write(fixtureBlocks(), context());
    const { blocks } = await readAll(csvSource(directory));
    const table = concatBlocks(blocks);
    expect(typesOf(table)).toEqual({
      f64: 'Float64', i32: 'Float64', i64: 'Float64', text: 'Utf8', flag: 'Bool', at: 'Utf8', bytes: 'Utf8', vec: 'Utf8',
    });
    const rows = blockToRows(table);
    expect(rows.map((row) => row.text)).toEqual(['a', '', 'comma, and "quotes"', null, 'line\nbreak']);
    expect(rows.map((row) => row.f64)).toEqual([1.5, -2, null, 1e300, 0.1]);
    expect(rows.map((row) => row.flag)).toEqual([true, false, null, true, false]);
    expect(rows[0].vec).toBe('[1,2.5]');
  });

  it('CSV reads other delimiters, doubled quotes and quoted line breaks', async () => {
    const directory = scratch('csv-delimiter');
    writeFileSync(join(directory, 'a.csv'), 'name;note;n\r\n"x;y";"say ""hi""";1\r\nz;"two\r\nlines";\r\n\r\nTRUE;;-3e2\r\n');
    const { blocks } = await readAll(csvSource(directory, { delimiter: ';' }));
    expect(typesOf(blocks[0])).toEqual({ name: 'Utf8', note: 'Utf8', n: 'Float64' });
    expect(blockToRows(blocks[0])).toEqual([
      { name: 'x;y', note: 'say "hi"', n: 1 },
      { name: 'z', note: 'two\nlines', n: null },
      { name: 'TRUE', note: null, n: -300 },
    ]);
  });

  it('CSV types all-true/false columns as bool and all-empty columns as null', async () => {
    const path = join(scratch('csv-types'), 'a.csv');
    writeFileSync(path, 'a,b,c\ntrue,,1\nFalse,,x\n');
    const { blocks } = await readAll(csvSource(path));
    expect(typesOf(blocks[0])).toEqual({ a: 'Bool', b: 'Null', c: 'Utf8' });
    expect(blockToRows(blocks[0])).toEqual([{ a: true, b: null, c: '1' }, { a: false, b: null, c: 'x' }]);
  });
});

describe('sinks', () => {
  it('create their directory, write to a temp name, and leave no temp file', async () => {
    const directory = join(scratch('sink'), 'nested', 'out');
    const sink = new JsonlDatasink(directory);
    await sink.onWriteStart();
    expect(statSync(directory).isDirectory()).toBe(true);
    const results: WrittenFile[] = [];
    for (let task = 0; task < 3; task++) results.push(await sink.write([rowsToBlock([{ task }])], context(task, 0, 'w42')));
    // A crashed attempt's leftover: hidden, so readers skip it, and removed when the job completes.
    writeFileSync(join(directory, '.w42_000001.jsonl.0.12345.tmp'), '{"partial":');
    expect((await readAll(jsonlSource(directory))).blocks.flatMap((block) => blockToRows(block))).toEqual([{ task: 0 }, { task: 1 }, { task: 2 }]);
    await sink.onWriteComplete(results);
    expect(readdirSync(directory).sort()).toEqual(['w42_000000.jsonl', 'w42_000001.jsonl', 'w42_000002.jsonl']);
    expect(results.map((result) => result.rows)).toEqual([1, 1, 1]);
    expect(results[1].bytes).toBe(statSync(results[1].path!).size);
  });

  it('a retried attempt replaces the file whole', async () => {
    const directory = scratch('sink-retry');
    const sink = new CsvDatasink(directory);
    await sink.write([rowsToBlock([{ a: 1 }, { a: 2 }])], context(0, 0));
    const second = await sink.write([rowsToBlock([{ a: 3 }])], context(0, 1));
    expect(readdirSync(directory)).toEqual(['job1_000000.csv']);
    expect(readFileSync(second.path!, 'utf8')).toBe('a\n3\n');
  });

  it('a write that fails leaves neither the file nor its temp file', async () => {
    const directory = scratch('sink-fail');
    const sink = new CsvDatasink(directory);
    const error = await rejection(sink.write([rowsToBlock([{ a: 1 }]), rowsToBlock([{ b: 1 }])], context()));
    expect(error.code).toBe('ERR_DATA_SCHEMA');
    expect(readdirSync(directory)).toEqual([]);
    const parquetError = await rejection(new ParquetDatasink(directory).write([rowsToBlock([{ a: 1 }]), rowsToBlock([{ a: 'x' }])], context()));
    expect(parquetError.code).toBe('ERR_DATA_SCHEMA');
    expect(readdirSync(directory)).toEqual([]);
  });

  it('a task without blocks writes no file', async () => {
    const directory = scratch('sink-empty');
    expect(await new ParquetDatasink(directory).write([], context())).toEqual({ path: null, rows: 0, bytes: 0 });
    expect(readdirSync(directory)).toEqual([]);
  });

  it('travel to workers by their fields', async () => {
    const directory = scratch('sink-shipped');
    for (const sink of [new JsonlDatasink(directory), new CsvDatasink(directory, { delimiter: '\t' }), new ParquetDatasink(directory, { compression: 'zstd' }), new ArrowDatasink(directory, { format: 'stream' })]) {
      const shipped = unpack(pack(shipInstance(sink, 'write'))) as ReturnType<typeof shipInstance>;
      const revived = await reviveInstance<typeof sink>(shipped);
      expect(revived).toBeInstanceOf(sink.constructor);
      const result = await revived.write([rowsToBlock([{ a: 1, b: 'x' }])], context(7, 0, sink.name));
      expect(result.rows).toBe(1);
      expect(existsSync(result.path!)).toBe(true);
    }
    expect(readFileSync(join(directory, 'CSV_000007.csv'), 'utf8')).toBe('a\tb\n1\tx\n');
  });

  it('refuse a path that is a file, and bad options', async () => {
    const file = join(scratch('sink-bad'), 'file.txt');
    writeFileSync(file, '');
    expect((await rejection(() => new JsonlDatasink(file))).code).toBe('ERR_DATA_PATH');
    expect((await rejection(() => new CsvDatasink(scratch('x'), { delimiter: '""' }))).code).toBe('ERR_INVALID_ARGUMENT');
    expect((await rejection(() => new ParquetDatasink(scratch('x'), { compression: 'lzma' as never }))).code).toBe('ERR_INVALID_ARGUMENT');
  });
});

describe('parallelism', () => {
  const writeLines = (path: string, count: number, line: (index: number) => string) =>
    writeFileSync(path, Array.from({ length: count }, (_, index) => `${line(index)}\n`).join(''));

  it('spreads files over tasks, at most one task per requested unit of parallelism', async () => {
    const directory = scratch('two-files');
    writeLines(join(directory, 'b.jsonl'), 50, (index) => JSON.stringify({ file: 'b', index }));
    writeLines(join(directory, 'a.jsonl'), 50, (index) => JSON.stringify({ file: 'a', index }));
    const source = jsonlSource(directory);
    const two = await source.getReadTasks(2);
    expect(two.map((task) => task.metadata.inputFiles)).toEqual([[join(directory, 'a.jsonl')], [join(directory, 'b.jsonl')]]);
    expect(two[0].metadata.bytes).toBe(statSync(join(directory, 'a.jsonl')).size);
    expect((await source.getReadTasks(1)).map((task) => task.metadata.inputFiles)).toEqual([[join(directory, 'a.jsonl'), join(directory, 'b.jsonl')]]);
    // Small files are not worth splitting: still one task each.
    expect(await source.getReadTasks(8)).toHaveLength(2);
    const rows = (await readAll(source, 2)).blocks.flatMap((block) => blockToRows(block));
    expect(rows.map((row) => `${row.file}${row.index}`)).toEqual([...Array.from({ length: 50 }, (_, i) => `a${i}`), ...Array.from({ length: 50 }, (_, i) => `b${i}`)]);
    expect((await rejection(() => source.getReadTasks(0))).code).toBe('ERR_INVALID_ARGUMENT');
  });

  it('balances many files by bytes, keeping their order', async () => {
    const directory = scratch('many-files');
    const sizes = [10, 200, 10, 10, 200, 10, 10, 10];
    sizes.forEach((rows, file) => writeLines(join(directory, `f${file}.csv`), rows + 1, (index) => (index === 0 ? 'file,index' : `${file},${index}`)));
    const tasks = await csvSource(directory).getReadTasks(3);
    expect(tasks.length).toBeLessThanOrEqual(3);
    expect(tasks.flatMap((task) => task.metadata.inputFiles)).toEqual(sizes.map((_, file) => join(directory, `f${file}.csv`)));
    const bytes = tasks.map((task) => task.metadata.bytes!);
    expect(Math.max(...bytes)).toBeLessThan(0.6 * bytes.reduce((sum, value) => sum + value, 0));
  });

  it('splits one large JSONL file into byte ranges that read every line exactly once', async () => {
    const path = join(scratch('big-jsonl'), 'big.jsonl');
    // Lines of varied length, so range boundaries fall inside lines.
    writeLines(path, 3000, (index) => JSON.stringify({ id: index, pad: 'é'.repeat(index % 37) }));
    const source = jsonlSource(path, { minSplitBytes: 1024, rowsPerBlock: 500 });
    const { tasks, blocks } = await readAll(source, 4);
    expect(tasks).toHaveLength(4);
    expect(tasks.reduce((sum, task) => sum + task.metadata.bytes!, 0)).toBe(statSync(path).size);
    const ids = blocks.flatMap((block) => blockToRows(block).map((row) => row.id));
    expect(ids).toEqual(Array.from({ length: 3000 }, (_, index) => index));
    expect(Math.max(...blocks.map((block) => block.numRows))).toBeLessThanOrEqual(500);
  });

  it('splits at boundaries that fall exactly on line starts', async () => {
    const path = join(scratch('aligned-jsonl'), 'aligned.jsonl');
    // 400 lines of 25 bytes: the quarter points are line starts.
    writeLines(path, 400, (index) => JSON.stringify({ id: index, p: 'x'.repeat(24 - 17 - String(index).length) }).padEnd(24, ' '));
    expect(statSync(path).size).toBe(10_000);
    const { tasks, blocks } = await readAll(jsonlSource(path, { minSplitBytes: 100 }), 4);
    expect(tasks).toHaveLength(4);
    const perTask = await Promise.all(tasks.map(async (task) => (await readTask(task)).reduce((sum, block) => sum + block.numRows, 0)));
    expect(perTask).toEqual([100, 100, 100, 100]);
    expect(blocks.flatMap((block) => blockToRows(block).map((row) => row.id))).toEqual(Array.from({ length: 400 }, (_, index) => index));
  });

  it('splits one large CSV file, every range reading the header from the start', async () => {
    const path = join(scratch('big-csv'), 'big.csv');
    writeLines(path, 2001, (index) => (index === 0 ? 'id,name,ok' : `${index - 1},"n ${'z'.repeat(index % 13)}",${index % 2 === 0}`));
    const { tasks, blocks } = await readAll(csvSource(path, { minSplitBytes: 1024 }), 3);
    expect(tasks).toHaveLength(3);
    for (const block of blocks) expect(typesOf(block)).toEqual({ id: 'Float64', name: 'Utf8', ok: 'Bool' });
    expect(blocks.flatMap((block) => blockToRows(block).map((row) => row.id))).toEqual(Array.from({ length: 2000 }, (_, index) => index));
  });

  it('reads a CSV file whole when quoted line breaks are allowed, and says so when a split file has one', async () => {
    const path = join(scratch('csv-newlines'), 'n.csv');
    writeLines(path, 1001, (index) => (index === 0 ? 'id,note' : index === 900 ? `${index},"two\nlines"` : `${index},plain`));
    const whole = await readAll(csvSource(path, { minSplitBytes: 64, quotedNewlines: true }), 4);
    expect(whole.tasks).toHaveLength(1);
    expect(concatBlocks(whole.blocks).numRows).toBe(1000);
    const error = await rejection(readAll(csvSource(path, { minSplitBytes: 64 }), 4));
    expect(error.code).toBe('ERR_DATA_PARSE');
    expect(error.message).toContain(`'${path}', line 901`);
    expect(error.message).toContain('quotedNewlines');
  });

  it('splits a Parquet file by row groups', async () => {
    const directory = scratch('parquet-groups');
    const rows: Row[] = Array.from({ length: 1000 }, (_, index) => ({ id: index, name: `n${index}` }));
    await new ParquetDatasink(directory, { rowGroupRows: 100 }).write([rowsToBlock(rows)], context());
    const { tasks, blocks } = await readAll(parquetSource(directory), 4);
    expect(tasks).toHaveLength(4);
    for (const task of tasks) expect(task.metadata.rows).toBeGreaterThanOrEqual(200);
    expect(tasks.reduce((sum, task) => sum + task.metadata.rows!, 0)).toBe(1000);
    expect(blocks).toHaveLength(10);
    expect(blocks.flatMap((block) => blockToRows(block))).toEqual(rows);
  });

  it('splits an Arrow IPC file by record batches', async () => {
    const directory = scratch('arrow-batches');
    const parts = Array.from({ length: 4 }, (_, part) => rowsToBlock(Array.from({ length: 25 }, (_, index) => ({ id: part * 25 + index }))));
    await new ArrowDatasink(directory).write(parts, context());
    const { tasks, blocks } = await readAll(arrowSource(directory, { blockBytes: 1 }), 2);
    expect(tasks).toHaveLength(2);
    expect(blocks.map((block) => block.numRows)).toEqual([25, 25, 25, 25]);
    expect(blocks.flatMap((block) => blockToRows(block).map((row) => row.id))).toEqual(Array.from({ length: 100 }, (_, index) => index));
  });

  it('rowIds: each row an id, unique and the same however the files are split across tasks', async () => {
    const directory = scratch('row-ids');
    writeLines(join(directory, 'a.jsonl'), 600, (index) => JSON.stringify({ n: index, pad: 'é'.repeat(index % 29) }));
    writeLines(join(directory, 'b.csv'), 601, (index) => (index === 0 ? 'n,pad' : `${index - 1},"${'q'.repeat(index % 11)}"`));
    const rows: Row[] = Array.from({ length: 600 }, (_, n) => ({ n }));
    await new ParquetDatasink(join(directory, 'pq'), { rowGroupRows: 100 }).write([rowsToBlock(rows)], context());
    await new ArrowDatasink(join(directory, 'arrow')).write(Array.from({ length: 6 }, (_, part) => rowsToBlock(rows.slice(part * 100, part * 100 + 100))), context());
    const sources = [
      (split: boolean) => jsonlSource(join(directory, 'a.jsonl'), { rowIds: 'rid', ...(split ? { minSplitBytes: 256, rowsPerBlock: 70 } : {}) }),
      (split: boolean) => csvSource(join(directory, 'b.csv'), { rowIds: 'rid', ...(split ? { minSplitBytes: 256, rowsPerBlock: 70 } : {}) }),
      (_split: boolean) => parquetSource(join(directory, 'pq'), { rowIds: 'rid' }),
      (split: boolean) => arrowSource(join(directory, 'arrow'), { rowIds: 'rid', ...(split ? { blockBytes: 1 } : {}) }),
    ];
    const seen = new Set<unknown>();
    for (const source of sources) {
      const idsBy = async (split: boolean, parallelism: number) => {
        const { tasks, blocks } = await readAll(source(split), parallelism);
        if (split && parallelism > 1) expect(tasks.length).toBeGreaterThan(1);
        return new Map(blocks.flatMap((block) => blockToRows(block).map((row) => [row.n, row.rid] as const)));
      };
      const whole = await idsBy(false, 1);
      const split = await idsBy(true, 4);
      expect(whole.size).toBe(600);
      expect(new Set(whole.values()).size).toBe(600);
      expect([...split.entries()].sort((a, b) => (a[0] as number) - (b[0] as number))).toEqual([...whole.entries()].sort((a, b) => (a[0] as number) - (b[0] as number)));
      for (const id of whole.values()) {
        expect(id).toMatch(/^[0-9a-f]{12}:[0-9.]+$/);
        expect(seen.has(id)).toBe(false);
        seen.add(id);
      }
    }
    const taken = await rejection(readAll(jsonlSource(join(directory, 'a.jsonl'), { rowIds: 'pad' })));
    expect(taken.code).toBe('ERR_DATA_COLUMN');
    expect(taken.message).toContain("has a column 'pad' already");
    expect((await rejection(() => parquetSource(join(directory, 'pq'), { rowIds: '' }))).code).toBe('ERR_DATA_COLUMN');
  });

  it('hands on a block every rowsPerBlock rows', async () => {
    const path = join(scratch('rows-per-block'), 'r.jsonl');
    writeLines(path, 10, (index) => JSON.stringify({ index }));
    const { blocks } = await readAll(jsonlSource(path, { rowsPerBlock: 3 }));
    expect(blocks.map((block) => block.numRows)).toEqual([3, 3, 3, 1]);
    const csvPath = join(scratch('rows-per-block-csv'), 'r.csv');
    writeLines(csvPath, 11, (index) => (index === 0 ? 'index' : String(index)));
    expect((await readAll(csvSource(csvPath, { rowsPerBlock: 4 }))).blocks.map((block) => block.numRows)).toEqual([4, 4, 2]);
  });

  it('keeps a column type across the blocks of a task when later values are missing', async () => {
    const path = join(scratch('sparse'), 's.jsonl');
    writeFileSync(path, '{"a":1,"b":"x"}\n{"a":2}\n{"a":null,"b":null}\n');
    const { blocks } = await readAll(jsonlSource(path, { rowsPerBlock: 1 }));
    expect(blocks.map(typesOf)).toEqual([{ a: 'Float64', b: 'Utf8' }, { a: 'Float64', b: 'Utf8' }, { a: 'Float64', b: 'Utf8' }]);
    expect(concatBlocks(blocks).numRows).toBe(3);
  });

  it('read tasks carry only plain data, which the worker codec accepts', async () => {
    const directory = scratch('task-args');
    writeFileSync(join(directory, 'a.jsonl'), '{"a":1}\n');
    const schema = new Schema([new Field('a', new Int32(), true)]);
    for (const task of await jsonlSource(directory, { schema }).getReadTasks(1)) {
      const args = unpack(pack(task.args)) as unknown[];
      expect(args).toEqual(task.args);
    }
  });
});

describe('malformed input', () => {
  it('a malformed JSONL line names the file and the line', async () => {
    const path = join(scratch('bad-jsonl'), 'bad.jsonl');
    writeFileSync(path, '{"a":1}\n\n{"a":2,}\n{"a":3}\n');
    const error = await rejection(readAll(jsonlSource(path)));
    expect(error.code).toBe('ERR_DATA_PARSE');
    expect(error.message).toContain(`'${path}', line 3`);
  });

  it('names the line counted from the file start when the line is in a later range', async () => {
    const path = join(scratch('bad-jsonl-range'), 'bad.jsonl');
    const lines = Array.from({ length: 1000 }, (_, index) => (index === 899 ? '{"id": oops}' : JSON.stringify({ id: index })));
    writeFileSync(path, `${lines.join('\n')}\n`);
    const tasks = await jsonlSource(path, { minSplitBytes: 100 }).getReadTasks(4);
    const error = await rejection(readTask(tasks[3]));
    expect(error.message).toContain(`'${path}', line 900`);
  });

  it('a JSONL line that is not an object is refused; blank lines are skipped', async () => {
    const path = join(scratch('array-jsonl'), 'a.jsonl');
    writeFileSync(path, '{"a":1}\n   \n[1,2]\n');
    const error = await rejection(readAll(jsonlSource(path)));
    expect(error.message).toMatch(/line 3: expected a JSON object, got an array/);
  });

  it('a JSONL value that does not fit the schema names file, line and column', async () => {
    const path = join(scratch('schema-jsonl'), 'a.jsonl');
    writeFileSync(path, '{"a":1}\n{"a":"x"}\n');
    const error = await rejection(readAll(jsonlSource(path, { schema: new Schema([new Field('a', new Int32(), true)]) })));
    expect(error.code).toBe('ERR_DATA_PARSE');
    expect(error.message).toContain(`'${path}', line 2: column 'a'`);
  });

  it('mixed types in a JSONL column name the column and the file', async () => {
    const path = join(scratch('mixed-jsonl'), 'm.jsonl');
    writeFileSync(path, '{"a":1}\n{"a":"x"}\n');
    const error = await rejection(readAll(jsonlSource(path)));
    expect(error.code).toBe('ERR_DATA_TYPE');
    expect(error.message).toContain(path);
    expect(error.message).toContain("column 'a'");
  });

  it('an unbalanced CSV quote names the file and the line where the field opened', async () => {
    const path = join(scratch('bad-csv'), 'bad.csv');
    writeFileSync(path, 'a,b\n1,2\n3,"open\n4,5\n');
    const error = await rejection(readAll(csvSource(path)));
    expect(error.code).toBe('ERR_DATA_PARSE');
    expect(error.message).toContain(`'${path}', line 3: unbalanced quote`);
  });

  it('a CSV record with the wrong number of fields, or text after a closing quote, names the line', async () => {
    const path = join(scratch('bad-csv-fields'), 'f.csv');
    writeFileSync(path, 'a,b\n1,2\n3\n');
    expect((await rejection(readAll(csvSource(path)))).message).toContain(`'${path}', line 3: expected 2 fields as in the header, found 1`);
    writeFileSync(path, 'a,b\n"x"y,2\n');
    expect((await rejection(readAll(csvSource(path)))).message).toContain(`'${path}', line 2: unexpected "y" after the closing quote`);
    writeFileSync(path, 'a,a\n1,2\n');
    expect((await rejection(readAll(csvSource(path)))).message).toContain("names column 'a' twice");
  });

  it('a file that is not Parquet or Arrow is a parse error naming it', async () => {
    const directory = scratch('not-binary');
    writeFileSync(join(directory, 'x.parquet'), 'not parquet at all');
    writeFileSync(join(directory, 'x.arrow'), 'not arrow at all');
    const parquetError = await rejection(readAll(parquetSource(join(directory, 'x.parquet'))));
    expect(parquetError.code).toBe('ERR_DATA_PARSE');
    expect(parquetError.message).toContain('x.parquet');
    const arrowError = await rejection(readAll(arrowSource(join(directory, 'x.arrow'))));
    expect(arrowError.code).toBe('ERR_DATA_PARSE');
    expect(arrowError.message).toContain('x.arrow');
  });
});

describe('paths', () => {
  it('a missing path is refused at once, naming it', async () => {
    const missing = join(root, 'does-not-exist.jsonl');
    const present = join(scratch('present'), 'a.csv');
    writeFileSync(present, 'a\n1\n');
    for (const make of [() => jsonlSource(missing), () => csvSource([present, missing]), () => arrowSource(missing), () => parquetSource(missing)]) {
      const error = await rejection(make);
      expect(error.code).toBe('ERR_DATA_PATH');
      expect(error.message).toContain(missing);
    }
  });

  it('a directory without matching files is refused, naming it', async () => {
    const empty = scratch('empty');
    expect((await rejection(() => jsonlSource(empty))).code).toBe('ERR_DATA_PATH');
    const other = scratch('other');
    writeFileSync(join(other, 'notes.txt'), 'x');
    writeFileSync(join(other, '.hidden.csv'), 'a\n1\n');
    const error = await rejection(() => csvSource(other));
    expect(error.code).toBe('ERR_DATA_PATH');
    expect(error.message).toContain(other);
    expect(error.message).toContain('.csv');
    expect((await rejection(() => jsonlSource([]))).code).toBe('ERR_DATA_PATH');
  });

  it('a directory contributes its matching files recursively, sorted, without hidden and _ files', async () => {
    const directory = scratch('listing');
    mkdirSync(join(directory, 'part=1'));
    for (const name of ['b.jsonl', 'a.ndjson', 'part=1/c.jsonl', '_SUCCESS', '.tmp.jsonl', 'skip.txt', '_meta.jsonl']) writeFileSync(join(directory, name), '{"x":1}\n');
    const source = jsonlSource(directory);
    expect(source.files.map((file) => file.path.slice(directory.length + 1))).toEqual(['a.ndjson', 'b.jsonl', 'part=1/c.jsonl']);
    // A file named directly is read whatever its extension; options can choose extensions.
    expect(jsonlSource(join(directory, 'skip.txt')).files).toHaveLength(1);
    expect(jsonlSource(directory, { extensions: ['txt'] }).files.map((file) => basename(file.path))).toEqual(['skip.txt']);
  });

  it('empty files give no rows', async () => {
    const directory = scratch('empty-files');
    writeFileSync(join(directory, 'a.jsonl'), '');
    writeFileSync(join(directory, 'a.csv'), '');
    expect((await readAll(jsonlSource(join(directory, 'a.jsonl')))).blocks).toEqual([]);
    expect((await readAll(csvSource(join(directory, 'a.csv')))).blocks).toEqual([]);
  });
});

/** Every row a source's read tasks give, and the tasks. */
async function readRows(source: Datasource, parallelism = 1): Promise<{ tasks: ReadTask[]; rows: Row[] }> {
  const { tasks, blocks } = await readAll(source, parallelism);
  return { tasks, rows: blocks.flatMap((block) => blockToRows(block)) };
}

/** A sink as a write task gets it: shipped to a worker by its fields and rebuilt there. */
async function shipped<T extends object>(sink: T): Promise<T> {
  return reviveInstance<T>(unpack(pack(shipInstance(sink, 'write'))) as ReturnType<typeof shipInstance>);
}

const jsonlText = (count: number, from = 0): string =>
  Array.from({ length: count }, (_, index) => `${JSON.stringify({ id: from + index, name: `row ${from + index}` })}\n`).join('');

describe('compressed text files', () => {
  it('gzip and brotli JSONL and CSV files read as their text, by suffix, each file whole', async () => {
    const directory = scratch('compressed');
    writeFileSync(join(directory, 'a.jsonl.gz'), gzipSync(jsonlText(3000)));
    writeFileSync(join(directory, 'b.jsonl.br'), brotliCompressSync(jsonlText(2000, 3000)));
    writeFileSync(join(directory, 'c.jsonl'), jsonlText(1000, 5000));
    const source = jsonlSource(directory);
    expect(source.files.map((file) => [basename(file.path), file.compression])).toEqual([['a.jsonl.gz', 'gzip'], ['b.jsonl.br', 'brotli'], ['c.jsonl', undefined]]);
    // Small blocks: a compressed file still streams in many blocks.
    const { tasks, rows } = await readRows(jsonlSource(directory, { rowsPerBlock: 500 }), 8);
    expect(rows.map((row) => row.id)).toEqual(Array.from({ length: 6000 }, (_, index) => index));
    expect(rows[3001]).toEqual({ id: 3001, name: 'row 3001' });
    // Its estimate counts text, not compressed bytes.
    expect(tasks.reduce((sum, task) => sum + (task.metadata.bytes ?? 0), 0)).toBeGreaterThan(statSync(join(directory, 'a.jsonl.gz')).size * 4);

    const csv = join(scratch('csv-gz'), 'table.csv.gz');
    writeFileSync(csv, gzipSync('id,label\n1,one\n2,"two, quoted"\n3,three\n'));
    expect((await readRows(csvSource(csv))).rows).toEqual([{ id: 1, label: 'one' }, { id: 2, label: 'two, quoted' }, { id: 3, label: 'three' }]);
  });

  it("a large plain file is split across tasks and a compressed one is not; 'none' and a named codec override the suffix", async () => {
    const directory = scratch('split');
    writeFileSync(join(directory, 'big.jsonl'), jsonlText(20_000));
    writeFileSync(join(directory, 'big.jsonl.gz'), gzipSync(jsonlText(20_000)));
    const plain = await jsonlSource(join(directory, 'big.jsonl'), { minSplitBytes: 64 << 10 }).getReadTasks(4);
    expect(plain.length).toBe(4);
    const compressed = await jsonlSource(join(directory, 'big.jsonl.gz'), { minSplitBytes: 64 << 10 }).getReadTasks(4);
    expect(compressed.length).toBe(1);
    // A gzip file without the suffix, named as gzip; a .gz file that is plain text, read as it is.
    writeFileSync(join(directory, 'noext.data'), gzipSync(jsonlText(5)));
    expect((await readRows(jsonlSource(join(directory, 'noext.data'), { compression: 'gzip' }))).rows).toHaveLength(5);
    writeFileSync(join(directory, 'plain.jsonl.gz'), jsonlText(4));
    expect((await readRows(jsonlSource(join(directory, 'plain.jsonl.gz'), { compression: 'none' }))).rows).toHaveLength(4);
  });

  it('row ids of a compressed file are offsets in its text, as the plain file gives them', async () => {
    const directory = scratch('ids');
    const text = jsonlText(50);
    writeFileSync(join(directory, 'rows.jsonl'), text);
    writeFileSync(join(directory, 'rows.jsonl.gz'), gzipSync(text));
    const plain = (await readRows(jsonlSource(join(directory, 'rows.jsonl'), { rowIds: 'rowId' }))).rows.map((row) => String(row.rowId).split(':')[1]);
    const compressed = (await readRows(jsonlSource(join(directory, 'rows.jsonl.gz'), { rowIds: 'rowId' }))).rows.map((row) => String(row.rowId).split(':')[1]);
    expect(compressed).toEqual(plain);
    expect(new Set(compressed).size).toBe(50);
  });

  it('a malformed line names its line in the decompressed text; corrupt or truncated data is a typed error naming the file', async () => {
    const directory = scratch('bad');
    const malformed = join(directory, 'malformed.jsonl.gz');
    writeFileSync(malformed, gzipSync(`${jsonlText(7)}{"id": oops}\n`));
    const error = await rejection(readAll(jsonlSource(malformed)));
    expect(error.message).toContain('line 8');
    expect(error.message).toContain(malformed);

    const corrupt = join(directory, 'corrupt.jsonl.gz');
    writeFileSync(corrupt, Buffer.from('this is not gzip at all\n'));
    const corruptError = await rejection(readAll(jsonlSource(corrupt)));
    expect(corruptError.message).toContain(corrupt);
    expect(corruptError.message).toContain('gzip');

    const truncated = join(directory, 'truncated.jsonl.gz');
    const whole = gzipSync(jsonlText(2000));
    writeFileSync(truncated, whole.subarray(0, Math.floor(whole.length / 2)));
    const truncatedError = await rejection(readAll(jsonlSource(truncated)));
    expect(truncatedError.message).toContain(truncated);

    expect((await rejection(() => jsonlSource(malformed, { compression: 'lz77' as never }))).code).toBe('ERR_DATA_COMPRESSION');
  });

  it.skipIf(zstdAvailable)('zstd files are refused at the call with the Node.js version they need', async () => {
    const path = join(scratch('zstd'), 'a.jsonl.zst');
    writeFileSync(path, Buffer.from([0x28, 0xb5, 0x2f, 0xfd]));
    const error = await rejection(() => jsonlSource(path));
    expect(error.code).toBe('ERR_DATA_COMPRESSION');
    expect(error.message).toContain('22.15');
    expect((await rejection(() => new JsonlDatasink(scratch('zstd-out'), { compression: 'zstd' }))).code).toBe('ERR_DATA_COMPRESSION');
  });

  it('JSONL and CSV sinks write gzip and brotli files that read back, and overwrite finds them', async () => {
    const block: Block = new Table({ id: vectorFromArray(Array.from({ length: 5000 }, (_, index) => index), new Int32()), text: vectorFromArray(Array.from({ length: 5000 }, (_, index) => `line ${index}, "quoted"`), new Utf8()) });
    const directory = scratch('written');
    const gzip = await shipped(new JsonlDatasink(directory, { compression: 'gzip' }));
    const brotli = await shipped(new CsvDatasink(directory, { compression: 'brotli' }));
    await gzip.onWriteStart();
    const jsonl = (await gzip.write([block], context(0))) as WrittenFile;
    const csv = (await brotli.write([block], context(1))) as WrittenFile;
    expect(basename(jsonl.path!)).toBe('job1_000000.jsonl.gz');
    expect(basename(csv.path!)).toBe('job1_000001.csv.br');
    // Compressed: far smaller than its text.
    expect(jsonl.bytes).toBeLessThan(gunzipSync(readFileSync(jsonl.path!)).length / 3);
    expect((await readRows(jsonlSource(directory))).rows).toEqual(blockToRows(block));
    expect((await readRows(csvSource(directory))).rows).toEqual(blockToRows(block));
    // The write id is found past the compression suffix (the job's temp files are found by it).
    const again = new JsonlDatasink(directory, { compression: 'gzip' });
    await again.onWriteComplete([jsonl]);
    // 'overwrite' removes the format's files, compressed or not, and nothing else.
    writeFileSync(join(directory, 'notes.txt'), 'keep');
    expect(await new JsonlDatasink(directory).prepareDirectory('overwrite')).toBe(true);
    expect(readdirSync(directory).sort()).toEqual(['job1_000001.csv.br', 'notes.txt']);
    expect((await rejection(() => new CsvDatasink(directory, { compression: 'zip' as never }))).code).toBe('ERR_DATA_COMPRESSION');
  });

  it('a checkpointed (staged) compressed write commits into place', async () => {
    const directory = scratch('staged');
    const sink = new JsonlDatasink(directory, { compression: 'gzip' });
    const block: Block = new Table({ id: vectorFromArray([1, 2, 3], new Int32()) });
    const staged = (await sink.write([block], { ...context(0), staged: true })) as WrittenFile;
    expect(readdirSync(directory).filter((name) => !name.startsWith('.'))).toEqual([]);
    const committed = await sink.commit(staged);
    expect(basename(committed.path!)).toBe('job1_000000.jsonl.gz');
    expect((await readRows(jsonlSource(directory))).rows).toEqual([{ id: 1 }, { id: 2 }, { id: 3 }]);
  });
});

describe('text files', () => {
  it('one row per line, empty lines dropped by default, split across tasks at line breaks', async () => {
    const directory = scratch('text');
    const lines = Array.from({ length: 30_000 }, (_, index) => (index % 10 === 9 ? '   ' : `line ${index} ${'x'.repeat(index % 7)}`));
    writeFileSync(join(directory, 'a.txt'), `${lines.join('\r\n')}\r\n`);
    writeFileSync(join(directory, 'b.log.gz'), gzipSync('first\n\nlast'));
    const source = textSource(directory, { minSplitBytes: 32 << 10 });
    const { tasks, rows } = await readRows(source, 6);
    expect(tasks.length).toBeGreaterThan(3);
    const expected = [...lines.filter((line) => line.trim() !== ''), 'first', 'last'];
    expect(rows.map((row) => row.text)).toEqual(expected);
    expect(Object.keys(rows[0])).toEqual(['text']);
    const kept = (await readRows(textSource(join(directory, 'b.log.gz'), { dropEmptyLines: false }))).rows.map((row) => row.text);
    expect(kept).toEqual(['first', '', 'last']);
  });

  it('extensions choose files; row ids are stable; bad options are refused', async () => {
    const directory = scratch('text-ext');
    writeFileSync(join(directory, 'keep.md'), '# title\nbody\n');
    writeFileSync(join(directory, 'skip.bin'), 'nope\n');
    writeFileSync(join(directory, '_SUCCESS'), '');
    expect(textSource(directory).files.map((file) => basename(file.path))).toEqual(['keep.md', 'skip.bin']);
    const { rows } = await readRows(textSource(directory, { extensions: ['.md'], rowIds: 'rowId' }));
    expect(rows.map((row) => row.text)).toEqual(['# title', 'body']);
    expect(String(rows[1].rowId)).toMatch(/^[0-9a-f]{12}:8$/);
    expect((await rejection(() => textSource(directory, { rowIds: 'text' }))).code).toBe('ERR_INVALID_ARGUMENT');
    expect((await rejection(() => textSource(directory, { dropEmptyLines: 'yes' as never }))).message).toContain('dropEmptyLines');
    expect((await rejection(() => textSource(scratch('text-empty')))).code).toBe('ERR_DATA_PATH');
    expect(new TextDatasource(directory).name).toBe('Text');
  });
});

describe('binary files', () => {
  it('one row per file with its bytes (and path), files grouped into tasks by size, counts known', async () => {
    const directory = scratch('binary');
    mkdirSync(join(directory, 'label=cat'));
    mkdirSync(join(directory, 'label=dog'));
    const files: Record<string, Buffer> = {};
    for (let index = 0; index < 12; index++) {
      const name = join(index % 2 ? 'label=cat' : 'label=dog', `img${String(index).padStart(2, '0')}.jpg`);
      files[name] = Buffer.from(Array.from({ length: 1000 + index * 300 }, (_, byte) => (byte * 7 + index) & 255));
      writeFileSync(join(directory, name), files[name]);
    }
    writeFileSync(join(directory, 'label=cat', 'notes.txt'), 'not an image');
    const source = binarySource(directory, { includePaths: true, extensions: ['.jpg'], blockBytes: 5000 });
    const { tasks, rows } = await readRows(source, 3);
    // Tasks never mix partitions: each label's files are read by tasks of their own.
    expect(tasks.length).toBeGreaterThanOrEqual(2);
    for (const task of tasks) expect(new Set(task.metadata.inputFiles!.map((path) => path.includes('label=cat'))).size).toBe(1);
    expect(tasks.reduce((sum, task) => sum + (task.metadata.rows ?? 0), 0)).toBe(12);
    expect(rows).toHaveLength(12);
    for (const row of rows) {
      const name = String(row.path).slice(directory.length + 1);
      expect(Buffer.from(row.bytes as Uint8Array).equals(files[name])).toBe(true);
      expect(row.label).toBe(name.startsWith('label=cat') ? 'cat' : 'dog');
    }
  });

  it('row ids name the file; empty files are empty rows; bad options are refused', async () => {
    const directory = scratch('binary-ids');
    writeFileSync(join(directory, 'a.bin'), Buffer.from([1, 2, 3]));
    writeFileSync(join(directory, 'b.bin'), Buffer.alloc(0));
    const { rows } = await readRows(binarySource(directory, { rowIds: 'fileId' }));
    expect(rows.map((row) => Array.from(row.bytes as Uint8Array))).toEqual([[1, 2, 3], []]);
    expect(rows.map((row) => row.fileId)).toEqual((await readRows(binarySource(directory, { rowIds: 'fileId' }))).rows.map((row) => row.fileId));
    expect(rows[0].fileId).not.toBe(rows[1].fileId);
    expect(Object.keys(rows[0]).sort()).toEqual(['bytes', 'fileId']);
    expect((await rejection(() => binarySource(directory, { rowIds: 'bytes' }))).code).toBe('ERR_INVALID_ARGUMENT');
    expect((await rejection(() => binarySource(directory, { includePaths: 1 as never }))).message).toContain('includePaths');
    expect((await rejection(() => binarySource(join(directory, 'missing')))).code).toBe('ERR_DATA_PATH');
    expect(new BinaryDatasource(directory).name).toBe('BinaryFiles');
  });
});

describe('partition filters', () => {
  function partitionedDirectory(): string {
    const directory = scratch('filtered');
    for (const year of [2023, 2024]) {
      for (const label of ['a', 'b']) {
        mkdirSync(join(directory, `year=${year}`, `label=${label}`), { recursive: true });
        writeFileSync(join(directory, `year=${year}`, `label=${label}`, 'part.jsonl'), `{"x":${year}}\n{"x":1}\n`);
      }
    }
    mkdirSync(join(directory, 'year=__HIVE_DEFAULT_PARTITION__', 'label=a'), { recursive: true });
    writeFileSync(join(directory, 'year=__HIVE_DEFAULT_PARTITION__', 'label=a', 'part.jsonl'), '{"x":0}\n');
    return directory;
  }

  it('reads only the partitions the filter keeps, with typed values; the others are never opened', async () => {
    const directory = partitionedDirectory();
    const seen: unknown[] = [];
    const source = jsonlSource(directory, {
      partitionFilter: (values) => {
        seen.push(values);
        return values.year === 2024 || values.year === null;
      },
    });
    expect(source.files.map((file) => file.path.slice(directory.length + 1))).toEqual(['year=2024/label=a/part.jsonl', 'year=2024/label=b/part.jsonl', 'year=__HIVE_DEFAULT_PARTITION__/label=a/part.jsonl']);
    expect(seen).toContainEqual({ year: 2023, label: 'b' });
    const { rows } = await readRows(source, 4);
    expect(rows.map((row) => [row.year, row.label, row.x])).toEqual([[2024, 'a', 2024], [2024, 'a', 1], [2024, 'b', 2024], [2024, 'b', 1], [null, 'a', 0]]);
    // Every file reader takes it.
    expect(textSource(directory, { partitionFilter: ({ label }) => label === 'b' }).files).toHaveLength(2);
    expect(binarySource(directory, { partitionFilter: ({ year }) => year === 2023 }).files).toHaveLength(2);
  });

  it('a filter that keeps nothing, throws, or cannot run is a typed error naming what is wrong', async () => {
    const directory = partitionedDirectory();
    const none = await rejection(() => jsonlSource(directory, { partitionFilter: ({ year }) => year === 1999 }));
    expect(none.code).toBe('ERR_DATA_PATH');
    expect(none.message).toContain('kept none of the 5 file(s)');
    expect(none.message).toContain('{"year":2023,"label":"a"}');
    const throwing = await rejection(() => csvSource(directory, { extensions: ['.jsonl'], partitionFilter: () => { throw new Error('no idea'); } }));
    expect(throwing.message).toMatch(/partitionFilter threw on '.*part\.jsonl' \(\{"year":2023,"label":"a"\}\): no idea/);
    expect((await rejection(() => jsonlSource(directory, { partitioning: false, partitionFilter: () => true }))).message).toContain('partitioning: false');
    expect((await rejection(() => jsonlSource(directory, { partitionFilter: 'year=2024' as never }))).message).toContain('partitionFilter');
    expect((await rejection(() => jsonlSource(directory, { partitioning: 'directory' as never }))).message).toContain("'hive' or false");
  });
});

describe('JSON documents', () => {
  it('a .json file holding an array of objects is read whole (compressed too), beside JSON Lines files', async () => {
    const directory = scratch('json-array');
    const records = Array.from({ length: 500 }, (_, index) => ({ id: index, text: `record ${index}`, tags: index % 2 ? ['odd'] : [] }));
    writeFileSync(join(directory, 'a.json'), `\ufeff  \n${JSON.stringify(records.slice(0, 300), null, 2)}\n`);
    writeFileSync(join(directory, 'b.json.gz'), gzipSync(JSON.stringify(records.slice(300, 450))));
    writeFileSync(join(directory, 'c.json'), records.slice(450).map((record) => `${JSON.stringify(record)}\n`).join(''));
    // Split wanted everywhere: the arrays are still read whole, the lines file still in ranges.
    const { tasks, rows } = await readRows(jsonlSource(directory, { rowsPerBlock: 64, minSplitBytes: 64, rowIds: 'rowId' }), 8);
    expect(rows.map(({ rowId: _rowId, ...row }) => row)).toEqual(records);
    expect(tasks.filter((task) => task.metadata.inputFiles!.some((path) => path.endsWith('a.json')))).toHaveLength(1);
    // An element's id is its index in the array.
    expect(String(rows[299].rowId)).toMatch(/^[0-9a-f]{12}:299$/);
    expect(String(rows[300].rowId)).toMatch(/^[0-9a-f]{12}:0$/);
    expect(new Set(rows.map((row) => row.rowId)).size).toBe(500);
  });

  it('an array that is malformed or holds something other than objects is a typed error naming the file and element', async () => {
    const directory = scratch('json-bad');
    writeFileSync(join(directory, 'broken.json'), '[{"a": 1}, {"a": ]');
    const broken = await rejection(readRows(jsonlSource(join(directory, 'broken.json'))));
    expect(broken.message).toContain("JSON file '");
    expect(broken.message).toContain('malformed JSON');
    writeFileSync(join(directory, 'numbers.json'), '[{"a": 1}, 2]');
    expect((await rejection(readRows(jsonlSource(join(directory, 'numbers.json'))))).message).toMatch(/element 1: expected a JSON object, got number/);
  });
});
