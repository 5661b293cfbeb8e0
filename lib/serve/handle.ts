/**
 * DeploymentHandle: how code calls a deployment (as Ray Serve's DeploymentHandle), from the
 * driver or from inside another deployment's replica, a task or an actor it was passed to. Each
 * call goes through the process's router for that deployment and returns a DeploymentResponse
 * (awaitable; passed to another handle call, it travels as a ref, never through the caller), or,
 * for a generator method, a DeploymentResponseGenerator of the items as they are yielded.
 */
import { ActorDiedError, DeploymentError, InvalidArgumentError } from '../errors.js';
import { cancel, get } from '../core/api.js';
import { ObjectRef } from '../core/object-ref.js';
import type { ObjectRefGenerator } from '../core/object-ref-generator.js';
import type { ActorHandle } from '../core/registry.js';
import { currentRuntime } from '../core/runtime-context.js';
import { registerPortableClass } from '../core/serialization.js';
import type { ServeDirectory } from './directory.js';
import { Router, type RoutedReplica } from './router.js';

/** What a handle names: enough to find (or make) the router for its deployment in any process. */
export interface HandleTarget {
  app: string;
  deployment: string;
  /** The class's methods; a generator method's name starts with '*'. */
  methods: string[];
  maxOngoingRequests: number;
  maxQueuedRequests: number;
  multiplexedModelWaitMs: number;
  directory: ActorHandle<ServeDirectory>;
  /** The multiplexed model its calls name ('' or absent: none), set by handle.options(). */
  modelId?: string;
  /** Its calls go to a replica on the caller's node where one has room (handle.options()). */
  preferLocalNode?: boolean;
}

/** A handle's per-call options (Ray's `handle.options(...)`). */
export interface HandleOptions {
  /** The model its calls are for: routed to replicas holding it, read inside by getMultiplexedModelId(). */
  multiplexedModelId?: string;
  /**
   * Send each call to a replica on the caller's node where one has room, before the others (as
   * Ray's _prefer_local_routing): a composed deployment's calls then stay off the network.
   */
  preferLocalNode?: boolean;
}

export function deploymentKey(app: string, deployment: string): string {
  return `${app}/${deployment}`;
}

/** The driver's controller: the routers it keeps for its deployments. */
let localRouters: ((key: string) => Router | undefined) | undefined;

export function setLocalRouters(lookup: ((key: string) => Router | undefined) | undefined): void {
  localRouters = lookup;
}

/** A router fed by the directory, for a deployment whose controller is in another process. */
class WatchedRouter {
  readonly router: Router;
  readonly #target: HandleTarget;
  readonly #key: string;

  constructor(target: HandleTarget) {
    this.#target = target;
    this.#key = deploymentKey(target.app, target.deployment);
    this.router = new Router(target.deployment, target, {
      demand: () => void target.directory.demand.remote(this.#key),
      localNode: () => currentRuntime().context().nodeId,
    });
    void this.#watch();
  }

  async #watch(): Promise<void> {
    let version = -1;
    for (;;) {
      try {
        const found = await get(this.#target.directory.watch.remote(this.#key, version, 30_000));
        if (found.deleted) throw new DeploymentError(this.#target.deployment, `application ${this.#target.app} was deleted`);
        version = found.version;
        this.router.setReplicas(found.replicas, found.models, found.nodes);
      } catch (error) {
        watched.delete(this.#key);
        this.router.close(error instanceof DeploymentError ? error : new DeploymentError(this.#target.deployment, `deployment ${this.#target.deployment} can no longer be reached: ${(error as Error).message}`));
        return;
      }
    }
  }
}

const watched = new Map<string, WatchedRouter>();

function routerOf(target: HandleTarget): Router {
  const key = deploymentKey(target.app, target.deployment);
  const local = localRouters?.(key);
  if (local) return local;
  let found = watched.get(key);
  if (!found) watched.set(key, (found = new WatchedRouter(target)));
  return found.router;
}

/** The router this process sends `handle`'s calls through (the driver's own, or one fed by the directory). */
export function routerForHandle(handle: DeploymentHandleBase): Router {
  return routerOf(DeploymentHandleBase.targetOf(handle));
}

/** Top-level arguments that are responses are passed on as their refs (the value never comes here). */
async function resolveArguments(args: unknown[]): Promise<unknown[]> {
  if (!args.some((arg) => arg instanceof DeploymentResponse)) return args;
  return Promise.all(args.map((arg) => (arg instanceof DeploymentResponse ? arg.toObjectRef() : arg)));
}

/** A request's replica died under it: the router stops sending there. */
function noteDeath(router: Router, replica: RoutedReplica, error: unknown): void {
  if (error instanceof ActorDiedError) router.replicaDied(replica.actorId);
}

/**
 * The result of a handle call: await it (or `result()`), or pass it to another handle call. The
 * value is read as soon as the replica answers (that read is also what frees the replica's slot
 * in this caller's router), so awaiting costs nothing more.
 */
export class DeploymentResponse<T> implements PromiseLike<T> {
  #abort: AbortController | undefined;
  readonly #sent: Promise<ObjectRef<T>>;
  readonly #value: Promise<T>;

  /** @internal made by a handle's method. */
  constructor(router: Router, send: (replica: RoutedReplica, args: unknown[]) => ObjectRef<T>, args: unknown[] = [], modelId = '', preferLocal = false) {
    // Most calls find a replica with room and have no response among their arguments: they are
    // sent at once, with no promise in between.
    let replica = args.some((arg) => arg instanceof DeploymentResponse) ? undefined : router.tryAcquire(modelId, preferLocal);
    if (replica) {
      try {
        this.#sent = Promise.resolve(send(replica, args));
      } catch (error) {
        router.release(replica);
        this.#sent = Promise.reject(error);
      }
    } else {
      const abort = (this.#abort = new AbortController());
      this.#sent = (async () => {
        const resolved = await resolveArguments(args);
        replica = await router.acquire(abort.signal, modelId, preferLocal);
        try {
          return send(replica, resolved);
        } catch (error) {
          router.release(replica);
          throw error;
        }
      })();
    }
    this.#value = this.#sent.then((ref) =>
      get(ref).then(
        (value) => {
          router.release(replica!);
          return value;
        },
        (error: unknown) => {
          router.release(replica!);
          noteDeath(router, replica!, error);
          throw error;
        },
      ),
    );
    // A response nobody awaits must not end the process with an unhandled rejection.
    this.#value.catch(() => undefined);
  }

  /** The value; `timeout` (ms) bounds this wait only (GetTimeoutError), not the request. */
  result(options: { timeout?: number } = {}): Promise<T> {
    if (options.timeout === undefined) return this.#value;
    return this.#sent.then((ref) => get(ref, options));
  }

  then<A = T, B = never>(onFulfilled?: ((value: T) => A | PromiseLike<A>) | null, onRejected?: ((reason: unknown) => B | PromiseLike<B>) | null): Promise<A | B> {
    return this.result().then(onFulfilled, onRejected);
  }

  catch<B = never>(onRejected?: ((reason: unknown) => B | PromiseLike<B>) | null): Promise<T | B> {
    return this.result().catch(onRejected);
  }

  finally(onFinally?: (() => void) | null): Promise<T> {
    return this.result().finally(onFinally);
  }

  /** The ref to the result once the request is sent to a replica (Ray's `_to_object_ref`). */
  toObjectRef(): Promise<ObjectRef<T>> {
    return this.#sent;
  }

  /** Cancels the request: one still waiting for a replica is never sent; one sent is cancelled there. */
  cancel(): void {
    this.#abort?.abort();
    this.#sent.then((ref) => cancel(ref), () => undefined);
  }
}

/** The items of a handle call to a generator method, as they are yielded. */
export class DeploymentResponseGenerator<T> implements AsyncIterableIterator<T>, AsyncDisposable {
  readonly #router: Router;
  readonly #abort = new AbortController();
  readonly #started: Promise<{ items: AsyncGenerator<T, void, undefined>; stream: ObjectRefGenerator<T>; replica: RoutedReplica }>;
  #released = false;

  /** @internal */
  constructor(router: Router, send: (replica: RoutedReplica, args: unknown[]) => ObjectRefGenerator<T>, args: unknown[] = [], modelId = '', preferLocal = false) {
    this.#router = router;
    this.#started = (async () => {
      const resolved = await resolveArguments(args);
      const replica = await router.acquire(this.#abort.signal, modelId, preferLocal);
      let stream: ObjectRefGenerator<T>;
      try {
        stream = send(replica, resolved);
      } catch (error) {
        router.release(replica);
        throw error;
      }
      return { items: stream.values(), stream, replica };
    })();
    this.#started.catch(() => undefined);
  }

  #release(replica: RoutedReplica): void {
    if (this.#released) return;
    this.#released = true;
    this.#router.release(replica);
  }

  async next(): Promise<IteratorResult<T, undefined>> {
    const { items, replica } = await this.#started;
    try {
      const step = await items.next();
      if (step.done) {
        this.#release(replica);
        return { done: true, value: undefined };
      }
      return step;
    } catch (error) {
      this.#release(replica);
      noteDeath(this.#router, replica, error);
      throw error;
    }
  }

  /** Stops the stream: the replica's generator is closed at its next yield. */
  async return(): Promise<IteratorResult<T, undefined>> {
    this.#abort.abort();
    try {
      const { items, stream, replica } = await this.#started;
      // The stream first: a next() waiting for an item wakes now, not when one comes.
      await stream.return();
      void items.return().catch(() => undefined);
      this.#release(replica);
    } catch {
      // Never sent: nothing to stop.
    }
    return { done: true, value: undefined };
  }

  [Symbol.asyncIterator](): this {
    return this;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.return();
  }
}

type AnyFunction = (...args: any[]) => any;
type MethodKeys<T> = { [K in keyof T]: T[K] extends AnyFunction ? K : never }[keyof T] & string;

/** A handle call's arguments: each a value, or a response or ref to one. */
export type HandleArgs<A extends unknown[]> = { [I in keyof A]: A[I] | DeploymentResponse<A[I]> | ObjectRef<A[I]> };

export type HandleResult<R> = R extends AsyncGenerator<infer Y, any, any> | Generator<infer Y, any, any> | AsyncIterable<infer Y>
  ? DeploymentResponseGenerator<Y>
  : DeploymentResponse<Awaited<R>>;

/** A deployment's handle: each of its class's methods, called through the deployment's router. */
export type DeploymentHandle<T = any> = DeploymentHandleBase & {
  readonly [K in MethodKeys<T>]: (...args: HandleArgs<Parameters<Extract<T[K], AnyFunction>>>) => HandleResult<ReturnType<Extract<T[K], AnyFunction>>>;
};

const RESERVED = new Set(['deploymentName', 'appName', 'methodNames', 'options', 'toString']);

/** Each handle's target, by the handle (the proxy) as callers hold it: a proxy has no private fields. */
const targets = new WeakMap<object, HandleTarget>();

export class DeploymentHandleBase {
  readonly deploymentName: string;
  readonly appName: string;

  /** @internal handles come from serve.run(), getDeploymentHandle(), or bound arguments. */
  constructor(target: HandleTarget) {
    this.deploymentName = target.deployment;
    this.appName = target.app;
    const known = new Set(target.methods.map((name) => name.replace(/^\*/, '')));
    const streaming = new Set(target.methods.filter((name) => name.startsWith('*')).map((name) => name.slice(1)));
    const callers = new Map<string, AnyFunction>();
    const proxy = new Proxy(this, {
      get(handle, key, receiver) {
        if (typeof key === 'symbol' || RESERVED.has(key)) return Reflect.get(handle, key, receiver);
        if (key === 'then' || key === 'toJSON') return undefined;
        let caller = callers.get(key);
        if (caller) return caller;
        if (!known.has(key)) {
          throw new DeploymentError(target.deployment, `deployment ${target.deployment} has no method '${key}' (it has: ${[...known].join(', ') || 'none'})`);
        }
        const modelId = target.modelId ?? '';
        const local = target.preferLocalNode === true;
        caller = streaming.has(key)
          ? (...args: unknown[]) => new DeploymentResponseGenerator(routerOf(target), (replica, resolved) => replica.handle.stream.remote(key, modelId, ...resolved) as ObjectRefGenerator<unknown>, args, modelId, local)
          : (...args: unknown[]) => new DeploymentResponse(routerOf(target), (replica, resolved) => replica.handle.call.remote(key, modelId, ...resolved), args, modelId, local);
        callers.set(key, caller);
        return caller;
      },
    });
    targets.set(proxy, target);
    targets.set(this, target);
    return proxy;
  }

  /** The class's methods a call may name. */
  get methodNames(): string[] {
    return DeploymentHandleBase.targetOf(this).methods.map((name) => name.replace(/^\*/, ''));
  }

  /**
   * This handle with options for its calls (those not given stay as they were):
   * `multiplexedModelId` names the model they are for (routed to a replica holding it; read
   * inside by getMultiplexedModelId()); `preferLocalNode` sends them to the caller's node first.
   */
  options(options: HandleOptions): this {
    if (typeof options !== 'object' || options === null) throw new InvalidArgumentError(`handle.options() takes an object, got ${options === null ? 'null' : typeof options}`);
    const unknown = Object.keys(options).filter((key) => key !== 'multiplexedModelId' && key !== 'preferLocalNode');
    if (unknown.length) throw new InvalidArgumentError(`handle.options() has no option ${unknown.map((key) => `'${key}'`).join(', ')} (it takes multiplexedModelId and preferLocalNode)`);
    const { multiplexedModelId: modelId, preferLocalNode } = options;
    if (modelId !== undefined && typeof modelId !== 'string') throw new InvalidArgumentError(`multiplexedModelId must be a string, got ${typeof modelId}`);
    if (preferLocalNode !== undefined && typeof preferLocalNode !== 'boolean') throw new InvalidArgumentError(`preferLocalNode must be a boolean, got ${typeof preferLocalNode}`);
    const target = DeploymentHandleBase.targetOf(this);
    return new DeploymentHandleBase({ ...target, modelId: modelId ?? target.modelId ?? '', preferLocalNode: preferLocalNode ?? target.preferLocalNode ?? false }) as this;
  }

  toString(): string {
    const { modelId, preferLocalNode } = DeploymentHandleBase.targetOf(this);
    return `DeploymentHandle(${this.appName}/${this.deploymentName}${modelId ? `, model ${modelId}` : ''}${preferLocalNode ? ', local node first' : ''})`;
  }

  /** @internal */
  static targetOf(handle: DeploymentHandleBase): HandleTarget {
    return targets.get(handle)!;
  }

  static {
    registerPortableClass(
      DeploymentHandleBase,
      'trellis.DeploymentHandle',
      (handle) => {
        const target = DeploymentHandleBase.targetOf(handle);
        return [target.app, target.deployment, target.methods, target.maxOngoingRequests, target.maxQueuedRequests === Infinity ? -1 : target.maxQueuedRequests, target.multiplexedModelWaitMs, target.directory, target.modelId ?? '', target.preferLocalNode === true];
      },
      ([app, deployment, methods, maxOngoingRequests, maxQueued, multiplexedModelWaitMs, directory, modelId, preferLocalNode]: [string, string, string[], number, number, number, ActorHandle<ServeDirectory>, string, boolean]) =>
        new DeploymentHandleBase({ app, deployment, methods, maxOngoingRequests, maxQueuedRequests: maxQueued < 0 ? Infinity : maxQueued, multiplexedModelWaitMs, directory, modelId, preferLocalNode }),
    );
  }
}

export function makeHandle<T>(target: HandleTarget): DeploymentHandle<T> {
  if (!target.directory) throw new InvalidArgumentError('a deployment handle needs its directory');
  return new DeploymentHandleBase(target) as DeploymentHandle<T>;
}
