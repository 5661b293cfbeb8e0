/**
 * ObjectRefGenerator: what a call to a generator function or method returns (a streaming call, as
 * Ray's streaming generators). Each item the generator yields is stored as it comes and handed to
 * the caller as an ObjectRef, in order, while the generator goes on; the caller needs not wait for
 * the whole result, and holds no more of it than it has not yet read.
 */
import { InvalidArgumentError } from '../errors.js';
import { ObjectRef } from './object-ref.js';
import { currentRuntime, hasRuntime } from './runtime-context.js';

export interface StreamNextOptions {
  /** Milliseconds to wait for the next item (GetTimeoutError after); default: no limit. */
  timeout?: number;
}

export class ObjectRefGenerator<T = unknown> implements AsyncIterableIterator<ObjectRef<T>>, AsyncDisposable {
  /** The call's own result (the count of its items): held, it keeps the stream and its items alive. */
  readonly #call: ObjectRef<unknown>;
  #finished = false;
  /** next() calls run one after another: each takes the item after the one before it took. */
  #queue: Promise<unknown> = Promise.resolve();

  /** Made by the runtime for a streaming call; `call` is its result's ref. */
  constructor(call: ObjectRef<unknown>) {
    this.#call = call;
  }

  /** The streaming call's id (its result's object id). */
  get id(): string {
    return this.#call.id;
  }

  /** Whether the stream has ended for this caller (every item taken, an error, or return()). */
  get finished(): boolean {
    return this.#finished;
  }

  /**
   * The next item's ref, once the generator has yielded it; done once it has returned and every
   * item was taken. If the generator threw (or its worker died with no retries left, or the call
   * was cancelled), the items it yielded before come first, then next() rejects with that error.
   */
  next(options: StreamNextOptions = {}): Promise<IteratorResult<ObjectRef<T>, undefined>> {
    const timeout = options.timeout ?? Infinity;
    if (timeout !== Infinity && (typeof timeout !== 'number' || !(timeout >= 0))) {
      return Promise.reject(new InvalidArgumentError(`next() takes a timeout in milliseconds (0 or more), got ${String(timeout)}`));
    }
    const taken = this.#queue.then(() => this.#take(timeout));
    this.#queue = taken.catch(() => undefined);
    return taken;
  }

  async #take(timeout: number): Promise<IteratorResult<ObjectRef<T>, undefined>> {
    if (this.#finished) return { done: true, value: undefined };
    let item: ObjectRef<unknown> | undefined;
    try {
      item = await currentRuntime().nextStreamItem(this.#call.id, timeout);
    } catch (error) {
      // A timeout leaves the stream as it was: the caller may wait again.
      if ((error as { code?: string }).code !== 'ERR_GET_TIMEOUT') this.#finish();
      throw error;
    }
    if (item === undefined) {
      this.#finish();
      return { done: true, value: undefined };
    }
    return { done: false, value: item as ObjectRef<T> };
  }

  /**
   * Stops the stream: the generator is closed at its next `yield` (its `finally` blocks run), and
   * the items it yielded that were not taken are freed. Items already taken stay readable. What
   * `break` out of `for await` calls.
   */
  async return(): Promise<IteratorResult<ObjectRef<T>, undefined>> {
    if (!this.#finished) {
      if (hasRuntime()) currentRuntime().closeStream(this.#call.id);
      this.#finish();
    }
    return { done: true, value: undefined };
  }

  [Symbol.asyncIterator](): this {
    return this;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.return();
  }

  /**
   * The items' values, in order, each ref let go once its value is read (zero-copy values stay
   * readable for as long as they are referenced, as from get()).
   */
  async *values(options: StreamNextOptions = {}): AsyncGenerator<T, void, undefined> {
    try {
      for (;;) {
        const step = await this.next(options);
        if (step.done) return;
        const ref = step.value;
        try {
          yield (await currentRuntime().getOne(ref, options.timeout ?? Infinity)) as T;
        } finally {
          ref[Symbol.dispose]();
        }
      }
    } finally {
      await this.return();
    }
  }

  toString(): string {
    return `ObjectRefGenerator(${this.#call.id})`;
  }

  #finish(): void {
    this.#finished = true;
    // The stream's record goes with its last ref: items not taken are freed.
    this.#call[Symbol.dispose]();
  }
}

/** What wait() takes: refs, and generators (ready once their next item is there, or their end). */
export type Waitable = ObjectRef<unknown> | ObjectRefGenerator<unknown>;

/** The ids among `refs` that name streaming calls. */
export function streamIdsOf(refs: readonly Waitable[]): Set<string> {
  const ids = new Set<string>();
  for (const ref of refs) if (ref instanceof ObjectRefGenerator) ids.add(ref.id);
  return ids;
}
