/**
 * A deployment's replica: an actor holding one instance of the user's class. Requests pass
 * through it to the instance's methods, at most `maxOngoingRequests` at once (the rest wait here
 * in arrival order, and count as ongoing, the load autoscaling reads); the controller's calls
 * (load, health, reconfigure) never wait behind them. The actor itself takes any number of calls
 * at once, so a slow request never holds up those.
 */
import { DeploymentError } from '../errors.js';
import { Deque } from '../core/deque.js';
import type { FunctionDescriptor } from '../core/protocol.js';
import { importRegistered, remote } from '../core/registry.js';
import { currentRuntime } from '../core/runtime-context.js';
// Handles among a replica's constructor arguments arrive before the user's module is imported:
// their class must be known here already.
import './handle.js';
import { closeRequest, hasModelLoaders, heldModelIds, inRequest, requestScopeFor, type RequestScope } from './multiplex.js';
import { errorResponse, HttpRequest, HttpResponse, isItemStream, responseOf, streamChunk, type RequestData, type ResponsePart } from './http-messages.js';

/** A replica's load, as the controller reads it. */
export interface ReplicaLoad {
  /** Requests running or waiting in the replica. */
  ongoing: number;
  /** Requests finished since the replica started. */
  handled: number;
  /** The models its multiplexed loaders hold (see multiplex.ts). */
  models: string[];
  /** Whether it has multiplexed loaders at all. */
  multiplexed: boolean;
}

type Instance = Record<string, unknown>;

export class ServeReplica {
  readonly #deployment: string;
  readonly #descriptor: FunctionDescriptor;
  readonly #args: unknown[];
  readonly #maxOngoing: number;
  readonly #userConfig: unknown;
  #instance: Instance | undefined;
  #running = 0;
  #ongoing = 0;
  #handled = 0;
  readonly #waiting = new Deque<() => void>();

  constructor(deployment: string, descriptor: FunctionDescriptor, args: unknown[], maxOngoing: number, userConfig: unknown) {
    this.#deployment = deployment;
    this.#descriptor = descriptor;
    this.#args = args;
    this.#maxOngoing = maxOngoing;
    this.#userConfig = userConfig;
  }

  /**
   * Makes the user's instance (its class's module imported here), awaits its `initialize()` if it
   * has one, and hands it its userConfig.
   */
  /** Builds the user's instance; answers with the node the replica runs on (for locality-aware routing). */
  async init(): Promise<{ nodeId: string }> {
    const cls = await importRegistered(this.#descriptor);
    if (typeof cls !== 'function') {
      throw new DeploymentError(this.#deployment, `${this.#descriptor.name} is not registered by ${this.#descriptor.module}: pass deployment() a class made by remote(import.meta, ...) at the module's top level`);
    }
    const instance = new (cls as new (...args: unknown[]) => Instance)(...this.#args);
    // What a constructor cannot await (loading a model): the replica starts once it is done.
    if (typeof instance.initialize === 'function') await (instance.initialize as () => unknown).call(instance);
    this.#instance = instance;
    if (this.#userConfig !== undefined) await this.reconfigure(this.#userConfig);
    return { nodeId: currentRuntime().context().nodeId };
  }

  async reconfigure(userConfig: unknown): Promise<void> {
    const reconfigure = this.#instance?.reconfigure;
    if (typeof reconfigure === 'function') await reconfigure.call(this.#instance, userConfig);
  }

  async checkHealth(): Promise<void> {
    const check = this.#instance?.checkHealth;
    if (typeof check === 'function') await check.call(this.#instance);
  }

  load(): ReplicaLoad {
    return { ongoing: this.#ongoing, handled: this.#handled, models: heldModelIds(), multiplexed: hasModelLoaders() };
  }

  #method(name: string): (...args: unknown[]) => unknown {
    const instance = this.#instance;
    if (!instance) throw new DeploymentError(this.#deployment, `a replica of ${this.#deployment} was called before it started`);
    const method = instance[name];
    if (typeof method !== 'function') throw new DeploymentError(this.#deployment, `deployment ${this.#deployment} has no method '${name}'`);
    return method.bind(instance) as (...args: unknown[]) => unknown;
  }

  /** Waits for a free slot: counted as ongoing from here, as the caller's request is this replica's. */
  async #enter(): Promise<void> {
    this.#ongoing++;
    if (this.#running < this.#maxOngoing) {
      this.#running++;
      return;
    }
    await new Promise<void>((resolve) => this.#waiting.push(resolve));
  }

  #leave(): void {
    this.#ongoing--;
    this.#handled++;
    const next = this.#waiting.shift();
    if (next) next();
    else this.#running--;
  }

  /** A handle's call of `method`, for model `modelId` ('' for none: see multiplex.ts). */
  async call(method: string, modelId: string, ...args: unknown[]): Promise<unknown> {
    await this.#enter();
    const scope = requestScopeFor(modelId);
    try {
      return await inScope(scope, () => this.#method(method)(...args));
    } finally {
      if (scope) closeRequest(scope);
      this.#leave();
    }
  }

  async *stream(method: string, modelId: string, ...args: unknown[]): AsyncGenerator<unknown, void, undefined> {
    await this.#enter();
    const scope = requestScopeFor(modelId);
    try {
      const items = inScope(scope, () => this.#method(method)(...args));
      if (!isItemStream(items)) throw new DeploymentError(this.#deployment, `${this.#deployment}.${method} was called as a stream but did not return one`);
      yield* stepsInScope(scope, items);
    } finally {
      if (scope) closeRequest(scope);
      this.#leave();
    }
  }

  /**
   * An HTTP request to a `fetch(request)` that is not a generator method: the whole answer in one
   * part. One that returns a stream anyway is answered once the stream ends, its items joined.
   */
  async httpCall(request: RequestData, modelId = ''): Promise<ResponsePart> {
    await this.#enter();
    const scope = requestScopeFor(modelId);
    try {
      let result: unknown;
      try {
        result = await inScope(scope, () => this.#method('fetch')(new HttpRequest(request)));
        if (!isItemStream(result)) return responseOf(result);
        const parts: ResponsePart[] = [];
        for await (const part of stepsInScope(scope, this.#streamParts(result))) parts.push(part);
        return joinParts(parts);
      } catch (error) {
        return errorResponse(error);
      }
    } finally {
      if (scope) closeRequest(scope);
      this.#leave();
    }
  }

  /**
   * An HTTP request to the instance's `fetch(request)`: one part holding the whole answer, or a
   * head and then a part per item where fetch gives a stream (a generator). A throw before the head
   * becomes an error response; one after it ends the stream, and the proxy cuts the connection.
   */
  async *http(request: RequestData, modelId = ''): AsyncGenerator<ResponsePart, void, undefined> {
    await this.#enter();
    const scope = requestScopeFor(modelId);
    try {
      let result: unknown;
      try {
        result = await inScope(scope, () => this.#method('fetch')(new HttpRequest(request)));
      } catch (error) {
        yield errorResponse(error);
        return;
      }
      if (!isItemStream(result)) {
        yield responseOf(result);
        return;
      }
      // A stream that fails before its first item is answered as a throw from fetch() is.
      const parts = stepsInScope(scope, this.#streamParts(result));
      let first: IteratorResult<ResponsePart, void>;
      try {
        first = await parts.next();
      } catch (error) {
        yield errorResponse(error);
        return;
      }
      if (first.done) return;
      yield first.value;
      yield* parts;
    } finally {
      if (scope) closeRequest(scope);
      this.#leave();
    }
  }

  /** A stream's items as response parts: a head first (the first item's, if it is an HttpResponse). */
  async *#streamParts(items: AsyncIterable<unknown> | Iterable<unknown>): AsyncGenerator<ResponsePart, void, undefined> {
    let headSent = false;
    for await (const item of items) {
      if (!headSent) {
        headSent = true;
        if (item instanceof HttpResponse) {
          const part = responseOf(item);
          yield part.chunk === undefined || part.chunk.length === 0 ? { head: part.head } : { head: part.head, chunk: part.chunk };
          continue;
        }
        yield { head: { status: 200, headers: { 'content-type': 'text/plain; charset=utf-8' } }, chunk: streamChunk(item) };
        continue;
      }
      yield { chunk: streamChunk(item) };
    }
    if (!headSent) yield { head: { status: 200, headers: { 'content-type': 'text/plain; charset=utf-8' } } };
  }
}

/** Runs `body` in the request's scope (see multiplex.ts), or as it is where there is none. */
function inScope<T>(scope: RequestScope | undefined, body: () => T): T {
  return scope ? inRequest(scope, body) : body();
}

/**
 * A stream's items, each step taken in the request's scope: a generator's body runs in whoever
 * calls its next(), so the scope is set around each call.
 */
async function* stepsInScope<T>(scope: RequestScope | undefined, items: AsyncIterable<T> | Iterable<T>): AsyncGenerator<T, void, undefined> {
  if (!scope) {
    yield* items;
    return;
  }
  const iterator = inRequest(scope, () => (Symbol.asyncIterator in items ? items[Symbol.asyncIterator]() : (items as Iterable<T>)[Symbol.iterator]()));
  let finished = false;
  try {
    for (;;) {
      const step = await inRequest(scope, () => iterator.next());
      if (step.done) {
        finished = true;
        return;
      }
      yield step.value;
    }
  } catch (error) {
    finished = true;
    throw error;
  } finally {
    if (!finished) await inRequest(scope, async () => iterator.return?.());
  }
}

/** Parts of a streamed answer as one: its head and its chunks joined. */
function joinParts(parts: ResponsePart[]): ResponsePart {
  const encoder = new TextEncoder();
  const chunks = parts.flatMap((part) => (part.chunk === undefined ? [] : [typeof part.chunk === 'string' ? encoder.encode(part.chunk) : part.chunk]));
  const body = new Uint8Array(chunks.reduce((sum, chunk) => sum + chunk.length, 0));
  let offset = 0;
  for (const chunk of chunks) {
    body.set(chunk, offset);
    offset += chunk.length;
  }
  return { head: parts[0].head, chunk: body, end: true };
}

export const ServeReplicaActor = remote(import.meta, ServeReplica);
