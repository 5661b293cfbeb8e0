/**
 * Model multiplexing (as Ray Serve's `@serve.multiplexed`): one deployment serves many models (a
 * fine-tune per customer, a LoRA adapter per task), each replica holding a few of them at once.
 * A request names its model (`handle.options({ multiplexedModelId })`, or the HTTP header
 * `serve_multiplexed_model_id`); routers send it to a replica that holds that model where one has
 * room, else to the replica holding fewest; inside, `multiplexed(loader)` loads a model on first
 * use and evicts the least recently used past `maxModelsPerReplica`.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import { InvalidArgumentError } from '../errors.js';

/** The HTTP header that names a request's model (Ray Serve's). */
export const MODEL_ID_HEADER = 'serve_multiplexed_model_id';

/**
 * One request in a replica: the model it names, and the held models it took from loaders, which
 * are not closed while it runs, even once evicted.
 */
export interface RequestScope {
  readonly modelId: string;
  readonly entries: Set<Entry>;
}

interface Entry {
  readonly model: Promise<unknown>;
  /** Requests running that took this model. */
  readonly users: Set<RequestScope>;
  evicted: boolean;
}

const requestScope = new AsyncLocalStorage<RequestScope>();

/** A request for model `modelId` ('' for none) begins in this replica. */
export function openRequest(modelId: string): RequestScope {
  return { modelId, entries: new Set() };
}

/** Runs `body` in `scope`: getMultiplexedModelId() and the loaders inside see its request. */
export function inRequest<T>(scope: RequestScope, body: () => T): T {
  return requestScope.run(scope, body);
}

/** The request has ended: models evicted while it used them are closed now, if nobody else uses them. */
export function closeRequest(scope: RequestScope): void {
  for (const entry of scope.entries) {
    entry.users.delete(scope);
    if (entry.evicted && entry.users.size === 0) void release(entry.model);
  }
  scope.entries.clear();
}

/**
 * The model the request being handled names ('' where it names none), inside a replica's method.
 * (Ray's `serve.get_multiplexed_model_id()`.)
 */
export function getMultiplexedModelId(): string {
  return requestScope.getStore()?.modelId ?? '';
}

export interface MultiplexedOptions {
  /** Models a replica holds at once (default 3); loading one more evicts the least recently used. */
  maxModelsPerReplica?: number;
}

/** A model loader made by multiplexed(): the model for `modelId` (default: the request's), loaded once and kept while used. */
export type MultiplexedLoader<M> = ((modelId?: string) => Promise<M>) & {
  /** The ids of the models held now, least recently used first. */
  readonly modelIds: string[];
  /** Evicts every model: each is closed now, or once the requests that took it end. */
  clear(): Promise<void>;
};

/** Every loader in this process: a replica reports the models they hold to its routers. */
const loaders = new Set<{ readonly modelIds: string[] }>();

/**
 * The scope a replica's request runs in: where the request names a model or this process has a
 * loader (otherwise nothing inside could ask, and the request runs as it is).
 */
export function requestScopeFor(modelId: string): RequestScope | undefined {
  return modelId || loaders.size > 0 ? openRequest(modelId) : undefined;
}

/** Whether this process has made a model loader (a replica's class did). */
export function hasModelLoaders(): boolean {
  return loaders.size > 0;
}

/** The models this process's loaders hold: what a replica reports. */
export function heldModelIds(): string[] {
  const ids = new Set<string>();
  for (const loader of loaders) for (const id of loader.modelIds) ids.add(id);
  return [...ids];
}

/** Closes an evicted model once its load settles; a failed load has nothing to close. */
async function release(model: Promise<unknown>): Promise<void> {
  let target: { [Symbol.asyncDispose]?: () => unknown; close?: () => unknown } | null;
  try {
    target = (await model) as typeof target;
  } catch {
    return;
  }
  if (!target || (typeof target !== 'object' && typeof target !== 'function')) return;
  try {
    if (typeof target[Symbol.asyncDispose] === 'function') await target[Symbol.asyncDispose]!();
    else if (typeof target.close === 'function') await target.close();
  } catch (error) {
    // The model is gone from the cache either way; its owner should hear that closing it failed.
    process.emitWarning(`a multiplexed model failed to close: ${error instanceof Error ? error.message : String(error)}`, 'TrellisWarning');
  }
}

/**
 * Wraps `load(modelId)` (in a deployment's class) into a loader that keeps up to
 * `maxModelsPerReplica` models: requests for a held model share it, one being loaded is waited
 * for, not loaded twice, and a new model past the limit evicts the least recently used. An
 * evicted model is closed (its `close()` or `Symbol.asyncDispose` awaited) once no running request
 * that took it is left: at once where none is, before the new model loads. A load that fails is
 * not kept: the next request tries again.
 */
export function multiplexed<M>(load: (modelId: string) => M | Promise<M>, options: MultiplexedOptions = {}): MultiplexedLoader<M> {
  if (typeof load !== 'function') throw new InvalidArgumentError('multiplexed() takes a function that loads a model by its id');
  const unknown = Object.keys(options).filter((key) => key !== 'maxModelsPerReplica');
  if (unknown.length) throw new InvalidArgumentError(`multiplexed() has no option ${unknown.map((key) => `'${key}'`).join(', ')} (it takes maxModelsPerReplica)`);
  const limit = options.maxModelsPerReplica ?? 3;
  if (!Number.isInteger(limit) || limit < 1) throw new InvalidArgumentError(`maxModelsPerReplica must be a whole number of at least 1, got ${String(limit)}`);
  // Insertion order is recency: a model used again is moved to the end.
  const held = new Map<string, Entry>();
  const evict = async (modelId: string, entry: Entry): Promise<void> => {
    held.delete(modelId);
    entry.evicted = true;
    if (entry.users.size === 0) await release(entry.model);
  };
  const take = (entry: Entry): Promise<M> => {
    const scope = requestScope.getStore();
    if (scope) {
      entry.users.add(scope);
      scope.entries.add(entry);
    }
    return entry.model as Promise<M>;
  };
  const loader = async (modelId: string = getMultiplexedModelId()): Promise<M> => {
    if (typeof modelId !== 'string' || modelId.length === 0) {
      throw new InvalidArgumentError('this request names no model: call the handle with .options({ multiplexedModelId }), send the serve_multiplexed_model_id header, or pass the id');
    }
    let entry = held.get(modelId);
    if (entry) {
      held.delete(modelId);
      held.set(modelId, entry);
      return take(entry);
    }
    while (held.size >= limit) {
      const [oldest, evicted] = held.entries().next().value as [string, Entry];
      await evict(oldest, evicted);
    }
    // Another request may have started this model's load while an eviction was awaited.
    entry = held.get(modelId);
    if (entry) return take(entry);
    const created: Entry = { model: Promise.resolve().then(() => load(modelId)), users: new Set(), evicted: false };
    held.set(modelId, created);
    created.model.catch(() => {
      if (held.get(modelId) === created) held.delete(modelId);
    });
    return take(created);
  };
  Object.defineProperty(loader, 'modelIds', { get: () => [...held.keys()], enumerable: true });
  const result = Object.assign(loader, {
    async clear() {
      for (const [modelId, entry] of [...held]) await evict(modelId, entry);
    },
  }) as MultiplexedLoader<M>;
  loaders.add(result);
  return result;
}
