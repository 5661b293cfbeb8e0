/**
 * Typed ends of a native channel. A message is [0, value] or [1, error]: application errors flow
 * through a compiled graph as values, so one failing execution does not stop the graph.
 *
 * Waiting is adaptive. While messages flow ("hot"), an end sleeps on the channel's futex on the JS
 * thread itself, in 1 ms slices with a turn of the event loop between them: a wake-up then costs
 * what a futex costs, not a hop through another thread. After 10 ms without a message it turns
 * "cold" and waits on a thread of its own, leaving the event loop entirely free.
 */
import { ChannelError, type RemoteErrorInfo } from '../errors.js';
import { native, type NativeChannel } from '../native.js';
import { newObjectId } from '../store/object-id.js';
import { pack, unpack } from '../core/serialization.js';

/** Milliseconds of one blocking slice, and of hot waiting before an end turns cold. */
const SLICE_MS = 1;
const HOT_MS = 10;
/**
 * A hot reader first spins this long when its recent messages came that soon: sooner than a sleep
 * and a wake. When they come later (a long pipeline, busy cores), spinning would only steal a
 * core from the process that is producing them.
 */
const SPIN_MICROS = 50;

export type Message = { ok: true; value: unknown } | { ok: false; error: RemoteErrorInfo };

const yieldToEventLoop = () => new Promise<void>((resolve) => setImmediate(resolve));

export function createChannel(slots: number, readers: number, slotBytes: number): string {
  const name = `trellis-${process.pid}-ch-${newObjectId().slice(0, 12)}`;
  native.NativeChannel.create(name, slots, readers, slotBytes);
  return name;
}

export function destroyChannel(name: string): void {
  native.NativeChannel.destroy(name);
}

export function encodeMessage(message: Message): Uint8Array {
  return pack(message.ok ? [0, message.value] : [1, message.error]);
}

function decodeMessage(bytes: Uint8Array): Message {
  const [kind, payload] = unpack(bytes) as [number, unknown];
  return kind === 0 ? { ok: true, value: payload } : { ok: false, error: payload as RemoteErrorInfo };
}

/** Runs `attempt` (which may block up to one slice) while hot, then falls back to `cold`. */
async function adaptive<T>(
  state: { hot: boolean; recentWaitUs: number },
  attempt: (waitMs: number, spinMicros: number) => T | null,
  cold: (timeout: number) => Promise<T>,
  timeout: number,
): Promise<T> {
  const started = Date.now();
  if (state.hot) {
    const waitStart = performance.now();
    let spin = state.recentWaitUs < 5 * SPIN_MICROS ? SPIN_MICROS : 0;
    while (Date.now() - started < Math.min(HOT_MS, timeout)) {
      const result = attempt(SLICE_MS, spin);
      spin = 0;
      if (result !== null) {
        const waited = (performance.now() - waitStart) * 1000;
        state.recentWaitUs = 0.8 * state.recentWaitUs + 0.2 * waited;
        return result;
      }
      await yieldToEventLoop();
    }
    state.hot = false;
  }
  const result = await cold(Math.max(0, timeout - (Date.now() - started)));
  state.hot = true;
  return result;
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
    const bytes = encodeMessage(message);
    if (this.#native.tryWrite(bytes, 0, 0)) return undefined;
    return this.#native.writeAsync(bytes, timeout);
  }

  writeAsync(bytes: Uint8Array, timeout = Infinity): Promise<void> {
    return this.#native.writeAsync(bytes, timeout);
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
  readonly #state = { hot: true, recentWaitUs: 0 };

  constructor(name: string, reader: number) {
    this.name = name;
    this.#native = new native.NativeChannel(name, reader);
  }

  /**
   * The next message: at once when one is waiting, else a promise of it. `blocking` allows hot
   * waiting on the JS thread; pass false when this thread has other work the message depends on.
   */
  read(timeout = Infinity, blocking = true): Message | Promise<Message> {
    const bytes = this.#native.tryRead(0, 0);
    if (bytes) return decodeMessage(bytes);
    if (!blocking) return this.#native.readAsync(timeout).then(decodeMessage);
    return adaptive(
      this.#state,
      (waitMs, spinMicros) => this.#native.tryRead(spinMicros, waitMs),
      (remaining) => this.#native.readAsync(remaining),
      timeout,
    ).then(decodeMessage);
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
