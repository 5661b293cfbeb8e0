/**
 * Metrics an application defines (as Ray's ray.util.metrics): a Counter, a Gauge or a Histogram,
 * made anywhere (the driver, a task, an actor) and recorded with tags. Each process keeps what it
 * recorded since it last reported; a worker reports before each call's result and at least every
 * second while anything is unreported, and the driver adds every process's reports into one
 * series per name and tag set, served with its own metrics (metrics.ts). Counters and histograms
 * sum across processes (a worker that dies keeps what it reported); a gauge's series takes the
 * value set last, from whichever process.
 */
import { InvalidArgumentError } from '../errors.js';
import type { MetricFamily } from './metrics.js';

export type MetricTags = Record<string, string>;

export interface MetricOptions {
  /** The help text scrapes show. */
  description?: string;
  /** The tags every recording names (a default tag counts); no others are taken. */
  tagKeys?: readonly string[];
}

export interface HistogramOptions extends MetricOptions {
  /** Upper bounds of the buckets, increasing (a last bucket to +Inf is added). */
  boundaries: readonly number[];
}

type Kind = 'counter' | 'gauge' | 'histogram';

/** What defines a metric: two definitions of one name must agree. */
interface Definition {
  name: string;
  kind: Kind;
  description: string;
  tagKeys: readonly string[];
  boundaries?: readonly number[];
}

/** One series' recordings since the last report (or, in the driver's totals, since the start). */
interface SeriesState {
  tags: MetricTags;
  /** Counter: the sum; gauge: the last value. */
  value: number;
  /** Histogram: counts per bucket (not cumulative), the last for +Inf. */
  buckets?: number[];
  sum?: number;
  count?: number;
}

/** A batch of one metric's recordings, as a worker reports it. */
export interface MetricUpdate {
  definition: Definition;
  series: SeriesState[];
}

/** More series than this per metric are dropped: a tag with unbounded values would grow without end. */
export const MAX_SERIES_PER_METRIC = 10_000;
const NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const TAG = /^[a-zA-Z_][a-zA-Z0-9_]*$/;

/** This process's definitions, by name. */
const definitions = new Map<string, Definition>();
/** Recordings not yet reported (in a worker) or not yet added to the totals (in the driver). */
const pending = new Map<string, { definition: Definition; series: Map<string, SeriesState> }>();
let onFirstPending: (() => void) | undefined;

/** Told once per batch: when something is recorded with nothing pending (a worker schedules its report). */
export function onMetricsPending(callback: (() => void) | undefined): void {
  onFirstPending = callback;
}

/** Takes this process's unreported recordings (undefined when there are none). */
export function takeMetricUpdates(): MetricUpdate[] | undefined {
  if (pending.size === 0) return undefined;
  const updates = [...pending.values()].map(({ definition, series }) => ({ definition, series: [...series.values()] }));
  pending.clear();
  return updates;
}

function sameDefinition(a: Definition, b: Definition): boolean {
  return a.kind === b.kind && a.tagKeys.join('\u0000') === b.tagKeys.join('\u0000') && (a.boundaries ?? []).join(',') === (b.boundaries ?? []).join(',');
}

function describeDefinition(definition: Definition): string {
  const tags = definition.tagKeys.length ? ` with tags [${definition.tagKeys.join(', ')}]` : ' with no tags';
  const bounds = definition.boundaries ? ` and boundaries [${definition.boundaries.join(', ')}]` : '';
  return `a ${definition.kind}${tags}${bounds}`;
}

/** Set while trellis defines one of its own metrics through this module (see libraryMetric). */
let definingLibraryMetric = false;

/**
 * Makes one of trellis's own metrics (a 'trellis_' name) as an application's are made, so that
 * processes other than the driver report it the same way (a proxy on another node, its requests).
 */
export function libraryMetric<T>(make: () => T): T {
  definingLibraryMetric = true;
  try {
    return make();
  } finally {
    definingLibraryMetric = false;
  }
}

abstract class Metric {
  readonly name: string;
  readonly description: string;
  readonly tagKeys: readonly string[];
  readonly #definition: Definition;
  #defaultTags: MetricTags = {};

  protected constructor(kind: Kind, name: string, options: MetricOptions, boundaries?: readonly number[]) {
    const what = `${kind} ${JSON.stringify(name)}`;
    if (typeof name !== 'string' || !NAME.test(name)) throw new InvalidArgumentError(`${what}: a metric name is letters, digits, '_' and ':', not starting with a digit`);
    if (name.startsWith('trellis_') && !definingLibraryMetric) throw new InvalidArgumentError(`${what}: names starting with 'trellis_' are trellis's own metrics; choose another`);
    const tagKeys = options.tagKeys ?? [];
    if (!Array.isArray(tagKeys)) throw new InvalidArgumentError(`${what}: tagKeys must be an array of tag names`);
    for (const key of tagKeys) {
      if (typeof key !== 'string' || !TAG.test(key) || key.startsWith('__')) throw new InvalidArgumentError(`${what}: tag key ${JSON.stringify(key)} is not a valid name (letters, digits and '_', not starting with a digit or '__')`);
      if (kind === 'histogram' && key === 'le') throw new InvalidArgumentError(`${what}: 'le' names a histogram's buckets and cannot be a tag`);
    }
    if (new Set(tagKeys).size !== tagKeys.length) throw new InvalidArgumentError(`${what}: tagKeys repeats a name`);
    if (options.description !== undefined && typeof options.description !== 'string') throw new InvalidArgumentError(`${what}: description must be a string`);
    this.name = name;
    this.description = options.description ?? '';
    this.tagKeys = Object.freeze([...tagKeys]);
    const definition: Definition = { name, kind, description: this.description, tagKeys: this.tagKeys, ...(boundaries ? { boundaries } : {}) };
    const known = definitions.get(name);
    if (known && !sameDefinition(known, definition)) {
      throw new InvalidArgumentError(`${what}: this process already defines ${JSON.stringify(name)} as ${describeDefinition(known)}, not ${describeDefinition(definition)}`, 'ERR_METRIC_CONFLICT');
    }
    this.#definition = known ?? definition;
    definitions.set(name, this.#definition);
  }

  /** Tags every recording of this object gets unless it names them itself. */
  setDefaultTags(tags: MetricTags): this {
    this.#defaultTags = { ...this.#checkTags(tags, 'setDefaultTags', false) };
    return this;
  }

  #checkTags(tags: MetricTags | undefined, where: string, complete: boolean): MetricTags {
    const merged: MetricTags = { ...this.#defaultTags };
    if (tags !== undefined) {
      if (tags === null || typeof tags !== 'object') throw new InvalidArgumentError(`${this.name}.${where}: tags must be an object of tag names to strings`);
      for (const [key, value] of Object.entries(tags)) {
        if (!this.tagKeys.includes(key)) throw new InvalidArgumentError(`${this.name}.${where}: tag ${JSON.stringify(key)} is not one of its tagKeys [${this.tagKeys.join(', ')}]`);
        if (typeof value !== 'string') throw new InvalidArgumentError(`${this.name}.${where}: tag ${key} must be a string, got ${typeof value}`);
        merged[key] = value;
      }
    }
    if (complete) {
      const missing = this.tagKeys.filter((key) => merged[key] === undefined);
      if (missing.length > 0) throw new InvalidArgumentError(`${this.name}.${where}: missing tag${missing.length > 1 ? 's' : ''} ${missing.join(', ')} (give them here or with setDefaultTags)`);
    }
    return merged;
  }

  /** The pending series for `tags` (checked and completed), made if need be; undefined past the cap. */
  protected series(tags: MetricTags | undefined, where: string): SeriesState | undefined {
    const full = this.#checkTags(tags, where, true);
    let entry = pending.get(this.name);
    if (!entry) {
      if (pending.size === 0) onFirstPending?.();
      pending.set(this.name, (entry = { definition: this.#definition, series: new Map() }));
    }
    const key = seriesKey(this.tagKeys, full);
    let series = entry.series.get(key);
    if (!series) {
      if (entry.series.size >= MAX_SERIES_PER_METRIC) return undefined;
      series = this.#definition.kind === 'histogram' ? { tags: full, value: 0, buckets: new Array(this.#definition.boundaries!.length + 1).fill(0), sum: 0, count: 0 } : { tags: full, value: 0 };
      entry.series.set(key, series);
    }
    return series;
  }
}

function seriesKey(tagKeys: readonly string[], tags: MetricTags): string {
  return tagKeys.map((key) => tags[key]).join('\u0000');
}

function checkValue(name: string, where: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value)) throw new InvalidArgumentError(`${name}.${where}: the value must be a finite number, got ${String(value)}`);
  return value;
}

/** A count that only goes up (requests served, rows written), summed over every process. */
export class Counter extends Metric {
  constructor(name: string, options: MetricOptions = {}) {
    super('counter', name, options);
  }

  inc(value = 1, tags?: MetricTags): void {
    checkValue(this.name, 'inc', value);
    if (value < 0) throw new InvalidArgumentError(`${this.name}.inc: a counter only goes up, got ${value}`);
    const series = this.series(tags, 'inc');
    if (series) series.value += value;
  }
}

/** A value that goes up and down (a queue's depth, a cache's bytes): the last one set wins. */
export class Gauge extends Metric {
  constructor(name: string, options: MetricOptions = {}) {
    super('gauge', name, options);
  }

  set(value: number, tags?: MetricTags): void {
    checkValue(this.name, 'set', value);
    const series = this.series(tags, 'set');
    if (series) series.value = value;
  }
}

/** A distribution (latencies, batch sizes) in buckets, with its sum and count. */
export class Histogram extends Metric {
  readonly boundaries: readonly number[];

  constructor(name: string, options: HistogramOptions) {
    const boundaries = options?.boundaries;
    if (!Array.isArray(boundaries) || boundaries.length === 0) throw new InvalidArgumentError(`histogram ${JSON.stringify(name)}: boundaries must be a non-empty array of increasing numbers`);
    boundaries.forEach((bound, index) => {
      if (typeof bound !== 'number' || !Number.isFinite(bound)) throw new InvalidArgumentError(`histogram ${JSON.stringify(name)}: boundary ${index} is not a finite number (${String(bound)})`);
      if (index > 0 && bound <= boundaries[index - 1]) throw new InvalidArgumentError(`histogram ${JSON.stringify(name)}: boundaries must increase, but ${bound} follows ${boundaries[index - 1]}`);
    });
    const frozen = Object.freeze([...boundaries]);
    super('histogram', name, options, frozen);
    this.boundaries = frozen;
  }

  observe(value: number, tags?: MetricTags): void {
    checkValue(this.name, 'observe', value);
    const series = this.series(tags, 'observe');
    if (!series) return;
    let bucket = 0;
    while (bucket < this.boundaries.length && value > this.boundaries[bucket]) bucket++;
    series.buckets![bucket]++;
    series.sum! += value;
    series.count!++;
  }
}

/**
 * The driver's totals: every process's reports added up. Kept for the driver process's life, as
 * a Prometheus client's registry is (counters must not go back when a cluster restarts).
 */
const totals = new Map<string, { definition: Definition; series: Map<string, SeriesState> }>();
/** Problems already told (each once: a conflicting worker reports every second). */
const told = new Set<string>();

function tell(problems: string[], key: string, problem: string): void {
  if (told.has(key)) return;
  told.add(key);
  problems.push(problem);
}

/**
 * Adds reports (a worker's, or the driver's own) to the totals. A metric whose definition differs
 * from the one the totals hold is left out; the reasons come back, one per metric.
 */
export function addMetricUpdates(updates: readonly MetricUpdate[]): string[] {
  const problems: string[] = [];
  for (const update of updates) {
    const { definition } = update;
    let entry = totals.get(definition.name);
    if (!entry) totals.set(definition.name, (entry = { definition, series: new Map() }));
    else if (!sameDefinition(entry.definition, definition)) {
      tell(problems, `${definition.name}\u0000${describeDefinition(definition)}`, `metric ${definition.name} was defined as ${describeDefinition(entry.definition)}, and a process recorded it as ${describeDefinition(definition)}: those recordings are left out`);
      continue;
    }
    let dropped = false;
    for (const series of update.series) {
      const key = seriesKey(definition.tagKeys, series.tags);
      const total = entry.series.get(key);
      if (!total) {
        if (entry.series.size >= MAX_SERIES_PER_METRIC) {
          dropped = true;
          continue;
        }
        entry.series.set(key, { ...series, ...(series.buckets ? { buckets: [...series.buckets] } : {}) });
      } else if (definition.kind === 'gauge') {
        total.value = series.value;
      } else if (definition.kind === 'counter') {
        total.value += series.value;
      } else {
        series.buckets!.forEach((count, index) => (total.buckets![index] += count));
        total.sum! += series.sum!;
        total.count! += series.count!;
      }
    }
    if (dropped) tell(problems, `${definition.name}\u0000series`, `metric ${definition.name} has more than ${MAX_SERIES_PER_METRIC} tag sets: recordings of new ones are left out`);
  }
  return problems;
}

/** The totals as metric families, the driver's own recordings added first. */
export function userMetricFamilies(): { families: MetricFamily[]; problems: string[] } {
  const own = takeMetricUpdates();
  const problems = own ? addMetricUpdates(own) : [];
  const families: MetricFamily[] = [];
  for (const { definition, series } of totals.values()) {
    const metric: MetricFamily = { name: definition.name, type: definition.kind, help: definition.description || `${definition.kind} ${definition.name}, defined by the application`, samples: [] };
    for (const entry of series.values()) {
      if (definition.kind !== 'histogram') {
        metric.samples.push({ labels: entry.tags, value: entry.value });
        continue;
      }
      let cumulative = 0;
      definition.boundaries!.forEach((bound, index) => {
        cumulative += entry.buckets![index];
        metric.samples.push({ suffix: '_bucket', labels: { ...entry.tags, le: String(bound) }, value: cumulative });
      });
      metric.samples.push({ suffix: '_bucket', labels: { ...entry.tags, le: '+Inf' }, value: entry.count! });
      metric.samples.push({ suffix: '_sum', labels: entry.tags, value: entry.sum! });
      metric.samples.push({ suffix: '_count', labels: entry.tags, value: entry.count! });
    }
    families.push(metric);
  }
  return { families, problems };
}
