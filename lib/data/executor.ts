/**
 * The streaming executor: every physical operator runs at once, blocks flow downstream as they are
 * made, and a memory budget on the blocks alive in the object store holds back the operators that
 * create data (reads and inputs) while downstream work drains it. Downstream operators are served
 * first, since running them frees memory. A watchdog turns a stall into an error naming the
 * operator, and a failure anywhere stops the whole job and releases everything it held.
 */
import { cancel, get, isInitialized, kill, put, state } from '../core/api.js';
import { ObjectRef } from '../core/object-ref.js';
import type { ActorHandle } from '../core/registry.js';
import { ActorDiedError, DataError, DataStallError, InvalidArgumentError, TaskError, WorkerCrashedError } from '../errors.js';
import { Deque } from '../core/deque.js';
import type { Block } from './block.js';
import type { Datasink, ReadTask, WriteContext } from './datasource.js';
import { slicesOf, type InputBlock, type PhysicalOperatorSpec, type ComputeOptions, type ActorPoolOptions } from './plan.js';
import { createProgressReporter, type ProgressOption } from './progress.js';
import type { JobProgress, OperatorProgress, ProgressReporter } from './progress-types.js';
import type { StageSpec } from './stages.js';
import { dataTask, RemoteDataPoolActor, sliceTask, writeTask, type DataPoolActor, type FusedWrite, type StageErrorInfo, type TaskResult, type TaskTargets, type WriteResult } from './worker-tasks.js';
import { shipInstance, type ShippedInstance } from './udf.js';
import { newObjectId } from '../store/object-id.js';

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
  /** Retries of a task or batch whose worker died (default 3). */
  maxRetries?: number;
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
}

/** What a finished job reports. */
export interface JobStats {
  rowsOut: number;
  blocksOut: number;
  erroredBlocks: number;
  peakBudgetBytes: number;
  wallMs: number;
  operators: OperatorProgress[];
}

interface Unit {
  seq: number;
  blocks: InputBlock[];
  rows: number;
  bytes: number;
  /** Row offset of the unit in the operator's input stream, where known. */
  rowStart?: number;
  attempts: number;
  /** Read tasks: the task. */
  read?: ReadTask;
  /** Bytes of output this unit may store while it runs, held against the budget until it ends. */
  reserved?: number;
  /** The operator's estimate of `reserved`, where it knows better than its input size. */
  estimate?: number;
}

const noBlocks: InputBlock[] = [];

/** The most batches one call of a batch stage carries (see Operator.unitRows). */
const MAX_BATCHES_PER_UNIT = 16;
/** The most small blocks one task or call of a stage without batches carries (see Operator.#nextBundle). */
const MAX_BLOCKS_PER_UNIT = 16;

function unitRows(blocks: readonly InputBlock[]): number {
  return blocks.reduce((sum, block) => sum + block.meta.rows, 0);
}
function unitBytes(blocks: readonly InputBlock[]): number {
  return blocks.reduce((sum, block) => sum + block.meta.bytes, 0);
}

function splitInputBlock(block: InputBlock, rows: number): [InputBlock, InputBlock] {
  const offset = block.slice?.[0] ?? 0;
  const headBytes = Math.ceil((block.meta.bytes * rows) / Math.max(1, block.meta.rows));
  const head: InputBlock = { ref: block.ref, meta: { rows, bytes: headBytes }, slice: [offset, rows] };
  const restRows = block.meta.rows - rows;
  const rest: InputBlock = {
    ref: new ObjectRef<Block>(block.ref.id),
    meta: { rows: restRows, bytes: Math.max(0, block.meta.bytes - headBytes) },
    slice: [offset + rows, restRows],
  };
  return [head, rest];
}

function dispose(blocks: readonly InputBlock[]): void {
  for (const block of blocks) block.ref[Symbol.dispose]();
}

/** What one task or actor of this shape asks of a node. */
function resourcesOf(compute: ComputeOptions): Record<string, number> {
  return { ...(compute.resources ?? {}), CPU: compute.numCpus ?? 1, GPU: compute.numGpus ?? 0, memory: compute.memory ?? 0 };
}

function taskOptionsOf(compute: ComputeOptions, name: string, maxRetries: number) {
  return {
    numCpus: compute.numCpus ?? 1,
    numGpus: compute.numGpus,
    memory: compute.memory,
    resources: compute.resources,
    maxRetries,
    name,
  };
}

/** One running operator: its input queue, its work in flight, and its ordered outputs. */
abstract class Operator {
  readonly inputs = new Deque<InputBlock>();
  inputBytes = 0;
  inputRows = 0;
  upstreamDone = false;
  /** Stopped by a limit downstream: takes no more input and starts no more work. */
  truncated = false;
  active = 0;
  activeInputBytes = 0;
  rowsDone = 0;
  blocksDone = 0;
  blocksOut = 0;
  outputBytes = 0;
  rowsTotal?: number;
  blocksTotal?: number;
  backpressure?: string;
  /** Since when the store's lag in freeing what the job let go has held this operator back. */
  lagWaitSince?: number;
  lastCompletion = Date.now();
  /** Output bytes reserved for running units (their outputs reach the store before they end). */
  reservedBytes = 0;
  /** Output per unit and per input byte, learned as units finish. */
  #outputBytesSeen = 0;
  #inputBytesSeen = 0;
  #unitsSeen = 0;
  #reorder = new Map<number, InputBlock[]>();
  #nextRelease = 0;
  #nextSeq = 0;
  #inputRowCursor = 0;
  /** Results of write() calls made by this operator (its own, or a sink fused into it). */
  readonly writeResults: Array<{ seq: number; result: unknown }> = [];
  readonly #fusedSink?: ShippedInstance;

  constructor(
    readonly executor: StreamingExecutor,
    readonly spec: PhysicalOperatorSpec,
    readonly index: number,
  ) {
    if (spec.kind !== 'write' && 'sink' in spec && spec.sink) this.#fusedSink = shipInstance(spec.sink, 'write()');
  }

  /**
   * A unit retried by this operator (not the runtime) whose worker died runs again while
   * maxRetries allows, as its next attempt: true when `again` was called.
   */
  protected retriedAfterCrash(unit: Unit, error: unknown, what: string, again: () => void): boolean {
    if (!(error instanceof WorkerCrashedError) || unit.attempts >= this.executor.options.maxRetries) return false;
    unit.attempts++;
    this.executor.warn(`${this.name}: ${what}'s worker died; retrying (attempt ${unit.attempts + 1})`);
    again();
    return true;
  }

  protected get hasFusedSink(): boolean {
    return this.#fusedSink !== undefined;
  }

  /** What a task needs to write its output through a fused sink, or null. */
  protected fusedWrite(unit: Unit): FusedWrite | null {
    if (!this.#fusedSink) return null;
    return { sink: this.#fusedSink, context: { taskIndex: unit.seq, attempt: unit.attempts, writeId: this.executor.writeId } };
  }

  protected recordWrite(unit: Unit, written: { result: unknown; rows: number }): void {
    if (written.rows > 0) this.writeResults.push({ seq: unit.seq, result: written.result });
    this.rowsDone += written.rows;
  }

  get name(): string {
    return this.spec.name;
  }

  /** Sources make data from nothing: only they are held back by the budget unconditionally. */
  get isSource(): boolean {
    return false;
  }

  async start(): Promise<void> {}

  /** A unit is ready to launch now. */
  abstract hasWork(): boolean;
  /** Units that could run at once. */
  abstract capacity(): number;
  abstract launch(): void;

  get queuedUnits(): number {
    return this.inputs.length;
  }

  done(): boolean {
    return (this.upstreamDone || this.truncated) && this.inputs.length === 0 && this.active === 0 && this.#reorder.size === 0;
  }

  /** Whether this operator's outputs go to the store (not when a sink is fused into it). */
  get storesOutput(): boolean {
    return !this.#fusedSink;
  }

  /**
   * Bytes a unit of `unitBytes` input will store: scaled by what finished units made of their
   * input, or their average output where units have no input (reads); before any finished, the
   * operator's own guess.
   */
  estimateOutputBytes(unitBytes: number): number {
    if (!this.storesOutput) return 0;
    if (this.#unitsSeen === 0) return this.firstEstimate(unitBytes);
    if (unitBytes > 0 && this.#inputBytesSeen > 0) return Math.ceil((unitBytes * this.#outputBytesSeen) / this.#inputBytesSeen);
    return Math.ceil(this.#outputBytesSeen / this.#unitsSeen);
  }

  /** The output estimate before any unit finished: as much as it takes in. */
  protected firstEstimate(unitBytes: number): number {
    return unitBytes;
  }

  /** Input bytes of the unit that would launch next. */
  nextUnitBytes(): number {
    const head = this.inputs.peek();
    if (!head) return 0;
    if (this.bundlesBlocks) return this.#nextBundle().bytes;
    const rows = this.unitRows();
    if (rows === undefined || head.meta.rows === 0) return head.meta.bytes;
    return Math.ceil((rows * Math.max(this.inputBytes, head.meta.bytes)) / Math.max(1, this.inputRows, head.meta.rows));
  }

  /** Whether units of this operator are bundles of whole blocks (a map with no batch size). */
  protected get bundlesBlocks(): boolean {
    return false;
  }

  /**
   * The next bundle of whole blocks: small blocks go several to a task, as a batch stage's
   * batches do (see unitRows), up to MAX_BLOCKS_PER_UNIT blocks of together at most the minimum
   * block size, and no more than an even share of the queue over the units that run at once.
   * Each block still reaches the stage whole and alone.
   */
  #nextBundle(): { count: number; bytes: number } {
    const share = Math.floor(this.inputs.length / Math.max(1, this.concurrentUnits()));
    const limit = this.executor.options.maxErroredBlocks > 0 ? 1 : Math.max(1, Math.min(MAX_BLOCKS_PER_UNIT, share));
    let count = 0;
    let bytes = 0;
    for (const block of this.inputs) {
      if (count >= limit || (count > 0 && bytes + block.meta.bytes > this.executor.options.minBlockBytes)) break;
      count++;
      bytes += block.meta.bytes;
    }
    return { count, bytes };
  }

  /** Takes the next bundle of whole blocks off the input queue (see #nextBundle). */
  protected nextBlockBundle(): Unit {
    const { count } = this.#nextBundle();
    const blocks: InputBlock[] = [];
    for (let i = 0; i < count; i++) blocks.push(this.inputs.shift()!);
    for (const block of blocks) {
      this.inputBytes -= block.meta.bytes;
      this.inputRows -= block.meta.rows;
    }
    const total = blocks.reduce((sum, block) => sum + block.meta.rows, 0);
    const unit: Unit = { seq: this.#nextSeq++, blocks, rows: total, bytes: unitBytes(blocks), attempts: 0, rowStart: this.#inputRowCursor };
    this.#inputRowCursor += total;
    return unit;
  }

  /** The next unit of a map: a bundle of whole blocks, or whole batches cut to the rows. */
  protected nextMapUnit(): Unit {
    return this.bundlesBlocks ? this.nextBlockBundle() : this.nextUnit(this.unitRows());
  }

  /** Rows in a batch of this operator's stage, when it cuts its input into batches. */
  get batchRows(): number | undefined {
    return 'bundleRows' in this.spec ? this.spec.bundleRows : undefined;
  }

  /** How many units of this operator can run or wait at their workers at once. */
  protected concurrentUnits(): number {
    return 1;
  }

  /**
   * Rows of the next unit of a batch stage: a whole number of batches, so every batch but the
   * job's last keeps batchSize rows. One batch per call made the driver's cost per call (and
   * the worker's: a message, a reply, a stored block) a share of every batch; a call of many
   * batches spreads it. Units still get no larger than an even share of the queued rows over
   * the units that run at once, so the tail of a job is cut fine and no worker is left with the
   * last big unit while the others wait; nor larger than MAX_BATCHES_PER_UNIT batches or a
   * block's maximum bytes, which bounds the work a worker death loses and the memory a call holds.
   */
  protected unitRows(): number | undefined {
    const batch = this.batchRows;
    if (batch === undefined) return undefined;
    // A failing unit is skipped whole under maxErroredBlocks: one batch each keeps that exact.
    if (this.executor.options.maxErroredBlocks > 0) return batch;
    let batches = Math.min(MAX_BATCHES_PER_UNIT, Math.floor(this.inputRows / Math.max(1, this.concurrentUnits()) / batch));
    if (this.inputRows > 0 && this.inputBytes > 0) {
      batches = Math.min(batches, Math.floor(this.executor.options.maxBlockBytes / ((this.inputBytes / this.inputRows) * batch)));
    }
    return Math.max(1, batches) * batch;
  }

  takeInput(block: InputBlock): void {
    if (this.truncated) {
      dispose([block]);
      return;
    }
    this.inputs.push(block);
    this.inputBytes += block.meta.bytes;
    this.inputRows += block.meta.rows;
  }

  /** Takes blocks off the input queue toward a unit of `rows` rows (one block when undefined). */
  protected nextUnit(rows?: number): Unit {
    const blocks: InputBlock[] = [];
    let total = 0;
    while (this.inputs.length > 0 && (blocks.length === 0 || (rows !== undefined && total < rows))) {
      let block = this.inputs.shift()!;
      if (rows !== undefined && total + block.meta.rows > rows) {
        // Cut the block so the unit has exactly `rows` rows; the rest stays first in line under a
        // handle of its own, so each part lets go of the object independently.
        const [head, rest] = splitInputBlock(block, rows - total);
        this.inputs.unshift(rest);
        block = head;
      }
      blocks.push(block);
      total += block.meta.rows;
      this.inputBytes -= block.meta.bytes;
      this.inputRows -= block.meta.rows;
    }
    const unit: Unit = { seq: this.#nextSeq++, blocks, rows: total, bytes: unitBytes(blocks), attempts: 0, rowStart: this.#inputRowCursor };
    this.#inputRowCursor += total;
    return unit;
  }

  protected newSeq(): number {
    return this.#nextSeq++;
  }

  /** Whether enough rows wait to fill a unit of `rows` (or any, at the end of input). */
  protected hasUnitOf(rows?: number): boolean {
    if (this.inputs.length === 0) return false;
    if (rows === undefined || this.upstreamDone) return true;
    return this.inputRows >= rows;
  }

  protected began(unit: Unit): void {
    this.active++;
    this.activeInputBytes += unit.bytes;
    unit.reserved = unit.estimate ?? this.estimateOutputBytes(unit.bytes);
    this.reservedBytes += unit.reserved;
    this.executor.touch();
  }

  /** A unit stops running without finishing (it goes back to be retried). */
  protected unlaunched(unit: Unit): void {
    this.active--;
    this.activeInputBytes -= unit.bytes;
    this.reservedBytes -= unit.reserved ?? 0;
    unit.reserved = undefined;
  }

  /** A unit finished: its outputs are released downstream in order, its inputs let go. */
  protected finished(unit: Unit, outputs: InputBlock[], inputsConsumed = true): void {
    this.unlaunched(unit);
    if (inputsConsumed) dispose(unit.blocks);
    this.executor.noteFreed(inputsConsumed ? unit.bytes : 0);
    this.blocksDone += Math.max(1, unit.blocks.length);
    this.lastCompletion = Date.now();
    const bytes = unitBytes(outputs);
    this.#outputBytesSeen += bytes;
    this.#inputBytesSeen += unit.bytes;
    this.#unitsSeen++;
    this.#release(unit.seq, outputs);
    this.executor.touch();
    this.executor.schedule();
  }

  /** A unit made nothing and never will (skipped after an error, or cut by a limit). */
  protected skipped(unit: Unit): void {
    this.finished(unit, noBlocks);
  }

  #release(seq: number, outputs: InputBlock[]): void {
    if (this.truncated) {
      dispose(outputs);
      outputs = noBlocks;
    }
    if (!this.executor.options.preserveOrder) {
      this.#emit(outputs);
      return;
    }
    this.#reorder.set(seq, outputs);
    this.outputBytes += unitBytes(outputs);
    while (this.#reorder.has(this.#nextRelease)) {
      const ready = this.#reorder.get(this.#nextRelease)!;
      this.#reorder.delete(this.#nextRelease);
      this.outputBytes -= unitBytes(ready);
      this.#nextRelease++;
      this.#emit(ready);
    }
  }

  /** Units never launched (a truncated operator) must not hold back the order. */
  protected abandonSeq(seq: number): void {
    this.#release(seq, noBlocks);
  }

  #emit(outputs: InputBlock[]): void {
    for (const block of outputs) {
      this.rowsDone += block.meta.rows;
      this.blocksOut++;
      this.executor.emit(this, block);
    }
  }

  /** Held bytes: queued input, input and reserved output of running work, and finished output waiting for its turn. */
  heldBytes(): number {
    return this.inputBytes + this.activeInputBytes + this.reservedBytes + this.outputBytes;
  }

  /** Stops taking work: queued input is let go, and so is output waiting for its turn. */
  truncate(): void {
    this.truncated = true;
    this.dropInputs();
    for (const [seq, blocks] of this.#reorder) {
      if (blocks.length === 0) continue;
      dispose(blocks);
      this.outputBytes -= unitBytes(blocks);
      this.#reorder.set(seq, noBlocks);
    }
  }

  protected dropInputs(): void {
    while (this.inputs.length) dispose([this.inputs.shift()!]);
    this.inputBytes = 0;
    this.inputRows = 0;
  }

  progress(): OperatorProgress {
    return {
      name: this.name,
      rowsDone: this.rowsDone,
      rowsTotal: this.rowsTotal,
      blocksDone: this.blocksDone,
      blocksTotal: this.blocksTotal,
      activeTasks: this.active,
      queuedTasks: this.queuedUnits,
      storeBytes: this.heldBytes(),
      backpressure: this.backpressure,
      done: this.done(),
    };
  }

  async shutdown(): Promise<void> {}

  /** Errors of a unit's stages, named by operator, block and rows. */
  /** The stages this operator's tasks run, in order. */
  protected get stages(): readonly StageSpec[] {
    if (this.spec.kind === 'read' || this.spec.kind === 'task-map') return this.spec.stages;
    if (this.spec.kind === 'actor-map') return [this.spec.classStage, ...this.spec.following];
    return [];
  }

  /**
   * Errors of a unit's stages, named by operator, block and rows. Rows count in the operator's
   * input (a read's: the dataset's, when the source gave row counts), as far as every stage before
   * the failing one maps row to row; past a filter or a batch stage, they count in that stage's
   * input within the block.
   */
  protected stageError(unit: Unit, info: StageErrorInfo): DataError {
    const stages = this.stages;
    const failing = stages.findIndex((stage) => stage.name === info.stage);
    const aligned = failing >= 0 && stages.slice(0, failing).every((stage) => stage.kind === 'map');
    let rows: [number, number] | undefined = info.rows;
    let rowText = '';
    if (rows && aligned && unit.rowStart !== undefined) {
      rows = [unit.rowStart + rows[0], unit.rowStart + rows[1]];
      rowText = rows[1] - rows[0] === 1 ? `, row ${rows[0]}` : `, rows ${rows[0]}-${rows[1] - 1}`;
    } else if (rows) {
      rowText = `, ${rows[1] - rows[0] === 1 ? `row ${rows[0]}` : `rows ${rows[0]}-${rows[1] - 1}`} of ${info.stage}'s input in that ${unit.read ? 'read task' : 'block'}`;
    }
    const where = unit.read ? `read task ${unit.seq}` : `block ${unit.seq}`;
    const cause = Object.assign(new Error(info.message), { name: info.name, code: info.code, stack: info.stack });
    return new DataError('ERR_DATA_UDF_FAILED', `operator ${this.name} failed at ${info.stage} on ${where}${rowText}: ${info.name}: ${info.message}`, {
      operator: this.name,
      block: unit.seq,
      rows,
      cause,
    });
  }

  /** A stage threw: the job fails, or the block is counted and skipped within maxErroredBlocks. */
  protected onStageError(unit: Unit, info: StageErrorInfo): void {
    const error = this.stageError(unit, info);
    if (this.executor.countErroredBlock(error)) return this.skipped(unit);
    this.dropUnit(unit);
    this.executor.fail(error);
  }

  protected onInfrastructureError(unit: Unit, error: unknown): void {
    const err = error instanceof Error ? error : new Error(String(error));
    this.dropUnit(unit);
    this.executor.fail(
      new DataError('ERR_DATA_TASK_FAILED', `operator ${this.name} failed on block ${unit.seq}: ${err.message}`, { operator: this.name, block: unit.seq, cause: err }),
    );
  }

  /** A unit that ends without output because the job failed: its inputs are let go. */
  protected dropUnit(unit: Unit): void {
    if (unit.reserved === undefined) return; // already ended
    this.unlaunched(unit);
    unit.reserved = undefined;
    dispose(unit.blocks);
  }
}

/** Blocks already in the store (fromItems, a materialized dataset): released under the budget. */
class InputOperator extends Operator {
  readonly #pending: InputBlock[];

  constructor(executor: StreamingExecutor, spec: Extract<PhysicalOperatorSpec, { kind: 'input' }>, index: number) {
    super(executor, spec, index);
    // The dataset keeps its own handles; the job holds its own, let go as blocks are consumed.
    this.#pending = spec.blocks.map((block) => ({ ref: new ObjectRef<Block>(block.ref.id), meta: block.meta, slice: block.slice }));
    this.upstreamDone = true;
    this.rowsTotal = unitRows(spec.blocks);
    this.blocksTotal = spec.blocks.length;
  }
  override get isSource(): boolean {
    return true;
  }
  override get queuedUnits(): number {
    return this.#pending.length;
  }
  override done(): boolean {
    return (this.#pending.length === 0 || this.truncated) && super.done();
  }
  hasWork(): boolean {
    return !this.truncated && this.#pending.length > 0;
  }
  capacity(): number {
    return Infinity;
  }
  override estimateOutputBytes(): number {
    return this.#pending[0]?.meta.bytes ?? 0;
  }
  launch(): void {
    const block = this.#pending.shift()!;
    const unit: Unit = { seq: this.newSeq(), blocks: [], rows: 0, bytes: 0, attempts: 0 };
    this.began(unit);
    this.finished(unit, [block]);
  }
  override truncate(): void {
    super.truncate();
    dispose(this.#pending.splice(0));
  }
  override async shutdown(): Promise<void> {
    dispose(this.#pending.splice(0));
  }
}

/** Shared by operators that run data tasks: submission, completion and retries. */
abstract class TaskOperator extends Operator {
  #running = new Map<Unit, ObjectRef<unknown>>();

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

  /** Cancels running tasks; after a stall, their workers are killed too (they may never return). */
  override async shutdown(): Promise<void> {
    const force = this.executor.failed instanceof DataStallError;
    for (const ref of this.#running.values()) {
      try {
        cancel(ref, { force });
      } catch {
        // Already finished or the cluster is gone.
      }
    }
  }
}

function taskTargets(executor: StreamingExecutor): TaskTargets {
  return {
    minBlockBytes: executor.options.minBlockBytes,
    maxBlockBytes: executor.options.maxBlockBytes,
    collectAfterBytes: Math.max(1 << 20, executor.budgetBytes / 8),
  };
}

/** Read tasks, with the function stages fused after the read. */
class ReadOperator extends TaskOperator {
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
      .remote({ kind: 'read', read: read.spec, args: read.args }, this.spec.stages, taskTargets(this.executor), this.fusedWrite(unit));
  }
}

/** Function stages over blocks, one task per block or per bundle of batchSize rows. */
class TaskMapOperator extends TaskOperator {
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
  protected override get bundlesBlocks(): boolean {
    return this.spec.bundleRows === undefined;
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

interface PoolActor {
  handle: ActorHandle<DataPoolActor>;
  state: 'starting' | 'ready' | 'stopping';
  inflight: number;
  idleSince: number;
}

/** A class stage on an autoscaling pool of actors, each built once (its model loaded once). */
class ActorMapOperator extends Operator {
  declare readonly spec: Extract<PhysicalOperatorSpec, { kind: 'actor-map' }>;
  readonly #actors = new Set<PoolActor>();
  readonly #retry = new Deque<Unit>();
  #lastScaleCheck = 0;
  #resourcesFree = true;

  get pool(): ActorPoolOptions {
    return this.spec.pool;
  }
  get className(): string {
    return this.spec.classStage.udf.descriptor.name;
  }

  override async start(): Promise<void> {
    // A pool whose minimum the cluster cannot hold would wait for its actors forever.
    const fit = this.executor.actorsThatFit(this.spec.compute);
    if (fit < this.pool.min) {
      const need = Object.entries(resourcesOf(this.spec.compute)).filter(([, amount]) => amount > 0).map(([name, amount]) => `${name} ${amount}`).join(', ');
      throw new DataError(
        'ERR_DATA_ACTOR_START',
        `actor pool ${this.name}: ${this.pool.min} ${this.className} actor(s) of ${need} each cannot start: the cluster holds ${fit} at most`,
        { operator: this.name },
      );
    }
    // The pool's minimum starts before the first batch arrives, so models load while data is read.
    for (let i = 0; i < this.pool.min; i++) this.#addActor();
  }

  #addActor(): void {
    const compute = this.spec.compute;
    const handle = RemoteDataPoolActor.options({
      numCpus: compute.numCpus ?? 1,
      numGpus: compute.numGpus,
      memory: compute.memory,
      resources: compute.resources,
      maxConcurrency: 1,
    }).remote();
    const actor: PoolActor = { handle, state: 'starting', inflight: 0, idleSince: Date.now() };
    this.#actors.add(actor);
    const startRef = handle.start.remote(this.spec.classStage, this.spec.following);
    const started = get(startRef).finally(() => startRef[Symbol.dispose]());
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new DataError('ERR_DATA_ACTOR_START', `actor pool ${this.name}: ${this.className}'s constructor did not finish within ${this.pool.startTimeoutMs} ms`, { operator: this.name })),
        this.pool.startTimeoutMs,
      );
      timer.unref();
    });
    Promise.race([started, timeout]).then(
      () => {
        clearTimeout(timer);
        if (actor.state !== 'starting') return;
        actor.state = 'ready';
        actor.idleSince = Date.now();
        this.executor.touch();
        this.executor.schedule();
      },
      (error: unknown) => {
        clearTimeout(timer);
        if (actor.state === 'stopping' || this.executor.failed) return;
        this.#removeActor(actor);
        if (error instanceof ActorDiedError && this.#actors.size > 0) return; // lost before it started; the pool refills
        const cause = error instanceof TaskError ? (error.cause as Error) : (error as Error);
        const message =
          error instanceof DataError ? error.message : `actor pool ${this.name}: ${this.className}'s constructor failed: ${cause?.name ?? 'Error'}: ${cause?.message ?? String(error)}`;
        this.executor.fail(new DataError('ERR_DATA_ACTOR_START', message, { operator: this.name, cause: error }));
      },
    );
  }

  /**
   * Takes an actor out of the pool and stops it. An idle, ready actor is asked to drain first: the
   * release of what its last call stored may still be on its way, and a process killed before it
   * arrives would leave those blocks counted for good. Busy or unstarted actors are killed at once.
   */
  #removeActor(actor: PoolActor, killIt = true): void {
    if (!this.#actors.delete(actor)) return;
    const wasIdle = actor.state === 'ready' && actor.inflight === 0;
    actor.state = 'stopping';
    if (!killIt) return;
    const stop = () => {
      try {
        kill(actor.handle);
      } catch {
        // The cluster may be shutting down.
      }
    };
    if (!wasIdle) return stop();
    let drained: ObjectRef<boolean>;
    try {
      drained = actor.handle.drain.remote() as ObjectRef<boolean>;
    } catch {
      return stop();
    }
    const guard = setTimeout(stop, 5_000);
    guard.unref();
    get(drained)
      .catch(() => undefined)
      .then(() => {
        clearTimeout(guard);
        drained[Symbol.dispose]();
        stop();
      });
  }

  counts(): { running: number; pending: number } {
    let running = 0;
    let pending = 0;
    for (const actor of this.#actors) {
      if (actor.state === 'ready') running++;
      else if (actor.state === 'starting') pending++;
    }
    return { running, pending };
  }

  override get queuedUnits(): number {
    return this.inputs.length + this.#retry.length;
  }

  /** A unit waiting for its retry is work still to do, even with the input queue empty. */
  override done(): boolean {
    return (this.#retry.length === 0 || this.truncated) && super.done();
  }

  hasWork(): boolean {
    if (this.truncated) return false;
    return this.#retry.length > 0 || this.hasUnitOf(this.spec.bundleRows);
  }

  #freeActor(): PoolActor | undefined {
    let best: PoolActor | undefined;
    for (const actor of this.#actors) {
      if (actor.state !== 'ready' || actor.inflight >= this.pool.maxTasksInFlightPerActor) continue;
      if (!best || actor.inflight < best.inflight) best = actor;
    }
    return best;
  }

  capacity(): number {
    return this.#freeActor() ? this.active + 1 : this.active;
  }

  override nextUnitBytes(): number {
    return this.#retry.peek()?.bytes ?? super.nextUnitBytes();
  }

  protected override get bundlesBlocks(): boolean {
    return this.spec.bundleRows === undefined;
  }

  /** Every call the pool could hold at its largest: its tail is cut for that many. */
  protected override concurrentUnits(): number {
    const actors = Number.isFinite(this.pool.max) ? this.pool.max : Math.max(this.pool.min, this.#actors.size, 1);
    return actors * this.pool.maxTasksInFlightPerActor;
  }

  launch(): void {
    const actor = this.#freeActor()!;
    const unit = this.#retry.length > 0 ? this.#retry.shift()! : this.nextMapUnit();
    actor.inflight++;
    this.began(unit);
    const ref = actor.handle.process.remote(taskTargets(this.executor), this.fusedWrite(unit), slicesOf(unit.blocks), ...(unit.blocks.map((block) => block.ref) as unknown as Block[])) as ObjectRef<TaskResult>;
    get(ref).then(
      (result) => {
        ref[Symbol.dispose]();
        this.#callEnded(actor);
        const outputs = result.blocks.map((block) => ({ ref: block.ref, meta: { rows: block.rows, bytes: block.bytes } }));
        if (this.executor.failed) {
          dispose(outputs);
          return this.dropUnit(unit);
        }
        if (result.error) {
          dispose(outputs);
          return this.onStageError(unit, result.error);
        }
        if (result.written) this.recordWrite(unit, result.written);
        this.finished(unit, outputs);
      },
      (error: unknown) => {
        ref[Symbol.dispose]();
        this.#callEnded(actor);
        if (this.executor.failed) return this.dropUnit(unit);
        if (error instanceof ActorDiedError && unit.attempts < this.executor.options.maxRetries) {
          // The batch goes to another actor; the pool refills to its minimum.
          this.#removeActor(actor, false);
          unit.attempts++;
          this.unlaunched(unit);
          this.#retry.push(unit);
          this.executor.warn(`actor pool ${this.name}: an actor died; block ${unit.seq} is retried (attempt ${unit.attempts + 1})`);
          this.executor.schedule();
          return;
        }
        this.onInfrastructureError(unit, error);
      },
    );
  }

  #callEnded(actor: PoolActor): void {
    actor.inflight--;
    if (actor.inflight === 0) actor.idleSince = Date.now();
  }

  /** Grows on queued work the actors cannot take; shrinks actors idle past the timeout. */
  autoscale(): void {
    if (this.executor.failed) return;
    const { running, pending } = this.counts();
    const total = running + pending;
    const now = Date.now();
    if (this.done()) {
      for (const actor of [...this.#actors]) this.#removeActor(actor);
      return;
    }
    if (total < this.pool.min) {
      for (let i = total; i < this.pool.min; i++) this.#addActor();
      return;
    }
    const waiting = this.hasWork() && !this.#freeActor();
    if (waiting && pending === 0 && total < this.pool.max) {
      // Resources are read at most every 200 ms: state() walks the whole cluster (and the store).
      if (now - this.#lastScaleCheck > 200) {
        this.#lastScaleCheck = now;
        this.#resourcesFree = this.executor.resourcesFree(this.spec.compute);
      }
      if (this.#resourcesFree) {
        this.#resourcesFree = false;
        this.#addActor();
      }
      return;
    }
    if (!this.hasWork() && total > this.pool.min) {
      for (const actor of this.#actors) {
        if (this.counts().running + this.counts().pending <= this.pool.min) break;
        if (actor.state === 'ready' && actor.inflight === 0 && now - actor.idleSince >= this.pool.idleTimeoutMs) this.#removeActor(actor);
      }
    }
  }

  override truncate(): void {
    super.truncate();
    for (const unit of this.#retry) dispose(unit.blocks);
    this.#retry.clear();
  }

  override progress(): OperatorProgress {
    const { running, pending } = this.counts();
    return { ...super.progress(), actors: { running, pending, min: this.pool.min, max: this.pool.max } };
  }

  override async shutdown(): Promise<void> {
    for (const actor of [...this.#actors]) this.#removeActor(actor);
    for (const unit of this.#retry) dispose(unit.blocks);
    this.#retry.clear();
  }
}

/** A limit: passes blocks until it has its rows, cuts the last one, and stops everything upstream. */
class LimitOperator extends Operator {
  declare readonly spec: Extract<PhysicalOperatorSpec, { kind: 'limit' }>;
  #remaining: number;
  constructor(executor: StreamingExecutor, spec: Extract<PhysicalOperatorSpec, { kind: 'limit' }>, index: number) {
    super(executor, spec, index);
    this.#remaining = spec.rows;
    this.rowsTotal = spec.rows;
  }
  hasWork(): boolean {
    return this.inputs.length > 0 && !this.truncated && this.#remaining > 0;
  }
  capacity(): number {
    return 1;
  }
  override takeInput(block: InputBlock): void {
    // Blocks made upstream after the limit was reached are not needed.
    if (this.#remaining === 0) return dispose([block]);
    super.takeInput(block);
  }
  override done(): boolean {
    return super.done() || (this.#remaining === 0 && this.active === 0);
  }
  #reached(): void {
    this.dropInputs();
    this.executor.truncateUpstreamOf(this);
  }
  override async start(): Promise<void> {
    if (this.#remaining === 0) this.#reached();
  }
  launch(): void {
    const unit = this.nextUnit();
    this.began(unit);
    const block = unit.blocks[0];
    if (block.meta.rows <= this.#remaining) {
      this.#remaining -= block.meta.rows;
      this.finished(unit, [block], false);
      if (this.#remaining === 0) this.#reached();
      return;
    }
    const keep = this.#remaining;
    this.#remaining = 0;
    this.#reached();
    // Cutting a block reads it here (zero-copy) and stores the cut: the copy is at most a block.
    get(block.ref).then(
      (table) => {
        trackDriverView(table as Block, block.meta.bytes);
        const offset = block.slice?.[0] ?? 0;
        const cut = (table as Block).slice(offset, offset + keep);
        const ref = put(cut) as ObjectRef<Block>;
        const bytes = Math.ceil((block.meta.bytes * keep) / Math.max(1, block.meta.rows));
        this.finished(unit, [{ ref, meta: { rows: keep, bytes } }]);
      },
      (error: unknown) => this.onInfrastructureError(unit, error),
    );
  }
}

/** Repartition: waits for all input, then cuts it into numBlocks blocks of equal rows. */
class RepartitionOperator extends Operator {
  declare readonly spec: Extract<PhysicalOperatorSpec, { kind: 'repartition' }>;
  #planned = false;
  #held: InputBlock[] = [];
  #outstanding = 0;

  hasWork(): boolean {
    return !this.#planned && this.upstreamDone && !this.truncated;
  }
  capacity(): number {
    return 1;
  }
  override get queuedUnits(): number {
    return this.#planned ? 0 : this.inputs.length;
  }
  override done(): boolean {
    return this.#planned && this.#outstanding === 0 && super.done();
  }
  override heldBytes(): number {
    return super.heldBytes() + unitBytes(this.#held);
  }
  launch(): void {
    this.#planned = true;
    this.#held = [];
    while (this.inputs.length) this.#held.push(this.inputs.shift()!);
    this.inputBytes = 0;
    this.inputRows = 0;
    const total = unitRows(this.#held);
    const parts = Math.max(1, this.spec.numBlocks);
    this.blocksTotal = parts;
    this.rowsTotal = total;
    // Output i covers rows [start_i, end_i) of the concatenated input.
    let blockIndex = 0;
    let offsetInBlock = 0;
    this.#outstanding = parts;
    for (let part = 0; part < parts; part++) {
      const want = Math.floor(total / parts) + (part < total % parts ? 1 : 0);
      const refs: ObjectRef<Block>[] = [];
      const slices: Array<[number, number]> = [];
      let need = want;
      let bytes = 0;
      while (need > 0 && blockIndex < this.#held.length) {
        const block = this.#held[blockIndex];
        const take = Math.min(need, block.meta.rows - offsetInBlock);
        if (take > 0) {
          refs.push(block.ref);
          slices.push([(block.slice?.[0] ?? 0) + offsetInBlock, take]);
          bytes += Math.ceil((block.meta.bytes * take) / Math.max(1, block.meta.rows));
        }
        need -= take;
        offsetInBlock += take;
        if (offsetInBlock >= block.meta.rows) {
          blockIndex++;
          offsetInBlock = 0;
        }
      }
      const unit: Unit = { seq: this.newSeq(), blocks: [], rows: want, bytes: 0, attempts: 0, estimate: bytes };
      this.began(unit);
      if (refs.length === 0) {
        this.#partDone(unit, []);
        continue;
      }
      const ref = sliceTask
        .options({ numCpus: 1, maxRetries: this.executor.options.maxRetries, name: this.name })
        .remote(slices, taskTargets(this.executor), ...(refs as unknown as Block[]));
      get(ref).then(
        (result) => {
          ref[Symbol.dispose]();
          this.#partDone(unit, result.blocks.map((block) => ({ ref: block.ref, meta: { rows: block.rows, bytes: block.bytes } })));
        },
        (error: unknown) => this.onInfrastructureError(unit, error),
      );
    }
  }
  #partDone(unit: Unit, outputs: InputBlock[]): void {
    this.#outstanding--;
    if (this.#outstanding === 0) {
      dispose(this.#held);
      this.#held = [];
    }
    this.finished(unit, outputs);
  }
  override async shutdown(): Promise<void> {
    dispose(this.#held);
    this.#held = [];
  }
}

/** Write tasks: the sink's write() per block (or bundle), on workers. */
class WriteOperator extends Operator {
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
    const context: WriteContext = { taskIndex: unit.seq, attempt: unit.attempts, writeId: this.executor.writeId };
    // Retried here rather than by the runtime, so that the sink sees which attempt it is.
    const ref = writeTask
      .options({ ...taskOptionsOf(this.spec.compute, this.name, 0) })
      .remote(this.#shipped, context, taskTargets(this.executor), slicesOf(unit.blocks), ...(unit.blocks.map((block) => block.ref) as unknown as Block[])) as ObjectRef<WriteResult>;
    get(ref).then(
      (result) => {
        ref[Symbol.dispose]();
        if (this.executor.failed) return this.dropUnit(unit);
        if (result.error) return this.onStageError(unit, result.error);
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

/** Runs one job: a chain of physical operators, feeding a consumer or a sink. */
export class StreamingExecutor {
  readonly options: Required<Omit<ExecutionOptions, 'memoryBudgetBytes' | 'progress'>> & { progress: ProgressOption };
  readonly operators: Operator[] = [];
  readonly budgetBytes: number;
  readonly defaultParallelism: number;
  /** One id per job, shared by its write tasks (for naming files). */
  readonly writeId = newObjectId().slice(0, 12);
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
  readonly #totalCpus: number;
  readonly #job: string;
  readonly #warnings: string[] = [];

  constructor(specs: PhysicalOperatorSpec[], options: ExecutionOptions, job: string) {
    checkExecutionOptions(options);
    this.options = {
      minBlockBytes: options.minBlockBytes ?? DataContext.minBlockBytes,
      maxBlockBytes: options.maxBlockBytes ?? DataContext.maxBlockBytes,
      preserveOrder: options.preserveOrder ?? DataContext.preserveOrder,
      maxErroredBlocks: options.maxErroredBlocks ?? DataContext.maxErroredBlocks,
      stallTimeoutMs: options.stallTimeoutMs ?? DataContext.stallTimeoutMs,
      progress: options.progress ?? DataContext.progress,
      maxRetries: options.maxRetries ?? DataContext.maxRetries,
    };
    const cluster = state();
    const capacity = cluster.nodes.reduce((sum, node) => sum + node.store.capacity, 0);
    this.budgetBytes = options.memoryBudgetBytes ?? DataContext.memoryBudgetBytes ?? Math.floor(capacity / 2);
    this.#totalCpus = cluster.nodes.reduce((sum, node) => sum + (node.resources.total.CPU ?? 0), 0);
    this.defaultParallelism = defaultParallelism(this.#totalCpus);
    this.#job = job;
    specs.forEach((spec, index) => this.operators.push(this.#make(spec, index)));
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
      case 'write':
        return new WriteOperator(this, spec, index);
    }
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

  warn(message: string): void {
    this.#warnings.push(message);
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
    for (const operator of this.operators) reserved += operator.reservedBytes;
    return Math.max(0, this.#storeRead.bytes) + reserved;
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
    const next = this.operators[from.index + 1];
    if (next) next.takeInput(block);
    else {
      this.#output.push(block);
      this.#outputBytes += block.meta.bytes;
      this.#wake();
    }
  }

  truncateUpstreamOf(operator: Operator): void {
    for (let index = 0; index < operator.index; index++) this.operators[index].truncate();
  }

  async start(): Promise<void> {
    this.#reporter = createProgressReporter(this.options.progress);
    this.#storeBase = state().nodes.reduce((sum, node) => sum + node.store.bytesInUse, 0);
    this.#driverViewBase = driverViewBytes;
    try {
      for (const operator of this.operators) await operator.start();
    } catch (error) {
      this.fail(error instanceof Error ? error : new Error(String(error)));
      throw this.failed;
    }
    const tick = Math.min(250, Math.max(20, this.options.stallTimeoutMs / 4));
    this.#timer = setInterval(() => this.#tick(), tick);
    this.#timer.unref();
    this.schedule();
  }

  #tick(): void {
    if (this.#finished) return;
    for (const operator of this.operators) if (operator instanceof ActorMapOperator) operator.autoscale();
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
      if (index > 0 && this.operators[index - 1].done()) operator.upstreamDone = true;
      operator.backpressure = undefined;
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
    for (let index = 1; index < this.operators.length; index++) {
      if (this.operators[index - 1].done()) this.operators[index].upstreamDone = true;
    }
    this.peakBytes = Math.max(this.peakBytes, this.usedBytes());
    if (this.operators.every((operator) => operator.done())) this.#wake();
  }

  /** Output bytes of one unit of each operator after `source`, fed `bytes` of the source's output. */
  #downstreamRoom(source: Operator, bytes: number): number {
    let room = 0;
    for (let index = source.index + 1; index < this.operators.length; index++) {
      const operator = this.operators[index];
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

  /** What the sink's write() calls returned, in task order. */
  writeResults(): unknown[] {
    const results = this.operators.flatMap((operator) => operator.writeResults);
    return results.sort((a, b) => a.seq - b.seq).map((entry) => entry.result);
  }

  /** Stops the job and lets go of everything it holds. */
  async close(): Promise<void> {
    if (this.#finished) return;
    this.#finished = true;
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
    };
  }

  stats(): JobStats {
    return {
      rowsOut: this.rowsOut,
      blocksOut: this.blocksOut,
      erroredBlocks: this.erroredBlocks,
      peakBudgetBytes: this.peakBytes,
      wallMs: Date.now() - this.#started,
      operators: this.operators.map((operator) => operator.progress()),
    };
  }
}

