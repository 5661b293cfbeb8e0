/**
 * Blocks read out of the store and cut into a consumer's batches: what Dataset.iterBatches does
 * in the driver and a streaming split's iterator does wherever it is iterated.
 */
import { Data, RecordBatch, Table, makeVector, type Vector } from 'apache-arrow';
import { InvalidArgumentError } from '../errors.js';
import { concatBlocks, formatBatch, sliceRows, type BatchFormat, type Block, type Row } from './block.js';

export type Batch = Block | Row[] | Record<string, unknown[] | ArrayBufferView>;

export function checkBatchFormat(format: unknown, what: string): BatchFormat {
  if (format !== 'arrow' && format !== 'rows' && format !== 'columns') {
    throw new InvalidArgumentError(`${what}: batchFormat must be 'arrow', 'rows' or 'columns', got ${String(format)}`);
  }
  return format;
}

/**
 * Batches of exactly `batchSize` rows (the last one shorter) in `format`, cut from `blocks` as they
 * come; with a null batchSize each non-empty block whole.
 */
export async function* rebatch(blocks: AsyncIterable<Block>, batchSize: number | null, format: BatchFormat): AsyncGenerator<Batch> {
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
