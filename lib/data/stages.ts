/**
 * The stages a data task runs, fused in one process: row maps, filters, flat maps and batch maps,
 * applied to a stream of blocks. Pure of the cluster: tests run it in-process; workers run it in
 * data tasks and pool actors.
 */
import { InvalidArgumentError } from '../errors.js';
import {
  blockToRows, concatBlocks, formatBatch, rowsToBlock, sliceRows, toBlock, type BatchFormat, type Block, type Row,
} from './block.js';
import { loadUdf, udfName, type UdfSpec } from './udf.js';

export type StageKind = 'map' | 'flatMap' | 'filter' | 'mapBatches';

/** A stage as it travels to a worker. */
export interface StageSpec {
  kind: StageKind;
  /** Shown in plans, progress and errors, e.g. 'Map(tokenize)'. */
  name: string;
  udf: UdfSpec;
  fnArgs: unknown[];
  batchSize?: number;
  batchFormat?: BatchFormat;
  /** Class stages: arguments of the constructor (run once per actor). */
  constructorArgs?: unknown[];
  /** Row stages: calls of an async function running at once within a block. */
  rowsInFlight?: number;
}

/** A stage ready to run: its callable bound. */
export interface LoadedStage {
  spec: StageSpec;
  call: (input: unknown, ...fnArgs: unknown[]) => unknown;
}

/** A failure inside a stage, located by the rows of that stage's input it was processing. */
export class StageFailure extends Error {
  constructor(
    readonly stage: string,
    readonly rows: [number, number],
    readonly original: unknown,
  ) {
    super(`${stage} failed on rows ${rows[0]}-${rows[1]}: ${original instanceof Error ? original.message : String(original)}`);
  }
}

/** Loads a stage's function; class stages are loaded by their actor, which passes its instance. */
export async function loadStage(spec: StageSpec, instance?: object): Promise<LoadedStage> {
  if (spec.udf.kind === 'class') {
    if (!instance) throw new InvalidArgumentError(`${spec.name} runs a class and needs an actor pool`, 'ERR_DATA_UDF');
    const method = (instance as Record<string, unknown>)[spec.udf.method!];
    if (typeof method !== 'function') throw new InvalidArgumentError(`${udfName(spec.udf)} is not a method`, 'ERR_DATA_UDF');
    return { spec, call: (input, ...args) => (method as (...a: unknown[]) => unknown).call(instance, input, ...args) };
  }
  const fn = (await loadUdf(spec.udf.descriptor)) as (...args: unknown[]) => unknown;
  return { spec, call: fn };
}

/** Runs a class stage's constructor: the model load of a batch-inference actor. */
export async function constructStageInstance(spec: StageSpec): Promise<object> {
  const cls = (await loadUdf(spec.udf.descriptor)) as new (...args: unknown[]) => object;
  const instance = new cls(...(spec.constructorArgs ?? []));
  // A class may finish loading asynchronously: an `init()` or a `ready` promise is awaited.
  const ready = (instance as { ready?: unknown }).ready;
  if (ready && typeof (ready as Promise<unknown>).then === 'function') await ready;
  return instance;
}

/**
 * The results of `call` over every row, in order, at most `limit` calls at once. On a failure no
 * further row starts; the first failing row (in order) is reported once the calls in flight settle.
 */
async function callRows(rows: Row[], call: (row: Row) => unknown, limit: number): Promise<{ results: unknown[]; failed?: { index: number; error: unknown } }> {
  const results = new Array<unknown>(rows.length);
  // One lane is the plain loop: rows one after another, stopping at the first failure.
  let next = 0;
  const outcome: { failed?: { index: number; error: unknown } } = {};
  // Rows start in order, so a later failure may belong to an earlier row: keep the earliest.
  const fail = (index: number, error: unknown): void => {
    if (!outcome.failed || index < outcome.failed.index) outcome.failed = { index, error };
  };
  const lane = async (): Promise<void> => {
    while (next < rows.length && !outcome.failed) {
      const index = next++;
      try {
        results[index] = await call(rows[index]);
      } catch (error) {
        fail(index, error);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, rows.length)) }, lane));
  return { results, ...outcome };
}

/** A row function's result checked for its kind: a row for map, rows for flatMap, anything for filter. */
export function checkRowResult(kind: StageKind, name: string, result: unknown): unknown {
  if (kind === 'map' && (typeof result !== 'object' || result === null || Array.isArray(result))) {
    throw new InvalidArgumentError(`${name} must return a row (a plain object), got ${Array.isArray(result) ? 'an array' : result === null ? 'null' : typeof result}`, 'ERR_DATA_TYPE');
  }
  if (kind === 'flatMap' && !Array.isArray(result) && !(result && typeof (result as Iterable<Row>)[Symbol.iterator] === 'function')) {
    throw new InvalidArgumentError(`${name} must return an array of rows, got ${result === null ? 'null' : typeof result}`, 'ERR_DATA_TYPE');
  }
  return result;
}

async function* rowStage(stage: LoadedStage, input: AsyncIterable<Block>): AsyncGenerator<Block> {
  const { kind, name, fnArgs, rowsInFlight = 1 } = stage.spec;
  let offset = 0;
  for await (const block of input) {
    const rows = blockToRows(block);
    const { results, failed } = await callRows(rows, async (row) => checkRowResult(kind, name, await stage.call(row, ...fnArgs)), rowsInFlight);
    if (failed) throw failed.error instanceof StageFailure ? failed.error : new StageFailure(name, [offset + failed.index, offset + failed.index + 1], failed.error);
    const out: Row[] = [];
    for (let index = 0; index < rows.length; index++) {
      if (kind === 'filter') {
        if (results[index]) out.push(rows[index]);
      } else if (kind === 'map') {
        out.push(results[index] as Row);
      } else {
        try {
          // A generator's rows are made here, as they are taken.
          for (const produced of results[index] as Iterable<Row>) out.push(produced);
        } catch (error) {
          throw new StageFailure(name, [offset + index, offset + index + 1], error);
        }
      }
    }
    offset += rows.length;
    if (out.length === 0) continue;
    // A filter keeps the input's schema; a map may change it.
    yield kind === 'filter' ? rowsToBlock(out, block.schema) : rowsToBlock(out);
  }
}

async function* batchStage(stage: LoadedStage, input: AsyncIterable<Block>): AsyncGenerator<Block> {
  const { name, batchSize, batchFormat = 'arrow' } = stage.spec;
  let offset = 0;
  const apply = async (batch: Block): Promise<Block | undefined> => {
    const range: [number, number] = [offset, offset + batch.numRows];
    offset += batch.numRows;
    let result: unknown;
    try {
      result = await stage.call(formatBatch(batch, batchFormat), ...stage.spec.fnArgs);
      if (result === undefined || result === null) throw new InvalidArgumentError(`${name} returned ${result}; return a batch`, 'ERR_DATA_TYPE');
      const block = toBlock(result, name);
      return block.numRows > 0 ? block : undefined;
    } catch (error) {
      throw error instanceof StageFailure ? error : new StageFailure(name, range, error);
    }
  };
  if (!batchSize) {
    for await (const block of input) {
      const out = await apply(block);
      if (out) yield out;
    }
    return;
  }
  // Rows carry over between input blocks so that every batch but the last has batchSize rows.
  let pending: Block[] = [];
  let pendingRows = 0;
  for await (const block of input) {
    if (block.numRows === 0) continue;
    pending.push(block);
    pendingRows += block.numRows;
    if (pendingRows < batchSize) continue;
    const joined = concatBlocks(pending);
    const whole = Math.floor(joined.numRows / batchSize) * batchSize;
    for (const batch of sliceRows(joined.slice(0, whole), batchSize)) {
      const out = await apply(batch);
      if (out) yield out;
    }
    pending = whole < joined.numRows ? [joined.slice(whole)] : [];
    pendingRows = joined.numRows - whole;
  }
  if (pendingRows > 0) {
    const out = await apply(concatBlocks(pending));
    if (out) yield out;
  }
}

/** Chains stages over a stream of blocks. */
export function runStages(input: AsyncIterable<Block>, stages: readonly LoadedStage[]): AsyncIterable<Block> {
  let stream = input;
  for (const stage of stages) stream = stage.spec.kind === 'mapBatches' ? batchStage(stage, stream) : rowStage(stage, stream);
  return stream;
}

export async function* fromBlocks(blocks: readonly Block[]): AsyncGenerator<Block> {
  yield* blocks;
}
