/**
 * Checkpointed writes: a job that stopped (a failing row, a driver killed at any moment) resumes
 * with only the rows it had not written; the file sinks write every row exactly once, a sink of
 * one's own at least once; a changed job, a missing id column, a limit and a second run at once
 * are refused with typed errors.
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Table, vectorFromArray, Int32, Int64, Utf8 } from 'apache-arrow';
import { describe, expect, it } from 'vitest';
import { DataError, InvalidArgumentError, fromItems, range, readDatasource, readJsonl, type Row, type WriteContext } from '../../lib/index.js';
import { recordWrite } from '../../lib/data/checkpoint.js';
import { hostIdentity } from '../../lib/core/host.js';
import { WrittenIds, idValuesOf, storedIdSet } from '../../lib/data/written-ids.js';
import { JsonlDatasink, type WrittenFile } from '../../lib/data/formats/index.js';
import { FlakyModel, IdListSink, ShardSource, failOnceAt, noteIds, stringIds, withValueAsId, withoutId } from './fixtures/checkpoint.js';
import { RecordingReporter, isAlive, rejection, until, useDataCluster } from './helpers.js';
import { scriptArgs } from '../core/helpers.js';

const { scratchDir } = useDataCluster({ numCpus: 2 });

const fresh = (name: string): string => {
  const path = scratchDir.path(name);
  mkdirSync(path, { recursive: true });
  return path;
};

/** Ids in the JSON Lines files of a directory (hidden files skipped, as readers do). */
function idsInJsonl(directory: string): number[] {
  return readdirSync(directory)
    .filter((name) => name.endsWith('.jsonl') && !name.startsWith('.'))
    .flatMap((name) => readFileSync(join(directory, name), 'utf8').trim().split('\n').filter(Boolean).map((line) => (JSON.parse(line) as Row).id as number))
    .sort((a, b) => a - b);
}

/** Ids the noteIds stage saw, over every process of a run. */
function idsSeen(seenDir: string): number[] {
  if (!existsSync(seenDir)) return [];
  return readdirSync(seenDir)
    .flatMap((name) => readFileSync(join(seenDir, name), 'utf8').trim().split('\n').filter(Boolean).map(Number))
    .sort((a, b) => a - b);
}

const sequence = (n: number) => Array.from({ length: n }, (_, index) => index);

describe('a job that failed resumes', () => {
  it('with only the rows it had not written: each row written once, the checkpoint gone after', async () => {
    const out = fresh('out');
    const flag = join(fresh('flag'), 'failed');
    const job = () => range(200, { parallelism: 20 }).map(failOnceAt, { fnArgs: [150, flag] });
    const first = await rejection(job().writeJsonl(out, { checkpoint: { idColumn: 'id' } }));
    expect(first).toBeInstanceOf(DataError);
    expect(first.message).toContain('row 150 failed once');
    const checkpoint = join(out, '.trellis-checkpoint');
    expect(readdirSync(join(checkpoint, 'records')).length).toBeGreaterThan(0);
    const before = idsInJsonl(out);
    expect(before.length).toBeGreaterThan(0);
    expect(before).not.toContain(150);

    const dataset = job();
    const files = await dataset.writeJsonl(out, { checkpoint: { idColumn: 'id' } });
    expect(idsInJsonl(out)).toEqual(sequence(200));
    // The results name every file, the earlier run's first.
    expect(files.map((file) => file.path).sort()).toEqual(readdirSync(out).filter((name) => name.endsWith('.jsonl')).map((name) => join(out, name)).sort());
    expect(files.every((file) => file.staged === undefined)).toBe(true);
    expect(dataset.stats()?.checkpoint).toEqual({ path: checkpoint, resumedRows: before.length, resumedWrites: before.length / 10 });
    expect(existsSync(checkpoint)).toBe(false);
    expect(readdirSync(out).filter((name) => name.startsWith('.'))).toEqual([]);
  });

  it('skips written rows before the model: its stage sees only the rest', async () => {
    const out = fresh('out');
    const flag = join(fresh('flag'), 'failed');
    const seen = fresh('seen');
    const job = () => range(300, { parallelism: 30 }).map(failOnceAt, { fnArgs: [290, flag] }).mapBatches(noteIds, { batchFormat: 'arrow', batchSize: 7, fnArgs: [seen, 0] });
    // The noting stage's directory differs between the runs: a fingerprint says the job is the same.
    await rejection(job().writeJsonl(out, { checkpoint: { idColumn: 'id', fingerprint: 'v1' } }));
    const written = idsInJsonl(out);
    const seenSecond = fresh('seen');
    const second = range(300, { parallelism: 30 }).map(failOnceAt, { fnArgs: [290, flag] }).mapBatches(noteIds, { batchFormat: 'arrow', batchSize: 7, fnArgs: [seenSecond, 0] });
    await second.writeJsonl(out, { checkpoint: { idColumn: 'id', fingerprint: 'v1' } });
    expect(idsInJsonl(out)).toEqual(sequence(300));
    expect(idsSeen(seenSecond)).toEqual(sequence(300).filter((id) => !written.includes(id)));
    expect(idsSeen(seen).length).toBeGreaterThanOrEqual(written.length);
  });

  it('through a sink of its own (at least once), with the earlier runs\' results first; kept with deleteOnSuccess false', async () => {
    const target = fresh('sink');
    const path = fresh('checkpoint');
    const flag = join(fresh('flag'), 'failed');
    const job = () => fromItems(sequence(120).map((id) => ({ id })), { parallelism: 12 }).map(failOnceAt, { fnArgs: [100, flag] });
    const sink = new IdListSink(target);
    await rejection(job().write(sink, { checkpoint: { idColumn: 'id', path, deleteOnSuccess: false } }));
    const earlier = readdirSync(target).length;
    expect(earlier).toBeGreaterThan(0);
    const results = await job().write(sink, { checkpoint: { idColumn: 'id', path, deleteOnSuccess: false } });
    expect(results.flatMap((result) => result.ids).sort((a, b) => a - b)).toEqual(sequence(120));
    expect(sink.completed).toHaveLength(results.length);
    const all = readdirSync(target).flatMap((name) => readFileSync(join(target, name), 'utf8').trim().split('\n').map(Number));
    expect(all.sort((a, b) => a - b)).toEqual(sequence(120));
    // Kept: a third run finds everything written and writes nothing.
    expect(existsSync(join(path, 'manifest.json'))).toBe(true);
    const files = readdirSync(target).length;
    const third = await job().write(sink, { checkpoint: { idColumn: 'id', path, deleteOnSuccess: false } });
    expect(third.flatMap((result) => result.ids).sort((a, b) => a - b)).toEqual(sequence(120));
    expect(readdirSync(target).length).toBe(files);
  });

  it('through an actor pool (the model), with ids a stage makes: skipped before the model, and the resume reported', async () => {
    const out = fresh('out');
    const flag = join(fresh('flag'), 'failed');
    const job = () => range(240, { parallelism: 24 }).map(stringIds).mapBatches(FlakyModel, { batchSize: 20, concurrency: 2, constructorArgs: [200, flag] });
    await rejection(job().writeJsonl(out, { checkpoint: { idColumn: 'key' } }));
    const dataset = job();
    const reporter = new RecordingReporter();
    await dataset.writeJsonl(out, { checkpoint: { idColumn: 'key' }, progress: reporter });
    const rows = (await readJsonl(out).takeAll()).map((row) => row.value as number).sort((a, b) => a - b);
    expect(rows).toEqual(sequence(240));
    const names = dataset.stats()!.operators.map((operator) => operator.name);
    expect(names[0]).toBe('ReadRange->SkipWritten(at read)->Map(stringIds)->SkipWritten');
    expect(names[1]).toContain('MapBatches(FlakyModel)');
    const { resumedRows } = dataset.stats()!.checkpoint!;
    expect(resumedRows).toBeGreaterThan(0);
    expect(reporter.finished!.progress.warnings.some((warning) => warning.includes(`${resumedRows} rows an earlier run wrote`))).toBe(true);
  });

  it('over files without ids of their own: ids made at the read (rowIds)', async () => {
    const input = fresh('input');
    writeFileSync(join(input, 'part-0.jsonl'), sequence(100).map((id) => `${JSON.stringify({ id, text: `row ${id}` })}\n`).join(''));
    writeFileSync(join(input, 'part-1.jsonl'), sequence(100).map((index) => `${JSON.stringify({ id: 100 + index, text: `row ${100 + index}` })}\n`).join(''));
    const out = fresh('out');
    const flag = join(fresh('flag'), 'failed');
    const job = () => readJsonl(input, { rowIds: '_id', rowsPerBlock: 10, minSplitBytes: 256 }).map(failOnceAt, { fnArgs: [150, flag] });
    await rejection(job().writeJsonl(out, { checkpoint: { idColumn: '_id' } }));
    const dataset = job();
    await dataset.writeJsonl(out, { checkpoint: { idColumn: '_id' } });
    expect(dataset.stats()?.checkpoint?.resumedRows).toBeGreaterThan(0);
    expect(idsInJsonl(out)).toEqual(sequence(200));
  });

  it("over a custom source without ids: ids from its read tasks' keys (rowIds)", async () => {
    const out = fresh('out');
    const flag = join(fresh('flag'), 'failed');
    // failOnceAt looks at row.id: the shard's rows carry the value as their id too.
    const job = () => readDatasource(new ShardSource(8, 25), { rowIds: 'rid' }).map(withValueAsId).map(failOnceAt, { fnArgs: [5010, flag] });
    await rejection(job().writeJsonl(out, { checkpoint: { idColumn: 'rid' } }));
    const dataset = job();
    await dataset.writeJsonl(out, { checkpoint: { idColumn: 'rid' } });
    expect(dataset.stats()?.checkpoint?.resumedRows).toBeGreaterThan(0);
    const rows = readdirSync(out).filter((name) => name.endsWith('.jsonl')).flatMap((name) => readFileSync(join(out, name), 'utf8').trim().split('\n').map((line) => JSON.parse(line) as Row));
    expect(rows.map((row) => row.rid).sort()).toEqual(Array.from({ length: 8 }, (_, shard) => Array.from({ length: 25 }, (_, n) => `shard-${shard}:${n}`)).flat().sort());
    const missing = await rejection(readDatasource(new ShardSource(2, 5, 'none'), { rowIds: 'rid' }).takeAll());
    expect(missing.code).toBe('ERR_DATA_SOURCE');
    expect(missing.message).toContain('metadata.key');
    expect((await rejection(readDatasource(new ShardSource(2, 5, 'duplicate'), { rowIds: 'rid' }).takeAll())).message).toContain("gave 'same' twice");
  });

  it('with string ids', async () => {
    const out = fresh('out');
    const flag = join(fresh('flag'), 'failed');
    const job = () => range(100, { parallelism: 10 }).map(failOnceAt, { fnArgs: [95, flag] }).map(stringIds);
    await rejection(job().writeJsonl(out, { checkpoint: { idColumn: 'key' } }));
    const dataset = job();
    await dataset.writeJsonl(out, { checkpoint: { idColumn: 'key' } });
    expect(dataset.stats()?.checkpoint?.resumedRows).toBeGreaterThan(0);
    const rows = (await readJsonl(out).takeAll()).map((row) => row.value as number).sort((a, b) => a - b);
    expect(rows).toEqual(sequence(100));
  });
});

describe('a driver killed mid-job', () => {
  it('resumes: every row written once, whatever the moment it died', async () => {
    const out = fresh('out');
    const fixture = new URL('./fixtures/checkpoint.ts', import.meta.url).pathname;
    const run = (seen: string) => spawn(process.execPath, [...scriptArgs(fixture), '400', out, seen, '150'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const records = join(out, '.trellis-checkpoint', 'records');
    const first = run(fresh('seen'));
    await until(() => existsSync(records) && readdirSync(records).filter((name) => name.endsWith('.arrow')).length >= 6, 'the first run to record six writes', 90_000);
    first.kill('SIGKILL');
    await until(() => !isAlive(first.pid!), 'the driver to die');
    const seen = fresh('seen');
    const second = run(seen);
    let output = '';
    second.stdout.on('data', (chunk: Buffer) => (output += chunk));
    second.stderr.on('data', (chunk: Buffer) => (output += chunk));
    const code = await new Promise<number | null>((resolve) => second.on('exit', resolve));
    expect(code, output).toBe(0);
    expect(idsInJsonl(out)).toEqual(sequence(400));
    // The second run's model saw fewer rows than all: what the first recorded was skipped.
    expect(idsSeen(seen).length).toBeLessThan(400);
    expect(existsSync(join(out, '.trellis-checkpoint'))).toBe(false);
    expect(readdirSync(out).filter((name) => name.startsWith('.'))).toEqual([]);
  }, 120_000);
});

describe('write modes of the file writers', () => {
  it("append, error, ignore and overwrite (this format's files and partitions only); a resume always appends", async () => {
    const out = fresh('out');
    await range(10).writeJsonl(out);
    writeFileSync(join(out, 'notes.txt'), 'mine');
    mkdirSync(join(out, 'k=1'));
    writeFileSync(join(out, 'k=1', 'old.jsonl'), '{"id":99}\n');
    const refused = await rejection(range(10).writeJsonl(out, { mode: 'error' }));
    expect(refused.code).toBe('ERR_DATA_PATH');
    expect(refused.message).toContain("write with mode 'append' or 'overwrite'");
    expect(await range(10).writeJsonl(out, { mode: 'ignore' })).toEqual([]);
    expect(idsInJsonl(out)).toEqual(sequence(10));
    await range(5).writeJsonl(out, { mode: 'overwrite' });
    expect(idsInJsonl(out)).toEqual(sequence(5));
    expect(existsSync(join(out, 'k=1'))).toBe(false);
    expect(readFileSync(join(out, 'notes.txt'), 'utf8')).toBe('mine');
    await range(5).writeJsonl(out);
    expect(idsInJsonl(out)).toEqual([...sequence(5), ...sequence(5)].sort((a, b) => a - b));
    expect((await rejection(range(5).write(new IdListSink(fresh('sink')), { mode: 'overwrite' }))).message).toContain('is for the file writers');
    expect((await rejection(range(5).writeJsonl(out, { mode: 'replace' as 'append' }))).message).toContain("mode must be 'append'");

    // A job that stopped resumes into its own output, even with mode 'error'.
    const resumed = fresh('out');
    const flag = join(fresh('flag'), 'failed');
    const job = () => range(100, { parallelism: 10 }).map(failOnceAt, { fnArgs: [95, flag] });
    await rejection(job().writeJsonl(resumed, { checkpoint: { idColumn: 'id' }, mode: 'error' }));
    await job().writeJsonl(resumed, { checkpoint: { idColumn: 'id' }, mode: 'error' });
    expect(idsInJsonl(resumed)).toEqual(sequence(100));
  });
});

describe('rows per file', () => {
  it('rowsPerFile gathers rows across tasks into files of that many (the last fewer), checkpointed too', async () => {
    const out = fresh('out');
    const files = await fromItems(sequence(1000).map((id) => ({ id })), { parallelism: 20 }).writeJsonl(out, { rowsPerFile: 300 });
    expect(files.map((file) => file.rows)).toEqual([300, 300, 300, 100]);
    expect(idsInJsonl(out)).toEqual(sequence(1000));
    const resumed = fresh('out');
    const flag = join(fresh('flag'), 'failed');
    const job = () => range(1000, { parallelism: 20 }).map(failOnceAt, { fnArgs: [990, flag] });
    await rejection(job().writeJsonl(resumed, { rowsPerFile: 250, checkpoint: { idColumn: 'id' } }));
    await job().writeJsonl(resumed, { rowsPerFile: 250, checkpoint: { idColumn: 'id' } });
    expect(idsInJsonl(resumed)).toEqual(sequence(1000));
    expect(() => range(10).writeJsonl(fresh('out'), { rowsPerFile: 0 })).toThrow(/'rowsPerFile' must be a positive integer/);
  });
});

describe('the commit point', () => {
  it('a write recorded but not published (stopped before commit) is published on resume; one staged but not recorded is not', async () => {
    const out = fresh('out');
    const path = fresh('checkpoint');
    const sink = new JsonlDatasink(out, {});
    const context: WriteContext = { taskIndex: 0, attempt: 0, writeId: 'earlier', staged: true };
    const recorded = (await sink.write([new Table({ id: vectorFromArray([1, 2, 3], new Int32()) })], context)) as WrittenFile;
    expect(recorded.staged).toHaveLength(1);
    await recordWrite({ path, idColumn: 'id', staged: true }, [new Table({ id: vectorFromArray([1, 2, 3], new Int32()) })], recorded, context);
    // A second write staged, never recorded: its rows are not counted, its file never appears.
    const unrecorded = (await sink.write([new Table({ id: vectorFromArray([4, 5], new Int32()) })], { ...context, taskIndex: 1 })) as WrittenFile;
    writeFileSync(join(path, 'manifest.json'), JSON.stringify({ version: 1, idColumn: 'id', fingerprint: 'v1', steps: [], runs: [] }));
    expect(idsInJsonl(out)).toEqual([]);
    const results = await fromItems(sequence(6).map((id) => ({ id })), { parallelism: 2 }).write(sink, { checkpoint: { idColumn: 'id', path, fingerprint: 'v1' } });
    expect(idsInJsonl(out)).toEqual(sequence(6));
    expect(existsSync(recorded.path!)).toBe(true);
    expect(existsSync(unrecorded.staged![0])).toBe(false);
    expect(results[0]).toEqual({ path: recorded.path, rows: 3, bytes: recorded.bytes });
  });
});

describe('refused', () => {
  it('a job whose steps changed, naming the step; the same fingerprint resumes anyway', async () => {
    const out = fresh('out');
    const flag = join(fresh('flag'), 'failed');
    await rejection(range(50, { parallelism: 5 }).map(failOnceAt, { fnArgs: [45, flag] }).writeJsonl(out, { checkpoint: { idColumn: 'id' } }));
    const changed = await rejection(range(50, { parallelism: 5 }).map(failOnceAt, { fnArgs: [44, flag] }).writeJsonl(out, { checkpoint: { idColumn: 'id' } }));
    expect(changed.code).toBe('ERR_DATA_CHECKPOINT_MISMATCH');
    expect(changed.message).toContain('Map(failOnceAt) changed');
    const other = await rejection(range(50, { parallelism: 5 }).map(failOnceAt, { fnArgs: [45, flag] }).writeJsonl(out, { checkpoint: { idColumn: 'doubled' } }));
    expect(other.code).toBe('ERR_DATA_CHECKPOINT_MISMATCH');
    expect(other.message).toContain("column 'id', not 'doubled'");

    const named = fresh('out');
    const flag2 = join(fresh('flag'), 'failed');
    await rejection(range(50, { parallelism: 5 }).map(failOnceAt, { fnArgs: [45, flag2] }).writeJsonl(named, { checkpoint: { idColumn: 'id', fingerprint: 'v1' } }));
    await range(50, { parallelism: 5 }).map(failOnceAt, { fnArgs: [44, flag2] }).writeJsonl(named, { checkpoint: { idColumn: 'id', fingerprint: 'v1' } });
    expect(idsInJsonl(named)).toEqual(sequence(50));
  });

  it('rows without the id column, a limit, a custom sink without a path, bad options', async () => {
    const missing = await rejection(range(10).map(withoutId).writeJsonl(fresh('out'), { checkpoint: { idColumn: 'id' } }));
    expect(missing.code).toBe('ERR_DATA_CHECKPOINT_ID');
    expect(missing.message).toContain("id column 'id' is not in the rows (the columns are: value)");
    const limited = await rejection(range(10).limit(5).writeJsonl(fresh('out'), { checkpoint: { idColumn: 'id' } }));
    expect(limited).toBeInstanceOf(InvalidArgumentError);
    expect(limited.code).toBe('ERR_DATA_CHECKPOINT');
    const pathless = await rejection(range(10).write(new IdListSink(fresh('sink')), { checkpoint: { idColumn: 'id' } }));
    expect(pathless.code).toBe('ERR_DATA_CHECKPOINT');
    expect(pathless.message).toContain('checkpoint.path is needed for a custom sink');
    const bad = await rejection(range(10).writeJsonl(fresh('out'), { checkpoint: { idColumn: '' } }));
    expect(bad.code).toBe('ERR_DATA_CHECKPOINT');
  });

  it('a second run while one holds the checkpoint; a lock left by a dead driver is taken over', async () => {
    const out = fresh('out');
    const checkpoint = join(out, '.trellis-checkpoint');
    mkdirSync(checkpoint, { recursive: true });
    // Locks name their host as the store does (hostname and boot id): a pid means something only there.
    writeFileSync(join(checkpoint, 'lock'), JSON.stringify({ host: hostIdentity(), pid: process.pid, writeId: 'other' }));
    const busy = await rejection(range(10).writeJsonl(out, { checkpoint: { idColumn: 'id' } }));
    expect(busy.code).toBe('ERR_DATA_CHECKPOINT_BUSY');
    expect(busy.message).toContain(`process ${process.pid}`);
    writeFileSync(join(checkpoint, 'lock'), JSON.stringify({ host: hostIdentity(), pid: 2 ** 22 + 7, writeId: 'gone' }));
    await range(10).writeJsonl(out, { checkpoint: { idColumn: 'id' } });
    expect(idsInJsonl(out)).toEqual(sequence(10));
  });
});

describe('id sets', () => {
  it('numbers, 64-bit integers and strings (any bytes), each looked up across kinds where exact', () => {
    const numbers = new WrittenIds(idValuesOf(storedIdSet(idValuesOf(new Table({ id: vectorFromArray([5, 1, 9, -3], new Int32()) }), 'id', 'test')), 'id', 'test'));
    const rows = new Table({ id: vectorFromArray([1n, 2n, 9n, 2n ** 60n], new Int64()) });
    expect(Array.from(numbers.written(idValuesOf(rows, 'id', 'test'), 'test'))).toEqual([1, 0, 1, 0]);
    const big = WrittenIds.fromBlock(storedIdSet(idValuesOf(rows, 'id', 'test')));
    expect(Array.from(big.written(idValuesOf(new Table({ id: vectorFromArray([9, 3, 1], new Int32()) }), 'id', 'test'), 'test'))).toEqual([1, 0, 1]);
    const words = ['zebra', 'ä', 'a', '', '日本', 'ab'];
    const strings = WrittenIds.fromBlock(storedIdSet(idValuesOf(new Table({ id: vectorFromArray(words, new Utf8()) }), 'id', 'test')));
    const probe = new Table({ id: vectorFromArray(['a', 'b', '日本', '', 'abc', 'zebra', 'ä'], new Utf8()) }).slice(1);
    expect(Array.from(strings.written(idValuesOf(probe, 'id', 'test'), 'test'))).toEqual([0, 1, 1, 0, 1, 1]);
    expect(() => strings.written(idValuesOf(rows, 'id', 'test'), 'test')).toThrow(/string ids, but this run's ids are numbers/);
    expect(() => idValuesOf(new Table({ id: vectorFromArray([1, null], new Int32()) }), 'id', 'test')).toThrow(/row 1 has no id/);
  });
});
