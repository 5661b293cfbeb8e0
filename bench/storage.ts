/**
 * Object storage suite. An S3-compatible server in a process of its own (signatures checked)
 * answers each request after 10 ms, as object storage's time to first byte.
 * storage_read_MBps: 48 objects of 2 MiB read by readBinaryFiles('s3://...') through 4 read tasks
 * and consumed in the driver; its floor storage_direct_read_MBps: the same GETs from this process,
 * 8 in flight, no runtime; storage_sequential_read_MBps: one GET after another (the naive loop).
 * storage_webdataset_read_MBps: the same 96 MiB as 4 WebDataset tar shards of 12 samples, read
 * as samples by readWebDataset (one GET a shard).
 * storage_write_MBps: a 64 MiB object through S3FileSystem's writer (8 MiB parts, 4 in flight);
 * its floor storage_put_MBps: the same bytes as one PUT. storage_parquet_projection_fetched_ratio:
 * bytes the server sent for a read of 1 of 8 Parquet columns over bytes sent for all 8 (1/8 is the
 * floor, the footers aside). Medians of three rounds.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { tableFromArrays } from 'apache-arrow';
import { S3FileSystem, init, readBinaryFiles, readParquet, readWebDataset, shutdown, type Dataset, type Row } from '../lib/index.js';
import { TAR_END, tarEntry } from '../lib/data/formats/tar.js';
import { ParquetDatasink } from '../lib/data/formats/index.js';
import { elapsedSeconds, median, nowNs, round, type Results, type Suite } from './harness.js';

const LATENCY_MS = 10;
const OBJECTS = 48;
const OBJECT_BYTES = 2 << 20;
const WRITE_BYTES = 64 << 20;
const MiB = 1 << 20;

async function startService(): Promise<{ endpoint: string; child: ChildProcess }> {
  const script = fileURLToPath(new URL('./s3-service.ts', import.meta.url));
  const child = spawn(process.execPath, ['--import', 'tsx', script, String(LATENCY_MS)], { stdio: ['pipe', 'pipe', 'inherit'] });
  const lines = createInterface({ input: child.stdout! });
  const port = await new Promise<string>((resolve, reject) => {
    lines.once('line', resolve);
    child.once('exit', (code) => reject(new Error(`the S3 service exited (${code}) before listening`)));
  });
  return { endpoint: `http://127.0.0.1:${port}`, child };
}

const keyOf = (index: number) => `s3://bench/blobs/${String(index).padStart(3, '0')}.bin`;

async function readObject(storage: S3FileSystem, path: string): Promise<number> {
  let bytes = 0;
  for await (const chunk of storage.readStream(path)) bytes += chunk.byteLength;
  return bytes;
}

/** Every object fetched from this process, `lanes` at once: MB/s. */
async function directRead(storage: S3FileSystem, lanes: number): Promise<number> {
  const start = nowNs();
  let next = 0;
  let total = 0;
  await Promise.all(Array.from({ length: lanes }, async () => {
    while (next < OBJECTS) {
      const bytes = await readObject(storage, keyOf(next++));
      total += bytes;
    }
  }));
  if (total !== OBJECTS * OBJECT_BYTES) throw new Error(`read ${total} bytes, expected ${OBJECTS * OBJECT_BYTES}`);
  return total / MiB / elapsedSeconds(start);
}

/** MB/s of a dataset's rows consumed in the driver, the bytes of `column` counted (they must add up to the 96 MiB). */
async function datasetRate(dataset: Dataset, column: string): Promise<number> {
  const start = nowNs();
  let total = 0;
  for await (const batch of dataset.iterBatches({ batchFormat: 'rows' })) {
    for (const row of batch as Row[]) total += (row[column] as Uint8Array).byteLength;
  }
  if (total !== OBJECTS * OBJECT_BYTES) throw new Error(`the dataset read ${total} bytes, expected ${OBJECTS * OBJECT_BYTES}`);
  return total / MiB / elapsedSeconds(start);
}

/** 48 objects of 2 MiB, a row each. */
const datasetRead = (storage: S3FileSystem) => datasetRate(readBinaryFiles('s3://bench/blobs', { filesystem: storage, parallelism: 4 }), 'bytes');
/** The same 96 MiB as 4 WebDataset shards of 12 samples (a 2 MiB `bin` and a small `json` each), read as samples. */
const webDatasetRead = (storage: S3FileSystem) => datasetRate(readWebDataset('s3://bench/shards', { filesystem: storage, parallelism: 4 }), 'bin');

async function timedWrite(write: () => Promise<void>): Promise<number> {
  const start = nowNs();
  await write();
  return WRITE_BYTES / MiB / elapsedSeconds(start);
}

async function servedBytes(endpoint: string): Promise<number> {
  return ((await (await fetch(`${endpoint}/__stats?reset`)).json()) as { bytesServed: number }).bytesServed;
}

export const storageSuite: Suite = {
  name: 'storage',
  ratios: [
    ['dataset read (4 read tasks) / the same GETs from one process, 8 in flight (the floor)', 'storage_read_MBps', 'storage_direct_read_MBps', ''],
    ['dataset read / one GET after another (the naive loop)', 'storage_read_MBps', 'storage_sequential_read_MBps', ''],
    ['the same bytes as 4 WebDataset shards (one GET each) / as 48 objects', 'storage_webdataset_read_MBps', 'storage_read_MBps', ''],
    ['multipart writer (8 MiB parts, 4 in flight) / one PUT of the same bytes', 'storage_write_MBps', 'storage_put_MBps', ''],
    ['bytes fetched for 1 of 8 Parquet columns / for all 8 (floor 0.125)', 'storage_parquet_projection_fetched_ratio', 'storage_parquet_projection_floor', ''],
  ],
  async run(): Promise<Results> {
    const { endpoint, child } = await startService();
    const credentials = { endpoint, region: 'test-region-1', accessKeyId: 'TESTKEY', secretAccessKey: 'test-secret' };
    const storage = new S3FileSystem(credentials);
    await init({ numCpus: 2 });
    try {
      const content = Buffer.alloc(OBJECT_BYTES, 7);
      await Promise.all(Array.from({ length: OBJECTS }, async (_, index) => {
        const file = await storage.create(keyOf(index));
        await file.write(content);
        await file.close();
      }));
      for (let shard = 0; shard < 4; shard++) {
        const file = await storage.create(`s3://bench/shards/${shard}.tar`);
        for (let sample = 0; sample < OBJECTS / 4; sample++) {
          const key = `${String(shard * 100 + sample).padStart(6, '0')}`;
          for (const piece of [...tarEntry(`${key}.bin`, content), ...tarEntry(`${key}.json`, Buffer.from(JSON.stringify({ shard, sample })))]) await file.write(piece);
        }
        await file.write(TAR_END);
        await file.close();
      }
      const columns = Object.fromEntries(Array.from({ length: 8 }, (_, column) => [`c${column}`, Float64Array.from({ length: 200_000 }, (_, row) => row * (column + 1) + Math.random())]));
      const sink = new ParquetDatasink('s3://bench/table', { filesystem: storage, compression: 'uncompressed' });
      await sink.onWriteStart();
      await sink.write([tableFromArrays(columns)], { writeId: 'bench', taskIndex: 0, attempt: 0 });

      await datasetRead(storage); // warm-up: workers started, connections open
      const dataset: number[] = [];
      const shards: number[] = [];
      const direct: number[] = [];
      const sequential: number[] = [];
      const multipart: number[] = [];
      const single: number[] = [];
      const payload = Buffer.alloc(WRITE_BYTES, 3);
      for (let round = 0; round < 3; round++) {
        dataset.push(await datasetRead(storage));
        shards.push(await webDatasetRead(storage));
        direct.push(await directRead(storage, 8));
        sequential.push(await directRead(storage, 1));
        multipart.push(await timedWrite(async () => {
          const file = await new S3FileSystem({ ...credentials, partBytes: 8 << 20, partsInFlight: 4 }).create('s3://bench/written/multipart.bin');
          for (let offset = 0; offset < WRITE_BYTES; offset += 1 << 20) await file.write(payload.subarray(offset, offset + (1 << 20)));
          await file.close();
        }));
        single.push(await timedWrite(async () => {
          // One PUT: a part size as large as the object keeps the writer from splitting it.
          const file = await new S3FileSystem({ ...credentials, partBytes: WRITE_BYTES + 1 }).create('s3://bench/written/single.bin');
          await file.write(payload);
          await file.close();
        }));
        console.error(`round ${round}: dataset ${dataset[round].toFixed(0)}, shards ${shards[round].toFixed(0)}, direct ${direct[round].toFixed(0)}, sequential ${sequential[round].toFixed(0)} MB/s; multipart ${multipart[round].toFixed(0)}, one PUT ${single[round].toFixed(0)} MB/s`);
      }
      await servedBytes(endpoint);
      const all = (await readParquet('s3://bench/table', { filesystem: storage }).takeAll()).length;
      const allBytes = await servedBytes(endpoint);
      const one = await readParquet('s3://bench/table', { filesystem: storage, columns: ['c3'] }).takeAll();
      const oneBytes = await servedBytes(endpoint);
      if (all !== 200_000 || one.length !== 200_000) throw new Error('the Parquet reads lost rows');
      return {
        storage_read_MBps: { value: round(median(dataset), 0), unit: 'MB/s' },
        storage_direct_read_MBps: { value: round(median(direct), 0), unit: 'MB/s' },
        storage_webdataset_read_MBps: { value: round(median(shards), 0), unit: 'MB/s' },
        storage_sequential_read_MBps: { value: round(median(sequential), 0), unit: 'MB/s' },
        storage_write_MBps: { value: round(median(multipart), 0), unit: 'MB/s' },
        storage_put_MBps: { value: round(median(single), 0), unit: 'MB/s' },
        storage_parquet_projection_fetched_ratio: { value: round(oneBytes / allBytes, 3), unit: 'ratio' },
        storage_parquet_projection_floor: { value: 0.125, unit: 'ratio' },
      };
    } finally {
      await shutdown();
      child.kill('SIGTERM');
    }
  },
};
