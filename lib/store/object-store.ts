/**
 * The shared-memory object store of one node, as seen from one process. The node's owner creates
 * the segment; every other process (workers) attaches to it by name. Reads are zero-copy views.
 */
import { mkdirSync, rmSync, statfsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { GetTimeoutError, InvalidArgumentError, ObjectNotFoundError, StoreClosedError } from '../errors.js';
import { native, type NativeObjectStore, type NativePinned, type NativeStoreStats, type PinnedObjectInfo } from '../native.js';
import { onProcessExit, removeStaleEntries } from '../process-exit.js';
import { newObjectId, type ObjectId } from './object-id.js';

export interface ObjectStoreOptions {
  /** Segment name, unique on the host. Default: trellis-<pid>-<random>. */
  name?: string;
  /** Bytes for objects. Default: 30% of RAM, capped at what /dev/shm has free. */
  capacity?: number;
  /** Object table size. Default: one entry per 16 KiB of capacity, 4,096 to 1,048,576. */
  maxObjects?: number;
  /** Where sealed, unpinned objects go when the store is full; false disables spilling. */
  spillDirectory?: string | false;
  /** Bytes kept faulted in above the allocation frontier by a background thread; 0 disables. */
  prefaultWindow?: number;
}

/** A store's figures (see NativeStoreStats for what each means). */
export type StoreStats = NativeStoreStats;

export type ObjectState = 'absent' | 'created' | 'sealed' | 'spilled';
export type { PinnedObjectInfo };

type Bytes = ArrayBufferView | ArrayBuffer;

const empty = new Uint8Array(0);
const WINDOW_STRIDE = 2 ** 31;
const WINDOW_LENGTH = 2 ** 32 - 4096;

/** The store's memory as this process maps it: window buffers and buffers of one object each. */
const storeBuffers = new WeakSet<ArrayBufferLike>();

/** Whether `buffer` is the object store's shared memory (arrays over it were read zero-copy). */
export function isStoreMemory(buffer: ArrayBufferLike): boolean {
  return storeBuffers.has(buffer);
}

interface OwnBuffer {
  generation: number;
  buffer: WeakRef<ArrayBuffer>;
}

/** Forgets a collected buffer of one object's own, unless a newer one took its place. */
const ownBufferEntries = new FinalizationRegistry<{ buffers: Map<number, OwnBuffer>; entry: number; generation: number }>((held) => {
  const current = held.buffers.get(held.entry);
  if (current?.generation === held.generation && current.buffer.deref() === undefined) held.buffers.delete(held.entry);
});

/** Pins that this process's views hold (across its stores), and the bytes of their objects. */
const viewPins = { count: 0, bytes: 0 };

/**
 * Pins held by this process's views, released or collected ones no longer counted: a process that
 * has read zero-copy collects garbage until this drops (see the worker's collector).
 */
export function viewPinsHeld(): Readonly<{ count: number; bytes: number }> {
  return viewPins;
}

interface ViewPin {
  store: NativeObjectStore;
  entry: number;
  generation: number;
  size: number;
}

function unpinView(pin: ViewPin): void {
  viewPins.count--;
  viewPins.bytes -= pin.size;
  pin.store.release(pin.entry, pin.generation);
}

/** Drops the pin of a view that was garbage-collected without release(). */
const pinFinalizer = new FinalizationRegistry<ViewPin>(unpinView);

/**
 * A zero-copy view of a sealed object: `data` is a Uint8Array over the store's shared memory, so
 * arrays made from it must use its byteOffset, as `tableFromIPC` and `subarray` do. The view pins
 * the object: the store will not free or spill it while the view is held. `release()` unpins at
 * once, after which `data` reads as empty.
 *
 * By default `data` is a slice of one buffer that maps a window of the segment, and a view that is
 * dropped unpins when `data` is garbage-collected: keep the view (or its `data`) reachable for as
 * long as arrays made from it are used. A view got with `{ ownBuffer: true }` has a buffer of its
 * own over exactly its object, and the pin lasts as long as that buffer: any array made from the
 * view keeps the object pinned, however long it outlives the view.
 */
export class ObjectView {
  readonly id: ObjectId;
  readonly metadata: Uint8Array | null;
  #data: Uint8Array;
  readonly #pin: ViewPin;
  readonly #ownBuffer: boolean;

  /** @internal */
  constructor(id: ObjectId, store: NativeObjectStore, region: ArrayBuffer, pinned: NativePinned, ownBuffer = false) {
    this.id = id;
    this.#data = new Uint8Array(region, pinned[0], pinned[1]);
    this.metadata = pinned[2];
    this.#pin = { store, entry: pinned[3], generation: pinned[4], size: pinned[1] };
    this.#ownBuffer = ownBuffer;
    viewPins.count++;
    viewPins.bytes += pinned[1];
    pinFinalizer.register(ownBuffer ? region : this.#data, this.#pin, this);
  }

  get data(): Uint8Array {
    return this.#data;
  }

  get size(): number {
    return this.#data.byteLength;
  }

  get released(): boolean {
    return this.#data === empty;
  }

  release(): void {
    if (this.#data === empty) return;
    this.#data = empty;
    pinFinalizer.unregister(this);
    unpinView(this.#pin);
  }

  /**
   * @internal Ties the pin to `target` (an array or table made from this view) instead of the
   * view, for values handed to users who never see the view.
   */
  transferPinTo(target: object): void {
    // A view with a buffer of its own already pins for as long as anything made from it lives.
    if (this.#data === empty || this.#ownBuffer) return;
    pinFinalizer.unregister(this);
    pinFinalizer.register(target, this.#pin);
  }

  [Symbol.dispose](): void {
    this.release();
  }
}

/** An unsealed object being written by this process. */
export class ObjectBuilder {
  readonly id: ObjectId;
  readonly #store: ObjectStore;
  #data: Uint8Array;
  readonly #entry: number;
  readonly #generation: number;

  /** @internal */
  constructor(store: ObjectStore, id: ObjectId, region: ArrayBuffer, pinned: NativePinned) {
    this.#store = store;
    this.id = id;
    this.#data = new Uint8Array(region, pinned[0], pinned[1]);
    this.#entry = pinned[3];
    this.#generation = pinned[4];
  }

  /** Writable bytes of the object: fill them, then seal. Empty once sealed or aborted. */
  get data(): Uint8Array {
    return this.#data;
  }

  write(bytes: Bytes, offset = 0): void {
    this.#store.write(this.id, bytes, offset);
  }

  seal(): void {
    this.#store.seal(this.id);
  }

  abort(): void {
    this.#store.abort(this.id);
  }

  /**
   * @internal The store sealed, aborted or deleted the object: the bytes are no longer ours. Seal
   * and abort drop the creator's pin themselves; an object deleted before it was sealed is only
   * hidden while that pin lasts, and no seal or abort can find it by id any more, so `unpin` drops
   * the pin here (else the block stays allocated until this process closes).
   */
  detach(unpin?: NativeObjectStore): void {
    unpin?.release(this.#entry, this.#generation);
    this.#data = empty;
  }
}

interface Waiter {
  id: ObjectId;
  resolve: (view: ObjectView) => void;
  reject: (error: Error) => void;
  timer?: NodeJS.Timeout;
}

/** The default spill directory: the segment's name (`trellis-<owner pid>-<12 hex digits>`) and `-spill`. */
const SPILL_DIRECTORY_NAME = /^trellis-(\d+)-[0-9a-f]{12}-spill$/;

/**
 * Unlinks the segments, and removes the default spill directories, of owners that were killed
 * before they could clean up (SIGKILL, a crash): a segment holds its memory, and a spill
 * directory its disk, until someone does.
 */
function removeStaleSegments(): void {
  removeStaleEntries('/dev/shm', /^trellis-(\d+)-/);
  removeStaleEntries(tmpdir(), SPILL_DIRECTORY_NAME);
}

export class ObjectStore {
  readonly name: string;
  /** True in the process that created the segment: it unlinks it on close. */
  readonly isOwner: boolean;
  readonly #native: NativeObjectStore;
  readonly #windows = new Map<number, ArrayBuffer>();
  /** Per object entry: the buffer of its own last made for it (see #ownBuffer). */
  readonly #ownBuffers = new Map<number, OwnBuffer>();
  readonly #builders = new Map<ObjectId, ObjectBuilder>();
  readonly #waiters = new Map<ObjectId, Set<Waiter>>();
  readonly #spillDirectory: string | undefined;
  #waiterCount = 0;
  #closed = false;
  #forgetAtExit: (() => void) | undefined;

  private constructor(nativeStore: NativeObjectStore, isOwner: boolean, spillDirectory?: string) {
    this.#native = nativeStore;
    this.name = nativeStore.name;
    this.isOwner = isOwner;
    this.#spillDirectory = spillDirectory;
  }

  /** Creates a node's segment; this process owns it. */
  static create(options: ObjectStoreOptions = {}): ObjectStore {
    const name = options.name ?? `trellis-${process.pid}-${newObjectId().slice(0, 12)}`;
    if (options.capacity !== undefined) {
      if (!Number.isSafeInteger(options.capacity) || options.capacity <= 0) {
        throw new InvalidArgumentError(`capacity must be a positive integer of bytes, got ${options.capacity}`);
      }
      const shm = statfsSync('/dev/shm');
      const free = shm.bavail * shm.bsize;
      if (options.capacity > free) {
        throw new InvalidArgumentError(
          `capacity of ${options.capacity} bytes exceeds the ${free} bytes free in /dev/shm; ` +
            'a larger segment would crash its users with SIGBUS once /dev/shm fills',
        );
      }
    }
    removeStaleSegments();
    let spillDirectory: string | undefined;
    if (options.spillDirectory !== false) {
      spillDirectory = options.spillDirectory ?? join(tmpdir(), `${name}-spill`);
      mkdirSync(spillDirectory, { recursive: true });
    }
    let nativeStore: NativeObjectStore;
    try {
      nativeStore = new native.NativeObjectStore({
        mode: 'create',
        name,
        capacity: options.capacity,
        maxObjects: options.maxObjects,
        spillDirectory,
        prefaultWindow: options.prefaultWindow,
      });
    } catch (error) {
      // The default spill directory was made for this store alone: no store, no directory.
      if (options.spillDirectory === undefined && spillDirectory) rmSync(spillDirectory, { recursive: true, force: true });
      throw error;
    }
    const store = new ObjectStore(nativeStore, true, options.spillDirectory === undefined ? spillDirectory : undefined);
    // A segment outlives its processes unless unlinked: the owner takes it along however it ends.
    store.#forgetAtExit = onProcessExit(() => store.close());
    return store;
  }

  /** Attaches to a segment that another process created. */
  static attach(name: string): ObjectStore {
    if (typeof name !== 'string' || name.length === 0) throw new InvalidArgumentError('segment name must be a non-empty string');
    return new ObjectStore(new native.NativeObjectStore({ mode: 'attach', name }), false);
  }

  static defaultCapacity(): number {
    return native.defaultStoreCapacity();
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Allocates an object for writing; fill `builder.data` (or call write) and seal it. */
  create(id: ObjectId, size: number, options: { metadata?: Uint8Array } = {}): ObjectBuilder {
    this.#checkOpen();
    const pinned = this.#native.create(id, size, options.metadata);
    let located: [ArrayBuffer, NativePinned];
    try {
      located = this.#locate(pinned);
    } catch (error) {
      // No view can be made (an object over 4 GiB on Node 20): nobody could fill it, so it must
      // not stay allocated and pinned until this process closes.
      this.#native.abort(id);
      throw error;
    }
    const builder = new ObjectBuilder(this, id, ...located);
    this.#builders.set(id, builder);
    return builder;
  }

  write(id: ObjectId, bytes: Bytes, offset = 0): void {
    this.#checkOpen();
    this.#native.write(id, bytes, offset);
  }

  seal(id: ObjectId): void {
    this.#checkOpen();
    try {
      this.#native.seal(id);
    } catch (error) {
      this.#dropDeletedBuilder(id, error);
      throw error;
    }
    this.#dropBuilder(id);
  }

  abort(id: ObjectId): void {
    this.#checkOpen();
    try {
      this.#native.abort(id);
    } catch (error) {
      this.#dropDeletedBuilder(id, error);
      throw error;
    }
    this.#dropBuilder(id);
  }

  /** create + copy + seal in one native call. */
  put(id: ObjectId, data: Bytes, options: { metadata?: Uint8Array } = {}): void {
    this.#checkOpen();
    this.#native.put(id, data, options.metadata);
  }

  /** A view of a sealed object, waiting up to `timeout` ms (default: forever) for it to be sealed. */
  get(id: ObjectId, options: { timeout?: number } = {}): Promise<ObjectView> {
    try {
      const view = this.getIfSealed(id);
      if (view) return Promise.resolve(view);
    } catch (error) {
      return Promise.reject(error);
    }
    const timeout = options.timeout ?? Infinity;
    if (timeout <= 0) return Promise.reject(this.#timeoutError(id, timeout));
    return new Promise<ObjectView>((resolve, reject) => {
      const waiter: Waiter = { id, resolve, reject };
      if (Number.isFinite(timeout)) {
        waiter.timer = setTimeout(() => {
          this.#removeWaiter(waiter);
          reject(this.#timeoutError(id, timeout));
        }, timeout);
      }
      let set = this.#waiters.get(id);
      if (!set) this.#waiters.set(id, (set = new Set()));
      set.add(waiter);
      if (this.#waiterCount++ === 0) this.#native.watchSeals(() => this.#recheckWaiters());
      // A seal may have landed between the first look and the watch starting.
      this.#recheckWaiters();
    });
  }

  /**
   * A view if the object is sealed now, else undefined. Never waits. `ownBuffer`: the view gets a
   * buffer of its own (see ObjectView), for values whose arrays are handed to code that may keep
   * any of them; it costs an external buffer per call, which V8 counts toward collecting garbage.
   */
  getIfSealed(id: ObjectId, options: { ownBuffer?: boolean } = {}): ObjectView | undefined {
    this.#checkOpen();
    const result = this.#native.get(id);
    if (typeof result === 'number') return undefined;
    let located: [ArrayBuffer, NativePinned];
    const own = options.ownBuffer === true && result[1] > 0 && result[1] <= WINDOW_LENGTH;
    try {
      located = own ? this.#ownBuffer(result) : this.#locate(result);
    } catch (error) {
      this.#native.release(result[3], result[4]); // no view holds the pin: drop it
      throw error;
    }
    return new ObjectView(id, this.#native, ...located, own);
  }

  /** The object's state in the store (sealed objects that were spilled read as 'spilled'). */
  state(id: ObjectId): ObjectState {
    this.#checkOpen();
    return this.#native.state(id);
  }

  contains(id: ObjectId): boolean {
    const state = this.state(id);
    return state === 'sealed' || state === 'spilled';
  }

  /** Deletes now, or once the last pin anywhere goes. The id is free for reuse at once. */
  delete(id: ObjectId): void {
    this.#checkOpen();
    this.#native.delete(id);
    this.#dropBuilder(id, true);
  }

  stats(): StoreStats {
    this.#checkOpen();
    return this.#native.stats();
  }

  /**
   * Every pinned object, with the processes pinning it: what keeps bytes in the store that no
   * live object accounts for (a deleted object's bytes stay until its last pin goes).
   */
  pinned(): PinnedObjectInfo[] {
    this.#checkOpen();
    return this.#native.pinned();
  }

  /** Drops pins, unsealed objects and unfinished spills of dead processes. Returns how many died. */
  reapDeadProcesses(): number {
    this.#checkOpen();
    return this.#native.reapDeadProcesses();
  }

  /**
   * Detaches this process: its pins and unsealed objects are dropped and pending gets rejected. The
   * owner also unlinks the segment and its spill files. Views already handed out stay readable
   * until collected.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#forgetAtExit?.();
    for (const set of this.#waiters.values()) {
      for (const waiter of set) {
        clearTimeout(waiter.timer);
        waiter.reject(new StoreClosedError('ERR_STORE_CLOSED', `object store '${this.name}' was closed while waiting for ${waiter.id}`));
      }
    }
    this.#waiters.clear();
    this.#waiterCount = 0;
    for (const builder of this.#builders.values()) builder.detach();
    this.#builders.clear();
    this.#native.close();
    if (this.#spillDirectory) rmSync(this.#spillDirectory, { recursive: true, force: true });
  }

  [Symbol.dispose](): void {
    this.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.close();
  }

  /** @internal Test hooks: die at a named point inside the lock, or hold the lock forever. */
  debugSetCrashPoint(point: string): void {
    this.#native.setCrashPoint(point);
  }

  /** @internal */
  debugHoldLockForever(): never {
    return this.#native.holdLockForever();
  }

  #dropBuilder(id: ObjectId, unpin = false): void {
    const builder = this.#builders.get(id);
    if (!builder) return;
    this.#builders.delete(id);
    builder.detach(unpin ? this.#native : undefined);
  }

  /** A seal or abort that finds no object: another process deleted it unsealed; drop our pin. */
  #dropDeletedBuilder(id: ObjectId, error: unknown): void {
    if (error instanceof ObjectNotFoundError) this.#dropBuilder(id, true);
  }

  /**
   * The buffer to slice a pinned object's view from, and the object's offset in it. Windows of
   * 4 GiB start every 2 GiB (one buffer may hold at most 4 GiB on Node 20), so any object up to
   * 2 GiB lies whole inside the window where it starts; a larger one gets a buffer of its own.
   */
  #locate(pinned: NativePinned): [ArrayBuffer, NativePinned] {
    const [offset, size] = pinned;
    const index = Math.floor(offset / WINDOW_STRIDE);
    const start = index * WINDOW_STRIDE;
    let window = this.#windows.get(index);
    if (!window) {
      window = this.#native.region(start, Math.min(this.#native.dataSize - start, WINDOW_LENGTH));
      storeBuffers.add(window);
      this.#windows.set(index, window);
    }
    if (offset + size <= start + window.byteLength) return [window, [offset - start, ...pinned.slice(1)] as NativePinned];
    // Past a window's end: a buffer of its own, pinned through the view like any window slice.
    const single = this.#native.region(offset, size);
    storeBuffers.add(single);
    return [single, [0, ...pinned.slice(1)] as NativePinned];
  }

  /**
   * A buffer over exactly one pinned object's bytes. V8 counts each new external buffer as fresh
   * memory and collects garbage after every 64 MB or so of them, so a buffer still alive for the
   * same object (entry and generation) is handed out again rather than a second one made: getting
   * one large object again and again costs nothing more.
   */
  #ownBuffer(pinned: NativePinned): [ArrayBuffer, NativePinned] {
    const [offset, size, , entry, generation] = pinned;
    const cached = this.#ownBuffers.get(entry);
    let buffer = cached?.generation === generation ? cached.buffer.deref() : undefined;
    if (!buffer) {
      buffer = this.#native.region(offset, size);
      storeBuffers.add(buffer);
      this.#ownBuffers.set(entry, { generation, buffer: new WeakRef(buffer) });
      ownBufferEntries.register(buffer, { buffers: this.#ownBuffers, entry, generation });
    }
    return [buffer, [0, ...pinned.slice(1)] as NativePinned];
  }

  #checkOpen(): void {
    if (this.#closed) throw new StoreClosedError('ERR_STORE_CLOSED', `object store '${this.name}' is closed`);
  }

  #timeoutError(id: ObjectId, timeout: number): GetTimeoutError {
    const state = this.#closed ? 'absent' : this.#native.state(id);
    return new GetTimeoutError(`object ${id} was not sealed within ${timeout} ms (it is ${state} in store '${this.name}')`);
  }

  #removeWaiter(waiter: Waiter): void {
    const set = this.#waiters.get(waiter.id);
    if (!set?.delete(waiter)) return;
    if (set.size === 0) this.#waiters.delete(waiter.id);
    if (--this.#waiterCount === 0 && !this.#closed) this.#native.unwatchSeals();
  }

  #recheckWaiters(): void {
    if (this.#closed) return;
    for (const [id, set] of [...this.#waiters]) {
      for (const waiter of [...set]) {
        let view: ObjectView | undefined;
        try {
          view = this.getIfSealed(id);
        } catch (error) {
          clearTimeout(waiter.timer);
          this.#removeWaiter(waiter);
          waiter.reject(error as Error);
          continue;
        }
        if (!view) break;
        clearTimeout(waiter.timer);
        this.#removeWaiter(waiter);
        waiter.resolve(view);
      }
    }
  }
}

