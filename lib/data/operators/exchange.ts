/**
 * sort, randomShuffle and groupBy().mapGroups(): all-to-all exchanges. No output row is known
 * before the last input row has arrived, so the operator holds its whole input (staged, outside
 * the budget: the store spills it to disk when it must), then runs its phases: a sort samples
 * the keys to choose its ranges; map tasks cut each group of blocks into one part per output
 * partition; once every map task is done, one reduce task per partition joins its parts and
 * sorts, shuffles or maps its groups. Reduce outputs stream downstream within the budget.
 */
import { get } from '../../core/api.js';
import { DataError } from '../../errors.js';
import { ObjectRef } from '../../core/object-ref.js';
import type { Block } from '../block.js';
import { rangeBoundaries, taskSeed, type ExchangeSpec } from '../exchange.js';
import type { SortKey } from '../keys.js';
import { exchangeJoinTask, exchangeMapTask, exchangeReduceTask, exchangeSampleTask, type PartsResult, type SampleResult } from '../exchange-tasks.js';
import { slicesOf, type InputBlock, type PhysicalOperatorSpec } from '../plan.js';
import type { TaskResult } from '../worker-tasks.js';
import { Operator, dispose, taskTargets, unitBytes, unitRows, type Unit } from './operator.js';

type Phase = 'collect' | 'sample' | 'map' | 'reduce';

export class ExchangeOperator extends Operator {
  declare readonly spec: Extract<PhysicalOperatorSpec, { kind: 'exchange' }>;
  #phase: Phase = 'collect';
  /** Staged input, per side (a join has two: its left and right inputs). */
  #staged: InputBlock[][] = [[]];
  #stagedBytes = 0;
  #stagedBlocks = 0;
  /** Groups of staged blocks of one side, one map task (and sample task) each; cleared as they run. */
  #groups: InputBlock[][] = [];
  #groupSides: number[] = [];
  /** A join's sides' schemas (empty Arrow IPC streams), from their map tasks. */
  #schemas: [Uint8Array | null, Uint8Array | null] = [null, null];
  #nextGroup = 0;
  #pendingTasks = 0;
  #samples: unknown[][] = [];
  #boundaries: unknown[][] = [];
  #partitions = 1;
  /** Parts per map task, in the order of the groups. */
  #parts: Array<Array<InputBlock | null>> = [];
  #partsBytes = 0;
  #nextPartition = 0;
  #seed = 0;

  override async start(): Promise<void> {
    const exchange = this.spec.exchange;
    // Unseeded, a new order each run; either way a retried task cuts its blocks the same way.
    this.#seed = exchange.kind === 'shuffle' && exchange.seed !== undefined ? exchange.seed : (Math.random() * 2 ** 32) >>> 0;
  }

  override get phase(): string | undefined {
    if (this.#phase === 'collect') return 'collecting all input';
    if (this.#phase === 'sample') return 'sampling keys';
    if (this.#phase === 'map') return `cutting blocks into ${this.#partitions} partitions`;
    return `reducing ${this.#partitions} partitions`;
  }

  /** A sort's keys. */
  get #sortKeys(): SortKey[] {
    return this.spec.exchange.kind === 'sort' ? this.spec.exchange.keys : [];
  }

  override takeInput(block: InputBlock, from?: Operator): void {
    if (this.truncated) return dispose([block]);
    const side = from ? Math.max(0, this.upstreams.indexOf(from)) : 0;
    (this.#staged[side] ??= []).push(block);
    this.#stagedBytes += block.meta.bytes;
  }

  override get queuedUnits(): number {
    return this.#phase === 'collect' ? this.#staged.reduce((sum, side) => sum + side.length, 0) : this.#groups.length - this.#nextGroup + Math.max(0, this.#partitions - this.#nextPartition);
  }

  override stagedBytes(): number {
    return this.#stagedBytes + this.#partsBytes;
  }

  /** A sort's output is its order. */
  protected override get ordersOutput(): boolean {
    return this.spec.exchange.kind === 'sort' || super.ordersOutput;
  }

  /** A reduce task is one output partition of blocksTotal, whatever parts it joined. */
  protected override blocksDoneBy(): number {
    return 1;
  }

  capacity(): number {
    return this.executor.taskSlots({ numCpus: 1 });
  }

  override done(): boolean {
    return super.done() && this.#pendingTasks === 0 && (this.truncated || (this.#phase === 'reduce' && this.#nextPartition >= this.#partitions));
  }

  hasWork(): boolean {
    if (this.truncated || this.executor.failed) return false;
    if (this.#phase === 'collect') {
      if (!this.upstreamDone) return false;
      this.#plan();
    }
    if (this.#phase === 'sample' || this.#phase === 'map') {
      if (this.#nextGroup < this.#groups.length) return true;
      if (this.#pendingTasks > 0) return false;
      if (this.#phase === 'sample') {
        this.#boundaries = rangeBoundaries(this.#samples, this.#sortKeys, this.#partitions);
        this.#samples = [];
        this.#phase = 'map';
        this.#nextGroup = 0;
        return this.#groups.length > 0;
      }
      this.#phase = 'reduce';
      this.#skipEmptyPartitions();
    }
    return this.#nextPartition < this.#partitions;
  }

  /**
   * The whole input has arrived: the partitions (by default blocks of an even share of the data
   * over four per CPU, within the block size bounds) and the groups of blocks the map side takes.
   * Every part a map task makes is an object in the store until its reduce task has run, so map
   * tasks x partitions stays within a quarter of the store's object table.
   */
  #plan(): void {
    const blocks = this.#staged.flat();
    const { minBlockBytes, maxBlockBytes } = this.executor.options;
    const maxParts = Math.max(64, Math.floor(this.executor.storeObjectLimit / 4));
    const target = Math.min(maxBlockBytes, Math.max(minBlockBytes, this.#stagedBytes / (4 * Math.max(1, this.executor.totalCpus))));
    this.#partitions = this.spec.numBlocks ?? Math.max(1, Math.min(blocks.length, maxParts, Math.ceil(this.#stagedBytes / target)));
    const groups = Math.max(1, Math.min(blocks.length, Math.floor(maxParts / this.#partitions)));
    // Consecutive blocks of one side, an even share of them to each map task.
    const perGroup = Math.ceil(blocks.length / groups);
    this.#staged.forEach((sideBlocks, side) => {
      for (let start = 0; start < sideBlocks.length; start += perGroup) {
        this.#groups.push(sideBlocks.slice(start, start + perGroup));
        this.#groupSides.push(side);
      }
    });
    // The groups own the blocks from here on.
    this.#stagedBlocks = blocks.length;
    this.#staged = [];
    this.rowsTotal = unitRows(blocks);
    this.blocksTotal = this.#partitions;
    this.#phase = this.spec.exchange.kind === 'sort' && this.#partitions > 1 ? 'sample' : 'map';
  }

  launch(): void {
    if (this.#phase === 'reduce') return this.#launchReduce();
    const index = this.#nextGroup++;
    const blocks = this.#groups[index];
    this.#pendingTasks++;
    this.active++;
    this.executor.touch();
    const targets = taskTargets(this.executor);
    const options = { numCpus: 1, maxRetries: this.executor.options.maxRetries, name: this.name };
    const refs = blocks.map((block) => block.ref) as unknown as Block[];
    const ended = () => {
      this.#pendingTasks--;
      this.active--;
      this.lastCompletion = Date.now();
      this.executor.touch();
    };
    if (this.#phase === 'sample') {
      const perBlock = Math.min(1000, Math.max(4, Math.ceil((20 * this.#partitions) / Math.max(1, this.#stagedBlocks))));
      const ref = exchangeSampleTask.options(options).remote(this.#sortKeys, perBlock, slicesOf(blocks), targets, ...refs);
      this.#await<SampleResult>(ref, (result) => {
        ended();
        if (result.error) return this.#failed(result.error);
        for (const sample of result.samples) this.#samples.push(sample);
        this.executor.schedule();
      }, ended);
      return;
    }
    const seed = taskSeed(this.#seed, index, 1);
    const side = this.#groupSides[index];
    const exchange = this.spec.exchange;
    const cut: ExchangeSpec = exchange.kind === 'join' ? { kind: 'hash', keys: side === 0 ? exchange.leftKeys : exchange.rightKeys } : exchange;
    const ref = exchangeMapTask.options(options).remote(cut, this.#partitions, this.#boundaries, seed, slicesOf(blocks), targets, ...refs);
    this.#await<PartsResult>(ref, (result) => {
      ended();
      if (result.error) return this.#failed(result.error);
      const parts = result.parts.map((part) => (part ? { ref: part.ref, meta: { rows: part.rows, bytes: part.bytes } } : null));
      if (this.truncated) return dispose(parts.filter((part): part is InputBlock => part !== null));
      this.#parts[index] = parts;
      if (result.schema) this.#schemas[side] ??= result.schema;
      this.#partsBytes += unitBytes(parts.filter((part): part is InputBlock => part !== null));
      // The staged blocks are cut into parts: they go.
      this.#stagedBytes -= unitBytes(blocks);
      dispose(blocks);
      this.#groups[index] = [];
      this.executor.noteFreed(0);
      this.executor.schedule();
    }, ended);
  }

  /** Partitions that would make no rows make no reduce task (a join's: by the sides it keeps). */
  #skipEmptyPartitions(): void {
    while (this.#nextPartition < this.#partitions && !this.#makesRows(this.#nextPartition)) this.#nextPartition++;
  }

  #makesRows(partition: number): boolean {
    const exchange = this.spec.exchange;
    if (exchange.kind !== 'join') return this.#partsOf(partition).length > 0;
    const left = this.#partsOf(partition, 0).length > 0;
    const right = this.#partsOf(partition, 1).length > 0;
    return exchange.how === 'inner' ? left && right : exchange.how === 'left' ? left : exchange.how === 'right' ? right : left || right;
  }

  /** A partition's parts, in map task order; of one side only when `side` is given. */
  #partsOf(partition: number, side?: number): InputBlock[] {
    const parts: InputBlock[] = [];
    this.#parts.forEach((taskParts, index) => {
      const part = taskParts?.[partition];
      if (part && (side === undefined || this.#groupSides[index] === side)) parts.push(part);
    });
    return parts;
  }

  override nextUnitBytes(): number {
    return this.#phase === 'reduce' && this.#nextPartition < this.#partitions ? unitBytes(this.#partsOf(this.#nextPartition)) : 0;
  }

  #launchReduce(): void {
    const partition = this.#nextPartition++;
    const exchange = this.spec.exchange;
    const leftParts = exchange.kind === 'join' ? this.#partsOf(partition, 0) : [];
    const parts = exchange.kind === 'join' ? [...leftParts, ...this.#partsOf(partition, 1)] : this.#partsOf(partition);
    for (const taskParts of this.#parts) if (taskParts) taskParts[partition] = null;
    const bytes = unitBytes(parts);
    this.#partsBytes -= bytes;
    const unit: Unit = { seq: this.newSeq(), blocks: parts, rows: unitRows(parts), bytes, attempts: 0 };
    this.began(unit);
    this.#skipEmptyPartitions();
    const options = { numCpus: 1, maxRetries: this.executor.options.maxRetries, name: this.name };
    const refs = parts.map((part) => part.ref) as unknown as Block[];
    const ref =
      exchange.kind === 'join'
        ? exchangeJoinTask.options(options).remote(exchange, this.#schemas, leftParts.length, taskTargets(this.executor), ...refs)
        : exchangeReduceTask.options(options).remote(exchange, taskSeed(this.#seed, partition, 2), taskTargets(this.executor), ...refs);
    get(ref as ObjectRef<TaskResult>).then(
      (result) => {
        ref[Symbol.dispose]();
        if (result.error) return this.failTask(unit, result.error, exchange.kind === 'mapGroups' ? exchange.stage.name : undefined);
        this.finished(unit, result.blocks.map((block) => ({ ref: block.ref, meta: { rows: block.rows, bytes: block.bytes } })));
      },
      (error: unknown) => {
        ref[Symbol.dispose]();
        this.onInfrastructureError(unit, error);
      },
    );
  }

  #await<T>(ref: ObjectRef<unknown>, done: (result: T) => void, ended: () => void): void {
    get(ref as ObjectRef<T>).then(
      (result) => {
        ref[Symbol.dispose]();
        done(result);
      },
      (error: unknown) => {
        ref[Symbol.dispose]();
        ended();
        // A sample or map task covers a group of blocks, not one: the phase names where it failed.
        const cause = error instanceof Error ? error : new Error(String(error));
        this.executor.fail(new DataError('ERR_DATA_TASK_FAILED', `operator ${this.name} failed while ${this.phase}: ${cause.message}`, { operator: this.name, cause }));
      },
    );
  }

  #failed(info: NonNullable<SampleResult['error']>): void {
    this.failTask({ seq: -1, blocks: [], rows: 0, bytes: 0, attempts: 0 }, info);
  }

  override async shutdown(): Promise<void> {
    for (const side of this.#staged) dispose(side.splice(0));
    for (const group of this.#groups) dispose(group);
    this.#groups = [];
    for (const taskParts of this.#parts) if (taskParts) dispose(taskParts.filter((part): part is InputBlock => part !== null));
    this.#parts = [];
    this.#stagedBytes = 0;
    this.#partsBytes = 0;
  }
}
