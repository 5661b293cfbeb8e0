/**
 * A worker process: connects to its driver, attaches its node's store, imports the modules that
 * define remote functions and classes, and runs tasks or one actor. It exits when the driver goes.
 */
import { randomBytes } from 'node:crypto';
import { closeSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { connect, type Socket } from 'node:net';
import { dial } from './tls.js';
import { InvalidArgumentError, ObjectLostError, TaskCancelledError, TaskError, type RemoteErrorInfo } from '../errors.js';
import { ObjectStore, viewPinsHeld } from '../store/object-store.js';
import { newObjectId, returnIdAt, sequentialObjectId, taskPutBase } from '../store/object-id.js';
import { HandleReleaser, ObjectRef, setRefTracker } from './object-ref.js';
import { streamIdsOf, type Waitable } from './object-ref-generator.js';
import { checkRecompute, generatorBackpressureOf, returnsOf, workerEnvironmentOf, type ActorCallOptions, type ActorOptions, type TaskOptions } from './options.js';
import { FrameConnection } from './connection.js';
import { native, type NativeConnectionRing } from '../native.js';
import {
  type CreateActorMessage,
  type DriverMessage,
  type FunctionDescriptor,
  type ReturnValue,
  type TaskMessage,
  type WireValue,
  type WorkerMessage,
} from './protocol.js';
import { actorHandleInfo, importRegistered, lookupRegistered, makeActorHandle } from './registry.js';
import { setRuntime, type ActorLookup, type CallScope, type Runtime, type RuntimeContext } from './runtime-context.js';
import { ArgumentSlot, decodeStored, encodeArguments, encodeValue, pack, putStored, putStoredOnce, restoreTensorsOnDevice, setHandleCodec, unpack, type StoredValue } from './serialization.js';
import { SYSTEM_PREFIX, isImmediateSystemMethod, systemMethod } from './system-methods.js';
import { mapWorkingDirectory } from './code-location.js';
import { DriverRequests } from './requests.js';
import { busyPollTraffic, configureBusyPoll } from './busy-poll.js';
import { claimTrap } from './trap-guard.js';
import { CallQueue } from './call-queue.js';
import { onMetricsPending, takeMetricUpdates } from './user-metrics.js';
// Registers the collective-group system methods in every worker, and NCCL as their backend (a
// worker that loads no public API, an LLM rank's, still joins NCCL groups).
import '../gpu/collective.js';
import '../gpu/nccl.js';
import { holdResult, mapHeld, ownHeld, receiveHeld } from '../gpu/transport.js';
import { closeIdleMappingsOf, closeMappingsOfExporter } from '../gpu/cuda.js';
// Idle blocks this worker exports over IPC go back to the driver on their own (see ipc-reclaim.ts).
import '../gpu/ipc-reclaim.js';
// Registers the compiled-graph exec loop's system methods.
import '../dag/exec-loop.js';
// A Queue sent to this worker is made again here (its class registers how).
import './queue.js';

/** Calls running here, by task id: for the run time each 'done' reports, and for cancel. */
const runningCalls = new Map<string, CurrentTask>();
/** The longest a worker keeps application metrics before reporting them (a call's result reports them sooner). */
const METRICS_REPORT_MS = 1000;
const socketPath = process.env.TRELLIS_SOCKET!;
/** Proves a TCP worker to its head; user code has no need of it. */
const token = process.env.TRELLIS_CLUSTER_TOKEN;
delete process.env.TRELLIS_CLUSTER_TOKEN;
const workerId = process.env.TRELLIS_WORKER_ID!;
const nodeId = process.env.TRELLIS_NODE_ID!;
const store = ObjectStore.attach(process.env.TRELLIS_STORE!);
/** Stored puts are named by a sequence the driver knows, so that it can find unreported ones. */
const putIds = process.env.TRELLIS_PUT_IDS ? Buffer.from(process.env.TRELLIS_PUT_IDS, 'hex') : randomBytes(20);
// The driver's working directory, unpacked on this host (code-package.ts) and this worker's
// working directory: its modules are imported from here, under the driver's names.
if (process.env.TRELLIS_CODE_ROOT) mapWorkingDirectory(process.env.TRELLIS_CODE_ROOT, pathToFileURL(process.cwd()).href);
let storedPuts = 0;

function errorInfo(error: unknown): RemoteErrorInfo {
  if (error instanceof Error) {
    return { name: error.name, message: error.message, code: (error as { code?: string }).code, stack: error.stack };
  }
  return { name: 'Error', message: String(error) };
}

/** What runs now: its ids, and for a task whose lineage the driver keeps, how its puts are named. */
interface CurrentTask {
  taskId?: string;
  actorId?: string;
  gpuIds: number[];
  argumentsMs?: number;
  returnId?: string;
  /** When it began here (performance.now()). */
  started?: number;
  /** Made when its signal is first asked for (most calls never ask). */
  controller?: AbortController;
  cancelled?: boolean;
  putTag?: number;
  putBase?: Uint8Array;
  puts?: number;
}

class WorkerRuntime implements Runtime {
  readonly #connection: FrameConnection<DriverMessage, WorkerMessage>;
  readonly #requests: DriverRequests;
  /** Handles this process holds, per object id. */
  readonly #handles = new Map<string, number>();
  readonly #releaser = new HandleReleaser((id) => this.#release(id));
  #borrowAdd: string[] = [];
  #borrowDrop: string[] = [];
  #borrowFlush = false;
  /** Set while application metrics wait to be reported. */
  #metricsTimer: NodeJS.Timeout | undefined;
  #nextWatch = 0;
  /** Tasks received and not yet started. */
  readonly queue = new CallQueue();
  current?: CurrentTask;

  constructor(connection: FrameConnection<DriverMessage, WorkerMessage>) {
    this.#connection = connection;
    this.#requests = new DriverRequests((message) => this.send(message));
    onMetricsPending(() => {
      this.#metricsTimer ??= setTimeout(() => {
        this.#sendMetrics();
        this.#connection.flush();
      }, METRICS_REPORT_MS).unref();
    });
  }

  /** Application metrics recorded since the last report, if any, go to the driver. */
  #sendMetrics(): void {
    clearTimeout(this.#metricsTimer);
    this.#metricsTimer = undefined;
    const updates = takeMetricUpdates();
    if (updates) this.#connection.send({ t: 'metrics', updates });
  }

  /** Writes the messages sent so far now (see finishTask). */
  flush(): void {
    this.#connection.flush();
  }

  send(message: WorkerMessage): void {
    // Borrows first: a ref kept from a call's arguments must be counted before the call's 'done'
    // lets the driver drop the arguments (and, with its own handle gone, delete the object).
    this.#sendBorrows();
    if (message.t === 'done') {
      const call = runningCalls.get(message.taskId);
      if (call) {
        runningCalls.delete(message.taskId);
        message.ran = Math.round((performance.now() - call.started!) * 1000);
      }
      // A call's metrics before its result: whoever has the result reads metrics that include it.
      if (this.#metricsTimer) this.#sendMetrics();
    }
    this.#connection.send(message);
  }

  onHandle(ref: ObjectRef<unknown>, alreadyCounted = false): void {
    this.#count(ref.id, !alreadyCounted);
    this.#releaser.track(ref);
  }

  onDispose(ref: ObjectRef<unknown>): void {
    this.#releaser.disposed(ref);
  }

  /** A hold on object `id` that is not a handle (a mapped tensor); returns its release (once). */
  hold(id: string): () => void {
    this.#count(id, true);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.#release(id);
    };
  }

  /** One more hold on `id` here; the first is reported to the driver as a borrow when `borrow`. */
  #count(id: string, borrow: boolean): void {
    const count = this.#handles.get(id) ?? 0;
    this.#handles.set(id, count + 1);
    if (count === 0 && borrow) this.#borrow(id, true);
  }

  #release(id: string): void {
    const count = (this.#handles.get(id) ?? 1) - 1;
    if (count > 0) {
      this.#handles.set(id, count);
      return;
    }
    this.#handles.delete(id);
    this.#borrow(id, false);
  }

  #borrow(id: string, add: boolean): void {
    (add ? this.#borrowAdd : this.#borrowDrop).push(id);
    if (this.#borrowFlush) return;
    this.#borrowFlush = true;
    queueMicrotask(() => {
      this.#borrowFlush = false;
      this.#sendBorrows();
    });
  }

  /**
   * Sends the borrows and drops not yet reported, if any. An id both added and dropped since the
   * last report nets out (a call's argument ref, revived and let go before the call ran): the
   * driver's count would end where it is, and the call holds the object meanwhile.
   */
  #sendBorrows(): void {
    if (this.#borrowAdd.length === 0 && this.#borrowDrop.length === 0) return;
    let add = this.#borrowAdd;
    let drop = this.#borrowDrop;
    this.#borrowAdd = [];
    this.#borrowDrop = [];
    if (add.length > 0 && drop.length > 0) [add, drop] = netOut(add, drop);
    if (add.length === 0 && drop.length === 0) return;
    this.#connection.send({ t: 'borrow', add, drop });
  }

  /** Refs made here for ids the driver already counts for us (submits, puts). */
  #ownedRef(id: string): ObjectRef<unknown> {
    this.#count(id, false);
    setRefTracker(quietTracker);
    const ref = new ObjectRef(id);
    setRefTracker(tracker);
    this.#releaser.track(ref);
    return ref;
  }

  request(op: string, body: unknown): Promise<any> {
    return this.#requests.request(op, body);
  }

  closeIpcMappings(handles: Uint8Array[]): Promise<Uint8Array[]> {
    return this.request('close-ipc', { handles });
  }

  notify(op: string, body: unknown): void {
    this.#requests.notify(op, body);
  }

  onReply(requestId: number, ok: boolean, value: unknown, error?: RemoteErrorInfo): void {
    this.#requests.settle(requestId, ok, value, error);
  }

  /** The driver went away: what waits on it fails with OwnerDiedError. */
  onOwnerDied(): void {
    this.#requests.ownerDied();
  }

  /** Large arguments go to this node's store as objects the driver then owns. */
  #encodeArgs(args: unknown[]): { args: Uint8Array; argRefs: string[]; held: string[] } {
    const { bytes, argRefs, held } = encodeArguments(args, (encoded) => this.#putEncoded(encoded));
    return { args: bytes, argRefs, held };
  }

  submitTask(fn: FunctionDescriptor, args: unknown[], options: TaskOptions, streaming = false): ObjectRef<unknown> {
    // Checked here, before anything is stored: the driver answers a submission with nothing.
    if (options.runtimeEnv !== undefined) workerEnvironmentOf(options.runtimeEnv, `task ${options.name ?? fn.name} runtimeEnv`);
    const stream = streaming ? streamBody(generatorBackpressureOf(options.generatorBackpressure, `task ${options.name ?? fn.name}`)) : {};
    returnsOf(options, streaming, `task ${options.name ?? fn.name}`);
    const returnId = newObjectId();
    this.notify('submit', { fn, ...this.#encodeArgs(args), options, returnId, ...stream });
    return this.#ownedRef(returnId);
  }

  createActor(cls: FunctionDescriptor, args: unknown[], options: ActorOptions, methods: string[]): { actorId: string; lifetime: ObjectRef<unknown> } {
    if (options.runtimeEnv !== undefined) workerEnvironmentOf(options.runtimeEnv, `actor ${cls.name} runtimeEnv`);
    const actorId = `actor-${newObjectId().slice(0, 16)}`;
    this.notify('create-actor', { actorId, cls, ...this.#encodeArgs(args), options, methods });
    // Counted by the driver on creation, as a submit's result is, and dropped with this worker:
    // a worker that dies before its next report leaves no actor behind.
    return { actorId, lifetime: this.#ownedRef(actorId) };
  }

  submitActorTask(actorId: string, method: string, args: unknown[], options: ActorCallOptions = {}, streaming = false): ObjectRef<unknown> {
    const stream = streaming ? streamBody(generatorBackpressureOf(options.generatorBackpressure, `actor method ${method}`)) : {};
    if (streaming && options.recompute) throw new InvalidArgumentError(`actor method ${method} is a generator: its items cannot be made again by a task (recompute)`);
    returnsOf(options, streaming, `actor method ${method}`);
    let recompute: Record<string, unknown> | undefined;
    if (options.recompute) {
      // Sent as the driver keeps it: the function's descriptor and its encoded arguments.
      checkRecompute(options.recompute);
      const { args: bytes, argRefs, held } = this.#encodeArgs(options.recompute.args);
      recompute = { fn: options.recompute.task.descriptor, args: bytes, argRefs, nested: held, options: options.recompute.options ?? {} };
      const { recompute: _, ...rest } = options;
      options = rest;
    }
    const returnId = newObjectId();
    this.notify('actor-call', { actorId, method, ...this.#encodeArgs(args), returnId, options, ...(recompute ? { recompute } : {}), ...stream });
    return this.#ownedRef(returnId);
  }

  returnRef(id: string): ObjectRef<unknown> {
    // Counted by the driver on the submission, as its first return is.
    return this.#ownedRef(id);
  }

  async nextStreamItem(id: string, timeout: number): Promise<ObjectRef<unknown> | undefined> {
    const answer = (await this.request('stream-next', { id, timeout })) as string | null | { error: RemoteErrorInfo & { kind: string } };
    if (answer === null) return undefined;
    if (typeof answer === 'object') throw rebuildError(answer.error, id);
    // The driver counted the item's hold for this worker as it answered.
    return this.#ownedRef(answer);
  }

  closeStream(id: string): void {
    this.notify('stream-close', { id });
  }

  async get(refs: ObjectRef<unknown>[], timeout: number): Promise<unknown[]> {
    // Blocking: a pooled worker hands back tasks not begun, so that they can run elsewhere
    // meanwhile. An actor keeps its queued calls: they belong to its state and its order.
    let returnTasks: string[] = [];
    if (!isActorWorker) {
      returnTasks = this.queue.takeAll().map((task) => task.taskId);
    }
    const values = (await this.request('get', { ids: refs.map((ref) => ref.id), timeout, returnTasks })) as Array<
      WireValue | { error: RemoteErrorInfo & { kind: string } }
    >;
    return Promise.all(
      values.map((value, index) => {
        if ('error' in value) throw rebuildError(value.error, refs[index].id);
        return readWire(value, refs[index].id);
      }),
    );
  }

  getOne(ref: ObjectRef<unknown>, timeout: number): Promise<unknown> {
    return this.get([ref], timeout).then((values) => values[0]);
  }

  put(value: unknown, call?: CallScope): ObjectRef<unknown> {
    return this.#putEncoded(encodeValue(value), call as CurrentTask | undefined);
  }

  currentCall(): CallScope | undefined {
    return this.current?.putTag !== undefined ? this.current : undefined;
  }

  #putEncoded(encoded: ReturnType<typeof encodeValue>, call?: CurrentTask): ObjectRef<unknown> {
    let id: string;
    if ('inline' in encoded) {
      id = newObjectId();
      this.notify('register', { id, value: { inline: encoded.inline }, nested: encoded.nested, size: encoded.inline.byteLength });
    } else {
      // The call named, or the running one where calls run one at a time.
      const current = call ?? (callsOneAtATime ? this.current : undefined);
      if (current?.putTag !== undefined) {
        // A task the driver can rerun: named from its return id and attempt, so that the rerun
        // names it the same. Found already here, it is a copy of this very object (a rerun's).
        current.putBase ??= taskPutBase(current.returnId!, current.putTag);
        id = sequentialObjectId(current.putBase, current.puts!++);
        putStoredOnce(store, id, encoded.stored);
        this.notify('register', { id, value: { node: nodeId, id }, nested: encoded.nested, size: encoded.stored.payload.byteLength, task: current.taskId });
        return this.#ownedRef(id);
      }
      // The sequence advances only on a stored put, and each is registered before the next: if
      // this process dies before its register leaves, the driver finds the object at the id after
      // the last one registered.
      id = sequentialObjectId(putIds, storedPuts);
      putStored(store, id, encoded.stored);
      storedPuts++;
      this.notify('register', { id, value: { node: nodeId, id }, nested: encoded.nested, size: encoded.stored.payload.byteLength });
    }
    return this.#ownedRef(id);
  }

  async wait<R extends Waitable>(refs: readonly R[], numReturns: number, timeout: number): Promise<[R[], R[]]> {
    const streams = [...streamIdsOf(refs)];
    const ready = new Set<string>(await this.request('wait', { ids: refs.map((ref) => ref.id), numReturns, timeout, ...(streams.length > 0 ? { streams } : {}) }));
    return [refs.filter((ref) => ready.has(ref.id)), refs.filter((ref) => !ready.has(ref.id))];
  }

  cancel(ref: { readonly id: string }, force: boolean): void {
    this.notify('cancel', { id: ref.id, force });
  }

  kill(actorId: string, noRestart: boolean): void {
    this.notify('kill', { actorId, noRestart });
  }

  watchActors(actorIds: readonly string[], onDeath: (actorId: string, cause: string) => void): () => void {
    const watchId = this.#nextWatch++;
    let watching = true;
    this.request('watch-actors', { watchId, actorIds }).then(
      (death: { actorId: string; cause: string } | null) => {
        if (watching && death) onDeath(death.actorId, death.cause);
        watching = false;
      },
      () => {
        // The driver is gone: everything fails with it, not through this watch.
      },
    );
    return () => {
      if (!watching) return;
      watching = false;
      this.notify('unwatch-actors', { watchId });
    };
  }

  whenActorProcessGone(): Promise<void> {
    return Promise.resolve();
  }

  getActor(name: string): Promise<ActorLookup> {
    return this.request('get-actor', { name });
  }

  collectGarbageAfter(bytes: number): void {
    collector.collectAfter(bytes);
  }

  context(): RuntimeContext {
    const current = this.current;
    const context = { nodeId, workerId, taskId: current?.taskId, actorId: current?.actorId, gpuIds: current?.gpuIds ?? [], isDriver: false, argumentsMs: current?.argumentsMs };
    // Not enumerable: a context returned or spread stays plain data (a signal cannot be sent), and
    // the signal is made only where asked for.
    return Object.defineProperty(context, 'signal', { enumerable: false, get: () => (current?.taskId === undefined ? undefined : signalOf(current)) });
  }
}

/** A streaming call's backpressure as a submission carries it: null where unbounded. */
function streamBody(backpressure: number): { backpressure: number | null } {
  return { backpressure: backpressure === Infinity ? null : backpressure };
}

function rebuildError(info: RemoteErrorInfo & { kind: string }, id: string): Error {
  if (info.kind === 'TaskError') {
    const error = new TaskError('', { name: 'Error', message: '' });
    error.message = info.message;
    error.stack = info.stack;
    return error;
  }
  return Object.assign(new Error(info.message), { name: info.name, code: info.code, stack: info.stack, objectId: id });
}

/**
 * Zero-copy values pin their objects until garbage-collected, and a worker may not collect for a
 * long time (an idle one, never): the objects stay in the store though nothing uses them. So a
 * worker collects once a task has replied when it has read more than a threshold zero-copy since
 * it last collected (an eighth of the store, or less where a task asks: a data task asks for an
 * eighth of its job's memory budget), and, once idle a moment after reading any, for as long as
 * any view of its still pins an object. That last part must not trust a single collection: one
 * made just after a task can find its values still reachable for a turn or two (the reply's
 * continuations), and an idle worker would hold them for good. So it collects again, at doubling
 * intervals, until no view pins anything; a worker that keeps views on purpose (an actor's state)
 * then collects every half minute while it idles, which costs little.
 * Collecting inside the task would free nothing: its arguments are held until it has replied.
 */
class ZeroCopyCollector {
  readonly #defaultThreshold = Math.max(1 << 20, store.stats().capacity / 8);
  #bytes = 0;
  #requested = Infinity;
  #lastTaskEnded = 0;
  /** One timer for idleness, re-armed lazily: tasks end far more often than the worker idles. */
  #idle: NodeJS.Timeout | undefined;
  /** How long the worker waits, idle, before its next collection. */
  #idleWait = IDLE_COLLECT_MS;
  /** Collections when idle go on: the worker read zero-copy and its views still pin objects. */
  #chasing = false;

  read(bytes: number): void {
    this.#bytes += bytes;
  }

  /** The running task asks for a collection after this many bytes. */
  collectAfter(bytes: number): void {
    this.#requested = Math.min(this.#requested, bytes);
  }

  taskEnded(): void {
    const threshold = Math.min(this.#defaultThreshold, this.#requested);
    this.#requested = Infinity;
    this.#lastTaskEnded = performance.now();
    if (this.#bytes >= threshold) this.#due = true;
    // Also where a collection is due: it comes before the next task, and there may be none (the
    // job's last), when idleness is what collects. A task that read nothing zero-copy starts no
    // collections: an actor that keeps its views (a model's weights) is not collected per call.
    if (this.#bytes > 0) {
      this.#idleWait = IDLE_COLLECT_MS;
      this.#chasing = true;
    }
    if (this.#chasing && !this.#idle) this.#armIdle(this.#idleWait);
  }

  /**
   * Whether the worker should collect before it starts another task. Queued tasks run one after
   * another in promise continuations, never yielding to the event loop while the queue lasts: a
   * collection left to a later turn would not come until the queue ran dry, and the views of every
   * task before would pin their objects until then (under a shuffle, more than the whole store).
   */
  takeDue(): boolean {
    const due = this.#due;
    this.#due = false;
    if (due) this.#bytes = 0;
    return due;
  }
  #due = false;

  #armIdle(delay: number): void {
    this.#idle = setTimeout(() => {
      this.#idle = undefined;
      const idleFor = performance.now() - this.#lastTaskEnded;
      if (idleFor < this.#idleWait) return this.#armIdle(this.#idleWait - idleFor);
      // A running task re-arms the timer as it ends.
      if (running > 0) return;
      if (viewPinsHeld().count === 0) {
        this.#chasing = false;
        return;
      }
      this.#bytes = 0;
      this.#due = false;
      collectGarbage();
      this.#idleWait = Math.min(this.#idleWait * 2, MAX_IDLE_COLLECT_MS);
      this.#armIdle(this.#idleWait);
    }, delay);
    this.#idle.unref();
  }
}

/** `add` and `drop` without the ids they share, counted with multiplicity. */
function netOut(add: string[], drop: string[]): [string[], string[]] {
  const dropped = new Map<string, number>();
  for (const id of drop) dropped.set(id, (dropped.get(id) ?? 0) + 1);
  const kept = add.filter((id) => {
    const count = dropped.get(id) ?? 0;
    if (count === 0) return true;
    dropped.set(id, count - 1);
    return false;
  });
  const left = drop.filter((id) => {
    const count = dropped.get(id) ?? 0;
    if (count === 0) return false;
    dropped.set(id, count - 1);
    return true;
  });
  return [kept, left];
}

/** How long a worker stays without a task ending before it collects what its reads left. */
const IDLE_COLLECT_MS = 100;
/** The longest an idle worker whose views still pin objects waits between collections. */
const MAX_IDLE_COLLECT_MS = 30_000;

function collectGarbage(): void {
  (globalThis as { gc?: () => void }).gc?.();
}

const collector = new ZeroCopyCollector();

/** Errors that are an argument's loss, not the task's own (see DoneMessage.lostArgument). */
const lostArguments = new WeakSet<object>();

function readWire(value: WireValue, id: string): unknown {
  if ('inline' in value) return unpack(value.inline);
  if ('ipc' in value) {
    try {
      return mapHeld(value.ipc, () => runtime.hold(id));
    } catch (error) {
      // The driver sent the handles while the object lived, so the holder's memory is gone: its
      // process died on the way (the driver marks the object lost once it sees the exit).
      const lost = new ObjectLostError(id, `object ${id}'s tensors could not be mapped from the process holding them, which has most likely died: ${(error as Error).message}`);
      lostArguments.add(lost);
      throw lost;
    }
  }
  if ('recv' in value) return receiveHeld(value);
  if ('local' in value) return ownHeld(value.local);
  // A buffer of its own: user code may keep any array or column made from the value, and the
  // object must stay pinned for as long as it does.
  const view = store.getIfSealed(value.id, { ownBuffer: true });
  if (!view) throw new Error(`object ${value.id} is missing from this node's store`);
  collector.read(view.size);
  return decodeStored(view);
}

/**
 * A call's arguments, with top-level refs replaced by their values. Synchronous unless a held
 * tensor has to arrive by a communicator or IPC (then a promise of them all).
 */
function resolveArgs(bytes: Uint8Array, resolved: Record<string, WireValue>): unknown[] | Promise<unknown[]> {
  const args = unpack(bytes) as unknown[];
  let waits = false;
  for (let i = 0; i < args.length; i++) {
    const slot = args[i];
    if (!(slot instanceof ArgumentSlot)) continue;
    const wire = resolved[slot.id];
    // The driver resolves every slot; a handle is what the task would get otherwise.
    const value = wire ? readWire(wire, slot.id) : new ObjectRef(slot.id);
    if (isThenable(value)) waits = true;
    args[i] = value;
  }
  return waits ? Promise.all(args) : args;
}

function isThenable(value: unknown): value is PromiseLike<unknown> {
  return typeof (value as { then?: unknown } | null | undefined)?.then === 'function';
}

/** Sends a result: inline, or stored in this node's store under the task's return id. */
function sendResult(taskId: string, returnId: string, value: unknown): void {
  let encoded;
  try {
    encoded = encodeValue(value);
  } catch (error) {
    runtime.send({ t: 'done', taskId, error: errorInfo(error) });
    return;
  }
  if ('inline' in encoded) {
    runtime.send({ t: 'done', taskId, value: { inline: encoded.inline }, nested: encoded.nested });
    return;
  }
  // A rerun of a task (lineage reconstruction) may find its result here already, as a copy.
  putStoredOnce(store, returnId, encoded.stored);
  runtime.send({ t: 'done', taskId, value: { node: nodeId, id: returnId }, nested: encoded.nested, size: encoded.stored.payload.byteLength });
}

/**
 * Sends the results of a call with several returns: `value` must be an array of `count`, and each
 * goes inline or to the store under its own id (returnIdAt), all in one report. Anything else fails
 * the call (every ref), saying what came back.
 */
function sendReturns(task: TaskMessage, value: unknown, count: number): void {
  if (!Array.isArray(value) || value.length !== count) {
    const got = Array.isArray(value) ? `an array of ${value.length}` : value === null ? 'null' : typeof value === 'object' ? `a ${value.constructor?.name ?? 'object'}` : typeof value;
    throw new TypeError(`${task.name} has numReturns ${count}, so it must return an array of ${count} values; it returned ${got}`);
  }
  const returns: ReturnValue[] = [];
  const stored: Array<[string, StoredValue]> = [];
  for (let index = 0; index < count; index++) {
    const encoded = encodeValue(value[index]);
    const id = returnIdAt(task.returnId, index);
    if ('inline' in encoded) {
      returns.push({ value: { inline: encoded.inline }, nested: encoded.nested });
    } else {
      stored.push([id, encoded.stored]);
      returns.push({ value: { node: nodeId, id }, nested: encoded.nested, size: encoded.stored.payload.byteLength });
    }
  }
  // Stored once all are encoded, and all or none: a value that cannot be encoded or stored leaves
  // nothing behind (the driver, told of a failure, knows of no stored return to delete).
  const written: string[] = [];
  try {
    for (const [id, value] of stored) {
      // A rerun (lineage reconstruction) may find a return here already, as a copy others read.
      const state = store.state(id);
      if (state === 'sealed' || state === 'spilled') continue;
      putStored(store, id, value);
      written.push(id);
    }
  } catch (error) {
    for (const id of written) store.delete(id);
    throw error;
  }
  const [first, ...more] = returns;
  runtime.send({ t: 'done', taskId: task.taskId, value: first!.value, nested: first!.nested, size: first!.size, more });
}

/** The host's device index of each of the node's GPUs, where the node is a slice of its host. */
const hostDevices = process.env.TRELLIS_GPU_DEVICES?.split(',').filter((index) => index !== '').map(Number);

/** CUDA_VISIBLE_DEVICES for the node's GPUs `gpuIds`. */
function visibleDevices(gpuIds: number[]): string {
  return gpuIds.map((id) => hostDevices?.[id] ?? id).join(',');
}

/** What this process inherited, for tasks without GPUs on a pooled worker. */
const inheritedVisibleDevices = process.env.CUDA_VISIBLE_DEVICES;

/**
 * Pooled workers run tasks with different GPU ids one after another: each task sees its own ids,
 * and a task without GPUs sees what a fresh worker would, not the ids of the task before it.
 * Written only when it differs (each write or delete goes through libc's environment lock).
 */
function showGpus(gpuIds: number[]): void {
  const wanted = gpuIds.length > 0 ? visibleDevices(gpuIds) : inheritedVisibleDevices;
  if (process.env.CUDA_VISIBLE_DEVICES === wanted) return;
  if (wanted === undefined) delete process.env.CUDA_VISIBLE_DEVICES;
  else process.env.CUDA_VISIBLE_DEVICES = wanted;
}

let actorInstance: any;
/** Set before the constructor runs: its get() must not hand queued calls back either. */
let isActorWorker = false;
/** Calls run strictly one after another here (no maxConcurrency above 1, no concurrency groups). */
let callsOneAtATime = true;
let running = 0;
let pumping = false;
/** The worker is ending (an error nothing caught): it reports why, and starts no more tasks. */
let dying = false;
/** Set once a trap failed the running tasks: the worker ends when the last of them has replied. */
let endAfterRunning: Error | undefined;
/** A collection is under way between tasks (see ZeroCopyCollector.takeDue). */
let collecting = false;

/**
 * Runs a task or actor call. A synchronous function with arguments at hand runs and reports
 * here, without a promise: a sync call's latency is mostly such hops. What needs to wait
 * (held tensors, a module import, an async function) continues asynchronously.
 */
function runTask(task: TaskMessage): void {
  running++;
  const started = performance.now();
  runtime.current =
    task.putTag === undefined
      ? { taskId: task.taskId, actorId: task.actorId, gpuIds: task.gpuIds ?? runtime.current?.gpuIds ?? [], started }
      : { taskId: task.taskId, actorId: task.actorId, gpuIds: task.gpuIds ?? runtime.current?.gpuIds ?? [], started, returnId: task.returnId, putTag: task.putTag, puts: 0 };
  runningCalls.set(task.taskId, runtime.current);
  if (!task.actorId) showGpus(task.gpuIds ?? []);
  const system = task.method?.startsWith(SYSTEM_PREFIX) ? systemMethod(task.method) : undefined;
  let outcome: unknown;
  const current = runtime.current;
  try {
    const args = resolveArgs(task.args, task.resolved);
    if (isThenable(args)) {
      outcome = args.then((resolved) => {
        current.argumentsMs = performance.now() - started;
        // Other calls may have started meanwhile: this one is current as it begins.
        runtime.current = current;
        return invoke(task, system, resolved);
      });
    } else {
      current.argumentsMs = performance.now() - started;
      outcome = invoke(task, system, args);
    }
    if (task.stream) outcome = isThenable(outcome) ? Promise.resolve(outcome).then((made) => produce(task, made)) : produce(task, outcome);
  } catch (error) {
    finishTask(task, system, started, true, error);
    return;
  }
  if (isThenable(outcome)) {
    Promise.resolve(outcome).then(
      (result) => finishTask(task, system, started, false, result),
      (error: unknown) => finishTask(task, system, started, true, error),
    );
  } else {
    finishTask(task, system, started, false, outcome);
  }
}

function invoke(task: TaskMessage, system: ((...args: unknown[]) => unknown) | undefined, args: unknown[]): unknown {
  // System methods see the actor (if any) as `this`: exec loops call its methods.
  if (system) return system.apply(actorInstance, args);
  if (task.actorId) {
    const method = actorInstance?.[task.method!];
    if (typeof method !== 'function') throw new TypeError(`actor has no method '${task.method}'`);
    return method.apply(actorInstance, args);
  }
  const fn = lookupRegistered(task.fn!) as ((...a: unknown[]) => unknown) | undefined;
  if (fn) return fn(...args);
  return loadRegistered(task.fn!).then((loaded) => (loaded as (...a: unknown[]) => unknown)(...args));
}

/**
 * Messages sent in one tick leave in one write at its end, but a task that finishes inside a
 * promise continuation starts the next queued one in that same tick: a call loop of long async
 * calls (an actor's batches) would hold every result back until its queue ran dry, and the
 * driver, seeing nothing done, would send no more work meanwhile. So a task that ran this long
 * writes its result at once; short ones still share a write.
 */
const FLUSH_AFTER_MS = 1;

/** `outcome` is the result, or what was thrown when `failed`; `started` is when the task began. */
function finishTask(task: TaskMessage, system: unknown, started: number, failed: boolean, outcome: unknown): void {
  try {
    if (failed) {
      const lostArgument = lostArguments.has(outcome as object) ? (outcome as ObjectLostError).objectId : undefined;
      runtime.send({ t: 'done', taskId: task.taskId, error: errorInfo(outcome), ...(lostArgument ? { lostArgument } : {}) });
    } else {
      const result = outcome;
      if (isGeneratorObject(result)) {
        throw new TypeError(`${task.name} returned a generator, but was called as a plain function: declare it function* or async function* (its callers then get an ObjectRefGenerator), rather than returning one`);
      }
      const kept = task.tensorTransport && task.tensorTransport !== 'store' && !system && task.numReturns === undefined ? holdResult(task.returnId, result, task.tensorTransport) : undefined;
      if (task.numReturns !== undefined && !system) sendReturns(task, result, task.numReturns);
      else if (kept) runtime.send({ t: 'done', taskId: task.taskId, value: { inline: pack(null) }, nested: kept.nested.length > 0 ? kept.nested : undefined, held: { transport: task.tensorTransport!, meta: kept.meta } });
      else sendResult(task.taskId, task.returnId, result);
    }
  } catch (failure) {
    runtime.send({ t: 'done', taskId: task.taskId, error: errorInfo(failure) });
  } finally {
    running--;
    runtime.queue.ended(task);
    if (endAfterRunning && running === 0) die(endAfterRunning);
    collector.taskEnded();
    if (runtime.queue.length > 0 && performance.now() - started >= FLUSH_AFTER_MS) runtime.flush();
    pump();
  }
}

/** A streaming call running here: how many items its caller took, and how to wake or stop it. */
interface Production {
  taken: number;
  stopped: boolean;
  wake?: () => void;
}

const productions = new Map<string, Production>();
/** Streaming calls told to stop while still queued here. */
const stopsBeforeStart = new Set<string>();

/**
 * Runs a streaming call's generator: each item is stored (or kept inline) and reported as it comes,
 * then the call's result is their count. A retry skips the items its caller already has; the
 * generator pauses while it is `backpressure` items ahead of its caller, and is closed (its
 * finally blocks run) when the caller lets go.
 */
async function produce(task: TaskMessage, made: unknown): Promise<number> {
  const spec = task.stream!;
  const iterator = iteratorOf(made, task.name);
  const production: Production = { taken: spec.taken, stopped: stopsBeforeStart.delete(task.taskId) };
  productions.set(task.taskId, production);
  let index = 0;
  try {
    for (;;) {
      if (production.stopped) {
        await iterator.return?.(undefined);
        break;
      }
      const step = await iterator.next();
      if (step.done) break;
      if (index >= spec.skip) {
        try {
          // A synchronous generator's items may be promises, as for await reads them.
          sendItem(task, index, isThenable(step.value) ? await step.value : step.value);
          // Each item leaves as it is yielded: left for the end of the loop's turn, a generator
          // that never yields the loop (a synchronous one) would hold them all back, and a
          // process that dies would lose them.
          runtime.flush();
        } catch (error) {
          // An item that cannot be sent ends the call: the generator's finally blocks still run.
          await Promise.resolve(iterator.return?.(undefined)).catch(() => undefined);
          throw error;
        }
      }
      index++;
      while (spec.backpressure !== undefined && index - production.taken >= spec.backpressure && !production.stopped) {
        await new Promise<void>((resolve) => {
          production.wake = resolve;
        });
        production.wake = undefined;
      }
    }
  } finally {
    productions.delete(task.taskId);
  }
  return index;
}

function iteratorOf(made: unknown, name: string): Iterator<unknown> | AsyncIterator<unknown> {
  const target = made as { [Symbol.asyncIterator]?: () => AsyncIterator<unknown>; [Symbol.iterator]?: () => Iterator<unknown> } | null | undefined;
  if (typeof target?.[Symbol.asyncIterator] === 'function') return target[Symbol.asyncIterator]!();
  if (typeof target?.[Symbol.iterator] === 'function' && typeof made !== 'string') return target[Symbol.iterator]!();
  throw new TypeError(`${name} was called as a generator but returned ${made === null ? 'null' : typeof made}, which yields nothing`);
}

function isGeneratorObject(value: unknown): boolean {
  const tag = Object.prototype.toString.call(value);
  return tag === '[object Generator]' || tag === '[object AsyncGenerator]';
}

/** Item `index` of a streaming call: inline, or stored under the next id of this worker's puts; then reported. */
function sendItem(task: TaskMessage, index: number, value: unknown): void {
  const encoded = encodeValue(value);
  const nested = encoded.nested.length > 0 ? { nested: encoded.nested } : {};
  if ('inline' in encoded) {
    runtime.send({ t: 'yield', taskId: task.taskId, index, value: { inline: encoded.inline }, ...nested });
    return;
  }
  // Under the next id of this worker's puts (see the driver's #onYield), reported before another.
  const id = sequentialObjectId(putIds, storedPuts);
  putStored(store, id, encoded.stored);
  storedPuts++;
  runtime.send({ t: 'yield', taskId: task.taskId, index, value: { node: nodeId, id }, ...nested, size: encoded.stored.payload.byteLength });
}

function onStreamTaken(taskId: string, taken: number): void {
  const production = productions.get(taskId);
  if (!production) return;
  production.taken = Math.max(production.taken, taken);
  production.wake?.();
}

/** The cancellation signal of a running call, made on first use (aborted already if it was cancelled). */
function signalOf(call: CurrentTask): AbortSignal {
  if (!call.controller) {
    call.controller = new AbortController();
    if (call.cancelled) call.controller.abort(new TaskCancelledError(`call ${call.taskId} was cancelled`));
  }
  return call.controller.signal;
}

/**
 * cancel() without force: a call still queued here never starts (its 'done' tells the driver,
 * whose accounting of this worker's calls waits for it); a running one has its signal aborted.
 */
function onCancel(taskId: string): void {
  const queued = runtime.queue.remove(taskId);
  if (queued) {
    // A stream told to stop while queued will never start either.
    stopsBeforeStart.delete(taskId);
    runtime.send({ t: 'done', taskId, error: { name: 'TaskCancelledError', message: `${queued.name} was cancelled before it started` } });
    return;
  }
  const call = runningCalls.get(taskId);
  if (!call || call.cancelled) return;
  call.cancelled = true;
  call.controller?.abort(new TaskCancelledError(`call ${taskId} was cancelled`));
}

function onStreamStop(taskId: string): void {
  const production = productions.get(taskId);
  if (production) {
    production.stopped = true;
    production.wake?.();
    return;
  }
  for (const queued of runtime.queue) {
    if (queued.taskId === taskId) {
      stopsBeforeStart.add(taskId);
      return;
    }
  }
}

/**
 * Runs an immediate system method (see isImmediateSystemMethod) at once, outside the actor's queue
 * and without becoming the current task; false for any other call.
 */
function runImmediately(task: TaskMessage): boolean {
  const method = isImmediateSystemMethod(task.method!) ? systemMethod(task.method!) : undefined;
  if (!method) return false;
  try {
    sendResult(task.taskId, task.returnId, method.apply(actorInstance, unpack(task.args) as unknown[]));
  } catch (error) {
    runtime.send({ t: 'done', taskId: task.taskId, error: errorInfo(error) });
  }
  return true;
}

/** Starts queued tasks while concurrency allows; iterative, since a sync task finishes inside it. */
function pump(): void {
  // A dying worker starts nothing more: the driver runs what it had queued here elsewhere.
  if (pumping || collecting || dying) return;
  if (collector.takeDue()) {
    // Collect in a turn of its own, then give the loop one more turn, in which the collected
    // views' finalizers unpin their objects, before the next task starts.
    collecting = true;
    setImmediate(() => {
      collectGarbage();
      setImmediate(() => {
        collecting = false;
        pump();
      });
    });
    return;
  }
  pumping = true;
  try {
    for (let task = runtime.queue.next(); task; task = runtime.queue.next()) runTask(task);
  } finally {
    pumping = false;
  }
}

async function loadRegistered(descriptor: FunctionDescriptor): Promise<unknown> {
  const target = await importRegistered(descriptor);
  if (!target) {
    throw new Error(
      `'${descriptor.name}' is not registered in ${descriptor.module}: remote() must be called at that module's top level, and the module loaded as an ES module (its package.json says "type": "module"; as CommonJS it registers with a copy of trellis of its own)`,
    );
  }
  return target;
}

async function startActor(message: CreateActorMessage): Promise<void> {
  isActorWorker = true;
  runtime.queue.configure(message.maxConcurrency, message.concurrencyGroups);
  callsOneAtATime = message.maxConcurrency === 1 && !message.concurrencyGroups;
  runtime.current = { actorId: message.actorId, gpuIds: message.gpuIds ?? [] };
  if (message.gpuIds && message.gpuIds.length > 0) process.env.CUDA_VISIBLE_DEVICES = visibleDevices(message.gpuIds);
  try {
    const cls = (await loadRegistered(message.cls)) as new (...args: unknown[]) => unknown;
    const args = await resolveArgs(message.args, message.resolved);
    actorInstance = new cls(...args);
    runtime.send({ t: 'actor-ready', actorId: message.actorId });
  } catch (error) {
    runtime.send({ t: 'actor-ready', actorId: message.actorId, error: errorInfo(error) });
  }
}

/** A Unix socket's path, or tcp://host:port for a worker of a node agent (remote-node.ts). */
const socket = socketPath.startsWith('tcp://') ? connectTcp(socketPath) : connect(socketPath);

function connectTcp(address: string): Socket {
  const url = new URL(address);
  // Frames written before a TLS handshake ends wait in the socket.
  return dial(url.hostname.replace(/^\[|\]$/g, ''), Number(url.port)).socket;
}
/** The connection's shared memory, from the driver (see connection.ts). */
const ring = openRing();

function openRing(): NativeConnectionRing | undefined {
  const fd = Number(process.env.TRELLIS_RING_FD);
  if (!Number.isInteger(fd) || fd < 0) return undefined;
  delete process.env.TRELLIS_RING_FD;
  try {
    return native.ConnectionRing.open(fd);
  } finally {
    closeSync(fd);
  }
}
const connection = new FrameConnection<DriverMessage, WorkerMessage>(
  socket,
  (message) => {
    switch (message.t) {
      case 'task':
        if (message.method !== undefined && runImmediately(message)) return;
        runtime.queue.push(message);
        pump();
        return;
      case 'actor':
        void startActor(message);
        return;
      case 'reply':
        runtime.onReply(message.requestId, message.ok, message.value, message.error);
        return;
      case 'close-ipc':
        runtime.send({ t: 'closed-ipc', requestId: message.requestId, inUse: closeIdleMappingsOf(message.handles) });
        return;
      case 'exporter-gone':
        closeMappingsOfExporter(message.processId);
        return;
      case 'stream-taken':
        onStreamTaken(message.taskId, message.taken);
        return;
      case 'stream-stop':
        onStreamStop(message.taskId);
        return;
      case 'cancel':
        onCancel(message.taskId);
        return;
      case 'exit':
        process.exit(0);
    }
  },
  () => {
    // The driver is gone, and with it every object (it owns them all): pending gets and waits
    // fail with OwnerDiedError rather than hang. Their handlers run (microtasks come before the
    // check phase), then the worker exits, with nothing left to work for.
    runtime.onOwnerDied();
    setImmediate(() => process.exit(0));
  },
  busyPollTraffic,
);
configureBusyPoll();
const runtime = new WorkerRuntime(connection);
const tracker = {
  onHandleCreated: (ref: ObjectRef<unknown>) => runtime.onHandle(ref),
  onHandleDisposed: (ref: ObjectRef<unknown>) => runtime.onDispose(ref),
};
// For refs whose count the driver already took on this worker's behalf (submits, puts).
const quietTracker = { onHandleCreated: () => {}, onHandleDisposed: tracker.onHandleDisposed };
setRefTracker(tracker);
setRuntime(runtime);
restoreTensorsOnDevice(true);
setHandleCodec({
  isHandle: (value) => actorHandleInfo(value) !== undefined,
  write: (value) => {
    const info = (value as { handle: unknown }).handle;
    const { actorId, descriptor, methods } = actorHandleInfo(info)!;
    return [actorId, descriptor.module, descriptor.name, methods];
  },
  read: (data) => {
    const [actorId, module, name, methods] = data as [string, string, string, string[]];
    return makeActorHandle(actorId, { module, name }, methods);
  },
});
/** An uncaught error in a line: its name and message, and where it was thrown. */
function describeUncaught(error: unknown): string {
  if (!(error instanceof Error)) return `throw of ${typeof error === 'string' ? JSON.stringify(error.slice(0, 300)) : String(error).slice(0, 300)}`;
  const frame = error.stack?.split('\n').find((line) => line.trimStart().startsWith('at '))?.trim();
  return `${error.name}: ${error.message.slice(0, 500)}${frame ? ` (${frame})` : ''}`;
}

// An error nothing caught (a throw in a timer or callback, a native module's panic) ends the
// worker as it would have, but the driver hears why first, to name it in the errors of the tasks
// and actor that die with it (else all it knows is an exit code).
process.on('uncaughtException', (error) => {
  if (dying) return;
  if (claimTrap(error)) {
    // The running tasks fail with the trap and reply; the worker ends after them.
    process.stderr.write(`trellis worker (pid ${process.pid}): a WebAssembly trap failed the running tasks; this worker ends after they reply: ${error.stack ?? String(error)}\n`);
    endAfterRunning = error;
    if (running === 0) die(error);
    return;
  }
  process.stderr.write(`trellis worker (pid ${process.pid}): uncaught ${error instanceof Error ? (error.stack ?? String(error)) : String(error)}\n`);
  die(error);
});

function die(error: unknown): void {
  if (dying) return;
  dying = true;
  runtime.send({ t: 'fatal', error: describeUncaught(error) });
  setTimeout(() => process.exit(1), 1000).unref();
  void connection.flushed().finally(() => process.exit(1));
}

// User modules import the public API. A worker loads it before its hello, so that a worker the
// driver counts as ready runs its first task (an actor's constructor, say) without a second of
// module loading and transpiling first, competing for the CPUs with the work already running.
// A worker started for a library actor that needs less (an LLM rank) loads only its class's
// module, when the actor is made (TRELLIS_WORKER_PRELOAD=0; see isLightActorModule).
(process.env.TRELLIS_WORKER_PRELOAD === '0' ? Promise.resolve() : import('../index.js'))
  .catch(() => undefined)
  .finally(() => {
    runtime.send({ t: 'hello', workerId, pid: process.pid, ...(token ? { token } : {}) });
    // The hello goes by socket (it tells the driver whose ring this is); the rest by the ring.
    connection.flush();
    if (ring) connection.attachRing(ring);
  });
