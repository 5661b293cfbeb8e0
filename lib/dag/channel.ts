/**
 * Typed ends of a native channel. A message is [0, value] or [1, error]: application errors flow
 * through a compiled graph as values, so one failing execution does not stop the graph.
 */
import { ChannelError, type RemoteErrorInfo } from '../errors.js';
import { native, type NativeChannel } from '../native.js';
import { newObjectId } from '../store/object-id.js';
import { pack, unpack } from '../core/serialization.js';

/** Microseconds a read or write spins on the JS thread before it waits on a thread of its own. */
export const SPIN_MICROS = 50;

export type Message = { ok: true; value: unknown } | { ok: false; error: RemoteErrorInfo };

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

export class ChannelWriter {
  readonly name: string;
  readonly #native: NativeChannel;

  constructor(name: string) {
    this.name = name;
    this.#native = new native.NativeChannel(name, -1);
  }

  /** Writes now when there is room; otherwise waits (off the JS thread) up to `timeout` ms. */
  write(message: Message, timeout = Infinity): Promise<void> | undefined {
    const bytes = encodeMessage(message);
    if (this.#native.tryWrite(bytes, SPIN_MICROS)) return undefined;
    return this.#native.writeAsync(bytes, timeout);
  }

  writeBytes(bytes: Uint8Array, timeout = Infinity): Promise<void> | undefined {
    if (this.#native.tryWrite(bytes, SPIN_MICROS)) return undefined;
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

  constructor(name: string, reader: number) {
    this.name = name;
    this.#native = new native.NativeChannel(name, reader);
  }

  /** The next message: at once when it arrives within the spin, else when a wait delivers it. */
  read(timeout = Infinity): Message | Promise<Message> {
    const bytes = this.#native.tryRead(SPIN_MICROS);
    if (bytes) return decodeMessage(bytes);
    return this.#native.readAsync(timeout).then(decodeMessage);
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
