/**
 * Messages between the driver and its workers, and their frames: a length, then the body
 * (connection.ts carries them, in batches). Most messages are msgpack maps; the
 * two that every task and actor call sends (the task and its inline result) have a compact binary
 * form, since generic encoding of their keyed fields was a measurable share of a call's latency.
 */
import type { MetricUpdate } from './user-metrics.js';
import type { AgentMessage, HeadMessage } from './agent-protocol.js';
import type { BrokerInbound, BrokerOutbound } from './broker-protocol.js';
import type { RemoteErrorInfo } from '../errors.js';
import { Packr } from 'msgpackr';

// Envelopes hold only plain fields and byte arrays (user values are packed separately, with the
// richer codec): a plain codec keeps the per-message cost low.
const envelopes = new Packr({ useRecords: false });

/**
 * dtype, shape and device of each tensor a held result holds; `array` when it was a Tensor[];
 * `skeleton` when the tensors sat inside another value: that value, packed, with TensorSlots in
 * their places.
 */
export interface HeldMeta {
  tensors: Array<[dtype: string, shape: number[], device: string]>;
  array: boolean;
  skeleton?: Uint8Array;
  /** CUDA IPC handles of the tensors, exported when the result was made. */
  ipc?: unknown[];
}

/**
 * A value as a message carries it: inline msgpack bytes, "in the store of node N under id", or,
 * for tensors still held by the actor that made them, "receive them from rank R of group G",
 * "map them from these CUDA IPC handles", or, for that actor itself, "you hold object X".
 */
export type WireValue =
  | { inline: Uint8Array }
  | { node: string; id: string }
  | { recv: { group: string; source: number; meta: HeldMeta } }
  | { ipc: { handles: unknown[]; meta: HeldMeta } }
  | { local: string };

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
  /**
   * Set where the driver keeps the call's lineage: the stored puts it makes are named from its
   * return id and this attempt number (taskPutBase), so a rerun makes them again under the same ids.
   */
  putTag?: number;
  /** A call to a generator: its items go out one by one (YieldMessage), its result is their count. */
  stream?: StreamSpec;
  /**
   * A call with several returns (ReturnsOptions): its result must be an array of this many, each
   * stored under its own id (returnIdAt), the first as a single result would be.
   */
  numReturns?: number;
  /** For actor calls: the concurrency group it runs in (none: the default group). */
  concurrencyGroup?: string;
}

/**
 * How a streaming call runs on this attempt: `skip` items its caller already has (a retry runs the
 * generator again from the start and sends only what follows), `taken` of them the caller took,
 * and `backpressure`, the most items it may be ahead of the caller (none: unbounded).
 */
export interface StreamSpec {
  skip: number;
  taken: number;
  backpressure?: number;
}

/** The caller of a streaming call took items up to `taken`: a producer paused on backpressure goes on. */
export interface StreamTakenMessage {
  t: 'stream-taken';
  taskId: string;
  taken: number;
}

/**
 * A call was cancelled (cancel() without force): one still queued in the worker is dropped (its
 * 'done' says so), one running has its signal aborted (RuntimeContext.signal).
 */
export interface CancelMessage {
  t: 'cancel';
  taskId: string;
}

/** The caller of a streaming call wants no more: the generator is closed at its next `yield`. */
export interface StreamStopMessage {
  t: 'stream-stop';
  taskId: string;
}

export interface CreateActorMessage {
  t: 'actor';
  actorId: string;
  name: string;
  cls: FunctionDescriptor;
  args: Uint8Array;
  resolved: Record<string, WireValue>;
  maxConcurrency: number;
  /** Named groups of calls and how many of each may run at once (ActorOptions.concurrencyGroups). */
  concurrencyGroups?: Record<string, number>;
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

/** Close idle CUDA IPC mappings of these handles (a producer reclaims its exported blocks). */
export interface CloseIpcMessage {
  t: 'close-ipc';
  requestId: number;
  handles: Uint8Array[];
}

/**
 * A process that may have exported GPU memory over CUDA IPC is gone: close the mappings of its
 * memory (idle ones now, those in use with their last view). Nothing can read it any more.
 */
export interface ExporterGoneMessage {
  t: 'exporter-gone';
  processId: number;
}

export type DriverMessage = TaskMessage | CreateActorMessage | ReplyMessage | ExitMessage | CloseIpcMessage | ExporterGoneMessage | StreamTakenMessage | StreamStopMessage | CancelMessage;

export interface HelloMessage {
  t: 'hello';
  workerId: string;
  pid: number;
  /** The cluster's token, from a worker that connects over TCP (a node agent's). */
  token?: string;
}

export interface DoneMessage {
  t: 'done';
  taskId: string;
  /** Result: inline bytes, or stored by the worker under the task's return id. */
  value?: WireValue;
  nested?: string[];
  error?: RemoteErrorInfo;
  /** The error is this argument's loss: its held tensors could not be mapped (their holder died). */
  lostArgument?: string;
  /** The result's tensors stayed with the actor (tensor transport). */
  held?: { transport: string; meta: HeldMeta };
  /** A stored result's bytes (data locality weighs them). */
  size?: number;
  /** A call with several returns: returns 1 onwards (`value` is return 0). */
  more?: ReturnValue[];
  /** Microseconds the call ran in the worker, from its start there (not its wait in the worker's queue) to its result. */
  ran?: number;
}

/** One of a call's several returns, inline or stored under its id. */
export interface ReturnValue {
  value: WireValue;
  nested?: string[];
  size?: number;
}

/**
 * Item `index` of a streaming call: inline, or stored under the next id of the worker's puts. Sent
 * once the item is stored, in order.
 */
export interface YieldMessage {
  t: 'yield';
  taskId: string;
  index: number;
  value: WireValue;
  nested?: string[];
  size?: number;
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

/** The answer to close-ipc: the handles whose mappings this process still uses. */
export interface ClosedIpcMessage {
  t: 'closed-ipc';
  requestId: number;
  inUse: Uint8Array[];
}

/** The worker is about to exit on an error nothing caught (a throw in a timer, a native panic). */
export interface FatalMessage {
  t: 'fatal';
  /** The error's name, message and where it was thrown (its stack's first frame). */
  error: string;
}

/** Application metrics recorded since the worker's last report (see user-metrics.ts). */
export interface MetricsMessage {
  t: 'metrics';
  updates: MetricUpdate[];
}

export type WorkerMessage = HelloMessage | DoneMessage | YieldMessage | ActorReadyMessage | RequestMessage | BorrowMessage | ClosedIpcMessage | FatalMessage | MetricsMessage;

/**
 * Compact frames start with a tag below 0x10; a msgpack envelope (always a map) starts at 0x80 or
 * above, so one byte tells them apart.
 */
const TAG_TASK = 1;
const TAG_DONE = 2;
const NO_RUN_TIME = 0xffffffff;
/** A msgpack head, then raw bytes the message gets as `bulk` (a view of the frame: no copy). */
const TAG_BULK = 3;

const TASK_FN = 1;
const TASK_ACTOR = 2;
const TASK_GPUS = 4;
const TASK_TRANSPORT = 8;
const TASK_RESOLVED = 16;
const TASK_PUT_TAG = 32;
const TASK_GROUP = 64;

const NO_RESOLVED: Record<string, WireValue> = Object.freeze({}) as Record<string, WireValue>;

function hasKeys(record: Record<string, unknown>): boolean {
  for (const _ in record) return true;
  return false;
}

/**
 * Appends frames to one growing buffer. Ids (object, task and actor ids, all ASCII) are written as
 * latin1 with a one-byte length; other strings as UTF-8 with a two-byte length.
 */
/** A growing buffer that frames are written into (connection.ts sends what it holds). */
export class FrameWriter {
  buffer = Buffer.allocUnsafe(64 * 1024);
  length = 0;

  reserve(bytes: number): void {
    if (this.length + bytes <= this.buffer.length) return;
    const grown = Buffer.allocUnsafe(Math.max(this.buffer.length * 2, this.length + bytes));
    this.buffer.copy(grown, 0, 0, this.length);
    this.buffer = grown;
  }

  /** Hands over what was written and starts afresh. */
  take(): Buffer {
    const { buffer, length } = this;
    this.length = 0;
    // Small batches are copied out (cheap, pooled); large ones give the buffer away rather than copy.
    if (length <= 16 * 1024) return Buffer.from(buffer.subarray(0, length));
    this.buffer = Buffer.allocUnsafe(64 * 1024);
    return buffer.subarray(0, length);
  }

  u8(value: number): void {
    this.buffer[this.length++] = value;
  }

  u16(value: number): void {
    this.buffer.writeUInt16LE(value, this.length);
    this.length += 2;
  }

  u32(value: number): void {
    this.buffer.writeUInt32LE(value, this.length);
    this.length += 4;
  }

  id(value: string): void {
    this.buffer[this.length] = value.length;
    this.length += 1 + this.buffer.write(value, this.length + 1, 'latin1');
  }

  str(value: string): void {
    this.reserve(2 + value.length * 3);
    const written = this.buffer.write(value, this.length + 2, 'utf8');
    this.buffer.writeUInt16LE(written, this.length);
    this.length += 2 + written;
  }

  bytes(value: Uint8Array): void {
    this.reserve(4 + value.byteLength);
    this.buffer.writeUInt32LE(value.byteLength, this.length);
    this.buffer.set(value, this.length + 4);
    this.length += 4 + value.byteLength;
  }
}

class FrameReader {
  buffer!: Buffer;
  offset = 0;

  u8(): number {
    return this.buffer[this.offset++];
  }

  u16(): number {
    const value = this.buffer.readUInt16LE(this.offset);
    this.offset += 2;
    return value;
  }

  u32(): number {
    const value = this.buffer.readUInt32LE(this.offset);
    this.offset += 4;
    return value;
  }

  id(): string {
    const end = this.offset + 1 + this.buffer[this.offset];
    const value = this.buffer.toString('latin1', this.offset + 1, end);
    this.offset = end;
    return value;
  }

  str(): string {
    const start = this.offset + 2;
    const end = start + this.buffer.readUInt16LE(this.offset);
    this.offset = end;
    return this.buffer.toString('utf8', start, end);
  }

  bytes(): Buffer {
    const start = this.offset + 4;
    const end = start + this.buffer.readUInt32LE(this.offset);
    this.offset = end;
    return this.buffer.subarray(start, end);
  }
}

/** Ids are short ASCII strings; anything else (or too long) goes the msgpack way. */
function isId(value: string): boolean {
  if (value.length > 255) return false;
  for (let i = 0; i < value.length; i++) if (value.charCodeAt(i) > 0x7f) return false;
  return true;
}

function writeTask(writer: FrameWriter, message: TaskMessage): boolean {
  // Streaming calls and several returns are rare next to plain calls: they take the generic form.
  if (message.stream || message.numReturns !== undefined) return false;
  if (!isId(message.taskId) || !isId(message.returnId) || (message.actorId !== undefined && !isId(message.actorId))) return false;
  // An empty list differs from none: a pooled task without GPUs must not see the previous task's.
  const gpus = message.gpuIds;
  if (gpus && (gpus.length > 255 || gpus.some((id) => !Number.isInteger(id) || id < 0 || id > 0xffff))) return false;
  const putTag = message.putTag;
  if (putTag !== undefined && (!Number.isInteger(putTag) || putTag < 0 || putTag > 0xffff)) return false;
  const resolved = hasKeys(message.resolved) ? envelopes.pack(message.resolved) : undefined;
  const flags =
    (message.fn ? TASK_FN : 0) |
    (message.actorId !== undefined ? TASK_ACTOR : 0) |
    (gpus ? TASK_GPUS : 0) |
    (message.tensorTransport !== undefined ? TASK_TRANSPORT : 0) |
    (resolved ? TASK_RESOLVED : 0) |
    (putTag !== undefined ? TASK_PUT_TAG : 0) |
    (message.concurrencyGroup !== undefined ? TASK_GROUP : 0);
  writer.reserve(10 + 2 * 256 + 256 + 2 + 2 * 255);
  writer.u8(TAG_TASK);
  writer.u8(flags);
  writer.id(message.taskId);
  writer.id(message.returnId);
  if (message.actorId !== undefined) writer.id(message.actorId);
  if (gpus) {
    writer.u8(gpus.length);
    for (const id of gpus) writer.u16(id);
  }
  if (putTag !== undefined) writer.u16(putTag);
  writer.str(message.name);
  if (message.fn) {
    writer.str(message.fn.module);
    writer.str(message.fn.name);
  }
  if (message.actorId !== undefined) writer.str(message.method ?? '');
  if (message.tensorTransport !== undefined) writer.str(message.tensorTransport);
  if (message.concurrencyGroup !== undefined) writer.str(message.concurrencyGroup);
  writer.bytes(message.args);
  if (resolved) writer.bytes(resolved);
  return true;
}

function readTask(reader: FrameReader): TaskMessage {
  const flags = reader.u8();
  const taskId = reader.id();
  const returnId = reader.id();
  const actorId = flags & TASK_ACTOR ? reader.id() : undefined;
  let gpuIds: number[] | undefined;
  if (flags & TASK_GPUS) {
    gpuIds = new Array(reader.u8());
    for (let i = 0; i < gpuIds.length; i++) gpuIds[i] = reader.u16();
  }
  const putTag = flags & TASK_PUT_TAG ? reader.u16() : undefined;
  const name = reader.str();
  const fn = flags & TASK_FN ? { module: reader.str(), name: reader.str() } : undefined;
  const method = flags & TASK_ACTOR ? reader.str() : undefined;
  const tensorTransport = flags & TASK_TRANSPORT ? reader.str() : undefined;
  const concurrencyGroup = flags & TASK_GROUP ? reader.str() : undefined;
  const args = reader.bytes();
  const resolved = flags & TASK_RESOLVED ? (envelopes.unpack(reader.bytes()) as Record<string, WireValue>) : NO_RESOLVED;
  const message: TaskMessage = { t: 'task', taskId, name, fn, actorId, method, args, resolved, returnId, gpuIds, tensorTransport, putTag };
  if (concurrencyGroup !== undefined) message.concurrencyGroup = concurrencyGroup;
  return message;
}

/** Only an inline result without tensors or an error takes the compact form. */
function writeDone(writer: FrameWriter, message: DoneMessage): boolean {
  const value = message.value;
  if (message.error || message.held || message.more || !value || !('inline' in value) || !isId(message.taskId)) return false;
  const nested = message.nested ?? [];
  if (nested.length > 0xffff || !nested.every(isId)) return false;
  // Run times of 71 minutes or more take the msgpack form; all ones means none was measured.
  const ran = message.ran ?? NO_RUN_TIME;
  if (!Number.isInteger(ran) || ran < 0 || ran > NO_RUN_TIME) return false;
  writer.reserve(2 + 256 + 4 + 2 + nested.length * 256);
  writer.u8(TAG_DONE);
  writer.id(message.taskId);
  writer.u32(ran);
  writer.u16(nested.length);
  for (const id of nested) writer.id(id);
  writer.bytes(value.inline);
  return true;
}

function readDone(reader: FrameReader): DoneMessage {
  const taskId = reader.id();
  const ran = reader.u32();
  const nested: string[] = new Array(reader.u16());
  for (let i = 0; i < nested.length; i++) nested[i] = reader.id();
  const message: DoneMessage = { t: 'done', taskId, value: { inline: reader.bytes() }, nested };
  if (ran !== NO_RUN_TIME) message.ran = ran;
  return message;
}

export type AnyMessage = DriverMessage | WorkerMessage | AgentMessage | HeadMessage | BrokerInbound | BrokerOutbound;

/** Writes one frame: a length, then the compact form where there is one, else msgpack. */
export function writeFrame(writer: FrameWriter, message: AnyMessage): void {
  writer.reserve(4);
  const start = writer.length;
  writer.length += 4;
  const compact =
    (message.t === 'task' && writeTask(writer, message)) || (message.t === 'done' && writeDone(writer, message));
  if (!compact) {
    writer.length = start + 4;
    const body = envelopes.pack(message);
    writer.reserve(body.byteLength);
    writer.buffer.set(body, writer.length);
    writer.length += body.byteLength;
  }
  writer.buffer.writeUInt32LE(writer.length - start - 4, start);
}

const reader = new FrameReader();

/** Decodes one frame body (a view that the decoded message may keep slices of). */
export function decodeFrame(body: Buffer): AnyMessage {
  switch (body[0]) {
    case TAG_TASK:
      reader.buffer = body;
      reader.offset = 1;
      return readTask(reader);
    case TAG_DONE:
      reader.buffer = body;
      reader.offset = 1;
      return readDone(reader);
    case TAG_BULK: {
      const headLength = body.readUInt32LE(1);
      const message = envelopes.unpack(body.subarray(5, 5 + headLength)) as AnyMessage & { bulk?: Uint8Array };
      message.bulk = body.subarray(5 + headLength);
      return message;
    }
    default:
      return envelopes.unpack(body) as AnyMessage;
  }
}

/**
 * The start of a frame carrying `bulkLength` raw bytes after `message` (see TAG_BULK): its length
 * prefix, tag and head. The bytes follow it on the wire as they are.
 */
export function bulkFrameHead(message: AnyMessage, bulkLength: number): Buffer {
  const head = envelopes.pack(message);
  const frame = Buffer.allocUnsafe(4 + 1 + 4 + head.byteLength);
  frame.writeUInt32LE(1 + 4 + head.byteLength + bulkLength, 0);
  frame[4] = TAG_BULK;
  frame.writeUInt32LE(head.byteLength, 5);
  frame.set(head, 9);
  return frame;
}

export function isBulkFrame(tag: number): boolean {
  return tag === TAG_BULK;
}

/** The message of a bulk frame, from its head alone (its raw bytes are read elsewhere). */
export function decodeBulkHead(head: Buffer): AnyMessage {
  return envelopes.unpack(head) as AnyMessage;
}

/** Encodes one message as a frame (length prefix included); for tests and tools. */
export function encodeFrame(message: AnyMessage): Buffer {
  const writer = new FrameWriter();
  writeFrame(writer, message);
  return writer.take();
}
