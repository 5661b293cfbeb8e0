/**
 * What runs in workers for a dataset: data tasks (a read or input blocks through fused stages),
 * the actor of an actor pool, and write tasks. Registered at this module's top level so that any
 * worker finds them. A stage that throws is reported as a value, located by stage and rows, so the
 * driver can name the operator, the block and the row range.
 */
import { put } from '../core/api.js';
import { remote } from '../core/registry.js';
import { currentRuntime, type CallScope } from '../core/runtime-context.js';
import type { ObjectRef } from '../core/object-ref.js';
import { blockBytes, concatBlocks, rowsToBlock, splitBySize, type Block, type Row } from './block.js';
import { writeThrough, type CheckpointTarget } from './checkpoint.js';
import { withRowIds } from './formats/files.js';
import { iterateReadResult, type Datasink, type WriteContext } from './datasource.js';
import { constructStageInstance, fromBlocks, loadStage, runStages, StageFailure, type LoadedStage, type StageSpec } from './stages.js';
import { loadUdf, reviveInstance, type ShippedInstance, type UdfSpec } from './udf.js';

export interface BlockOut {
  ref: ObjectRef<Block>;
  rows: number;
  bytes: number;
}

export interface StageErrorInfo {
  stage: string;
  rows?: [number, number];
  name: string;
  message: string;
  code?: string;
  stack?: string;
}

/** A sink fused into a task: its blocks are written there instead of stored. */
export interface FusedWrite {
  sink: ShippedInstance;
  context: WriteContext;
  /** The job's checkpoint, recording each write. */
  checkpoint: CheckpointTarget | null;
}

export interface TaskResult {
  blocks: BlockOut[];
  /** With a fused sink: what its write() returned, and the rows it wrote. */
  written?: { result: unknown; rows: number };
  rowsIn: number;
  bytesIn: number;
  error?: StageErrorInfo;
  /** An actor pool's class with a metrics() method: its counters after this batch. */
  metrics?: Record<string, number>;
}

/** Output sizing and worker memory hygiene, decided by the driver. */
export interface TaskTargets {
  minBlockBytes: number;
  maxBlockBytes: number;
  /** Collect garbage after reading this many bytes zero-copy, so that freed blocks leave the store. */
  collectAfterBytes: number;
}

export type BlockSlices = Array<[number, number] | null> | null;

export type TaskInput =
  | { kind: 'read'; read: UdfSpec; args: unknown[]; rowIds?: { column: string; key: string } }
  | { kind: 'blocks'; slices: BlockSlices };

/** Cuts the parts of stored blocks a unit covers (zero-copy). */
export function applySlices(blocks: Block[], slices: BlockSlices): void {
  if (!slices) return;
  slices.forEach((slice, index) => {
    if (slice) blocks[index] = blocks[index].slice(slice[0], slice[0] + slice[1]);
  });
}

/**
 * What a data task does as it ends. Once its reply has left (a setImmediate runs after the
 * runtime sent it), it lets go of its handles on the blocks it stored, which the driver holds from
 * the reply on: a handle left to this process's garbage collector would keep each block alive
 * until the worker happens to collect. And it asks the runtime to collect garbage sooner than for
 * plain tasks, after an eighth of the job's budget read zero-copy, so that the views of its
 * inputs unpin them within the budget.
 */
export function afterReply(stored: readonly BlockOut[], targets: TaskTargets): void {
  if (stored.length) setImmediate(() => {
    for (const block of stored) block.ref[Symbol.dispose]();
  });
  currentRuntime().collectGarbageAfter?.(targets.collectAfterBytes);
}

export function describeError(error: unknown, stage: string): StageErrorInfo {
  const failure = error instanceof StageFailure ? error : undefined;
  const original = (failure ? failure.original : error) as Error & { code?: string };
  const isError = original instanceof Error;
  return {
    stage: failure?.stage ?? stage,
    rows: failure?.rows,
    name: isError ? original.name : 'Error',
    message: isError ? original.message : String(original),
    code: isError ? original.code : undefined,
    stack: isError ? original.stack : undefined,
  };
}

/** A read function's output as blocks: consecutive single rows are gathered. */
async function* readBlocks(read: UdfSpec, args: unknown[]): AsyncGenerator<Block> {
  const fn = (await loadUdf(read.descriptor)) as (...a: unknown[]) => unknown;
  let rows: Row[] = [];
  for await (const item of iterateReadResult((await fn(...args)) as never)) {
    if (Array.isArray(item)) {
      if (rows.length) yield rowsToBlock(rows.splice(0));
      if (item.length) yield rowsToBlock(item);
    } else if (typeof (item as Block).numRows === 'number' && (item as Block).schema) {
      if (rows.length) yield rowsToBlock(rows.splice(0));
      yield item as Block;
    } else {
      rows.push(item as Row);
      if (rows.length >= 4096) yield rowsToBlock(rows.splice(0));
    }
  }
  if (rows.length) yield rowsToBlock(rows);
}

/**
 * Bytes a block takes in the store, at most: its buffers, each padded to 8 bytes, plus the Arrow
 * IPC messages that describe them (a schema, one message per batch) and the store's own header
 * and alignment. The budget counts this, so that blocks of many columns are not undercounted.
 */
export function storedBytes(block: Block): number {
  let nodes = 0;
  const count = (data: { children: readonly unknown[]; dictionary?: { data: readonly unknown[] } }) => {
    nodes++;
    for (const child of data.children) count(child as never);
    for (const chunk of data.dictionary?.data ?? []) count(chunk as never);
  };
  let padding = 0;
  for (const batch of block.batches) {
    count(batch.data as never);
    padding += 256;
  }
  return blockBytes(block) + 1024 + padding + 256 * nodes;
}

/** Stores blocks toward the target size: large ones split, small consecutive ones joined. */
export async function storeBlocks(stream: AsyncIterable<Block>, targets: TaskTargets, out: BlockOut[], call?: CallScope): Promise<void> {
  let pending: Block[] = [];
  let pendingBytes = 0;
  const flush = () => {
    if (pending.length === 0) return;
    const block = concatBlocks(pending);
    out.push({ ref: currentRuntime().put(block, call) as ObjectRef<Block>, rows: block.numRows, bytes: storedBytes(block) });
    pending = [];
    pendingBytes = 0;
  };
  for await (const produced of stream) {
    for (const piece of splitBySize(produced, targets.maxBlockBytes)) {
      if (piece.numRows === 0) continue;
      const bytes = blockBytes(piece);
      if (pending.length && (pendingBytes + bytes > targets.maxBlockBytes || String(pending[0].schema) !== String(piece.schema))) flush();
      pending.push(piece);
      pendingBytes += bytes;
      if (pendingBytes >= targets.minBlockBytes) flush();
    }
  }
  flush();
}

async function runToBlocks(
  input: AsyncIterable<Block>,
  stages: LoadedStage[],
  targets: TaskTargets,
  firstStage: string,
  write: FusedWrite | null,
  call?: CallScope,
): Promise<Pick<TaskResult, 'blocks' | 'error' | 'written'>> {
  let output: Block[] | undefined;
  const stored: BlockOut[] = [];
  try {
    if (!write) {
      await storeBlocks(runStages(input, stages), targets, stored, call);
      return { blocks: stored };
    }
    output = [];
    for await (const block of runStages(input, stages)) output.push(block);
  } catch (error) {
    // Blocks stored before the failure never reach the driver: let them go now.
    for (const block of stored) block.ref[Symbol.dispose]();
    return { blocks: [], error: describeError(error, firstStage) };
  }
  try {
    const sink = await reviveInstance<Datasink>(write.sink);
    const rows = output.reduce((sum, block) => sum + block.numRows, 0);
    const result = rows > 0 ? await writeThrough(sink, output, write.context, write.checkpoint) : undefined;
    return { blocks: [], written: { result, rows } };
  } catch (error) {
    return { blocks: [], error: describeError(error, `Write(${write.sink.descriptor.name})`) };
  }
}

export function inputSize(blocks: Block[]): { rowsIn: number; bytesIn: number } {
  let rowsIn = 0;
  let bytesIn = 0;
  for (const block of blocks) {
    rowsIn += block.numRows;
    bytesIn += blockBytes(block);
  }
  return { rowsIn, bytesIn };
}

/** A task-pool data task: a read or input blocks, through fused function stages. */
export const dataTask = remote(import.meta, async function trellisDataTask(
  input: TaskInput,
  stages: StageSpec[],
  targets: TaskTargets,
  write: FusedWrite | null,
  ...blocks: Block[]
): Promise<TaskResult> {
  let loaded: LoadedStage[];
  try {
    loaded = await Promise.all(stages.map((stage) => loadStage(stage)));
  } catch (error) {
    return { blocks: [], rowsIn: 0, bytesIn: 0, error: describeError(error, stages[0]?.name ?? 'Read') };
  }
  if (input.kind === 'read') {
    let rowsIn = 0;
    let bytesIn = 0;
    const rowIds = input.rowIds;
    const counted = async function* () {
      for await (const read of readBlocks(input.read, input.args)) {
        const first = rowsIn;
        const block = rowIds ? withRowIds(read, rowIds.column, Array.from({ length: read.numRows }, (_, row) => `${rowIds.key}:${first + row}`), rowIds.key) : read;
        rowsIn += block.numRows;
        bytesIn += blockBytes(block);
        yield block;
      }
    };
    const result = await runToBlocks(counted(), loaded, targets, 'Read', write);
    afterReply(result.blocks, targets);
    return { ...result, rowsIn, bytesIn };
  }
  applySlices(blocks, input.slices);
  const size = inputSize(blocks);
  const result = await runToBlocks(fromBlocks(blocks), loaded, targets, stages[0]?.name ?? 'Map', write);
  blocks.length = 0;
  afterReply(result.blocks, targets);
  return { ...result, ...size };
});

/**
 * The actor of an actor pool: start() builds the user's class once (loading the model), then
 * process() runs batches through it and any function stages fused after it.
 */
export class DataPoolActor {
  #stages: LoadedStage[] = [];
  #instance: unknown;

  async start(classStage: StageSpec, following: StageSpec[]): Promise<{ pid: number }> {
    const instance = await constructStageInstance(classStage);
    this.#instance = instance;
    this.#stages = [await loadStage(classStage, instance), ...(await Promise.all(following.map((stage) => loadStage(stage))))];
    return { pid: process.pid };
  }

  async process(targets: TaskTargets, write: FusedWrite | null, slices: BlockSlices, ...blocks: Block[]): Promise<TaskResult> {
    // Taken before any await: the blocks it stores are named from this call, so that a rerun
    // (lineage) makes them again under the same ids though other calls run meanwhile.
    const call = currentRuntime().currentCall?.();
    applySlices(blocks, slices);
    const size = inputSize(blocks);
    const result = await runToBlocks(fromBlocks(blocks), this.#stages, targets, this.#stages[0]?.spec.name ?? 'MapBatches', write, call);
    blocks.length = 0;
    afterReply(result.blocks, targets);
    const metrics = metricsOf(this.#instance);
    return { ...result, ...size, ...(metrics ? { metrics } : {}) };
  }

  /**
   * Answers once every call before it has replied and let go of its handles: the pool calls it
   * before stopping an actor, so that what the actor's last call stored is not left counted for a
   * process that is gone.
   */
  async drain(): Promise<boolean> {
    await new Promise((resolve) => setImmediate(resolve));
    return true;
  }
}
export const RemoteDataPoolActor = remote(import.meta, DataPoolActor);

/** The pool class last built in this worker for a rerun, so that reruns in a row load it once. */
let rerunPoolActor: { key: string; actor: Promise<DataPoolActor> } | undefined;

/**
 * A pool call's output made again where its node was lost: any actor of the pool would have made
 * the same blocks, so this task builds the pool's class (once per worker) and runs the batch as
 * the call did. Run under the call's return id, its puts take the ids the call gave them.
 */
export const rerunPoolBatch = remote(import.meta, async function trellisRerunPoolBatch(
  classStage: StageSpec,
  following: StageSpec[],
  targets: TaskTargets,
  slices: BlockSlices,
  ...blocks: Block[]
): Promise<TaskResult> {
  const key = JSON.stringify([classStage, following]);
  if (rerunPoolActor?.key !== key) {
    const actor = new DataPoolActor();
    const built = { key, actor: actor.start(classStage, following).then(() => actor) };
    rerunPoolActor = built;
    // A class that failed to build is tried again by the next rerun (unless another replaced it).
    built.actor.catch(() => {
      if (rerunPoolActor === built) rerunPoolActor = undefined;
    });
  }
  return (await rerunPoolActor.actor).process(targets, null, slices, ...blocks);
});

/**
 * The counters a pool's class reports (its `metrics()`: names to cumulative numbers), finite ones
 * only; a method that throws or answers otherwise reports nothing rather than fail the batch.
 */
function metricsOf(instance: unknown): Record<string, number> | undefined {
  const method = (instance as { metrics?: unknown } | undefined)?.metrics;
  if (typeof method !== 'function') return undefined;
  try {
    const reported: unknown = method.call(instance);
    if (typeof reported !== 'object' || reported === null) return undefined;
    const metrics: Record<string, number> = {};
    for (const [name, value] of Object.entries(reported)) if (typeof value === 'number' && Number.isFinite(value)) metrics[name] = value;
    return metrics;
  } catch {
    return undefined;
  }
}

export interface WriteResult {
  result?: unknown;
  rows: number;
  bytes: number;
  error?: StageErrorInfo;
}

/** A write task: the sink, rebuilt from its fields, writes its blocks. */
export const writeTask = remote(import.meta, async function trellisWriteTask(
  sink: ShippedInstance,
  context: WriteContext,
  checkpoint: CheckpointTarget | null,
  targets: TaskTargets,
  slices: BlockSlices,
  ...blocks: Block[]
): Promise<WriteResult> {
  applySlices(blocks, slices);
  const size = inputSize(blocks);
  try {
    const instance = await reviveInstance<Datasink>(sink);
    const result = await writeThrough(instance, blocks, context, checkpoint);
    return { result, rows: size.rowsIn, bytes: size.bytesIn };
  } catch (error) {
    return { rows: size.rowsIn, bytes: size.bytesIn, error: describeError(error, `Write(${sink.descriptor.name})`) };
  } finally {
    blocks.length = 0;
    afterReply([], targets);
  }
});

/** Repartition: joins slices of several blocks into one. `slices[i]` is [offset, length] of blocks[i]. */
export const sliceTask = remote(import.meta, async function trellisSliceTask(
  slices: Array<[number, number]>,
  targets: TaskTargets,
  ...blocks: Block[]
): Promise<TaskResult> {
  const size = inputSize(blocks);
  const pieces = blocks.map((block, index) => block.slice(slices[index][0], slices[index][0] + slices[index][1]));
  const joined = concatBlocks(pieces);
  const out = { ref: put(joined) as ObjectRef<Block>, rows: joined.numRows, bytes: storedBytes(joined) };
  blocks.length = 0;
  afterReply([out], targets);
  return { blocks: [out], ...size };
});
