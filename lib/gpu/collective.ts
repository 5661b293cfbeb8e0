/**
 * Collective groups: a set of actors wired into one communicator, the CPU one over shared memory
 * or NCCL on GPUs. The driver creates the group (the CPU segment, or NCCL's unique id fetched from
 * rank 0 and passed through the head to every rank); inside each actor, getCommunicator(name)
 * returns its rank's communicator.
 */
import { InvalidArgumentError, TrellisError } from '../errors.js';
import { get } from '../core/api.js';
import { actorHandleInfo, type ActorHandle } from '../core/registry.js';
import { currentRuntime } from '../core/runtime-context.js';
import { registerSystemMethod } from '../core/system-methods.js';
import { hostIdentity } from '../core/host.js';
import { newObjectId } from '../store/object-id.js';
import type { Communicator } from './communicator.js';
import { CpuCommunicator, createCpuGroupSegment, removeCpuGroupSegment } from './cpu-communicator.js';

export type CollectiveBackend = 'cpu' | 'nccl';

export interface CollectiveGroupOptions {
  backend?: CollectiveBackend;
  name?: string;
  /** Milliseconds an operation waits for its peers before the group is aborted (default 60 s). */
  timeout?: number;
}

interface JoinConfig {
  name: string;
  backend: CollectiveBackend;
  rank: number;
  size: number;
  segment?: string;
  uniqueId?: Uint8Array;
  timeout: number;
}

/** The driver's handle on a group. */
export class CollectiveGroup {
  readonly name: string;
  readonly backend: CollectiveBackend;
  readonly actorIds: readonly string[];
  readonly #segment: string | undefined;
  #destroyed = false;

  /** @internal */
  constructor(name: string, backend: CollectiveBackend, actorIds: string[], segment?: string) {
    this.name = name;
    this.backend = backend;
    this.actorIds = actorIds;
    this.#segment = segment;
  }

  get size(): number {
    return this.actorIds.length;
  }

  /** Rank of an actor in the group, or -1. */
  rankOf(handle: ActorHandle<unknown>): number {
    return this.actorIds.indexOf(actorHandleInfo(handle)?.actorId ?? '');
  }

  /** Destroys every rank's communicator and removes the group's segment. */
  async destroy(): Promise<void> {
    if (this.#destroyed) return;
    this.#destroyed = true;
    const runtime = currentRuntime();
    runtime.unregisterCollectiveGroup?.(this.name);
    await Promise.allSettled(this.actorIds.map((actorId) => get(runtime.submitActorTask(actorId, '__trellis_leave_group', [this.name]))));
    if (this.#segment) removeCpuGroupSegment(this.#segment);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.destroy();
  }
}

/** Wires `actors` (rank = position) into one communicator named `options.name`. */
export async function createCollectiveGroup(actors: ReadonlyArray<{ readonly actorId: string }>, options: CollectiveGroupOptions = {}): Promise<CollectiveGroup> {
  if (!Array.isArray(actors) || actors.length === 0) throw new InvalidArgumentError('a collective group needs at least one actor');
  const actorIds = actors.map((actor, index) => {
    const info = actorHandleInfo(actor);
    if (!info) throw new InvalidArgumentError(`member ${index} of the group is not an actor handle`);
    return info.actorId;
  });
  if (new Set(actorIds).size !== actorIds.length) throw new InvalidArgumentError('an actor appears twice in the group');
  const backend = options.backend ?? 'cpu';
  if (backend !== 'cpu' && backend !== 'nccl') throw new InvalidArgumentError(`backend must be 'cpu' or 'nccl', got '${backend}'`);
  const name = options.name ?? `group-${newObjectId().slice(0, 8)}`;
  const timeout = options.timeout ?? 60_000;
  const runtime = currentRuntime();
  const size = actorIds.length;
  let segment: string | undefined;
  let uniqueId: Uint8Array | undefined;
  if (backend === 'cpu') {
    // Its segment is shared memory on this host: every rank must be here too.
    const hosts = (await get(actorIds.map((actorId) => runtime.submitActorTask(actorId, '__trellis_host', [])))) as string[];
    const here = hostIdentity();
    const away = hosts.findIndex((host) => host !== here);
    if (away >= 0) {
      throw new InvalidArgumentError(
        `a 'cpu' collective group communicates through shared memory on the host that creates it (${here}), but rank ${away} (actor ${actorIds[away]}) runs on ${hosts[away]}: place the ranks on this host, or use backend 'nccl' across hosts`,
        'ERR_GROUP_HOSTS',
      );
    }
    segment = createCpuGroupSegment(size);
  } else {
    uniqueId = (await get(runtime.submitActorTask(actorIds[0], '__trellis_nccl_unique_id', []))) as Uint8Array;
  }
  try {
    // Every rank joins at once: NCCL's init returns only when all ranks are in. The first rank to
    // fail is the cause: the others then wait in NCCL's init until their timeout, and an error of
    // theirs, read first, would hide it (a dead rank 1 reported as rank 0's timeout a minute later).
    const joins = actorIds.map((actorId, rank) =>
      runtime.submitActorTask(actorId, '__trellis_join_group', [{ name, backend, rank, size, segment, uniqueId, timeout } satisfies JoinConfig]),
    );
    await Promise.all(joins.map((join) => get(join)));
  } catch (error) {
    if (segment) removeCpuGroupSegment(segment);
    throw error;
  }
  runtime.registerCollectiveGroup?.(name, actorIds, backend);
  return new CollectiveGroup(name, backend, actorIds, segment);
}

// ---------------------------------------------------------------------------------------------
// Inside actors

const communicators = new Map<string, Communicator>();

/** This actor's communicator in the group `name` (created by createCollectiveGroup). */
export function getCommunicator(name: string): Communicator {
  const communicator = communicators.get(name);
  if (!communicator) {
    throw new TrellisError('ERR_NO_GROUP', `this process is in no collective group named '${name}' (groups here: ${[...communicators.keys()].join(', ') || 'none'})`);
  }
  return communicator;
}

/** NCCL communicators come from the GPU layer; it registers its factory when it loads. */
let ncclFactory: ((config: { rank: number; size: number; uniqueId: Uint8Array; timeout: number }) => Promise<Communicator>) | undefined;
let ncclUniqueId: (() => Uint8Array) | undefined;

export function registerNcclBackend(factory: typeof ncclFactory, uniqueId: typeof ncclUniqueId): void {
  ncclFactory = factory;
  ncclUniqueId = uniqueId;
}

registerSystemMethod('__trellis_join_group', async (config: JoinConfig) => {
  if (communicators.has(config.name)) throw new InvalidArgumentError(`this actor is already in group '${config.name}'`);
  let communicator: Communicator;
  if (config.backend === 'cpu') {
    communicator = new CpuCommunicator(config.segment!, config.rank, config.size, { timeout: config.timeout });
  } else {
    if (!ncclFactory) throw new TrellisError('ERR_NCCL_UNAVAILABLE', 'NCCL is not available in this worker');
    communicator = await ncclFactory({ rank: config.rank, size: config.size, uniqueId: config.uniqueId!, timeout: config.timeout });
  }
  communicators.set(config.name, communicator);
  return config.rank;
});

registerSystemMethod('__trellis_leave_group', (name: string) => {
  communicators.get(name)?.destroy();
  communicators.delete(name);
});

registerSystemMethod('__trellis_host', () => hostIdentity());

registerSystemMethod('__trellis_nccl_unique_id', () => {
  if (!ncclUniqueId) throw new TrellisError('ERR_NCCL_UNAVAILABLE', 'NCCL is not available in this worker');
  return ncclUniqueId();
});
