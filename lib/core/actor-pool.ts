/**
 * ActorPool: calls spread over a fixed set of actors, one call per actor at a time, results
 * taken in submission order or as they finish (as Ray's ray.util.ActorPool). An actor goes back
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

/** How a pool calls an actor with a value: `(actor, value) => actor.method.remote(value)`. */
export type PoolCall<A, V, R> = (actor: ActorHandle<A>, value: V) => ObjectRef<R>;

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
}

export class ActorPool<A> {
  readonly #members = new Set<ActorHandle<A>>();
  readonly #idle: ActorHandle<A>[] = [];
  /** Submissions waiting for an actor, in order. */
  readonly #waiting: Submission[] = [];
  /** Submissions whose results were not taken yet, by index. */
  readonly #results = new Map<number, Submission>();
  readonly #stopWatching = new Map<ActorHandle<A>, () => void>();
  #submitted = 0;
  /** The index of the next result getNext() gives. */
  #nextInOrder = 0;
  #closed = false;
  #turn: Promise<unknown> = Promise.resolve();

  constructor(actors: Iterable<ActorHandle<A>>) {
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
    if (this.#closed) throw new TrellisError('ERR_POOL_CLOSED', 'this ActorPool was closed');
    if (typeof call !== 'function') throw new InvalidArgumentError(`submit() takes a function (actor, value) => ref, got ${typeof call}`);
    let settle!: () => void;
    const whenSettled = new Promise<void>((resolve) => (settle = resolve));
    const submission: Submission = { index: this.#submitted++, call: call as Submission['call'], value, settled: false, whenSettled, settle };
    this.#results.set(submission.index, submission);
    if (this.#members.size === 0) this.#fail(submission, this.#noActors());
    else if (this.#idle.length > 0) this.#start(submission, this.#idle.shift()!);
    else this.#waiting.push(submission);
  }

  /** Whether a submitted call's result has not been taken yet. */
  hasNext(): boolean {
    return this.#results.size > 0;
  }

  /** Whether an actor is idle, with no submission waiting for one. */
  hasFree(): boolean {
    return this.#idle.length > 0 && this.#waiting.length === 0;
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
    await this.#settledWithin([submission], options.timeout);
    this.#results.delete(submission.index);
    return this.#value(submission);
  }

  async #takeFirstDone(options: PoolNextOptions): Promise<unknown> {
    if (this.#results.size === 0) throw new InvalidArgumentError('getNextUnordered(): no result is left to take (hasNext() is false)');
    const outstanding = [...this.#results.values()];
    const submission = outstanding.find((candidate) => candidate.settled) ?? (await this.#settledWithin(outstanding, options.timeout));
    this.#results.delete(submission.index);
    return this.#value(submission);
  }

  /**
   * Calls `call` with each value, at most one call per actor at a time, and yields the results in
   * the values' order. Stopping early (break) drops the calls not yet started.
   */
  async *map<V, R>(call: PoolCall<A, V, R>, values: Iterable<V>): AsyncGenerator<R, void, undefined> {
    yield* this.#mapWith(call, values, (options) => this.getNext<R>(options));
  }

  /** As map(), yielding each result as its call finishes. */
  async *mapUnordered<V, R>(call: PoolCall<A, V, R>, values: Iterable<V>): AsyncGenerator<R, void, undefined> {
    yield* this.#mapWith(call, values, (options) => this.getNextUnordered<R>(options));
  }

  /** Takes an idle actor out of the pool (undefined if none is idle). */
  popIdle(): ActorHandle<A> | undefined {
    const actor = this.#idle.shift();
    if (actor) this.#remove(actor);
    return actor;
  }

  /** Adds an actor to the pool: it takes the next waiting submission at once. */
  push(actor: ActorHandle<A>): void {
    if (this.#closed) throw new TrellisError('ERR_POOL_CLOSED', 'this ActorPool was closed');
    if (!actor || typeof actor.actorId !== 'string') throw new InvalidArgumentError('an ActorPool takes actor handles (what ActorClass.remote() returns)');
    if (this.#members.has(actor)) throw new InvalidArgumentError(`actor ${actor.actorId} is in this pool already`);
    this.#members.add(actor);
    this.#stopWatching.set(actor, currentRuntime().watchActors([actor.actorId], (_, cause) => this.#died(actor, cause)));
    this.#release(actor);
  }

  /**
   * Ends the pool: submissions still waiting for an actor fail, and the pool stops watching its
   * actors. Calls running finish; their results can still be taken. The actors stay alive.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const submission of this.#waiting.splice(0)) this.#fail(submission, new TrellisError('ERR_POOL_CLOSED', 'the ActorPool was closed before this call started'));
    for (const stop of this.#stopWatching.values()) stop();
    this.#stopWatching.clear();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  async *#mapWith<V, R>(call: PoolCall<A, V, R>, values: Iterable<V>, next: (options: PoolNextOptions) => Promise<R>): AsyncGenerator<R, void, undefined> {
    const first = this.#submitted;
    for (const value of values) this.submit(call, value);
    const mine = (submission: Submission) => submission.index >= first;
    try {
      while ([...this.#results.values()].some(mine)) yield await next({});
    } finally {
      // Stopped early: what has not started is dropped; what runs finishes and frees its actor.
      for (let i = this.#waiting.length - 1; i >= 0; i--) if (mine(this.#waiting[i]!)) this.#waiting.splice(i, 1);
      for (const submission of [...this.#results.values()]) if (mine(submission)) this.#results.delete(submission.index);
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
    submission.settled = true;
    submission.settle();
    // One that died for good was taken out of the pool (its watch fires before its calls fail).
    if (this.#members.has(actor)) this.#release(actor);
  }

  #fail(submission: Submission, error: unknown): void {
    submission.error = error;
    submission.settled = true;
    submission.settle();
  }

  /** An actor free again: it takes the next waiting submission, or idles. */
  #release(actor: ActorHandle<A>): void {
    const next = this.#waiting.shift();
    if (next) this.#start(next, actor);
    else this.#idle.push(actor);
  }

  #died(actor: ActorHandle<A>, cause: string): void {
    this.#remove(actor);
    if (this.#members.size > 0) return;
    for (const submission of this.#waiting.splice(0)) this.#fail(submission, this.#noActors(cause));
  }

  #remove(actor: ActorHandle<A>): void {
    this.#members.delete(actor);
    const idle = this.#idle.indexOf(actor);
    if (idle >= 0) this.#idle.splice(idle, 1);
    this.#stopWatching.get(actor)?.();
    this.#stopWatching.delete(actor);
  }

  #noActors(cause?: string): Error {
    return new ActorDiedError('', `no actor is left in the ActorPool to run this call${cause ? ` (the last died: ${cause})` : ''}`);
  }

  async #settledWithin(submissions: Submission[], timeout: number | undefined): Promise<Submission> {
    if (timeout !== undefined && (typeof timeout !== 'number' || !(timeout >= 0))) {
      throw new InvalidArgumentError(`timeout is in milliseconds (0 or more), got ${String(timeout)}`);
    }
    let timer: NodeJS.Timeout | undefined;
    const race: Array<Promise<Submission | undefined>> = submissions.map((submission) => submission.whenSettled.then(() => submission));
    if (timeout !== undefined) race.push(new Promise((resolve) => (timer = setTimeout(() => resolve(undefined), timeout))));
    const first = await Promise.race(race);
    clearTimeout(timer);
    if (!first) throw new GetTimeoutError(`no result of the ActorPool within ${timeout} ms`);
    return first;
  }

  #value(submission: Submission): Promise<unknown> {
    if (submission.error !== undefined) return Promise.reject(submission.error);
    if (!hasRuntime()) return Promise.reject(new TrellisError('ERR_SHUTDOWN', 'the cluster was shut down before this result was taken'));
    return get(submission.ref!);
  }
}
