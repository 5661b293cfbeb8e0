/**
 * A worker's calls waiting to start, by concurrency group (as Ray's concurrency groups): each
 * group runs at most its limit of calls at once, in the order they came, and waits for nothing in
 * other groups, so an actor's health check or stats call never queues behind its long calls. A
 * pooled worker, and an actor without groups, has just the default group (its maxConcurrency).
 */
import { Deque } from './deque.js';
import type { TaskMessage } from './protocol.js';

interface Group {
  limit: number;
  running: number;
  waiting: Deque<TaskMessage>;
}

export class CallQueue {
  #default: Group = { limit: 1, running: 0, waiting: new Deque() };
  readonly #groups = new Map<string, Group>();

  /** Sets the limits (an actor's, as it starts): the default group's, and named groups'. */
  configure(defaultLimit: number, groups: Record<string, number> = {}): void {
    this.#default.limit = defaultLimit;
    for (const [name, limit] of Object.entries(groups)) this.#groups.set(name, { limit, running: 0, waiting: new Deque() });
  }

  #groupOf(task: TaskMessage): Group {
    // The driver checks each call's group against the actor's: an unknown one cannot come.
    return (task.concurrencyGroup !== undefined ? this.#groups.get(task.concurrencyGroup) : undefined) ?? this.#default;
  }

  push(task: TaskMessage): void {
    this.#groupOf(task).waiting.push(task);
  }

  /** The next call that may start now (counted as running until ended), or undefined. */
  next(): TaskMessage | undefined {
    if (this.#default.running < this.#default.limit && this.#default.waiting.length > 0) {
      this.#default.running++;
      return this.#default.waiting.shift();
    }
    for (const group of this.#groups.values()) {
      if (group.running < group.limit && group.waiting.length > 0) {
        group.running++;
        return group.waiting.shift();
      }
    }
    return undefined;
  }

  /** A call that next() gave ended: its group may start another. */
  ended(task: TaskMessage): void {
    this.#groupOf(task).running--;
  }

  /** Calls waiting, in every group. */
  get length(): number {
    let length = this.#default.waiting.length;
    for (const group of this.#groups.values()) length += group.waiting.length;
    return length;
  }

  *[Symbol.iterator](): IterableIterator<TaskMessage> {
    yield* this.#default.waiting;
    for (const group of this.#groups.values()) yield* group.waiting;
  }

  /** Takes the waiting call `taskId` out (it was cancelled), if it is still waiting. */
  remove(taskId: string): TaskMessage | undefined {
    for (const group of [this.#default, ...this.#groups.values()]) {
      const waiting = [...group.waiting];
      const index = waiting.findIndex((task) => task.taskId === taskId);
      if (index < 0) continue;
      group.waiting.clear();
      waiting.forEach((task, position) => position !== index && group.waiting.push(task));
      return waiting[index];
    }
    return undefined;
  }

  /** Takes every waiting call out (a pooled worker hands them back while it blocks). */
  takeAll(): TaskMessage[] {
    const taken = [...this];
    this.#default.waiting.clear();
    for (const group of this.#groups.values()) group.waiting.clear();
    return taken;
  }
}
