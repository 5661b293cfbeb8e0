/**
 * A streaming split (Ray Data's streaming_split): one run of a dataset's plan, its blocks dealt
 * out to n iterators that tasks or actors consume at once, each its own share, without the rows
 * passing through the driver. The driver runs the plan and puts each output block's ref (never
 * its rows) into queues that the iterators read; the queues' bound is the backpressure that keeps
 * the run's memory to what the executor's budget allows plus a few blocks a consumer.
 *
 * Unequal (the default): one shared queue, so a consumer that asks sooner takes more, as a pool of
 * workers balances load. Equal: a queue per iterator, each block to the iterator with fewest rows
 * so far, and every iterator's last block held back until the run ends; then the held blocks are
 * cut (as slices of their refs, no copy) so that every iterator ends with floor(rows / n) rows,
 * the fewer than n left over dropped. That is exact because an iterator takes a block only while
 * it has the fewest rows: what it was sent before its held block is never above the share.
 */
import { get } from '../core/api.js';
import { ObjectRef } from '../core/object-ref.js';
import { Queue } from '../core/queue.js';
import { registerPortableClass } from '../core/serialization.js';
import { DataError, InvalidArgumentError } from '../errors.js';
import { checkBatchFormat, copyBlock, rebatch, type Batch } from './batches.js';
import { blockToRows, type BatchFormat, type Block, type Row } from './block.js';

/** What an iterator reads from its queue: a block (a slice of a stored one), its end, or the run's failure. */
type SplitItem =
  | { ref: ObjectRef<Block>; offset: number; rows: number }
  | { end: true }
  | { error: { name: string; message: string } };

/** A block of the run as the driver has it: its ref, and the rows of it that count (offset, rows). */
export interface SplitBlock {
  ref: ObjectRef<Block>;
  offset: number;
  rows: number;
}

export interface DataIteratorBatchOptions {
  /** Rows per batch (default 256); null: each block whole. */
  batchSize?: number | null;
  batchFormat?: BatchFormat;
}

/**
 * One consumer's share of a streaming split: pass it to a task or an actor (it travels as a value)
 * and iterate it there, once.
 */
export class DataIterator {
  /** Its place among the split's iterators. */
  readonly index: number;
  readonly #queue: Queue<SplitItem>;

  /** @internal made by Dataset.streamingSplit. */
  constructor(index: number, queue: Queue<SplitItem>) {
    this.index = index;
    this.#queue = queue;
  }

  /** Its blocks as they come, copied out of the store, until the split's end for it. */
  async *#blocks(): AsyncGenerator<Block> {
    for (;;) {
      const item = await this.#queue.get();
      if ('end' in item) return;
      if ('error' in item) throw new DataError('ERR_DATA_SPLIT', `streamingSplit: the dataset's run failed: ${item.error.name}: ${item.error.message}`);
      try {
        const stored = (await get(item.ref)) as Block;
        const block = copyBlock(stored);
        yield item.offset === 0 && item.rows === block.numRows ? block : block.slice(item.offset, item.offset + item.rows);
      } finally {
        item.ref[Symbol.dispose]();
      }
    }
  }

  /** Its rows in batches of `batchSize` (default 256) in `batchFormat` (default 'columns'). */
  async *iterBatches(options: DataIteratorBatchOptions = {}): AsyncGenerator<Batch> {
    const batchSize = options.batchSize === undefined ? 256 : options.batchSize;
    if (batchSize !== null && !(Number.isInteger(batchSize) && batchSize > 0)) throw new InvalidArgumentError(`iterBatches(): batchSize must be a positive integer or null, got ${String(batchSize)}`);
    yield* rebatch(this.#blocks(), batchSize, checkBatchFormat(options.batchFormat ?? 'columns', 'iterBatches()'));
  }

  /** Its rows one at a time, as plain objects. */
  async *iterRows(): AsyncGenerator<Row> {
    for await (const block of this.#blocks()) yield* blockToRows(block);
  }

  toString(): string {
    return `DataIterator(${this.index})`;
  }

  static {
    registerPortableClass(
      DataIterator,
      'trellis.DataIterator',
      (iterator) => [iterator.index, iterator.#queue],
      ([index, queue]: [number, Queue<SplitItem>]) => new DataIterator(index, queue),
    );
  }
}

/** Blocks a consumer may have waiting in its queue (the split's backpressure). */
const QUEUED_BLOCKS_PER_ITERATOR = 2;

/**
 * Starts dealing `blocks` (the run's outputs, in order) out to `n` iterators and returns them; the
 * run goes on in the background, each block's ref disposed here once it is queued (the queue and
 * then its consumer hold it). The queues go once every iterator has taken its end.
 */
export function startStreamingSplit(n: number, equal: boolean, blocks: AsyncIterable<SplitBlock>): DataIterator[] {
  const queues = equal
    ? Array.from({ length: n }, () => new Queue<SplitItem>({ maxSize: QUEUED_BLOCKS_PER_ITERATOR }))
    : [new Queue<SplitItem>({ maxSize: QUEUED_BLOCKS_PER_ITERATOR * n })];
  const iterators = Array.from({ length: n }, (_, index) => new DataIterator(index, queues[equal ? index : 0]));
  void deal(n, equal, blocks, queues);
  return iterators;
}

async function deal(n: number, equal: boolean, blocks: AsyncIterable<SplitBlock>, queues: Array<Queue<SplitItem>>): Promise<void> {
  const queueOf = (index: number) => queues[equal ? index : 0];
  const rows = new Array<number>(n).fill(0);
  const held: Array<SplitBlock | undefined> = new Array(n).fill(undefined);
  const send = async (index: number, block: SplitBlock) => {
    try {
      await queueOf(index).put({ ref: block.ref, offset: block.offset, rows: block.rows });
    } finally {
      block.ref[Symbol.dispose]();
    }
  };
  let failure: SplitItem | undefined;
  try {
    for await (const block of blocks) {
      if (block.rows === 0) {
        block.ref[Symbol.dispose]();
        continue;
      }
      if (!equal) {
        await send(0, block);
        continue;
      }
      let fewest = 0;
      for (let index = 1; index < n; index++) if (rows[index] < rows[fewest]) fewest = index;
      const previous = held[fewest];
      held[fewest] = block;
      rows[fewest] += block.rows;
      if (previous) await send(fewest, previous);
    }
    if (equal) await dealHeld(n, rows, held, send);
  } catch (error) {
    failure = { error: { name: (error as Error).name ?? 'Error', message: (error as Error).message ?? String(error) } };
    for (const block of held) block?.ref[Symbol.dispose]();
  }
  try {
    for (let index = 0; index < n; index++) await queueOf(index).put(failure ?? { end: true });
    // Each iterator takes its end (or the failure) last: once the queues are empty, all are done.
    for (const queue of queues) {
      while ((await queue.size()) > 0) await new Promise((resolve) => setTimeout(resolve, 100));
      queue.shutdown();
    }
  } catch {
    // The cluster went (shutdown): the queues went with it.
  }
}

/**
 * The end of an equal split: every iterator's held block, cut so that each ends with the same
 * share (floor of all rows over n), pieces of one block going to several iterators as slices.
 */
async function dealHeld(n: number, rows: number[], held: Array<SplitBlock | undefined>, send: (index: number, block: SplitBlock) => Promise<void>): Promise<void> {
  const total = rows.reduce((sum, count) => sum + count, 0);
  const share = Math.floor(total / n);
  const pieces = held.filter((block): block is SplitBlock => block !== undefined).map((block) => ({ ...block }));
  let piece = 0;
  for (let index = 0; index < n; index++) {
    let missing = share - (rows[index] - (held[index]?.rows ?? 0));
    while (missing > 0 && piece < pieces.length) {
      const source = pieces[piece];
      const taken = Math.min(missing, source.rows);
      // Slices of one held block may go to several iterators: each goes with a handle of its own.
      await send(index, { ref: new ObjectRef<Block>(source.ref.id), offset: source.offset, rows: taken });
      source.offset += taken;
      source.rows -= taken;
      missing -= taken;
      if (source.rows === 0) piece++;
    }
  }
  for (const block of held) block?.ref[Symbol.dispose]();
}
