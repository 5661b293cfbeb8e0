/**
 * Blocks read out of the store and cut into a consumer's batches: what Dataset.iterBatches does
 * in the driver and a streaming split's iterator does wherever it is iterated.
 */
import { Data, RecordBatch, Table, makeVector, type Vector } from 'apache-arrow';
import { InvalidArgumentError } from '../errors.js';
import { concatBlocks, formatBatch, sliceRows, takeRows, type BatchFormat, type Block, type FormattedColumns, type Row } from './block.js';
import { seededRandom } from './keys.js';

export type Batch = Block | Row[] | FormattedColumns;

/** A consumer's batchSize: a positive integer (default 256), or null for each block whole. */
export function checkBatchSize(batchSize: unknown, what: string): number | null {
  if (batchSize === undefined) return 256;
  if (batchSize !== null && !(Number.isInteger(batchSize) && (batchSize as number) > 0)) throw new InvalidArgumentError(`${what}: batchSize must be a positive integer or null, got ${String(batchSize)}`);
  return batchSize as number | null;
}

export function checkBatchFormat(format: unknown, what: string): BatchFormat {
  if (format !== 'arrow' && format !== 'rows' && format !== 'columns') {
    throw new InvalidArgumentError(`${what}: batchFormat must be 'arrow', 'rows' or 'columns', got ${String(format)}`);
  }
  return format;
}

/**
 * A local shuffle (Ray's local_shuffle_buffer_size): batches are drawn at random from a buffer of
 * at least `bufferSize` rows as blocks stream in, so consecutive batches mix rows of several
 * blocks without a shuffle of the whole dataset; `seed` makes the draw the same every run.
 */
export interface LocalShuffle {
  bufferSize: number;
  seed?: number;
}

/** A local shuffle's options checked (undefined where none was asked). */
export function checkLocalShuffle(bufferSize: unknown, seed: unknown, batchSize: number | null, what: string): LocalShuffle | undefined {
  if (bufferSize === undefined || bufferSize === null) {
    if (seed !== undefined) throw new InvalidArgumentError(`${what}: localShuffleSeed needs localShuffleBufferSize`);
    return undefined;
  }
  if (!Number.isInteger(bufferSize) || (bufferSize as number) < 1) throw new InvalidArgumentError(`${what}: localShuffleBufferSize must be a positive integer, got ${String(bufferSize)}`);
  if (batchSize === null) throw new InvalidArgumentError(`${what}: a local shuffle draws batches of batchSize rows: give a batchSize, not null`);
  if (seed !== undefined && !(Number.isInteger(seed) && (seed as number) >= 0)) throw new InvalidArgumentError(`${what}: localShuffleSeed must be a non-negative integer, got ${String(seed)}`);
  return { bufferSize: bufferSize as number, ...(seed !== undefined ? { seed: seed as number } : {}) };
}

/**
 * Batches of exactly `batchSize` rows (the last one shorter) in `format`, cut from `blocks` as they
 * come; with a null batchSize each non-empty block whole; with `shuffle`, drawn at random from a
 * buffer of rows (see LocalShuffle).
 */
export async function* rebatch(blocks: AsyncIterable<Block>, batchSize: number | null, format: BatchFormat, shuffle?: LocalShuffle): AsyncGenerator<Batch> {
  if (shuffle && batchSize !== null) {
    yield* shuffledBatches(blocks, batchSize, format, shuffle);
    return;
  }
  let pending: Block[] = [];
  let pendingRows = 0;
  for await (const block of blocks) {
    if (batchSize === null) {
      if (block.numRows > 0) yield formatBatch(block, format);
      continue;
    }
    pending.push(block);
    pendingRows += block.numRows;
    if (pendingRows < batchSize) continue;
    const joined = concatBlocks(pending);
    const whole = Math.floor(joined.numRows / batchSize) * batchSize;
    for (const batch of sliceRows(joined.slice(0, whole), batchSize)) yield formatBatch(batch, format);
    pending = whole < joined.numRows ? [joined.slice(whole)] : [];
    pendingRows = joined.numRows - whole;
  }
  if (pendingRows > 0) yield formatBatch(concatBlocks(pending), format);
}

/**
 * A block whose buffers live in this process's heap (a deep copy of every buffer): a view of the
 * store would pin the object's memory there for as long as the consumer keeps any of it.
 */
export function copyBlock(block: Block): Block {
  const batches = block.batches.map((batch) => new RecordBatch(batch.schema, copyData(batch.data)));
  return new Table(block.schema, batches);
}

function copyBuffer<T extends { slice(): T } | null | undefined>(buffer: T): T {
  return (buffer ? buffer.slice() : buffer) as T;
}

function copyData<T extends Data>(data: T): T {
  const buffers = [copyBuffer(data.valueOffsets), copyBuffer(data.values), copyBuffer(data.nullBitmap), copyBuffer(data.typeIds)];
  const dictionary = data.dictionary ? (makeVector(data.dictionary.data.map((chunk) => copyData(chunk))) as Vector) : undefined;
  return new Data(data.type, data.offset, data.length, data.nullCount, buffers as never, data.children.map((child) => copyData(child)), dictionary) as T;
}

/**
 * A local shuffle's batches. Once the buffer holds `bufferSize` rows beyond a batch, as many whole
 * batches as it holds past that are drawn at once (one permutation and one gather of the buffer
 * for them all, not one a batch); the rest stay buffered. At the end the buffer is drawn out whole.
 */
async function* shuffledBatches(blocks: AsyncIterable<Block>, batchSize: number, format: BatchFormat, shuffle: LocalShuffle): AsyncGenerator<Batch> {
  const random = seededRandom(shuffle.seed ?? (Math.random() * 2 ** 32) >>> 0);
  let pending: Block[] = [];
  let buffered = 0;
  const draw = function* (batches: number): Generator<Batch> {
    const joined = concatBlocks(pending);
    const order = Int32Array.from({ length: joined.numRows }, (_, index) => index);
    const taken = Math.min(joined.numRows, batches * batchSize);
    // The first `taken` places of a partial Fisher-Yates shuffle: a uniform draw without replacement.
    for (let index = 0; index < taken; index++) {
      const other = index + Math.floor(random() * (order.length - index));
      [order[index], order[other]] = [order[other], order[index]];
    }
    const drawn = takeRows(joined, order.subarray(0, taken));
    pending = taken < joined.numRows ? [takeRows(joined, order.subarray(taken))] : [];
    buffered = joined.numRows - taken;
    for (const batch of sliceRows(drawn, batchSize)) yield formatBatch(batch, format);
  };
  for await (const block of blocks) {
    if (block.numRows === 0) continue;
    pending.push(block);
    buffered += block.numRows;
    const batches = Math.floor((buffered - shuffle.bufferSize) / batchSize);
    if (batches > 0) yield* draw(batches);
  }
  if (buffered > 0) yield* draw(Math.ceil(buffered / batchSize));
}
