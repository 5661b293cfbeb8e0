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
import { get, getRuntimeContext, objectLocations, state } from '../core/api.js';
import { ObjectRef } from '../core/object-ref.js';
import { Queue } from '../core/queue.js';
import { registerPortableClass } from '../core/serialization.js';
import { DataError, QueueFullError } from '../errors.js';
import { checkBatchFormat, checkBatchSize, checkLocalShuffle, copyBlock, rebatch, type Batch } from './batches.js';
import { blockToRows, type BatchFormat, type Block, type Row } from './block.js';

/** What an iterator reads from its queue: a block (a slice of a stored one), its end, or the run's failure. */
type SplitItem =
  | { ref: ObjectRef<Block>; offset: number; rows: number; local?: boolean }
  | { end: true }
  | { error: { name: string; message: string } };

/** What an iterator tells the driver: that it reads now (in this worker), or that it stopped before its end. */
type ConsumerNotice = { index: number; workerId: string } | { index: number; finished: 'end' | 'stopped' };

/** The driver's worker id in its runtime context: an iterator read there has no process to watch. */
const DRIVER_WORKER = 'driver';

/** A block of the run as the driver has it: its ref, and the rows of it that count (offset, rows). */
export interface SplitBlock {
  ref: ObjectRef<Block>;
  offset: number;
  rows: number;
  /** With locality hints: whether the iterator it was dealt to is on a node that holds it. */
  local?: boolean;
}

export interface DataIteratorBatchOptions {
  /** Rows per batch (default 256); null: each block whole. */
  batchSize?: number | null;
  batchFormat?: BatchFormat;
  /** Draw each batch at random from a buffer of at least this many rows (see IterBatchesOptions). */
  localShuffleBufferSize?: number;
  localShuffleSeed?: number;
}

/**
 * One consumer's share of a streaming split: pass it to a task or an actor (it travels as a value)
 * and iterate it there, once.
 */
export class DataIterator {
  /** Its place among the split's iterators. */
  readonly index: number;
  readonly #queue: Queue<SplitItem>;
  readonly #notices: Queue<ConsumerNotice>;
  #stats = { blocks: 0, rows: 0, localBlocks: 0 };

  /** @internal made by Dataset.streamingSplit. */
  constructor(index: number, queue: Queue<SplitItem>, notices: Queue<ConsumerNotice>) {
    this.index = index;
    this.#queue = queue;
    this.#notices = notices;
  }

  /** Its blocks as they come, copied out of the store, until the split's end for it. */
  async *#blocks(): AsyncGenerator<Block> {
    // The driver watches this worker while it reads: its death fails the split rather than hang it.
    await this.#notices.put({ index: this.index, workerId: getRuntimeContext().workerId });
    let ended = false;
    try {
      for (;;) {
        const item = await this.#queue.get();
        if ('end' in item) {
          ended = true;
          return;
        }
        if ('error' in item) {
          ended = true;
          throw new DataError('ERR_DATA_SPLIT', `streamingSplit: the dataset's run failed: ${item.error.name}: ${item.error.message}`);
        }
        this.#stats.blocks++;
        this.#stats.rows += item.rows;
        if (item.local) this.#stats.localBlocks++;
        try {
          const stored = (await get(item.ref)) as Block;
          const block = copyBlock(stored);
          yield item.offset === 0 && item.rows === block.numRows ? block : block.slice(item.offset, item.offset + item.rows);
        } finally {
          item.ref[Symbol.dispose]();
        }
      }
    } finally {
      // Left before its end (a break, a throw): its share is dropped, the others go on.
      await this.#notices.put({ index: this.index, finished: ended ? 'end' : 'stopped' }).catch(() => undefined);
    }
  }

  /** Its rows in batches of `batchSize` (default 256) in `batchFormat` (default 'columns'). */
  async *iterBatches(options: DataIteratorBatchOptions = {}): AsyncGenerator<Batch> {
    const batchSize = checkBatchSize(options.batchSize, 'iterBatches()');
    const format = checkBatchFormat(options.batchFormat ?? 'columns', 'iterBatches()');
    const shuffle = checkLocalShuffle(options.localShuffleBufferSize, options.localShuffleSeed, batchSize, 'iterBatches()');
    yield* rebatch(this.#blocks(), batchSize, format, shuffle);
  }

  /** Its rows one at a time, as plain objects. */
  async *iterRows(): AsyncGenerator<Row> {
    for await (const block of this.#blocks()) yield* blockToRows(block);
  }

  /**
   * What this iterator has read here: blocks, rows, and (with locality hints) how many of the
   * blocks were on its hinted node when they were dealt.
   */
  stats(): { blocks: number; rows: number; localBlocks: number } {
    return { ...this.#stats };
  }

  toString(): string {
    return `DataIterator(${this.index})`;
  }

  static {
    registerPortableClass(
      DataIterator,
      'trellis.DataIterator',
      (iterator) => [iterator.index, iterator.#queue, iterator.#notices],
      ([index, queue, notices]: [number, Queue<SplitItem>, Queue<ConsumerNotice>]) => new DataIterator(index, queue, notices),
    );
  }
}

/** Blocks a consumer may have waiting in its queue (the split's backpressure). */
const QUEUED_BLOCKS_PER_ITERATOR = 2;
/** How long a put waits for room before the consumers are looked at (are they alive, still reading?). */
const CONSUMER_CHECK_MS = 1000;
/** How long the dealer waits for room near its oldest block before it looks again (at the others, and at idle consumers). */
const NEAR_WAIT_MS = 50;
/** Blocks a split with hints takes ahead of placing them, per iterator (so one waiting for its consumer does not hold back the rest). */
const PENDING_PER_ITERATOR = 8;

/**
 * Starts dealing `blocks` (the run's outputs, in order) out to `n` iterators and returns them; the
 * run goes on in the background, each block's ref disposed here once it is queued (the queue and
 * then its consumer hold it). The queues go once every iterator has taken its end.
 */
export function startStreamingSplit(n: number, equal: boolean, blocks: AsyncIterable<SplitBlock>, localityHints?: readonly string[]): DataIterator[] {
  const split = new SplitDealer(n, equal, localityHints);
  void split.deal(blocks);
  return split.iterators;
}

/** Why dealing stopped early: a consumer's process died (the run fails for all). */
class ConsumerLost extends Error {}

/**
 * The driver's side of a split. Each iterator says when it starts reading (with its worker) and
 * when it stops before its end; a put that waits for room looks at those: blocks for an iterator
 * that stopped are dropped (and the run stops once none reads), and one whose worker died fails
 * the split for every iterator, rather than leave the others waiting on its full queue forever.
 */
class SplitDealer {
  readonly iterators: DataIterator[];
  readonly #n: number;
  readonly #equal: boolean;
  /** Each iterator's node: a block goes to an iterator on a node that holds it, where one has room. */
  readonly #hints: readonly string[] | undefined;
  /** A queue per iterator (equal, or with hints); else one that every iterator reads. */
  readonly #perIterator: boolean;
  /** Where the search for a near iterator with room starts: turns go round among equals. */
  #turn = 0;
  readonly #queues: Array<Queue<SplitItem>>;
  readonly #notices = new Queue<ConsumerNotice>();
  readonly #workers = new Map<number, string>();
  /** Iterators that left before their end: nothing reads what is put for them. */
  readonly #stopped = new Set<number>();
  /** Iterators that took their end (or the failure). */
  readonly #ended = new Set<number>();
  /** Iterators whose consumer's worker died while reading. */
  readonly #lost = new Map<number, string>();

  constructor(n: number, equal: boolean, hints?: readonly string[]) {
    this.#n = n;
    this.#equal = equal;
    this.#hints = hints;
    this.#perIterator = equal || hints !== undefined;
    this.#queues = this.#perIterator
      ? Array.from({ length: n }, () => new Queue<SplitItem>({ maxSize: QUEUED_BLOCKS_PER_ITERATOR }))
      : [new Queue<SplitItem>({ maxSize: QUEUED_BLOCKS_PER_ITERATOR * n })];
    this.iterators = Array.from({ length: n }, (_, index) => new DataIterator(index, this.#queueOf(index), this.#notices));
  }

  #queueOf(index: number): Queue<SplitItem> {
    return this.#queues[this.#perIterator ? index : 0];
  }

  /** Whether nothing will read what is put for `index` (with one shared queue: no iterator reads). */
  #unread(index: number): boolean {
    return this.#perIterator ? this.#stopped.has(index) : this.#stopped.size === this.#n;
  }

  /** Iterators on a node that holds the block (by their hints). */
  #near(block: SplitBlock): Set<number> {
    const nodes = new Set(objectLocations(block.ref)[0]?.nodeIds ?? []);
    const near = new Set<number>();
    this.#hints?.forEach((node, index) => {
      if (nodes.has(node)) near.add(index);
    });
    return near;
  }

  /**
   * Unequal with hints. Blocks come in the run's order but are placed out of it: up to
   * PENDING_PER_ITERATOR × n taken ahead, each to an iterator on its node with room (turns going
   * round among several), so a block waiting for its own consumer never holds back one whose
   * consumer is free. With nothing near that has room and no more to take ahead, an iterator whose
   * queue is empty takes the oldest block waiting (locality gives way to a consumer that would
   * otherwise sit idle), else the dealer waits up to NEAR_WAIT_MS for room near the oldest
   * (taken at once if room comes), and looks again. A block on no hinted node
   * goes to whichever reader has room. Returns false when no iterator reads any more.
   */
  async #dealNear(blocks: AsyncIterator<SplitBlock>): Promise<boolean> {
    const pending: Array<{ block: SplitBlock; near: Set<number> }> = [];
    const limit = PENDING_PER_ITERATOR * this.#n;
    let done = false;
    let lastCheck = Date.now();
    const item = (block: SplitBlock, index: number, near: Set<number>): SplitItem => ({ ref: block.ref, offset: block.offset, rows: block.rows, local: near.has(index) });
    try {
      while (!done || pending.length > 0) {
        const readers = [...Array(this.#n).keys()].filter((index) => !this.#unread(index));
        if (readers.length === 0) return false;
        const [lost] = this.#lost;
        if (lost) throw new ConsumerLost(`iterator ${lost[0]}'s consumer (worker ${lost[1]}) died while reading its share`);
        // Room in each reader's queue, asked once a round (a failed offer would cost a call per block).
        const sizes = await Promise.all(readers.map((index) => this.#queueOf(index).size()));
        const room = new Map(readers.map((index, at) => [index, QUEUED_BLOCKS_PER_ITERATOR - sizes[at]]));
        let placed = false;
        for (let at = 0; at < pending.length; at++) {
          const { block, near } = pending[at];
          const preferred = readers.filter((index) => near.has(index));
          const candidates = (preferred.length > 0 ? preferred : readers).filter((index) => room.get(index)! > 0);
          if (candidates.length === 0) continue;
          const index = candidates[this.#turn++ % candidates.length];
          if (await this.#offer(index, item(block, index, near))) {
            room.set(index, room.get(index)! - 1);
            block.ref[Symbol.dispose]();
            pending.splice(at--, 1);
            placed = true;
          }
        }
        if (placed) continue;
        if (!done && pending.length < limit) {
          const next = await blocks.next();
          if (next.done) done = true;
          else if (next.value.rows === 0) next.value.ref[Symbol.dispose]();
          else pending.push({ block: next.value, near: this.#near(next.value) });
          continue;
        }
        // Nothing fits near and nothing more to take ahead: an idle reader takes the oldest block.
        const oldest = pending[0];
        let given = false;
        for (const index of readers) {
          if (room.get(index) === QUEUED_BLOCKS_PER_ITERATOR && (await this.#offer(index, item(oldest.block, index, oldest.near)))) {
            oldest.block.ref[Symbol.dispose]();
            pending.shift();
            given = true;
            break;
          }
        }
        if (given) continue;
        // Wait for room near the oldest block: the put returns as soon as its consumer takes one.
        const target = readers.find((index) => oldest.near.has(index)) ?? readers[0];
        try {
          await this.#queueOf(target).put(item(oldest.block, target, oldest.near), { timeout: NEAR_WAIT_MS });
          oldest.block.ref[Symbol.dispose]();
          pending.shift();
          continue;
        } catch (error) {
          if (!(error instanceof QueueFullError)) throw error;
        }
        if (Date.now() - lastCheck >= CONSUMER_CHECK_MS) {
          await this.#checkConsumers();
          lastCheck = Date.now();
        }
      }
      return true;
    } finally {
      for (const { block } of pending) block.ref[Symbol.dispose]();
    }
  }

  /** Puts `item` for `index` if its queue has room now. */
  async #offer(index: number, item: SplitItem): Promise<boolean> {
    try {
      await this.#queueOf(index).putNowait(item);
      return true;
    } catch (error) {
      if (error instanceof QueueFullError) return false;
      throw error;
    }
  }

  /** Reads the iterators' notices, and notes those whose worker died while reading. */
  async #checkConsumers(): Promise<void> {
    const waiting = await this.#notices.size();
    for (const notice of waiting > 0 ? await this.#notices.getNowaitBatch(waiting) : []) {
      if (!('finished' in notice)) this.#workers.set(notice.index, notice.workerId);
      else (notice.finished === 'end' ? this.#ended : this.#stopped).add(notice.index);
    }
    const alive = new Set(state().workers.filter((worker) => worker.state !== 'dead').map((worker) => worker.workerId));
    for (const [index, workerId] of this.#workers) {
      // An iterator read in the driver has no worker to watch.
      if (workerId === DRIVER_WORKER || this.#stopped.has(index) || this.#ended.has(index) || alive.has(workerId)) continue;
      this.#lost.set(index, workerId);
    }
  }

  /** Puts `item` for iterator `index`, looking at the consumers while it waits; false: nothing reads it. */
  async #put(index: number, item: SplitItem): Promise<boolean> {
    for (;;) {
      if (this.#unread(index)) return false;
      const [lost] = this.#lost;
      if (lost) throw new ConsumerLost(`iterator ${lost[0]}'s consumer (worker ${lost[1]}) died while reading its share`);
      try {
        await this.#queueOf(index).put(item, { timeout: CONSUMER_CHECK_MS });
        return true;
      } catch (error) {
        if (!(error instanceof QueueFullError)) throw error;
        await this.#checkConsumers();
      }
    }
  }

  async #send(index: number, block: SplitBlock, local?: boolean): Promise<void> {
    try {
      await this.#put(index, { ref: block.ref, offset: block.offset, rows: block.rows, ...(local !== undefined ? { local } : {}) });
    } finally {
      block.ref[Symbol.dispose]();
    }
  }

  async deal(blocks: AsyncIterable<SplitBlock>): Promise<void> {
    const n = this.#n;
    const rows = new Array<number>(n).fill(0);
    const held: Array<SplitBlock | undefined> = new Array(n).fill(undefined);
    let failure: SplitItem | undefined;
    const source = blocks[Symbol.asyncIterator]();
    try {
      if (!this.#equal && this.#hints) {
        try {
          await this.#dealNear(source);
        } finally {
          // Ended, stopped early (no iterator reads) or failed: the run is closed either way.
          await source.return?.();
        }
      }
      for await (const block of { [Symbol.asyncIterator]: () => source }) {
        if (block.rows === 0) {
          block.ref[Symbol.dispose]();
          continue;
        }
        if (!this.#equal) {
          // No iterator reads any more: the run stops (leaving the loop closes the executor).
          await this.#send(0, block);
          if (this.#unread(0)) break;
          continue;
        }
        // Equal: the iterator with fewest rows so far (that keeps the cut exact); among several, one near the block.
        const least = Math.min(...rows);
        const near = this.#hints ? this.#near(block) : new Set<number>();
        const tied = [...Array(n).keys()].filter((index) => rows[index] === least);
        const fewest = tied.find((index) => near.has(index)) ?? tied[0];
        const previous = held[fewest];
        held[fewest] = { ...block, ...(this.#hints ? { local: near.has(fewest) } : {}) };
        rows[fewest] += block.rows;
        if (previous) await this.#send(fewest, previous, previous.local);
        if (this.#stopped.size === n) break;
      }
      if (this.#equal && this.#stopped.size < n) await dealHeld(n, rows, held, (index, block) => this.#send(index, block, block.local));
    } catch (error) {
      failure = { error: { name: (error as Error).name ?? 'Error', message: (error as Error).message ?? String(error) } };
    } finally {
      for (const block of held) if (block?.ref.live) block.ref[Symbol.dispose]();
    }
    try {
      // The end, or the failure, to every iterator that still reads (a shared queue: one each); each takes it last.
      const last = failure ?? { end: true };
      await this.#checkConsumers();
      const readers = [...Array(n).keys()].filter((index) => !this.#stopped.has(index) && !this.#lost.has(index));
      for (const index of this.#perIterator ? readers : readers.map(() => 0)) {
        // A consumer that dies now cannot take it: the split has failed for the rest already, or ends anyway.
        await this.#put(index, last).catch(() => this.#queueOf(index).putNowait(last).catch(() => undefined));
      }
      // Every iterator took its end, left, or lost its worker: the queues go.
      while (this.#ended.size + this.#stopped.size + this.#lost.size < n) {
        await new Promise((resolve) => setTimeout(resolve, 250));
        await this.#checkConsumers();
      }
      for (const queue of this.#queues) queue.shutdown();
      this.#notices.shutdown();
    } catch {
      // The cluster went (shutdown): the queues went with it.
    }
  }
}

/**
 * The end of an equal split: every iterator's held block, cut so that each ends with the same
 * share (floor of all rows over n), pieces of one block going to several iterators as slices.
 */
async function dealHeld(n: number, rows: number[], held: Array<SplitBlock | undefined>, send: (index: number, block: SplitBlock) => Promise<void>): Promise<void> {
  const total = rows.reduce((sum, count) => sum + count, 0);
  const share = Math.floor(total / n);
  const pieces = held.flatMap((block, owner) => (block ? [{ ...block, owner }] : []));
  let piece = 0;
  for (let index = 0; index < n; index++) {
    let missing = share - (rows[index] - (held[index]?.rows ?? 0));
    while (missing > 0 && piece < pieces.length) {
      const source = pieces[piece];
      const taken = Math.min(missing, source.rows);
      // Slices of one held block may go to several iterators: each goes with a handle of its own.
      // A piece that stays with the iterator it was held for keeps its nearness.
      await send(index, { ref: new ObjectRef<Block>(source.ref.id), offset: source.offset, rows: taken, ...(index === source.owner && source.local !== undefined ? { local: source.local } : {}) });
      source.offset += taken;
      source.rows -= taken;
      missing -= taken;
      if (source.rows === 0) piece++;
    }
  }
}
