/**
 * Jobs on object storage through the cluster: a dataset read from s3:// in worker processes that
 * have no credentials of their own (the driver's resolved filesystem travels with the tasks),
 * mapped, and written back to s3://, plainly and checkpointed (files staged under hidden keys,
 * committed by copy), with the checkpoint on disk or beside the output on s3:// (a failed job
 * resumed; its lock taken by a conditional write); images read from s3:// and written back.
 */
import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { S3FileSystem, Tensor, decodeImage, range, readImages, readJsonl, readParquet, rowsToBlock, type Row } from '../../lib/index.js';
import { hostIdentity } from '../../lib/core/host.js';
import { failOnceAt } from './fixtures/checkpoint.js';
import { ParquetDatasink } from '../../lib/data/formats/index.js';
import { double } from './fixtures/udfs.js';
import { S3TestServer } from './fixtures/s3-server.js';
import { useDataCluster } from './helpers.js';

const { scratchDir } = useDataCluster({ numCpus: 2 });
const server = new S3TestServer({ pageSize: 4 });

beforeAll(async () => {
  await server.start();
  server.bucket('data');
});

afterAll(async () => {
  await server.close();
});

const rows: Row[] = Array.from({ length: 60 }, (_, id) => ({ id, label: `item ${id}` }));
const byId = (list: Row[]) => [...list].sort((a, b) => Number(a.id) - Number(b.id));

describe('datasets on s3://', () => {
  it("reads with the driver's credentials from the environment in workers that lack them, and writes back", async () => {
    const storage = new S3FileSystem(server.clientOptions);
    const seed = new ParquetDatasink('s3://data/input', { filesystem: storage });
    await seed.onWriteStart();
    for (let part = 0; part < 3; part++) await seed.write([rowsToBlock(rows.slice(part * 20, part * 20 + 20))], { writeId: 'seed', taskIndex: part, attempt: 0 });

    const saved = { ...process.env };
    let dataset;
    try {
      Object.assign(process.env, {
        AWS_ACCESS_KEY_ID: server.accessKeyId,
        AWS_SECRET_ACCESS_KEY: server.secretAccessKey,
        AWS_REGION: server.region,
        AWS_ENDPOINT_URL_S3: server.endpoint,
      });
      dataset = readParquet('s3://data/input', { parallelism: 3 }).map(double);
    } finally {
      process.env = saved;
    }
    // The environment is gone again before any task starts: workers read with what the driver resolved.
    const written = await dataset.writeJsonl('s3://data/output', { filesystem: storage });
    expect(written.filter((file) => file.path).every((file) => file.path!.startsWith('s3://data/output/'))).toBe(true);
    const back = await readJsonl('s3://data/output', { filesystem: storage }).takeAll();
    expect(byId(back)).toEqual(rows.map((row) => ({ ...row, doubled: Number(row.id) * 2 })));
    expect([...server.bucket('data').keys()].filter((key) => key.includes('.tmp'))).toEqual([]);
  });

  it("runs a task again that met an outage past the filesystem's own retries (retriedErrorCodes), and fails with it when told not to", async () => {
    // Two tries a request: three 503s on one object outlast a task's first attempt.
    const storage = new S3FileSystem({ ...server.clientOptions, maxAttempts: 2 });
    for (let file = 0; file < 3; file++) server.put('data', `flaky/${file}.jsonl`, rows.slice(file * 20, file * 20 + 20).map((row) => JSON.stringify(row)).join('\n'));
    const isFlaky = (method: string, key: string) => method === 'GET' && key === 'flaky/1.jsonl';
    server.fail(3, 503, 'SlowDown', isFlaky);
    const read = await readJsonl('s3://data/flaky', { filesystem: storage, parallelism: 3 }).takeAll();
    expect(byId(read)).toEqual(rows);
    server.fail(2, 503, 'SlowDown', isFlaky);
    await expect(readJsonl('s3://data/flaky', { filesystem: storage, parallelism: 3 }).takeAll({ retriedErrorCodes: [] })).rejects.toMatchObject({ message: expect.stringContaining('flaky/1.jsonl failed after 2 tries: status 503 SlowDown') });
  });

  it('a checkpointed write to s3:// keeps its checkpoint on disk and commits every file once', async () => {
    const storage = new S3FileSystem(server.clientOptions);
    const checkpointPath = scratchDir.path('s3-checkpoint');
    mkdirSync(checkpointPath, { recursive: true });
    const source = readJsonl('s3://data/output', { filesystem: storage, parallelism: 2 });
    const written = await source.writeParquet('s3://data/checkpointed', { filesystem: storage, checkpoint: { idColumn: 'id', path: checkpointPath } });
    const paths = written.filter((file) => file.path).map((file) => file.path!);
    expect(paths.length).toBeGreaterThan(0);
    const keys = [...server.bucket('data').keys()].filter((key) => key.startsWith('checkpointed/'));
    expect(keys.sort()).toEqual(paths.map((path) => path.slice('s3://data/'.length)).sort());
    expect(byId(await readParquet('s3://data/checkpointed', { filesystem: storage }).takeAll()).map((row) => row.id)).toEqual(rows.map((row) => row.id));
  });

  it('a checkpoint on s3:// beside the output: a job that failed resumes with only the rows it had not written', async () => {
    const storage = new S3FileSystem(server.clientOptions);
    const flag = scratchDir.path('s3-failed-once');
    const job = () => range(200, { parallelism: 20 }).map(failOnceAt, { fnArgs: [150, flag] });
    const keys = (prefix: string) => [...server.bucket('data').keys()].filter((key) => key.startsWith(prefix));
    await expect(job().writeJsonl('s3://data/resumed', { filesystem: storage, checkpoint: { idColumn: 'id' } })).rejects.toThrow(/row 150 failed once/);
    // Its records are objects beside the output; the run let go of its lock.
    expect(keys('resumed/.trellis-checkpoint/records/').length).toBeGreaterThan(0);
    expect(keys('resumed/.trellis-checkpoint/')).toContain('resumed/.trellis-checkpoint/manifest.json');
    expect(keys('resumed/.trellis-checkpoint/lock')).toEqual([]);
    const before = keys('resumed/').filter((key) => !key.includes('.trellis-checkpoint')).length;
    expect(before).toBeGreaterThan(0);

    const dataset = job();
    await dataset.writeJsonl('s3://data/resumed', { filesystem: storage, checkpoint: { idColumn: 'id' } });
    expect(dataset.stats()?.checkpoint).toMatchObject({ path: 's3://data/resumed/.trellis-checkpoint', resumedWrites: before });
    const ids = (await readJsonl('s3://data/resumed', { filesystem: storage }).takeAll()).map((row) => Number(row.id)).sort((a, b) => a - b);
    expect(ids).toEqual(Array.from({ length: 200 }, (_, id) => id));
    // Done: the checkpoint is gone, and nothing staged is left.
    expect(keys('resumed/.trellis-checkpoint')).toEqual([]);
    expect(keys('resumed/').filter((key) => key.includes('.tmp'))).toEqual([]);
  });

  it('a second run while the first holds the checkpoint on s3:// is refused; a lock left by a dead process is taken over', async () => {
    const storage = new S3FileSystem(server.clientOptions);
    // A live run here: this process holds it.
    server.put('data', 'locked/.trellis-checkpoint/lock', JSON.stringify({ host: hostIdentity(), pid: process.pid, writeId: 'other' }));
    await expect(range(10).writeJsonl('s3://data/locked', { filesystem: storage, checkpoint: { idColumn: 'id' } })).rejects.toMatchObject({ code: 'ERR_DATA_CHECKPOINT_BUSY' });
    // A holder on this host that is gone: its lock is taken over and the job runs.
    server.put('data', 'locked/.trellis-checkpoint/lock', JSON.stringify({ host: hostIdentity(), pid: 2 ** 22 + 1, writeId: 'dead' }));
    await range(10).writeJsonl('s3://data/locked', { filesystem: storage, checkpoint: { idColumn: 'id' } });
    expect((await readJsonl('s3://data/locked', { filesystem: storage }).takeAll()).length).toBe(10);
  });
  it('reads images from s3:// (decoded in the tasks) and writes them back as files, each an object', async () => {
    const storage = new S3FileSystem(server.clientOptions);
    const fixtures = join(import.meta.dirname, '..', 'image', 'fixtures');
    const names = ['baseline-420.jpg', 'progressive-444.jpg', 'rgba.png', 'palette.png', 'gray.jpg'];
    for (const name of names) server.put('data', `photos/${name}`, readFileSync(join(fixtures, name)));
    server.put('data', 'photos/notes.txt', 'not an image');
    const rows = await readImages('s3://data/photos', { size: [16, 16], includePaths: true, filesystem: storage }).takeAll();
    expect(rows.map((row) => String(row.path).split('/').pop()).sort()).toEqual([...names].sort());
    for (const row of rows) {
      const local = decodeImage(new Uint8Array(readFileSync(join(fixtures, String(row.path).split('/').pop()!))), { size: [16, 16] });
      expect(Buffer.compare((row.image as Tensor).data as Uint8Array, local.data as Uint8Array)).toBe(0);
    }
    await readImages('s3://data/photos', { size: [16, 16], rowIds: 'key', filesystem: storage }).writeImages('s3://data/thumbs', { filenameColumn: 'key', filesystem: storage });
    const thumbs = [...server.bucket('data').keys()].filter((key) => key.startsWith('thumbs/'));
    expect(thumbs).toHaveLength(names.length);
    expect(thumbs.every((key) => key.endsWith('.png') && !key.includes('.tmp'))).toBe(true);
  });
});
