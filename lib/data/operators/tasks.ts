/** Operators that run data tasks on the worker pool: reads, function maps and writes. */
import { askForRoom, cancel, get } from '../../core/api.js';
import type { ElasticAsk } from '../../core/broker-client.js';
import { currentRuntime } from '../../core/runtime-context.js';
import { ObjectRef } from '../../core/object-ref.js';
import { DataError, DataStallError } from '../../errors.js';
import { Deque } from '../../core/deque.js';
import type { Block } from '../block.js';
import type { ReadTask, WriteContext } from '../datasource.js';
import { slicesOf, type ComputeOptions, type PhysicalOperatorSpec } from '../plan.js';
import { dataTask, writeTask, type TaskResult, type WriteResult } from '../worker-tasks.js';
import { shipInstance } from '../udf.js';
import type { StreamingExecutor } from '../executor.js';
import { Operator, askedBundle, dispose, noBlocks, taskOptionsOf, taskTargets, unitBytes, type Unit } from './operator.js';

/** How long an operator's tasks wait for resources before it asks a shared cluster for room. */
const ASK_AFTER_MS = 1000;
/** The most room one operator's tasks have asked for and not yet been lent. */
const MAX_OPEN_ASKS = 8;

/** Shared by operators that run data tasks: submission, completion and retries. */
export abstract class TaskOperator extends Operator {
  #running = new Map<Unit, ObjectRef<unknown>>();
  /** Room asked of a shared cluster's broker for tasks waiting on resources, not here yet. */
  readonly #asks = new Set<ElasticAsk>();
  #lastAsk = 0;
  #refused = false;

  /**
   * On a shared cluster (cluster.autoscale), tasks that have waited a second for resources ask
   * the broker for room of their shape: about one bundle for every two waiting, at most eight not
   * yet lent, once a second. As an actor pool's asks, this is borrowing: the nodes go back a
   * second after nothing is on them, and asks still waiting are withdrawn when the operator is done.
   */
  override autoscale(): void {
    if (this.executor.failed || this.done()) return this.#withdrawAsks();
    for (const ask of [...this.#asks]) {
      if (ask.failed !== undefined && !this.#refused) {
        // No host could hold one task: its tasks wait as before (the runtime warns of them).
        this.#refused = true;
        this.executor.warn(`${this.name}: the cluster cannot hold another of its tasks: ${ask.failed}`);
      }
      if (ask.settled || ask.failed !== undefined) this.#asks.delete(ask);
    }
    const now = Date.now();
    const runtime = currentRuntime();
    if (this.#refused || now - this.#lastAsk < ASK_AFTER_MS || !runtime.pendingTasks) return;
    const pending = runtime.pendingTasks(this.name);
    if (pending.count === 0 || pending.oldestMs < ASK_AFTER_MS) return;
    this.#lastAsk = now;
    const wanted = Math.min(MAX_OPEN_ASKS, Math.ceil(pending.count / 2)) - this.#asks.size;
    const bundle = askedBundle((this.spec as { compute: ComputeOptions }).compute);
    if (Object.keys(bundle).length === 0) return;
    for (let i = 0; i < wanted; i++) {
      const ask = askForRoom(bundle);
      if (!ask) return;
      this.#asks.add(ask);
    }
  }

  #withdrawAsks(): void {
    for (const ask of this.#asks) ask.withdraw();
    this.#asks.clear();
  }

  protected abstract submit(unit: Unit): ObjectRef<TaskResult>;

  protected run(unit: Unit): void {
    this.began(unit);
    this.#attempt(unit);
  }

  /**
   * Retries after a worker died: the runtime's, or this operator's where a sink is fused in, so
   * that the sink's WriteContext says which attempt it is.
   */
  protected get runtimeRetries(): number {
    return this.hasFusedSink ? 0 : this.executor.options.maxRetries;
  }

  #attempt(unit: Unit): void {
    const ref = this.submit(unit);
    this.#running.set(unit, ref);
    get(ref).then(
      (result) => {
        this.#running.delete(unit);
        ref[Symbol.dispose]();
        if (this.executor.failed) {
          dispose(result.blocks.map((block) => ({ ref: block.ref, meta: block })));
          this.dropUnit(unit);
          return;
        }
        if (result.error) {
          dispose(result.blocks.map((block) => ({ ref: block.ref, meta: block })));
          if (this.retriedAfterOutage(unit, result.error, `task ${unit.seq}`, () => this.#attempt(unit))) return;
          this.onStageError(unit, result.error);
          return;
        }
        if (result.written) this.recordWrite(unit, result.written);
        this.finished(
          unit,
          result.blocks.map((block) => ({ ref: block.ref, meta: { rows: block.rows, bytes: block.bytes } })),
        );
      },
      (error: unknown) => {
        this.#running.delete(unit);
        ref[Symbol.dispose]();
        if (this.executor.failed) return this.dropUnit(unit);
        if (this.hasFusedSink && this.retriedAfterCrash(unit, error, `task ${unit.seq}`, () => this.#attempt(unit))) return;
        this.onInfrastructureError(unit, error);
      },
    );
  }

  /**
   * Cancels running tasks; after a stall, their workers are killed too (they may never return).
   * Tasks that write are left to finish (the executor's settle() waits for them): a task cancelled
   * without its worker killed runs on, and its write would land after the job has ended.
   */
  override async shutdown(forced = false): Promise<void> {
    this.#withdrawAsks();
    const force = forced || this.executor.failed instanceof DataStallError;
    if (this.hasFusedSink && !force) return;
    for (const ref of this.#running.values()) {
      try {
        cancel(ref, { force });
      } catch {
        // Already finished or the cluster is gone.
      }
    }
  }
}

/** Read tasks, with the function stages fused after the read. */
export class ReadOperator extends TaskOperator {
  readonly #tasks = new Deque<ReadTask>();
  /** The first row of each read task, where the source gave every task's row count. */
  readonly #rowStarts: number[] = [];
  declare readonly spec: Extract<PhysicalOperatorSpec, { kind: 'read' }>;

  override get isSource(): boolean {
    return true;
  }
  override async start(): Promise<void> {
    const parallelism = this.spec.parallelism ?? this.executor.defaultParallelism;
    const tasks = await this.spec.datasource.getReadTasks(parallelism);
    if (!Array.isArray(tasks)) throw new DataError('ERR_DATA_SOURCE', `${this.spec.datasource.name}.getReadTasks() must return an array of ReadTasks`, { operator: this.name });
    for (const task of tasks) {
      if (!task || typeof task !== 'object' || !('spec' in task)) {
        throw new DataError('ERR_DATA_SOURCE', `${this.spec.datasource.name}.getReadTasks() returned something that is not a ReadTask`, { operator: this.name });
      }
      this.#tasks.push(task);
    }
    if (this.spec.rowIds) {
      // Ids name each task's data: every task needs a key of its own, the same in every run.
      const seen = new Set<string>();
      tasks.forEach((task, index) => {
        const key = task.metadata.key;
        if (typeof key !== 'string' || key === '') {
          throw new DataError('ERR_DATA_SOURCE', `rowIds needs every ReadTask to name its data with metadata.key (the same in every run); ${this.spec.datasource.name}.getReadTasks() gave task ${index} without one`, { operator: this.name });
        }
        if (seen.has(key)) throw new DataError('ERR_DATA_SOURCE', `rowIds needs ReadTask keys to be unique; ${this.spec.datasource.name}.getReadTasks() gave '${key}' twice`, { operator: this.name });
        seen.add(key);
      });
    }
    this.blocksTotal = tasks.length;
    this.upstreamDone = true;
    const rowsKnown = tasks.every((task) => typeof task.metadata.rows === 'number');
    if (rowsKnown) {
      let start = 0;
      for (const task of tasks) {
        this.#rowStarts.push(start);
        start += task.metadata.rows!;
      }
      // Row maps keep the count; filters, flat maps and batch functions may change it.
      if (this.spec.stages.every((stage) => stage.kind === 'map')) this.rowsTotal = start;
    }
  }
  override get queuedUnits(): number {
    return this.#tasks.length;
  }
  override done(): boolean {
    return (this.#tasks.length === 0 || this.truncated) && super.done();
  }
  hasWork(): boolean {
    return !this.truncated && this.#tasks.length > 0;
  }
  capacity(): number {
    return this.executor.taskSlots(this.spec.compute);
  }
  /** The next read's output: its metadata's size where given, else what reads made so far. */
  override estimateOutputBytes(unitBytes: number): number {
    if (!this.storesOutput) return 0;
    const bytes = this.#tasks.peek()?.metadata.bytes;
    // Metadata counts the data; its blocks in the store carry their descriptions too.
    return bytes !== undefined ? bytes + 4096 : super.estimateOutputBytes(unitBytes);
  }
  protected override firstEstimate(): number {
    return this.executor.options.minBlockBytes;
  }
  override truncate(): void {
    super.truncate();
    this.#tasks.clear();
  }
  launch(): void {
    const estimate = this.estimateOutputBytes(0);
    const read = this.#tasks.shift()!;
    const seq = this.newSeq();
    const unit: Unit = { seq, blocks: [], rows: 0, bytes: 0, attempts: 0, read, estimate, rowStart: this.#rowStarts[seq] };
    this.run(unit);
  }
  protected submit(unit: Unit): ObjectRef<TaskResult> {
    const read = unit.read!;
    return dataTask
      .options(taskOptionsOf(this.spec.compute, this.name, this.runtimeRetries))
      .remote(
        { kind: 'read', read: read.spec, args: read.args, ...(this.spec.rowIds ? { rowIds: { column: this.spec.rowIds, key: read.metadata.key! } } : {}) },
        this.spec.stages,
        taskTargets(this.executor),
        this.fusedWrite(unit),
      );
  }
}

/** Function stages over blocks, one task per block or per bundle of batchSize rows. */
export class TaskMapOperator extends TaskOperator {
  declare readonly spec: Extract<PhysicalOperatorSpec, { kind: 'task-map' }>;
  hasWork(): boolean {
    return !this.truncated && this.hasUnitOf(this.spec.bundleRows);
  }
  capacity(): number {
    return this.executor.taskSlots(this.spec.compute);
  }
  protected override concurrentUnits(): number {
    return this.executor.taskSlots(this.spec.compute);
  }
  launch(): void {
    this.run(this.nextMapUnit());
  }
  protected submit(unit: Unit): ObjectRef<TaskResult> {
    return dataTask
      .options(taskOptionsOf(this.spec.compute, this.name, this.runtimeRetries))
      .remote({ kind: 'blocks', slices: slicesOf(unit.blocks) }, this.spec.stages, taskTargets(this.executor), this.fusedWrite(unit), ...(unit.blocks.map((block) => block.ref) as unknown as Block[]));
  }
}

/** Write tasks: the sink's write() per block (or bundle), on workers. */
export class WriteOperator extends Operator {
  declare readonly spec: Extract<PhysicalOperatorSpec, { kind: 'write' }>;
  readonly #shipped;

  constructor(executor: StreamingExecutor, spec: Extract<PhysicalOperatorSpec, { kind: 'write' }>, index: number) {
    super(executor, spec, index);
    this.#shipped = shipInstance(spec.sink, 'write()');
  }

  hasWork(): boolean {
    return this.hasUnitOf(this.spec.sink.minRowsPerWrite);
  }
  capacity(): number {
    return this.executor.taskSlots(this.spec.compute);
  }
  override estimateOutputBytes(): number {
    return 0;
  }
  launch(): void {
    const unit = this.nextUnit(this.spec.sink.minRowsPerWrite);
    this.began(unit);
    this.#attempt(unit);
  }
  #attempt(unit: Unit): void {
    const context: WriteContext = this.executor.writeContext(unit);
    // Retried here rather than by the runtime, so that the sink sees which attempt it is.
    const ref = writeTask
      .options({ ...taskOptionsOf(this.spec.compute, this.name, 0) })
      .remote(this.#shipped, context, this.executor.checkpoint ?? null, taskTargets(this.executor), slicesOf(unit.blocks), ...(unit.blocks.map((block) => block.ref) as unknown as Block[])) as ObjectRef<WriteResult>;
    get(ref).then(
      (result) => {
        ref[Symbol.dispose]();
        if (this.executor.failed) return this.dropUnit(unit);
        if (result.error) {
          // A failed write leaves no file (its temp file or upload is removed): it may run again.
          if (this.retriedAfterOutage(unit, result.error, `write task ${unit.seq}`, () => this.#attempt(unit))) return;
          return this.onStageError(unit, result.error);
        }
        if (result.rows > 0) this.writeResults.push({ seq: unit.seq, result: result.result });
        this.rowsDone += result.rows;
        this.finished(unit, noBlocks);
      },
      (error: unknown) => {
        ref[Symbol.dispose]();
        if (this.executor.failed) return this.dropUnit(unit);
        if (this.retriedAfterCrash(unit, error, `write task ${unit.seq}`, () => this.#attempt(unit))) return;
        this.onInfrastructureError(unit, error);
      },
    );
  }
}
