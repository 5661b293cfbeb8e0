/**
 * Tensor transport, the actor side: results of methods declared with a tensorTransport other than
 * 'store' stay with the actor that made them (in GPU memory for CUDA tensors), and move only when a
 * reader needs them — sent over a collective group's communicator, mapped by CUDA IPC, or
 * materialized into the object store for the driver or readers outside the group.
 */
import { TrellisError } from '../errors.js';
import { registerSystemMethod } from '../core/system-methods.js';
import type { HeldMeta } from '../core/protocol.js';
import { INLINE_LIMIT, pack, unpack } from '../core/serialization.js';
import { putTensors, takeTensors } from './tensor-tree.js';
import { getCommunicator } from './collective.js';
import { exportPackedIpc, importPackedIpc, whenReleased } from './cuda.js';
import type { DType } from './dtype.js';
import { freeAsResult, Tensor } from './tensor.js';

interface HeldEntry {
  value: unknown;
  tensors: Tensor[];
  meta: HeldMeta;
}

const held = new Map<string, HeldEntry>();
/**
 * Held results since brought into the store, kept until the object goes: IPC readers may still
 * map their tensors, and calls sent before the move (a send to a group member, the holder's own
 * read), which the move overtook as it runs on arrival, still take them from here.
 */
const retired = new Map<string, HeldEntry>();

/** What a held result tells the driver and its readers, and the refs nested in its skeleton. */
export interface HeldResult {
  meta: HeldMeta;
  nested: string[];
}

/**
 * Keeps `value` here if it holds Tensors: a Tensor, an array of them, or Tensors anywhere in plain
 * objects, arrays, Maps and Sets (`{ logits, kvCache }`, say); returns what readers need to know, with
 * the CUDA IPC handles already exported where readers may map them (it costs a few microseconds
 * here and saves readers a round trip to this actor). Undefined: no tensors, or a value whose
 * other parts are too large to travel inline (it goes through the store whole).
 *
 * Small CUDA results are held too. Sending them by value instead (to host here, back onto the
 * reader's GPU there) measured slower: 0.99 ms for 4 KiB actor to actor on an H200, against
 * 0.70 ms by IPC, whose mapping the reader keeps for the producer's next result in the same block.
 */
export function holdResult(returnId: string, value: unknown, transport: string): HeldResult | undefined {
  let tensors: Tensor[] | undefined = value instanceof Tensor ? [value] : isTensorArray(value) ? value : undefined;
  let skeleton: Uint8Array | undefined;
  const nested: string[] = [];
  if (!tensors) {
    const found: Tensor[] = [];
    const shape = takeTensors(value, found);
    if (found.length === 0) return undefined;
    skeleton = pack(shape, nested);
    if (skeleton.byteLength > INLINE_LIMIT) return undefined;
    tensors = found;
  }
  const onGpu = tensors.every((tensor) => tensor.device !== 'cpu');
  let ipc: Uint8Array[] | undefined;
  let copied = false;
  if (onGpu && (transport === 'ipc' || transport === 'auto')) {
    // A tensor this actor received by IPC (passed on as it came) maps another process's memory,
    // which CUDA will not export again: readers get a copy of it, made on the GPU.
    if (tensors.some((tensor) => tensor.memory.imported)) {
      tensors = tensors.map((tensor) => (tensor.memory.imported ? tensor.clone() : tensor));
      copied = true;
    }
    try {
      ipc = tensors.map((tensor) => exportPackedIpc(tensor.memory));
    } catch {
      ipc = undefined; // exported on demand instead, where the failure reaches the reader
    }
  }
  const meta: HeldMeta = { tensors: tensors.map((tensor) => [tensor.dtype, [...tensor.shape], tensor.device]), array: Array.isArray(value) && !skeleton };
  if (skeleton) meta.skeleton = skeleton;
  // Kept as readers in this process and the store path see it: around the copies, if any.
  held.set(returnId, { value: copied ? assemble(meta, tensors) : value, tensors, meta });
  if (ipc) meta.ipc = ipc;
  return { meta, nested };
}

function isTensorArray(value: unknown): value is Tensor[] {
  return Array.isArray(value) && value.length > 0 && value.every((item) => item instanceof Tensor);
}

/** What a reader gets: the tensors as the result held them. */
function assemble(meta: HeldMeta, tensors: Tensor[]): unknown {
  if (meta.skeleton) return putTensors(unpack(meta.skeleton), tensors);
  return meta.array ? tensors : tensors[0];
}

function take(id: string): HeldEntry {
  const entry = held.get(id) ?? retired.get(id);
  if (!entry) throw new TrellisError('ERR_OBJECT_LOST', `tensors of object ${id} are no longer held by this actor`);
  return entry;
}

/**
 * Maps held tensors into this process by CUDA IPC (at once: no promise, no extra turn). The
 * mapping reads the producer's memory in place, so each tensor keeps the object alive while it
 * lives: `hold` takes a borrow of it and returns its release, run when the tensor's memory is
 * freed or collected. Without it, a reader that kept a tensor past the object's last ref would
 * read whatever the producer's allocator put in that block next.
 */
export function mapHeld(wire: { handles: unknown[]; meta: HeldMeta }, hold?: () => () => void): unknown {
  const tensors = wire.meta.tensors.map(([dtype, shape], index) => {
    const memory = importPackedIpc(wire.handles[index] as Uint8Array);
    if (hold) whenReleased(memory, hold());
    return Tensor.onDevice(memory, dtype as DType, shape);
  });
  return assemble(wire.meta, tensors);
}

/**
 * A result this actor holds, read by the actor itself: its tensors where they are, as shares that
 * the reader may free (as it would a mapped tensor) without freeing what the result holds, and
 * that stay valid if the result is freed first.
 */
export function ownHeld(id: string): unknown {
  const entry = take(id);
  return assemble(entry.meta, entry.tensors.map((tensor) => tensor.share()));
}

/** Receives held tensors into this process over the group's communicator. */
export async function receiveHeld(wire: { recv: { group: string; source: number; meta: HeldMeta } }): Promise<unknown> {
  const communicator = getCommunicator(wire.recv.group);
  const tensors = wire.recv.meta.tensors.map(([dtype, shape]) => Tensor.empty(shape, { dtype: dtype as DType, device: communicator.tensorDevice }));
  communicator.groupStart();
  for (const tensor of tensors) void communicator.recv(tensor, wire.recv.source);
  await communicator.groupEnd();
  return assemble(wire.recv.meta, tensors);
}

registerSystemMethod('__trellis_materialize', (id: string) => {
  const entry = take(id);
  held.delete(id);
  // Kept until the object's last ref goes (free_held), not until collected: see `retired`.
  retired.set(id, entry);
  return entry.value;
});

registerSystemMethod('__trellis_send_held', async (id: string, group: string, destination: number) => {
  const communicator = getCommunicator(group);
  communicator.groupStart();
  for (const tensor of take(id).tensors) void communicator.send(tensor.to(communicator.tensorDevice), destination);
  await communicator.groupEnd();
});

registerSystemMethod('__trellis_export_held', (id: string) => take(id).tensors.map((tensor) => exportPackedIpc(tensor.memory)));

registerSystemMethod('__trellis_free_held', (id: string) => {
  const tensors = (held.get(id) ?? retired.get(id))?.tensors ?? [];
  held.delete(id);
  retired.delete(id);
  for (const tensor of tensors) freeAsResult(tensor);
});
