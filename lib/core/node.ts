/**
 * A logical node: its resources, its object-store segment and its pool of worker processes.
 * Workers are prestarted, reused, and reaped when idle above the soft limit.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { ObjectStore, type PinnedObjectInfo, type StoreStats } from '../store/object-store.js';
import { newObjectId, sequentialObjectId } from '../store/object-id.js';
import { RING_BYTES, connectionRingWanted, type FrameConnection } from './connection.js';
import { native, type NativeConnectionRing } from '../native.js';
import type { DriverMessage, WorkerMessage } from './protocol.js';
import { ResourcePool, type Resources } from './resources.js';
import { workerCommand } from './worker-loader.js';
import { DEFAULT_WORKER_ENVIRONMENT, type WorkerEnvironment } from './options.js';

export type WorkerState = 'starting' | 'idle' | 'leased' | 'actor' | 'dead';

/** What the cluster needs of a worker's process: local (a ChildProcess) or on a node agent's host. */
export interface WorkerChild {
  readonly pid?: number;
  kill(signal?: NodeJS.Signals): boolean;
  /** Code and signal where known (a remote worker's come from its agent). */
  on(event: 'exit', listener: (code: number | null, signal: NodeJS.Signals | null) => void): unknown;
  once(event: 'exit', listener: (code: number | null, signal: NodeJS.Signals | null) => void): unknown;
}

export class WorkerProcess {
  readonly id: string;
  readonly node: Node;
  readonly child: WorkerChild;
  /** The runtime environment it was started with: it runs only tasks and actors of the same. */
  readonly environment: WorkerEnvironment;
  state: WorkerState = 'starting';
  /** The actor whose dedicated process this is (state 'actor'). */
  actorId?: string;
  connection?: FrameConnection<WorkerMessage, DriverMessage>;
  /** Tasks sent to this worker and not finished, by task id. */
  readonly inflight = new Set<string>();
  idleSince = 0;
  /** Has held a lease: no longer clean enough to become an actor's dedicated process. */
  leasedOnce = false;
  readonly ready: Promise<void>;
  resolveReady!: () => void;
  exited = false;
  /**
   * Holds the driver took on this worker's behalf (its borrows, and the handles to what it put or
   * submitted), per object id: the driver drops them all once the worker is gone.
   */
  readonly holds = new Map<string, number>();
  /** The worker names its stored puts by this sequence (see sequentialObjectId). */
  readonly putIds: Uint8Array;
  /** Stored puts the worker registered: the next id of its sequence is the first unreported one. */
  storedPuts = 0;
  /**
   * Tasks it runs whose puts are named from their return id (see taskPutBase): each one's base
   * and the puts it registered, dropped when the task reports. What is left once the worker is
   * gone names puts that may never have been reported.
   */
  readonly taskPuts = new Map<string, { base: Uint8Array; registered: number }>();
  /** Its watches of other actors' deaths (see Runtime.watchActors), by the worker's watch id. */
  readonly actorWatches = new Map<number, { stop: () => void; answer: (death: { actorId: string; cause: string } | null) => void }>();
  /** Its holds and unreported puts were dropped (it exited and its connection closed). */
  released = false;
  /** What it reported before exiting on an error nothing caught. */
  fatalError: string | undefined;
  #exit: { code: number | null; signal: NodeJS.Signals | null } | undefined;

  recordExit(code: number | null, signal: NodeJS.Signals | null): void {
    this.#exit ??= { code, signal };
  }

  /** How it died, for the errors of what was running in it: `killed by SIGKILL`, say. */
  get deathCause(): string {
    const pid = this.child.pid !== undefined ? `pid ${this.child.pid} ` : '';
    if (this.fatalError) return `${pid}exited on an uncaught ${this.fatalError}`;
    if (this.#exit?.signal) return `${pid}killed by ${this.#exit.signal}`;
    if (this.#exit?.code !== null && this.#exit?.code !== undefined) return `${pid}exited with code ${this.#exit.code}`;
    return `${pid}exited`;
  }

  /**
   * The connection's shared memory, made here and mapped by the worker from descriptor 3; the
   * connection takes it over at the worker's hello (until then it is closed with the worker).
   */
  ring: NativeConnectionRing | undefined;

  constructor(node: Node, id: string, child: WorkerChild, ring: NativeConnectionRing | undefined, putIds: Uint8Array, environment: WorkerEnvironment = DEFAULT_WORKER_ENVIRONMENT) {
    this.id = id;
    this.environment = environment;
    this.putIds = putIds;
    this.node = node;
    this.child = child;
    this.ring = ring;
    this.ready = new Promise((resolve) => (this.resolveReady = resolve));
  }

  /** The ring goes to the connection, which closes it with itself. */
  takeRing(): NativeConnectionRing | undefined {
    const ring = this.ring;
    this.ring = undefined;
    return ring;
  }

  send(message: DriverMessage): void {
    this.connection?.send(message);
  }

  kill(): void {
    if (!this.exited) this.child.kill('SIGKILL');
  }
}

export interface NodeOptions {
  id?: string;
  numCpus?: number;
  numGpus?: number;
  memory?: number;
  resources?: Resources;
  objectStoreMemory?: number;
}

/**
 * A node as the scheduler sees it: resources, GPUs and a worker pool, and the object store its
 * workers read from. A LocalNode's store is mapped in this process; a RemoteNode (remote-node.ts)
 * is a node agent on another host (or another process), reached over its connection.
 */
export abstract class Node {
  readonly id: string;
  readonly pool: ResourcePool;
  readonly workers = new Map<string, WorkerProcess>();
  readonly numGpus: number;
  /** Fixed-point share of each GPU still free, for assigning GPU ids. */
  readonly gpuFree: number[];
  readonly softLimit: number;
  /** Added to every worker's environment (the cluster's MPS pipe directory, say). */
  readonly workerEnvironment: Readonly<Record<string, string>>;
  /** Being given back (a shared cluster's idle node): nothing new is placed here. */
  draining = false;

  constructor(id: string, resources: Resources, numGpus: number, workerEnvironment: Record<string, string>) {
    this.workerEnvironment = workerEnvironment;
    this.id = id;
    this.numGpus = numGpus;
    this.pool = new ResourcePool({ ...resources, GPU: numGpus });
    this.gpuFree = Array.from({ length: this.numGpus }, () => 10_000);
    this.softLimit = Math.max(1, Math.ceil(resources.CPU ?? 0));
  }

  /** The store mapped in this process (undefined for a node whose store lives elsewhere). */
  abstract readonly localStore: ObjectStore | undefined;
  /** The store segment's name, as its workers attach it. */
  abstract readonly storeName: string;
  /** The node is gone (closed, or its agent disconnected). */
  abstract readonly closed: boolean;

  /** Starts a worker that will connect to `address` (the cluster's socket). */
  /**
   * A new worker process. `light`: it skips loading the public API before its hello, because it is
   * for an actor whose class needs less (see isLightActorModule); a node may ignore it.
   */
  abstract spawnWorker(address: string, environment: WorkerEnvironment, light?: boolean): WorkerProcess;
  /** Whether the node's store holds `id`, as far as this process can tell without asking. */
  abstract holdsObject(id: string): boolean;
  /** Deletes an object that may already be gone. */
  abstract deleteObject(id: string): void;
  /** Deletes a dead worker's stored puts from the `from`th of its sequence on (never reported). */
  abstract deleteUnreportedPuts(putIds: Uint8Array, from: number): void;
  /** Drops the pins of this node's dead processes. */
  abstract reapDeadProcesses(): void;
  abstract storeStats(): StoreStats;
  /** The objects pinned in the node's store, with the processes pinning them. */
  abstract pinnedObjects(): Promise<PinnedObjectInfo[]>;
  abstract close(): void;

  /** An idle worker of the runtime environment `key` ('' for the driver's own). */
  idleWorker(key = ''): WorkerProcess | undefined {
    for (const worker of this.workers.values()) if (worker.state === 'idle' && worker.environment.key === key) return worker;
    return undefined;
  }

  canAssignGpus(amount: number): boolean {
    if (amount <= 0) return true;
    if (amount < 10_000) return this.gpuFree.some((free) => free >= amount);
    return this.gpuFree.filter((free) => free === 10_000).length >= Math.ceil(amount / 10_000);
  }

  /** Assigns GPU ids for a fixed-point GPU request; undefined if they cannot be found now. */
  assignGpus(amount: number): number[] | undefined {
    if (amount <= 0) return [];
    if (amount < 10_000) {
      const index = this.gpuFree.findIndex((free) => free >= amount);
      if (index < 0) return undefined;
      this.gpuFree[index] -= amount;
      return [index];
    }
    const whole = Math.ceil(amount / 10_000);
    const free = this.gpuFree.map((value, index) => [value, index]).filter(([value]) => value === 10_000).map(([, index]) => index);
    if (free.length < whole) return undefined;
    const chosen = free.slice(0, whole);
    for (const index of chosen) this.gpuFree[index] = 0;
    return chosen;
  }

  releaseGpus(ids: number[], amount: number): void {
    if (ids.length === 1 && amount < 10_000) this.gpuFree[ids[0]] += amount;
    else for (const index of ids) this.gpuFree[index] = 10_000;
  }
}

/** A logical node in this process: its segment is mapped here and its workers are children. */
export class LocalNode extends Node {
  readonly store: ObjectStore;

  constructor(options: NodeOptions, index: number, workerEnvironment: Record<string, string> = {}, private readonly workingDirectory?: string) {
    super(options.id ?? `node-${index}`, nodeResources(options), options.numGpus ?? 0, workerEnvironment);
    this.store = ObjectStore.create({ capacity: options.objectStoreMemory });
  }

  get localStore(): ObjectStore {
    return this.store;
  }

  get storeName(): string {
    return this.store.name;
  }

  get closed(): boolean {
    return this.store.closed;
  }

  spawnWorker(address: string, environment: WorkerEnvironment, light = false): WorkerProcess {
    const id = `worker-${newObjectId().slice(0, 12)}`;
    const putIds = randomBytes(20);
    const ring = connectionRingWanted() ? native.ConnectionRing.create(RING_BYTES) : undefined;
    const command = workerCommand();
    const child = spawn(process.execPath, command.args, {
      ...(this.workingDirectory ? { cwd: this.workingDirectory } : {}),
      env: {
        ...process.env,
        ...command.env,
        TRELLIS_SOCKET: address,
        TRELLIS_WORKER_ID: id,
        TRELLIS_NODE_ID: this.id,
        TRELLIS_STORE: this.store.name,
        TRELLIS_PUT_IDS: putIds.toString('hex'),
        ...(light ? { TRELLIS_WORKER_PRELOAD: '0' } : {}),
        ...this.workerEnvironment,
        // The task's or actor's own variables over the driver's (none is named TRELLIS_*).
        ...environment.env,
        ...(ring ? { TRELLIS_RING_FD: '3' } : {}),
      },
      stdio: ['ignore', 'inherit', 'inherit', ...(ring ? [ring.fd] : [])],
    });
    // The child has its own copy of the descriptor now; the mapping here stays.
    ring?.closeFd();
    const worker = new WorkerProcess(this, id, child, ring, putIds, environment);
    this.workers.set(worker.id, worker);
    return worker;
  }

  holdsObject(id: string): boolean {
    return !this.store.closed && this.store.contains(id);
  }

  deleteObject(id: string): void {
    if (this.store.closed || this.store.state(id) === 'absent') return;
    try {
      this.store.delete(id);
    } catch {
      // Deleted meanwhile by another path.
    }
  }

  deleteUnreportedPuts(putIds: Uint8Array, from: number): void {
    deleteUnreportedPuts(this.store, putIds, from);
  }

  reapDeadProcesses(): void {
    if (!this.store.closed) this.store.reapDeadProcesses();
  }

  storeStats(): StoreStats {
    return this.store.stats();
  }

  pinnedObjects(): Promise<PinnedObjectInfo[]> {
    return Promise.resolve(this.store.closed ? [] : this.store.pinned());
  }

  close(): void {
    for (const worker of this.workers.values()) worker.kill();
    this.store.close();
  }
}

/** A node's resources from its options (CPUs default to 2, as a worker pool needs some). */
export function nodeResources(options: NodeOptions): Resources {
  return { ...(options.resources ?? {}), CPU: options.numCpus ?? 2, memory: options.memory ?? 0 };
}

/** Stored puts follow a sequence: those after the last registered one were never reported. */
export function deleteUnreportedPuts(store: ObjectStore, putIds: Uint8Array, from: number): void {
  for (let n = from; !store.closed; n++) {
    const id = sequentialObjectId(putIds, n);
    if (store.state(id) === 'absent') break;
    try {
      store.delete(id);
    } catch {
      // Deleted meanwhile.
    }
  }
}
