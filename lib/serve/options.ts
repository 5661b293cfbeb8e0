/**
 * A deployment's options (as Ray Serve's @serve.deployment arguments), checked once where they
 * are given, and resolved to the config the controller, the routers and the replicas run by.
 */
import { InvalidArgumentError } from '../errors.js';
import type { ActorOptions } from '../core/options.js';
import type { HttpRequest } from './http-messages.js';

/**
 * Replicas added and removed by load (as Ray Serve's autoscaling_config): the controller keeps
 * about `targetOngoingRequests` requests on each replica, averaged over `lookBackPeriodMs`, and
 * acts on a change only once it has held for the delay of its direction.
 */
export interface AutoscalingConfig {
  /** Fewest replicas (default 1); 0 lets the deployment scale to zero while no request comes. */
  minReplicas?: number;
  /** Most replicas (default: minReplicas, or 1). */
  maxReplicas?: number;
  /** Replicas at the start (default: minReplicas, at least 1 where minReplicas is 0). */
  initialReplicas?: number;
  /** Requests per replica (running, waiting in it and waiting in callers) to aim for (default 2). */
  targetOngoingRequests?: number;
  /** How often replicas are asked for their load (default 1,000 ms). */
  metricsIntervalMs?: number;
  /** The window the load is averaged over (default 10,000 ms). */
  lookBackPeriodMs?: number;
  /** How long more replicas must be wanted before they are added (default 10,000 ms). */
  upscaleDelayMs?: number;
  /** How long fewer replicas must be wanted before they are removed (default 120,000 ms). */
  downscaleDelayMs?: number;
  /** How much of a wanted increase to make at once (default 1: all of it). */
  upscalingFactor?: number;
  /** How much of a wanted decrease to make at once (default 1: all of it). */
  downscalingFactor?: number;
}

export interface DeploymentOptions {
  /** The deployment's name in its application (default: the class's name). */
  name?: string;
  /** A fixed number of replicas (default 1); not with `autoscaling`. */
  numReplicas?: number;
  autoscaling?: AutoscalingConfig;
  /** Requests one replica runs at once (default 5); more wait in their callers' routers. */
  maxOngoingRequests?: number;
  /**
   * Requests a caller's router holds while every replica is full, past which a request fails at
   * once with BackPressureError (HTTP 503) rather than wait. Default: no bound.
   */
  maxQueuedRequests?: number;
  /** Options of each replica's actor: numCpus (default 1), numGpus, memory, resources, runtimeEnv, ... */
  actorOptions?: ActorOptions;
  /** How often each replica's health is checked (its `checkHealth()` if it has one; default 10,000 ms). */
  healthCheckPeriodMs?: number;
  /** How long a health check may take before the replica counts as unhealthy (default 30,000 ms). */
  healthCheckTimeoutMs?: number;
  /** How long a replica being removed may finish its requests before it is killed (default 20,000 ms). */
  gracefulShutdownTimeoutMs?: number;
  /** Passed to each replica's `reconfigure(userConfig)` after construction, and again when it changes. */
  userConfig?: unknown;
  /**
   * For an ingress whose requests name a multiplexed model in their body (an OpenAI request's
   * `model`, say): reads it off each HTTP request, in the proxy, before a replica is chosen. ''
   * or undefined: none. Default: the `serve_multiplexed_model_id` header. A function runs in the
   * driver's proxy only; `{ jsonField, except }` (the JSON body's field, unless one of `except`)
   * is data, and every node's proxy reads it the same way.
   */
  requestModelId?: RequestModelId;
  /**
   * How long a request for a multiplexed model waits for a replica holding the model, while all
   * of those are full, before it goes to another replica (which loads the model, evicting one if
   * it holds maxModelsPerReplica already). Default 1,000 ms; 0 sends it elsewhere at once.
   */
  multiplexedModelWaitMs?: number;
}

export interface ResolvedAutoscaling {
  minReplicas: number;
  maxReplicas: number;
  initialReplicas: number;
  targetOngoingRequests: number;
  metricsIntervalMs: number;
  lookBackPeriodMs: number;
  upscaleDelayMs: number;
  downscaleDelayMs: number;
  upscalingFactor: number;
  downscalingFactor: number;
}

export interface DeploymentConfig {
  name: string;
  numReplicas: number;
  autoscaling: ResolvedAutoscaling | undefined;
  maxOngoingRequests: number;
  maxQueuedRequests: number;
  actorOptions: ActorOptions;
  healthCheckPeriodMs: number;
  healthCheckTimeoutMs: number;
  gracefulShutdownTimeoutMs: number;
  userConfig: unknown;
  requestModelId: RequestModelId | undefined;
  multiplexedModelWaitMs: number;
}

/** How a proxy reads a request's multiplexed model: a function (the driver's proxy only), or a JSON body field. */
export type RequestModelId = ((request: HttpRequest) => string | undefined) | { jsonField: string; except?: string[] };

/**
 * The reader of a request's model: the function given, or one made from a JSON field (a POST's
 * body parsed, the field taken where it is a string not in `except`; '' otherwise, and a body
 * that does not parse reads '' too: the replica answers it, naming what is wrong).
 */
export function modelIdReader(spec: RequestModelId | undefined): ((request: HttpRequest) => string | undefined) | undefined {
  if (spec === undefined || typeof spec === 'function') return spec;
  const except = new Set(spec.except ?? []);
  return (request) => {
    if (request.method !== 'POST' || request.body.length === 0) return '';
    let value: unknown;
    try {
      value = (request.json() as Record<string, unknown> | null)?.[spec.jsonField];
    } catch {
      return '';
    }
    return typeof value === 'string' && !except.has(value) ? value : '';
  };
}

const DEPLOYMENT_KEYS = new Set([
  'name', 'numReplicas', 'autoscaling', 'maxOngoingRequests', 'maxQueuedRequests', 'actorOptions',
  'healthCheckPeriodMs', 'healthCheckTimeoutMs', 'gracefulShutdownTimeoutMs', 'userConfig', 'requestModelId', 'multiplexedModelWaitMs',
]);
const AUTOSCALING_KEYS = new Set([
  'minReplicas', 'maxReplicas', 'initialReplicas', 'targetOngoingRequests', 'metricsIntervalMs', 'lookBackPeriodMs',
  'upscaleDelayMs', 'downscaleDelayMs', 'upscalingFactor', 'downscalingFactor',
]);

/** The most replicas one deployment may have, and so the most requests a replica may run. */
export const MOST_REPLICAS = 10_000;
const MOST_ONGOING = 100_000;

function whole(value: unknown, where: string, name: string, min: number, max: number, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw new InvalidArgumentError(`${where}: ${name} must be a whole number from ${min} to ${max}, got ${describe(value)}`);
  }
  return value;
}

function positive(value: unknown, where: string, name: string, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) {
    throw new InvalidArgumentError(`${where}: ${name} must be a number above 0, got ${describe(value)}`);
  }
  return value;
}

function milliseconds(value: unknown, where: string, name: string, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0) {
    throw new InvalidArgumentError(`${where}: ${name} must be a number of milliseconds from 0, got ${describe(value)}`);
  }
  return value;
}

function describe(value: unknown): string {
  return typeof value === 'number' || typeof value === 'string' ? JSON.stringify(value) : typeof value;
}

function unknownKeys(given: object, known: Set<string>, where: string): void {
  for (const key of Object.keys(given)) {
    if (!known.has(key)) throw new InvalidArgumentError(`${where}: unknown option '${key}' (known: ${[...known].join(', ')})`);
  }
}

function resolveAutoscaling(given: AutoscalingConfig, where: string): ResolvedAutoscaling {
  if (typeof given !== 'object' || given === null) throw new InvalidArgumentError(`${where}: autoscaling must be an object`);
  unknownKeys(given, AUTOSCALING_KEYS, `${where}.autoscaling`);
  const at = `${where}.autoscaling`;
  const minReplicas = whole(given.minReplicas, at, 'minReplicas', 0, MOST_REPLICAS, 1);
  const maxReplicas = whole(given.maxReplicas, at, 'maxReplicas', 1, MOST_REPLICAS, Math.max(minReplicas, 1));
  if (maxReplicas < minReplicas) throw new InvalidArgumentError(`${at}: maxReplicas (${maxReplicas}) is below minReplicas (${minReplicas})`);
  const initialReplicas = whole(given.initialReplicas, at, 'initialReplicas', 0, MOST_REPLICAS, Math.max(minReplicas, 1));
  if (initialReplicas < minReplicas || initialReplicas > maxReplicas) {
    throw new InvalidArgumentError(`${at}: initialReplicas (${initialReplicas}) must lie from minReplicas (${minReplicas}) to maxReplicas (${maxReplicas})`);
  }
  const factor = (value: unknown, name: string) => {
    const resolved = positive(value, at, name, 1);
    if (resolved > 100) throw new InvalidArgumentError(`${at}: ${name} must be at most 100, got ${resolved}`);
    return resolved;
  };
  return {
    minReplicas,
    maxReplicas,
    initialReplicas,
    targetOngoingRequests: positive(given.targetOngoingRequests, at, 'targetOngoingRequests', 2),
    metricsIntervalMs: Math.max(10, milliseconds(given.metricsIntervalMs, at, 'metricsIntervalMs', 1_000)),
    lookBackPeriodMs: milliseconds(given.lookBackPeriodMs, at, 'lookBackPeriodMs', 10_000),
    upscaleDelayMs: milliseconds(given.upscaleDelayMs, at, 'upscaleDelayMs', 10_000),
    downscaleDelayMs: milliseconds(given.downscaleDelayMs, at, 'downscaleDelayMs', 120_000),
    upscalingFactor: factor(given.upscalingFactor, 'upscalingFactor'),
    downscalingFactor: factor(given.downscalingFactor, 'downscalingFactor'),
  };
}

/** Checks `options` (naming what is wrong) and fills in the defaults. */
export function resolveDeploymentOptions(className: string, options: DeploymentOptions): DeploymentConfig {
  if (typeof options !== 'object' || options === null) throw new InvalidArgumentError(`deployment(${className}): options must be an object`);
  const where = `deployment(${className})`;
  unknownKeys(options, DEPLOYMENT_KEYS, where);
  const name = options.name ?? className;
  if (typeof name !== 'string' || !/^[A-Za-z0-9_.-]{1,128}$/.test(name)) {
    throw new InvalidArgumentError(`${where}: name must be 1 to 128 letters, digits, '_', '.' or '-', got ${describe(name)}`);
  }
  if (options.numReplicas !== undefined && options.autoscaling !== undefined) {
    throw new InvalidArgumentError(`${where}: give numReplicas or autoscaling, not both`);
  }
  const autoscaling = options.autoscaling === undefined ? undefined : resolveAutoscaling(options.autoscaling, where);
  const actorOptions = options.actorOptions ?? {};
  if (typeof actorOptions !== 'object' || actorOptions === null) throw new InvalidArgumentError(`${where}: actorOptions must be an object`);
  for (const reserved of ['maxConcurrency', 'concurrencyGroups', 'name', 'maxRestarts'] as const) {
    if (reserved in actorOptions) {
      throw new InvalidArgumentError(`${where}: actorOptions.${reserved} is the deployment's to set (maxOngoingRequests says how many requests a replica runs at once; the controller replaces a replica that dies)`);
    }
  }
  const modelId = options.requestModelId as unknown;
  if (modelId !== undefined && typeof modelId !== 'function') {
    const spec = modelId as { jsonField?: unknown; except?: unknown };
    const valid = typeof modelId === 'object' && modelId !== null && typeof spec.jsonField === 'string' && spec.jsonField.length > 0
      && (spec.except === undefined || (Array.isArray(spec.except) && spec.except.every((name) => typeof name === 'string')))
      && Object.keys(modelId).every((key) => key === 'jsonField' || key === 'except');
    if (!valid) throw new InvalidArgumentError(`${where}: requestModelId must be a function of the HTTP request or { jsonField, except }, got ${describe(options.requestModelId)}`);
  }
  return {
    name,
    numReplicas: autoscaling ? autoscaling.initialReplicas : whole(options.numReplicas, where, 'numReplicas', 0, MOST_REPLICAS, 1),
    autoscaling,
    maxOngoingRequests: whole(options.maxOngoingRequests, where, 'maxOngoingRequests', 1, MOST_ONGOING, 5),
    maxQueuedRequests: options.maxQueuedRequests === undefined ? Infinity : whole(options.maxQueuedRequests, where, 'maxQueuedRequests', 0, Number.MAX_SAFE_INTEGER, 0),
    actorOptions: { numCpus: 1, ...actorOptions },
    healthCheckPeriodMs: Math.max(10, milliseconds(options.healthCheckPeriodMs, where, 'healthCheckPeriodMs', 10_000)),
    healthCheckTimeoutMs: Math.max(10, milliseconds(options.healthCheckTimeoutMs, where, 'healthCheckTimeoutMs', 30_000)),
    gracefulShutdownTimeoutMs: milliseconds(options.gracefulShutdownTimeoutMs, where, 'gracefulShutdownTimeoutMs', 20_000),
    userConfig: options.userConfig,
    requestModelId: options.requestModelId,
    multiplexedModelWaitMs: milliseconds(options.multiplexedModelWaitMs, where, 'multiplexedModelWaitMs', 1_000),
  };
}
