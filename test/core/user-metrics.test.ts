/**
 * Application metrics (Counter, Gauge, Histogram) recorded in the driver, in tasks and in actors,
 * added up by the driver and served with its own metrics.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Counter, Gauge, Histogram, InvalidArgumentError, events, get, init, kill, metricsText, shutdown } from '../../lib/index.js';
import { RemoteQueueActor, conflicting, dieAfterRecording, handleRows } from './fixtures/user-metrics.js';
import { openGate, scratch, started, until } from './helpers.js';

const files = scratch();

beforeAll(async () => {
  await init({ numCpus: 2 });
});

afterAll(async () => {
  await shutdown();
  files.cleanup();
});

/** The value of one sample line (name with its suffix, labels as written), or undefined. */
function sample(text: string, series: string): number | undefined {
  const line = text.split('\n').find((candidate) => candidate.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

describe('application metrics', () => {
  it('serves what the driver records: counters, gauges and cumulative histogram buckets', () => {
    const requests = new Counter('driver_requests_total', { description: 'Requests the driver saw.', tagKeys: ['route'] });
    requests.inc(1, { route: '/a' });
    requests.inc(2.5, { route: '/a' });
    requests.inc(undefined, { route: '/b' });
    new Gauge('driver_temperature').set(-3.5);
    const latency = new Histogram('driver_latency_seconds', { boundaries: [0.1, 1] });
    for (const value of [0.05, 0.1, 0.5, 2]) latency.observe(value);
    const text = metricsText();
    expect(text).toContain('# HELP driver_requests_total Requests the driver saw.\n# TYPE driver_requests_total counter\n');
    expect(sample(text, 'driver_requests_total{route="/a"}')).toBe(3.5);
    expect(sample(text, 'driver_requests_total{route="/b"}')).toBe(1);
    expect(text).toContain('# TYPE driver_temperature gauge\n');
    expect(sample(text, 'driver_temperature')).toBe(-3.5);
    // A bound includes values equal to it (Prometheus's `le`).
    expect(sample(text, 'driver_latency_seconds_bucket{le="0.1"}')).toBe(2);
    expect(sample(text, 'driver_latency_seconds_bucket{le="1"}')).toBe(3);
    expect(sample(text, 'driver_latency_seconds_bucket{le="+Inf"}')).toBe(4);
    expect(sample(text, 'driver_latency_seconds_sum')).toBeCloseTo(2.65, 10);
    expect(sample(text, 'driver_latency_seconds_count')).toBe(4);
    // Counters keep their totals from scrape to scrape.
    requests.inc(1, { route: '/b' });
    expect(sample(metricsText(), 'driver_requests_total{route="/b"}')).toBe(2);
  });

  it('adds up what tasks record in their workers, reported before each result', async () => {
    const pids = await get([1, 2, 3, 4, 5, 6, 7, 8].map((count) => handleRows.remote(count, count % 2 ? 'odd' : 'even')));
    expect(new Set(pids).size).toBeGreaterThan(0);
    const text = metricsText();
    expect(sample(text, 'fixture_rows_total{stage="odd"}')).toBe(1 + 3 + 5 + 7);
    expect(sample(text, 'fixture_rows_total{stage="even"}')).toBe(2 + 4 + 6 + 8);
    expect(sample(text, 'fixture_batch_size_bucket{stage="odd",le="1"}')).toBe(1);
    expect(sample(text, 'fixture_batch_size_bucket{stage="odd",le="8"}')).toBe(4);
    expect(sample(text, 'fixture_batch_size_bucket{stage="even",le="64"}')).toBe(4);
    expect(sample(text, 'fixture_batch_size_count{stage="even"}')).toBe(4);
    expect(text).toContain('# HELP fixture_batch_size Rows per batch.\n# TYPE fixture_batch_size histogram\n');
  });

  it('takes gauges from actors (the value set last) and reports a long call while it runs', async () => {
    const first = RemoteQueueActor.remote('first');
    const second = RemoteQueueActor.remote('second');
    await get([first.push.remote(5), second.push.remote(2)]);
    await get(first.pop.remote());
    let text = metricsText();
    expect(sample(text, 'fixture_queue_depth{actor="first"}')).toBe(4);
    expect(sample(text, 'fixture_queue_depth{actor="second"}')).toBe(2);
    const gate = files.path('steps-gate');
    const call = first.steps.remote(gate);
    await until(() => started(gate), 'the long call to start');
    // Reported within a second or so while the call still runs.
    await until(() => (sample(metricsText(), 'fixture_progress_total') ?? 0) > 0, 'progress from a running call');
    openGate(gate);
    expect(await get(call)).toBe('done');
    text = metricsText();
    expect(sample(text, 'fixture_progress_total')).toBeGreaterThan(0);
    kill(first);
    kill(second);
  });

  it('keeps what a dead worker reported, and loses only what it never did', async () => {
    const before = sample(metricsText(), 'fixture_rows_total{stage="odd"}')!;
    await get(handleRows.remote(9, 'odd'));
    await expect(get(dieAfterRecording.remote())).rejects.toThrow();
    const text = metricsText();
    expect(sample(text, 'fixture_rows_total{stage="odd"}')).toBe(before + 9);
    expect(sample(text, 'fixture_rows_total{stage="lost"}')).toBeUndefined();
  });

  it('refuses bad definitions and recordings by name', () => {
    const invalid = (make: () => unknown, message: RegExp) => {
      expect(make).toThrow(InvalidArgumentError);
      expect(make).toThrow(message);
    };
    invalid(() => new Counter('9lives'), /metric name is letters/);
    invalid(() => new Counter('trellis_mine'), /trellis's own metrics/);
    invalid(() => new Counter('tagged_total', { tagKeys: ['ok', 'bad-key'] }), /tag key "bad-key"/);
    invalid(() => new Counter('tagged_total', { tagKeys: ['a', 'a'] }), /repeats/);
    invalid(() => new Histogram('sizes', { boundaries: [] }), /non-empty array/);
    invalid(() => new Histogram('sizes', { boundaries: [1, 1] }), /must increase, but 1 follows 1/);
    invalid(() => new Histogram('sizes', { boundaries: [1, Number.NaN] }), /boundary 1 is not a finite number/);
    invalid(() => new Histogram('sizes', { boundaries: [1], tagKeys: ['le'] }), /'le' names a histogram's buckets/);
    const counter = new Counter('checked_total', { tagKeys: ['route'] });
    invalid(() => counter.inc(-1, { route: '/' }), /only goes up, got -1/);
    invalid(() => counter.inc(Number.POSITIVE_INFINITY, { route: '/' }), /finite number/);
    invalid(() => counter.inc(1), /missing tag route/);
    invalid(() => counter.inc(1, { route: '/', method: 'GET' }), /tag "method" is not one of its tagKeys \[route\]/);
    invalid(() => counter.inc(1, { route: 7 as unknown as string }), /tag route must be a string, got number/);
    // A second definition of a name must match the first in this process.
    expect(() => new Counter('checked_total', { tagKeys: ['route'] })).not.toThrow();
    expect(() => new Gauge('checked_total', { tagKeys: ['route'] })).toThrow(/already defines "checked_total" as a counter with tags \[route\], not a gauge/);
    // Default tags fill what a recording leaves out.
    counter.setDefaultTags({ route: '/default' });
    counter.inc();
    expect(sample(metricsText(), 'checked_total{route="/default"}')).toBe(1);
  });

  it('warns once of a worker recording a name defined otherwise, and keeps the first definition', async () => {
    new Counter('driver_defined_counter_total').inc(3);
    expect(sample(metricsText(), 'driver_defined_counter_total')).toBe(3);
    const warnings: string[] = [];
    const onWarning = (warning: { kind: string; message: string }) => {
      if (warning.kind === 'metrics') warnings.push(warning.message);
    };
    events().on('warning', onWarning);
    try {
      expect(await get(conflicting.remote())).toBe('recorded');
      expect(await get(conflicting.remote())).toBe('recorded');
    } finally {
      events().off('warning', onWarning);
    }
    expect(warnings).toEqual(['metric driver_defined_counter_total was defined as a counter with no tags, and a process recorded it as a gauge with no tags: those recordings are left out']);
    expect(sample(metricsText(), 'driver_defined_counter_total')).toBe(3);
  });
});
