/**
 * The memory summary (Cluster.memorySummary, as Ray's `ray memory`): per node, its store's use and
 * the pins no ref accounts for; per object the driver knows, where it is, who references it and
 * which processes pin it.
 */
import type { PinnedObjectInfo } from '../store/object-store.js';
import type { Node, WorkerProcess } from './node.js';
import { RemoteNode } from './remote-node.js';
import { storedIdOf, type ActorRecord, type ObjectRecord } from './cluster-records.js';

/** A process pinning an object in a node's store (see Cluster.memorySummary). */
export interface ObjectPin {
  nodeId: string;
  pid: number;
  /** Pins it holds (views of the object in that process). */
  pins: number;
  /** 'other': a process the driver does not know (an attachment of another program, say). */
  holder: 'driver' | 'worker' | 'agent' | 'other';
  workerId?: string;
  actorId?: string;
}

/** An object the driver knows, in a memory summary. */
export interface ObjectMemoryEntry {
  objectId: string;
  state: 'pending' | 'ready' | 'failed';
  /** Bytes in a store, or of the value sent inline. */
  size: number;
  /** In the message itself, in nodes' stores, in the actor that made it (tensors kept on its device), or not yet made. */
  where: 'inline' | 'store' | 'actor' | 'none';
  /** Nodes whose store holds a copy. */
  nodes: string[];
  /** Handles that keep it: refs in the driver and workers, pending tasks' arguments, containing objects. */
  references: number;
  /** The task that returned, put or yielded it; absent for the driver's puts. */
  madeBy?: string;
  pinnedBy: ObjectPin[];
}

export interface MemorySummary {
  nodes: Array<{
    nodeId: string;
    capacity: number;
    bytesInUse: number;
    objects: number;
    spilledBytes: number;
    pinnedObjects: number;
    /** Bytes that pins alone keep: objects no ref names (deleted, or never reported to the driver). */
    unreferencedPinnedBytes: number;
    /** Why the node's pins could not be listed (its agent is gone, say). */
    error?: string;
  }>;
  /** Largest first. */
  objects: ObjectMemoryEntry[];
  unreferencedPins: Array<{ nodeId: string; objectId: string; size: number; state: string; deleted: boolean; pinnedBy: ObjectPin[] }>;
}

export async function summarizeMemory(nodeList: readonly Node[], records: Iterable<ObjectRecord>, actors: Iterable<ActorRecord>): Promise<MemorySummary> {
  const actorOf = new Map([...actors].filter((actor) => actor.worker).map((actor) => [actor.worker!, actor.id]));
  const byStoredId = new Map<string, ObjectRecord>();
  const known = [...records];
  for (const record of known) byStoredId.set(storedIdOf(record), record);
  const pinsOf = new Map<string, ObjectPin[]>();
  const unreferencedPins: MemorySummary['unreferencedPins'] = [];
  const nodes = await Promise.all(
    nodeList.map(async (node) => {
      const stats = node.storeStats();
      const summary: MemorySummary['nodes'][number] = {
        nodeId: node.id,
        capacity: stats.capacity,
        bytesInUse: stats.bytesInUse,
        objects: stats.objectCount,
        spilledBytes: stats.spilledBytes,
        pinnedObjects: 0,
        unreferencedPinnedBytes: 0,
      };
      let pinned: PinnedObjectInfo[];
      try {
        pinned = await node.pinnedObjects();
      } catch (error) {
        return { ...summary, error: (error as Error).message };
      }
      const holderOf = pinHolders(node, actorOf);
      for (const entry of pinned) {
        summary.pinnedObjects++;
        const pins = entry.holders.map((holder) => ({ nodeId: node.id, pid: holder.pid, pins: holder.pins, ...holderOf(holder.pid) }));
        const record = entry.deleted ? undefined : byStoredId.get(entry.objectId);
        if (record) {
          pinsOf.set(record.id, [...(pinsOf.get(record.id) ?? []), ...pins]);
        } else {
          summary.unreferencedPinnedBytes += entry.size;
          unreferencedPins.push({ nodeId: node.id, objectId: entry.objectId, size: entry.size, state: entry.state, deleted: entry.deleted, pinnedBy: pins });
        }
      }
      return summary;
    }),
  );
  const objects = known.map((record): ObjectMemoryEntry => {
    const value = record.value;
    const where = record.held ? 'actor' : !value ? 'none' : 'inline' in value ? 'inline' : 'node' in value ? 'store' : 'actor';
    const madeBy = record.lineage ?? record.madeBy;
    return {
      objectId: record.id,
      state: record.state,
      size: value && 'inline' in value ? value.inline.byteLength : record.size,
      where,
      nodes: [...record.nodes],
      references: record.holds,
      ...(madeBy ? { madeBy: madeBy.name } : record.yieldedBy ? { madeBy: record.yieldedBy } : {}),
      pinnedBy: pinsOf.get(record.id) ?? [],
    };
  });
  objects.sort((a, b) => b.size - a.size);
  return { nodes, objects, unreferencedPins };
}

/** Who a pid pinning objects in `node`'s store is: the driver, the node's agent, or a worker. */
function pinHolders(node: Node, actorOf: ReadonlyMap<WorkerProcess, string>): (pid: number) => Pick<ObjectPin, 'holder' | 'workerId' | 'actorId'> {
  const workers = new Map([...node.workers.values()].map((worker) => [worker.child.pid, worker]));
  return (pid) => {
    const worker = workers.get(pid);
    if (worker) return { holder: 'worker', workerId: worker.id, ...(actorOf.has(worker) ? { actorId: actorOf.get(worker) } : {}) };
    if (node instanceof RemoteNode) return { holder: pid === node.agentPid ? 'agent' : 'other' };
    return { holder: pid === process.pid ? 'driver' : 'other' };
  };
}
