/**
 * The streaming executor: every physical operator runs at once, blocks flow downstream as they are
 * made, and a memory budget on the blocks alive in the object store holds back the operators that
 * create data (reads and inputs) while downstream work drains it. Downstream operators are served
 * first, since running them frees memory. A watchdog turns a stall into an error naming the
 * operator, and a failure anywhere stops the whole job and releases everything it held.
 */
import { events, get, isInitialized, state } from '../core/api.js';
import { DataError, DataStallError, InvalidArgumentError, TrellisError } from '../errors.js';
import { hasRuntime } from '../core/runtime-context.js';
import { Deque } from '../core/deque.js';
import type { InputBlock, PhysicalOperatorSpec, ComputeOptions } from './plan.js';
import { createProgressReporter, type ProgressOption } from './progress.js';
import type { JobProgress, OperatorProgress, ProgressReporter } from './progress-types.js';
import { newObjectId } from '../store/object-id.js';
import type { CheckpointStats, CheckpointTarget } from './checkpoint.js';
import { registerMetricsCollector, type MetricFamily } from '../core/metrics.js';
import type { WriteContext } from './datasource.js';
import { ActorMapOperator } from './operators/actor-pool.js';
import { AggregateOperator } from './operators/aggregate.js';
import { ExchangeOperator } from './operators/exchange.js';
import { InputOperator } from './operators/input.js';
import { LimitOperator } from './operators/limit.js';
import { UnionOperator } from './operators/union.js';
import { ZipOperator } from './operators/zip.js';
import { RepartitionOperator } from './operators/repartition.js';
import { ReadOperator, TaskMapOperator, WriteOperator } from './operators/tasks.js';
import { dispose, resourcesOf, type Operator } from './operators/operator.js';

/** How a job runs; each field has a default in `DataContext`. */
export interface ExecutionOptions {
  /** Bytes of the job's blocks allowed in the object store at once (default: half the store). */
  memoryBudgetBytes?: number;
  /** Blocks are joined toward at least this size (default 1 MiB)... */
  minBlockBytes?: number;
  /** ...and split above this size (default 128 MiB). */
  maxBlockBytes?: number;
  /** Outputs leave each operator in input order (default true: results are deterministic). */
  preserveOrder?: boolean;
  /** Blocks whose stage throws that are counted and skipped rather than failing the job (default 0). */
  maxErroredBlocks?: number;
  /** With no progress for this long, the job fails naming the stuck operator (ms; default 10 min). */
  stallTimeoutMs?: number;
  /** A display of the job's progress: 'auto' (default), false, or a reporter of your own. */
  progress?: ProgressOption;
  /** Retries of a task or batch whose worker died, or that failed with one of `retriedErrorCodes` (default 3). */
  maxRetries?: number;
  /**
   * Error codes that mean a task met a passing outage rather than bad data: a task failing with
   * one is run again (up to maxRetries), as Ray Data's retried_io_errors. Default:
   * ['ERR_STORAGE_UNAVAILABLE'] (object storage throttling or down past its own retries).
   */
  retriedErrorCodes?: string[];
}

/** Defaults for every job; change fields here to change them process-wide. */
export const DataContext: Required<Omit<ExecutionOptions, 'memoryBudgetBytes'>> & { memoryBudgetBytes?: number } = {
  memoryBudgetBytes: undefined,
  minBlockBytes: 1 << 20,
  maxBlockBytes: 128 << 20,
  preserveOrder: true,
  maxErroredBlocks: 0,
  stallTimeoutMs: 10 * 60_000,
  progress: 'auto',
  maxRetries: 3,
  retriedErrorCodes: ['ERR_STORAGE_UNAVAILABLE'],
};

/**
 * Bytes of blocks the driver read from the store (a consumer's, a limit's cut) whose views it has
 * not collected yet: they stay pinned in the store until then.
 */
let driverViewBytes = 0;
const driverViews = new FinalizationRegistry<number>((bytes) => {
  driverViewBytes -= bytes;
});

/** Counts a block the driver read zero-copy until it is collected. */
export function trackDriverView(block: object, bytes: number): void {
  driverViewBytes += bytes;
  driverViews.register(block, bytes);
}

/** Read tasks a source is asked for when the dataset does not say: twice the cluster's CPUs. */
export function defaultParallelism(totalCpus = isInitialized() ? state().nodes.reduce((sum, node) => sum + (node.resources.total.CPU ?? 0), 0) : 2): number {
  return Math.max(2, totalCpus * 2);
}

/** Checks a job's options (and the DataContext defaults they fall back to) before anything runs. */
export function checkExecutionOptions(options: ExecutionOptions): void {
  if (typeof options !== 'object' || options === null) throw new InvalidArgumentError(`execution options must be an object, got ${String(options)}`);
  const merged = { ...DataContext, ...Object.fromEntries(Object.entries(options).filter(([, value]) => value !== undefined)) } as ExecutionOptions;
  const positive = (key: keyof ExecutionOptions, integer: boolean, allowZero = false) => {
    const value = merged[key];
    if (value === undefined && key === 'memoryBudgetBytes') return;
    const ok = typeof value === 'number' && (allowZero ? value >= 0 : value > 0) && (integer ? Number.isSafeInteger(value) || value === Infinity : Number.isFinite(value) || value === Infinity);
    if (!ok) throw new InvalidArgumentError(`${key} must be a ${allowZero ? 'non-negative' : 'positive'} ${integer ? 'integer' : 'number'}, got ${String(value)}`);
  };
  positive('memoryBudgetBytes', false);
  positive('minBlockBytes', true);
  positive('maxBlockBytes', true);
  positive('maxErroredBlocks', true, true);
  positive('stallTimeoutMs', false);
  positive('maxRetries', true, true);
  if (merged.maxBlockBytes! < merged.minBlockBytes!) {
    throw new InvalidArgumentError(`maxBlockBytes (${merged.maxBlockBytes}) is below minBlockBytes (${merged.minBlockBytes})`);
  }
  if (typeof merged.preserveOrder !== 'boolean') throw new InvalidArgumentError(`preserveOrder must be true or false, got ${String(merged.preserveOrder)}`);
  if (!Array.isArray(merged.retriedErrorCodes) || merged.retriedErrorCodes.some((code) => typeof code !== 'string')) {
    throw new InvalidArgumentError(`retriedErrorCodes must be an array of error codes, got ${JSON.stringify(merged.retriedErrorCodes)}`);
  }
}

/** What a finished job reports. */
export interface JobStats {
  rowsOut: number;
  blocksOut: number;
  erroredBlocks: number;
  peakBudgetBytes: number;
  wallMs: number;
  operators: OperatorProgress[];
  /** A checkpointed write: where its checkpoint is and what earlier runs had written. */
  checkpoint?: CheckpointStats;
  /** The job in a few lines: rows and rates, each operator's tasks and their times, what it skipped. */
  summary: string;
}


/** Runs one job: a chain of physical operators, feeding a consumer or a sink. */
export class StreamingExecutor {
  readonly options: Required<Omit<ExecutionOptions, 'memoryBudgetBytes' | 'progress'>> & { progress: ProgressOption };
  readonly operators: Operator[] = [];
  readonly budgetBytes: number;
  readonly defaultParallelism: number;
  /** One id per job, shared by its write tasks (for naming files). */
  readonly writeId: string;
  /** A checkpointed write's checkpoint: each write task records its rows there. */
  checkpoint?: CheckpointTarget;
  /** What a checkpointed write resumed from. */
  resumed?: CheckpointStats;
  failed?: Error;
  erroredBlocks = 0;
  peakBytes = 0;
  rowsOut = 0;
  blocksOut = 0;
  readonly #output: InputBlock[] = [];
  #outputBytes = 0;
  #waiter?: () => void;
  #lastProgress = Date.now();
  readonly #started = Date.now();
  #timer?: NodeJS.Timeout;
  #recheck?: NodeJS.Timeout;
  #storeBase = 0;
  #driverViewBase = 0;
  #storeRead?: { at: number; bytes: number };
  readonly #freed = new Deque<[number, number]>();
  #freedBytes = 0;
  #reporter?: ProgressReporter;
  #scheduling = false;
  #rescheduled = false;
  #finished = false;
  #totalCpus: number;
  /** Nodes join and leave a shared cluster's job (lent, borrowed, given back): the CPUs follow. */
  readonly #onNodes = () => {
    this.#totalCpus = state().nodes.reduce((sum, node) => sum + (node.resources.total.CPU ?? 0), 0);
  };
  readonly #job: string;
  readonly #warnings: string[] = [];
  /** A write job's rows go to its sink, not to a consumer: the operator that writes counts them. */
  readonly #writer?: Operator;

  constructor(specs: PhysicalOperatorSpec[], options: ExecutionOptions, job: string, writeId = newWriteId()) {
    checkExecutionOptions(options);
    this.writeId = writeId;
    this.options = {
      minBlockBytes: options.minBlockBytes ?? DataContext.minBlockBytes,
      maxBlockBytes: options.maxBlockBytes ?? DataContext.maxBlockBytes,
      preserveOrder: options.preserveOrder ?? DataContext.preserveOrder,
      maxErroredBlocks: options.maxErroredBlocks ?? DataContext.maxErroredBlocks,
      stallTimeoutMs: options.stallTimeoutMs ?? DataContext.stallTimeoutMs,
      progress: options.progress ?? DataContext.progress,
      maxRetries: options.maxRetries ?? DataContext.maxRetries,
      retriedErrorCodes: options.retriedErrorCodes ?? DataContext.retriedErrorCodes,
    };
    const cluster = state();
    const capacity = cluster.nodes.reduce((sum, node) => sum + node.store.capacity, 0);
    this.budgetBytes = options.memoryBudgetBytes ?? DataContext.memoryBudgetBytes ?? Math.floor(capacity / 2);
    this.#totalCpus = cluster.nodes.reduce((sum, node) => sum + (node.resources.total.CPU ?? 0), 0);
    this.defaultParallelism = defaultParallelism(this.#totalCpus);
    this.#job = job;
    this.#build(specs);
    this.#writer = this.operators.find((operator) => operator.spec.kind === 'write' || ('sink' in operator.spec && operator.spec.sink !== undefined));
  }

  /**
   * The operators of a chain, linked upstream to downstream; a union's input chains come before
   * it in `operators`, so that scheduling from the end serves downstream first everywhere. In
   * order (preserveOrder), a union's inputs run one after another: each waits for the one before.
   */
  #build(specs: readonly PhysicalOperatorSpec[]): Operator | undefined {
    let previous: Operator | undefined;
    for (const spec of specs) {
      const upstreams: Operator[] = [];
      if (spec.kind === 'union') {
        let before: Operator | undefined;
        for (const chain of spec.inputs) {
          const first = this.operators.length;
          const last = this.#build(chain);
          if (!last) continue;
          if (before && this.options.preserveOrder) this.operators[first].startAfter = before;
          before = last;
          upstreams.push(last);
        }
      } else if ((spec.kind === 'exchange' && spec.inputs) || spec.kind === 'zip') {
        // A join or a zip: both inputs run at once (it stages them both, outside the budget).
        for (const chain of spec.inputs ?? []) {
          const last = this.#build(chain);
          if (last) upstreams.push(last);
        }
      } else if (previous) {
        upstreams.push(previous);
      }
      const operator = this.#make(spec, this.operators.length);
      operator.upstreams = upstreams;
      for (const upstream of upstreams) upstream.downstream = operator;
      this.operators.push(operator);
      previous = operator;
    }
    return previous;
  }

  #make(spec: PhysicalOperatorSpec, index: number): Operator {
    switch (spec.kind) {
      case 'input':
        return new InputOperator(this, spec, index);
      case 'read':
        return new ReadOperator(this, spec, index);
      case 'task-map':
        return new TaskMapOperator(this, spec, index);
      case 'actor-map':
        return new ActorMapOperator(this, spec, index);
      case 'limit':
        return new LimitOperator(this, spec, index);
      case 'repartition':
        return new RepartitionOperator(this, spec, index);
      case 'exchange':
        return new ExchangeOperator(this, spec, index);
      case 'aggregate':
        return new AggregateOperator(this, spec, index);
      case 'write':
        return new WriteOperator(this, spec, index);
      case 'union':
        return new UnionOperator(this, spec, index);
      case 'zip':
        return new ZipOperator(this, spec, index);
    }
  }

  /** CPUs of the whole cluster. */
  get totalCpus(): number {
    return this.#totalCpus;
  }

  /** Objects the smallest store of the cluster can hold at once. */
  get storeObjectLimit(): number {
    return Math.min(...state().nodes.map((node) => node.store.maxObjects));
  }

  /** Tasks of this shape that can run at once across the cluster, with some queued ahead. */
  taskSlots(compute: ComputeOptions): number {
    const cpus = compute.numCpus ?? 1;
    const byCpu = cpus > 0 ? Math.floor(this.#totalCpus / cpus) : 64;
    // Eight per slot: the runtime pipelines queued tasks onto its leased workers, and with fewer
    // in flight small blocks leave both the driver and the workers waiting on each other's
    // messages (measured: idle more than half the time at two per slot). The budget still
    // bounds the memory they hold.
    return Math.min(compute.concurrency ?? Infinity, Math.max(1, byCpu) * 8);
  }

  /** Whether some node has room for one more actor of this shape now. */
  resourcesFree(compute: ComputeOptions): boolean {
    const need = resourcesOf(compute);
    return state().nodes.some((node) => Object.entries(need).every(([name, amount]) => amount <= 0 || (node.resources.available[name] ?? 0) >= amount - 1e-9));
  }

  /** How many actors of this shape the cluster could hold at once, were it idle. */
  actorsThatFit(compute: ComputeOptions): number {
    const need = Object.entries(resourcesOf(compute)).filter(([, amount]) => amount > 0);
    if (need.length === 0) return Infinity;
    return state().nodes.reduce((sum, node) => sum + Math.min(...need.map(([name, amount]) => Math.floor((node.resources.total[name] ?? 0) / amount + 1e-9))), 0);
  }

  touch(): void {
    this.#lastProgress = Date.now();
  }

  /** A job's warnings reach the driver's listeners as the runtime's do: a 'warning' event of kind 'data'. */
  warn(message: string): void {
    this.#warnings.push(message);
    if (isInitialized()) events().emit('warning', { kind: 'data', message });
  }

  countErroredBlock(error: DataError): boolean {
    if (this.erroredBlocks >= this.options.maxErroredBlocks) return false;
    this.erroredBlocks++;
    this.warn(`skipped: ${error.message}`);
    return true;
  }

  usedBytes(): number {
    let bytes = this.#outputBytes;
    for (const operator of this.operators) bytes += operator.heldBytes();
    return bytes;
  }

  /**
   * What the store really holds for the job, at least: its growth since the job began, plus the
   * output reserved for running work (not all of it stored yet). Blocks the job let go can stay
   * in the store a moment longer than its accounting says — a worker's views pin its inputs until
   * that worker collects garbage, just after it replies — so starting new work checks this too.
   */
  #storeBytes(): number {
    const now = Date.now();
    // Reading the store's statistics is not free (state() walks the cluster and the store's
    // tables): once per 10 ms, or again once a unit ended (its reservation is then stored).
    if (this.#storeRead === undefined || now - this.#storeRead.at >= 10) {
      const stored = state().nodes.reduce((sum, node) => sum + node.store.bytesInUse, 0) - this.#storeBase;
      // Blocks the driver itself read stay pinned until the driver collects them: not the
      // job's lag, and nothing the job can wait for.
      this.#storeRead = { at: now, bytes: stored - (driverViewBytes - this.#driverViewBase) };
    }
    let reserved = 0;
    let staged = 0;
    for (const operator of this.operators) {
      reserved += operator.reservedBytes;
      staged += operator.stagedBytes();
    }
    return Math.max(0, this.#storeRead.bytes - staged) + reserved;
  }

  /** Bytes of blocks the job let go in the last second: what the store may not have freed yet. */
  #recentlyFreed(): number {
    const cutoff = Date.now() - 1000;
    while (this.#freed.length > 0 && this.#freed.peek()![0] < cutoff) this.#freedBytes -= this.#freed.shift()![1];
    return this.#freedBytes;
  }

  /** A unit consumed its inputs: their memory returns once the worker that read them collects. */
  noteFreed(bytes: number): void {
    // A unit ended: its reservation became stored blocks, so a store reading from before is stale.
    this.#storeRead = undefined;
    if (bytes <= 0) return;
    this.#freed.push([Date.now(), bytes]);
    this.#freedBytes += bytes;
  }

  /**
   * Work that may overrun the budget (nothing else would free memory) waits for the store's lag
   * only briefly: what holds the store then may not be the job's at all (the driver's own views,
   * other work), and waiting longer could wait forever.
   */
  #lagWaitOver(operator: Operator, mayOverrun: boolean): boolean {
    if (!mayOverrun) return false;
    const now = Date.now();
    operator.lagWaitSince ??= now;
    return now - operator.lagWaitSince >= 250;
  }

  /** Schedules again shortly: for blocks let go whose memory the store has not freed yet. */
  #recheckSoon(): void {
    if (this.#recheck || this.#finished) return;
    this.#recheck = setTimeout(() => {
      this.#recheck = undefined;
      this.schedule();
    }, 10);
    this.#recheck.unref();
  }

  /** An operator's output: the next operator's input, or the job's output. */
  emit(from: Operator, block: InputBlock): void {
    const next = from.downstream;
    if (next) next.takeInput(block, from);
    else {
      this.#output.push(block);
      this.#outputBytes += block.meta.bytes;
      this.#wake();
    }
  }

  truncateUpstreamOf(operator: Operator): void {
    for (const upstream of operator.upstreams) {
      upstream.truncate();
      this.truncateUpstreamOf(upstream);
    }
  }

  async start(): Promise<void> {
    runningJobs.set(this, ++jobsStarted);
    events().on('node-added', this.#onNodes).on('node-removed', this.#onNodes);
    this.#reporter = createProgressReporter(this.options.progress);
    this.#storeBase = state().nodes.reduce((sum, node) => sum + node.store.bytesInUse, 0);
    this.#driverViewBase = driverViewBytes;
    try {
      for (const operator of this.operators) await operator.start();
    } catch (error) {
      this.fail(error instanceof Error ? error : new Error(String(error)));
      throw this.failed;
    }
    const tick = Math.min(250, Math.max(20, this.options.stallTimeoutMs / 4), this.#reporter.updateIntervalMs ?? Number.POSITIVE_INFINITY);
    this.#timer = setInterval(() => this.#tick(), tick);
    this.#timer.unref();
    this.schedule();
  }

  #tick(): void {
    if (this.#finished) return;
    if (!hasRuntime()) {
      // shutdown() came while the job ran: it fails, rather than its timers throwing where nothing catches.
      this.fail(new TrellisError('ERR_SHUTDOWN', 'trellis was shut down while the dataset job ran'));
      return;
    }
    for (const operator of this.operators) operator.autoscale();
    this.schedule();
    this.#reporter?.update(this.snapshot());
    const stalled = Date.now() - this.#lastProgress;
    if (stalled <= this.options.stallTimeoutMs || this.finishedAll) return;
    // Work running and none finishing is a stall; actors still starting are not (their
    // constructors have their own timeout, actorStartTimeoutMs: loading a model may take long).
    const busy = this.operators.filter((operator) => operator.active > 0);
    let stuck: Operator | undefined;
    let why = '';
    if (busy.length > 0) {
      stuck = busy.reduce((oldest, operator) => (operator.lastCompletion < oldest.lastCompletion ? operator : oldest));
      why = `operator ${stuck.name} has ${stuck.active} task(s) running and none finished`;
    } else if (this.#output.length === 0 && !this.operators.some((operator) => operator instanceof ActorMapOperator && operator.counts().pending > 0)) {
      // Nothing runs, nothing waits for the consumer, yet the job is not done: it would hang.
      stuck = this.operators.find((operator) => !operator.done());
      why = `operator ${stuck?.name} has work left (${stuck?.queuedUnits} queued${stuck?.backpressure ? `, held back: ${stuck.backpressure}` : ''}) and nothing runs`;
    }
    if (!stuck) return;
    this.fail(
      new DataStallError('ERR_DATA_STALLED', `no progress for ${Math.round(stalled / 1000)} s: ${why} (stallTimeoutMs is ${this.options.stallTimeoutMs})`, {
        operator: stuck.name,
      }),
    );
  }

  /** Starts what may start: downstream operators first, sources only within the budget. */
  schedule(): void {
    if (this.#scheduling) {
      this.#rescheduled = true;
      return;
    }
    this.#scheduling = true;
    try {
      do {
        this.#rescheduled = false;
        this.#scheduleOnce();
      } while (this.#rescheduled);
    } finally {
      this.#scheduling = false;
    }
  }

  #scheduleOnce(): void {
    if (this.failed || this.#finished) return;
    for (let index = this.operators.length - 1; index >= 0; index--) {
      const operator = this.operators[index];
      if (operator.upstreams.length > 0 && operator.upstreams.every((upstream) => upstream.done())) operator.upstreamDone = true;
      operator.backpressure = undefined;
      if (operator.startAfter && !operator.startAfter.done()) {
        operator.backpressure = 'after the union inputs before it';
        continue;
      }
      if (operator instanceof ActorMapOperator) operator.autoscale();
      while (operator.hasWork()) {
        if (operator.active >= operator.capacity()) {
          operator.backpressure = operator instanceof ActorMapOperator ? 'all actors busy' : undefined;
          break;
        }
        const used = this.usedBytes();
        const estimate = operator.estimateOutputBytes(operator.nextUnitBytes());
        // Sources start what fits with room left for every operator downstream to run one unit on
        // it: downstream work always may start (it frees its input as it goes), and the room kept
        // for it keeps that within the budget too. With nothing held or running anywhere, one
        // unit starts whatever its size, so a block above the budget still passes.
        const need = estimate + (operator.isSource ? this.#downstreamRoom(operator, estimate) : 0);
        const mayOverrun = operator.isSource ? used === 0 && this.operators.every((other) => other.active === 0) : operator.active === 0;
        if (!mayOverrun && used + need > this.budgetBytes) {
          operator.backpressure = 'memory budget';
          break;
        }
        const mayLag = estimate > 0 && used + need + this.#recentlyFreed() > this.budgetBytes;
        if (mayLag && this.#storeBytes() + need > this.budgetBytes && !this.#lagWaitOver(operator, mayOverrun)) {
          // Within the budget by the job's accounting, but the store has yet to free what the
          // job let go (workers unpin their inputs when they collect, just after replying): look
          // again in a moment.
          operator.backpressure = 'memory budget';
          this.#recheckSoon();
          break;
        }
        operator.lagWaitSince = undefined;
        operator.launch();
        if (this.failed) return;
      }
    }
    for (const operator of this.operators) {
      if (operator.upstreams.length > 0 && operator.upstreams.every((upstream) => upstream.done())) operator.upstreamDone = true;
    }
    this.peakBytes = Math.max(this.peakBytes, this.usedBytes());
    if (this.operators.every((operator) => operator.done())) this.#wake();
  }

  /** Output bytes of one unit of each operator after `source`, fed `bytes` of the source's output. */
  #downstreamRoom(source: Operator, bytes: number): number {
    let room = 0;
    for (let operator = source.downstream; operator; operator = operator.downstream) {
      if (operator.done() || operator.truncated) continue;
      bytes = operator.estimateOutputBytes(bytes);
      room += bytes;
    }
    return room;
  }

  get finishedAll(): boolean {
    return this.operators.every((operator) => operator.done());
  }

  /** The job's output blocks, in order; the caller disposes each block's ref when done with it. */
  async *outputs(): AsyncGenerator<InputBlock> {
    try {
      while (true) {
        if (this.failed) throw this.failed;
        const block = this.#output.shift();
        if (block) {
          this.#outputBytes -= block.meta.bytes;
          this.rowsOut += block.meta.rows;
          this.blocksOut++;
          this.touch();
          this.schedule();
          yield block;
          continue;
        }
        if (this.finishedAll) return;
        await new Promise<void>((resolve) => (this.#waiter = resolve));
      }
    } finally {
      await this.close();
    }
  }

  /** Runs to the end without a consumer (a write job). */
  async run(): Promise<void> {
    for await (const block of this.outputs()) dispose([block]);
  }

  #wake(): void {
    const waiter = this.#waiter;
    this.#waiter = undefined;
    waiter?.();
  }

  fail(error: Error): void {
    if (this.failed || this.#finished) return;
    this.failed = error;
    for (const operator of this.operators) {
      operator.truncate();
      void operator.shutdown();
    }
    this.#wake();
  }

  /**
   * After a failure: waits until no unit of the job still runs (cancelled tasks that had started
   * run to their end, their results dropped), so that no write lands after the job has ended;
   * units still running after `graceMs` (the stall timeout, at most two minutes: a failed job
   * does not wait long for its last writes) have their workers killed.
   */
  async settle(graceMs = Math.min(this.options.stallTimeoutMs, 120_000)): Promise<void> {
    const deadline = Date.now() + graceMs;
    let forced = false;
    while (this.operators.some((operator) => operator.active > 0)) {
      if (!forced && Date.now() > deadline) {
        forced = true;
        await Promise.all(this.operators.map((operator) => operator.shutdown(true)));
      }
      // A killed worker's task is reported within moments; past that, nothing more to wait for.
      if (forced && Date.now() > deadline + 30_000) return;
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }

  /** What a write task's sink sees of it. */
  writeContext(unit: { seq: number; attempts: number }): WriteContext {
    return { taskIndex: unit.seq, attempt: unit.attempts, writeId: this.writeId, ...(this.checkpoint?.staged ? { staged: true } : {}) };
  }

  /** What the sink's write() calls returned, in task order. */
  writeResults(): unknown[] {
    const results = this.operators.flatMap((operator) => operator.writeResults);
    return results.sort((a, b) => a.seq - b.seq).map((entry) => entry.result);
  }

  /** Stops the job and lets go of everything it holds. */
  async close(): Promise<void> {
    if (this.#finished) return;
    this.#finished = true;
    if (isInitialized()) events().off('node-added', this.#onNodes).off('node-removed', this.#onNodes);
    if (runningJobs.delete(this)) {
      jobTotals.rows += this.rowsOut;
      jobTotals[this.failed ? 'failed' : 'succeeded']++;
    }
    if (this.#timer) clearInterval(this.#timer);
    if (this.#recheck) clearTimeout(this.#recheck);
    dispose(this.#output.splice(0));
    this.#outputBytes = 0;
    for (const operator of this.operators) {
      operator.truncate();
      await operator.shutdown();
    }
    this.#reporter?.finish(this.snapshot(), this.failed);
  }

  get warnings(): readonly string[] {
    return this.#warnings;
  }


  snapshot(): JobProgress {
    return {
      job: this.#job,
      elapsedMs: Date.now() - this.#started,
      operators: this.operators.map((operator) => operator.progress()),
      storeBytes: this.usedBytes(),
      budgetBytes: this.budgetBytes,
      rowsOut: this.rowsOut,
      ...(this.#writer ? { rowsWritten: this.#writer.rowsDone } : {}),
      warnings: this.#warnings,
    };
  }

  stats(): JobStats {
    const stats = {
      rowsOut: this.rowsOut,
      blocksOut: this.blocksOut,
      erroredBlocks: this.erroredBlocks,
      peakBudgetBytes: this.peakBytes,
      wallMs: Date.now() - this.#started,
      operators: this.operators.map((operator) => operator.progress()),
      ...(this.resumed ? { checkpoint: this.resumed } : {}),
    };
    const written = this.#writer?.rowsDone;
    return { ...stats, summary: summarize(this.#job, stats, this.budgetBytes, this.#warnings.length, this.failed, written) };
  }
}

// ---------------------------------------------------------------------------------------------
// The summary of a job's stats

const count = (value: number): string => Math.round(value).toLocaleString('en-US');

function duration(ms: number): string {
  if (ms < 1) return `${ms.toFixed(2)} ms`;
  if (ms < 1000) return `${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
  return `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)} s`;
}

function bytes(value: number): string {
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit++;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

function rate(rows: number, ms: number): string {
  return ms > 0 ? `${count((rows * 1000) / ms)} rows/s` : '';
}

function summarize(job: string, stats: Omit<JobStats, 'summary'>, budgetBytes: number, warnings: number, failed?: Error, written?: number): string {
  const rows = written ?? stats.rowsOut;
  const lines = [
    `${job}${failed ? ' (failed)' : ''}: ${count(rows)} rows ${written === undefined ? 'out' : 'written'} in ${duration(stats.wallMs)}` +
      `${rows > 0 ? ` (${rate(rows, stats.wallMs)})` : ''}; store peak ${bytes(stats.peakBudgetBytes)} of a ${bytes(budgetBytes)} budget`,
  ];
  stats.operators.forEach((operator, index) => {
    const parts = [`${count(operator.rowsDone)} rows`];
    const time = operator.taskTime;
    if (time) {
      const unit = operator.actors ? 'calls' : 'tasks';
      parts.unshift(`${count(time.tasks)} ${unit}${operator.actors ? ` on up to ${operator.actors.max === Infinity ? 'any number of' : operator.actors.max} actors` : ''}`);
      parts[1] += ` in ${duration(time.spanMs)}${time.spanMs > 0 ? ` (${rate(operator.rowsDone, time.spanMs)})` : ''}`;
      parts.push(`per ${unit === 'calls' ? 'call' : 'task'} mean ${duration(time.meanMs)}, max ${duration(time.maxMs)}, ${duration(time.totalMs)} in all`);
    }
    for (const [name, value] of Object.entries(operator.metrics ?? {})) parts.push(`${name} ${count(value)}`);
    lines.push(`  ${index} ${operator.name}: ${parts.join('; ')}`);
  });
  if (stats.checkpoint && stats.checkpoint.resumedWrites > 0) {
    lines.push(`  resumed from ${stats.checkpoint.path}: ${count(stats.checkpoint.resumedRows)} rows written by earlier runs skipped`);
  }
  if (stats.erroredBlocks > 0) lines.push(`  ${stats.erroredBlocks} block(s) skipped for errors (maxErroredBlocks)`);
  if (warnings > 0) lines.push(`  ${warnings} warning(s): see the progress display or events()`);
  return lines.join('\n');
}

// ---------------------------------------------------------------------------------------------
// Metrics: the jobs running in this driver, operator by operator

const runningJobs = new Map<StreamingExecutor, number>();
let jobsStarted = 0;
const jobTotals = { rows: 0, succeeded: 0, failed: 0 };

function dataMetrics(): MetricFamily[] {
  const rows: MetricFamily = { name: 'trellis_data_operator_rows_total', type: 'counter', help: "Rows an operator of a running job has made (or written).", samples: [] };
  const blocks: MetricFamily = { name: 'trellis_data_operator_blocks_total', type: 'counter', help: 'Blocks (or read tasks) an operator of a running job has finished.', samples: [] };
  const active: MetricFamily = { name: 'trellis_data_operator_active_tasks', type: 'gauge', help: 'Tasks or actor calls an operator has running.', samples: [] };
  const queued: MetricFamily = { name: 'trellis_data_operator_queued_tasks', type: 'gauge', help: 'Units of work an operator has waiting.', samples: [] };
  const actors: MetricFamily = { name: 'trellis_data_operator_actors', type: 'gauge', help: "An actor pool's actors, running or starting.", samples: [] };
  const storeBytes: MetricFamily = { name: 'trellis_data_operator_store_bytes', type: 'gauge', help: "Bytes of an operator's outputs in the object store, not yet consumed.", samples: [] };
  const counters: MetricFamily = { name: 'trellis_data_operator_counter_total', type: 'counter', help: "Counters an actor pool's class reports with metrics() (e.g. an LLM engine's generated tokens), summed over its actors.", samples: [] };
  const budget: MetricFamily = { name: 'trellis_data_job_budget_bytes', type: 'gauge', help: "A running job's memory budget in the object store.", samples: [] };
  const held: MetricFamily = { name: 'trellis_data_job_store_bytes', type: 'gauge', help: "Bytes of a running job's blocks in the object store.", samples: [] };
  for (const [executor, id] of runningJobs) {
    const progress = executor.snapshot();
    const job = { job_id: String(id), job: progress.job };
    budget.samples.push({ labels: job, value: progress.budgetBytes });
    held.samples.push({ labels: job, value: progress.storeBytes });
    progress.operators.forEach((operator, index) => {
      const labels = { ...job, operator: `${index}:${operator.name}` };
      rows.samples.push({ labels, value: operator.rowsDone });
      blocks.samples.push({ labels, value: operator.blocksDone });
      active.samples.push({ labels, value: operator.activeTasks });
      queued.samples.push({ labels, value: operator.queuedTasks });
      storeBytes.samples.push({ labels, value: operator.storeBytes });
      if (operator.actors) {
        actors.samples.push({ labels: { ...labels, state: 'running' }, value: operator.actors.running }, { labels: { ...labels, state: 'pending' }, value: operator.actors.pending });
      }
      for (const [name, value] of Object.entries(operator.metrics ?? {})) counters.samples.push({ labels: { ...labels, name }, value });
    });
  }
  const liveRows = [...runningJobs.keys()].reduce((sum, executor) => sum + executor.rowsOut, 0);
  return [
    { name: 'trellis_data_jobs_running', type: 'gauge', help: 'Data jobs running in this driver.', samples: [{ value: runningJobs.size }] },
    {
      name: 'trellis_data_jobs_total', type: 'counter', help: 'Data jobs this driver has ended, by outcome.',
      samples: [{ labels: { outcome: 'succeeded' }, value: jobTotals.succeeded }, { labels: { outcome: 'failed' }, value: jobTotals.failed }],
    },
    { name: 'trellis_data_rows_out_total', type: 'counter', help: "Rows this driver's data jobs have handed to their consumer or sink.", samples: [{ value: jobTotals.rows + liveRows }] },
    budget, held, rows, blocks, active, queued, actors, storeBytes, counters,
  ];
}

registerMetricsCollector(dataMetrics);

/** A write job's id, for naming its files and records. */
export function newWriteId(): string {
  return newObjectId().slice(0, 12);
}

