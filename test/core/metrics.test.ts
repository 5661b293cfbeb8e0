/**
 * Metrics: the driver's endpoint in the Prometheus text format (resources, stores, tasks and their
 * totals, a running data job operator by operator), closed at shutdown; a broker's metrics from
 * its status; the format's escaping.
 */
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DataContext, get, init, metricsText, range, serveMetrics, shutdown } from '../../lib/index.js';
import { Broker } from '../../lib/core/broker.js';
import { brokerMetrics, formatMetrics, serveMetricsText } from '../../lib/core/metrics.js';
import { dieOnce, fail, square } from './fixtures/core.js';
import { waitForFile } from '../data/fixtures/udfs.js';
import { rejection, until } from './helpers.js';

/** The value of one sample in a scrape, or undefined. */
function sample(text: string, name: string, labels = ''): number | undefined {
  const line = text.split('\n').find((entry) => entry.startsWith(`${name}${labels ? `{${labels}}` : ''} `));
  return line === undefined ? undefined : Number(line.slice(line.lastIndexOf(' ') + 1));
}

describe('the text format', () => {
  it('has HELP and TYPE lines and escapes label values', () => {
    const text = formatMetrics([
      { name: 'm_total', type: 'counter', help: 'a counter', samples: [{ labels: { path: 'a\\b "c"\nd' }, value: 3 }] },
      { name: 'g', type: 'gauge', help: 'a gauge', samples: [{ value: Infinity }, { value: NaN }] },
    ]);
    expect(text).toBe('# HELP m_total a counter\n# TYPE m_total counter\nm_total{path="a\\\\b \\"c\\"\\nd"} 3\n# HELP g a gauge\n# TYPE g gauge\ng +Inf\ng NaN\n');
  });
});

describe('a driver', () => {
  const dir = mkdtempSync(join(tmpdir(), 'trellis-metrics-test-'));
  beforeAll(async () => {
    DataContext.progress = false;
    await init({ numCpus: 2 });
  });
  afterAll(async () => {
    await shutdown();
    DataContext.progress = 'auto';
    rmSync(dir, { recursive: true, force: true });
  });

  it('serves its cluster at /metrics: resources, stores, workers, tasks and their totals', async () => {
    const server = await serveMetrics();
    expect(server.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
    const before = await (await fetch(server.url)).text();
    expect(before).toContain('# TYPE trellis_tasks_finished_total counter');
    expect(sample(before, 'trellis_node_resource_total', 'node="node-0",resource="CPU"')).toBe(2);
    expect(sample(before, 'trellis_store_capacity_bytes', 'node="node-0"')).toBeGreaterThan(0);
    const finished = sample(before, 'trellis_tasks_finished_total')!;
    const failed = sample(before, 'trellis_tasks_failed_total')!;
    const retried = sample(before, 'trellis_tasks_retried_total')!;
    await get(Array.from({ length: 10 }, (_, index) => square.remote(index)));
    await rejection(get(fail.remote('no')));
    expect(await get(dieOnce.options({ maxRetries: 1 }).remote(join(dir, 'died')))).toBe('survived');
    const after = await (await fetch(server.url)).text();
    expect(sample(after, 'trellis_tasks_finished_total')).toBe(finished + 11);
    expect(sample(after, 'trellis_tasks_failed_total')).toBe(failed + 1);
    expect(sample(after, 'trellis_tasks_retried_total')).toBe(retried + 1);
    // Run times by function: cumulative buckets up to +Inf, which is the count.
    expect(after).toContain('# TYPE trellis_task_duration_seconds histogram');
    const buckets = after.split('\n').filter((line) => line.startsWith('trellis_task_duration_seconds_bucket{name="square",'));
    const counts = buckets.map((line) => Number(line.slice(line.lastIndexOf(' ') + 1)));
    expect(counts.length).toBeGreaterThan(10);
    expect(counts).toEqual([...counts].sort((a, b) => a - b));
    expect(buckets.at(-1)).toMatch(/le="\+Inf"\} 10$/);
    expect(sample(after, 'trellis_task_duration_seconds_count', 'name="square"')).toBe(10);
    expect(sample(after, 'trellis_task_duration_seconds_sum', 'name="square"')).toBeGreaterThan(0);
    expect((await fetch(server.url.replace('/metrics', '/other'))).status).toBe(404);
    await server.close();
    await expect(fetch(server.url)).rejects.toThrow();
  });

  it("shows a running data job's operators, then counts it when it ends", async () => {
    const gate = join(dir, 'gate');
    const job = range(100, { parallelism: 4 }).mapBatches(waitForFile, { batchSize: null, batchFormat: 'arrow', fnArgs: [gate] }).count();
    let text = '';
    await until(() => {
      text = metricsText();
      return sample(text, 'trellis_data_jobs_running') === 1 && (text.match(/trellis_data_operator_active_tasks\{[^}]*\} [1-9]/) !== null);
    }, 'the job to be running');
    expect(text).toMatch(/trellis_data_operator_rows_total\{job_id="\d+",job="Dataset\.count",operator="0:ReadRange->MapBatches\(waitForFile\)"\} 0/);
    expect(text).toMatch(/trellis_data_job_budget_bytes\{job_id="\d+",job="Dataset\.count"\} \d+/);
    const succeeded = sample(text, 'trellis_data_jobs_total', 'outcome="succeeded"')!;
    const rowsBefore = sample(text, 'trellis_data_rows_out_total')!;
    await import('node:fs').then(({ writeFileSync }) => writeFileSync(gate, ''));
    expect(await job).toBe(100);
    text = metricsText();
    expect(sample(text, 'trellis_data_jobs_running')).toBe(0);
    expect(sample(text, 'trellis_data_jobs_total', 'outcome="succeeded"')).toBe(succeeded + 1);
    expect(sample(text, 'trellis_data_rows_out_total')).toBeGreaterThan(rowsBefore);
    expect(text).not.toContain('trellis_data_operator_rows_total{');
    expect(existsSync(gate)).toBe(true);
  });

  it('closes its endpoints at shutdown, and refuses to serve without a cluster or on a bad port', async () => {
    await expect(serveMetrics({ port: 70_000 })).rejects.toThrow(/port must be an integer/);
    const server = await serveMetrics();
    await shutdown();
    await expect(fetch(server.url)).rejects.toThrow();
    expect((await rejection(serveMetrics())).code).toBe('ERR_NOT_INITIALIZED');
    expect(() => metricsText()).toThrow(expect.objectContaining({ code: 'ERR_NOT_INITIALIZED' }));
    await init({ numCpus: 2 });
  });
});

describe('a broker', () => {
  it("serves its hosts and jobs from its status (what `trellis broker --metrics-port` serves)", async () => {
    const broker = await Broker.start({ host: '127.0.0.1', port: 0, token: 'metrics-test' });
    try {
      const server = await serveMetricsText(() => formatMetrics(brokerMetrics(broker.status())));
      const text = await (await fetch(server.url)).text();
      expect(sample(text, 'trellis_broker_jobs', 'state="joined"')).toBe(0);
      expect(sample(text, 'trellis_broker_slices_lent_total')).toBe(0);
      expect(sample(text, 'trellis_broker_preemptions_total')).toBe(0);
      expect(text).toContain('# TYPE trellis_broker_host_resource_free gauge');
      await server.close();
    } finally {
      await broker.close();
    }
    const status = {
      t: 'status' as const,
      maxShare: 1,
      preemptGraceMs: 30_000,
      hosts: [{ hostId: 'host-a', hostname: 'a', total: { CPU: 8, GPU: 2 }, free: { CPU: 6, GPU: 0 }, sessions: 2 }],
      drivers: [
        { jobId: 'j1', name: 'alice-job', user: 'alice', address: 'x', wait: 'all' as const, priority: 0, bundles: 2, granted: 2, preempting: 0, borrowed: 1, released: 0, waitingMs: 5000, nodes: [] },
        { jobId: 'j2', name: 'bob-job', user: 'bob', address: 'y', wait: 'all' as const, priority: 5, bundles: 3, granted: 1, preempting: 0, borrowed: 0, released: 0, waitingMs: 2500, nodes: [] },
      ],
    };
    const text = formatMetrics(brokerMetrics(status));
    expect(sample(text, 'trellis_broker_host_resource_free', 'host="host-a",resource="GPU"')).toBe(0);
    expect(sample(text, 'trellis_broker_host_sessions', 'host="host-a"')).toBe(2);
    expect(sample(text, 'trellis_broker_jobs', 'state="waiting"')).toBe(1);
    expect(sample(text, 'trellis_broker_job_bundles', 'job="j1",name="alice-job",user="alice",state="borrowed"')).toBe(1);
    expect(sample(text, 'trellis_broker_job_waiting_seconds', 'job="j2",name="bob-job",user="bob"')).toBe(2.5);
    expect(sample(text, 'trellis_broker_job_waiting_seconds', 'job="j1",name="alice-job",user="alice"')).toBe(0);
    expect(sample(text, 'trellis_broker_user_bundles_lent', 'user="bob"')).toBe(1);
  });
});
