/**
 * A first-in, first-out queue shared by the driver, tasks and actors (as Ray's
 * ray.util.queue.Queue): an actor holds the items, and every process puts and gets through it. A
 * Queue is sent to tasks and actors as an argument (or inside one) like any value and arrives as
 * a Queue on the same actor. A put waits while the queue is full, a get while it is empty, each
 * for at most its timeout, inside the actor: an item is taken only by a get that returns it, and
 * one that times out takes nothing. Items travel as values: a large one goes through the object
 * store into the actor and out again.
 */
import { InvalidArgumentError, QueueEmptyError, QueueFullError, TaskError } from '../errors.js';
import { get, kill } from './api.js';
import { Deque } from './deque.js';
import type { ObjectRef } from './object-ref.js';
import type { ActorOptions } from './options.js';
import { remote, type ActorHandle } from './registry.js';
import { registerPortableClass } from './serialization.js';

export interface QueueOptions {
  /** The most items it holds (default 0: no bound). */
  maxSize?: number;
  /** Options of the actor that holds the items (default: no CPU of its own). */
  actorOptions?: ActorOptions;
}

export interface QueueWaitOptions {
  /** Whether to wait for room (put) or an item (get); false fails at once instead. Default true. */
  block?: boolean;
  /** The longest to wait, in milliseconds (default: no limit). */
  timeout?: number;
}

/** The most calls waiting at once in a queue's actor (blocked puts and gets), and so its maxConcurrency. */
const MAX_WAITING_CALLS = 100_000;

interface Waiter {
  /** Called with true when served, false when its time ran out. */
  wake(served: boolean): void;
  timer?: NodeJS.Timeout;
  done?: boolean;
}

/** The actor behind a Queue. Calls interleave (their waits are async); each step is atomic. */
export class QueueActor {
  readonly #maxSize: number;
  readonly #items = new Deque<unknown>();
  readonly #getters = new Deque<Waiter>();
  readonly #putters = new Deque<Waiter & { item: unknown }>();

  constructor(maxSize: number) {
    this.#maxSize = maxSize;
  }

  /** Drops waiters at the heads whose time ran out: a live head keeps its turn. */
  #prune(): void {
    while (this.#getters.length > 0 && this.#getters.peek()!.done) this.#getters.shift();
    while (this.#putters.length > 0 && this.#putters.peek()!.done) this.#putters.shift();
  }

  #full(extra = 0): boolean {
    return this.#maxSize > 0 && this.#items.length + extra > this.#maxSize;
  }

  /** Waits in `waiters` until served or timed out. */
  #wait<W extends Waiter>(waiters: Deque<W>, waiter: Omit<W, 'wake'>, timeout: number | null): Promise<boolean> {
    return new Promise((resolve) => {
      const entry = waiter as W;
      entry.wake = (served) => {
        if (entry.done) return;
        entry.done = true;
        clearTimeout(entry.timer);
        resolve(served);
      };
      if (timeout !== null) entry.timer = setTimeout(() => entry.wake(false), timeout);
      waiters.push(entry);
    });
  }

  /** Hands items to waiting getters and room to waiting putters, in arrival order. */
  #settle(): void {
    for (;;) {
      this.#prune();
      const putter = this.#putters.peek();
      if (putter && !this.#full(1)) {
        this.#putters.shift();
        this.#items.push(putter.item);
        putter.wake(true);
        continue;
      }
      const getter = this.#getters.peek();
      if (getter && this.#items.length > 0) {
        this.#getters.shift();
        (getter as Waiter & { item?: unknown }).item = this.#items.shift();
        getter.wake(true);
        continue;
      }
      return;
    }
  }

  /** `box`: the item, boxed so that a ref put in the queue stays a ref (a top-level one would be resolved). */
  async put(box: [unknown], block: boolean, timeout: number | null): Promise<void> {
    const item = box[0];
    this.#prune();
    if (!this.#full(1) && this.#putters.length === 0) {
      this.#items.push(item);
      this.#settle();
      return;
    }
    if (!block) throw new QueueFullError(`the queue is full (${this.#maxSize} items)`);
    if (!(await this.#wait(this.#putters, { item }, timeout))) throw new QueueFullError(`the queue stayed full (${this.#maxSize} items) for ${timeout} ms`);
    this.#settle();
  }

  /** The first item, boxed as put() took it. */
  async get(block: boolean, timeout: number | null): Promise<[unknown]> {
    this.#prune();
    if (this.#items.length > 0 && this.#getters.length === 0) {
      const item = this.#items.shift();
      this.#settle();
      return [item];
    }
    if (!block) throw new QueueEmptyError('the queue is empty');
    const waiter: Omit<Waiter, 'wake'> & { item?: unknown } = {};
    if (!(await this.#wait(this.#getters, waiter, timeout))) throw new QueueEmptyError(`the queue stayed empty for ${timeout} ms`);
    this.#settle();
    return [waiter.item];
  }

  /** Puts all of `items` at once, or none when they do not all fit now. */
  putBatch(items: unknown[]): void {
    this.#prune();
    if (this.#putters.length > 0 || this.#full(items.length)) {
      throw new QueueFullError(`${items.length} items do not fit: the queue holds ${this.#items.length} of at most ${this.#maxSize}`);
    }
    for (const item of items) this.#items.push(item);
    this.#settle();
  }

  /** Takes `count` items at once, or none when fewer are there. */
  getBatch(count: number): unknown[] {
    this.#prune();
    if (this.#getters.length > 0 || this.#items.length < count) throw new QueueEmptyError(`${count} items were asked for, and the queue holds ${this.#items.length}`);
    const items = Array.from({ length: count }, () => this.#items.shift());
    this.#settle();
    return items;
  }

  size(): number {
    return this.#items.length;
  }
}

export const RemoteQueueActor = remote(import.meta, QueueActor);

function checkWait(options: QueueWaitOptions | undefined, where: string): { block: boolean; timeout: number | null } {
  const block = options?.block ?? true;
  if (typeof block !== 'boolean') throw new InvalidArgumentError(`Queue.${where}: block must be true or false`);
  const timeout = options?.timeout;
  if (timeout !== undefined && !(typeof timeout === 'number' && timeout >= 0 && Number.isFinite(timeout))) {
    throw new InvalidArgumentError(`Queue.${where}: timeout must be a number of milliseconds from 0, got ${String(timeout)}`);
  }
  return { block, timeout: timeout ?? null };
}

/** The queue's own error, as the actor threw it: QueueFullError or QueueEmptyError, else as it came. */
function queueError(error: unknown): unknown {
  if (error instanceof TaskError && error.cause instanceof Error) {
    if (error.cause.name === 'QueueFullError') return new QueueFullError(error.cause.message);
    if (error.cause.name === 'QueueEmptyError') return new QueueEmptyError(error.cause.message);
  }
  return error;
}

async function call<T>(ref: ObjectRef<T>): Promise<T> {
  try {
    return await get(ref);
  } catch (error) {
    throw queueError(error);
  }
}

export class Queue<T = unknown> implements AsyncDisposable {
  /** The actor holding the items. */
  readonly actor: ActorHandle<QueueActor>;
  readonly maxSize: number;

  constructor(options: QueueOptions = {}) {
    const maxSize = options.maxSize ?? 0;
    if (!(Number.isInteger(maxSize) && maxSize >= 0)) throw new InvalidArgumentError(`Queue: maxSize must be a whole number from 0 (no bound), got ${String(options.maxSize)}`);
    this.maxSize = maxSize;
    this.actor = RemoteQueueActor.options({ numCpus: 0, ...options.actorOptions, maxConcurrency: MAX_WAITING_CALLS }).remote(maxSize);
  }

  /** A Queue on an actor that exists (one sent to another process arrives this way). */
  static #onActor<T>(actor: ActorHandle<QueueActor>, maxSize: number): Queue<T> {
    const queue = Object.create(Queue.prototype) as Queue<T> & { actor: ActorHandle<QueueActor>; maxSize: number };
    Object.assign(queue, { actor, maxSize });
    return queue;
  }

  static {
    registerPortableClass(
      Queue,
      'trellis.Queue',
      (queue) => [queue.actor, queue.maxSize],
      ([actor, maxSize]: [ActorHandle<QueueActor>, number]) => Queue.#onActor(actor, maxSize),
    );
  }

  /** Adds `item` at the end; waits for room while the queue is full (see QueueWaitOptions). */
  async put(item: T, options?: QueueWaitOptions): Promise<void> {
    const { block, timeout } = checkWait(options, 'put');
    return call(this.actor.put.remote([item], block, timeout));
  }

  /** Takes the first item; waits for one while the queue is empty (see QueueWaitOptions). */
  async get(options?: QueueWaitOptions): Promise<T> {
    const { block, timeout } = checkWait(options, 'get');
    return call(this.actor.get.remote(block, timeout)).then((box) => box[0] as T);
  }

  /** put() that fails with QueueFullError at once rather than wait. */
  putNowait(item: T): Promise<void> {
    return this.put(item, { block: false });
  }

  /** get() that fails with QueueEmptyError at once rather than wait. */
  getNowait(): Promise<T> {
    return this.get({ block: false });
  }

  /** Adds all of `items`, or none (QueueFullError) when they do not all fit now. */
  putNowaitBatch(items: readonly T[]): Promise<void> {
    if (!Array.isArray(items)) return Promise.reject(new InvalidArgumentError('Queue.putNowaitBatch takes an array of items'));
    return call(this.actor.putBatch.remote([...items]));
  }

  /** Takes `count` items, or none (QueueEmptyError) when fewer are there. */
  getNowaitBatch(count: number): Promise<T[]> {
    if (!(Number.isInteger(count) && count >= 0)) return Promise.reject(new InvalidArgumentError(`Queue.getNowaitBatch: count must be a whole number from 0, got ${String(count)}`));
    return call(this.actor.getBatch.remote(count)) as Promise<T[]>;
  }

  size(): Promise<number> {
    return call(this.actor.size.remote());
  }

  async empty(): Promise<boolean> {
    return (await this.size()) === 0;
  }

  async full(): Promise<boolean> {
    return this.maxSize > 0 && (await this.size()) >= this.maxSize;
  }

  /** Ends the queue's actor: its items go, and calls waiting on it fail with ActorDiedError. */
  shutdown(): void {
    kill(this.actor);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.shutdown();
  }
}
