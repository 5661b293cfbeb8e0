/**
 * Tensor transport, the actor side: results of methods declared with a tensorTransport other than
 * 'store' stay with the actor that made them (in GPU memory for CUDA tensors), and move only when a
 * reader needs them — sent over a collective group's communicator, mapped by CUDA IPC, or
 * materialized into the object store for the driver or readers outside the group.
 */
import { TrellisError } from '../errors.js';
import { registerSystemMethod } from '../core/system-methods.js';
import { currentRuntime } from '../core/runtime-context.js';
import type { HeldMeta } from '../core/protocol.js';
import { getCommunicator } from './collective.js';
import { exportPackedIpc, exportedFreeBlocks, freeExportedBlocks, importPackedIpc, whenReleased } from './cuda.js';
import type { DType } from './dtype.js';
import { Tensor } from './tensor.js';

const held = new Map<string, { value: Tensor | Tensor[]; tensors: Tensor[] }>();

/**
 * Keeps `value` here if it is a Tensor or an array of Tensors; returns what readers need to know,
 * with the CUDA IPC handles already exported where readers may map them (it costs a few
 * microseconds here and saves readers a round trip to this actor). Undefined: not tensors.
 *
 * Small CUDA results are held too. Sending them by value instead (to host here, back onto the
 * reader's GPU there) measured slower: 0.99 ms for 4 KiB actor to actor on an H200, against
 * 0.70 ms by IPC, whose mapping the reader keeps for the producer's next result in the same block.
 */
export function holdResult(returnId: string, value: unknown, transport: string): HeldMeta | undefined {
  const tensors = value instanceof Tensor ? [value] : Array.isArray(value) && value.length > 0 && value.every((item) => item instanceof Tensor) ? (value as Tensor[]) : undefined;
  if (!tensors) return undefined;
  const onGpu = tensors.every((tensor) => tensor.device !== 'cpu');
  let ipc: Uint8Array[] | undefined;
  if (onGpu && (transport === 'ipc' || transport === 'auto')) {
    try {
      ipc = tensors.map((tensor) => exportPackedIpc(tensor.memory));
    } catch {
      ipc = undefined; // exported on demand instead, where the failure reaches the reader
    }
  }
  held.set(returnId, { value: value as Tensor | Tensor[], tensors });
  return { tensors: tensors.map((tensor) => [tensor.dtype, [...tensor.shape], tensor.device]), array: Array.isArray(value), ...(ipc ? { ipc } : {}) };
}

function take(id: string): { value: Tensor | Tensor[]; tensors: Tensor[] } {
  const entry = held.get(id);
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
export function mapHeld(wire: { handles: unknown[]; meta: HeldMeta }, hold?: () => () => void): Tensor | Tensor[] {
  const tensors = wire.meta.tensors.map(([dtype, shape], index) => {
    const memory = importPackedIpc(wire.handles[index] as Uint8Array);
    if (hold) whenReleased(memory, hold());
    return Tensor.onDevice(memory, dtype as DType, shape);
  });
  return wire.meta.array ? tensors : tensors[0];
}

/** Receives held tensors into this process over the group's communicator. */
export async function receiveHeld(wire: { recv: { group: string; source: number; meta: HeldMeta } }): Promise<unknown> {
  const communicator = getCommunicator(wire.recv.group);
  const tensors = wire.recv.meta.tensors.map(([dtype, shape]) => Tensor.empty(shape, { dtype: dtype as DType, device: communicator.tensorDevice }));
  communicator.groupStart();
  for (const tensor of tensors) void communicator.recv(tensor, wire.recv.source);
  await communicator.groupEnd();
  return wire.recv.meta.array ? tensors : tensors[0];
}

/**
 * Gives the blocks this process exported over CUDA IPC, and has since freed, back to the CUDA
 * driver. They stay in its allocator's cache otherwise (cuMemFree of memory another process
 * still maps is undefined behaviour, and readers keep idle mappings for reuse): every other
 * process of the cluster first closes its idle mappings of them, and a block goes back only if no
 * process still maps it and it stayed free meanwhile. Call it in an actor whose exported tensors'
 * sizes changed for good (after a warm-up with larger batches, say); `cuda.emptyCache()` releases
 * the rest of the cache.
 */
export async function reclaimIpcMemory(device = 0): Promise<{ freedBytes: number }> {
  const blocks = exportedFreeBlocks(device);
  if (blocks.length === 0) return { freedBytes: 0 };
  const hex = (handle: Uint8Array) => Buffer.from(handle).toString('hex');
  const stillMapped = new Set((await currentRuntime().closeIpcMappings(blocks.map((block) => block.handle))).map(hex));
  const ids = blocks.filter((block) => !stillMapped.has(hex(block.handle))).map((block) => block.id);
  return { freedBytes: freeExportedBlocks(device, ids) };
}

registerSystemMethod('__trellis_materialize', (id: string) => {
  const entry = take(id);
  held.delete(id);
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
  const entry = held.get(id);
  held.delete(id);
  for (const tensor of entry?.tensors ?? []) tensor.free();
});
