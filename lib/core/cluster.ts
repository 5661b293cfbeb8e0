/**
 * The driver's embedded cluster: head services (object directory, actor registry, the scheduler
 * of scheduler.ts) and one node (store segment and worker pool) per logical node. The driver owns
 * every object: it counts handles (its own, workers' borrows, tasks' arguments, containing values)
 * and keeps each task's lineage while its result is referenced. Its records are in
 * cluster-records.ts, streaming calls' items in streams.ts, the memory summary in memory-summary.ts.
 */
import { EventEmitter } from 'node:events';
import { createServer, type Server, type Socket } from 'node:net';
import { rmSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  TrellisError,
  ActorDiedError,
  GetTimeoutError,
  InfeasibleTaskError,
  InvalidArgumentError,
  NodeLostError,
  ObjectLostError,
  RegistrationError,
  TaskCancelledError,
  TaskError,
  WorkerCrashedError,
  type RemoteErrorInfo,
} from '../errors.js';
import { isObjectId, newObjectId, returnIdAt, taskPutBase } from '../store/object-id.js';
import type { StoreStats } from '../store/object-store.js';
import { HandleReleaser, ObjectRef, setRefTracker } from './object-ref.js';
import { streamIdsOf, type Waitable } from './object-ref-generator.js';
import type { ActorCallOptions, ActorOptions, TaskOptions, WorkerEnvironment } from './options.js';
import { DEFAULT_WORKER_ENVIRONMENT, checkActorConcurrency, checkConcurrencyGroup, checkRecompute, generatorBackpressureOf, requestOf, returnsOf, workerEnvironmentOf } from './options.js';
import { FrameConnection } from './connection.js';
import {
  type DriverMessage,
  type FunctionDescriptor,
  type HeldMeta,
  type ReturnValue,
  type WireValue,
  type WorkerMessage,
  type YieldMessage,
} from './protocol.js';
import { LocalNode, Node, WorkerProcess, type NodeOptions } from './node.js';
import { RemoteNode } from './remote-node.js';
import { AGENT_PROTOCOL, type AgentHelloMessage, type AgentMessage, type HeadMessage } from './agent-protocol.js';
import { storeSource, storeTarget, transferObject } from './object-transfer.js';
import { NodeListener, type ListenOptions } from './node-listener.js';
import { PlacementGroup, infeasibility as groupInfeasibility, loseNode, releaseGroup, reserve, reserveLost, type PlacementGroupOptions, type PlacementStrategy } from './placement-group.js';
import type { BrokerInfo, ClusterOptions } from './broker-client.js';
import { describeResources, toFixed, type Resources } from './resources.js';
import type { ActorLookup, Runtime, RuntimeContext } from './runtime-context.js';
import { decodeStored, encodeArguments, encodeValue, pack, putStored, unpack } from './serialization.js';
import { Deque } from './deque.js';
import { isLightActorModule } from './worker-loader.js';
import { Scheduler, type Lease } from './scheduler.js';
import { StreamTable } from './streams.js';
import { NO_NODES, addNode, callName, lostWhere, storedIdOf, streamSpec, type ActorRecord, type ObjectRecord, type RerunSpec, type TaskRecord } from './cluster-records.js';
import { summarizeMemory, type MemorySummary } from './memory-summary.js';
import { addMetricUpdates } from './user-metrics.js';
import { EndedTasks, taskFilter, traceEvents, type ListTasksOptions, type TaskAttempt, type TaskInfo, type TraceEvent } from './task-events.js';
import { MAX_BUSY_POLL_US, busyPollTraffic, configureBusyPoll } from './busy-poll.js';
import { MAX_RECLAIM_IPC_AFTER_MS, configureIpcReclaim } from '../gpu/ipc-reclaim.js';
import { MultiProcessService } from '../gpu/mps.js';
import { isImmediateSystemMethod } from './system-methods.js';
import { checkRangeOption } from './settings.js';
import { checkRuntimeEnvironment, jobRuntimeEnvironment, packWorkingDirectory, packageTotals, type PackedWorkingDirectory, type RuntimeEnvironment } from './code-package.js';
import { closeIdleMappingsOf, closeMappingsOfExporter } from '../gpu/cuda.js';
import { onProcessExit, removeStaleEntries } from '../process-exit.js';

/**
 * How long a close-ipc round waits for a worker's answer (see closeIpcMappings);
 * TRELLIS_CLOSE_IPC_TIMEOUT_MS sets another.
 */
function closeIpcTimeoutMs(): number {
  const chosen = Number(process.env.TRELLIS_CLOSE_IPC_TIMEOUT_MS);
  return Number.isFinite(chosen) && chosen > 0 ? chosen : 10_000;
}

/** Actor calls hold no resources of their own (the actor holds them) and retry per actor. */
const ACTOR_CALL_OPTIONS: TaskOptions = Object.freeze({ numCpus: 0, maxRetries: 0 });

/** The driver's socket for its workers: `trellis-<driver pid>-<8 hex digits>.sock` in the temp directory. */
const SOCKET_NAME = /^trellis-(\d+)-[0-9a-f]{8}\.sock$/;

/**
 * Options of a task or actor a worker submitted: without a runtimeEnv of their own, they run with
 * the submitting worker's (as Ray's children inherit their parent's runtime environment).
 */
function inheritEnvironment<T extends TaskOptions | ActorOptions>(options: T, worker: WorkerProcess): T {
  if (options?.runtimeEnv !== undefined || !worker.environment.env) return options;
  return { ...options, runtimeEnv: { env: { ...worker.environment.env } } };
}

/** Actor ids share the namespace of holds with object ids (hex), told apart by their prefix. */
function isActorId(id: string): boolean {
  return id.startsWith('actor-');
}

export interface InitOptions extends NodeOptions {
  /** Several logical nodes on this host, each with its own resources, worker pool and store. */
  nodes?: NodeOptions[];
  /**
   * Workers started per node before the first task (default: the node's CPU count, while the
   * nodes' together stay within the host's cores; at least one per node).
   */
  prestartWorkers?: number;
  /**
   * How many ended tasks and actor calls listTasks() and timeline() remember, the last ones
   * (default 10,000; 0: none, only those not yet ended).
   */
  keepEndedTasks?: number;
  /**
   * How worker processes share a GPU. 'time-slice' (the default): each has a GPU context of its
   * own and the GPU switches between them. 'mps': CUDA's Multi-Process Service, started for this
   * cluster and stopped with it; workers join it as clients, share one context (no switch between
   * a producer's work and its reader's) and their work can overlap. Needs nvidia-cuda-mps-control
   * (or TRELLIS_MPS_CONTROL); without it init fails with CudaError ERR_MPS_UNAVAILABLE.
   */
  gpuSharing?: 'time-slice' | 'mps';
  /**
   * The longest a process of the cluster spins for an expected answer before its event loop
   * sleeps, in microseconds (0: never). Default: TRELLIS_BUSY_POLL_US, else 1000 on hosts with 8
   * cores or more and 0 below (see busy-poll.ts).
   */
  busyPollMicros?: number;
  /**
   * How long a block exported over CUDA IPC stays free in its producer's cache before it goes back
   * to the CUDA driver, once no process maps it, in milliseconds (0: only on reclaimIpcMemory(),
   * cuda.emptyCache() or an allocation out of memory). Default: TRELLIS_RECLAIM_IPC_AFTER_MS, else
   * 10 s (see ipc-reclaim.ts).
   */
  reclaimIpcAfterMs?: number;
  /**
   * Whether what workers on node agents print comes to this process's stdout and stderr, each
   * line led by `(node pid=…)` (default true; false leaves it on the agents' hosts). Workers on
   * this host's nodes print here in any case.
   */
  logToDriver?: boolean;
  /**
   * Lets node agents on other hosts join this cluster (`trellis node --head HOST:PORT`): the
   * driver listens on TCP for them and for their workers. See ListenOptions.
   */
  listen?: ListenOptions;
  /**
   * Joins a shared cluster: asks its broker (`trellis broker`) for bundles of its hosts, which
   * join this driver's cluster as nodes until it shuts down. See ClusterOptions.
   */
  cluster?: ClusterOptions;
  /**
   * What every worker runs with, on every host: a working directory shipped to each host (its
   * workers run in their host's copy and import the driver's modules from there, so hosts need
   * trellis installed and not the user's code) and environment variables. A driver submitted as
   * a job with a working directory ships it by default. See RuntimeEnvironment.
   */
  runtimeEnv?: RuntimeEnvironment;
}

const NO_STREAMS: ReadonlySet<string> = new Set();
/** The most ended tasks init's keepEndedTasks may ask the driver to remember. */
const MAX_KEEP_ENDED_TASKS = 10_000_000;

/**
 * What a task's failure reported by its worker becomes: its own error as a TaskError, or, where it
 * could not get an argument whose holder died on the way, that argument's loss.
 */
function taskFailure(task: TaskRecord, error: RemoteErrorInfo, lostArgument: string | undefined): Error {
  return lostArgument ? new ObjectLostError(lostArgument, `${task.name}: ${error.message}`) : new TaskError(task.name, error);
}

export class Cluster implements Runtime {
  readonly events = new EventEmitter();
  readonly nodes: Node[] = [];
  readonly #server: Server;
  readonly #socketPath: string;
  #forgetSocketAtExit: () => void = () => undefined;
  readonly #objects = new Map<string, ObjectRecord>();
  readonly #tasks = new Map<string, TaskRecord>();
  /** Totals since the cluster started, for metrics. */
  readonly #counters = { tasksFinished: 0, tasksFailed: 0, tasksRetried: 0 };
  /** How long finished tasks and calls ran (on their worker), by name: for metrics. */
  readonly #durations = new Map<string, TaskDurations>();
  /** Objects that could not be moved off a cordoned node (see evacuate). */
  readonly #evacuationFailed = new WeakSet<ObjectRecord>();
  readonly #actors = new Map<string, ActorRecord>();
  /** Actors a worker asked for that could not be made (a name taken, say), with why. */
  readonly #refusedActors = new Map<string, string>();
  readonly #actorWatches = new Set<{ actorIds: Set<string>; onDeath: (actorId: string, cause: string) => void }>();
  readonly #namedActors = new Map<string, string>();
  /** Handles counted per actor id (see makeActorHandle), as holds are per object. */
  readonly #actorHolds = new Map<string, number>();
  readonly #groups = new Map<string, PlacementGroup>();
  /** Queues, leases and the placement policy; the cluster tells it what exists. */
  readonly #scheduler = new Scheduler({
    nodes: this.nodes,
    placementGroup: (id) => this.#groups.get(id),
    promised: () => this.#promised,
    bytesOn: (id, nodeId) => {
      const record = this.#objects.get(id);
      return record?.nodes.has(nodeId) ? record.size : 0;
    },
    spawn: (node, environment) => this.#spawn(node, environment),
  });
  readonly #collectiveGroups = new Map<string, { actorIds: readonly string[]; backend: 'cpu' | 'nccl' }>();
  readonly #handles = new HandleReleaser((id) => this.#dropHold(id));
  readonly #infeasibleTimer: NodeJS.Timeout;
  readonly #multiProcessService: MultiProcessService | undefined;
  /** Where node agents and their workers connect (init's `listen`). */
  #listener: NodeListener | undefined;
  /** The first node, in this process: the driver's puts go to its store, and its gets read there. */
  readonly #head: LocalNode;
  readonly #shutdownHooks: (() => void)[] = [];
  #describeBroker: (() => BrokerInfo) | undefined;
  /** Resources lent by a shared cluster's broker that have not joined yet (see promise()). */
  #promised: Map<string, number>[] = [];
  /** Nodes that left so far: what was feasible before may not be now. */
  #nodesLeft = 0;
  /** Callers of waitForNodes, told whenever a node joins. */
  readonly #nodeWaiters = new Set<() => void>();
  readonly #logToDriver: boolean;
  readonly #gpuSharing: 'time-slice' | 'mps';
  /** Options workers of every node get (those that hold on any host). */
  readonly #portableEnvironment: Record<string, string>;
  /** close-ipc rounds waiting on workers' answers, by request id. */
  readonly #closeRounds = new Map<number, { waiting: Set<WorkerProcess>; answer: (worker: WorkerProcess, inUse: Uint8Array[]) => void }>();
  #nextCloseRound = 1;
  #nextTaskId = 1;
  /** The last tasks and calls that ended (listTasks, timeline). */
  readonly #ended: EndedTasks;
  /** Streaming calls whose caller still holds them, by the call's return id. */
  readonly #streams = new StreamTable((id) => this.#dropHold(id), () => this.#closed);
  #closed = false;
  #scheduling = false;
  /** The working directory every host's workers run in (runtimeEnv). */
  readonly #workingDirectory: PackedWorkingDirectory | undefined;
  /** Agents that said hello and are installing the working directory before they join. */
  readonly #installing = new Set<RemoteNode>();

  private constructor(options: InitOptions, server: Server, socketPath: string, multiProcessService: MultiProcessService | undefined, runtimeEnv: { environment: RuntimeEnvironment; packed?: PackedWorkingDirectory }) {
    this.#server = server;
    this.#socketPath = socketPath;
    this.#multiProcessService = multiProcessService;
    const specs = options.nodes ?? [options];
    // Workers read the cap from their environment, as the driver's own from init or the variable.
    this.#logToDriver = options.logToDriver ?? true;
    this.#ended = new EndedTasks(options.keepEndedTasks ?? 10_000);
    this.#gpuSharing = options.gpuSharing ?? 'time-slice';
    this.#portableEnvironment = {
      ...(options.busyPollMicros !== undefined ? { TRELLIS_BUSY_POLL_US: String(options.busyPollMicros) } : {}),
      ...(options.reclaimIpcAfterMs !== undefined ? { TRELLIS_RECLAIM_IPC_AFTER_MS: String(options.reclaimIpcAfterMs) } : {}),
      ...runtimeEnv.environment.env,
    };
    this.#workingDirectory = runtimeEnv.packed;
    const environment = { ...multiProcessService?.environment, ...this.#portableEnvironment };
    // This host's workers run in the working directory itself: it is the driver's.
    specs.forEach((spec, index) => this.nodes.push(new LocalNode(spec, index, environment, runtimeEnv.packed?.root)));
    this.#head = this.nodes[0] as LocalNode;
    this.#infeasibleTimer = setInterval(() => {
      this.#warnPending();
      this.#reapIdleWorkers();
      this.#dropSilentNodes();
    }, 1000).unref();
  }

  static async start(options: InitOptions): Promise<Cluster> {
    const sharing = options.gpuSharing ?? 'time-slice';
    if (sharing !== 'time-slice' && sharing !== 'mps') throw new InvalidArgumentError(`gpuSharing must be 'time-slice' or 'mps', got ${String(sharing)}`);
    const localGpus = (options.nodes ?? [options]).some((node) => (node.numGpus ?? 0) > 0);
    // Listening, the GPUs may be the agents': each runs a daemon of its own.
    if (sharing === 'mps' && !localGpus && !options.listen) {
      throw new InvalidArgumentError("gpuSharing 'mps' shares GPUs between workers, but no node has numGpus > 0");
    }
    checkRangeOption('busyPollMicros', options.busyPollMicros, MAX_BUSY_POLL_US, 'microseconds');
    checkRangeOption('reclaimIpcAfterMs', options.reclaimIpcAfterMs, MAX_RECLAIM_IPC_AFTER_MS, 'milliseconds');
    if (options.keepEndedTasks !== undefined && !(Number.isInteger(options.keepEndedTasks) && options.keepEndedTasks >= 0 && options.keepEndedTasks <= MAX_KEEP_ENDED_TASKS)) {
      throw new InvalidArgumentError(`keepEndedTasks must be a whole number from 0 to ${MAX_KEEP_ENDED_TASKS}, got ${String(options.keepEndedTasks)}`);
    }
    const environment = checkRuntimeEnvironment(options.runtimeEnv);
    // A job submitted with a working directory ships it, unless the driver names another.
    const fromJob = environment.workingDir === undefined ? jobRuntimeEnvironment() : undefined;
    const runtimeEnv = { ...fromJob, ...environment };
    const packed = runtimeEnv.workingDir !== undefined ? await packWorkingDirectory(runtimeEnv) : undefined;
    const multiProcessService = sharing === 'mps' && localGpus ? await MultiProcessService.start() : undefined;
    configureBusyPoll(options.busyPollMicros);
    configureIpcReclaim(options.reclaimIpcAfterMs);
    removeStaleEntries(tmpdir(), SOCKET_NAME);
    const socketPath = join(tmpdir(), `trellis-${process.pid}-${newObjectId().slice(0, 8)}.sock`);
    const server = createServer();
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(socketPath, () => resolve());
      });
    } catch (error) {
      await multiProcessService?.close();
      throw error;
    }
    const cluster = new Cluster(options, server, socketPath, multiProcessService, { environment: runtimeEnv, ...(packed ? { packed } : {}) });
    // Node unlinks the socket when the server closes, which an exit without shutdown() skips.
    cluster.#forgetSocketAtExit = onProcessExit(() => rmSync(socketPath, { force: true }));
    server.on('connection', (socket) => cluster.#accept(socket, false));
    if (options.listen) {
      try {
        cluster.#listener = await NodeListener.start(options.listen, (socket) => cluster.#accept(socket, true));
      } catch (error) {
        await cluster.shutdown();
        throw error;
      }
    }
    setRefTracker({
      onHandleCreated: (ref) => cluster.#onHandle(ref),
      onHandleDisposed: (ref) => cluster.#handles.disposed(ref),
    });
    const prestart = options.prestartWorkers;
    // By default the nodes together start no more workers than the host has cores (one each at
    // least): more would only contend for the cores while they start, and init waits for them;
    // the rest start when work needs them.
    let cores = availableParallelism();
    for (const node of cluster.nodes) {
      const count = prestart ?? Math.min(node.softLimit, Math.max(1, cores));
      cores -= count;
      for (let i = 0; i < count; i++) cluster.#spawn(node);
    }
    await Promise.all(cluster.nodes.flatMap((node) => [...node.workers.values()].map((worker) => worker.ready)));
    return cluster;
  }

  get headNode(): LocalNode {
    return this.#head;
  }

  // -------------------------------------------------------------------------------------------
  // Node agents: remote nodes join over TCP

  #tokenValid(token: unknown): boolean {
    return this.#listener?.tokenValid(token) === true;
  }

  /** An agent said hello: its node joins, unless its token or id is wrong. */
  #join(hello: AgentHelloMessage, connection: FrameConnection<AgentMessage, HeadMessage>): RemoteNode | undefined {
    const refuse = (reason: string, retry = false) => {
      connection.send({ t: 'refused', reason, ...(retry ? { retry } : {}) });
      connection.flush();
      setTimeout(() => connection.close(), 100).unref();
      this.events.emit('warning', { kind: 'node-refused', message: `node ${String(hello.nodeId)} was refused: ${reason}` });
      return undefined;
    };
    if (!this.#tokenValid(hello.token)) return refuse('wrong token');
    if (hello.protocol !== AGENT_PROTOCOL) return refuse(`it speaks node protocol ${String(hello.protocol)}, this driver ${AGENT_PROTOCOL}: run the same trellis version on every host`);
    // Passing conditions: an agent that restarted before its old connection was seen to close, say.
    if (this.#closed) return refuse('the cluster is shutting down', true);
    if (this.nodes.some((node) => node.id === hello.nodeId) || [...this.#installing].some((node) => node.id === hello.nodeId)) return refuse(`a node with id ${hello.nodeId} is already in the cluster`, true);
    const mps = this.#gpuSharing === 'mps' && hello.numGpus > 0;
    if (mps && !hello.mps) return refuse(`gpuSharing 'mps' needs nvidia-cuda-mps-control on node ${hello.nodeId} (${hello.hostname}), which has GPUs and no such program (TRELLIS_MPS_CONTROL names another path)`);
    const node = new RemoteNode(hello, connection, this.#portableEnvironment, this.#logToDriver ? printWorkerOutput : undefined);
    connection.send({ t: 'welcome', nodeId: node.id, ...(mps ? { gpuSharing: 'mps' as const } : {}) });
    if (!this.#workingDirectory) {
      this.#admit(node);
      return node;
    }
    // Its workers start in the working directory: the node joins once its host has it.
    this.#installing.add(node);
    const started = Date.now();
    // An install that never ends (a host's disk that hangs) must not hold the agent for ever.
    const limit = installLimitMs(this.#workingDirectory);
    const timer = setTimeout(() => {
      if (!this.#installing.delete(node)) return;
      this.events.emit('warning', { kind: 'node-refused', message: `node ${node.id} (${node.hostname}) left: it did not install the working directory within ${limit} ms` });
      node.close();
    }, limit);
    timer.unref();
    node.installWorkingDirectory(this.#workingDirectory).then(
      (path) => {
        clearTimeout(timer);
        if (!this.#installing.delete(node)) return;
        if (this.#closed) return node.close();
        this.events.emit('working-dir-installed', { nodeId: node.id, hostname: node.hostname, path, ms: Date.now() - started });
        this.#admit(node);
      },
      (error: Error) => {
        clearTimeout(timer);
        if (!this.#installing.delete(node)) return;
        this.events.emit('warning', { kind: 'node-refused', message: `node ${node.id} (${node.hostname}) left: it could not install the working directory: ${error.message}` });
        node.close();
      },
    );
    return node;
  }

  /** A node ready for work: its first workers start, and waiting work may go there. */
  #admit(node: RemoteNode): void {
    this.nodes.push(node);
    for (let i = 0; i < node.softLimit; i++) this.#spawn(node);
    this.events.emit('node-added', { nodeId: node.id, hostname: node.hostname, resources: node.pool.snapshot().total });
    for (const waiter of [...this.#nodeWaiters]) waiter();
    this.#schedule();
  }

  /**
   * An agent's connection closed: its node leaves. Its workers count as dead (tasks retry, actors
   * restart elsewhere) and objects only it held are lost (and recomputed where lineage allows).
   */
  #leave(node: RemoteNode): void {
    if (this.#installing.delete(node)) node.onClosed();
    const index = this.nodes.indexOf(node);
    if (index < 0) return;
    this.nodes.splice(index, 1);
    this.#nodesLeft++;
    // Before the workers' exits, which restart actors: those in a lost bundle wait for it again.
    for (const group of this.#groups.values()) loseNode(group, node);
    // Its workers' exits close their connections too (see #spawn).
    node.onClosed();
    if (this.#closed) return;
    this.events.emit('node-removed', { nodeId: node.id, hostname: node.hostname });
    this.#failInfeasible();
    this.#schedule();
  }

  /**
   * Resources that may still join (a shared cluster's bundles not lent yet, or lent and on their
   * way): work that fits one of them waits for it instead of failing as infeasible.
   */
  promise(bundles: Resources[]): void {
    const shrank = bundles.length < this.#promised.length;
    this.#promised = bundles.map((bundle) => toFixed(bundle));
    if (shrank && !this.#closed) this.#failInfeasible();
  }

  /** After a node left: queued tasks and waiting actors that no node left can ever run fail now. */
  #failInfeasible(): void {
    for (const task of [...this.#scheduler.queuedTasks()]) {
      if (task.state !== 'queued') continue;
      const infeasible = this.#scheduler.infeasibility(task.request, task.strategy);
      if (infeasible) this.#failTask(task, new InfeasibleTaskError(`task ${task.name} can no longer be scheduled: ${infeasible.reason}`, infeasible.missing));
    }
    for (const actor of [...this.#actors.values()]) {
      if ((actor.state !== 'pending' && actor.state !== 'restarting') || actor.worker) continue;
      const infeasible = this.#scheduler.infeasibility(actor.request, actor.options.schedulingStrategy ?? 'DEFAULT');
      if (infeasible) this.#actorDied(actor, `actor ${actor.name} can no longer be scheduled: ${infeasible.reason}`);
    }
  }

  /** Agents silent past listen.nodeTimeoutMs leave, as if their connections had closed. */
  #dropSilentNodes(): void {
    const timeout = this.#listener?.nodeTimeoutMs;
    if (timeout === undefined) return;
    const now = Date.now();
    for (const node of [...this.nodes]) {
      if (!(node instanceof RemoteNode)) continue;
      if (now - node.lastHeard <= timeout) {
        // The agent times its head out the same way.
        node.send({ t: 'head-alive' });
        continue;
      }
      this.events.emit('warning', { kind: 'node-timeout', message: `node ${node.id} (${node.hostname}) was not heard from for ${now - node.lastHeard} ms: it leaves the cluster` });
      this.#leave(node);
      node.close();
    }
    // Agents installing the working directory (a large one may take a while) are kept too.
    for (const node of this.#installing) node.send({ t: 'head-alive' });
  }

  /** Resolves once the cluster has `count` nodes (its own included), else fails after `timeout` ms. */
  waitForNodes(count: number, timeout: number): Promise<void> {
    if (this.nodes.length >= count) return Promise.resolve();
    return new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const check = () => {
        if (this.nodes.length < count) return;
        clearTimeout(timer);
        this.#nodeWaiters.delete(check);
        resolve();
      };
      this.#nodeWaiters.add(check);
      if (Number.isFinite(timeout)) {
        timer = setTimeout(() => {
          this.#nodeWaiters.delete(check);
          reject(new GetTimeoutError(`the cluster has ${this.nodes.length} nodes after ${timeout} ms; ${count} were awaited`));
        }, timeout);
      }
    });
  }

  // -------------------------------------------------------------------------------------------
  // Workers

  #spawn(node: Node, environment: WorkerEnvironment = DEFAULT_WORKER_ENVIRONMENT, light = false): WorkerProcess {
    const worker = node.spawnWorker(this.#socketPath, environment, light);
    if (node instanceof RemoteNode) worker.child.on('exit', () => worker.connection?.close());
    worker.child.on('exit', (code, signal) => {
      worker.recordExit(code, signal);
      this.#onWorkerExit(worker);
    });
    return worker;
  }

  /**
   * A connection to the cluster's socket: a worker's, or (over TCP, `remote`) a worker's of a node
   * agent or an agent's own, which must show the cluster's token in its first message.
   */
  #accept(socket: Socket, remote: boolean): void {
    let worker: WorkerProcess | undefined;
    let agent: RemoteNode | undefined;
    const connection = new FrameConnection<WorkerMessage | AgentMessage, DriverMessage | HeadMessage>(
      socket,
      (message) => {
        if (agent) return agent.onMessage(message as AgentMessage);
        if (remote && !worker) {
          if (message.t === 'agent-hello') {
            agent = this.#join(message, connection as unknown as FrameConnection<AgentMessage, HeadMessage>);
            return;
          }
          if (message.t !== 'hello' || !this.#tokenValid(message.token)) {
            connection.close();
            return;
          }
        }
        if (message.t === 'hello') {
          worker = this.#findWorker(message.workerId);
          if (!worker || worker.connection) {
            connection.close();
            return;
          }
          worker.connection = connection as unknown as FrameConnection<WorkerMessage, DriverMessage>;
          const ring = worker.takeRing();
          if (ring) connection.attachRing(ring);
          if (worker.state === 'starting') {
            worker.state = 'idle';
            worker.idleSince = Date.now();
          }
          worker.resolveReady();
          this.#schedule();
          return;
        }
        if (worker) this.#onWorkerMessage(worker, message as WorkerMessage);
      },
      () => {
        if (agent) return this.#leave(agent);
        if (!worker) return;
        worker.kill();
        for (const round of this.#closeRounds.values()) round.answer(worker, []);
        this.#onWorkerGone(worker);
      },
      busyPollTraffic,
    );
  }

  #findWorker(id: string): WorkerProcess | undefined {
    for (const node of this.nodes) {
      const worker = node.workers.get(id);
      if (worker) return worker;
    }
    return undefined;
  }

  #onWorkerExit(worker: WorkerProcess): void {
    worker.exited = true;
    for (const watch of worker.actorWatches.values()) watch.stop();
    worker.actorWatches.clear();
    // A worker that never said hello never had its ring taken over by the connection.
    worker.takeRing()?.close();
    const wasActor = worker.state === 'actor';
    worker.state = 'dead';
    worker.node.workers.delete(worker.id);
    worker.resolveReady();
    worker.node.reapDeadProcesses();
    if (this.#closed) return;
    const lease = this.#scheduler.leaseOf(worker);
    if (lease) this.#scheduler.endLease(lease);
    for (const taskId of worker.inflight) {
      const task = this.#tasks.get(taskId);
      // A result stored and not reported ('done' may never have left) has no reader, and a retry
      // must be able to store it again; so with puts it made and never registered.
      if (task) for (const id of this.#returnIdsOf(task)) this.#dropUnreportedResult(worker.node, id);
      if (task?.putTag !== undefined && task.worker === worker && !worker.taskPuts.has(taskId)) this.#countPuts(worker, task);
      this.#closeAttempt(task, worker, 'worker-died');
      if (!task || task.actorId) continue;
      task.worker = undefined;
      if (task.cancelled) continue;
      if (task.stream?.closed) {
        // Its caller let go: nothing would take what a retry yields.
        task.cancelled = true;
        this.#failTask(task, new TaskCancelledError(`${task.name}: its caller stopped reading before its worker died`));
        continue;
      }
      if (task.attempts <= task.maxRetries) {
        task.state = 'queued';
        this.#counters.tasksRetried++;
        this.#scheduler.enqueue(task, true);
      } else {
        this.#failTask(task, new WorkerCrashedError(`${task.name}: its worker died (${worker.deathCause}) and it has no retries left (${task.maxRetries} allowed)`));
      }
    }
    worker.inflight.clear();
    if (wasActor) {
      for (const actor of this.#actors.values()) if (actor.worker === worker) this.#onActorWorkerDied(actor, worker.deathCause);
    }
    this.#exporterGone(worker);
    this.#onWorkerGone(worker);
    this.#schedule();
  }

  /**
   * Processes on the worker's node close their mappings of GPU memory it exported over CUDA IPC:
   * nothing can read that memory any more, and a mapping kept idle could pin it (a restarted
   * producer would then hold its memory twice). Sent on every exit, as the driver does not know
   * which processes exported; one that never loaded CUDA ignores it.
   */
  #exporterGone(worker: WorkerProcess): void {
    const processId = worker.child.pid;
    if (processId === undefined) return;
    // A process id names a process on its own host only.
    if (worker.node.localStore) closeMappingsOfExporter(processId);
    for (const other of worker.node.workers.values()) {
      if (other.connection && !other.connection.closed) other.send({ t: 'exporter-gone', processId });
    }
  }

  /**
   * Once a worker has exited and everything it sent has been read (its connection closed): drops
   * the holds it had (borrows, handles to its puts and submissions) and deletes what it put but
   * never registered. Earlier, a register or borrow still in the socket could arrive afterwards.
   */
  #onWorkerGone(worker: WorkerProcess): void {
    if (worker.released || !worker.exited || (worker.connection && !worker.connection.closed)) return;
    worker.released = true;
    if (this.#closed) return;
    worker.node.deleteUnreportedPuts(worker.putIds, worker.storedPuts);
    for (const { base, registered } of worker.taskPuts.values()) worker.node.deleteUnreportedPuts(base, registered);
    worker.taskPuts.clear();
    const holds = [...worker.holds];
    worker.holds.clear();
    for (const [id, count] of holds) for (let i = 0; i < count; i++) this.#dropHold(id);
  }

  /** Deletes a task's stored result that its owner never heard of. */
  #dropUnreportedResult(node: Node, id: string): void {
    const record = this.#objects.get(id);
    if (record?.state === 'ready' && record.nodes.has(node.id) && storedIdOf(record) === id) return;
    node.deleteObject(id);
  }

  /** A hold taken for `worker`, dropped with the worker if it dies holding it. */
  #addWorkerHold(worker: WorkerProcess, id: string): void {
    this.#addHold(id);
    worker.holds.set(id, (worker.holds.get(id) ?? 0) + 1);
  }

  #dropWorkerHold(worker: WorkerProcess, id: string): void {
    const count = worker.holds.get(id);
    if (count === 1) worker.holds.delete(id);
    else if (count !== undefined) worker.holds.set(id, count - 1);
    this.#dropHold(id);
  }

  #onWorkerMessage(worker: WorkerProcess, message: WorkerMessage): void {
    switch (message.t) {
      case 'done':
        // Read after the worker's exit, which settled its tasks (retried or failed) and deleted
        // any result it had stored: a late report must not finish a retry running elsewhere.
        if (worker.exited) return;
        this.#closeAttempt(this.#tasks.get(message.taskId), worker, message.error ? 'failed' : 'finished', message.ran);
        return this.#onTaskDone(worker, message.taskId, message.value, message.nested, message.error, message.held, message.lostArgument, message.size, message.more);
      case 'yield':
        return this.#onYield(worker, message);
      case 'actor-ready':
        if (worker.exited) return;
        return this.#onActorReady(message.actorId, message.error);
      case 'borrow':
        for (const id of message.add) this.#addWorkerHold(worker, id);
        for (const id of message.drop) this.#dropWorkerHold(worker, id);
        return;
      case 'request':
        return void this.#onRequest(worker, message.requestId, message.op, message.body);
      case 'closed-ipc':
        return this.#closeRounds.get(message.requestId)?.answer(worker, message.inUse);
      case 'fatal':
        worker.fatalError = message.error;
        return;
      case 'metrics':
        for (const problem of addMetricUpdates(message.updates)) this.events.emit('warning', { kind: 'metrics', message: problem });
        return;
    }
  }

  async #onRequest(worker: WorkerProcess, requestId: number, op: string, body: any): Promise<void> {
    const reply = (value: unknown) => worker.send({ t: 'reply', requestId, ok: true, value });
    try {
      switch (op) {
        case 'submit': {
          const task = this.#makeTask(body.fn, undefined, undefined, body.args, body.argRefs, body.held, inheritEnvironment(body.options, worker), body.returnId);
          // The submitting worker's handles (checked there).
          const returns = body.options?.numReturns ?? 1;
          if (returns > 1) this.#addReturns(task, returns);
          for (const id of this.#returnIdsOf(task)) this.#addWorkerHold(worker, id);
          if (body.backpressure !== undefined) this.#streams.open(task, body.backpressure ?? Infinity);
          this.#submit(task);
          return;
        }
        case 'actor-call': {
          const returns: number = body.options?.numReturns ?? 1;
          for (let index = 0; index < returns; index++) this.#addWorkerHold(worker, returnIdAt(body.returnId, index));
          // Sent as null where unbounded (msgpack has no Infinity in its plain form).
          const backpressure = body.backpressure === undefined ? undefined : (body.backpressure ?? Infinity);
          this.#submitActorCall(body.actorId, body.method, body.args, body.argRefs, body.held, body.returnId, body.options ?? {}, body.recompute, undefined, backpressure);
          return;
        }
        case 'stream-next': {
          let item: string | undefined;
          try {
            item = await this.#streams.take(body.id, body.timeout ?? Infinity);
          } catch (error) {
            // The call's error, as a get() of a failed object answers it: rebuilt as it was.
            reply({ error: serializeError(error as Error) });
            return;
          }
          // The stream's hold on the item becomes the worker's handle (a worker gone meanwhile holds nothing).
          if (item !== undefined) {
            if (!worker.exited) this.#addWorkerHold(worker, item);
            this.#dropHold(item);
          }
          reply(item ?? null);
          return;
        }
        case 'stream-close':
          this.closeStream(body.id);
          return;
        case 'create-actor': {
          this.#addWorkerHold(worker, body.actorId); // the creating worker's handle
          this.#createActorRecord(body.actorId, body.cls, body.args, body.argRefs, body.held, inheritEnvironment(body.options, worker), body.methods);
          return;
        }
        case 'register': {
          // A worker stored a value it put: the driver owns it from here; the worker holds one handle.
          let record = this.#objects.get(body.id);
          if (!record) this.#objects.set(body.id, (record = this.#newRecord(body.id, 0)));
          this.#addWorkerHold(worker, body.id);
          const stored = 'node' in body.value;
          if (body.task !== undefined) this.#putBy(worker, record, body.task);
          else if (stored) worker.storedPuts++;
          // A rerun's put of a value still stored elsewhere: one more copy.
          if (record.state === 'ready' && stored && record.nodes.size > 0) addNode(record, body.value.node);
          else this.#resolveObject(body.id, body.value, body.nested, body.size);
          return;
        }
        case 'get': {
          // The worker blocks: lend its CPU to others meanwhile, and take back tasks it has not begun.
          const lease = this.#scheduler.leaseOf(worker);
          for (const taskId of body.returnTasks as string[]) {
            const task = this.#tasks.get(taskId);
            if (!task || task.state !== 'running') continue;
            worker.inflight.delete(taskId);
            if (lease) lease.inflight--;
            // Never begun: no attempt of it ran.
            task.attempts--;
            task.runningSince = undefined;
            task.state = 'queued';
            task.worker = undefined;
            this.#scheduler.enqueue(task, true);
          }
          if (lease) lease.pool.release(lease.request);
          this.#schedule();
          try {
            const values = await this.#locateAll(body.ids, body.timeout, worker.node, worker.actorId);
            reply(values);
          } finally {
            if (lease && this.#scheduler.leaseOf(worker) === lease) lease.pool.acquire(lease.request);
          }
          return;
        }
        case 'wait': {
          const [ready] = await this.#waitIds(body.ids, body.numReturns, body.timeout, new Set(body.streams ?? []));
          reply(ready);
          return;
        }
        case 'get-actor': {
          reply(this.#lookupActor(body.name));
          return;
        }
        case 'kill':
          this.kill(body.actorId, body.noRestart);
          return;
        case 'cancel':
          this.#cancelId(body.id, body.force);
          return;
        case 'close-ipc':
          reply(await this.closeIpcMappings(body.handles, worker));
          return;
        case 'watch-actors': {
          // Answered at the first death, or with null once the worker stops watching.
          const watchId = body.watchId as number;
          const stop = this.watchActors(body.actorIds, (actorId, cause) => {
            worker.actorWatches.delete(watchId);
            reply({ actorId, cause });
          });
          worker.actorWatches.set(watchId, { stop, answer: reply });
          return;
        }
        case 'unwatch-actors': {
          const watch = worker.actorWatches.get(body.watchId);
          worker.actorWatches.delete(body.watchId);
          watch?.stop();
          watch?.answer(null);
          return;
        }
        default:
          throw new Error(`unknown request '${op}'`);
      }
    } catch (error) {
      const err = error as Error & { code?: string };
      // A worker creates actors without waiting for an answer: its handle's calls fail naming why.
      if (op === 'create-actor') this.#refusedActors.set(body.actorId, `${err.name}: ${err.message}`);
      worker.send({ t: 'reply', requestId, ok: false, error: { name: err.name, message: err.message, code: err.code, stack: err.stack } });
    }
  }

  // -------------------------------------------------------------------------------------------
  // Objects: directory, holds, values

  #newRecord(id: string, holds: number): ObjectRecord {
    return { id, state: 'pending', nodes: NO_NODES, size: 0, holds };
  }

  #onHandle(ref: ObjectRef<unknown>): void {
    this.#addHold(ref.id);
    this.#handles.track(ref);
  }

  #addHold(id: string): void {
    if (isActorId(id)) {
      this.#actorHolds.set(id, (this.#actorHolds.get(id) ?? 0) + 1);
      // A handle made again before its last calls finished: the actor stays.
      const actor = this.#actors.get(id);
      if (actor) actor.unreferenced = false;
      return;
    }
    const record = this.#objects.get(id);
    if (record) record.holds++;
    else this.#objects.set(id, this.#newRecord(id, 1));
  }

  #dropHold(id: string): void {
    if (isActorId(id)) {
      const holds = (this.#actorHolds.get(id) ?? 0) - 1;
      if (holds > 0) {
        this.#actorHolds.set(id, holds);
        return;
      }
      this.#actorHolds.delete(id);
      const actor = this.#actors.get(id);
      // A name is a handle the cluster keeps: named actors live until killed.
      if (!actor || actor.registeredName || this.#closed) return;
      actor.unreferenced = true;
      this.#endIfUnreferenced(actor);
      return;
    }
    const record = this.#objects.get(id);
    if (!record || --record.holds > 0) return;
    if (record.lineageHolds) this.#evict(record);
    else this.#deleteRecord(record);
  }

  #deleteRecord(record: ObjectRecord): void {
    const id = record.id;
    this.#objects.delete(id);
    // A streaming call's last ref went: nobody will take its items.
    if (this.#streams.has(id)) this.closeStream(id);
    // The last of a task's returns went while its puts live on (see #releaseForPuts).
    if (record.lineage?.state === 'done' && record.lineage.keptBy > 1 && !this.#otherReturnLives(record.lineage, id)) this.#releaseForPuts(record.lineage);
    if (record.lineage) this.#unkeep(record.lineage);
    if (record.madeBy) this.#unkeep(record.madeBy);
    const holder = record.held?.actorId ?? record.retiredBy;
    if (holder) this.#freeHeld(holder, id);
    const storedId = record.value && 'node' in record.value ? record.value.id : id;
    for (const nodeId of record.nodes) this.nodes.find((candidate) => candidate.id === nodeId)?.deleteObject(storedId);
    for (const nested of record.nested ?? []) this.#dropHold(nested);
  }

  /**
   * Nothing holds the value any more, but lineage that may have to rerun takes it as an argument:
   * the stored copies go (memory stays bounded along a pipeline) and the record stays, to be
   * recomputed from its own lineage if that rerun comes.
   */
  #evict(record: ObjectRecord): void {
    const storedId = storedIdOf(record);
    for (const nodeId of record.nodes) this.nodes.find((candidate) => candidate.id === nodeId)?.deleteObject(storedId);
    record.nodes = NO_NODES;
    for (const nested of record.nested ?? []) this.#dropHold(nested);
    record.nested = undefined;
  }

  #dropLineageHold(id: string): void {
    const record = this.#objects.get(id);
    if (!record || --record.lineageHolds! > 0 || record.holds > 0) return;
    this.#deleteRecord(record);
  }

  /** A record stopped naming `task` as the way to make it again. */
  #unkeep(task: TaskRecord): void {
    if (--task.keptBy > 0 || task.state !== 'done') return;
    this.#releaseTaskHolds(task);
  }

  /** A running task registered a put named from its return id: a rerun of the task makes it again. */
  #putBy(worker: WorkerProcess, record: ObjectRecord, taskId: string): void {
    const task = this.#tasks.get(taskId);
    const counted = worker.taskPuts.get(taskId) ?? (task?.worker === worker ? this.#countPuts(worker, task) : undefined);
    if (counted) counted.registered++;
    if (!task || task.state !== 'running' || record.madeBy === task) return;
    if (record.madeBy) this.#unkeep(record.madeBy);
    record.madeBy = task;
    task.keptBy++;
    (task.putIds ??= []).push(record.id);
  }

  /** The records of what `task` put that still name it as the way to make them again. */
  *#putsOf(task: TaskRecord): Generator<ObjectRecord> {
    for (const id of task.putIds ?? []) {
      const put = this.#objects.get(id);
      if (put?.madeBy === task) yield put;
    }
  }

  /** `task` will not make `put` again; its caller settles the task's holds. */
  #disown(put: ObjectRecord, task: TaskRecord): void {
    put.madeBy = undefined;
    task.keptBy--;
  }

  /** Counts what a task running on `worker` registers of its puts: the rest, should it die, are deleted. */
  #countPuts(worker: WorkerProcess, task: TaskRecord): { base: Uint8Array; registered: number } {
    const counted = { base: taskPutBase(task.returnId, task.putTag!), registered: 0 };
    worker.taskPuts.set(task.taskId, counted);
    return counted;
  }

  /** True where a value can be made again by rerunning what made it (and is worth freeing). */
  #recomputable(record: ObjectRecord): boolean {
    const value = record.value;
    if (record.state !== 'ready' || !value || !('node' in value) || record.held || record.retiredBy) return false;
    const task = record.lineage ?? record.madeBy;
    return task !== undefined && this.#rerunSpec(task) !== undefined;
  }

  #resolveObject(id: string, value: WireValue | undefined, nested: string[] | undefined, size = 0): void {
    const record = this.#objects.get(id);
    if (!record) {
      // Nobody holds it any more: drop what the worker stored.
      if (value && 'node' in value) this.nodes.find((node) => node.id === value.node)?.deleteObject(id);
      return;
    }
    record.state = 'ready';
    record.value = value;
    record.size = size;
    if (value && 'node' in value) addNode(record, value.node);
    if (nested?.length) {
      record.nested = nested;
      for (const child of nested) this.#addHold(child);
    }
    const waiters = record.waiters;
    record.waiters = undefined;
    if (waiters) for (const waiter of waiters) waiter();
  }

  #failObject(id: string, error: Error): void {
    const record = this.#objects.get(id);
    if (!record) return;
    record.state = 'failed';
    record.error = error;
    const waiters = record.waiters;
    record.waiters = undefined;
    if (waiters) for (const waiter of waiters) waiter();
  }

  #whenSettled(id: string, timeout: number): Promise<ObjectRecord> {
    const record = this.#objects.get(id);
    if (!record) return Promise.reject(new ObjectLostError(id, `object ${id} is unknown to its owner (freed, or never created)`));
    if (record.state !== 'pending') return Promise.resolve(record);
    return new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const waiter = () => {
        clearTimeout(timer);
        resolve(record);
      };
      (record.waiters ??= []).push(waiter);
      if (Number.isFinite(timeout)) {
        timer = setTimeout(() => {
          record.waiters = record.waiters?.filter((candidate) => candidate !== waiter);
          reject(new GetTimeoutError(`object ${id} was not ready within ${timeout} ms`));
        }, timeout);
      }
    });
  }

  /**
   * Where each object can be read from `node` by a worker's get() (of actor `reader`, if any):
   * inline bytes, or a copy in that node's store. Held tensors stay out of the store where the
   * reader can take them directly (see #directWire); not over a communicator, though: a get inside
   * a call would break the pairing of sends and receives in call order.
   */
  async #locateAll(ids: string[], timeout: number, node: Node, reader?: string): Promise<Array<WireValue | { error: RemoteErrorInfo & { kind: string } }>> {
    for (;;) {
      const records = await this.#settledResident(ids, timeout, (record) => this.#readsDirectly(record, node, reader));
      try {
        return records.map((record) => {
          if (record.state === 'failed') return { error: serializeError(record.error!) };
          return (record.held && this.#directWire(record, node, reader)) || this.#valueOn(record, node);
        });
      } catch (error) {
        if (!(error instanceof CopyPending)) throw error;
        // Then look again: the copy may have failed with its source's node.
        await error.done.catch(() => undefined);
      }
    }
  }

  #valueOn(record: ObjectRecord, node: Node): WireValue {
    const value = record.value!;
    if ('inline' in value) return value;
    if (!record.nodes.has(node.id)) this.#copyToNode(record, node);
    return { node: node.id, id: storedIdOf(record) };
  }

  /**
   * Objects that cross nodes are copied between their stores: at once between segments this
   * process maps, else in chunks over the agents' connections (CopyPending says when it is done).
   */
  #copyToNode(record: ObjectRecord, target: Node): void {
    const sources = this.nodes.filter((node) => record.nodes.has(node.id));
    const source = sources.find((node) => node.localStore) ?? sources[0];
    if (!source) throw new ObjectLostError(record.id, `object ${record.id} is in no node's store`);
    const local = source.localStore;
    if (!local || !target.localStore) throw new CopyPending(this.#copyAcross(record, source, target));
    const view = local.getIfSealed(storedIdOf(record));
    if (!view) throw new ObjectLostError(record.id, `object ${record.id} is missing from the store of ${source.id}`);
    try {
      target.localStore.put(storedIdOf(record), view.data, { metadata: view.metadata ?? undefined });
    } finally {
      view.release();
    }
    addNode(record, target.id);
  }

  /** One copy per object and target at a time; the record learns of the copy when it is sealed. */
  #copyAcross(record: ObjectRecord, source: Node, target: Node): Promise<void> {
    const copying = (record.copying ??= new Map());
    let copy = copying.get(target.id);
    if (copy) return copy;
    const storedId = storedIdOf(record);
    let moved: Promise<unknown>;
    let direct = false;
    if (source instanceof RemoteNode && target instanceof RemoteNode && source.transfer) {
      // Between two agents: the target pulls from the source, not through this process.
      direct = true;
      moved = target.pull(storedId, source);
    } else {
      const from = source.localStore ? storeSource(source.localStore) : (source as RemoteNode).source;
      const to = target.localStore ? storeTarget(target.localStore) : (target as RemoteNode).target;
      moved = transferObject(from, to, storedId);
    }
    copy = moved.then(
      () => {
        copying.delete(target.id);
        // Freed meanwhile (or recomputed under another value): the copy has no reader.
        if (this.#objects.get(record.id) !== record || storedIdOf(record) !== storedId || target.closed) return target.deleteObject(storedId);
        addNode(record, target.id);
      },
      (error: Error & { code?: string }) => {
        copying.delete(target.id);
        // A copy that raced another into the same store (a retried transfer, say) is there already.
        if (error.code === 'ERR_OBJECT_EXISTS' && this.#objects.get(record.id) === record) return addNode(record, target.id);
        throw error;
      },
    );
    copying.set(target.id, copy);
    this.events.emit('object-transfer', { objectId: record.id, from: source.id, to: target.id, bytes: record.size, route: direct ? 'direct' : 'head' });
    return copy;
  }

  #readValue(record: ObjectRecord): unknown {
    if (record.state === 'failed') throw record.error;
    if (!this.#resident(record)) throw new ObjectLostError(record.id, `object ${record.id} was lost and could not be recomputed`);
    const value = record.value!;
    if ('inline' in value) return unpack(value.inline);
    const node = this.nodes.find((candidate) => candidate.localStore && record.nodes.has(candidate.id));
    // A buffer of its own, so that whatever is made from the value keeps the object pinned.
    const view = node?.localStore!.getIfSealed(storedIdOf(record), { ownBuffer: true });
    if (!view) throw new ObjectLostError(record.id, `object ${record.id} is missing from the store of ${node?.id ?? this.#head.id}`);
    return decodeStored(view);
  }

  /** Large arguments go to the head node's store as objects. */
  #encodeArgs(args: unknown[]): { bytes: Uint8Array; argRefs: string[]; held: string[] } {
    return encodeArguments(args, (encoded) => this.#putEncoded(encoded));
  }

  put(value: unknown): ObjectRef<unknown> {
    return this.#putEncoded(encodeValue(value));
  }

  #putEncoded(encoded: ReturnType<typeof encodeValue>): ObjectRef<unknown> {
    const id = newObjectId();
    const ref = new ObjectRef(id);
    if ('inline' in encoded) {
      this.#resolveObject(id, { inline: encoded.inline }, encoded.nested, encoded.inline.byteLength);
    } else {
      const node = this.#head;
      putStored(node.store, id, encoded.stored);
      this.#resolveObject(id, { node: node.id, id }, encoded.nested, encoded.stored.payload.byteLength);
    }
    return ref;
  }

  async get(refs: ObjectRef<unknown>[], timeout: number): Promise<unknown[]> {
    for (;;) {
      const records = await this.#settledResident(refs.map((ref) => ref.id), timeout);
      // Values only node agents hold come into the driver's store first.
      const copies: Promise<void>[] = [];
      for (const record of records) {
        if (record.state !== 'ready' || !record.value || 'inline' in record.value) continue;
        if (this.nodes.some((node) => node.localStore && record.nodes.has(node.id))) continue;
        try {
          this.#copyToNode(record, this.#head);
        } catch (error) {
          if (!(error instanceof CopyPending)) throw error;
          copies.push(error.done.catch(() => undefined));
        }
      }
      if (copies.length === 0) return records.map((record) => this.#readValue(record));
      // Then look again: a copy that failed with its source's node leaves the value to recompute.
      await Promise.all(copies);
    }
  }

  /**
   * One ref, waited on without a deadline: an inline value resolves straight from the waiter its
   * result wakes (one promise, no Promise.all, no timer). Anything else takes the general path.
   */
  getOne(ref: ObjectRef<unknown>, timeout: number): Promise<unknown> {
    const record = this.#objects.get(ref.id);
    if (!record || timeout !== Infinity) return this.#getOneSlowly(ref, timeout);
    return new Promise((resolve, reject) => {
      if (record.state === 'pending') (record.waiters ??= []).push(() => this.#settleOne(record, ref, resolve, reject));
      else this.#settleOne(record, ref, resolve, reject);
    });
  }

  #settleOne(record: ObjectRecord, ref: ObjectRef<unknown>, resolve: (value: unknown) => void, reject: (error: unknown) => void): void {
    if (record.state === 'failed') return reject(record.error);
    const value = record.value;
    if (record.state !== 'ready' || record.held || !value || !('inline' in value)) return resolve(this.#getOneSlowly(ref, Infinity));
    try {
      resolve(unpack(value.inline));
    } catch (error) {
      reject(error);
    }
  }

  async #getOneSlowly(ref: ObjectRef<unknown>, timeout: number): Promise<unknown> {
    return (await this.get([ref], timeout))[0];
  }

  /** Waits for the objects, recomputing any whose stored value vanished (a few rounds at most). */
  async #settledResident(ids: string[], timeout: number, readsHeld?: (record: ObjectRecord) => boolean): Promise<ObjectRecord[]> {
    for (let round = 0; ; round++) {
      const records = await Promise.all(ids.map((id) => this.#whenSettled(id, timeout)));
      // Tensors an actor still holds come into the store for readers outside its group, unless
      // the reader takes them where they are (`readsHeld`).
      const held = records.filter((record) => record.held && !readsHeld?.(record));
      if (held.length > 0) await Promise.all(held.map((record) => this.#materialize(record)));
      const lost = records.filter((record) => record.state === 'ready' && !this.#resident(record));
      if (lost.length === 0 || round >= 3) return records;
      for (const record of lost) this.#reconstruct(record);
    }
  }

  /** Forgets store copies that vanished; true while the value can still be read somewhere. */
  #resident(record: ObjectRecord): boolean {
    const value = record.value;
    if (!value || 'inline' in value) return true;
    for (const nodeId of [...record.nodes]) {
      const node = this.nodes.find((candidate) => candidate.id === nodeId);
      if (node && !node.closed && node.holdsObject(storedIdOf(record))) continue;
      record.nodes.delete(nodeId);
      // Said in the error if nothing can recompute it.
      if (!node || node.closed) record.lostWith = nodeId;
    }
    return record.nodes.size > 0;
  }

  /** A stored value vanished: recompute it from its lineage, or fail it with ObjectLostError. */
  #reconstruct(record: ObjectRecord): void {
    const lineage = record.lineage ?? record.madeBy;
    if (lineage?.rerun && lineage.state !== 'done') {
      // Its task is being rerun for another of its objects: that run puts this one again too.
      this.#markPending(record);
      return;
    }
    const spec = lineage && this.#rerunSpec(lineage);
    if (!lineage || !spec) {
      record.state = 'failed';
      const where = lostWhere(record);
      const why = !lineage
        ? 'it was stored by put() in the driver, or in a worker outside a task the driver can rerun (an actor call without `recompute`, or an async actor running several calls at once)'
        : lineage.failed
          ? `the task that made it, ${lineage.name}, failed when it ran again`
          : lineage.fn || lineage.rerunAs
            ? `the task that made it, ${lineage.name}, took arguments that nothing could make again, since freed (a put's lineage does not keep those stored)`
            : `it was made by ${lineage.name}, an actor call without \`recompute\``;
      record.error = new ObjectLostError(record.id, `object ${record.id} ${where}, and cannot be recomputed: ${why}`);
      return;
    }
    this.#markPending(record);
    this.#startRerun(lineage, spec, record.id);
  }

  /**
   * Runs `lineage` again under its return id: an actor call again on a live peer of its actor
   * where it names some (a pool's actors: the resources a task would need are theirs), else the
   * task that makes the same.
   */
  #startRerun(lineage: TaskRecord, spec: RerunSpec, objectId: string): void {
    const peer = lineage.actorId !== undefined ? this.#livePeer(spec) : undefined;
    if (peer) {
      this.#submitActorCall(peer.id, lineage.method!, lineage.args, lineage.argRefs, lineage.nested, lineage.returnId, {}, spec, { of: lineage, objectId });
      return;
    }
    const rerun = this.#makeTask(spec.fn, undefined, undefined, spec.args, spec.argRefs, spec.nested, spec.options, lineage.returnId);
    if (lineage.numReturns) this.#addReturns(rerun, lineage.numReturns);
    this.#takeOver(rerun, lineage, objectId);
    this.#submit(rerun);
  }

  /**
   * The rerun takes the repeated run's place for its result (see #makeTask) and every put it
   * made, under the same ids: its puts are named by the same attempt number.
   */
  #takeOver(rerun: TaskRecord, lineage: TaskRecord, objectId: string): void {
    rerun.rerun = true;
    rerun.putTag = lineage.putTag;
    for (const put of this.#putsOf(lineage)) {
      put.madeBy = rerun;
      rerun.keptBy++;
      (rerun.putIds ??= []).push(put.id);
      this.#unkeep(lineage);
    }
    this.events.emit('reconstruct', { objectId, task: rerun.name });
  }

  #livePeer(spec: RerunSpec): ActorRecord | undefined {
    let peers: ReadonlyArray<{ readonly actorId: string }> = [];
    try {
      peers = spec.peers?.() ?? [];
    } catch {
      // A failing callback names no peer: the task runs instead.
    }
    for (const peer of peers) {
      const actor = this.#actors.get(peer.actorId);
      if (actor && actor.state !== 'dead') return actor;
    }
    return undefined;
  }

  /** How to run `task` again to make what it made, if it can be: done, succeeded, and not a plain actor call. */
  #rerunSpec(task: TaskRecord): RerunSpec | undefined {
    if (task.state !== 'done' || task.failed) return undefined;
    const spec = task.fn ? { fn: task.fn, args: task.args, argRefs: task.argRefs, nested: task.nested, options: task.options } : task.rerunAs;
    return spec && this.#argumentsKnown(spec) ? spec : undefined;
  }

  /** Every argument of a rerun is still known (stored, or a record to recompute it from). */
  #argumentsKnown(spec: RerunSpec): boolean {
    for (const id of spec.argRefs) if (!this.#objects.has(id)) return false;
    for (const id of spec.nested) if (!isActorId(id) && !this.#objects.has(id)) return false;
    return true;
  }

  /** A value to be made again: readers wait for it. */
  #markPending(record: ObjectRecord): void {
    record.state = 'pending';
    record.value = undefined;
    record.nodes = NO_NODES;
    for (const child of record.nested ?? []) this.#dropHold(child);
    record.nested = undefined;
  }

  /**
   * `streams`: ids among `ids` that name streaming calls (ObjectRefGenerators), ready once their
   * next item is there to take (or none will come: the stream ended or was closed).
   */
  async #waitIds(ids: string[], numReturns: number, timeout: number, streams: ReadonlySet<string> = NO_STREAMS): Promise<[string[], string[]]> {
    const isReady = (id: string) => (streams.has(id) ? this.#streams.ready(id) : this.#objects.get(id)?.state !== 'pending');
    const check = () => ids.filter(isReady);
    let ready = check();
    if (ready.length < numReturns) {
      await new Promise<void>((resolve) => {
        let timer: NodeJS.Timeout | undefined;
        const done = () => {
          clearTimeout(timer);
          resolve();
        };
        if (Number.isFinite(timeout)) timer = setTimeout(done, timeout);
        const watchStream = (id: string) => {
          // Woken by an item, the end or a close; an item another reader took first is no wake.
          this.#streams.watch(id, () => {
            if (check().length >= numReturns) done();
            else if (!this.#streams.ready(id)) watchStream(id);
          });
        };
        for (const id of ids) {
          if (isReady(id)) continue;
          if (streams.has(id)) {
            watchStream(id);
            continue;
          }
          (this.#objects.get(id)!.waiters ??= []).push(() => {
            if (check().length >= numReturns) done();
          });
        }
      });
      ready = check();
    }
    const readySet = new Set(ready.slice(0, numReturns));
    return [ids.filter((id) => readySet.has(id)), ids.filter((id) => !readySet.has(id))];
  }

  async wait<R extends Waitable>(refs: readonly R[], numReturns: number, timeout: number): Promise<[R[], R[]]> {
    const [ready] = await this.#waitIds(refs.map((ref) => ref.id), numReturns, timeout, streamIdsOf(refs));
    const readySet = new Set(ready);
    return [refs.filter((ref) => readySet.has(ref.id)), refs.filter((ref) => !readySet.has(ref.id))];
  }

  // -------------------------------------------------------------------------------------------
  // Tasks

  submitTask(fn: FunctionDescriptor, args: unknown[], options: TaskOptions, streaming = false): ObjectRef<unknown> {
    // Options checked (and remembered) before the arguments are stored.
    this.#scheduler.requestFor(options, fn.name);
    const backpressure = streaming ? generatorBackpressureOf(options.generatorBackpressure, `task ${options.name ?? fn.name}`) : undefined;
    const returns = returnsOf(options, streaming, `task ${options.name ?? fn.name}`);
    const { bytes, argRefs, held } = this.#encodeArgs(args);
    const returnId = newObjectId();
    const ref = new ObjectRef(returnId);
    const task = this.#makeTask(fn, undefined, undefined, bytes, argRefs, held, options, returnId);
    if (returns > 1) this.#addReturns(task, returns);
    if (backpressure !== undefined) this.#streams.open(task, backpressure);
    this.#submit(task);
    return ref;
  }

  #makeTask(
    fn: FunctionDescriptor | undefined,
    actorId: string | undefined,
    method: string | undefined,
    args: Uint8Array,
    argRefs: string[],
    held: string[],
    options: TaskOptions,
    returnId: string,
  ): TaskRecord {
    const info = this.#scheduler.requestFor(options, fn?.name ?? method);
    const request = info.request;
    const strategy = options.schedulingStrategy ?? 'DEFAULT';
    const name = options.name ?? (fn ? fn.name : `${method}`);
    const allHeld = argRefs.length === 0 && held.length === 0 ? [] : [...argRefs, ...held];
    for (const id of allHeld) this.#addHold(id);
    let record = this.#objects.get(returnId);
    if (!record) this.#objects.set(returnId, (record = this.#newRecord(returnId, 0)));
    const task: TaskRecord = {
      // Only this driver makes task ids: a counter does, cheaper than random hex.
      taskId: `task-${(this.#nextTaskId++).toString(36)}`,
      name,
      fn,
      actorId,
      method,
      args,
      argRefs,
      nested: held,
      held: allHeld,
      options,
      returnId,
      request,
      classKey: fn ? this.#scheduler.classKey(fn, info) : '',
      environment: info.environment,
      strategy,
      maxRetries: options.maxRetries ?? 3,
      retryExceptions: options.retryExceptions ?? false,
      attempts: 0,
      state: 'waiting',
      pendingSince: Date.now(),
      keptBy: 1,
    };
    // A rerun takes over its result's record from the run it repeats.
    const previous = record.lineage;
    record.lineage = task;
    if (previous) this.#unkeep(previous);
    this.#tasks.set(task.taskId, task);
    return task;
  }

  /**
   * A call with several returns: a record for each return after the first (the task's own return
   * id), each naming the task as the way to make it again, as the first does; a rerun takes them
   * over from the run it repeats.
   */
  #addReturns(task: TaskRecord, count: number): void {
    task.numReturns = count;
    for (let index = 1; index < count; index++) {
      const id = returnIdAt(task.returnId, index);
      let record = this.#objects.get(id);
      if (!record) this.#objects.set(id, (record = this.#newRecord(id, 0)));
      const previous = record.lineage;
      record.lineage = task;
      task.keptBy++;
      if (previous) this.#unkeep(previous);
    }
  }

  /** Whether a return of `task` other than `id` still names it as the way to make it again. */
  #otherReturnLives(task: TaskRecord, id: string): boolean {
    if (task.numReturns === undefined) return false;
    return this.#returnIdsOf(task).some((other) => other !== id && this.#objects.get(other)?.lineage === task);
  }

  /** The ids of a task's returns: its return id, and those after it where it has several. */
  #returnIdsOf(task: TaskRecord): string[] {
    if (task.numReturns === undefined) return [task.returnId];
    return Array.from({ length: task.numReturns }, (_, index) => returnIdAt(task.returnId, index));
  }

  /** A ref to return `id` of a call just submitted with several (see ReturnsOptions). */
  returnRef(id: string): ObjectRef<unknown> {
    return new ObjectRef(id);
  }

  #submit(task: TaskRecord): void {
    const info = typeof task.strategy === 'string' ? this.#scheduler.knownRequest(task.options) : undefined;
    if (info?.feasibleAt !== this.#nodesLeft) {
      const infeasible = this.#scheduler.infeasibility(task.request, task.strategy);
      if (infeasible) {
        this.#failTask(task, new InfeasibleTaskError(`task ${task.name} can never be scheduled: ${infeasible.reason}`, infeasible.missing));
        return;
      }
      if (info) info.feasibleAt = this.#nodesLeft;
    }
    if (task.argRefs.length === 0) return this.#queueTask(task);
    this.#afterDependencies(task.argRefs, () => this.#prepareThen(task, () => this.#queueTask(task)));
  }

  #queueTask(task: TaskRecord): void {
    if (task.state === 'done') return;
    task.state = 'queued';
    this.#scheduler.enqueue(task, false);
    this.#schedule();
  }

  #afterDependencies(ids: string[], then: () => void): void {
    let remaining = 0;
    for (const id of ids) {
      const record = this.#objects.get(id);
      if (record && record.state === 'pending') {
        remaining++;
        (record.waiters ??= []).push(() => {
          if (--remaining === 0) then();
        });
      }
    }
    if (remaining === 0) then();
  }

  #schedule(): void {
    if (this.#scheduling || this.#closed) return;
    this.#scheduling = true;
    try {
      this.#placeGroups();
      this.#scheduler.dispatchQueued((task, lease) => this.#dispatch(task, lease));
      this.#startActors();
    } finally {
      this.#scheduling = false;
    }
  }

  #dispatch(task: TaskRecord, lease: Lease): void {
    task.state = 'running';
    task.runningSince = performance.now();
    task.attempts++;
    task.worker = lease.worker;
    lease.inflight++;
    lease.worker.inflight.add(task.taskId);
    let resolved: Record<string, WireValue>;
    try {
      resolved = this.#resolvedArgs(task.argRefs, lease.node);
    } catch (error) {
      lease.inflight--;
      lease.worker.inflight.delete(task.taskId);
      // A lease left with nothing to run gives its resources back: the recomputation or copy the
      // task now waits for may need them.
      this.#scheduler.endLeaseIfDone(lease);
      if (error instanceof ArgumentsRecovering) {
        // An argument is being recomputed: wait for it again.
        task.attempts--;
        task.state = 'waiting';
        task.worker = undefined;
        this.#afterDependencies(task.argRefs, () => {
          task.state = 'queued';
          this.#scheduler.enqueue(task, true);
          this.#schedule();
        });
      } else if (error instanceof CopyPending) {
        // An argument is on its way to the lease's node: send the task once it is there.
        task.attempts--;
        task.state = 'waiting';
        task.worker = undefined;
        const requeue = () => {
          if (task.state !== 'waiting') return;
          task.state = 'queued';
          this.#scheduler.enqueue(task, true);
          this.#schedule();
        };
        error.done.then(requeue, (copyError: Error) => {
          // A source that left is looked for again (the value recomputed if need be); else the copy's error is the task's.
          if (copyError instanceof NodeLostError) requeue();
          else if (task.state === 'waiting') this.#failTask(task, copyError);
        });
      } else {
        this.#failTask(task, error as Error);
      }
      return;
    }
    lease.worker.send({
      t: 'task',
      taskId: task.taskId,
      name: task.name,
      fn: task.fn,
      args: task.args,
      resolved,
      returnId: task.returnId,
      gpuIds: lease.gpuIds,
      putTag: this.#putTagFor(task, lease.worker),
      ...(task.stream ? { stream: streamSpec(task.stream) } : {}),
      ...(task.numReturns ? { numReturns: task.numReturns } : {}),
    });
  }

  #resolvedArgs(ids: string[], node: Node, consumerActorId?: string): Record<string, WireValue> {
    const resolved: Record<string, WireValue> = {};
    for (const id of ids) {
      const record = this.#objects.get(id);
      if (!record) throw new ObjectLostError(id, `argument ${id} was freed before the task ran`);
      if (record.state === 'failed') throw record.error!;
      if (record.held) {
        resolved[id] = this.#heldWire(record, node, consumerActorId);
        continue;
      }
      if (record.state === 'ready' && !this.#resident(record)) {
        this.#reconstruct(record);
        if ((record.state as ObjectRecord['state']) === 'pending') throw new ArgumentsRecovering();
        throw record.error!;
      }
      resolved[id] = this.#valueOn(record, node);
    }
    return resolved;
  }

  #onTaskDone(
    worker: WorkerProcess,
    taskId: string,
    value: WireValue | undefined,
    nested: string[] | undefined,
    error: RemoteErrorInfo | undefined,
    held?: { transport: string; meta: HeldMeta },
    lostArgument?: string,
    size?: number,
    more?: ReturnValue[],
  ): void {
    worker.inflight.delete(taskId);
    worker.taskPuts.delete(taskId);
    const task = this.#tasks.get(taskId);
    if (task?.actorId) {
      this.#onActorCallDone(task, value, nested, error, held, lostArgument, size, more);
      return;
    }
    if (!task && worker.actorId) {
      // A call cancelled while its actor ran or held it: it leaves the actor's running calls (an
      // actor with none left and no handle can end), and its stored results have no reader.
      const actor = this.#actors.get(worker.actorId);
      if (actor?.running.delete(taskId) && actor.unreferenced) queueMicrotask(() => this.#endIfUnreferenced(actor));
      this.#dropResults(worker, value, more);
      return;
    }
    const lease = this.#scheduler.leaseOf(worker);
    if (lease) {
      lease.inflight--;
      this.#scheduler.endLeaseIfDone(lease);
    }
    if (task && !task.cancelled && task.state === 'running') {
      if (error) {
        if (task.retryExceptions && task.attempts <= task.maxRetries && !lostArgument) {
          task.state = 'queued';
          this.#counters.tasksRetried++;
          this.#scheduler.enqueue(task, true);
        } else {
          this.#failTask(task, taskFailure(task, error, lostArgument));
        }
      } else {
        this.#finishTask(task, value, nested, size, more);
      }
    } else {
      // Cancelled meanwhile (and so forgotten): its stored results have no reader.
      this.#dropResults(worker, value, more);
    }
    this.#schedule();
  }

  /** Deletes what a call nobody waits for any more (cancelled) stored as its results. */
  #dropResults(worker: WorkerProcess, value: WireValue | undefined, more: ReturnValue[] | undefined): void {
    for (const result of [{ value }, ...(more ?? [])]) {
      if (result.value && 'node' in result.value) this.#dropUnreportedResult(worker.node, result.value.id);
    }
  }

  #finishTask(task: TaskRecord, value: WireValue | undefined, nested: string[] | undefined, storedSize?: number, more?: ReturnValue[]): void {
    task.state = 'done';
    this.#counters.tasksFinished++;
    if (task.ranSeconds !== undefined) this.#observeDuration(task.name, task.ranSeconds);
    this.#tasks.delete(task.taskId);
    if (this.#ended.keeps) this.#ended.add(this.#taskInfo(task, 'finished'));
    let size = value && 'inline' in value ? value.inline.byteLength : 0;
    if (value && 'node' in value) {
      // Stored results weigh in data locality too: record their bytes.
      if (storedSize !== undefined) size = storedSize;
      else {
        const view = this.nodes.find((node) => node.id === value.node)?.localStore?.getIfSealed(value.id);
        size = view?.size ?? 0;
        view?.release();
      }
    }
    if (task.stream) this.#streams.end(task.stream);
    this.#resolveObject(task.returnId, value, nested, size);
    const ids = this.#returnIdsOf(task);
    for (let index = 1; index < ids.length; index++) {
      const result = more?.[index - 1];
      this.#resolveObject(ids[index]!, result?.value, result?.nested, result?.size ?? (result && 'inline' in result.value ? result.value.inline.byteLength : 0));
    }
    // An actor call cannot be rerun (unless it says how), nor a streaming call (its items are
    // taken as they come): its records need not keep the call alive.
    if ((!task.fn && !task.rerunAs) || task.stream) {
      for (const id of ids) {
        const record = this.#objects.get(id);
        if (record?.lineage !== task) continue;
        record.lineage = undefined;
        task.keptBy--;
      }
    }
    if (task.rerun) this.#endRerun(task, ids);
    // Lineage: while its result or a put of it is referenced, the task can be rerun, so its
    // arguments stay; those that can themselves be made again keep just their records.
    if (task.keptBy <= 0) this.#releaseTaskHolds(task);
    else this.#keepAsLineage(task);
  }

  /** A rerun finished: puts it did not make again are lost; a result nobody holds goes. */
  #endRerun(task: TaskRecord, returnIds: string[]): void {
    for (const put of this.#putsOf(task)) {
      if (put.state !== 'pending') continue;
      this.#disown(put, task);
      this.#failObject(put.id, new ObjectLostError(put.id, `object ${put.id} ${lostWhere(put)}, and ${task.name}, run again to make it, did not put it this time (its puts differ from run to run)`));
    }
    for (const id of returnIds) {
      const record = this.#objects.get(id);
      if (record && record.holds === 0 && !record.lineageHolds) this.#deleteRecord(record);
    }
  }

  /** The arguments a done task's lineage holds: records only, for those that can be made again. */
  #keepAsLineage(task: TaskRecord): void {
    const kept: string[] = [];
    for (const id of task.held) {
      const record = this.#objects.get(id);
      if (!record || !this.#recomputable(record)) {
        kept.push(id);
        continue;
      }
      record.lineageHolds = (record.lineageHolds ?? 0) + 1;
      (task.lineageHeld ??= []).push(id);
      this.#dropHold(id);
    }
    task.held = kept;
  }

  /**
   * A done task's result went while what it put lives on. Arguments nothing could make again
   * stay stored while a task's result is referenced; for its puts alone they go, as in Ray:
   * else a pipeline's every stage would stay in the store for as long as its last blocks live.
   * Such puts are then lost for good with their node.
   */
  #releaseForPuts(task: TaskRecord): void {
    const kept: string[] = [];
    const freed: string[] = [];
    for (const id of task.held) {
      const value = this.#objects.get(id)?.value;
      if (value && 'node' in value) freed.push(id);
      else kept.push(id);
    }
    if (freed.length === 0) return;
    task.held = kept;
    for (const id of freed) this.#dropHold(id);
  }

  #failTask(task: TaskRecord, error: Error): void {
    task.state = 'done';
    this.#tasks.delete(task.taskId);
    if (task.rerun && task.rerunAs && error instanceof ActorDiedError && !this.#closed) {
      // The peer running a rerun died (or was stopped): run it again on another, or as its task.
      this.#startRerun(task, task.rerunAs, task.returnId);
      return;
    }
    task.failed = true;
    if (!task.cancelled) this.#counters.tasksFailed++;
    if (this.#ended.keeps) this.#ended.add(this.#taskInfo(task, task.cancelled ? 'cancelled' : 'failed', error));
    if (task.stream) this.#streams.end(task.stream, error);
    // A rerun made for a lost put leaves its results alone where they are still stored.
    for (const id of this.#returnIdsOf(task)) {
      const result = this.#objects.get(id);
      if (!task.rerun || result?.state !== 'ready' || !this.#resident(result)) this.#failObject(id, error);
    }
    // What it put cannot be made again by it; a rerun's puts still missing are lost for good.
    for (const put of this.#putsOf(task)) {
      this.#disown(put, task);
      if (put.state === 'pending') this.#failObject(put.id, new ObjectLostError(put.id, `object ${put.id} ${lostWhere(put)}, and ${task.name}, run again to make it, failed: ${error.message}`));
    }
    this.#releaseTaskHolds(task);
  }

  #releaseTaskHolds(task: TaskRecord): void {
    const held = task.held;
    task.held = [];
    for (const id of held) this.#dropHold(id);
    const lineageHeld = task.lineageHeld;
    task.lineageHeld = undefined;
    for (const id of lineageHeld ?? []) this.#dropLineageHold(id);
  }

  /**
   * The attempt number a task's puts are named by, where the driver keeps its lineage (a function,
   * or an actor call that says how to recompute it); a rerun keeps the number of the run it repeats.
   * A new attempt forgets the puts of the one before: a rerun could not make them again.
   */
  #putTagFor(task: TaskRecord, worker: WorkerProcess): number | undefined {
    if ((!task.fn && !task.rerunAs) || !isObjectId(task.returnId)) return undefined;
    const tag = task.rerun ? task.putTag! : task.attempts;
    if (tag !== task.putTag) {
      for (const put of this.#putsOf(task)) this.#disown(put, task);
      task.putIds = undefined;
      task.putTag = tag;
    }
    return tag;
  }

  cancel(ref: { readonly id: string }, force: boolean): void {
    this.#cancelId(ref.id, force);
  }

  #cancelId(id: string, force: boolean): void {
    const task = this.#objects.get(id)?.lineage;
    if (!task || task.state === 'done') return;
    task.cancelled = true;
    const worker = task.worker;
    this.#failTask(task, new TaskCancelledError(`task ${task.name} was cancelled`));
    if (force && worker && !task.actorId) worker.kill();
    else if (worker && !worker.exited) {
      // A generator is closed at its next yield (its finally blocks run), as a caller's return() does.
      if (task.stream) worker.send({ t: 'stream-stop', taskId: task.taskId });
      // Queued in the worker, it never starts; running, its signal is aborted (RuntimeContext.signal).
      worker.send({ t: 'cancel', taskId: task.taskId });
    }
  }

  // -------------------------------------------------------------------------------------------
  // Streaming calls (generators): items reported one by one, taken by the caller in order

  /**
   * An item from the producer of the call's current attempt; anything else is stale. Stored items
   * take the ids of the worker's own puts, in the same sequence: one it stored and died before
   * reporting is found and deleted with its other unreported puts (see #onWorkerGone), and a
   * retry stores what it sends under ids of its own.
   */
  #onYield(worker: WorkerProcess, message: YieldMessage): void {
    const task = this.#tasks.get(message.taskId);
    const stream = task?.stream;
    const value = message.value;
    if ('node' in value) worker.storedPuts++;
    if (worker.exited || !task || !stream || stream.closed || task.worker !== worker || task.state !== 'running' || message.index !== stream.items.length) {
      // Nobody will take it (the caller let go, the call ended or runs elsewhere now): a retry
      // sends it again. What was stored goes.
      if ('node' in value) worker.node.deleteObject(value.id);
      return;
    }
    const id = 'node' in value ? value.id : newObjectId();
    // The stream's hold, passed to the caller's ref when taken.
    const record = this.#newRecord(id, 1);
    record.yieldedBy = task.name;
    this.#objects.set(id, record);
    this.#resolveObject(id, value, message.nested, message.size ?? ('inline' in value ? value.inline.byteLength : 0));
    this.#streams.push(stream, id);
  }

  nextStreamItem(id: string, timeout: number): Promise<ObjectRef<unknown> | undefined> {
    return this.#streams.take(id, timeout).then((item) => {
      if (item === undefined) return undefined;
      // The stream's hold on the item becomes this ref's.
      const ref = new ObjectRef(item);
      this.#dropHold(item);
      return ref;
    });
  }

  closeStream(id: string): void {
    this.#streams.close(id);
  }

  /** Idle workers above a node's soft limit (its CPU count) go after a second of idleness. */
  #reapIdleWorkers(): void {
    const now = Date.now();
    for (const node of this.nodes) {
      const idle = [...node.workers.values()].filter((worker) => worker.state === 'idle').sort((a, b) => a.idleSince - b.idleSince);
      let pooled = [...node.workers.values()].filter((worker) => worker.state !== 'actor' && worker.state !== 'dead').length;
      for (const worker of idle) {
        if (pooled <= node.softLimit || now - worker.idleSince < 1000) break;
        worker.state = 'dead';
        if (worker.connection) worker.send({ t: 'exit' });
        else worker.kill();
        pooled--;
      }
    }
  }

  #warnPending(): void {
    const now = Date.now();
    for (const task of this.#scheduler.queuedTasks()) {
      if (task.warned || now - task.pendingSince < 1000) continue;
      task.warned = true;
      this.events.emit('warning', {
        kind: 'pending-resources',
        task: task.name,
        message: `task ${task.name} has waited over 1 s for ${describeResources(task.request)}`,
      });
    }
  }

  // -------------------------------------------------------------------------------------------
  // Tensor transport: results an actor holds move when read

  registerCollectiveGroup(name: string, actorIds: readonly string[], backend: 'cpu' | 'nccl'): void {
    this.#collectiveGroups.set(name, { actorIds, backend });
  }

  unregisterCollectiveGroup(name: string): void {
    this.#collectiveGroups.delete(name);
  }

  /** The group over which `record`'s held tensors can go to `consumer`, if any. */
  #communicatorRoute(record: ObjectRecord, consumer: string | undefined): { group: string; source: number; destination: number } | undefined {
    const held = record.held;
    if (!held || !consumer || (held.transport !== 'nccl' && held.transport !== 'auto')) return undefined;
    // Sends and receives pair up in call order: only a consumer that runs one call at a time.
    const consumerOptions = this.#actors.get(consumer)?.options;
    if ((consumerOptions?.maxConcurrency ?? 1) !== 1 || consumerOptions?.concurrencyGroups) return undefined;
    const onGpu = held.meta.tensors.some(([, , device]) => device !== 'cpu');
    for (const [name, group] of this.#collectiveGroups) {
      if ((group.backend === 'nccl') !== onGpu) continue;
      const source = group.actorIds.indexOf(held.actorId);
      const destination = group.actorIds.indexOf(consumer);
      if (source >= 0 && destination >= 0 && source !== destination) return { group: name, source, destination };
    }
    return undefined;
  }

  #ipcRoute(record: ObjectRecord, node: Node): boolean {
    const held = record.held;
    if (!held || (held.transport !== 'ipc' && held.transport !== 'auto')) return false;
    const producer = this.#actors.get(held.actorId);
    return producer?.node === node && held.meta.tensors.every(([, , device]) => device !== 'cpu');
  }

  /** Before a task or call is sent: materialize or export the held tensors it reads. */
  #prepareThen(task: TaskRecord, then: () => void): void {
    const waits: Promise<unknown>[] = [];
    for (const id of task.argRefs) {
      const record = this.#objects.get(id);
      if (!record?.held || record.held.actorId === task.actorId || this.#communicatorRoute(record, task.actorId)) continue;
      const producerNode = this.#actors.get(record.held.actorId)?.node;
      if (producerNode && this.#ipcRoute(record, producerNode)) {
        if (!record.ipcHandles) waits.push(this.#exportIpc(record));
        continue;
      }
      waits.push(this.#materialize(record));
    }
    if (waits.length === 0) return then();
    task.preparing = true;
    Promise.all(waits).then(
      () => {
        task.preparing = false;
        then();
      },
      (error: Error) => {
        task.preparing = false;
        this.#failTask(task, error);
        then();
      },
    );
  }

  #heldWire(record: ObjectRecord, node: Node, consumer: string | undefined): WireValue {
    // The actor that holds them reads its own tensors where they are.
    if (consumer === record.held!.actorId) return this.#directWire(record, node, consumer)!;
    const route = this.#communicatorRoute(record, consumer);
    if (route) {
      const send = this.submitActorTask(record.held!.actorId, '__trellis_send_held', [record.id, route.group, route.destination]);
      void this.get([send], Infinity).then(
        () => send[Symbol.dispose](),
        (error: Error) => this.events.emit('warning', { kind: 'tensor-transport', message: `sending ${record.id} failed: ${error.message}` }),
      );
      this.events.emit('tensor-transport', { objectId: record.id, route: 'communicator', group: route.group });
      return { recv: { group: route.group, source: route.source, meta: record.held!.meta } };
    }
    const direct = this.#directWire(record, node, consumer);
    if (direct) return direct;
    // Neither route fits this reader: bring the tensors into the store first.
    void this.#materialize(record).then(() => this.#schedule(), () => this.#schedule());
    throw new ArgumentsRecovering();
  }

  /** Whether `reader` on `node` takes `record`'s held tensors without moving them (#directWire). */
  #readsDirectly(record: ObjectRecord, node: Node, reader: string | undefined): boolean {
    if (!record.held) return false;
    return (reader !== undefined && reader === record.held.actorId) || (record.ipcHandles !== undefined && this.#ipcRoute(record, node));
  }

  /** Held tensors read without moving them first: by their holder itself, or mapped by IPC. */
  #directWire(record: ObjectRecord, node: Node, reader: string | undefined): WireValue | undefined {
    if (!this.#readsDirectly(record, node, reader)) return undefined;
    if (reader === record.held!.actorId) {
      this.events.emit('tensor-transport', { objectId: record.id, route: 'local' });
      return { local: record.id };
    }
    this.events.emit('tensor-transport', { objectId: record.id, route: 'ipc' });
    return { ipc: { handles: record.ipcHandles!, meta: record.held!.meta } };
  }

  async #exportIpc(record: ObjectRecord): Promise<void> {
    const ref = this.submitActorTask(record.held!.actorId, '__trellis_export_held', [record.id]);
    try {
      record.ipcHandles = (await this.get([ref], Infinity))[0] as unknown[];
    } finally {
      ref[Symbol.dispose]();
    }
  }

  /** Moves held tensors into the object store under a system call's result, then adopts it. */
  #materialize(record: ObjectRecord): Promise<void> {
    const held = record.held;
    if (!held) return Promise.resolve();
    record.materializing ??= (async () => {
      const ref = this.submitActorTask(held.actorId, '__trellis_materialize', [record.id]);
      try {
        const [source] = await Promise.all([this.#whenSettled(ref.id, Infinity)]);
        if (source.state === 'failed') throw source.error!;
        record.value = source.value;
        record.nodes = source.nodes;
        record.size = source.size;
        // The store copy now belongs to `record`: dropping the call's ref must not delete it.
        source.nodes = NO_NODES;
        source.value = { inline: pack(null) };
        record.held = undefined;
        record.retiredBy = held.actorId;
        this.events.emit('tensor-transport', { objectId: record.id, route: 'store' });
      } finally {
        record.materializing = undefined;
        ref[Symbol.dispose]();
      }
    })();
    return record.materializing;
  }

  #freeHeld(actorId: string, id: string): void {
    const actor = this.#actors.get(actorId);
    if (!actor || actor.state === 'dead' || this.#closed) return;
    const ref = this.submitActorTask(actorId, '__trellis_free_held', [id]);
    void this.get([ref], Infinity).then(
      () => ref[Symbol.dispose](),
      () => ref[Symbol.dispose](),
    );
  }

  // -------------------------------------------------------------------------------------------
  // Placement groups

  createPlacementGroup(bundles: Resources[], strategy: PlacementStrategy, options: PlacementGroupOptions = {}): PlacementGroup {
    const group = new PlacementGroup(bundles, strategy, options);
    group.bindRemoval(() => (this.#closed ? Promise.resolve() : this.removePlacementGroup(group)));
    this.#groups.set(group.id, group);
    const impossible = groupInfeasibility(group, this.nodes);
    if (impossible) group.markFailed(impossible);
    else this.#schedule();
    return group;
  }

  /** Resolves once the processes of the actors it killed have exited. */
  removePlacementGroup(group: PlacementGroup): Promise<void> {
    const known = this.#groups.get(group.id);
    if (!known || known.state === 'removed') return Promise.resolve();
    const gone: Promise<void>[] = [];
    // A rescheduling group still holds its bundles on the nodes that stayed.
    const wasCreated = known.state === 'created' || known.state === 'rescheduling';
    known.markRemoved();
    this.#groups.delete(group.id);
    if (wasCreated) releaseGroup(known);
    // Actors placed in the group go with it; tasks still waiting for it fail.
    for (const actor of this.#actors.values()) {
      if (actor.placement?.group === known || (typeof actor.options.schedulingStrategy === 'object' && actor.options.schedulingStrategy.type === 'placement-group' && actor.options.schedulingStrategy.placementGroup.id === known.id)) {
        gone.push(this.whenActorProcessGone(actor.id));
        this.kill(actor.id, true);
      }
    }
    for (const task of [...this.#scheduler.queuedTasks()]) {
      const strategy = task.strategy;
      if (typeof strategy === 'object' && strategy.type === 'placement-group' && strategy.placementGroup.id === known.id && task.state === 'queued') {
        this.#failTask(task, new InfeasibleTaskError(`task ${task.name} waited on placement group ${known.id}, which was removed`, {}));
      }
    }
    this.#schedule();
    return Promise.all(gone).then(() => undefined);
  }

  #placeGroups(): void {
    for (const group of this.#groups.values()) {
      const open = this.nodes.filter((node) => !node.draining);
      if (group.state === 'pending' && reserve(group, open)) group.markCreated();
      else if (group.state === 'rescheduling' && reserveLost(group, open)) this.events.emit('placement-group-rescheduled', { placementGroupId: group.id });
    }
  }

  // -------------------------------------------------------------------------------------------
  // Actors

  createActor(cls: FunctionDescriptor, args: unknown[], options: ActorOptions, methods: string[]): { actorId: string; lifetime: ObjectRef<unknown> } {
    if (options.runtimeEnv !== undefined) workerEnvironmentOf(options.runtimeEnv, `actor ${cls.name} runtimeEnv`);
    const { bytes, argRefs, held } = this.#encodeArgs(args);
    const actorId = `actor-${newObjectId().slice(0, 16)}`;
    this.#createActorRecord(actorId, cls, bytes, argRefs, held, options, methods);
    return { actorId, lifetime: new ObjectRef(actorId) };
  }

  #createActorRecord(
    actorId: string,
    cls: FunctionDescriptor,
    args: Uint8Array,
    argRefs: string[],
    held: string[],
    options: ActorOptions,
    methods: string[],
  ): void {
    if (options.name && this.#namedActors.has(options.name)) {
      throw new RegistrationError(`an actor named '${options.name}' already exists`);
    }
    checkActorConcurrency(options, cls.name);
    const environment = workerEnvironmentOf(options.runtimeEnv, `actor ${cls.name} runtimeEnv`);
    const allHeld = [...argRefs, ...held];
    for (const id of allHeld) this.#addHold(id);
    const actor: ActorRecord = {
      id: actorId,
      name: cls.name,
      registeredName: options.name,
      cls,
      methods,
      args,
      argRefs,
      held: allHeld,
      options,
      request: toFixed(requestOf(options, 0)),
      environment,
      state: 'pending',
      gpuIds: [],
      restarts: 0,
      queue: new Deque(),
      running: new Map(),
      callNames: new Map(),
    };
    this.#actors.set(actorId, actor);
    if (options.name) this.#namedActors.set(options.name, actorId);
    const infeasible = this.#scheduler.infeasibility(actor.request, options.schedulingStrategy ?? 'DEFAULT');
    if (infeasible) {
      this.#actorDied(actor, `actor ${cls.name} can never be scheduled: ${infeasible.reason}`);
      return;
    }
    this.#afterDependencies(argRefs, () => this.#schedule());
  }

  #startActors(): void {
    for (const actor of this.#actors.values()) {
      if (actor.state !== 'pending' && actor.state !== 'restarting') continue;
      if (actor.worker) continue;
      if (actor.argRefs.some((id) => this.#objects.get(id)?.state === 'pending')) continue;
      const placement = this.#scheduler.place(actor.request, actor.options.schedulingStrategy ?? 'DEFAULT');
      if (!placement) continue;
      const node = placement.node;
      placement.pool.acquire(actor.request);
      actor.gpuIds = node.assignGpus(actor.request.get('GPU') ?? 0) ?? [];
      actor.node = node;
      actor.placement = placement;
      // A dedicated, fresh process: an actor's state must not leak into pooled task workers. A
      // prestarted worker that never ran a task is as fresh as a new one and saves the start-up
      // (a second or more of loading). The pool starts another worker when a task next needs one,
      // not now: a start-up competing with the actor's first calls costs more than it saves.
      const worker = [...node.workers.values()].find((candidate) => candidate.state === 'idle' && !candidate.leasedOnce && candidate.environment.key === actor.environment.key)
        ?? this.#spawn(node, actor.environment, isLightActorModule(actor.cls.module));
      worker.state = 'actor';
      worker.actorId = actor.id;
      actor.worker = worker;
      actor.state = 'starting';
      const construct = () => {
        if (worker.exited || actor.worker !== worker) return;
        let resolved: Record<string, WireValue>;
        try {
          resolved = this.#resolvedArgs(actor.argRefs, node);
        } catch (error) {
          // Arguments on their way to the actor's node: construct once they are there.
          if (error instanceof CopyPending) return void error.done.then(construct, construct);
          this.#actorDied(actor, `actor ${actor.name} could not get its constructor arguments: ${(error as Error).message}`);
          worker.kill();
          return;
        }
        worker.send({
          t: 'actor',
          actorId: actor.id,
          name: actor.name,
          cls: actor.cls,
          args: actor.args,
          resolved,
          maxConcurrency: actor.options.maxConcurrency ?? 1,
          ...(actor.options.concurrencyGroups ? { concurrencyGroups: actor.options.concurrencyGroups } : {}),
          gpuIds: actor.gpuIds,
        });
      };
      void worker.ready.then(construct);
    }
  }

  #onActorReady(actorId: string, error: RemoteErrorInfo | undefined): void {
    const actor = this.#actors.get(actorId);
    if (!actor || actor.state === 'dead') return;
    if (error) {
      this.#actorDied(actor, `actor ${actor.name}'s constructor threw ${error.name}: ${error.message}`, new TaskError(`${actor.name}.constructor`, error));
      actor.worker?.kill();
      return;
    }
    actor.state = 'alive';
    this.#pumpActor(actor);
  }

  submitActorTask(actorId: string, method: string, args: unknown[], options: ActorCallOptions = {}, streaming = false): ObjectRef<unknown> {
    const backpressure = streaming ? generatorBackpressureOf(options.generatorBackpressure, `actor method ${method}`) : undefined;
    if (streaming && options.recompute) throw new InvalidArgumentError(`actor method ${method} is a generator: its items cannot be made again by a task (recompute)`);
    returnsOf(options, streaming, `actor method ${method}`);
    let rerunAs: RerunSpec | undefined;
    if (options.recompute) {
      checkRecompute(options.recompute);
      const encoded = this.#encodeArgs(options.recompute.args);
      rerunAs = {
        fn: options.recompute.task.descriptor,
        args: encoded.bytes,
        argRefs: encoded.argRefs,
        nested: encoded.held,
        options: options.recompute.options ?? {},
        peers: options.recompute.peers,
      };
    }
    const { bytes, argRefs, held } = this.#encodeArgs(args);
    const returnId = newObjectId();
    const ref = new ObjectRef(returnId);
    this.#submitActorCall(actorId, method, bytes, argRefs, held, returnId, options, rerunAs, undefined, backpressure);
    return ref;
  }

  #submitActorCall(
    actorId: string,
    method: string,
    args: Uint8Array,
    argRefs: string[],
    held: string[],
    returnId: string,
    options: ActorCallOptions = {},
    rerunAs?: RerunSpec,
    rerunOf?: { of: TaskRecord; objectId: string },
    /** A call to a generator method: the stream's backpressure (Infinity: unbounded). */
    backpressure?: number,
  ): void {
    const actor = this.#actors.get(actorId);
    const task = this.#makeTask(undefined, actorId, method, args, argRefs, held, ACTOR_CALL_OPTIONS, returnId);
    if ((options.numReturns ?? 1) > 1) this.#addReturns(task, options.numReturns!);
    if (backpressure !== undefined) this.#streams.open(task, backpressure);
    task.name = actor ? callName(actor, method) : `actor.${method}`;
    if (rerunOf) this.#takeOver(task, rerunOf.of, rerunOf.objectId);
    if (rerunAs) {
      // The rerun's arguments stay with the call's lineage, as a task's own arguments do.
      task.rerunAs = rerunAs;
      const rerunHeld = [...rerunAs.argRefs, ...rerunAs.nested];
      for (const id of rerunHeld) this.#addHold(id);
      task.held = [...task.held, ...rerunHeld];
    }
    if (!actor) {
      const refused = this.#refusedActors.get(actorId);
      this.#failTask(task, new ActorDiedError(actorId, refused ? `actor ${actorId} was never created: ${refused}` : `actor ${actorId} does not exist in this cluster`));
      return;
    }
    task.maxRetries = actor.options.maxTaskRetries ?? 0;
    task.tensorTransport = options.tensorTransport ?? actor.options.methods?.[method]?.tensorTransport;
    if (options.concurrencyGroup !== undefined) {
      try {
        checkConcurrencyGroup(options.concurrencyGroup, actor.options.concurrencyGroups, `${task.name}`);
      } catch (error) {
        this.#failTask(task, error as Error);
        return;
      }
    }
    task.concurrencyGroup = options.concurrencyGroup ?? actor.options.methods?.[method]?.concurrencyGroup;
    if (actor.state === 'dead') {
      this.#failTask(task, new ActorDiedError(actorId, actor.deathCause ?? `actor ${actor.name} is dead`));
      return;
    }
    task.state = 'queued';
    // Bookkeeping that runs between the actor's calls (see isImmediateSystemMethod) goes ahead of
    // calls still waiting on their arguments, which may wait on the very call it unblocks.
    if (isImmediateSystemMethod(method)) actor.queue.unshift(task);
    else actor.queue.push(task);
    if (argRefs.length === 0) this.#pumpActor(actor);
    else this.#afterDependencies(argRefs, () => this.#prepareThen(task, () => this.#pumpActor(actor)));
  }

  /** Sends queued calls in submission order; a call waiting on arguments holds back later ones. */
  #pumpActor(actor: ActorRecord): void {
    if (actor.state !== 'alive' || !actor.worker) return;
    while (actor.queue.length > 0) {
      const task = actor.queue.peek()!;
      if (task.state === 'done') {
        actor.queue.shift();
        continue;
      }
      if (task.preparing || (task.argRefs.length > 0 && task.argRefs.some((id) => this.#objects.get(id)?.state === 'pending'))) return;
      actor.queue.shift();
      let resolved: Record<string, WireValue>;
      try {
        resolved = this.#resolvedArgs(task.argRefs, actor.node!, actor.id);
      } catch (error) {
        if (error instanceof ArgumentsRecovering) {
          // An argument is being recomputed or materialized: keep the call at the head.
          actor.queue.unshift(task);
          this.#afterDependencies(task.argRefs, () => this.#prepareThen(task, () => this.#pumpActor(actor)));
          return;
        }
        if (error instanceof CopyPending) {
          // An argument is on its way to the actor's node: the call stays at the head till then.
          actor.queue.unshift(task);
          task.preparing = true;
          error.done.then(
            () => {
              task.preparing = false;
              this.#pumpActor(actor);
            },
            (copyError: Error) => {
              task.preparing = false;
              if (!(copyError instanceof NodeLostError)) this.#failTask(task, copyError);
              this.#pumpActor(actor);
            },
          );
          return;
        }
        this.#failTask(task, error as Error);
        continue;
      }
      task.state = 'running';
      task.runningSince = performance.now();
      task.attempts++;
      task.worker = actor.worker;
      actor.running.set(task.taskId, task);
      actor.worker.inflight.add(task.taskId);
      actor.worker.send({
        t: 'task',
        taskId: task.taskId,
        name: task.name,
        actorId: actor.id,
        method: task.method,
        args: task.args,
        resolved,
        returnId: task.returnId,
        tensorTransport: task.tensorTransport,
        putTag: this.#putTagFor(task, actor.worker),
        ...(task.stream ? { stream: streamSpec(task.stream) } : {}),
        ...(task.numReturns ? { numReturns: task.numReturns } : {}),
        ...(task.concurrencyGroup !== undefined ? { concurrencyGroup: task.concurrencyGroup } : {}),
      });
    }
  }

  #onActorCallDone(
    task: TaskRecord,
    value: WireValue | undefined,
    nested: string[] | undefined,
    error: RemoteErrorInfo | undefined,
    held?: { transport: string; meta: HeldMeta },
    lostArgument?: string,
    size?: number,
    more?: ReturnValue[],
  ): void {
    const actor = this.#actors.get(task.actorId!);
    actor?.running.delete(task.taskId);
    if (actor?.unreferenced) queueMicrotask(() => this.#endIfUnreferenced(actor));
    if (task.state !== 'running' || task.cancelled) return;
    if (error) {
      this.#failTask(task, taskFailure(task, error, lostArgument));
      return;
    }
    // Marked before the result resolves: readers woken by it must see that the actor holds it.
    const record = this.#objects.get(task.returnId);
    if (held && record) {
      const { ipc, ...meta } = held.meta;
      record.held = { actorId: task.actorId!, transport: held.transport, meta };
      if (ipc) record.ipcHandles = ipc;
    }
    else if (held) this.#freeHeld(task.actorId!, task.returnId);
    this.#finishTask(task, value, nested, size, more);
  }

  /** `how`: the worker's death (`pid 42 killed by SIGKILL`), named in what fails. */
  #onActorWorkerDied(actor: ActorRecord, how: string): void {
    if (actor.state === 'dead') return;
    actor.worker = undefined;
    if (actor.placement) this.#scheduler.release(actor.placement, actor.request, actor.gpuIds);
    actor.placement = undefined;
    const maxRestarts = actor.options.maxRestarts ?? 0;
    const running = [...actor.running.values()];
    actor.running.clear();
    if (maxRestarts === -1 || actor.restarts < maxRestarts) {
      actor.restarts++;
      actor.state = 'restarting';
      this.#loseHeld(actor, `actor ${actor.name} died (${how}) and restarts without it`);
      // Its state is gone: compiled graphs running on it must stop.
      this.events.emit('actor-died', { actorId: actor.id, cause: `actor ${actor.name} died (${how}) and restarts`, restarting: true });
      // Calls that were running: retried first (in order) while maxTaskRetries allows.
      const retry: TaskRecord[] = [];
      for (const task of running) {
        if (task.attempts <= task.maxRetries) {
          task.state = 'queued';
          this.#counters.tasksRetried++;
          retry.push(task);
        } else {
          this.#failTask(task, new ActorDiedError(actor.id, `actor ${actor.name} died (${how}) while running ${task.name}; the actor restarts but the call has no retries left`));
        }
      }
      actor.queue.unshift(...retry);
      this.#schedule();
      return;
    }
    for (const task of running) {
      this.#failTask(task, new ActorDiedError(actor.id, `actor ${actor.name} died (${how}) while running ${task.name}`));
    }
    this.#actorDied(actor, `actor ${actor.name} died (${how}) and has no restarts left`);
  }

  #actorDied(actor: ActorRecord, cause: string, error?: Error): void {
    actor.state = 'dead';
    actor.deathCause = cause;
    this.#loseHeld(actor, cause);
    this.events.emit('actor-died', { actorId: actor.id, cause, restarting: false });
    for (const watch of [...this.#actorWatches]) {
      if (!watch.actorIds.has(actor.id)) continue;
      this.#actorWatches.delete(watch);
      watch.onDeath(actor.id, cause);
    }
    const died = new ActorDiedError(actor.id, cause);
    if (error) Object.defineProperty(died, 'cause', { value: error });
    for (const task of actor.queue) this.#failTask(task, died);
    actor.queue = new Deque();
    for (const task of actor.running.values()) this.#failTask(task, died);
    actor.running.clear();
    if (actor.registeredName) this.#namedActors.delete(actor.registeredName);
    const held = actor.held;
    actor.held = [];
    for (const id of held) this.#dropHold(id);
  }

  /**
   * Results the actor's process held (tensor transport) went with it: reading them fails with
   * ObjectLostError rather than mapping a dead process's memory or asking a new process for them.
   */
  #loseHeld(actor: ActorRecord, cause: string): void {
    for (const record of this.#objects.values()) {
      if (record.held?.actorId !== actor.id) continue;
      record.held = undefined;
      record.ipcHandles = undefined;
      record.state = 'failed';
      record.error = new ObjectLostError(record.id, `object ${record.id} was held by actor ${actor.name} (tensor transport) and is lost: ${cause}`);
    }
  }

  watchActors(actorIds: readonly string[], onDeath: (actorId: string, cause: string) => void): () => void {
    const watch = { actorIds: new Set(actorIds), onDeath };
    const stop = () => void this.#actorWatches.delete(watch);
    const dead = actorIds.find((actorId) => (this.#actors.get(actorId)?.state ?? 'dead') === 'dead');
    if (dead !== undefined) {
      const cause = this.#actors.get(dead)?.deathCause ?? `actor ${dead} is unknown`;
      queueMicrotask(() => onDeath(dead, cause));
      return () => {};
    }
    this.#actorWatches.add(watch);
    return stop;
  }

  whenActorProcessGone(actorId: string): Promise<void> {
    const worker = this.#actors.get(actorId)?.worker;
    if (!worker || worker.exited) return Promise.resolve();
    return new Promise((resolve) => worker.child.once('exit', () => resolve()));
  }

  kill(actorId: string, noRestart: boolean): void {
    const actor = this.#actors.get(actorId);
    if (!actor || actor.state === 'dead') return;
    if (noRestart) this.#end(actor, `actor ${actor.name} was killed`);
    else actor.worker?.kill();
  }

  /** Ends an actor for good: its process, its resources, and its queue (failed with `cause`). */
  #end(actor: ActorRecord, cause: string): void {
    const worker = actor.worker;
    if (actor.placement && worker) this.#scheduler.release(actor.placement, actor.request, actor.gpuIds);
    actor.placement = undefined;
    actor.worker = undefined;
    this.#actorDied(actor, cause);
    worker?.kill();
  }

  /**
   * An unnamed actor with no handle left ends, as Ray's does, once nothing it was asked remains:
   * calls queued or running (a call's result may still be read), and results it holds (tensor
   * transport) that something still references, whose freeing is itself a call.
   */
  #endIfUnreferenced(actor: ActorRecord): void {
    if (!actor.unreferenced || actor.state === 'dead' || this.#closed) return;
    if (actor.queue.length > 0 || actor.running.size > 0) return;
    for (const record of this.#objects.values()) {
      if (record.held?.actorId === actor.id || record.retiredBy === actor.id) return;
    }
    this.#end(actor, `actor ${actor.name} ended: no handle to it was left`);
  }

  #lookupActor(name: string): ActorLookup {
    const actorId = this.#namedActors.get(name);
    const actor = actorId ? this.#actors.get(actorId) : undefined;
    if (!actor) throw new ActorDiedError('', `no live actor is named '${name}'`);
    return { actorId: actor.id, descriptor: actor.cls, methods: actor.methods };
  }

  async getActor(name: string): Promise<ActorLookup> {
    return this.#lookupActor(name);
  }

  objectNodes(ids: readonly string[]): string[][] {
    return ids.map((id) => {
      const record = this.#objects.get(id);
      return record && record.nodes.size > 0 ? [...record.nodes] : [];
    });
  }

  actorNode(actorId: string): string | undefined {
    return this.#actors.get(actorId)?.node?.id;
  }

  nodeDraining(nodeId: string): boolean {
    return this.nodes.find((node) => node.id === nodeId)?.draining ?? false;
  }

  /**
   * Ends the attempt of `task` running on `worker` (its result came, or the worker died); `ran`:
   * the worker's own measure of it, in microseconds.
   */
  #closeAttempt(task: TaskRecord | undefined, worker: WorkerProcess, outcome: NonNullable<TaskAttempt['outcome']>, ran?: number): void {
    if (!task || task.worker !== worker || task.runningSince === undefined) return;
    const now = performance.now();
    const seconds = ran !== undefined ? ran / 1e6 : (now - task.runningSince) / 1000;
    task.ranSeconds = seconds;
    const endedAt = performance.timeOrigin + now;
    (task.attemptLog ??= []).push({ attempt: task.attempts, nodeId: worker.node.id, workerId: worker.id, pid: worker.child.pid ?? 0, startedAt: endedAt - seconds * 1000, endedAt, outcome });
    task.runningSince = undefined;
  }

  /**
   * What listTasks() says of `task`: its state (`ended` once over) and attempts, the one running
   * too. Made for every call that ends, so built field by field (spreads cost more).
   */
  #taskInfo(task: TaskRecord, ended?: 'finished' | 'failed' | 'cancelled', error?: Error): TaskInfo {
    // An ended task's log is final: handed over, not copied.
    const attempts = ended ? (task.attemptLog ?? []) : [...(task.attemptLog ?? [])];
    const worker = task.worker;
    if (!ended && task.runningSince !== undefined && worker) {
      attempts.push({ attempt: task.attempts, nodeId: worker.node.id, workerId: worker.id, pid: worker.child.pid ?? 0, startedAt: performance.timeOrigin + task.runningSince });
    }
    const info: TaskInfo = {
      taskId: task.taskId,
      name: task.name,
      kind: task.actorId ? 'actor-call' : 'task',
      state: ended ?? (task.state === 'done' ? 'finished' : task.state),
      submittedAt: task.pendingSince,
      attempts,
    };
    if (task.actorId) info.actorId = task.actorId;
    if (ended) info.endedAt = Date.now();
    if (error) info.error = { name: error.name, message: error.message };
    if (task.rerun) info.recomputes = true;
    return info;
  }

  /** Tasks and actor calls not yet ended, then the last that ended, oldest submitted first. */
  listTasks(options: ListTasksOptions = {}): TaskInfo[] {
    const { accepts, limit } = taskFilter(options);
    const live = [...this.#tasks.values()].map((task) => this.#taskInfo(task));
    const all = [...this.#ended.list(), ...live].filter(accepts).sort((a, b) => a.submittedAt - b.submittedAt);
    return limit < all.length ? all.slice(all.length - limit) : all;
  }

  /** Every attempt listTasks() knows, in Chrome's trace event format. */
  timeline(): TraceEvent[] {
    return traceEvents(this.listTasks(), Date.now());
  }

  /** Finished tasks' and calls' run times by name, in the buckets of TASK_DURATION_BUCKETS. */
  taskDurations(): ReadonlyMap<string, Readonly<TaskDurations>> {
    return this.#durations;
  }

  #observeDuration(name: string, seconds: number): void {
    // Names are functions and methods, a bounded set; past the cap they share one series.
    const key = this.#durations.has(name) || this.#durations.size < MAX_DURATION_SERIES ? name : '(other)';
    let series = this.#durations.get(key);
    if (!series) this.#durations.set(key, (series = { buckets: new Array(TASK_DURATION_BUCKETS.length).fill(0), count: 0, sum: 0 }));
    series.count++;
    series.sum += seconds;
    const bucket = TASK_DURATION_BUCKETS.findIndex((bound) => seconds <= bound);
    if (bucket >= 0) series.buckets[bucket]++;
  }

  pendingTasks(name: string): { count: number; oldestMs: number } {
    const now = Date.now();
    let count = 0;
    let oldest = now;
    for (const task of this.#scheduler.queuedTasks()) {
      if (task.name !== name) continue;
      count++;
      oldest = Math.min(oldest, task.pendingSince);
    }
    return { count, oldestMs: now - oldest };
  }

  context(): RuntimeContext {
    return { nodeId: this.headNode.id, workerId: 'driver', gpuIds: [], isDriver: true };
  }

  /**
   * Runtime.closeIpcMappings: the driver's own idle mappings, then one round through every other
   * connected worker (`asker` excepted: a process cannot map what it exported). A worker that
   * goes away meanwhile counts as an answer: its mappings went with it. One that does not answer
   * within closeIpcTimeoutMs() (busy in a long synchronous call) may still map every handle.
   */
  closeIpcMappings(handles: Uint8Array[], asker?: WorkerProcess): Promise<Uint8Array[]> {
    const inUse = new Map<string, Uint8Array>();
    const note = (list: Uint8Array[]) => {
      for (const handle of list) inUse.set(Buffer.from(handle).toString('hex'), handle);
    };
    note(closeIdleMappingsOf(handles));
    const workers = this.nodes.flatMap((node) => [...node.workers.values()]).filter((worker) => worker !== asker && worker.connection && !worker.connection.closed);
    if (workers.length === 0) return Promise.resolve([...inUse.values()]);
    return new Promise((resolve) => {
      const requestId = this.#nextCloseRound++;
      const waiting = new Set(workers);
      const settle = () => {
        clearTimeout(timer);
        this.#closeRounds.delete(requestId);
        resolve([...inUse.values()]);
      };
      const timer = setTimeout(() => {
        note(handles);
        settle();
      }, closeIpcTimeoutMs());
      this.#closeRounds.set(requestId, {
        waiting,
        answer: (worker, list) => {
          if (!waiting.delete(worker)) return;
          note(list);
          if (waiting.size === 0) settle();
        },
      });
      for (const worker of workers) worker.send({ t: 'close-ipc', requestId, handles });
    });
  }

  // -------------------------------------------------------------------------------------------
  // State and shutdown

  /**
   * Where the object store's memory goes: every object the driver knows (largest first) with its
   * references and the processes pinning it, each node's store, and objects no ref names any more
   * that pins alone keep in a store (a process's views of deleted objects).
   */
  /** What holds memory: per node, and per object the driver knows, who references and pins it. */
  memorySummary(): Promise<MemorySummary> {
    return summarizeMemory(this.nodes, this.#objects.values(), this.#actors.values());
  }

  /** Where each object's stored copies are: node ids (none for a value held inline, pending or unknown) and its size. */
  objectLocations(ids: readonly string[]): ObjectLocation[] {
    return ids.map((id) => {
      const record = this.#objects.get(id);
      if (!record || record.state !== 'ready') return { nodeIds: [], bytes: 0, ready: false };
      return { nodeIds: [...record.nodes], bytes: record.size, ready: true };
    });
  }

  state(): ClusterState {
    const tasks: Record<string, number> = {};
    for (const task of this.#tasks.values()) tasks[task.state] = (tasks[task.state] ?? 0) + 1;
    return {
      nodes: this.nodes.map((node) => ({
        nodeId: node.id,
        resources: node.pool.snapshot(),
        store: node.storeStats(),
        storeName: node.storeName,
        ...(node instanceof RemoteNode ? { hostname: node.hostname, agentPid: node.agentPid } : {}),
      })),
      ...(this.#listener ? { listening: { host: this.#listener.host, port: this.#listener.port } } : {}),
      ...(this.#describeBroker ? { broker: this.#describeBroker() } : {}),
      ...(this.#workingDirectory ? { workingDir: describeWorkingDirectory(this.#workingDirectory, [...this.#installing].map((node) => node.id)) } : {}),
      workers: this.nodes.flatMap((node) =>
        [...node.workers.values()].map((worker) => ({ workerId: worker.id, nodeId: node.id, pid: worker.child.pid ?? 0, state: worker.state })),
      ),
      tasks,
      actors: [...this.#actors.values()].map((actor) => ({
        actorId: actor.id,
        className: actor.name,
        name: actor.registeredName,
        state: actor.state,
        nodeId: actor.node?.id,
        restarts: actor.restarts,
        pid: actor.worker?.child.pid,
        ...(actor.deathCause ? { deathCause: actor.deathCause } : {}),
      })),
      objects: { count: this.#objects.size },
      counters: { ...this.#counters },
      gpuSharing: this.#gpuSharing === 'mps' ? { mode: 'mps', ...(this.#multiProcessService ? { pipeDirectory: this.#multiProcessService.pipeDirectory } : {}) } : { mode: 'time-slice' },
      placementGroups: [...this.#groups.values()].map((group) => ({
        id: group.id,
        strategy: group.strategy,
        state: group.state,
        bundles: group.bundles.map((bundle) => ({ nodeId: bundle.node?.id, available: bundle.pool?.snapshot().available })),
      })),
    };
  }

  /**
   * Whether anything of this cluster is on the node: a task in flight on a lease there, an actor,
   * a placement group's bundle, or the only copy of an object. A lent node where nothing is may be given
   * back (ClusterOptions.idleReleaseMs) without losing anything.
   */
  nodeBusy(nodeId: string): boolean {
    const node = this.nodes.find((candidate) => candidate.id === nodeId);
    if (!node) return false;
    for (const lease of this.#scheduler.leases()) if (lease.node === node && lease.inflight > 0) return true;
    // A worker starting is there for work that is coming, unless nothing may come (the node is cordoned).
    for (const worker of node.workers.values()) if (worker.state === 'actor' || (worker.state === 'starting' && !node.draining)) return true;
    for (const actor of this.#actors.values()) if (actor.node === node && actor.state !== 'dead') return true;
    for (const group of this.#groups.values()) if (group.state !== 'removed' && group.bundles.some((bundle) => bundle.node === node)) return true;
    // A copy of an object also stored elsewhere (an input read there) is no reason to stay.
    for (const record of this.#objects.values()) if (record.nodes.has(nodeId) && record.nodes.size === 1) return true;
    return false;
  }

  /**
   * Takes an idle node out of scheduling, to give it back: true where nothing was on it (checked
   * in the same turn, so nothing is placed there between the check and the drain).
   */
  drain(nodeId: string): boolean {
    const node = this.nodes.find((candidate) => candidate.id === nodeId);
    if (!node || this.nodeBusy(nodeId)) return false;
    node.draining = true;
    return true;
  }

  /**
   * Takes a node out of scheduling while what runs there finishes (it is being taken back): no
   * new lease, task, actor or placement group bundle goes there.
   */
  cordon(nodeId: string): void {
    const node = this.nodes.find((candidate) => candidate.id === nodeId);
    if (node) node.draining = true;
  }

  /**
   * Moves what only a cordoned node's store holds into this process's store, so that it outlives
   * the node instead of being made again: an object with a copy elsewhere just stops counting
   * this one. Called again while the node lives (results of work finishing there land later);
   * copies in flight are not repeated, and one that failed (this store full, say) is not tried
   * again: lineage makes it again once the node is gone.
   */
  evacuate(nodeId: string): void {
    const node = this.nodes.find((candidate) => candidate.id === nodeId);
    if (!node?.draining || node === this.headNode) return;
    // Room each store has left, less what this round already sends there, in the order tried.
    const room = this.#evacuationTargets(node);
    for (const record of this.#objects.values()) {
      if (record.state !== 'ready' || !record.nodes.has(nodeId) || this.#evacuationFailed.has(record)) continue;
      // The node's copy stays in its store (readers there may map it) until the node ends.
      if (record.nodes.size > 1) {
        record.nodes.delete(nodeId);
        continue;
      }
      if (record.copying && record.copying.size > 0) continue;
      this.#evacuateTo(record, node, [...room.keys()].filter((target) => room.get(target)! >= record.size), room);
    }
  }

  /**
   * Where a node's objects may go, with the room each has: the driver's store first (it outlives
   * every lent node), then the job's other nodes that are not leaving, those with most room first.
   */
  #evacuationTargets(leaving: Node): Map<Node, number> {
    const free = (candidate: Node): number => {
      const stats = candidate.storeStats();
      return stats.capacity - stats.bytesInUse;
    };
    const others = this.nodes
      .filter((candidate) => candidate !== leaving && candidate !== this.headNode && !candidate.draining && !candidate.closed)
      .map((candidate) => [candidate, free(candidate)] as const)
      .sort((a, b) => b[1] - a[1]);
    return new Map([[this.headNode, free(this.headNode)], ...others]);
  }

  /** Copies `record` off `node` to the first of `targets` that takes it; lineage remakes it if none does. */
  #evacuateTo(record: ObjectRecord, node: Node, targets: Node[], room: Map<Node, number>): void {
    const [target, ...rest] = targets;
    if (!target) {
      this.#evacuationFailed.add(record);
      return;
    }
    room.set(target, room.get(target)! - record.size);
    this.#copyAcross(record, node, target).then(
      () => {
        if (this.#objects.get(record.id) === record && record.nodes.has(target.id)) record.nodes.delete(node.id);
      },
      () => {
        // That store could not take it after all (full, or gone): the next one may.
        room.set(target, room.get(target)! + record.size);
        if (this.#objects.get(record.id) === record && !node.closed) this.#evacuateTo(record, node, rest.filter((other) => !other.closed && !other.draining), room);
        else this.#evacuationFailed.add(record);
      },
    );
  }

  /** Whether work waits for resources: queued tasks, or actors not placed yet. */
  waitingForResources(): boolean {
    if (this.#scheduler.hasQueued()) return true;
    for (const actor of this.#actors.values()) if (actor.state === 'pending') return true;
    return false;
  }

  /** What state() says of the shared cluster this driver joined (init's `cluster`). */
  describeBroker(describe: () => BrokerInfo): void {
    this.#describeBroker = describe;
  }

  /** Runs `hook` first thing at shutdown (a broker client leaving, say). */
  onShutdown(hook: () => void): void {
    this.#shutdownHooks.push(hook);
  }

  async shutdown(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    for (const hook of this.#shutdownHooks.splice(0)) hook();
    clearInterval(this.#infeasibleTimer);
    setRefTracker(undefined);
    const exits: Promise<void>[] = [];
    for (const node of this.nodes) {
      for (const worker of node.workers.values()) {
        if (worker.exited) continue;
        exits.push(
          new Promise((resolve) => {
            // Ask first (the worker flushes and exits), then insist.
            const timer = setTimeout(() => worker.kill(), 2000);
            worker.child.once('exit', () => {
              clearTimeout(timer);
              resolve();
            });
          }),
        );
        if (worker.connection) worker.send({ t: 'exit' });
        else worker.kill();
      }
    }
    await Promise.all(exits);
    for (const node of [...this.nodes, ...this.#installing]) node.close();
    this.#installing.clear();
    await this.#listener?.close();
    // After the workers: the daemon waits for its clients before it quits.
    await this.#multiProcessService?.close();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
    rmSync(this.#socketPath, { force: true });
    this.#forgetSocketAtExit();
    const error = new TrellisError('ERR_SHUTDOWN', 'trellis was shut down before this object was ready');
    this.#streams.endAll((stream) => new TrellisError('ERR_SHUTDOWN', `trellis was shut down while streaming call ${stream.task.name} ran`));
    for (const record of this.#objects.values()) {
      if (record.state === 'pending') {
        record.state = 'failed';
        record.error = error;
        for (const waiter of record.waiters ?? []) waiter();
      }
    }
  }
}

/** Upper bounds (seconds) of the task-duration histogram's buckets; above the last: only in count. */
export const TASK_DURATION_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800];
const MAX_DURATION_SERIES = 500;

/** A histogram of run times: each bucket counts those in it alone (not cumulative). */
export interface TaskDurations {
  buckets: number[];
  count: number;
  sum: number;
}

/** Where an object's stored copies are (Ray's get_object_locations). */
export interface ObjectLocation {
  /** Nodes whose stores hold a copy: none for a small value held inline by its owner. */
  nodeIds: string[];
  bytes: number;
  /** False while its task runs, after it failed, or for an id the driver does not know. */
  ready: boolean;
}

export interface ClusterState {
  /** `hostname` and `agentPid` for nodes that joined through a node agent. */
  nodes: Array<{ nodeId: string; resources: { total: Record<string, number>; available: Record<string, number> }; store: StoreStats; storeName: string; hostname?: string; agentPid?: number }>;
  /** Where node agents join (init's `listen`), with the port actually bound. */
  listening?: { host: string; port: number };
  /** The shared cluster this driver joined (init's `cluster`): its broker, job id and bundles. */
  broker?: BrokerInfo;
  /** The working directory shipped to every host (runtimeEnv), and nodes still installing it. */
  workingDir?: { root: string; code: string; dependencies?: string; files: number; bytes: number; installing: string[] };
  workers: Array<{ workerId: string; nodeId: string; pid: number; state: string }>;
  tasks: Record<string, number>;
  /** `deathCause` for dead ones: killed, died with no restarts left, or ended with no handle left. */
  actors: Array<{ actorId: string; className: string; name?: string; state: string; nodeId?: string; restarts: number; pid?: number; deathCause?: string }>;
  objects: { count: number };
  /** Tasks and actor calls since the cluster started: returned, failed (after retries), run again. */
  counters: { tasksFinished: number; tasksFailed: number; tasksRetried: number };
  /** With 'mps', CUDA_MPS_PIPE_DIRECTORY of the cluster's daemon (for nvidia-cuda-mps-control). */
  gpuSharing: { mode: 'time-slice' | 'mps'; pipeDirectory?: string };
  placementGroups: Array<{ id: string; strategy: string; state: string; bundles: Array<{ nodeId?: string; available?: Record<string, number> }> }>;
}

function describeWorkingDirectory(packed: PackedWorkingDirectory, installing: string[]): NonNullable<ClusterState['workingDir']> {
  return {
    root: packed.root,
    code: packed.code.id,
    ...(packed.dependencies ? { dependencies: packed.dependencies.id } : {}),
    ...packageTotals(packed.code, packed.dependencies),
    installing,
  };
}

/**
 * The longest an agent may take to install the working directory before its node is given up:
 * two minutes, and a second more per MB sent (a slow link, a cold disk).
 */
function installLimitMs(packed: PackedWorkingDirectory): number {
  return 120_000 + Math.ceil((packed.code.bytes.byteLength + (packed.dependencies?.bytes.byteLength ?? 0)) / 1000);
}

class ArgumentsRecovering extends Error {}

/** An argument is being copied to the node that reads it; `done` settles when it is there. */
class CopyPending extends Error {
  constructor(readonly done: Promise<void>) {
    super('an object is being copied between nodes');
  }
}

/** A remote worker's lines, each led by where it ran (as local workers' output, it is not the driver's). */
function printWorkerOutput({ nodeId, pid, stream, text }: { nodeId: string; pid: number; stream: 'stdout' | 'stderr'; text: string }): void {
  const prefix = `(${nodeId} pid=${pid}) `;
  const lines = text.endsWith('\n') ? text.slice(0, -1).split('\n') : text.split('\n');
  (stream === 'stdout' ? process.stdout : process.stderr).write(lines.map((line) => `${prefix}${line}\n`).join(''));
}


export function serializeError(error: Error): RemoteErrorInfo & { kind: string } {
  const err = error as Error & { code?: string };
  return { kind: err.constructor.name, name: err.name, message: err.message, code: err.code, stack: err.stack };
}
