/** trellis: the public API. Everything a user imports comes from here. */
export {
  TrellisError,
  InvalidArgumentError,
  NativeSystemError,
  ObjectStoreError,
  ObjectExistsError,
  ObjectNotFoundError,
  ObjectStateError,
  ObjectStoreFullError,
  ObjectTooLargeError,
  GetTimeoutError,
  StoreClosedError,
} from './errors.js';
export { ObjectStore, ObjectView, ObjectBuilder } from './store/object-store.js';
export type { ObjectStoreOptions, StoreStats, ObjectState } from './store/object-store.js';
export { newObjectId, isObjectId } from './store/object-id.js';
export type { ObjectId } from './store/object-id.js';
