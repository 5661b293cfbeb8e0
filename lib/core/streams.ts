/**
 * The driver's side of streaming calls (generator functions and methods, read through
 * ObjectRefGenerator): each call's items in yield order, taken one at a time by its caller, with
 * backpressure told to the producer and stops sent when the caller lets go. The cluster makes each
 * item's object record as it arrives (see Cluster #onYield) and owns the holds; this module keeps
 * the order, the waiting readers and the producer's pace.
 */
import { GetTimeoutError, TrellisError } from '../errors.js';
import type { StreamRecord, TaskRecord } from './cluster-records.js';

export class StreamTable {
  readonly #streams = new Map<string, StreamRecord>();
  /** Drops the stream's hold on an item nobody will take. */
  readonly #dropHold: (id: string) => void;
  /** Whether the cluster has shut down (a stream that is gone then is an error, not an end). */
  readonly #closed: () => boolean;

  constructor(dropHold: (id: string) => void, closed: () => boolean) {
    this.#dropHold = dropHold;
    this.#closed = closed;
  }

  /** Opens the stream of a streaming call, under its return id. */
  open(task: TaskRecord, backpressure: number): void {
    const stream: StreamRecord = { id: task.returnId, task, items: [], taken: 0, backpressure };
    task.stream = stream;
    this.#streams.set(stream.id, stream);
  }

  has(id: string): boolean {
    return this.#streams.has(id);
  }

  /** Appends an item (its record made, holding the stream's hold) and wakes its readers. */
  push(stream: StreamRecord, id: string): void {
    stream.items.push(id);
    wake(stream);
  }

  /** The producer ended: returned (no error) or failed for good. Items already there stay takeable. */
  end(stream: StreamRecord, error?: Error): void {
    if (stream.end) return;
    stream.end = error ? { error } : {};
    wake(stream);
  }

  /** Ends every stream with `error` (at shutdown). */
  endAll(error: (stream: StreamRecord) => Error): void {
    for (const stream of this.#streams.values()) this.end(stream, error(stream));
  }

  /** Whether stream `id` has an item to take, or will give none (ended, closed, or unknown). */
  ready(id: string): boolean {
    const stream = this.#streams.get(id);
    return !stream || stream.closed === true || stream.end !== undefined || stream.items.length > stream.taken;
  }

  /**
   * Calls `wake` once the stream changes (an item, its end, its close); an item another reader
   * takes first may leave it not ready again.
   */
  watch(id: string, wake: () => void): void {
    (this.#streams.get(id)!.waiters ??= []).push(wake);
  }

  /** Waits for the stream's next item and takes it: its id, the stream's hold still on it. */
  async take(id: string, timeout: number): Promise<string | undefined> {
    const deadline = performance.now() + timeout;
    for (;;) {
      const stream = this.#streams.get(id);
      if (!stream) {
        if (this.#closed()) throw new TrellisError('ERR_SHUTDOWN', 'trellis was shut down while a streaming call was read');
        return undefined;
      }
      if (stream.taken < stream.items.length) {
        const item = stream.items[stream.taken++];
        const task = stream.task;
        // A producer paused on backpressure may go on.
        if (stream.backpressure !== Infinity && task.state === 'running' && task.stream === stream && task.worker && !task.worker.exited) {
          task.worker.send({ t: 'stream-taken', taskId: task.taskId, taken: stream.taken });
        }
        return item;
      }
      if (stream.end) {
        if (stream.end.error) throw stream.end.error;
        return undefined;
      }
      const left = deadline - performance.now();
      if (left <= 0) throw new GetTimeoutError(`streaming call ${stream.task.name} yielded no item within ${timeout} ms`);
      await new Promise<void>((resolve) => {
        let timer: NodeJS.Timeout | undefined;
        const waiter = () => {
          clearTimeout(timer);
          resolve();
        };
        (stream.waiters ??= []).push(waiter);
        if (Number.isFinite(left)) {
          timer = setTimeout(() => {
            stream.waiters = stream.waiters?.filter((candidate) => candidate !== waiter);
            resolve();
          }, left);
        }
      });
    }
  }

  /**
   * The caller let go: items not taken are dropped, the producer (if it still runs) is told to
   * stop, and readers waiting find the stream gone.
   */
  close(id: string): void {
    const stream = this.#streams.get(id);
    if (!stream) return;
    this.#streams.delete(id);
    stream.closed = true;
    const untaken = stream.items.splice(stream.taken);
    for (const item of untaken) this.#dropHold(item);
    const task = stream.task;
    if (task.state === 'running' && task.worker && !task.worker.exited) task.worker.send({ t: 'stream-stop', taskId: task.taskId });
    wake(stream);
  }
}

function wake(stream: StreamRecord): void {
  const waiters = stream.waiters;
  stream.waiters = undefined;
  if (waiters) for (const waiter of waiters) waiter();
}
