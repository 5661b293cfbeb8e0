/**
 * ObjectRef: a typed handle to a value that a task returns or `put` stores, owned by the driver.
 * Handles are counted: when the last handle anywhere (driver, workers, values that contain it)
 * goes, the object is deleted.
 */
import type { ObjectId } from '../store/object-id.js';

/** Where handles report their birth and collection; set by the process's runtime. */
export interface RefTracker {
  onHandleCreated(ref: ObjectRef<unknown>): void;
}

let tracker: RefTracker | undefined;

export function setRefTracker(next: RefTracker | undefined): void {
  tracker = next;
}

export class ObjectRef<T = unknown> {
  readonly id: ObjectId;
  /** Phantom: carries T for type checking; never set. */
  declare readonly __type?: T;

  constructor(id: ObjectId) {
    this.id = id;
    tracker?.onHandleCreated(this);
  }

  toString(): string {
    return `ObjectRef(${this.id})`;
  }
}

/** A value or a ref to it: what task arguments accept. */
export type RefOr<T> = T | ObjectRef<T>;
