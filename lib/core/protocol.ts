/**
 * Messages between the driver and its workers: length-prefixed msgpack frames over one Unix
 * domain socket per worker. Writes made in one tick leave in one syscall.
 */
import type { Socket } from 'node:net';
import type { RemoteErrorInfo } from '../errors.js';
import { Packr } from 'msgpackr';

// Envelopes hold only plain fields and byte arrays (user values are packed separately, with the
// richer codec): a plain codec keeps the per-message cost low.
const envelopes = new Packr({ useRecords: false });

/** dtype, shape and device of each tensor a held result holds; `array` when it was a Tensor[]. */
export interface HeldMeta {
  tensors: Array<[dtype: string, shape: number[], device: string]>;
  array: boolean;
}

/**
 * A value as a message carries it: inline msgpack bytes, "in the store of node N under id", or,
 * for tensors still held by the actor that made them, "receive them from rank R of group G" or
 * "map them from these CUDA IPC handles".
 */
export type WireValue =
  | { inline: Uint8Array }
  | { node: string; id: string }
  | { recv: { group: string; source: number; meta: HeldMeta } }
  | { ipc: { handles: unknown[]; meta: HeldMeta } };

export interface FunctionDescriptor {
  module: string;
  name: string;
}

export interface TaskMessage {
  t: 'task';
  taskId: string;
  name: string;
  fn?: FunctionDescriptor;
  actorId?: string;
  method?: string;
  /** msgpack of the argument array; top-level ObjectRefs are resolved from `resolved`. */
  args: Uint8Array;
  resolved: Record<string, WireValue>;
  returnId: string;
  gpuIds?: number[];
  /** For actor calls: keep tensors in the result here, to hand over by NCCL/IPC or on request. */
  tensorTransport?: string;
}

export interface CreateActorMessage {
  t: 'actor';
  actorId: string;
  name: string;
  cls: FunctionDescriptor;
  args: Uint8Array;
  resolved: Record<string, WireValue>;
  maxConcurrency: number;
  gpuIds?: number[];
}

export interface ReplyMessage {
  t: 'reply';
  requestId: number;
  ok: boolean;
  value?: unknown;
  error?: RemoteErrorInfo & { kind?: string };
}

export interface ExitMessage {
  t: 'exit';
}

export type DriverMessage = TaskMessage | CreateActorMessage | ReplyMessage | ExitMessage;

export interface HelloMessage {
  t: 'hello';
  workerId: string;
  pid: number;
}

export interface DoneMessage {
  t: 'done';
  taskId: string;
  /** Result: inline bytes, or stored by the worker under the task's return id. */
  value?: WireValue;
  nested?: string[];
  error?: RemoteErrorInfo;
  /** The result's tensors stayed with the actor (tensor transport). */
  held?: { transport: string; meta: HeldMeta };
}

export interface ActorReadyMessage {
  t: 'actor-ready';
  actorId: string;
  error?: RemoteErrorInfo;
}

export interface RequestMessage {
  t: 'request';
  requestId: number;
  op: string;
  body: unknown;
}

/** A worker's handles on refs it received: +1 when it first holds one, -1 when all are collected. */
export interface BorrowMessage {
  t: 'borrow';
  add: string[];
  drop: string[];
}

export type WorkerMessage = HelloMessage | DoneMessage | ActorReadyMessage | RequestMessage | BorrowMessage;

export class FrameConnection<Incoming, Outgoing> {
  readonly #socket: Socket;
  #pending: Buffer[] = [];
  #pendingBytes = 0;
  #outgoing: Buffer[] = [];
  #flushScheduled = false;
  #closed = false;

  constructor(socket: Socket, onMessage: (message: Incoming) => void, onClose: () => void) {
    this.#socket = socket;
    socket.setNoDelay?.(true);
    socket.on('data', (chunk: Buffer) => {
      this.#pending.push(chunk);
      this.#pendingBytes += chunk.length;
      this.#drain(onMessage);
    });
    const close = () => {
      if (this.#closed) return;
      this.#closed = true;
      onClose();
    };
    socket.on('close', close);
    socket.on('error', close);
  }

  get closed(): boolean {
    return this.#closed;
  }

  send(message: Outgoing): void {
    if (this.#closed) return;
    const body = envelopes.pack(message);
    const frame = Buffer.allocUnsafe(4 + body.byteLength);
    frame.writeUInt32LE(body.byteLength, 0);
    frame.set(body, 4);
    this.#outgoing.push(frame);
    if (this.#flushScheduled) return;
    // Messages sent in the same tick leave in one write.
    this.#flushScheduled = true;
    process.nextTick(() => this.#flush());
  }

  #flush(): void {
    this.#flushScheduled = false;
    const frames = this.#outgoing;
    this.#outgoing = [];
    if (this.#closed || frames.length === 0) return;
    this.#socket.write(frames.length === 1 ? frames[0] : Buffer.concat(frames));
  }

  close(): void {
    this.#closed = true;
    this.#socket.destroy();
  }

  #drain(onMessage: (message: Incoming) => void): void {
    while (this.#pendingBytes >= 4) {
      if (this.#pending.length > 1) this.#pending = [Buffer.concat(this.#pending)];
      const buffer = this.#pending[0];
      const length = buffer.readUInt32LE(0);
      if (buffer.length < 4 + length) return;
      const message = envelopes.unpack(buffer.subarray(4, 4 + length)) as Incoming;
      const rest = buffer.subarray(4 + length);
      this.#pending = rest.length > 0 ? [rest] : [];
      this.#pendingBytes = rest.length;
      onMessage(message);
    }
  }
}
