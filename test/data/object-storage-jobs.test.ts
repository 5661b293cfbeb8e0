/**
 * Jobs on object storage through the cluster: a dataset read from s3:// in worker processes that
 * have no credentials of their own (the driver's resolved filesystem travels with the tasks),
 * mapped, and written back to s3://, plainly and checkpointed (files staged under hidden keys,
 * committed by copy; the checkpoint itself on disk).
 */
import { mkdirSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { S3FileSystem, readJsonl, readParquet, rowsToBlock, type Row } from '../../lib/index.js';
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
    await expect(source.writeParquet('s3://data/elsewhere', { filesystem: storage, checkpoint: { idColumn: 'id' } })).rejects.toThrow(/checkpoint.path is needed when writing to 's3:\/\/data\/elsewhere'/);
  });
});
