/** Shared helpers for benchmark suites: metric records, timing, summary statistics. */

export interface Metric {
  value: number;
  unit: string;
}

export type Results = Record<string, Metric>;

/** A suite measures its own baseline or physical floor in the same run and names the ratios. */
export interface Suite {
  name: string;
  run(): Promise<Results>;
  /** [label, numerator metric, denominator metric, target] printed under the table. */
  ratios?: Array<[string, string, string, string]>;
}

export function nowNs(): bigint {
  return process.hrtime.bigint();
}

export function elapsedSeconds(start: bigint): number {
  return Number(process.hrtime.bigint() - start) / 1e9;
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = sorted.length >> 1;
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

/** Runs `body` `count` times and returns each run's seconds. */
export function timeRuns(count: number, body: () => void): number[] {
  const times: number[] = [];
  for (let i = 0; i < count; i++) {
    const start = nowNs();
    body();
    times.push(elapsedSeconds(start));
  }
  return times;
}

export function round(value: number, digits = 3): number {
  const scale = 10 ** digits;
  return Math.round(value * scale) / scale;
}

/**
 * The median rate of `rounds` rounds of `body` (each doing `count` operations), after one warm-up
 * round. One round swings with whatever else the machine does (a sync round trip is a few
 * scheduler wake-ups): the median of several is what a rerun reproduces.
 */
export async function medianRate(count: number, body: () => Promise<void>, rounds = 5): Promise<number> {
  await body();
  const rates: number[] = [];
  for (let round = 0; round < rounds; round++) {
    const start = nowNs();
    await body();
    rates.push(count / elapsedSeconds(start));
  }
  return median(rates);
}
