/**
 * Batch inference through a serving deployment, as Ray's ServeDeploymentProcessorConfig: each
 * row's payload goes to a method of a deployment that already serves online traffic (its replicas,
 * its autoscaling, its model loaded once), by handle, not over HTTP. An offline job and live users
 * share the replicas; the job keeps to its bound of calls in flight and its qps, and a deployment
 * at capacity (BackPressureError) or a replica that dies mid-call is retried after a backoff.
 */
import { DeploymentError, InvalidArgumentError, TrellisError } from '../errors.js';
import { remote } from '../core/registry.js';
import type { Dataset } from '../data/dataset.js';
import { DeploymentHandleBase, type DeploymentResponse } from '../serve/handle.js';
import { REQUEST_PROCESSOR_OPTIONS, RequestEngine, checkNumberOption, requestProcessor, resolveRequestOptions, type AttemptOutcome, type RequestEngineOptions, type RequestProcessorOptions } from './request-engine.js';

const PROCESSOR = 'buildDeploymentProcessor()';

export interface DeploymentProcessorOptions extends RequestProcessorOptions {
  /** The deployment (serve.getDeploymentHandle(name, app), or what serve.run() returned). */
  handle: DeploymentHandleBase;
  /** Its method each row's payload is passed to, as the one argument. */
  method: string;
  /** The column each row's answer goes to (default 'response'). */
  responseColumn?: string;
  /** How long one call may take before it is cancelled and retried (ms; default: no limit). */
  timeoutMs?: number;
}

interface DeploymentEngineOptions extends RequestEngineOptions {
  handle: DeploymentHandleBase;
  method: string;
  timeoutMs: number | null;
}

/** The pool's class: each row's payload as a call to the deployment's method. */
export class DeploymentRequestEngine extends RequestEngine {
  declare protected readonly engineOptions: DeploymentEngineOptions;

  constructor(options: DeploymentEngineOptions) {
    super(options);
  }

  protected override async prepare(): Promise<void> {
    const { handle, method } = this.engineOptions;
    // Checked here too: the deployment may have been updated since the driver looked.
    if (!handle.methodNames.includes(method)) throw new InvalidArgumentError(`${PROCESSOR}: deployment ${handle.deploymentName} has no method '${method}' (it has: ${handle.methodNames.join(', ')})`, 'ERR_DEPLOYMENT_PROCESSOR');
  }

  protected override payloadError(message: string): TrellisError {
    return new InvalidArgumentError(message, 'ERR_REQUEST_PAYLOAD');
  }

  protected override async attempt(payload: unknown, index: number, attempt: number): Promise<AttemptOutcome> {
    const { handle, method, timeoutMs } = this.engineOptions;
    const nth = attempt > 0 ? ` (attempt ${attempt + 1})` : '';
    let response: DeploymentResponse<unknown> | undefined;
    try {
      response = (handle as unknown as Record<string, (argument: unknown) => DeploymentResponse<unknown>>)[method](payload);
      return { response: await response.result(timeoutMs === null ? {} : { timeout: timeoutMs }) };
    } catch (error) {
      // By code, not class: an error that crossed processes arrives as an Error carrying its code.
      const code = (error as { code?: unknown } | undefined)?.code;
      const message = (error as Error | undefined)?.message ?? String(error);
      if (code === 'ERR_GET_TIMEOUT') {
        response?.cancel();
        return { error: new TrellisError('ERR_DEPLOYMENT_TIMEOUT', `batch row ${index}: ${handle.deploymentName}.${method} did not answer within ${timeoutMs} ms${nth}`), retry: true };
      }
      if (code === 'ERR_BACKPRESSURE') return { error: new TrellisError(code, `batch row ${index}: ${message}${nth}`, { cause: error }), retry: true, slowDown: true };
      // A replica that died mid-call: the deployment replaces it, and the call may go to another.
      if (code === 'ERR_ACTOR_DIED') return { error: new TrellisError(code, `batch row ${index}: the replica of ${handle.deploymentName} running it died${nth}: ${message}`, { cause: error }), retry: true };
      // The method threw, or the deployment is gone: the same call would fail the same way.
      return { error: new TrellisError(typeof code === 'string' ? code : 'ERR_DEPLOYMENT_CALL', `batch row ${index}: ${handle.deploymentName}.${method} failed: ${message}`, { cause: error }), retry: false };
    }
  }
}

export const RemoteDeploymentRequestEngine = remote(import.meta, DeploymentRequestEngine);

const KNOWN_OPTIONS = new Set([...REQUEST_PROCESSOR_OPTIONS, 'handle', 'method', 'responseColumn', 'timeoutMs']);

/**
 * A function from a dataset to a dataset whose rows each gain what the deployment's method
 * answered for their payload: `responseColumn` (default 'response'), and with rowErrors 'record'
 * `error`.
 */
export function buildDeploymentProcessor(options: DeploymentProcessorOptions): (dataset: Dataset) => Dataset {
  if (typeof options !== 'object' || options === null) throw new InvalidArgumentError(`${PROCESSOR} needs options with a handle and a method`, 'ERR_DEPLOYMENT_PROCESSOR');
  const unknown = Object.keys(options).filter((name) => !KNOWN_OPTIONS.has(name));
  if (unknown.length > 0) throw new InvalidArgumentError(`${PROCESSOR}: unknown option${unknown.length > 1 ? 's' : ''} ${unknown.join(', ')}`, 'ERR_DEPLOYMENT_PROCESSOR');
  if (!(options.handle instanceof DeploymentHandleBase)) throw new InvalidArgumentError(`${PROCESSOR}: handle must be a deployment handle (serve.getDeploymentHandle(name, app)), got ${options.handle === null ? 'null' : typeof options.handle}`, 'ERR_DEPLOYMENT_PROCESSOR');
  const { handle, method } = options;
  if (typeof method !== 'string' || !handle.methodNames.includes(method)) {
    throw new DeploymentError(handle.deploymentName, `${PROCESSOR}: deployment ${handle.deploymentName} has no method ${JSON.stringify(method)} (it has: ${handle.methodNames.join(', ') || 'none'})`, 'ERR_DEPLOYMENT_PROCESSOR');
  }
  if (DeploymentHandleBase.targetOf(handle).methods.includes(`*${method}`)) {
    throw new InvalidArgumentError(`${PROCESSOR}: ${handle.deploymentName}.${method} streams its answer (a generator); the processor calls methods that return one value`, 'ERR_DEPLOYMENT_PROCESSOR');
  }
  checkNumberOption(PROCESSOR, options.timeoutMs, 'timeoutMs', false, false, 'ERR_DEPLOYMENT_PROCESSOR');
  const engine: DeploymentEngineOptions = {
    ...resolveRequestOptions(PROCESSOR, options, 'response', 'ERR_DEPLOYMENT_PROCESSOR'),
    handle,
    method,
    timeoutMs: options.timeoutMs ?? null,
  };
  return requestProcessor(DeploymentRequestEngine, engine, options);
}
