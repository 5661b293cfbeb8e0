/**
 * Typed ends of a native channel. A message is [kind, payload]: a value (kind 0; 2 when it is plain
 * msgpack, decoded in place; 3 when it is CUDA IPC handles, see ipc.ts) or an error (1): application
 * errors flow through a compiled graph as values, so one failing execution does not stop the graph.
 *
 * Waiting is adaptive. While messages flow ("hot"), a read first waits synchronously on the JS
 * thread: a spin (which yields the CPU between looks, see channel.cc), then a futex wait of one
 * slice. A message that comes within it is returned as a value, not a promise, so a round trip
 * costs no promise or event-loop hop. Longer waits continue in 1 ms slices with a turn of the
 * event loop between them; after 10 ms without a message the end turns "cold" and waits on a
 * thread of its own, leaving the event loop entirely free.
 *
 * What a one-actor round trip is made of (2-core VM, other load): a futex wake costs ~3.5 us when
 * both processes share a CPU and ~7 us across CPUs (the ping-pong floor is two wakes: 6-20 us from
 * run to run, by placement); the JS and native work of both ends is ~2.4 us in all once small
 * messages skip Buffer allocation (it was ~5.4 us, half of it malloc and V8 backing stores). A spin
 * that finds the message skips both wakes: ~5 us a round trip, below the floor. Two traps found on
 * the way: a pure spin whose writer sits on the same CPU (the scheduler often puts a woken process
 * next to its waker) blocks that writer for the whole spin, 15 -> 140 us a round trip, hence the
 * yielding spin and the spin dropped after misses; and the first second or so after actors start
 * runs 5-10x slower (V8 still compiling, workers still loading), which a short warm-up measured.
 */
import { Packr } from 'msgpackr';
import { ChannelError, type RemoteErrorInfo } from '../errors.js';
import { native, type NativeChannel } from '../native.js';
import { newObjectId } from '../store/object-id.js';
import { pack, unpack } from '../core/serialization.js';

/** Milliseconds of one blocking slice, and of hot waiting before an end turns cold. */
const SLICE_MS = 1;
const HOT_MS = 10;
/**
 * A hot reader spins (yielding the CPU between looks) for twice its recent waits, within these
 * bounds in microseconds, before it sleeps: a message due soon is then caught without a wake-up.
 * Measured on 2 cores with other load, against a fixed 50 us spin: a 4-actor chain's round trip
 * 128 -> 56 us, scatter-gather 127 -> 104 us, the single actor unchanged (~18 us).
 */
const MIN_SPIN_MICROS = 50;
const MAX_SPIN_MICROS = 200;
/**
 * A hot reader spins only when its recent messages came sooner than this: when they come later (a
 * long pipeline, a slow method, a caller that does other work in between) a spin would only take
 * a core from the process that is producing them.
 */
const SPIN_WHEN_WAITS_UNDER_US = MAX_SPIN_MICROS;
/**
 * After this many spins in a row that missed, a reader stops spinning for SPIN_PAUSE waits, twice
 * as many each time misses pause it again (up to MAX_SPIN_PAUSE), back to SPIN_PAUSE after
 * SPIN_HITS hits in a row. Misses come in runs where the CPUs are busy with other work: a yield
 * there hands the CPU away for a whole time slice.
 */
const SPIN_MISSES = 4;
const SPIN_PAUSE = 64;
const MAX_SPIN_PAUSE = 1024;
const SPIN_HITS = 32;
/** Longest a compiled graph's loop may keep the event loop from a turn (ms). */
const STARVE_MS = 1;

/** A message; `ipc` marks a value that is CUDA IPC handles (see ipc.ts), not the value itself. */
export type Message = { ok: true; value: unknown; ipc?: true } | { ok: false; error: RemoteErrorInfo };

const yieldToEventLoop = () => new Promise<void>((resolve) => setImmediate(resolve));

let lastTurn = performance.now();
let turnScheduled = false;
function noteTurn(): void {
  turnScheduled = false;
  lastTurn = performance.now();
}

/**
 * True when the event loop has had no turn for STARVE_MS: reads that find their messages at once
 * never leave the microtask queue, and a graph kept busy would keep its process from its socket
 * (ordinary actor calls, teardown, the driver's cluster). The caller then awaits `eventLoopTurn()`.
 */
export function starving(): boolean {
  if (!turnScheduled) {
    // The turn asked for last time has come, so this runs in a later one: count from now.
    turnScheduled = true;
    lastTurn = performance.now();
    setImmediate(noteTurn);
    return false;
  }
  return performance.now() - lastTurn > STARVE_MS;
}

export const eventLoopTurn = yieldToEventLoop;

export function createChannel(slots: number, readers: number, slotBytes: number): string {
  const name = `trellis-${process.pid}-ch-${newObjectId().slice(0, 12)}`;
  native.NativeChannel.create(name, slots, readers, slotBytes);
  return name;
}

export function destroyChannel(name: string): void {
  native.NativeChannel.destroy(name);
}

/** Plain msgpack for messages of scalars and flat lists of them (most arguments and results). */
const plain = new Packr({ useRecords: false });

function isScalar(value: unknown): boolean {
  const kind = typeof value;
  return kind === 'number' || kind === 'string' || kind === 'boolean' || value === null || value === undefined;
}

function isPlain(value: unknown): boolean {
  if (isScalar(value)) return true;
  if (!Array.isArray(value) || value.length > 16) return false;
  for (let i = 0; i < value.length; i++) if (!isScalar(value[i])) return false;
  return true;
}

/** Message kinds, the first element of a message: 2 marks plain msgpack (no binary data in it). */
const OK = 0;
const FAILED = 1;
const OK_PLAIN = 2;
const OK_IPC = 3;

export function encodeMessage(message: Message): Uint8Array {
  if (message.ok && isPlain(message.value)) return plain.pack([OK_PLAIN, message.value]);
  return pack(message.ok ? [OK, message.value] : [FAILED, message.error]);
}

/** A message whose value is `payload`, CUDA IPC handles for the reader to map (see ipc.ts). */
export function encodeIpcMessage(payload: unknown): Uint8Array {
  return pack([OK_IPC, payload]);
}

export function decodeMessage(bytes: Uint8Array): Message {
  return toMessage(unpack(bytes) as [number, unknown]);
}

function toMessage([kind, payload]: [number, unknown]): Message {
  if (kind === FAILED) return { ok: false, error: payload as RemoteErrorInfo };
  return kind === OK_IPC ? { ok: true, value: payload, ipc: true } : { ok: true, value: payload };
}

/** Bytes of a reader's inbox: messages up to this size are copied into it instead of a buffer of their own. */
const INBOX_BYTES = 4096;

/**
 * A message copied into `inbox` (its first `length` bytes). Plain messages decode in place; others
 * may hold binary data, which the codec hands out as views of its input, so they decode from a
 * copy that the next message cannot overwrite.
 */
function decodeInbox(inbox: Uint8Array, length: number): Message {
  // [kind, payload]: a fixarray of 2 (0x92), then the kind as a positive fixint.
  if (inbox[0] === 0x92 && inbox[1] === OK_PLAIN) return toMessage(plain.unpack(inbox, length) as [number, unknown]);
  return decodeMessage(inbox.slice(0, length));
}

/**
 * When a reader spins and for how long. It spins while its recent messages came soon after it
 * began to wait and its recent spins found them; misses in a row pause the spin for a while (then
 * it tries again), so a reader whose writer is slow or starved of CPU sleeps at once instead.
 */
export class SpinPolicy {
  /** Moving average of recent waits (microseconds, from the start of a wait to its message). */
  recentWaitUs = 0;
  #misses = 0;
  #hits = 0;
  #paused = 0;
  #pause = SPIN_PAUSE;

  spinMicros(): number {
    if (this.#paused > 0) {
      this.#paused--;
      return 0;
    }
    if (this.recentWaitUs >= SPIN_WHEN_WAITS_UNDER_US) return 0;
    return Math.min(MAX_SPIN_MICROS, Math.max(MIN_SPIN_MICROS, 2 * this.recentWaitUs));
  }

  /** A wait that began `waitedUs` ago ended with a message; its last attempt spun `spun` us and took `attemptUs`. */
  record(spun: number, attemptUs: number, waitedUs: number): void {
    this.recentWaitUs = 0.8 * this.recentWaitUs + 0.2 * waitedUs;
    if (spun <= 0) return;
    if (attemptUs > spun + 5) return this.#missed();
    this.#misses = 0;
    if (++this.#hits >= SPIN_HITS) this.#pause = SPIN_PAUSE;
  }

  /** An attempt that spun `spun` us passed without a message. */
  missed(spun: number): void {
    if (spun > 0) this.#missed();
  }

  #missed(): void {
    this.#hits = 0;
    if (++this.#misses < SPIN_MISSES) return;
    this.#misses = 0;
    this.#paused = this.#pause;
    this.#pause = Math.min(MAX_SPIN_PAUSE, 2 * this.#pause);
  }
}

export class ChannelWriter {
  readonly name: string;
  readonly #native: NativeChannel;

  constructor(name: string) {
    this.name = name;
    this.#native = new native.NativeChannel(name, -1);
  }

  /** Writes now if there is room; false when the ring is full (nothing written). */
  tryWrite(bytes: Uint8Array): boolean {
    return this.#native.tryWrite(bytes, 0, 0);
  }

  /**
   * Writes now when there is room (undefined); otherwise a promise that settles once a thread of
   * the channel's own has written it. A writer never blocks the JS thread: what frees room may
   * need this very thread (a reader of another channel).
   */
  write(message: Message, timeout = Infinity): Promise<void> | undefined {
    return this.writeBytes(encodeMessage(message), timeout);
  }

  /** write() of an encoded message. */
  writeBytes(bytes: Uint8Array, timeout = Infinity): Promise<void> | undefined {
    if (this.#native.tryWrite(bytes, 0, 0)) return undefined;
    return this.#native.writeAsync(bytes, timeout);
  }

  /** Writes on the channel's thread, a list in order, each waiting up to `timeout` for room; see `written`. */
  writeAsync(bytes: Uint8Array | Uint8Array[], timeout = Infinity): Promise<void> {
    return this.#native.writeAsync(bytes, timeout);
  }

  /** Messages written to the channel so far, by every process. */
  get written(): number {
    return this.#native.written;
  }

  /** Messages every reader is done with (see ChannelReader.finish). */
  get finished(): number {
    return this.#native.finished;
  }

  close(): void {
    this.#native.close();
  }

  release(): void {
    this.#native.release();
  }
}

export class ChannelReader {
  readonly name: string;
  readonly #native: NativeChannel;
  readonly spin = new SpinPolicy();
  readonly #inbox = new Uint8Array(INBOX_BYTES);
  #hot = true;

  constructor(name: string, reader: number) {
    this.name = name;
    this.#native = new native.NativeChannel(name, reader);
  }

  /** The next message if one comes within `spinMicros` spinning plus `waitMillis` asleep, else null. */
  #take(spinMicros: number, waitMillis: number): Message | null {
    const got = this.#native.tryReadInto(this.#inbox, spinMicros, waitMillis);
    if (got === null) return null;
    return typeof got === 'number' ? decodeInbox(this.#inbox, got) : decodeMessage(got);
  }

  /**
   * The next message: a value when it is waiting or comes within the first hot wait, else a
   * promise of it. `blocking` allows waiting on the JS thread; pass false when this thread has
   * other work the message depends on.
   */
  read(timeout = Infinity, blocking = true): Message | Promise<Message> {
    const now = this.#take(0, 0);
    if (now) return now;
    if (!blocking) return this.#native.readAsync(timeout).then(decodeMessage);
    if (!this.#hot) return this.#cold(timeout);
    const started = performance.now();
    return this.#attempt(started, timeout) ?? this.#hotLoop(started, timeout);
  }

  /** One blocking attempt: the policy's spin, then a futex wait of at most one slice. */
  #attempt(started: number, timeout: number): Message | null {
    const spun = Math.min(this.spin.spinMicros(), Math.max(0, timeout) * 1000);
    const begun = performance.now();
    const message = this.#take(spun, Math.min(SLICE_MS, timeout));
    if (message) {
      const now = performance.now();
      this.spin.record(spun, (now - begun) * 1000, (now - started) * 1000);
    } else {
      this.spin.missed(spun);
    }
    return message;
  }

  async #hotLoop(started: number, timeout: number): Promise<Message> {
    const limit = Math.min(HOT_MS, timeout);
    while (performance.now() - started < limit) {
      await yieldToEventLoop();
      const message = this.#attempt(started, Math.max(0, timeout - (performance.now() - started)));
      if (message) return message;
    }
    // Cold after HOT_MS without a message; a shorter timeout that ran out says nothing of the flow.
    if (limit === HOT_MS) this.#hot = false;
    return this.#cold(timeout - (performance.now() - started));
  }

  /**
   * This reader is done with its first `count` messages: not only read, but no longer in use (a
   * CUDA IPC message's memory is in use until the execution that read it ends).
   */
  finish(count: number): void {
    this.#native.finish(count);
  }

  async #cold(timeout: number): Promise<Message> {
    const bytes = await this.#native.readAsync(Math.max(0, timeout));
    this.#hot = true;
    return decodeMessage(bytes);
  }

  close(): void {
    this.#native.close();
  }

  release(): void {
    this.#native.release();
  }
}

export function isChannelClosed(error: unknown): boolean {
  return error instanceof ChannelError && error.code === 'ERR_CHANNEL_CLOSED';
}
