import { randomBytes } from 'node:crypto';
import { InvalidArgumentError } from '../errors.js';

/** An object's id: 20 random bytes, written as 40 lowercase hex characters. */
export type ObjectId = string;

const pattern = /^[0-9a-f]{40}$/;

// Ids are drawn in batches: one randomBytes call per id would dominate small puts.
let pool = Buffer.alloc(0);
let poolOffset = 0;

export function newObjectId(): ObjectId {
  if (poolOffset + 20 > pool.length) {
    pool = randomBytes(20 * 512);
    poolOffset = 0;
  }
  const id = pool.toString('hex', poolOffset, poolOffset + 20);
  poolOffset += 20;
  return id;
}

/**
 * The `n`th id of a sequence drawn from 20 random `base` bytes: `base` with its first eight bytes
 * XORed with a scrambling of `n`. A worker names the objects it puts this way, so that once it dies
 * its driver can find (by trying the ids after the last one it heard of) those it put and never got
 * to report. The store's index hashes the first eight bytes with linear probing: `n` itself would
 * fill a run of adjacent slots, which every other id landing in it would probe through, so its low
 * half goes through a bijective mix (murmur3's finalizer) first.
 */
export function sequentialObjectId(base: Uint8Array, n: number): ObjectId {
  if (base.byteLength !== 20) throw new InvalidArgumentError(`an id sequence base must be 20 bytes, got ${base.byteLength}`);
  if (!Number.isSafeInteger(n) || n < 0) throw new InvalidArgumentError(`an id sequence number must be a non-negative integer, got ${n}`);
  const bytes = Buffer.from(base);
  bytes.writeUInt32LE((bytes.readUInt32LE(0) ^ mix32(n % 2 ** 32)) >>> 0, 0);
  bytes.writeUInt32LE((bytes.readUInt32LE(4) ^ Math.floor(n / 2 ** 32)) >>> 0, 4);
  return bytes.toString('hex');
}

/**
 * The base of the ids a task's stored puts take in one attempt: its return id with bytes 8-11
 * XORed with a scrambling of `attempt + 1` (never zero, so the first put differs from the return
 * id itself). Rerunning the task under the same return id and attempt (as lineage reconstruction
 * does) names its puts the same again, so refs to them that others hold stay good.
 */
export function taskPutBase(returnId: ObjectId, attempt: number): Uint8Array {
  const bytes = Buffer.from(returnId, 'hex');
  if (bytes.byteLength !== 20) throw new InvalidArgumentError(`a task's return id must be 40 hex characters, got '${returnId}'`);
  bytes.writeUInt32LE((bytes.readUInt32LE(8) ^ mix32(attempt + 1)) >>> 0, 8);
  return bytes;
}

/**
 * The id of return `index` of a call with several (numReturns): index 0 is the call's return id
 * itself; another is the return id with bytes 12-15 XORed with a scrambling of `index`, bytes no
 * put or item id of the call touches (taskPutBase and sequentialObjectId change bytes 0-11), so the
 * caller and the worker each name every return without a word between them.
 */
export function returnIdAt(returnId: ObjectId, index: number): ObjectId {
  if (index === 0) return returnId;
  const bytes = Buffer.from(returnId, 'hex');
  if (bytes.byteLength !== 20) throw new InvalidArgumentError(`a task's return id must be 40 hex characters, got '${returnId}'`);
  bytes.writeUInt32LE((bytes.readUInt32LE(12) ^ mix32(index)) >>> 0, 12);
  return bytes.toString('hex');
}

function mix32(value: number): number {
  let h = value >>> 0;
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

export function isObjectId(value: unknown): value is ObjectId {
  return typeof value === 'string' && pattern.test(value);
}

export function assertObjectId(value: unknown): asserts value is ObjectId {
  if (!isObjectId(value)) {
    throw new InvalidArgumentError(
      `object id must be 40 lowercase hex characters, got ${typeof value === 'string' ? `'${value}'` : typeof value}`,
      'ERR_INVALID_OBJECT_ID',
    );
  }
}
