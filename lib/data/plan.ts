/**
 * A dataset's logical plan (what the user asked for) and its physical plan (what runs): adjacent
 * function stages fuse into the read or task before them; a class stage gets an actor pool, with
 * the function stages after it fused into its calls; limit, repartition, the all-to-all exchanges
 * (sort, shuffle, mapGroups), aggregations and write are operators of their own.
 */
import type { ObjectRef } from '../core/object-ref.js';
import type { Block, BlockMetadata } from './block.js';
import type { AggregationPlan } from './aggregate.js';
import type { Datasink, Datasource } from './datasource.js';
import type { ExchangeSpec, Reduction } from './exchange.js';
import type { StageSpec } from './stages.js';
import { workerEnvironmentOf, type WorkerRuntimeEnvironment } from '../core/options.js';

export interface InputBlock {
  ref: ObjectRef<Block>;
  meta: BlockMetadata;
  /** Part of the stored block: [offset, rows]. Batches are cut exactly this way, without copies. */
  slice?: [number, number];
  /** A leading part whose stored block goes on in a later unit (progress counts the block once). */
  continued?: true;
}

/** Slices of a unit's blocks as a task takes them: null where every block is whole. */
export function slicesOf(blocks: readonly InputBlock[]): Array<[number, number] | null> | null {
  return blocks.some((block) => block.slice) ? blocks.map((block) => block.slice ?? null) : null;
}

/** Resources and scheduling of the tasks or actors an operator starts. */
export interface ComputeOptions {
  numCpus?: number;
  numGpus?: number;
  memory?: number;
  resources?: Record<string, number>;
  /** Function stages: at most this many tasks at once. */
  concurrency?: number;
  /** Environment variables of the workers (or actors) that run the stage. */
  runtimeEnv?: WorkerRuntimeEnvironment;
}

export interface ActorPoolOptions {
  min: number;
  max: number;
  maxTasksInFlightPerActor: number;
  /** Batches one actor works on at once. */
  maxConcurrency: number;
  /** How long an actor's constructor may take before the job fails (ms). */
  startTimeoutMs: number;
  /** An actor idle this long above the pool's minimum is stopped (ms). */
  idleTimeoutMs: number;
}

/**
 * What a stage that only selects, drops or renames columns does (rows and values untouched): a row
 * filter after it can run before it instead, on the columns' names there.
 */
export type ColumnsOnly = { keep: readonly string[] } | { drop: readonly string[] } | { rename: Readonly<Record<string, string>> };

export type LogicalOperator =
  | { op: 'read'; datasource: Datasource; parallelism?: number; compute: ComputeOptions; rowIds?: string }
  | { op: 'input'; name: string; blocks: InputBlock[] }
  | { op: 'stage'; stage: StageSpec; compute: ComputeOptions; pool?: ActorPoolOptions; columnsOnly?: ColumnsOnly }
  | { op: 'repartition'; numBlocks: number }
  | { op: 'exchange'; name: string; exchange: ExchangeSpec; numBlocks?: number; inputs?: Array<readonly LogicalOperator[]> }
  | { op: 'aggregate'; name: string; plan: AggregationPlan }
  | { op: 'union'; inputs: Array<readonly LogicalOperator[]> }
  | { op: 'zip'; inputs: Array<readonly LogicalOperator[]>; suffix: string }
  | { op: 'limit'; rows: number };

export type PhysicalOperatorSpec =
  | { kind: 'input'; name: string; blocks: InputBlock[] }
  | { kind: 'read'; name: string; datasource: Datasource; parallelism?: number; stages: StageSpec[]; compute: ComputeOptions; sink?: Datasink; rowIds?: string }
  | { kind: 'task-map'; name: string; stages: StageSpec[]; compute: ComputeOptions; bundleRows?: number; sink?: Datasink }
  | { kind: 'actor-map'; name: string; classStage: StageSpec; following: StageSpec[]; compute: ComputeOptions; pool: ActorPoolOptions; bundleRows?: number; sink?: Datasink }
  | { kind: 'repartition'; name: string; numBlocks: number }
  | { kind: 'exchange'; name: string; exchange: ExchangeSpec; numBlocks?: number; inputs?: PhysicalOperatorSpec[][] }
  | { kind: 'aggregate'; name: string; reduction: Reduction }
  | { kind: 'union'; name: string; inputs: PhysicalOperatorSpec[][] }
  | { kind: 'zip'; name: string; inputs: PhysicalOperatorSpec[][]; suffix: string }
  | { kind: 'limit'; name: string; rows: number }
  | { kind: 'write'; name: string; sink: Datasink; compute: ComputeOptions };

/** Resources as tasks get them: defaults filled in, so `{ numCpus: 1 }` and `{}` are the same. */
function normalCompute(compute: ComputeOptions): string {
  const resources = Object.entries(compute.resources ?? {}).filter(([, amount]) => amount > 0).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return JSON.stringify([compute.numCpus ?? 1, compute.numGpus ?? 0, compute.memory ?? 0, resources, compute.concurrency ?? null, environmentKey(compute)]);
}

/** Stages run in one process only where they run with the same environment variables. */
function environmentKey(compute: ComputeOptions): string {
  return workerEnvironmentOf(compute.runtimeEnv, 'runtimeEnv').key;
}

function sameCompute(a: ComputeOptions, b: ComputeOptions): boolean {
  return normalCompute(a) === normalCompute(b);
}

function fusedName(head: string, stages: readonly StageSpec[]): string {
  return [head, ...stages.map((stage) => stage.name)].filter(Boolean).join('->');
}

/** The physical operators for a chain of logical ones, fusing what can run in one process. */
export function planPhysical(logical: readonly LogicalOperator[], sink?: Datasink): PhysicalOperatorSpec[] {
  const physical: PhysicalOperatorSpec[] = [];
  for (const operator of logical) {
    const last = physical[physical.length - 1];
    if (operator.op === 'read') {
      physical.push({ kind: 'read', name: `Read${operator.datasource.name}`, datasource: operator.datasource, parallelism: operator.parallelism, stages: [], compute: operator.compute, ...(operator.rowIds ? { rowIds: operator.rowIds } : {}) });
    } else if (operator.op === 'input') {
      physical.push({ kind: 'input', name: operator.name, blocks: operator.blocks });
    } else if (operator.op === 'stage') {
      const stage = operator.stage;
      if (stage.udf.kind === 'class') {
        physical.push({
          kind: 'actor-map', name: stage.name, classStage: stage, following: [], compute: operator.compute, pool: operator.pool!, bundleRows: stage.batchSize,
        });
        continue;
      }
      // A function stage joins the operator before it when it runs with the same resources; a
      // batch stage with a batch size joins only a read (whose task sees the whole read), since
      // blocks bundled for it are sized by its batch size.
      const batchSized = stage.kind === 'mapBatches' && stage.batchSize !== undefined;
      if (last?.kind === 'read' && sameCompute(last.compute, operator.compute)) {
        last.stages.push(stage);
        last.name = fusedName(`Read${last.datasource.name}`, last.stages);
      } else if (last?.kind === 'task-map' && sameCompute(last.compute, operator.compute) && !batchSized) {
        last.stages.push(stage);
        last.name = fusedName('', last.stages);
      } else if (last?.kind === 'actor-map' && !batchSized && environmentKey(last.compute) === environmentKey(operator.compute)) {
        last.following.push(stage);
        last.name = fusedName(last.classStage.name, last.following);
      } else {
        physical.push({ kind: 'task-map', name: stage.name, stages: [stage], compute: operator.compute, bundleRows: stage.batchSize });
      }
    } else if (operator.op === 'repartition') {
      physical.push({ kind: 'repartition', name: `Repartition(${operator.numBlocks})`, numBlocks: operator.numBlocks });
    } else if (operator.op === 'exchange') {
      // A join's two inputs are planned on their own, as a union's are.
      const inputs = operator.inputs?.map((input) => planPhysical(input));
      physical.push({ kind: 'exchange', name: operator.name, exchange: operator.exchange, numBlocks: operator.numBlocks, ...(inputs ? { inputs } : {}) });
    } else if (operator.op === 'aggregate') {
      physical.push({ kind: 'aggregate', name: operator.name, reduction: { kind: 'aggregate', plan: operator.plan } });
    } else if (operator.op === 'zip') {
      physical.push({ kind: 'zip', name: 'Zip', inputs: operator.inputs.map((input) => planPhysical(input)), suffix: operator.suffix });
    } else if (operator.op === 'union') {
      // Each input is planned (and fused) on its own; what follows the union runs on its output.
      physical.push({ kind: 'union', name: `Union(${operator.inputs.length})`, inputs: operator.inputs.map((input) => planPhysical(input)) });
    } else {
      // A sort that feeds a limit keeps only the top rows as blocks arrive (bounded memory, no
      // exchange); the limit stays, as a no-op on what already fits.
      if (last?.kind === 'exchange' && last.exchange.kind === 'sort' && !last.inputs && operator.rows > 0) {
        physical[physical.length - 1] = { kind: 'aggregate', name: `TopK(${operator.rows}, ${last.name})`, reduction: { kind: 'topk', keys: last.exchange.keys, rows: operator.rows } };
      }
      // Two limits in a row keep the smaller.
      if (last?.kind === 'limit') {
        last.rows = Math.min(last.rows, operator.rows);
        last.name = `Limit(${last.rows})`;
      }
      else physical.push({ kind: 'limit', name: `Limit(${operator.rows})`, rows: operator.rows });
    }
  }
  if (sink) {
    // The write joins the operator that makes its blocks (as Ray fuses it): the blocks go from
    // the stage straight to the sink in one process, never through the store, and an actor pool
    // holding every CPU cannot starve separate write tasks.
    const last = physical[physical.length - 1];
    // A sink that wants a number of rows per write gathers blocks from several tasks: its own operator.
    if (last && sink.minRowsPerWrite === undefined && (last.kind === 'read' || last.kind === 'task-map' || last.kind === 'actor-map')) {
      last.sink = sink;
      last.name = `${last.name}->Write(${sink.name})`;
    } else {
      physical.push({ kind: 'write', name: `Write(${sink.name})`, sink, compute: {} });
    }
  }
  return physical;
}

export function describeLogical(operator: LogicalOperator): string {
  switch (operator.op) {
    case 'read':
      return `Read${operator.datasource.name}${operator.parallelism ? ` [parallelism ${operator.parallelism}]` : ''}`;
    case 'input':
      return `${operator.name} [${operator.blocks.length} blocks]`;
    case 'stage': {
      const stage = operator.stage;
      const details = [
        stage.batchSize ? `batchSize ${stage.batchSize}` : '',
        stage.kind === 'mapBatches' && stage.batchFormat ? `format ${stage.batchFormat}` : '',
        operator.pool ? `actors ${operator.pool.min}..${operator.pool.max}` : '',
        operator.compute.numGpus ? `numGpus ${operator.compute.numGpus}` : '',
      ].filter(Boolean);
      return `${stage.name}${details.length ? ` [${details.join(', ')}]` : ''}`;
    }
    case 'repartition':
      return `Repartition(${operator.numBlocks})`;
    case 'exchange':
      return `${operator.name}${operator.numBlocks ? ` [${operator.numBlocks} blocks]` : ''}${operator.inputs ? ` of ${describeInputs(operator.inputs)}` : ''}`;
    case 'aggregate':
      return operator.name;
    case 'zip':
      return `Zip of ${describeInputs(operator.inputs)}`;
    case 'union':
      return `Union of ${operator.inputs.length}: ${describeInputs(operator.inputs)}`;
    case 'limit':
      return `Limit(${operator.rows})`;
  }
}

function describeInputs(inputs: ReadonlyArray<readonly LogicalOperator[]>): string {
  return inputs.map((input) => `[${input.map(describeLogical).join(' -> ')}]`).join(', ');
}
