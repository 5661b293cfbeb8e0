/**
 * Typed errors. Every error trellis raises is a TrellisError with a stable `code`; native failures
 * arrive already typed (lib/native.ts registers {@link errorFromNative} with the addon).
 */

export class TrellisError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

/** A caller passed something malformed: a bad id, a negative size, a wrong type. */
export class InvalidArgumentError extends TrellisError {
  constructor(message: string, code = 'ERR_INVALID_ARGUMENT') {
    super(code, message);
  }
}

/** A failed system call inside the native core. */
export class NativeSystemError extends TrellisError {
  readonly syscall: string;
  readonly errno: number;
  constructor(message: string, details: { syscall?: string; errno?: number }) {
    super('ERR_SYSTEM', message);
    this.syscall = details.syscall ?? '';
    this.errno = details.errno ?? 0;
  }
}

export class ObjectStoreError extends TrellisError {}

/** A create with an id that is already in the store. */
export class ObjectExistsError extends ObjectStoreError {}

/** An operation on an id the store does not hold. */
export class ObjectNotFoundError extends ObjectStoreError {}

/** An operation the object's state forbids: a write after seal, a double seal. */
export class ObjectStateError extends ObjectStoreError {}

/** Nothing could be freed or spilled to make room. Names the request, the capacity and the use. */
export class ObjectStoreFullError extends ObjectStoreError {
  readonly requested: number;
  readonly capacity: number;
  readonly used: number;
  constructor(code: string, message: string, details: { requested?: number; capacity?: number; used?: number }) {
    super(code, message);
    this.requested = details.requested ?? 0;
    this.capacity = details.capacity ?? 0;
    this.used = details.used ?? 0;
  }
}

/** A single object larger than the whole store. */
export class ObjectTooLargeError extends ObjectStoreFullError {}

/** `get` waited its whole timeout for an object that was not sealed. */
export class GetTimeoutError extends TrellisError {
  constructor(message: string) {
    super('ERR_GET_TIMEOUT', message);
  }
}

/** The store (or runtime) was closed in this process. */
export class StoreClosedError extends ObjectStoreError {}

/** Maps a native error code to its class; called by the addon for every native failure. */
export function errorFromNative(code: string, message: string, details: Record<string, unknown>): Error {
  switch (code) {
    case 'ERR_INVALID_ARGUMENT':
    case 'ERR_INVALID_OBJECT_ID':
    case 'ERR_OUT_OF_RANGE':
      return new InvalidArgumentError(message, code);
    case 'ERR_SYSTEM':
      return new NativeSystemError(message, details as { syscall?: string; errno?: number });
    case 'ERR_OBJECT_EXISTS':
    case 'ERR_SEGMENT_EXISTS':
      return new ObjectExistsError(code, message);
    case 'ERR_OBJECT_NOT_FOUND':
    case 'ERR_SEGMENT_NOT_FOUND':
      return new ObjectNotFoundError(code, message);
    case 'ERR_OBJECT_SEALED':
    case 'ERR_OBJECT_STATE':
      return new ObjectStateError(code, message);
    case 'ERR_OBJECT_STORE_FULL':
      return new ObjectStoreFullError(code, message, details);
    case 'ERR_OBJECT_TOO_LARGE':
      return new ObjectTooLargeError(code, message, details);
    case 'ERR_STORE_CLOSED':
      return new StoreClosedError(code, message);
    default:
      return new ObjectStoreError(code, message);
  }
}
