/**
 * A driver-worker connection: frames (protocol.ts) leave in batches, one per tick, each with a
 * header of its payload's length and a sequence number. A batch goes through the connection's
 * ring in shared memory (native/channel/connection_ring.cc) when it has room, else through the
 * Unix socket. The ring spares both processes a system call per message and the reader Node's
 * stream machinery: an awake reader (running JS, or spinning before its loop sleeps) takes the
 * bytes as they land. A reader that sleeps gets a doorbell on the socket, a batch with no payload.
 *
 * Two paths can reorder batches, so the reader delivers them by sequence: a batch that came by
 * socket waits for the ring's earlier ones (already in the ring when it was sent), and the other
 * way round.
 */
import type { Socket } from 'node:net';
import { native, type NativeConnectionRing } from '../native.js';
import { FrameWriter, bulkFrameHead, decodeBulkHead, decodeFrame, isBulkFrame, writeFrame, type AnyMessage } from './protocol.js';
import { busyPolling } from './busy-poll.js';

/**
 * Whether the driver gives its workers' connections rings. They pay where readers are awake, that
 * is where processes busy-poll (hosts with cores to spare, or TRELLIS_BUSY_POLL_US): a reader that
 * sleeps needs the socket's wake-up anyway, and there the ring's copy, the doorbell and the extra
 * calls into the addon made an empty actor call 10-20 µs slower on the 2-core VM.
 * TRELLIS_CONNECTION_RING=1 uses them regardless, 0 never.
 */
export function connectionRingWanted(): boolean {
  const setting = process.env.TRELLIS_CONNECTION_RING;
  if (setting === '0') return false;
  if (setting === '1') return true;
  return busyPolling();
}

/** Bytes each way. A batch larger than the free room (a big inline value) goes by socket. */
export const RING_BYTES = 256 * 1024;
const HEADER_BYTES = 8;
/** The doorbell's sequence number, which no batch has. */
const DOORBELL = 0xffffffff;
const doorbell = Buffer.from([0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);

/** Batches this process sent by ring (`rang`: with a doorbell) and by socket; doorbells it got. */
export const connectionStats = { ring: 0, rang: 0, socket: 0, doorbells: 0 };

function nextSequence(sequence: number): number {
  const next = (sequence + 1) >>> 0;
  return next === DOORBELL ? 0 : next;
}

/** Told when a connection wrote (an answer is now expected) and when data arrived. */
export interface TrafficObserver {
  sent(): void;
  received(): void;
}

interface Batch {
  sequence: number;
  payload?: Buffer;
  /** A bulk frame read straight into where its bytes belong (see bulkSink), decoded already. */
  message?: AnyMessage;
}

/**
 * Where a bulk frame's raw bytes belong, asked once its head has arrived and before they do (an
 * object's chunk, into the store object it is part of): they are copied there as they come, not
 * joined into a batch first. Undefined: the batch arrives whole, as any other.
 */
export type BulkSink = (message: AnyMessage, bulkLength: number) => BulkPlace | undefined;

/**
 * Memory a bulk frame's bytes are read into, while `valid()` (a store object being written can be
 * aborted meanwhile, its memory then no longer its own: the rest of the bytes are dropped).
 */
export interface BulkPlace {
  into: Uint8Array;
  valid(): boolean;
}

/** Batches smaller than this are joined as usual: a direct read pays only for large chunks. */
const DIRECT_BYTES = 256 * 1024;
/** The batch header, a frame's length, its tag and its head's length. */
const BULK_PREFIX_BYTES = HEADER_BYTES + 4 + 1 + 4;

/** Connections by the id their ring is watched under: the loop names the rings that have bytes. */
const watched = new Map<number, FrameConnection<AnyMessage, AnyMessage>>();
let nextRingId = 1;
let readableCallbackSet = false;

function watchRing(connection: FrameConnection<AnyMessage, AnyMessage>, ring: NativeConnectionRing): number {
  if (!readableCallbackSet) {
    native.busyPoll.onRingsReadable((ids) => {
      for (const id of ids) watched.get(id)?.ringReadable();
    });
    readableCallbackSet = true;
  }
  const id = nextRingId++;
  watched.set(id, connection);
  native.busyPoll.watchRing(ring, id);
  return id;
}

export class FrameConnection<Incoming extends AnyMessage, Outgoing extends AnyMessage> {
  readonly #socket: Socket;
  readonly #onMessage: (message: Incoming) => void;
  readonly #writer = new FrameWriter();
  #flushScheduled = false;
  #closed = false;
  readonly #flushNow = () => this.#flush();
  readonly #traffic: TrafficObserver | undefined;
  #ring: NativeConnectionRing | undefined;
  #ringId = 0;
  #sendSequence = 0;
  #expected = 0;
  /** Socket bytes not yet a whole batch. */
  #pending: Buffer[] = [];
  #pendingBytes = 0;
  /** Whole batches waiting for an earlier one from the other path. */
  #fromSocket: Batch[] = [];
  #fromRing: Batch[] = [];
  #delivering = false;
  /** Set by the owner where bulk frames may be read straight into place. */
  bulkSink: BulkSink | undefined;
  /** The bulk frame being read into place, and how much of it has come. */
  #direct: { sequence: number; message: AnyMessage & { bulk?: Uint8Array }; place: BulkPlace; filled: number } | undefined;
  /** The batch at the head of #pending was looked at for a direct read (and is not one). */
  #directChecked = false;

  /** `traffic` hears of each write and each arrival (busy-polling: see busy-poll.ts). */
  constructor(socket: Socket, onMessage: (message: Incoming) => void, onClose: () => void, traffic?: TrafficObserver) {
    this.#socket = socket;
    this.#onMessage = onMessage;
    this.#traffic = traffic;
    socket.setNoDelay?.(true);
    socket.on('data', (chunk: Buffer) => this.#socketData(chunk));
    const close = () => {
      if (this.#closed) return;
      // What the peer put in the ring before it went is delivered, as socket bytes would be.
      this.#takeRing();
      this.#deliver();
      this.#closed = true;
      this.#releaseRing();
      onClose();
    };
    socket.on('close', close);
    socket.on('error', close);
  }

  get closed(): boolean {
    return this.#closed;
  }

  /**
   * From now on batches go through `ring` when it has room, and arrive through it. The connection
   * owns it from here (closes it with itself). The driver attaches a worker's ring when the
   * worker's hello names it; the worker attaches it once that hello left by socket.
   */
  attachRing(ring: NativeConnectionRing): void {
    if (this.#closed) {
      ring.close();
      return;
    }
    this.#ring = ring;
    this.#ringId = watchRing(this as unknown as FrameConnection<AnyMessage, AnyMessage>, ring);
    this.ringReadable();
  }

  send(message: Outgoing): void {
    if (this.#closed) return;
    if (this.#writer.length === 0) {
      this.#writer.reserve(HEADER_BYTES);
      this.#writer.length = HEADER_BYTES;
    }
    writeFrame(this.#writer, message);
    if (this.#flushScheduled) return;
    // Messages sent in the same tick leave in one batch.
    this.#flushScheduled = true;
    process.nextTick(this.#flushNow);
  }

  /**
   * Sends `message` with `bulk` bytes the reader gets as `message.bulk`, written to the socket
   * from where they lie (no copy into a batch): an object's chunk between nodes. The bytes must
   * stay as they are until the peer answers (the socket may still be writing them).
   */
  sendBulk(message: Outgoing, bulk: Uint8Array): void {
    if (this.#closed) return;
    // Whatever was sent before goes first, in its own batch.
    this.#flush();
    const head = bulkFrameHead(message, bulk.byteLength);
    const batch = Buffer.allocUnsafe(HEADER_BYTES);
    batch.writeUInt32LE(head.length + bulk.byteLength, 0);
    batch.writeUInt32LE(this.#sendSequence, 4);
    this.#sendSequence = nextSequence(this.#sendSequence);
    connectionStats.socket++;
    this.#socket.cork();
    this.#socket.write(Buffer.concat([batch, head]));
    this.#socket.write(bulk);
    this.#socket.uncork();
    this.#traffic?.sent();
  }

  /** Writes what was sent so far now, rather than at the end of this tick. */
  flush(): void {
    this.#flush();
  }

  /** Writes what was sent, then resolves once the socket has handed all of it to the kernel. */
  flushed(): Promise<void> {
    this.#flush();
    if (this.#closed || this.#socket.writableLength === 0) return Promise.resolve();
    return new Promise((resolve) => {
      this.#socket.once('drain', resolve);
      this.#socket.once('close', resolve);
    });
  }

  #flush(): void {
    this.#flushScheduled = false;
    const writer = this.#writer;
    if (writer.length === 0) return;
    if (this.#closed) {
      writer.length = 0;
      return;
    }
    writer.buffer.writeUInt32LE(writer.length - HEADER_BYTES, 0);
    writer.buffer.writeUInt32LE(this.#sendSequence, 4);
    this.#sendSequence = nextSequence(this.#sendSequence);
    const written = this.#ring ? this.#ring.write(writer.buffer.subarray(0, writer.length)) : 2;
    if (written === 0) connectionStats.ring++;
    else if (written === 1) connectionStats.rang++;
    if (written === 2) {
      connectionStats.socket++;
      this.#socket.write(writer.take());
    } else {
      writer.length = 0;
      if (written === 1) this.#socket.write(doorbell);
    }
    this.#traffic?.sent();
  }

  close(): void {
    this.#closed = true;
    this.#releaseRing();
    this.#socket.destroy();
  }

  /** The loop saw bytes in the ring (or a doorbell rang): take and deliver them. */
  ringReadable(): void {
    if (this.#closed || !this.#takeRing()) return;
    this.#traffic?.received();
    this.#deliver();
  }

  #releaseRing(): void {
    if (!this.#ring) return;
    watched.delete(this.#ringId);
    native.busyPoll.unwatchRing(this.#ringId);
    this.#ring.close();
    this.#ring = undefined;
  }

  /** Moves what the ring holds into #fromRing; false when it held nothing. */
  #takeRing(): boolean {
    const bytes = this.#ring?.take();
    if (!bytes) return false;
    // The writer puts whole batches in, so the bytes are whole batches.
    for (let offset = 0; offset < bytes.length; ) {
      const length = bytes.readUInt32LE(offset);
      const sequence = bytes.readUInt32LE(offset + 4);
      this.#fromRing.push({ sequence, payload: bytes.subarray(offset + HEADER_BYTES, offset + HEADER_BYTES + length) });
      offset += HEADER_BYTES + length;
    }
    return true;
  }

  #socketData(chunk: Buffer): void {
    this.#traffic?.received();
    if (this.#direct) chunk = this.#fillDirect(chunk);
    if (chunk.length > 0) {
      this.#pending.push(chunk);
      this.#pendingBytes += chunk.length;
    }
    let rang = false;
    while (this.#pendingBytes >= HEADER_BYTES) {
      let buffer = this.#pending[0];
      if (buffer.length < HEADER_BYTES) this.#pending = [(buffer = Buffer.concat(this.#pending, this.#pendingBytes))];
      const length = buffer.readUInt32LE(0);
      // Joined once the whole batch is here: joining at every chunk of a large batch (an object's
      // chunk between nodes, say) copied it over and over. A bulk frame with a place to go is
      // read straight there instead.
      if (this.#pendingBytes < HEADER_BYTES + length) {
        if (!this.#directChecked && this.bulkSink && length >= DIRECT_BYTES && this.#startDirect(length)) continue;
        break;
      }
      this.#directChecked = false;
      if (buffer.length < HEADER_BYTES + length) this.#pending = [(buffer = Buffer.concat(this.#pending, this.#pendingBytes))];
      const sequence = buffer.readUInt32LE(4);
      if (sequence === DOORBELL) {
        rang = true;
        connectionStats.doorbells++;
      }
      else this.#fromSocket.push({ sequence, payload: buffer.subarray(HEADER_BYTES, HEADER_BYTES + length) });
      const rest = buffer.subarray(HEADER_BYTES + length);
      this.#pending = rest.length > 0 ? [rest] : [];
      this.#pendingBytes = rest.length;
    }
    // A doorbell, or a batch sent by socket after ring batches it must not overtake.
    if (rang || this.#fromSocket.length > 0) this.#takeRing();
    this.#deliver();
  }

  /**
   * Looks at the head of a large batch not yet whole: if it is one bulk frame whose bytes have a
   * place (bulkSink), copies what came of them there and reads the rest there too. False when it
   * is not (or its head has not come yet: asked again with more bytes).
   */
  #startDirect(length: number): boolean {
    if (this.#pendingBytes < BULK_PREFIX_BYTES) return false;
    let buffer = this.#pending[0];
    if (buffer.length < BULK_PREFIX_BYTES) this.#pending = [(buffer = Buffer.concat(this.#pending, this.#pendingBytes))];
    // One bulk frame filling the batch, as sendBulk makes it.
    if (buffer.readUInt32LE(HEADER_BYTES) + 4 !== length || !isBulkFrame(buffer[HEADER_BYTES + 4])) {
      this.#directChecked = true;
      return false;
    }
    const bodyStart = BULK_PREFIX_BYTES + buffer.readUInt32LE(HEADER_BYTES + 5);
    if (this.#pendingBytes < bodyStart) return false;
    if (buffer.length < bodyStart) this.#pending = [(buffer = Buffer.concat(this.#pending, this.#pendingBytes))];
    this.#directChecked = true;
    const message = decodeBulkHead(buffer.subarray(BULK_PREFIX_BYTES, bodyStart)) as AnyMessage & { bulk?: Uint8Array };
    const place = this.bulkSink!(message, HEADER_BYTES + length - bodyStart);
    if (!place || place.into.byteLength !== HEADER_BYTES + length - bodyStart) return false;
    const sequence = buffer.readUInt32LE(4);
    const pending = this.#pending;
    this.#pending = [];
    this.#pendingBytes = 0;
    this.#directChecked = false;
    this.#direct = { sequence, message, place, filled: 0 };
    // The batch is not whole: every byte here after its head is the bulk's.
    let skip = bodyStart;
    for (const piece of pending) {
      if (skip >= piece.length) {
        skip -= piece.length;
        continue;
      }
      this.#fillDirect(skip > 0 ? piece.subarray(skip) : piece);
      skip = 0;
    }
    return true;
  }

  /** Copies socket bytes into the bulk being read into place; returns those past its end. */
  #fillDirect(chunk: Buffer): Buffer {
    const direct = this.#direct!;
    const into = direct.place.into;
    const take = Math.min(chunk.length, into.byteLength - direct.filled);
    const valid = direct.place.valid();
    if (valid) into.set(take === chunk.length ? chunk : chunk.subarray(0, take), direct.filled);
    direct.filled += take;
    if (direct.filled === into.byteLength) {
      this.#direct = undefined;
      // Bytes dropped on the way arrive as none: the reader fails, as its target is gone anyway.
      direct.message.bulk = valid ? into : undefined;
      // Delivered by #socketData, in sequence with the ring's batches.
      this.#fromSocket.push({ sequence: direct.sequence, message: direct.message });
    }
    return chunk.subarray(take);
  }

  /** Delivers whole batches in sequence, from whichever path has the next one. */
  #deliver(): void {
    if (this.#delivering) return;
    this.#delivering = true;
    try {
      for (;;) {
        let batch: Batch | undefined;
        if (this.#fromRing.length > 0 && this.#fromRing[0].sequence === this.#expected) batch = this.#fromRing.shift();
        else if (this.#fromSocket.length > 0 && this.#fromSocket[0].sequence === this.#expected) batch = this.#fromSocket.shift();
        if (!batch) return;
        this.#expected = nextSequence(this.#expected);
        if (batch.message) {
          this.#onMessage(batch.message as Incoming);
          continue;
        }
        const payload = batch.payload!;
        for (let offset = 0; offset < payload.length; ) {
          const length = payload.readUInt32LE(offset);
          const message = decodeFrame(payload.subarray(offset + 4, offset + 4 + length)) as Incoming;
          offset += 4 + length;
          this.#onMessage(message);
        }
      }
    } finally {
      this.#delivering = false;
    }
  }
}
