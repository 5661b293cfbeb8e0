/**
 * The actor that holds one rank of a sharded decoder. Its methods are what a replica's compiled
 * graph binds (forward) and what the replica calls around it (load, stats).
 */
import { TrellisError } from '../errors.js';
import { remote } from '../core/registry.js';
import { getCommunicator } from '../gpu/collective.js';
import { setKernelThreads } from './kernels.js';
import { DecoderShard, type ShardSpec, type StepMessage, type StepResult } from './shard.js';

/** What a rank reports once loaded: its weights' bytes, and on a GPU what is left for the cache. */
export interface ShardLoaded {
  weightBytes: number;
  device?: { freeBytes: number; totalBytes: number; bytesPerPosition: number; stepBytes: number };
}

export class ShardWorker {
  #shard: DecoderShard | undefined;

  /**
   * Reads this rank's weights; `group` names the stage's tensor-parallel group, when it has one.
   * `threads`: the threads this rank's kernels use (its process holds one rank).
   */
  async load(spec: ShardSpec, group?: string, threads = 1, step?: { tokens: number; sequences: number }): Promise<ShardLoaded> {
    setKernelThreads(threads);
    this.#shard = await DecoderShard.load(spec, group ? getCommunicator(group) : undefined);
    const device = step ? this.#shard.deviceMemory(step.tokens, step.sequences) : undefined;
    return { weightBytes: this.#shard.weightBytes, ...(device ? { device } : {}) };
  }

  /**
   * Runs this rank on one GPU (a physical index) of the actor that made the replica: called
   * before anything here touches CUDA, which reads CUDA_VISIBLE_DEVICES once per process.
   */
  useGpu(gpu: number): void {
    if (!Number.isInteger(gpu) || gpu < 0) throw new TrellisError('ERR_INVALID_ARGUMENT', `a GPU index is a non-negative integer, got ${gpu}`);
    process.env.CUDA_VISIBLE_DEVICES = String(gpu);
  }

  forward(message: StepMessage): Promise<StepMessage | StepResult> {
    if (!this.#shard) throw new TrellisError('ERR_SHARD_NOT_LOADED', 'forward before load: this rank has no weights yet');
    return this.#shard.forward(message);
  }

  /** Takes the memory of the replica's cache budget now (GPU ranks). */
  reserveCache(positions: number): void {
    if (!this.#shard) throw new TrellisError('ERR_SHARD_NOT_LOADED', 'reserveCache before load: this rank has no weights yet');
    this.#shard.reserveCache(positions);
  }

  /** Gives back the device memory, stream and kernels a GPU rank holds (the process's exit would too). */
  close(): void {
    this.#shard?.close();
    this.#shard = undefined;
  }

  stats(): { cachedSequences: number; weightBytes: number } {
    return { cachedSequences: this.#shard?.cachedSequences ?? 0, weightBytes: this.#shard?.weightBytes ?? 0 };
  }
}

export const RemoteShardWorker = remote(import.meta, ShardWorker);
