/**
 * ObjectRef: a typed handle to a value that a task returns or `put` stores, owned by the driver.
 * Handles are counted: when the last handle anywhere (driver, workers, values that contain it)
 * goes, the object is deleted.
 */
import type { ObjectId } from '../store/object-id.js';

/** Where handles report their birth and collection; set by the process's runtime. */
export interface RefTracker {
  onHandleCreated(ref: ObjectRef<unknown>): void;
  /** The handle was disposed before being collected. */
  onHandleDisposed(ref: ObjectRef<unknown>): void;
}

let tracker: RefTracker | undefined;

export function setRefTracker(next: RefTracker | undefined): void {
  tracker = next;
}

export class ObjectRef<T = unknown> {
  readonly id: ObjectId;
  /** Phantom: carries T for type checking; never set. */
  declare readonly __type?: T;

  /** Who counts this handle; unset once disposed. A field, not a WeakMap: every call makes a ref. */
  #owner: RefTracker | undefined;

  constructor(id: ObjectId) {
    this.id = id;
    if (tracker) {
      this.#owner = tracker;
      tracker.onHandleCreated(this);
    }
  }

  /**
   * Lets go of this handle now rather than when it is garbage-collected: with `using`, or
   * `free()`, memory-heavy loops return store space at once. Using the handle afterwards is an
   * error; other handles to the same object keep it alive.
   */
  [Symbol.dispose](): void {
    const owner = this.#owner;
    if (!owner) return;
    this.#owner = undefined;
    owner.onHandleDisposed(this);
  }

  /** False once disposed. */
  get live(): boolean {
    return this.#owner !== undefined;
  }

  toString(): string {
    return `ObjectRef(${this.id})`;
  }
}

/** A value or a ref to it: what task arguments accept. */
export type RefOr<T> = T | ObjectRef<T>;
