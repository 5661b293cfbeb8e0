/**
 * ActorPool: calls spread over a fixed set of actors, one call per actor at a time (or
 * callsPerActor), results taken in submission order or as they finish (as Ray's
 * ray.util.ActorPool). An actor goes back
 * to work as soon as its call settles, not when its result is read, so a slow reader does not
 * idle the pool; results wait as refs, unread. An actor that dies for good leaves the pool; once
 * none is left, work that was waiting for one fails. The pool owns no process: its actors are
 * the caller's, and close() ends only the pool.
 */
import { ActorDiedError, GetTimeoutError, InvalidArgumentError, TrellisError } from '../errors.js';
import { get, wait } from './api.js';
import type { ObjectRef } from './object-ref.js';
import type { ActorHandle } from './registry.js';
import { currentRuntime, hasRuntime } from './runtime-context.js';
import { Deque } from './deque.js';

/** How a pool calls an actor with a value: `(actor, value) => actor.method.remote(value)`. */
export type PoolCall<A, V, R> = (actor: ActorHandle<A>, value: V) => ObjectRef<R>;

export interface ActorPoolOptions {
  /**
   * Calls each actor runs at once (default 1, as Ray's pool): more keep an actor's queue full
   * while results travel, for short calls; an actor with maxConcurrency above 1 runs them side by side.
   */
  callsPerActor?: number;
}

export interface PoolNextOptions {
  /** Milliseconds to wait for the result (GetTimeoutError after, the result still to come); default: no limit. */
  timeout?: number;
}

interface Submission {
  index: number;
  call: (actor: never, value: unknown) => ObjectRef<unknown>;
  value: unknown;
  ref?: ObjectRef<unknown>;
  /** The call could not be made (it threw, or no actor was left): what the result rejects with. */
  error?: unknown;
  settled: boolean;
  whenSettled: Promise<void>;
  settle: () => void;
  /** Taken out before it started (a map stopped early): never started. */
  dropped?: boolean;
  /** Told when it settles (a map's own queue). */
  onSettled?: (submission: Submission) => void;
}

export class ActorPool<A> {
  readonly #members = new Set<ActorHandle<A>>();
  /** A free call slot per entry: an actor appears once per call it may still take. */
  readonly #idle: ActorHandle<A>[] = [];
  /** Calls running on each actor. */
  readonly #running = new Map<ActorHandle<A>, number>();
  readonly #callsPerActor: number;
  /** Submissions waiting for an actor, in order. */
  readonly #waiting = new Deque<Submission>();
  /** Settled submissions in the order they settled (some maybe taken since): getNextUnordered's queue. */
  readonly #settledOrder = new Deque<Submission>();
  /** getNextUnordered() calls waiting for a call to settle. */
  #settleWaiters: Array<() => void> = [];
  /** Submissions whose results were not taken yet, by index. */
  readonly #results = new Map<number, Submission>();
  readonly #stopWatching = new Map<ActorHandle<A>, () => void>();
  #submitted = 0;
  /** The index of the next result getNext() gives. */
  #nextInOrder = 0;
  #closed = false;
  #turn: Promise<unknown> = Promise.resolve();

  constructor(actors: Iterable<ActorHandle<A>>, options: ActorPoolOptions = {}) {
    const slots = options.callsPerActor ?? 1;
    if (!Number.isInteger(slots) || slots < 1) throw new InvalidArgumentError(`callsPerActor is a whole number, 1 or more, got ${String(slots)}`);
    this.#callsPerActor = slots;
    for (const actor of actors) this.push(actor);
  }

  /** The actors in the pool, busy or idle. */
  get actors(): ActorHandle<A>[] {
    return [...this.#members];
  }

  /**
   * Calls `call(actor, value)` on the next free actor (now, or once one is free). Its result is
   * taken with getNext() or getNextUnordered().
   */
  submit<V, R>(call: PoolCall<A, V, R>, value: V): void {
    this.#submit(call, value);
  }

  #submit<V, R>(call: PoolCall<A, V, R>, value: V, onSettled?: (submission: Submission) => void): Submission {
    if (this.#closed) throw new TrellisError('ERR_POOL_CLOSED', 'this ActorPool was closed');
    if (typeof call !== 'function') throw new InvalidArgumentError(`submit() takes a function (actor, value) => ref, got ${typeof call}`);
    let settle!: () => void;
    const whenSettled = new Promise<void>((resolve) => (settle = resolve));
    const submission: Submission = { index: this.#submitted++, call: call as Submission['call'], value, settled: false, whenSettled, settle, onSettled };
    this.#results.set(submission.index, submission);
    if (this.#members.size === 0) this.#fail(submission, this.#noActors());
    else if (this.#idle.length > 0) this.#start(submission, this.#take(this.#idle.shift()!));
    else this.#waiting.push(submission);
    return submission;
  }

  /** Whether a submitted call's result has not been taken yet. */
  hasNext(): boolean {
    return this.#results.size > 0;
  }

  /** Whether an actor can take a call now, with no submission waiting for one. */
  hasFree(): boolean {
    return this.#idle.length > 0 && this.#waitingCount() === 0;
  }

  /**
   * The next result in submission order (its value, or its error thrown). On a timeout it throws
   * GetTimeoutError and the result stays next.
   */
  getNext<R = unknown>(options: PoolNextOptions = {}): Promise<R> {
    return this.#inTurn(() => this.#takeInOrder(options)) as Promise<R>;
  }

  /** The result of whichever call not yet taken finishes first (or had finished). */
  getNextUnordered<R = unknown>(options: PoolNextOptions = {}): Promise<R> {
    return this.#inTurn(() => this.#takeFirstDone(options)) as Promise<R>;
  }

  /** Takes run one after another, so that two callers never take the same result. */
  #inTurn(take: () => Promise<unknown>): Promise<unknown> {
    const taken = this.#turn.then(take);
    this.#turn = taken.catch(() => undefined);
    return taken;
  }

  async #takeInOrder(options: PoolNextOptions): Promise<unknown> {
    while (this.#nextInOrder < this.#submitted && !this.#results.has(this.#nextInOrder)) this.#nextInOrder++;
    const submission = this.#results.get(this.#nextInOrder);
    if (!submission) throw new InvalidArgumentError('getNext(): no result is left to take (hasNext() is false)');
    await this.#settledWithin(submission, options.timeout);
    this.#results.delete(submission.index);
    return this.#value(submission);
  }

  async #takeFirstDone(options: PoolNextOptions): Promise<unknown> {
    if (this.#results.size === 0) throw new InvalidArgumentError('getNextUnordered(): no result is left to take (hasNext() is false)');
    checkTimeout(options.timeout);
    const deadline = options.timeout === undefined ? Infinity : performance.now() + options.timeout;
    for (;;) {
      // Entries taken since they settled (by getNext, or a map) are skipped.
      for (let submission = this.#settledOrder.shift(); submission; submission = this.#settledOrder.shift()) {
        if (this.#results.get(submission.index) !== submission) continue;
        this.#results.delete(submission.index);
        return this.#value(submission);
      }
      const left = deadline - performance.now();
      if (left <= 0) throw new GetTimeoutError(`no result of the ActorPool within ${options.timeout} ms`);
      await new Promise<void>((resolve) => {
        const timer = Number.isFinite(left) ? setTimeout(resolve, left) : undefined;
        this.#settleWaiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  /**
   * Calls `call` with each value, at most callsPerActor calls per actor at a time, and yields the
   * results in the values' order. Values are read as results are taken (a generator of inputs may
   * be endless); stopping early (break) drops the calls not yet started.
   */
  async *map<V, R>(call: PoolCall<A, V, R>, values: Iterable<V>): AsyncGenerator<R, void, undefined> {
    yield* this.#mapWith(call, values, true);
  }

  /** As map(), yielding each result as its call finishes. */
  async *mapUnordered<V, R>(call: PoolCall<A, V, R>, values: Iterable<V>): AsyncGenerator<R, void, undefined> {
    yield* this.#mapWith(call, values, false);
  }

  /** Takes an idle actor (running none of the pool's calls) out of the pool; undefined if none is. */
  popIdle(): ActorHandle<A> | undefined {
    const actor = this.#idle.find((candidate) => (this.#running.get(candidate) ?? 0) === 0);
    if (actor) this.#remove(actor);
    return actor;
  }

  /** Adds an actor to the pool: it takes the next waiting submission at once. */
  push(actor: ActorHandle<A>): void {
    if (this.#closed) throw new TrellisError('ERR_POOL_CLOSED', 'this ActorPool was closed');
    if (!actor || typeof actor.actorId !== 'string') throw new InvalidArgumentError('an ActorPool takes actor handles (what ActorClass.remote() returns)');
    if (this.#members.has(actor)) throw new InvalidArgumentError(`actor ${actor.actorId} is in this pool already`);
    this.#members.add(actor);
    this.#running.set(actor, this.#callsPerActor);
    this.#stopWatching.set(actor, currentRuntime().watchActors([actor.actorId], (_, cause) => this.#died(actor, cause)));
    for (let slot = 0; slot < this.#callsPerActor; slot++) this.#release(actor);
  }

  /**
   * Ends the pool: submissions still waiting for an actor fail, and the pool stops watching its
   * actors. Calls running finish; their results can still be taken. The actors stay alive.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const submission of this.#drainWaiting()) this.#fail(submission, new TrellisError('ERR_POOL_CLOSED', 'the ActorPool was closed before this call started'));
    for (const stop of this.#stopWatching.values()) stop();
    this.#stopWatching.clear();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  /**
   * A map's calls are its own: it takes their results directly (getNext and getNextUnordered
   * skip them), in order, or in the order they settle (`ordered` false).
   */
  async *#mapWith<V, R>(call: PoolCall<A, V, R>, values: Iterable<V>, ordered: boolean): AsyncGenerator<R, void, undefined> {
    const input = values[Symbol.iterator]();
    let exhausted = false;
    /** Submitted and not yet yielded, in submission order. */
    const open = new Deque<Submission>();
    const settledQueue = new Deque<Submission>();
    let wake: (() => void) | undefined;
    const onSettled = (submission: Submission) => {
      settledQueue.push(submission);
      wake?.();
    };
    // The input is read as calls are taken: twice what the actors can run at once stays submitted
    // ahead of the reader, so actors never wait on it and a long input is never held whole.
    const refill = () => {
      const ahead = 2 * Math.max(1, this.#members.size) * this.#callsPerActor;
      while (!exhausted && open.length < ahead) {
        const next = input.next();
        if (next.done) {
          exhausted = true;
          return;
        }
        const submission = this.#submit(call, next.value, ordered ? undefined : onSettled);
        this.#results.delete(submission.index);
        open.push(submission);
      }
    };
    const taken = new Set<Submission>();
    try {
      refill();
      while (open.length > 0) {
        let submission: Submission;
        if (ordered) {
          submission = open.shift()!;
          await submission.whenSettled;
        } else {
          while (settledQueue.length === 0) await new Promise<void>((resolve) => (wake = resolve));
          wake = undefined;
          submission = settledQueue.shift()!;
          taken.add(submission);
          // Out of order: the open queue keeps submission order, so taken ones leave its front lazily.
          while (open.length > 0 && taken.has(open.peek()!)) taken.delete(open.shift()!);
        }
        const value = this.#value(submission);
        // Awaited below; should reading the input throw first, its rejection is no stray.
        value.catch(() => undefined);
        refill();
        yield (await value) as R;
      }
    } finally {
      // Stopped early: what has not started is dropped; what runs finishes and frees its actor.
      for (const submission of open) if (!submission.ref && !submission.settled) submission.dropped = true;
      if (!exhausted) input.return?.();
    }
  }

  #start(submission: Submission, actor: ActorHandle<A>): void {
    try {
      submission.ref = (submission.call as PoolCall<A, unknown, unknown>)(actor, submission.value);
      if (!submission.ref || typeof (submission.ref as { id?: unknown }).id !== 'string') {
        throw new InvalidArgumentError('a pool call must return the ref of one actor call, e.g. (actor, value) => actor.method.remote(value)');
      }
    } catch (error) {
      submission.ref = undefined;
      this.#fail(submission, error);
      this.#release(actor);
      return;
    }
    void wait([submission.ref]).then(
      () => this.#settled(submission, actor),
      () => this.#settled(submission, actor),
    );
  }

  #settled(submission: Submission, actor: ActorHandle<A>): void {
    this.#markSettled(submission);
    // One that died for good was taken out of the pool (its watch fires before its calls fail).
    if (this.#members.has(actor)) this.#release(actor);
  }

  #fail(submission: Submission, error: unknown): void {
    submission.error = error;
    this.#markSettled(submission);
  }

  #markSettled(submission: Submission): void {
    submission.settled = true;
    submission.settle();
    if (submission.onSettled) {
      submission.onSettled(submission);
      return;
    }
    this.#settledOrder.push(submission);
    const waiters = this.#settleWaiters;
    this.#settleWaiters = [];
    for (const waiter of waiters) waiter();
  }

  /** The submissions waiting for an actor (those a stopped map dropped left out), the queue emptied. */
  #drainWaiting(): Submission[] {
    const drained: Submission[] = [];
    for (let submission = this.#waiting.shift(); submission; submission = this.#waiting.shift()) if (!submission.dropped) drained.push(submission);
    return drained;
  }

  #waitingCount(): number {
    let count = 0;
    for (const submission of this.#waiting) if (!submission.dropped) count++;
    return count;
  }

  /** A call slot of an actor free again: it takes the next waiting submission, or idles. */
  #release(actor: ActorHandle<A>): void {
    this.#running.set(actor, (this.#running.get(actor) ?? 1) - 1);
    let next = this.#waiting.shift();
    while (next?.dropped) next = this.#waiting.shift();
    if (next) this.#start(next, this.#take(actor));
    else this.#idle.push(actor);
  }

  /** An actor given a call: one of its slots taken. */
  #take(actor: ActorHandle<A>): ActorHandle<A> {
    this.#running.set(actor, (this.#running.get(actor) ?? 0) + 1);
    return actor;
  }

  #died(actor: ActorHandle<A>, cause: string): void {
    this.#remove(actor);
    if (this.#members.size > 0) return;
    for (const submission of this.#drainWaiting()) this.#fail(submission, this.#noActors(cause));
  }

  #remove(actor: ActorHandle<A>): void {
    this.#members.delete(actor);
    this.#running.delete(actor);
    for (let slot = this.#idle.indexOf(actor); slot >= 0; slot = this.#idle.indexOf(actor)) this.#idle.splice(slot, 1);
    this.#stopWatching.get(actor)?.();
    this.#stopWatching.delete(actor);
  }

  #noActors(cause?: string): Error {
    return new ActorDiedError('', `no actor is left in the ActorPool to run this call${cause ? ` (the last died: ${cause})` : ''}`);
  }

  /** Resolves once `submission` settles; GetTimeoutError after `timeout` ms. */
  async #settledWithin(submission: Submission, timeout: number | undefined): Promise<void> {
    checkTimeout(timeout);
    if (submission.settled || timeout === undefined) return submission.whenSettled;
    let timer: NodeJS.Timeout | undefined;
    const settled = await Promise.race([
      submission.whenSettled.then(() => true),
      new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), timeout))),
    ]);
    clearTimeout(timer);
    if (!settled) throw new GetTimeoutError(`no result of the ActorPool within ${timeout} ms`);
  }

  /** A taken result's value. The pool lets go of its ref (queues may still name the submission). */
  #value(submission: Submission): Promise<unknown> {
    if (this.#results.size === 0) this.#settledOrder.clear();
    if (submission.error !== undefined) return Promise.reject(submission.error);
    if (!hasRuntime()) return Promise.reject(new TrellisError('ERR_SHUTDOWN', 'the cluster was shut down before this result was taken'));
    const ref = submission.ref!;
    submission.ref = undefined;
    submission.value = undefined;
    return get(ref);
  }
}

function checkTimeout(timeout: unknown): void {
  if (timeout !== undefined && (typeof timeout !== 'number' || !(timeout >= 0))) {
    throw new InvalidArgumentError(`timeout is in milliseconds (0 or more), got ${String(timeout)}`);
  }
}
