/**
 * remote(): registers a function or class under (module URL, name) at its module's top level.
 * Closures are never shipped: a worker imports the same module, whose top-level remote() calls
 * register the same names, and looks the name up.
 */
import { RegistrationError } from '../errors.js';
import { ObjectRef, type RefOr } from './object-ref.js';
import { ObjectRefGenerator } from './object-ref-generator.js';
import type { ActorCallOptions, ActorOptions, TaskOptions } from './options.js';
import type { FunctionDescriptor } from './protocol.js';
import { currentRuntime, hasRuntime, type Runtime } from './runtime-context.js';
import { returnIdAt } from '../store/object-id.js';
import { ClassMethodNode } from '../dag/nodes.js';
import { canonicalModule, isLibraryModule, localModule } from './code-location.js';
import { compiledTwin, mapTwinStacks, prepareDriverModule } from './worker-loader.js';

type AnyFunction = (...args: any[]) => any;
type AnyClass = new (...args: any[]) => any;

const registered = new Map<string, Map<string, AnyFunction | AnyClass>>();

/** Arguments as a remote call takes them: each a value or a ref to one. */
export type RemoteArgs<A extends unknown[]> = { [K in keyof A]: RefOr<A[K]> };

/**
 * What a remote call gives back: an ObjectRef of its result, or, for a generator function or
 * method, an ObjectRefGenerator of what it yields.
 */
export type RemoteResult<R> = 0 extends 1 & R
  ? ObjectRef<any> // R is any: nothing says it is a generator
  : [R] extends [never]
    ? ObjectRef<never> // a function that only throws
  : [R] extends [AsyncGenerator<infer Y, any, any> | Generator<infer Y, any, any>]
    ? ObjectRefGenerator<Awaited<Y>>
    : ObjectRef<Awaited<R>>;

/**
 * The refs of a call with several returns (numReturns): one per element of the array it returns,
 * each typed by its element where the function's result is a tuple.
 */
export type ReturnRefs<R> = Awaited<R> extends infer A
  ? A extends readonly unknown[]
    ? number extends A['length']
      ? ObjectRef<A[number]>[]
      : { -readonly [K in keyof A]: ObjectRef<A[K]> }
    : ObjectRef<unknown>[]
  : never;

/** What a call gives back under options naming `numReturns: N`. */
type ResultWithReturns<F extends AnyFunction, N extends number> = N extends 1 ? RemoteResult<ReturnType<F>> : ReturnRefs<ReturnType<F>>;

export interface RemoteFunction<F extends AnyFunction, Result = RemoteResult<ReturnType<F>>> {
  remote(...args: RemoteArgs<Parameters<F>>): Result;
  options<N extends number>(options: TaskOptions & { numReturns: N }): RemoteFunction<F, ResultWithReturns<F, N>>;
  options(options: TaskOptions): RemoteFunction<F, Result>;
  readonly descriptor: FunctionDescriptor;
}

export interface ActorMethod<F extends AnyFunction, Result = RemoteResult<ReturnType<F>>> {
  remote(...args: RemoteArgs<Parameters<F>>): Result;
  options<N extends number>(options: ActorCallOptions & { numReturns: N }): ActorMethod<F, ResultWithReturns<F, N>>;
  options(options: ActorCallOptions): ActorMethod<F, Result>;
  /** A node of a compiled graph: this method called with nodes or constants. */
  bind(...args: unknown[]): ClassMethodNode;
}

type MethodKeys<T> = { [K in keyof T]: T[K] extends AnyFunction ? K : never }[keyof T] & string;

export type ActorHandle<T> = { readonly [K in MethodKeys<T>]: ActorMethod<Extract<T[K], AnyFunction>> } & {
  readonly actorId: string;
  /** Kills the actor for good (as kill()): `using actor = ...` ends it with the scope. */
  [Symbol.dispose](): void;
  /**
   * Kills the actor for good and resolves once its process has exited, with its GPU memory:
   * `await using actor = ...` frees what it held before the code after the scope runs.
   */
  [Symbol.asyncDispose](): Promise<void>;
};

export interface ActorClass<C extends AnyClass> {
  remote(...args: RemoteArgs<ConstructorParameters<C>>): ActorHandle<InstanceType<C>>;
  options(options: ActorOptions): ActorClass<C>;
  readonly descriptor: FunctionDescriptor;
}

const descriptors = new WeakMap<object, FunctionDescriptor>();

/** Where workers find a registered function or class again; undefined if it was never registered. */
export function descriptorOf(target: unknown): FunctionDescriptor | undefined {
  if (typeof target === 'function') return descriptors.get(target);
  if (typeof target === 'object' && target !== null && 'descriptor' in target) {
    const descriptor = (target as { descriptor: unknown }).descriptor as FunctionDescriptor | undefined;
    return descriptor && typeof descriptor.module === 'string' ? descriptor : undefined;
  }
  return undefined;
}

export function lookupRegistered(descriptor: FunctionDescriptor): AnyFunction | AnyClass | undefined {
  return registered.get(descriptor.module)?.get(descriptor.name);
}

/**
 * In a worker: the function or class a descriptor names, its module imported (from where this
 * host keeps it: see code-location.ts) when it has not registered yet. Undefined if the module
 * does not register that name.
 */
export async function importRegistered(descriptor: FunctionDescriptor): Promise<AnyFunction | AnyClass | undefined> {
  const found = lookupRegistered(descriptor);
  if (found) return found;
  const url = localModule(descriptor.module);
  const twin = isLibraryModule(descriptor.module) ? undefined : compiledTwin(url);
  if (twin) {
    mapTwinStacks();
    await import(twin);
  } else {
    if (!isLibraryModule(descriptor.module)) await prepareDriverModule(url);
    await import(url);
  }
  return lookupRegistered(descriptor);
}

/** Methods a class's instances have, from its prototype chain. */
export function methodNames(cls: AnyClass): string[] {
  const names = new Set<string>();
  for (let proto = cls.prototype; proto && proto !== Object.prototype; proto = Object.getPrototypeOf(proto)) {
    for (const key of Object.getOwnPropertyNames(proto)) {
      if (key !== 'constructor' && typeof Object.getOwnPropertyDescriptor(proto, key)?.value === 'function') names.add(key);
    }
  }
  return [...names];
}

/** Whether calling `target` makes a generator (function* or async function*). */
export function isGeneratorFunction(target: unknown): boolean {
  const tag = Object.prototype.toString.call(target);
  return tag === '[object GeneratorFunction]' || tag === '[object AsyncGeneratorFunction]';
}

/**
 * A class's methods as handles carry them, between processes too: a generator method's name
 * starts with '*' (no method name can), so its calls stream.
 */
export function handleMethods(cls: AnyClass): string[] {
  return methodNames(cls).map((name) => (isGeneratorFunction(methodOf(cls, name)) ? `*${name}` : name));
}

function methodOf(cls: AnyClass, name: string): unknown {
  for (let proto = cls.prototype; proto && proto !== Object.prototype; proto = Object.getPrototypeOf(proto)) {
    const found = Object.getOwnPropertyDescriptor(proto, name);
    if (found) return found.value;
  }
  return undefined;
}

export function isClass(target: AnyFunction | AnyClass): target is AnyClass {
  return /^class[\s{]/.test(Function.prototype.toString.call(target));
}

export function remote<C extends AnyClass>(meta: ImportMeta, target: C, options?: ActorOptions & { name?: string }): ActorClass<C>;
export function remote<F extends AnyFunction, N extends number>(meta: ImportMeta, target: F, options: TaskOptions & { numReturns: N }): RemoteFunction<F, ResultWithReturns<F, N>>;
export function remote<F extends AnyFunction>(meta: ImportMeta, target: F, options?: TaskOptions): RemoteFunction<F>;
export function remote(meta: ImportMeta, target: AnyFunction | AnyClass, options: TaskOptions | ActorOptions = {}): unknown {
  if (!meta || typeof meta.url !== 'string') {
    throw new RegistrationError('remote() takes import.meta first: remote(import.meta, fn)');
  }
  if (typeof target !== 'function') throw new RegistrationError('remote() takes a function or a class');
  const name = target.name;
  if (!name) {
    throw new RegistrationError(
      `remote() needs a named function or class (in ${meta.url}): workers find it again by (module, name)`,
    );
  }
  // Named as every host reads it: a worker on another host may hold the module elsewhere.
  const module = canonicalModule(meta.url);
  let names = registered.get(module);
  if (!names) registered.set(module, (names = new Map()));
  const existing = names.get(name);
  if (existing !== undefined && existing !== target) {
    throw new RegistrationError(
      `'${name}' is registered twice in ${meta.url}: call remote() once per function or class, at module top level`,
    );
  }
  names.set(name, target);
  const descriptor: FunctionDescriptor = { module, name };
  descriptors.set(target, descriptor);
  return isClass(target)
    ? makeActorClass(descriptor, target, options as ActorOptions)
    : makeRemoteFunction(descriptor, options as TaskOptions, isGeneratorFunction(target));
}

function makeRemoteFunction(descriptor: FunctionDescriptor, options: TaskOptions, streaming: boolean): RemoteFunction<AnyFunction> {
  return {
    descriptor,
    remote: (...args: unknown[]) => {
      const runtime = currentRuntime();
      const ref = runtime.submitTask(descriptor, args, options, streaming);
      return (streaming ? new ObjectRefGenerator(ref) : withReturns(runtime, ref, options.numReturns)) as any;
    },
    options: (more: TaskOptions) => makeRemoteFunction(descriptor, { ...options, ...more }, streaming),
  };
}

function makeActorClass(descriptor: FunctionDescriptor, cls: AnyClass, options: ActorOptions): ActorClass<AnyClass> {
  const methods = handleMethods(cls);
  return {
    descriptor,
    remote: (...args: unknown[]) => {
      const { actorId, lifetime } = currentRuntime().createActor(descriptor, args, options, methods);
      return makeActorHandle(actorId, descriptor, methods, lifetime) as ActorHandle<any>;
    },
    options: (more: ActorOptions) => makeActorClass(descriptor, cls, { ...options, ...more }),
  };
}

const handleInfo = new WeakMap<object, { actorId: string; descriptor: FunctionDescriptor; methods: string[] }>();

export function actorHandleInfo(value: unknown): { actorId: string; descriptor: FunctionDescriptor; methods: string[] } | undefined {
  return typeof value === 'object' && value !== null ? handleInfo.get(value) : undefined;
}

/**
 * `lifetime` is the handle's count on its actor (see makeActorHandle): a method kept apart from
 * its handle, and a graph node bound to it, keep the actor alive as the handle would.
 */
function actorMethod(actorId: string, name: string, options: ActorCallOptions, className: string, lifetime: ObjectRef<unknown>, streaming: boolean): ActorMethod<AnyFunction> {
  return {
    bind: (...args: unknown[]) => {
      if (streaming) throw new RegistrationError(`${className}.${name} is a generator method: a compiled graph's nodes return one value each, so it cannot be bound into one`);
      return new ClassMethodNode(actorId, className, name, args, lifetime);
    },
    remote: (...args: unknown[]) => {
      const runtime = currentRuntime();
      const ref = runtime.submitActorTask(actorId, name, args, options, streaming);
      return (streaming ? new ObjectRefGenerator(ref) : withReturns(runtime, ref, options.numReturns)) as any;
    },
    options: (more: ActorCallOptions) => actorMethod(actorId, name, { ...options, ...more }, className, lifetime, streaming),
  };
}

/** A call's refs: its one ref, or with numReturns n (2 or more, checked on submission) n of them. */
function withReturns(runtime: Runtime, ref: ObjectRef<unknown>, numReturns: number | undefined): ObjectRef<unknown> | ObjectRef<unknown>[] {
  if (numReturns === undefined || numReturns === 1) return ref;
  const refs = [ref];
  for (let index = 1; index < numReturns; index++) refs.push(runtime.returnRef(returnIdAt(ref.id, index)));
  return refs;
}

/** Where a handle keeps its count on the actor (a symbol: any method name stays the class's). */
const lifetimeKey = Symbol('trellis.actorLifetime');

/**
 * A handle whose known methods have `.remote`; an unknown method is an error naming the class.
 * Each handle counts as a reference to its actor, through a ref under the actor's id that the
 * owner counts like any other (garbage collection, borrows by workers, handles inside values):
 * an unnamed actor ends once no handle to it is left and its calls are done.
 */
export function makeActorHandle(
  actorId: string,
  descriptor: FunctionDescriptor,
  methods: string[],
  lifetime: ObjectRef<unknown> = new ObjectRef<unknown>(actorId),
): ActorHandle<unknown> {
  const known = new Set(methods.map((name) => (name.startsWith('*') ? name.slice(1) : name)));
  const streaming = new Set(methods.filter((name) => name.startsWith('*')).map((name) => name.slice(1)));
  const cache = new Map<string, ActorMethod<AnyFunction>>();
  const target = {
    actorId,
    [lifetimeKey]: lifetime,
    // After shutdown() there is nothing left to end.
    [Symbol.dispose](): void {
      if (hasRuntime()) currentRuntime().kill(actorId, true);
    },
    async [Symbol.asyncDispose](): Promise<void> {
      if (!hasRuntime()) return;
      const runtime = currentRuntime();
      const gone = runtime.whenActorProcessGone(actorId);
      runtime.kill(actorId, true);
      await gone;
    },
  };
  const handle = new Proxy(target, {
    get(object, key) {
      if (typeof key === 'symbol' || key === 'actorId') return Reflect.get(object, key);
      if (key === 'then' || key === 'toJSON') return undefined;
      if (!known.has(key)) {
        throw new RegistrationError(`actor class ${descriptor.name} has no method '${key}' (it has: ${[...known].join(', ') || 'none'})`);
      }
      let method = cache.get(key);
      if (!method) {
        method = actorMethod(actorId, key, {}, descriptor.name, lifetime, streaming.has(key));
        cache.set(key, method);
      }
      return method;
    },
  });
  handleInfo.set(handle, { actorId, descriptor, methods });
  return handle as unknown as ActorHandle<unknown>;
}
