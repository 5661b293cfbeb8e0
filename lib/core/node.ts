/**
 * A logical node: its resources, its object-store segment and its pool of worker processes.
 * Workers are prestarted, reused, and reaped when idle above the soft limit.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ObjectStore } from '../store/object-store.js';
import { newObjectId } from '../store/object-id.js';
import { RING_BYTES, connectionRingWanted, type FrameConnection } from './connection.js';
import { native, type NativeConnectionRing } from '../native.js';
import type { DriverMessage, WorkerMessage } from './protocol.js';
import { ResourcePool, type Resources } from './resources.js';

const here = fileURLToPath(import.meta.url);
const workerEntry = join(dirname(here), here.endsWith('.ts') ? 'worker-main.ts' : 'worker-main.js');

/**
 * The Node.js flags a worker starts with. Workers import the driver's modules, so they need a
 * TypeScript loader exactly when the driver has one (or trellis itself runs from its sources).
 * A loader's hooks see every module loaded after them, one message to the hooks thread each:
 * apache-arrow alone is 158 modules, about 0.8 s of CPU per worker through tsx, against 0.1 s
 * without. So the large dependencies load first, before the loader registers its hooks.
 */
function workerNodeFlags(): string[] {
  const driverFlags = [...process.execArgv, ...(process.env.NODE_OPTIONS?.split(/\s+/) ?? [])];
  const flags: string[] = driverFlags.filter((flag) => flag === '--experimental-strip-types' || flag === '--experimental-transform-types');
  const typeScript = workerEntry.endsWith('.ts')
    || driverFlags.some((flag) => /(^|[/\\=])tsx([/\\]|$)/.test(flag) || flag.includes('/tsx/dist/'))
    || /\.[mc]?tsx?$/.test(process.argv[1] ?? '');
  if (!typeScript) return flags;
  for (const dependency of ['apache-arrow', 'msgpackr']) {
    try {
      flags.push('--import', import.meta.resolve(dependency));
    } catch {
      // Older Node.js without a synchronous import.meta.resolve: the loader loads it, more slowly.
    }
  }
  return [...flags, '--import', 'tsx'];
}
const workerFlags = workerNodeFlags();

export type WorkerState = 'starting' | 'idle' | 'leased' | 'actor' | 'dead';

export class WorkerProcess {
  readonly id: string;
  readonly node: Node;
  readonly child: ChildProcess;
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
  readonly putIds = randomBytes(20);
  /** Stored puts the worker registered: the next id of its sequence is the first unreported one. */
  storedPuts = 0;
  /** Its watches of other actors' deaths (see Runtime.watchActors), by the worker's watch id. */
  readonly actorWatches = new Map<number, { stop: () => void; answer: (death: { actorId: string; cause: string } | null) => void }>();
  /** Its holds and unreported puts were dropped (it exited and its connection closed). */
  released = false;

  /**
   * The connection's shared memory, made here and mapped by the worker from descriptor 3; the
   * connection takes it over at the worker's hello (until then it is closed with the worker).
   */
  ring: NativeConnectionRing | undefined;

  constructor(node: Node, socketPath: string) {
    this.id = `worker-${newObjectId().slice(0, 12)}`;
    this.node = node;
    this.ready = new Promise((resolve) => (this.resolveReady = resolve));
    this.ring = connectionRingWanted() ? native.ConnectionRing.create(RING_BYTES) : undefined;
    // TRELLIS_WORKER_NODE_ARGS: extra Node.js flags for workers (profiling, inspecting).
    const extra = process.env.TRELLIS_WORKER_NODE_ARGS?.split(' ').filter(Boolean) ?? [];
    // --expose-gc: a worker collects garbage when the zero-copy views it made may pin much of the
    // store (see worker-main.ts).
    this.child = spawn(process.execPath, [...extra, '--expose-gc', ...workerFlags, workerEntry], {
      env: {
        ...process.env,
        TRELLIS_SOCKET: socketPath,
        TRELLIS_WORKER_ID: this.id,
        TRELLIS_NODE_ID: node.id,
        TRELLIS_STORE: node.store.name,
        TRELLIS_PUT_IDS: this.putIds.toString('hex'),
        ...node.workerEnvironment,
        ...(this.ring ? { TRELLIS_RING_FD: '3' } : {}),
      },
      stdio: ['ignore', 'inherit', 'inherit', ...(this.ring ? [this.ring.fd] : [])],
    });
    // The child has its own copy of the descriptor now; the mapping here stays.
    this.ring?.closeFd();
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

export class Node {
  readonly id: string;
  readonly pool: ResourcePool;
  readonly store: ObjectStore;
  readonly workers = new Map<string, WorkerProcess>();
  readonly numGpus: number;
  /** Fixed-point share of each GPU still free, for assigning GPU ids. */
  readonly gpuFree: number[];
  readonly softLimit: number;
  /** Added to every worker's environment (the cluster's MPS pipe directory, say). */
  readonly workerEnvironment: Readonly<Record<string, string>>;

  constructor(options: NodeOptions, index: number, workerEnvironment: Record<string, string> = {}) {
    this.workerEnvironment = workerEnvironment;
    this.id = options.id ?? `node-${index}`;
    const numCpus = options.numCpus ?? 2;
    this.numGpus = options.numGpus ?? 0;
    this.pool = new ResourcePool({
      ...(options.resources ?? {}),
      CPU: numCpus,
      GPU: this.numGpus,
      memory: options.memory ?? 0,
    });
    this.gpuFree = Array.from({ length: this.numGpus }, () => 10_000);
    this.softLimit = Math.max(1, Math.ceil(numCpus));
    this.store = ObjectStore.create({ capacity: options.objectStoreMemory });
  }

  spawnWorker(socketPath: string): WorkerProcess {
    const worker = new WorkerProcess(this, socketPath);
    this.workers.set(worker.id, worker);
    return worker;
  }

  idleWorker(): WorkerProcess | undefined {
    for (const worker of this.workers.values()) if (worker.state === 'idle') return worker;
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

  close(): void {
    for (const worker of this.workers.values()) worker.kill();
    this.store.close();
  }
}
