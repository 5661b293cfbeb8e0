/**
 * HTTP processor suite. A service in a process of its own answers each JSON POST after 20 ms (as a
 * model behind an API would). http_processor_rows_per_s: 4,000 rows through
 * buildHttpRequestProcessor (2 actors, 32 requests in flight each), start to finish, actor
 * start-up included; http_direct_rows_per_s, its floor: the same rows sent by plain fetch from
 * this process with the same 64 requests in flight and no runtime (at most 64 / 20 ms = 3,200
 * rows/s); http_sequential_rows_per_s, the naive baseline: one request after another (medians of
 * three alternating rounds). http_qps_requests_per_s against http_qps_limit: 600 rows through a
 * processor told qps 150, the rate the service saw them arrive at (from its first request to its
 * last: the rate the processor keeps to, its two actors pacing half each).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { buildHttpRequestProcessor, fromItems, init, remote, shutdown, type Row } from '../lib/index.js';
import { elapsedSeconds, median, nowNs, round, type Results, type Suite } from './harness.js';

const LATENCY_MS = 20;
const ROWS = 4_000;
const ACTORS = 2;
const IN_FLIGHT = 32;

export const labelRequest = remote(import.meta, function labelRequest(row: Row) {
  return { id: row.id, payload: { id: row.id, text: `review ${row.id as number}` } };
});

export const readLabel = remote(import.meta, function readLabel(row: Row) {
  return { id: row.id, label: (row.httpResponse as { label: string }).label };
});

async function startService(): Promise<{ url: string; child: ChildProcess }> {
  const script = fileURLToPath(new URL('./slow-service.mjs', import.meta.url));
  const child = spawn(process.execPath, [script, String(LATENCY_MS)], { stdio: ['ignore', 'pipe', 'inherit'] });
  const lines = createInterface({ input: child.stdout! });
  const port = await new Promise<string>((resolve, reject) => {
    lines.once('line', resolve);
    child.once('exit', (code) => reject(new Error(`the service exited (${code}) before listening`)));
  });
  return { url: `http://127.0.0.1:${port}/v1/label`, child };
}

function checkLabels(rows: Row[], count: number): void {
  if (rows.length !== count || rows.some((row) => row.label !== ((row.id as number) % 2 === 0 ? 'even' : 'odd'))) throw new Error('the processor lost or mislabeled rows');
}

async function processorRate(url: string, rows: number, extra: { qps?: number } = {}): Promise<number> {
  const processor = buildHttpRequestProcessor({ url, preprocess: labelRequest, postprocess: readLabel, concurrency: ACTORS, maxConcurrentRequests: IN_FLIGHT, batchSize: 64, ...extra });
  const start = nowNs();
  const out = await processor(fromItems(Array.from({ length: rows }, (_, id) => ({ id })), { parallelism: 16 })).takeAll();
  const seconds = elapsedSeconds(start);
  checkLabels(out, rows);
  return rows / seconds;
}

async function post(url: string, id: number): Promise<string> {
  const response = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ id, text: `review ${id}` }) });
  return ((await response.json()) as { label: string }).label;
}

/** `rows` requests from this process, `lanes` in flight at once. */
async function directRate(url: string, rows: number, lanes: number): Promise<number> {
  const start = nowNs();
  let next = 0;
  const labels = new Array<string>(rows);
  await Promise.all(Array.from({ length: lanes }, async () => {
    while (next < rows) {
      const id = next++;
      labels[id] = await post(url, id);
    }
  }));
  const seconds = elapsedSeconds(start);
  checkLabels(labels.map((label, id) => ({ id, label })), rows);
  return rows / seconds;
}

export const httpSuite: Suite = {
  name: 'http',
  ratios: [
    ['processor, 2 actors x 32 in flight / plain fetch from one process, 64 in flight (the floor)', 'http_processor_rows_per_s', 'http_direct_rows_per_s', ''],
    ['processor / one request after another (the naive loop)', 'http_processor_rows_per_s', 'http_sequential_rows_per_s', ''],
    ['processor told qps 150, as the service saw it / its limit', 'http_qps_requests_per_s', 'http_qps_limit', '≤ 1'],
  ],
  async run(): Promise<Results> {
    const { url, child } = await startService();
    await init({ numCpus: 2 });
    try {
      await processorRate(url, 200); // warm-up: workers started, connections open
      const processor: number[] = [];
      const direct: number[] = [];
      const sequential: number[] = [];
      for (let round = 0; round < 3; round++) {
        processor.push(await processorRate(url, ROWS));
        direct.push(await directRate(url, ROWS, ACTORS * IN_FLIGHT));
        sequential.push(await directRate(url, 100, 1));
        console.error(`round ${round}: processor ${processor[round].toFixed(0)}, direct ${direct[round].toFixed(0)}, sequential ${sequential[round].toFixed(1)} rows/s`);
      }
      await fetch(url); // the service's count starts afresh
      await processorRate(url, 600, { qps: 150 });
      const arrivals = (await (await fetch(url)).json()) as { count: number; first: number; last: number };
      const qps = (arrivals.count - 1) / ((arrivals.last - arrivals.first) / 1000);
      return {
        http_processor_rows_per_s: { value: round(median(processor), 0), unit: 'rows/s' },
        http_direct_rows_per_s: { value: round(median(direct), 0), unit: 'rows/s' },
        http_sequential_rows_per_s: { value: round(median(sequential), 1), unit: 'rows/s' },
        http_qps_requests_per_s: { value: round(qps, 1), unit: 'requests/s' },
        http_qps_limit: { value: 150, unit: 'requests/s' },
      };
    } finally {
      await shutdown();
      child.kill('SIGTERM');
    }
  },
};
