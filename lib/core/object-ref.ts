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

/** One handle's hold, released once: by disposal, or by collection if never disposed. */
interface Hold {
  readonly id: string;
  released: boolean;
}

/** Reach the private hold of a handle (for HandleReleaser only). */
let holdOf: (ref: ObjectRef<unknown>) => Hold | undefined;
let setHold: (ref: ObjectRef<unknown>, hold: Hold) => void;

export function setRefTracker(next: RefTracker | undefined): void {
  tracker = next;
}

export class ObjectRef<T = unknown> {
  readonly id: ObjectId;
  /** Phantom: carries T for type checking; never set. */
  declare readonly __type?: T;

  /** Who counts this handle; unset once disposed. A field, not a WeakMap: every call makes a ref. */
  #owner: RefTracker | undefined;
  /** Set by the HandleReleaser that tracks this handle; its finalizer gets the hold, not the handle. */
  #hold: Hold | undefined;

  static {
    holdOf = (ref) => ref.#hold;
    setHold = (ref, hold) => {
      ref.#hold = hold;
    };
  }

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

/**
 * Calls `release(id)` once per handle: when it is disposed, or when it is collected if it never
 * was. Handles register without an unregister token: V8 keeps tokens in a weak table that made
 * each registration about ten times dearer (4.4 us against 0.4 us measured here), and every task
 * or actor call makes a handle. Instead each handle gets a small hold record, shared by the handle
 * and its finalizer, that says whether it was released already. It is per handle, not per id: a
 * disposed handle that is still reachable must not stand in for another handle to the same
 * object that is collected first.
 */
export class HandleReleaser {
  readonly #release: (id: string) => void;
  readonly #registry: FinalizationRegistry<Hold>;

  constructor(release: (id: string) => void) {
    this.#release = release;
    this.#registry = new FinalizationRegistry((hold) => this.#collected(hold));
  }

  track(ref: ObjectRef<unknown>): void {
    const hold: Hold = { id: ref.id, released: false };
    setHold(ref, hold);
    this.#registry.register(ref, hold);
  }

  disposed(ref: ObjectRef<unknown>): void {
    const hold = holdOf(ref);
    if (hold === undefined) return this.#release(ref.id);
    if (hold.released) return;
    hold.released = true;
    this.#release(hold.id);
  }

  #collected(hold: Hold): void {
    if (hold.released) return;
    hold.released = true;
    this.#release(hold.id);
  }
}
