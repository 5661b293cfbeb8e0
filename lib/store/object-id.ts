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
