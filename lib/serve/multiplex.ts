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

const requestModel = new AsyncLocalStorage<string>();

/** Runs `body` as a request for model `modelId` ('' for none): getMultiplexedModelId() inside reads it. */
export function withModelId<T>(modelId: string, body: () => T): T {
  return requestModel.run(modelId, body);
}

/**
 * The model the request being handled names ('' where it names none), inside a replica's method.
 * (Ray's `serve.get_multiplexed_model_id()`.)
 */
export function getMultiplexedModelId(): string {
  return requestModel.getStore() ?? '';
}

export interface MultiplexedOptions {
  /** Models a replica holds at once (default 3); loading one more evicts the least recently used. */
  maxModelsPerReplica?: number;
}

/** A model loader made by multiplexed(): the model for `modelId` (default: the request's), loaded once and kept while used. */
export type MultiplexedLoader<M> = ((modelId?: string) => Promise<M>) & {
  /** The ids of the models held now, least recently used first. */
  readonly modelIds: string[];
  /** Evicts every model (each one's close() or asyncDispose awaited). */
  clear(): Promise<void>;
};

/** Every loader in this process: a replica reports the models they hold to its routers. */
const loaders = new Set<{ readonly modelIds: string[] }>();

/** The models this process's loaders hold: what a replica reports. */
export function heldModelIds(): string[] {
  const ids = new Set<string>();
  for (const loader of loaders) for (const id of loader.modelIds) ids.add(id);
  return [...ids];
}

async function release(model: unknown): Promise<void> {
  const target = model as { [Symbol.asyncDispose]?: () => unknown; close?: () => unknown } | null;
  if (!target || (typeof target !== 'object' && typeof target !== 'function')) return;
  if (typeof target[Symbol.asyncDispose] === 'function') await target[Symbol.asyncDispose]!();
  else if (typeof target.close === 'function') await target.close();
}

/**
 * Wraps `load(modelId)` (in a deployment's class) into a loader that keeps up to
 * `maxModelsPerReplica` models: requests for a held model share it, one being loaded is waited
 * for, not loaded twice, and a new model past the limit evicts the least recently used (its
 * `close()` or `Symbol.asyncDispose` is awaited). A load that fails is not kept: the next request
 * tries again.
 */
export function multiplexed<M>(load: (modelId: string) => M | Promise<M>, options: MultiplexedOptions = {}): MultiplexedLoader<M> {
  if (typeof load !== 'function') throw new InvalidArgumentError('multiplexed() takes a function that loads a model by its id');
  const unknown = Object.keys(options).filter((key) => key !== 'maxModelsPerReplica');
  if (unknown.length) throw new InvalidArgumentError(`multiplexed() has no option ${unknown.map((key) => `'${key}'`).join(', ')} (it takes maxModelsPerReplica)`);
  const limit = options.maxModelsPerReplica ?? 3;
  if (!Number.isInteger(limit) || limit < 1) throw new InvalidArgumentError(`maxModelsPerReplica must be a whole number of at least 1, got ${String(limit)}`);
  // Insertion order is recency: a model used again is moved to the end.
  const held = new Map<string, Promise<M>>();
  const loader = async (modelId: string = getMultiplexedModelId()): Promise<M> => {
    if (typeof modelId !== 'string' || modelId.length === 0) {
      throw new InvalidArgumentError('this request names no model: call the handle with .options({ multiplexedModelId }), send the serve_multiplexed_model_id header, or pass the id');
    }
    let model = held.get(modelId);
    if (model) {
      held.delete(modelId);
      held.set(modelId, model);
      return model;
    }
    while (held.size >= limit) {
      const [oldest, evicted] = held.entries().next().value as [string, Promise<M>];
      held.delete(oldest);
      await evicted.then(release, () => undefined);
    }
    // Another request may have started this model's load while the eviction was awaited.
    model = held.get(modelId);
    if (model) return model;
    model = Promise.resolve().then(() => load(modelId));
    held.set(modelId, model);
    model.catch(() => {
      if (held.get(modelId) === model) held.delete(modelId);
    });
    return model;
  };
  Object.defineProperty(loader, 'modelIds', { get: () => [...held.keys()], enumerable: true });
  const result = Object.assign(loader, {
    async clear() {
      const models = [...held.values()];
      held.clear();
      for (const model of models) await model.then(release, () => undefined);
    },
  }) as MultiplexedLoader<M>;
  loaders.add(result);
  return result;
}
