import { afterAll, beforeAll, describe, expect, it, onTestFinished } from 'vitest';
import { readdirSync } from 'node:fs';
import { basename, dirname } from 'node:path';
import { init, shutdown, range, fromItems, readDatasource, TrellisError } from '../../lib/index.js';
import { double, isEven, addColumn, Scaler, NumbersSource, GatedModel } from './fixtures/udfs.js';
import { rejection, scratch, until } from '../core/helpers.js';

beforeAll(async () => { await init({ numCpus: 2 }); });
afterAll(async () => { await shutdown(); });

it('range map filter', async () => {
  const rows = await range(100, { parallelism: 4 }).map(double).filter(isEven).take(5, { progress: false });
  expect(rows).toEqual([0, 2, 4, 6, 8].map((id) => ({ id, doubled: id * 2 })));
  expect(await range(1000).count()).toBe(1000);
  expect(await range(1000).filter(isEven).count({ progress: false })).toBe(500);
});
it('mapBatches class', async () => {
  const rows = await readDatasource(new NumbersSource(100, 5)).mapBatches(Scaler, { constructorArgs: [3], batchSize: 16, concurrency: [1, 2] }).takeAll({ progress: false });
  expect(rows.length).toBe(100);
  expect(rows[10].scaled).toBe(30);
  const cols = await fromItems([{id: 1}, {id: 2}]).mapBatches(addColumn).takeAll({ progress: false });
  expect(cols).toEqual([{id:1, squared:1},{id:2,squared:4}]);
});
it('writes through a fused sink', async () => {
  const { mkdtempSync, readdirSync, readFileSync, rmSync } = await import('node:fs');
  const { LinesSink } = await import('./fixtures/udfs.js');
  const dir = mkdtempSync('/tmp/trellis-sink-');
  onTestFinished(() => rmSync(dir, { recursive: true, force: true }));
  const sink = new LinesSink(dir);
  const results = await readDatasource(new NumbersSource(100, 5)).mapBatches(Scaler, { constructorArgs: [2], batchSize: 16 }).write(sink, { progress: false });
  expect(results.length).toBe(7); // 100 rows in exact batches of 16
  expect(sink.completed?.length).toBe(7);
  const lines = readdirSync(dir).flatMap((file) => readFileSync(`${dir}/${file}`, 'utf8').trim().split('\n'));
  expect(lines.length).toBe(100);
});
it('round-trips files through the cluster', async () => {
  const { mkdtempSync, rmSync } = await import('node:fs');
  const { readParquet, readJsonl, readCsv } = await import('../../lib/index.js');
  const dir = mkdtempSync('/tmp/trellis-files-');
  onTestFinished(() => rmSync(dir, { recursive: true, force: true }));
  const base = range(1000, { parallelism: 4 }).map(double);
  const written = await base.writeParquet(`${dir}/pq`, { progress: false });
  expect(written.reduce((sum, file) => sum + file.rows, 0)).toBe(1000);
  await base.writeJsonl(`${dir}/jsonl`, { progress: false });
  await base.writeCsv(`${dir}/csv`, { progress: false });
  for (const dataset of [readParquet(`${dir}/pq`), readJsonl(`${dir}/jsonl`), readCsv(`${dir}/csv`)]) {
    const rows = await dataset.takeAll({ progress: false });
    expect(rows.length).toBe(1000);
    expect(rows.map((row) => Number(row.doubled)).sort((a, b) => a - b)[999]).toBe(1998);
  }
});

// Last: it shuts the suite's cluster down, and starts and shuts down one of its own under a running job.
describe('a cluster shut down while a job runs', () => {
  it('fails the job with a TrellisError', async () => {
    const files = scratch();
    try {
      await shutdown();
      await init({ numCpus: 1 });
      const gate = files.path('gate');
      const rows = Array.from({ length: 40 }, (_, id) => ({ id }));
      const job = fromItems(rows, { parallelism: 4 }).mapBatches(GatedModel, { concurrency: [1, 3], batchSize: 10, fnArgs: [gate] }).takeAll();
      job.catch(() => undefined);
      await until(() => readdirSync(dirname(gate)).some((name) => name.startsWith(`${basename(gate)}.started.`)), 'a batch to start');
      await shutdown();
      const error = await rejection(job);
      expect(error).toBeInstanceOf(TrellisError);
    } finally {
      files.cleanup();
    }
  });
});
