/**
 * Hive partitioning of file datasets: a sink given `partitionBy` writes each group of rows under
 * `column=value/` directories (the columns themselves left out of the files), and a source finds
 * those segments between the directory it was given and each file, and gives the values back as
 * columns. Values are URI-encoded in paths; null is Hive's `__HIVE_DEFAULT_PARTITION__`.
 */
import { dirname, relative, sep } from 'node:path';
import { paths as filePaths, urlScheme } from '../filesystem/file-system.js';
import { Float64, Table, Utf8, type Vector } from 'apache-arrow';
import { remote } from '../../core/registry.js';
import type { FunctionDescriptor } from '../../core/protocol.js';
import { InvalidArgumentError } from '../../errors.js';
import { type Block, tableOfVectors, takeRows, vectorOf } from '../block.js';
import { ReadTask, iterateReadResult } from '../datasource.js';
import { groupName, readKeyColumns } from '../keys.js';
import { loadUdf } from '../udf.js';
import { isNumberText, type FileEntry } from './files.js';

export const HIVE_NULL = '__HIVE_DEFAULT_PARTITION__';

/** A partition's values by column, as they are read back (numbers where every value is one). */
export type PartitionValues = Record<string, string | number | null>;

/** Checks a sink's `partitionBy`: a column name or a non-empty list of distinct ones. */
export function checkPartitionBy(value: unknown, format: string): string[] | undefined {
  if (value === undefined) return undefined;
  const list = typeof value === 'string' ? [value] : value;
  if (!Array.isArray(list) || list.length === 0 || !list.every((name) => typeof name === 'string' && name.length > 0) || new Set(list).size !== list.length) {
    throw new InvalidArgumentError(`${format} sink: partitionBy takes a column name or a list of distinct ones, got ${JSON.stringify(value)}`, 'ERR_DATA_COLUMN');
  }
  return list as string[];
}

function segmentValue(value: unknown): string {
  if (value === null || value === undefined) return HIVE_NULL;
  if (value instanceof Date) return encodeURIComponent(value.toISOString());
  if (value instanceof Uint8Array) throw new InvalidArgumentError('partitionBy: a binary column cannot name a directory', 'ERR_DATA_COLUMN');
  return encodeURIComponent(String(value));
}

/**
 * A block cut by the values of `columns`: per distinct combination, its directory (relative:
 * `a=1/b=x`) and its rows without those columns, in their order.
 */
export function splitByPartition(blocks: readonly Block[], columns: readonly string[]): Map<string, Block[]> {
  const out = new Map<string, Block[]>();
  for (const block of blocks) {
    const keys = readKeyColumns(block, columns, 'partitionBy');
    const rowsOf = new Map<string, { directory: string; rows: number[] }>();
    for (let row = 0; row < block.numRows; row++) {
      const name = groupName(keys, row);
      let entry = rowsOf.get(name);
      if (!entry) {
        const directory = columns.map((column, index) => `${column}=${segmentValue(keys[index][row])}`).join('/');
        entry = { directory, rows: [] };
        rowsOf.set(name, entry);
      }
      entry.rows.push(row);
    }
    const kept = block.schema.fields.map((field) => field.name).filter((name) => !columns.includes(name));
    for (const { directory, rows } of rowsOf.values()) {
      const part = (rows.length === block.numRows ? block : takeRows(block, Int32Array.from(rows))).select(kept);
      const list = out.get(directory);
      if (list) list.push(part);
      else out.set(directory, [part]);
    }
  }
  return out;
}

/**
 * The partition values of each file found under a directory the source was given: the `k=v`
 * segments between that directory and the file. A column is numbers where every value is one
 * (or null), else strings. Files outside any given directory, or with no segments, have none.
 */
export function hivePartitions(files: readonly FileEntry[]): Map<string, PartitionValues> | undefined {
  const raw = new Map<string, Record<string, string | null>>();
  const columns = new Set<string>();
  for (const file of files) {
    if (!file.root) continue;
    const segments = (urlScheme(file.path) ? filePaths.relative(file.root, filePaths.dirname(file.path)).split('/') : relative(file.root, dirname(file.path)).split(sep)).filter(Boolean);
    const values: Record<string, string | null> = {};
    for (const segment of segments) {
      const at = segment.indexOf('=');
      if (at <= 0) continue;
      const column = decodeURIComponent(segment.slice(0, at));
      const text = segment.slice(at + 1);
      values[column] = text === HIVE_NULL ? null : decodeURIComponent(text);
      columns.add(column);
    }
    if (Object.keys(values).length > 0) raw.set(file.path, values);
  }
  if (raw.size === 0) return undefined;
  const numeric = new Map<string, boolean>();
  for (const column of columns) {
    numeric.set(column, [...raw.values()].every((values) => values[column] === undefined || values[column] === null || isNumberText(values[column]!)));
  }
  const typed = new Map<string, PartitionValues>();
  for (const [path, values] of raw) {
    const row: PartitionValues = {};
    for (const column of columns) {
      const text = values[column];
      row[column] = text === undefined || text === null ? null : numeric.get(column) ? Number(text) : text;
    }
    typed.set(path, row);
  }
  return typed;
}

/** What every file reader takes about partitions. */
export interface PartitionReadOptions {
  /** 'hive' (default): `column=value` directories under a given directory become columns; false: ignored. */
  partitioning?: 'hive' | false;
  /**
   * Which partitions to read, decided on the driver before any task runs (no registration
   * needed): called with each file's partition values (numbers where every value of the column
   * is one, null for Hive's null); files it refuses are never opened, e.g.
   * `({ date }) => date >= '2026-11-01'`. A filter that keeps no file is an error naming the
   * partitions there are.
   */
  partitionFilter?: (values: PartitionValues) => boolean;
}

/**
 * The files to read and their partition values, after `partitionFilter`. Files outside any
 * `column=value` directory are offered to the filter with no values.
 */
export function selectPartitions<File extends FileEntry>(
  files: File[],
  options: PartitionReadOptions,
  format: string,
): { files: File[]; partitions: Map<string, PartitionValues> | undefined } {
  const filter = options.partitionFilter;
  if (filter !== undefined && typeof filter !== 'function') {
    throw new InvalidArgumentError(`${format} option 'partitionFilter' must be a function of a file's partition values, got ${typeof filter}`, 'ERR_INVALID_ARGUMENT');
  }
  if (options.partitioning !== undefined && options.partitioning !== 'hive' && options.partitioning !== false) {
    throw new InvalidArgumentError(`${format} option 'partitioning' must be 'hive' or false, got ${JSON.stringify(options.partitioning)}`, 'ERR_INVALID_ARGUMENT');
  }
  if (options.partitioning === false) {
    if (filter) throw new InvalidArgumentError(`${format}: partitionFilter reads partition values, which partitioning: false turns off`, 'ERR_INVALID_ARGUMENT');
    return { files, partitions: undefined };
  }
  const partitions = hivePartitions(files);
  if (!filter) return { files, partitions };
  const kept = files.filter((file) => {
    const values = partitions?.get(file.path) ?? {};
    try {
      return filter({ ...values }) === true;
    } catch (error) {
      throw new InvalidArgumentError(`${format}: partitionFilter threw on '${file.path}' (${JSON.stringify(values)}): ${(error as Error).message}`, 'ERR_INVALID_ARGUMENT');
    }
  });
  if (kept.length === 0) {
    const seen = [...new Set(files.map((file) => JSON.stringify(partitions?.get(file.path) ?? {})))];
    throw new InvalidArgumentError(
      `${format}: partitionFilter kept none of the ${files.length} file(s); partitions there are: ${seen.slice(0, 5).join(', ')}${seen.length > 5 ? `, ... (${seen.length} in all)` : ''}`,
      'ERR_DATA_PATH',
    );
  }
  return { files: kept, partitions };
}

/**
 * Read tasks of a partitioned dataset: the files of each partition planned on their own (by the
 * source's own planning) so that a task reads one partition, and wrapped so that its blocks gain
 * the partition's columns. Unpartitioned files are planned as they are.
 */
export async function partitionedReadTasks<File extends FileEntry>(
  files: readonly File[],
  partitions: Map<string, PartitionValues> | undefined,
  parallelism: number,
  plan: (files: File[], parallelism: number) => ReadTask[] | Promise<ReadTask[]>,
): Promise<ReadTask[]> {
  if (!partitions) return plan([...files], parallelism);
  const groups = new Map<string, { values: PartitionValues | undefined; files: File[] }>();
  for (const file of files) {
    const values = partitions.get(file.path);
    const key = values ? JSON.stringify(values) : '';
    const group = groups.get(key) ?? { values, files: [] };
    group.files.push(file);
    groups.set(key, group);
  }
  const totalBytes = files.reduce((sum, file) => sum + file.bytes, 0);
  const tasks: ReadTask[] = [];
  for (const { values, files: groupFiles } of groups.values()) {
    const bytes = groupFiles.reduce((sum, file) => sum + file.bytes, 0);
    const share = Math.max(1, Math.round((parallelism * bytes) / Math.max(1, totalBytes)));
    for (const task of await plan(groupFiles, share)) {
      tasks.push(values ? new ReadTask(readPartition, [task.spec.descriptor, task.args, values], task.metadata) : task);
    }
  }
  return tasks;
}

/** A read task's blocks with its partition's columns added (a column the files have wins). */
export const readPartition = remote(import.meta, async function* readPartition(read: FunctionDescriptor, args: unknown[], values: PartitionValues): AsyncGenerator<Block> {
  const fn = (await loadUdf(read)) as (...a: unknown[]) => unknown;
  for await (const item of iterateReadResult((await fn(...args)) as never)) {
    const block = item as Block;
    if (typeof block.numRows !== 'number' || !block.schema) throw new InvalidArgumentError(`${read.name} yielded rows; partition columns are added to blocks`, 'ERR_DATA_TYPE');
    yield withColumns(block, values);
  }
});

function withColumns(block: Block, values: PartitionValues): Block {
  const columns: Record<string, Vector> = {};
  for (const field of block.schema.fields) columns[field.name] = block.getChild(field.name)!;
  for (const [column, value] of Object.entries(values)) {
    if (column in columns) continue;
    const type = typeof value === 'number' ? new Float64() : new Utf8();
    columns[column] = vectorOf(new Array(block.numRows).fill(value), type);
  }
  return tableOfVectors(columns, [block.schema]);
}
