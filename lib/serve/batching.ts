/**
 * Request batching inside a replica (as Ray Serve's @serve.batch): calls made one item at a time
 * are gathered and handed to a function of many, so a model runs one forward pass for requests
 * that arrived together. A batch goes once it holds `maxBatchSize` items, or `batchWaitTimeoutMs`
 * after its first item arrived. The replica must let requests run side by side for batches to
 * fill: its deployment's `maxOngoingRequests` should be at least `maxBatchSize`.
 */
import { InvalidArgumentError } from '../errors.js';
import { Deque } from '../core/deque.js';

export interface BatchOptions {
  /** Most items in one batch (default 10). */
  maxBatchSize?: number;
  /** Longest an item waits for others before its batch goes anyway (default 10 ms). */
  batchWaitTimeoutMs?: number;
  /** Batches running at once (default 1): items gather while one runs. */
  maxConcurrentBatches?: number;
}

interface Item<I, O> {
  item: I;
  /** When it came (Date.now()): its batch is due waitMs later. */
  at: number;
  resolve(value: O): void;
  reject(error: unknown): void;
}

/** A function of one item that runs `handler` on batches of them; each call gets its item's result. */
export type BatchedFunction<I, O> = ((item: I) => Promise<O>) & {
  /** Items waiting for their batch now. */
  readonly pending: number;
};

export function batch<I, O>(handler: (items: I[]) => O[] | Promise<O[]>, options: BatchOptions = {}): BatchedFunction<I, O> {
  if (typeof handler !== 'function') throw new InvalidArgumentError('batch() takes a function of an array of items');
  const maxBatchSize = options.maxBatchSize ?? 10;
  const waitMs = options.batchWaitTimeoutMs ?? 10;
  const maxConcurrent = options.maxConcurrentBatches ?? 1;
  if (!Number.isInteger(maxBatchSize) || maxBatchSize < 1) throw new InvalidArgumentError(`batch(): maxBatchSize must be a whole number from 1, got ${String(options.maxBatchSize)}`);
  if (typeof waitMs !== 'number' || !Number.isFinite(waitMs) || waitMs < 0) throw new InvalidArgumentError(`batch(): batchWaitTimeoutMs must be a number of milliseconds from 0, got ${String(options.batchWaitTimeoutMs)}`);
  if (!Number.isInteger(maxConcurrent) || maxConcurrent < 1) throw new InvalidArgumentError(`batch(): maxConcurrentBatches must be a whole number from 1, got ${String(options.maxConcurrentBatches)}`);

  const queue = new Deque<Item<I, O>>();
  let running = 0;
  let timer: NodeJS.Timeout | undefined;

  const run = (items: Item<I, O>[]) => {
    running++;
    void (async () => {
      try {
        const results = await handler(items.map((entry) => entry.item));
        if (!Array.isArray(results) || results.length !== items.length) {
          throw new InvalidArgumentError(`a batch function must return an array with a result per item: given ${items.length} item(s), it returned ${Array.isArray(results) ? `${results.length} result(s)` : typeof results}`);
        }
        items.forEach((entry, index) => entry.resolve(results[index]));
      } catch (error) {
        for (const entry of items) entry.reject(error);
      } finally {
        running--;
        dispatch();
      }
    })();
  };

  const dispatch = () => {
    while (running < maxConcurrent && queue.length > 0) {
      const due = queue.length >= maxBatchSize || Date.now() - queue.peek()!.at >= waitMs;
      if (!due) break;
      const items: Item<I, O>[] = [];
      while (items.length < maxBatchSize && queue.length > 0) items.push(queue.shift()!);
      run(items);
    }
    if (queue.length > 0 && running < maxConcurrent && !timer) {
      timer = setTimeout(() => {
        timer = undefined;
        dispatch();
      }, Math.max(0, waitMs - (Date.now() - queue.peek()!.at)) + 1);
    }
  };

  const batched = (item: I) =>
    new Promise<O>((resolve, reject) => {
      queue.push({ item, at: Date.now(), resolve, reject });
      dispatch();
    });
  Object.defineProperty(batched, 'pending', { get: () => queue.length });
  return batched as BatchedFunction<I, O>;
}
