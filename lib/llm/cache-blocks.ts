/**
 * A rank's key/value cache in blocks (as vLLM pages it): every sequence's cache is a list of
 * blocks of CACHE_BLOCK_POSITIONS positions, each block holding those positions for all of the
 * rank's layers. Blocks come from slabs allocated on the device as the caches grow and are reused
 * once free, so:
 *  - a growing sequence takes one more block, never a copy of what it holds;
 *  - sequences with a common prefix share its blocks (prefix caching costs no copy), and a shared
 *    block is copied only when one of them writes into it (copy on write);
 *  - memory is never fragmented by sequences of many lengths: every block is the same size, so
 *    a freed one fits the next request exactly.
 * The attention kernels read a sequence's keys through its list of block addresses (the step's
 * layout, lib/llm/device-layers.ts).
 */
import { InvalidArgumentError } from '../errors.js';
import { CACHE_BLOCK_POSITIONS, type DeviceBuffer, type DeviceKernels } from './device-kernels.js';

/** Bytes a slab of blocks aims at: few allocations for large models, little unused room for small ones. */
const SLAB_BYTES = 32 * 2 ** 20;
const MAX_SLAB_BLOCKS = 256;

/** A device allocation holding blocks from `firstBlock` up to the next slab's, from its base address on. */
interface Slab {
  buffer: DeviceBuffer;
  firstBlock: number;
  /** The base address as a number (exact: device addresses are below 2^53). */
  base: number;
}

interface SequenceCache {
  /** Block ids, in position order: block i holds positions [i·B, (i+1)·B). */
  blocks: number[];
  /** Positions read so far. */
  length: number;
}

export class CacheBlocks {
  readonly kernels: DeviceKernels;
  /** Bytes of one block: every layer's keys and values of CACHE_BLOCK_POSITIONS positions. */
  readonly blockBytes: number;
  /** Blocks of a slab taken as the caches grow. */
  readonly #slabBlocks: number;
  readonly #slabs: Slab[] = [];
  /** Blocks the slabs hold. */
  #capacity = 0;
  /**
   * Blocks ever handed out: ids [0, #touched). Those above were never used and need no
   * bookkeeping, so a budget of millions of blocks taken at start (a small model on a large GPU)
   * costs one allocation, not a loop over every block.
   */
  #touched = 0;
  /** Free block ids below #touched; the most recently freed is handed out first (its memory is likeliest warm). */
  readonly #free: number[] = [];
  /** Per touched block id: the sequences holding it (0: free). */
  #references = new Int32Array(0);
  /** Per touched block id: its address, as low and high 32-bit words. */
  #addressWords = new Uint32Array(0);
  readonly #sequences = new Map<number, SequenceCache>();
  #copies = 0;

  constructor(kernels: DeviceKernels, blockBytes: number) {
    if (!(Number.isInteger(blockBytes) && blockBytes > 0)) throw new InvalidArgumentError(`a cache block needs a positive whole number of bytes, got ${blockBytes}`);
    this.kernels = kernels;
    this.blockBytes = blockBytes;
    this.#slabBlocks = CacheBlocks.slabBytes(blockBytes) / blockBytes;
  }

  /** Bytes of one slab of blocks of `blockBytes` each. */
  static slabBytes(blockBytes: number): number {
    return Math.max(1, Math.min(MAX_SLAB_BLOCKS, Math.floor(SLAB_BYTES / blockBytes))) * blockBytes;
  }

  /** Blocks a sequence of `length` positions holds. */
  static blocksFor(length: number): number {
    return Math.ceil(length / CACHE_BLOCK_POSITIONS);
  }

  /** Sequences holding positions. */
  get sequences(): number {
    return this.#sequences.size;
  }

  /** Device memory the slabs take (blocks in use and free ones kept for reuse). */
  get bytes(): number {
    return this.#capacity * this.blockBytes;
  }

  /** Blocks held by at least one sequence (a shared block counts once). */
  get blocksInUse(): number {
    return this.#touched - this.#free.length;
  }

  /**
   * Takes device memory for at least `blocks` blocks now, in one slab (a GPU rank's whole cache
   * budget, as vLLM takes it at start: a budget the device cannot hold fails here, not in the
   * middle of generating).
   */
  ensureBlocks(blocks: number): void {
    const missing = blocks - this.#capacity;
    if (missing > 0) this.#grow(missing);
  }

  /** Shared blocks copied because a sequence wrote into one. */
  get copies(): number {
    return this.#copies;
  }

  /** Positions of sequence `id` read so far (0: none). */
  length(id: number): number {
    return this.#sequences.get(id)?.length ?? 0;
  }

  /** Sequence `id`'s block ids (a copy of the list; empty: none). */
  blocksOf(id: number): number[] {
    return [...(this.#sequences.get(id)?.blocks ?? [])];
  }

  /** Holds blocks for `length` positions of sequence `id` (never fewer than it holds). */
  reserve(id: number, length: number): void {
    let cache = this.#sequences.get(id);
    if (!cache) {
      cache = { blocks: [], length: 0 };
      this.#sequences.set(id, cache);
    }
    const wanted = CacheBlocks.blocksFor(length);
    while (cache.blocks.length < wanted) cache.blocks.push(this.#take());
  }

  /**
   * Sequence `id` starts from the first `length` positions of sequence `from` (prefix caching):
   * it holds the same blocks, the last of them possibly in part (copied once either writes into it).
   */
  share(id: number, from: number, length: number): void {
    const source = this.#sequences.get(from);
    if (!source || source.length < length) throw new InvalidArgumentError(`sequence ${id} starts from ${length} positions of sequence ${from}, which this rank holds ${source ? source.length : 'none'} of`, 'ERR_SEQUENCE_STATE');
    if (this.#sequences.has(id)) throw new InvalidArgumentError(`sequence ${id} starts from another's prefix, but this rank already holds it`, 'ERR_SEQUENCE_STATE');
    const blocks = source.blocks.slice(0, CacheBlocks.blocksFor(length));
    for (const block of blocks) this.#references[block]++;
    this.#sequences.set(id, { blocks, length });
  }

  /**
   * Before a step writes positions [from, to) of sequence `id`: checks they follow what it has
   * read and fit what it holds, and gives it its own copy of any block there it shares.
   */
  prepareWrite(id: number, from: number, to: number): void {
    const cache = this.#sequences.get(id);
    if (!cache || cache.blocks.length < CacheBlocks.blocksFor(to)) {
      throw new InvalidArgumentError(`sequence ${id} has no cache room for positions up to ${to}`, 'ERR_SEQUENCE_STATE');
    }
    if (cache.length !== from) throw new InvalidArgumentError(`sequence ${id} says ${from} tokens came before, this rank has read ${cache.length}`, 'ERR_SEQUENCE_STATE');
    if (to <= from) return;
    for (let index = Math.floor(from / CACHE_BLOCK_POSITIONS); index < CacheBlocks.blocksFor(to); index++) {
      const block = cache.blocks[index];
      if (this.#references[block] === 1) continue;
      const copy = this.#take();
      // Queued on the backend's one stream: the step's writes come after it.
      this.kernels.copy(this.#slabOf(copy).buffer, this.#slabOf(block).buffer, this.blockBytes, this.#offsetOf(copy), this.#offsetOf(block));
      this.#drop(block);
      cache.blocks[index] = copy;
      this.#copies++;
    }
  }

  /** After a step: sequence `id` has read `length` positions. */
  setLength(id: number, length: number): void {
    const cache = this.#sequences.get(id);
    if (cache) cache.length = length;
  }

  /** Drops positions from `length` on (proposals not kept), and the blocks no longer needed. */
  truncate(id: number, length: number): void {
    const cache = this.#sequences.get(id);
    if (!cache || length >= cache.length) return;
    cache.length = length;
    const keep = CacheBlocks.blocksFor(length);
    for (const block of cache.blocks.splice(keep)) this.#drop(block);
  }

  release(id: number): void {
    const cache = this.#sequences.get(id);
    if (!cache) return;
    for (const block of cache.blocks) this.#drop(block);
    this.#sequences.delete(id);
  }

  /** Drops every sequence; the slabs stay for reuse. */
  clear(): void {
    for (const id of [...this.#sequences.keys()]) this.release(id);
  }

  /**
   * The addresses of sequence `id`'s first `count` blocks, written as 64-bit little-endian words
   * into `target` (32-bit halves: no BigInt a block) from address `index` on; returns how many.
   */
  writeAddresses(id: number, target: Uint32Array, index: number, count: number): number {
    const blocks = this.#sequences.get(id)?.blocks ?? [];
    const words = this.#addressWords;
    const written = Math.min(count, blocks.length);
    for (let offset = 0; offset < written; offset++) {
      const block = blocks[offset];
      target[2 * (index + offset)] = words[2 * block];
      target[2 * (index + offset) + 1] = words[2 * block + 1];
    }
    return written;
  }

  /** Blocks sequence `id` holds (0: none). */
  heldBlocks(id: number): number {
    return this.#sequences.get(id)?.blocks.length ?? 0;
  }

  /** Frees the slabs (queued work on the stream reading them must be done). */
  close(): void {
    this.#sequences.clear();
    for (const slab of this.#slabs) slab.buffer.free();
    this.#slabs.length = 0;
    this.#capacity = 0;
    this.#touched = 0;
    this.#free.length = 0;
    this.#references = new Int32Array(0);
    this.#addressWords = new Uint32Array(0);
  }

  #take(): number {
    let block = this.#free.pop();
    if (block === undefined) {
      if (this.#touched === this.#capacity) this.#grow(this.#slabBlocks);
      // Fresh blocks go out in address order.
      block = this.#touched++;
      this.#touch(block);
    }
    this.#references[block] = 1;
    return block;
  }

  /** Gives a block handed out for the first time its bookkeeping (arrays grown by doubling). */
  #touch(block: number): void {
    if (block >= this.#references.length) {
      const length = Math.min(this.#capacity, Math.max(64, 2 * this.#references.length));
      const references = new Int32Array(length);
      references.set(this.#references);
      this.#references = references;
      const words = new Uint32Array(2 * length);
      words.set(this.#addressWords);
      this.#addressWords = words;
    }
    const slab = this.#slabOf(block);
    const address = slab.base + (block - slab.firstBlock) * this.blockBytes;
    this.#addressWords[2 * block] = address % 2 ** 32;
    this.#addressWords[2 * block + 1] = Math.floor(address / 2 ** 32);
  }

  #drop(block: number): void {
    if (--this.#references[block] === 0) this.#free.push(block);
  }

  #grow(blocks: number): void {
    const buffer = this.kernels.allocate(blocks * this.blockBytes);
    const base = Number(buffer.address());
    if (!Number.isSafeInteger(base + blocks * this.blockBytes)) {
      buffer.free();
      throw new InvalidArgumentError(`a cache slab's device address ${buffer.address()} is past 2^53: its block addresses cannot be kept as numbers`);
    }
    this.#slabs.push({ buffer, firstBlock: this.#capacity, base });
    this.#capacity += blocks;
  }

  /** The slab holding `block` (slabs are few: a binary search over their first blocks). */
  #slabOf(block: number): Slab {
    const slabs = this.#slabs;
    let low = 0;
    let high = slabs.length - 1;
    while (low < high) {
      const middle = (low + high + 1) >> 1;
      if (slabs[middle].firstBlock <= block) low = middle;
      else high = middle - 1;
    }
    return slabs[low];
  }

  #offsetOf(block: number): number {
    return (block - this.#slabOf(block).firstBlock) * this.blockBytes;
  }
}
