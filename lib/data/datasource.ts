/**
 * The contracts a user implements to read from and write to their own systems.
 *
 * A Datasource plans reads in the driver: getReadTasks(parallelism) returns ReadTasks, each naming
 * a registered read function and its arguments, so that workers can run it. A Datasink's write()
 * runs in write tasks on workers (the sink travels by its fields; its class is registered); its
 * onWriteStart, onWriteComplete and onWriteFailed run in the driver.
 */
import { InvalidArgumentError } from '../errors.js';
import type { Block, BlockMetadata, Row } from './block.js';
import type { Clauses } from './row-filter.js';
import { loadUdf, resolveUdf, type UdfSpec, type UdfTarget } from './udf.js';

/** What a read function may produce: blocks or rows, at once or as a (possibly async) stream. */
export type ReadOutput = Block | Row | Row[];
export type ReadResult = Iterable<ReadOutput> | AsyncIterable<ReadOutput> | Block | Row[] | Promise<Block | Row[]>;

export interface ReadTaskMetadata extends Partial<BlockMetadata> {
  /**
   * A name for the data this task reads, the same in every run (the shard, the file, the key
   * range): with readDatasource's `rowIds`, its rows' ids are `<key>:<row in the task>`.
   */
  key?: string;
}

/** One unit of reading: a registered function called with `args` in a worker. */
export class ReadTask {
  readonly spec: UdfSpec;
  readonly args: unknown[];
  readonly metadata: ReadTaskMetadata;

  constructor(read: UdfTarget, args: unknown[] = [], metadata: ReadTaskMetadata = {}) {
    this.spec = resolveUdf(read, 'ReadTask');
    if (this.spec.kind !== 'function') throw new InvalidArgumentError('ReadTask takes a read function, not a class', 'ERR_DATA_UDF');
    if (!Array.isArray(args)) throw new InvalidArgumentError('ReadTask args must be an array', 'ERR_INVALID_ARGUMENT');
    this.args = args;
    this.metadata = metadata;
  }

  /** Runs the read here (the executor runs it in a worker). */
  async *read(): AsyncGenerator<ReadOutput> {
    const fn = (await loadUdf(this.spec.descriptor)) as (...args: unknown[]) => ReadResult;
    yield* iterateReadResult(await fn(...this.args));
  }
}

export async function* iterateReadResult(result: Awaited<ReadResult>): AsyncGenerator<ReadOutput> {
  if (result === null || result === undefined) return;
  if (Array.isArray(result)) {
    yield result;
    return;
  }
  if (typeof (result as AsyncIterable<ReadOutput>)[Symbol.asyncIterator] === 'function' || typeof (result as Iterable<ReadOutput>)[Symbol.iterator] === 'function') {
    // An Arrow table is iterable (by rows): take it whole.
    if ((result as Block).schema !== undefined && typeof (result as Block).numRows === 'number') {
      yield result as Block;
      return;
    }
    yield* result as AsyncIterable<ReadOutput>;
    return;
  }
  yield result as Block;
}

export abstract class Datasource {
  /** Shown in plans and progress. */
  get name(): string {
    return this.constructor.name.replace(/Datasource$/, '') || 'Datasource';
  }
  /** At most `parallelism` read tasks (fewer when the data is smaller). */
  abstract getReadTasks(parallelism: number): ReadTask[] | Promise<ReadTask[]>;
  /** Bytes the data occupies in memory, where known: sizes the default parallelism. */
  estimateInMemorySize?(): number | undefined;
  /**
   * A copy of this source that keeps only the rows `filter` keeps, for a source that can skip
   * what cannot match (files, row groups) instead of reading it: `Dataset.filter([...])` right
   * after the read hands its filter here. Undefined (or no method): the filter runs as a stage.
   */
  withFilter?(filter: Clauses): Datasource | undefined;
  /**
   * A copy of this source that may read only these columns (the rest may be left out; the
   * columns are still selected after the read), for a source that can skip reading the others:
   * `Dataset.selectColumns(...)` right after the read hands them here. Undefined: no narrowing.
   */
  withColumns?(columns: string[]): Datasource | undefined;
}

export interface WriteContext {
  /** Which write task this is, from 0. */
  taskIndex: number;
  /** Which attempt of that task, from 0 (a retried write after a worker died is attempt 1). */
  attempt: number;
  /** One id per write job, shared by its tasks: useful for naming files. */
  writeId: string;
  /**
   * A checkpoint records this write and the sink has commit(): write() stages its output (a
   * temp file, an uncommitted transaction) and commit() publishes it once the rows are recorded.
   */
  staged?: boolean;
}

export abstract class Datasink<Result = unknown> {
  get name(): string {
    return this.constructor.name.replace(/Datasink$/, '') || 'Datasink';
  }
  /** Driver, before any write task. */
  onWriteStart(): void | Promise<void> {}
  /** Worker: writes its blocks and returns what onWriteComplete receives. */
  abstract write(blocks: Block[], context: WriteContext): Result | Promise<Result>;
  /** Driver, once every write task succeeded, with their results in task order. */
  onWriteComplete(_results: Result[]): void | Promise<void> {}
  /** Driver, once when the job fails, with the error that failed it. */
  onWriteFailed(_error: Error): void | Promise<void> {}
  /**
   * Worker, for a write a checkpoint records (`context.staged`): publishes what write() staged,
   * once the checkpoint holds the rows' ids; returns what onWriteComplete receives. With
   * recover(), it makes a checkpointed write exactly-once: the record is the commit point.
   */
  commit?(staged: Result, context: WriteContext): Result | Promise<Result>;
  /**
   * Driver, resuming a checkpointed job: finishes publishing a write an earlier run recorded (it
   * may have stopped between the record and commit()); returns its final result, or null when its
   * output is gone, so that its rows are written again.
   */
  recover?(staged: Result): Result | null | Promise<Result | null>;
  /**
   * Rows per write: blocks are gathered (and cut) so that each write() gets exactly this many, the
   * last fewer, in write tasks of their own. Default undefined: each task's output is written as
   * it is made, in the task that made it.
   */
  get minRowsPerWrite(): number | undefined {
    return undefined;
  }
}
