/**
 * What runs in workers for sort, randomShuffle, groupBy().mapGroups() and aggregations: the
 * exchange's sample, map and reduce tasks, and the aggregate's partial, merge and final tasks.
 * Registered at this module's top level so that any worker finds them. Failures come back as
 * values (located by stage and rows where a user function threw), as data tasks' do.
 */
import { Table, tableFromIPC, tableToIPC, type Field, type Vector } from 'apache-arrow';
import { put } from '../core/api.js';
import { remote } from '../core/registry.js';
import type { ObjectRef } from '../core/object-ref.js';
import { finalizeAggregate, mergePartials, partialAggregate, type AggregationPlan } from './aggregate.js';
import { concatBlocks, formatBatch, tableOfVectors, toBlock, type Block } from './block.js';
import { groupsOf, joinBlocks, partitionBlock, sampleKeys, shuffleBlock, sortBlock, taskSeed, topRows, type ExchangeSpec, type Reduction } from './exchange.js';
import type { SortKey } from './keys.js';
import { loadStage, StageFailure } from './stages.js';
import {
  afterReply, applySlices, describeError, inputSize, storeBlocks, storedBytes, type BlockOut, type BlockSlices, type StageErrorInfo, type TaskResult, type TaskTargets,
} from './worker-tasks.js';

export interface SampleResult {
  samples: unknown[][];
  error?: StageErrorInfo;
}

/** The map side's output: one stored part per partition (null where it has no rows). */
export interface PartsResult {
  parts: Array<BlockOut | null>;
  /** A join's input: its blocks' schema (an empty Arrow IPC stream), for the partitions it has no rows in. */
  schema?: Uint8Array;
  rowsIn: number;
  bytesIn: number;
  error?: StageErrorInfo;
}

/** A sort's sample: up to `perBlock` key tuples of each block. */
export const exchangeSampleTask = remote(import.meta, async function trellisExchangeSample(
  keys: SortKey[],
  perBlock: number,
  slices: BlockSlices,
  targets: TaskTargets,
  ...blocks: Block[]
): Promise<SampleResult> {
  applySlices(blocks, slices);
  try {
    return { samples: blocks.flatMap((block) => sampleKeys(block, keys, perBlock)) };
  } catch (error) {
    return { samples: [], error: describeError(error, 'Sort') };
  } finally {
    blocks.length = 0;
    afterReply([], targets);
  }
});

/** The map side: every block cut into `partitions` parts; a partition's parts from all blocks are stored as one. */
export const exchangeMapTask = remote(import.meta, async function trellisExchangeMap(
  spec: ExchangeSpec,
  partitions: number,
  boundaries: unknown[][],
  seed: number,
  slices: BlockSlices,
  targets: TaskTargets,
  ...blocks: Block[]
): Promise<PartsResult> {
  applySlices(blocks, slices);
  const size = inputSize(blocks);
  const stored: Array<BlockOut | null> = [];
  try {
    const pieces: Block[][] = Array.from({ length: partitions }, () => []);
    blocks.forEach((block, index) => {
      partitionBlock(block, spec, partitions, boundaries, taskSeed(seed, index, 0)).forEach((part, partition) => {
        if (part) pieces[partition].push(part);
      });
    });
    for (const partition of pieces) {
      if (partition.length === 0) {
        stored.push(null);
        continue;
      }
      const block = concatBlocks(partition);
      stored.push({ ref: put(block) as ObjectRef<Block>, rows: block.numRows, bytes: storedBytes(block) });
    }
    const schema = spec.kind === 'hash' && blocks.length > 0 ? tableToIPC(new Table(blocks[0].schema)) : undefined;
    return { parts: stored, ...size, ...(schema ? { schema } : {}) };
  } catch (error) {
    for (const part of stored) part?.ref[Symbol.dispose]();
    return { parts: [], ...size, error: describeError(error, spec.kind === 'sort' ? 'Sort' : spec.kind === 'shuffle' ? 'RandomShuffle' : spec.kind === 'hash' ? 'Join' : 'MapGroups') };
  } finally {
    blocks.length = 0;
    afterReply(
      stored.filter((part): part is BlockOut => part !== null),
      targets,
    );
  }
});

/**
 * The reduce side of a join: the partition's first `leftParts` parts are the left's, the rest the
 * right's; a side without rows here is an empty block of its schema.
 */
export const exchangeJoinTask = remote(import.meta, async function trellisExchangeJoin(
  spec: Extract<ExchangeSpec, { kind: 'join' }>,
  schemas: [Uint8Array | null, Uint8Array | null],
  leftParts: number,
  targets: TaskTargets,
  ...parts: Block[]
): Promise<TaskResult> {
  return storeOutput(parts, targets, 'Join', (input) => {
    const side = (blocks: Block[], schema: Uint8Array | null) => (blocks.length > 0 ? concatBlocks(blocks) : schema ? tableFromIPC(schema) : new Table());
    return [joinBlocks(side(input.slice(0, leftParts), schemas[0]), side(input.slice(leftParts), schemas[1]), spec)];
  });
});

/** The groups of a partition through the user's function, one call per group. */
async function* mapGroups(spec: Extract<ExchangeSpec, { kind: 'mapGroups' }>, joined: Block): AsyncGenerator<Block> {
  const stage = await loadStage(spec.stage);
  const { sorted, ranges } = groupsOf(joined, spec.keys);
  for (const [start, end] of ranges) {
    let result: unknown;
    try {
      result = await stage.call(formatBatch(sorted.slice(start, end), spec.stage.batchFormat ?? 'columns'), ...spec.stage.fnArgs);
      if (result === undefined || result === null) throw new TypeError(`${spec.stage.name} returned ${result}; return a batch (rows, columns or an Arrow table)`);
    } catch (error) {
      throw new StageFailure(spec.stage.name, [start, end], error);
    }
    const block = toBlock(result, spec.stage.name);
    if (block.numRows > 0) yield block;
  }
}

/** The reduce side: a partition's parts joined, then sorted, shuffled, or its groups mapped. */
export const exchangeReduceTask = remote(import.meta, async function trellisExchangeReduce(
  spec: ExchangeSpec,
  seed: number,
  targets: TaskTargets,
  ...parts: Block[]
): Promise<TaskResult> {
  const stage = spec.kind === 'mapGroups' ? spec.stage.name : spec.kind === 'sort' ? 'Sort' : 'RandomShuffle';
  return storeOutput(parts, targets, stage, (input) => {
    const joined = concatBlocks(input);
    if (spec.kind === 'sort') return [sortBlock(joined, spec.keys)];
    if (spec.kind === 'shuffle') return [shuffleBlock(joined, seed)];
    if (spec.kind === 'mapGroups') return mapGroups(spec, joined);
    throw new Error(`a ${spec.kind} exchange reduces through its own task`);
  });
});

/**
 * An aggregation's step: 'partial' turns input blocks into one partial block, 'merge' folds
 * partial blocks into one, 'final' folds them and makes the result's rows.
 */
export const aggregateTask = remote(import.meta, async function trellisAggregate(
  reduction: Reduction,
  step: 'partial' | 'merge' | 'final',
  slices: BlockSlices,
  targets: TaskTargets,
  ...blocks: Block[]
): Promise<TaskResult> {
  applySlices(blocks, slices);
  if (reduction.kind === 'topk') return storeOutput(blocks, targets, 'TopK', (input) => [topRows(input, reduction.keys, reduction.rows)]);
  const { plan } = reduction;
  return storeOutput(blocks, targets, 'Aggregate', (input) => {
    const partials = step === 'partial' ? input.map((block) => partialAggregate(block, plan)) : input;
    const merged = partials.length === 1 && step === 'partial' ? partials[0] : mergePartials(partials, plan);
    // A global aggregation of nothing still has its one row; a grouped one has no rows.
    if (step === 'final') return [finalizeAggregate(merged, plan)];
    return merged ? [merged] : [];
  });
});

/** zip(): a range of rows of both sides (the first `leftCount` blocks the left's), columns side by side. */
export const zipTask = remote(import.meta, async function trellisZip(
  leftCount: number,
  suffix: string,
  slices: BlockSlices,
  targets: TaskTargets,
  ...blocks: Block[]
): Promise<TaskResult> {
  applySlices(blocks, slices);
  return storeOutput(blocks, targets, 'Zip', (input) => {
    const left = concatBlocks(input.slice(0, leftCount));
    const right = concatBlocks(input.slice(leftCount));
    const columns: Record<string, Vector> = {};
    const fields = new Map<string, Field>();
    for (const field of left.schema.fields) {
      columns[field.name] = left.getChild(field.name)!;
      fields.set(field.name, field);
    }
    for (const field of right.schema.fields) {
      let name = field.name;
      while (name in columns) name = `${name}${suffix}`;
      columns[name] = right.getChild(field.name)!;
      fields.set(name, field);
    }
    return [tableOfVectors(columns, fields)];
  });
});

/**
 * What `make` yields from a task's input blocks, stored toward the block size targets. A failure
 * comes back as a value, with nothing it stored left behind.
 */
async function storeOutput(blocks: Block[], targets: TaskTargets, stage: string, make: (input: Block[]) => Iterable<Block> | AsyncIterable<Block>): Promise<TaskResult> {
  const size = inputSize(blocks);
  const input = [...blocks];
  blocks.length = 0;
  const stored: BlockOut[] = [];
  try {
    const output = make(input);
    await storeBlocks(
      Symbol.asyncIterator in output
        ? output
        : (async function* () {
            yield* output;
          })(),
      targets,
      stored,
    );
    return { blocks: stored, ...size };
  } catch (error) {
    for (const block of stored) block.ref[Symbol.dispose]();
    stored.length = 0;
    return { blocks: [], ...size, error: describeError(error, stage) };
  } finally {
    input.length = 0;
    afterReply(stored, targets);
  }
}
