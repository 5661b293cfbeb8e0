/**
 * Values crossing processes. Small values travel inline as msgpack; large values, binary data and
 * Arrow tables go to the object store as raw bytes (read back zero-copy) or msgpack. ObjectRefs and
 * actor handles nested in values survive as refs and handles; their ids (an actor's for a handle)
 * are collected so that the container keeps them alive.
 */
import { Packr, addExtension } from 'msgpackr';
import { SerializationError } from '../errors.js';
import type { ObjectStore, ObjectView } from '../store/object-store.js';
import type { ObjectId } from '../store/object-id.js';
import { ObjectRef } from './object-ref.js';
import { Tensor, parseDevice } from '../gpu/tensor.js';
import { BYTES_PER_ELEMENT, DTYPES, viewAs, type DType } from '../gpu/dtype.js';
import { cuda } from '../gpu/cuda.js';

/** Values up to this many bytes travel inline in messages. */
export const INLINE_LIMIT = 100 * 1024;

export const enum StoredKind {
  Msgpack = 0,
  TypedArray = 1,
  Arrow = 2,
  ArrayBuffer = 3,
  Buffer = 4,
  Tensor = 5,
}

let tensorsBackOnDevice = false;

/**
 * Workers call this: a CUDA tensor that travelled as bytes goes back onto its GPU where the worker
 * has one. The driver keeps what it reads on the host (`get()` copies GPU results to host memory).
 */
export function restoreTensorsOnDevice(enabled: boolean): void {
  tensorsBackOnDevice = enabled;
}

/** Rebuilds a tensor's device: back on its GPU in a worker that has it, else on the CPU. */
function restoreDevice(tensor: Tensor, device: string): Tensor {
  if (device === 'cpu' || !tensorsBackOnDevice) return tensor;
  const parsed = parseDevice(device);
  return parsed.kind === 'cuda' && cuda.available && parsed.index < cuda.deviceCount() ? tensor.to(device as `cuda:${number}`) : tensor;
}

function tensorHeader(tensor: Tensor): unknown[] {
  return [tensor.dtype, [...tensor.shape], tensor.device];
}

const typedArrayConstructors = [
  Int8Array, Uint8Array, Uint8ClampedArray, Int16Array, Uint16Array, Int32Array, Uint32Array,
  Float32Array, Float64Array, BigInt64Array, BigUint64Array,
] as const;

/** Set by the actor module: how to rebuild an actor handle from its id on the receiving side. */
export interface HandleCodec {
  isHandle(value: unknown): boolean;
  write(value: unknown): unknown;
  read(data: unknown): unknown;
}

let nestedCollector: string[] | undefined;
let handleCodec: HandleCodec | undefined;

export function setHandleCodec(codec: HandleCodec): void {
  handleCodec = codec;
}

/** msgpack extension types, one per class that travels as itself: each must be unique. */
const EXTENSION = {
  objectRef: 0x54,
  map: 0x55,
  actorHandle: 0x56,
  tensor: 0x57,
  argumentSlot: 0x58,
  tensorSlot: 0x59,
  portable: 0x5a,
} as const;

class ActorHandleMarker {}

/**
 * A top-level ref argument of a call, as it travels: the worker puts the argument's value in its
 * place. Not an ObjectRef, which the worker would count as a borrow only to drop it at once.
 */
export class ArgumentSlot {
  constructor(readonly id: string) {}
}

/** A marker class of one field travels as that field, and is made again from it when read. */
function addMarkerExtension<Marker, Field>(Class: new (field: Field) => Marker, type: number, field: (marker: Marker) => Field): void {
  addExtension({ Class, type, write: field, read: (value: Field) => new Class(value) });
}

addMarkerExtension(ArgumentSlot, EXTENSION.argumentSlot, (slot) => slot.id);

/** A class of the library whose instances travel as data and are made again on arrival (a Queue). */
interface PortableClass {
  tag: string;
  toData(value: unknown): unknown;
  fromData(data: unknown): unknown;
}

const portableClasses = new Map<unknown, PortableClass>();
const portableByTag = new Map<string, PortableClass>();

/**
 * Lets instances of `Class` be sent: each travels as `toData(instance)` (anything sendable, actor
 * handles and refs included) and is made again by `fromData` in the receiving process, which must
 * have loaded the module that registered it.
 */
export function registerPortableClass<T>(Class: abstract new (...args: never[]) => T, tag: string, toData: (value: T) => unknown, fromData: (data: never) => T): void {
  const portable = { tag, toData, fromData } as PortableClass;
  portableClasses.set(Class, portable);
  portableByTag.set(tag, portable);
}

class PortableMarker {
  constructor(
    readonly tag: string,
    readonly data: unknown,
  ) {}
}

addExtension({
  Class: PortableMarker,
  type: EXTENSION.portable,
  write(marker: PortableMarker) {
    return [marker.tag, marker.data];
  },
  read([tag, data]: [string, unknown]) {
    const portable = portableByTag.get(tag);
    if (!portable) throw new SerializationError(`a ${tag} arrived, but this process has not loaded the module that defines it`);
    return portable.fromData(data);
  },
});

addExtension({
  Class: ObjectRef,
  type: EXTENSION.objectRef,
  write(ref: ObjectRef) {
    nestedCollector?.push(ref.id);
    return ref.id;
  },
  read(id: string) {
    return new ObjectRef(id);
  },
});

/**
 * msgpackr writes a plain Map as a msgpack map before it looks at extensions, and reads msgpack
 * maps back as objects (keys stringified): prepare() hands it this subclass instead, so that the
 * extension below keeps Maps (and their non-string keys) intact.
 */
class PackedMap extends Map<unknown, unknown> {}

addExtension({
  Class: PackedMap,
  type: EXTENSION.map,
  write(map: Map<unknown, unknown>) {
    return [...map.entries()];
  },
  read(entries: Array<[unknown, unknown]>) {
    return new Map(entries);
  },
});

addExtension({
  Class: ActorHandleMarker,
  type: EXTENSION.actorHandle,
  write(value: unknown) {
    const data = handleCodec!.write(value) as [actorId: string, ...rest: unknown[]];
    // A value holding a handle holds the actor, as one holding a ref holds its object.
    nestedCollector?.push(data[0]);
    return data;
  },
  read(data: unknown) {
    if (!handleCodec) throw new SerializationError('an actor handle arrived before the runtime started');
    return handleCodec.read(data);
  },
});

addExtension({
  Class: Tensor,
  type: EXTENSION.tensor,
  write(tensor: Tensor) {
    const host = tensor.device === 'cpu' ? tensor : tensor.cpu();
    return [...tensorHeader(tensor), host.bytes().slice()];
  },
  read([dtype, shape, device, bytes]: [DType, number[], string, Uint8Array]) {
    const copy = new Uint8Array(bytes);
    const tensor = Tensor.wrap(viewAs(dtype, copy.buffer, 0, copy.byteLength / BYTES_PER_ELEMENT[dtype]), dtype, shape);
    return restoreDevice(tensor, device);
  },
});

/**
 * A tensor's place in a held result's skeleton: the value with its tensors taken out, which travels
 * inline while the tensors stay with the actor that made them (lib/gpu/transport.ts).
 */
export class TensorSlot {
  constructor(readonly index: number) {}
}

addMarkerExtension(TensorSlot, EXTENSION.tensorSlot, (slot) => slot.index);

const packr = new Packr({ useRecords: false, moreTypes: true, structuredClone: true });
// Scalars encode the same without the rich codec's structured-clone bookkeeping (a Map per pack).
const scalars = new Packr({ useRecords: false });

/** Packs `value`, collecting the ids of refs nested in it. */
export function pack(value: unknown, nested?: string[]): Uint8Array {
  const kind = typeof value;
  if (kind === 'number' || kind === 'boolean' || kind === 'string' || value == null) return scalars.pack(value);
  const previous = nestedCollector;
  nestedCollector = nested;
  try {
    return packr.pack(prepare(value));
  } catch (error) {
    if (error instanceof SerializationError) throw error;
    throw new SerializationError(`value cannot be sent to another process: ${(error as Error).message}`, { cause: error });
  } finally {
    nestedCollector = previous;
    // The structured-clone codec keeps the last value it packed (its reference map) until its
    // next pack: a handle in it would never be collected once scalars stopped going through it.
    packr.pack(null);
  }
}

export function unpack(bytes: Uint8Array): unknown {
  // One-byte values (small integers, null, booleans, an empty list: most results and argument
  // lists of calls) are read here rather than through the codec's setup.
  if (bytes.length === 1) {
    const byte = bytes[0];
    if (byte <= 0x7f) return byte;
    if (byte >= 0xe0) return byte - 0x100;
    switch (byte) {
      case 0xc0:
        return null;
      case 0xc2:
        return false;
      case 0xc3:
        return true;
      case 0x90:
        return [];
    }
  }
  return packr.unpack(bytes);
}

/** Rejects what msgpack would silently mangle, and marks actor handles for their extension. */
function prepare(value: unknown, depth = 0): unknown {
  if (depth > 64) throw new SerializationError('value is nested more than 64 levels deep (or is cyclic)');
  switch (typeof value) {
    case 'function':
      throw new SerializationError(
        `a function cannot be sent to another process (${value.name || 'anonymous'}); register it with remote() and pass its result instead`,
      );
    case 'symbol':
      throw new SerializationError('a symbol cannot be sent to another process');
    case 'object': {
      if (value === null || value instanceof ObjectRef || value instanceof ArgumentSlot || value instanceof TensorSlot || ArrayBuffer.isView(value) || value instanceof ArrayBuffer || value instanceof Tensor) return value;
      if (handleCodec?.isHandle(value)) return Object.setPrototypeOf({ handle: value }, ActorHandleMarker.prototype);
      if (value instanceof Date || value instanceof RegExp || value instanceof Error) return value;
      if (value instanceof Promise) throw new SerializationError('a Promise cannot be sent to another process; await it first');
      if (value instanceof WeakMap || value instanceof WeakSet) throw new SerializationError('a WeakMap or WeakSet cannot be sent');
      if (Array.isArray(value)) {
        let copy: unknown[] | undefined;
        for (let i = 0; i < value.length; i++) {
          const prepared = prepare(value[i], depth + 1);
          if (prepared !== value[i]) (copy ??= [...value])[i] = prepared;
        }
        return copy ?? value;
      }
      if (value instanceof Map) {
        return new PackedMap([...value].map(([k, v]) => [prepare(k, depth + 1), prepare(v, depth + 1)]));
      }
      if (value instanceof Set) return new Set([...value].map((v) => prepare(v, depth + 1)));
      const prototype = Object.getPrototypeOf(value);
      const portable = prototype === Object.prototype ? undefined : portableClasses.get(prototype?.constructor);
      if (portable) return new PortableMarker(portable.tag, prepare(portable.toData(value), depth + 1));
      if (prototype !== Object.prototype && prototype !== null) {
        throw new SerializationError(
          `an instance of ${prototype?.constructor?.name ?? 'a class'} cannot be sent to another process: send plain objects, arrays, typed arrays, Maps, Sets or Arrow tables`,
        );
      }
      let copy: Record<string, unknown> | undefined;
      for (const key of Object.keys(value)) {
        const original = (value as Record<string, unknown>)[key];
        const prepared = prepare(original, depth + 1);
        if (prepared !== original) (copy ??= { ...(value as Record<string, unknown>) })[key] = prepared;
      }
      return copy ?? value;
    }
    default:
      return value;
  }
}

/**
 * Bytes bound for the store, or a writer that fills the object's memory in place: a CUDA tensor
 * goes from the device straight into the store (page-locked there, so by DMA), not through a
 * host copy first.
 */
export type StoredPayload = Uint8Array | { byteLength: number; writeTo(target: Uint8Array): void };

/** A value ready for the object store: metadata names how to read the payload back. */
export interface StoredValue {
  metadata: Uint8Array;
  payload: StoredPayload;
  nested: string[];
}

/** Puts a stored value under `id`; a writer payload fills the object before it is sealed. */
export function putStored(store: ObjectStore, id: ObjectId, stored: StoredValue): void {
  const { payload, metadata } = stored;
  if (payload instanceof Uint8Array) {
    store.put(id, payload, { metadata });
    return;
  }
  const builder = store.create(id, payload.byteLength, { metadata });
  try {
    payload.writeTo(builder.data);
  } catch (error) {
    builder.abort();
    throw error;
  }
  builder.seal();
}

/**
 * As putStored, but an object already sealed (or spilled) under `id` is left as it is: ids that a
 * rerun of a task repeats name the same value, and a copy of it may have reached this store.
 */
export function putStoredOnce(store: ObjectStore, id: ObjectId, stored: StoredValue): void {
  const state = store.state(id);
  if (state === 'sealed' || state === 'spilled') return;
  putStored(store, id, stored);
}

/**
 * How Arrow tables travel: registered by the data layer (lib/data/table-codec.ts) when it loads, so
 * that the runtime's core does not import apache-arrow itself: a worker that runs no data (an LLM
 * rank, see isLightActorModule) never loads it. A process that holds a table has imported
 * trellis's index, and with it the data layer.
 */
export interface TableCodec {
  isTable(value: unknown): boolean;
  encode(table: unknown): Uint8Array;
  decode(bytes: Uint8Array): object;
}

let tableCodec: TableCodec | undefined;

export function registerTableCodec(codec: TableCodec): void {
  tableCodec = codec;
}

/** A value encoded for transport: inline msgpack, or bytes bound for the store. */
export type EncodedValue = { inline: Uint8Array; nested: string[] } | { stored: StoredValue; nested: string[] };

export function encodeValue(value: unknown): EncodedValue {
  if (value instanceof Tensor && value.byteLength > INLINE_LIMIT) {
    // Raw bytes in the store, read back zero-copy; metadata: kind, then JSON of dtype, shape, device.
    const header = new TextEncoder().encode(JSON.stringify(tensorHeader(value)));
    const metadata = new Uint8Array(1 + header.byteLength);
    metadata[0] = StoredKind.Tensor;
    metadata.set(header, 1);
    const payload: StoredPayload = value.device === 'cpu' ? value.bytes() : { byteLength: value.byteLength, writeTo: (target) => value.memory.copyToHost(target) };
    return { stored: { metadata, payload, nested: [] }, nested: [] };
  }
  if (tableCodec?.isTable(value)) {
    const payload = tableCodec.encode(value);
    return { stored: { metadata: Uint8Array.of(StoredKind.Arrow), payload, nested: [] }, nested: [] };
  }
  if (ArrayBuffer.isView(value) && value.byteLength > INLINE_LIMIT) {
    const payload = new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
    if (Buffer.isBuffer(value)) return { stored: { metadata: Uint8Array.of(StoredKind.Buffer), payload, nested: [] }, nested: [] };
    const index = typedArrayConstructors.findIndex((constructor) => value instanceof constructor);
    if (index >= 0) {
      return { stored: { metadata: Uint8Array.of(StoredKind.TypedArray, index), payload, nested: [] }, nested: [] };
    }
  }
  if (value instanceof ArrayBuffer && value.byteLength > INLINE_LIMIT) {
    return { stored: { metadata: Uint8Array.of(StoredKind.ArrayBuffer), payload: new Uint8Array(value), nested: [] }, nested: [] };
  }
  const nested: string[] = [];
  const bytes = pack(value, nested);
  // Binary data is measured by its own bytes, not msgpack's few header bytes: else an array just
  // under the limit would go to the store as msgpack, copied on every read.
  const binary = (ArrayBuffer.isView(value) || value instanceof ArrayBuffer) && value.byteLength <= INLINE_LIMIT;
  if (bytes.byteLength > INLINE_LIMIT && !binary) {
    return { stored: { metadata: Uint8Array.of(StoredKind.Msgpack), payload: bytes, nested }, nested };
  }
  return { inline: bytes, nested };
}

/** msgpack of an empty argument list (shared: frames copy it, nothing writes to it). */
const NO_ARGUMENTS = pack([]);

function isSmallScalar(value: unknown): boolean {
  switch (typeof value) {
    case 'number':
    case 'boolean':
    case 'undefined':
      return true;
    case 'string':
      // Three UTF-8 bytes per UTF-16 unit at most.
      return value.length * 3 <= INLINE_LIMIT;
    default:
      return value === null;
  }
}

/**
 * Encodes a call's arguments. Top-level refs are listed in `argRefs` and travel as slots (their
 * values are resolved before the call runs); an argument too large to travel inline is stored
 * through `store` and takes a slot too; refs nested deeper are listed in `held` (the call keeps
 * them alive).
 */
export function encodeArguments(
  args: unknown[],
  store: (encoded: EncodedValue & { stored: StoredValue }) => ObjectRef<unknown>,
): { bytes: Uint8Array; argRefs: string[]; held: string[] } {
  if (args.length === 0) return { bytes: NO_ARGUMENTS, argRefs: [], held: [] };
  const argRefs: string[] = [];
  const prepared = args.map((arg) => {
    // Small scalars always travel inline: no need to encode them once to measure them.
    if (isSmallScalar(arg)) return arg;
    if (arg instanceof ObjectRef) {
      argRefs.push(arg.id);
      return new ArgumentSlot(arg.id);
    }
    const encoded = encodeValue(arg);
    if ('inline' in encoded) return arg;
    const ref = store(encoded);
    argRefs.push(ref.id);
    // The call takes its own hold on this object right after, synchronously (in the driver, or
    // when its message arrives there): this handle must go then, not when garbage collection
    // finds it.
    queueMicrotask(() => ref[Symbol.dispose]());
    return new ArgumentSlot(ref.id);
  });
  const held: string[] = [];
  return { bytes: pack(prepared, held), argRefs, held };
}

/**
 * Reads a stored value. Raw kinds are zero-copy: the pin moves to the array or table made (a view
 * with a buffer of its own keeps it on that buffer, so columns and subarrays keep it too).
 */
export function decodeStored(view: ObjectView): unknown {
  const kind = view.metadata?.[0] ?? StoredKind.Msgpack;
  const data = view.data;
  switch (kind) {
    case StoredKind.TypedArray: {
      const constructor = typedArrayConstructors[view.metadata![1]];
      const array = new constructor(data.buffer as ArrayBuffer, data.byteOffset, data.byteLength / constructor.BYTES_PER_ELEMENT);
      view.transferPinTo(array);
      return array;
    }
    case StoredKind.Buffer: {
      const buffer = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
      view.transferPinTo(buffer);
      return buffer;
    }
    case StoredKind.ArrayBuffer: {
      // An ArrayBuffer cannot be a window on shared memory: copy.
      const copy = data.slice().buffer;
      view.release();
      return copy;
    }
    case StoredKind.Tensor: {
      const [dtype, shape, device] = JSON.parse(new TextDecoder().decode(view.metadata!.subarray(1))) as [DType, number[], string];
      if (!DTYPES.includes(dtype)) throw new SerializationError(`stored tensor has unknown dtype '${dtype}'`);
      const tensor = Tensor.wrap(viewAs(dtype, data.buffer, data.byteOffset, data.byteLength / BYTES_PER_ELEMENT[dtype]), dtype, shape);
      if (device === 'cpu') {
        view.transferPinTo(tensor);
        return tensor;
      }
      const restored = restoreDevice(tensor, device);
      if (restored === tensor) view.transferPinTo(tensor);
      else view.release();
      return restored;
    }
    case StoredKind.Arrow: {
      if (!tableCodec) {
        view.release();
        throw new SerializationError('an Arrow table arrived in a process that has not loaded the data layer (import trellis first)');
      }
      const table = tableCodec.decode(data);
      view.transferPinTo(table);
      return table;
    }
    default: {
      const value = unpack(data);
      view.release();
      return value;
    }
  }
}
