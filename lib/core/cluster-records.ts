/**
 * The driver's records of what it owns and runs: objects, tasks (and the streams of generator
 * calls), and actors. The cluster keeps one map of each; the scheduler reads tasks' requests.
 */
import type { Deque } from './deque.js';
import type { ActorOptions, SchedulingStrategy, TaskOptions, WorkerEnvironment } from './options.js';
import type { FunctionDescriptor, HeldMeta, StreamSpec, WireValue } from './protocol.js';
import type { Node, WorkerProcess } from './node.js';
import type { Placement } from './scheduler.js';
import type { TaskAttempt } from './task-events.js';

export interface ObjectRecord {
  id: string;
  state: 'pending' | 'ready' | 'failed';
  value?: WireValue;
  error?: Error;
  /** Nodes whose store holds a copy (stored values only). */
  nodes: Set<string>;
  size: number;
  holds: number;
  nested?: string[];
  /** The task that returned it: rerunning the task makes it again. */
  lineage?: TaskRecord;
  /** The task that put it while running: a rerun of the task puts it again under this id. */
  madeBy?: TaskRecord;
  /** The streaming call that yielded it (its name; the call is not kept to make it again). */
  yieldedBy?: string;
  /**
   * Lineages that can rerun with this as an argument. The value itself is kept only while real
   * holds remain (or where it could not be made again); then just the record, to recompute from.
   */
  lineageHolds?: number;
  /** Made on the first wait: most results are read once, by a get that finds them pending. */
  waiters?: Array<() => void>;
  /** Tensors still held by the actor that made them (tensor transport). */
  held?: { actorId: string; transport: string; meta: HeldMeta };
  /** CUDA IPC handles of held tensors, once exported. */
  ipcHandles?: unknown[];
  /**
   * The actor that held this object's tensors before they were brought into the store: it keeps
   * them until the object's last ref goes, as readers may still map them by IPC.
   */
  retiredBy?: string;
  materializing?: Promise<void>;
  /** Copies under way into other nodes' stores, by node id. */
  copying?: Map<string, Promise<void>>;
  /** The node that left holding the last copy, if that is how the value was lost. */
  lostWith?: string;
}

export interface TaskRecord {
  taskId: string;
  name: string;
  fn?: FunctionDescriptor;
  actorId?: string;
  method?: string;
  args: Uint8Array;
  /** Top-level ref arguments, resolved before the task runs. */
  argRefs: string[];
  /** Refs nested in the arguments (not resolved before the task runs). */
  nested: string[];
  /** Refs held for the task's life, and for its result's life when it can be recomputed. */
  held: string[];
  /** Arguments that can be made again: once the task is done, its lineage keeps just their records. */
  lineageHeld?: string[];
  /** Records whose lineage (or madeBy) this task is: its arguments stay held while any is. */
  keptBy: number;
  /** Stored puts registered in the attempt named by putTag. */
  putIds?: string[];
  /** The attempt its puts are named by (see taskPutBase); fixed for a rerun, so they match. */
  putTag?: number;
  /** A rerun made to recompute lost objects: its puts keep the attempt number of the run it repeats. */
  rerun?: boolean;
  /** An actor call whose output a task can make again (ActorCallOptions.recompute). */
  rerunAs?: RerunSpec;
  failed?: boolean;
  options: TaskOptions;
  returnId: string;
  request: Map<string, number>;
  classKey: string;
  /** The variables of the workers it runs in (its runtimeEnv). */
  environment: WorkerEnvironment;
  strategy: SchedulingStrategy;
  maxRetries: number;
  retryExceptions: boolean;
  attempts: number;
  state: 'waiting' | 'queued' | 'running' | 'done';
  worker?: WorkerProcess;
  cancelled?: boolean;
  pendingSince: number;
  /** When its current attempt went to a worker (performance.now()). */
  runningSince?: number;
  warned?: boolean;
  tensorTransport?: string;
  /** An actor call's concurrency group (none: the actor's default group). */
  concurrencyGroup?: string;
  /** Held tensors among the arguments are being materialized or exported. */
  preparing?: boolean;
  /** A call to a generator: the items it yielded, for its caller to take. */
  stream?: StreamRecord;
  /** A call with several returns (2 or more): each its own record, named by returnIdAt. */
  numReturns?: number;
  /** Its attempts that ended (listTasks, timeline). */
  attemptLog?: TaskAttempt[];
  /** How long its last attempt ran on its worker, in seconds (the duration histogram's). */
  ranSeconds?: number;
}

/**
 * A streaming call's items (see ObjectRefGenerator), under the call's return id. Each item is an
 * object the driver owns like a task's result, held by the stream until its caller takes it (the
 * hold then passes to the caller's ref). Items cannot be made again from lineage: one lost with its
 * node is lost for good. A retry (worker death, or a throw with retryExceptions) runs the generator
 * again from its start and sends only the items after those reported: generators must yield the
 * same items in the same order each run to be retried.
 */
export interface StreamRecord {
  id: string;
  task: TaskRecord;
  /** Item ids in yield order; those from `taken` on are held by the stream. */
  items: string[];
  taken: number;
  /** The most items the producer may be ahead of the caller (Infinity: unbounded). */
  backpressure: number;
  /** The producer ended: returned (no error) or failed for good. */
  end?: { error?: Error };
  /** The caller let go: items are no longer kept, and the producer is told to stop. */
  closed?: boolean;
  /** next() calls waiting for an item or the end. */
  waiters?: Array<() => void>;
}

/** A task that makes a result again: its function, encoded arguments and options. */
export interface RerunSpec {
  fn: FunctionDescriptor;
  args: Uint8Array;
  argRefs: string[];
  nested: string[];
  options: TaskOptions;
  /** Actors that would make the same for the same call (a pool's), to rerun it on while alive. */
  peers?: () => ReadonlyArray<{ readonly actorId: string }>;
}

export interface ActorRecord {
  id: string;
  name: string;
  registeredName?: string;
  cls: FunctionDescriptor;
  methods: string[];
  args: Uint8Array;
  argRefs: string[];
  held: string[];
  options: ActorOptions;
  request: Map<string, number>;
  /** The variables of its process (its runtimeEnv). */
  environment: WorkerEnvironment;
  state: 'pending' | 'starting' | 'alive' | 'restarting' | 'dead';
  worker?: WorkerProcess;
  node?: Node;
  placement?: Placement;
  gpuIds: number[];
  restarts: number;
  /** Calls in submission order not yet sent. */
  queue: Deque<TaskRecord>;
  /** Calls sent and not finished. */
  running: Map<string, TaskRecord>;
  callNames: Map<string, string>;
  deathCause?: string;
  /** No handle to it is left: it ends once its calls are done and no result it holds is read. */
  unreferenced?: boolean;
}

/** "Class.method", made once per actor and method (a fresh string per call is copied into each frame). */
export function callName(actor: ActorRecord, method: string): string {
  let name = actor.callNames.get(method);
  if (name === undefined) actor.callNames.set(method, (name = `${actor.name}.${method}`));
  return name;
}

/** The empty node set every record starts with (most values are inline and never get one). */
class NoNodes extends Set<string> {
  override add(): this {
    throw new Error('internal error: the shared empty node set was added to');
  }
}
export const NO_NODES: Set<string> = new NoNodes();

export function addNode(record: ObjectRecord, nodeId: string): void {
  if (record.nodes === NO_NODES) record.nodes = new Set();
  record.nodes.add(nodeId);
}

export function lostWhere(record: ObjectRecord): string {
  return record.lostWith ? `was lost with node ${record.lostWith}, which left the cluster holding its only copy` : 'was lost from the object store';
}

/** What a streaming call's next attempt is told: what to skip, what was taken, how far ahead it may go. */
export function streamSpec(stream: StreamRecord): StreamSpec {
  return { skip: stream.items.length, taken: stream.taken, ...(stream.backpressure !== Infinity ? { backpressure: stream.backpressure } : {}) };
}

/** The store id of a stored value: its own id, or the id it was materialized under. */
export function storedIdOf(record: ObjectRecord): string {
  return record.value && 'node' in record.value ? record.value.id : record.id;
}
