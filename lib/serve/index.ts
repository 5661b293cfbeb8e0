/** The `serve` namespace of the public API: `import { serve } from 'trellis'`. */
export { deployment } from './deployment.js';
export { batch } from './batching.js';
export { start, run, status, getDeploymentHandle, getAppHandle, delete, shutdown } from './serve.js';
export type { StartOptions, RunOptions, ServeStatus, ApplicationStatus, ApplicationStatusName } from './serve.js';
export type { DeploymentStatus, DeploymentStatusName } from './controller.js';
export { HttpRequest, HttpResponse, HttpError } from './http-messages.js';
export { multiplexed, getMultiplexedModelId, MODEL_ID_HEADER } from './multiplex.js';
export type { MultiplexedLoader, MultiplexedOptions } from './multiplex.js';
export type { HandleOptions } from './handle.js';
