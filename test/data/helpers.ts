/** Helpers shared by the data suite (not a test file, not imported by workers). */
import { existsSync, readdirSync } from 'node:fs';
import { basename, dirname } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { afterAll, afterEach, beforeAll, beforeEach } from 'vitest';
import { DataContext, init, isInitialized, memorySummary, shutdown, state, type InitOptions, type JobProgress, type ProgressReporter } from '../../lib/index.js';
import { scratch, until } from '../core/helpers.js';

export { until, scratch, openGate, isAlive, rejection } from '../core/helpers.js';

setFlagsFromString('--expose-gc');
/** A full garbage collection in this process (the driver's views pin what they read until collected). */
export const collectGarbage = runInNewContext('gc') as () => void;

/** Objects the driver knows, and bytes and objects in the (first) node's store. */
export function storeUse(): { objects: number; bytes: number; stored: number } {
  const cluster = state();
  return { objects: cluster.objects.count, bytes: cluster.nodes[0].store.bytesInUse, stored: cluster.nodes[0].store.objectCount };
}

/** Waits until every object made since `baseline` is gone from the driver's table and the store. */
export async function expectReleased(baseline: ReturnType<typeof storeUse>, what = 'the job'): Promise<void> {
  let last = storeUse();
  try {
    await until(() => {
      collectGarbage();
      last = storeUse();
      return last.objects <= baseline.objects && last.bytes <= baseline.bytes && last.stored <= baseline.stored;
    }, `${what} to release its objects`);
  } catch (error) {
    // Who keeps what is left: objects only pins keep, and pinned objects still referenced.
    const summary = await memorySummary();
    const pinned = { unreferenced: summary.unreferencedPins, referenced: summary.objects.filter((object) => object.pinnedBy.length > 0) };
    throw new Error(`${(error as Error).message}: baseline ${JSON.stringify(baseline)}, now ${JSON.stringify(last)}, pinned ${JSON.stringify(pinned)}`);
  }
}

/** Pids of processes that marked `${gate}.started.${pid}`. */
export function startedPids(gate: string): number[] {
  const prefix = `${basename(gate)}.started.`;
  if (!existsSync(dirname(gate))) return [];
  return readdirSync(dirname(gate))
    .filter((name) => name.startsWith(prefix))
    .map((name) => Number(name.slice(prefix.length)));
}

/** A progress reporter that keeps every snapshot. */
export class RecordingReporter implements ProgressReporter {
  readonly snapshots: JobProgress[] = [];
  finished?: { progress: JobProgress; error?: Error };
  update(progress: JobProgress): void {
    this.snapshots.push(structuredClone(progress));
  }
  finish(progress: JobProgress, error?: Error): void {
    this.finished = { progress: structuredClone(progress), error };
  }
  get last(): JobProgress | undefined {
    return this.snapshots[this.snapshots.length - 1];
  }
}

/** Actors of a class alive in the cluster. */
export function liveActors(className: string): Array<{ actorId: string; pid?: number; state: string }> {
  return state().actors.filter((actor) => actor.className === className && actor.state !== 'dead');
}

export async function waitUntil(condition: () => boolean, what: string, guardMs?: number): Promise<void> {
  await until(condition, what, guardMs);
}

/**
 * One cluster for a test file, without progress output; after each passing test, `settle` waits for
 * what the file's jobs leave running to end, then the store and the driver's table must be back
 * where they were: every job lets go of its blocks. Returns the file's scratch directory and
 * the baseline (a test that keeps objects on purpose moves it).
 */
export function useDataCluster(
  options: InitOptions,
  settle?: () => Promise<void>,
): { scratchDir: ReturnType<typeof scratch>; baseline: ReturnType<typeof storeUse> } {
  const scratchDir = scratch();
  const cluster = { scratchDir, baseline: { objects: 0, bytes: 0, stored: 0 } };
  beforeAll(async () => {
    DataContext.progress = false;
    await init(options);
  });
  afterAll(async () => {
    await shutdown();
    DataContext.progress = 'auto';
    scratchDir.cleanup();
  });
  beforeEach(() => {
    cluster.baseline = storeUse();
  });
  afterEach(async (context) => {
    if (context.task.result?.state === 'fail' || !isInitialized()) return;
    await settle?.();
    await expectReleased(cluster.baseline, context.task.name);
  });
  return cluster;
}
