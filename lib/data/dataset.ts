/**
 * Dataset: a lazy, immutable logical plan. Transforms return new datasets; consumers (take, count,
 * iterBatches, write, ...) plan the physical operators and stream through them.
 */
import type { Schema } from 'apache-arrow';
import { get, isInitialized, put, state } from '../core/api.js';
import type { ObjectRef } from '../core/object-ref.js';
import { InvalidArgumentError, NotInitializedError } from '../errors.js';
import { Tensor } from '../gpu/tensor.js';
import { workerEnvironmentOf } from '../core/options.js';
import {
  blockToRows, concatBlocks, formatBatch, rowsToBlock, type BatchFormat, type Block, type Row, type FormattedColumns,
} from './block.js';
import { paths as filePaths } from './filesystem/file-system.js';
import { ReadTask, type Datasink, type Datasource } from './datasource.js';
import { cutInputBlocks } from './operators/operator.js';
import { StreamingExecutor, checkExecutionOptions, defaultParallelism, newWriteId, trackDriverView, type ExecutionOptions, type JobStats } from './executor.js';
import { WriteCheckpoint, type CheckpointOptions } from './checkpoint.js';
import { describeLogical, planPhysical, type ActorPoolOptions, type ColumnsOnly, type ComputeOptions, type InputBlock, type LogicalOperator, type PhysicalOperatorSpec } from './plan.js';
import type { StageKind, StageSpec } from './stages.js';
import { Max, Mean, Min, Std, Sum, Unique, checkAggregations, type AggregateFn, type AggregateOptions } from './aggregate.js';
import { addColumn, dropColumns, filterRows, randomSample, renameColumns, selectColumns } from './column-ops.js';
import { checkRowFilter, describeFilter, filterColumns, type Clauses, type RowFilter } from './row-filter.js';
import { GroupedData, checkNumBlocks } from './grouped.js';
import { checkKeyColumns } from './keys.js';
import type { JoinType } from './exchange.js';
import { resolveUdf, udfName, type UdfTarget } from './udf.js';
import { storedBytes } from './worker-tasks.js';
import { checkBatchFormat, checkBatchSize, checkLocalShuffle, copyBlock, rebatch, type Batch } from './batches.js';
import { startStreamingSplit, type DataIterator, type SplitBlock } from './streaming-split.js';
import {
  FileDatasink, arrowSink, checkWriteMode, csvSink, jsonlSink, parquetSink, webDatasetSink, type WriteMode, type ArrowWriteOptions, type CsvWriteOptions, type JsonlWriteOptions, type ParquetWriteOptions,
  type WebDatasetWriteOptions, type WrittenFile,
} from './formats/index.js';
import { ImageDatasink, type ImageWriteOptions, type WrittenImages } from './formats/images.js';

/** Options of a write (besides how it runs). */
export interface WriteOptions {
  /** Record what each write wrote, so that a run of the same job after one that stopped resumes. */
  checkpoint?: CheckpointOptions;
  /**
   * The file writers, where the directory holds a dataset already: 'append' (default) adds files
   * beside it, 'overwrite' removes its files of this format and its partition directories first,
   * 'error' refuses, 'ignore' writes nothing. A resumed checkpoint always appends.
   */
  mode?: WriteMode;
}

export interface TransformOptions extends Omit<ComputeOptions, 'concurrency'> {
  /** Extra arguments after the row or batch. */
  fnArgs?: unknown[];
  /** Function transforms: at most this many tasks at once. */
  concurrency?: number | [number, number];
  /**
   * map, flatMap and filter with an async function: rows of a block whose calls run at once in
   * each task (default 1), for work that waits rather than computes (a request per row to a
   * service, a file fetched by the row's path). Output keeps the input's order; a failing row
   * fails the block once the calls in flight have settled.
   */
  rowsInFlight?: number;
}

export interface MapBatchesOptions extends TransformOptions {
  /** Rows per batch (default 1024); null: each block whole. */
  batchSize?: number | null;
  /** What the function receives: an Arrow table, an array of rows, or a record of columns (default). */
  batchFormat?: BatchFormat;
  /** Classes: arguments of the constructor, run once per actor. */
  constructorArgs?: unknown[];
  /** Classes: the method each batch goes through (default 'call'). */
  method?: string;
  /** Classes: batches queued at each actor beyond the one running (default 4 in flight). */
  maxTasksInFlightPerActor?: number;
  /**
   * Classes: batches one actor works on at once (default 1). Above 1, the batches of an async
   * method interleave, for a class that batches across calls (a model engine); at most
   * maxTasksInFlightPerActor.
   */
  maxConcurrency?: number;
  /** Classes: how long a constructor may take (ms, default 10 min). */
  actorStartTimeoutMs?: number;
  /** Classes: an actor idle this long above the pool's minimum stops (ms, default 2 s). */
  actorIdleTimeoutMs?: number;
}

export interface SortOptions {
  /** Descending order: for every key, or one flag per key (default false). */
  descending?: boolean | boolean[];
  /** Output blocks (default: by the data's size, at most one per input block). */
  numBlocks?: number;
}

export interface ShuffleOptions {
  /** The same order on every run (default: a new order each run). */
  seed?: number;
  /** Output blocks (default: by the data's size, at most one per input block). */
  numBlocks?: number;
}

export interface JoinOptions {
  /** This side's key column(s). */
  on: string | string[];
  /** The other side's key column(s), paired with `on` (default: the same names). */
  rightOn?: string | string[];
  /** Which unmatched rows stay: 'inner' (default) none, 'left', 'right', 'outer' both. */
  how?: JoinType;
  /** Added to the other side's column names that this side has too (default '_right'). */
  rightSuffix?: string;
  /** Partitions, and so output blocks (default: by the data's size). */
  numBlocks?: number;
}

export interface AddColumnOptions {
  /** What the function receives: columns (default), rows or an Arrow table. */
  batchFormat?: BatchFormat;
  /** Extra arguments after the batch. */
  fnArgs?: unknown[];
}

export interface ReadOptions extends ComputeOptions {
  /** How many read tasks to aim for (default: twice the cluster's CPUs). */
  parallelism?: number;
  /**
   * Adds a column of this name holding each row's id, for data without ids of its own (a
   * checkpoint's idColumn): the file readers make `<file key>:<position in the file>`; a custom
   * Datasource's rows get `<its ReadTask's metadata.key>:<row in the task>`, so each task needs a key.
   */
  rowIds?: string;
}

export interface IterBatchesOptions extends ExecutionOptions {
  /** Rows per batch (default 256); null: each block whole. */
  batchSize?: number | null;
  batchFormat?: BatchFormat;
  /**
   * Draw each batch at random from a buffer of at least this many rows (Ray's
   * local_shuffle_buffer_size): batches mix rows of several blocks, as training wants, without a
   * shuffle of the whole dataset. Memory: the buffer's rows.
   */
  localShuffleBufferSize?: number;
  /** Seeds the local shuffle's draw, for the same batches every run. */
  localShuffleSeed?: number;
}

function checkPositiveInteger(value: unknown, what: string, allowZero = false): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < (allowZero ? 0 : 1)) {
    throw new InvalidArgumentError(`${what} must be a ${allowZero ? 'non-negative' : 'positive'} integer, got ${String(value)}`);
  }
  return value;
}

function checkCompute(options: Omit<ComputeOptions, 'concurrency'>, what: string): ComputeOptions {
  for (const key of ['numCpus', 'numGpus', 'memory'] as const) {
    const value = options[key];
    if (value !== undefined && (typeof value !== 'number' || !(value >= 0) || !Number.isFinite(value))) {
      throw new InvalidArgumentError(`${what}: ${key} must be a non-negative number, got ${String(value)}`);
    }
  }
  const runtimeEnv = options.runtimeEnv;
  if (runtimeEnv !== undefined) workerEnvironmentOf(runtimeEnv, `${what}: runtimeEnv`);
  return { numCpus: options.numCpus, numGpus: options.numGpus, memory: options.memory, resources: options.resources, ...(runtimeEnv !== undefined ? { runtimeEnv } : {}) };
}

function requireCluster(what: string): void {
  if (!isInitialized()) throw new NotInitializedError(`${what} runs on the cluster: call init() first`);
}

export class Dataset {
  readonly #plan: readonly LogicalOperator[];
  #lastStats?: JobStats;

  /** @internal Datasets are made by the sources (range, fromItems, readDatasource, ...). */
  constructor(plan: readonly LogicalOperator[]) {
    this.#plan = plan;
  }

  #with(operator: LogicalOperator): Dataset {
    return new Dataset([...this.#plan, operator]);
  }

  #stage(kind: StageKind, label: string, target: UdfTarget, options: MapBatchesOptions, isClassAllowed: boolean): Dataset {
    const method = options.method ?? 'call';
    const udf = resolveUdf(target, `${label}()`, method);
    if (udf.kind === 'class' && !isClassAllowed) {
      throw new InvalidArgumentError(`${label}() takes a function; classes run through mapBatches() on an actor pool`, 'ERR_DATA_UDF');
    }
    const fnArgs = options.fnArgs ?? [];
    if (!Array.isArray(fnArgs)) throw new InvalidArgumentError(`${label}(): fnArgs must be an array`);
    const compute = checkCompute(options, `${label}()`);
    const stage: StageSpec = { kind, name: `${label[0].toUpperCase()}${label.slice(1)}(${udfName(udf).replace(/\.call$/, '')})`, udf, fnArgs };
    let pool: ActorPoolOptions | undefined;
    if (options.rowsInFlight !== undefined) {
      if (kind === 'mapBatches') throw new InvalidArgumentError(`${label}(): rowsInFlight is for map, flatMap and filter (a batch method may run its rows concurrently itself)`);
      const rowsInFlight = checkPositiveInteger(options.rowsInFlight, `${label}(): rowsInFlight`);
      if (rowsInFlight > 10_000) throw new InvalidArgumentError(`${label}(): rowsInFlight must be at most 10000, got ${rowsInFlight}`);
      if (rowsInFlight > 1) stage.rowsInFlight = rowsInFlight;
    }
    if (kind === 'mapBatches') {
      const batchSize = options.batchSize === undefined ? 1024 : options.batchSize;
      if (batchSize !== null) stage.batchSize = checkPositiveInteger(batchSize, `${label}(): batchSize`);
      stage.batchFormat = checkBatchFormat(options.batchFormat ?? 'columns', `${label}()`);
    }
    const concurrency = options.concurrency;
    let bounds: [number, number] | undefined;
    if (concurrency !== undefined) {
      bounds = typeof concurrency === 'number' ? [concurrency, concurrency] : concurrency;
      if (!Array.isArray(bounds) || bounds.length !== 2) throw new InvalidArgumentError(`${label}(): concurrency must be n or [min, max]`);
      checkPositiveInteger(bounds[0], `${label}(): concurrency min`);
      if (bounds[1] !== Infinity) checkPositiveInteger(bounds[1], `${label}(): concurrency max`);
      if (bounds[1] < bounds[0]) throw new InvalidArgumentError(`${label}(): concurrency max (${bounds[1]}) is below its min (${bounds[0]})`);
    }
    if (udf.kind === 'class') {
      const constructorArgs = options.constructorArgs ?? [];
      if (!Array.isArray(constructorArgs)) throw new InvalidArgumentError(`${label}(): constructorArgs must be an array`);
      stage.constructorArgs = constructorArgs;
      pool = {
        min: bounds?.[0] ?? 1,
        max: bounds?.[1] ?? Infinity,
        maxTasksInFlightPerActor: checkPositiveInteger(options.maxTasksInFlightPerActor ?? Math.max(4, options.maxConcurrency ?? 1), `${label}(): maxTasksInFlightPerActor`),
        maxConcurrency: checkPositiveInteger(options.maxConcurrency ?? 1, `${label}(): maxConcurrency`),
        startTimeoutMs: options.actorStartTimeoutMs ?? 10 * 60_000,
        idleTimeoutMs: options.actorIdleTimeoutMs ?? 2_000,
      };
    } else if (options.maxConcurrency !== undefined) {
      throw new InvalidArgumentError(`${label}(): maxConcurrency is for classes; ${udf.descriptor.name} is a function (use concurrency)`);
    } else if (options.constructorArgs !== undefined) {
      throw new InvalidArgumentError(`${label}(): constructorArgs is for classes; ${udf.descriptor.name} is a function`);
    } else if (bounds) {
      compute.concurrency = bounds[1];
    }
    return this.#with({ op: 'stage', stage, compute, pool });
  }

  /** Each row through `fn`, which returns the new row. */
  map(fn: UdfTarget, options: TransformOptions = {}): Dataset {
    return this.#stage('map', 'map', fn, options, false);
  }

  /** Each row through `fn`, which returns zero or more rows. */
  flatMap(fn: UdfTarget, options: TransformOptions = {}): Dataset {
    return this.#stage('flatMap', 'flatMap', fn, options, false);
  }

  /**
   * The rows for which `fn` returns true; or the rows a row filter keeps
   * (`filter([['lang', '=', 'en'], ['score', '>=', 0.5]])`, see RowFilter): run on whole blocks
   * with nothing to register, and, after a read whose source can (Parquet), pushed into the read,
   * which then skips the files and row groups that cannot match; also past stages between them
   * that only select, drop or rename columns.
   */
  filter(fn: UdfTarget | RowFilter, options: TransformOptions = {}): Dataset {
    if (!Array.isArray(fn)) return this.#stage('filter', 'filter', fn as UdfTarget, options, false);
    const clauses = checkRowFilter(fn, 'filter()');
    if (Object.keys(options).length > 0) throw new InvalidArgumentError('filter(): a row filter takes no options (they are for a function)', 'ERR_DATA_FILTER');
    // Into a read whose source can filter (Parquet), also past stages that only select, drop or
    // rename columns, under the names the read gives them. Source-level row ids number the rows
    // read: filtering in the source would renumber them.
    const [read, ...after] = this.#plan;
    if (read.op === 'read' && !read.rowIds) {
      const atRead = filterBeforeColumnStages(clauses, after);
      const pushed = atRead && read.datasource.withFilter?.(atRead);
      if (pushed) return new Dataset([{ ...read, datasource: pushed }, ...after]);
    }
    return this.#builtin(`FilterRows(${describeFilter(clauses)})`, filterRows, [clauses]);
  }

  /**
   * Batches through a function (tasks) or a class (an actor pool: the constructor runs once per
   * actor, e.g. to load a model, then `method` runs per batch).
   */
  mapBatches(fnOrClass: UdfTarget, options: MapBatchesOptions = {}): Dataset {
    return this.#stage('mapBatches', 'mapBatches', fnOrClass, options, true);
  }

  /** Exactly `numBlocks` blocks of (nearly) equal rows. Waits for all of its input. */
  repartition(numBlocks: number): Dataset {
    return this.#with({ op: 'repartition', numBlocks: checkPositiveInteger(numBlocks, 'repartition(numBlocks)') });
  }

  /** The first `rows` rows; upstream work stops once they are made. */
  limit(rows: number): Dataset {
    return this.#with({ op: 'limit', rows: checkPositiveInteger(rows, 'limit(rows)', true) });
  }

  /**
   * Rows sorted by one or more columns (nulls last). The whole input is held (spilling to disk
   * when the store is full), key ranges are chosen from a sample, and each range is sorted by
   * its own task; the output blocks come in order.
   */
  sort(key: string | string[], options: SortOptions = {}): Dataset {
    const columns = checkKeyColumns(key, 'sort()');
    const descending = options.descending ?? false;
    const directions = Array.isArray(descending) ? descending : columns.map(() => descending);
    if (directions.length !== columns.length || !directions.every((value) => typeof value === 'boolean')) {
      throw new InvalidArgumentError(`sort(): descending must be true, false or one boolean per key (${columns.length}), got ${JSON.stringify(descending)}`);
    }
    checkNumBlocks(options.numBlocks, 'sort()');
    const keys = columns.map((column, index) => ({ column, descending: directions[index] }));
    const name = `Sort(${keys.map((sortKey) => `${sortKey.column}${sortKey.descending ? ' desc' : ''}`).join(', ')})`;
    return this.#with({ op: 'exchange', name, exchange: { kind: 'sort', keys }, numBlocks: options.numBlocks });
  }

  /** Rows in a random order (every row may land anywhere); with a seed, the same order every run. */
  randomShuffle(options: ShuffleOptions = {}): Dataset {
    if (options.seed !== undefined && (!Number.isInteger(options.seed) || options.seed < 0 || options.seed >= 2 ** 32)) {
      throw new InvalidArgumentError(`randomShuffle(): seed must be an integer in [0, 2^32), got ${String(options.seed)}`);
    }
    checkNumBlocks(options.numBlocks, 'randomShuffle()');
    return this.#with({ op: 'exchange', name: 'RandomShuffle', exchange: { kind: 'shuffle', seed: options.seed }, numBlocks: options.numBlocks });
  }

  /** Groups by one or more columns, for aggregate(), count(), sum(), ... or mapGroups(). */
  groupBy(key: string | string[]): GroupedData {
    return new GroupedData(this, checkKeyColumns(key, 'groupBy()'), (operator) => this.#with(operator));
  }

  /**
   * This dataset's rows, then each other's (Ray's union). Each input keeps its own plan and fusion;
   * in order (preserveOrder, the default) the inputs run one after another, otherwise at once.
   */
  union(...others: Dataset[]): Dataset {
    if (others.length === 0) throw new InvalidArgumentError('union() takes one or more datasets');
    for (const other of others) if (!(other instanceof Dataset)) throw new InvalidArgumentError(`union() takes datasets, got ${other === null ? 'null' : typeof other}`);
    return new Dataset([{ op: 'union', inputs: [this.#plan, ...others.map((other) => other.logicalPlan)] }]);
  }

  /**
   * Rows of this dataset paired with rows of `other` whose keys are equal (a hash join: both
   * sides are exchanged by a hash of their keys, and each partition is joined by one task). `on`
   * names this side's key columns, `rightOn` the other's (default: the same names); `how` keeps
   * unmatched rows of the left, the right or both, with nulls on the other side; null keys match
   * nothing. Output: this side's columns, then the other's but its keys (a name this side has
   * takes `rightSuffix`, default '_right'), in no particular order.
   */
  join(other: Dataset, options: JoinOptions): Dataset {
    if (!(other instanceof Dataset)) throw new InvalidArgumentError(`join() takes a dataset, got ${other === null ? 'null' : typeof other}`);
    if (typeof options !== 'object' || options === null) throw new InvalidArgumentError("join() takes options with at least { on: 'key' }");
    const leftKeys = checkKeyColumns(options.on, 'join(): on');
    const rightKeys = options.rightOn === undefined ? leftKeys : checkKeyColumns(options.rightOn, 'join(): rightOn');
    if (rightKeys.length !== leftKeys.length) throw new InvalidArgumentError(`join(): on names ${leftKeys.length} column(s) and rightOn ${rightKeys.length}; they pair up one to one`, 'ERR_DATA_COLUMN');
    const how = options.how ?? 'inner';
    if (!['inner', 'left', 'right', 'outer'].includes(how)) throw new InvalidArgumentError(`join(): how must be 'inner', 'left', 'right' or 'outer', got ${JSON.stringify(how)}`);
    const rightSuffix = options.rightSuffix ?? '_right';
    if (typeof rightSuffix !== 'string' || rightSuffix.length === 0) throw new InvalidArgumentError('join(): rightSuffix must be a non-empty string');
    checkNumBlocks(options.numBlocks, 'join()');
    return new Dataset([{
      op: 'exchange',
      name: `Join(${how} on ${leftKeys.join(', ')}${options.rightOn === undefined ? '' : ` = ${rightKeys.join(', ')}`})`,
      exchange: { kind: 'join', leftKeys, rightKeys, how, rightSuffix },
      numBlocks: options.numBlocks,
      inputs: [this.#plan, other.logicalPlan],
    }]);
  }

  /**
   * This dataset's columns and `other`'s side by side, row by row (Ray's zip): both must have the
   * same number of rows; a column name already taken gets `suffix` (default '_1'). Both inputs are
   * held until both have ended; rows are aligned without copies, one task per block of this one.
   */
  zip(other: Dataset, options: { suffix?: string } = {}): Dataset {
    if (!(other instanceof Dataset)) throw new InvalidArgumentError(`zip() takes a dataset, got ${other === null ? 'null' : typeof other}`);
    const suffix = options.suffix ?? '_1';
    if (typeof suffix !== 'string' || suffix.length === 0) throw new InvalidArgumentError('zip(): suffix must be a non-empty string');
    return new Dataset([{ op: 'zip', inputs: [this.#plan, other.logicalPlan], suffix }]);
  }

  /**
   * Each row kept with probability `fraction` (about that share of the rows). With a seed, the
   * same data gives the same sample on every run, however its blocks are scheduled.
   */
  randomSample(fraction: number, options: { seed?: number } = {}): Dataset {
    if (typeof fraction !== 'number' || !(fraction >= 0 && fraction <= 1)) throw new InvalidArgumentError(`randomSample() takes a fraction in [0, 1], got ${String(fraction)}`);
    if (options.seed !== undefined && (!Number.isInteger(options.seed) || options.seed < 0 || options.seed >= 2 ** 32)) {
      throw new InvalidArgumentError(`randomSample(): seed must be an integer in [0, 2^32), got ${String(options.seed)}`);
    }
    return this.#builtin(`RandomSample(${fraction})`, randomSample, [fraction, options.seed ?? null]);
  }

  /** Only the named columns, in that order. */
  selectColumns(columns: string | string[]): Dataset {
    const list = checkKeyColumns(columns, 'selectColumns()');
    const selected = this.#builtin(`SelectColumns(${list.join(', ')})`, selectColumns, [list], { keep: list });
    // Right after a read whose source can narrow what it reads (Parquet reads only these columns
    // from disk); the stage stays, so the result and what later stages may name are the same.
    const [read] = this.#plan;
    if (this.#plan.length === 1 && read.op === 'read' && !read.rowIds) {
      const narrowed = read.datasource.withColumns?.(list);
      if (narrowed) return new Dataset([{ ...read, datasource: narrowed }, ...selected.#plan.slice(1)]);
    }
    return selected;
  }

  /** Every column but the named ones. */
  dropColumns(columns: string | string[]): Dataset {
    const list = checkKeyColumns(columns, 'dropColumns()');
    return this.#builtin(`DropColumns(${list.join(', ')})`, dropColumns, [list], { drop: list });
  }

  /** Columns renamed: `{ old: 'new' }`. */
  renameColumns(names: Record<string, string>): Dataset {
    if (typeof names !== 'object' || names === null || Array.isArray(names) || Object.keys(names).length === 0) {
      throw new InvalidArgumentError(`renameColumns() takes { oldName: 'newName' }, got ${JSON.stringify(names)}`, 'ERR_DATA_COLUMN');
    }
    for (const [from, to] of Object.entries(names)) {
      if (typeof to !== 'string' || to.length === 0) throw new InvalidArgumentError(`renameColumns(): the new name of '${from}' must be a non-empty string, got ${JSON.stringify(to)}`, 'ERR_DATA_COLUMN');
    }
    return this.#builtin(`RenameColumns(${Object.entries(names).map(([from, to]) => `${from}->${to}`).join(', ')})`, renameColumns, [{ ...names }], { rename: { ...names } });
  }

  /**
   * A column computed per batch by `fn` (registered), which receives the batch (columns by
   * default) and returns the new column's values; an existing column of that name is replaced.
   */
  addColumn(name: string, fn: UdfTarget, options: AddColumnOptions = {}): Dataset {
    if (typeof name !== 'string' || name.length === 0) throw new InvalidArgumentError(`addColumn() takes a column name first, got ${JSON.stringify(name)}`, 'ERR_DATA_COLUMN');
    const udf = resolveUdf(fn, `addColumn('${name}')`);
    if (udf.kind === 'class') throw new InvalidArgumentError(`addColumn('${name}') takes a function; classes run through mapBatches() on an actor pool`, 'ERR_DATA_UDF');
    const fnArgs = options.fnArgs ?? [];
    if (!Array.isArray(fnArgs)) throw new InvalidArgumentError(`addColumn('${name}'): fnArgs must be an array`);
    const format = checkBatchFormat(options.batchFormat ?? 'columns', `addColumn('${name}')`);
    return this.#builtin(`AddColumn(${name})`, addColumn, [name, udf.descriptor, fnArgs, format]);
  }

  /** A built-in batch stage over whole blocks (as Arrow tables): it fuses like a user's. */
  #builtin(name: string, fn: UdfTarget, fnArgs: unknown[], columnsOnly?: ColumnsOnly): Dataset {
    const stage: StageSpec = { kind: 'mapBatches', name, udf: resolveUdf(fn, name), fnArgs, batchFormat: 'arrow' };
    return this.#with({ op: 'stage', stage, compute: {}, ...(columnsOnly ? { columnsOnly } : {}) });
  }

  // -------------------------------------------------------------------------------------------
  // Consumers

  /**
   * The aggregations over the whole dataset, as one row (`{ 'sum(price)': 12.5, ... }`). They
   * stream: each block becomes a partial state as it is made.
   */
  async aggregate(...args: [...AggregateFn[]] | [...AggregateFn[], ExecutionOptions]): Promise<Row> {
    const last = args[args.length - 1] as Partial<AggregateFn> | undefined;
    const options = last && typeof last === 'object' && !('kind' in last) ? (args.pop() as ExecutionOptions) : {};
    const aggregations = checkAggregations(args, [], 'aggregate()');
    const operator: LogicalOperator = { op: 'aggregate', name: `Aggregate(${aggregations.map((aggregation) => aggregation.name).join(', ')})`, plan: { keys: [], aggregations } };
    const rows: Row[] = [];
    for await (const { block } of this.#blocks(options, 'Dataset.aggregate', [...this.#plan, operator])) rows.push(...blockToRows(block));
    return rows[0] ?? {};
  }

  /** The sum of a column's non-null values (null when it has none; a bigint for int64 columns). */
  async sum(column: string, options: ExecutionOptions & AggregateOptions = {}): Promise<number | bigint | null> {
    return (await this.#one(Sum, column, options)) as number | bigint | null;
  }
  /** The smallest non-null value of a column (null when it has none). */
  async min(column: string, options: ExecutionOptions & AggregateOptions = {}): Promise<unknown> {
    return this.#one(Min, column, options);
  }
  /** The largest non-null value of a column (null when it has none). */
  async max(column: string, options: ExecutionOptions & AggregateOptions = {}): Promise<unknown> {
    return this.#one(Max, column, options);
  }
  /** The mean of a column's non-null values (null when it has none). */
  async mean(column: string, options: ExecutionOptions & AggregateOptions = {}): Promise<number | null> {
    return (await this.#one(Mean, column, options)) as number | null;
  }
  /** The standard deviation of a column's non-null values (ddof 1 by default). */
  async std(column: string, options: ExecutionOptions & AggregateOptions & { ddof?: number } = {}): Promise<number | null> {
    const { ddof, ...rest } = options;
    return (await this.#one((name, aggregateOptions) => Std(name, { ...aggregateOptions, ddof }), column, rest)) as number | null;
  }
  /** A column's distinct values, sorted (null last when present). */
  async unique(column: string, options: ExecutionOptions & AggregateOptions = {}): Promise<unknown[]> {
    return (await this.#one(Unique, column, options)) as unknown[];
  }

  async #one(make: (column: string, options: AggregateOptions) => AggregateFn, column: string, options: ExecutionOptions & AggregateOptions): Promise<unknown> {
    const { alias: _alias, ignoreNulls, ...execution } = options;
    const aggregation = make(column, ignoreNulls === undefined ? {} : { ignoreNulls });
    const row = await this.aggregate(aggregation, execution);
    return row[aggregation.name] ?? null;
  }


  #executor(options: ExecutionOptions, job: string, sink?: Datasink): StreamingExecutor {
    requireCluster(job);
    return new StreamingExecutor(planPhysical(this.#plan, sink), options, job);
  }

  /**
   * Output blocks as they are made, copied out of the store: the consumer may keep what it is
   * given (a batch, a column, a binary cell) long after the job let the stored block go, and a
   * view would keep the block pinned in the store all that time, counted against the job's
   * budget: a consumer that gathers batches would stall the job behind its own memory. Workers
   * still read blocks zero-copy; the driver's one copy per block is what a consumer's batches
   * live in, on the driver's heap.
   */
  async *#blocks(options: ExecutionOptions, job: string, plan: readonly LogicalOperator[] = this.#plan): AsyncGenerator<{ block: Block; meta: InputBlock['meta'] }> {
    requireCluster(job);
    const executor = new StreamingExecutor(planPhysical(plan), options, job);
    await startOrClose(executor);
    try {
      for await (const output of executor.outputs()) {
        try {
          const stored = (await get(output.ref)) as Block;
          trackDriverView(stored, output.meta.bytes);
          let block = copyBlock(stored);
          if (output.slice) block = block.slice(output.slice[0], output.slice[0] + output.slice[1]);
          yield { block, meta: output.meta };
        } finally {
          output.ref[Symbol.dispose]();
        }
      }
    } finally {
      this.#lastStats = executor.stats();
    }
  }

  /** Batches of `batchSize` rows in `batchFormat` (default 'columns'), streamed as they are made. */
  async *iterBatches(options: IterBatchesOptions = {}): AsyncGenerator<Batch> {
    const batchSize = checkBatchSize(options.batchSize, 'iterBatches()');
    const format = checkBatchFormat(options.batchFormat ?? 'columns', 'iterBatches()');
    const { localShuffleBufferSize, localShuffleSeed, ...execution } = options;
    const shuffle = checkLocalShuffle(localShuffleBufferSize, localShuffleSeed, batchSize, 'iterBatches()');
    const blocks = this.#blocks(execution, 'Dataset.iterBatches');
    yield* rebatch((async function* () {
      for await (const { block } of blocks) yield block;
    })(), batchSize, format, shuffle);
  }

  /** Rows one at a time, as plain objects. */
  async *iterRows(options: ExecutionOptions = {}): AsyncGenerator<Row> {
    for await (const batch of this.iterBatches({ ...options, batchSize: null, batchFormat: 'rows' })) yield* batch as Row[];
  }

  /** The first `rows` rows (default 20). */
  async take(rows = 20, options: ExecutionOptions = {}): Promise<Row[]> {
    checkPositiveInteger(rows, 'take(rows)', true);
    const out: Row[] = [];
    if (rows === 0) return out;
    for await (const { block } of this.#blocks(options, 'Dataset.take', [...this.#plan, { op: 'limit', rows }])) out.push(...blockToRows(block));
    return out;
  }

  /** Every row. Mind the driver's memory. */
  async takeAll(options: ExecutionOptions = {}): Promise<Row[]> {
    const out: Row[] = [];
    for await (const row of this.iterRows(options)) out.push(row);
    return out;
  }

  /** The first `rows` rows as one batch. */
  async takeBatch(rows = 20, options: ExecutionOptions & { batchFormat?: BatchFormat } = {}): Promise<Block | Row[] | FormattedColumns> {
    checkPositiveInteger(rows, 'takeBatch(rows)');
    const format = checkBatchFormat(options.batchFormat ?? 'columns', 'takeBatch()');
    const blocks: Block[] = [];
    for await (const { block } of this.#blocks(options, 'Dataset.takeBatch', [...this.#plan, { op: 'limit', rows }])) blocks.push(block);
    return formatBatch(concatBlocks(blocks), format);
  }

  /** Prints the first `rows` rows, one JSON line each. */
  async show(rows = 20, options: ExecutionOptions = {}): Promise<void> {
    for (const row of await this.take(rows, options)) {
      // A tensor is shown by its dtype and shape: an image's pixels would fill the screen.
      console.log(JSON.stringify(row, (_key, value) => (typeof value === 'bigint' ? value.toString() : value instanceof Tensor ? String(value) : value)));
    }
  }

  /** Rows in the dataset: from metadata alone when the source knows its counts and nothing changes them. */
  async count(options: ExecutionOptions = {}): Promise<number> {
    checkExecutionOptions(options);
    const [head, ...rest] = this.#plan;
    if (rest.length === 0 && head?.op === 'input') return head.blocks.reduce((sum, block) => sum + block.meta.rows, 0);
    if (rest.length === 0 && head?.op === 'read') {
      const tasks = await head.datasource.getReadTasks(head.parallelism ?? 1);
      // Anything but read tasks that all know their rows runs (and is reported) as a job.
      const known = Array.isArray(tasks) && tasks.every((task) => task instanceof ReadTask && typeof task.metadata.rows === 'number');
      if (known) return tasks.reduce((sum, task) => sum + task.metadata.rows!, 0);
    }
    let rows = 0;
    const executor = this.#executor(options, 'Dataset.count');
    await startOrClose(executor);
    for await (const output of executor.outputs()) {
      rows += output.meta.rows;
      output.ref[Symbol.dispose]();
    }
    this.#lastStats = executor.stats();
    return rows;
  }

  /** The Arrow schema of the output (runs the plan up to its first block); undefined when empty. */
  async schema(options: ExecutionOptions = {}): Promise<Schema | undefined> {
    for await (const { block } of this.#blocks(options, 'Dataset.schema', [...this.#plan, { op: 'limit', rows: 1 }])) return block.schema;
    return undefined;
  }

  /** Runs the plan and keeps its blocks in the object store: later consumers start from them. */
  async materialize(options: ExecutionOptions = {}): Promise<Dataset> {
    return new Dataset([{ op: 'input', name: 'Materialized', blocks: await this.#materializedBlocks(options, 'Dataset.materialize') }]);
  }

  /**
   * Runs the plan and cuts its rows into `n` datasets of nearly equal rows (sizes differ by at
   * most one; with `equal`, exactly equal, the remainder dropped, as Ray's split does). Blocks are
   * cut without copies: each split is a view of the materialized blocks.
   */
  async split(n: number, options: ExecutionOptions & { equal?: boolean } = {}): Promise<Dataset[]> {
    checkPositiveInteger(n, 'split(n)');
    const { equal, ...execution } = options;
    const blocks = await this.#materializedBlocks(execution, 'Dataset.split');
    const total = blocks.reduce((sum, block) => sum + block.meta.rows, 0);
    const sizes = Array.from({ length: n }, (_, index) => (equal ? Math.floor(total / n) : Math.floor(total / n) + (index < total % n ? 1 : 0)));
    return cutIntoDatasets(blocks, sizes, 'Split');
  }

  /**
   * `n` iterators over one run of the plan (Ray Data's streaming_split), to pass to tasks or
   * actors that consume them at once, each its own share: the rows go from the store to their
   * consumer, never through the driver, and the run streams with bounded memory (each consumer
   * may have two blocks waiting). By default a consumer takes the next block when it asks, so
   * faster ones take more; `equal` gives each the same number of rows (dropping the fewer than n
   * left over), a slow consumer then holding the others back. `localityHints` (a node id per
   * iterator, Ray's locality_hints) deal a block to an iterator on a node that holds it where that
   * one has room, so its rows are read from the local store; a consumer with nothing waiting
   * still takes a far block rather than wait (with `equal`, a near iterator is preferred only
   * among those tied for fewest rows). The run starts at once, in the
   * background: start all n consumers. A failed run fails each iterator with DataError
   * ('ERR_DATA_SPLIT', naming the cause).
   */
  streamingSplit(n: number, options: ExecutionOptions & { equal?: boolean; localityHints?: string[] } = {}): DataIterator[] {
    checkPositiveInteger(n, 'streamingSplit(n)');
    const { equal = false, localityHints, ...execution } = options;
    if (typeof equal !== 'boolean') throw new InvalidArgumentError(`streamingSplit(): equal must be a boolean, got ${String(equal)}`);
    requireCluster('Dataset.streamingSplit');
    if (localityHints !== undefined) checkLocalityHints(localityHints, n);
    const executor = new StreamingExecutor(planPhysical(this.#plan), execution, 'Dataset.streamingSplit');
    const blocks = async function* (this: Dataset): AsyncGenerator<SplitBlock> {
      await startOrClose(executor);
      try {
        for await (const output of executor.outputs()) {
          yield { ref: output.ref as ObjectRef<Block>, offset: output.slice?.[0] ?? 0, rows: output.slice ? output.slice[1] : output.meta.rows };
        }
      } finally {
        this.#lastStats = executor.stats();
      }
    };
    return startStreamingSplit(n, equal, blocks.call(this), localityHints);
  }

  /** Runs the plan and cuts its rows at the given row indices (ascending): indices.length + 1 datasets. */
  async splitAt(indices: number[], options: ExecutionOptions = {}): Promise<Dataset[]> {
    if (!Array.isArray(indices) || indices.some((index, at) => !Number.isInteger(index) || index < 0 || (at > 0 && index < indices[at - 1]))) {
      throw new InvalidArgumentError(`splitAt() takes ascending non-negative row indices, got ${JSON.stringify(indices)}`);
    }
    const blocks = await this.#materializedBlocks(options, 'Dataset.splitAt');
    const total = blocks.reduce((sum, block) => sum + block.meta.rows, 0);
    const bounds = [0, ...indices.map((index) => Math.min(index, total)), total];
    return cutIntoDatasets(blocks, bounds.slice(1).map((end, index) => end - bounds[index]), 'SplitAt');
  }

  /**
   * A train and a test dataset: the last `testSize` rows (a fraction in (0, 1) or a row count) are
   * the test set; with `shuffle`, rows are shuffled first (seeded for the same split every run).
   */
  async trainTestSplit(testSize: number, options: ExecutionOptions & { shuffle?: boolean; seed?: number } = {}): Promise<[Dataset, Dataset]> {
    if (typeof testSize !== 'number' || !(testSize > 0) || (testSize >= 1 && !Number.isInteger(testSize))) {
      throw new InvalidArgumentError(`trainTestSplit() takes a fraction in (0, 1) or a whole number of rows, got ${String(testSize)}`);
    }
    const { shuffle, seed, ...execution } = options;
    const source = shuffle ? this.randomShuffle(seed === undefined ? {} : { seed }) : this;
    const blocks = await source.#materializedBlocks(execution, 'Dataset.trainTestSplit');
    const total = blocks.reduce((sum, block) => sum + block.meta.rows, 0);
    const test = Math.min(total, testSize < 1 ? Math.round(total * testSize) : testSize);
    const [train, tested] = cutIntoDatasets(blocks, [total - test, test], 'TrainTestSplit');
    return [train, tested];
  }

  async #materializedBlocks(options: ExecutionOptions, job: string): Promise<InputBlock[]> {
    const executor = this.#executor(options, job);
    await startOrClose(executor);
    const blocks: InputBlock[] = [];
    for await (const output of executor.outputs()) blocks.push(output);
    this.#lastStats = executor.stats();
    return blocks;
  }

  /**
   * Writes through a sink: onWriteStart, then write() in write tasks as blocks arrive, then
   * onWriteComplete with every task's result (or onWriteFailed with the error that stopped it).
   * With `checkpoint: { idColumn }`, each write records its rows' ids, and a run of the same job
   * after one that stopped skips the rows already written (see {@link CheckpointOptions}); the
   * results then include the earlier runs' writes, first.
   */
  async write<Result>(sink: Datasink<Result>, options: ExecutionOptions & WriteOptions = {}): Promise<Result[]> {
    if (!sink || typeof (sink as Datasink).write !== 'function') throw new InvalidArgumentError('write() takes a Datasink (an object with write(blocks, context))');
    const { checkpoint: checkpointOptions, mode: modeOption, ...execution } = options;
    const mode = checkWriteMode(modeOption);
    if (mode !== 'append' && !(sink instanceof FileDatasink)) throw new InvalidArgumentError(`mode '${mode}' is for the file writers; ${sink.name} decides what it writes over`);
    const job = `Dataset.write(${sink.name})`;
    requireCluster(job);
    const writeId = newWriteId();
    const checkpoint = checkpointOptions === undefined
      ? undefined
      : await WriteCheckpoint.open(checkpointOptions, sink, this.#plan, writeId, sink instanceof FileDatasink ? filePaths.join(sink.path, '.trellis-checkpoint') : undefined, sink instanceof FileDatasink ? sink.filesystem : undefined);
    try {
      // A resume appends to what the stopped run wrote, whatever the mode.
      const resumed = checkpoint?.stats();
      const resuming = (resumed?.resumedWrites ?? 0) > 0;
      if (sink instanceof FileDatasink && !resuming && !(await sink.prepareDirectory(mode))) {
        // 'ignore': nothing written, so nothing to resume either.
        await checkpoint?.complete();
        return [];
      }
      const executor = new StreamingExecutor(planPhysical(checkpoint ? checkpoint.planWith(this.#plan) : this.#plan, sink), execution, job, writeId);
      if (checkpoint && resumed) {
        executor.checkpoint = checkpoint.target();
        executor.resumed = resumed;
        const { resumedRows, resumedWrites } = resumed;
        if (resumedWrites > 0) executor.warn(`resuming from checkpoint ${checkpoint.path}: ${resumedRows} rows an earlier run wrote (${resumedWrites} writes) are skipped`);
      }
      await sink.onWriteStart();
      try {
        await startOrClose(executor);
        await executor.run();
      } catch (error) {
        // No write may land after the sink hears of the failure, or after a checkpoint is let go.
        await executor.settle();
        this.#lastStats = executor.stats();
        await sink.onWriteFailed(error as Error);
        throw error;
      }
      this.#lastStats = executor.stats();
      const results = [...((checkpoint?.resumedResults ?? []) as Result[]), ...(executor.writeResults() as Result[])];
      await sink.onWriteComplete(results);
      await checkpoint?.complete();
      return results;
    } finally {
      await checkpoint?.close();
    }
  }

  /** Writes JSON Lines files into `directory`, one per write task. */
  writeJsonl(directory: string, options: ExecutionOptions & JsonlWriteOptions & WriteOptions = {}): Promise<WrittenFile[]> {
    return this.write(jsonlSink(directory, sinkOptions(options)), options);
  }

  /** Writes CSV files with a header row into `directory`, one per write task. */
  writeCsv(directory: string, options: ExecutionOptions & CsvWriteOptions & WriteOptions = {}): Promise<WrittenFile[]> {
    return this.write(csvSink(directory, sinkOptions(options)), options);
  }

  /** Writes Parquet files into `directory`, one per write task (snappy by default). */
  writeParquet(directory: string, options: ExecutionOptions & ParquetWriteOptions & WriteOptions = {}): Promise<WrittenFile[]> {
    return this.write(parquetSink(directory, sinkOptions(options)), options);
  }

  /**
   * Writes WebDataset tar shards into `directory`, one per write task (Ray Data's
   * write_webdataset): a row is a sample, each column a file `<__key__>.<column>`.
   */
  writeWebDataset(directory: string, options: ExecutionOptions & WebDatasetWriteOptions & WriteOptions = {}): Promise<WrittenFile[]> {
    return this.write(webDatasetSink(directory, sinkOptions(options)), options);
  }

  /**
   * Writes each row's image (a tensor column, default 'image') as a PNG or JPEG file of its own
   * in `directory` (Ray's write_images); `filenameColumn` names the files after a column so that
   * a rerun rewrites the same files. Returns each write task's files.
   */
  writeImages(directory: string, options: ExecutionOptions & ImageWriteOptions = {}): Promise<WrittenImages[]> {
    const { column, format, quality, chroma, filenameColumn, filesystem, ...execution } = options;
    const sink = new ImageDatasink(directory, {
      ...(column !== undefined ? { column } : {}),
      ...(format !== undefined ? { format } : {}),
      ...(quality !== undefined ? { quality } : {}),
      ...(chroma !== undefined ? { chroma } : {}),
      ...(filenameColumn !== undefined ? { filenameColumn } : {}),
      ...(filesystem !== undefined ? { filesystem } : {}),
    });
    return this.write(sink, execution);
  }

  /** Writes Arrow IPC files into `directory`, one per write task. */
  writeArrow(directory: string, options: ExecutionOptions & ArrowWriteOptions & WriteOptions = {}): Promise<WrittenFile[]> {
    return this.write(arrowSink(directory, sinkOptions(options)), options);
  }

  /** Statistics of the last job this dataset ran. */
  stats(): JobStats | undefined {
    return this.#lastStats;
  }

  /** The logical plan, the physical plan with its fused operators, and the tasks each will run. */
  async explain(options: { print?: boolean } = {}): Promise<string> {
    const lines = ['Logical plan:'];
    this.#plan.forEach((operator, index) => lines.push(`  ${index === 0 ? '' : '-> '}${describeLogical(operator)}`));
    lines.push('Physical plan:');
    const physical = planPhysical(this.#plan);
    let blocksEstimate: number | undefined;
    let rowsEstimate: number | undefined;
    for (const [index, operator] of physical.entries()) {
      const { text, blocks, rows } = await describePhysical(operator, blocksEstimate, rowsEstimate);
      blocksEstimate = blocks;
      rowsEstimate = rows;
      lines.push(`  ${index + 1}. ${text}`);
    }
    const text = lines.join('\n');
    if (options.print !== false) console.log(text);
    return text;
  }

  /** @internal */
  get logicalPlan(): readonly LogicalOperator[] {
    return this.#plan;
  }
}

async function describePhysical(
  operator: PhysicalOperatorSpec,
  upstreamBlocks: number | undefined,
  upstreamRows: number | undefined,
): Promise<{ text: string; blocks?: number; rows?: number }> {
  const approx = (value: number | undefined) => (value === undefined ? 'one per input block' : `~${value}`);
  const fused = (stages: readonly StageSpec[]) => (stages.length ? ` (fused: ${stages.map((stage) => stage.name).join(', ')})` : '');
  switch (operator.kind) {
    case 'input':
      return { text: `${operator.name}: ${operator.blocks.length} blocks in the store, no tasks`, blocks: operator.blocks.length, rows: operator.blocks.reduce((sum, block) => sum + block.meta.rows, 0) };
    case 'read': {
      const tasks = await operator.datasource.getReadTasks(operator.parallelism ?? defaultParallelism());
      const known = tasks.every((task) => typeof task.metadata.rows === 'number');
      const rows = known ? tasks.reduce((sum, task) => sum + (task.metadata.rows ?? 0), 0) : undefined;
      return { text: `${operator.name}: ${tasks.length} read tasks${fused(operator.stages)}${rows !== undefined ? `, ${rows} rows` : ''}`, blocks: tasks.length, rows };
    }
    case 'task-map': {
      if (operator.bundleRows) {
        const batches = upstreamRows !== undefined ? Math.ceil(upstreamRows / operator.bundleRows) : undefined;
        return { text: `${operator.name}: ${approx(batches)} batches of ${operator.bundleRows} rows, several to a task${fused(operator.stages.slice(1))}`, blocks: batches ?? upstreamBlocks, rows: upstreamRows };
      }
      return { text: `${operator.name}: ${approx(upstreamBlocks)} tasks${fused(operator.stages.slice(1))}`, blocks: upstreamBlocks, rows: upstreamRows };
    }
    case 'actor-map': {
      const batches = operator.bundleRows && upstreamRows !== undefined ? Math.ceil(upstreamRows / operator.bundleRows) : undefined;
      const max = operator.pool.max === Infinity ? 'as resources allow' : String(operator.pool.max);
      const work = operator.bundleRows ? `${approx(batches)} batches of ${operator.bundleRows} rows, several to a call` : `${approx(upstreamBlocks)} calls`;
      return {
        text: `${operator.name}: actor pool of ${operator.pool.min}..${max} actors, ${work}${fused(operator.following)}`,
        blocks: batches ?? upstreamBlocks,
        rows: upstreamRows,
      };
    }
    case 'repartition':
      return { text: `${operator.name}: ${operator.numBlocks} tasks after all input arrives`, blocks: operator.numBlocks, rows: upstreamRows };
    case 'exchange': {
      const partitions = operator.numBlocks ? String(operator.numBlocks) : 'by size';
      const phases = operator.exchange.kind === 'sort' ? 'sample, map and reduce tasks' : 'map and reduce tasks';
      const text = `${operator.name}: all-to-all after all input arrives, ${phases}, ${partitions} output blocks`;
      if (operator.inputs) return { text: [text, ...(await describeInputs(operator.inputs)).lines].join('\n'), blocks: operator.numBlocks };
      return { text, blocks: operator.numBlocks ?? upstreamBlocks, rows: operator.exchange.kind === 'mapGroups' ? undefined : upstreamRows };
    }
    case 'aggregate': {
      const { reduction } = operator;
      if (reduction.kind === 'topk') {
        return { text: `${operator.name}: the top rows of each block as it arrives, merged 16 at a time, one final task`, blocks: 1, rows: upstreamRows === undefined ? undefined : Math.min(upstreamRows, reduction.rows) };
      }
      return { text: `${operator.name}: a partial task per block as it arrives, merged 16 at a time, one final task`, blocks: 1, rows: reduction.plan.keys.length === 0 ? 1 : undefined };
    }
    case 'zip': {
      const inputs = await describeInputs(operator.inputs);
      return { text: [`${operator.name}: after both inputs arrive, one task per block of the first`, ...inputs.lines].join('\n'), blocks: undefined, rows: inputs.rows === undefined ? undefined : inputs.rows / 2 };
    }
    case 'union': {
      const inputs = await describeInputs(operator.inputs);
      return { text: [`${operator.name}: its inputs' blocks in the driver, input by input`, ...inputs.lines].join('\n'), blocks: inputs.blocks, rows: inputs.rows };
    }
    case 'limit':
      return { text: `${operator.name}: in the driver, stops upstream at ${operator.rows} rows`, blocks: upstreamBlocks, rows: upstreamRows === undefined ? operator.rows : Math.min(upstreamRows, operator.rows) };
    case 'write':
      return { text: `${operator.name}: ${approx(upstreamBlocks)} write tasks`, blocks: 0, rows: upstreamRows };
  }
}

/** The physical plans of a union's or a join's inputs, one numbered line per operator. */
async function describeInputs(inputs: readonly PhysicalOperatorSpec[][]): Promise<{ lines: string[]; blocks?: number; rows?: number }> {
  const lines: string[] = [];
  let blocks: number | undefined = 0;
  let rows: number | undefined = 0;
  for (const [index, chain] of inputs.entries()) {
    let chainBlocks: number | undefined;
    let chainRows: number | undefined;
    for (const [step, inner] of chain.entries()) {
      const described = await describePhysical(inner, chainBlocks, chainRows);
      chainBlocks = described.blocks;
      chainRows = described.rows;
      lines.push(`     ${index + 1}.${step + 1}. ${described.text}`);
    }
    blocks = blocks === undefined || chainBlocks === undefined ? undefined : blocks + chainBlocks;
    rows = rows === undefined || chainRows === undefined ? undefined : rows + chainRows;
  }
  return { lines, blocks, rows };
}

// ---------------------------------------------------------------------------------------------
// Sources

/** A dataset over items in the driver: stored as `parallelism` blocks (default: up to 200 rows each). */
export function fromItems(items: readonly unknown[], options: { parallelism?: number } = {}): Dataset {
  requireCluster('fromItems()');
  if (!Array.isArray(items)) throw new InvalidArgumentError('fromItems() takes an array');
  const rows: Row[] = items.map((item) => (typeof item === 'object' && item !== null && !Array.isArray(item) && !(item instanceof Date) ? (item as Row) : { item }));
  const parallelism = options.parallelism ?? Math.max(1, Math.min(200, rows.length));
  checkPositiveInteger(parallelism, 'fromItems(): parallelism');
  const perBlock = Math.max(1, Math.ceil(rows.length / parallelism));
  const blocks: InputBlock[] = [];
  for (let start = 0; start < rows.length; start += perBlock) {
    const block = rowsToBlock(rows.slice(start, start + perBlock));
    blocks.push({ ref: put(block) as ObjectRef<Block>, meta: { rows: block.numRows, bytes: storedBytes(block) } });
  }
  return new Dataset([{ op: 'input', name: 'FromItems', blocks }]);
}

/** A dataset over Arrow tables already in the driver. */
export function fromArrow(tables: Block | readonly Block[]): Dataset {
  requireCluster('fromArrow()');
  const list = Array.isArray(tables) ? tables : [tables as Block];
  const blocks = list.map((table) => ({ ref: put(table) as ObjectRef<Block>, meta: { rows: table.numRows, bytes: storedBytes(table) } }));
  return new Dataset([{ op: 'input', name: 'FromArrow', blocks }]);
}

/** Reads through a custom Datasource. */
export function readDatasource(datasource: Datasource, options: ReadOptions = {}): Dataset {
  if (!datasource || typeof (datasource as Datasource).getReadTasks !== 'function') {
    throw new InvalidArgumentError('readDatasource() takes a Datasource (an object with getReadTasks(parallelism))');
  }
  if (options.parallelism !== undefined) checkPositiveInteger(options.parallelism, 'readDatasource(): parallelism');
  if (options.rowIds !== undefined && (typeof options.rowIds !== 'string' || options.rowIds === '')) {
    throw new InvalidArgumentError(`readDatasource(): rowIds must name the column to add, got ${String(options.rowIds)}`, 'ERR_DATA_COLUMN');
  }
  return new Dataset([{ op: 'read', datasource, parallelism: options.parallelism, compute: checkCompute(options, 'readDatasource()'), ...(options.rowIds ? { rowIds: options.rowIds } : {}) }]);
}

/**
 * Materialized blocks cut into datasets of `sizes` rows each, in order, without copies: a block
 * cut between two datasets is shared, each holding its own handle on it and its own slice.
 */
function cutIntoDatasets(blocks: InputBlock[], sizes: number[], name: string): Dataset[] {
  const datasets = cutInputBlocks(blocks, sizes).map((pieces, index) => new Dataset([{ op: 'input', name: `${name}(${index + 1}/${sizes.length})`, blocks: pieces }]));
  // Each dataset holds its own handles: the job's go now.
  for (const block of blocks) block.ref[Symbol.dispose]();
  return datasets;
}

/** Starts a job; one that fails to start still stops (its progress display, its actors). */
async function startOrClose(executor: StreamingExecutor): Promise<void> {
  try {
    await executor.start();
  } catch (error) {
    await executor.close();
    throw error;
  }
}

/** A file sink's own options: what configures the job's run stays with the job. */
/** Locality hints name one node of the cluster per iterator. */
function checkLocalityHints(hints: unknown, n: number): void {
  if (!Array.isArray(hints) || hints.length !== n || hints.some((hint) => typeof hint !== 'string')) {
    throw new InvalidArgumentError(`streamingSplit(): localityHints must name one node id per iterator (${n}), got ${JSON.stringify(hints)}`);
  }
  const known = new Set(state().nodes.map((node) => node.nodeId));
  const unknown = hints.filter((hint) => !known.has(hint as string));
  if (unknown.length > 0) throw new InvalidArgumentError(`streamingSplit(): localityHints name no node of the cluster: ${unknown.join(', ')} (its nodes: ${[...known].join(', ')})`);
}

function sinkOptions<T extends WriteOptions>(options: T): Omit<T, 'checkpoint' | 'mode'> {
  const { checkpoint: _checkpoint, mode: _mode, ...rest } = options;
  return rest;
}

/**
 * The filter as it would read before `stages`, when each only selects, drops or renames columns:
 * its columns named as they are there. Undefined where a stage does more, or where the filter
 * names a column a stage removes or renames away (run after it, the filter names what is wrong).
 */
function filterBeforeColumnStages(clauses: Clauses, stages: readonly LogicalOperator[]): Clauses | undefined {
  let current = clauses;
  for (let index = stages.length - 1; index >= 0; index--) {
    const stage = stages[index];
    const effect = stage.op === 'stage' ? stage.columnsOnly : undefined;
    if (!effect) return undefined;
    const columns = filterColumns(current);
    if ('keep' in effect) {
      if (!columns.every((column) => effect.keep.includes(column))) return undefined;
    } else if ('drop' in effect) {
      if (columns.some((column) => effect.drop.includes(column))) return undefined;
    } else {
      const before = new Map(Object.entries(effect.rename).map(([from, to]) => [to, from]));
      if (columns.some((column) => !before.has(column) && Object.hasOwn(effect.rename, column))) return undefined;
      current = current.map((clause) => clause.map((predicate) => ({ ...predicate, column: before.get(predicate.column) ?? predicate.column })));
    }
  }
  return current;
}
