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
    case 'ERR_CHANNEL_CLOSED':
    case 'ERR_CHANNEL_TIMEOUT':
    case 'ERR_CHANNEL_NOT_FOUND':
    case 'ERR_CHANNEL_FULL':
    case 'ERR_CHANNEL_EMPTY':
      return new ChannelError(code, message);
    case 'ERR_COMMUNICATOR_ABORTED':
    case 'ERR_COMMUNICATOR_TIMEOUT':
    case 'ERR_COMMUNICATOR_DESTROYED':
    case 'ERR_COMMUNICATOR_NOT_FOUND':
    case 'ERR_PEER_DIED':
    case 'ERR_COMMUNICATOR':
      return new CommunicatorError(code, message);
    case 'ERR_CUDA':
    case 'ERR_CUDA_UNAVAILABLE':
    case 'ERR_CUDA_FREED':
      return new CudaError(code, message, details);
    case 'ERR_NCCL':
    case 'ERR_NCCL_UNAVAILABLE':
    case 'ERR_NCCL_TIMEOUT':
    case 'ERR_NCCL_ABORTED':
    case 'ERR_NCCL_DESTROYED':
      return new NcclError(code, message, details);
    case 'ERR_IMAGE_DECODE':
    case 'ERR_IMAGE_UNSUPPORTED':
    case 'ERR_IMAGE_TOO_LARGE':
      return new ImageError(code, message);
    default:
      return new ObjectStoreError(code, message);
  }
}

/** What a remote error looked like where it was thrown. */
export interface RemoteErrorInfo {
  name: string;
  message: string;
  code?: string;
  stack?: string;
}

/**
 * A task or actor method threw. `cause` is an Error carrying the original name, message and code;
 * `remoteStack` is the stack where it was thrown.
 */
export class TaskError extends TrellisError {
  readonly taskName: string;
  readonly remoteStack: string;
  constructor(taskName: string, info: RemoteErrorInfo) {
    const cause = Object.assign(new Error(info.message), { name: info.name }) as Error & { code?: string };
    if (info.code !== undefined) cause.code = info.code;
    cause.stack = info.stack ?? `${info.name}: ${info.message}`;
    super('ERR_TASK_FAILED', `${taskName} failed: ${info.name}: ${info.message}`, { cause });
    this.taskName = taskName;
    this.remoteStack = info.stack ?? '';
  }
}

/** A Queue had no room for a put that would not wait, or stayed full past its timeout. */
export class QueueFullError extends TrellisError {
  constructor(message: string) {
    super('ERR_QUEUE_FULL', message);
  }
}

/** A Queue had no item for a get that would not wait, or stayed empty past its timeout. */
export class QueueEmptyError extends TrellisError {
  constructor(message: string) {
    super('ERR_QUEUE_EMPTY', message);
  }
}

/** The worker running a task died, and the task has no retries left. */
export class WorkerCrashedError extends TrellisError {
  constructor(message: string) {
    super('ERR_WORKER_CRASHED', message);
  }
}

/** The actor is dead (killed, crashed past maxRestarts, or its constructor failed). */
export class ActorDiedError extends TrellisError {
  readonly actorId: string;
  constructor(actorId: string, message: string) {
    super('ERR_ACTOR_DIED', message);
    this.actorId = actorId;
  }
}

/** An object's value is gone and cannot be recomputed (a lost `put`, or a freed object). */
export class ObjectLostError extends TrellisError {
  readonly objectId: string;
  constructor(objectId: string, message: string) {
    super('ERR_OBJECT_LOST', message);
    this.objectId = objectId;
  }
}

/**
 * A node left the cluster (its agent's connection closed): its workers are gone and the objects
 * only it held are lost (tasks recompute theirs from lineage).
 */
export class NodeLostError extends TrellisError {
  readonly nodeId: string;
  constructor(nodeId: string, message: string) {
    super('ERR_NODE_LOST', message);
    this.nodeId = nodeId;
  }
}

/**
 * The owner of an object is gone, so the object can never be read. The driver owns every object
 * of its cluster: this arises only in a worker whose driver went away, for its get, wait and
 * other requests pending then or made afterwards. `objectIds` names the objects asked for.
 */
export class OwnerDiedError extends TrellisError {
  readonly objectIds: readonly string[];
  constructor(message: string, objectIds: readonly string[] = []) {
    super('ERR_OWNER_DIED', message);
    this.objectIds = objectIds;
  }
}

/**
 * A shared cluster's broker could not lend what a driver asked for: unreachable, refused (token,
 * version), bundles no host can hold, a wait that ran out, or a lent host that could not reach the
 * driver. The `code` says which.
 */
export class ClusterError extends TrellisError {}

/**
 * A working directory that cannot be shipped (runtimeEnv: code-package.ts): too large
 * (ERR_WORKING_DIR_TOO_LARGE, naming its largest parts), changed while packed, or a package that
 * arrived damaged or names files outside its directory (ERR_CODE_PACKAGE).
 */
export class CodePackageError extends TrellisError {}

/** No node of the cluster could ever provide what a task or actor asks for. */
export class InfeasibleTaskError extends TrellisError {
  readonly missing: Record<string, number>;
  constructor(message: string, missing: Record<string, number>) {
    super('ERR_INFEASIBLE', message);
    this.missing = missing;
  }
}

/** The task was cancelled before it finished. */
export class TaskCancelledError extends TrellisError {
  constructor(message: string) {
    super('ERR_TASK_CANCELLED', message);
  }
}

/** An operation needs `init()` first, or ran after `shutdown()`. */
export class NotInitializedError extends TrellisError {
  constructor(message = 'trellis is not initialized: call init() first') {
    super('ERR_NOT_INITIALIZED', message);
  }
}

/** A remote function or class was used wrongly: not registered at module top level, bad name. */
export class RegistrationError extends TrellisError {
  constructor(message: string) {
    super('ERR_REGISTRATION', message);
  }
}

/** A value cannot be sent to another process. */
export class SerializationError extends TrellisError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_SERIALIZATION', message, options);
  }
}

/** A collective or point-to-point operation failed: aborted group, dead peer, timeout. */
export class CommunicatorError extends TrellisError {}

/**
 * A CUDA driver call failed ('ERR_CUDA'; `call` names it, `result` is its CUresult), CUDA is not
 * available here ('ERR_CUDA_UNAVAILABLE'), or freed memory or a destroyed stream was used
 * ('ERR_CUDA_FREED').
 */
export class CudaError extends TrellisError {
  readonly call: string;
  readonly result: number;
  constructor(code: string, message: string, details: { call?: unknown; result?: unknown } = {}) {
    super(code, message);
    this.call = typeof details.call === 'string' ? details.call : '';
    this.result = typeof details.result === 'number' ? details.result : 0;
  }
}

/**
 * An NCCL call failed ('ERR_NCCL'; `call` names it, `result` is its ncclResult_t), NCCL is not
 * available ('ERR_NCCL_UNAVAILABLE'), an operation outlived the communicator's timeout and the
 * communicator was aborted ('ERR_NCCL_TIMEOUT'), or it was aborted or destroyed
 * ('ERR_NCCL_ABORTED', 'ERR_NCCL_DESTROYED'). A CommunicatorError, like the CPU communicator's.
 */
export class NcclError extends CommunicatorError {
  readonly call: string;
  readonly result: number;
  constructor(code: string, message: string, details: { call?: unknown; result?: unknown } = {}) {
    super(code, message);
    this.call = typeof details.call === 'string' ? details.call : '';
    this.result = typeof details.result === 'number' ? details.result : 0;
  }
}

/** A compiled graph's channel was closed (teardown, an actor's death) or an operation timed out. */
export class ChannelError extends TrellisError {}

/**
 * A dataset job failed. Names the operator and, where one block caused it, the block and its row
 * range; `cause` carries the underlying error (a TaskError for a throwing UDF).
 */
export class DataError extends TrellisError {
  readonly operator?: string;
  readonly block?: number;
  readonly rows?: readonly [number, number];
  constructor(code: string, message: string, details: { operator?: string; block?: number; rows?: readonly [number, number]; cause?: unknown } = {}) {
    super(code, message, { cause: details.cause });
    this.operator = details.operator;
    this.block = details.block;
    this.rows = details.rows;
  }
}

/** No operator of a dataset made progress within the watchdog's window. */
export class DataStallError extends DataError {}

/**
 * A model checkpoint or configuration that cannot be used: names the file and tensor where known.
 * Checkpoint reading uses 'ERR_SAFETENSORS_HEADER' (malformed header), 'ERR_SAFETENSORS_RANGE'
 * (offsets outside the file, overlapping, or not matching dtype and shape), 'ERR_SAFETENSORS_DTYPE'
 * (a dtype it cannot convert), 'ERR_CHECKPOINT_INDEX' (a malformed index), 'ERR_TENSOR_NOT_FOUND',
 * 'ERR_CHECKPOINT_NOT_FOUND' and 'ERR_CHECKPOINT_CLOSED'.
 */
export class ModelLoadError extends TrellisError {
  readonly file?: string;
  readonly tensor?: string;
  constructor(code: string, message: string, details: { file?: string; tensor?: string; cause?: unknown } = {}) {
    super(code, message, { cause: details.cause });
    this.file = details.file;
    this.tensor = details.tensor;
  }
}

/**
 * A pattern or JSON schema for guided decoding that cannot be compiled: a regex with syntax the
 * guide does not support (lookaround, backreferences), one that is malformed, or a schema keyword
 * it cannot enforce. `position` is the regex's offending character (in code points); `schemaPath`
 * the schema's offending part ('#/properties/age').
 */
export class GrammarError extends InvalidArgumentError {
  readonly position?: number;
  readonly schemaPath?: string;
  constructor(message: string, details: { position?: number; schemaPath?: string } = {}) {
    super(message, 'ERR_GRAMMAR');
    this.position = details.position;
    this.schemaPath = details.schemaPath;
  }
}

/**
 * Serving failed: a deployment that could not start (its constructor threw past its retries, or
 * no node can hold a replica), or a call to an application that is gone. `deployment` names it.
 */
export class DeploymentError extends TrellisError {
  readonly deployment: string;
  constructor(deployment: string, message: string, code = 'ERR_DEPLOYMENT') {
    super(code, message);
    this.deployment = deployment;
  }
}

/**
 * A deployment's replicas are all at `maxOngoingRequests` and its callers' queue is at
 * `maxQueuedRequests`: the request was refused rather than queued (HTTP: 503).
 */
export class BackPressureError extends DeploymentError {
  constructor(deployment: string, message: string) {
    super(deployment, message, 'ERR_BACKPRESSURE');
  }
}

/**
 * A request of an HTTP batch processor failed for good: 'ERR_HTTP_STATUS' (an answer that is not
 * 2xx, after the retries its status allows), 'ERR_HTTP_TIMEOUT', 'ERR_HTTP_NETWORK' (no answer:
 * refused, reset), 'ERR_HTTP_RESPONSE' (a JSON answer that does not parse) or 'ERR_HTTP_PAYLOAD'
 * (a row with nothing to send). `status` is the last answer's, `attempts` how many were sent.
 */
export class HttpRequestError extends TrellisError {
  readonly url: string;
  readonly status?: number;
  readonly attempts: number;
  constructor(code: string, message: string, details: { url: string; status?: number; attempts: number; cause?: unknown }) {
    super(code, message, { cause: details.cause });
    this.url = details.url;
    this.status = details.status;
    this.attempts = details.attempts;
  }
}

/**
 * Object storage refused or failed a request for good: 'ERR_STORAGE_NOT_FOUND' (no such bucket or
 * key), 'ERR_STORAGE_ACCESS' (403: credentials wrong, expired or not allowed),
 * 'ERR_STORAGE_REQUEST' (another 4xx), 'ERR_STORAGE_UNAVAILABLE' (5xx, throttling or no answer,
 * after the retries). `storageCode` is the service's own (NoSuchKey, AccessDenied, SlowDown).
 */
export class StorageError extends TrellisError {
  readonly url: string;
  readonly status?: number;
  readonly storageCode?: string;
  readonly attempts: number;
  constructor(code: string, message: string, details: { url: string; status?: number; storageCode?: string; attempts: number; cause?: unknown }) {
    super(code, message, { cause: details.cause });
    this.url = details.url;
    this.status = details.status;
    this.storageCode = details.storageCode;
    this.attempts = details.attempts;
  }
}

/**
 * An image could not be decoded: damaged or truncated data (`ERR_IMAGE_DECODE`), a format or
 * variant the decoders do not read (`ERR_IMAGE_UNSUPPORTED`: GIF, WebP, arithmetic-coded JPEG) or
 * more pixels than allowed (`ERR_IMAGE_TOO_LARGE`). `source` names the file where one is known.
 */
export class ImageError extends TrellisError {
  readonly source?: string;
  constructor(code: string, message: string, details: { source?: string; cause?: unknown } = {}) {
    super(code, details.source ? `${details.source}: ${message}` : message, { cause: details.cause });
    this.source = details.source;
  }
}
