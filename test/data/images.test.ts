/**
 * Tensor columns and readImages: Tensors in and out of blocks (fixed shapes zero-copy, variable
 * shapes, nulls), blocks of different shapes joined, refusals; images read and decoded in read
 * tasks, reaching a model as one Tensor [N, H, W, C] with `size` or as cells without; decode
 * failures failing the job by name or kept as nulls with their reason; embeddings written to
 * Parquet and read back as tensors; tensor columns through sort, addColumn, zip and join.
 */
import { copyFileSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Float32, tableFromIPC, tableToIPC } from 'apache-arrow';
import { describe, expect, it } from 'vitest';
import { blockToColumns, blockToRows, columnsToBlock, concatBlocks, rowsToBlock } from '../../lib/data/block.js';
import { tensorColumnInfo } from '../../lib/data/tensor-column.js';
import { DataError, Tensor, decodeImage, fromItems, range, readImages, readParquet, readWebDataset, type Row } from '../../lib/index.js';
import { describeImages, embedImages, pairOfId, squareOfId } from './fixtures/image-udfs.js';
import { useDataCluster } from './helpers.js';

const cluster = useDataCluster({ numCpus: 2 });
const fixtures = join(import.meta.dirname, '..', 'image', 'fixtures');
const imageNames = readdirSync(fixtures).filter((name) => /\.(jpg|png)$/.test(name) && !name.startsWith('bench')).sort();

/** A directory of the image fixtures (and a file that is no image, which the extensions leave out). */
function imageDirectory(extra: Record<string, Uint8Array> = {}): string {
  const dir = cluster.scratchDir.path('images');
  mkdirSync(dir, { recursive: true });
  for (const name of imageNames) copyFileSync(join(fixtures, name), join(dir, name));
  writeFileSync(join(dir, 'notes.txt'), 'not an image');
  for (const [name, bytes] of Object.entries(extra)) writeFileSync(join(dir, name), bytes);
  return dir;
}

const sumOf = (tensor: Tensor) => (tensor.data as Uint8Array).reduce((total, value) => total + value, 0);
const byPath = (rows: Row[]) => [...rows].sort((a, b) => String(a.path).localeCompare(String(b.path)));

describe('tensor columns', () => {
  it('keep a Tensor [rows, ...] as a fixed-shape column over the same memory', () => {
    const values = Float32Array.from({ length: 12 }, (_, index) => index);
    const block = columnsToBlock({ id: Int32Array.of(1, 2, 3), embedding: Tensor.wrap(values, 'f32', [3, 2, 2]) });
    expect(tensorColumnInfo(block.schema.fields[1])).toEqual({ kind: 'fixed', shape: [2, 2], dtype: 'f32' });
    const columns = blockToColumns(block);
    const embedding = columns.embedding as Tensor;
    expect(embedding.shape).toEqual([3, 2, 2]);
    expect(embedding.data.buffer).toBe(values.buffer); // no copy on the way in or out
    const rows = blockToRows(block);
    expect((rows[2].embedding as Tensor).shape).toEqual([2, 2]);
    expect((rows[2].embedding as Tensor).toArray()).toEqual([8, 9, 10, 11]);
    // A slice is a view too, starting at its first row.
    expect((blockToColumns(block.slice(1)).embedding as Tensor).toArray()).toEqual([4, 5, 6, 7, 8, 9, 10, 11]);
    // Through Arrow IPC (the store's and Arrow files' format) the column stays a tensor column.
    const back = tableFromIPC(tableToIPC(block));
    expect(tensorColumnInfo(back.schema.fields[1])).toEqual({ kind: 'fixed', shape: [2, 2], dtype: 'f32' });
    // A 1-D tensor is a plain column of numbers.
    expect(columnsToBlock({ score: Tensor.wrap(Float32Array.of(0.5, 1.5), 'f32', [2]) }).schema.fields[0].type).toBeInstanceOf(Float32);
  });

  it('keep cells of different shapes as a variable-shape column, nulls included', () => {
    const cells = [Tensor.wrap(Uint8Array.of(1, 2), 'u8', [1, 2]), null, Tensor.wrap(Uint8Array.of(3, 4, 5, 6, 7, 8), 'u8', [3, 2])];
    const block = rowsToBlock(cells.map((image, id) => ({ id, image })));
    expect(tensorColumnInfo(block.schema.fields[1])).toEqual({ kind: 'variable', ndim: 2, dtype: 'u8' });
    const back = blockToRows(tableFromIPC(tableToIPC(block)));
    expect(back.map((row) => (row.image ? [(row.image as Tensor).shape, (row.image as Tensor).toArray()] : null))).toEqual([
      [[1, 2], [1, 2]],
      null,
      [[3, 2], [3, 4, 5, 6, 7, 8]],
    ]);
    // A slice starts at its first row's cell.
    expect((blockToRows(block.slice(2))[0].image as Tensor).toArray()).toEqual([3, 4, 5, 6, 7, 8]);
    // In the columns format a variable column is its cells.
    expect((blockToColumns(block).image as unknown[]).length).toBe(3);
    // Cells of one shape, one null: fixed-shape with the null kept.
    const fixed = rowsToBlock([{ image: cells[0] }, { image: null }]);
    expect(tensorColumnInfo(fixed.schema.fields[0])?.kind).toBe('fixed');
    expect(blockToRows(fixed)[1].image).toBeNull();
    expect(Array.isArray(blockToColumns(fixed).image)).toBe(true);
  });

  it('join blocks whose shapes differ into a variable-shape column, and refuse what cannot meet', () => {
    const square = (size: number, dtype: 'f32' | 'i32' = 'f32') =>
      columnsToBlock({ cell: Tensor.wrap(dtype === 'f32' ? new Float32Array(size * size).fill(size) : new Int32Array(size * size).fill(size), dtype, [1, size, size]) });
    const joined = concatBlocks([square(2), square(3), square(2)]);
    expect(tensorColumnInfo(joined.schema.fields[0])).toEqual({ kind: 'variable', ndim: 2, dtype: 'f32' });
    expect(blockToRows(joined).map((row) => (row.cell as Tensor).shape)).toEqual([[2, 2], [3, 3], [2, 2]]);
    expect(tensorColumnInfo(concatBlocks([square(2), square(2)]).schema.fields[0])?.kind).toBe('fixed');
    expect(() => concatBlocks([square(2), square(2, 'i32')])).toThrow(/different schemas/);
    expect(() => columnsToBlock({ cell: Tensor.wrap(new Uint16Array(4), 'bf16', [2, 2]) })).toThrow(/bf16 tensors, which Arrow has no type for/);
    expect(() => rowsToBlock([{ cell: Tensor.wrap(Uint8Array.of(1), 'u8', [1]) }, { cell: 3 }])).toThrow(/mixes tensors with other values/);
    expect(() => rowsToBlock([{ cell: Tensor.wrap(Uint8Array.of(1), 'u8', [1]) }, { cell: Tensor.wrap(Uint8Array.of(1), 'u8', [1, 1]) }])).toThrow(/1 and 2 dimensions/);
  });

  it('flow through a job: rows of their own shapes, sorted, with an added tensor column, zipped and joined', async () => {
    const squares = range(4, { parallelism: 4 }).map(squareOfId);
    const sorted = await squares.sort('id', { descending: true }).takeAll();
    expect(sorted.map((row) => [row.id, (row.square as Tensor).shape, (row.square as Tensor).toArray()[0]])).toEqual([
      [3, [4, 4], 3], [2, [3, 3], 2], [1, [2, 2], 1], [0, [1, 1], 0],
    ]);
    const paired = range(6, { parallelism: 2 }).addColumn('pair', pairOfId);
    const rows = await paired.takeAll();
    expect(rows.map((row) => (row.pair as Tensor).toArray())).toEqual([0, 1, 2, 3, 4, 5].map((id) => [id, -id]));
    const zipped = await paired.zip(fromItems([0, 1, 2, 3, 4, 5].map((index) => ({ label: `l${index}` })))).takeAll();
    expect(zipped.map((row) => [(row.pair as Tensor).shape, row.label])).toEqual([0, 1, 2, 3, 4, 5].map((index) => [[2], `l${index}`]));
    const joined = await fromItems([{ id: 1, name: 'one' }, { id: 4, name: 'four' }]).join(paired, { on: 'id' }).sort('id').takeAll();
    expect(joined.map((row) => [row.name, (row.pair as Tensor).toArray()])).toEqual([['one', [1, -1]], ['four', [4, -4]]]);
  });
});

describe('readImages', () => {
  it('decodes in the read tasks and hands a batch to the model as one Tensor [N, H, W, C] with size', async () => {
    const dir = imageDirectory();
    const described = await readImages(dir, { size: [32, 40], includePaths: true, parallelism: 3 })
      .mapBatches(describeImages, { batchSize: 4 })
      .takeAll();
    expect(described).toHaveLength(imageNames.length);
    const full = described.filter((row) => row.batchShape !== 'cells');
    expect(full.every((row) => /^\d+x32x40x3$/.test(row.batchShape as string))).toBe(true);
    expect(full.some((row) => row.batchShape === '4x32x40x3')).toBe(true);
    // Every image is what decoding it here gives.
    for (const row of described) {
      const expected = decodeImage(readFileSync(row.path as string), { size: [32, 40] });
      expect(row.sum).toBe(sumOf(expected));
      expect(row.shape).toBe('32x40x3');
    }
  });

  it('keeps each image its own size without one, in any mode', async () => {
    const dir = imageDirectory();
    const rows = byPath(await readImages(dir, { includePaths: true }).takeAll());
    expect(rows.map((row) => (row.path as string).split('/').pop())).toEqual(imageNames);
    for (const row of rows) {
      expect((row.image as Tensor).shape).toEqual([47, 61, 3]);
      expect(sumOf(row.image as Tensor)).toBe(sumOf(decodeImage(readFileSync(row.path as string))));
    }
    const described = await readImages(dir, { mode: 'L' }).mapBatches(describeImages, { batchSize: 5 }).takeAll();
    expect(described.every((row) => row.batchShape === 'cells' && row.shape === '47x61')).toBe(true);
    const rgba = await readImages(dir, { mode: 'RGBA', size: [8, 8] }).take(1);
    expect((rgba[0].image as Tensor).shape).toEqual([8, 8, 4]);
    const covered = await readImages(dir, { size: [8, 12], fit: 'cover', includePaths: true }).take(2);
    for (const row of covered) expect(sumOf(row.image as Tensor)).toBe(sumOf(decodeImage(readFileSync(row.path as string), { size: [8, 12], fit: 'cover' })));
    expect(() => readImages(dir, { size: [8, 8], fit: 'stretch' as never })).toThrow(/'fit' must be 'fill', 'cover' or 'contain'/);
  });

  it('fails the job naming a file that does not decode, or keeps its row with a null image and the reason', async () => {
    const jpeg = readFileSync(join(fixtures, 'baseline-420.jpg'));
    const dir = imageDirectory({ 'broken.jpg': new Uint8Array(jpeg.subarray(0, 400)), 'fake.png': new Uint8Array(Buffer.from('RIFF\0\0\0\0WEBPVP8 not a png')) });
    const failure = await readImages(dir, { size: [8, 8] }).takeAll().catch((error: unknown) => error);
    expect(failure).toBeInstanceOf(DataError);
    expect((failure as Error).message).toMatch(/broken\.jpg|fake\.png/);
    const rows = byPath(await readImages(dir, { size: [8, 8], includePaths: true, onDecodeError: 'null' }).takeAll());
    expect(rows).toHaveLength(imageNames.length + 2);
    const failed = rows.filter((row) => row.image === null);
    expect(failed.map((row) => [(row.path as string).split('/').pop(), (row.imageError as string).split(':')[0]])).toEqual([
      ['broken.jpg', 'ERR_IMAGE_DECODE'],
      ['fake.png', 'ERR_IMAGE_UNSUPPORTED'],
    ]);
    expect(rows.filter((row) => row.image !== null).every((row) => row.imageError === null)).toBe(true);
  });

  it('writes a model\'s embeddings to Parquet and reads them back as tensors', async () => {
    const dir = imageDirectory();
    const out = cluster.scratchDir.path('embeddings');
    await readImages(dir, { size: [16, 16], includePaths: true }).mapBatches(embedImages, { batchSize: 8 }).writeParquet(out);
    const rows = await readParquet(out).takeAll();
    expect(rows).toHaveLength(imageNames.length);
    for (const row of rows) {
      const embedding = row.embedding as Tensor;
      expect(embedding.dtype).toBe('f32');
      expect(embedding.shape).toEqual([3]);
      for (const value of embedding.toArray() as number[]) expect(value).toBeGreaterThanOrEqual(0);
    }
    // The read schema says it is a tensor column, as pyarrow would see it.
    const schema = (await readParquet(out).schema())!;
    expect(tensorColumnInfo(schema.fields.find((field) => field.name === 'embedding')!)).toEqual({ kind: 'fixed', shape: [3], dtype: 'f32' });
  });

  it('writes tensor cells to JSONL and CSV as nested arrays', async () => {
    const squares = range(3, { parallelism: 1 }).map(squareOfId);
    const jsonl = cluster.scratchDir.path('jsonl');
    const csv = cluster.scratchDir.path('csv');
    await squares.writeJsonl(jsonl);
    await squares.writeCsv(csv);
    const text = (dir: string) => readdirSync(dir).filter((name) => !name.startsWith('.')).map((name) => readFileSync(join(dir, name), 'utf8')).join('');
    expect(text(jsonl).trim().split('\n').map((line) => JSON.parse(line))).toEqual([
      { id: 0, square: [[0]] },
      { id: 1, square: [[1, 1], [1, 1]] },
      { id: 2, square: [[2, 2, 2], [2, 2, 2], [2, 2, 2]] },
    ]);
    expect(text(csv)).toBe('id,square\n0,[[0]]\n1,"[[1,1],[1,1]]"\n2,"[[2,2,2],[2,2,2],[2,2,2]]"\n');
  });

  it('writes each image as a file, named after a column so that a rerun rewrites the same files', async () => {
    const dir = imageDirectory();
    const out = cluster.scratchDir.path('written');
    const source = readImages(dir, { size: [12, 16], rowIds: 'key', parallelism: 3 });
    const written = await source.writeImages(out, { filenameColumn: 'key' });
    expect(written.reduce((sum, task) => sum + task.files.length, 0)).toBe(imageNames.length);
    await source.writeImages(out, { filenameColumn: 'key' });
    const files = readdirSync(out).sort();
    expect(files).toHaveLength(imageNames.length); // the same names again, no temporaries left
    expect(files.every((name) => name.endsWith('.png'))).toBe(true);
    // PNG is lossless: what is read back is what was written.
    const expected = (await source.takeAll()).map((row) => sumOf(row.image as Tensor)).sort((a, b) => a - b);
    const back = (await readImages(out).takeAll()).map((row) => sumOf(row.image as Tensor)).sort((a, b) => a - b);
    expect(back).toEqual(expected);
    const jpegs = cluster.scratchDir.path('jpegs');
    await readImages(dir, { size: [12, 16] }).writeImages(jpegs, { format: 'jpeg', quality: 80 });
    expect(readdirSync(jpegs).filter((name) => name.endsWith('.jpg'))).toHaveLength(imageNames.length);
    expect((await readImages(jpegs).take(1))[0].image).toBeInstanceOf(Tensor);
    await expect(range(3).writeImages(cluster.scratchDir.path('none'))).rejects.toThrow(/column 'image' is missing/);
    expect(() => range(3).writeImages(out, { format: 'tiff' as never })).toThrow(/format must be 'png' or 'jpeg'/);
  });

  it('writes image tensors into WebDataset shards by the column\'s extension, and reads them back', async () => {
    const dir = imageDirectory();
    const shards = cluster.scratchDir.path('shards');
    await readImages(dir, { size: [10, 10], includePaths: true })
      .renameColumns({ image: 'png' })
      .dropColumns(['path'])
      .writeWebDataset(shards);
    const rows = await readImages(dir, { size: [10, 10] }).takeAll();
    const back = await readWebDataset(shards, { images: true }).takeAll();
    expect(back.map((row) => sumOf(row.png as Tensor)).sort((a, b) => a - b)).toEqual(rows.map((row) => sumOf(row.image as Tensor)).sort((a, b) => a - b));
  });

  it('refuses bad options by name', () => {
    expect(() => readImages(imageDirectory(), { mode: 'CMYK' as never })).toThrow(/mode must be one of RGB, RGBA, L/);
    expect(() => readImages(imageDirectory(), { size: [10] as never })).toThrow(/size must be \[height, width\]/);
    expect(() => readImages(imageDirectory(), { onDecodeError: 'skip' as never })).toThrow(/'onDecodeError' must be 'fail' or 'null'/);
    expect(() => readImages(imageDirectory(), { rowIds: 'image' })).toThrow(/names the 'image' column itself/);
  });
});

