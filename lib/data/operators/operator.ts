/**
 * What every physical operator shares: its input queue and how it is cut into units (exact
 * batches, bundles of small blocks), the accounting of the memory its work holds, ordered release
 * of its outputs downstream, retries after a crash and its progress.
 */
import { get } from '../../core/api.js';
import { ObjectRef } from '../../core/object-ref.js';
import { DataError, WorkerCrashedError } from '../../errors.js';
import { Deque } from '../../core/deque.js';
import type { Block } from '../block.js';
import type { ReadTask } from '../datasource.js';
import type { InputBlock, PhysicalOperatorSpec, ComputeOptions } from '../plan.js';
import type { OperatorProgress } from '../progress-types.js';
import type { StageSpec } from '../stages.js';
import type { FusedWrite, StageErrorInfo, TaskTargets } from '../worker-tasks.js';
import { shipInstance, type ShippedInstance } from '../udf.js';
import type { StreamingExecutor } from '../executor.js';

export interface Unit {
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
  /** When its current attempt was launched (performance.now()). */
  startedAt?: number;
}

export const noBlocks: InputBlock[] = [];

/** The most batches one call of a batch stage carries (see Operator.unitRows). */
export const MAX_BATCHES_PER_UNIT = 16;
/** The most small blocks one task or call of a stage without batches carries (see Operator.#nextBundle). */
export const MAX_BLOCKS_PER_UNIT = 16;

export function unitRows(blocks: readonly InputBlock[]): number {
  return blocks.reduce((sum, block) => sum + block.meta.rows, 0);
}
export function unitBytes(blocks: readonly InputBlock[]): number {
  return blocks.reduce((sum, block) => sum + block.meta.bytes, 0);
}

export function splitInputBlock(block: InputBlock, rows: number): [InputBlock, InputBlock] {
  const offset = block.slice?.[0] ?? 0;
  const headBytes = Math.ceil((block.meta.bytes * rows) / Math.max(1, block.meta.rows));
  const head: InputBlock = { ref: block.ref, meta: { rows, bytes: headBytes }, slice: [offset, rows], continued: true };
  const restRows = block.meta.rows - rows;
  const rest: InputBlock = {
    ref: new ObjectRef<Block>(block.ref.id),
    meta: { rows: restRows, bytes: Math.max(0, block.meta.bytes - headBytes) },
    slice: [offset + rows, restRows],
  };
  return [head, rest];
}

/**
 * Blocks cut into consecutive runs of `sizes` rows, without copies: each piece is a new handle on
 * its stored block with its own slice, so the caller may let go of the originals.
 */
export function cutInputBlocks(blocks: readonly InputBlock[], sizes: readonly number[]): InputBlock[][] {
  let blockIndex = 0;
  let offsetInBlock = 0;
  return sizes.map((size) => {
    const pieces: InputBlock[] = [];
    let need = size;
    while (need > 0 && blockIndex < blocks.length) {
      const block = blocks[blockIndex];
      const take = Math.min(need, block.meta.rows - offsetInBlock);
      if (take > 0) {
        const whole = offsetInBlock === 0 && take === block.meta.rows;
        pieces.push({
          ref: new ObjectRef<Block>(block.ref.id),
          meta: { rows: take, bytes: whole ? block.meta.bytes : Math.ceil((block.meta.bytes * take) / Math.max(1, block.meta.rows)) },
          ...(whole && !block.slice ? {} : { slice: [(block.slice?.[0] ?? 0) + offsetInBlock, take] as [number, number] }),
        });
      }
      need -= take;
      offsetInBlock += take;
      if (offsetInBlock >= block.meta.rows) {
        blockIndex++;
        offsetInBlock = 0;
      }
    }
    return pieces;
  });
}

export function dispose(blocks: readonly InputBlock[]): void {
  for (const block of blocks) block.ref[Symbol.dispose]();
}

/** What one task or actor of this shape asks of a node. */
export function resourcesOf(compute: ComputeOptions): Record<string, number> {
  return { ...(compute.resources ?? {}), CPU: compute.numCpus ?? 1, GPU: compute.numGpus ?? 0, memory: compute.memory ?? 0 };
}

/**
 * The bundle a shared cluster lends for one task or actor of this shape (an elastic ask): its
 * resources above zero, a fraction of a GPU asked as a whole device (a lent GPU is one).
 */
export function askedBundle(compute: ComputeOptions): Record<string, number> {
  return Object.fromEntries(
    Object.entries(resourcesOf(compute)).filter(([, amount]) => amount > 0).map(([name, amount]) => [name, name === 'GPU' ? Math.ceil(amount) : amount]),
  );
}

export function taskOptionsOf(compute: ComputeOptions, name: string, maxRetries: number) {
  return {
    numCpus: compute.numCpus ?? 1,
    numGpus: compute.numGpus,
    memory: compute.memory,
    resources: compute.resources,
    maxRetries,
    name,
    ...(compute.runtimeEnv ? { runtimeEnv: compute.runtimeEnv } : {}),
  };
}


export function taskTargets(executor: StreamingExecutor): TaskTargets {
  return {
    minBlockBytes: executor.options.minBlockBytes,
    maxBlockBytes: executor.options.maxBlockBytes,
    collectAfterBytes: Math.max(1 << 20, executor.budgetBytes / 8),
  };
}

/** One running operator: its input queue, its work in flight, and its ordered outputs. */
export abstract class Operator {
  readonly inputs = new Deque<InputBlock>();
  /** The operators whose outputs are this one's input (a union has several; a source none). */
  upstreams: Operator[] = [];
  /** Where this operator's outputs go; none for the job's last. */
  downstream?: Operator;
  /** A union's later input starts once the one before it is done (in order). */
  startAfter?: Operator;
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
  /** Units finished (tasks, actor calls) and the time each took from launch to result. */
  readonly #taskTime = { tasks: 0, totalMs: 0, maxMs: 0 };
  #firstStart?: number;
  #lastEnd?: number;
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

  /**
   * A task that failed with a code of retriedErrorCodes (an outage, not bad data) runs again while
   * it has retries left; what it made before failing is dropped by the caller, so nothing doubles.
   */
  protected retriedAfterOutage(unit: Unit, info: StageErrorInfo, what: string, again: () => void): boolean {
    if (info.code === undefined || !this.executor.options.retriedErrorCodes.includes(info.code) || unit.attempts >= this.executor.options.maxRetries) return false;
    unit.attempts++;
    this.executor.warn(`${this.name}: ${what} failed with ${info.code} (${info.message}); retrying (attempt ${unit.attempts + 1})`);
    again();
    return true;
  }

  protected get hasFusedSink(): boolean {
    return this.#fusedSink !== undefined;
  }

  /** What a task needs to write its output through a fused sink, or null. */
  protected fusedWrite(unit: Unit): FusedWrite | null {
    if (!this.#fusedSink) return null;
    return { sink: this.#fusedSink, context: this.executor.writeContext(unit), checkpoint: this.executor.checkpoint ?? null };
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
    return (this.spec.kind === 'task-map' || this.spec.kind === 'actor-map') && this.spec.bundleRows === undefined;
  }

  /** A failing unit is skipped whole under maxErroredBlocks: one batch or block each keeps that exact. */
  get #oneUnitEach(): boolean {
    return this.executor.options.maxErroredBlocks > 0;
  }

  /**
   * The next bundle of whole blocks: small blocks go several to a task, as a batch stage's
   * batches do (see unitRows), up to MAX_BLOCKS_PER_UNIT blocks of together at most the minimum
   * block size, and no more than an even share of the queue over the units that run at once.
   * Each block still reaches the stage whole and alone.
   */
  #nextBundle(): { count: number; bytes: number } {
    const share = Math.floor(this.inputs.length / Math.max(1, this.concurrentUnits()));
    const limit = this.#oneUnitEach ? 1 : Math.max(1, Math.min(MAX_BLOCKS_PER_UNIT, share));
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
    return this.#unitOf(blocks);
  }

  /** A unit of blocks just taken off the input queue: the queue's counts drop by them. */
  #unitOf(blocks: InputBlock[]): Unit {
    const rows = unitRows(blocks);
    const bytes = unitBytes(blocks);
    this.inputRows -= rows;
    this.inputBytes -= bytes;
    const unit: Unit = { seq: this.#nextSeq++, blocks, rows, bytes, attempts: 0, rowStart: this.#inputRowCursor };
    this.#inputRowCursor += rows;
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
    if (this.#oneUnitEach) return batch;
    let batches = Math.min(MAX_BATCHES_PER_UNIT, Math.floor(this.inputRows / Math.max(1, this.concurrentUnits()) / batch));
    if (this.inputRows > 0 && this.inputBytes > 0) {
      batches = Math.min(batches, Math.floor(this.executor.options.maxBlockBytes / ((this.inputBytes / this.inputRows) * batch)));
    }
    return Math.max(1, batches) * batch;
  }

  /** A block from upstream (`from`: which upstream, for operators with several). */
  takeInput(block: InputBlock, _from?: Operator): void {
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
    }
    return this.#unitOf(blocks);
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
    const now = performance.now();
    unit.startedAt = now;
    this.#firstStart ??= now;
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
    if (unit.startedAt !== undefined) {
      const now = performance.now();
      const took = now - unit.startedAt;
      this.#taskTime.tasks++;
      this.#taskTime.totalMs += took;
      this.#taskTime.maxMs = Math.max(this.#taskTime.maxMs, took);
      this.#lastEnd = now;
    }
    this.unlaunched(unit);
    if (inputsConsumed) dispose(unit.blocks);
    this.executor.noteFreed(inputsConsumed ? unit.bytes : 0);
    this.blocksDone += this.blocksDoneBy(unit);
    this.lastCompletion = Date.now();
    const bytes = unitBytes(outputs);
    this.#outputBytesSeen += bytes;
    this.#inputBytesSeen += unit.bytes;
    this.#unitsSeen++;
    this.#release(unit.seq, outputs);
    this.executor.touch();
    this.executor.schedule();
  }

  /** Input blocks a finished unit counts as done, for progress. */
  protected blocksDoneBy(unit: Unit): number {
    // A read task counts as its one block; a block cut over several units counts with its last part.
    return unit.blocks.length === 0 ? 1 : unit.blocks.filter((block) => !block.continued).length;
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
    if (!this.ordersOutput) {
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

  /** The phase an operator that runs in phases is in, for progress. */
  get phase(): string | undefined {
    return undefined;
  }

  /** Whether outputs leave in the order of their units (preserveOrder; a sort always does). */
  protected get ordersOutput(): boolean {
    return this.executor.options.preserveOrder;
  }

  /**
   * Bytes an all-to-all operator holds until it has seen its whole input: outside the budget,
   * since holding them back would wait forever (the store spills them to disk when it is full).
   */
  stagedBytes(): number {
    return 0;
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

  /** Every queued input block, taken off the queue. */
  protected takeAllInputs(): InputBlock[] {
    const blocks: InputBlock[] = [];
    while (this.inputs.length) blocks.push(this.inputs.shift()!);
    this.inputBytes = 0;
    this.inputRows = 0;
    return blocks;
  }

  /**
   * A failure reported by an exchange or aggregate task: a user function's (mapGroups) is
   * located like a stage's; a key or type the data does not allow keeps its own code.
   */
  protected failTask(unit: Unit, info: StageErrorInfo, userStage?: string): void {
    if (userStage !== undefined && info.stage === userStage) return this.onStageError(unit, info);
    this.dropUnit(unit);
    const cause = Object.assign(new Error(info.message), { name: info.name, code: info.code, stack: info.stack });
    const code = info.code === 'ERR_DATA_COLUMN' || info.code === 'ERR_DATA_TYPE' || info.code === 'ERR_DATA_SCHEMA' ? info.code : 'ERR_DATA_TASK_FAILED';
    this.executor.fail(new DataError(code, `operator ${this.name} failed: ${info.message}`, { operator: this.name, cause }));
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
      ...(this.phase ? { phase: this.phase } : {}),
      ...(this.#taskTime.tasks > 0
        ? {
            taskTime: {
              tasks: this.#taskTime.tasks,
              totalMs: this.#taskTime.totalMs,
              meanMs: this.#taskTime.totalMs / this.#taskTime.tasks,
              maxMs: this.#taskTime.maxMs,
              spanMs: this.#lastEnd! - this.#firstStart!,
            },
          }
        : {}),
      done: this.done(),
    };
  }

  /** Called every tick: grows or shrinks what the operator holds (actor pools, room asked for). */
  autoscale(): void {}

  /** Stops what the operator runs; `force`: kills workers of tasks still running. */
  async shutdown(_force = false): Promise<void> {}

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
    // A checkpoint's own refusal (rows without ids, ids of another kind) keeps its code.
    return new DataError(isCheckpointError(info) ? info.code! : 'ERR_DATA_UDF_FAILED', `operator ${this.name} failed at ${info.stage} on ${where}${rowText}: ${info.name}: ${info.message}`, {
      operator: this.name,
      block: unit.seq,
      rows,
      cause,
    });
  }

  /** A stage threw: the job fails, or the block is counted and skipped within maxErroredBlocks. */
  protected onStageError(unit: Unit, info: StageErrorInfo): void {
    const error = this.stageError(unit, info);
    // A checkpoint that cannot record a block is the job's setup, not a bad block: never skipped.
    if (!isCheckpointError(info) && this.executor.countErroredBlock(error)) return this.skipped(unit);
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

function isCheckpointError(info: StageErrorInfo): boolean {
  return typeof info.code === 'string' && info.code.startsWith('ERR_DATA_CHECKPOINT');
}
