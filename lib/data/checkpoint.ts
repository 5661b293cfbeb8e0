/**
 * Resumable writes. A write with `checkpoint: { idColumn }` records the ids of the rows each of
 * its write tasks wrote, one small Arrow file per task, as the task's last step. A later run of
 * the same job reads the records, puts their ids in the object store, and drops rows with those
 * ids right after the read, before any model sees them: a job killed at any point (its driver, a
 * host, the whole cluster) resumes with only what it had not written.
 *
 * The record is a write's commit point. A sink that stages its output in write() and publishes it
 * in commit() (the file sinks) writes every row exactly once: a run that stopped between the record
 * and the publish has the publish finished by recover() when the job resumes, and output staged
 * but never recorded is left unpublished. Any other sink writes every row at least once (a write
 * made but not yet recorded is made again).
 */
import { createHash } from 'node:crypto';
import { deserialize, serialize } from 'node:v8';
import { RecordBatch, Schema, Table, tableFromIPC, tableToIPC } from 'apache-arrow';
import { get, put } from '../core/api.js';
import { hostIdentity } from '../core/host.js';
import { fileSystemFor, paths, urlScheme, type FileSystem } from './filesystem/file-system.js';
import { processAlive } from '../process-exit.js';
import type { ObjectRef } from '../core/object-ref.js';
import { descriptorOf, lookupRegistered, remote } from '../core/registry.js';
import { isLibraryModule } from '../core/code-location.js';
import { DataError, InvalidArgumentError } from '../errors.js';
import { takeRows, type Block } from './block.js';
import type { Datasink, WriteContext } from './datasource.js';
import type { LogicalOperator } from './plan.js';
import type { StageSpec } from './stages.js';
import { resolveUdf } from './udf.js';
import { WrittenIds, concatIds, idCount, idValuesOf, idsToVector, storedIdSet, type IdValues } from './written-ids.js';

/** `write(sink, { checkpoint })`: how a write records what it wrote, and resumes. */
export interface CheckpointOptions {
  /**
   * A column whose values name each row uniquely and stably across runs (integers or strings),
   * present at the read and kept through every stage to the sink.
   */
  idColumn: string;
  /**
   * The checkpoint's directory, reachable at the same path from every host that writes (as a file
   * sink's directory is). Default for the file sinks: `.trellis-checkpoint` in the output
   * directory; a custom sink must name one.
   */
  path?: string;
  /** Removes the checkpoint once the job succeeds (default true): a new run starts afresh. */
  deleteOnSuccess?: boolean;
  /**
   * Names the job's version. By default the checkpoint remembers the job's steps (each function's
   * code and arguments, the sink) and refuses to resume a job whose steps changed, as its earlier
   * output would not match the new; a fingerprint of your own replaces that check.
   */
  fingerprint?: string;
}

/** What a write task needs to record its write: travels with the task. */
export interface CheckpointTarget {
  path: string;
  idColumn: string;
  /** Where the checkpoint is, for a URL (resolved in the driver; write tasks carry it). */
  filesystem?: FileSystem;
  /** The sink stages in write() and publishes in commit(). */
  staged: boolean;
}

/** What a resumed job found: in `stats().checkpoint`. */
export interface CheckpointStats {
  path: string;
  /** Rows earlier runs wrote, skipped by this one. */
  resumedRows: number;
  /** Write tasks of earlier runs whose output stands. */
  resumedWrites: number;
}

const RESULT_KEY = 'trellis.result';
const MANIFEST = 'manifest.json';
const LOCK = 'lock';
const RECORDS = 'records';
/** A lock whose heartbeat is older than this is taken over (its driver is gone). */
const LOCK_STALE_MS = 30_000;
const HEARTBEAT_MS = 5_000;

function checkpointError(message: string, code = 'ERR_DATA_CHECKPOINT'): DataError {
  return new DataError(code, message);
}

// ---------------------------------------------------------------------------------------------
// Workers: the filter after the read, and the record after a write

/**
 * A resumed job's filter: rows whose ids an earlier run wrote are dropped. `optional`: the first
 * one, at the read, lets rows through whose id column a later stage makes.
 */
export const skipWritten = remote(import.meta, async function trellisSkipWritten(batch: Block, ids: ObjectRef<Block>, idColumn: string, optional: boolean): Promise<Block> {
  if (batch.numRows === 0 || (optional && !batch.getChild(idColumn))) return batch;
  // Read per batch (zero-copy, no sorting: the driver stored it sorted): a view kept across tasks
  // would pin the set in the store after the job lets it go.
  const set = WrittenIds.fromBlock(await get(ids));
  const mask = set.written(idValuesOf(batch, idColumn, 'resuming from a checkpoint'), 'resuming from a checkpoint');
  let kept = 0;
  for (let row = 0; row < mask.length; row++) kept += 1 - mask[row];
  if (kept === batch.numRows) return batch;
  const indices = new Int32Array(kept);
  for (let row = 0, at = 0; row < mask.length; row++) if (!mask[row]) indices[at++] = row;
  return takeRows(batch, indices);
});

function recordName(context: WriteContext): string {
  return `${context.writeId}_${String(context.taskIndex).padStart(6, '0')}.arrow`;
}

/**
 * Records a write: the ids of the rows it wrote, and what write() returned (kept for the results
 * a resumed job returns). Named by the task, so that a retried task replaces its own record.
 */
export async function recordWrite(target: CheckpointTarget, blocks: readonly Block[], result: unknown, context: WriteContext): Promise<void> {
  const ids = concatIds(blocks.map((block) => idValuesOf(block, target.idColumn, 'writing with a checkpoint')), 'writing with a checkpoint');
  if (!ids) return;
  let encoded: string | undefined;
  try {
    encoded = Buffer.from(serialize(result)).toString('base64');
  } catch {
    // A result that cannot be cloned comes back as undefined when the job resumes.
    encoded = undefined;
  }
  const table = new Table({ id: idsToVector(ids) });
  const schema = new Schema(table.schema.fields, new Map(encoded === undefined ? [] : [[RESULT_KEY, encoded]]));
  const withResult = new Table(schema, table.batches.map((batch) => new RecordBatch(schema, batch.data)));
  const directory = paths.join(target.path, RECORDS);
  const storage = fileSystemFor(directory, target.filesystem);
  await storage.makeDirectory(directory);
  await storage.writeFileDurably(paths.join(directory, recordName(context)), tableToIPC(withResult, 'file'));
}

/** A sink's write() with its checkpoint: the write, its record, then (staged sinks) its publish. */
export async function writeThrough(sink: Datasink, blocks: Block[], context: WriteContext, target: CheckpointTarget | null | undefined): Promise<unknown> {
  const result = await sink.write(blocks, context);
  if (!target) return result;
  await recordWrite(target, blocks, result, context);
  return context.staged && sink.commit ? sink.commit(result, context) : result;
}

// ---------------------------------------------------------------------------------------------
// The driver: the plan's fingerprint, the lock, recovery and the resumed job's filter

interface PlanStep {
  name: string;
  hash: string;
}

function hashOf(text: string): string {
  return createHash('sha256').update(text).digest('hex').slice(0, 16);
}

function stableJson(value: unknown): string {
  return JSON.stringify(value, (key, item: unknown) => {
    // Where a function's module lies is not what it does: a moved checkout runs the same job.
    if (key === 'module') return undefined;
    if (typeof item === 'bigint') return `${item}n`;
    if (item && typeof item === 'object' && 'id' in item && item.constructor?.name === 'ObjectRef') return 'ObjectRef';
    if (ArrayBuffer.isView(item)) return hashOf(Buffer.from(item.buffer, item.byteOffset, item.byteLength).toString('base64'));
    return item;
  }) ?? 'undefined';
}

/** A user's code changes what a step makes; trellis's own built-ins are named by their arguments. */
function codeOf(descriptor: { module: string; name: string }): string {
  if (isLibraryModule(descriptor.module)) return descriptor.name;
  const registered = lookupRegistered(descriptor as never);
  return registered ? String(registered) : descriptor.name;
}

function stepsOf(plan: readonly LogicalOperator[], sink: Datasink | undefined, idColumn: string): PlanStep[] {
  const steps: PlanStep[] = [];
  const visit = (operators: readonly LogicalOperator[]): void => {
    for (const operator of operators) {
      switch (operator.op) {
        case 'read':
        case 'input':
        case 'repartition':
          // The input may grow between runs; block sizes change nothing a sink writes.
          break;
        case 'stage': {
          const stage = operator.stage;
          steps.push({
            name: stage.name,
            hash: hashOf([stage.kind, codeOf(stage.udf.descriptor), stage.udf.method ?? '', stableJson(stage.fnArgs), stableJson(stage.constructorArgs ?? null), String(stage.batchSize ?? ''), stage.batchFormat ?? ''].join('\u0000')),
          });
          break;
        }
        case 'exchange':
          if (operator.inputs) operator.inputs.forEach(visit);
          steps.push({ name: operator.name, hash: hashOf(stableJson(operator.exchange)) });
          break;
        case 'aggregate':
          steps.push({ name: operator.name, hash: hashOf(operator.name) });
          break;
        case 'union':
        case 'zip':
          operator.inputs.forEach(visit);
          steps.push({ name: operator.op, hash: hashOf(operator.op) });
          break;
        case 'limit':
          throw new InvalidArgumentError('write() with a checkpoint cannot resume a job with a limit (a resumed run would write another limit\'s worth of rows); write without the limit, or without a checkpoint', 'ERR_DATA_CHECKPOINT');
      }
    }
  };
  visit(plan);
  if (sink) {
    const descriptor = descriptorOf(sink.constructor);
    steps.push({ name: `Write(${sink.name})`, hash: hashOf(descriptor ? codeOf(descriptor) : sink.constructor.name) });
  }
  steps.push({ name: `id column '${idColumn}'`, hash: hashOf(idColumn) });
  return steps;
}

interface Manifest {
  version: 1;
  idColumn: string;
  fingerprint?: string;
  steps: PlanStep[];
  runs: Array<{ writeId: string; host: string; pid: number; startedAt: string }>;
}

function describeChange(before: readonly PlanStep[], now: readonly PlanStep[]): string {
  for (let index = 0; index < Math.max(before.length, now.length); index++) {
    const was = before[index];
    const is = now[index];
    if (!was) return `the job now has ${is.name} after its earlier steps`;
    if (!is) return `the job no longer has ${was.name}`;
    if (was.name !== is.name) return `${was.name} became ${is.name}`;
    if (was.hash !== is.hash) return `${is.name} changed (its code or arguments)`;
  }
  return 'nothing the checkpoint can name changed';
}

/** Options checked as the user gave them. */
export function checkCheckpointOptions(options: unknown, defaultPath: string | undefined): Required<Omit<CheckpointOptions, 'fingerprint'>> & { fingerprint?: string } {
  if (typeof options !== 'object' || options === null || Array.isArray(options)) {
    throw new InvalidArgumentError(`checkpoint takes { idColumn, path?, deleteOnSuccess?, fingerprint? }, got ${String(options)}`, 'ERR_DATA_CHECKPOINT');
  }
  const { idColumn, path, deleteOnSuccess, fingerprint } = options as CheckpointOptions;
  if (typeof idColumn !== 'string' || idColumn === '') throw new InvalidArgumentError(`checkpoint.idColumn must name a column, got ${String(idColumn)}`, 'ERR_DATA_CHECKPOINT');
  if (path !== undefined && (typeof path !== 'string' || path === '')) throw new InvalidArgumentError(`checkpoint.path must be a directory path, got ${String(path)}`, 'ERR_DATA_CHECKPOINT');
  const resolved = path ?? defaultPath;
  if (!resolved) throw new InvalidArgumentError('checkpoint.path is needed for a custom sink: a directory every host that writes can reach', 'ERR_DATA_CHECKPOINT');
  if (deleteOnSuccess !== undefined && typeof deleteOnSuccess !== 'boolean') throw new InvalidArgumentError(`checkpoint.deleteOnSuccess must be true or false, got ${String(deleteOnSuccess)}`, 'ERR_DATA_CHECKPOINT');
  if (fingerprint !== undefined && (typeof fingerprint !== 'string' || fingerprint === '')) throw new InvalidArgumentError(`checkpoint.fingerprint must be a non-empty string, got ${String(fingerprint)}`, 'ERR_DATA_CHECKPOINT');
  return { idColumn, path: resolved, deleteOnSuccess: deleteOnSuccess ?? true, ...(fingerprint !== undefined ? { fingerprint } : {}) };
}

/**
 * A write's checkpoint in the driver, for one run: holds the directory's lock while the job runs,
 * recovers what earlier runs recorded, and gives the job its filter.
 */
export class WriteCheckpoint implements AsyncDisposable {
  readonly path: string;
  readonly idColumn: string;
  readonly #sink: Datasink;
  readonly #deleteOnSuccess: boolean;
  /** The disk, or object storage for a URL: every file of the checkpoint goes through it. */
  readonly #storage: FileSystem;
  /** What write tasks carry for a URL (undefined for a path on disk). */
  readonly #filesystem: FileSystem | undefined;
  #heartbeat?: NodeJS.Timeout;
  #idsRef?: ObjectRef<Block>;
  #resumedRows = 0;
  #resumedResults: unknown[] = [];
  #closed = false;

  private constructor(options: { path: string; idColumn: string; deleteOnSuccess: boolean }, sink: Datasink, filesystem: FileSystem | undefined) {
    this.#filesystem = filesystem;
    this.#storage = fileSystemFor(options.path, filesystem);
    this.path = options.path;
    this.idColumn = options.idColumn;
    this.#deleteOnSuccess = options.deleteOnSuccess;
    this.#sink = sink;
  }

  /** Opens (or starts) the checkpoint of a write of `plan` through `sink`; `writeId` names this run. */
  static async open(options: unknown, sink: Datasink, plan: readonly LogicalOperator[], writeId: string, defaultPath?: string, filesystem?: FileSystem): Promise<WriteCheckpoint> {
    const checked = checkCheckpointOptions(options, defaultPath);
    const steps = stepsOf(plan, sink, checked.idColumn);
    // A URL's filesystem is resolved here, in the driver, so that write tasks carry it.
    const storage = urlScheme(checked.path) ? fileSystemFor(checked.path, filesystem?.scheme === urlScheme(checked.path) ? filesystem : undefined) : undefined;
    const checkpoint = new WriteCheckpoint(checked, sink, storage);
    await checkpoint.#storage.makeDirectory(paths.join(checkpoint.path, RECORDS));
    await checkpoint.#lock(writeId);
    try {
      await checkpoint.#checkManifest(steps, checked.fingerprint, writeId);
      await checkpoint.#recover();
    } catch (error) {
      await checkpoint.close();
      throw error;
    }
    return checkpoint;
  }

  async #lock(writeId: string): Promise<void> {
    const file = paths.join(this.path, LOCK);
    const storage = this.#storage;
    const take = () => storage.createExclusive(file, Buffer.from(JSON.stringify({ host: hostIdentity(), pid: process.pid, writeId })));
    const busy = (detail: string) => checkpointError(`checkpoint ${this.path} is in use by ${detail}: one run of a job at a time`, 'ERR_DATA_CHECKPOINT_BUSY');
    if (!(await take())) {
      // Taken: by a live run (refused), or by one that is gone (taken over).
      let holder: { host?: string; pid?: number } = {};
      let heartbeat = 0;
      try {
        holder = JSON.parse(Buffer.from(await storage.readFile(file)).toString('utf8')) as typeof holder;
        const found = await storage.stat(file);
        heartbeat = found.kind === 'file' ? (found.modifiedMs ?? 0) : 0;
      } catch {
        holder = {};
      }
      const live = holder.host === hostIdentity() ? typeof holder.pid === 'number' && processAlive(holder.pid) : Date.now() - heartbeat < LOCK_STALE_MS;
      if (live) throw busy(`a run on ${holder.host ?? 'another host'} (process ${holder.pid ?? '?'})`);
      await storage.remove(file).catch(() => undefined);
      // Taken again between our look and our write: another run got there first.
      if (!(await take())) throw busy('another run');
    }
    // Another host judges this run alive by the lock's age.
    this.#heartbeat = setInterval(() => {
      storage.touch(file).catch(() => undefined);
    }, HEARTBEAT_MS);
    this.#heartbeat.unref();
  }

  async #checkManifest(steps: PlanStep[], fingerprint: string | undefined, writeId: string): Promise<void> {
    const file = paths.join(this.path, MANIFEST);
    let manifest: Manifest | undefined;
    try {
      manifest = JSON.parse(Buffer.from(await this.#storage.readFile(file)).toString('utf8')) as Manifest;
    } catch (error) {
      const code = (error as { code?: string }).code;
      if (code !== 'ENOENT' && code !== 'ERR_STORAGE_NOT_FOUND') throw checkpointError(`checkpoint ${this.path}: its ${MANIFEST} cannot be read (${(error as Error).message})`);
    }
    if (manifest) {
      if (manifest.idColumn !== this.idColumn) {
        throw checkpointError(`checkpoint ${this.path} recorded ids of column '${manifest.idColumn}', not '${this.idColumn}'`, 'ERR_DATA_CHECKPOINT_MISMATCH');
      }
      const same = fingerprint !== undefined || manifest.fingerprint !== undefined ? fingerprint === manifest.fingerprint : describeChange(manifest.steps, steps) === 'nothing the checkpoint can name changed';
      if (!same) {
        const why = fingerprint !== undefined || manifest.fingerprint !== undefined
          ? `its fingerprint was ${JSON.stringify(manifest.fingerprint ?? null)}, this job's is ${JSON.stringify(fingerprint ?? null)}`
          : describeChange(manifest.steps, steps);
        throw checkpointError(
          `checkpoint ${this.path} was written by a different job: ${why}. Its output would not match this job's; remove the checkpoint (and its output) to start over, or give checkpoint.fingerprint to say the jobs are the same`,
          'ERR_DATA_CHECKPOINT_MISMATCH',
        );
      }
    }
    const next: Manifest = {
      version: 1,
      idColumn: this.idColumn,
      ...(fingerprint !== undefined ? { fingerprint } : {}),
      steps,
      runs: [...(manifest?.runs ?? []), { writeId, host: hostIdentity(), pid: process.pid, startedAt: new Date().toISOString() }],
    };
    await this.#storage.writeFileDurably(file, Buffer.from(JSON.stringify(next, null, 2)));
  }

  /** Reads every record: a write whose output stands counts, one whose output is gone is dropped. */
  async #recover(): Promise<void> {
    const directory = paths.join(this.path, RECORDS);
    const entries = (await this.#storage.listFiles(directory)).map((file) => paths.relative(directory, file.path)).filter((name) => !name.includes('/'));
    // Records of attempts that died while being written.
    await Promise.all(entries.filter((name) => name.startsWith('.') && name.endsWith('.tmp')).map((name) => this.#storage.remove(paths.join(directory, name)).catch(() => undefined)));
    const names = entries.filter((name) => name.endsWith('.arrow') && !name.startsWith('.')).sort();
    // A long job leaves thousands of records: read a few at a time, kept in name order.
    const loaded: Array<{ ids: IdValues; result: unknown } | null> = new Array(names.length).fill(null);
    let next = 0;
    const reader = async (): Promise<void> => {
      while (next < names.length) {
        const index = next++;
        loaded[index] = await this.#readRecord(paths.join(directory, names[index]), names[index]);
      }
    };
    await Promise.all(Array.from({ length: Math.min(16, names.length) }, reader));
    const parts: IdValues[] = [];
    for (const record of loaded) {
      if (!record) continue;
      parts.push(record.ids);
      this.#resumedRows += idCount(record.ids);
      this.#resumedResults.push(record.result);
    }
    const all = concatIds(parts, `checkpoint ${this.path}`);
    if (all) this.#idsRef = put(storedIdSet(all)) as ObjectRef<Block>;
  }

  /** One record's ids and result; null (and the record removed) when the sink says its output is gone. */
  async #readRecord(file: string, name: string): Promise<{ ids: IdValues; result: unknown } | null> {
    let table: Table;
    try {
      table = tableFromIPC(await this.#storage.readFile(file));
    } catch (error) {
      throw checkpointError(`checkpoint ${this.path}: record ${name} cannot be read (${(error as Error).message}); remove it to write its rows again`);
    }
    const encoded = table.schema.metadata.get(RESULT_KEY);
    let result: unknown = encoded === undefined ? undefined : deserialize(Buffer.from(encoded, 'base64'));
    if (this.#sink.recover) {
      const recovered = await this.#sink.recover(result);
      if (recovered === null) {
        // Its output is gone: its rows are written again.
        await this.#storage.remove(file).catch(() => undefined);
        return null;
      }
      result = recovered;
    }
    return { ids: idValuesOf(table, 'id', `checkpoint record ${name}`), result };
  }

  /**
   * The plan with the rows already written dropped: right after the read where the id column is
   * there already, and at the latest before the first actor pool (the model) or, with none, before
   * the sink, for an id column a stage makes. Unchanged when nothing was written.
   */
  planWith(plan: readonly LogicalOperator[]): readonly LogicalOperator[] {
    if (!this.#idsRef) return plan;
    const filter = (name: string, optional: boolean): LogicalOperator => ({
      op: 'stage',
      stage: { kind: 'mapBatches', name, udf: resolveUdf(skipWritten, name), fnArgs: [this.#idsRef, this.idColumn, optional], batchFormat: 'arrow' },
      compute: {},
    });
    const model = plan.findIndex((operator) => operator.op === 'stage' && operator.stage.udf.kind === 'class');
    const before = model < 0 ? plan.length : model;
    const withRequired = [...plan.slice(0, before), filter('SkipWritten', false), ...plan.slice(before)];
    // With no stage between the source and that point to make the column, one filter does.
    if (plan[0]?.op !== 'union' && plan.slice(1, before).every((operator) => operator.op !== 'stage')) return withRequired;
    return insertAfterSource(withRequired, filter('SkipWritten(at read)', true));
  }

  target(): CheckpointTarget {
    return { path: this.path, idColumn: this.idColumn, staged: typeof this.#sink.commit === 'function', ...(this.#filesystem ? { filesystem: this.#filesystem } : {}) };
  }

  /** What earlier runs' write() calls returned, for the job's results. */
  get resumedResults(): readonly unknown[] {
    return this.#resumedResults;
  }

  stats(): CheckpointStats {
    return { path: this.path, resumedRows: this.#resumedRows, resumedWrites: this.#resumedResults.length };
  }

  /** The job succeeded: the checkpoint goes (unless kept), so that a new run starts afresh. */
  async complete(): Promise<void> {
    if (this.#deleteOnSuccess) await this.#storage.remove(this.path);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#heartbeat) clearInterval(this.#heartbeat);
    this.#idsRef?.[Symbol.dispose]();
    this.#idsRef = undefined;
    // Only our own lock: a completed checkpoint's directory is already gone.
    const file = paths.join(this.path, LOCK);
    try {
      const holder = JSON.parse(Buffer.from(await this.#storage.readFile(file)).toString('utf8')) as { pid?: number; host?: string };
      if (holder.pid === process.pid && holder.host === hostIdentity()) await this.#storage.remove(file);
    } catch {
      // Gone with the directory, or never taken.
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/** Inserts `operator` right after the plan's source (each input's, for a union). */
function insertAfterSource(plan: readonly LogicalOperator[], operator: LogicalOperator): LogicalOperator[] {
  const [first, ...rest] = plan;
  if (first?.op === 'union') return [{ ...first, inputs: first.inputs.map((input) => insertAfterSource(input, operator)) }, ...rest];
  // After a read or given blocks; after a zip or a join, which make their rows from two inputs.
  return first ? [first, operator, ...rest] : [operator];
}
