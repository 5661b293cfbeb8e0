/**
 * Giving blocks exported over CUDA IPC back to the CUDA driver. A producer's allocator keeps its
 * exported blocks when they are freed, even through `cuda.emptyCache()`: cuMemFree of memory another
 * process still maps is undefined behaviour, and readers keep idle mappings for the next result in
 * the same block. A block goes back after a round through the cluster: the producer lists its free
 * exported blocks, every other process closes its idle mappings of them and names those it still
 * uses, and the producer frees those that nobody maps and that stayed free meanwhile.
 *
 * Rounds start on their own, in any process of the cluster that exported something:
 * - for blocks left free for `reclaimIpcAfterMs` (init's option, or TRELLIS_RECLAIM_IPC_AFTER_MS;
 *   10 s by default, 0: never), so a pipeline whose tensor sizes changed for good gives back what
 *   it no longer uses, while one that reuses its blocks within milliseconds keeps them mapped;
 * - for every free exported block after `cuda.emptyCache()`, and after an allocation that ran out
 *   of memory (a retry can then find it).
 * `reclaimIpcMemory()` runs a round now and says how much it freed.
 */
import { currentRuntime, hasRuntime } from '../core/runtime-context.js';
import { environmentNumber } from '../core/settings.js';
import { exportedFreeBlocks, freeExportedBlocks, watchExportedBlocks } from './cuda.js';

export const DEFAULT_RECLAIM_IPC_AFTER_MS = 10_000;
/** The longest wait accepted: a day. */
export const MAX_RECLAIM_IPC_AFTER_MS = 86_400_000;

/**
 * Gives the blocks this process exported over CUDA IPC, and has since freed, back to the CUDA
 * driver, once every other process of the cluster has closed its idle mappings of them (see
 * above). Idle blocks go back on their own after a while; call it to have them back now, in an
 * actor whose exported tensors' sizes changed for good (after a warm-up with larger batches, say).
 * `cuda.emptyCache()` releases the rest of the cache.
 */
export async function reclaimIpcMemory(device = 0): Promise<{ freedBytes: number }> {
  return { freedBytes: await reclaim(device, 0) };
}

/** One round for the free exported blocks of `device` left free for at least `idleMs`. */
async function reclaim(device: number, idleMs: number): Promise<number> {
  const blocks = exportedFreeBlocks(device).filter((block) => block.idleMs >= idleMs);
  if (blocks.length === 0) return 0;
  const hex = (handle: Uint8Array) => Buffer.from(handle).toString('hex');
  const stillMapped = new Set((await currentRuntime().closeIpcMappings(blocks.map((block) => block.handle))).map(hex));
  const ids = blocks.filter((block) => !stillMapped.has(hex(block.handle))).map((block) => block.id);
  return ids.length > 0 ? freeExportedBlocks(device, ids) : 0;
}

/** The wait before idle exported blocks go back: TRELLIS_RECLAIM_IPC_AFTER_MS, else the default. */
export function reclaimIpcAfterMs(): number {
  return environmentNumber('TRELLIS_RECLAIM_IPC_AFTER_MS', MAX_RECLAIM_IPC_AFTER_MS) ?? DEFAULT_RECLAIM_IPC_AFTER_MS;
}

export interface IdleReclaimStats {
  /** Rounds started on their own (idle blocks, an emptied cache, out of memory). */
  rounds: number;
  /** Bytes those rounds gave back to the driver. */
  freedBytes: number;
  /** Rounds that failed (the cluster shutting down, say); the blocks stay cached. */
  failures: number;
}

/**
 * Starts rounds for the devices this process exported from: a check of their idle blocks every
 * quarter of the wait (a native list, no message), and a round at once when asked. One round at a
 * time; a wish that comes during one is kept for after it.
 */
class IdleReclaimer {
  readonly stats: IdleReclaimStats = { rounds: 0, freedBytes: 0, failures: 0 };
  readonly #devices = new Set<number>();
  #afterMs: number | undefined;
  #timer: NodeJS.Timeout | undefined;
  #round: Promise<void> | undefined;
  /** Devices to give all free exported blocks back for after the current round. */
  #wanted = new Set<number>();

  configure(afterMs: number): void {
    this.#afterMs = afterMs;
    clearInterval(this.#timer);
    this.#timer = undefined;
    this.#startTimer();
  }

  exporting(device: number): void {
    this.#devices.add(device);
    this.#startTimer();
  }

  releaseSoon(device?: number): void {
    for (const each of device === undefined ? this.#devices : [device]) {
      if (this.#devices.has(each)) this.#wanted.add(each);
    }
    this.#next();
  }

  #startTimer(): void {
    this.#afterMs ??= reclaimIpcAfterMs();
    if (this.#timer || this.#afterMs === 0 || this.#devices.size === 0) return;
    this.#timer = setInterval(() => this.#next(), Math.max(10, this.#afterMs / 4)).unref();
  }

  /** Starts a round if none runs: for the wanted devices (every free block), else idle blocks. */
  #next(): void {
    if (this.#round || !hasRuntime()) return;
    const afterMs = this.#afterMs ?? reclaimIpcAfterMs();
    let due: Array<[number, number]>;
    if (this.#wanted.size > 0) {
      due = [...this.#wanted].map((device) => [device, 0]);
      this.#wanted.clear();
    } else if (afterMs > 0) {
      due = [...this.#devices].filter((device) => exportedFreeBlocks(device).some((block) => block.idleMs >= afterMs)).map((device) => [device, afterMs]);
    } else {
      return;
    }
    if (due.length === 0) return;
    this.stats.rounds++;
    this.#round = (async () => {
      for (const [device, idleMs] of due) this.stats.freedBytes += await reclaim(device, idleMs);
    })()
      .catch(() => {
        this.stats.failures++;
      })
      .finally(() => {
        this.#round = undefined;
        if (this.#wanted.size > 0) this.#next();
      });
  }
}

const reclaimer = new IdleReclaimer();
watchExportedBlocks(reclaimer);

/** Sets this process's wait (init's option, in the driver); workers read their environment. */
export function configureIpcReclaim(afterMs?: number): void {
  reclaimer.configure(afterMs ?? reclaimIpcAfterMs());
}

/** What the automatic rounds of this process did (for tests and diagnostics). */
export function idleReclaimStats(): IdleReclaimStats {
  return { ...reclaimer.stats };
}
